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

pub mod bench;
mod check;
mod etcd;
mod kinds;
mod masq;
mod ping;
mod pods;
mod procs;
mod status;
mod topology;

use std::ffi::OsString;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flannel_core::lease::{Lease, LeaseAttrs, LeaseKey, VxlanBackendData};
use flannel_core::mac::MacAddr;
use flannel_netlink::netns::{NetNs, NetNsError};
use flannel_netlink::Netlink;
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

pub use check::{Matrix, Outcome, Target, TargetKind};
pub use etcd::{
    client_url as etcd_client_url, etcd_binary, ETCD_BINARY, ETCD_BINARY_ENV, ETCD_CLIENT_PORT,
    ETCD_PEER_PORT,
};
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
}

impl std::str::FromStr for StoreKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "local" => Ok(StoreKind::Local),
            "etcd" => Ok(StoreKind::Etcd),
            other => Err(format!("unknown store {other:?}: use `local` or `etcd`")),
        }
    }
}

impl std::fmt::Display for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreKind::Local => "local",
            StoreKind::Etcd => "etcd",
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

    /// The pod MTU flanneld writes: the underlay MTU minus the backend's
    /// overhead (vxlan 50, or 70 when IPv6 is on: the pods' one MTU must
    /// also fit the vxlan device over the IPv6 underlay).
    pub fn pod_mtu(&self) -> u32 {
        let cfg =
            flannel_core::config::parse(&self.net_conf_json()).expect("the lab's net-conf parses");
        cfg.pod_mtu(self.mtu, self.family.has_v6())
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

/// A running (or half-running) lab.
#[derive(Debug, Clone)]
pub struct Lab {
    pub state: LabState,
}

impl Lab {
    /// `flannelctl lab up`: builds the topology, starts the daemons, waits
    /// for them, attaches the pods. On failure everything built so far is
    /// removed again unless `keep_on_failure`.
    pub fn up(opts: &LabOptions) -> Result<Lab> {
        require_root()?;
        validate_name(&opts.name)?;
        if opts.nodes == 0 || opts.nodes > MAX_NODES {
            return Err(LabError::InvalidOption {
                option: "--nodes",
                reason: format!("{} is out of range: use 1 to {MAX_NODES}", opts.nodes),
            });
        }
        if !(1280..=9000).contains(&opts.mtu) {
            return Err(LabError::InvalidOption {
                option: "--mtu",
                reason: format!(
                    "{} is out of range: use 1280 to 9000 (pods get MTU - 50)",
                    opts.mtu
                ),
            });
        }
        if opts.direct_routing && opts.backend != Backend::Vxlan {
            return Err(LabError::InvalidOption {
                option: "--direct-routing",
                reason: format!(
                    "DirectRouting is an option of the vxlan backend, not of {}: drop it or use --backend vxlan",
                    opts.backend
                ),
            });
        }
        let bin_dir = resolve_bin_dir(opts.bin_dir.as_deref())?;
        if opts.store == StoreKind::Etcd {
            etcd::etcd_binary()?;
        }
        let dir = lab_dir(&opts.name);
        let leftovers = lab_namespaces(&opts.name);
        if !leftovers.is_empty() {
            return Err(LabError::Exists {
                name: opts.name.clone(),
                what: format!("namespaces {}", leftovers.join(", ")),
            });
        }
        std::fs::create_dir_all(LAB_ROOT).map_err(io_err(format!("creating {LAB_ROOT}")))?;
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(LabError::Exists {
                    name: opts.name.clone(),
                    what: format!("{} is present", dir.display()),
                })
            }
            Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
        }
        if opts.lease_ttl == Some(0) {
            return Err(LabError::InvalidOption {
                option: "--lease-ttl",
                reason: "0 is out of range: give the lease lifetime in seconds, at least 1"
                    .to_string(),
            });
        }
        let mut state = LabState::plan_with(
            &opts.name,
            opts.nodes,
            opts.mtu,
            bin_dir,
            opts.topology,
            opts.family,
        );
        state.backend = opts.backend;
        state.direct_routing = opts.direct_routing;
        state.ip_masq = opts.ip_masq;
        state.store = opts.store;
        state.lease_ttl = opts.lease_ttl;
        state.reservations = opts.reservations;
        let mut lab = Lab { state };
        match lab.build(opts.ready_timeout, opts.progress) {
            Ok(()) => Ok(lab),
            Err(e) => {
                if !opts.keep_on_failure {
                    if let Err(down_err) = down(&opts.name) {
                        eprintln!("cleaning up after the failed `lab up`: {down_err}");
                    }
                }
                // A step can also fail because the interrupt killed the
                // command it ran (the terminal signals the whole group).
                if interrupted() {
                    return Err(LabError::Interrupted);
                }
                Err(e)
            }
        }
    }

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

    /// The lab's local store directory (`--local-store` of every daemon).
    pub fn store_dir(&self) -> PathBuf {
        self.dir().join("store")
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

    fn build(&mut self, ready_timeout: Duration, progress: bool) -> Result<()> {
        // Every step ends here: an interrupt stops the build at the next one.
        let say = |msg: String| {
            if progress {
                eprintln!("lab {}: {msg}", self.state.name);
            }
            check_interrupted()
        };
        self.state.save()?;
        for line in topology::build_network(&self.state)? {
            say(line)?;
        }
        for node in &self.state.nodes {
            let ns = NetNs::add(&node.netns)
                .map_err(ns_err(format!("creating the namespace of {}", node.name)))?;
            let switch = NetNs::open(&self.switch_netns(node))
                .map_err(ns_err(format!("opening the switch of {}", node.name)))?;
            topology::wire_node(&switch, &ns, node, self.state.mtu)?;
            std::fs::create_dir_all(self.node_dir(&node.name))
                .map_err(io_err(format!("creating the directory of {}", node.name)))?;
            say(format!(
                "node {} ({}): ens3 {}/{UNDERLAY_PREFIX}{}, default via {}, ip_forward=1",
                node.name,
                node.netns,
                node.underlay_ip,
                node.underlay_ipv6
                    .map(|a| format!(" {a}/64"))
                    .unwrap_or_default(),
                node.gateway()
            ))?;
        }

        write_atomic(&self.net_conf_path(), self.state.net_conf_json().as_bytes())?;
        match self.state.store {
            StoreKind::Local => {
                std::fs::create_dir_all(self.store_dir())
                    .map_err(io_err("creating the lab store"))?;
            }
            StoreKind::Etcd => {
                let pid = self.start_store_within(ready_timeout)?;
                self.put_etcd_config()?;
                say(format!(
                    "etcd in {}: pid {pid}, {} (config at {}), data {}",
                    self.master()?.netns,
                    self.etcd_endpoint()?,
                    flannel_core::wire::DEFAULT_ETCD_PREFIX,
                    self.etcd_dir().join("data").display()
                ))?;
            }
        }
        let nodes: Vec<NodeState> = self.state.nodes.clone();
        for n in &nodes {
            if self.state.reservations {
                self.write_reservation(n)?;
            } else {
                self.seed_subnet_env(n)?;
            }
        }
        say(format!(
            "store {}: {} {}",
            self.store_description(),
            if self.state.reservations {
                "reservations"
            } else {
                "no reservations; subnet.env seeded with"
            },
            self.state
                .nodes
                .iter()
                .map(|n| format!("{} -> {}", n.subnet, n.underlay_ip))
                .collect::<Vec<_>>()
                .join(", ")
        ))?;

        for node in &self.state.nodes {
            let pid = self.start_daemon(&node.name)?;
            say(format!(
                "flanneld on {}: pid {pid}, log {}",
                node.name,
                self.log_path(&node.name).display()
            ))?;
        }
        let deadline = Instant::now() + ready_timeout;
        for node in &self.state.nodes {
            self.wait_daemon_ready(&node.name, deadline)?;
        }
        self.wait_leases_published(deadline)?;
        say(format!(
            "every flanneld wrote subnet.env, answers /readyz and published its {} lease",
            self.state.backend
        ))?;

        for i in 0..self.state.pods.len() {
            let a = self.attach_pod(i)?;
            self.state.pods[i].ip = a.ipv4;
            self.state.pods[i].gateway = a.gateway;
            self.state.pods[i].ipv6 = a.ipv6;
            self.state.save()?;
            let pod = &self.state.pods[i];
            say(format!(
                "pod {} ({}) on {}: eth0 {} (CNI ADD via the flannel plugin)",
                pod.name,
                pod.netns,
                pod.node,
                pod.addresses()
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ))?;
        }
        if self.state.ip_masq {
            masq::wait_ready(self, Instant::now() + Duration::from_secs(10))?;
            say("every pod's packet to the outside host leaves masqueraded".to_string())?;
        }
        Ok(())
    }

    /// The switch namespace a node is plugged into.
    pub fn switch_netns(&self, n: &NodeState) -> String {
        if n.segment == 2 {
            self.state.underlay2_netns()
        } else {
            self.state.underlay_netns.clone()
        }
    }

    fn reservation(&self, n: &NodeState) -> Lease {
        let v4 = self.state.family.has_v4().then_some(n.underlay_ip);
        let v6 = if self.state.family.has_v6() {
            n.underlay_ipv6
        } else {
            None
        };
        Lease {
            key: self.state.lease_key(n),
            attrs: match self.state.backend {
                // As flanneld (and upstream) write it: no BackendType.
                Backend::Udp => LeaseAttrs::new_udp(n.underlay_ip),
                b => LeaseAttrs::new(b.type_name(), v4, v6),
            },
            expiration: None,
        }
    }

    /// Writes the reservation of a node (a lease without expiry naming its
    /// underlay address), unless its key is already taken.
    fn write_reservation(&self, n: &NodeState) -> Result<()> {
        let lease = self.reservation(n);
        self.store_block_on(|store| async move {
            store.create_lease(&lease, None).await?;
            Ok(())
        })
    }

    /// Writes the subnet.env flanneld would have left from an earlier run
    /// with the node's planned subnet: flanneld's acquisition asks for that
    /// subnet first (after a lease naming its own address).
    fn seed_subnet_env(&self, n: &NodeState) -> Result<()> {
        let cfg = flannel_core::config::parse(&self.state.net_conf_json())
            .expect("the lab's net-conf parses");
        let key = self.state.lease_key(n);
        let env = flannel_core::subnet_env::SubnetEnv::new(
            &cfg,
            &key,
            self.state.pod_mtu(),
            self.state.ip_masq,
        );
        std::fs::create_dir_all(self.node_dir(&n.name))
            .map_err(io_err(format!("creating the directory of {}", n.name)))?;
        write_atomic(&self.subnet_file(&n.name), env.render().as_bytes())
    }

    /// Where the leases are: the local store's directory or etcd's URL.
    pub fn store_description(&self) -> String {
        match self.state.store {
            StoreKind::Local => format!("local {}", self.store_dir().display()),
            StoreKind::Etcd => match self.etcd_endpoint() {
                Ok(url) => format!("etcd {url}"),
                Err(_) => "etcd (no master)".to_string(),
            },
        }
    }

    /// Runs an async operation on the lab's store: the local directory on a
    /// private runtime, or etcd from a thread inside the master's namespace.
    pub(crate) fn store_block_on<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(AnyStore) -> Fut + Send,
        Fut: std::future::Future<Output = flannel_store::Result<T>>,
    {
        match self.state.store {
            StoreKind::Local => {
                store_block_on(
                    &self.store_dir(),
                    |s| async move { f(AnyStore::Local(s)).await },
                )
            }
            StoreKind::Etcd => {
                let master = self.master()?;
                let ns = NetNs::open(&master.netns)
                    .map_err(ns_err(format!("opening {}", master.netns)))?;
                let path = self.store_description();
                etcd::block_on(
                    &ns,
                    etcd::client_options(master.underlay_ip),
                    |s| async move {
                        f(AnyStore::Etcd(s))
                            .await
                            .map_err(|source| LabError::Store { path, source })
                    },
                )
            }
        }
    }

    /// Every lease in the lab's store.
    pub fn leases(&self) -> Result<Vec<Lease>> {
        self.store_block_on(|store| async move { store.list_leases().await })
    }

    /// Deletes a lease from the lab's store.
    pub fn delete_lease(&self, subnet: Ipv4Net) -> Result<()> {
        let key = LeaseKey {
            ipv4: Some(subnet),
            ipv6: None,
        };
        self.store_block_on(|store| async move { store.delete_lease(&key).await })
    }

    fn master(&self) -> Result<&NodeState> {
        self.node(&node_name(0))
    }

    /// `http://172.16.1.8:2379`: where the daemons reach the lab's etcd.
    pub fn etcd_endpoint(&self) -> Result<String> {
        Ok(etcd::client_url(self.master()?.underlay_ip))
    }

    /// `<labdir>/etcd`: etcd's data directory, log and pid file.
    pub fn etcd_dir(&self) -> PathBuf {
        self.dir().join(etcd::ETCD_DIR)
    }

    /// The pid in `<labdir>/etcd/etcd.pid`.
    pub fn etcd_pid(&self) -> Option<u32> {
        procs::read_pid(&self.etcd_dir().join(etcd::ETCD_PID_FILE))
    }

    /// Whether the lab's etcd runs (pid alive and really this lab's etcd).
    pub fn etcd_alive(&self) -> bool {
        self.etcd_pid()
            .is_some_and(|pid| etcd::is_lab_etcd(pid, &self.dir()))
    }

    /// Whether the store answers: a read of every lease (for etcd, from
    /// inside the master's namespace).
    pub fn store_health(&self) -> Result<()> {
        self.leases().map(|_| ())
    }

    /// Stops the lab's etcd (SIGTERM, after checking its command line),
    /// keeping its data directory: the daemons see an outage. Returns
    /// whether it was running. Without etcd (`--store local`) an error.
    pub fn stop_store(&self) -> Result<bool> {
        self.require_etcd("stop_store")?;
        match self.etcd_pid() {
            Some(pid) => etcd::stop(pid, &self.dir(), Duration::from_secs(10)),
            None => Ok(false),
        }
    }

    /// Starts the lab's etcd again (same data directory, same addresses)
    /// and waits until it answers. Returns its pid.
    pub fn start_store(&self) -> Result<u32> {
        self.start_store_within(Duration::from_secs(30))
    }

    fn start_store_within(&self, timeout: Duration) -> Result<u32> {
        self.require_etcd("start_store")?;
        if let Some(pid) = self.etcd_pid().filter(|_| self.etcd_alive()) {
            return Err(LabError::InvalidOption {
                option: "start_store",
                reason: format!("the lab's etcd is already running (pid {pid})"),
            });
        }
        let master = self.master()?.clone();
        let ns = NetNs::open(&master.netns).map_err(ns_err(format!("opening {}", master.netns)))?;
        let dir = self.etcd_dir();
        let pid = etcd::spawn(&ns, self.name(), &dir, master.underlay_ip)?;
        etcd::wait_ready(
            &ns,
            master.underlay_ip,
            pid,
            &self.dir(),
            &dir.join(etcd::ETCD_LOG_FILE),
            Instant::now() + timeout,
        )?;
        Ok(pid)
    }

    fn require_etcd(&self, what: &'static str) -> Result<()> {
        if self.state.store == StoreKind::Etcd {
            Ok(())
        } else {
            Err(LabError::InvalidOption {
                option: what,
                reason: format!(
                    "lab {} uses the {} store; only a lab made with `lab up --store etcd` has an etcd to stop or start",
                    self.name(),
                    self.state.store
                ),
            })
        }
    }

    /// Writes the net-conf into etcd (`etcdctl put /coreos.com/network/config
    /// '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":1}}'`), where
    /// flanneld in etcd mode reads it.
    fn put_etcd_config(&self) -> Result<()> {
        let value = self.state.net_conf_json();
        let endpoint = self.etcd_endpoint()?;
        self.with_etcd(move |store| async move {
            let key = store.config_key();
            store
                .client()
                .put(key.clone(), value, None)
                .await
                .map(|_| ())
                .map_err(|e| LabError::Etcd {
                    endpoint,
                    detail: format!("put {key}: {e}"),
                })
        })
    }

    /// The raw value of an etcd key (`etcdctl get KEY --print-value-only`),
    /// e.g. `/coreos.com/network/subnets/10.244.1.0-24`; `None` when absent.
    pub fn etcd_get(&self, key: &str) -> Result<Option<String>> {
        self.require_etcd("etcd_get")?;
        let key = key.to_string();
        let endpoint = self.etcd_endpoint()?;
        self.with_etcd(move |store| async move {
            let resp = store
                .client()
                .get(key.clone(), None)
                .await
                .map_err(|e| LabError::Etcd {
                    endpoint,
                    detail: format!("get {key}: {e}"),
                })?;
            Ok(resp
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
        })
    }

    /// Writes a raw value under an etcd key (`etcdctl put KEY VALUE`), without
    /// any check: how a test or an operator puts a bad value into the store.
    pub fn etcd_put(&self, key: &str, value: &str) -> Result<()> {
        self.require_etcd("etcd_put")?;
        let (key, value) = (key.to_string(), value.to_string());
        let endpoint = self.etcd_endpoint()?;
        self.with_etcd(move |store| async move {
            store
                .client()
                .put(key.clone(), value, None)
                .await
                .map(|_| ())
                .map_err(|e| LabError::Etcd {
                    endpoint,
                    detail: format!("put {key}: {e}"),
                })
        })
    }

    /// Deletes an etcd key (`etcdctl del KEY`); whether it existed.
    pub fn etcd_delete(&self, key: &str) -> Result<bool> {
        self.require_etcd("etcd_delete")?;
        let key = key.to_string();
        let endpoint = self.etcd_endpoint()?;
        self.with_etcd(move |store| async move {
            store
                .client()
                .delete(key.clone(), None)
                .await
                .map(|r| r.deleted() > 0)
                .map_err(|e| LabError::Etcd {
                    endpoint,
                    detail: format!("del {key}: {e}"),
                })
        })
    }

    /// The etcd key of a node's lease: `/coreos.com/network/subnets/10.244.1.0-24`.
    pub fn etcd_lease_key(&self, node: &str) -> Result<String> {
        let key = self.state.lease_key(self.node(node)?);
        Ok(format!(
            "{}/{}/{key}",
            flannel_core::wire::DEFAULT_ETCD_PREFIX,
            flannel_core::wire::ETCD_SUBNETS_DIR
        ))
    }

    fn with_etcd<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(flannel_store::etcd::EtcdStore) -> Fut + Send,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let master = self.master()?;
        let ns = NetNs::open(&master.netns).map_err(ns_err(format!("opening {}", master.netns)))?;
        etcd::block_on(&ns, etcd::client_options(master.underlay_ip), f)
    }

    /// The VtepMAC a node published in its lease, if any.
    pub fn published_vtep_mac(&self, node: &str) -> Result<Option<MacAddr>> {
        let n = self.node(node)?;
        Ok(self
            .leases()?
            .into_iter()
            .find(|l| l.key == self.state.lease_key(n))
            .and_then(|l| vxlan_data(&l.attrs))
            .map(|d| d.vtep_mac))
    }

    /// Starts the node's `flanneld` exactly as `up` does (detached, logs to
    /// `flanneld.log`, pid in `flanneld.pid`). Returns its pid. Fails if the
    /// node's daemon is already running.
    pub fn start_daemon(&self, node: &str) -> Result<u32> {
        let n = self.node(node)?;
        if let Some(pid) = self.daemon_pid(node) {
            if procs::is_lab_flanneld(pid, &self.dir()) {
                return Err(LabError::InvalidOption {
                    option: "start_daemon",
                    reason: format!("flanneld of {node} is already running (pid {pid})"),
                });
            }
        }
        let ns = NetNs::open(&n.netns).map_err(ns_err(format!("opening {}", n.netns)))?;
        // The health endpoint listens on 127.0.0.1, which a fresh namespace
        // only has once lo is up.
        let mut nl = Netlink::open_in(&ns).map_err(nl_err(format!("netlink in {node}")))?;
        if let Some(lo) = nl
            .link_by_name("lo")
            .map_err(nl_err(format!("ip link show lo in {node}")))?
        {
            nl.set_link_up(lo.index)
                .map_err(nl_err(format!("ip link set lo up in {node}")))?;
        }
        procs::spawn_flanneld(
            &ns,
            &self.state.bin_dir,
            &self.node_dir(node),
            &self.daemon_args(n)?,
            &self.subnet_file(node),
        )
    }

    /// The flags every daemon gets besides `--subnet-file`.
    fn daemon_store_args(&self) -> Result<Vec<OsString>> {
        let mut args: Vec<OsString> = match self.state.store {
            StoreKind::Local => vec![
                "--local-store".into(),
                self.store_dir().into(),
                "--net-config-path".into(),
                self.net_conf_path().into(),
            ],
            // No --local-store: flanneld uses etcd and reads the config there.
            StoreKind::Etcd => vec!["--etcd-endpoints".into(), self.etcd_endpoint()?.into()],
        };
        if let Some(ttl) = self.state.lease_ttl {
            args.push("--lease-ttl".into());
            args.push(ttl.to_string().into());
        }
        if self.state.ip_masq {
            args.push("--ip-masq".into());
        }
        Ok(args)
    }

    /// The flags of one node's daemon: [`Self::daemon_store_args`], the
    /// health endpoint on the node's 127.0.0.1:[`HEALTHZ_PORT`], and in labs
    /// with IPv6 `--public-ipv6` naming the node's IPv6 underlay address.
    fn daemon_args(&self, n: &NodeState) -> Result<Vec<OsString>> {
        let mut args = self.daemon_store_args()?;
        args.extend(
            [
                "--healthz-ip",
                "127.0.0.1",
                "--healthz-port",
                &HEALTHZ_PORT.to_string(),
            ]
            .map(OsString::from),
        );
        if let Some(v6) = n.underlay_ipv6.filter(|_| self.state.family.has_v6()) {
            args.push("--public-ipv6".into());
            args.push(v6.to_string().into());
        }
        Ok(args)
    }

    /// Kills the node's `flanneld` with SIGKILL (a crash: nothing is cleaned
    /// up, its lease stays until it expires), after checking that the pid
    /// really is this lab's flanneld. Returns whether a daemon was running.
    pub fn kill_daemon(&self, node: &str) -> Result<bool> {
        self.node(node)?;
        match self.daemon_pid(node) {
            Some(pid) => procs::kill_flanneld(pid, &self.dir()),
            None => Ok(false),
        }
    }

    /// Stops the node's `flanneld` with SIGTERM (SIGKILL after `timeout`),
    /// after checking that the pid really is this lab's flanneld. Returns
    /// whether a daemon was running.
    pub fn stop_daemon(&self, node: &str, timeout: Duration) -> Result<bool> {
        self.node(node)?;
        match self.daemon_pid(node) {
            Some(pid) => procs::stop_flanneld(pid, &self.dir(), timeout),
            None => Ok(false),
        }
    }

    /// The pid recorded in the node's `flanneld.pid`.
    pub fn daemon_pid(&self, node: &str) -> Option<u32> {
        procs::read_pid(&self.node_dir(node).join(procs::PID_FILE))
    }

    /// Whether the node's daemon runs (pid alive and really our flanneld).
    pub fn daemon_alive(&self, node: &str) -> bool {
        self.daemon_pid(node)
            .is_some_and(|pid| procs::is_lab_flanneld(pid, &self.dir()))
    }

    /// Whether the node's flanneld says it is ready: `GET /readyz` on its
    /// health endpoint, from inside the node's namespace. `Err` says why it
    /// did not answer.
    pub fn daemon_ready(&self, node: &str) -> std::result::Result<bool, String> {
        let ns = self.netns(node).map_err(|e| e.to_string())?;
        ns.run(|| procs::http_get_status(HEALTHZ_PORT, flannel_core::wire::READYZ_PATH))
            .map_err(|e| e.to_string())?
            .map(|status| status == 200)
    }

    /// Waits until the node's subnet.env names its reserved subnet, then
    /// until its flanneld answers `/readyz` with 200 (subnet.env written and
    /// the masquerade/forward rules applied).
    pub fn wait_daemon_ready(&self, node: &str, deadline: Instant) -> Result<()> {
        self.wait_subnet_env(node, deadline)?;
        poll_until(deadline, &format!("/readyz of flanneld on {node}"), || {
            if self.daemon_ready(node) == Ok(true) {
                return Ok(true);
            }
            self.ensure_daemon_alive(node)?;
            Ok(false)
        })
    }

    /// Waits until the node's subnet.env names its reserved subnet.
    pub fn wait_subnet_env(&self, node: &str, deadline: Instant) -> Result<()> {
        let n = self.node(node)?.clone();
        let path = self.subnet_file(node);
        let want = self.state.lease_key(&n);
        poll_until(deadline, &format!("{} of {node}", path.display()), || {
            if let Ok(text) = std::fs::read_to_string(&path) {
                if let Ok(env) = flannel_core::subnet_env::SubnetEnv::parse(&text) {
                    let got = env.lease_key();
                    if got == Some(want) {
                        return Ok(true);
                    }
                    return Err(LabError::WrongSubnet {
                        node: node.to_string(),
                        got: got.map(|g| g.to_string()).unwrap_or_else(|| "none".into()),
                        want: want.to_string(),
                        log: self.log_path(node).display().to_string(),
                    });
                }
            }
            self.ensure_daemon_alive(node)?;
            Ok(false)
        })
    }

    /// Waits until every node's lease carries its VtepMAC.
    pub fn wait_leases_published(&self, deadline: Instant) -> Result<()> {
        poll_until(deadline, "every node's lease to be published", || {
            let leases = self.leases()?;
            let missing: Vec<&NodeState> = self
                .state
                .nodes
                .iter()
                .filter(|n| !leases.iter().any(|l| self.is_published(n, l)))
                .collect();
            for n in &missing {
                self.ensure_daemon_alive(&n.name)?;
            }
            Ok(missing.is_empty())
        })
    }

    /// Whether `l` is `n`'s lease as its daemon publishes it: the node's
    /// subnet(s), its public address(es), the lab's backend and, for vxlan,
    /// the VtepMAC of each family.
    pub fn is_published(&self, n: &NodeState, l: &Lease) -> bool {
        let fam = self.state.family;
        l.key == self.state.lease_key(n)
            && (!fam.has_v4() || l.attrs.public_ip == Some(n.underlay_ip))
            && (!fam.has_v6() || l.attrs.public_ipv6 == n.underlay_ipv6)
            && l.attrs.effective_backend_type() == self.state.backend.type_name()
            && (self.state.backend != Backend::Vxlan
                || ((!fam.has_v4() || vxlan_data(&l.attrs).is_some())
                    && (!fam.has_v6() || l.attrs.vxlan_v6_data().is_some())))
    }

    /// The node's `flanneld.log` (the daemon's stderr, appended across restarts).
    pub fn log_path(&self, node: &str) -> PathBuf {
        self.node_dir(node).join(procs::LOG_FILE)
    }

    fn ensure_daemon_alive(&self, node: &str) -> Result<()> {
        if self.daemon_alive(node) {
            return Ok(());
        }
        let log = self.log_path(node);
        Err(LabError::DaemonDied {
            node: node.to_string(),
            pid: self.daemon_pid(node).unwrap_or(0),
            log: log.display().to_string(),
            tail: procs::tail(&log, 15),
        })
    }

    fn attach_pod(&self, i: usize) -> Result<pods::Attached> {
        let pod = &self.state.pods[i];
        let node = self.node(&pod.node)?;
        NetNs::add(&pod.netns)
            .map_err(ns_err(format!("creating the namespace of {}", pod.name)))?;
        let node_ns =
            NetNs::open(&node.netns).map_err(ns_err(format!("opening {}", node.netns)))?;
        let config = pods::cni_config(&self.node_dir(&node.name), &self.subnet_file(&node.name));
        let out = pods::invoke(
            "ADD",
            &node_ns,
            &self.state.bin_dir,
            pod,
            &node.name,
            &config,
        )?;
        pods::parse_add_result(&out).map_err(|detail| LabError::Cni {
            command: "ADD",
            pod: pod.name.clone(),
            node: node.name.clone(),
            detail,
        })
    }

    /// Adds a worker `k8s-node<I>` (I = the highest index + 1) with its pod
    /// `ubuntu-<I>` to the running lab and waits until its lease is
    /// published and the pod attached; the other nodes are not touched.
    /// Returns the node's name.
    pub fn add_node(&mut self, timeout: Duration) -> Result<String> {
        let node = self.begin_add_node()?;
        self.finish_add_node(&node, Instant::now() + timeout)?;
        Ok(node)
    }

    /// First half of [`Lab::add_node`]: namespace, underlay port, the
    /// reservation (or, with the store unreachable or reservations off, a
    /// seeded subnet.env naming the planned subnet) and the daemon. Does not
    /// wait for the store: while etcd is stopped the new daemon keeps
    /// trying to reach it.
    pub fn begin_add_node(&mut self) -> Result<String> {
        require_root()?;
        let index = self.state.nodes.iter().map(|n| n.index).max().unwrap_or(0) + 1;
        if index > MAX_NODES {
            return Err(LabError::InvalidOption {
                option: "add_node",
                reason: format!("the lab already has {MAX_NODES} workers"),
            });
        }
        let name = node_name(index);
        let node = plan_node(
            &self.state.name,
            index,
            self.state.topology,
            self.state.family,
        );
        // Recorded first, so that `down` knows it whatever fails below.
        self.state.nodes.push(node.clone());
        self.state.pods.push(plan_pod(&self.state.name, index));
        self.state.save()?;
        let switch = self.switch_netns(&node);
        let underlay = NetNs::open(&switch).map_err(ns_err(format!("opening {switch}")))?;
        let ns =
            NetNs::add(&node.netns).map_err(ns_err(format!("creating the namespace of {name}")))?;
        topology::wire_node(&underlay, &ns, &node, self.state.mtu)?;
        std::fs::create_dir_all(self.node_dir(&name))
            .map_err(io_err(format!("creating the directory of {name}")))?;
        if self.state.reservations {
            match self.write_reservation(&node) {
                Ok(()) => {}
                // The store is down (an outage test): the seeded subnet.env
                // still makes the daemon ask for the planned subnet.
                Err(LabError::Etcd { .. })
                | Err(LabError::Store {
                    source: flannel_store::StoreError::Unavailable(_),
                    ..
                }) => self.seed_subnet_env(&node)?,
                Err(e) => return Err(e),
            }
        } else {
            self.seed_subnet_env(&node)?;
        }
        self.start_daemon(&name)?;
        Ok(name)
    }

    /// Second half of [`Lab::add_node`]: waits until the node's lease carries
    /// its VtepMAC (store errors count as "not yet": etcd may be coming
    /// back) and its subnet.env is right, then attaches its pod.
    pub fn finish_add_node(&mut self, node: &str, deadline: Instant) -> Result<()> {
        let n = self.node(node)?.clone();
        let mut last_error = String::new();
        poll_until(
            deadline,
            &format!("the lease of {node} with its VtepMAC"),
            || {
                match self.leases() {
                    Ok(leases) => {
                        if leases.iter().any(|l| self.is_published(&n, l)) {
                            return Ok(true);
                        }
                    }
                    Err(e) => last_error = e.to_string(),
                }
                self.ensure_daemon_alive(node)?;
                Ok(false)
            },
        )
        .map_err(|e| match e {
            LabError::Timeout { what, secs } if !last_error.is_empty() => LabError::Timeout {
                what: format!("{what} (last store error: {last_error})"),
                secs,
            },
            e => e,
        })?;
        self.wait_daemon_ready(node, deadline)?;
        for i in 0..self.state.pods.len() {
            if self.state.pods[i].node == node && self.state.pods[i].addresses().is_empty() {
                let a = self.attach_pod(i)?;
                self.state.pods[i].ip = a.ipv4;
                self.state.pods[i].gateway = a.gateway;
                self.state.pods[i].ipv6 = a.ipv6;
                self.state.save()?;
            }
        }
        Ok(())
    }

    /// Reads `lab.json` again (after another handle changed the lab).
    pub fn reload(&mut self) -> Result<()> {
        self.state = LabState::load(&self.state.name)?;
        Ok(())
    }

    /// Pings every target from every pod and returns the matrix.
    pub fn check(&self) -> Result<Matrix> {
        check::run(self, Duration::from_secs(5))
    }

    /// The masquerade check of an `--ip-masq` lab: every pod's packet to
    /// the outside host arrives from its node's address, every pod's packet
    /// to a pod on another node from the pod's own.
    pub fn check_masq(&self) -> Result<MasqReport> {
        masq::run(self)
    }

    /// Switches the running lab to another backend the way an operator
    /// does: every flanneld is stopped, net-conf.json (or etcd's config) is
    /// rewritten, every flanneld is started again and the leases are waited
    /// for. The pods stay as they are.
    pub fn switch_backend(
        &mut self,
        backend: Backend,
        direct_routing: bool,
        timeout: Duration,
    ) -> Result<()> {
        if direct_routing && backend != Backend::Vxlan {
            return Err(LabError::InvalidOption {
                option: "--direct-routing",
                reason: format!("DirectRouting is a vxlan option, not one of {backend}"),
            });
        }
        let nodes: Vec<String> = self.state.nodes.iter().map(|n| n.name.clone()).collect();
        for n in &nodes {
            self.stop_daemon(n, Duration::from_secs(5))?;
            // The new daemon writes its own (another MTU); waiting for the
            // file must not be fooled by the old one. Its lease, which names
            // the node's address, still tells the daemon its subnet.
            match std::fs::remove_file(self.subnet_file(n)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(io_err(format!(
                        "removing {}",
                        self.subnet_file(n).display()
                    ))(e))
                }
            }
        }
        self.state.backend = backend;
        self.state.direct_routing = direct_routing;
        self.state.save()?;
        match self.state.store {
            StoreKind::Local => {
                write_atomic(&self.net_conf_path(), self.state.net_conf_json().as_bytes())?
            }
            StoreKind::Etcd => self.put_etcd_config()?,
        }
        for n in &nodes {
            self.start_daemon(n)?;
        }
        let deadline = Instant::now() + timeout;
        for n in &nodes {
            self.wait_daemon_ready(n, deadline)?;
        }
        self.wait_leases_published(deadline)?;
        masq::wait_ready(self, Instant::now() + Duration::from_secs(10))
    }

    /// Status of the lab for `flannelctl lab status`.
    pub fn status(&self) -> LabStatus {
        status::collect(self)
    }
}

