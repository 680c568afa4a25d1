//! Root tests of the `flannel` binary, run exactly as a container runtime runs
//! it (CNI_* environment + config on stdin) inside a node namespace, with pod
//! namespaces of their own and all state files in a temporary directory.
//! Nothing here touches the root namespace.

mod common;

use std::collections::HashSet;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{need_root, netns_path, Node};
use flannel_core::datapath::Route;
use flannel_netlink::netns::{NetNs, ScopedNetNs};
use flannel_netlink::{Link, Netlink};
use ipnet::IpNet;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_flannel");

fn bin() -> &'static Path {
    Path::new(BIN)
}

fn links(ns: &NetNs) -> Vec<Link> {
    ns.run(|| Netlink::open().unwrap().list_links().unwrap())
        .unwrap()
}

fn link(ns: &NetNs, name: &str) -> Option<Link> {
    links(ns).into_iter().find(|l| l.name == name)
}

fn addrs(ns: &NetNs, name: &str) -> Vec<IpNet> {
    let idx = link(ns, name)
        .unwrap_or_else(|| panic!("{name} missing in {}", ns.name))
        .index;
    ns.run(move || Netlink::open().unwrap().list_addresses(idx).unwrap())
        .unwrap()
}

fn routes(ns: &NetNs) -> Vec<Route> {
    ns.run(|| Netlink::open().unwrap().list_routes().unwrap())
        .unwrap()
}

fn veths(ns: &NetNs) -> Vec<String> {
    links(ns)
        .into_iter()
        .filter(|l| l.kind.as_deref() == Some("veth"))
        .map(|l| l.name)
        .collect()
}

/// Address files (not lock / last_reserved) in the network's IPAM dir.
fn ip_files(node: &Node) -> Vec<String> {
    match std::fs::read_dir(node.net_dir()) {
        Err(_) => Vec::new(),
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<IpAddr>().is_ok())
            .collect(),
    }
}

