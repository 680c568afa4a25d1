//! The desired kernel state kept up to date one lease at a time, so that a
//! lease event costs what it concerns and not the size of the cluster.
//!
//! A backend's desired state is a union of per-lease parts: [`desired_for`]
//! of a set of leases is the normalised union of [`desired_for`] of each
//! lease alone (a peer's routes, neighbour and FDB entry depend on that
//! lease, the backend and our own lease only). [`DesiredIndex`] keeps each
//! lease's part and counts every kernel object by how many leases want it
//! (two leases of one node share its FDB entry). An update of some leases
//! yields the [`ReconcilePlan`] that a full pass would compute between the
//! desired state before and after the update, restricted to the objects
//! whose identity ([`ReplaceKey`]) the update touched; outside those the
//! two desired states are equal, so a full pass would do nothing there.
//! Applied to a kernel that holds the desired state before, the plan leaves
//! it holding the desired state after.
//!
//! The full pass stays the ground truth: it rebuilds the index from every
//! lease, reads the kernel back and applies the difference. The index only
//! lets the passes in between (one per lease event) skip the dumps and the
//! computation over every lease.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::SystemTime;

use ipnet::IpNet;

use crate::datapath::{
    self, diff_replace, DesiredState, DirectRouting, FdbEntry, HostGwPeer, Neighbour, Op,
    ReconcilePlan, ReplaceKey, Route,
};
use crate::lease::{IpFamily, Lease, LeaseKey};
use crate::mac::MacAddr;

/// How a backend turns leases into kernel objects, in one address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipe<'a> {
    /// vxlan on the device `ifindex` with VNI `vni`; with `direct`
    /// (DirectRouting) plain routes to peers on a connected subnet.
    Vxlan {
        ifindex: u32,
        vni: u32,
        direct: Option<DirectRouting<'a>>,
    },
    /// host-gw: a route per peer via its public IP on the external interface.
    HostGw {
        external_ifindex: u32,
        connected: &'a [IpNet],
    },
    /// udp: peers live in flanneld's own table, no kernel object per peer.
    Udp,
    /// Nothing (family disabled, device not set up).
    Nothing,
}

/// What some leases contribute to one family's desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contribution {
    pub state: DesiredState,
    /// Peers programmed (host-gw: reachable ones only).
    pub peers: usize,
    /// host-gw peers left without a route: not on a connected subnet.
    pub unreachable: Vec<HostGwPeer>,
}

/// The desired state of `family` for `leases` with `recipe`, `own` being
/// our lease (never a peer). The full recomputation a full pass does; the
/// same function on one lease gives that lease's part.
pub fn desired_for<'l>(
    recipe: &Recipe<'_>,
    leases: impl IntoIterator<Item = &'l Lease>,
    own: Option<&LeaseKey>,
    family: IpFamily,
    now: SystemTime,
) -> Contribution {
    match recipe {
        Recipe::Vxlan {
            ifindex,
            vni,
            direct,
        } => {
            let peers = datapath::vxlan_peers(leases, own, *vni, family, now);
            Contribution {
                peers: peers.len(),
                state: datapath::desired_vxlan_with(*ifindex, &peers, direct.as_ref()),
                unreachable: Vec::new(),
            }
        }
        Recipe::HostGw {
            external_ifindex,
            connected,
        } => {
            let peers = datapath::host_gw_peers(leases, own, family, now);
            match datapath::desired_host_gw(*external_ifindex, &peers, connected) {
                Ok(state) => Contribution {
                    peers: peers.len(),
                    state,
                    unreachable: Vec::new(),
                },
                Err(e) => Contribution {
                    peers: peers.len() - e.not_connected.len(),
                    state: e.partial,
                    unreachable: e.not_connected,
                },
            }
        }
        Recipe::Udp if family == IpFamily::V4 => Contribution {
            peers: crate::udp::udp_peers(leases, own, now).len(),
            ..Contribution::default()
        },
        Recipe::Udp | Recipe::Nothing => Contribution::default(),
    }
}

/// The objects wanted under one kernel identity, each with the number of
/// leases that want it. Nearly always a single object (two only when leases
/// conflict), kept inline: a `Vec` per identity would cost an allocation of
/// four objects each, for most of the index's memory at 20,000 leases.
#[derive(Debug, Clone)]
enum Slot<T> {
    One((T, u32)),
    /// Sorted, two or more.
    Many(Vec<(T, u32)>),
}

