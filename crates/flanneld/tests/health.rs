//! Root integration tests of flanneld's health endpoint (`--healthz-ip`,
//! `--healthz-port`): real `flanneld` processes in node namespaces (the
//! underlay of tests/common: a switch namespace at 172.16.1.1, nodes at
//! 172.16.1.1N), queried over the node namespace's own loopback from a
//! thread that entered that namespace. The udp and wireguard cases also
//! ping between two nodes' subnets and send one datagram from the switch;
//! nothing leaves these namespaces.
//!
//! Namespaces, processes (killed by PID) and directories go on drop, also on
//! panic.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};

mod common;
use common::{
    flanneld_in, local_store_flags, ping_in, read_log, wait_for, Daemon, NodeNs, Testbed,
};

const CONFIG: &str = r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#;
const UDP_CONFIG: &str = r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}"#;
const WG_CONFIG: &str = r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard"}}"#;
/// The switch's address: on no lease, so datagrams from it are spoofed.
const SWITCH_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 1, 1);
/// Any port will do: each node namespace has a loopback of its own.
const PORT: u16 = 10244;

/// `ip link set lo up` in the node's namespace (a new namespace's lo is
/// down, and 127.0.0.1 cannot be bound until it is up).
fn lo_up(node: &NodeNs) {
    node.nl(|nl| {
        let lo = nl.link_by_name("lo").unwrap().unwrap();
        nl.set_link_up(lo.index).unwrap();
    });
}

/// A plain HTTP/1.1 GET: (status code, body).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let bad = || std::io::Error::other(format!("bad HTTP response {resp:?}"));
    let (head, body) = resp.split_once("\r\n\r\n").ok_or_else(bad)?;
    let code = head
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1.1 "))
        .and_then(|l| l.split(' ').next())
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    Ok((code, body.to_string()))
}

/// GET `http://127.0.0.1:PORT/path` inside the node's namespace; None while
/// nothing answers.
fn get_in(node: &NodeNs, path: &str) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], PORT));
    node.ns
        .run(|| http_get(addr, path))
        .expect("run in the node namespace")
        .ok()
}

/// The value of the sample `name` (exact name with labels) in a scrape.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The nodes (with their underlay addresses) and the testbed. Field order
/// is drop order: the nodes go before their switch.
struct Cluster {
    nodes: Vec<NodeNs>,
    ips: Vec<Ipv4Addr>,
    bed: Testbed,
}

impl Cluster {
    fn new(tag: &str, n: usize) -> Cluster {
        Cluster::with_config(tag, n, CONFIG)
    }

    fn with_config(tag: &str, n: usize, config: &str) -> Cluster {
        let switch = format!("{SWITCH_IP}/24");
        let (bed, underlay) =
            Testbed::new(&format!("health-{tag}"), "fdhz", n, Some(&switch), config);
        let (nodes, ips): (Vec<NodeNs>, Vec<Ipv4Addr>) = underlay.into_iter().unzip();
        for n in &nodes {
            lo_up(n);
        }
        Cluster { nodes, ips, bed }
    }

    fn command(&self, i: usize, extra: &[&str]) -> std::process::Command {
        let node = &self.nodes[i];
        let mut cmd = flanneld_in(&node.ns, &node.log());
        cmd.args(local_store_flags(
            &self.bed.store,
            &self.bed.config,
            &node.subnet_file(),
        ))
        .args(["--iface", "eth0"])
        .args(extra)
        // Read by the wireguard backend only: each node its own key.
        .env(
            "WIREGUARD_KEY_FILE",
            node.subnet_file().with_file_name("wgkey"),
        );
        cmd
    }

    fn start(&self, i: usize, extra: &[&str]) -> Daemon {
        Daemon(Some(
            self.command(i, extra).spawn().expect("spawn flanneld"),
        ))
    }

    /// Waits for node `i`'s subnet.env; returns its subnet.
    fn wait_subnet_env(&self, i: usize, d: &mut Daemon) -> Ipv4Net {
        let node = &self.nodes[i];
        wait_for("subnet.env", Duration::from_secs(15), || {
            d.check_alive(&node.log());
            node.subnet_env()?.lease_key()?.ipv4
        })
    }

