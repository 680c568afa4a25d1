//! The udp backend's datapath decisions, without I/O: IPv4 header sanity,
//! the peer table (inner destination -> peer PublicIP, datagram source ->
//! allowed inner sources) and the counters operators read.
//!
//! The wire format is upstream's: a UDP datagram to the peer's PublicIP on
//! the backend port (8285) whose payload is the inner IPv4 packet, nothing
//! before or after it. Neither side adds a header, so a flannel-rs node and
//! an upstream node exchange packets as they are.
//!
//! Receiving is stricter than upstream (which forwards whatever arrives):
//! - the datagram must come from the PublicIP of a current udp lease
//!   (any source port: upstream sends from its bound port, NAT may change it);
//! - an inner source inside the cluster network must lie in that peer's own
//!   subnet, so a node cannot impersonate another node's pods. An inner source
//!   outside the cluster network is allowed: the peer forwards traffic of its
//!   host or of the outside world (a NodePort client, say) as a router does,
//!   and upstream delivers that too;
//! - the packet must be a sane IPv4 packet (version 4, header length >= 20,
//!   header checksum right, total length between the header length and the
//!   datagram length; trailing bytes past the total length are cut off, as
//!   the kernel does).
//!
//! Everything here works on borrowed bytes and allocates nothing per packet.

use std::net::Ipv4Addr;
use std::time::SystemTime;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::lease::{IpFamily, Lease, LeaseKey, BACKEND_UDP};

/// Bytes of an IPv4 header without options.
pub const IPV4_MIN_HEADER_LEN: usize = 20;

/// Why a packet is not a sane IPv4 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("{len} bytes is shorter than an IPv4 header (20)")]
    TooShort { len: usize },
    #[error("IP version {version}, want 4")]
    NotIpv4 { version: u8 },
    #[error("IPv4 header length {header_len} is below 20 or beyond the {len} bytes received")]
    BadHeaderLength { header_len: usize, len: usize },
    #[error("IPv4 total length {total_len} is below the header length {header_len} or beyond the {len} bytes received")]
    BadTotalLength {
        total_len: usize,
        header_len: usize,
        len: usize,
    },
    #[error("IPv4 header checksum is wrong")]
    BadChecksum,
}

/// The IPv4 header fields the datapath uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Header {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// The packet's length from its header (<= the bytes received).
    pub total_len: usize,
}

fn header_fields(pkt: &[u8]) -> Result<(usize, Ipv4Header), Malformed> {
    let len = pkt.len();
    if len < IPV4_MIN_HEADER_LEN {
        return Err(Malformed::TooShort { len });
    }
    let version = pkt[0] >> 4;
    if version != 4 {
        return Err(Malformed::NotIpv4 { version });
    }
    let header_len = usize::from(pkt[0] & 0x0f) * 4;
    if header_len < IPV4_MIN_HEADER_LEN || header_len > len {
        return Err(Malformed::BadHeaderLength { header_len, len });
    }
    let total_len = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if total_len < header_len || total_len > len {
        return Err(Malformed::BadTotalLength {
            total_len,
            header_len,
            len,
        });
    }
    let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
    let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
    Ok((
        header_len,
        Ipv4Header {
            src,
            dst,
            total_len,
        },
    ))
}

/// Checks a packet that arrived in a datagram: version, header length,
/// total length against the datagram's length and the header checksum.
pub fn parse_ipv4(pkt: &[u8]) -> Result<Ipv4Header, Malformed> {
    let (header_len, h) = header_fields(pkt)?;
    if ones_complement_sum(&pkt[..header_len]) != 0xffff {
        return Err(Malformed::BadChecksum);
    }
    Ok(h)
}

/// [`parse_ipv4`] without the checksum: for packets the local kernel
/// handed to the TUN device (it always fills the IPv4 header checksum in).
pub fn parse_ipv4_local(pkt: &[u8]) -> Result<Ipv4Header, Malformed> {
    header_fields(pkt).map(|(_, h)| h)
}

