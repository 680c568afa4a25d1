//! Root tests against the real kernel. Every test works only inside network
//! namespaces it creates (removed on drop, also on panic); nothing touches
//! the root namespace.

use std::net::IpAddr;
use std::time::Duration;

use flannel_core::datapath::{FdbEntry, Neighbour, Route};
use flannel_core::mac::MacAddr;
use flannel_netlink::netns::{get_sysctl, set_sysctl, NetNs, ScopedNetNs};
use flannel_netlink::{Error, Monitor, Netlink, Notification, VxlanDevice};
use ipnet::IpNet;

/// Fails (never skips) when not root.
fn need_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("needs root: these tests create network namespaces; run as root (e.g. sudo -E cargo test -p flannel-netlink)");
    }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}
fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

/// Lists the names in /run/netns (what `ip netns list` shows).
fn netns_names() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn netns_add_run_delete() {
    need_root();
    let name;
    {
        let ns = ScopedNetNs::unique("fnl-ns").unwrap();
        name = ns.name.clone();
        assert!(name.starts_with(&format!("fnl-ns-{}-", std::process::id())));
        assert!(netns_names().contains(&name));
        // Reopening by name gives the same namespace.
        let again = NetNs::open(&name).unwrap();
        let (a, b) = (
            nix::sys::stat::fstat(ns.fd()).unwrap(),
            nix::sys::stat::fstat(again.fd()).unwrap(),
        );
        assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino));
        // It is not the test's own namespace.
        let own = nix::sys::stat::stat("/proc/thread-self/ns/net").unwrap();
        assert_ne!(a.st_ino, own.st_ino);
        // Inside: only lo, and it is up.
        let links = ns
            .run(|| Netlink::open().unwrap().list_links().unwrap())
            .unwrap();
        assert_eq!(links.len(), 1, "{links:?}");
        assert_eq!(links[0].name, "lo");
        assert!(links[0].up);
        // The thread really ran inside.
        let inside = ns
            .run(|| {
                nix::sys::stat::stat("/proc/thread-self/ns/net")
                    .unwrap()
                    .st_ino
            })
            .unwrap();
        assert_eq!(inside, a.st_ino);
        // A panic inside is reported, not propagated.
        let r = ns.run(|| panic!("boom"));
        assert!(matches!(
            r,
            Err(flannel_netlink::netns::NetNsError::Panicked { .. })
        ));
        // Adding the same name again fails instead of taking it over.
        assert!(NetNs::add(&name).is_err());
    }
    assert!(!netns_names().contains(&name), "namespace left behind");
    // Deleting an absent namespace is fine; bad names are refused.
    NetNs::delete(&name).unwrap();
    assert!(NetNs::add("../etc").is_err());
    assert!(NetNs::open("no-such-ns-fnl").is_err());
}

#[test]
fn sysctl_is_per_namespace() {
    need_root();
    let root_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let ns = ScopedNetNs::unique("fnl-sysctl").unwrap();
    let (inside_before, inside_after) = ns
        .run(|| {
            let before = get_sysctl("net/ipv4/ip_forward").unwrap();
            let want = if before == "1" { "0" } else { "1" };
            set_sysctl("net/ipv4/ip_forward", want).unwrap();
            (before, get_sysctl("net.ipv4.ip_forward").unwrap())
        })
        .unwrap();
    assert_ne!(inside_before, inside_after, "write inside did not take");
    // Read again from a fresh thread inside: the value stuck to the namespace.
    let again = ns
        .run(|| get_sysctl("net/ipv4/ip_forward").unwrap())
        .unwrap();
    assert_eq!(again, inside_after);
    let root_after = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    assert_eq!(root_before, root_after, "root namespace sysctl changed!");
    assert!(set_sysctl("../../etc/passwd", "x").is_err());
}

