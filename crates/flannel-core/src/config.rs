//! net-conf.json: upstream's schema, defaults and validation.
//!
//! Keys are matched case-insensitively, as upstream's Go JSON decoding does
//! (an exact match wins over a case-insensitive one). Unknown keys are
//! ignored, as upstream does. `null` counts as "not set", and so do the Go
//! zero values upstream treats as "not set" (`"SubnetLen": 0`,
//! `"SubnetMin": "0.0.0.0"`).
//!
//! Every error names the field, the rule and the fix.
//!
//! Differences from upstream (deliberate):
//! - a missing `Backend` (or one without `Type`) means vxlan; upstream falls
//!   back to udp although its documentation says vxlan;
//! - `EnableIPv4` and `EnableIPv6` both false is refused (nothing to do);
//! - `Network` is required when `EnableIPv4` is true (upstream would carry on
//!   with `0.0.0.0/0`), `IPv6Network` when `EnableIPv6` is true.
//!
//! Like upstream, a `Network` with host bits set (`10.244.0.1/16`) is
//! normalised to its network address (`10.244.0.0/16`).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{Map, Value};

use crate::wire;
use crate::wireguard::{SecretKey, WgKey};

/// A validated net-conf.json with every default filled in.
///
/// For a disabled family the network is `None`, the length 0 and min/max the
/// unspecified address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// `EnableIPv4`, default true.
    pub enable_ipv4: bool,
    /// `EnableIPv6`, default false.
    pub enable_ipv6: bool,
    /// `EnableNFTables`, default false: masquerade with nftables instead of iptables.
    pub enable_nftables: bool,
    /// `Network` (required when `EnableIPv4`).
    pub network: Option<Ipv4Net>,
    /// `SubnetLen`: prefix length of each node's subnet.
    pub subnet_len: u8,
    /// `SubnetMin`: address of the first subnet handed out.
    pub subnet_min: Ipv4Addr,
    /// `SubnetMax`: address of the last subnet handed out.
    pub subnet_max: Ipv4Addr,
    /// `IPv6Network` (required when `EnableIPv6`).
    pub ipv6_network: Option<Ipv6Net>,
    /// `IPv6SubnetLen`.
    pub ipv6_subnet_len: u8,
    /// `IPv6SubnetMin`.
    pub ipv6_subnet_min: Ipv6Addr,
    /// `IPv6SubnetMax`.
    pub ipv6_subnet_max: Ipv6Addr,
    /// `Backend`.
    pub backend: BackendConfig,
}

/// The `Backend` object. A missing `Backend` means vxlan (upstream falls back
/// to udp, contradicting its own docs; we follow the docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    /// `"Type": "vxlan"`: kernel vxlan device `flannel.<VNI>`.
    Vxlan(VxlanConfig),
    /// `"Type": "host-gw"`: plain routes via the peers' public IPs.
    HostGw,
    /// `"Type": "udp"`: TUN device `flannel0`, userspace encapsulation.
    Udp(UdpConfig),
    /// `"Type": "wireguard"`: devices `flannel-wg` / `flannel-wg-v6`,
    /// encrypted WireGuard tunnels between nodes.
    Wireguard(WireguardConfig),
}

/// wireguard `Mode`: which device carries which family, and which address
/// of a peer is its endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WireguardMode {
    /// `separate` (default): `flannel-wg` for IPv4 over IPv4 endpoints,
    /// `flannel-wg-v6` for IPv6 over IPv6 endpoints.
    #[default]
    Separate,
    /// `auto`: `flannel-wg` for both families; each peer's endpoint family
    /// is picked from the addresses (see `wireguard::auto_family`).
    Auto,
    /// `ipv4`: `flannel-wg` for both families over IPv4 endpoints.
    Ipv4,
    /// `ipv6`: `flannel-wg` for both families over IPv6 endpoints.
    Ipv6,
}

impl WireguardMode {
    /// Every mode, in upstream's order.
    pub const ALL: [WireguardMode; 4] = [
        WireguardMode::Separate,
        WireguardMode::Auto,
        WireguardMode::Ipv4,
        WireguardMode::Ipv6,
    ];

    /// Upstream's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            WireguardMode::Separate => "separate",
            WireguardMode::Auto => "auto",
            WireguardMode::Ipv4 => "ipv4",
            WireguardMode::Ipv6 => "ipv6",
        }
    }
}

/// Which WireGuard implementation carries a wireguard device's packets
/// (`Backend.Datapath`, a flannel-rs key that upstream ignores).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireguardDatapath {
    /// `auto` (default): the kernel's `wireguard` link type when the kernel
    /// has it, else the userspace datapath on a TUN device.
    #[default]
    Auto,
    /// `kernel`: the kernel's device only; flanneld refuses to start
    /// without it.
    Kernel,
    /// `userspace`: the userspace datapath even where the kernel has
    /// WireGuard.
    Userspace,
}

impl WireguardDatapath {
    /// Every choice.
    pub const ALL: [WireguardDatapath; 3] = [
        WireguardDatapath::Auto,
        WireguardDatapath::Kernel,
        WireguardDatapath::Userspace,
    ];

    /// The spelling in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            WireguardDatapath::Auto => "auto",
            WireguardDatapath::Kernel => "kernel",
            WireguardDatapath::Userspace => "userspace",
        }
    }
}

/// wireguard backend options (upstream's names and defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireguardConfig {
    /// `ListenPort`, default 51820: `flannel-wg`'s UDP port.
    pub listen_port: u16,
    /// `ListenPortV6`, default 51821: `flannel-wg-v6`'s UDP port (and the
    /// port published in `BackendV6Data` in every mode, as upstream).
    pub listen_port_v6: u16,
    /// `PSK`: a preshared key (base64, `wg genpsk`) mixed into every handshake.
    pub psk: Option<SecretKey>,
    /// `PersistentKeepaliveInterval` in seconds, 0 (default) = off.
    pub persistent_keepalive: u16,
    /// `Mode`, default separate.
    pub mode: WireguardMode,
    /// `MTU`: the underlay MTU to plan for instead of the external
    /// interface's; as upstream, the devices and pods get this minus 80.
    pub mtu: Option<u32>,
    /// `Datapath` (ours), default auto.
    pub datapath: WireguardDatapath,
}

/// vxlan backend options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    /// `VNI`, default 1.
    pub vni: u32,
    /// `Port`, 0 = kernel default (8472).
    pub port: u16,
    /// `GBP`: vxlan Group Based Policy extension.
    pub gbp: bool,
    /// `Learning`: let the kernel learn FDB entries from received packets.
    pub learning: bool,
    /// `DirectRouting`: route without encapsulation to peers on a connected subnet.
    pub direct_routing: bool,
    /// `MTU` override.
    pub mtu: Option<u32>,
}

/// udp backend options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpConfig {
    /// `Port`, default 8285.
    pub port: u16,
    /// `MTU` override.
    pub mtu: Option<u32>,
}

impl Default for VxlanConfig {
    fn default() -> Self {
        VxlanConfig {
            vni: 1,
            port: 0,
            gbp: false,
            learning: false,
            direct_routing: false,
            mtu: None,
        }
    }
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            port: wire::UDP_DEFAULT_PORT,
            mtu: None,
        }
    }
}

