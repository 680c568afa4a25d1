//! Lease admission: which leases of the store may reach the datapath.
//!
//! A store entry is input from anyone who can write to the store (or, with
//! the Kubernetes store, annotate a node). Upstream flannel programs every
//! lease it reads; one bad entry can take a cluster down (a lease for the
//! underlay's own subnet replaces the kernel's route to it on every node).
//! [`admit`] runs before the reconciler and the udp peer table see a lease
//! set, for every store, and keeps out:
//!
//! - a subnet that is not strictly inside the cluster network of its family
//!   (`Network` / `IPv6Network`);
//! - a `PublicIP` / `PublicIPv6` that no node can have: unspecified,
//!   loopback, multicast, the IPv4 broadcast address, or an address inside
//!   the cluster network;
//! - a vxlan `VtepMAC` that no device can have: all zeros, broadcast or
//!   multicast;
//! - a lease that conflicts with one already admitted: its subnet overlaps
//!   that lease's, or it publishes the same PublicIP (a node holds one
//!   lease), or the same VtepMAC on the same VNI (the kernel's FDB has one
//!   destination per MAC: two owners make every node rewrite it back and
//!   forth).
//!
//! # Who keeps a contested entry
//!
//! Conflicts are settled in a fixed order that does not depend on the
//! order in which leases arrived, so that every node makes the same choice:
//!
//! 1. this node's own lease, always (a peer claiming our subnet, PublicIP or
//!    VtepMAC is the one skipped);
//! 2. then leases whose subnet has the configured prefix length
//!    (`SubnetLen` / `IPv6SubnetLen`, every enabled family) before others: a
//!    hand-written /25 or /23 never displaces a node's regular /24;
//! 3. then the lower lease key (`LeaseKey`'s order: IPv4 subnet, then IPv6).
//!
//! Expired leases take no part (they are not programmed either). Families
//! the config does not enable are not looked at.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::IpNet;

use crate::config::NetConfig;
use crate::lease::{IpFamily, Lease, LeaseAttrs, LeaseKey, BACKEND_VXLAN};
use crate::mac::MacAddr;

/// The cluster network of one family and the prefix length of a node's subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterNet {
    /// `Network` / `IPv6Network`.
    pub network: IpNet,
    /// `SubnetLen` / `IPv6SubnetLen`.
    pub subnet_len: u8,
}

/// The cluster networks of the enabled families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClusterNets {
    pub v4: Option<ClusterNet>,
    pub v6: Option<ClusterNet>,
}

impl ClusterNets {
    /// The networks of the families `cfg` enables.
    pub fn from_config(cfg: &NetConfig) -> Self {
        ClusterNets {
            v4: cfg.network.filter(|_| cfg.enable_ipv4).map(|n| ClusterNet {
                network: IpNet::V4(n),
                subnet_len: cfg.subnet_len,
            }),
            v6: cfg
                .ipv6_network
                .filter(|_| cfg.enable_ipv6)
                .map(|n| ClusterNet {
                    network: IpNet::V6(n),
                    subnet_len: cfg.ipv6_subnet_len,
                }),
        }
    }

    /// The network of `family`, when enabled.
    pub fn get(&self, family: IpFamily) -> Option<ClusterNet> {
        match family {
            IpFamily::V4 => self.v4,
            IpFamily::V6 => self.v6,
        }
    }

    fn enabled(&self) -> impl Iterator<Item = (IpFamily, ClusterNet)> + '_ {
        FAMILIES
            .into_iter()
            .filter_map(|f| self.get(f).map(|n| (f, n)))
    }
}

const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

fn idx(f: IpFamily) -> usize {
    match f {
        IpFamily::V4 => 0,
        IpFamily::V6 => 1,
    }
}

fn family_name(f: IpFamily) -> &'static str {
    match f {
        IpFamily::V4 => "IPv4",
        IpFamily::V6 => "IPv6",
    }
}

/// The lease that keeps a contested subnet, PublicIP or VtepMAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Holder {
    /// This node's own lease.
    Own(LeaseKey),
    /// Another node's lease.
    Peer(LeaseKey),
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Own(k) => write!(f, "this node's own lease {k}"),
            Holder::Peer(k) => write!(f, "lease {k}"),
        }
    }
}

/// Why a lease is not programmed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Reason {
    #[error("its {} subnet {subnet} is not inside the cluster network {network}", family_name(*.family))]
    OutsideNetwork {
        family: IpFamily,
        subnet: IpNet,
        network: IpNet,
    },
    #[error("its {} subnet {subnet} overlaps {other} of {holder}, which keeps it", family_name(*.family))]
    Overlap {
        family: IpFamily,
        subnet: IpNet,
        other: IpNet,
        holder: Holder,
    },
    #[error("its {} PublicIP {ip} is {what}", family_name(*.family))]
    BadPublicIp {
        family: IpFamily,
        ip: IpAddr,
        what: String,
    },
    #[error("its {} PublicIP {ip} is also the PublicIP of {holder}, which keeps it (a node holds one lease)", family_name(*.family))]
    PublicIpTaken {
        family: IpFamily,
        ip: IpAddr,
        holder: Holder,
    },
    #[error("its {} VtepMAC {mac} is {what}", family_name(*.family))]
    BadVtepMac {
        family: IpFamily,
        mac: MacAddr,
        what: &'static str,
    },
    #[error("its {} VtepMAC {mac} (VNI {vni}) is also the VtepMAC of {holder}, which keeps it", family_name(*.family))]
    VtepMacTaken {
        family: IpFamily,
        mac: MacAddr,
        vni: u32,
        holder: Holder,
    },
}

/// A lease kept out of the datapath, and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
#[error("lease {key} is not programmed: {reason}; correct or delete the store entry")]
pub struct Rejection {
    pub key: LeaseKey,
    pub reason: Reason,
}

/// What [`admit`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admission {
    /// The leases the datapath may program (our own included when it is in
    /// the set), sorted by key.
    pub admitted: Vec<Lease>,
    /// The others, sorted by key.
    pub rejected: Vec<Rejection>,
}

