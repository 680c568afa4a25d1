//! Operations the CNI plugin needs: a socket opened in the pod's namespace,
//! a veth created already attached to the bridge, addresses without DAD.
//!
//! The plugin drives two namespaces (the node's and the pod's). A netlink
//! socket stays bound to the namespace it was created in, so creating it is
//! the only step that has to happen inside the pod's namespace: one thread
//! start per call, instead of one per step.

use std::os::fd::BorrowedFd;

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::links::VethRequest;
use crate::netns::NetNs;
use crate::{Error, Netlink, Result, VethPair};
use flannel_core::mac::MacAddr;

impl Netlink {
    /// Opens a NETLINK_ROUTE socket inside `ns`, like `ip -n NS ...` does.
    /// The socket is created on a short-lived thread that entered `ns`
    /// ([`NetNs::run`]), so the calling thread never changes namespace; the
    /// socket stays bound to `ns` for its whole life and the returned handle
    /// drives `ns` from any thread.
    pub fn open_in(ns: &NetNs) -> Result<Netlink> {
        ns.run(Netlink::open).map_err(|e| Error::Kernel {
            op: format!("open netlink in {}", ns.name),
            source: std::io::Error::other(e),
        })?
    }

    /// `ip link add HOST mtu M master MASTER up type veth peer name PEER mtu M
    /// address MAC netns FD`: one request creates the pair with the peer
    /// directly in `peer_netns`, enslaves the host end to `master` and brings
    /// it up (the kernel applies `IFLA_MASTER` and `ifi_flags` at creation),
    /// instead of three requests that each take the RTNL lock. The peer stays
    /// down. Returns the host end and the peer's index; with the peer's MAC
    /// chosen here, the caller knows the pod end without asking the pod's
    /// namespace. A taken name is EEXIST, as for [`Netlink::add_veth`].
    pub fn add_veth_attached(
        &mut self,
        host: &str,
        peer: &str,
        peer_netns: BorrowedFd<'_>,
        mtu: Option<u32>,
        master: u32,
        peer_mac: MacAddr,
    ) -> Result<VethPair> {
        self.create_veth(&VethRequest {
            host,
            peer,
            peer_netns,
            mtu,
            master: Some(master),
            peer_mac: Some(peer_mac),
        })
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

        // A veth pair born attached: host end on the bridge and up, peer in the other namespace.
        let other = ScopedNetNs::unique("fnl-openin").unwrap();
        let mac = MacAddr([0x02, 0x42, 0xac, 0x11, 0x00, 0x07]);
        let pair = nl
            .add_veth_attached("fnl-vh", "fnl-vp", other.fd(), Some(1400), br.index, mac)
            .unwrap();
        let VethPair { host, peer_index } = pair;
        assert_eq!(host.name, "fnl-vh");
        assert_eq!(host.kind.as_deref(), Some("veth"));
        assert_eq!(host.master, Some(br.index));
        assert!(host.up);
        assert_eq!(host.mtu, 1400);
        // What the echo said is what a fresh look-up says.
        let looked_up = nl.link_by_name("fnl-vh").unwrap().unwrap();
        assert_eq!(looked_up.index, host.index);
        assert_eq!(looked_up.mac, host.mac);
        let peer = other
            .run(|| Netlink::open().unwrap().link_by_name("fnl-vp").unwrap())
            .unwrap()
            .expect("peer in the other namespace");
        assert_eq!(peer.mtu, 1400);
        assert_eq!(peer.mac, Some(mac));
        assert_eq!(peer_index, Some(peer.index));
        let e = nl
            .add_veth_attached("fnl-vh", "fnl-vq", other.fd(), None, br.index, mac)
            .unwrap_err();
        assert!(e.is_exists(), "{e}");
    }
}
