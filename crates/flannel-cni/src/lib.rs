//! The flannel CNI plugin as a library: the binary `flannel` (`main.rs`) is
//! a thin wrapper around [`verbs::run`]. The library exists so that
//! installers (`flannelctl install-cni`) and tests validate a conflist with
//! the plugin's own parser ([`config::parse_conflist`]).
//!
//! - [`spec`]: CNI versions, results and error objects.
//! - [`config`]: the network configuration, subnet.env, the rendered bridge config.
//! - [`verbs`]: ADD, DEL, CHECK, GC, STATUS, VERSION.
//! - [`attach`], [`ipam`], [`ipmasq`]: the bridge/veth work, host-local
//!   addresses, the bridge plugin's masquerade chain.

pub mod attach;
pub mod config;
pub mod ipam;
pub mod ipmasq;
pub mod spec;
pub mod verbs;
