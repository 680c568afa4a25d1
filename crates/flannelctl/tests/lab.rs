//! End-to-end tests: whole labs (underlay switch, master, workers, pods) with
//! the real flanneld and flannel binaries, each lab in namespaces of its own
//! named `t<pid>n<counter>-...`, removed by a guard even when a test panics.
//!
//! Needs root, and `cargo build --workspace --bins` first (the tests run the
//! flanneld and flannel binaries found next to flannelctl).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use flannel_core::datapath::{FdbEntry, Neighbour, Route};
use flannel_core::mac::MacAddr;
use flannel_netlink::{Monitor, Netlink, Notification};
use flannelctl::lab::{self, Lab, LabOptions, Outcome, Pinger};
use ipnet::IpNet;

#[test]
fn three_workers_ping_across_nodes_with_ttl_62_and_hold_exactly_the_triples() {
    let lab = up(3);
    let m = lab.check().unwrap();
    println!("{}", m.render());
    assert!(m.all_ok(), "matrix has failures:\n{}", m.render());
    // 3 pods x (2 pods + 4 nodes x 2 addresses)
    assert_eq!(m.total(), 3 * (2 + 8));
    for a in ["ubuntu-1", "ubuntu-2", "ubuntu-3"] {
        for b in ["ubuntu-1", "ubuntu-2", "ubuntu-3"] {
            if a != b {
                assert!(
                    matches!(m.get(a, b), Some(Outcome::Ok { ttl: 62, .. })),
                    "{a} -> {b}: {:?}",
                    m.get(a, b)
                );
            }
        }
    }
    // The seed's addresses.
    assert_eq!(
        lab.node("k8s-node1").unwrap().underlay_ip,
        Ipv4Addr::new(172, 16, 1, 14)
    );
    assert_eq!(
        lab.node("k8s-node2").unwrap().underlay_ip,
        Ipv4Addr::new(172, 16, 1, 13)
    );
    assert_eq!(
        lab.node("master").unwrap().underlay_ip,
        Ipv4Addr::new(172, 16, 1, 8)
    );

    let macs = vtep_macs(&lab);
    for n in &lab.state.nodes {
        let t = tables_match(&lab, &n.name, &macs).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.routes.len(), 3, "{}: one route per peer", n.name);
    }
    let status = lab.status();
    assert!(status.healthy(), "{}", status.render());
    // Every daemon answers /readyz on its node's 127.0.0.1 (lab up waited for it).
    assert!(status.nodes.iter().all(|n| n.ready == Ok(true)));
    assert!(status.render().contains("ready"), "{}", status.render());
    // The seed's MTUs: 1500 underlay, 1450 for flannel.1, cni0 and the pods.
    assert_eq!(link_mtu(&lab, "k8s-node1", "flannel.1"), 1450);
    assert_eq!(link_mtu(&lab, "ubuntu-2", "eth0"), 1450);
    let env = std::fs::read_to_string(lab.subnet_file("k8s-node2")).unwrap();
    assert_eq!(
        env.lines()
            .filter(|l| l.starts_with("FLANNEL_NETWORK") || l.starts_with("FLANNEL_SUBNET"))
            .collect::<Vec<_>>(),
        [
            "FLANNEL_NETWORK=10.244.0.0/16",
            "FLANNEL_SUBNET=10.244.2.1/24"
        ]
    );
}

/// Deletes something in a node's namespace and waits for the kernel to
/// announce the deletion (a monitor is opened first), which proves it took
/// effect even when the daemon puts it back a moment later.
fn delete_observed(
    lab: &Lab,
    node: &str,
    what: &str,
    delete: impl FnOnce(&mut Netlink) + Send,
    is_it: impl Fn(&Notification) -> bool + Send,
) {
    in_node(lab, node, move |nl| {
        let mut mon = Monitor::open().unwrap();
        delete(nl);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{node}: the kernel never announced the deletion of {what}"
            );
            if mon.recv_timeout(left).unwrap().iter().any(&is_it) {
                return;
            }
        }
    })
}

fn link_mtu(lab: &Lab, target: &str, dev: &str) -> u32 {
    in_node(lab, target, |nl| {
        nl.link_by_name(dev)
            .unwrap()
            .unwrap_or_else(|| panic!("{target} has no {dev}"))
            .mtu
    })
}

