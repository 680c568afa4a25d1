//! The level-triggered reconciler: one OS thread owns the `Netlink` handle
//! and makes the kernel match the leases.
//!
//! Every pass starts from scratch: ensure the device (recreating it when it
//! was deleted or has wrong attributes, always with the same VtepMAC), compute
//! the desired neighbours, FDB entries and routes from the current lease set,
//! read what the kernel actually holds, and apply the difference. Nothing is
//! remembered between passes except the lease set, so whatever changed the
//! kernel (an operator, a crash, a restart) is repaired by the next pass.
//!
//! Passes are triggered by lease changes, by netlink notifications about our
//! device or routes inside the cluster network (debounced: a burst of
//! notifications gives one pass), and by a timer.
//!
//! Apply order keeps every packet deliverable: FDB entry and neighbour are
//! added before the route that uses them, and a route is deleted before the
//! neighbour and FDB entry it used.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use flannel_core::datapath::{FdbEntry, Neighbour, Route};
use flannel_core::lease::{Lease, LeaseKey};
use flannel_core::mac::MacAddr;
use flannel_netlink::{Monitor, Netlink, Notification};
use ipnet::{IpNet, Ipv4Net};
use tokio::sync::oneshot;

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
    pub spec: DeviceSpec,
    /// The cluster network (`Network`).
    pub network: Ipv4Net,
    /// Our lease.
    pub own: LeaseKey,
}

impl Settings {
    fn own_subnet(&self) -> Option<Ipv4Net> {
        self.own.ipv4
    }
}

/// A remote node as the vxlan datapath needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub vtep_mac: MacAddr,
}

/// The vxlan peers among `leases`: every lease except ours that is a vxlan
/// lease of our VNI with a PublicIP, an IPv4 subnet inside the network and
/// parseable BackendData, and is not expired.
pub fn peers(leases: &[Lease], s: &Settings, now: SystemTime) -> Vec<Peer> {
    let mut out: Vec<Peer> = leases
        .iter()
        .filter(|l| l.key != s.own)
        .filter(|l| l.expiration.is_none_or(|e| e > now))
        .filter_map(|l| {
            let subnet = l.key.ipv4?;
            if !s.network.contains(&subnet) || Some(subnet) == s.own_subnet() {
                return None;
            }
            let mac = vxlan::lease_vtep_mac(&l.attrs, s.spec.device.vni)?;
            Some(Peer {
                subnet,
                public_ip: l.attrs.public_ip?,
                vtep_mac: mac,
            })
        })
        .collect();
    out.sort_by_key(|p| p.subnet);
    out
}

/// The kernel state the vxlan datapath wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neighbour>,
    pub fdb: Vec<FdbEntry>,
}

/// Per peer, the triple of flannel-compat.md: neighbour (subnet network
/// address -> VtepMAC), FDB (VtepMAC -> PublicIP), route (subnet via its
/// network address dev flannel.VNI onlink).
pub fn desired(ifindex: u32, peers: &[Peer]) -> Desired {
    let mut d = Desired::default();
    for p in peers {
        let gw = IpAddr::V4(p.subnet.network());
        d.neighbours.push(Neighbour {
            ifindex,
            ip: gw,
            mac: p.vtep_mac,
        });
        d.fdb.push(FdbEntry {
            ifindex,
            mac: p.vtep_mac,
            dst: IpAddr::V4(p.public_ip),
        });
        d.routes.push(Route {
            dst: IpNet::V4(p.subnet),
            gateway: Some(gw),
            oif: ifindex,
            onlink: true,
        });
    }
    d
}

/// The kernel state we consider ours, read back: routes whose destination is
/// inside the cluster network (but not our own subnet) through our device,
/// and every permanent neighbour and every FDB entry with a destination on
/// our device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actual {
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neighbour>,
    pub fdb: Vec<FdbEntry>,
}

/// The writes of one pass, in the order they are applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub del_routes: Vec<Route>,
    pub add_fdb: Vec<FdbEntry>,
    pub add_neighbours: Vec<Neighbour>,
    pub add_routes: Vec<Route>,
    pub del_neighbours: Vec<Neighbour>,
    pub del_fdb: Vec<FdbEntry>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn len(&self) -> usize {
        self.del_routes.len()
            + self.add_fdb.len()
            + self.add_neighbours.len()
            + self.add_routes.len()
            + self.del_neighbours.len()
            + self.del_fdb.len()
    }
}

