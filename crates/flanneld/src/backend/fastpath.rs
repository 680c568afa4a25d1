//! What the userspace datapaths (udp, wireguard) share: the multi-queue
//! offloaded TUN device, the UDP sockets, thread-shared counters, the
//! stats file, and small helpers of their packet loops.

use std::io::{self, IoSlice};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flannel_netlink::Netlink;
use tun_rs::{
    DeviceBuilder, SyncDevice, VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_LEN,
};

/// How long an idle thread sleeps in poll(2) before checking for shutdown.
pub const IDLE_POLL: Duration = Duration::from_millis(200);
/// Most queues (and threads) a datapath uses.
pub const MAX_QUEUES: usize = 4;

/// A TUN device that cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("creating the TUN device {device} (ip tuntap add {device} mode tun multi_queue): {source}; is /dev/net/tun available (modprobe tun)?")]
    Create {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("replacing the device {device} that is no TUN device of ours: {source}")]
    Kernel {
        device: String,
        #[source]
        source: flannel_netlink::Error,
    },
}

/// A UDP socket that cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("binding the {what} socket to {addr} ({field}): {source}; is another process using the port?")]
    Bind {
        what: &'static str,
        field: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("setting up the {what} socket: {source}")]
    Setup {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Opens the TUN device `name` with `queues` queues, multi-queue with
/// offloads (`IFF_MULTI_QUEUE|IFF_VNET_HDR`, TSO/USO), nonblocking, and
/// makes it persistent (`ip tuntap add NAME mode tun multi_queue`). An
/// existing device of that name that cannot be attached to (another kind,
/// such as upstream's kernel `wireguard` link, or a TUN of other flags) is
/// deleted and created anew.
pub fn open_tun(nl: &mut Netlink, name: &str, queues: usize) -> Result<Vec<SyncDevice>, TunError> {
    let tun_err = |source| TunError::Create {
        device: name.to_string(),
        source,
    };
    let build = || {
        DeviceBuilder::new()
            .name(name)
            .with(|b| {
                b.multi_queue(true);
                b.offload(true);
            })
            .build_sync()
    };
    let first = match build() {
        Ok(d) => d,
        Err(e)
            if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::EBUSY) =>
        {
            // Another kind of device, or a TUN of other flags: ours to replace.
            let k = |source| TunError::Kernel {
                device: name.to_string(),
                source,
            };
            if let Some(l) = nl.link_by_name(name).map_err(k)? {
                tracing::warn!(device = name, kind = ?l.kind, error = %e, "cannot attach to the existing device; recreating it");
                nl.del_link(l.index).map_err(k)?;
            }
            build().map_err(tun_err)?
        }
        Err(e) => return Err(tun_err(e)),
    };
    first.persist().map_err(tun_err)?;
    let mut devs = Vec::with_capacity(queues);
    for _ in 1..queues {
        devs.push(first.try_clone().map_err(tun_err)?);
    }
    devs.insert(0, first);
    for d in &devs {
        d.set_nonblocking(true).map_err(tun_err)?;
    }
    Ok(devs)
}

