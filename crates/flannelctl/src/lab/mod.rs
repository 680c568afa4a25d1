//! `flannelctl lab`: the seed's cluster (packet-walk.txt) rebuilt in network
//! namespaces of this machine, with the real `flanneld` and `flannel` binaries.
//!
//! Topology of a lab called NAME with N workers:
//!
//! ```text
//!   NAME-underlay      bridge br0, 172.16.1.1/24 (the nodes' default gateway)
//!     ├─ p-master  <veth>  ens3 in NAME-master      172.16.1.8    10.244.0.0/24
//!     ├─ p-node1   <veth>  ens3 in NAME-k8s-node1   172.16.1.14   10.244.1.0/24  pod ubuntu-1 (NAME-ubuntu-1)
//!     ├─ p-node2   <veth>  ens3 in NAME-k8s-node2   172.16.1.13   10.244.2.0/24  pod ubuntu-2 (NAME-ubuntu-2)
//!     └─ p-nodeI   <veth>  ens3 in NAME-k8s-nodeI   172.16.1.(20+I) for I >= 3    10.244.I.0/24
//! ```
//!
//! Master, node1 and node2 keep the seed's addresses; further workers get
//! 172.16.1.(20+I), which never collides with the seed's (.1 gateway, .8, .13,
//! .14) for I in 3..=200. Subnets are pinned by reservations (leases without
//! expiry whose PublicIP is the node's underlay address) written into the
//! lab's local store before any daemon starts.
//!
//! Everything lives below `/run/flannel-lab/NAME` (the "labdir"): the store,
//! net-conf.json, one directory per node with `subnet.env`, `flanneld.log`,
//! `flanneld.pid` and the CNI state, and `lab.json` (what `up` built, read by
//! `status`, `exec` and `down`). The root namespace is never touched.

// Verbs: one `lab` command (or `Lab` method family) each.
mod add_node; // Lab::add_node: a new worker and its pod join the running lab
pub mod bench; // `flannelctl bench`: throughput and latency of each backend
pub mod chaos; // `lab chaos`: the fault plan, the loss each fault may cost, the verdict (pure)
mod chaos_run; // Lab::chaos: the plan applied to a running lab under the prober
mod check; // Lab::check: the connectivity matrix and its expected TTLs
mod down; // `lab down`: stops the daemons and removes everything of a lab
mod exec; // `lab exec`: a command inside one of the lab's namespaces
mod masq; // Lab::check_masq: the source address masqueraded packets carry
mod remove_node; // Lab::remove_node: a worker and its pods leave the running lab
pub mod scale; // `flannelctl bench scale`: control-plane cost at N leases, ours and upstream
mod status; // `lab status`: nodes, daemons, leases and pods
mod switch_backend; // Lab::switch_backend: every daemon restarted on another backend
mod up; // `lab up`: plans, builds and starts a lab

// Nouns: the parts the verbs are made of.
mod daemons; // the flanneld of each node: arguments, start, stop, readiness
mod etcd; // the etcd server of `--store etcd`, inside the master's namespace
mod interrupt; // Ctrl-C / SIGTERM / SIGHUP turned into LabError::Interrupted
mod kinds; // the lab's choices (backend, families, topology) and address plan
pub mod kube; // the Kubernetes API of `--store kube`: kube-apiserver, certificates, Nodes
mod ping; // ICMP echo from a raw socket inside a namespace
mod pods; // the pods: the flannel CNI plugin invoked as a runtime does
pub mod probe; // the chaos soak's prober: every pod pings every pod each 100 ms
mod procs; // the lab's processes: binaries, spawning, stopping by checked pid
mod store; // the lease store (local dir, etcd or Kubernetes): the one place StoreKind is dispatched
pub mod tables; // what flannel holds in a node's kernel, and what it must hold
mod topology; // the underlay: switches, router, outside host, node veths

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flannel_core::lease::LeaseKey;
use flannel_netlink::netns::{NetNs, NetNsError};
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

