//! Backends: how packets between nodes are carried. Only vxlan exists so far.

pub mod vxlan;
