//! Named network namespaces, as `ip netns` manages them (a bind mount of
//! `/proc/<tid>/ns/net` on `/run/netns/NAME`), and running code inside one.
//!
//! `setns(2)` changes the namespace of the calling *thread*. Doing that on an
//! async worker or the main thread would leak the namespace into unrelated
//! work, so [`NetNs::run`] always runs the closure on a dedicated OS thread.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Errors of namespace handling, with the namespace involved.
#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("netns {name}: {op}: {source}")]
    Sys {
        name: String,
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("netns {name}: {op}: {source}")]
    Io {
        name: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("netns {name}: the thread running inside it panicked")]
    Panicked { name: String },
}

/// A handle on a network namespace (an open fd on its nsfs inode).
pub struct NetNs {
    /// Display name: the `ip netns` name or the path it was opened from.
    pub name: String,
    /// Bind-mount path when the namespace is named.
    pub path: Option<PathBuf>,
    fd: OwnedFd,
}

impl NetNs {
    /// `ip netns add NAME`: creates a namespace and pins it at `/run/netns/NAME`,
    /// with `lo` up.
    pub fn add(_name: &str) -> Result<NetNs, NetNsError> {
        todo!()
    }
    /// `ip netns` lookup: opens `/run/netns/NAME`.
    pub fn open(_name: &str) -> Result<NetNs, NetNsError> {
        todo!()
    }
    /// Opens any nsfs path (`/proc/PID/ns/net`, `/var/run/netns/x`), as CNI_NETNS gives.
    pub fn open_path(_path: &Path) -> Result<NetNs, NetNsError> {
        todo!()
    }
    /// The namespace fd, e.g. for `Netlink::add_veth` or `set_link_netns`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        todo!()
    }
    /// Runs `f` on a fresh OS thread that has entered this namespace; the
    /// thread exits afterwards, so no other code ever runs in the wrong namespace.
    pub fn run<F, R>(&self, _f: F) -> Result<R, NetNsError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        todo!()
    }
    /// `ip netns del NAME`: unmounts and removes `/run/netns/NAME`; absent is success.
    pub fn delete(_name: &str) -> Result<(), NetNsError> {
        todo!()
    }
}

/// Writes a sysctl of the *calling thread's* network namespace, e.g.
/// `set_sysctl("net/ipv4/ip_forward", "1")` inside [`NetNs::run`]. The
/// `/proc/sys/net` files resolve to the namespace of the opener.
pub fn set_sysctl(_key: &str, _value: &str) -> std::io::Result<()> {
    todo!()
}

/// A named namespace removed on drop (also when a test panics), for tests and the lab.
pub struct ScopedNetNs {
    pub ns: NetNs,
}

impl ScopedNetNs {
    /// Creates `PREFIX-<pid>-<counter>` so that parallel tests never collide.
    pub fn unique(_prefix: &str) -> Result<ScopedNetNs, NetNsError> {
        todo!()
    }
}

impl std::ops::Deref for ScopedNetNs {
    type Target = NetNs;
    fn deref(&self) -> &NetNs {
        &self.ns
    }
}

impl Drop for ScopedNetNs {
    fn drop(&mut self) {
        let _ = NetNs::delete(&self.ns.name);
    }
}
