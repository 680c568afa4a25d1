//! Root integration tests of the host-gw backend: real `flanneld` processes
//! in network namespaces.
//!
//! Topology: a "switch" namespace with a bridge, one namespace per node
//! joined to it by a veth pair (node side `eth0`, 172.16.1.1N/24), leases in
//! a temporary local-store directory. Each node gets its subnet's first
//! address on `lo` as a ping target standing in for a pod. Namespaces,
//! processes (killed by PID) and directories go on drop, also on panic.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use flannel_core::datapath::{BlackholeRoute, Route, BLACKHOLE_METRIC};
use flannel_core::lease::{Lease, LeaseAttrs, LeaseKey, BACKEND_HOST_GW};
use flannel_store::{LocalStore, Store};
use ipnet::{IpNet, Ipv4Net};

mod common;
use common::{
    block_on, flanneld_in, local_store_flags, our_nexthops, ping_in, read_log, wait_for, Daemon,
    NodeNs, Testbed,
};

const NETWORK: &str = "10.244.0.0/16";
// SubnetMax keeps random subnets below 10.244.200.0: tests inject stale or foreign
// subnets from 10.244.200.0 up, which must never be a node's own.
const HOST_GW: &str =
    r#"{"Network": "10.244.0.0/16", "SubnetMax": "10.244.199.0", "Backend": {"Type": "host-gw"}}"#;
const VXLAN: &str =
    r#"{"Network": "10.244.0.0/16", "SubnetMax": "10.244.199.0", "Backend": {"Type": "vxlan"}}"#;

struct Node {
    ip: Ipv4Addr,
    base: NodeNs,
}

impl std::ops::Deref for Node {
    type Target = NodeNs;
    fn deref(&self) -> &NodeNs {
        &self.base
    }
}

impl Node {
    fn eth0(&self) -> u32 {
        self.nl(|nl| nl.link_by_name("eth0").unwrap().unwrap().index)
    }
    fn has_vxlan_device(&self) -> bool {
        self.nl(|nl| nl.link_by_name("flannel.1").unwrap().is_some())
    }
    /// Routes inside the cluster network with a gateway on eth0, sorted.
    fn gateway_routes(&self) -> Vec<Route> {
        let eth0 = self.eth0();
        let net: IpNet = NETWORK.parse().unwrap();
        let mut r: Vec<Route> = self
            .nl(|nl| nl.list_routes().unwrap())
            .into_iter()
            .filter(|r| net.contains(&r.dst) && r.oif == eth0 && r.gateway.is_some())
            .collect();
        r.sort();
        r
    }
    /// Routes inside the cluster network through flannel.1, and whether
    /// they are exactly the vxlan route to `peer`.
    fn vxlan_routes_are(&self, peer: Ipv4Net) -> (bool, Vec<Route>) {
        let Some(dev) = self.nl(|nl| nl.link_by_name("flannel.1").unwrap()) else {
            return (false, Vec::new());
        };
        let net: IpNet = NETWORK.parse().unwrap();
        let got: Vec<Route> = self
            .nl(|nl| nl.list_routes().unwrap())
            .into_iter()
            .filter(|r| r.oif == dev.index && net.contains(&r.dst))
            .collect();
        let want = Route {
            dst: IpNet::V4(peer),
            gateway: Some(IpAddr::V4(peer.network())),
            oif: dev.index,
            onlink: true,
        };
        (got == vec![want], got)
    }
    /// Puts the subnet's first address on lo (idempotent).
    fn add_target(&self, subnet: Ipv4Net) {
        let a = IpNet::V4(Ipv4Net::new(first(subnet), 32).unwrap());
        self.nl(|nl| {
            let lo = nl.link_by_name("lo").unwrap().unwrap();
            if !nl.list_addresses(lo.index).unwrap().contains(&a) {
                nl.add_address(lo.index, a).unwrap();
            }
            nl.set_link_up(lo.index).unwrap();
        });
    }
}

fn first(s: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(s.network()) + 1)
}

