//! Links: `ip link` and `bridge link`.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use flannel_core::mac::MacAddr;
use flannel_core::wire::VXLAN_DEFAULT_PORT;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_ECHO, NLM_F_EXCL};
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, InfoVxlan,
    LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::RouteNetlinkMessage;

use crate::transport::DUMP;
use crate::{check_ifname, Error, Link, LinkStats, Netlink, Result, VxlanDevice, VxlanInfo};

/// What [`Netlink::create_veth`] creates (`ip link add HOST ... type veth peer name PEER ...`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct VethRequest<'a> {
    pub host: &'a str,
    pub peer: &'a str,
    pub peer_netns: BorrowedFd<'a>,
    pub mtu: Option<u32>,
    /// Enslave the host end to this bridge and bring it up.
    pub master: Option<u32>,
    /// The peer's MAC (`address`); the kernel picks a random one without it.
    pub peer_mac: Option<MacAddr>,
}

/// A veth pair just created: the host end, and the peer's index in its
/// namespace (the host end's `IFLA_LINK`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethPair {
    pub host: Link,
    pub peer_index: Option<u32>,
}

/// Largest VNI: the vxlan header has 24 bits for it.
const MAX_VNI: u32 = (1 << 24) - 1;

pub(crate) fn link_from_msg(m: LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        mtu: 0,
        mac: None,
        kind: None,
        up: m.header.flags.contains(LinkFlags::Up),
        master: None,
        vxlan: None,
    };
    for attr in m.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Mtu(v) => link.mtu = v,
            LinkAttribute::Address(b) => {
                if let Ok(o) = <[u8; 6]>::try_from(b.as_slice()) {
                    link.mac = Some(MacAddr(o));
                }
            }
            LinkAttribute::Controller(i) if i != 0 => link.master = Some(i),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => link.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Vxlan(v)) => link.vxlan = Some(vxlan_info(v)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn vxlan_info(attrs: Vec<InfoVxlan>) -> VxlanInfo {
    let mut v = VxlanInfo {
        vni: 0,
        local: None,
        link: None,
        port: 0,
        learning: false,
        gbp: false,
    };
    for a in attrs {
        match a {
            InfoVxlan::Id(id) => v.vni = id,
            InfoVxlan::Local(ip) => v.local = Some(IpAddr::V4(ip)),
            InfoVxlan::Local6(ip) => v.local = Some(IpAddr::V6(ip)),
            InfoVxlan::Link(i) if i != 0 => v.link = Some(i),
            InfoVxlan::Port(p) => v.port = p,
            InfoVxlan::Learning(b) => v.learning = b,
            InfoVxlan::Gbp => v.gbp = true,
            _ => {}
        }
    }
    v
}

/// What `add_vxlan` expects to read back for a device it creates.
fn desired_vxlan(dev: &VxlanDevice) -> VxlanInfo {
    VxlanInfo {
        vni: dev.vni,
        local: (!dev.local.is_unspecified()).then_some(dev.local),
        link: (dev.underlay_index != 0).then_some(dev.underlay_index),
        port: if dev.port == 0 {
            VXLAN_DEFAULT_PORT
        } else {
            dev.port
        },
        learning: dev.learning,
        gbp: dev.gbp,
    }
}

fn link_msg(index: u32) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m
}

impl Netlink {
    fn get_link(&mut self, msg: LinkMessage, op: &str) -> Result<Option<Link>> {
        self.get_msg(msg, op).map(|m| m.map(link_from_msg))
    }

