//! Kernel WireGuard devices over generic netlink: what `wg show DEV dump`
//! reads (`WG_CMD_GET_DEVICE`) and `wg set DEV ...` writes
//! (`WG_CMD_SET_DEVICE`). The device itself is a link
//! ([`crate::Netlink::add_wireguard_link`]).
//!
//! The kernel's quirks this follows:
//! - `WG_CMD_GET_DEVICE` is a dump only; a device with many peers comes in
//!   several messages, and one peer's allowed IPs may continue in the next
//!   message under the same public key (so do `wg(8)`'s readers);
//! - a `WG_CMD_SET_DEVICE` must fit the socket's send buffer, so large
//!   peer lists go in several messages (as `wg(8)` does), the device's own
//!   fields in the first;
//! - a preshared key reads back as 32 zero bytes when none is set, and
//!   writing 32 zero bytes clears it.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use flannel_core::wireguard::{KernelPeer, PeerUpdate, SecretKey, WgKey};
use ipnet::IpNet;
use netlink_packet_core::Emitable;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use netlink_sys::protocols::NETLINK_GENERIC;

use crate::transport::{Transport, DUMP};
use crate::{check_ifname, Error, Result};

/// The generic netlink family of WireGuard (`genl ctrl get name wireguard`).
pub const FAMILY_NAME: &str = "wireguard";

/// Bytes of peers per `WG_CMD_SET_DEVICE` message: far below the default
/// socket send buffer (208 KiB), a few hundred peers.
const SET_CHUNK: usize = 32 * 1024;

/// A kernel WireGuard device as `wg show DEV dump` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgDeviceState {
    pub ifindex: u32,
    /// `None` until a private key is set.
    pub private_key: Option<SecretKey>,
    /// 0 until the device is up with a port (the kernel then picks one).
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<WgPeerState>,
}

/// One peer of a [`WgDeviceState`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeerState {
    /// What flannel sets; its allowed IPs sorted.
    pub peer: KernelPeer,
    /// `None`: no handshake yet.
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// One `wg set DEV [private-key K] [listen-port P] [peer ...]...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WgDeviceSet<'a> {
    pub private_key: Option<&'a SecretKey>,
    pub listen_port: Option<u16>,
    pub peers: &'a [PeerUpdate],
}

/// A NETLINK_GENERIC socket that speaks the `wireguard` family, bound to
/// the namespace it was opened in (like [`crate::Netlink`]).
pub struct WireguardNetlink {
    t: Transport,
    family: u16,
}

impl WireguardNetlink {
    /// Opens a NETLINK_GENERIC socket in the calling thread's namespace and
    /// resolves the `wireguard` family. Fails (ENOENT) when the kernel has
    /// no WireGuard: create a `wireguard` link first, which loads the
    /// module.
    pub fn open() -> Result<Self> {
        let mut t = Transport::open_protocol(NETLINK_GENERIC, &[], 1 << 20).map_err(|source| {
            Error::Kernel {
                op: "socket(AF_NETLINK, NETLINK_GENERIC)".into(),
                source,
            }
        })?;
        let op = format!("genl ctrl get name {FAMILY_NAME}");
        let req = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(FAMILY_NAME.into())],
        });
        let replies = t.request(req, 0, &op)?;
        let family = replies
            .iter()
            .flat_map(|m| &m.payload.nlas)
            .find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })
            .ok_or_else(|| Error::Protocol {
                op,
                detail: "the reply carries no family id".into(),
            })?;
        Ok(WireguardNetlink { t, family })
    }

    fn message(
        &self,
        cmd: WireguardCmd,
        attributes: Vec<WireguardAttribute>,
    ) -> GenlMessage<WireguardMessage> {
        let mut m = GenlMessage::from_payload(WireguardMessage { cmd, attributes });
        m.set_resolved_family_id(self.family);
        m
    }

    /// `wg show NAME dump`; `Ok(None)` when there is no such link, or it is
    /// not a WireGuard device.
    pub fn get_device(&mut self, name: &str) -> Result<Option<WgDeviceState>> {
        let op = format!("wg show {name} dump");
        check_ifname(&op, "device name", name)?;
        let req = self.message(
            WireguardCmd::GetDevice,
            vec![WireguardAttribute::IfName(name.to_string())],
        );
        match self.t.request(req, DUMP, &op) {
            Ok(replies) => Ok(Some(device_state(
                replies.iter().map(|m| m.payload.attributes.as_slice()),
            ))),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENODEV) | Some(libc::EOPNOTSUPP)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// `wg set NAME ...`: the private key and listen port when given, then
    /// each peer update (`Set` replaces the peer's allowed IPs and keeps its
    /// session; `Remove` removes it). Sent in as many messages as the peers
    /// need; a failure part-way leaves the earlier messages applied, which
    /// the next read-back sees.
    pub fn set_device(&mut self, name: &str, set: &WgDeviceSet<'_>) -> Result<()> {
        let op = format!("wg set {name}");
        check_ifname(&op, "device name", name)?;
        for attrs in set_messages(name, set) {
            let req = self.message(WireguardCmd::SetDevice, attrs);
            self.t.request(req, 0, &op)?;
        }
        Ok(())
    }
}