impl<T: Ord + Clone> Slot<T> {
    fn entries(&self) -> &[(T, u32)] {
        match self {
            Slot::One(e) => std::slice::from_ref(e),
            Slot::Many(v) => v,
        }
    }

    fn add(&mut self, t: &T) {
        match self {
            Slot::One((o, n)) if o == t => *n += 1,
            Slot::One(e) => {
                let mut v = vec![e.clone(), (t.clone(), 1)];
                v.sort();
                *self = Slot::Many(v);
            }
            Slot::Many(v) => match v.iter_mut().find(|(o, _)| o == t) {
                Some((_, n)) => *n += 1,
                None => {
                    v.push((t.clone(), 1));
                    v.sort();
                }
            },
        }
    }

    /// Counts `t` out; false when nothing is left.
    fn remove(&mut self, t: &T) -> bool {
        match self {
            Slot::One((o, n)) => {
                if o == t {
                    *n -= 1;
                }
                *n > 0
            }
            Slot::Many(v) => {
                if let Some(i) = v.iter().position(|(o, _)| o == t) {
                    v[i].1 -= 1;
                    if v[i].1 == 0 {
                        v.remove(i);
                    }
                }
                match v.len() {
                    0 => false,
                    1 => {
                        let last = v.remove(0);
                        *self = Slot::One(last);
                        true
                    }
                    _ => true,
                }
            }
        }
    }
}

/// Objects of one kind counted by how many leases want them, grouped by
/// their kernel identity.
#[derive(Debug, Clone)]
struct Counted<T: ReplaceKey> {
    by_key: BTreeMap<T::Key, Slot<T>>,
}

impl<T: ReplaceKey> Default for Counted<T> {
    fn default() -> Self {
        Counted {
            by_key: BTreeMap::new(),
        }
    }
}

impl<T> Counted<T>
where
    T: ReplaceKey + Ord + Clone,
    T::Key: Clone,
{
    fn add(&mut self, t: &T) {
        match self.by_key.entry(t.replace_key()) {
            std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().add(t),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(Slot::One((t.clone(), 1)));
            }
        }
    }

    fn remove(&mut self, t: &T) {
        let k = t.replace_key();
        if let Some(slot) = self.by_key.get_mut(&k) {
            if !slot.remove(t) {
                self.by_key.remove(&k);
            }
        }
    }

    /// The counts of `objects` at once. A map grown by inserts in key
    /// order leaves its nodes about half full; one built from sorted input
    /// fills them, which halves the index at 20,000 leases.
    fn from_objects(mut objects: Vec<T>) -> Self {
        objects.sort_unstable_by(|a, b| a.replace_key().cmp(&b.replace_key()).then(a.cmp(b)));
        let mut grouped: Vec<(T::Key, Slot<T>)> = Vec::new();
        for t in objects {
            let k = t.replace_key();
            match grouped.last_mut() {
                Some((last, slot)) if *last == k => slot.add(&t),
                _ => grouped.push((k, Slot::One((t, 1)))),
            }
        }
        Counted {
            by_key: grouped.into_iter().collect(),
        }
    }

    fn with_key(&self, k: &T::Key) -> Vec<T> {
        self.by_key
            .get(k)
            .map(|s| s.entries().iter().map(|(t, _)| t.clone()).collect())
            .unwrap_or_default()
    }

    fn all(&self) -> Vec<T> {
        let mut v: Vec<T> = self
            .by_key
            .values()
            .flat_map(|s| s.entries().iter().map(|(t, _)| t.clone()))
            .collect();
        v.sort();
        v
    }

    fn has(&self, t: &T) -> bool {
        self.by_key
            .get(&t.replace_key())
            .is_some_and(|s| s.entries().iter().any(|(o, _)| o == t))
    }

    fn len(&self) -> usize {
        self.by_key.values().map(|s| s.entries().len()).sum()
    }
}

/// The objects of the given identities, before or after an update.
fn slice<T>(c: &Counted<T>, keys: &BTreeSet<T::Key>) -> Vec<T>
where
    T: ReplaceKey + Ord + Clone,
    T::Key: Clone,
{
    let mut v: Vec<T> = keys.iter().flat_map(|k| c.with_key(k)).collect();
    v.sort();
    v
}

