//! The object store: every object of every resource, the resourceVersion
//! counter, the per-resource watch history and the registered watchers.
//!
//! - A write is atomic: one writer at a time (an async mutex held across
//!   the etcd transaction), the in-memory state switched under a short
//!   lock, the event pushed to every watcher in the same critical section,
//!   so watchers see events in resourceVersion order without gaps.
//! - Watchers never block writers: each has a bounded buffer; one that is
//!   full is dropped (its stream ends, as kube-apiserver closes a watcher
//!   that falls too far behind).
//! - With etcd, every object is a key `<prefix>/<dir>/[<ns>/]<name>` whose
//!   value is the object's JSON without `metadata.resourceVersion`; the
//!   resourceVersion is the key's mod revision, writes are transactions
//!   guarded on the revision the double last saw.
//! - The history starts at the resourceVersion the store started (or was
//!   compacted) at: a watch or a paged list from before is 410 Expired.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::etcd::{EtcdBackend, TxnOutcome};
use crate::resources::Kind;
use crate::status::ApiError;

/// One stored object version.
#[derive(Debug)]
pub struct StoredObject {
    pub kind: Kind,
    /// `name`, or `namespace/name` for namespaced resources.
    pub key: String,
    pub rv: u64,
    /// The object without `kind`/`apiVersion`, `metadata.resourceVersion` set.
    pub value: Value,
    /// `value`, serialized (what lists send as items).
    pub json: Bytes,
}

impl StoredObject {
    /// Stores `value` at `rv` (sets `metadata.resourceVersion`, drops
    /// `kind`/`apiVersion`).
    pub fn new(kind: Kind, mut value: Value, rv: u64) -> Arc<StoredObject> {
        if let Value::Object(m) = &mut value {
            m.remove("kind");
            m.remove("apiVersion");
            if let Some(Value::Object(meta)) = m.get_mut("metadata") {
                meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
            }
        }
        let key = object_key(kind, &value);
        let json = Bytes::from(serde_json::to_vec(&value).expect("JSON values serialize"));
        Arc::new(StoredObject {
            kind,
            key,
            rv,
            value,
            json,
        })
    }

    /// The object with `kind` and `apiVersion` (what GET and watch send).
    pub fn json_with_kind(&self) -> Bytes {
        let head = format!(
            "{{\"apiVersion\":\"{}\",\"kind\":\"{}\"",
            self.kind.api_version(),
            self.kind.kind()
        );
        let rest = &self.json[1..];
        let mut out = Vec::with_capacity(head.len() + self.json.len() + 1);
        out.extend_from_slice(head.as_bytes());
        if rest != b"}" {
            out.push(b',');
        }
        out.extend_from_slice(rest);
        Bytes::from(out)
    }

    /// The object as a value with `kind` and `apiVersion`.
    pub fn value_with_kind(&self) -> Value {
        let mut v = self.value.clone();
        if let Value::Object(m) = &mut v {
            m.insert("apiVersion".into(), self.kind.api_version().into());
            m.insert("kind".into(), self.kind.kind().into());
        }
        v
    }

    pub fn meta(&self) -> Option<&Map<String, Value>> {
        self.value.get("metadata").and_then(Value::as_object)
    }

