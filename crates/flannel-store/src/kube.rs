//! The Kubernetes API as the lease store (`--kube-subnet-mgr`), how nearly
//! every cluster runs flannel.
//!
//! A node's subnet is its Node's `spec.podCIDR(s)`, assigned by
//! kube-controller-manager; the rest of its lease (public IP, backend type
//! and data) is published as annotations on the Node with a strategic-merge
//! patch of `nodes/<name>/status`. Peers are the Nodes marked
//! `kube-subnet-manager: "true"`. The decisions (annotation names, a Node's
//! lease, what to publish) are `flannel_core::kube`; this module moves them
//! in and out of the API server.
//!
//! One watcher (kube-runtime: a list served from the API server's cache,
//! then a watch from its resourceVersion with bookmarks; a new list after
//! 410 Gone or a reconnect; backoff while the API server is away) keeps a
//! cache of every Node's lease. Every read is served from that cache, so
//! startup at 5,000 Nodes is one list and no per-node request, and an API
//! server outage changes nothing: the cache and the datapath stay as they
//! are until the API server answers again, and the next list replaces the
//! cache as a whole ([`WatchEvent::Snapshot`]).
//!
//! RBAC: nodes get/list/watch, nodes/status patch, and pods get when the
//! node is found through `POD_NAME`/`POD_NAMESPACE`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flannel_core::config::NetConfig;
use flannel_core::kube::{self as logic, AnnotationNames, KubeError, NodeView};
use flannel_core::lease::{Lease, LeaseAttrs, LeaseEvent, LeaseKey};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::utils::{Backoff, ResetTimerBackoff};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use crate::{AcquireError, LeaseSnapshot, Result, Store, StoreError, WatchEvent};

/// Capacity of each watcher's channel.
const WATCH_CHANNEL_CAPACITY: usize = 256;
/// How often a node waiting for its podCIDR (or its Node) says so again.
const WAIT_LOG_INTERVAL: Duration = Duration::from_secs(30);
/// Server-side timeout of each watch request; the watcher then resumes from
/// the last resourceVersion (about what client-go's reflector asks for).
const WATCH_TIMEOUT_SECS: u32 = 290;
/// Backoff of the watcher and of patches while the API server is away.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How flanneld finds its own Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeIdentity {
    /// `NODE_NAME`.
    Name(String),
    /// `POD_NAME` in `POD_NAMESPACE`: the Node is the pod's `spec.nodeName`
    /// (one `GET` of the pod at start).
    Pod { namespace: String, name: String },
}

impl NodeIdentity {
    /// Upstream's rule: `NODE_NAME` when set and not empty, else the pod
    /// `POD_NAME` in `POD_NAMESPACE` (both required).
    pub fn from_env(
        node_name: Option<&str>,
        pod_name: Option<&str>,
        pod_namespace: Option<&str>,
    ) -> std::result::Result<NodeIdentity, KubeStoreError> {
        let set = |v: Option<&str>| v.filter(|s| !s.is_empty()).map(str::to_string);
        if let Some(n) = set(node_name) {
            return Ok(NodeIdentity::Name(n));
        }
        match (set(pod_name), set(pod_namespace)) {
            (Some(name), Some(namespace)) => Ok(NodeIdentity::Pod { namespace, name }),
            _ => Err(KubeStoreError::NoNodeIdentity),
        }
    }
}

/// How to reach the API server and which Node is ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeOptions {
    /// `--kube-api-url`: overrides the kubeconfig's server.
    pub api_url: Option<String>,
    /// `--kubeconfig-file`. Neither this nor `api_url`: the in-cluster config
    /// (service account token and `KUBERNETES_SERVICE_HOST`/`_PORT`).
    pub kubeconfig: Option<PathBuf>,
    /// `--kube-annotation-prefix`.
    pub annotation_prefix: String,
    /// Our Node.
    pub node: NodeIdentity,
    /// `--set-node-network-unavailable`: set `NetworkUnavailable=False` once up.
    pub set_node_network_unavailable: bool,
}

