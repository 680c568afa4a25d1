//! The desired kernel state, computed from leases and config, and the diff
//! against what the kernel actually holds. The kernel layer
//! (`flannel-netlink`) reads and writes exactly these types.
//!
//! A reconcile pass: extract the peers ([`vxlan_peers`] / [`host_gw_peers`]),
//! compute the [`DesiredState`] ([`desired_vxlan_with`] / [`desired_host_gw`]),
//! read the kernel's routes, neighbours and FDB entries and keep what flannel
//! owns ([`Scope::filter`]), then apply [`plan_reconcile`]'s
//! [`ReconcilePlan::ops`] in order.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::SystemTime;

use ipnet::IpNet;

use crate::lease::{IpFamily, Lease, LeaseKey, BACKEND_HOST_GW, BACKEND_VXLAN};
use crate::mac::MacAddr;

/// A route (`ip route replace DST [via GW] dev OIF [onlink]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    /// Output interface index.
    pub oif: u32,
    pub onlink: bool,
}

/// A permanent neighbour entry (`ip neigh replace IP lladdr MAC dev IFINDEX nud permanent`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Neighbour {
    pub ifindex: u32,
    pub ip: IpAddr,
    pub mac: MacAddr,
}

/// A permanent bridge FDB entry on a vxlan device
/// (`bridge fdb replace MAC dev IFINDEX dst IP self permanent`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FdbEntry {
    pub ifindex: u32,
    pub mac: MacAddr,
    pub dst: IpAddr,
}

/// A remote node as the vxlan datapath of one address family needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VxlanPeer {
    /// The peer's lease.
    pub key: LeaseKey,
    /// The peer's subnet in the family this peer was extracted for.
    pub subnet: IpNet,
    /// Where its VTEP listens (`PublicIP` or `PublicIPv6`).
    pub public_ip: IpAddr,
    /// Its vxlan device's MAC (`VtepMAC` of `BackendData`/`BackendV6Data`).
    pub vtep_mac: MacAddr,
}

/// A remote node as the host-gw datapath of one address family needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostGwPeer {
    pub key: LeaseKey,
    pub subnet: IpNet,
    pub public_ip: IpAddr,
}

/// Whether `lease` is a live lease of another node with a subnet and public
/// IP of `family`; returns that subnet and IP.
fn remote_of_family(
    lease: &Lease,
    own: Option<&LeaseKey>,
    family: IpFamily,
    now: SystemTime,
) -> Option<(IpNet, IpAddr)> {
    if lease.is_expired(now) {
        return None;
    }
    let subnet = lease.key.subnet(family)?;
    if let Some(own) = own {
        // A lease overlapping ours (which should not exist) is never routed
        // away from this node.
        let ours = own.subnet(family);
        if lease.key == *own || ours.is_some_and(|o| o.contains(&subnet) || subnet.contains(&o)) {
            return None;
        }
    }
    Some((subnet, lease.attrs.public_ip_of(family)?))
}

/// The vxlan peers of `family` among `leases`: every live lease except our
/// own (`own`) whose `BackendType` is vxlan, with a subnet and public IP of
/// that family, and whose `BackendData` (IPv4) or `BackendV6Data` (IPv6)
/// parses and names our `vni`. A lease without `BackendType` is udp's
/// ([`LeaseAttrs::effective_backend_type`]), never a vxlan peer, as
/// upstream's vxlan skips every non-vxlan lease. Sorted by subnet.
///
/// [`LeaseAttrs::effective_backend_type`]: crate::lease::LeaseAttrs::effective_backend_type
pub fn vxlan_peers<'l>(
    leases: impl IntoIterator<Item = &'l Lease>,
    own: Option<&LeaseKey>,
    vni: u32,
    family: IpFamily,
    now: SystemTime,
) -> Vec<VxlanPeer> {
    let mut out: Vec<VxlanPeer> = leases
        .into_iter()
        .filter(|l| l.attrs.effective_backend_type() == BACKEND_VXLAN)
        .filter_map(|l| {
            let (subnet, public_ip) = remote_of_family(l, own, family, now)?;
            let data = match family {
                IpFamily::V4 => l.attrs.vxlan_data(),
                IpFamily::V6 => l.attrs.vxlan_v6_data(),
            }?;
            (data.vni == vni).then_some(VxlanPeer {
                key: l.key,
                subnet,
                public_ip,
                vtep_mac: data.vtep_mac,
            })
        })
        .collect();
    out.sort_by_key(|p| (p.subnet, p.key));
    out
}

/// The host-gw peers of `family` among `leases`: every live lease except
/// our own whose `BackendType` is host-gw, with a subnet and public IP of
/// that family; `BackendData` is not read (upstream's is missing, or `null`
/// in Kubernetes mode). A lease without `BackendType` (udp's) is no
/// host-gw peer, as upstream's host-gw skips it. Sorted by subnet.
pub fn host_gw_peers<'l>(
    leases: impl IntoIterator<Item = &'l Lease>,
    own: Option<&LeaseKey>,
    family: IpFamily,
    now: SystemTime,
) -> Vec<HostGwPeer> {
    let mut out: Vec<HostGwPeer> = leases
        .into_iter()
        .filter(|l| l.attrs.effective_backend_type() == BACKEND_HOST_GW)
        .filter_map(|l| {
            let (subnet, public_ip) = remote_of_family(l, own, family, now)?;
            Some(HostGwPeer {
                key: l.key,
                subnet,
                public_ip,
            })
        })
        .collect();
    out.sort_by_key(|p| (p.subnet, p.key));
    out
}

/// The kernel objects a backend wants (or, read back and scoped with
/// [`Scope::filter`], the ones it has). Kept sorted and free of duplicates
/// by [`DesiredState::normalize`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neighbour>,
    pub fdb: Vec<FdbEntry>,
}

impl DesiredState {
    /// Sorts every list and drops exact duplicates.
    pub fn normalize(&mut self) {
        fn norm<T: Ord>(v: &mut Vec<T>) {
            v.sort();
            v.dedup();
        }
        norm(&mut self.routes);
        norm(&mut self.neighbours);
        norm(&mut self.fdb);
    }

    /// No object at all.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.neighbours.is_empty() && self.fdb.is_empty()
    }
}

/// DirectRouting (vxlan option): peers whose public IP lies in a subnet
/// directly connected to the external interface are routed to without
/// encapsulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectRouting<'a> {
    /// The external interface.
    pub external_ifindex: u32,
    /// The external interface's connected subnets (its addresses with their
    /// prefixes, e.g. `172.16.1.14/24`; host bits are ignored).
    pub connected: &'a [IpNet],
}

impl DirectRouting<'_> {
    fn reaches(&self, ip: IpAddr) -> bool {
        is_connected(self.connected, ip)
    }
}

fn is_connected(connected: &[IpNet], ip: IpAddr) -> bool {
    connected.iter().any(|n| n.trunc().contains(&ip))
}

/// The per-peer triple of the vxlan datapath on the device `ifindex`
/// (`flannel.<VNI>`), as in the packet walk:
/// - `ip neigh replace <subnet addr> lladdr <VtepMAC> dev flannel.1 nud permanent`
/// - `bridge fdb replace <VtepMAC> dev flannel.1 dst <PublicIP> self permanent`
/// - `ip route replace <subnet> via <subnet addr> dev flannel.1 onlink`
pub fn desired_vxlan(ifindex: u32, peers: &[VxlanPeer]) -> DesiredState {
    desired_vxlan_with(ifindex, peers, None)
}

