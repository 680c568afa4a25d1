//! The underlay: switch namespaces with a bridge (one, or two joined by a
//! router namespace), the outside host of `--ip-masq`, and one veth per node
//! whose node end is `ens3` and whose switch end is created directly in the
//! switch namespace (never in the root namespace, not even for an instant).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flannel_core::datapath::Route;
use flannel_netlink::netns::{set_sysctl, NetNs};
use flannel_netlink::Netlink;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::kinds::OUTSIDE_PREFIX;
use super::{
    gateway_of, gateway_v6_of, io_err, nl_err, ns_err, segment_net, segment_net_v6, LabState,
    NodeState, Result, Topology, NODE_IFACE, OUTSIDE_GATEWAY, OUTSIDE_GATEWAY_V6, OUTSIDE_IP,
    OUTSIDE_IPV6, UNDERLAY_PREFIX,
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

/// Builds everything but the nodes and returns a line per piece built:
/// - flat: the switch `NAME-underlay` (bridge br0 holding the gateway
///   172.16.1.1/24, and fd00:172:16:1::1/64 with IPv6);
/// - two segments: the switches `NAME-underlay` and `NAME-underlay2` (plain
///   bridges) and `NAME-router` with one leg on each (`seg1` 172.16.1.1/24,
///   `seg2` 172.16.2.1/24, and the IPv6 gateways), forwarding between them;
/// - with `--ip-masq`: `NAME-outside` (eth0 203.0.113.1/24, 2001:db8:203::1/64)
///   behind the gateway namespace (the router, or the flat switch), which
///   then forwards too. The outside host routes only the underlay back, so a
///   pod's packet that was not masqueraded gets no answer from it.
pub(crate) fn build_network(state: &LabState) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    let v6 = state.family.has_v6();
    let mtu = state.mtu;
    let underlay = NetNs::add(&state.underlay_netns).map_err(ns_err("creating the underlay"))?;
    match state.topology {
        Topology::Flat => {
            let mut addrs = vec![IpNet::V4(
                Ipv4Net::new(gateway_of(1), UNDERLAY_PREFIX).expect("valid"),
            )];
            if v6 {
                addrs.push(IpNet::V6(
                    Ipv6Net::new(gateway_v6_of(1), 64).expect("valid"),
                ));
            }
            build_switch(&underlay, mtu, &addrs)?;
            lines.push(format!(
                "switch {}: br0 {}, mtu {mtu}",
                state.underlay_netns,
                join(&addrs)
            ));
        }
        Topology::TwoSegment => {
            build_switch(&underlay, mtu, &[])?;
            let underlay2 = NetNs::add(&state.underlay2_netns())
                .map_err(ns_err("creating the second switch"))?;
            build_switch(&underlay2, mtu, &[])?;
            let router =
                NetNs::add(&state.router_netns()).map_err(ns_err("creating the router"))?;
            enable_forwarding(&router, v6)?;
            for (seg, switch) in [(1u8, &underlay), (2u8, &underlay2)] {
                let mut addrs = vec![IpNet::V4(
                    Ipv4Net::new(gateway_of(seg), UNDERLAY_PREFIX).expect("valid"),
                )];
                if v6 {
                    addrs.push(IpNet::V6(
                        Ipv6Net::new(gateway_v6_of(seg), 64).expect("valid"),
                    ));
                }
                let leg = format!("seg{seg}");
                plug(switch, &router, "p-router", &leg, mtu, &addrs)?;
                lines.push(format!(
                    "router {}: {leg} {} on switch {}",
                    state.router_netns(),
                    join(&addrs),
                    switch.name
                ));
            }
        }
    }
    if state.ip_masq {
        let gw = NetNs::open(&state.gateway_netns()).map_err(ns_err("opening the gateway"))?;
        enable_forwarding(&gw, v6)?;
        let outside =
            NetNs::add(&state.outside_netns()).map_err(ns_err("creating the outside host"))?;
        let mut gw_addrs = vec![IpNet::V4(
            Ipv4Net::new(OUTSIDE_GATEWAY, OUTSIDE_PREFIX).expect("valid"),
        )];
        let mut out_addrs = vec![IpNet::V4(
            Ipv4Net::new(OUTSIDE_IP, OUTSIDE_PREFIX).expect("valid"),
        )];
        if v6 {
            gw_addrs.push(IpNet::V6(
                Ipv6Net::new(OUTSIDE_GATEWAY_V6, 64).expect("valid"),
            ));
            out_addrs.push(IpNet::V6(Ipv6Net::new(OUTSIDE_IPV6, 64).expect("valid")));
        }
        // The gateway's leg: `ip link add outside type veth peer name eth0 netns OUTSIDE`.
        let eth0 = gw
            .run(|| -> Result<u32> {
                let mut nl = Netlink::open().map_err(nl_err("opening netlink in the gateway"))?;
                let l = nl
                    .add_veth("outside", "eth0", outside.fd(), Some(mtu))
                    .map_err(nl_err("ip link add outside type veth peer name eth0"))?;
                for a in &gw_addrs {
                    nl.add_address_nodad(l.index, *a)
                        .map_err(nl_err(format!("ip addr add {a} dev outside")))?;
                }
                nl.set_link_up(l.index)
                    .map_err(nl_err("ip link set outside up"))?;
                Ok(l.index)
            })
            .map_err(ns_err("wiring the outside link"))??;
        let _ = eth0;
        let underlay_v4: Vec<Ipv4Net> = [1u8, 2]
            .into_iter()
            .filter(|s| *s == 1 || state.topology == Topology::TwoSegment)
            .map(segment_net)
            .collect();
        let underlay_v6: Vec<Ipv6Net> = [1u8, 2]
            .into_iter()
            .filter(|s| *s == 1 || state.topology == Topology::TwoSegment)
            .map(segment_net_v6)
            .collect();
        outside
            .run(|| -> Result<()> {
                let mut nl = Netlink::open().map_err(nl_err("opening netlink outside"))?;
                let l = nl
                    .link_by_name("eth0")
                    .map_err(nl_err("ip link show eth0"))?
                    .ok_or_else(|| flannel_netlink::Error::LinkNotFound {
                        op: "ip link show".into(),
                        name: "eth0".into(),
                    })
                    .map_err(nl_err("finding the outside host's eth0"))?;
                for a in &out_addrs {
                    nl.add_address_nodad(l.index, *a)
                        .map_err(nl_err(format!("ip addr add {a} dev eth0")))?;
                }
                nl.set_link_up(l.index)
                    .map_err(nl_err("ip link set eth0 up"))?;
                // Only the underlay is routed back: pod addresses are not.
                for net in &underlay_v4 {
                    let r = Route {
                        dst: IpNet::V4(*net),
                        gateway: Some(IpAddr::V4(OUTSIDE_GATEWAY)),
                        oif: l.index,
                        onlink: false,
                    };
                    nl.replace_route(&r).map_err(nl_err(format!(
                        "ip route replace {net} via {OUTSIDE_GATEWAY}"
                    )))?;
                }
                if v6 {
                    for net in &underlay_v6 {
                        let r = Route {
                            dst: IpNet::V6(*net),
                            gateway: Some(IpAddr::V6(OUTSIDE_GATEWAY_V6)),
                            oif: l.index,
                            onlink: true,
                        };
                        nl.replace_route(&r).map_err(nl_err(format!(
                            "ip -6 route replace {net} via {OUTSIDE_GATEWAY_V6}"
                        )))?;
                    }
                }
                Ok(())
            })
            .map_err(ns_err("configuring the outside host"))??;
        lines.push(format!(
            "outside {}: eth0 {} behind {} ({}), which forwards",
            state.outside_netns(),
            join(&out_addrs),
            state.gateway_netns(),
            join(&gw_addrs)
        ));
    }
    Ok(lines)
}

