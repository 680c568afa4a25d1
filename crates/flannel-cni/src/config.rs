//! The plugin's network configuration (stdin), subnet.env, and the bridge +
//! host-local configuration rendered from both, exactly as upstream's flannel
//! plugin renders the config it hands to its delegate. We do not exec a
//! delegate: the rendered config is saved (so DEL sees what ADD did) and
//! drives the native bridge/IPAM code through [`BridgeConf`].

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use flannel_core::subnet_env::SubnetEnv;
use flannel_core::wire;
use ipnet::IpNet;
use serde_json::{json, Map, Value};

use crate::spec::{self, code, CniError, RouteSpec, Version};

/// Errors reading the configuration or subnet.env, each naming the field and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("network configuration on stdin is not valid JSON: {0}")]
    NotJson(String),
    #[error("network configuration field {field}: {msg}")]
    Invalid { field: String, msg: String },
    #[error("cniVersion {0:?} is not supported; use one of {supported}", supported = spec::SUPPORTED_VERSIONS.join(", "))]
    UnsupportedVersion(String),
    #[error("{path}: cannot read the flannel subnet file ({source}); check that flanneld is running on this node and writes its subnet file there (plugin option subnetFile)")]
    SubnetEnvMissing {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}; check that flanneld is running on this node and healthy")]
    SubnetEnvInvalid { path: String, msg: String },
}

impl From<ConfigError> for CniError {
    fn from(e: ConfigError) -> CniError {
        let c = match &e {
            ConfigError::NotJson(_) => code::DECODING_FAILURE,
            ConfigError::Invalid { .. } => code::INVALID_CONFIG,
            ConfigError::UnsupportedVersion(_) => code::INCOMPATIBLE_VERSION,
            // flanneld writes the file once it holds a lease: the runtime should retry.
            ConfigError::SubnetEnvMissing { .. } | ConfigError::SubnetEnvInvalid { .. } => {
                code::TRY_AGAIN_LATER
            }
        };
        CniError::new(c, e.to_string())
    }
}

fn invalid(field: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        msg: msg.into(),
    }
}

/// The plugin's own configuration, as the runtime passes it on stdin.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub name: String,
    /// `cniVersion` as written (the version to answer in).
    pub cni_version: String,
    pub version: Version,
    /// `subnetFile` (default /run/flannel/subnet.env).
    pub subnet_file: PathBuf,
    /// `dataDir` for saved delegate configs (default /var/lib/cni/flannel).
    pub data_dir: PathBuf,
    /// `delegate`: keys merged into the rendered bridge config.
    pub delegate: Map<String, Value>,
    /// `ipam`: base of the rendered IPAM section.
    pub ipam: Map<String, Value>,
    pub runtime_config: Option<Value>,
    pub prev_result: Option<Value>,
    /// `cni.dev/valid-attachments` (GC input).
    pub valid_attachments: Option<Vec<(String, String)>>,
}

fn opt_str(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, ConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid(key, "expected a string")),
    }
}

fn opt_obj(obj: &Map<String, Value>, key: &str) -> Result<Map<String, Value>, ConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m.clone()),
        Some(_) => Err(invalid(key, "expected a JSON object")),
    }
}

/// The spec's network name (`^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`, as libcni
/// checks it): the name becomes a directory below the IPAM dataDir, so
/// anything else (`..`, `a/../../etc`) could put files outside it.
fn check_network_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?} is not a network name: use letters, digits, '_', '.' and '-', starting with a letter or digit"),
        ))
    }
}

/// Reads only `cniVersion`, for answering errors and VERSION in the caller's
/// version even when the rest of the config is broken.
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    Some(v.get("cniVersion")?.as_str()?.to_string())
}

/// The top-level JSON object of a configuration.
fn json_object(bytes: &[u8]) -> Result<Map<String, Value>, ConfigError> {
    match serde_json::from_slice(bytes).map_err(|e| ConfigError::NotJson(e.to_string()))? {
        Value::Object(m) => Ok(m),
        _ => Err(ConfigError::NotJson("expected a JSON object".into())),
    }
}

