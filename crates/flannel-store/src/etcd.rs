//! The etcd v3 store, wire-compatible with upstream flannel's etcd subnet
//! manager so that upstream nodes and ours can share one cluster.
//!
//! # Layout (below `--etcd-prefix`, default `/coreos.com/network`)
//!
//! ```text
//! <prefix>/config                          the net-conf JSON (written by the operator)
//! <prefix>/subnets/10.244.1.0-24           one key per lease, named by the LeaseKey string
//! <prefix>/subnets/10.244.2.0-24&fd00:10:244:2::-64
//! ```
//!
//! A lease value is upstream's `LeaseAttrs` JSON, byte for byte. A lease key is
//! attached to an etcd lease granted with the TTL (24 h in production), so
//! etcd itself deletes it when it is not renewed; a key without an etcd lease
//! is a reservation: it never expires and is never handed to another node.
//!
//! # Failures
//!
//! A request that no member could take (a dead member refused the
//! connection, the cluster is electing a leader) is tried again for about
//! 3.5 s, so one member of three going down is invisible to callers; then it
//! fails with [`StoreError::Unavailable`] naming the endpoints. A wrong
//! password, an unknown user or a missing permission fails
//! [`EtcdStore::connect`] with [`ConnectError::Option`] (not retryable).
//! Values that are not lease JSON and keys that are not lease keys are
//! skipped with a warning naming the key.
//!
//! # Watch
//!
//! A [`WatchEvent::Snapshot`] from a list, then events from a watch started
//! at the list's revision + 1 with previous values. Expiry reaches watchers
//! as etcd's DELETE, hence [`LeaseEvent::Removed`]. When etcd compacted the
//! history the watch needs, or the stream fails (restart, member lost), the
//! watch backs off (100 ms doubling to 5 s), lists again, sends a fresh
//! Snapshot and resumes from that revision: no event is lost or replayed
//! across the gap. Expirations come from `LeaseTimeToLive`, cached per etcd
//! lease id and looked up in parallel for a list.
//!
//! # Differences from upstream, on purpose
//!
//! * Renewal keeps the key's etcd lease alive (one `LeaseKeepAlive`) instead
//!   of granting a new etcd lease every time; a new one is granted only when
//!   the old one is gone or was granted with another TTL.
//! * `create_lease` refuses a key that overlaps a held key in either family
//!   (dual stack: same IPv4 subnet, another IPv6 one), not only the same key.
//!   The transaction is guarded by "key absent" and by "nothing under
//!   `subnets/` changed since the check", so the wider check is atomic too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KeyValue,
    KvClient, LeaseTimeToLiveOptions, PutOptions, TlsOptions, Txn, TxnOp, WatchClient,
    WatchOptions,
};
use flannel_core::lease::{Lease, LeaseAttrs, LeaseEvent, LeaseKey};
use flannel_core::wire;
use tokio::sync::{mpsc, watch};

use crate::{LeaseSnapshot, Result, Store, StoreError, WatchEvent};

/// What to tell the operator when `<prefix>/config` is missing (upstream's
/// hint): the config must be written with the etcd v3 API; a key written with
/// the v2 API is invisible to v3 clients. [`missing_config_message`] adds
/// the key and an example command.
pub const MISSING_CONFIG_HINT: &str = "write it with the etcd v3 API \
     (a key written with the v2 API is not visible to v3 clients)";

/// The full error text for a missing `<prefix>/config`: the key, the hint
/// and an example (`ETCDCTL_API=3 etcdctl put <prefix>/config '{...}'`).
pub fn missing_config_message(prefix: &str) -> String {
    let key = format!("{}/{}", prefix.trim_end_matches('/'), wire::ETCD_CONFIG_KEY);
    format!(
        "network config not found at {key} in etcd: {MISSING_CONFIG_HINT}, e.g. \
         ETCDCTL_API=3 etcdctl put {key} '{{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}'"
    )
}

/// Default time limit of one etcd request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time limit of establishing a connection to one endpoint.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Capacity of a watch channel.
const WATCH_CHANNEL_CAPACITY: usize = 256;
/// First pause after a failed watch or list; doubles up to [`WATCH_MAX_BACKOFF`].
const WATCH_MIN_BACKOFF: Duration = Duration::from_millis(100);
const WATCH_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a create re-checks after a concurrent change under `subnets/`
/// before it reports "taken" (the acquirer then plans again).
const CREATE_ATTEMPTS: u32 = 20;
/// Puts per transaction of [`EtcdStore::import`]: etcd's default
/// `--max-txn-ops`.
pub const IMPORT_TXN_OPS: usize = 128;
/// How often an update retries when the key changed between read and write.
const UPDATE_ATTEMPTS: u32 = 10;
/// Attempts of one request while no member can take it, and the pauses
/// between them (about 3.5 s in all: a leader election fits).
const REQUEST_ATTEMPTS: u32 = 8;
const RETRY_FIRST_DELAY: Duration = Duration::from_millis(50);
const RETRY_MAX_DELAY: Duration = Duration::from_secs(1);
/// Immediate retries of a request whose endpoint could not be connected to
/// (the balanced channel picks endpoints at random).
const UNREACHED_ATTEMPTS: u32 = 16;
/// gRPC status code UNAVAILABLE (fixed by the gRPC spec): connection
/// refused, no leader, leader changed, request timed out in raft.
const GRPC_UNAVAILABLE: i32 = 14;
/// Keys per page of a list.
const LIST_PAGE_KEYS: i64 = 1000;
/// Largest response accepted from etcd (a page of big values, a watch
/// response of a large transaction).
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;
/// Parallel TTL lookups of one list.
const LOOKUP_CONCURRENCY: usize = 16;
/// The TTL cache forgets everything past this many lease ids.
const TTL_CACHE_MAX: usize = 8192;

/// How to reach etcd: upstream's `--etcd-*` flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    /// `--etcd-endpoints` (comma-separated on the command line):
    /// `http://127.0.0.1:2379`, `https://10.0.0.1:2379`, or `host:port`
    /// (https when TLS files are given).
    pub endpoints: Vec<String>,
    /// `--etcd-prefix`.
    pub prefix: String,
    /// `--etcd-cafile`: PEM CA bundle that signed the servers' certificates.
    pub ca_file: Option<PathBuf>,
    /// `--etcd-certfile`: PEM client certificate (needs `key_file`).
    pub cert_file: Option<PathBuf>,
    /// `--etcd-keyfile`: PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// `--etcd-username`.
    pub username: Option<String>,
    /// `--etcd-password`.
    pub password: Option<String>,
    /// Time limit of one request (not of a watch stream).
    pub request_timeout: Duration,
    /// Time limit of connecting to one endpoint.
    pub connect_timeout: Duration,
}

