//! `Status` objects: every error the double answers, built the way
//! apimachinery's `k8s.io/apimachinery/pkg/api/errors` builds them (same
//! codes, reasons, messages and `details`), and the field errors of
//! validation (`field.ErrorList`) with the same wording.

use serde::Serialize;
use serde_json::Value;

/// A resource with its API group, as error messages name it (`nodes`,
/// `clusterroles.rbac.authorization.k8s.io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupResource {
    pub group: &'static str,
    pub resource: &'static str,
}

impl GroupResource {
    /// `resource` for the core group, `resource.group` otherwise.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.resource.to_string()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }
}

/// One `details.causes` entry.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Cause {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub field: String,
}

/// `Status.details`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Details {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub group: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<Cause>,
    #[serde(rename = "retryAfterSeconds", skip_serializing_if = "is_zero")]
    pub retry_after_seconds: i32,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

/// An error answer: HTTP code plus the `Status` body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    /// `StatusReason`; empty for apimachinery's `StatusReasonUnknown`.
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Box<Details>>,
    /// `metadata.continue` of an expired-continue error.
    pub continue_token: Option<String>,
}

#[derive(Serialize)]
struct StatusBody<'a> {
    kind: &'static str,
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    metadata: Value,
    status: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    message: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a Details>,
    code: u16,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: String, details: Option<Details>) -> Self {
        ApiError {
            code,
            reason,
            message,
            details: details.map(Box::new),
            continue_token: None,
        }
    }

    fn named(gr: &GroupResource, name: &str) -> Details {
        Details {
            name: name.to_string(),
            group: gr.group.to_string(),
            kind: gr.resource.to_string(),
            ..Details::default()
        }
    }

    /// 404 `nodes "x" not found`.
    pub fn not_found(gr: &GroupResource, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} {:?} not found", gr.qualified(), name),
            Some(Self::named(gr, name)),
        )
    }

    /// 404 for a path that names no resource the server has.
    pub fn path_not_found() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
            Some(Details::default()),
        )
    }

    /// 409 `nodes "x" already exists`.
    pub fn already_exists(gr: &GroupResource, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} {:?} already exists", gr.qualified(), name),
            Some(Self::named(gr, name)),
        )
    }

    /// 409 `Operation cannot be fulfilled on nodes "x": <why>`.
    pub fn conflict(gr: &GroupResource, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {:?}: {why}",
                gr.qualified(),
                name
            ),
            Some(Self::named(gr, name)),
        )
    }

    /// The optimistic-concurrency conflict (stale `metadata.resourceVersion`).
    pub fn modified(gr: &GroupResource, name: &str) -> Self {
        Self::conflict(
            gr,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 401 `Unauthorized`.
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized".into(), None)
    }

    /// 403 with the message of the authorization filter (`forbidden_message`);
    /// `resource` is (group, resource), none for a non-resource path.
    pub fn forbidden(resource: Option<(&str, &str)>, name: &str, why: &str) -> Self {
        match resource {
            None => Self::new(
                403,
                "Forbidden",
                format!("forbidden: {why}"),
                Some(Details::default()),
            ),
            Some((group, resource)) => {
                let qualified = if group.is_empty() {
                    resource.to_string()
                } else {
                    format!("{resource}.{group}")
                };
                let message = if name.is_empty() {
                    format!("{qualified} is forbidden: {why}")
                } else {
                    format!("{qualified} {name:?} is forbidden: {why}")
                };
                let details = Details {
                    name: name.to_string(),
                    group: group.to_string(),
                    kind: resource.to_string(),
                    ..Details::default()
                };
                Self::new(403, "Forbidden", message, Some(details))
            }
        }
    }

    /// 400 `BadRequest` with the message as given.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message.into(), None)
    }

    /// 405 for a method the resource does not serve.
    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource".into(),
            Some(Details::default()),
        )
    }

    /// 415 for a patch (or body) media type the server does not take.
    pub fn unsupported_media_type(accepted: &[&str]) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {}",
                accepted.join(", ")
            ),
            None,
        )
    }

    /// 410 `Expired` (watch or list from a compacted resourceVersion).
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message.into(), None)
    }

    /// 422 `Invalid`: `Node "x" is invalid: <errors>`.
    pub fn invalid(kind: &str, name: &str, errs: &[FieldError]) -> Self {
        let causes = errs
            .iter()
            .map(|e| Cause {
                reason: e.kind.cause().to_string(),
                message: e.body(),
                field: e.field.clone(),
            })
            .collect();
        let message = match errs.len() {
            0 => format!("{kind} {name:?} is invalid"),
            1 => format!("{kind} {name:?} is invalid: {}", errs[0]),
            _ => format!(
                "{kind} {name:?} is invalid: [{}]",
                errs.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        Self::new(
            422,
            "Invalid",
            message,
            Some(Details {
                name: name.to_string(),
                kind: kind.to_string(),
                causes,
                ..Details::default()
            }),
        )
    }

    /// 422 without a message of its own (a JSON patch operation that
    /// failed: apimachinery's generic 422 answer).
    pub fn unprocessable() -> Self {
        Self::new(
            422,
            "Invalid",
            "the server rejected our request due to an error in our request".into(),
            Some(Details::default()),
        )
    }

    /// 500 with a message and no reason (a plain Go error turned into a Status).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "", message.into(), None)
    }

    /// 500 `InternalError` (`Internal error occurred: ...`).
    pub fn internal_error(why: &str) -> Self {
        Self::new(
            500,
            "InternalError",
            format!("Internal error occurred: {why}"),
            Some(Details {
                causes: vec![Cause {
                    reason: String::new(),
                    message: why.to_string(),
                    field: String::new(),
                }],
                ..Details::default()
            }),
        )
    }

    /// 504 `Too large resource version` (a watch or list asked for a
    /// resourceVersion the server has not reached).
    pub fn too_large_resource_version(requested: u64, current: u64) -> Self {
        Self::new(
            504,
            "Timeout",
            format!("Timeout: Too large resource version: {requested}, current: {current}"),
            Some(Details {
                causes: vec![Cause {
                    reason: "ResourceVersionTooLarge".into(),
                    message: "Too large resource version".into(),
                    field: String::new(),
                }],
                retry_after_seconds: 1,
                ..Details::default()
            }),
        )
    }

    /// 503 (storage unreachable).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "ServiceUnavailable", message.into(), None)
    }

    fn body(&self) -> StatusBody<'_> {
        let metadata = match &self.continue_token {
            Some(c) => serde_json::json!({ "continue": c }),
            None => serde_json::json!({}),
        };
        StatusBody {
            kind: "Status",
            api_version: "v1",
            metadata,
            status: "Failure",
            message: &self.message,
            reason: self.reason,
            details: self.details.as_deref(),
            code: self.code,
        }
    }

    /// The `Status` object as a JSON value.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.body()).expect("a Status always serializes")
    }

    /// The `Status` object, serialized with the fields in kube-apiserver's order.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body()).expect("a Status always serializes")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

