//! The CNI protocol (spec 0.1.0 .. 1.1.0): versions, the result of ADD in the
//! shape each version expects, and the error object with its codes.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{json, Map, Value};

/// Every version this plugin answers in, oldest first (what VERSION lists).
pub const SUPPORTED_VERSIONS: &[&str] = &[
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

/// The newest version; used for errors when the request names none we know.
pub const LATEST_VERSION: &str = "1.1.0";

/// A CNI spec version, compared numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u16, pub u16, pub u16);

impl Version {
    pub const V0_3_0: Version = Version(0, 3, 0);
    pub const V0_4_0: Version = Version(0, 4, 0);
    pub const V1_0_0: Version = Version(1, 0, 0);
    pub const V1_1_0: Version = Version(1, 1, 0);

    /// Parses `MAJOR.MINOR.PATCH`; an empty string means 0.1.0, as the spec
    /// says for configs written before `cniVersion` existed.
    pub fn parse(s: &str) -> Option<Version> {
        if s.is_empty() {
            return Some(Version(0, 1, 0));
        }
        let mut it = s.split('.').map(|p| p.parse::<u16>().ok());
        let v = Version(it.next()??, it.next()??, it.next()??);
        if it.next().is_some() {
            return None;
        }
        Some(v)
    }

    /// Whether this plugin can answer in this version.
    pub fn is_supported(&self) -> bool {
        SUPPORTED_VERSIONS
            .iter()
            .any(|s| Version::parse(s) == Some(*self))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// Well-known error codes of the spec; 100 and above are ours.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables (CNI_COMMAND, CNI_CONTAINERID, ...).
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure (files on the node).
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content (stdin is not JSON, prevResult unreadable).
    pub const DECODING_FAILURE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later (a transient condition: flanneld has not written subnet.env yet).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADDs now.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// No address left in the node's subnet.
    pub const ADDRESSES_EXHAUSTED: u32 = 100;
    /// The interface named by CNI_IFNAME already exists in the pod namespace.
    pub const INTERFACE_EXISTS: u32 = 101;
    /// A kernel (netlink or namespace) operation failed.
    pub const KERNEL_FAILURE: u32 = 102;
    /// CHECK found the attachment different from prevResult.
    pub const CHECK_FAILED: u32 = 103;
}

/// The error object every verb prints on stdout on failure (exit status 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }
    /// `{"cniVersion":..,"code":..,"msg":..,"details":..}`; `details` is left
    /// out when empty, as the spec makes it optional.
    pub fn to_json(&self, version: &str) -> Value {
        let mut m = Map::new();
        m.insert("cniVersion".into(), json!(version));
        m.insert("code".into(), json!(self.code));
        m.insert("msg".into(), json!(self.msg));
        if !self.details.is_empty() {
            m.insert("details".into(), json!(self.details));
        }
        Value::Object(m)
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

/// One interface of the result (`interfaces[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// The namespace path for interfaces inside the pod.
    pub sandbox: Option<String>,
}

/// One address of the result (`ips[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// Address with the subnet's prefix length, `10.244.1.2/24`.
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    pub interface: Option<usize>,
}

/// One route of the result (`routes[]`), also the IPAM `routes` input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
}

/// The result of ADD, independent of the version it is printed in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AddResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<RouteSpec>,
    /// The `dns` object, passed through from the IPAM config (usually `{}`).
    pub dns: Value,
}

fn route_json(r: &RouteSpec) -> Value {
    let mut m = Map::new();
    m.insert("dst".into(), json!(r.dst.to_string()));
    if let Some(gw) = r.gw {
        m.insert("gw".into(), json!(gw.to_string()));
    }
    Value::Object(m)
}

fn dns_json(dns: &Value) -> Value {
    match dns {
        Value::Object(_) => dns.clone(),
        _ => json!({}),
    }
}