impl Default for EtcdOptions {
    /// Upstream's defaults: endpoints `http://127.0.0.1:4001,http://127.0.0.1:2379`,
    /// prefix `/coreos.com/network`, no TLS, no auth.
    fn default() -> Self {
        EtcdOptions {
            endpoints: wire::DEFAULT_ETCD_ENDPOINTS
                .split(',')
                .map(str::to_string)
                .collect(),
            prefix: wire::DEFAULT_ETCD_PREFIX.to_string(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// Why [`EtcdStore::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A flag is wrong (retrying cannot help): the message names it and the fix.
    #[error("--{flag}: {detail}")]
    Option { flag: &'static str, detail: String },
    /// etcd could not be reached or refused us ([`StoreError::Unavailable`]):
    /// retry with backoff.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ConnectError {
    /// Whether retrying later may succeed (etcd down or not elected yet).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ConnectError::Store(_))
    }
}

/// The etcd v3 lease store. Cheap to share behind an `Arc`; dropping it ends
/// its watches (their channels close).
pub struct EtcdStore {
    inner: Arc<Inner>,
    /// Dropped with the store: every watch task sees it and stops.
    _shutdown: watch::Sender<()>,
    shutdown_rx: watch::Receiver<()>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.endpoints)
            .field("prefix", &self.inner.prefix)
            .finish()
    }
}

/// What the store and its watch tasks share.
struct Inner {
    client: Client,
    /// Reads and watches through clients that accept messages up to
    /// [`MAX_RESPONSE_BYTES`] (gRPC's default limit is 4 MiB).
    kv: KvClient,
    watcher: WatchClient,
    /// Endpoints as given, for error messages.
    endpoints: String,
    /// `--etcd-prefix` without a trailing slash.
    prefix: String,
    /// `<prefix>/subnets/`.
    subnets: String,
    ttl_cache: Mutex<TtlCache>,
}

/// Expirations by etcd lease id. An entry looked up when the store was at
/// revision R is good for every key whose mod_revision is <= R: a later put
/// may come with a renewal, an earlier one cannot have seen a fresher TTL.
/// (A keepalive does not move the revision, so an entry is a lower bound:
/// that is all a reader needs, since etcd itself deletes expired keys.)
#[derive(Default)]
struct TtlCache {
    /// Lease id -> (expiration, or `None` once gone for good; revision of
    /// the lookup). Lease ids are random 64-bit numbers, never reused.
    entries: HashMap<i64, (Option<SystemTime>, i64)>,
}

impl TtlCache {
    /// The cached answer for a key of lease `id` modified at `mod_revision`.
    fn get(&self, id: i64, mod_revision: i64, now: SystemTime) -> Option<Option<SystemTime>> {
        match self.entries.get(&id) {
            Some(&(None, _)) => Some(None),
            Some(&(Some(exp), seen_at)) if seen_at >= mod_revision && exp > now => Some(Some(exp)),
            _ => None,
        }
    }

    fn insert(&mut self, id: i64, expiration: Option<SystemTime>, revision: i64, now: SystemTime) {
        if self.entries.len() >= TTL_CACHE_MAX {
            self.entries
                .retain(|_, (exp, _)| exp.is_some_and(|e| e > now));
            if self.entries.len() >= TTL_CACHE_MAX {
                self.entries.clear();
            }
        }
        self.entries.insert(id, (expiration, revision));
    }
}

/// The state of an etcd lease.
enum LeaseState {
    /// Alive: expires at this time; `granted` is its TTL in seconds.
    Alive {
        expiration: SystemTime,
        granted: i64,
    },
    /// Expired or revoked: its keys are deleted or about to be.
    Gone,
}

impl EtcdStore {
    /// Connects to etcd (TLS with client certificates and/or
    /// username/password when set) and checks that the cluster answers a read
    /// of `<prefix>/config`.
    ///
    /// `etcdctl --endpoints=... --cacert=... --cert=... --key=... --user=... get <prefix>/config`
    pub async fn connect(opts: EtcdOptions) -> Result<EtcdStore, ConnectError> {
        let endpoints: Vec<String> = opts
            .endpoints
            .iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(ConnectError::Option {
                flag: "etcd-endpoints",
                detail: "no endpoint given; set it to e.g. http://127.0.0.1:2379".into(),
            });
        }
        let prefix = opts.prefix.trim_end_matches('/').to_string();
        if !opts.prefix.starts_with('/') {
            return Err(ConnectError::Option {
                flag: "etcd-prefix",
                detail: format!(
                    "{:?} must start with '/', e.g. {}",
                    opts.prefix,
                    wire::DEFAULT_ETCD_PREFIX
                ),
            });
        }
        let shown = endpoints.join(",");
        let mut copts = ConnectOptions::new()
            .with_timeout(opts.request_timeout)
            .with_connect_timeout(opts.connect_timeout)
            // Notices a member that died without closing the connection
            // (host gone): the watch then reconnects to another member.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            // A member cut off from the leader refuses (and cancels its
            // watches) instead of serving stale data: we go to another one.
            .with_require_leader(true)
            .with_auto_token_refresh(true);
        if let Some(tls) = tls_options(&opts, &endpoints)? {
            copts = copts.with_tls(tls);
        }
        match (&opts.username, &opts.password) {
            (Some(user), password) if !user.is_empty() => {
                copts = copts.with_user(user.clone(), password.clone().unwrap_or_default());
            }
            (_, Some(p)) if !p.is_empty() => {
                return Err(ConnectError::Option {
                    flag: "etcd-password",
                    detail: "a password without --etcd-username; set both or neither".into(),
                })
            }
            _ => {}
        }
        let who = match &opts.username {
            Some(u) if !u.is_empty() => format!("user {u:?}"),
            _ if opts.cert_file.is_some() => "the client certificate's CN".to_string(),
            _ => "anonymous clients".to_string(),
        };
        // With credentials, connecting authenticates: a wrong password is a
        // wrong flag, not an outage, and retrying cannot fix it.
        let client = match Client::connect(&endpoints, Some(copts)).await {
            Ok(c) => c,
            Err(e) if is_refusal(&e) => {
                return Err(ConnectError::Option {
                    flag: "etcd-password",
                    detail: format!(
                    "etcd at {shown} rejected {who}: {}; check --etcd-username and --etcd-password",
                    describe(&e)
                ),
                })
            }
            Err(e) => {
                return Err(StoreError::Unavailable(format!(
                    "cannot connect to etcd at {shown}: {}",
                    describe(&e)
                ))
                .into())
            }
        };
        let (tx, rx) = watch::channel(());
        let store = EtcdStore {
            inner: Arc::new(Inner {
                kv: client
                    .kv_client()
                    .max_decoding_message_size(MAX_RESPONSE_BYTES),
                watcher: client
                    .watch_client()
                    .max_decoding_message_size(MAX_RESPONSE_BYTES),
                client,
                endpoints: shown,
                subnets: format!("{prefix}/{}/", wire::ETCD_SUBNETS_DIR),
                prefix,
                ttl_cache: Mutex::new(TtlCache::default()),
            }),
            _shutdown: tx,
            shutdown_rx: rx,
        };
        // The connection is lazy: prove that a member answers, and that we
        // may read below the prefix, before the daemon goes on.
        let key = store.config_key();
        let probe = store
            .inner
            .call_raw(&format!("get {key}"), |mut c| {
                let key = key.clone();
                async move { c.get(key, Some(GetOptions::new().with_count_only())).await }
            })
            .await;
        match probe {
            Ok(_) => Ok(store),
            Err(e) if is_refusal(&e) => Err(ConnectError::Option {
                flag: "etcd-username",
                detail: format!(
                    "etcd at {} refuses {key} to {who}: {e}; grant the user readwrite on the prefix \
                     (etcdctl role grant-permission ROLE --prefix=true readwrite {}/)",
                    store.inner.endpoints, store.inner.prefix
                ),
            }),
            Err(e) => Err(store.inner.unavailable(&format!("get {key}"), e).into()),
        }
    }