fn saved_configs(node: &Node) -> Vec<String> {
    match std::fs::read_dir(node.data_dir()) {
        Err(_) => Vec::new(),
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
    }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn add_check_del_like_a_runtime() {
    need_root();
    let node = Node::new("fcni-add");
    let pod = ScopedNetNs::unique("fcni-addp").unwrap();
    let pod_path = netns_path(&pod);
    let conf = node.conf("0.3.1");
    let out = node.cni(bin(), "ADD", "ctr-one", &pod_path, "eth0", &conf);
    let res = out.expect_ok().json();

    // The result, 0.3.1 shape.
    assert_eq!(res["cniVersion"], "0.3.1");
    let host_name = res["interfaces"][1]["name"].as_str().unwrap().to_string();
    assert_eq!(res["interfaces"][0]["name"], "cni0");
    assert!(
        host_name.starts_with("veth") && host_name.len() == 12,
        "{host_name}"
    );
    assert_eq!(res["interfaces"][2]["name"], "eth0");
    assert_eq!(res["interfaces"][2]["sandbox"], pod_path.as_str());
    assert_eq!(
        res["ips"],
        json!([{"version": "4", "interface": 2, "address": "10.244.1.2/24", "gateway": "10.244.1.1"}])
    );
    assert_eq!(
        res["routes"],
        json!([{"dst": "10.244.0.0/16"}, {"dst": "0.0.0.0/0", "gw": "10.244.1.1"}])
    );

    // The pod side.
    let eth0 = link(&pod, "eth0").expect("eth0 in the pod");
    assert!(eth0.up);
    assert_eq!(eth0.mtu, 1450);
    assert_eq!(
        eth0.mac.unwrap().to_string(),
        res["interfaces"][2]["mac"].as_str().unwrap()
    );
    assert_eq!(addrs(&pod, "eth0"), vec![net("10.244.1.2/24")]);
    let r = routes(&pod);
    for dst in ["0.0.0.0/0", "10.244.0.0/16"] {
        assert!(
            r.iter().any(|x| x.dst == net(dst)
                && x.gateway == Some(ip("10.244.1.1"))
                && x.oif == eth0.index),
            "route {dst} via 10.244.1.1 missing: {r:?}"
        );
    }
    // The node side: bridge with the gateway address, veth on it with hairpin.
    let br = link(&node.ns, "cni0").expect("cni0 on the node");
    assert_eq!(br.kind.as_deref(), Some("bridge"));
    assert!(br.up);
    assert_eq!(br.mtu, 1450);
    assert_eq!(addrs(&node.ns, "cni0"), vec![net("10.244.1.1/24")]);
    let host = link(&node.ns, &host_name).expect("host veth");
    assert_eq!(host.master, Some(br.index));
    assert!(host.up);
    assert_eq!(host.mtu, 1450);
    let detail = Node::sh_in(
        &node.ns,
        &["bridge", "-d", "link", "show", "dev", &host_name],
    );
    assert!(detail.contains("hairpin on"), "{detail}");
    // No pod interface leaked into the node namespace.
    assert!(link(&node.ns, "eth0").is_none());

    // Files: host-local format, saved config with tight permissions.
    assert_eq!(
        std::fs::read(node.net_dir().join("10.244.1.2")).unwrap(),
        b"ctr-one\r\neth0"
    );
    assert_eq!(
        std::fs::read_to_string(node.net_dir().join("last_reserved_ip.0")).unwrap(),
        "10.244.1.2"
    );
    assert!(node.net_dir().join("lock").exists());
    let saved_path = node.data_dir().join("ctr-one");
    let saved: Value = serde_json::from_slice(&std::fs::read(&saved_path).unwrap()).unwrap();
    assert_eq!(saved["type"], "bridge");
    assert_eq!(saved["ipMasq"], false);
    assert_eq!(
        saved["ipam"]["ranges"],
        json!([[{"subnet": "10.244.1.0/24"}]])
    );
    assert_eq!(
        std::fs::metadata(&saved_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(node.data_dir())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );

    // CHECK (needs 0.4.0+): good.
    let mut cconf = node.conf("1.0.0");
    let mut prev = res.clone();
    prev["cniVersion"] = json!("1.0.0");
    cconf["prevResult"] = prev;
    node.cni(bin(), "CHECK", "ctr-one", &pod_path, "eth0", &cconf)
        .expect_ok();
    // CHECK below 0.4.0 is refused with "incompatible version".
    let mut old = node.conf("0.3.1");
    old["prevResult"] = res.clone();
    assert_eq!(
        node.cni(bin(), "CHECK", "ctr-one", &pod_path, "eth0", &old)
            .code(),
        1
    );
    // CHECK without prevResult: invalid config.
    assert_eq!(
        node.cni(
            bin(),
            "CHECK",
            "ctr-one",
            &pod_path,
            "eth0",
            &node.conf("1.0.0")
        )
        .code(),
        7
    );

    // Break the pod: CHECK notices a missing route, then a missing address.
    let idx = eth0.index;
    pod.run(move || {
        let mut nl = Netlink::open().unwrap();
        nl.del_route(&Route {
            dst: net("10.244.0.0/16"),
            gateway: Some(ip("10.244.1.1")),
            oif: idx,
            onlink: false,
        })
        .unwrap();
    })
    .unwrap();
    let out = node.cni(bin(), "CHECK", "ctr-one", &pod_path, "eth0", &cconf);
    assert_eq!(out.code(), 103);
    assert!(out.stdout.contains("10.244.0.0/16"), "{}", out.stdout);
    pod.run(move || {
        Netlink::open()
            .unwrap()
            .del_address(idx, net("10.244.1.2/24"))
            .unwrap()
    })
    .unwrap();
    let out = node.cni(bin(), "CHECK", "ctr-one", &pod_path, "eth0", &cconf);
    assert_eq!(out.code(), 103);
    assert!(out.stdout.contains("10.244.1.2/24"), "{}", out.stdout);
    // And a host veth moved off the bridge.
    let hidx = host.index;
    node.ns
        .run(move || Netlink::open().unwrap().set_link_master(hidx, 0).unwrap())
        .unwrap();
    let out = node.cni(bin(), "CHECK", "ctr-one", &pod_path, "eth0", &cconf);
    assert!(out.stdout.contains("not enslaved"), "{}", out.stdout);

    // DEL removes everything; a second DEL succeeds too.
    node.cni(bin(), "DEL", "ctr-one", &pod_path, "eth0", &conf)
        .expect_ok();
    assert!(link(&pod, "eth0").is_none());
    assert!(veths(&node.ns).is_empty());
    assert!(ip_files(&node).is_empty());
    assert!(!saved_path.exists());
    let out = node.cni(bin(), "DEL", "ctr-one", &pod_path, "eth0", &conf);
    out.expect_ok();
    assert!(out.stdout.is_empty());
    // CHECK after DEL fails.
    assert_eq!(
        node.cni(bin(), "CHECK", "ctr-one", &pod_path, "eth0", &cconf)
            .code(),
        103
    );
}

#[test]
fn del_after_netns_is_gone_or_empty() {
    need_root();
    let node = Node::new("fcni-gone");
    let conf = node.conf("1.0.0");
    let pod = ScopedNetNs::unique("fcni-gonep").unwrap();
    let path = netns_path(&pod);
    node.cni(bin(), "ADD", "ctr-gone", &path, "eth0", &conf)
        .expect_ok();
    let pod2 = ScopedNetNs::unique("fcni-gonep").unwrap();
    let path2 = netns_path(&pod2);
    node.cni(bin(), "ADD", "ctr-gone2", &path2, "eth0", &conf)
        .expect_ok();
    assert_eq!(veths(&node.ns).len(), 2);
    drop(pod);
    // The namespace and its path are gone.
    node.cni(bin(), "DEL", "ctr-gone", &path, "eth0", &conf)
        .expect_ok();
    // Empty CNI_NETNS: the host end is found by its derived name.
    node.cni(bin(), "DEL", "ctr-gone2", "", "eth0", &conf)
        .expect_ok();
    assert!(veths(&node.ns).is_empty(), "{:?}", veths(&node.ns));
    assert!(link(&pod2, "eth0").is_none());
    assert!(ip_files(&node).is_empty());
    assert!(saved_configs(&node).is_empty());
    // A damaged saved config does not block DEL forever: it is cleaned up.
    let pod3 = ScopedNetNs::unique("fcni-gonep").unwrap();
    let path3 = netns_path(&pod3);
    node.cni(bin(), "ADD", "ctr-dmg", &path3, "eth0", &conf)
        .expect_ok();
    std::fs::write(node.data_dir().join("ctr-dmg"), "{truncated").unwrap();
    node.cni(bin(), "DEL", "ctr-dmg", &path3, "eth0", &conf)
        .expect_ok();
    assert!(saved_configs(&node).is_empty());
    assert!(ip_files(&node).is_empty());
    assert!(link(&pod3, "eth0").is_none());
    // DEL of a container never added: success.
    node.cni(bin(), "DEL", "never-added", "", "eth0", &conf)
        .expect_ok();
}

#[test]
fn gc_releases_attachments_not_listed() {
    need_root();
    let node = Node::new("fcni-gc");
    let conf = node.conf("1.1.0");
    let pods: Vec<ScopedNetNs> = (0..3)
        .map(|_| ScopedNetNs::unique("fcni-gcp").unwrap())
        .collect();
    for (i, p) in pods.iter().enumerate() {
        node.cni(
            bin(),
            "ADD",
            &format!("gc{i}"),
            &netns_path(p),
            "eth0",
            &conf,
        )
        .expect_ok();
    }
    assert_eq!(ip_files(&node).len(), 3);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "gc1", "ifname": "eth0"}]);
    node.cni(bin(), "GC", "", "", "", &gc).expect_ok();
    assert_eq!(ip_files(&node), vec!["10.244.1.3".to_string()]);
    assert_eq!(saved_configs(&node), vec!["gc1".to_string()]);
    assert_eq!(veths(&node.ns).len(), 1);
    assert!(link(&pods[0], "eth0").is_none());
    assert!(link(&pods[1], "eth0").is_some());
    // GC needs the list, and 1.1.0.
    assert_eq!(node.cni(bin(), "GC", "", "", "", &conf).code(), 7);
    let mut old = node.conf("1.0.0");
    old["cni.dev/valid-attachments"] = json!([]);
    assert_eq!(node.cni(bin(), "GC", "", "", "", &old).code(), 1);
    // An empty list releases the rest.
    gc["cni.dev/valid-attachments"] = json!([]);
    node.cni(bin(), "GC", "", "", "", &gc).expect_ok();
    assert!(ip_files(&node).is_empty());
    assert!(saved_configs(&node).is_empty());
    assert!(veths(&node.ns).is_empty());
}

