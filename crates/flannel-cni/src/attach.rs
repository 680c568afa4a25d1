//! The kernel side of an attachment, through flannel-netlink: the bridge with
//! the gateway address, the veth pair whose pod end is created directly in the
//! pod namespace, the pod's addresses and routes, and the reverse.

use std::net::IpAddr;

use flannel_core::datapath::Route;
use flannel_core::mac::MacAddr;
use flannel_netlink::netns::{NetNs, NetNsError};
use flannel_netlink::{Link, Netlink};
use ipnet::IpNet;

use crate::config::BridgeConf;
use crate::spec::{code, CniError, RouteSpec};

/// Errors of the kernel side, each with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{op}: {source}")]
    Kernel {
        op: String,
        #[source]
        source: flannel_netlink::Error,
    },
    #[error("{0}")]
    Netns(#[from] NetNsError),
    #[error("interface {ifname:?} already exists in {netns}; run DEL for this container first or choose another CNI_IFNAME")]
    InterfaceExists { ifname: String, netns: String },
    #[error("{name:?} exists but is a {kind} link, not a bridge; delete it (`ip link del {name}`) or set delegate.bridge")]
    NotABridge { name: String, kind: String },
    #[error("bridge {bridge:?} already has address {existing}, not {wanted}: the node's subnet changed; delete the bridge (`ip link del {bridge}`) once no pod uses it")]
    BridgeAddressConflict {
        bridge: String,
        existing: IpNet,
        wanted: IpNet,
    },
    #[error("the host veth name {name} is taken by another link (a hash collision with another attachment); retry with another container ID")]
    HostNameTaken { name: String },
}

impl From<AttachError> for CniError {
    fn from(e: AttachError) -> CniError {
        let c = match e {
            AttachError::InterfaceExists { .. } => code::INTERFACE_EXISTS,
            _ => code::KERNEL_FAILURE,
        };
        CniError::new(c, e.to_string())
    }
}

/// Wraps a netlink result with the operation, for errors like
/// "add veth vethab12cd34 to cni0: ...".
pub trait Ctx<T> {
    fn ctx(self, op: impl FnOnce() -> String) -> Result<T, AttachError>;
}

impl<T> Ctx<T> for flannel_netlink::Result<T> {
    fn ctx(self, op: impl FnOnce() -> String) -> Result<T, AttachError> {
        self.map_err(|source| AttachError::Kernel { op: op(), source })
    }
}

/// The host end's name: `veth` + 8 hex digits of a hash of container ID and
/// interface name, so DEL finds it again without state even when the pod's
/// namespace is gone (the reference plugin picks a random name instead).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    // FNV-1a, 32 bit: tiny, stable across releases and architectures.
    let mut h: u32 = 0x811c_9dc5;
    for b in container_id.bytes().chain([0u8]).chain(ifname.bytes()) {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("veth{h:08x}")
}

/// An address the pod gets: the address with the subnet's prefix, and the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAddress {
    pub address: IpNet,
    pub gateway: IpAddr,
}

/// The routes the pod gets, in result order: the IPAM routes (their `gw`
/// defaults to the gateway of the same family when the kernel route is
/// written), then a default route per family when `isDefaultGateway`.
pub fn pod_routes(conf: &BridgeConf, addrs: &[PodAddress]) -> Vec<RouteSpec> {
    let mut out = conf.ipam.routes.clone();
    if conf.is_default_gateway {
        for a in addrs {
            let default: IpNet = match a.gateway {
                IpAddr::V4(_) => "0.0.0.0/0".parse().expect("literal"),
                IpAddr::V6(_) => "::/0".parse().expect("literal"),
            };
            if !out.iter().any(|r| r.dst == default) {
                out.push(RouteSpec {
                    dst: default,
                    gw: Some(a.gateway),
                });
            }
        }
    }
    out
}

/// The kernel route for a result route: `gw` or the family's gateway.
fn kernel_route(r: &RouteSpec, addrs: &[PodAddress], oif: u32) -> Route {
    let gateway = r.gw.or_else(|| {
        addrs
            .iter()
            .find(|a| a.gateway.is_ipv4() == r.dst.addr().is_ipv4())
            .map(|a| a.gateway)
    });
    Route {
        dst: r.dst,
        gateway,
        oif,
        onlink: false,
    }
}

