//! The path of one packet, namespace by namespace, as the kernels decide it
//! right now: in each namespace the route the kernel picks (`ip route
//! get`), and what the device it leaves by does with it: the neighbour and
//! FDB entry that make `flannel.1` encapsulate it and to which VTEP, the
//! bridge port of `cni0`, flanneld's udp peer behind `flannel0`, or the
//! address on the other end of a veth.
//!
//! - `flannelctl lab explain FROM TO` follows it through every namespace of
//!   a lab, from pod to pod: packet-walk.txt, read off the lab.
//! - `flannelctl explain DST` on a node follows it through that node's own
//!   namespace until it leaves the node.
//!
//! The walk itself ([`walk`]) only asks questions through [`View`]; the
//! kernel-backed view ([`KernelView`]) answers them with netlink (one
//! socket opened inside each namespace, never a setns on this thread), and
//! the unit tests answer them from tables.

use std::cell::{OnceCell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use flannel_core::lease::Lease;
use flannel_core::mac::MacAddr;
use flannel_core::wire::UDP_DEFAULT_PORT;
use flannel_netlink::Netlink;
use ipnet::IpNet;

use crate::lab::{lab_namespaces, nl_err, Lab, LabError, Result};

/// More namespaces than any lab path crosses: beyond this it is a loop.
const MAX_HOPS: usize = 16;

/// What kind of device a route leaves by, as far as the walk cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevKind {
    /// A vxlan device (`flannel.<VNI>`): neighbour, FDB, encapsulation.
    Vxlan { vni: u32, port: u16 },
    /// A TUN device (`flannel0`): flanneld's udp datapath.
    Tun,
    /// A kernel WireGuard device (`flannel-wg` with the kernel datapath).
    Wireguard,
    /// A bridge (`cni0`): delivered to the port that learned the MAC.
    Bridge,
    /// Anything else (veth, ...): the other end holds the next hop.
    Other,
}

/// The kernel's answer to `ip route get DST` in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// The output device's name (`lo` for a local address).
    pub dev: String,
    pub kind: DevKind,
    pub gateway: Option<IpAddr>,
    /// The source address the kernel would choose.
    pub prefsrc: Option<IpAddr>,
    /// The destination is an address of this place.
    pub local: bool,
}

/// The questions a walk asks about the places (namespaces) it passes.
pub trait View {
    /// `ip route get DST` in `place`; `Err` is the kernel's refusal in words.
    fn route(&mut self, place: &str, dst: IpAddr) -> std::result::Result<Lookup, String>;
    /// `ip neigh show IP dev DEV` in `place`: the resolved MAC, if any.
    fn neighbour(&mut self, place: &str, dev: &str, ip: IpAddr) -> Option<MacAddr>;
    /// The remote VTEP of `mac` on the vxlan device `dev` (`bridge fdb show dev DEV`).
    fn fdb_dst(&mut self, place: &str, dev: &str, mac: MacAddr) -> Option<IpAddr>;
    /// The port of bridge `bridge` that learned `mac`.
    fn bridge_port(&mut self, place: &str, bridge: &str, mac: MacAddr) -> Option<String>;
    /// The vxlan device of `place` that decapsulates VNI `vni` arriving for
    /// `vtep`: the one whose `local` is that address (`flannel.1` for an IPv4
    /// underlay, `flannel-v6.1` for IPv6, both with VNI 1).
    fn vxlan_device(&mut self, place: &str, vni: u32, vtep: IpAddr) -> Option<String>;
    /// The place and device that hold address `ip`.
    fn owner(&self, ip: IpAddr) -> Option<(String, String)>;
    /// The udp backend's peer for `dst`: the PublicIP of the live udp lease
    /// whose subnet holds it, as flanneld's peer table picks it
    /// ([`udp_peer_of`]); `Ok(None)` when no udp lease holds it, `Err` (why)
    /// when the leases are not known.
    fn udp_peer(&self, dst: IpAddr) -> std::result::Result<Option<IpAddr>, String>;
    /// Whether the view knows every place the packet can reach (a lab): a
    /// next hop no place holds is then a drop. A node's own view is open:
    /// the packet leaves it.
    fn closed(&self) -> bool {
        true
    }
}

/// What happened to the packet in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// `ubuntu-1`, `k8s-node1`, `router`, ...
    pub place: String,
    /// How it came in, the route, and what the output device did.
    pub lines: Vec<String>,
}

/// Where the walk ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered to an address of `place`.
    Delivered { place: String },
    /// Dropped (or never sent) in `place`, and why.
    Dropped { place: String, reason: String },
    /// Left the places an open view knows (a node's own): `to` says where.
    Left { place: String, to: String },
}

/// One packet's path: from `from` to `dst`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walk {
    pub from: String,
    pub dst: IpAddr,
    pub hops: Vec<Hop>,
    pub outcome: Outcome,
}

impl Walk {
    /// The places crossed, in order.
    pub fn places(&self) -> Vec<&str> {
        self.hops.iter().map(|h| h.place.as_str()).collect()
    }

