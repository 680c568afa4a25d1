//! End-to-end tests of every backend in the lab: vxlan (with and without
//! DirectRouting), host-gw and udp; IPv4, IPv6 and dual stack; the flat and
//! the two-segment topology; masquerading (`--ip-masq`) to an outside host;
//! switching the backend of a running lab.
//!
//! Each test builds one lab (namespaces `t<pid>n<counter>-...`, removed by a
//! guard even when the test panics) and checks it from the pods' side (the
//! ping matrix, the masquerade probes) and the kernel's (routes, devices).
//! Needs root, and `cargo build --workspace --bins` first.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::*;
use flannel_core::datapath::Route;
use flannelctl::lab::{self, Backend, Family, Lab, LabOptions, Outcome, Topology};
use ipnet::IpNet;

fn opts(backend: Backend, workers: u32) -> LabOptions {
    LabOptions {
        nodes: workers,
        backend,
        ..LabOptions::default()
    }
}

fn ifindex(lab: &Lab, node: &str, dev: &str) -> Option<u32> {
    in_node(lab, node, |nl| {
        nl.link_by_name(dev).unwrap().map(|l| l.index)
    })
}

fn mtu(lab: &Lab, target: &str, dev: &str) -> u32 {
    in_node(lab, target, |nl| {
        nl.link_by_name(dev)
            .unwrap()
            .unwrap_or_else(|| panic!("{target} has no {dev}"))
            .mtu
    })
}

/// The routes of a node into the cluster networks (both families) other
/// than its own subnet's (cni0's kernel route).
fn cluster_routes(lab: &Lab, node: &str) -> BTreeSet<Route> {
    let n = lab.node(node).unwrap().clone();
    let v4: IpNet = lab::CLUSTER_NETWORK.parse().unwrap();
    let v6: IpNet = lab::CLUSTER_NETWORK_V6.parse().unwrap();
    in_node(lab, node, |nl| {
        nl.list_routes()
            .unwrap()
            .into_iter()
            .filter(|r| {
                (v4.contains(&r.dst) || v6.contains(&r.dst))
                    && r.dst != IpNet::V4(n.subnet)
                    && n.subnet_v6.map(IpNet::V6) != Some(r.dst)
            })
            .collect()
    })
}

/// host-gw's route to a peer: `<subnet> via <PublicIP> dev ens3`.
fn direct_route(lab: &Lab, node: &str, peer: &str, v6: bool) -> Route {
    let p = lab.node(peer).unwrap();
    let (dst, gw) = if v6 {
        (
            IpNet::V6(p.subnet_v6.unwrap()),
            IpAddr::V6(p.underlay_ipv6.unwrap()),
        )
    } else {
        (IpNet::V4(p.subnet), IpAddr::V4(p.underlay_ip))
    };
    Route {
        dst,
        gateway: Some(gw),
        oif: ifindex(lab, node, "ens3").unwrap(),
        onlink: false,
    }
}

/// vxlan's route to a peer: `<subnet> via <subnet address> dev flannel.1 onlink`.
fn vxlan_route(lab: &Lab, node: &str, peer: &str) -> Route {
    let p = lab.node(peer).unwrap();
    Route {
        dst: IpNet::V4(p.subnet),
        gateway: Some(IpAddr::V4(p.subnet.network())),
        oif: ifindex(lab, node, "flannel.1").expect("flannel.1"),
        onlink: true,
    }
}

fn peers_of<'a>(lab: &'a Lab, node: &'a str) -> impl Iterator<Item = String> + 'a {
    lab.state
        .nodes
        .iter()
        .filter(move |n| n.name != node)
        .map(|n| n.name.clone())
}