    /// `--etcd-prefix` without the trailing slash.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The etcd key of a lease: `<prefix>/subnets/10.244.1.0-24`.
    pub fn lease_key(&self, key: &LeaseKey) -> String {
        format!("{}{key}", self.inner.subnets)
    }

    /// The etcd key of the network config: `<prefix>/config`.
    pub fn config_key(&self) -> String {
        format!("{}/{}", self.inner.prefix, wire::ETCD_CONFIG_KEY)
    }

    /// Resumes watching after `revision` (the revision of a snapshot or of
    /// the last events the caller applied), without an initial Snapshot. If
    /// etcd compacted that history meanwhile, the watch lists again and
    /// sends a [`WatchEvent::Snapshot`] before further events.
    ///
    /// `etcdctl watch --prefix --rev=<revision+1> --prev-kv <prefix>/subnets/`
    pub fn watch_leases_since(&self, revision: u64) -> mpsc::Receiver<WatchEvent> {
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        tokio::spawn(run_watch(
            Arc::clone(&self.inner),
            tx,
            self.shutdown_rx.clone(),
            revision as i64,
        ));
        rx
    }

    /// Puts many leases at once without an etcd lease (reservations, as
    /// upstream reads a key without TTL), each overwriting its key, in
    /// transactions of [`IMPORT_TXN_OPS`] puts: for loading a store in bulk
    /// (a benchmark's thousands of peers). Unlike [`Store::create_lease`]
    /// it checks no overlap: the caller vouches for the set.
    pub async fn import(&self, leases: &[Lease]) -> Result<()> {
        let inner = &self.inner;
        for chunk in leases.chunks(IMPORT_TXN_OPS) {
            let mut ops = Vec::with_capacity(chunk.len());
            for l in chunk {
                ops.push(TxnOp::put(
                    inner.lease_key(&l.key)?,
                    l.attrs.to_json(),
                    None,
                ));
            }
            let txn = Txn::new().and_then(ops);
            inner
                .call(&format!("txn import of {} leases", chunk.len()), |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
        }
        Ok(())
    }

    /// Puts the network config (`etcdctl put <prefix>/config JSON`).
    pub async fn put_network_config(&self, json: &str) -> Result<()> {
        let (key, value) = (self.config_key(), json.to_string());
        self.inner
            .call(&format!("put {key}"), |mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move { c.put(key, value, None).await }
            })
            .await?;
        Ok(())
    }

    /// The underlying client (tests and tools: raw reads, compaction, auth setup).
    pub fn client(&self) -> Client {
        self.inner.client.clone()
    }
}

/// Reads the TLS files named by the options.
fn tls_options(
    opts: &EtcdOptions,
    endpoints: &[String],
) -> Result<Option<TlsOptions>, ConnectError> {
    fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, ConnectError> {
        std::fs::read(path).map_err(|e| ConnectError::Option {
            flag,
            detail: format!("cannot read {}: {e}", path.display()),
        })
    }
    let any_https = endpoints.iter().any(|e| e.starts_with("https://"));
    let any_tls = opts.ca_file.is_some() || opts.cert_file.is_some() || opts.key_file.is_some();
    if !any_tls {
        if any_https {
            return Err(ConnectError::Option {
                flag: "etcd-cafile",
                detail: "https endpoints need the CA that signed the etcd servers' certificates"
                    .into(),
            });
        }
        return Ok(None);
    }
    if let Some(plain) = endpoints.iter().find(|e| e.starts_with("http://")) {
        return Err(ConnectError::Option {
            flag: "etcd-endpoints",
            detail: format!(
                "{plain} is plain HTTP but TLS files are set; use https:// endpoints or drop --etcd-cafile/--etcd-certfile/--etcd-keyfile"
            ),
        });
    }
    let mut tls = TlsOptions::new();
    match &opts.ca_file {
        Some(ca) => tls = tls.ca_certificate(Certificate::from_pem(read("etcd-cafile", ca)?)),
        None => {
            return Err(ConnectError::Option {
                flag: "etcd-cafile",
                detail: "TLS needs the CA that signed the etcd servers' certificates".into(),
            })
        }
    }
    match (&opts.cert_file, &opts.key_file) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(
                read("etcd-certfile", cert)?,
                read("etcd-keyfile", key)?,
            ));
        }
        (None, None) => {}
        (Some(_), None) => {
            return Err(ConnectError::Option {
                flag: "etcd-keyfile",
                detail: "--etcd-certfile needs its private key".into(),
            })
        }
        (None, Some(_)) => {
            return Err(ConnectError::Option {
                flag: "etcd-certfile",
                detail: "--etcd-keyfile needs its certificate".into(),
            })
        }
    }
    Ok(Some(tls))
}

