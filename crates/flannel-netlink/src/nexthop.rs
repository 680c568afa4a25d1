//! Nexthop objects: `ip nexthop`, and routes that use one (`ip route ... nhid ID`).
//!
//! netlink-packet-route (0.34) decodes `RTA_NH_ID` in routes but has no
//! nexthop messages (`RTM_NEWNEXTHOP`/`RTM_DELNEXTHOP`/`RTM_GETNEXTHOP`,
//! `struct nhmsg` and the `NHA_*` attributes of `linux/nexthop.h`), so the
//! few this crate needs are encoded here.
//!
//! Why they exist here: every IPv4 route with its own gateway gets its own
//! `fib_info`, and the kernel hashes `fib_info`s without the gateway, so all
//! those of one device land in one hash chain and adding N such routes costs
//! O(N²). A route that names a nexthop object by id shares nothing with the
//! others' lookups: 20,000 routes go in in a tenth of the time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use netlink_packet_core::{
    DecodeError, NetlinkDeserializable, NetlinkHeader, NetlinkSerializable, NlasIterator,
    NLM_F_CREATE, NLM_F_REPLACE,
};
use netlink_packet_route::route::{RouteAttribute, RouteType};

use crate::addrs::family;
use crate::routes::{main_route_msg, route_dst, route_from_msg};
use crate::transport::DUMP;
use crate::{is_absent, Error, Netlink, Result};

pub(crate) const RTM_NEWNEXTHOP: u16 = 104;
pub(crate) const RTM_DELNEXTHOP: u16 = 105;
pub(crate) const RTM_GETNEXTHOP: u16 = 106;

const NHA_ID: u16 = 1;
const NHA_GROUP: u16 = 2;
const NHA_BLACKHOLE: u16 = 4;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const NHA_FDB: u16 = 11;
/// `RTNH_F_ONLINK` in `nh_flags`.
const RTNH_F_ONLINK: u32 = 4;
/// `sizeof(struct nhmsg)`: family, scope, protocol, reserved (u8 each), flags (u32).
const NHMSG_LEN: usize = 8;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// A single-path nexthop object: `ip nexthop add id ID via GATEWAY dev OIF
/// [onlink] proto PROTOCOL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nexthop {
    /// `NHA_ID`, never 0.
    pub id: u32,
    /// `NHA_GATEWAY`; `None` for a device-only nexthop (`dev OIF`).
    pub gateway: Option<IpAddr>,
    /// `NHA_OIF`: output interface index.
    pub oif: u32,
    /// `RTNH_F_ONLINK`: the gateway is on the link without a connected route.
    pub onlink: bool,
    /// `nh_protocol` (`proto`): who installed it; the kernel keeps it as given.
    pub protocol: u8,
}

/// A main-table route as the kernel holds it, with the nexthop object it
/// names, if any (`ip route show` "nhid ID").
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteEntry {
    /// The route itself; for a route with a nexthop object, the object's
    /// gateway, device and onlink flag.
    pub route: flannel_core::datapath::Route,
    /// `RTA_NH_ID`.
    pub nhid: Option<u32>,
}

/// One nexthop message: `struct nhmsg` and its attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NexthopMessage {
    pub family: u8,
    pub scope: u8,
    pub protocol: u8,
    pub flags: u32,
    pub attrs: Vec<NexthopAttr>,
}

/// The `NHA_*` attributes this crate reads or writes; the others are kept
/// as raw (kind, value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NexthopAttr {
    Id(u32),
    Oif(u32),
    Gateway(IpAddr),
    Other(u16, Vec<u8>),
}

impl NexthopAttr {
    fn kind(&self) -> u16 {
        match self {
            NexthopAttr::Id(_) => NHA_ID,
            NexthopAttr::Oif(_) => NHA_OIF,
            NexthopAttr::Gateway(_) => NHA_GATEWAY,
            NexthopAttr::Other(k, _) => *k,
        }
    }
    fn value(&self) -> Vec<u8> {
        match self {
            NexthopAttr::Id(v) | NexthopAttr::Oif(v) => v.to_ne_bytes().to_vec(),
            NexthopAttr::Gateway(IpAddr::V4(a)) => a.octets().to_vec(),
            NexthopAttr::Gateway(IpAddr::V6(a)) => a.octets().to_vec(),
            NexthopAttr::Other(_, v) => v.clone(),
        }
    }
}

/// The nexthop messages, as [`crate::transport::Transport::request`] sends
/// and receives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NexthopNetlinkMessage {
    New(NexthopMessage),
    Del(NexthopMessage),
    Get(NexthopMessage),
}