    /// Whether the packet reached an address of its destination.
    pub fn delivered(&self) -> bool {
        matches!(self.outcome, Outcome::Delivered { .. })
    }

    /// Whether it was dropped on the way.
    pub fn dropped(&self) -> bool {
        matches!(self.outcome, Outcome::Dropped { .. })
    }

    /// Every line of the walk, for searching.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.hops
            .iter()
            .flat_map(|h| h.lines.iter().map(String::as_str))
    }

    /// The walk as `lab explain` prints it.
    pub fn render(&self, to: &str) -> String {
        let mut out = format!("{} -> {to}:\n", self.from);
        for (i, h) in self.hops.iter().enumerate() {
            let _ = writeln!(out, "{:>2}. {}", i + 1, h.place);
            for l in &h.lines {
                let _ = writeln!(out, "      {l}");
            }
        }
        match &self.outcome {
            Outcome::Delivered { place } => {
                let _ = writeln!(out, "delivered to {place}");
            }
            Outcome::Dropped { place, reason } => {
                let _ = writeln!(out, "dropped in {place}: {reason}");
            }
            Outcome::Left { place, to } => {
                let _ = writeln!(out, "leaves {place} for {to}");
            }
        }
        out
    }
}

fn route_line(dst: IpAddr, r: &Lookup) -> String {
    let mut s = format!("route: {dst}");
    if let Some(gw) = r.gateway {
        let _ = write!(s, " via {gw}");
    }
    let _ = write!(s, " dev {}", r.dev);
    if let Some(src) = r.prefsrc {
        let _ = write!(s, " src {src}");
    }
    s
}

