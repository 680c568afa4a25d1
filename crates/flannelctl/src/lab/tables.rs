//! What flannel manages in a node's kernel, read back over netlink, and what
//! it must be for the lab's plan: the packet walk's triple per peer with
//! vxlan, a route via the peer's underlay address with host-gw, and cni0's
//! route to the node's own subnet. Shared by `lab chaos` (its convergence
//! check) and the end-to-end tests.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use flannel_core::datapath::{FdbEntry, Neighbour, Route};
use flannel_core::mac::MacAddr;
use flannel_netlink::Netlink;
use ipnet::IpNet;

use super::{cluster_network, nl_err, ns_err, Backend, Lab, Result, NODE_IFACE};

/// The bridge the CNI plugin attaches a node's pods to.
pub use flannel_core::wire::CNI_BRIDGE;

/// What flannel manages on a node, as its kernel holds it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    /// `flannel.1`'s ifindex and MAC, when the device exists.
    pub device: Option<(u32, MacAddr)>,
    /// `ens3`'s ifindex.
    pub external: u32,
    /// Every IPv4 route into the cluster network but to the node's own
    /// subnet, and every IPv4 route via `flannel.1`.
    pub routes: BTreeSet<Route>,
    /// Permanent neighbours on `flannel.1`.
    pub neighbours: BTreeSet<Neighbour>,
    /// FDB entries with a `dst` on `flannel.1`.
    pub fdb: BTreeSet<FdbEntry>,
    /// `ip route show <own subnet> dev cni0` holds a route (None: the node
    /// has no cni0, as a node without pods).
    pub cni0_route: Option<bool>,
}

/// The objects flannel must hold on one node: routes, neighbours, FDB entries.
pub type Triples = (BTreeSet<Route>, BTreeSet<Neighbour>, BTreeSet<FdbEntry>);

/// Reads a node's tables (`ip -4 route`, `ip neigh show dev flannel.1 nud
/// permanent`, `bridge fdb show dev flannel.1`, inside its namespace).
pub fn read(lab: &Lab, node: &str) -> Result<Tables> {
    let n = lab.node(node)?;
    let own = n.subnet;
    let cluster = cluster_network();
    let device = flannel_core::wire::vxlan_device_name(super::VNI);
    let ctx = format!("reading the tables of {node}");
    lab.netns(node)?
        .run(|| -> Result<Tables> {
            let mut nl = Netlink::open().map_err(nl_err(ctx.clone()))?;
            let link = nl.link_by_name(&device).map_err(nl_err(ctx.clone()))?;
            let ext = nl
                .link_by_name(NODE_IFACE)
                .map_err(nl_err(ctx.clone()))?
                .map(|l| l.index)
                .unwrap_or(0);
            let cni0 = nl
                .link_by_name(CNI_BRIDGE)
                .map_err(nl_err(ctx.clone()))?
                .map(|l| l.index);
            let all = nl.list_routes().map_err(nl_err(ctx.clone()))?;
            let cni0_route = cni0.map(|i| {
                all.iter()
                    .any(|r| r.oif == i && r.dst == IpNet::V4(own) && r.gateway.is_none())
            });
            let on_device = |oif: u32| link.as_ref().is_some_and(|l| l.index == oif);
            let routes = all
                .into_iter()
                .filter(|r| match r.dst {
                    IpNet::V4(d) => on_device(r.oif) || (cluster.contains(&d) && d != own),
                    IpNet::V6(_) => false,
                })
                .collect();
            let (neighbours, fdb) = match &link {
                Some(l) => (
                    nl.list_neighbours(l.index)
                        .map_err(nl_err(ctx.clone()))?
                        .into_iter()
                        .collect(),
                    nl.list_fdb(l.index)
                        .map_err(nl_err(ctx.clone()))?
                        .into_iter()
                        .collect(),
                ),
                None => (BTreeSet::new(), BTreeSet::new()),
            };
            Ok(Tables {
                device: link.map(|l| (l.index, l.mac.unwrap_or_default())),
                external: ext,
                routes,
                neighbours,
                fdb,
                cni0_route,
            })
        })
        .map_err(ns_err(ctx.clone()))?
}

