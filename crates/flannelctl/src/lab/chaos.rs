//! `flannelctl lab chaos`, its pure part: the fault plan (a seeded random
//! series of faults valid for the lab's backend, store and nodes), what
//! each fault may cost in lost probes and how long its repair may take,
//! the tally of the probes sent in a fault's window, and the verdict. The
//! runner (`chaos_run.rs`) applies the plan to a running lab.

use std::fmt;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::probe::{ProbeRecord, PROBE_INTERVAL};
use super::{node_name, Backend, StoreKind, Topology};

/// At most this many workers: node additions stop there.
pub const MAX_CHAOS_WORKERS: u32 = 5;
/// At least this many pods stay: node removals stop there.
pub const MIN_CHAOS_PODS: usize = 2;

/// One fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` of a node's flanneld, started again at once.
    KillRestart { node: String },
    /// Every flanneld stopped (SIGTERM) and started again, one node after the other.
    RollingRestart,
    /// `ip link del flannel.1` on a node.
    DeleteDevice { node: String },
    /// `ip route del <peer's subnet>` on a node.
    DeleteRoute { node: String, peer: String },
    /// `ip neigh del <peer's subnet address> dev flannel.1` on a node.
    DeleteNeighbour { node: String, peer: String },
    /// `bridge fdb del <peer's VtepMAC> dev flannel.1` on a node.
    DeleteFdbEntry { node: String, peer: String },
    /// Every FDB entry of flannel.1 on a node deleted.
    FlushFdb { node: String },
    /// `ip route del <own subnet> dev cni0` on a node.
    DeleteCni0Route { node: String },
    /// etcd stopped (`--store etcd`), or the local store's directory made
    /// read-only (`--store local`), for this long.
    StoreOutage { millis: u64 },
    /// `lab add-node`: the next worker joins.
    AddNode { node: String },
    /// `lab remove-node`: a worker and its pod leave.
    RemoveNode { node: String },
    /// `lab switch-backend`: every flanneld restarted on another backend.
    SwitchBackend { to: Backend },
}

/// The kinds of fault, in the order of [`Fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    KillRestart,
    RollingRestart,
    DeleteDevice,
    DeleteRoute,
    DeleteNeighbour,
    DeleteFdbEntry,
    FlushFdb,
    DeleteCni0Route,
    StoreOutage,
    AddNode,
    RemoveNode,
    SwitchBackend,
}

pub const ALL_KINDS: [FaultKind; 12] = [
    FaultKind::KillRestart,
    FaultKind::RollingRestart,
    FaultKind::DeleteDevice,
    FaultKind::DeleteRoute,
    FaultKind::DeleteNeighbour,
    FaultKind::DeleteFdbEntry,
    FaultKind::FlushFdb,
    FaultKind::DeleteCni0Route,
    FaultKind::StoreOutage,
    FaultKind::AddNode,
    FaultKind::RemoveNode,
    FaultKind::SwitchBackend,
];

/// How many probes a fault may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// Not one probe may be lost.
    None,
    /// Each pair may lose the probes of at most this long an outage.
    AtMost(Duration),
}

impl Loss {
    /// The most probes one pair may lose.
    pub fn max_per_pair(self) -> u64 {
        match self {
            Loss::None => 0,
            Loss::AtMost(d) => (d.as_millis() / PROBE_INTERVAL.as_millis()) as u64,
        }
    }
}

impl fmt::Display for Loss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Loss::None => f.write_str("0"),
            Loss::AtMost(_) => write!(f, "<= {} per pair", self.max_per_pair()),
        }
    }
}

impl Fault {
    pub fn kind(&self) -> FaultKind {
        match self {
            Fault::KillRestart { .. } => FaultKind::KillRestart,
            Fault::RollingRestart => FaultKind::RollingRestart,
            Fault::DeleteDevice { .. } => FaultKind::DeleteDevice,
            Fault::DeleteRoute { .. } => FaultKind::DeleteRoute,
            Fault::DeleteNeighbour { .. } => FaultKind::DeleteNeighbour,
            Fault::DeleteFdbEntry { .. } => FaultKind::DeleteFdbEntry,
            Fault::FlushFdb { .. } => FaultKind::FlushFdb,
            Fault::DeleteCni0Route { .. } => FaultKind::DeleteCni0Route,
            Fault::StoreOutage { .. } => FaultKind::StoreOutage,
            Fault::AddNode { .. } => FaultKind::AddNode,
            Fault::RemoveNode { .. } => FaultKind::RemoveNode,
            Fault::SwitchBackend { .. } => FaultKind::SwitchBackend,
        }
    }