pub(crate) fn vxlan_data(attrs: &LeaseAttrs) -> Option<VxlanBackendData> {
    attrs
        .backend_data
        .as_ref()
        .and_then(|v| serde_json::from_value(v.clone()).ok())
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

/// Set by the signal handler of [`InterruptGuard`].
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The signals a long lab command turns into [`LabError::Interrupted`].
const INTERRUPTS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

extern "C" fn note_interrupt(_: libc::c_int) {
    // Only an atomic store: all a signal handler may safely do here.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// While alive, Ctrl-C (SIGINT), SIGTERM and SIGHUP no longer kill the
/// process: they end the running lab command at its next step with
/// [`LabError::Interrupted`], so that `lab up` removes what it built instead
/// of leaving namespaces and daemons behind. Dropping it restores the
/// previous handlers.
pub struct InterruptGuard {
    previous: Vec<(Signal, SigAction)>,
}

impl InterruptGuard {
    pub fn install() -> Result<InterruptGuard> {
        INTERRUPTED.store(false, Ordering::SeqCst);
        let action = SigAction::new(
            SigHandler::Handler(note_interrupt),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let mut guard = InterruptGuard {
            previous: Vec::new(),
        };
        for sig in INTERRUPTS {
            // SAFETY: the handler only stores to an atomic.
            let old = unsafe { sigaction(sig, &action) }
                .map_err(|e| io_err(format!("installing a {sig} handler"))(e.into()))?;
            guard.previous.push((sig, old));
        }
        Ok(guard)
    }
}

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        for (sig, old) in self.previous.drain(..) {
            // SAFETY: puts back the handler that was there before.
            let _ = unsafe { sigaction(sig, &old) };
        }
    }
}

/// Whether an interrupt arrived while an [`InterruptGuard`] was alive.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub(crate) fn check_interrupted() -> Result<()> {
    if interrupted() {
        Err(LabError::Interrupted)
    } else {
        Ok(())
    }
}

