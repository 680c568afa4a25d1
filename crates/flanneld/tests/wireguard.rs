//! Root integration tests of the wireguard backend: real `flanneld`
//! processes in network namespaces, and an independent WireGuard
//! implementation (Debian's `wireguard-go` configured with `wg`) as a peer.
//!
//! Topology: the shared underlay (a switch namespace with bridge `br0`, one
//! namespace per node with `eth0` 172.16.1.1N/24 and, for the IPv6 tests,
//! fd00:16::1N/64), leases in a temporary local-store directory, each
//! node's key file in its directory (`WIREGUARD_KEY_FILE`). Each node gets
//! the first address of its subnet(s) on `lo` as a target standing in for
//! a pod. Namespaces, processes (killed by PID) and directories go on
//! drop, also on panic.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flannel_core::datapath::Route;
use flannel_core::lease::IpFamily;
use flannel_core::lease::{Lease, LeaseKey};
use flannel_core::wireguard::{lease_data, Counters, WgKey, BACKEND_WIREGUARD};
use flannel_store::{LocalStore, Store};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

mod common;
use common::{
    block_on, flanneld_in, local_store_flags, ping_in, read_log, wait_for, Daemon, NodeNs, Testbed,
};

const NETWORK: &str = "10.244.0.0/16";
const NETWORK6: &str = "fd00:10:244::/56";
// SubnetMax keeps random subnets below the ones tests hand out by hand.
const V4: &str = r#"{"Network": "10.244.0.0/16", "SubnetMax": "10.244.199.0", "Backend": {"Type": "wireguard"}}"#;
const DUAL: &str = r#"{"Network": "10.244.0.0/16", "SubnetMax": "10.244.199.0", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", "IPv6SubnetMax": "fd00:10:244:c7::", "Backend": {"Type": "wireguard", "PersistentKeepaliveInterval": 25}}"#;
const V6_ONLY: &str = r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", "IPv6SubnetMax": "fd00:10:244:c7::", "Backend": {"Type": "wireguard", "PSK": "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE="}}"#;
const DEV: &str = "flannel-wg";
const DEV6: &str = "flannel-wg-v6";

struct Node {
    ip4: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
    base: NodeNs,
}

impl std::ops::Deref for Node {
    type Target = NodeNs;
    fn deref(&self) -> &NodeNs {
        &self.base
    }
}

impl Node {
    fn key_file(&self) -> PathBuf {
        self.dir.join("wgkey")
    }
    fn counters(&self, dev: &str) -> Option<Counters> {
        let p = self.dir.join(format!("{dev}-stats.json"));
        serde_json::from_str(&fs::read_to_string(p).ok()?).ok()
    }
    /// Routes inside `network` through any device, sorted.
    fn routes_in(&self, network: IpNet) -> Vec<Route> {
        let mut r: Vec<Route> = self
            .nl(|nl| nl.list_routes().unwrap())
            .into_iter()
            .filter(|r| network.contains(&r.dst))
            .collect();
        r.sort();
        r
    }
    /// Puts the first address of each subnet on lo (idempotent).
    fn add_targets(&self, subnets: &[IpNet]) {
        let addrs: Vec<IpNet> = subnets
            .iter()
            .map(|s| IpNet::new(first(*s), s.max_prefix_len()).unwrap())
            .collect();
        self.nl(|nl| {
            let lo = nl.link_by_name("lo").unwrap().unwrap();
            let have = nl.list_addresses(lo.index).unwrap();
            for a in addrs {
                if !have.contains(&a) {
                    nl.add_address_nodad(lo.index, a).unwrap();
                }
            }
            nl.set_link_up(lo.index).unwrap();
        });
    }
    /// The public key `wg pubkey` derives from this node's key file.
    fn wg_pubkey(&self) -> WgKey {
        let key = fs::read(self.key_file()).unwrap();
        let mut child = Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("wg (wireguard-tools) is installed");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&key).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "wg pubkey failed");
        String::from_utf8(out.stdout).unwrap().parse().unwrap()
    }
}

/// The first usable address of a subnet (what subnet.env names).
fn first(s: IpNet) -> IpAddr {
    match s {
        IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) + 1)),
        IpNet::V6(n) => IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) + 1)),
    }
}

/// This file's nodes on the shared testbed ([`common::Cluster`]).
type Cluster = common::Cluster<Node>;