fn join(addrs: &[IpNet]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `sysctl net.ipv4.ip_forward=1` (and `net.ipv6.conf.all.forwarding=1`)
/// inside `ns` only.
fn enable_forwarding(ns: &NetNs, v6: bool) -> Result<()> {
    ns.run(|| -> Result<()> {
        set_sysctl("net/ipv4/ip_forward", "1").map_err(io_err(format!(
            "sysctl net.ipv4.ip_forward=1 in {}",
            ns.name
        )))?;
        if v6 {
            set_sysctl("net/ipv6/conf/all/forwarding", "1").map_err(io_err(format!(
                "sysctl net.ipv6.conf.all.forwarding=1 in {}",
                ns.name
            )))?;
        }
        Ok(())
    })
    .map_err(ns_err(format!("entering {}", ns.name)))?
}

/// In a switch namespace: `ip link add br0 type bridge mtu M`, its
/// addresses (the gateway, in the flat topology), `ip link set br0 up`.
fn build_switch(switch: &NetNs, mtu: u32, addrs: &[IpNet]) -> Result<()> {
    switch
        .run(|| -> Result<()> {
            let mut nl = Netlink::open().map_err(nl_err("opening netlink in the switch"))?;
            let br = nl
                .add_bridge(UNDERLAY_BRIDGE, Some(mtu))
                .map_err(nl_err("ip link add br0 type bridge"))?;
            for a in addrs {
                nl.add_address_nodad(br.index, *a)
                    .map_err(nl_err(format!("ip addr add {a} dev br0")))?;
            }
            nl.set_link_up(br.index)
                .map_err(nl_err("ip link set br0 up"))?;
            Ok(())
        })
        .map_err(ns_err(format!("building the switch {}", switch.name)))?
}

/// Plugs `host` (a namespace, e.g. the router) into a switch: `ip link add
/// LEG type veth peer name PORT netns SWITCH` from inside `host`, the port
/// enslaved to br0 and up, the leg given `addrs` and brought up.
fn plug(
    switch: &NetNs,
    host: &NetNs,
    port: &str,
    leg: &str,
    mtu: u32,
    addrs: &[IpNet],
) -> Result<()> {
    let switch_fd = switch.fd();
    host.run(|| -> Result<()> {
        let mut nl = Netlink::open().map_err(nl_err("opening netlink"))?;
        let l = nl
            .add_veth(leg, port, switch_fd, Some(mtu))
            .map_err(nl_err(format!(
                "ip link add {leg} type veth peer name {port}"
            )))?;
        for a in addrs {
            nl.add_address_nodad(l.index, *a)
                .map_err(nl_err(format!("ip addr add {a} dev {leg}")))?;
        }
        nl.set_link_up(l.index)
            .map_err(nl_err(format!("ip link set {leg} up")))?;
        Ok(())
    })
    .map_err(ns_err(format!("creating {leg} in {}", host.name)))??;
    attach_port(switch, port)
}

/// In a switch: `ip link set PORT master br0 up`.
fn attach_port(switch: &NetNs, port: &str) -> Result<()> {
    switch
        .run(|| -> Result<()> {
            let mut nl = Netlink::open().map_err(nl_err("opening netlink in the switch"))?;
            let br = nl
                .link_by_name(UNDERLAY_BRIDGE)
                .map_err(nl_err("ip link show br0"))?
                .ok_or_else(|| flannel_netlink::Error::LinkNotFound {
                    op: "ip link show".into(),
                    name: UNDERLAY_BRIDGE.into(),
                })
                .map_err(nl_err("finding the switch bridge"))?;
            let p = nl
                .link_by_name(port)
                .map_err(nl_err(format!("ip link show {port}")))?
                .ok_or_else(|| flannel_netlink::Error::LinkNotFound {
                    op: "ip link show".into(),
                    name: port.to_string(),
                })
                .map_err(nl_err("finding the switch port"))?;
            nl.set_link_master(p.index, br.index)
                .map_err(nl_err(format!("ip link set {port} master br0")))?;
            nl.set_link_up(p.index)
                .map_err(nl_err(format!("ip link set {port} up")))?;
            Ok(())
        })
        .map_err(ns_err(format!("plugging {port} into {}", switch.name)))?
}

/// Connects a node to its segment's switch and gives it the seed's underlay config:
/// - in the node: `ip link add ens3 mtu M type veth peer name p-X netns SWITCH`,
/// - in the switch: `ip link set p-X master br0 up`,
/// - in the node: `ip addr add IP/24 dev ens3` (and its IPv6 address /64),
///   `ip link set ens3 up`, `ip route replace default via 172.16.S.1 dev ens3`
///   (and `ip -6 route replace default via fd00:172:16:S::1`), and
///   `sysctl net.ipv4.ip_forward=1` (and IPv6 forwarding) in the node's own namespace only.
pub(crate) fn wire_node(switch: &NetNs, node_ns: &NetNs, node: &NodeState, mtu: u32) -> Result<()> {
    let port = port_name(node);
    let ctx = |what: &str| format!("{} of {}", what, node.name);
    let switch_fd = switch.fd();
    let ens3 = node_ns
        .run(|| -> Result<u32> {
            let mut nl = Netlink::open().map_err(nl_err(ctx("opening netlink")))?;
            let link = nl
                .add_veth(NODE_IFACE, &port, switch_fd, Some(mtu))
                .map_err(nl_err(ctx(&format!(
                    "ip link add ens3 type veth peer name {port} netns {}",
                    switch.name
                ))))?;
            Ok(link.index)
        })
        .map_err(ns_err(ctx("creating ens3")))??;
    attach_port(switch, &port)?;

    node_ns
        .run(|| -> Result<()> {
            set_sysctl("net/ipv4/ip_forward", "1")
                .map_err(io_err(ctx("sysctl net.ipv4.ip_forward=1")))?;
            if node.underlay_ipv6.is_some() {
                set_sysctl("net/ipv6/conf/all/forwarding", "1")
                    .map_err(io_err(ctx("sysctl net.ipv6.conf.all.forwarding=1")))?;
            }
            let mut nl = Netlink::open().map_err(nl_err(ctx("opening netlink")))?;
            let addr = Ipv4Net::new(node.underlay_ip, UNDERLAY_PREFIX).expect("valid prefix");
            nl.add_address(ens3, IpNet::V4(addr))
                .map_err(nl_err(ctx(&format!("ip addr add {addr} dev ens3"))))?;
            if let Some(v6) = node.underlay_ipv6 {
                let a = IpNet::V6(Ipv6Net::new(v6, 64).expect("valid prefix"));
                nl.add_address_nodad(ens3, a)
                    .map_err(nl_err(ctx(&format!("ip addr add {a} dev ens3 nodad"))))?;
            }
            nl.set_link_up(ens3)
                .map_err(nl_err(ctx("ip link set ens3 up")))?;
            let gw = node.gateway();
            let default = Route {
                dst: IpNet::V4(Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).expect("valid prefix")),
                gateway: Some(IpAddr::V4(gw)),
                oif: ens3,
                onlink: false,
            };
            nl.replace_route(&default).map_err(nl_err(ctx(&format!(
                "ip route replace default via {gw} dev ens3"
            ))))?;
            if node.underlay_ipv6.is_some() {
                let gw6 = gateway_v6_of(node.segment);
                // onlink: the gateway is on ens3's /64, but the kernel may
                // not consider the prefix route usable in the instant after
                // the link came up.
                let default6 = Route {
                    dst: IpNet::V6(Ipv6Net::new(Ipv6Addr::UNSPECIFIED, 0).expect("valid prefix")),
                    gateway: Some(IpAddr::V6(gw6)),
                    oif: ens3,
                    onlink: true,
                };
                nl.replace_route(&default6).map_err(nl_err(ctx(&format!(
                    "ip -6 route replace default via {gw6} dev ens3"
                ))))?;
            }
            Ok(())
        })
        .map_err(ns_err(ctx("configuring ens3")))??;
    Ok(())
}
