//! The wireguard backend's decisions, without I/O: keys in WireGuard's
//! base64, the lease's backend data, which peers each device gets from the
//! leases (upstream's `Mode` semantics), the allowed-IPs lookup of the
//! datapath (cryptokey routing) and its counters.
//!
//! Lease format, as upstream writes it: `BackendType` `"wireguard"`,
//! `BackendData` `{"PublicKey":"<base64>","Port":51820}` when IPv4 is
//! enabled and `BackendV6Data` `{"PublicKey":"<base64>","Port":51821}` when
//! IPv6 is: the same public key in both (one key file), the port of
//! `ListenPort` / `ListenPortV6`. A missing or zero `Port` (flannel before
//! v0.22 wrote none) means "our own device's listen port", as upstream.
//!
//! Peers, as upstream's `handleSubnetEvents` builds them:
//! - `Mode` separate: `flannel-wg` gets a peer per lease with an IPv4
//!   subnet (key from `BackendData`, endpoint `PublicIP:Port`, allowed IPs
//!   the IPv4 subnet), `flannel-wg-v6` one per lease with an IPv6 subnet
//!   (`BackendV6Data`, `[PublicIPv6]:Port`, the IPv6 subnet);
//! - `Mode` ipv4 / ipv6 / auto: `flannel-wg` alone, a peer per lease with
//!   every subnet of the lease as allowed IPs, the key of `BackendV6Data`
//!   when the lease has IPv6 (else `BackendData`), and the endpoint of the
//!   family the mode picks ([`auto_family`] for auto).
//!
//! Differences from upstream: a lease without a usable endpoint (no
//! PublicIP of the family) or without a parseable key is no peer (upstream
//! logs an error per event and carries on); two leases with the same
//! public key make one peer whose allowed IPs are the union (the kernel's
//! `wg set` would let the last one win); our own key is never a peer.
//!
//! Everything on the packet path borrows bytes and allocates nothing.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::SystemTime;

use base64::Engine as _;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::WireguardMode;
use crate::lease::{BackendData, IpFamily, Lease, LeaseAttrs, LeaseKey};
use crate::wire;

/// `BackendType` of the wireguard backend.
pub const BACKEND_WIREGUARD: &str = wire::BACKEND_TYPE_WIREGUARD;

/// Bytes upstream reserves for the encapsulation (outer IPv6 40 + UDP 8 +
/// WireGuard header 16 + tag 16; over IPv4 it is 20 less, upstream uses 80
/// for both): the device MTU is the underlay's MTU minus this.
pub const OVERHEAD: u32 = 80;

/// Bytes a WireGuard data message adds to the packet it carries: type,
/// receiver index and counter (16) and the Poly1305 tag (16).
pub const DATA_OVERHEAD: usize = 32;

/// A Curve25519 key (public, private or preshared) as WireGuard writes it:
/// 32 bytes in standard base64 with padding, 44 characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WgKey(pub [u8; 32]);

/// A string that is not a WireGuard key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not base64 ({detail}); a WireGuard key is 44 characters of base64 as `wg genkey` prints it")]
    NotBase64 { detail: String },
    #[error("{len} bytes after base64 decoding, want 32; a WireGuard key is 44 characters of base64 as `wg genkey` prints it")]
    WrongLength { len: usize },
}

impl WgKey {
    /// Parses the base64 form; surrounding whitespace (the newline `wg
    /// genkey > file` leaves) is ignored.
    pub fn parse(s: &str) -> Result<WgKey, KeyError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| KeyError::NotBase64 {
                detail: e.to_string(),
            })?;
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::WrongLength { len: bytes.len() })?;
        Ok(WgKey(arr))
    }

    /// The base64 form (`wg` prints keys this way).
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }
}

impl FromStr for WgKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WgKey::parse(s)
    }
}

impl fmt::Display for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// Public keys are printed in full: they are published in the leases.
impl fmt::Debug for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgKey({self})")
    }
}

/// A secret key (the PSK): never printed, not even by `Debug`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SecretKey(pub WgKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// The backend data of a wireguard lease, field order and names as
/// upstream's `wireguardLeaseAttrs`: `{"PublicKey":"...","Port":51820}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireguardBackendData {
    #[serde(rename = "PublicKey")]
    pub public_key: String,
    /// 0 (or missing): the receiving device's own listen port.
    #[serde(rename = "Port", default)]
    pub port: u16,
}

/// The attributes a wireguard node publishes: `BackendType` wireguard,
/// `BackendData` with `v4_port` when IPv4 is enabled, `BackendV6Data` with
/// `v6_port` when IPv6 is, each holding `public_key`.
pub fn lease_attrs(
    public_ip: Option<Ipv4Addr>,
    public_ipv6: Option<Ipv6Addr>,
    public_key: &WgKey,
    v4_port: Option<u16>,
    v6_port: Option<u16>,
) -> LeaseAttrs {
    let data = |port: u16| {
        BackendData::new(&WireguardBackendData {
            public_key: public_key.to_base64(),
            port,
        })
    };
    LeaseAttrs {
        public_ip,
        public_ipv6,
        backend_type: BACKEND_WIREGUARD.to_string(),
        backend_data: v4_port.map(data),
        backend_v6_data: v6_port.map(data),
    }
}