impl Inner {
    fn unavailable(&self, what: &str, e: etcd_client::Error) -> StoreError {
        StoreError::Unavailable(format!(
            "etcd at {}: {what}: {}",
            self.endpoints,
            describe(&e)
        ))
    }

    /// Runs one request, again when no member could take it (a dead member
    /// refused the connection, or the cluster is electing a leader): the
    /// balanced channel then picks another endpoint. Other errors return at
    /// once. Every caller tolerates a repeated request (guarded txns, reads,
    /// keepalives; a granted lease nobody uses expires).
    async fn call_raw<T, F, Fut>(&self, what: &str, f: F) -> Result<T, etcd_client::Error>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut delay = RETRY_FIRST_DELAY;
        let mut attempt = 1;
        let mut unreached = 0;
        loop {
            match f(self.client.clone()).await {
                // The endpoint picked is down (as one of upstream's two
                // default endpoints usually is): the next pick may be
                // another one, so try again at once.
                Err(e) if unreached < UNREACHED_ATTEMPTS && is_not_reached(&e) => {
                    tracing::debug!(what, error = %e, "etcd endpoint not reachable; trying another");
                    unreached += 1;
                }
                Err(e) if attempt < REQUEST_ATTEMPTS && is_transient(&e) => {
                    tracing::debug!(what, attempt, error = %e, "etcd request failed; trying again");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX_DELAY);
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    /// [`Inner::call_raw`] with errors as [`StoreError::Unavailable`].
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_raw(what, f)
            .await
            .map_err(|e| self.unavailable(what, e))
    }

    fn lease_key(&self, key: &LeaseKey) -> Result<String> {
        if key.is_empty() {
            return Err(StoreError::InvalidLease {
                key: format!("{key:?}"),
                detail: "a lease key needs an IPv4 and/or IPv6 subnet".into(),
            });
        }
        Ok(format!("{}{key}", self.subnets))
    }

    /// The lease key of an etcd key under `subnets/`, or a warning.
    fn parse_key(&self, raw: &[u8]) -> Option<LeaseKey> {
        let name = String::from_utf8_lossy(raw);
        let Some(rest) = name.strip_prefix(self.subnets.as_str()) else {
            tracing::warn!(key = %name, "skipping an etcd key outside the subnets prefix");
            return None;
        };
        match rest.parse::<LeaseKey>() {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(key = %name, error = %e, "skipping an etcd key that is not a lease key");
                None
            }
        }
    }

