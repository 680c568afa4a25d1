//! The daemon's life: validate everything, choose the interface, acquire the
//! lease, set up the device, write subnet.env, then keep the datapath in line
//! with the lease set until SIGTERM/SIGINT.
//!
//! Nothing is written to the kernel before the config, the store mode and the
//! interface have been validated and the lease acquired: a bad flag or
//! net-conf.json exits non-zero with nothing changed.
//!
//! The async side (this module) never touches netlink: kernel reads at
//! startup happen on the main thread before the runtime exists, and every
//! kernel write happens on the reconciler's own thread.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flannel_core::admit::{AdmissionDelta, Admitter, ClusterNets};
use flannel_core::config::{
    self, BackendConfig, ConfigError, NetConfig, UdpConfig, VxlanConfig, WireguardConfig,
    WireguardMode,
};
use flannel_core::lease::{IpFamily, Lease, LeaseAttrs, LeaseEvent, LeaseKey};
use flannel_core::mac::MacAddr;
use flannel_core::subnet_env::SubnetEnv;
use flannel_core::wire;
use flannel_netlink::{Link, Netlink};
use flannel_store::etcd::{missing_config_message, EtcdOptions, EtcdStore};
use flannel_store::kube::{KubeOptions, KubeStore, KubeStoreError};
use flannel_store::{
    renew_at, renew_lease, AcquireError, LocalStore, Store, StoreError, WatchEvent,
};
use tokio::sync::mpsc;

use crate::backend::hostgw;
use crate::backend::udp::{self, UdpSpec};
use crate::backend::vxlan::{self, DeviceSpec};
use crate::backend::wireguard::{self, KeyPair, WireguardError};
use crate::flags::{Flags, FlagsError, KubeEnv};
use crate::health::{Health, HealthError, HealthServer};
use crate::iface::{self, ExternalInterface, IfaceError};
use crate::reconcile::{
    BackendSettings, ExternalSettings, PerFamily, ReconcileError, Reconciler, Request, Settings,
    WgSettings, FAMILIES,
};
use crate::subnet_file::{self, SubnetFileError};

