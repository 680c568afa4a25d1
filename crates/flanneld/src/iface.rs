//! Choosing the external interface: the one carrying inter-host (underlay)
//! traffic, whose addresses become the vxlan `local` (one per address
//! family) and, unless `--public-ip` / `--public-ipv6` say otherwise, the
//! PublicIP / PublicIPv6 of our lease.
//!
//! Order, as upstream: every `--iface` (a name or an address) in the order
//! given, then every `--iface-regex` (matched against the interfaces'
//! addresses first, then their names), and only when neither flag was given,
//! the interface of the default route (`ip route show default`; with IPv4
//! disabled, `ip -6 route show default`).
//!
//! The interface must have a global address in every family the config
//! enables: dual stack needs both an IPv4 and an IPv6 address on it (the
//! `flannel-v6.<VNI>` device sends from the IPv6 one, as upstream).
//!
//! [`select`] is the pure decision over a snapshot of links, addresses and
//! routes; [`lookup`] takes that snapshot from the kernel.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flannel_core::lease::IpFamily;
use flannel_netlink::{Netlink, RouteLookup};
use ipnet::IpNet;
use regex::Regex;

/// Errors of interface selection, each telling which flag to fix.
#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error("--iface-regex {pattern:?} is not a valid regular expression: {source}")]
    BadRegex {
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error(
        "no usable interface matches --iface {ifaces:?} / --iface-regex {regexes:?} ({detail}); \
         pass the name or address of an interface that is up and has a global {families} address"
    )]
    NoMatch {
        ifaces: Vec<String>,
        regexes: Vec<String>,
        detail: String,
        families: &'static str,
    },
    #[error(
        "no {family} default route to pick the external interface from; pass --iface NAME or --iface-regex"
    )]
    NoDefaultRoute { family: &'static str },
    #[error("the default route's interface (index {index}) {problem}; pass --iface NAME")]
    DefaultRouteUnusable { index: u32, problem: String },
    #[error("--iface-can-reach {target}: {problem}; pass an address this node reaches over its external interface, or --iface NAME")]
    CanReach { target: IpAddr, problem: String },
    #[error("reading interfaces from the kernel: {0}")]
    Kernel(#[from] flannel_netlink::Error),
}

/// One interface as selection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// Global addresses, in the order the kernel lists them.
    pub addrs: Vec<IpNet>,
}

impl Candidate {
    /// The first global IPv4 address (upstream uses the first one too).
    pub fn first_ipv4(&self) -> Option<Ipv4Addr> {
        self.addrs.iter().find_map(|a| match a.addr() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
    }

    /// The first global IPv6 address.
    pub fn first_ipv6(&self) -> Option<Ipv6Addr> {
        self.addrs.iter().find_map(|a| match a.addr() {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        })
    }
}

/// What the flags and the config ask for.
#[derive(Debug, Clone)]
pub struct Request {
    pub ifaces: Vec<String>,
    pub regexes: Vec<String>,
    /// `--public-ip`.
    pub public_ip: Option<Ipv4Addr>,
    /// `--public-ipv6`.
    pub public_ipv6: Option<Ipv6Addr>,
    pub can_reach: Option<IpAddr>,
    /// `EnableIPv4`: the interface needs a global IPv4 address.
    pub ipv4: bool,
    /// `EnableIPv6`: the interface needs a global IPv6 address.
    pub ipv6: bool,
}

impl Default for Request {
    /// No flags, IPv4 only (the default config).
    fn default() -> Self {
        Request {
            ifaces: Vec::new(),
            regexes: Vec::new(),
            public_ip: None,
            public_ipv6: None,
            can_reach: None,
            ipv4: true,
            ipv6: false,
        }
    }
}

impl Request {
    fn families(&self) -> &'static str {
        match (self.ipv4, self.ipv6) {
            (true, true) => "IPv4 and IPv6",
            (false, true) => "IPv6",
            _ => "IPv4",
        }
    }
}

