//! The lab's choices (backend, address families, topology) and the address
//! plan they imply: which segment a node sits on, its underlay addresses,
//! its pod subnets, and the net-conf.json every daemon reads.
//!
//! Address plan:
//!
//! ```text
//! segment S (1, or 2 in the two-segment topology)
//!   IPv4 underlay   172.16.S.0/24            gateway 172.16.S.1
//!   IPv6 underlay   fd00:172:16:S::/64       gateway fd00:172:16:S::1
//!   node address    last byte as in the seed (.8 master, .14 node1, .13 node2, .(20+I))
//! cluster network   10.244.0.0/16, a /24 per node (10.244.I.0/24)
//!                   fd00:10:244::/56, a /64 per node (fd00:10:244:I::/64)
//! outside (--ip-masq) 203.0.113.1/24 (gateway side .254), 2001:db8:203::1/64 (::fe)
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// The flannel backend the lab's daemons run (net-conf `Backend.Type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backend {
    #[default]
    #[serde(rename = "vxlan")]
    Vxlan,
    #[serde(rename = "host-gw")]
    HostGw,
    #[serde(rename = "udp")]
    Udp,
    #[serde(rename = "wireguard")]
    Wireguard,
}

impl Backend {
    /// Upstream's spelling (`Backend.Type`; also the lease's `BackendType`
    /// as flanneld reads it: udp's leases carry none, read as udp).
    pub fn type_name(self) -> &'static str {
        match self {
            Backend::Vxlan => flannel_core::wire::BACKEND_TYPE_VXLAN,
            Backend::HostGw => flannel_core::wire::BACKEND_TYPE_HOST_GW,
            Backend::Udp => flannel_core::wire::BACKEND_TYPE_UDP,
            Backend::Wireguard => flannel_core::wire::BACKEND_TYPE_WIREGUARD,
        }
    }

    /// The device holding a node's overlay address when the node has no
    /// pod (hence no cni0): `flannel.1`, `flannel0`, `flannel-wg`; host-gw has none.
    pub fn overlay_device(self) -> Option<String> {
        match self {
            Backend::Vxlan => Some(flannel_core::wire::vxlan_device_name(super::VNI)),
            Backend::Udp => Some(flannel_core::wire::UDP_TUN_DEVICE.to_string()),
            Backend::Wireguard => Some(flannel_core::wire::WIREGUARD_DEVICE.to_string()),
            Backend::HostGw => None,
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vxlan" => Ok(Backend::Vxlan),
            "host-gw" => Ok(Backend::HostGw),
            "udp" => Ok(Backend::Udp),
            "wireguard" => Ok(Backend::Wireguard),
            other => Err(format!(
                "unknown backend {other:?}: use `vxlan`, `host-gw`, `udp` or `wireguard`"
            )),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.type_name())
    }
}

/// Address families of the cluster network (net-conf `EnableIPv4` /
/// `EnableIPv6`) and of the underlay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4 only (the seed).
    #[default]
    V4,
    /// IPv6 only: `EnableIPv4: false`, IPv6 underlay.
    V6,
    /// Both: dual-stack pods, both underlay families (vxlan runs over IPv4).
    Dual,
}

impl Family {
    pub fn has_v4(self) -> bool {
        matches!(self, Family::V4 | Family::Dual)
    }
    pub fn has_v6(self) -> bool {
        matches!(self, Family::V6 | Family::Dual)
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
            Family::Dual => "dual-stack",
        })
    }
}

/// How the nodes are wired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    /// One switch, every node on 172.16.1.0/24 (the seed).
    #[default]
    Flat,
    /// Two switches (172.16.1.0/24 and 172.16.2.0/24) joined by a router
    /// namespace; master and odd workers on segment 1, even workers on 2.
    TwoSegment,
}

impl std::str::FromStr for Topology {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "flat" => Ok(Topology::Flat),
            "two-segment" => Ok(Topology::TwoSegment),
            other => Err(format!(
                "unknown topology {other:?}: use `flat` or `two-segment`"
            )),
        }
    }
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Topology::Flat => "flat",
            Topology::TwoSegment => "two-segment",
        })
    }
}

/// The cluster's IPv6 network.
pub const CLUSTER_NETWORK_V6: &str = "fd00:10:244::/56";
/// Port of every lab flanneld's health endpoint, on 127.0.0.1 of its node
/// (`--healthz-ip 127.0.0.1 --healthz-port 10244`).
pub const HEALTHZ_PORT: u16 = 10244;
/// The outside host of `--ip-masq` labs (TEST-NET-3).
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The gateway's address on the outside link.
pub const OUTSIDE_GATEWAY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);
/// Prefix of the outside link.
pub const OUTSIDE_PREFIX: u8 = 24;
/// The outside host's IPv6 address (documentation range).
pub const OUTSIDE_IPV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x203, 0, 0, 0, 0, 1);
/// The gateway's IPv6 address on the outside link.
pub const OUTSIDE_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x203, 0, 0, 0, 0, 0xfe);

/// Segment of a node: 1 in the flat topology; in two segments the master
/// and odd workers on 1, even workers on 2 (so node1 and node2 are split,
/// and node1 and node3 share a segment).
pub fn segment_of(index: u32, topology: Topology) -> u8 {
    match topology {
        Topology::Flat => 1,
        Topology::TwoSegment if index == 0 || index % 2 == 1 => 1,
        Topology::TwoSegment => 2,
    }
}

/// Last byte of a node's underlay addresses: the seed's for master (.8),
/// node1 (.14) and node2 (.13); 20+I for k8s-node<I>, I >= 3.
pub fn host_byte(index: u32) -> u8 {
    let last = match index {
        0 => 8,
        1 => 14,
        2 => 13,
        i => 20 + i,
    };
    assert!(last < 255, "node index {index} out of range");
    last as u8
}