/// The key and port in the lease's backend data of `family`
/// (`BackendData` / `BackendV6Data`); `None` when absent or unusable.
pub fn lease_data(attrs: &LeaseAttrs, family: IpFamily) -> Option<(WgKey, u16)> {
    let v = match family {
        IpFamily::V4 => attrs.backend_data.as_ref()?,
        IpFamily::V6 => attrs.backend_v6_data.as_ref()?,
    };
    let d: WireguardBackendData = v.parse()?;
    Some((WgKey::parse(&d.public_key).ok()?, d.port))
}

/// Which device a peer list is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRole {
    /// `Mode` separate: `flannel-wg` (V4) or `flannel-wg-v6` (V6), one family each.
    Separate(IpFamily),
    /// `Mode` auto, ipv4 or ipv6: `flannel-wg` carries both families.
    Single(WireguardMode),
}

impl DeviceRole {
    /// The device's name.
    pub fn device_name(self) -> &'static str {
        match self {
            DeviceRole::Separate(IpFamily::V6) => wire::WIREGUARD_DEVICE_V6,
            _ => wire::WIREGUARD_DEVICE,
        }
    }
}

/// This node's underlay addresses, for `Mode` auto.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalAddrs {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// RFC 1918 (upstream's `IP4.IsPrivate`).
fn is_private_v4(a: Ipv4Addr) -> bool {
    a.is_private()
}

/// RFC 4193, fc00::/7 (upstream's `IP6.IsPrivate`).
fn is_private_v6(a: Ipv6Addr) -> bool {
    a.octets()[0] & 0xfe == 0xfc
}

/// `Mode` auto's endpoint family for a peer, upstream's `selectMode`: IPv4
/// unless the peer has an IPv6 address and neither side can reach the other
/// over IPv4 publicly while both have public IPv6 addresses; precisely: no
/// PublicIPv6 -> IPv4; a public peer IPv4 and an IPv4 address here -> IPv4;
/// a public peer IPv6 and a public IPv6 address here -> IPv6; else IPv4.
pub fn auto_family(
    peer_v4: Option<Ipv4Addr>,
    peer_v6: Option<Ipv6Addr>,
    local: &LocalAddrs,
) -> IpFamily {
    let Some(p6) = peer_v6 else {
        return IpFamily::V4;
    };
    // Upstream reads a missing PublicIP as 0.0.0.0, which is not private.
    let p4 = peer_v4.unwrap_or(Ipv4Addr::UNSPECIFIED);
    if !is_private_v4(p4) && local.v4.is_some() {
        return IpFamily::V4;
    }
    if !is_private_v6(p6) && local.v6.is_some_and(|l| !is_private_v6(l)) {
        return IpFamily::V6;
    }
    IpFamily::V4
}

/// A peer of one device: its key, where to send, what it may carry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WgPeer {
    pub public_key: WgKey,
    pub endpoint: SocketAddr,
    /// The subnets routed to it and accepted from it, sorted.
    pub allowed_ips: Vec<IpNet>,
}

/// The wireguard peers of the device `role` among `leases`: every live
/// wireguard lease but our own (`own`, and any lease overlapping it) with
/// the subnets, key and endpoint address the role needs (see the module
/// doc). `fallback_port` stands in for a missing or zero `Port` (the
/// device's own listen port, as upstream). Merged by key, sorted.
pub fn wireguard_peers<'l>(
    leases: impl IntoIterator<Item = &'l Lease>,
    own: Option<&LeaseKey>,
    own_key: Option<&WgKey>,
    role: DeviceRole,
    local: &LocalAddrs,
    fallback_port: u16,
    now: SystemTime,
) -> Vec<WgPeer> {
    let mut out: Vec<WgPeer> = Vec::new();
    for l in leases {
        if l.attrs.effective_backend_type() != BACKEND_WIREGUARD || !l.is_live(now) {
            continue;
        }
        if own.is_some_and(|o| l.key == *o || l.key.overlaps(o)) {
            continue;
        }
        let Some(p) = lease_peer(l, role, local, fallback_port) else {
            continue;
        };
        if own_key == Some(&p.public_key) {
            continue;
        }
        match out.iter_mut().find(|q| q.public_key == p.public_key) {
            Some(q) => {
                q.allowed_ips.extend(p.allowed_ips);
                q.allowed_ips.sort();
                q.allowed_ips.dedup();
            }
            None => out.push(p),
        }
    }
    out.sort();
    out
}