impl Default for WireguardConfig {
    fn default() -> Self {
        WireguardConfig {
            listen_port: wire::WIREGUARD_DEFAULT_PORT,
            listen_port_v6: wire::WIREGUARD_DEFAULT_PORT_V6,
            psk: None,
            persistent_keepalive: 0,
            mode: WireguardMode::Separate,
            mtu: None,
            datapath: WireguardDatapath::Auto,
        }
    }
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig::Vxlan(VxlanConfig::default())
    }
}

/// Largest VNI: the vxlan header carries 24 bits.
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// Smallest MTU accepted as a backend `MTU` option (the IPv4 minimum).
pub const MIN_MTU: u32 = 68;
/// Largest MTU accepted as a backend `MTU` option.
pub const MAX_MTU: u32 = 65535;

/// Bytes the vxlan encapsulation adds over an IPv4 underlay
/// (outer IPv4 20 + UDP 8 + vxlan 8 + inner Ethernet 14).
pub const VXLAN_OVERHEAD_V4: u32 = 50;
/// Bytes the vxlan encapsulation adds over an IPv6 underlay (outer IPv6 is 40
/// bytes, 20 more than IPv4; upstream wrongly uses 50 here too).
pub const VXLAN_OVERHEAD_V6: u32 = 70;
/// Bytes the udp backend adds (outer IPv4 20 + UDP 8).
pub const UDP_OVERHEAD: u32 = 28;

/// A net-conf.json that cannot be used. Every message names the field, the
/// rule and the fix; [`ConfigError::field`] gives the field alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("net-conf.json is not valid JSON: {detail}; fix the syntax (keys and strings in double quotes, no trailing commas)")]
    Syntax { detail: String },
    #[error("net-conf.json must be a JSON object like {{\"Network\": \"10.244.0.0/16\", \"Backend\": {{\"Type\": \"vxlan\"}}}}, found {found}")]
    NotAnObject { found: String },
    #[error("{field} has the wrong type: expected {expected}, found {found}; set \"{field}\" to {expected} or omit it")]
    WrongType {
        field: String,
        expected: &'static str,
        found: String,
    },
    #[error("{field} {value:?} is not a valid {family} CIDR ({detail}); set \"{field}\" to a network like {example}")]
    InvalidCidr {
        field: String,
        value: String,
        family: &'static str,
        detail: String,
        example: &'static str,
    },
    #[error("{field} {value:?} is not a valid {family} address ({detail}); set \"{field}\" to a subnet address like {example} or omit it")]
    InvalidAddr {
        field: String,
        value: String,
        family: &'static str,
        detail: String,
        example: &'static str,
    },
    #[error(
        "{field} is missing: it is required because {reason}; set \"{field}\", e.g. {example}"
    )]
    Missing {
        field: String,
        reason: &'static str,
        example: &'static str,
    },
    #[error("EnableIPv4 and EnableIPv6 are both false: flannel has no address family to serve; set \"EnableIPv4\" (with \"Network\") or \"EnableIPv6\" (with \"IPv6Network\") to true")]
    NoFamily,
    #[error("{field} {network} is too small: the prefix must be /{max_prefix} or shorter so that it holds four subnets (the first one is never used); set \"{field}\" to a wider network, e.g. {example}")]
    NetworkTooSmall {
        field: String,
        network: String,
        max_prefix: u8,
        example: &'static str,
    },
    #[error("{field} {value} is invalid: it must be between {min} ({network_field} prefix + 2) and {max}; set \"{field}\" accordingly or omit it")]
    SubnetLen {
        field: String,
        network_field: &'static str,
        value: u64,
        min: u8,
        max: u8,
    },
    #[error("{field} {value} is outside {network_field} {network}; set \"{field}\" to a subnet address inside {network} or omit it")]
    OutsideNetwork {
        field: String,
        network_field: &'static str,
        value: String,
        network: String,
    },
    #[error("{field} {value} is not on a /{len} boundary ({len_field}); set \"{field}\" to the first address of a /{len} subnet, e.g. {aligned}, or omit it")]
    Unaligned {
        field: String,
        len_field: &'static str,
        value: String,
        len: u8,
        aligned: String,
    },
    #[error(
        "{field} {min} is above {max_field} {max}; set \"{field}\" <= \"{max_field}\" or omit them"
    )]
    MinAboveMax {
        field: String,
        max_field: &'static str,
        min: String,
        max: String,
    },
    #[error("Backend.Type {value:?} is not supported by flannel-rs yet; set \"Backend\": {{\"Type\": \"vxlan\"}} (or \"host-gw\", \"udp\" or \"wireguard\")")]
    BackendNotSupportedYet { value: String },
    #[error("Backend.Type {value:?} is unknown; set \"Backend\": {{\"Type\": ...}} to one of \"vxlan\", \"host-gw\", \"udp\", \"wireguard\"")]
    UnknownBackend { value: String },
    /// A string option (`Mode`, `Datapath`) that is none of its spellings.
    #[error("{field} {value:?} is not one of {choices}; set \"{field}\" to one of them or omit it ({default})")]
    InvalidChoice {
        field: String,
        value: String,
        /// The spellings, quoted, comma-separated.
        choices: String,
        /// What omitting it means.
        default: &'static str,
    },
    #[error("{field} is not a WireGuard key: {detail}; set \"{field}\" to the output of `wg genpsk` or omit it")]
    InvalidKey { field: String, detail: String },
    #[error("{field} {value} is out of range: it must be between {min} and {max}; set \"{field}\" accordingly or omit it")]
    OutOfRange {
        field: String,
        value: String,
        min: u64,
        max: u64,
    },
}

impl ConfigError {
    /// The net-conf.json field the error is about (`Backend.VNI` for a
    /// backend option), or `""` for errors about the document as a whole.
    pub fn field(&self) -> &str {
        match self {
            ConfigError::Syntax { .. } | ConfigError::NotAnObject { .. } => "",
            ConfigError::NoFamily => "EnableIPv4",
            ConfigError::BackendNotSupportedYet { .. } | ConfigError::UnknownBackend { .. } => {
                "Backend.Type"
            }
            ConfigError::WrongType { field, .. }
            | ConfigError::InvalidCidr { field, .. }
            | ConfigError::InvalidAddr { field, .. }
            | ConfigError::Missing { field, .. }
            | ConfigError::NetworkTooSmall { field, .. }
            | ConfigError::SubnetLen { field, .. }
            | ConfigError::OutsideNetwork { field, .. }
            | ConfigError::Unaligned { field, .. }
            | ConfigError::MinAboveMax { field, .. }
            | ConfigError::OutOfRange { field, .. }
            | ConfigError::InvalidChoice { field, .. }
            | ConfigError::InvalidKey { field, .. } => field,
        }
    }
}