impl NexthopNetlinkMessage {
    fn inner(&self) -> &NexthopMessage {
        match self {
            Self::New(m) | Self::Del(m) | Self::Get(m) => m,
        }
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

impl NetlinkSerializable for NexthopNetlinkMessage {
    fn message_type(&self) -> u16 {
        match self {
            Self::New(_) => RTM_NEWNEXTHOP,
            Self::Del(_) => RTM_DELNEXTHOP,
            Self::Get(_) => RTM_GETNEXTHOP,
        }
    }

    fn buffer_len(&self) -> usize {
        NHMSG_LEN
            + self
                .inner()
                .attrs
                .iter()
                .map(|a| align4(4 + a.value().len()))
                .sum::<usize>()
    }

    fn serialize(&self, buf: &mut [u8]) {
        let m = self.inner();
        buf[0] = m.family;
        buf[1] = m.scope;
        buf[2] = m.protocol;
        buf[3] = 0;
        buf[4..8].copy_from_slice(&m.flags.to_ne_bytes());
        let mut off = NHMSG_LEN;
        for a in &m.attrs {
            let v = a.value();
            let len = 4 + v.len();
            buf[off..off + 2].copy_from_slice(&(len as u16).to_ne_bytes());
            buf[off + 2..off + 4].copy_from_slice(&a.kind().to_ne_bytes());
            buf[off + 4..off + len].copy_from_slice(&v);
            buf[off + len..off + align4(len)].fill(0);
            off += align4(len);
        }
    }
}

fn u32_of(v: &[u8], what: &str) -> std::result::Result<u32, DecodeError> {
    v.try_into()
        .map(u32::from_ne_bytes)
        .map_err(|_| DecodeError::from(format!("{what}: {} bytes, want 4", v.len())))
}

impl NetlinkDeserializable for NexthopNetlinkMessage {
    type Error = DecodeError;

    fn deserialize(
        header: &NetlinkHeader,
        payload: &[u8],
    ) -> std::result::Result<Self, Self::Error> {
        if payload.len() < NHMSG_LEN {
            return Err(format!("nhmsg: {} bytes, want {NHMSG_LEN}", payload.len()).into());
        }
        let mut m = NexthopMessage {
            family: payload[0],
            scope: payload[1],
            protocol: payload[2],
            flags: u32::from_ne_bytes(payload[4..8].try_into().expect("4 bytes")),
            attrs: Vec::new(),
        };
        for nla in NlasIterator::new(&payload[NHMSG_LEN..]) {
            let nla = nla?;
            let v = nla.value();
            m.attrs.push(match nla.kind() {
                NHA_ID => NexthopAttr::Id(u32_of(v, "NHA_ID")?),
                NHA_OIF => NexthopAttr::Oif(u32_of(v, "NHA_OIF")?),
                NHA_GATEWAY => match v.len() {
                    4 => NexthopAttr::Gateway(IpAddr::V4(Ipv4Addr::from(
                        <[u8; 4]>::try_from(v).expect("4 bytes"),
                    ))),
                    16 => NexthopAttr::Gateway(IpAddr::V6(Ipv6Addr::from(
                        <[u8; 16]>::try_from(v).expect("16 bytes"),
                    ))),
                    n => return Err(format!("NHA_GATEWAY: {n} bytes, want 4 or 16").into()),
                },
                k => NexthopAttr::Other(k, v.to_vec()),
            });
        }
        match header.message_type {
            RTM_NEWNEXTHOP => Ok(Self::New(m)),
            RTM_DELNEXTHOP => Ok(Self::Del(m)),
            RTM_GETNEXTHOP => Ok(Self::Get(m)),
            t => Err(format!("message type {t} is not a nexthop message").into()),
        }
    }
}

/// `ip nexthop` spelling, for errors and logs.
pub(crate) fn nexthop_cmd(verb: &str, nh: &Nexthop) -> String {
    let mut s = format!("ip nexthop {verb} id {}", nh.id);
    if let Some(gw) = nh.gateway {
        s.push_str(&format!(" via {gw}"));
    }
    s.push_str(&format!(" dev {}", nh.oif));
    if nh.onlink {
        s.push_str(" onlink");
    }
    s.push_str(&format!(" proto {}", nh.protocol));
    s
}

/// The request that creates or replaces `nh`. The kernel wants scope 0 and
/// only user flags in the header of a request (it computes the scope).
pub(crate) fn new_nexthop_msg(nh: &Nexthop) -> Result<NexthopMessage> {
    let op = nexthop_cmd("replace", nh);
    if nh.id == 0 {
        return Err(Error::Invalid {
            op,
            detail: "id 0 asks the kernel to pick one: give an id of 1 or more".into(),
        });
    }
    if nh.oif == 0 {
        return Err(Error::Invalid {
            op,
            detail: "dev is missing: give the output interface index".into(),
        });
    }
    let mut m = NexthopMessage {
        family: match nh.gateway {
            Some(IpAddr::V4(_)) => AF_INET,
            Some(IpAddr::V6(_)) => AF_INET6,
            None => AF_INET,
        },
        protocol: nh.protocol,
        flags: if nh.onlink { RTNH_F_ONLINK } else { 0 },
        ..NexthopMessage::default()
    };
    // iproute2's order, so a request compares byte for byte with its.
    m.attrs.push(NexthopAttr::Id(nh.id));
    if let Some(gw) = nh.gateway {
        m.attrs.push(NexthopAttr::Gateway(gw));
    }
    m.attrs.push(NexthopAttr::Oif(nh.oif));
    Ok(m)
}

/// The single-path nexthop a message describes; `None` for groups,
/// blackholes and FDB nexthops, which [`Nexthop`] cannot express.
pub(crate) fn nexthop_from_msg(m: &NexthopMessage) -> Option<Nexthop> {
    let mut nh = Nexthop {
        id: 0,
        gateway: None,
        oif: 0,
        onlink: m.flags & RTNH_F_ONLINK != 0,
        protocol: m.protocol,
    };
    for a in &m.attrs {
        match a {
            NexthopAttr::Id(i) => nh.id = *i,
            NexthopAttr::Oif(i) => nh.oif = *i,
            NexthopAttr::Gateway(g) => nh.gateway = Some(*g),
            NexthopAttr::Other(NHA_GROUP | NHA_BLACKHOLE | NHA_FDB, _) => return None,
            NexthopAttr::Other(..) => {}
        }
    }
    (nh.id != 0 && nh.oif != 0).then_some(nh)
}

/// The id a nexthop notification or reply names.
pub(crate) fn nexthop_id(m: &NexthopMessage) -> Option<u32> {
    m.attrs.iter().find_map(|a| match a {
        NexthopAttr::Id(i) => Some(*i),
        _ => None,
    })
}

impl Netlink {
    /// `ip nexthop replace id ID via GW dev OIF [onlink] proto PROTOCOL`:
    /// creates the object or rewrites it in place (the routes that use it
    /// follow at once).
    pub fn replace_nexthop(&mut self, nh: &Nexthop) -> Result<()> {
        let op = nexthop_cmd("replace", nh);
        let m = new_nexthop_msg(nh)?;
        self.t
            .request(
                NexthopNetlinkMessage::New(m),
                NLM_F_CREATE | NLM_F_REPLACE,
                &op,
            )
            .map(drop)
    }

    /// `ip nexthop del id ID`; absent is success. The kernel deletes the
    /// routes that use it too, without a route notification for IPv4.
    pub fn del_nexthop(&mut self, id: u32) -> Result<()> {
        let op = format!("ip nexthop del id {id}");
        let m = NexthopMessage {
            family: AF_UNSPEC,
            attrs: vec![NexthopAttr::Id(id)],
            ..NexthopMessage::default()
        };
        match self.t.request(NexthopNetlinkMessage::Del(m), 0, &op) {
            Err(e) if is_absent(&e) => Ok(()),
            r => r.map(drop),
        }
    }

    /// `ip nexthop show`: every single-path nexthop object (groups,
    /// blackholes and FDB nexthops are left out). Fails with the kernel's
    /// error (EOPNOTSUPP, EINVAL) on kernels without nexthop objects (before
    /// 5.3), which makes it the probe for them.
    pub fn list_nexthops(&mut self) -> Result<Vec<Nexthop>> {
        let m = NexthopMessage::default();
        let replies = self
            .t
            .request(NexthopNetlinkMessage::Get(m), DUMP, "ip nexthop show")?;
        Ok(replies
            .iter()
            .filter_map(|r| match r {
                NexthopNetlinkMessage::New(m) => nexthop_from_msg(m),
                _ => None,
            })
            .collect())
    }

    /// `ip route replace DST nhid ID` in the main table (protocol boot,
    /// scope universe).
    pub fn replace_route_nhid(&mut self, dst: IpNet, nhid: u32) -> Result<()> {
        let op = format!("ip route replace {dst} nhid {nhid}");
        let mut m = main_route_msg(dst, RouteType::Unicast, &op, false)?;
        m.attributes.push(RouteAttribute::NhId(nhid));
        self.new_route_msg(m, &op)
    }

    /// `ip route del DST nhid ID`: only the route that names this nexthop
    /// object; absent is success.
    pub fn del_route_nhid(&mut self, dst: IpNet, nhid: u32) -> Result<()> {
        let op = format!("ip route del {dst} nhid {nhid}");
        let mut m = main_route_msg(dst, RouteType::Unicast, &op, true)?;
        m.attributes.push(RouteAttribute::NhId(nhid));
        self.delete_route_msg(m, &op)
    }

    /// `ip route show table main` like [`Netlink::list_routes`], with the
    /// nexthop object each route names. With `net.ipv4.nexthop_compat_mode`
    /// 0 the kernel leaves the gateway and device out of such routes: they
    /// are then taken from the object (one nexthop dump).
    pub fn list_route_entries(&mut self) -> Result<Vec<RouteEntry>> {
        let all = self.dump_routes("ip route show table main")?;
        let mut out = Vec::with_capacity(all.len());
        let mut bare = Vec::new();
        for m in &all {
            if m.header.kind != RouteType::Unicast {
                continue;
            }
            let nhid = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::NhId(i) => Some(*i),
                _ => None,
            });
            match (route_from_msg(m), nhid) {
                (Some(route), nhid) => out.push(RouteEntry { route, nhid }),
                (None, Some(id)) => {
                    if let Some(dst) = route_dst(m) {
                        bare.push((dst, id));
                    }
                }
                (None, None) => {}
            }
        }
        if !bare.is_empty() {
            let nhs: std::collections::HashMap<u32, Nexthop> = self
                .list_nexthops()?
                .into_iter()
                .map(|n| (n.id, n))
                .collect();
            for (dst, id) in bare {
                let Some(nh) = nhs.get(&id) else { continue };
                let Some(gw) = nh.gateway.filter(|g| family(g) == family(&dst.addr())) else {
                    continue;
                };
                out.push(RouteEntry {
                    route: flannel_core::datapath::Route {
                        dst,
                        gateway: Some(gw),
                        oif: nh.oif,
                        onlink: nh.onlink,
                    },
                    nhid: Some(id),
                });
            }
        }
        Ok(out)
    }
}