/// The folded 16-bit one's complement sum (RFC 1071) of `b`; an odd last
/// byte counts as the high byte of a word.
fn ones_complement_sum(b: &[u8]) -> u16 {
    let words = b.chunks_exact(2);
    let tail = words.remainder().first().map_or(0, |&x| u32::from(x) << 8);
    let mut sum: u32 = words
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>()
        + tail;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Fills in the IPv4 header checksum of `pkt` (tests and packet crafting).
pub fn fill_ipv4_checksum(pkt: &mut [u8]) {
    let header_len = usize::from(pkt[0] & 0x0f) * 4;
    pkt[10] = 0;
    pkt[11] = 0;
    let c = !ones_complement_sum(&pkt[..header_len]);
    pkt[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Bytes of the ICMP error [`net_unreachable`] builds, at most (IPv4 20 +
/// ICMP 8 + the quoted header, up to 60, and 8 bytes of its payload).
pub const NET_UNREACHABLE_MAX_LEN: usize = 20 + 8 + 60 + 8;

/// The ICMP "destination network unreachable" (type 3, code 0) answering
/// `orig`, a packet routed into the device for which no peer holds the
/// destination, as upstream's udp backend answers it (so the sender learns
/// at once instead of timing out). Its source is `from`, the node's own
/// address on the device (flannel0's `<subnet network>/32`), as a router
/// answers from its own address and as upstream does: never `orig`'s
/// destination, which would tell the sender that host answered.
/// Written to `out`; returns its length, or `None` when no error may be
/// sent (RFC 1122: not for an ICMP error, a non-first fragment, or a
/// source that is not a unicast host).
pub fn net_unreachable(orig: &[u8], from: Ipv4Addr, out: &mut [u8]) -> Option<usize> {
    let (header_len, h) = header_fields(orig).ok()?;
    let src = h.src;
    if src.is_unspecified() || src.is_broadcast() || src.is_multicast() || src.is_loopback() {
        return None;
    }
    let fragment_offset = u16::from_be_bytes([orig[6], orig[7]]) & 0x1fff;
    if fragment_offset != 0 {
        return None;
    }
    if orig[9] == 1 {
        // ICMP: never answer an error with an error.
        let icmp_type = *orig.get(header_len)?;
        if matches!(icmp_type, 3 | 4 | 5 | 11 | 12) {
            return None;
        }
    }
    let quote = &orig[..h.total_len.min(header_len + 8)];
    let total = 28 + quote.len();
    let out = out.get_mut(..total)?;
    out.fill(0);
    out[0] = 0x45;
    out[1] = 0xc0; // precedence "internetwork control", as the kernel's ICMP errors
    out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    out[8] = 64;
    out[9] = 1;
    out[12..16].copy_from_slice(&from.octets());
    out[16..20].copy_from_slice(&src.octets());
    fill_ipv4_checksum(out);
    out[20] = 3;
    out[28..].copy_from_slice(quote);
    let c = !ones_complement_sum(&out[20..]);
    out[22..24].copy_from_slice(&c.to_be_bytes());
    Some(total)
}

/// A remote udp node: its subnet and where its flanneld listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UdpPeer {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
}

/// The udp peers among `leases`: every live lease except our own (`own`)
/// that is a udp lease and has an IPv4 subnet and PublicIP (the udp backend
/// is IPv4 only, as upstream's). A udp lease is one whose `BackendType` is
/// `"udp"`, empty or missing ([`LeaseAttrs::effective_backend_type`]):
/// upstream's udp backend writes none, in etcd as in the Kubernetes
/// `backend-type` annotation, and neither does flannel-rs's. A lease
/// overlapping ours is never a peer. Sorted by subnet.
///
/// [`LeaseAttrs::effective_backend_type`]: crate::lease::LeaseAttrs::effective_backend_type
pub fn udp_peers<'l>(
    leases: impl IntoIterator<Item = &'l Lease>,
    own: Option<&LeaseKey>,
    now: SystemTime,
) -> Vec<UdpPeer> {
    let own_v4 = own.and_then(|o| o.ipv4);
    let mut out: Vec<UdpPeer> = leases
        .into_iter()
        .filter(|l| l.attrs.effective_backend_type() == BACKEND_UDP && l.is_live(now))
        .filter(|l| own.is_none_or(|o| l.key != *o))
        .filter_map(|l| {
            let subnet = l.key.ipv4?;
            if own_v4.is_some_and(|o| o.contains(&subnet) || subnet.contains(&o)) {
                return None;
            }
            let public_ip = match l.attrs.public_ip_of(IpFamily::V4)? {
                std::net::IpAddr::V4(a) => a,
                std::net::IpAddr::V6(_) => return None,
            };
            Some(UdpPeer { subnet, public_ip })
        })
        .collect();
    out.sort();
    out
}

/// Subnets of one prefix length: (network address, peer PublicIP), sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PrefixGroup {
    prefix_len: u8,
    mask: u32,
    entries: Vec<(u32, Ipv4Addr)>,
}

/// What the datapath consults for every packet; rebuilt (not edited) on
/// every lease change and swapped in whole, so readers never lock.
///
/// Lookups are longest-prefix: one binary search per distinct subnet
/// length (a cluster usually has one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerTable {
    network: Option<Ipv4Net>,
    /// Longest prefix first.
    groups: Vec<PrefixGroup>,
    /// (PublicIP, subnet) sorted: a node may hold several leases.
    sources: Vec<(u32, Ipv4Net)>,
    peers: Vec<UdpPeer>,
}