/// Parses and validates a net-conf.json, filling in every default.
pub fn parse(json: &str) -> Result<NetConfig, ConfigError> {
    let root: Value = serde_json::from_str(json).map_err(|e| ConfigError::Syntax {
        detail: e.to_string(),
    })?;
    let Value::Object(map) = &root else {
        return Err(ConfigError::NotAnObject {
            found: json_kind(&root).to_string(),
        });
    };
    let obj = Obj {
        map,
        prefix: String::new(),
    };

    let enable_ipv4 = obj.bool("EnableIPv4")?.unwrap_or(true);
    let enable_ipv6 = obj.bool("EnableIPv6")?.unwrap_or(false);
    let enable_nftables = obj.bool("EnableNFTables")?.unwrap_or(false);
    if !enable_ipv4 && !enable_ipv6 {
        return Err(ConfigError::NoFamily);
    }

    let mut cfg = NetConfig {
        enable_ipv4,
        enable_ipv6,
        enable_nftables,
        network: None,
        subnet_len: 0,
        subnet_min: Ipv4Addr::UNSPECIFIED,
        subnet_max: Ipv4Addr::UNSPECIFIED,
        ipv6_network: None,
        ipv6_subnet_len: 0,
        ipv6_subnet_min: Ipv6Addr::UNSPECIFIED,
        ipv6_subnet_max: Ipv6Addr::UNSPECIFIED,
        backend: parse_backend(&obj)?,
    };

    if enable_ipv4 {
        let fam = family_v4();
        let network = match obj.string("Network")? {
            Some(s) => parse_cidr_v4(&s, "Network")?,
            None => {
                return Err(ConfigError::Missing {
                    field: "Network".into(),
                    reason: "EnableIPv4 is true (the default)",
                    example: "\"Network\": \"10.244.0.0/16\"",
                })
            }
        };
        let min = obj
            .string("SubnetMin")?
            .map(|s| parse_addr_v4(&s, "SubnetMin"))
            .transpose()?
            .filter(|a| !a.is_unspecified())
            .map(|a| u128::from(u32::from(a)));
        let max = obj
            .string("SubnetMax")?
            .map(|s| parse_addr_v4(&s, "SubnetMax"))
            .transpose()?
            .filter(|a| !a.is_unspecified())
            .map(|a| u128::from(u32::from(a)));
        let len = obj.uint("SubnetLen")?.filter(|&l| l != 0);
        let net_addr = u128::from(u32::from(network.network()));
        let v = validate_family(&fam, net_addr, network.prefix_len(), len, min, max)?;
        cfg.network = Some(network);
        cfg.subnet_len = v.len;
        cfg.subnet_min = Ipv4Addr::from(v.min as u32);
        cfg.subnet_max = Ipv4Addr::from(v.max as u32);
    }

    if enable_ipv6 {
        let fam = family_v6();
        let network = match obj.string("IPv6Network")? {
            Some(s) => parse_cidr_v6(&s, "IPv6Network")?,
            None => {
                return Err(ConfigError::Missing {
                    field: "IPv6Network".into(),
                    reason: "EnableIPv6 is true",
                    example: "\"IPv6Network\": \"fd00:10:244::/56\"",
                })
            }
        };
        let min = obj
            .string("IPv6SubnetMin")?
            .map(|s| parse_addr_v6(&s, "IPv6SubnetMin"))
            .transpose()?
            .filter(|a| !a.is_unspecified())
            .map(u128::from);
        let max = obj
            .string("IPv6SubnetMax")?
            .map(|s| parse_addr_v6(&s, "IPv6SubnetMax"))
            .transpose()?
            .filter(|a| !a.is_unspecified())
            .map(u128::from);
        let len = obj.uint("IPv6SubnetLen")?.filter(|&l| l != 0);
        let net_addr = u128::from(network.network());
        let v = validate_family(&fam, net_addr, network.prefix_len(), len, min, max)?;
        cfg.ipv6_network = Some(network);
        cfg.ipv6_subnet_len = v.len;
        cfg.ipv6_subnet_min = Ipv6Addr::from(v.min);
        cfg.ipv6_subnet_max = Ipv6Addr::from(v.max);
    }

    Ok(cfg)
}

impl FromStr for NetConfig {
    type Err = ConfigError;
    /// Same as [`parse`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

impl NetConfig {
    /// The backend's `Type` as upstream spells it: "vxlan", "host-gw", "udp" or "wireguard".
    pub fn backend_type(&self) -> &'static str {
        self.backend.type_name()
    }

    /// The IPv4 subnets leases are carved from, if IPv4 is enabled.
    pub fn ipv4_pool(&self) -> Option<crate::ip::SubnetPool<Ipv4Net>> {
        let net = self.network?;
        crate::ip::SubnetPool::new(net, self.subnet_len, self.subnet_min, self.subnet_max)
    }

    /// The IPv6 subnets leases are carved from, if IPv6 is enabled.
    pub fn ipv6_pool(&self) -> Option<crate::ip::SubnetPool<Ipv6Net>> {
        let net = self.ipv6_network?;
        crate::ip::SubnetPool::new(
            net,
            self.ipv6_subnet_len,
            self.ipv6_subnet_min,
            self.ipv6_subnet_max,
        )
    }

    /// The MTU to give pods for an external interface MTU; see [`pod_mtu`].
    pub fn pod_mtu(&self, external_mtu: u32, underlay_is_ipv6: bool) -> u32 {
        pod_mtu(&self.backend, external_mtu, underlay_is_ipv6)
    }
}

impl BackendConfig {
    /// The backend's `Type` as upstream spells it (also the lease's `BackendType`).
    pub fn type_name(&self) -> &'static str {
        match self {
            BackendConfig::Vxlan(_) => wire::BACKEND_TYPE_VXLAN,
            BackendConfig::HostGw => wire::BACKEND_TYPE_HOST_GW,
            BackendConfig::Udp(_) => wire::BACKEND_TYPE_UDP,
            BackendConfig::Wireguard(_) => wire::BACKEND_TYPE_WIREGUARD,
        }
    }

    /// The backend's `MTU` option as the pods' MTU, if set. wireguard's
    /// `MTU` is the underlay's instead (upstream subtracts the overhead
    /// from it too), see [`pod_mtu`].
    pub fn mtu_override(&self) -> Option<u32> {
        match self {
            BackendConfig::Vxlan(v) => v.mtu,
            BackendConfig::Udp(u) => u.mtu,
            BackendConfig::HostGw | BackendConfig::Wireguard(_) => None,
        }
    }

    /// Bytes of encapsulation the backend adds to every packet.
    pub fn overhead(&self, underlay_is_ipv6: bool) -> u32 {
        match self {
            BackendConfig::Vxlan(_) if underlay_is_ipv6 => VXLAN_OVERHEAD_V6,
            BackendConfig::Vxlan(_) => VXLAN_OVERHEAD_V4,
            BackendConfig::Udp(_) => UDP_OVERHEAD,
            BackendConfig::HostGw => 0,
            BackendConfig::Wireguard(_) => crate::wireguard::OVERHEAD,
        }
    }
}

/// The MTU written to subnet.env (`FLANNEL_MTU`) and given to pods: the
/// backend's `MTU` option when set, else the external interface's MTU minus
/// the encapsulation overhead (vxlan 50, or 70 over an IPv6 underlay; udp 28;
/// host-gw 0). wireguard, as upstream: its `MTU` option (else the external
/// MTU) minus 80. Saturates at 0 for absurdly small external MTUs.
pub fn pod_mtu(backend: &BackendConfig, external_mtu: u32, underlay_is_ipv6: bool) -> u32 {
    if let BackendConfig::Wireguard(w) = backend {
        return w
            .mtu
            .unwrap_or(external_mtu)
            .saturating_sub(crate::wireguard::OVERHEAD);
    }
    backend
        .mtu_override()
        .unwrap_or_else(|| external_mtu.saturating_sub(backend.overhead(underlay_is_ipv6)))
}

