//! `flannelctl lab chaos`, its runner: the plan of `chaos.rs` applied to a
//! running lab while the prober (`probe.rs`) pings every pod from every
//! pod. Each fault gets a window: the fault, the wait until every node's
//! kernel holds the expected state again (`tables.rs`), half a second of
//! calm; probes count in the window they were sent in, and a window is
//! judged once its last probe has had its [`PROBE_TIMEOUT`].

use std::time::{Duration, Instant, SystemTime};

use flannel_core::mac::MacAddr;
use flannel_netlink::Netlink;
use ipnet::IpNet;

use super::chaos::{self, ChaosReport, Fault, PlanContext, WindowResult};
use super::probe::{Prober, PROBE_TIMEOUT};
use super::store::vxlan_data;
use super::tables::{self, CNI_BRIDGE};
use super::{check_interrupted, io_err, nl_err, Backend, Family, Lab, LabError, Result, StoreKind};

/// What `lab chaos` runs.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Planned length of the run (the faults' estimated costs add up to it).
    pub minutes: f64,
    /// The plan's seed (None: from the clock; printed either way).
    pub seed: Option<u64>,
}

/// Calm after each repair, inside the fault's window.
const CALM: Duration = Duration::from_millis(500);
/// The quiet window before the first fault (it must lose nothing).
const BASELINE: Duration = Duration::from_secs(3);
/// How long the lab may take to be converged before the run starts.
const START_BOUND: Duration = Duration::from_secs(30);

impl Lab {
    /// What the plan needs of this lab, or why `lab chaos` cannot run on it.
    pub fn chaos_context(&self) -> Result<PlanContext> {
        let st = &self.state;
        let refuse = |reason: String| {
            Err(LabError::InvalidOption {
                option: "lab chaos",
                reason,
            })
        };
        if st.family != Family::V4 {
            return refuse(format!(
                "lab {} is {}; the chaos prober and the kernel check are IPv4 only (make the lab without --ipv6/--dual-stack)",
                st.name, st.family
            ));
        }
        if !matches!(st.backend, Backend::Vxlan | Backend::HostGw) || st.direct_routing {
            return refuse(format!(
                "lab {} runs {}{}; lab chaos checks the kernel state of vxlan (without DirectRouting) and host-gw labs",
                st.name,
                st.backend,
                if st.direct_routing { " with DirectRouting" } else { "" }
            ));
        }
        if st.store == StoreKind::Kube {
            return refuse(format!(
                "lab {} uses --store kube; lab chaos runs on --store local or etcd labs",
                st.name
            ));
        }
        let pods = st.pods.iter().filter(|p| p.ip.is_some()).count();
        if pods < chaos::MIN_CHAOS_PODS {
            return refuse(format!(
                "lab {} has {pods} pods with an address; lab chaos needs at least {} (lab up --nodes 2)",
                st.name,
                chaos::MIN_CHAOS_PODS
            ));
        }
        Ok(PlanContext {
            backend: st.backend,
            store: st.store,
            topology: st.topology,
            nodes: st.nodes.iter().map(|n| n.index).collect(),
        })
    }

