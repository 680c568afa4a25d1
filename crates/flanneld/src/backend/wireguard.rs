//! The wireguard backend: encrypted pod traffic between nodes, a userspace
//! WireGuard datapath on a TUN device, wire-compatible with any WireGuard
//! peer (the kernel's, wireguard-go, boringtun). Where the kernel has
//! WireGuard, `Backend.Datapath` auto (the default) or kernel gives the
//! devices to the kernel instead ([`super::wireguard_kernel`]); this
//! module's keys, specs and leftovers serve both.
//!
//! The devices, as upstream sets them up (with the kernel's `wireguard`
//! link type where we use a TUN device):
//! `ip tuntap add flannel-wg mode tun multi_queue`,
//! `ip link set flannel-wg mtu EXT_MTU-80 up`,
//! `ip addr add <own subnet network>/32 dev flannel-wg`,
//! `ip route replace <Network> dev flannel-wg`; with IPv6 in `Mode`
//! separate the same for `flannel-wg-v6` (`<own IPv6 subnet network>/128`,
//! `<IPv6Network>`), in the other modes both families on `flannel-wg`.
//! Each device has a UDP port (`ListenPort` 51820, `ListenPortV6` 51821)
//! and a WireGuard peer per remote lease: its public key, endpoint
//! `PublicIP:Port`, allowed IPs its subnet(s), keepalive and PSK from the
//! config ([`flannel_core::wireguard`] decides the peers). Everything is
//! level-triggered: each reconcile pass puts back a deleted device, address
//! or route ([`WgDatapath::ensure`]) and swaps in the peer set of the
//! current leases ([`WgDatapath::set_peers`]); sessions of peers that stay
//! survive both.
//!
//! The WireGuard protocol (Noise IK handshakes, cookies, timers, the
//! ChaCha20-Poly1305 transport) is boringtun's (`boringtun::noise`), one
//! `Tunn` per peer. The packet path is the udp backend's:
//! - the device is multi-queue with offloads: one read returns a 64 KiB
//!   TCP super-packet, split at MTU stride (tun-rs); received IPv4 TCP
//!   segments of a flow are written back as one super-packet straight from
//!   where they were decrypted (the udp backend's coalescer), anything else
//!   on its own;
//! - the packets of one read that go to one peer are encrypted under one
//!   lock of its `Tunn`, back to back at a fixed stride, and leave in one
//!   UDP GSO `sendmsg`; receiving is `recvmmsg` with UDP GRO (quinn-udp),
//!   each message decrypted straight into the device's write buffer;
//! - one thread per queue (one per core, at most 4) carries both
//!   directions; a flow is sent from the socket (an ephemeral port per
//!   queue) that a hash of the inner flow, the same both ways, picks, so a
//!   peer's `SO_REUSEPORT` group of listen sockets hands the flow to one
//!   thread and it is never reordered (see udp.rs's `queue_loop`). The
//!   ephemeral sockets are read too: a WireGuard peer answers to the source
//!   address it saw last (roaming), as the kernel's and wireguard-go do;
//! - the peer table is an immutable snapshot swapped in whole (arc-swap);
//!   nothing is allocated per packet.
//!
//! Receiving follows WireGuard: a datagram is delivered only when it
//! authenticates under a session of a configured peer and the decrypted
//! packet's source lies in that peer's allowed IPs; everything else is
//! counted and dropped. Plaintext is padded to a multiple of 16 bytes
//! before encryption (capped at the MTU), as the kernel does.
//!
//! Deliberate differences of this datapath from upstream (kernel
//! WireGuard):
//! - a peer's endpoint is the lease's and stays so (no roaming of our
//!   side): flannel knows every endpoint from the store;
//! - data leaves from one of a few ephemeral ports per flow (the kernel
//!   sends from `ListenPort`); WireGuard peers accept any source port;
//! - SIGTERM leaves the devices and routes in place as the other backends
//!   leave theirs (upstream deletes `flannel-wg` on exit); the device is a
//!   persistent TUN that a restart attaches to again.
//!
//! The counters are written as JSON to `<device>-stats.json` beside
//! subnet.env every second when they change.

use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use flannel_core::config::{WireguardConfig, WireguardDatapath};
use flannel_core::lease::{IpFamily, LeaseAttrs};
use flannel_core::wire;
use flannel_core::wireguard::{
    allows, ip_summary, padded_len, AllowedIps, Counters, DeviceRole, SecretKey, WgKey, WgPeer,
    COUNTERS, DATA_OVERHEAD,
};
use flannel_netlink::{Link, Netlink};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tun_rs::{SyncDevice, VIRTIO_NET_HDR_LEN};

use super::fastpath::{
    device_gone, open_tun, queue_count, read_batch, udp_socket, write_stats, Coalescer,
    RateLimited, SharedCounters, SocketError, TunError, TxSocket, IDLE_POLL, TX_SLOTS,
};

/// The backend's `Type` and lease `BackendType`.
pub const BACKEND_TYPE: &str = wire::BACKEND_TYPE_WIREGUARD;

/// Largest UDP payload one GSO send carries in total.
const GSO_MAX_BYTES: usize = 65_507;
/// Datagram buffers per `recvmmsg`.
const RX_SLOTS: usize = 32;
/// Bytes per receive buffer: the largest UDP GRO aggregate.
const RX_SLOT_BYTES: usize = 65_536;
/// How often every peer's WireGuard timers run (handshake retries,
/// keepalives, rekeying); boringtun's own device uses 250 ms.
const TIMER_TICK: Duration = Duration::from_millis(100);
/// Handshake messages per second (each is counted twice: our MAC1 check
/// and the peer's `Tunn`) before boringtun asks for cookies (under load).
const HANDSHAKE_RATE_LIMIT: u64 = 200;
/// How often the stats file is refreshed.
const STATS_EVERY: Duration = Duration::from_secs(1);
/// Scratch for handshake messages and queued packets: a whole packet plus
/// the WireGuard overhead.
const CONTROL_BYTES: usize = 65_536 + 64;

/// Errors of the wireguard backend, each naming what failed and what to check.
#[derive(Debug, thiserror::Error)]
pub enum WireguardError {
    #[error("reading the WireGuard private key {path}: {source}; check the file (WIREGUARD_KEY_FILE) or remove it to get a new key")]
    ReadKey {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the WireGuard private key {path} is unusable: {detail}; put a key of `wg genkey` there or remove the file to get a new key")]
    BadKey { path: PathBuf, detail: String },
    #[error("writing the new WireGuard private key {path}: {source}; is its directory writable (WIREGUARD_KEY_FILE)?")]
    WriteKey {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("generating a WireGuard private key: {0}")]
    Random(String),
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
    #[error("wireguard device {device}: listen-port {port} ({field}) is in use; is another process using the port?")]
    PortInUse {
        device: String,
        field: &'static str,
        port: u16,
    },
    #[error("{field} \"kernel\": this kernel has no WireGuard (link type wireguard unknown); load the wireguard module, or set {field} to \"auto\" or \"userspace\"")]
    NoKernelWireguard { field: String },
    #[error("wireguard device {device}: {source}")]
    Kernel {
        device: String,
        #[source]
        source: flannel_netlink::Error,
    },
}

// ---------------------------------------------------------------------------
// Keys

/// This node's key pair.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    pub private: SecretKey,
    pub public: WgKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// The public key of a private key (Curve25519 scalar multiplication of
/// the base point: what `wg pubkey` prints).
pub fn public_key(private: &SecretKey) -> WgKey {
    WgKey(PublicKey::from(&StaticSecret::from(private.0 .0)).to_bytes())
}

/// The key file: `WIREGUARD_KEY_FILE` when set, else /run/flannel/wgkey.
pub fn key_file_path() -> PathBuf {
    std::env::var_os(wire::ENV_WIREGUARD_KEY_FILE)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(wire::WIREGUARD_DEFAULT_KEY_FILE))
}