/// Errors of the Kubernetes store, with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum KubeStoreError {
    #[error("env variables POD_NAME and POD_NAMESPACE must be set (or NODE_NAME): flanneld looks up its Node through them (kube-flannel.yml sets them from the pod's metadata)")]
    NoNodeIdentity,
    #[error("Kubernetes client configuration: {0}")]
    Config(String),
    #[error("error retrieving pod spec for '{namespace}/{name}': {source}")]
    Pod {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("node name not present in pod spec '{namespace}/{name}'")]
    PodNotScheduled { namespace: String, name: String },
    #[error(transparent)]
    Node(#[from] KubeError),
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
}

/// The client configuration upstream's flags select. With a kubeconfig,
/// `--kube-api-url` replaces its server. With the URL alone, the in-cluster
/// service account (when there is one) authenticates; upstream then talks
/// to the URL anonymously, which an RBAC cluster refuses. With neither, the
/// in-cluster config.
pub async fn client_config(
    api_url: Option<&str>,
    kubeconfig: Option<&Path>,
) -> std::result::Result<kube::Config, KubeStoreError> {
    let url = |u: &str| {
        u.parse::<http::Uri>()
            .map_err(|e| KubeStoreError::Config(format!("--kube-api-url {u:?}: {e}")))
    };
    let mut config = match (api_url, kubeconfig) {
        (_, Some(path)) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| {
                KubeStoreError::Config(format!(
                    "--kubeconfig-file {}: {e}",
                    path.display()
                ))
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| {
                    KubeStoreError::Config(format!("--kubeconfig-file {}: {e}", path.display()))
                })?
        }
        (Some(u), None) => match kube::Config::incluster() {
            Ok(mut c) => {
                c.cluster_url = url(u)?;
                c
            }
            Err(_) => kube::Config::new(url(u)?),
        },
        (None, None) => kube::Config::incluster().map_err(|e| {
            KubeStoreError::Config(format!(
                "no --kubeconfig-file or --kube-api-url, and not running in a pod: {e}; give one of the flags, or run flanneld as kube-flannel.yml's DaemonSet"
            ))
        })?,
    };
    if let Some(u) = api_url {
        config.cluster_url = url(u)?;
    }
    Ok(config)
}

/// What flanneld keeps of a Node: name, annotations, resourceVersion and
/// pod CIDRs. Status (images, conditions), labels and managedFields are not
/// even decoded, so 5,000 Nodes stay a few megabytes.
#[derive(Debug, Clone, Deserialize)]
pub struct NodeSummary {
    #[serde(deserialize_with = "summary_meta")]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: SummarySpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SummarySpec {
    #[serde(default, rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(default, rename = "podCIDRs")]
    pod_cidrs: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SummaryMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

fn summary_meta<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<ObjectMeta, D::Error> {
    let m = SummaryMeta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        uid: m.uid,
        resource_version: m.resource_version,
        annotations: m.annotations,
        ..ObjectMeta::default()
    })
}

impl k8s_openapi::Resource for NodeSummary {
    const API_VERSION: &'static str = <Node as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Node as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Node as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Node as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Node as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = k8s_openapi::ClusterResourceScope;
}

impl k8s_openapi::Metadata for NodeSummary {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// This node's Node as the cache holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnNode {
    pub name: String,
    pub annotations: BTreeMap<String, String>,
    pub pod_cidr: Option<String>,
    pub pod_cidrs: Vec<String>,
}

impl OwnNode {
    fn from_summary(n: &NodeSummary) -> OwnNode {
        OwnNode {
            name: n.metadata.name.clone().unwrap_or_default(),
            annotations: n.metadata.annotations.clone().unwrap_or_default(),
            pod_cidr: n.spec.pod_cidr.clone(),
            pod_cidrs: n.spec.pod_cidrs.clone().unwrap_or_default(),
        }
    }

    /// The Node for flannel-core's rules.
    pub fn view(&self) -> NodeView<'_> {
        NodeView {
            name: &self.name,
            annotations: &self.annotations,
            pod_cidr: self.pod_cidr.as_deref(),
            pod_cidrs: &self.pod_cidrs,
        }
    }
}

/// One Node in the cache: its lease, or why it has none.
#[derive(Debug, Clone)]
struct Entry {
    lease: Option<Lease>,
    /// The last problem warned about (warned once per distinct problem).
    problem: Option<String>,
}