    /// What the fault may cost. A restart, a store outage, a deleted
    /// neighbour (the kernel queues packets for the unresolved neighbour
    /// until flanneld writes it back) and a new node (probed once it is up)
    /// must cost nothing: flanneld leaves the kernel as it is while it is
    /// down. A deleted route or FDB entry is written back a few
    /// milliseconds later (measured 0.1-6 ms); a probe sent in that gap is
    /// lost, so each pair may lose one (a repair after the 150 ms debounce
    /// and a pass loses 2-3 and fails). A missing device, FDB table or
    /// cni0 route, a node leaving and a backend switch cut pairs off until
    /// the repair (or the new backend) is in place.
    pub fn expected_loss(&self) -> Loss {
        match self.kind() {
            FaultKind::KillRestart
            | FaultKind::RollingRestart
            | FaultKind::DeleteNeighbour
            | FaultKind::StoreOutage
            | FaultKind::AddNode => Loss::None,
            FaultKind::DeleteRoute | FaultKind::DeleteFdbEntry => Loss::AtMost(PROBE_INTERVAL),
            FaultKind::DeleteDevice | FaultKind::FlushFdb | FaultKind::DeleteCni0Route => {
                Loss::AtMost(Duration::from_secs(3))
            }
            FaultKind::RemoveNode => Loss::AtMost(Duration::from_secs(3)),
            FaultKind::SwitchBackend => Loss::AtMost(Duration::from_secs(15)),
        }
    }

    /// How long after the fault every node's kernel must hold the expected
    /// state again.
    pub fn repair_bound(&self) -> Duration {
        match self.kind() {
            FaultKind::AddNode | FaultKind::SwitchBackend => Duration::from_secs(60),
            FaultKind::RollingRestart => Duration::from_secs(60),
            _ => Duration::from_secs(20),
        }
    }

    /// A rough cost in wall time, for planning a run of M minutes: what
    /// each took in a two-worker lab on the local store, debug build, on
    /// two cores (the window's half second of calm included).
    pub fn estimated_cost(&self, nodes: usize) -> Duration {
        let secs = match self {
            Fault::KillRestart { .. } => 1.0,
            Fault::RollingRestart => 0.5 + 0.4 * nodes as f64,
            Fault::StoreOutage { millis } => *millis as f64 / 1000.0 + 1.5,
            Fault::AddNode { .. } => 2.5,
            Fault::RemoveNode { .. } => 1.0,
            Fault::SwitchBackend { .. } => 3.5,
            _ => 0.8,
        };
        Duration::from_secs_f64(secs)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::KillRestart { node } => write!(f, "kill -9 flanneld on {node}, start it again"),
            Fault::RollingRestart => f.write_str("rolling restart of every flanneld"),
            Fault::DeleteDevice { node } => write!(f, "ip link del flannel.1 on {node}"),
            Fault::DeleteRoute { node, peer } => {
                write!(f, "ip route del <{peer}'s subnet> on {node}")
            }
            Fault::DeleteNeighbour { node, peer } => {
                write!(
                    f,
                    "ip neigh del <{peer}'s subnet address> dev flannel.1 on {node}"
                )
            }
            Fault::DeleteFdbEntry { node, peer } => {
                write!(
                    f,
                    "bridge fdb del <{peer}'s VtepMAC> dev flannel.1 on {node}"
                )
            }
            Fault::FlushFdb { node } => write!(f, "every FDB entry of flannel.1 deleted on {node}"),
            Fault::DeleteCni0Route { node } => {
                write!(f, "ip route del <own subnet> dev cni0 on {node}")
            }
            Fault::StoreOutage { millis } => {
                write!(f, "store outage of {:.1} s", *millis as f64 / 1000.0)
            }
            Fault::AddNode { node } => write!(f, "lab add-node ({node})"),
            Fault::RemoveNode { node } => write!(f, "lab remove-node {node}"),
            Fault::SwitchBackend { to } => write!(f, "lab switch-backend {to}"),
        }
    }
}