/// Ensures the bridge exists, is up and, when it is the gateway, holds each
/// gateway address (`ip link add cni0 type bridge mtu M; ip addr add GW/LEN dev cni0; ip link set cni0 up`).
pub fn ensure_bridge(
    nl: &mut Netlink,
    conf: &BridgeConf,
    addrs: &[PodAddress],
) -> Result<Link, AttachError> {
    let (mut br, created) = match nl
        .link_by_name(&conf.bridge)
        .ctx(|| format!("look up bridge {}", conf.bridge))?
    {
        Some(l) => (l, false),
        None => (
            nl.add_bridge(&conf.bridge, conf.mtu)
                .ctx(|| format!("add bridge {}", conf.bridge))?,
            true,
        ),
    };
    if br.kind.as_deref() != Some("bridge") {
        return Err(AttachError::NotABridge {
            name: conf.bridge.clone(),
            kind: br.kind.clone().unwrap_or_else(|| "plain".into()),
        });
    }
    // A bridge without an address of its own takes the lowest MAC among its
    // ports, so the pods' gateway MAC would change as pods come and go (and
    // their ARP caches go stale). Pin one, as `ip link set cni0 address MAC`.
    if created || br.mac.is_none_or(|m| m == MacAddr::default()) {
        let mac = random_mac().map_err(|source| AttachError::Kernel {
            op: "getrandom for the bridge MAC".into(),
            source: flannel_netlink::Error::Kernel {
                op: "getrandom".into(),
                source,
            },
        })?;
        nl.set_link_address(br.index, mac)
            .ctx(|| format!("set {} address {mac}", conf.bridge))?;
        br.mac = Some(mac);
    }
    if conf.is_gateway {
        let have = nl
            .list_addresses(br.index)
            .ctx(|| format!("list addresses of {}", conf.bridge))?;
        for a in addrs {
            let wanted =
                IpNet::new(a.gateway, a.address.prefix_len()).expect("prefix from a valid net");
            if have.contains(&wanted) {
                continue;
            }
            // As the bridge plugin: one IPv4 address; IPv6 ones may coexist unless they overlap.
            if let Some(existing) = have.iter().find(|h| {
                h.addr().is_ipv4() == wanted.addr().is_ipv4()
                    && (wanted.addr().is_ipv4()
                        || h.contains(&wanted.addr())
                        || wanted.contains(&h.addr()))
            }) {
                return Err(AttachError::BridgeAddressConflict {
                    bridge: conf.bridge.clone(),
                    existing: *existing,
                    wanted,
                });
            }
            // nodad for IPv6: a tentative gateway would not answer the pods' neighbour solicitations.
            nl.add_address_nodad(br.index, wanted)
                .ctx(|| format!("add {wanted} to {}", conf.bridge))?;
        }
    }
    if !br.up {
        nl.set_link_up(br.index)
            .ctx(|| format!("set {} up", conf.bridge))?;
    }
    Ok(br)
}

/// A random locally administered unicast MAC from the kernel's getrandom(2).
fn random_mac() -> std::io::Result<MacAddr> {
    let mut b = [0u8; 6];
    // SAFETY: the buffer is valid for writes of its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    b[0] = (b[0] & 0xfe) | 0x02;
    Ok(MacAddr(b))
}

/// Opens a netlink socket inside the pod namespace
/// ([`Netlink::open_in`]). The socket stays bound to that
/// namespace, so the rest of the call drives the pod from this thread.
pub fn open_in(pod: &NetNs) -> Result<Netlink, AttachError> {
    Netlink::open_in(pod).ctx(|| format!("open netlink in {}", pod.name))
}

/// The pod namespace's netlink socket, opened on a thread of its own that
/// entered the namespace ([`NetNs::spawn_in`]) while the caller goes on with
/// the node's side; [`PodSocket::get`] waits for it the first time.
pub struct PodSocket<'scope, 'env> {
    pod: &'env NetNs,
    opening: Option<OpeningSocket<'scope>>,
    nl: Option<Netlink>,
}

type OpeningSocket<'scope> =
    std::thread::ScopedJoinHandle<'scope, Result<flannel_netlink::Result<Netlink>, NetNsError>>;

impl<'scope, 'env> PodSocket<'scope, 'env> {
    /// Starts opening the socket on a new thread of `scope`.
    pub fn open(pod: &'env NetNs, scope: &'scope std::thread::Scope<'scope, 'env>) -> Self {
        PodSocket {
            pod,
            opening: Some(pod.spawn_in(scope, Netlink::open)),
            nl: None,
        }
    }

