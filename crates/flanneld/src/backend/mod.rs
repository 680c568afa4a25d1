//! Backends: how packets between nodes are carried (`Backend.Type`): vxlan,
//! host-gw and udp.

pub mod hostgw;
pub mod udp;
pub mod vxlan;