/// The attributes of each `WG_CMD_SET_DEVICE` message of `set`: the
/// device's own fields in the first, peers packed up to [`SET_CHUNK`]
/// bytes a message (one peer is never split).
fn set_messages(name: &str, set: &WgDeviceSet<'_>) -> Vec<Vec<WireguardAttribute>> {
    let mut head = vec![WireguardAttribute::IfName(name.to_string())];
    if let Some(k) = set.private_key {
        head.push(WireguardAttribute::PrivateKey(k.0 .0));
    }
    if let Some(p) = set.listen_port {
        head.push(WireguardAttribute::ListenPort(p));
    }
    let mut out = Vec::new();
    let mut peers: Vec<WireguardPeer> = Vec::new();
    let mut bytes = 0;
    for u in set.peers {
        let p = peer_attrs(u);
        let len = std::slice::from_ref(&p).buffer_len();
        if !peers.is_empty() && bytes + len > SET_CHUNK {
            let mut attrs = std::mem::replace(
                &mut head,
                vec![WireguardAttribute::IfName(name.to_string())],
            );
            attrs.push(WireguardAttribute::Peers(std::mem::take(&mut peers)));
            out.push(attrs);
            bytes = 0;
        }
        bytes += len;
        peers.push(p);
    }
    if !peers.is_empty() {
        head.push(WireguardAttribute::Peers(peers));
    }
    // The name alone is worth sending only as the whole (empty) set.
    if head.len() > 1 || out.is_empty() {
        out.push(head);
    }
    out
}

fn peer_attrs(u: &PeerUpdate) -> WireguardPeer {
    match u {
        PeerUpdate::Remove(key) => WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(key.0),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
        ]),
        PeerUpdate::Set(p) => {
            let mut a = vec![
                WireguardPeerAttribute::PublicKey(p.public_key.0),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
                // Zeros clear a key set before.
                WireguardPeerAttribute::PresharedKey(p.preshared_key.map_or([0; 32], |k| k.0 .0)),
                WireguardPeerAttribute::PersistentKeepalive(p.persistent_keepalive),
            ];
            if let Some(e) = p.endpoint {
                a.push(WireguardPeerAttribute::Endpoint(e));
            }
            a.push(WireguardPeerAttribute::AllowedIps(
                p.allowed_ips.iter().map(allowed_ip).collect(),
            ));
            WireguardPeer(a)
        }
    }
}

fn allowed_ip(net: &IpNet) -> WireguardAllowedIp {
    let family = match net {
        IpNet::V4(_) => WireguardAddressFamily::Ipv4,
        IpNet::V6(_) => WireguardAddressFamily::Ipv6,
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(net.network()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ])
}

/// Folds the messages of one `WG_CMD_GET_DEVICE` dump into the device: a
/// peer whose key is the previous message's last peer continues it.
fn device_state<'a>(messages: impl IntoIterator<Item = &'a [WireguardAttribute]>) -> WgDeviceState {
    let mut dev = WgDeviceState {
        ifindex: 0,
        private_key: None,
        listen_port: 0,
        fwmark: 0,
        peers: Vec::new(),
    };
    for attrs in messages {
        for a in attrs {
            match a {
                WireguardAttribute::IfIndex(i) => dev.ifindex = *i,
                WireguardAttribute::PrivateKey(k) if *k != [0; 32] => {
                    dev.private_key = Some(SecretKey(WgKey(*k)))
                }
                WireguardAttribute::ListenPort(p) => dev.listen_port = *p,
                WireguardAttribute::Fwmark(m) => dev.fwmark = *m,
                WireguardAttribute::Peers(peers) => {
                    for p in peers {
                        let state = peer_state(p);
                        match dev.peers.last_mut() {
                            Some(last) if last.peer.public_key == state.peer.public_key => {
                                last.peer.allowed_ips.extend(state.peer.allowed_ips);
                            }
                            _ => dev.peers.push(state),
                        }
                    }
                }
                _ => {}
            }
        }
    }
    for p in &mut dev.peers {
        p.peer.allowed_ips.sort();
    }
    dev
}