    /// The namespace the socket is bound to.
    pub fn netns(&self) -> &'env NetNs {
        self.pod
    }

    /// The socket, once it is open.
    pub fn get(&mut self) -> Result<&mut Netlink, AttachError> {
        let pod = self.pod;
        if let Some(h) = self.opening.take() {
            let entered = h.join().unwrap_or_else(|_| {
                Err(NetNsError::Panicked {
                    name: pod.name.clone(),
                })
            });
            let nl = entered
                .map_err(|e| flannel_netlink::Error::Kernel {
                    op: format!("enter {}", pod.name),
                    source: std::io::Error::other(e),
                })
                .and_then(|r| r)
                .ctx(|| format!("open netlink in {}", pod.name))?;
            self.nl = Some(nl);
        }
        self.nl.as_mut().ok_or_else(|| AttachError::Kernel {
            op: format!("open netlink in {}", pod.name),
            source: flannel_netlink::Error::Kernel {
                op: "an earlier attempt failed".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotConnected),
            },
        })
    }
}

/// A veth pair as ADD made it: the host end (enslaved and up) and the pod
/// end's index and MAC in the pod's namespace.
#[derive(Debug, Clone)]
pub struct AttachedVeth {
    pub host: Link,
    pub pod_index: u32,
    pub pod_mac: MacAddr,
}

/// `ip link add HOST type veth peer name IFNAME netns POD mtu M` with the
/// host end enslaved to the bridge and up in the same request
/// ([`Netlink::add_veth_attached`]): the pod end is born in the pod
/// namespace, so it never appears on the node. The pod end's MAC is chosen
/// here (as the kernel would: random, locally administered) and its index
/// comes back with the host end, so the pod's namespace is not asked.
///
/// What a taken name means is worked out only on failure, to keep the
/// common path at one request: the interface exists in the pod already, or
/// the host name is taken.
pub fn add_veth(
    nl: &mut Netlink,
    conf: &BridgeConf,
    bridge: &Link,
    host: &str,
    ifname: &str,
    pod_nl: &mut PodSocket<'_, '_>,
) -> Result<AttachedVeth, AttachError> {
    let pod = pod_nl.netns();
    let pod_mac = random_mac().map_err(|source| AttachError::Kernel {
        op: "getrandom for the pod MAC".into(),
        source: flannel_netlink::Error::Kernel {
            op: "getrandom".into(),
            source,
        },
    })?;
    let op = || {
        format!(
            "add veth {host} on {} with peer {ifname} in {}",
            conf.bridge, pod.name
        )
    };
    match nl.add_veth_attached(host, ifname, pod.fd(), conf.mtu, bridge.index, pod_mac) {
        Ok(v) => {
            let pod_index = v.peer_index.ok_or_else(|| AttachError::Kernel {
                op: op(),
                source: flannel_netlink::Error::Protocol {
                    op: format!("ip link show {host}"),
                    detail: "the kernel did not report the veth peer's index (IFLA_LINK)".into(),
                },
            })?;
            Ok(AttachedVeth {
                host: v.host,
                pod_index,
                pod_mac,
            })
        }
        Err(e) if e.is_exists() => {
            let in_pod = pod_nl
                .get()?
                .link_by_name(ifname)
                .ctx(|| format!("look up {ifname} in {}", pod.name))?;
            if in_pod.is_some() {
                return Err(AttachError::InterfaceExists {
                    ifname: ifname.into(),
                    netns: pod.name.clone(),
                });
            }
            match nl.link_by_name(host) {
                Ok(Some(_)) => Err(AttachError::HostNameTaken { name: host.into() }),
                _ => Err(e).ctx(op),
            }
        }
        Err(e) => Err(e).ctx(op),
    }
}

/// `bridge link set dev HOST hairpin on` when `hairpinMode` asks for it (a
/// new bridge port starts with hairpin off). The flag belongs to the bridge
/// port, so the host end must be enslaved already.
pub fn set_hairpin(nl: &mut Netlink, conf: &BridgeConf, host: &Link) -> Result<(), AttachError> {
    if !conf.hairpin {
        return Ok(());
    }
    nl.set_hairpin(host.index, true)
        .ctx(|| format!("set hairpin on {}", host.name))
}

/// Inside the pod: `ip addr add ADDR dev IFNAME`, `ip link set IFNAME up` and
/// `ip route replace DST via GW dev IFNAME` for each route.
pub fn configure_pod(
    pod_nl: &mut PodSocket<'_, '_>,
    veth: &AttachedVeth,
    ifname: &str,
    addrs: &[PodAddress],
    routes: &[RouteSpec],
) -> Result<(), AttachError> {
    let netns = &pod_nl.netns().name;
    let nl = pod_nl.get()?;
    let index = veth.pod_index;
    for a in addrs {
        // IPv6 without DAD: IPAM made the address unique, and a tentative
        // address could not be bound by the pod's first process.
        nl.add_address_nodad(index, a.address)
            .ctx(|| format!("add {} to {ifname} in {netns}", a.address))?;
    }
    // Routes via the gateway need the link up (and its connected route) first.
    nl.set_link_up(index)
        .ctx(|| format!("set {ifname} up in {netns}"))?;
    for r in routes {
        let kr = kernel_route(r, addrs, index);
        nl.replace_route(&kr)
            .ctx(|| format!("add route {} via {:?} in {netns}", r.dst, kr.gateway))?;
    }
    Ok(())
}

