//! ICMP echo from Rust (what `ping` and `ping -6` do): a raw ICMP or ICMPv6
//! socket opened inside a namespace. A socket belongs to the namespace it was
//! created in for its whole life, so after creating it on a thread that
//! entered the pod's namespace it can be used from any thread.
//!
//! One [`Pinger`] for both families, generic over the address type; the
//! families differ only in the items of [`IcmpFamily`]:
//!
//! - the socket: `AF_INET`/`IPPROTO_ICMP` or `AF_INET6`/`IPPROTO_ICMPV6`;
//! - the echo types: 8 and 0, or 128 and 129;
//! - the checksum: ours for ICMP (RFC 1071); for ICMPv6 it covers a
//!   pseudo-header the socket cannot see, and the kernel always computes it
//!   on raw ICMPv6 sockets, so the request leaves it 0;
//! - the reply: a raw IPv4 socket hands over the whole datagram, so TTL and
//!   source come from the IP header; a raw ICMPv6 socket never hands over the
//!   IP header, so the hop limit comes as ancillary data (`IPV6_HOPLIMIT`,
//!   once `IPV6_RECVHOPLIMIT` is on) and the source from `recvmsg`'s address.
//!
//! The TTL or hop limit is the hop count the packet walk reads: 62 pod to
//! pod across nodes.

use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use flannel_netlink::netns::NetNs;

use super::{io_err, ns_err, Result};

const PAYLOAD: &[u8; 32] = b"flannel-rs lab ping payload 0123";

static NEXT_ID: AtomicU16 = AtomicU16::new(0);

mod sealed {
    pub trait Sealed {}
    impl Sealed for std::net::Ipv4Addr {}
    impl Sealed for std::net::Ipv6Addr {}
}

/// The per-family parts of ICMP echo, implemented by [`Ipv4Addr`] (ICMP) and
/// [`Ipv6Addr`] (ICMPv6).
pub trait IcmpFamily: sealed::Sealed + Copy + Eq + fmt::Debug + Send + 'static {
    /// `ICMP` or `ICMPv6`, for error messages.
    const NAME: &'static str;
    /// The `socket(2)` call, for error messages.
    const SOCKET_CALL: &'static str;
    const DOMAIN: libc::c_int;
    const PROTOCOL: libc::c_int;
    const ECHO_REQUEST: u8;
    const ECHO_REPLY: u8;
    /// True when the kernel fills in the checksum of what we send.
    const KERNEL_CHECKSUM: bool;
    /// `sendto` errors that mean "no path to the destination": the pair
    /// fails, not the check.
    const NO_PATH_ERRNOS: &'static [libc::c_int];

    /// `sockaddr_in` or `sockaddr_in6`.
    type SockAddr: Copy;

    /// Socket options set right after `socket(2)`.
    fn configure(fd: &OwnedFd) -> io::Result<()>;

    /// The address as a socket address (port 0).
    fn to_sockaddr(self) -> Self::SockAddr;

    /// The address of a socket address.
    fn from_sockaddr(a: &Self::SockAddr) -> Self;

    /// Source, TTL or hop limit, and the ICMP message of a received
    /// datagram; `sender` is `recvmsg`'s address, `hop_limit` the
    /// `IPV6_HOPLIMIT` ancillary data if any.
    fn split_reply(
        datagram: &[u8],
        sender: Option<Self>,
        hop_limit: Option<u8>,
    ) -> Option<(Self, u8, &[u8])>;
}

impl IcmpFamily for Ipv4Addr {
    const NAME: &'static str = "ICMP";
    const SOCKET_CALL: &'static str = "socket(AF_INET, SOCK_RAW, ICMP)";
    const DOMAIN: libc::c_int = libc::AF_INET;
    const PROTOCOL: libc::c_int = libc::IPPROTO_ICMP;
    const ECHO_REQUEST: u8 = 8;
    const ECHO_REPLY: u8 = 0;
    const KERNEL_CHECKSUM: bool = false;
    type SockAddr = libc::sockaddr_in;
    const NO_PATH_ERRNOS: &'static [libc::c_int] =
        &[libc::ENETUNREACH, libc::EHOSTUNREACH, libc::EINVAL];

    fn configure(_: &OwnedFd) -> io::Result<()> {
        Ok(())
    }