/// The exact vxlan triple per peer (packet-walk.txt): neighbour
/// subnet-address -> VtepMAC, FDB VtepMAC -> PublicIP, route subnet via
/// subnet-address onlink, all on `ifindex` (`flannel.1`).
pub fn expected_vxlan(lab: &Lab, ifindex: u32, peers: &[(&str, MacAddr)]) -> Result<Triples> {
    let mut r = BTreeSet::new();
    let mut n = BTreeSet::new();
    let mut f = BTreeSet::new();
    for (peer, mac) in peers {
        let p = lab.node(peer)?;
        let gw = IpAddr::V4(p.subnet.network());
        r.insert(Route {
            dst: IpNet::V4(p.subnet),
            gateway: Some(gw),
            oif: ifindex,
            onlink: true,
        });
        n.insert(Neighbour {
            ifindex,
            ip: gw,
            mac: *mac,
        });
        f.insert(FdbEntry {
            ifindex,
            mac: *mac,
            dst: IpAddr::V4(p.underlay_ip),
        });
    }
    Ok((r, n, f))
}

/// host-gw: `<subnet> via <PublicIP> dev ens3` per peer, nothing else.
pub fn expected_host_gw(lab: &Lab, external: u32, peers: &[&str]) -> Result<Triples> {
    let mut r = BTreeSet::new();
    for peer in peers {
        let p = lab.node(peer)?;
        r.insert(Route {
            dst: IpNet::V4(p.subnet),
            gateway: Some(IpAddr::V4(p.underlay_ip)),
            oif: external,
            onlink: false,
        });
    }
    Ok((r, BTreeSet::new(), BTreeSet::new()))
}

/// Whether a node's kernel holds exactly what the lab's backend implies for
/// every other node of the lab (`macs`: each vxlan node's VtepMAC) and
/// cni0's route; `Err` describes the first difference.
pub fn check_node(lab: &Lab, node: &str, macs: &[(String, MacAddr)]) -> Result<Result<(), String>> {
    check_tables(lab, node, &read(lab, node)?, macs)
}

/// [`check_node`] on tables already read.
pub fn check_tables(
    lab: &Lab,
    node: &str,
    t: &Tables,
    macs: &[(String, MacAddr)],
) -> Result<Result<(), String>> {
    let peers: Vec<&str> = lab
        .state
        .nodes
        .iter()
        .map(|n| n.name.as_str())
        .filter(|p| *p != node)
        .collect();
    let want = match lab.state.backend {
        Backend::Vxlan => {
            let Some((ifindex, _)) = t.device else {
                return Ok(Err(format!("{node}: flannel.1 is missing")));
            };
            let mut with_mac = Vec::new();
            for p in &peers {
                match macs.iter().find(|(n, _)| n == p) {
                    Some((_, m)) => with_mac.push((*p, *m)),
                    None => return Ok(Err(format!("{p}: no VtepMAC known"))),
                }
            }
            expected_vxlan(lab, ifindex, &with_mac)?
        }
        Backend::HostGw => {
            if t.device.is_some() {
                return Ok(Err(format!("{node}: flannel.1 is left over under host-gw")));
            }
            expected_host_gw(lab, t.external, &peers)?
        }
        other => {
            return Ok(Err(format!(
                "{node}: the {other} backend's kernel state is not checked"
            )))
        }
    };
    Ok(compare(node, t, &want))
}

/// `Err` naming what differs between `t` and `want` (and a missing cni0 route).
pub fn compare(node: &str, t: &Tables, want: &Triples) -> Result<(), String> {
    let mut out = String::new();
    fn diff<T: Ord + std::fmt::Debug>(
        out: &mut String,
        what: &str,
        got: &BTreeSet<T>,
        want: &BTreeSet<T>,
    ) {
        let missing: Vec<_> = want.difference(got).collect();
        let extra: Vec<_> = got.difference(want).collect();
        if !missing.is_empty() {
            let _ = write!(out, " missing {what} {missing:?};");
        }
        if !extra.is_empty() {
            let _ = write!(out, " extra {what} {extra:?};");
        }
    }
    diff(&mut out, "routes", &t.routes, &want.0);
    diff(&mut out, "neighbours", &t.neighbours, &want.1);
    diff(&mut out, "FDB entries", &t.fdb, &want.2);
    if t.cni0_route == Some(false) {
        out.push_str(" cni0 has no route to the node's subnet;");
    }
    if out.is_empty() {
        Ok(())
    } else {
        Err(format!("{node}:{}", out.trim_end_matches(';')))
    }
}