/// The peer one lease gives the device `role`, if any.
fn lease_peer(
    l: &Lease,
    role: DeviceRole,
    local: &LocalAddrs,
    fallback_port: u16,
) -> Option<WgPeer> {
    let port = |p: u16| if p == 0 { fallback_port } else { p };
    let endpoint = |family: IpFamily, p: u16| -> Option<SocketAddr> {
        Some(SocketAddr::new(l.attrs.public_ip_of(family)?, port(p)))
    };
    match role {
        DeviceRole::Separate(family) => {
            let subnet = l.key.subnet(family)?;
            let (key, p) = lease_data(&l.attrs, family)?;
            Some(WgPeer {
                public_key: key,
                endpoint: endpoint(family, p)?,
                allowed_ips: vec![subnet],
            })
        }
        DeviceRole::Single(mode) => {
            let mut allowed: Vec<IpNet> = [IpFamily::V4, IpFamily::V6]
                .into_iter()
                .filter_map(|f| l.key.subnet(f))
                .collect();
            allowed.sort();
            // The key of BackendV6Data when the lease has IPv6, as upstream.
            let key_family = if l.key.ipv6.is_some() {
                IpFamily::V6
            } else {
                IpFamily::V4
            };
            let (key, _) = lease_data(&l.attrs, key_family)?;
            let family = match mode {
                WireguardMode::Ipv4 => IpFamily::V4,
                WireguardMode::Ipv6 => IpFamily::V6,
                WireguardMode::Auto | WireguardMode::Separate => {
                    auto_family(l.attrs.public_ip, l.attrs.public_ipv6, local)
                }
            };
            // The port of the chosen family's data (upstream: the v6 data's
            // port for an IPv6 endpoint), else the fallback.
            let p = lease_data(&l.attrs, family).map_or(0, |(_, p)| p);
            Some(WgPeer {
                public_key: key,
                endpoint: endpoint(family, p)?,
                allowed_ips: allowed,
            })
        }
    }
}

/// One peer as a kernel WireGuard device holds it: the fields of its line
/// in `wg show DEV dump` that flannel sets (not its handshake time or byte
/// counts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPeer {
    pub public_key: WgKey,
    /// `None`: no preshared key (the kernel reports 32 zero bytes).
    pub preshared_key: Option<SecretKey>,
    /// `None`: the kernel knows no endpoint yet.
    pub endpoint: Option<SocketAddr>,
    /// Sorted.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds, 0: off.
    pub persistent_keepalive: u16,
}

impl KernelPeer {
    /// The kernel peer that carries `peer` with the device's PSK and
    /// keepalive.
    pub fn new(peer: &WgPeer, psk: Option<SecretKey>, keepalive: u16) -> KernelPeer {
        KernelPeer {
            public_key: peer.public_key,
            preshared_key: psk,
            endpoint: Some(peer.endpoint),
            allowed_ips: peer.allowed_ips.clone(),
            persistent_keepalive: keepalive,
        }
    }
}

/// One write to a kernel device's peer list (`wg set DEV peer KEY ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerUpdate {
    /// Adds the peer or updates it in place, its allowed IPs replaced
    /// (`replace-allowed-ips`): a session survives the update.
    Set(KernelPeer),
    /// `wg set DEV peer KEY remove`.
    Remove(WgKey),
}

/// The writes that turn the kernel's peers `have` into `want`: a `Set`
/// per peer missing or different, a `Remove` per peer not wanted, nothing
/// for a peer that is right (its session is left alone). `want` needs no
/// order; allowed IPs are compared sorted. Linear after the sorts.
///
/// An endpoint at the wanted address but another port is right: the
/// kernel moves a peer's endpoint to wherever its authenticated packets
/// come from (roaming), and a userspace peer sends from ephemeral ports.
/// Writing the port back every pass would only make it roam again.
pub fn peer_updates(want: &[KernelPeer], have: &[KernelPeer]) -> Vec<PeerUpdate> {
    fn sorted(peers: &[KernelPeer]) -> Vec<&KernelPeer> {
        let mut v: Vec<&KernelPeer> = peers.iter().collect();
        v.sort_unstable_by_key(|p| p.public_key);
        v
    }
    // Both sides are normally sorted already: sort copies only when not.
    let same_ips = |a: &[IpNet], b: &[IpNet]| {
        a == b || {
            let (mut a, mut b) = (a.to_vec(), b.to_vec());
            a.sort();
            b.sort();
            a == b
        }
    };
    let same = |w: &KernelPeer, h: &KernelPeer| {
        let endpoint = match (w.endpoint, h.endpoint) {
            (Some(a), Some(b)) => a.ip() == b.ip(),
            (a, b) => a == b,
        };
        w.preshared_key == h.preshared_key
            && endpoint
            && w.persistent_keepalive == h.persistent_keepalive
            && same_ips(&w.allowed_ips, &h.allowed_ips)
    };
    let (want, have) = (sorted(want), sorted(have));
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < want.len() || j < have.len() {
        match (want.get(i), have.get(j)) {
            (Some(w), Some(h)) if w.public_key == h.public_key => {
                if !same(w, h) {
                    out.push(PeerUpdate::Set((*w).clone()));
                }
                i += 1;
                j += 1;
            }
            (Some(w), h) if h.is_none_or(|h| w.public_key < h.public_key) => {
                out.push(PeerUpdate::Set((*w).clone()));
                i += 1;
            }
            (_, Some(h)) => {
                out.push(PeerUpdate::Remove(h.public_key));
                j += 1;
            }
            (None, None) | (Some(_), None) => unreachable!("covered above"),
        }
    }
    out
}

/// Subnets of one prefix length: (network address, peer index), sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Group {
    prefix_len: u8,
    mask: u128,
    entries: Vec<(u128, usize)>,
}

/// The allowed-IPs lookup of one device (WireGuard's cryptokey routing):
/// destination address -> the peer whose allowed IPs hold it, longest
/// prefix first, one binary search per distinct prefix length. Built once
/// per peer set and read without locks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedIps {
    v4: Vec<Group>,
    v6: Vec<Group>,
}

