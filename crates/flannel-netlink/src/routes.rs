//! Routes of the main table: `ip route`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flannel_core::datapath::{BlackholeRoute, PrefixRoute, Route};
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType, RouteVia,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::addrs::family;
use crate::transport::DUMP;
use crate::{is_absent, Error, Netlink, Result};

/// `ip route` spelling of a route, for error messages.
pub(crate) fn route_cmd(verb: &str, r: &Route) -> String {
    let mut s = format!("ip route {verb} {}", r.dst);
    if let Some(gw) = r.gateway {
        s.push_str(&format!(" via {gw}"));
    }
    if r.oif != 0 {
        s.push_str(&format!(" dev {}", r.oif));
    }
    if r.onlink {
        s.push_str(" onlink");
    }
    s
}

/// A main-table route message of `kind` to `dst` (`ip route ... table
/// main`): for a delete, any protocol and scope match, as `ip route del`
/// does (the kernel compares them only when set); for an add, protocol boot
/// and scope universe. A `dst` with host bits set is refused with the fix.
pub(crate) fn main_route_msg(
    dst: IpNet,
    kind: RouteType,
    op: &str,
    delete: bool,
) -> Result<RouteMessage> {
    if dst != dst.trunc() {
        return Err(Error::Invalid {
            op: op.to_string(),
            detail: format!(
                "dst {dst} has host bits set: use the network address {}",
                dst.trunc()
            ),
        });
    }
    let mut m = RouteMessage::default();
    m.header.address_family = family(&dst.addr());
    m.header.destination_prefix_length = dst.prefix_len();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.kind = kind;
    if delete {
        m.header.protocol = RouteProtocol::Unspec;
        m.header.scope = RouteScope::NoWhere;
    } else {
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = RouteScope::Universe;
    }
    m.attributes
        .push(RouteAttribute::Destination(dst.addr().into()));
    Ok(m)
}

pub(crate) fn route_msg(r: &Route, op: &str, delete: bool) -> Result<RouteMessage> {
    let mut m = main_route_msg(r.dst, RouteType::Unicast, op, delete)?;
    let fam = m.header.address_family;
    if !delete && r.gateway.is_none() {
        m.header.scope = RouteScope::Link;
    }
    if r.onlink {
        m.header.flags = RouteFlags::Onlink;
    }
    match r.gateway {
        Some(gw) if family(&gw) == fam => m.attributes.push(RouteAttribute::Gateway(gw.into())),
        // An IPv4 route with an IPv6 next hop goes as RTA_VIA.
        Some(IpAddr::V6(gw)) => m.attributes.push(RouteAttribute::Via(RouteVia::Inet6(gw))),
        Some(IpAddr::V4(gw)) => {
            return Err(Error::Invalid {
                op: op.to_string(),
                detail: format!(
                    "gateway {gw} is IPv4 but dst {} is IPv6: use an IPv6 gateway",
                    r.dst
                ),
            })
        }
        None => {}
    }
    if r.oif != 0 {
        m.attributes.push(RouteAttribute::Oif(r.oif));
    }
    Ok(m)
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

/// The main-table unicast route a message describes; `None` for anything
/// else (other tables, cached clones, local/broadcast/blackhole types, and
/// multipath or device-less routes, which `Route` cannot express).
pub(crate) fn route_from_msg(m: &RouteMessage) -> Option<Route> {
    if m.header.kind != RouteType::Unicast {
        return None;
    }
    let dst = route_dst(m)?;
    let mut gateway = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Gateway(g) => gateway = route_addr(g),
            RouteAttribute::Via(RouteVia::Inet(g)) => gateway = Some(IpAddr::V4(*g)),
            RouteAttribute::Via(RouteVia::Inet6(g)) => gateway = Some(IpAddr::V6(*g)),
            // RTA_OIF 0 names no device: such a route cannot be written
            // back (`Route` with oif 0 omits RTA_OIF), so it is not one.
            RouteAttribute::Oif(i) => oif = Some(*i).filter(|&i| i != 0),
            RouteAttribute::MultiPath(_) => return None,
            _ => {}
        }
    }
    Some(Route {
        dst,
        gateway,
        oif: oif?,
        onlink: m.header.flags.contains(RouteFlags::Onlink),
    })
}