pub use chaos::{ChaosReport, Fault};
pub use chaos_run::ChaosOptions;
pub use check::{Matrix, Outcome, Target, TargetKind};
pub use down::down;
pub use etcd::{
    client_url as etcd_client_url, etcd_binary, ETCD_BINARY, ETCD_BINARY_ENV, ETCD_CLIENT_PORT,
    ETCD_PEER_PORT,
};
pub use exec::exec;
pub(crate) use interrupt::check_interrupted;
pub use interrupt::{interrupted, InterruptGuard};
pub use kinds::{
    gateway_of, gateway_v6_of, net_conf, node_subnet_v6, segment_net, segment_net_v6, segment_of,
    underlay_ip_on, underlay_ipv6_on, Backend, Family, Topology, CLUSTER_NETWORK_V6, HEALTHZ_PORT,
    OUTSIDE_GATEWAY, OUTSIDE_GATEWAY_V6, OUTSIDE_IP, OUTSIDE_IPV6,
};
pub use masq::{MasqObservation, MasqReport};
pub use ping::{EchoReply, IcmpFamily, Pinger};
pub use procs::{lab_processes, resolve_bin_dir, BIN_DIR_ENV, CNI_BINARY, FLANNELD_BINARY};
pub use status::{DaemonStatus, LabStatus};

/// Where every lab keeps its files: `/run/flannel-lab/<name>`.
pub const LAB_ROOT: &str = "/run/flannel-lab";
/// Default lab name.
pub const DEFAULT_NAME: &str = "lab";
/// Default number of workers.
pub const DEFAULT_NODES: u32 = 2;
/// Default underlay MTU (flannel's MTU is 50 less).
pub const DEFAULT_MTU: u32 = 1500;
/// Most workers a lab may have (keeps underlay addresses and /24 subnets unique).
pub const MAX_NODES: u32 = 200;
/// The cluster network of the seed.
pub const CLUSTER_NETWORK: &str = "10.244.0.0/16";
/// The vxlan VNI of the seed (device `flannel.1`).
pub const VNI: u32 = 1;
/// The underlay's gateway, held by the switch namespace.
pub const UNDERLAY_GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 16, 1, 1);
/// Prefix length of the underlay (172.16.1.0/24).
pub const UNDERLAY_PREFIX: u8 = 24;
/// The node's underlay interface, named as in the seed.
pub const NODE_IFACE: &str = "ens3";
/// The CNI network name of upstream's manifest.
pub const CNI_NETWORK_NAME: &str = "cbr0";

/// Errors of the lab, each saying what was being done and, where there is
/// one, how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("flannelctl lab needs root: it creates network namespaces (run it with sudo)")]
    NeedsRoot,
    #[error("invalid lab name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("invalid option {option}: {reason}")]
    InvalidOption {
        option: &'static str,
        reason: String,
    },
    #[error("lab {name:?} already exists ({what}); remove it first with `flannelctl lab down --name {name}`")]
    Exists { name: String, what: String },
    #[error("lab {name:?} does not exist ({path} is missing); create it with `flannelctl lab up --name {name}`")]
    NotFound { name: String, path: String },
    #[error("{binary} not found at {path}: build them with `cargo build --workspace --bins`, or point --bin-dir / {env} at the directory holding flanneld and flannel", env = BIN_DIR_ENV)]
    BinaryMissing { binary: &'static str, path: String },
    #[error("{context}: {source}")]
    NetNs {
        context: String,
        #[source]
        source: NetNsError,
    },
    #[error("{context}: {source}")]
    Kernel {
        context: String,
        #[source]
        source: flannel_netlink::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lab store {path}: {source}")]
    Store {
        path: String,
        #[source]
        source: flannel_store::StoreError,
    },
    #[error("etcd not found ({path}): the lab's --store etcd runs the etcd server; install it with `apt-get install etcd-server` (or point {env} at the binary)", env = etcd::ETCD_BINARY_ENV)]
    EtcdMissing { path: String },
    #[error("lab etcd at {endpoint}: {detail}")]
    Etcd { endpoint: String, detail: String },
    #[error("the lab's etcd (pid {pid}) is not running; last lines of {log}:\n{tail}")]
    EtcdDied { pid: u32, log: String, tail: String },
    #[error("no kube-apiserver to run: {looked}. `lab up --store kube` runs a real kube-apiserver: set {env}=/path/to/kube-apiserver, put it in PATH, or give --kube-apiserver PATH", env = kube::KUBE_APISERVER_ENV)]
    KubeApiserverMissing { looked: String },
    #[error("the lab's API server (pid {pid}) is not running; last lines of {log}:\n{tail}")]
    KubeApiserverDied { pid: u32, log: String, tail: String },
    #[error("lab Kubernetes API: {detail}")]
    Kube { detail: String },
    #[error("timed out after {secs:.1}s waiting for {what}")]
    Timeout { what: String, secs: f64 },
    #[error("interrupted (Ctrl-C, SIGTERM or SIGHUP)")]
    Interrupted,
    #[error("flanneld on {node} is not running (pid {pid}); last lines of {log}:\n{tail}")]
    DaemonDied {
        node: String,
        pid: u32,
        log: String,
        tail: String,
    },
    #[error("flanneld on {node} took subnet {got} instead of its reservation {want}; see {log}")]
    WrongSubnet {
        node: String,
        got: String,
        want: String,
        log: String,
    },
    #[error("CNI {command} of pod {pod} on {node} failed: {detail}")]
    Cni {
        command: &'static str,
        pod: String,
        node: String,
        detail: String,
    },
    #[error("unknown lab target {target:?}: expected one of {known}")]
    UnknownTarget { target: String, known: String },
    #[error("{path}: {detail}")]
    BadState { path: String, detail: String },
    #[error("connectivity check failed: {failed} of {total} pairs did not answer as expected")]
    Connectivity { failed: usize, total: usize },
    #[error("lab down {name:?} finished with errors:\n  {}", errors.join("\n  "))]
    Teardown { name: String, errors: Vec<String> },
}

pub type Result<T, E = LabError> = std::result::Result<T, E>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let context = context.into();
    move |source| LabError::Io { context, source }
}