/// Follows a packet from `from` to `dst` through the places `view` knows.
pub fn walk(view: &mut dyn View, from: &str, dst: IpAddr) -> Walk {
    let mut hops = Vec::new();
    let mut place = from.to_string();
    let mut arrival: Option<String> = None;
    let end = |hops: Vec<Hop>, outcome| Walk {
        from: from.to_string(),
        dst,
        hops,
        outcome,
    };
    for _ in 0..MAX_HOPS {
        let mut lines: Vec<String> = arrival.take().into_iter().collect();
        let dropped = |hops: &mut Vec<Hop>, lines, place: &str, reason: String| {
            hops.push(Hop {
                place: place.to_string(),
                lines,
            });
            Outcome::Dropped {
                place: place.to_string(),
                reason,
            }
        };
        let r = match view.route(&place, dst) {
            Ok(r) => r,
            Err(e) => {
                let o = dropped(&mut hops, lines, &place, format!("ip route get {dst}: {e}"));
                return end(hops, o);
            }
        };
        if r.local {
            lines.push(format!("{dst} is an address of {place}: delivered"));
            hops.push(Hop {
                place: place.clone(),
                lines,
            });
            return end(hops, Outcome::Delivered { place });
        }
        lines.push(route_line(dst, &r));
        let next_hop = r.gateway.unwrap_or(dst);
        // The place the packet goes to next, and how it arrives there.
        let (next, how) = match r.kind {
            DevKind::Vxlan { vni, port } => {
                let Some(mac) = view.neighbour(&place, &r.dev, next_hop) else {
                    let why = format!(
                        "no neighbour entry for {next_hop} on {}: flanneld has not programmed this peer",
                        r.dev
                    );
                    let o = dropped(&mut hops, lines, &place, why);
                    return end(hops, o);
                };
                lines.push(format!("neighbour: {next_hop} lladdr {mac} dev {}", r.dev));
                let Some(vtep) = view.fdb_dst(&place, &r.dev, mac) else {
                    let why = format!("no fdb entry for {mac} on {}", r.dev);
                    let o = dropped(&mut hops, lines, &place, why);
                    return end(hops, o);
                };
                lines.push(format!(
                    "fdb: {mac} dst {vtep} dev {}: encapsulated in UDP to {}, VNI {vni}",
                    r.dev,
                    SocketAddr::new(vtep, port)
                ));
                match outer_leg(view, &place, vtep, &mut lines) {
                    Ok(None) => {
                        let to = format!("the VTEP {vtep} (encapsulated, VNI {vni})");
                        return left(hops, lines, place, to, end);
                    }
                    Ok(Some((next, dev))) => {
                        let decap = view
                            .vxlan_device(&next, vni, vtep)
                            .unwrap_or_else(|| format!("no device with VNI {vni} (dropped)"));
                        (
                            next,
                            format!("in on {dev}: UDP {port}, decapsulated by {decap}"),
                        )
                    }
                    Err(why) => {
                        let o = dropped(&mut hops, lines, &place, why);
                        return end(hops, o);
                    }
                }
            }
            DevKind::Tun
                if r.dev == flannel_core::wire::WIREGUARD_DEVICE
                    || r.dev == flannel_core::wire::WIREGUARD_DEVICE_V6 =>
            {
                // The walk does not follow WireGuard: which peer flanneld
                // encrypts for is its datapath's choice (allowed IPs).
                lines.push(format!(
                    "{} is flanneld's WireGuard TUN device: flanneld encrypts the packet for the peer whose allowed IPs hold {dst} and sends it in UDP to that peer's endpoint",
                    r.dev
                ));
                return left(
                    hops,
                    lines,
                    place,
                    "flanneld's wireguard datapath".to_string(),
                    end,
                );
            }
            DevKind::Wireguard => {
                lines.push(format!(
                    "{} is a kernel WireGuard device: the kernel encrypts the packet for the peer whose allowed IPs hold {dst} and sends it in UDP to that peer's endpoint (`wg show {} allowed-ips`)",
                    r.dev, r.dev
                ));
                return left(hops, lines, place, "kernel WireGuard".to_string(), end);
            }
            DevKind::Tun => {
                let peer = match view.udp_peer(dst) {
                    Ok(Some(peer)) => peer,
                    Ok(None) => {
                        let why = format!(
                            "flanneld (udp) has no peer for {dst}: no live udp lease holds it"
                        );
                        let o = dropped(&mut hops, lines, &place, why);
                        return end(hops, o);
                    }
                    Err(unknown) => {
                        lines.push(format!(
                            "{} is flanneld's TUN device: flanneld sends the packet in UDP to the PublicIP of the lease holding {dst}; the leases are not known here ({unknown})",
                            r.dev
                        ));
                        let to = "flanneld's udp datapath".to_string();
                        return left(hops, lines, place, to, end);
                    }
                };
                lines.push(format!(
                    "{} is flanneld's TUN device: flanneld sends the packet as the payload of UDP to {}",
                    r.dev,
                    SocketAddr::new(peer, UDP_DEFAULT_PORT)
                ));
                match outer_leg(view, &place, peer, &mut lines) {
                    Ok(None) => {
                        let to = format!(
                            "{} (flanneld's udp peer)",
                            SocketAddr::new(peer, UDP_DEFAULT_PORT)
                        );
                        return left(hops, lines, place, to, end);
                    }
                    Ok(Some((next, dev))) => (
                        next,
                        format!("in on {dev}: UDP {UDP_DEFAULT_PORT}, flanneld writes the packet to flannel0"),
                    ),
                    Err(why) => {
                        let o = dropped(&mut hops, lines, &place, why);
                        return end(hops, o);
                    }
                }
            }
            DevKind::Bridge | DevKind::Other => {
                if r.kind == DevKind::Bridge {
                    match view.neighbour(&place, &r.dev, next_hop) {
                        Some(mac) => {
                            let port = view
                                .bridge_port(&place, &r.dev, mac)
                                .map(|p| format!("port {p}"))
                                .unwrap_or_else(|| "not learned yet: flooded".into());
                            lines.push(format!(
                                "neighbour: {next_hop} lladdr {mac} dev {}; bridge {}: {port}",
                                r.dev, r.dev
                            ));
                        }
                        None => lines.push(format!(
                            "neighbour: {next_hop} not resolved yet: the kernel asks on {} first",
                            r.dev
                        )),
                    }
                }
                let Some((next, dev)) = view.owner(next_hop) else {
                    if !view.closed() {
                        let to = format!("{next_hop} on {}", r.dev);
                        return left(hops, lines, place, to, end);
                    }
                    let why = format!("no namespace of the lab holds {next_hop}");
                    let o = dropped(&mut hops, lines, &place, why);
                    return end(hops, o);
                };
                lines.push(format!("out on {} to {next_hop} ({next} {dev})", r.dev));
                (next, format!("in on {dev}"))
            }
        };
        hops.push(Hop {
            place: place.clone(),
            lines,
        });
        place = next;
        arrival = Some(how);
    }
    let o = Outcome::Dropped {
        place,
        reason: format!("more than {MAX_HOPS} hops: a routing loop"),
    };
    end(hops, o)
}

/// Ends a walk that left the places an open view knows.
fn left(
    mut hops: Vec<Hop>,
    lines: Vec<String>,
    place: String,
    to: String,
    end: impl FnOnce(Vec<Hop>, Outcome) -> Walk,
) -> Walk {
    hops.push(Hop {
        place: place.clone(),
        lines,
    });
    end(hops, Outcome::Left { place, to })
}

/// The encapsulated packet's way to the peer `to` (vxlan VTEP or udp
/// PublicIP) from `place`: the underlay route, and which place and device
/// receive it (`None`: no place an open view knows).
fn outer_leg(
    view: &mut dyn View,
    place: &str,
    to: IpAddr,
    lines: &mut Vec<String>,
) -> std::result::Result<Option<(String, String)>, String> {
    let outer = view
        .route(place, to)
        .map_err(|e| format!("the encapsulated packet: ip route get {to}: {e}"))?;
    lines.push(format!("outer packet: {}", route_line(to, &outer)));
    match view.owner(to) {
        Some(o) => Ok(Some(o)),
        None if !view.closed() => Ok(None),
        None => Err(format!("no namespace of the lab holds {to}")),
    }
}