/// The lab's store, whichever it is (the [`flannel_store::Store`] trait is
/// not object-safe).
pub(crate) enum AnyStore {
    Local(flannel_store::LocalStore),
    Etcd(flannel_store::etcd::EtcdStore),
}

impl AnyStore {
    async fn list_leases(&self) -> flannel_store::Result<Vec<Lease>> {
        use flannel_store::Store;
        Ok(match self {
            AnyStore::Local(s) => s.list_leases().await?.leases,
            AnyStore::Etcd(s) => s.list_leases().await?.leases,
        })
    }

    async fn create_lease(
        &self,
        lease: &Lease,
        ttl: Option<Duration>,
    ) -> flannel_store::Result<Option<Lease>> {
        use flannel_store::Store;
        match self {
            AnyStore::Local(s) => s.create_lease(lease, ttl).await,
            AnyStore::Etcd(s) => s.create_lease(lease, ttl).await,
        }
    }

    async fn delete_lease(&self, key: &LeaseKey) -> flannel_store::Result<()> {
        use flannel_store::Store;
        match self {
            AnyStore::Local(s) => s.delete_lease(key).await,
            AnyStore::Etcd(s) => s.delete_lease(key).await,
        }
    }
}

/// Runs an async store operation on a private current-thread runtime (the
/// lab itself is synchronous; only the store API is async).
pub(crate) fn store_block_on<T, F, Fut>(dir: &Path, f: F) -> Result<T>
where
    F: FnOnce(flannel_store::LocalStore) -> Fut,
    Fut: std::future::Future<Output = flannel_store::Result<T>>,
{
    let map = |source| LabError::Store {
        path: dir.display().to_string(),
        source,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("starting a runtime for the store"))?;
    rt.block_on(async {
        let store = flannel_store::LocalStore::open(dir).map_err(map)?;
        f(store).await.map_err(map)
    })
}

