//! Neighbours (`ip neigh`) and the bridge FDB of vxlan devices (`bridge fdb`).

use std::net::IpAddr;

use flannel_core::datapath::{FdbEntry, Neighbour};
use flannel_core::mac::MacAddr;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::addrs::family;
use crate::transport::DUMP;
use crate::{is_absent, Netlink, Result};

pub(crate) fn neigh_addr(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(v) => Some(IpAddr::V4(*v)),
        NeighbourAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        // AF_BRIDGE messages carry NDA_DST as raw bytes; the length tells
        // the family of the vxlan remote.
        NeighbourAddress::Other(b) => match b.len() {
            4 => Some(IpAddr::from(<[u8; 4]>::try_from(b.as_slice()).ok()?)),
            16 => Some(IpAddr::from(<[u8; 16]>::try_from(b.as_slice()).ok()?)),
            _ => None,
        },
        _ => None,
    }
}

pub(crate) fn mac_of(attrs: &[NeighbourAttribute]) -> Option<MacAddr> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => {
            <[u8; 6]>::try_from(b.as_slice()).ok().map(MacAddr)
        }
        _ => None,
    })
}

pub(crate) fn dst_of(attrs: &[NeighbourAttribute]) -> Option<IpAddr> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(d) => neigh_addr(d),
        _ => None,
    })
}

fn neigh_msg(family: AddressFamily, ifindex: u32) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family;
    m.header.ifindex = ifindex;
    m
}