#[test]
fn drift_is_repaired_within_seconds() {
    // Also a jumbo underlay: everything of flannel gets MTU - 50.
    let lab = up_with_mtu(2, 9000);
    let macs = vtep_macs(&lab);
    let node = "k8s-node1";
    let t = wait_tables(&lab, node, &macs, Duration::from_secs(5));
    assert_eq!(link_mtu(&lab, node, "ens3"), 9000);
    assert_eq!(link_mtu(&lab, node, "flannel.1"), 8950);
    assert_eq!(link_mtu(&lab, node, "cni0"), 8950);
    assert_eq!(link_mtu(&lab, "ubuntu-1", "eth0"), 8950);
    let env = std::fs::read_to_string(lab.subnet_file(node)).unwrap();
    assert!(env.contains("FLANNEL_MTU=8950"), "{env}");
    let node2 = lab.node("k8s-node2").unwrap().clone();
    let mac2 = macs.iter().find(|(n, _)| n == "k8s-node2").unwrap().1;
    let gw2 = IpAddr::V4(node2.subnet.network());
    let within = Duration::from_secs(10);

    // A route.
    let route = Route {
        dst: IpNet::V4(node2.subnet),
        gateway: Some(gw2),
        oif: t.ifindex,
        onlink: true,
    };
    delete_observed(
        &lab,
        node,
        "the route",
        |nl| nl.del_route(&route).unwrap(),
        |n| matches!(n, Notification::Route { dst, deleted: true, .. } if *dst == route.dst),
    );
    wait_tables(&lab, node, &macs, within);

    // An FDB entry.
    let fdb = FdbEntry {
        ifindex: t.ifindex,
        mac: mac2,
        dst: IpAddr::V4(node2.underlay_ip),
    };
    delete_observed(
        &lab,
        node,
        "the FDB entry",
        |nl| nl.del_fdb(&fdb).unwrap(),
        |n| matches!(n, Notification::Fdb { mac, deleted: true, .. } if *mac == mac2),
    );
    wait_tables(&lab, node, &macs, within);

    // A neighbour.
    let neigh = Neighbour {
        ifindex: t.ifindex,
        ip: gw2,
        mac: mac2,
    };
    delete_observed(
        &lab,
        node,
        "the neighbour",
        |nl| nl.del_neighbour(&neigh).unwrap(),
        |n| matches!(n, Notification::Neighbour { ip, deleted: true, .. } if *ip == gw2),
    );
    wait_tables(&lab, node, &macs, within);

    // The whole device: it comes back, with the same VtepMAC and every peer.
    delete_observed(
        &lab,
        node,
        "flannel.1",
        |nl| nl.del_link(t.ifindex).unwrap(),
        |n| matches!(n, Notification::Link { index, deleted: true, .. } if *index == t.ifindex),
    );
    let back = wait_tables(&lab, node, &macs, within);
    assert_eq!(back.mac, t.mac, "flannel.1 came back with another MAC");
    assert_ping(&lab, "ubuntu-1", pod_ip(&lab, "ubuntu-2"), 62);
    assert_ping(&lab, "ubuntu-2", pod_ip(&lab, "ubuntu-1"), 62);
}

