//! ICMP echo from Rust (what `ping` does): a raw IPv4/ICMP socket opened
//! inside a namespace. A socket belongs to the namespace it was created in
//! for its whole life, so after creating it on a thread that entered the
//! pod's namespace it can be used from any thread.
//!
//! Raw sockets receive the whole IP datagram, which gives the reply's TTL
//! (the hop count the packet walk reads: 62 pod to pod across nodes).

use std::io;
use std::mem::size_of;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use flannel_netlink::netns::NetNs;

use super::{io_err, ns_err, Result};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const PAYLOAD: &[u8; 32] = b"flannel-rs lab ping payload 0123";

static NEXT_ID: AtomicU16 = AtomicU16::new(0);

/// An answered echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EchoReply {
    pub from: Ipv4Addr,
    /// TTL of the reply as received.
    pub ttl: u8,
    pub seq: u16,
    pub rtt: Duration,
}

/// A raw ICMP socket bound to one namespace.
pub struct Pinger {
    fd: OwnedFd,
    id: u16,
    seq: u16,
}

impl Pinger {
    /// Opens the socket inside `ns` (e.g. a pod's namespace), as `ip netns
    /// exec NS ping` would.
    pub fn open_in(ns: &NetNs) -> Result<Pinger> {
        let fd = ns
            .run(open_raw_icmp)
            .map_err(ns_err(format!(
                "entering {} to open an ICMP socket",
                ns.name
            )))?
            .map_err(io_err(format!(
                "socket(AF_INET, SOCK_RAW, ICMP) in {}",
                ns.name
            )))?;
        // Distinct identifiers per pinger so that pingers sharing a namespace
        // (the raw socket sees every ICMP packet of it) tell their replies apart.
        let id = (std::process::id() as u16)
            .wrapping_mul(31)
            .wrapping_add(NEXT_ID.fetch_add(1, Ordering::Relaxed));
        Ok(Pinger { fd, id, seq: 0 })
    }

    /// Sends one echo request to `dst` and waits up to `timeout` for its reply
    /// (`ping -c 1 -W TIMEOUT DST` run inside the namespace). `Ok(None)` means
    /// no reply in time.
    pub fn echo(&mut self, dst: Ipv4Addr, timeout: Duration) -> io::Result<Option<EchoReply>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let packet = echo_request(self.id, seq);
        let addr = sockaddr(dst);
        let start = Instant::now();
        // SAFETY: valid buffer and sockaddr_in of the right length.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            let e = io::Error::last_os_error();
            // No route / unreachable network: the pair fails, not the check.
            return match e.raw_os_error() {
                Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) | Some(libc::EINVAL) => Ok(None),
                _ => Err(e),
            };
        }
        let deadline = start + timeout;
        let mut buf = [0u8; 2048];
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
            // SAFETY: buffer of the given length.
            let len = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
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
            if let Some(reply) = parse_reply(&buf[..len as usize], self.id, seq, dst) {
                return Ok(Some(EchoReply {
                    rtt: start.elapsed(),
                    ..reply
                }));
            }
        }
    }
}

fn open_raw_icmp() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    }
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

fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + PAYLOAD.len());
    p.extend_from_slice(&[ICMP_ECHO_REQUEST, 0, 0, 0]);
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(PAYLOAD);
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// Our echo reply inside a raw IPv4 datagram (IP header included), or None.
fn parse_reply(datagram: &[u8], id: u16, seq: u16, from: Ipv4Addr) -> Option<EchoReply> {
    if datagram.len() < 20 || datagram[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(datagram[0] & 0x0f) * 4;
    let ttl = datagram[8];
    let src = Ipv4Addr::new(datagram[12], datagram[13], datagram[14], datagram[15]);
    let icmp = datagram.get(ihl..)?;
    if icmp.len() < 8 || icmp[0] != ICMP_ECHO_REPLY || icmp[1] != 0 {
        return None;
    }
    let rid = u16::from_be_bytes([icmp[4], icmp[5]]);
    let rseq = u16::from_be_bytes([icmp[6], icmp[7]]);
    if rid != id || rseq != seq || src != from || &icmp[8..] != PAYLOAD {
        return None;
    }
    Some(EchoReply {
        from: src,
        ttl,
        seq: rseq,
        rtt: Duration::ZERO,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_request_verifies_to_zero() {
        let p = echo_request(0x1234, 7);
        assert_eq!(checksum(&p), 0);
        assert_eq!(p[0], ICMP_ECHO_REQUEST);
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
    }

    fn reply_datagram(ttl: u8, src: [u8; 4], id: u16, seq: u16) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, ttl, 1, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&[10, 244, 1, 2]);
        let mut icmp = echo_request(id, seq);
        icmp[0] = ICMP_ECHO_REPLY;
        ip.extend_from_slice(&icmp);
        ip
    }

    #[test]
    fn replies_are_matched_by_id_seq_and_source() {
        let from = Ipv4Addr::new(10, 244, 2, 66);
        let d = reply_datagram(62, from.octets(), 9, 3);
        let r = parse_reply(&d, 9, 3, from).unwrap();
        assert_eq!(r.ttl, 62);
        assert_eq!(r.seq, 3);
        assert!(parse_reply(&d, 8, 3, from).is_none());
        assert!(parse_reply(&d, 9, 4, from).is_none());
        assert!(parse_reply(&d, 9, 3, Ipv4Addr::new(10, 244, 2, 67)).is_none());
        let mut req = d.clone();
        req[20] = ICMP_ECHO_REQUEST;
        assert!(parse_reply(&req, 9, 3, from).is_none());
        assert!(parse_reply(&d[..24], 9, 3, from).is_none());
    }
}
