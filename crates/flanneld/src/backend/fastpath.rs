//! What the userspace datapaths (udp, wireguard) share: the multi-queue
//! offloaded TUN device, the UDP sockets, thread-shared counters, the
//! stats file, and small helpers of their packet loops.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flannel_netlink::Netlink;
use tun_rs::{DeviceBuilder, SyncDevice};

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

/// Writes `c` as JSON to `path`, atomically (a temporary file renamed).
pub fn write_stats<T: serde::Serialize>(path: &std::path::Path, c: &T) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(c).map_err(io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

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