#[test]
fn daemon_restart_keeps_subnet_and_mac_and_loses_no_ping() {
    let lab = up(2);
    let node = "k8s-node1";
    let macs = vtep_macs(&lab);
    let before = wait_tables(&lab, node, &macs, Duration::from_secs(5));
    let env_before = std::fs::read_to_string(lab.subnet_file(node)).unwrap();
    let lease_mac_before = lab.published_vtep_mac(node).unwrap();
    let old_pid = lab.daemon_pid(node).unwrap();
    let to = pod_ip(&lab, "ubuntu-2");
    assert_ping(&lab, "ubuntu-1", to, 62);
    // Everything the kernel of node1 announces from here on.
    let mut monitor = lab
        .netns(node)
        .unwrap()
        .run(|| Monitor::open().unwrap())
        .unwrap();

    // Ping ubuntu-2 from ubuntu-1 every 50 ms across the restart.
    let stop = Arc::new(AtomicBool::new(false));
    let mut pinger = Pinger::open_in(&lab.netns("ubuntu-1").unwrap()).unwrap();
    let pinging = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut sent, mut lost) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                sent += 1;
                match pinger.echo(to, Duration::from_secs(1)).unwrap() {
                    Some(r) => assert_eq!(r.ttl, 62),
                    None => lost.push(sent),
                }
                if let Some(rest) = Duration::from_millis(50).checked_sub(t0.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            (sent, lost)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        lab.stop_daemon(node, Duration::from_secs(5)).unwrap(),
        "daemon was not running"
    );
    assert!(!lab.daemon_alive(node));
    std::thread::sleep(Duration::from_millis(300));
    let new_pid = lab.start_daemon(node).unwrap();
    assert_ne!(old_pid, new_pid);
    // Ready again: the lease is (re)published; then give it time to resync.
    let deadline = Instant::now() + Duration::from_secs(15);
    lab.wait_subnet_env(node, deadline).unwrap();
    lab.wait_leases_published(deadline).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (sent, lost) = pinging.join().unwrap();
    assert!(sent >= 20, "only {sent} pings were sent");
    assert!(
        lost.is_empty(),
        "lost pings {lost:?} of {sent} across the restart"
    );

    assert!(lab.daemon_alive(node));
    assert_eq!(
        std::fs::read_to_string(lab.subnet_file(node)).unwrap(),
        env_before
    );
    assert_eq!(lab.published_vtep_mac(node).unwrap(), lease_mac_before);
    let after = wait_tables(&lab, node, &macs, Duration::from_secs(5));
    assert_eq!(after, before, "the restart changed the kernel state");
    // Not even transiently: no deletion of flannel.1 or of anything on it.
    let cluster = lab::cluster_network();
    let mut deletions = Vec::new();
    loop {
        let batch = monitor.recv_timeout(Duration::from_millis(200)).unwrap();
        if batch.is_empty() {
            break;
        }
        deletions.extend(batch.into_iter().filter(|n| match n {
            Notification::Link { index, deleted, .. } => *deleted && *index == before.ifindex,
            Notification::Route { dst, deleted, .. } => {
                *deleted && matches!(dst, IpNet::V4(d) if cluster.contains(d))
            }
            Notification::Neighbour {
                ifindex, deleted, ..
            }
            | Notification::Fdb {
                ifindex, deleted, ..
            } => *deleted && *ifindex == before.ifindex,
            Notification::Overrun => true,
            _ => false,
        }));
    }
    assert!(
        deletions.is_empty(),
        "the restart deleted kernel state: {deletions:?}"
    );
    for peer in ["master", "k8s-node2"] {
        wait_tables(&lab, peer, &macs, Duration::from_secs(5));
    }
}

#[test]
fn leases_removed_while_daemons_are_down_disappear_everywhere() {
    let lab = up(3);
    let macs = vtep_macs(&lab);
    for n in &lab.state.nodes {
        wait_tables(&lab, &n.name, &macs, Duration::from_secs(5));
    }
    // node1 goes down first, so it misses what follows; then node3 goes down
    // and its lease is removed from the store.
    assert!(lab
        .stop_daemon("k8s-node1", Duration::from_secs(5))
        .unwrap());
    assert!(lab
        .stop_daemon("k8s-node3", Duration::from_secs(5))
        .unwrap());
    let status = lab.status();
    let down: Vec<&str> = status
        .nodes
        .iter()
        .filter(|n| !n.healthy())
        .map(|n| n.node.as_str())
        .collect();
    assert_eq!(down, ["k8s-node1", "k8s-node3"], "{}", status.render());
    // A stopped daemon's health endpoint is gone with it.
    let node1 = status.nodes.iter().find(|n| n.node == "k8s-node1").unwrap();
    assert!(node1.ready.is_err(), "{:?}", node1.ready);
    assert!(status.render().contains("no answer"), "{}", status.render());
    assert!(!status.healthy());
    lab.delete_lease(lab.node("k8s-node3").unwrap().subnet)
        .unwrap();
    assert!(lab
        .leases()
        .unwrap()
        .iter()
        .all(|l| l.key.ipv4 != Some(lab.node("k8s-node3").unwrap().subnet)));

    let remaining: Vec<(String, MacAddr)> = macs
        .iter()
        .filter(|(n, _)| n != "k8s-node3")
        .cloned()
        .collect();
    // The running daemons drop node3.
    for n in ["master", "k8s-node2"] {
        wait_tables(&lab, n, &remaining, Duration::from_secs(10));
    }
    // node1's daemon is down: its kernel still holds node3 (the stale state to clean).
    tables_match(&lab, "k8s-node1", &macs).unwrap_or_else(|e| panic!("before restart: {e}"));
    // Started again, it removes node3 from its node.
    lab.start_daemon("k8s-node1").unwrap();
    wait_tables(&lab, "k8s-node1", &remaining, Duration::from_secs(10));
    assert_ping(&lab, "ubuntu-1", pod_ip(&lab, "ubuntu-2"), 62);
}