fn peer_state(p: &WireguardPeer) -> WgPeerState {
    let mut s = WgPeerState {
        peer: KernelPeer {
            public_key: WgKey([0; 32]),
            preshared_key: None,
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: 0,
        },
        last_handshake: None,
        rx_bytes: 0,
        tx_bytes: 0,
    };
    for a in &p.0 {
        match a {
            WireguardPeerAttribute::PublicKey(k) => s.peer.public_key = WgKey(*k),
            WireguardPeerAttribute::PresharedKey(k) if *k != [0; 32] => {
                s.peer.preshared_key = Some(SecretKey(WgKey(*k)))
            }
            WireguardPeerAttribute::Endpoint(e) => s.peer.endpoint = Some(plain(*e)),
            WireguardPeerAttribute::PersistentKeepalive(k) => s.peer.persistent_keepalive = *k,
            WireguardPeerAttribute::LastHandshake(t) if t.seconds > 0 || t.nano_seconds > 0 => {
                s.last_handshake = Some(
                    SystemTime::UNIX_EPOCH
                        + Duration::new(
                            t.seconds as u64,
                            t.nano_seconds.clamp(0, 999_999_999) as u32,
                        ),
                )
            }
            WireguardPeerAttribute::RxBytes(b) => s.rx_bytes = *b,
            WireguardPeerAttribute::TxBytes(b) => s.tx_bytes = *b,
            WireguardPeerAttribute::AllowedIps(ips) => {
                s.peer.allowed_ips.extend(ips.iter().filter_map(net_of))
            }
            _ => {}
        }
    }
    s
}

/// An endpoint as we set them: no flow label or scope.
fn plain(e: SocketAddr) -> SocketAddr {
    match e {
        SocketAddr::V6(mut v6) => {
            v6.set_flowinfo(0);
            SocketAddr::V6(v6)
        }
        v4 => v4,
    }
}