    /// Key and attributes of a stored lease, or a warning naming the key.
    fn parse_kv(&self, kv: &KeyValue) -> Option<(LeaseKey, LeaseAttrs)> {
        let key = self.parse_key(kv.key())?;
        match parse_attrs(kv.value()) {
            Ok(attrs) => Some((key, attrs)),
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e,
                    "skipping an etcd lease whose value is not lease JSON");
                None
            }
        }
    }

    /// `etcdctl lease timetolive <id>`, with the store revision of the answer.
    async fn lease_state(&self, id: i64) -> Result<(LeaseState, i64)> {
        let what = format!("lease timetolive {id:x}");
        match self
            .call_raw(&what, |mut c| async move {
                c.lease_time_to_live(id, None).await
            })
            .await
        {
            // 0: alive with less than a second left (etcd rounds down);
            // -1: expired or revoked.
            Ok(r) if r.ttl() >= 0 => Ok((
                LeaseState::Alive {
                    expiration: SystemTime::now() + Duration::from_secs(r.ttl() as u64),
                    granted: r.granted_ttl(),
                },
                r.header().map_or(0, |h| h.revision()),
            )),
            Ok(_) => Ok((LeaseState::Gone, 0)),
            Err(e) if is_lease_not_found(&e) => Ok((LeaseState::Gone, 0)),
            Err(e) => Err(self.unavailable(&what, e)),
        }
    }

    /// The expiration of a key with etcd lease `id` last modified at
    /// `mod_revision`: `Ok(None)` when the lease is gone (the key is being
    /// deleted). Uses the cache when it is fresh enough for that revision.
    async fn expiration(&self, id: i64, mod_revision: i64) -> Result<Option<SystemTime>> {
        let now = SystemTime::now();
        if let Some(hit) = self.cache().get(id, mod_revision, now) {
            return Ok(hit);
        }
        let (state, revision) = self.lease_state(id).await?;
        let expiration = match state {
            LeaseState::Alive { expiration, .. } => Some(expiration),
            LeaseState::Gone => None,
        };
        self.cache().insert(id, expiration, revision, now);
        Ok(expiration)
    }

    /// Looks up, [`LOOKUP_CONCURRENCY`] at a time, the expirations of
    /// these keys' etcd leases that the cache cannot answer, so that a list
    /// of many leases is not as slow as that many round trips in a row.
    async fn prefetch_expirations(self: &Arc<Self>, kvs: &[KeyValue]) -> Result<()> {
        let now = SystemTime::now();
        let mut wanted: HashMap<i64, i64> = HashMap::new();
        {
            let cache = self.cache();
            for kv in kvs.iter().filter(|kv| kv.lease() != 0) {
                if cache.get(kv.lease(), kv.mod_revision(), now).is_none() {
                    let rev = wanted.entry(kv.lease()).or_default();
                    *rev = (*rev).max(kv.mod_revision());
                }
            }
        }
        let mut wanted = wanted.into_iter();
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            while tasks.len() < LOOKUP_CONCURRENCY {
                let Some((id, rev)) = wanted.next() else {
                    break;
                };
                let inner = Arc::clone(self);
                tasks.spawn(async move { inner.expiration(id, rev).await.map(|_| ()) });
            }
            match tasks.join_next().await {
                Some(Ok(r)) => r?,
                Some(Err(e)) => {
                    return Err(StoreError::Unavailable(format!(
                        "etcd lease lookup task failed: {e}"
                    )))
                }
                None => return Ok(()),
            }
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, TtlCache> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.ttl_cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, id: i64, expiration: SystemTime, revision: i64) {
        if id != 0 {
            self.cache()
                .insert(id, Some(expiration), revision, SystemTime::now());
        }
    }

    /// `etcdctl get <key>`
    async fn get_kv(&self, key: &str) -> Result<Option<KeyValue>> {
        let owned = key.to_string();
        let mut r = self
            .call(&format!("get {key}"), |mut c| {
                let key = owned.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(r.take_kvs().into_iter().next())
    }

    /// `etcdctl get --prefix <prefix>/subnets/`: the raw keys and the revision.
    ///
    /// Read in pages of [`LIST_PAGE_KEYS`] keys, every page at the revision
    /// of the first, so that a large cluster's list is one consistent view
    /// without one huge response. A compaction between pages starts over.
    async fn raw_list(&self) -> Result<(Vec<KeyValue>, i64)> {
        let what = format!("get --prefix {}", self.subnets);
        let end = prefix_end(self.subnets.as_bytes());
        let mut attempt = 1;
        'list: loop {
            let mut kvs = Vec::new();
            let mut start = self.subnets.as_bytes().to_vec();
            let mut revision = 0;
            loop {
                let mut opts = GetOptions::new()
                    .with_range(end.clone())
                    .with_limit(LIST_PAGE_KEYS);
                if revision > 0 {
                    opts = opts.with_revision(revision);
                }
                let page = self
                    .call_raw(&what, |_| {
                        let (mut kv, start, opts) = (self.kv.clone(), start.clone(), opts.clone());
                        async move { kv.get(start, Some(opts)).await }
                    })
                    .await;
                let mut r = match page {
                    Ok(r) => r,
                    Err(e) if revision > 0 && attempt < 3 && is_compacted(&e) => {
                        attempt += 1;
                        continue 'list;
                    }
                    Err(e) => return Err(self.unavailable(&what, e)),
                };
                if revision == 0 {
                    revision = r.header().map_or(0, |h| h.revision());
                }
                let more = r.more();
                let page = r.take_kvs();
                match page.last() {
                    Some(last) if more => {
                        // The next page starts right after the last key.
                        start = last.key().to_vec();
                        start.push(0);
                    }
                    _ => {
                        kvs.extend(page);
                        return Ok((kvs, revision));
                    }
                }
                kvs.extend(page);
            }
        }
    }

    /// The stored lease of one key-value; `None` (with a warning for bad
    /// data) when it is not a live lease.
    async fn to_lease(&self, kv: &KeyValue) -> Result<Option<Lease>> {
        let Some((key, attrs)) = self.parse_kv(kv) else {
            return Ok(None);
        };
        let expiration = if kv.lease() == 0 {
            None
        } else {
            match self.expiration(kv.lease(), kv.mod_revision()).await? {
                Some(t) => Some(t),
                None => return Ok(None),
            }
        };
        Ok(Some(Lease {
            key,
            attrs,
            expiration,
        }))
    }

    async fn list(self: &Arc<Self>) -> Result<LeaseSnapshot> {
        let (kvs, revision) = self.raw_list().await?;
        self.prefetch_expirations(&kvs).await?;
        let mut leases = Vec::with_capacity(kvs.len());
        for kv in &kvs {
            if let Some(l) = self.to_lease(kv).await? {
                leases.push(l);
            }
        }
        Ok(LeaseSnapshot {
            leases,
            revision: revision.max(0) as u64,
        })
    }

    /// `etcdctl lease grant <ttl>`: the lease id and its expiration.
    async fn grant(&self, ttl: Duration) -> Result<(i64, SystemTime)> {
        let secs = ttl_secs(ttl);
        let r = self
            .call("lease grant", |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await?;
        Ok((
            r.id(),
            SystemTime::now() + Duration::from_secs(r.ttl().max(0) as u64),
        ))
    }

    /// `etcdctl lease revoke <id>` when no key is attached to it any more
    /// (`etcdctl lease timetolive --keys <id>`), best effort: an unused lease
    /// expires by itself anyway, while revoking one that an operator shared
    /// with other keys would delete them.
    async fn revoke_quietly(&self, id: i64) {
        let mut client = self.client.clone();
        match client
            .lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
            .await
        {
            Ok(r) if !r.keys().is_empty() => {
                tracing::debug!(lease = %format!("{id:x}"), keys = r.keys().len(),
                    "not revoking an etcd lease that other keys still use");
                return;
            }
            Ok(_) => {}
            Err(e) if is_lease_not_found(&e) => {}
            Err(e) => {
                tracing::debug!(lease = %format!("{id:x}"), error = %e, "cannot check an unused etcd lease; leaving it to expire");
                return;
            }
        }
        match client.lease_revoke(id).await {
            Err(e) if !is_lease_not_found(&e) => {
                tracing::debug!(lease = %format!("{id:x}"), error = %e, "revoking an unused etcd lease failed; it will expire");
                self.cache().entries.remove(&id);
            }
            _ => self.cache().insert(id, None, 0, SystemTime::now()),
        }
    }

    /// Keeps etcd lease `id` alive for another period when it still exists
    /// and was granted with `ttl`; otherwise grants a new one. Returns the
    /// lease id to attach and the expiration.
    ///
    /// `etcdctl lease keep-alive --once <id>` / `etcdctl lease grant <ttl>`
    async fn renew_or_grant(&self, id: i64, ttl: Duration) -> Result<(i64, SystemTime)> {
        if id != 0 {
            if let (LeaseState::Alive { granted, .. }, _) = self.lease_state(id).await? {
                if granted == ttl_secs(ttl) {
                    let what = format!("lease keep-alive {id:x}");
                    match self
                        .call_raw(&what, |mut c| async move { c.lease_keep_alive(id).await })
                        .await
                    {
                        // The keepalive stream is closed when these drop: once is enough.
                        Ok((_keeper, _stream)) => {
                            return Ok((
                                id,
                                SystemTime::now() + Duration::from_secs(granted as u64),
                            ));
                        }
                        Err(e) if is_lease_not_found(&e) => {}
                        Err(e) => return Err(self.unavailable(&what, e)),
                    }
                } else {
                    tracing::info!(lease = %format!("{id:x}"), granted, wanted = ttl_secs(ttl),
                        "etcd lease was granted with another TTL; granting a new one");
                }
            }
        }
        self.grant(ttl).await
    }
}

impl Store for EtcdStore {
    /// `etcdctl get <prefix>/config`. `Ok(None)` when absent: tell the user
    /// [`missing_config_message`].
    async fn get_network_config(&self) -> Result<Option<String>> {
        let key = self.config_key();
        let r = self
            .inner
            .call(&format!("get {key}"), |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(r.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// `etcdctl get --prefix <prefix>/subnets/`; keys or values that do not
    /// parse are skipped with a warning naming the key.
    async fn list_leases(&self) -> Result<LeaseSnapshot> {
        self.inner.list().await
    }

    /// A transaction: if the key does not exist and nothing under
    /// `subnets/` changed since we saw no overlapping lease, put it with a
    /// freshly granted etcd lease (`ttl: None`: without one, a reservation).
    async fn create_lease(&self, lease: &Lease, ttl: Option<Duration>) -> Result<Option<Lease>> {
        let inner = &self.inner;
        let key = inner.lease_key(&lease.key)?;
        let value = lease.attrs.to_json();
        let mut granted: Option<(i64, SystemTime)> = None;
        for _ in 0..CREATE_ATTEMPTS {
            let (kvs, revision) = inner.raw_list().await?;
            let taken = kvs.iter().find_map(|kv| {
                let held = inner.parse_key(kv.key())?;
                held.overlaps(&lease.key).then_some(held)
            });
            if let Some(held) = taken {
                tracing::debug!(wanted = %lease.key, held = %held, "subnet already leased");
                break;
            }
            if granted.is_none() {
                if let Some(ttl) = ttl {
                    granted = Some(inner.grant(ttl).await?);
                }
            }
            let put_opts = granted.map(|(id, _)| PutOptions::new().with_lease(id));
            let txn = Txn::new()
                .when([
                    Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                    Compare::mod_revision(inner.subnets.as_str(), CompareOp::Less, revision + 1)
                        .with_prefix(),
                ])
                .and_then([TxnOp::put(key.as_str(), value.as_str(), put_opts)]);
            let r = inner
                .call(&format!("txn create {key}"), |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            // A retried txn whose first try landed fails its guard: the key
            // then holds exactly what we wrote.
            let landed = !r.succeeded()
                && inner.get_kv(&key).await?.is_some_and(|kv| {
                    kv.value() == value.as_bytes() && kv.lease() == granted.map_or(0, |g| g.0)
                });
            if r.succeeded() || landed {
                let expiration = granted.map(|(id, exp)| {
                    let rev = r.header().map_or(0, |h| h.revision());
                    inner.remember(id, exp, rev);
                    exp
                });
                return Ok(Some(Lease {
                    key: lease.key,
                    attrs: lease.attrs.clone(),
                    expiration,
                }));
            }
            // Something under subnets/ changed meanwhile: check again.
        }
        if let Some((id, _)) = granted {
            inner.revoke_quietly(id).await;
        }
        Ok(None)
    }

    /// Renews or rewrites this node's lease: keeps the key's etcd lease
    /// alive (`LeaseKeepAlive` once) and puts the value with it, guarded by
    /// the key's mod_revision; a new etcd lease only when the old one is gone.
    /// [`StoreError::NotFound`]: the key is gone (revoked or expired);
    /// [`StoreError::Conflict`]: another node's PublicIP holds it.
    async fn update_lease(&self, lease: &Lease, ttl: Option<Duration>) -> Result<Lease> {
        let inner = &self.inner;
        let key = inner.lease_key(&lease.key)?;
        let value = lease.attrs.to_json();
        for _ in 0..UPDATE_ATTEMPTS {
            let Some(kv) = inner.get_kv(&key).await? else {
                return Err(StoreError::NotFound {
                    key: lease.key.to_string(),
                });
            };
            let held = parse_attrs(kv.value()).map_err(|e| StoreError::InvalidLease {
                key: key.clone(),
                detail: format!("stored value cannot be updated: {e}"),
            })?;
            if !same_owner(&held, &lease.attrs) {
                return Err(StoreError::Conflict {
                    key: key.clone(),
                    detail: format!(
                        "held by PublicIP {} / PublicIPv6 {}, not by the updater ({} / {})",
                        show(held.public_ip),
                        show(held.public_ipv6),
                        show(lease.attrs.public_ip),
                        show(lease.attrs.public_ipv6)
                    ),
                });
            }
            let old_id = kv.lease();
            let mod_revision = kv.mod_revision();
            let (new_id, expiration) = match ttl {
                Some(ttl) => {
                    let (id, exp) = inner.renew_or_grant(old_id, ttl).await?;
                    (id, Some(exp))
                }
                None => (0, None),
            };
            let put_opts = (new_id != 0).then(|| PutOptions::new().with_lease(new_id));
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    mod_revision,
                )])
                .and_then([TxnOp::put(key.as_str(), value.as_str(), put_opts)]);
            let r = inner
                .call(&format!("txn update {key}"), |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            let landed = !r.succeeded()
                && inner
                    .get_kv(&key)
                    .await?
                    .is_some_and(|kv| kv.value() == value.as_bytes() && kv.lease() == new_id);
            if r.succeeded() || landed {
                if let Some(exp) = expiration {
                    inner.remember(new_id, exp, r.header().map_or(0, |h| h.revision()));
                }
                if old_id != 0 && old_id != new_id {
                    // No key uses it any more (each lease key has its own).
                    inner.revoke_quietly(old_id).await;
                }
                return Ok(Lease {
                    key: lease.key,
                    attrs: lease.attrs.clone(),
                    expiration,
                });
            }
            if new_id != 0 && new_id != old_id {
                inner.revoke_quietly(new_id).await;
            }
            tracing::debug!(key = %key, "lease changed while renewing it; reading it again");
        }
        Err(StoreError::Unavailable(format!(
            "lease {key} kept changing while we renewed it ({UPDATE_ATTEMPTS} attempts)"
        )))
    }

    /// `etcdctl del <prefix>/subnets/<key>`; absent is success.
    async fn delete_lease(&self, key: &LeaseKey) -> Result<()> {
        let key = self.inner.lease_key(key)?;
        self.inner
            .call(&format!("del {key}"), |mut c| {
                let key = key.clone();
                async move { c.delete(key, None).await }
            })
            .await?;
        Ok(())
    }

    /// Lists (the first [`WatchEvent::Snapshot`]), then watches
    /// `<prefix>/subnets/` from the next revision
    /// (`etcdctl watch --prefix --rev=<rev+1> --prev-kv`). After a
    /// compaction, a stream error or a reconnect it backs off, lists again,
    /// sends a fresh Snapshot and resumes from that list's revision.
    async fn watch_leases(&self) -> Result<mpsc::Receiver<WatchEvent>> {
        let snapshot = self.inner.list().await?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        let revision = snapshot.revision as i64;
        tx.send(WatchEvent::Snapshot(snapshot))
            .await
            .map_err(|_| StoreError::Unavailable("watch receiver dropped".into()))?;
        let inner = Arc::clone(&self.inner);
        let shutdown = self.shutdown_rx.clone();
        tokio::spawn(run_watch(inner, tx, shutdown, revision));
        Ok(rx)
    }
}

/// Why a watch stream ended.
enum StreamEnd {
    /// The receiver or the store is gone: stop.
    Stop,
    /// List again, send a Snapshot, watch again.
    Resync,
}

async fn run_watch(
    inner: Arc<Inner>,
    tx: mpsc::Sender<WatchEvent>,
    mut shutdown: watch::Receiver<()>,
    mut revision: i64,
) {
    let mut backoff = WATCH_MIN_BACKOFF;
    let mut need_snapshot = false;
    loop {
        if need_snapshot {
            match inner.list().await {
                Ok(s) => {
                    revision = s.revision as i64;
                    if tx.send(WatchEvent::Snapshot(s)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "etcd watch: listing leases failed");
                    if !pause(&tx, &mut shutdown, &mut backoff).await {
                        return;
                    }
                    continue;
                }
            }
        }
        need_snapshot = true;
        match watch_once(&inner, &tx, &mut shutdown, revision, &mut backoff).await {
            StreamEnd::Stop => return,
            StreamEnd::Resync => {
                if !pause(&tx, &mut shutdown, &mut backoff).await {
                    return;
                }
            }
        }
    }
}

/// Sleeps `backoff` (doubling it for next time); false when the receiver or
/// the store went away meanwhile.
async fn pause(
    tx: &mpsc::Sender<WatchEvent>,
    shutdown: &mut watch::Receiver<()>,
    backoff: &mut Duration,
) -> bool {
    let d = *backoff;
    *backoff = (*backoff * 2).clamp(WATCH_MIN_BACKOFF, WATCH_MAX_BACKOFF);
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = tx.closed() => false,
        _ = shutdown.changed() => false,
    }
}

/// One watch stream from `revision + 1` until it fails or is canceled.
async fn watch_once(
    inner: &Inner,
    tx: &mpsc::Sender<WatchEvent>,
    shutdown: &mut watch::Receiver<()>,
    revision: i64,
    backoff: &mut Duration,
) -> StreamEnd {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1)
        .with_prev_key();
    let start = inner.call_raw("watch", |_| {
        let (mut watcher, key, opts) = (inner.watcher.clone(), inner.subnets.clone(), opts.clone());
        async move { watcher.watch(key, Some(opts)).await }
    });
    let started = tokio::select! {
        r = start => r,
        _ = tx.closed() => return StreamEnd::Stop,
        _ = shutdown.changed() => return StreamEnd::Stop,
    };
    let mut stream = match started {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, retry_in = ?backoff, "etcd watch: cannot start the watch");
            return StreamEnd::Resync;
        }
    };
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = tx.closed() => return StreamEnd::Stop,
            _ = shutdown.changed() => return StreamEnd::Stop,
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => {
                tracing::warn!(retry_in = ?backoff, "etcd watch stream ended; listing again");
                return StreamEnd::Resync;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "etcd watch stream failed; listing again");
                return StreamEnd::Resync;
            }
        };
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                tracing::warn!(
                    compact_revision = resp.compact_revision(),
                    watched_from = revision + 1,
                    "etcd compacted the history the watch needed; listing again"
                );
                // Nothing is wrong with etcd: resync at once.
                *backoff = Duration::ZERO;
            } else {
                tracing::warn!(reason = resp.cancel_reason(), retry_in = ?backoff,
                    "etcd canceled the watch; listing again");
            }
            return StreamEnd::Resync;
        }
        *backoff = WATCH_MIN_BACKOFF;
        if resp.events().is_empty() {
            continue;
        }
        let header_revision = resp.header().map_or(0, |h| h.revision());
        let mut events = Vec::with_capacity(resp.events().len());
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                etcd_client::EventType::Put => match inner.parse_kv(kv) {
                    Some((key, attrs)) => {
                        let expiration = if kv.lease() == 0 {
                            None
                        } else {
                            match inner.expiration(kv.lease(), kv.mod_revision()).await {
                                Ok(Some(t)) => Some(t),
                                // Lease already gone: its DELETE event follows.
                                Ok(None) => continue,
                                Err(e) => {
                                    tracing::warn!(error = %e, "etcd watch: cannot read a lease's TTL; listing again");
                                    return StreamEnd::Resync;
                                }
                            }
                        };
                        events.push(LeaseEvent::Upsert(Lease {
                            key,
                            attrs,
                            expiration,
                        }));
                    }
                    // A key that held a lease now holds garbage: as in a
                    // list, it is no lease any more.
                    None => {
                        if let Some(key) = inner.parse_key(kv.key()) {
                            events.push(LeaseEvent::Removed(key));
                        }
                    }
                },
                etcd_client::EventType::Delete => {
                    if let Some(key) = inner.parse_key(kv.key()) {
                        events.push(LeaseEvent::Removed(key));
                    }
                }
            }
        }
        if events.is_empty() {
            continue;
        }
        let msg = WatchEvent::Events {
            events,
            revision: header_revision.max(0) as u64,
        };
        if tx.send(msg).await.is_err() {
            return StreamEnd::Stop;
        }
    }
}