#[derive(Default)]
struct Cache {
    /// The first complete list has arrived.
    synced: bool,
    nodes: HashMap<String, Entry>,
    own: Option<OwnNode>,
    subscribers: Vec<mpsc::Sender<WatchEvent>>,
    /// Counts cache changes (the snapshots' `revision`).
    revision: u64,
    /// The watcher's last request failed (logged once per outage).
    api_down: bool,
}

impl Cache {
    fn snapshot(&self) -> LeaseSnapshot {
        let mut leases: Vec<Lease> = self
            .nodes
            .values()
            .filter_map(|e| e.lease.clone())
            .collect();
        leases.sort_by_key(|l| l.key);
        LeaseSnapshot {
            leases,
            revision: self.revision,
        }
    }
}

struct Shared {
    names: AnnotationNames,
    cfg: NetConfig,
    node_name: String,
    cache: Mutex<Cache>,
    /// Bumped on every cache change; waiters (acquisition) watch it.
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn digest(&self, n: &NodeSummary) -> Entry {
        digest(&self.names, &self.cfg, n)
    }

    fn warn_new_problem(name: &str, old: Option<&Entry>, new: &Entry) {
        if let Some(p) = &new.problem {
            if old.and_then(|o| o.problem.as_ref()) != Some(p) {
                tracing::warn!(node = %name, "skipping Node: {p}");
            }
        }
    }

    /// A whole new list (the watcher's first, or one after 410 Gone or a
    /// reconnect): replaces the cache; subscribers get a Snapshot.
    fn replace(&self, nodes: Vec<NodeSummary>) -> (Vec<mpsc::Sender<WatchEvent>>, WatchEvent) {
        let mut c = self.lock();
        let mut fresh = HashMap::with_capacity(nodes.len());
        let mut own = None;
        for n in &nodes {
            let name = n.metadata.name.clone().unwrap_or_default();
            let e = self.digest(n);
            Self::warn_new_problem(&name, c.nodes.get(&name), &e);
            if name == self.node_name {
                own = Some(OwnNode::from_summary(n));
            }
            fresh.insert(name, e);
        }
        let managed = fresh.values().filter(|e| e.lease.is_some()).count();
        let skipped = fresh.values().filter(|e| e.problem.is_some()).count();
        tracing::info!(
            nodes = fresh.len(),
            peers_with_lease = managed,
            skipped,
            own_node_found = own.is_some(),
            "listed the Nodes"
        );
        c.nodes = fresh;
        c.own = own;
        c.synced = true;
        c.revision += 1;
        self.changed.send_replace(c.revision);
        (c.subscribers.clone(), WatchEvent::Snapshot(c.snapshot()))
    }

    /// One Node added or changed: the lease events it causes.
    fn apply(&self, n: &NodeSummary) -> (Vec<mpsc::Sender<WatchEvent>>, Vec<LeaseEvent>) {
        let name = n.metadata.name.clone().unwrap_or_default();
        let e = self.digest(n);
        let mut c = self.lock();
        Self::warn_new_problem(&name, c.nodes.get(&name), &e);
        if name == self.node_name {
            c.own = Some(OwnNode::from_summary(n));
        }
        let old = c.nodes.insert(name, e.clone()).and_then(|o| o.lease);
        let events = lease_events(old, e.lease);
        c.revision += 1;
        self.changed.send_replace(c.revision);
        (c.subscribers.clone(), events)
    }

    /// One Node deleted.
    fn delete(&self, n: &NodeSummary) -> (Vec<mpsc::Sender<WatchEvent>>, Vec<LeaseEvent>) {
        let name = n.metadata.name.clone().unwrap_or_default();
        let mut c = self.lock();
        if name == self.node_name {
            c.own = None;
        }
        let old = c.nodes.remove(&name).and_then(|o| o.lease);
        if old.is_some() {
            tracing::debug!(node = %name, "Node deleted");
        }
        c.revision += 1;
        self.changed.send_replace(c.revision);
        (c.subscribers.clone(), lease_events(old, None))
    }
}

static EMPTY: BTreeMap<String, String> = BTreeMap::new();

