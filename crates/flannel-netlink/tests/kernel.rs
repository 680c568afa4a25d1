//! Root tests against the real kernel. Every test works only inside network
//! namespaces it creates (removed on drop, also on panic); nothing touches
//! the root namespace.

use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use flannel_core::datapath::{BlackholeRoute, FdbEntry, Neighbour, Route, BLACKHOLE_METRIC};
use flannel_core::mac::MacAddr;
use flannel_netlink::netns::{get_sysctl, set_sysctl, NetNs, ScopedNetNs};
use flannel_netlink::{Error, Monitor, Netlink, Nexthop, Notification, RouteEntry, VxlanDevice};
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

/// An underlay: a veth pair between two namespaces, with addresses.
/// Returns the underlay link index in `a`.
fn underlay(a: &ScopedNetNs, b: &ScopedNetNs) -> u32 {
    let b_fd = b.fd();
    let idx = a
        .run(|| -> Result<_, Error> {
            let mut nl = Netlink::open()?;
            let v = nl.add_veth("ul0", "ul1", b_fd, None)?;
            nl.add_address(v.index, net("172.16.1.14/24"))?;
            nl.set_link_up(v.index)?;
            Ok(v.index)
        })
        .unwrap()
        .unwrap();
    b.run(|| -> Result<_, Error> {
        let mut nl = Netlink::open()?;
        let v = nl.link_by_name("ul1")?.unwrap();
        nl.add_address(v.index, net("172.16.1.13/24"))?;
        nl.set_link_up(v.index)?;
        Ok(())
    })
    .unwrap()
    .unwrap();
    idx
}

fn vxlan_dev(underlay: u32) -> VxlanDevice {
    VxlanDevice {
        name: "flannel.1".into(),
        vni: 1,
        local: ip("172.16.1.14"),
        underlay_index: underlay,
        port: 0,
        learning: false,
        gbp: false,
        mtu: 1450,
        mac: Some(mac("26:62:24:f0:61:01")),
    }
}

#[test]
fn routes_round_trip() {
    need_root();
    let a = ScopedNetNs::unique("fnl-rta").unwrap();
    let b = ScopedNetNs::unique("fnl-rtb").unwrap();
    let ul = underlay(&a, &b);
    a.run(|| -> Result<_, Error> {
        let mut nl = Netlink::open()?;
        let vx = nl.add_vxlan(&vxlan_dev(ul))?;
        nl.set_link_up(vx.index)?;
        nl.add_address(vx.index, net("10.244.1.0/32"))?;
        let onlink = Route {
            dst: net("10.244.2.0/24"),
            gateway: Some(ip("10.244.2.0")),
            oif: vx.index,
            onlink: true,
        };
        let via = Route {
            dst: net("10.96.0.0/16"),
            gateway: Some(ip("172.16.1.13")),
            oif: ul,
            onlink: false,
        };
        let direct = Route {
            dst: net("192.168.77.0/24"),
            gateway: None,
            oif: ul,
            onlink: false,
        };
        let v6 = Route {
            dst: net("fd00:10:244:2::/64"),
            gateway: None,
            oif: vx.index,
            onlink: false,
        };
        let v6_onlink = Route {
            dst: net("fd00:10:244:3::/64"),
            gateway: Some(ip("fd00:10:244:3::")),
            oif: vx.index,
            onlink: true,
        };
        // IPv4 destination, IPv6 next hop (RTA_VIA).
        let v4_via6 = Route {
            dst: net("10.245.0.0/16"),
            gateway: Some(ip("fe80::1")),
            oif: ul,
            onlink: false,
        };
        let wanted = [&onlink, &via, &direct, &v6, &v6_onlink, &v4_via6];
        for _ in 0..2 {
            for r in wanted {
                nl.replace_route(r)?;
            }
        }
        let listed = nl.list_routes()?;
        for r in wanted {
            assert_eq!(
                listed.iter().filter(|x| x.dst == r.dst).collect::<Vec<_>>(),
                vec![r],
                "route {r:?} not read back exactly; all: {listed:?}"
            );
        }
        // The kernel's own prefix route of the underlay is listed too.
        assert!(listed
            .iter()
            .any(|x| x.dst == net("172.16.1.0/24") && x.oif == ul && x.gateway.is_none()));
        // Replace changes the next hop in place.
        let moved = Route {
            gateway: Some(ip("172.16.1.1")),
            ..via.clone()
        };
        nl.replace_route(&moved)?;
        let listed = nl.list_routes()?;
        assert_eq!(
            listed
                .iter()
                .filter(|x| x.dst == via.dst)
                .collect::<Vec<_>>(),
            vec![&moved]
        );
        // Delete twice (absent is success), also for a vanished device.
        for _ in 0..2 {
            nl.del_route(&onlink)?;
            nl.del_route(&moved)?;
            nl.del_route(&v6)?;
            nl.del_route(&v6_onlink)?;
            nl.del_route(&v4_via6)?;
        }
        nl.del_route(&Route {
            oif: 9999,
            ..direct.clone()
        })?;
        let listed = nl.list_routes()?;
        for gone in [&onlink, &via, &v6, &v6_onlink, &v4_via6] {
            assert!(
                !listed.iter().any(|x| x.dst == gone.dst),
                "{gone:?} still there"
            );
        }
        assert!(listed.contains(&direct));
        // Bad input names the field.
        let bad = nl
            .replace_route(&Route {
                dst: net("10.244.3.5/24"),
                ..direct.clone()
            })
            .unwrap_err();
        assert!(
            matches!(bad, Error::Invalid { .. }) && bad.to_string().contains("dst"),
            "{bad}"
        );
        // A kernel refusal keeps the errno and reads like the ip command.
        let err = nl
            .replace_route(&Route {
                dst: net("10.1.0.0/16"),
                gateway: Some(ip("10.99.99.99")),
                oif: ul,
                onlink: false,
            })
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("ip route replace 10.1.0.0/16 via 10.99.99.99 dev "),
            "{err}"
        );
        eprintln!("kernel refusal reads: {err}");
        assert!(err.raw_os_error().is_some(), "{err:?}");
        Ok(())
    })
    .unwrap()
    .unwrap();
}