    /// Runs the chaos soak: prints the plan, then each window's line as it
    /// is judged (through `print`), and returns the report. Errors are the
    /// lab failing to do what a fault asks (a daemon that does not start,
    /// a node that cannot be added); a fault whose repair does not come,
    /// or costs pings it must not, is a failed window in the report.
    pub fn chaos(
        &mut self,
        opts: &ChaosOptions,
        print: &mut dyn FnMut(&str),
    ) -> Result<ChaosReport> {
        super::require_root()?;
        let ctx = self.chaos_context()?;
        let seed = opts.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 % 1_000_000)
                .unwrap_or(1)
        });
        let plan = chaos::plan(seed, opts.minutes, &ctx);
        print(&chaos::render_plan(seed, &plan));
        let start = Instant::now();
        if let (Err(e), _) = wait_converged(self, Instant::now(), START_BOUND) {
            return Err(LabError::InvalidOption {
                option: "lab chaos",
                reason: format!(
                    "lab {} is not converged before the run, after {} s: {e}",
                    self.name(),
                    START_BOUND.as_secs()
                ),
            });
        }
        let mut prober = Prober::new();
        for p in &self.state.pods {
            if let Some(ip) = p.ip {
                prober
                    .add_pod(&p.name, self.netns(&p.name)?, ip.addr())
                    .map_err(io_err(format!("starting the prober in {}", p.name)))?;
            }
        }
        let mut windows = Vec::new();
        let mut window_start = Instant::now();
        std::thread::sleep(BASELINE);
        let mut pending = Some((None, window_start, Instant::now(), Ok(Duration::ZERO), None));
        for fault in &plan {
            check_interrupted()?;
            window_start = pending.as_ref().map(|p| p.2).unwrap_or_else(Instant::now);
            let since = self.apply(fault, &mut prober)?;
            let (repair, slow) = wait_converged(self, since, fault.repair_bound());
            if let Fault::AddNode { node } = fault {
                // Probed from now on, not before its peers route it.
                for p in self.state.pods.iter().filter(|p| p.node == *node) {
                    if let Some(ip) = p.ip {
                        prober
                            .add_pod(&p.name, self.netns(&p.name)?, ip.addr())
                            .map_err(io_err(format!("starting the prober in {}", p.name)))?;
                    }
                }
            }
            std::thread::sleep(CALM);
            let window_end = Instant::now();
            // The previous window's probes have all resolved by now.
            if let Some(w) = pending.take() {
                windows.push(judge(&prober, w, windows.len(), print));
            }
            pending = Some((Some(fault.clone()), window_start, window_end, repair, slow));
        }
        std::thread::sleep(PROBE_TIMEOUT + Duration::from_millis(200));
        if let Some(w) = pending.take() {
            windows.push(judge(&prober, w, windows.len(), print));
        }
        prober.stop();
        Ok(ChaosReport {
            seed,
            minutes: opts.minutes,
            plan,
            windows,
            elapsed: start.elapsed(),
            probe_errors: prober.errors(),
        })
    }

    /// Applies one fault; returns when its repair is timed from.
    fn apply(&mut self, fault: &Fault, prober: &mut Prober) -> Result<Instant> {
        let ready = Duration::from_secs(30);
        let t = Instant::now();
        match fault {
            Fault::KillRestart { node } => {
                self.kill_daemon(node)?;
                self.start_daemon(node)?;
                self.wait_daemon_ready(node, Instant::now() + ready)?;
            }
            Fault::RollingRestart => {
                let nodes: Vec<String> = self.state.nodes.iter().map(|n| n.name.clone()).collect();
                for n in &nodes {
                    self.stop_daemon(n, Duration::from_secs(5))?;
                    self.start_daemon(n)?;
                    self.wait_daemon_ready(n, Instant::now() + ready)?;
                }
            }
            Fault::DeleteDevice { node } => {
                let dev = flannel_core::wire::vxlan_device_name(super::VNI);
                self.in_node(node, |nl| {
                    let link = nl.link_by_name(&dev)?.ok_or_else(|| {
                        flannel_netlink::Error::LinkNotFound {
                            op: "ip link del".into(),
                            name: dev.clone(),
                        }
                    })?;
                    nl.del_link(link.index)
                })?;
            }
            Fault::DeleteRoute { node, peer } => {
                let dst = IpNet::V4(self.node(peer)?.subnet);
                let t = tables::read(self, node)?;
                let r = find(
                    t.routes.iter().find(|r| r.dst == dst),
                    node,
                    "the route",
                    peer,
                )?;
                self.in_node(node, |nl| nl.del_route(&r))?;
            }
            Fault::DeleteNeighbour { node, peer } => {
                let ip = std::net::IpAddr::V4(self.node(peer)?.subnet.network());
                let t = tables::read(self, node)?;
                let n = find(
                    t.neighbours.iter().find(|n| n.ip == ip),
                    node,
                    "the neighbour",
                    peer,
                )?;
                self.in_node(node, |nl| nl.del_neighbour(&n))?;
            }
            Fault::DeleteFdbEntry { node, peer } => {
                let ip = std::net::IpAddr::V4(self.node(peer)?.underlay_ip);
                let t = tables::read(self, node)?;
                let e = find(
                    t.fdb.iter().find(|e| e.dst == ip),
                    node,
                    "the FDB entry",
                    peer,
                )?;
                self.in_node(node, |nl| nl.del_fdb(&e))?;
            }
            Fault::FlushFdb { node } => {
                let t = tables::read(self, node)?;
                self.in_node(node, |nl| t.fdb.iter().try_for_each(|e| nl.del_fdb(e)))?;
            }
            Fault::DeleteCni0Route { node } => {
                let own = IpNet::V4(self.node(node)?.subnet);
                self.in_node(node, |nl| {
                    let cni0 = nl.link_by_name(CNI_BRIDGE)?.ok_or_else(|| {
                        flannel_netlink::Error::LinkNotFound {
                            op: "ip route del dev".into(),
                            name: CNI_BRIDGE.into(),
                        }
                    })?;
                    for r in nl.list_routes()? {
                        if r.oif == cni0.index && r.dst == own {
                            nl.del_route(&r)?;
                        }
                    }
                    Ok(())
                })?;
            }
            Fault::StoreOutage { millis } => {
                let outage = Duration::from_millis(*millis);
                match self.state.store {
                    StoreKind::Local => {
                        self.set_local_store_read_only(true)?;
                        std::thread::sleep(outage);
                        self.set_local_store_read_only(false)?;
                    }
                    _ => {
                        self.stop_store()?;
                        std::thread::sleep(outage);
                        self.start_store()?;
                    }
                }
                // Nothing of the kernel changed: the repair is what follows the outage.
                return Ok(Instant::now());
            }
            Fault::AddNode { node } => {
                let added = self.add_node(Duration::from_secs(60))?;
                if added != *node {
                    return Err(LabError::BadState {
                        path: self.dir().join("lab.json").display().to_string(),
                        detail: format!("the plan expected {node} to join, the lab added {added}"),
                    });
                }
            }
            Fault::RemoveNode { node } => {
                let pods: Vec<String> = self
                    .state
                    .pods
                    .iter()
                    .filter(|p| p.node == *node)
                    .map(|p| p.name.clone())
                    .collect();
                for p in &pods {
                    prober.remove_pod(p);
                }
                self.remove_node(node, Duration::from_secs(20))?;
            }
            Fault::SwitchBackend { to } => {
                self.switch_backend(*to, false, Duration::from_secs(60))?;
            }
        }
        Ok(t)
    }

    fn in_node(
        &self,
        node: &str,
        f: impl FnOnce(&mut Netlink) -> flannel_netlink::Result<()> + Send,
    ) -> Result<()> {
        let ns = self.netns(node)?;
        let mut nl = Netlink::open_in(&ns).map_err(nl_err(format!("netlink in {node}")))?;
        f(&mut nl).map_err(nl_err(format!("injecting a fault on {node}")))
    }
}

