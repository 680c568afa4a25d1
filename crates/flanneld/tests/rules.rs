//! Root integration tests of the masquerade and forward rules: real
//! `flanneld` processes (host-gw backend, local store) in node namespaces,
//! checked with `iptables-save` / `nft list` run in the same namespaces.
//!
//! Topology (tests/common): a switch namespace with bridge `br0`
//! (172.16.1.1/24, and 203.0.113.1/24 standing for a host outside the
//! cluster), node namespaces on 172.16.1.1N/24. Pods are stood in for by
//! the node subnet's first address on `lo`. Everything (namespaces,
//! processes killed by PID, directories) goes on drop, also on panic.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flannel_core::lease::IpFamily;
use flannel_core::rules::{self as core_rules, FamilyNets, Mode, RuleOptions, RulesInput};
use flannel_core::subnet_env::SubnetEnv;
use flannel_netlink::netns::ScopedNetNs;
use flannel_netlink::Netlink;
use ipnet::{IpNet, Ipv4Net};

mod common;
use common::{
    flanneld_in, inner_udp, local_store_flags, read_log, require_root, wait_for, Daemon, NodeNs,
    Testbed,
};

const IPT_CONFIG: &str = r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}"#;
const NFT_CONFIG: &str =
    r#"{"Network": "10.244.0.0/16", "EnableNFTables": true, "Backend": {"Type": "host-gw"}}"#;

struct Node {
    base: NodeNs,
}

impl std::ops::Deref for Node {
    type Target = NodeNs;
    fn deref(&self) -> &NodeNs {
        &self.base
    }
}

impl Node {
    /// Runs a command in the node's namespace; its stdout, or panics with stderr.
    fn sh(&self, cmd: &str, args: &[&str]) -> String {
        sh_in(&self.ns.name, cmd, args)
    }
    fn try_sh(&self, cmd: &str, args: &[&str]) -> Result<String, String> {
        try_sh_in(&self.ns.name, cmd, args)
    }
}

fn try_sh_in(ns: &str, cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, cmd])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ip netns exec");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd} {args:?} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn sh_in(ns: &str, cmd: &str, args: &[&str]) -> String {
    try_sh_in(ns, cmd, args).unwrap_or_else(|e| panic!("{e}"))
}

/// This file's nodes on the shared testbed ([`common::Cluster`]).
type Cluster = common::Cluster<Node>;

impl Cluster {
    fn new(tag: &str, n: usize, config: &str) -> Cluster {
        let (bed, underlay) = Testbed::new(
            &format!("rules-{tag}"),
            "fdru",
            n,
            Some("172.16.1.1/24"),
            config,
        );
        let nodes = underlay
            .into_iter()
            .map(|(base, _ip)| Node { base })
            .collect();
        Cluster { nodes, bed }
    }

    fn start(&self, i: usize, extra: &[&str]) -> Daemon {
        let node = &self.nodes[i];
        let mut cmd = flanneld_in(&node.ns, &node.log());
        cmd.args(local_store_flags(
            &self.store,
            &self.config,
            &node.subnet_file(),
        ))
        .args(["--iface", "eth0", "--iptables-resync", "1"])
        .args(extra);
        Daemon(Some(cmd.spawn().expect("spawn flanneld")))
    }

    /// Waits for node `i`'s subnet.env; returns its subnet.
    fn wait_subnet(&self, i: usize, d: &mut Daemon) -> Ipv4Net {
        let node = &self.nodes[i];
        wait_for("subnet.env", Duration::from_secs(15), || {
            if let Ok(Some(st)) = d.0.as_mut().unwrap().try_wait() {
                panic!("flanneld exited with {st}; log:\n{}", read_log(&node.log()));
            }
            let env = SubnetEnv::parse(&fs::read_to_string(node.subnet_file()).ok()?).ok()?;
            env.lease_key()?.ipv4
        })
    }
}

/// The lines of `iptables-save -t TABLE` that mention a FLANNEL chain
/// (declarations excluded), in order.
fn flannel_lines(node: &Node, save: &str, table: &str) -> Vec<String> {
    node.sh(save, &["-t", table])
        .lines()
        .filter(|l| l.starts_with("-A ") && l.contains("FLANNEL-"))
        .map(str::to_string)
        .collect()
}

/// Whether a FLANNEL chain is declared in `iptables-save` output (all tables).
fn flannel_chains(node: &Node, save: &str) -> Vec<String> {
    node.sh(save, &[])
        .lines()
        .filter(|l| l.contains("FLANNEL-"))
        .map(str::to_string)
        .collect()
}

fn nft_tables(node: &Node) -> String {
    node.sh("nft", &["list", "tables"])
}

fn expected_masq(net: &str, pod: Ipv4Net, random: bool) -> Vec<String> {
    let c = "-m comment --comment \"flanneld masq\"";
    let m = if random {
        "MASQUERADE --random-fully"
    } else {
        "MASQUERADE"
    };
    vec![
        format!("-A POSTROUTING {c} -j FLANNEL-POSTRTG"),
        format!("-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {pod} -d {net} {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {net} -d {pod} {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG ! -s {net} -d {pod} {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {net} ! -d 224.0.0.0/4 {c} -j {m}"),
        format!("-A FLANNEL-POSTRTG ! -s {net} -d {net} {c} -j {m}"),
    ]
}

fn expected_fwd(net: &str) -> Vec<String> {
    let c = "-m comment --comment \"flanneld forward\"";
    vec![
        format!("-A FORWARD {c} -j FLANNEL-FWD"),
        format!("-A FLANNEL-FWD -s {net} {c} -j ACCEPT"),
        format!("-A FLANNEL-FWD -d {net} {c} -j ACCEPT"),
    ]
}