impl Cluster {
    /// `n` nodes; with `v6` each eth0 also gets fd00:16::1N/64.
    fn new(tag: &str, n: usize, config: &str, v6: bool) -> Cluster {
        let (bed, underlay) = Testbed::new(&format!("wg-{tag}"), "fdwg", n, None, config);
        let mut nodes = Vec::new();
        for (idx, (base, ip4)) in underlay.into_iter().enumerate() {
            let ip6: Option<Ipv6Addr> =
                v6.then(|| format!("fd00:16::1{}", idx + 1).parse().unwrap());
            if let Some(a) = ip6 {
                base.nl(|nl| {
                    let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
                    nl.add_address_nodad(eth0.index, IpNet::V6(Ipv6Net::new(a, 64).unwrap()))
                        .unwrap();
                });
            }
            nodes.push(Node { ip4, ip6, base });
        }
        Cluster { nodes, bed }
    }

    fn start(&self, i: usize) -> Daemon {
        let node = &self.nodes[i];
        let mut cmd = flanneld_in(&node.ns, &node.log());
        cmd.env("WIREGUARD_KEY_FILE", node.key_file())
            .args(local_store_flags(
                &self.store,
                &self.config,
                &node.subnet_file(),
            ))
            .args(["--iface", "eth0", "--resync-interval", "30"]);
        Daemon(Some(cmd.spawn().expect("spawn flanneld")))
    }

    fn stop(&self, i: usize, d: Daemon) {
        d.stop(&self.nodes[i].log());
    }

    /// Waits for node `i`'s subnet.env; returns its subnets (v4, v6).
    fn wait_subnets(&self, i: usize, d: &mut Daemon, v4: bool, v6: bool) -> Vec<IpNet> {
        let node = &self.nodes[i];
        let key = wait_for("subnet.env", Duration::from_secs(15), || {
            d.check_alive(&node.log());
            let k = node.subnet_env()?.lease_key()?;
            (k.ipv4.is_some() == v4 && k.ipv6.is_some() == v6).then_some(k)
        });
        let mut out: Vec<IpNet> = key.ipv4.map(IpNet::V4).into_iter().collect();
        out.extend(key.ipv6.map(IpNet::V6));
        node.add_targets(&out);
        out
    }

    fn lease_of(&self, key: &LeaseKey) -> Lease {
        self.leases()
            .into_iter()
            .find(|l| l.key == *key)
            .unwrap_or_else(|| panic!("no lease {key}"))
    }

    /// Waits until node `i` pings `dst` from `src` (both pod stand-ins).
    fn wait_ping(&self, i: usize, src: IpAddr, dst: IpAddr) {
        let node = &self.nodes[i];
        let start = Instant::now();
        while !ping_in(&node.ns.name, Some(src), dst) {
            if start.elapsed() > Duration::from_secs(15) {
                panic!(
                    "no ping from node{} {src} to {dst}; log:\n{}",
                    i + 1,
                    read_log(&node.log())
                );
            }
        }
    }