/// What one family of a lease asks the datapath for.
#[derive(Debug, Clone, Copy, Default)]
struct FamilyFacts {
    subnet: Option<IpNet>,
    public_ip: Option<IpAddr>,
    /// (VNI, VtepMAC) of a vxlan lease.
    vtep: Option<(u32, MacAddr)>,
}

fn facts(nets: &ClusterNets, key: &LeaseKey, attrs: &LeaseAttrs) -> [FamilyFacts; 2] {
    let mut out = [FamilyFacts::default(); 2];
    for (f, _) in nets.enabled() {
        let Some(subnet) = key.subnet(f) else {
            continue;
        };
        let vtep = (attrs.backend_type == BACKEND_VXLAN)
            .then(|| match f {
                IpFamily::V4 => attrs.vxlan_data(),
                IpFamily::V6 => attrs.vxlan_v6_data(),
            })
            .flatten()
            .map(|d| (d.vni, d.vtep_mac));
        out[idx(f)] = FamilyFacts {
            subnet: Some(subnet),
            public_ip: attrs.public_ip_of(f),
            vtep,
        };
    }
    out
}

/// Whether the lease's subnets all have the configured prefix length.
fn regular_length(nets: &ClusterNets, f: &[FamilyFacts; 2]) -> bool {
    nets.enabled().all(|(fam, n)| {
        f[idx(fam)]
            .subnet
            .is_none_or(|s| s.prefix_len() == n.subnet_len)
    })
}

fn bad_public_ip(nets: &ClusterNets, ip: IpAddr) -> Option<String> {
    let what = match ip {
        IpAddr::V4(a) if a.is_unspecified() => "unspecified",
        IpAddr::V4(a) if a.is_loopback() => "a loopback address",
        IpAddr::V4(a) if a.is_multicast() => "a multicast address",
        IpAddr::V4(a) if a.is_broadcast() => "the broadcast address",
        IpAddr::V6(a) if a.is_unspecified() => "unspecified",
        IpAddr::V6(a) if a.is_loopback() => "the loopback address",
        IpAddr::V6(a) if a.is_multicast() => "a multicast address",
        _ => {
            return nets
                .enabled()
                .find(|(_, n)| n.network.contains(&ip))
                .map(|(_, n)| {
                    format!(
                        "inside the cluster network {} (pod addresses cannot carry the overlay)",
                        n.network
                    )
                })
        }
    };
    Some(what.to_string())
}

fn bad_mac(mac: MacAddr) -> Option<&'static str> {
    let b = mac.octets();
    if b == [0; 6] {
        Some("the zero address")
    } else if b == [0xff; 6] {
        Some("the broadcast address")
    } else if b[0] & 1 == 1 {
        Some("a multicast address")
    } else {
        None
    }
}

/// Why the lease cannot be programmed whatever the other leases are.
fn invalid(nets: &ClusterNets, f: &[FamilyFacts; 2]) -> Option<Reason> {
    for (family, n) in nets.enabled() {
        let ff = &f[idx(family)];
        let Some(subnet) = ff.subnet else { continue };
        // Strictly inside: a lease for the whole network would shadow
        // every other node, and flannel never owns that route (Scope).
        if !(n.network.contains(&subnet) && subnet.prefix_len() > n.network.prefix_len()) {
            return Some(Reason::OutsideNetwork {
                family,
                subnet,
                network: n.network,
            });
        }
        if let Some(ip) = ff.public_ip {
            if let Some(what) = bad_public_ip(nets, ip) {
                return Some(Reason::BadPublicIp { family, ip, what });
            }
        }
        if let Some((_, mac)) = ff.vtep {
            if let Some(what) = bad_mac(mac) {
                return Some(Reason::BadVtepMac { family, mac, what });
            }
        }
    }
    None
}

/// The subnets, PublicIPs and VtepMACs already given to admitted leases.
#[derive(Default)]
struct Taken {
    /// Per family, admitted subnets by network address; they never overlap
    /// each other, which makes an overlap check two neighbour lookups.
    subnets: [BTreeMap<IpAddr, (IpNet, Holder)>; 2],
    public_ips: HashMap<IpAddr, Holder>,
    vteps: HashMap<(usize, u32, MacAddr), Holder>,
}

impl Taken {
    fn overlap(&self, family: IpFamily, s: IpNet) -> Option<(IpNet, Holder)> {
        let map = &self.subnets[idx(family)];
        let before = map.range(..=s.network()).next_back();
        let after = map.range(s.network()..).next();
        [before, after]
            .into_iter()
            .flatten()
            .map(|(_, v)| *v)
            .find(|(t, _)| t.contains(&s.network()) || s.contains(&t.network()))
    }

    fn conflict(&self, f: &[FamilyFacts; 2]) -> Option<Reason> {
        for family in FAMILIES {
            let ff = &f[idx(family)];
            let Some(subnet) = ff.subnet else { continue };
            if let Some((other, holder)) = self.overlap(family, subnet) {
                return Some(Reason::Overlap {
                    family,
                    subnet,
                    other,
                    holder,
                });
            }
            if let Some(ip) = ff.public_ip {
                if let Some(&holder) = self.public_ips.get(&ip) {
                    return Some(Reason::PublicIpTaken { family, ip, holder });
                }
            }
            if let Some((vni, mac)) = ff.vtep {
                if let Some(&holder) = self.vteps.get(&(idx(family), vni, mac)) {
                    return Some(Reason::VtepMacTaken {
                        family,
                        mac,
                        vni,
                        holder,
                    });
                }
            }
        }
        None
    }

    fn insert(&mut self, holder: Holder, f: &[FamilyFacts; 2]) {
        for family in FAMILIES {
            let ff = &f[idx(family)];
            let Some(subnet) = ff.subnet else { continue };
            self.subnets[idx(family)].insert(subnet.network(), (subnet, holder));
            if let Some(ip) = ff.public_ip {
                self.public_ips.entry(ip).or_insert(holder);
            }
            if let Some((vni, mac)) = ff.vtep {
                self.vteps.entry((idx(family), vni, mac)).or_insert(holder);
            }
        }
    }
}

