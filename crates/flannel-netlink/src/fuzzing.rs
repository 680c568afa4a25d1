//! The crate's own decoders of kernel messages, for the fuzz targets in
//! `fuzz/` (crate feature `fuzzing`, off in every normal build; not an API).
//! The decoding of the netlink wire format itself is netlink-packet-route's;
//! these are the parts flannel-rs writes: splitting a datagram into
//! messages, the extended-ack reason, and what a route, neighbour or link
//! message means to flannel.

use flannel_core::datapath::{BlackholeRoute, Route};
use netlink_packet_route::route::RouteMessage;

use crate::{Notification, Result};

/// [`Monitor`](crate::Monitor)'s decoding of one received datagram.
pub fn decode_datagram(buf: &[u8], ignore: Option<u32>) -> Vec<Notification> {
    crate::monitor::decode_datagram(buf, ignore)
}

/// A datagram split into its netlink messages.
pub fn split(buf: &[u8]) -> std::result::Result<Vec<&[u8]>, String> {
    crate::transport::split(buf)
}

/// The kernel's reason text of an NLMSG_ERROR with these header flags and payload.
pub fn extack_message(flags: u16, payload: &[u8]) -> Option<String> {
    crate::transport::extack_message(flags, payload)
}

/// The [`Route`] a route message describes, as a dump or a notification reads it.
pub fn route_from_msg(m: &RouteMessage) -> Option<Route> {
    crate::routes::route_from_msg(m)
}

/// The message `ip route replace` of `r` sends (`Netlink::replace_route`).
pub fn route_replace_msg(r: &Route) -> Result<RouteMessage> {
    crate::routes::route_msg(r, "fuzz: ip route replace", false)
}

/// The [`BlackholeRoute`] a route message describes.
pub fn blackhole_from_msg(m: &RouteMessage) -> Option<BlackholeRoute> {
    crate::routes::blackhole_from_msg(m)
}

/// The message `ip route replace blackhole` of `b` sends.
pub fn blackhole_replace_msg(b: &BlackholeRoute) -> Result<RouteMessage> {
    crate::routes::blackhole_msg(b, "fuzz: ip route replace blackhole", false)
}