    /// Waits until node `i`'s `dev` is as the backend sets it up: kind tun,
    /// `mtu`, exactly `addrs` (besides the kernel's IPv6 link-local one), up,
    /// and `<network> dev <dev>` the only route of ours inside `network`.
    fn wait_device(&self, i: usize, dev: &str, mtu: u32, addrs: &[IpNet], network: IpNet) -> u32 {
        let node = &self.nodes[i];
        let mut last = String::new();
        let start = Instant::now();
        loop {
            if let Some(l) = node.link(dev) {
                let idx = l.index;
                let mut have = node.nl(move |nl| nl.list_addresses(idx).unwrap());
                have.retain(|a| !matches!(a, IpNet::V6(n) if n.addr().segments()[0] == 0xfe80));
                have.sort();
                let mut want = addrs.to_vec();
                want.sort();
                let mut routes = node.routes_in(network);
                // Through the device (not our pod stand-ins on lo), without
                // the kernel's own route for an IPv6 /128 address.
                routes.retain(|r| r.oif == idx && !addrs.contains(&r.dst));
                let want_route = Route {
                    dst: network,
                    gateway: None,
                    oif: idx,
                    onlink: false,
                };
                if l.kind.as_deref() == Some("tun")
                    && l.mtu == mtu
                    && l.up
                    && have == want
                    && routes == vec![want_route]
                {
                    return idx;
                }
                last = format!("{l:?} {have:?} {routes:?}");
            }
            if start.elapsed() > Duration::from_secs(15) {
                panic!(
                    "node{} {dev}: {last}; log:\n{}",
                    i + 1,
                    read_log(&node.log())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until node `i`'s counters of `dev` satisfy `f`.
    fn wait_counters(
        &self,
        i: usize,
        dev: &str,
        what: &str,
        f: impl Fn(&Counters) -> bool,
    ) -> Counters {
        let node = &self.nodes[i];
        wait_for(
            &format!(
                "node{} {dev} counters: {what}; log:\n{}",
                i + 1,
                read_log(&node.log())
            ),
            Duration::from_secs(10),
            || node.counters(dev).filter(|c| f(c)),
        )
    }

    fn delete_lease(&self, key: &LeaseKey) {
        block_on(async {
            LocalStore::open(&self.store)
                .unwrap()
                .delete_lease(key)
                .await
                .unwrap()
        });
    }
}

/// `tcpdump -i eth0` in a node's namespace, written to a file: everything
/// the node sends to and receives from the underlay (on the switch's `br0`
/// tcpdump would see only what the bridge floods or delivers locally).
struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    fn start(ns: &str, file: &Path) -> Capture {
        // Its messages go to a file: a pipe closed early would kill it
        // (SIGPIPE) at its next message. --immediate-mode: packets reach
        // tcpdump at once, not in blocks a second later (a SIGTERM before
        // then loses them).
        let log = file.with_extension("log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "tcpdump",
                "-i",
                "eth0",
                "--immediate-mode",
                "-U",
                "-n",
                "-w",
            ])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("tcpdump is installed");
        // tcpdump says "listening on eth0" once it captures.
        wait_for("tcpdump listening", Duration::from_secs(10), || {
            read_log(&log).contains("listening on").then_some(())
        });
        Capture {
            child,
            file: file.to_path_buf(),
        }
    }

    /// SIGTERM (by PID), then the captured file.
    fn finish(mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(300));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        fs::read(&self.file).unwrap()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An IP packet of a pcap: (src, dst, protocol, source port, destination port).
type Seen = (IpAddr, IpAddr, u8, u16, u16);

/// The IP packets of a pcap of Ethernet frames (IPv6 without extension headers).
fn pcap_packets(pcap: &[u8]) -> Vec<Seen> {
    assert!(pcap.len() >= 24, "no pcap header");
    assert_eq!(
        u32::from_le_bytes(pcap[20..24].try_into().unwrap()),
        1,
        "Ethernet"
    );
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let incl = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().unwrap()) as usize;
        let f = &pcap[at + 16..(at + 16 + incl).min(pcap.len())];
        at += 16 + incl;
        if f.len() < 14 {
            continue;
        }
        let p = &f[14..];
        let ports = |l4: &[u8]| {
            if l4.len() >= 4 {
                (
                    u16::from_be_bytes([l4[0], l4[1]]),
                    u16::from_be_bytes([l4[2], l4[3]]),
                )
            } else {
                (0, 0)
            }
        };
        match u16::from_be_bytes([f[12], f[13]]) {
            0x0800 if p.len() >= 20 => {
                let ihl = usize::from(p[0] & 15) * 4;
                let (s, d) = ports(&p[ihl.min(p.len())..]);
                let a = |o: usize| IpAddr::V4(Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]));
                out.push((a(12), a(16), p[9], s, d));
            }
            0x86dd if p.len() >= 40 => {
                let (s, d) = ports(&p[40..]);
                let a = |o: usize| {
                    let b: [u8; 16] = p[o..o + 16].try_into().unwrap();
                    IpAddr::V6(Ipv6Addr::from(b))
                };
                out.push((a(8), a(24), p[6], s, d));
            }
            _ => {}
        }
    }
    out
}

