//! Helpers shared by the end-to-end test binaries: root check, unique lab
//! names, a guard that takes the lab down (also on panic), and reading back
//! what flannel manages in a node's kernel.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flannel_core::datapath::{FdbEntry, Neighbour, Route};
use flannel_core::mac::MacAddr;
use flannel_netlink::{Monitor, Netlink, Notification};
use flannelctl::lab::{self, Lab, LabOptions, Outcome, Pinger};
use ipnet::IpNet;

pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("needs root: these tests build labs in network namespaces (run them with sudo, or scripts/test)");
    }
}

/// The directory of the test's flannelctl, where cargo also puts flanneld
/// and flannel; `FLANNEL_LAB_BIN_DIR` points the tests at daemons built
/// elsewhere (e.g. another branch's, before it is merged).
pub fn bin_dir() -> PathBuf {
    let dir = match std::env::var_os(lab::BIN_DIR_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_BIN_EXE_flannelctl"))
            .parent()
            .expect("binary has a directory")
            .to_path_buf(),
    };
    for b in [lab::FLANNELD_BINARY, lab::CNI_BINARY] {
        assert!(
            dir.join(b).is_file(),
            "{} is not built in {}: run `cargo build --workspace --bins` (same target dir) before these tests",
            b,
            dir.display()
        );
    }
    dir
}

/// The binary name of flannel-rs's Kubernetes API double.
pub const KUBE_API_DOUBLE: &str = "kube-api-double";

/// The API server of Kubernetes-mode labs: `None` when `KUBE_APISERVER`
/// names a real kube-apiserver (the lab runs that one), else the Kubernetes
/// API double built beside flannelctl, asked for explicitly.
pub fn kube_apiserver() -> Option<PathBuf> {
    if std::env::var_os(lab::kube::KUBE_APISERVER_ENV).is_some_and(|v| !v.is_empty()) {
        return None;
    }
    let double = bin_dir().join(KUBE_API_DOUBLE);
    assert!(
        double.is_file(),
        "{} is not built: run `cargo build --workspace --bins` before these tests (or set {} to a real kube-apiserver)",
        double.display(),
        lab::kube::KUBE_APISERVER_ENV
    );
    Some(double)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh directory below the system's temporary directory
/// (`PREFIX-<pid>-<n>`), removed with everything in it when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// `rel` inside the directory.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn unique_name() -> String {
    format!(
        "t{}n{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A lab that is taken down when the guard drops (also on panic).
pub struct LabGuard {
    pub lab: Lab,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Err(e) = lab::down(self.lab.name()) {
            eprintln!("lab down {}: {e}", self.lab.name());
        }
    }
}

impl std::ops::DerefMut for LabGuard {
    fn deref_mut(&mut self) -> &mut Lab {
        &mut self.lab
    }
}

impl std::ops::Deref for LabGuard {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.lab
    }
}

pub fn up(workers: u32) -> LabGuard {
    up_with_mtu(workers, lab::DEFAULT_MTU)
}

pub fn up_with_mtu(workers: u32, mtu: u32) -> LabGuard {
    up_with(LabOptions {
        nodes: workers,
        mtu,
        ..LabOptions::default()
    })
}

/// A lab made with `opts`, under a unique name, with the binaries of this build.
pub fn up_with(opts: LabOptions) -> LabGuard {
    require_root();
    let opts = LabOptions {
        name: unique_name(),
        bin_dir: Some(bin_dir()),
        ..opts
    };
    let name = opts.name.clone();
    match Lab::up(&opts) {
        Ok(lab) => LabGuard { lab },
        Err(e) => {
            // `up` cleans up after itself; make sure anyway.
            let _ = lab::down(&name);
            panic!("lab up {name}: {e}");
        }
    }
}

/// What flannel manages on a node, read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    pub ifindex: u32,
    pub mac: MacAddr,
    pub routes: BTreeSet<Route>,
    pub neighbours: BTreeSet<Neighbour>,
    pub fdb: BTreeSet<FdbEntry>,
}

