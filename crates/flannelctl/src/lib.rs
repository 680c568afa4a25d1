//! flannelctl as a library: the operator commands, callable from the binary
//! and from the integration tests.
//!
//! - [`lab`]: a whole flannel cluster (underlay switch, master, workers, pods)
//!   in network namespaces of this machine, driven by the real `flanneld` and
//!   `flannel` CNI binaries.
//! - [`leases`]: the leases held by a store, as `flannelctl leases` prints them.
//! - [`explain`]: one packet's path as the kernels route it, through a lab
//!   or through the node flannelctl runs on.
//! - [`install`]: the CNI plugin and conflist installed atomically on a node
//!   (`flannelctl install-cni`, `install-conf`).

pub mod explain;
pub mod install;
pub mod lab;
pub mod leases;