/// `name`, required and non-empty.
fn network_name(obj: &Map<String, Value>) -> Result<String, ConfigError> {
    opt_str(obj, "name")?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("name", "missing; give the network a name such as \"cbr0\""))
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<NetConf, ConfigError> {
        let obj = &json_object(stdin)?;
        let cni_version = opt_str(obj, "cniVersion")?.unwrap_or_default();
        let version = Version::parse(&cni_version)
            .filter(Version::is_supported)
            .ok_or_else(|| ConfigError::UnsupportedVersion(cni_version.clone()))?;
        let name = network_name(obj)?;
        check_network_name("name", &name)?;
        let plugin_type = opt_str(obj, "type")?.unwrap_or_default();
        if plugin_type != "flannel" {
            return Err(invalid(
                "type",
                format!("{plugin_type:?}: this plugin is \"flannel\"; set \"type\": \"flannel\""),
            ));
        }
        let subnet_file =
            opt_str(obj, "subnetFile")?.unwrap_or_else(|| wire::DEFAULT_SUBNET_FILE.into());
        let data_dir =
            opt_str(obj, "dataDir")?.unwrap_or_else(|| wire::CNI_DEFAULT_DATA_DIR.into());
        let delegate = opt_obj(obj, "delegate")?;
        let ipam = opt_obj(obj, "ipam")?;
        let valid_attachments = match obj.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => {
                let mut out = Vec::new();
                for (i, e) in a.iter().enumerate() {
                    let field = format!("cni.dev/valid-attachments[{i}]");
                    let id = e.get("containerID").and_then(Value::as_str);
                    let ifname = e.get("ifname").and_then(Value::as_str);
                    match (id, ifname) {
                        (Some(id), Some(ifname)) => out.push((id.to_string(), ifname.to_string())),
                        _ => {
                            return Err(invalid(
                                &field,
                                "expected {\"containerID\": .., \"ifname\": ..}",
                            ))
                        }
                    }
                }
                Some(out)
            }
            Some(_) => return Err(invalid("cni.dev/valid-attachments", "expected an array")),
        };
        Ok(NetConf {
            name,
            cni_version,
            version,
            subnet_file: subnet_file.into(),
            data_dir: data_dir.into(),
            delegate,
            ipam,
            runtime_config: obj.get("runtimeConfig").cloned(),
            prev_result: obj.get("prevResult").cloned(),
            valid_attachments,
        })
    }

    /// The delegate config upstream would hand to the bridge plugin:
    /// `name`, `type` bridge, `bridge` cni0, `mtu`, `ipMasq` = !FLANNEL_IPMASQ,
    /// `isGateway` true, then the `delegate` keys on top, `cniVersion`, and an
    /// `ipam` section of type host-local built on the input `ipam` with the
    /// node subnet(s) as ranges and routes to the cluster network(s) appended.
    pub fn render_delegate(&self, env: &SubnetEnv) -> Result<Value, ConfigError> {
        let mut d = Map::new();
        d.insert("type".into(), json!("bridge"));
        d.insert("bridge".into(), json!(wire::CNI_BRIDGE));
        d.insert("mtu".into(), json!(env.mtu));
        d.insert("ipMasq".into(), json!(!env.ipmasq));
        d.insert("isGateway".into(), json!(true));
        for (k, v) in &self.delegate {
            d.insert(k.clone(), v.clone());
        }
        d.insert("name".into(), json!(self.name));
        d.insert("cniVersion".into(), json!(self.cni_version));

        let mut ipam = self.ipam.clone();
        ipam.entry("type").or_insert_with(|| json!("host-local"));
        let mut ranges = Vec::new();
        let mut routes = match ipam.get("routes") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(_) => return Err(invalid("ipam.routes", "expected an array of {\"dst\": ..}")),
        };
        if let Some(sn) = env.subnet {
            ranges.push(json!([{ "subnet": sn.trunc().to_string() }]));
        }
        if let Some(sn) = env.ipv6_subnet {
            ranges.push(json!([{ "subnet": sn.trunc().to_string() }]));
        }
        if let Some(nw) = env.network {
            routes.push(json!({ "dst": nw.to_string() }));
        }
        if let Some(nw) = env.ipv6_network {
            routes.push(json!({ "dst": nw.to_string() }));
        }
        ipam.insert("ranges".into(), Value::Array(ranges));
        ipam.insert("routes".into(), Value::Array(routes));
        d.insert("ipam".into(), Value::Object(ipam));
        if let Some(rc) = &self.runtime_config {
            d.insert("runtimeConfig".into(), rc.clone());
        }
        Ok(Value::Object(d))
    }

    /// The IPAM directory of this network, `<ipam.dataDir>/<name>`, from the
    /// input config alone (DEL and GC must work without subnet.env).
    pub fn ipam_network_dir(&self) -> Result<PathBuf, ConfigError> {
        let base = opt_str(&self.ipam, "dataDir")
            .map_err(|_| invalid("ipam.dataDir", "expected a string"))?
            .unwrap_or_else(|| wire::CNI_DEFAULT_IPAM_DIR.into());
        Ok(Path::new(&base).join(&self.name))
    }
}