/// A node's IPv4 underlay address on its segment: 172.16.S.<host byte>.
pub fn underlay_ip_on(index: u32, segment: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 16, segment, host_byte(index))
}

/// A node's IPv6 underlay address on its segment: fd00:172:16:S::<host byte>.
pub fn underlay_ipv6_on(index: u32, segment: u8) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0x172,
        0x16,
        segment as u16,
        0,
        0,
        0,
        host_byte(index) as u16,
    )
}

/// The IPv4 underlay subnet of a segment: 172.16.S.0/24.
pub fn segment_net(segment: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(172, 16, segment, 0), 24).expect("valid prefix")
}

/// The IPv6 underlay subnet of a segment: fd00:172:16:S::/64.
pub fn segment_net_v6(segment: u8) -> Ipv6Net {
    Ipv6Net::new(
        Ipv6Addr::new(0xfd00, 0x172, 0x16, segment as u16, 0, 0, 0, 0),
        64,
    )
    .expect("valid prefix")
}

/// The default gateway of a segment: 172.16.S.1.
pub fn gateway_of(segment: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 16, segment, 1)
}

/// The IPv6 default gateway of a segment: fd00:172:16:S::1.
pub fn gateway_v6_of(segment: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x172, 0x16, segment as u16, 0, 0, 0, 1)
}

/// A node's IPv6 pod subnet: fd00:10:244:I::/64.
pub fn node_subnet_v6(index: u32) -> Ipv6Net {
    assert!(index < 256, "node index {index} out of range");
    Ipv6Net::new(
        Ipv6Addr::new(0xfd00, 0x10, 0x244, index as u16, 0, 0, 0, 0),
        64,
    )
    .expect("/64 is valid")
}

/// The net-conf.json of a lab: the cluster networks of its families and
/// the backend with its options.
pub fn net_conf(backend: Backend, direct_routing: bool, family: Family) -> serde_json::Value {
    let backend = match backend {
        Backend::Vxlan if direct_routing => serde_json::json!({
            "Type": "vxlan", "VNI": super::VNI, "DirectRouting": true
        }),
        Backend::Vxlan => serde_json::json!({ "Type": "vxlan", "VNI": super::VNI }),
        Backend::HostGw => serde_json::json!({ "Type": "host-gw" }),
        Backend::Udp => serde_json::json!({ "Type": "udp" }),
        Backend::Wireguard => serde_json::json!({ "Type": "wireguard" }),
    };
    let mut v = serde_json::Map::new();
    if family.has_v4() {
        v.insert("Network".into(), super::CLUSTER_NETWORK.into());
    } else {
        v.insert("EnableIPv4".into(), false.into());
    }
    if family.has_v6() {
        v.insert("EnableIPv6".into(), true.into());
        v.insert("IPv6Network".into(), CLUSTER_NETWORK_V6.into());
    }
    v.insert("Backend".into(), backend);
    serde_json::Value::Object(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_split_node1_and_node2_and_keep_the_seed_addresses() {
        assert_eq!(segment_of(0, Topology::TwoSegment), 1);
        assert_eq!(segment_of(1, Topology::TwoSegment), 1);
        assert_eq!(segment_of(2, Topology::TwoSegment), 2);
        assert_eq!(segment_of(3, Topology::TwoSegment), 1);
        assert_eq!(segment_of(2, Topology::Flat), 1);
        assert_eq!(underlay_ip_on(2, 2), Ipv4Addr::new(172, 16, 2, 13));
        assert_eq!(underlay_ip_on(1, 1), Ipv4Addr::new(172, 16, 1, 14));
        assert_eq!(underlay_ipv6_on(2, 2).to_string(), "fd00:172:16:2::d");
        assert_eq!(gateway_v6_of(1).to_string(), "fd00:172:16:1::1");
        assert_eq!(node_subnet_v6(3).to_string(), "fd00:10:244:3::/64");
        assert!(segment_net(2).contains(&underlay_ip_on(4, 2)));
        assert!(segment_net_v6(2).contains(&underlay_ipv6_on(4, 2)));
    }

    #[test]
    fn net_conf_per_choice_parses_with_the_core() {
        for backend in [
            Backend::Vxlan,
            Backend::HostGw,
            Backend::Udp,
            Backend::Wireguard,
        ] {
            for family in [Family::V4, Family::V6, Family::Dual] {
                let dr = backend == Backend::Vxlan;
                let json = net_conf(backend, dr, family).to_string();
                let cfg =
                    flannel_core::config::parse(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
                assert_eq!(cfg.backend.type_name(), backend.type_name(), "{json}");
                assert_eq!(cfg.enable_ipv4, family.has_v4(), "{json}");
                assert_eq!(cfg.enable_ipv6, family.has_v6(), "{json}");
                if let flannel_core::config::BackendConfig::Vxlan(v) = &cfg.backend {
                    assert!(v.direct_routing);
                }
            }
        }
        let v = net_conf(Backend::Vxlan, false, Family::V4);
        assert_eq!(
            v.to_string(),
            r#"{"Backend":{"Type":"vxlan","VNI":1},"Network":"10.244.0.0/16"}"#
        );
    }

    #[test]
    fn names_parse_and_print() {
        for b in ["vxlan", "host-gw", "udp", "wireguard"] {
            assert_eq!(b.parse::<Backend>().unwrap().to_string(), b);
        }
        assert!("ipip".parse::<Backend>().unwrap_err().contains("host-gw"));
        for t in ["flat", "two-segment"] {
            assert_eq!(t.parse::<Topology>().unwrap().to_string(), t);
        }
        assert!("star".parse::<Topology>().is_err());
    }
}