/// `nft list table FAM NAME` of flannel's table with every rule (fully-random,
/// forward chain), as operators see it.
fn nft_listing(fam: &str, name: &str, net: &str, pod: &str, multicast: &str) -> String {
    format!(
        "table {fam} {name} {{
\tcomment \"rules for {name}\"
\tchain postrtg {{
\t\tcomment \"chain to manage traffic masquerading by flannel\"
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta mark & 0x00004000 == 0x00004000 return
\t\t{fam} saddr {pod} {fam} daddr {net} return
\t\t{fam} saddr {net} {fam} daddr {pod} return
\t\t{fam} saddr != {net} {fam} daddr {pod} return
\t\t{fam} saddr {net} {fam} daddr != {multicast} masquerade fully-random
\t\t{fam} saddr != {net} {fam} daddr {net} masquerade fully-random
\t}}

\tchain forward {{
\t\tcomment \"chain to accept flannel traffic\"
\t\ttype filter hook forward priority filter; policy accept;
\t\t{fam} saddr {net} accept
\t\t{fam} daddr {net} accept
\t}}
}}
"
    )
}

/// Waits (up to `secs`) until `f` is true; panics with the node's log.
fn wait_true(node: &Node, what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > Duration::from_secs(secs) {
            panic!(
                "timed out waiting for {what}; flanneld log:\n{}",
                read_log(&node.log())
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn iptables_mode_rules_are_exact_and_restored_within_resync() {
    let c = Cluster::new("ipt", 1, IPT_CONFIG);
    let mut d = c.start(0, &["--ip-masq"]);
    let pod = c.wait_subnet(0, &mut d);
    let node = &c.nodes[0];
    let masq = expected_masq("10.244.0.0/16", pod, true);
    let fwd = expected_fwd("10.244.0.0/16");
    wait_true(
        node,
        "the exact FLANNEL-POSTRTG and FLANNEL-FWD chains",
        10,
        || {
            flannel_lines(node, "iptables-save", "nat") == masq
                && flannel_lines(node, "iptables-save", "filter") == fwd
        },
    );
    // subnet.env says the daemon masquerades.
    let env = fs::read_to_string(node.subnet_file()).unwrap();
    assert!(env.contains("FLANNEL_IPMASQ=true"), "{env}");

    // A deleted rule comes back within the resync period (1 s here).
    node.sh("iptables", &["-t", "nat", "-D", "FLANNEL-POSTRTG", "3"]);
    assert_ne!(flannel_lines(node, "iptables-save", "nat"), masq);
    wait_true(node, "the deleted rule restored", 5, || {
        flannel_lines(node, "iptables-save", "nat") == masq
    });

    // A foreign rule inserted in the middle: the chain is rewritten in order.
    node.sh(
        "iptables",
        &[
            "-t",
            "nat",
            "-I",
            "FLANNEL-POSTRTG",
            "2",
            "-s",
            "10.9.9.9/32",
            "-j",
            "ACCEPT",
        ],
    );
    assert!(flannel_lines(node, "iptables-save", "nat")
        .iter()
        .any(|l| l.contains("10.9.9.9")));
    wait_true(
        node,
        "the chain rewritten without the foreign rule",
        5,
        || flannel_lines(node, "iptables-save", "nat") == masq,
    );

    // The jump from POSTROUTING and the forward chain's rules come back too.
    node.sh(
        "iptables",
        &[
            "-t",
            "nat",
            "-D",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "flanneld masq",
            "-j",
            "FLANNEL-POSTRTG",
        ],
    );
    node.sh("iptables", &["-t", "filter", "-F", "FLANNEL-FWD"]);
    wait_true(node, "the jump and FLANNEL-FWD restored", 5, || {
        flannel_lines(node, "iptables-save", "nat") == masq
            && flannel_lines(node, "iptables-save", "filter") == fwd
    });
    // Nothing in nftables mode.
    assert!(
        !nft_tables(node).contains("flannel-ipv"),
        "{}",
        nft_tables(node)
    );

    // Shutdown removes the rules, as upstream.
    d.stop(&node.log());
    assert_eq!(flannel_chains(node, "iptables-save"), Vec::<String>::new());
}

#[test]
fn nftables_mode_table_is_exact_and_restored_within_resync() {
    let c = Cluster::new("nft", 1, NFT_CONFIG);
    let mut d = c.start(0, &["--ip-masq"]);
    let pod = c.wait_subnet(0, &mut d);
    let node = &c.nodes[0];
    let want = core_rules::nft_desired(
        IpFamily::V4,
        Some(FamilyNets::v4("10.244.0.0/16".parse().unwrap(), pod).unwrap()),
        RuleOptions {
            masquerade: true,
            fully_random: true,
            forward: true,
            encap_port: None,
        },
    )
    .unwrap();
    // The golden text, spelled out: what nft prints of the table flanneld writes.
    let golden = format!(
        "table ip flannel-ipv4 {{
\tcomment \"rules for flannel-ipv4\"
\tchain postrtg {{
\t\tcomment \"chain to manage traffic masquerading by flannel\"
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta mark & 0x00004000 == 0x00004000 return
\t\tip saddr {pod} ip daddr 10.244.0.0/16 return
\t\tip saddr 10.244.0.0/16 ip daddr {pod} return
\t\tip saddr != 10.244.0.0/16 ip daddr {pod} return
\t\tip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
\t\tip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
\t}}

\tchain forward {{
\t\tcomment \"chain to accept flannel traffic\"
\t\ttype filter hook forward priority filter; policy accept;
\t\tip saddr 10.244.0.0/16 accept
\t\tip daddr 10.244.0.0/16 accept
\t}}
}}
"
    );
    assert_eq!(
        golden,
        nft_listing(
            "ip",
            "flannel-ipv4",
            "10.244.0.0/16",
            &pod.to_string(),
            "224.0.0.0/4"
        )
    );
    let list = || {
        node.try_sh("nft", &["list", "table", "ip", "flannel-ipv4"])
            .unwrap_or_default()
    };
    wait_true(node, "table ip flannel-ipv4 as desired", 10, || {
        list() == golden
    });
    // Read back through the nftables crate, it compares equal to the desired typed table.
    let read = || {
        node.ns
            .run(|| flanneld::rules::read_nft_table(IpFamily::V4))
            .unwrap()
            .unwrap()
    };
    assert_eq!(read(), core_rules::NftActual::Listed(want.clone()));

    // Delete rule 3 of postrtg by its handle: restored within the resync period.
    let handles = node.sh(
        "nft",
        &["-a", "list", "chain", "ip", "flannel-ipv4", "postrtg"],
    );
    let handle = handles
        .lines()
        .filter_map(|l| l.split("# handle ").nth(1))
        .nth(2)
        .expect("a third rule")
        .trim()
        .to_string();
    node.sh(
        "nft",
        &[
            "delete",
            "rule",
            "ip",
            "flannel-ipv4",
            "postrtg",
            "handle",
            &handle,
        ],
    );
    assert_ne!(list(), golden);
    wait_true(node, "the deleted nft rule restored", 5, || {
        list() == golden
    });

    // A foreign rule inserted at the top of postrtg: the table is rewritten in order.
    node.sh(
        "nft",
        &[
            "insert",
            "rule",
            "ip",
            "flannel-ipv4",
            "postrtg",
            "ip",
            "saddr",
            "10.9.9.9",
            "accept",
        ],
    );
    assert!(list().contains("10.9.9.9"));
    wait_true(node, "the foreign nft rule gone", 5, || list() == golden);
    // Only the rules were rewritten (one JSON transaction); the table and its chains stayed.
    let log = read_log(&node.log());
    assert!(
        log.contains("nft table ip flannel-ipv4: rules rewritten"),
        "{log}"
    );

    // A foreign rule with an expression the nftables crate has no type for
    // (`meta day`): the listing cannot be typed, and the table is replaced.
    node.sh(
        "nft",
        &[
            "add",
            "rule",
            "ip",
            "flannel-ipv4",
            "forward",
            "ip",
            "saddr",
            "10.9.9.8",
            "meta",
            "day",
            "Monday",
            "accept",
        ],
    );
    assert!(list().contains("10.9.9.8"));
    assert!(matches!(read(), core_rules::NftActual::Unreadable(_)));
    wait_true(node, "the untyped foreign nft rule gone", 5, || {
        list() == golden
    });

    // A chain removed: the table is rebuilt with its comments.
    node.sh("nft", &["delete", "chain", "ip", "flannel-ipv4", "forward"]);
    assert!(!list().contains("chain forward"));
    wait_true(node, "the deleted nft chain restored", 5, || {
        list() == golden
    });

    // Nothing in iptables mode.
    assert_eq!(flannel_chains(node, "iptables-save"), Vec::<String>::new());
    d.stop(&node.log());
    assert!(
        !nft_tables(node).contains("flannel-ipv"),
        "{}",
        nft_tables(node)
    );
}

#[test]
fn switching_modes_on_restart_leaves_nothing_of_the_other() {
    let c = Cluster::new("switch", 1, IPT_CONFIG);
    let node = &c.nodes[0];
    let mut d = c.start(0, &["--ip-masq"]);
    let pod = c.wait_subnet(0, &mut d);
    let masq = expected_masq("10.244.0.0/16", pod, true);
    wait_true(node, "iptables rules", 10, || {
        flannel_lines(node, "iptables-save", "nat") == masq
    });
    // Leftover ip6tables chains of an earlier run (the family is not in use now).
    node.sh("ip6tables", &["-t", "nat", "-N", "FLANNEL-POSTRTG"]);
    node.sh(
        "ip6tables",
        &["-t", "nat", "-A", "POSTROUTING", "-j", "FLANNEL-POSTRTG"],
    );
    d.crash();
    assert!(!flannel_chains(node, "iptables-save").is_empty());

    c.set_config(NFT_CONFIG);
    let mut d = c.start(0, &["--ip-masq"]);
    c.wait_subnet(0, &mut d);
    wait_true(node, "nft table and no FLANNEL iptables chains", 10, || {
        nft_tables(node).contains("table ip flannel-ipv4")
            && flannel_chains(node, "iptables-save").is_empty()
            && flannel_chains(node, "ip6tables-save").is_empty()
    });
    // A leftover IPv6 table (family not in use) is removed as well: restart once more.
    node.sh("nft", &["add", "table", "ip6", "flannel-ipv6"]);
    d.crash();

    c.set_config(IPT_CONFIG);
    let mut d = c.start(0, &["--ip-masq"]);
    c.wait_subnet(0, &mut d);
    wait_true(node, "iptables rules and no flannel nft tables", 10, || {
        flannel_lines(node, "iptables-save", "nat") == masq
            && !nft_tables(node).contains("flannel-ipv")
    });
    d.stop(&node.log());
}

#[test]
fn fully_random_disable_forward_off_and_a_new_network_replaces_the_rules() {
    let c = Cluster::new("opts", 1, IPT_CONFIG);
    let node = &c.nodes[0];
    let opts = [
        "--ip-masq",
        "--ip-masq-fully-random-disable",
        "--iptables-forward-rules=false",
    ];
    let mut d = c.start(0, &opts);
    let pod = c.wait_subnet(0, &mut d);
    let masq = expected_masq("10.244.0.0/16", pod, false);
    wait_true(
        node,
        "rules without --random-fully and no FLANNEL-FWD",
        10,
        || {
            flannel_lines(node, "iptables-save", "nat") == masq
                && flannel_lines(node, "iptables-save", "filter").is_empty()
        },
    );
    assert!(!node.sh("iptables-save", &[]).contains("random-fully"));
    assert!(!node.sh("iptables-save", &[]).contains("FLANNEL-FWD"));
    d.crash();

    // Restarted with another network (so another subnet): the old rules go.
    c.set_config(r#"{"Network": "10.50.0.0/16", "Backend": {"Type": "host-gw"}}"#);
    // The old subnet.env would be read as this run's.
    fs::remove_file(node.subnet_file()).unwrap();
    let mut d = c.start(0, &["--ip-masq"]);
    let pod2 = c.wait_subnet(0, &mut d);
    assert!("10.50.0.0/16".parse::<Ipv4Net>().unwrap().contains(&pod2));
    let masq2 = expected_masq("10.50.0.0/16", pod2, true);
    let fwd2 = expected_fwd("10.50.0.0/16");
    wait_true(node, "rules of the new network only", 10, || {
        flannel_lines(node, "iptables-save", "nat") == masq2
            && flannel_lines(node, "iptables-save", "filter") == fwd2
    });
    assert!(!node.sh("iptables-save", &[]).contains("10.244."));
    d.crash();

    // Without --ip-masq and with forward rules off, leftovers are removed.
    let mut d = c.start(0, &["--iptables-forward-rules=false"]);
    c.wait_subnet(0, &mut d);
    wait_true(node, "no FLANNEL chains", 10, || {
        flannel_chains(node, "iptables-save").is_empty()
    });
    d.stop(&node.log());

    // nftables mode honours --ip-masq-fully-random-disable (upstream ignores it there).
    c.set_config(
        r#"{"Network": "10.50.0.0/16", "EnableNFTables": true, "Backend": {"Type": "host-gw"}}"#,
    );
    let mut d = c.start(0, &opts);
    c.wait_subnet(0, &mut d);
    wait_true(
        node,
        "nft masquerade without fully-random, no forward chain",
        10,
        || {
            let t = node
                .try_sh("nft", &["list", "table", "ip", "flannel-ipv4"])
                .unwrap_or_default();
            t.contains("ip daddr != 224.0.0.0/4 masquerade\n")
                && !t.contains("fully-random")
                && !t.contains("chain forward")
        },
    );
    d.stop(&node.log());
}

/// Puts `addr/32` on lo.
fn add_pod(node: &Node, addr: Ipv4Addr) {
    node.ns
        .run(|| {
            let mut nl = Netlink::open().unwrap();
            let lo = nl.link_by_name("lo").unwrap().unwrap();
            nl.add_address(lo.index, IpNet::V4(Ipv4Net::new(addr, 32).unwrap()))
                .unwrap();
            nl.set_link_up(lo.index).unwrap();
        })
        .unwrap();
}

fn first(s: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(s.network()) + 1)
}

fn ping_from(ns: &str, src: Ipv4Addr, dst: &str) -> bool {
    try_sh_in(
        ns,
        "ping",
        &["-c", "1", "-W", "1", "-I", &src.to_string(), dst],
    )
    .is_ok()
}

/// Starts tcpdump in `ns` for one ICMP echo request to `dst`, runs `act`,
/// and returns the source address tcpdump saw.
fn echo_source(ns: &str, dev: &str, dst: Ipv4Addr, act: impl FnOnce()) -> Option<Ipv4Addr> {
    let filter = format!("icmp[icmptype] == icmp-echo and dst host {dst}");
    let mut child = Command::new("ip")
        .args([
            "netns", "exec", ns, "tcpdump", "-n", "-l", "-c", "1", "-i", dev, &filter,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump");
    // tcpdump says "listening on" on stderr once its capture is open.
    let mut stderr = child.stderr.take().unwrap();
    let mut buf = [0u8; 256];
    let _ = std::io::Read::read(&mut stderr, &mut buf);
    act();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // "12:00:00.000000 IP 172.16.1.11 > 203.0.113.1: ICMP echo request, ..."
    text.split_whitespace()
        .skip_while(|w| *w != "IP")
        .nth(1)
        .and_then(|a| a.parse().ok())
}

#[test]
fn pods_leaving_the_cluster_are_masqueraded_and_pod_to_pod_keeps_the_source() {
    masquerade_behaviour("behave", IPT_CONFIG, Mode::Iptables);
}

#[test]
fn nftables_mode_masquerades_the_same_way() {
    masquerade_behaviour("behave-nft", NFT_CONFIG, Mode::Nftables);
}

/// Whether node `n`'s masquerade rules for `pod` are in place (`Some(true)`),
/// or absent while the forward rules are there (`Some(false)`).
fn masq_state(n: &Node, mode: Mode, pod: Ipv4Net) -> Option<bool> {
    match mode {
        Mode::Iptables => {
            let nat = flannel_lines(n, "iptables-save", "nat");
            let fwd = flannel_lines(n, "iptables-save", "filter") == expected_fwd("10.244.0.0/16");
            if nat == expected_masq("10.244.0.0/16", pod, true) && fwd {
                Some(true)
            } else if nat.is_empty() && fwd {
                Some(false)
            } else {
                None
            }
        }
        Mode::Nftables => {
            let t = n
                .try_sh("nft", &["list", "table", "ip", "flannel-ipv4"])
                .ok()?;
            let fwd = t.contains("chain forward");
            match (
                t.contains("chain postrtg") && t.contains(&format!("ip saddr {pod} ")),
                fwd,
            ) {
                (true, true) => Some(true),
                (false, true) if !t.contains("chain postrtg") => Some(false),
                _ => None,
            }
        }
    }
}

fn masquerade_behaviour(tag: &str, config: &str, mode: Mode) {
    let c = Cluster::new(tag, 2, config);
    // The host outside the cluster: an address on the switch, which has no route to 10.244/16.
    c.switch
        .run(|| {
            let mut nl = Netlink::open().unwrap();
            let br = nl.link_by_name("br0").unwrap().unwrap();
            nl.add_address(br.index, "203.0.113.1/24".parse().unwrap())
                .unwrap();
        })
        .unwrap();
    let ext: Ipv4Addr = "203.0.113.1".parse().unwrap();
    for n in &c.nodes {
        n.sh("ip", &["route", "add", "203.0.113.0/24", "dev", "eth0"]);
    }
    let mut d1 = c.start(0, &["--ip-masq"]);
    let s1 = c.wait_subnet(0, &mut d1);
    let mut d2 = c.start(1, &["--ip-masq"]);
    let s2 = c.wait_subnet(1, &mut d2);
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    add_pod(n1, first(s1));
    add_pod(n2, first(s2));
    wait_true(n1, "node1 rules", 10, || {
        masq_state(n1, mode, s1) == Some(true)
    });
    wait_true(n2, "node2 rules", 10, || {
        masq_state(n2, mode, s2) == Some(true)
    });

    // Pod on node1 -> outside: arrives from node1's address and gets its reply.
    let seen = echo_source(&c.switch.name, "br0", ext, || {
        assert!(
            ping_from(&n1.ns.name, first(s1), "203.0.113.1"),
            "pod -> outside ping failed"
        );
    });
    assert_eq!(
        seen,
        Some("172.16.1.11".parse().unwrap()),
        "pod traffic leaving the cluster must be masqueraded"
    );

    // Pod on node2 -> pod on node1: keeps its pod source (host-gw route via node1).
    wait_true(n2, "the host-gw route to node1's subnet", 10, || {
        n2.sh("ip", &["route", "show", &s1.to_string()])
            .contains("via 172.16.1.11")
    });
    let seen = echo_source(&n1.ns.name, "eth0", first(s1), || {
        assert!(
            ping_from(&n2.ns.name, first(s2), &first(s1).to_string()),
            "pod -> pod ping failed"
        );
    });
    assert_eq!(
        seen,
        Some(first(s2)),
        "pod-to-pod traffic must keep the pod source"
    );

    // Control: without --ip-masq nothing is masqueraded and the outside host cannot answer.
    d1.stop(&n1.log());
    let mut d1 = c.start(0, &[]);
    c.wait_subnet(0, &mut d1);
    wait_true(n1, "forward rules only", 10, || {
        masq_state(n1, mode, s1) == Some(false)
    });
    let seen = echo_source(&c.switch.name, "br0", ext, || {
        assert!(
            !ping_from(&n1.ns.name, first(s1), "203.0.113.1"),
            "no reply route without masquerade"
        );
    });
    assert_eq!(seen, Some(first(s1)));
    d1.stop(&n1.log());
    d2.stop(&n2.log());
}

/// A namespace of ours and iptables-mode input for IPv6 alone
/// (fd00:10:244::/56, our subnet fd00:10:244:1::/64) with `options`.
fn ipv6_only(prefix: &str, options: RuleOptions) -> (ScopedNetNs, RulesInput) {
    require_root();
    let ns = ScopedNetNs::unique(prefix).unwrap();
    let nets = FamilyNets::v6(
        "fd00:10:244::/56".parse().unwrap(),
        "fd00:10:244:1::/64".parse().unwrap(),
    )
    .unwrap();
    let input = RulesInput {
        mode: Mode::Iptables,
        v4: None,
        v6: Some(nets),
        options,
    };
    (ns, input)
}

/// IPv6 (flanneld is IPv4-only until dual stack lands): the library keeps
/// ip6tables and the ip6 nftables table in line in a namespace of ours.
#[test]
fn ipv6_rules_in_both_modes() {
    let (ns, mut input) = ipv6_only(
        "fdru6",
        RuleOptions {
            masquerade: true,
            fully_random: true,
            forward: true,
            encap_port: None,
        },
    );
    let name = ns.name.clone();
    let save = |table: &str| -> Vec<String> {
        sh_in(&name, "ip6tables-save", &["-t", table])
            .lines()
            .filter(|l| l.starts_with("-A ") && l.contains("FLANNEL-"))
            .map(str::to_string)
            .collect()
    };
    let (r, e) = ns
        .run(|| flanneld::rules::sync(&input, &[IpFamily::V6]))
        .unwrap();
    assert!(e.is_empty(), "{e:?}");
    assert_eq!(r.changed.len(), 2, "{r:?}");
    let c = "-m comment --comment \"flanneld masq\"";
    assert_eq!(
        save("nat"),
        [
            format!("-A POSTROUTING {c} -j FLANNEL-POSTRTG"),
            format!("-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN"),
            format!("-A FLANNEL-POSTRTG -s fd00:10:244:1::/64 -d fd00:10:244::/56 {c} -j RETURN"),
            format!("-A FLANNEL-POSTRTG -s fd00:10:244::/56 -d fd00:10:244:1::/64 {c} -j RETURN"),
            format!("-A FLANNEL-POSTRTG ! -s fd00:10:244::/56 -d fd00:10:244:1::/64 {c} -j RETURN"),
            format!("-A FLANNEL-POSTRTG -s fd00:10:244::/56 ! -d ff00::/8 {c} -j MASQUERADE --random-fully"),
            format!("-A FLANNEL-POSTRTG ! -s fd00:10:244::/56 -d fd00:10:244::/56 {c} -j MASQUERADE --random-fully"),
        ]
    );
    assert_eq!(save("filter").len(), 3);
    // In line: a second pass changes nothing.
    let (r, e) = ns
        .run(|| flanneld::rules::sync(&input, &[IpFamily::V6]))
        .unwrap();
    assert!(e.is_empty() && r.changed.is_empty(), "{r:?} {e:?}");

    // nftables mode: the ip6 table, and the ip6tables chains removed.
    input.mode = Mode::Nftables;
    let (_, e) = ns
        .run(|| flanneld::rules::remove_mode(Mode::Iptables))
        .unwrap();
    assert!(
        e.iter().all(|e| !e.to_string().contains("ip6tables")),
        "{e:?}"
    );
    let (r, e) = ns
        .run(|| flanneld::rules::sync(&input, &[IpFamily::V6]))
        .unwrap();
    assert!(e.is_empty(), "{e:?}");
    assert_eq!(r.changed, ["nft table ip6 flannel-ipv6 rewritten"]);
    assert!(save("nat").is_empty() && save("filter").is_empty());
    assert_eq!(
        sh_in(&name, "nft", &["list", "table", "ip6", "flannel-ipv6"]),
        nft_listing(
            "ip6",
            "flannel-ipv6",
            "fd00:10:244::/56",
            "fd00:10:244:1::/64",
            "ff00::/8"
        )
    );
    let (r, _) = ns
        .run(|| flanneld::rules::sync(&input, &[IpFamily::V6]))
        .unwrap();
    assert!(r.changed.is_empty(), "{r:?}");
    let (r, e) = ns
        .run(|| flanneld::rules::remove_mode(Mode::Nftables))
        .unwrap();
    assert!(e.is_empty(), "{e:?}");
    assert_eq!(r.changed, ["nft table ip6 flannel-ipv6 removed"]);
    assert!(!sh_in(&name, "nft", &["list", "tables"]).contains("flannel"));
}

/// Dual stack through flanneld: IPv4 and IPv6 rules from one lease, in
/// iptables mode (iptables + ip6tables) and then nftables mode (both tables),
/// the other mode removed in both families on the switch.
#[test]
fn dual_stack_flanneld_writes_both_families_in_both_modes() {
    const DUAL: &str = r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", "Backend": {"Type": "host-gw"}}"#;
    const DUAL_NFT: &str = r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", "EnableNFTables": true, "Backend": {"Type": "host-gw"}}"#;
    let c = Cluster::new("dual", 1, DUAL);
    let node = &c.nodes[0];
    node.ns
        .run(|| {
            let mut nl = Netlink::open().unwrap();
            let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
            nl.add_address_nodad(eth0.index, "fd00:16::11/64".parse().unwrap())
                .unwrap();
        })
        .unwrap();
    let env6 = |node: &Node| -> Option<(Ipv4Net, ipnet::Ipv6Net)> {
        let env = SubnetEnv::parse(&fs::read_to_string(node.subnet_file()).ok()?).ok()?;
        let k = env.lease_key()?;
        Some((k.ipv4?, k.ipv6?))
    };
    let mut d = c.start(0, &["--ip-masq"]);
    c.wait_subnet(0, &mut d);
    let (s4, s6) = wait_for("a dual-stack subnet.env", Duration::from_secs(15), || {
        env6(node)
    });
    let net6: ipnet::Ipv6Net = "fd00:10:244::/56".parse().unwrap();
    let input = RulesInput {
        mode: Mode::Iptables,
        v4: Some(FamilyNets::v4("10.244.0.0/16".parse().unwrap(), s4).unwrap()),
        v6: Some(FamilyNets::v6(net6, s6).unwrap()),
        options: RuleOptions {
            masquerade: true,
            fully_random: true,
            forward: true,
            encap_port: None,
        },
    };
    let want = |f: IpFamily, table: &str| -> Vec<String> {
        core_rules::iptables_desired(f, input.nets(f), input.options)
            .iter()
            .filter(|d| d.id.table == table)
            .flat_map(core_rules::iptables_save_lines)
            .collect()
    };
    assert_eq!(want(IpFamily::V6, "nat").len(), 7);
    wait_true(
        node,
        "iptables and ip6tables chains of both families",
        10,
        || {
            flannel_lines(node, "iptables-save", "nat") == want(IpFamily::V4, "nat")
                && flannel_lines(node, "iptables-save", "filter") == want(IpFamily::V4, "filter")
                && flannel_lines(node, "ip6tables-save", "nat") == want(IpFamily::V6, "nat")
                && flannel_lines(node, "ip6tables-save", "filter") == want(IpFamily::V6, "filter")
        },
    );
    assert!(node
        .sh("ip6tables-save", &["-t", "nat"])
        .contains(&format!("-s {s6} -d {net6}")));
    // A deleted IPv6 rule comes back.
    node.sh("ip6tables", &["-t", "nat", "-D", "FLANNEL-POSTRTG", "2"]);
    wait_true(node, "the IPv6 rule restored", 5, || {
        flannel_lines(node, "ip6tables-save", "nat") == want(IpFamily::V6, "nat")
    });
    d.crash();

    c.set_config(DUAL_NFT);
    let mut d = c.start(0, &["--ip-masq"]);
    c.wait_subnet(0, &mut d);
    let t4 = nft_listing(
        "ip",
        "flannel-ipv4",
        "10.244.0.0/16",
        &s4.to_string(),
        "224.0.0.0/4",
    );
    let t6 = nft_listing(
        "ip6",
        "flannel-ipv6",
        &net6.to_string(),
        &s6.to_string(),
        "ff00::/8",
    );
    wait_true(
        node,
        "both nft tables and no FLANNEL chains in either family",
        10,
        || {
            node.try_sh("nft", &["list", "table", "ip", "flannel-ipv4"])
                .ok()
                == Some(t4.clone())
                && node
                    .try_sh("nft", &["list", "table", "ip6", "flannel-ipv6"])
                    .ok()
                    == Some(t6.clone())
                && flannel_chains(node, "iptables-save").is_empty()
                && flannel_chains(node, "ip6tables-save").is_empty()
        },
    );
    d.stop(&node.log());
    assert!(
        !nft_tables(node).contains("flannel-ipv"),
        "{}",
        nft_tables(node)
    );
}

const VXLAN_IPT_CONFIG: &str = r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#;
const UDP_NFT_CONFIG: &str =
    r#"{"Network": "10.244.0.0/16", "EnableNFTables": true, "Backend": {"Type": "udp"}}"#;

/// A pod namespace behind `node` (a veth pair standing for cni0 and the
/// pod's eth0): the node side gets `gw/24`, the pod `addr/24` with a
/// default route via `gw`; the node forwards.
fn add_pod_ns(node: &Node, gw: Ipv4Addr, addr: Ipv4Addr) -> ScopedNetNs {
    let pod = ScopedNetNs::unique("fdrp").unwrap();
    node.sh("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    node.sh(
        "ip",
        &[
            "link", "add", "vpod", "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
        ],
    );
    node.sh("ip", &["addr", "add", &format!("{gw}/24"), "dev", "vpod"]);
    node.sh("ip", &["link", "set", "vpod", "up"]);
    for args in [
        vec!["addr", "add", &format!("{addr}/24"), "dev", "eth0"],
        vec!["link", "set", "eth0", "up"],
        vec!["link", "set", "lo", "up"],
        vec!["route", "add", "default", "via", &gw.to_string()],
    ] {
        let args: Vec<&str> = args.iter().map(|a| a.as_ref()).collect();
        sh_in(&pod.name, "ip", &args);
    }
    pod
}

/// A UDP socket in `ns` on port `port` of every address, reading with a
/// short timeout.
fn listener(ns: &ScopedNetNs, port: u16) -> UdpSocket {
    let s = ns
        .run(move || UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).unwrap())
        .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    s
}

/// Sends `payload` from the pod to `dst` and says whether `rx` got
/// `expect` (anything else read is skipped).
fn delivered(
    pod: &ScopedNetNs,
    dst: SocketAddrV4,
    payload: &[u8],
    rx: &UdpSocket,
    expect: &[u8],
) -> bool {
    let payload = payload.to_vec();
    pod.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(&payload, dst).unwrap();
    })
    .unwrap();
    let mut buf = [0u8; 2048];
    loop {
        match rx.recv(&mut buf) {
            Ok(n) if &buf[..n] == expect => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

/// A VXLAN datagram's payload (VNI 1) carrying `inner` (an IPv4 packet) to
/// the device with MAC `dst`.
fn vxlan_payload(dst: flannel_core::mac::MacAddr, inner: &[u8]) -> Vec<u8> {
    let mut p = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    p.extend(dst.octets());
    p.extend([0x02, 0, 0, 0, 0x66, 0x66, 0x08, 0x00]);
    p.extend(inner);
    p
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Encap {
    Vxlan,
    Udp,
}

/// Issue 14 item 5: a pod hands a node an encapsulated datagram (vxlan on
/// 8472, the udp backend's on 8285) whose inner packet impersonates another
/// pod. Masqueraded to its node's address it passed every check and was
/// delivered; the encapsulation guard drops it on the pod's node (and on
/// the receiver, for pods of other nodes and for its own), while the
/// nodes' own encapsulated traffic flows. A flushed guard is restored.
fn encap_guard(tag: &str, config: &str, encap: Encap) {
    let c = Cluster::new(tag, 2, config);
    let mut d1 = c.start(0, &["--ip-masq"]);
    let s1 = c.wait_subnet(0, &mut d1);
    let mut d2 = c.start(1, &["--ip-masq"]);
    let s2 = c.wait_subnet(1, &mut d2);
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    let pod_ip = Ipv4Addr::from(u32::from(s1.network()) + 2);
    let pod = add_pod_ns(n1, first(s1), pod_ip);
    let port = match encap {
        Encap::Vxlan => 8472,
        Encap::Udp => 8285,
    };
    let guarded = |n: &Node| match encap {
        Encap::Vxlan => n.sh("iptables-save", &["-t", "raw"]).contains(&format!(
            "-A FLANNEL-ENCAP -s 10.244.0.0/16 ! -d 10.244.0.0/16 -p udp -m udp --dport {port} "
        )),
        Encap::Udp => n
            .try_sh("nft", &["list", "chain", "ip", "flannel-ipv4", "encap"])
            .is_ok_and(|t| t.contains(&format!("udp dport {port} drop"))),
    };
    wait_true(n1, "node1's encapsulation guard", 10, || guarded(n1));
    wait_true(n2, "node2's encapsulation guard", 10, || guarded(n2));

    // node2's datapath address, and a listener there.
    let vtep2 = match encap {
        Encap::Vxlan => s2.network(),
        Encap::Udp => {
            n2.sh(
                "ip",
                &["addr", "add", &format!("{}/32", first(s2)), "dev", "lo"],
            );
            first(s2)
        }
    };
    let rx2 = listener(&n2.ns, 40000);
    // The overlay works for the pod (through node1's own encapsulation),
    // and the listener answers to plain traffic.
    wait_true(n1, "pod -> node2 over the overlay", 10, || {
        try_sh_in(
            &pod.name,
            "ping",
            &["-c", "1", "-W", "1", &vtep2.to_string()],
        )
        .is_ok()
    });
    assert!(
        delivered(
            &pod,
            SocketAddrV4::new(vtep2, 40000),
            b"plain",
            &rx2,
            b"plain"
        ),
        "plain pod -> node2 UDP must pass"
    );

    // The forged datagram: an inner packet "from" another pod of node1 to
    // node2's listener, encapsulated by the pod itself.
    let forged_src = SocketAddrV4::new(Ipv4Addr::from(u32::from(s1.network()) + 77), 5555);
    let inner = inner_udp(forged_src, SocketAddrV4::new(vtep2, 40000), b"forged");
    let payload = match encap {
        Encap::Vxlan => {
            let mac = c
                .leases()
                .into_iter()
                .find(|l| l.key.ipv4 == Some(s2))
                .and_then(|l| l.attrs.vxlan_data())
                .expect("node2's vxlan lease")
                .vtep_mac;
            vxlan_payload(mac, &inner)
        }
        Encap::Udp => inner,
    };
    let node2_underlay = SocketAddrV4::new("172.16.1.12".parse().unwrap(), port);
    let node2_overlay = SocketAddrV4::new(vtep2, port);
    for dst in [node2_underlay, node2_overlay] {
        assert!(
            !delivered(&pod, dst, &payload, &rx2, b"forged"),
            "a pod's encapsulated datagram to {dst} must be dropped"
        );
    }

    // Control: with node1's guard flushed the same datagram is delivered
    // (the test can fail), then flanneld restores the guard (1 s resync).
    match encap {
        Encap::Vxlan => n1.sh("iptables", &["-t", "raw", "-F", "FLANNEL-ENCAP"]),
        Encap::Udp => n1.sh("nft", &["flush", "chain", "ip", "flannel-ipv4", "encap"]),
    };
    let leaked = delivered(&pod, node2_underlay, &payload, &rx2, b"forged");
    wait_true(n1, "node1's guard restored", 10, || guarded(n1));
    assert!(
        leaked,
        "without the guard the forged datagram reaches node2 (the hole of issue 14 item 5)"
    );
    assert!(
        !delivered(&pod, node2_underlay, &payload, &rx2, b"forged"),
        "dropped again once the guard is back"
    );
    if encap == Encap::Vxlan {
        // The pod's own node: its vxlan device takes anything on 8472 too.
        let rx1 = listener(&n1.ns, 40001);
        let mac1 = c
            .leases()
            .into_iter()
            .find(|l| l.key.ipv4 == Some(s1))
            .and_then(|l| l.attrs.vxlan_data())
            .unwrap()
            .vtep_mac;
        let forged = SocketAddrV4::new(Ipv4Addr::from(u32::from(s2.network()) + 77), 5555);
        let inner = inner_udp(forged, SocketAddrV4::new(s1.network(), 40001), b"forged1");
        let to_self = SocketAddrV4::new("172.16.1.11".parse().unwrap(), port);
        assert!(
            !delivered(
                &pod,
                to_self,
                &vxlan_payload(mac1, &inner),
                &rx1,
                b"forged1"
            ),
            "a pod's vxlan datagram to its own node must be dropped"
        );
    }
    // The nodes' own encapsulation still carries the pod's traffic.
    assert!(
        try_sh_in(
            &pod.name,
            "ping",
            &["-c", "1", "-W", "2", &vtep2.to_string()]
        )
        .is_ok(),
        "pod -> node2 over the overlay with the guard in place"
    );
    d1.stop(&n1.log());
    d2.stop(&n2.log());
}

#[test]
fn pods_cannot_send_vxlan_datagrams_to_nodes_iptables_mode() {
    encap_guard("guard-vx", VXLAN_IPT_CONFIG, Encap::Vxlan);
}

#[test]
fn pods_cannot_send_udp_backend_datagrams_to_nodes_nftables_mode() {
    encap_guard("guard-udp", UDP_NFT_CONFIG, Encap::Udp);
}

/// The encapsulation guard in IPv6 (ip6tables raw and the ip6 table's
/// prerouting chain): the kernel takes the rules as flannel-core writes
/// them and lists them back equal, so a second pass changes nothing.
#[test]
fn ipv6_encap_guard_is_kept_in_line_in_both_modes() {
    let (ns, mut input) = ipv6_only(
        "fdrg6",
        RuleOptions {
            masquerade: false,
            fully_random: true,
            forward: true,
            encap_port: Some(8472),
        },
    );
    let nets = input.v6.unwrap();
    let sync = |input: &RulesInput| {
        let (r, e) = ns
            .run(|| flanneld::rules::sync(input, &[IpFamily::V6]))
            .unwrap();
        assert!(e.is_empty(), "{e:?}");
        r.changed
    };
    assert!(!sync(&input).is_empty());
    let want = core_rules::iptables_save_lines(
        &core_rules::iptables_desired(IpFamily::V6, Some(nets), input.options)[2],
    );
    let raw: Vec<String> = sh_in(&ns.name, "ip6tables-save", &["-t", "raw"])
        .lines()
        .filter(|l| l.contains("FLANNEL-"))
        .filter(|l| l.starts_with("-A "))
        .map(str::to_string)
        .collect();
    assert_eq!(raw, want);
    assert!(sync(&input).is_empty(), "in line");

    input.mode = Mode::Nftables;
    ns.run(|| flanneld::rules::remove_mode(Mode::Iptables))
        .unwrap();
    assert!(!sh_in(&ns.name, "ip6tables-save", &[]).contains("FLANNEL-ENCAP"));
    assert_eq!(sync(&input), ["nft table ip6 flannel-ipv6 rewritten"]);
    let t = sh_in(
        &ns.name,
        "nft",
        &["list", "chain", "ip6", "flannel-ipv6", "encap"],
    );
    assert!(
        t.contains("ip6 saddr fd00:10:244::/56 udp dport 8472 fib daddr type local drop")
            && t.contains(
                "ip6 saddr fd00:10:244::/56 ip6 daddr != fd00:10:244::/56 udp dport 8472 drop"
            ),
        "{t}"
    );
    assert!(sync(&input).is_empty(), "in line");
    ns.run(|| flanneld::rules::remove_mode(Mode::Nftables))
        .unwrap();
}