/// Splits `leases` into those the datapath may program and those it must
/// not (see the module documentation for the rules and who keeps a
/// contested entry). `own_key` and `own_attrs` are this node's lease as it
/// publishes it: never rejected, and what peers are checked against even
/// when the store's copy differs. Deterministic: the same set in any order
/// gives the same answer.
pub fn admit(
    nets: &ClusterNets,
    own_key: &LeaseKey,
    own_attrs: &LeaseAttrs,
    leases: &[Lease],
    now: SystemTime,
) -> Admission {
    let (admitted, rejected) = decide(nets, Some((own_key, own_attrs)), leases.iter(), now);
    Admission {
        admitted: admitted.into_iter().cloned().collect(),
        rejected,
    }
}

/// [`admit`] as a node that holds none of `leases` decides (rules 2 and 3
/// of the order alone): what every node programs, except that a node whose
/// own lease is contested keeps its own. `flannelctl leases` shows this.
pub fn admit_as_observer(nets: &ClusterNets, leases: &[Lease], now: SystemTime) -> Admission {
    let (admitted, rejected) = decide(nets, None, leases.iter(), now);
    Admission {
        admitted: admitted.into_iter().cloned().collect(),
        rejected,
    }
}

/// [`admit`] over borrowed leases: the admitted ones and the rejections,
/// each sorted by key.
fn decide<'a>(
    nets: &ClusterNets,
    own: Option<(&LeaseKey, &LeaseAttrs)>,
    leases: impl Iterator<Item = &'a Lease>,
    now: SystemTime,
) -> (Vec<&'a Lease>, Vec<Rejection>) {
    let mut taken = Taken::default();
    if let Some((key, attrs)) = own {
        taken.insert(Holder::Own(*key), &facts(nets, key, attrs));
    }
    let own_key = own.map(|(k, _)| *k);
    let mut admitted = Vec::new();
    let mut rejected = Vec::new();
    let mut candidates = Vec::new();
    for l in leases {
        if Some(l.key) == own_key {
            admitted.push(l);
            continue;
        }
        if l.is_expired(now) {
            continue;
        }
        let f = facts(nets, &l.key, &l.attrs);
        if f.iter().all(|ff| ff.subnet.is_none()) {
            // No subnet in an enabled family: nothing to program, nothing
            // to contest.
            admitted.push(l);
            continue;
        }
        match invalid(nets, &f) {
            Some(reason) => rejected.push(Rejection { key: l.key, reason }),
            None => candidates.push((!regular_length(nets, &f), l, f)),
        }
    }
    candidates.sort_by_key(|(irregular, l, _)| (*irregular, l.key));
    for (_, l, f) in candidates {
        match taken.conflict(&f) {
            Some(reason) => rejected.push(Rejection { key: l.key, reason }),
            None => {
                taken.insert(Holder::Peer(l.key), &f);
                admitted.push(l);
            }
        }
    }
    admitted.sort_by_key(|l| l.key);
    rejected.sort_by_key(|r| r.key);
    (admitted, rejected)
}

/// How many leases claim each PublicIP, VtepMAC and subnet, over every
/// lease an [`Admitter`] holds (rejected and expired ones included): tells
/// whether a lease's admission can involve any other lease. Counts, not key
/// sets: a few bytes per lease even at 20,000 leases.
#[derive(Debug, Default, PartialEq, Eq)]
struct Claims {
    ips: BTreeMap<IpAddr, u32>,
    vteps: BTreeMap<(usize, u32, MacAddr), u32>,
    /// Per family, by (network address, prefix length); may overlap.
    subnets: [BTreeMap<(IpAddr, u8), u32>; 2],
}

fn count_up<K: Ord>(m: &mut BTreeMap<K, u32>, k: K) {
    *m.entry(k).or_insert(0) += 1;
}

fn count_down<K: Ord>(m: &mut BTreeMap<K, u32>, k: K) {
    if let std::collections::btree_map::Entry::Occupied(mut e) = m.entry(k) {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
        }
    }
}

/// `keys` counted, as a map built at once: full nodes, where one grown
/// by inserts in key order is about half empty.
fn counts<K: Ord>(mut keys: Vec<K>) -> BTreeMap<K, u32> {
    keys.sort_unstable();
    let mut out: Vec<(K, u32)> = Vec::new();
    for k in keys {
        match out.last_mut() {
            Some((last, n)) if *last == k => *n += 1,
            _ => out.push((k, 1)),
        }
    }
    out.into_iter().collect()
}

