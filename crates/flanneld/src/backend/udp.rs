//! The udp backend: TUN device `flannel0`, userspace encapsulation in UDP.
//!
//! The device, as upstream sets it up:
//! `ip tuntap add flannel0 mode tun`, `ip link set flannel0 mtu EXT_MTU-28 up`,
//! `ip addr add <own subnet network address>/32 dev flannel0`,
//! `ip route replace <cluster network> dev flannel0`.
//! The kernel routes every packet for another node's pods into `flannel0`;
//! flanneld reads it, looks the destination up in the peer table and sends
//! the bare IP packet as the payload of a UDP datagram to the peer's PublicIP
//! on the backend port (8285): upstream's wire format, so flannel-rs and
//! upstream nodes interoperate. Received datagrams are checked
//! ([`flannel_core::udp`]) and written to `flannel0`.
//!
//! Built for throughput:
//! - `flannel0` is multi-queue with offloads (`IFF_MULTI_QUEUE|IFF_VNET_HDR`,
//!   TSO/USO): one read returns a 64 KiB TCP super-packet, split into
//!   MTU-sized packets in userspace (tun-rs); received TCP segments of one
//!   flow are coalesced back into one super-packet written with `writev`
//!   from the receive buffers, without copying payloads ([`super::fastpath::Coalescer`]);
//! - the packets of one read that go to the same peer leave in one
//!   `sendmsg` with UDP GSO, and receiving uses `recvmmsg` with UDP GRO
//!   (quinn-udp);
//! - one thread per queue (queues = cores, at most 4) carrying both
//!   directions, so that a TCP flow's ACKs are read by the thread that just
//!   wrote its data, without a wake-up ([`queue_loop`]). Flows are spread
//!   over the threads: a flow leaves from one of the sending sockets (one
//!   ephemeral port per queue) picked by a hash of the flow that is the same
//!   both ways, and the peer's `SO_REUSEPORT` group of receive sockets (one
//!   per thread) hands each source port to one thread. A flow stays on one
//!   thread at each end, so it is never reordered;
//! - buffers are allocated once per thread; the peer table is an immutable
//!   snapshot swapped in whole on lease changes (arc-swap), so the packet
//!   path takes no lock and allocates nothing.
//!
//! Deliberate differences from upstream:
//! - the datagram source must be a current udp lease's PublicIP, and an
//!   inner source inside the cluster network must be in that peer's subnet
//!   (upstream forwards whatever arrives); drops are counted;
//! - datagrams are sent from a few ephemeral ports, one per queue, picked
//!   per flow (upstream sends from 8285); receivers of both kinds accept any
//!   source port;
//! - TTL is left to the kernel (it decrements it when routing into and out
//!   of `flannel0`); upstream decrements it once more in its proxy;
//! - `flannel0` is persistent: SIGTERM leaves it (and its route) in place as
//!   the other backends leave theirs, and a restart attaches to it again;
//! - the ICMP net unreachable for a destination without a peer comes, as
//!   upstream's, from flannel0's address, but is sent by a raw socket (the
//!   output path, as a router sends its errors); upstream writes it into
//!   the TUN device, where the kernel drops it as a martian source (a local
//!   address arriving on an interface, with `accept_local` off, the
//!   default), so its senders never see it.
//!
//! The lease is upstream's udp lease byte for byte (no `BackendType`, see
//! [`lease_attrs`]); a lease without `BackendType` or with `"udp"` is a peer.
//!
//! The counters are written as JSON to `--udp-stats-file` every second
//! when they change and logged periodically.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;

use super::fastpath::{
    device_gone, open_tun, queue_count, read_batch, udp_socket, write_stats, Coalescer,
    RateLimited, SharedCounters, SocketError, TunError, TxSocket, IDLE_POLL, TX_SLOTS,
};
use flannel_core::datapath::Route;
use flannel_core::lease::{Lease, LeaseAttrs, LeaseKey};
use flannel_core::udp::{
    flow_bucket, flow_hash, net_unreachable, Counters, Egress, Ingress, PeerTable, UdpPeer,
    COUNTERS, NET_UNREACHABLE_MAX_LEN,
};
use flannel_core::wire;
use flannel_netlink::{Link, Netlink};
use ipnet::{IpNet, Ipv4Net};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tun_rs::{GROTable, SyncDevice, VIRTIO_NET_HDR_LEN};

/// The backend's `Type`. The lease carries no `BackendType` (as
/// upstream's); peers read a missing one as udp ([`lease_attrs`]).
pub const BACKEND_TYPE: &str = flannel_core::lease::BACKEND_UDP;

