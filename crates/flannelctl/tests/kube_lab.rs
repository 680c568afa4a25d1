//! End-to-end tests of Kubernetes mode (`lab up --store kube`): etcd and a
//! kube-apiserver in the master's namespace, one Node per node with its
//! podCIDR, every flanneld with `--kube-subnet-mgr` and a kubeconfig whose
//! user has exactly kube-flannel.yml's RBAC.
//!
//! The API server is the real kube-apiserver when `KUBE_APISERVER` names
//! one, else flannel-rs's Kubernetes API double (crate `kube-api-double`,
//! given to the lab explicitly with `--kube-apiserver`): the same tests, the
//! same assertions. flanneld's requests are counted from the API server's
//! audit log, which both write.
//!
//! Needs root, etcd (`apt-get install etcd-server`), and `cargo build
//! --workspace --bins` first.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use flannel_core::mac::MacAddr;
use flannelctl::lab::{self, kube, Lab, LabOptions, StoreKind};
use serde_json::Value;

const PREFIX: &str = "flannel.alpha.coreos.com/";

fn kube_lab(workers: u32) -> LabGuard {
    up_with(LabOptions {
        nodes: workers,
        store: StoreKind::Kube,
        kube_apiserver: kube_apiserver(),
        ..LabOptions::default()
    })
}

/// flanneld's requests from `ip` in the audit log (stage ResponseComplete,
/// or ResponseStarted for watches): (verb, resource[/subresource], URI).
fn requests_from(lab: &Lab, ip: Ipv4Addr) -> Vec<(String, String, String)> {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    lab.kube_audit()
        .unwrap()
        .into_iter()
        .filter(|e| e["user"]["username"] == kube::FLANNEL_USER)
        .filter(|e| {
            e["sourceIPs"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(&ip.to_string())))
        })
        .filter(|e| {
            let stage = e["stage"].as_str().unwrap_or("");
            if e["verb"] == "watch" {
                stage == "ResponseStarted"
            } else {
                stage == "ResponseComplete"
            }
        })
        .map(|e| {
            let res = match e["objectRef"]["subresource"].as_str() {
                Some(sub) if !sub.is_empty() => format!("{}/{sub}", s(&e["objectRef"]["resource"])),
                _ => s(&e["objectRef"]["resource"]),
            };
            (s(&e["verb"]), res, s(&e["requestURI"]))
        })
        .collect()
}

fn count(reqs: &[(String, String, String)], verb: &str, resource: &str) -> usize {
    reqs.iter()
        .filter(|(v, r, _)| v == verb && r == resource)
        .count()
}

/// The Node's annotations.
fn annotations(lab: &Lab, node: &str) -> BTreeMap<String, String> {
    lab.kube_node(node)
        .unwrap()
        .unwrap_or_else(|| panic!("no Node {node}"))
        .metadata
        .annotations
        .unwrap_or_default()
}

/// The Node's NetworkUnavailable condition, once flanneld set it.
fn wait_condition(lab: &Lab, node: &str) -> k8s_openapi::api::core::v1::NodeCondition {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = lab.kube_node(node).unwrap().unwrap();
        let c = n
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "NetworkUnavailable");
        if let Some(c) = c {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{node}: no NetworkUnavailable condition"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What upstream flanneld v0.20.2 publishes on a vxlan Node
/// (nodes-after-vxlan.json), and the kubelet's annotation beside it.
fn upstream_vxlan_annotations(ip: Ipv4Addr, mac: MacAddr) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            format!("{PREFIX}backend-data"),
            format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
        ),
        (format!("{PREFIX}backend-type"), "vxlan".to_string()),
        (format!("{PREFIX}kube-subnet-manager"), "true".to_string()),
        (format!("{PREFIX}public-ip"), ip.to_string()),
        (
            kube::KUBELET_ANNOTATION.0.to_string(),
            kube::KUBELET_ANNOTATION.1.to_string(),
        ),
    ])
}

fn is_rfc3339_seconds(t: &str) -> bool {
    t.len() == 20 && t.ends_with('Z') && t.as_bytes()[10] == b'T'
}