impl Claims {
    /// The claims of all of `facts` (what [`Claims::add`] of each gives).
    fn of<'f>(facts: impl IntoIterator<Item = &'f [FamilyFacts; 2]>) -> Claims {
        let (mut ips, mut vteps) = (Vec::new(), Vec::new());
        let mut subnets = [Vec::new(), Vec::new()];
        for f in facts {
            for family in FAMILIES {
                let ff = &f[idx(family)];
                if let Some(s) = ff.subnet {
                    subnets[idx(family)].push((s.network(), s.prefix_len()));
                }
                ips.extend(ff.public_ip);
                if let Some((vni, mac)) = ff.vtep {
                    vteps.push((idx(family), vni, mac));
                }
            }
        }
        let [s4, s6] = subnets;
        Claims {
            ips: counts(ips),
            vteps: counts(vteps),
            subnets: [counts(s4), counts(s6)],
        }
    }

    fn add(&mut self, f: &[FamilyFacts; 2]) {
        for family in FAMILIES {
            let ff = &f[idx(family)];
            if let Some(s) = ff.subnet {
                count_up(
                    &mut self.subnets[idx(family)],
                    (s.network(), s.prefix_len()),
                );
            }
            if let Some(ip) = ff.public_ip {
                count_up(&mut self.ips, ip);
            }
            if let Some((vni, mac)) = ff.vtep {
                count_up(&mut self.vteps, (idx(family), vni, mac));
            }
        }
    }

    fn remove(&mut self, f: &[FamilyFacts; 2]) {
        for family in FAMILIES {
            let ff = &f[idx(family)];
            if let Some(s) = ff.subnet {
                count_down(
                    &mut self.subnets[idx(family)],
                    (s.network(), s.prefix_len()),
                );
            }
            if let Some(ip) = ff.public_ip {
                count_down(&mut self.ips, ip);
            }
            if let Some((vni, mac)) = ff.vtep {
                count_down(&mut self.vteps, (idx(family), vni, mac));
            }
        }
    }

    /// Whether another lease claims a PublicIP or VtepMAC of `f`, or a
    /// subnet overlapping one of `f`'s: the supernets of each subnet (one
    /// look-up per shorter prefix) and the subnets inside it (a range of
    /// network addresses). `mine` are the claims the asking lease holds
    /// itself right now (counted here, but not another lease's).
    fn meet(&self, f: &[FamilyFacts; 2], mine: Option<&[FamilyFacts; 2]>) -> bool {
        let others = |n: u32, claimed_by_me: bool| n > u32::from(claimed_by_me);
        for family in FAMILIES {
            let ff = &f[idx(family)];
            let own = mine.map(|m| &m[idx(family)]);
            if let Some(ip) = ff.public_ip {
                let n = self.ips.get(&ip).copied().unwrap_or(0);
                if others(n, own.is_some_and(|o| o.public_ip == Some(ip))) {
                    return true;
                }
            }
            if let Some((vni, mac)) = ff.vtep {
                let n = self
                    .vteps
                    .get(&(idx(family), vni, mac))
                    .copied()
                    .unwrap_or(0);
                if others(n, own.is_some_and(|o| o.vtep == Some((vni, mac)))) {
                    return true;
                }
            }
            let Some(s) = ff.subnet else { continue };
            let map = &self.subnets[idx(family)];
            let mine_is = |net: IpAddr, len: u8| {
                own.and_then(|o| o.subnet)
                    .is_some_and(|m| m.network() == net && m.prefix_len() == len)
            };
            for len in 0..=s.prefix_len() {
                let sup = IpNet::new(s.network(), len)
                    .expect("shorter prefix")
                    .trunc();
                let n = map.get(&(sup.network(), len)).copied().unwrap_or(0);
                if others(n, mine_is(sup.network(), len)) {
                    return true;
                }
            }
            let (lo, hi) = (s.network(), s.broadcast());
            if map
                .range((lo, 0)..=(hi, u8::MAX))
                .any(|(&(net, len), &n)| len >= s.prefix_len() && others(n, mine_is(net, len)))
            {
                return true;
            }
        }
        false
    }
}

/// What an admission update changed: what the datapath must now program
/// and forget, and the rejections to tell the operator about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdmissionDelta {
    /// Leases admitted now that were not, or admitted in another version.
    pub upserts: Vec<Arc<Lease>>,
    /// Leases no longer admitted (gone, expired or now rejected).
    pub removed: Vec<LeaseKey>,
    /// Rejections that are new or have another reason now.
    pub rejected: Vec<Rejection>,
    /// Leases rejected before that no longer are (admitted, or gone).
    pub cleared: Vec<LeaseKey>,
}

impl AdmissionDelta {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty()
            && self.removed.is_empty()
            && self.rejected.is_empty()
            && self.cleared.is_empty()
    }
}

/// [`admit`] kept up to date change by change, so that one lease event
/// costs what it concerns: a change that meets no other lease (no shared
/// PublicIP or VtepMAC, no overlapping subnet, not our own lease) decides
/// only that lease; any other change, and [`Admitter::reset`], recompute
/// the whole admission with [`admit`]'s rules. Either way the result is
/// exactly [`admit`]'s over the current set.
#[derive(Debug)]
pub struct Admitter {
    nets: ClusterNets,
    own_key: LeaseKey,
    own_attrs: LeaseAttrs,
    own_facts: [FamilyFacts; 2],
    facts: BTreeMap<LeaseKey, [FamilyFacts; 2]>,
    claims: Claims,
    admitted: BTreeMap<LeaseKey, Arc<Lease>>,
    rejected: BTreeMap<LeaseKey, Reason>,
}

impl Admitter {
    /// An admitter for this node's lease (`own_key`, `own_attrs` as
    /// [`admit`] takes them), holding no lease yet.
    pub fn new(nets: ClusterNets, own_key: LeaseKey, own_attrs: LeaseAttrs) -> Admitter {
        Admitter {
            own_facts: facts(&nets, &own_key, &own_attrs),
            nets,
            own_key,
            own_attrs,
            facts: BTreeMap::new(),
            claims: Claims::default(),
            admitted: BTreeMap::new(),
            rejected: BTreeMap::new(),
        }
    }

    /// The admitted leases, by key.
    pub fn admitted(&self) -> &BTreeMap<LeaseKey, Arc<Lease>> {
        &self.admitted
    }

    /// The rejected leases and why, by key.
    pub fn rejected(&self) -> &BTreeMap<LeaseKey, Reason> {
        &self.rejected
    }

    /// Decides `all` (the whole lease set) from scratch.
    pub fn reset(
        &mut self,
        all: &BTreeMap<LeaseKey, Arc<Lease>>,
        now: SystemTime,
    ) -> AdmissionDelta {
        // Built at once (full nodes), not grown lease by lease.
        self.facts = all
            .iter()
            .filter(|(k, _)| **k != self.own_key)
            .map(|(k, l)| (*k, facts(&self.nets, k, &l.attrs)))
            .collect();
        self.claims = Claims::of(self.facts.values());
        self.recompute(all, now)
    }

    /// Applies a change of the lease set: `upserts` and `removed` are the
    /// leases that changed, `all` the set after the change.
    pub fn update(
        &mut self,
        all: &BTreeMap<LeaseKey, Arc<Lease>>,
        changed: impl IntoIterator<Item = LeaseKey>,
        now: SystemTime,
    ) -> AdmissionDelta {
        let changed: BTreeSet<LeaseKey> = changed.into_iter().collect();
        let mut old = Vec::new();
        for k in &changed {
            if let Some(f) = self.facts.remove(k) {
                self.claims.remove(&f);
                old.push((*k, f));
            }
            if *k == self.own_key {
                continue;
            }
            if let Some(l) = all.get(k) {
                let f = facts(&self.nets, k, &l.attrs);
                self.claims.add(&f);
                self.facts.insert(*k, f);
            }
        }
        let involved = changed.contains(&self.own_key)
            || old
                .iter()
                .any(|(k, f)| self.claims.meet(f, self.facts.get(k)))
            || changed.iter().any(|k| {
                self.facts
                    .get(k)
                    .is_some_and(|f| self.claims.meet(f, Some(f)) || self.meets_own(f))
            });
        if involved {
            return self.recompute(all, now);
        }
        let mut delta = AdmissionDelta::default();
        for k in changed {
            let decision = all.get(&k).and_then(|l| {
                if l.is_expired(now) {
                    return None;
                }
                let f = &self.facts[&k];
                Some(match invalid(&self.nets, f) {
                    Some(reason) => Err(reason),
                    None => Ok(Arc::clone(l)),
                })
            });
            self.set(k, decision, &mut delta);
        }
        delta
    }