/// A removal whose target is already gone has done its job: teardown and
/// re-runs after an interrupted verb must not fail on it.
pub(crate) fn absent_ok(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

pub(crate) fn ns_err(context: impl Into<String>) -> impl FnOnce(NetNsError) -> LabError {
    let context = context.into();
    move |source| LabError::NetNs { context, source }
}

pub(crate) fn nl_err(
    context: impl Into<String>,
) -> impl FnOnce(flannel_netlink::Error) -> LabError {
    let context = context.into();
    move |source| LabError::Kernel { context, source }
}

/// Which store the lab's daemons share.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// A local directory (`flanneld --local-store LABDIR/store`).
    #[default]
    Local,
    /// A real etcd server in the master's namespace (`flanneld
    /// --etcd-endpoints http://172.16.1.8:2379`).
    Etcd,
    /// The Kubernetes API: etcd and a kube-apiserver in the master's
    /// namespace, one Node per node with its podCIDR (`flanneld
    /// --kube-subnet-mgr --kubeconfig-file ...`).
    Kube,
}

impl std::str::FromStr for StoreKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "local" => Ok(StoreKind::Local),
            "etcd" => Ok(StoreKind::Etcd),
            "kube" => Ok(StoreKind::Kube),
            other => Err(format!(
                "unknown store {other:?}: use `local`, `etcd` or `kube`"
            )),
        }
    }
}

impl std::fmt::Display for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreKind::Local => "local",
            StoreKind::Etcd => "etcd",
            StoreKind::Kube => "kube",
        })
    }
}

fn yes() -> bool {
    true
}

