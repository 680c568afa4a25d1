//! The udp backend's packet checks (`flannel_core::udp::PeerTable`): a
//! datagram received from the network, and a packet read from the TUN
//! device.
//!
//! Input: byte 0 = flags (bit 0: fill in the IPv4 header checksum, so the
//! fuzzer gets past it), byte 1 = number of peers (0-5), 3 bytes per peer
//! (third octet of its subnet in 10.244.0.0/16, prefix length 22-28, last
//! octet of its PublicIP in 172.16.1.0-3, so nodes with several leases and
//! overlapping subnets occur), 1 byte for the datagram's source
//! (172.16.1.0-4), then the packet.
//!
//! Asserts: a datagram is delivered only if it comes from a peer's
//! PublicIP, is a sane IPv4 packet (version, header and total length,
//! checksum, checked here independently) and its inner source lies outside
//! the cluster network or inside a subnet that sender holds; never is a
//! packet whose inner source is another node's pod address; every other
//! verdict is consistent with the table; egress goes to the peer holding
//! the destination's longest prefix; the ICMP net-unreachable answer is a
//! sane packet to the sender; the flow hash is the same both ways.
#![no_main]

use std::net::Ipv4Addr;

use flannel_core::udp::{self, Egress, Ingress, PeerTable, UdpPeer, NET_UNREACHABLE_MAX_LEN};
use ipnet::Ipv4Net;
use libfuzzer_sys::fuzz_target;

fn sum(b: &[u8]) -> u32 {
    let mut s: u32 = b
        .chunks(2)
        .map(|w| u32::from(w[0]) << 8 | u32::from(*w.get(1).unwrap_or(&0)))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s
}

/// The IPv4 checks, written independently of flannel-core's.
fn sane(p: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, usize)> {
    let ihl = usize::from(*p.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*p.get(2)?, *p.get(3)?]));
    let ok = p.len() >= 20
        && p[0] >> 4 == 4
        && ihl >= 20
        && ihl <= p.len()
        && total >= ihl
        && total <= p.len();
    (ok && sum(&p[..ihl]) == 0xffff).then(|| {
        (
            Ipv4Addr::new(p[12], p[13], p[14], p[15]),
            Ipv4Addr::new(p[16], p[17], p[18], p[19]),
            total,
        )
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let network: Ipv4Net = "10.244.0.0/16".parse().unwrap();
    let flags = data[0];
    let n = usize::from(data[1] % 6);
    let Some(peer_bytes) = data.get(2..2 + 3 * n) else {
        return;
    };
    let peers: Vec<UdpPeer> = peer_bytes
        .chunks(3)
        .map(|c| UdpPeer {
            subnet: Ipv4Net::new(Ipv4Addr::new(10, 244, c[0], 0), 22 + c[1] % 7)
                .unwrap()
                .trunc(),
            public_ip: Ipv4Addr::new(172, 16, 1, c[2] % 4),
        })
        .collect();
    let Some(&src_byte) = data.get(2 + 3 * n) else {
        return;
    };
    let from = Ipv4Addr::new(172, 16, 1, src_byte % 5);
    let mut pkt = data[3 + 3 * n..].to_vec();
    if flags & 1 != 0
        && !pkt.is_empty()
        && usize::from(pkt[0] & 0x0f) * 4 <= pkt.len()
        && pkt.len() >= 12
    {
        udp::fill_ipv4_checksum(&mut pkt);
    }
    let table = PeerTable::new(network, &peers);
    let senders_subnets: Vec<Ipv4Net> = peers
        .iter()
        .filter(|p| p.public_ip == from)
        .map(|p| p.subnet)
        .collect();

    match table.ingress(from, &pkt) {
        Ingress::Deliver { len } => {
            let (src, _, total) = sane(&pkt).expect("delivered an insane packet");
            assert_eq!(len, total);
            assert!(!senders_subnets.is_empty(), "delivered from a stranger");
            assert!(
                !network.contains(&src) || senders_subnets.iter().any(|s| s.contains(&src)),
                "delivered inner source {src} from {from}, which holds {senders_subnets:?}"
            );
        }
        Ingress::UnknownSource { from: f } => {
            assert_eq!(f, from);
            assert!(senders_subnets.is_empty());
        }
        Ingress::Malformed(_) => {
            assert!(sane(&pkt).is_none(), "refused a sane packet");
            assert!(!senders_subnets.is_empty());
        }
        Ingress::SpoofedInner { from: f, inner_src } => {
            assert_eq!(f, from);
            assert!(
                network.contains(&inner_src)
                    && !senders_subnets.iter().any(|s| s.contains(&inner_src))
            );
        }
    }

    match table.egress(&pkt) {
        Egress::Forward { peer, len } => {
            let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
            assert!(len <= pkt.len() && len >= 20);
            let best = peers
                .iter()
                .filter(|p| p.subnet.contains(&dst))
                .map(|p| p.subnet.prefix_len())
                .max();
            let want = peers
                .iter()
                .filter(|p| p.subnet.contains(&dst) && Some(p.subnet.prefix_len()) == best)
                .map(|p| p.public_ip)
                .min();
            assert_eq!(Some(peer), want, "egress to {dst}");
        }
        Egress::NoRoute { dst } => assert!(!peers.iter().any(|p| p.subnet.contains(&dst))),
        Egress::Invalid(_) => {}
    }

    let me = Ipv4Addr::new(10, 244, 9, 0);
    let mut out = [0u8; NET_UNREACHABLE_MAX_LEN];
    if let Some(len) = udp::net_unreachable(&pkt, me, &mut out) {
        let icmp = &out[..len];
        let (src, dst, total) = sane(icmp).expect("the ICMP error is a sane packet");
        assert_eq!((src, total, icmp[9]), (me, len, 1));
        assert_eq!(dst, Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]));
        assert_eq!((icmp[20], icmp[21]), (3, 0));
        assert_eq!(sum(&icmp[20..]), 0xffff, "ICMP checksum");
    }

    // The flow hash ignores the direction.
    if pkt.len() >= 24 {
        let mut rev = pkt.clone();
        rev[12..16].copy_from_slice(&pkt[16..20]);
        rev[16..20].copy_from_slice(&pkt[12..16]);
        let ihl = usize::from(pkt[0] & 0x0f) * 4;
        if ihl >= 20 && pkt.len() >= ihl + 4 {
            rev[ihl..ihl + 2].copy_from_slice(&pkt[ihl + 2..ihl + 4]);
            rev[ihl + 2..ihl + 4].copy_from_slice(&pkt[ihl..ihl + 2]);
        }
        assert_eq!(udp::flow_hash(&pkt), udp::flow_hash(&rev));
    }
    let _ = udp::flow_bucket(udp::flow_hash(&pkt), 1 + usize::from(flags >> 4));
});