    fn to_sockaddr(self) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(self.octets()),
            },
            sin_zero: [0; 8],
        }
    }

    fn from_sockaddr(a: &libc::sockaddr_in) -> Self {
        Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes())
    }

    fn split_reply(datagram: &[u8], _: Option<Self>, _: Option<u8>) -> Option<(Self, u8, &[u8])> {
        if datagram.len() < 20 || datagram[0] >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(datagram[0] & 0x0f) * 4;
        let src = Ipv4Addr::new(datagram[12], datagram[13], datagram[14], datagram[15]);
        Some((src, datagram[8], datagram.get(ihl..)?))
    }
}

impl IcmpFamily for Ipv6Addr {
    const NAME: &'static str = "ICMPv6";
    const SOCKET_CALL: &'static str = "socket(AF_INET6, SOCK_RAW, ICMPV6)";
    const DOMAIN: libc::c_int = libc::AF_INET6;
    const PROTOCOL: libc::c_int = libc::IPPROTO_ICMPV6;
    const ECHO_REQUEST: u8 = 128;
    const ECHO_REPLY: u8 = 129;
    const KERNEL_CHECKSUM: bool = true;
    type SockAddr = libc::sockaddr_in6;
    // IPv6 also refuses with EADDRNOTAVAIL while no source address is usable.
    const NO_PATH_ERRNOS: &'static [libc::c_int] = &[
        libc::ENETUNREACH,
        libc::EHOSTUNREACH,
        libc::EINVAL,
        libc::EADDRNOTAVAIL,
    ];

    fn configure(fd: &OwnedFd) -> io::Result<()> {
        let on: libc::c_int = 1;
        // SAFETY: valid fd and an int option value.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVHOPLIMIT,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn to_sockaddr(self) -> libc::sockaddr_in6 {
        libc::sockaddr_in6 {
            sin6_family: libc::AF_INET6 as libc::sa_family_t,
            sin6_port: 0,
            sin6_flowinfo: 0,
            sin6_addr: libc::in6_addr {
                s6_addr: self.octets(),
            },
            sin6_scope_id: 0,
        }
    }

    fn from_sockaddr(a: &libc::sockaddr_in6) -> Self {
        Ipv6Addr::from(a.sin6_addr.s6_addr)
    }

    fn split_reply(
        datagram: &[u8],
        sender: Option<Self>,
        hop_limit: Option<u8>,
    ) -> Option<(Self, u8, &[u8])> {
        Some((sender?, hop_limit?, datagram))
    }
}

/// An answered echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EchoReply<A = Ipv4Addr> {
    pub from: A,
    /// TTL (IPv4) or hop limit (IPv6) of the reply as received.
    pub ttl: u8,
    pub seq: u16,
    pub rtt: Duration,
}

/// A raw ICMP (`Pinger`, `Pinger<Ipv4Addr>`) or ICMPv6 (`Pinger<Ipv6Addr>`)
/// socket bound to one namespace.
pub struct Pinger<A = Ipv4Addr> {
    fd: OwnedFd,
    id: u16,
    seq: u16,
    family: PhantomData<A>,
}

impl<A: IcmpFamily> Pinger<A> {
    /// Opens the socket inside `ns` (e.g. a pod's namespace), as `ip netns
    /// exec NS ping` (or `ping -6`) would.
    pub fn open_in(ns: &NetNs) -> Result<Self> {
        let fd = ns
            .run(open_raw::<A>)
            .map_err(ns_err(format!(
                "entering {} to open an {} socket",
                ns.name,
                A::NAME
            )))?
            .map_err(io_err(format!("{} in {}", A::SOCKET_CALL, ns.name)))?;
        let id = next_id();
        Ok(Pinger {
            fd,
            id,
            seq: 0,
            family: PhantomData,
        })
    }

    /// Sends one echo request to `dst` and waits up to `timeout` for its reply
    /// (`ping -c 1 -W TIMEOUT DST` run inside the namespace). `Ok(None)` means
    /// no reply in time.
    pub fn echo(&mut self, dst: A, timeout: Duration) -> io::Result<Option<EchoReply<A>>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let packet = echo_request::<A>(self.id, seq);
        let (addr, addr_len) = storage_of(dst);
        let start = Instant::now();
        // SAFETY: valid buffer and a socket address of the stated length.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_storage).cast(),
                addr_len,
            )
        };
        if sent < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(errno) if A::NO_PATH_ERRNOS.contains(&errno) => Ok(None),
                _ => Err(e),
            };
        }
        let deadline = start + timeout;
        let mut buf = [0u8; 2048];
        let mut control = [0u8; 128];
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait_ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as i32;
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                continue;
            }
            // SAFETY: zeroed plain-old-data structs, filled in below.
            let mut from: libc::sockaddr_storage = unsafe { zeroed() };
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: as above.
            let mut msg: libc::msghdr = unsafe { zeroed() };
            msg.msg_name = (&mut from as *mut libc::sockaddr_storage).cast();
            msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control.len() as _;
            // SAFETY: msg points at live buffers of the lengths it states.
            let len = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
            if len < 0 {
                let e = io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    continue;
                }
                return Err(e);
            }
            // SAFETY: msg was filled by recvmsg; the CMSG macros walk its control buffer.
            let hop_limit = unsafe { hop_limit_of(&msg) };
            let sender = sender_in::<A>(&from);
            let datagram = &buf[..len as usize];
            if let Some(reply) = parse_reply(datagram, sender, hop_limit, self.id, seq, dst) {
                return Ok(Some(EchoReply {
                    rtt: start.elapsed(),
                    ..reply
                }));
            }
        }
    }
}

