//! net-conf.json: upstream's schema, defaults and validation.
//!
//! Keys are matched case-insensitively, as upstream's Go JSON decoding does.
//! Every error names the field, the rule and the fix.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// A validated net-conf.json with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub enable_ipv4: bool,
    pub enable_ipv6: bool,
    pub enable_nftables: bool,
    /// `Network` (required when `EnableIPv4`).
    pub network: Option<Ipv4Net>,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    /// `IPv6Network` (required when `EnableIPv6`).
    pub ipv6_network: Option<Ipv6Net>,
    pub ipv6_subnet_len: u8,
    pub ipv6_subnet_min: Ipv6Addr,
    pub ipv6_subnet_max: Ipv6Addr,
    pub backend: BackendConfig,
}

/// The `Backend` object. A missing `Backend` means vxlan (upstream falls back
/// to udp, contradicting its own docs; we follow the docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    Vxlan(VxlanConfig),
    HostGw,
    Udp(UdpConfig),
}

/// vxlan backend options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    /// `VNI`, default 1.
    pub vni: u32,
    /// `Port`, 0 = kernel default (8472).
    pub port: u16,
    pub gbp: bool,
    pub learning: bool,
    pub direct_routing: bool,
    /// `MTU` override.
    pub mtu: Option<u32>,
}

/// udp backend options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpConfig {
    /// `Port`, default 8285.
    pub port: u16,
    pub mtu: Option<u32>,
}