fn find<T: Clone>(found: Option<&T>, node: &str, what: &str, peer: &str) -> Result<T> {
    found.cloned().ok_or_else(|| LabError::BadState {
        path: node.to_string(),
        detail: format!("{what} for {peer} is not there to delete"),
    })
}

/// A window waiting for its last probes: fault, start, end, repair, why slow.
type Pending = (
    Option<Fault>,
    Instant,
    Instant,
    std::result::Result<Duration, String>,
    Option<String>,
);

fn judge(
    prober: &Prober,
    (fault, start, end, repair, slow_because): Pending,
    number: usize,
    print: &mut dyn FnMut(&str),
) -> WindowResult {
    let w = WindowResult {
        fault,
        tally: chaos::tally(&prober.records(), &prober.names(), start, end),
        repair,
        slow_because,
    };
    print(&format!("{}\n", w.render(number)));
    w
}

/// Polls until [`converged`], returning the time since `since` (`Err` with
/// the last difference after `bound`) and, for a repair slower than
/// [`chaos::SLOW_REPAIR`], the last difference seen before it was over.
fn wait_converged(
    lab: &Lab,
    since: Instant,
    bound: Duration,
) -> (std::result::Result<Duration, String>, Option<String>) {
    let deadline = Instant::now() + bound;
    let mut last = None;
    loop {
        let diff = match converged(lab) {
            Ok(Ok(())) => {
                let took = since.elapsed();
                return (Ok(took), last.filter(|_| took > chaos::SLOW_REPAIR));
            }
            Ok(Err(e)) => e,
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return (Err(diff), None);
        }
        last = Some(diff);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every node's flanneld runs and is ready, every vxlan node's lease names
/// its device's MAC, and every node's kernel holds exactly the expected
/// state for the lab's other nodes (`tables::check_tables`), cni0's route
/// included.
pub(crate) fn converged(lab: &Lab) -> Result<std::result::Result<(), String>> {
    let mut all = Vec::new();
    for n in &lab.state.nodes {
        if !lab.daemon_alive(&n.name) {
            return Ok(Err(format!("flanneld on {} is not running", n.name)));
        }
        if lab.daemon_ready(&n.name) != Ok(true) {
            return Ok(Err(format!("flanneld on {} is not ready", n.name)));
        }
        all.push((n.name.clone(), tables::read(lab, &n.name)?));
    }
    let mut macs: Vec<(String, MacAddr)> = Vec::new();
    if lab.state.backend == Backend::Vxlan {
        let leases = match lab.leases() {
            Ok(l) => l,
            Err(e) => return Ok(Err(format!("reading the leases: {e}"))),
        };
        for (node, t) in &all {
            let Some((_, mac)) = t.device else {
                return Ok(Err(format!("{node}: flannel.1 is missing")));
            };
            let n = lab.node(node)?;
            let published = leases
                .iter()
                .find(|l| l.key == lab.state.lease_key(n))
                .and_then(|l| vxlan_data(&l.attrs))
                .map(|d| d.vtep_mac);
            if published != Some(mac) {
                return Ok(Err(format!(
                    "{node}: the lease's VtepMAC {published:?} is not flannel.1's {mac}"
                )));
            }
            macs.push((node.clone(), mac));
        }
    }
    for (node, t) in &all {
        if let Err(e) = tables::check_tables(lab, node, t, &macs)? {
            return Ok(Err(e));
        }
    }
    Ok(Ok(()))
}
