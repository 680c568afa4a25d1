//! Root tests of `ipMasq` (flanneld without `--ip-masq`, FLANNEL_IPMASQ=false):
//! the `flannel` binary writes the same nat rules as the reference bridge
//! plugin (Debian's containernetworking-plugins), and each plugin's DEL
//! removes what the other wrote. Everything runs in node namespaces of the
//! test; nothing touches the root namespace.

mod common;

use std::path::Path;

use common::{need_root, netns_path, Node};
use flannel_netlink::netns::{NetNs, ScopedNetNs};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_flannel");
const NO_MASQ_ENV: &str =
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";

/// `iptables-save -t nat` lines of CNI chains and jumps, in order.
fn cni_nat(ns: &NetNs) -> Vec<String> {
    Node::sh_in(ns, &["iptables-save", "-t", "nat"])
        .lines()
        .filter(|l| l.contains("CNI-"))
        .map(str::to_string)
        .collect()
}

fn reference_conf(node: &Node) -> serde_json::Value {
    json!({
        "cniVersion": "1.0.0", "name": "cbr0", "type": "bridge", "bridge": "cni0",
        "isGateway": true, "ipMasq": true,
        "ipam": {"type": "host-local", "dataDir": node.ipam_dir(),
                 "ranges": [[{"subnet": "10.244.1.0/24"}]]}
    })
}

#[test]
fn ip_masq_rules_match_the_reference_bridge_plugin_both_ways() {
    need_root();
    let bridge = Path::new("/usr/lib/cni/bridge");
    assert!(
        bridge.exists(),
        "needs the reference plugins: apt-get install containernetworking-plugins (scripts/test does)"
    );
    let ours = Node::new("fcni-mq");
    ours.write_subnet_env(NO_MASQ_ENV);
    let reference = Node::new("fcni-mqr");
    let pod_a = ScopedNetNs::unique("fcni-mqa").unwrap();
    let pod_b = ScopedNetNs::unique("fcni-mqb").unwrap();
    let pod_c = ScopedNetNs::unique("fcni-mqc").unwrap();
    let conf = ours.conf("1.0.0");
    let rconf = reference_conf(&reference);

    // Same network name, container ID and address: the very same rules.
    let r = ours
        .cni(
            Path::new(BIN),
            "ADD",
            "ctr-a",
            &netns_path(&pod_a),
            "eth0",
            &conf,
        )
        .expect_ok()
        .json();
    assert_eq!(r["ips"][0]["address"], "10.244.1.2/24");
    reference
        .cni(bridge, "ADD", "ctr-a", &netns_path(&pod_b), "eth0", &rconf)
        .expect_ok();
    let got = cni_nat(&ours.ns);
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got, cni_nat(&reference.ns));
    assert!(got.iter().any(|l| l.starts_with(
        "-A POSTROUTING -s 10.244.1.2/32 -m comment --comment \"name: \\\"cbr0\\\" id: \\\"ctr-a\\\"\" -j CNI-"
    )));

    // The reference DEL removes what we wrote (a downgrade) ...
    ours.cni(bridge, "DEL", "ctr-a", &netns_path(&pod_a), "eth0", &json!({
        "cniVersion": "1.0.0", "name": "cbr0", "type": "bridge", "bridge": "cni0", "ipMasq": true,
        "ipam": {"type": "host-local", "dataDir": ours.dir.0.join("unused-ipam"),
                 "ranges": [[{"subnet": "10.244.1.0/24"}]]}
    }))
    .expect_ok();
    assert_eq!(cni_nat(&ours.ns), Vec::<String>::new());
    // ... and our DEL finishes the rest without complaint.
    ours.cni(
        Path::new(BIN),
        "DEL",
        "ctr-a",
        &netns_path(&pod_a),
        "eth0",
        &conf,
    )
    .expect_ok();

    // Our ADD again, our DEL: nothing left (a chain of another pod stays).
    ours.cni(
        Path::new(BIN),
        "ADD",
        "ctr-c",
        &netns_path(&pod_a),
        "eth0",
        &conf,
    )
    .expect_ok();
    ours.cni(
        Path::new(BIN),
        "ADD",
        "ctr-d",
        &netns_path(&pod_c),
        "eth0",
        &conf,
    )
    .expect_ok();
    assert_eq!(cni_nat(&ours.ns).len(), 8);
    ours.cni(
        Path::new(BIN),
        "DEL",
        "ctr-c",
        &netns_path(&pod_a),
        "eth0",
        &conf,
    )
    .expect_ok();
    let left = cni_nat(&ours.ns);
    assert_eq!(left.len(), 4, "{left:?}");
    assert!(left.iter().all(|l| !l.contains("ctr-c")) && left.iter().any(|l| l.contains("ctr-d")));
    ours.cni(
        Path::new(BIN),
        "DEL",
        "ctr-d",
        &netns_path(&pod_c),
        "eth0",
        &conf,
    )
    .expect_ok();
    assert_eq!(cni_nat(&ours.ns), Vec::<String>::new());
    reference
        .cni(bridge, "DEL", "ctr-a", &netns_path(&pod_b), "eth0", &rconf)
        .expect_ok();
    assert_eq!(cni_nat(&reference.ns), Vec::<String>::new());

    // With FLANNEL_IPMASQ=true (flanneld masquerades) the plugin writes nothing.
    ours.write_subnet_env(common::SUBNET_ENV);
    ours.cni(
        Path::new(BIN),
        "ADD",
        "ctr-e",
        &netns_path(&pod_a),
        "eth0",
        &conf,
    )
    .expect_ok();
    assert_eq!(cni_nat(&ours.ns), Vec::<String>::new());
    ours.cni(
        Path::new(BIN),
        "DEL",
        "ctr-e",
        &netns_path(&pod_a),
        "eth0",
        &conf,
    )
    .expect_ok();
}