/// [`desired_vxlan`] with optional DirectRouting: a peer whose public IP is
/// directly connected gets `ip route replace <subnet> via <PublicIP> dev
/// <external>` and no neighbour or FDB entry; the others get the triple.
pub fn desired_vxlan_with(
    ifindex: u32,
    peers: &[VxlanPeer],
    direct: Option<&DirectRouting<'_>>,
) -> DesiredState {
    let mut d = DesiredState::default();
    for p in peers {
        if let Some(dr) = direct.filter(|dr| dr.reaches(p.public_ip)) {
            d.routes.push(Route {
                dst: p.subnet,
                gateway: Some(p.public_ip),
                oif: dr.external_ifindex,
                onlink: false,
            });
            continue;
        }
        let gw = p.subnet.network();
        d.neighbours.push(Neighbour {
            ifindex,
            ip: gw,
            mac: p.vtep_mac,
        });
        d.fdb.push(FdbEntry {
            ifindex,
            mac: p.vtep_mac,
            dst: p.public_ip,
        });
        d.routes.push(Route {
            dst: p.subnet,
            gateway: Some(gw),
            oif: ifindex,
            onlink: true,
        });
    }
    d.normalize();
    d
}

/// host-gw peers that are not on a directly connected subnet: the kernel
/// would refuse (or misroute) a route via them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host-gw needs every node on the same L2 segment, but these peers are not directly connected to the external interface: {}; put the nodes on one L2 network or use the vxlan backend (with DirectRouting)", list_peers(.not_connected))]
pub struct HostGwError {
    pub not_connected: Vec<HostGwPeer>,
    /// The routes for the peers that are reachable: still worth applying.
    pub partial: DesiredState,
}

fn list_peers(peers: &[HostGwPeer]) -> String {
    peers
        .iter()
        .map(|p| format!("{} via {}", p.subnet, p.public_ip))
        .collect::<Vec<_>>()
        .join(", ")
}

/// host-gw routes: `ip route replace <subnet> via <PublicIP> dev <external>`
/// per peer. Peers whose public IP is not inside one of `connected` (the
/// external interface's subnets) are reported in the error, which also
/// carries the routes for the others.
pub fn desired_host_gw(
    external_ifindex: u32,
    peers: &[HostGwPeer],
    connected: &[IpNet],
) -> Result<DesiredState, HostGwError> {
    let mut d = DesiredState::default();
    let mut not_connected = Vec::new();
    for p in peers {
        if !is_connected(connected, p.public_ip) {
            not_connected.push(*p);
            continue;
        }
        d.routes.push(Route {
            dst: p.subnet,
            gateway: Some(p.public_ip),
            oif: external_ifindex,
            onlink: false,
        });
    }
    d.normalize();
    if not_connected.is_empty() {
        Ok(d)
    } else {
        Err(HostGwError {
            not_connected,
            partial: d,
        })
    }
}

/// What to add and what to delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff<T> {
    pub add: Vec<T>,
    pub del: Vec<T>,
}

impl<T> Default for Diff<T> {
    fn default() -> Self {
        Diff {
            add: Vec::new(),
            del: Vec::new(),
        }
    }
}

impl<T> Diff<T> {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.del.is_empty()
    }
}

/// The exact set difference: `add` = desired but not actual, `del` = actual
/// but not desired, both sorted. `actual` must already be limited to what
/// flannel manages ([`Scope`]). For kernel objects written with replace
/// semantics use [`diff_replace`], which keeps entries that the replace
/// overwrites out of `del`.
pub fn diff<T: Ord + Clone>(desired: &[T], actual: &[T]) -> Diff<T> {
    let want: BTreeSet<&T> = desired.iter().collect();
    let have: BTreeSet<&T> = actual.iter().collect();
    Diff {
        add: want.difference(&have).map(|t| (*t).clone()).collect(),
        del: have.difference(&want).map(|t| (*t).clone()).collect(),
    }
}

/// The identity the kernel uses when a write with `NLM_F_REPLACE` decides
/// whether to overwrite an existing object.
pub trait ReplaceKey {
    /// The identity.
    type Key: Ord;
    /// This object's identity.
    fn replace_key(&self) -> Self::Key;
}

/// A route in the main table is replaced by destination (we never set TOS
/// or metric, so those are equal).
impl ReplaceKey for Route {
    type Key = IpNet;
    fn replace_key(&self) -> IpNet {
        self.dst
    }
}

/// A neighbour entry is replaced by device and IP.
impl ReplaceKey for Neighbour {
    type Key = (u32, IpAddr);
    fn replace_key(&self) -> (u32, IpAddr) {
        (self.ifindex, self.ip)
    }
}

/// A vxlan FDB entry is replaced by device and MAC (the replace rewrites the
/// entry's destination).
impl ReplaceKey for FdbEntry {
    type Key = (u32, MacAddr);
    fn replace_key(&self) -> (u32, MacAddr) {
        (self.ifindex, self.mac)
    }
}

/// Like [`diff`], for objects written with replace semantics: an actual
/// object that differs from a desired one but has the same [`ReplaceKey`] as
/// an object in `add` is overwritten by that replace, so it is NOT put in
/// `del` (deleting it afterwards could remove the fresh object; deleting it
/// before would leave a gap). An actual object whose key is desired and
/// already present exactly (e.g. a second remote of the same MAC) is a
/// genuine leftover and is deleted. Converges in one pass except when
/// several stale objects share a key, where the second pass removes the
/// rest.
pub fn diff_replace<T: ReplaceKey + Ord + Clone>(desired: &[T], actual: &[T]) -> Diff<T> {
    let mut d = diff(desired, actual);
    let overwritten: BTreeSet<T::Key> = d.add.iter().map(ReplaceKey::replace_key).collect();
    d.del.retain(|t| !overwritten.contains(&t.replace_key()));
    d
}

/// What flannel considers its own in the kernel, for one address family.
/// Only objects accepted here are compared with the desired state, so
/// nothing else on the host is ever deleted:
/// - a route is ours when its destination lies inside `network` with a
///   longer prefix (the `network` route itself, e.g. the kernel's route for
///   flannel0's address, is not), does not overlap `own_subnet`, and it
///   leaves through `device_ifindex` (with or without gateway), or through
///   `external_ifindex` with a gateway (host-gw and DirectRouting routes);
/// - a route outside `network` is ours only when it is on `device_ifindex`
///   in the exact shape of the vxlan triple's route (`DST via <DST's
///   network address> dev flannel.<VNI> onlink`): earlier versions (and
///   upstream) programmed leases outside the network that way, and nothing
///   else writes such a route on flannel's own device. Such a route is
///   never desired, so it is deleted; if it had replaced the kernel's route
///   to a subnet of the external interface, [`underlay_route_to_restore`]
///   names the route to put back. A route outside the network on the
///   external interface is never ours: it cannot be told from the
///   underlay's own routes;
/// - a neighbour entry is ours when it is on `device_ifindex` (the kernel
///   layer lists only permanent entries);
/// - an FDB entry is ours when it is on `device_ifindex` (the kernel layer
///   lists only entries with a `dst`).
///
/// Set `external_ifindex` only for host-gw or vxlan with DirectRouting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    /// The cluster network of this family (`Network` / `IPv6Network`).
    pub network: IpNet,
    /// This node's subnet: never touched.
    pub own_subnet: Option<IpNet>,
    /// The flannel device (`flannel.<VNI>`, `flannel-v6.<VNI>`, `flannel0`).
    pub device_ifindex: Option<u32>,
    /// The external interface, for host-gw / DirectRouting routes.
    pub external_ifindex: Option<u32>,
}