    fn meets_own(&self, f: &[FamilyFacts; 2]) -> bool {
        let mut own = Claims::default();
        own.add(&self.own_facts);
        own.meet(f, None)
    }

    /// Records one lease's decision (`None`: neither admitted nor rejected).
    fn set(
        &mut self,
        k: LeaseKey,
        decision: Option<Result<Arc<Lease>, Reason>>,
        delta: &mut AdmissionDelta,
    ) {
        match decision {
            Some(Ok(l)) => {
                if self.rejected.remove(&k).is_some() {
                    delta.cleared.push(k);
                }
                if self
                    .admitted
                    .get(&k)
                    .is_none_or(|a| !Arc::ptr_eq(a, &l) && **a != *l)
                {
                    delta.upserts.push(Arc::clone(&l));
                }
                self.admitted.insert(k, l);
            }
            Some(Err(reason)) => {
                if self.admitted.remove(&k).is_some() {
                    delta.removed.push(k);
                }
                if self.rejected.get(&k) != Some(&reason) {
                    delta.rejected.push(Rejection {
                        key: k,
                        reason: reason.clone(),
                    });
                    self.rejected.insert(k, reason);
                }
            }
            None => {
                if self.admitted.remove(&k).is_some() {
                    delta.removed.push(k);
                }
                if self.rejected.remove(&k).is_some() {
                    delta.cleared.push(k);
                }
            }
        }
    }