#[test]
fn nexthops_and_routes_that_name_them() {
    need_root();
    let a = ScopedNetNs::unique("fnl-nha").unwrap();
    let b = ScopedNetNs::unique("fnl-nhb").unwrap();
    let ul = underlay(&a, &b);
    a.run(|| -> Result<_, Error> {
        let mut nl = Netlink::open()?;
        let vx = nl.add_vxlan(&vxlan_dev(ul))?;
        nl.set_link_up(vx.index)?;
        nl.add_address(vx.index, net("10.244.1.0/32"))?;
        let mut mon = Monitor::open()?;
        let nh = Nexthop {
            id: 0x0f1a_0007,
            gateway: Some(ip("10.244.2.0")),
            oif: vx.index,
            onlink: true,
            protocol: 241,
        };
        // Replace is idempotent and rewrites in place.
        for _ in 0..2 {
            nl.replace_nexthop(&nh)?;
        }
        assert_eq!(nl.list_nexthops()?, vec![nh]);
        let shown = iproute2(&["ip", "nexthop", "show", "id", "253362183"]);
        assert!(
            shown.contains("via 10.244.2.0 dev flannel.1") && shown.contains("onlink"),
            "{shown}"
        );
        let dst = net("10.244.2.0/24");
        for _ in 0..2 {
            nl.replace_route_nhid(dst, nh.id)?;
        }
        let entry = RouteEntry {
            route: Route {
                dst,
                gateway: Some(ip("10.244.2.0")),
                oif: vx.index,
                onlink: true,
            },
            nhid: Some(nh.id),
        };
        let entries = nl.list_route_entries()?;
        assert_eq!(
            entries
                .iter()
                .filter(|e| e.route.dst == dst)
                .collect::<Vec<_>>(),
            vec![&entry]
        );
        assert!(iproute2(&["ip", "route", "show", "10.244.2.0/24"])
            .starts_with("10.244.2.0/24 nhid 253362183 via 10.244.2.0 dev flannel.1"));
        // A plain route replaces the nhid one in place, and back.
        nl.replace_route(&entry.route)?;
        let plain = nl.list_route_entries()?;
        assert!(plain
            .iter()
            .any(|e| e.route == entry.route && e.nhid.is_none()));
        nl.replace_route_nhid(dst, nh.id)?;
        // Delete by nhid; absent is success.
        for _ in 0..2 {
            nl.del_route_nhid(dst, nh.id)?;
        }
        assert!(!nl.list_route_entries()?.iter().any(|e| e.route.dst == dst));
        // Deleting the nexthop takes its routes with it, and is announced.
        nl.replace_route_nhid(dst, nh.id)?;
        let other = Netlink::open()?.del_nexthop(nh.id);
        other?;
        let want = Notification::Nexthop {
            id: nh.id,
            deleted: true,
        };
        let mut seen = Vec::new();
        while !seen.contains(&want) {
            let n = mon.recv_timeout(Duration::from_secs(2))?;
            assert!(!n.is_empty(), "no deletion announced; saw {seen:?}");
            seen.extend(n);
        }
        assert!(!nl.list_route_entries()?.iter().any(|e| e.route.dst == dst));
        nl.del_nexthop(nh.id)?;
        assert!(nl.list_nexthops()?.is_empty());
        // The kernel's refusal reads like the ip command.
        let err = nl
            .replace_nexthop(&Nexthop {
                gateway: Some(ip("10.99.0.1")),
                onlink: false,
                ..nh
            })
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("ip nexthop replace id 253362183 via 10.99.0.1"),
            "{err}"
        );
        Ok(())
    })
    .unwrap()
    .unwrap();
}