fn via(dst: Ipv4Net, gw: Ipv4Addr, oif: u32) -> Route {
    Route {
        dst: IpNet::V4(dst),
        gateway: Some(IpAddr::V4(gw)),
        oif,
        onlink: false,
    }
}

/// Pod-to-pod: from node's subnet address to `dst`.
fn ping(node: &Node, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
    ping_in(&node.ns.name, Some(src.into()), dst.into())
}

/// This file's nodes on the shared testbed ([`common::Cluster`]).
type Cluster = common::Cluster<Node>;

impl Cluster {
    fn new(tag: &str, n: usize, config: &str) -> Cluster {
        let (bed, underlay) = Testbed::new(&format!("hostgw-{tag}"), "fdhg", n, None, config);
        let nodes = underlay
            .into_iter()
            .map(|(base, ip)| Node { ip, base })
            .collect();
        Cluster { nodes, bed }
    }

    fn start(&self, i: usize) -> Daemon {
        self.start_with(i, &[])
    }

    fn start_with(&self, i: usize, extra: &[&str]) -> Daemon {
        let node = &self.nodes[i];
        let mut cmd = flanneld_in(&node.ns, &node.log());
        cmd.args(local_store_flags(
            &self.store,
            &self.config,
            &node.subnet_file(),
        ))
        .args(["--iface", "eth0", "--resync-interval", "30"])
        .args(extra);
        Daemon(Some(cmd.spawn().expect("spawn flanneld")))
    }

    fn stop(&self, i: usize, d: Daemon) {
        d.stop(&self.nodes[i].log());
    }

    /// Waits for node `i`'s subnet.env; returns its subnet.
    fn wait_subnet(&self, i: usize, d: &mut Daemon) -> Ipv4Net {
        let node = &self.nodes[i];
        wait_for("subnet.env", Duration::from_secs(15), || {
            if let Ok(Some(st)) = d.0.as_mut().unwrap().try_wait() {
                panic!("flanneld exited with {st}; log:\n{}", read_log(&node.log()));
            }
            node.subnet_env()?.lease_key()?.ipv4
        })
    }

    /// Waits until node `i` holds exactly `want` as host-gw routes.
    fn wait_routes(&self, i: usize, want: &[Route]) {
        let node = &self.nodes[i];
        let mut want = want.to_vec();
        want.sort();
        let what = format!("node{} routes", i + 1);
        node.wait_eq(&what, 10, &want, || node.gateway_routes());
    }

    /// Node `i`'s expected host-gw routes toward every other node.
    fn expected(&self, i: usize, subnets: &[Ipv4Net]) -> Vec<Route> {
        let eth0 = self.nodes[i].eth0();
        (0..subnets.len())
            .filter(|j| *j != i)
            .map(|j| via(subnets[j], self.nodes[j].ip, eth0))
            .collect()
    }

    /// subnet.env is rewritten after the first pass of a restarted daemon.
    fn wait_mtu(&self, i: usize, mtu: u32) {
        wait_for(
            &format!("FLANNEL_MTU={mtu}"),
            Duration::from_secs(10),
            || (self.nodes[i].subnet_env()?.mtu == mtu).then_some(()),
        );
    }