#[test]
fn down_twice_leaves_no_namespace_and_no_process() {
    let guard = up(1);
    let name = guard.name().to_string();
    let pids: Vec<u32> = guard
        .state
        .nodes
        .iter()
        .map(|n| guard.daemon_pid(&n.name).unwrap())
        .collect();
    assert_eq!(lab::lab_processes(&name).len(), 2);
    // underlay, outside (--ip-masq, the default), master, k8s-node1, ubuntu-1.
    assert_eq!(lab::lab_namespaces(&name).len(), 5);
    // A second `up` with the same name is refused and tells how to fix it.
    let again = Lab::up(&LabOptions {
        name: name.clone(),
        nodes: 1,
        bin_dir: Some(bin_dir()),
        ..LabOptions::default()
    })
    .unwrap_err()
    .to_string();
    assert!(again.contains("lab down"), "{again}");

    lab::down(&name).unwrap();
    lab::down(&name).unwrap();
    assert!(lab::lab_namespaces(&name).is_empty());
    assert!(lab::lab_processes(&name).is_empty());
    for pid in pids {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z"),
            "flanneld {pid} survived: {state}"
        );
    }
    assert!(!lab::lab_dir(&name).exists());
    if let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
    {
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(
            !list.lines().any(|l| l.starts_with(&format!("{name}-"))),
            "ip netns list still shows {name}: {list}"
        );
    }
}

#[test]
fn failed_up_removes_what_it_built() {
    require_root();
    let real = bin_dir();
    // A bin dir whose flanneld exits at once: `up` fails while waiting for it.
    let dir = std::env::temp_dir().join(format!("flannel-lab-bad-bin-{}", unique_name()));
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(real.join(lab::CNI_BINARY), dir.join(lab::CNI_BINARY)).unwrap();
    // A copy of `false` named flanneld: it exits at once (with status 1).
    std::fs::copy("/bin/false", dir.join(lab::FLANNELD_BINARY)).unwrap();

    let name = unique_name();
    let err = Lab::up(&LabOptions {
        name: name.clone(),
        nodes: 1,
        bin_dir: Some(dir.clone()),
        ready_timeout: Duration::from_secs(10),
        ..LabOptions::default()
    })
    .unwrap_err();
    let msg = err.to_string();
    let leftovers = lab::lab_namespaces(&name);
    let _ = lab::down(&name);
    assert!(
        msg.contains("flanneld on master is not running") && msg.contains("flanneld.log"),
        "the error should name the node and its log: {msg}"
    );
    assert!(leftovers.is_empty(), "failed up left {leftovers:?}");
    assert!(!lab::lab_dir(&name).exists());

    // With keep_on_failure the half-built lab stays for inspection, and
    // `down` removes it (twice is fine).
    let kept = unique_name();
    Lab::up(&LabOptions {
        name: kept.clone(),
        nodes: 1,
        bin_dir: Some(dir.clone()),
        ready_timeout: Duration::from_secs(10),
        keep_on_failure: true,
        ..LabOptions::default()
    })
    .unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    let left = lab::lab_namespaces(&kept);
    let log_kept = lab::lab_dir(&kept).join("master/flanneld.log").is_file();
    let first = lab::down(&kept);
    let second = lab::down(&kept);
    // underlay, outside, master, k8s-node1.
    assert_eq!(left.len(), 4, "kept {left:?}");
    assert!(
        log_kept,
        "the failed node's log should be kept for inspection"
    );
    first.unwrap();
    second.unwrap();
    assert!(lab::lab_namespaces(&kept).is_empty());
    assert!(!lab::lab_dir(&kept).exists());
}