/// The stats file's name; by default it lives beside subnet.env
/// (`/run/flannel/udp-stats.json`).
pub const STATS_FILE_NAME: &str = "udp-stats.json";

/// Largest UDP payload a GSO send may carry in total (64 KiB less the
/// outer IPv4 and UDP headers).
const GSO_MAX_BYTES: usize = 65_507;
/// Datagram buffers per `recvmmsg`.
const RX_SLOTS: usize = 32;
/// Bytes per receive buffer: the largest UDP GRO aggregate (64 KiB).
const RX_SLOT_BYTES: usize = 65_536;
/// Packets written to the TUN device per batch.
const TUN_WRITE_SLOTS: usize = 128;
/// How often the stats file is refreshed.
const STATS_EVERY: Duration = Duration::from_secs(1);
/// How often the counters are logged (when they changed).
const STATS_LOG_EVERY: Duration = Duration::from_secs(60);

/// Errors of the udp backend, each naming what failed and what to check.
#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error(transparent)]
    Tun(#[from] TunError),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("spawning the {what} thread: {source}")]
    Spawn {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("udp device {device}: {source}")]
    Kernel {
        device: String,
        #[source]
        source: flannel_netlink::Error,
    },
}

/// Everything the udp datapath needs; part of the reconciler's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpSpec {
    /// `flannel0`.
    pub device: String,
    /// `<own subnet network address>/32`.
    pub address: Ipv4Net,
    /// The cluster network, routed into the device.
    pub network: Ipv4Net,
    /// Device MTU: the pod MTU (external MTU - 28, or `Backend.MTU`).
    pub mtu: u32,
    /// `Backend.Port` (8285).
    pub port: u16,
    /// The external interface's address: the sockets bind to it.
    pub bind: Ipv4Addr,
    /// Where the counters are written as JSON (`--udp-stats-file`).
    pub stats_file: Option<PathBuf>,
}

impl UdpSpec {
    /// The spec for our subnet.
    pub fn new(
        own_subnet: Ipv4Net,
        network: Ipv4Net,
        mtu: u32,
        port: u16,
        bind: Ipv4Addr,
        stats_file: Option<PathBuf>,
    ) -> UdpSpec {
        UdpSpec {
            device: wire::UDP_TUN_DEVICE.to_string(),
            address: Ipv4Net::new(own_subnet.network(), 32).expect("/32 is a valid prefix"),
            network,
            mtu,
            port,
            bind,
            stats_file,
        }
    }

    /// `<network> dev <ifindex>`: the route that sends the cluster network into the device.
    pub fn cluster_route(&self, ifindex: u32) -> Route {
        Route {
            dst: IpNet::V4(self.network),
            gateway: None,
            oif: ifindex,
            onlink: false,
        }
    }
}

/// The attributes we publish with our lease, byte for byte what upstream's
/// udp backend writes: `{"PublicIP":"172.16.1.14","PublicIPv6":null}`, no
/// `BackendType` and no `BackendData` ([`LeaseAttrs::new_udp`] says why
/// both upstream's nodes and ours take it as a udp peer).
pub fn lease_attrs(public_ip: Ipv4Addr) -> LeaseAttrs {
    LeaseAttrs::new_udp(public_ip)
}

/// Whether `link` is the udp backend's TUN device left over from an
/// earlier run (`flannel0` of kind tun).
pub fn is_udp_leftover(link: &Link) -> bool {
    link.name == wire::UDP_TUN_DEVICE && link.kind.as_deref() == Some("tun")
}

/// Deletes `flannel0` left by the udp backend (`ip link del flannel0`) when
/// this node now runs another backend; its route goes with it. Returns a
/// line per device removed.
pub fn remove_udp_leftovers(nl: &mut Netlink) -> Result<Vec<String>, UdpError> {
    let k = |source| UdpError::Kernel {
        device: wire::UDP_TUN_DEVICE.to_string(),
        source,
    };
    let Some(link) = nl.link_by_name(wire::UDP_TUN_DEVICE).map_err(k)? else {
        return Ok(Vec::new());
    };
    if !is_udp_leftover(&link) {
        return Ok(Vec::new());
    }
    nl.del_link(link.index).map_err(k)?;
    Ok(vec![format!(
        "removed {} (ifindex {}), left over from the udp backend, with its route",
        link.name, link.index
    )])
}

/// State shared between the datapath handle and its threads.
struct Shared {
    peers: ArcSwap<PeerTable>,
    counters: Arc<SharedCounters<COUNTERS>>,
    stop: AtomicBool,
    /// Set by a thread that stopped on a fatal error (the device is gone).
    failed: AtomicBool,
    port: u16,
    /// flannel0's address (`<own subnet network>`): the source of our ICMP
    /// errors; follows the spec when the subnet changes.
    address: AtomicU32,
}