/// A network configuration list (`/etc/cni/net.d/10-flannel.conflist`) as a
/// runtime reads it, with the flannel entry parsed by this plugin's parser.
#[derive(Debug, Clone)]
pub struct ConfList {
    /// The list's `name` (the network name every plugin receives).
    pub name: String,
    /// The list's `cniVersion`.
    pub cni_version: String,
    /// Each entry's `type`, in order.
    pub plugin_types: Vec<String>,
    /// Index in `plugins` of the first entry of type `flannel`.
    pub flannel_index: usize,
    /// That entry as this plugin receives it on stdin.
    pub flannel: NetConf,
}

/// Parses a conflist and its `flannel` entry exactly as this plugin would
/// receive it: like a runtime (libcni), the list's `name` and `cniVersion`
/// are set in the entry, then [`NetConf::parse`] reads it, and its bridge
/// config is rendered against a sample subnet.env and read back, so that a
/// bad `delegate` key is reported now and not at the first pod's ADD.
/// Errors name the field as `plugins[I].FIELD`. For installers
/// (`flannelctl install-cni`) and the manifest test; the plugin itself never
/// sees a list.
pub fn parse_conflist(bytes: &[u8]) -> Result<ConfList, ConfigError> {
    let obj = &json_object(bytes)?;
    let name = network_name(obj)?;
    let cni_version = opt_str(obj, "cniVersion")?.unwrap_or_default();
    let plugins = match obj.get("plugins") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(invalid("plugins", "the list is empty")),
        None | Some(Value::Null) => {
            return Err(invalid(
                "plugins",
                "missing; a conflist holds its plugins in \"plugins\": [...]",
            ))
        }
        Some(_) => return Err(invalid("plugins", "expected an array of plugin objects")),
    };
    let mut plugin_types = Vec::with_capacity(plugins.len());
    for (i, p) in plugins.iter().enumerate() {
        let field = format!("plugins[{i}].type");
        let t = p
            .as_object()
            .ok_or_else(|| invalid(&format!("plugins[{i}]"), "expected a JSON object"))?
            .get("type")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| invalid(&field, "missing; every plugin names its binary in \"type\""))?;
        plugin_types.push(t.to_string());
    }
    let flannel_index = plugin_types
        .iter()
        .position(|t| t == wire::CNI_PLUGIN_TYPE)
        .ok_or_else(|| {
            invalid(
                "plugins",
                format!(
                    "no entry of \"type\": \"{}\" (types: {}); add one",
                    wire::CNI_PLUGIN_TYPE,
                    plugin_types.join(", ")
                ),
            )
        })?;
    let mut entry = plugins[flannel_index]
        .as_object()
        .cloned()
        .unwrap_or_default();
    entry.insert("name".into(), json!(name));
    entry.insert("cniVersion".into(), json!(cni_version));
    let in_entry = |e: ConfigError| match e {
        ConfigError::Invalid { field, msg } => ConfigError::Invalid {
            field: format!("plugins[{flannel_index}].{field}"),
            msg,
        },
        other => other,
    };
    let entry = serde_json::to_vec(&Value::Object(entry))
        .map_err(|e| ConfigError::NotJson(e.to_string()))?;
    let flannel = NetConf::parse(&entry).map_err(in_entry)?;
    // Which addresses does not matter: only the delegate keys' types are checked.
    let sample = SubnetEnv::parse(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )
    .map_err(|e| ConfigError::SubnetEnvInvalid {
        path: "(sample)".into(),
        msg: e.to_string(),
    })?;
    let rendered = flannel.render_delegate(&sample).map_err(in_entry)?;
    BridgeConf::from_rendered(&rendered).map_err(in_entry)?;
    Ok(ConfList {
        name,
        cni_version,
        plugin_types,
        flannel_index,
        flannel,
    })
}

