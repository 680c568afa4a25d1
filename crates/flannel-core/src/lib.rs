//! Pure logic of flannel-rs: everything that can be decided without touching
//! the kernel, the disk or the network. Unit tests and benches drive it
//! without root.
//!
//! - [`wire`]: flannel's wire names (etcd keys, annotations, file paths), in one place.
//! - [`config`]: net-conf.json with upstream's schema, defaults and validation.
//! - [`ip`]: subnet arithmetic.
//! - [`kube`]: Kubernetes mode: annotation names, a Node's lease, what flanneld publishes.
//! - [`lease`]: leases and their upstream JSON encoding.
//! - [`admit`]: which leases of the store may be programmed (hostile or
//!   conflicting entries are kept out, deterministically).
//! - [`alloc`]: which subnet a node should hold (upstream's acquisition order).
//! - [`subnet_env`]: /run/flannel/subnet.env rendering and parsing.
//! - [`datapath`]: the desired kernel state computed from leases, and the diff
//!   against the state read back from the kernel.
//! - [`incremental`]: the desired state kept lease by lease, so that a lease
//!   event writes only what it concerns.
//! - [`mac`]: Ethernet addresses.
//! - [`rules`]: masquerade and forward rules (iptables, and nftables with the
//!   feature `nft`), desired and parsed.
//! - [`udp`]: the udp backend's packet checks, peer table and counters.
//! - [`wireguard`]: the wireguard backend's keys, lease data, peers per device, allowed-IPs lookup and counters.
//!
//! Nothing here reads a clock, a file or a random source on its own: callers
//! pass `now: SystemTime` and an `rng`, so every decision is reproducible in
//! tests.
//!
//! Deliberate differences from upstream flannel (see each module):
//! a missing `Backend` means vxlan, not udp; vxlan over an IPv6 underlay
//! costs 70 bytes of MTU, not 50; dual-stack acquisition keeps the previous
//! subnet per family; a new subnet never overlaps a live lease of another
//! length; the reconcile diff is scoped to what flannel owns and removes
//! routes of nodes that vanished while the daemon was down.

pub mod admit;
pub mod alloc;
pub mod config;
pub mod datapath;
pub mod incremental;
pub mod ip;
pub mod kube;
pub mod lease;
pub mod mac;
pub mod rules;
pub mod subnet_env;
pub mod udp;
pub mod wire;
pub mod wireguard;
