//! Which subnet a node should hold: upstream's acquisition order as a pure
//! planner. The caller lists the leases, asks [`plan_acquisition`], then
//! carries the plan out against its store (a create-if-absent transaction
//! for [`Plan::Create`]; on a lost race it lists again and plans again).
//!
//! The order:
//! 1. a live lease (unexpired, or a reservation) whose public IP is ours and
//!    whose subnet is still valid for the config ([`key_is_valid`]); a
//!    reservation wins over an ordinary lease;
//! 2. the subnet from the previous subnet.env, if valid and free;
//! 3. a uniformly random free subnet between `SubnetMin` and `SubnetMax`.
//!
//! Expired leases count as free, reservations never expire. In dual stack
//! steps 2 and 3 run per family: the previous IPv4 subnet may be kept while
//! the IPv6 one is drawn afresh (upstream needs both to be reusable).
//! "Free" means overlapping no live lease, whatever that lease's length.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::SystemTime;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rand::Rng;

use crate::config::NetConfig;
use crate::ip::{self, SubnetFamily, SubnetPool};
use crate::lease::{Lease, LeaseKey};

/// This node's public addresses (`--public-ip`, `--public-ipv6`, or the
/// external interface's). A lease is ours when it names the same address in
/// every enabled family we have an address for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PublicIps {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl From<IpAddr> for PublicIps {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => PublicIps {
                v4: Some(v4),
                v6: None,
            },
            IpAddr::V6(v6) => PublicIps {
                v4: None,
                v6: Some(v6),
            },
        }
    }
}

impl From<Ipv4Addr> for PublicIps {
    fn from(ip: Ipv4Addr) -> Self {
        IpAddr::V4(ip).into()
    }
}

impl From<(Ipv4Addr, Ipv6Addr)> for PublicIps {
    fn from((v4, v6): (Ipv4Addr, Ipv6Addr)) -> Self {
        PublicIps {
            v4: Some(v4),
            v6: Some(v6),
        }
    }
}

/// What the node should do to hold a subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Keep this lease: renew it (update with a fresh TTL and our current
    /// attributes), or, for a reservation, just update the attributes and
    /// keep it without TTL.
    Reuse(Lease),
    /// Create a lease for this key, guarded by "key does not exist".
    Create(LeaseKey),
}

/// No subnet can be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("no free subnet left in {network} between SubnetMin {min} and SubnetMax {max}: every one is leased or reserved; widen SubnetMin/SubnetMax, use a longer SubnetLen, or delete leases of nodes that are gone")]
    Exhausted {
        network: IpNet,
        min: IpAddr,
        max: IpAddr,
    },
}

/// Upstream's compatibility check for an existing lease: for each enabled
/// family the key has a subnet inside the network with exactly the
/// configured length (`SubnetMin`/`SubnetMax` are not checked, so a
/// reservation below `SubnetMin` stays valid); a disabled family must be
/// absent from the key.
pub fn key_is_valid(cfg: &NetConfig, key: &LeaseKey) -> bool {
    let v4 = match (cfg.ipv4_pool(), key.ipv4) {
        (Some(pool), Some(n)) => pool.is_valid(&n),
        (None, None) => true,
        _ => false,
    };
    let v6 = match (cfg.ipv6_pool(), key.ipv6) {
        (Some(pool), Some(n)) => pool.is_valid(&n),
        (None, None) => true,
        _ => false,
    };
    v4 && v6 && !key.is_empty()
}

/// Whether the lease names our public address(es) in the families `cfg`
/// enables. `false` when there is nothing to compare.
pub fn is_ours(cfg: &NetConfig, lease: &Lease, own: &PublicIps) -> bool {
    let mut compared = false;
    if cfg.enable_ipv4 {
        if let Some(ip) = own.v4 {
            if lease.attrs.public_ip != Some(ip) {
                return false;
            }
            compared = true;
        }
    }
    if cfg.enable_ipv6 {
        if let Some(ip) = own.v6 {
            if lease.attrs.public_ipv6 != Some(ip) {
                return false;
            }
            compared = true;
        }
    }
    compared
}