/// [`View`] on namespaces through one netlink socket opened inside each:
/// every namespace of a lab (closed), or the calling process's own (open).
pub struct KernelView {
    places: BTreeMap<String, Netlink>,
    /// Every global address of every place: address -> (place, device).
    owners: BTreeMap<IpAddr, (String, String)>,
    /// The leases, once read.
    leases: OnceCell<std::result::Result<Vec<Lease>, String>>,
    /// How to read them, until a walk first needs them.
    read_leases: RefCell<Option<ReadLeases>>,
    closed: bool,
}

/// Reads the leases of a store; `Err` says why they are not known.
pub type ReadLeases = Box<dyn FnOnce() -> std::result::Result<Vec<Lease>, String>>;

/// The leases that name the udp backend's peers in a walk.
pub enum Leases {
    /// Read already (a lab, a local store).
    Known(Vec<Lease>),
    /// Read the first time a walk goes through `flannel0`, so that a walk
    /// that never does (vxlan, host-gw) never contacts the store (etcd).
    OnDemand(ReadLeases),
}

impl KernelView {
    /// A view of no place yet.
    fn new(leases: Leases, closed: bool) -> KernelView {
        let (leases, read_leases) = match leases {
            Leases::Known(l) => (OnceCell::from(Ok(l)), None),
            Leases::OnDemand(read) => (OnceCell::new(), Some(read)),
        };
        KernelView {
            places: BTreeMap::new(),
            owners: BTreeMap::new(),
            leases,
            read_leases: RefCell::new(read_leases),
            closed,
        }
    }

    /// Opens every namespace of `lab` and reads their addresses.
    pub fn open_lab(lab: &Lab) -> Result<KernelView> {
        let prefix = format!("{}-", lab.name());
        let mut view = KernelView::new(Leases::Known(lab.leases()?), true);
        for ns in lab_namespaces(lab.name()) {
            let Some(place) = ns.strip_prefix(&prefix).map(str::to_string) else {
                continue;
            };
            let netns = lab.netns(&place)?;
            let nl = Netlink::open_in(&netns).map_err(nl_err(format!("netlink in {place}")))?;
            view.add_place(place, nl)?;
        }
        Ok(view)
    }

    /// The calling process's own namespace (a node), called `place`: the
    /// walk ends when the packet leaves it. `leases` name the udp
    /// backend's peers.
    pub fn open_here(place: &str, leases: Leases) -> Result<KernelView> {
        let nl = Netlink::open().map_err(nl_err("opening netlink"))?;
        let mut view = KernelView::new(leases, false);
        view.add_place(place.to_string(), nl)?;
        Ok(view)
    }

    /// Records a place and the addresses it holds.
    fn add_place(&mut self, place: String, mut nl: Netlink) -> Result<()> {
        for link in nl
            .list_links()
            .map_err(nl_err(format!("ip link in {place}")))?
        {
            for a in nl
                .list_addresses(link.index)
                .map_err(nl_err(format!("ip addr in {place}")))?
            {
                if usable(&a) {
                    self.owners
                        .insert(a.addr(), (place.clone(), link.name.clone()));
                }
            }
        }
        self.places.insert(place, nl);
        Ok(())
    }

    fn nl(&mut self, place: &str) -> Option<&mut Netlink> {
        self.places.get_mut(place)
    }

    fn index_of(&mut self, place: &str, dev: &str) -> Option<u32> {
        Some(self.nl(place)?.link_by_name(dev).ok()??.index)
    }
}