/// Where the key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// Read from the existing file.
    File,
    /// Generated now and written to the file.
    Generated,
}

/// The node's key pair from `path`, created once: an existing file is read
/// (the base64 `wg genkey` prints, surrounding whitespace ignored); a
/// missing one gets a new random key, written as `wg genkey` writes it
/// (clamped, base64, newline) with mode 0600, created exclusively so that
/// two starts never write different keys. The directory is created (0755)
/// when missing.
pub fn load_or_create_key(path: &Path) -> Result<(KeyPair, KeySource), WireguardError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let k = WgKey::parse(&text).map_err(|e| WireguardError::BadKey {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
            if let Ok(m) = std::fs::metadata(path) {
                if m.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), mode = format!("{:o}", m.permissions().mode() & 0o777), "the WireGuard private key is readable by others; chmod 600 it");
                }
            }
            let private = SecretKey(k);
            return Ok((
                KeyPair {
                    public: public_key(&private),
                    private,
                },
                KeySource::File,
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(WireguardError::ReadKey {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let mut raw = [0u8; 32];
    {
        use rand::TryRngCore;
        rand::rngs::OsRng
            .try_fill_bytes(&mut raw)
            .map_err(|e| WireguardError::Random(e.to_string()))?;
    }
    // As `wg genkey`: the Curve25519 clamping, stored.
    raw[0] &= 248;
    raw[31] = (raw[31] & 127) | 64;
    let private = SecretKey(WgKey(raw));
    let werr = |source| WireguardError::WriteKey {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(werr)?;
    }
    let mut f = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        // Written by someone else since we looked: theirs wins.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return load_or_create_key(path),
        Err(e) => return Err(werr(e)),
    };
    f.write_all(format!("{}\n", private.0).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(werr)?;
    Ok((
        KeyPair {
            public: public_key(&private),
            private,
        },
        KeySource::Generated,
    ))
}

/// The attributes we publish: upstream's wireguard lease, byte for byte
/// (`BackendData` `{"PublicKey":"..","Port":ListenPort}` with IPv4,
/// `BackendV6Data` with `ListenPortV6` with IPv6; in every `Mode`, as
/// upstream).
pub fn lease_attrs(
    public_ip: Option<Ipv4Addr>,
    public_ipv6: Option<Ipv6Addr>,
    public_key: &WgKey,
    cfg: &WireguardConfig,
    ipv4: bool,
    ipv6: bool,
) -> LeaseAttrs {
    flannel_core::wireguard::lease_attrs(
        public_ip,
        public_ipv6,
        public_key,
        ipv4.then_some(cfg.listen_port),
        ipv6.then_some(cfg.listen_port_v6),
    )
}

// ---------------------------------------------------------------------------
// Devices

/// The address family of a device's sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketFamily {
    /// `0.0.0.0:port`.
    V4,
    /// `[::]:port`, IPv6 only.
    V6,
    /// `[::]:port` taking IPv4 too (v4-mapped): `Mode` auto and ipv6.
    Dual,
}

/// Everything one device's datapath needs; part of the reconciler's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgDeviceSpec {
    /// Which device and which peers.
    pub role: DeviceRole,
    /// `flannel-wg` or `flannel-wg-v6`.
    pub device: String,
    /// `<own subnet network>/32` and/or `<own IPv6 subnet network>/128`.
    pub addresses: Vec<IpNet>,
    /// The cluster networks routed into the device.
    pub networks: Vec<IpNet>,
    /// Device MTU: the underlay MTU (`MTU`, else the external interface's) - 80.
    pub mtu: u32,
    /// `ListenPort` / `ListenPortV6`.
    pub port: u16,
    pub sockets: SocketFamily,
    pub keys: KeyPair,
    pub psk: Option<SecretKey>,
    /// `PersistentKeepaliveInterval` (s), 0: off.
    pub keepalive: u16,
    /// Where the counters are written as JSON (userspace only).
    pub stats_file: Option<PathBuf>,
    /// The kernel's WireGuard instead of the userspace datapath.
    pub kernel: bool,
}

/// The stats file of `device` in `dir` (beside subnet.env).
pub fn stats_file(dir: &Path, device: &str) -> PathBuf {
    dir.join(format!("{device}-stats.json"))
}

/// The device specs for a config: per `Mode`, `flannel-wg` for IPv4 and
/// `flannel-wg-v6` for IPv6 (separate), or `flannel-wg` for both. `own_v4`
/// / `own_v6` are our subnets of the enabled families, `networks` the
/// cluster networks.
#[allow(clippy::too_many_arguments)]
pub fn device_specs(
    cfg: &WireguardConfig,
    own_v4: Option<Ipv4Net>,
    own_v6: Option<Ipv6Net>,
    network: Option<Ipv4Net>,
    ipv6_network: Option<Ipv6Net>,
    mtu: u32,
    keys: &KeyPair,
    stats_dir: Option<&Path>,
    kernel: bool,
) -> Vec<WgDeviceSpec> {
    use flannel_core::config::WireguardMode;
    let addr4 = own_v4.map(|s| IpNet::V4(Ipv4Net::new(s.network(), 32).expect("/32")));
    let addr6 = own_v6.map(|s| IpNet::V6(Ipv6Net::new(s.network(), 128).expect("/128")));
    let net4 = network.filter(|_| own_v4.is_some()).map(IpNet::V4);
    let net6 = ipv6_network.filter(|_| own_v6.is_some()).map(IpNet::V6);
    let spec = |role: DeviceRole, addresses: Vec<IpNet>, networks: Vec<IpNet>, port, sockets| {
        let device = role.device_name().to_string();
        WgDeviceSpec {
            role,
            stats_file: stats_dir.map(|d| stats_file(d, &device)),
            device,
            addresses,
            networks,
            mtu,
            port,
            sockets,
            keys: keys.clone(),
            psk: cfg.psk,
            keepalive: cfg.persistent_keepalive,
            kernel,
        }
    };
    match cfg.mode {
        WireguardMode::Separate => {
            let mut out = Vec::new();
            if let (Some(a), Some(n)) = (addr4, net4) {
                out.push(spec(
                    DeviceRole::Separate(IpFamily::V4),
                    vec![a],
                    vec![n],
                    cfg.listen_port,
                    SocketFamily::V4,
                ));
            }
            if let (Some(a), Some(n)) = (addr6, net6) {
                out.push(spec(
                    DeviceRole::Separate(IpFamily::V6),
                    vec![a],
                    vec![n],
                    cfg.listen_port_v6,
                    SocketFamily::V6,
                ));
            }
            out
        }
        mode => {
            let sockets = match mode {
                WireguardMode::Ipv4 => SocketFamily::V4,
                _ => SocketFamily::Dual,
            };
            vec![spec(
                DeviceRole::Single(mode),
                addr4.into_iter().chain(addr6).collect(),
                net4.into_iter().chain(net6).collect(),
                cfg.listen_port,
                sockets,
            )]
        }
    }
}

/// Whether `link` is a device of the wireguard backend (ours: a TUN; or
/// upstream's kernel `wireguard` link) by its name.
pub fn is_wireguard_device_name(name: &str) -> bool {
    name == wire::WIREGUARD_DEVICE || name == wire::WIREGUARD_DEVICE_V6
}

/// Deletes the wireguard backend's devices that `keep` does not name
/// (`ip link del flannel-wg[-v6]`): every one when another backend runs,
/// `flannel-wg-v6` when IPv6 is off or `Mode` is not separate. Their routes
/// go with them. Returns a line per device removed.
pub fn remove_leftovers(nl: &mut Netlink, keep: &[&str]) -> Result<Vec<String>, WireguardError> {
    let mut out = Vec::new();
    for name in [wire::WIREGUARD_DEVICE, wire::WIREGUARD_DEVICE_V6] {
        if keep.contains(&name) {
            continue;
        }
        let k = |source| WireguardError::Kernel {
            device: name.to_string(),
            source,
        };
        let Some(link) = nl.link_by_name(name).map_err(k)? else {
            continue;
        };
        if !matches!(link.kind.as_deref(), Some("tun") | Some("wireguard")) {
            continue;
        }
        nl.del_link(link.index).map_err(k)?;
        out.push(format!(
            "removed {} (ifindex {}), left over from the wireguard backend, with its routes",
            link.name, link.index
        ));
    }
    Ok(out)
}

/// Decides once, at start, which datapath the devices get from
/// `Backend.Datapath` and a probe of the kernel (`ip link add
/// flannel-wgprobe type wireguard`, deleted at once), and says so. Returns
/// whether the kernel's WireGuard is used; `kernel` without it is an error.
pub fn choose_datapath(nl: &mut Netlink, want: WireguardDatapath) -> Result<bool, WireguardError> {
    if want == WireguardDatapath::Userspace {
        tracing::info!("Backend.Datapath \"userspace\": using the userspace WireGuard datapath");
        return Ok(false);
    }
    match (nl.has_wireguard("flannel-wgprobe"), want) {
        (Ok(true), _) => {
            tracing::info!(
                "the kernel has WireGuard (link type wireguard): using kernel WireGuard devices"
            );
            Ok(true)
        }
        (Ok(false), WireguardDatapath::Kernel) => Err(WireguardError::NoKernelWireguard {
            field: "Backend.Datapath".into(),
        }),
        (Err(e), WireguardDatapath::Kernel) => Err(WireguardError::Kernel {
            device: "flannel-wgprobe".into(),
            source: e,
        }),
        (Ok(false), _) => {
            tracing::info!("no kernel WireGuard (link type wireguard unknown): using the userspace WireGuard datapath");
            Ok(false)
        }
        (Err(e), _) => {
            tracing::info!(error = %e, "could not probe for kernel WireGuard: using the userspace WireGuard datapath");
            Ok(false)
        }
    }
}

// ---------------------------------------------------------------------------
// The peer table

/// One remote node as the protocol sees it: its key and its WireGuard
/// state machine. Kept across peer-set updates while the key stays.
struct Peer {
    key: WgKey,
    /// Our session indexes for this peer are `index << 8 | n` (boringtun).
    index: u32,
    tunn: Mutex<Tunn>,
}

impl Peer {
    fn lock(&self) -> MutexGuard<'_, Tunn> {
        self.tunn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A peer in the current set: its state, its spec, where its datagrams go
/// (in the sockets' family).
struct Entry {
    peer: Arc<Peer>,
    spec: WgPeer,
    dest: SocketAddr,
}

/// The snapshot the packet path reads.
#[derive(Default)]
struct Table {
    entries: Vec<Entry>,
    allowed: AllowedIps,
    /// (index, entry) sorted.
    by_index: Vec<(u32, usize)>,
    /// (key, entry) sorted.
    by_key: Vec<(WgKey, usize)>,
}

impl Table {
    fn by_index(&self, receiver_idx: u32) -> Option<&Entry> {
        let i = receiver_idx >> 8;
        self.by_index
            .binary_search_by_key(&i, |e| e.0)
            .ok()
            .map(|k| &self.entries[self.by_index[k].1])
    }

    fn by_key(&self, key: &WgKey) -> Option<&Entry> {
        self.by_key
            .binary_search_by_key(key, |e| e.0)
            .ok()
            .map(|k| &self.entries[self.by_key[k].1])
    }

    fn specs(&self) -> Vec<&WgPeer> {
        self.entries.iter().map(|e| &e.spec).collect()
    }
}

/// `addr` as the sockets of `family` send to it: v4-mapped on a dual-stack socket.
fn in_family(addr: SocketAddr, family: SocketFamily) -> SocketAddr {
    match (addr, family) {
        (SocketAddr::V4(a), SocketFamily::Dual) => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        _ => addr,
    }
}

/// A source address as the protocol and the logs see it (v4-mapped ones unmapped).
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, a.port())),
            None => addr,
        },
        a => a,
    }
}