/// Our own live, non-reservation leases that the config no longer accepts
/// (another network or subnet length): upstream deletes them before
/// acquiring. [`plan_acquisition`] still counts them as taken, so deleting
/// them is tidying, not a precondition.
pub fn stale_own_leases(
    cfg: &NetConfig,
    leases: &[Lease],
    own: impl Into<PublicIps>,
    now: SystemTime,
) -> Vec<LeaseKey> {
    let own = own.into();
    leases
        .iter()
        .filter(|l| {
            l.is_live(now)
                && !l.is_reservation()
                && is_ours(cfg, l, &own)
                && !key_is_valid(cfg, &l.key)
        })
        .map(|l| l.key)
        .collect()
}

/// Decides which subnet this node should hold; see the module docs for the
/// order. `previous` is the key of the last subnet.env
/// ([`crate::subnet_env::SubnetEnv::lease_key`]).
///
/// Cost: O(n log n) for n leases, independent of the size of the range.
pub fn plan_acquisition<R: Rng + ?Sized>(
    cfg: &NetConfig,
    leases: &[Lease],
    own_public_ip: impl Into<PublicIps>,
    previous: Option<LeaseKey>,
    now: SystemTime,
    rng: &mut R,
) -> Result<Plan, AllocError> {
    let own = own_public_ip.into();

    // (1) A live lease of ours that is still valid; reservations first,
    // then the one with the most time left, then the lowest key.
    let mine = leases
        .iter()
        .filter(|l| l.is_live(now) && is_ours(cfg, l, &own) && key_is_valid(cfg, &l.key))
        .min_by(|a, b| {
            let rank = |l: &Lease| (!l.is_reservation(), std::cmp::Reverse(l.expiration));
            rank(a).cmp(&rank(b)).then(a.key.cmp(&b.key))
        });
    if let Some(l) = mine {
        return Ok(Plan::Reuse(l.clone()));
    }

    let live: Vec<&Lease> = leases.iter().filter(|l| l.is_live(now)).collect();
    let mut key = LeaseKey {
        ipv4: None,
        ipv6: None,
    };
    if let Some(pool) = cfg.ipv4_pool() {
        let taken: Vec<Ipv4Net> = live.iter().filter_map(|l| l.key.ipv4).collect();
        key.ipv4 = Some(pick(&pool, &taken, previous.and_then(|k| k.ipv4), rng)?);
    }
    if let Some(pool) = cfg.ipv6_pool() {
        let taken: Vec<Ipv6Net> = live.iter().filter_map(|l| l.key.ipv6).collect();
        key.ipv6 = Some(pick(&pool, &taken, previous.and_then(|k| k.ipv6), rng)?);
    }
    Ok(Plan::Create(key))
}