/// A Node's lease, or the problem that keeps it from having one.
fn digest(names: &AnnotationNames, cfg: &NetConfig, n: &NodeSummary) -> Entry {
    let view = NodeView {
        name: n.metadata.name.as_deref().unwrap_or(""),
        annotations: n.metadata.annotations.as_ref().unwrap_or(&EMPTY),
        pod_cidr: n.spec.pod_cidr.as_deref(),
        pod_cidrs: n.spec.pod_cidrs.as_deref().unwrap_or(&[]),
    };
    match view.lease(names, cfg) {
        Ok(lease) => Entry {
            lease,
            problem: None,
        },
        Err(e) => Entry {
            lease: None,
            problem: Some(e.to_string()),
        },
    }
}

/// Every Node's lease at one moment (`flannelctl leases`).
#[derive(Debug, Clone, Default)]
pub struct NodeLeases {
    pub leases: Vec<Lease>,
    /// Nodes flanneld manages whose lease does not parse: (Node, why).
    pub skipped: Vec<(String, String)>,
}

/// Lists the Nodes once (from the API server's cache) and reads their
/// leases as flanneld does: `kubectl get nodes` for flannel.
pub async fn list_node_leases(
    api_url: Option<&str>,
    kubeconfig: Option<&Path>,
    prefix: &str,
    cfg: &NetConfig,
) -> std::result::Result<NodeLeases, KubeStoreError> {
    let names = AnnotationNames::new(prefix)?;
    let config = client_config(api_url, kubeconfig).await?;
    let client = kube::Client::try_from(config).map_err(|source| KubeStoreError::Api {
        what: "creating the Kubernetes client".into(),
        source,
    })?;
    let list = Api::<NodeSummary>::all(client)
        .list(&kube::api::ListParams::default().match_any())
        .await
        .map_err(|source| KubeStoreError::Api {
            what: "listing the Nodes".into(),
            source,
        })?;
    let mut out = NodeLeases::default();
    for n in &list.items {
        let e = digest(&names, cfg, n);
        match (e.lease, e.problem) {
            (Some(l), _) => out.leases.push(l),
            (None, Some(p)) => out
                .skipped
                .push((n.metadata.name.clone().unwrap_or_default(), p)),
            (None, None) => {}
        }
    }
    out.leases.sort_by_key(|l| l.key);
    Ok(out)
}

/// What a subscriber must hear when a Node's lease goes from `old` to `new`.
fn lease_events(old: Option<Lease>, new: Option<Lease>) -> Vec<LeaseEvent> {
    match (old, new) {
        (None, None) => vec![],
        (None, Some(n)) => vec![LeaseEvent::Upsert(n)],
        (Some(o), None) => vec![LeaseEvent::Removed(o.key)],
        (Some(o), Some(n)) if o == n => vec![],
        (Some(o), Some(n)) if o.key != n.key => {
            vec![LeaseEvent::Removed(o.key), LeaseEvent::Upsert(n)]
        }
        (Some(_), Some(n)) => vec![LeaseEvent::Upsert(n)],
    }
}

/// The watcher's pause after a failed request: 0.5 s, doubling up to 5 s,
/// so that a restarted API server is seen again within seconds.
struct Doubling {
    next: Duration,
}

impl Default for Doubling {
    fn default() -> Self {
        Doubling { next: BACKOFF_MIN }
    }
}

impl Iterator for Doubling {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (d * 2).min(BACKOFF_MAX);
        Some(d)
    }
}

