//! The resources the double serves and what kube-apiserver's registry does
//! to each on create and update: defaults, admission, the status
//! subresource's reset rules, validation, the strategic-merge schema and
//! the field selectors.

use serde_json::{json, Map, Value};

use crate::smp::ListMerge;
use crate::status::{go_string_slice, BadValue, FieldError, GroupResource};
use crate::validation::{self, NameRule, CIDR_INVALID};

/// A served resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Node,
    Pod,
    Namespace,
    ServiceAccount,
    ClusterRole,
    ClusterRoleBinding,
}

pub const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Node,
        Kind::Pod,
        Kind::Namespace,
        Kind::ServiceAccount,
        Kind::ClusterRole,
        Kind::ClusterRoleBinding,
    ];

    pub fn group(self) -> &'static str {
        match self {
            Kind::ClusterRole | Kind::ClusterRoleBinding => RBAC_GROUP,
            _ => "",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::ClusterRole | Kind::ClusterRoleBinding => "rbac.authorization.k8s.io/v1",
            _ => "v1",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::ClusterRole => "ClusterRole",
            Kind::ClusterRoleBinding => "ClusterRoleBinding",
        }
    }

    pub fn list_kind(self) -> String {
        format!("{}List", self.kind())
    }

    /// The plural resource name of the URL.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Node => "nodes",
            Kind::Pod => "pods",
            Kind::Namespace => "namespaces",
            Kind::ServiceAccount => "serviceaccounts",
            Kind::ClusterRole => "clusterroles",
            Kind::ClusterRoleBinding => "clusterrolebindings",
        }
    }

    pub fn singular(self) -> &'static str {
        match self {
            Kind::Node => "node",
            Kind::Pod => "pod",
            Kind::Namespace => "namespace",
            Kind::ServiceAccount => "serviceaccount",
            Kind::ClusterRole => "clusterrole",
            Kind::ClusterRoleBinding => "clusterrolebinding",
        }
    }

    pub fn short_names(self) -> &'static [&'static str] {
        match self {
            Kind::Node => &["no"],
            Kind::Pod => &["po"],
            Kind::Namespace => &["ns"],
            Kind::ServiceAccount => &["sa"],
            _ => &[],
        }
    }

    pub fn namespaced(self) -> bool {
        matches!(self, Kind::Pod | Kind::ServiceAccount)
    }

    /// Whether the resource has a `status` subresource.
    pub fn has_status(self) -> bool {
        matches!(self, Kind::Node | Kind::Pod | Kind::Namespace)
    }

    /// The etcd directory kube-apiserver stores the resource in.
    pub fn etcd_dir(self) -> &'static str {
        match self {
            Kind::Node => "minions",
            other => other.resource(),
        }
    }

    pub fn gr(self) -> GroupResource {
        GroupResource {
            group: self.group(),
            resource: self.resource(),
        }
    }

    pub fn from_resource(group: &str, resource: &str) -> Option<Kind> {
        Kind::ALL
            .iter()
            .copied()
            .find(|k| k.group() == group && k.resource() == resource)
    }

    fn name_rule(self) -> NameRule {
        match self {
            Kind::Node | Kind::Pod | Kind::ServiceAccount => NameRule::Dns1123Subdomain,
            Kind::Namespace => NameRule::Dns1123Label,
            Kind::ClusterRole | Kind::ClusterRoleBinding => NameRule::PathSegment,
        }
    }

    /// Whether DELETE answers with the deleted object (pods, namespaces)
    /// rather than a `Status` of success.
    pub fn delete_returns_object(self) -> bool {
        matches!(self, Kind::Pod | Kind::Namespace | Kind::ServiceAccount)
    }

    /// The strategic-merge-patch schema of the resource.
    pub fn schema(self) -> crate::smp::Schema {
        match self {
            Kind::Node => node_schema,
            Kind::Pod => pod_schema,
            _ => meta_schema,
        }
    }

    /// The value of a field-selector label, `None` if the label is not
    /// supported for the resource (a 400 for the request).
    pub fn field_label(self, obj: &Value, label: &str) -> Option<String> {
        let s = |path: &[&str]| {
            let mut v = obj;
            for p in path {
                v = match v.get(p) {
                    Some(x) => x,
                    None => return String::new(),
                };
            }
            match v {
                Value::String(s) => s.clone(),
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => n.to_string(),
                _ => String::new(),
            }
        };
        match (self, label) {
            (_, "metadata.name") => Some(s(&["metadata", "name"])),
            (Kind::Pod, "metadata.namespace") => Some(s(&["metadata", "namespace"])),
            (Kind::Node, "spec.unschedulable") => {
                let v = s(&["spec", "unschedulable"]);
                Some(if v.is_empty() { "false".into() } else { v })
            }
            (Kind::Pod, "spec.nodeName") => Some(s(&["spec", "nodeName"])),
            (Kind::Pod, "spec.restartPolicy") => Some(s(&["spec", "restartPolicy"])),
            (Kind::Pod, "spec.schedulerName") => Some(s(&["spec", "schedulerName"])),
            (Kind::Pod, "spec.serviceAccountName") => Some(s(&["spec", "serviceAccountName"])),
            (Kind::Pod, "spec.hostNetwork") => {
                let v = s(&["spec", "hostNetwork"]);
                Some(if v.is_empty() { "false".into() } else { v })
            }
            (Kind::Pod, "status.phase") => Some(s(&["status", "phase"])),
            (Kind::Pod, "status.podIP") => Some(s(&["status", "podIP"])),
            (Kind::Pod, "status.nominatedNodeName") => Some(s(&["status", "nominatedNodeName"])),
            (Kind::Namespace, "status.phase") => Some(s(&["status", "phase"])),
            _ => None,
        }
    }
}

