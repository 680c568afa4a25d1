//! Peer routes through nexthop objects in large clusters
//! (`ip nexthop replace id ID via GW dev DEV onlink` + `ip route replace
//! DST nhid ID`).
//!
//! Why: the kernel gives every IPv4 route with its own gateway its own
//! `fib_info` and hashes those without the gateway, so all the peer routes
//! of one device share one hash chain and adding N of them is O(N²) (20,000
//! vxlan or host-gw routes: 5.6 s of kernel time). A route that names a
//! nexthop object skips that search (0.47 s).
//!
//! When: above [`DEFAULT_THRESHOLD`] peers (or `FLANNELD_NEXTHOP_THRESHOLD`,
//! see [`threshold_from_env`]) and when the kernel has nexthop objects
//! (probed once with a nexthop dump). Below it the routes stay exactly
//! upstream flannel's `ip route` lines. Leaving the mode needs the peer
//! count to fall to 7/8 of the threshold, so one lease coming and going at
//! the threshold does not rewrite every route each time.
//!
//! Which nexthops are ours: ids in `[ID_BASE, ID_BASE + ID_SPAN)` with
//! protocol [`PROTOCOL`]; every other nexthop is never touched (a stale
//! route of ours that names another's object is deleted by that id, as the
//! kernel matches such a route by id only; the object stays). Ids are
//! allocated from the kernel's state (an existing object of ours with the
//! right gateway, device and onlink flag is reused, so a restart rewrites
//! nothing), and an object of ours that no route uses is deleted at the end
//! of a full pass, or in an event pass when its last route goes.
//!
//! Switching mode replaces route by route (`ip route replace` is atomic per
//! route), nexthops before the routes that name them, and deletes the
//! objects only once no route names them: no peer loses its route.

use std::collections::HashMap;
use std::net::IpAddr;

use flannel_core::datapath::Route;
use flannel_netlink::{Netlink, Nexthop};
use ipnet::IpNet;

/// First nexthop id of ours.
pub const ID_BASE: u32 = 0x0f1a_0000;
/// Number of ids of ours (two per peer in dual stack is far below it).
pub const ID_SPAN: u32 = 1 << 20;
/// `nh_protocol` of our nexthops (`ip nexthop` shows "proto 241"). Not in
/// iproute2's `rt_protos` table, so no routing daemon claims it.
pub const PROTOCOL: u8 = 241;
/// Peers above which routes go through nexthop objects.
pub const DEFAULT_THRESHOLD: usize = 1000;
/// The environment variable that overrides [`DEFAULT_THRESHOLD`] (a
/// developer knob: tests force the nexthop path with 0).
pub const THRESHOLD_ENV: &str = "FLANNELD_NEXTHOP_THRESHOLD";

/// `FLANNELD_NEXTHOP_THRESHOLD` as a peer count; unset: the default.
pub fn threshold_from_env() -> Result<usize, String> {
    match std::env::var(THRESHOLD_ENV) {
        Err(_) => Ok(DEFAULT_THRESHOLD),
        Ok(v) => v.trim().parse().map_err(|_| {
            format!(
                "{THRESHOLD_ENV}={v:?} is not a peer count: use a whole number (0 = always use nexthop objects), or unset it for {DEFAULT_THRESHOLD}"
            )
        }),
    }
}

/// Whether `id` is in our range.
pub fn owns_id(id: u32) -> bool {
    (ID_BASE..ID_BASE + ID_SPAN).contains(&id)
}

/// What a nexthop object of ours stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NhKey {
    pub gateway: IpAddr,
    pub oif: u32,
    pub onlink: bool,
}

/// The object a route would use; `None` for routes that stay plain
/// (device-only routes, IPv4 routes via an IPv6 gateway).
pub fn key_of(r: &Route) -> Option<NhKey> {
    let gw = r.gateway?;
    (gw.is_ipv4() == r.dst.addr().is_ipv4()).then_some(NhKey {
        gateway: gw,
        oif: r.oif,
        onlink: r.onlink,
    })
}