impl Shared {
    /// The counters the threads have added so far.
    fn counters_now(&self) -> Counters {
        Counters::from_array(self.counters.snapshot())
    }
}

/// Reads [`UdpDatapath::counters`] from another thread (the metrics
/// endpoint); `Counters::from_array` of what it reads.
pub type CountersReader = super::fastpath::CountersReader<COUNTERS>;

/// The running datapath: the TUN queues, the sockets and the threads.
/// Dropping it stops and joins the threads; `flannel0` (persistent) stays.
pub struct UdpDatapath {
    spec: UdpSpec,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Counters of earlier generations of threads (restarts after the
    /// device was deleted), so the totals never go backwards.
    base: Counters,
    queues: usize,
}

impl std::fmt::Debug for UdpDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpDatapath")
            .field("device", &self.spec.device)
            .field("queues", &self.queues)
            .finish()
    }
}

/// The socket our ICMP errors leave by: `socket(AF_INET, SOCK_RAW,
/// IPPROTO_RAW)`, send only, the IPv4 header ours. The error is sent as this
/// node sends any packet of its own (the output path, routed to the
/// sender), as a router sends its errors; written into `flannel0` instead,
/// it would arrive from flannel0's own address, which the kernel drops as a
/// martian source. `None` (with a warning) without CAP_NET_RAW: the
/// datapath then works without ICMP errors.
fn icmp_socket() -> Option<OwnedFd> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockProtocol, SockType};
    match socket::socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::Raw,
    ) {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::warn!(error = %e, "cannot open a raw socket (needs CAP_NET_RAW): the udp backend sends no ICMP net unreachable for destinations without a peer");
            None
        }
    }
}

/// Sends the ICMP error `pkt` (a whole IPv4 packet) to its destination;
/// dropped when the socket's buffer is full.
fn send_icmp(sock: &OwnedFd, pkt: &[u8], to: Ipv4Addr) {
    use nix::sys::socket::{sendto, MsgFlags, SockaddrIn};
    let _ = sendto(
        sock.as_raw_fd(),
        pkt,
        &SockaddrIn::from(SocketAddrV4::new(to, 0)),
        MsgFlags::MSG_DONTWAIT,
    );
}

impl UdpDatapath {
    /// Opens `flannel0`, binds the sockets and starts the threads. The
    /// device's address, MTU, up state and route are [`UdpDatapath::ensure`]'s.
    pub fn start(nl: &mut Netlink, spec: &UdpSpec) -> Result<UdpDatapath, UdpError> {
        UdpDatapath::start_with(nl, spec, Counters::default(), PeerTable::default())
    }

    fn start_with(
        nl: &mut Netlink,
        spec: &UdpSpec,
        base: Counters,
        peers: PeerTable,
    ) -> Result<UdpDatapath, UdpError> {
        let queues = queue_count("FLANNELD_UDP_QUEUES");
        // Sockets first: a port in use fails before the device is touched.
        let listen = SocketAddrV4::new(spec.bind, spec.port);
        let mut rx = Vec::with_capacity(queues);
        for _ in 0..queues {
            rx.push(udp_socket(
                listen.into(),
                true,
                false,
                "udp backend",
                "Backend.Port",
            )?);
        }
        let mut tx = Vec::with_capacity(queues);
        for _ in 0..queues {
            let sock = udp_socket(
                SocketAddrV4::new(spec.bind, 0).into(),
                false,
                false,
                "udp backend",
                "Backend.Port",
            )?;
            let state = UdpSocketState::new(UdpSockRef::from(&sock)).map_err(|source| {
                SocketError::Setup {
                    what: "udp backend",
                    source,
                }
            })?;
            tx.push(TxSocket { sock, state });
        }
        let tx: Arc<[TxSocket]> = tx.into();
        let devs = open_tun(nl, &spec.device, queues)?;
        let shared = Arc::new(Shared {
            peers: ArcSwap::from_pointee(peers),
            counters: Arc::default(),
            stop: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            port: spec.port,
            address: AtomicU32::new(u32::from(spec.address.addr())),
        });
        let mut dp = UdpDatapath {
            spec: spec.clone(),
            shared: shared.clone(),
            threads: Vec::new(),
            base,
            queues,
        };
        let offload = devs[0].tcp_gso();
        let icmp: Option<Arc<OwnedFd>> = icmp_socket().map(Arc::new);
        for (q, (dev, rx)) in devs.into_iter().zip(rx).enumerate() {
            let sh = shared.clone();
            let tx = tx.clone();
            let icmp = icmp.clone();
            let slot = (spec.mtu as usize).max(68);
            dp.spawn(format!("udp-q{q}"), move || {
                queue_loop(&dev, &tx, &rx, icmp, &sh, slot)
            })?;
        }
        if let Some(path) = spec.stats_file.clone() {
            let sh = shared.clone();
            let base = dp.base;
            dp.spawn("udp-stats".into(), move || stats_loop(&sh, base, &path))?;
        }
        tracing::info!(device = %spec.device, queues, offload, listen = %listen, "udp datapath started");
        Ok(dp)
    }