fn meta_schema(path: &str) -> Option<ListMerge> {
    match path {
        "metadata.finalizers" => Some(ListMerge::Scalars),
        "metadata.ownerReferences" => Some(ListMerge::ByKey("uid")),
        _ => None,
    }
}

fn node_schema(path: &str) -> Option<ListMerge> {
    match path {
        "spec.podCIDRs" => Some(ListMerge::Scalars),
        "status.conditions" | "status.addresses" => Some(ListMerge::ByKey("type")),
        other => meta_schema(other),
    }
}

fn pod_schema(path: &str) -> Option<ListMerge> {
    let containers = [
        "spec.containers",
        "spec.initContainers",
        "spec.ephemeralContainers",
    ];
    if containers.contains(&path) {
        return Some(ListMerge::ByKey("name"));
    }
    for c in containers {
        if let Some(rest) = path.strip_prefix(c).and_then(|r| r.strip_prefix('.')) {
            return match rest {
                "ports" => Some(ListMerge::ByKey("containerPort")),
                "env" => Some(ListMerge::ByKey("name")),
                "volumeMounts" => Some(ListMerge::ByKey("mountPath")),
                "volumeDevices" => Some(ListMerge::ByKey("devicePath")),
                "resizePolicy" => Some(ListMerge::ByKey("resourceName")),
                _ => None,
            };
        }
    }
    match path {
        "spec.volumes"
        | "spec.imagePullSecrets"
        | "spec.resourceClaims"
        | "spec.schedulingGates" => Some(ListMerge::ByKey("name")),
        "spec.hostAliases" => Some(ListMerge::ByKey("ip")),
        "spec.topologySpreadConstraints" => Some(ListMerge::ByKey("topologyKey")),
        "status.conditions" => Some(ListMerge::ByKey("type")),
        "status.podIPs" | "status.hostIPs" => Some(ListMerge::ByKey("ip")),
        other => meta_schema(other),
    }
}

/// Which part of an object a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The main resource: metadata and spec (status is kept).
    Main,
    /// The `status` subresource: metadata and status (spec is kept).
    Status,
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut v = v;
    for p in path {
        match v.get(p) {
            Some(x) => v = x,
            None => return "",
        }
    }
    v.as_str().unwrap_or("")
}

/// Removes nulls everywhere: what decoding into a typed object leaves of
/// them (a zero value, which the output omits or sets again below).
fn drop_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, v| !v.is_null());
            m.values_mut().for_each(drop_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
        _ => false,
    }
}

/// Drops the fields Go's `omitempty` leaves out when empty.
fn omit_empty(obj: &mut Value, parent: &[&str], fields: &[&str]) {
    let mut v = &mut *obj;
    for p in parent {
        match v.get_mut(*p) {
            Some(x) => v = x,
            None => return,
        }
    }
    if let Value::Object(m) = v {
        for f in fields {
            if m.get(*f).is_some_and(is_empty) {
                m.remove(*f);
            }
        }
    }
}

/// RFC 3339 in UTC with seconds, as `metav1.Time` serializes.
fn normalize_time(v: &mut Value) {
    if let Value::String(s) = v {
        if let Ok(ts) = s.parse::<jiff::Timestamp>() {
            *s = ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        }
    }
}

/// What every decoded object looks like on the way out: no nulls, no
/// empty optional metadata, no managedFields (the double does not track
/// field managers).
fn normalize_meta(obj: &mut Value) {
    drop_nulls(obj);
    let meta = meta_mut(obj);
    meta.remove("managedFields");
    meta.remove("selfLink");
    for f in [
        "annotations",
        "labels",
        "finalizers",
        "ownerReferences",
        "generateName",
        "namespace",
        "uid",
        "resourceVersion",
    ] {
        if meta.get(f).is_some_and(is_empty) {
            meta.remove(f);
        }
    }
    for t in ["creationTimestamp", "deletionTimestamp"] {
        if let Some(v) = meta.get_mut(t) {
            normalize_time(v);
        }
    }
}

