//! The node daemon: interface selection, lease acquisition, the level-triggered reconciler and backends.
//!
//! - [`flags`]: the command line (upstream's flag names, `FLANNELD_*` environment).
//! - [`iface`]: choosing the external interface.
//! - [`backend`]: the vxlan devices (`flannel.<VNI>`, `flannel-v6.<VNI>`) and VtepMACs; host-gw.
//! - [`reconcile`]: the kernel thread that makes the datapath match the leases.
//! - [`nexthops`]: peer routes through nexthop objects above a cluster size (kernel O(N²) otherwise).
//! - [`rules`]: masquerade and forward rules (iptables or nftables), kept in line on a thread.
//! - [`daemon`]: startup, the lease watch, renewal and signals.
//! - [`health`]: the `--healthz-port` endpoint (`/healthz`, `/readyz`, `/metrics`).
//! - [`subnet_file`]: atomic subnet.env writes.
//! - [`mem`]: malloc arenas capped, freed memory returned after full passes.

pub mod backend;
pub mod daemon;
pub mod flags;
pub mod health;
pub mod iface;
pub mod mem;
pub mod nexthops;
pub mod reconcile;
pub mod rules;
pub mod subnet_file;