/// Reads flannel.1 and everything of ours (the lab library's
/// [`lab::tables::read`]): routes into the cluster network other than the
/// node's own subnet, every IPv4 route via flannel.1, permanent neighbours
/// and FDB entries on flannel.1. `None` when flannel.1 is missing.
pub fn read_tables(lab: &Lab, node: &str) -> Option<Tables> {
    let t = lab::tables::read(lab, node).unwrap();
    let (ifindex, mac) = t.device?;
    Some(Tables {
        ifindex,
        mac,
        routes: t.routes,
        neighbours: t.neighbours,
        fdb: t.fdb,
    })
}

/// The exact triple per peer (packet-walk.txt): neighbour subnet-address ->
/// VtepMAC, FDB VtepMAC -> PublicIP, route subnet via subnet-address onlink.
pub fn expected(
    lab: &Lab,
    node: &str,
    ifindex: u32,
    peers: &[(&str, MacAddr)],
) -> (BTreeSet<Route>, BTreeSet<Neighbour>, BTreeSet<FdbEntry>) {
    assert!(peers.iter().all(|(p, _)| *p != node));
    lab::tables::expected_vxlan(lab, ifindex, peers).unwrap()
}

/// Each node's VtepMAC as its own kernel holds it, checked against the lease it published.
pub fn vtep_macs(lab: &Lab) -> Vec<(String, MacAddr)> {
    lab.state
        .nodes
        .iter()
        .map(|n| {
            let t =
                read_tables(lab, &n.name).unwrap_or_else(|| panic!("{} has no flannel.1", n.name));
            assert_eq!(
                lab.published_vtep_mac(&n.name).unwrap(),
                Some(t.mac),
                "{}: the lease's VtepMAC is not flannel.1's MAC",
                n.name
            );
            (n.name.clone(), t.mac)
        })
        .collect()
}

/// Whether `node`'s tables hold exactly the triples for `peers` and nothing else of ours.
pub fn tables_match(lab: &Lab, node: &str, peers: &[(String, MacAddr)]) -> Result<Tables, String> {
    let Some(t) = read_tables(lab, node) else {
        return Err(format!("{node}: flannel.1 is missing"));
    };
    let peers: Vec<(&str, MacAddr)> = peers
        .iter()
        .filter(|(p, _)| p != node)
        .map(|(p, m)| (p.as_str(), *m))
        .collect();
    let (r, n, f) = expected(lab, node, t.ifindex, &peers);
    if t.routes != r || t.neighbours != n || t.fdb != f {
        return Err(format!(
            "{node}: tables differ\n routes     {:?}\n expected   {:?}\n neighbours {:?}\n expected   {:?}\n fdb        {:?}\n expected   {:?}",
            t.routes, r, t.neighbours, n, t.fdb, f
        ));
    }
    Ok(t)
}

