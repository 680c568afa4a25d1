//! net-conf.json (the file, etcd's `<prefix>/config`, the kube-flannel
//! ConfigMap): `flannel_core::config::parse`.
//!
//! Asserts:
//! - the result depends on the JSON value only: the same document
//!   re-serialised by serde_json gives the same `Ok` or the same error;
//! - an error names a field that is in the document, or none;
//! - a config that parses, written back as net-conf.json with every field
//!   explicit, parses to the same config (round trip), and it is valid:
//!   min <= max, both inside the network, on a subnet boundary, and the
//!   subnet pools build.
#![no_main]

use flannel_core::config::{self, BackendConfig, NetConfig};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

/// `cfg` as net-conf.json with every field set.
fn render(cfg: &NetConfig) -> String {
    let mut m = Map::new();
    m.insert("EnableIPv4".into(), json!(cfg.enable_ipv4));
    m.insert("EnableIPv6".into(), json!(cfg.enable_ipv6));
    m.insert("EnableNFTables".into(), json!(cfg.enable_nftables));
    if let Some(n) = cfg.network {
        m.insert("Network".into(), json!(n.to_string()));
        m.insert("SubnetLen".into(), json!(cfg.subnet_len));
        m.insert("SubnetMin".into(), json!(cfg.subnet_min.to_string()));
        m.insert("SubnetMax".into(), json!(cfg.subnet_max.to_string()));
    }
    if let Some(n) = cfg.ipv6_network {
        m.insert("IPv6Network".into(), json!(n.to_string()));
        m.insert("IPv6SubnetLen".into(), json!(cfg.ipv6_subnet_len));
        m.insert(
            "IPv6SubnetMin".into(),
            json!(cfg.ipv6_subnet_min.to_string()),
        );
        m.insert(
            "IPv6SubnetMax".into(),
            json!(cfg.ipv6_subnet_max.to_string()),
        );
    }
    let backend = match &cfg.backend {
        BackendConfig::Vxlan(v) => json!({
            "Type": "vxlan", "VNI": v.vni, "Port": v.port, "GBP": v.gbp,
            "Learning": v.learning, "DirectRouting": v.direct_routing,
            "MTU": v.mtu.unwrap_or(0),
        }),
        BackendConfig::HostGw => json!({"Type": "host-gw"}),
        BackendConfig::Udp(u) => json!({"Type": "udp", "Port": u.port, "MTU": u.mtu.unwrap_or(0)}),
        BackendConfig::Wireguard(w) => json!({
            "Type": "wireguard", "ListenPort": w.listen_port, "ListenPortV6": w.listen_port_v6,
            "PSK": w.psk.as_ref().map(|k| k.0.to_base64()).unwrap_or_default(),
            "PersistentKeepaliveInterval": w.persistent_keepalive,
            "Mode": w.mode.as_str(), "MTU": w.mtu.unwrap_or(0),
        }),
    };
    m.insert("Backend".into(), backend);
    Value::Object(m).to_string()
}

/// Whether the document has a key spelt like `field` ("Backend.VNI": the
/// key VNI of the Backend object), ignoring ASCII case as the parser does.
/// Keys that differ only in case ("BackeNd" beside "Backend") are each
/// followed: which one the parser reads is its own rule, not this check's.
fn names_field(doc: &Value, field: &str) -> bool {
    fn follows(v: &Value, parts: &[&str]) -> bool {
        let Some((part, rest)) = parts.split_first() else {
            return true;
        };
        v.as_object().is_some_and(|obj| {
            obj.iter()
                .any(|(k, next)| k.eq_ignore_ascii_case(part) && follows(next, rest))
        })
    }
    follows(doc, &field.split('.').collect::<Vec<_>>())
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = config::parse(text);
    if let Ok(doc) = serde_json::from_str::<Value>(text) {
        assert_eq!(config::parse(&doc.to_string()), parsed, "{text}");
        if let Err(e) = &parsed {
            let field = e.field();
            // Required fields and the family switch may be about what is missing.
            let about_missing = matches!(
                e,
                config::ConfigError::Missing { .. } | config::ConfigError::NoFamily
            );
            assert!(
                field.is_empty() || about_missing || names_field(&doc, field),
                "{e} names {field}, which is not in {text}"
            );
        }
    }
    let Ok(cfg) = parsed else {
        return;
    };
    let again = render(&cfg);
    assert_eq!(
        config::parse(&again).as_ref(),
        Ok(&cfg),
        "{text}\n-> {again}"
    );
    if let Some(pool) = cfg.ipv4_pool() {
        assert!(pool.count() >= 1);
        let net = cfg.network.unwrap();
        assert!(
            cfg.subnet_min <= cfg.subnet_max
                && net.contains(&cfg.subnet_min)
                && net.contains(&cfg.subnet_max)
        );
    } else {
        assert!(!cfg.enable_ipv4, "IPv4 enabled without a pool: {text}");
    }
    if let Some(pool) = cfg.ipv6_pool() {
        assert!(pool.count() >= 1);
        let net = cfg.ipv6_network.unwrap();
        assert!(
            cfg.ipv6_subnet_min <= cfg.ipv6_subnet_max
                && net.contains(&cfg.ipv6_subnet_min)
                && net.contains(&cfg.ipv6_subnet_max)
        );
    } else {
        assert!(!cfg.enable_ipv6, "IPv6 enabled without a pool: {text}");
    }
    let _ = cfg.pod_mtu(1500, false);
    let _ = cfg.pod_mtu(0, true);
});