/// What the plan needs to know of the lab, and follows through the plan
/// (nodes come and go, the backend changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanContext {
    pub backend: Backend,
    pub store: StoreKind,
    pub topology: Topology,
    /// Node indices (0: the master, which has no pod and holds the servers).
    pub nodes: Vec<u32>,
}

impl PlanContext {
    fn workers(&self) -> Vec<u32> {
        self.nodes.iter().copied().filter(|i| *i != 0).collect()
    }

    /// Whether a fault of `kind` can happen now.
    fn allows(&self, kind: FaultKind) -> bool {
        let vxlan = self.backend == Backend::Vxlan;
        match kind {
            FaultKind::KillRestart | FaultKind::RollingRestart | FaultKind::DeleteRoute => true,
            FaultKind::DeleteDevice
            | FaultKind::DeleteNeighbour
            | FaultKind::DeleteFdbEntry
            | FaultKind::FlushFdb => vxlan,
            FaultKind::DeleteCni0Route => !self.workers().is_empty(),
            FaultKind::StoreOutage => matches!(self.store, StoreKind::Local | StoreKind::Etcd),
            FaultKind::AddNode => (self.workers().len() as u32) < MAX_CHAOS_WORKERS,
            FaultKind::RemoveNode => self.workers().len() > MIN_CHAOS_PODS,
            // host-gw needs every node on one segment.
            FaultKind::SwitchBackend => self.topology == Topology::Flat,
        }
    }

    /// A fault of `kind` with its node(s) drawn from `rng`, applied to the context.
    fn draw(&mut self, kind: FaultKind, rng: &mut StdRng) -> Fault {
        let any = |rng: &mut StdRng, nodes: &[u32]| nodes[rng.random_range(0..nodes.len())];
        let node = any(rng, &self.nodes);
        let peer_of = |rng: &mut StdRng, me: u32| {
            let others: Vec<u32> = self.nodes.iter().copied().filter(|i| *i != me).collect();
            node_name(any(rng, &others))
        };
        match kind {
            FaultKind::KillRestart => Fault::KillRestart {
                node: node_name(node),
            },
            FaultKind::RollingRestart => Fault::RollingRestart,
            FaultKind::DeleteDevice => Fault::DeleteDevice {
                node: node_name(node),
            },
            FaultKind::DeleteRoute => Fault::DeleteRoute {
                node: node_name(node),
                peer: peer_of(rng, node),
            },
            FaultKind::DeleteNeighbour => Fault::DeleteNeighbour {
                node: node_name(node),
                peer: peer_of(rng, node),
            },
            FaultKind::DeleteFdbEntry => Fault::DeleteFdbEntry {
                node: node_name(node),
                peer: peer_of(rng, node),
            },
            FaultKind::FlushFdb => Fault::FlushFdb {
                node: node_name(node),
            },
            FaultKind::DeleteCni0Route => Fault::DeleteCni0Route {
                node: node_name(any(rng, &self.workers())),
            },
            FaultKind::StoreOutage => Fault::StoreOutage {
                millis: rng.random_range(2..=5) * 1000,
            },
            FaultKind::AddNode => {
                let next = self.nodes.iter().max().copied().unwrap_or(0) + 1;
                self.nodes.push(next);
                Fault::AddNode {
                    node: node_name(next),
                }
            }
            FaultKind::RemoveNode => {
                let gone = any(rng, &self.workers());
                self.nodes.retain(|i| *i != gone);
                Fault::RemoveNode {
                    node: node_name(gone),
                }
            }
            FaultKind::SwitchBackend => {
                self.backend = match self.backend {
                    Backend::Vxlan => Backend::HostGw,
                    _ => Backend::Vxlan,
                };
                Fault::SwitchBackend { to: self.backend }
            }
        }
    }
}