/// Polls until `f` holds, or panics with the last difference it reported.
fn wait_until(within: Duration, mut f: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => panic!("after {within:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn assert_matrix_ok(lab: &Lab) -> lab::Matrix {
    let m = lab.check().unwrap();
    println!("{}", m.render());
    assert!(m.all_ok(), "matrix has failures:\n{}", m.render());
    m
}

fn assert_pod_pairs_ttl_62(lab: &Lab, m: &lab::Matrix, suffix: &str) {
    for a in &lab.state.pods {
        for b in &lab.state.pods {
            if a.node != b.node {
                let to = format!("{}{suffix}", b.name);
                assert!(
                    matches!(m.get(&a.name, &to), Some(Outcome::Ok { ttl: 62, .. })),
                    "{} -> {to}: {:?}",
                    a.name,
                    m.get(&a.name, &to)
                );
            }
        }
    }
}

/// Every namespace of the lab is gone after `down`.
/// `lab explain ubuntu-1 ubuntu-2`, read off the kernels: delivered through
/// both nodes, with every line of `want` on the way.
fn assert_explained(lab: &Lab, want: &[String]) {
    let dst = lab.explain_target("ubuntu-2").unwrap();
    let w = lab.explain("ubuntu-1", dst).unwrap();
    let text = w.render("ubuntu-2");
    println!("{text}");
    assert!(w.delivered(), "{text}");
    assert_eq!(
        w.places(),
        ["ubuntu-1", "k8s-node1", "k8s-node2", "ubuntu-2"],
        "{text}"
    );
    for l in want {
        assert!(
            w.lines().any(|x| x.contains(l.as_str())),
            "no {l:?} in\n{text}"
        );
    }
}

fn down_leaves_nothing(lab: &Lab) {
    lab::down(lab.name()).unwrap();
    assert_eq!(lab::lab_namespaces(lab.name()), Vec::<String>::new());
    assert!(!lab.dir().exists());
}

#[test]
fn host_gw_pings_across_nodes_and_switching_backends_leaves_nothing_behind() {
    let mut lab = up_with(opts(Backend::HostGw, 2));
    let m = assert_matrix_ok(&lab);
    assert_pod_pairs_ttl_62(&lab, &m, "");
    // No device and no overhead: pods get the underlay MTU.
    assert_eq!(mtu(&lab, "ubuntu-1", "eth0"), 1500);
    let node2 = lab.node("k8s-node2").unwrap().underlay_ip;
    assert_explained(
        &lab,
        &[
            format!("out on ens3 to {node2} (k8s-node2 ens3)"),
            "bridge cni0: port veth".into(),
        ],
    );
    let hostgw_routes = |lab: &Lab, node: &str| -> BTreeSet<Route> {
        peers_of(lab, node)
            .map(|p| direct_route(lab, node, &p, false))
            .collect()
    };
    for n in &lab.state.nodes {
        assert_eq!(ifindex(&lab, &n.name, "flannel.1"), None, "{}", n.name);
        assert_eq!(cluster_routes(&lab, &n.name), hostgw_routes(&lab, &n.name));
    }
    for l in lab.leases().unwrap() {
        assert_eq!(l.attrs.backend_type, "host-gw");
        assert_eq!(l.attrs.backend_data, None);
    }

    // host-gw -> vxlan: exactly the vxlan triples, no host-gw route left.
    lab.switch_backend(Backend::Vxlan, false, Duration::from_secs(30))
        .unwrap();
    let macs = vtep_macs(&lab);
    for n in &lab.state.nodes {
        wait_tables(&lab, &n.name, &macs, Duration::from_secs(10));
        wait_until(Duration::from_secs(10), || {
            let want: BTreeSet<Route> = peers_of(&lab, &n.name)
                .map(|p| vxlan_route(&lab, &n.name, &p))
                .collect();
            let got = cluster_routes(&lab, &n.name);
            (got == want)
                .then_some(())
                .ok_or(format!("{}: routes {got:?}, want {want:?}", n.name))
        });
    }
    let m = assert_matrix_ok(&lab);
    let node2_subnet = lab.node("k8s-node2").unwrap().subnet.network();
    assert_explained(
        &lab,
        &[
            format!(
                "route: {} via {node2_subnet} dev flannel.1",
                lab.explain_target("ubuntu-2").unwrap()
            ),
            format!("dst {node2} dev flannel.1: encapsulated in UDP to {node2}:8472, VNI 1"),
            "in on ens3: UDP 8472, decapsulated by flannel.1".into(),
        ],
    );
    assert_pod_pairs_ttl_62(&lab, &m, "");

    // vxlan -> host-gw: flannel.1 and its triples are gone.
    lab.switch_backend(Backend::HostGw, false, Duration::from_secs(30))
        .unwrap();
    for n in &lab.state.nodes {
        wait_until(Duration::from_secs(10), || {
            let dev = ifindex(&lab, &n.name, "flannel.1");
            let got = cluster_routes(&lab, &n.name);
            let want = hostgw_routes(&lab, &n.name);
            (dev.is_none() && got == want).then_some(()).ok_or(format!(
                "{}: flannel.1 {dev:?}, routes {got:?}, want {want:?}",
                n.name
            ))
        });
    }
    assert_matrix_ok(&lab);
    let status = lab.status();
    assert!(
        status.render().contains("backend: host-gw"),
        "{}",
        status.render()
    );
    down_leaves_nothing(&lab);
}

#[test]
fn two_segments_host_gw_refuses_cross_segment_peers_and_the_check_says_why() {
    let lab = up_with(LabOptions {
        topology: Topology::TwoSegment,
        ..opts(Backend::HostGw, 3)
    });
    // master, node1 and node3 on 172.16.1.0/24; node2 alone on 172.16.2.0/24.
    assert_eq!(
        lab.node("k8s-node2").unwrap().underlay_ip,
        Ipv4Addr::new(172, 16, 2, 13)
    );
    assert_eq!(lab.node("k8s-node3").unwrap().segment, 1);
    let m = lab.check().unwrap();
    println!("{}", m.render());
    assert!(m.all_ok(), "{}", m.render());
    // Within segment 1: pods answer with the seed's TTL.
    assert!(matches!(
        m.get("ubuntu-1", "ubuntu-3"),
        Some(Outcome::Ok { ttl: 62, .. })
    ));
    // `lab explain` shows where a packet across the router ends: k8s-node1
    // holds no route for the refused subnet, so it leaves by the default
    // route and is dropped before any pod.
    let w = lab
        .explain("ubuntu-1", lab.explain_target("ubuntu-2").unwrap())
        .unwrap();
    let text = w.render("ubuntu-2");
    println!("{text}");
    assert!(!w.delivered(), "{text}");
    assert_eq!(w.places()[..2], ["ubuntu-1", "k8s-node1"], "{text}");
    assert!(!w.places().contains(&"ubuntu-2"), "{text}");
    // Across: expected failures, each naming the refused subnet and found
    // in the refusing daemon's log.
    let refused = m.expected_failures();
    for (from, to) in [
        ("ubuntu-1", "ubuntu-2"),
        ("ubuntu-2", "ubuntu-1"),
        ("ubuntu-2", "ubuntu-3"),
        ("ubuntu-3", "ubuntu-2"),
        ("ubuntu-1", "k8s-node2/cni0"),
        ("ubuntu-2", "k8s-node1/cni0"),
    ] {
        let (_, _, reason) = refused
            .iter()
            .find(|(f, t, _)| *f == from && *t == to)
            .unwrap_or_else(|| {
                panic!("{from} -> {to} is not an expected failure:\n{}", m.render())
            });
        assert!(
            reason.contains("it says so in its log"),
            "{from} -> {to}: {reason}"
        );
    }
    assert!(m
        .render()
        .contains("refused (expected) ubuntu-1 -> ubuntu-2: host-gw across segments"));
    // 3 pods; each of ubuntu-1/3 has 2 cross-segment targets (ubuntu-2 and
    // node2's cni0), ubuntu-2 has 4 (2 pods, 2 cni0). The nodes' underlay
    // addresses answer: the lab's flanneld masquerades (--ip-masq) what a
    // pod sends out of the cluster network, so the reply returns to the
    // node's own address through the router (ttl 62).
    assert_eq!(refused.len(), 2 + 2 + 4, "{}", m.render());
    assert!(matches!(
        m.get("ubuntu-2", "master/ens3"),
        Some(Outcome::Ok { ttl: 62, .. })
    ));

    // The kernel: node1 routes to master and node3 only; node2 to nobody.
    let want: BTreeSet<Route> = ["master", "k8s-node3"]
        .into_iter()
        .map(|p| direct_route(&lab, "k8s-node1", p, false))
        .collect();
    assert_eq!(cluster_routes(&lab, "k8s-node1"), want);
    assert_eq!(cluster_routes(&lab, "k8s-node2"), BTreeSet::new());
    // flanneld on node2 names the peers it refuses.
    let log = std::fs::read_to_string(lab.log_path("k8s-node2")).unwrap();
    for subnet in ["10.244.0.0/24", "10.244.1.0/24", "10.244.3.0/24"] {
        assert!(
            log.lines()
                .any(|l| l.contains("host-gw") && l.contains(subnet)),
            "k8s-node2's log does not name {subnet}:\n{log}"
        );
    }
    // Every daemon is alive: a refusal is not a crash.
    assert!(lab.status().healthy(), "{}", lab.status().render());
}

#[test]
fn two_segments_vxlan_direct_routing_routes_within_a_segment_and_encapsulates_across() {
    let lab = up_with(LabOptions {
        topology: Topology::TwoSegment,
        direct_routing: true,
        ..opts(Backend::Vxlan, 3)
    });
    let m = assert_matrix_ok(&lab);
    assert_pod_pairs_ttl_62(&lab, &m, "");
    assert_eq!(m.expected_failures().len(), 0);
    // node1: master and node3 directly via ens3, node2 over flannel.1.
    let want: BTreeSet<Route> = [
        direct_route(&lab, "k8s-node1", "master", false),
        direct_route(&lab, "k8s-node1", "k8s-node3", false),
        vxlan_route(&lab, "k8s-node1", "k8s-node2"),
    ]
    .into_iter()
    .collect();
    assert_eq!(cluster_routes(&lab, "k8s-node1"), want);
    // node2 is alone on its segment: everything over flannel.1.
    let want: BTreeSet<Route> = peers_of(&lab, "k8s-node2")
        .map(|p| vxlan_route(&lab, "k8s-node2", &p))
        .collect();
    assert_eq!(cluster_routes(&lab, "k8s-node2"), want);
    // Only encapsulated peers get a neighbour and an FDB entry.
    let t = read_tables(&lab, "k8s-node1").unwrap();
    let node2 = lab.node("k8s-node2").unwrap();
    assert_eq!(t.neighbours.len(), 1, "{:?}", t.neighbours);
    assert_eq!(
        t.fdb.iter().map(|f| f.dst).collect::<Vec<_>>(),
        [IpAddr::V4(node2.underlay_ip)]
    );
    let status = lab.status().render();
    assert!(
        status.contains("vxlan (DirectRouting)") && status.contains("two-segment"),
        "{status}"
    );
    // The router and both switches exist, and go with `down`.
    let ns = lab::lab_namespaces(lab.name());
    for part in ["router", "underlay", "underlay2"] {
        assert!(
            ns.contains(&format!("{}-{part}", lab.name())),
            "{part} missing: {ns:?}"
        );
    }
    down_leaves_nothing(&lab);
}

#[test]
fn ip_masq_masquerades_pods_to_the_outside_but_not_between_pods() {
    let lab = up_with(LabOptions {
        ip_masq: true,
        ..opts(Backend::Vxlan, 2)
    });
    assert_matrix_ok(&lab);
    let r = lab.check_masq().unwrap();
    println!("{}", r.render());
    // Pod to pod keeps the pod's address in any case.
    let o = r.get("ubuntu-1", "ubuntu-2", false).unwrap();
    assert_eq!(o.seen_source, Some(IpAddr::V4(pod_ip(&lab, "ubuntu-1"))));
    assert!(o.is_ok(), "{o:?}");
    // To the outside host: the node's underlay address, and the answer returns.
    for (pod, node) in [("ubuntu-1", "k8s-node1"), ("ubuntu-2", "k8s-node2")] {
        let o = r.get(pod, "outside", false).unwrap();
        assert_eq!(
            o.seen_source,
            Some(IpAddr::V4(lab.node(node).unwrap().underlay_ip)),
            "{pod}'s packet to the outside host was not masqueraded:\n{}",
            r.render()
        );
        assert!(o.answered, "{pod}: the answer did not come back");
    }
    assert!(r.all_ok(), "{}", r.render());
    let env = std::fs::read_to_string(lab.subnet_file("k8s-node1")).unwrap();
    assert!(env.contains("FLANNEL_IPMASQ=true"), "{env}");
    assert!(lab::lab_namespaces(lab.name()).contains(&format!("{}-outside", lab.name())));
    down_leaves_nothing(&lab);
}

#[test]
fn udp_pings_across_nodes_through_flannel0_and_switches_back_to_vxlan() {
    let mut lab = up_with(opts(Backend::Udp, 2));
    let m = assert_matrix_ok(&lab);
    assert_pod_pairs_ttl_62(&lab, &m, "");
    // 28 bytes of encapsulation.
    assert_eq!(mtu(&lab, "ubuntu-1", "eth0"), 1472);
    // Every lease as upstream's udp backend writes it (no BackendType),
    // shown as udp by `flannelctl leases`.
    for l in lab.leases().unwrap() {
        assert_eq!(
            l.attrs.to_json(),
            format!(
                r#"{{"PublicIP":"{}","PublicIPv6":null}}"#,
                l.attrs.public_ip.unwrap()
            )
        );
        assert_eq!(
            flannelctl::leases::LeaseRow::from_lease(&l).backend_type,
            "udp"
        );
    }
    let node2 = lab.node("k8s-node2").unwrap().underlay_ip;
    assert_explained(
        &lab,
        &[
            "dev flannel0".into(),
            format!("flanneld sends the packet as the payload of UDP to {node2}:8285"),
            "in on ens3: UDP 8285, flanneld writes the packet to flannel0".into(),
        ],
    );
    for n in &lab.state.nodes {
        let tun =
            ifindex(&lab, &n.name, "flannel0").unwrap_or_else(|| panic!("{}: no flannel0", n.name));
        // One route for the whole cluster network into the TUN device.
        let routes = cluster_routes(&lab, &n.name);
        assert!(
            routes
                .iter()
                .any(|r| r.dst == lab::CLUSTER_NETWORK.parse::<IpNet>().unwrap() && r.oif == tun),
            "{}: no 10.244.0.0/16 dev flannel0 in {routes:?}",
            n.name
        );
    }
    lab.switch_backend(Backend::Vxlan, false, Duration::from_secs(30))
        .unwrap();
    let macs = vtep_macs(&lab);
    for n in &lab.state.nodes {
        wait_tables(&lab, &n.name, &macs, Duration::from_secs(10));
        wait_until(Duration::from_secs(10), || {
            match ifindex(&lab, &n.name, "flannel0") {
                None => Ok(()),
                Some(_) => Err(format!("{}: flannel0 left behind", n.name)),
            }
        });
    }
    assert_matrix_ok(&lab);
}

#[test]
fn ipv6_only_vxlan_pings_across_nodes_with_hop_limit_62() {
    let lab = up_with(LabOptions {
        family: Family::V6,
        ..opts(Backend::Vxlan, 2)
    });
    let m = assert_matrix_ok(&lab);
    assert!(m.targets.iter().all(|t| t.ip.is_ipv6()));
    assert_pod_pairs_ttl_62(&lab, &m, "@v6");
    for p in &lab.state.pods {
        assert!(p.ip.is_none() && p.ipv6.is_some(), "{p:?}");
    }
    // vxlan over an IPv6 underlay costs 70 bytes.
    assert_eq!(mtu(&lab, "ubuntu-1", "eth0"), 1430);
    for l in lab.leases().unwrap() {
        assert!(l.key.ipv4.is_none() && l.key.ipv6.is_some(), "{l:?}");
        assert!(l.attrs.public_ipv6.is_some(), "{l:?}");
    }
}

#[test]
fn dual_stack_pings_in_both_families_with_vxlan_then_host_gw() {
    let mut lab = up_with(LabOptions {
        family: Family::Dual,
        ..opts(Backend::Vxlan, 2)
    });
    let m = assert_matrix_ok(&lab);
    assert_pod_pairs_ttl_62(&lab, &m, "");
    assert_pod_pairs_ttl_62(&lab, &m, "@v6");
    // IPv6 through flannel-v6.1, over the IPv6 underlay.
    let pod2_v6 = lab.pod("ubuntu-2").unwrap().ipv6.unwrap().addr();
    let node2_v6 = lab.node("k8s-node2").unwrap().underlay_ipv6.unwrap();
    let w = lab.explain("ubuntu-1", IpAddr::V6(pod2_v6)).unwrap();
    let text = w.render("ubuntu-2");
    assert!(w.delivered(), "{text}");
    for want in [
        "dev flannel-v6.1".to_string(),
        format!("encapsulated in UDP to [{node2_v6}]:8472, VNI 1"),
        "decapsulated by flannel-v6.1".to_string(),
    ] {
        assert!(text.contains(&want), "no {want:?} in\n{text}");
    }
    lab.switch_backend(Backend::HostGw, false, Duration::from_secs(30))
        .unwrap();
    for n in &lab.state.nodes {
        wait_until(Duration::from_secs(10), || {
            let want: BTreeSet<Route> = peers_of(&lab, &n.name)
                .flat_map(|p| {
                    [
                        direct_route(&lab, &n.name, &p, false),
                        direct_route(&lab, &n.name, &p, true),
                    ]
                })
                .collect();
            let got = cluster_routes(&lab, &n.name);
            // Both vxlan devices are gone with the switch.
            let devs: Vec<&str> = ["flannel.1", "flannel-v6.1"]
                .into_iter()
                .filter(|d| ifindex(&lab, &n.name, d).is_some())
                .collect();
            (got == want && devs.is_empty())
                .then_some(())
                .ok_or(format!(
                    "{}: routes {got:?}, want {want:?}; left behind: {devs:?}",
                    n.name
                ))
        });
    }
    let m = assert_matrix_ok(&lab);
    assert_pod_pairs_ttl_62(&lab, &m, "@v6");
}

#[test]
fn dual_stack_two_segments_ip_masq_masquerades_both_families_to_the_outside() {
    let lab = up_with(LabOptions {
        family: Family::Dual,
        topology: Topology::TwoSegment,
        ip_masq: true,
        ..opts(Backend::Vxlan, 2)
    });
    // Masqueraded pod -> other-segment node traffic returns through the
    // router: the check expects ttl 62 there, 63 within a segment.
    let m = assert_matrix_ok(&lab);
    assert!(matches!(
        m.get("ubuntu-1", "k8s-node2/ens3"),
        Some(Outcome::Ok { ttl: 62, .. })
    ));
    assert!(matches!(
        m.get("ubuntu-1", "master/ens3"),
        Some(Outcome::Ok { ttl: 63, .. })
    ));
    let r = lab.check_masq().unwrap();
    println!("{}", r.render());
    for v6 in [false, true] {
        for (pod, node) in [("ubuntu-1", "k8s-node1"), ("ubuntu-2", "k8s-node2")] {
            let n = lab.node(node).unwrap();
            let want = if v6 {
                IpAddr::V6(n.underlay_ipv6.unwrap())
            } else {
                IpAddr::V4(n.underlay_ip)
            };
            let o = r.get(pod, "outside", v6).unwrap();
            assert_eq!(o.seen_source, Some(want), "{}", r.render());
        }
        let o = r.get("ubuntu-2", "ubuntu-1", v6).unwrap();
        assert!(o.is_ok(), "{}", r.render());
    }
    assert!(r.all_ok(), "{}", r.render());
    down_leaves_nothing(&lab);
}

/// `tcpdump -i ens3` in a node's namespace, to a file (its messages to a
/// file too: a closed pipe would kill it); `--immediate-mode` so that
/// nothing waits in the kernel's buffer when it is stopped.
struct Capture {
    child: std::process::Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(lab: &Lab, node: &str, file: std::path::PathBuf) -> Capture {
        let log = file.with_extension("log");
        let ns = lab.state.netns_of(node).unwrap();
        let child = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "tcpdump",
                "-i",
                "ens3",
                "--immediate-mode",
                "-U",
                "-n",
                "-w",
            ])
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("tcpdump is installed");
        wait_until(Duration::from_secs(10), || {
            let l = std::fs::read_to_string(&log).unwrap_or_default();
            l.contains("listening on").then_some(()).ok_or(l)
        });
        Capture { child, file }
    }

    /// Stops tcpdump (SIGTERM by PID); the capture's bytes.
    fn finish(mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(300));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        std::fs::read(&self.file).unwrap()
    }
}

