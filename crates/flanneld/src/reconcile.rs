//! The level-triggered reconciler: one OS thread owns the `Netlink` handle
//! and makes the kernel match the leases.
//!
//! Every pass starts from scratch: ensure the vxlan device of each enabled
//! address family (`flannel.<VNI>`, `flannel-v6.<VNI>`; recreating it when
//! it was deleted or has wrong attributes, always with the same VtepMAC, and
//! removing the one of a disabled family), or with host-gw remove any vxlan
//! device left over from an earlier run with vxlan; then, per family,
//! compute the desired neighbours (ARP or NDP), FDB entries and routes from
//! the current lease set, read what the kernel actually holds, and apply the
//! difference. The families are independent: an update touching only one
//! family's part of a lease changes only that family's entries. Nothing is
//! remembered between passes except the lease set, so whatever changed the
//! kernel (an operator, a crash, a restart) is repaired by the next pass.
//! Routes of the other backend inside the cluster network are in scope too,
//! so switching backend on restart leaves nothing of the old one.
//!
//! Passes are triggered by lease changes, by netlink notifications about our
//! devices or routes inside the cluster networks (debounced: a burst of
//! notifications gives one pass), and by a timer.
//!
//! Apply order keeps every packet deliverable: FDB entry and neighbour are
//! added before the route that uses them, and a route is deleted before the
//! neighbour and FDB entry it used.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use flannel_core::datapath::{self, DesiredState, DirectRouting, HostGwPeer, Op, Route, Scope};
use flannel_core::incremental::{self, DesiredIndex, Recipe};
use flannel_core::lease::{IpFamily, Lease, LeaseKey};
use flannel_netlink::{Monitor, Netlink, Notification};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio::sync::oneshot;

use crate::backend::hostgw;
use crate::backend::udp::{self, UdpDatapath, UdpSpec};
use crate::backend::vxlan::{self, DeviceSpec};
use crate::backend::wireguard::{self, WgDeviceSpec};
use crate::backend::wireguard_kernel::WgDevice;
use crate::health::DatapathMetrics;
use crate::nexthops::{self, Nexthops};

/// How long a burst of netlink notifications is collected before one pass.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

/// Both address families, in the order passes handle them.
pub const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

/// Errors starting the reconciler.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("opening rtnetlink for the reconciler: {0}")]
    Open(#[source] flannel_netlink::Error),
    #[error("spawning the {what} thread: {source}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the reconciler thread has stopped")]
    Stopped,
    /// A setting from the environment that does not parse.
    #[error("{0}")]
    Setting(String),
}

/// One value per address family.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PerFamily<T> {
    pub v4: T,
    pub v6: T,
}

impl<T> PerFamily<T> {
    /// The value of `family`.
    pub fn get(&self, family: IpFamily) -> &T {
        match family {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        }
    }
    /// The value of `family`, mutable.
    pub fn get_mut(&mut self, family: IpFamily) -> &mut T {
        match family {
            IpFamily::V4 => &mut self.v4,
            IpFamily::V6 => &mut self.v6,
        }
    }
}

/// What the reconciler needs to know about this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub backend: BackendSettings,
    /// The IPv4 cluster network (`Network`); `None` when IPv4 is disabled.
    pub network: Option<Ipv4Net>,
    /// The IPv6 cluster network (`IPv6Network`); `None` when IPv6 is disabled.
    pub ipv6_network: Option<Ipv6Net>,
    /// Our lease.
    pub own: LeaseKey,
    /// The external interface.
    pub external: ExternalSettings,
    /// `--ip-blackhole-route`: a blackhole route for each of our subnets.
    pub blackhole: bool,
}

/// The backend in use and its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSettings {
    /// `flannel.<VNI>` (`v4`) and/or `flannel-v6.<VNI>` (`v6`), one per
    /// enabled family; with `direct_routing` (the vxlan `DirectRouting`
    /// option) peers whose public IP of a family is on a directly connected
    /// subnet of the external interface are routed to without
    /// encapsulation, per family.
    Vxlan {
        v4: Option<DeviceSpec>,
        v6: Option<DeviceSpec>,
        direct_routing: bool,
    },
    /// A route per peer and family via its PublicIP / PublicIPv6 on the
    /// external interface.
    HostGw,
    /// The TUN device `flannel0` and the userspace datapath (backend/udp.rs).
    Udp(UdpSpec),
    /// `flannel-wg` / `flannel-wg-v6` and their userspace WireGuard
    /// datapaths (backend/wireguard.rs).
    Wireguard(WgSettings),
}

/// The wireguard backend's devices and what its peer selection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgSettings {
    /// One per device (`Mode` separate: one per enabled family).
    pub devices: Vec<WgDeviceSpec>,
    /// Our public addresses (`Mode` auto picks peer endpoints with them).
    pub local: flannel_core::wireguard::LocalAddrs,
}

impl WgSettings {
    /// The device carrying `family`.
    pub fn device_for(&self, family: IpFamily) -> Option<&WgDeviceSpec> {
        self.devices.iter().find(|d| match d.role {
            flannel_core::wireguard::DeviceRole::Separate(f) => f == family,
            flannel_core::wireguard::DeviceRole::Single(_) => d.networks.iter().any(|n| {
                matches!(
                    (n, family),
                    (IpNet::V4(_), IpFamily::V4) | (IpNet::V6(_), IpFamily::V6)
                )
            }),
        })
    }

    /// The peers of `dev` among `leases`.
    pub fn peers<'l>(
        &self,
        dev: &WgDeviceSpec,
        leases: impl IntoIterator<Item = &'l Lease>,
        own: &LeaseKey,
        now: SystemTime,
    ) -> Vec<flannel_core::wireguard::WgPeer> {
        flannel_core::wireguard::wireguard_peers(
            leases,
            Some(own),
            Some(&dev.keys.public),
            dev.role,
            &self.local,
            dev.port,
            now,
        )
    }

    /// The peers `family` counts: those of its device; a device carrying
    /// both families counts them once, under IPv4.
    pub fn peer_count(
        &self,
        family: IpFamily,
        leases: Vec<&Lease>,
        own: &LeaseKey,
        now: SystemTime,
    ) -> usize {
        match self.device_for(family) {
            Some(d)
                if family == IpFamily::V6
                    && self
                        .device_for(IpFamily::V4)
                        .is_some_and(|d4| d4.device == d.device) =>
            {
                0
            }
            Some(d) => self.peers(d, leases, own, now).len(),
            None => 0,
        }
    }
}

impl BackendSettings {
    /// The vxlan device of `family`, if the backend has one.
    pub fn device_spec(&self, family: IpFamily) -> Option<&DeviceSpec> {
        match self {
            BackendSettings::Vxlan { v4, v6, .. } => match family {
                IpFamily::V4 => v4.as_ref(),
                IpFamily::V6 => v6.as_ref(),
            },
            BackendSettings::HostGw | BackendSettings::Udp(_) | BackendSettings::Wireguard(_) => {
                None
            }
        }
    }
}

/// The external interface as the datapath needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalSettings {
    pub ifindex: u32,
    pub name: String,
    /// Its addresses with prefixes, both families (the connected subnets).
    pub connected: Vec<IpNet>,
}

/// The state one pass wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Number of peers programmed.
    pub peers: usize,
    pub state: DesiredState,
    /// host-gw peers left without a route: not on a connected subnet.
    pub unreachable: Vec<HostGwPeer>,
}

impl Settings {
    /// The cluster network of `family`, when that family is enabled.
    pub fn network_of(&self, family: IpFamily) -> Option<IpNet> {
        match family {
            IpFamily::V4 => self.network.map(IpNet::V4),
            IpFamily::V6 => self.ipv6_network.map(IpNet::V6),
        }
    }