/// What must change to go from `actual` to `desired`.
///
/// Replace semantics decide what is deleted: a route is keyed by its
/// destination and a neighbour by its IP, so an entry whose key is still
/// desired is overwritten by the replace and must not be deleted (the delete
/// would remove the fresh entry). FDB entries are deleted by exact
/// MAC + destination, which never touches the desired one.
pub fn plan(desired: &Desired, actual: &Actual) -> Plan {
    fn missing<T: Ord + Clone>(want: &[T], have: &[T]) -> Vec<T> {
        let have: BTreeSet<&T> = have.iter().collect();
        want.iter().filter(|w| !have.contains(w)).cloned().collect()
    }
    let want_dsts: BTreeSet<IpNet> = desired.routes.iter().map(|r| r.dst).collect();
    let want_ips: BTreeSet<IpAddr> = desired.neighbours.iter().map(|n| n.ip).collect();
    let want_fdb: BTreeSet<&FdbEntry> = desired.fdb.iter().collect();
    Plan {
        del_routes: actual
            .routes
            .iter()
            .filter(|r| !want_dsts.contains(&r.dst))
            .cloned()
            .collect(),
        add_fdb: missing(&desired.fdb, &actual.fdb),
        add_neighbours: missing(&desired.neighbours, &actual.neighbours),
        add_routes: missing(&desired.routes, &actual.routes),
        del_neighbours: actual
            .neighbours
            .iter()
            .filter(|n| !want_ips.contains(&n.ip))
            .cloned()
            .collect(),
        del_fdb: actual
            .fdb
            .iter()
            .filter(|f| !want_fdb.contains(f))
            .cloned()
            .collect(),
    }
}

/// Filters a route dump down to the routes this daemon manages.
pub fn managed_routes(all: Vec<Route>, s: &Settings, ifindex: u32) -> Vec<Route> {
    all.into_iter()
        .filter(|r| match r.dst {
            IpNet::V4(d) => r.oif == ifindex && s.network.contains(&d) && Some(d) != s.own_subnet(),
            IpNet::V6(_) => false,
        })
        .collect()
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Index of the device after the pass (None if it could not be set up).
    pub ifindex: Option<u32>,
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
        let ours = |i: &u32| Some(*i) == self.ifindex;
        #[allow(unreachable_patterns)]
        match n {
            Notification::Link { index, name, .. } => {
                ours(index)
                    || *name == self.settings.spec.device.name
                    || *index == self.settings.spec.device.underlay_index
            }
            Notification::Route { dst, .. } => match dst {
                IpNet::V4(d) => self.settings.network.contains(d),
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

    /// One full reconciliation pass.
    fn pass(&mut self) -> PassReport {
        let started = Instant::now();
        let mut report = PassReport::default();
        let name = self.settings.spec.device.name.clone();
        let link = match vxlan::ensure_device(&mut self.nl, &self.settings.spec) {
            Ok((link, changes)) => {
                for c in &changes {
                    tracing::info!("{c}");
                }
                report.changes += changes.len();
                link
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the vxlan device; retrying on the next pass");
                report.device_error = Some(e.to_string());
                report.errors.push(e.to_string());
                self.ifindex = None;
                return report;
            }
        };
        let ifindex = link.index;
        self.ifindex = Some(ifindex);
        report.ifindex = Some(ifindex);

        let peers = peers(&self.leases, &self.settings, SystemTime::now());
        let want = desired(ifindex, &peers);
        let actual = match self.read_actual(ifindex) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the datapath back; retrying on the next pass");
                report.errors.push(e.to_string());
                return report;
            }
        };
        let p = plan(&want, &actual);
        let nl = &mut self.nl;
        let mut apply = |what: String, r: flannel_netlink::Result<()>| match r {
            Ok(()) => {
                tracing::info!("{what}");
                report.changes += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, "failed: {what}");
                report.errors.push(format!("{what}: {e}"));
            }
        };
        for r in &p.del_routes {
            apply(
                format!("deleted stale route {}", show_route(r, &name)),
                nl.del_route(r),
            );
        }
        for f in &p.add_fdb {
            apply(
                format!("added fdb {} dst {} dev {name}", f.mac, f.dst),
                nl.replace_fdb(f),
            );
        }
        for n in &p.add_neighbours {
            apply(
                format!("added neighbour {} lladdr {} dev {name}", n.ip, n.mac),
                nl.replace_neighbour(n),
            );
        }
        for r in &p.add_routes {
            apply(
                format!("added route {}", show_route(r, &name)),
                nl.replace_route(r),
            );
        }
        for n in &p.del_neighbours {
            apply(
                format!(
                    "deleted stale neighbour {} lladdr {} dev {name}",
                    n.ip, n.mac
                ),
                nl.del_neighbour(n),
            );
        }
        for f in &p.del_fdb {
            apply(
                format!("deleted stale fdb {} dst {} dev {name}", f.mac, f.dst),
                nl.del_fdb(f),
            );
        }
        tracing::debug!(
            peers = peers.len(),
            changes = report.changes,
            errors = report.errors.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "reconciliation pass done"
        );
        report
    }

    fn read_actual(&mut self, ifindex: u32) -> flannel_netlink::Result<Actual> {
        Ok(Actual {
            routes: managed_routes(self.nl.list_routes()?, &self.settings, ifindex),
            neighbours: self.nl.list_neighbours(ifindex)?,
            fdb: self.nl.list_fdb(ifindex)?,
        })
    }
}