/// State shared between the datapath handle and its threads.
struct Shared {
    table: ArcSwap<Table>,
    counters: Arc<SharedCounters<COUNTERS>>,
    stop: AtomicBool,
    /// Set by a thread that stopped on a fatal error (the device is gone).
    failed: AtomicBool,
    secret: StaticSecret,
    public: PublicKey,
    rate_limiter: Arc<RateLimiter>,
    /// Handshake messages and timer output leave by the listen socket.
    control: UdpSocket,
    family: SocketFamily,
    psk: Option<[u8; 32]>,
    keepalive: Option<u16>,
    next_index: AtomicU32,
}

impl Shared {
    fn counters_now(&self) -> Counters {
        Counters::from_array(self.counters.snapshot())
    }

    fn add(&self, c: &mut Counters) {
        self.counters.add(c.to_array());
        *c = Counters::default();
    }

    /// Sends a handshake, cookie or keepalive message (from the listen port).
    fn send_control(&self, to: SocketAddr, msg: &[u8], c: &mut Counters) {
        if self
            .control
            .send_to(msg, in_family(to, self.family))
            .is_err()
        {
            c.send_errors += 1;
        }
    }

    /// Swaps in `peers`; keeps the state of peers whose key stays. Returns
    /// whether anything changed.
    fn set_peers(&self, peers: Vec<WgPeer>) -> bool {
        let old = self.table.load();
        if old.specs().into_iter().eq(peers.iter()) {
            return false;
        }
        let mut entries = Vec::with_capacity(peers.len());
        for spec in peers {
            let peer = match old.by_key(&spec.public_key) {
                Some(e) => e.peer.clone(),
                None => {
                    // 24 bits of index; wrapping after 16 million new keys
                    // only risks confusing a long-gone peer's index.
                    let index = self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
                    Arc::new(Peer {
                        key: spec.public_key,
                        index,
                        tunn: Mutex::new(Tunn::new(
                            self.secret.clone(),
                            PublicKey::from(spec.public_key.0),
                            self.psk,
                            self.keepalive,
                            index,
                            Some(self.rate_limiter.clone()),
                        )),
                    })
                }
            };
            entries.push(Entry {
                dest: in_family(spec.endpoint, self.family),
                peer,
                spec,
            });
        }
        let specs: Vec<WgPeer> = entries.iter().map(|e| e.spec.clone()).collect();
        let mut by_index: Vec<(u32, usize)> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.peer.index, i))
            .collect();
        by_index.sort();
        let mut by_key: Vec<(WgKey, usize)> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.peer.key, i))
            .collect();
        by_key.sort();
        self.table.store(Arc::new(Table {
            allowed: AllowedIps::new(&specs),
            entries,
            by_index,
            by_key,
        }));
        true
    }
}