/// What `flannelctl lab up` builds.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Lab name: `[A-Za-z0-9_]`, 1..=24 characters; prefixes every namespace.
    pub name: String,
    /// Number of workers (`k8s-node1`..`k8s-nodeN`), besides the master.
    pub nodes: u32,
    /// Underlay MTU; pods get MTU - 50 (vxlan over IPv4).
    pub mtu: u32,
    /// Directory holding `flanneld` and `flannel`; see [`resolve_bin_dir`].
    pub bin_dir: Option<PathBuf>,
    /// Leave a half-built lab in place when `up` fails, for inspection.
    pub keep_on_failure: bool,
    /// How long to wait for the daemons to come up.
    pub ready_timeout: Duration,
    /// Print each step of `up` on stderr.
    pub progress: bool,
    /// The store the daemons share.
    pub store: StoreKind,
    /// With `--store kube`: the kube-apiserver binary to run (default:
    /// `$KUBE_APISERVER`, else `kube-apiserver` in `PATH`).
    pub kube_apiserver: Option<PathBuf>,
    /// `flanneld --lease-ttl` in seconds (None: flanneld's default, 24 h).
    pub lease_ttl: Option<u64>,
    /// Pin each node's subnet with a reservation (a lease that never
    /// expires). Without, each node's subnet.env is seeded with its planned
    /// subnet, which flanneld requests as its previous subnet: the subnets
    /// stay deterministic while the leases are ordinary ones that expire
    /// when their node stops renewing them.
    pub reservations: bool,
    /// The backend of every daemon.
    pub backend: Backend,
    /// vxlan `DirectRouting` (vxlan only).
    pub direct_routing: bool,
    /// Address families of the cluster and the underlay.
    pub family: Family,
    /// `flanneld --ip-masq` (on by default, as kube-flannel.yml runs
    /// flanneld: flanneld masquerades traffic leaving the cluster and writes
    /// FLANNEL_IPMASQ=true, so the pods' bridge config has "ipMasq":false, as
    /// in the packet walk's saved config; with ipMasq the bridge would
    /// masquerade pod-to-pod traffic too). Also builds the `outside` host
    /// the masquerade probes talk to.
    pub ip_masq: bool,
    /// One switch, or two segments joined by a router.
    pub topology: Topology,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            name: DEFAULT_NAME.to_string(),
            nodes: DEFAULT_NODES,
            mtu: DEFAULT_MTU,
            bin_dir: None,
            keep_on_failure: false,
            ready_timeout: Duration::from_secs(30),
            progress: false,
            store: StoreKind::Local,
            kube_apiserver: None,
            lease_ttl: None,
            reservations: true,
            backend: Backend::Vxlan,
            direct_routing: false,
            family: Family::V4,
            ip_masq: true,
            topology: Topology::Flat,
        }
    }
}

fn segment_one() -> u8 {
    1
}

/// A node of the lab, as recorded in `lab.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// `master` or `k8s-node<i>`.
    pub name: String,
    /// 0 for the master, i for `k8s-node<i>`.
    pub index: u32,
    /// Network namespace (`<lab>-<node>`).
    pub netns: String,
    /// IPv4 address of `ens3`.
    pub underlay_ip: Ipv4Addr,
    /// The planned IPv4 pod subnet (10.244.<index>.0/24); not leased in an
    /// IPv6-only lab.
    pub subnet: Ipv4Net,
    /// The underlay segment (1, or 2 in the two-segment topology).
    #[serde(default = "segment_one")]
    pub segment: u8,
    /// IPv6 address of `ens3` (IPv6 and dual-stack labs).
    #[serde(default)]
    pub underlay_ipv6: Option<Ipv6Addr>,
    /// The planned IPv6 pod subnet (fd00:10:244:<index>::/64), IPv6 and dual-stack labs.
    #[serde(default)]
    pub subnet_v6: Option<Ipv6Net>,
}

impl NodeState {
    /// The segment's IPv4 gateway (the router, or the switch in the flat topology).
    pub fn gateway(&self) -> Ipv4Addr {
        gateway_of(self.segment)
    }
}

/// A pod of the lab, as recorded in `lab.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodState {
    /// `ubuntu-<i>`.
    pub name: String,
    /// The node it runs on.
    pub node: String,
    /// Network namespace (`<lab>-ubuntu-<i>`).
    pub netns: String,
    /// CNI_CONTAINERID used for ADD and DEL.
    pub container_id: String,
    /// `eth0`'s address as the CNI result reported it (None until ADD succeeded).
    pub ip: Option<Ipv4Net>,
    /// The gateway from the CNI result (the node's cni0 address).
    pub gateway: Option<Ipv4Addr>,
    /// `eth0`'s IPv6 address (IPv6 and dual-stack labs).
    #[serde(default)]
    pub ipv6: Option<Ipv6Net>,
}

impl PodState {
    /// The pod's addresses, IPv4 first.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.ip.iter().map(|n| IpAddr::V4(n.addr())).collect();
        v.extend(self.ipv6.iter().map(|n| IpAddr::V6(n.addr())));
        v
    }
}