/// A lease's [`Contribution`] as the index keeps it. Nearly every lease
/// wants at most one object of each kind (a vxlan peer: a route, a
/// neighbour and an FDB entry; host-gw or DirectRouting: a route), kept
/// inline; lists would cost three allocations per lease.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Single {
        route: Option<Route>,
        neighbour: Option<Neighbour>,
        fdb: Option<FdbEntry>,
        peers: u32,
    },
    /// More than one object of a kind, or unreachable host-gw peers.
    Lists(Box<Lists>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Lists {
    routes: Box<[Route]>,
    neighbours: Box<[Neighbour]>,
    fdb: Box<[FdbEntry]>,
    unreachable: Box<[HostGwPeer]>,
    peers: usize,
}

impl Default for Part {
    fn default() -> Part {
        Part::Single {
            route: None,
            neighbour: None,
            fdb: None,
            peers: 0,
        }
    }
}

impl From<Contribution> for Part {
    fn from(c: Contribution) -> Part {
        let DesiredState {
            mut routes,
            mut neighbours,
            mut fdb,
        } = c.state;
        match u32::try_from(c.peers) {
            Ok(peers)
                if routes.len() <= 1
                    && neighbours.len() <= 1
                    && fdb.len() <= 1
                    && c.unreachable.is_empty() =>
            {
                Part::Single {
                    route: routes.pop(),
                    neighbour: neighbours.pop(),
                    fdb: fdb.pop(),
                    peers,
                }
            }
            _ => Part::Lists(Box::new(Lists {
                routes: routes.into_boxed_slice(),
                neighbours: neighbours.into_boxed_slice(),
                fdb: fdb.into_boxed_slice(),
                unreachable: c.unreachable.into_boxed_slice(),
                peers: c.peers,
            })),
        }
    }
}

impl Part {
    fn routes(&self) -> &[Route] {
        match self {
            Part::Single { route, .. } => route.as_slice(),
            Part::Lists(l) => &l.routes,
        }
    }

    fn neighbours(&self) -> &[Neighbour] {
        match self {
            Part::Single { neighbour, .. } => neighbour.as_slice(),
            Part::Lists(l) => &l.neighbours,
        }
    }

    fn fdb(&self) -> &[FdbEntry] {
        match self {
            Part::Single { fdb, .. } => fdb.as_slice(),
            Part::Lists(l) => &l.fdb,
        }
    }

    fn unreachable(&self) -> &[HostGwPeer] {
        match self {
            Part::Single { .. } => &[],
            Part::Lists(l) => &l.unreachable,
        }
    }

    fn peers(&self) -> usize {
        match self {
            Part::Single { peers, .. } => *peers as usize,
            Part::Lists(l) => l.peers,
        }
    }
}

/// One family's desired state, lease by lease (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct DesiredIndex {
    by_lease: BTreeMap<LeaseKey, Part>,
    routes: Counted<Route>,
    neighbours: Counted<Neighbour>,
    fdb: Counted<FdbEntry>,
    peers: usize,
}