    pub fn name(&self) -> &str {
        self.meta()
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    pub fn uid(&self) -> &str {
        self.meta()
            .and_then(|m| m.get("uid"))
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

/// The store key of an object: `name` or `namespace/name`.
pub fn object_key(kind: Kind, value: &Value) -> String {
    let meta = value.get("metadata");
    let field = |k: &str| {
        meta.and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    if kind.namespaced() {
        format!("{}/{}", field("namespace"), field("name"))
    } else {
        field("name")
    }
}

/// `ADDED` / `MODIFIED` / `DELETED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change of one object.
#[derive(Debug)]
pub struct Event {
    pub ty: EventType,
    /// The new state; for `Deleted` the last state at the deletion's
    /// resourceVersion.
    pub obj: Arc<StoredObject>,
    /// The state before (none for `Added`).
    pub prev: Option<Arc<StoredObject>>,
    pub rv: u64,
}

#[derive(Default)]
struct ResourceState {
    objects: BTreeMap<String, Arc<StoredObject>>,
    history: VecDeque<Arc<Event>>,
    /// The oldest resourceVersion a watch or paged list can resume at.
    floor: u64,
    watchers: Vec<mpsc::Sender<Arc<Event>>>,
}

struct State {
    rv: u64,
    res: HashMap<Kind, ResourceState>,
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchFrom {
    /// The current state as `ADDED` events, then the changes.
    Now,
    /// The changes after this resourceVersion, from the history.
    After(u64),
}

/// A registered watch: what to send first, then the live events.
pub struct Subscription {
    pub initial: Vec<Arc<Event>>,
    pub live: mpsc::Receiver<Arc<Event>>,
    /// The resourceVersion the initial events bring the watcher to.
    pub rv: u64,
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Events kept per resource for resuming watches.
    pub history: usize,
    /// Events buffered per watcher before it is dropped.
    pub watcher_buffer: usize,
}

/// The objects of the double.
pub struct Store {
    state: RwLock<State>,
    write: tokio::sync::Mutex<()>,
    etcd: Option<EtcdBackend>,
    opts: StoreOptions,
    progress: tokio::sync::watch::Sender<u64>,
    /// Where background work (the etcd write of a compaction) runs.
    runtime: tokio::runtime::Handle,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal_error(&e.to_string())
}

impl Store {
    /// An empty in-memory store (to be made inside a tokio runtime) whose
    /// resourceVersions start at
    /// `start_rv` (the double uses the start time in microseconds, so that
    /// every resourceVersion of an earlier run is older and resuming from
    /// it is 410, as after a real apiserver's restart).
    pub fn in_memory(start_rv: u64, opts: StoreOptions) -> Store {
        Self::with_state(start_rv, Vec::new(), None, opts)
    }

    /// A store on etcd: loads every object under the prefix; the history
    /// starts at etcd's current revision.
    pub async fn on_etcd(etcd: EtcdBackend, opts: StoreOptions) -> Result<Store, crate::Error> {
        let (revision, objects) = etcd.load().await?;
        Ok(Self::with_state(revision, objects, Some(etcd), opts))
    }

    fn with_state(
        rv: u64,
        objects: Vec<Arc<StoredObject>>,
        etcd: Option<EtcdBackend>,
        opts: StoreOptions,
    ) -> Store {
        let mut res: HashMap<Kind, ResourceState> = Kind::ALL
            .iter()
            .map(|k| {
                (
                    *k,
                    ResourceState {
                        floor: rv,
                        ..ResourceState::default()
                    },
                )
            })
            .collect();
        for o in objects {
            res.get_mut(&o.kind)
                .expect("every kind has a state")
                .objects
                .insert(o.key.clone(), o);
        }
        let (progress, _) = tokio::sync::watch::channel(rv);
        Store {
            state: RwLock::new(State { rv, res }),
            write: tokio::sync::Mutex::new(()),
            etcd,
            opts,
            progress,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// The latest resourceVersion.
    pub fn current_rv(&self) -> u64 {
        self.state.read().expect("store lock").rv
    }

    pub fn get(&self, kind: Kind, key: &str) -> Option<Arc<StoredObject>> {
        self.state.read().expect("store lock").res[&kind]
            .objects
            .get(key)
            .cloned()
    }

    /// The objects of a resource at `at` (the current state for `None`),
    /// sorted by key, with the resourceVersion they are a snapshot of.
    /// `Err(floor)` when `at` is older than the history reaches.
    pub fn snapshot(
        &self,
        kind: Kind,
        at: Option<u64>,
    ) -> Result<(u64, Vec<Arc<StoredObject>>), u64> {
        let st = self.state.read().expect("store lock");
        let rs = &st.res[&kind];
        let Some(at) = at.filter(|at| *at < st.rv) else {
            return Ok((st.rv, rs.objects.values().cloned().collect()));
        };
        if at < rs.floor {
            return Err(rs.floor);
        }
        let mut objects = rs.objects.clone();
        for ev in rs.history.iter().rev() {
            if ev.rv <= at {
                break;
            }
            match (&ev.ty, &ev.prev) {
                (EventType::Added, _) => {
                    objects.remove(&ev.obj.key);
                }
                (_, Some(prev)) => {
                    objects.insert(prev.key.clone(), prev.clone());
                }
                (_, None) => {}
            }
        }
        Ok((at, objects.into_values().collect()))
    }

    /// The objects of a resource at a version older than the history, read
    /// from etcd (`None` in memory, or when etcd compacted it away).
    pub async fn snapshot_from_etcd(
        &self,
        kind: Kind,
        at: u64,
    ) -> Result<Option<Vec<Arc<StoredObject>>>, ApiError> {
        match &self.etcd {
            None => Ok(None),
            Some(etcd) => etcd.objects_at(kind, at).await.map_err(internal),
        }
    }

    /// Objects of a namespaced resource in one namespace (current state).
    pub fn in_namespace(&self, kind: Kind, ns: &str) -> Vec<Arc<StoredObject>> {
        let st = self.state.read().expect("store lock");
        let prefix = format!("{ns}/");
        st.res[&kind]
            .objects
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Waits until the store has reached `rv` (at most `timeout`).
    pub async fn wait_for(&self, rv: u64, timeout: Duration) -> bool {
        let mut rx = self.progress.subscribe();
        let reached = async move { rx.wait_for(|cur| *cur >= rv).await.is_ok() };
        matches!(tokio::time::timeout(timeout, reached).await, Ok(true))
    }

    /// Registers a watcher.
    pub fn watch(&self, kind: Kind, from: WatchFrom) -> Result<Subscription, ApiError> {
        let mut st = self.state.write().expect("store lock");
        let current = st.rv;
        let rs = st.res.get_mut(&kind).expect("every kind has a state");
        let initial: Vec<Arc<Event>> = match from {
            WatchFrom::Now => rs
                .objects
                .values()
                .map(|o| {
                    Arc::new(Event {
                        ty: EventType::Added,
                        obj: o.clone(),
                        prev: None,
                        rv: o.rv,
                    })
                })
                .collect(),
            WatchFrom::After(n) => {
                if n < rs.floor {
                    return Err(ApiError::expired(format!(
                        "too old resource version: {n} ({})",
                        rs.floor
                    )));
                }
                rs.history.iter().filter(|e| e.rv > n).cloned().collect()
            }
        };
        let (tx, rx) = mpsc::channel(self.opts.watcher_buffer.max(1));
        rs.watchers.push(tx);
        let rv = match from {
            WatchFrom::Now => current,
            WatchFrom::After(n) => n.max(initial.last().map_or(0, |e| e.rv)),
        };
        Ok(Subscription {
            initial,
            live: rx,
            rv,
        })
    }

    /// Drops every resource's watch history, ends every open watch and
    /// moves the resourceVersion on by one (what a compacted etcd plus a
    /// restarted watch cache look like to a client): resuming a watch or
    /// paged list from any resourceVersion handed out before is 410
    /// Expired; lists from now on are at the new resourceVersion, from
    /// which watches resume fine. With etcd the new
    /// resourceVersion is a real revision (a write of the key
    /// `<prefix>/kube-api-double/compaction`), done in the background.
    pub fn compact(self: &Arc<Self>) {
        let mut st = self.state.write().expect("store lock");
        let next = st.rv + 1;
        for rs in st.res.values_mut() {
            rs.history.clear();
            rs.floor = next;
            // Dropping the senders ends the streams (without a bookmark of
            // the new version, so their clients resume from an old one).
            rs.watchers.clear();
        }
        if self.etcd.is_none() {
            st.rv = next;
            drop(st);
            self.progress.send_replace(next);
            return;
        }
        drop(st);
        let store = self.clone();
        self.runtime.spawn(async move {
            let _w = store.write.lock().await;
            let Some(etcd) = &store.etcd else { return };
            match etcd.bump_and_compact().await {
                Ok(rev) => {
                    let mut st = store.state.write().expect("store lock");
                    st.rv = st.rv.max(rev);
                    let rv = st.rv;
                    drop(st);
                    store.progress.send_replace(rv);
                }
                Err(e) => tracing::warn!(error = %e, "cannot move the etcd revision on after a compaction"),
            }
        });
    }

    fn apply(&self, ev: Event) -> Arc<Event> {
        tracing::debug!(
            resource = ev.obj.kind.resource(),
            key = %ev.obj.key,
            rv = ev.rv,
            event = ev.ty.as_str(),
            "stored"
        );
        let ev = Arc::new(ev);
        let mut st = self.state.write().expect("store lock");
        st.rv = st.rv.max(ev.rv);
        let rs = st
            .res
            .get_mut(&ev.obj.kind)
            .expect("every kind has a state");
        match ev.ty {
            EventType::Deleted => {
                rs.objects.remove(&ev.obj.key);
            }
            _ => {
                rs.objects.insert(ev.obj.key.clone(), ev.obj.clone());
            }
        }
        rs.history.push_back(ev.clone());
        while rs.history.len() > self.opts.history {
            let old = rs.history.pop_front().expect("non-empty");
            rs.floor = rs.history.front().map_or(old.rv, |e| e.rv - 1);
        }
        rs.watchers.retain(|w| w.try_send(ev.clone()).is_ok());
        let rv = st.rv;
        drop(st);
        self.progress.send_replace(rv);
        ev
    }

    /// Creates an object (`value` without resourceVersion).
    pub async fn create(&self, kind: Kind, value: Value) -> Result<Arc<StoredObject>, ApiError> {
        let _w = self.write.lock().await;
        let key = object_key(kind, &value);
        if self.get(kind, &key).is_some() {
            return Err(ApiError::already_exists(&kind.gr(), &name_of(&value)));
        }
        let rv = match &self.etcd {
            None => self.current_rv() + 1,
            Some(etcd) => match etcd.create(kind, &key, &value).await.map_err(internal)? {
                TxnOutcome::Done(rev) => rev,
                TxnOutcome::Failed(current) => {
                    self.refresh(kind, &key, current);
                    return Err(ApiError::already_exists(&kind.gr(), &name_of(&value)));
                }
            },
        };
        let obj = StoredObject::new(kind, value, rv);
        self.apply(Event {
            ty: EventType::Added,
            obj: obj.clone(),
            prev: None,
            rv,
        });
        Ok(obj)
    }

    /// Updates an object: `f` gets the current version and returns the new
    /// value (or an error). A new value equal to the current one is not
    /// written (no new resourceVersion, no event): `changed` is false.
    pub async fn update<F>(
        &self,
        kind: Kind,
        key: &str,
        f: F,
    ) -> Result<(Arc<StoredObject>, bool), ApiError>
    where
        F: FnOnce(&Arc<StoredObject>) -> Result<Value, ApiError>,
    {
        let _w = self.write.lock().await;
        let Some(cur) = self.get(kind, key) else {
            return Err(ApiError::not_found(&kind.gr(), key_name(key)));
        };
        let mut new = f(&cur)?;
        if let Some(Value::Object(meta)) = new.get_mut("metadata") {
            meta.insert("resourceVersion".into(), Value::String(cur.rv.to_string()));
        }
        if let Value::Object(m) = &mut new {
            m.remove("kind");
            m.remove("apiVersion");
        }
        if new == cur.value {
            return Ok((cur, false));
        }
        let rv = match &self.etcd {
            None => self.current_rv() + 1,
            Some(etcd) => match etcd
                .update(kind, key, &new, cur.rv)
                .await
                .map_err(internal)?
            {
                TxnOutcome::Done(rev) => rev,
                TxnOutcome::Failed(current) => {
                    self.refresh(kind, key, current);
                    return Err(ApiError::modified(&kind.gr(), key_name(key)));
                }
            },
        };
        let obj = StoredObject::new(kind, new, rv);
        self.apply(Event {
            ty: EventType::Modified,
            obj: obj.clone(),
            prev: Some(cur),
            rv,
        });
        Ok((obj, true))
    }

    /// Deletes an object after `check` accepted its current version;
    /// returns its last state at the deletion's resourceVersion.
    pub async fn delete<F>(
        &self,
        kind: Kind,
        key: &str,
        check: F,
    ) -> Result<Arc<StoredObject>, ApiError>
    where
        F: FnOnce(&Arc<StoredObject>) -> Result<(), ApiError>,
    {
        let _w = self.write.lock().await;
        let Some(cur) = self.get(kind, key) else {
            return Err(ApiError::not_found(&kind.gr(), key_name(key)));
        };
        check(&cur)?;
        let rv = match &self.etcd {
            None => self.current_rv() + 1,
            Some(etcd) => match etcd.delete(kind, key, cur.rv).await.map_err(internal)? {
                TxnOutcome::Done(rev) => rev,
                TxnOutcome::Failed(current) => {
                    self.refresh(kind, key, current);
                    return Err(ApiError::modified(&kind.gr(), key_name(key)));
                }
            },
        };
        let last = StoredObject::new(kind, cur.value.clone(), rv);
        self.apply(Event {
            ty: EventType::Deleted,
            obj: last.clone(),
            prev: Some(cur),
            rv,
        });
        Ok(last)
    }

    /// Takes what etcd holds for a key after a guarded write failed
    /// (another writer on the same etcd): the in-memory copy follows
    /// without an event, so the next request sees the new state.
    fn refresh(&self, kind: Kind, key: &str, current: Option<Arc<StoredObject>>) {
        let mut st = self.state.write().expect("store lock");
        let rs = st.res.get_mut(&kind).expect("every kind has a state");
        match current {
            Some(o) => {
                rs.objects.insert(key.to_string(), o);
            }
            None => {
                rs.objects.remove(key);
            }
        }
    }
}

fn name_of(value: &Value) -> String {
    value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

/// The name part of a store key.
pub fn key_name(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opts(history: usize) -> StoreOptions {
        StoreOptions {
            history,
            watcher_buffer: 16,
        }
    }

    fn node(name: &str, label: &str) -> Value {
        json!({"metadata": {"name": name, "labels": {"l": label}}})
    }

    #[tokio::test]
    async fn versions_history_and_snapshots() {
        let s = Store::in_memory(100, opts(10));
        let a = s.create(Kind::Node, node("a", "1")).await.unwrap();
        assert_eq!(a.rv, 101);
        assert_eq!(a.value["metadata"]["resourceVersion"], "101");
        let (b, changed) = s
            .update(Kind::Node, "a", |cur| {
                let mut v = cur.value.clone();
                v["metadata"]["labels"]["l"] = json!("2");
                Ok(v)
            })
            .await
            .unwrap();
        assert!(changed);
        assert_eq!(b.rv, 102);
        // A no-op update writes nothing.
        let (c, changed) = s
            .update(Kind::Node, "a", |cur| Ok(cur.value.clone()))
            .await
            .unwrap();
        assert!(!changed);
        assert_eq!(c.rv, 102);
        s.create(Kind::Node, node("b", "1")).await.unwrap();
        s.delete(Kind::Node, "a", |_| Ok(())).await.unwrap();
        assert_eq!(s.current_rv(), 104);

        let (rv, at101) = s.snapshot(Kind::Node, Some(101)).unwrap();
        assert_eq!(rv, 101);
        assert_eq!(at101.len(), 1);
        assert_eq!(at101[0].value["metadata"]["labels"]["l"], "1");
        let (_, now) = s.snapshot(Kind::Node, None).unwrap();
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].name(), "b");
        assert_eq!(s.snapshot(Kind::Node, Some(99)).err(), Some(100));
    }

    #[tokio::test]
    async fn watch_resumes_from_history_and_expires() {
        let s = Store::in_memory(10, opts(2));
        for n in ["a", "b", "c"] {
            s.create(Kind::Node, node(n, "x")).await.unwrap();
        }
        // History holds 12 and 13; 11 is still reachable (nothing between).
        let sub = s.watch(Kind::Node, WatchFrom::After(11)).unwrap();
        assert_eq!(
            sub.initial.iter().map(|e| e.rv).collect::<Vec<_>>(),
            vec![12, 13]
        );
        let e = s.watch(Kind::Node, WatchFrom::After(10)).err().unwrap();
        assert_eq!(e.code, 410);
        assert_eq!(e.message, "too old resource version: 10 (11)");
        let mut open = s.watch(Kind::Node, WatchFrom::Now).unwrap();
        assert_eq!(open.initial.len(), 3);
        let s = Arc::new(s);
        s.compact();
        assert!(
            open.live.recv().await.is_none(),
            "compaction ends open watches"
        );
        // Even the latest resourceVersion handed out is gone; the next is fine.
        let e = s.watch(Kind::Node, WatchFrom::After(13)).err().unwrap();
        assert_eq!(e.message, "too old resource version: 13 (14)");
        assert_eq!(s.current_rv(), 14);
        let mut live = s.watch(Kind::Node, WatchFrom::After(14)).unwrap();
        s.create(Kind::Node, node("d", "x")).await.unwrap();
        let ev = live.live.recv().await.unwrap();
        assert_eq!((ev.ty, ev.rv), (EventType::Added, 15));
    }

    #[tokio::test]
    async fn slow_watchers_are_dropped() {
        let s = Store::in_memory(
            0,
            StoreOptions {
                history: 10,
                watcher_buffer: 1,
            },
        );
        let mut sub = s.watch(Kind::Node, WatchFrom::Now).unwrap();
        s.create(Kind::Node, node("a", "x")).await.unwrap();
        s.create(Kind::Node, node("b", "x")).await.unwrap();
        assert!(sub.live.recv().await.is_some());
        assert!(
            sub.live.recv().await.is_none(),
            "the full watcher was closed"
        );
    }

    #[test]
    fn json_with_kind_splices() {
        let o = StoredObject::new(Kind::Node, json!({"metadata": {"name": "n"}}), 5);
        let v: Value = serde_json::from_slice(&o.json_with_kind()).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n", "resourceVersion": "5"}})
        );
    }
}