/// The faults of a run of about `minutes` from `seed`: first every kind the
/// lab allows once, in a seeded order ending with the backend switch (a
/// kind not possible yet, such as a removal before an addition, or a vxlan
/// fault in a host-gw lab before the switch, waits for the end of that
/// round), then
/// kinds drawn at random until the estimated time is spent. The same seed
/// and lab give the same series.
pub fn plan(seed: u64, minutes: f64, ctx: &PlanContext) -> Vec<Fault> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ctx = ctx.clone();
    let budget = Duration::from_secs_f64(minutes.max(0.0) * 60.0);
    let mut spent = Duration::ZERO;
    let mut out = Vec::new();
    fn take(f: Fault, nodes: usize, spent: &mut Duration, out: &mut Vec<Fault>) {
        *spent += f.estimated_cost(nodes);
        out.push(f);
    }
    // The backend switch ends the first round, so that the faults of the
    // first backend come before it and those only the other allows after.
    let mut round: Vec<FaultKind> = ALL_KINDS
        .iter()
        .copied()
        .filter(|k| *k != FaultKind::SwitchBackend)
        .collect();
    round.shuffle(&mut rng);
    round.push(FaultKind::SwitchBackend);
    let mut deferred = Vec::new();
    for kind in round {
        if spent >= budget && !out.is_empty() {
            return out;
        }
        if !ctx.allows(kind) {
            deferred.push(kind);
            continue;
        }
        let f = ctx.draw(kind, &mut rng);
        take(f, ctx.nodes.len(), &mut spent, &mut out);
    }
    for kind in deferred {
        if spent >= budget {
            return out;
        }
        if ctx.allows(kind) {
            let f = ctx.draw(kind, &mut rng);
            take(f, ctx.nodes.len(), &mut spent, &mut out);
        }
    }
    while spent < budget {
        let allowed: Vec<FaultKind> = ALL_KINDS
            .iter()
            .copied()
            .filter(|k| ctx.allows(*k))
            .collect();
        let kind = allowed[rng.random_range(0..allowed.len())];
        let f = ctx.draw(kind, &mut rng);
        take(f, ctx.nodes.len(), &mut spent, &mut out);
    }
    out
}

/// The probes sent in one window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub sent: u64,
    pub lost: u64,
    /// The pair that lost most, with its count: (from, to, lost).
    pub worst: Option<(String, String, u64)>,
    /// Answers with another TTL than 62 (pod to pod across nodes).
    pub wrong_ttl: u64,
}

/// Counts the probes sent in `[start, end)`; `names` resolves the records' pod indices.
pub fn tally(records: &[ProbeRecord], names: &[String], start: Instant, end: Instant) -> Tally {
    let mut t = Tally::default();
    let mut per_pair: std::collections::BTreeMap<(u16, u16), u64> = Default::default();
    for r in records
        .iter()
        .filter(|r| r.sent_at >= start && r.sent_at < end)
    {
        t.sent += 1;
        if !r.answered {
            t.lost += 1;
            *per_pair.entry((r.from, r.to)).or_default() += 1;
        } else if r.ttl != 62 {
            t.wrong_ttl += 1;
        }
    }
    let name = |i: u16| {
        names
            .get(usize::from(i))
            .cloned()
            .unwrap_or_else(|| format!("#{i}"))
    };
    t.worst = per_pair
        .into_iter()
        .max_by_key(|(pair, n)| (*n, std::cmp::Reverse(*pair)))
        .map(|((a, b), n)| (name(a), name(b), n));
    t
}

/// What happened in one fault's window (or the quiet baseline, `fault` None).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowResult {
    pub fault: Option<Fault>,
    pub tally: Tally,
    /// Time from the fault to every node's kernel state being the expected
    /// one; `Err` says what still differed when the bound passed.
    pub repair: Result<Duration, String>,
    /// For a repair slower than [`SLOW_REPAIR`]: the last difference seen
    /// while waiting for it.
    pub slow_because: Option<String>,
}