/// A nonblocking UDP socket bound to `addr` with deep buffers, in the
/// `SO_REUSEPORT` group of that address when `reuse_port`. An IPv6 address
/// gets `IPV6_V6ONLY` = `v6only` (false: IPv4 peers arrive as v4-mapped
/// addresses). `what` and `field` name it in errors ("udp backend",
/// "Backend.Port").
pub fn udp_socket(
    addr: SocketAddr,
    reuse_port: bool,
    v6only: bool,
    what: &'static str,
    field: &'static str,
) -> Result<UdpSocket, SocketError> {
    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
    let setup = |e: nix::Error| SocketError::Setup {
        what,
        source: e.into(),
    };
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd: OwnedFd = socket::socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(setup)?;
    if reuse_port {
        socket::setsockopt(&fd, sockopt::ReusePort, &true).map_err(setup)?;
    }
    if addr.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &v6only).map_err(setup)?;
    }
    // Deep buffers absorb bursts while a thread is descheduled; the
    // *FORCE options (CAP_NET_ADMIN) pass net.core.[rw]mem_max, whose
    // default (208 KiB) drops datagrams at a few Gbit/s.
    const BUF: usize = 4 << 20;
    if socket::setsockopt(&fd, sockopt::RcvBufForce, &BUF).is_err() {
        let _ = socket::setsockopt(&fd, sockopt::RcvBuf, &BUF);
    }
    if socket::setsockopt(&fd, sockopt::SndBufForce, &BUF).is_err() {
        let _ = socket::setsockopt(&fd, sockopt::SndBuf, &BUF);
    }
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(|e| SocketError::Bind {
        what,
        field,
        addr,
        source: e.into(),
    })?;
    Ok(UdpSocket::from(fd))
}

/// How many queues: the tuning knob `env` when set, else one per core, at
/// most [`MAX_QUEUES`].
pub fn queue_count(env: &str) -> usize {
    std::env::var(env)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .clamp(1, MAX_QUEUES)
}

/// Counters shared by a datapath's threads: relaxed atomics, each thread
/// adding its own tally once per batch.
#[derive(Debug)]
pub struct SharedCounters<const N: usize>([AtomicU64; N]);

impl<const N: usize> Default for SharedCounters<N> {
    fn default() -> Self {
        SharedCounters(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl<const N: usize> SharedCounters<N> {
    /// Adds a tally (a counters struct's `to_array()`).
    pub fn add(&self, c: [u64; N]) {
        for (slot, v) in self.0.iter().zip(c) {
            if v != 0 {
                slot.fetch_add(v, Ordering::Relaxed);
            }
        }
    }

    /// The totals (for a counters struct's `from_array()`).
    pub fn snapshot(&self) -> [u64; N] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }
}

/// Reads a running datapath's counters from any thread (the metrics
/// endpoint): the totals of earlier generations of its threads plus the
/// relaxed atomics the running ones add to, so nothing is added to the
/// packet path. A restarted datapath hands out a new reader.
#[derive(Debug, Clone)]
pub struct CountersReader<const N: usize> {
    base: [u64; N],
    shared: Arc<SharedCounters<N>>,
}

impl<const N: usize> CountersReader<N> {
    /// A reader of `shared` on top of `base` (a counters struct's
    /// `to_array()`).
    pub fn new(base: [u64; N], shared: Arc<SharedCounters<N>>) -> Self {
        CountersReader { base, shared }
    }

    /// The counters now (for a counters struct's `from_array()`).
    pub fn read(&self) -> [u64; N] {
        let now = self.shared.snapshot();
        std::array::from_fn(|i| self.base[i] + now[i])
    }
}

/// Waits until `fd` is ready for `events` or [`IDLE_POLL`] passes.
pub fn wait_ready(fd: impl AsFd, events: nix::poll::PollFlags) {
    use nix::poll::{poll, PollFd, PollTimeout};
    let mut fds = [PollFd::new(fd.as_fd(), events)];
    let ms = IDLE_POLL.as_millis() as u16;
    let _ = poll(&mut fds, PollTimeout::from(ms));
}

/// Whether a TUN error means the device is gone (deleted under us).
pub fn device_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD) | Some(libc::EBADF) | Some(libc::ENODEV) | Some(libc::ENXIO)
    )
}

/// Logs a recurring error at most once per ten seconds per thread.
#[derive(Debug, Default)]
pub struct RateLimited(Option<Instant>);

impl RateLimited {
    /// Whether a message may be logged now.
    pub fn ready(&mut self) -> bool {
        let now = Instant::now();
        match self.0 {
            Some(t) if now.duration_since(t) < Duration::from_secs(10) => false,
            _ => {
                self.0 = Some(now);
                true
            }
        }
    }
}