impl Netlink {
    fn dump_neighbours(
        &mut self,
        family: AddressFamily,
        op: &str,
    ) -> Result<Vec<NeighbourMessage>> {
        let replies = self.t.request(
            RouteNetlinkMessage::GetNeighbour(neigh_msg(family, 0)),
            DUMP,
            op,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewNeighbour(m) => Some(m),
                _ => None,
            })
            .collect())
    }

    /// `ip neigh replace IP lladdr MAC dev IFINDEX nud permanent`.
    pub fn replace_neighbour(&mut self, n: &Neighbour) -> Result<()> {
        let op = format!(
            "ip neigh replace {} lladdr {} dev {} nud permanent",
            n.ip, n.mac, n.ifindex
        );
        let mut m = neigh_msg(family(&n.ip), n.ifindex);
        m.header.state = NeighbourState::Permanent;
        m.attributes
            .push(NeighbourAttribute::Destination(n.ip.into()));
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(n.mac.0.to_vec()));
        self.t
            .request(
                RouteNetlinkMessage::NewNeighbour(m),
                NLM_F_CREATE | NLM_F_REPLACE,
                &op,
            )
            .map(drop)
    }

    /// `ip neigh del IP dev IFINDEX`; absent is success.
    pub fn del_neighbour(&mut self, n: &Neighbour) -> Result<()> {
        let op = format!("ip neigh del {} dev {}", n.ip, n.ifindex);
        let mut m = neigh_msg(family(&n.ip), n.ifindex);
        m.attributes
            .push(NeighbourAttribute::Destination(n.ip.into()));
        match self.t.request(RouteNetlinkMessage::DelNeighbour(m), 0, &op) {
            Err(e) if is_absent(&e) => Ok(()),
            r => r.map(drop),
        }
    }

    /// Permanent neighbour entries of a device (`ip neigh show dev IFINDEX nud permanent`).
    pub fn list_neighbours(&mut self, ifindex: u32) -> Result<Vec<Neighbour>> {
        let op = format!("ip neigh show dev {ifindex} nud permanent");
        let mut out = Vec::new();
        for m in self.dump_neighbours(AddressFamily::Unspec, &op)? {
            if m.header.ifindex != ifindex
                || m.header.state != NeighbourState::Permanent
                || m.header.flags.contains(NeighbourFlags::Proxy)
                || !matches!(m.header.family, AddressFamily::Inet | AddressFamily::Inet6)
            {
                continue;
            }
            if let (Some(ip), Some(mac)) = (dst_of(&m.attributes), mac_of(&m.attributes)) {
                out.push(Neighbour { ifindex, ip, mac });
            }
        }
        Ok(out)
    }

    /// The link-layer address `ip neigh show IP dev IFINDEX` gives, in any
    /// state that has one (reachable, stale, permanent, ...); `None` when
    /// the kernel has not resolved it (it would ARP / solicit first).
    pub fn neighbour_of(&mut self, ifindex: u32, ip: IpAddr) -> Result<Option<MacAddr>> {
        let op = format!("ip neigh show {ip} dev {ifindex}");
        for m in self.dump_neighbours(family(&ip), &op)? {
            if m.header.ifindex != ifindex
                || m.header.flags.contains(NeighbourFlags::Proxy)
                || matches!(
                    m.header.state,
                    NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
                )
                || dst_of(&m.attributes) != Some(ip)
            {
                continue;
            }
            if let Some(mac) = mac_of(&m.attributes) {
                return Ok(Some(mac));
            }
        }
        Ok(None)
    }

    /// The port of bridge `bridge` that has learned (or holds) `mac`
    /// (`bridge fdb show br BRIDGE | grep MAC`): the index of the port
    /// link, or `None` while the bridge would flood.
    pub fn bridge_port_of(&mut self, bridge: u32, mac: MacAddr) -> Result<Option<u32>> {
        let op = format!("bridge fdb show br {bridge}");
        for m in self.dump_neighbours(AddressFamily::Bridge, &op)? {
            let master = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Controller(i) => Some(*i), // NDA_MASTER
                _ => None,
            });
            if master == Some(bridge)
                && m.header.ifindex != bridge
                && mac_of(&m.attributes) == Some(mac)
            {
                return Ok(Some(m.header.ifindex));
            }
        }
        Ok(None)
    }

    fn fdb_msg(e: &FdbEntry) -> NeighbourMessage {
        let mut m = neigh_msg(AddressFamily::Bridge, e.ifindex);
        // NTF_SELF: the entry belongs to the vxlan device's own table, not
        // to a bridge it might be enslaved to.
        m.header.flags = NeighbourFlags::Own;
        m.header.state = NeighbourState::Permanent;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(e.mac.0.to_vec()));
        m.attributes
            .push(NeighbourAttribute::Destination(e.dst.into()));
        m
    }

    /// `bridge fdb replace MAC dev IFINDEX dst IP self permanent`.
    pub fn replace_fdb(&mut self, e: &FdbEntry) -> Result<()> {
        let op = format!(
            "bridge fdb replace {} dev {} dst {} self permanent",
            e.mac, e.ifindex, e.dst
        );
        self.t
            .request(
                RouteNetlinkMessage::NewNeighbour(Self::fdb_msg(e)),
                NLM_F_CREATE | NLM_F_REPLACE,
                &op,
            )
            .map(drop)
    }

    /// `bridge fdb del MAC dev IFINDEX dst IP self`; absent is success.
    pub fn del_fdb(&mut self, e: &FdbEntry) -> Result<()> {
        let op = format!(
            "bridge fdb del {} dev {} dst {} self",
            e.mac, e.ifindex, e.dst
        );
        let mut m = Self::fdb_msg(e);
        m.header.state = NeighbourState::None;
        match self.t.request(RouteNetlinkMessage::DelNeighbour(m), 0, &op) {
            Err(err) if is_absent(&err) => Ok(()),
            r => r.map(drop),
        }
    }

    /// Unicast `self` entries with a `dst` on a vxlan device (`bridge fdb show dev IFINDEX`).
    ///
    /// The all-zero default-destination entry and the device's own address
    /// entries (which have no `dst`) are left out. One MAC with several
    /// remotes gives one entry per remote.
    pub fn list_fdb(&mut self, ifindex: u32) -> Result<Vec<FdbEntry>> {
        let op = format!("bridge fdb show dev {ifindex}");
        let mut out = Vec::new();
        // The dump is filtered here rather than by the kernel: its legacy
        // (non-strict) request parsing only filters by bridge port.
        for m in self.dump_neighbours(AddressFamily::Bridge, &op)? {
            if m.header.ifindex != ifindex || m.header.family != AddressFamily::Bridge {
                continue;
            }
            let (Some(mac), Some(dst)) = (mac_of(&m.attributes), dst_of(&m.attributes)) else {
                continue;
            };
            if mac.0 == [0; 6] || mac.0[0] & 1 != 0 {
                continue;
            }
            out.push(FdbEntry { ifindex, mac, dst });
        }
        Ok(out)
    }
}
