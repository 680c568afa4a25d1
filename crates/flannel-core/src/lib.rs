//! Pure logic of flannel-rs: everything that can be decided without touching
//! the kernel, the disk or the network. Unit tests and benches drive it
//! without root.
//!
//! - [`wire`]: flannel's wire names (etcd keys, annotations, file paths), in one place.
//! - [`config`]: net-conf.json with upstream's schema, defaults and validation.
//! - [`ip`]: subnet arithmetic.
//! - [`lease`]: leases and their upstream JSON encoding.
//! - [`alloc`]: which subnet a node should hold (upstream's acquisition order).
//! - [`subnet_env`]: /run/flannel/subnet.env rendering and parsing.
//! - [`datapath`]: the desired kernel state computed from leases, and the diff
//!   against the state read back from the kernel.
//! - [`mac`]: Ethernet addresses.

pub mod alloc;
pub mod config;
pub mod datapath;
pub mod ip;
pub mod lease;
pub mod mac;
pub mod subnet_env;
pub mod wire;