/// Reads and validates subnet.env (parsed by flannel-core, the same code
/// flanneld renders it with); every problem tells the operator to check flanneld.
pub fn load_subnet_env(path: &Path) -> Result<SubnetEnv, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SubnetEnvMissing {
        path: path.display().to_string(),
        source,
    })?;
    SubnetEnv::parse(&text).map_err(|e| ConfigError::SubnetEnvInvalid {
        path: path.display().to_string(),
        msg: e.to_string(),
    })
}

/// One host-local range: addresses from `range_start` to `range_end` of `subnet`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// The subnet, truncated to its network address.
    pub subnet: IpNet,
    pub range_start: IpAddr,
    pub range_end: IpAddr,
    pub gateway: IpAddr,
}

/// The host-local section of the rendered config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamConf {
    /// `<dataDir>/<network name>`.
    pub network_dir: PathBuf,
    /// One range set per address family; each set is tried range by range.
    pub range_sets: Vec<Vec<Range>>,
    pub routes: Vec<RouteSpec>,
    pub dns: Value,
}

/// The typed view of the rendered bridge config that ADD/DEL/CHECK act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConf {
    pub name: String,
    pub bridge: String,
    pub mtu: Option<u32>,
    pub is_gateway: bool,
    pub is_default_gateway: bool,
    pub hairpin: bool,
    pub ip_masq: bool,
    pub ipam: IpamConf,
}

fn bool_field(
    obj: &Map<String, Value>,
    key: &str,
    field: &str,
) -> Result<Option<bool>, ConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(invalid(field, "expected true or false")),
    }
}

fn parse_ip(v: Option<&Value>, field: &str) -> Result<Option<IpAddr>, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| invalid(field, format!("{s:?} is not an IP address"))),
        Some(_) => Err(invalid(field, "expected an IP address string")),
    }
}

fn next_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(a) => IpAddr::V4(u32::from(a).wrapping_add(1).into()),
        IpAddr::V6(a) => IpAddr::V6(u128::from(a).wrapping_add(1).into()),
    }
}