/// `flannelctl lab down`: stops the daemons (checking each pid is this lab's
/// flanneld), runs CNI DEL for the pods, deletes every namespace of the lab
/// and its directory. Safe to run twice and after a half-failed `up`; keeps
/// going after errors and reports them all at the end.
pub fn down(name: &str) -> Result<()> {
    require_root()?;
    validate_name(name)?;
    let dir = lab_dir(name);
    let mut errors = Vec::new();
    let state = match LabState::load(name) {
        Ok(s) => Some(s),
        Err(LabError::NotFound { .. }) => None,
        Err(e) => {
            errors.push(e.to_string());
            None
        }
    };

    // 1. Daemons: by their pid files, then any flanneld still running with
    //    this labdir on its command line (e.g. started before its pid file
    //    was written).
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.filter_map(|e| e.ok()) {
            if let Some(pid) = procs::read_pid(&e.path().join(procs::PID_FILE)) {
                if let Err(err) = procs::stop_flanneld(pid, &dir, Duration::from_secs(5)) {
                    errors.push(err.to_string());
                }
            }
        }
    }
    for pid in lab_processes(name) {
        if procs::is_lab_flanneld(pid, &dir) {
            if let Err(err) = procs::stop_flanneld(pid, &dir, Duration::from_secs(5)) {
                errors.push(err.to_string());
            }
        }
    }

    // 1b. The lab's etcd, by its pid file, then any still running with its
    //     data directory in this labdir.
    if let Some(pid) = procs::read_pid(&dir.join(etcd::ETCD_DIR).join(etcd::ETCD_PID_FILE)) {
        if let Err(err) = etcd::stop(pid, &dir, Duration::from_secs(10)) {
            errors.push(err.to_string());
        }
    }
    for pid in lab_processes(name) {
        if etcd::is_lab_etcd(pid, &dir) {
            if let Err(err) = etcd::stop(pid, &dir, Duration::from_secs(10)) {
                errors.push(err.to_string());
            }
        }
    }

    // 2. CNI DEL for every pod whose node still exists.
    if let Some(state) = &state {
        let lab = Lab {
            state: state.clone(),
        };
        for pod in &state.pods {
            let Some(node) = state.node(&pod.node) else {
                continue;
            };
            let Ok(node_ns) = NetNs::open(&node.netns) else {
                continue;
            };
            // Without the node's directory or the plugin binary (moved or
            // rebuilt elsewhere since `up`) DEL cannot run; that is harmless:
            // all the plugin created lives in the node and pod namespaces and
            // in the labdir, which are removed below.
            if !lab.node_dir(&node.name).exists() || !state.bin_dir.join(CNI_BINARY).is_file() {
                continue;
            }
            let config = pods::cni_config(&lab.node_dir(&node.name), &lab.subnet_file(&node.name));
            if let Err(e) = pods::invoke("DEL", &node_ns, &state.bin_dir, pod, &node.name, &config)
            {
                errors.push(e.to_string());
            }
        }
    }

    // 3. Namespaces: pods first, then nodes, then the switch.
    let mut namespaces = lab_namespaces(name);
    namespaces.sort_by_key(|n| {
        if n.contains("-ubuntu-") {
            0
        } else if n.ends_with("-underlay")
            || n.ends_with("-underlay2")
            || n.ends_with("-router")
            || n.ends_with("-outside")
        {
            2
        } else {
            1
        }
    });
    for ns in namespaces {
        if let Err(e) = NetNs::delete(&ns) {
            errors.push(format!("deleting namespace {ns}: {e}"));
        }
    }

    // 4. The lab directory.
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(format!("removing {}: {e}", dir.display())),
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(LabError::Teardown {
            name: name.to_string(),
            errors,
        })
    }
}

