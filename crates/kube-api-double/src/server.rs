//! The HTTP API: kube-apiserver's filter chain (authentication, audit,
//! authorization) in front of discovery, health and the resource handlers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::audit::{AuditLog, AuditRecord, AuditUser, ObjectRef};
use crate::auth::{Authenticator, Authn};
use crate::rbac::{self, Attributes, AuthorizationMode, ResourceAttributes};
use crate::request::{is_watch, parse_query, Query, RequestInfo};
use crate::resources::{self, Kind, Part};
use crate::selectors::{FieldSelector, LabelSelector, Selector};
use crate::smp::{self, SmpError};
use crate::status::{ApiError, BadValue, FieldError};
use crate::store::{Store, StoredObject};
use crate::util::{name_suffix, now_rfc3339, uuid_v4};

/// The version the double reports (`/version`, `--version`).
pub const KUBE_VERSION: &str = "v1.36.2";
/// Request bodies larger than this are refused (kube-apiserver's `--max-request-bytes`).
const MAX_BODY: usize = 3 * 1024 * 1024;
/// How long a request for a resourceVersion the store has not reached waits.
const TOO_LARGE_RV_WAIT: Duration = Duration::from_secs(3);
/// Namespaces that cannot be deleted.
const PROTECTED_NAMESPACES: [&str; 3] = ["default", "kube-system", "kube-public"];
/// Namespaces of a fresh cluster.
pub const SYSTEM_NAMESPACES: [&str; 4] =
    ["default", "kube-system", "kube-public", "kube-node-lease"];

/// The remote address of the connection, put into each request.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Everything the handlers share.
pub struct App {
    pub store: Arc<Store>,
    pub authn: Authenticator,
    pub mode: AuthorizationMode,
    pub audit: Option<AuditLog>,
    pub bookmark_interval: Duration,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// `host:port` the server listens on (`/api`'s serverAddressByClientCIDRs).
    pub address: String,
}

/// A handler's answer.
pub enum Reply {
    Json(u16, Bytes),
    Text(u16, &'static str),
    /// A watch: the stream audits itself.
    Stream(Response),
}

/// A JSON answer; like kube-apiserver's encoder, the body ends with a newline.
fn json_response(code: u16, body: Bytes, audit_id: &str) -> Response {
    let mut bytes = Vec::with_capacity(body.len() + 1);
    bytes.extend_from_slice(&body);
    bytes.push(b'\n');
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(audit_id) {
        h.insert("audit-id", v);
    }
    r
}

fn error_response(e: &ApiError, audit_id: &str) -> Response {
    let mut r = json_response(e.code, Bytes::from(e.to_bytes()), audit_id);
    r.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn object_ref(info: &RequestInfo) -> Option<ObjectRef> {
    if !info.resource_request {
        return None;
    }
    Some(ObjectRef {
        resource: info.resource.clone(),
        namespace: info.namespace.clone(),
        name: info.name.clone(),
        api_group: info.group.clone(),
        api_version: info.version.clone(),
        subresource: info.subresource.clone(),
    })
}

impl App {
    fn audit(&self, rec: &AuditRecord, stage: &str, code: u16, err: Option<&ApiError>) {
        if let Some(log) = &self.audit {
            let status = err.map(ApiError::to_json);
            log.write(rec, stage, code, status.as_ref());
        }
    }
}

/// The one handler: every request of every path comes here.
pub async fn handle(State(app): State<Arc<App>>, req: Request) -> Response {
    let received = jiff::Timestamp::now();
    let peer = req
        .extensions()
        .get::<Peer>()
        .map(|p| p.0.ip().to_string())
        .unwrap_or_default();
    let method = req.method().as_str().to_string();
    let uri = req.uri().clone();
    let query = parse_query(uri.query());
    let request_uri = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_string(), |p| p.as_str().to_string());
    let headers = req.headers().clone();
    let header_str = |h: header::HeaderName| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let info = RequestInfo::parse(&method, uri.path(), &query);
    let audit_id = uuid_v4();
    let mut rec = AuditRecord {
        id: audit_id.clone(),
        request_uri,
        verb: info.verb.clone(),
        user: AuditUser::default(),
        source_ip: peer,
        user_agent: header_str(header::USER_AGENT),
        object_ref: object_ref(&info),
        received,
        annotations: Vec::new(),
    };

    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let user = match app.authn.authenticate(authorization) {
        Authn::User(u) => u,
        Authn::Rejected => {
            let e = ApiError::unauthorized();
            app.audit(&rec, "ResponseStarted", 401, Some(&e));
            return error_response(&e, &audit_id);
        }
    };
    rec.user = AuditUser::from(&user);

    let attrs = Attributes {
        user: &user,
        verb: &info.verb,
        resource: info.resource_request.then(|| ResourceAttributes {
            group: &info.group,
            resource: &info.resource,
            subresource: &info.subresource,
            name: &info.name,
            namespace: &info.namespace,
        }),
        path: &info.path,
    };
    let decision = rbac::authorize(app.mode, &app.store, &attrs);
    rec.annotations = vec![
        (
            "authorization.k8s.io/decision".into(),
            if decision.allowed { "allow" } else { "forbid" }.into(),
        ),
        (
            "authorization.k8s.io/reason".into(),
            decision.reason.clone(),
        ),
    ];
    if !decision.allowed {
        let mut why = rbac::forbidden_message(&attrs);
        if !decision.reason.is_empty() {
            why = format!("{why}: {}", decision.reason);
        }
        let gr = info
            .resource_request
            .then_some((info.group.as_str(), info.resource.as_str()));
        let e = ApiError::forbidden(gr, &info.name, &why);
        app.audit(&rec, "ResponseComplete", 403, Some(&e));
        return error_response(&e, &audit_id);
    }

    let body = match axum::body::to_bytes(req.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            let e = ApiError {
                code: 413,
                reason: "RequestEntityTooLarge",
                message: format!("Request entity too large: limit is {MAX_BODY}"),
                details: None,
                continue_token: None,
            };
            app.audit(&rec, "ResponseComplete", 413, Some(&e));
            return error_response(&e, &audit_id);
        }
    };