/// Checks a capture of the underlay: every IP packet between two of
/// `nodes` is UDP to or from one of `ports` (WireGuard) or IPv6 neighbour
/// discovery, there are at least
/// `min` of them, and `marker` appears nowhere.
fn assert_only_wireguard(pcap: &[u8], nodes: &[IpAddr], ports: &[u16], min: usize, marker: &[u8]) {
    let between: Vec<Seen> = pcap_packets(pcap)
        .into_iter()
        .filter(|(s, d, ..)| nodes.contains(s) && nodes.contains(d))
        .collect();
    let foreign: Vec<&Seen> = between
        .iter()
        .filter(|(_, _, proto, sp, dp)| {
            let wireguard = *proto == 17 && (ports.contains(sp) || ports.contains(dp));
            // IPv6 neighbour discovery (ICMPv6 133..=137; the type is the
            // first byte where ports would be) is the underlay's own.
            let ndp = *proto == 58 && (133..=137).contains(&(sp >> 8));
            !(wireguard || ndp)
        })
        .collect();
    assert!(
        foreign.is_empty(),
        "non-WireGuard packets between nodes: {foreign:?}"
    );
    assert!(
        between.len() >= min,
        "only {} WireGuard packets captured: {between:?}; all: {:?}; {} bytes",
        between.len(),
        pcap_packets(pcap),
        pcap.len()
    );
    assert!(
        !pcap.windows(marker.len()).any(|w| w == marker),
        "the cleartext marker crossed the underlay"
    );
}

/// Sends `payload` from `src` to `dst:port` in `from`'s namespace and
/// receives it in `to`'s, up to 5 tries; whether it arrived intact.
fn udp_through(
    from: &Node,
    to: &Node,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    payload: &[u8],
) -> bool {
    to.ns
        .run(|| {
            let rx = UdpSocket::bind(SocketAddr::new(dst, port)).unwrap();
            rx.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut buf = [0u8; 2048];
            for _ in 0..5 {
                from.ns
                    .run(|| {
                        let s = UdpSocket::bind(SocketAddr::new(src, 0)).unwrap();
                        s.send_to(payload, SocketAddr::new(dst, port)).unwrap();
                    })
                    .unwrap();
                if let Ok((n, _)) = rx.recv_from(&mut buf) {
                    return &buf[..n] == payload;
                }
            }
            false
        })
        .unwrap()
}