/// Polls until `node`'s tables match `peers` exactly, or panics with the last difference.
pub fn wait_tables(lab: &Lab, node: &str, peers: &[(String, MacAddr)], within: Duration) -> Tables {
    let deadline = Instant::now() + within;
    loop {
        match tables_match(lab, node, peers) {
            Ok(t) => return t,
            Err(e) if Instant::now() >= deadline => panic!("after {within:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

pub fn in_node<R: Send>(lab: &Lab, node: &str, f: impl FnOnce(&mut Netlink) -> R + Send) -> R {
    lab.netns(node)
        .unwrap()
        .run(|| f(&mut Netlink::open().unwrap()))
        .unwrap()
}

pub fn pod_ip(lab: &Lab, pod: &str) -> Ipv4Addr {
    lab.pod(pod).unwrap().ip.expect("pod has an address").addr()
}

pub fn assert_ping(lab: &Lab, from: &str, to: Ipv4Addr, ttl: u8) {
    let mut p = Pinger::open_in(&lab.netns(from).unwrap()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(r) = p.echo(to, Duration::from_millis(500)).unwrap() {
            assert_eq!(r.ttl, ttl, "{from} -> {to}");
            return;
        }
        assert!(Instant::now() < deadline, "{from} -> {to}: no reply");
    }
}

/// Every pod pings every other pod: TTL 62 across nodes.
pub fn assert_pods_at_ttl_62(m: &lab::Matrix, pods: &[String]) {
    for a in pods {
        for b in pods {
            if a != b {
                assert!(
                    matches!(m.get(a, b), Some(Outcome::Ok { ttl: 62, .. })),
                    "{a} -> {b}: {:?}\n{}",
                    m.get(a, b),
                    m.render()
                );
            }
        }
    }
}

/// Polls the matrix until every pair answers (a new node's peers learn it
/// through their watch), or panics with the last matrix.
pub fn wait_matrix_green(lab: &Lab, within: Duration) -> lab::Matrix {
    let deadline = Instant::now() + within;
    loop {
        let m = lab.check().unwrap();
        if m.all_ok() {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "matrix not green after {within:?}:\n{}",
            m.render()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A monitor in each listed node's namespace, opened before whatever is
/// watched happens.
pub fn monitors(lab: &Lab, nodes: &[&str]) -> Vec<(String, Monitor)> {
    nodes
        .iter()
        .map(|n| {
            let mon = lab
                .netns(n)
                .unwrap()
                .run(|| Monitor::open().unwrap())
                .unwrap();
            (n.to_string(), mon)
        })
        .collect()
}

/// Every deletion of flannel's state (flannel.1, routes into the cluster
/// network, neighbours and FDB entries on flannel.1) the monitors saw so far.
pub fn deletions(lab: &Lab, mons: &mut [(String, Monitor)]) -> Vec<(String, Notification)> {
    let cluster = lab::cluster_network();
    let mut out = Vec::new();
    for (node, mon) in mons.iter_mut() {
        let ifindex = read_tables(lab, node)
            .unwrap_or_else(|| panic!("{node} has no flannel.1"))
            .ifindex;
        loop {
            let batch = mon.recv_timeout(Duration::from_millis(100)).unwrap();
            if batch.is_empty() {
                break;
            }
            out.extend(
                batch
                    .into_iter()
                    .filter(|n| match n {
                        Notification::Link { index, deleted, .. } => *deleted && *index == ifindex,
                        Notification::Route { dst, deleted, .. } => {
                            *deleted && matches!(dst, IpNet::V4(d) if cluster.contains(d))
                        }
                        Notification::Neighbour {
                            ifindex: i,
                            deleted,
                            ..
                        }
                        | Notification::Fdb {
                            ifindex: i,
                            deleted,
                            ..
                        } => *deleted && *i == ifindex,
                        Notification::Overrun => true,
                        _ => false,
                    })
                    .map(|n| (node.clone(), n)),
            );
        }
    }
    out
}

/// Pings `to` from `from` every 100 ms until stopped; returns (sent, lost).
pub fn ping_loop(
    lab: &Lab,
    from: &str,
    to: Ipv4Addr,
    stop: Arc<AtomicBool>,
) -> JoinHandle<(u32, Vec<u32>)> {
    let mut pinger = Pinger::open_in(&lab.netns(from).unwrap()).unwrap();
    std::thread::spawn(move || {
        let (mut sent, mut lost) = (0u32, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            let t0 = Instant::now();
            sent += 1;
            match pinger.echo(to, Duration::from_secs(1)).unwrap() {
                Some(r) => assert_eq!(r.ttl, 62, "ping {sent} came back with ttl {}", r.ttl),
                None => lost.push(sent),
            }
            if let Some(rest) = Duration::from_millis(100).checked_sub(t0.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        (sent, lost)
    })
}

/// The network namespaces whose names start with `prefix` (`ip netns
/// list`): what a bench or test run left behind.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&netns.stdout)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}