/// What happens to a packet read from the TUN device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Send `len` bytes to this peer.
    Forward { peer: Ipv4Addr, len: usize },
    /// No peer holds the destination.
    NoRoute { dst: Ipv4Addr },
    /// Not an IPv4 packet we can route.
    Invalid(Malformed),
}

/// What happens to a datagram received on the backend's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingress {
    /// Write the first `len` bytes to the TUN device.
    Deliver { len: usize },
    /// Not a sane IPv4 packet.
    Malformed(Malformed),
    /// The datagram's source is not the PublicIP of a current udp lease.
    UnknownSource { from: Ipv4Addr },
    /// The inner source lies in the cluster network outside the sender's subnet(s).
    SpoofedInner { from: Ipv4Addr, inner_src: Ipv4Addr },
}

impl PeerTable {
    /// The table for `peers` in the cluster network `network`.
    pub fn new(network: Ipv4Net, peers: &[UdpPeer]) -> PeerTable {
        let mut groups: Vec<PrefixGroup> = Vec::new();
        for p in peers {
            let len = p.subnet.prefix_len();
            let g = match groups.iter_mut().find(|g| g.prefix_len == len) {
                Some(g) => g,
                None => {
                    groups.push(PrefixGroup {
                        prefix_len: len,
                        mask: u32::from(p.subnet.netmask()),
                        entries: Vec::new(),
                    });
                    groups.last_mut().expect("just pushed")
                }
            };
            g.entries.push((u32::from(p.subnet.network()), p.public_ip));
        }
        for g in &mut groups {
            g.entries.sort();
            g.entries.dedup_by_key(|e| e.0);
        }
        groups.sort_by_key(|g| std::cmp::Reverse(g.prefix_len));
        let mut sources: Vec<(u32, Ipv4Net)> = peers
            .iter()
            .map(|p| (u32::from(p.public_ip), p.subnet))
            .collect();
        sources.sort();
        sources.dedup();
        let mut peers = peers.to_vec();
        peers.sort();
        PeerTable {
            network: Some(network),
            groups,
            sources,
            peers,
        }
    }

    /// The table for the udp leases among `leases` (see [`udp_peers`]).
    pub fn from_leases<'l>(
        network: Ipv4Net,
        leases: impl IntoIterator<Item = &'l Lease>,
        own: Option<&LeaseKey>,
        now: SystemTime,
    ) -> PeerTable {
        PeerTable::new(network, &udp_peers(leases, own, now))
    }

    /// The peers, sorted by subnet.
    pub fn peers(&self) -> &[UdpPeer] {
        &self.peers
    }

    /// The PublicIP of the peer whose subnet holds `dst` (longest prefix).
    #[inline]
    pub fn route(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        let d = u32::from(dst);
        self.groups.iter().find_map(|g| {
            let key = d & g.mask;
            g.entries
                .binary_search_by_key(&key, |e| e.0)
                .ok()
                .map(|i| g.entries[i].1)
        })
    }

    /// Whether `from` is a peer's PublicIP.
    #[inline]
    pub fn is_peer(&self, from: Ipv4Addr) -> bool {
        self.subnets_of(from).next().is_some()
    }

    fn subnets_of(&self, from: Ipv4Addr) -> impl Iterator<Item = &Ipv4Net> {
        let f = u32::from(from);
        let start = self.sources.partition_point(|s| s.0 < f);
        self.sources[start..]
            .iter()
            .take_while(move |s| s.0 == f)
            .map(|s| &s.1)
    }

    /// The decision for a packet the kernel routed into the TUN device.
    #[inline]
    pub fn egress(&self, pkt: &[u8]) -> Egress {
        match parse_ipv4_local(pkt) {
            Err(e) => Egress::Invalid(e),
            Ok(h) => match self.route(h.dst) {
                Some(peer) => Egress::Forward {
                    peer,
                    len: h.total_len,
                },
                None => Egress::NoRoute { dst: h.dst },
            },
        }
    }

    /// The decision for a datagram from `from` carrying `pkt`.
    #[inline]
    pub fn ingress(&self, from: Ipv4Addr, pkt: &[u8]) -> Ingress {
        let mut subnets = self.subnets_of(from).peekable();
        if subnets.peek().is_none() {
            return Ingress::UnknownSource { from };
        }
        let h = match parse_ipv4(pkt) {
            Ok(h) => h,
            Err(e) => return Ingress::Malformed(e),
        };
        let in_cluster = self.network.is_some_and(|n| n.contains(&h.src));
        if in_cluster && !subnets.any(|s| s.contains(&h.src)) {
            return Ingress::SpoofedInner {
                from,
                inner_src: h.src,
            };
        }
        Ingress::Deliver { len: h.total_len }
    }
}

