//! Subnet arithmetic for IPv4 and IPv6, done on `u128` for both families.
//!
//! A [`SubnetPool`] is what net-conf.json describes for one family: the
//! cluster `Network`, the per-node `SubnetLen` and the range of subnets
//! `SubnetMin..=SubnetMax` that new leases are carved from.

use std::fmt::{Debug, Display};
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use rand::Rng;

/// An IP network type of one family ([`Ipv4Net`] or [`Ipv6Net`]) seen as
/// integers, so subnet arithmetic is written once for both.
pub trait SubnetFamily: Copy + Eq + Ord + Debug + Display {
    /// The family's address type.
    type Addr: Copy + Eq + Ord + Debug + Display;
    /// Address width: 32 or 128.
    const BITS: u8;
    /// The address as an integer.
    fn addr_to_u128(a: Self::Addr) -> u128;
    /// The address from an integer (truncated to the family's width).
    fn addr_from_u128(v: u128) -> Self::Addr;
    /// The network's address as given (host bits included, if any).
    fn addr(&self) -> Self::Addr;
    /// The prefix length.
    fn prefix(&self) -> u8;
    /// `addr/prefix` without clearing host bits. `prefix` must be <= `BITS`.
    fn with_prefix(addr: Self::Addr, prefix: u8) -> Self;
}

impl SubnetFamily for Ipv4Net {
    type Addr = Ipv4Addr;
    const BITS: u8 = 32;
    fn addr_to_u128(a: Ipv4Addr) -> u128 {
        u128::from(u32::from(a))
    }
    fn addr_from_u128(v: u128) -> Ipv4Addr {
        Ipv4Addr::from(v as u32)
    }
    fn addr(&self) -> Ipv4Addr {
        Ipv4Net::addr(self)
    }
    fn prefix(&self) -> u8 {
        self.prefix_len()
    }
    fn with_prefix(addr: Ipv4Addr, prefix: u8) -> Self {
        Ipv4Net::new(addr, prefix).expect("IPv4 prefix length <= 32")
    }
}

impl SubnetFamily for Ipv6Net {
    type Addr = Ipv6Addr;
    const BITS: u8 = 128;
    fn addr_to_u128(a: Ipv6Addr) -> u128 {
        u128::from(a)
    }
    fn addr_from_u128(v: u128) -> Ipv6Addr {
        Ipv6Addr::from(v)
    }
    fn addr(&self) -> Ipv6Addr {
        Ipv6Net::addr(self)
    }
    fn prefix(&self) -> u8 {
        self.prefix_len()
    }
    fn with_prefix(addr: Ipv6Addr, prefix: u8) -> Self {
        Ipv6Net::new(addr, prefix).expect("IPv6 prefix length <= 128")
    }
}

/// Number of host bits of a prefix, as a shift amount.
fn host_bits<N: SubnetFamily>(prefix: u8) -> u32 {
    u32::from(N::BITS - prefix)
}

/// Mask of the host bits for a shift of `hb` host bits.
fn host_mask(hb: u32) -> u128 {
    if hb >= 128 {
        u128::MAX
    } else {
        (1u128 << hb) - 1
    }
}

/// Mask of the network bits of `prefix` within the family's width.
fn net_mask<N: SubnetFamily>(prefix: u8) -> u128 {
    let width_mask = if N::BITS == 128 {
        u128::MAX
    } else {
        (1u128 << N::BITS) - 1
    };
    let hb = host_bits::<N>(prefix);
    if hb >= 128 {
        0
    } else {
        (width_mask >> hb) << hb
    }
}

/// First and last address of `n` as integers.
fn bounds<N: SubnetFamily>(n: &N) -> (u128, u128) {
    let m = net_mask::<N>(n.prefix());
    let a = N::addr_to_u128(n.addr()) & m;
    let width_mask = if N::BITS == 128 {
        u128::MAX
    } else {
        (1u128 << N::BITS) - 1
    };
    (a, a | (!m & width_mask))
}

/// Whether two networks of the same family share at least one address.
pub fn overlaps<N: SubnetFamily>(a: &N, b: &N) -> bool {
    let (a0, a1) = bounds(a);
    let (b0, b1) = bounds(b);
    a0 <= b1 && b0 <= a1
}