/// Whether a dump or write failed because the kernel has no nexthop
/// objects (EOPNOTSUPP, or EINVAL for an unknown message type).
pub fn is_unsupported(e: &Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::EAFNOSUPPORT)
    )
}

/// Decodes a raw notification of the nexthop group (`RTNLGRP_NEXTHOP`):
/// (id, deleted).
pub(crate) fn nexthop_notification(raw: &[u8]) -> Option<std::result::Result<(u32, bool), ()>> {
    let ty = netlink_packet_core::NetlinkBuffer::new(raw).message_type();
    if ty != RTM_NEWNEXTHOP && ty != RTM_DELNEXTHOP {
        return None;
    }
    let msg = match netlink_packet_core::NetlinkMessage::<NexthopNetlinkMessage>::deserialize(raw) {
        Ok(m) => m,
        Err(_) => return Some(Err(())),
    };
    Some(match msg.payload {
        netlink_packet_core::NetlinkPayload::InnerMessage(NexthopNetlinkMessage::New(m)) => {
            nexthop_id(&m).map(|id| (id, false)).ok_or(())
        }
        netlink_packet_core::NetlinkPayload::InnerMessage(NexthopNetlinkMessage::Del(m)) => {
            nexthop_id(&m).map(|id| (id, true)).ok_or(())
        }
        _ => Err(()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};

    fn encode(m: NexthopNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
        let mut h = NetlinkHeader::default();
        h.flags = flags;
        h.sequence_number = seq;
        let mut nl = NetlinkMessage::new(h, NetlinkPayload::InnerMessage(m));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        buf
    }

    /// `ip nexthop replace id 7 via 10.1.2.0 dev va onlink` as iproute2 6.1
    /// sent it (`strace -e trace=sendmsg`: nhmsg AF_INET, scope universe,
    /// RTPROT_UNSPEC, RTNH_F_ONLINK, then NHA_ID, NHA_GATEWAY, NHA_OIF; va
    /// had ifindex 3), with seq 1.
    #[test]
    fn replace_request_bytes_match_iproute2() {
        let nh = Nexthop {
            id: 7,
            gateway: Some("10.1.2.0".parse().unwrap()),
            oif: 3,
            onlink: true,
            protocol: 0,
        };
        let m = new_nexthop_msg(&nh).unwrap();
        let got = encode(
            NexthopNetlinkMessage::New(m),
            NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE | netlink_packet_core::NLM_F_ACK,
            1,
        );
        #[rustfmt::skip]
        let want: Vec<u8> = [
            // nlmsghdr: len 48, type 104, flags REQUEST|ACK|REPLACE|CREATE, seq 1, pid 0
            &48u32.to_ne_bytes()[..], &104u16.to_ne_bytes(), &0x0505u16.to_ne_bytes(),
            &1u32.to_ne_bytes(), &0u32.to_ne_bytes(),
            // nhmsg: AF_INET, scope 0, protocol 0, resvd, flags RTNH_F_ONLINK
            &[2, 0, 0, 0], &4u32.to_ne_bytes(),
            // NHA_ID 7
            &8u16.to_ne_bytes(), &1u16.to_ne_bytes(), &7u32.to_ne_bytes(),
            // NHA_GATEWAY 10.1.2.0
            &8u16.to_ne_bytes(), &6u16.to_ne_bytes(), &[10, 1, 2, 0],
            // NHA_OIF 3
            &8u16.to_ne_bytes(), &5u16.to_ne_bytes(), &3u32.to_ne_bytes(),
        ]
        .concat();
        assert_eq!(got, want);
    }

    /// A dump reply as the kernel sends it for `ip -j nexthop` showing
    /// `{"id":7,"gateway":"10.1.2.0","dev":"va","scope":"link",
    /// "protocol":"unspec","flags":["onlink"]}` (scope link = 253).
    #[test]
    fn dump_reply_decodes_to_the_nexthop() {
        #[rustfmt::skip]
        let payload: Vec<u8> = [
            &[2u8, 253, 0, 0][..], &4u32.to_ne_bytes(),
            &8u16.to_ne_bytes(), &1u16.to_ne_bytes(), &7u32.to_ne_bytes(),
            &8u16.to_ne_bytes(), &6u16.to_ne_bytes(), &[10, 1, 2, 0],
            &8u16.to_ne_bytes(), &5u16.to_ne_bytes(), &2u32.to_ne_bytes(),
        ]
        .concat();
        let mut h = NetlinkHeader::default();
        h.message_type = RTM_NEWNEXTHOP;
        let NexthopNetlinkMessage::New(m) =
            NexthopNetlinkMessage::deserialize(&h, &payload).unwrap()
        else {
            panic!("not a new nexthop");
        };
        assert_eq!(
            nexthop_from_msg(&m),
            Some(Nexthop {
                id: 7,
                gateway: Some("10.1.2.0".parse().unwrap()),
                oif: 2,
                onlink: true,
                protocol: 0,
            })
        );
        // A group is not a single-path nexthop.
        let mut g = m.clone();
        g.attrs
            .push(NexthopAttr::Other(NHA_GROUP, vec![7, 0, 0, 0, 0, 0, 0, 0]));
        assert_eq!(nexthop_from_msg(&g), None);
        // A truncated header is an error, not a panic.
        assert!(NexthopNetlinkMessage::deserialize(&h, &payload[..5]).is_err());
    }

    #[test]
    fn ipv6_gateway_and_encode_decode_round_trip() {
        let nh = Nexthop {
            id: 0x0f1a_0001,
            gateway: Some("fd00::2".parse().unwrap()),
            oif: 9,
            onlink: false,
            protocol: 99,
        };
        let m = new_nexthop_msg(&nh).unwrap();
        assert_eq!(m.family, AF_INET6);
        let raw = encode(NexthopNetlinkMessage::New(m), NLM_F_REQUEST, 3);
        let back = NetlinkMessage::<NexthopNetlinkMessage>::deserialize(&raw).unwrap();
        let NetlinkPayload::InnerMessage(NexthopNetlinkMessage::New(m)) = back.payload else {
            panic!("not a new nexthop");
        };
        assert_eq!(nexthop_from_msg(&m), Some(nh));
        assert_eq!(nexthop_notification(&raw), Some(Ok((nh.id, false))));
    }

    #[test]
    fn bad_requests_are_refused_with_the_field() {
        let mut nh = Nexthop {
            id: 0,
            gateway: None,
            oif: 3,
            onlink: false,
            protocol: 0,
        };
        assert!(new_nexthop_msg(&nh)
            .unwrap_err()
            .to_string()
            .contains("id 0"));
        nh.id = 1;
        nh.oif = 0;
        assert!(new_nexthop_msg(&nh)
            .unwrap_err()
            .to_string()
            .contains("dev"));
        assert_eq!(
            nexthop_cmd(
                "replace",
                &Nexthop {
                    oif: 4,
                    onlink: true,
                    gateway: Some("10.0.0.1".parse().unwrap()),
                    ..nh
                }
            ),
            "ip nexthop replace id 1 via 10.0.0.1 dev 4 onlink proto 0"
        );
    }
}
