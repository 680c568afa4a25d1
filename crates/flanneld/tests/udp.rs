//! Root integration tests of the udp backend: real `flanneld` processes in
//! network namespaces.
//!
//! Topology: a "switch" namespace with a bridge (172.16.1.1/24, the address
//! spoofed datagrams come from), one namespace per node joined to it by a
//! veth pair (node side `eth0`, 172.16.1.1N/24), leases in a temporary
//! local-store directory. Each node gets its subnet's first address on `lo`
//! as a ping target standing in for a pod. Namespaces, processes (killed by
//! PID) and directories go on drop, also on panic.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flannel_core::datapath::Route;
use flannel_core::lease::{Lease, LeaseAttrs, LeaseKey, BACKEND_UDP, BACKEND_VXLAN};
use flannel_core::udp::{fill_ipv4_checksum, parse_ipv4, Counters};
use flannel_store::{LocalStore, Store};
use ipnet::{IpNet, Ipv4Net};

mod common;
use common::{
    block_on, flanneld_in, inner_udp, local_store_flags, ping_in, read_log, wait_for, Daemon,
    NodeNs, Testbed,
};

const NETWORK: &str = "10.244.0.0/16";
// SubnetMax keeps random subnets below 10.244.200.0: tests inject stale or foreign
// subnets from 10.244.200.0 up, which must never be a node's own.
const UDP: &str =
    r#"{"Network": "10.244.0.0/16", "SubnetMax": "10.244.199.0", "Backend": {"Type": "udp"}}"#;
const VXLAN: &str =
    r#"{"Network": "10.244.0.0/16", "SubnetMax": "10.244.199.0", "Backend": {"Type": "vxlan"}}"#;
const PORT: u16 = 8285;
const SWITCH_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 1, 1);

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
    fn stats_file(&self) -> PathBuf {
        self.dir.join("udp-stats.json")
    }
    fn counters(&self) -> Option<Counters> {
        serde_json::from_str(&fs::read_to_string(self.stats_file()).ok()?).ok()
    }
    /// Routes inside the cluster network (any device), sorted.
    fn cluster_routes(&self) -> Vec<Route> {
        let net: IpNet = NETWORK.parse().unwrap();
        let mut r: Vec<Route> = self
            .nl(|nl| nl.list_routes().unwrap())
            .into_iter()
            .filter(|r| net.contains(&r.dst))
            .collect();
        r.sort();
        r
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
    /// Sends `payload` in a UDP datagram from `src` (an address of this
    /// node's namespace, ephemeral port) to `dst`.
    fn send_datagram(&self, src: Ipv4Addr, dst: SocketAddrV4, payload: &[u8]) {
        self.send_datagram_from(SocketAddrV4::new(src, 0), dst, payload);
    }
    /// [`Node::send_datagram`] from the port of `src` (upstream sends from 8285).
    fn send_datagram_from(&self, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) {
        self.ns
            .run(|| {
                let s = UdpSocket::bind(src).unwrap();
                s.send_to(payload, dst).unwrap();
            })
            .unwrap();
    }
}

fn first(s: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(s.network()) + 1)
}

/// Binds `rx` in `node`'s namespace, then up to 5 times runs `send` and
/// waits a second for a datagram on `rx`: the first one's payload and source.
fn receive_after(
    node: &Node,
    rx: SocketAddrV4,
    send: impl Fn() + Sync,
) -> Option<(Vec<u8>, SocketAddr)> {
    node.ns
        .run(|| {
            let sock = UdpSocket::bind(rx).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut buf = [0u8; 2048];
            for _ in 0..5 {
                send();
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    return Some((buf[..n].to_vec(), from));
                }
            }
            None
        })
        .unwrap()
}

fn ping(node: &Node, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
    ping_in(&node.ns.name, Some(src.into()), dst.into())
}

/// This file's nodes on the shared testbed ([`common::Cluster`]).
type Cluster = common::Cluster<Node>;