impl Scope {
    /// Whether `r` is a route flannel manages (see [`Scope`]).
    pub fn owns_route(&self, r: &Route) -> bool {
        let inside =
            self.network.contains(&r.dst) && r.dst.prefix_len() > self.network.prefix_len();
        let not_own = self
            .own_subnet
            .is_none_or(|o| !(o.contains(&r.dst) || r.dst.contains(&o)));
        let via_device = self.device_ifindex == Some(r.oif);
        let via_external = self.external_ifindex == Some(r.oif) && r.gateway.is_some();
        (inside && not_own && (via_device || via_external)) || self.is_stale_outside(r)
    }

    /// A route outside the network that flannel wrote on its own device
    /// for a lease it should never have programmed (see [`Scope`]).
    pub fn is_stale_outside(&self, r: &Route) -> bool {
        let same_family = r.dst.addr().is_ipv4() == self.network.addr().is_ipv4();
        let strictly_inside =
            self.network.contains(&r.dst) && r.dst.prefix_len() > self.network.prefix_len();
        same_family
            && !strictly_inside
            && self.device_ifindex == Some(r.oif)
            && r.onlink
            && r.gateway == Some(r.dst.network())
    }

    /// Whether `n` is a neighbour entry flannel manages.
    pub fn owns_neighbour(&self, n: &Neighbour) -> bool {
        self.device_ifindex == Some(n.ifindex)
    }

    /// Whether `e` is an FDB entry flannel manages.
    pub fn owns_fdb(&self, e: &FdbEntry) -> bool {
        self.device_ifindex == Some(e.ifindex)
    }

    /// Keeps only what flannel manages, normalised.
    pub fn filter(&self, mut actual: DesiredState) -> DesiredState {
        actual.routes.retain(|r| self.owns_route(r));
        actual.neighbours.retain(|n| self.owns_neighbour(n));
        actual.fdb.retain(|e| self.owns_fdb(e));
        actual.normalize();
        actual
    }
}

/// The kernel's prefix route for an address of an interface
/// (`ip route add DST dev OIF proto kernel scope link src SRC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrefixRoute {
    pub dst: IpNet,
    pub oif: u32,
    pub src: IpAddr,
}

/// After `deleted` (a stale route outside the network on flannel's device,
/// [`Scope::is_stale_outside`]) is gone: the kernel's prefix route of the
/// external interface it had replaced, to add back when it is missing.
/// IPv4 only: a route without metric replaces the kernel's IPv4 prefix
/// route (both at metric 0), but in IPv6 it goes in at metric 1024 beside
/// the kernel's at 256, which was never lost. `connected` are the external
/// interface's addresses with their prefixes.
pub fn underlay_route_to_restore(
    scope: &Scope,
    deleted: &Route,
    external_ifindex: u32,
    connected: &[IpNet],
) -> Option<PrefixRoute> {
    if !scope.is_stale_outside(deleted) || !deleted.dst.addr().is_ipv4() {
        return None;
    }
    connected
        .iter()
        .find(|a| a.trunc() == deleted.dst)
        .map(|a| PrefixRoute {
            dst: deleted.dst,
            oif: external_ifindex,
            src: a.addr(),
        })
}

/// The kernel's prefix route of the CNI bridge for our own subnet, to add
/// back when it is missing: the bridge (`cni0`) holds the subnet's gateway
/// address (`10.244.1.1/24` in `10.244.1.0/24`), but no route to the subnet
/// leaves through it, as after `ip route del 10.244.1.0/24 dev cni0`.
/// Without it the node can no longer reach its own pods, and nothing else
/// puts it back: the kernel adds it only with the address, and the CNI
/// plugin finds the address in place on the next pod's ADD. `routes` are
/// the kernel's, `bridge_addrs` the bridge's addresses with their prefixes.
pub fn bridge_route_to_restore(
    own: IpNet,
    bridge_ifindex: u32,
    bridge_addrs: &[IpNet],
    routes: &[Route],
) -> Option<PrefixRoute> {
    let addr = bridge_addrs.iter().find(|a| a.trunc() == own)?;
    if routes
        .iter()
        .any(|r| r.dst == own && r.oif == bridge_ifindex)
    {
        return None;
    }
    Some(PrefixRoute {
        dst: own,
        oif: bridge_ifindex,
        src: addr.addr(),
    })
}

/// One kernel write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `ip route del`.
    DelRoute(Route),
    /// `bridge fdb replace ... self permanent`.
    AddFdb(FdbEntry),
    /// `ip neigh replace ... nud permanent`.
    AddNeighbour(Neighbour),
    /// `ip route replace`.
    AddRoute(Route),
    /// `ip neigh del`.
    DelNeighbour(Neighbour),
    /// `bridge fdb del ... dst ... self`.
    DelFdb(FdbEntry),
}

/// The difference between the desired state and the (scoped) actual one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcilePlan {
    pub routes: Diff<Route>,
    pub neighbours: Diff<Neighbour>,
    pub fdb: Diff<FdbEntry>,
}

/// Computes the writes that make `actual` (already [`Scope::filter`]ed)
/// equal to `desired`, with replace-aware deletes ([`diff_replace`]).
pub fn plan_reconcile(desired: &DesiredState, actual: &DesiredState) -> ReconcilePlan {
    ReconcilePlan {
        routes: diff_replace(&desired.routes, &actual.routes),
        neighbours: diff_replace(&desired.neighbours, &actual.neighbours),
        fdb: diff_replace(&desired.fdb, &actual.fdb),
    }
}

impl ReconcilePlan {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.neighbours.is_empty() && self.fdb.is_empty()
    }

    /// Number of writes.
    pub fn len(&self) -> usize {
        self.routes.add.len()
            + self.routes.del.len()
            + self.neighbours.add.len()
            + self.neighbours.del.len()
            + self.fdb.add.len()
            + self.fdb.del.len()
    }

    /// The writes in the order that keeps every packet deliverable: stale
    /// routes go first (so no route points at an entry about to vanish);
    /// FDB entries and neighbours are added before the routes that use them;
    /// stale neighbours and FDB entries go last, when no route uses them.
    pub fn ops(&self) -> Vec<Op> {
        let mut ops = Vec::with_capacity(self.len());
        ops.extend(self.routes.del.iter().cloned().map(Op::DelRoute));
        ops.extend(self.fdb.add.iter().cloned().map(Op::AddFdb));
        ops.extend(self.neighbours.add.iter().cloned().map(Op::AddNeighbour));
        ops.extend(self.routes.add.iter().cloned().map(Op::AddRoute));
        ops.extend(self.neighbours.del.iter().cloned().map(Op::DelNeighbour));
        ops.extend(self.fdb.del.iter().cloned().map(Op::DelFdb));
        ops
    }
}