fn show_route(r: &Route, dev: &str) -> String {
    let mut s = r.dst.to_string();
    if let Some(gw) = r.gateway {
        s.push_str(&format!(" via {gw}"));
    }
    s.push_str(&format!(" dev {dev}"));
    if r.onlink {
        s.push_str(" onlink");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::vxlan::lease_attrs;
    use flannel_netlink::VxlanDevice;

    fn settings() -> Settings {
        Settings {
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
            network: "10.244.0.0/16".parse().unwrap(),
            own: key("10.244.1.0/24"),
        }
    }

    fn key(s: &str) -> LeaseKey {
        LeaseKey {
            ipv4: Some(s.parse().unwrap()),
            ipv6: None,
        }
    }

    fn lease(subnet: &str, ip: &str, mac: &str, vni: u32) -> Lease {
        Lease {
            key: key(subnet),
            attrs: lease_attrs(ip.parse().unwrap(), vni, mac.parse().unwrap()),
            expiration: None,
        }
    }

    #[test]
    fn peers_skip_own_foreign_and_malformed_leases() {
        let now = SystemTime::now();
        let mut expired = lease("10.244.5.0/24", "172.16.1.5", "02:00:00:00:00:05", 1);
        expired.expiration = Some(now - Duration::from_secs(1));
        let mut hostgw = lease("10.244.6.0/24", "172.16.1.6", "02:00:00:00:00:06", 1);
        hostgw.attrs.backend_type = "host-gw".into();
        let mut garbage = lease("10.244.7.0/24", "172.16.1.7", "02:00:00:00:00:07", 1);
        garbage.attrs.backend_data = Some(serde_json::json!({"VNI": 1, "VtepMAC": "nope"}));
        let leases = vec![
            lease("10.244.1.0/24", "172.16.1.14", "02:00:00:00:00:01", 1),
            lease("10.244.3.0/24", "172.16.1.13", "02:00:00:00:00:03", 1),
            lease("10.244.2.0/24", "172.16.1.12", "02:00:00:00:00:02", 1),
            lease("10.244.4.0/24", "172.16.1.4", "02:00:00:00:00:04", 2),
            lease("10.99.0.0/24", "172.16.1.9", "02:00:00:00:00:09", 1),
            expired,
            hostgw,
            garbage,
        ];
        let p = peers(&leases, &settings(), now);
        let subnets: Vec<String> = p.iter().map(|p| p.subnet.to_string()).collect();
        assert_eq!(subnets, vec!["10.244.2.0/24", "10.244.3.0/24"]);
        assert_eq!(p[0].public_ip, Ipv4Addr::new(172, 16, 1, 12));
    }

    #[test]
    fn desired_is_the_upstream_triple() {
        let p = Peer {
            subnet: "10.244.2.0/24".parse().unwrap(),
            public_ip: "172.16.1.13".parse().unwrap(),
            vtep_mac: "52:17:43:ba:2e:56".parse().unwrap(),
        };
        let d = desired(4, &[p]);
        assert_eq!(
            d.neighbours,
            vec![Neighbour {
                ifindex: 4,
                ip: "10.244.2.0".parse().unwrap(),
                mac: "52:17:43:ba:2e:56".parse().unwrap()
            }]
        );
        assert_eq!(
            d.fdb,
            vec![FdbEntry {
                ifindex: 4,
                mac: "52:17:43:ba:2e:56".parse().unwrap(),
                dst: "172.16.1.13".parse().unwrap()
            }]
        );
        assert_eq!(
            d.routes,
            vec![Route {
                dst: "10.244.2.0/24".parse().unwrap(),
                gateway: Some("10.244.2.0".parse().unwrap()),
                oif: 4,
                onlink: true
            }]
        );
    }

    fn peer(n: u8, mac_last: u8) -> Peer {
        Peer {
            subnet: format!("10.244.{n}.0/24").parse().unwrap(),
            public_ip: Ipv4Addr::new(172, 16, 1, n),
            vtep_mac: MacAddr([2, 0, 0, 0, 0, mac_last]),
        }
    }

    #[test]
    fn plan_is_empty_when_in_sync() {
        let d = desired(4, &[peer(2, 2), peer(3, 3)]);
        let a = Actual {
            routes: d.routes.clone(),
            neighbours: d.neighbours.clone(),
            fdb: d.fdb.clone(),
        };
        assert!(plan(&d, &a).is_empty());
    }

    #[test]
    fn plan_adds_missing_and_deletes_stale() {
        let d = desired(4, &[peer(2, 2), peer(3, 3)]);
        let old = desired(4, &[peer(2, 2), peer(9, 9)]);
        let a = Actual {
            routes: old.routes.clone(),
            neighbours: old.neighbours.clone(),
            fdb: old.fdb.clone(),
        };
        let p = plan(&d, &a);
        assert_eq!(p.add_routes, vec![d.routes[1].clone()]);
        assert_eq!(p.add_neighbours, vec![d.neighbours[1].clone()]);
        assert_eq!(p.add_fdb, vec![d.fdb[1].clone()]);
        assert_eq!(p.del_routes, vec![old.routes[1].clone()]);
        assert_eq!(p.del_neighbours, vec![old.neighbours[1].clone()]);
        assert_eq!(p.del_fdb, vec![old.fdb[1].clone()]);
    }

    #[test]
    fn changed_mac_is_replaced_not_deleted() {
        // Peer 2 restarted with a new VtepMAC: the neighbour with the same IP
        // is overwritten by replace, never deleted (deleting by IP would
        // remove the fresh entry). The old FDB entry is deleted exactly.
        let d = desired(4, &[peer(2, 0x22)]);
        let old = desired(4, &[peer(2, 2)]);
        let a = Actual {
            routes: old.routes.clone(),
            neighbours: old.neighbours.clone(),
            fdb: old.fdb.clone(),
        };
        let p = plan(&d, &a);
        assert!(p.del_routes.is_empty() && p.add_routes.is_empty());
        assert_eq!(p.add_neighbours, d.neighbours);
        assert!(p.del_neighbours.is_empty());
        assert_eq!(p.add_fdb, d.fdb);
        assert_eq!(p.del_fdb, old.fdb);
    }

    #[test]
    fn managed_routes_scope() {
        let s = settings();
        let r = |dst: &str, oif| Route {
            dst: dst.parse().unwrap(),
            gateway: None,
            oif,
            onlink: false,
        };
        let all = vec![
            r("10.244.2.0/24", 4),
            r("10.244.1.0/24", 4),  // our own subnet: not ours to manage
            r("10.244.3.0/24", 9),  // another device (cni0)
            r("192.168.0.0/24", 4), // outside the network
            r("0.0.0.0/0", 2),
        ];
        assert_eq!(managed_routes(all, &s, 4), vec![r("10.244.2.0/24", 4)]);
    }
}
