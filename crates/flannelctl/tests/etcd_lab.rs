//! End-to-end tests of labs on etcd (`lab up --store etcd`): a real etcd
//! server in the master's namespace, every flanneld on
//! `--etcd-endpoints http://172.16.1.8:2379`. Each test has its own lab
//! (namespaces `t<pid>n<counter>-...`), taken down by a guard, and the tests
//! of this file run in parallel.
//!
//! Needs root, etcd (`apt-get install etcd-server`), and `cargo build
//! --workspace --bins` first.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use flannel_core::mac::MacAddr;
use flannel_netlink::{Monitor, Notification};
use flannelctl::lab::{self, Lab, LabOptions, Outcome, Pinger, StoreKind};
use ipnet::IpNet;

fn etcd_lab(workers: u32, lease_ttl: Option<u64>, reservations: bool) -> LabGuard {
    up_with(LabOptions {
        nodes: workers,
        store: StoreKind::Etcd,
        lease_ttl,
        reservations,
        ..LabOptions::default()
    })
}

/// Runs the flannelctl binary and returns its stdout, failing with its stderr.
fn flannelctl(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_flannelctl"))
        .args(args)
        .env_remove("FLANNEL_LAB_NAME")
        .output()
        .expect("run flannelctl");
    assert!(
        out.status.success(),
        "flannelctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Every pod pings every other pod: TTL 62 across nodes.
fn assert_pods_at_ttl_62(m: &lab::Matrix, pods: &[String]) {
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
fn wait_matrix_green(lab: &Lab, within: Duration) -> lab::Matrix {
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
fn monitors(lab: &Lab, nodes: &[&str]) -> Vec<(String, Monitor)> {
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
fn deletions(lab: &Lab, mons: &mut [(String, Monitor)]) -> Vec<(String, Notification)> {
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
fn ping_loop(
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

/// The MACs of `nodes` as their kernels hold them.
fn macs_of(lab: &Lab, nodes: &[&str]) -> Vec<(String, MacAddr)> {
    nodes
        .iter()
        .map(|n| {
            let t = read_tables(lab, n).unwrap_or_else(|| panic!("{n} has no flannel.1"));
            (n.to_string(), t.mac)
        })
        .collect()
}

#[test]
fn etcd_lab_matrix_leases_and_upstream_wire_layout() {
    let lab = etcd_lab(3, None, true);
    let m = lab.check().unwrap();
    println!("{}", m.render());
    assert!(m.all_ok(), "matrix has failures:\n{}", m.render());
    assert_eq!(m.total(), 3 * (2 + 8));
    let pods: Vec<String> = lab.state.pods.iter().map(|p| p.name.clone()).collect();
    assert_pods_at_ttl_62(&m, &pods);

    // The daemons really run on etcd: no --local-store, the lab's endpoint.
    assert!(lab.etcd_alive(), "the lab's etcd is not running");
    for n in &lab.state.nodes {
        let pid = lab.daemon_pid(&n.name).unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert!(
            !args.iter().any(|a| a == "--local-store"),
            "{}: {args:?}",
            n.name
        );
        assert!(
            args.windows(2)
                .any(|w| w[0] == "--etcd-endpoints" && w[1] == "http://172.16.1.8:2379"),
            "{}: {args:?}",
            n.name
        );
    }

    // Exact kernel state on every node.
    let macs = vtep_macs(&lab);
    for n in &lab.state.nodes {
        tables_match(&lab, &n.name, &macs).unwrap_or_else(|e| panic!("{e}"));
    }

    // `lab leases --json`: one lease per node, its subnet, address and MAC.
    let json = flannelctl(&["lab", "leases", "--name", lab.name(), "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let got: BTreeMap<String, (String, String, bool)> = rows
        .iter()
        .map(|r| {
            (
                r["subnet"].as_str().unwrap().to_string(),
                (
                    r["public_ip"].as_str().unwrap().to_string(),
                    r["vtep_mac"].as_str().unwrap_or("-").to_string(),
                    r["reservation"].as_bool().unwrap(),
                ),
            )
        })
        .collect();
    let want: BTreeMap<String, (String, String, bool)> = lab
        .state
        .nodes
        .iter()
        .map(|n| {
            let mac = macs.iter().find(|(m, _)| *m == n.name).unwrap().1;
            (
                n.subnet.to_string(),
                (n.underlay_ip.to_string(), mac.to_string(), true),
            )
        })
        .collect();
    assert_eq!(got, want, "lab leases --json:\n{json}");
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        [
            "10.244.0.0/24",
            "10.244.1.0/24",
            "10.244.2.0/24",
            "10.244.3.0/24"
        ]
    );

    // The raw etcd value of node1's lease is upstream's LeaseAttrs JSON, byte for byte.
    let key = lab.etcd_lease_key("k8s-node1").unwrap();
    assert_eq!(key, "/coreos.com/network/subnets/10.244.1.0-24");
    let raw = lab
        .etcd_get(&key)
        .unwrap()
        .expect("node1's lease is in etcd");
    let mac1 = macs.iter().find(|(n, _)| n == "k8s-node1").unwrap().1;
    assert_eq!(
        raw,
        format!(
            r#"{{"PublicIP":"172.16.1.14","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac1}"}}}}"#
        )
    );
    // The config flanneld read is the one the lab wrote.
    let config = lab.etcd_get("/coreos.com/network/config").unwrap().unwrap();
    assert_eq!(config, lab::net_conf_json());

    // `flannelctl leases` against etcd, from inside the master (the root
    // namespace cannot reach 172.16.1.8), endpoint given by flanneld's variable.
    let out = Command::new(env!("CARGO_BIN_EXE_flannelctl"))
        .args(["lab", "exec", "--name", lab.name(), "master", "--"])
        .arg("env")
        .arg("FLANNELD_ETCD_ENDPOINTS=http://172.16.1.8:2379")
        .arg(env!("CARGO_BIN_EXE_flannelctl"))
        .args(["leases", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let direct: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        direct, rows,
        "flannelctl leases (etcd) differs from lab leases"
    );
    // Unreachable etcd (nothing listens in the root namespace's 172.16.1.8): a clear error.
    let out = Command::new(env!("CARGO_BIN_EXE_flannelctl"))
        .args(["leases", "--etcd-endpoints", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http://127.0.0.1:1"), "{err}");

    bad_values_in_etcd_are_logged_and_harm_no_valid_peer(&lab, &macs);

    // Status names the store and its health.
    let status = lab.status();
    let text = status.render();
    assert!(status.healthy(), "{text}");
    assert!(text.contains("etcd http://172.16.1.8:2379"), "{text}");
    assert!(text.contains("running"), "{text}");

    // The operator's commands: an outage and its end, a node joining.
    let name = lab.name().to_string();
    let stopped = flannelctl(&["lab", "store", "stop", "--name", &name]);
    assert!(stopped.contains("stopped"), "{stopped}");
    let st = Command::new(env!("CARGO_BIN_EXE_flannelctl"))
        .args(["lab", "status", "--name", &name])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(!st.status.success(), "status exits 0 without etcd:\n{text}");
    assert!(text.contains("stopped") && text.contains("DOWN"), "{text}");
    let started = flannelctl(&["lab", "store", "start", "--name", &name]);
    assert!(started.contains("http://172.16.1.8:2379"), "{started}");
    let added = flannelctl(&["lab", "add-node", "--name", &name]);
    assert!(
        added.contains("k8s-node4 172.16.1.24 10.244.4.0/24"),
        "{added}"
    );
    let m = wait_matrix_green(&Lab::open(&name).unwrap(), Duration::from_secs(20));
    assert_eq!(m.total(), 4 * (3 + 10));
    flannelctl(&["lab", "status", "--name", &name]);

    // `down` stops etcd too, and only etcd: etcd.pid is made to name another
    // process (a stale pid file whose pid was reused), which must survive;
    // the real etcd is still found by its command line and stopped.
    let etcd_pid = lab.etcd_pid().expect("etcd.pid");
    let mut decoy = Command::new("sleep").arg("60").spawn().unwrap();
    std::fs::write(lab.etcd_dir().join("etcd.pid"), format!("{}\n", decoy.id())).unwrap();
    let down = lab::down(lab.name());
    let decoy_alive = decoy.try_wait().unwrap().is_none();
    decoy.kill().unwrap();
    decoy.wait().unwrap();
    down.unwrap();
    assert!(
        decoy_alive,
        "lab down killed a process that is not its etcd"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{etcd_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{etcd_pid}/stat"))
                .is_ok_and(|s| s.contains(") Z")),
        "etcd (pid {etcd_pid}) survived lab down"
    );
    assert_eq!(lab::lab_processes(lab.name()), Vec::<u32>::new());
    assert_eq!(lab::lab_namespaces(lab.name()), Vec::<String>::new());
}

/// Issue 3: a lease value that is not JSON, a key under `subnets/` that is
/// no subnet, and a config that fails validation are each logged naming the
/// key; every daemon stays alive, no valid peer's kernel state is removed
/// (netlink monitors) and the matrix stays green. A daemon restarted while
/// the config is invalid waits, logging why, and carries on once it is fixed.
/// Leaves the lab as it found it (bad keys deleted, config restored).
fn bad_values_in_etcd_are_logged_and_harm_no_valid_peer(lab: &Lab, macs: &[(String, MacAddr)]) {
    const NOT_JSON: &str = "/coreos.com/network/subnets/10.244.99.0-24";
    const NOT_A_SUBNET: &str = "/coreos.com/network/subnets/garbage";
    const CONFIG: &str = "/coreos.com/network/config";
    let nodes: Vec<String> = lab.state.nodes.iter().map(|n| n.name.clone()).collect();
    let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let pids: Vec<u32> = names.iter().map(|n| lab.daemon_pid(n).unwrap()).collect();
    let log = |n: &str| std::fs::read_to_string(lab.log_path(n)).unwrap_or_default();
    let mut mons = monitors(lab, &names);

    lab.etcd_put(NOT_JSON, "not json").unwrap();
    lab.etcd_put(NOT_A_SUBNET, "{}").unwrap();
    // Every daemon's watch sees both keys and names them.
    let deadline = Instant::now() + Duration::from_secs(15);
    for n in &names {
        loop {
            let text = log(n);
            if text.contains(NOT_JSON) && text.contains(NOT_A_SUBNET) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{n}'s log does not name both bad keys:\n{text}"
            );
            assert!(lab.daemon_alive(n), "{n}'s flanneld died:\n{text}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // The running daemons read the config only at start: a node restarted
    // now meets the invalid one.
    let restarted = "k8s-node2";
    let invalid = r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#;
    lab.etcd_put(CONFIG, invalid).unwrap();
    let holding_before = log(restarted).matches("holding lease").count();
    assert!(lab.stop_daemon(restarted, Duration::from_secs(10)).unwrap());
    lab.start_daemon(restarted).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = log(restarted);
        let tail = &text[text.rfind("SIGTERM").unwrap_or(0)..];
        if tail.contains(CONFIG) && tail.contains("SubnetLen") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{restarted}'s log does not name the invalid config:\n{text}"
        );
        assert!(lab.daemon_alive(restarted), "{restarted} exited:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The whole cluster unaffected: daemons alive (the others not even
    // restarted), exact triples everywhere, nothing deleted, pings answered.
    for (n, pid) in names.iter().zip(&pids) {
        assert!(lab.daemon_alive(n), "{n}'s flanneld died:\n{}", log(n));
        if *n != restarted {
            assert_eq!(lab.daemon_pid(n), Some(*pid), "{n} restarted");
        }
        tables_match(lab, n, macs).unwrap_or_else(|e| panic!("with bad values in etcd: {e}"));
    }
    let m = lab.check().unwrap();
    assert!(m.all_ok(), "with bad values in etcd:\n{}", m.render());
    let gone = deletions(lab, &mut mons);
    assert!(gone.is_empty(), "kernel state deleted: {gone:?}");

    // Restored: the waiting daemon carries on by itself, still nothing deleted.
    lab.etcd_put(CONFIG, &lab::net_conf_json()).unwrap();
    assert!(lab.etcd_delete(NOT_JSON).unwrap());
    assert!(lab.etcd_delete(NOT_A_SUBNET).unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    while log(restarted).matches("holding lease").count() <= holding_before {
        assert!(
            Instant::now() < deadline,
            "{restarted} did not resume after the config was restored:\n{}",
            log(restarted)
        );
        assert!(lab.daemon_alive(restarted), "{}", log(restarted));
        std::thread::sleep(Duration::from_millis(100));
    }
    for n in &names {
        wait_tables(lab, n, macs, Duration::from_secs(10));
    }
    assert!(lab.check().unwrap().all_ok());
    let gone = deletions(lab, &mut mons);
    assert!(gone.is_empty(), "kernel state deleted: {gone:?}");
}

#[test]
fn missing_etcd_binary_is_a_clear_error_and_builds_nothing() {
    require_root();
    bin_dir();
    let name = unique_name();
    let out = Command::new(env!("CARGO_BIN_EXE_flannelctl"))
        .args(["lab", "up", "--store", "etcd", "--name", &name])
        .env("FLANNEL_LAB_ETCD", "/nonexistent/etcd")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let (namespaces, dir) = (lab::lab_namespaces(&name), lab::lab_dir(&name).exists());
    // Should it have built anything, remove it before failing.
    let _ = lab::down(&name);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("apt-get install etcd-server"), "{err}");
    assert!(namespaces.is_empty(), "{namespaces:?}");
    assert!(!dir, "the labdir was created");
}

#[test]
fn etcd_outage_loses_no_ping_removes_nothing_and_a_node_added_meanwhile_joins() {
    let mut lab = etcd_lab(2, None, true);
    let old_nodes = ["master", "k8s-node1", "k8s-node2"];
    let macs = vtep_macs(&lab);
    let pids: Vec<u32> = old_nodes
        .iter()
        .map(|n| lab.daemon_pid(n).unwrap())
        .collect();
    let mut mons = monitors(&lab, &old_nodes);
    let to = lab.pod("ubuntu-2").unwrap().ip.unwrap().addr();
    let stop = Arc::new(AtomicBool::new(false));
    let pinging = ping_loop(&lab, "ubuntu-1", to, stop.clone());
    std::thread::sleep(Duration::from_millis(500));

    assert!(lab.stop_store().unwrap(), "etcd was not running");
    let outage = Instant::now();
    assert!(!lab.etcd_alive());
    assert!(!lab.status().healthy(), "status is healthy without etcd");
    // A new worker joins while etcd is down: its daemon waits for etcd.
    let new = lab.begin_add_node().unwrap();
    assert_eq!(new, "k8s-node3");
    while outage.elapsed() < Duration::from_secs(30) {
        // The daemons ride the outage out.
        for (n, pid) in old_nodes.iter().zip(&pids) {
            assert_eq!(lab.daemon_pid(n), Some(*pid), "{n} restarted");
            assert!(lab.daemon_alive(n), "{n}'s flanneld died during the outage");
        }
        assert!(
            lab.daemon_alive(&new),
            "{new}'s flanneld died waiting for etcd"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let during = deletions(&lab, &mut mons);
    assert!(
        during.is_empty(),
        "kernel state deleted during the outage: {during:?}"
    );
    for n in old_nodes {
        tables_match(&lab, n, &macs).unwrap_or_else(|e| panic!("during the outage: {e}"));
    }

    lab.start_store().unwrap();
    lab.finish_add_node(&new, Instant::now() + Duration::from_secs(45))
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let (sent, lost) = pinging.join().unwrap();
    assert!(sent >= 250, "only {sent} pings were sent");
    assert!(lost.is_empty(), "lost pings {lost:?} of {sent}");

    // The new node is reachable from every pod and reaches every pod.
    let m = wait_matrix_green(&lab, Duration::from_secs(30));
    assert_eq!(m.total(), 3 * (2 + 8));
    assert_pods_at_ttl_62(
        &m,
        &["ubuntu-1".into(), "ubuntu-2".into(), "ubuntu-3".into()],
    );
    assert_eq!(lab.node(&new).unwrap().subnet.to_string(), "10.244.3.0/24");
    let all = vtep_macs(&lab);
    for n in &lab.state.nodes {
        wait_tables(&lab, &n.name, &all, Duration::from_secs(10));
    }
    // Without restarting the others.
    for (n, pid) in old_nodes.iter().zip(&pids) {
        assert_eq!(lab.daemon_pid(n), Some(*pid), "{n} was restarted");
    }
    let after = deletions(&lab, &mut mons);
    assert!(
        after.is_empty(),
        "kernel state deleted after etcd returned: {after:?}"
    );
    assert!(lab.status().healthy(), "{}", lab.status().render());
}

#[test]
fn expired_lease_of_a_killed_node_removes_its_triple_everywhere() {
    const TTL: u64 = 5;
    let lab = etcd_lab(2, Some(TTL), false);
    let macs = vtep_macs(&lab);
    // Ordinary leases, not reservations: each expires within the TTL.
    let now = SystemTime::now();
    for l in lab.leases().unwrap() {
        let exp = l
            .expiration
            .unwrap_or_else(|| panic!("{:?} is a reservation", l.key));
        assert!(
            exp <= now + Duration::from_secs(TTL + 1),
            "{:?} expires too late",
            l.key
        );
    }
    assert_eq!(
        lab.node("k8s-node2").unwrap().subnet.to_string(),
        "10.244.2.0/24"
    );
    let node2_subnet = lab.node("k8s-node2").unwrap().subnet;
    for n in ["master", "k8s-node1"] {
        tables_match(&lab, n, &macs).unwrap_or_else(|e| panic!("{e}"));
    }

    assert!(lab.kill_daemon("k8s-node2").unwrap());
    let killed = Instant::now();
    let rest: Vec<(String, MacAddr)> = macs
        .iter()
        .filter(|(n, _)| n != "k8s-node2")
        .cloned()
        .collect();
    for n in ["master", "k8s-node1"] {
        wait_tables(&lab, n, &rest, Duration::from_secs(TTL + 10));
    }
    // Not before the lease could have expired (a renewal may have just happened).
    assert!(
        killed.elapsed() >= Duration::from_secs(1),
        "routes vanished {:?} after the kill: too early for an expiry",
        killed.elapsed()
    );
    // etcd revokes an expired lease on its own schedule (its lessor checks
    // about twice a second), so the key may outlive the expiry a little.
    let deadline = Instant::now() + Duration::from_secs(5);
    while lab
        .leases()
        .unwrap()
        .iter()
        .any(|l| l.key.ipv4 == Some(node2_subnet))
    {
        assert!(
            Instant::now() < deadline,
            "node2's lease is still in etcd {:?} after the kill",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The survivors still talk to each other (pod to the master's flannel.1: ttl 63).
    let mut p = Pinger::open_in(&lab.netns("ubuntu-1").unwrap()).unwrap();
    let reply = p
        .echo(
            lab.node("master").unwrap().subnet.network(),
            Duration::from_secs(2),
        )
        .unwrap()
        .expect("ubuntu-1 cannot reach the master's flannel.1 after node2 expired");
    assert_eq!(reply.ttl, 63);
}

#[test]
fn short_ttl_leases_are_renewed_and_never_lapse() {
    const TTL: u64 = 4;
    let lab = etcd_lab(2, Some(TTL), false);
    let nodes = ["master", "k8s-node1", "k8s-node2"];
    let macs = macs_of(&lab, &nodes);
    let mut mons = monitors(&lab, &nodes);
    let subnets: Vec<_> = lab.state.nodes.iter().map(|n| n.subnet).collect();
    let start = Instant::now();
    let mut first_expiry = BTreeMap::new();
    let mut renewed = BTreeMap::new();
    // Four lifetimes: a lease not renewed would be gone twice over.
    while start.elapsed() < Duration::from_secs(4 * TTL) {
        let leases = lab.leases().unwrap();
        for s in &subnets {
            let l = leases
                .iter()
                .find(|l| l.key.ipv4 == Some(*s))
                .unwrap_or_else(|| panic!("the lease of {s} lapsed after {:?}", start.elapsed()));
            let exp = l.expiration.expect("an ordinary lease has an expiry");
            assert!(exp > SystemTime::now(), "{s} is past its expiry");
            let first = *first_expiry.entry(*s).or_insert(exp);
            if exp > first + Duration::from_secs(1) {
                renewed.insert(*s, true);
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for s in &subnets {
        assert!(
            renewed.get(s).copied().unwrap_or(false),
            "the expiry of {s} never moved: not renewed"
        );
    }
    let gone = deletions(&lab, &mut mons);
    assert!(
        gone.is_empty(),
        "routes vanished while leases were renewed: {gone:?}"
    );
    for n in nodes {
        tables_match(&lab, n, &macs).unwrap_or_else(|e| panic!("{e}"));
    }
    let m = lab.check().unwrap();
    assert!(m.all_ok(), "{}", m.render());
}

#[test]
fn etcd_outage_longer_than_the_lease_ttl_removes_nothing() {
    // Upstream acts only on etcd's own DELETE of an expired key; while etcd
    // is down nothing expires (etcd extends every lease when it is back), so
    // a node must not expire its peers' leases on its own clock.
    const TTL: u64 = 4;
    let lab = etcd_lab(2, Some(TTL), false);
    let nodes = ["master", "k8s-node1", "k8s-node2"];
    let macs = macs_of(&lab, &nodes);
    let mut mons = monitors(&lab, &nodes);
    let to = lab.pod("ubuntu-2").unwrap().ip.unwrap().addr();
    let stop = Arc::new(AtomicBool::new(false));
    let pinging = ping_loop(&lab, "ubuntu-1", to, stop.clone());

    assert!(lab.stop_store().unwrap(), "etcd was not running");
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(3 * TTL) {
        for n in nodes {
            assert!(lab.daemon_alive(n), "{n}'s flanneld died during the outage");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let during = deletions(&lab, &mut mons);
    assert!(
        during.is_empty(),
        "kernel state deleted during an outage of {:?} (lease TTL {TTL} s): {during:?}",
        outage.elapsed()
    );
    lab.start_store().unwrap();
    // Back: every lease is there again and renewed on, nothing was deleted.
    let back = Instant::now();
    while back.elapsed() < Duration::from_secs(2 * TTL) {
        if let Ok(leases) = lab.leases() {
            for n in &lab.state.nodes {
                assert!(
                    leases.iter().any(|l| l.key.ipv4 == Some(n.subnet)),
                    "{}'s lease is gone {:?} after etcd returned",
                    n.name,
                    back.elapsed()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    stop.store(true, Ordering::Relaxed);
    let (sent, lost) = pinging.join().unwrap();
    assert!(lost.is_empty(), "lost pings {lost:?} of {sent}");
    let after = deletions(&lab, &mut mons);
    assert!(
        after.is_empty(),
        "kernel state deleted after etcd returned: {after:?}"
    );
    for n in nodes {
        tables_match(&lab, n, &macs).unwrap_or_else(|e| panic!("{e}"));
    }
    let m = lab.check().unwrap();
    assert!(m.all_ok(), "{}", m.render());
}

/// `flannelctl explain DST` on a udp node of an etcd cluster names flanneld's
/// peer from the leases in etcd (read only because the walk reaches
/// flannel0), and with etcd unreachable says why it cannot, without calling
/// the packet dropped.
#[test]
fn explain_on_a_udp_node_names_the_peer_from_etcd() {
    let lab = up_with(LabOptions {
        nodes: 2,
        store: StoreKind::Etcd,
        backend: lab::Backend::Udp,
        ..LabOptions::default()
    });
    let endpoint = lab.etcd_endpoint().unwrap();
    let pod2 = lab.pod("ubuntu-2").unwrap().ip.expect("IPv4 pod").addr();
    let node2 = lab.node("k8s-node2").unwrap().underlay_ip;
    let explain = |etcd: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", &format!("{}-k8s-node1", lab.name())])
            .arg(env!("CARGO_BIN_EXE_flannelctl"))
            .args(["explain", &pod2.to_string(), "--etcd-endpoints", etcd])
            .env_remove("FLANNELD_LOCAL_STORE")
            .env_remove("FLANNELD_ETCD_ENDPOINTS")
            .output()
            .expect("run flannelctl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    };
    let (ok, text) = explain(&endpoint);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("payload of UDP to {node2}:8285"))
            && text.contains(&format!("{node2}:8285 (flanneld's udp peer)")),
        "{text}"
    );
    let (ok, text) = explain("http://127.0.0.1:1");
    assert!(ok, "an unknown peer is not a drop: {text}");
    assert!(
        text.contains("the leases are not known here (")
            && text.contains("etcd at http://127.0.0.1:1")
            && text.contains("leaves this node for flanneld's udp datapath"),
        "{text}"
    );
}