/// The metric of flannel's blackhole routes: the last resort for their
/// prefix. A route to the same subnet with a lower metric keeps winning
/// (the bridge's connected route: cni0, metric 0 in IPv4 and 256 in IPv6),
/// so pods on the bridge stay reachable and the blackhole takes only what
/// no other route to the subnet takes: addresses without a pod when the CNI
/// routes each pod on its own (as Canal does), or everything while cni0 is
/// missing. At metric 0, as upstream adds it, the kernel refuses the route
/// with EEXIST whenever cni0's route is there.
pub const BLACKHOLE_METRIC: u32 = u32::MAX;

/// A blackhole route of the main table
/// (`ip route replace blackhole DST metric METRIC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlackholeRoute {
    pub dst: IpNet,
    pub metric: u32,
}

/// The blackhole routes `--ip-blackhole-route` wants: one per subnet of
/// this node (one per enabled family), at [`BLACKHOLE_METRIC`]; none when
/// the flag is off, so that a restart without it removes them.
pub fn desired_blackholes(
    enabled: bool,
    own_subnets: impl IntoIterator<Item = IpNet>,
) -> Vec<BlackholeRoute> {
    if !enabled {
        return Vec::new();
    }
    let mut v: Vec<BlackholeRoute> = own_subnets
        .into_iter()
        .map(|dst| BlackholeRoute {
            dst: dst.trunc(),
            metric: BLACKHOLE_METRIC,
        })
        .collect();
    v.sort();
    v
}