/// A TTL in whole seconds, rounded up, at least 1.
fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    secs.clamp(1, i64::MAX as u64) as i64
}

/// A lease value: upstream's LeaseAttrs JSON object. (serde would also take
/// a JSON array for a struct; a lease value never is one.)
fn parse_attrs(value: &[u8]) -> Result<LeaseAttrs, String> {
    let text = std::str::from_utf8(value).map_err(|e| format!("not UTF-8: {e}"))?;
    LeaseAttrs::from_json(text).map_err(|e| e.to_string())
}

/// The end of the key range of a prefix (etcd's "prefix end": the prefix
/// with its last byte incremented, trailing 0xff bytes dropped).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    vec![0]
}

/// An etcd client error as an operator wants to read it: the status message
/// and the root cause ("tcp connect error: Connection refused (os error
/// 111)"). tonic's own text of a status carries its whole source chain in
/// Debug form (`tonic::transport::Error(Transport, ConnectError(...))`).
fn describe(e: &etcd_client::Error) -> String {
    use std::error::Error as _;
    let (head, mut cause) = match e {
        etcd_client::Error::GRpcStatus(s) => (s.message().to_string(), s.source()),
        other => (other.to_string(), other.source()),
    };
    let mut root = None;
    while let Some(c) = cause {
        root = Some(c);
        cause = c.source();
    }
    match root.map(|r| r.to_string()) {
        Some(r) if !head.contains(&r) => format!("{head}: {r}"),
        _ => head,
    }
}