/// Whether `inner` lies entirely inside `outer`.
pub fn contains_net<N: SubnetFamily>(outer: &N, inner: &N) -> bool {
    let (o0, o1) = bounds(outer);
    let (i0, i1) = bounds(inner);
    o0 <= i0 && i1 <= o1
}

/// Whether `n` has no host bits set (`10.244.1.0/24` yes, `10.244.1.5/24` no).
pub fn is_network_address<N: SubnetFamily>(n: &N) -> bool {
    N::addr_to_u128(n.addr()) & !net_mask::<N>(n.prefix()) == 0
}

/// The subnet of the same length right after `n` (`10.244.1.0/24` ->
/// `10.244.2.0/24`); `None` past the end of the address space.
pub fn next_subnet<N: SubnetFamily>(n: &N) -> Option<N> {
    let (_, last) = bounds(n);
    let next = last.checked_add(1)?;
    if N::BITS < 128 && next >> N::BITS != 0 {
        return None;
    }
    Some(N::with_prefix(N::addr_from_u128(next), n.prefix()))
}

/// The first usable address of a subnet with the subnet's prefix
/// (`10.244.1.0/24` -> `10.244.1.1/24`): what subnet.env's `FLANNEL_SUBNET`
/// and the bridge `cni0` carry. For a /32 (/128) the address itself.
pub fn first_usable<N: SubnetFamily>(n: &N) -> N {
    let (first, last) = bounds(n);
    let a = if last > first { first + 1 } else { first };
    N::with_prefix(N::addr_from_u128(a), n.prefix())
}

/// The network a first-usable address belongs to (`10.244.1.1/24` ->
/// `10.244.1.0/24`): the inverse of [`first_usable`].
pub fn network_of<N: SubnetFamily>(n: &N) -> N {
    let (first, _) = bounds(n);
    N::with_prefix(N::addr_from_u128(first), n.prefix())
}

/// The subnets of one length that new leases are carved from:
/// `SubnetMin..=SubnetMax` inside `Network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetPool<N: SubnetFamily> {
    network: N,
    subnet_len: u8,
    /// Address of the first subnet of the range.
    min: u128,
    /// Address of the last subnet of the range.
    max: u128,
}

impl<N: SubnetFamily> SubnetPool<N> {
    /// A pool of `/subnet_len` subnets from the one at `min` to the one at
    /// `max` (both subnet addresses) inside `network`. `None` when these are
    /// inconsistent (length shorter than the network's prefix, min/max not
    /// aligned or outside, min > max); a [`crate::config::NetConfig`] from
    /// [`crate::config::parse`] is always consistent.
    pub fn new(network: N, subnet_len: u8, min: N::Addr, max: N::Addr) -> Option<Self> {
        if subnet_len > N::BITS || subnet_len < network.prefix() {
            return None;
        }
        let network = network_of(&network);
        let min = N::addr_to_u128(min);
        let max = N::addr_to_u128(max);
        let mask = net_mask::<N>(subnet_len);
        let (n0, n1) = bounds(&network);
        let ok = |a: u128| a & mask == a && a >= n0 && a <= n1;
        if !ok(min) || !ok(max) || min > max {
            return None;
        }
        Some(SubnetPool {
            network,
            subnet_len,
            min,
            max,
        })
    }

    /// The cluster network.
    pub fn network(&self) -> N {
        self.network
    }

    /// The length of every subnet in the pool.
    pub fn subnet_len(&self) -> u8 {
        self.subnet_len
    }

    /// The first subnet of the range (`SubnetMin`).
    pub fn min(&self) -> N {
        N::with_prefix(N::addr_from_u128(self.min), self.subnet_len)
    }

    /// The last subnet of the range (`SubnetMax`).
    pub fn max(&self) -> N {
        N::with_prefix(N::addr_from_u128(self.max), self.subnet_len)
    }

    fn shift(&self) -> u32 {
        host_bits::<N>(self.subnet_len)
    }

    /// How many subnets the range holds (saturating for IPv6 ranges of
    /// 2^128 subnets, which no valid config produces).
    pub fn count(&self) -> u128 {
        let s = self.shift();
        let span = if s >= 128 {
            0
        } else {
            (self.max - self.min) >> s
        };
        span.saturating_add(1)
    }