// ---------------------------------------------------------------------------
// Backend

fn parse_backend(root: &Obj<'_>) -> Result<BackendConfig, ConfigError> {
    let Some(v) = root.get("Backend") else {
        return Ok(BackendConfig::default());
    };
    let Value::Object(map) = v else {
        return Err(ConfigError::WrongType {
            field: "Backend".into(),
            expected: "an object like {\"Type\": \"vxlan\"}",
            found: json_kind(v).into(),
        });
    };
    let be = Obj {
        map,
        prefix: "Backend.".into(),
    };
    let ty = be.string("Type")?.unwrap_or_default();
    match ty.as_str() {
        // An empty Type is read as vxlan, the documented default.
        "" | wire::BACKEND_TYPE_VXLAN => {
            let d = VxlanConfig::default();
            let vni = match be.uint("VNI")? {
                Some(v) if v > u64::from(MAX_VNI) => {
                    return Err(ConfigError::OutOfRange {
                        field: be.field("VNI"),
                        value: v.to_string(),
                        min: 0,
                        max: u64::from(MAX_VNI),
                    })
                }
                Some(v) => v as u32,
                None => d.vni,
            };
            Ok(BackendConfig::Vxlan(VxlanConfig {
                vni,
                port: be.port("Port")?.unwrap_or(d.port),
                gbp: be.bool("GBP")?.unwrap_or(d.gbp),
                learning: be.bool("Learning")?.unwrap_or(d.learning),
                direct_routing: be.bool("DirectRouting")?.unwrap_or(d.direct_routing),
                mtu: be.mtu("MTU")?,
            }))
        }
        wire::BACKEND_TYPE_HOST_GW => Ok(BackendConfig::HostGw),
        wire::BACKEND_TYPE_UDP => {
            let d = UdpConfig::default();
            Ok(BackendConfig::Udp(UdpConfig {
                // Port 0 is upstream's "not set".
                port: be.port("Port")?.filter(|&p| p != 0).unwrap_or(d.port),
                mtu: be.mtu("MTU")?,
            }))
        }
        wire::BACKEND_TYPE_WIREGUARD => parse_wireguard(&be).map(BackendConfig::Wireguard),
        wire::BACKEND_TYPE_IPIP => Err(ConfigError::BackendNotSupportedYet { value: ty }),
        _ => Err(ConfigError::UnknownBackend { value: ty }),
    }
}

/// The wireguard options, upstream's names and defaults. A port of 0 is
/// "not set" (upstream would hand 0 to the kernel, which then picks a random
/// port nobody can know; a peer would dial the default).
fn parse_wireguard(be: &Obj<'_>) -> Result<WireguardConfig, ConfigError> {
    let d = WireguardConfig::default();
    let mode = be
        .choice(
            "Mode",
            &WireguardMode::ALL,
            WireguardMode::as_str,
            "separate",
        )?
        .unwrap_or(d.mode);
    let datapath = be
        .choice(
            "Datapath",
            &WireguardDatapath::ALL,
            WireguardDatapath::as_str,
            "auto: the kernel's WireGuard when it has it",
        )?
        .unwrap_or(d.datapath);
    let psk = match be.string("PSK")? {
        // Go's zero value: no PSK.
        None => None,
        Some(s) if s.is_empty() => None,
        Some(s) => Some(SecretKey(WgKey::parse(&s).map_err(|e| {
            ConfigError::InvalidKey {
                field: be.field("PSK"),
                detail: e.to_string(),
            }
        })?)),
    };
    let keepalive = match be.uint("PersistentKeepaliveInterval")? {
        None => 0,
        Some(k) => u16::try_from(k).map_err(|_| ConfigError::OutOfRange {
            field: be.field("PersistentKeepaliveInterval"),
            value: k.to_string(),
            min: 0,
            max: u64::from(u16::MAX),
        })?,
    };
    // The devices get MTU - 80, which must stay a usable IPv4 MTU.
    let min_mtu = MIN_MTU + crate::wireguard::OVERHEAD;
    let mtu = match be.mtu("MTU")? {
        Some(m) if m < min_mtu => {
            return Err(ConfigError::OutOfRange {
                field: be.field("MTU"),
                value: m.to_string(),
                min: u64::from(min_mtu),
                max: u64::from(MAX_MTU),
            })
        }
        m => m,
    };
    Ok(WireguardConfig {
        listen_port: be
            .port("ListenPort")?
            .filter(|&p| p != 0)
            .unwrap_or(d.listen_port),
        listen_port_v6: be
            .port("ListenPortV6")?
            .filter(|&p| p != 0)
            .unwrap_or(d.listen_port_v6),
        psk,
        persistent_keepalive: keepalive,
        mode,
        mtu,
        datapath,
    })
}

// ---------------------------------------------------------------------------
// Per-family validation, done once on u128 for both families.

struct FamilyRules {
    bits: u8,
    net_field: &'static str,
    len_field: &'static str,
    min_field: &'static str,
    max_field: &'static str,
    /// Default subnet length when the network is wide enough.
    default_len: u8,
    /// Longest network prefix that still gets `default_len`.
    wide_prefix: u8,
    /// Longest network prefix accepted at all.
    max_net_prefix: u8,
    /// Longest subnet length accepted.
    max_len: u8,
    net_example: &'static str,
    fmt: fn(u128) -> String,
}

fn family_v4() -> FamilyRules {
    FamilyRules {
        bits: 32,
        net_field: "Network",
        len_field: "SubnetLen",
        min_field: "SubnetMin",
        max_field: "SubnetMax",
        default_len: 24,
        wide_prefix: 22,
        max_net_prefix: 28,
        max_len: 30,
        net_example: "10.244.0.0/16",
        fmt: |a| Ipv4Addr::from(a as u32).to_string(),
    }
}

fn family_v6() -> FamilyRules {
    FamilyRules {
        bits: 128,
        net_field: "IPv6Network",
        len_field: "IPv6SubnetLen",
        min_field: "IPv6SubnetMin",
        max_field: "IPv6SubnetMax",
        default_len: 64,
        wide_prefix: 62,
        max_net_prefix: 124,
        max_len: 126,
        net_example: "fd00:10:244::/56",
        fmt: |a| Ipv6Addr::from(a).to_string(),
    }
}

struct Validated {
    len: u8,
    min: u128,
    max: u128,
}

/// Size minus one of a block of length `len` in a family of `bits` bits
/// (the host part all ones); `u128::MAX` for ::/0.
fn span(bits: u8, len: u8) -> u128 {
    let host = u32::from(bits - len);
    if host >= 128 {
        u128::MAX
    } else {
        (1u128 << host) - 1
    }
}

