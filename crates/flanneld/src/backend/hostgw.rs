//! The host-gw backend: no device, no encapsulation; one route per peer,
//! `ip route replace <peer subnet> via <peer PublicIP> dev <external iface>`.
//!
//! This only works when every peer's PublicIP is on a subnet directly
//! connected to the external interface (one L2 segment): the kernel would
//! refuse a gateway it cannot reach on-link, and forcing `onlink` would send
//! frames to an address nobody answers ARP for. Such peers get no route and
//! an error naming them.
//!
//! With IPv6 the same holds per family: `ip -6 route replace <peer IPv6
//! subnet> via <peer PublicIPv6> dev <external iface>`, the PublicIPv6 on a
//! directly connected IPv6 subnet.
//!
//! Upstream host-gw leases carry no `BackendData`:
//! `{"PublicIP":"172.16.1.14","PublicIPv6":null,"BackendType":"host-gw"}`.

use std::net::{Ipv4Addr, Ipv6Addr};

use flannel_core::datapath::HostGwPeer;
use flannel_core::lease::LeaseAttrs;
use flannel_core::wire;
use flannel_netlink::{Link, Netlink};
use ipnet::IpNet;

/// The backend's `Type` and the lease's `BackendType`.
pub const BACKEND_TYPE: &str = flannel_core::lease::BACKEND_HOST_GW;