    /// The `i`-th subnet of the range, from 0.
    pub fn nth(&self, i: u128) -> Option<N> {
        if i >= self.count() {
            return None;
        }
        let a = self.min + (i << self.shift());
        Some(N::with_prefix(N::addr_from_u128(a), self.subnet_len))
    }

    /// Position of `n` in the range: `Some` only for an aligned subnet of the
    /// pool's length between min and max.
    pub fn index_of(&self, n: &N) -> Option<u128> {
        if n.prefix() != self.subnet_len || !is_network_address(n) {
            return None;
        }
        let a = N::addr_to_u128(n.addr());
        (self.min..=self.max)
            .contains(&a)
            .then(|| (a - self.min) >> self.shift())
    }

    /// Whether `n` is one of the subnets new leases are carved from.
    pub fn contains(&self, n: &N) -> bool {
        self.index_of(n).is_some()
    }

    /// Upstream's compatibility check for an existing lease: inside the
    /// network with exactly the configured length. The min/max range is NOT
    /// checked, so a reservation below `SubnetMin` stays valid.
    pub fn is_valid(&self, n: &N) -> bool {
        n.prefix() == self.subnet_len && is_network_address(n) && contains_net(&self.network, n)
    }

    /// Every subnet of the range in order.
    pub fn iter(&self) -> impl Iterator<Item = N> + '_ {
        let count = self.count();
        let mut i = 0u128;
        std::iter::from_fn(move || {
            if i >= count {
                return None;
            }
            let n = self.nth(i);
            i += 1;
            n
        })
    }

    /// A uniformly random subnet of the range.
    pub fn random<R: Rng + ?Sized>(&self, rng: &mut R) -> N {
        let i = rng.random_range(0..self.count());
        self.nth(i).expect("index below count")
    }

    /// Indices of the range covered (even partly) by `taken`, as merged,
    /// sorted, inclusive intervals.
    fn taken_intervals<'a>(&self, taken: impl IntoIterator<Item = &'a N>) -> Vec<(u128, u128)>
    where
        N: 'a,
    {
        let s = self.shift();
        let last_idx = self.count() - 1;
        let mut iv: Vec<(u128, u128)> = taken
            .into_iter()
            .filter_map(|t| {
                let (t0, t1) = bounds(t);
                let lo_addr = t0.max(self.min);
                let hi_addr = t1.min(self.max | host_mask(s));
                if lo_addr > hi_addr {
                    return None;
                }
                let lo = (lo_addr - self.min) >> s;
                let hi = ((hi_addr - self.min) >> s).min(last_idx);
                Some((lo, hi))
            })
            .collect();
        iv.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(iv.len());
        for (lo, hi) in iv {
            match merged.last_mut() {
                Some((_, mhi)) if lo <= mhi.saturating_add(1) => *mhi = (*mhi).max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        merged
    }

    /// How many subnets of the range overlap none of `taken`.
    pub fn free_count<'a>(&self, taken: impl IntoIterator<Item = &'a N>) -> u128
    where
        N: 'a,
    {
        let used: u128 = self
            .taken_intervals(taken)
            .iter()
            .map(|(lo, hi)| hi - lo + 1)
            .sum();
        self.count() - used
    }

    /// A uniformly random subnet of the range that overlaps none of `taken`
    /// (subnets of any length); `None` when every subnet is taken.
    ///
    /// Costs O(k log k) for k taken subnets, whatever the size of the range:
    /// it picks the r-th free index by stepping over the sorted taken
    /// intervals instead of listing the candidates.
    pub fn random_free<'a, R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        taken: impl IntoIterator<Item = &'a N>,
    ) -> Option<N>
    where
        N: 'a,
    {
        let iv = self.taken_intervals(taken);
        let used: u128 = iv.iter().map(|(lo, hi)| hi - lo + 1).sum();
        let free = self.count() - used;
        if free == 0 {
            return None;
        }
        let mut r = rng.random_range(0..free);
        for (lo, hi) in iv {
            if lo <= r {
                r += hi - lo + 1;
            } else {
                break;
            }
        }
        self.nth(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn v4(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn v6(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }
    fn pool4(net: &str, len: u8, min: &str, max: &str) -> SubnetPool<Ipv4Net> {
        SubnetPool::new(v4(net), len, min.parse().unwrap(), max.parse().unwrap()).unwrap()
    }

    #[test]
    fn next_and_first_usable() {
        assert_eq!(next_subnet(&v4("10.244.1.0/24")), Some(v4("10.244.2.0/24")));
        assert_eq!(
            next_subnet(&v4("10.244.255.0/24")),
            Some(v4("10.245.0.0/24"))
        );
        assert_eq!(next_subnet(&v4("255.255.255.0/24")), None);
        assert_eq!(next_subnet(&v6("fd00::/64")), Some(v6("fd00:0:0:1::/64")));
        assert_eq!(next_subnet(&v6("ffff:ffff:ffff:ffff::/64")), None);
        assert_eq!(first_usable(&v4("10.244.1.0/24")), v4("10.244.1.1/24"));
        assert_eq!(
            first_usable(&v6("fd00:10:244:1::/64")),
            v6("fd00:10:244:1::1/64")
        );
        assert_eq!(first_usable(&v4("10.0.0.7/32")), v4("10.0.0.7/32"));
        assert_eq!(network_of(&v4("10.244.1.1/24")), v4("10.244.1.0/24"));
        assert_eq!(
            network_of(&v6("fd00:10:244:1::1/64")),
            v6("fd00:10:244:1::/64")
        );
    }

    #[test]
    fn overlap_and_containment() {
        assert!(overlaps(&v4("10.244.0.0/16"), &v4("10.244.3.0/24")));
        assert!(overlaps(&v4("10.244.2.0/23"), &v4("10.244.3.0/24")));
        assert!(!overlaps(&v4("10.244.2.0/24"), &v4("10.244.3.0/24")));
        assert!(contains_net(&v4("10.244.0.0/16"), &v4("10.244.3.0/24")));
        assert!(!contains_net(&v4("10.244.3.0/24"), &v4("10.244.0.0/16")));
        assert!(contains_net(&v6("fd00::/48"), &v6("fd00:0:0:5::/64")));
        assert!(is_network_address(&v4("10.244.1.0/24")));
        assert!(!is_network_address(&v4("10.244.1.1/24")));
    }

    #[test]
    fn pool_count_nth_index() {
        let p = pool4("10.244.0.0/16", 24, "10.244.1.0", "10.244.255.0");
        assert_eq!(p.count(), 255);
        assert_eq!(p.nth(0), Some(v4("10.244.1.0/24")));
        assert_eq!(p.nth(254), Some(v4("10.244.255.0/24")));
        assert_eq!(p.nth(255), None);
        assert_eq!(p.index_of(&v4("10.244.7.0/24")), Some(6));
        assert_eq!(p.index_of(&v4("10.244.0.0/24")), None, "below min");
        assert_eq!(p.index_of(&v4("10.244.7.0/25")), None, "wrong length");
        assert_eq!(p.index_of(&v4("10.244.7.1/24")), None, "host bits");
        assert_eq!(p.iter().count(), 255);
        assert_eq!(p.iter().last(), Some(v4("10.244.255.0/24")));
        assert_eq!(p.min(), v4("10.244.1.0/24"));
        assert_eq!(p.max(), v4("10.244.255.0/24"));
    }

    #[test]
    fn pool_new_rejects_inconsistent_input() {
        let n = v4("10.244.0.0/16");
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert!(SubnetPool::new(n, 15, a("10.244.0.0"), a("10.244.0.0")).is_none());
        assert!(SubnetPool::new(n, 24, a("10.244.1.1"), a("10.244.2.0")).is_none());
        assert!(SubnetPool::new(n, 24, a("10.245.1.0"), a("10.245.2.0")).is_none());
        assert!(SubnetPool::new(n, 24, a("10.244.3.0"), a("10.244.2.0")).is_none());
        assert!(SubnetPool::new(n, 33, a("10.244.3.0"), a("10.244.3.0")).is_none());
    }

    #[test]
    fn validity_ignores_min_max() {
        let p = pool4("10.244.0.0/16", 24, "10.244.10.0", "10.244.20.0");
        assert!(
            p.is_valid(&v4("10.244.0.0/24")),
            "below SubnetMin is still valid"
        );
        assert!(p.is_valid(&v4("10.244.200.0/24")));
        assert!(!p.is_valid(&v4("10.245.0.0/24")));
        assert!(!p.is_valid(&v4("10.244.0.0/25")));
        assert!(!p.contains(&v4("10.244.0.0/24")));
        assert!(p.contains(&v4("10.244.10.0/24")));
    }

    #[test]
    fn v6_pool_huge_range() {
        let p = SubnetPool::new(
            v6("fd00::/48"),
            64,
            "fd00:0:0:1::".parse().unwrap(),
            "fd00:0:0:ffff::".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(p.count(), 65535);
        assert_eq!(p.nth(1), Some(v6("fd00:0:0:2::/64")));
        // A /8 split into /124s: 2^116 subnets, still countable.
        let big = SubnetPool::new(
            v6("fd00::/8"),
            124,
            "fd00::10".parse().unwrap(),
            "fdff:ffff:ffff:ffff:ffff:ffff:ffff:fff0".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(big.count(), (1u128 << 116) - 1);
        let mut rng = StdRng::seed_from_u64(1);
        let r = big.random(&mut rng);
        assert!(big.contains(&r));
    }

    #[test]
    fn random_free_finds_the_last_free_one() {
        let p = pool4("10.244.0.0/16", 24, "10.244.1.0", "10.244.255.0");
        let last_free = v4("10.244.137.0/24");
        let taken: Vec<Ipv4Net> = p.iter().filter(|n| *n != last_free).collect();
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..50 {
            assert_eq!(p.random_free(&mut rng, &taken), Some(last_free));
        }
        assert_eq!(p.free_count(&taken), 1);
        let all: Vec<Ipv4Net> = p.iter().collect();
        assert_eq!(p.random_free(&mut rng, &all), None);
        assert_eq!(p.free_count(&all), 0);
    }

    #[test]
    fn random_free_respects_overlapping_lengths() {
        // Leases of another length (left from an older SubnetLen) still block
        // every subnet they overlap.
        let p = pool4("10.244.0.0/16", 24, "10.244.1.0", "10.244.4.0");
        let taken = [
            v4("10.244.0.0/23"),
            v4("10.244.2.128/25"),
            v4("10.244.4.0/22"),
        ];
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(p.free_count(&taken), 1);
        for _ in 0..20 {
            assert_eq!(p.random_free(&mut rng, &taken), Some(v4("10.244.3.0/24")));
        }
        // Outside the range: ignored.
        let outside = [v4("10.245.0.0/16"), v4("10.244.200.0/24")];
        assert_eq!(p.free_count(&outside), 4);
        // Whole network taken.
        assert_eq!(p.random_free(&mut rng, &[v4("10.0.0.0/8")]), None);
    }

    #[test]
    fn random_free_is_roughly_uniform() {
        let p = pool4("10.244.0.0/16", 24, "10.244.1.0", "10.244.10.0");
        let taken = [
            v4("10.244.3.0/24"),
            v4("10.244.4.0/24"),
            v4("10.244.9.0/24"),
        ];
        let mut rng = StdRng::seed_from_u64(11);
        let mut hits = std::collections::BTreeMap::new();
        for _ in 0..7000 {
            let n = p.random_free(&mut rng, &taken).unwrap();
            assert!(!taken.contains(&n));
            *hits.entry(n).or_insert(0u32) += 1;
        }
        assert_eq!(hits.len(), 7);
        for (n, c) in hits {
            assert!((700..1300).contains(&c), "{n} drawn {c} times of 7000");
        }
    }

    #[test]
    fn random_free_in_a_huge_v6_range() {
        // fd00::/8 in /124s: 2^116 - 1 candidates; a taken /16 block and
        // single subnets are stepped over without listing anything.
        let p = SubnetPool::new(
            v6("fd00::/8"),
            124,
            "fd00::10".parse().unwrap(),
            "fdff:ffff:ffff:ffff:ffff:ffff:ffff:fff0".parse().unwrap(),
        )
        .unwrap();
        let taken = [v6("fd00::/9"), v6("fdff::/16"), v6("fd80::/124")];
        let mut rng = StdRng::seed_from_u64(2);
        assert_eq!(
            p.free_count(&taken),
            p.count() - ((1u128 << 115) - 1) - (1u128 << 108) - 1
        );
        for _ in 0..1000 {
            let n = p.random_free(&mut rng, &taken).unwrap();
            assert!(p.contains(&n));
            assert!(!taken.iter().any(|t| overlaps(t, &n)), "{n}");
        }
    }
}