#[test]
fn status_and_version() {
    need_root();
    let node = Node::new("fcni-st");
    let conf = node.conf("1.1.0");
    let out = node.cni(bin(), "STATUS", "", "", "", &conf);
    out.expect_ok();
    assert!(out.stdout.is_empty());
    std::fs::remove_file(node.subnet_env()).unwrap();
    let out = node.cni(bin(), "STATUS", "", "", "", &conf);
    assert_eq!(out.code(), 50);
    assert!(out.stdout.contains("flanneld"), "{}", out.stdout);
    node.write_subnet_env("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n");
    assert_eq!(node.cni(bin(), "STATUS", "", "", "", &conf).code(), 50);
    assert_eq!(
        node.cni(bin(), "STATUS", "", "", "", &node.conf("1.0.0"))
            .code(),
        1
    );

    let out = node.exec(
        bin(),
        &[("CNI_COMMAND", "VERSION")],
        br#"{"cniVersion":"0.4.0"}"#,
    );
    let v = out.expect_ok().json();
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(
        v["supportedVersions"],
        json!(["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

#[test]
fn results_in_every_version_shape() {
    need_root();
    let node = Node::new("fcni-ver");
    let pod = ScopedNetNs::unique("fcni-verp").unwrap();
    let path = netns_path(&pod);
    for v in [
        "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
    ] {
        let conf = node.conf(v);
        let res = node
            .cni(bin(), "ADD", "ctr-ver", &path, "eth0", &conf)
            .expect_ok()
            .json();
        assert_eq!(res["cniVersion"], v);
        if v < "0.3.0" {
            assert!(res["ip4"]["ip"].as_str().unwrap().ends_with("/24"), "{res}");
            assert_eq!(res["ip4"]["gateway"], "10.244.1.1");
            assert!(res.get("interfaces").is_none());
        } else {
            assert_eq!(res["ips"][0]["interface"], 2);
            assert_eq!(
                res["ips"][0].get("version").is_some(),
                v < "1.0.0",
                "{v}: {res}"
            );
        }
        node.cni(bin(), "DEL", "ctr-ver", &path, "eth0", &conf)
            .expect_ok();
    }
    assert!(ip_files(&node).is_empty());
}

#[test]
fn error_codes_and_failed_add_leaves_nothing() {
    need_root();
    let node = Node::new("fcni-err");
    let pod = ScopedNetNs::unique("fcni-errp").unwrap();
    let path = netns_path(&pod);
    let conf = node.conf("1.0.0");
    let s = conf.to_string();

    // 4: environment.
    let out = node.exec(bin(), &[], s.as_bytes());
    assert_eq!(out.code(), 4);
    let out = node.exec(
        bin(),
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_NETNS", &path),
            ("CNI_IFNAME", "eth0"),
        ],
        s.as_bytes(),
    );
    assert_eq!(out.code(), 4);
    assert!(out.stdout.contains("CNI_CONTAINERID"), "{}", out.stdout);
    assert_eq!(node.cni(bin(), "ADD", "ctr", "", "eth0", &conf).code(), 4);
    assert_eq!(
        node.cni(bin(), "ADD", "../evil", &path, "eth0", &conf)
            .code(),
        4
    );
    assert_eq!(
        node.cni(bin(), "ADD", "ctr", &path, "this-name-is-too-long", &conf)
            .code(),
        4
    );
    assert_eq!(
        node.cni(bin(), "FROB", "ctr", &path, "eth0", &conf).code(),
        4
    );
    // 6: not JSON.
    let out = node.exec(
        bin(),
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "ctr"),
            ("CNI_NETNS", &path),
            ("CNI_IFNAME", "eth0"),
        ],
        b"{not json",
    );
    assert_eq!(out.code(), 6);
    // 7: invalid config, naming the field.
    let mut bad = conf.clone();
    bad["delegate"]["mtu"] = json!("large");
    let out = node.cni(bin(), "ADD", "ctr", &path, "eth0", &bad);
    assert_eq!(out.code(), 7);
    assert!(out.stdout.contains("delegate.mtu"), "{}", out.stdout);
    // 1: unsupported version; the error still has the spec shape.
    let mut bad = conf.clone();
    bad["cniVersion"] = json!("2.0.0");
    let out = node.cni(bin(), "ADD", "ctr", &path, "eth0", &bad);
    assert_eq!(out.code(), 1);
    assert_eq!(out.json()["cniVersion"], "1.1.0");
    // 3: namespace does not exist.
    assert_eq!(
        node.cni(
            bin(),
            "ADD",
            "ctr",
            "/run/netns/fcni-does-not-exist",
            "eth0",
            &conf
        )
        .code(),
        3
    );
    // 11: no subnet.env, with a hint at flanneld.
    std::fs::rename(node.subnet_env(), node.dir.0.join("away")).unwrap();
    let out = node.cni(bin(), "ADD", "ctr", &path, "eth0", &conf);
    assert_eq!(out.code(), 11);
    assert!(out.stdout.contains("flanneld"), "{}", out.stdout);
    assert_eq!(out.json()["cniVersion"], "1.0.0");
    std::fs::rename(node.dir.0.join("away"), node.subnet_env()).unwrap();
    node.write_subnet_env(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPMASQ=true\n",
    );
    let out = node.cni(bin(), "ADD", "ctr", &path, "eth0", &conf);
    assert_eq!(out.code(), 11);
    assert!(out.stdout.contains("FLANNEL_MTU"), "{}", out.stdout);
    node.write_subnet_env(common::SUBNET_ENV);
    // None of the failures above left anything.
    assert!(veths(&node.ns).is_empty());
    assert!(ip_files(&node).is_empty());
    assert!(saved_configs(&node).is_empty());

    // 101: the interface already exists in the pod; the failed ADD leaves nothing.
    node.cni(bin(), "ADD", "ctr-a", &path, "eth0", &conf)
        .expect_ok();
    let out = node.cni(bin(), "ADD", "ctr-b", &path, "eth0", &conf);
    assert_eq!(out.code(), 101);
    assert_eq!(veths(&node.ns).len(), 1);
    assert_eq!(ip_files(&node), vec!["10.244.1.2".to_string()]);
    assert_eq!(saved_configs(&node), vec!["ctr-a".to_string()]);
    // The same ADD repeated (same container and interface) fails the same
    // way, and the failure takes back nothing of the working attachment.
    let out = node.cni(bin(), "ADD", "ctr-a", &path, "eth0", &conf);
    assert_eq!(out.code(), 101, "{}", out.stdout);
    assert_eq!(ip_files(&node), vec!["10.244.1.2".to_string()]);
    assert_eq!(saved_configs(&node), vec!["ctr-a".to_string()]);
    assert_eq!(veths(&node.ns).len(), 1);
    assert!(addrs(&pod, "eth0").contains(&net("10.244.1.2/24")));

    // The derived host veth name is taken by another container's veth (a
    // hash collision, simulated with a veth of that name): the ADD fails
    // and rolls back the address and the saved config...
    let host_c = "veth".to_string() + &format!("{:08x}", fnv("ctr-c", "eth1"));
    Node::sh_in(
        &node.ns,
        &[
            "ip",
            "link",
            "add",
            &host_c,
            "type",
            "veth",
            "peer",
            "name",
            "other-end",
        ],
    );
    let out = node.cni(bin(), "ADD", "ctr-c", &path, "eth1", &conf);
    assert_eq!(out.code(), 102, "{}", out.stdout);
    assert!(
        out.stdout.contains("taken by another link"),
        "{}",
        out.stdout
    );
    assert!(link(&pod, "eth1").is_none());
    assert_eq!(ip_files(&node), vec!["10.244.1.2".to_string()]);
    assert_eq!(saved_configs(&node), vec!["ctr-a".to_string()]);
    // ...and the runtime's DEL after the failed ADD leaves the other container's veth alone.
    node.cni(bin(), "DEL", "ctr-c", &path, "eth1", &conf)
        .expect_ok();
    node.cni(bin(), "DEL", "ctr-c", "", "eth1", &conf)
        .expect_ok();
    assert!(
        link(&node.ns, &host_c).is_some(),
        "DEL deleted a veth it did not create"
    );
    Node::sh_in(&node.ns, &["ip", "link", "del", &host_c]);

    // A failure at the last step (a route the kernel refuses, after the veth
    // and the pod's address are in place) takes back everything.
    let mut bad_route = conf.clone();
    bad_route["ipam"]["routes"] = json!([{"dst": "192.168.0.0/16", "gw": "172.31.0.1"}]);
    let out = node.cni(bin(), "ADD", "ctr-d", &path, "eth2", &bad_route);
    assert_eq!(out.code(), 102, "{}", out.stdout);
    assert!(out.stdout.contains("192.168.0.0/16"), "{}", out.stdout);
    assert!(link(&pod, "eth2").is_none());
    assert_eq!(veths(&node.ns).len(), 1);
    assert_eq!(ip_files(&node), vec!["10.244.1.2".to_string()]);
    assert_eq!(saved_configs(&node), vec!["ctr-a".to_string()]);
    node.cni(bin(), "DEL", "ctr-a", &path, "eth0", &conf)
        .expect_ok();
}

/// The plugin's host veth naming (FNV-1a of id, NUL, ifname), to provoke a name clash.
fn fnv(id: &str, ifname: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes().chain([0u8]).chain(ifname.bytes()) {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[test]
fn exhaustion_in_a_slash_30() {
    need_root();
    let node = Node::new("fcni-ex");
    node.write_subnet_env("FLANNEL_NETWORK=10.9.0.0/16\nFLANNEL_SUBNET=10.9.0.1/30\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n");
    let mut conf = node.conf("1.0.0");
    // Also: hairpinMode false leaves the port's hairpin off.
    conf["delegate"]["hairpinMode"] = json!(false);
    let p1 = ScopedNetNs::unique("fcni-exp").unwrap();
    let p2 = ScopedNetNs::unique("fcni-exp").unwrap();
    let res = node
        .cni(bin(), "ADD", "ex1", &netns_path(&p1), "eth0", &conf)
        .expect_ok()
        .json();
    assert_eq!(res["ips"][0]["address"], "10.9.0.2/30");
    let host = res["interfaces"][1]["name"].as_str().unwrap();
    let detail = Node::sh_in(&node.ns, &["bridge", "-d", "link", "show", "dev", host]);
    assert!(detail.contains("hairpin off"), "{detail}");
    let out = node.cni(bin(), "ADD", "ex2", &netns_path(&p2), "eth0", &conf);
    assert_eq!(out.code(), 100);
    assert!(
        out.stdout
            .contains("no IP addresses available in range set"),
        "{}",
        out.stdout
    );
    assert!(link(&p2, "eth0").is_none());
    assert_eq!(veths(&node.ns).len(), 1);
    assert_eq!(saved_configs(&node), vec!["ex1".to_string()]);
    node.cni(bin(), "DEL", "ex1", &netns_path(&p1), "eth0", &conf)
        .expect_ok();
    node.cni(bin(), "ADD", "ex2", &netns_path(&p2), "eth0", &conf)
        .expect_ok();
    node.cni(bin(), "DEL", "ex2", &netns_path(&p2), "eth0", &conf)
        .expect_ok();
}

#[test]
fn fifty_parallel_adds_then_dels() {
    need_root();
    let node = Node::new("fcni-par");
    let conf = node.conf("0.3.1");
    let pods: Vec<ScopedNetNs> = (0..50)
        .map(|_| ScopedNetNs::unique("fcni-parp").unwrap())
        .collect();
    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (node, conf) = (&node, &conf);
                s.spawn(move || {
                    node.cni(
                        bin(),
                        "ADD",
                        &format!("par{i}"),
                        &netns_path(p),
                        "eth0",
                        conf,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().expect_ok().json())
            .collect()
    });
    let addrs: HashSet<String> = results
        .iter()
        .map(|r| r["ips"][0]["address"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(addrs.len(), 50, "duplicate addresses handed out");
    assert_eq!(ip_files(&node).len(), 50);
    assert_eq!(veths(&node.ns).len(), 50);
    std::thread::scope(|s| {
        for (i, p) in pods.iter().enumerate() {
            let (node, conf) = (&node, &conf);
            s.spawn(move || {
                node.cni(
                    bin(),
                    "DEL",
                    &format!("par{i}"),
                    &netns_path(p),
                    "eth0",
                    conf,
                )
                .expect_ok();
            });
        }
    });
    assert!(ip_files(&node).is_empty());
    assert!(veths(&node.ns).is_empty());
    assert!(saved_configs(&node).is_empty());
}

#[test]
fn pods_on_one_node_ping_each_other() {
    need_root();
    let node = Node::new("fcni-ping");
    let conf = node.conf("1.0.0");
    let a = ScopedNetNs::unique("fcni-pinga").unwrap();
    let b = ScopedNetNs::unique("fcni-pingb").unwrap();
    node.cni(bin(), "ADD", "pa", &netns_path(&a), "eth0", &conf)
        .expect_ok();
    let rb = node
        .cni(bin(), "ADD", "pb", &netns_path(&b), "eth0", &conf)
        .expect_ok()
        .json();
    let b_ip = rb["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let out = Node::sh_in(&a, &["ping", "-c", "2", "-W", "2", "-i", "0.2", &b_ip]);
    assert!(out.contains("2 received"), "{out}");
    // The gateway (cni0) answers too.
    let out = Node::sh_in(&a, &["ping", "-c", "1", "-W", "2", "10.244.1.1"]);
    assert!(out.contains("1 received"), "{out}");
    node.cni(bin(), "DEL", "pa", &netns_path(&a), "eth0", &conf)
        .expect_ok();
    node.cni(bin(), "DEL", "pb", &netns_path(&b), "eth0", &conf)
        .expect_ok();
}

#[test]
fn dual_stack_add_and_ping6() {
    need_root();
    let node = Node::new("fcni-ds");
    node.write_subnet_env(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    );
    let conf = node.conf("1.0.0");
    let a = ScopedNetNs::unique("fcni-dsa").unwrap();
    let b = ScopedNetNs::unique("fcni-dsb").unwrap();
    let ra = node
        .cni(bin(), "ADD", "dsa", &netns_path(&a), "eth0", &conf)
        .expect_ok()
        .json();
    assert_eq!(
        ra["ips"],
        json!([
            {"interface": 2, "address": "10.244.1.2/24", "gateway": "10.244.1.1"},
            {"interface": 2, "address": "fd00:10:244:1::2/64", "gateway": "fd00:10:244:1::1"}
        ])
    );
    assert_eq!(
        ra["routes"],
        json!([
            {"dst": "10.244.0.0/16"}, {"dst": "fd00:10:244::/56"},
            {"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "::/0", "gw": "fd00:10:244:1::1"}
        ])
    );
    let mut have = addrs(&node.ns, "cni0");
    have.sort();
    assert_eq!(have, vec![net("10.244.1.1/24"), net("fd00:10:244:1::1/64")]);
    assert!(addrs(&a, "eth0").contains(&net("fd00:10:244:1::2/64")));
    let r = routes(&a);
    assert!(
        r.iter()
            .any(|x| x.dst == net("fd00:10:244::/56") && x.gateway == Some(ip("fd00:10:244:1::1"))),
        "{r:?}"
    );
    assert_eq!(
        std::fs::read(node.net_dir().join("fd00:10:244:1::2")).unwrap(),
        b"dsa\r\neth0"
    );
    assert!(node.net_dir().join("last_reserved_ip.1").exists());
    node.cni(bin(), "ADD", "dsb", &netns_path(&b), "eth0", &conf)
        .expect_ok();
    // The addresses skip duplicate address detection: usable at once, not "tentative".
    for (ns, dev) in [(&a.ns, "eth0"), (&node.ns.ns, "cni0")] {
        let text = Node::sh_in(ns, &["ip", "-6", "addr", "show", "dev", dev]);
        let line = text
            .lines()
            .find(|l| l.contains("fd00:10:244:1::"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(!line.contains("tentative"), "{dev}: {line}");
    }
    let out = Node::sh_in(
        &b,
        &["ping", "-6", "-c", "1", "-W", "2", "fd00:10:244:1::2"],
    );
    let ok = out.contains("1 received");
    assert!(ok, "pod b cannot ping pod a over IPv6");
    let mut cconf = conf.clone();
    cconf["prevResult"] = ra;
    node.cni(bin(), "CHECK", "dsa", &netns_path(&a), "eth0", &cconf)
        .expect_ok();
    node.cni(bin(), "DEL", "dsa", &netns_path(&a), "eth0", &conf)
        .expect_ok();
    node.cni(bin(), "DEL", "dsb", &netns_path(&b), "eth0", &conf)
        .expect_ok();
    assert!(ip_files(&node).is_empty());
    assert!(veths(&node.ns).is_empty());
}

/// Our address files and the reference host-local plugin's are the same
/// format: each side sees, honours and releases the other's reservations.
#[test]
fn ipam_files_interoperate_with_reference_host_local() {
    need_root();
    let host_local = Path::new("/usr/lib/cni/host-local");
    assert!(
        host_local.exists(),
        "needs the reference plugins: apt-get install containernetworking-plugins (scripts/test does)"
    );
    let node = Node::new("fcni-hl");
    let conf = node.conf("1.0.0");
    let hl_conf = json!({
        "cniVersion": "1.0.0", "name": "cbr0", "type": "host-local",
        "ipam": {"type": "host-local", "dataDir": node.ipam_dir(),
                 "ranges": [[{"subnet": "10.244.1.0/24"}]], "routes": [{"dst": "10.244.0.0/16"}]}
    });
    let pod = ScopedNetNs::unique("fcni-hlp").unwrap();
    let path = netns_path(&pod);
    // The reference reserves .2; we must skip it and continue after it.
    let r = node
        .cni(host_local, "ADD", "ref-ctr", &path, "eth9", &hl_conf)
        .expect_ok()
        .json();
    assert_eq!(r["ips"][0]["address"], "10.244.1.2/24");
    let ours = node
        .cni(bin(), "ADD", "our-ctr", &path, "eth0", &conf)
        .expect_ok()
        .json();
    assert_eq!(ours["ips"][0]["address"], "10.244.1.3/24");
    // And the reference continues after ours.
    let r = node
        .cni(host_local, "ADD", "ref-ctr2", &path, "eth8", &hl_conf)
        .expect_ok()
        .json();
    assert_eq!(r["ips"][0]["address"], "10.244.1.4/24");
    // The reference releases our file by container ID + interface name.
    node.cni(host_local, "DEL", "our-ctr", &path, "eth0", &hl_conf)
        .expect_ok();
    assert!(!node.net_dir().join("10.244.1.3").exists());
    // We release the reference's file the same way.
    node.cni(bin(), "DEL", "ref-ctr", &path, "eth9", &conf)
        .expect_ok();
    assert!(!node.net_dir().join("10.244.1.2").exists());
    assert_eq!(ip_files(&node), vec!["10.244.1.4".to_string()]);
    node.cni(host_local, "DEL", "ref-ctr2", &path, "eth8", &hl_conf)
        .expect_ok();
    node.cni(bin(), "DEL", "our-ctr", &path, "eth0", &conf)
        .expect_ok();
    assert!(ip_files(&node).is_empty());
    assert!(veths(&node.ns).is_empty());
}

/// A cni0 that holds another subnet's gateway (the node's lease changed) is
/// reported with the fix, and the failed ADD leaves nothing behind.
#[test]
fn bridge_with_a_stale_address_is_refused() {
    need_root();
    let node = Node::new("fcni-stale");
    Node::sh_in(&node.ns, &["ip", "link", "add", "cni0", "type", "bridge"]);
    Node::sh_in(
        &node.ns,
        &["ip", "addr", "add", "10.244.7.1/24", "dev", "cni0"],
    );
    let pod = ScopedNetNs::unique("fcni-stalep").unwrap();
    let conf = node.conf("1.0.0");
    let out = node.cni(bin(), "ADD", "stale", &netns_path(&pod), "eth0", &conf);
    assert_eq!(out.code(), 102);
    assert!(
        out.stdout.contains("10.244.7.1/24") && out.stdout.contains("ip link del cni0"),
        "{}",
        out.stdout
    );
    assert!(link(&pod, "eth0").is_none());
    assert!(veths(&node.ns).is_empty());
    assert!(ip_files(&node).is_empty());
    assert!(saved_configs(&node).is_empty());
    // A link named cni0 that is not a bridge is refused too.
    Node::sh_in(&node.ns, &["ip", "link", "del", "cni0"]);
    Node::sh_in(
        &node.ns,
        &[
            "ip", "link", "add", "cni0", "type", "veth", "peer", "name", "cni0p",
        ],
    );
    let out = node.cni(bin(), "ADD", "stale", &netns_path(&pod), "eth0", &conf);
    assert_eq!(out.code(), 102);
    assert!(out.stdout.contains("not a bridge"), "{}", out.stdout);
}

/// Our result feeds a chained reference plugin (Debian's `tuning`, which
/// decodes prevResult with the reference library, as portmap does) in every
/// version that has a prevResult, exactly as a conflist runs it.
#[test]
fn result_is_accepted_by_a_chained_reference_plugin() {
    need_root();
    let tuning = Path::new("/usr/lib/cni/tuning");
    assert!(
        tuning.exists(),
        "needs the reference plugins: apt-get install containernetworking-plugins (scripts/test does)"
    );
    let node = Node::new("fcni-chain");
    let pod = ScopedNetNs::unique("fcni-chainp").unwrap();
    let path = netns_path(&pod);
    for v in ["0.3.1", "0.4.0", "1.0.0"] {
        let conf = node.conf(v);
        let ours = node
            .cni(bin(), "ADD", "chain", &path, "eth0", &conf)
            .expect_ok()
            .json();
        let tconf = json!({
            "cniVersion": v, "name": "cbr0", "type": "tuning",
            "sysctl": {"net.ipv4.conf.eth0.rp_filter": "2"},
            "prevResult": ours,
        });
        let out = node
            .cni(tuning, "ADD", "chain", &path, "eth0", &tconf)
            .expect_ok()
            .json();
        assert_eq!(out["ips"], ours["ips"], "{v}");
        assert_eq!(out["interfaces"][2]["name"], "eth0", "{v}");
        let rp = Node::sh_in(&pod, &["cat", "/proc/sys/net/ipv4/conf/eth0/rp_filter"]);
        assert_eq!(rp.trim(), "2");
        node.cni(tuning, "DEL", "chain", &path, "eth0", &tconf)
            .expect_ok();
        node.cni(bin(), "DEL", "chain", &path, "eth0", &conf)
            .expect_ok();
    }
    assert!(ip_files(&node).is_empty());
}

/// Every path below `dir`, recursively, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.display().to_string());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The spec error object: cniVersion, a code, a msg.
fn spec_error(out: &common::Outcome) -> u64 {
    let code = out.code();
    assert!(
        out.json()["cniVersion"].is_string(),
        "error without cniVersion: {}",
        out.stdout
    );
    code
}

/// Issue 14 item 6: CNI_NETNS naming the plugin's own namespace (the
/// node's) would configure the node itself: ADD replaces its default route
/// with the pod's, DEL deletes the node's interface named CNI_IFNAME.
/// Refused with error 4 (CNI_NETNS is an invalid environment variable)
/// before anything changes, whatever path names that namespace.
#[test]
fn the_nodes_own_namespace_as_cni_netns_is_refused_before_any_change() {
    need_root();
    let node = Node::new("fcni-self");
    for argv in [
        &[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ][..],
        &["ip", "addr", "add", "192.168.50.2/24", "dev", "eth0"],
        &["ip", "link", "set", "eth0", "up"],
        &["ip", "link", "set", "peer0", "up"],
        &["ip", "route", "add", "default", "via", "192.168.50.1"],
    ] {
        Node::sh_in(&node.ns, argv);
    }
    let before_routes = routes(&node.ns);
    let before_links: Vec<String> = links(&node.ns).into_iter().map(|l| l.name).collect();
    let conf = node.conf("1.0.0");
    let own = netns_path(&node.ns);
    for path in [own.as_str(), "/proc/self/ns/net"] {
        for (verb, ifname) in [("ADD", "eth1"), ("CHECK", "eth1"), ("DEL", "eth0")] {
            let mut c = conf.clone();
            if verb == "CHECK" {
                c["prevResult"] = json!({"cniVersion": "1.0.0", "interfaces": [], "ips": []});
            }
            let out = node.cni(bin(), verb, "ctr-self", path, ifname, &c);
            assert_eq!(
                spec_error(&out),
                4,
                "{verb} with CNI_NETNS={path}: {}",
                out.stdout
            );
            assert!(
                out.stdout.contains("own network namespace") && out.stdout.contains("CNI_NETNS"),
                "{}",
                out.stdout
            );
        }
    }
    assert_eq!(routes(&node.ns), before_routes, "the node's routes changed");
    let after: Vec<String> = links(&node.ns).into_iter().map(|l| l.name).collect();
    assert_eq!(after, before_links, "the node's links changed");
    assert!(ip_files(&node).is_empty());
    assert!(saved_configs(&node).is_empty());
}

/// Issue 12 "bad input": a container ID, interface name or network name
/// that could lead a path out of dataDir or the IPAM directory, and an
/// oversized stdin, are refused with the spec's error object and its code
/// (4: environment, 7: config), and nothing is written anywhere.
#[test]
fn hostile_ids_names_and_oversized_stdin_write_nothing_and_answer_spec_errors() {
    need_root();
    let node = Node::new("fcni-hostile");
    let pod = ScopedNetNs::unique("fcni-hostilep").unwrap();
    let path = netns_path(&pod);
    let conf = node.conf("1.0.0");
    // An escape would land next to the node's directory.
    let outside = node.dir.0.parent().unwrap().to_path_buf();
    let tag = format!("fcni-escape-{}", std::process::id());
    let before_outside: Vec<String> = tree(&outside)
        .into_iter()
        .filter(|p| p.contains(&tag))
        .collect();
    assert!(before_outside.is_empty());
    let before = tree(&node.dir.0);

    let ids = [
        format!("../../{tag}"),
        format!("a/../../{tag}"),
        format!("/tmp/{tag}"),
        format!(".{tag}"),
        format!("-{tag}"),
        format!("{tag} x"),
        "..".to_string(),
    ];
    for verb in ["ADD", "DEL", "CHECK"] {
        for id in &ids {
            let out = node.cni(bin(), verb, id, &path, "eth0", &conf);
            assert_eq!(
                spec_error(&out),
                4,
                "{verb} CNI_CONTAINERID={id:?}: {}",
                out.stdout
            );
            assert!(out.stdout.contains("CNI_CONTAINERID"), "{}", out.stdout);
        }
        for ifname in [
            "../x",
            "a/b",
            ".",
            "..",
            "eth 0",
            "eth:0",
            "a-name-of-16-chr",
        ] {
            let out = node.cni(bin(), verb, "ctr", &path, ifname, &conf);
            assert_eq!(
                spec_error(&out),
                4,
                "{verb} CNI_IFNAME={ifname:?}: {}",
                out.stdout
            );
            assert!(out.stdout.contains("CNI_IFNAME"), "{}", out.stdout);
        }
        for name in [
            format!("../../{tag}"),
            format!("a/../{tag}"),
            ".".to_string(),
            "..".to_string(),
            format!("-{tag}"),
            format!("{tag}\n"),
        ] {
            let mut c = conf.clone();
            c["name"] = json!(name);
            let out = node.cni(bin(), verb, "ctr", &path, "eth0", &c);
            assert_eq!(spec_error(&out), 7, "{verb} name={name:?}: {}", out.stdout);
            assert!(out.stdout.contains("name"), "{}", out.stdout);
        }
    }
    // A configuration beyond 1 MiB (valid JSON, padded) is refused unread.
    let mut big = conf.to_string().into_bytes();
    big.splice(1..1, std::iter::repeat_n(b' ', 2 << 20));
    let out = node.exec(
        bin(),
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "ctr-big"),
            ("CNI_NETNS", &path),
            ("CNI_IFNAME", "eth0"),
        ],
        &big,
    );
    assert_eq!(spec_error(&out), 7, "{}", out.stdout);
    assert!(out.stdout.contains("larger than"), "{}", out.stdout);

    assert_eq!(
        tree(&node.dir.0),
        before,
        "files appeared in the node's directory"
    );
    let escaped: Vec<String> = tree(&outside)
        .into_iter()
        .filter(|p| p.contains(&tag))
        .collect();
    assert!(escaped.is_empty(), "written outside: {escaped:?}");
    assert!(veths(&node.ns).is_empty());
    assert!(links(&pod).iter().all(|l| l.name == "lo"));
}

/// Issue 12 "bad input": ADD and DEL of the same container ID racing, many
/// times over. Afterwards the attachment is either complete (saved config,
/// address file, host veth, pod interface with that address) or entirely
/// gone; never half of it.
#[test]
fn concurrent_add_and_del_of_one_container_leave_a_consistent_state() {
    need_root();
    let node = Node::new("fcni-race");
    let pod = ScopedNetNs::unique("fcni-racep").unwrap();
    let path = netns_path(&pod);
    let conf = node.conf("1.0.0");
    let (mut attached, mut detached) = (0, 0);
    for round in 0..30 {
        let (add, del) = std::thread::scope(|s| {
            let a = s.spawn(|| node.cni(bin(), "ADD", "ctr-race", &path, "eth0", &conf));
            let d = s.spawn(|| node.cni(bin(), "DEL", "ctr-race", &path, "eth0", &conf));
            (a.join().unwrap(), d.join().unwrap())
        });
        add.expect_ok();
        del.expect_ok();
        let saved = saved_configs(&node).contains(&"ctr-race".to_string());
        let files = ip_files(&node);
        let host = veths(&node.ns);
        let pod_if = link(&pod, "eth0").is_some();
        let state = format!(
            "round {round}: saved {saved}, address files {files:?}, host veths {host:?}, pod eth0 {pod_if}"
        );
        if saved {
            assert_eq!(files.len(), 1, "{state}");
            assert_eq!(host.len(), 1, "{state}");
            assert!(pod_if, "{state}");
            let a = net(&format!("{}/24", files[0]));
            assert!(addrs(&pod, "eth0").contains(&a), "{state}");
            attached += 1;
        } else {
            assert!(files.is_empty() && host.is_empty() && !pod_if, "{state}");
            detached += 1;
        }
        node.cni(bin(), "DEL", "ctr-race", &path, "eth0", &conf)
            .expect_ok();
        assert!(saved_configs(&node).is_empty() && ip_files(&node).is_empty());
        assert!(veths(&node.ns).is_empty() && link(&pod, "eth0").is_none());
    }
    eprintln!("{attached} rounds ended attached, {detached} detached");
}