/// `addr` in a `sockaddr_storage` (what `sendto` takes), and its length.
pub(super) fn storage_of<A: IcmpFamily>(addr: A) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data: zero is a valid value.
    let mut s: libc::sockaddr_storage = unsafe { zeroed() };
    // SAFETY: sockaddr_storage is large and aligned enough for every socket
    // address type, and the write stays inside it.
    unsafe {
        std::ptr::write(
            (&mut s as *mut libc::sockaddr_storage).cast::<A::SockAddr>(),
            addr.to_sockaddr(),
        );
    }
    (s, size_of::<A::SockAddr>() as libc::socklen_t)
}

/// The address `recvmsg` put in `s`, if it is of the family.
fn sender_in<A: IcmpFamily>(s: &libc::sockaddr_storage) -> Option<A> {
    if libc::c_int::from(s.ss_family) != A::DOMAIN {
        return None;
    }
    // SAFETY: a sockaddr_storage of the family's domain holds its socket address type.
    let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<A::SockAddr>() };
    Some(A::from_sockaddr(a))
}

/// The `IPV6_HOPLIMIT` control message of a received datagram (only ICMPv6
/// sockets with `IPV6_RECVHOPLIMIT` on get one).
///
/// # Safety
/// `msg` must come from a successful `recvmsg` with a valid control buffer.
unsafe fn hop_limit_of(msg: &libc::msghdr) -> Option<u8> {
    let mut c = libc::CMSG_FIRSTHDR(msg);
    while !c.is_null() {
        if (*c).cmsg_level == libc::IPPROTO_IPV6 && (*c).cmsg_type == libc::IPV6_HOPLIMIT {
            let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
            return u8::try_from(v).ok();
        }
        c = libc::CMSG_NXTHDR(msg, c);
    }
    None
}

pub(super) fn open_raw<A: IcmpFamily>() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe { libc::socket(A::DOMAIN, libc::SOCK_RAW | libc::SOCK_CLOEXEC, A::PROTOCOL) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    A::configure(&fd)?;
    Ok(fd)
}