fn add_to(groups: &mut Vec<Group>, bits: u8, addr: u128, prefix_len: u8, peer: usize) {
    let mask = if prefix_len == 0 {
        0
    } else {
        (u128::MAX << (128 - u32::from(prefix_len))) >> (128 - u32::from(bits))
    };
    let g = match groups.iter_mut().position(|g| g.prefix_len == prefix_len) {
        Some(i) => &mut groups[i],
        None => {
            groups.push(Group {
                prefix_len,
                mask,
                entries: Vec::new(),
            });
            groups.last_mut().expect("just pushed")
        }
    };
    g.entries.push((addr & mask, peer));
}

impl AllowedIps {
    /// The table of `peers` (the index of a peer in `peers` is what lookups return).
    pub fn new(peers: &[WgPeer]) -> AllowedIps {
        let mut t = AllowedIps::default();
        for (i, p) in peers.iter().enumerate() {
            for net in &p.allowed_ips {
                match net {
                    IpNet::V4(n) => add_to(
                        &mut t.v4,
                        32,
                        u128::from(u32::from(n.network())),
                        n.prefix_len(),
                        i,
                    ),
                    IpNet::V6(n) => {
                        add_to(&mut t.v6, 128, u128::from(n.network()), n.prefix_len(), i)
                    }
                }
            }
        }
        for g in t.v4.iter_mut().chain(t.v6.iter_mut()) {
            g.entries.sort();
            g.entries.dedup_by_key(|e| e.0);
        }
        t.v4.sort_by_key(|g| std::cmp::Reverse(g.prefix_len));
        t.v6.sort_by_key(|g| std::cmp::Reverse(g.prefix_len));
        t
    }

    fn find(groups: &[Group], a: u128) -> Option<usize> {
        groups.iter().find_map(|g| {
            let key = a & g.mask;
            g.entries
                .binary_search_by_key(&key, |e| e.0)
                .ok()
                .map(|i| g.entries[i].1)
        })
    }

    /// The peer whose allowed IPs hold `dst`.
    #[inline]
    pub fn lookup(&self, dst: IpAddr) -> Option<usize> {
        match dst {
            IpAddr::V4(a) => Self::find(&self.v4, u128::from(u32::from(a))),
            IpAddr::V6(a) => Self::find(&self.v6, u128::from(a)),
        }
    }
}

/// The addresses and length of an IP packet as the kernel hands it to the
/// TUN device or as it comes out of a WireGuard message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpSummary {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The packet's length from its header (IPv4 total length, IPv6
    /// payload length + 40), at most the bytes given.
    pub len: usize,
}

/// Reads an IPv4 or IPv6 header; `None` when `pkt` is neither or its
/// length field exceeds the bytes given. (The IPv4 header checksum is the
/// kernel's: inbound packets were authenticated by WireGuard, and the
/// kernel checks the checksum when they are written to the device.)
#[inline]
pub fn ip_summary(pkt: &[u8]) -> Option<IpSummary> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            let len = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
            if ihl < 20 || len < ihl || len > pkt.len() {
                return None;
            }
            let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
            let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
            Some(IpSummary {
                src: src.into(),
                dst: dst.into(),
                len,
            })
        }
        6 if pkt.len() >= 40 => {
            let len = 40 + usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
            if len > pkt.len() {
                return None;
            }
            let a = |at: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&pkt[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            Some(IpSummary {
                src: a(8),
                dst: a(24),
                len,
            })
        }
        _ => None,
    }
}

/// The length a packet of `len` bytes is padded to before encryption: the
/// next multiple of 16 (WireGuard's padding, which hides exact lengths),
/// never past `mtu`.
#[inline]
pub fn padded_len(len: usize, mtu: usize) -> usize {
    len.next_multiple_of(16).min(mtu.max(len))
}

/// Whether `peer`'s allowed IPs hold `src`: a decrypted packet is delivered
/// only then (WireGuard's cryptokey routing on receive).
#[inline]
pub fn allows(allowed_ips: &[IpNet], src: IpAddr) -> bool {
    allowed_ips.iter().any(|n| n.contains(&src))
}

/// The wireguard datapath's counters, as operators and tests read them
/// (the stats file is this struct as JSON).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Packets read from the device, encrypted and sent to a peer.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Packets received from a peer, decrypted and written to the device.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Device packets to an address no peer's allowed IPs hold.
    pub dropped_no_peer: u64,
    /// Device packets that are not IPv4 or IPv6.
    pub dropped_tun_invalid: u64,
    /// Datagrams that are no valid WireGuard message for us: unknown
    /// receiver index or key, failed authentication, replays, garbage.
    pub dropped_invalid: u64,
    /// Decrypted packets whose source is outside the sending peer's
    /// allowed IPs (another node's pods, or anything else).
    pub dropped_not_allowed: u64,
    /// Handshake messages (initiations, responses, cookie replies) handled.
    pub handshakes_received: u64,
    /// Handshake initiations and responses sent.
    pub handshakes_sent: u64,
    /// Failed sends to peers (datagrams).
    pub send_errors: u64,
    /// Failed writes to the device (packets).
    pub tun_write_errors: u64,
}

/// Number of fields of [`Counters`].
pub const COUNTERS: usize = 12;

