//! Watches: `GET ...?watch=true` answers 200 with a chunked stream of
//! JSON events, one per line, as kube-apiserver's watch cache serves them:
//!
//! - no resourceVersion (or `0`): `ADDED` for every current object, then
//!   the changes; `resourceVersion=N`: every change after N from the
//!   history, or one `ERROR` event (410 Expired) and the end of the stream
//!   when N is older than the history;
//! - `sendInitialEvents=true`: the current objects, then a `BOOKMARK`
//!   annotated `k8s.io/initial-events-end`;
//! - `allowWatchBookmarks=true`: a `BOOKMARK` with the current
//!   resourceVersion every bookmark interval;
//! - selectors apply to both the old and new state of a change: an object
//!   that stops matching is `DELETED`, one that starts matching `ADDED`;
//! - the stream ends after `timeoutSeconds`, when the client goes away, when
//!   the watcher falls too far behind, or when the server stops.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::audit::AuditRecord;
use crate::request::parse_bool;
use crate::resources::Kind;
use crate::selectors::Selector;
use crate::server::{parse_rv, selector, wait_for_rv, App, Ctx, Reply, Rv};
use crate::status::{ApiError, FieldError};
use crate::store::{Event, EventType, StoredObject, Subscription, WatchFrom};

/// Lines are sent in chunks of about this size.
const CHUNK: usize = 64 * 1024;

fn bool_param(ctx: &Ctx<'_>, name: &str) -> Result<Option<bool>, ApiError> {
    match ctx.query.get(name) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => parse_bool(v).map(Some).ok_or_else(|| {
            ApiError::bad_request(format!("strconv.ParseBool: parsing {v:?}: invalid syntax"))
        }),
    }
}

/// The object a `BOOKMARK` carries: an empty object of the kind at `rv`,
/// as Go serializes a zero-value object.
fn bookmark_object(kind: Kind, rv: u64, initial_end: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let mut o = json!({"kind": kind.kind(), "apiVersion": kind.api_version(), "metadata": meta});
    match kind {
        Kind::Node => {
            let mut n = json!({});
            crate::resources::normalize(Kind::Node, &mut n);
            o["spec"] = json!({});
            o["status"] = n["status"].clone();
        }
        Kind::Pod => {
            o["spec"] = json!({"containers": null});
            o["status"] = json!({});
        }
        Kind::Namespace => {
            o["spec"] = json!({});
            o["status"] = json!({});
        }
        Kind::ServiceAccount => {}
        Kind::ClusterRole => o["rules"] = Value::Null,
        Kind::ClusterRoleBinding => {
            o["roleRef"] = json!({"apiGroup": "", "kind": "", "name": ""});
        }
    }
    o
}

fn line(ty: &str, object: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(object.len() + 32);
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(ty.as_bytes());
    out.extend_from_slice(b"\",\"object\":");
    out.extend_from_slice(object);
    out.extend_from_slice(b"}\n");
    out
}

struct Filter {
    kind: Kind,
    namespace: String,
    name: String,
    selector: Selector,
}

impl Filter {
    fn matches(&self, o: &StoredObject) -> bool {
        (self.namespace.is_empty()
            || o.key
                .split_once('/')
                .is_some_and(|(n, _)| n == self.namespace))
            && (self.name.is_empty() || o.name() == self.name)
            && self.selector.matches(self.kind, &o.value)
    }

    /// The line a change is for this watcher, if any.
    fn convert(&self, ev: &Event) -> Option<Vec<u8>> {
        let cur = ev.ty != EventType::Deleted && self.matches(&ev.obj);
        let old = ev.prev.as_ref().is_some_and(|p| self.matches(p));
        match (cur, old) {
            (true, false) => Some(line("ADDED", &ev.obj.json_with_kind())),
            (true, true) => Some(line(ev.ty.as_str(), &ev.obj.json_with_kind())),
            (false, true) => {
                // Gone from this watcher's view: its last state at this version.
                let last = if ev.ty == EventType::Deleted {
                    ev.obj.clone()
                } else {
                    StoredObject::new(self.kind, ev.prev.as_ref()?.value.clone(), ev.rv)
                };
                Some(line("DELETED", &last.json_with_kind()))
            }
            (false, false) => None,
        }
    }
}

