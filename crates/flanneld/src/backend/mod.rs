//! Backends: how packets between nodes are carried (`Backend.Type`): vxlan
//! and host-gw.

pub mod hostgw;
pub mod vxlan;
