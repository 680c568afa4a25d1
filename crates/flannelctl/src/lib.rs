//! flannelctl as a library: the operator commands, callable from the binary
//! and from the integration tests.
//!
//! - [`lab`]: a whole flannel cluster (underlay switch, master, workers, pods)
//!   in network namespaces of this machine, driven by the real `flanneld` and
//!   `flannel` CNI binaries.
//! - [`leases`]: the leases held by a store, as `flannelctl leases` prints them.
//! - [`explain`]: one packet's path as the kernels route it, through a lab
//!   or through the node flannelctl runs on.

pub mod explain;
pub mod lab;
pub mod leases;