impl Counters {
    /// The counters as an array, in field order (for atomic mirrors).
    pub fn to_array(&self) -> [u64; COUNTERS] {
        [
            self.tx_packets,
            self.tx_bytes,
            self.rx_packets,
            self.rx_bytes,
            self.dropped_no_peer,
            self.dropped_tun_invalid,
            self.dropped_invalid,
            self.dropped_not_allowed,
            self.handshakes_received,
            self.handshakes_sent,
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
            dropped_no_peer: a[4],
            dropped_tun_invalid: a[5],
            dropped_invalid: a[6],
            dropped_not_allowed: a[7],
            handshakes_received: a[8],
            handshakes_sent: a[9],
            send_errors: a[10],
            tun_write_errors: a[11],
        }
    }

    /// Field-wise sum.
    pub fn add(&mut self, o: &Counters) {
        let mut a = self.to_array();
        for (x, y) in a.iter_mut().zip(o.to_array()) {
            *x += y;
        }
        *self = Counters::from_array(a);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Keys of `wg genkey` / `wg pubkey` (wireguard-tools), for the golden tests.
    pub const KEY_A: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    pub const KEY_B: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    fn key(s: &str) -> WgKey {
        s.parse().unwrap()
    }

    fn kpeer(n: u8, subnet: &str) -> KernelPeer {
        KernelPeer {
            public_key: WgKey([n; 32]),
            preshared_key: None,
            endpoint: Some(SocketAddr::from(([172, 16, 1, n], 51820))),
            allowed_ips: vec![subnet.parse().unwrap()],
            persistent_keepalive: 0,
        }
    }

    #[test]
    fn peer_updates_write_only_the_difference() {
        let want = vec![
            kpeer(3, "10.244.3.0/24"),
            kpeer(1, "10.244.1.0/24"),
            kpeer(2, "10.244.2.0/24"),
        ];
        assert_eq!(peer_updates(&want, &want), vec![]);
        // The kernel reports allowed IPs in its own order.
        let mut dual = kpeer(1, "10.244.1.0/24");
        dual.allowed_ips.push("fd00:0:0:1::/64".parse().unwrap());
        let mut dual_rev = dual.clone();
        dual_rev.allowed_ips.reverse();
        assert_eq!(
            peer_updates(std::slice::from_ref(&dual), &[dual_rev]),
            vec![]
        );
        let mut moved = kpeer(2, "10.244.2.0/24");
        moved.endpoint = Some(SocketAddr::from(([172, 16, 1, 9], 51820)));
        // Roamed to another port of the same address: right.
        let mut roamed = kpeer(1, "10.244.1.0/24");
        roamed.endpoint = Some(SocketAddr::from(([172, 16, 1, 1], 40001)));
        assert_eq!(
            peer_updates(&want[1..2], std::slice::from_ref(&roamed)),
            vec![]
        );
        let mut keepalive = kpeer(3, "10.244.3.0/24");
        keepalive.persistent_keepalive = 25;
        let have = vec![keepalive, kpeer(4, "10.244.4.0/24"), moved];
        assert_eq!(
            peer_updates(&want, &have),
            vec![
                PeerUpdate::Set(kpeer(1, "10.244.1.0/24")),
                PeerUpdate::Set(kpeer(2, "10.244.2.0/24")),
                PeerUpdate::Set(kpeer(3, "10.244.3.0/24")),
                PeerUpdate::Remove(WgKey([4; 32])),
            ]
        );
        let mut psk = kpeer(1, "10.244.1.0/24");
        psk.preshared_key = Some(SecretKey(WgKey([7; 32])));
        assert_eq!(
            peer_updates(&want[1..2], std::slice::from_ref(&psk)),
            vec![PeerUpdate::Set(kpeer(1, "10.244.1.0/24"))]
        );
        assert_eq!(
            peer_updates(&[], &want[..1]),
            vec![PeerUpdate::Remove(WgKey([3; 32]))]
        );
    }

    #[test]
    fn peer_updates_at_20000_peers_are_linear_and_exact() {
        let subnet = |i: u32| format!("10.{}.{}.0/24", i >> 8, i & 0xff);
        let key = |i: u32| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            WgKey(k)
        };
        let peer = |i: u32| KernelPeer {
            public_key: key(i),
            preshared_key: None,
            endpoint: Some(SocketAddr::from((
                [172, 16, (i >> 8) as u8, i as u8],
                51820,
            ))),
            allowed_ips: vec![subnet(i).parse().unwrap()],
            persistent_keepalive: 0,
        };
        let want: Vec<KernelPeer> = (0..20_000).rev().map(peer).collect();
        let mut have: Vec<KernelPeer> = (0..20_000).filter(|i| i % 1000 != 7).map(peer).collect();
        have.push(peer(30_000));
        let u = peer_updates(&want, &have);
        assert_eq!(u.len(), 21);
        assert_eq!(u.last(), Some(&PeerUpdate::Remove(key(30_000))));
        let set: Vec<PeerUpdate> = (0..20_000)
            .filter(|i| i % 1000 == 7)
            .map(|i| PeerUpdate::Set(peer(i)))
            .collect();
        assert_eq!(u[..20], set[..]);
    }