/// Go's conversion of `spec.podCIDR` / `spec.podCIDRs`: `podCIDR` wins
/// when both are set and differ, either fills the other.
fn convert_pod_cidrs(spec: &mut Map<String, Value>) {
    let single = spec
        .get("podCIDR")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let list: Vec<String> = spec
        .get("podCIDRs")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let list = if !single.is_empty() && (list.is_empty() || list[0] != single) {
        vec![single]
    } else {
        list
    };
    if list.is_empty() {
        spec.remove("podCIDR");
        spec.remove("podCIDRs");
    } else {
        spec.insert("podCIDR".into(), Value::String(list[0].clone()));
        spec.insert("podCIDRs".into(), json!(list));
    }
}

const NODE_INFO_FIELDS: [&str; 10] = [
    "machineID",
    "systemUUID",
    "bootID",
    "kernelVersion",
    "osImage",
    "containerRuntimeVersion",
    "kubeletVersion",
    "kubeProxyVersion",
    "operatingSystem",
    "architecture",
];

/// Brings an object into the form kube-apiserver returns it in after
/// decoding: conversions, the Go zero values it always prints, no empty
/// optional fields.
pub fn normalize(kind: Kind, obj: &mut Value) {
    normalize_meta(obj);
    if !obj.get("spec").is_some_and(Value::is_object)
        && kind != Kind::ClusterRole
        && kind != Kind::ClusterRoleBinding
        && kind != Kind::ServiceAccount
    {
        obj["spec"] = json!({});
    }
    match kind {
        Kind::Node => {
            let spec = obj["spec"].as_object_mut().expect("spec is an object");
            convert_pod_cidrs(spec);
            if spec.get("unschedulable") == Some(&Value::Bool(false)) {
                spec.remove("unschedulable");
            }
            omit_empty(obj, &["spec"], &["taints", "providerID", "externalID"]);
            if let Some(Value::Array(taints)) = obj.pointer_mut("/spec/taints") {
                for t in taints {
                    if let Some(v) = t.get_mut("timeAdded") {
                        normalize_time(v);
                    }
                    omit_empty(t, &[], &["value"]);
                }
            }
            if !obj.get("status").is_some_and(Value::is_object) {
                obj["status"] = json!({});
            }
            let status = obj["status"].as_object_mut().expect("status is an object");
            let endpoints = status.entry("daemonEndpoints").or_insert_with(|| json!({}));
            if !endpoints.is_object() {
                *endpoints = json!({});
            }
            let kubelet = endpoints
                .as_object_mut()
                .expect("object")
                .entry("kubeletEndpoint")
                .or_insert_with(|| json!({}));
            if !kubelet.is_object() {
                *kubelet = json!({});
            }
            kubelet
                .as_object_mut()
                .expect("object")
                .entry("Port")
                .or_insert(json!(0));
            let info = status.entry("nodeInfo").or_insert_with(|| json!({}));
            if !info.is_object() {
                *info = json!({});
            }
            let info = info.as_object_mut().expect("object");
            for f in NODE_INFO_FIELDS {
                info.entry(f).or_insert(json!(""));
            }
            if let Some(Value::Array(conds)) = obj.pointer_mut("/status/conditions") {
                for c in conds {
                    for t in ["lastHeartbeatTime", "lastTransitionTime"] {
                        if let Some(v) = c.get_mut(t) {
                            normalize_time(v);
                        }
                    }
                    omit_empty(c, &[], &["reason", "message"]);
                }
            }
            omit_empty(
                obj,
                &["status"],
                &[
                    "conditions",
                    "addresses",
                    "images",
                    "volumesInUse",
                    "volumesAttached",
                    "capacity",
                    "allocatable",
                    "phase",
                    "runtimeHandlers",
                ],
            );
        }
        Kind::Pod => {
            if !obj.get("status").is_some_and(Value::is_object) {
                obj["status"] = json!({});
            }
            omit_empty(obj, &["spec"], &["nodeName", "volumes", "tolerations"]);
        }
        Kind::Namespace => {
            if !obj.get("status").is_some_and(Value::is_object) {
                obj["status"] = json!({});
            }
            omit_empty(obj, &["spec"], &["finalizers"]);
        }
        Kind::ClusterRole => {
            if !obj.get("rules").is_some_and(Value::is_array) {
                obj["rules"] = Value::Null;
            }
        }
        Kind::ClusterRoleBinding => {
            omit_empty(obj, &[], &["subjects"]);
        }
        Kind::ServiceAccount => {}
    }
}

/// The `taint` the NodeTaint admission plugin puts on every new Node.
const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";

