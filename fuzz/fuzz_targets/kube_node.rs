//! Kubernetes mode: a Node object (name, annotations, `spec.podCIDR(s)`),
//! as the API server hands it, to the lease every peer programs
//! (`flannel_core::kube::NodeView::lease`), under an IPv4, an IPv6 and a
//! dual-stack net-conf.json.
//!
//! Asserts: a lease read off a Node has exactly the families the config
//! enables, subnets without host bits, and a public address per family;
//! publishing it (`desired_annotations` merged into the Node's annotations,
//! as flanneld patches its own Node) and reading it back gives the same
//! lease; the strategic-merge patch is JSON holding those annotations.
#![no_main]

use std::collections::BTreeMap;

use flannel_core::config::{self, NetConfig};
use flannel_core::kube::{
    annotation_changes, annotation_patch, desired_annotations, AnnotationNames, NodeView,
};
use flannel_core::wire;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn configs() -> [NetConfig; 3] {
    [
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"host-gw"}}"#,
        r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00:10:244::/56","Backend":{"Type":"wireguard"}}"#,
    ]
    .map(|j| config::parse(j).expect("a valid config"))
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fuzz_target!(|data: &[u8]| {
    let Ok(node) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let name = node
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("node");
    let annotations: BTreeMap<String, String> = node
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let pod_cidr = node.pointer("/spec/podCIDR").and_then(Value::as_str);
    let pod_cidrs = strings(node.pointer("/spec/podCIDRs"));
    let view = NodeView {
        name,
        annotations: &annotations,
        pod_cidr,
        pod_cidrs: &pod_cidrs,
    };
    let names = AnnotationNames::new(wire::DEFAULT_KUBE_ANNOTATION_PREFIX).expect("default prefix");
    let _ = view.pod_cidrs();
    let _ = view.node_public_ips(&names);
    for cfg in configs() {
        let _ = view.own_key(&cfg);
        let Ok(Some(lease)) = view.lease(&names, &cfg) else {
            continue;
        };
        assert!(view.is_managed(&names));
        assert_eq!(lease.key.ipv4.is_some(), cfg.enable_ipv4);
        assert_eq!(lease.key.ipv6.is_some(), cfg.enable_ipv6);
        assert_eq!(lease.attrs.public_ip.is_some(), cfg.enable_ipv4);
        assert_eq!(lease.attrs.public_ipv6.is_some(), cfg.enable_ipv6);
        assert!(lease.key.ipv4.is_none_or(|n| n == n.trunc()));
        assert!(lease.key.ipv6.is_none_or(|n| n == n.trunc()));
        assert!(lease.is_reservation());
        // The public-ip-overwrite annotations are published instead of the
        // lease's own address: the read-back lease differs by design.
        if annotations.contains_key(&names.public_ip_overwrite)
            || annotations.contains_key(&names.public_ipv6_overwrite)
        {
            continue;
        }
        let desired = desired_annotations(&names, &lease.attrs, &annotations);
        let changes = annotation_changes(&annotations, &desired);
        let patch: Value =
            serde_json::from_str(&annotation_patch(&changes)).expect("patch is JSON");
        assert_eq!(
            patch["metadata"]["annotations"]
                .as_object()
                .map(|m| m.len()),
            Some(changes.len())
        );
        let mut published = annotations.clone();
        published.extend(changes);
        let again = NodeView {
            annotations: &published,
            ..view
        };
        let back = again.lease(&names, &cfg);
        assert_eq!(
            back.as_ref().ok().and_then(Option::as_ref),
            Some(&lease),
            "{:?}",
            std::str::from_utf8(data)
        );
        assert!(annotation_changes(
            &published,
            &desired_annotations(&names, &lease.attrs, &published)
        )
        .is_empty());
    }
});