/// A repair that takes longer than this is shown with what kept it.
pub const SLOW_REPAIR: Duration = Duration::from_secs(2);

impl WindowResult {
    /// What is wrong with this window: pings lost where none may be, more
    /// lost than the bound, answers with another TTL, no convergence.
    pub fn problems(&self) -> Vec<String> {
        let mut v = Vec::new();
        let loss = self
            .fault
            .as_ref()
            .map(Fault::expected_loss)
            .unwrap_or(Loss::None);
        match loss {
            Loss::None if self.tally.lost > 0 => v.push(format!(
                "{} pings lost where none may be{}",
                self.tally.lost,
                self.tally
                    .worst
                    .as_ref()
                    .map(|(a, b, n)| format!(" (most {a} -> {b}: {n})"))
                    .unwrap_or_default()
            )),
            Loss::AtMost(_) => {
                if let Some((a, b, n)) = &self.tally.worst {
                    if *n > loss.max_per_pair() {
                        v.push(format!(
                            "{a} -> {b} lost {n} pings, more than the bound of {}",
                            loss.max_per_pair()
                        ));
                    }
                }
            }
            Loss::None => {}
        }
        if self.tally.wrong_ttl > 0 {
            v.push(format!(
                "{} answers with a TTL other than 62",
                self.tally.wrong_ttl
            ));
        }
        if let Err(e) = &self.repair {
            v.push(format!("no convergence: {e}"));
        }
        v
    }

    pub fn ok(&self) -> bool {
        self.problems().is_empty()
    }

    /// One line: fault, pings lost of sent (expected), repair time, verdict.
    pub fn render(&self, number: usize) -> String {
        let what = self
            .fault
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_else(|| "baseline (no fault)".to_string());
        let expected = self
            .fault
            .as_ref()
            .map(Fault::expected_loss)
            .unwrap_or(Loss::None);
        let repair = match &self.repair {
            Ok(d) => format!("repaired in {:.2} s", d.as_secs_f64()),
            Err(_) => "NOT repaired".to_string(),
        };
        let problems = self.problems();
        let slow = self
            .slow_because
            .as_ref()
            .map(|why| format!("\n       slow repair, last difference: {why}"))
            .unwrap_or_default();
        format!(
            "{number:>3}  {what:<68}  lost {:>4}/{:<6} (may {expected:<15})  {repair:<20}  {}{slow}",
            self.tally.lost,
            self.tally.sent,
            if problems.is_empty() {
                "ok".to_string()
            } else {
                format!("FAIL: {}", problems.join("; "))
            }
        )
    }
}

/// A whole run.
#[derive(Debug, Clone)]
pub struct ChaosReport {
    pub seed: u64,
    pub minutes: f64,
    pub plan: Vec<Fault>,
    pub windows: Vec<WindowResult>,
    pub elapsed: Duration,
    /// The prober's socket errors, if any (a failed run).
    pub probe_errors: Vec<String>,
}

impl ChaosReport {
    pub fn failures(&self) -> usize {
        self.windows.iter().filter(|w| !w.ok()).count() + usize::from(!self.probe_errors.is_empty())
    }

    pub fn ok(&self) -> bool {
        self.failures() == 0
    }

    /// The per-window lines and the verdict.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (i, w) in self.windows.iter().enumerate() {
            out.push_str(&w.render(i));
            out.push('\n');
        }
        out.push_str(&self.summary());
        out
    }

    /// The prober's errors, if any, and the verdict line.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let sent: u64 = self.windows.iter().map(|w| w.tally.sent).sum();
        let lost: u64 = self.windows.iter().map(|w| w.tally.lost).sum();
        let repairs: Vec<f64> = self
            .windows
            .iter()
            .filter(|w| w.fault.is_some())
            .filter_map(|w| w.repair.as_ref().ok().map(Duration::as_secs_f64))
            .collect();
        let worst = repairs.iter().copied().fold(0.0, f64::max);
        for e in &self.probe_errors {
            out.push_str(&format!("prober error: {e}\n"));
        }
        out.push_str(&format!(
            "chaos seed {} ({:.1} min planned, {:.1} min run): {} faults, {} pings sent, {} lost, slowest repair {:.2} s: {}\n",
            self.seed,
            self.minutes,
            self.elapsed.as_secs_f64() / 60.0,
            self.plan.len(),
            sent,
            lost,
            worst,
            if self.ok() {
                "PASS".to_string()
            } else {
                format!("FAIL ({} windows failed)", self.failures())
            }
        ));
        out
    }
}

