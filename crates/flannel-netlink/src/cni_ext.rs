//! Additions for the CNI plugin (owned by the flannel-cni engineer).
//!
//! The plugin is a short, single-purpose process that must drive two
//! namespaces (the node's and the pod's). [`crate::netns::NetNs::run`] costs a
//! thread per use; on a busy node each thread start, malloc arena and join is
//! a scheduling round trip. A netlink socket stays bound to the namespace it
//! was created in, so creating it is the only step that has to happen inside
//! the pod's namespace.

use std::fs::File;

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
    }
}
