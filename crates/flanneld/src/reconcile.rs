//! The level-triggered reconciler: one OS thread owns the `Netlink` handle
//! and makes the kernel match the leases.
//!
//! Every pass starts from scratch: ensure the vxlan device (recreating it
//! when it was deleted or has wrong attributes, always with the same
//! VtepMAC), or with host-gw remove any vxlan device left over from an
//! earlier run with vxlan; compute
//! the desired neighbours, FDB entries and routes from the current lease set,
//! read what the kernel actually holds, and apply the difference. Nothing is
//! remembered between passes except the lease set, so whatever changed the
//! kernel (an operator, a crash, a restart) is repaired by the next pass.
//! Routes of the other backend inside the cluster network are in scope too,
//! so switching backend on restart leaves nothing of the old one.
//!
//! Passes are triggered by lease changes, by netlink notifications about our
//! device or routes inside the cluster network (debounced: a burst of
//! notifications gives one pass), and by a timer.
//!
//! Apply order keeps every packet deliverable: FDB entry and neighbour are
//! added before the route that uses them, and a route is deleted before the
//! neighbour and FDB entry it used.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use flannel_core::datapath::{self, DesiredState, DirectRouting, HostGwPeer, Op, Route, Scope};
use flannel_core::lease::{IpFamily, Lease, LeaseKey};
use flannel_netlink::{Monitor, Netlink, Notification};
use ipnet::{IpNet, Ipv4Net};
use tokio::sync::oneshot;

use crate::backend::hostgw;
use crate::backend::udp::{self, UdpDatapath, UdpSpec};
use crate::backend::vxlan::{self, DeviceSpec};

/// How long a burst of netlink notifications is collected before one pass.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

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
}

/// What the reconciler needs to know about this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub backend: BackendSettings,
    /// The cluster network (`Network`).
    pub network: Ipv4Net,
    /// Our lease.
    pub own: LeaseKey,
    /// The external interface.
    pub external: ExternalSettings,
}

/// The backend in use and its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSettings {
    /// `flannel.<VNI>`; with `direct_routing` (the vxlan `DirectRouting`
    /// option) peers on a directly connected subnet of the external
    /// interface are routed to without encapsulation.
    Vxlan {
        spec: DeviceSpec,
        direct_routing: bool,
    },
    /// A route per peer via its PublicIP on the external interface.
    HostGw,
    /// The TUN device `flannel0` and the userspace datapath (backend/udp.rs).
    Udp(UdpSpec),
}