/// Packets one egress batch holds (tun-rs's ideal batch is 128).
pub const TX_SLOTS: usize = 256;
/// A TUN read is attempted only while this many slots are free: a 64 KiB
/// super-packet with a small MSS splits into up to this many packets.
pub const TX_READ_ROOM: usize = 128;

/// A sending socket (its own ephemeral port) and its quinn-udp state.
pub struct TxSocket {
    pub sock: UdpSocket,
    pub state: quinn_udp::UdpSocketState,
}

impl TxSocket {
    /// Sends `t` (one datagram, or a GSO train of them): waits while the
    /// socket's buffer is full unless `stop` is set (then it is dropped),
    /// retries on EINTR; any other error is returned.
    pub fn send(
        &self,
        t: &quinn_udp::Transmit<'_>,
        stop: &std::sync::atomic::AtomicBool,
    ) -> io::Result<()> {
        loop {
            match self
                .state
                .try_send(quinn_udp::UdpSockRef::from(&self.sock), t)
            {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    wait_ready(&self.sock, nix::poll::PollFlags::POLLOUT);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Reads what a TUN queue holds into `packets` at stride `slot` (their
/// lengths into `sizes`), from packet `*n` on, while [`TX_READ_ROOM`]
/// slots are free: with offloads a TSO super-packet is split into
/// MTU-sized packets (tun-rs), which then lie back to back. Stops when the
/// queue is empty. A packet tun-rs cannot split (odd GSO metadata, larger
/// than the MTU) is dropped and counted in `invalid` (logged at most every
/// ten seconds, `what` naming the datapath). An error means the device is gone.
#[allow(clippy::too_many_arguments)]
pub fn read_batch(
    dev: &SyncDevice,
    offload: bool,
    raw: &mut [u8],
    packets: &mut [u8],
    sizes: &mut [usize],
    slot: usize,
    n: &mut usize,
    invalid: &mut u64,
    warn: &mut RateLimited,
    what: &str,
) -> io::Result<()> {
    while *n + TX_READ_ROOM <= sizes.len() {
        let at = *n;
        let r = {
            let mut it = packets[at * slot..].chunks_exact_mut(slot);
            let mut bufs: [&mut [u8]; TX_READ_ROOM] =
                std::array::from_fn(|_| it.next().expect("room checked"));
            if offload {
                dev.recv_multiple(raw, &mut bufs, &mut sizes[at..at + TX_READ_ROOM], 0)
            } else {
                dev.recv(bufs[0]).map(|len| {
                    sizes[at] = len;
                    1
                })
            }
        };
        match r {
            Ok(k) => *n += k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if device_gone(&e) => return Err(e),
            Err(e) => {
                *invalid += 1;
                if warn.ready() {
                    tracing::warn!(error = %e, "{what} egress: dropped a packet read from the TUN device");
                }
            }
        }
    }
    Ok(())
}

/// Writes `c` as JSON to `path`, atomically (a temporary file renamed).
pub fn write_stats<T: serde::Serialize>(path: &std::path::Path, c: &T) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(c).map_err(io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

// ---------------------------------------------------------------------------
// Writing received packets to an offloaded TUN device

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the kernel completes the TCP checksum
/// from `csum_start`/`csum_offset` (the field holds the pseudo-header sum).
const VNET_NEEDS_CSUM: u8 = 1;
/// Largest IPv4 packet (the total length field is 16 bits).
const IPV4_MAX: usize = 65_535;
/// TCP flags a coalesced segment may carry (ACK, and PSH on the last one).
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
/// Most segments in one coalesced write.
const MAX_COALESCE: usize = 64;

/// Builds TCP super-packets for the TUN device straight from the received
/// datagrams, without copying payloads: consecutive in-order segments of
/// one IPv4 TCP flow (the pieces of one GSO send on the peer) become one
/// `writev` of [virtio header + the first segment's headers, fixed up]
/// followed by every segment's payload where it lies in the receive
/// buffers. The kernel takes the write as one GSO packet (TSO), so the pod
/// gets one large skb as with a local sender. Anything else (other
/// protocols, options, fragments, flags other than ACK/PSH, a bad TCP
/// checksum) is written on its own behind a zeroed virtio header, and the
/// kernel checks it as usual.
///
/// A super-packet goes in with `VIRTIO_NET_HDR_F_NEEDS_CSUM`, which the
/// receiving stack takes as a locally built packet and never verifies, so
/// a segment's own checksum is checked before it joins one, unless the
/// packets were authenticated on the way ([`Coalescer::authenticated`]).
pub struct Coalescer<'a> {
    /// Virtio header + the first segment's IPv4 and TCP headers.
    head: [u8; VIRTIO_NET_HDR_LEN + 20 + 60],
    head_len: usize,
    /// The payloads (index 0 is `head`, filled in at flush).
    parts: Vec<&'a [u8]>,
    /// The open super-packet: its first segment, segment count, IP total
    /// length, payload size of the first segment (the GSO size), the
    /// expected next sequence number, and whether another may follow.
    first: Option<&'a [u8]>,
    count: usize,
    total: usize,
    gso_size: usize,
    next_seq: u32,
    open: bool,
    psh: bool,
    /// Whether segments' TCP checksums are checked before they coalesce.
    verify: bool,
}

/// The TCP segment in `d` (a whole IPv4 packet) when it may be coalesced:
/// IPv4 without options, not a fragment, DF set, TCP with only ACK/PSH and
/// a payload. Returns the TCP header length and payload length.
fn tcp_candidate(d: &[u8]) -> Option<(usize, usize)> {
    if d.len() < 40 || d[0] != 0x45 || d[9] != 6 {
        return None;
    }
    let frag = u16::from_be_bytes([d[6], d[7]]);
    if frag != 0x4000 {
        return None; // DF only: no MF, no offset, DF set
    }
    let thl = usize::from(d[32] >> 4) * 4;
    let flags = d[33];
    if thl < 20 || 20 + thl >= d.len() || flags & !(TCP_ACK | TCP_PSH) != 0 || flags & TCP_ACK == 0
    {
        return None;
    }
    Some((thl, d.len() - 20 - thl))
}

/// Whether the TCP checksum of the IPv4 packet `d` (header length 20) is right.
fn tcp_checksum_ok(d: &[u8]) -> bool {
    let Ok(tcp_len) = u16::try_from(d.len() - 20) else {
        return false;
    };
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&d[12..20]);
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&tcp_len.to_be_bytes());
    let sum = tun_rs::checksum_no_fold(&pseudo, 0);
    !tun_rs::checksum(&d[20..], sum) == 0
}

impl<'a> Coalescer<'a> {
    /// An empty coalescer that checks each segment's TCP checksum before
    /// it joins a super-packet (its buffers are allocated here, once per
    /// batch).
    pub fn new() -> Coalescer<'a> {
        Coalescer {
            head: [0; VIRTIO_NET_HDR_LEN + 20 + 60],
            head_len: 0,
            parts: Vec::with_capacity(MAX_COALESCE + 1),
            first: None,
            count: 0,
            total: 0,
            gso_size: 0,
            next_seq: 0,
            open: false,
            psh: false,
            verify: true,
        }
    }

    /// An empty coalescer for packets whose integrity the datapath has
    /// already proven (WireGuard's Poly1305 tag covers the whole inner
    /// packet): their TCP checksums are not read again. The kernel's
    /// WireGuard does the same, marking every decrypted packet
    /// `CHECKSUM_UNNECESSARY`.
    pub fn authenticated() -> Coalescer<'a> {
        Coalescer {
            verify: false,
            ..Coalescer::new()
        }
    }

    /// Whether `d` continues the open super-packet.
    fn continues(&self, d: &[u8], thl: usize, payload: usize) -> bool {
        let Some(f) = self.first else {
            return false;
        };
        self.open
            && self.count < MAX_COALESCE
            && payload <= self.gso_size
            && self.total + payload <= IPV4_MAX
            && u32::from_be_bytes([d[24], d[25], d[26], d[27]]) == self.next_seq
            // same TOS, DF, TTL, protocol, addresses
            && d[1] == f[1]
            && d[6..10] == f[6..10]
            && d[12..24] == f[12..24]
            // same ack, header length, window, urgent pointer, options;
            // flags may differ only in PSH
            && d[28..33] == f[28..33]
            && d[33] & !TCP_PSH == f[33] & !TCP_PSH
            && d[34..36] == f[34..36]
            && d[38..20 + thl] == f[38..20 + thl]
    }

    /// Whether `d` joins the open super-packet: it continues it and, when
    /// checksums are verified, both it and (were it the second) the first
    /// segment carry a right TCP checksum. The first one is checked only
    /// then, as a segment written on its own is checked by the kernel.
    fn joins(&self, d: &[u8], thl: usize, payload: usize) -> bool {
        self.continues(d, thl, payload)
            && (!self.verify
                || (tcp_checksum_ok(d)
                    && (self.count != 1 || self.first.is_some_and(tcp_checksum_ok))))
    }

    /// Adds a delivered packet (IPv4 or IPv6; only IPv4 TCP coalesces);
    /// flushes first when it does not continue the open super-packet.
    /// Failed writes are counted in `errors`; an error means the device is
    /// gone.
    pub fn push(&mut self, dev: &SyncDevice, d: &'a [u8], errors: &mut u64) -> io::Result<()> {
        let cand = tcp_candidate(d);
        if let Some((thl, payload)) = cand {
            if self.joins(d, thl, payload) {
                self.parts.push(&d[20 + thl..]);
                self.count += 1;
                self.total += payload;
                self.next_seq = self.next_seq.wrapping_add(payload as u32);
                self.psh = d[33] & TCP_PSH != 0;
                self.open = payload == self.gso_size && !self.psh;
                return Ok(());
            }
        }
        self.flush(dev, errors)?;
        self.first = Some(d);
        self.count = 1;
        self.total = d.len();
        self.parts.clear();
        self.parts.push(&[]);
        match cand {
            Some((thl, payload)) => {
                self.parts.push(&d[20 + thl..]);
                self.gso_size = payload;
                let seq = u32::from_be_bytes([d[24], d[25], d[26], d[27]]);
                self.next_seq = seq.wrapping_add(payload as u32);
                self.psh = d[33] & TCP_PSH != 0;
                self.open = !self.psh;
                self.head_len = 20 + thl;
            }
            None => {
                self.parts.push(d);
                self.open = false;
                self.head_len = 0;
            }
        }
        Ok(())
    }

    /// Writes the open packet, if any (failed writes counted in `errors`;
    /// an error means the device is gone).
    pub fn flush(&mut self, dev: &SyncDevice, errors: &mut u64) -> io::Result<()> {
        let Some(f) = self.first.take() else {
            return Ok(());
        };
        let h = &mut self.head;
        h[..VIRTIO_NET_HDR_LEN].fill(0);
        let hl = self.head_len;
        let vlen;
        if self.count == 1 {
            // As received, behind a zeroed virtio header (checksum complete).
            vlen = VIRTIO_NET_HDR_LEN;
            if hl > 0 {
                h[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + hl].copy_from_slice(&f[..hl]);
            }
        } else {
            let ip = VIRTIO_NET_HDR_LEN;
            h[ip..ip + hl].copy_from_slice(&f[..hl]);
            // IPv4 total length and header checksum.
            h[ip + 2..ip + 4].copy_from_slice(&(self.total as u16).to_be_bytes());
            h[ip + 10..ip + 12].fill(0);
            let ipsum = !tun_rs::checksum(&h[ip..ip + 20], 0);
            h[ip + 10..ip + 12].copy_from_slice(&ipsum.to_be_bytes());
            if self.psh {
                h[ip + 33] |= TCP_PSH;
            }
            // The TCP checksum field holds the pseudo-header sum over the
            // whole segment length; the kernel completes it per segment.
            let mut pseudo = [0u8; 12];
            pseudo[..8].copy_from_slice(&f[12..20]);
            pseudo[9] = 6;
            pseudo[10..12].copy_from_slice(&((self.total - 20) as u16).to_be_bytes());
            let psum = tun_rs::checksum(&pseudo, 0);
            h[ip + 36..ip + 38].copy_from_slice(&psum.to_be_bytes());
            VirtioNetHdr {
                flags: VNET_NEEDS_CSUM,
                gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
                hdr_len: hl as u16,
                gso_size: self.gso_size as u16,
                csum_start: 20,
                csum_offset: 16,
            }
            .encode(&mut h[..VIRTIO_NET_HDR_LEN])?;
            vlen = VIRTIO_NET_HDR_LEN;
        }
        let head = &self.head[..vlen + hl];
        let mut iov = [IoSlice::new(&[]); MAX_COALESCE + 1];
        iov[0] = IoSlice::new(head);
        for (v, p) in iov[1..].iter_mut().zip(&self.parts[1..]) {
            *v = IoSlice::new(p);
        }
        let iov = &iov[..self.parts.len()];
        let r = loop {
            match nix::sys::uio::writev(dev, iov) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break r,
            }
        };
        self.parts.clear();
        match r {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = io::Error::from(e);
                if device_gone(&e) {
                    return Err(e);
                }
                *errors += 1;
                Ok(())
            }
        }
    }
}