fn net_of(ip: &WireguardAllowedIp) -> Option<IpNet> {
    let mut addr = None;
    let mut cidr = None;
    for a in &ip.0 {
        match a {
            WireguardAllowedIpAttr::IpAddr(x) => addr = Some(*x),
            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(*c),
            _ => {}
        }
    }
    IpNet::new(addr?, cidr?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> KernelPeer {
        KernelPeer {
            public_key: WgKey([n; 32]),
            preshared_key: None,
            endpoint: Some(SocketAddr::from(([172, 16, 1, n], 51820))),
            allowed_ips: vec![format!("10.244.{n}.0/24").parse().unwrap()],
            persistent_keepalive: 0,
        }
    }

    fn peers_of(attrs: &[WireguardAttribute]) -> &[WireguardPeer] {
        attrs
            .iter()
            .find_map(|a| match a {
                WireguardAttribute::Peers(p) => Some(p.as_slice()),
                _ => None,
            })
            .unwrap_or(&[])
    }

    /// The messages of a set of key `[9; 32]`, port 51820 and `peers`.
    fn keyed_set(peers: &[PeerUpdate]) -> Vec<Vec<WireguardAttribute>> {
        let key = SecretKey(WgKey([9; 32]));
        set_messages(
            "flannel-wg",
            &WgDeviceSet {
                private_key: Some(&key),
                listen_port: Some(51820),
                peers,
            },
        )
    }

    #[test]
    fn a_set_without_peers_is_one_message() {
        let m = keyed_set(&[]);
        assert_eq!(
            m,
            vec![vec![
                WireguardAttribute::IfName("flannel-wg".into()),
                WireguardAttribute::PrivateKey([9; 32]),
                WireguardAttribute::ListenPort(51820),
            ]]
        );
    }

    #[test]
    fn many_peers_are_chunked_below_the_send_buffer_and_none_is_lost() {
        let updates: Vec<PeerUpdate> = (0..2000u32)
            .map(|i| {
                let mut p = peer((i % 250) as u8);
                p.public_key.0[..4].copy_from_slice(&i.to_be_bytes());
                if i % 3 == 0 {
                    PeerUpdate::Remove(p.public_key)
                } else {
                    PeerUpdate::Set(p)
                }
            })
            .collect();
        let m = keyed_set(&updates);
        assert!(m.len() > 2, "{} messages", m.len());
        assert!(m[0].contains(&WireguardAttribute::PrivateKey([9; 32])));
        for (i, attrs) in m.iter().enumerate() {
            assert_eq!(attrs[0], WireguardAttribute::IfName("flannel-wg".into()));
            assert!(
                attrs.as_slice().buffer_len() < SET_CHUNK + 256,
                "message {i}"
            );
            if i > 0 {
                assert!(!attrs.iter().any(|a| matches!(
                    a,
                    WireguardAttribute::PrivateKey(_) | WireguardAttribute::ListenPort(_)
                )));
            }
        }
        let keys: Vec<[u8; 32]> = m
            .iter()
            .flat_map(|a| peers_of(a))
            .map(|p| match &p.0[0] {
                WireguardPeerAttribute::PublicKey(k) => *k,
                a => panic!("{a:?}"),
            })
            .collect();
        let want: Vec<[u8; 32]> = updates
            .iter()
            .map(|u| match u {
                PeerUpdate::Set(p) => p.public_key.0,
                PeerUpdate::Remove(k) => k.0,
            })
            .collect();
        assert_eq!(keys, want);
    }

    #[test]
    fn updates_encode_as_wg_set_does_and_read_back_the_same() {
        let mut p = peer(2);
        p.preshared_key = Some(SecretKey(WgKey([5; 32])));
        p.persistent_keepalive = 25;
        p.allowed_ips.push("fd00:0:0:2::/64".parse().unwrap());
        let set = peer_attrs(&PeerUpdate::Set(p.clone()));
        assert!(set.0.contains(&WireguardPeerAttribute::Flags(
            WireguardPeerFlags::ReplaceAllowedIps
        )));
        let rm = peer_attrs(&PeerUpdate::Remove(WgKey([3; 32])));
        assert_eq!(
            rm.0,
            vec![
                WireguardPeerAttribute::PublicKey([3; 32]),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ]
        );
        // Through the bytes and back, as the kernel's dump would carry it.
        let msg = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![
                WireguardAttribute::IfIndex(7),
                WireguardAttribute::ListenPort(51820),
                WireguardAttribute::Peers(vec![set]),
            ],
        };
        let mut g = GenlMessage::from_payload(msg);
        g.set_resolved_family_id(30);
        g.finalize();
        let mut buf = vec![0; g.buffer_len()];
        g.emit(&mut buf);
        use netlink_packet_core::ParseableParametrized;
        let back = GenlMessage::<WireguardMessage>::parse_with_param(buf.as_slice(), 30).unwrap();
        let dev = device_state([back.payload.attributes.as_slice()]);
        assert_eq!(dev.ifindex, 7);
        assert_eq!(dev.listen_port, 51820);
        assert_eq!(dev.peers.len(), 1);
        assert_eq!(dev.peers[0].peer, p);
    }

    #[test]
    fn a_peer_continued_in_the_next_message_is_merged() {
        let first = vec![WireguardAttribute::Peers(vec![
            peer_attrs(&PeerUpdate::Set(peer(1))),
            peer_attrs(&PeerUpdate::Set(peer(2))),
        ])];
        let mut cont = peer(2);
        cont.allowed_ips = vec!["10.9.0.0/16".parse().unwrap()];
        let second = vec![WireguardAttribute::Peers(vec![
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey([2; 32]),
                WireguardPeerAttribute::AllowedIps(vec![allowed_ip(&cont.allowed_ips[0])]),
            ]),
            peer_attrs(&PeerUpdate::Set(peer(3))),
        ])];
        let dev = device_state([first.as_slice(), second.as_slice()]);
        assert_eq!(dev.peers.len(), 3);
        let mut two = peer(2);
        two.allowed_ips.insert(0, "10.9.0.0/16".parse().unwrap());
        assert_eq!(dev.peers[1].peer, two);
        assert_eq!(dev.peers[2].peer, peer(3));
    }
}