/// A hash of the flow an IPv4 packet belongs to that is the same in both
/// directions: addresses and protocol, and for TCP, UDP and SCTP the ports
/// (fragments other than none hash by addresses only, so that all the
/// pieces of one datagram hash alike). The udp backend sends a flow from
/// the socket this picks, so that the peer's `SO_REUSEPORT` group receives
/// the flow on one socket and the flow's answers come back the same way:
/// the flow then stays on one thread at each end. Any 32-bit value for a
/// packet too short to parse (it is dropped later anyway).
pub fn flow_hash(packet: &[u8]) -> u32 {
    let Ok((header_len, h)) = header_fields(packet) else {
        return 0;
    };
    let proto = packet[9];
    let fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0;
    let (mut a, mut b) = (u32::from(h.src), u32::from(h.dst));
    let mut ports = (0u16, 0u16);
    if !fragment && matches!(proto, 6 | 17 | 132) && packet.len() >= header_len + 4 {
        let p = &packet[header_len..];
        ports = (
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        );
    }
    if (a, ports.0) > (b, ports.1) {
        std::mem::swap(&mut a, &mut b);
        ports = (ports.1, ports.0);
    }
    // A multiplicative mix of the sorted tuple: the bucket is taken from
    // the high bits, which every input bit reaches.
    let mut x = u64::from(a);
    for v in [
        u64::from(b),
        (u64::from(ports.0) << 16) | u64::from(ports.1),
        u64::from(proto),
    ] {
        x = (x ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
    (x >> 32) as u32
}

/// Which of `n` sockets carries the flow of `hash` (`n` >= 1).
pub fn flow_bucket(hash: u32, n: usize) -> usize {
    ((u64::from(hash) * n as u64) >> 32) as usize
}

/// The udp backend's counters, as operators and tests read them (the
/// stats file is this struct as JSON).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Packets read from the TUN device and sent to a peer.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Packets received from a peer and written to the TUN device.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Datagrams from an address that is no current lease's PublicIP, or
    /// whose inner source lies in another node's subnet.
    pub dropped_spoofed: u64,
    /// Datagrams that are not a sane IPv4 packet.
    pub dropped_malformed: u64,
    /// TUN packets to an address no peer holds.
    pub dropped_no_route: u64,
    /// TUN packets that are not IPv4 (e.g. IPv6 the kernel sent the device).
    pub dropped_tun_invalid: u64,
    /// Failed sends to peers (packets).
    pub send_errors: u64,
    /// Failed writes to the TUN device (packets).
    pub tun_write_errors: u64,
}

impl Counters {
    /// Counts one ingress decision for a datagram of `bytes` payload bytes.
    #[inline]
    pub fn count_ingress(&mut self, v: &Ingress) {
        match v {
            Ingress::Deliver { len } => {
                self.rx_packets += 1;
                self.rx_bytes += *len as u64;
            }
            Ingress::Malformed(_) => self.dropped_malformed += 1,
            Ingress::UnknownSource { .. } | Ingress::SpoofedInner { .. } => {
                self.dropped_spoofed += 1
            }
        }
    }

    /// Counts one egress decision.
    #[inline]
    pub fn count_egress(&mut self, v: &Egress) {
        match v {
            Egress::Forward { len, .. } => {
                self.tx_packets += 1;
                self.tx_bytes += *len as u64;
            }
            Egress::NoRoute { .. } => self.dropped_no_route += 1,
            Egress::Invalid(_) => self.dropped_tun_invalid += 1,
        }
    }

    /// Field-wise sum.
    pub fn add(&mut self, o: &Counters) {
        self.tx_packets += o.tx_packets;
        self.tx_bytes += o.tx_bytes;
        self.rx_packets += o.rx_packets;
        self.rx_bytes += o.rx_bytes;
        self.dropped_spoofed += o.dropped_spoofed;
        self.dropped_malformed += o.dropped_malformed;
        self.dropped_no_route += o.dropped_no_route;
        self.dropped_tun_invalid += o.dropped_tun_invalid;
        self.send_errors += o.send_errors;
        self.tun_write_errors += o.tun_write_errors;
    }

    /// The counters as an array, in field order (for atomic mirrors).
    pub fn to_array(&self) -> [u64; COUNTERS] {
        [
            self.tx_packets,
            self.tx_bytes,
            self.rx_packets,
            self.rx_bytes,
            self.dropped_spoofed,
            self.dropped_malformed,
            self.dropped_no_route,
            self.dropped_tun_invalid,
            self.send_errors,
            self.tun_write_errors,
        ]
    }

    /// Inverse of [`Counters::to_array`].
    pub fn from_array(a: [u64; COUNTERS]) -> Counters {
        Counters {
            tx_packets: a[0],
            tx_bytes: a[1],
            rx_packets: a[2],
            rx_bytes: a[3],
            dropped_spoofed: a[4],
            dropped_malformed: a[5],
            dropped_no_route: a[6],
            dropped_tun_invalid: a[7],
            send_errors: a[8],
            tun_write_errors: a[9],
        }
    }
}

/// Number of fields of [`Counters`].
pub const COUNTERS: usize = 10;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;

    /// A minimal IPv4/ICMP packet from `src` to `dst` with `payload` bytes after the header.
    pub fn packet(src: [u8; 4], dst: [u8; 4], payload: usize) -> Vec<u8> {
        let total = 20 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 1;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        fill_ipv4_checksum(&mut p);
        p
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn table() -> PeerTable {
        PeerTable::new(
            net("10.244.0.0/16"),
            &[
                UdpPeer {
                    subnet: net("10.244.2.0/24"),
                    public_ip: ip("172.16.1.12"),
                },
                UdpPeer {
                    subnet: net("10.244.3.0/24"),
                    public_ip: ip("172.16.1.13"),
                },
                // A longer prefix inside a shorter one wins.
                UdpPeer {
                    subnet: net("10.244.8.0/21"),
                    public_ip: ip("172.16.1.18"),
                },
                UdpPeer {
                    subnet: net("10.244.9.0/24"),
                    public_ip: ip("172.16.1.19"),
                },
            ],
        )
    }

    #[test]
    fn header_sanity() {
        let p = packet([10, 244, 1, 5], [10, 244, 2, 6], 8);
        assert_eq!(
            parse_ipv4(&p).unwrap(),
            Ipv4Header {
                src: ip("10.244.1.5"),
                dst: ip("10.244.2.6"),
                total_len: 28
            }
        );
        assert_eq!(parse_ipv4(&p[..19]), Err(Malformed::TooShort { len: 19 }));
        let mut v6 = p.clone();
        v6[0] = 0x65;
        assert_eq!(parse_ipv4(&v6), Err(Malformed::NotIpv4 { version: 6 }));
        let mut ihl = p.clone();
        ihl[0] = 0x44;
        assert!(matches!(
            parse_ipv4(&ihl),
            Err(Malformed::BadHeaderLength { header_len: 16, .. })
        ));
        ihl[0] = 0x4f; // 60 bytes of header in a 28-byte packet
        assert!(matches!(
            parse_ipv4(&ihl),
            Err(Malformed::BadHeaderLength { header_len: 60, .. })
        ));
        // Total length beyond the datagram: truncated in transit.
        assert!(matches!(
            parse_ipv4(&p[..27]),
            Err(Malformed::BadTotalLength {
                total_len: 28,
                len: 27,
                ..
            })
        ));
        let mut short_total = p.clone();
        short_total[2..4].copy_from_slice(&10u16.to_be_bytes());
        fill_ipv4_checksum(&mut short_total);
        assert!(matches!(
            parse_ipv4(&short_total),
            Err(Malformed::BadTotalLength { total_len: 10, .. })
        ));
        let mut bad_sum = p.clone();
        bad_sum[8] = 63;
        assert_eq!(parse_ipv4(&bad_sum), Err(Malformed::BadChecksum));
        assert!(
            parse_ipv4_local(&bad_sum).is_ok(),
            "local packets skip the checksum"
        );
        // Trailing padding is cut off.
        let mut padded = p.clone();
        padded.extend_from_slice(&[0, 0, 0]);
        assert_eq!(parse_ipv4(&padded).unwrap().total_len, 28);
    }

    #[test]
    fn net_unreachable_answers_hosts_only() {
        let orig = packet([10, 244, 1, 5], [10, 244, 9, 6], 30);
        let mut out = [0u8; NET_UNREACHABLE_MAX_LEN];
        // From the node's flannel0 address, not from the unreachable destination.
        let flannel0 = ip("10.244.1.0");
        let n = net_unreachable(&orig, flannel0, &mut out).unwrap();
        assert_eq!(n, 20 + 8 + 20 + 8);
        let icmp = &out[..n];
        let h = parse_ipv4(icmp).unwrap();
        assert_eq!((h.src, h.dst, h.total_len), (flannel0, ip("10.244.1.5"), n));
        assert_eq!((icmp[9], icmp[20], icmp[21]), (1, 3, 0));
        assert_eq!(ones_complement_sum(&icmp[20..]), 0xffff, "ICMP checksum");
        assert_eq!(&icmp[28..], &orig[..28], "quotes header + 8 bytes");
        // Never for an ICMP error, a later fragment or a broadcast source.
        let mut err = orig.clone();
        err[20] = 3;
        assert_eq!(net_unreachable(&err, flannel0, &mut out), None);
        let mut echo = orig.clone();
        echo[20] = 8;
        assert!(net_unreachable(&echo, flannel0, &mut out).is_some());
        let mut frag = orig.clone();
        frag[7] = 1;
        fill_ipv4_checksum(&mut frag);
        assert_eq!(net_unreachable(&frag, flannel0, &mut out), None);
        let bcast = packet([255, 255, 255, 255], [10, 244, 9, 6], 30);
        assert_eq!(net_unreachable(&bcast, flannel0, &mut out), None);
        // Odd lengths checksum right too.
        let odd = packet([10, 244, 1, 5], [10, 244, 9, 6], 3);
        let n = net_unreachable(&odd, flannel0, &mut out).unwrap();
        assert_eq!(n, 28 + 23);
        assert_eq!(ones_complement_sum(&out[20..n]), 0xffff);
    }

    #[test]
    fn longest_prefix_route() {
        let t = table();
        assert_eq!(t.route(ip("10.244.2.77")), Some(ip("172.16.1.12")));
        assert_eq!(t.route(ip("10.244.3.0")), Some(ip("172.16.1.13")));
        assert_eq!(t.route(ip("10.244.9.1")), Some(ip("172.16.1.19")));
        assert_eq!(t.route(ip("10.244.10.1")), Some(ip("172.16.1.18")));
        assert_eq!(t.route(ip("10.244.4.1")), None);
        assert_eq!(t.route(ip("8.8.8.8")), None);
        assert_eq!(PeerTable::default().route(ip("10.244.2.1")), None);
    }

    #[test]
    fn egress_decisions() {
        let t = table();
        let p = packet([10, 244, 1, 5], [10, 244, 3, 6], 30);
        assert_eq!(
            t.egress(&p),
            Egress::Forward {
                peer: ip("172.16.1.13"),
                len: 50
            }
        );
        let p = packet([10, 244, 1, 5], [10, 244, 4, 6], 30);
        assert_eq!(
            t.egress(&p),
            Egress::NoRoute {
                dst: ip("10.244.4.6")
            }
        );
        let mut v6 = p.clone();
        v6[0] = 0x60;
        assert!(matches!(t.egress(&v6), Egress::Invalid(_)));
    }

    #[test]
    fn ingress_checks_source_then_packet_then_inner_source() {
        let t = table();
        let ok = packet([10, 244, 2, 5], [10, 244, 1, 6], 8);
        assert_eq!(
            t.ingress(ip("172.16.1.12"), &ok),
            Ingress::Deliver { len: 28 }
        );
        // Not a lease's PublicIP.
        assert_eq!(
            t.ingress(ip("172.16.1.99"), &ok),
            Ingress::UnknownSource {
                from: ip("172.16.1.99")
            }
        );
        // Another node's pod address from this node.
        assert_eq!(
            t.ingress(ip("172.16.1.13"), &ok),
            Ingress::SpoofedInner {
                from: ip("172.16.1.13"),
                inner_src: ip("10.244.2.5")
            }
        );
        // The peer's host or the outside world via the peer: allowed.
        let host = packet([172, 16, 1, 12], [10, 244, 1, 6], 8);
        assert_eq!(
            t.ingress(ip("172.16.1.12"), &host),
            Ingress::Deliver { len: 28 }
        );
        // A node holding two subnets may send from both.
        let t2 = PeerTable::new(
            net("10.244.0.0/16"),
            &[
                UdpPeer {
                    subnet: net("10.244.2.0/24"),
                    public_ip: ip("172.16.1.12"),
                },
                UdpPeer {
                    subnet: net("10.244.5.0/24"),
                    public_ip: ip("172.16.1.12"),
                },
            ],
        );
        let second = packet([10, 244, 5, 1], [10, 244, 1, 6], 8);
        assert_eq!(
            t2.ingress(ip("172.16.1.12"), &second),
            Ingress::Deliver { len: 28 }
        );
        // Malformed from a known peer.
        assert!(matches!(
            t.ingress(ip("172.16.1.12"), &ok[..10]),
            Ingress::Malformed(Malformed::TooShort { len: 10 })
        ));
    }

    #[test]
    fn peers_from_leases() {
        let now = SystemTime::now();
        let udp = |k: &str, ip: &str| Lease {
            key: k.parse().unwrap(),
            attrs: LeaseAttrs::new(BACKEND_UDP, Some(ip.parse().unwrap()), None),
            expiration: None,
        };
        let mut expired = udp("10.244.7.0-24", "172.16.1.17");
        expired.expiration = Some(now - std::time::Duration::from_secs(1));
        let leases = vec![
            udp("10.244.1.0-24", "172.16.1.11"),
            udp("10.244.2.0-24", "172.16.1.12"),
            Lease {
                key: "10.244.3.0-24".parse().unwrap(),
                attrs: LeaseAttrs::new(
                    crate::lease::BACKEND_HOST_GW,
                    Some(ip("172.16.1.13")),
                    None,
                ),
                expiration: None,
            },
            expired,
            // Overlaps ours: never routed away.
            udp("10.244.0.0-23", "172.16.1.20"),
        ];
        let own: LeaseKey = "10.244.1.0-24".parse().unwrap();
        let peers = udp_peers(&leases, Some(&own), now);
        assert_eq!(
            peers,
            vec![UdpPeer {
                subnet: net("10.244.2.0/24"),
                public_ip: ip("172.16.1.12")
            }]
        );
        let t = PeerTable::from_leases(net("10.244.0.0/16"), &leases, Some(&own), now);
        assert_eq!(t.peers(), peers.as_slice());
        assert!(t.is_peer(ip("172.16.1.12")));
        assert!(!t.is_peer(ip("172.16.1.13")), "host-gw lease");
        assert!(!t.is_peer(ip("172.16.1.17")), "expired lease");
    }

    /// Upstream's exact leases (etcd values and Kubernetes annotations, see
    /// `lease::upstream`): a lease without `BackendType` (upstream's udp
    /// backend writes none, and neither do we) or with `"udp"` is a udp
    /// peer; vxlan and host-gw leases are not.
    #[test]
    fn upstream_udp_leases_without_backend_type_are_peers() {
        use crate::lease::upstream::{self, etcd, lease};
        let now = SystemTime::now();
        let own: LeaseKey = "10.244.9.0-24".parse().unwrap();
        let leases = vec![
            // etcd / local store: {"PublicIP":"172.16.1.12","PublicIPv6":null}
            lease("10.244.1.0-24", etcd(upstream::ETCD_UDP)),
            // Kubernetes: backend-type "", backend-data "null".
            lease("10.244.2.0-24", upstream::kube_udp()),
            // What flannel-rs writes, and what it wrote before ("udp").
            lease("10.244.3.0-24", LeaseAttrs::new_udp(ip("172.16.1.14"))),
            lease(
                "10.244.4.0-24",
                LeaseAttrs::new(BACKEND_UDP, Some(ip("172.16.1.15")), None),
            ),
            // Other backends' leases, upstream's exact values.
            lease("10.244.5.0-24", etcd(upstream::ETCD_VXLAN)),
            lease("10.244.6.0-24", upstream::kube_vxlan()),
            lease("10.244.7.0-24", etcd(upstream::ETCD_HOST_GW)),
            lease("10.244.8.0-24", upstream::kube_host_gw()),
        ];
        let peers = udp_peers(&leases, Some(&own), now);
        assert_eq!(
            peers,
            vec![
                UdpPeer {
                    subnet: net("10.244.1.0/24"),
                    public_ip: ip("172.16.1.12")
                },
                UdpPeer {
                    subnet: net("10.244.2.0/24"),
                    public_ip: ip("172.16.1.13")
                },
                UdpPeer {
                    subnet: net("10.244.3.0/24"),
                    public_ip: ip("172.16.1.14")
                },
                UdpPeer {
                    subnet: net("10.244.4.0/24"),
                    public_ip: ip("172.16.1.15")
                },
            ]
        );
        // Both directions work with the upstream node: packets to its pods
        // go to its PublicIP, and its datagrams are delivered.
        let t = PeerTable::from_leases(net("10.244.0.0/16"), &leases, Some(&own), now);
        let out = packet([10, 244, 9, 2], [10, 244, 1, 2], 8);
        assert_eq!(
            t.egress(&out),
            Egress::Forward {
                peer: ip("172.16.1.12"),
                len: 28
            }
        );
        let back = packet([10, 244, 1, 2], [10, 244, 9, 2], 8);
        assert_eq!(
            t.ingress(ip("172.16.1.12"), &back),
            Ingress::Deliver { len: 28 }
        );
    }

    #[test]
    fn counters() {
        let mut c = Counters::default();
        c.count_ingress(&Ingress::Deliver { len: 100 });
        c.count_ingress(&Ingress::Malformed(Malformed::BadChecksum));
        c.count_ingress(&Ingress::UnknownSource {
            from: ip("1.2.3.4"),
        });
        c.count_egress(&Egress::Forward {
            peer: ip("1.2.3.4"),
            len: 60,
        });
        c.count_egress(&Egress::NoRoute {
            dst: ip("10.244.9.9"),
        });
        assert_eq!(
            (
                c.rx_packets,
                c.rx_bytes,
                c.dropped_malformed,
                c.dropped_spoofed
            ),
            (1, 100, 1, 1)
        );
        assert_eq!((c.tx_packets, c.tx_bytes, c.dropped_no_route), (1, 60, 1));
        assert_eq!(Counters::from_array(c.to_array()), c);
        let mut d = c;
        d.add(&c);
        assert_eq!(d.rx_bytes, 200);
        let j = serde_json::to_string(&c).unwrap();
        assert!(j.contains("\"dropped_spoofed\":1"), "{j}");
    }

    /// A TCP (or other `proto`) packet with ports, or a fragment.
    fn flow_packet(
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        sport: u16,
        dport: u16,
        frag: u16,
    ) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    #[test]
    fn flow_hash_is_the_same_both_ways_and_tells_flows_apart() {
        let (a, b) = ([10, 244, 1, 2], [10, 244, 2, 2]);
        let there = flow_hash(&flow_packet(a, b, 6, 40000, 5201, 0));
        let back = flow_hash(&flow_packet(b, a, 6, 5201, 40000, 0));
        assert_eq!(there, back);
        // Another port, another protocol, another peer: other flows.
        assert_ne!(there, flow_hash(&flow_packet(a, b, 6, 40001, 5201, 0)));
        assert_ne!(there, flow_hash(&flow_packet(a, b, 17, 40000, 5201, 0)));
        assert_ne!(
            there,
            flow_hash(&flow_packet(a, [10, 244, 3, 2], 6, 40000, 5201, 0))
        );
        // Ports equal, addresses swapped: still symmetric.
        assert_eq!(
            flow_hash(&flow_packet(a, b, 17, 53, 53, 0)),
            flow_hash(&flow_packet(b, a, 17, 53, 53, 0))
        );
    }

    #[test]
    fn fragments_hash_by_addresses_only() {
        let (a, b) = ([10, 244, 1, 2], [10, 244, 2, 2]);
        // First fragment (MF set) and a later one (offset 185) of one datagram:
        // only the first carries the ports.
        let first = flow_hash(&flow_packet(a, b, 17, 4000, 4001, 0x2000));
        let later = flow_hash(&flow_packet(a, b, 17, 0xdead, 0xbeef, 185));
        assert_eq!(first, later);
        assert_eq!(flow_hash(&[0x45, 0]), 0);
    }

    #[test]
    fn flow_buckets_cover_every_socket() {
        let (a, b) = ([10, 244, 1, 2], [10, 244, 2, 2]);
        let mut seen = [0usize; 4];
        for port in 30000..30400u16 {
            let h = flow_hash(&flow_packet(a, b, 6, port, 5201, 0));
            seen[flow_bucket(h, 4)] += 1;
            assert_eq!(flow_bucket(h, 1), 0);
        }
        // 400 flows over 4 sockets: each gets a fair share (100 expected).
        assert!(seen.iter().all(|&n| (60..=140).contains(&n)), "{seen:?}");
    }
}
