//! The request/response plumbing of one netlink socket (NETLINK_ROUTE, or
//! NETLINK_GENERIC for WireGuard): sequence numbers, ACKs, multipart dumps
//! and kernel error codes.

use std::io;
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable, NlasIterator, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::Socket;

use crate::{Error, Result};

/// Capacity of the receive buffer (see [`Transport::recv_datagram`]).
const RECV_BUF: usize = 1 << 20;
/// `NLM_F_CAPPED` on an NLMSG_ERROR: only the request's header is echoed.
const NLM_F_CAPPED: u16 = 0x100;
/// `NLM_F_ACK_TLVS` on an NLMSG_ERROR: extended-ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLMSGERR_ATTR_MSG`: the kernel's human readable reason.
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSG_HDRLEN: usize = 16;
/// A dump the kernel flags as interrupted (the table changed under it) is
/// inconsistent; it is redone this many times before giving up.
const DUMP_RETRIES: usize = 8;

pub(crate) struct Transport {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
    port: u32,
}

impl Transport {
    /// Opens a NETLINK_ROUTE socket in the calling thread's namespace and
    /// joins the given multicast groups (`RTNLGRP_*` numbers).
    pub(crate) fn open(groups: &[u32], rcvbuf: usize) -> io::Result<Self> {
        Self::open_protocol(NETLINK_ROUTE, groups, rcvbuf)
    }

    /// Opens a socket of another netlink protocol (`NETLINK_GENERIC`).
    pub(crate) fn open_protocol(
        protocol: isize,
        groups: &[u32],
        rcvbuf: usize,
    ) -> io::Result<Self> {
        let mut sock = Socket::new(protocol)?;
        let port = sock.bind_auto()?.port_number();
        // Both are optional comforts (shorter error echoes, the kernel's
        // reason in text); old kernels without them still work.
        let _ = sock.set_cap_ack(true);
        let _ = sock.set_ext_ack(true);
        if rcvbuf > 0 {
            set_rcvbuf(&sock, rcvbuf);
        }
        for &g in groups {
            sock.add_membership(g)?;
        }
        Ok(Transport {
            sock,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
            port,
        })
    }

    /// Joins one more multicast group.
    pub(crate) fn join(&mut self, group: u32) -> io::Result<()> {
        self.sock.add_membership(group)
    }

    /// The port id the kernel assigned at bind.
    pub(crate) fn port_id(&self) -> u32 {
        self.port
    }

    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }

    pub(crate) fn sock(&self) -> &Socket {
        &self.sock
    }

    fn send<M: NetlinkSerializable>(&mut self, msg: M, flags: u16) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1).max(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        let n = self.sock.send(&buf, 0)?;
        if n != buf.len() {
            return Err(io::Error::other(format!(
                "short netlink send: {n} of {} bytes",
                buf.len()
            )));
        }
        Ok(self.seq)
    }

    /// Receives one datagram into the internal buffer and returns its length.
    ///
    /// One `recv` per datagram: the buffer's capacity is far above what the
    /// kernel sends in one datagram (dumps are packed into at most 32 KiB), and
    /// it is left uninitialised, so its size costs no page until the kernel
    /// writes into it. `MSG_TRUNC` makes a datagram that did not fit an error
    /// rather than a silently cut message.
    pub(crate) fn recv_datagram(&mut self) -> io::Result<usize> {
        let fd = self.sock.as_raw_fd();
        let cap = self.buf.capacity();
        loop {
            self.buf.clear();
            // SAFETY: the kernel writes at most `cap` bytes into the buffer's
            // spare capacity, which is valid for writes of that length.
            let n = unsafe { libc::recv(fd, self.buf.as_mut_ptr().cast(), cap, libc::MSG_TRUNC) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = n as usize;
            if n > cap {
                return Err(io::Error::other(format!(
                    "a netlink datagram of {n} bytes did not fit the {cap}-byte receive buffer"
                )));
            }
            // SAFETY: the kernel initialised the first `n` bytes.
            unsafe { self.buf.set_len(n) };
            return Ok(n);
        }
    }

    pub(crate) fn buf(&self) -> &[u8] {
        &self.buf
    }

    /// Sends a request and collects the replies. Non-dump requests are sent
    /// with `NLM_F_ACK` and end at the ACK; dumps end at `NLMSG_DONE` and are
    /// redone when the kernel flags them as interrupted. `M` is the message
    /// family: rtnetlink's (`RouteNetlinkMessage`) or the nexthop messages
    /// netlink-packet-route lacks ([`crate::nexthop`]).
    pub(crate) fn request<M>(&mut self, msg: M, flags: u16, op: &str) -> Result<Vec<M>>
    where
        M: NetlinkSerializable + NetlinkDeserializable + Clone,
    {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        if !dump {
            return self.exchange(msg, flags, false, op).map(|(out, _)| out);
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (out, interrupted) = self.exchange(msg.clone(), flags, true, op)?;
            if !interrupted {
                return Ok(out);
            }
            if attempts >= DUMP_RETRIES {
                return Err(Error::Protocol {
                    op: op.to_string(),
                    detail: format!(
                        "dump was interrupted by concurrent changes {DUMP_RETRIES} times in a row"
                    ),
                });
            }
        }
    }

    fn exchange<M>(&mut self, msg: M, flags: u16, dump: bool, op: &str) -> Result<(Vec<M>, bool)>
    where
        M: NetlinkSerializable + NetlinkDeserializable,
    {
        let flags = if dump { flags } else { flags | NLM_F_ACK };
        let seq = self.send(msg, flags).map_err(|source| Error::Kernel {
            op: op.to_string(),
            source,
        })?;
        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            let n = self.recv_datagram().map_err(|source| Error::Kernel {
                op: op.to_string(),
                source,
            })?;
            for raw in split(&self.buf[..n]).map_err(|detail| protocol(op, detail))? {
                // Replies to an earlier request that was abandoned (an error
                // part-way through a dump) still carry its old number: skip
                // them before decoding.
                if NetlinkBuffer::new(raw).sequence_number() != seq {
                    continue;
                }
                let msg = NetlinkMessage::<M>::deserialize(raw)
                    .map_err(|e| protocol(op, e.to_string()))?;
                if msg.header.flags & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                match msg.payload {
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok((out, interrupted)),
                        Some(code) => {
                            let reason = extack_message(msg.header.flags, &e.header);
                            return Err(kernel(op, -code.get(), reason));
                        }
                    },
                    NetlinkPayload::Done(d) => {
                        if d.code < 0 {
                            return Err(kernel(op, -d.code, None));
                        }
                        return Ok((out, interrupted));
                    }
                    NetlinkPayload::Overrun(_) => {
                        return Err(protocol(op, "NLMSG_OVERRUN".to_string()));
                    }
                    _ => {}
                }
            }
        }
    }
}