/// `field.ErrorType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldErrorKind {
    Required,
    Invalid,
    Forbidden,
    Duplicate,
    NotSupported,
    TooLong,
}

impl FieldErrorKind {
    /// The `details.causes[].reason` (`CauseType`).
    pub fn cause(self) -> &'static str {
        match self {
            FieldErrorKind::Required => "FieldValueRequired",
            FieldErrorKind::Invalid => "FieldValueInvalid",
            FieldErrorKind::Forbidden => "FieldValueForbidden",
            FieldErrorKind::Duplicate => "FieldValueDuplicate",
            FieldErrorKind::NotSupported => "FieldValueNotSupported",
            FieldErrorKind::TooLong => "FieldValueTooLong",
        }
    }

    fn text(self) -> &'static str {
        match self {
            FieldErrorKind::Required => "Required value",
            FieldErrorKind::Invalid => "Invalid value",
            FieldErrorKind::Forbidden => "Forbidden",
            FieldErrorKind::Duplicate => "Duplicate value",
            FieldErrorKind::NotSupported => "Unsupported value",
            FieldErrorKind::TooLong => "Too long",
        }
    }
}

/// The offending value of a field error, printed as Go's `%q` / `%v` /
/// `%#v` would print it.
#[derive(Debug, Clone, PartialEq)]
pub enum BadValue {
    None,
    Str(String),
    Int(i64),
    /// Already in Go syntax (`[]string{"a", "b"}`).
    Go(String),
}

/// One validation error (`field.Error`).
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub kind: FieldErrorKind,
    pub field: String,
    pub value: BadValue,
    pub detail: String,
}

