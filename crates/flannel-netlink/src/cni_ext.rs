//! Additions for the CNI plugin (owned by the flannel-cni engineer).
//!
//! The plugin is a short, single-purpose process that must drive two
//! namespaces (the node's and the pod's). [`crate::netns::NetNs::run`] costs a
//! thread per use; on a busy node each thread start, malloc arena and join is
//! a scheduling round trip. A netlink socket stays bound to the namespace it
//! was created in, so creating it is the only step that has to happen inside
//! the pod's namespace.

use std::fs::File;

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::sched::{setns, CloneFlags};

use crate::netns::NetNs;
use crate::{Error, Netlink, Result};

impl Netlink {
    /// Opens a NETLINK_ROUTE socket inside `ns` from the calling thread, like
    /// `ip -n NS ...` does: the thread enters `ns` (`setns`), creates the
    /// socket and returns to its own namespace before this function returns.
    /// The returned handle operates on `ns` from any thread.
    ///
    /// Panics if the thread cannot return to its namespace (it would
    /// otherwise go on running in the wrong one); the kernel only refuses that
    /// for lack of privilege, which the first `setns` would already have hit.
    pub fn open_in(ns: &NetNs) -> Result<Netlink> {
        let op = |what: &str| format!("open netlink in {}: {what}", ns.name);
        let home = File::open("/proc/thread-self/ns/net").map_err(|source| Error::Kernel {
            op: op("open /proc/thread-self/ns/net"),
            source,
        })?;
        setns(ns.fd(), CloneFlags::CLONE_NEWNET).map_err(|e| Error::Kernel {
            op: op("setns"),
            source: e.into(),
        })?;
        let nl = Netlink::open();
        if let Err(e) = setns(&home, CloneFlags::CLONE_NEWNET) {
            panic!(
                "cannot return to the original network namespace after opening a socket in {}: {e}",
                ns.name
            );
        }
        nl
    }

    /// `ip addr replace ADDR dev INDEX nodad` for IPv6 (plain
    /// [`Netlink::add_address`] for IPv4): the address skips duplicate
    /// address detection and is usable at once. A pod's addresses come from
    /// IPAM and are unique on the bridge by construction; DAD would only keep
    /// them "tentative" for a second or more, during which nothing in the pod
    /// can bind them.
    pub fn add_address_nodad(&mut self, index: u32, addr: IpNet) -> Result<()> {
        let IpNet::V6(v6) = addr else {
            return self.add_address(index, addr);
        };
        let op = format!("ip addr replace {addr} dev {index} nodad");
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet6;
        m.header.prefix_len = v6.prefix_len();
        m.header.scope = AddressScope::Universe;
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(addr.addr()));
        m.attributes.push(AddressAttribute::Address(addr.addr()));
        m.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        match self.t.request(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_REPLACE,
            &op,
        ) {
            Err(e) if e.is_exists() => Ok(()),
            r => r.map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::ScopedNetNs;

    fn ns_inode(path: &str) -> u64 {
        nix::sys::stat::stat(path).unwrap().st_ino
    }

    #[test]
    fn open_in_binds_the_socket_there_and_comes_back() {
        if !nix::unistd::geteuid().is_root() {
            panic!("needs root: creates a network namespace; run as root");
        }
        let before = ns_inode("/proc/thread-self/ns/net");
        let ns = ScopedNetNs::unique("fnl-openin").unwrap();
        let mut nl = Netlink::open_in(&ns).unwrap();
        assert_eq!(
            ns_inode("/proc/thread-self/ns/net"),
            before,
            "thread did not return home"
        );
        // Only the new namespace's loopback is visible through the socket.
        let links = nl.list_links().unwrap();
        assert_eq!(links.len(), 1, "{links:?}");
        assert_eq!(links[0].name, "lo");
        nl.add_bridge("fnl-br0", None).unwrap();
        let seen = ns
            .run(|| Netlink::open().unwrap().link_by_name("fnl-br0").unwrap())
            .unwrap();
        assert!(seen.is_some(), "bridge not created inside the namespace");

        // nodad: the IPv6 address is not tentative (iproute2 would print "tentative").
        let br = nl.link_by_name("fnl-br0").unwrap().unwrap();
        nl.set_link_up(br.index).unwrap();
        let a: IpNet = "fd00:99::2/64".parse().unwrap();
        nl.add_address_nodad(br.index, a).unwrap();
        nl.add_address_nodad(br.index, a).unwrap();
        assert!(nl.list_addresses(br.index).unwrap().contains(&a));
        let name = ns.name.clone();
        let out = std::process::Command::new("ip")
            .args(["-n", &name, "-6", "addr", "show", "dev", "fnl-br0"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("fd00:99::2/64"), "{text}");
        let line = text.lines().find(|l| l.contains("fd00:99::2/64")).unwrap();
        assert!(!line.contains("tentative"), "{line}");
    }
}