/// Errors removing the vxlan backend's leftovers.
#[derive(Debug, thiserror::Error)]
pub enum HostGwError {
    #[error("listing links to find a leftover vxlan device: {0}")]
    ListLinks(#[source] flannel_netlink::Error),
    #[error("removing the leftover vxlan device {device} (ip link del {device}): {source}")]
    DelLink {
        device: String,
        #[source]
        source: flannel_netlink::Error,
    },
}

/// The attributes we publish with our lease: a PublicIP and no backend data.
pub fn lease_attrs(public_ip: Ipv4Addr) -> LeaseAttrs {
    lease_attrs_dual(Some(public_ip), None)
}

/// The attributes we publish with our lease: the PublicIP and/or PublicIPv6
/// of the enabled families, no backend data.
pub fn lease_attrs_dual(public_ip: Option<Ipv4Addr>, public_ipv6: Option<Ipv6Addr>) -> LeaseAttrs {
    LeaseAttrs::new(BACKEND_TYPE, public_ip, public_ipv6)
}

/// Whether `link` is a device the vxlan backend creates (`flannel.<VNI>` or
/// `flannel-v6.<VNI>` of kind vxlan whose name matches its own VNI). A link
/// merely named like one but of another kind is not ours to delete.
pub fn is_vxlan_leftover(link: &Link) -> bool {
    if link.kind.as_deref() != Some("vxlan") {
        return false;
    }
    let Some(info) = &link.vxlan else {
        return false;
    };
    link.name == wire::vxlan_device_name(info.vni)
        || link.name == wire::vxlan_v6_device_name(info.vni)
}

/// Whether a link name may be a vxlan leftover (notifications carry no kind).
pub fn may_be_leftover_name(name: &str) -> bool {
    let vni_suffix = |prefix_of: fn(u32) -> String| {
        let prefix = prefix_of(0);
        let prefix = prefix.trim_end_matches('0');
        name.strip_prefix(prefix)
            .is_some_and(|rest| rest.parse::<u32>().is_ok())
    };
    vni_suffix(wire::vxlan_device_name) || vni_suffix(wire::vxlan_v6_device_name)
}

/// Deletes every vxlan device left by the vxlan backend (`ip link del
/// flannel.<VNI>`): a node switched to host-gw must not keep the old
/// datapath. The kernel removes the routes through a device with it, so the
/// vxlan routes, neighbours and FDB entries go too. Returns a line per
/// device removed; goes on after a failure and reports the first.
pub fn remove_vxlan_leftovers(nl: &mut Netlink) -> Result<Vec<String>, HostGwError> {
    let links = nl.list_links().map_err(HostGwError::ListLinks)?;
    let mut done = Vec::new();
    let mut first_err = None;
    for l in links.iter().filter(|l| is_vxlan_leftover(l)) {
        match nl.del_link(l.index) {
            Ok(()) => done.push(format!(
                "removed {} (ifindex {}), left over from the vxlan backend, with its routes",
                l.name, l.index
            )),
            Err(source) => {
                first_err.get_or_insert(HostGwError::DelLink {
                    device: l.name.clone(),
                    source,
                });
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

/// The error logged when peers cannot be routed to: names each peer subnet
/// and PublicIP, the external interface and its connected subnets.
pub fn unreachable_message(peers: &[HostGwPeer], iface: &str, connected: &[IpNet]) -> String {
    let list = peers
        .iter()
        .map(|p| format!("{} (PublicIP {})", p.subnet, p.public_ip))
        .collect::<Vec<_>>()
        .join(", ");
    let conn = if connected.is_empty() {
        "none".to_string()
    } else {
        connected
            .iter()
            .map(|n| n.trunc().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "host-gw: no route installed for peer subnet(s) {list}: the PublicIP is not on a subnet \
         directly connected to {iface} (connected: {conn}); host-gw needs every node on one L2 \
         segment: move the node onto it, fix its --public-ip/--iface, or use the vxlan backend"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_netlink::VxlanInfo;

    fn vxlan_link(name: &str, vni: u32) -> Link {
        Link {
            index: 5,
            name: name.into(),
            mtu: 1450,
            mac: None,
            kind: Some("vxlan".into()),
            up: true,
            master: None,
            vxlan: Some(VxlanInfo {
                vni,
                local: None,
                link: Some(2),
                port: 8472,
                learning: false,
                gbp: false,
            }),
        }
    }

    #[test]
    fn lease_has_no_backend_data() {
        assert_eq!(
            serde_json::to_string(&lease_attrs(Ipv4Addr::new(172, 16, 1, 14))).unwrap(),
            r#"{"PublicIP":"172.16.1.14","PublicIPv6":null,"BackendType":"host-gw"}"#
        );
    }

    #[test]
    fn only_flannel_vxlan_devices_are_leftovers() {
        assert!(is_vxlan_leftover(&vxlan_link("flannel.1", 1)));
        assert!(is_vxlan_leftover(&vxlan_link("flannel.7", 7)));
        assert!(is_vxlan_leftover(&vxlan_link("flannel-v6.1", 1)));
        assert!(
            !is_vxlan_leftover(&vxlan_link("vxlan0", 1)),
            "an operator's vxlan device"
        );
        assert!(
            !is_vxlan_leftover(&vxlan_link("flannel.2", 1)),
            "name and VNI disagree"
        );
        let mut br = vxlan_link("flannel.1", 1);
        br.kind = Some("bridge".into());
        br.vxlan = None;
        assert!(!is_vxlan_leftover(&br));
        assert!(may_be_leftover_name("flannel.1"));
        assert!(may_be_leftover_name("flannel-v6.42"));
        assert!(!may_be_leftover_name("flannel0"));
        assert!(!may_be_leftover_name("flannel.x"));
        assert!(!may_be_leftover_name("eth0"));
    }

    #[test]
    fn unreachable_message_names_peer_ip_and_connected_subnets() {
        let p = HostGwPeer {
            key: "10.244.3.0-24".parse().unwrap(),
            subnet: "10.244.3.0/24".parse().unwrap(),
            public_ip: "192.168.7.3".parse().unwrap(),
        };
        let m = unreachable_message(&[p], "eth0", &["172.16.1.14/24".parse().unwrap()]);
        assert!(
            m.contains("10.244.3.0/24")
                && m.contains("192.168.7.3")
                && m.contains("172.16.1.0/24")
                && m.contains("eth0"),
            "{m}"
        );
    }
}