    let ctx = Ctx {
        app: &app,
        info: &info,
        query: &query,
        headers: &headers,
        body,
        warnings: std::sync::Mutex::new(Vec::new()),
    };
    let result = dispatch(&ctx, &rec).await;
    let warnings = std::mem::take(&mut *ctx.warnings.lock().expect("warnings lock"));
    let code = match &result {
        Ok(Reply::Json(c, _) | Reply::Text(c, _)) => *c,
        Ok(Reply::Stream(_)) => 200,
        Err(e) => e.code,
    };
    tracing::debug!(verb = %info.verb, uri = %rec.request_uri, user = %user.name, code, "request");
    let mut response = match result {
        Ok(Reply::Stream(resp)) => resp,
        Ok(Reply::Json(code, bytes)) => {
            app.audit(&rec, "ResponseComplete", code, None);
            json_response(code, bytes, &audit_id)
        }
        Ok(Reply::Text(code, text)) => {
            app.audit(&rec, "ResponseComplete", code, None);
            let mut r = Response::new(Body::from(text));
            *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r.headers_mut().insert(
                "x-content-type-options",
                HeaderValue::from_static("nosniff"),
            );
            r
        }
        Err(e) => {
            app.audit(&rec, "ResponseComplete", e.code, Some(&e));
            error_response(&e, &audit_id)
        }
    };
    for w in warnings {
        let text = format!("299 - {:?}", format!("unknown field {w:?}"));
        if let Ok(v) = HeaderValue::from_str(&text) {
            response.headers_mut().append("warning", v);
        }
    }
    response
}

/// One request's inputs.
pub struct Ctx<'a> {
    pub app: &'a Arc<App>,
    pub info: &'a RequestInfo,
    pub query: &'a Query,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
    /// `Warning` headers of the answer (unknown fields).
    pub warnings: std::sync::Mutex<Vec<String>>,
}

impl Ctx<'_> {
    fn warn(&self, unknown: Vec<String>) {
        self.warnings.lock().expect("warnings lock").extend(unknown);
    }

    fn content_type(&self) -> String {
        let ct = self
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        ct.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    }
}

/// Whether the `Accept` header takes JSON (the only encoding served).
fn accepts_json(headers: &HeaderMap) -> bool {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    accept.trim().is_empty()
        || accept.split(',').any(|m| {
            let t = m
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            t == "application/json" || t == "*/*" || t == "application/*" || t.ends_with("+json")
        })
}