/// etcd refused a read at a revision it has compacted.
fn is_compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("compacted"))
}

/// The request never reached a server: connecting to the endpoint failed.
fn is_not_reached(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            i32::from(s.code()) == GRPC_UNAVAILABLE && s.message().contains("connect error")
        }
        _ => false,
    }
}

/// Whether a failed request may succeed on another member or a bit later.
fn is_transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => i32::from(s.code()) == GRPC_UNAVAILABLE,
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// etcd refused who we are or what we may read: wrong password, unknown
/// user, missing permission. Retrying cannot help.
fn is_refusal(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            let m = s.message();
            m.contains("authentication failed")
                || m.contains("permission denied")
                || m.contains("user name not found")
        }
        _ => false,
    }
}

/// etcd answers "requested lease not found" for an expired or revoked lease.
fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(_) => true,
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        _ => false,
    }
}

/// Whether `new` may overwrite `held`: the same public address in at least
/// one family and a different one in none (a node that gained an IPv6
/// address still owns its lease). Same rule as the local store.
fn same_owner(held: &LeaseAttrs, new: &LeaseAttrs) -> bool {
    fn cmp<T: PartialEq>(a: Option<T>, b: Option<T>) -> Option<bool> {
        Some(a? == b?)
    }
    let v4 = cmp(held.public_ip, new.public_ip);
    let v6 = cmp(held.public_ipv6, new.public_ipv6);
    v4 != Some(false) && v6 != Some(false) && (v4 == Some(true) || v6 == Some(true))
}