/// The blackhole routes among `actual` that are flannel's: at
/// [`BLACKHOLE_METRIC`] and inside one of the cluster `networks` (a subnet
/// of ours from an earlier lease is one of them; an operator's blackhole
/// at another metric or outside the networks is not).
pub fn owned_blackholes(actual: &[BlackholeRoute], networks: &[IpNet]) -> Vec<BlackholeRoute> {
    let mut v: Vec<BlackholeRoute> = actual
        .iter()
        .filter(|b| {
            b.metric == BLACKHOLE_METRIC
                && networks
                    .iter()
                    .any(|n| n.contains(&b.dst) && b.dst.prefix_len() >= n.prefix_len())
        })
        .copied()
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{LeaseAttrs, VxlanBackendData};
    use std::time::Duration;

    const VX: u32 = 4; // flannel.1's ifindex
    const EXT: u32 = 2; // ens3's ifindex

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000)
    }
    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn mac(s: &str) -> MacAddr {
        s.parse().unwrap()
    }

    fn vx_lease(key: &str, public_ip: &str, vni: u32, vtep: &str) -> Lease {
        Lease {
            key: key.parse().unwrap(),
            attrs: LeaseAttrs::new_vxlan(
                Some(public_ip.parse().unwrap()),
                Some(VxlanBackendData {
                    vni,
                    vtep_mac: mac(vtep),
                }),
                None,
                None,
            ),
            expiration: Some(t0() + Duration::from_secs(3600)),
        }
    }

    /// The packet walk: node1 (10.244.1.0/24, 172.16.1.14) sees node2
    /// (10.244.2.0/24, 172.16.1.13) and the master (10.244.0.0/24, 172.16.1.8).
    fn walk_leases() -> Vec<Lease> {
        vec![
            vx_lease("10.244.1.0-24", "172.16.1.14", 1, "26:62:24:f0:61:01"),
            vx_lease("10.244.2.0-24", "172.16.1.13", 1, "52:17:43:ba:2e:56"),
            vx_lease("10.244.0.0-24", "172.16.1.8", 1, "aa:bb:cc:00:00:08"),
        ]
    }

    #[test]
    fn packet_walk_triple() {
        let own: LeaseKey = "10.244.1.0-24".parse().unwrap();
        let peers = vxlan_peers(&walk_leases(), Some(&own), 1, IpFamily::V4, t0());
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].subnet, net("10.244.0.0/24"));
        assert_eq!(peers[1].public_ip, ip("172.16.1.13"));
        let d = desired_vxlan(VX, &peers);
        // 10.244.2.0 dev flannel.1 lladdr 52:17:43:ba:2e:56 PERMANENT
        assert!(d.neighbours.contains(&Neighbour {
            ifindex: VX,
            ip: ip("10.244.2.0"),
            mac: mac("52:17:43:ba:2e:56")
        }));
        // 52:17:43:ba:2e:56 dst 172.16.1.13 self permanent
        assert!(d.fdb.contains(&FdbEntry {
            ifindex: VX,
            mac: mac("52:17:43:ba:2e:56"),
            dst: ip("172.16.1.13")
        }));
        // 10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink
        assert!(d.routes.contains(&Route {
            dst: net("10.244.2.0/24"),
            gateway: Some(ip("10.244.2.0")),
            oif: VX,
            onlink: true
        }));
        assert_eq!((d.routes.len(), d.neighbours.len(), d.fdb.len()), (2, 2, 2));
        assert!(
            !d.routes.iter().any(|r| r.dst == net("10.244.1.0/24")),
            "own subnet"
        );
    }

    #[test]
    fn peer_filtering() {
        let own: LeaseKey = "10.244.1.0-24".parse().unwrap();
        let mut leases = walk_leases();
        // Other VNI, other backend, malformed data, expired, no PublicIP,
        // overlapping our subnet: all skipped.
        leases.push(vx_lease(
            "10.244.3.0-24",
            "172.16.1.3",
            2,
            "02:00:00:00:00:03",
        ));
        let mut hg = vx_lease("10.244.4.0-24", "172.16.1.4", 1, "02:00:00:00:00:04");
        hg.attrs.backend_type = "host-gw".into();
        leases.push(hg);
        let mut bad = vx_lease("10.244.5.0-24", "172.16.1.5", 1, "02:00:00:00:00:05");
        bad.attrs.backend_data = Some(crate::lease::BackendData::new(
            &serde_json::json!({"VNI": 1, "VtepMAC": "garbage"}),
        ));
        leases.push(bad);
        let mut old = vx_lease("10.244.6.0-24", "172.16.1.6", 1, "02:00:00:00:00:06");
        old.expiration = Some(t0() - Duration::from_secs(1));
        leases.push(old);
        let mut noip = vx_lease("10.244.7.0-24", "172.16.1.7", 1, "02:00:00:00:00:07");
        noip.attrs.public_ip = None;
        leases.push(noip);
        leases.push(vx_lease(
            "10.244.1.128-25",
            "172.16.1.9",
            1,
            "02:00:00:00:00:09",
        ));
        // A reservation is a peer like any other.
        let mut res = vx_lease("10.244.8.0-24", "172.16.1.18", 1, "02:00:00:00:00:08");
        res.expiration = None;
        leases.push(res);

        let peers = vxlan_peers(&leases, Some(&own), 1, IpFamily::V4, t0());
        let subnets: Vec<IpNet> = peers.iter().map(|p| p.subnet).collect();
        assert_eq!(
            subnets,
            vec![
                net("10.244.0.0/24"),
                net("10.244.2.0/24"),
                net("10.244.8.0/24")
            ]
        );
        // Without an own key every live vxlan lease is a peer.
        assert_eq!(vxlan_peers(&leases, None, 1, IpFamily::V4, t0()).len(), 5);

        let hg = host_gw_peers(&leases, Some(&own), IpFamily::V4, t0());
        assert_eq!(hg.len(), 1);
        assert_eq!(hg[0].public_ip, ip("172.16.1.4"));
    }

    /// Upstream's exact leases (etcd values and Kubernetes annotations, see
    /// `lease::upstream`) as a vxlan and a host-gw node select peers from
    /// them: each takes its own backend's, and neither takes a lease
    /// without `BackendType` (udp's), as upstream's vxlan and host-gw skip it.
    #[test]
    fn upstream_leases_select_by_backend_and_untyped_is_neither_vxlan_nor_host_gw() {
        use crate::lease::upstream::{self, etcd, lease};
        let own: LeaseKey = "10.244.9.0-24".parse().unwrap();
        let vx = |leases: &[Lease]| vxlan_peers(leases, Some(&own), 1, IpFamily::V4, t0());
        let hg = |leases: &[Lease]| host_gw_peers(leases, Some(&own), IpFamily::V4, t0());

        let etcd_vxlan = lease("10.244.1.0-24", etcd(upstream::ETCD_VXLAN));
        let kube_vxlan = lease("10.244.2.0-24", upstream::kube_vxlan());
        let got = vx(&[etcd_vxlan.clone(), kube_vxlan.clone()]);
        assert_eq!(
            got.iter()
                .map(|p| (p.subnet, p.public_ip, p.vtep_mac))
                .collect::<Vec<_>>(),
            vec![
                (
                    net("10.244.1.0/24"),
                    ip("172.16.1.12"),
                    mac("1e:2c:f9:33:d5:9b")
                ),
                (
                    net("10.244.2.0/24"),
                    ip("172.16.1.13"),
                    mac("b6:e3:3e:76:79:d1")
                ),
            ]
        );
        assert!(hg(&[etcd_vxlan, kube_vxlan]).is_empty());

        let host_gw = [
            lease("10.244.1.0-24", etcd(upstream::ETCD_HOST_GW)),
            lease("10.244.3.0-24", etcd(upstream::ETCD_HOST_GW_NULL_DATA)),
            lease("10.244.2.0-24", upstream::kube_host_gw()),
        ];
        let got = hg(&host_gw);
        assert_eq!(
            got.iter()
                .map(|p| (p.subnet, p.public_ip))
                .collect::<Vec<_>>(),
            vec![
                (net("10.244.1.0/24"), ip("172.16.1.12")),
                (net("10.244.2.0/24"), ip("172.16.1.13")),
                (net("10.244.3.0/24"), ip("172.16.1.12")),
            ]
        );
        assert!(vx(&host_gw).is_empty());

        // udp's leases: no BackendType. Not a vxlan peer even with valid
        // vxlan data in it, not a host-gw peer.
        let mut untyped_with_data = etcd(upstream::ETCD_VXLAN);
        untyped_with_data.backend_type.clear();
        let udp = [
            lease("10.244.1.0-24", etcd(upstream::ETCD_UDP)),
            lease("10.244.2.0-24", upstream::kube_udp()),
            lease("10.244.3.0-24", untyped_with_data),
        ];
        assert!(vx(&udp).is_empty());
        assert!(hg(&udp).is_empty());
    }

    #[test]
    fn ipv6_peers_use_v6_data() {
        let own: LeaseKey = "10.244.1.0-24&fd00:10:244:1::-64".parse().unwrap();
        let mut l = vx_lease(
            "10.244.2.0-24&fd00:10:244:2::-64",
            "172.16.1.13",
            1,
            "02:00:00:00:00:02",
        );
        l.attrs.public_ipv6 = Some("fd00::13".parse().unwrap());
        l.attrs.backend_v6_data = Some(crate::lease::BackendData::new(
            &serde_json::json!({"VNI": 1, "VtepMAC": "02:00:00:00:06:02"}),
        ));
        let peers = vxlan_peers(&[l.clone()], Some(&own), 1, IpFamily::V6, t0());
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].subnet, net("fd00:10:244:2::/64"));
        assert_eq!(peers[0].public_ip, ip("fd00::13"));
        assert_eq!(peers[0].vtep_mac, mac("02:00:00:00:06:02"));
        let d = desired_vxlan(9, &peers);
        assert_eq!(d.neighbours[0].ip, ip("fd00:10:244:2::"));
        assert_eq!(d.routes[0].gateway, Some(ip("fd00:10:244:2::")));
        // No BackendV6Data: no IPv6 peer.
        l.attrs.backend_v6_data = None;
        assert!(vxlan_peers(&[l], Some(&own), 1, IpFamily::V6, t0()).is_empty());
    }

    #[test]
    fn an_update_changing_only_one_family_is_planned_for_that_family_only() {
        // Upstream drops such updates in dual stack; here each family's
        // desired state is computed from the lease as it is now.
        let own: LeaseKey = "10.244.1.0-24&fd00:10:244:1::-64".parse().unwrap();
        let dual = |mac6: &str, ip6: &str| {
            let mut l = vx_lease(
                "10.244.2.0-24&fd00:10:244:2::-64",
                "172.16.1.13",
                1,
                "02:00:00:00:00:02",
            );
            l.attrs.public_ipv6 = Some(ip6.parse().unwrap());
            l.attrs.backend_v6_data = Some(crate::lease::BackendData::new(
                &serde_json::json!({"VNI": 1, "VtepMAC": mac6}),
            ));
            l
        };
        let state = |l: &Lease, f| {
            desired_vxlan(
                9,
                &vxlan_peers(std::slice::from_ref(l), Some(&own), 1, f, t0()),
            )
        };
        let before = dual("02:00:00:00:06:02", "fd00::13");
        for after in [
            dual("02:00:00:00:06:99", "fd00::13"),
            dual("02:00:00:00:06:02", "fd00::99"),
        ] {
            assert!(
                plan_reconcile(&state(&after, IpFamily::V4), &state(&before, IpFamily::V4))
                    .is_empty()
            );
            let p6 = plan_reconcile(&state(&after, IpFamily::V6), &state(&before, IpFamily::V6));
            assert!(!p6.is_empty(), "{after:?}");
            assert!(p6.routes.is_empty(), "the route stays: {p6:?}");
            assert_eq!(p6.fdb.add, state(&after, IpFamily::V6).fdb);
        }
    }

    #[test]
    fn direct_routing() {
        let own: LeaseKey = "10.244.1.0-24".parse().unwrap();
        let mut leases = walk_leases();
        leases.push(vx_lease(
            "10.244.9.0-24",
            "192.168.50.9",
            1,
            "02:00:00:00:00:09",
        ));
        let peers = vxlan_peers(&leases, Some(&own), 1, IpFamily::V4, t0());
        let connected = [net("172.16.1.14/24")];
        let dr = DirectRouting {
            external_ifindex: EXT,
            connected: &connected,
        };
        let d = desired_vxlan_with(VX, &peers, Some(&dr));
        assert!(d.routes.contains(&Route {
            dst: net("10.244.2.0/24"),
            gateway: Some(ip("172.16.1.13")),
            oif: EXT,
            onlink: false
        }));
        // The remote one is still encapsulated.
        assert!(d.routes.contains(&Route {
            dst: net("10.244.9.0/24"),
            gateway: Some(ip("10.244.9.0")),
            oif: VX,
            onlink: true
        }));
        assert_eq!(d.neighbours.len(), 1);
        assert_eq!(d.fdb.len(), 1);
        assert_eq!(d.fdb[0].dst, ip("192.168.50.9"));
    }

    #[test]
    fn host_gw() {
        let p = |s: &str, pip: &str| HostGwPeer {
            key: s.parse().unwrap(),
            subnet: s.replace('-', "/").parse().unwrap(),
            public_ip: ip(pip),
        };
        let peers = [
            p("10.244.2.0-24", "172.16.1.13"),
            p("10.244.3.0-24", "172.16.1.3"),
        ];
        let d = desired_host_gw(EXT, &peers, &[net("172.16.1.14/24")]).unwrap();
        assert_eq!(
            d.routes,
            vec![
                Route {
                    dst: net("10.244.2.0/24"),
                    gateway: Some(ip("172.16.1.13")),
                    oif: EXT,
                    onlink: false
                },
                Route {
                    dst: net("10.244.3.0/24"),
                    gateway: Some(ip("172.16.1.3")),
                    oif: EXT,
                    onlink: false
                },
            ]
        );
        assert!(d.neighbours.is_empty() && d.fdb.is_empty());

        let far = [peers[0], p("10.244.4.0-24", "10.9.9.9")];
        let e = desired_host_gw(EXT, &far, &[net("172.16.1.14/24")]).unwrap_err();
        assert_eq!(e.not_connected, vec![far[1]]);
        assert_eq!(e.partial.routes.len(), 1);
        let msg = e.to_string();
        assert!(msg.contains("10.244.4.0/24 via 10.9.9.9"), "{msg}");
    }

    #[test]
    fn plain_diff() {
        let d = diff(&[1, 2, 3, 3], &[3, 4, 5]);
        assert_eq!(d.add, vec![1, 2]);
        assert_eq!(d.del, vec![4, 5]);
        assert!(diff(&[1, 2], &[2, 1]).is_empty());
    }

    fn scope() -> Scope {
        Scope {
            network: net("10.244.0.0/16"),
            own_subnet: Some(net("10.244.1.0/24")),
            device_ifindex: Some(VX),
            external_ifindex: None,
        }
    }

    fn route(dst: &str, gw: Option<&str>, oif: u32, onlink: bool) -> Route {
        Route {
            dst: net(dst),
            gateway: gw.map(ip),
            oif,
            onlink,
        }
    }

    #[test]
    fn scope_decides_what_is_ours() {
        let s = scope();
        assert!(s.owns_route(&route("10.244.2.0/24", Some("10.244.2.0"), VX, true)));
        assert!(s.owns_route(&route("10.244.2.0/24", None, VX, false)));
        // Not ours: outside the network, the network itself, our own subnet,
        // another device, the external interface when not configured. (Outside
        // the network, only the vxlan triple's shape on our device is ours:
        // see the test of stale routes below.)
        assert!(!s.owns_route(&route("10.245.2.0/24", Some("10.245.2.1"), VX, true)));
        assert!(!s.owns_route(&route("10.244.0.0/16", None, VX, false)));
        assert!(!s.owns_route(&route("10.0.0.0/8", None, VX, false)));
        assert!(!s.owns_route(&route("10.244.1.0/24", None, 5, false)));
        assert!(!s.owns_route(&route("10.244.1.0/24", Some("10.244.1.0"), VX, true)));
        assert!(!s.owns_route(&route("10.244.1.128/25", None, VX, false)));
        assert!(!s.owns_route(&route("10.244.2.0/24", Some("172.16.1.13"), EXT, false)));
        let hs = Scope {
            external_ifindex: Some(EXT),
            ..s
        };
        assert!(hs.owns_route(&route("10.244.2.0/24", Some("172.16.1.13"), EXT, false)));
        assert!(
            !hs.owns_route(&route("10.244.2.0/24", None, EXT, false)),
            "no gateway"
        );
        assert!(!hs.owns_route(&route("0.0.0.0/0", Some("172.16.1.1"), EXT, false)));

        let n = |ifindex| Neighbour {
            ifindex,
            ip: ip("10.244.2.0"),
            mac: mac("02:00:00:00:00:02"),
        };
        assert!(s.owns_neighbour(&n(VX)));
        assert!(!s.owns_neighbour(&n(EXT)));
        let f = |ifindex| FdbEntry {
            ifindex,
            mac: mac("02:00:00:00:00:02"),
            dst: ip("172.16.1.13"),
        };
        assert!(s.owns_fdb(&f(VX)));
        assert!(!s.owns_fdb(&f(7)));

        let actual = DesiredState {
            routes: vec![
                route("10.244.9.0/24", Some("10.244.9.0"), VX, true),
                route("0.0.0.0/0", Some("172.16.1.1"), EXT, false),
                route("10.244.1.0/24", None, 5, false),
            ],
            neighbours: vec![n(VX), n(EXT)],
            fdb: vec![f(7), f(VX)],
        };
        let ours = s.filter(actual);
        assert_eq!(
            ours.routes,
            vec![route("10.244.9.0/24", Some("10.244.9.0"), VX, true)]
        );
        assert_eq!(ours.neighbours, vec![n(VX)]);
        assert_eq!(ours.fdb, vec![f(VX)]);
    }

    #[test]
    fn stale_route_outside_the_network_on_our_device_is_ours_and_heals_the_underlay() {
        let s = scope();
        // Written by an earlier version for a lease 172.16.1.0-24: it had
        // replaced eth0's prefix route.
        let stale = route("172.16.1.0/24", Some("172.16.1.0"), VX, true);
        assert!(s.owns_route(&stale) && s.is_stale_outside(&stale));
        // The whole network and a supernet in the same shape, too.
        assert!(s.owns_route(&route("10.244.0.0/16", Some("10.244.0.0"), VX, true)));
        assert!(s.owns_route(&route("10.0.0.0/8", Some("10.0.0.0"), VX, true)));
        // Not that shape, another device, the external interface, the
        // other family: never touched.
        assert!(!s.owns_route(&route("172.16.1.0/24", Some("172.16.1.1"), VX, true)));
        assert!(!s.owns_route(&route("172.16.1.0/24", Some("172.16.1.0"), VX, false)));
        assert!(!s.owns_route(&route("172.16.1.0/24", None, VX, false)));
        assert!(!s.owns_route(&route("172.16.1.0/24", Some("172.16.1.0"), 9, true)));
        let hs = Scope {
            external_ifindex: Some(EXT),
            ..s
        };
        assert!(!hs.owns_route(&route("172.16.1.0/24", Some("172.16.1.0"), EXT, true)));
        assert!(!hs.owns_route(&route("172.16.2.0/24", Some("172.16.1.5"), EXT, false)));
        assert!(!s.owns_route(&route("fd00::/64", Some("fd00::"), VX, true)));
        // Not desired: the plan deletes it.
        let plan = plan_reconcile(
            &DesiredState::default(),
            &s.filter(DesiredState {
                routes: vec![stale.clone()],
                ..Default::default()
            }),
        );
        assert_eq!(plan.routes.del, vec![stale.clone()]);
        // And eth0's prefix route comes back, with eth0's address as source.
        let connected = [net("172.16.1.14/24"), net("fd00:1::14/64")];
        assert_eq!(
            underlay_route_to_restore(&s, &stale, EXT, &connected),
            Some(PrefixRoute {
                dst: net("172.16.1.0/24"),
                oif: EXT,
                src: ip("172.16.1.14"),
            })
        );
        // Not for a subnet eth0 has no address in, nor for a route of ours
        // inside the network.
        let far = route("192.168.9.0/24", Some("192.168.9.0"), VX, true);
        assert_eq!(underlay_route_to_restore(&s, &far, EXT, &connected), None);
        let peer = route("10.244.2.0/24", Some("10.244.2.0"), VX, true);
        assert_eq!(underlay_route_to_restore(&s, &peer, EXT, &connected), None);
    }

    #[test]
    fn the_bridge_route_to_our_subnet_comes_back_only_when_missing() {
        const BR: u32 = 9;
        let own = net("10.244.1.0/24");
        let addrs = [net("10.244.1.1/24"), net("fd00:10:244:1::1/64")];
        let kernel = route("10.244.1.0/24", None, BR, false);
        assert_eq!(
            bridge_route_to_restore(own, BR, &addrs, std::slice::from_ref(&kernel)),
            None
        );
        assert_eq!(
            bridge_route_to_restore(own, BR, &addrs, &[]),
            Some(PrefixRoute {
                dst: own,
                oif: BR,
                src: ip("10.244.1.1"),
            })
        );
        // A route to the subnet through another device does not count.
        let elsewhere = route("10.244.1.0/24", None, 3, false);
        assert!(bridge_route_to_restore(own, BR, &addrs, &[elsewhere]).is_some());
        // No address of our subnet on the bridge (not set up yet, or
        // another subnet's from an earlier lease): nothing to restore.
        assert_eq!(
            bridge_route_to_restore(own, BR, &[net("10.244.7.1/24")], &[]),
            None
        );
        assert_eq!(bridge_route_to_restore(own, BR, &[], &[]), None);
        let own6 = net("fd00:10:244:1::/64");
        assert_eq!(
            bridge_route_to_restore(own6, BR, &addrs, &[kernel]).map(|p| p.src),
            Some(ip("fd00:10:244:1::1"))
        );
    }

    #[test]
    fn reconcile_from_empty_and_idempotent() {
        let own: LeaseKey = "10.244.1.0-24".parse().unwrap();
        let desired = desired_vxlan(
            VX,
            &vxlan_peers(&walk_leases(), Some(&own), 1, IpFamily::V4, t0()),
        );
        let p = plan_reconcile(&desired, &DesiredState::default());
        assert_eq!(p.len(), 6);
        let ops = p.ops();
        // FDB and neighbour before the routes that use them.
        let first_route = ops
            .iter()
            .position(|o| matches!(o, Op::AddRoute(_)))
            .unwrap();
        assert!(ops[..first_route]
            .iter()
            .all(|o| matches!(o, Op::AddFdb(_) | Op::AddNeighbour(_))));
        assert_eq!(first_route, 4);
        // Applied: nothing more to do.
        assert!(plan_reconcile(&desired, &desired).is_empty());
    }

    #[test]
    fn reconcile_removes_vanished_peer_route_first() {
        let own: LeaseKey = "10.244.1.0-24".parse().unwrap();
        let all = walk_leases();
        let before = desired_vxlan(VX, &vxlan_peers(&all, Some(&own), 1, IpFamily::V4, t0()));
        let after = desired_vxlan(
            VX,
            &vxlan_peers(&all[..2], Some(&own), 1, IpFamily::V4, t0()),
        );
        let p = plan_reconcile(&after, &before);
        assert_eq!(
            p.ops(),
            vec![
                Op::DelRoute(route("10.244.0.0/24", Some("10.244.0.0"), VX, true)),
                Op::DelNeighbour(Neighbour {
                    ifindex: VX,
                    ip: ip("10.244.0.0"),
                    mac: mac("aa:bb:cc:00:00:08")
                }),
                Op::DelFdb(FdbEntry {
                    ifindex: VX,
                    mac: mac("aa:bb:cc:00:00:08"),
                    dst: ip("172.16.1.8")
                }),
            ]
        );
    }

    #[test]
    fn reconcile_changed_vtep_mac_and_public_ip() {
        // node2 restarted with a new VtepMAC and moved to a new public IP.
        let own: LeaseKey = "10.244.1.0-24".parse().unwrap();
        let all = walk_leases();
        let before = desired_vxlan(VX, &vxlan_peers(&all, Some(&own), 1, IpFamily::V4, t0()));
        let mut moved = all.clone();
        moved[1] = vx_lease("10.244.2.0-24", "172.16.1.99", 1, "52:17:43:ba:2e:57");
        let after = desired_vxlan(VX, &vxlan_peers(&moved, Some(&own), 1, IpFamily::V4, t0()));
        let p = plan_reconcile(&after, &before);
        // The neighbour for 10.244.2.0 is replaced in place: not deleted.
        assert_eq!(p.neighbours.add.len(), 1);
        assert!(p.neighbours.del.is_empty());
        // The route is unchanged.
        assert!(p.routes.is_empty());
        // The FDB entry of the old MAC is a different key: deleted after the
        // new one is added.
        assert_eq!(p.fdb.add[0].mac, mac("52:17:43:ba:2e:57"));
        assert_eq!(p.fdb.del[0].mac, mac("52:17:43:ba:2e:56"));
        let ops = p.ops();
        assert!(matches!(ops.first(), Some(Op::AddFdb(_))));
        assert!(matches!(ops.last(), Some(Op::DelFdb(_))));

        // Only the public IP changed: the FDB entry is replaced in place.
        let mut moved_ip = all.clone();
        moved_ip[1] = vx_lease("10.244.2.0-24", "172.16.1.99", 1, "52:17:43:ba:2e:56");
        let after = desired_vxlan(
            VX,
            &vxlan_peers(&moved_ip, Some(&own), 1, IpFamily::V4, t0()),
        );
        let p = plan_reconcile(&after, &before);
        assert_eq!(p.fdb.add.len(), 1);
        assert!(p.fdb.del.is_empty(), "replace overwrites the dst");
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn reconcile_route_changed_in_place_and_leftovers() {
        // A route to a peer subnet through the wrong gateway: replaced, not deleted.
        let desired = DesiredState {
            routes: vec![route("10.244.2.0/24", Some("10.244.2.0"), VX, true)],
            ..Default::default()
        };
        let actual = DesiredState {
            routes: vec![route("10.244.2.0/24", Some("10.244.7.0"), VX, true)],
            ..Default::default()
        };
        let p = plan_reconcile(&desired, &actual);
        assert_eq!(p.routes.add, desired.routes);
        assert!(p.routes.del.is_empty());

        // DirectRouting switched off: the direct route is replaced by the
        // encapsulated one (same destination).
        let actual = DesiredState {
            routes: vec![route("10.244.2.0/24", Some("172.16.1.13"), EXT, false)],
            ..Default::default()
        };
        let p = plan_reconcile(&desired, &actual);
        assert!(p.routes.del.is_empty());

        // A second remote for a desired MAC that is already correct: deleted.
        let f = |dst: &str| FdbEntry {
            ifindex: VX,
            mac: mac("02:00:00:00:00:02"),
            dst: ip(dst),
        };
        let desired = DesiredState {
            fdb: vec![f("172.16.1.13")],
            ..Default::default()
        };
        let actual = DesiredState {
            fdb: vec![f("172.16.1.13"), f("172.16.1.77")],
            ..Default::default()
        };
        let p = plan_reconcile(&desired, &actual);
        assert!(p.fdb.add.is_empty());
        assert_eq!(p.fdb.del, vec![f("172.16.1.77")]);
    }

    #[test]
    fn normalize_sorts_and_dedups() {
        let r1 = route("10.244.3.0/24", None, VX, false);
        let r2 = route("10.244.2.0/24", None, VX, false);
        let mut d = DesiredState {
            routes: vec![r1.clone(), r2.clone(), r1.clone()],
            ..Default::default()
        };
        d.normalize();
        assert_eq!(d.routes, vec![r2, r1]);
        assert!(!d.is_empty());
        assert!(DesiredState::default().is_empty());
    }

    /// A model of the kernel's replace/delete semantics for these objects.
    #[derive(Default, Debug)]
    struct ModelKernel {
        state: DesiredState,
    }

    impl ModelKernel {
        fn apply(&mut self, op: &Op) {
            let s = &mut self.state;
            match op {
                // Replace overwrites the object with the same key (the first
                // one, for an FDB MAC with several remotes), else appends.
                Op::AddRoute(r) => replace(&mut s.routes, r),
                Op::AddNeighbour(n) => replace(&mut s.neighbours, n),
                Op::AddFdb(e) => replace(&mut s.fdb, e),
                // `ip route del` matches dst, gateway and device.
                Op::DelRoute(r) => s.routes.retain(|x| x != r),
                // `ip neigh del IP dev X` matches the key only.
                Op::DelNeighbour(n) => s.neighbours.retain(|x| x.replace_key() != n.replace_key()),
                // `bridge fdb del MAC dev X dst IP` removes that remote.
                Op::DelFdb(e) => s.fdb.retain(|x| x != e),
            }
            s.normalize();
        }
    }

    fn replace<T: ReplaceKey + Clone + PartialEq>(v: &mut Vec<T>, t: &T) {
        match v.iter_mut().find(|x| x.replace_key() == t.replace_key()) {
            Some(x) => *x = t.clone(),
            None => v.push(t.clone()),
        }
    }

    fn random_state(rng: &mut impl rand::Rng) -> DesiredState {
        let mut d = DesiredState::default();
        let macs = [
            "02:00:00:00:00:01",
            "02:00:00:00:00:02",
            "02:00:00:00:00:03",
        ];
        for i in 0..4u8 {
            let dst = format!("10.244.{i}.0/24");
            if rng.random_bool(0.6) {
                let gw = if rng.random_bool(0.5) {
                    format!("10.244.{i}.0")
                } else {
                    "172.16.1.9".into()
                };
                let oif = if rng.random_bool(0.7) { VX } else { EXT };
                d.routes.push(route(&dst, Some(&gw), oif, oif == VX));
            }
            if rng.random_bool(0.6) {
                d.neighbours.push(Neighbour {
                    ifindex: VX,
                    ip: ip(&format!("10.244.{i}.0")),
                    mac: mac(macs[rng.random_range(0..3)]),
                });
            }
        }
        for m in macs {
            // Occasionally two remotes for one MAC in the actual state.
            for _ in 0..rng.random_range(0..3) {
                d.fdb.push(FdbEntry {
                    ifindex: VX,
                    mac: mac(m),
                    dst: ip(&format!("172.16.1.{}", rng.random_range(1..4))),
                });
            }
        }
        d.normalize();
        // Routes and neighbours cannot hold two objects with one key.
        d.routes.dedup_by_key(|r| r.replace_key());
        d.neighbours.dedup_by_key(|n| n.replace_key());
        d
    }

    #[test]
    fn plan_converges_on_a_model_kernel() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..2000 {
            let mut desired = random_state(&mut rng);
            // A desired state has one FDB entry per MAC.
            desired.fdb.dedup_by_key(|e| e.replace_key());
            let mut k = ModelKernel {
                state: random_state(&mut rng),
            };
            let start = k.state.clone();
            let mut passes = 0;
            loop {
                let plan = plan_reconcile(&desired, &k.state);
                if plan.is_empty() {
                    break;
                }
                passes += 1;
                assert!(passes <= 2, "no convergence from {start:?} to {desired:?}");
                for op in plan.ops() {
                    k.apply(&op);
                }
            }
            assert_eq!(k.state, desired);
            // One pass suffices unless a MAC had several stale remotes.
            let multi = start
                .fdb
                .windows(2)
                .any(|w| w[0].replace_key() == w[1].replace_key());
            if !multi {
                assert!(passes <= 1, "two passes from {start:?} to {desired:?}");
            }
        }
    }

    #[test]
    fn blackholes_are_wanted_for_each_own_subnet_only_with_the_flag() {
        let own = [net("10.244.1.0/24"), net("fd00:10:244:1::/64")];
        assert!(desired_blackholes(false, own).is_empty());
        let want = desired_blackholes(true, own);
        assert_eq!(
            want,
            vec![
                BlackholeRoute {
                    dst: net("10.244.1.0/24"),
                    metric: BLACKHOLE_METRIC
                },
                BlackholeRoute {
                    dst: net("fd00:10:244:1::/64"),
                    metric: BLACKHOLE_METRIC
                },
            ]
        );
    }

    #[test]
    fn only_blackholes_at_our_metric_inside_the_networks_are_ours() {
        let b = |d: &str, metric| BlackholeRoute {
            dst: net(d),
            metric,
        };
        let actual = [
            b("10.244.1.0/24", BLACKHOLE_METRIC),      // ours
            b("10.244.7.0/24", BLACKHOLE_METRIC),      // ours, from an earlier lease
            b("10.244.2.0/24", 0),                     // an operator's
            b("192.168.0.0/24", BLACKHOLE_METRIC),     // outside the network
            b("10.0.0.0/8", BLACKHOLE_METRIC),         // contains the network
            b("fd00:10:244:1::/64", BLACKHOLE_METRIC), // ours (IPv6)
        ];
        let networks = [net("10.244.0.0/16"), net("fd00:10:244::/56")];
        let ours = owned_blackholes(&actual, &networks);
        assert_eq!(
            ours,
            vec![
                b("10.244.1.0/24", BLACKHOLE_METRIC),
                b("10.244.7.0/24", BLACKHOLE_METRIC),
                b("fd00:10:244:1::/64", BLACKHOLE_METRIC),
            ]
        );
        // A new lease: the old subnet's blackhole goes, the new one comes.
        let d = diff(&desired_blackholes(true, [net("10.244.7.0/24")]), &ours);
        assert_eq!(d.add, vec![]);
        assert_eq!(
            d.del,
            vec![
                b("10.244.1.0/24", BLACKHOLE_METRIC),
                b("fd00:10:244:1::/64", BLACKHOLE_METRIC)
            ]
        );
    }
}