/// Steps (2) and (3) for one family.
fn pick<N, R>(
    pool: &SubnetPool<N>,
    taken: &[N],
    previous: Option<N>,
    rng: &mut R,
) -> Result<N, AllocError>
where
    N: SubnetFamily + Into<IpNet>,
    N::Addr: Into<IpAddr>,
    R: Rng + ?Sized,
{
    if let Some(prev) = previous {
        if pool.is_valid(&prev) && !taken.iter().any(|t| ip::overlaps(t, &prev)) {
            return Ok(prev);
        }
    }
    pool.random_free(rng, taken)
        .ok_or_else(|| AllocError::Exhausted {
            network: pool.network().into(),
            min: pool.min().addr().into(),
            max: pool.max().addr().into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::lease::{LeaseAttrs, VxlanBackendData};
    use crate::mac::MacAddr;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000)
    }

    fn ip4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn lease(key: &str, public_ip: &str, expires_in: Option<i64>) -> Lease {
        let exp = expires_in.map(|s| {
            if s >= 0 {
                t0() + Duration::from_secs(s as u64)
            } else {
                t0() - Duration::from_secs((-s) as u64)
            }
        });
        Lease {
            key: key.parse().unwrap(),
            attrs: LeaseAttrs::new_vxlan(
                Some(ip4(public_ip)),
                Some(VxlanBackendData {
                    vni: 1,
                    vtep_mac: MacAddr([2, 0, 0, 0, 0, 1]),
                }),
                None,
                None,
            ),
            expiration: exp,
        }
    }

    fn cfg16() -> NetConfig {
        parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap()
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(42)
    }

    #[test]
    fn step1_reuses_our_live_lease() {
        let leases = [
            lease("10.244.5.0-24", "172.16.0.9", Some(3600)),
            lease("10.244.7.0-24", "172.16.0.1", Some(3600)),
        ];
        let p = plan_acquisition(&cfg16(), &leases, ip4("172.16.0.1"), None, t0(), &mut rng());
        assert_eq!(p, Ok(Plan::Reuse(leases[1].clone())));
        // Also when a previous subnet is known: (1) comes first.
        let prev = Some("10.244.9.0-24".parse().unwrap());
        let p = plan_acquisition(&cfg16(), &leases, ip4("172.16.0.1"), prev, t0(), &mut rng());
        assert_eq!(p, Ok(Plan::Reuse(leases[1].clone())));
    }

    #[test]
    fn step1_prefers_reservation_and_skips_expired_and_invalid() {
        let ours = "172.16.0.1";
        let leases = [
            lease("10.244.7.0-24", ours, Some(3600)),
            lease("10.244.0.0-24", ours, None), // reservation below SubnetMin: still valid
            lease("10.244.9.0-24", ours, Some(-1)),
        ];
        let p = plan_acquisition(&cfg16(), &leases, ip4(ours), None, t0(), &mut rng());
        assert_eq!(p, Ok(Plan::Reuse(leases[1].clone())));

        // Expired own lease only: not reused, and its subnet is free again.
        let leases = [lease("10.244.9.0-24", ours, Some(-1))];
        let prev = Some("10.244.9.0-24".parse().unwrap());
        let p = plan_acquisition(&cfg16(), &leases, ip4(ours), prev, t0(), &mut rng());
        assert_eq!(p, Ok(Plan::Create("10.244.9.0-24".parse().unwrap())));

        // Own lease of the wrong length or network: not reused, reported stale.
        let leases = [
            lease("10.244.8.0-23", ours, Some(60)),
            lease("10.9.0.0-24", ours, Some(60)),
            lease("10.9.1.0-24", ours, None),
        ];
        let p = plan_acquisition(&cfg16(), &leases, ip4(ours), None, t0(), &mut rng()).unwrap();
        let Plan::Create(k) = p else { panic!("{p:?}") };
        assert!(!ip::overlaps(
            &k.ipv4.unwrap(),
            &"10.244.8.0/23".parse::<Ipv4Net>().unwrap()
        ));
        let stale = stale_own_leases(&cfg16(), &leases, ip4(ours), t0());
        assert_eq!(
            stale,
            vec![
                "10.244.8.0-23".parse().unwrap(),
                "10.9.0.0-24".parse().unwrap()
            ],
            "reservations are never reported stale"
        );
    }

    #[test]
    fn step1_prefers_longest_remaining_lease() {
        let ours = "172.16.0.1";
        let leases = [
            lease("10.244.7.0-24", ours, Some(60)),
            lease("10.244.3.0-24", ours, Some(600)),
        ];
        let p = plan_acquisition(&cfg16(), &leases, ip4(ours), None, t0(), &mut rng());
        assert_eq!(p, Ok(Plan::Reuse(leases[1].clone())));
    }

    #[test]
    fn step2_previous_subnet_if_valid_and_free() {
        let prev: LeaseKey = "10.244.42.0-24".parse().unwrap();
        let others = [lease("10.244.5.0-24", "172.16.0.9", Some(3600))];
        let p = plan_acquisition(
            &cfg16(),
            &others,
            ip4("172.16.0.1"),
            Some(prev),
            t0(),
            &mut rng(),
        );
        assert_eq!(p, Ok(Plan::Create(prev)));

        // Taken by someone else (live lease or reservation): random instead.
        for exp in [Some(3600), None] {
            let others = [lease("10.244.42.0-24", "172.16.0.9", exp)];
            let p = plan_acquisition(
                &cfg16(),
                &others,
                ip4("172.16.0.1"),
                Some(prev),
                t0(),
                &mut rng(),
            )
            .unwrap();
            assert_ne!(p, Plan::Create(prev));
            assert!(matches!(p, Plan::Create(_)));
        }
        // Taken by an overlapping lease of another length.
        let others = [lease("10.244.42.0-23", "172.16.0.9", Some(60))];
        let p = plan_acquisition(
            &cfg16(),
            &others,
            ip4("172.16.0.1"),
            Some(prev),
            t0(),
            &mut rng(),
        );
        assert_ne!(p, Ok(Plan::Create(prev)));

        // Invalid for the config: random instead.
        for bad in ["10.245.1.0-24", "10.244.42.0-25"] {
            let bad: LeaseKey = bad.parse().unwrap();
            let p = plan_acquisition(
                &cfg16(),
                &[],
                ip4("172.16.0.1"),
                Some(bad),
                t0(),
                &mut rng(),
            )
            .unwrap();
            let Plan::Create(k) = p else { panic!() };
            assert!(cfg16().ipv4_pool().unwrap().contains(&k.ipv4.unwrap()));
        }

        // Valid although below SubnetMin: kept (upstream only checks network and length).
        let first: LeaseKey = "10.244.0.0-24".parse().unwrap();
        let p = plan_acquisition(
            &cfg16(),
            &[],
            ip4("172.16.0.1"),
            Some(first),
            t0(),
            &mut rng(),
        );
        assert_eq!(p, Ok(Plan::Create(first)));
    }

    #[test]
    fn step3_random_within_min_max_and_free() {
        let cfg = parse(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.13.0"}"#,
        )
        .unwrap();
        let others = [
            lease("10.244.10.0-24", "172.16.0.2", Some(60)),
            lease("10.244.11.0-24", "172.16.0.3", None),
            lease("10.244.13.0-24", "172.16.0.4", Some(-60)), // expired: free
        ];
        let mut r = rng();
        let mut seen = BTreeSet::new();
        for _ in 0..200 {
            let Plan::Create(k) =
                plan_acquisition(&cfg, &others, ip4("172.16.0.1"), None, t0(), &mut r).unwrap()
            else {
                panic!()
            };
            seen.insert(k.to_string());
        }
        assert_eq!(
            seen,
            BTreeSet::from(["10.244.12.0-24".to_string(), "10.244.13.0-24".to_string()])
        );
    }

    #[test]
    fn exhaustion() {
        let cfg = parse(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.11.0"}"#,
        )
        .unwrap();
        let others = [
            lease("10.244.10.0-24", "172.16.0.2", Some(60)),
            lease("10.244.11.0-24", "172.16.0.3", None),
        ];
        let e =
            plan_acquisition(&cfg, &others, ip4("172.16.0.1"), None, t0(), &mut rng()).unwrap_err();
        assert_eq!(
            e,
            AllocError::Exhausted {
                network: "10.244.0.0/16".parse().unwrap(),
                min: "10.244.10.0".parse().unwrap(),
                max: "10.244.11.0".parse().unwrap(),
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("10.244.0.0/16") && msg.contains("SubnetMax"),
            "{msg}"
        );
        // The same, an hour later, when the first lease has expired: it is free again.
        let later = t0() + Duration::from_secs(3600);
        let p = plan_acquisition(&cfg, &others, ip4("172.16.0.1"), None, later, &mut rng());
        assert_eq!(p, Ok(Plan::Create("10.244.10.0-24".parse().unwrap())));
    }

    #[test]
    fn finds_the_last_free_subnet_in_a_big_range() {
        // /8 split in /24: 65535 candidates, all but one taken.
        let cfg = parse(r#"{"Network":"10.0.0.0/8"}"#).unwrap();
        let pool = cfg.ipv4_pool().unwrap();
        let hole = "10.200.17.0/24".parse::<Ipv4Net>().unwrap();
        let leases: Vec<Lease> = pool
            .iter()
            .filter(|n| *n != hole)
            .map(|n| lease(&LeaseKey::v4(n).to_string(), "172.16.0.2", Some(60)))
            .collect();
        let p = plan_acquisition(&cfg, &leases, ip4("172.16.0.1"), None, t0(), &mut rng());
        assert_eq!(p, Ok(Plan::Create(LeaseKey::v4(hole))));
    }

    fn dual_cfg() -> NetConfig {
        parse(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#)
            .unwrap()
    }

    fn dual_lease(key: &str, v4: &str, v6: &str, exp: Option<i64>) -> Lease {
        let mut l = lease(key, v4, exp);
        l.attrs.public_ipv6 = Some(v6.parse().unwrap());
        l
    }

    #[test]
    fn dual_stack() {
        let cfg = dual_cfg();
        let own: PublicIps = (ip4("172.16.0.1"), "fd00::1".parse().unwrap()).into();
        // Step 1 needs both addresses to match and both subnets valid.
        let leases = [
            dual_lease(
                "10.244.3.0-24&fd00:10:244:3::-64",
                "172.16.0.1",
                "fd00::9",
                Some(60),
            ),
            dual_lease(
                "10.244.4.0-24&fd00:10:244:4::-64",
                "172.16.0.1",
                "fd00::1",
                Some(60),
            ),
            dual_lease("10.244.5.0-24", "172.16.0.1", "fd00::1", None),
        ];
        let p = plan_acquisition(&cfg, &leases, own, None, t0(), &mut rng());
        assert_eq!(p, Ok(Plan::Reuse(leases[1].clone())));

        // Create: the key carries both families, each free.
        let p = plan_acquisition(&cfg, &leases[..1], own, None, t0(), &mut rng()).unwrap();
        let Plan::Create(k) = p else { panic!() };
        let (v4, v6) = (k.ipv4.unwrap(), k.ipv6.unwrap());
        assert!(cfg.ipv4_pool().unwrap().contains(&v4));
        assert!(cfg.ipv6_pool().unwrap().contains(&v6));
        assert_ne!(v4, "10.244.3.0/24".parse::<Ipv4Net>().unwrap());
        assert_ne!(v6, "fd00:10:244:3::/64".parse::<Ipv6Net>().unwrap());

        // Previous IPv4-only subnet.env: the IPv4 part is kept, IPv6 drawn.
        let prev: LeaseKey = "10.244.77.0-24".parse().unwrap();
        let p = plan_acquisition(&cfg, &[], own, Some(prev), t0(), &mut rng()).unwrap();
        let Plan::Create(k) = p else { panic!() };
        assert_eq!(k.ipv4, prev.ipv4);
        assert!(k.ipv6.is_some());

        // A v4-only config does not accept a dual key as ours.
        let leases = [dual_lease(
            "10.244.4.0-24&fd00:10:244:4::-64",
            "172.16.0.1",
            "fd00::1",
            Some(60),
        )];
        let p = plan_acquisition(&cfg16(), &leases, ip4("172.16.0.1"), None, t0(), &mut rng());
        assert!(matches!(p, Ok(Plan::Create(_))));
        assert_eq!(
            stale_own_leases(&cfg16(), &leases, ip4("172.16.0.1"), t0()).len(),
            1
        );
    }

    #[test]
    fn ipv6_only() {
        let cfg =
            parse(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/48"}"#)
                .unwrap();
        let own = PublicIps::from("fd00::1".parse::<IpAddr>().unwrap());
        let p = plan_acquisition(&cfg, &[], own, None, t0(), &mut rng()).unwrap();
        let Plan::Create(k) = p else { panic!() };
        assert!(k.ipv4.is_none());
        assert_eq!(k.ipv6.unwrap().prefix_len(), 64);
        // With no address of an enabled family nothing is "ours".
        let mut l = lease("10.244.1.0-24", "172.16.0.1", Some(60));
        l.key = k;
        assert!(!is_ours(&cfg, &l, &PublicIps::from(ip4("172.16.0.1"))));
    }

    /// A store with create-if-absent, as etcd's transaction.
    struct SimStore {
        leases: BTreeMap<LeaseKey, Lease>,
    }

    impl SimStore {
        fn create(&mut self, key: LeaseKey, ip: Ipv4Addr) -> bool {
            // Guard on overlap too: a real store guards on the exact key, but
            // a plan never proposes a key overlapping a live lease.
            if self.leases.keys().any(|k| k.overlaps(&key)) {
                return false;
            }
            let mut l = lease(&key.to_string(), "0.0.0.0", Some(3600));
            l.attrs.public_ip = Some(ip);
            self.leases.insert(key, l);
            true
        }
        fn snapshot(&self) -> Vec<Lease> {
            self.leases.values().cloned().collect()
        }
    }

    #[test]
    fn many_acquirers_with_races() {
        // 62 nodes race for a /26-split /20 (63 candidates): each round every
        // node plans from the same stale snapshot, one create per key wins,
        // losers plan again from a fresh snapshot.
        let cfg = parse(r#"{"Network":"10.250.0.0/20","SubnetLen":26}"#).unwrap();
        let pool = cfg.ipv4_pool().unwrap();
        assert_eq!(pool.count(), 63);
        let mut store = SimStore {
            leases: BTreeMap::new(),
        };
        let nodes: Vec<Ipv4Addr> = (1..=62).map(|i| Ipv4Addr::new(172, 16, 1, i)).collect();
        let mut pending: Vec<Ipv4Addr> = nodes.clone();
        let mut r = StdRng::seed_from_u64(9);
        let mut rounds = 0;
        while !pending.is_empty() {
            rounds += 1;
            assert!(rounds < 200, "no progress");
            let snap = store.snapshot();
            let plans: Vec<(Ipv4Addr, Plan)> = pending
                .iter()
                .map(|&ip| {
                    (
                        ip,
                        plan_acquisition(&cfg, &snap, ip, None, t0(), &mut r).unwrap(),
                    )
                })
                .collect();
            pending.clear();
            for (ip, plan) in plans {
                match plan {
                    Plan::Reuse(l) => assert_eq!(l.attrs.public_ip, Some(ip)),
                    Plan::Create(k) => {
                        if !store.create(k, ip) {
                            pending.push(ip);
                        }
                    }
                }
            }
        }
        // Every node holds exactly one distinct subnet of the pool.
        let snap = store.snapshot();
        assert_eq!(snap.len(), nodes.len());
        let subnets: BTreeSet<Ipv4Net> = snap.iter().map(|l| l.key.ipv4.unwrap()).collect();
        assert_eq!(subnets.len(), nodes.len());
        assert!(subnets.iter().all(|n| pool.contains(n)));
        // Each node, asking again, reuses its own lease.
        for &ip in &nodes {
            let p = plan_acquisition(&cfg, &snap, ip, None, t0(), &mut r).unwrap();
            let Plan::Reuse(l) = p else {
                panic!("{ip}: {p:?}")
            };
            assert_eq!(l.attrs.public_ip, Some(ip));
        }
        // One more node gets the last subnet, and the one after that finds none.
        let p = plan_acquisition(&cfg, &snap, ip4("172.16.2.1"), None, t0(), &mut r).unwrap();
        let Plan::Create(k) = p else { panic!() };
        assert!(store.create(k, ip4("172.16.2.1")));
        let e = plan_acquisition(
            &cfg,
            &store.snapshot(),
            ip4("172.16.2.2"),
            None,
            t0(),
            &mut r,
        );
        assert!(matches!(e, Err(AllocError::Exhausted { .. })));
    }
}