    fn lease(key_s: &str, attrs: LeaseAttrs) -> Lease {
        Lease {
            key: key_s.parse().unwrap(),
            attrs,
            expiration: None,
        }
    }

    #[test]
    fn keys_round_trip_and_bad_ones_are_refused() {
        let k = key(KEY_A);
        assert_eq!(k.to_string(), KEY_A);
        assert_eq!(
            WgKey::parse(&format!("{KEY_A}\n")).unwrap(),
            k,
            "wg genkey > file"
        );
        assert!(matches!(
            WgKey::parse("not base64!"),
            Err(KeyError::NotBase64 { .. })
        ));
        assert_eq!(WgKey::parse("AAAA"), Err(KeyError::WrongLength { len: 3 }));
        assert!(WgKey::parse("").is_err());
        assert_eq!(format!("{:?}", SecretKey(k)), "SecretKey(<redacted>)");
    }

    #[test]
    fn lease_json_is_upstreams() {
        let k = key(KEY_A);
        let a = lease_attrs(
            Some("172.16.1.14".parse().unwrap()),
            None,
            &k,
            Some(51820),
            None,
        );
        assert_eq!(
            a.to_json(),
            format!(
                r#"{{"PublicIP":"172.16.1.14","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{KEY_A}","Port":51820}}}}"#
            )
        );
        assert_eq!(lease_data(&a, IpFamily::V4), Some((k, 51820)));
        assert_eq!(lease_data(&a, IpFamily::V6), None);
        let d = lease_attrs(
            Some("172.16.1.14".parse().unwrap()),
            Some("fd00:1::14".parse().unwrap()),
            &k,
            Some(51820),
            Some(51821),
        );
        assert_eq!(
            d.to_json(),
            format!(
                r#"{{"PublicIP":"172.16.1.14","PublicIPv6":"fd00:1::14","BackendType":"wireguard","BackendData":{{"PublicKey":"{KEY_A}","Port":51820}},"BackendV6Data":{{"PublicKey":"{KEY_A}","Port":51821}}}}"#
            )
        );
        // IPv6 only: PublicIP 0.0.0.0, no BackendData.
        let v6 = lease_attrs(
            None,
            Some("fd00:1::14".parse().unwrap()),
            &k,
            None,
            Some(51821),
        );
        assert_eq!(
            v6.to_json(),
            format!(
                r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:1::14","BackendType":"wireguard","BackendV6Data":{{"PublicKey":"{KEY_A}","Port":51821}}}}"#
            )
        );
        // Older flannel wrote no Port: 0, the receiver's own port.
        let old = LeaseAttrs::from_json(&format!(
            r#"{{"PublicIP":"172.16.1.13","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{KEY_B}"}}}}"#
        ))
        .unwrap();
        assert_eq!(lease_data(&old, IpFamily::V4), Some((key(KEY_B), 0)));
        for bad in [
            r#"{"PublicKey":"nope"}"#,
            r#"{"Port":51820}"#,
            r#"null"#,
            r#"{"PublicKey":"AAAA","Port":1}"#,
        ] {
            let mut a = old.clone();
            a.backend_data = Some(crate::lease::BackendData::from_json(bad).unwrap());
            assert_eq!(lease_data(&a, IpFamily::V4), None, "{bad}");
        }
    }

