//! Backends: how packets between nodes are carried (`Backend.Type`): vxlan,
//! host-gw and udp.

pub mod fastpath;
pub mod hostgw;
pub mod udp;
pub mod vxlan;
pub mod wireguard;
pub mod wireguard_kernel;