fn image_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') {
        return "IfNotPresent";
    }
    match last.split_once(':') {
        Some((_, tag)) if tag != "latest" => "IfNotPresent",
        _ => "Always",
    }
}

/// Defaults and admission on create (after `normalize`).
pub fn prepare_create(kind: Kind, obj: &mut Value) {
    match kind {
        Kind::Node => {
            // NodeTaint admission: every new Node starts not-ready.
            let taints = obj["spec"]
                .as_object_mut()
                .expect("normalized")
                .entry("taints")
                .or_insert_with(|| json!([]));
            if let Value::Array(list) = taints {
                let present = list.iter().any(|t| {
                    t.get("key").and_then(Value::as_str) == Some(NOT_READY_TAINT)
                        && t.get("effect").and_then(Value::as_str) == Some("NoSchedule")
                });
                if !present {
                    list.push(json!({"key": NOT_READY_TAINT, "effect": "NoSchedule"}));
                }
            }
        }
        Kind::Pod => {
            let spec = obj["spec"].as_object_mut().expect("normalized");
            for (k, v) in [
                ("restartPolicy", json!("Always")),
                ("terminationGracePeriodSeconds", json!(30)),
                ("dnsPolicy", json!("ClusterFirst")),
                ("securityContext", json!({})),
                ("schedulerName", json!("default-scheduler")),
                ("enableServiceLinks", json!(true)),
                ("preemptionPolicy", json!("PreemptLowerPriority")),
                ("priority", json!(0)),
            ] {
                spec.entry(k).or_insert(v);
            }
            // The ServiceAccount admission plugin: every pod runs as a
            // service account, `default` unless named (the deprecated
            // `serviceAccount` mirrors it).
            let sa = match spec.get("serviceAccountName").and_then(Value::as_str) {
                Some(n) if !n.is_empty() => n.to_string(),
                _ => "default".to_string(),
            };
            spec.insert("serviceAccountName".into(), json!(sa));
            spec.insert("serviceAccount".into(), json!(sa));
            for list in ["containers", "initContainers"] {
                if let Some(Value::Array(cs)) = spec.get_mut(list) {
                    for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                        let image = c
                            .get("image")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string();
                        c.entry("imagePullPolicy")
                            .or_insert(json!(image_pull_policy(&image)));
                        c.entry("resources").or_insert(json!({}));
                        c.entry("terminationMessagePath")
                            .or_insert(json!("/dev/termination-log"));
                        c.entry("terminationMessagePolicy").or_insert(json!("File"));
                    }
                }
            }
            let status = obj["status"].as_object_mut().expect("normalized");
            status.entry("phase").or_insert(json!("Pending"));
            status.entry("qosClass").or_insert(json!("BestEffort"));
        }
        Kind::Namespace => {
            let name = str_at(obj, &["metadata", "name"]).to_string();
            let labels = meta_mut(obj).entry("labels").or_insert_with(|| json!({}));
            if let Value::Object(l) = labels {
                l.insert("kubernetes.io/metadata.name".into(), Value::String(name));
            }
            obj["spec"]
                .as_object_mut()
                .expect("normalized")
                .entry("finalizers")
                .or_insert(json!(["kubernetes"]));
            obj["status"]
                .as_object_mut()
                .expect("normalized")
                .entry("phase")
                .or_insert(json!("Active"));
        }
        Kind::ServiceAccount | Kind::ClusterRole | Kind::ClusterRoleBinding => {}
    }
}

/// The update strategy: what a write through `part` may not change is
/// taken from `old`; system metadata always is.
pub fn prepare_update(kind: Kind, new: &mut Value, old: &Value, part: Part) {
    match (part, kind) {
        (Part::Main, Kind::Node | Kind::Pod | Kind::Namespace) => match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Value::Object(m) = new {
                    m.remove("status");
                }
            }
        },
        (Part::Status, _) => match old.get("spec") {
            Some(s) => new["spec"] = s.clone(),
            None => {
                if let Value::Object(m) = new {
                    m.remove("spec");
                }
            }
        },
        _ => {}
    }
    if kind == Kind::Namespace {
        let name = str_at(new, &["metadata", "name"]).to_string();
        if let Value::Object(l) = meta_mut(new).entry("labels").or_insert_with(|| json!({})) {
            l.insert("kubernetes.io/metadata.name".into(), Value::String(name));
        }
    }
    let old_meta = old.get("metadata").cloned().unwrap_or_else(|| json!({}));
    let meta = meta_mut(new);
    for f in [
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match old_meta.get(f) {
            Some(v) => {
                meta.insert(f.into(), v.clone());
            }
            None => {
                meta.remove(f);
            }
        }
    }
    if meta.get("uid").is_none() {
        if let Some(uid) = old_meta.get("uid") {
            meta.insert("uid".into(), uid.clone());
        }
    }
}