    #[test]
    fn kube_annotations_are_upstreams() {
        let names =
            crate::kube::AnnotationNames::new(wire::DEFAULT_KUBE_ANNOTATION_PREFIX).unwrap();
        let a = lease_attrs(
            Some("172.16.1.14".parse().unwrap()),
            Some("fd00:1::14".parse().unwrap()),
            &key(KEY_A),
            Some(51820),
            Some(51821),
        );
        let got = crate::kube::desired_annotations(&names, &a, &Default::default());
        let get = |n: &str| got.get(n).map(String::as_str);
        assert_eq!(get(&names.backend_type), Some("wireguard"));
        assert_eq!(
            get(&names.backend_data).unwrap(),
            format!(r#"{{"PublicKey":"{KEY_A}","Port":51820}}"#)
        );
        assert_eq!(
            get(&names.backend_v6_data).unwrap(),
            format!(r#"{{"PublicKey":"{KEY_A}","Port":51821}}"#)
        );
        assert_eq!(get(&names.public_ipv6), Some("fd00:1::14"));
    }

    fn wg_lease(subnets: &str, ip: Option<&str>, ip6: Option<&str>, k: &str) -> Lease {
        let lk: LeaseKey = subnets.parse().unwrap();
        lease(
            subnets,
            lease_attrs(
                ip.map(|s| s.parse().unwrap()),
                ip6.map(|s| s.parse().unwrap()),
                &key(k),
                lk.ipv4.map(|_| 51820),
                lk.ipv6.map(|_| 51821),
            ),
        )
    }

    #[test]
    fn separate_mode_gives_one_peer_per_family_and_device() {
        let own: LeaseKey = "10.244.1.0-24&fd00:10:244:1::-64".parse().unwrap();
        let leases = vec![
            wg_lease(
                "10.244.1.0-24&fd00:10:244:1::-64",
                Some("172.16.1.14"),
                Some("fd00:1::14"),
                KEY_A,
            ),
            wg_lease(
                "10.244.2.0-24&fd00:10:244:2::-64",
                Some("172.16.1.13"),
                Some("fd00:1::13"),
                KEY_B,
            ),
        ];
        let now = SystemTime::now();
        let local = LocalAddrs::default();
        let v4 = wireguard_peers(
            &leases,
            Some(&own),
            Some(&key(KEY_A)),
            DeviceRole::Separate(IpFamily::V4),
            &local,
            51820,
            now,
        );
        assert_eq!(
            v4,
            vec![WgPeer {
                public_key: key(KEY_B),
                endpoint: "172.16.1.13:51820".parse().unwrap(),
                allowed_ips: vec!["10.244.2.0/24".parse().unwrap()],
            }]
        );
        let v6 = wireguard_peers(
            &leases,
            Some(&own),
            None,
            DeviceRole::Separate(IpFamily::V6),
            &local,
            51821,
            now,
        );
        assert_eq!(
            v6,
            vec![WgPeer {
                public_key: key(KEY_B),
                endpoint: "[fd00:1::13]:51821".parse().unwrap(),
                allowed_ips: vec!["fd00:10:244:2::/64".parse().unwrap()],
            }]
        );
        assert_eq!(
            DeviceRole::Separate(IpFamily::V6).device_name(),
            "flannel-wg-v6"
        );
        assert_eq!(
            DeviceRole::Separate(IpFamily::V4).device_name(),
            "flannel-wg"
        );
    }

    #[test]
    fn single_device_modes_pick_the_endpoint_family() {
        let leases = vec![wg_lease(
            "10.244.2.0-24&fd00:10:244:2::-64",
            Some("172.16.1.13"),
            Some("2001:db8::13"),
            KEY_B,
        )];
        let now = SystemTime::now();
        let peers = |mode, local: LocalAddrs| {
            wireguard_peers(
                &leases,
                None,
                None,
                DeviceRole::Single(mode),
                &local,
                51820,
                now,
            )
        };
        let both: Vec<IpNet> = vec![
            "10.244.2.0/24".parse().unwrap(),
            "fd00:10:244:2::/64".parse().unwrap(),
        ];
        let p = peers(WireguardMode::Ipv4, LocalAddrs::default());
        assert_eq!(p[0].endpoint, "172.16.1.13:51820".parse().unwrap());
        assert_eq!(p[0].allowed_ips, both);
        // IPv6: the port of BackendV6Data, as upstream.
        let p = peers(WireguardMode::Ipv6, LocalAddrs::default());
        assert_eq!(p[0].endpoint, "[2001:db8::13]:51821".parse().unwrap());
        // auto: a private peer IPv4, public IPv6 on both sides -> IPv6.
        let local = LocalAddrs {
            v4: Some("172.16.1.14".parse().unwrap()),
            v6: Some("2001:db8::14".parse().unwrap()),
        };
        assert_eq!(
            peers(WireguardMode::Auto, local)[0].endpoint.ip(),
            "2001:db8::13".parse::<IpAddr>().unwrap()
        );
        // ... our IPv6 is a ULA -> IPv4.
        let ula = LocalAddrs {
            v6: Some("fd00::14".parse().unwrap()),
            ..local
        };
        assert!(peers(WireguardMode::Auto, ula)[0].endpoint.is_ipv4());
    }

    #[test]
    fn auto_family_is_upstreams_select_mode() {
        let l = |v4: Option<&str>, v6: Option<&str>| LocalAddrs {
            v4: v4.map(|s| s.parse().unwrap()),
            v6: v6.map(|s| s.parse().unwrap()),
        };
        let p4 = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
        let p6 = |s: &str| Some(s.parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            auto_family(p4("10.0.0.1"), None, &l(None, None)),
            IpFamily::V4
        );
        assert_eq!(
            auto_family(
                p4("8.8.8.8"),
                p6("2001:db8::1"),
                &l(Some("10.0.0.2"), Some("2001:db8::2"))
            ),
            IpFamily::V4
        );
        assert_eq!(
            auto_family(
                p4("10.0.0.1"),
                p6("2001:db8::1"),
                &l(Some("10.0.0.2"), Some("2001:db8::2"))
            ),
            IpFamily::V6
        );
        assert_eq!(
            auto_family(
                p4("10.0.0.1"),
                p6("fd00::1"),
                &l(Some("10.0.0.2"), Some("2001:db8::2"))
            ),
            IpFamily::V4
        );
        assert_eq!(
            auto_family(
                p4("10.0.0.1"),
                p6("2001:db8::1"),
                &l(Some("10.0.0.2"), None)
            ),
            IpFamily::V4
        );
        // An IPv6-only peer (PublicIP 0.0.0.0) and an IPv6-only node: IPv6.
        assert_eq!(
            auto_family(None, p6("2001:db8::1"), &l(None, Some("2001:db8::2"))),
            IpFamily::V6
        );
    }

    #[test]
    fn peers_skip_own_foreign_and_unusable_leases_and_merge_by_key() {
        let own: LeaseKey = "10.244.1.0-24".parse().unwrap();
        let now = SystemTime::now();
        let mut leases = vec![
            wg_lease("10.244.1.0-24", Some("172.16.1.14"), None, KEY_A),
            wg_lease("10.244.2.0-24", Some("172.16.1.13"), None, KEY_B),
            // The same node's second (stale) lease: merged.
            wg_lease("10.244.9.0-24", Some("172.16.1.99"), None, KEY_B),
            // No PublicIP: no endpoint.
            wg_lease("10.244.3.0-24", None, None, KEY_A),
            // Overlapping our subnet.
            wg_lease("10.244.0.0-23", Some("172.16.1.7"), None, KEY_A),
        ];
        // A vxlan lease and an expired one.
        leases.push(lease(
            "10.244.4.0-24",
            LeaseAttrs::new("vxlan", Some("172.16.1.4".parse().unwrap()), None),
        ));
        let mut expired = wg_lease("10.244.5.0-24", Some("172.16.1.5"), None, KEY_A);
        expired.expiration = Some(SystemTime::UNIX_EPOCH);
        leases.push(expired);
        let p = wireguard_peers(
            &leases,
            Some(&own),
            Some(&key(KEY_A)),
            DeviceRole::Separate(IpFamily::V4),
            &LocalAddrs::default(),
            51820,
            now,
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].public_key, key(KEY_B));
        assert_eq!(p[0].endpoint, "172.16.1.13:51820".parse().unwrap());
        assert_eq!(
            p[0].allowed_ips,
            vec![
                "10.244.2.0/24".parse::<IpNet>().unwrap(),
                "10.244.9.0/24".parse().unwrap()
            ]
        );
        // A missing Port is the fallback (our listen port).
        let mut old = wg_lease("10.244.6.0-24", Some("172.16.1.6"), None, KEY_A);
        old.attrs.backend_data = Some(crate::lease::BackendData::new(
            &serde_json::json!({ "PublicKey": KEY_A }),
        ));
        let p = wireguard_peers(
            &[old],
            Some(&own),
            None,
            DeviceRole::Separate(IpFamily::V4),
            &LocalAddrs::default(),
            40000,
            now,
        );
        assert_eq!(p[0].endpoint.port(), 40000);
    }

    #[test]
    fn allowed_ips_longest_prefix_per_family() {
        let peer = |k: &str, nets: &[&str]| WgPeer {
            public_key: key(k),
            endpoint: "172.16.1.1:51820".parse().unwrap(),
            allowed_ips: nets.iter().map(|n| n.parse().unwrap()).collect(),
        };
        let peers = vec![
            peer(KEY_A, &["10.244.0.0/16", "fd00:10:244::/56"]),
            peer(KEY_B, &["10.244.2.0/24", "fd00:10:244:2::/64", "0.0.0.0/0"]),
        ];
        let t = AllowedIps::new(&peers);
        let at = |s: &str| t.lookup(s.parse().unwrap());
        assert_eq!(at("10.244.2.7"), Some(1));
        assert_eq!(at("10.244.3.7"), Some(0));
        assert_eq!(at("192.168.0.1"), Some(1), "0.0.0.0/0");
        assert_eq!(at("fd00:10:244:2::5"), Some(1));
        assert_eq!(at("fd00:10:244:3::5"), Some(0));
        assert_eq!(at("fd00:99::1"), None);
        assert!(allows(&peers[1].allowed_ips, "10.244.2.9".parse().unwrap()));
        assert!(!allows(
            &peers[0].allowed_ips,
            "10.245.0.1".parse().unwrap()
        ));
        assert_eq!(
            AllowedIps::new(&[]).lookup("10.0.0.1".parse().unwrap()),
            None
        );
    }

    #[test]
    fn ip_summaries_and_padding() {
        let mut v4 = vec![0u8; 60];
        v4[0] = 0x45;
        v4[2..4].copy_from_slice(&52u16.to_be_bytes());
        v4[12..16].copy_from_slice(&[10, 244, 1, 2]);
        v4[16..20].copy_from_slice(&[10, 244, 2, 2]);
        let s = ip_summary(&v4).unwrap();
        assert_eq!(
            (s.src, s.dst, s.len),
            (
                "10.244.1.2".parse().unwrap(),
                "10.244.2.2".parse().unwrap(),
                52
            )
        );
        v4[2..4].copy_from_slice(&61u16.to_be_bytes());
        assert_eq!(ip_summary(&v4), None, "longer than given");
        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        v6[4..6].copy_from_slice(&8u16.to_be_bytes());
        v6[23] = 1;
        v6[39] = 2;
        let s = ip_summary(&v6).unwrap();
        assert_eq!(
            (s.src, s.dst, s.len),
            ("::1".parse().unwrap(), "::2".parse().unwrap(), 48)
        );
        assert_eq!(ip_summary(&[0x10; 40]), None);
        assert_eq!(ip_summary(&[]), None);
        assert_eq!(padded_len(52, 1420), 64);
        assert_eq!(padded_len(64, 1420), 64);
        assert_eq!(padded_len(1419, 1420), 1420, "never past the MTU");
        assert_eq!(padded_len(1420, 1420), 1420);
    }

    #[test]
    fn counters_array_round_trip() {
        let c = Counters {
            tx_packets: 1,
            tun_write_errors: 12,
            dropped_not_allowed: 8,
            ..Counters::default()
        };
        assert_eq!(Counters::from_array(c.to_array()), c);
        let mut d = c;
        d.add(&c);
        assert_eq!(d.tun_write_errors, 24);
    }
}