    /// The enabled families.
    pub fn families(&self) -> impl Iterator<Item = IpFamily> + '_ {
        FAMILIES
            .into_iter()
            .filter(|f| self.network_of(*f).is_some())
    }

    /// What this daemon owns in the kernel in `family` (flannel-core's
    /// [`Scope`]); `None` when the family is disabled.
    ///
    /// Routes inside the network via a gateway on the external interface
    /// are ours with either backend: they are host-gw (or DirectRouting)
    /// routes, and a vxlan node that finds them after a switch from host-gw
    /// (or without DirectRouting any more) must delete them.
    pub fn scope(&self, family: IpFamily, device_ifindex: Option<u32>) -> Option<Scope> {
        Some(Scope {
            network: self.network_of(family)?,
            own_subnet: self.own.subnet(family),
            device_ifindex,
            external_ifindex: Some(self.external.ifindex),
        })
    }

    /// How the backend turns leases into kernel objects in `family`, with
    /// our vxlan device of that family at `device_ifindex` (None with
    /// host-gw, or while the device is not set up).
    pub fn recipe(&self, family: IpFamily, device_ifindex: Option<u32>) -> Recipe<'_> {
        if self.network_of(family).is_none() {
            return Recipe::Nothing;
        }
        match &self.backend {
            BackendSettings::Vxlan { direct_routing, .. } => {
                match (device_ifindex, self.backend.device_spec(family)) {
                    (Some(ifindex), Some(spec)) => Recipe::Vxlan {
                        ifindex,
                        vni: spec.device.vni,
                        direct: direct_routing.then_some(DirectRouting {
                            external_ifindex: self.external.ifindex,
                            connected: &self.external.connected,
                        }),
                    },
                    _ => Recipe::Nothing,
                }
            }
            BackendSettings::HostGw => Recipe::HostGw {
                external_ifindex: self.external.ifindex,
                connected: &self.external.connected,
            },
            // Peers live in the datapath's table, not in the kernel: no
            // per-peer route, so any route of ours inside the network
            // (host-gw or vxlan leftovers) is stale.
            BackendSettings::Udp(_) => Recipe::Udp,
            // The same for wireguard's devices: its peers are counted by
            // `desired` from the datapath's own selection.
            BackendSettings::Wireguard(_) => Recipe::Nothing,
        }
    }

    /// The state the kernel should hold in `family` for `leases`, with our
    /// vxlan device of that family at `device_ifindex` (None with host-gw):
    /// the full recomputation ([`incremental::desired_for`]).
    pub fn desired<'l>(
        &self,
        family: IpFamily,
        device_ifindex: Option<u32>,
        leases: impl IntoIterator<Item = &'l Lease>,
        now: SystemTime,
    ) -> Desired {
        let leases: Vec<&Lease> = leases.into_iter().collect();
        let c = incremental::desired_for(
            &self.recipe(family, device_ifindex),
            leases.iter().copied(),
            Some(&self.own),
            family,
            now,
        );
        let peers = match &self.backend {
            BackendSettings::Wireguard(wg) => wg.peer_count(family, leases, &self.own, now),
            _ => c.peers,
        };
        Desired {
            peers,
            state: c.state,
            unreachable: c.unreachable,
        }
    }

    /// The device of `family`, if the backend has one: the vxlan device,
    /// or udp's TUN device (IPv4 only).
    fn device_name(&self, family: IpFamily) -> Option<&str> {
        match &self.backend {
            BackendSettings::Udp(spec) => (family == IpFamily::V4).then_some(spec.device.as_str()),
            BackendSettings::Wireguard(wg) => wg.device_for(family).map(|d| d.device.as_str()),
            _ => self
                .backend
                .device_spec(family)
                .map(|s| s.device.name.as_str()),
        }
    }

    /// The vxlan device of a family the config does not enable (with our
    /// VNI): a leftover of an earlier run to remove.
    fn disabled_device_name(&self, family: IpFamily) -> Option<String> {
        let BackendSettings::Vxlan { v4, v6, .. } = &self.backend else {
            return None;
        };
        if self.backend.device_spec(family).is_some() {
            return None;
        }
        let vni = v4.as_ref().or(v6.as_ref())?.device.vni;
        Some(vxlan::device_name(vni, family))
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Index of the IPv4 vxlan device after the pass (None with host-gw,
    /// without IPv4, or if it could not be set up).
    pub ifindex: Option<u32>,
    /// Index of the IPv6 vxlan device (`flannel-v6.<VNI>`) after the pass.
    pub ifindex_v6: Option<u32>,
    /// Number of peers programmed.
    pub peers: usize,
    /// Number of kernel writes made (`added + removed + repaired`, and
    /// device, address and blackhole changes).
    pub changes: usize,
    /// Objects written that were not wanted before this pass (new peers,
    /// changed ones).
    pub added: usize,
    /// Stale objects deleted.
    pub removed: usize,
    /// Objects written again that were wanted already but missing or
    /// different in the kernel (someone deleted or changed them).
    pub repaired: usize,
    /// A full pass (devices, every lease, the kernel read back); else an
    /// event pass that wrote only what the changed leases concern.
    pub full: bool,
    /// Every failure; the pass went on after each.
    pub errors: Vec<String>,
    /// Set when the device itself could not be set up.
    pub device_error: Option<String>,
}

impl PassReport {
    /// Logs and counts the kernel writes a step made (device, address,
    /// blackhole: rare, at INFO).
    fn applied(&mut self, changes: &[String]) {
        for c in changes {
            tracing::info!("{c}");
        }
        self.changes += changes.len();
    }

    /// The one line a pass logs: at INFO when it wrote or failed, else at
    /// DEBUG.
    fn log(&self, started: Instant) {
        let took_ms = started.elapsed().as_millis() as u64;
        let kind = if self.full { "full" } else { "event" };
        if self.changes > 0 || !self.errors.is_empty() {
            tracing::info!(
                pass = kind,
                added = self.added,
                removed = self.removed,
                repaired = self.repaired,
                errors = self.errors.len(),
                peers = self.peers,
                took_ms,
                "datapath pass"
            );
        } else {
            tracing::debug!(
                pass = kind,
                peers = self.peers,
                took_ms,
                "datapath pass: nothing to do"
            );
        }
    }

    /// Records a failed step; the pass goes on and the next one retries.
    fn failed(&mut self, e: impl std::fmt::Display) {
        tracing::warn!(error = %e, "retrying on the next pass");
        self.errors.push(e.to_string());
    }

    /// [`PassReport::applied`] or [`PassReport::failed`].
    fn record<E: std::fmt::Display>(&mut self, step: Result<Vec<String>, E>) {
        match step {
            Ok(changes) => self.applied(&changes),
            Err(e) => self.failed(e),
        }
    }
}

/// Requests to the reconciler thread.
#[derive(Debug)]
pub enum Request {
    /// The complete current lease set (a store snapshot); a full pass follows.
    Leases(Vec<Arc<Lease>>),
    /// Some leases changed (a watch event): `upserts` are their new
    /// versions, `removed` the keys gone. An event pass follows, which
    /// writes only what these leases concern.
    Changes {
        upserts: Vec<Arc<Lease>>,
        removed: Vec<LeaseKey>,
    },
    /// Our lease or device changed (re-acquired another subnet); a pass follows.
    Settings(Box<Settings>),
    /// Run a pass (timer).
    Resync,
    /// Notifications from the kernel; a debounced pass follows when relevant.
    Kernel(Vec<Notification>),
    /// Run a pass now and report its outcome.
    PassNow(oneshot::Sender<PassReport>),
    /// Finish and exit the thread.
    Shutdown,
}

/// Handle on the reconciler thread and its netlink monitor thread.
pub struct Reconciler {
    tx: mpsc::Sender<Request>,
    thread: Option<JoinHandle<()>>,
}

impl Reconciler {
    /// Starts the kernel thread (which opens its own `Netlink` handle in the
    /// process's namespace) and the monitor thread. No pass runs until a
    /// request arrives.
    pub fn start(settings: Settings, leases: Vec<Arc<Lease>>) -> Result<Self, ReconcileError> {
        Reconciler::start_with(settings, leases, DatapathMetrics::default())
    }

    /// [`Reconciler::start`], recording every pass in `metrics` (the
    /// health endpoint's `/metrics`).
    pub fn start_with(
        settings: Settings,
        leases: Vec<Arc<Lease>>,
        metrics: DatapathMetrics,
    ) -> Result<Self, ReconcileError> {
        let threshold = nexthops::threshold_from_env().map_err(ReconcileError::Setting)?;
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("reconcile".into())
            .spawn(move || match Netlink::open() {
                Ok(nl) => {
                    let _ = ready_tx.send(Ok(nl.port_id()));
                    Worker {
                        nl,
                        settings,
                        leases: leases.into_iter().map(|l| (l.key, l)).collect(),
                        index: PerFamily::default(),
                        ifindex: PerFamily::default(),
                        unreachable: Vec::new(),
                        udp: None,
                        wireguard: Vec::new(),
                        metrics,
                        nh: Nexthops::new(threshold),
                    }
                    .run(rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|source| ReconcileError::Spawn {
                what: "reconcile",
                source,
            })?;
        let port = match ready_rx.recv() {
            Ok(Ok(port)) => port,
            Ok(Err(e)) => return Err(ReconcileError::Open(e)),
            Err(_) => return Err(ReconcileError::Stopped),
        };
        let mon_tx = tx.clone();
        std::thread::Builder::new()
            .name("netlink-monitor".into())
            .spawn(move || monitor_loop(mon_tx, port))
            .map_err(|source| ReconcileError::Spawn {
                what: "netlink monitor",
                source,
            })?;
        Ok(Reconciler {
            tx,
            thread: Some(thread),
        })
    }

    /// Queues a request.
    pub fn send(&self, r: Request) -> Result<(), ReconcileError> {
        self.tx.send(r).map_err(|_| ReconcileError::Stopped)
    }

    /// Runs a pass now and waits for its report.
    pub async fn pass_now(&self) -> Result<PassReport, ReconcileError> {
        let (tx, rx) = oneshot::channel();
        self.send(Request::PassNow(tx))?;
        rx.await.map_err(|_| ReconcileError::Stopped)
    }

    /// Stops the kernel thread and waits for it (a pass in progress finishes).
    /// The monitor thread blocks in `recv` and ends with the process.
    pub fn shutdown(mut self) {
        let _ = self.tx.send(Request::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Forwards kernel notifications to the reconciler, except the echoes of
/// its own route and neighbour writes (stamped with the port id `own` of
/// its socket); reopens the socket after an error (ENOBUFS included: the
/// reconciler is told to resync).
fn monitor_loop(tx: mpsc::Sender<Request>, own: u32) {
    loop {
        let mut mon = match Monitor::open() {
            Ok(mut m) => {
                m.ignore_port(own);
                m
            }
            Err(e) => {
                tracing::warn!(error = %e, "netlink monitor unavailable; relying on the resync timer, retrying in 5 s");
                std::thread::sleep(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            match mon.recv() {
                Ok(n) => {
                    if tx.send(Request::Kernel(n)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "netlink monitor failed; resyncing and reopening");
                    if tx.send(Request::Resync).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                    break;
                }
            }
        }
    }
}

struct Worker {
    nl: Netlink,
    settings: Settings,
    leases: BTreeMap<LeaseKey, Arc<Lease>>,
    /// Each family's desired state lease by lease, as of the last full pass
    /// and the event passes since; `None` until a full pass built it (for
    /// the devices in `ifindex`).
    index: PerFamily<Option<DesiredIndex>>,
    /// The devices' indexes as of the last pass.
    ifindex: PerFamily<Option<u32>>,
    /// host-gw peers without a route as of the last pass (logged on change).
    unreachable: Vec<HostGwPeer>,
    /// The udp backend's running datapath (threads stop when it drops).
    udp: Option<UdpDatapath>,
    /// The wireguard backend's devices (userspace datapaths or kernel
    /// devices), one per device.
    wireguard: Vec<WgDevice>,
    metrics: DatapathMetrics,
    /// Peer routes through nexthop objects in large clusters.
    nh: Nexthops,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        // When a full pass is due; None: none wanted.
        let mut due: Option<Instant> = None;
        // Leases changed since the last pass, for the event pass.
        let mut touched: BTreeSet<LeaseKey> = BTreeSet::new();
        let mut waiters: Vec<oneshot::Sender<PassReport>> = Vec::new();
        loop {
            // Changed leases are applied as soon as the queue is empty, so
            // that a burst of watch events gives one event pass.
            let msg = if !touched.is_empty() {
                rx.try_recv().map_err(|e| match e {
                    mpsc::TryRecvError::Empty => mpsc::RecvTimeoutError::Timeout,
                    mpsc::TryRecvError::Disconnected => mpsc::RecvTimeoutError::Disconnected,
                })
            } else {
                match due {
                    None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                    Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                }
            };
            let now = Instant::now();
            match msg {
                Ok(Request::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Ok(Request::Leases(l)) => {
                    self.leases = l.into_iter().map(|l| (l.key, l)).collect();
                    due = Some(now);
                }
                Ok(Request::Changes { upserts, removed }) => {
                    for k in removed {
                        self.leases.remove(&k);
                        touched.insert(k);
                    }
                    for l in upserts {
                        touched.insert(l.key);
                        self.leases.insert(l.key, l);
                    }
                }
                Ok(Request::Settings(s)) => {
                    self.settings = *s;
                    due = Some(now);
                }
                Ok(Request::Resync) => due = Some(now),
                Ok(Request::PassNow(w)) => {
                    waiters.push(w);
                    due = Some(now);
                }
                Ok(Request::Kernel(ns)) => {
                    self.repair_now(&ns);
                    let mut intact = None;
                    if let Some(n) = ns
                        .iter()
                        .find(|n| self.relevant(n) && !self.link_echo(n, &mut intact))
                    {
                        tracing::debug!(notification = ?n, "kernel change on our datapath");
                        // The first notification of a burst starts the clock;
                        // later ones ride along.
                        let at = now + DEBOUNCE;
                        due = Some(due.map_or(at, |d| d.min(at)));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let report = if due.is_some_and(|d| d <= now) {
                        // A full pass covers the changed leases too.
                        touched.clear();
                        due = None;
                        let report = self.pass();
                        // The pass's transient structures were of the
                        // cluster's size.
                        crate::mem::release_freed();
                        report
                    } else {
                        let keys = std::mem::take(&mut touched);
                        let report = self.event_pass(&keys);
                        if !report.errors.is_empty() {
                            // The kernel is not what the event pass assumed:
                            // read it back soon.
                            let at = now + DEBOUNCE;
                            due = Some(due.map_or(at, |d| d.min(at)));
                        }
                        report
                    };
                    let sources = crate::health::CounterSources {
                        udp: self.udp.as_ref().map(UdpDatapath::counters_reader),
                        wireguard: self
                            .wireguard
                            .iter()
                            .filter_map(|d| Some((d.device().to_owned(), d.counters_reader()?)))
                            .collect(),
                        wireguard_kernel: self
                            .wireguard
                            .iter()
                            .filter_map(|d| Some((d.device().to_owned(), d.kernel_counters()?)))
                            .collect(),
                    };
                    self.metrics.record_pass(&report, sources);
                    if report.full {
                        for w in waiters.drain(..) {
                            let _ = w.send(report.clone());
                        }
                    }
                }
            }
        }
    }

    /// Puts back at once what a batch of notifications shows deleted of the
    /// desired state ([`immediate_repairs`]), without waiting for the
    /// debounced full pass that follows anyway: the drift of one entry then
    /// costs a packet of the gap between the deletion and this write, not
    /// of the debounce and a pass. A batch that deletes a device (which
    /// takes its objects along), or more than [`MAX_IMMEDIATE`] objects,
    /// waits for the pass.
    fn repair_now(&mut self, ns: &[Notification]) {
        if ns
            .iter()
            .any(|n| matches!(n, Notification::Link { deleted: true, .. }))
        {
            return;
        }
        let mut ops: Vec<Op> = ns
            .iter()
            .flat_map(|n| immediate_repairs(n, &self.settings, self.ifindex, &self.index))
            .collect();
        ops.dedup();
        if ops.len() > MAX_IMMEDIATE {
            return;
        }
        for op in ops {
            let (what, r) = match &op {
                Op::AddRoute(r) => (
                    format!("route {} via {:?} dev index {}", r.dst, r.gateway, r.oif),
                    self.nl.replace_route(r),
                ),
                Op::AddNeighbour(n) => (
                    format!(
                        "neighbour {} lladdr {} dev index {}",
                        n.ip, n.mac, n.ifindex
                    ),
                    self.nl.replace_neighbour(n),
                ),
                Op::AddFdb(f) => (
                    format!("fdb {} dst {} dev index {}", f.mac, f.dst, f.ifindex),
                    self.nl.replace_fdb(f),
                ),
                _ => continue,
            };
            match r {
                Ok(()) => tracing::info!("put back the deleted {what} at once"),
                // The pass that follows retries and reports it.
                Err(e) => tracing::debug!(error = %e, "putting back {what} at once failed"),
            }
        }
    }

    /// Whether `n` is a link notification (not a deletion) of our vxlan
    /// devices or the external interface while the datapath is as the
    /// desired state has it ([`Worker::links_intact`], read from the kernel
    /// once per batch into `intact`). The device setup of a pass notifies such links
    /// (creation, up, the underlay's change); without this, each device
    /// setup cost a second full pass, which a lease event then waited for.
    fn link_echo(&mut self, n: &Notification, intact: &mut Option<bool>) -> bool {
        let Notification::Link {
            index,
            deleted: false,
            ..
        } = n
        else {
            return false;
        };
        let ours = Some(*index) == self.ifindex.v4
            || Some(*index) == self.ifindex.v6
            || *index == self.settings.external.ifindex;
        ours && *intact.get_or_insert_with(|| self.links_intact())
    }

    /// The vxlan backend's devices as the desired state has them (up, MTU,
    /// MAC and the attributes fixed at creation), and on each output
    /// interface of the wanted routes one wanted route still in place: the
    /// kernel drops an IPv4 route silently when its device goes down, so a
    /// device that went down and up again since the last pass is told by a
    /// missing route. Other backends: never (a link change runs a pass).
    fn links_intact(&mut self) -> bool {
        if !matches!(self.settings.backend, BackendSettings::Vxlan { .. }) {
            return false;
        }
        for family in FAMILIES {
            let Some(spec) = self.settings.backend.device_spec(family) else {
                continue;
            };
            let want = &spec.device;
            let Some(index) = *self.ifindex.get(family) else {
                return false;
            };
            let link = match self.nl.link_by_index(index) {
                Ok(Some(l)) => l,
                _ => return false,
            };
            if link.name != want.name
                || !link.up
                || link.mtu != want.mtu
                || want.mac.is_some_and(|m| link.mac != Some(m))
                || vxlan::mismatch(&link, want).is_some()
            {
                return false;
            }
            let Some(idx) = self.index.get(family).as_ref() else {
                return false;
            };
            // Looked up at the route's own destination: its gateway may lie
            // in a connected subnet (DirectRouting) that another route serves.
            for r in idx.one_route_per_oif() {
                match self.nl.get_route(r.dst.addr()) {
                    Ok(l) if l.oif == r.oif => {}
                    _ => return false,
                }
            }
        }
        true
    }

    /// Whether a notification needs a full pass: it concerns our datapath
    /// ([`is_relevant`]) and does not show the kernel exactly as the desired
    /// state has it.
    fn relevant(&self, n: &Notification) -> bool {
        is_relevant(n, &self.settings, self.ifindex)
            && !matches_desired(n, &self.settings, self.ifindex, &self.index)
    }
}

impl Worker {
    /// One full reconciliation pass: the devices, then per enabled family
    /// the desired state, the kernel's, and the writes between them.
    fn pass(&mut self) -> PassReport {
        let started = Instant::now();
        let mut report = PassReport {
            full: true,
            ..PassReport::default()
        };
        // Whatever fails below, event passes wait for a full pass that
        // rebuilds the index.
        let previous = std::mem::take(&mut self.index);
        if !matches!(self.settings.backend, BackendSettings::Udp(_)) {
            self.udp = None;
            report.record(udp::remove_udp_leftovers(&mut self.nl));
        }
        let keep: Vec<String> = match &self.settings.backend {
            BackendSettings::Wireguard(wg) => wg.devices.iter().map(|d| d.device.clone()).collect(),
            _ => Vec::new(),
        };
        self.wireguard
            .retain(|dp| keep.iter().any(|k| k == dp.device()));
        let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
        report.record(wireguard::remove_leftovers(&mut self.nl, &keep));
        let mut devices: PerFamily<Option<u32>> = PerFamily::default();
        match &self.settings.backend {
            BackendSettings::Vxlan { .. } => {
                for family in FAMILIES {
                    if let Some(name) = self.settings.disabled_device_name(family) {
                        report.record(
                            vxlan::remove_device(&mut self.nl, &name)
                                .map(|c| c.into_iter().collect()),
                        );
                    }
                    let Some(spec) = self.settings.backend.device_spec(family) else {
                        continue;
                    };
                    match vxlan::ensure_device(&mut self.nl, spec) {
                        Ok((link, changes)) => {
                            report.applied(&changes);
                            *devices.get_mut(family) = Some(link.index);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot set up the vxlan device; retrying on the next pass");
                            report.device_error = Some(e.to_string());
                            report.errors.push(e.to_string());
                            self.ifindex = PerFamily::default();
                            report.log(started);
                            return report;
                        }
                    }
                }
            }
            BackendSettings::HostGw => {
                // On failure the routes are still right: `replace` takes
                // over a leftover vxlan route to the same subnet.
                report.record(hostgw::remove_vxlan_leftovers(&mut self.nl));
            }
            BackendSettings::Udp(spec) => {
                report.record(hostgw::remove_vxlan_leftovers(&mut self.nl));
                match UdpDatapath::ensure(&mut self.udp, &mut self.nl, spec) {
                    Ok((ifindex, changes)) => {
                        report.applied(&changes);
                        let dp = self.udp.as_ref().expect("ensured");
                        update_udp_peers(dp, spec, &self.leases, &self.settings.own);
                        *devices.get_mut(IpFamily::V4) = Some(ifindex);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot set up the udp datapath; retrying on the next pass");
                        report.device_error = Some(e.to_string());
                        report.errors.push(e.to_string());
                        self.ifindex = PerFamily::default();
                        report.log(started);
                        return report;
                    }
                }
            }
            BackendSettings::Wireguard(wg) => {
                report.record(hostgw::remove_vxlan_leftovers(&mut self.nl));
                let now = SystemTime::now();
                for spec in &wg.devices {
                    let at = self
                        .wireguard
                        .iter()
                        .position(|d| d.device() == spec.device);
                    let mut slot = at.map(|i| self.wireguard.swap_remove(i));
                    let r = WgDevice::ensure(&mut slot, &mut self.nl, spec);
                    if let Some(dp) = slot {
                        self.wireguard.push(dp);
                    }
                    match r {
                        Ok((ifindex, changes)) => {
                            report.applied(&changes);
                            for f in FAMILIES {
                                if wg.device_for(f).is_some_and(|d| d.device == spec.device) {
                                    *devices.get_mut(f) = Some(ifindex);
                                }
                            }
                        }
                        Err(e) => {
                            tracing::error!(device = %spec.device, error = %e, "cannot set up the wireguard datapath; retrying on the next pass");
                            report.device_error = Some(e.to_string());
                            report.errors.push(e.to_string());
                            self.ifindex = PerFamily::default();
                            report.log(started);
                            return report;
                        }
                    }
                }
                update_wg_peers(
                    &mut self.wireguard,
                    wg,
                    &self.leases,
                    &self.settings.own,
                    now,
                    &mut report,
                );
            }
        }
        self.ifindex = devices;
        report.ifindex = devices.v4;
        report.ifindex_v6 = devices.v6;

        // One route dump serves both families.
        let entries = match self.nl.list_route_entries() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the routes back; retrying on the next pass");
                report.errors.push(e.to_string());
                report.log(started);
                return report;
            }
        };
        let now = SystemTime::now();
        let mut unreachable = Vec::new();
        let families: Vec<IpFamily> = self.settings.families().collect();
        let indexes: Vec<(IpFamily, DesiredIndex)> = families
            .iter()
            .map(|&family| {
                let index = DesiredIndex::build(
                    &self.settings.recipe(family, *devices.get(family)),
                    self.leases.values().map(|l| &**l),
                    Some(&self.settings.own),
                    family,
                    now,
                );
                (family, index)
            })
            .collect();
        let npeers: usize = indexes.iter().map(|(_, i)| i.peers()).sum();
        // Without our nexthops read back, nothing of them is written or
        // deleted this pass.
        let nh_known = match self.nh.sync(&mut self.nl, npeers, &entries) {
            Ok(()) => true,
            Err(e) => {
                report.failed(format!("cannot read the nexthop objects back: {e}"));
                false
            }
        };
        let nhid_of: HashMap<IpNet, u32> = entries
            .iter()
            .filter_map(|e| e.nhid.map(|id| (e.route.dst, id)))
            .collect();
        let routes: Vec<Route> = entries.into_iter().map(|e| e.route).collect();
        for (family, index) in indexes {
            let device = *devices.get(family);
            unreachable.extend(index.unreachable());
            let mut actual = match self.read_actual(family, device, &routes) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the datapath back; retrying on the next pass");
                    report.errors.push(e.to_string());
                    continue;
                }
            };
            // A wanted route in the other form (plain while the mode wants
            // a nexthop object, or the reverse, or naming another object)
            // counts as missing: the plan replaces it in place.
            if nh_known {
                actual.routes.retain(|r| {
                    !index.holds(&Op::AddRoute(r.clone()))
                        || self.nh.has_wanted_form(r, nhid_of.get(&r.dst).copied())
                });
            }
            let plan = datapath::plan_reconcile(&index.desired(), &actual);
            self.apply(
                family,
                device,
                &plan,
                previous.get(family).as_ref(),
                &mut report,
            );
            *self.index.get_mut(family) = Some(index);
        }
        if nh_known {
            self.collect_nexthops(true, &mut report);
        }
        unreachable.sort_by_key(|p| (p.subnet, p.key));
        report.peers = npeers;
        self.note_unreachable(&unreachable, &mut report);
        self.reconcile_blackholes(&mut report);
        self.restore_bridge_route(&routes, &mut report);
        report.log(started);
        report
    }

    /// An event pass: only the leases in `keys` changed since the last
    /// pass. Each family's index replaces their parts and yields the writes
    /// between the desired state before and after (with replace semantics,
    /// deleting what the old versions had and the new ones do not), applied
    /// without reading the kernel back: the full passes (timer, kernel
    /// notifications, snapshots) stay the ground truth. Without an index
    /// (no full pass yet, or the last one failed part-way) this is a full
    /// pass.
    fn event_pass(&mut self, keys: &BTreeSet<LeaseKey>) -> PassReport {
        let families: Vec<IpFamily> = self.settings.families().collect();
        if families.iter().any(|f| self.index.get(*f).is_none()) {
            return self.pass();
        }
        let started = Instant::now();
        let mut report = PassReport::default();
        let now = SystemTime::now();
        let mut unreachable = Vec::new();
        for family in families {
            let device = *self.ifindex.get(family);
            let recipe = self.settings.recipe(family, device);
            let own = Some(&self.settings.own);
            let parts = keys.iter().map(|k| {
                let part = self
                    .leases
                    .get(k)
                    .map(|l| incremental::desired_for(&recipe, [&**l], own, family, now))
                    .unwrap_or_default();
                (*k, part)
            });
            let index = self.index.get_mut(family).as_mut().expect("checked above");
            let plan = index.update(parts);
            report.peers += index.peers();
            // Only host-gw leaves peers without a route (and listing them
            // visits every lease).
            if matches!(self.settings.backend, BackendSettings::HostGw) {
                unreachable.extend(index.unreachable());
            }
            self.apply(family, device, &plan, None, &mut report);
        }
        self.collect_nexthops(false, &mut report);
        if self.nh.wants(report.peers) != self.nh.enabled {
            // Across the threshold: the full pass rewrites every route
            // in the other form, one replace at a time.
            report.log(started);
            return self.pass();
        }
        if let (BackendSettings::Udp(spec), Some(dp)) = (&self.settings.backend, &self.udp) {
            update_udp_peers(dp, spec, &self.leases, &self.settings.own);
        }
        if let BackendSettings::Wireguard(wg) = &self.settings.backend {
            update_wg_peers(
                &mut self.wireguard,
                wg,
                &self.leases,
                &self.settings.own,
                now,
                &mut report,
            );
            let leases: Vec<&Lease> = self.leases.values().map(|l| &**l).collect();
            report.peers = FAMILIES
                .into_iter()
                .map(|f| wg.peer_count(f, leases.clone(), &self.settings.own, now))
                .sum();
        }
        unreachable.sort_by_key(|p| (p.subnet, p.key));
        self.note_unreachable(&unreachable, &mut report);
        report.log(started);
        report
    }

    /// Carries out one family's plan in order, going on after a failure.
    /// Each write is logged at DEBUG and counted: an add of an object that
    /// `wanted_before` (the index of the previous full pass) already held
    /// is a repair.
    fn apply(
        &mut self,
        family: IpFamily,
        device: Option<u32>,
        plan: &datapath::ReconcilePlan,
        wanted_before: Option<&DesiredIndex>,
        report: &mut PassReport,
    ) {
        let name = self.settings.device_name(family).unwrap_or("-").to_string();
        for op in plan.ops() {
            let show = |r: &Route| show_route(r, &self.settings, family, device);
            let (what, r) = match &op {
                Op::DelRoute(r) => (
                    format!("deleted stale route {}", show(r)),
                    self.nh.del_route(&mut self.nl, r),
                ),
                Op::AddFdb(f) => (
                    format!("added fdb {} dst {} dev {name}", f.mac, f.dst),
                    self.nl.replace_fdb(f),
                ),
                Op::AddNeighbour(n) => (
                    format!("added neighbour {} lladdr {} dev {name}", n.ip, n.mac),
                    self.nl.replace_neighbour(n),
                ),
                Op::AddRoute(r) => match self.nh.replace_route(&mut self.nl, r) {
                    Ok(Some(id)) => (format!("added route {} nhid {id}", show(r)), Ok(())),
                    Ok(None) => (format!("added route {}", show(r)), Ok(())),
                    Err(e) => (format!("added route {}", show(r)), Err(e)),
                },
                Op::DelNeighbour(n) => (
                    format!(
                        "deleted stale neighbour {} lladdr {} dev {name}",
                        n.ip, n.mac
                    ),
                    self.nl.del_neighbour(n),
                ),
                Op::DelFdb(f) => (
                    format!("deleted stale fdb {} dst {} dev {name}", f.mac, f.dst),
                    self.nl.del_fdb(f),
                ),
            };
            match r {
                Ok(()) => {
                    tracing::debug!("{what}");
                    report.changes += 1;
                    match &op {
                        Op::DelRoute(r) => {
                            report.removed += 1;
                            self.restore_underlay_route(family, device, r, report);
                        }
                        Op::DelNeighbour(_) | Op::DelFdb(_) => report.removed += 1,
                        _ if wanted_before.is_some_and(|w| w.holds(&op)) => report.repaired += 1,
                        _ => report.added += 1,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "failed: {what}");
                    report.errors.push(format!("{what}: {e}"));
                }
            }
        }
    }

    /// Deletes our nexthop objects that no route names any more: all of
    /// them in a full pass, those whose last route an event pass removed
    /// otherwise. Counted as removed objects.
    fn collect_nexthops(&mut self, full: bool, report: &mut PassReport) {
        let (done, failed) = self.nh.collect_unused(&mut self.nl, full);
        for d in &done {
            tracing::debug!("{d}");
        }
        report.changes += done.len();
        report.removed += done.len();
        for f in failed {
            report.failed(f);
        }
    }

    /// After deleting a stale route outside the cluster network from our
    /// device (written for a lease an earlier version should not have
    /// programmed): puts back the external interface's prefix route it had
    /// replaced, when that is missing now (flannel-core's
    /// `underlay_route_to_restore`).
    fn restore_underlay_route(
        &mut self,
        family: IpFamily,
        device: Option<u32>,
        deleted: &Route,
        report: &mut PassReport,
    ) {
        let Some(scope) = self.settings.scope(family, device) else {
            return;
        };
        let ext = &self.settings.external;
        let Some(p) =
            datapath::underlay_route_to_restore(&scope, deleted, ext.ifindex, &ext.connected)
        else {
            return;
        };
        let what = format!(
            "ip route add {} dev {} proto kernel scope link src {}",
            p.dst, ext.name, p.src
        );
        match self.nl.add_prefix_route(&p) {
            Ok(true) => {
                tracing::warn!(
                    "restored the underlay route {} dev {} that a route of an earlier flannel for a lease outside the cluster network had replaced",
                    p.dst, ext.name
                );
                report.changes += 1;
            }
            Ok(false) => {}
            Err(e) => report.failed(format!("{what}: {e}")),
        }
    }

    /// Puts back the CNI bridge's route to our own subnet when someone
    /// deleted it (flannel-core's `bridge_route_to_restore`); `routes` is
    /// the pass's route dump. Nothing while the node has no bridge.
    fn restore_bridge_route(&mut self, routes: &[Route], report: &mut PassReport) {
        let bridge = match self.nl.link_by_name(flannel_core::wire::CNI_BRIDGE) {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => return report.failed(e),
        };
        let addrs = match self.nl.list_addresses(bridge.index) {
            Ok(a) => a,
            Err(e) => return report.failed(e),
        };
        let owns: Vec<IpNet> = self
            .settings
            .families()
            .filter_map(|f| self.settings.own.subnet(f))
            .collect();
        for own in owns {
            let Some(p) = datapath::bridge_route_to_restore(own, bridge.index, &addrs, routes)
            else {
                continue;
            };
            let what = format!(
                "ip route add {} dev {} proto kernel scope link src {}",
                p.dst,
                flannel_core::wire::CNI_BRIDGE,
                p.src
            );
            match self.nl.add_prefix_route(&p) {
                Ok(true) => {
                    tracing::warn!(
                        "restored the route {} dev {} to our own subnet, which someone had deleted",
                        p.dst,
                        flannel_core::wire::CNI_BRIDGE
                    );
                    report.applied(&[what]);
                }
                Ok(false) => {}
                Err(e) => report.failed(format!("{what}: {e}")),
            }
        }
    }

    /// `--ip-blackhole-route`: our subnets' blackhole routes, and no other
    /// of ours (an earlier lease's, or all of them once the flag is off).
    fn reconcile_blackholes(&mut self, report: &mut PassReport) {
        let s = &self.settings;
        let want =
            datapath::desired_blackholes(s.blackhole, s.families().filter_map(|f| s.own.subnet(f)));
        let networks: Vec<IpNet> = s.families().filter_map(|f| s.network_of(f)).collect();
        let have = match self.nl.list_blackhole_routes() {
            Ok(all) => datapath::owned_blackholes(&all, &networks),
            Err(e) => return report.failed(e),
        };
        let d = datapath::diff(&want, &have);
        for b in &d.del {
            let what = format!(
                "deleted stale route blackhole {} metric {}",
                b.dst, b.metric
            );
            match self.nl.del_blackhole_route(b) {
                Ok(()) => report.applied(&[what]),
                Err(e) => report.failed(format!("{what}: {e}")),
            }
        }
        for b in &d.add {
            let what = format!("added route blackhole {} metric {}", b.dst, b.metric);
            match self.nl.replace_blackhole_route(b) {
                Ok(()) => report.applied(&[what]),
                Err(e) => report.failed(format!("{what}: {e}")),
            }
        }
    }

    /// Logs the host-gw peers left without a route when that set changes
    /// (not on every pass); they are always in the report.
    fn note_unreachable(&mut self, now: &[HostGwPeer], report: &mut PassReport) {
        if !now.is_empty() {
            let msg = hostgw::unreachable_message(
                now,
                &self.settings.external.name,
                &self.settings.external.connected,
            );
            if now != self.unreachable.as_slice() {
                tracing::error!("{msg}");
            }
            report.errors.push(msg);
        } else if !self.unreachable.is_empty() {
            tracing::info!("host-gw: every peer is on a directly connected subnet again");
        }
        self.unreachable = now.to_vec();
    }

    /// What the kernel holds of ours in `family` ([`Settings::scope`]),
    /// from the pass's route dump and the device's neighbours and FDB.
    fn read_actual(
        &mut self,
        family: IpFamily,
        device: Option<u32>,
        routes: &[Route],
    ) -> flannel_netlink::Result<DesiredState> {
        let Some(scope) = self.settings.scope(family, device) else {
            return Ok(DesiredState::default());
        };
        let mut all = DesiredState {
            routes: routes.to_vec(),
            ..DesiredState::default()
        };
        if let Some(ifindex) = device {
            all.neighbours = self.nl.list_neighbours(ifindex)?;
            all.fdb = self.nl.list_fdb(ifindex)?;
        }
        Ok(scope.filter(all))
    }
}

/// Swaps the udp datapath's peer table for the one of `leases`; logs the
/// new count at INFO and the peers at DEBUG when they changed.
fn update_udp_peers(
    dp: &UdpDatapath,
    spec: &UdpSpec,
    leases: &BTreeMap<LeaseKey, Arc<Lease>>,
    own: &LeaseKey,
) {
    let table = udp::peer_table(
        spec.network,
        leases.values().map(|l| &**l),
        own,
        SystemTime::now(),
    );
    if dp.set_peers(table) {
        let peers = dp.peers();
        tracing::info!(count = peers.len(), "udp peer table updated");
        let list: Vec<String> = peers
            .iter()
            .map(|p| format!("{} via {}", p.subnet, p.public_ip))
            .collect();
        tracing::debug!(peers = ?list, "udp peer table updated: peers");
    }
}

/// Hands each wireguard device its peers among `leases` (a summary at INFO
/// when they changed, the list at DEBUG) and records the kernel writes
/// that took in `report`.
fn update_wg_peers(
    devices: &mut [WgDevice],
    wg: &WgSettings,
    leases: &BTreeMap<LeaseKey, Arc<Lease>>,
    own: &LeaseKey,
    now: SystemTime,
    report: &mut PassReport,
) {
    for dp in devices {
        let Some(spec) = wg.devices.iter().find(|d| d.device == dp.device()) else {
            continue;
        };
        let peers = wg.peers(spec, leases.values().map(|l| &**l), own, now);
        let (changed, written) = match dp.set_peers(peers) {
            Ok(r) => r,
            Err(e) => {
                report.failed(e);
                continue;
            }
        };
        if changed {
            let peers = dp.peers();
            tracing::info!(device = %spec.device, count = peers.len(), "wireguard peers updated");
            let list: Vec<String> = peers
                .iter()
                .map(|p| {
                    let ips: Vec<String> = p.allowed_ips.iter().map(|n| n.to_string()).collect();
                    format!(
                        "{} at {} allowed {}",
                        p.public_key,
                        p.endpoint,
                        ips.join(",")
                    )
                })
                .collect();
            tracing::debug!(device = %spec.device, peers = ?list, "wireguard peers updated: peers");
        }
        if let Some(line) = written {
            report.applied(&[line]);
        }
    }
}

/// Whether a notification about a route, neighbour or FDB entry shows
/// nothing to repair: a write of an object we want exactly as we want
/// it (the echo of our own write, above all the vxlan driver's FDB
/// notifications, which carry no sender), the deletion of an object we
/// do not want, or a change to an object that is not ours. Everything
/// else, and everything while no full pass has built the index, needs
/// a pass. The udp backend's cluster route is not in the index: with
/// udp every route notification inside the network needs a pass.
pub fn matches_desired(
    n: &Notification,
    settings: &Settings,
    devices: PerFamily<Option<u32>>,
    index: &PerFamily<Option<DesiredIndex>>,
) -> bool {
    if matches!(settings.backend, BackendSettings::Udp(_)) {
        return false;
    }
    let family_of = |ip: &std::net::IpAddr| {
        if ip.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    };
    match n {
        Notification::Route {
            dst,
            deleted,
            route,
        } => {
            let family = family_of(&dst.addr());
            let Some(idx) = index.get(family) else {
                return false;
            };
            match (route, deleted) {
                // A blackhole or multipath route: the pass decides.
                (None, _) => false,
                // Our own subnet's route (cni0's) is the kernel's, but
                // its deletion cuts our pods off: a pass puts it back.
                (Some(_), true) => {
                    !idx.wants_route_to(dst) && settings.own.subnet(family) != Some(*dst)
                }
                (Some(r), false) => {
                    idx.holds(&Op::AddRoute(r.clone()))
                        || settings
                            .scope(family, *devices.get(family))
                            .is_none_or(|s| !s.owns_route(r))
                }
            }
        }
        Notification::Neighbour {
            ifindex,
            ip,
            deleted,
            mac,
            permanent,
        } => {
            let Some(idx) = index.get(family_of(ip)) else {
                return false;
            };
            if *deleted || !*permanent {
                // Gone, or no longer permanent (`ip neigh del` first
                // marks it failed): a repair if we want one there.
                !idx.wants_neighbour_at(*ifindex, *ip)
            } else {
                mac.is_some_and(|mac| {
                    idx.holds(&Op::AddNeighbour(datapath::Neighbour {
                        ifindex: *ifindex,
                        ip: *ip,
                        mac,
                    }))
                })
            }
        }
        Notification::Fdb {
            ifindex,
            mac,
            deleted,
            dst,
        } => {
            let family = if devices.v6 == Some(*ifindex) {
                IpFamily::V6
            } else {
                IpFamily::V4
            };
            let Some(idx) = index.get(family) else {
                return false;
            };
            // The device's own and flooding entries: not ours to keep.
            if mac.0 == [0; 6] || mac.0[0] & 1 != 0 {
                return true;
            }
            match dst {
                None => !idx.wants_fdb_for(*ifindex, *mac),
                Some(dst) => {
                    let held = idx.holds(&Op::AddFdb(datapath::FdbEntry {
                        ifindex: *ifindex,
                        mac: *mac,
                        dst: *dst,
                    }));
                    if *deleted {
                        !held
                    } else {
                        held
                    }
                }
            }
        }
        _ => false,
    }
}

/// Most objects one batch of notifications is repaired of at once
/// ([`Worker::repair_now`]); more wait for the pass.
pub const MAX_IMMEDIATE: usize = 16;

/// The writes that put back what a kernel notification shows deleted of
/// the desired state: every wanted route to the deleted route's
/// destination, the wanted neighbour at a deleted (or no longer permanent)
/// neighbour's address, the wanted FDB entry of a deleted one's MAC. Empty
/// for anything else, for udp (whose route is not in the index) and while
/// no full pass has built the index.
pub fn immediate_repairs(
    n: &Notification,
    settings: &Settings,
    devices: PerFamily<Option<u32>>,
    index: &PerFamily<Option<DesiredIndex>>,
) -> Vec<Op> {
    if matches!(settings.backend, BackendSettings::Udp(_)) {
        return Vec::new();
    }
    let family_of = |ip: &std::net::IpAddr| {
        if ip.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    };
    match n {
        Notification::Route {
            dst,
            deleted: true,
            route: Some(_),
        } => index
            .get(family_of(&dst.addr()))
            .as_ref()
            .map(|idx| idx.routes_to(dst).into_iter().map(Op::AddRoute).collect())
            .unwrap_or_default(),
        Notification::Neighbour {
            ifindex,
            ip,
            deleted,
            permanent,
            ..
        } if *deleted || !*permanent => index
            .get(family_of(ip))
            .as_ref()
            .map(|idx| {
                idx.neighbours_at(*ifindex, *ip)
                    .into_iter()
                    .map(Op::AddNeighbour)
                    .collect()
            })
            .unwrap_or_default(),
        Notification::Fdb {
            ifindex,
            mac,
            deleted: true,
            dst,
        } if mac.0 != [0; 6] && mac.0[0] & 1 == 0 => {
            let family = if devices.v6 == Some(*ifindex) {
                IpFamily::V6
            } else {
                IpFamily::V4
            };
            let Some(idx) = index.get(family) else {
                return Vec::new();
            };
            let wanted = idx.fdb_for(*ifindex, *mac);
            // The deletion of an entry we did not want (another dst) needs no repair.
            if dst.is_some_and(|d| !wanted.iter().any(|w| w.dst == d)) {
                return Vec::new();
            }
            wanted.into_iter().map(Op::AddFdb).collect()
        }
        _ => Vec::new(),
    }
}

/// A route as `ip route` prints it, with our devices named.
fn show_route(r: &Route, s: &Settings, family: IpFamily, device: Option<u32>) -> String {
    let mut out = r.dst.to_string();
    if let Some(gw) = r.gateway {
        out.push_str(&format!(" via {gw}"));
    }
    match (device, s.device_name(family)) {
        (Some(i), Some(dev)) if i == r.oif => out.push_str(&format!(" dev {dev}")),
        _ if r.oif == s.external.ifindex => out.push_str(&format!(" dev {}", s.external.name)),
        _ => out.push_str(&format!(" dev index {}", r.oif)),
    }
    if r.onlink {
        out.push_str(" onlink");
    }
    out
}

/// Whether a kernel notification may concern our datapath: our devices
/// (by index or name; with host-gw, or for a disabled family, any
/// `flannel.<VNI>` / `flannel-v6.<VNI>` leftover), the underlay interface,
/// addresses on our devices, routes inside the cluster networks,
/// neighbour/FDB entries on our devices, and anything unknown (e.g. lost
/// notifications).
pub fn is_relevant(n: &Notification, s: &Settings, ifindex: PerFamily<Option<u32>>) -> bool {
    let ours = |i: &u32| Some(*i) == ifindex.v4 || Some(*i) == ifindex.v6;
    #[allow(unreachable_patterns)]
    match n {
        Notification::Link { index, name, .. } => {
            ours(index)
                || *index == s.external.ifindex
                || match &s.backend {
                    BackendSettings::Vxlan { .. } => FAMILIES.into_iter().any(|f| {
                        s.device_name(f) == Some(name.as_str())
                            || s.disabled_device_name(f).as_deref() == Some(name.as_str())
                    }),
                    // A vxlan leftover to remove.
                    BackendSettings::HostGw => hostgw::may_be_leftover_name(name),
                    BackendSettings::Udp(spec) => {
                        *name == spec.device || hostgw::may_be_leftover_name(name)
                    }
                    BackendSettings::Wireguard(_) => hostgw::may_be_leftover_name(name),
                }
                // Our wireguard devices, or their leftovers.
                || wireguard::is_wireguard_device_name(name)
                // A udp leftover to remove.
                || (!matches!(s.backend, BackendSettings::Udp(_)) && name == flannel_core::wire::UDP_TUN_DEVICE)
        }
        Notification::Route { dst, .. } => FAMILIES
            .into_iter()
            .any(|f| s.network_of(f).is_some_and(|net| net.contains(dst))),
        Notification::Neighbour { ifindex, .. } | Notification::Fdb { ifindex, .. } => {
            ours(ifindex)
        }
        Notification::Address { index, .. } => ours(index),
        // Our own writes' echoes are dropped by port; this is someone
        // else's change to an object of ours (a deleted one took its
        // routes without a route notification).
        Notification::Nexthop { id, .. } => nexthops::owns_id(*id),
        // Anything else (e.g. a lost-notifications overrun) may hide a
        // change of ours: resync.
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::vxlan::lease_attrs;
    use flannel_core::datapath::{FdbEntry, Neighbour};
    use flannel_netlink::VxlanDevice;
    use std::net::IpAddr;

    fn external() -> ExternalSettings {
        ExternalSettings {
            ifindex: 2,
            name: "eth0".into(),
            connected: vec!["172.16.1.14/24".parse().unwrap()],
        }
    }

    fn settings() -> Settings {
        Settings {
            backend: BackendSettings::Vxlan {
                v4: Some(DeviceSpec {
                    device: VxlanDevice {
                        name: "flannel.1".into(),
                        vni: 1,
                        local: "172.16.1.14".parse().unwrap(),
                        underlay_index: 2,
                        port: 0,
                        learning: false,
                        gbp: false,
                        mtu: 1450,
                        mac: None,
                    },
                    address: "10.244.1.0/32".parse().unwrap(),
                }),
                v6: None,
                direct_routing: false,
            },
            network: Some("10.244.0.0/16".parse().unwrap()),
            ipv6_network: None,
            own: "10.244.1.0-24".parse().unwrap(),
            external: external(),
            blackhole: false,
        }
    }

    fn lease(key: &str, ip: &str, mac: &str, vni: u32) -> Lease {
        Lease {
            key: key.parse().unwrap(),
            attrs: lease_attrs(ip.parse().unwrap(), vni, mac.parse().unwrap()),
            expiration: None,
        }
    }

    fn leases() -> Vec<Lease> {
        vec![
            lease("10.244.1.0-24", "172.16.1.14", "26:62:24:f0:61:01", 1),
            lease("10.244.2.0-24", "172.16.1.13", "52:17:43:ba:2e:56", 1),
            lease("10.244.3.0-24", "192.168.7.3", "02:00:00:00:00:03", 1),
            lease("10.244.4.0-24", "172.16.1.4", "02:00:00:00:00:04", 2),
        ]
    }

    #[test]
    fn desired_is_the_packet_walk_triple_for_each_peer_of_our_vni() {
        let Desired {
            peers: n,
            state: d,
            unreachable,
        } = settings().desired(IpFamily::V4, Some(4), &leases(), SystemTime::now());
        assert!(unreachable.is_empty());
        assert_eq!(n, 2, "own lease and other VNI skipped");
        assert_eq!(
            d.routes[0],
            Route {
                dst: "10.244.2.0/24".parse().unwrap(),
                gateway: Some("10.244.2.0".parse().unwrap()),
                oif: 4,
                onlink: true
            }
        );
        assert!(d.neighbours.contains(&Neighbour {
            ifindex: 4,
            ip: "10.244.2.0".parse().unwrap(),
            mac: "52:17:43:ba:2e:56".parse().unwrap()
        }));
        assert!(d.fdb.contains(&FdbEntry {
            ifindex: 4,
            mac: "52:17:43:ba:2e:56".parse().unwrap(),
            dst: "172.16.1.13".parse().unwrap()
        }));
        assert_eq!((d.routes.len(), d.neighbours.len(), d.fdb.len()), (2, 2, 2));
    }

    #[test]
    fn direct_routing_skips_encapsulation_for_connected_peers_only() {
        let mut s = settings();
        if let BackendSettings::Vxlan { direct_routing, .. } = &mut s.backend {
            *direct_routing = true;
        }
        let d = s
            .desired(IpFamily::V4, Some(4), &leases(), SystemTime::now())
            .state;
        let direct = Route {
            dst: "10.244.2.0/24".parse().unwrap(),
            gateway: Some("172.16.1.13".parse().unwrap()),
            oif: 2,
            onlink: false,
        };
        assert!(d.routes.contains(&direct), "{d:?}");
        // 192.168.7.3 is not connected: the vxlan triple.
        assert_eq!(d.neighbours.len(), 1);
        assert_eq!(d.neighbours[0].ip, "10.244.3.0".parse::<IpAddr>().unwrap());
        // Gateway routes on the external interface are owned with and
        // without DirectRouting: without, they are stale and get deleted.
        assert!(s.scope(IpFamily::V4, Some(4)).unwrap().owns_route(&direct));
        assert!(settings()
            .scope(IpFamily::V4, Some(4))
            .unwrap()
            .owns_route(&direct));
        // A host-gw leftover to a subnet without vxlan peer is deleted; one
        // to a vxlan peer's subnet is replaced by the vxlan route.
        let gone = Route {
            dst: "10.244.9.0/24".parse().unwrap(),
            gateway: Some("172.16.1.9".parse().unwrap()),
            oif: 2,
            onlink: false,
        };
        let plan = datapath::plan_reconcile(
            &settings()
                .desired(IpFamily::V4, Some(4), &leases(), SystemTime::now())
                .state,
            &settings()
                .scope(IpFamily::V4, Some(4))
                .unwrap()
                .filter(DesiredState {
                    routes: vec![direct.clone(), gone.clone()],
                    ..DesiredState::default()
                }),
        );
        assert_eq!(plan.routes.del, vec![gone]);
        assert!(plan
            .routes
            .add
            .iter()
            .any(|r| r.dst == direct.dst && r.oif == 4));
    }

    fn host_gw_settings() -> Settings {
        Settings {
            backend: BackendSettings::HostGw,
            ..settings()
        }
    }

    fn host_gw_lease(key: &str, ip: &str) -> Lease {
        Lease {
            key: key.parse().unwrap(),
            attrs: hostgw::lease_attrs(ip.parse().unwrap()),
            expiration: None,
        }
    }

    #[test]
    fn host_gw_routes_each_connected_peer_via_its_public_ip() {
        let s = host_gw_settings();
        let mut ls = vec![
            host_gw_lease("10.244.1.0-24", "172.16.1.14"),
            host_gw_lease("10.244.2.0-24", "172.16.1.13"),
            host_gw_lease("10.244.3.0-24", "192.168.7.3"),
            host_gw_lease("10.244.5.0-24", "172.16.1.5"),
        ];
        // A vxlan lease is not a host-gw peer.
        ls.push(lease("10.244.4.0-24", "172.16.1.4", "02:00:00:00:00:04", 1));
        let d = s.desired(IpFamily::V4, None, &ls, SystemTime::now());
        let via = |dst: &str, gw: &str| Route {
            dst: dst.parse().unwrap(),
            gateway: Some(gw.parse().unwrap()),
            oif: 2,
            onlink: false,
        };
        assert_eq!(
            d.state.routes,
            vec![
                via("10.244.2.0/24", "172.16.1.13"),
                via("10.244.5.0/24", "172.16.1.5")
            ]
        );
        assert!(d.state.neighbours.is_empty() && d.state.fdb.is_empty());
        assert_eq!(d.peers, 2);
        assert_eq!(d.unreachable.len(), 1);
        assert_eq!(
            d.unreachable[0].public_ip,
            "192.168.7.3".parse::<IpAddr>().unwrap()
        );
        // Scope with host-gw: external gateway routes in the network, never
        // our own subnet, never routes outside the network or without gateway.
        let sc = s.scope(IpFamily::V4, None).unwrap();
        assert!(sc.owns_route(&via("10.244.9.0/24", "172.16.1.9")));
        assert!(!sc.owns_route(&via("10.244.1.0/24", "172.16.1.9")));
        assert!(!sc.owns_route(&via("192.168.0.0/24", "172.16.1.9")));
        let mut connected = via("10.244.9.0/24", "172.16.1.9");
        connected.gateway = None;
        assert!(!sc.owns_route(&connected));
    }

    #[test]
    fn relevant_notifications() {
        let hg = host_gw_settings();
        assert!(is_relevant(
            &Notification::Link {
                index: 9,
                name: "flannel.1".into(),
                deleted: false
            },
            &hg,
            PerFamily::default()
        ));
        assert!(!is_relevant(
            &Notification::Link {
                index: 9,
                name: "veth1".into(),
                deleted: false
            },
            &hg,
            PerFamily::default()
        ));
        let s = settings();
        let v4dev = PerFamily {
            v4: Some(4),
            v6: None,
        };
        let yes = |n: Notification| assert!(is_relevant(&n, &s, v4dev), "{n:?}");
        let no = |n: Notification| assert!(!is_relevant(&n, &s, v4dev), "{n:?}");
        yes(Notification::Link {
            index: 4,
            name: "flannel.1".into(),
            deleted: true,
        });
        // Recreated by someone else under a new index: matched by name.
        yes(Notification::Link {
            index: 9,
            name: "flannel.1".into(),
            deleted: false,
        });
        yes(Notification::Link {
            index: 2,
            name: "eth0".into(),
            deleted: false,
        });
        no(Notification::Link {
            index: 7,
            name: "veth1".into(),
            deleted: false,
        });
        yes(Notification::Route {
            dst: "10.244.2.0/24".parse().unwrap(),
            deleted: true,
            route: None,
        });
        no(Notification::Route {
            dst: "192.168.0.0/24".parse().unwrap(),
            deleted: true,
            route: None,
        });
        yes(Notification::Neighbour {
            ifindex: 4,
            ip: "10.244.2.0".parse().unwrap(),
            deleted: true,
            mac: None,
            permanent: false,
        });
        no(Notification::Neighbour {
            ifindex: 2,
            ip: "172.16.1.1".parse().unwrap(),
            deleted: false,
            mac: None,
            permanent: false,
        });
        yes(Notification::Fdb {
            ifindex: 4,
            mac: Default::default(),
            deleted: true,
            dst: None,
        });
        yes(Notification::Address {
            index: 4,
            deleted: true,
        });
        no(Notification::Address {
            index: 2,
            deleted: true,
        });
        yes(Notification::Overrun);
    }

    /// Settings, the v4 device index 4 and the desired index of `leases()`.
    fn v4_fixture() -> (Settings, PerFamily<Option<u32>>, DesiredIndex) {
        let s = settings();
        let devs = PerFamily {
            v4: Some(4),
            v6: None,
        };
        let ls: Vec<Arc<Lease>> = leases().into_iter().map(Arc::new).collect();
        let idx = DesiredIndex::build(
            &s.recipe(IpFamily::V4, Some(4)),
            ls.iter().map(|l| &**l),
            Some(&s.own),
            IpFamily::V4,
            SystemTime::now(),
        );
        (s, devs, idx)
    }

    #[test]
    fn deletions_of_wanted_objects_are_put_back_at_once() {
        let (s, devs, idx) = v4_fixture();
        let want = idx.desired();
        let index = PerFamily {
            v4: Some(idx),
            v6: None,
        };
        let repairs = |n: Notification| immediate_repairs(&n, &s, devs, &index);
        let route = want.routes[0].clone();
        let neigh = want.neighbours[0].clone();
        let fdb = want.fdb[0].clone();
        assert_eq!(
            repairs(Notification::Route {
                dst: route.dst,
                deleted: true,
                route: Some(route.clone()),
            }),
            [Op::AddRoute(route.clone())]
        );
        assert_eq!(
            repairs(Notification::Neighbour {
                ifindex: 4,
                ip: neigh.ip,
                deleted: true,
                mac: Some(neigh.mac),
                permanent: true,
            }),
            [Op::AddNeighbour(neigh.clone())]
        );
        assert_eq!(
            repairs(Notification::Fdb {
                ifindex: 4,
                mac: fdb.mac,
                deleted: true,
                dst: Some(fdb.dst),
            }),
            [Op::AddFdb(fdb.clone())]
        );
        // Our own writes' echoes, deletions of what we do not want, and
        // the device's flooding entry: nothing.
        assert!(repairs(Notification::Route {
            dst: route.dst,
            deleted: false,
            route: Some(route.clone()),
        })
        .is_empty());
        assert!(repairs(Notification::Route {
            dst: "10.244.99.0/24".parse().unwrap(),
            deleted: true,
            route: Some(route.clone()),
        })
        .is_empty());
        assert!(repairs(Notification::Fdb {
            ifindex: 4,
            mac: fdb.mac,
            deleted: true,
            dst: Some("192.0.2.99".parse().unwrap()),
        })
        .is_empty());
        assert!(repairs(Notification::Fdb {
            ifindex: 4,
            mac: flannel_core::mac::MacAddr([0; 6]),
            deleted: true,
            dst: Some(fdb.dst),
        })
        .is_empty());
        // Without an index (no full pass yet): the pass decides.
        let none = PerFamily::default();
        assert!(immediate_repairs(
            &Notification::Route {
                dst: route.dst,
                deleted: true,
                route: Some(route),
            },
            &s,
            devs,
            &none
        )
        .is_empty());
    }

    #[test]
    fn notifications_matching_the_desired_state_need_no_pass() {
        let (s, devs, idx) = v4_fixture();
        let index = PerFamily {
            v4: Some(idx.clone()),
            v6: None,
        };
        let want = idx.desired();
        let needs =
            |n: Notification| is_relevant(&n, &s, devs) && !matches_desired(&n, &s, devs, &index);
        let route = want.routes[0].clone();
        let neigh = want.neighbours[0].clone();
        let fdb = want.fdb[0].clone();
        // Echoes of our own writes: nothing to do.
        assert!(!needs(Notification::Route {
            dst: route.dst,
            deleted: false,
            route: Some(route.clone()),
        }));
        assert!(!needs(Notification::Fdb {
            ifindex: 4,
            mac: fdb.mac,
            deleted: false,
            dst: Some(fdb.dst),
        }));
        assert!(!needs(Notification::Neighbour {
            ifindex: 4,
            ip: neigh.ip,
            deleted: false,
            mac: Some(neigh.mac),
            permanent: true,
        }));
        // Our deletions of stale objects: nothing to do.
        let stale = Route {
            dst: "10.244.9.0/24".parse().unwrap(),
            gateway: Some("10.244.9.0".parse().unwrap()),
            oif: 4,
            onlink: true,
        };
        assert!(!needs(Notification::Route {
            dst: stale.dst,
            deleted: true,
            route: Some(stale.clone()),
        }));
        // A route to our own subnet (cni0's) is not ours either way.
        let cni0 = Route {
            dst: "10.244.1.0/24".parse().unwrap(),
            gateway: None,
            oif: 7,
            onlink: false,
        };
        assert!(!needs(Notification::Route {
            dst: cni0.dst,
            deleted: false,
            route: Some(cni0.clone()),
        }));
        // Its deletion cuts our pods off: a pass restores it.
        assert!(needs(Notification::Route {
            dst: cni0.dst,
            deleted: true,
            route: Some(cni0),
        }));
        // Someone deleted or changed what we want, or added what we do not:
        // a pass.
        assert!(needs(Notification::Route {
            dst: route.dst,
            deleted: true,
            route: Some(route.clone()),
        }));
        assert!(needs(Notification::Route {
            dst: stale.dst,
            deleted: false,
            route: Some(stale),
        }));
        let mut moved = route.clone();
        moved.gateway = Some("10.244.2.9".parse().unwrap());
        assert!(needs(Notification::Route {
            dst: moved.dst,
            deleted: false,
            route: Some(moved),
        }));
        assert!(needs(Notification::Fdb {
            ifindex: 4,
            mac: fdb.mac,
            deleted: true,
            dst: Some(fdb.dst),
        }));
        assert!(needs(Notification::Fdb {
            ifindex: 4,
            mac: fdb.mac,
            deleted: false,
            dst: Some("172.16.1.99".parse().unwrap()),
        }));
        assert!(needs(Notification::Neighbour {
            ifindex: 4,
            ip: neigh.ip,
            deleted: false,
            mac: Some(neigh.mac),
            permanent: false,
        }));
        // A blackhole (no Route): the pass decides.
        assert!(needs(Notification::Route {
            dst: "10.244.1.0/24".parse().unwrap(),
            deleted: true,
            route: None,
        }));
        // Without an index (no full pass yet) everything of ours counts.
        assert!(!matches_desired(
            &Notification::Route {
                dst: route.dst,
                deleted: false,
                route: Some(route),
            },
            &s,
            devs,
            &PerFamily::default()
        ));
    }

    fn wg_settings(mode: flannel_core::config::WireguardMode) -> Settings {
        use crate::backend::wireguard::{device_specs, public_key, KeyPair};
        use flannel_core::wireguard::SecretKey;
        let private = SecretKey(
            "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
                .parse()
                .unwrap(),
        );
        let keys = KeyPair {
            public: public_key(&private),
            private,
        };
        let cfg = flannel_core::config::WireguardConfig {
            mode,
            ..Default::default()
        };
        let mut s = dual_settings(false);
        s.backend = BackendSettings::Wireguard(WgSettings {
            devices: device_specs(
                &cfg,
                s.own.ipv4,
                s.own.ipv6,
                s.network,
                s.ipv6_network,
                1420,
                &keys,
                None,
                false,
            ),
            local: Default::default(),
        });
        s
    }

    #[test]
    fn wireguard_counts_peers_per_device_and_owns_no_route_inside_the_network() {
        use flannel_core::config::WireguardMode;
        let key = |k: &str| k.parse::<flannel_core::wireguard::WgKey>().unwrap();
        let lease = |subnets: &str, ip: &str, ip6: &str, k: &str| Lease {
            key: subnets.parse().unwrap(),
            attrs: flannel_core::wireguard::lease_attrs(
                Some(ip.parse().unwrap()),
                Some(ip6.parse().unwrap()),
                &key(k),
                Some(51820),
                Some(51821),
            ),
            expiration: None,
        };
        let ls = vec![
            lease(
                "10.244.2.0-24&fd00:10:244:2::-64",
                "172.16.1.13",
                "fd00:1::13",
                "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE=",
            ),
            lease(
                "10.244.3.0-24&fd00:10:244:3::-64",
                "172.16.1.3",
                "fd00:1::3",
                "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
            ),
        ];
        let now = SystemTime::now();
        let sep = wg_settings(WireguardMode::Separate);
        assert_eq!(sep.device_name(IpFamily::V4), Some("flannel-wg"));
        assert_eq!(sep.device_name(IpFamily::V6), Some("flannel-wg-v6"));
        let (v4, v6) = (
            sep.desired(IpFamily::V4, Some(7), &ls, now),
            sep.desired(IpFamily::V6, Some(8), &ls, now),
        );
        assert_eq!((v4.peers, v6.peers), (2, 2));
        assert!(
            v4.state.is_empty() && v6.state.is_empty(),
            "peers live in the datapath"
        );
        // One device for both families: its peers are counted once.
        let auto = wg_settings(WireguardMode::Auto);
        assert_eq!(auto.device_name(IpFamily::V6), Some("flannel-wg"));
        let (v4, v6) = (
            auto.desired(IpFamily::V4, Some(7), &ls, now),
            auto.desired(IpFamily::V6, Some(7), &ls, now),
        );
        assert_eq!((v4.peers, v6.peers), (2, 0));
        // Our devices and their leftovers are watched, with every backend.
        for s in [&sep, &settings(), &host_gw_settings()] {
            assert!(is_relevant(
                &Notification::Link {
                    index: 99,
                    name: "flannel-wg-v6".into(),
                    deleted: true
                },
                s,
                PerFamily::default()
            ));
        }
    }

    fn dual_settings(direct_routing: bool) -> Settings {
        let mut s = settings();
        let v4 = s.backend.device_spec(IpFamily::V4).cloned();
        let mut v6dev = v4.as_ref().unwrap().device.clone();
        v6dev.name = "flannel-v6.1".into();
        v6dev.local = "fd00:1::14".parse().unwrap();
        v6dev.mtu = 1430;
        s.backend = BackendSettings::Vxlan {
            v4,
            v6: Some(DeviceSpec {
                device: v6dev,
                address: "fd00:10:244:1::/128".parse().unwrap(),
            }),
            direct_routing,
        };
        s.ipv6_network = Some("fd00:10:244::/56".parse().unwrap());
        s.own = "10.244.1.0-24&fd00:10:244:1::-64".parse().unwrap();
        s.external.connected.push("fd00:1::14/64".parse().unwrap());
        s
    }

    fn dual_lease(key: &str, ip: &str, ip6: &str, mac: &str, mac6: &str) -> Lease {
        Lease {
            key: key.parse().unwrap(),
            attrs: vxlan::lease_attrs_dual(
                Some((ip.parse().unwrap(), mac.parse().unwrap())),
                Some((ip6.parse().unwrap(), mac6.parse().unwrap())),
                1,
            ),
            expiration: None,
        }
    }

    fn dual_leases() -> Vec<Lease> {
        vec![
            dual_lease(
                "10.244.1.0-24&fd00:10:244:1::-64",
                "172.16.1.14",
                "fd00:1::14",
                "26:62:24:f0:61:01",
                "26:62:24:f0:61:06",
            ),
            dual_lease(
                "10.244.2.0-24&fd00:10:244:2::-64",
                "172.16.1.13",
                "fd00:1::13",
                "52:17:43:ba:2e:56",
                "52:17:43:ba:2e:66",
            ),
            // A far peer: not on eth0's subnets in either family.
            dual_lease(
                "10.244.3.0-24&fd00:10:244:3::-64",
                "192.168.7.3",
                "fd00:7::3",
                "02:00:00:00:00:03",
                "02:00:00:00:06:03",
            ),
        ]
    }

    #[test]
    fn dual_stack_desires_one_triple_per_peer_and_family_on_its_device() {
        let s = dual_settings(false);
        assert_eq!(
            s.families().collect::<Vec<_>>(),
            vec![IpFamily::V4, IpFamily::V6]
        );
        let now = SystemTime::now();
        let v4 = s.desired(IpFamily::V4, Some(4), &dual_leases(), now);
        let v6 = s.desired(IpFamily::V6, Some(5), &dual_leases(), now);
        assert_eq!((v4.peers, v6.peers), (2, 2));
        assert!(v4
            .state
            .routes
            .iter()
            .all(|r| r.oif == 4 && r.dst.addr().is_ipv4()));
        assert!(v6.state.routes.iter().all(|r| r.oif == 5 && r.onlink));
        assert!(v6.state.neighbours.contains(&Neighbour {
            ifindex: 5,
            ip: "fd00:10:244:2::".parse().unwrap(),
            mac: "52:17:43:ba:2e:66".parse().unwrap(),
        }));
        assert!(v6.state.fdb.contains(&FdbEntry {
            ifindex: 5,
            mac: "52:17:43:ba:2e:66".parse().unwrap(),
            dst: "fd00:1::13".parse().unwrap(),
        }));
        // The IPv6 scope owns IPv6 routes in IPv6Network on flannel-v6 only,
        // never our own subnet nor the kernel's route for our /128.
        let sc = s.scope(IpFamily::V6, Some(5)).unwrap();
        assert!(sc.owns_route(&v6.state.routes[0]));
        assert!(!sc.owns_route(&v4.state.routes[0]));
        let own128 = Route {
            dst: "fd00:10:244:1::/128".parse().unwrap(),
            gateway: None,
            oif: 5,
            onlink: false,
        };
        assert!(!sc.owns_route(&own128));
        // A disabled family has no scope and no desired state.
        let mut v4only = settings();
        v4only.own = s.own;
        assert!(v4only.scope(IpFamily::V6, Some(5)).is_none());
        assert!(v4only
            .desired(IpFamily::V6, Some(5), &dual_leases(), now)
            .state
            .is_empty());
        // ... and its leftover device is named for removal.
        assert_eq!(
            v4only.disabled_device_name(IpFamily::V6).as_deref(),
            Some("flannel-v6.1")
        );
        assert_eq!(s.disabled_device_name(IpFamily::V6), None);
    }

    #[test]
    fn dual_stack_direct_routing_is_decided_per_family() {
        let s = dual_settings(true);
        let now = SystemTime::now();
        let v6 = s.desired(IpFamily::V6, Some(5), &dual_leases(), now).state;
        // The connected peer: direct via its PublicIPv6 on eth0.
        assert!(v6.routes.contains(&Route {
            dst: "fd00:10:244:2::/64".parse().unwrap(),
            gateway: Some("fd00:1::13".parse().unwrap()),
            oif: 2,
            onlink: false,
        }));
        // The far one: encapsulated.
        assert_eq!(v6.neighbours.len(), 1);
        assert_eq!(v6.fdb[0].dst, "fd00:7::3".parse::<IpAddr>().unwrap());
        // IPv4 connectivity does not decide for IPv6: a peer connected only
        // over IPv4 stays encapsulated in IPv6.
        let mut ls = dual_leases();
        ls[1] = dual_lease(
            "10.244.2.0-24&fd00:10:244:2::-64",
            "172.16.1.13",
            "fd00:9::13",
            "52:17:43:ba:2e:56",
            "52:17:43:ba:2e:66",
        );
        let v4 = s.desired(IpFamily::V4, Some(4), &ls, now).state;
        let v6 = s.desired(IpFamily::V6, Some(5), &ls, now).state;
        assert!(v4.routes.iter().any(|r| r.oif == 2));
        assert!(v6.routes.iter().all(|r| r.oif == 5));
    }

    #[test]
    fn host_gw_dual_stack_routes_via_each_familys_public_ip() {
        let mut s = dual_settings(false);
        s.backend = BackendSettings::HostGw;
        let lease = |key: &str, ip: &str, ip6: &str| Lease {
            key: key.parse().unwrap(),
            attrs: hostgw::lease_attrs_dual(Some(ip.parse().unwrap()), Some(ip6.parse().unwrap())),
            expiration: None,
        };
        let ls = vec![
            lease(
                "10.244.1.0-24&fd00:10:244:1::-64",
                "172.16.1.14",
                "fd00:1::14",
            ),
            lease(
                "10.244.2.0-24&fd00:10:244:2::-64",
                "172.16.1.13",
                "fd00:1::13",
            ),
            lease(
                "10.244.3.0-24&fd00:10:244:3::-64",
                "172.16.1.3",
                "fd00:7::3",
            ),
        ];
        let d = s.desired(IpFamily::V6, None, &ls, SystemTime::now());
        assert_eq!(
            d.state.routes,
            vec![Route {
                dst: "fd00:10:244:2::/64".parse().unwrap(),
                gateway: Some("fd00:1::13".parse().unwrap()),
                oif: 2,
                onlink: false,
            }]
        );
        assert_eq!(d.unreachable.len(), 1, "fd00:7::3 is not connected");
        let d4 = s.desired(IpFamily::V4, None, &ls, SystemTime::now());
        assert_eq!(d4.state.routes.len(), 2);
        assert!(d4.unreachable.is_empty());
    }

    #[test]
    fn relevant_notifications_in_dual_stack() {
        let s = dual_settings(false);
        let devs = PerFamily {
            v4: Some(4),
            v6: Some(5),
        };
        let route = |dst: &str| Notification::Route {
            dst: dst.parse().unwrap(),
            deleted: true,
            route: None,
        };
        assert!(is_relevant(&route("fd00:10:244:2::/64"), &s, devs));
        assert!(is_relevant(&route("10.244.2.0/24"), &s, devs));
        assert!(!is_relevant(&route("fd00:99::/64"), &s, devs));
        assert!(is_relevant(
            &Notification::Neighbour {
                ifindex: 5,
                ip: "fd00:10:244:2::".parse().unwrap(),
                deleted: true,
                mac: None,
                permanent: false,
            },
            &s,
            devs
        ));
        assert!(is_relevant(
            &Notification::Link {
                index: 9,
                name: "flannel-v6.1".into(),
                deleted: false
            },
            &s,
            devs
        ));
        // IPv4 only: IPv6 routes are not ours, a flannel-v6 leftover is.
        let v4 = settings();
        let one = PerFamily {
            v4: Some(4),
            v6: None,
        };
        assert!(!is_relevant(&route("fd00:10:244:2::/64"), &v4, one));
        assert!(is_relevant(
            &Notification::Link {
                index: 9,
                name: "flannel-v6.1".into(),
                deleted: false
            },
            &v4,
            one
        ));
    }
}