/// The main-table blackhole route a message describes; `None` for anything
/// else. The kernel leaves RTA_PRIORITY out of IPv4 routes at metric 0.
pub(crate) fn blackhole_from_msg(m: &RouteMessage) -> Option<BlackholeRoute> {
    if m.header.kind != RouteType::BlackHole {
        return None;
    }
    let metric = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Priority(p) => Some(*p),
        _ => None,
    });
    Some(BlackholeRoute {
        dst: route_dst(m)?,
        metric: metric.unwrap_or(0),
    })
}

fn blackhole_cmd(verb: &str, b: &BlackholeRoute) -> String {
    format!("ip route {verb} blackhole {} metric {}", b.dst, b.metric)
}

pub(crate) fn blackhole_msg(b: &BlackholeRoute, op: &str, delete: bool) -> Result<RouteMessage> {
    let mut m = main_route_msg(b.dst, RouteType::BlackHole, op, delete)?;
    m.attributes.push(RouteAttribute::Priority(b.metric));
    Ok(m)
}

/// The destination of any route message (for notifications), main table only.
pub(crate) fn route_dst(m: &RouteMessage) -> Option<IpNet> {
    let unspecified = match m.header.address_family {
        AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    if m.header.flags.contains(RouteFlags::Cloned) {
        return None;
    }
    let mut table = u32::from(m.header.table);
    let mut dst = unspecified;
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => dst = route_addr(d)?,
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    IpNet::new(dst, m.header.destination_prefix_length).ok()
}

/// The kernel's answer to `ip route get DST`: the route a packet to DST
/// would take now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteLookup {
    /// Output interface index.
    pub oif: u32,
    /// The next hop, when not directly connected.
    pub gateway: Option<IpAddr>,
    /// The source address the kernel would pick (`src`).
    pub prefsrc: Option<IpAddr>,
    /// The destination is an address of this host (`local` table): the
    /// packet is delivered here, `oif` is the loopback device.
    pub local: bool,
}

impl Netlink {
    /// `ip route replace DST [via GW] dev OIF [onlink]` in the main table
    /// (protocol boot, scope link without a gateway, universe with one).
    pub fn replace_route(&mut self, route: &Route) -> Result<()> {
        let op = route_cmd("replace", route);
        let m = route_msg(route, &op, false)?;
        self.new_route_msg(m, &op)
    }

    /// `ip route add DST dev OIF proto kernel scope link src SRC`: the
    /// kernel's own prefix route for an address, put back after a stale
    /// flannel route that had replaced it is deleted. Create-only
    /// (`NLM_F_EXCL`): whatever route to DST is there (the kernel's, an
    /// operator's) is left alone. Returns whether the route was added. The
    /// kernel removes it with the address, as it does its own.
    pub fn add_prefix_route(&mut self, r: &PrefixRoute) -> Result<bool> {
        let op = format!(
            "ip route add {} dev {} proto kernel scope link src {}",
            r.dst, r.oif, r.src
        );
        let mut m = main_route_msg(r.dst, RouteType::Unicast, &op, false)?;
        m.header.protocol = RouteProtocol::Kernel;
        m.header.scope = RouteScope::Link;
        m.attributes.push(RouteAttribute::PrefSource(r.src.into()));
        m.attributes.push(RouteAttribute::Oif(r.oif));
        match self.t.request(
            RouteNetlinkMessage::NewRoute(m),
            NLM_F_CREATE | NLM_F_EXCL,
            &op,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_exists() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// RTM_NEWROUTE with replace semantics.
    pub(crate) fn new_route_msg(&mut self, m: RouteMessage, op: &str) -> Result<()> {
        self.t
            .request(
                RouteNetlinkMessage::NewRoute(m),
                NLM_F_CREATE | NLM_F_REPLACE,
                op,
            )
            .map(drop)
    }

    /// RTM_DELROUTE; absent is success.
    pub(crate) fn delete_route_msg(&mut self, m: RouteMessage, op: &str) -> Result<()> {
        match self.t.request(RouteNetlinkMessage::DelRoute(m), 0, op) {
            Err(e) if is_absent(&e) => Ok(()),
            r => r.map(drop),
        }
    }

    /// Every route message of a dump of all tables and both families.
    pub(crate) fn dump_routes(&mut self, op: &str) -> Result<Vec<RouteMessage>> {
        let replies = self.t.request(
            RouteNetlinkMessage::GetRoute(RouteMessage::default()),
            DUMP,
            op,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewRoute(m) => Some(m),
                _ => None,
            })
            .collect())
    }