fn validate_family(
    f: &FamilyRules,
    net: u128,
    prefix: u8,
    len: Option<u64>,
    min: Option<u128>,
    max: Option<u128>,
) -> Result<Validated, ConfigError> {
    if prefix > f.max_net_prefix {
        return Err(ConfigError::NetworkTooSmall {
            field: f.net_field.into(),
            network: format!("{}/{}", (f.fmt)(net), prefix),
            max_prefix: f.max_net_prefix,
            example: f.net_example,
        });
    }
    let len = match len {
        Some(l) => {
            if l > u64::from(f.max_len) || l < u64::from(prefix) + 2 {
                return Err(ConfigError::SubnetLen {
                    field: f.len_field.into(),
                    network_field: f.net_field,
                    value: l,
                    min: prefix + 2,
                    max: f.max_len,
                });
            }
            l as u8
        }
        None if prefix <= f.wide_prefix => f.default_len,
        None => prefix + 2,
    };
    // len >= prefix + 2 >= 2, so a subnet's size fits in u128.
    let size = span(f.bits, len) + 1;
    let net_last = net | span(f.bits, prefix);
    let inside = |a: u128| a >= net && a <= net_last;

    let check = |field: &'static str, a: u128| -> Result<(), ConfigError> {
        if !inside(a) {
            return Err(ConfigError::OutsideNetwork {
                field: field.into(),
                network_field: f.net_field,
                value: (f.fmt)(a),
                network: format!("{}/{}", (f.fmt)(net), prefix),
            });
        }
        if a & (size - 1) != 0 {
            return Err(ConfigError::Unaligned {
                field: field.into(),
                len_field: f.len_field,
                value: (f.fmt)(a),
                len,
                aligned: (f.fmt)(a & !(size - 1)),
            });
        }
        Ok(())
    };
    // The first subnet is skipped: its network address would equal the
    // cluster network's own address.
    let min = match min {
        Some(a) => {
            check(f.min_field, a)?;
            a
        }
        None => net + size,
    };
    let max = match max {
        Some(a) => {
            check(f.max_field, a)?;
            a
        }
        None => net_last - (size - 1),
    };
    if min > max {
        return Err(ConfigError::MinAboveMax {
            field: f.min_field.into(),
            max_field: f.max_field,
            min: (f.fmt)(min),
            max: (f.fmt)(max),
        });
    }
    Ok(Validated { len, min, max })
}

// ---------------------------------------------------------------------------
// Case-insensitive typed access to a JSON object.

struct Obj<'a> {
    map: &'a Map<String, Value>,
    /// Prepended to key names in errors ("Backend.").
    prefix: String,
}