#[test]
fn kube_lab_pings_at_ttl_62_holds_the_triples_and_publishes_upstreams_annotations() {
    let lab = kube_lab(2);
    let m = lab.check().unwrap();
    m.ensure_all_ok()
        .unwrap_or_else(|e| panic!("{e}\n{}", m.render()));
    assert_pods_at_ttl_62(&m, &["ubuntu-1".into(), "ubuntu-2".into()]);
    let macs = vtep_macs(&lab);
    for n in &lab.state.nodes {
        wait_tables(&lab, &n.name, &macs, Duration::from_secs(10));
    }
    for n in &lab.state.nodes {
        let mac = macs.iter().find(|(m, _)| *m == n.name).unwrap().1;
        // Byte for byte what upstream writes, so a mixed cluster works.
        assert_eq!(
            annotations(&lab, &n.name),
            upstream_vxlan_annotations(n.underlay_ip, mac),
            "{}",
            n.name
        );
        let c = wait_condition(&lab, &n.name);
        assert_eq!(
            (c.status.as_str(), c.reason.as_deref(), c.message.as_deref()),
            (
                "False",
                Some("FlannelIsUp"),
                Some("Flannel is running on this node")
            ),
            "{}",
            n.name
        );
        let stamp = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
            serde_json::to_value(t)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        };
        assert!(is_rfc3339_seconds(&stamp(&c.last_heartbeat_time)));
        assert!(is_rfc3339_seconds(&stamp(&c.last_transition_time)));
        // The node's subnet is its podCIDR.
        let env = std::fs::read_to_string(lab.subnet_file(&n.name)).unwrap();
        let first = n.subnet.hosts().next().unwrap();
        assert!(env.contains(&format!("FLANNEL_SUBNET={first}/24")), "{env}");
    }
    // Each flanneld made the requests upstream's does: one list of the
    // Nodes from the cache (resourceVersion=0), a watch, the annotation
    // patch and the condition patch of its Node's status, and nothing else
    // (no GET of a Node, no write to another Node).
    for n in &lab.state.nodes {
        let deadline = Instant::now() + Duration::from_secs(10);
        let reqs = loop {
            let r = requests_from(&lab, n.underlay_ip);
            if count(&r, "patch", "nodes/status") >= 2 || Instant::now() > deadline {
                break r;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(count(&reqs, "list", "nodes"), 1, "{}: {reqs:#?}", n.name);
        assert!(
            reqs.iter()
                .any(|(v, _, uri)| v == "list" && uri.contains("resourceVersion=0")),
            "{}: {reqs:#?}",
            n.name
        );
        assert!(count(&reqs, "watch", "nodes") >= 1, "{}: {reqs:#?}", n.name);
        assert_eq!(
            count(&reqs, "patch", "nodes/status"),
            2,
            "{}: {reqs:#?}",
            n.name
        );
        let own = format!("/api/v1/nodes/{}/status", n.name);
        for (verb, res, uri) in &reqs {
            match verb.as_str() {
                "list" | "watch" => assert_eq!(res, "nodes"),
                "patch" => assert!(uri.starts_with(&own), "{}: {uri}", n.name),
                other => panic!("{}: unexpected {other} {uri}", n.name),
            }
        }
    }
    // Without a podCIDR-less Node, the store's view is every node's lease.
    assert_eq!(lab.leases().unwrap().len(), 3);
    assert!(lab.status().healthy(), "{}", lab.status().render());
}

#[test]
fn kube_restart_after_a_reboot_keeps_the_vtep_mac_and_subnet_and_patches_no_annotation() {
    let lab = kube_lab(1);
    let macs = vtep_macs(&lab);
    let node1 = lab.node("k8s-node1").unwrap().clone();
    let mac = macs.iter().find(|(n, _)| n == "k8s-node1").unwrap().1;
    let before = annotations(&lab, "k8s-node1");
    assert!(lab
        .stop_daemon("k8s-node1", Duration::from_secs(10))
        .unwrap());
    // A reboot: flannel.1 and /run/flannel/subnet.env are gone.
    in_node(&lab, "k8s-node1", |nl| {
        let l = nl.link_by_name("flannel.1").unwrap().unwrap();
        nl.del_link(l.index).unwrap();
    });
    std::fs::remove_file(lab.subnet_file("k8s-node1")).unwrap();
    let seen = requests_from(&lab, node1.underlay_ip).len();

    lab.start_daemon("k8s-node1").unwrap();
    lab.wait_daemon_ready("k8s-node1", Instant::now() + Duration::from_secs(30))
        .unwrap();
    let t = wait_tables(&lab, "k8s-node1", &macs, Duration::from_secs(10));
    assert_eq!(
        t.mac, mac,
        "the VtepMAC came back from the Node's annotation"
    );
    assert_eq!(annotations(&lab, "k8s-node1"), before);
    wait_tables(&lab, "master", &macs, Duration::from_secs(5));
    // The second start: list, watch and the condition patch only (as the
    // recordings show upstream's restart).
    std::thread::sleep(Duration::from_secs(1));
    let after: Vec<_> = requests_from(&lab, node1.underlay_ip)
        .into_iter()
        .skip(seen)
        .collect();
    assert_eq!(count(&after, "list", "nodes"), 1, "{after:#?}");
    assert_eq!(count(&after, "patch", "nodes/status"), 1, "{after:#?}");
}

#[test]
fn kube_deleted_node_loses_its_routes_neighbours_and_fdb_entries_everywhere() {
    let lab = kube_lab(2);
    let macs = vtep_macs(&lab);
    lab.kube_delete_node("k8s-node2").unwrap();
    let rest: Vec<(String, MacAddr)> = macs
        .iter()
        .filter(|(n, _)| n != "k8s-node2")
        .cloned()
        .collect();
    for n in ["master", "k8s-node1"] {
        wait_tables(&lab, n, &rest, Duration::from_secs(10));
    }
    // The others are untouched and still reach each other.
    assert_ping(
        &lab,
        "ubuntu-1",
        lab.node("master").unwrap().subnet.network(),
        63,
    );
}

#[test]
fn kube_node_without_pod_cidr_waits_with_a_clear_error_then_joins_when_assigned() {
    let mut lab = kube_lab(1);
    let node = lab.begin_add_node_with(false).unwrap();
    assert_eq!(node, "k8s-node2");
    let log = lab.log_path(&node);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("pod cidr not assigned") {
            assert!(text.contains("\"k8s-node2\""), "{text}");
            assert!(text.contains("--allocate-node-cidrs"), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no podCIDR error in {}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // It waits: alive, not ready, no subnet.env.
    std::thread::sleep(Duration::from_secs(2));
    assert!(lab.daemon_alive(&node), "flanneld exited without a podCIDR");
    assert_eq!(lab.daemon_ready(&node), Ok(false));
    assert!(!lab.subnet_file(&node).exists());

    lab.kube_assign_pod_cidr(&node).unwrap();
    lab.finish_add_node(&node, Instant::now() + Duration::from_secs(30))
        .unwrap();
    let m = wait_matrix_green(&lab, Duration::from_secs(30));
    assert_pods_at_ttl_62(&m, &["ubuntu-1".into(), "ubuntu-2".into()]);
}

#[test]
fn kube_api_outage_of_30s_loses_no_ping_and_changes_after_it_are_seen() {
    let lab = kube_lab(2);
    let macs = vtep_macs(&lab);
    let pids: Vec<u32> = lab
        .state
        .nodes
        .iter()
        .map(|n| lab.daemon_pid(&n.name).unwrap())
        .collect();
    let names: Vec<&str> = lab.state.nodes.iter().map(|n| n.name.as_str()).collect();
    let mut mons = monitors(&lab, &names);
    let stop = Arc::new(AtomicBool::new(false));
    let pinging = ping_loop(&lab, "ubuntu-1", pod_ip(&lab, "ubuntu-2"), stop.clone());
    std::thread::sleep(Duration::from_millis(500));

    assert!(lab.stop_store().unwrap(), "the API server was not running");
    assert!(!lab.apiserver_alive());
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(30) {
        for (n, pid) in names.iter().zip(&pids) {
            assert_eq!(lab.daemon_pid(n), Some(*pid), "{n} restarted");
            assert!(lab.daemon_alive(n), "{n}'s flanneld died during the outage");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let during = deletions(&lab, &mut mons);
    assert!(
        during.is_empty(),
        "kernel state deleted during the outage: {during:?}"
    );
    lab.start_store().unwrap();

    // The daemons reconnect and see what changes afterwards.
    lab.kube_delete_node("k8s-node2").unwrap();
    stop.store(true, Ordering::Relaxed);
    let (sent, lost) = pinging.join().unwrap();
    assert!(sent >= 250, "only {sent} pings were sent");
    assert!(lost.is_empty(), "lost pings {lost:?} of {sent}");
    let rest: Vec<(String, MacAddr)> = macs
        .iter()
        .filter(|(n, _)| n != "k8s-node2")
        .cloned()
        .collect();
    for n in ["master", "k8s-node1"] {
        wait_tables(&lab, n, &rest, Duration::from_secs(20));
    }
    for (n, pid) in names.iter().zip(&pids) {
        assert_eq!(lab.daemon_pid(n), Some(*pid), "{n} was restarted");
    }
}

/// Restarts node1's flanneld with a second underlay address and one
/// annotation naming it set on its Node, then waits until node1's Node
/// publishes that address as `public-ip` and the master's FDB sends node1's
/// traffic there, and checks the overlay still carries it.
fn restart_node1_with_address_in_annotation(lab: &Lab, address: Ipv4Addr, annotation: &str) {
    assert!(lab
        .stop_daemon("k8s-node1", Duration::from_secs(10))
        .unwrap());
    in_node(lab, "k8s-node1", |nl| {
        let ens3 = nl.link_by_name(lab::NODE_IFACE).unwrap().unwrap();
        nl.add_address(ens3.index, format!("{address}/24").parse().unwrap())
            .unwrap();
    });
    lab.kube_patch_node(
        "k8s-node1",
        serde_json::json!({"metadata": {"annotations": {
            format!("{PREFIX}{annotation}"): address.to_string()
        }}}),
        false,
    )
    .unwrap();
    lab.start_daemon("k8s-node1").unwrap();
    lab.wait_daemon_ready("k8s-node1", Instant::now() + Duration::from_secs(30))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while annotations(lab, "k8s-node1").get(&format!("{PREFIX}public-ip"))
        != Some(&address.to_string())
    {
        assert!(
            Instant::now() < deadline,
            "public-ip is not {address}: {:?}",
            annotations(lab, "k8s-node1")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mac = vtep_macs(lab)
        .into_iter()
        .find(|(n, _)| n == "k8s-node1")
        .unwrap()
        .1;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = read_tables(lab, "master").unwrap();
        if t.fdb
            .iter()
            .any(|f| f.mac == mac && f.dst == std::net::IpAddr::V4(address))
        {
            break;
        }
        assert!(Instant::now() < deadline, "master's fdb: {:?}", t.fdb);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_ping(
        lab,
        "ubuntu-1",
        lab.node("master").unwrap().subnet.network(),
        63,
    );
}

/// `public-ip-overwrite` on the Node (the address others must use, a NAT's
/// say; here a second address of the node itself, so that traffic sent to
/// it still arrives) is published instead of the node's own address.
#[test]
fn kube_public_ip_overwrite_is_published_and_used_by_the_peers() {
    let lab = kube_lab(1);
    restart_node1_with_address_in_annotation(
        &lab,
        Ipv4Addr::new(172, 16, 1, 114),
        "public-ip-overwrite",
    );
}

/// `node-public-ip` on the Node replaces `--public-ip`.
#[test]
fn kube_node_public_ip_annotation_replaces_the_public_ip() {
    let lab = kube_lab(1);
    restart_node1_with_address_in_annotation(
        &lab,
        Ipv4Addr::new(172, 16, 1, 115),
        "node-public-ip",
    );
    let log = std::fs::read_to_string(lab.log_path("k8s-node1")).unwrap();
    assert!(
        log.contains("node-public-ip annotation as --public-ip"),
        "{log}"
    );
}

/// 5,100 Nodes (more than upstream's 5,000-event queue, #2252): flanneld
/// starts with one list and no request per Node, and programs every peer.
#[test]
fn kube_5100_nodes_are_one_list_at_start_and_every_peer_is_programmed() {
    let lab = kube_lab(1);
    assert!(lab
        .stop_daemon("k8s-node1", Duration::from_secs(10))
        .unwrap());
    const N: u32 = 5100;
    let nodes: Vec<k8s_openapi::api::core::v1::Node> = (0..N)
        .map(|i| {
            // /29s from 10.244.16.0, each with its own public address and VtepMAC.
            let base = u32::from(Ipv4Addr::new(10, 244, 16, 0)) + i * 8;
            let cidr = format!("{}/29", Ipv4Addr::from(base));
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 99, 0, 0)) + i + 1);
            let mut n = kube::node_object(&format!("peer-{i}"), &[cidr], &[ip.into()]);
            let mac = format!(
                "02:00:{:02x}:{:02x}:{:02x}:01",
                i >> 16,
                (i >> 8) & 0xff,
                i & 0xff
            );
            n.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .extend([
                    (format!("{PREFIX}kube-subnet-manager"), "true".to_string()),
                    (format!("{PREFIX}backend-type"), "vxlan".to_string()),
                    (format!("{PREFIX}public-ip"), ip.to_string()),
                    (
                        format!("{PREFIX}backend-data"),
                        format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
                    ),
                ]);
            n
        })
        .collect();
    lab.kube_create_nodes(nodes).unwrap();
    let node1 = lab.node("k8s-node1").unwrap().clone();
    let seen = requests_from(&lab, node1.underlay_ip).len();
    lab.start_daemon("k8s-node1").unwrap();
    lab.wait_daemon_ready("k8s-node1", Instant::now() + Duration::from_secs(60))
        .unwrap();
    // Every peer's route: the 5,100 and the master.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let routes = read_tables(&lab, "k8s-node1").unwrap().routes.len();
        if routes == N as usize + 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{routes} routes of {}", N + 1);
        std::thread::sleep(Duration::from_millis(500));
    }
    let reqs: Vec<_> = requests_from(&lab, node1.underlay_ip)
        .into_iter()
        .skip(seen)
        .collect();
    assert_eq!(count(&reqs, "list", "nodes"), 1, "{reqs:#?}");
    assert_eq!(count(&reqs, "get", "nodes"), 0, "{reqs:#?}");
    assert!(reqs.len() <= 4, "{reqs:#?}");
}

#[test]
fn lab_up_store_kube_without_a_kube_apiserver_fails_at_once_saying_where_it_looked() {
    require_root();
    let bin = bin_dir();
    let name = unique_name();
    let empty = std::env::temp_dir().join(format!("{name}-empty-path"));
    std::fs::create_dir_all(&empty).unwrap();
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flannelctl"))
        .args(["lab", "up", "--store", "kube", "--name", &name, "--bin-dir"])
        .arg(&bin)
        .env_remove(kube::KUBE_APISERVER_ENV)
        .env("PATH", &empty)
        .output()
        .unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let (namespaces, dir) = (lab::lab_namespaces(&name), lab::lab_dir(&name).exists());
    let _ = lab::down(&name);
    let _ = std::fs::remove_dir(&empty);
    assert!(!out.status.success(), "{err}");
    for word in [
        "KUBE_APISERVER",
        "PATH",
        "--kube-apiserver",
        "kube-apiserver",
    ] {
        assert!(err.contains(word), "{word} missing from: {err}");
    }
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(namespaces.is_empty(), "{namespaces:?}");
    assert!(!dir, "the labdir was created");
}

/// A process of the test's own, stopped (SIGTERM, then SIGKILL) when dropped.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// flanneld as kube-flannel.yml runs it: no kubeconfig, no NODE_NAME; the
/// in-cluster config (the service account's token and CA mounted at
/// /var/run/secrets/kubernetes.io/serviceaccount, KUBERNETES_SERVICE_HOST
/// and _PORT) and its Node found through its pod (POD_NAME, POD_NAMESPACE).
/// The secret is mounted in a mount namespace of flanneld's own (a tmpfs
/// over /var), so the machine's /var/run is never touched.
#[test]
fn kube_in_cluster_config_and_the_node_of_the_pod() {
    let lab = kube_lab(1);
    let macs = vtep_macs(&lab);
    let node1 = lab.node("k8s-node1").unwrap().clone();
    let master = lab.node("master").unwrap().clone();
    assert!(lab
        .stop_daemon("k8s-node1", Duration::from_secs(10))
        .unwrap());
    lab.kube_create_pod("kube-flannel", "kube-flannel-ds-t7x2q", "k8s-node1")
        .unwrap();
    let sa = lab.dir().join("sa-k8s-node1");
    std::fs::create_dir_all(&sa).unwrap();
    let (token, ca) = lab.kube_service_account_files().unwrap();
    std::fs::write(sa.join("token"), token).unwrap();
    std::fs::write(sa.join("ca.crt"), ca).unwrap();
    std::fs::write(sa.join("namespace"), "kube-flannel").unwrap();
    let script = r#"set -e
mount -t tmpfs -o mode=0755 tmpfs /var
mkdir -p /var/run/secrets/kubernetes.io/serviceaccount
cp "$SA/token" "$SA/ca.crt" "$SA/namespace" /var/run/secrets/kubernetes.io/serviceaccount/
exec "$FLANNELD" "$@""#;
    let mut cmd = std::process::Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ])
    .args(["--kube-subnet-mgr", "--ip-masq", "--net-config-path"])
    .arg(lab.net_conf_path())
    .arg("--subnet-file")
    .arg(lab.subnet_file("k8s-node1"))
    .args(["--healthz-ip", "127.0.0.1", "--healthz-port"])
    .arg(lab::HEALTHZ_PORT.to_string())
    .env("SA", &sa)
    .env("FLANNELD", lab.state.bin_dir.join(lab::FLANNELD_BINARY))
    .env("KUBERNETES_SERVICE_HOST", master.underlay_ip.to_string())
    .env("KUBERNETES_SERVICE_PORT", kube::KUBE_API_PORT.to_string())
    .env("POD_NAME", "kube-flannel-ds-t7x2q")
    .env("POD_NAMESPACE", "kube-flannel")
    .env("NO_COLOR", "1")
    .env_remove("NODE_NAME")
    .env_remove("RUST_LOG");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FLANNELD_") {
            cmd.env_remove(k);
        }
    }
    let log = std::fs::File::create(lab.log_path("k8s-node1")).unwrap();
    cmd.stdout(log.try_clone().unwrap()).stderr(log);
    let mut flanneld = Stopped(
        lab.netns("k8s-node1")
            .unwrap()
            .run(|| cmd.spawn())
            .unwrap()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while lab.daemon_ready("k8s-node1") != Ok(true) {
        let log = || std::fs::read_to_string(lab.log_path("k8s-node1")).unwrap_or_default();
        assert!(
            flanneld.0.try_wait().unwrap().is_none(),
            "flanneld exited:\n{}",
            log()
        );
        assert!(Instant::now() < deadline, "not ready:\n{}", log());
        std::thread::sleep(Duration::from_millis(200));
    }
    for n in ["master", "k8s-node1"] {
        wait_tables(&lab, n, &macs, Duration::from_secs(10));
    }
    let reqs = requests_from(&lab, node1.underlay_ip);
    assert!(
        reqs.iter().any(|(v, r, uri)| v == "get"
            && r == "pods"
            && uri == "/api/v1/namespaces/kube-flannel/pods/kube-flannel-ds-t7x2q"),
        "{reqs:#?}"
    );
}