#[test]
fn blackhole_routes_round_trip_beside_the_bridge_route() {
    need_root();
    let ns = ScopedNetNs::unique("fnl-bh").unwrap();
    ns.run(|| -> Result<(), Error> {
        let mut nl = Netlink::open()?;
        let br = nl.add_bridge("cni0", None)?;
        nl.add_address(br.index, net("10.244.1.1/24"))?;
        nl.set_link_up(br.index)?;
        let v4 = BlackholeRoute {
            dst: net("10.244.1.0/24"),
            metric: BLACKHOLE_METRIC,
        };
        let v6 = BlackholeRoute {
            dst: net("fd00:10:244:1::/64"),
            metric: BLACKHOLE_METRIC,
        };
        let operators = BlackholeRoute {
            dst: net("10.244.9.0/24"),
            metric: 0,
        };
        // Beside cni0's connected route (metric 0), and idempotent.
        for _ in 0..2 {
            nl.replace_blackhole_route(&v4)?;
            nl.replace_blackhole_route(&v6)?;
        }
        nl.replace_blackhole_route(&operators)?;
        let mut listed = nl.list_blackhole_routes()?;
        listed.sort();
        assert_eq!(listed, vec![v4, operators, v6]);
        // cni0's route is untouched and blackholes are not unicast routes.
        let routes = nl.list_routes()?;
        assert!(
            routes
                .iter()
                .any(|r| r.dst == net("10.244.1.0/24") && r.oif == br.index),
            "{routes:?}"
        );
        assert!(!routes.iter().any(|r| r.dst == net("fd00:10:244:1::/64")));
        // Delete matches the metric: ours go, the operator's stays.
        nl.del_blackhole_route(&v4)?;
        nl.del_blackhole_route(&v6)?;
        nl.del_blackhole_route(&v4)?; // absent is success
        assert_eq!(nl.list_blackhole_routes()?, vec![operators]);
        // Host bits are refused with the fix.
        let e = nl
            .replace_blackhole_route(&BlackholeRoute {
                dst: net("10.244.1.5/24"),
                metric: BLACKHOLE_METRIC,
            })
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("use the network address 10.244.1.0/24"),
            "{e}"
        );
        Ok(())
    })
    .unwrap()
    .unwrap();
}

#[test]
fn route_get_names_the_interface_gateway_and_source() {
    need_root();
    let ns = ScopedNetNs::unique("fnl-rget").unwrap();
    ns.run(|| -> Result<(), Error> {
        let mut nl = Netlink::open()?;
        let br = nl.add_bridge("br-get", None)?;
        nl.add_address(br.index, net("10.244.1.1/24"))?;
        nl.set_link_up(br.index)?;
        let direct = nl.get_route(ip("10.244.1.5"))?;
        assert_eq!(direct.oif, br.index);
        assert_eq!(direct.gateway, None);
        assert_eq!(direct.prefsrc, Some(ip("10.244.1.1")));
        nl.replace_route(&Route {
            dst: net("10.9.0.0/16"),
            gateway: Some(ip("10.244.1.254")),
            oif: br.index,
            onlink: false,
        })?;
        let via = nl.get_route(ip("10.9.8.7"))?;
        assert_eq!(via.gateway, Some(ip("10.244.1.254")));
        assert_eq!(via.oif, br.index);
        let e = nl.get_route(ip("192.0.2.1")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENETUNREACH), "{e}");
        assert!(e.to_string().contains("ip route get 192.0.2.1"), "{e}");
        Ok(())
    })
    .unwrap()
    .unwrap();
}

#[test]
fn vxlan_device_attributes() {
    need_root();
    let a = ScopedNetNs::unique("fnl-vxa").unwrap();
    let b = ScopedNetNs::unique("fnl-vxb").unwrap();
    let ul = underlay(&a, &b);
    a.run(|| -> Result<_, Error> {
        let mut nl = Netlink::open()?;
        let dev = vxlan_dev(ul);
        let vx = nl.add_vxlan(&dev)?;
        assert_eq!(vx.kind.as_deref(), Some("vxlan"));
        assert_eq!(vx.mtu, 1450);
        assert_eq!(vx.mac, dev.mac);
        let info = vx.vxlan.clone().expect("vxlan attributes");
        assert_eq!(info.vni, 1);
        assert_eq!(info.local, Some(ip("172.16.1.14")));
        assert_eq!(info.link, Some(ul));
        assert_eq!(info.port, 8472, "port 0 means the kernel default 8472");
        assert!(!info.learning);
        assert!(!info.gbp);
        // Same attributes: the same device is kept (index unchanged), MTU fixed.
        let again = nl.add_vxlan(&VxlanDevice {
            mtu: 1400,
            ..dev.clone()
        })?;
        assert_eq!(again.index, vx.index);
        assert_eq!(again.mtu, 1400);
        // Only the MAC differs: changed in place, the device is kept.
        let new_mac = mac("26:62:24:f0:61:02");
        let kept = nl.add_vxlan(&VxlanDevice {
            mac: Some(new_mac),
            mtu: 1400,
            ..dev.clone()
        })?;
        assert_eq!((kept.index, kept.mac), (vx.index, Some(new_mac)));
        // Different VNI/port/learning/gbp: recreated with the new attributes.
        let changed = VxlanDevice {
            vni: 4096,
            port: 4789,
            learning: true,
            gbp: true,
            ..dev.clone()
        };
        let re = nl.add_vxlan(&changed)?;
        assert_ne!(re.index, vx.index);
        let info = re.vxlan.unwrap();
        assert_eq!(
            (info.vni, info.port, info.learning, info.gbp),
            (4096, 4789, true, true)
        );
        assert_eq!(
            nl.list_links()?
                .iter()
                .filter(|l| l.name == "flannel.1")
                .count(),
            1
        );
        // A non-vxlan link of that name is replaced too.
        nl.del_link(re.index)?;
        nl.add_bridge("flannel.1", None)?;
        let vx = nl.add_vxlan(&dev)?;
        assert_eq!(vx.kind.as_deref(), Some("vxlan"));
        // IPv6 underlay address: IFLA_VXLAN_LOCAL6 is written and read back.
        let v6 = nl.add_vxlan(&VxlanDevice {
            name: "flannel-v6.1".into(),
            local: ip("fd00:172:16::14"),
            mac: None,
            mtu: 0,
            ..dev.clone()
        })?;
        let info6 = v6.vxlan.unwrap();
        assert_eq!(info6.local, Some(ip("fd00:172:16::14")));
        assert_eq!(info6.link, Some(ul));
        assert!(v6.mtu > 0, "kernel picks an MTU when none is given");
        let f6 = FdbEntry {
            ifindex: v6.index,
            mac: mac("52:17:43:ba:2e:60"),
            dst: ip("fd00:172:16::13"),
        };
        nl.replace_fdb(&f6)?;
        assert_eq!(nl.list_fdb(v6.index)?, vec![f6.clone()]);
        assert_eq!(nl.list_fdb(vx.index)?, vec![]);
        nl.del_fdb(&f6)?;
        assert_eq!(nl.list_fdb(v6.index)?, vec![]);
        // Out of range VNI is refused before anything is sent.
        let err = nl
            .add_vxlan(&VxlanDevice {
                vni: 1 << 24,
                ..dev.clone()
            })
            .unwrap_err();
        assert!(matches!(err, Error::Invalid { .. }) && err.to_string().contains("vni"));
        let err = nl
            .add_vxlan(&VxlanDevice {
                name: "a-name-longer-than-15".into(),
                ..dev.clone()
            })
            .unwrap_err();
        assert!(matches!(err, Error::Invalid { .. }), "{err}");
        Ok(())
    })
    .unwrap()
    .unwrap();
}