async fn dispatch(ctx: &Ctx<'_>, rec: &AuditRecord) -> Result<Reply, ApiError> {
    let info = ctx.info;
    if !info.resource_request {
        return non_resource(ctx);
    }
    if !accepts_json(ctx.headers) {
        return Err(ApiError {
            code: 406,
            reason: "NotAcceptable",
            message: "only the following media types are accepted: application/json".into(),
            details: None,
            continue_token: None,
        });
    }
    if ctx.query.get("dryRun").is_some_and(|v| !v.is_empty()) {
        return Err(ApiError::bad_request(
            "dryRun is not supported by kube-api-double",
        ));
    }
    let kind = match Kind::from_resource(&info.group, &info.resource) {
        Some(k) if info.version == "v1" => k,
        _ => return Err(ApiError::path_not_found()),
    };
    if !info.extra.is_empty() {
        return Err(ApiError::path_not_found());
    }
    let ns = info.namespace.as_str();
    if !kind.namespaced() && kind != Kind::Namespace && !ns.is_empty() {
        return Err(ApiError::path_not_found());
    }
    let part = match info.subresource.as_str() {
        "" => Part::Main,
        "status" if kind.has_status() => Part::Status,
        _ => return Err(ApiError::path_not_found()),
    };
    let ns = if kind == Kind::Namespace { "" } else { ns };
    let name = info.name.as_str();
    match info.verb.as_str() {
        "get" => get(ctx, kind, ns, name),
        "list" if part == Part::Main => list(ctx, kind, ns).await,
        "watch" if part == Part::Main => crate::watch::watch(ctx, kind, ns, name, rec).await,
        "create" if part == Part::Main && name.is_empty() => {
            if kind.namespaced() && ns.is_empty() {
                return Err(ApiError::method_not_allowed());
            }
            create(ctx, kind, ns).await
        }
        "update" if !name.is_empty() => update(ctx, kind, ns, name, part).await,
        "patch" if !name.is_empty() => patch(ctx, kind, ns, name, part).await,
        "delete" if part == Part::Main => delete(ctx, kind, ns, name).await,
        "deletecollection" if part == Part::Main && kind != Kind::Namespace => {
            delete_collection(ctx, kind, ns).await
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn store_key(kind: Kind, ns: &str, name: &str) -> String {
    if kind.namespaced() {
        format!("{ns}/{name}")
    } else {
        name.to_string()
    }
}

fn get(ctx: &Ctx<'_>, kind: Kind, ns: &str, name: &str) -> Result<Reply, ApiError> {
    match ctx.app.store.get(kind, &store_key(kind, ns, name)) {
        Some(o) => Ok(Reply::Json(200, o.json_with_kind())),
        None => Err(ApiError::not_found(&kind.gr(), name)),
    }
}

/// Decodes a create or update body.
fn decode_body(ctx: &Ctx<'_>, kind: Kind) -> Result<Value, ApiError> {
    let ct = ctx.content_type();
    if !(ct.is_empty() || ct == "application/json" || ct == "*/*") {
        return Err(ApiError::unsupported_media_type(&["application/json"]));
    }
    let v: Value = serde_json::from_slice(&ctx.body).map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })?;
    let Value::Object(m) = &v else {
        return Err(ApiError::bad_request(format!(
            "couldn't get version/kind; json parse error: json: cannot unmarshal {} into Go value of type struct {{ APIVersion string \"json:\\\"apiVersion,omitempty\\\"\"; Kind string \"json:\\\"kind,omitempty\\\"\" }}",
            match v {
                Value::Array(_) => "array",
                Value::String(_) => "string",
                Value::Number(_) => "number",
                Value::Bool(_) => "bool",
                _ => "null",
            }
        )));
    };
    if let Some(av) = m.get("apiVersion").and_then(Value::as_str) {
        if !av.is_empty() && av != kind.api_version() {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                kind.api_version()
            )));
        }
    }
    if let Some(k) = m.get("kind").and_then(Value::as_str) {
        if !k.is_empty() && k != kind.kind() {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                kind.kind()
            )));
        }
    }
    let typed = resources::decode(kind, &v).map_err(|e| {
        ApiError::bad_request(format!(
            "{} in version {:?} cannot be handled as a {}: {}",
            kind.kind(),
            "v1",
            kind.kind(),
            e.json
        ))
    })?;
    let mut v = v;
    ctx.warn(resources::drop_unknown(&mut v, &typed));
    Ok(v)
}