/// The chosen external interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalInterface {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// The interface's own (first global) IPv4 address: the `flannel.<VNI>`
    /// `local`. Set when IPv4 is enabled.
    pub iface_addr: Option<Ipv4Addr>,
    /// The interface's own (first global) IPv6 address: the
    /// `flannel-v6.<VNI>` `local`. Set when IPv6 is enabled.
    pub iface_addr_v6: Option<Ipv6Addr>,
    /// The IPv4 address published in our lease: `--public-ip` or `iface_addr`.
    pub public_ip: Option<Ipv4Addr>,
    /// The IPv6 address published in our lease: `--public-ipv6` or `iface_addr_v6`.
    pub public_ipv6: Option<Ipv6Addr>,
    /// Its global addresses with prefixes, both families: the directly
    /// connected subnets (host-gw and the vxlan DirectRouting option).
    pub connected: Vec<IpNet>,
}

impl ExternalInterface {
    /// The interface's own address of `family` (the vxlan `local`).
    pub fn iface_addr_of(&self, family: IpFamily) -> Option<IpAddr> {
        match family {
            IpFamily::V4 => self.iface_addr.map(IpAddr::V4),
            IpFamily::V6 => self.iface_addr_v6.map(IpAddr::V6),
        }
    }

    /// The published address of `family`.
    pub fn public_ip_of(&self, family: IpFamily) -> Option<IpAddr> {
        match family {
            IpFamily::V4 => self.public_ip.map(IpAddr::V4),
            IpFamily::V6 => self.public_ipv6.map(IpAddr::V6),
        }
    }
}

fn finish(c: &Candidate, req: &Request) -> Result<ExternalInterface, String> {
    let v4 = if req.ipv4 {
        Some(
            c.first_ipv4()
                .ok_or_else(|| format!("interface {} has no global IPv4 address", c.name))?,
        )
    } else {
        None
    };
    let v6 = if req.ipv6 {
        Some(
            c.first_ipv6()
                .ok_or_else(|| format!("interface {} has no global IPv6 address", c.name))?,
        )
    } else {
        None
    };
    let wanted = |a: &IpNet| (a.addr().is_ipv4() && req.ipv4) || (a.addr().is_ipv6() && req.ipv6);
    Ok(ExternalInterface {
        index: c.index,
        name: c.name.clone(),
        mtu: c.mtu,
        iface_addr: v4,
        iface_addr_v6: v6,
        public_ip: v4.map(|a| req.public_ip.unwrap_or(a)),
        public_ipv6: v6.map(|a| req.public_ipv6.unwrap_or(a)),
        connected: c.addrs.iter().filter(|a| wanted(a)).cloned().collect(),
    })
}