/// Everything `up` built, saved as `<labdir>/lab.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub mtu: u32,
    pub bin_dir: PathBuf,
    pub underlay_netns: String,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
    /// The store the daemons share (absent in labs of older versions: local).
    #[serde(default)]
    pub store: StoreKind,
    /// With `--store kube`: the kube-apiserver binary the lab runs.
    #[serde(default)]
    pub kube_apiserver: Option<PathBuf>,
    /// `--lease-ttl` of the daemons, if not flanneld's default.
    #[serde(default)]
    pub lease_ttl: Option<u64>,
    /// Whether nodes get reservations (see [`LabOptions::reservations`]).
    #[serde(default = "yes")]
    pub reservations: bool,
    /// The backend (absent in labs of older versions: vxlan).
    #[serde(default)]
    pub backend: Backend,
    #[serde(default)]
    pub direct_routing: bool,
    #[serde(default)]
    pub family: Family,
    /// Labs of older versions ran flanneld with --ip-masq, without an outside host.
    #[serde(default)]
    pub ip_masq: bool,
    #[serde(default)]
    pub topology: Topology,
}

/// Checks a lab name: it prefixes namespace names, so it is kept to
/// `[A-Za-z0-9_]` (no `-`, which separates the name from the node part and
/// keeps `down` from matching another lab's namespaces).
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |reason: &str| LabError::InvalidName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() || name.len() > 24 {
        return Err(bad("it must have 1 to 24 characters"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(bad(
            "use only letters, digits and '_' (it prefixes namespace names like NAME-master)",
        ));
    }
    Ok(())
}

/// `/run/flannel-lab/<name>`.
pub fn lab_dir(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

/// Node name for an index: 0 is `master`, i is `k8s-node<i>`.
pub fn node_name(index: u32) -> String {
    if index == 0 {
        "master".to_string()
    } else {
        format!("k8s-node{index}")
    }
}

/// Underlay address of a node: the seed's for master (.8), node1 (.14) and
/// node2 (.13); 172.16.1.(20+i) for k8s-node<i>, i >= 3.
pub fn underlay_ip(index: u32) -> Ipv4Addr {
    let last = match index {
        0 => 8,
        1 => 14,
        2 => 13,
        i => 20 + i,
    };
    assert!(last < 255, "node index {index} out of range");
    Ipv4Addr::new(172, 16, 1, last as u8)
}

/// Pod subnet reserved for a node: 10.244.<index>.0/24.
pub fn node_subnet(index: u32) -> Ipv4Net {
    assert!(index < 256, "node index {index} out of range");
    Ipv4Net::new(Ipv4Addr::new(10, 244, index as u8, 0), 24).expect("/24 is valid")
}

/// The cluster network as a value.
pub fn cluster_network() -> Ipv4Net {
    CLUSTER_NETWORK.parse().expect("constant is a valid CIDR")
}

/// The seed's net-conf.json (vxlan, IPv4); a lab's own is [`LabState::net_conf_json`].
pub fn net_conf_json() -> String {
    net_conf(Backend::Vxlan, false, Family::V4).to_string()
}

/// The plan of one node: name, namespace, segment, addresses, subnets.
pub fn plan_node(lab: &str, index: u32, topology: Topology, family: Family) -> NodeState {
    let segment = segment_of(index, topology);
    NodeState {
        name: node_name(index),
        index,
        netns: format!("{lab}-{}", node_name(index)),
        underlay_ip: underlay_ip_on(index, segment),
        subnet: node_subnet(index),
        segment,
        underlay_ipv6: family.has_v6().then(|| underlay_ipv6_on(index, segment)),
        subnet_v6: family.has_v6().then(|| node_subnet_v6(index)),
    }
}

fn plan_pod(lab: &str, index: u32) -> PodState {
    PodState {
        name: format!("ubuntu-{index}"),
        node: node_name(index),
        netns: format!("{lab}-ubuntu-{index}"),
        container_id: format!("flannel-lab-{lab}-ubuntu-{index}"),
        ip: None,
        gateway: None,
        ipv6: None,
    }
}

impl LabState {
    /// The plan for a lab: nodes, addresses, subnets and pods (nothing built yet).
    pub fn plan(name: &str, workers: u32, mtu: u32, bin_dir: PathBuf) -> LabState {
        Self::plan_with(name, workers, mtu, bin_dir, Topology::Flat, Family::V4)
    }

    /// The plan for a lab of a topology and address families.
    pub fn plan_with(
        name: &str,
        workers: u32,
        mtu: u32,
        bin_dir: PathBuf,
        topology: Topology,
        family: Family,
    ) -> LabState {
        let nodes: Vec<NodeState> = (0..=workers)
            .map(|i| plan_node(name, i, topology, family))
            .collect();
        let pods = (1..=workers).map(|i| plan_pod(name, i)).collect();
        LabState {
            name: name.to_string(),
            mtu,
            bin_dir,
            underlay_netns: format!("{name}-underlay"),
            nodes,
            pods,
            store: StoreKind::Local,
            kube_apiserver: None,
            lease_ttl: None,
            reservations: true,
            backend: Backend::Vxlan,
            direct_routing: false,
            family,
            ip_masq: false,
            topology,
        }
    }

    /// The net-conf.json every daemon of this lab reads.
    pub fn net_conf_json(&self) -> String {
        net_conf(self.backend, self.direct_routing, self.family).to_string()
    }

    /// [`LabState::net_conf_json`], parsed.
    pub fn net_config(&self) -> flannel_core::config::NetConfig {
        flannel_core::config::parse(&self.net_conf_json()).expect("the lab's net-conf parses")
    }

    /// The pod MTU flanneld writes: the underlay MTU minus the backend's
    /// overhead (vxlan 50, or 70 when IPv6 is on: the pods' one MTU must
    /// also fit the vxlan device over the IPv6 underlay).
    pub fn pod_mtu(&self) -> u32 {
        self.net_config().pod_mtu(self.mtu, self.family.has_v6())
    }

    /// The lease key a node holds: its subnet of each family of the lab.
    pub fn lease_key(&self, n: &NodeState) -> LeaseKey {
        LeaseKey {
            ipv4: self.family.has_v4().then_some(n.subnet),
            ipv6: if self.family.has_v6() {
                n.subnet_v6
            } else {
                None
            },
        }
    }

    /// Namespace of the second switch (two-segment topology).
    pub fn underlay2_netns(&self) -> String {
        format!("{}-underlay2", self.name)
    }

    /// Namespace of the router between the segments (two-segment topology).
    pub fn router_netns(&self) -> String {
        format!("{}-router", self.name)
    }

    /// Namespace of the outside host (`--ip-masq`).
    pub fn outside_netns(&self) -> String {
        format!("{}-outside", self.name)
    }

    /// The namespace that routes the nodes' traffic beyond their segment:
    /// the router in two segments, the switch in the flat topology.
    pub fn gateway_netns(&self) -> String {
        match self.topology {
            Topology::Flat => self.underlay_netns.clone(),
            Topology::TwoSegment => self.router_netns(),
        }
    }

    fn path(name: &str) -> PathBuf {
        lab_dir(name).join("lab.json")
    }

    /// Reads `<labdir>/lab.json`.
    pub fn load(name: &str) -> Result<LabState> {
        let path = Self::path(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LabError::NotFound {
                    name: name.to_string(),
                    path: path.display().to_string(),
                })
            }
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        };
        serde_json::from_str(&text).map_err(|e| LabError::BadState {
            path: path.display().to_string(),
            detail: e.to_string(),
        })
    }

    /// Writes `<labdir>/lab.json` atomically (temp file + rename).
    pub fn save(&self) -> Result<()> {
        let path = Self::path(&self.name);
        let text = serde_json::to_string_pretty(self).expect("state serialises");
        write_atomic(&path, text.as_bytes())
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> Option<&PodState> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// Namespace of a target: a node name, a pod name, or `underlay`.
    pub fn netns_of(&self, target: &str) -> Result<String> {
        if target == "underlay" {
            return Ok(self.underlay_netns.clone());
        }
        if self.topology == Topology::TwoSegment && target == "underlay2" {
            return Ok(self.underlay2_netns());
        }
        if self.topology == Topology::TwoSegment && target == "router" {
            return Ok(self.router_netns());
        }
        if self.ip_masq && target == "outside" {
            return Ok(self.outside_netns());
        }
        if let Some(n) = self.node(target) {
            return Ok(n.netns.clone());
        }
        if let Some(p) = self.pod(target) {
            return Ok(p.netns.clone());
        }
        let mut known: Vec<&str> = vec!["underlay"];
        if self.topology == Topology::TwoSegment {
            known.extend(["underlay2", "router"]);
        }
        if self.ip_masq {
            known.push("outside");
        }
        known.extend(self.nodes.iter().map(|n| n.name.as_str()));
        known.extend(self.pods.iter().map(|p| p.name.as_str()));
        Err(LabError::UnknownTarget {
            target: target.to_string(),
            known: known.join(", "),
        })
    }
}

pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).map_err(io_err(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io_err(format!("renaming to {}", path.display())))
}