fn meta_str<'a>(v: &'a Value, field: &str) -> &'a str {
    v.pointer(&format!("/metadata/{field}"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn set_meta(v: &mut Value, field: &str, value: Value) {
    if !v.get("metadata").is_some_and(Value::is_object) {
        v["metadata"] = json!({});
    }
    v["metadata"][field] = value;
}

/// Checks (and fills in) the namespace of a body against the URL's.
fn check_namespace(kind: Kind, v: &mut Value, ns: &str) -> Result<(), ApiError> {
    if !kind.namespaced() {
        return Ok(());
    }
    let body_ns = meta_str(v, "namespace");
    if body_ns.is_empty() {
        set_meta(v, "namespace", Value::String(ns.to_string()));
    } else if body_ns != ns {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    Ok(())
}

/// Creates an object as kube-apiserver's registry does (also used for
/// the bootstrap objects): defaults, admission, validation, uid and
/// creation time.
pub async fn create_object(
    store: &Store,
    kind: Kind,
    mut obj: Value,
) -> Result<Arc<StoredObject>, ApiError> {
    if meta_str(&obj, "name").is_empty() {
        let prefix = meta_str(&obj, "generateName").to_string();
        if !prefix.is_empty() {
            set_meta(
                &mut obj,
                "name",
                Value::String(format!("{prefix}{}", name_suffix())),
            );
        }
    }
    if !meta_str(&obj, "resourceVersion").is_empty() {
        return Err(ApiError::internal(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    resources::normalize(kind, &mut obj);
    resources::prepare_create(kind, &mut obj);
    let errs = resources::validate_create(kind, &obj);
    if !errs.is_empty() {
        return Err(ApiError::invalid(
            kind.kind(),
            meta_str(&obj, "name"),
            &errs,
        ));
    }
    if kind.namespaced() {
        let ns = meta_str(&obj, "namespace").to_string();
        match store.get(Kind::Namespace, &ns) {
            None => return Err(ApiError::not_found(&Kind::Namespace.gr(), &ns)),
            Some(n) if n.value.pointer("/metadata/deletionTimestamp").is_some() => {
                return Err(ApiError::forbidden(
                    Some((kind.group(), kind.resource())),
                    meta_str(&obj, "name"),
                    &format!("unable to create new content in namespace {ns} because it is being terminated"),
                ))
            }
            Some(_) => {}
        }
    }
    if kind == Kind::Pod {
        // The ServiceAccount admission plugin refuses a pod whose service
        // account does not exist (kube-controller-manager creates each
        // namespace's `default` one; without it, none exists).
        let ns = meta_str(&obj, "namespace").to_string();
        let sa = obj
            .pointer("/spec/serviceAccountName")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        if store
            .get(Kind::ServiceAccount, &format!("{ns}/{sa}"))
            .is_none()
        {
            return Err(ApiError::forbidden(
                Some((kind.group(), kind.resource())),
                meta_str(&obj, "name"),
                &format!(
                    "error looking up service account {ns}/{sa}: serviceaccount \"{sa}\" not found"
                ),
            ));
        }
    }
    let meta = obj["metadata"].as_object_mut().expect("normalized");
    meta.insert("uid".into(), Value::String(uuid_v4()));
    meta.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
    meta.remove("deletionTimestamp");
    meta.remove("deletionGracePeriodSeconds");
    store.create(kind, obj).await
}

async fn create(ctx: &Ctx<'_>, kind: Kind, ns: &str) -> Result<Reply, ApiError> {
    let mut obj = decode_body(ctx, kind)?;
    check_namespace(kind, &mut obj, ns)?;
    let stored = create_object(&ctx.app.store, kind, obj).await?;
    Ok(Reply::Json(201, stored.json_with_kind()))
}

/// The end of every update (PUT or PATCH): preconditions, the strategy's
/// resets, validation.
fn finish_update(
    kind: Kind,
    mut new: Value,
    cur: &StoredObject,
    part: Part,
) -> Result<Value, ApiError> {
    let name = cur.name().to_string();
    let rv = meta_str(&new, "resourceVersion");
    if !rv.is_empty() && rv != cur.rv.to_string() {
        return Err(ApiError::modified(&kind.gr(), &name));
    }
    let uid = meta_str(&new, "uid");
    if !uid.is_empty() && uid != cur.uid() {
        return Err(ApiError::conflict(
            &kind.gr(),
            &name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                cur.uid()
            ),
        ));
    }
    resources::normalize(kind, &mut new);
    resources::prepare_update(kind, &mut new, &cur.value, part);
    let errs = resources::validate_update(kind, &new, &cur.value);
    if !errs.is_empty() {
        return Err(ApiError::invalid(kind.kind(), &name, &errs));
    }
    Ok(new)
}

fn check_name(v: &Value, name: &str) -> Result<(), ApiError> {
    let body_name = meta_str(v, "name");
    if body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    Ok(())
}

async fn update(
    ctx: &Ctx<'_>,
    kind: Kind,
    ns: &str,
    name: &str,
    part: Part,
) -> Result<Reply, ApiError> {
    let mut obj = decode_body(ctx, kind)?;
    check_name(&obj, name)?;
    check_namespace(kind, &mut obj, ns)?;
    let (stored, _) = ctx
        .app
        .store
        .update(kind, &store_key(kind, ns, name), |cur| {
            finish_update(kind, obj, cur, part)
        })
        .await?;
    Ok(Reply::Json(200, stored.json_with_kind()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PatchType {
    Json,
    Merge,
    Strategic,
}

const PATCH_TYPES: [&str; 3] = [
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
];

fn patch_error(value: String, detail: String) -> ApiError {
    ApiError::invalid(
        "",
        "",
        &[FieldError::invalid("patch", BadValue::Str(value), detail)],
    )
}

/// Applies a patch to the current version; returns the result without
/// unknown fields, and the paths of those.
fn apply_patch(
    kind: Kind,
    ptype: PatchType,
    cur: &StoredObject,
    body: &[u8],
) -> Result<(Value, Vec<String>), ApiError> {
    let current = cur.value_with_kind();
    let (mut patched, typed) = match ptype {
        PatchType::Strategic => {
            let patch: Value =
                serde_json::from_slice(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
            let patched = smp::strategic_merge(current, patch.clone(), kind.schema()).map_err(
                |e| match e {
                    SmpError::BadRequest(m) => ApiError::bad_request(m),
                    SmpError::Unprocessable(_) => ApiError::unprocessable(),
                    SmpError::Internal(m) => ApiError::internal(m),
                },
            )?;
            match resources::decode(kind, &patched) {
                Ok(t) => (patched, t),
                Err(e) => return Err(patch_error(smp::go_value(&patch), e.unstructured)),
            }
        }
        PatchType::Merge => {
            let patch: Value = serde_json::from_slice(body)
                .map_err(|_| ApiError::bad_request("Invalid JSON Patch"))?;
            let mut doc = current;
            json_patch::merge(&mut doc, &patch);
            match resources::decode(kind, &doc) {
                Ok(t) => (doc, t),
                Err(e) => return Err(patch_error(doc.to_string(), e.json)),
            }
        }
        PatchType::Json => {
            let ops: json_patch::Patch =
                serde_json::from_slice(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
            if ops.0.len() > 10_000 {
                return Err(ApiError {
                    code: 413,
                    reason: "RequestEntityTooLarge",
                    message: format!(
                        "Request entity too large: The allowed maximum operations in a JSON patch is 10000, got {}",
                        ops.0.len()
                    ),
                    details: None,
                    continue_token: None,
                });
            }
            let mut doc = current;
            json_patch::patch(&mut doc, &ops).map_err(|_| ApiError::unprocessable())?;
            match resources::decode(kind, &doc) {
                Ok(t) => (doc, t),
                Err(e) => return Err(patch_error(doc.to_string(), e.json)),
            }
        }
    };
    let unknown = resources::drop_unknown(&mut patched, &typed);
    Ok((patched, unknown))
}

async fn patch(
    ctx: &Ctx<'_>,
    kind: Kind,
    ns: &str,
    name: &str,
    part: Part,
) -> Result<Reply, ApiError> {
    let ptype = match ctx.content_type().as_str() {
        "application/json-patch+json" => PatchType::Json,
        "application/merge-patch+json" => PatchType::Merge,
        "application/strategic-merge-patch+json" => PatchType::Strategic,
        _ => return Err(ApiError::unsupported_media_type(&PATCH_TYPES)),
    };
    let body = ctx.body.clone();
    let (stored, _) = ctx
        .app
        .store
        .update(kind, &store_key(kind, ns, name), |cur| {
            let (mut patched, unknown) = apply_patch(kind, ptype, cur, &body)?;
            ctx.warn(unknown);
            check_name(&patched, name)?;
            check_namespace(kind, &mut patched, ns)?;
            finish_update(kind, patched, cur, part)
        })
        .await?;
    Ok(Reply::Json(200, stored.json_with_kind()))
}

/// `DeleteOptions` from the body and the query.
struct DeleteOptions {
    grace: Option<i64>,
    uid: Option<String>,
    rv: Option<String>,
}

fn delete_options(ctx: &Ctx<'_>) -> Result<DeleteOptions, ApiError> {
    let mut o = DeleteOptions {
        grace: None,
        uid: None,
        rv: None,
    };
    if let Some(g) = ctx.query.get("gracePeriodSeconds") {
        o.grace = Some(g.parse().map_err(|_| {
            ApiError::bad_request(format!("strconv.ParseInt: parsing {g:?}: invalid syntax"))
        })?);
    }
    if !ctx.body.is_empty() {
        let v: Value = serde_json::from_slice(&ctx.body).map_err(|e| {
            ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
        })?;
        if let Some(g) = v.get("gracePeriodSeconds").and_then(Value::as_i64) {
            o.grace = Some(g);
        }
        o.uid = v
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(String::from);
        o.rv = v
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(String::from);
    }
    Ok(o)
}

fn check_preconditions(kind: Kind, o: &DeleteOptions, cur: &StoredObject) -> Result<(), ApiError> {
    if let Some(uid) = &o.uid {
        if uid != cur.uid() {
            return Err(ApiError::conflict(
                &kind.gr(),
                cur.name(),
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    cur.uid()
                ),
            ));
        }
    }
    if let Some(rv) = &o.rv {
        if *rv != cur.rv.to_string() {
            return Err(ApiError::conflict(
                &kind.gr(),
                cur.name(),
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    cur.rv
                ),
            ));
        }
    }
    Ok(())
}

fn success_status(kind: Kind, name: &str, uid: &str) -> Bytes {
    let mut details = json!({"name": name, "kind": kind.resource(), "uid": uid});
    if !kind.group().is_empty() {
        details["group"] = json!(kind.group());
    }
    Bytes::from(
        serde_json::to_vec(&json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details
        }))
        .expect("JSON values serialize"),
    )
}

async fn delete(ctx: &Ctx<'_>, kind: Kind, ns: &str, name: &str) -> Result<Reply, ApiError> {
    let opts = delete_options(ctx)?;
    let store = &ctx.app.store;
    let key = store_key(kind, ns, name);
    match kind {
        Kind::Namespace => {
            if PROTECTED_NAMESPACES.contains(&name) {
                return Err(ApiError::forbidden(
                    Some((kind.group(), kind.resource())),
                    name,
                    "this namespace may not be deleted",
                ));
            }
            let (terminating, _) = store
                .update(kind, &key, |cur| {
                    check_preconditions(kind, &opts, cur)?;
                    let mut v = cur.value.clone();
                    set_meta(&mut v, "deletionTimestamp", Value::String(now_rfc3339()));
                    v["status"] = json!({"phase": "Terminating"});
                    Ok(v)
                })
                .await?;
            // What the namespace controller does: remove the content, then
            // the namespace.
            for content in [Kind::Pod, Kind::ServiceAccount] {
                for obj in store.in_namespace(content, name) {
                    let _ = store.delete(content, &obj.key, |_| Ok(())).await;
                }
            }
            let _ = store.delete(kind, &key, |_| Ok(())).await;
            Ok(Reply::Json(200, terminating.json_with_kind()))
        }
        Kind::Pod => {
            let Some(cur) = store.get(kind, &key) else {
                return Err(ApiError::not_found(&kind.gr(), name));
            };
            let grace = opts.grace.unwrap_or_else(|| {
                cur.value
                    .pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
                    .unwrap_or(30)
            });
            let bound = cur
                .value
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty());
            let phase = cur
                .value
                .pointer("/status/phase")
                .and_then(Value::as_str)
                .unwrap_or("");
            if bound && grace > 0 && phase != "Succeeded" && phase != "Failed" {
                // Graceful: the kubelet would finish it; the object stays.
                let (o, _) = store
                    .update(kind, &key, |cur| {
                        check_preconditions(kind, &opts, cur)?;
                        let mut v = cur.value.clone();
                        if v.pointer("/metadata/deletionTimestamp").is_none() {
                            let at =
                                jiff::Timestamp::now() + jiff::SignedDuration::from_secs(grace);
                            set_meta(
                                &mut v,
                                "deletionTimestamp",
                                Value::String(crate::util::rfc3339(at)),
                            );
                            set_meta(&mut v, "deletionGracePeriodSeconds", json!(grace));
                        }
                        Ok(v)
                    })
                    .await?;
                return Ok(Reply::Json(200, o.json_with_kind()));
            }
            let last = store
                .delete(kind, &key, |cur| check_preconditions(kind, &opts, cur))
                .await?;
            Ok(Reply::Json(200, last.json_with_kind()))
        }
        _ => {
            let last = store
                .delete(kind, &key, |cur| check_preconditions(kind, &opts, cur))
                .await?;
            Ok(Reply::Json(200, success_status(kind, name, last.uid())))
        }
    }
}

async fn delete_collection(ctx: &Ctx<'_>, kind: Kind, ns: &str) -> Result<Reply, ApiError> {
    let sel = selector(ctx.query, kind)?;
    let (_, objects) = ctx.app.store.snapshot(kind, None).unwrap_or_default();
    let mut deleted = Vec::new();
    for o in objects {
        if !in_namespace(&o, ns) || !sel.matches(kind, &o.value) {
            continue;
        }
        if let Ok(last) = ctx.app.store.delete(kind, &o.key, |_| Ok(())).await {
            deleted.push(last);
        }
    }
    let rv = ctx.app.store.current_rv();
    Ok(Reply::Json(
        200,
        list_body(kind, &deleted, &json!({"resourceVersion": rv.to_string()})),
    ))
}

fn in_namespace(o: &StoredObject, ns: &str) -> bool {
    ns.is_empty() || o.key.split_once('/').is_some_and(|(n, _)| n == ns)
}

/// The label and field selectors of a list or watch.
pub fn selector(q: &Query, kind: Kind) -> Result<Selector, ApiError> {
    let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str), kind)
        .map_err(ApiError::bad_request)?;
    Ok(Selector { labels, fields })
}

/// `resourceVersion` of a list or watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rv {
    Unset,
    Zero,
    At(u64),
}

pub fn parse_rv(q: &Query) -> Result<Rv, ApiError> {
    match q.get("resourceVersion").map(String::as_str) {
        None | Some("") => Ok(Rv::Unset),
        Some("0") => Ok(Rv::Zero),
        Some(s) => s
            .parse::<u64>()
            .map(Rv::At)
            .map_err(|_| ApiError::bad_request(format!("invalid resource version: {s:?}"))),
    }
}

fn list_options_invalid(errs: Vec<FieldError>) -> ApiError {
    ApiError::invalid("ListOptions.meta.k8s.io", "", &errs)
}

/// Waits until the store reached `rv`; 504 after a while (kube-apiserver's
/// "Too large resource version").
pub async fn wait_for_rv(store: &Store, rv: u64) -> Result<(), ApiError> {
    if store.current_rv() >= rv || store.wait_for(rv, TOO_LARGE_RV_WAIT).await {
        return Ok(());
    }
    Err(ApiError::too_large_resource_version(rv, store.current_rv()))
}

/// A list body: items are the stored JSON (without kind/apiVersion).
fn list_body(kind: Kind, items: &[Arc<StoredObject>], metadata: &Value) -> Bytes {
    let head = format!(
        "{{\"kind\":\"{}\",\"apiVersion\":\"{}\",\"metadata\":{},\"items\":[",
        kind.list_kind(),
        kind.api_version(),
        metadata
    );
    let len: usize = items.iter().map(|o| o.json.len() + 1).sum();
    let mut out = Vec::with_capacity(head.len() + len + 2);
    out.extend_from_slice(head.as_bytes());
    for (i, o) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&o.json);
    }
    out.extend_from_slice(b"]}");
    Bytes::from(out)
}

