//! Authorization: `AlwaysAllow`, `AlwaysDeny`, or RBAC over the
//! ClusterRoles and ClusterRoleBindings in the store, with the
//! `system:masters` group always allowed (kube-apiserver's privileged-group
//! authorizer), the bootstrap roles a fresh cluster has, and the 403 message
//! kube-apiserver writes.

use serde_json::{json, Value};

use crate::auth::UserInfo;
use crate::resources::{Kind, RBAC_GROUP};
use crate::store::Store;

/// `--authorization-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorizationMode {
    AlwaysAllow,
    AlwaysDeny,
    /// RBAC (a mode list containing `RBAC`, e.g. `Node,RBAC`).
    Rbac,
}

impl AuthorizationMode {
    /// Parses kube-apiserver's comma list. `Node` is accepted next to `RBAC`
    /// (it only ever grants kubelets, which the double does not serve).
    pub fn parse(s: &str) -> Result<AuthorizationMode, String> {
        let modes: Vec<&str> = s
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .collect();
        for m in &modes {
            if ![
                "AlwaysAllow",
                "AlwaysDeny",
                "RBAC",
                "Node",
                "ABAC",
                "Webhook",
            ]
            .contains(m)
            {
                return Err(format!("authorization-mode {m:?} is not a valid mode"));
            }
            if ["ABAC", "Webhook"].contains(m) {
                return Err(format!(
                    "authorization-mode {m} is not supported by kube-api-double (use RBAC or AlwaysAllow)"
                ));
            }
        }
        match modes.first() {
            None => Ok(AuthorizationMode::AlwaysAllow),
            Some(_) if modes.contains(&"RBAC") => Ok(AuthorizationMode::Rbac),
            Some(&"AlwaysAllow") => Ok(AuthorizationMode::AlwaysAllow),
            Some(&"AlwaysDeny") => Ok(AuthorizationMode::AlwaysDeny),
            Some(_) => {
                Err("authorization-mode Node needs RBAC next to it in kube-api-double".into())
            }
        }
    }
}

/// What a request wants to do.
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    pub user: &'a UserInfo,
    pub verb: &'a str,
    /// `None` for a non-resource path (`/healthz`, `/api`).
    pub resource: Option<ResourceAttributes<'a>>,
    pub path: &'a str,
}

#[derive(Debug, Clone)]
pub struct ResourceAttributes<'a> {
    pub group: &'a str,
    pub resource: &'a str,
    pub subresource: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
}

/// An authorization decision and its reason (the audit annotations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

/// The 403 text: `User "u" cannot patch resource "nodes/status" in API
/// group "" at the cluster scope`.
pub fn forbidden_message(a: &Attributes) -> String {
    match &a.resource {
        None => format!("User {:?} cannot {} path {:?}", a.user.name, a.verb, a.path),
        Some(r) => {
            let resource = if r.subresource.is_empty() {
                r.resource.to_string()
            } else {
                format!("{}/{}", r.resource, r.subresource)
            };
            if r.namespace.is_empty() {
                format!(
                    "User {:?} cannot {} resource {:?} in API group {:?} at the cluster scope",
                    a.user.name, a.verb, resource, r.group
                )
            } else {
                format!(
                    "User {:?} cannot {} resource {:?} in API group {:?} in the namespace {:?}",
                    a.user.name, a.verb, resource, r.group, r.namespace
                )
            }
        }
    }
}

fn strs(v: Option<&Value>) -> Vec<&str> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    let verbs = strs(rule.get("verbs"));
    if !verbs.iter().any(|v| *v == "*" || *v == a.verb) {
        return false;
    }
    match &a.resource {
        None => strs(rule.get("nonResourceURLs")).iter().any(|u| {
            *u == "*" || *u == a.path || u.strip_suffix('*').is_some_and(|p| a.path.starts_with(p))
        }),
        Some(r) => {
            let groups = strs(rule.get("apiGroups"));
            if !groups.iter().any(|g| *g == "*" || *g == r.group) {
                return false;
            }
            let combined = if r.subresource.is_empty() {
                r.resource.to_string()
            } else {
                format!("{}/{}", r.resource, r.subresource)
            };
            let resource_ok = strs(rule.get("resources")).iter().any(|res| {
                *res == "*"
                    || *res == combined
                    || (!r.subresource.is_empty() && res.strip_prefix("*/") == Some(r.subresource))
            });
            if !resource_ok {
                return false;
            }
            let names = strs(rule.get("resourceNames"));
            names.is_empty() || names.contains(&r.name)
        }
    }
}

/// Whether a binding subject is this user, and how the allow reason names it.
fn subject_matches(s: &Value, user: &UserInfo) -> Option<String> {
    let kind = s.get("kind").and_then(Value::as_str).unwrap_or("");
    let name = s.get("name").and_then(Value::as_str).unwrap_or("");
    match kind {
        "User" if user.name == name => Some(format!("User {name:?}")),
        "Group" if user.groups.iter().any(|g| g == name) => Some(format!("Group {name:?}")),
        "ServiceAccount" => {
            let ns = s.get("namespace").and_then(Value::as_str).unwrap_or("");
            (user.name == format!("system:serviceaccount:{ns}:{name}"))
                .then(|| format!("ServiceAccount \"{name}/{ns}\""))
        }
        _ => None,
    }
}

/// Decides a request.
pub fn authorize(mode: AuthorizationMode, store: &Store, a: &Attributes) -> Decision {
    if a.user.groups.iter().any(|g| g == "system:masters") {
        return Decision {
            allowed: true,
            reason: String::new(),
        };
    }
    match mode {
        AuthorizationMode::AlwaysAllow => Decision {
            allowed: true,
            reason: String::new(),
        },
        AuthorizationMode::AlwaysDeny => Decision {
            allowed: false,
            reason: "Everything is forbidden.".into(),
        },
        AuthorizationMode::Rbac => rbac(store, a),
    }
}