pub(crate) fn require_root() -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(LabError::NeedsRoot)
    }
}

/// Names of the namespaces in /run/netns (`ip netns list`) that belong to lab `name`
/// (`NAME-underlay`, `NAME-master`, `NAME-k8s-node<i>`, `NAME-ubuntu-<i>`),
/// whether or not `lab.json` knows them (a half-failed `up` may not have
/// recorded everything).
pub fn lab_namespaces(name: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let prefix = format!("{name}-");
    let mut out: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            let Some(rest) = n.strip_prefix(&prefix) else {
                return false;
            };
            let numbered = |p: &str| {
                rest.strip_prefix(p)
                    .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()))
            };
            matches!(
                rest,
                "underlay" | "underlay2" | "router" | "outside" | "master"
            ) || numbered("k8s-node")
                || numbered("ubuntu-")
        })
        .collect();
    out.sort();
    out
}

/// A running (or half-running) lab. Its paths and lookups are here; the
/// rest of its methods live with their verb (`up`, `add_node`,
/// `switch_backend`, `check`, `check_masq`, `status`) or noun (`daemons`,
/// `store`, `pods`).
#[derive(Debug, Clone)]
pub struct Lab {
    pub state: LabState,
}

impl Lab {
    /// Opens an existing lab from its `lab.json`.
    pub fn open(name: &str) -> Result<Lab> {
        validate_name(name)?;
        Ok(Lab {
            state: LabState::load(name)?,
        })
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// `/run/flannel-lab/<name>`.
    pub fn dir(&self) -> PathBuf {
        lab_dir(&self.state.name)
    }

    /// `--net-config-path` of every daemon.
    pub fn net_conf_path(&self) -> PathBuf {
        self.dir().join("net-conf.json")
    }

    /// A node's directory (subnet.env, flanneld.log, flanneld.pid, CNI state).
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.dir().join(node)
    }