/// `flannelctl lab exec TARGET -- CMD...`: runs CMD inside the namespace of
/// a node, a pod or `underlay` (like `ip netns exec NAME-TARGET CMD`) with
/// the terminal's stdio; returns its exit code (128 + signal when killed).
pub fn exec(name: &str, target: &str, argv: &[OsString]) -> Result<i32> {
    require_root()?;
    let lab = Lab::open(name)?;
    let Some((program, args)) = argv.split_first() else {
        return Err(LabError::InvalidOption {
            option: "CMD",
            reason: "give the command to run after `--`, e.g. `-- ip route`".to_string(),
        });
    };
    let ns = lab.netns(target)?;
    let status = ns
        .run(|| std::process::Command::new(program).args(args).status())
        .map_err(ns_err(format!("entering {target}")))?
        .map_err(io_err(format!("running {}", program.to_string_lossy())))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
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

    #[test]
    fn daemons_get_the_store_flags_and_the_ttl() {
        let mut lab = Lab {
            state: LabState::plan("t1", 1, 1500, PathBuf::from("/bin")),
        };
        let args = |lab: &Lab| -> Vec<String> {
            lab.daemon_store_args()
                .unwrap()
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            args(&lab),
            [
                "--local-store",
                "/run/flannel-lab/t1/store",
                "--net-config-path",
                "/run/flannel-lab/t1/net-conf.json"
            ]
        );
        lab.state.ip_masq = true;
        assert_eq!(args(&lab).last().map(String::as_str), Some("--ip-masq"));
        lab.state.ip_masq = false;
        lab.state.store = StoreKind::Etcd;
        lab.state.lease_ttl = Some(7);
        assert_eq!(
            args(&lab),
            [
                "--etcd-endpoints",
                "http://172.16.1.8:2379",
                "--lease-ttl",
                "7"
            ]
        );
        assert_eq!(
            lab.etcd_lease_key("k8s-node1").unwrap(),
            "/coreos.com/network/subnets/10.244.1.0-24"
        );
        let err = lab.require_etcd("stop_store");
        assert!(err.is_ok());
        lab.state.store = StoreKind::Local;
        let err = lab.stop_store().unwrap_err().to_string();
        assert!(err.contains("--store etcd"), "{err}");
    }
}
