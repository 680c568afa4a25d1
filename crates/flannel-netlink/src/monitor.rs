//! Kernel change notifications: `ip monitor link address route neigh nexthop`.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::neighbour::NeighbourMessage;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use netlink_packet_route::neighbour::NeighbourState;

use crate::neigh::{dst_of, mac_of};
use crate::nexthop::nexthop_notification;
use crate::routes::{route_dst, route_from_msg};
use crate::transport::{split, Transport};
use crate::{Error, Notification, Result};

// rtnetlink multicast groups (`RTNLGRP_*`).
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_NEIGH: u32 = 3;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
const RTNLGRP_NEXTHOP: u32 = 32;

/// A burst of changes (hundreds of pods or nodes at once) must fit, or the
/// kernel drops notifications and we must resync.
const MONITOR_RCVBUF: usize = 8 << 20;

/// A socket subscribed to link, address, route and neighbour notifications
/// (`ip monitor link address route neigh`).
pub struct Monitor {
    t: Transport,
    /// Notifications stamped with this port id are dropped.
    ignore: Option<u32>,
}

impl AsFd for Monitor {
    /// For `poll(2)`: readable when notifications are waiting.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.t.sock().as_fd()
    }
}

fn neighbour_notification(m: NeighbourMessage, deleted: bool) -> Option<Notification> {
    let ifindex = m.header.ifindex;
    if m.header.family == AddressFamily::Bridge {
        Some(Notification::Fdb {
            ifindex,
            mac: mac_of(&m.attributes)?,
            deleted,
            dst: dst_of(&m.attributes),
        })
    } else {
        Some(Notification::Neighbour {
            ifindex,
            ip: dst_of(&m.attributes)?,
            deleted,
            mac: mac_of(&m.attributes),
            permanent: m.header.state == NeighbourState::Permanent,
        })
    }
}

fn notification(m: RouteNetlinkMessage) -> Option<Notification> {
    use RouteNetlinkMessage as M;
    match m {
        M::NewLink(l) => link_notification(l, false),
        M::DelLink(l) => link_notification(l, true),
        M::NewRoute(r) => route_dst(&r).map(|dst| Notification::Route {
            dst,
            deleted: false,
            route: route_from_msg(&r),
        }),
        M::DelRoute(r) => route_dst(&r).map(|dst| Notification::Route {
            dst,
            deleted: true,
            route: route_from_msg(&r),
        }),
        M::NewNeighbour(n) => neighbour_notification(n, false),
        M::DelNeighbour(n) => neighbour_notification(n, true),
        M::NewAddress(a) => Some(Notification::Address {
            index: a.header.index,
            deleted: false,
        }),
        M::DelAddress(a) => Some(Notification::Address {
            index: a.header.index,
            deleted: true,
        }),
        _ => None,
    }
}

fn link_notification(
    l: netlink_packet_route::link::LinkMessage,
    deleted: bool,
) -> Option<Notification> {
    let name = l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    });
    Some(Notification::Link {
        index: l.header.index,
        name: name.unwrap_or_default(),
        deleted,
    })
}

impl Monitor {
    /// Subscribes in the calling thread's namespace.
    pub fn open() -> Result<Self> {
        let groups = [
            RTNLGRP_LINK,
            RTNLGRP_NEIGH,
            RTNLGRP_IPV4_IFADDR,
            RTNLGRP_IPV4_ROUTE,
            RTNLGRP_IPV6_IFADDR,
            RTNLGRP_IPV6_ROUTE,
        ];
        let mut t = Transport::open(&groups, MONITOR_RCVBUF).map_err(|source| Error::Kernel {
            op: "ip monitor link address route neigh".into(),
            source,
        })?;
        // Kernels without nexthop objects (before 5.3) have no such group;
        // they have no nexthop to watch either.
        let _ = t.join(RTNLGRP_NEXTHOP);
        Ok(Monitor { t, ignore: None })
    }

    /// Drops the notifications that the writes of the socket with port id
    /// `port` cause ([`crate::Netlink::port_id`]): a daemon's echoes of its
    /// own route and neighbour writes, which describe what it just wrote.
    pub fn ignore_port(&mut self, port: u32) {
        self.ignore = Some(port).filter(|p| *p != 0);
    }

    /// Blocks until at least one notification arrives.
    ///
    /// When the kernel dropped notifications (ENOBUFS: the receive buffer
    /// overflowed) the result is `[Notification::Overrun]`; the caller must
    /// then re-read the kernel state in full.
    pub fn recv(&mut self) -> Result<Vec<Notification>> {
        loop {
            let out = self.recv_one()?;
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    /// Like [`Monitor::recv`] but gives up after `timeout`, returning an
    /// empty list.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Vec<Notification>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.wait_readable(left)? {
                return Ok(Vec::new());
            }
            let out = self.recv_one()?;
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    fn wait_readable(&self, timeout: Duration) -> Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.t.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        loop {
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Kernel {
                    op: "poll netlink monitor".into(),
                    source: e,
                });
            }
            return Ok(n > 0);
        }
    }

    /// Reads one datagram; may yield nothing (only filtered messages).
    fn recv_one(&mut self) -> Result<Vec<Notification>> {
        let n = match self.t.recv_datagram() {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                return Ok(vec![Notification::Overrun])
            }
            Err(source) => {
                return Err(Error::Kernel {
                    op: "ip monitor: recv".into(),
                    source,
                })
            }
        };
        Ok(decode_datagram(&self.t.buf()[..n], self.ignore))
    }
}

/// The notifications of one datagram the kernel sent to the monitor
/// socket, less those stamped with the port id `ignore`. A datagram or a
/// message that cannot be decoded yields [`Notification::Overrun`]: a
/// notification we cannot read is a lost one, and the caller must resync
/// rather than silently miss it.
pub(crate) fn decode_datagram(buf: &[u8], ignore: Option<u32>) -> Vec<Notification> {
    let Ok(parts) = split(buf) else {
        return vec![Notification::Overrun];
    };
    let mut out = Vec::new();
    for raw in parts {
        if ignore.is_some_and(|p| netlink_packet_core::NetlinkBuffer::new(raw).port_number() == p) {
            continue;
        }
        match nexthop_notification(raw) {
            Some(Ok((id, deleted))) => {
                out.push(Notification::Nexthop { id, deleted });
                continue;
            }
            Some(Err(())) => {
                out.push(Notification::Overrun);
                continue;
            }
            None => {}
        }
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(raw) {
            Ok(msg) => match msg.payload {
                NetlinkPayload::InnerMessage(m) => out.extend(notification(m)),
                NetlinkPayload::Overrun(_) => out.push(Notification::Overrun),
                _ => {}
            },
            Err(_) => out.push(Notification::Overrun),
        }
    }
    out
}