impl AddResult {
    /// The result in the shape `version` defines: 0.3.0 and later have
    /// `interfaces`/`ips`/`routes` (0.3.x and 0.4.0 with `version` "4"/"6" in
    /// each ip), 0.1.0/0.2.0 have `ip4`/`ip6` each carrying its routes.
    pub fn encode(&self, version: Version) -> Value {
        let v = version.to_string();
        if version < Version::V0_3_0 {
            return self.encode_legacy(&v);
        }
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut m = Map::new();
                m.insert("name".into(), json!(i.name));
                m.insert("mac".into(), json!(i.mac));
                if let Some(s) = &i.sandbox {
                    m.insert("sandbox".into(), json!(s));
                }
                Value::Object(m)
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut m = Map::new();
                if version < Version::V1_0_0 {
                    let fam = if ip.address.addr().is_ipv4() {
                        "4"
                    } else {
                        "6"
                    };
                    m.insert("version".into(), json!(fam));
                }
                if let Some(i) = ip.interface {
                    m.insert("interface".into(), json!(i));
                }
                m.insert("address".into(), json!(ip.address.to_string()));
                if let Some(gw) = ip.gateway {
                    m.insert("gateway".into(), json!(gw.to_string()));
                }
                Value::Object(m)
            })
            .collect();
        let routes: Vec<Value> = self.routes.iter().map(route_json).collect();
        json!({
            "cniVersion": v,
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
            "dns": dns_json(&self.dns),
        })
    }

    fn encode_legacy(&self, v: &str) -> Value {
        let mut out = Map::new();
        out.insert("cniVersion".into(), json!(v));
        for (key, want_v4) in [("ip4", true), ("ip6", false)] {
            // The old shape has one address per family.
            let Some(ip) = self
                .ips
                .iter()
                .find(|ip| ip.address.addr().is_ipv4() == want_v4)
            else {
                continue;
            };
            let routes: Vec<Value> = self
                .routes
                .iter()
                .filter(|r| r.dst.addr().is_ipv4() == want_v4)
                .map(route_json)
                .collect();
            let mut m = Map::new();
            m.insert("ip".into(), json!(ip.address.to_string()));
            if let Some(gw) = ip.gateway {
                m.insert("gateway".into(), json!(gw.to_string()));
            }
            if !routes.is_empty() {
                m.insert("routes".into(), Value::Array(routes));
            }
            out.insert(key.into(), Value::Object(m));
        }
        out.insert("dns".into(), dns_json(&self.dns));
        Value::Object(out)
    }

    /// Reads a `prevResult` (0.3.0 and later shapes; CHECK exists only from 0.4.0).
    pub fn decode(v: &Value) -> Result<AddResult, String> {
        let obj = v
            .as_object()
            .ok_or_else(|| "prevResult: expected a JSON object".to_string())?;
        let mut r = AddResult {
            dns: obj.get("dns").cloned().unwrap_or_else(|| json!({})),
            ..Default::default()
        };
        let arr = |k: &str| -> Result<Vec<Value>, String> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(a)) => Ok(a.clone()),
                Some(_) => Err(format!("prevResult.{k}: expected an array")),
            }
        };
        let str_of = |o: &Value, path: &str, k: &str| -> Result<Option<String>, String> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("{path}.{k}: expected a string")),
            }
        };
        for (n, i) in arr("interfaces")?.iter().enumerate() {
            let path = format!("prevResult.interfaces[{n}]");
            r.interfaces.push(Interface {
                name: str_of(i, &path, "name")?.ok_or_else(|| format!("{path}.name: missing"))?,
                mac: str_of(i, &path, "mac")?.unwrap_or_default(),
                sandbox: str_of(i, &path, "sandbox")?,
            });
        }
        for (n, ip) in arr("ips")?.iter().enumerate() {
            let path = format!("prevResult.ips[{n}]");
            let addr =
                str_of(ip, &path, "address")?.ok_or_else(|| format!("{path}.address: missing"))?;
            let address: IpNet = addr.parse().map_err(|_| {
                format!("{path}.address: {addr:?} is not an address with prefix length")
            })?;
            let gateway = match str_of(ip, &path, "gateway")? {
                Some(g) => Some(
                    g.parse()
                        .map_err(|_| format!("{path}.gateway: {g:?} is not an IP address"))?,
                ),
                None => None,
            };
            let interface = match ip.get("interface") {
                None | Some(Value::Null) => None,
                Some(x) => Some(
                    x.as_u64()
                        .ok_or_else(|| format!("{path}.interface: expected an index"))?
                        as usize,
                ),
            };
            r.ips.push(IpConfig {
                address,
                gateway,
                interface,
            });
        }
        for (n, rt) in arr("routes")?.iter().enumerate() {
            r.routes
                .push(parse_route(rt, &format!("prevResult.routes[{n}]"))?);
        }
        Ok(r)
    }
}