    /// `ip route del DST [via GW] dev OIF`; absent is success (also when the
    /// device is gone, which took its routes with it).
    pub fn del_route(&mut self, route: &Route) -> Result<()> {
        let op = route_cmd("del", route);
        let m = route_msg(route, &op, true)?;
        self.delete_route_msg(m, &op)
    }

    /// `ip route get DST`: the route the kernel would use for a packet to
    /// `dst` from this host. An unreachable destination is the kernel's
    /// error (ENETUNREACH, EHOSTUNREACH, EINVAL for a blackhole).
    pub fn get_route(&mut self, dst: IpAddr) -> Result<RouteLookup> {
        let op = format!("ip route get {dst}");
        let mut m = RouteMessage::default();
        m.header.address_family = family(&dst);
        m.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
        m.attributes.push(RouteAttribute::Destination(dst.into()));
        let replies = self.t.request(RouteNetlinkMessage::GetRoute(m), 0, &op)?;
        let Some(RouteNetlinkMessage::NewRoute(r)) = replies.first() else {
            return Err(Error::Protocol {
                op,
                detail: "the kernel answered without a route".into(),
            });
        };
        let mut out = RouteLookup {
            oif: 0,
            gateway: None,
            prefsrc: None,
            local: r.header.kind == RouteType::Local,
        };
        for a in &r.attributes {
            match a {
                RouteAttribute::Oif(i) => out.oif = *i,
                RouteAttribute::Gateway(g) => out.gateway = route_addr(g),
                RouteAttribute::Via(RouteVia::Inet(g)) => out.gateway = Some(IpAddr::V4(*g)),
                RouteAttribute::Via(RouteVia::Inet6(g)) => out.gateway = Some(IpAddr::V6(*g)),
                RouteAttribute::PrefSource(p) => out.prefsrc = route_addr(p),
                _ => {}
            }
        }
        if out.oif == 0 {
            return Err(Error::Protocol {
                op,
                detail: "the kernel's route names no output interface".into(),
            });
        }
        Ok(out)
    }

    /// `ip route replace blackhole DST metric METRIC` in the main table
    /// (protocol boot). Replace matches on destination and metric, so this
    /// never touches a route to the same subnet at another metric (cni0's).
    pub fn replace_blackhole_route(&mut self, b: &BlackholeRoute) -> Result<()> {
        let op = blackhole_cmd("replace", b);
        let m = blackhole_msg(b, &op, false)?;
        self.new_route_msg(m, &op)
    }

    /// `ip route del blackhole DST metric METRIC`; absent is success.
    pub fn del_blackhole_route(&mut self, b: &BlackholeRoute) -> Result<()> {
        let op = blackhole_cmd("del", b);
        let m = blackhole_msg(b, &op, true)?;
        self.delete_route_msg(m, &op)
    }

    /// `ip route show table main type blackhole`, IPv4 and IPv6, with each
    /// route's metric.
    pub fn list_blackhole_routes(&mut self) -> Result<Vec<BlackholeRoute>> {
        let all = self.dump_routes("ip route show table main type blackhole")?;
        Ok(all.iter().filter_map(blackhole_from_msg).collect())
    }

    /// `ip route show table main` for unicast routes with an output device,
    /// IPv4 and IPv6. Every such route is listed, including the kernel's own
    /// (`proto kernel` prefix routes, `fe80::/64`): callers keep to the
    /// destinations they manage. Multipath routes are left out.
    pub fn list_routes(&mut self) -> Result<Vec<Route>> {
        let all = self.dump_routes("ip route show table main")?;
        Ok(all.iter().filter_map(route_from_msg).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unicast(oif: u32) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = 24;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.kind = RouteType::Unicast;
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(
                Ipv4Addr::new(10, 244, 2, 0),
            )));
        m.attributes.push(RouteAttribute::Oif(oif));
        m
    }

    /// Found by fuzz/netlink: RTA_OIF 0 was read as a route on device 0,
    /// which `ip route replace` of the same route cannot express (it omits
    /// RTA_OIF), so reading and writing back did not agree.
    #[test]
    fn route_with_oif_zero_is_device_less() {
        assert_eq!(route_from_msg(&unicast(0)), None);
        let r = route_from_msg(&unicast(5)).unwrap();
        assert_eq!(r.oif, 5);
        assert_eq!(
            route_from_msg(&route_msg(&r, "test", false).unwrap()),
            Some(r)
        );
    }
}