    fn get_msg(&mut self, msg: LinkMessage, op: &str) -> Result<Option<LinkMessage>> {
        match self.t.request(RouteNetlinkMessage::GetLink(msg), 0, op) {
            Ok(replies) => Ok(replies.into_iter().find_map(|r| match r {
                RouteNetlinkMessage::NewLink(m) => Some(m),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The raw RTM_NEWLINK of `name` (attributes [`Link`] does not keep).
    fn get_link_msg(&mut self, name: &str, op: &str) -> Result<Option<LinkMessage>> {
        let mut m = link_msg(0);
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.get_msg(m, op)
    }

    fn link_write(&mut self, msg: RouteNetlinkMessage, flags: u16, op: &str) -> Result<()> {
        self.t.request(msg, flags, op).map(drop)
    }

    /// Whether this kernel has WireGuard: `ip link add NAME type wireguard`,
    /// then `ip link del NAME`. `Ok(false)` when the kernel does not know
    /// the link type (EOPNOTSUPP: no `wireguard` module, none loadable).
    /// Creating the link makes the kernel try to load the module, as `ip`
    /// does. `name` must not be in use.
    pub fn has_wireguard(&mut self, name: &str) -> Result<bool> {
        match self.add_wireguard_link(name, None) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(false),
            r => r?,
        };
        if let Some(l) = self.link_by_name(name)? {
            self.del_link(l.index)?;
        }
        Ok(true)
    }

    /// `ip link add NAME [mtu MTU] type wireguard` (down, no key, no
    /// peers: [`crate::wireguard::WireguardNetlink`] configures it).
    /// Returns the new link's index. EOPNOTSUPP: the kernel has no
    /// WireGuard; EEXIST: the name is taken.
    pub fn add_wireguard_link(&mut self, name: &str, mtu: Option<u32>) -> Result<u32> {
        let op = format!("ip link add {name} type wireguard");
        check_ifname(&op, "link name", name)?;
        let mut m = link_msg(0);
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        if let Some(mtu) = mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        m.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Wireguard,
            )]));
        self.link_write(
            RouteNetlinkMessage::NewLink(m),
            NLM_F_CREATE | NLM_F_EXCL,
            &op,
        )?;
        self.link_by_name(name)?
            .map(|l| l.index)
            .ok_or_else(|| Error::LinkNotFound {
                op,
                name: name.to_string(),
            })
    }