    /// The whole admission again; the delta against what it was.
    fn recompute(
        &mut self,
        all: &BTreeMap<LeaseKey, Arc<Lease>>,
        now: SystemTime,
    ) -> AdmissionDelta {
        let (admitted, rejected) = decide(
            &self.nets,
            Some((&self.own_key, &self.own_attrs)),
            all.values().map(|l| &**l),
            now,
        );
        let mut decisions: BTreeMap<LeaseKey, Option<Result<Arc<Lease>, Reason>>> = self
            .admitted
            .keys()
            .chain(self.rejected.keys())
            .map(|k| (*k, None))
            .collect();
        for l in admitted {
            decisions.insert(l.key, Some(Ok(Arc::clone(&all[&l.key]))));
        }
        for r in rejected {
            decisions.insert(r.key, Some(Err(r.reason)));
        }
        let mut delta = AdmissionDelta::default();
        for (k, d) in decisions {
            self.set(k, d, &mut delta);
        }
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::VxlanBackendData;
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    use std::time::Duration;

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000)
    }

    fn nets() -> ClusterNets {
        ClusterNets::from_config(&crate::config::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap())
    }

    fn dual_nets() -> ClusterNets {
        ClusterNets::from_config(
            &crate::config::parse(
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
            )
            .unwrap(),
        )
    }

    fn vx(key: &str, ip: &str, mac: &str) -> Lease {
        Lease {
            key: key.parse().unwrap(),
            attrs: LeaseAttrs::new_vxlan(
                Some(ip.parse().unwrap()),
                Some(VxlanBackendData {
                    vni: 1,
                    vtep_mac: mac.parse().unwrap(),
                }),
                None,
                None,
            ),
            expiration: Some(t0() + Duration::from_secs(3600)),
        }
    }

    fn own() -> Lease {
        vx("10.244.1.0-24", "172.16.1.14", "26:62:24:f0:61:01")
    }

    fn run(nets: &ClusterNets, leases: &[Lease]) -> Admission {
        let o = own();
        admit(nets, &o.key, &o.attrs, leases, t0())
    }

    fn keys(a: &Admission) -> Vec<String> {
        a.admitted.iter().map(|l| l.key.to_string()).collect()
    }

    fn reason_of(a: &Admission, key: &str) -> Reason {
        let k: LeaseKey = key.parse().unwrap();
        a.rejected
            .iter()
            .find(|r| r.key == k)
            .unwrap_or_else(|| panic!("{key} not rejected: {a:?}"))
            .reason
            .clone()
    }

    #[test]
    fn an_observer_decides_as_every_uncontested_node() {
        let rival = vx("10.244.1.128-25", "172.16.1.50", "02:00:00:00:00:50");
        let same_ip = vx("10.244.7.0-24", "172.16.1.13", "02:00:00:00:00:07");
        let ls = vec![
            own(),
            vx("10.244.2.0-24", "172.16.1.13", "52:17:43:ba:2e:56"),
            same_ip.clone(),
            rival.clone(),
            vx("10.244.9.0-24", "127.0.0.1", "02:00:00:00:00:09"),
        ];
        let o = admit_as_observer(&nets(), &ls, t0());
        // The regular /24 keeps its subnet from the /25, the lower key its
        // PublicIP; loopback is no node's address.
        assert_eq!(keys(&o), ["10.244.1.0-24", "10.244.2.0-24"]);
        assert!(matches!(
            reason_of(&o, "10.244.1.128-25"),
            Reason::Overlap { holder: Holder::Peer(k), .. } if k == own().key
        ));
        assert!(matches!(
            reason_of(&o, "10.244.7.0-24"),
            Reason::PublicIpTaken { .. }
        ));
        assert!(matches!(
            reason_of(&o, "10.244.9.0-24"),
            Reason::BadPublicIp { .. }
        ));
        // A peer (the other holder of 172.16.1.13) decides the same about
        // everything but its own lease, which it keeps.
        let p = admit(&nets(), &same_ip.key, &same_ip.attrs, &ls, t0());
        assert_eq!(keys(&p), ["10.244.1.0-24", "10.244.7.0-24"]);
        assert!(matches!(
            reason_of(&p, "10.244.2.0-24"),
            Reason::PublicIpTaken {
                holder: Holder::Own(_),
                ..
            }
        ));
        // Expired leases are left out and not reported.
        let mut gone = rival;
        gone.key = "10.244.12.0-24".parse().unwrap();
        gone.expiration = Some(t0() - Duration::from_secs(1));
        let o = admit_as_observer(&nets(), &[gone], t0());
        assert!(o.admitted.is_empty() && o.rejected.is_empty(), "{o:?}");
    }

    #[test]
    fn regular_cluster_is_admitted_whole() {
        let ls = vec![
            own(),
            vx("10.244.2.0-24", "172.16.1.13", "52:17:43:ba:2e:56"),
            vx("10.244.0.0-24", "172.16.1.8", "aa:bb:cc:00:00:08"),
        ];
        let a = run(&nets(), &ls);
        assert!(a.rejected.is_empty(), "{a:?}");
        assert_eq!(
            keys(&a),
            ["10.244.0.0-24", "10.244.1.0-24", "10.244.2.0-24"]
        );
    }

    #[test]
    fn subnet_outside_the_network_is_rejected_naming_both() {
        // Issue 14 item 1: the underlay's own subnet as a lease.
        let ls = vec![
            own(),
            vx("172.16.1.0-24", "172.16.1.99", "02:00:00:00:00:99"),
            vx("10.244.0.0-16", "172.16.1.98", "02:00:00:00:00:98"),
            vx("10.0.0.0-8", "172.16.1.97", "02:00:00:00:00:97"),
        ];
        let a = run(&nets(), &ls);
        assert_eq!(keys(&a), ["10.244.1.0-24"]);
        let r = reason_of(&a, "172.16.1.0-24");
        assert_eq!(
            r,
            Reason::OutsideNetwork {
                family: IpFamily::V4,
                subnet: "172.16.1.0/24".parse().unwrap(),
                network: "10.244.0.0/16".parse().unwrap(),
            }
        );
        let text = a
            .rejected
            .iter()
            .find(|x| x.reason == r)
            .unwrap()
            .to_string();
        assert!(
            text.contains("172.16.1.0-24")
                && text.contains("not inside the cluster network 10.244.0.0/16")
                && text.contains("delete"),
            "{text}"
        );
        // The whole network and a supernet are not "inside" either.
        assert!(matches!(
            reason_of(&a, "10.244.0.0-16"),
            Reason::OutsideNetwork { .. }
        ));
        assert!(matches!(
            reason_of(&a, "10.0.0.0-8"),
            Reason::OutsideNetwork { .. }
        ));
    }

    #[test]
    fn duplicate_vtep_mac_keeps_one_owner_in_any_order() {
        // Issue 14 item 2: one MAC, two PublicIPs.
        let a1 = vx("10.244.2.0-24", "172.16.1.13", "52:17:43:ba:2e:56");
        let a2 = vx("10.244.3.0-24", "172.16.1.33", "52:17:43:ba:2e:56");
        let a = run(&nets(), &[own(), a2.clone(), a1.clone()]);
        assert_eq!(keys(&a), ["10.244.1.0-24", "10.244.2.0-24"]);
        assert_eq!(
            reason_of(&a, "10.244.3.0-24"),
            Reason::VtepMacTaken {
                family: IpFamily::V4,
                mac: "52:17:43:ba:2e:56".parse().unwrap(),
                vni: 1,
                holder: Holder::Peer("10.244.2.0-24".parse().unwrap()),
            }
        );
        // Another VNI is another device: no conflict.
        let mut other_vni = a2.clone();
        other_vni.attrs.backend_data = Some(crate::lease::BackendData::new(
            &serde_json::json!({"VNI": 2, "VtepMAC": "52:17:43:ba:2e:56"}),
        ));
        assert!(run(&nets(), &[own(), a1, other_vni]).rejected.is_empty());
    }

    #[test]
    fn overlapping_subnets_keep_the_regular_length_then_the_lower_key() {
        // Issue 14 item 3: a /25 inside a peer's /24, and a /23 around it;
        // both sort before the /24 by key, yet the /24 keeps its subnet.
        let peer = vx("10.244.5.0-24", "172.16.1.5", "02:00:00:00:00:05");
        let inner = vx("10.244.5.0-25", "172.16.1.6", "02:00:00:00:00:06");
        let outer = vx("10.244.4.0-23", "172.16.1.7", "02:00:00:00:00:07");
        let a = run(&nets(), &[own(), inner, outer, peer]);
        assert_eq!(keys(&a), ["10.244.1.0-24", "10.244.5.0-24"]);
        for k in ["10.244.5.0-25", "10.244.4.0-23"] {
            match reason_of(&a, k) {
                Reason::Overlap { holder, other, .. } => {
                    assert_eq!(holder, Holder::Peer("10.244.5.0-24".parse().unwrap()));
                    assert_eq!(other, "10.244.5.0/24".parse::<IpNet>().unwrap());
                }
                r => panic!("{k}: {r:?}"),
            }
        }
        // Two irregular ones alone: the lower key keeps it.
        let a = run(
            &nets(),
            &[
                own(),
                vx("10.244.9.128-25", "172.16.1.9", "02:00:00:00:00:09"),
                vx("10.244.9.0-25", "172.16.1.10", "02:00:00:00:00:0a"),
                vx("10.244.8.0-22", "172.16.1.11", "02:00:00:00:00:0b"),
            ],
        );
        // 10.244.8.0/22 < 10.244.9.0/25 < 10.244.9.128/25: the /22 wins
        // and covers both /25s.
        assert_eq!(keys(&a), ["10.244.1.0-24", "10.244.8.0-22"]);
    }

    #[test]
    fn own_lease_is_never_the_one_skipped() {
        let o = own();
        let ls = vec![
            o.clone(),
            // Inside our subnet, and lower by key than ours.
            vx("10.244.1.0-25", "172.16.1.20", "02:00:00:00:00:20"),
            // Our PublicIP.
            vx("10.244.0.0-24", "172.16.1.14", "02:00:00:00:00:21"),
            // Our VtepMAC.
            vx("10.244.3.0-24", "172.16.1.22", "26:62:24:f0:61:01"),
        ];
        let a = run(&nets(), &ls);
        assert_eq!(keys(&a), ["10.244.1.0-24"]);
        let own_holder = Holder::Own(o.key);
        assert!(
            matches!(reason_of(&a, "10.244.1.0-25"), Reason::Overlap { holder, .. } if holder == own_holder)
        );
        assert!(
            matches!(reason_of(&a, "10.244.0.0-24"), Reason::PublicIpTaken { holder, .. } if holder == own_holder)
        );
        assert!(
            matches!(reason_of(&a, "10.244.3.0-24"), Reason::VtepMacTaken { holder, .. } if holder == own_holder)
        );
        // The own lease is admitted even when the store's copy is odd (the
        // daemon handles a lost lease itself).
        let mut odd = o.clone();
        odd.attrs.public_ip = Some("127.0.0.1".parse().unwrap());
        assert_eq!(keys(&run(&nets(), &[odd])), ["10.244.1.0-24"]);
    }

    #[test]
    fn unusable_public_ips_and_vtep_macs_are_rejected() {
        let cases = [
            (
                "10.244.2.0-24",
                "127.0.0.1",
                "02:00:00:00:00:02",
                "loopback",
            ),
            (
                "10.244.3.0-24",
                "10.244.7.7",
                "02:00:00:00:00:03",
                "inside the cluster network 10.244.0.0/16",
            ),
            (
                "10.244.4.0-24",
                "224.0.0.1",
                "02:00:00:00:00:04",
                "multicast",
            ),
            (
                "10.244.5.0-24",
                "255.255.255.255",
                "02:00:00:00:00:05",
                "broadcast",
            ),
            (
                "10.244.6.0-24",
                "172.16.1.6",
                "00:00:00:00:00:00",
                "VtepMAC 00:00:00:00:00:00 is the zero address",
            ),
            (
                "10.244.7.0-24",
                "172.16.1.7",
                "ff:ff:ff:ff:ff:ff",
                "broadcast",
            ),
            (
                "10.244.8.0-24",
                "172.16.1.8",
                "01:00:5e:00:00:01",
                "multicast",
            ),
        ];
        let mut ls = vec![own()];
        ls.extend(cases.iter().map(|(k, ip, mac, _)| vx(k, ip, mac)));
        let a = run(&nets(), &ls);
        assert_eq!(keys(&a), ["10.244.1.0-24"]);
        for (k, _, _, what) in cases {
            let text = a
                .rejected
                .iter()
                .find(|r| r.key.to_string() == k)
                .unwrap()
                .to_string();
            assert!(text.contains(what) && text.contains(k), "{text}");
        }
    }

    #[test]
    fn expired_leases_neither_programmed_nor_contesting() {
        let mut old = vx("10.244.2.0-24", "172.16.1.13", "52:17:43:ba:2e:56");
        old.expiration = Some(t0() - Duration::from_secs(1));
        let live = vx("10.244.2.0-25", "172.16.1.13", "52:17:43:ba:2e:56");
        let a = run(&nets(), &[own(), old, live]);
        assert!(a.rejected.is_empty());
        assert_eq!(keys(&a), ["10.244.1.0-24", "10.244.2.0-25"]);
    }

    #[test]
    fn dual_stack_checks_each_enabled_family() {
        let lease = |key: &str, ip6: &str, mac6: &str| Lease {
            key: key.parse().unwrap(),
            attrs: LeaseAttrs::new_vxlan(
                Some("172.16.1.30".parse().unwrap()),
                Some(VxlanBackendData {
                    vni: 1,
                    vtep_mac: "02:00:00:00:00:30".parse().unwrap(),
                }),
                Some(ip6.parse().unwrap()),
                Some(VxlanBackendData {
                    vni: 1,
                    vtep_mac: mac6.parse().unwrap(),
                }),
            ),
            expiration: None,
        };
        let o = Lease {
            key: "10.244.1.0-24&fd00:10:244:1::-64".parse().unwrap(),
            ..own()
        };
        let outside = lease(
            "10.244.3.0-24&fd00:99::-64",
            "fd00:1::30",
            "02:00:00:00:06:30",
        );
        let a = admit(
            &dual_nets(),
            &o.key,
            &o.attrs,
            std::slice::from_ref(&outside),
            t0(),
        );
        assert!(matches!(
            &a.rejected[0].reason,
            Reason::OutsideNetwork {
                family: IpFamily::V6,
                ..
            }
        ));
        // IPv4 only: the IPv6 half is not looked at.
        let a = admit(&nets(), &o.key, &o.attrs, &[outside], t0());
        assert!(a.rejected.is_empty(), "{a:?}");
        // An IPv6 PublicIP inside IPv6Network, an IPv6 multicast VtepMAC.
        let bad_ip = lease(
            "10.244.4.0-24&fd00:10:244:4::-64",
            "fd00:10:244:9::1",
            "02:00:00:00:06:31",
        );
        let bad_mac = lease(
            "10.244.5.0-24&fd00:10:244:5::-64",
            "fd00:1::31",
            "33:33:00:00:00:01",
        );
        let a = admit(&dual_nets(), &o.key, &o.attrs, &[bad_ip, bad_mac], t0());
        assert!(matches!(
            &a.rejected[0].reason,
            Reason::BadPublicIp {
                family: IpFamily::V6,
                ..
            }
        ));
        assert!(matches!(
            &a.rejected[1].reason,
            Reason::BadVtepMac {
                family: IpFamily::V6,
                ..
            }
        ));
    }

    #[test]
    fn the_answer_does_not_depend_on_arrival_order() {
        let mut ls = vec![
            own(),
            vx("10.244.2.0-24", "172.16.1.13", "52:17:43:ba:2e:56"),
            vx("10.244.3.0-24", "172.16.1.33", "52:17:43:ba:2e:56"),
            vx("10.244.2.128-25", "172.16.1.40", "02:00:00:00:00:40"),
            vx("10.244.6.0-23", "172.16.1.41", "02:00:00:00:00:41"),
            vx("10.244.7.0-24", "172.16.1.42", "02:00:00:00:00:42"),
            vx("10.244.8.0-24", "172.16.1.42", "02:00:00:00:00:43"),
            vx("10.244.9.0-24", "172.16.1.44", "02:00:00:00:00:44"),
            vx("172.16.1.0-24", "172.16.1.45", "02:00:00:00:00:45"),
        ];
        let want = run(&nets(), &ls);
        assert_eq!(
            keys(&want),
            [
                "10.244.1.0-24",
                "10.244.2.0-24",
                "10.244.7.0-24",
                "10.244.9.0-24"
            ]
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        for _ in 0..200 {
            ls.shuffle(&mut rng);
            assert_eq!(run(&nets(), &ls), want);
        }
    }

    /// The incremental admitter gives exactly `admit`'s answer after every
    /// change of a random sequence drawn from a small pool, so that shared
    /// PublicIPs and VtepMACs, nested and overlapping subnets, our own
    /// lease, invalid and expired leases all occur.
    #[test]
    fn the_admitter_always_equals_admit_over_the_whole_set() {
        use rand::Rng;
        let keys = [
            "10.244.1.0-24",
            "10.244.2.0-24",
            "10.244.2.0-25",
            "10.244.2.128-25",
            "10.244.3.0-24",
            "10.244.4.0-23",
            "10.244.5.0-24",
            "10.244.6.0-24",
            "10.244.0.0-16",
            "172.16.1.0-24",
        ];
        let ips = [
            "172.16.1.14",
            "172.16.1.13",
            "172.16.1.20",
            "172.16.1.21",
            "127.0.0.1",
            "10.244.9.9",
        ];
        let macs = [
            "26:62:24:f0:61:01",
            "02:00:00:00:00:02",
            "02:00:00:00:00:03",
            "02:00:00:00:00:04",
            "01:00:5e:00:00:01",
        ];
        let o = own();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for round in 0..40 {
            let mut adm = Admitter::new(nets(), o.key, o.attrs.clone());
            let mut all: BTreeMap<LeaseKey, Arc<Lease>> = BTreeMap::new();
            for step in 0..120 {
                let mut changed = Vec::new();
                for _ in 0..rng.random_range(1..=3) {
                    let key = keys[rng.random_range(0..keys.len())];
                    let k: LeaseKey = key.parse().unwrap();
                    if rng.random_bool(0.3) {
                        all.remove(&k);
                    } else {
                        let mut l = vx(
                            key,
                            ips[rng.random_range(0..ips.len())],
                            macs[rng.random_range(0..macs.len())],
                        );
                        if rng.random_bool(0.1) {
                            l.expiration = Some(t0() - Duration::from_secs(1));
                        }
                        all.insert(k, Arc::new(l));
                    }
                    changed.push(k);
                }
                if rng.random_bool(0.05) {
                    adm.reset(&all, t0());
                } else {
                    adm.update(&all, changed, t0());
                }
                let set: Vec<Lease> = all.values().map(|l| (**l).clone()).collect();
                let want = admit(&nets(), &o.key, &o.attrs, &set, t0());
                let got: Vec<Lease> = adm.admitted().values().map(|l| (**l).clone()).collect();
                assert_eq!(got, want.admitted, "round {round} step {step}");
                let got_r: Vec<Rejection> = adm
                    .rejected()
                    .iter()
                    .map(|(k, r)| Rejection {
                        key: *k,
                        reason: r.clone(),
                    })
                    .collect();
                assert_eq!(got_r, want.rejected, "round {round} step {step}");
            }
        }
    }

    #[test]
    fn claims_built_at_once_equal_claims_added_one_by_one() {
        let nets = dual_nets();
        let leases = [
            vx("10.244.1.0-24", "172.16.1.14", "02:00:00:00:00:02"),
            vx("10.244.2.0-24", "172.16.1.14", "02:00:00:00:00:02"),
            vx("10.244.2.0-25", "172.16.1.15", "02:00:00:00:00:03"),
            vx("10.244.3.0-24", "172.16.1.16", "02:00:00:00:00:02"),
        ];
        let all: Vec<[FamilyFacts; 2]> = leases
            .iter()
            .map(|l| facts(&nets, &l.key, &l.attrs))
            .collect();
        let mut one_by_one = Claims::default();
        for f in &all {
            one_by_one.add(f);
        }
        let at_once = Claims::of(&all);
        assert_eq!(at_once, one_by_one);
        assert_eq!(at_once.ips[&"172.16.1.14".parse::<IpAddr>().unwrap()], 2);
        for f in &all {
            one_by_one.remove(f);
        }
        assert_eq!(one_by_one, Claims::default(), "counted out to nothing");
    }

    /// The delta of an update says exactly what moved in and out.
    #[test]
    fn an_isolated_change_is_decided_alone_and_reported_as_a_delta() {
        let o = own();
        let mut adm = Admitter::new(nets(), o.key, o.attrs.clone());
        let mut all: BTreeMap<LeaseKey, Arc<Lease>> = BTreeMap::new();
        all.insert(o.key, Arc::new(o.clone()));
        let d = adm.reset(&all, t0());
        assert_eq!(d.upserts.len(), 1);
        let a = Arc::new(vx("10.244.2.0-24", "172.16.1.13", "02:00:00:00:00:02"));
        all.insert(a.key, a.clone());
        let d = adm.update(&all, [a.key], t0());
        assert_eq!(d.upserts, vec![a.clone()]);
        assert!(d.removed.is_empty() && d.rejected.is_empty());
        // Same VtepMAC as `a`: rejected, `a` keeps it.
        let b = Arc::new(vx("10.244.3.0-24", "172.16.1.20", "02:00:00:00:00:02"));
        all.insert(b.key, b.clone());
        let d = adm.update(&all, [b.key], t0());
        assert!(d.upserts.is_empty() && d.removed.is_empty());
        assert_eq!(d.rejected.len(), 1);
        assert!(matches!(d.rejected[0].reason, Reason::VtepMacTaken { .. }));
        // `a` goes: `b` is programmed now.
        all.remove(&a.key);
        let d = adm.update(&all, [a.key], t0());
        assert_eq!(d.removed, vec![a.key]);
        assert_eq!(d.upserts, vec![b.clone()]);
        assert_eq!(d.cleared, vec![b.key]);
    }
}