    fn spawn(&mut self, name: String, f: impl FnOnce() + Send + 'static) -> Result<(), UdpError> {
        let h = std::thread::Builder::new()
            .name(name.clone())
            .spawn(f)
            .map_err(|source| UdpError::Spawn { what: name, source })?;
        self.threads.push(h);
        Ok(())
    }

    /// The counters so far.
    pub fn counters(&self) -> Counters {
        let mut c = self.base;
        c.add(&self.shared.counters_now());
        c
    }

    /// A handle reading [`UdpDatapath::counters`] from another thread; it
    /// follows this generation of threads only (a restart makes a new one).
    pub fn counters_reader(&self) -> CountersReader {
        CountersReader::new(self.base.to_array(), self.shared.counters.clone())
    }

    /// Swaps in the peer table; returns whether the peers changed.
    pub fn set_peers(&self, table: PeerTable) -> bool {
        let changed = self.shared.peers.load().peers() != table.peers();
        if changed {
            self.shared.peers.store(Arc::new(table));
        }
        changed
    }

    /// The peers in use.
    pub fn peers(&self) -> Vec<UdpPeer> {
        self.shared.peers.load().peers().to_vec()
    }

    /// Makes the kernel hold our device as `spec` wants it: restarts the
    /// datapath when the device vanished, a thread failed or the spec
    /// changed (another subnet, port or MTU), then fixes MTU, address, up
    /// state and the cluster route in place. Returns the device's index and
    /// a line per change.
    pub fn ensure(
        this: &mut Option<UdpDatapath>,
        nl: &mut Netlink,
        spec: &UdpSpec,
    ) -> Result<(u32, Vec<String>), UdpError> {
        let k = |source| UdpError::Kernel {
            device: spec.device.clone(),
            source,
        };
        let mut changes = Vec::new();
        let link = nl.link_by_name(&spec.device).map_err(k)?;
        let restart_why = match (&*this, &link) {
            (None, _) => Some("starting"),
            (Some(_), None) => Some("the device was deleted"),
            (Some(dp), Some(_)) if dp.shared.failed.load(Ordering::Relaxed) => {
                Some("a datapath thread stopped")
            }
            (Some(dp), Some(_))
                if dp.spec.port != spec.port
                    || dp.spec.bind != spec.bind
                    || dp.spec.mtu != spec.mtu =>
            {
                // The threads' buffers are sized by the MTU.
                Some("the port, address or MTU changed")
            }
            _ => None,
        };
        if let Some(why) = restart_why {
            let (base, peers) = match this.take() {
                Some(old) => {
                    let c = old.counters();
                    let p = (*old.shared.peers.load_full()).clone();
                    drop(old);
                    (c, p)
                }
                None => (Counters::default(), PeerTable::default()),
            };
            let dp = UdpDatapath::start_with(nl, spec, base, peers)?;
            if why != "starting" {
                changes.push(format!(
                    "restarted the udp datapath on {} ({why})",
                    spec.device
                ));
            }
            *this = Some(dp);
        }
        let dp = this.as_mut().expect("started above");
        dp.spec = spec.clone();
        dp.shared
            .address
            .store(u32::from(spec.address.addr()), Ordering::Relaxed);
        let link = nl.link_by_name(&spec.device).map_err(k)?.ok_or_else(|| {
            k(flannel_netlink::Error::LinkNotFound {
                op: "ip link show".into(),
                name: spec.device.clone(),
            })
        })?;
        if link.mtu != spec.mtu {
            nl.set_link_mtu(link.index, spec.mtu).map_err(k)?;
            changes.push(format!(
                "set {} mtu {} (was {})",
                spec.device, spec.mtu, link.mtu
            ));
        }
        let want_addr = IpNet::V4(spec.address);
        let addrs = nl.list_addresses(link.index).map_err(k)?;
        if !addrs.contains(&want_addr) {
            nl.add_address(link.index, want_addr).map_err(k)?;
            changes.push(format!("added address {want_addr} to {}", spec.device));
        }
        for a in addrs
            .iter()
            .filter(|a| a.addr().is_ipv4() && **a != want_addr)
        {
            nl.del_address(link.index, *a).map_err(k)?;
            changes.push(format!("removed stale address {a} from {}", spec.device));
        }
        if !link.up {
            nl.set_link_up(link.index).map_err(k)?;
            changes.push(format!("set {} up", spec.device));
        }
        let route = spec.cluster_route(link.index);
        let routes = nl.list_routes().map_err(k)?;
        if !routes.contains(&route) {
            nl.replace_route(&route).map_err(k)?;
            changes.push(format!("added route {} dev {}", spec.network, spec.device));
        }
        Ok((link.index, changes))
    }
}