#[test]
fn ipv4_encrypted_drift_restart_rekey_and_peer_removal() {
    let c = Cluster::new("v4", 2, V4, false);
    let mut d: Vec<Daemon> = (0..2).map(|i| c.start(i)).collect();
    let s: Vec<IpNet> = (0..2)
        .map(|i| c.wait_subnets(i, &mut d[i], true, false)[0])
        .collect();
    let net: IpNet = NETWORK.parse().unwrap();

    // Leases as upstream's: BackendType wireguard, BackendData with the
    // public key `wg pubkey` derives from the key file, and the port.
    for (i, sub) in s.iter().enumerate() {
        let node = &c.nodes[i];
        let l = c.lease_of(&LeaseKey::v4(match sub {
            IpNet::V4(n) => *n,
            _ => unreachable!(),
        }));
        let pk = node.wg_pubkey();
        assert_eq!(l.attrs.backend_type, BACKEND_WIREGUARD);
        assert_eq!(
            l.attrs.to_json(),
            format!(
                r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{pk}","Port":51820}}}}"#,
                node.ip4
            )
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(node.key_file()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "key file mode");
        let env = node.subnet_env().unwrap();
        assert_eq!(env.mtu, 1420, "pod MTU = eth0's 1500 - 80");
        let addr = IpNet::new(sub.network(), 32).unwrap();
        c.wait_device(i, DEV, 1420, &[addr], net);
        assert!(node.link(DEV6).is_none());
    }

    // Pod to pod both ways, and the underlay carries only WireGuard.
    let cap = Capture::start(&c.nodes[0].ns.name, &c.tmp.0.join("v4.pcap"));

    c.wait_ping(0, first(s[0]), first(s[1]));
    c.wait_ping(1, first(s[1]), first(s[0]));
    let marker = format!("FLANNEL-WG-MARKER-{}", std::process::id());
    assert!(udp_through(
        &c.nodes[0],
        &c.nodes[1],
        first(s[0]),
        first(s[1]),
        7777,
        marker.as_bytes()
    ));
    assert!(udp_through(
        &c.nodes[1],
        &c.nodes[0],
        first(s[1]),
        first(s[0]),
        7778,
        marker.as_bytes()
    ));
    let pcap = cap.finish();
    let nodes = [IpAddr::V4(c.nodes[0].ip4), IpAddr::V4(c.nodes[1].ip4)];
    assert_only_wireguard(&pcap, &nodes, &[51820], 6, marker.as_bytes());
    let tx = c.wait_counters(0, DEV, "tx and rx", |c| {
        c.tx_packets >= 2 && c.rx_packets >= 2 && c.handshakes_received >= 1
    });
    assert_eq!(tx.dropped_not_allowed, 0);
    // A stream of 32 MB each way arrives byte for byte (TSO split and
    // encrypted per MTU, decrypted and coalesced back on the other side).
    assert!(tcp_stream(
        &c.nodes[0],
        &c.nodes[1],
        first(s[0]),
        first(s[1]),
        32 << 20
    ));
    assert!(tcp_stream(
        &c.nodes[1],
        &c.nodes[0],
        first(s[1]),
        first(s[0]),
        32 << 20
    ));

    // Drift: the device or its route deleted comes back and carries again.
    let idx = c.nodes[0].link(DEV).unwrap().index;
    c.nodes[0].nl(move |nl| nl.del_link(idx).unwrap());
    let addr0 = IpNet::new(s[0].network(), 32).unwrap();
    let idx = c.wait_device(0, DEV, 1420, &[addr0], net);
    c.wait_ping(0, first(s[0]), first(s[1]));
    c.nodes[0].nl(move |nl| {
        nl.del_route(&Route {
            dst: net,
            gateway: None,
            oif: idx,
            onlink: false,
        })
        .unwrap()
    });
    c.wait_device(0, DEV, 1420, &[addr0], net);
    c.wait_ping(0, first(s[0]), first(s[1]));
    // A stale route of ours inside the network through the device goes.
    let stale: IpNet = "10.244.250.0/24".parse().unwrap();
    c.nodes[0].nl(move |nl| {
        nl.replace_route(&Route {
            dst: stale,
            gateway: None,
            oif: idx,
            onlink: false,
        })
        .unwrap()
    });
    c.wait_device(0, DEV, 1420, &[addr0], net);

    // Restart: the key stays (same lease bytes), the device is reused, traffic flows.
    let key_before = fs::read_to_string(c.nodes[0].key_file()).unwrap();
    let lease_before = c.lease_of(&LeaseKey::v4(match s[0] {
        IpNet::V4(n) => n,
        _ => unreachable!(),
    }));
    c.stop(0, d.remove(0));
    assert!(c.nodes[0].link(DEV).is_some(), "SIGTERM leaves the device");
    d.insert(0, c.start(0));
    c.wait_subnets(0, &mut d[0], true, false);
    assert_eq!(
        fs::read_to_string(c.nodes[0].key_file()).unwrap(),
        key_before
    );
    let lease_after = c.lease_of(&lease_before.key);
    assert_eq!(lease_after.attrs, lease_before.attrs);
    c.wait_ping(0, first(s[0]), first(s[1]));
    c.wait_ping(1, first(s[1]), first(s[0]));

    // Re-key: node 2 comes back with a new key; node 1 re-peers with it.
    let k2 = LeaseKey::v4(match s[1] {
        IpNet::V4(n) => n,
        _ => unreachable!(),
    });
    let old = lease_data(&c.lease_of(&k2).attrs, IpFamily::V4).unwrap().0;
    c.stop(1, d.remove(1));
    fs::remove_file(c.nodes[1].key_file()).unwrap();
    d.push(c.start(1));
    c.wait_subnets(1, &mut d[1], true, false);
    let new = wait_for(
        "node2's new key in its lease",
        Duration::from_secs(10),
        || {
            let k = lease_data(&c.lease_of(&k2).attrs, IpFamily::V4)?.0;
            (k != old).then_some(k)
        },
    );
    assert_eq!(new, c.nodes[1].wg_pubkey());
    c.wait_ping(0, first(s[0]), first(s[1]));
    c.wait_ping(1, first(s[1]), first(s[0]));
    let log = read_log(&c.nodes[0].log());
    assert!(
        log.contains(&new.to_string()),
        "node1 logs the new peer key:\n{log}"
    );

    // Peer removal: node 2 gone with its lease; node 1 drops its peer and
    // counts what it can no longer send.
    c.stop(1, d.remove(1));
    c.delete_lease(&k2);
    let before = c.nodes[0].counters(DEV).unwrap().dropped_no_peer;
    wait_for(
        "node1 drops packets for the vanished peer",
        Duration::from_secs(10),
        || {
            let _ = ping_in(&c.nodes[0].ns.name, Some(first(s[0])), first(s[1]));
            (c.nodes[0].counters(DEV)?.dropped_no_peer > before).then_some(())
        },
    );
    c.stop(0, d.remove(0));
}

#[test]
fn dual_stack_separate_devices_and_ipv6_only_with_psk() {
    {
        let c = Cluster::new("dual", 2, DUAL, true);
        let mut d: Vec<Daemon> = (0..2).map(|i| c.start(i)).collect();
        let s: Vec<Vec<IpNet>> = (0..2)
            .map(|i| c.wait_subnets(i, &mut d[i], true, true))
            .collect();
        let (net, net6): (IpNet, IpNet) = (NETWORK.parse().unwrap(), NETWORK6.parse().unwrap());
        for (i, si) in s.iter().enumerate() {
            let node = &c.nodes[i];
            c.wait_device(
                i,
                DEV,
                1420,
                &[IpNet::new(si[0].network(), 32).unwrap()],
                net,
            );
            c.wait_device(
                i,
                DEV6,
                1420,
                &[IpNet::new(si[1].network(), 128).unwrap()],
                net6,
            );
            let l = c.lease_of(&node.subnet_env().unwrap().lease_key().unwrap());
            let pk = node.wg_pubkey();
            assert_eq!(
                l.attrs.to_json(),
                format!(
                    r#"{{"PublicIP":"{}","PublicIPv6":"{}","BackendType":"wireguard","BackendData":{{"PublicKey":"{pk}","Port":51820}},"BackendV6Data":{{"PublicKey":"{pk}","Port":51821}}}}"#,
                    node.ip4,
                    node.ip6.unwrap()
                )
            );
        }
        let cap = Capture::start(&c.nodes[0].ns.name, &c.tmp.0.join("dual.pcap"));
        for (a, b) in s[0].iter().zip(&s[1]) {
            c.wait_ping(0, first(*a), first(*b));
            c.wait_ping(1, first(*b), first(*a));
        }
        let marker = format!("FLANNEL-WG6-MARKER-{}", std::process::id());
        assert!(udp_through(
            &c.nodes[0],
            &c.nodes[1],
            first(s[0][1]),
            first(s[1][1]),
            7777,
            marker.as_bytes()
        ));
        let pcap = cap.finish();
        let nodes: Vec<IpAddr> = c
            .nodes
            .iter()
            .flat_map(|n| [IpAddr::V4(n.ip4), IpAddr::V6(n.ip6.unwrap())])
            .collect();
        assert_only_wireguard(&pcap, &nodes, &[51820, 51821], 8, marker.as_bytes());
        // IPv6 traffic went over flannel-wg-v6, on IPv6 endpoints.
        let v6: Vec<Seen> = pcap_packets(&pcap)
            .into_iter()
            .filter(|(a, b, proto, ..)| {
                *proto == 17 && a.is_ipv6() && nodes.contains(a) && nodes.contains(b)
            })
            .collect();
        assert!(
            !v6.is_empty() && v6.iter().all(|(.., sp, dp)| *sp == 51821 || *dp == 51821),
            "{v6:?}"
        );
        c.wait_counters(1, DEV6, "rx over IPv6", |c| c.rx_packets >= 2);
        for (i, dm) in d.into_iter().enumerate() {
            c.stop(i, dm);
        }
    }
    // IPv6 only, with a PSK: flannel-wg-v6 alone, PublicIP 0.0.0.0.
    let c = Cluster::new("v6", 2, V6_ONLY, true);
    let mut d: Vec<Daemon> = (0..2).map(|i| c.start(i)).collect();
    let s: Vec<IpNet> = (0..2)
        .map(|i| c.wait_subnets(i, &mut d[i], false, true)[0])
        .collect();
    let net6: IpNet = NETWORK6.parse().unwrap();
    for (i, si) in s.iter().enumerate() {
        c.wait_device(
            i,
            DEV6,
            1420,
            &[IpNet::new(si.network(), 128).unwrap()],
            net6,
        );
        assert!(c.nodes[i].link(DEV).is_none());
        let l = c.lease_of(&LeaseKey::v6(match *si {
            IpNet::V6(n) => n,
            _ => unreachable!(),
        }));
        assert_eq!(l.attrs.public_ip, None);
        assert!(l.attrs.backend_data.is_none());
        assert_eq!(lease_data(&l.attrs, IpFamily::V6).unwrap().1, 51821);
    }
    c.wait_ping(0, first(s[0]), first(s[1]));
    c.wait_ping(1, first(s[1]), first(s[0]));
    for (i, dm) in d.into_iter().enumerate() {
        c.stop(i, dm);
    }
}

/// `wireguard-go -f NAME` in a node's namespace, killed (SIGTERM, by PID) on drop.
struct WireguardGo {
    child: Child,
    name: String,
}

impl WireguardGo {
    fn start(ns: &str, name: &str) -> WireguardGo {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "wireguard-go", "-f", name])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wireguard-go is installed");
        let sock = format!("/var/run/wireguard/{name}.sock");
        wait_for(
            "wireguard-go's UAPI socket",
            Duration::from_secs(10),
            || Path::new(&sock).exists().then_some(()),
        );
        WireguardGo {
            child,
            name: name.to_string(),
        }
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = fs::remove_file(format!("/var/run/wireguard/{}.sock", self.name));
    }
}