/// The plan as printed before the run starts.
pub fn render_plan(seed: u64, plan: &[Fault]) -> String {
    let mut out = format!("chaos plan, seed {seed}: {} faults\n", plan.len());
    for (i, f) in plan.iter().enumerate() {
        out.push_str(&format!(
            "{:>3}  {f}  (may lose {}, repair within {} s)\n",
            i + 1,
            f.expected_loss(),
            f.repair_bound().as_secs()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(backend: Backend, store: StoreKind, workers: u32) -> PlanContext {
        PlanContext {
            backend,
            store,
            topology: Topology::Flat,
            nodes: (0..=workers).collect(),
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_plan_and_another_seed_another() {
        let c = ctx(Backend::Vxlan, StoreKind::Local, 2);
        assert_eq!(plan(7, 3.0, &c), plan(7, 3.0, &c));
        assert_ne!(plan(7, 3.0, &c), plan(8, 3.0, &c));
    }

    #[test]
    fn a_one_minute_vxlan_plan_covers_every_kind_once() {
        let c = ctx(Backend::Vxlan, StoreKind::Etcd, 2);
        for seed in 0..50 {
            let p = plan(seed, 1.0, &c);
            let mut kinds: Vec<FaultKind> = p.iter().map(Fault::kind).collect();
            kinds.sort();
            kinds.dedup();
            assert_eq!(kinds, ALL_KINDS.to_vec(), "seed {seed}: {p:?}");
        }
    }

    #[test]
    fn faults_follow_the_lab_through_the_plan() {
        for seed in 0..200 {
            let start = ctx(Backend::HostGw, StoreKind::Local, 2);
            let mut c = start.clone();
            for f in plan(seed, 10.0, &start) {
                // Only faults the lab allows at that point of the plan.
                assert!(c.allows(f.kind()), "seed {seed}: {f} with {c:?}");
                match &f {
                    Fault::DeleteDevice { .. }
                    | Fault::DeleteNeighbour { .. }
                    | Fault::DeleteFdbEntry { .. }
                    | Fault::FlushFdb { .. } => assert_eq!(c.backend, Backend::Vxlan, "{f}"),
                    Fault::DeleteRoute { node, peer } => {
                        assert_ne!(node, peer);
                        for n in [node, peer] {
                            assert!(c.nodes.iter().any(|i| node_name(*i) == *n), "{f}: {c:?}");
                        }
                    }
                    Fault::DeleteCni0Route { node } => assert_ne!(node, "master"),
                    Fault::RemoveNode { node } => {
                        assert_ne!(node, "master");
                        c.nodes.retain(|i| node_name(*i) != *node);
                        assert!(c.workers().len() >= MIN_CHAOS_PODS);
                    }
                    Fault::AddNode { node } => {
                        let next = c.nodes.iter().max().unwrap() + 1;
                        assert_eq!(*node, node_name(next));
                        c.nodes.push(next);
                        assert!(c.workers().len() as u32 <= MAX_CHAOS_WORKERS);
                    }
                    Fault::SwitchBackend { to } => {
                        assert_ne!(*to, c.backend);
                        c.backend = *to;
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn kinds_the_lab_cannot_have_are_never_planned() {
        // host-gw all along: no switch in two segments, so never a vxlan-only fault.
        let mut c = ctx(Backend::HostGw, StoreKind::Kube, 2);
        c.topology = Topology::TwoSegment;
        for seed in 0..50 {
            for f in plan(seed, 5.0, &c) {
                assert!(
                    matches!(
                        f.kind(),
                        FaultKind::KillRestart
                            | FaultKind::RollingRestart
                            | FaultKind::DeleteRoute
                            | FaultKind::DeleteCni0Route
                            | FaultKind::AddNode
                            | FaultKind::RemoveNode
                    ),
                    "{f}"
                );
            }
        }
    }

    #[test]
    fn plans_fill_the_time_they_are_given() {
        let c = ctx(Backend::Vxlan, StoreKind::Local, 3);
        let cost = |p: &[Fault]| {
            p.iter()
                .map(|f| f.estimated_cost(4).as_secs_f64())
                .sum::<f64>()
        };
        let long = plan(1, 10.0, &c);
        assert!(
            cost(&long) >= 600.0 && cost(&long) < 660.0,
            "{}",
            cost(&long)
        );
        assert_eq!(plan(1, 0.0, &c).len(), 1, "at least one fault");
    }

    fn rec(t0: Instant, ms: u64, from: u16, to: u16, answered: bool) -> ProbeRecord {
        ProbeRecord {
            sent_at: t0 + Duration::from_millis(ms),
            from,
            to,
            answered,
            ttl: if answered { 62 } else { 0 },
        }
    }

    #[test]
    fn probes_count_in_the_window_they_were_sent_in() {
        let t0 = Instant::now();
        let names = vec!["ubuntu-1".to_string(), "ubuntu-2".to_string()];
        let r = vec![
            rec(t0, 0, 0, 1, false),
            rec(t0, 100, 0, 1, true),
            rec(t0, 200, 1, 0, false),
            rec(t0, 300, 1, 0, false),
            rec(t0, 1000, 0, 1, false),
        ];
        let t = tally(&r, &names, t0, t0 + Duration::from_millis(1000));
        assert_eq!((t.sent, t.lost), (4, 3));
        assert_eq!(t.worst, Some(("ubuntu-2".into(), "ubuntu-1".into(), 2)));
        let later = tally(
            &r,
            &names,
            t0 + Duration::from_millis(1000),
            t0 + Duration::from_secs(2),
        );
        assert_eq!((later.sent, later.lost), (1, 1));
    }

    #[test]
    fn the_verdict_holds_each_fault_to_its_loss_and_repair_bound() {
        let lost = |n: u64| Tally {
            sent: 100,
            lost: n,
            worst: (n > 0).then(|| ("a".into(), "b".into(), n)),
            wrong_ttl: 0,
        };
        let w = |f: Fault, n: u64, repair: Result<Duration, String>| WindowResult {
            fault: Some(f),
            tally: lost(n),
            repair,
            slow_because: None,
        };
        let fast = Ok(Duration::from_millis(300));
        let restart = Fault::KillRestart {
            node: "k8s-node1".into(),
        };
        assert!(w(restart.clone(), 0, fast.clone()).ok());
        let one = w(restart, 1, fast.clone());
        assert!(!one.ok());
        assert!(
            one.render(1)
                .contains("FAIL: 1 pings lost where none may be"),
            "{}",
            one.render(1)
        );
        let drift = Fault::DeleteRoute {
            node: "k8s-node1".into(),
            peer: "k8s-node2".into(),
        };
        assert!(w(drift.clone(), 1, fast.clone()).ok());
        assert!(!w(drift, 2, fast.clone()).ok());
        let dev = Fault::DeleteDevice {
            node: "k8s-node1".into(),
        };
        assert!(w(dev.clone(), 30, fast.clone()).ok());
        assert!(!w(dev.clone(), 31, fast.clone()).ok());
        let stuck = w(dev, 0, Err("k8s-node1: flannel.1 is missing".into()));
        assert!(stuck
            .problems()
            .iter()
            .any(|p| p.contains("flannel.1 is missing")));
        let mut wrong = w(Fault::RollingRestart, 0, fast);
        wrong.tally.wrong_ttl = 2;
        assert!(!wrong.ok());
        let report = ChaosReport {
            seed: 3,
            minutes: 1.0,
            plan: vec![Fault::RollingRestart],
            windows: vec![wrong],
            elapsed: Duration::from_secs(60),
            probe_errors: vec![],
        };
        assert!(
            report.render().contains("FAIL (1 windows failed)"),
            "{}",
            report.render()
        );
    }
}