impl Default for Coalescer<'_> {
    fn default() -> Self {
        Coalescer::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP segment 10.244.1.2:40000 -> 10.244.2.2:5201 with the
    /// timestamp option, DF, `payload` bytes, complete checksums.
    fn segment(seq: u32, flags: u8, payload: usize) -> Vec<u8> {
        let mut p = vec![0u8; 20 + 32 + payload];
        let total = p.len() as u16;
        p[0] = 0x45;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 244, 1, 2]);
        p[16..20].copy_from_slice(&[10, 244, 2, 2]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&7u32.to_be_bytes());
        p[32] = 8 << 4;
        p[33] = flags;
        p[34..36].copy_from_slice(&512u16.to_be_bytes());
        p[40..52].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        for (i, b) in p[52..].iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(seq | 1) as u8;
        }
        let ip = !tun_rs::checksum(&p[..20], 0);
        p[10..12].copy_from_slice(&ip.to_be_bytes());
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&p[12..20]);
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&(total - 20).to_be_bytes());
        let sum = tun_rs::checksum_no_fold(&pseudo, 0);
        let tcp = !tun_rs::checksum(&p[20..], sum);
        p[36..38].copy_from_slice(&tcp.to_be_bytes());
        p
    }

    #[test]
    fn tcp_candidates_are_plain_data_segments() {
        assert_eq!(tcp_candidate(&segment(1, TCP_ACK, 100)), Some((32, 100)));
        assert_eq!(
            tcp_candidate(&segment(1, TCP_ACK | TCP_PSH, 100)),
            Some((32, 100))
        );
        assert_eq!(tcp_candidate(&segment(1, TCP_ACK, 0)), None, "pure ACK");
        assert_eq!(tcp_candidate(&segment(1, TCP_ACK | 0x01, 10)), None, "FIN");
        assert_eq!(tcp_candidate(&segment(1, 0x02, 10)), None, "SYN");
        let mut frag = segment(1, TCP_ACK, 100);
        frag[6] = 0x20; // MF, no DF
        assert_eq!(tcp_candidate(&frag), None);
        let mut udp = segment(1, TCP_ACK, 100);
        udp[9] = 17;
        assert_eq!(tcp_candidate(&udp), None);
        let mut opts = segment(1, TCP_ACK, 100);
        opts[0] = 0x46; // IP options
        assert_eq!(tcp_candidate(&opts), None);
    }

    #[test]
    fn tcp_checksum_is_checked() {
        let mut p = segment(9, TCP_ACK, 300);
        assert!(tcp_checksum_ok(&p));
        p[100] ^= 1;
        assert!(!tcp_checksum_ok(&p));
    }

    #[test]
    fn a_bad_checksum_joins_only_when_authenticated() {
        let a = segment(1000, TCP_ACK, 1400);
        let good = segment(2400, TCP_ACK, 1400);
        let mut bad = segment(2400, TCP_ACK, 1400);
        bad[100] ^= 1;
        let mut bad_first = a.clone();
        bad_first[100] ^= 1;
        for (verify, first) in [
            (true, &a),
            (false, &a),
            (true, &bad_first),
            (false, &bad_first),
        ] {
            let mut co = if verify {
                Coalescer::new()
            } else {
                Coalescer::authenticated()
            };
            co.first = Some(first);
            co.count = 1;
            co.total = first.len();
            co.gso_size = 1400;
            co.next_seq = 2400;
            co.open = true;
            let first_ok = std::ptr::eq(first, &a);
            assert_eq!(
                co.joins(&good, 32, 1400),
                !verify || first_ok,
                "verify {verify}, first ok {first_ok}"
            );
            assert_eq!(co.joins(&bad, 32, 1400), !verify, "verify {verify}");
            // Past the second segment the first is not checked again.
            co.count = 2;
            assert!(co.joins(&good, 32, 1400));
        }
    }

    #[test]
    fn only_the_next_in_order_segment_of_the_flow_continues() {
        let a = segment(1000, TCP_ACK, 1400);
        let mut co = Coalescer::new();
        co.first = Some(&a);
        co.count = 1;
        co.total = a.len();
        co.gso_size = 1400;
        co.next_seq = 2400;
        co.open = true;
        let next = segment(2400, TCP_ACK, 1400);
        assert!(co.continues(&next, 32, 1400));
        let last = segment(2400, TCP_ACK | TCP_PSH, 600);
        assert!(co.continues(&last, 32, 600), "a shorter, PSH last one");
        assert!(
            !co.continues(&segment(2401, TCP_ACK, 1400), 32, 1400),
            "gap"
        );
        assert!(
            !co.continues(&segment(2400, TCP_ACK, 1401), 32, 1401),
            "larger"
        );
        let mut other = segment(2400, TCP_ACK, 1400);
        other[23] ^= 1; // another destination port
        assert!(!co.continues(&other, 32, 1400));
        let mut ack = segment(2400, TCP_ACK, 1400);
        ack[31] ^= 1; // another ACK number
        assert!(!co.continues(&ack, 32, 1400));
        let mut ts = segment(2400, TCP_ACK, 1400);
        ts[47] ^= 1; // another timestamp
        assert!(!co.continues(&ts, 32, 1400));
        co.open = false; // after a short or PSH segment
        assert!(!co.continues(&next, 32, 1400));
        co.open = true;
        co.total = IPV4_MAX - 1000;
        assert!(!co.continues(&next, 32, 1400), "past 64 KiB");
    }

    #[test]
    fn shared_counters_sum() {
        let s = SharedCounters::<3>::default();
        s.add([2, 0, 1]);
        s.add([2, 0, 1]);
        assert_eq!(s.snapshot(), [4, 0, 2]);
    }

    #[test]
    fn rate_limited_lets_one_through_per_window() {
        let mut r = RateLimited::default();
        assert!(r.ready());
        assert!(!r.ready());
    }
}