impl Drop for UdpDatapath {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The peer table for `leases`.
pub fn peer_table<'l>(
    network: Ipv4Net,
    leases: impl IntoIterator<Item = &'l Lease>,
    own: &LeaseKey,
    now: SystemTime,
) -> PeerTable {
    PeerTable::from_leases(network, leases, Some(own), now)
}

/// One queue's thread: both directions of `dev`'s queue.
///
/// One thread per queue carries both directions on purpose: the kernel's
/// TUN picks the queue of a flow's outgoing packets from the queue its
/// incoming packets were last written to, so a TCP flow's data and its ACKs
/// meet on one queue. Writing a flow's data into the device runs the
/// receiving pod's TCP stack in that same `writev`, and the ACK it sends
/// back is waiting in the queue when the call returns: this thread reads it
/// at once, where a separate egress thread would have to be woken for every
/// ACK (and the sender's side likewise for every batch of data).
///
/// For that the flow's ACKs must arrive on this thread's socket: every
/// thread sends a flow from the sending socket its [`flow_hash`] picks (the
/// same for both directions), so the peer's `SO_REUSEPORT` group hands all
/// of the flow's datagrams to one socket there, and its answers, sent from
/// the peer's socket for the same hash, all to one socket here. Sending
/// from this thread's own socket instead lets a flow wander: the peer
/// answers on whichever socket that source port hashes to, the kernel then
/// queues the flow's next data on that thread's queue, which sends from
/// another port; unless the hashes happen to line up, the flow moves
/// between threads and two of them may send it at once (reordering it).
fn queue_loop(
    dev: &SyncDevice,
    tx: &[TxSocket],
    rx: &UdpSocket,
    icmp: Option<Arc<OwnedFd>>,
    sh: &Shared,
    slot: usize,
) {
    let mut out = TunToUdp::new(dev, tx, icmp, slot);
    let mut inn = match UdpToTun::new(dev, rx) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "udp datapath: socket setup failed");
            sh.failed.store(true, Ordering::Relaxed);
            return;
        }
    };
    while !sh.stop.load(Ordering::Relaxed) {
        let Ok(sent) = out.pump(dev, tx, sh) else {
            return;
        };
        let Ok(received) = inn.pump(dev, rx, sh) else {
            return;
        };
        if !sent && !received {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            let mut fds = [
                PollFd::new(dev.as_fd(), PollFlags::POLLIN),
                PollFd::new(rx.as_fd(), PollFlags::POLLIN),
            ];
            let _ = poll(&mut fds, PollTimeout::from(IDLE_POLL.as_millis() as u16));
        }
    }
}

/// The TUN device is gone: the thread stops (the datapath is marked
/// failed) and the next reconcile pass restarts the datapath.
struct Stopped;

/// TUN -> UDP for one queue.
///
/// Packets land in one buffer at a fixed stride (`slot`, the device MTU):
/// TCP segments split from a super-packet are exactly MTU-sized, so the
/// segments of one read that go to the same peer already lie back to back
/// and leave in one GSO `sendmsg` without another copy.
struct TunToUdp {
    slot: usize,
    max_segments: usize,
    raw: Vec<u8>,
    packets: Vec<u8>,
    sizes: Vec<usize>,
    warn: RateLimited,
    offload: bool,
    icmp: [u8; NET_UNREACHABLE_MAX_LEN],
    icmp_sock: Option<Arc<OwnedFd>>,
    icmp_budget: IcmpBudget,
}