// ---------------------------------------------------------------------------
// The datapath

/// Reads one device's [`WgDatapath::counters`] from another thread;
/// `Counters::from_array` of what it reads.
pub type CountersReader = super::fastpath::CountersReader<COUNTERS>;

/// One device's running datapath: the TUN queues, the sockets, the
/// threads. Dropping it stops and joins the threads; the device
/// (persistent) stays.
pub struct WgDatapath {
    spec: WgDeviceSpec,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Counters of earlier generations of threads, so totals never go back.
    base: Counters,
    queues: usize,
}

impl std::fmt::Debug for WgDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgDatapath")
            .field("device", &self.spec.device)
            .field("queues", &self.queues)
            .finish()
    }
}

/// The wildcard address of `family` on `port`.
fn wildcard(family: SocketFamily, port: u16) -> SocketAddr {
    match family {
        SocketFamily::V4 => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
        SocketFamily::V6 | SocketFamily::Dual => {
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0))
        }
    }
}

const WHAT: &str = "wireguard backend";

pub(super) fn port_field(spec: &WgDeviceSpec) -> &'static str {
    match spec.role {
        DeviceRole::Separate(IpFamily::V6) => "Backend.ListenPortV6",
        _ => "Backend.ListenPort",
    }
}

impl WgDatapath {
    fn start_with(
        nl: &mut Netlink,
        spec: &WgDeviceSpec,
        base: Counters,
        old: Option<Arc<Shared>>,
    ) -> Result<WgDatapath, WireguardError> {
        let queues = queue_count("FLANNELD_WIREGUARD_QUEUES");
        let v6only = spec.sockets == SocketFamily::V6;
        let field = port_field(spec);
        // Sockets first: a port in use fails before the device is touched.
        let listen = wildcard(spec.sockets, spec.port);
        let mut rx = Vec::with_capacity(queues);
        for _ in 0..queues {
            rx.push(udp_socket(listen, true, v6only, WHAT, field)?);
        }
        let mut tx = Vec::with_capacity(queues);
        for _ in 0..queues {
            let sock = udp_socket(wildcard(spec.sockets, 0), false, v6only, WHAT, field)?;
            let state = UdpSocketState::new(UdpSockRef::from(&sock))
                .map_err(|source| SocketError::Setup { what: WHAT, source })?;
            tx.push(TxSocket { sock, state });
        }
        let control = rx[0]
            .try_clone()
            .map_err(|source| SocketError::Setup { what: WHAT, source })?;
        let tx: Arc<[TxSocket]> = tx.into();
        let devs = open_tun(nl, &spec.device, queues)?;
        let secret = StaticSecret::from(spec.keys.private.0 .0);
        let public = PublicKey::from(&secret);
        let psk = spec.psk.map(|k| k.0 .0);
        let keepalive = (spec.keepalive > 0).then_some(spec.keepalive);
        // The peers (and their sessions, and the rate limiter they share)
        // of the previous generation carry over when keys, PSK and
        // keepalive are the same.
        let old = old.filter(|o| o.public == public && o.psk == psk && o.keepalive == keepalive);
        let shared = Arc::new(Shared {
            table: ArcSwap::from_pointee(Table::default()),
            counters: Arc::default(),
            stop: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            rate_limiter: old.as_ref().map_or_else(
                || Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
                |o| o.rate_limiter.clone(),
            ),
            secret,
            public,
            control,
            family: spec.sockets,
            psk,
            keepalive,
            next_index: AtomicU32::new(
                old.as_ref()
                    .map_or(1, |o| o.next_index.load(Ordering::Relaxed)),
            ),
        });
        if let Some(old) = old {
            {
                let t = old.table.load_full();
                let entries = t
                    .entries
                    .iter()
                    .map(|e| Entry {
                        peer: e.peer.clone(),
                        dest: in_family(e.spec.endpoint, shared.family),
                        spec: e.spec.clone(),
                    })
                    .collect();
                shared.table.store(Arc::new(Table {
                    entries,
                    allowed: t.allowed.clone(),
                    by_index: t.by_index.clone(),
                    by_key: t.by_key.clone(),
                }));
            }
        }
        let mut dp = WgDatapath {
            spec: spec.clone(),
            shared: shared.clone(),
            threads: Vec::new(),
            base,
            queues,
        };
        let slot = (spec.mtu as usize).max(68);
        let fam = match spec.role {
            DeviceRole::Separate(IpFamily::V6) => "wg6",
            _ => "wg",
        };
        for (q, (dev, rx)) in devs.into_iter().zip(rx).enumerate() {
            let sh = shared.clone();
            let tx = tx.clone();
            dp.spawn(format!("{fam}-q{q}"), move || {
                queue_loop(&dev, &rx, &tx, q, &sh, slot)
            })?;
        }
        let sh = shared.clone();
        let stats = spec.stats_file.clone();
        let base = dp.base;
        dp.spawn(format!("{fam}-timers"), move || {
            timers_loop(&sh, base, stats.as_deref())
        })?;
        tracing::info!(device = %spec.device, queues, listen = %listen, public_key = %spec.keys.public, "wireguard datapath started");
        Ok(dp)
    }

    fn spawn(
        &mut self,
        name: String,
        f: impl FnOnce() + Send + 'static,
    ) -> Result<(), WireguardError> {
        let h = std::thread::Builder::new()
            .name(name.clone())
            .spawn(f)
            .map_err(|source| WireguardError::Spawn { what: name, source })?;
        self.threads.push(h);
        Ok(())
    }

    /// The counters so far.
    pub fn counters(&self) -> Counters {
        let mut c = self.base;
        c.add(&self.shared.counters_now());
        c
    }

    /// A handle reading [`WgDatapath::counters`] from another thread (the
    /// metrics endpoint); it follows this generation of threads only.
    pub fn counters_reader(&self) -> CountersReader {
        CountersReader::new(self.base.to_array(), self.shared.counters.clone())
    }

    /// Swaps in the peer set; returns whether it changed. Peers whose key
    /// stays keep their sessions.
    pub fn set_peers(&self, peers: Vec<WgPeer>) -> bool {
        self.shared.set_peers(peers)
    }

    /// The peers in use.
    pub fn peers(&self) -> Vec<WgPeer> {
        self.shared
            .table
            .load()
            .entries
            .iter()
            .map(|e| e.spec.clone())
            .collect()
    }

    /// The device's name.
    pub fn device(&self) -> &str {
        &self.spec.device
    }

