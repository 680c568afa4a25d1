//! Root integration tests: real `flanneld` processes in network namespaces.
//!
//! Topology per test: a "switch" namespace holding a bridge, and one
//! namespace per node joined to it by a veth pair (node side `eth0`,
//! 172.16.1.1N/24). Leases live in a temporary local-store directory. Every
//! namespace, process and directory is removed on drop, also on panic;
//! nothing touches the root namespace.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use flannel_core::datapath::{FdbEntry, Neighbour, Route};
use flannel_core::lease::{Lease, LeaseAttrs, LeaseKey, VxlanBackendData};
use flannel_core::mac::MacAddr;
use flannel_core::subnet_env::SubnetEnv;
use flannel_netlink::netns::ScopedNetNs;
use flannel_netlink::{Link, Netlink, Notification};
use flannel_store::{LocalStore, Store};
use ipnet::{IpNet, Ipv4Net};

mod common;
use common::{
    flanneld_in, our_nexthops, ping_in, read_log, require_root, wait_for, wait_log_quiet, TempDir,
};

const NETWORK: &str = "10.244.0.0/16";
// SubnetMax keeps random subnets below 10.244.200.0: tests inject stale or foreign
// subnets from 10.244.200.0 up, which must never be a node's own.
const CONFIG: &str =
    r#"{"Network": "10.244.0.0/16", "SubnetMax": "10.244.199.0", "Backend": {"Type": "vxlan"}}"#;