/// Why the daemon stopped with an error. Each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "reading the network config {path}: {source}; create it or point --net-config-path at it"
    )]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("network config {path}: {source}")]
    Config {
        path: String,
        #[source]
        source: Box<ConfigError>,
    },
    #[error("network config: Backend.Type {backend:?} is not implemented yet in flannel-rs; use \"vxlan\", \"host-gw\", \"udp\" or \"wireguard\"")]
    BackendNotImplemented { backend: &'static str },
    #[error("network config: Backend.Type \"udp\" carries IPv4 only (as upstream's); set \"EnableIPv4\": true and \"EnableIPv6\": false, or use \"vxlan\" or \"host-gw\" for IPv6")]
    UdpIpv4Only,
    #[error("{0}")]
    EtcdOption(String),
    #[error("--kube-subnet-mgr and --local-store both name a lease store: give one of them")]
    TwoStores,
    #[error("Kubernetes mode: {0}")]
    KubeEnv(#[from] FlagsError),
    #[error("Kubernetes subnet manager: {0}")]
    Kube(#[from] KubeStoreError),
    #[error("selecting the external interface: {0}")]
    Iface(#[from] IfaceError),
    #[error("reading the kernel state at startup: {0}")]
    Kernel(#[from] flannel_netlink::Error),
    #[error("lease store: {0}")]
    Store(#[from] StoreError),
    #[error("acquiring a subnet lease: {0}")]
    Acquire(#[from] AcquireError),
    #[error("{0}")]
    Reconcile(#[from] ReconcileError),
    #[error("setting up the vxlan device: {0}")]
    Device(String),
    #[error("writing subnet.env: {0}")]
    SubnetFile(#[from] SubnetFileError),
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("the lease store's watch ended and could not be restarted: {0}")]
    WatchLost(String),
    #[error("starting the health endpoint: {0}")]
    Health(#[from] HealthError),
    #[error("wireguard backend: {0}")]
    Wireguard(#[from] WireguardError),
}

/// The backends this version runs, with their options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Vxlan(VxlanConfig),
    HostGw,
    Udp(UdpConfig),
    Wireguard(WireguardConfig),
}

/// What startup learns before the runtime starts.
#[derive(Debug, Clone)]
pub struct Startup {
    pub cfg: NetConfig,
    pub backend: Backend,
    pub ext: ExternalInterface,
    /// With vxlan, the `flannel.<VNI>` (v4) and `flannel-v6.<VNI>` (v6)
    /// devices of the enabled families that already exist.
    pub existing_devices: PerFamily<Option<Link>>,
    /// The subnet of the previous subnet.env, for acquisition step 2.
    pub previous: Option<LeaseKey>,
    /// With wireguard, whether its devices are the kernel's
    /// (`Backend.Datapath` and the probe, decided once at start).
    pub wireguard_kernel: bool,
}

/// Reads and validates the config file (or `store_config` when the file is
/// missing and the store ships one).
pub fn load_config(flags: &Flags, store_config: Option<String>) -> Result<NetConfig, DaemonError> {
    let path = &flags.net_config_path;
    let (text, origin) = match std::fs::read_to_string(path) {
        Ok(t) => (t, path.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && store_config.is_some() => (
            store_config.expect("checked"),
            "from the local store".to_string(),
        ),
        Err(source) => {
            return Err(DaemonError::ReadConfig {
                path: path.clone(),
                source,
            })
        }
    };
    config::parse(&text).map_err(|source| DaemonError::Config {
        path: origin,
        source: Box::new(source),
    })
}

/// Checks what this version supports; returns the backend. Both address
/// families, alone or together, are supported (config parsing already
/// refuses a config enabling neither, or one without the network of an
/// enabled family).
pub fn check_supported(cfg: &NetConfig) -> Result<Backend, DaemonError> {
    let backend = match &cfg.backend {
        BackendConfig::Vxlan(v) => Backend::Vxlan(v.clone()),
        BackendConfig::HostGw => Backend::HostGw,
        BackendConfig::Udp(u) => {
            // As upstream: the udp backend carries IPv4 only.
            if cfg.enable_ipv6 || !cfg.enable_ipv4 {
                return Err(DaemonError::UdpIpv4Only);
            }
            Backend::Udp(u.clone())
        }
        BackendConfig::Wireguard(w) => Backend::Wireguard(w.clone()),
    };
    Ok(backend)
}

/// The enabled address families of `cfg`.
pub fn families(cfg: &NetConfig) -> impl Iterator<Item = IpFamily> + '_ {
    FAMILIES.into_iter().filter(|f| match f {
        IpFamily::V4 => cfg.enable_ipv4,
        IpFamily::V6 => cfg.enable_ipv6,
    })
}

/// "IPv4" / "IPv6".
fn family_name(f: IpFamily) -> &'static str {
    match f {
        IpFamily::V4 => "IPv4",
        IpFamily::V6 => "IPv6",
    }
}

/// The MTU of pods: the external interface's MTU minus the backend's
/// overhead, or the backend's `MTU` option. With IPv6 enabled the vxlan
/// underlay of `flannel-v6.<VNI>` is IPv6 (70 bytes, not upstream's 50), and
/// a pod's single MTU must fit that device too.
pub fn pod_mtu(cfg: &NetConfig, external_mtu: u32) -> u32 {
    cfg.pod_mtu(external_mtu, cfg.enable_ipv6)
}

/// The MTU of the vxlan device of `family`: the external MTU minus the
/// overhead of that family's underlay, or the backend's `MTU` option.
pub fn device_mtu(cfg: &NetConfig, external_mtu: u32, family: IpFamily) -> u32 {
    cfg.pod_mtu(external_mtu, family == IpFamily::V6)
}

/// Which lease store the flags select.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// `--local-store DIR`.
    Local(PathBuf),
    /// etcd v3 (upstream's default): `--etcd-*`.
    Etcd(EtcdOptions),
    /// The Kubernetes API: `--kube-subnet-mgr`, `--kube-*`, and the Node
    /// from `NODE_NAME` or `POD_NAME`/`POD_NAMESPACE`.
    Kube(KubeOptions),
}

/// The store the flags select: `--kube-subnet-mgr`, else `--local-store`,
/// else etcd (as upstream).
pub fn store_kind(flags: &Flags) -> Result<StoreKind, DaemonError> {
    store_kind_with(flags, |k| std::env::var(k).ok())
}

/// [`store_kind`] with the environment read through `env`.
pub fn store_kind_with(
    flags: &Flags,
    env: impl Fn(&str) -> Option<String>,
) -> Result<StoreKind, DaemonError> {
    if flags.kube.kube_subnet_mgr {
        if flags.local_store.is_some() {
            return Err(DaemonError::TwoStores);
        }
        let kube_env = KubeEnv::from_lookup(&env)?;
        kube_env.log_summary();
        let node = kube_env.node()?;
        return Ok(StoreKind::Kube(KubeOptions {
            api_url: flags.kube.kube_api_url.clone().filter(|u| !u.is_empty()),
            kubeconfig: flags
                .kube
                .kubeconfig_file
                .clone()
                .filter(|p| !p.as_os_str().is_empty()),
            annotation_prefix: flags.kube.kube_annotation_prefix.clone(),
            node,
            set_node_network_unavailable: flags.set_node_network_unavailable,
        }));
    }
    if let Some(dir) = &flags.local_store {
        return Ok(StoreKind::Local(dir.clone()));
    }
    Ok(StoreKind::Etcd(flags.etcd_options()))
}

/// Connects to etcd, waiting (with backoff) while it is unreachable, as a
/// daemon started before its etcd must; a wrong flag fails at once.
async fn connect_etcd(opts: EtcdOptions) -> Result<EtcdStore, DaemonError> {
    let mut delay = Duration::from_millis(500);
    loop {
        match EtcdStore::connect(opts.clone()).await {
            Ok(s) => return Ok(s),
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, retry_in = ?delay, "etcd not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(DaemonError::EtcdOption(e.to_string())),
        }
    }
}

/// SIGTERM and SIGINT, caught from the first moment of [`run`]. Until a
/// handler exists the kernel's default action kills flanneld, so a SIGTERM
/// during startup (a kubelet stopping the pod right after starting it) would
/// end it half-way with "killed by signal 15". Caught, a signal that
/// arrives while flanneld waits on the store ends it cleanly there
/// ([`Signals::during`]); one that arrives during the short datapath setup
/// is held until the main loop, which exits as on any SIGTERM.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, DaemonError> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(DaemonError::Runtime)?,
            int: signal(SignalKind::interrupt()).map_err(DaemonError::Runtime)?,
        })
    }

    /// The next SIGTERM or SIGINT (at once if one is pending); its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }

    /// A startup step that may wait on the store: its result, or `None`
    /// when a signal came first.
    async fn during<T, E: Into<DaemonError>>(
        &mut self,
        what: &str,
        step: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<Option<T>, DaemonError> {
        tokio::select! {
            r = step => r.map(Some).map_err(Into::into),
            name = self.recv() => {
                tracing::info!("{name} while {what}: exiting");
                Ok(None)
            }
        }
    }
}

/// Reads `<prefix>/config` from etcd, waiting while it is missing, invalid
/// or asks for something not implemented: the operator fixes it with
/// `etcdctl put` and this node carries on, instead of crash-looping (a bad
/// config in etcd is shared by every node). `Ok(None)` on SIGTERM/SIGINT
/// while waiting.
async fn wait_for_etcd_config(
    store: &EtcdStore,
    prefix: &str,
    signals: &mut Signals,
) -> Result<Option<NetConfig>, DaemonError> {
    let key = format!("{}/{}", prefix.trim_end_matches('/'), wire::ETCD_CONFIG_KEY);
    let mut delay = Duration::from_secs(1);
    loop {
        let problem = match store.get_network_config().await {
            Ok(Some(text)) => match config::parse(&text) {
                Ok(cfg) => match check_supported(&cfg) {
                    Ok(_) => return Ok(Some(cfg)),
                    Err(e) => format!("{key} in etcd: {e}"),
                },
                Err(e) => format!("{key} in etcd is invalid: {e}"),
            },
            Ok(None) => missing_config_message(prefix),
            Err(e) => format!("reading {key}: {e}"),
        };
        tracing::error!(retry_in = ?delay, "{problem}; waiting for a valid config");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            name = signals.recv() => {
                tracing::info!("{name} while waiting for a valid config: exiting");
                return Ok(None);
            }
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// The subnet recorded in a previous subnet.env (`FLANNEL_SUBNET=10.244.1.1/24` -> 10.244.1.0/24).
pub fn previous_subnet(flags: &Flags) -> Option<LeaseKey> {
    let text = match subnet_file::read(&flags.subnet_file) {
        Ok(Some(t)) => t,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the previous subnet.env");
            return None;
        }
    };
    match SubnetEnv::parse(&text) {
        Ok(env) => env.lease_key(),
        Err(e) => {
            tracing::warn!(path = %flags.subnet_file.display(), error = %e, "ignoring an unreadable previous subnet.env");
            None
        }
    }
}

/// Raises the soft limit of open files to the hard one (`ulimit -n $(ulimit
/// -Hn)`): flanneld holds sockets, netlink handles, inotify, lease files and
/// health connections at once, and a distribution's default soft limit
/// (1024) is the first to run out. Returns (old, new) soft limits when it
/// changed.
pub fn raise_nofile_limit() -> Option<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open files limit (RLIMIT_NOFILE)");
            return None;
        }
    };
    if soft >= hard {
        return None;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => Some((soft, hard)),
        Err(e) => {
            tracing::warn!(error = %e, soft, hard, "cannot raise the open files limit to the hard limit");
            None
        }
    }
}

/// Runs flanneld to completion: `Ok(())` after SIGTERM/SIGINT.
pub fn run(flags: Flags) -> Result<(), DaemonError> {
    if let Some((old, new)) = raise_nofile_limit() {
        tracing::info!(
            old,
            new,
            "raised the open files limit (RLIMIT_NOFILE) to the hard limit"
        );
    }
    let kind = store_kind(&flags)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    rt.block_on(async move {
        let mut signals = Signals::install()?;
        // The endpoint comes first: a port in use or a foreign address
        // stops flanneld before the store directory, the kernel or
        // subnet.env is touched, and /healthz answers while flanneld waits
        // for etcd.
        let health = Health::default();
        let server = match flags.healthz_port {
            0 => None,
            port => Some(HealthServer::start(flags.healthz_ip, port, health.clone()).await?),
        };
        let result = match kind {
            StoreKind::Local(dir) => {
                async {
                    let store = LocalStore::open(&dir)?;
                    let cfg = load_config(&flags, store.get_network_config().await?)?;
                    run_with_store(flags, store, cfg, false, health, &mut signals).await
                }
                .await
            }
            StoreKind::Etcd(opts) => {
                async {
                    let prefix = opts.prefix.clone();
                    let connect = connect_etcd(opts);
                    let Some(store) = signals.during("connecting to etcd", connect).await? else {
                        return Ok(());
                    };
                    // In etcd mode the config lives in etcd, as upstream.
                    let Some(cfg) = wait_for_etcd_config(&store, &prefix, &mut signals).await?
                    else {
                        return Ok(());
                    };
                    run_with_store(flags, store, cfg, true, health, &mut signals).await
                }
                .await
            }
            StoreKind::Kube(opts) => {
                async {
                    // As upstream, the network config is the file (the
                    // ConfigMap kube-flannel.yml mounts).
                    let cfg = load_config(&flags, None)?;
                    check_supported(&cfg)?;
                    let connect = KubeStore::connect(opts, &cfg);
                    let Some(store) = signals
                        .during("connecting to the Kubernetes API", connect)
                        .await?
                    else {
                        return Ok(());
                    };
                    let own = async { Ok::<_, DaemonError>(store.own_node().await) };
                    let Some(own) = signals.during("listing the Nodes", own).await? else {
                        return Ok(());
                    };
                    let mut flags = flags;
                    if let Some(own) = own {
                        // node-public-ip(-v6) replace --public-ip(-v6), before
                        // the interface is chosen (as upstream).
                        let (v4, v6) = own
                            .view()
                            .node_public_ips(store.names())
                            .map_err(KubeStoreError::Node)?;
                        if let Some(ip) = v4 {
                            tracing::info!(public_ip = %ip, "using the Node's node-public-ip annotation as --public-ip");
                            flags.public_ip = Some(ip);
                        }
                        if let Some(ip) = v6 {
                            tracing::info!(public_ipv6 = %ip, "using the Node's node-public-ipv6 annotation as --public-ipv6");
                            flags.public_ipv6 = Some(ip);
                        }
                    }
                    // Leases live as long as their Nodes: nothing expires here.
                    run_with_store(flags, store, cfg, true, health, &mut signals).await
                }
                .await
            }
        };
        if let Some(s) = server {
            s.shutdown().await;
        }
        result
    })
}

/// Everything after the store is open and the config read: validation,
/// interface selection (read-only), acquisition, device, subnet.env, loop.
///
/// `store_expires_leases`: see [`State::store_expires_leases`]. `health`
/// learns when subnet.env is written and gets the reconciler's and the
/// rules' passes.
async fn run_with_store<S: Store>(
    flags: Flags,
    store: S,
    cfg: NetConfig,
    store_expires_leases: bool,
    health: Health,
    signals: &mut Signals,
) -> Result<(), DaemonError> {
    // Everything that can be refused is checked before anything is written
    // (the health endpoint's address was bound already).
    let backend = check_supported(&cfg)?;
    if flags.public_ipv6.is_some() && !cfg.enable_ipv6 {
        tracing::warn!("--public-ipv6 is ignored: the network config does not enable IPv6");
    }
    if flags.public_ip.is_some() && !cfg.enable_ipv4 {
        tracing::warn!("--public-ip is ignored: the network config disables IPv4");
    }
    let req = iface::Request {
        ifaces: flags.iface.clone(),
        regexes: flags.iface_regex.clone(),
        public_ip: flags.public_ip,
        public_ipv6: flags.public_ipv6,
        can_reach: flags.iface_can_reach,
        ipv4: cfg.enable_ipv4,
        ipv6: cfg.enable_ipv6,
    };
    // Read-only kernel access, on a blocking-pool thread (never on an async
    // worker): the interface and an existing device's MAC.
    let mut dev_names: PerFamily<Option<String>> = PerFamily::default();
    if let Backend::Vxlan(vx) = &backend {
        for f in families(&cfg) {
            *dev_names.get_mut(f) = Some(vxlan::device_name(vx.vni, f));
        }
    }
    let wireguard_datapath = match &backend {
        Backend::Wireguard(w) => Some(w.datapath),
        _ => None,
    };
    let (ext, existing_devices, wireguard_kernel) = tokio::task::spawn_blocking(move || {
        let mut nl = Netlink::open()?;
        let ext = iface::lookup(&mut nl, &req)?;
        let wireguard_kernel = match wireguard_datapath {
            Some(want) => wireguard::choose_datapath(&mut nl, want)?,
            None => false,
        };
        let mut devs: PerFamily<Option<Link>> = PerFamily::default();
        for f in FAMILIES {
            if let Some(n) = dev_names.get(f) {
                *devs.get_mut(f) = nl.link_by_name(n)?;
            }
        }
        Ok::<_, DaemonError>((ext, devs, wireguard_kernel))
    })
    .await
    .map_err(|e| DaemonError::Device(format!("startup kernel reads failed: {e}")))??;
    tracing::info!(iface = %ext.name, index = ext.index, addr = ?ext.iface_addr, addr_v6 = ?ext.iface_addr_v6,
        public_ip = ?ext.public_ip, public_ipv6 = ?ext.public_ipv6, mtu = ext.mtu,
        "using external interface");
    let startup = Startup {
        previous: previous_subnet(&flags),
        cfg,
        backend,
        ext,
        existing_devices,
        wireguard_kernel,
    };
    run_async(flags, startup, store, store_expires_leases, health, signals).await
}

struct State<S: Store> {
    flags: Flags,
    s: Startup,
    store: S,
    attrs: LeaseAttrs,
    own: Lease,
    /// Our lease's attributes as the store held them when we last wrote
    /// them (Kubernetes: with `public-ip-overwrite` applied); a watched
    /// copy that differs was edited by someone else and is written again.
    published: LeaseAttrs,
    /// The VtepMAC of each enabled family (vxlan only).
    mac: PerFamily<Option<MacAddr>>,
    /// This node's WireGuard keys (wireguard only).
    wg_keys: Option<KeyPair>,
    /// Every lease of the store as the datapath sees it (see
    /// [`State::datapath_view`]), shared with the reconciler.
    leases: BTreeMap<LeaseKey, Arc<Lease>>,
    /// Which of `leases` the datapath may program
    /// (`flannel_core::admit`), kept up to date event by event; each
    /// rejection is logged when it appears or its reason changes.
    admission: Admitter,
    mtu: u32,
    reconciler: Option<Reconciler>,
    /// Masquerade/forward rules (crate::rules), started once the lease is held.
    rules: Option<crate::rules::RulesManager>,
    /// The store itself deletes expired leases and says so through the
    /// watch (etcd: the DELETE of a key whose etcd lease ran out). Then
    /// the datapath must not also expire leases on this node's clock: while
    /// etcd is unreachable no peer can renew, yet none has expired (etcd
    /// extends every lease when it is back), and expiring them locally would
    /// tear down the routes to every live peer during an outage longer than
    /// a TTL. Upstream, too, acts only on the store's events.
    store_expires_leases: bool,
    /// Readiness and metrics (crate::health).
    health: Health,
}

async fn run_async<S: Store>(
    flags: Flags,
    s: Startup,
    store: S,
    store_expires_leases: bool,
    health: Health,
    signals: &mut Signals,
) -> Result<(), DaemonError> {
    let mut mac: PerFamily<Option<MacAddr>> = PerFamily::default();
    // With vxlan, the leases as the store has them now, when it cannot name
    // ours otherwise (see below); acquisition plans on the same list.
    let mut snapshot = None;
    let mut wg_keys = None;
    let attrs = match &s.backend {
        Backend::Vxlan(vx) => {
            // Each VtepMAC: the existing device's, else our previous lease's,
            // else random. Our previous lease is what the store knows as
            // ours (Kubernetes: our Node's annotations), else the one that
            // names our public address(es).
            let published = store.own_published_attrs().await?;
            if published.is_none() {
                snapshot = Some(store.list_leases().await?);
            }
            let ours = |l: &&Lease| {
                families(&s.cfg).all(|f| l.attrs.public_ip_of(f) == s.ext.public_ip_of(f))
            };
            for f in families(&s.cfg) {
                let prev_mac = match (&published, &snapshot) {
                    (Some(a), _) => vxlan::lease_vtep_mac(a, vx.vni, f),
                    (None, Some(snap)) => snap
                        .leases
                        .iter()
                        .filter(ours)
                        .find_map(|l| vxlan::lease_vtep_mac(&l.attrs, vx.vni, f)),
                    (None, None) => None,
                };
                let (m, source) = {
                    let mut rng = rand::rng();
                    vxlan::choose_vtep_mac(s.existing_devices.get(f).as_ref(), prev_mac, &mut rng)
                };
                tracing::info!(device = %vxlan::device_name(vx.vni, f), vtep_mac = %m, source = ?source, "VtepMAC");
                *mac.get_mut(f) = Some(m);
            }
            vxlan::lease_attrs_dual(
                s.ext.public_ip.zip(mac.v4),
                s.ext.public_ipv6.zip(mac.v6),
                vx.vni,
            )
        }
        Backend::HostGw => hostgw::lease_attrs_dual(s.ext.public_ip, s.ext.public_ipv6),
        Backend::Udp(_) => udp::lease_attrs(s.ext.public_ip.ok_or_else(|| {
            DaemonError::Device("the udp backend needs an IPv4 public address".into())
        })?),
        Backend::Wireguard(w) => {
            let path = wireguard::key_file_path();
            let (keys, source) = wireguard::load_or_create_key(&path)?;
            tracing::info!(path = %path.display(), public_key = %keys.public, source = ?source, "WireGuard key");
            if w.mode != WireguardMode::Separate
                && s.cfg.enable_ipv6
                && w.listen_port_v6 != w.listen_port
            {
                // As upstream: the one device listens on ListenPort while
                // BackendV6Data publishes ListenPortV6, which peers dial
                // for an IPv6 endpoint.
                tracing::warn!(
                    mode = w.mode.as_str(),
                    listen_port = w.listen_port,
                    listen_port_v6 = w.listen_port_v6,
                    "Mode {} listens on ListenPort only but publishes ListenPortV6 for IPv6 (as upstream): IPv6 endpoints work only when both ports are equal",
                    w.mode.as_str()
                );
            }
            let attrs = wireguard::lease_attrs(
                s.ext.public_ip,
                s.ext.public_ipv6,
                &keys.public,
                w,
                s.cfg.enable_ipv4,
                s.cfg.enable_ipv6,
            );
            wg_keys = Some(keys);
            attrs
        }
    };
    let acquire = store.acquire(&s.cfg, &attrs, s.previous, flags.lease_ttl(), snapshot);
    let Some(own) = signals.during("acquiring a lease", acquire).await? else {
        return Ok(());
    };
    for f in families(&s.cfg) {
        if own.key.subnet(f).is_none() {
            return Err(DaemonError::Device(format!(
                "acquired lease {} has no {} subnet although the config enables {}",
                own.key,
                family_name(f),
                family_name(f)
            )));
        }
    }
    tracing::info!(subnet = %own.key, expires = ?own.expiration, "holding lease");

    let watch = async {
        let mut watch = store.watch_leases().await?;
        let leases = first_snapshot(&mut watch).await?;
        Ok::<_, DaemonError>((watch, leases))
    };
    let Some((watch, leases)) = signals.during("reading the leases", watch).await? else {
        return Ok(());
    };
    let mtu = pod_mtu(&s.cfg, s.ext.mtu);
    let admission = Admitter::new(ClusterNets::from_config(&s.cfg), own.key, attrs.clone());
    let mut st = State {
        flags,
        s,
        store,
        attrs,
        published: own.attrs.clone(),
        admission,
        own,
        mac,
        wg_keys,
        leases: BTreeMap::new(),
        mtu,
        reconciler: None,
        rules: None,
        store_expires_leases,
        health,
    };
    st.leases = leases
        .into_values()
        .map(|l| (l.key, st.datapath_view(l)))
        .collect();
    let settings = st.settings();
    let admitted = st.admit_all();
    let rec = Reconciler::start_with(settings, admitted, st.health.datapath.clone())?;
    let report = rec.pass_now().await?;
    if let Some(e) = report.device_error {
        rec.shutdown();
        return Err(DaemonError::Device(e));
    }
    tracing::info!(
        ifindex = report.ifindex,
        ifindex_v6 = report.ifindex_v6,
        changes = report.changes,
        errors = report.errors.len(),
        peers = report.peers,
        "datapath programmed"
    );
    st.reconciler = Some(rec);
    st.write_subnet_env()?;
    if let Err(e) = st.store.complete_lease(&st.own).await {
        tracing::warn!(error = %e, "completing the lease in the store failed");
    }
    st.rules = Some(crate::rules::RulesManager::start_with(
        crate::rules::input_from(&st.flags, &st.s.cfg, &st.own.key),
        Duration::from_secs(st.flags.iptables_resync),
        st.health.rules.clone(),
    ));

    let result = st.main_loop(watch, signals).await;
    if let Some(r) = st.reconciler.take() {
        r.shutdown();
    }
    if let Some(r) = st.rules.take() {
        r.shutdown();
    }
    result
}

/// Whether two lease attributes name the same node: the same public
/// address in each family.
fn same_holder(a: &LeaseAttrs, b: &LeaseAttrs) -> bool {
    a.public_ip == b.public_ip && a.public_ipv6 == b.public_ipv6
}

/// Waits for the watch's first message, which must be a snapshot.
async fn first_snapshot(
    rx: &mut mpsc::Receiver<WatchEvent>,
) -> Result<BTreeMap<LeaseKey, Lease>, DaemonError> {
    loop {
        match rx.recv().await {
            Some(WatchEvent::Snapshot(s)) => {
                return Ok(s.leases.into_iter().map(|l| (l.key, l)).collect())
            }
            Some(WatchEvent::Events { .. }) => continue,
            None => {
                return Err(DaemonError::WatchLost(
                    "closed before the first snapshot".into(),
                ))
            }
        }
    }
}

impl<S: Store> State<S> {
    fn settings(&self) -> Settings {
        let backend = match &self.s.backend {
            Backend::Vxlan(vx) => {
                // A device for each family with a subnet, a local address
                // and a VtepMAC: all three are there for every enabled
                // family (checked by interface selection and acquisition).
                let spec = |f: IpFamily| {
                    Some(DeviceSpec {
                        device: vxlan::device(
                            vx,
                            f,
                            self.s.ext.iface_addr_of(f)?,
                            self.s.ext.index,
                            device_mtu(&self.s.cfg, self.s.ext.mtu, f),
                            (*self.mac.get(f))?,
                        ),
                        address: vxlan::device_address(self.own.key.subnet(f)?),
                    })
                };
                BackendSettings::Vxlan {
                    v4: spec(IpFamily::V4),
                    v6: spec(IpFamily::V6),
                    direct_routing: vx.direct_routing,
                }
            }
            Backend::HostGw => BackendSettings::HostGw,
            Backend::Udp(u) => {
                // IPv4 only: check_supported refuses udp without IPv4 or
                // with IPv6, and IPv4 gives a network, a subnet and an address.
                let v4 = "udp runs with IPv4 only (check_supported)";
                BackendSettings::Udp(UdpSpec::new(
                    self.own.key.ipv4.expect(v4),
                    self.s.cfg.network.expect(v4),
                    self.mtu,
                    u.port,
                    self.s.ext.iface_addr.expect(v4),
                    Some(self.flags.udp_stats_file()),
                ))
            }
            Backend::Wireguard(w) => {
                let keys = self
                    .wg_keys
                    .as_ref()
                    .expect("wireguard keys are loaded before the lease");
                let network = self.s.cfg.network.filter(|_| self.s.cfg.enable_ipv4);
                let ipv6_network = self.s.cfg.ipv6_network.filter(|_| self.s.cfg.enable_ipv6);
                BackendSettings::Wireguard(WgSettings {
                    devices: wireguard::device_specs(
                        w,
                        self.own.key.ipv4.filter(|_| network.is_some()),
                        self.own.key.ipv6.filter(|_| ipv6_network.is_some()),
                        network,
                        ipv6_network,
                        self.mtu,
                        keys,
                        self.flags.subnet_file.parent(),
                        self.s.wireguard_kernel,
                    ),
                    local: flannel_core::wireguard::LocalAddrs {
                        v4: self.s.ext.public_ip,
                        v6: self.s.ext.public_ipv6,
                    },
                })
            }
        };
        Settings {
            backend,
            network: self.s.cfg.network.filter(|_| self.s.cfg.enable_ipv4),
            ipv6_network: self.s.cfg.ipv6_network.filter(|_| self.s.cfg.enable_ipv6),
            own: self.own.key,
            external: ExternalSettings {
                ifindex: self.s.ext.index,
                name: self.s.ext.name.clone(),
                connected: self.s.ext.connected.clone(),
            },
            blackhole: self.flags.ip_blackhole_route,
        }
    }

    /// A lease as the datapath sees it: with a store that expires leases
    /// itself, without expiry (see [`State::store_expires_leases`]).
    fn datapath_view(&self, mut l: Lease) -> Arc<Lease> {
        if self.store_expires_leases {
            l.expiration = None;
        }
        Arc::new(l)
    }

    fn write_subnet_env(&self) -> Result<(), DaemonError> {
        let env = SubnetEnv::new(&self.s.cfg, &self.own.key, self.mtu, self.flags.ip_masq);
        subnet_file::write_atomic(&self.flags.subnet_file, &env.render())?;
        self.health.set_subnet_env_written();
        tracing::info!(path = %self.flags.subnet_file.display(), "wrote subnet.env");
        Ok(())
    }

    /// Every admitted lease (`flannel_core::admit` over the whole set,
    /// from scratch), logging what changed.
    fn admit_all(&mut self) -> Vec<Arc<Lease>> {
        let d = self.admission.reset(&self.leases, SystemTime::now());
        self.log_admission(&d);
        self.admission.admitted().values().cloned().collect()
    }

    /// Logs the rejections that appeared or changed, and the leases
    /// programmed again: each once, not on every pass.
    fn log_admission(&self, d: &AdmissionDelta) {
        for r in &d.rejected {
            tracing::warn!(lease = %r.key, "{r}");
        }
        for key in &d.cleared {
            if self.admission.admitted().contains_key(key) {
                tracing::info!(lease = %key, "lease {key} is no longer in conflict: programming it");
            }
        }
        if !d.rejected.is_empty() || !d.cleared.is_empty() {
            tracing::info!(
                rejected = self.admission.rejected().len(),
                admitted = self.admission.admitted().len(),
                "lease admission changed"
            );
        }
    }

    /// Sends the whole admitted lease set: the reconciler runs a full pass.
    fn push_leases(&mut self) {
        if self.reconciler.is_some() {
            let leases = self.admit_all();
            if let Some(r) = &self.reconciler {
                let _ = r.send(Request::Leases(leases));
            }
        }
    }

    /// Sends what changed among the admitted leases after `changed` changed
    /// in the lease set: the reconciler runs an event pass that writes only
    /// what these leases concern.
    fn push_changes(&mut self, changed: Vec<LeaseKey>) {
        if changed.is_empty() {
            return;
        }
        let d = self
            .admission
            .update(&self.leases, changed, SystemTime::now());
        self.log_admission(&d);
        if d.upserts.is_empty() && d.removed.is_empty() {
            return;
        }
        if let Some(r) = &self.reconciler {
            let _ = r.send(Request::Changes {
                upserts: d.upserts,
                removed: d.removed,
            });
        }
    }

    /// The renewal deadline. `--subnet-lease-renew-margin` is at least a
    /// minute; with a short test `--lease-ttl` the margin is capped at half
    /// the TTL so that renewal does not spin.
    fn next_renewal(&self) -> Option<SystemTime> {
        let margin = self.flags.renew_margin().min(self.flags.lease_ttl() / 2);
        renew_at(&self.own, margin)
    }

    fn retry_delay(&self) -> Duration {
        Duration::from_secs(60)
            .min(self.flags.lease_ttl() / 4)
            .max(Duration::from_secs(1))
    }

    async fn main_loop(
        &mut self,
        mut watch: mpsc::Receiver<WatchEvent>,
        signals: &mut Signals,
    ) -> Result<(), DaemonError> {
        let mut resync = tokio::time::interval(self.flags.resync_interval());
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await; // the first tick is immediate; the startup pass just ran
        let mut renew_due = self.next_renewal();
        loop {
            let renew_sleep = async {
                match renew_due {
                    Some(at) => {
                        let d = at.duration_since(SystemTime::now()).unwrap_or_default();
                        tokio::time::sleep(d).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                name = signals.recv() => { tracing::info!("{name}: exiting, leaving lease, device, routes and subnet.env in place"); return Ok(()); }
                _ = resync.tick() => {
                    // Admission is decided again from scratch (leases may
                    // have expired since); the reconciler's pass is full
                    // either way.
                    let d = self.admission.reset(&self.leases, SystemTime::now());
                    self.log_admission(&d);
                    if let Some(r) = &self.reconciler {
                        if d.upserts.is_empty() && d.removed.is_empty() {
                            r.send(Request::Resync)?;
                        } else {
                            r.send(Request::Leases(self.admission.admitted().values().cloned().collect()))?;
                        }
                    }
                }
                _ = renew_sleep => {
                    renew_due = match self.renew().await? {
                        Some(next) => next,
                        None => {
                            if !self.reacquire_until_signal(signals).await? {
                                return Ok(());
                            }
                            self.next_renewal()
                        }
                    };
                }
                ev = watch.recv() => match ev {
                    Some(ev) => match self.on_watch(ev) {
                        OwnLease::Unchanged => {}
                        OwnLease::Renewed => renew_due = self.next_renewal(),
                        OwnLease::Lost => {
                            tracing::warn!(subnet = %self.own.key, "our lease was removed from the store while running; re-acquiring (the datapath is kept)");
                            if !self.reacquire_until_signal(signals).await? {
                                return Ok(());
                            }
                            renew_due = self.next_renewal();
                        }
                        OwnLease::Drifted => {
                            tracing::warn!(subnet = %self.own.key, "our lease in the store differs from what we published; publishing it again");
                            if !self.reacquire_until_signal(signals).await? {
                                return Ok(());
                            }
                            renew_due = self.next_renewal();
                        }
                    },
                    None => {
                        tracing::warn!("lease watch ended; restarting it");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        watch = self.store.watch_leases().await
                            .map_err(|e| DaemonError::WatchLost(e.to_string()))?;
                    }
                },
            }
        }
    }

    /// Renews our lease; returns when to try next, or `None` when the lease
    /// is gone and must be re-acquired.
    async fn renew(&mut self) -> Result<Option<Option<SystemTime>>, DaemonError> {
        // Renew with our attributes, so that a lease edited in the store
        // (another VtepMAC, say) is put right at the latest on renewal.
        let mine = Lease {
            attrs: self.attrs.clone(),
            ..self.own.clone()
        };
        match renew_lease(&self.store, &mine, self.flags.lease_ttl()).await {
            Ok(l) => {
                tracing::info!(subnet = %self.own.key, expires = ?l.expiration, "renewed lease");
                self.published = l.attrs.clone();
                self.own = l;
                Ok(Some(self.next_renewal()))
            }
            Err(StoreError::NotFound { .. }) | Err(StoreError::Conflict { .. }) => {
                tracing::warn!(subnet = %self.own.key, "our lease is gone from the store at renewal; re-acquiring");
                Ok(None)
            }
            Err(e) => {
                let d = self.retry_delay();
                tracing::warn!(error = %e, retry_in = ?d, "lease renewal failed; retrying");
                Ok(Some(Some(SystemTime::now() + d)))
            }
        }
    }

    /// [`State::reacquire`], given up on SIGTERM/SIGINT (which may come
    /// while the store is unreachable, or, in Kubernetes mode, while our Node
    /// is gone): `Ok(false)` then.
    async fn reacquire_until_signal(&mut self, signals: &mut Signals) -> Result<bool, DaemonError> {
        Ok(signals
            .during("re-acquiring our lease", self.reacquire())
            .await?
            .is_some())
    }

    /// Re-acquires a lease (preferring our previous subnet), reprograms the
    /// device address and rewrites subnet.env when the subnet changed. The
    /// datapath toward the peers is kept throughout.
    async fn reacquire(&mut self) -> Result<(), DaemonError> {
        let previous = Some(self.own.key);
        let mut delay = Duration::from_secs(1);
        let lease = loop {
            match self
                .store
                .acquire(
                    &self.s.cfg,
                    &self.attrs,
                    previous,
                    self.flags.lease_ttl(),
                    None,
                )
                .await
            {
                Ok(l) => break l,
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?delay, "re-acquiring a lease failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.retry_delay());
                }
            }
        };
        let changed = lease.key != self.own.key;
        if changed {
            tracing::warn!(old = %self.own.key, new = %lease.key, "re-acquired a DIFFERENT subnet; pods on this node must be restarted to use it");
        } else {
            tracing::info!(subnet = %lease.key, "re-acquired the same subnet");
        }
        self.published = lease.attrs.clone();
        self.own = lease.clone();
        if changed {
            // Another own lease: conflicts are settled around it.
            self.admission = Admitter::new(
                ClusterNets::from_config(&self.s.cfg),
                lease.key,
                self.attrs.clone(),
            );
        }
        let view = self.datapath_view(lease);
        self.leases.insert(view.key, view);
        if let Err(e) = self.store.complete_lease(&self.own).await {
            tracing::warn!(error = %e, "completing the lease in the store failed");
        }
        if changed {
            if let Some(r) = &self.reconciler {
                r.send(Request::Settings(Box::new(self.settings())))?;
            }
            self.write_subnet_env()?;
            if let Some(r) = &self.rules {
                r.update(crate::rules::input_from(
                    &self.flags,
                    &self.s.cfg,
                    &self.own.key,
                ));
            }
        }
        self.push_leases();
        Ok(())
    }

    /// Applies a watch message; says what happened to our own lease.
    ///
    /// A snapshot replaces the lease set and the reconciler runs a full
    /// pass; events send it only the admitted leases that changed. Lease
    /// changes are logged one line each at INFO when there are few, else as
    /// one summary line at INFO with each lease at DEBUG (a snapshot of
    /// 5,000 nodes is one line).
    fn on_watch(&mut self, ev: WatchEvent) -> OwnLease {
        let mut own_lost = false;
        let mut own_changed = false;
        match ev {
            WatchEvent::Snapshot(s) => {
                let mut new: BTreeMap<LeaseKey, Arc<Lease>> = BTreeMap::new();
                for l in s.leases {
                    if l.key == self.own.key {
                        if same_holder(&l.attrs, &self.own.attrs) {
                            own_changed = l.expiration != self.own.expiration;
                            self.own = l.clone();
                        } else {
                            own_lost = true;
                        }
                    }
                    let view = self.datapath_view(l);
                    new.insert(view.key, view);
                }
                if !new.contains_key(&self.own.key) {
                    own_lost = true;
                }
                let removed: Vec<LeaseKey> = self
                    .leases
                    .keys()
                    .filter(|k| !new.contains_key(k))
                    .copied()
                    .collect();
                let changed: Vec<&Arc<Lease>> = new
                    .values()
                    .filter(|l| self.leases.get(&l.key) != Some(l))
                    .collect();
                let verbose = removed.len() + changed.len() <= LEASE_LINES;
                for k in &removed {
                    log_lease(verbose, "lease removed (resync)", k, None);
                }
                for l in &changed {
                    log_lease(verbose, "lease added or changed (resync)", &l.key, Some(l));
                }
                if !verbose {
                    tracing::info!(
                        leases = new.len(),
                        added_or_changed = changed.len(),
                        removed = removed.len(),
                        "lease snapshot"
                    );
                }
                self.leases = new;
                self.push_leases();
            }
            WatchEvent::Events { events, .. } => {
                let verbose = events.len() <= LEASE_LINES;
                let mut changed: BTreeSet<LeaseKey> = BTreeSet::new();
                let (mut upserted, mut removed) = (0usize, 0usize);
                for e in events {
                    match e {
                        LeaseEvent::Upsert(l) => {
                            if l.key == self.own.key {
                                if !same_holder(&l.attrs, &self.own.attrs) {
                                    tracing::warn!(subnet = %l.key, holder = ?l.attrs.public_ip, holder_v6 = ?l.attrs.public_ipv6, "our subnet now belongs to another node");
                                    own_lost = true;
                                } else {
                                    own_changed |= l.expiration != self.own.expiration;
                                    self.own = l.clone();
                                }
                            }
                            let view = self.datapath_view(l);
                            if self.leases.get(&view.key) == Some(&view) {
                                continue;
                            }
                            if view.key != self.own.key {
                                log_lease(
                                    verbose,
                                    "peer lease added or changed",
                                    &view.key,
                                    Some(&view),
                                );
                            }
                            upserted += 1;
                            changed.insert(view.key);
                            self.leases.insert(view.key, view);
                        }
                        LeaseEvent::Removed(k) => {
                            if k == self.own.key {
                                own_lost = true;
                            } else if self.leases.contains_key(&k) {
                                log_lease(verbose, "peer lease removed", &k, None);
                            }
                            if self.leases.remove(&k).is_some() {
                                removed += 1;
                                changed.insert(k);
                            }
                        }
                    }
                }
                if !verbose {
                    tracing::info!(
                        added_or_changed = upserted,
                        removed,
                        leases = self.leases.len(),
                        "lease events"
                    );
                }
                self.push_changes(changed.into_iter().collect());
            }
        }
        if own_lost {
            OwnLease::Lost
        } else if self.own.attrs != self.published {
            OwnLease::Drifted
        } else if own_changed {
            OwnLease::Renewed
        } else {
            OwnLease::Unchanged
        }
    }
}

/// Up to this many lease changes in one watch message are logged one line
/// each at INFO; more give one summary line.
const LEASE_LINES: usize = 8;

/// One lease change, at INFO or (in a large batch) DEBUG.
fn log_lease(info: bool, what: &str, key: &LeaseKey, lease: Option<&Lease>) {
    let ip = lease.and_then(|l| l.attrs.public_ip);
    if info {
        tracing::info!(subnet = %key, public_ip = ?ip, "{what}");
    } else {
        tracing::debug!(subnet = %key, public_ip = ?ip, "{what}");
    }
}

/// What a watch message did to our own lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnLease {
    Unchanged,
    /// Its expiry moved (a renewal seen through the watch).
    Renewed,
    /// Gone, or taken by another node: re-acquire.
    Lost,
    /// Still ours, but with other attributes than we published (someone
    /// edited it): publish ours again.
    Drifted,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use flannel_store::kube::NodeIdentity;

    fn flags(args: &[&str]) -> Flags {
        let mut v = vec!["flanneld"];
        v.extend_from_slice(args);
        Flags::try_parse_from(v).unwrap()
    }

    #[test]
    fn store_selection() {
        assert_eq!(
            store_kind(&flags(&["--local-store", "/var/lib/x"])).unwrap(),
            StoreKind::Local("/var/lib/x".into())
        );
        match store_kind(&flags(&[
            "--etcd-endpoints",
            "http://10.0.0.1:2379, http://10.0.0.2:2379",
            "--etcd-prefix",
            "/p",
            "--etcd-username",
            "u",
        ]))
        .unwrap()
        {
            StoreKind::Etcd(o) => {
                assert_eq!(
                    o.endpoints,
                    vec!["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
                );
                assert_eq!(o.prefix, "/p");
                assert_eq!(o.username.as_deref(), Some("u"));
            }
            other => panic!("{other:?}"),
        }
        let e = store_kind(&flags(&["--kube-subnet-mgr", "--local-store", "/x"])).unwrap_err();
        assert!(e.to_string().contains("--kube-subnet-mgr"), "{e}");
    }

    #[test]
    fn kube_store_selection() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let f = flags(&[
            "--kube-subnet-mgr",
            "--kubeconfig-file",
            "/etc/k.conf",
            "--kube-annotation-prefix",
            "example.com/x",
            "--set-node-network-unavailable=false",
        ]);
        match store_kind_with(&f, env(&[("NODE_NAME", "n1"), ("POD_NAME", "p")])).unwrap() {
            StoreKind::Kube(o) => {
                assert_eq!(o.node, NodeIdentity::Name("n1".into()));
                assert_eq!(o.kubeconfig, Some(PathBuf::from("/etc/k.conf")));
                assert_eq!(o.api_url, None);
                assert_eq!(o.annotation_prefix, "example.com/x");
                assert!(!o.set_node_network_unavailable);
            }
            other => panic!("{other:?}"),
        }
        // The DaemonSet's way: the pod's name and namespace.
        match store_kind_with(
            &flags(&["--kube-subnet-mgr"]),
            env(&[
                ("POD_NAME", "kube-flannel-ds-x"),
                ("POD_NAMESPACE", "kube-flannel"),
            ]),
        )
        .unwrap()
        {
            StoreKind::Kube(o) => assert_eq!(
                o.node,
                NodeIdentity::Pod {
                    namespace: "kube-flannel".into(),
                    name: "kube-flannel-ds-x".into()
                }
            ),
            other => panic!("{other:?}"),
        }
        let e = store_kind_with(&flags(&["--kube-subnet-mgr"]), env(&[("POD_NAME", "p")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("POD_NAME and POD_NAMESPACE must be set"), "{e}");
        // The manifest's two upstream knobs are checked before the store starts.
        let e = store_kind_with(
            &flags(&["--kube-subnet-mgr"]),
            env(&[("NODE_NAME", "n1"), ("EVENT_QUEUE_DEPTH", "many")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("EVENT_QUEUE_DEPTH=\"many\""), "{e}");
    }

    #[test]
    fn unsupported_configs_are_refused_with_the_field() {
        let b = check_supported(
            &config::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#).unwrap(),
        )
        .unwrap();
        assert_eq!(b, Backend::HostGw);
        let b = check_supported(
            &config::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp","Port":9000}}"#)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            b,
            Backend::Udp(UdpConfig {
                port: 9000,
                mtu: None
            })
        );
        // udp is IPv4 only, as upstream's.
        for cfg in [
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"udp"}}"#,
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"udp"}}"#,
        ] {
            let e = check_supported(&config::parse(cfg).unwrap())
                .unwrap_err()
                .to_string();
            assert!(e.contains("udp") && e.contains("EnableIPv6"), "{e}");
        }
        // IPv6 alone and dual stack are supported, with vxlan and host-gw.
        for cfg in [
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56"}"#,
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56"}"#,
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"host-gw"}}"#,
        ] {
            check_supported(&config::parse(cfg).unwrap()).unwrap();
        }
        // wireguard: every family, every Mode.
        for cfg in [
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#,
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"wireguard"}}"#,
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"wireguard","Mode":"auto"}}"#,
        ] {
            assert!(matches!(
                check_supported(&config::parse(cfg).unwrap()).unwrap(),
                Backend::Wireguard(_)
            ));
        }
        let b = check_supported(&config::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap()).unwrap();
        assert_eq!(
            b,
            Backend::Vxlan(VxlanConfig::default()),
            "no Backend means vxlan"
        );
    }

    #[test]
    fn mtu_per_backend_and_underlay_family() {
        let mtu = |cfg: &str| {
            let c = config::parse(cfg).unwrap();
            let dev = |f| device_mtu(&c, 1500, f);
            (pod_mtu(&c, 1500), dev(IpFamily::V4), dev(IpFamily::V6))
        };
        // vxlan: 50 bytes over IPv4, 70 over IPv6 (an IPv6-only node's
        // underlay is IPv6; dual-stack pods must fit flannel-v6 too).
        assert_eq!(mtu(r#"{"Network":"10.244.0.0/16"}"#).0, 1450);
        assert_eq!(
            mtu(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56"}"#).0,
            1430
        );
        assert_eq!(
            mtu(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56"}"#),
            (1430, 1450, 1430)
        );
        // The backend's MTU option wins everywhere.
        assert_eq!(
            mtu(
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"vxlan","MTU":1300}}"#
            ),
            (1300, 1300, 1300)
        );
        // wireguard: 80 bytes in both families, as upstream; its MTU is the underlay's.
        assert_eq!(
            mtu(
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"wireguard"}}"#
            ),
            (1420, 1420, 1420)
        );
        assert_eq!(
            mtu(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","MTU":1400}}"#).0,
            1320
        );
        // host-gw: no overhead in either family.
        assert_eq!(
            mtu(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"host-gw"}}"#).0,
            1500
        );
    }

    #[test]
    fn config_file_first_then_the_store_copy() {
        let dir = std::env::temp_dir().join(format!("flanneld-cfg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("net-conf.json");
        let f = flags(&["--net-config-path", path.to_str().unwrap()]);
        // Missing file, no store copy: the error names the path and the flag.
        let e = load_config(&f, None).unwrap_err().to_string();
        assert!(
            e.contains("net-conf.json") && e.contains("--net-config-path"),
            "{e}"
        );
        // Missing file, the store ships one.
        let c = load_config(&f, Some(r#"{"Network":"10.5.0.0/16"}"#.into())).unwrap();
        assert_eq!(c.network, Some("10.5.0.0/16".parse().unwrap()));
        // The file wins; its errors name the field.
        std::fs::write(&path, r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#).unwrap();
        let e = load_config(&f, Some(r#"{"Network":"10.5.0.0/16"}"#.into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SubnetLen") && e.contains("net-conf.json"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