    /// Makes the kernel hold the device as `spec` wants it: restarts the
    /// datapath when the device vanished, a thread failed or the spec
    /// changed in a way the threads cannot follow (port, sockets, MTU,
    /// keys, PSK, keepalive), then fixes MTU, addresses, up state and the
    /// cluster routes in place. Returns the device's index and a line per
    /// change.
    pub fn ensure(
        this: &mut Option<WgDatapath>,
        nl: &mut Netlink,
        spec: &WgDeviceSpec,
    ) -> Result<(u32, Vec<String>), WireguardError> {
        let k = |source| WireguardError::Kernel {
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
            (Some(_), Some(l)) if l.kind.as_deref() != Some("tun") => {
                Some("the device is no longer our TUN device")
            }
            (Some(dp), Some(_))
                if dp.spec.port != spec.port
                    || dp.spec.sockets != spec.sockets
                    || dp.spec.mtu != spec.mtu
                    || dp.spec.keys != spec.keys
                    || dp.spec.psk != spec.psk
                    || dp.spec.keepalive != spec.keepalive =>
            {
                Some("the port, MTU, keys, PSK or keepalive changed")
            }
            _ => None,
        };
        if let Some(why) = restart_why {
            let (base, old) = match this.take() {
                Some(old) => {
                    let c = old.counters();
                    let sh = old.shared.clone();
                    drop(old);
                    (c, Some(sh))
                }
                None => (Counters::default(), None),
            };
            let dp = WgDatapath::start_with(nl, spec, base, old)?;
            if why != "starting" {
                changes.push(format!(
                    "restarted the wireguard datapath on {} ({why})",
                    spec.device
                ));
            }
            *this = Some(dp);
        }
        let dp = this.as_mut().expect("started above");
        dp.spec = spec.clone();
        let link = nl.link_by_name(&spec.device).map_err(k)?.ok_or_else(|| {
            k(flannel_netlink::Error::LinkNotFound {
                op: "ip link show".into(),
                name: spec.device.clone(),
            })
        })?;
        ensure_link(nl, &link, spec, &mut changes).map_err(k)?;
        Ok((link.index, changes))
    }
}

/// MTU, addresses, up state and routes of the device (either datapath's).
pub(super) fn ensure_link(
    nl: &mut Netlink,
    link: &Link,
    spec: &WgDeviceSpec,
    changes: &mut Vec<String>,
) -> flannel_netlink::Result<()> {
    let dev = &spec.device;
    if link.mtu != spec.mtu {
        nl.set_link_mtu(link.index, spec.mtu)?;
        changes.push(format!("set {dev} mtu {} (was {})", spec.mtu, link.mtu));
    }
    let addrs = nl.list_addresses(link.index)?;
    for want in &spec.addresses {
        if !addrs.contains(want) {
            // nodad: usable at once (no duplicate detection on a
            // point-to-point device whose address nobody else has).
            match want {
                IpNet::V6(_) => nl.add_address_nodad(link.index, *want)?,
                IpNet::V4(_) => nl.add_address(link.index, *want)?,
            }
            changes.push(format!("added address {want} to {dev}"));
        }
    }
    // The kernel's IPv6 link-local address stays.
    let link_local =
        |a: &IpNet| matches!(a, IpNet::V6(n) if n.addr().segments()[0] & 0xffc0 == 0xfe80);
    for a in addrs
        .iter()
        .filter(|a| !spec.addresses.contains(a) && !link_local(a))
    {
        nl.del_address(link.index, *a)?;
        changes.push(format!("removed stale address {a} from {dev}"));
    }
    if !link.up {
        nl.set_link_up(link.index)?;
        changes.push(format!("set {dev} up"));
    }
    let routes = nl.list_routes()?;
    for net in &spec.networks {
        let r = flannel_core::datapath::Route {
            dst: *net,
            gateway: None,
            oif: link.index,
            onlink: false,
        };
        if !routes.contains(&r) {
            nl.replace_route(&r)?;
            changes.push(format!("added route {net} dev {dev}"));
        }
    }
    Ok(())
}

impl Drop for WgDatapath {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Threads

/// Every peer's WireGuard timers (handshake retries, keepalives, rekeying,
/// expiry) every [`TIMER_TICK`], the handshake rate limiter's reset every
/// second, and the stats file.
fn timers_loop(sh: &Shared, base: Counters, stats: Option<&Path>) {
    let mut buf = vec![0u8; CONTROL_BYTES];
    let mut last_second = Instant::now();
    let mut last_written: Option<Counters> = None;
    let mut c = Counters::default();
    while !sh.stop.load(Ordering::Relaxed) {
        let table = sh.table.load();
        for e in &table.entries {
            let mut t = e.peer.lock();
            if let TunnResult::WriteToNetwork(msg) = t.update_timers(&mut buf) {
                if msg.first() == Some(&1) {
                    c.handshakes_sent += 1;
                }
                sh.send_control(e.spec.endpoint, msg, &mut c);
            }
        }
        drop(table);
        sh.add(&mut c);
        if last_second.elapsed() >= STATS_EVERY {
            last_second = Instant::now();
            sh.rate_limiter.reset_count();
            if let Some(path) = stats {
                let mut now = base;
                now.add(&sh.counters_now());
                if last_written != Some(now) {
                    if let Err(e) = write_stats(path, &now) {
                        tracing::warn!(path = %path.display(), error = %e, "cannot write the wireguard stats file");
                    }
                    last_written = Some(now);
                }
            }
        }
        std::thread::sleep(TIMER_TICK);
    }
    if let Some(path) = stats {
        let mut now = base;
        now.add(&sh.counters_now());
        let _ = write_stats(path, &now);
    }
}

/// The device is gone: the thread stops (the datapath is marked failed)
/// and the next reconcile pass restarts the datapath.
struct Stopped;

/// One queue's thread: both directions of `dev`'s queue, reading the
/// queue's listen socket and its ephemeral socket (see the module doc).
fn queue_loop(
    dev: &SyncDevice,
    rx: &UdpSocket,
    tx: &[TxSocket],
    q: usize,
    sh: &Shared,
    slot: usize,
) {
    let mut out = Egress::new(tx, slot);
    let rx_state = match UdpSocketState::new(UdpSockRef::from(rx)) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "wireguard datapath: socket setup failed");
            sh.failed.store(true, Ordering::Relaxed);
            return;
        }
    };
    let mut inn = Ingress::new(dev);
    // The ephemeral socket only hears from peers that answer to the port
    // they saw (the kernel's and wireguard-go, not flannel-rs's, which send
    // to ListenPort): it is read when poll says so, and every
    // EPHEMERAL_EVERY rounds of a busy loop, saving a syscall a round.
    const EPHEMERAL_EVERY: u32 = 16;
    let mut round = 0u32;
    let mut ephemeral_ready = false;
    while !sh.stop.load(Ordering::Relaxed) {
        let Ok(sent) = out.pump(dev, tx, sh) else {
            return;
        };
        let Ok(r1) = inn.pump(dev, rx, &rx_state, sh) else {
            return;
        };
        round = round.wrapping_add(1);
        let mut r2 = false;
        if ephemeral_ready || round.is_multiple_of(EPHEMERAL_EVERY) {
            let Ok(r) = inn.pump(dev, &tx[q].sock, &tx[q].state, sh) else {
                return;
            };
            r2 = r;
            ephemeral_ready = r;
        }
        if !sent && !r1 && !r2 {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            let mut fds = [
                PollFd::new(dev.as_fd(), PollFlags::POLLIN),
                PollFd::new(rx.as_fd(), PollFlags::POLLIN),
                PollFd::new(tx[q].sock.as_fd(), PollFlags::POLLIN),
            ];
            let _ = poll(&mut fds, PollTimeout::from(IDLE_POLL.as_millis() as u16));
            ephemeral_ready = fds[2]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLIN));
        }
    }
}