/// Runs `cmd` in `ns`; panics with its output when it fails; returns stdout.
fn run_in(ns: &str, cmd: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn interop_with_wireguard_go_peer_configured_from_a_flannel_lease() {
    let c = Cluster::new("go", 2, V4, false);
    let mut d = c.start(0);
    let s0 = c.wait_subnets(0, &mut d, true, false)[0];
    let go = &c.nodes[1];
    // The wireguard-go node: its key pair from `wg genkey`, its lease as a
    // flannel node would publish it.
    let genkey = Command::new("wg").arg("genkey").output().unwrap();
    let private = String::from_utf8(genkey.stdout).unwrap();
    fs::write(go.key_file(), &private).unwrap();
    let public = go.wg_pubkey();
    let s1: Ipv4Net = "10.244.210.0/24".parse().unwrap();
    let attrs =
        flannel_core::wireguard::lease_attrs(Some(go.ip4), None, &public, Some(51820), None);
    block_on(async {
        LocalStore::open(&c.store)
            .unwrap()
            .create_lease(
                &Lease {
                    key: LeaseKey::v4(s1),
                    attrs,
                    expiration: None,
                },
                Some(Duration::from_secs(3600)),
            )
            .await
            .unwrap()
    });
    // Configured with `wg set` from node 1's lease: its key, endpoint and subnet.
    let l0 = c.lease_of(&c.nodes[0].subnet_env().unwrap().lease_key().unwrap());
    let (peer_key, peer_port) = lease_data(&l0.attrs, IpFamily::V4).unwrap();
    let name = format!("wgi{}", std::process::id() % 100_000);
    let _wg = WireguardGo::start(&go.ns.name, &name);
    let key_file = go.key_file();
    let endpoint = format!("{}:{peer_port}", l0.attrs.public_ip.unwrap());
    run_in(
        &go.ns.name,
        &[
            "wg",
            "set",
            &name,
            "listen-port",
            "51820",
            "private-key",
            key_file.to_str().unwrap(),
            "peer",
            &peer_key.to_string(),
            "endpoint",
            &endpoint,
            "allowed-ips",
            &s0.to_string(),
        ],
    );
    let own = format!("{}/32", Ipv4Addr::from(u32::from(s1.network()) + 1));
    run_in(&go.ns.name, &["ip", "addr", "add", &own, "dev", &name]);
    run_in(
        &go.ns.name,
        &["ip", "link", "set", &name, "mtu", "1420", "up"],
    );
    run_in(&go.ns.name, &["ip", "route", "add", NETWORK, "dev", &name]);
    let s1 = IpNet::V4(s1);
    // Both directions, each started by a different side.
    c.wait_ping(0, first(s0), first(s1));
    c.wait_ping(1, first(s1), first(s0));
    assert!(udp_through(
        &c.nodes[1],
        &c.nodes[0],
        first(s1),
        first(s0),
        7777,
        b"from wireguard-go"
    ));
    assert!(udp_through(
        &c.nodes[0],
        &c.nodes[1],
        first(s0),
        first(s1),
        7778,
        b"from flannel-rs"
    ));
    // wireguard-go saw a handshake with our key and traffic both ways.
    let show = run_in(&go.ns.name, &["wg", "show", &name, "dump"]);
    let peer_line = show
        .lines()
        .find(|l| l.starts_with(&peer_key.to_string()))
        .unwrap_or_else(|| panic!("no peer {peer_key} in\n{show}"));
    let cols: Vec<&str> = peer_line.split('\t').collect();
    assert!(
        cols[4].parse::<u64>().unwrap() > 0,
        "latest handshake: {peer_line}"
    );
    assert!(
        cols[5].parse::<u64>().unwrap() > 0 && cols[6].parse::<u64>().unwrap() > 0,
        "rx/tx bytes: {peer_line}"
    );
    // A TCP stream of some size, from wireguard-go to us.
    assert!(
        tcp_stream(&c.nodes[1], &c.nodes[0], first(s1), first(s0), 4_000_000),
        "the TCP stream arrived intact"
    );
    c.stop(0, d);
}

/// Sends `len` bytes over TCP from `src` (in `from`) to `dst` (in `to`,
/// port 7779); whether they arrived intact, in order.
fn tcp_stream(from: &Node, to: &Node, src: IpAddr, dst: IpAddr, len: u32) -> bool {
    let payload: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(7) % 251) as u8).collect();
    to.ns
        .run(|| {
            let l = std::net::TcpListener::bind(SocketAddr::new(dst, 7779)).unwrap();
            std::thread::scope(|sc| {
                sc.spawn(|| {
                    from.ns
                        .run(|| {
                            use std::io::Write;
                            let mut st = socket_bound(src).connect_to(SocketAddr::new(dst, 7779));
                            st.write_all(&payload).unwrap();
                        })
                        .unwrap();
                });
                let (mut st, _) = l.accept().unwrap();
                let mut buf = Vec::new();
                use std::io::Read;
                st.read_to_end(&mut buf).unwrap();
                buf == payload
            })
        })
        .unwrap()
}