/// The external interface as the datapath needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalSettings {
    pub ifindex: u32,
    pub name: String,
    /// Its addresses with prefixes (the connected subnets).
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
    /// What this daemon owns in the kernel (flannel-core's [`Scope`]).
    ///
    /// Routes inside the network via a gateway on the external interface
    /// are ours with either backend: they are host-gw (or DirectRouting)
    /// routes, and a vxlan node that finds them after a switch from host-gw
    /// (or without DirectRouting any more) must delete them.
    pub fn scope(&self, device_ifindex: Option<u32>) -> Scope {
        Scope {
            network: IpNet::V4(self.network),
            own_subnet: self.own.ipv4.map(IpNet::V4),
            device_ifindex,
            external_ifindex: Some(self.external.ifindex),
        }
    }

    /// The state the kernel should hold for `leases`, with our vxlan device
    /// at `device_ifindex` (None with host-gw).
    pub fn desired(
        &self,
        device_ifindex: Option<u32>,
        leases: &[Lease],
        now: SystemTime,
    ) -> Desired {
        match &self.backend {
            BackendSettings::Vxlan {
                spec,
                direct_routing,
            } => {
                let Some(ifindex) = device_ifindex else {
                    return Desired::default();
                };
                let peers = datapath::vxlan_peers(
                    leases,
                    Some(&self.own),
                    spec.device.vni,
                    IpFamily::V4,
                    now,
                );
                let direct = direct_routing.then(|| DirectRouting {
                    external_ifindex: self.external.ifindex,
                    connected: &self.external.connected,
                });
                Desired {
                    peers: peers.len(),
                    state: datapath::desired_vxlan_with(ifindex, &peers, direct.as_ref()),
                    unreachable: Vec::new(),
                }
            }
            BackendSettings::HostGw => {
                let peers = datapath::host_gw_peers(leases, Some(&self.own), IpFamily::V4, now);
                match datapath::desired_host_gw(
                    self.external.ifindex,
                    &peers,
                    &self.external.connected,
                ) {
                    Ok(state) => Desired {
                        peers: peers.len(),
                        state,
                        unreachable: Vec::new(),
                    },
                    Err(e) => Desired {
                        peers: peers.len() - e.not_connected.len(),
                        state: e.partial,
                        unreachable: e.not_connected,
                    },
                }
            }
            // Peers live in the datapath's table, not in the kernel: no
            // per-peer route, so any route of ours inside the network
            // (host-gw or vxlan leftovers) is stale.
            BackendSettings::Udp(_) => Desired {
                peers: flannel_core::udp::udp_peers(leases, Some(&self.own), now).len(),
                ..Desired::default()
            },
        }
    }

    /// The vxlan device's name, if the backend has one.
    fn device_name(&self) -> Option<&str> {
        match &self.backend {
            BackendSettings::Vxlan { spec, .. } => Some(&spec.device.name),
            BackendSettings::HostGw => None,
            BackendSettings::Udp(spec) => Some(&spec.device),
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Index of the vxlan device after the pass (None with host-gw, or if
    /// it could not be set up).
    pub ifindex: Option<u32>,
    /// Number of peers programmed.
    pub peers: usize,
    /// Number of kernel writes made.
    pub changes: usize,
    /// Every failure; the pass went on after each.
    pub errors: Vec<String>,
    /// Set when the device itself could not be set up.
    pub device_error: Option<String>,
}

/// Requests to the reconciler thread.
#[derive(Debug)]
pub enum Request {
    /// The complete current lease set; a pass follows.
    Leases(Vec<Lease>),
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
    pub fn start(settings: Settings, leases: Vec<Lease>) -> Result<Self, ReconcileError> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("reconcile".into())
            .spawn(move || match Netlink::open() {
                Ok(nl) => {
                    let _ = ready_tx.send(Ok(()));
                    Worker {
                        nl,
                        settings,
                        leases,
                        ifindex: None,
                        unreachable: Vec::new(),
                        udp: None,
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
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(ReconcileError::Open(e)),
            Err(_) => return Err(ReconcileError::Stopped),
        }
        let mon_tx = tx.clone();
        std::thread::Builder::new()
            .name("netlink-monitor".into())
            .spawn(move || monitor_loop(mon_tx))
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

/// Forwards kernel notifications to the reconciler; reopens the socket after
/// an error (ENOBUFS included: the reconciler is told to resync).
fn monitor_loop(tx: mpsc::Sender<Request>) {
    loop {
        let mut mon = match Monitor::open() {
            Ok(m) => m,
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
    leases: Vec<Lease>,
    /// The device's index as of the last pass.
    ifindex: Option<u32>,
    /// host-gw peers without a route as of the last pass (logged on change).
    unreachable: Vec<HostGwPeer>,
    /// The udp backend's running datapath (threads stop when it drops).
    udp: Option<UdpDatapath>,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        // When a pass is due; None: idle.
        let mut due: Option<Instant> = None;
        let mut waiters: Vec<oneshot::Sender<PassReport>> = Vec::new();
        loop {
            let msg = match due {
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            };
            let now = Instant::now();
            match msg {
                Ok(Request::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Ok(Request::Leases(l)) => {
                    self.leases = l;
                    due = Some(now);
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
                    if let Some(n) = ns.iter().find(|n| self.relevant(n)) {
                        tracing::debug!(notification = ?n, "kernel change on our datapath");
                        // The first notification of a burst starts the clock;
                        // later ones ride along.
                        let at = now + DEBOUNCE;
                        due = Some(due.map_or(at, |d| d.min(at)));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let report = self.pass();
                    for w in waiters.drain(..) {
                        let _ = w.send(report.clone());
                    }
                    due = None;
                }
            }
        }
    }

    fn relevant(&self, n: &Notification) -> bool {
        is_relevant(n, &self.settings, self.ifindex)
    }

    /// One full reconciliation pass.
    fn pass(&mut self) -> PassReport {
        let started = Instant::now();
        let mut report = PassReport::default();
        if !matches!(self.settings.backend, BackendSettings::Udp(_)) {
            self.udp = None;
            match udp::remove_udp_leftovers(&mut self.nl) {
                Ok(changes) => {
                    for c in &changes {
                        tracing::info!("{c}");
                    }
                    report.changes += changes.len();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retrying on the next pass");
                    report.errors.push(e.to_string());
                }
            }
        }
        let device = match &self.settings.backend {
            BackendSettings::Vxlan { spec, .. } => match vxlan::ensure_device(&mut self.nl, spec) {
                Ok((link, changes)) => {
                    for c in &changes {
                        tracing::info!("{c}");
                    }
                    report.changes += changes.len();
                    Some(link.index)
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot set up the vxlan device; retrying on the next pass");
                    report.device_error = Some(e.to_string());
                    report.errors.push(e.to_string());
                    self.ifindex = None;
                    return report;
                }
            },
            BackendSettings::HostGw => {
                match hostgw::remove_vxlan_leftovers(&mut self.nl) {
                    Ok(changes) => {
                        for c in &changes {
                            tracing::info!("{c}");
                        }
                        report.changes += changes.len();
                    }
                    // The routes are still right: `replace` takes over a
                    // leftover vxlan route to the same subnet.
                    Err(e) => {
                        tracing::warn!(error = %e, "retrying on the next pass");
                        report.errors.push(e.to_string());
                    }
                }
                None
            }
            BackendSettings::Udp(spec) => {
                match hostgw::remove_vxlan_leftovers(&mut self.nl) {
                    Ok(changes) => {
                        for c in &changes {
                            tracing::info!("{c}");
                        }
                        report.changes += changes.len();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "retrying on the next pass");
                        report.errors.push(e.to_string());
                    }
                }
                match UdpDatapath::ensure(&mut self.udp, &mut self.nl, spec) {
                    Ok((ifindex, changes)) => {
                        for c in &changes {
                            tracing::info!("{c}");
                        }
                        report.changes += changes.len();
                        let dp = self.udp.as_ref().expect("ensured");
                        let table = udp::peer_table(
                            spec.network,
                            &self.leases,
                            &self.settings.own,
                            SystemTime::now(),
                        );
                        if dp.set_peers(table) {
                            let peers: Vec<String> = dp
                                .peers()
                                .iter()
                                .map(|p| format!("{} via {}", p.subnet, p.public_ip))
                                .collect();
                            tracing::info!(peers = ?peers, "udp peer table updated");
                        }
                        Some(ifindex)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot set up the udp datapath; retrying on the next pass");
                        report.device_error = Some(e.to_string());
                        report.errors.push(e.to_string());
                        self.ifindex = None;
                        return report;
                    }
                }
            }
        };
        self.ifindex = device;
        report.ifindex = device;

        let want = self
            .settings
            .desired(device, &self.leases, SystemTime::now());
        self.note_unreachable(&want.unreachable, &mut report);
        let npeers = want.peers;
        let want = want.state;
        let actual = match self.read_actual(device) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the datapath back; retrying on the next pass");
                report.errors.push(e.to_string());
                return report;
            }
        };
        let plan = datapath::plan_reconcile(&want, &actual);
        let name = self.settings.device_name().unwrap_or("-").to_string();
        let show = |r: &Route| show_route(r, &self.settings, device);
        for op in plan.ops() {
            let (what, r) = match &op {
                Op::DelRoute(r) => (
                    format!("deleted stale route {}", show(r)),
                    self.nl.del_route(r),
                ),
                Op::AddFdb(f) => (
                    format!("added fdb {} dst {} dev {name}", f.mac, f.dst),
                    self.nl.replace_fdb(f),
                ),
                Op::AddNeighbour(n) => (
                    format!("added neighbour {} lladdr {} dev {name}", n.ip, n.mac),
                    self.nl.replace_neighbour(n),
                ),
                Op::AddRoute(r) => (format!("added route {}", show(r)), self.nl.replace_route(r)),
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
                    tracing::info!("{what}");
                    report.changes += 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "failed: {what}");
                    report.errors.push(format!("{what}: {e}"));
                }
            }
        }
        tracing::debug!(
            peers = npeers,
            changes = report.changes,
            errors = report.errors.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "reconciliation pass done"
        );
        report
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

    /// What the kernel holds of ours ([`Settings::scope`]).
    fn read_actual(&mut self, device: Option<u32>) -> flannel_netlink::Result<DesiredState> {
        let mut all = DesiredState {
            routes: self.nl.list_routes()?,
            ..DesiredState::default()
        };
        if let Some(ifindex) = device {
            all.neighbours = self.nl.list_neighbours(ifindex)?;
            all.fdb = self.nl.list_fdb(ifindex)?;
        }
        Ok(self.settings.scope(device).filter(all))
    }
}

/// A route as `ip route` prints it, with our devices named.
fn show_route(r: &Route, s: &Settings, device: Option<u32>) -> String {
    let mut out = r.dst.to_string();
    if let Some(gw) = r.gateway {
        out.push_str(&format!(" via {gw}"));
    }
    match (device, s.device_name()) {
        (Some(i), Some(dev)) if i == r.oif => out.push_str(&format!(" dev {dev}")),
        _ if r.oif == s.external.ifindex => out.push_str(&format!(" dev {}", s.external.name)),
        _ => out.push_str(&format!(" dev index {}", r.oif)),
    }
    if r.onlink {
        out.push_str(" onlink");
    }
    out
}

/// Whether a kernel notification may concern our datapath: our device (by
/// index or name; with host-gw, any `flannel.<VNI>` leftover), the underlay
/// interface, addresses on our device, routes
/// inside the cluster network, neighbour/FDB entries on our device, and
/// anything unknown (e.g. lost notifications).
pub fn is_relevant(n: &Notification, s: &Settings, ifindex: Option<u32>) -> bool {
    let ours = |i: &u32| Some(*i) == ifindex;
    #[allow(unreachable_patterns)]
    match n {
        Notification::Link { index, name, .. } => {
            ours(index)
                || *index == s.external.ifindex
                || match &s.backend {
                    BackendSettings::Vxlan { spec, .. } => *name == spec.device.name,
                    // A vxlan leftover to remove.
                    BackendSettings::HostGw => hostgw::may_be_leftover_name(name),
                    BackendSettings::Udp(spec) => {
                        *name == spec.device || hostgw::may_be_leftover_name(name)
                    }
                }
                // A udp leftover to remove.
                || (!matches!(s.backend, BackendSettings::Udp(_)) && name == flannel_core::wire::UDP_TUN_DEVICE)
        }
        Notification::Route { dst, .. } => match dst {
            IpNet::V4(d) => s.network.contains(d),
            IpNet::V6(_) => false,
        },
        Notification::Neighbour { ifindex, .. } | Notification::Fdb { ifindex, .. } => {
            ours(ifindex)
        }
        Notification::Address { index, .. } => ours(index),
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
                spec: DeviceSpec {
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
                },
                direct_routing: false,
            },
            network: "10.244.0.0/16".parse().unwrap(),
            own: "10.244.1.0-24".parse().unwrap(),
            external: external(),
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
        } = settings().desired(Some(4), &leases(), SystemTime::now());
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
        let d = s.desired(Some(4), &leases(), SystemTime::now()).state;
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
        assert!(s.scope(Some(4)).owns_route(&direct));
        assert!(settings().scope(Some(4)).owns_route(&direct));
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
                .desired(Some(4), &leases(), SystemTime::now())
                .state,
            &settings().scope(Some(4)).filter(DesiredState {
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
        let d = s.desired(None, &ls, SystemTime::now());
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
        let sc = s.scope(None);
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
            None
        ));
        assert!(!is_relevant(
            &Notification::Link {
                index: 9,
                name: "veth1".into(),
                deleted: false
            },
            &hg,
            None
        ));
        let s = settings();
        let yes = |n: Notification| assert!(is_relevant(&n, &s, Some(4)), "{n:?}");
        let no = |n: Notification| assert!(!is_relevant(&n, &s, Some(4)), "{n:?}");
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
        });
        no(Notification::Route {
            dst: "192.168.0.0/24".parse().unwrap(),
            deleted: true,
        });
        yes(Notification::Neighbour {
            ifindex: 4,
            ip: "10.244.2.0".parse().unwrap(),
            deleted: true,
        });
        no(Notification::Neighbour {
            ifindex: 2,
            ip: "172.16.1.1".parse().unwrap(),
            deleted: false,
        });
        yes(Notification::Fdb {
            ifindex: 4,
            mac: Default::default(),
            deleted: true,
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
}