#[test]
fn neighbours_and_fdb() {
    need_root();
    let a = ScopedNetNs::unique("fnl-nba").unwrap();
    let b = ScopedNetNs::unique("fnl-nbb").unwrap();
    let ul = underlay(&a, &b);
    a.run(|| -> Result<_, Error> {
        let mut nl = Netlink::open()?;
        let vx = nl.add_vxlan(&vxlan_dev(ul))?;
        nl.set_link_up(vx.index)?;
        let n1 = Neighbour {
            ifindex: vx.index,
            ip: ip("10.244.2.0"),
            mac: mac("52:17:43:ba:2e:56"),
        };
        let n6 = Neighbour {
            ifindex: vx.index,
            ip: ip("fd00:10:244:2::"),
            mac: mac("52:17:43:ba:2e:56"),
        };
        let f1 = FdbEntry {
            ifindex: vx.index,
            mac: mac("52:17:43:ba:2e:56"),
            dst: ip("172.16.1.13"),
        };
        let f2 = FdbEntry {
            ifindex: vx.index,
            mac: mac("52:17:43:ba:2e:57"),
            dst: ip("172.16.1.15"),
        };
        for _ in 0..2 {
            nl.replace_neighbour(&n1)?;
            nl.replace_neighbour(&n6)?;
            nl.replace_fdb(&f1)?;
            nl.replace_fdb(&f2)?;
        }
        let mut ns = nl.list_neighbours(vx.index)?;
        ns.sort();
        let mut want = vec![n1.clone(), n6.clone()];
        want.sort();
        assert_eq!(ns, want);
        // Another device's neighbours are not listed.
        assert!(nl.list_neighbours(ul)?.iter().all(|n| n.ifindex == ul));
        // A default-destination entry (all-zero MAC) must not be listed.
        let status = std::process::Command::new("bridge")
            .args([
                "fdb",
                "append",
                "00:00:00:00:00:00",
                "dev",
                "flannel.1",
                "dst",
                "172.16.1.99",
                "self",
                "permanent",
            ])
            .status()
            .expect("run bridge(8)");
        assert!(status.success());
        let mut fdb = nl.list_fdb(vx.index)?;
        fdb.sort();
        assert_eq!(fdb, vec![f1.clone(), f2.clone()]);
        // Replace moves a MAC to a new remote.
        let f1b = FdbEntry {
            dst: ip("172.16.1.20"),
            ..f1.clone()
        };
        nl.replace_fdb(&f1b)?;
        let mut fdb = nl.list_fdb(vx.index)?;
        fdb.sort();
        assert_eq!(fdb, vec![f1b.clone(), f2.clone()]);
        // Replace changes a neighbour's MAC.
        let n1b = Neighbour {
            mac: mac("52:17:43:ba:2e:99"),
            ..n1.clone()
        };
        nl.replace_neighbour(&n1b)?;
        assert!(nl.list_neighbours(vx.index)?.contains(&n1b));
        // Deletes, twice: absent is success.
        for _ in 0..2 {
            nl.del_neighbour(&n1b)?;
            nl.del_neighbour(&n6)?;
            nl.del_fdb(&f1b)?;
            nl.del_fdb(&f2)?;
        }
        assert_eq!(nl.list_neighbours(vx.index)?, vec![]);
        assert_eq!(nl.list_fdb(vx.index)?, vec![]);
        // On a vanished device too.
        nl.del_link(vx.index)?;
        nl.del_neighbour(&n1)?;
        nl.del_fdb(&f1)?;
        Ok(())
    })
    .unwrap()
    .unwrap();
}