/// Deletes `ifname` in the pod namespace (its veth peer goes with it);
/// absent is success.
pub fn del_pod_link(pod_nl: &mut Netlink, pod: &NetNs, ifname: &str) -> Result<(), AttachError> {
    let nl = pod_nl;
    if let Some(l) = nl
        .link_by_name(ifname)
        .ctx(|| format!("look up {ifname} in {}", pod.name))?
    {
        nl.del_link(l.index)
            .ctx(|| format!("delete {ifname} in {}", pod.name))?;
    }
    Ok(())
}

/// Deletes the host end by name in the calling thread's namespace; absent is success.
pub fn del_host_link(nl: &mut Netlink, host: &str) -> Result<(), AttachError> {
    if let Some(l) = nl.link_by_name(host).ctx(|| format!("look up {host}"))? {
        // Only our own veths: never delete another kind of link that happens to match.
        if l.kind.as_deref() == Some("veth") {
            nl.del_link(l.index).ctx(|| format!("delete {host}"))?;
        }
    }
    Ok(())
}

/// What CHECK verifies inside the pod: the interface, its addresses and routes.
/// Returns every mismatch found (empty = all good).
pub fn check_pod(
    pod_nl: &mut Netlink,
    pod: &NetNs,
    ifname: &str,
    addrs: &[IpNet],
    routes: &[Route],
) -> Result<Vec<String>, AttachError> {
    let nl = pod_nl;
    let mut problems = Vec::new();
    let Some(link) = nl
        .link_by_name(ifname)
        .ctx(|| format!("look up {ifname} in {}", pod.name))?
    else {
        problems.push(format!("interface {ifname} is missing in {}", pod.name));
        return Ok(problems);
    };
    if !link.up {
        problems.push(format!("interface {ifname} is down"));
    }
    let have = nl
        .list_addresses(link.index)
        .ctx(|| format!("list addresses of {ifname}"))?;
    for a in addrs {
        if !have.contains(a) {
            problems.push(format!("address {a} is missing on {ifname} (has {have:?})"));
        }
    }
    let have = nl
        .list_routes()
        .ctx(|| format!("list routes in {}", pod.name))?;
    for r in routes {
        let r = Route {
            oif: link.index,
            ..r.clone()
        };
        if !have
            .iter()
            .any(|h| h.dst == r.dst && h.gateway == r.gateway && h.oif == r.oif)
        {
            problems.push(format!(
                "route {} via {:?} dev {ifname} is missing",
                r.dst, r.gateway
            ));
        }
    }
    Ok(problems)
}

/// The kernel routes CHECK expects for a result's routes.
pub fn expected_routes(routes: &[RouteSpec], addrs: &[PodAddress]) -> Vec<Route> {
    routes.iter().map(|r| kernel_route(r, addrs, 0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_are_stable_short_and_distinct() {
        let a = host_veth_name("0123456789abcdef", "eth0");
        assert_eq!(a, host_veth_name("0123456789abcdef", "eth0"));
        assert!(a.len() <= 15 && a.starts_with("veth"), "{a}");
        assert_ne!(a, host_veth_name("0123456789abcdef", "eth1"));
        assert_ne!(a, host_veth_name("0123456789abcdee", "eth0"));
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(host_veth_name("ab", "c"), host_veth_name("a", "bc"));
        let names: std::collections::HashSet<_> = (0..10000)
            .map(|i| host_veth_name(&format!("c{i}"), "eth0"))
            .collect();
        assert_eq!(names.len(), 10000);
    }

    #[test]
    fn routes_default_gateway() {
        let v = serde_json::json!({"name":"n","isDefaultGateway":true,
            "ipam":{"ranges":[[{"subnet":"10.244.1.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}]}});
        let conf = BridgeConf::from_rendered(&v).unwrap();
        let addrs = [PodAddress {
            address: "10.244.1.5/24".parse().unwrap(),
            gateway: "10.244.1.1".parse().unwrap(),
        }];
        let r = pod_routes(&conf, &addrs);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].gw, None);
        assert_eq!(r[1].dst.to_string(), "0.0.0.0/0");
        let k = expected_routes(&r, &addrs);
        assert_eq!(k[0].gateway, Some("10.244.1.1".parse().unwrap()));
        assert!(conf.is_gateway);
    }
}