#[test]
fn bridge_veth_addresses() {
    need_root();
    let host = ScopedNetNs::unique("fnl-host").unwrap();
    let pod = ScopedNetNs::unique("fnl-pod").unwrap();
    let pod_fd = pod.fd();
    let (br, veth) = host
        .run(|| -> Result<_, Error> {
            let mut nl = Netlink::open()?;
            let br = nl.add_bridge("cni0", Some(1400))?;
            assert_eq!(br.kind.as_deref(), Some("bridge"));
            assert_eq!(br.mtu, 1400);
            // Idempotent: the same bridge comes back, MTU fixed.
            let br2 = nl.add_bridge("cni0", Some(1450))?;
            assert_eq!(br2.index, br.index);
            assert_eq!(br2.mtu, 1450);
            nl.set_link_up(br.index)?;
            let veth = nl.add_veth("veth0", "eth0", pod_fd, Some(1450))?;
            assert_eq!(veth.kind.as_deref(), Some("veth"));
            assert_eq!(veth.mtu, 1450);
            // The same name again is EEXIST.
            let again = nl.add_veth("veth0", "eth0", pod_fd, None).unwrap_err();
            assert!(again.is_exists(), "{again}");
            // The peer is not here.
            assert!(nl.link_by_name("eth0")?.is_none());
            nl.set_link_master(veth.index, br.index)?;
            nl.set_hairpin(veth.index, true)?;
            assert_eq!(nl.hairpin(veth.index)?, Some(true));
            nl.set_hairpin(veth.index, false)?;
            assert_eq!(nl.hairpin(veth.index)?, Some(false));
            nl.set_link_up(veth.index)?;
            let m = mac("0a:58:0a:f4:01:01");
            nl.set_link_address(br.index, m)?;
            let br = nl.link_by_index(br.index)?.unwrap();
            assert_eq!(br.mac, Some(m));
            assert!(br.up);
            let veth = nl.link_by_name("veth0")?.unwrap();
            assert_eq!(veth.master, Some(br.index));
            assert!(veth.up);
            // A link of that name that is not a bridge is a conflict.
            assert!(matches!(
                nl.add_bridge("veth0", None),
                Err(Error::Conflict { .. })
            ));
            // Addresses: add twice, list, delete twice.
            for _ in 0..2 {
                nl.add_address(br.index, net("10.244.1.1/24"))?;
                nl.add_address(br.index, net("fd00:10:244:1::1/64"))?;
            }
            let mut addrs = nl.list_addresses(br.index)?;
            addrs.sort();
            assert_eq!(
                addrs,
                vec![net("10.244.1.1/24"), net("fd00:10:244:1::1/64")]
            );
            for _ in 0..2 {
                nl.del_address(br.index, net("fd00:10:244:1::1/64"))?;
            }
            assert_eq!(nl.list_addresses(br.index)?, vec![net("10.244.1.1/24")]);
            Ok((br, veth))
        })
        .unwrap()
        .unwrap();

    // The peer landed in the pod namespace with the MTU asked for.
    let eth0 = pod
        .run(|| -> Result<_, Error> {
            let mut nl = Netlink::open()?;
            let eth0 = nl.link_by_name("eth0")?.expect("peer in pod namespace");
            nl.set_link_up(eth0.index)?;
            nl.add_address(eth0.index, net("10.244.1.2/24"))?;
            Ok(eth0)
        })
        .unwrap()
        .unwrap();
    assert_eq!(eth0.mtu, 1450);
    assert_eq!(eth0.kind.as_deref(), Some("veth"));

    host.run(|| -> Result<_, Error> {
        let mut nl = Netlink::open()?;
        nl.set_link_down(veth.index)?;
        assert!(!nl.link_by_index(veth.index)?.unwrap().up);
        nl.set_link_master(veth.index, 0)?;
        assert_eq!(nl.link_by_index(veth.index)?.unwrap().master, None);
        nl.del_link(veth.index)?;
        nl.del_link(veth.index)?; // absent is success
        assert!(nl.link_by_index(veth.index)?.is_none());
        nl.del_link(br.index)?;
        assert!(nl.link_by_name("cni0")?.is_none());
        Ok(())
    })
    .unwrap()
    .unwrap();
    // Deleting the host end took the peer with it.
    let left = pod
        .run(|| Netlink::open().unwrap().link_by_name("eth0").unwrap())
        .unwrap();
    assert!(left.is_none());
}

#[test]
fn move_link_between_namespaces() {
    need_root();
    let a = ScopedNetNs::unique("fnl-mva").unwrap();
    let b = ScopedNetNs::unique("fnl-mvb").unwrap();
    let b_fd = b.fd();
    a.run(|| -> Result<_, Error> {
        let mut nl = Netlink::open()?;
        let v = nl.add_veth("mv0", "mv1", b_fd, None)?;
        // Send our end over too.
        nl.set_link_netns(v.index, b_fd)?;
        assert!(nl.link_by_name("mv0")?.is_none());
        Ok(())
    })
    .unwrap()
    .unwrap();
    let names: Vec<String> = b
        .run(|| Netlink::open().unwrap().list_links().unwrap())
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert!(names.contains(&"mv0".to_string()) && names.contains(&"mv1".to_string()));
}
