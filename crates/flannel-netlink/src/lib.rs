//! The thin kernel layer: synchronous rtnetlink, WireGuard's generic
//! netlink family ([`wireguard`]) and network namespaces.
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

mod addrs;
mod cni_ext;
mod links;
mod monitor;
mod neigh;
pub mod netns;
mod nexthop;
mod routes;
mod transport;
pub mod tun;
pub mod wireguard;

#[cfg(feature = "fuzzing")]
pub mod fuzzing;

use std::net::IpAddr;

use flannel_core::mac::MacAddr;
use ipnet::IpNet;

pub use links::VethPair;
pub use monitor::Monitor;
pub use nexthop::{is_unsupported as nexthops_unsupported, Nexthop, RouteEntry};
pub use routes::RouteLookup;

/// Errors of the kernel layer, each with the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel refused the request (`source` carries the errno).
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
    /// Bad input, caught before anything was sent; `detail` names the field
    /// and what to do.
    #[error("{op}: {detail}")]
    Invalid { op: String, detail: String },
    /// Something of the same name exists and is not what was asked for
    /// (e.g. a link named like the bridge that is not a bridge).
    #[error("{op}: {detail}")]
    Conflict { op: String, detail: String },
}

impl Error {
    /// The kernel's errno for [`Error::Kernel`] (e.g. `libc::EEXIST`).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
    /// The kernel answered EEXIST (e.g. a veth name already taken).
    pub fn is_exists(&self) -> bool {
        self.raw_os_error() == Some(libc::EEXIST)
    }
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

/// A link's counters as `ip -s link show` reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
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
    /// A route of the main table; `route` is the route itself when it is
    /// one [`flannel_core::datapath::Route`] can express (unicast, one
    /// output device).
    Route {
        dst: IpNet,
        deleted: bool,
        route: Option<flannel_core::datapath::Route>,
    },
    /// A neighbour entry; `mac` its link-layer address when it has one,
    /// `permanent` its state (`nud permanent`).
    Neighbour {
        ifindex: u32,
        ip: IpAddr,
        deleted: bool,
        mac: Option<MacAddr>,
        permanent: bool,
    },
    /// A bridge FDB entry; `dst` its remote (vxlan) when it has one.
    Fdb {
        ifindex: u32,
        mac: MacAddr,
        deleted: bool,
        dst: Option<IpAddr>,
    },
    Address {
        index: u32,
        deleted: bool,
    },
    /// A nexthop object (`ip monitor nexthop`). Deleting one deletes the
    /// IPv4 routes that use it without a route notification: this is the
    /// only sign of that.
    Nexthop {
        id: u32,
        deleted: bool,
    },
    /// Notifications were lost (the socket buffer overflowed with ENOBUFS,
    /// or one could not be decoded): the receiver must re-read the whole
    /// kernel state (full resync).
    Overrun,
}

/// A synchronous rtnetlink socket, bound to the namespace it was opened in.
pub struct Netlink {
    t: transport::Transport,
}

impl Netlink {
    /// Opens a NETLINK_ROUTE socket in the calling thread's namespace.
    pub fn open() -> Result<Self> {
        let t = transport::Transport::open(&[], 1 << 20).map_err(|source| Error::Kernel {
            op: "socket(AF_NETLINK, NETLINK_ROUTE)".into(),
            source,
        })?;
        Ok(Netlink { t })
    }

    /// The socket's netlink port id. The kernel stamps it into the
    /// notifications that this socket's route and neighbour writes cause
    /// (`nlmsg_pid`), so a [`Monitor`] can tell them from everybody else's
    /// ([`Monitor::ignore_port`]). The vxlan driver's FDB notifications
    /// carry 0 whoever wrote.
    pub fn port_id(&self) -> u32 {
        self.t.port_id()
    }
}

/// `IFNAMSIZ - 1`: longer link names are refused by the kernel.
pub const MAX_IFNAME_LEN: usize = 15;

fn check_ifname(op: &str, field: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_IFNAME_LEN
        || name == "."
        || name == ".."
        || name.contains(['/', ':', '\0'])
        || name.contains(char::is_whitespace)
    {
        return Err(Error::Invalid {
            op: op.to_string(),
            detail: format!(
                "{field} {name:?} is not a valid interface name: use 1..={MAX_IFNAME_LEN} bytes without '/', ':' or spaces"
            ),
        });
    }
    Ok(())
}

/// Errnos that mean "it is already gone" for a delete.
fn is_absent(e: &Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ESRCH) | Some(libc::ENODEV) | Some(libc::EADDRNOTAVAIL)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        assert!(check_ifname("op", "name", "flannel.1").is_ok());
        assert!(check_ifname("op", "name", "123456789012345").is_ok());
        for bad in ["", "1234567890123456", "a/b", "a b", "a:b", ".", ".."] {
            let e = check_ifname("ip link add", "bridge name", bad).unwrap_err();
            assert!(e.to_string().contains("bridge name"), "{e}");
        }
    }

    #[test]
    fn route_command_spelling() {
        let r = flannel_core::datapath::Route {
            dst: "10.244.2.0/24".parse().unwrap(),
            gateway: Some("10.244.2.0".parse().unwrap()),
            oif: 5,
            onlink: true,
        };
        assert_eq!(
            routes::route_cmd("replace", &r),
            "ip route replace 10.244.2.0/24 via 10.244.2.0 dev 5 onlink"
        );
    }
}