/// Parses `{"dst": "10.244.0.0/16", "gw": "10.244.1.1"}`; `path` names it in errors.
pub fn parse_route(v: &Value, path: &str) -> Result<RouteSpec, String> {
    let dst = v.get("dst").and_then(Value::as_str).ok_or_else(|| {
        format!("{path}.dst: missing; give a destination such as \"10.244.0.0/16\"")
    })?;
    let dst: IpNet = dst
        .parse()
        .map_err(|_| format!("{path}.dst: {dst:?} is not a CIDR such as \"10.244.0.0/16\""))?;
    let gw = match v.get("gw") {
        None | Some(Value::Null) => None,
        Some(Value::String(g)) => Some(
            g.parse::<IpAddr>()
                .map_err(|_| format!("{path}.gw: {g:?} is not an IP address"))?,
        ),
        Some(_) => return Err(format!("{path}.gw: expected a string")),
    };
    Ok(RouteSpec { dst, gw })
}

/// The answer to VERSION.
pub fn version_info(version: &str) -> Value {
    json!({ "cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AddResult {
        AddResult {
            interfaces: vec![
                Interface {
                    name: "cni0".into(),
                    mac: "aa:bb:cc:dd:ee:01".into(),
                    sandbox: None,
                },
                Interface {
                    name: "veth12345678".into(),
                    mac: "aa:bb:cc:dd:ee:02".into(),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: "aa:bb:cc:dd:ee:03".into(),
                    sandbox: Some("/run/netns/p".into()),
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.2/24".parse().unwrap(),
                gateway: Some("10.244.1.1".parse().unwrap()),
                interface: Some(2),
            }],
            routes: vec![
                RouteSpec {
                    dst: "10.244.0.0/16".parse().unwrap(),
                    gw: None,
                },
                RouteSpec {
                    dst: "0.0.0.0/0".parse().unwrap(),
                    gw: Some("10.244.1.1".parse().unwrap()),
                },
            ],
            dns: json!({}),
        }
    }

    #[test]
    fn versions_parse_and_compare() {
        assert_eq!(Version::parse("0.3.1"), Some(Version(0, 3, 1)));
        assert_eq!(Version::parse(""), Some(Version(0, 1, 0)));
        assert_eq!(Version::parse("1.1"), None);
        assert_eq!(Version::parse("1.1.0.1"), None);
        assert_eq!(Version::parse("x.1.0"), None);
        assert!(Version(0, 3, 1) < Version::V0_4_0);
        assert!(Version(1, 1, 0).is_supported());
        assert!(Version(0, 1, 0).is_supported());
        assert!(!Version(2, 0, 0).is_supported());
        assert!(!Version(0, 3, 2).is_supported());
    }

    #[test]
    fn encode_1_x() {
        for v in ["1.0.0", "1.1.0"] {
            let out = sample().encode(Version::parse(v).unwrap());
            assert_eq!(out["cniVersion"], v);
            assert_eq!(out["interfaces"].as_array().unwrap().len(), 3);
            assert_eq!(out["interfaces"][2]["sandbox"], "/run/netns/p");
            assert!(out["interfaces"][0].get("sandbox").is_none());
            assert_eq!(out["ips"][0]["address"], "10.244.1.2/24");
            assert_eq!(out["ips"][0]["gateway"], "10.244.1.1");
            assert_eq!(out["ips"][0]["interface"], 2);
            assert!(out["ips"][0].get("version").is_none());
            assert_eq!(out["routes"][0], json!({"dst": "10.244.0.0/16"}));
            assert_eq!(
                out["routes"][1],
                json!({"dst": "0.0.0.0/0", "gw": "10.244.1.1"})
            );
            assert_eq!(out["dns"], json!({}));
        }
    }

    #[test]
    fn encode_0_3_and_0_4_carry_ip_version() {
        for v in ["0.3.0", "0.3.1", "0.4.0"] {
            let out = sample().encode(Version::parse(v).unwrap());
            assert_eq!(out["cniVersion"], v);
            assert_eq!(out["ips"][0]["version"], "4");
            assert_eq!(out["ips"][0]["interface"], 2);
            assert_eq!(out["routes"].as_array().unwrap().len(), 2);
        }
        let mut r = sample();
        r.ips.push(IpConfig {
            address: "fd00:10:244:1::2/64".parse().unwrap(),
            gateway: Some("fd00:10:244:1::1".parse().unwrap()),
            interface: Some(2),
        });
        let out = r.encode(Version(0, 3, 1));
        assert_eq!(out["ips"][1]["version"], "6");
    }

    #[test]
    fn encode_legacy_0_1_and_0_2() {
        for v in ["0.1.0", "0.2.0"] {
            let mut r = sample();
            r.ips.push(IpConfig {
                address: "fd00::2/64".parse().unwrap(),
                gateway: None,
                interface: Some(2),
            });
            r.routes.push(RouteSpec {
                dst: "::/0".parse().unwrap(),
                gw: None,
            });
            let out = r.encode(Version::parse(v).unwrap());
            assert_eq!(out["cniVersion"], v);
            assert!(out.get("interfaces").is_none());
            assert!(out.get("ips").is_none());
            assert_eq!(out["ip4"]["ip"], "10.244.1.2/24");
            assert_eq!(out["ip4"]["gateway"], "10.244.1.1");
            assert_eq!(out["ip4"]["routes"].as_array().unwrap().len(), 2);
            assert_eq!(out["ip6"]["ip"], "fd00::2/64");
            assert!(out["ip6"].get("gateway").is_none());
            assert_eq!(out["ip6"]["routes"], json!([{"dst": "::/0"}]));
            assert_eq!(out["dns"], json!({}));
        }
    }

    #[test]
    fn decode_round_trips_new_shapes() {
        for v in ["0.4.0", "1.0.0", "1.1.0"] {
            let r = sample();
            let back = AddResult::decode(&r.encode(Version::parse(v).unwrap())).unwrap();
            assert_eq!(back, r);
        }
        let e = AddResult::decode(&json!({"ips": [{"address": "10.0.0.1"}]})).unwrap_err();
        assert!(e.contains("prevResult.ips[0].address"), "{e}");
    }

    #[test]
    fn error_json_shape() {
        let e =
            CniError::new(code::TRY_AGAIN_LATER, "no subnet.env").with_details("check flanneld");
        assert_eq!(
            e.to_json("1.0.0"),
            json!({"cniVersion": "1.0.0", "code": 11, "msg": "no subnet.env", "details": "check flanneld"})
        );
        let e = CniError::new(code::INVALID_CONFIG, "x");
        assert!(e.to_json("1.0.0").get("details").is_none());
    }

    #[test]
    fn version_answer_lists_all() {
        let v = version_info("1.1.0");
        assert_eq!(
            v["supportedVersions"].as_array().unwrap().len(),
            SUPPORTED_VERSIONS.len()
        );
        assert_eq!(v["supportedVersions"][0], "0.1.0");
    }
}