    /// `ip link show NAME`; `Ok(None)` when absent.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        let op = format!("ip link show {name}");
        check_ifname(&op, "link name", name)?;
        let mut m = link_msg(0);
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.get_link(m, &op)
    }

    /// `ip -s link show dev INDEX`: the link's packet and byte counters
    /// (`IFLA_STATS64`); `Ok(None)` when the link is gone.
    pub fn link_stats(&mut self, index: u32) -> Result<Option<LinkStats>> {
        let op = format!("ip -s link show dev {index}");
        let Some(m) = self.get_msg(link_msg(index), &op)? else {
            return Ok(None);
        };
        Ok(Some(
            m.attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Stats64(s) => Some(LinkStats {
                        rx_packets: s.rx_packets,
                        tx_packets: s.tx_packets,
                        rx_bytes: s.rx_bytes,
                        tx_bytes: s.tx_bytes,
                        rx_errors: s.rx_errors,
                        tx_errors: s.tx_errors,
                        rx_dropped: s.rx_dropped,
                        tx_dropped: s.tx_dropped,
                    }),
                    _ => None,
                })
                .unwrap_or_default(),
        ))
    }

    /// `ip link show` by index.
    pub fn link_by_index(&mut self, index: u32) -> Result<Option<Link>> {
        if index == 0 {
            return Ok(None);
        }
        self.get_link(link_msg(index), &format!("ip link show dev {index}"))
    }

    /// `ip -d link show`.
    pub fn list_links(&mut self) -> Result<Vec<Link>> {
        let replies = self.t.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            DUMP,
            "ip -d link show",
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewLink(m) => Some(link_from_msg(m)),
                _ => None,
            })
            .collect())
    }

    /// `ip link add NAME type vxlan ...`; returns the new link.
    ///
    /// Idempotent: a vxlan link of that name with the same vxlan attributes
    /// is kept, only its MAC (when one is asked for) and MTU are corrected,
    /// so the routes, neighbours and FDB entries on it survive. A link
    /// of that name with other attributes, or of another kind, is deleted and
    /// created anew: the kernel cannot change a vxlan device's VNI, local
    /// address, underlay or port in place (changelink refuses them), so
    /// recreating is the only way to converge.
    pub fn add_vxlan(&mut self, dev: &VxlanDevice) -> Result<Link> {
        let want = desired_vxlan(dev);
        let mut op = format!("ip link add {} type vxlan id {}", dev.name, dev.vni);
        if let Some(l) = want.local {
            op.push_str(&format!(" local {l}"));
        }
        if let Some(i) = want.link {
            op.push_str(&format!(" dev {i}"));
        }
        op.push_str(&format!(" dstport {}", want.port));
        op.push_str(if dev.learning {
            " learning"
        } else {
            " nolearning"
        });
        if dev.gbp {
            op.push_str(" gbp");
        }
        if dev.mtu != 0 {
            op.push_str(&format!(" mtu {}", dev.mtu));
        }
        if let Some(mac) = dev.mac {
            op.push_str(&format!(" address {mac}"));
        }
        check_ifname(&op, "vxlan device name", &dev.name)?;
        if dev.vni > MAX_VNI {
            return Err(Error::Invalid {
                op,
                detail: format!("vni {} is out of range: use 0..={MAX_VNI}", dev.vni),
            });
        }
        if let Some(mac) = dev.mac {
            if mac.0[0] & 1 != 0 || mac.0 == [0; 6] {
                return Err(Error::Invalid {
                    op,
                    detail: format!("mac {mac} is not a unicast address: clear the lowest bit of the first octet"),
                });
            }
        }

        if let Some(existing) = self.link_by_name(&dev.name)? {
            let same =
                existing.kind.as_deref() == Some("vxlan") && existing.vxlan.as_ref() == Some(&want);
            if same {
                // MAC and MTU can change in place; keeping the device keeps
                // its routes, neighbours and FDB entries.
                if let Some(m) = dev.mac {
                    if existing.mac != Some(m) {
                        self.set_link_address(existing.index, m)?;
                    }
                }
                if dev.mtu != 0 && existing.mtu != dev.mtu {
                    self.set_link_mtu(existing.index, dev.mtu)?;
                }
                return self
                    .link_by_index(existing.index)?
                    .ok_or_else(|| Error::LinkNotFound {
                        op: op.clone(),
                        name: dev.name.clone(),
                    });
            }
            self.del_link(existing.index)?;
        }

        let mut data = vec![InfoVxlan::Id(dev.vni)];
        match want.local {
            Some(IpAddr::V4(a)) => data.push(InfoVxlan::Local(a)),
            Some(IpAddr::V6(a)) => data.push(InfoVxlan::Local6(a)),
            None => {}
        }
        if let Some(i) = want.link {
            data.push(InfoVxlan::Link(i));
        }
        // Emitted in network byte order by the library (IFLA_VXLAN_PORT is __be16).
        data.push(InfoVxlan::Port(want.port));
        data.push(InfoVxlan::Learning(dev.learning));
        if dev.gbp {
            data.push(InfoVxlan::Gbp);
        }
        let mut m = link_msg(0);
        m.attributes.push(LinkAttribute::IfName(dev.name.clone()));
        if dev.mtu != 0 {
            m.attributes.push(LinkAttribute::Mtu(dev.mtu));
        }
        if let Some(mac) = dev.mac {
            m.attributes.push(LinkAttribute::Address(mac.0.to_vec()));
        }
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(data)),
        ]));
        self.link_write(
            RouteNetlinkMessage::NewLink(m),
            NLM_F_CREATE | NLM_F_EXCL,
            &op,
        )?;
        self.link_by_name(&dev.name)?.ok_or(Error::LinkNotFound {
            op,
            name: dev.name.clone(),
        })
    }

    /// `ip link add NAME type bridge` with the MTU; returns the link (existing one if present).
    ///
    /// An existing bridge keeps its settings except the MTU, which is set
    /// when given and different. A link of that name that is not a bridge is
    /// an [`Error::Conflict`]: it is somebody else's, so it is left alone.
    pub fn add_bridge(&mut self, name: &str, mtu: Option<u32>) -> Result<Link> {
        let op = match mtu {
            Some(m) => format!("ip link add {name} mtu {m} type bridge"),
            None => format!("ip link add {name} type bridge"),
        };
        check_ifname(&op, "bridge name", name)?;
        for _ in 0..2 {
            if let Some(l) = self.link_by_name(name)? {
                if l.kind.as_deref() != Some("bridge") {
                    return Err(Error::Conflict {
                        op,
                        detail: format!(
                            "link {name} exists but is of kind {}, not bridge: delete it or choose another bridge name",
                            l.kind.as_deref().unwrap_or("unknown")
                        ),
                    });
                }
                if let Some(m) = mtu {
                    if l.mtu != m {
                        self.set_link_mtu(l.index, m)?;
                        return self.link_by_index(l.index)?.ok_or(Error::LinkNotFound {
                            op,
                            name: name.into(),
                        });
                    }
                }
                return Ok(l);
            }
            let mut m = link_msg(0);
            m.attributes.push(LinkAttribute::IfName(name.to_string()));
            if let Some(v) = mtu {
                m.attributes.push(LinkAttribute::Mtu(v));
            }
            m.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                    InfoKind::Bridge,
                )]));
            match self.link_write(
                RouteNetlinkMessage::NewLink(m),
                NLM_F_CREATE | NLM_F_EXCL,
                &op,
            ) {
                // Somebody created it between our look-up and our add: look again.
                Err(e) if e.is_exists() => continue,
                r => r?,
            }
        }
        self.link_by_name(name)?.ok_or(Error::LinkNotFound {
            op,
            name: name.into(),
        })
    }

    /// `ip link add HOST type veth peer name PEER netns FD`: the peer is
    /// created directly in the namespace `peer_netns`. Returns the host end.
    ///
    /// Not idempotent by nature (the pair is one object): a taken name gives
    /// an [`Error::Kernel`] with EEXIST (see [`Error::is_exists`]).
    pub fn add_veth(
        &mut self,
        host: &str,
        peer: &str,
        peer_netns: BorrowedFd<'_>,
        mtu: Option<u32>,
    ) -> Result<Link> {
        self.create_veth(&VethRequest {
            host,
            peer,
            peer_netns,
            mtu,
            master: None,
            peer_mac: None,
        })
        .map(|v| v.host)
    }

    /// One RTM_NEWLINK for the pair; with `master`, the host end is created
    /// already enslaved and up (the kernel applies `IFLA_MASTER` and
    /// `ifi_flags` at creation). The peer cannot come up here: the kernel
    /// configures it before the two ends are linked, and opening a veth
    /// without its peer fails with ENOTCONN.
    ///
    /// Sent with `NLM_F_ECHO`: since Linux 6.1 the kernel answers a create
    /// with the new link's RTM_NEWLINK (before the ACK), which saves the
    /// look-up that older kernels still need. The host end's `IFLA_LINK` is
    /// the peer's index in its own namespace.
    pub(crate) fn create_veth(&mut self, v: &VethRequest<'_>) -> Result<VethPair> {
        let VethRequest {
            host,
            peer,
            peer_netns,
            mtu,
            master,
            peer_mac,
        } = *v;
        let fd = peer_netns.as_raw_fd();
        let mtu_s = mtu.map(|m| format!(" mtu {m}")).unwrap_or_default();
        let master_s = master
            .map(|m| format!(" master {m} up"))
            .unwrap_or_default();
        let mac_s = peer_mac
            .map(|m| format!(" address {m}"))
            .unwrap_or_default();
        let op = format!(
            "ip link add {host}{mtu_s}{master_s} type veth peer name {peer}{mtu_s}{mac_s} netns {fd}"
        );
        check_ifname(&op, "veth host name", host)?;
        check_ifname(&op, "veth peer name", peer)?;
        let mut p = link_msg(0);
        p.attributes.push(LinkAttribute::IfName(peer.to_string()));
        p.attributes.push(LinkAttribute::NetNsFd(fd));
        if let Some(mac) = peer_mac {
            p.attributes.push(LinkAttribute::Address(mac.0.to_vec()));
        }
        let mut m = link_msg(0);
        m.attributes.push(LinkAttribute::IfName(host.to_string()));
        if let Some(v) = mtu {
            p.attributes.push(LinkAttribute::Mtu(v));
            m.attributes.push(LinkAttribute::Mtu(v));
        }
        if let Some(master) = master {
            m.header.flags = LinkFlags::Up;
            m.header.change_mask = LinkFlags::Up;
            m.attributes.push(LinkAttribute::Controller(master));
        }
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
        ]));
        let replies = self.t.request(
            RouteNetlinkMessage::NewLink(m),
            NLM_F_CREATE | NLM_F_EXCL | NLM_F_ECHO,
            &op,
        )?;
        let echoed = replies.into_iter().find_map(|r| match r {
            RouteNetlinkMessage::NewLink(m) => Some(m),
            _ => None,
        });
        let msg = match echoed {
            Some(m) => m,
            None => self.get_link_msg(host, &op)?.ok_or(Error::LinkNotFound {
                op: op.clone(),
                name: host.into(),
            })?,
        };
        let peer_index = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::Link(i) if *i != 0 => Some(*i),
            _ => None,
        });
        let mut host_link = link_from_msg(msg);
        // The echo is sent before the kernel enslaves the new link.
        if host_link.master.is_none() {
            host_link.master = master;
        }
        Ok(VethPair {
            host: host_link,
            peer_index,
        })
    }

    fn set_link(&mut self, m: LinkMessage, op: &str) -> Result<()> {
        self.link_write(RouteNetlinkMessage::SetLink(m), 0, op)
    }

    /// `ip link set dev INDEX up`.
    pub fn set_link_up(&mut self, index: u32) -> Result<()> {
        let mut m = link_msg(index);
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        self.set_link(m, &format!("ip link set dev {index} up"))
    }

    /// `ip link set dev INDEX down`.
    pub fn set_link_down(&mut self, index: u32) -> Result<()> {
        let mut m = link_msg(index);
        m.header.flags = LinkFlags::empty();
        m.header.change_mask = LinkFlags::Up;
        self.set_link(m, &format!("ip link set dev {index} down"))
    }

    /// `ip link set dev INDEX mtu MTU`.
    pub fn set_link_mtu(&mut self, index: u32, mtu: u32) -> Result<()> {
        let mut m = link_msg(index);
        m.attributes.push(LinkAttribute::Mtu(mtu));
        self.set_link(m, &format!("ip link set dev {index} mtu {mtu}"))
    }

    /// `ip link set dev INDEX address MAC`.
    pub fn set_link_address(&mut self, index: u32, mac: MacAddr) -> Result<()> {
        let mut m = link_msg(index);
        m.attributes.push(LinkAttribute::Address(mac.0.to_vec()));
        self.set_link(m, &format!("ip link set dev {index} address {mac}"))
    }

    /// `ip link set dev INDEX master MASTER` (`nomaster` when `master` is 0).
    pub fn set_link_master(&mut self, index: u32, master: u32) -> Result<()> {
        let mut m = link_msg(index);
        m.attributes.push(LinkAttribute::Controller(master));
        let op = if master == 0 {
            format!("ip link set dev {index} nomaster")
        } else {
            format!("ip link set dev {index} master {master}")
        };
        self.set_link(m, &op)
    }

    /// `ip link set dev INDEX netns FD`.
    pub fn set_link_netns(&mut self, index: u32, netns: BorrowedFd<'_>) -> Result<()> {
        let fd = netns.as_raw_fd();
        let mut m = link_msg(index);
        m.attributes.push(LinkAttribute::NetNsFd(fd));
        self.set_link(m, &format!("ip link set dev {index} netns {fd}"))
    }

    /// `bridge link set dev INDEX hairpin on|off`.
    ///
    /// Sent as bridge-port data in an RTM_NEWLINK on the existing port (what
    /// `ip link set dev X type bridge_slave hairpin on` does): RTM_SETLINK
    /// ignores IFLA_LINKINFO. The link must be enslaved to a bridge.
    pub fn set_hairpin(&mut self, index: u32, on: bool) -> Result<()> {
        let op = format!(
            "bridge link set dev {index} hairpin {}",
            if on { "on" } else { "off" }
        );
        let mut m = link_msg(index);
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(
                on,
            )])),
        ]));
        self.link_write(RouteNetlinkMessage::NewLink(m), 0, &op)
    }

    /// The hairpin setting of a bridge port (`bridge -d link show dev INDEX`);
    /// `None` when the link is absent or not a bridge port.
    pub fn hairpin(&mut self, index: u32) -> Result<Option<bool>> {
        let op = format!("bridge -d link show dev {index}");
        let replies = match self
            .t
            .request(RouteNetlinkMessage::GetLink(link_msg(index)), 0, &op)
        {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(None),
            Err(e) => return Err(e),
        };
        for r in replies {
            let RouteNetlinkMessage::NewLink(m) = r else {
                continue;
            };
            for a in m.attributes {
                let LinkAttribute::LinkInfo(infos) = a else {
                    continue;
                };
                for i in infos {
                    if let LinkInfo::PortData(InfoPortData::BridgePort(p)) = i {
                        for x in p {
                            if let InfoBridgePort::HairpinMode(b) = x {
                                return Ok(Some(b));
                            }
                        }
                    }
                }
            }
        }
        Ok(None)
    }

    /// `ip link del dev INDEX`; absent is success.
    pub fn del_link(&mut self, index: u32) -> Result<()> {
        let op = format!("ip link del dev {index}");
        if index == 0 {
            return Err(Error::Invalid {
                op,
                detail: "index 0 names no link: pass the index of the link to delete".into(),
            });
        }
        match self.link_write(RouteNetlinkMessage::DelLink(link_msg(index)), 0, &op) {
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
            r => r,
        }
    }
}