/// Serves a watch request.
pub async fn watch(
    ctx: &Ctx<'_>,
    kind: Kind,
    ns: &str,
    name: &str,
    rec: &AuditRecord,
) -> Result<Reply, ApiError> {
    let q = ctx.query;
    let sel = selector(q, kind)?;
    let rv = parse_rv(q)?;
    let bookmarks = bool_param(ctx, "allowWatchBookmarks")?.unwrap_or(false);
    let send_initial = bool_param(ctx, "sendInitialEvents")?;
    let matching = q
        .get("resourceVersionMatch")
        .map(String::as_str)
        .unwrap_or("");
    let mut errs = Vec::new();
    match send_initial {
        Some(_) => {
            if matching != "NotOlderThan" {
                errs.push(FieldError::forbidden(
                    "resourceVersionMatch",
                    "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                ));
            }
            if !bookmarks {
                errs.push(FieldError::forbidden(
                    "allowWatchBookmarks",
                    "sendInitialEvents requires setting allowWatchBookmarks to true",
                ));
            }
        }
        None if !matching.is_empty() => errs.push(FieldError::forbidden(
            "resourceVersionMatch",
            "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        )),
        None => {}
    }
    if !errs.is_empty() {
        return Err(ApiError::invalid("ListOptions.meta.k8s.io", "", &errs));
    }
    let timeout = match q.get("timeoutSeconds").map(String::as_str) {
        None | Some("") => {
            // kube-apiserver: a random time between --min-request-timeout and twice it.
            Duration::from_secs(1800 + rand::rng().random_range(0..1800))
        }
        Some(s) => {
            let secs: i64 = s.parse().map_err(|_| {
                ApiError::bad_request(format!("strconv.ParseInt: parsing {s:?}: invalid syntax"))
            })?;
            Duration::from_secs(secs.max(0) as u64)
        }
    };
    let store = &ctx.app.store;
    if let Rv::At(n) = rv {
        wait_for_rv(store, n).await?;
    }
    let from = match (send_initial, rv) {
        (Some(true), _) => WatchFrom::Now,
        (Some(false), Rv::Unset | Rv::Zero) => WatchFrom::After(store.current_rv()),
        (_, Rv::At(n)) => WatchFrom::After(n),
        (None, Rv::Unset | Rv::Zero) => WatchFrom::Now,
    };
    let start = match store.watch(kind, from) {
        Ok(sub) => Ok(sub),
        Err(e) if e.code == 410 => Err(e),
        Err(e) => return Err(e),
    };
    let filter = Filter {
        kind,
        namespace: ns.to_string(),
        name: name.to_string(),
        selector: sel,
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    if let Some(log) = &ctx.app.audit {
        log.write(rec, "ResponseStarted", 200, None);
    }
    let job = WatchJob {
        app: ctx.app.clone(),
        filter,
        bookmarks,
        initial_end: send_initial == Some(true),
        deadline: Instant::now() + timeout,
        tx,
        rec: rec.clone(),
    };
    tokio::spawn(job.run(start));
    let mut resp = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&rec.id) {
        h.insert("audit-id", v);
    }
    Ok(Reply::Stream(resp))
}

struct WatchJob {
    app: Arc<App>,
    filter: Filter,
    bookmarks: bool,
    initial_end: bool,
    deadline: Instant,
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    rec: AuditRecord,
}

impl WatchJob {
    async fn send(&self, buf: &mut Vec<u8>) -> bool {
        if buf.is_empty() {
            return true;
        }
        let chunk = Bytes::from(std::mem::take(buf));
        self.tx.send(Ok(chunk)).await.is_ok()
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Vec<u8> {
        let o = bookmark_object(self.filter.kind, rv, initial_end);
        line(
            "BOOKMARK",
            &serde_json::to_vec(&o).expect("JSON values serialize"),
        )
    }

    async fn run(self, start: Result<Subscription, ApiError>) {
        self.stream(start).await;
        if let Some(log) = &self.app.audit {
            log.write(&self.rec, "ResponseComplete", 200, None);
        }
    }

    async fn stream(&self, start: Result<Subscription, ApiError>) {
        let sub = match start {
            Ok(s) => s,
            Err(e) => {
                let mut l = line("ERROR", &e.to_bytes());
                self.send(&mut l).await;
                return;
            }
        };
        let Subscription {
            initial,
            mut live,
            rv,
        } = sub;
        let mut last_rv = rv;
        let mut buf = Vec::new();
        for ev in &initial {
            if let Some(l) = self.filter.convert(ev) {
                buf.extend_from_slice(&l);
                if buf.len() >= CHUNK && !self.send(&mut buf).await {
                    return;
                }
            }
            last_rv = last_rv.max(ev.rv);
        }
        if self.initial_end {
            buf.extend_from_slice(&self.bookmark(rv, true));
        }
        if !self.send(&mut buf).await {
            return;
        }
        let mut shutdown = self.app.shutdown.clone();
        let period = self.app.bookmark_interval.max(Duration::from_millis(10));
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        loop {
            tokio::select! {
                biased;
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
                _ = tokio::time::sleep_until(self.deadline) => return,
                _ = self.tx.closed() => return,
                ev = live.recv() => {
                    let Some(ev) = ev else { return };
                    if !self.deliver(&ev, &mut live, &mut last_rv, &mut buf).await {
                        return;
                    }
                }
                _ = tick.tick(), if self.bookmarks => {
                    // Every event up to the current version is in the
                    // buffer already: deliver them before the bookmark.
                    let current = self.app.store.current_rv();
                    loop {
                        match live.try_recv() {
                            Ok(ev) => {
                                if let Some(l) = self.filter.convert(&ev) {
                                    buf.extend_from_slice(&l);
                                }
                                last_rv = last_rv.max(ev.rv);
                            }
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => {
                                self.send(&mut buf).await;
                                return;
                            }
                        }
                    }
                    last_rv = last_rv.max(current);
                    buf.extend_from_slice(&self.bookmark(last_rv, false));
                    if !self.send(&mut buf).await {
                        return;
                    }
                }
            }
        }
    }

    /// Sends one event and whatever else is already waiting.
    async fn deliver(
        &self,
        first: &Arc<Event>,
        live: &mut mpsc::Receiver<Arc<Event>>,
        last_rv: &mut u64,
        buf: &mut Vec<u8>,
    ) -> bool {
        if let Some(l) = self.filter.convert(first) {
            buf.extend_from_slice(&l);
        }
        *last_rv = (*last_rv).max(first.rv);
        while buf.len() < CHUNK {
            match live.try_recv() {
                Ok(ev) => {
                    if let Some(l) = self.filter.convert(&ev) {
                        buf.extend_from_slice(&l);
                    }
                    *last_rv = (*last_rv).max(ev.rv);
                }
                Err(_) => break,
            }
        }
        self.send(buf).await
    }
}