fn show<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "null".into(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(
            prefix_end(b"/coreos.com/network/subnets/"),
            b"/coreos.com/network/subnets0"
        );
        assert_eq!(prefix_end(b"a\xff\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn ttl_rounds_up() {
        assert_eq!(ttl_secs(Duration::from_secs(86400)), 86400);
        assert_eq!(ttl_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ttl_secs(Duration::ZERO), 1);
    }

    #[test]
    fn missing_config_message_names_key_and_v3() {
        let m = missing_config_message("/coreos.com/network/");
        assert!(m.contains("/coreos.com/network/config"), "{m}");
        assert!(m.contains("v3"), "{m}");
        assert!(
            m.contains(r#"etcdctl put /coreos.com/network/config '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}'"#),
            "{m}"
        );
    }

    #[test]
    fn owner_rules() {
        let a = LeaseAttrs::new("vxlan", Some("10.0.0.1".parse().unwrap()), None);
        let b = LeaseAttrs::new("vxlan", Some("10.0.0.2".parse().unwrap()), None);
        let a6 = LeaseAttrs::new(
            "vxlan",
            Some("10.0.0.1".parse().unwrap()),
            Some("fd00::1".parse().unwrap()),
        );
        assert!(same_owner(&a, &a));
        assert!(!same_owner(&a, &b));
        assert!(same_owner(&a, &a6));
        assert!(!same_owner(&LeaseAttrs::new("vxlan", None, None), &a));
    }

    fn opts(endpoints: &[&str]) -> EtcdOptions {
        EtcdOptions {
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            ..EtcdOptions::default()
        }
    }

    #[tokio::test]
    async fn bad_options_name_the_flag() {
        let flag = |r: Result<EtcdStore, ConnectError>| match r {
            Err(ConnectError::Option { flag, .. }) => flag,
            other => panic!("expected an option error, got {other:?}"),
        };
        assert_eq!(flag(EtcdStore::connect(opts(&[])).await), "etcd-endpoints");
        assert_eq!(
            flag(EtcdStore::connect(opts(&["https://127.0.0.1:1"])).await),
            "etcd-cafile"
        );
        let mut o = opts(&["http://127.0.0.1:1"]);
        o.ca_file = Some("/nonexistent/ca.pem".into());
        assert_eq!(flag(EtcdStore::connect(o).await), "etcd-endpoints");
        let mut o = opts(&["https://127.0.0.1:1"]);
        o.ca_file = Some("/nonexistent/ca.pem".into());
        assert_eq!(flag(EtcdStore::connect(o).await), "etcd-cafile");
        let mut o = opts(&["http://127.0.0.1:1"]);
        o.prefix = "coreos.com/network".into();
        assert_eq!(flag(EtcdStore::connect(o).await), "etcd-prefix");
        let mut o = opts(&["http://127.0.0.1:1"]);
        o.password = Some("secret".into());
        assert_eq!(flag(EtcdStore::connect(o).await), "etcd-password");
    }

    #[tokio::test]
    async fn unreachable_is_unavailable_and_names_endpoints() {
        // Port 1 on loopback: nothing listens there.
        let mut o = opts(&["http://127.0.0.1:1"]);
        o.connect_timeout = Duration::from_millis(500);
        o.request_timeout = Duration::from_secs(2);
        let e = EtcdStore::connect(o).await.unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(
            matches!(e, ConnectError::Store(StoreError::Unavailable(_))),
            "{e}"
        );
        assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
        // The cause in words, not tonic's Debug chain.
        let text = e.to_string();
        assert!(text.to_lowercase().contains("refused"), "{text}");
        assert!(
            !text.contains("tonic::") && !text.contains("Os {"),
            "{text}"
        );
    }
}