fn parse_range(v: &Value, field: &str) -> Result<Range, ConfigError> {
    let obj = v
        .as_object()
        .ok_or_else(|| invalid(field, "expected {\"subnet\": \"10.244.1.0/24\"}"))?;
    let s = obj.get("subnet").and_then(Value::as_str).ok_or_else(|| {
        invalid(
            &format!("{field}.subnet"),
            "missing; give a CIDR such as \"10.244.1.0/24\"",
        )
    })?;
    let subnet: IpNet = s
        .parse()
        .map_err(|_| invalid(&format!("{field}.subnet"), format!("{s:?} is not a CIDR")))?;
    let subnet = subnet.trunc();
    let (first, last) = match subnet {
        IpNet::V4(n) => {
            if n.prefix_len() > 30 {
                return Err(invalid(
                    &format!("{field}.subnet"),
                    format!("{n} is too small: a /30 or larger is needed for a gateway and a pod"),
                ));
            }
            // The network and broadcast addresses are never handed out.
            (
                next_ip(IpAddr::V4(n.network())),
                IpAddr::V4((u32::from(n.broadcast()) - 1).into()),
            )
        }
        IpNet::V6(n) => {
            if n.prefix_len() > 126 {
                return Err(invalid(
                    &format!("{field}.subnet"),
                    format!("{n} is too small"),
                ));
            }
            (next_ip(IpAddr::V6(n.network())), IpAddr::V6(n.broadcast()))
        }
    };
    let range_start =
        parse_ip(obj.get("rangeStart"), &format!("{field}.rangeStart"))?.unwrap_or(first);
    let range_end = parse_ip(obj.get("rangeEnd"), &format!("{field}.rangeEnd"))?.unwrap_or(last);
    let gateway = parse_ip(obj.get("gateway"), &format!("{field}.gateway"))?.unwrap_or(first);
    for (k, ip) in [
        ("rangeStart", range_start),
        ("rangeEnd", range_end),
        ("gateway", gateway),
    ] {
        if !subnet.contains(&ip) {
            return Err(invalid(
                &format!("{field}.{k}"),
                format!("{ip} is outside {subnet}"),
            ));
        }
    }
    if range_start > range_end {
        return Err(invalid(
            field,
            format!("rangeStart {range_start} is after rangeEnd {range_end}"),
        ));
    }
    Ok(Range {
        subnet,
        range_start,
        range_end,
        gateway,
    })
}

