//! rtnetlink datagrams from the kernel, through the parts flannel-netlink
//! writes itself: splitting a datagram into messages, the monitor's
//! notifications, the extended-ack reason of an error, and the route and
//! blackhole route a route message stands for. (The message format itself
//! is decoded by netlink-packet-route.)
//!
//! Asserts: the split parts tile the datagram in order, each at least a
//! netlink header; a route notification's route has the notification's
//! destination and an output device; a route (and a blackhole route) read
//! from a message, written as the message `ip route replace` sends and read
//! back, is the same route (round trip), unless it is one the writer
//! refuses with an error (host bits, an IPv4 gateway for an IPv6 route).
#![no_main]

use flannel_netlink::fuzzing;
use flannel_netlink::{Error, Notification};
use libfuzzer_sys::fuzz_target;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::RouteNetlinkMessage;

fn encode_decode(m: RouteMessage) -> RouteMessage {
    let mut nl = NetlinkMessage::from(RouteNetlinkMessage::NewRoute(m));
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf)
        .expect("our own message decodes")
        .payload
    {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(m)) => m,
        other => panic!("decoded as {other:?}"),
    }
}

fn refused(e: &Error) -> bool {
    matches!(e, Error::Invalid { .. })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(parts) = fuzzing::split(data) {
        let mut off = 0;
        for p in &parts {
            let start = p.as_ptr() as usize - data.as_ptr() as usize;
            assert!(start >= off && p.len() >= 16 && start + p.len() <= data.len());
            off = start + p.len();
        }
        for p in parts {
            let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(p) else {
                continue;
            };
            match msg.payload {
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewRoute(m) | RouteNetlinkMessage::DelRoute(m),
                ) => {
                    if let Some(r) = fuzzing::route_from_msg(&m) {
                        assert_ne!(r.oif, 0, "a route without an output device: {m:?}");
                        match fuzzing::route_replace_msg(&r) {
                            Ok(out) => {
                                assert_eq!(fuzzing::route_from_msg(&encode_decode(out)), Some(r))
                            }
                            Err(e) => assert!(refused(&e), "{e}"),
                        }
                    }
                    if let Some(b) = fuzzing::blackhole_from_msg(&m) {
                        match fuzzing::blackhole_replace_msg(&b) {
                            Ok(out) => assert_eq!(
                                fuzzing::blackhole_from_msg(&encode_decode(out)),
                                Some(b)
                            ),
                            Err(e) => assert!(refused(&e), "{e}"),
                        }
                    }
                }
                NetlinkPayload::Error(e) => {
                    let _ = fuzzing::extack_message(msg.header.flags, &e.header);
                }
                _ => {}
            }
        }
    }
    for n in fuzzing::decode_datagram(data, None) {
        if let Notification::Route {
            dst,
            route: Some(r),
            ..
        } = n
        {
            assert_eq!(r.dst, dst);
            assert_ne!(r.oif, 0);
        }
    }
    if data.len() >= 2 {
        let _ = fuzzing::extack_message(u16::from_ne_bytes([data[0], data[1]]), &data[2..]);
    }
});
