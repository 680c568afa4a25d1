//! The audit log (`--audit-log-path`): one JSON line per request stage in
//! the `audit.k8s.io/v1` `Event` shape at level `Metadata`, as
//! kube-apiserver writes it with a policy that omits `RequestReceived`:
//! `ResponseStarted` when a watch's stream starts, `ResponseComplete` when a
//! request ends.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;
use serde_json::Value;

use crate::auth::UserInfo;
use crate::Error;

/// `Event.user`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct AuditUser {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub username: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

impl From<&UserInfo> for AuditUser {
    fn from(u: &UserInfo) -> Self {
        AuditUser {
            username: u.name.clone(),
            uid: u.uid.clone(),
            groups: u.groups.clone(),
        }
    }
}

/// `Event.objectRef`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ObjectRef {
    pub resource: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(rename = "apiGroup", skip_serializing_if = "String::is_empty")]
    pub api_group: String,
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub subresource: String,
}

/// What one request contributes to its audit events.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub id: String,
    pub request_uri: String,
    pub verb: String,
    pub user: AuditUser,
    pub source_ip: String,
    pub user_agent: String,
    pub object_ref: Option<ObjectRef>,
    pub received: jiff::Timestamp,
    pub annotations: Vec<(String, String)>,
}

#[derive(Serialize)]
struct Event<'a> {
    kind: &'static str,
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    level: &'static str,
    #[serde(rename = "auditID")]
    audit_id: &'a str,
    stage: &'a str,
    #[serde(rename = "requestURI")]
    request_uri: &'a str,
    verb: &'a str,
    user: &'a AuditUser,
    #[serde(rename = "sourceIPs")]
    source_ips: [&'a str; 1],
    #[serde(rename = "userAgent", skip_serializing_if = "str::is_empty")]
    user_agent: &'a str,
    #[serde(rename = "objectRef", skip_serializing_if = "Option::is_none")]
    object_ref: Option<&'a ObjectRef>,
    #[serde(rename = "responseStatus")]
    response_status: Value,
    #[serde(rename = "requestReceivedTimestamp")]
    received: String,
    #[serde(rename = "stageTimestamp")]
    stage_ts: String,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    annotations: serde_json::Map<String, Value>,
}

/// `MicroTime`: RFC 3339 with microseconds.
pub fn micro_time(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S.%6fZ").to_string()
}

/// The log file; lines are written whole and flushed at once, so a test
/// can read the file while the double runs.
pub struct AuditLog {
    file: Mutex<File>,
}

impl AuditLog {
    pub fn open(path: &Path) -> Result<AuditLog, Error> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::Config(format!("--audit-log-path {}: {e}", path.display())))?;
        Ok(AuditLog {
            file: Mutex::new(file),
        })
    }

    /// Writes one stage of a request. `status` is the `Status` of an error
    /// response (its message, reason, details go into `responseStatus`).
    pub fn write(&self, rec: &AuditRecord, stage: &str, code: u16, status: Option<&Value>) {
        let mut response_status = serde_json::json!({"metadata": {}, "code": code});
        if let Some(Value::Object(s)) = status {
            for k in ["status", "message", "reason", "details"] {
                if let Some(v) = s.get(k) {
                    response_status[k] = v.clone();
                }
            }
        }
        let ev = Event {
            kind: "Event",
            api_version: "audit.k8s.io/v1",
            level: "Metadata",
            audit_id: &rec.id,
            stage,
            request_uri: &rec.request_uri,
            verb: &rec.verb,
            user: &rec.user,
            source_ips: [&rec.source_ip],
            user_agent: &rec.user_agent,
            object_ref: rec.object_ref.as_ref(),
            response_status,
            received: micro_time(rec.received),
            stage_ts: micro_time(jiff::Timestamp::now()),
            annotations: rec
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        };
        let mut line = serde_json::to_vec(&ev).expect("audit events serialize");
        line.push(b'\n');
        let mut f = self.file.lock().expect("audit lock");
        if let Err(e) = f.write_all(&line) {
            tracing::warn!(error = %e, "cannot write the audit log");
        }
    }
}