impl TunToUdp {
    fn new(
        dev: &SyncDevice,
        tx: &[TxSocket],
        icmp_sock: Option<Arc<OwnedFd>>,
        slot: usize,
    ) -> TunToUdp {
        let max_segments = tx
            .iter()
            .map(|t| t.state.max_gso_segments())
            .min()
            .unwrap_or(1)
            .clamp(1, GSO_MAX_BYTES / slot.max(1))
            .max(1);
        TunToUdp {
            slot,
            max_segments,
            raw: vec![0u8; VIRTIO_NET_HDR_LEN + 65_535],
            packets: vec![0u8; TX_SLOTS * slot],
            sizes: vec![0usize; TX_SLOTS],
            warn: RateLimited::default(),
            offload: dev.tcp_gso(),
            icmp: [0u8; NET_UNREACHABLE_MAX_LEN],
            icmp_sock,
            icmp_budget: IcmpBudget::default(),
        }
    }

    /// Reads what the queue holds (up to a batch) and sends it; whether
    /// anything was read.
    fn pump(&mut self, dev: &SyncDevice, tx: &[TxSocket], sh: &Shared) -> Result<bool, Stopped> {
        let slot = self.slot;
        let mut n = 0;
        let mut invalid = 0;
        let r = read_batch(
            dev,
            self.offload,
            &mut self.raw,
            &mut self.packets,
            &mut self.sizes,
            slot,
            &mut n,
            &mut invalid,
            &mut self.warn,
            "udp",
        );
        if invalid > 0 {
            let c = Counters {
                dropped_tun_invalid: invalid,
                ..Counters::default()
            };
            sh.counters.add(c.to_array());
        }
        if let Err(e) = r {
            tracing::warn!(error = %e, "udp egress: the TUN device is gone; the next pass recreates it");
            sh.failed.store(true, Ordering::Relaxed);
            return Err(Stopped);
        }
        if n == 0 {
            return Ok(false);
        }
        let table = sh.peers.load();
        let mut c = Counters::default();
        // The open group: destination, first index, segments, bytes, and
        // whether its last segment was full (so another may follow).
        let mut group: Option<Group> = None;
        for i in 0..n {
            let at = i * slot;
            let packet = &self.packets[at..at + self.sizes[i]];
            let v = table.egress(packet);
            c.count_egress(&v);
            if let (Egress::NoRoute { .. }, Some(sock)) = (v, &self.icmp_sock) {
                if self.icmp_budget.take() {
                    let from = Ipv4Addr::from(sh.address.load(Ordering::Relaxed));
                    if let Some(len) = net_unreachable(packet, from, &mut self.icmp) {
                        // To the offender's source (bytes 12..16 of its header).
                        let to = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
                        send_icmp(sock, &self.icmp[..len], to);
                    }
                }
            }
            let Egress::Forward { peer, len } = v else {
                continue;
            };
            let sock = flow_bucket(flow_hash(packet), tx.len());
            let joins = group.as_ref().is_some_and(|g| {
                g.peer == peer
                    && g.sock == sock
                    && g.open
                    && g.first + g.count == i
                    && g.count < self.max_segments
                    && g.bytes + len <= GSO_MAX_BYTES
            });
            if joins {
                let g = group.as_mut().expect("checked");
                g.count += 1;
                g.bytes += len;
                g.open = len == slot;
            } else {
                if let Some(g) = group.take() {
                    g.send(&tx[g.sock], sh, &self.packets, slot, &mut c, &mut self.warn);
                }
                group = Some(Group {
                    peer,
                    sock,
                    first: i,
                    count: 1,
                    bytes: len,
                    open: len == slot,
                });
            }
        }
        if let Some(g) = group.take() {
            g.send(&tx[g.sock], sh, &self.packets, slot, &mut c, &mut self.warn);
        }
        sh.counters.add(c.to_array());
        Ok(true)
    }
}

/// At most [`ICMP_PER_SECOND`] ICMP errors per second and thread: a flood
/// toward a vanished node must not become a flood of errors.
#[derive(Default)]
struct IcmpBudget {
    window: Option<Instant>,
    sent: u32,
}

/// See [`IcmpBudget`].
const ICMP_PER_SECOND: u32 = 100;

impl IcmpBudget {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        match self.window {
            Some(w) if now.duration_since(w) < Duration::from_secs(1) => {}
            _ => {
                self.window = Some(now);
                self.sent = 0;
            }
        }
        if self.sent < ICMP_PER_SECOND {
            self.sent += 1;
            true
        } else {
            false
        }
    }
}

/// Consecutive packets to one peer from one sending socket, all but the last exactly `slot` bytes:
/// one GSO send of `slot`-sized segments.
struct Group {
    peer: Ipv4Addr,
    /// The index of the sending socket (the flow's bucket).
    sock: usize,
    first: usize,
    count: usize,
    bytes: usize,
    open: bool,
}