/// Device -> peers for one queue.
///
/// Plaintext lands in one buffer at a fixed stride (`slot`, the device
/// MTU); the packets of one read that go to one peer from one socket are
/// encrypted back to back at stride `slot + 32` into a second buffer, so
/// that full-sized ones leave in one GSO send.
struct Egress {
    slot: usize,
    max_segments: usize,
    raw: Vec<u8>,
    plain: Vec<u8>,
    sizes: Vec<usize>,
    cipher: Vec<u8>,
    control: Vec<u8>,
    warn: RateLimited,
}

/// Consecutive packets to one peer from one socket.
struct Group {
    entry: usize,
    sock: usize,
    first: usize,
    count: usize,
    /// Whether its last packet was full-sized (so another may follow).
    open: bool,
}

impl Egress {
    fn new(tx: &[TxSocket], slot: usize) -> Egress {
        let cslot = slot + DATA_OVERHEAD;
        let max_segments = tx
            .iter()
            .map(|t| t.state.max_gso_segments())
            .min()
            .unwrap_or(1)
            .clamp(1, GSO_MAX_BYTES / cslot)
            .max(1);
        Egress {
            slot,
            max_segments,
            raw: vec![0u8; VIRTIO_NET_HDR_LEN + 65_535],
            plain: vec![0u8; TX_SLOTS * slot],
            sizes: vec![0usize; TX_SLOTS],
            cipher: vec![0u8; TX_SLOTS * cslot],
            control: vec![0u8; CONTROL_BYTES],
            warn: RateLimited::default(),
        }
    }

    /// Reads what the queue holds (up to a batch), encrypts and sends it;
    /// whether anything was read.
    fn pump(&mut self, dev: &SyncDevice, tx: &[TxSocket], sh: &Shared) -> Result<bool, Stopped> {
        let slot = self.slot;
        let mut n = 0;
        let mut c = Counters::default();
        let r = read_batch(
            dev,
            dev.tcp_gso(),
            &mut self.raw,
            &mut self.plain,
            &mut self.sizes,
            slot,
            &mut n,
            &mut c.dropped_tun_invalid,
            &mut self.warn,
            "wireguard",
        );
        if let Err(e) = r {
            sh.add(&mut c);
            tracing::warn!(error = %e, "wireguard egress: the TUN device is gone; the next pass recreates it");
            sh.failed.store(true, Ordering::Relaxed);
            return Err(Stopped);
        }
        if n == 0 {
            sh.add(&mut c);
            return Ok(false);
        }
        let table = sh.table.load();
        let mut group: Option<Group> = None;
        for i in 0..n {
            let at = i * slot;
            let Some(h) = ip_summary(&self.plain[at..at + self.sizes[i]]) else {
                c.dropped_tun_invalid += 1;
                continue;
            };
            let Some(entry) = table.allowed.lookup(h.dst) else {
                c.dropped_no_peer += 1;
                continue;
            };
            // Pad to 16 (zeros past the packet, within its slot).
            let padded = padded_len(h.len, slot);
            self.plain[at + h.len..at + padded].fill(0);
            self.sizes[i] = padded;
            let sock =
                flannel_core::udp::flow_bucket(flow_hash(&self.plain[at..at + h.len]), tx.len());
            let joins = group.as_ref().is_some_and(|g| {
                g.entry == entry
                    && g.sock == sock
                    && g.open
                    && g.first + g.count == i
                    && g.count < self.max_segments
            });
            if joins {
                let g = group.as_mut().expect("checked");
                g.count += 1;
                g.open = padded == slot;
            } else {
                if let Some(g) = group.take() {
                    self.send(&g, &table, tx, sh, &mut c);
                }
                group = Some(Group {
                    entry,
                    sock,
                    first: i,
                    count: 1,
                    open: padded == slot,
                });
            }
        }
        if let Some(g) = group.take() {
            self.send(&g, &table, tx, sh, &mut c);
        }
        sh.add(&mut c);
        Ok(true)
    }

    /// Encrypts a group under one lock of its peer and sends it: one GSO
    /// send of `slot + 32`-byte messages (the last may be shorter), or,
    /// without a session yet, the handshake initiation boringtun asks for
    /// (the packets wait in its queue until the handshake completes).
    fn send(&mut self, g: &Group, table: &Table, tx: &[TxSocket], sh: &Shared, c: &mut Counters) {
        let e = &table.entries[g.entry];
        let cslot = self.slot + DATA_OVERHEAD;
        let mut bytes = 0;
        let mut data = 0;
        let mut plain_bytes = 0u64;
        {
            let mut t = e.peer.lock();
            for k in 0..g.count {
                let i = g.first + k;
                let src = &self.plain[i * self.slot..i * self.slot + self.sizes[i]];
                let dst = &mut self.cipher[k * cslot..(k + 1) * cslot];
                match t.encapsulate(src, dst) {
                    TunnResult::WriteToNetwork(m)
                        if m.len() == src.len() + DATA_OVERHEAD && m.first() == Some(&4) =>
                    {
                        bytes = k * cslot + m.len();
                        data += 1;
                        plain_bytes += src.len() as u64;
                    }
                    TunnResult::WriteToNetwork(m) => {
                        // No session: a handshake initiation; this packet
                        // and the rest of the group are queued.
                        let len = m.len();
                        self.control[..len].copy_from_slice(m);
                        c.handshakes_sent += 1;
                        sh.send_control(e.spec.endpoint, &self.control[..len], c);
                        for k2 in k + 1..g.count {
                            let i2 = g.first + k2;
                            let src2 = &self.plain[i2 * self.slot..i2 * self.slot + self.sizes[i2]];
                            let _ = t.encapsulate(src2, &mut self.control);
                        }
                        break;
                    }
                    // A handshake already in progress: queued.
                    TunnResult::Done => {}
                    _ => c.send_errors += 1,
                }
            }
        }
        if data == 0 {
            return;
        }
        c.tx_packets += data as u64;
        c.tx_bytes += plain_bytes;
        let sock = &tx[g.sock];
        let t = Transmit {
            destination: e.dest,
            ecn: None,
            contents: &self.cipher[..bytes],
            segment_size: (data > 1).then_some(cslot),
            src_ip: None,
        };
        if let Err(err) = sock.send(&t, &sh.stop) {
            c.send_errors += data as u64;
            c.tx_packets = c.tx_packets.saturating_sub(data as u64);
            c.tx_bytes = c.tx_bytes.saturating_sub(plain_bytes);
            if self.warn.ready() {
                tracing::warn!(peer = %e.spec.endpoint, error = %err, packets = data, "wireguard egress: send failed");
            }
        }
    }
}