impl Backoff for Doubling {
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

async fn deliver(subscribers: Vec<mpsc::Sender<WatchEvent>>, ev: WatchEvent) {
    for tx in subscribers {
        // A closed receiver is pruned at the next subscription.
        let _ = tx.send(ev.clone()).await;
    }
}

/// Runs the Node watcher until the store is dropped.
async fn run_watcher(api: Api<NodeSummary>, shared: Arc<Shared>) {
    // One list from the API server's watch cache (resourceVersion=0, no
    // limit: kube-rs drops resourceVersion=0 from a paginated list), then
    // watches from its resourceVersion.
    let mut config = watcher::Config::default()
        .any_semantic()
        .timeout(WATCH_TIMEOUT_SECS);
    config.page_size = None;
    let backoff = ResetTimerBackoff::new(Doubling::default(), Duration::from_secs(60));
    let stream = watcher::watcher(api, config).backoff(backoff);
    futures::pin_mut!(stream);
    let mut listing: Option<Vec<NodeSummary>> = None;
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                let mut c = shared.lock();
                if !c.api_down {
                    c.api_down = true;
                    tracing::warn!(error = %e, "Kubernetes API unreachable or failing; keeping the datapath as it is and retrying with backoff");
                } else {
                    tracing::debug!(error = %e, "Kubernetes API still failing");
                }
                continue;
            }
        };
        {
            let mut c = shared.lock();
            if c.api_down && !matches!(ev, Event::Init | Event::InitApply(_)) {
                c.api_down = false;
                tracing::info!("Kubernetes API answering again");
            }
        }
        match ev {
            Event::Init => listing = Some(Vec::new()),
            Event::InitApply(n) => listing.get_or_insert_with(Vec::new).push(n),
            Event::InitDone => {
                let (subs, snap) = shared.replace(listing.take().unwrap_or_default());
                deliver(subs, snap).await;
            }
            Event::Apply(n) => {
                let (subs, events) = shared.apply(&n);
                if !events.is_empty() {
                    let revision = shared.lock().revision;
                    deliver(subs, WatchEvent::Events { events, revision }).await;
                }
            }
            Event::Delete(n) => {
                let (subs, events) = shared.delete(&n);
                if !events.is_empty() {
                    let revision = shared.lock().revision;
                    deliver(subs, WatchEvent::Events { events, revision }).await;
                }
            }
        }
    }
}

/// The Kubernetes API as a [`Store`].
pub struct KubeStore {
    nodes: Api<Node>,
    shared: Arc<Shared>,
    set_node_network_unavailable: bool,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for KubeStore {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl KubeStore {
    /// Builds the client, finds our Node's name (a `GET` of our pod when only
    /// `POD_NAME`/`POD_NAMESPACE` are known, retried while the API server is
    /// unreachable) and starts the Node watcher. `cfg` says which address
    /// families a lease carries.
    pub async fn connect(
        opts: KubeOptions,
        cfg: &NetConfig,
    ) -> std::result::Result<KubeStore, KubeStoreError> {
        let names = AnnotationNames::new(&opts.annotation_prefix)?;
        let config = client_config(opts.api_url.as_deref(), opts.kubeconfig.as_deref()).await?;
        let client = kube::Client::try_from(config).map_err(|source| KubeStoreError::Api {
            what: "creating the Kubernetes client".into(),
            source,
        })?;
        let node_name = match opts.node {
            NodeIdentity::Name(n) => n,
            NodeIdentity::Pod { namespace, name } => {
                pod_node_name(
                    Api::namespaced(client.clone(), &namespace),
                    &namespace,
                    &name,
                )
                .await?
            }
        };
        tracing::info!(node = %node_name, prefix = %names.prefix, "Kubernetes subnet manager");
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            names,
            cfg: cfg.clone(),
            node_name,
            cache: Mutex::new(Cache::default()),
            changed,
        });
        let watcher = tokio::spawn(run_watcher(Api::all(client.clone()), Arc::clone(&shared)));
        Ok(KubeStore {
            nodes: Api::all(client),
            shared,
            set_node_network_unavailable: opts.set_node_network_unavailable,
            watcher,
        })
    }

    /// Our Node's name.
    pub fn node_name(&self) -> &str {
        &self.shared.node_name
    }

    /// The annotation names in use.
    pub fn names(&self) -> &AnnotationNames {
        &self.shared.names
    }