const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";

fn encode_continue(rv: i64, start: &str) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(i64, String), ApiError> {
    let bad = |why: String| {
        ApiError::bad_request(format!(
            "invalid continue token: continue key is not valid: {why}"
        ))
    };
    let data = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|e| match e {
            base64::DecodeError::InvalidByte(at, _) => {
                bad(format!("illegal base64 data at input byte {at}"))
            }
            other => bad(other.to_string()),
        })?;
    let v: Value = serde_json::from_slice(&data).map_err(|e| bad(e.to_string()))?;
    match v.get("v").and_then(Value::as_str) {
        Some("meta.k8s.io/v1") => {}
        other => {
            return Err(ApiError::bad_request(format!(
                "invalid continue token: continue key is not valid: server does not recognize this encoded version {}",
                other.unwrap_or("")
            )))
        }
    }
    let rv = v.get("rv").and_then(Value::as_i64).unwrap_or(0);
    if rv == 0 {
        return Err(ApiError::bad_request(
            "invalid continue token: continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        ));
    }
    let start = v
        .get("start")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if start.is_empty() {
        return Err(ApiError::bad_request(
            "invalid continue token: continue key is not valid: encoded start key empty (version meta.k8s.io/v1)",
        ));
    }
    Ok((rv, start))
}

async fn list(ctx: &Ctx<'_>, kind: Kind, ns: &str) -> Result<Reply, ApiError> {
    let q = ctx.query;
    watch_requested(q)?;
    let sel = selector(q, kind)?;
    let rv = parse_rv(q)?;
    let matching = q
        .get("resourceVersionMatch")
        .map(String::as_str)
        .unwrap_or("");
    let cont = q.get("continue").map(String::as_str).unwrap_or("");
    let mut errs = Vec::new();
    if !matching.is_empty() {
        if rv == Rv::Unset {
            errs.push(FieldError::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        if !cont.is_empty() {
            errs.push(FieldError::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden when continue is provided",
            ));
        }
        if matching != "Exact" && matching != "NotOlderThan" {
            errs.push(FieldError::not_supported(
                "resourceVersionMatch",
                BadValue::Str(matching.to_string()),
                &["Exact", "NotOlderThan", ""],
            ));
        }
        if matching == "Exact" && rv == Rv::Zero {
            errs.push(FieldError::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
            ));
        }
    }
    if q.contains_key("sendInitialEvents") {
        errs.push(FieldError::forbidden(
            "sendInitialEvents",
            "sendInitialEvents is forbidden for list",
        ));
    }
    if !errs.is_empty() {
        return Err(list_options_invalid(errs));
    }
    let limit: i64 = match q.get("limit").map(String::as_str) {
        None | Some("") => 0,
        Some(l) => l.parse().map_err(|_| {
            ApiError::bad_request(format!("strconv.ParseInt: parsing {l:?}: invalid syntax"))
        })?,
    };
    let store = &ctx.app.store;
    let (snapshot_at, start, paged) = if !cont.is_empty() {
        if rv != Rv::Unset && rv != Rv::Zero {
            return Err(ApiError::bad_request(
                "specifying resource version is not allowed when using continue",
            ));
        }
        let (token_rv, start) = decode_continue(cont)?;
        let at = if token_rv < 0 {
            None
        } else {
            Some(token_rv as u64)
        };
        (at, Some(start), true)
    } else {
        match rv {
            // Served from the watch cache: the whole list, `limit` ignored.
            Rv::Zero => (None, None, false),
            Rv::Unset => (None, None, true),
            Rv::At(n) => {
                wait_for_rv(store, n).await?;
                if matching == "Exact" {
                    (Some(n), None, true)
                } else {
                    (None, None, true)
                }
            }
        }
    };
    let snapshot = match store.snapshot(kind, snapshot_at) {
        Ok(s) => Some(s),
        // Older than the history: etcd may still have it.
        Err(_) => match snapshot_at {
            Some(at) => store
                .snapshot_from_etcd(kind, at)
                .await?
                .map(|objs| (at, objs)),
            None => None,
        },
    };
    let Some((list_rv, mut objects)) = snapshot else {
        if let Some(start) = &start {
            let mut e = ApiError::expired(CONTINUE_EXPIRED);
            e.continue_token = Some(encode_continue(-1, start));
            return Err(e);
        }
        let at = snapshot_at.unwrap_or(0);
        return Err(ApiError::expired(format!(
            "too old resource version: {at} ({})",
            store.current_rv()
        )));
    };
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    let mut items: Vec<Arc<StoredObject>> = objects
        .into_iter()
        .filter(|o| start.as_deref().is_none_or(|s| o.key.as_str() >= s))
        .filter(|o| in_namespace(o, ns))
        .collect();
    if !sel.is_empty() {
        items.retain(|o| sel.matches(kind, &o.value));
    }
    let mut meta = json!({"resourceVersion": list_rv.to_string()});
    if paged && limit > 0 && items.len() > limit as usize {
        let remaining = items.len() - limit as usize;
        items.truncate(limit as usize);
        let last = &items[items.len() - 1].key;
        meta["continue"] = json!(encode_continue(list_rv as i64, &format!("{last}\u{0}")));
        if sel.is_empty() {
            meta["remainingItemCount"] = json!(remaining);
        }
    }
    Ok(Reply::Json(200, list_body(kind, &items, &meta)))
}

fn to_bytes(v: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("JSON values serialize"))
}