impl Group {
    fn send(
        &self,
        tx: &TxSocket,
        sh: &Shared,
        packets: &[u8],
        slot: usize,
        c: &mut Counters,
        warn: &mut RateLimited,
    ) {
        let at = self.first * slot;
        let t = Transmit {
            destination: SocketAddr::V4(SocketAddrV4::new(self.peer, sh.port)),
            ecn: None,
            contents: &packets[at..at + self.bytes],
            segment_size: (self.count > 1).then_some(slot),
            src_ip: None,
        };
        if let Err(e) = tx.send(&t, &sh.stop) {
            let n = self.count as u64;
            c.send_errors += n;
            c.tx_packets = c.tx_packets.saturating_sub(n);
            c.tx_bytes = c.tx_bytes.saturating_sub(self.bytes as u64);
            if warn.ready() {
                tracing::warn!(peer = %self.peer, error = %e, packets = n, "udp egress: send failed");
            }
        }
    }
}

/// UDP -> TUN for one queue.
struct UdpToTun {
    state: UdpSocketState,
    rx: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    wbufs: Vec<Vec<u8>>,
    gro: GROTable,
    warn: RateLimited,
    offload: bool,
}

impl UdpToTun {
    fn new(dev: &SyncDevice, sock: &UdpSocket) -> io::Result<UdpToTun> {
        Ok(UdpToTun {
            state: UdpSocketState::new(UdpSockRef::from(sock))?,
            rx: (0..RX_SLOTS).map(|_| vec![0u8; RX_SLOT_BYTES]).collect(),
            meta: vec![RecvMeta::default(); RX_SLOTS],
            // Each write buffer can grow to a coalesced 64 KiB super-packet.
            wbufs: (0..TUN_WRITE_SLOTS)
                .map(|_| Vec::with_capacity(2 * VIRTIO_NET_HDR_LEN + 65_535))
                .collect(),
            gro: GROTable::default(),
            warn: RateLimited::default(),
            // With offloads, TCP segments are coalesced by [`Coalescer`] and
            // written without copying; without, packets go through tun-rs
            // one by one.
            offload: dev.tcp_gso(),
        })
    }