/// A hash of the inner packet's flow, the same both ways (IPv4: the udp
/// backend's; IPv6: addresses, next header and ports folded alike).
fn flow_hash(p: &[u8]) -> u32 {
    if p.first().map(|b| b >> 4) != Some(6) || p.len() < 40 {
        return flannel_core::udp::flow_hash(p);
    }
    let word = |at: usize| u64::from_be_bytes(p[at..at + 8].try_into().expect("8 bytes"));
    let (mut a, mut b) = ((word(8), word(16)), (word(24), word(32)));
    let nh = p[6];
    let mut ports = (0u16, 0u16);
    if matches!(nh, 6 | 17 | 132) && p.len() >= 44 {
        ports = (
            u16::from_be_bytes([p[40], p[41]]),
            u16::from_be_bytes([p[42], p[43]]),
        );
    }
    if (a, ports.0) > (b, ports.1) {
        std::mem::swap(&mut a, &mut b);
        ports = (ports.1, ports.0);
    }
    let mut x = a.0;
    for v in [
        a.1,
        b.0,
        b.1,
        (u64::from(ports.0) << 16) | u64::from(ports.1),
        u64::from(nh),
    ] {
        x = (x ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
    (x >> 32) as u32
}

/// Peers -> device for one queue.
///
/// Each data message is decrypted into the next free part of one buffer,
/// and with offloads the decrypted TCP segments of a flow are written as
/// one super-packet straight from there (see [`Coalescer`]): nothing is
/// copied after the decryption and nothing allocated.
struct Ingress {
    rx: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    /// Plaintext of one batch (never more than the batch's ciphertext).
    plain: Vec<u8>,
    control: Vec<u8>,
    warn: RateLimited,
    offload: bool,
}

impl Ingress {
    fn new(dev: &SyncDevice) -> Ingress {
        Ingress {
            rx: (0..RX_SLOTS).map(|_| vec![0u8; RX_SLOT_BYTES]).collect(),
            meta: vec![RecvMeta::default(); RX_SLOTS],
            plain: vec![0u8; RX_SLOTS * RX_SLOT_BYTES],
            control: vec![0u8; CONTROL_BYTES],
            warn: RateLimited::default(),
            offload: dev.tcp_gso(),
        }
    }

    /// Receives one batch from `sock`, decrypts it and writes the packets
    /// into the device; whether anything was received.
    fn pump(
        &mut self,
        dev: &SyncDevice,
        sock: &UdpSocket,
        state: &UdpSocketState,
        sh: &Shared,
    ) -> Result<bool, Stopped> {
        let Ingress {
            rx,
            meta,
            plain,
            control,
            warn,
            offload,
        } = self;
        let got = {
            let mut it = rx.iter_mut();
            let mut iovs: [IoSliceMut<'_>; RX_SLOTS] =
                std::array::from_fn(|_| IoSliceMut::new(it.next().expect("RX_SLOTS buffers")));
            state.recv(UdpSockRef::from(sock), &mut iovs, meta)
        };
        let msgs = match got {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => {
                // ICMP errors reported on the socket and the like: keep going.
                if warn.ready() {
                    tracing::debug!(error = %e, "wireguard ingress: receive failed");
                }
                return Ok(true);
            }
        };
        let table = sh.table.load();
        let mut c = Counters::default();
        let mut co = Coalescer::authenticated();
        let mut rest: &mut [u8] = &mut plain[..];
        // The peer whose lock is held across consecutive data messages.
        let mut held: Option<(usize, MutexGuard<'_, Tunn>)> = None;
        for mi in 0..msgs {
            let m = meta[mi];
            let from = canonical(m.addr);
            let stride = m.stride.max(1);
            for d in rx[mi][..m.len].chunks(stride) {
                if !(d.len() >= 16 && d[0] == 4 && d[1..4] == [0, 0, 0]) {
                    drop(held.take());
                    handshake(control, &table, d, from, sh, &mut c);
                    continue;
                }
                let idx = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
                let Some(pos) = table
                    .by_index
                    .binary_search_by_key(&(idx >> 8), |e| e.0)
                    .ok()
                else {
                    c.dropped_invalid += 1;
                    continue;
                };
                let ei = table.by_index[pos].1;
                let e = &table.entries[ei];
                if held.as_ref().is_none_or(|(h, _)| *h != ei) {
                    // One lock at a time: release the previous peer's first.
                    drop(held.take());
                    held = Some((ei, e.peer.lock()));
                }
                let t = &mut held.as_mut().expect("held").1;
                // The plaintext is shorter than the message: it fits.
                let (cur, tail) = std::mem::take(&mut rest).split_at_mut(d.len());
                rest = tail;
                let p: &[u8] = match t.decapsulate(Some(from.ip()), d, cur) {
                    TunnResult::WriteToTunnelV4(p, src)
                        if allows(&e.spec.allowed_ips, src.into()) =>
                    {
                        p
                    }
                    TunnResult::WriteToTunnelV6(p, src)
                        if allows(&e.spec.allowed_ips, src.into()) =>
                    {
                        p
                    }
                    TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                        c.dropped_not_allowed += 1;
                        continue;
                    }
                    // A keepalive.
                    TunnResult::Done => continue,
                    TunnResult::WriteToNetwork(msg) => {
                        sh.send_control(from, msg, &mut c);
                        continue;
                    }
                    TunnResult::Err(_) => {
                        c.dropped_invalid += 1;
                        continue;
                    }
                };
                c.rx_packets += 1;
                c.rx_bytes += p.len() as u64;
                let r = if *offload {
                    co.push(dev, p, &mut c.tun_write_errors)
                } else {
                    dev.send(p).map(drop).or_else(|e| {
                        if device_gone(&e) {
                            return Err(e);
                        }
                        c.tun_write_errors += 1;
                        Ok(())
                    })
                };
                if let Err(e) = r {
                    return Err(gone(sh, &mut c, &e));
                }
            }
        }
        drop(held);
        if let Err(e) = co.flush(dev, &mut c.tun_write_errors) {
            return Err(gone(sh, &mut c, &e));
        }
        if c.tun_write_errors > 0 && warn.ready() {
            tracing::warn!(
                errors = c.tun_write_errors,
                "wireguard ingress: writing to the TUN device failed"
            );
        }
        sh.add(&mut c);
        Ok(true)
    }
}

/// The device is gone under the ingress path: counts what was done and
/// marks the datapath failed (the next pass restarts it).
fn gone(sh: &Shared, c: &mut Counters, e: &io::Error) -> Stopped {
    sh.add(c);
    tracing::warn!(error = %e, "wireguard ingress: the TUN device is gone; the next pass recreates it");
    sh.failed.store(true, Ordering::Relaxed);
    Stopped
}

/// A handshake initiation (the peer found by its static key, decrypted
/// anonymously first), response or cookie reply (found by our index):
/// handed to the peer's `Tunn`; its answer goes back to the sender,
/// then packets queued during the handshake go out.
fn handshake(
    control: &mut [u8],
    table: &Table,
    d: &[u8],
    from: SocketAddr,
    sh: &Shared,
    c: &mut Counters,
) {
    // MAC1 first (cheap; and under load a cookie reply instead of the
    // Diffie-Hellman work), as WireGuard does before anything else.
    let packet = match sh.rate_limiter.verify_packet(Some(from.ip()), d, control) {
        Ok(p) => p,
        Err(TunnResult::WriteToNetwork(reply)) => {
            sh.send_control(from, reply, c);
            return;
        }
        Err(_) => {
            c.dropped_invalid += 1;
            return;
        }
    };
    let entry = match packet {
        Packet::HandshakeInit(init) => match parse_handshake_anon(&sh.secret, &sh.public, &init) {
            Ok(half) => table.by_key(&WgKey(half.peer_static_public)),
            Err(_) => None,
        },
        Packet::HandshakeResponse(r) => table.by_index(r.receiver_idx),
        Packet::PacketCookieReply(r) => table.by_index(r.receiver_idx),
        Packet::PacketData(_) => None,
    };
    let Some(e) = entry else {
        c.dropped_invalid += 1;
        return;
    };
    let mut t = e.peer.lock();
    match t.decapsulate(Some(from.ip()), d, &mut control[..]) {
        TunnResult::WriteToNetwork(msg) => {
            c.handshakes_received += 1;
            if msg.first() == Some(&2) {
                c.handshakes_sent += 1;
            }
            sh.send_control(from, msg, c);
        }
        TunnResult::Err(_) => {
            c.dropped_invalid += 1;
            return;
        }
        _ => c.handshakes_received += 1,
    }
    // Packets queued while there was no session (boringtun: repeat
    // with an empty datagram until Done).
    while let TunnResult::WriteToNetwork(msg) = t.decapsulate(None, &[], &mut control[..]) {
        c.tx_packets += 1;
        c.tx_bytes += msg.len().saturating_sub(DATA_OVERHEAD) as u64;
        sh.send_control(e.spec.endpoint, msg, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_core::config::WireguardMode;

    fn keys() -> KeyPair {
        let private = SecretKey(
            "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
                .parse()
                .unwrap(),
        );
        KeyPair {
            public: public_key(&private),
            private,
        }
    }

    #[test]
    fn public_key_is_wg_pubkeys() {
        // `echo yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk= | wg pubkey`
        // (the key of wg(8)'s example).
        assert_eq!(
            keys().public.to_string(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
        assert!(!format!("{:?}", keys()).contains("yAnz5"));
    }

    #[test]
    fn key_file_is_created_once_0600_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("wgkey-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub").join("wgkey");
        let (a, src) = load_or_create_key(&path).unwrap();
        assert_eq!(src, KeySource::Generated);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{}\n", a.private.0));
        // Clamped as wg genkey stores it.
        assert_eq!(a.private.0 .0[0] & 7, 0);
        assert_eq!(a.private.0 .0[31] & 0xc0, 0x40);
        let (b, src) = load_or_create_key(&path).unwrap();
        assert_eq!((src, &b), (KeySource::File, &a));
        // A key written by `wg genkey > file` is taken as it is.
        std::fs::write(&path, "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n").unwrap();
        assert_eq!(load_or_create_key(&path).unwrap().0, keys());
        // Garbage: an error naming the file and the fix; the file stays.
        std::fs::write(&path, "garbage").unwrap();
        let e = load_or_create_key(&path).unwrap_err().to_string();
        assert!(
            e.contains(path.to_str().unwrap()) && e.contains("remove the file"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "garbage");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn cfg(mode: WireguardMode) -> WireguardConfig {
        WireguardConfig {
            mode,
            persistent_keepalive: 25,
            ..WireguardConfig::default()
        }
    }

    #[test]
    fn devices_per_mode() {
        let v4: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let v6: Ipv6Net = "fd00:10:244:1::/64".parse().unwrap();
        let n4: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let n6: Ipv6Net = "fd00:10:244::/56".parse().unwrap();
        let k = keys();
        let sep = device_specs(
            &cfg(WireguardMode::Separate),
            Some(v4),
            Some(v6),
            Some(n4),
            Some(n6),
            1420,
            &k,
            Some(Path::new("/run/flannel")),
            false,
        );
        assert_eq!(sep.len(), 2);
        assert_eq!(sep[0].device, "flannel-wg");
        assert_eq!(
            sep[0].addresses,
            vec!["10.244.1.0/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(sep[0].networks, vec![IpNet::V4(n4)]);
        assert_eq!((sep[0].port, sep[0].sockets), (51820, SocketFamily::V4));
        assert_eq!(
            sep[0].stats_file.as_deref(),
            Some(Path::new("/run/flannel/flannel-wg-stats.json"))
        );
        assert_eq!(sep[1].device, "flannel-wg-v6");
        assert_eq!(
            sep[1].addresses,
            vec!["fd00:10:244:1::/128".parse::<IpNet>().unwrap()]
        );
        assert_eq!((sep[1].port, sep[1].sockets), (51821, SocketFamily::V6));
        assert_eq!(sep[1].keepalive, 25);
        // IPv6 only, separate: flannel-wg-v6 alone.
        let only6 = device_specs(
            &cfg(WireguardMode::Separate),
            None,
            Some(v6),
            None,
            Some(n6),
            1420,
            &k,
            None,
            false,
        );
        assert_eq!(only6.len(), 1);
        assert_eq!(only6[0].device, "flannel-wg-v6");
        // One device for both families in the other modes.
        for (mode, sockets) in [
            (WireguardMode::Auto, SocketFamily::Dual),
            (WireguardMode::Ipv6, SocketFamily::Dual),
            (WireguardMode::Ipv4, SocketFamily::V4),
        ] {
            let one = device_specs(
                &cfg(mode),
                Some(v4),
                Some(v6),
                Some(n4),
                Some(n6),
                1420,
                &k,
                None,
                false,
            );
            assert_eq!(one.len(), 1);
            assert_eq!(one[0].device, "flannel-wg");
            assert_eq!(one[0].addresses.len(), 2);
            assert_eq!(one[0].networks, vec![IpNet::V4(n4), IpNet::V6(n6)]);
            assert_eq!((one[0].port, one[0].sockets), (51820, sockets));
        }
    }

    #[test]
    fn lease_is_upstreams() {
        let k = keys();
        let a = lease_attrs(
            Some("172.16.1.14".parse().unwrap()),
            None,
            &k.public,
            &WireguardConfig::default(),
            true,
            false,
        );
        assert_eq!(
            a.to_json(),
            r#"{"PublicIP":"172.16.1.14","PublicIPv6":null,"BackendType":"wireguard","BackendData":{"PublicKey":"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=","Port":51820}}"#
        );
    }

    #[test]
    fn addresses_for_the_sockets() {
        let v4: SocketAddr = "172.16.1.13:51820".parse().unwrap();
        assert_eq!(in_family(v4, SocketFamily::V4), v4);
        let m = in_family(v4, SocketFamily::Dual);
        assert_eq!(m, "[::ffff:172.16.1.13]:51820".parse().unwrap());
        assert_eq!(canonical(m), v4);
        let v6: SocketAddr = "[fd00::1]:51821".parse().unwrap();
        assert_eq!(in_family(v6, SocketFamily::Dual), v6);
        assert_eq!(canonical(v6), v6);
    }

    #[test]
    fn ipv6_flow_hash_is_the_same_both_ways() {
        let mut p = vec![0u8; 60];
        p[0] = 0x60;
        p[6] = 6;
        p[8..24].copy_from_slice(&"fd00:10:244:1::2".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"fd00:10:244:2::2".parse::<Ipv6Addr>().unwrap().octets());
        p[40..42].copy_from_slice(&40000u16.to_be_bytes());
        p[42..44].copy_from_slice(&5201u16.to_be_bytes());
        let mut q = p.clone();
        q[8..24].copy_from_slice(&p[24..40]);
        q[24..40].copy_from_slice(&p[8..24]);
        q[40..42].copy_from_slice(&p[42..44]);
        q[42..44].copy_from_slice(&p[40..42]);
        assert_eq!(flow_hash(&p), flow_hash(&q));
        let mut r = p.clone();
        r[41] ^= 1;
        assert_ne!(flow_hash(&p), flow_hash(&r));
    }

    #[test]
    fn leftover_names() {
        assert!(is_wireguard_device_name("flannel-wg"));
        assert!(is_wireguard_device_name("flannel-wg-v6"));
        assert!(!is_wireguard_device_name("flannel0"));
    }
}