/// A TCP client bound to `src` (nix: bind before connect).
struct BoundSocket(std::os::fd::OwnedFd);

fn socket_bound(src: IpAddr) -> BoundSocket {
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, SockaddrStorage};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(SocketAddr::new(src, 0)),
    )
    .unwrap();
    BoundSocket(fd)
}

impl BoundSocket {
    fn connect_to(self, dst: SocketAddr) -> std::net::TcpStream {
        use nix::sys::socket::{connect, SockaddrStorage};
        connect(
            std::os::fd::AsRawFd::as_raw_fd(&self.0),
            &SockaddrStorage::from(dst),
        )
        .unwrap();
        std::net::TcpStream::from(self.0)
    }
}

/// `Backend.Datapath`: on a kernel without WireGuard (this machine's),
/// `kernel` refuses to start with an error naming the field and the fix,
/// before it touches anything; `auto` says it runs the userspace datapath.
/// On a kernel that has WireGuard both get a kernel device.
#[test]
fn datapath_kernel_needs_kernel_wireguard_and_auto_falls_back_to_userspace() {
    const KERNEL: &str =
        r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard", "Datapath": "kernel"}}"#;
    let c = Cluster::new("dp", 1, KERNEL, false);
    let node = &c.nodes[0];
    let has_wireguard = node.nl(|nl| nl.has_wireguard("wgprobe0").unwrap());
    let mut d = c.start(0);
    if has_wireguard {
        c.wait_subnets(0, &mut d, true, false);
        let kind = node.nl(|nl| nl.link_by_name(DEV).unwrap().and_then(|l| l.kind));
        assert_eq!(kind.as_deref(), Some("wireguard"));
        c.stop(0, d);
        return;
    }
    let status = wait_for("flanneld to exit", Duration::from_secs(15), || {
        d.0.as_mut().unwrap().try_wait().unwrap()
    });
    let log = read_log(&node.log());
    assert!(
        !status.success(),
        "flanneld started without kernel WireGuard:\n{log}"
    );
    assert!(
        log.contains(r#"Backend.Datapath "kernel": this kernel has no WireGuard"#)
            && log.contains(r#"set Backend.Datapath to "auto" or "userspace""#),
        "{log}"
    );
    assert_eq!(node.nl(|nl| nl.link_by_name(DEV).unwrap()), None);
    assert!(node.subnet_env().is_none(), "subnet.env written");

    // The same node with auto: the userspace datapath, said so.
    let auto = fs::read_to_string(&c.config)
        .unwrap()
        .replace(r#""Datapath": "kernel""#, r#""Datapath": "auto""#);
    fs::write(&c.config, auto).unwrap();
    let mut d = c.start(0);
    c.wait_subnets(0, &mut d, true, false);
    let log = read_log(&node.log());
    assert!(
        log.contains("no kernel WireGuard (link type wireguard unknown): using the userspace WireGuard datapath"),
        "{log}"
    );
    let kind = node.nl(|nl| nl.link_by_name(DEV).unwrap().and_then(|l| l.kind));
    assert_eq!(kind.as_deref(), Some("tun"));
    c.stop(0, d);
}