fn object_meta_errors(kind: Kind, obj: &Value) -> Vec<FieldError> {
    let empty = Map::new();
    let meta = obj
        .get("metadata")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    validation::object_meta(meta, kind.name_rule(), kind.namespaced())
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn validate_node(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let cidrs = strings(obj.pointer("/spec/podCIDRs"));
    let mut families = Vec::new();
    for (i, c) in cidrs.iter().enumerate() {
        match validation::parse_cidr(c) {
            Some(net) => families.push(Some(matches!(net, ipnet::IpNet::V4(_)))),
            None => {
                families.push(None);
                errs.push(FieldError::invalid(
                    format!("spec.podCIDRs[{i}]"),
                    BadValue::Str(c.clone()),
                    CIDR_INVALID,
                ));
            }
        }
    }
    if cidrs.len() > 1 {
        let dual =
            cidrs.len() == 2 && matches!((families[0], families[1]), (Some(a), Some(b)) if a != b);
        if !dual {
            errs.push(FieldError::invalid(
                "spec.podCIDRs",
                BadValue::Go(go_string_slice(&cidrs)),
                "may specify no more than one CIDR for each IP family",
            ));
        }
    }
    if let Some(Value::Array(taints)) = obj.pointer("/spec/taints") {
        let mut seen: Vec<(String, String)> = Vec::new();
        for (i, t) in taints.iter().enumerate() {
            let key = str_at(t, &["key"]).to_string();
            let effect = str_at(t, &["effect"]).to_string();
            let path = format!("spec.taints[{i}]");
            for m in validation::qualified_name(&key) {
                errs.push(FieldError::invalid(
                    format!("{path}.key"),
                    BadValue::Str(key.clone()),
                    m,
                ));
            }
            let value = str_at(t, &["value"]);
            for m in validation::label_value(value) {
                errs.push(FieldError::invalid(
                    format!("{path}.value"),
                    BadValue::Str(value.to_string()),
                    m,
                ));
            }
            if effect.is_empty() {
                errs.push(FieldError::required(format!("{path}.effect"), ""));
            } else if !["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&effect.as_str()) {
                errs.push(FieldError::not_supported(
                    format!("{path}.effect"),
                    BadValue::Str(effect.clone()),
                    &["NoSchedule", "PreferNoSchedule", "NoExecute"],
                ));
            }
            if seen.contains(&(key.clone(), effect.clone())) {
                errs.push(FieldError::duplicate(
                    format!("{path}.effect"),
                    BadValue::Str(effect.clone()),
                ));
                let last = errs.last_mut().expect("just pushed");
                last.detail = "taints must be unique by key and effect pair".into();
            }
            seen.push((key, effect));
        }
    }
    errs
}

fn validate_pod(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    match obj.pointer("/spec/containers") {
        Some(Value::Array(cs)) if !cs.is_empty() => {
            let mut names = Vec::new();
            for (i, c) in cs.iter().enumerate() {
                let name = str_at(c, &["name"]);
                let path = format!("spec.containers[{i}]");
                if name.is_empty() {
                    errs.push(FieldError::required(format!("{path}.name"), ""));
                } else {
                    for m in validation::dns1123_label(name) {
                        errs.push(FieldError::invalid(
                            format!("{path}.name"),
                            BadValue::Str(name.to_string()),
                            m,
                        ));
                    }
                    if names.contains(&name) {
                        errs.push(FieldError::duplicate(
                            format!("{path}.name"),
                            BadValue::Str(name.to_string()),
                        ));
                    }
                    names.push(name);
                }
                if str_at(c, &["image"]).is_empty() {
                    errs.push(FieldError::required(format!("{path}.image"), ""));
                }
            }
        }
        _ => errs.push(FieldError::required("spec.containers", "")),
    }
    errs
}

fn validate_cluster_role(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(Value::Array(rules)) = obj.get("rules") {
        for (i, r) in rules.iter().enumerate() {
            let path = format!("rules[{i}]");
            if strings(r.get("verbs")).is_empty() {
                errs.push(FieldError::required(
                    format!("{path}.verbs"),
                    "verbs must contain at least one value",
                ));
            }
            let urls = strings(r.get("nonResourceURLs"));
            let resources = strings(r.get("resources"));
            let groups = r.get("apiGroups").and_then(Value::as_array);
            if !urls.is_empty() {
                if !resources.is_empty() || groups.is_some_and(|g| !g.is_empty()) {
                    errs.push(FieldError::invalid(
                        format!("{path}.nonResourceURLs"),
                        BadValue::Go(go_string_slice(&urls)),
                        "rules cannot apply to both regular resources and non-resource URLs",
                    ));
                }
            } else {
                if groups.is_none_or(|g| g.is_empty()) {
                    errs.push(FieldError::required(
                        format!("{path}.apiGroups"),
                        "resource rules must supply at least one api group",
                    ));
                }
                if resources.is_empty() {
                    errs.push(FieldError::required(
                        format!("{path}.resources"),
                        "resource rules must supply at least one resource",
                    ));
                }
            }
        }
    }
    errs
}

fn validate_binding(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let group = str_at(obj, &["roleRef", "apiGroup"]);
    if group != RBAC_GROUP {
        errs.push(FieldError::not_supported(
            "roleRef.apiGroup",
            BadValue::Str(group.to_string()),
            &[RBAC_GROUP],
        ));
    }
    let kind = str_at(obj, &["roleRef", "kind"]);
    if kind != "ClusterRole" {
        errs.push(FieldError::not_supported(
            "roleRef.kind",
            BadValue::Str(kind.to_string()),
            &["ClusterRole"],
        ));
    }
    if str_at(obj, &["roleRef", "name"]).is_empty() {
        errs.push(FieldError::required("roleRef.name", ""));
    }
    if let Some(Value::Array(subjects)) = obj.get("subjects") {
        for (i, s) in subjects.iter().enumerate() {
            let path = format!("subjects[{i}]");
            if str_at(s, &["name"]).is_empty() {
                errs.push(FieldError::required(format!("{path}.name"), ""));
            }
            let kind = str_at(s, &["kind"]);
            match kind {
                "ServiceAccount" => {
                    if str_at(s, &["namespace"]).is_empty() {
                        errs.push(FieldError::required(format!("{path}.namespace"), ""));
                    }
                    let g = str_at(s, &["apiGroup"]);
                    if !g.is_empty() {
                        errs.push(FieldError::not_supported(
                            format!("{path}.apiGroup"),
                            BadValue::Str(g.to_string()),
                            &[""],
                        ));
                    }
                }
                "User" | "Group" => {
                    let g = str_at(s, &["apiGroup"]);
                    if g != RBAC_GROUP {
                        errs.push(FieldError::not_supported(
                            format!("{path}.apiGroup"),
                            BadValue::Str(g.to_string()),
                            &[RBAC_GROUP],
                        ));
                    }
                }
                other => errs.push(FieldError::not_supported(
                    format!("{path}.kind"),
                    BadValue::Str(other.to_string()),
                    &["ServiceAccount", "User", "Group"],
                )),
            }
        }
    }
    errs
}

fn validate_kind(kind: Kind, obj: &Value) -> Vec<FieldError> {
    match kind {
        Kind::Node => validate_node(obj),
        Kind::Pod => validate_pod(obj),
        Kind::Namespace | Kind::ServiceAccount => Vec::new(),
        Kind::ClusterRole => validate_cluster_role(obj),
        Kind::ClusterRoleBinding => validate_binding(obj),
    }
}

/// Validation on create.
pub fn validate_create(kind: Kind, obj: &Value) -> Vec<FieldError> {
    let mut errs = object_meta_errors(kind, obj);
    errs.extend(validate_kind(kind, obj));
    errs
}

/// Validation on update (`old` is the stored version).
pub fn validate_update(kind: Kind, new: &Value, old: &Value) -> Vec<FieldError> {
    let empty = Map::new();
    let nm = new
        .get("metadata")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let om = old
        .get("metadata")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let mut errs = validation::object_meta_update(nm, om);
    errs.extend(object_meta_errors(kind, new));
    errs.extend(validate_kind(kind, new));
    match kind {
        Kind::Node => {
            let old_cidrs = strings(old.pointer("/spec/podCIDRs"));
            if !old_cidrs.is_empty() && old_cidrs != strings(new.pointer("/spec/podCIDRs")) {
                errs.push(FieldError::forbidden(
                    "spec.podCIDRs",
                    "node updates may not change podCIDR except from \"\" to valid",
                ));
            }
            let old_pid = str_at(old, &["spec", "providerID"]);
            if !old_pid.is_empty() && old_pid != str_at(new, &["spec", "providerID"]) {
                errs.push(FieldError::forbidden(
                    "spec.providerID",
                    "node updates may not change providerID except from \"\" to valid",
                ));
            }
            if let Some(Value::Array(addrs)) = new.pointer("/status/addresses") {
                for (i, a) in addrs.iter().enumerate() {
                    if addrs[..i].contains(a) {
                        errs.push(FieldError::duplicate(
                            format!("status.addresses[{i}]"),
                            BadValue::Go(format!(
                                "core.NodeAddress{{Type:{:?}, Address:{:?}}}",
                                str_at(a, &["type"]),
                                str_at(a, &["address"])
                            )),
                        ));
                    }
                }
            }
        }
        Kind::Pod => {
            let old_node = str_at(old, &["spec", "nodeName"]);
            if !old_node.is_empty() && old_node != str_at(new, &["spec", "nodeName"]) {
                errs.push(FieldError::forbidden(
                    "spec",
                    "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
                ));
            }
        }
        Kind::ClusterRoleBinding if new.get("roleRef") != old.get("roleRef") => {
            errs.push(FieldError::invalid(
                "roleRef",
                BadValue::Go(format!(
                    "rbac.RoleRef{{APIGroup:{:?}, Kind:{:?}, Name:{:?}}}",
                    str_at(new, &["roleRef", "apiGroup"]),
                    str_at(new, &["roleRef", "kind"]),
                    str_at(new, &["roleRef", "name"])
                )),
                "cannot change roleRef",
            ));
        }
        _ => {}
    }
    errs
}

/// A body that does not decode into the typed object.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    /// Go's `encoding/json` wording (create, update, merge and JSON patches).
    pub json: String,
    /// apimachinery's unstructured converter wording (strategic merge patches).
    pub unstructured: String,
}