    /// Scrapes /metrics until `ok` holds; returns that scrape.
    fn wait_metrics(
        &self,
        i: usize,
        d: &mut Daemon,
        what: &str,
        ok: impl Fn(&str) -> bool,
    ) -> String {
        let node = &self.nodes[i];
        let mut last = String::new();
        let start = Instant::now();
        loop {
            d.check_alive(&node.log());
            if let Some((200, m)) = get_in(node, "/metrics") {
                if ok(&m) {
                    return m;
                }
                last = m;
            }
            if start.elapsed() > Duration::from_secs(15) {
                panic!(
                    "timed out waiting for {what}; last scrape:\n{last}\nlog:\n{}",
                    read_log(&node.log())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Cluster {
    /// Starts flanneld on both nodes with `extra` flags and pings node 2's
    /// target from node 1's across the datapath (node 1 sends, and receives
    /// the replies); the daemons.
    fn start_pair_and_ping(&self, extra: &[&str]) -> Vec<Daemon> {
        let mut daemons = Vec::new();
        let mut targets = Vec::new();
        for i in 0..2 {
            let mut d = self.start(i, extra);
            let subnet = self.wait_subnet_env(i, &mut d);
            targets.push(add_target(&self.nodes[i], subnet));
            daemons.push(d);
        }
        wait_for("ping across the datapath", Duration::from_secs(15), || {
            ping_in(
                &self.nodes[0].ns.name,
                Some(targets[0].into()),
                targets[1].into(),
            )
            .then_some(())
        });
        daemons
    }

    /// Waits for node 1's packet counters of both directions (`name(what,
    /// direction)` names the sample) and checks their bytes hold an ICMP
    /// echo at least; that scrape.
    fn wait_packets_both_ways(
        &self,
        d: &mut Daemon,
        name: impl Fn(&str, &str) -> String,
    ) -> String {
        let (tx, rx) = (name("packets", "tx"), name("packets", "rx"));
        let m = self.wait_metrics(0, d, "packets both ways", |m| {
            sample(m, &tx).unwrap_or(0.0) >= 1.0 && sample(m, &rx).unwrap_or(0.0) >= 1.0
        });
        for dir in ["tx", "rx"] {
            assert!(
                sample(&m, &name("bytes", dir)).unwrap_or(0.0) >= 84.0,
                "an ICMP echo is 84 bytes: {m}"
            );
        }
        m
    }

    /// A datagram of garbage from the switch (which holds no lease) to
    /// node 1's `port`.
    fn garbage_from_switch(&self, port: u16) {
        let to = SocketAddrV4::new(self.ips[0], port);
        self.bed
            .switch
            .run(|| {
                let s = UdpSocket::bind(SocketAddrV4::new(SWITCH_IP, 0)).unwrap();
                s.send_to(&[0x45; 40], to).unwrap();
            })
            .unwrap();
    }

    fn stop_all(&self, daemons: Vec<Daemon>) {
        for (i, d) in daemons.into_iter().enumerate() {
            d.stop(&self.nodes[i].log());
        }
    }
}

/// A directory whose `iptables-save` and `ip6tables-save` always fail, put
/// first in flanneld's PATH: every rules pass fails as on a node whose
/// iptables is broken.
fn failing_iptables(dir: &Path) -> String {
    fs::create_dir_all(dir).unwrap();
    for bin in ["iptables-save", "ip6tables-save"] {
        let p = dir.join(bin);
        fs::write(
            &p,
            "#!/bin/sh\necho 'iptables-save: simulated failure' >&2\nexit 1\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    )
}

#[test]
fn readyz_waits_for_rules_and_metrics_count_passes_and_peers() {
    let c = Cluster::new("ready", 3);
    let port = PORT.to_string();
    let healthz = ["--healthz-ip", "127.0.0.1", "--healthz-port", port.as_str()];
    let mut peers = Vec::new();
    for i in [1, 2] {
        let mut d = c.start(i, &[]);
        c.wait_subnet_env(i, &mut d);
        peers.push(d);
    }
    let node = &c.nodes[0];

    // 1. Rules that never apply: alive, subnet.env written, never ready.
    let path = failing_iptables(&c.bed.tmp.0.join("failing-bin"));
    let mut cmd = c.command(0, &healthz);
    cmd.args(["--iptables-resync", "1"]).env("PATH", path);
    let mut d = Daemon(Some(cmd.spawn().expect("spawn flanneld")));
    c.wait_subnet_env(0, &mut d);
    let m = c.wait_metrics(0, &mut d, "two failed rules passes", |m| {
        sample(m, "flanneld_rules_failures_total").unwrap_or(0.0) >= 2.0
    });
    assert!(
        sample(&m, "flanneld_reconcile_passes_total").unwrap() >= 1.0,
        "{m}"
    );
    assert!(
        sample(&m, "flanneld_reconcile_changes_total").unwrap() >= 6.0,
        "a neighbour, an FDB entry and a route per peer: {m}"
    );
    assert_eq!(sample(&m, "flanneld_peers"), Some(2.0), "{m}");
    assert_eq!(
        get_in(node, "/healthz"),
        Some((200, "flanneld is running\n".into()))
    );
    assert_eq!(
        get_in(node, "/readyz"),
        Some((503, "flanneld is not ready yet\n".into())),
        "ready although every rules pass failed; log:\n{}",
        read_log(&node.log())
    );
    assert_eq!(get_in(node, "/nope").map(|r| r.0), Some(404));
    d.stop(&node.log());
    assert_eq!(
        get_in(node, "/healthz"),
        None,
        "still listening after SIGTERM"
    );

    // 2. Working rules: ready, with the peers programmed.
    let mut d = c.start(0, &healthz);
    wait_for("/readyz 200", Duration::from_secs(15), || {
        d.check_alive(&node.log());
        (get_in(node, "/readyz")? == (200, "flanneld is ready\n".into())).then_some(())
    });
    assert!(node.subnet_file().exists(), "ready before subnet.env");
    assert_eq!(
        get_in(node, "/healthz"),
        Some((200, "flanneld is running\n".into()))
    );
    let m = c.wait_metrics(0, &mut d, "flanneld_peers 2", |m| {
        sample(m, "flanneld_peers") == Some(2.0)
    });
    assert!(
        sample(&m, "flanneld_reconcile_passes_total").unwrap() > 0.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "flanneld_reconcile_changes_total"),
        Some(0.0),
        "a restart writes nothing: {m}"
    );
    assert!(
        sample(&m, "flanneld_rules_passes_total").unwrap() >= 1.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "flanneld_rules_failures_total"),
        Some(0.0),
        "{m}"
    );
    assert!(
        !m.contains("flanneld_udp_"),
        "vxlan has no udp counters: {m}"
    );
    d.stop(&node.log());
    for (i, p) in peers.into_iter().enumerate() {
        p.stop(&c.nodes[i + 1].log());
    }
}

#[test]
fn a_port_in_use_or_a_foreign_address_exits_before_anything_is_written() {
    let c = Cluster::new("refused", 1);
    let node = &c.nodes[0];
    // Hold the port inside the node's namespace (a socket stays in the
    // namespace it was created in).
    let taken = node
        .ns
        .run(|| TcpListener::bind(("127.0.0.1", PORT)).unwrap())
        .unwrap();
    let port = PORT.to_string();
    for (ip, needle) in [
        ("127.0.0.1", "--healthz-port"),
        ("172.16.1.99", "--healthz-ip"),
    ] {
        let _ = fs::remove_file(node.log());
        let mut child = c
            .command(0, &["--healthz-ip", ip, "--healthz-port", port.as_str()])
            .spawn()
            .expect("spawn flanneld");
        let st = wait_for("flanneld to exit", Duration::from_secs(10), || {
            child.try_wait().unwrap()
        });
        let log = read_log(&node.log());
        assert!(!st.success(), "{ip}: must fail; log:\n{log}");
        assert!(
            log.contains(needle),
            "{ip}: the error must name {needle}:\n{log}"
        );
        assert!(node.link("flannel.1").is_none(), "{ip}: flannel.1 created");
        assert!(!node.subnet_file().exists(), "{ip}: subnet.env written");
        assert!(!c.bed.store.exists(), "{ip}: the store was touched");
    }
    drop(taken);
}

/// The subnet's first address on lo: a ping target standing in for a pod.
fn add_target(node: &NodeNs, subnet: Ipv4Net) -> Ipv4Addr {
    let ip = Ipv4Addr::from(u32::from(subnet.network()) + 1);
    node.nl(|nl| {
        let lo = nl.link_by_name("lo").unwrap().unwrap();
        nl.add_address(lo.index, IpNet::V4(Ipv4Net::new(ip, 32).unwrap()))
            .unwrap();
    });
    ip
}

#[test]
fn udp_backend_counters_are_served_as_metrics() {
    let c = Cluster::with_config("udp", 2, UDP_CONFIG);
    let port = PORT.to_string();
    let mut daemons =
        c.start_pair_and_ping(&["--healthz-ip", "127.0.0.1", "--healthz-port", port.as_str()]);
    let m = c.wait_packets_both_ways(&mut daemons[0], |what, dir| {
        format!(r#"flanneld_udp_{what}_total{{direction="{dir}"}}"#)
    });
    let spoofed = r#"flanneld_udp_dropped_total{reason="spoofed"}"#;
    assert_eq!(sample(&m, spoofed), Some(0.0), "{m}");
    assert_eq!(sample(&m, "flanneld_peers"), Some(1.0), "{m}");

    // A datagram from the switch, which holds no lease: dropped and counted
    // by reason.
    c.garbage_from_switch(flannel_core::wire::UDP_DEFAULT_PORT);
    c.wait_metrics(0, &mut daemons[0], "a spoofed datagram counted", |m| {
        sample(m, spoofed) == Some(1.0)
    });
    c.stop_all(daemons);
}

#[test]
fn wireguard_backend_counters_are_served_per_device() {
    let c = Cluster::with_config("wg", 2, WG_CONFIG);
    let port = PORT.to_string();
    let mut daemons =
        c.start_pair_and_ping(&["--healthz-ip", "127.0.0.1", "--healthz-port", port.as_str()]);
    let wg = |what: &str, label: &str| {
        format!(r#"flanneld_wireguard_{what}_total{{device="flannel-wg",{label}}}"#)
    };
    let m = c.wait_packets_both_ways(&mut daemons[0], |what, dir| {
        wg(what, &format!(r#"direction="{dir}""#))
    });
    // One handshake completed, whichever side began it.
    let sent = sample(&m, &wg("handshakes", r#"direction="sent""#)).unwrap_or(0.0);
    let received = sample(&m, &wg("handshakes", r#"direction="received""#)).unwrap_or(0.0);
    assert!(sent >= 1.0 && received >= 1.0, "{m}");
    let invalid = wg("dropped", r#"reason="invalid""#);
    let before = sample(&m, &invalid).expect("dropped{reason=invalid} served");
    assert!(!m.contains("flanneld_udp_"), "{m}");

    // A datagram from the switch that is no WireGuard message: dropped and
    // counted by reason.
    c.garbage_from_switch(flannel_core::wire::WIREGUARD_DEFAULT_PORT);
    c.wait_metrics(0, &mut daemons[0], "a garbage datagram counted", |m| {
        sample(m, &invalid) == Some(before + 1.0)
    });
    c.stop_all(daemons);
}

/// The soft and hard "Max open files" of a process, from /proc/PID/limits.
fn open_files_limit(pid: u32) -> (u64, u64) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v[0], v[1])
}

/// Issue 14 item 7, issue 12 "bad input": flanneld started with a low
/// soft open-files limit raises it to the hard one; hundreds of idle and
/// slowloris connections (more than that low limit) are not all kept open,
/// a fresh /healthz answers at once, and leases are still programmed, with
/// no misleading "install iptables" error.
#[test]
fn a_flood_of_idle_and_slow_connections_neither_blocks_health_nor_the_datapath() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    use std::os::unix::process::CommandExt;
    let c = Cluster::new("flood", 1);
    let node = &c.nodes[0];
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let low = 256;
    assert!(
        hard > 2048,
        "the test needs a hard open-files limit above 2048, have {hard}"
    );
    let port = PORT.to_string();
    let mut cmd = c.command(0, &["--healthz-ip", "127.0.0.1", "--healthz-port", &port]);
    // SAFETY: setrlimit(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            setrlimit(Resource::RLIMIT_NOFILE, low, hard)?;
            Ok(())
        });
    }
    let mut d = Daemon(Some(cmd.spawn().expect("spawn flanneld")));
    let pid = d.0.as_ref().unwrap().id();
    c.wait_subnet_env(0, &mut d);
    assert_eq!(
        open_files_limit(pid),
        (hard, hard),
        "flanneld must raise its soft open-files limit to the hard one"
    );
    wait_for("/readyz 200", Duration::from_secs(15), || {
        d.check_alive(&node.log());
        (get_in(node, "/readyz")?.0 == 200).then_some(())
    });

    let addr = SocketAddr::from(([127, 0, 0, 1], PORT));
    let idle_n = 400;
    let slow_n = 20;
    let (mut idle, mut slow) = node
        .ns
        .run(move || {
            let idle: Vec<TcpStream> = (0..idle_n)
                .map(|_| TcpStream::connect(addr).unwrap())
                .collect();
            let slow: Vec<TcpStream> = (0..slow_n)
                .map(|_| {
                    let mut s = TcpStream::connect(addr).unwrap();
                    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: flood\r\n")
                        .unwrap();
                    s
                })
                .collect();
            (idle, slow)
        })
        .unwrap();
    // A fresh probe is answered at once.
    let started = Instant::now();
    assert_eq!(
        get_in(node, "/healthz"),
        Some((200, "flanneld is running\n".into())),
        "log:\n{}",
        read_log(&node.log())
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "/healthz took {:?} under the flood",
        started.elapsed()
    );
    // The server keeps a bounded number of them: the rest were closed.
    let closed_by_server = |s: &mut TcpStream| {
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut b = [0u8; 16];
        matches!(s.read(&mut b), Ok(0))
            || matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    };
    let closed = idle
        .iter_mut()
        .chain(slow.iter_mut())
        .filter_map(|s| closed_by_server(s).then_some(()))
        .count();
    assert!(
        closed >= idle_n + slow_n - 64,
        "only {closed} of {} connections closed by flanneld",
        idle_n + slow_n
    );
    // The datapath goes on: a new peer's lease is programmed while the
    // client still holds every socket.
    let peer = flannel_core::lease::Lease {
        key: "10.244.250.0-24".parse().unwrap(),
        attrs: flannel_core::lease::LeaseAttrs::new_vxlan(
            Some("172.16.1.50".parse().unwrap()),
            Some(flannel_core::lease::VxlanBackendData {
                vni: 1,
                vtep_mac: "02:00:00:00:00:50".parse().unwrap(),
            }),
            None,
            None,
        ),
        expiration: None,
    };
    common::block_on(async {
        use flannel_store::Store;
        let store = flannel_store::LocalStore::open(&c.bed.store).unwrap();
        store.create_lease(&peer, None).await.unwrap().unwrap();
    });
    let dst: IpNet = "10.244.250.0/24".parse().unwrap();
    wait_for("the new peer's route", Duration::from_secs(10), || {
        d.check_alive(&node.log());
        node.nl(|nl| nl.list_routes().unwrap())
            .iter()
            .any(|r| r.dst == dst)
            .then_some(())
    });
    drop(idle);
    drop(slow);
    let log = read_log(&node.log());
    assert!(!log.contains("install it"), "a misleading hint:\n{log}");
    assert!(!log.contains("Too many open files"), "{log}");
    d.stop(&node.log());
}