/// Decides the external interface from a snapshot of the host's interfaces
/// and the output interfaces of its IPv4 and IPv6 default routes.
pub fn select(
    cands: &[Candidate],
    default_oif: Routing,
    req: &Request,
) -> Result<ExternalInterface, IfaceError> {
    let regexes = req
        .regexes
        .iter()
        .map(|p| {
            Regex::new(p).map_err(|source| IfaceError::BadRegex {
                pattern: p.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut problems = Vec::new();
    for spec in &req.ifaces {
        let found = match spec.parse::<IpAddr>() {
            Ok(ip) => cands
                .iter()
                .find(|c| c.addrs.iter().any(|a| a.addr() == ip)),
            Err(_) => cands.iter().find(|c| &c.name == spec),
        };
        match found {
            Some(c) => match finish(c, req) {
                Ok(e) => return Ok(e),
                Err(p) => problems.push(p),
            },
            None => problems.push(format!("no interface named or addressed {spec:?}")),
        }
    }
    for re in &regexes {
        // Addresses first (of the families in use), then names, as upstream.
        let by_addr = cands.iter().find(|c| {
            c.addrs.iter().any(|a| {
                ((a.addr().is_ipv4() && req.ipv4) || (a.addr().is_ipv6() && req.ipv6))
                    && re.is_match(&a.addr().to_string())
            })
        });
        let by_name = || cands.iter().find(|c| re.is_match(&c.name));
        match by_addr.or_else(by_name) {
            Some(c) => match finish(c, req) {
                Ok(e) => return Ok(e),
                Err(p) => problems.push(p),
            },
            None => problems.push(format!("nothing matches /{}/", re.as_str())),
        }
    }
    if !req.ifaces.is_empty() || !req.regexes.is_empty() {
        return Err(IfaceError::NoMatch {
            ifaces: req.ifaces.clone(),
            regexes: req.regexes.clone(),
            detail: problems.join("; "),
            families: req.families(),
        });
    }
    if let Some(target) = req.can_reach {
        return select_can_reach(cands, target, default_oif.reach, req);
    }
    // As upstream: the IPv4 default route's interface, or with IPv4
    // disabled, the IPv6 default route's.
    let (index, family) = if req.ipv4 {
        (default_oif.v4, "IPv4")
    } else {
        (default_oif.v6, "IPv6")
    };
    let index = index.ok_or(IfaceError::NoDefaultRoute { family })?;
    let c = cands.iter().find(|c| c.index == index).ok_or_else(|| {
        IfaceError::DefaultRouteUnusable {
            index,
            problem: "does not exist".into(),
        }
    })?;
    finish(c, req).map_err(|problem| IfaceError::DefaultRouteUnusable { index, problem })
}

/// `--iface-can-reach`: the interface of the kernel's route to `target`.
/// The route's source address is the interface address of its family (the
/// one the peers see), as upstream; the other family's is the interface's
/// first global one.
fn select_can_reach(
    cands: &[Candidate],
    target: IpAddr,
    reach: Option<RouteLookup>,
    req: &Request,
) -> Result<ExternalInterface, IfaceError> {
    let fail = |problem: String| IfaceError::CanReach { target, problem };
    let r = reach.ok_or_else(|| fail("the route to it was not read".into()))?;
    let c = cands.iter().find(|c| c.index == r.oif).ok_or_else(|| {
        fail(format!(
            "its route's interface (index {}) does not exist",
            r.oif
        ))
    })?;
    let mut c = c.clone();
    if let Some(src) = r.prefsrc {
        if let Some(i) = c.addrs.iter().position(|a| a.addr() == src) {
            let a = c.addrs.remove(i);
            c.addrs.insert(0, a);
        }
    }
    finish(&c, req).map_err(|p| fail(format!("its route leaves by {}, but {p}", c.name)))
}

/// Reads links, their addresses and the default routes (`ip -d link`,
/// `ip addr`, `ip route show default`, `ip -6 route show default`) and runs
/// [`select`]. Read-only.
pub fn lookup(nl: &mut Netlink, req: &Request) -> Result<ExternalInterface, IfaceError> {
    let mut cands = Vec::new();
    for link in nl.list_links()? {
        let addrs = nl.list_addresses(link.index)?;
        cands.push(Candidate {
            index: link.index,
            name: link.name,
            mtu: link.mtu,
            addrs,
        });
    }
    let mut routing = default_route_oifs(&nl.list_routes()?);
    if let Some(target) = req.can_reach {
        if req.ifaces.is_empty() && req.regexes.is_empty() {
            routing.reach = Some(nl.get_route(target).map_err(|e| IfaceError::CanReach {
                target,
                problem: format!("no route to it ({e})"),
            })?);
        }
    }
    select(&cands, routing, req)
}

/// What the kernel's routes tell interface selection: the output
/// interfaces of the default routes, per family, and the route to the
/// `--iface-can-reach` address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Routing {
    /// `ip route show default`.
    pub v4: Option<u32>,
    /// `ip -6 route show default`.
    pub v6: Option<u32>,
    /// `ip route get <--iface-can-reach>`, read only when neither `--iface`
    /// nor `--iface-regex` is given (they come first).
    pub reach: Option<RouteLookup>,
}

impl Routing {
    /// Only an IPv4 default route through `oif`.
    pub fn v4(oif: u32) -> Self {
        Routing {
            v4: Some(oif),
            ..Routing::default()
        }
    }
}

/// The output interface of the IPv4 default route, if any.
pub fn default_route_oif(routes: &[flannel_core::datapath::Route]) -> Option<u32> {
    default_route_oifs(routes).v4
}

/// The output interfaces of the IPv4 and IPv6 default routes.
pub fn default_route_oifs(routes: &[flannel_core::datapath::Route]) -> Routing {
    // Several default routes (different metrics) are possible; the kernel
    // dumps them in preference order, so the first one is the one in use.
    let v4: IpNet = "0.0.0.0/0".parse().expect("literal");
    let v6: IpNet = "::/0".parse().expect("literal");
    Routing {
        v4: routes.iter().find(|r| r.dst == v4).map(|r| r.oif),
        v6: routes.iter().find(|r| r.dst == v6).map(|r| r.oif),
        reach: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_core::datapath::Route;

    fn c(index: u32, name: &str, mtu: u32, addrs: &[&str]) -> Candidate {
        Candidate {
            index,
            name: name.into(),
            mtu,
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn host() -> Vec<Candidate> {
        vec![
            c(1, "lo", 65536, &["127.0.0.1/8"]),
            c(
                2,
                "ens3",
                1500,
                &["fd00::14/64", "172.16.1.14/24", "172.16.1.99/24"],
            ),
            c(3, "eth1", 9000, &["10.9.0.5/16"]),
            c(4, "v6only", 1500, &["fd00:1::1/64"]),
        ]
    }

    fn req(ifaces: &[&str], regexes: &[&str]) -> Request {
        Request {
            ifaces: ifaces.iter().map(|s| s.to_string()).collect(),
            regexes: regexes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn default_route_interface_when_no_flags() {
        let e = select(&host(), Routing::v4(2), &req(&[], &[])).unwrap();
        assert_eq!(e.name, "ens3");
        assert_eq!(e.mtu, 1500);
        // First global IPv4, skipping the IPv6 address listed before it.
        assert_eq!(e.iface_addr, Some(Ipv4Addr::new(172, 16, 1, 14)));
        assert_eq!(e.public_ip, e.iface_addr);
        assert_eq!(
            e.connected,
            vec![
                "172.16.1.14/24".parse::<IpNet>().unwrap(),
                "172.16.1.99/24".parse().unwrap()
            ]
        );
    }

    #[test]
    fn no_default_route_is_an_error_naming_the_flag() {
        let err = select(&host(), Routing::default(), &req(&[], &[])).unwrap_err();
        assert!(err.to_string().contains("--iface"), "{err}");
    }

    #[test]
    fn iface_by_name_and_by_address_in_order() {
        let e = select(&host(), Routing::v4(2), &req(&["eth1"], &[])).unwrap();
        assert_eq!((e.index, e.mtu), (3, 9000));
        let e = select(&host(), Routing::v4(2), &req(&["172.16.1.99"], &[])).unwrap();
        assert_eq!(e.name, "ens3");
        // The matched interface's first address is used, as upstream.
        assert_eq!(e.iface_addr, Some(Ipv4Addr::new(172, 16, 1, 14)));
        // Missing ones are skipped, the first existing one wins.
        let e = select(
            &host(),
            Routing::v4(2),
            &req(&["nope", "eth1", "ens3"], &[]),
        )
        .unwrap();
        assert_eq!(e.name, "eth1");
    }

    #[test]
    fn iface_without_ipv4_is_skipped_then_error() {
        let e = select(&host(), Routing::v4(2), &req(&["v6only", "ens3"], &[])).unwrap();
        assert_eq!(e.name, "ens3");
        let err = select(&host(), Routing::v4(2), &req(&["v6only"], &[])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("v6only has no global IPv4"), "{msg}");
    }

    #[test]
    fn given_flags_never_fall_back_to_default_route() {
        let err = select(&host(), Routing::v4(2), &req(&["nope"], &[])).unwrap_err();
        assert!(matches!(err, IfaceError::NoMatch { .. }), "{err}");
    }

    #[test]
    fn regex_matches_addresses_before_names() {
        let e = select(&host(), Routing::default(), &req(&[], &["^10\\.9\\."])).unwrap();
        assert_eq!(e.name, "eth1");
        let e = select(&host(), Routing::default(), &req(&[], &["^eth"])).unwrap();
        assert_eq!(e.name, "eth1");
        // An address match on a later interface beats a name match on an earlier one.
        let e = select(&host(), Routing::default(), &req(&[], &["^10|ens"])).unwrap();
        assert_eq!(e.name, "eth1");
        // Each regex is tried in turn: the first that matches anything wins.
        let e = select(
            &host(),
            Routing::default(),
            &req(&[], &["^nothing$", "ens"]),
        )
        .unwrap();
        assert_eq!(e.name, "ens3");
    }

    #[test]
    fn iface_is_tried_before_regex() {
        let e = select(&host(), Routing::default(), &req(&["nope"], &["^ens"])).unwrap();
        assert_eq!(e.name, "ens3");
        let e = select(&host(), Routing::default(), &req(&["eth1"], &["^ens"])).unwrap();
        assert_eq!(e.name, "eth1");
    }

    #[test]
    fn bad_regex_names_the_flag() {
        let err = select(&host(), Routing::default(), &req(&[], &["(unclosed"])).unwrap_err();
        assert!(err.to_string().contains("--iface-regex"), "{err}");
    }

    #[test]
    fn public_ip_overrides_the_published_address_only() {
        let mut r = req(&["ens3"], &[]);
        r.public_ip = Some(Ipv4Addr::new(203, 0, 113, 9));
        let e = select(&host(), Routing::default(), &r).unwrap();
        assert_eq!(e.iface_addr, Some(Ipv4Addr::new(172, 16, 1, 14)));
        assert_eq!(e.public_ip, Some(Ipv4Addr::new(203, 0, 113, 9)));
    }

    #[test]
    fn default_route_oif_picks_the_ipv4_default() {
        let r = |dst: &str, oif| Route {
            dst: dst.parse().unwrap(),
            gateway: None,
            oif,
            onlink: false,
        };
        assert_eq!(default_route_oif(&[r("10.0.0.0/8", 3), r("::/0", 4)]), None);
        assert_eq!(
            default_route_oif(&[r("10.0.0.0/8", 3), r("0.0.0.0/0", 2), r("0.0.0.0/0", 5)]),
            Some(2)
        );
    }

    fn req6(ifaces: &[&str], v4: bool) -> Request {
        Request {
            ipv4: v4,
            ipv6: true,
            ..req(ifaces, &[])
        }
    }

    #[test]
    fn ipv6_only_uses_the_ipv6_default_route() {
        let routes = [
            Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gateway: None,
                oif: 3,
                onlink: false,
            },
            Route {
                dst: "::/0".parse().unwrap(),
                gateway: None,
                oif: 4,
                onlink: false,
            },
        ];
        let def = default_route_oifs(&routes);
        assert_eq!(
            def,
            Routing {
                v4: Some(3),
                v6: Some(4),
                reach: None,
            }
        );
        let e = select(&host(), def, &req6(&[], false)).unwrap();
        assert_eq!(e.name, "v6only");
        assert_eq!(e.iface_addr, None);
        assert_eq!(e.public_ip, None);
        assert_eq!(e.iface_addr_v6, Some("fd00:1::1".parse().unwrap()));
        assert_eq!(e.public_ipv6, e.iface_addr_v6);
        assert_eq!(
            e.iface_addr_of(IpFamily::V6),
            Some("fd00:1::1".parse().unwrap())
        );
        assert_eq!(e.connected, vec!["fd00:1::1/64".parse::<IpNet>().unwrap()]);
        // No IPv6 default route: the error names the family and the flag.
        let err = select(&host(), Routing::v4(3), &req6(&[], false)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("IPv6 default route") && msg.contains("--iface"),
            "{msg}"
        );
    }

    #[test]
    fn dual_stack_needs_both_families_on_the_interface() {
        // The IPv4 default route's interface, with both addresses.
        let e = select(&host(), Routing::v4(2), &req6(&[], true)).unwrap();
        assert_eq!(e.name, "ens3");
        assert_eq!(e.iface_addr, Some(Ipv4Addr::new(172, 16, 1, 14)));
        assert_eq!(e.iface_addr_v6, Some("fd00::14".parse().unwrap()));
        assert_eq!(
            e.connected.len(),
            3,
            "both families' subnets: {:?}",
            e.connected
        );
        // eth1 has no IPv6 address: skipped, with the reason in the error.
        let err = select(&host(), Routing::v4(2), &req6(&["eth1"], true)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("eth1 has no global IPv6 address"), "{msg}");
        assert!(msg.contains("IPv4 and IPv6"), "{msg}");
        let err = select(&host(), Routing::v4(3), &req6(&[], true)).unwrap_err();
        assert!(
            matches!(err, IfaceError::DefaultRouteUnusable { index: 3, .. }),
            "{err}"
        );
        // --iface by IPv6 address.
        let e = select(&host(), Routing::default(), &req6(&["fd00::14"], true)).unwrap();
        assert_eq!(e.name, "ens3");
    }

    #[test]
    fn public_ipv6_overrides_the_published_ipv6_address_only() {
        let mut r = req6(&["ens3"], true);
        r.public_ipv6 = Some("2001:db8::9".parse().unwrap());
        let e = select(&host(), Routing::default(), &r).unwrap();
        assert_eq!(e.iface_addr_v6, Some("fd00::14".parse().unwrap()));
        assert_eq!(e.public_ipv6, Some("2001:db8::9".parse().unwrap()));
        assert_eq!(e.public_ip, e.iface_addr, "IPv4 unaffected");
        // Without IPv6 enabled --public-ipv6 is not published.
        let mut r = req(&["ens3"], &[]);
        r.public_ipv6 = Some("2001:db8::9".parse().unwrap());
        let e = select(&host(), Routing::default(), &r).unwrap();
        assert_eq!(e.public_ipv6, None);
        assert!(e.connected.iter().all(|a| a.addr().is_ipv4()));
    }

    fn reach(oif: u32, src: &str) -> Routing {
        Routing {
            v4: Some(2),
            reach: Some(RouteLookup {
                oif,
                gateway: None,
                prefsrc: Some(src.parse().unwrap()),
            }),
            ..Routing::default()
        }
    }

    #[test]
    fn can_reach_takes_the_routes_interface_and_source_address() {
        let r = Request {
            can_reach: Some("10.9.8.7".parse().unwrap()),
            ..Default::default()
        };
        // Not the default route's ens3: the route to the target leaves by eth1.
        let e = select(&host(), reach(3, "10.9.0.5"), &r).unwrap();
        assert_eq!(e.name, "eth1");
        assert_eq!(e.public_ip, Some(Ipv4Addr::new(10, 9, 0, 5)));
        // The route's source wins over the interface's first address.
        let e = select(&host(), reach(2, "172.16.1.99"), &r).unwrap();
        assert_eq!(e.name, "ens3");
        assert_eq!(e.iface_addr, Some(Ipv4Addr::new(172, 16, 1, 99)));
        assert_eq!(e.connected.len(), 2);
        // --iface comes first.
        let r2 = Request {
            ifaces: vec!["eth1".into()],
            ..r.clone()
        };
        assert_eq!(
            select(&host(), reach(2, "172.16.1.99"), &r2).unwrap().name,
            "eth1"
        );
        // A route through an interface without the family's address: named.
        let err = select(&host(), reach(4, "fd00:1::1"), &r).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("--iface-can-reach 10.9.8.7")
                && msg.contains("leaves by v6only")
                && msg.contains("no global IPv4 address"),
            "{msg}"
        );
        // No route read (the kernel had none): an error, never the default route.
        let err = select(&host(), Routing::v4(2), &r).unwrap_err();
        assert!(matches!(err, IfaceError::CanReach { .. }), "{err}");
    }
}