impl<'a> Obj<'a> {
    fn field(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    /// Exact match first, then the first ASCII case-insensitive match, as Go's
    /// encoding/json does. `null` is "not set".
    fn get(&self, key: &str) -> Option<&'a Value> {
        let v = self.map.get(key).or_else(|| {
            self.map
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v)
        })?;
        (!v.is_null()).then_some(v)
    }

    fn wrong(&self, key: &str, expected: &'static str, v: &Value) -> ConfigError {
        ConfigError::WrongType {
            field: self.field(key),
            expected,
            found: short_json(v),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, "a boolean (true or false)", v)),
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    /// A string that must be one of `all`'s spellings (`name`), exactly.
    fn choice<T: Copy>(
        &self,
        key: &str,
        all: &[T],
        name: fn(T) -> &'static str,
        default: &'static str,
    ) -> Result<Option<T>, ConfigError> {
        let Some(v) = self.string(key)? else {
            return Ok(None);
        };
        match all.iter().find(|&&t| name(t) == v) {
            Some(&t) => Ok(Some(t)),
            None => Err(ConfigError::InvalidChoice {
                field: self.field(key),
                value: v,
                choices: all
                    .iter()
                    .map(|&t| format!("{:?}", name(t)))
                    .collect::<Vec<_>>()
                    .join(", "),
                default,
            }),
        }
    }

    fn uint(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v @ Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a non-negative integer", v)),
            Some(v) => Err(self.wrong(key, "a non-negative integer", v)),
        }
    }

    fn port(&self, key: &str) -> Result<Option<u16>, ConfigError> {
        match self.uint(key)? {
            None => Ok(None),
            Some(p) => u16::try_from(p)
                .map(Some)
                .map_err(|_| ConfigError::OutOfRange {
                    field: self.field(key),
                    value: p.to_string(),
                    min: 0,
                    max: 65535,
                }),
        }
    }

    fn mtu(&self, key: &str) -> Result<Option<u32>, ConfigError> {
        match self.uint(key)? {
            // 0 is Go's zero value: "not set".
            None | Some(0) => Ok(None),
            Some(m) if (u64::from(MIN_MTU)..=u64::from(MAX_MTU)).contains(&m) => Ok(Some(m as u32)),
            Some(m) => Err(ConfigError::OutOfRange {
                field: self.field(key),
                value: m.to_string(),
                min: u64::from(MIN_MTU),
                max: u64::from(MAX_MTU),
            }),
        }
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The offending value, shortened so an error stays one readable line.
fn short_json(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 40 {
        let cut: String = s.chars().take(37).collect();
        format!("{cut}...")
    } else {
        s
    }
}

fn parse_cidr_v4(s: &str, field: &str) -> Result<Ipv4Net, ConfigError> {
    let err = |detail: String| ConfigError::InvalidCidr {
        field: field.into(),
        value: s.into(),
        family: "IPv4",
        detail,
        example: "\"10.244.0.0/16\"",
    };
    if s.parse::<Ipv6Net>().is_ok() {
        return Err(err(
            "it is an IPv6 network; IPv6 goes in \"IPv6Network\"".into()
        ));
    }
    s.parse::<Ipv4Net>()
        .map(|n| n.trunc())
        .map_err(|_| err("expected address/prefix".into()))
}

fn parse_cidr_v6(s: &str, field: &str) -> Result<Ipv6Net, ConfigError> {
    let err = |detail: String| ConfigError::InvalidCidr {
        field: field.into(),
        value: s.into(),
        family: "IPv6",
        detail,
        example: "\"fd00:10:244::/56\"",
    };
    if s.parse::<Ipv4Net>().is_ok() {
        return Err(err("it is an IPv4 network; IPv4 goes in \"Network\"".into()));
    }
    s.parse::<Ipv6Net>()
        .map(|n| n.trunc())
        .map_err(|_| err("expected address/prefix".into()))
}

fn parse_addr_v4(s: &str, field: &str) -> Result<Ipv4Addr, ConfigError> {
    s.parse().map_err(|_| ConfigError::InvalidAddr {
        field: field.into(),
        value: s.into(),
        family: "IPv4",
        detail: if s.contains('/') {
            "a plain address is expected, without /prefix".into()
        } else {
            "expected four decimal octets".into()
        },
        example: "\"10.244.10.0\"",
    })
}

fn parse_addr_v6(s: &str, field: &str) -> Result<Ipv6Addr, ConfigError> {
    s.parse().map_err(|_| ConfigError::InvalidAddr {
        field: field.into(),
        value: s.into(),
        family: "IPv6",
        detail: if s.contains('/') {
            "a plain address is expected, without /prefix".into()
        } else {
            "expected an IPv6 address".into()
        },
        example: "\"fd00:10:244:10::\"",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(json: &str) -> NetConfig {
        parse(json).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    /// Asserts the error is about `field`, and that the message names the
    /// field and tells what to set.
    fn err(json: &str, field: &str) -> ConfigError {
        let e = parse(json).expect_err(json);
        assert_eq!(e.field(), field, "{json}: {e}");
        let msg = e.to_string();
        if !field.is_empty() {
            let bare = field.rsplit('.').next().unwrap();
            assert!(msg.contains(bare), "message does not name {field}: {msg}");
            assert!(msg.contains("set "), "message gives no fix: {msg}");
        }
        e
    }

    #[test]
    fn defaults() {
        let c = ok(r#"{"Network":"10.244.0.0/16"}"#);
        assert!(c.enable_ipv4 && !c.enable_ipv6 && !c.enable_nftables);
        assert_eq!(c.network, Some("10.244.0.0/16".parse().unwrap()));
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 244, 255, 0));
        assert_eq!(c.backend, BackendConfig::Vxlan(VxlanConfig::default()));
        assert_eq!(c.backend_type(), "vxlan");
        assert_eq!(c.ipv6_network, None);
        assert_eq!(c.ipv4_pool().unwrap().count(), 255);
        assert!(c.ipv6_pool().is_none());
    }

    #[test]
    fn default_subnet_len_by_network_size() {
        assert_eq!(ok(r#"{"Network":"10.0.0.0/8"}"#).subnet_len, 24);
        assert_eq!(ok(r#"{"Network":"10.0.0.0/22"}"#).subnet_len, 24);
        let c = ok(r#"{"Network":"10.0.0.0/23"}"#);
        assert_eq!(c.subnet_len, 25);
        let c = ok(r#"{"Network":"10.0.0.0/28"}"#);
        assert_eq!(c.subnet_len, 30);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 0, 0, 4));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 0, 0, 12));
        assert_eq!(c.ipv4_pool().unwrap().count(), 3);
    }

    #[test]
    fn case_insensitive_keys_and_unknown_keys() {
        let c = ok(
            r#"{"network":"10.1.0.0/16","SUBNETLEN":26,"backend":{"type":"vxlan","vni":7,"directrouting":true},"Whatever":[1,2]}"#,
        );
        assert_eq!(c.network, Some("10.1.0.0/16".parse().unwrap()));
        assert_eq!(c.subnet_len, 26);
        match c.backend {
            BackendConfig::Vxlan(v) => {
                assert_eq!(v.vni, 7);
                assert!(v.direct_routing);
            }
            b => panic!("{b:?}"),
        }
        // The exact spelling wins over another casing.
        let c = ok(r#"{"network":"10.9.0.0/16","Network":"10.1.0.0/16"}"#);
        assert_eq!(c.network, Some("10.1.0.0/16".parse().unwrap()));
    }

    #[test]
    fn null_and_zero_mean_unset() {
        let c = ok(
            r#"{"Network":"10.244.0.0/16","SubnetLen":0,"SubnetMin":"0.0.0.0","SubnetMax":null,"Backend":null}"#,
        );
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 244, 255, 0));
        assert_eq!(c.backend_type(), "vxlan");
    }

    #[test]
    fn network_host_bits_are_cleared() {
        let c = ok(r#"{"Network":"10.244.3.7/16"}"#);
        assert_eq!(c.network, Some("10.244.0.0/16".parse().unwrap()));
    }

    #[test]
    fn explicit_min_max() {
        let c = ok(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.20.0"}"#,
        );
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 244, 10, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 244, 20, 0));
        assert_eq!(c.ipv4_pool().unwrap().count(), 11);
        // The first subnet may be chosen explicitly.
        let c = ok(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.0.0"}"#);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 244, 0, 0));
    }

    #[test]
    fn dual_stack_and_v6_only() {
        let c =
            ok(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#);
        assert_eq!(c.ipv6_subnet_len, 64);
        assert_eq!(
            c.ipv6_subnet_min,
            "fd00:10:244:1::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            c.ipv6_subnet_max,
            "fd00:10:244:ff::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(c.ipv6_pool().unwrap().count(), 255);

        let c = ok(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/120"}"#);
        assert!(c.network.is_none());
        assert_eq!(c.subnet_len, 0);
        assert_eq!(c.ipv6_subnet_len, 122);
        assert_eq!(c.ipv6_subnet_min, "fd00::40".parse::<Ipv6Addr>().unwrap());
        assert_eq!(c.ipv6_subnet_max, "fd00::c0".parse::<Ipv6Addr>().unwrap());

        let c = ok(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"::/0"}"#);
        assert_eq!(c.ipv6_subnet_len, 64);
        assert_eq!(c.ipv6_subnet_min, "0:0:0:1::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            c.ipv6_subnet_max,
            "ffff:ffff:ffff:ffff::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(c.ipv6_pool().unwrap().count(), u128::from(u64::MAX));
        let c = ok(r#"{"Network":"0.0.0.0/0"}"#);
        assert_eq!(c.subnet_max, Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.ipv4_pool().unwrap().count(), (1 << 24) - 1);
        let c = ok(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/62"}"#);
        assert_eq!(c.ipv6_subnet_len, 64);
        let c = ok(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/124","IPv6SubnetLen":126}"#,
        );
        assert_eq!(c.ipv6_subnet_len, 126);
        // IPv6 keys are ignored when IPv6 is off.
        let c = ok(r#"{"Network":"10.244.0.0/16","IPv6Network":"fd00::/56"}"#);
        assert!(c.ipv6_network.is_none());
    }

    #[test]
    fn backends() {
        let c = ok(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":4096,"Port":4789,"GBP":true,"Learning":true,"DirectRouting":true,"MTU":1400}}"#,
        );
        assert_eq!(
            c.backend,
            BackendConfig::Vxlan(VxlanConfig {
                vni: 4096,
                port: 4789,
                gbp: true,
                learning: true,
                direct_routing: true,
                mtu: Some(1400)
            })
        );
        let c = ok(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":16777215}}"#);
        assert_eq!(c.backend_type(), "vxlan");
        let c = ok(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw","Ignored":1}}"#);
        assert_eq!(c.backend, BackendConfig::HostGw);
        assert_eq!(c.backend_type(), "host-gw");
        let c = ok(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#);
        assert_eq!(
            c.backend,
            BackendConfig::Udp(UdpConfig {
                port: 8285,
                mtu: None
            })
        );
        assert_eq!(c.backend_type(), "udp");
        let c =
            ok(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp","Port":9000,"MTU":1300}}"#);
        assert_eq!(
            c.backend,
            BackendConfig::Udp(UdpConfig {
                port: 9000,
                mtu: Some(1300)
            })
        );
        // A Backend without Type is vxlan with its options.
        let c = ok(r#"{"Network":"10.244.0.0/16","Backend":{"VNI":3}}"#);
        assert_eq!(
            c.backend,
            BackendConfig::Vxlan(VxlanConfig {
                vni: 3,
                ..VxlanConfig::default()
            })
        );
    }

    #[test]
    fn mtu() {
        let vx = BackendConfig::default();
        assert_eq!(pod_mtu(&vx, 1500, false), 1450);
        assert_eq!(pod_mtu(&vx, 1500, true), 1430);
        assert_eq!(
            pod_mtu(&BackendConfig::Udp(UdpConfig::default()), 1500, false),
            1472
        );
        assert_eq!(pod_mtu(&BackendConfig::HostGw, 1500, false), 1500);
        assert_eq!(pod_mtu(&BackendConfig::HostGw, 9000, true), 9000);
        let fixed = BackendConfig::Vxlan(VxlanConfig {
            mtu: Some(1234),
            ..VxlanConfig::default()
        });
        assert_eq!(pod_mtu(&fixed, 1500, true), 1234);
        assert_eq!(pod_mtu(&vx, 20, false), 0);
        let c = ok(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp","MTU":1000}}"#);
        assert_eq!(c.pod_mtu(1500, false), 1000);
    }

    #[test]
    fn syntax_errors() {
        assert!(matches!(err("{", ""), ConfigError::Syntax { .. }));
        assert!(matches!(err("[1]", ""), ConfigError::NotAnObject { .. }));
        assert!(matches!(err("\"x\"", ""), ConfigError::NotAnObject { .. }));
    }

    #[test]
    fn wrong_types_name_the_field() {
        err(r#"{"Network":16}"#, "Network");
        err(
            r#"{"Network":"10.244.0.0/16","SubnetLen":"24"}"#,
            "SubnetLen",
        );
        err(
            r#"{"Network":"10.244.0.0/16","SubnetLen":24.5}"#,
            "SubnetLen",
        );
        err(r#"{"Network":"10.244.0.0/16","SubnetLen":-1}"#, "SubnetLen");
        err(r#"{"Network":"10.244.0.0/16","SubnetMin":1}"#, "SubnetMin");
        err(
            r#"{"Network":"10.244.0.0/16","SubnetMax":true}"#,
            "SubnetMax",
        );
        err(
            r#"{"Network":"10.244.0.0/16","EnableIPv4":"yes"}"#,
            "EnableIPv4",
        );
        err(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":1}"#,
            "EnableIPv6",
        );
        err(
            r#"{"Network":"10.244.0.0/16","EnableNFTables":"true"}"#,
            "EnableNFTables",
        );
        err(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":["fd00::/56"]}"#,
            "IPv6Network",
        );
        err(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetLen":"64"}"#,
            "IPv6SubnetLen",
        );
        err(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetMin":5}"#,
            "IPv6SubnetMin",
        );
        err(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetMax":{}}"#,
            "IPv6SubnetMax",
        );
        err(
            r#"{"Network":"10.244.0.0/16","Backend":"vxlan"}"#,
            "Backend",
        );
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":1}}"#,
            "Backend.Type",
        );
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":"1"}}"#,
            "Backend.VNI",
        );
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Port":"8472"}}"#,
            "Backend.Port",
        );
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","GBP":1}}"#,
            "Backend.GBP",
        );
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Learning":"no"}}"#,
            "Backend.Learning",
        );
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":0}}"#,
            "Backend.DirectRouting",
        );
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","MTU":"1400"}}"#,
            "Backend.MTU",
        );
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp","Port":[1]}}"#,
            "Backend.Port",
        );
    }

    #[test]
    fn invalid_cidrs_and_addresses() {
        err(r#"{"Network":"10.244.0.0"}"#, "Network");
        err(r#"{"Network":"10.244.0.0/33"}"#, "Network");
        err(r#"{"Network":"banana"}"#, "Network");
        let e = err(r#"{"Network":"fd00::/56"}"#, "Network");
        assert!(e.to_string().contains("IPv6Network"), "{e}");
        let e = err(
            r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"10.0.0.0/8"}"#,
            "IPv6Network",
        );
        assert!(e.to_string().contains("IPv4"), "{e}");
        err(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0/24"}"#,
            "SubnetMin",
        );
        err(
            r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.1"}"#,
            "SubnetMax",
        );
        err(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetMin":"fd00::zz"}"#,
            "IPv6SubnetMin",
        );
        err(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetMax":"10.0.0.1"}"#,
            "IPv6SubnetMax",
        );
    }

    #[test]
    fn missing_networks_and_families() {
        err(r#"{}"#, "Network");
        err(r#"{"Backend":{"Type":"vxlan"}}"#, "Network");
        err(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true}"#,
            "IPv6Network",
        );
        err(r#"{"EnableIPv4":false,"EnableIPv6":true}"#, "IPv6Network");
        let e = err(
            r#"{"EnableIPv4":false,"Network":"10.244.0.0/16"}"#,
            "EnableIPv4",
        );
        assert_eq!(e, ConfigError::NoFamily);
    }

    #[test]
    fn network_too_small() {
        let e = err(r#"{"Network":"10.0.0.0/29"}"#, "Network");
        assert!(e.to_string().contains("/28"), "{e}");
        err(r#"{"Network":"10.0.0.0/29","SubnetLen":30}"#, "Network");
        err(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/125"}"#,
            "IPv6Network",
        );
    }

    #[test]
    fn subnet_len_rules() {
        let e = err(r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#, "SubnetLen");
        assert_eq!(
            e.to_string(),
            "SubnetLen 31 is invalid: it must be between 18 (Network prefix + 2) and 30; set \"SubnetLen\" accordingly or omit it"
        );
        err(r#"{"Network":"10.244.0.0/16","SubnetLen":17}"#, "SubnetLen");
        err(
            r#"{"Network":"10.244.0.0/16","SubnetLen":300}"#,
            "SubnetLen",
        );
        assert_eq!(
            ok(r#"{"Network":"10.244.0.0/16","SubnetLen":18}"#).subnet_len,
            18
        );
        assert_eq!(
            ok(r#"{"Network":"10.244.0.0/16","SubnetLen":30}"#).subnet_len,
            30
        );
        let v6 = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetLen":LEN}"#;
        let e = err(&v6.replace("LEN", "127"), "IPv6SubnetLen");
        assert!(
            e.to_string()
                .contains("58 (IPv6Network prefix + 2) and 126"),
            "{e}"
        );
        err(&v6.replace("LEN", "57"), "IPv6SubnetLen");
        assert_eq!(ok(&v6.replace("LEN", "58")).ipv6_subnet_len, 58);
    }

    #[test]
    fn min_max_rules() {
        err(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.245.0.0"}"#,
            "SubnetMin",
        );
        err(
            r#"{"Network":"10.244.0.0/16","SubnetMax":"10.243.255.0"}"#,
            "SubnetMax",
        );
        let e = err(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.5"}"#,
            "SubnetMin",
        );
        assert!(
            e.to_string().contains("10.244.1.0"),
            "suggests the aligned address: {e}"
        );
        err(
            r#"{"Network":"10.244.0.0/16","SubnetLen":20,"SubnetMax":"10.244.17.0"}"#,
            "SubnetMax",
        );
        err(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.8.0"}"#,
            "SubnetMin",
        );
        err(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.255.0","SubnetMax":"10.244.1.0"}"#,
            "SubnetMin",
        );
        let v6 = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56",EXTRA}"#;
        err(
            &v6.replace("EXTRA", r#""IPv6SubnetMin":"fd01::""#),
            "IPv6SubnetMin",
        );
        err(
            &v6.replace("EXTRA", r#""IPv6SubnetMax":"fd00:0:0:1::1""#),
            "IPv6SubnetMax",
        );
        err(
            &v6.replace(
                "EXTRA",
                r#""IPv6SubnetMin":"fd00:0:0:9::","IPv6SubnetMax":"fd00:0:0:8::""#,
            ),
            "IPv6SubnetMin",
        );
        let c = ok(&v6.replace(
            "EXTRA",
            r#""IPv6SubnetMin":"fd00:0:0:8::","IPv6SubnetMax":"fd00:0:0:9::""#,
        ));
        assert_eq!(c.ipv6_pool().unwrap().count(), 2);
    }

    #[test]
    fn wireguard_options() {
        let c = ok(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#);
        assert_eq!(
            c.backend,
            BackendConfig::Wireguard(WireguardConfig::default())
        );
        assert_eq!(c.backend_type(), "wireguard");
        let BackendConfig::Wireguard(d) = &c.backend else {
            unreachable!()
        };
        assert_eq!((d.listen_port, d.listen_port_v6), (51820, 51821));
        assert_eq!(d.mode, WireguardMode::Separate);
        let psk = "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE=";
        let c = ok(&format!(
            r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"wireguard","ListenPort":5000,"ListenPortV6":5001,"PSK":"{psk}","PersistentKeepaliveInterval":25,"Mode":"auto","MTU":1400}}}}"#
        ));
        assert_eq!(
            c.backend,
            BackendConfig::Wireguard(WireguardConfig {
                listen_port: 5000,
                listen_port_v6: 5001,
                psk: Some(SecretKey(psk.parse().unwrap())),
                persistent_keepalive: 25,
                mode: WireguardMode::Auto,
                mtu: Some(1400),
                datapath: WireguardDatapath::Auto,
            })
        );
        // MTU is the underlay's: pods and devices get 80 less, as upstream.
        assert_eq!(c.pod_mtu(9000, false), 1320);
        let c = ok(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PSK":"","ListenPort":0}}"#,
        );
        assert_eq!(
            c.backend,
            BackendConfig::Wireguard(WireguardConfig::default())
        );
        assert_eq!(c.pod_mtu(1500, false), 1420);
        assert_eq!(
            c.pod_mtu(1500, true),
            1420,
            "80 for both underlays, as upstream"
        );
        for m in ["separate", "auto", "ipv4", "ipv6"] {
            let c = ok(&format!(
                r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"wireguard","Mode":"{m}"}}}}"#
            ));
            let BackendConfig::Wireguard(w) = c.backend else {
                unreachable!()
            };
            assert_eq!(w.mode.as_str(), m);
        }
        for m in ["auto", "kernel", "userspace"] {
            let c = ok(&format!(
                r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"wireguard","Datapath":"{m}"}}}}"#
            ));
            let BackendConfig::Wireguard(w) = c.backend else {
                unreachable!()
            };
            assert_eq!(w.datapath.as_str(), m);
        }
        // The PSK is never printed.
        let c = ok(&format!(
            r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"wireguard","PSK":"{psk}"}}}}"#
        ));
        assert!(!format!("{c:?}").contains(psk));
    }

    #[test]
    fn wireguard_errors_name_the_field() {
        let e = err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","Mode":"both"}}"#,
            "Backend.Mode",
        );
        assert!(e.to_string().contains("\"separate\", \"auto\""), "{e}");
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","Mode":"Separate"}}"#,
            "Backend.Mode",
        );
        let e = err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","Datapath":"boringtun"}}"#,
            "Backend.Datapath",
        );
        assert!(e.to_string().contains("\"kernel\", \"userspace\""), "{e}");
        let e = err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PSK":"secret"}}"#,
            "Backend.PSK",
        );
        assert!(e.to_string().contains("wg genpsk"), "{e}");
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PSK":42}}"#,
            "Backend.PSK",
        );
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","ListenPort":70000}}"#,
            "Backend.ListenPort",
        );
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","ListenPortV6":-1}}"#,
            "Backend.ListenPortV6",
        );
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PersistentKeepaliveInterval":65536}}"#,
            "Backend.PersistentKeepaliveInterval",
        );
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PersistentKeepaliveInterval":"25s"}}"#,
            "Backend.PersistentKeepaliveInterval",
        );
        let e = err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","MTU":100}}"#,
            "Backend.MTU",
        );
        assert!(e.to_string().contains("148"), "{e}");
    }

    #[test]
    fn backend_errors() {
        let e = err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"ipip"}}"#,
            "Backend.Type",
        );
        assert!(
            e.to_string().contains("not supported by flannel-rs yet"),
            "{e}"
        );
        let e = err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"VXLAN"}}"#,
            "Backend.Type",
        );
        assert!(matches!(e, ConfigError::UnknownBackend { .. }));
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"alloc"}}"#,
            "Backend.Type",
        );
        let e = err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#,
            "Backend.VNI",
        );
        assert!(e.to_string().contains("16777215"), "{e}");
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Port":65536}}"#,
            "Backend.Port",
        );
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp","Port":70000}}"#,
            "Backend.Port",
        );
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","MTU":67}}"#,
            "Backend.MTU",
        );
        err(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp","MTU":65536}}"#,
            "Backend.MTU",
        );
    }

    #[test]
    fn from_str_matches_parse() {
        let s = r#"{"Network":"10.244.0.0/16"}"#;
        assert_eq!(s.parse::<NetConfig>().unwrap(), parse(s).unwrap());
    }

    #[test]
    fn random_inputs_never_panic_and_valid_ones_are_consistent() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let mut oks = 0;
        for _ in 0..3000 {
            let a: u32 = rng.random();
            let p4 = rng.random_range(0..=32u8);
            let l4 = if rng.random_bool(0.5) {
                0
            } else {
                rng.random_range(p4..=33u8)
            };
            let b: u128 = rng.random();
            let p6 = rng.random_range(0..=128u8);
            let l6 = if rng.random_bool(0.5) {
                0
            } else {
                rng.random_range(p6..=129u8)
            };
            let mut j = format!(
                r#"{{"Network":"{}/{p4}","SubnetLen":{l4},"EnableIPv6":true,"IPv6Network":"{}/{p6}","IPv6SubnetLen":{l6}"#,
                Ipv4Addr::from(a),
                Ipv6Addr::from(b)
            );
            if rng.random_bool(0.3) {
                let m = a & rng.random::<u32>();
                j.push_str(&format!(r#","SubnetMin":"{}""#, Ipv4Addr::from(m)));
            }
            j.push('}');
            match parse(&j) {
                Ok(c) => {
                    oks += 1;
                    let p4 = c.ipv4_pool().expect("consistent IPv4 pool");
                    let p6 = c.ipv6_pool().expect("consistent IPv6 pool");
                    assert!(p4.count() >= 1 && p6.count() >= 1);
                    assert!(p4.is_valid(&p4.min()) && p4.is_valid(&p4.max()));
                    assert!(p6.is_valid(&p6.min()) && p6.is_valid(&p6.max()));
                }
                Err(e) => assert!(!e.field().is_empty(), "{j}: {e}"),
            }
        }
        assert!(oks > 300, "only {oks} valid configs drawn");
    }
}