#[test]
fn down_only_kills_what_is_really_the_labs_flanneld() {
    let guard = up(1);
    let name = guard.name().to_string();
    let node = "k8s-node1";
    let real = guard.daemon_pid(node).unwrap();
    // Someone else's process behind the node's pid file.
    let mut other = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let pid_file = guard.node_dir(node).join("flanneld.pid");
    std::fs::write(&pid_file, format!("{}\n", other.id())).unwrap();
    assert!(
        !guard.stop_daemon(node, Duration::from_secs(1)).unwrap(),
        "stop_daemon signalled a process that is not flanneld"
    );
    assert!(other.try_wait().unwrap().is_none(), "sleep was killed");
    // `down` still finds the real daemon (its command line points into the labdir)
    // and leaves the stranger alone.
    lab::down(&name).unwrap();
    assert!(
        other.try_wait().unwrap().is_none(),
        "lab down killed a process that is not ours"
    );
    assert!(
        lab::lab_processes(&name).is_empty(),
        "flanneld {real} survived"
    );
    other.kill().unwrap();
    other.wait().unwrap();
}

/// One vxlan-encapsulated ICMP echo request as seen on the underlay.
#[derive(Debug)]
struct WireFrame {
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    dport: u16,
    vxlan_flags: u8,
    vni: u32,
    inner_src: Ipv4Addr,
    inner_dst: Ipv4Addr,
    inner_ttl: u8,
}

/// Ethernet / IPv4 / UDP / VXLAN / Ethernet / IPv4 / ICMP echo request.
fn parse_vxlan_echo(f: &[u8]) -> Option<WireFrame> {
    let ip = f.get(14..)?;
    if u16::from_be_bytes([f[12], f[13]]) != 0x0800 || ip[0] >> 4 != 4 || ip[9] != 17 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let udp = ip.get(ihl..)?;
    let vx = udp.get(8..)?;
    let inner_ip = vx.get(8 + 14..)?;
    if u16::from_be_bytes([vx[8 + 12], vx[8 + 13]]) != 0x0800 || inner_ip[9] != 1 {
        return None;
    }
    let iihl = usize::from(inner_ip[0] & 0xf) * 4;
    if *inner_ip.get(iihl)? != 8 {
        return None;
    }
    let v4 = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    Some(WireFrame {
        outer_src: v4(&ip[12..16]),
        outer_dst: v4(&ip[16..20]),
        dport: u16::from_be_bytes([udp[2], udp[3]]),
        vxlan_flags: vx[0],
        vni: u32::from_be_bytes([0, vx[4], vx[5], vx[6]]),
        inner_src: v4(&inner_ip[12..16]),
        inner_dst: v4(&inner_ip[16..20]),
        inner_ttl: inner_ip[8],
    })
}

#[test]
fn the_packet_walk_on_the_wire() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let lab = up(2);
    let (from, to) = (pod_ip(&lab, "ubuntu-1"), pod_ip(&lab, "ubuntu-2"));
    assert_ping(&lab, "ubuntu-1", to, 62);
    // tcpdump -ni <switch port> udp, done with a packet socket in the switch namespace.
    let sock = lab
        .netns("underlay")
        .unwrap()
        .run(|| {
            // SAFETY: plain socket(2); the fd is owned right away.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                )
            };
            assert!(fd >= 0, "{}", std::io::Error::last_os_error());
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .unwrap();
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: valid timeval for SO_RCVTIMEO.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    let mut pinger = Pinger::open_in(&lab.netns("ubuntu-1").unwrap()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    let frame = 'found: loop {
        assert!(
            Instant::now() < deadline,
            "no vxlan frame of the ping on the underlay"
        );
        pinger.echo(to, Duration::from_millis(100)).unwrap();
        loop {
            // SAFETY: buffer of the given length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                break;
            }
            if let Some(f) = parse_vxlan_echo(&buf[..n as usize]) {
                if f.inner_src == from && f.inner_dst == to {
                    break 'found f;
                }
            }
        }
    };
    // As in the seed's capture: 172.16.1.14.x > 172.16.1.13.8472: flags [I], instance 1,
    // inner 10.244.1.x > 10.244.2.x with ttl 63 (decremented once by node1).
    assert_eq!(frame.outer_src, Ipv4Addr::new(172, 16, 1, 14), "{frame:?}");
    assert_eq!(frame.outer_dst, Ipv4Addr::new(172, 16, 1, 13), "{frame:?}");
    assert_eq!(frame.dport, 8472, "{frame:?}");
    assert_eq!(frame.vxlan_flags, 0x08, "{frame:?}");
    assert_eq!(frame.vni, 1, "{frame:?}");
    assert_eq!(frame.inner_ttl, 63, "{frame:?}");
}
