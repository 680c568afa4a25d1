//! The thin kernel layer: synchronous rtnetlink and network namespaces.
//!
//! Synchronous on purpose: the CNI plugin runs once per pod and must not pay
//! for an async runtime, and the daemon drives the kernel from one dedicated
//! OS thread. A [`Netlink`] handle is bound to the namespace it was opened in
//! and stays there: open it inside the target namespace (see
//! [`netns::NetNs::run`]) and keep it.
//!
//! Every write has replace semantics (`NLM_F_CREATE|NLM_F_REPLACE`) or
//! treats "already there"/"already gone" as success, so callers can apply a
//! desired state again and again.

pub mod netns;

use std::net::IpAddr;
use std::os::fd::BorrowedFd;

use flannel_core::datapath::{FdbEntry, Neighbour, Route};
use flannel_core::mac::MacAddr;
use ipnet::IpNet;

/// Errors of the kernel layer, each with the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: {source}")]
    Kernel {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: link {name:?} not found")]
    LinkNotFound { op: String, name: String },
    #[error("{op}: unexpected netlink reply: {detail}")]
    Protocol { op: String, detail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A network interface as `ip -d link show` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Option<MacAddr>,
    /// `IFLA_INFO_KIND`: "vxlan", "bridge", "veth", "tun", ...
    pub kind: Option<String>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Index of the bridge it is enslaved to.
    pub master: Option<u32>,
    /// Set for vxlan devices.
    pub vxlan: Option<VxlanInfo>,
}

/// The vxlan attributes of a link (`ip -d link show` "vxlan id .. local .. dev .. dstport ..").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanInfo {
    pub vni: u32,
    pub local: Option<IpAddr>,
    /// Underlay device index (`dev`).
    pub link: Option<u32>,
    pub port: u16,
    pub learning: bool,
    pub gbp: bool,
}

/// What to create: `ip link add NAME type vxlan id VNI local LOCAL dev UNDERLAY dstport PORT nolearning`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanDevice {
    pub name: String,
    pub vni: u32,
    pub local: IpAddr,
    pub underlay_index: u32,
    /// 0 = kernel default (8472).
    pub port: u16,
    pub learning: bool,
    pub gbp: bool,
    pub mtu: u32,
    /// Fixed MAC so the VtepMAC survives restarts.
    pub mac: Option<MacAddr>,
}

/// A change the kernel announced on one of the multicast groups we watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    Link {
        index: u32,
        name: String,
        deleted: bool,
    },
    Route {
        dst: IpNet,
        deleted: bool,
    },
    Neighbour {
        ifindex: u32,
        ip: IpAddr,
        deleted: bool,
    },
    Fdb {
        ifindex: u32,
        mac: MacAddr,
        deleted: bool,
    },
    Address {
        index: u32,
        deleted: bool,
    },
}

/// A synchronous rtnetlink socket, bound to the namespace it was opened in.
pub struct Netlink {
    _priv: (),
}

impl Netlink {
    /// Opens a NETLINK_ROUTE socket in the calling thread's namespace.
    pub fn open() -> Result<Self> {
        todo!()
    }