impl BridgeConf {
    /// Reads a rendered (or saved) delegate config.
    pub fn from_rendered(v: &Value) -> Result<BridgeConf, ConfigError> {
        let obj = v
            .as_object()
            .ok_or_else(|| invalid("delegate", "expected a JSON object"))?;
        let ty = obj.get("type").and_then(Value::as_str).unwrap_or("bridge");
        if ty != "bridge" {
            return Err(invalid(
                "delegate.type",
                format!("{ty:?}: this plugin sets pods up natively with a bridge; remove delegate.type or set it to \"bridge\""),
            ));
        }
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        // A saved config is read back from dataDir: its name makes a path too.
        check_network_name("name", &name)?;
        let bridge = match obj.get("bridge") {
            None | Some(Value::Null) => wire::CNI_BRIDGE.to_string(),
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 15 && !s.contains('/') => {
                s.clone()
            }
            Some(_) => {
                return Err(invalid(
                    "delegate.bridge",
                    "expected an interface name of at most 15 characters",
                ))
            }
        };
        let mtu =
            match obj.get("mtu") {
                None | Some(Value::Null) => None,
                Some(m) => Some(m.as_u64().filter(|m| (68..=65535).contains(m)).ok_or_else(
                    || invalid("delegate.mtu", "expected an MTU between 68 and 65535"),
                )? as u32),
            };
        let is_default_gateway =
            bool_field(obj, "isDefaultGateway", "delegate.isDefaultGateway")?.unwrap_or(false);
        // As the bridge plugin: a default gateway implies a gateway.
        let is_gateway = bool_field(obj, "isGateway", "delegate.isGateway")?.unwrap_or(false)
            || is_default_gateway;
        let hairpin = bool_field(obj, "hairpinMode", "delegate.hairpinMode")?.unwrap_or(false);
        let ip_masq = bool_field(obj, "ipMasq", "delegate.ipMasq")?.unwrap_or(false);

        let ipam = obj
            .get("ipam")
            .and_then(Value::as_object)
            .ok_or_else(|| invalid("ipam", "missing"))?;
        let ipam_type = ipam
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("host-local");
        if ipam_type != "host-local" {
            return Err(invalid(
                "ipam.type",
                format!("{ipam_type:?}: only host-local is built in; remove ipam.type"),
            ));
        }
        let base = match ipam.get("dataDir") {
            None | Some(Value::Null) => wire::CNI_DEFAULT_IPAM_DIR.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(invalid("ipam.dataDir", "expected a directory path")),
        };
        let mut range_sets = Vec::new();
        let sets = ipam
            .get("ranges")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("ipam.ranges", "missing"))?;
        for (i, set) in sets.iter().enumerate() {
            let set = set.as_array().filter(|s| !s.is_empty()).ok_or_else(|| {
                invalid(
                    &format!("ipam.ranges[{i}]"),
                    "expected a non-empty array of ranges",
                )
            })?;
            let mut rs = Vec::new();
            for (j, r) in set.iter().enumerate() {
                rs.push(parse_range(r, &format!("ipam.ranges[{i}][{j}]"))?);
            }
            if rs
                .iter()
                .any(|r| r.subnet.addr().is_ipv4() != rs[0].subnet.addr().is_ipv4())
            {
                return Err(invalid(
                    &format!("ipam.ranges[{i}]"),
                    "mixes IPv4 and IPv6 ranges",
                ));
            }
            range_sets.push(rs);
        }
        if range_sets.is_empty() {
            return Err(invalid("ipam.ranges", "empty: subnet.env gave no subnet"));
        }
        let mut routes = Vec::new();
        if let Some(rt) = ipam.get("routes") {
            let arr = rt
                .as_array()
                .ok_or_else(|| invalid("ipam.routes", "expected an array of {\"dst\": ..}"))?;
            for (i, r) in arr.iter().enumerate() {
                let field = format!("ipam.routes[{i}]");
                routes.push(spec::parse_route(r, &field).map_err(|msg| invalid(&field, msg))?);
            }
        }
        Ok(BridgeConf {
            name: name.clone(),
            bridge,
            mtu,
            is_gateway,
            is_default_gateway,
            hairpin,
            ip_masq,
            ipam: IpamConf {
                network_dir: Path::new(&base).join(&name),
                range_sets,
                routes,
                dns: ipam.get("dns").cloned().unwrap_or_else(|| json!({})),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    fn manifest() -> NetConf {
        NetConf::parse(
            br#"{"name":"cbr0","cniVersion":"0.3.1","type":"flannel",
                "delegate":{"hairpinMode":true,"isDefaultGateway":true}}"#,
        )
        .unwrap()
    }

    #[test]
    fn defaults() {
        let c = manifest();
        assert_eq!(c.name, "cbr0");
        assert_eq!(c.version, Version(0, 3, 1));
        assert_eq!(c.subnet_file, Path::new("/run/flannel/subnet.env"));
        assert_eq!(c.data_dir, Path::new("/var/lib/cni/flannel"));
        assert_eq!(
            c.ipam_network_dir().unwrap(),
            Path::new("/var/lib/cni/networks/cbr0")
        );
        assert!(c.prev_result.is_none());
    }

    #[test]
    fn render_like_upstream() {
        let env = SubnetEnv::parse(ENV).unwrap();
        let d = manifest().render_delegate(&env).unwrap();
        assert_eq!(
            d,
            json!({
                "name": "cbr0", "cniVersion": "0.3.1", "type": "bridge", "bridge": "cni0",
                "mtu": 1450, "ipMasq": false, "isGateway": true,
                "hairpinMode": true, "isDefaultGateway": true,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]],
                         "routes": [{"dst": "10.244.0.0/16"}]}
            })
        );
        let b = BridgeConf::from_rendered(&d).unwrap();
        assert_eq!(b.bridge, "cni0");
        assert_eq!(b.mtu, Some(1450));
        assert!(b.is_gateway && b.is_default_gateway && b.hairpin && !b.ip_masq);
        assert_eq!(b.ipam.network_dir, Path::new("/var/lib/cni/networks/cbr0"));
        let r = &b.ipam.range_sets[0][0];
        assert_eq!(r.range_start.to_string(), "10.244.1.1");
        assert_eq!(r.range_end.to_string(), "10.244.1.254");
        assert_eq!(r.gateway.to_string(), "10.244.1.1");
        assert_eq!(b.ipam.routes.len(), 1);
    }

    #[test]
    fn ipam_base_and_delegate_override() {
        let c = NetConf::parse(
            br#"{"name":"n","cniVersion":"1.0.0","type":"flannel","dataDir":"/tmp/d",
                "delegate":{"mtu":1400,"ipMasq":true,"bridge":"br-x"},
                "ipam":{"dataDir":"/tmp/ipam","routes":[{"dst":"192.168.0.0/16"}]},
                "runtimeConfig":{"portMappings":[]}}"#,
        )
        .unwrap();
        let env = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
        )
        .unwrap();
        let d = c.render_delegate(&env).unwrap();
        assert_eq!(d["mtu"], 1400);
        assert_eq!(d["ipMasq"], true);
        assert_eq!(d["runtimeConfig"], json!({"portMappings": []}));
        assert_eq!(
            d["ipam"]["ranges"],
            json!([[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:10:244:1::/64"}]])
        );
        assert_eq!(
            d["ipam"]["routes"],
            json!([{"dst": "192.168.0.0/16"}, {"dst": "10.244.0.0/16"}, {"dst": "fd00:10:244::/56"}])
        );
        let b = BridgeConf::from_rendered(&d).unwrap();
        assert_eq!(b.bridge, "br-x");
        assert_eq!(b.ipam.network_dir, Path::new("/tmp/ipam/n"));
        assert_eq!(b.ipam.range_sets.len(), 2);
        let r6 = &b.ipam.range_sets[1][0];
        assert_eq!(r6.range_start.to_string(), "fd00:10:244:1::1");
        assert_eq!(
            r6.range_end.to_string(),
            "fd00:10:244:1:ffff:ffff:ffff:ffff"
        );
        assert_eq!(c.data_dir, Path::new("/tmp/d"));
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not valid JSON"),
            (br#"{"cniVersion":"0.3.1","type":"flannel"}"#, "field name"),
            (
                br#"{"name":"a/b","cniVersion":"0.3.1","type":"flannel"}"#,
                "field name",
            ),
            (
                br#"{"name":"n","cniVersion":"0.3.1","type":"bridge"}"#,
                "field type",
            ),
            (
                br#"{"name":"n","cniVersion":"0.3.1","type":"flannel","delegate":3}"#,
                "field delegate",
            ),
            (
                br#"{"name":"n","cniVersion":"9.9.9","type":"flannel"}"#,
                "cniVersion \"9.9.9\"",
            ),
        ];
        for (input, want) in cases {
            let e = NetConf::parse(input).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should mention {want}");
        }
        let codes: Vec<u32> = [
            &b"x"[..],
            br#"{"cniVersion":"0.3.1"}"#,
            br#"{"cniVersion":"2.0.0"}"#,
        ]
        .iter()
        .map(|i| CniError::from(NetConf::parse(i).unwrap_err()).code)
        .collect();
        assert_eq!(codes, [6, 7, 1]);
    }

    #[test]
    fn bad_rendered_configs() {
        let env = SubnetEnv::parse(ENV).unwrap();
        for (delegate, want) in [
            (r#"{"type":"macvlan"}"#, "delegate.type"),
            (r#"{"mtu":"big"}"#, "delegate.mtu"),
            (r#"{"hairpinMode":"yes"}"#, "delegate.hairpinMode"),
        ] {
            let input = format!(
                r#"{{"name":"n","cniVersion":"1.0.0","type":"flannel","delegate":{delegate}}}"#
            );
            let d = NetConf::parse(input.as_bytes())
                .unwrap()
                .render_delegate(&env)
                .unwrap();
            let e = BridgeConf::from_rendered(&d).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should mention {want}");
        }
        let c = NetConf::parse(
            br#"{"name":"n","cniVersion":"1.0.0","type":"flannel","ipam":{"type":"dhcp"}}"#,
        )
        .unwrap();
        let e = BridgeConf::from_rendered(&c.render_delegate(&env).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("ipam.type"), "{e}");
    }

    #[test]
    fn subnet_env_parsing() {
        let e = SubnetEnv::parse(ENV).unwrap();
        assert_eq!(e.subnet.unwrap().to_string(), "10.244.1.1/24");
        assert_eq!(e.mtu, 1450);
        assert!(e.ipmasq);
        for (text, want) in [
            ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", "FLANNEL_SUBNET"),
            ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPMASQ=true\n", "FLANNEL_MTU"),
            ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\n", "FLANNEL_IPMASQ"),
            ("FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", "FLANNEL_NETWORK"),
            ("FLANNEL_NETWORK=banana\n", "FLANNEL_NETWORK"),
        ] {
            let err = SubnetEnv::parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should mention {want}");
        }
        let err = load_subnet_env(Path::new("/nonexistent/subnet.env")).unwrap_err();
        assert!(err.to_string().contains("flanneld"));
        assert_eq!(CniError::from(err).code, 11);
    }

    /// Upstream's kube-flannel.yml conflist.
    const MANIFEST_CONFLIST: &str = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[
        {"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},
        {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn conflist_of_the_manifest_parses_as_the_runtime_passes_it() {
        let l = parse_conflist(MANIFEST_CONFLIST.as_bytes()).unwrap();
        assert_eq!(l.name, "cbr0");
        assert_eq!(l.cni_version, "0.3.1");
        assert_eq!(l.plugin_types, vec!["flannel", "portmap"]);
        assert_eq!(l.flannel_index, 0);
        // The list's name and version reach the entry, as libcni sets them.
        assert_eq!(l.flannel.name, "cbr0");
        assert_eq!(l.flannel.version, Version(0, 3, 1));
        assert_eq!(l.flannel.delegate["hairpinMode"], true);
        // A later flannel entry is found too.
        let later = parse_conflist(
            br#"{"name":"n","cniVersion":"1.0.0","plugins":[{"type":"tuning"},{"type":"flannel"}]}"#,
        )
        .unwrap();
        assert_eq!(later.flannel_index, 1);
    }

    #[test]
    fn bad_conflists_name_the_field() {
        let cases: &[(&str, &str)] = &[
            ("[]", "not valid JSON"),
            (
                r#"{"cniVersion":"0.3.1","plugins":[{"type":"flannel"}]}"#,
                "field name",
            ),
            (
                r#"{"name":"n","cniVersion":"0.3.1"}"#,
                "field plugins: missing",
            ),
            (
                r#"{"name":"n","cniVersion":"0.3.1","plugins":[]}"#,
                "field plugins: the list is empty",
            ),
            (
                r#"{"name":"n","cniVersion":"0.3.1","plugins":[{}]}"#,
                "field plugins[0].type",
            ),
            (
                r#"{"name":"n","cniVersion":"0.3.1","plugins":[7]}"#,
                "field plugins[0]:",
            ),
            (
                r#"{"name":"n","cniVersion":"0.3.1","plugins":[{"type":"bridge"}]}"#,
                "no entry of \"type\": \"flannel\" (types: bridge)",
            ),
            (
                r#"{"name":"n","cniVersion":"9.9.9","plugins":[{"type":"flannel"}]}"#,
                "cniVersion \"9.9.9\"",
            ),
            (
                r#"{"name":"n","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":[]}]}"#,
                "field plugins[0].delegate",
            ),
            (
                r#"{"name":"n","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":"yes"}}]}"#,
                "field plugins[0].delegate.hairpinMode",
            ),
            (
                r#"{"name":"n","cniVersion":"0.3.1","plugins":[{"type":"portmap"},{"type":"flannel","ipam":{"type":"dhcp"}}]}"#,
                "field plugins[1].ipam.type",
            ),
        ];
        for (text, want) in cases {
            let e = parse_conflist(text.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e:?} should contain {want:?}");
        }
    }
}