impl Cluster {
    fn new(tag: &str, n: usize, config: &str) -> Cluster {
        let (bed, underlay) = Testbed::new(
            &format!("udp-{tag}"),
            "fdudp",
            n,
            Some("172.16.1.1/24"),
            config,
        );
        let nodes = underlay
            .into_iter()
            .map(|(base, ip)| Node { ip, base })
            .collect();
        Cluster { nodes, bed }
    }

    fn start(&self, i: usize) -> Daemon {
        self.start_with_queues(i, std::env::var("UDP_TEST_QUEUES").ok())
    }

    /// [`Cluster::start`] with `FLANNELD_UDP_QUEUES` set to `queues`.
    fn start_with_queues(&self, i: usize, queues: Option<String>) -> Daemon {
        let node = &self.nodes[i];
        let mut cmd = flanneld_in(&node.ns, &node.log());
        if let Some(q) = queues {
            cmd.env("FLANNELD_UDP_QUEUES", q);
        }
        cmd.args(local_store_flags(
            &self.store,
            &self.config,
            &node.subnet_file(),
        ))
        .args([
            "--iface",
            "eth0",
            "--resync-interval",
            "30",
            "--udp-stats-file",
        ])
        .arg(node.stats_file());
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

    fn wait_mtu(&self, i: usize, mtu: u32) {
        wait_for(
            &format!("FLANNEL_MTU={mtu}"),
            Duration::from_secs(10),
            || (self.nodes[i].subnet_env()?.mtu == mtu).then_some(()),
        );
    }

    fn wait_ping(&self, i: usize, src: Ipv4Net, dst: Ipv4Net) {
        let node = &self.nodes[i];
        let start = Instant::now();
        while !ping(node, first(src), first(dst)) {
            if start.elapsed() > Duration::from_secs(10) {
                panic!(
                    "no ping from node{} {} to {}; log:\n{}",
                    i + 1,
                    first(src),
                    first(dst),
                    read_log(&node.log())
                );
            }
        }
    }

    /// Waits until node `i`'s flannel0 is as the udp backend sets it up:
    /// kind tun, MTU, `<subnet network>/32`, up, and the only route inside
    /// the cluster network is `<network> dev flannel0`.
    fn wait_flannel0(&self, i: usize, subnet: Ipv4Net, mtu: u32) {
        let node = &self.nodes[i];
        let start = Instant::now();
        loop {
            let state = node.link("flannel0").map(|l| {
                let idx = l.index;
                let addrs = node.nl(move |nl| nl.list_addresses(idx).unwrap());
                (l, addrs)
            });
            let routes = node.cluster_routes();
            let ok = match &state {
                Some((l, addrs)) => {
                    let want_route = Route {
                        dst: NETWORK.parse().unwrap(),
                        gateway: None,
                        oif: l.index,
                        onlink: false,
                    };
                    l.kind.as_deref() == Some("tun")
                        && l.mtu == mtu
                        && l.up
                        && addrs == &vec![IpNet::V4(Ipv4Net::new(subnet.network(), 32).unwrap())]
                        && routes == vec![want_route]
                }
                None => false,
            };
            if ok {
                return;
            }
            if start.elapsed() > Duration::from_secs(10) {
                panic!(
                    "node{} flannel0 {state:?}, cluster routes {routes:?}; log:\n{}",
                    i + 1,
                    read_log(&node.log())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Node `i`'s counters once the stats file (rewritten every second
    /// when they change) has caught up with the traffic so far.
    fn settled_counters(&self, i: usize) -> Counters {
        let mut last = None;
        loop {
            std::thread::sleep(Duration::from_millis(1300));
            let now = self.nodes[i].counters();
            if let Some(c) = now.filter(|_| now == last) {
                return c;
            }
            last = now;
        }
    }

    /// Waits until node `i`'s counters satisfy `f`; returns them.
    fn wait_counters(&self, i: usize, what: &str, f: impl Fn(&Counters) -> bool) -> Counters {
        let node = &self.nodes[i];
        let start = Instant::now();
        loop {
            let c = node.counters();
            if let Some(c) = c.filter(|c| f(c)) {
                return c;
            }
            if start.elapsed() > Duration::from_secs(10) {
                panic!(
                    "node{} counters {:?}: want {what}; log:\n{}",
                    i + 1,
                    node.counters(),
                    read_log(&node.log())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn three_nodes_ping_drift_spoofed_malformed_interop_and_peer_removal() {
    let c = Cluster::new("three", 3, UDP);
    let mut d: Vec<Daemon> = (0..3).map(|i| c.start(i)).collect();
    let subnets: Vec<Ipv4Net> = (0..3).map(|i| c.wait_subnet(i, &mut d[i])).collect();

    // Leases exactly as upstream's udp backend writes them (no BackendType,
    // no BackendData), read as udp.
    for l in c.leases() {
        assert_eq!(l.attrs.effective_backend_type(), BACKEND_UDP, "{l:?}");
        assert_eq!(
            l.attrs.to_json(),
            format!(
                r#"{{"PublicIP":"{}","PublicIPv6":null}}"#,
                l.attrs.public_ip.unwrap()
            )
        );
    }
    for (i, subnet) in subnets.iter().enumerate() {
        let env = c.nodes[i].subnet_env().unwrap();
        assert_eq!(env.mtu, 1472, "udp: pod MTU = eth0's MTU - 28");
        c.wait_flannel0(i, *subnet, 1472);
        assert!(c.nodes[i].link("flannel.1").is_none());
        c.nodes[i].add_target(*subnet);
    }
    for i in 0..3 {
        for j in 0..3 {
            if i != j {
                c.wait_ping(i, subnets[i], subnets[j]);
            }
        }
    }
    let base = c.wait_counters(0, "forwarded packets both ways", |k| {
        k.tx_packets >= 2 && k.rx_packets >= 2
    });
    assert_eq!(
        (base.dropped_spoofed, base.dropped_malformed),
        (0, 0),
        "{base:?}"
    );

    // Drift: the deleted cluster route comes back (netlink notification).
    let ifindex = c.nodes[0].link("flannel0").unwrap().index;
    let route = Route {
        dst: NETWORK.parse().unwrap(),
        gateway: None,
        oif: ifindex,
        onlink: false,
    };
    c.nodes[0].nl(|nl| nl.del_route(&route).unwrap());
    c.wait_flannel0(0, subnets[0], 1472);
    c.wait_ping(0, subnets[0], subnets[1]);
    // So do the address and the up state.
    c.nodes[0].nl(|nl| {
        nl.del_address(
            ifindex,
            IpNet::V4(Ipv4Net::new(subnets[0].network(), 32).unwrap()),
        )
        .unwrap();
        nl.set_link_down(ifindex).unwrap();
    });
    c.wait_flannel0(0, subnets[0], 1472);
    c.wait_ping(0, subnets[0], subnets[2]);
    // A deleted flannel0 is recreated (the datapath reattaches) and works.
    c.nodes[0].nl(|nl| nl.del_link(ifindex).unwrap());
    c.wait_flannel0(0, subnets[0], 1472);
    c.wait_ping(0, subnets[0], subnets[1]);
    c.wait_ping(1, subnets[1], subnets[0]);

    // Interop: a datagram crafted as upstream sends it (the bare inner IPv4
    // packet as the UDP payload, to port 8285) is delivered to the pod.
    let node1 = SocketAddrV4::new(c.nodes[0].ip, PORT);
    let pod1 = SocketAddrV4::new(first(subnets[0]), 5555);
    let pod2 = SocketAddrV4::new(first(subnets[1]), 6666);
    let got = receive_after(&c.nodes[0], pod1, || {
        c.nodes[1].send_datagram(
            c.nodes[1].ip,
            node1,
            &inner_udp(pod2, pod1, b"from upstream"),
        )
    });
    let (payload, from) = got.expect("the upstream-format datagram was not delivered");
    assert_eq!(payload, b"from upstream");
    assert_eq!(from, std::net::SocketAddr::V4(pod2));

    // Spoofed: from an address that is no lease's PublicIP (the switch),
    // and from a peer carrying another node's pod address.
    let before = c.settled_counters(0);
    let pod3 = SocketAddrV4::new(first(subnets[2]), 7777);
    let spoof_ns_ok = c.switch.run(|| {
        let s = UdpSocket::bind(SocketAddrV4::new(SWITCH_IP, 0)).unwrap();
        s.send_to(&inner_udp(pod2, pod1, b"spoofed"), node1)
            .unwrap();
    });
    spoof_ns_ok.unwrap();
    c.nodes[1].send_datagram(c.nodes[1].ip, node1, &inner_udp(pod3, pod1, b"spoofed"));
    let after = c.wait_counters(0, "2 more spoofed drops", |k| {
        k.dropped_spoofed >= before.dropped_spoofed + 2
    });
    assert_eq!(after.dropped_spoofed, before.dropped_spoofed + 2);
    assert_eq!(
        after.rx_packets, before.rx_packets,
        "nothing spoofed delivered"
    );

    // Malformed, from a real peer: short, bad version, total length beyond the datagram.
    let good = inner_udp(pod2, pod1, b"x");
    let mut bad_version = good.clone();
    bad_version[0] = 0x65;
    let mut bad_length = good.clone();
    bad_length[2..4].copy_from_slice(&200u16.to_be_bytes());
    fill_ipv4_checksum(&mut bad_length);
    for p in [&good[..12], &bad_version[..], &bad_length[..]] {
        c.nodes[1].send_datagram(c.nodes[1].ip, node1, p);
    }
    let after2 = c.wait_counters(0, "3 more malformed drops", |k| {
        k.dropped_malformed >= after.dropped_malformed + 3
    });
    assert_eq!(after2.dropped_malformed, after.dropped_malformed + 3);
    assert_eq!(
        after2.rx_packets, after.rx_packets,
        "nothing malformed delivered"
    );
    c.wait_ping(0, subnets[0], subnets[1]);

    // A peer's lease vanishes: no more forwarding to it, and its datagrams
    // count as spoofed.
    let d3 = d.pop().unwrap();
    c.stop(2, d3);
    let key3 = c
        .leases()
        .into_iter()
        .find(|l| l.key.ipv4 == Some(subnets[2]))
        .unwrap()
        .key;
    block_on(async {
        LocalStore::open(&c.store)
            .unwrap()
            .delete_lease(&key3)
            .await
            .unwrap()
    });
    let log = c.nodes[0].log();
    wait_for(
        "node1's peer table without node3",
        Duration::from_secs(10),
        || {
            let text = read_log(&log);
            let last = text
                .lines()
                .rfind(|l| l.contains("udp peer table updated"))?
                .to_string();
            (!last.contains(&subnets[2].to_string()) && last.contains(&subnets[1].to_string()))
                .then_some(())
        },
    );
    let before = c.settled_counters(0);
    // As upstream, the sender learns at once: ICMP net unreachable.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.nodes[0].ns.name,
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            "-I",
        ])
        .arg(first(subnets[0]).to_string())
        .arg(first(subnets[2]).to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    // From the node's flannel0 address, as a router answers; not from the
    // destination, which would say that host answered.
    assert!(
        text.contains(&format!(
            "From {} icmp_seq=1 Destination Net Unreachable",
            subnets[0].network()
        )),
        "{text}"
    );
    let after = c.wait_counters(0, "a no-route drop", |k| {
        k.dropped_no_route > before.dropped_no_route
    });
    assert_eq!(after.tx_packets, before.tx_packets, "nothing sent to node3");
    c.nodes[2].send_datagram(c.nodes[2].ip, node1, &inner_udp(pod3, pod1, b"gone"));
    c.wait_counters(0, "node3's datagram dropped as spoofed", |k| {
        k.dropped_spoofed > after.dropped_spoofed
    });
    // The remaining peers still talk.
    c.wait_ping(0, subnets[0], subnets[1]);
    c.wait_ping(1, subnets[1], subnets[0]);
    for (i, daemon) in d.into_iter().enumerate() {
        c.stop(i, daemon);
    }
    // SIGTERM leaves flannel0 (persistent) and its route, as the other backends do.
    assert!(c.nodes[0].link("flannel0").is_some());
}

/// A mixed pair: flannel-rs's flanneld on node1 and, on node2, a node
/// emulating upstream's udp backend: its lease written to the store exactly
/// as upstream writes it (`{"PublicIP":"172.16.1.12","PublicIPv6":null}`, no
/// `BackendType`), and the test's own socket on node2's 172.16.1.12:8285
/// receiving and sending upstream's datagrams (the bare inner IPv4 packet).
/// The lease is a peer (`peers=1`), our packet reaches it encapsulated, and
/// its datagram is delivered, not dropped as spoofed. Our own lease file
/// has no `BackendType` either.
#[test]
fn upstream_udp_node_without_backend_type_is_a_peer_both_ways() {
    let c = Cluster::new("upstream", 2, UDP);
    let upstream_ip = c.nodes[1].ip;
    let upstream_subnet: Ipv4Net = "10.244.210.0/24".parse().unwrap();
    let upstream_value = format!(r#"{{"PublicIP":"{upstream_ip}","PublicIPv6":null}}"#);
    let upstream_key = LeaseKey::v4(upstream_subnet);
    let store = LocalStore::open(&c.store).unwrap();
    let lease = Lease {
        key: upstream_key,
        attrs: LeaseAttrs::from_json(&upstream_value).unwrap(),
        expiration: None,
    };
    block_on(store.create_lease(&lease, Some(Duration::from_secs(24 * 3600))))
        .unwrap()
        .expect("the upstream node's subnet is free");
    let file = fs::read_to_string(store.lease_path(&upstream_key)).unwrap();
    assert!(
        file.contains(&format!(r#""LeaseAttrs":{upstream_value}"#)),
        "the store holds upstream's exact value: {file}"
    );

    let mut d = c.start(0);
    let subnet = c.wait_subnet(0, &mut d);
    c.wait_flannel0(0, subnet, 1472);
    c.nodes[0].add_target(subnet);
    let log = c.nodes[0].log();
    wait_for(
        "the first pass with peers=1",
        Duration::from_secs(10),
        || {
            read_log(&log)
                .lines()
                .any(|l| l.contains("datapath programmed") && l.contains("peers=1"))
                .then_some(())
        },
    );
    assert!(
        read_log(&log).contains(&format!("{upstream_subnet} via {upstream_ip}")),
        "the peer table names the upstream node:\n{}",
        read_log(&log)
    );

    // Our lease file: upstream's udp value, byte for byte.
    let own = fs::read_to_string(store.lease_path(&LeaseKey::v4(subnet))).unwrap();
    assert!(!own.contains("BackendType"), "{own}");
    assert!(
        own.contains(&format!(
            r#""LeaseAttrs":{{"PublicIP":"{}","PublicIPv6":null}}"#,
            c.nodes[0].ip
        )),
        "{own}"
    );

    // Out: a packet from our pod address to the upstream node's pod leaves
    // as upstream's datagram to its PublicIP:8285.
    let our_pod = SocketAddrV4::new(first(subnet), 5555);
    let upstream_pod = SocketAddrV4::new(first(upstream_subnet), 7000);
    let upstream_sock = SocketAddrV4::new(upstream_ip, PORT);
    let got = receive_after(&c.nodes[1], upstream_sock, || {
        c.nodes[0].send_datagram(*our_pod.ip(), upstream_pod, b"to upstream")
    });
    let (datagram, from) = got.unwrap_or_else(|| {
        panic!(
            "nothing arrived at the upstream node's {upstream_sock}; log:\n{}",
            read_log(&log)
        )
    });
    assert_eq!(from.ip(), IpAddr::V4(c.nodes[0].ip), "from our PublicIP");
    let inner = parse_ipv4(&datagram).expect("the payload is the bare inner IPv4 packet");
    assert_eq!((inner.src, inner.dst), (*our_pod.ip(), *upstream_pod.ip()));
    assert_eq!(
        inner.total_len,
        datagram.len(),
        "nothing before or after it"
    );
    assert_eq!(&datagram[22..24], &7000u16.to_be_bytes());
    assert_eq!(&datagram[28..], b"to upstream");

    // In: the upstream node answers from its port 8285 with the bare
    // packet; it is delivered to our pod address.
    let node1 = SocketAddrV4::new(c.nodes[0].ip, PORT);
    let got = receive_after(&c.nodes[0], our_pod, || {
        c.nodes[1].send_datagram_from(
            upstream_sock,
            node1,
            &inner_udp(upstream_pod, our_pod, b"from upstream"),
        )
    });
    let (payload, from) = got.expect("the upstream node's datagram was not delivered");
    assert_eq!(payload, b"from upstream");
    assert_eq!(from, std::net::SocketAddr::V4(upstream_pod));
    let k = c.wait_counters(0, "one packet each way", |k| {
        k.tx_packets >= 1 && k.rx_packets >= 1
    });
    assert_eq!(k.dropped_spoofed, 0, "{k:?}");
    c.stop(0, d);
}

#[test]
fn switching_vxlan_udp_vxlan_on_restart_leaves_nothing_of_the_old_backend() {
    let c = Cluster::new("switch", 2, VXLAN);
    let mut d: Vec<Daemon> = (0..2).map(|i| c.start(i)).collect();
    let subnets: Vec<Ipv4Net> = (0..2).map(|i| c.wait_subnet(i, &mut d[i])).collect();
    for (i, subnet) in subnets.iter().enumerate() {
        c.nodes[i].add_target(*subnet);
        c.wait_mtu(i, 1450);
    }
    c.wait_ping(0, subnets[0], subnets[1]);
    for (i, daemon) in d.into_iter().enumerate() {
        c.stop(i, daemon);
    }
    assert!(
        c.nodes[0].link("flannel.1").is_some(),
        "SIGTERM leaves the device"
    );
    // A host-gw route of a node that vanished (an earlier host-gw run).
    let eth0 = c.nodes[0].link("eth0").unwrap().index;
    let stale = Route {
        dst: "10.244.250.0/24".parse().unwrap(),
        gateway: Some(IpAddr::V4(c.nodes[1].ip)),
        oif: eth0,
        onlink: false,
    };
    c.nodes[0].nl(|nl| nl.replace_route(&stale).unwrap());

    // udp: flannel.1 and its routes gone, the stale route too, flannel0 in
    // (wait_flannel0 wants the cluster route as the only route inside the network).
    c.set_config(UDP);
    let mut d: Vec<Daemon> = (0..2).map(|i| c.start(i)).collect();
    for (i, daemon) in d.iter_mut().enumerate() {
        assert_eq!(c.wait_subnet(i, daemon), subnets[i], "same subnet kept");
    }
    for (i, subnet) in subnets.iter().enumerate() {
        c.wait_mtu(i, 1472);
        c.wait_flannel0(i, *subnet, 1472);
        assert!(c.nodes[i].link("flannel.1").is_none());
    }
    // The vxlan lease is rewritten as udp's: no BackendType, no BackendData.
    for l in c.leases() {
        assert_eq!(l.attrs.effective_backend_type(), BACKEND_UDP, "{l:?}");
        assert_eq!(
            (l.attrs.backend_type.as_str(), &l.attrs.backend_data),
            ("", &None)
        );
    }
    c.wait_ping(0, subnets[0], subnets[1]);
    c.wait_ping(1, subnets[1], subnets[0]);
    for (i, daemon) in d.into_iter().enumerate() {
        c.stop(i, daemon);
    }
    // Again a host-gw route of a node that vanished while we were down.
    c.nodes[0].nl(|nl| nl.replace_route(&stale).unwrap());

    // Back to vxlan: flannel0 (and its route) removed, the stale route too.
    c.set_config(VXLAN);
    let mut d: Vec<Daemon> = (0..2).map(|i| c.start(i)).collect();
    for (i, daemon) in d.iter_mut().enumerate() {
        c.wait_subnet(i, daemon);
    }
    for i in 0..2 {
        c.wait_mtu(i, 1450);
        wait_for("flannel0 removed", Duration::from_secs(10), || {
            c.nodes[i].link("flannel0").is_none().then_some(())
        });
        let dev = wait_for("flannel.1", Duration::from_secs(10), || {
            c.nodes[i].link("flannel.1")
        });
        wait_for(
            "only the vxlan route in the cluster network",
            Duration::from_secs(10),
            || {
                let r = c.nodes[i].cluster_routes();
                (r.len() == 1 && r[0].oif == dev.index).then_some(())
            },
        );
    }
    assert!(c
        .leases()
        .iter()
        .all(|l| l.attrs.backend_type == BACKEND_VXLAN));
    c.wait_ping(0, subnets[0], subnets[1]);
    for (i, daemon) in d.into_iter().enumerate() {
        c.stop(i, daemon);
    }
}

/// Runs iperf3 (TCP, `secs` seconds) from node `from`'s pod address to node
/// `to`'s; returns the received bits per second.
fn iperf3(c: &Cluster, from: usize, to: usize, subnets: &[Ipv4Net], secs: u32) -> f64 {
    let server_ip = first(subnets[to]).to_string();
    let server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.nodes[to].ns.name,
            "iperf3",
            "-s",
            "-1",
            "-B",
        ])
        .arg(&server_ip)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 installed (apt-get install iperf3)");
    let server = Daemon(Some(server));
    std::thread::sleep(Duration::from_millis(500));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.nodes[from].ns.name,
            "iperf3",
            "-J",
            "-c",
        ])
        .arg(&server_ip)
        .arg("-B")
        .arg(first(subnets[from]).to_string())
        .args(["-t", &secs.to_string()])
        .output()
        .unwrap();
    drop(server);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 output ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no throughput in {v}"))
}

/// CPU seconds (user + system) per thread name of a running daemon.
fn thread_cpu(d: &Daemon) -> Vec<(String, f64)> {
    let pid = d.0.as_ref().unwrap().id();
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let mut out: Vec<(String, f64)> = Vec::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in dir.flatten() {
        let Ok(stat) = fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        let ticks: f64 = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some(e) => e.1 += ticks / tick,
            None => out.push((name, ticks / tick)),
        }
    }
    out
}

/// Throughput of the udp backend against vxlan between two simulated pods
/// (TCP, iperf3). A measurement, not a pass/fail check of the machine's
/// speed: run it on a quiet machine with
/// `cargo test --release -p flanneld --test udp -- --ignored --nocapture`.
/// It asserts only that udp reaches half of vxlan (the target).
#[test]
#[ignore = "a throughput measurement; run explicitly with --release --ignored"]
fn throughput_udp_vs_vxlan_iperf3() {
    let secs = 5;
    let c = Cluster::new("perf", 2, VXLAN);
    let mut results = Vec::new();
    for (name, config) in [("vxlan", VXLAN), ("udp", UDP)] {
        c.set_config(config);
        let mut d: Vec<Daemon> = (0..2).map(|i| c.start(i)).collect();
        let subnets: Vec<Ipv4Net> = (0..2).map(|i| c.wait_subnet(i, &mut d[i])).collect();
        for (i, s) in subnets.iter().enumerate() {
            c.nodes[i].add_target(*s);
        }
        c.wait_mtu(0, if name == "udp" { 1472 } else { 1450 });
        c.wait_ping(0, subnets[0], subnets[1]);
        let cpu0: Vec<_> = d.iter().map(thread_cpu).collect();
        // Tuning aid: UDP_PERF_RECORD=FILE profiles both daemons with perf(1).
        let perf = std::env::var("UDP_PERF_RECORD")
            .ok()
            .filter(|_| name == "udp")
            .map(|out| {
                let pids: Vec<String> = d
                    .iter()
                    .map(|x| x.0.as_ref().unwrap().id().to_string())
                    .collect();
                Daemon(Some(
                    Command::new("perf")
                        .args([
                            "record",
                            "-g",
                            "-o",
                            &out,
                            "-p",
                            &pids.join(","),
                            "--",
                            "sleep",
                        ])
                        .arg((secs - 1).to_string())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("perf installed"),
                ))
            });
        let bps = iperf3(&c, 0, 1, &subnets, secs);
        if let Some(mut p) = perf {
            let _ = p.0.take().unwrap().wait();
        }
        println!("{name}: {:.2} Gbit/s", bps / 1e9);
        for (i, daemon) in d.iter().enumerate() {
            let busy: Vec<String> = thread_cpu(daemon)
                .into_iter()
                .map(|(t, secs)| {
                    let before = cpu0[i].iter().find(|(n, _)| *n == t).map_or(0.0, |x| x.1);
                    (t, secs - before)
                })
                .filter(|(_, s)| *s > 0.05)
                .map(|(t, s)| format!("{t} {s:.2}s"))
                .collect();
            println!(
                "  node{} flanneld CPU by thread: {}",
                i + 1,
                busy.join(", ")
            );
        }
        results.push(bps);
        for (i, daemon) in d.into_iter().enumerate() {
            c.stop(i, daemon);
        }
    }
    for n in &c.nodes {
        for l in read_log(&n.log())
            .lines()
            .filter(|l| {
                l.contains("udp datapath started")
                    || l.contains("udp egress")
                    || l.contains("udp ingress")
            })
            .take(5)
        {
            println!("  {l}");
        }
    }
    if let Some(k) = c.nodes[0].counters() {
        println!("udp counters on node1: {k:?}");
    }
    let ratio = results[1] / results[0];
    println!("udp / vxlan = {ratio:.2}");
    assert!(ratio >= 0.5, "udp reached only {ratio:.2} of vxlan");
}

/// A TCP stream through the udp backend arrives byte for byte: the
/// receiving side coalesces the segments into super-packets for the TUN
/// device (offloads), so an error in that (order, lengths, checksums)
/// would corrupt or stall the stream.
#[test]
fn tcp_stream_through_udp_arrives_intact_on_one_thread_at_each_end() {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    let c = Cluster::new("tcp", 2, UDP);
    // Two queues (threads) per node, whatever the machine's core count: the
    // stream and its ACKs must stay on one of them at each end.
    let mut d: Vec<Daemon> = (0..2)
        .map(|i| c.start_with_queues(i, Some("2".into())))
        .collect();
    let subnets: Vec<Ipv4Net> = (0..2).map(|i| c.wait_subnet(i, &mut d[i])).collect();
    for (i, s) in subnets.iter().enumerate() {
        c.nodes[i].add_target(*s);
    }
    c.wait_mtu(0, 1472);
    c.wait_ping(0, subnets[0], subnets[1]);
    // 64 MiB of xorshift noise: no two segments alike.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..64 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    // Sockets stay in the namespace they were made in.
    let server = SocketAddrV4::new(first(subnets[1]), 5201);
    let listener = c.nodes[1]
        .ns
        .run(|| TcpListener::bind(server).unwrap())
        .unwrap();
    let mut client = c.nodes[0]
        .ns
        .run(|| TcpStream::connect_timeout(&server.into(), Duration::from_secs(5)).unwrap())
        .unwrap();
    client
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    client.write_all(&data).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let got = reader.join().unwrap();
    assert_eq!(got.len(), data.len(), "bytes received");
    assert!(got == data, "the received stream differs from the sent one");
    let k = c.settled_counters(1);
    assert!(k.rx_packets > 40_000, "received through udp: {k:?}");
    // One flow, one thread per node: the other queue's thread only woke for
    // its idle poll timeouts. (A thread per direction, or a flow moving
    // between threads, shows up as CPU on both.)
    for (i, daemon) in d.iter().enumerate() {
        let mut q: Vec<f64> = thread_cpu(daemon)
            .into_iter()
            .filter(|(name, _)| name.starts_with("udp-q"))
            .map(|(_, cpu)| cpu)
            .collect();
        q.sort_by(f64::total_cmp);
        assert_eq!(q.len(), 2, "node{i}: two queue threads: {q:?}");
        assert!(
            q[1] >= 0.05 && q[0] <= 0.02 + q[1] * 0.1,
            "node{i}: the stream was carried by more than one thread (CPU seconds {q:?})"
        );
    }
    for (i, daemon) in d.into_iter().enumerate() {
        c.stop(i, daemon);
    }
}
