//! The desired kernel state, computed from leases and config, and the diff
//! against what the kernel actually holds. The kernel layer
//! (`flannel-netlink`) reads and writes exactly these types.

use std::net::IpAddr;

use ipnet::IpNet;

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