    /// Waits for the first complete list of Nodes.
    async fn synced(&self) {
        let mut rx = self.shared.changed.subscribe();
        while !self.shared.lock().synced {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Our Node as the cache holds it (after the first list); `None` while
    /// it does not exist.
    pub async fn own_node(&self) -> Option<OwnNode> {
        self.synced().await;
        self.shared.lock().own.clone()
    }

    /// Waits until our Node exists and has a podCIDR (saying every
    /// [`WAIT_LOG_INTERVAL`] why it waits), then publishes `attrs` as
    /// annotations (only those that differ) and returns the lease as peers
    /// will read it. A podCIDR outside the network is an error.
    pub async fn acquire_node_lease(
        &self,
        attrs: &LeaseAttrs,
    ) -> std::result::Result<Lease, KubeStoreError> {
        let mut rx = self.shared.changed.subscribe();
        let mut said: Option<(String, Instant)> = None;
        loop {
            let (synced, own) = {
                let c = self.shared.lock();
                (c.synced, c.own.clone())
            };
            let problem = match (synced, own) {
                (false, _) => None,
                (true, None) => Some(format!(
                    "node {:?} not found in the Kubernetes API; waiting for it (check NODE_NAME, or the pod's spec.nodeName)",
                    self.shared.node_name
                )),
                (true, Some(own)) => match own.view().own_key(&self.shared.cfg) {
                    Ok(key) => return self.publish(&own, key, attrs).await,
                    Err(e @ KubeError::PodCidrNotAssigned { .. }) => Some(e.to_string()),
                    Err(e) => return Err(e.into()),
                },
            };
            if let Some(p) = problem {
                let due = said
                    .as_ref()
                    .is_none_or(|(s, at)| *s != p || at.elapsed() >= WAIT_LOG_INTERVAL);
                if due {
                    tracing::error!("{p}");
                    said = Some((p, Instant::now()));
                }
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Err(KubeStoreError::Config("the Node watcher stopped".into())); },
                _ = tokio::time::sleep(WAIT_LOG_INTERVAL) => {}
            }
        }
    }

    /// Patches the annotations of `attrs` that our Node does not hold yet;
    /// returns our lease as it reads back.
    async fn publish(
        &self,
        own: &OwnNode,
        key: LeaseKey,
        attrs: &LeaseAttrs,
    ) -> std::result::Result<Lease, KubeStoreError> {
        let names = &self.shared.names;
        let desired = logic::desired_annotations(names, attrs, &own.annotations);
        let changes = logic::annotation_changes(&own.annotations, &desired);
        if changes.is_empty() {
            tracing::info!(node = %own.name, "lease annotations already in place");
        } else {
            let body = logic::annotation_patch(&changes);
            self.patch_status("publishing the lease annotations", &body)
                .await;
            tracing::info!(node = %own.name, annotations = ?changes.keys().collect::<Vec<_>>(), "published the lease annotations");
            self.wait_until_cached(&changes).await;
        }
        let mut published = own.clone();
        published.annotations.extend(desired);
        let lease = published
            .view()
            .lease(names, &self.shared.cfg)?
            .expect("kube-subnet-manager was just set");
        Ok(Lease {
            key,
            attrs: lease.attrs,
            expiration: None,
        })
    }

    /// Waits (a few seconds at most) until the watcher has seen our Node
    /// with `annotations`: a watch that has not caught up with our own
    /// patch yet would otherwise show our lease as still missing.
    async fn wait_until_cached(&self, annotations: &BTreeMap<String, String>) {
        let mut rx = self.shared.changed.subscribe();
        let seen = || {
            self.shared.lock().own.as_ref().is_some_and(|o| {
                annotations
                    .iter()
                    .all(|(k, v)| o.annotations.get(k) == Some(v))
            })
        };
        let wait = async {
            while !seen() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .is_err()
        {
            tracing::warn!(node = %self.shared.node_name, "the Node watch has not shown our published annotations after 10 s; going on");
        }
    }

    /// `PATCH nodes/<name>/status` (strategic merge), retried with backoff
    /// until the API server accepts it.
    async fn patch_status(&self, what: &str, body: &str) {
        let value: serde_json::Value =
            serde_json::from_str(body).expect("flannel-core's patches are JSON");
        let mut delay = BACKOFF_MIN;
        loop {
            match self
                .nodes
                .patch_status(
                    &self.shared.node_name,
                    &PatchParams::default(),
                    &Patch::Strategic(&value),
                )
                .await
            {
                Ok(_) => return,
                Err(e) => {
                    let hint = match &e {
                        kube::Error::Api(s) if s.code == 403 => {
                            "; flanneld's account needs RBAC nodes/status patch (ClusterRole flannel in kube-flannel.yml)"
                        }
                        _ => "",
                    };
                    tracing::warn!(node = %self.shared.node_name, error = %e, retry_in = ?delay, "{what} failed{hint}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// The Node of our pod (`spec.nodeName`), retried while the API server
/// cannot be reached; an error the server answers is final.
async fn pod_node_name(
    pods: Api<Pod>,
    namespace: &str,
    name: &str,
) -> std::result::Result<String, KubeStoreError> {
    let mut delay = BACKOFF_MIN;
    loop {
        match pods.get(name).await {
            Ok(pod) => {
                return pod
                    .spec
                    .and_then(|s| s.node_name)
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| KubeStoreError::PodNotScheduled {
                        namespace: namespace.into(),
                        name: name.into(),
                    })
            }
            Err(e @ kube::Error::Api(_)) => {
                return Err(KubeStoreError::Pod {
                    namespace: namespace.into(),
                    name: name.into(),
                    source: e,
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "looking up our pod {namespace}/{name}: API server unreachable; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// RFC 3339 in whole seconds, as Kubernetes writes times.
fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

impl Store for KubeStore {
    /// In Kubernetes mode the network config is `--net-config-path` (the
    /// ConfigMap mounted by kube-flannel.yml), as upstream.
    async fn get_network_config(&self) -> Result<Option<String>> {
        Ok(None)
    }

    /// Every Node's lease, from the watcher's cache (no request).
    async fn list_leases(&self) -> Result<LeaseSnapshot> {
        self.synced().await;
        Ok(self.shared.lock().snapshot())
    }

    /// Same as [`Store::update_lease`]: a lease cannot be created in
    /// Kubernetes mode, only our Node's annotations published.
    async fn create_lease(&self, lease: &Lease, ttl: Option<Duration>) -> Result<Option<Lease>> {
        self.update_lease(lease, ttl).await.map(Some)
    }

    /// Publishes `lease.attrs` on our Node, whose podCIDR must be
    /// `lease.key` ([`StoreError::Conflict`] otherwise). Leases never expire
    /// in this mode: `ttl` is ignored.
    async fn update_lease(&self, lease: &Lease, _ttl: Option<Duration>) -> Result<Lease> {
        let Some(own) = self.own_node().await else {
            return Err(StoreError::NotFound {
                key: lease.key.to_string(),
            });
        };
        let key = own
            .view()
            .own_key(&self.shared.cfg)
            .map_err(|e| StoreError::InvalidLease {
                key: lease.key.to_string(),
                detail: e.to_string(),
            })?;
        if key != lease.key {
            return Err(StoreError::Conflict {
                key: lease.key.to_string(),
                detail: format!("node {:?} has podCIDR {key}", own.name),
            });
        }
        self.publish(&own, key, &lease.attrs)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    /// A lease is a Node: flanneld never deletes one.
    async fn delete_lease(&self, key: &LeaseKey) -> Result<()> {
        Err(StoreError::Unsupported(format!(
            "lease {key}: in Kubernetes mode a lease is a Node's podCIDR; delete the Node instead"
        )))
    }

    /// A Snapshot of the cache, then the changes the watcher sees.
    async fn watch_leases(&self) -> Result<mpsc::Receiver<WatchEvent>> {
        self.synced().await;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        let mut c = self.shared.lock();
        c.subscribers.retain(|s| !s.is_closed());
        tx.try_send(WatchEvent::Snapshot(c.snapshot()))
            .expect("a fresh channel has room");
        c.subscribers.push(tx);
        Ok(rx)
    }

    async fn acquire(
        &self,
        _cfg: &NetConfig,
        attrs: &LeaseAttrs,
        _previous: Option<LeaseKey>,
        _ttl: Duration,
        _listed: Option<LeaseSnapshot>,
    ) -> std::result::Result<Lease, AcquireError> {
        self.acquire_node_lease(attrs)
            .await
            .map_err(AcquireError::Kube)
    }

    /// Our Node's lease annotations (the VtepMAC survives reboots and
    /// address changes).
    async fn own_published_attrs(&self) -> Result<Option<LeaseAttrs>> {
        let Some(own) = self.own_node().await else {
            return Ok(None);
        };
        Ok(own
            .view()
            .lease(&self.shared.names, &self.shared.cfg)
            .ok()
            .flatten()
            .map(|l| l.attrs))
    }

    /// Sets our Node's `NetworkUnavailable=False` (reason `FlannelIsUp`)
    /// unless `--set-node-network-unavailable=false`, retrying in the
    /// background while the API server refuses.
    async fn complete_lease(&self, _lease: &Lease) -> Result<()> {
        if !self.set_node_network_unavailable {
            return Ok(());
        }
        let nodes = self.nodes.clone();
        let name = self.shared.node_name.clone();
        tokio::spawn(async move {
            let mut delay = BACKOFF_MIN;
            loop {
                let body: serde_json::Value =
                    serde_json::from_str(&logic::network_unavailable_patch(&now_rfc3339()))
                        .expect("flannel-core's patches are JSON");
                match nodes
                    .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&body))
                    .await
                {
                    Ok(_) => {
                        tracing::info!(node = %name, "set NetworkUnavailable=False (FlannelIsUp)");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(node = %name, error = %e, retry_in = ?delay, "setting NetworkUnavailable=False failed");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(BACKOFF_MAX);
                    }
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(key: &str, ip: &str) -> Lease {
        Lease {
            key: key.parse().unwrap(),
            attrs: LeaseAttrs::new("host-gw", Some(ip.parse().unwrap()), None),
            expiration: None,
        }
    }

    #[test]
    fn node_identity_as_upstream() {
        assert_eq!(
            NodeIdentity::from_env(Some("n1"), None, None).unwrap(),
            NodeIdentity::Name("n1".into())
        );
        assert_eq!(
            NodeIdentity::from_env(Some(""), Some("p"), Some("kube-flannel")).unwrap(),
            NodeIdentity::Pod {
                namespace: "kube-flannel".into(),
                name: "p".into()
            }
        );
        let e = NodeIdentity::from_env(None, Some("p"), None).unwrap_err();
        assert!(e
            .to_string()
            .contains("env variables POD_NAME and POD_NAMESPACE must be set"));
    }

    #[test]
    fn lease_events_per_change() {
        let a = lease("10.244.1.0-24", "172.16.1.12");
        let b = lease("10.244.1.0-24", "172.16.1.99");
        let c = lease("10.244.9.0-24", "172.16.1.12");
        assert!(lease_events(None, None).is_empty());
        assert!(lease_events(Some(a.clone()), Some(a.clone())).is_empty());
        assert_eq!(
            lease_events(None, Some(a.clone())),
            vec![LeaseEvent::Upsert(a.clone())]
        );
        assert_eq!(
            lease_events(Some(a.clone()), None),
            vec![LeaseEvent::Removed(a.key)]
        );
        assert_eq!(
            lease_events(Some(a.clone()), Some(b.clone())),
            vec![LeaseEvent::Upsert(b)]
        );
        assert_eq!(
            lease_events(Some(a.clone()), Some(c.clone())),
            vec![LeaseEvent::Removed(a.key), LeaseEvent::Upsert(c)]
        );
    }

    /// Only what flannel needs of a Node is decoded.
    #[test]
    fn node_summary_keeps_name_annotations_and_cidrs() {
        let n: NodeSummary = serde_json::from_str(
            r#"{"metadata":{"name":"k8s-node1","uid":"u","resourceVersion":"212",
                "labels":{"a":"b"},"annotations":{"x":"y"},
                "managedFields":[{"manager":"kubectl-create","fieldsV1":{"f:metadata":{}}}]},
               "spec":{"podCIDR":"10.244.1.0/24","podCIDRs":["10.244.1.0/24"],
                "taints":[{"key":"node.kubernetes.io/not-ready","effect":"NoSchedule"}]},
               "status":{"images":[{"names":["a"],"sizeBytes":1}]}}"#,
        )
        .unwrap();
        let own = OwnNode::from_summary(&n);
        assert_eq!(own.name, "k8s-node1");
        assert_eq!(own.annotations["x"], "y");
        assert_eq!(own.pod_cidrs, vec!["10.244.1.0/24"]);
        assert_eq!(n.metadata.resource_version.as_deref(), Some("212"));
        assert!(n.metadata.labels.is_none() && n.metadata.managed_fields.is_none());
    }
}