    /// Waits until node `i` routes exactly `peer` through flannel.1.
    fn wait_vxlan_route(&self, i: usize, peer: Ipv4Net) {
        let start = Instant::now();
        loop {
            let (ok, got) = self.nodes[i].vxlan_routes_are(peer);
            if ok {
                return;
            }
            if start.elapsed() > Duration::from_secs(10) {
                panic!(
                    "node{} vxlan routes {got:?}, want only {peer}; log:\n{}",
                    i + 1,
                    read_log(&self.nodes[i].log())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_ping(&self, i: usize, src: Ipv4Net, dst: Ipv4Net) {
        wait_for(
            &format!("ping from node{} {} to {}", i + 1, first(src), first(dst)),
            Duration::from_secs(10),
            || ping(&self.nodes[i], first(src), first(dst)).then_some(()),
        );
    }
}

const UNREACHABLE_LOG: &str = "no route installed for peer subnet";

#[test]
fn three_nodes_route_via_public_ips_ping_repair_drift_and_refuse_far_peers() {
    let c = Cluster::new("three", 3, HOST_GW);
    let mut d: Vec<Daemon> = (0..3).map(|i| c.start(i)).collect();
    let subnets: Vec<Ipv4Net> = (0..3).map(|i| c.wait_subnet(i, &mut d[i])).collect();

    // Leases as upstream's host-gw: BackendType host-gw, no BackendData.
    for l in c.leases() {
        assert_eq!(l.attrs.backend_type, BACKEND_HOST_GW, "{l:?}");
        assert!(l.attrs.vxlan_data().is_none(), "{l:?}");
        let json = serde_json::to_value(&l.attrs).unwrap();
        assert!(json.get("BackendData").is_none(), "{json}");
    }
    for i in 0..3 {
        let env = c.nodes[i].subnet_env().unwrap();
        assert_eq!(env.mtu, 1500, "host-gw: pod MTU = eth0's MTU");
        c.wait_routes(i, &c.expected(i, &subnets));
        assert!(!c.nodes[i].has_vxlan_device());
        c.nodes[i].add_target(subnets[i]);
    }
    for i in 0..3 {
        for j in 0..3 {
            if i != j {
                c.wait_ping(i, subnets[i], subnets[j]);
            }
        }
    }

    // Drift: a deleted route comes back (netlink notification).
    let gone = c.expected(0, &subnets)[0].clone();
    c.nodes[0].nl(|nl| nl.del_route(&gone).unwrap());
    c.wait_routes(0, &c.expected(0, &subnets));
    c.wait_ping(0, subnets[0], subnets[1]);
    // A stale route of ours (a node that vanished) is deleted.
    let eth0 = c.nodes[0].eth0();
    let stale = via("10.244.250.0/24".parse().unwrap(), c.nodes[2].ip, eth0);
    c.nodes[0].nl(|nl| nl.replace_route(&stale).unwrap());
    c.wait_routes(0, &c.expected(0, &subnets));

    // A peer on another subnet: no route, one error naming it.
    let far_key: LeaseKey = "10.244.200.0-24".parse().unwrap();
    let far = Lease {
        key: far_key,
        attrs: LeaseAttrs::new(BACKEND_HOST_GW, Some(Ipv4Addr::new(192, 168, 77, 5)), None),
        expiration: None,
    };
    block_on(async {
        let store = LocalStore::open(&c.store).unwrap();
        store.create_lease(&far, None).await.unwrap().unwrap();
    });
    let log = c.nodes[0].log();
    wait_for("the far peer's error", Duration::from_secs(10), || {
        read_log(&log).contains(UNREACHABLE_LOG).then_some(())
    });
    let line = read_log(&log)
        .lines()
        .find(|l| l.contains(UNREACHABLE_LOG))
        .unwrap()
        .to_string();
    assert!(
        line.contains("10.244.200.0/24")
            && line.contains("192.168.77.5")
            && line.contains("172.16.1.0/24")
            && line.contains("eth0"),
        "{line}"
    );
    // More passes (drift) with the same far peer: logged once, still no route.
    for _ in 0..2 {
        c.nodes[0].nl(|nl| nl.del_route(&gone).unwrap());
        c.wait_routes(0, &c.expected(0, &subnets));
    }
    assert_eq!(
        read_log(&log).matches(UNREACHABLE_LOG).count(),
        1,
        "logged once per change:\n{}",
        read_log(&log)
    );
    for i in 0..3 {
        c.wait_routes(i, &c.expected(i, &subnets));
    }
    for (i, daemon) in d.into_iter().enumerate() {
        c.stop(i, daemon);
    }
}

#[test]
fn switching_backend_on_restart_leaves_nothing_of_the_old_one() {
    let c = Cluster::new("switch", 2, VXLAN);
    // vxlan.
    let mut d: Vec<Daemon> = (0..2).map(|i| c.start(i)).collect();
    let subnets: Vec<Ipv4Net> = (0..2).map(|i| c.wait_subnet(i, &mut d[i])).collect();
    for i in 0..2 {
        c.nodes[i].add_target(subnets[i]);
        c.wait_vxlan_route(i, subnets[1 - i]);
        c.wait_mtu(i, 1450);
    }
    c.wait_ping(0, subnets[0], subnets[1]);
    for (i, daemon) in d.into_iter().enumerate() {
        c.stop(i, daemon);
    }
    assert!(c.nodes[0].has_vxlan_device(), "SIGTERM leaves the device");

    // Restart with host-gw: flannel.1 (and its routes) gone, host-gw routes in.
    c.set_config(HOST_GW);
    let mut d: Vec<Daemon> = (0..2).map(|i| c.start(i)).collect();
    for (i, daemon) in d.iter_mut().enumerate() {
        c.wait_subnet(i, daemon);
    }
    for i in 0..2 {
        c.wait_routes(i, &c.expected(i, &subnets));
        wait_for("flannel.1 removed", Duration::from_secs(10), || {
            (!c.nodes[i].has_vxlan_device()).then_some(())
        });
        c.wait_mtu(i, 1500);
        let env = c.nodes[i].subnet_env().unwrap();
        assert_eq!(
            env.lease_key().unwrap().ipv4,
            Some(subnets[i]),
            "same subnet kept"
        );
    }
    assert!(c
        .leases()
        .iter()
        .all(|l| l.attrs.backend_type == BACKEND_HOST_GW));
    c.wait_ping(0, subnets[0], subnets[1]);
    for (i, daemon) in d.into_iter().enumerate() {
        c.stop(i, daemon);
    }
    // A host-gw route of a node that vanished while we were down.
    let eth0 = c.nodes[0].eth0();
    let stale = via("10.244.250.0/24".parse().unwrap(), c.nodes[1].ip, eth0);
    c.nodes[0].nl(|nl| nl.replace_route(&stale).unwrap());

    // Back to vxlan: no host-gw route left, the vxlan datapath back.
    c.set_config(VXLAN);
    let mut d: Vec<Daemon> = (0..2).map(|i| c.start(i)).collect();
    for (i, daemon) in d.iter_mut().enumerate() {
        c.wait_subnet(i, daemon);
    }
    for i in 0..2 {
        c.wait_routes(i, &[]);
        c.wait_vxlan_route(i, subnets[1 - i]);
        c.wait_mtu(i, 1450);
    }
    c.wait_ping(0, subnets[0], subnets[1]);
    c.wait_ping(1, subnets[1], subnets[0]);
    for (i, daemon) in d.into_iter().enumerate() {
        c.stop(i, daemon);
    }
}

/// `ip route get DST` in the node's namespace: the route the kernel picks.
/// For a destination that hits a blackhole route the kernel answers EINVAL
/// ("Invalid argument"), where a missing route is "Network is unreachable".
fn route_get(node: &Node, dst: Ipv4Addr) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", &node.ns.name, "route", "get", &dst.to_string()])
        .output()
        .expect("run ip route get");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn blackholes(node: &Node) -> Vec<BlackholeRoute> {
    let mut v = node.nl(|nl| nl.list_blackhole_routes().unwrap());
    v.sort();
    v
}

fn wait_blackholes(node: &Node, want: &[BlackholeRoute]) {
    node.wait_eq("blackholes", 10, &want.to_vec(), || blackholes(node));
}

#[test]
fn ip_blackhole_route_yields_to_cni0_is_restored_and_goes_with_the_flag() {
    let c = Cluster::new("blackhole", 2, HOST_GW);
    let mut d0 = c.start_with(0, &["--ip-blackhole-route"]);
    let mut d1 = c.start(1);
    let s0 = c.wait_subnet(0, &mut d0);
    c.wait_subnet(1, &mut d1);
    let node = &c.nodes[0];
    let ours = BlackholeRoute {
        dst: IpNet::V4(s0),
        metric: BLACKHOLE_METRIC,
    };
    wait_blackholes(node, &[ours]);
    // A node without the flag has none.
    assert_eq!(blackholes(&c.nodes[1]), vec![]);
    let unassigned = Ipv4Addr::from(u32::from(s0.network()) + 77);
    let got = route_get(node, unassigned);
    assert!(
        got.contains("Invalid argument"),
        "ip route get {unassigned}: {got}"
    );
    let elsewhere = route_get(node, "10.99.0.1".parse().unwrap());
    assert!(elsewhere.contains("unreachable"), "{elsewhere}");

    // cni0's connected route to the subnet wins over the blackhole.
    node.nl(|nl| {
        let br = nl.add_bridge("cni0", None).unwrap();
        nl.add_address(br.index, IpNet::V4(Ipv4Net::new(first(s0), 24).unwrap()))
            .unwrap();
        nl.set_link_up(br.index).unwrap();
    });
    let got = route_get(node, unassigned);
    assert!(got.contains("dev cni0"), "{got}");
    assert_eq!(blackholes(node), vec![ours]);

    // Level-triggered: a deleted blackhole comes back; one of an earlier
    // lease of ours goes; an operator's (another metric) stays.
    let earlier = BlackholeRoute {
        dst: "10.244.250.0/24".parse().unwrap(),
        metric: BLACKHOLE_METRIC,
    };
    let operators = BlackholeRoute {
        dst: "10.244.251.0/24".parse().unwrap(),
        metric: 0,
    };
    node.nl(|nl| {
        nl.del_blackhole_route(&ours).unwrap();
        nl.replace_blackhole_route(&earlier).unwrap();
        nl.replace_blackhole_route(&operators).unwrap();
    });
    wait_blackholes(node, &[ours, operators]);

    // A restart without the flag removes ours.
    c.stop(0, d0);
    let mut d0 = c.start(0);
    c.wait_subnet(0, &mut d0);
    wait_blackholes(node, &[operators]);
    c.stop(0, d0);
    c.stop(1, d1);
}

#[test]
fn iface_can_reach_picks_the_interface_of_the_route_to_the_target() {
    let c = Cluster::new("canreach", 1, HOST_GW);
    let node = &c.nodes[0];
    // A second interface besides eth0: the route to 10.9.0.0/16 leaves by it.
    let fd = node.ns.fd();
    node.nl(|nl| {
        let ext = nl.add_veth("ext1", "ext1p", fd, None).unwrap();
        let peer = nl.link_by_name("ext1p").unwrap().unwrap();
        nl.add_address(ext.index, "10.9.0.5/16".parse().unwrap())
            .unwrap();
        nl.set_link_up(peer.index).unwrap();
        nl.set_link_up(ext.index).unwrap();
    });
    let launch = |target: &str| {
        let mut cmd = flanneld_in(&node.ns, &node.log());
        cmd.args(local_store_flags(&c.store, &c.config, &node.subnet_file()))
            .args(["--iface-can-reach", target]);
        Daemon(Some(cmd.spawn().expect("spawn flanneld")))
    };

    // No route to the target: a clear error, and nothing written.
    let mut d = launch("192.0.2.1");
    let status = wait_for("flanneld to refuse", Duration::from_secs(10), || {
        d.0.as_mut().unwrap().try_wait().unwrap()
    });
    let log = read_log(&node.log());
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("--iface-can-reach 192.0.2.1: no route to it"),
        "{log}"
    );
    assert!(node.subnet_env().is_none() && c.leases().is_empty());

    // The route's interface and source address, not eth0.
    let mut d = launch("10.9.8.7");
    let subnet = c.wait_subnet(0, &mut d);
    let leases = c.leases();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].key.ipv4, Some(subnet));
    assert_eq!(
        leases[0].attrs.public_ip,
        Some("10.9.0.5".parse::<Ipv4Addr>().unwrap())
    );
    c.stop(0, d);
}

/// Node `i`'s routes inside the cluster network with the nexthop object
/// each names, sorted.
fn route_entries(node: &Node) -> Vec<flannel_netlink::RouteEntry> {
    let net: IpNet = NETWORK.parse().unwrap();
    let mut v: Vec<_> = node
        .nl(|nl| nl.list_route_entries().unwrap())
        .into_iter()
        .filter(|e| net.contains(&e.route.dst) && e.route.gateway.is_some())
        .collect();
    v.sort();
    v
}

/// With `FLANNELD_NEXTHOP_THRESHOLD=0` (the nexthop path forced at any
/// size) node 1's peer routes name nexthop objects of ours that carry
/// the traffic; a deleted object or route is put back, and a lease's
/// removal takes both. The other nodes keep plain routes.
#[test]
fn forced_nexthop_objects_carry_routes_are_repaired_and_go_with_the_lease() {
    use flanneld::nexthops::THRESHOLD_ENV;
    let c = Cluster::new("nh", 3, HOST_GW);
    let node = &c.nodes[0];
    let mut cmd = flanneld_in(&node.ns, &node.log());
    cmd.args(local_store_flags(&c.store, &c.config, &node.subnet_file()))
        .args(["--iface", "eth0", "--resync-interval", "30"])
        .env(THRESHOLD_ENV, "0");
    let mut d = vec![Daemon(Some(cmd.spawn().expect("spawn flanneld")))];
    d.extend((1..3).map(|i| c.start(i)));
    let subnets: Vec<Ipv4Net> = (0..3).map(|i| c.wait_subnet(i, &mut d[i])).collect();
    for i in 0..3 {
        c.wait_routes(i, &c.expected(i, &subnets));
        c.nodes[i].add_target(subnets[i]);
    }
    let eth0 = node.eth0();
    // Each peer route names the object of ours for its gateway.
    let objects = |n: &Node| n.nl(our_nexthops);
    let consistent = || {
        let (entries, nhs) = (route_entries(node), objects(node));
        let ok = entries.len() == 2
            && nhs.len() == 2
            && entries.iter().all(|e| {
                nhs.iter().any(|h| {
                    Some(h.id) == e.nhid
                        && h.gateway == e.route.gateway
                        && h.oif == eth0
                        && !h.onlink
                })
            });
        ok.then_some((entries, nhs))
    };
    let (_, nhs) = wait_for(
        "node1 routes through nexthops",
        Duration::from_secs(10),
        consistent,
    );
    for i in 1..3 {
        assert!(
            route_entries(&c.nodes[i]).iter().all(|e| e.nhid.is_none()),
            "node{} is below the threshold",
            i + 1
        );
    }
    c.wait_ping(0, subnets[0], subnets[1]);
    // A deleted object (its route goes with it, silently) is put back.
    node.nl(|nl| nl.del_nexthop(nhs[0].id).unwrap());
    // The object comes back under a new id: the routes read again.
    let (entries, _) = wait_for(
        "the nexthop and its route back",
        Duration::from_secs(10),
        consistent,
    );
    c.wait_ping(0, subnets[0], subnets[1]);
    // A deleted route comes back naming its object.
    let e = &entries[0];
    node.nl(|nl| nl.del_route_nhid(e.route.dst, e.nhid.unwrap()).unwrap());
    wait_for("the route back", Duration::from_secs(10), consistent);
    // A lease's removal takes its route and its object.
    let gone = d.pop().unwrap();
    c.stop(2, gone);
    let key: LeaseKey = format!("{}-{}", subnets[2].network(), subnets[2].prefix_len())
        .parse()
        .unwrap();
    block_on(async {
        let store = LocalStore::open(&c.store).unwrap();
        store.delete_lease(&key).await.unwrap();
    });
    let peer = c.nodes[1].ip;
    wait_for(
        "only node2's route and object",
        Duration::from_secs(10),
        || {
            let (entries, nhs) = (route_entries(node), objects(node));
            (entries.len() == 1
                && nhs.len() == 1
                && nhs[0].gateway == Some(IpAddr::V4(peer))
                && entries[0].nhid == Some(nhs[0].id))
            .then_some(())
        },
    );
    for (i, daemon) in d.into_iter().enumerate() {
        c.stop(i, daemon);
    }
}