/// An address that names a place: not loopback, not link-local.
fn usable(a: &IpNet) -> bool {
    match a.addr() {
        IpAddr::V4(v4) => !v4.is_loopback(),
        IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

impl View for KernelView {
    fn route(&mut self, place: &str, dst: IpAddr) -> std::result::Result<Lookup, String> {
        let nl = self
            .nl(place)
            .ok_or_else(|| format!("{place} is not a namespace of the lab"))?;
        let r = nl.get_route(dst).map_err(|e| match e.raw_os_error() {
            // What `ip route get` means by it.
            Some(libc::EINVAL) => "blackhole route".to_string(),
            Some(libc::ENETUNREACH) => "no route (Network is unreachable)".to_string(),
            Some(libc::EHOSTUNREACH) => "unreachable route (No route to host)".to_string(),
            _ => e.to_string(),
        })?;
        let link = nl
            .link_by_index(r.oif)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("the route's device (index {}) is gone", r.oif))?;
        let kind = match (link.kind.as_deref(), &link.vxlan) {
            (_, Some(vx)) => DevKind::Vxlan {
                vni: vx.vni,
                port: vx.port,
            },
            (Some("tun"), _) => DevKind::Tun,
            (Some("wireguard"), _) => DevKind::Wireguard,
            (Some("bridge"), _) => DevKind::Bridge,
            _ => DevKind::Other,
        };
        Ok(Lookup {
            dev: link.name,
            kind,
            gateway: r.gateway,
            prefsrc: r.prefsrc,
            local: r.local,
        })
    }

    fn neighbour(&mut self, place: &str, dev: &str, ip: IpAddr) -> Option<MacAddr> {
        let index = self.index_of(place, dev)?;
        self.nl(place)?.neighbour_of(index, ip).ok()?
    }

    fn fdb_dst(&mut self, place: &str, dev: &str, mac: MacAddr) -> Option<IpAddr> {
        let index = self.index_of(place, dev)?;
        let fdb = self.nl(place)?.list_fdb(index).ok()?;
        fdb.into_iter().find(|e| e.mac == mac).map(|e| e.dst)
    }

    fn bridge_port(&mut self, place: &str, bridge: &str, mac: MacAddr) -> Option<String> {
        let index = self.index_of(place, bridge)?;
        let nl = self.nl(place)?;
        let port = nl.bridge_port_of(index, mac).ok()??;
        Some(nl.link_by_index(port).ok()??.name)
    }

    fn vxlan_device(&mut self, place: &str, vni: u32, vtep: IpAddr) -> Option<String> {
        let links = self.nl(place)?.list_links().ok()?;
        let with_vni = |l: &&flannel_netlink::Link| l.vxlan.as_ref().is_some_and(|v| v.vni == vni);
        let local = |l: &flannel_netlink::Link| l.vxlan.as_ref().and_then(|v| v.local);
        links
            .iter()
            .filter(with_vni)
            .find(|l| local(l) == Some(vtep))
            .or_else(|| {
                links
                    .iter()
                    .filter(with_vni)
                    .find(|l| local(l).is_none_or(|a| a.is_ipv4() == vtep.is_ipv4()))
            })
            .map(|l| l.name.clone())
    }

    fn owner(&self, ip: IpAddr) -> Option<(String, String)> {
        self.owners.get(&ip).cloned()
    }

    fn closed(&self) -> bool {
        self.closed
    }

    fn udp_peer(&self, dst: IpAddr) -> std::result::Result<Option<IpAddr>, String> {
        let leases = self.leases.get_or_init(|| match self.read_leases.take() {
            Some(read) => read(),
            None => Err("no store to read them from".into()),
        });
        Ok(udp_peer_of(
            leases.as_ref().map_err(Clone::clone)?,
            dst,
            SystemTime::now(),
        ))
    }
}

/// The PublicIP flanneld's udp datapath sends a packet for `dst` to: its
/// peer table's choice among `leases` at `now` (the live udp leases, which
/// include those without `BackendType` as upstream's udp nodes write them;
/// the longest subnet holding `dst`).
pub fn udp_peer_of(leases: &[Lease], dst: IpAddr, now: SystemTime) -> Option<IpAddr> {
    let IpAddr::V4(dst) = dst else {
        return None;
    };
    flannel_core::udp::udp_peers(leases, None, now)
        .into_iter()
        .filter(|p| p.subnet.contains(&dst))
        .max_by_key(|p| p.subnet.prefix_len())
        .map(|p| IpAddr::V4(p.public_ip))
}

impl Lab {
    /// The path of a packet from the place `from` (a pod, node, `router`,
    /// ...) to `dst`, read off the lab's kernels now.
    pub fn explain(&self, from: &str, dst: IpAddr) -> Result<Walk> {
        // Checks the name (the error lists the known ones).
        self.netns(from)?;
        let mut view = KernelView::open_lab(self)?;
        Ok(walk(&mut view, from, dst))
    }

    /// The address `lab explain` sends to for `to`: an address as given, a
    /// pod's first address (IPv4 first), a node's underlay address, or the
    /// outside host's (labs with `--ip-masq`).
    pub fn explain_target(&self, to: &str) -> Result<IpAddr> {
        if let Ok(ip) = to.parse() {
            return Ok(ip);
        }
        if let Some(p) = self.state.pod(to) {
            if let Some(a) = p.addresses().first() {
                return Ok(*a);
            }
        }
        if let Some(n) = self.state.node(to) {
            return Ok(IpAddr::V4(n.underlay_ip));
        }
        if to == "outside" && self.state.ip_masq {
            return Ok(IpAddr::V4(crate::lab::OUTSIDE_IP));
        }
        // The same error as for an unknown place.
        self.state.netns_of(to)?;
        Err(LabError::InvalidOption {
            option: "TO",
            reason: format!("{to} has no address to send to; pass an address"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view from tables: routes per (place, dst), neighbours, FDB,
    /// bridge ports, owners, udp peers.
    #[derive(Default)]
    struct Tables {
        routes: BTreeMap<(String, IpAddr), std::result::Result<Lookup, String>>,
        neighbours: BTreeMap<(String, String, IpAddr), MacAddr>,
        fdb: BTreeMap<(String, String, MacAddr), IpAddr>,
        ports: BTreeMap<(String, MacAddr), String>,
        vxlan: BTreeMap<String, String>,
        owners: BTreeMap<IpAddr, (String, String)>,
        udp: BTreeMap<IpAddr, IpAddr>,
        /// Why the leases are not known, if they are not.
        udp_unknown: Option<String>,
        /// A node's own view: places beyond it are unknown.
        open: bool,
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn mac(s: &str) -> MacAddr {
        s.parse().unwrap()
    }

    impl Tables {
        fn route(&mut self, place: &str, dst: &str, dev: &str, kind: DevKind, gw: Option<&str>) {
            self.routes.insert(
                (place.into(), ip(dst)),
                Ok(Lookup {
                    dev: dev.into(),
                    kind,
                    gateway: gw.map(ip),
                    prefsrc: None,
                    local: false,
                }),
            );
        }
        fn local(&mut self, place: &str, dst: &str) {
            self.routes.insert(
                (place.into(), ip(dst)),
                Ok(Lookup {
                    dev: "lo".into(),
                    kind: DevKind::Other,
                    gateway: None,
                    prefsrc: None,
                    local: true,
                }),
            );
        }
        fn own(&mut self, addr: &str, place: &str, dev: &str) {
            self.owners.insert(ip(addr), (place.into(), dev.into()));
        }
    }

    impl View for Tables {
        fn route(&mut self, place: &str, dst: IpAddr) -> std::result::Result<Lookup, String> {
            self.routes
                .get(&(place.to_string(), dst))
                .cloned()
                .unwrap_or_else(|| Err("no route (Network is unreachable)".into()))
        }
        fn neighbour(&mut self, place: &str, dev: &str, ip: IpAddr) -> Option<MacAddr> {
            self.neighbours
                .get(&(place.into(), dev.into(), ip))
                .copied()
        }
        fn fdb_dst(&mut self, place: &str, dev: &str, mac: MacAddr) -> Option<IpAddr> {
            self.fdb.get(&(place.into(), dev.into(), mac)).copied()
        }
        fn bridge_port(&mut self, place: &str, _bridge: &str, mac: MacAddr) -> Option<String> {
            self.ports.get(&(place.into(), mac)).cloned()
        }
        fn vxlan_device(&mut self, place: &str, _vni: u32, _vtep: IpAddr) -> Option<String> {
            self.vxlan.get(place).cloned()
        }
        fn owner(&self, ip: IpAddr) -> Option<(String, String)> {
            self.owners.get(&ip).cloned()
        }
        fn udp_peer(&self, dst: IpAddr) -> std::result::Result<Option<IpAddr>, String> {
            match &self.udp_unknown {
                Some(why) => Err(why.clone()),
                None => Ok(self.udp.get(&dst).copied()),
            }
        }
        fn closed(&self) -> bool {
            !self.open
        }
    }

    const VX: DevKind = DevKind::Vxlan { vni: 1, port: 8472 };

    /// packet-walk.txt's cluster: ubuntu-1 (10.244.1.96) on k8s-node1
    /// (172.16.1.14), ubuntu-2 (10.244.2.66) on k8s-node2 (172.16.1.13).
    fn packet_walk() -> Tables {
        let mut t = Tables::default();
        let dst = "10.244.2.66";
        t.own("10.244.1.96", "ubuntu-1", "eth0");
        t.own("10.244.1.1", "k8s-node1", "cni0");
        t.own("10.244.1.0", "k8s-node1", "flannel.1");
        t.own("172.16.1.14", "k8s-node1", "ens3");
        t.own("172.16.1.13", "k8s-node2", "ens3");
        t.own("10.244.2.0", "k8s-node2", "flannel.1");
        t.own("10.244.2.1", "k8s-node2", "cni0");
        t.own(dst, "ubuntu-2", "eth0");
        t.route("ubuntu-1", dst, "eth0", DevKind::Other, Some("10.244.1.1"));
        t.route("k8s-node1", dst, "flannel.1", VX, Some("10.244.2.0"));
        let vtep_mac = mac("9e:2b:c5:7f:1a:01");
        t.neighbours.insert(
            ("k8s-node1".into(), "flannel.1".into(), ip("10.244.2.0")),
            vtep_mac,
        );
        t.fdb.insert(
            ("k8s-node1".into(), "flannel.1".into(), vtep_mac),
            ip("172.16.1.13"),
        );
        t.route("k8s-node1", "172.16.1.13", "ens3", DevKind::Other, None);
        t.vxlan.insert("k8s-node2".into(), "flannel.1".into());
        t.route("k8s-node2", dst, "cni0", DevKind::Bridge, None);
        let pod_mac = mac("0a:58:0a:f4:02:42");
        t.neighbours
            .insert(("k8s-node2".into(), "cni0".into(), ip(dst)), pod_mac);
        t.ports
            .insert(("k8s-node2".into(), pod_mac), "veth7c1d2e3f".into());
        t.local("ubuntu-2", dst);
        t
    }

    #[test]
    fn the_packet_walk_through_vxlan() {
        let mut t = packet_walk();
        let w = walk(&mut t, "ubuntu-1", ip("10.244.2.66"));
        assert_eq!(
            w.places(),
            ["ubuntu-1", "k8s-node1", "k8s-node2", "ubuntu-2"]
        );
        assert!(w.delivered(), "{}", w.render("ubuntu-2"));
        let text = w.render("ubuntu-2");
        for want in [
            "route: 10.244.2.66 via 10.244.1.1 dev eth0",
            "out on eth0 to 10.244.1.1 (k8s-node1 cni0)",
            "in on cni0",
            "route: 10.244.2.66 via 10.244.2.0 dev flannel.1",
            "neighbour: 10.244.2.0 lladdr 9e:2b:c5:7f:1a:01 dev flannel.1",
            "fdb: 9e:2b:c5:7f:1a:01 dst 172.16.1.13 dev flannel.1: encapsulated in UDP to 172.16.1.13:8472, VNI 1",
            "outer packet: route: 172.16.1.13 dev ens3",
            "in on ens3: UDP 8472, decapsulated by flannel.1",
            "bridge cni0: port veth7c1d2e3f",
            "10.244.2.66 is an address of ubuntu-2: delivered",
            "delivered to ubuntu-2",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn a_missing_neighbour_or_fdb_entry_is_where_it_drops() {
        let mut t = packet_walk();
        t.fdb.clear();
        let w = walk(&mut t, "ubuntu-1", ip("10.244.2.66"));
        assert_eq!(
            w.outcome,
            Outcome::Dropped {
                place: "k8s-node1".into(),
                reason: "no fdb entry for 9e:2b:c5:7f:1a:01 on flannel.1".into()
            }
        );
        t.neighbours.clear();
        let w = walk(&mut t, "ubuntu-1", ip("10.244.2.66"));
        let Outcome::Dropped { place, reason } = &w.outcome else {
            panic!("{w:?}")
        };
        assert_eq!(place, "k8s-node1");
        assert!(
            reason.contains("no neighbour entry for 10.244.2.0"),
            "{reason}"
        );
        // A missing route: the kernel's words.
        let mut t = packet_walk();
        t.routes
            .remove(&("k8s-node1".to_string(), ip("10.244.2.66")));
        let w = walk(&mut t, "ubuntu-1", ip("10.244.2.66"));
        assert_eq!(w.places(), ["ubuntu-1", "k8s-node1"]);
        assert!(
            matches!(&w.outcome, Outcome::Dropped { reason, .. } if reason.contains("Network is unreachable"))
        );
    }

    #[test]
    fn host_gw_goes_via_the_peers_public_ip() {
        let mut t = packet_walk();
        t.route(
            "k8s-node1",
            "10.244.2.66",
            "ens3",
            DevKind::Other,
            Some("172.16.1.13"),
        );
        let w = walk(&mut t, "ubuntu-1", ip("10.244.2.66"));
        assert!(w.delivered());
        assert_eq!(
            w.places(),
            ["ubuntu-1", "k8s-node1", "k8s-node2", "ubuntu-2"]
        );
        assert!(w.hops[1]
            .lines
            .contains(&"out on ens3 to 172.16.1.13 (k8s-node2 ens3)".to_string()));
        assert!(!w.lines().any(|l| l.contains("encapsulated")));
    }

    #[test]
    fn udp_goes_through_flanneld_to_the_leases_public_ip() {
        let mut t = packet_walk();
        t.route("k8s-node1", "10.244.2.66", "flannel0", DevKind::Tun, None);
        t.udp.insert(ip("10.244.2.66"), ip("172.16.1.13"));
        let w = walk(&mut t, "ubuntu-1", ip("10.244.2.66"));
        assert!(w.delivered(), "{}", w.render("x"));
        let text = w.render("x");
        assert!(
            text.contains("flanneld sends the packet as the payload of UDP to 172.16.1.13:8285")
        );
        assert!(text.contains("in on ens3: UDP 8285, flanneld writes the packet to flannel0"));
        // No lease for the destination: flanneld has no peer.
        t.udp.clear();
        let w = walk(&mut t, "ubuntu-1", ip("10.244.2.66"));
        assert!(matches!(&w.outcome, Outcome::Dropped { place, .. } if place == "k8s-node1"));
    }

    #[test]
    fn wireguard_leaves_through_flanneld_without_guessing_a_udp_peer() {
        let mut t = packet_walk();
        t.route("k8s-node1", "10.244.2.66", "flannel-wg", DevKind::Tun, None);
        let w = walk(&mut t, "ubuntu-1", ip("10.244.2.66"));
        let text = w.render("x");
        assert!(
            matches!(&w.outcome, Outcome::Left { place, to } if place == "k8s-node1" && to == "flanneld's wireguard datapath"),
            "{text}"
        );
        assert!(
            text.contains("flannel-wg is flanneld's WireGuard TUN device"),
            "{text}"
        );
        assert!(!text.contains("udp"), "{text}");
    }

    #[test]
    fn kernel_wireguard_leaves_through_the_kernel() {
        let mut t = packet_walk();
        t.route(
            "k8s-node1",
            "10.244.2.66",
            "flannel-wg",
            DevKind::Wireguard,
            None,
        );
        let w = walk(&mut t, "ubuntu-1", ip("10.244.2.66"));
        let text = w.render("x");
        assert!(
            matches!(&w.outcome, Outcome::Left { place, to } if place == "k8s-node1" && to == "kernel WireGuard"),
            "{text}"
        );
        assert!(
            text.contains("flannel-wg is a kernel WireGuard device"),
            "{text}"
        );
    }

    /// The leases as flanneld reads them: upstream's udp lease (no
    /// `BackendType`) and ours name the peer; a vxlan lease, an expired one
    /// and an IPv6 destination do not.
    #[test]
    fn udp_peer_of_reads_untyped_leases_as_udp() {
        use flannel_core::lease::{LeaseAttrs, BACKEND_VXLAN};
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let lease = |key: &str, attrs: LeaseAttrs| Lease {
            key: key.parse().unwrap(),
            attrs,
            expiration: Some(now + std::time::Duration::from_secs(60)),
        };
        let mut expired = lease(
            "10.244.4.0-24",
            LeaseAttrs::new_udp("172.16.1.14".parse().unwrap()),
        );
        expired.expiration = Some(now);
        let leases = [
            lease(
                "10.244.2.0-24",
                LeaseAttrs::from_json(r#"{"PublicIP":"172.16.1.12","PublicIPv6":null}"#).unwrap(),
            ),
            lease(
                "10.244.2.128-25",
                LeaseAttrs::new_udp("172.16.1.13".parse().unwrap()),
            ),
            lease(
                "10.244.3.0-24",
                LeaseAttrs::new(BACKEND_VXLAN, Some("172.16.1.15".parse().unwrap()), None),
            ),
            expired,
        ];
        let peer = |d: &str| udp_peer_of(&leases, ip(d), now);
        assert_eq!(peer("10.244.2.66"), Some(ip("172.16.1.12")));
        assert_eq!(
            peer("10.244.2.200"),
            Some(ip("172.16.1.13")),
            "longest prefix"
        );
        assert_eq!(peer("10.244.3.1"), None, "a vxlan lease is no udp peer");
        assert_eq!(peer("10.244.4.1"), None, "expired");
        assert_eq!(peer("fd00::1"), None);
    }

    #[test]
    fn a_routing_loop_ends_the_walk() {
        let mut t = Tables::default();
        t.own("172.16.1.13", "b", "eth0");
        t.own("172.16.1.14", "a", "eth0");
        t.route("a", "10.9.9.9", "eth0", DevKind::Other, Some("172.16.1.13"));
        t.route("b", "10.9.9.9", "eth0", DevKind::Other, Some("172.16.1.14"));
        let w = walk(&mut t, "a", ip("10.9.9.9"));
        assert_eq!(w.hops.len(), MAX_HOPS);
        assert!(
            matches!(&w.outcome, Outcome::Dropped { reason, .. } if reason.contains("routing loop"))
        );
    }

    #[test]
    fn a_nodes_own_view_ends_where_the_packet_leaves_it() {
        // Only k8s-node1 is known, as on a real node.
        let mut t = packet_walk();
        t.open = true;
        t.owners.retain(|_, (place, _)| place == "k8s-node1");
        let w = walk(&mut t, "k8s-node1", ip("10.244.2.66"));
        assert_eq!(
            w.outcome,
            Outcome::Left {
                place: "k8s-node1".into(),
                to: "the VTEP 172.16.1.13 (encapsulated, VNI 1)".into()
            }
        );
        assert!(!w.delivered() && !w.dropped());
        assert!(w
            .render("x")
            .ends_with("leaves k8s-node1 for the VTEP 172.16.1.13 (encapsulated, VNI 1)\n"));
        // udp without the leases: flanneld's datapath and why the peer is
        // not named, not a drop.
        t.route("k8s-node1", "10.244.2.66", "flannel0", DevKind::Tun, None);
        t.udp_unknown = Some("etcd at http://127.0.0.1:1: connection refused".into());
        let w = walk(&mut t, "k8s-node1", ip("10.244.2.66"));
        assert!(matches!(&w.outcome, Outcome::Left { to, .. } if to == "flanneld's udp datapath"));
        assert!(w.render("x").contains(
            "the leases are not known here (etcd at http://127.0.0.1:1: connection refused)"
        ));
        // Leases known and none holds it: flanneld drops it, even on a node.
        t.udp_unknown = None;
        let w = walk(&mut t, "k8s-node1", ip("10.244.2.66"));
        assert!(
            matches!(&w.outcome, Outcome::Dropped { reason, .. } if reason.contains("no live udp lease holds it"))
        );
        // With the leases: the peer.
        t.udp.insert(ip("10.244.2.66"), ip("172.16.1.13"));
        let w = walk(&mut t, "k8s-node1", ip("10.244.2.66"));
        assert!(
            matches!(&w.outcome, Outcome::Left { to, .. } if to == "172.16.1.13:8285 (flanneld's udp peer)")
        );
        // A missing route is still a drop.
        let w = walk(&mut t, "k8s-node1", ip("10.99.0.1"));
        assert!(w.dropped());
    }
}