impl DesiredIndex {
    /// The index of `leases`: every lease's part, computed alone.
    pub fn build<'l>(
        recipe: &Recipe<'_>,
        leases: impl IntoIterator<Item = &'l Lease>,
        own: Option<&LeaseKey>,
        family: IpFamily,
        now: SystemTime,
    ) -> DesiredIndex {
        let mut by_lease = Vec::new();
        let (mut routes, mut neighbours, mut fdb) = (Vec::new(), Vec::new(), Vec::new());
        let mut peers = 0;
        for l in leases {
            let part = Part::from(desired_for(recipe, [l], own, family, now));
            routes.extend_from_slice(part.routes());
            neighbours.extend_from_slice(part.neighbours());
            fdb.extend_from_slice(part.fdb());
            peers += part.peers();
            if part != Part::default() {
                by_lease.push((l.key, part));
            }
        }
        DesiredIndex {
            // Built at once for full nodes, like the counts.
            by_lease: by_lease.into_iter().collect(),
            routes: Counted::from_objects(routes),
            neighbours: Counted::from_objects(neighbours),
            fdb: Counted::from_objects(fdb),
            peers,
        }
    }

    /// Counts a lease's part in (`add`) or out.
    fn count(&mut self, c: &Part, add: bool) {
        fn each<T>(counted: &mut Counted<T>, objects: &[T], add: bool)
        where
            T: ReplaceKey + Ord + Clone,
            T::Key: Clone,
        {
            for t in objects {
                if add {
                    counted.add(t)
                } else {
                    counted.remove(t)
                }
            }
        }
        each(&mut self.routes, c.routes(), add);
        each(&mut self.neighbours, c.neighbours(), add);
        each(&mut self.fdb, c.fdb(), add);
        if add {
            self.peers += c.peers();
        } else {
            self.peers -= c.peers();
        }
    }

    fn insert(&mut self, key: LeaseKey, c: Contribution) {
        let c = Part::from(c);
        self.count(&c, true);
        if c != Part::default() {
            self.by_lease.insert(key, c);
        }
    }

    fn take(&mut self, key: &LeaseKey) {
        if let Some(c) = self.by_lease.remove(key) {
            self.count(&c, false);
        }
    }

    /// Replaces the parts of the changed leases (`None`: the lease is gone)
    /// and returns the writes that take a kernel holding the desired state
    /// before to the desired state after (see the module docs).
    pub fn update(
        &mut self,
        changes: impl IntoIterator<Item = (LeaseKey, Contribution)>,
    ) -> ReconcilePlan {
        let changes: Vec<(LeaseKey, Contribution)> = changes.into_iter().collect();
        let mut rk: BTreeSet<IpNet> = BTreeSet::new();
        let mut nk: BTreeSet<(u32, IpAddr)> = BTreeSet::new();
        let mut fk: BTreeSet<(u32, MacAddr)> = BTreeSet::new();
        let mut note = |routes: &[Route], neighbours: &[Neighbour], fdb: &[FdbEntry]| {
            rk.extend(routes.iter().map(ReplaceKey::replace_key));
            nk.extend(neighbours.iter().map(ReplaceKey::replace_key));
            fk.extend(fdb.iter().map(ReplaceKey::replace_key));
        };
        for (key, new) in &changes {
            if let Some(old) = self.by_lease.get(key) {
                note(old.routes(), old.neighbours(), old.fdb());
            }
            note(&new.state.routes, &new.state.neighbours, &new.state.fdb);
        }
        let before = (
            slice(&self.routes, &rk),
            slice(&self.neighbours, &nk),
            slice(&self.fdb, &fk),
        );
        for (key, new) in changes {
            self.take(&key);
            self.insert(key, new);
        }
        ReconcilePlan {
            routes: diff_replace(&slice(&self.routes, &rk), &before.0),
            neighbours: diff_replace(&slice(&self.neighbours, &nk), &before.1),
            fdb: diff_replace(&slice(&self.fdb, &fk), &before.2),
        }
    }

    /// The whole desired state, normalised.
    pub fn desired(&self) -> DesiredState {
        DesiredState {
            routes: self.routes.all(),
            neighbours: self.neighbours.all(),
            fdb: self.fdb.all(),
        }
    }

    /// Peers programmed (host-gw: reachable ones).
    pub fn peers(&self) -> usize {
        self.peers
    }

    /// host-gw peers without a route, sorted by subnet.
    pub fn unreachable(&self) -> Vec<HostGwPeer> {
        let mut v: Vec<HostGwPeer> = self
            .by_lease
            .values()
            .flat_map(|c| c.unreachable().iter().copied())
            .collect();
        v.sort_by_key(|p| (p.subnet, p.key));
        v
    }

    /// Whether the object `op` writes is wanted (for an add: whether the
    /// kernel should have held it already).
    pub fn holds(&self, op: &Op) -> bool {
        match op {
            Op::AddRoute(r) | Op::DelRoute(r) => self.routes.has(r),
            Op::AddNeighbour(n) | Op::DelNeighbour(n) => self.neighbours.has(n),
            Op::AddFdb(f) | Op::DelFdb(f) => self.fdb.has(f),
        }
    }

    /// Whether some route to `dst` is wanted.
    pub fn wants_route_to(&self, dst: &IpNet) -> bool {
        self.routes.by_key.contains_key(dst)
    }

    /// Whether some neighbour entry for `ip` on `ifindex` is wanted.
    pub fn wants_neighbour_at(&self, ifindex: u32, ip: IpAddr) -> bool {
        self.neighbours.by_key.contains_key(&(ifindex, ip))
    }

    /// Whether some FDB entry for `mac` on `ifindex` is wanted.
    pub fn wants_fdb_for(&self, ifindex: u32, mac: MacAddr) -> bool {
        self.fdb.by_key.contains_key(&(ifindex, mac))
    }

    /// The wanted routes to `dst` (one, unless leases conflict).
    pub fn routes_to(&self, dst: &IpNet) -> Vec<Route> {
        self.routes.with_key(dst)
    }

    /// The wanted neighbour entries for `ip` on `ifindex`.
    pub fn neighbours_at(&self, ifindex: u32, ip: IpAddr) -> Vec<Neighbour> {
        self.neighbours.with_key(&(ifindex, ip))
    }

    /// The wanted FDB entries for `mac` on `ifindex`.
    pub fn fdb_for(&self, ifindex: u32, mac: MacAddr) -> Vec<FdbEntry> {
        self.fdb.with_key(&(ifindex, mac))
    }

    /// One wanted route for each output interface that wanted routes use
    /// (a walk over the wanted routes in memory; no kernel read).
    pub fn one_route_per_oif(&self) -> Vec<Route> {
        let mut out: Vec<Route> = Vec::new();
        for slot in self.routes.by_key.values() {
            for (r, _) in slot.entries() {
                if !out.iter().any(|o| o.oif == r.oif) {
                    out.push(r.clone());
                }
            }
        }
        out
    }

    /// Number of kernel objects wanted (routes + neighbours + FDB entries).
    pub fn objects(&self) -> usize {
        self.routes.len() + self.neighbours.len() + self.fdb.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::plan_reconcile;
    use crate::lease::{LeaseAttrs, VxlanBackendData};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000)
    }

    #[test]
    fn a_slot_keeps_one_object_inline_and_conflicts_sorted() {
        let mut s = Slot::One((3u8, 1));
        s.add(&1);
        s.add(&3);
        assert_eq!(s.entries(), &[(1, 1), (3, 2)]);
        assert!(s.remove(&3));
        assert!(s.remove(&9), "an object not held changes nothing");
        assert!(s.remove(&1));
        assert!(
            matches!(s, Slot::One((3, 1))),
            "one left: inline again: {s:?}"
        );
        assert!(!s.remove(&3));
    }

    const KEYS: [&str; 8] = [
        "10.244.1.0-24", // ours
        "10.244.2.0-24",
        "10.244.3.0-24",
        "10.244.4.0-24",
        "10.244.4.0-25", // overlaps 10.244.4.0/24: shares its neighbour key
        "10.244.5.0-24&fd00:10:244:5::-64",
        "10.244.6.0-24&fd00:10:244:6::-64",
        "10.244.6.0-24&fd00:10:244:7::-64", // same IPv4 half as the one before
    ];

    /// A random lease out of a small pool, so that shared MACs, shared
    /// subnets, other VNIs, other backends and expired leases all happen.
    fn random_lease(rng: &mut StdRng) -> Lease {
        let key: LeaseKey = KEYS[rng.random_range(0..KEYS.len())].parse().unwrap();
        let v4: std::net::Ipv4Addr = ["172.16.1.13", "172.16.1.20", "192.168.7.3"]
            [rng.random_range(0..3)]
        .parse()
        .unwrap();
        let v6: std::net::Ipv6Addr = ["fd00:1::13", "fd00:7::3"][rng.random_range(0..2)]
            .parse()
            .unwrap();
        let mac = |rng: &mut StdRng| -> MacAddr {
            format!("02:00:00:00:00:{:02x}", rng.random_range(1..4))
                .parse()
                .unwrap()
        };
        let vni = if rng.random_ratio(1, 8) { 2 } else { 1 };
        let data = |rng: &mut StdRng| VxlanBackendData {
            vni,
            vtep_mac: mac(rng),
        };
        let mut attrs = match rng.random_range(0..4) {
            0 => LeaseAttrs::new(crate::lease::BACKEND_HOST_GW, Some(v4), Some(v6)),
            1 => LeaseAttrs::new_udp(v4),
            _ => LeaseAttrs::new_vxlan(Some(v4), Some(data(rng)), Some(v6), Some(data(rng))),
        };
        if rng.random_ratio(1, 10) {
            attrs.public_ip = None;
        }
        let expiration = match rng.random_range(0..6) {
            0 => None,
            1 => Some(t0() - Duration::from_secs(1)),
            _ => Some(t0() + Duration::from_secs(3600)),
        };
        Lease {
            key,
            attrs,
            expiration,
        }
    }

    fn connected() -> Vec<IpNet> {
        vec![
            "172.16.1.14/24".parse().unwrap(),
            "fd00:1::14/64".parse().unwrap(),
        ]
    }

    fn recipes(connected: &[IpNet]) -> Vec<Recipe<'_>> {
        vec![
            Recipe::Vxlan {
                ifindex: 4,
                vni: 1,
                direct: None,
            },
            Recipe::Vxlan {
                ifindex: 4,
                vni: 1,
                direct: Some(DirectRouting {
                    external_ifindex: 2,
                    connected,
                }),
            },
            Recipe::HostGw {
                external_ifindex: 2,
                connected,
            },
            Recipe::Udp,
        ]
    }

    fn sorted(mut p: ReconcilePlan) -> ReconcilePlan {
        p.routes.add.sort();
        p.routes.del.sort();
        p.neighbours.add.sort();
        p.neighbours.del.sort();
        p.fdb.add.sort();
        p.fdb.del.sort();
        p
    }

    /// A kernel as far as replace and delete go: one route per destination,
    /// one neighbour per (device, IP), FDB entries by (device, MAC, dst)
    /// with replace overwriting the MAC's entries.
    #[derive(Debug, Default, PartialEq)]
    struct Kernel {
        routes: BTreeMap<IpNet, Route>,
        neigh: BTreeMap<(u32, IpAddr), Neighbour>,
        fdb: BTreeSet<FdbEntry>,
    }

    impl Kernel {
        fn holding(d: &DesiredState) -> Kernel {
            let mut k = Kernel::default();
            for op in plan_reconcile(d, &DesiredState::default()).ops() {
                k.apply(&op);
            }
            k
        }
        fn apply(&mut self, op: &Op) {
            match op {
                Op::AddRoute(r) => {
                    self.routes.insert(r.dst, r.clone());
                }
                Op::DelRoute(r) => {
                    if self.routes.get(&r.dst) == Some(r) {
                        self.routes.remove(&r.dst);
                    }
                }
                Op::AddNeighbour(n) => {
                    self.neigh.insert((n.ifindex, n.ip), n.clone());
                }
                Op::DelNeighbour(n) => {
                    self.neigh.remove(&(n.ifindex, n.ip));
                }
                Op::AddFdb(f) => {
                    self.fdb.retain(|o| o.replace_key() != f.replace_key());
                    self.fdb.insert(f.clone());
                }
                Op::DelFdb(f) => {
                    self.fdb.remove(f);
                }
            }
        }
    }

    /// Whether two desired objects compete for one kernel identity (then
    /// the kernel's content depends on the order of the writes).
    fn conflict_free(d: &DesiredState) -> bool {
        fn unique<T: ReplaceKey>(v: &[T]) -> bool {
            let keys: BTreeSet<T::Key> = v.iter().map(ReplaceKey::replace_key).collect();
            keys.len() == v.len()
        }
        unique(&d.routes) && unique(&d.neighbours) && unique(&d.fdb)
    }

    /// For random sequences of lease events, with every backend and both
    /// families: the index equals the full recomputation after every step,
    /// the incremental plan equals the full pass's plan between the full
    /// recomputations before and after, and applying it to a kernel that
    /// holds the state before leaves the state after.
    #[test]
    fn incremental_updates_equal_the_full_recomputation() {
        let own: LeaseKey = KEYS[0].parse().unwrap();
        let connected = connected();
        let mut checked_kernels = 0;
        for seed in 0..300u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            for recipe in recipes(&connected) {
                for family in [IpFamily::V4, IpFamily::V6] {
                    // Some leases to start from, so that the bulk build's
                    // counts (conflicts, shared FDB entries) are updated too.
                    let mut leases: BTreeMap<LeaseKey, Lease> = BTreeMap::new();
                    for _ in 0..rng.random_range(0..6) {
                        let l = random_lease(&mut rng);
                        leases.insert(l.key, l);
                    }
                    let mut idx =
                        DesiredIndex::build(&recipe, leases.values(), Some(&own), family, t0());
                    for _ in 0..12 {
                        let before =
                            desired_for(&recipe, leases.values(), Some(&own), family, t0());
                        // A batch of one to three events, as one watch message.
                        let mut touched = BTreeSet::new();
                        for _ in 0..rng.random_range(1..=3) {
                            if rng.random_ratio(1, 3) && !leases.is_empty() {
                                let k = *leases
                                    .keys()
                                    .nth(rng.random_range(0..leases.len()))
                                    .unwrap();
                                leases.remove(&k);
                                touched.insert(k);
                            } else {
                                let l = random_lease(&mut rng);
                                touched.insert(l.key);
                                leases.insert(l.key, l);
                            }
                        }
                        let plan = idx.update(touched.iter().map(|k| {
                            let c = leases
                                .get(k)
                                .map(|l| desired_for(&recipe, [l], Some(&own), family, t0()))
                                .unwrap_or_default();
                            (*k, c)
                        }));
                        let after = desired_for(&recipe, leases.values(), Some(&own), family, t0());
                        assert_eq!(idx.desired(), after.state, "seed {seed} {recipe:?}");
                        assert_eq!(idx.peers(), after.peers, "seed {seed}");
                        assert_eq!(idx.unreachable(), after.unreachable, "seed {seed}");
                        assert_eq!(
                            sorted(plan.clone()),
                            sorted(plan_reconcile(&after.state, &before.state)),
                            "seed {seed} {recipe:?} {family:?}"
                        );
                        if conflict_free(&before.state) && conflict_free(&after.state) {
                            let mut k = Kernel::holding(&before.state);
                            for op in plan.ops() {
                                k.apply(&op);
                            }
                            assert_eq!(k, Kernel::holding(&after.state), "seed {seed}");
                            checked_kernels += 1;
                        }
                    }
                    // A rebuild from scratch agrees with the updated index.
                    let fresh =
                        DesiredIndex::build(&recipe, leases.values(), Some(&own), family, t0());
                    assert_eq!(fresh.desired(), idx.desired());
                    assert_eq!(fresh.objects(), idx.objects());
                }
            }
        }
        assert!(
            checked_kernels > 1000,
            "only {checked_kernels} kernel checks ran"
        );
    }

    #[test]
    fn two_leases_of_one_node_share_its_fdb_entry() {
        let own: LeaseKey = KEYS[0].parse().unwrap();
        let recipe = Recipe::Vxlan {
            ifindex: 4,
            vni: 1,
            direct: None,
        };
        let data = VxlanBackendData {
            vni: 1,
            vtep_mac: "02:00:00:00:00:01".parse().unwrap(),
        };
        let lease = |k: &str| Lease {
            key: k.parse().unwrap(),
            attrs: LeaseAttrs::new_vxlan(
                Some("172.16.1.13".parse().unwrap()),
                Some(data),
                None,
                None,
            ),
            expiration: None,
        };
        let (a, b) = (lease("10.244.2.0-24"), lease("10.244.3.0-24"));
        let part = |l: &Lease| desired_for(&recipe, [l], Some(&own), IpFamily::V4, t0());
        let mut idx = DesiredIndex::default();
        let plan = idx.update([(a.key, part(&a)), (b.key, part(&b))]);
        assert_eq!((plan.routes.add.len(), plan.fdb.add.len()), (2, 1));
        // The first one goes: its route and neighbour go, the shared FDB entry stays.
        let plan = idx.update([(a.key, Contribution::default())]);
        assert_eq!(plan.routes.del.len(), 1);
        assert_eq!(plan.neighbours.del.len(), 1);
        assert!(plan.fdb.is_empty(), "{plan:?}");
        assert_eq!(idx.desired().fdb.len(), 1);
        // An unchanged lease again: nothing to write.
        assert!(idx.update([(b.key, part(&b))]).is_empty());
    }
}