/// A Node without flannel's `kube-subnet-manager` annotation is not a peer;
/// one whose annotations do not parse is skipped with a warning naming it,
/// and the others are untouched.
#[test]
fn kube_unmanaged_and_broken_nodes_are_skipped_and_harm_no_peer() {
    let lab = kube_lab(1);
    let macs = vtep_macs(&lab);
    // A Node whose flanneld never ran: podCIDR, no annotations of ours.
    lab.kube_create_nodes(vec![kube::node_object(
        "unmanaged",
        &["10.244.77.0/24".to_string()],
        &[Ipv4Addr::new(172, 16, 1, 77).into()],
    )])
    .unwrap();
    // The master's Node with a public-ip that is not an address (its own
    // flanneld stopped first: a running one puts its annotations right).
    assert!(lab.stop_daemon("master", Duration::from_secs(10)).unwrap());
    lab.kube_patch_node(
        "master",
        serde_json::json!({"metadata": {"annotations": {format!("{PREFIX}public-ip"): "172.16.1"}}}),
        true,
    )
    .unwrap();
    let log = lab.log_path("k8s-node1");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("skipping Node") && text.contains("node=master") {
            assert!(text.contains("public-ip"), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no warning about master:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // node1 keeps nothing of the broken master nor of the unmanaged Node.
    let only_self: Vec<(String, MacAddr)> = macs
        .iter()
        .filter(|(n, _)| n == "k8s-node1")
        .cloned()
        .collect();
    wait_tables(&lab, "k8s-node1", &only_self, Duration::from_secs(10));
    // The master's flanneld, started again, publishes its lease again (the
    // same VtepMAC): a peer again.
    lab.start_daemon("master").unwrap();
    lab.wait_daemon_ready("master", Instant::now() + Duration::from_secs(30))
        .unwrap();
    wait_tables(&lab, "k8s-node1", &macs, Duration::from_secs(10));
    assert_eq!(
        annotations(&lab, "master").get(&format!("{PREFIX}public-ip")),
        Some(&lab.node("master").unwrap().underlay_ip.to_string())
    );
}

/// Level-triggered publishing: an annotation of a running node edited by
/// someone else is put back (the lease as flanneld publishes it).
#[test]
fn kube_edited_own_annotation_is_published_again() {
    let lab = kube_lab(1);
    let macs = vtep_macs(&lab);
    let before = annotations(&lab, "k8s-node1");
    lab.kube_patch_node(
        "k8s-node1",
        serde_json::json!({"metadata": {"annotations": {
            format!("{PREFIX}backend-data"): r#"{"VNI":1,"VtepMAC":"02:00:00:00:00:99"}"#
        }}}),
        true,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while annotations(&lab, "k8s-node1") != before {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            annotations(&lab, "k8s-node1")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_tables(&lab, "master", &macs, Duration::from_secs(10));
}

/// host-gw and udp in Kubernetes mode: the matrix, and the annotations of
/// nodes-after-host-gw.json / nodes-after-udp.json (backend-data `null`;
/// udp's backend-type empty, as upstream's udp writes it).
#[test]
fn kube_host_gw_and_udp_labs_ping_and_publish_upstreams_annotations() {
    for (backend, ty) in [(lab::Backend::HostGw, "host-gw"), (lab::Backend::Udp, "")] {
        let lab = up_with(LabOptions {
            nodes: 2,
            store: StoreKind::Kube,
            kube_apiserver: kube_apiserver(),
            backend,
            ..LabOptions::default()
        });
        let m = lab.check().unwrap();
        m.ensure_all_ok()
            .unwrap_or_else(|e| panic!("{backend}: {e}\n{}", m.render()));
        for n in &lab.state.nodes {
            let want = BTreeMap::from([
                (format!("{PREFIX}backend-data"), "null".to_string()),
                (format!("{PREFIX}backend-type"), ty.to_string()),
                (format!("{PREFIX}kube-subnet-manager"), "true".to_string()),
                (format!("{PREFIX}public-ip"), n.underlay_ip.to_string()),
                (
                    kube::KUBELET_ANNOTATION.0.to_string(),
                    kube::KUBELET_ANNOTATION.1.to_string(),
                ),
            ]);
            assert_eq!(annotations(&lab, &n.name), want, "{backend} {}", n.name);
        }
    }
}

/// Dual stack: each Node has an IPv4 and an IPv6 podCIDR and address; both
/// families' annotations are published and every pair answers in both.
#[test]
fn kube_dual_stack_lab_pings_in_both_families() {
    let lab = up_with(LabOptions {
        nodes: 2,
        store: StoreKind::Kube,
        kube_apiserver: kube_apiserver(),
        family: lab::Family::Dual,
        ..LabOptions::default()
    });
    let m = lab.check().unwrap();
    m.ensure_all_ok()
        .unwrap_or_else(|e| panic!("{e}\n{}", m.render()));
    for n in &lab.state.nodes {
        let a = annotations(&lab, &n.name);
        assert_eq!(
            a.get(&format!("{PREFIX}public-ipv6")),
            Some(&n.underlay_ipv6.unwrap().to_string()),
            "{a:?}"
        );
        assert!(
            a[&format!("{PREFIX}backend-v6-data")].starts_with(r#"{"VNI":1,"VtepMAC":""#),
            "{a:?}"
        );
        let node = lab.kube_node(&n.name).unwrap().unwrap();
        assert_eq!(
            node.spec.unwrap().pod_cidrs.unwrap(),
            vec![n.subnet.to_string(), n.subnet_v6.unwrap().to_string()]
        );
    }
}

/// A podCIDR outside `Network` is upstream's error, and flanneld stops
/// with it (the net-conf must change: a Node's podCIDR never does).
#[test]
fn kube_pod_cidr_outside_the_network_stops_flanneld_with_upstreams_error() {
    let mut lab = kube_lab(1);
    let node = lab.begin_add_node_with(false).unwrap();
    lab.kube_patch_node(
        &node,
        serde_json::json!({"spec": {"podCIDR": "10.99.2.0/24", "podCIDRs": ["10.99.2.0/24"]}}),
        false,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while lab.daemon_alive(&node) {
        assert!(Instant::now() < deadline, "flanneld kept running");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(lab.log_path(&node)).unwrap();
    assert!(
        log.contains(r#"subnet "10.244.0.0/16" specified in the flannel net config doesn't contain "10.99.2.0/24" PodCIDR of the "k8s-node2" node"#),
        "{log}"
    );
    assert!(!lab.subnet_file(&node).exists());
}

/// `flannelctl leases --kube-subnet-mgr` reads the Nodes as flanneld does,
/// with flanneld's own RBAC (list nodes).
#[test]
fn flannelctl_leases_reads_the_nodes_in_kubernetes_mode() {
    let lab = kube_lab(2);
    let kubeconfig = lab.kube_dir().flannel_kubeconfig();
    let net_conf = lab.net_conf_path();
    let out = lab
        .netns("master")
        .unwrap()
        .run(|| {
            std::process::Command::new(env!("CARGO_BIN_EXE_flannelctl"))
                .args(["leases", "--kube-subnet-mgr", "--json", "--kubeconfig-file"])
                .arg(&kubeconfig)
                .arg("--net-config-path")
                .arg(&net_conf)
                .output()
                .unwrap()
        })
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let macs = vtep_macs(&lab);
    assert_eq!(rows.len(), 3, "{rows:#?}");
    for n in &lab.state.nodes {
        let mac = macs.iter().find(|(m, _)| *m == n.name).unwrap().1;
        assert!(
            rows.iter().any(|r| r["subnet"] == n.subnet.to_string()
                && r["public_ip"] == n.underlay_ip.to_string()
                && r["backend_type"] == "vxlan"
                && r["vtep_mac"] == mac.to_string()),
            "{} missing: {rows:#?}",
            n.name
        );
    }
}