/// RFC 1071 Internet checksum.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The request; an ICMPv6 checksum stays 0 for the kernel to fill in.
pub(super) fn echo_request<A: IcmpFamily>(id: u16, seq: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + PAYLOAD.len());
    p.extend_from_slice(&[A::ECHO_REQUEST, 0, 0, 0]);
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(PAYLOAD);
    if !A::KERNEL_CHECKSUM {
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// Our echo reply from `dst` in a received datagram (RTT left zero), or None.
fn parse_reply<A: IcmpFamily>(
    datagram: &[u8],
    sender: Option<A>,
    hop_limit: Option<u8>,
    id: u16,
    seq: u16,
    dst: A,
) -> Option<EchoReply<A>> {
    reply_of(datagram, sender, hop_limit, id).filter(|r| r.seq == seq && r.from == dst)
}

/// Any echo reply to our identifier `id` in a received datagram, whatever
/// its sequence number and source (RTT left zero): the prober of `lab
/// chaos` keeps many requests in flight and matches them itself.
pub(super) fn reply_of<A: IcmpFamily>(
    datagram: &[u8],
    sender: Option<A>,
    hop_limit: Option<u8>,
    id: u16,
) -> Option<EchoReply<A>> {
    let (src, ttl, icmp) = A::split_reply(datagram, sender, hop_limit)?;
    if icmp.len() < 8 || icmp[0] != A::ECHO_REPLY || icmp[1] != 0 {
        return None;
    }
    let rid = u16::from_be_bytes([icmp[4], icmp[5]]);
    let rseq = u16::from_be_bytes([icmp[6], icmp[7]]);
    if rid != id || &icmp[8..] != PAYLOAD {
        return None;
    }
    Some(EchoReply {
        from: src,
        ttl,
        seq: rseq,
        rtt: Duration::ZERO,
    })
}

/// A fresh ICMP identifier: distinct per pinger of this process, so that
/// pingers sharing a namespace (a raw socket sees every ICMP packet of it)
/// tell their replies apart.
pub(super) fn next_id() -> u16 {
    (std::process::id() as u16)
        .wrapping_mul(31)
        .wrapping_add(NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_an_icmp_request_verifies_to_zero() {
        let p = echo_request::<Ipv4Addr>(0x1234, 7);
        assert_eq!(checksum(&p), 0);
        assert_eq!(p[0], 8);
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
    }

    #[test]
    fn an_icmpv6_request_leaves_the_checksum_to_the_kernel() {
        let p = echo_request::<Ipv6Addr>(0x1234, 7);
        assert_eq!(p[0], 128);
        assert_eq!(&p[2..4], &[0, 0]);
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
    }

    fn reply_datagram(ttl: u8, src: [u8; 4], id: u16, seq: u16) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, ttl, 1, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&[10, 244, 1, 2]);
        let mut icmp = echo_request::<Ipv4Addr>(id, seq);
        icmp[0] = Ipv4Addr::ECHO_REPLY;
        ip.extend_from_slice(&icmp);
        ip
    }

    #[test]
    fn ipv4_replies_are_matched_by_id_seq_and_source_with_the_ttl_of_the_ip_header() {
        let from = Ipv4Addr::new(10, 244, 2, 66);
        let d = reply_datagram(62, from.octets(), 9, 3);
        // recvmsg's address and any ancillary data play no part: the header has it all.
        let r = parse_reply(&d, None, Some(1), 9, 3, from).unwrap();
        assert_eq!((r.from, r.ttl, r.seq), (from, 62, 3));
        assert!(parse_reply(&d, None, None, 8, 3, from).is_none());
        assert!(parse_reply(&d, None, None, 9, 4, from).is_none());
        assert!(parse_reply(&d, None, None, 9, 3, Ipv4Addr::new(10, 244, 2, 67)).is_none());
        let mut req = d.clone();
        req[20] = Ipv4Addr::ECHO_REQUEST;
        assert!(parse_reply(&req, None, None, 9, 3, from).is_none());
        assert!(parse_reply(&d[..24], None, None, 9, 3, from).is_none());
    }

    #[test]
    fn ipv6_replies_are_matched_by_type_id_seq_and_sender_with_the_hop_limit_of_the_cmsg() {
        let from: Ipv6Addr = "fd00:10:244:2::2".parse().unwrap();
        let mut r = echo_request::<Ipv6Addr>(7, 3);
        let parse = |r: &[u8], sender, hl, id, seq| parse_reply(r, sender, hl, id, seq, from);
        assert!(parse(&r, Some(from), Some(62), 7, 3).is_none());
        r[0] = Ipv6Addr::ECHO_REPLY;
        let got = parse(&r, Some(from), Some(62), 7, 3).unwrap();
        assert_eq!((got.from, got.ttl, got.seq), (from, 62, 3));
        assert!(parse(&r, Some(from), Some(62), 8, 3).is_none());
        assert!(parse(&r, Some(from), Some(62), 7, 4).is_none());
        assert!(parse(&r[..10], Some(from), Some(62), 7, 3).is_none());
        // Another sender, no sender or no hop limit: not ours.
        assert!(parse(&r, Some(Ipv6Addr::LOCALHOST), Some(62), 7, 3).is_none());
        assert!(parse(&r, None, Some(62), 7, 3).is_none());
        assert!(parse(&r, Some(from), None, 7, 3).is_none());
    }

    #[test]
    fn socket_addresses_round_trip() {
        let a = Ipv4Addr::new(10, 244, 2, 66);
        let (s, len) = storage_of(a);
        assert_eq!(len as usize, size_of::<libc::sockaddr_in>());
        assert_eq!(sender_in::<Ipv4Addr>(&s), Some(a));
        assert_eq!(sender_in::<Ipv6Addr>(&s), None);
        let b: Ipv6Addr = "fd00:10:244:2::2".parse().unwrap();
        let (s, len) = storage_of(b);
        assert_eq!(len as usize, size_of::<libc::sockaddr_in6>());
        assert_eq!(sender_in::<Ipv6Addr>(&s), Some(b));
        assert_eq!(sender_in::<Ipv4Addr>(&s), None);
    }
}