    // ---- links --------------------------------------------------------
    /// `ip link show NAME`; `Ok(None)` when absent.
    pub fn link_by_name(&mut self, _name: &str) -> Result<Option<Link>> {
        todo!()
    }
    /// `ip link show` by index.
    pub fn link_by_index(&mut self, _index: u32) -> Result<Option<Link>> {
        todo!()
    }
    /// `ip -d link show`.
    pub fn list_links(&mut self) -> Result<Vec<Link>> {
        todo!()
    }
    /// `ip link add NAME type vxlan ...`; returns the new link.
    pub fn add_vxlan(&mut self, _dev: &VxlanDevice) -> Result<Link> {
        todo!()
    }
    /// `ip link add NAME type bridge` with the MTU; returns the link (existing one if present).
    pub fn add_bridge(&mut self, _name: &str, _mtu: Option<u32>) -> Result<Link> {
        todo!()
    }
    /// `ip link add HOST type veth peer name PEER netns FD`: the peer is
    /// created directly in the namespace `peer_netns`. Returns the host end.
    pub fn add_veth(
        &mut self,
        _host: &str,
        _peer: &str,
        _peer_netns: BorrowedFd<'_>,
        _mtu: Option<u32>,
    ) -> Result<Link> {
        todo!()
    }
    /// `ip link set dev INDEX up`.
    pub fn set_link_up(&mut self, _index: u32) -> Result<()> {
        todo!()
    }
    /// `ip link set dev INDEX down`.
    pub fn set_link_down(&mut self, _index: u32) -> Result<()> {
        todo!()
    }
    /// `ip link set dev INDEX mtu MTU`.
    pub fn set_link_mtu(&mut self, _index: u32, _mtu: u32) -> Result<()> {
        todo!()
    }
    /// `ip link set dev INDEX address MAC`.
    pub fn set_link_address(&mut self, _index: u32, _mac: MacAddr) -> Result<()> {
        todo!()
    }
    /// `ip link set dev INDEX master MASTER`.
    pub fn set_link_master(&mut self, _index: u32, _master: u32) -> Result<()> {
        todo!()
    }
    /// `ip link set dev INDEX netns FD`.
    pub fn set_link_netns(&mut self, _index: u32, _netns: BorrowedFd<'_>) -> Result<()> {
        todo!()
    }
    /// `bridge link set dev INDEX hairpin on|off`.
    pub fn set_hairpin(&mut self, _index: u32, _on: bool) -> Result<()> {
        todo!()
    }
    /// `ip link del dev INDEX`; absent is success.
    pub fn del_link(&mut self, _index: u32) -> Result<()> {
        todo!()
    }

    // ---- addresses ----------------------------------------------------
    /// `ip addr replace ADDR dev INDEX`.
    pub fn add_address(&mut self, _index: u32, _addr: IpNet) -> Result<()> {
        todo!()
    }
    /// `ip addr del ADDR dev INDEX`; absent is success.
    pub fn del_address(&mut self, _index: u32, _addr: IpNet) -> Result<()> {
        todo!()
    }
    /// `ip addr show dev INDEX` (global scope and all families).
    pub fn list_addresses(&mut self, _index: u32) -> Result<Vec<IpNet>> {
        todo!()
    }

    // ---- routes (main table) ------------------------------------------
    /// `ip route replace ...`.
    pub fn replace_route(&mut self, _route: &Route) -> Result<()> {
        todo!()
    }
    /// `ip route del ...`; absent is success.
    pub fn del_route(&mut self, _route: &Route) -> Result<()> {
        todo!()
    }
    /// `ip route show table main` for unicast routes with an output device.
    pub fn list_routes(&mut self) -> Result<Vec<Route>> {
        todo!()
    }

    // ---- neighbours ---------------------------------------------------
    /// `ip neigh replace IP lladdr MAC dev IFINDEX nud permanent`.
    pub fn replace_neighbour(&mut self, _n: &Neighbour) -> Result<()> {
        todo!()
    }
    /// `ip neigh del IP dev IFINDEX`; absent is success.
    pub fn del_neighbour(&mut self, _n: &Neighbour) -> Result<()> {
        todo!()
    }
    /// Permanent neighbour entries of a device (`ip neigh show dev IFINDEX nud permanent`).
    pub fn list_neighbours(&mut self, _ifindex: u32) -> Result<Vec<Neighbour>> {
        todo!()
    }

    // ---- bridge FDB ---------------------------------------------------
    /// `bridge fdb replace MAC dev IFINDEX dst IP self permanent`.
    pub fn replace_fdb(&mut self, _e: &FdbEntry) -> Result<()> {
        todo!()
    }
    /// `bridge fdb del MAC dev IFINDEX dst IP self`; absent is success.
    pub fn del_fdb(&mut self, _e: &FdbEntry) -> Result<()> {
        todo!()
    }
    /// Unicast `self` entries with a `dst` on a vxlan device (`bridge fdb show dev IFINDEX`).
    pub fn list_fdb(&mut self, _ifindex: u32) -> Result<Vec<FdbEntry>> {
        todo!()
    }
}

/// A socket subscribed to link, address, route and neighbour notifications
/// (`ip monitor link address route neigh`).
pub struct Monitor {
    _priv: (),
}

impl Monitor {
    /// Subscribes in the calling thread's namespace.
    pub fn open() -> Result<Self> {
        todo!()
    }
    /// Blocks until at least one notification arrives.
    pub fn recv(&mut self) -> Result<Vec<Notification>> {
        todo!()
    }
}
