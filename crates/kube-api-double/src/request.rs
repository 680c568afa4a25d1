//! What a request is about, decided from its method, path and query as
//! kube-apiserver's `RequestInfoFactory` decides it: the RBAC verb, API
//! group and version, namespace, resource, name and subresource.

use std::collections::HashMap;

/// The parsed request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// Whether the path names a resource (`/api/v1/nodes`), not a
    /// discovery or health path.
    pub resource_request: bool,
    pub path: String,
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`; the lowercase method for non-resource paths.
    pub verb: String,
    pub api_prefix: String,
    pub group: String,
    pub version: String,
    pub namespace: String,
    pub resource: String,
    pub name: String,
    pub subresource: String,
    /// Path segments after `resource/name/subresource` (none are served).
    pub extra: Vec<String>,
}

/// Query parameters (the last value of a repeated one wins).
pub type Query = HashMap<String, String>;

/// Parses the query string.
pub fn parse_query(q: Option<&str>) -> Query {
    form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// `strconv.ParseBool`.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Whether the request asks for a watch (`watch=true`), or the query is bad.
pub fn is_watch(q: &Query) -> Result<bool, String> {
    match q.get("watch") {
        None => Ok(false),
        Some(v) if v.is_empty() => Ok(false),
        Some(v) => {
            parse_bool(v).ok_or_else(|| format!("strconv.ParseBool: parsing {v:?}: invalid syntax"))
        }
    }
}

impl RequestInfo {
    /// Parses method, path and query.
    pub fn parse(method: &str, path: &str, query: &Query) -> RequestInfo {
        let mut info = RequestInfo {
            path: path.to_string(),
            verb: method.to_ascii_lowercase(),
            ..RequestInfo::default()
        };
        let parts: Vec<&str> = path
            .trim_matches('/')
            .split('/')
            .filter(|p| !p.is_empty())
            .collect();
        let rest: &[&str] = match parts.as_slice() {
            ["api", version, rest @ ..] if !rest.is_empty() => {
                info.api_prefix = "api".into();
                info.version = version.to_string();
                rest
            }
            ["apis", group, version, rest @ ..] if !rest.is_empty() => {
                info.api_prefix = "apis".into();
                info.group = group.to_string();
                info.version = version.to_string();
                rest
            }
            _ => return info,
        };
        info.resource_request = true;
        let mut rest = rest.to_vec();
        if rest[0] == "namespaces" && rest.len() > 1 {
            info.namespace = rest[1].to_string();
            if rest.len() > 2 && !["status", "finalize"].contains(&rest[2]) {
                rest = rest[2..].to_vec();
            }
        }
        info.resource = rest[0].to_string();
        if let Some(n) = rest.get(1) {
            info.name = n.to_string();
        }
        if let Some(s) = rest.get(2) {
            info.subresource = s.to_string();
        }
        info.extra = rest.iter().skip(3).map(|s| s.to_string()).collect();
        info.verb = match method {
            "GET" | "HEAD" => {
                if is_watch(query).unwrap_or(false) {
                    "watch"
                } else if info.name.is_empty() {
                    "list"
                } else {
                    "get"
                }
            }
            "POST" => "create",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" => {
                if info.name.is_empty() {
                    "deletecollection"
                } else {
                    "delete"
                }
            }
            other => {
                return RequestInfo {
                    verb: other.to_ascii_lowercase(),
                    ..info
                }
            }
        }
        .to_string();
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(method: &str, uri: &str) -> RequestInfo {
        let (path, q) = uri.split_once('?').unwrap_or((uri, ""));
        RequestInfo::parse(method, path, &parse_query(Some(q)))
    }

    #[test]
    fn resource_paths() {
        let i = p("GET", "/api/v1/nodes?limit=500&resourceVersion=0");
        assert!(i.resource_request);
        assert_eq!(
            (i.verb.as_str(), i.resource.as_str(), i.name.as_str()),
            ("list", "nodes", "")
        );
        let i = p(
            "GET",
            "/api/v1/nodes?allowWatchBookmarks=true&resourceVersion=213&watch=true",
        );
        assert_eq!(i.verb, "watch");
        let i = p("PATCH", "/api/v1/nodes/k8s-node1/status");
        assert_eq!(
            (i.verb.as_str(), i.name.as_str(), i.subresource.as_str()),
            ("patch", "k8s-node1", "status")
        );
        let i = p("GET", "/api/v1/namespaces/kube-flannel/pods/p1");
        assert_eq!(
            (i.namespace.as_str(), i.resource.as_str(), i.name.as_str()),
            ("kube-flannel", "pods", "p1")
        );
        let i = p("GET", "/api/v1/namespaces/x");
        assert_eq!(
            (i.namespace.as_str(), i.resource.as_str(), i.name.as_str()),
            ("x", "namespaces", "x")
        );
        let i = p(
            "DELETE",
            "/apis/rbac.authorization.k8s.io/v1/clusterroles/flannel",
        );
        assert_eq!(
            (i.group.as_str(), i.verb.as_str()),
            ("rbac.authorization.k8s.io", "delete")
        );
        let i = p("DELETE", "/api/v1/nodes");
        assert_eq!(i.verb, "deletecollection");
    }

    #[test]
    fn non_resource_paths() {
        for path in [
            "/healthz",
            "/api",
            "/api/v1",
            "/apis",
            "/apis/rbac.authorization.k8s.io/v1",
            "/version",
        ] {
            let i = p("GET", path);
            assert!(!i.resource_request, "{path}");
            assert_eq!(i.verb, "get");
        }
    }
}
