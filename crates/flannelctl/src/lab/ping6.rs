//! ICMPv6 echo from Rust (what `ping -6` does): a raw ICMPv6 socket opened
//! inside a namespace.
//!
//! Unlike IPv4, a raw ICMPv6 socket never hands over the IP header: the
//! reply's hop limit (the TTL the packet walk reads) comes as ancillary data
//! once `IPV6_RECVHOPLIMIT` is on, and the kernel computes the ICMPv6
//! checksum itself (it covers a pseudo-header the socket cannot see).

use std::io;
use std::mem::{size_of, zeroed};
use std::net::Ipv6Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use flannel_netlink::netns::NetNs;

use super::{io_err, ns_err, Result};

const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;
const PAYLOAD: &[u8; 32] = b"flannel-rs lab ping6 payload 012";

static NEXT_ID: AtomicU16 = AtomicU16::new(0x4000);

/// An answered ICMPv6 echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Echo6Reply {
    pub from: Ipv6Addr,
    /// Hop limit of the reply as received.
    pub hop_limit: u8,
    pub seq: u16,
    pub rtt: Duration,
}

/// A raw ICMPv6 socket bound to one namespace.
pub struct Pinger6 {
    fd: OwnedFd,
    id: u16,
    seq: u16,
}

impl Pinger6 {
    /// Opens the socket inside `ns`, as `ip netns exec NS ping -6` would.
    pub fn open_in(ns: &NetNs) -> Result<Pinger6> {
        let fd = ns
            .run(open_raw_icmp6)
            .map_err(ns_err(format!(
                "entering {} to open an ICMPv6 socket",
                ns.name
            )))?
            .map_err(io_err(format!(
                "socket(AF_INET6, SOCK_RAW, ICMPV6) in {}",
                ns.name
            )))?;
        let id = (std::process::id() as u16)
            .wrapping_mul(17)
            .wrapping_add(NEXT_ID.fetch_add(1, Ordering::Relaxed));
        Ok(Pinger6 { fd, id, seq: 0 })
    }

    /// Sends one echo request to `dst` and waits up to `timeout` for its
    /// reply (`ping -6 -c 1 -W TIMEOUT DST`). `Ok(None)`: no reply in time.
    pub fn echo(&mut self, dst: Ipv6Addr, timeout: Duration) -> io::Result<Option<Echo6Reply>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let packet = echo_request(self.id, seq);
        let addr = sockaddr6(dst);
        let start = Instant::now();
        // SAFETY: valid buffer and sockaddr_in6 of the right length.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_in6).cast(),
                size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENETUNREACH)
                | Some(libc::EHOSTUNREACH)
                | Some(libc::EINVAL)
                | Some(libc::EADDRNOTAVAIL) => Ok(None),
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
            let mut from: libc::sockaddr_in6 = unsafe { zeroed() };
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: as above.
            let mut msg: libc::msghdr = unsafe { zeroed() };
            msg.msg_name = (&mut from as *mut libc::sockaddr_in6).cast();
            msg.msg_namelen = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
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
            let src = Ipv6Addr::from(from.sin6_addr.s6_addr);
            // SAFETY: msg was filled by recvmsg; the CMSG macros walk its control buffer.
            let hop_limit = unsafe { hop_limit_of(&msg) };
            if src != dst {
                continue;
            }
            if let (Some(hl), Some(rseq)) =
                (hop_limit, parse_reply(&buf[..len as usize], self.id, seq))
            {
                return Ok(Some(Echo6Reply {
                    from: src,
                    hop_limit: hl,
                    seq: rseq,
                    rtt: start.elapsed(),
                }));
            }
        }
    }
}

/// The `IPV6_HOPLIMIT` control message of a received datagram.
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

fn open_raw_icmp6() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET6,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMPV6,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
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
    Ok(fd)
}

fn sockaddr6(ip: Ipv6Addr) -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is plain old data; zero is a valid value.
    let mut a: libc::sockaddr_in6 = unsafe { zeroed() };
    a.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    a.sin6_addr = libc::in6_addr {
        s6_addr: ip.octets(),
    };
    a
}

/// The request; the checksum stays 0 for the kernel to fill in.
fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + PAYLOAD.len());
    p.extend_from_slice(&[ICMP6_ECHO_REQUEST, 0, 0, 0]);
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(PAYLOAD);
    p
}

/// The sequence number of our echo reply (ICMPv6 message, no IP header), or None.
fn parse_reply(icmp: &[u8], id: u16, seq: u16) -> Option<u16> {
    if icmp.len() < 8 || icmp[0] != ICMP6_ECHO_REPLY || icmp[1] != 0 {
        return None;
    }
    let rid = u16::from_be_bytes([icmp[4], icmp[5]]);
    let rseq = u16::from_be_bytes([icmp[6], icmp[7]]);
    (rid == id && rseq == seq && &icmp[8..] == PAYLOAD).then_some(rseq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_matched_by_type_id_and_seq() {
        let mut r = echo_request(7, 3);
        assert_eq!(r[0], ICMP6_ECHO_REQUEST);
        assert!(parse_reply(&r, 7, 3).is_none());
        r[0] = ICMP6_ECHO_REPLY;
        assert_eq!(parse_reply(&r, 7, 3), Some(3));
        assert!(parse_reply(&r, 8, 3).is_none());
        assert!(parse_reply(&r, 7, 4).is_none());
        assert!(parse_reply(&r[..10], 7, 3).is_none());
    }
}