    /// `--subnet-file` of a node's daemon.
    pub fn subnet_file(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("subnet.env")
    }

    /// The node called `name`, or an error listing the nodes.
    pub fn node(&self, name: &str) -> Result<&NodeState> {
        self.state
            .node(name)
            .ok_or_else(|| LabError::UnknownTarget {
                target: name.to_string(),
                known: self
                    .state
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The pod called `name`, or an error listing the pods.
    pub fn pod(&self, name: &str) -> Result<&PodState> {
        self.state.pod(name).ok_or_else(|| LabError::UnknownTarget {
            target: name.to_string(),
            known: self
                .state
                .pods
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Opens the namespace of a node, a pod, or `underlay` (`/run/netns/<lab>-<target>`,
    /// what `ip netns exec <lab>-<target>` enters).
    pub fn netns(&self, target: &str) -> Result<NetNs> {
        let ns = self.state.netns_of(target)?;
        NetNs::open(&ns).map_err(ns_err(format!("opening namespace of {target}")))
    }

    /// The switch namespace a node is plugged into.
    pub fn switch_netns(&self, n: &NodeState) -> String {
        if n.segment == 2 {
            self.state.underlay2_netns()
        } else {
            self.state.underlay_netns.clone()
        }
    }

    /// Reads `lab.json` again (after another handle changed the lab).
    pub fn reload(&mut self) -> Result<()> {
        self.state = LabState::load(&self.state.name)?;
        Ok(())
    }
}

/// Polls `f` every 100 ms until it returns `Ok(true)`, an error, or the
/// deadline passes; an interrupt ([`InterruptGuard`]) ends it too.
pub(crate) fn poll_until(
    deadline: Instant,
    what: &str,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if f()? {
            return Ok(());
        }
        check_interrupted()?;
        if Instant::now() >= deadline {
            return Err(LabError::Timeout {
                what: what.to_string(),
                secs: start.elapsed().as_secs_f64(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The address that represents a node in the overlay: its `cni0` gateway
/// (first address of its subnet) when it has pods, else its `flannel.1`
/// address (the subnet's network address), as the master in the lab has no
/// pod and hence no cni0.
pub fn overlay_address(state: &LabState, node: &NodeState) -> Ipv4Addr {
    if state.pods.iter().any(|p| p.node == node.name) {
        first_host(node.subnet)
    } else {
        node.subnet.network()
    }
}

fn first_host(net: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_addresses_and_subnets() {
        assert_eq!(underlay_ip(0), Ipv4Addr::new(172, 16, 1, 8));
        assert_eq!(underlay_ip(1), Ipv4Addr::new(172, 16, 1, 14));
        assert_eq!(underlay_ip(2), Ipv4Addr::new(172, 16, 1, 13));
        assert_eq!(underlay_ip(3), Ipv4Addr::new(172, 16, 1, 23));
        assert_eq!(underlay_ip(MAX_NODES), Ipv4Addr::new(172, 16, 1, 220));
        assert_eq!(node_subnet(0).to_string(), "10.244.0.0/24");
        assert_eq!(node_subnet(2).to_string(), "10.244.2.0/24");
    }

    #[test]
    fn underlay_addresses_are_unique() {
        let mut all: Vec<Ipv4Addr> = (0..=MAX_NODES).map(underlay_ip).collect();
        all.push(UNDERLAY_GATEWAY);
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
    }

    #[test]
    fn plan_names_everything_after_the_lab() {
        let s = LabState::plan("t1", 2, 1500, PathBuf::from("/bin"));
        let names: Vec<_> = s.nodes.iter().map(|n| n.netns.as_str()).collect();
        assert_eq!(names, ["t1-master", "t1-k8s-node1", "t1-k8s-node2"]);
        assert_eq!(s.underlay_netns, "t1-underlay");
        assert_eq!(s.pods[1].netns, "t1-ubuntu-2");
        assert_eq!(s.pods[1].node, "k8s-node2");
        assert_eq!(s.netns_of("ubuntu-1").unwrap(), "t1-ubuntu-1");
        assert_eq!(s.netns_of("master").unwrap(), "t1-master");
        let err = s.netns_of("node9").unwrap_err().to_string();
        assert!(
            err.contains("k8s-node2") && err.contains("ubuntu-1"),
            "{err}"
        );
        assert_eq!(
            overlay_address(&s, &s.nodes[0]),
            Ipv4Addr::new(10, 244, 0, 0)
        );
        assert_eq!(
            overlay_address(&s, &s.nodes[1]),
            Ipv4Addr::new(10, 244, 1, 1)
        );
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("lab").is_ok());
        assert!(validate_name("t123n4").is_ok());
        for bad in ["", "a-b", "a b", "x/y", &"n".repeat(25)] {
            let err = validate_name(bad).unwrap_err().to_string();
            assert!(err.contains("invalid lab name"), "{err}");
        }
    }

    #[test]
    fn net_conf_is_the_seeds() {
        let v: serde_json::Value = serde_json::from_str(&net_conf_json()).unwrap();
        assert_eq!(v["Network"], "10.244.0.0/16");
        assert_eq!(v["Backend"]["Type"], "vxlan");
        assert_eq!(v["Backend"]["VNI"], 1);
    }

    #[test]
    fn store_kind_parses_and_old_lab_json_means_local_with_reservations() {
        assert_eq!("etcd".parse::<StoreKind>().unwrap(), StoreKind::Etcd);
        assert_eq!("local".parse::<StoreKind>().unwrap(), StoreKind::Local);
        let err = "consul".parse::<StoreKind>().unwrap_err();
        assert!(err.contains("local") && err.contains("etcd"), "{err}");
        assert_eq!(StoreKind::Etcd.to_string(), "etcd");

        let mut s = LabState::plan("t1", 1, 1500, PathBuf::from("/bin"));
        s.store = StoreKind::Etcd;
        s.lease_ttl = Some(5);
        s.reservations = false;
        let back: LabState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        // lab.json written before the store options existed.
        let mut v = serde_json::to_value(&s).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.remove("store");
        obj.remove("lease_ttl");
        obj.remove("reservations");
        let old: LabState = serde_json::from_value(v).unwrap();
        assert_eq!(old.store, StoreKind::Local);
        assert_eq!(old.lease_ttl, None);
        assert!(old.reservations);
    }
}