/// The nexthop objects of ours and the routes that name them, as known
/// from the last full pass's dumps and the writes since.
#[derive(Debug)]
pub struct Nexthops {
    threshold: usize,
    /// `None` until probed.
    supported: Option<bool>,
    /// Routes go through nexthop objects now.
    pub enabled: bool,
    ids: HashMap<NhKey, u32>,
    keys: HashMap<u32, NhKey>,
    /// dst -> the object of ours the kernel's route to dst names.
    routes: HashMap<IpNet, u32>,
    users: HashMap<u32, u32>,
    /// dst -> the object not of ours that the kernel's route to dst names
    /// (someone else's route, or one left by another tool): deleting such a
    /// route needs its id, the kernel matches a route with an object by id.
    foreign: HashMap<IpNet, u32>,
    /// Objects whose last route went since the last collection.
    orphans: Vec<u32>,
    next: u32,
}

impl Nexthops {
    pub fn new(threshold: usize) -> Self {
        Nexthops {
            threshold,
            supported: None,
            enabled: false,
            ids: HashMap::new(),
            keys: HashMap::new(),
            routes: HashMap::new(),
            users: HashMap::new(),
            foreign: HashMap::new(),
            orphans: Vec::new(),
            next: ID_BASE,
        }
    }

    /// The mode `peers` calls for, from the current one (with hysteresis).
    pub fn wants(&self, peers: usize) -> bool {
        if self.supported == Some(false) {
            return false;
        }
        if self.enabled {
            peers > self.threshold - self.threshold / 8
        } else {
            peers > self.threshold
        }
    }