#[test]
fn monitor_sees_changes() {
    need_root();
    let a = ScopedNetNs::unique("fnl-mon").unwrap();
    let b = ScopedNetNs::unique("fnl-monb").unwrap();
    let ul = underlay(&a, &b);
    a.run(|| -> Result<_, Error> {
        let mut nl = Netlink::open()?;
        let mut mon = Monitor::open()?;
        let r = Route {
            dst: net("10.244.9.0/24"),
            gateway: Some(ip("172.16.1.13")),
            oif: ul,
            onlink: false,
        };
        nl.replace_route(&r)?;
        let vx = nl.add_vxlan(&vxlan_dev(ul))?;
        let f = FdbEntry {
            ifindex: vx.index,
            mac: mac("52:17:43:ba:2e:56"),
            dst: ip("172.16.1.13"),
        };
        nl.replace_fdb(&f)?;
        nl.del_route(&r)?;
        let mut seen = Vec::new();
        let deleted = Notification::Route {
            dst: r.dst,
            deleted: true,
            route: Some(r.clone()),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            seen.extend(mon.recv_timeout(Duration::from_millis(200))?);
            if seen.contains(&deleted) {
                break;
            }
        }
        // Each notification carries the object itself.
        assert!(
            seen.contains(&Notification::Route {
                dst: r.dst,
                deleted: false,
                route: Some(r.clone()),
            }),
            "{seen:?}"
        );
        assert!(seen.contains(&deleted), "{seen:?}");
        assert!(seen.iter().any(|n| matches!(n, Notification::Link { name, deleted: false, .. } if name == "flannel.1")), "{seen:?}");
        assert!(
            seen.contains(&Notification::Fdb {
                ifindex: vx.index,
                mac: f.mac,
                deleted: false,
                dst: Some(f.dst),
            }),
            "{seen:?}"
        );
        // Nothing more pending: a timeout returns empty.
        let mut rest = mon.recv_timeout(Duration::from_millis(300))?;
        rest.retain(|n| matches!(n, Notification::Route { dst, .. } if *dst == r.dst));
        assert_eq!(rest, vec![]);
        // Blocking recv gets a deletion of a link.
        nl.del_link(vx.index)?;
        let mut got = Vec::new();
        while !got.iter().any(|n| matches!(n, Notification::Link { deleted: true, .. })) {
            got.extend(mon.recv()?);
        }
        Ok(())
    })
    .unwrap()
    .unwrap();
}

/// A monitor told to ignore a socket's port id drops the echoes of that
/// socket's route and neighbour writes and still sees everybody else's
/// (and the vxlan driver's FDB notifications, which carry no sender).
#[test]
fn monitor_ignores_the_echoes_of_one_socket() {
    need_root();
    let a = ScopedNetNs::unique("fnl-echo").unwrap();
    let b = ScopedNetNs::unique("fnl-echob").unwrap();
    let ul = underlay(&a, &b);
    a.run(|| -> Result<_, Error> {
        let mut ours = Netlink::open()?;
        let mut theirs = Netlink::open()?;
        assert_ne!(ours.port_id(), 0);
        assert_ne!(ours.port_id(), theirs.port_id());
        let mut mon = Monitor::open()?;
        mon.ignore_port(ours.port_id());
        let route = |dst: &str| Route {
            dst: net(dst),
            gateway: Some(ip("172.16.1.13")),
            oif: ul,
            onlink: false,
        };
        let (mine, other) = (route("10.244.7.0/24"), route("10.244.8.0/24"));
        ours.replace_route(&mine)?;
        let vx = ours.add_vxlan(&vxlan_dev(ul))?;
        let f = FdbEntry {
            ifindex: vx.index,
            mac: mac("52:17:43:ba:2e:57"),
            dst: ip("172.16.1.13"),
        };
        ours.replace_fdb(&f)?;
        theirs.replace_route(&other)?;
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline
            && !seen
                .iter()
                .any(|n| matches!(n, Notification::Route { dst, .. } if *dst == other.dst))
        {
            seen.extend(mon.recv_timeout(Duration::from_millis(200))?);
        }
        let routes: Vec<IpNet> = seen
            .iter()
            .filter_map(|n| match n {
                Notification::Route { dst, .. } => Some(*dst),
                _ => None,
            })
            .collect();
        assert!(routes.contains(&other.dst), "{seen:?}");
        assert!(
            !routes.contains(&mine.dst),
            "our own echo came through: {seen:?}"
        );
        assert!(
            seen.iter()
                .any(|n| matches!(n, Notification::Fdb { mac, .. } if *mac == f.mac)),
            "{seen:?}"
        );
        ours.del_link(vx.index)?;
        Ok(())
    })
    .unwrap()
    .unwrap();
}