/// Quantities may be JSON numbers (Go's `resource.Quantity` takes both).
fn quantities_as_strings(kind: Kind, v: &mut Value) {
    let fix = |m: Option<&mut Value>| {
        if let Some(Value::Object(m)) = m {
            for q in m.values_mut() {
                if let Value::Number(n) = q {
                    *q = Value::String(n.to_string());
                }
            }
        }
    };
    match kind {
        Kind::Node => {
            fix(v.pointer_mut("/status/capacity"));
            fix(v.pointer_mut("/status/allocatable"));
        }
        Kind::Pod => {
            if let Some(Value::Array(cs)) = v.pointer_mut("/spec/containers") {
                for c in cs {
                    fix(c.pointer_mut("/resources/limits"));
                    fix(c.pointer_mut("/resources/requests"));
                }
            }
        }
        _ => {}
    }
}

/// Decodes `obj` into the typed object (k8s-openapi's types, which follow
/// the API's OpenAPI schema) and returns it serialized again: wrong JSON
/// types are the errors kube-apiserver's decoder reports, and the result
/// tells which fields the schema knows ([`drop_unknown`]).
pub fn decode(kind: Kind, obj: &Value) -> Result<Value, DecodeError> {
    use k8s_openapi::api::core::v1 as core;
    use k8s_openapi::api::rbac::v1 as rbac;
    let mut v = obj.clone();
    if let Value::Object(m) = &mut v {
        m.remove("kind");
        m.remove("apiVersion");
    }
    quantities_as_strings(kind, &mut v);
    let result = match kind {
        Kind::Node => typed::<core::Node>(&v),
        Kind::Pod => typed::<core::Pod>(&v),
        Kind::Namespace => typed::<core::Namespace>(&v),
        Kind::ServiceAccount => typed::<core::ServiceAccount>(&v),
        Kind::ClusterRole => typed::<rbac::ClusterRole>(&v),
        Kind::ClusterRoleBinding => typed::<rbac::ClusterRoleBinding>(&v),
    };
    result.map_err(|(path, msg)| crate::decode::describe(kind, &path, &msg))
}

fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(
    v: &Value,
) -> Result<Value, (Vec<String>, String)> {
    match serde_path_to_error::deserialize::<_, T>(v) {
        Ok(t) => Ok(serde_json::to_value(&t).expect("typed objects serialize")),
        Err(e) => {
            let fields = e
                .path()
                .iter()
                .filter_map(|s| match s {
                    serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                    _ => None,
                })
                .collect();
            Err((fields, e.inner().to_string()))
        }
    }
}

/// Drops the fields of `obj` the typed object does not have (what
/// kube-apiserver's decoder does with unknown fields) and returns their
/// paths for the `unknown field "..."` warnings.
pub fn drop_unknown(obj: &mut Value, typed: &Value) -> Vec<String> {
    fn walk(v: &mut Value, t: &Value, path: &str, out: &mut Vec<String>) {
        match (v, t) {
            (Value::Object(m), Value::Object(tm)) => {
                m.retain(|k, _| {
                    let known = tm.contains_key(k) || k == "kind" || k == "apiVersion";
                    if !known {
                        out.push(if path.is_empty() {
                            k.clone()
                        } else {
                            format!("{path}.{k}")
                        });
                    }
                    known
                });
                for (k, x) in m.iter_mut() {
                    if let Some(tx) = tm.get(k) {
                        let p = if path.is_empty() {
                            k.clone()
                        } else {
                            format!("{path}.{k}")
                        };
                        walk(x, tx, &p, out);
                    }
                }
            }
            (Value::Array(a), Value::Array(ta)) => {
                for (i, (x, tx)) in a.iter_mut().zip(ta).enumerate() {
                    walk(x, tx, &format!("{path}[{i}]"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(obj, typed, "", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cidr_conversion() {
        let mut n = json!({"metadata": {"name": "n"}, "spec": {"podCIDR": "10.0.1.0/24"}});
        normalize(Kind::Node, &mut n);
        assert_eq!(n["spec"]["podCIDRs"], json!(["10.0.1.0/24"]));
        let mut n =
            json!({"metadata": {"name": "n"}, "spec": {"podCIDRs": ["10.0.1.0/24", "fd00::/64"]}});
        normalize(Kind::Node, &mut n);
        assert_eq!(n["spec"]["podCIDR"], "10.0.1.0/24");
        let mut n = json!({"metadata": {"name": "n"}, "spec": {"podCIDR": "10.0.2.0/24", "podCIDRs": ["10.0.1.0/24", "fd00::/64"]}});
        normalize(Kind::Node, &mut n);
        assert_eq!(n["spec"]["podCIDRs"], json!(["10.0.2.0/24"]));
    }

    #[test]
    fn node_zero_values_and_taint() {
        let mut n = json!({"metadata": {"name": "n", "annotations": {}}});
        normalize(Kind::Node, &mut n);
        prepare_create(Kind::Node, &mut n);
        assert_eq!(
            n["status"]["daemonEndpoints"],
            json!({"kubeletEndpoint": {"Port": 0}})
        );
        assert_eq!(n["status"]["nodeInfo"]["bootID"], "");
        assert!(n["metadata"].get("annotations").is_none());
        assert_eq!(
            n["spec"]["taints"],
            json!([{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}])
        );
        // Not twice.
        prepare_create(Kind::Node, &mut n);
        assert_eq!(n["spec"]["taints"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn pod_cidr_change_is_forbidden() {
        let old = json!({"metadata": {"name": "n"}, "spec": {"podCIDR": "10.0.1.0/24", "podCIDRs": ["10.0.1.0/24"]}});
        let new = json!({"metadata": {"name": "n"}, "spec": {"podCIDR": "10.0.2.0/24", "podCIDRs": ["10.0.2.0/24"]}});
        let errs = validate_update(Kind::Node, &new, &old);
        assert_eq!(errs.len(), 1);
        assert_eq!(
            errs[0].to_string(),
            "spec.podCIDRs: Forbidden: node updates may not change podCIDR except from \"\" to valid"
        );
        let from_empty = json!({"metadata": {"name": "n"}, "spec": {}});
        assert!(validate_update(Kind::Node, &new, &from_empty).is_empty());
    }

    #[test]
    fn pod_cidr_validation() {
        let n = json!({"metadata": {"name": "n"}, "spec": {"podCIDRs": ["10.0.1.0/24", "10.0.2.0/24"]}});
        let errs = validate_create(Kind::Node, &n);
        assert_eq!(
            errs[0].to_string(),
            "spec.podCIDRs: Invalid value: []string{\"10.0.1.0/24\", \"10.0.2.0/24\"}: may specify no more than one CIDR for each IP family"
        );
        let n = json!({"metadata": {"name": "n"}, "spec": {"podCIDRs": ["nope"]}});
        assert_eq!(
            validate_create(Kind::Node, &n)[0].to_string(),
            "spec.podCIDRs[0]: Invalid value: \"nope\": must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"
        );
    }

    #[test]
    fn status_subresource_resets() {
        let old = json!({"metadata": {"name": "n", "uid": "u"}, "spec": {"podCIDR": "a"}, "status": {"phase": "x"}});
        let mut via_status = json!({"metadata": {"name": "n", "annotations": {"a": "b"}}, "spec": {"podCIDR": "b"}, "status": {"phase": "y"}});
        prepare_update(Kind::Node, &mut via_status, &old, Part::Status);
        assert_eq!(via_status["spec"]["podCIDR"], "a");
        assert_eq!(via_status["status"]["phase"], "y");
        assert_eq!(via_status["metadata"]["annotations"]["a"], "b");
        assert_eq!(via_status["metadata"]["uid"], "u");
        let mut via_main =
            json!({"metadata": {"name": "n"}, "spec": {"podCIDR": "b"}, "status": {"phase": "y"}});
        prepare_update(Kind::Node, &mut via_main, &old, Part::Main);
        assert_eq!(via_main["spec"]["podCIDR"], "b");
        assert_eq!(via_main["status"]["phase"], "x");
    }

    #[test]
    fn decode_errors() {
        let bad = json!({"metadata": {"name": "n", "annotations": {"a": 1}}});
        let e = decode(Kind::Node, &bad).unwrap_err();
        assert_eq!(
            e.json,
            "json: cannot unmarshal number into Go struct field ObjectMeta.metadata.annotations of type string"
        );
        assert_eq!(e.unstructured, "cannot convert int64 to string");
        assert!(decode(
            Kind::Node,
            &json!({"metadata": {"name": "n"}, "status": {"capacity": {"cpu": 4}}})
        )
        .is_ok());
        assert!(decode(Kind::Node, &json!({"spec": "x"})).is_err());
    }
}
