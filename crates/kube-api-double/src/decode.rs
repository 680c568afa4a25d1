//! Decoding errors in kube-apiserver's words. The double checks bodies
//! against k8s-openapi's types (serde); this turns serde's "invalid type:
//! integer `1`, expected a string" at `metadata.annotations.a` into what
//! Go's decoders say for the same body:
//!
//! - `encoding/json` (create, update, merge and JSON patches):
//!   `json: cannot unmarshal number into Go struct field ObjectMeta.metadata.annotations of type string`;
//! - apimachinery's unstructured converter (strategic merge patches):
//!   `cannot convert int64 to string`.

use crate::resources::{DecodeError, Kind};

/// Fields whose value is a Go map: the next path segment is a map key.
const MAP_FIELDS: [&str; 7] = [
    "metadata.annotations",
    "metadata.labels",
    "status.capacity",
    "status.allocatable",
    "spec.nodeSelector",
    "spec.overhead",
    "data",
];

/// The Go struct that holds the field at `parent` (field names from the root).
fn go_struct(kind: Kind, parent: &str) -> String {
    let named = match (kind, parent) {
        (_, "") => kind.kind(),
        (_, "metadata") => "ObjectMeta",
        (_, "metadata.ownerReferences") => "OwnerReference",
        (Kind::Node, "spec") => "NodeSpec",
        (Kind::Node, "spec.taints") => "Taint",
        (Kind::Node, "status") => "NodeStatus",
        (Kind::Node, "status.conditions") => "NodeCondition",
        (Kind::Node, "status.addresses") => "NodeAddress",
        (Kind::Node, "status.nodeInfo") => "NodeSystemInfo",
        (Kind::Node, "status.daemonEndpoints") => "NodeDaemonEndpoints",
        (Kind::Node, "status.daemonEndpoints.kubeletEndpoint") => "DaemonEndpoint",
        (Kind::Pod, "spec") => "PodSpec",
        (Kind::Pod, "spec.containers") | (Kind::Pod, "spec.initContainers") => "Container",
        (Kind::Pod, "status") => "PodStatus",
        (Kind::Pod, "status.conditions") => "PodCondition",
        (Kind::Namespace, "spec") => "NamespaceSpec",
        (Kind::Namespace, "status") => "NamespaceStatus",
        (Kind::ClusterRole, "rules") => "PolicyRule",
        (Kind::ClusterRoleBinding, "subjects") => "Subject",
        (Kind::ClusterRoleBinding, "roleRef") => "RoleRef",
        _ => "",
    };
    if !named.is_empty() {
        return named.to_string();
    }
    // An unlisted struct: Go names it by its type, which follows the field
    // name closely enough for a message.
    let last = parent.rsplit('.').next().unwrap_or(parent);
    let mut c = last.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => kind.kind().to_string(),
    }
}

/// Go's type name for what serde expected.
fn go_type(kind: Kind, path: &str, expected: &str) -> String {
    let lists = [
        ("spec.podCIDRs", "[]string"),
        ("metadata.finalizers", "[]string"),
        ("spec.taints", "[]v1.Taint"),
        ("status.conditions", "[]v1.NodeCondition"),
        ("status.addresses", "[]v1.NodeAddress"),
        ("spec.containers", "[]v1.Container"),
        ("rules", "[]v1.PolicyRule"),
        ("subjects", "[]v1.Subject"),
    ];
    match expected {
        "a string" | "a borrowed string" => "string".into(),
        "a boolean" => "bool".into(),
        "i32" | "u16" | "u8" => "int32".into(),
        "i64" | "u32" | "u64" => "int64".into(),
        "f64" | "f32" => "float64".into(),
        "a sequence" => lists
            .iter()
            .find(|(p, _)| *p == path)
            .map_or("[]interface {}".into(), |(_, t)| t.to_string()),
        "a map" => "map[string]string".into(),
        other => {
            let name = other.strip_prefix("struct ").unwrap_or(other);
            let _ = kind;
            format!("v1.{name}")
        }
    }
}

/// (JSON type name, Go kind of the decoded value) of serde's "unexpected" text.
fn actual_types(unexpected: &str) -> (&'static str, &'static str, &'static str) {
    if unexpected.starts_with("integer") {
        ("number", "int64", "int64")
    } else if unexpected.starts_with("floating point") {
        ("number", "float64", "float64")
    } else if unexpected.starts_with("string") {
        ("string", "string", "string")
    } else if unexpected.starts_with("boolean") {
        ("bool", "bool", "bool")
    } else if unexpected.starts_with("map") {
        ("object", "map[string]interface {}", "map")
    } else if unexpected.starts_with("sequence") {
        ("array", "[]interface {}", "slice")
    } else {
        ("value", "interface {}", "interface")
    }
}

/// Turns serde's error at `fields` into Go's messages.
pub fn describe(kind: Kind, fields: &[String], serde_msg: &str) -> DecodeError {
    // Cut the path at a map field (the rest is a map key).
    let mut kept: Vec<&str> = Vec::new();
    for f in fields {
        kept.push(f);
        if MAP_FIELDS.contains(&kept.join(".").as_str()) {
            break;
        }
    }
    let path = kept.join(".");
    let parent = kept[..kept.len().saturating_sub(1)].join(".");
    let parsed = serde_msg
        .strip_prefix("invalid type: ")
        .and_then(|rest| rest.split_once(", expected "));
    let Some((unexpected, expected)) = parsed else {
        let msg = serde_msg.to_string();
        return DecodeError {
            json: if path.is_empty() {
                msg.clone()
            } else {
                format!("{msg} at {path}")
            },
            unstructured: msg,
        };
    };
    let (json_type, go_value, go_kind) = actual_types(unexpected);
    let target = go_type(kind, &path, expected);
    let json = if path.is_empty() {
        format!(
            "json: cannot unmarshal {json_type} into Go value of type v1.{}",
            kind.kind()
        )
    } else {
        format!(
            "json: cannot unmarshal {json_type} into Go struct field {}.{path} of type {target}",
            go_struct(kind, &parent)
        )
    };
    let unstructured = if target.starts_with("map[") {
        format!("cannot restore map from {go_kind}")
    } else if target.starts_with("[]") {
        format!("cannot restore slice from {go_kind}")
    } else if target.starts_with("v1.") {
        format!("cannot restore struct from: {go_kind}")
    } else {
        format!("cannot convert {go_value} to {target}")
    };
    DecodeError { json, unstructured }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> Vec<String> {
        s.split('.').map(String::from).collect()
    }

    #[test]
    fn messages() {
        let e = describe(
            Kind::Node,
            &f("spec.podCIDRs"),
            "invalid type: string \"x\", expected a sequence",
        );
        assert_eq!(
            e.json,
            "json: cannot unmarshal string into Go struct field NodeSpec.spec.podCIDRs of type []string"
        );
        assert_eq!(e.unstructured, "cannot restore slice from string");
        let e = describe(
            Kind::Node,
            &f("spec"),
            "invalid type: string \"x\", expected NodeSpec",
        );
        assert_eq!(
            e.json,
            "json: cannot unmarshal string into Go struct field Node.spec of type v1.NodeSpec"
        );
        assert_eq!(e.unstructured, "cannot restore struct from: string");
        let e = describe(
            Kind::Node,
            &f("metadata.labels.a"),
            "invalid type: boolean `true`, expected a string",
        );
        assert_eq!(
            e.json,
            "json: cannot unmarshal bool into Go struct field ObjectMeta.metadata.labels of type string"
        );
    }
}