    /// Start of a full pass: reads our objects back (probing support on
    /// the first call) and sets the mode for `peers`. `routes` are the
    /// kernel's routes with the object each names. A failed dump on a
    /// kernel that has nexthops is an error (the pass then keeps the old
    /// mode and writes no nexthop).
    pub fn sync(
        &mut self,
        nl: &mut Netlink,
        peers: usize,
        routes: &[flannel_netlink::RouteEntry],
    ) -> flannel_netlink::Result<()> {
        if self.supported == Some(false) {
            return Ok(());
        }
        let all = match nl.list_nexthops() {
            Ok(all) => all,
            Err(e) if self.supported.is_none() && flannel_netlink::nexthops_unsupported(&e) => {
                tracing::info!(error = %e, "the kernel has no nexthop objects: peer routes stay plain routes at any cluster size");
                self.supported = Some(false);
                self.enabled = false;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        self.supported = Some(true);
        self.ids.clear();
        self.keys.clear();
        let mut ours: Vec<&Nexthop> = all
            .iter()
            .filter(|n| owns_id(n.id) && n.protocol == PROTOCOL)
            .collect();
        ours.sort_by_key(|n| n.id);
        for n in ours {
            let Some(gateway) = n.gateway else {
                // Not a shape we write: unused, so deleted at the end.
                self.keys.insert(
                    n.id,
                    NhKey {
                        gateway: IpAddr::from([0u8; 4]),
                        oif: 0,
                        onlink: false,
                    },
                );
                continue;
            };
            let key = NhKey {
                gateway,
                oif: n.oif,
                onlink: n.onlink,
            };
            // A second object for the same key (none of ours makes one) is
            // left unused and deleted.
            self.ids.entry(key).or_insert(n.id);
            self.keys.insert(n.id, key);
        }
        self.routes.clear();
        self.users.clear();
        self.orphans.clear();
        self.foreign.clear();
        for e in routes {
            match e.nhid {
                Some(id) if self.keys.contains_key(&id) => {
                    self.routes.insert(e.route.dst, id);
                    *self.users.entry(id).or_default() += 1;
                }
                Some(id) => {
                    self.foreign.insert(e.route.dst, id);
                }
                None => {}
            }
        }
        let enabled = self.wants(peers);
        if enabled != self.enabled {
            tracing::info!(
                peers,
                threshold = self.threshold,
                "{} peer routes through nexthop objects",
                if enabled { "putting" } else { "taking" }
            );
        }
        self.enabled = enabled;
        Ok(())
    }

    /// Whether the kernel's route `r` (naming `nhid`) has the form the
    /// mode wants for a desired route.
    pub fn has_wanted_form(&self, r: &Route, nhid: Option<u32>) -> bool {
        match (self.enabled, key_of(r)) {
            (true, Some(key)) => nhid.is_some() && nhid == self.ids.get(&key).copied(),
            _ => nhid.is_none(),
        }
    }

    /// The object of ours the kernel's route to `dst` names, if any.
    pub fn route_nhid(&self, dst: &IpNet) -> Option<u32> {
        self.routes.get(dst).copied()
    }

    /// `ip route replace` of `r` in the current mode: through its object
    /// (created first when missing) or as a plain route. Returns the
    /// nexthop written, if any, for the log.
    pub fn replace_route(
        &mut self,
        nl: &mut Netlink,
        r: &Route,
    ) -> flannel_netlink::Result<Option<u32>> {
        // The replace takes the route over, whatever object it named.
        self.foreign.remove(&r.dst);
        let key = key_of(r).filter(|_| self.enabled);
        let Some(key) = key else {
            nl.replace_route(r)?;
            self.set_route(r.dst, None);
            return Ok(None);
        };
        let id = match self.ids.get(&key) {
            Some(id) => *id,
            None => {
                let id = self.allocate()?;
                nl.replace_nexthop(&Nexthop {
                    id,
                    gateway: Some(key.gateway),
                    oif: key.oif,
                    onlink: key.onlink,
                    protocol: PROTOCOL,
                })?;
                self.ids.insert(key, id);
                self.keys.insert(id, key);
                id
            }
        };
        nl.replace_route_nhid(r.dst, id)?;
        self.set_route(r.dst, Some(id));
        Ok(Some(id))
    }

    /// `ip route del` of `r`, by the object it names when it names one
    /// (ours or another's: a route with an object matches no `via`).
    pub fn del_route(&mut self, nl: &mut Netlink, r: &Route) -> flannel_netlink::Result<()> {
        match self
            .route_nhid(&r.dst)
            .or_else(|| self.foreign.get(&r.dst).copied())
        {
            Some(id) => nl.del_route_nhid(r.dst, id)?,
            None => nl.del_route(r)?,
        }
        self.foreign.remove(&r.dst);
        self.set_route(r.dst, None);
        Ok(())
    }

    /// Deletes our objects that no route names (`all`: every one known,
    /// else those whose last route went since the last call); returns what
    /// was deleted (`ip nexthop del id ID`) and the failures.
    pub fn collect_unused(&mut self, nl: &mut Netlink, all: bool) -> (Vec<String>, Vec<String>) {
        let candidates: Vec<u32> = if all {
            self.orphans.clear();
            self.keys.keys().copied().collect()
        } else {
            std::mem::take(&mut self.orphans)
        };
        let mut unused: Vec<u32> = candidates
            .into_iter()
            .filter(|id| self.keys.contains_key(id) && !self.users.contains_key(id))
            .collect();
        unused.sort_unstable();
        unused.dedup();
        let (mut done, mut failed) = (Vec::new(), Vec::new());
        for id in unused {
            let what = format!("deleted unused nexthop id {id}");
            match nl.del_nexthop(id) {
                Ok(()) => {
                    self.forget(id);
                    done.push(what);
                }
                Err(e) => failed.push(format!("{what}: {e}")),
            }
        }
        (done, failed)
    }

    fn forget(&mut self, id: u32) {
        if let Some(key) = self.keys.remove(&id) {
            if self.ids.get(&key) == Some(&id) {
                self.ids.remove(&key);
            }
        }
    }

    /// Records which object (if any) the kernel's route to `dst` names now.
    fn set_route(&mut self, dst: IpNet, id: Option<u32>) {
        let old = match id {
            Some(id) => self.routes.insert(dst, id),
            None => self.routes.remove(&dst),
        };
        if old == id {
            return;
        }
        if let Some(old) = old {
            if let Some(n) = self.users.get_mut(&old) {
                *n -= 1;
                if *n == 0 {
                    self.users.remove(&old);
                    self.orphans.push(old);
                }
            }
        }
        if let Some(id) = id {
            *self.users.entry(id).or_default() += 1;
        }
    }

    /// The lowest free id at or after the cursor, wrapping once.
    fn allocate(&mut self) -> flannel_netlink::Result<u32> {
        for _ in 0..ID_SPAN {
            let id = self.next;
            self.next = if id + 1 >= ID_BASE + ID_SPAN {
                ID_BASE
            } else {
                id + 1
            };
            if !self.keys.contains_key(&id) {
                return Ok(id);
            }
        }
        Err(flannel_netlink::Error::Invalid {
            op: "ip nexthop add".into(),
            detail: format!("all {ID_SPAN} nexthop ids of flannel are in use"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: &str, gw: &str) -> Route {
        Route {
            dst: dst.parse().unwrap(),
            gateway: Some(gw.parse().unwrap()),
            oif: 5,
            onlink: true,
        }
    }

    #[test]
    fn mode_switches_with_hysteresis() {
        let mut n = Nexthops::new(1000);
        assert!(!n.wants(1000));
        assert!(n.wants(1001));
        n.enabled = true;
        assert!(n.wants(876));
        assert!(!n.wants(875));
        n.supported = Some(false);
        assert!(!n.wants(5000));
        let mut zero = Nexthops::new(0);
        assert!(zero.wants(1));
        zero.enabled = true;
        assert!(zero.wants(1));
        assert!(!zero.wants(0));
    }

    #[test]
    fn only_same_family_gateway_routes_use_objects() {
        assert!(key_of(&route("10.244.2.0/24", "10.244.2.0")).is_some());
        assert!(key_of(&route("10.244.2.0/24", "fd00::1")).is_none());
        let mut r = route("10.244.2.0/24", "10.244.2.0");
        r.gateway = None;
        assert!(key_of(&r).is_none());
        assert!(owns_id(ID_BASE) && owns_id(ID_BASE + ID_SPAN - 1));
        assert!(!owns_id(ID_BASE - 1) && !owns_id(ID_BASE + ID_SPAN));
    }

    #[test]
    fn wanted_form_follows_the_mode_and_the_users_are_counted() {
        let mut n = Nexthops::new(0);
        let r = route("10.244.2.0/24", "10.244.2.0");
        let key = key_of(&r).unwrap();
        n.ids.insert(key, ID_BASE + 3);
        n.keys.insert(ID_BASE + 3, key);
        assert!(n.has_wanted_form(&r, None));
        assert!(!n.has_wanted_form(&r, Some(ID_BASE + 3)));
        n.enabled = true;
        assert!(!n.has_wanted_form(&r, None));
        assert!(!n.has_wanted_form(&r, Some(ID_BASE + 4)));
        assert!(n.has_wanted_form(&r, Some(ID_BASE + 3)));
        n.set_route(r.dst, Some(ID_BASE + 3));
        n.set_route(r.dst, Some(ID_BASE + 3));
        assert_eq!(n.users.get(&(ID_BASE + 3)), Some(&1));
        n.set_route(r.dst, None);
        assert!(n.users.is_empty());
        // Allocation skips the ids in use.
        n.next = ID_BASE + 3;
        assert_eq!(n.allocate().unwrap(), ID_BASE + 4);
    }
}