fn resource_entry(kind: Kind, sub: bool) -> Value {
    let mut verbs = vec![
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    ];
    if kind == Kind::Namespace {
        verbs.retain(|v| *v != "deletecollection");
    }
    if sub {
        return json!({
            "name": format!("{}/status", kind.resource()),
            "singularName": "",
            "namespaced": kind.namespaced(),
            "kind": kind.kind(),
            "verbs": ["get", "patch", "update"]
        });
    }
    let mut e = json!({
        "name": kind.resource(),
        "singularName": kind.singular(),
        "namespaced": kind.namespaced(),
        "kind": kind.kind(),
        "verbs": verbs
    });
    if !kind.short_names().is_empty() {
        e["shortNames"] = json!(kind.short_names());
    }
    if kind == Kind::Pod {
        e["categories"] = json!(["all"]);
    }
    e
}

fn resource_list(group_version: &str, kinds: &[Kind]) -> Value {
    let mut resources = Vec::new();
    for k in kinds {
        resources.push(resource_entry(*k, false));
        if k.has_status() {
            resources.push(resource_entry(*k, true));
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

fn rbac_group() -> Value {
    let gv = json!({"groupVersion": "rbac.authorization.k8s.io/v1", "version": "v1"});
    json!({"name": crate::resources::RBAC_GROUP, "versions": [gv.clone()], "preferredVersion": gv})
}

/// Discovery, health and version.
fn non_resource(ctx: &Ctx<'_>) -> Result<Reply, ApiError> {
    let path = ctx.info.path.trim_end_matches('/');
    if ctx.info.verb != "get" && ctx.info.verb != "head" {
        return Err(ApiError::method_not_allowed());
    }
    for health in ["/healthz", "/livez", "/readyz"] {
        if path == health || path.starts_with(&format!("{health}/")) {
            return Ok(Reply::Text(200, "ok"));
        }
    }
    let body = match path {
        "/version" => json!({
            "major": "1",
            "minor": "36",
            "emulationMajor": "1",
            "emulationMinor": "36",
            "minCompatibilityMajor": "1",
            "minCompatibilityMinor": "35",
            "gitVersion": KUBE_VERSION,
            "gitCommit": "kube-api-double",
            "gitTreeState": "clean",
            "buildDate": "",
            "goVersion": "",
            "compiler": "gc",
            "platform": format!("{}/{}", std::env::consts::OS, match std::env::consts::ARCH {
                "x86_64" => "amd64",
                "aarch64" => "arm64",
                other => other,
            })
        }),
        "/api" => json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ctx.app.address}]
        }),
        "/api/v1" => resource_list(
            "v1",
            &[Kind::Namespace, Kind::Node, Kind::Pod, Kind::ServiceAccount],
        ),
        "/apis" => json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [rbac_group()]}),
        "/apis/rbac.authorization.k8s.io" => {
            let mut g = rbac_group();
            g["kind"] = json!("APIGroup");
            g["apiVersion"] = json!("v1");
            g
        }
        "/apis/rbac.authorization.k8s.io/v1" => resource_list(
            "rbac.authorization.k8s.io/v1",
            &[Kind::ClusterRoleBinding, Kind::ClusterRole],
        ),
        _ => return Err(ApiError::path_not_found()),
    };
    Ok(Reply::Json(200, to_bytes(&body)))
}

/// Whether the query asks for a watch (400 for a bad `watch` value).
pub fn watch_requested(q: &Query) -> Result<bool, ApiError> {
    is_watch(q).map_err(ApiError::bad_request)
}