    /// Receives one batch of datagrams and writes their packets into the
    /// device; whether anything was received.
    fn pump(&mut self, dev: &SyncDevice, sock: &UdpSocket, sh: &Shared) -> Result<bool, Stopped> {
        let got = {
            let mut it = self.rx.iter_mut();
            let mut iovs: [IoSliceMut<'_>; RX_SLOTS] =
                std::array::from_fn(|_| IoSliceMut::new(it.next().expect("RX_SLOTS buffers")));
            self.state
                .recv(UdpSockRef::from(sock), &mut iovs, &mut self.meta)
        };
        let msgs = match got {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => {
                // ICMP errors reported on the socket and the like: keep going.
                if self.warn.ready() {
                    tracing::warn!(error = %e, "udp ingress: receive failed");
                }
                return Ok(true);
            }
        };
        let table = sh.peers.load();
        let mut c = Counters::default();
        let mut w = 0;
        let mut co = Coalescer::new();
        for (m, buf) in self.meta.iter().zip(self.rx.iter()).take(msgs) {
            let from = match m.addr.ip() {
                IpAddr::V4(a) => a,
                IpAddr::V6(a) => match a.to_ipv4_mapped() {
                    Some(v4) => v4,
                    None => {
                        c.dropped_spoofed += 1;
                        continue;
                    }
                },
            };
            let stride = m.stride.max(1);
            for d in buf[..m.len].chunks(stride) {
                let v = table.ingress(from, d);
                c.count_ingress(&v);
                let Ingress::Deliver { len } = v else {
                    continue;
                };
                if self.offload {
                    if let Err(e) = co.push(dev, &d[..len], &mut c.tun_write_errors) {
                        gone(sh, &mut c, &e);
                        return Err(Stopped);
                    }
                    continue;
                }
                let b = &mut self.wbufs[w];
                b.clear();
                b.resize(VIRTIO_NET_HDR_LEN, 0);
                b.extend_from_slice(&d[..len]);
                w += 1;
                if w == TUN_WRITE_SLOTS {
                    if !write_tun(
                        dev,
                        &mut self.gro,
                        &mut self.wbufs[..w],
                        sh,
                        &mut c,
                        &mut self.warn,
                    ) {
                        return Err(Stopped);
                    }
                    w = 0;
                }
            }
        }
        if let Err(e) = co.flush(dev, &mut c.tun_write_errors) {
            gone(sh, &mut c, &e);
            return Err(Stopped);
        }
        if w > 0
            && !write_tun(
                dev,
                &mut self.gro,
                &mut self.wbufs[..w],
                sh,
                &mut c,
                &mut self.warn,
            )
        {
            return Err(Stopped);
        }
        sh.counters.add(c.to_array());
        Ok(true)
    }
}

/// Counts what was done and marks the datapath failed: the device is gone.
fn gone(sh: &Shared, c: &mut Counters, e: &io::Error) {
    sh.counters.add(c.to_array());
    *c = Counters::default();
    tracing::warn!(error = %e, "udp ingress: the TUN device is gone; the next pass recreates it");
    sh.failed.store(true, Ordering::Relaxed);
}

/// Writes a batch to the TUN device (TCP segments coalesced when offloads
/// are on); false when the device is gone.
fn write_tun(
    dev: &SyncDevice,
    gro: &mut GROTable,
    bufs: &mut [Vec<u8>],
    sh: &Shared,
    c: &mut Counters,
    warn: &mut RateLimited,
) -> bool {
    match dev.send_multiple(gro, bufs, VIRTIO_NET_HDR_LEN) {
        Ok(_) => true,
        Err(e) if device_gone(&e) => {
            sh.counters.add(c.to_array());
            *c = Counters::default();
            tracing::warn!(error = %e, "udp ingress: the TUN device is gone; the next pass recreates it");
            sh.failed.store(true, Ordering::Relaxed);
            false
        }
        Err(e) => {
            c.tun_write_errors += 1;
            if warn.ready() {
                tracing::warn!(error = %e, "udp ingress: writing to the TUN device failed");
            }
            true
        }
    }
}

/// Writes the counters to `path` (atomically) every second when they
/// changed, and logs them every minute when they changed.
fn stats_loop(sh: &Shared, base: Counters, path: &std::path::Path) {
    let mut last_written: Option<Counters> = None;
    let mut last_logged = Counters::default();
    let mut logged_at = Instant::now();
    while !sh.stop.load(Ordering::Relaxed) {
        let mut c = base;
        c.add(&sh.counters_now());
        if last_written != Some(c) {
            if let Err(e) = write_stats(path, &c) {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the udp stats file");
            }
            last_written = Some(c);
        }
        if logged_at.elapsed() >= STATS_LOG_EVERY && c != last_logged {
            log_counters(&c);
            last_logged = c;
            logged_at = Instant::now();
        }
        // Sleep in short steps so shutdown is prompt.
        let until = Instant::now() + STATS_EVERY;
        while Instant::now() < until && !sh.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut c = base;
    c.add(&sh.counters_now());
    let _ = write_stats(path, &c);
}

/// Logs the counters (one line).
pub fn log_counters(c: &Counters) {
    tracing::info!(
        tx_packets = c.tx_packets,
        tx_bytes = c.tx_bytes,
        rx_packets = c.rx_packets,
        rx_bytes = c.rx_bytes,
        dropped_spoofed = c.dropped_spoofed,
        dropped_malformed = c.dropped_malformed,
        dropped_no_route = c.dropped_no_route,
        dropped_tun_invalid = c.dropped_tun_invalid,
        send_errors = c.send_errors,
        tun_write_errors = c.tun_write_errors,
        "udp datapath counters"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_is_upstreams_without_backend_type_or_data() {
        let a = lease_attrs(Ipv4Addr::new(172, 16, 1, 14));
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"PublicIP":"172.16.1.14","PublicIPv6":null}"#
        );
        assert_eq!(a.effective_backend_type(), BACKEND_TYPE);
    }

    #[test]
    fn spec_address_and_route() {
        let s = UdpSpec::new(
            "10.244.1.0/24".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
            1472,
            8285,
            Ipv4Addr::new(172, 16, 1, 14),
            None,
        );
        assert_eq!(s.device, "flannel0");
        assert_eq!(s.address, "10.244.1.0/32".parse::<Ipv4Net>().unwrap());
        assert_eq!(
            s.cluster_route(7),
            Route {
                dst: "10.244.0.0/16".parse().unwrap(),
                gateway: None,
                oif: 7,
                onlink: false
            }
        );
    }

    #[test]
    fn leftover_is_flannel0_of_kind_tun_only() {
        let mut l = Link {
            index: 5,
            name: "flannel0".into(),
            mtu: 1472,
            mac: None,
            kind: Some("tun".into()),
            up: true,
            master: None,
            vxlan: None,
        };
        assert!(is_udp_leftover(&l));
        l.kind = Some("bridge".into());
        assert!(!is_udp_leftover(&l));
        l.kind = Some("tun".into());
        l.name = "tun0".into();
        assert!(!is_udp_leftover(&l));
    }
}