#[test]
fn nothing_left_behind() {
    need_root();
    // Whatever other tests in this binary are doing, a namespace made and
    // dropped here is gone at once.
    let name = {
        let ns = ScopedNetNs::unique("fnl-gone").unwrap();
        ns.name.clone()
    };
    assert!(!netns_names().contains(&name));
    assert!(!std::path::Path::new("/run/netns").join(&name).exists());
}

#[test]
fn monitor_reports_overrun() {
    need_root();
    let a = ScopedNetNs::unique("fnl-ovr").unwrap();
    let b = ScopedNetNs::unique("fnl-ovrb").unwrap();
    let ul = underlay(&a, &b);
    a.run(|| -> Result<_, Error> {
        let mut nl = Netlink::open()?;
        let mut mon = Monitor::open()?;
        // Shrink the buffer (the kernel's minimum) so a burst overflows it.
        let small: libc::c_int = 1;
        let rc = unsafe {
            libc::setsockopt(
                mon.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&small as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        let routes: Vec<Route> = (0..200u32)
            .map(|i| Route {
                dst: IpNet::new(
                    IpAddr::from([10, 200, (i / 256) as u8, (i % 256) as u8]),
                    32,
                )
                .unwrap(),
                gateway: Some(ip("172.16.1.13")),
                oif: ul,
                onlink: false,
            })
            .collect();
        for r in &routes {
            nl.replace_route(r)?;
        }
        let first = mon.recv_timeout(Duration::from_secs(5))?;
        assert_eq!(
            first,
            vec![Notification::Overrun],
            "expected an overrun first"
        );
        // After the overrun the socket keeps working.
        for r in &routes {
            nl.del_route(r)?;
        }
        let mut more = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while more.is_empty() && std::time::Instant::now() < deadline {
            more = mon.recv_timeout(Duration::from_millis(200))?;
        }
        assert!(!more.is_empty());
        Ok(())
    })
    .unwrap()
    .unwrap();
}

#[test]
fn open_path_and_current() {
    need_root();
    let ns = ScopedNetNs::unique("fnl-path").unwrap();
    let want = nix::sys::stat::fstat(ns.fd()).unwrap().st_ino;
    // /proc/<tid>/ns/net of a thread inside, as a CNI_NETNS would be given.
    let (by_path, current) = ns
        .run(|| {
            let tid = nix::unistd::gettid();
            let p = format!("/proc/{}/task/{tid}/ns/net", std::process::id());
            let by_path = NetNs::open_path(std::path::Path::new(&p)).unwrap();
            (by_path, NetNs::current().unwrap())
        })
        .unwrap();
    assert_eq!(nix::sys::stat::fstat(by_path.fd()).unwrap().st_ino, want);
    assert_eq!(nix::sys::stat::fstat(current.fd()).unwrap().st_ino, want);
    assert!(by_path.path.is_none());
    // A file that is not a namespace is refused with a clear message.
    let err = NetNs::open_path(std::path::Path::new("/proc/self/status")).unwrap_err();
    assert!(err.to_string().contains("not a namespace file"), "{err}");
    // run() on a handle opened by path works like by name.
    let links = by_path
        .run(|| Netlink::open().unwrap().list_links().unwrap().len())
        .unwrap();
    assert_eq!(links, 1);
}

#[test]
fn handles_are_send() {
    fn send<T: Send>() {}
    send::<Netlink>();
    send::<Monitor>();
    send::<NetNs>();
}

/// `NetNs::add` when /run/netns is not a mount point yet (a fresh machine):
/// it must bind /run/netns onto itself and make it shared, as `ip netns add`
/// does. Run in a private mount namespace of one thread, with a tmpfs on
/// /run, so the host's mounts are never touched.
#[test]
fn netns_add_makes_run_dir_a_shared_mount() {
    need_root();
    std::thread::spawn(|| {
        use nix::mount::{mount, MsFlags};
        use nix::sched::{unshare, CloneFlags};
        unshare(CloneFlags::CLONE_FS | CloneFlags::CLONE_NEWNS).expect("unshare mount ns");
        // First cut propagation to the host: only then mount anything.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("make / rprivate in the private mount namespace");
        // Here (private) the host's /run/netns mount is dropped, and a
        // tmpfs keeps our files off the host's /run.
        let _ = nix::mount::umount2("/run/netns", nix::mount::MntFlags::MNT_DETACH);
        mount(
            Some("tmpfs"),
            "/run",
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .expect("tmpfs on /run");
        let mountinfo = || std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
        assert!(!mountinfo()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/run/netns")));
        let ns = ScopedNetNs::unique("fnl-fresh").unwrap();
        let line = mountinfo()
            .lines()
            .find(|l| l.split(' ').nth(4) == Some("/run/netns"))
            .map(str::to_string)
            .expect("/run/netns became a mount point");
        assert!(line.contains("shared:"), "not shared: {line}");
        let links = ns
            .run(|| Netlink::open().unwrap().list_links().unwrap())
            .unwrap();
        assert_eq!(links.len(), 1);
        assert!(links[0].up);
        // A second namespace reuses the mount point as it is.
        let ns2 = ScopedNetNs::unique("fnl-fresh").unwrap();
        let count = mountinfo()
            .lines()
            .filter(|l| l.split(' ').nth(4) == Some("/run/netns"))
            .count();
        assert_eq!(count, 1);
        drop(ns2);
        drop(ns);
    })
    .join()
    .unwrap();
}

/// Output of an iproute2 command run inside the calling thread's namespace
/// (a child process inherits the namespace of the thread that forks it).
fn iproute2(args: &[&str]) -> String {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Programs one node of the packet walk: vxlan device with its /32, and for
/// the peer the neighbour, FDB entry and onlink route.
struct Node<'a> {
    ns: &'a ScopedNetNs,
    ul_name: &'static str,
    public: &'static str,
    vtep_mac: &'static str,
    subnet_net: &'static str,
}

fn program_node(me: &Node, peer: &Node) {
    me.ns
        .run(|| -> Result<_, Error> {
            let mut nl = Netlink::open()?;
            let ul = nl.link_by_name(me.ul_name)?.unwrap();
            let vx = nl.add_vxlan(&VxlanDevice {
                local: ip(me.public),
                mac: Some(mac(me.vtep_mac)),
                ..vxlan_dev(ul.index)
            })?;
            nl.add_address(vx.index, IpNet::new(ip(me.subnet_net), 32).unwrap())?;
            nl.set_link_up(vx.index)?;
            let peer_net = ip(peer.subnet_net);
            // Applied twice: level-triggered writes converge, nothing doubles.
            for _ in 0..2 {
                nl.replace_neighbour(&Neighbour {
                    ifindex: vx.index,
                    ip: peer_net,
                    mac: mac(peer.vtep_mac),
                })?;
                nl.replace_fdb(&FdbEntry {
                    ifindex: vx.index,
                    mac: mac(peer.vtep_mac),
                    dst: ip(peer.public),
                })?;
                nl.replace_route(&Route {
                    dst: IpNet::new(peer_net, 24).unwrap(),
                    gateway: Some(peer_net),
                    oif: vx.index,
                    onlink: true,
                })?;
            }
            Ok(())
        })
        .unwrap()
        .unwrap();
}

/// The vxlan datapath of packet-walk.txt, programmed through this crate,
/// carries real traffic between two node namespaces, and iproute2 shows the
/// same state as in the walk.
#[test]
fn vxlan_packet_walk() {
    need_root();
    let a = ScopedNetNs::unique("fnl-walka").unwrap();
    let b = ScopedNetNs::unique("fnl-walkb").unwrap();
    underlay(&a, &b);
    let node1 = Node {
        ns: &a,
        ul_name: "ul0",
        public: "172.16.1.14",
        vtep_mac: "26:62:24:f0:61:01",
        subnet_net: "10.244.1.0",
    };
    let node2 = Node {
        ns: &b,
        ul_name: "ul1",
        public: "172.16.1.13",
        vtep_mac: "52:17:43:ba:2e:56",
        subnet_net: "10.244.2.0",
    };
    program_node(&node1, &node2);
    program_node(&node2, &node1);

    // What iproute2 reads back on node 1 matches the walk.
    let shown = a
        .run(|| {
            [
                iproute2(&["ip", "-d", "link", "show", "flannel.1"]),
                iproute2(&["ip", "route", "show"]),
                iproute2(&["ip", "neigh", "show", "dev", "flannel.1"]),
                iproute2(&["bridge", "fdb", "show", "dev", "flannel.1"]),
            ]
        })
        .unwrap();
    let link = &shown[0];
    assert!(link.contains("link/ether 26:62:24:f0:61:01"), "{link}");
    assert!(
        link.contains("vxlan id 1 local 172.16.1.14 dev ul0")
            && link.contains("dstport 8472")
            && link.contains("nolearning"),
        "{link}"
    );
    assert!(link.contains("mtu 1450"), "{link}");
    assert_eq!(
        shown[1]
            .lines()
            .filter(|l| l.starts_with("10.244.2.0/24"))
            .collect::<Vec<_>>(),
        vec!["10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink "],
        "{}",
        shown[1]
    );
    assert!(
        shown[2].contains("10.244.2.0 lladdr 52:17:43:ba:2e:56 PERMANENT"),
        "{}",
        shown[2]
    );
    assert!(
        shown[3].contains("52:17:43:ba:2e:56 dst 172.16.1.13 self permanent"),
        "{}",
        shown[3]
    );

    // UDP through the overlay: node 1 (10.244.1.0) -> node 2 (10.244.2.0) and back.
    let listener = b
        .run(|| std::net::UdpSocket::bind("10.244.2.0:5555").unwrap())
        .unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let sender = a
        .run(|| std::net::UdpSocket::bind("10.244.1.0:0").unwrap())
        .unwrap();
    sender
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    sender
        .send_to(b"over the overlay", "10.244.2.0:5555")
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = listener
        .recv_from(&mut buf)
        .expect("datagram crossed the vxlan overlay");
    assert_eq!(&buf[..n], b"over the overlay");
    assert_eq!(from.ip(), ip("10.244.1.0"));
    listener.send_to(b"and back", from).unwrap();
    let (n, _) = sender.recv_from(&mut buf).expect("reply crossed back");
    assert_eq!(&buf[..n], b"and back");
}

#[test]
fn tun_device_carries_packets() {
    use std::io::Read;
    need_root();
    let ns = ScopedNetNs::unique("fnl-tun").unwrap();
    ns.run(|| -> Result<_, Error> {
        let tun = flannel_netlink::tun::Tun::open("flannel0")?;
        assert_eq!(tun.name(), "flannel0");
        let mut nl = Netlink::open()?;
        let link = nl.link_by_name("flannel0")?.expect("tun link");
        assert_eq!(link.kind.as_deref(), Some("tun"));
        assert_eq!(link.mac, None, "a TUN device has no link-layer address");
        nl.set_link_mtu(link.index, 1472)?;
        nl.add_address(link.index, net("10.244.1.0/16"))?;
        nl.set_link_up(link.index)?;
        // A datagram routed into the device comes out of the file as an IP packet.
        let s = std::net::UdpSocket::bind("10.244.1.0:0").unwrap();
        s.send_to(b"to the tun", "10.244.7.7:9999").unwrap();
        let mut f = tun.file();
        let mut buf = [0u8; 2048];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let n = loop {
            // Bounded wait: a missing packet fails the test instead of hanging it.
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut pfd = libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as libc::c_int) };
            assert!(ready > 0, "no packet came out of the tun device");
            let n = f.read(&mut buf).unwrap();
            // Skip IPv6 router solicitations and the like.
            if n >= 20 && buf[0] >> 4 == 4 && buf[9] == 17 {
                break n;
            }
        };
        assert_eq!(&buf[16..20], &[10, 244, 7, 7], "destination");
        assert_eq!(&buf[n - 10..n], b"to the tun");
        // The device goes with the handle.
        drop(tun);
        assert!(nl.link_by_name("flannel0")?.is_none());
        Ok(())
    })
    .unwrap()
    .unwrap();
}

#[test]
fn open_in_binds_the_socket_to_another_namespace() {
    need_root();
    let a = ScopedNetNs::unique("fnl-opin").unwrap();
    let b = ScopedNetNs::unique("fnl-opinb").unwrap();
    let ul = underlay(&a, &b);
    // From a thread inside `b`, open a socket in `a`; the thread stays in `b`.
    let (names, still_b) = b
        .run(|| {
            let mut nl = Netlink::open_in(&a).unwrap();
            let home = nix::sys::stat::stat("/proc/thread-self/ns/net")
                .unwrap()
                .st_ino;
            // Used from another thread: the socket keeps its namespace.
            let names: Vec<String> = std::thread::scope(|s| {
                s.spawn(|| {
                    nl.list_links()
                        .unwrap()
                        .into_iter()
                        .map(|l| l.name)
                        .collect()
                })
                .join()
                .unwrap()
            });
            (names, home == nix::sys::stat::fstat(b.fd()).unwrap().st_ino)
        })
        .unwrap();
    assert!(
        still_b,
        "the calling thread did not return to its namespace"
    );
    let mut names = names;
    names.sort();
    assert_eq!(names, vec!["lo".to_string(), "ul0".to_string()]);
    assert!(ul > 0);
}

#[test]
fn wireguard_probe_agrees_with_ip_and_leaves_nothing() {
    need_root();
    let ns = ScopedNetNs::unique("fnl-wg").unwrap();
    let (ours, theirs) = ns
        .run(|| {
            let mut nl = Netlink::open().unwrap();
            let ours = nl.has_wireguard("wgprobe0").unwrap();
            assert_eq!(
                nl.link_by_name("wgprobe0").unwrap(),
                None,
                "probe link left behind"
            );
            // `ip` on the same kernel: the link type exists iff it can add one.
            let theirs = std::process::Command::new("ip")
                .args(["link", "add", "wgprobe1", "type", "wireguard"])
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap()
                .success();
            (ours, theirs)
        })
        .unwrap();
    assert_eq!(
        ours, theirs,
        "has_wireguard vs `ip link add type wireguard`"
    );
    // A bad name is refused before anything is sent.
    let e = ns
        .run(|| {
            Netlink::open()
                .unwrap()
                .has_wireguard("name-far-too-long-for-a-link")
        })
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
}

#[test]
fn link_stats_count_what_crossed_the_link() {
    need_root();
    let ns = ScopedNetNs::unique("fnl-stats").unwrap();
    ns.run(|| {
        let mut nl = Netlink::open().unwrap();
        let lo = nl.link_by_name("lo").unwrap().unwrap();
        nl.set_link_up(lo.index).unwrap();
        let before = nl.link_stats(lo.index).unwrap().unwrap();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..10 {
            tx.send_to(&[0u8; 100], rx.local_addr().unwrap()).unwrap();
        }
        let after = nl.link_stats(lo.index).unwrap().unwrap();
        assert_eq!(after.tx_packets - before.tx_packets, 10, "{after:?}");
        assert_eq!(after.rx_packets - before.rx_packets, 10, "{after:?}");
        // 100 bytes of payload, 8 of UDP, 20 of IPv4 (lo counts no link header).
        assert_eq!(after.tx_bytes - before.tx_bytes, 10 * 128, "{after:?}");
        assert_eq!(nl.link_stats(999_999).unwrap(), None);
    })
    .unwrap();
}
