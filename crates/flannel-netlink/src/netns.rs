//! Named network namespaces, as `ip netns` manages them (a bind mount under
//! /run/netns), and running code inside one.
//!
//! `setns(2)` changes the namespace of the calling *thread*. Doing that on an
//! async worker or the main thread would leak the namespace into unrelated
//! work, so [`NetNs::run`] always spawns a dedicated OS thread.

use std::os::fd::OwnedFd;

/// A handle on a network namespace.
pub struct NetNs {
    pub name: Option<String>,
    fd: OwnedFd,
}