impl FieldError {
    pub fn required(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::make(FieldErrorKind::Required, field, BadValue::None, detail)
    }

    pub fn invalid(field: impl Into<String>, value: BadValue, detail: impl Into<String>) -> Self {
        Self::make(FieldErrorKind::Invalid, field, value, detail)
    }

    pub fn forbidden(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::make(FieldErrorKind::Forbidden, field, BadValue::None, detail)
    }

    pub fn duplicate(field: impl Into<String>, value: BadValue) -> Self {
        Self::make(FieldErrorKind::Duplicate, field, value, "")
    }

    /// `Unsupported value: "x": supported values: "a", "b"`.
    pub fn not_supported(field: impl Into<String>, value: BadValue, supported: &[&str]) -> Self {
        let detail = if supported.is_empty() {
            String::new()
        } else {
            format!(
                "supported values: {}",
                supported
                    .iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        Self::make(FieldErrorKind::NotSupported, field, value, detail)
    }

    pub fn too_long(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::make(FieldErrorKind::TooLong, field, BadValue::None, detail)
    }

    fn make(
        kind: FieldErrorKind,
        field: impl Into<String>,
        value: BadValue,
        detail: impl Into<String>,
    ) -> Self {
        FieldError {
            kind,
            field: field.into(),
            value,
            detail: detail.into(),
        }
    }

    /// `ErrorBody()`: the error without the field path.
    pub fn body(&self) -> String {
        let shows_value = !matches!(
            self.kind,
            FieldErrorKind::Required | FieldErrorKind::Forbidden | FieldErrorKind::TooLong
        );
        let mut s = self.kind.text().to_string();
        if shows_value {
            match &self.value {
                BadValue::None => s.push_str(": null"),
                BadValue::Str(v) => s.push_str(&format!(": {v:?}")),
                BadValue::Int(v) => s.push_str(&format!(": {v}")),
                BadValue::Go(v) => s.push_str(&format!(": {v}")),
            }
        }
        if !self.detail.is_empty() {
            s.push_str(": ");
            s.push_str(&self.detail);
        }
        s
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.body())
    }
}

/// Go's `%#v` of a `[]string`.
pub fn go_string_slice(items: &[String]) -> String {
    format!(
        "[]string{{{}}}",
        items
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: GroupResource = GroupResource {
        group: "",
        resource: "nodes",
    };

    #[test]
    fn not_found_matches_apimachinery() {
        let e = ApiError::not_found(&NODES, "x");
        assert_eq!(
            String::from_utf8(e.to_bytes()).unwrap(),
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"nodes \"x\" not found","reason":"NotFound","details":{"name":"x","kind":"nodes"},"code":404}"#
        );
    }

    #[test]
    fn invalid_aggregates_causes() {
        let e = ApiError::invalid(
            "Node",
            "n",
            &[FieldError::forbidden(
                "spec.podCIDRs",
                "node updates may not change podCIDR except from \"\" to valid",
            )],
        );
        assert_eq!(e.code, 422);
        assert_eq!(
            e.message,
            "Node \"n\" is invalid: spec.podCIDRs: Forbidden: node updates may not change podCIDR except from \"\" to valid"
        );
        let j = e.to_json();
        assert_eq!(j["details"]["causes"][0]["reason"], "FieldValueForbidden");
        assert_eq!(j["details"]["causes"][0]["field"], "spec.podCIDRs");
        let two = ApiError::invalid(
            "Node",
            "n",
            &[
                FieldError::required("metadata.name", "name or generateName is required"),
                FieldError::invalid("spec.podCIDRs[0]", BadValue::Str("x".into()), "bad"),
            ],
        );
        assert_eq!(
            two.message,
            "Node \"n\" is invalid: [metadata.name: Required value: name or generateName is required, spec.podCIDRs[0]: Invalid value: \"x\": bad]"
        );
    }

    #[test]
    fn forbidden_without_name() {
        let e = ApiError::forbidden(
            Some(("", "nodes")),
            "",
            "User \"u\" cannot list resource \"nodes\" in API group \"\" at the cluster scope",
        );
        assert_eq!(
            e.message,
            "nodes is forbidden: User \"u\" cannot list resource \"nodes\" in API group \"\" at the cluster scope"
        );
        assert_eq!(e.to_json()["details"], serde_json::json!({"kind": "nodes"}));
    }
}
