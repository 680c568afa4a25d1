//! Helpers shared by the end-to-end test binaries: root check, unique lab
//! names, a guard that takes the lab down (also on panic), and reading back
//! what flannel manages in a node's kernel.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use flannel_core::datapath::{FdbEntry, Neighbour, Route};
use flannel_core::mac::MacAddr;
use flannel_netlink::Netlink;
use flannelctl::lab::{self, Lab, LabOptions, Pinger};
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

static COUNTER: AtomicU32 = AtomicU32::new(0);

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

/// Reads flannel.1 and everything of ours: routes into the cluster network
/// other than the node's own subnet, every route via flannel.1 (but the
/// kernel's IPv6 link-local one), permanent
/// neighbours and FDB entries on flannel.1. `None` when flannel.1 is missing.
pub fn read_tables(lab: &Lab, node: &str) -> Option<Tables> {
    let own = lab.node(node).unwrap().subnet;
    let cluster = lab::cluster_network();
    lab.netns(node)
        .unwrap()
        .run(|| {
            let mut nl = Netlink::open().unwrap();
            let link = nl.link_by_name("flannel.1").unwrap()?;
            let routes = nl
                .list_routes()
                .unwrap()
                .into_iter()
                .filter(|r| match r.dst {
                    IpNet::V4(d) => r.oif == link.index || (cluster.contains(&d) && d != own),
                    // The kernel's own fe80::/64 on every up device is not flannel's.
                    IpNet::V6(d) => {
                        r.oif == link.index && d.addr().segments()[0] & 0xffc0 != 0xfe80
                    }
                })
                .collect();
            Some(Tables {
                ifindex: link.index,
                mac: link.mac.expect("flannel.1 has a MAC"),
                routes,
                neighbours: nl
                    .list_neighbours(link.index)
                    .unwrap()
                    .into_iter()
                    .collect(),
                fdb: nl.list_fdb(link.index).unwrap().into_iter().collect(),
            })
        })
        .unwrap()
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
    let mut r = BTreeSet::new();
    let mut n = BTreeSet::new();
    let mut f = BTreeSet::new();
    for (peer, mac) in peers {
        let p = lab.node(peer).unwrap();
        let gw = IpAddr::V4(p.subnet.network());
        r.insert(Route {
            dst: IpNet::V4(p.subnet),
            gateway: Some(gw),
            oif: ifindex,
            onlink: true,
        });
        n.insert(Neighbour {
            ifindex,
            ip: gw,
            mac: *mac,
        });
        f.insert(FdbEntry {
            ifindex,
            mac: *mac,
            dst: IpAddr::V4(p.underlay_ip),
        });
    }
    (r, n, f)
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