/// A flanneld process, killed (by PID) and reaped on drop.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }
    /// SIGTERM and wait for the exit status.
    fn stop(mut self) -> ExitStatus {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "flanneld did not exit within 10 s of SIGTERM; log:\n{}",
                    read_log(&self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().unwrap().try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Stops node 1, 2, ... in turn (SIGTERM) and asserts each exits cleanly.
fn stop_all(daemons: Vec<Daemon>) {
    for (i, dm) in daemons.into_iter().enumerate() {
        let st = dm.stop();
        assert!(st.success(), "node{} exit status {st:?}", i + 1);
    }
}

/// Runs flanneld in `ns` with `args`, stderr appended to `log`; returns the child.
fn spawn_in(ns: &ScopedNetNs, args: &[String], log: &Path) -> Child {
    let mut cmd = flanneld_in(ns, log);
    cmd.args(args);
    cmd.spawn().expect("spawn flanneld")
}

struct Node {
    name: String,
    ip: Ipv4Addr,
    dir: PathBuf,
    ns: ScopedNetNs,
}

impl Node {
    fn subnet_file(&self) -> PathBuf {
        self.dir.join("run/flannel/subnet.env")
    }
    fn log(&self) -> PathBuf {
        self.dir.join("flanneld.log")
    }
    fn nl<R: Send>(&self, f: impl FnOnce(&mut Netlink) -> R + Send) -> R {
        self.ns
            .run(|| {
                let mut nl = Netlink::open().expect("open netlink");
                f(&mut nl)
            })
            .expect("run in namespace")
    }
    fn subnet_env(&self) -> Option<SubnetEnv> {
        let t = fs::read_to_string(self.subnet_file()).ok()?;
        SubnetEnv::parse(&t).ok()
    }
    /// The lease subnet, once subnet.env exists.
    fn wait_subnet(&self, d: &mut Daemon) -> Ipv4Net {
        wait_for(
            &format!("{} subnet.env", self.name),
            Duration::from_secs(15),
            || {
                if !d.alive() {
                    panic!(
                        "flanneld on {} exited; log:\n{}",
                        self.name,
                        read_log(&self.log())
                    );
                }
                self.subnet_env()?.lease_key()?.ipv4
            },
        )
    }
    fn state(&self) -> Option<NodeState> {
        self.nl(|nl| {
            let link = nl.link_by_name("flannel.1").unwrap()?;
            let net: Ipv4Net = NETWORK.parse().unwrap();
            let mut routes: Vec<Route> = nl
                .list_routes()
                .unwrap()
                .into_iter()
                .filter(|r| {
                    matches!(r.dst, IpNet::V4(d) if net.contains(&d)) && r.oif == link.index
                })
                .collect();
            routes.sort();
            let mut neighbours = nl.list_neighbours(link.index).unwrap();
            neighbours.sort();
            let mut fdb = nl.list_fdb(link.index).unwrap();
            fdb.sort();
            let mut addrs = nl.list_addresses(link.index).unwrap();
            addrs.sort();
            let eth0 = nl.link_by_name("eth0").unwrap().unwrap().index;
            Some(NodeState {
                link,
                addrs,
                routes,
                neighbours,
                fdb,
                eth0,
            })
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeState {
    link: Link,
    addrs: Vec<IpNet>,
    routes: Vec<Route>,
    neighbours: Vec<Neighbour>,
    fdb: Vec<FdbEntry>,
    eth0: u32,
}

/// What a node must hold for its peers: (subnet, public ip, vtep mac).
fn expected(
    ifindex: u32,
    peers: &[(Ipv4Net, Ipv4Addr, MacAddr)],
) -> (Vec<Route>, Vec<Neighbour>, Vec<FdbEntry>) {
    let mut routes = Vec::new();
    let mut neigh = Vec::new();
    let mut fdb = Vec::new();
    for (subnet, ip, mac) in peers {
        let gw = IpAddr::V4(subnet.network());
        routes.push(Route {
            dst: IpNet::V4(*subnet),
            gateway: Some(gw),
            oif: ifindex,
            onlink: true,
        });
        neigh.push(Neighbour {
            ifindex,
            ip: gw,
            mac: *mac,
        });
        fdb.push(FdbEntry {
            ifindex,
            mac: *mac,
            dst: IpAddr::V4(*ip),
        });
    }
    routes.sort();
    neigh.sort();
    fdb.sort();
    (routes, neigh, fdb)
}

/// Switch namespace + nodes + store. Field order is drop order: daemons are
/// owned by the tests and dropped first; then nodes, switch, directory.
struct Cluster {
    nodes: Vec<Node>,
    switch: ScopedNetNs,
    store_dir: PathBuf,
    config: PathBuf,
    _tmp: TempDir,
}

impl Cluster {
    fn new(tag: &str, n: usize) -> Cluster {
        require_root();
        let tmp = TempDir::new(tag);
        let (switch, underlay) = common::underlay("fdit", n, Some("172.16.1.1/24"));
        let mut nodes = Vec::new();
        for (idx, (ns, ip)) in underlay.into_iter().enumerate() {
            let i = idx + 1;
            let dir = tmp.0.join(format!("node{i}"));
            fs::create_dir_all(&dir).unwrap();
            nodes.push(Node {
                name: format!("node{i}"),
                ip,
                dir,
                ns,
            });
        }
        let config = tmp.0.join("net-conf.json");
        fs::write(&config, CONFIG).unwrap();
        let store_dir = tmp.0.join("store");
        Cluster {
            nodes,
            switch,
            store_dir,
            config,
            _tmp: tmp,
        }
    }

    fn args(&self, i: usize, extra: &[&str]) -> Vec<String> {
        let node = &self.nodes[i];
        let mut a: Vec<String> = [
            "--iface",
            "eth0",
            "--local-store",
            self.store_dir.to_str().unwrap(),
            "--net-config-path",
            self.config.to_str().unwrap(),
            "--subnet-file",
            node.subnet_file().to_str().unwrap(),
            "--resync-interval",
            "30",
            "--log-level",
            "debug",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    fn start(&self, i: usize, extra: &[&str]) -> Daemon {
        let node = &self.nodes[i];
        let child = spawn_in(&node.ns, &self.args(i, extra), &node.log());
        Daemon {
            child: Some(child),
            log: node.log(),
        }
    }

    fn leases(&self) -> Vec<Lease> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = LocalStore::open(&self.store_dir).unwrap();
            store.list_leases().await.unwrap().leases
        })
    }

    fn delete_lease(&self, key: LeaseKey) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = LocalStore::open(&self.store_dir).unwrap();
            store.delete_lease(&key).await.unwrap();
        })
    }

    /// Writes a vxlan lease file straight into the store (a reservation),
    /// as a hand edit or another tool would: unlike `create_lease` it
    /// bypasses every check, so it can put hostile entries there.
    fn put_raw_lease(&self, key: &str, public_ip: &str, vtep_mac: &str) {
        let attrs = LeaseAttrs::new_vxlan(
            Some(public_ip.parse().unwrap()),
            Some(VxlanBackendData {
                vni: 1,
                vtep_mac: vtep_mac.parse().unwrap(),
            }),
            None,
            None,
        );
        let record = format!(
            r#"{{"LeaseAttrs":{},"ExpiresUnixMs":null}}"#,
            attrs.to_json()
        );
        let dir = self.store_dir.join("subnets");
        let tmp = dir.join(format!(".tmp.test.{key}"));
        fs::write(&tmp, record).unwrap();
        fs::rename(&tmp, dir.join(key)).unwrap();
    }

    /// Starts nodes 1 and 2 and waits until node 1 holds node 2's triple;
    /// returns both daemons and node 2's (subnet, public ip, vtep mac).
    fn start_two(&self) -> (Daemon, Daemon, Vec<(Ipv4Net, Ipv4Addr, MacAddr)>) {
        let mut d0 = self.start(0, &[]);
        let mut d1 = self.start(1, &[]);
        self.nodes[0].wait_subnet(&mut d0);
        let s1 = self.nodes[1].wait_subnet(&mut d1);
        let peers0 = self.peers_of(&[s1]);
        self.wait_programmed(0, &peers0, Duration::from_secs(10));
        (d0, d1, peers0)
    }

    /// (subnet, public ip, vtep mac) of every node, from the store.
    fn peers_of(&self, subnets: &[Ipv4Net]) -> Vec<(Ipv4Net, Ipv4Addr, MacAddr)> {
        let leases = self.leases();
        subnets
            .iter()
            .map(|s| {
                let l = leases
                    .iter()
                    .find(|l| l.key.ipv4 == Some(*s))
                    .unwrap_or_else(|| panic!("no lease for {s} in {leases:?}"));
                (
                    *s,
                    l.attrs.public_ip.unwrap(),
                    l.attrs.vxlan_data().unwrap().vtep_mac,
                )
            })
            .collect()
    }

    /// Waits until node `i` holds exactly the triples for `peers`.
    fn wait_programmed(
        &self,
        i: usize,
        peers: &[(Ipv4Net, Ipv4Addr, MacAddr)],
        timeout: Duration,
    ) -> NodeState {
        let node = &self.nodes[i];
        let mut last = None;
        let start = Instant::now();
        loop {
            if let Some(st) = node.state() {
                let (r, n, f) = expected(st.link.index, peers);
                if st.routes == r && st.neighbours == n && st.fdb == f {
                    return st;
                }
                last = Some(st);
            }
            if start.elapsed() > timeout {
                panic!(
                    "{} not programmed for {peers:?} within {timeout:?}; last state {last:#?}\nlog:\n{}",
                    node.name,
                    read_log(&node.log())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn ping(node: &Node, dst: &str) -> bool {
    ping_in(&node.ns.name, None, dst.parse().expect("an IP address"))
}

#[test]
fn three_nodes_program_the_upstream_datapath_and_repair_drift() {
    let c = Cluster::new("drift", 3);
    let mut d: Vec<Daemon> = (0..3)
        .map(|i| c.start(i, if i == 2 { &["--ip-masq"] } else { &[] }))
        .collect();
    let subnets: Vec<Ipv4Net> = (0..3).map(|i| c.nodes[i].wait_subnet(&mut d[i])).collect();
    let mut uniq = subnets.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 3, "distinct subnets: {subnets:?}");
    let all = c.peers_of(&subnets);

    for i in 0..3 {
        let node = &c.nodes[i];
        let peers: Vec<_> = all.iter().filter(|p| p.0 != subnets[i]).cloned().collect();
        let st = c.wait_programmed(i, &peers, Duration::from_secs(10));
        // The device exactly as upstream.
        let vx = st.link.vxlan.clone().expect("vxlan attributes");
        assert_eq!(st.link.kind.as_deref(), Some("vxlan"));
        assert_eq!(vx.vni, 1);
        assert_eq!(vx.local, Some(IpAddr::V4(node.ip)));
        assert_eq!(vx.link, Some(st.eth0));
        assert_eq!(vx.port, 8472);
        assert!(!vx.learning, "nolearning");
        assert!(!vx.gbp);
        assert_eq!(st.link.mtu, 1450);
        assert!(st.link.up);
        assert_eq!(
            st.addrs,
            vec![IpNet::V4(Ipv4Net::new(subnets[i].network(), 32).unwrap())]
        );
        // The published VtepMAC is the device's.
        assert_eq!(st.link.mac, Some(all[i].2));
        // subnet.env, byte for byte.
        let first = Ipv4Addr::from(u32::from(subnets[i].network()) + 1);
        assert_eq!(
            fs::read_to_string(node.subnet_file()).unwrap(),
            format!(
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={first}/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ={}\n",
                i == 2
            )
        );
    }

    // Real traffic through the overlay: node1 pings node2's and node3's VTEP addresses.
    for j in [1, 2] {
        let dst = subnets[j].network().to_string();
        wait_for(
            &format!("ping {dst} from node1"),
            Duration::from_secs(10),
            || ping(&c.nodes[0], &dst).then_some(()),
        );
    }

    // Drift on node1: each kind of entry comes back within a few seconds
    // (far below --resync-interval 30: the netlink monitor drives the repair).
    let peers0: Vec<_> = all.iter().filter(|p| p.0 != subnets[0]).cloned().collect();
    let st = c.nodes[0].state().unwrap();
    let victim_route = st.routes[0].clone();
    c.nodes[0].nl(|nl| nl.del_route(&victim_route).unwrap());
    c.wait_programmed(0, &peers0, Duration::from_secs(5));
    let victim_neigh = st.neighbours[1].clone();
    c.nodes[0].nl(|nl| nl.del_neighbour(&victim_neigh).unwrap());
    c.wait_programmed(0, &peers0, Duration::from_secs(5));
    let victim_fdb = st.fdb[0].clone();
    c.nodes[0].nl(|nl| nl.del_fdb(&victim_fdb).unwrap());
    c.wait_programmed(0, &peers0, Duration::from_secs(5));
    // A stray entry of ours that no lease justifies is removed.
    let stray = Route {
        dst: "10.244.250.0/24".parse().unwrap(),
        gateway: Some("10.244.250.0".parse().unwrap()),
        oif: st.link.index,
        onlink: true,
    };
    c.nodes[0].nl(|nl| nl.replace_route(&stray).unwrap());
    c.wait_programmed(0, &peers0, Duration::from_secs(5));

    // The whole device: recreated with the same MAC and every peer.
    let old = c.nodes[0].state().unwrap();
    c.nodes[0].nl(|nl| nl.del_link(old.link.index).unwrap());
    let new = c.wait_programmed(0, &peers0, Duration::from_secs(5));
    assert_eq!(new.link.mac, old.link.mac, "VtepMAC kept across recreation");
    assert_eq!(new.addrs, old.addrs);
    assert_eq!(new.link.mtu, 1450);
    assert!(new.link.up);
    let dst = subnets[1].network().to_string();
    wait_for(
        "ping after device recreation",
        Duration::from_secs(10),
        || ping(&c.nodes[0], &dst).then_some(()),
    );

    stop_all(d);
}

#[test]
fn restart_changes_nothing_and_sigterm_leaves_everything_in_place() {
    let c = Cluster::new("restart", 2);
    let mut d0 = c.start(0, &[]);
    let mut d1 = c.start(1, &[]);
    let s0 = c.nodes[0].wait_subnet(&mut d0);
    let s1 = c.nodes[1].wait_subnet(&mut d1);
    let peers0 = c.peers_of(&[s1]);
    let before = c.wait_programmed(0, &peers0, Duration::from_secs(10));
    let env_before = fs::read_to_string(c.nodes[0].subnet_file()).unwrap();

    // Let the kernel finish its own follow-ups of the device creation (IPv6
    // link-local DAD completes ~1 s after up and is announced as an address
    // change) so that only the restart is observed.
    std::thread::sleep(Duration::from_secs(3));
    // Watch node1's kernel for any change while flanneld stops and restarts.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<Notification>>();
    let stop_watch = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sw = stop_watch.clone();
    let ns_name = c.nodes[0].ns.name.clone();
    let watcher = std::thread::spawn(move || {
        let ns = flannel_netlink::netns::NetNs::open(&ns_name).unwrap();
        ns.run(|| {
            let mut mon = flannel_netlink::Monitor::open().unwrap();
            while !sw.load(Ordering::SeqCst) {
                if let Ok(n) = mon.recv_timeout(Duration::from_millis(200)) {
                    if !n.is_empty() {
                        let _ = tx.send(n);
                    }
                }
            }
        })
        .unwrap();
    });
    std::thread::sleep(Duration::from_millis(300));

    let st = d0.stop();
    assert!(st.success(), "SIGTERM exit status {st:?}");
    // Lease, device, routes and subnet.env stay.
    assert!(c.leases().iter().any(|l| l.key.ipv4 == Some(s0)));
    assert_eq!(c.nodes[0].state().as_ref(), Some(&before));
    assert_eq!(
        fs::read_to_string(c.nodes[0].subnet_file()).unwrap(),
        env_before
    );

    let mut d0 = c.start(0, &[]);
    // Wait for the restarted daemon's first pass to be done.
    wait_for(
        "restarted daemon programmed",
        Duration::from_secs(15),
        || {
            assert!(
                d0.alive(),
                "restarted flanneld exited:\n{}",
                read_log(&c.nodes[0].log())
            );
            read_log(&c.nodes[0].log())
                .matches("datapath programmed")
                .nth(1)
                .map(|_| ())
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let after = c.nodes[0].state().unwrap();
    assert_eq!(
        after, before,
        "same ifindex, MAC, address, routes, neighbours, FDB"
    );
    assert_eq!(
        fs::read_to_string(c.nodes[0].subnet_file()).unwrap(),
        env_before
    );
    let log = read_log(&c.nodes[0].log());
    let second_run = log.split("using external interface").nth(2).unwrap_or("");
    assert!(
        second_run.contains("datapath programmed ifindex=") && second_run.contains("changes=0"),
        "restart pass made no kernel writes:\n{log}"
    );
    let changes: Vec<&str> = second_run
        .lines()
        .filter(|l| l.contains(" INFO ") && l.contains("flanneld::reconcile:"))
        .collect();
    assert!(
        changes.is_empty(),
        "restart changed the kernel: {changes:#?}"
    );

    stop_watch.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    let seen: Vec<Notification> = rx.try_iter().flatten().collect();
    let dev = before.link.index;
    let touched: Vec<&Notification> = seen
        .iter()
        .filter(|n| match n {
            Notification::Link { index, .. } | Notification::Address { index, .. } => *index == dev,
            Notification::Neighbour { ifindex, .. } | Notification::Fdb { ifindex, .. } => {
                *ifindex == dev
            }
            Notification::Route { dst, .. } => *dst == before.routes[0].dst,
            _ => false,
        })
        .collect();
    assert!(
        touched.is_empty(),
        "restart touched the datapath: {touched:?}"
    );

    assert!(d0.stop().success());
    assert!(d1.stop().success());
}

#[test]
fn stale_peers_are_removed_at_start_and_own_lease_is_reacquired() {
    let c = Cluster::new("stale", 2);
    let mut d0 = c.start(0, &[]);
    let mut d1 = c.start(1, &[]);
    let s0 = c.nodes[0].wait_subnet(&mut d0);
    let s1 = c.nodes[1].wait_subnet(&mut d1);
    c.wait_programmed(0, &c.peers_of(&[s1]), Duration::from_secs(10));

    // Our own lease deleted under a running daemon: re-acquired (same subnet),
    // datapath kept.
    let own_key = c
        .leases()
        .iter()
        .find(|l| l.key.ipv4 == Some(s0))
        .unwrap()
        .key;
    c.delete_lease(own_key);
    wait_for("own lease re-acquired", Duration::from_secs(10), || {
        c.leases()
            .iter()
            .any(|l| l.key.ipv4 == Some(s0))
            .then_some(())
    });
    assert!(d0.alive());
    c.wait_programmed(0, &c.peers_of(&[s1]), Duration::from_secs(5));

    // node2 vanishes while node1's daemon is down: node1 cleans up at start.
    assert!(d0.stop().success());
    assert!(d1.stop().success());
    let key1 = c
        .leases()
        .iter()
        .find(|l| l.key.ipv4 == Some(s1))
        .unwrap()
        .key;
    c.delete_lease(key1);
    assert_eq!(
        c.nodes[0].state().unwrap().routes.len(),
        1,
        "the stale route is still there before the restart"
    );
    let mut d0 = c.start(0, &[]);
    assert_eq!(c.nodes[0].wait_subnet(&mut d0), s0);
    c.wait_programmed(0, &[], Duration::from_secs(10));
    assert!(d0.stop().success());
}

#[test]
fn invalid_input_exits_nonzero_naming_the_field_before_touching_the_kernel() {
    let c = Cluster::new("invalid", 1);
    let node = &c.nodes[0];
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            r#"{"Network": "10.244.0.0/16", "SubnetLen": 31}"#,
            c.args(0, &[]),
            "SubnetLen",
        ),
        (
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 16777216}}"#,
            c.args(0, &[]),
            "VNI",
        ),
        (
            r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/56", "Backend": {"Type": "udp"}}"#,
            c.args(0, &[]),
            "IPv4 only",
        ),
        (r#"{"Network": "10.244.0.0/16""#, c.args(0, &[]), "JSON"),
        (
            CONFIG,
            c.args(0, &["--iface", "nope0"])
                .into_iter()
                .filter(|a| a != "eth0")
                .collect(),
            "--iface",
        ),
    ];
    for (cfg, args, needle) in cases {
        fs::write(&c.config, cfg).unwrap();
        let _ = fs::remove_file(node.log());
        let mut child = spawn_in(&node.ns, &args, &node.log());
        let st = wait_for("flanneld to exit", Duration::from_secs(10), || {
            child.try_wait().unwrap()
        });
        let log = read_log(&node.log());
        assert!(!st.success(), "config {cfg} must fail; log:\n{log}");
        assert!(
            log.contains(needle),
            "error for {cfg} must name {needle:?}:\n{log}"
        );
        assert!(node.state().is_none(), "no device may be created for {cfg}");
        assert!(!node.subnet_file().exists(), "no subnet.env for {cfg}");
    }
    // Flags refused before anything is written: the Kubernetes subnet
    // manager (not implemented yet) and a malformed etcd prefix.
    fs::write(&c.config, CONFIG).unwrap();
    let without_store = |extra: &[&str]| {
        let mut args: Vec<String> = c.args(0, extra);
        let pos = args.iter().position(|a| a == "--local-store").unwrap();
        args.drain(pos..pos + 2);
        args
    };
    for (args, needle) in [
        (
            c.args(0, &["--kube-subnet-mgr"]),
            "--kube-subnet-mgr and --local-store both name a lease store",
        ),
        (
            without_store(&["--kube-subnet-mgr"]),
            "POD_NAME and POD_NAMESPACE must be set",
        ),
        (
            without_store(&["--etcd-prefix", "no-slash"]),
            "--etcd-prefix",
        ),
    ] {
        let _ = fs::remove_file(node.log());
        let mut child = spawn_in(&node.ns, &args, &node.log());
        let st = wait_for("flanneld to exit", Duration::from_secs(10), || {
            child.try_wait().unwrap()
        });
        assert!(!st.success());
        let log = read_log(&node.log());
        assert!(log.contains(needle), "{needle}: {log}");
        assert!(node.state().is_none());
    }
    // And nothing leased either.
    assert!(c.leases().is_empty() || !c.store_dir.exists());
}

#[test]
fn direct_routing_routes_connected_peers_without_encapsulation() {
    let c = Cluster::new("direct", 2);
    fs::write(
        &c.config,
        r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": true}}"#,
    )
    .unwrap();
    let mut d0 = c.start(0, &[]);
    let mut d1 = c.start(1, &[]);
    let _s0 = c.nodes[0].wait_subnet(&mut d0);
    let s1 = c.nodes[1].wait_subnet(&mut d1);
    let want = Route {
        dst: IpNet::V4(s1),
        gateway: Some(IpAddr::V4(c.nodes[1].ip)),
        oif: c.nodes[0].state().unwrap().eth0,
        onlink: false,
    };
    wait_for("direct route on node1", Duration::from_secs(10), || {
        let routes = c.nodes[0].nl(|nl| nl.list_routes().unwrap());
        routes.contains(&want).then_some(())
    });
    let st = c.nodes[0].state().unwrap();
    assert!(st.routes.is_empty(), "no route through flannel.1: {st:?}");
    assert!(st.neighbours.is_empty() && st.fdb.is_empty(), "{st:?}");
    // Drift repair covers the direct route too.
    c.nodes[0].nl(|nl| nl.del_route(&want).unwrap());
    wait_for("direct route restored", Duration::from_secs(5), || {
        let routes = c.nodes[0].nl(|nl| nl.list_routes().unwrap());
        routes.contains(&want).then_some(())
    });
    // eth0 down and at once up again: the kernel drops the direct route
    // with it, silently; only eth0's link notifications tell, and flanneld
    // finds the route gone when it looks one up (`ip route get`). First the
    // full pass that followed the repair above and the one that flannel.1's
    // IPv6 address starts when it settles (duplicate address detection, a
    // second or two after the device came up) have to be over: either would
    // put the route back by itself, and the periodic resync is far off.
    wait_log_quiet(&c.nodes[0].log(), Duration::from_secs(2));
    let eth0 = want.oif;
    c.nodes[0].nl(|nl| {
        nl.set_link_down(eth0).unwrap();
        assert!(
            !nl.list_routes().unwrap().contains(&want),
            "the kernel dropped the route with eth0"
        );
        nl.set_link_up(eth0).unwrap();
    });

    wait_for(
        "direct route back after eth0 down and up",
        Duration::from_secs(3),
        || {
            let routes = c.nodes[0].nl(|nl| nl.list_routes().unwrap());
            routes.contains(&want).then_some(())
        },
    );

    let dst = s1.network().to_string();
    wait_for(
        "ping over the direct route",
        Duration::from_secs(10),
        || ping(&c.nodes[0], &dst).then_some(()),
    );
    assert!(d0.stop().success());
    assert!(d1.stop().success());
}

#[test]
fn short_lease_is_renewed_before_it_expires() {
    let c = Cluster::new("renew", 2);
    // A 4 s lease: the renew margin (>= 1 min) is capped at half the TTL,
    // so node1 renews about every 2 s.
    let mut d0 = c.start(0, &["--lease-ttl", "4"]);
    let mut d1 = c.start(1, &[]);
    let s0 = c.nodes[0].wait_subnet(&mut d0);
    let _s1 = c.nodes[1].wait_subnet(&mut d1);
    let exp0 = c
        .leases()
        .into_iter()
        .find(|l| l.key.ipv4 == Some(s0))
        .unwrap()
        .expiration
        .expect("a lease with a TTL");
    let peers1 = c.peers_of(&[s0]);
    // Three lifetimes later the lease is still held, with a later expiry,
    // and node2 never lost its route to node1.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(12) {
        assert!(
            c.leases().iter().any(|l| l.key.ipv4 == Some(s0)),
            "node1's lease lapsed; log:\n{}",
            read_log(&c.nodes[0].log())
        );
        let st = c.nodes[1].state().unwrap();
        assert_eq!(st.routes.len(), 1, "node2 lost node1's route: {st:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let exp_now = c
        .leases()
        .into_iter()
        .find(|l| l.key.ipv4 == Some(s0))
        .unwrap()
        .expiration
        .unwrap();
    assert!(
        exp_now > exp0 + Duration::from_secs(6),
        "{exp0:?} -> {exp_now:?}"
    );
    let log = read_log(&c.nodes[0].log());
    assert!(log.matches("renewed lease").count() >= 3, "{log}");
    assert!(
        !log.contains("re-acquir"),
        "renewal must not lose the lease:\n{log}"
    );
    c.wait_programmed(1, &peers1, Duration::from_secs(1));
    assert!(d0.stop().success());
    assert!(d1.stop().success());
}

/// A throwaway etcd serving on the switch's address 172.16.1.1:2379 inside
/// the switch namespace; killed by PID on drop.
struct SwitchEtcd {
    _child: Daemon,
    endpoint: String,
    ns_name: String,
}

impl SwitchEtcd {
    /// Starts etcd and waits until it answers.
    fn start(c: &Cluster) -> SwitchEtcd {
        let e = SwitchEtcd::spawn(c);
        wait_for("etcd to answer", Duration::from_secs(20), || {
            e.with_store(|_| async {}).ok()
        });
        e
    }

    /// Starts etcd without waiting for it to answer.
    fn spawn(c: &Cluster) -> SwitchEtcd {
        let data = c._tmp.0.join("etcd-data");
        let log = c._tmp.0.join("etcd.log");
        let endpoint = "http://172.16.1.1:2379".to_string();
        let args: Vec<String> = [
            "--name",
            "t",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-client-urls",
            &endpoint,
            "--advertise-client-urls",
            &endpoint,
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "t=http://127.0.0.1:2380",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        SwitchEtcd {
            _child: spawn_etcd(&c.switch, &args, log),
            endpoint,
            ns_name: c.switch.name.clone(),
        }
    }

    /// Runs `f` with a store client, from a thread inside the switch namespace.
    fn with_store<F, Fut, R>(&self, f: F) -> Result<R, String>
    where
        F: FnOnce(flannel_store::etcd::EtcdStore) -> Fut + Send,
        Fut: std::future::Future<Output = R>,
        R: Send,
    {
        etcd_with_store(&self.ns_name, vec![self.endpoint.clone()], f)
    }
}

/// Runs `etcd` with `args` inside `ns` (stdout and stderr to `log`); killed
/// by PID on drop of the returned guard.
fn spawn_etcd(ns: &ScopedNetNs, args: &[String], log: PathBuf) -> Daemon {
    let logf = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let fd = ns.fd().as_raw_fd();
    let mut cmd = Command::new("etcd");
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf);
    // SAFETY: only setns(2) and prctl(2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = BorrowedFd::borrow_raw(fd);
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .expect("spawn etcd (Debian package etcd-server)");
    Daemon {
        child: Some(child),
        log,
    }
}

/// Runs `f` with a store client on `endpoints`, from a thread inside the
/// namespace `ns_name`.
fn etcd_with_store<F, Fut, R>(ns_name: &str, endpoints: Vec<String>, f: F) -> Result<R, String>
where
    F: FnOnce(flannel_store::etcd::EtcdStore) -> Fut + Send,
    Fut: std::future::Future<Output = R>,
    R: Send,
{
    let opts = flannel_store::etcd::EtcdOptions {
        endpoints,
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let ns = flannel_netlink::netns::NetNs::open(ns_name).map_err(|e| e.to_string())?;
    ns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = flannel_store::etcd::EtcdStore::connect(opts)
                .await
                .map_err(|e| e.to_string())?;
            Ok(f(store).await)
        })
    })
    .map_err(|e| e.to_string())?
}

/// A 3-member etcd cluster, each member in its own namespace joined to the
/// switch's bridge (member i at 172.16.1.2i). Field order is drop order:
/// the members are killed by PID before their namespaces go.
struct EtcdCluster {
    members: Vec<Daemon>,
    _ns: Vec<ScopedNetNs>,
    ips: Vec<Ipv4Addr>,
    switch_name: String,
}

impl EtcdCluster {
    fn start(c: &Cluster) -> EtcdCluster {
        let ips: Vec<Ipv4Addr> = (1..=3).map(|i| Ipv4Addr::new(172, 16, 1, 20 + i)).collect();
        let initial = (0..3)
            .map(|i| format!("m{}=http://{}:2380", i + 1, ips[i]))
            .collect::<Vec<_>>()
            .join(",");
        let mut nss = Vec::new();
        let mut members = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            let ns = ScopedNetNs::unique(&format!("fdit-e{}", i + 1)).unwrap();
            c.switch
                .run(|| {
                    let mut nl = Netlink::open().unwrap();
                    let br = nl.link_by_name("br0").unwrap().unwrap();
                    let host = nl
                        .add_veth(&format!("e{}", i + 1), "eth0", ns.fd(), Some(1500))
                        .unwrap();
                    nl.set_link_master(host.index, br.index).unwrap();
                    nl.set_link_up(host.index).unwrap();
                })
                .unwrap();
            ns.run(|| {
                let mut nl = Netlink::open().unwrap();
                let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
                nl.add_address(eth0.index, IpNet::V4(Ipv4Net::new(*ip, 24).unwrap()))
                    .unwrap();
                nl.set_link_up(eth0.index).unwrap();
            })
            .unwrap();
            let peer = format!("http://{ip}:2380");
            let client = format!("http://{ip}:2379");
            let args: Vec<String> = [
                "--name",
                &format!("m{}", i + 1),
                "--data-dir",
                c._tmp.0.join(format!("etcd-m{}", i + 1)).to_str().unwrap(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let log = c._tmp.0.join(format!("etcd-m{}.log", i + 1));
            members.push(spawn_etcd(&ns, &args, log));
            nss.push(ns);
        }
        let e = EtcdCluster {
            members,
            _ns: nss,
            ips,
            switch_name: c.switch.name.clone(),
        };
        wait_for(
            "the etcd cluster to answer",
            Duration::from_secs(20),
            || e.with_store(|_| async {}).ok(),
        );
        e
    }

    fn endpoints(&self) -> Vec<String> {
        self.ips
            .iter()
            .map(|ip| format!("http://{ip}:2379"))
            .collect()
    }

    /// Runs `f` with a client on all members, from the switch namespace.
    fn with_store<F, Fut, R>(&self, f: F) -> Result<R, String>
    where
        F: FnOnce(flannel_store::etcd::EtcdStore) -> Fut + Send,
        Fut: std::future::Future<Output = R>,
        R: Send,
    {
        etcd_with_store(&self.switch_name, self.endpoints(), f)
    }

    /// Index of the member that is the raft leader.
    fn leader(&self) -> usize {
        wait_for("an etcd leader", Duration::from_secs(10), || {
            self.endpoints().into_iter().position(|ep| {
                etcd_with_store(&self.switch_name, vec![ep], |s| async move {
                    let st = s.client().status().await.ok()?;
                    Some(st.leader() != 0 && st.header()?.member_id() == st.leader())
                })
                .ok()
                .flatten()
                .unwrap_or(false)
            })
        })
    }

    /// SIGKILLs member `i` by PID (reaped when the guard drops).
    fn kill(&self, i: usize) {
        let pid = self.members[i].pid();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    }
}

#[test]
fn etcd_store_shared_by_two_nodes() {
    let c = Cluster::new("etcd", 2);
    let etcd = SwitchEtcd::start(&c);
    // Missing <prefix>/config: a clear error naming the key, nothing written,
    // and flanneld waits for it instead of exiting.
    let etcd_args = |i: usize| -> Vec<String> {
        let mut a = c.args(i, &["--etcd-endpoints", &etcd.endpoint]);
        let pos = a.iter().position(|x| x == "--local-store").unwrap();
        a.drain(pos..pos + 2);
        a
    };
    let mut early = Daemon {
        child: Some(spawn_in(&c.nodes[0].ns, &etcd_args(0), &c.nodes[0].log())),
        log: c.nodes[0].log(),
    };
    wait_for("the missing-config error", Duration::from_secs(15), || {
        read_log(&c.nodes[0].log())
            .contains("/coreos.com/network/config")
            .then_some(())
    });
    // A config that fails validation: logged, still waiting, nothing written.
    etcd.with_store(|s| async move {
        let mut client = s.client();
        client
            .put(
                "/coreos.com/network/config",
                r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#,
                None,
            )
            .await
            .unwrap();
    })
    .unwrap();
    wait_for("the invalid-config error", Duration::from_secs(15), || {
        read_log(&c.nodes[0].log())
            .contains("SubnetLen")
            .then_some(())
    });
    assert!(
        early.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "flanneld must wait for a valid config, not exit"
    );
    assert!(c.nodes[0].state().is_none());

    etcd.with_store(|s| async move {
        let mut client = s.client();
        client
            .put("/coreos.com/network/config", CONFIG, None)
            .await
            .unwrap();
    })
    .unwrap();
    // The waiting daemon picks the config up by itself.
    c.nodes[0].wait_subnet(&mut early);
    assert!(early.stop().success());
    let mut d: Vec<Daemon> = (0..2)
        .map(|i| Daemon {
            child: Some(spawn_in(&c.nodes[i].ns, &etcd_args(i), &c.nodes[i].log())),
            log: c.nodes[i].log(),
        })
        .collect();
    let s0 = c.nodes[0].wait_subnet(&mut d[0]);
    let s1 = c.nodes[1].wait_subnet(&mut d[1]);
    assert_ne!(s0, s1);
    let leases = etcd
        .with_store(|s| async move { s.list_leases().await.unwrap().leases })
        .unwrap();
    let peer = |sub: Ipv4Net| {
        let l = leases.iter().find(|l| l.key.ipv4 == Some(sub)).unwrap();
        (
            sub,
            l.attrs.public_ip.unwrap(),
            l.attrs.vxlan_data().unwrap().vtep_mac,
        )
    };
    c.wait_programmed(0, &[peer(s1)], Duration::from_secs(10));
    c.wait_programmed(1, &[peer(s0)], Duration::from_secs(10));
    let dst = s1.network().to_string();
    wait_for("ping through the overlay", Duration::from_secs(10), || {
        ping(&c.nodes[0], &dst).then_some(())
    });
    for dm in d.drain(..) {
        assert!(dm.stop().success());
    }
}

/// Issue 3: a 3-member etcd cluster (three etcd processes in three
/// namespaces) losing one member, its leader, has no effect on flanneld:
/// daemons stay up, kernel state is unchanged, the overlay still carries
/// traffic, and a node joining afterwards is still programmed by the others.
#[test]
fn etcd_cluster_losing_a_member_does_not_affect_flanneld() {
    let c = Cluster::new("etcd3", 3);
    let etcd = EtcdCluster::start(&c);
    etcd.with_store(|s| async move {
        s.client()
            .put("/coreos.com/network/config", CONFIG, None)
            .await
            .unwrap();
    })
    .unwrap();
    let endpoints = etcd.endpoints().join(",");
    let start = |i: usize| -> Daemon {
        let mut a = c.args(i, &["--etcd-endpoints", &endpoints]);
        let pos = a.iter().position(|x| x == "--local-store").unwrap();
        a.drain(pos..pos + 2);
        Daemon {
            child: Some(spawn_in(&c.nodes[i].ns, &a, &c.nodes[i].log())),
            log: c.nodes[i].log(),
        }
    };
    let peers = |subnets: &[Ipv4Net]| -> Vec<(Ipv4Net, Ipv4Addr, MacAddr)> {
        let leases = etcd
            .with_store(|s| async move { s.list_leases().await.unwrap().leases })
            .unwrap();
        subnets
            .iter()
            .map(|sub| {
                let l = leases.iter().find(|l| l.key.ipv4 == Some(*sub)).unwrap();
                (
                    *sub,
                    l.attrs.public_ip.unwrap(),
                    l.attrs.vxlan_data().unwrap().vtep_mac,
                )
            })
            .collect()
    };
    let mut d: Vec<Daemon> = (0..2).map(start).collect();
    let s0 = c.nodes[0].wait_subnet(&mut d[0]);
    let s1 = c.nodes[1].wait_subnet(&mut d[1]);
    assert_ne!(s0, s1);
    c.wait_programmed(0, &peers(&[s1]), Duration::from_secs(10));
    c.wait_programmed(1, &peers(&[s0]), Duration::from_secs(10));
    let dst = s1.network().to_string();
    wait_for("ping through the overlay", Duration::from_secs(10), || {
        ping(&c.nodes[0], &dst).then_some(())
    });
    let before: Vec<NodeState> = (0..2).map(|i| c.nodes[i].state().unwrap()).collect();

    let leader = etcd.leader();
    etcd.kill(leader);
    // Give the cluster time to elect a new leader and the daemons time to
    // notice anything they were going to notice.
    std::thread::sleep(Duration::from_secs(3));
    for (i, dm) in d.iter_mut().enumerate() {
        assert!(
            dm.alive(),
            "flanneld on {} exited after losing etcd member m{}; log:\n{}",
            c.nodes[i].name,
            leader + 1,
            read_log(&c.nodes[i].log())
        );
        assert_eq!(
            c.nodes[i].state().unwrap(),
            before[i],
            "{}",
            c.nodes[i].name
        );
    }
    assert!(
        ping(&c.nodes[0], &dst),
        "overlay ping after losing a member"
    );

    // A change still propagates through the two remaining members.
    let mut d2 = start(2);
    let s2 = c.nodes[2].wait_subnet(&mut d2);
    let all = peers(&[s0, s1, s2]);
    c.wait_programmed(0, &[all[1], all[2]], Duration::from_secs(15));
    c.wait_programmed(1, &[all[0], all[2]], Duration::from_secs(15));
    c.wait_programmed(2, &[all[0], all[1]], Duration::from_secs(15));
    let dst2 = s2.network().to_string();
    wait_for("ping to the new node", Duration::from_secs(10), || {
        ping(&c.nodes[0], &dst2).then_some(())
    });
    for dm in d.drain(..).chain([d2]) {
        assert!(dm.stop().success());
    }
}

/// flanneld started before its etcd (a node booting faster than the control
/// plane) keeps retrying instead of exiting, and joins once etcd is up.
#[test]
fn flanneld_started_before_etcd_retries_then_joins() {
    const RETRY: &str = "etcd not reachable yet; retrying";
    let c = Cluster::new("etcdlate", 2);
    // SwitchEtcd's address; nothing listens there until `SwitchEtcd::start`.
    let endpoint = "http://172.16.1.1:2379";
    let args = |i: usize| -> Vec<String> {
        let mut a = c.args(i, &["--etcd-endpoints", endpoint]);
        let pos = a.iter().position(|x| x == "--local-store").unwrap();
        a.drain(pos..pos + 2);
        a
    };
    let mut d: Vec<Daemon> = (0..2)
        .map(|i| Daemon {
            child: Some(spawn_in(&c.nodes[i].ns, &args(i), &c.nodes[i].log())),
            log: c.nodes[i].log(),
        })
        .collect();
    // Two retries each: the daemon survived at least one backoff pause.
    for (i, dm) in d.iter_mut().enumerate() {
        let node = &c.nodes[i];
        wait_for(
            &format!("{} to log two etcd retries", node.name),
            Duration::from_secs(15),
            || {
                assert!(
                    dm.alive(),
                    "flanneld on {} exited while etcd was down; log:\n{}",
                    node.name,
                    read_log(&node.log())
                );
                (read_log(&node.log()).matches(RETRY).count() >= 2).then_some(())
            },
        );
        assert!(dm.alive(), "flanneld on {} must keep waiting", node.name);
        assert!(node.subnet_env().is_none() && node.state().is_none());
    }

    let etcd = SwitchEtcd::start(&c);
    assert_eq!(etcd.endpoint, endpoint);
    etcd.with_store(|s| async move {
        let mut client = s.client();
        client
            .put("/coreos.com/network/config", CONFIG, None)
            .await
            .unwrap();
    })
    .unwrap();
    // The backoff is capped at 10 s, so a retry comes within that.
    let s: Vec<Ipv4Net> = (0..2)
        .map(|i| {
            wait_for(
                &format!("{} subnet.env after etcd started", c.nodes[i].name),
                Duration::from_secs(30),
                || {
                    assert!(d[i].alive(), "{}", read_log(&c.nodes[i].log()));
                    c.nodes[i].subnet_env()?.lease_key()?.ipv4
                },
            )
        })
        .collect();
    assert_ne!(s[0], s[1]);
    let leases = etcd
        .with_store(|st| async move { st.list_leases().await.unwrap().leases })
        .unwrap();
    let peer = |sub: Ipv4Net| {
        let l = leases.iter().find(|l| l.key.ipv4 == Some(sub)).unwrap();
        (
            sub,
            l.attrs.public_ip.unwrap(),
            l.attrs.vxlan_data().unwrap().vtep_mac,
        )
    };
    c.wait_programmed(0, &[peer(s[1])], Duration::from_secs(10));
    c.wait_programmed(1, &[peer(s[0])], Duration::from_secs(10));
    let dst = s[1].network().to_string();
    wait_for("ping through the overlay", Duration::from_secs(10), || {
        ping(&c.nodes[0], &dst).then_some(())
    });
    for dm in d.drain(..) {
        assert!(dm.stop().success());
    }
}

#[test]
fn sigterm_while_waiting_for_etcd_exits_cleanly() {
    // Before the handlers were installed at start, the kernel's default
    // action killed a flanneld that was still connecting (signal 15).
    let c = Cluster::new("etcdterm", 1);
    let mut args = c.args(0, &["--etcd-endpoints", "http://172.16.1.1:2379"]);
    let pos = args.iter().position(|x| x == "--local-store").unwrap();
    args.drain(pos..pos + 2);
    let node = &c.nodes[0];
    let mut d = Daemon {
        child: Some(spawn_in(&node.ns, &args, &node.log())),
        log: node.log(),
    };
    wait_for("an etcd retry", Duration::from_secs(15), || {
        assert!(d.alive(), "{}", read_log(&node.log()));
        read_log(&node.log())
            .contains("etcd not reachable yet; retrying")
            .then_some(())
    });
    let st = d.stop();
    let log = read_log(&node.log());
    assert!(st.success(), "flanneld exited with {st}; log:\n{log}");
    assert!(
        log.contains("SIGTERM while connecting to etcd: exiting"),
        "{log}"
    );
    assert!(node.subnet_env().is_none() && node.state().is_none());
}

#[test]
fn existing_device_with_wrong_attributes_is_recreated_keeping_its_mac() {
    let c = Cluster::new("predev", 1);
    let node = &c.nodes[0];
    let mac: MacAddr = "02:42:ac:10:01:0b".parse().unwrap();
    // A leftover flannel.1 with the wrong port, learning on, wrong MTU, down.
    let old_index = node.nl(|nl| {
        let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
        nl.add_vxlan(&flannel_netlink::VxlanDevice {
            name: "flannel.1".into(),
            vni: 1,
            local: IpAddr::V4(node.ip),
            underlay_index: eth0.index,
            port: 4789,
            learning: true,
            gbp: false,
            mtu: 1300,
            mac: Some(mac),
        })
        .unwrap()
        .index
    });
    // Chosen by --iface-regex on the address; published with --public-ip.
    let mut args: Vec<String> = c.args(0, &[]);
    let pos = args.iter().position(|a| a == "--iface").unwrap();
    args.drain(pos..pos + 2);
    args.extend(
        [
            "--iface-regex",
            r"^172\.16\.1\.",
            "--public-ip",
            "198.51.100.7",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let mut d = Daemon {
        child: Some(spawn_in(&node.ns, &args, &node.log())),
        log: node.log(),
    };
    let s = node.wait_subnet(&mut d);
    let st = node.state().unwrap();
    let vx = st.link.vxlan.clone().unwrap();
    assert_ne!(st.link.index, old_index, "recreated");
    assert_eq!(
        st.link.mac,
        Some(mac),
        "VtepMAC taken from the existing device"
    );
    assert_eq!((vx.port, vx.learning), (8472, false));
    assert_eq!(
        vx.local,
        Some(IpAddr::V4(node.ip)),
        "local is the interface address"
    );
    assert_eq!(st.link.mtu, 1450);
    assert!(st.link.up);
    let lease = c
        .leases()
        .into_iter()
        .find(|l| l.key.ipv4 == Some(s))
        .unwrap();
    assert_eq!(lease.attrs.public_ip, Some(Ipv4Addr::new(198, 51, 100, 7)));
    assert_eq!(lease.attrs.vxlan_data().unwrap().vtep_mac, mac);
    assert!(d.stop().success());
}

/// The main-table routes of `node` to exactly `dst`.
fn routes_to(node: &Node, dst: &str) -> Vec<Route> {
    let dst: IpNet = dst.parse().unwrap();
    node.nl(|nl| nl.list_routes().unwrap())
        .into_iter()
        .filter(|r| r.dst == dst)
        .collect()
}

/// Issue 14 item 1: a lease for the underlay's own subnet (a file named
/// `172.16.1.0-24`) is never programmed, so the kernel's route to the
/// underlay stays; and a route an earlier version wrote for it on
/// flannel.1 (which had replaced that kernel route) is deleted at start,
/// the kernel's prefix route put back, and the node reaches its peers again.
#[test]
fn lease_outside_the_network_is_skipped_and_its_stale_route_healed() {
    let c = Cluster::new("outside", 2);
    let (d0, d1, peers0) = c.start_two();
    assert!(d0.stop().success());

    // What an earlier version left on node1 for the hostile lease.
    c.put_raw_lease("172.16.1.0-24", "172.16.1.99", "02:00:00:00:00:99");
    let vx = c.nodes[0].state().unwrap().link.index;
    let stale = Route {
        dst: "172.16.1.0/24".parse().unwrap(),
        gateway: Some("172.16.1.0".parse().unwrap()),
        oif: vx,
        onlink: true,
    };
    c.nodes[0].nl(|nl| nl.replace_route(&stale).unwrap());
    assert_eq!(routes_to(&c.nodes[0], "172.16.1.0/24"), vec![stale.clone()]);
    assert!(
        !ping(&c.nodes[0], "172.16.1.12"),
        "the stale route cuts node1 off the underlay"
    );

    // node2, running, sees the hostile lease: warned, never programmed.
    wait_for(
        "node2's warning about 172.16.1.0-24",
        Duration::from_secs(10),
        || {
            read_log(&c.nodes[1].log())
                .contains("lease 172.16.1.0-24 is not programmed: its IPv4 subnet 172.16.1.0/24 is not inside the cluster network 10.244.0.0/16")
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    let eth0 = c.nodes[1].state().unwrap().eth0;
    let r = routes_to(&c.nodes[1], "172.16.1.0/24");
    assert!(
        r.len() == 1 && r[0].oif == eth0 && r[0].gateway.is_none(),
        "node2's underlay route must stay the kernel's: {r:?}\nlog:\n{}",
        read_log(&c.nodes[1].log())
    );
    assert!(ping(&c.nodes[1], "172.16.1.1"), "node2 keeps its underlay");

    // node1 restarted: the stale route goes, eth0's prefix route is back.
    let mut d0 = c.start(0, &[]);
    c.nodes[0].wait_subnet(&mut d0);
    let eth0 = c.nodes[0].state().unwrap().eth0;
    wait_for(
        "node1's underlay route restored",
        Duration::from_secs(10),
        || {
            let r = routes_to(&c.nodes[0], "172.16.1.0/24");
            (r.len() == 1 && r[0].oif == eth0 && r[0].gateway.is_none()).then_some(())
        },
    );
    c.wait_programmed(0, &peers0, Duration::from_secs(10));
    wait_for("node1 reaches node2 again", Duration::from_secs(10), || {
        ping(&c.nodes[0], "172.16.1.12").then_some(())
    });
    let log = read_log(&c.nodes[0].log());
    assert!(
        log.contains("restored the underlay route 172.16.1.0/24 dev eth0"),
        "{log}"
    );
    assert!(d0.stop().success());
    assert!(d1.stop().success());
}

/// Issue 14 items 2 and 3, issue 12 "bad input": leases duplicating a
/// peer's VtepMAC or PublicIP, overlapping its subnet, or with an unusable
/// VtepMAC or PublicIP are skipped with one warning each naming the lease;
/// the real peer keeps its neighbour, FDB entry and route (no flapping),
/// and a later lease change does not repeat the warnings.
#[test]
fn hostile_and_conflicting_leases_are_skipped_once_and_the_real_peer_kept() {
    let c = Cluster::new("hostile", 2);
    let (d0, d1, peers0) = c.start_two();
    let s1 = peers0[0].0;
    let mac2 = peers0[0].2.to_string();
    let inner = format!("{}-25", Ipv4Addr::from(u32::from(s1.network()) + 128));
    let hostile: Vec<(String, &str, String, &str)> = vec![
        (
            "10.244.250.0-24".into(),
            "172.16.1.77",
            mac2.clone(),
            "is also the VtepMAC of lease",
        ),
        (
            inner.clone(),
            "172.16.1.78",
            "02:00:00:00:00:78".into(),
            "overlaps",
        ),
        (
            "10.244.251.0-24".into(),
            "172.16.1.12",
            "02:00:00:00:00:79".into(),
            "is also the PublicIP of",
        ),
        (
            "10.244.252.0-24".into(),
            "172.16.1.80",
            "00:00:00:00:00:00".into(),
            "the zero address",
        ),
        (
            "10.244.253.0-24".into(),
            "172.16.1.81",
            "01:00:5e:00:00:01".into(),
            "a multicast address",
        ),
        (
            "10.244.254.0-24".into(),
            "172.16.1.82",
            "ff:ff:ff:ff:ff:ff".into(),
            "the broadcast address",
        ),
        (
            "10.244.249.0-24".into(),
            "10.244.7.7",
            "02:00:00:00:00:83".into(),
            "inside the cluster network",
        ),
        (
            "10.244.248.0-24".into(),
            "127.0.0.1",
            "02:00:00:00:00:84".into(),
            "a loopback address",
        ),
    ];
    for (key, ip, mac, _) in &hostile {
        c.put_raw_lease(key, ip, mac);
    }
    let warning = |key: &str| format!("lease {key} is not programmed: ");
    for (key, _, _, why) in &hostile {
        wait_for(
            &format!("node1's warning about {key}"),
            Duration::from_secs(10),
            || {
                read_log(&c.nodes[0].log())
                    .lines()
                    .any(|l| l.contains(&warning(key)) && l.contains(why))
                    .then_some(())
            },
        );
    }
    // Exactly node2's triple, and it stays so (no FDB flapping).
    for _ in 0..10 {
        c.wait_programmed(0, &peers0, Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_for("ping node2's VTEP", Duration::from_secs(10), || {
        ping(&c.nodes[0], &s1.network().to_string()).then_some(())
    });
    // A new, valid peer: programmed; the rejections are not logged again.
    c.put_raw_lease("10.244.247.0-24", "172.16.1.90", "02:00:00:00:00:90");
    let mut with_new = peers0.clone();
    with_new.push((
        "10.244.247.0/24".parse().unwrap(),
        "172.16.1.90".parse().unwrap(),
        "02:00:00:00:00:90".parse().unwrap(),
    ));
    c.wait_programmed(0, &with_new, Duration::from_secs(10));
    let log = read_log(&c.nodes[0].log());
    for (key, _, _, _) in &hostile {
        let n = log.lines().filter(|l| l.contains(&warning(key))).count();
        assert_eq!(n, 1, "one warning for {key}, not one per pass:\n{log}");
    }
    assert!(d0.stop().success());
    assert!(d1.stop().success());
}

/// With `FLANNELD_NEXTHOP_THRESHOLD=0` (the nexthop path forced at any
/// size) node 1's vxlan peer routes name nexthop objects of ours
/// (`ip nexthop` `via <peer's VTEP address> dev flannel.1 onlink`) beside
/// upstream's neighbour and FDB entries; traffic flows through them, a
/// deleted object or route is put back, and a lease's removal takes its
/// route, object, neighbour and FDB entry.
#[test]
fn vxlan_peer_routes_through_forced_nexthop_objects() {
    use flannel_netlink::{Nexthop, RouteEntry};
    use flanneld::nexthops::THRESHOLD_ENV;
    let c = Cluster::new("vxnh", 3);
    let node = &c.nodes[0];
    let mut cmd = flanneld_in(&node.ns, &node.log());
    cmd.args(c.args(0, &[])).env(THRESHOLD_ENV, "0");
    let mut d = vec![Daemon {
        child: Some(cmd.spawn().expect("spawn flanneld")),
        log: node.log(),
    }];
    d.extend((1..3).map(|i| c.start(i, &[])));
    let subnets: Vec<Ipv4Net> = (0..3).map(|i| c.nodes[i].wait_subnet(&mut d[i])).collect();
    let all = c.peers_of(&subnets);
    let net: Ipv4Net = NETWORK.parse().unwrap();

    let entries = || -> Vec<RouteEntry> {
        let mut v: Vec<RouteEntry> = node
            .nl(|nl| nl.list_route_entries().unwrap())
            .into_iter()
            .filter(|e| matches!(e.route.dst, IpNet::V4(d) if net.contains(&d)))
            .collect();
        v.sort();
        v
    };
    let objects = || node.nl(our_nexthops);
    // Node 1 holds, for `peers`, upstream's neighbour and FDB entries and
    // a route per peer naming the object for `via <VTEP address> onlink`.
    let holds = |peers: &[(Ipv4Net, Ipv4Addr, MacAddr)]| {
        let st = node.state()?;
        let (routes, neighbours, fdb) = expected(st.link.index, peers);
        let (es, nhs) = (entries(), objects());
        let ok = st.neighbours == neighbours
            && st.fdb == fdb
            && es.len() == routes.len()
            && nhs.len() == routes.len()
            && routes.iter().all(|r| {
                es.iter().any(|e| {
                    e.route.dst == r.dst
                        && nhs.iter().any(|h| {
                            Some(h.id) == e.nhid
                                && h.gateway == r.gateway
                                && h.oif == st.link.index
                                && h.onlink
                        })
                })
            });
        ok.then_some((es, nhs))
    };
    let (_, nhs) = wait_for(
        "node1's peer routes through nexthops",
        Duration::from_secs(10),
        || holds(&all[1..]),
    );
    for i in 1..3 {
        let plain = c.nodes[i].nl(|nl| nl.list_route_entries().unwrap());
        assert!(
            plain.iter().all(|e| e.nhid.is_none()),
            "node{} is below the threshold: {plain:?}",
            i + 1
        );
    }
    for j in [1, 2] {
        let dst = subnets[j].network().to_string();
        wait_for(
            &format!("ping {dst} from node1"),
            Duration::from_secs(10),
            || ping(node, &dst).then_some(()),
        );
    }
    // A deleted object (its route goes with it, silently) is put back.
    node.nl(|nl| nl.del_nexthop(nhs[0].id).unwrap());
    let (es, _) = wait_for(
        "the nexthop and its route back",
        Duration::from_secs(10),
        || holds(&all[1..]),
    );
    // A deleted route comes back naming its object.
    let e = &es[0];
    node.nl(|nl| nl.del_route_nhid(e.route.dst, e.nhid.unwrap()).unwrap());
    wait_for("the route back", Duration::from_secs(10), || {
        holds(&all[1..])
    });
    let dst = subnets[1].network().to_string();
    wait_for("ping after the repairs", Duration::from_secs(10), || {
        ping(node, &dst).then_some(())
    });
    // A stale route in the cluster network naming someone else's object
    // is deleted (by that id: the kernel matches no `via` for it); the
    // object is not ours and stays.
    let dev = node.state().unwrap().link.index;
    let foreign = Nexthop {
        id: 77,
        gateway: Some("10.244.250.0".parse().unwrap()),
        oif: dev,
        onlink: true,
        protocol: 99,
    };
    let stale: IpNet = "10.244.250.0/24".parse().unwrap();
    node.nl(|nl| {
        nl.replace_nexthop(&foreign).unwrap();
        nl.replace_route_nhid(stale, foreign.id).unwrap();
    });
    wait_for("the stale route gone", Duration::from_secs(10), || {
        (!entries().iter().any(|e| e.route.dst == stale)).then_some(())
    });
    assert!(
        node.nl(|nl| nl.list_nexthops().unwrap())
            .iter()
            .any(|h| h.id == foreign.id),
        "someone else's object is left alone"
    );
    holds(&all[1..]).expect("node1's own entries untouched");
    // Node 3 leaves: its route, object, neighbour and FDB entry go.
    let gone = d.pop().unwrap();
    assert!(gone.stop().success());
    c.delete_lease(
        format!("{}-{}", subnets[2].network(), subnets[2].prefix_len())
            .parse()
            .unwrap(),
    );
    wait_for("only node2's entries", Duration::from_secs(10), || {
        holds(&all[1..2])
    });
    stop_all(d);
}

/// The link notifications of flanneld's own device setup (creation, up,
/// the underlay's change) run no second full pass; flannel.1 set down and
/// at once up again by someone (the kernel drops its IPv4 routes without a
/// route notification) gets its routes back from the link notifications,
/// long before the 30 s resync.
#[test]
fn own_device_setup_costs_one_pass_and_a_device_down_and_up_gets_its_routes_back() {
    let c = Cluster::new("updown", 2);
    let (d0, d1, peers0) = c.start_two();
    let full_passes = || {
        read_log(&c.nodes[0].log())
            .lines()
            .filter(|l| l.contains("datapath pass") && l.contains("pass=\"full\""))
            .count()
    };
    // Past the debounce (150 ms) and a pass of two peers.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        full_passes(),
        1,
        "one full pass at the start; log:\n{}",
        read_log(&c.nodes[0].log())
    );
    let st = c.nodes[0].state().unwrap();
    c.nodes[0].nl(|nl| {
        nl.set_link_down(st.link.index).unwrap();
        nl.set_link_up(st.link.index).unwrap();
    });
    assert!(
        c.nodes[0].state().unwrap().routes.is_empty(),
        "the kernel dropped the routes with the device"
    );
    c.wait_programmed(0, &peers0, Duration::from_secs(5));
    assert!(full_passes() >= 2, "the repair was a full pass");
    stop_all(vec![d0, d1]);
}