fn rbac(store: &Store, a: &Attributes) -> Decision {
    let (_, bindings) = store
        .snapshot(Kind::ClusterRoleBinding, None)
        .unwrap_or_default();
    let mut missing = Vec::new();
    for b in &bindings {
        let subjects = b.value.get("subjects").and_then(Value::as_array);
        let Some(subject) = subjects
            .into_iter()
            .flatten()
            .find_map(|s| subject_matches(s, a.user))
        else {
            continue;
        };
        let role_name = b
            .value
            .pointer("/roleRef/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let Some(role) = store.get(Kind::ClusterRole, role_name) else {
            missing.push(format!(
                "clusterrole.rbac.authorization.k8s.io {role_name:?} not found"
            ));
            continue;
        };
        let rules = role.value.get("rules").and_then(Value::as_array);
        if rules.into_iter().flatten().any(|r| rule_allows(r, a)) {
            return Decision {
                allowed: true,
                reason: format!(
                    "RBAC: allowed by ClusterRoleBinding {:?} of ClusterRole {:?} to {subject}",
                    b.name(),
                    role_name
                ),
            };
        }
    }
    let reason = match missing.len() {
        0 => String::new(),
        1 => format!("RBAC: {}", missing[0]),
        _ => format!("RBAC: [{}]", missing.join(", ")),
    };
    Decision {
        allowed: false,
        reason,
    }
}

/// The ClusterRoles and ClusterRoleBindings of a fresh cluster that the
/// double's authorization relies on: `cluster-admin` for `system:masters`,
/// discovery for every authenticated user, health and version for everyone.
pub fn bootstrap_objects() -> Vec<(Kind, Value)> {
    let meta = |name: &str| {
        json!({
            "name": name,
            "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
            "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}
        })
    };
    let group = |g: &str| json!({"apiGroup": RBAC_GROUP, "kind": "Group", "name": g});
    let role = |name: &str, rules: Value| {
        (
            Kind::ClusterRole,
            json!({"metadata": meta(name), "rules": rules}),
        )
    };
    let binding = |name: &str, subjects: Vec<Value>| {
        (
            Kind::ClusterRoleBinding,
            json!({
                "metadata": meta(name),
                "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": name},
                "subjects": subjects
            }),
        )
    };
    vec![
        role(
            "cluster-admin",
            json!([
                {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                {"nonResourceURLs": ["*"], "verbs": ["*"]}
            ]),
        ),
        role(
            "system:discovery",
            json!([{"nonResourceURLs": [
                "/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi",
                "/openapi/*", "/readyz", "/version", "/version/"
            ], "verbs": ["get"]}]),
        ),
        role(
            "system:public-info-viewer",
            json!([{"nonResourceURLs": ["/healthz", "/livez", "/readyz", "/version", "/version/"], "verbs": ["get"]}]),
        ),
        role(
            "system:basic-user",
            json!([{"apiGroups": ["authorization.k8s.io"], "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]}]),
        ),
        binding("cluster-admin", vec![group("system:masters")]),
        binding("system:discovery", vec![group("system:authenticated")]),
        binding(
            "system:public-info-viewer",
            vec![
                group("system:authenticated"),
                group("system:unauthenticated"),
            ],
        ),
        binding("system:basic-user", vec![group("system:authenticated")]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(
            AuthorizationMode::parse("Node,RBAC"),
            Ok(AuthorizationMode::Rbac)
        );
        assert_eq!(
            AuthorizationMode::parse("AlwaysAllow"),
            Ok(AuthorizationMode::AlwaysAllow)
        );
        assert!(AuthorizationMode::parse("Webhook").is_err());
        assert!(AuthorizationMode::parse("Bogus").is_err());
    }

    #[test]
    fn rules() {
        let user = UserInfo::new("u", &[]);
        let attrs = |verb: &'static str, resource: &'static str, sub: &'static str| Attributes {
            user: &user,
            verb,
            resource: Some(ResourceAttributes {
                group: "",
                resource,
                subresource: sub,
                name: "n",
                namespace: "",
            }),
            path: "/api/v1/nodes/n",
        };
        let nodes =
            json!({"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]});
        let status = json!({"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]});
        assert!(rule_allows(&nodes, &attrs("get", "nodes", "")));
        assert!(!rule_allows(&nodes, &attrs("patch", "nodes", "")));
        assert!(!rule_allows(&nodes, &attrs("get", "nodes", "status")));
        assert!(rule_allows(&status, &attrs("patch", "nodes", "status")));
        let any_status = json!({"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["*"]});
        assert!(rule_allows(&any_status, &attrs("patch", "nodes", "status")));
        let named = json!({"apiGroups": [""], "resources": ["nodes"], "resourceNames": ["other"], "verbs": ["get"]});
        assert!(!rule_allows(&named, &attrs("get", "nodes", "")));
        assert_eq!(
            forbidden_message(&attrs("patch", "nodes", "")),
            "User \"u\" cannot patch resource \"nodes\" in API group \"\" at the cluster scope"
        );
    }

    #[test]
    fn subjects() {
        let sa = UserInfo::new("system:serviceaccount:kube-flannel:flannel", &[]);
        let s = json!({"kind": "ServiceAccount", "name": "flannel", "namespace": "kube-flannel"});
        assert_eq!(
            subject_matches(&s, &sa).as_deref(),
            Some("ServiceAccount \"flannel/kube-flannel\"")
        );
        assert!(subject_matches(&json!({"kind": "User", "name": "x"}), &sa).is_none());
    }
}