fn protocol(op: &str, detail: String) -> Error {
    Error::Protocol {
        op: op.to_string(),
        detail,
    }
}

fn kernel(op: &str, errno: i32, reason: Option<String>) -> Error {
    let op = match reason {
        Some(r) => format!("{op} (kernel: {r})"),
        None => op.to_string(),
    };
    Error::Kernel {
        op,
        source: io::Error::from_raw_os_error(errno),
    }
}

/// Splits a datagram into its netlink messages.
pub(crate) fn split(buf: &[u8]) -> std::result::Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let nb = NetlinkBuffer::new_checked(&buf[off..]).map_err(|e| e.to_string())?;
        let len = nb.length() as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return Err(format!("bad netlink message length {len} at offset {off}"));
        }
        out.push(&buf[off..off + len]);
        off += (len + 3) & !3;
    }
    Ok(out)
}

/// The kernel's text reason from an NLMSG_ERROR's extended ack, if any.
pub(crate) fn extack_message(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 || payload.len() < NLMSG_HDRLEN {
        return None;
    }
    // The payload echoes the request: only its header when capped, else
    // the whole message, whose length is the header's first field.
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        let len = u32::from_ne_bytes(payload[..4].try_into().ok()?) as usize;
        (len + 3) & !3
    };
    let tlvs = payload.get(echoed..)?;
    for nla in NlasIterator::new(tlvs) {
        let nla = nla.ok()?;
        if nla.kind() == NLMSGERR_ATTR_MSG {
            let v = nla.value();
            let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
            let s = String::from_utf8_lossy(&v[..end]).trim().to_string();
            return (!s.is_empty()).then_some(s);
        }
    }
    None
}

/// Asks for a large receive buffer: as root SO_RCVBUFFORCE passes over
/// `net.core.rmem_max`; otherwise SO_RCVBUF gets what the limit allows.
fn set_rcvbuf(sock: &Socket, size: usize) {
    let v: libc::c_int = size.min(i32::MAX as usize) as libc::c_int;
    let set = |opt| unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set(libc::SO_RCVBUFFORCE) != 0 {
        let _ = set(libc::SO_RCVBUF);
    }
}

/// Request flags of a dump (`NLM_F_DUMP`), for [`Transport::request`].
pub(crate) const DUMP: u16 = NLM_F_DUMP;

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsg(len: u32, ty: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&len.to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn split_walks_aligned_messages() {
        let mut buf = nlmsg(18, 3, 0, 1, &[1, 2]);
        buf.extend_from_slice(&[0, 0]); // padding to 4
        buf.extend(nlmsg(20, 3, 0, 2, &[0; 4]));
        let parts = split(&buf).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].len(), 18);
        assert_eq!(parts[1].len(), 20);
        // A length running past the datagram is an error, not a panic.
        let bad = nlmsg(64, 3, 0, 1, &[0; 4]);
        assert!(split(&bad).is_err());
    }

    #[test]
    fn extack_text_is_found_after_the_echoed_header() {
        // Capped: the echo is the 16-byte request header, then the TLVs.
        let mut payload = nlmsg(16, 24, 5, 7, &[]);
        let text = b"Nexthop has invalid gateway\0";
        let nla_len = 4 + text.len();
        payload.extend_from_slice(&(nla_len as u16).to_ne_bytes());
        payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend_from_slice(text);
        while payload.len() & 3 != 0 {
            payload.push(0);
        }
        let got = extack_message(NLM_F_CAPPED | NLM_F_ACK_TLVS, &payload);
        assert_eq!(got.as_deref(), Some("Nexthop has invalid gateway"));
        // Without the TLV flag nothing is read.
        assert_eq!(extack_message(NLM_F_CAPPED, &payload), None);
        // Garbage does not panic.
        assert_eq!(extack_message(NLM_F_ACK_TLVS, &[0xff; 20]), None);
    }
}