/// `tcpdump -n -r FILE FILTER`: one line per matching packet.
fn pcap_lines(file: &std::path::Path, filter: &str) -> Vec<String> {
    let out = std::process::Command::new("tcpdump")
        .args(["-n", "-r"])
        .arg(file)
        .arg(filter)
        .stderr(std::process::Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `payload` in UDP from pod `from` to pod `to` (port 7777); whether it arrived.
fn pod_udp(lab: &Lab, from: &str, to: &str, to_ip: IpAddr, payload: &[u8]) -> bool {
    let src = lab.netns(from).unwrap();
    let dst = lab.netns(to).unwrap();
    dst.run(|| {
        let rx = std::net::UdpSocket::bind(std::net::SocketAddr::new(to_ip, 7777)).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = [0u8; 2048];
        for _ in 0..5 {
            src.run(|| {
                let any: IpAddr = if to_ip.is_ipv4() {
                    Ipv4Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                };
                let s = std::net::UdpSocket::bind(std::net::SocketAddr::new(any, 0)).unwrap();
                s.send_to(payload, std::net::SocketAddr::new(to_ip, 7777))
                    .unwrap();
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

/// The public key `wg pubkey` derives from a lab node's key file.
fn wg_pubkey(lab: &Lab, node: &str) -> String {
    use std::io::Write;
    let key = std::fs::read(lab.node_dir(node).join("wgkey")).unwrap();
    let mut c = std::process::Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("wg (wireguard-tools) is installed");
    c.stdin.take().unwrap().write_all(&key).unwrap();
    String::from_utf8(c.wait_with_output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string()
}

/// The public key in node's lease (`BackendData`, else `BackendV6Data`).
fn published_key(lab: &Lab, node: &str) -> String {
    let n = lab.node(node).unwrap().clone();
    let l = lab
        .leases()
        .unwrap()
        .into_iter()
        .find(|l| {
            l.attrs.public_ip == Some(n.underlay_ip)
                || (l.attrs.public_ipv6.is_some() && l.attrs.public_ipv6 == n.underlay_ipv6)
        })
        .unwrap_or_else(|| panic!("no lease of {node}"));
    let f = if l.attrs.backend_data.is_some() {
        flannel_core::lease::IpFamily::V4
    } else {
        flannel_core::lease::IpFamily::V6
    };
    flannel_core::wireguard::lease_data(&l.attrs, f)
        .unwrap_or_else(|| panic!("no wireguard data in {l:?}"))
        .0
        .to_string()
}

/// Waits until the whole matrix passes (peers may take a pass to update).
fn wait_matrix_ok(lab: &Lab) {
    wait_until(Duration::from_secs(20), || {
        let m = lab.check().unwrap();
        m.all_ok().then_some(()).ok_or_else(|| m.render())
    });
}

#[test]
fn wireguard_encrypts_pod_traffic_keeps_its_key_on_restart_and_re_peers_a_new_key() {
    let lab = up_with(opts(Backend::Wireguard, 2));
    let m = assert_matrix_ok(&lab);
    assert_pod_pairs_ttl_62(&lab, &m, "");
    // 80 bytes for WireGuard, as upstream.
    assert_eq!(mtu(&lab, "ubuntu-1", "eth0"), 1420);
    assert_eq!(mtu(&lab, "k8s-node1", "flannel-wg"), 1420);
    for n in &lab.state.nodes {
        assert_eq!(
            published_key(&lab, &n.name),
            wg_pubkey(&lab, &n.name),
            "{}",
            n.name
        );
        assert!(ifindex(&lab, &n.name, "flannel-wg").is_some());
    }
    for l in lab.leases().unwrap() {
        assert_eq!(
            flannelctl::leases::LeaseRow::from_lease(&l).backend_type,
            "wireguard"
        );
    }
    // The underlay between the nodes carries WireGuard only: UDP 51820,
    // and no byte of a pod's payload in clear.
    let cap = Capture::start(&lab, "k8s-node1", lab.dir().join("wg.pcap"));
    let marker = format!("WG-LAB-MARKER-{}", std::process::id());
    let pod2 = IpAddr::V4(lab.pod("ubuntu-2").unwrap().ip.unwrap().addr());
    let pod1 = IpAddr::V4(lab.pod("ubuntu-1").unwrap().ip.unwrap().addr());
    assert!(pod_udp(
        &lab,
        "ubuntu-1",
        "ubuntu-2",
        pod2,
        marker.as_bytes()
    ));
    assert!(pod_udp(
        &lab,
        "ubuntu-2",
        "ubuntu-1",
        pod1,
        marker.as_bytes()
    ));
    // Pod-to-pod pings too (the matrix would add the nodes' own pings).
    let ping = lab
        .netns("ubuntu-1")
        .unwrap()
        .run(|| {
            std::process::Command::new("ping")
                .args(["-c", "5", "-i", "0.2", "-W", "1"])
                .arg(pod2.to_string())
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap()
        })
        .unwrap();
    assert!(ping.success());
    let pcap = cap.finish();
    let (a, b) = (
        lab.node("k8s-node1").unwrap().underlay_ip,
        lab.node("k8s-node2").unwrap().underlay_ip,
    );
    let between = format!("ip and host {a} and host {b}");
    let file = lab.dir().join("wg.pcap");
    let wg = pcap_lines(&file, &format!("{between} and udp port 51820"));
    // The nodes' own pings of each other's underlay address (the matrix's,
    // still in flight) are no pod traffic.
    let other = pcap_lines(
        &file,
        &format!("{between} and not (udp port 51820) and not icmp"),
    );
    let pods = pcap_lines(&file, &format!("net {}", lab::CLUSTER_NETWORK));
    assert!(
        wg.len() >= 10,
        "WireGuard packets between the nodes: {wg:?}"
    );
    assert!(
        other.is_empty(),
        "non-WireGuard traffic between the nodes: {other:?}"
    );
    assert!(pods.is_empty(), "pod addresses on the underlay: {pods:?}");
    assert!(
        !pcap.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "a pod's payload crossed the underlay in clear"
    );

    // Restart: the key file is kept, so is the lease; traffic flows.
    let key1 = published_key(&lab, "k8s-node1");
    let file1 = std::fs::read_to_string(lab.node_dir("k8s-node1").join("wgkey")).unwrap();
    assert!(lab
        .stop_daemon("k8s-node1", Duration::from_secs(15))
        .unwrap());
    lab.start_daemon("k8s-node1").unwrap();
    lab.wait_daemon_ready("k8s-node1", Instant::now() + Duration::from_secs(30))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(lab.node_dir("k8s-node1").join("wgkey")).unwrap(),
        file1
    );
    assert_eq!(published_key(&lab, "k8s-node1"), key1);
    wait_matrix_ok(&lab);

    // A node with a new key (its key file gone) is re-peered by the others.
    let key2 = published_key(&lab, "k8s-node2");
    assert!(lab
        .stop_daemon("k8s-node2", Duration::from_secs(15))
        .unwrap());
    std::fs::remove_file(lab.node_dir("k8s-node2").join("wgkey")).unwrap();
    lab.start_daemon("k8s-node2").unwrap();
    lab.wait_daemon_ready("k8s-node2", Instant::now() + Duration::from_secs(30))
        .unwrap();
    wait_until(Duration::from_secs(10), || {
        let k = published_key(&lab, "k8s-node2");
        (k != key2).then_some(()).ok_or(k)
    });
    assert_eq!(
        published_key(&lab, "k8s-node2"),
        wg_pubkey(&lab, "k8s-node2")
    );
    wait_matrix_ok(&lab);
    let m = assert_matrix_ok(&lab);
    assert_pod_pairs_ttl_62(&lab, &m, "");

    // Switching to vxlan leaves nothing of wireguard.
    let mut lab = lab;
    lab.switch_backend(Backend::Vxlan, false, Duration::from_secs(30))
        .unwrap();
    for n in &lab.state.nodes {
        wait_until(Duration::from_secs(10), || {
            match ifindex(&lab, &n.name, "flannel-wg") {
                None => Ok(()),
                Some(_) => Err(format!("{}: flannel-wg left behind", n.name)),
            }
        });
    }
    assert_matrix_ok(&lab);
}

#[test]
fn wireguard_ipv6_only_and_dual_stack_ping_over_their_devices() {
    for family in [Family::V6, Family::Dual] {
        let lab = up_with(LabOptions {
            family,
            ..opts(Backend::Wireguard, 2)
        });
        let m = assert_matrix_ok(&lab);
        assert_pod_pairs_ttl_62(&lab, &m, "@v6");
        if family == Family::Dual {
            assert_pod_pairs_ttl_62(&lab, &m, "");
        }
        for n in &lab.state.nodes {
            assert!(
                ifindex(&lab, &n.name, "flannel-wg-v6").is_some(),
                "{}",
                n.name
            );
            assert_eq!(
                ifindex(&lab, &n.name, "flannel-wg").is_some(),
                family == Family::Dual,
                "{}",
                n.name
            );
            assert_eq!(published_key(&lab, &n.name), wg_pubkey(&lab, &n.name));
        }
        // IPv6 pod traffic over IPv6 endpoints on ListenPortV6.
        let cap = Capture::start(&lab, "k8s-node1", lab.dir().join("wg6.pcap"));
        let pod2 = IpAddr::V6(lab.pod("ubuntu-2").unwrap().ipv6.unwrap().addr());
        let marker = format!("WG6-LAB-MARKER-{}", std::process::id());
        assert!(pod_udp(
            &lab,
            "ubuntu-1",
            "ubuntu-2",
            pod2,
            marker.as_bytes()
        ));
        let pcap = cap.finish();
        let (a, b) = (
            lab.node("k8s-node1").unwrap().underlay_ipv6.unwrap(),
            lab.node("k8s-node2").unwrap().underlay_ipv6.unwrap(),
        );
        let wg = pcap_lines(
            &lab.dir().join("wg6.pcap"),
            &format!("ip6 host {a} and host {b} and udp port 51821"),
        );
        assert!(!wg.is_empty(), "no WireGuard over IPv6 between the nodes");
        let pods = pcap_lines(
            &lab.dir().join("wg6.pcap"),
            &format!("ip6 net {}", lab::CLUSTER_NETWORK_V6),
        );
        assert!(pods.is_empty(), "pod addresses on the underlay: {pods:?}");
        assert!(
            !pcap.windows(marker.len()).any(|w| w == marker.as_bytes()),
            "a pod's payload crossed the underlay in clear"
        );
    }
}
