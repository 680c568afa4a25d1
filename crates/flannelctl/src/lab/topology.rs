//! The underlay: a switch namespace with a bridge, and one veth per node
//! whose node end is `ens3` and whose switch end is created directly in the
//! switch namespace (never in the root namespace, not even for an instant).

use std::net::{IpAddr, Ipv4Addr};

use flannel_core::datapath::Route;
use flannel_netlink::netns::{set_sysctl, NetNs};
use flannel_netlink::Netlink;
use ipnet::{IpNet, Ipv4Net};

use super::{
    io_err, nl_err, ns_err, NodeState, Result, NODE_IFACE, UNDERLAY_GATEWAY, UNDERLAY_PREFIX,
};

/// The switch's bridge.
pub(crate) const UNDERLAY_BRIDGE: &str = "br0";

/// Name of a node's port on the switch: `p-master`, `p-node<i>` (<= 15 chars).
pub(crate) fn port_name(node: &NodeState) -> String {
    if node.index == 0 {
        "p-master".to_string()
    } else {
        format!("p-node{}", node.index)
    }
}

/// In the switch namespace: `ip link add br0 type bridge mtu M`,
/// `ip addr add 172.16.1.1/24 dev br0`, `ip link set br0 up`.
pub(crate) fn build_underlay(underlay: &NetNs, mtu: u32) -> Result<()> {
    underlay
        .run(|| -> Result<()> {
            let mut nl = Netlink::open().map_err(nl_err("opening netlink in the underlay"))?;
            let br = nl
                .add_bridge(UNDERLAY_BRIDGE, Some(mtu))
                .map_err(nl_err("ip link add br0 type bridge"))?;
            let gw = Ipv4Net::new(UNDERLAY_GATEWAY, UNDERLAY_PREFIX).expect("valid prefix");
            nl.add_address(br.index, IpNet::V4(gw))
                .map_err(nl_err("ip addr add 172.16.1.1/24 dev br0"))?;
            nl.set_link_up(br.index)
                .map_err(nl_err("ip link set br0 up"))?;
            Ok(())
        })
        .map_err(ns_err("building the underlay switch"))?
}

/// Connects a node to the switch and gives it the seed's underlay config:
/// - in the node: `ip link add ens3 mtu M type veth peer name p-X netns UNDERLAY`,
/// - in the switch: `ip link set p-X master br0 up`,
/// - in the node: `ip addr add IP/24 dev ens3`, `ip link set ens3 up`,
///   `ip route replace default via 172.16.1.1 dev ens3`, and
///   `sysctl net.ipv4.ip_forward=1` (the node's own namespace only).
pub(crate) fn wire_node(
    underlay: &NetNs,
    node_ns: &NetNs,
    node: &NodeState,
    mtu: u32,
) -> Result<()> {
    let port = port_name(node);
    let ctx = |what: &str| format!("{} of {}", what, node.name);
    let underlay_fd = underlay.fd();
    let ens3 = node_ns
        .run(|| -> Result<u32> {
            let mut nl = Netlink::open().map_err(nl_err(ctx("opening netlink")))?;
            let link = nl
                .add_veth(NODE_IFACE, &port, underlay_fd, Some(mtu))
                .map_err(nl_err(ctx(&format!(
                    "ip link add ens3 type veth peer name {port} netns {}",
                    underlay.name
                ))))?;
            Ok(link.index)
        })
        .map_err(ns_err(ctx("creating ens3")))??;

    underlay
        .run(|| -> Result<()> {
            let mut nl = Netlink::open().map_err(nl_err(ctx("opening netlink in the underlay")))?;
            let br = nl
                .link_by_name(super::topology::UNDERLAY_BRIDGE)
                .map_err(nl_err("ip link show br0"))?
                .ok_or_else(|| flannel_netlink::Error::LinkNotFound {
                    op: "ip link show".into(),
                    name: UNDERLAY_BRIDGE.into(),
                })
                .map_err(nl_err("finding the switch bridge"))?;
            let p = nl
                .link_by_name(&port)
                .map_err(nl_err(format!("ip link show {port}")))?
                .ok_or_else(|| flannel_netlink::Error::LinkNotFound {
                    op: "ip link show".into(),
                    name: port.clone(),
                })
                .map_err(nl_err(ctx("finding the switch port")))?;
            nl.set_link_master(p.index, br.index)
                .map_err(nl_err(format!("ip link set {port} master br0")))?;
            nl.set_link_up(p.index)
                .map_err(nl_err(format!("ip link set {port} up")))?;
            Ok(())
        })
        .map_err(ns_err(ctx("plugging into the switch")))??;

    node_ns
        .run(|| -> Result<()> {
            set_sysctl("net/ipv4/ip_forward", "1")
                .map_err(io_err(ctx("sysctl net.ipv4.ip_forward=1")))?;
            let mut nl = Netlink::open().map_err(nl_err(ctx("opening netlink")))?;
            let addr = Ipv4Net::new(node.underlay_ip, UNDERLAY_PREFIX).expect("valid prefix");
            nl.add_address(ens3, IpNet::V4(addr))
                .map_err(nl_err(ctx(&format!("ip addr add {addr} dev ens3"))))?;
            nl.set_link_up(ens3)
                .map_err(nl_err(ctx("ip link set ens3 up")))?;
            let default = Route {
                dst: IpNet::V4(Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).expect("valid prefix")),
                gateway: Some(IpAddr::V4(UNDERLAY_GATEWAY)),
                oif: ens3,
                onlink: false,
            };
            nl.replace_route(&default).map_err(nl_err(ctx(
                "ip route replace default via 172.16.1.1 dev ens3",
            )))?;
            Ok(())
        })
        .map_err(ns_err(ctx("configuring ens3")))??;
    Ok(())
}
