//! A Kubernetes API server double for flannel-rs tests.
//!
//! It serves, over HTTPS or plain HTTP, what flannel needs of
//! kube-apiserver and answers the way kube-apiserver v1.36 answers:
//! Nodes (create, get, list with pagination and selectors, watch with
//! history, bookmarks and 410, strategic-merge / merge / JSON patches of
//! the object and its `status` subresource, update, delete), Namespaces,
//! Pods, ClusterRoles and ClusterRoleBindings with RBAC, static bearer
//! tokens, discovery, `/healthz`, `/version`, and a Metadata-level audit
//! log. Objects live in memory or, with etcd, in etcd keys as
//! kube-apiserver lays them out, resourceVersions being etcd revisions.
//!
//! ```no_run
//! # async fn t() -> Result<(), kube_api_double::Error> {
//! use kube_api_double::{Double, Options, TokenUser, UserInfo};
//! let mut opts = Options::default();
//! opts.tokens.push(TokenUser::new("admin", UserInfo::new("admin", &["system:masters"])));
//! let double = Double::start(opts).await?;
//! println!("{}", double.url()); // http://127.0.0.1:<port>
//! # Ok(()) }
//! ```
//!
//! The binary `kube-api-double` takes kube-apiserver's command line (see
//! [`cli`]).

pub mod audit;
pub mod auth;
pub mod cli;
mod decode;
pub mod etcd;
pub mod rbac;
pub mod request;
pub mod resources;
pub mod selectors;
mod server;
pub mod smp;
pub mod status;
pub mod store;
mod util;
pub mod validation;
mod watch;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch as signal;
use tower::ServiceExt;

pub use auth::{TokenUser, UserInfo};
pub use etcd::EtcdOptions;
pub use rbac::AuthorizationMode;
pub use server::KUBE_VERSION;

/// Why the double could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad option or unreadable file; the message names the flag.
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("{0}")]
    Bootstrap(String),
}

/// The serving certificate (`--tls-cert-file` / `--tls-private-key-file`).
#[derive(Debug, Clone)]
pub enum Tls {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// PEM text (certificate chain, private key).
    Pem {
        cert: String,
        key: String,
    },
}

/// Everything the double can be told; mirrors the binary's flags.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--bind-address` (the library default is 127.0.0.1).
    pub bind_address: IpAddr,
    /// `--secure-port`; 0 picks a free port (the library default).
    pub port: u16,
    /// HTTPS when set, plain HTTP otherwise.
    pub tls: Option<Tls>,
    /// `--token-auth-file` entries.
    pub tokens: Vec<TokenUser>,
    /// `--authorization-mode`.
    pub authorization: AuthorizationMode,
    /// `--anonymous-auth`: requests without a token are `system:anonymous`
    /// (true), or 401 (false).
    pub anonymous_auth: bool,
    /// `--etcd-servers` and friends; in memory when `None`.
    pub etcd: Option<EtcdOptions>,
    /// `--audit-log-path`.
    pub audit_log_path: Option<PathBuf>,
    /// `--watch-history`: events kept per resource for resuming watches.
    pub watch_history: usize,
    /// `--bookmark-interval`.
    pub bookmark_interval: Duration,
    /// Events buffered per watcher before a slow watcher is closed.
    pub watcher_buffer: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bind_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            tls: None,
            tokens: Vec::new(),
            authorization: AuthorizationMode::AlwaysAllow,
            anonymous_auth: true,
            etcd: None,
            audit_log_path: None,
            watch_history: 1000,
            bookmark_interval: Duration::from_secs(5),
            watcher_buffer: 10_000,
        }
    }
}

/// Starts doubles.
pub struct Double;

/// A running double; stops when dropped.
pub struct Handle {
    addr: SocketAddr,
    https: bool,
    store: Arc<store::Store>,
    stop: signal::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn tls_acceptor(tls: &Tls) -> Result<tokio_rustls::TlsAcceptor, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (certs, key) = match tls {
        Tls::Files { cert, key } => {
            let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(cert)
                .map_err(|e| Error::Tls(format!("--tls-cert-file {}: {e}", cert.display())))?
                .collect();
            let certs = certs
                .map_err(|e| Error::Tls(format!("--tls-cert-file {}: {e}", cert.display())))?;
            let k = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                Error::Tls(format!("--tls-private-key-file {}: {e}", key.display()))
            })?;
            (certs, k)
        }
        Tls::Pem { cert, key } => {
            let certs: Result<Vec<_>, _> =
                CertificateDer::pem_slice_iter(cert.as_bytes()).collect();
            let certs = certs.map_err(|e| Error::Tls(format!("certificate: {e}")))?;
            let k = PrivateKeyDer::from_pem_slice(key.as_bytes())
                .map_err(|e| Error::Tls(format!("private key: {e}")))?;
            (certs, k)
        }
    };
    if certs.is_empty() {
        return Err(Error::Tls(
            "the certificate file holds no certificate".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Makes sure a fresh cluster's namespaces and RBAC roles exist.
async fn bootstrap(store: &store::Store) -> Result<(), Error> {
    use resources::Kind;
    let mut objects: Vec<(Kind, serde_json::Value)> = server::SYSTEM_NAMESPACES
        .iter()
        .map(|n| {
            (
                Kind::Namespace,
                serde_json::json!({"metadata": {"name": n}}),
            )
        })
        .collect();
    objects.extend(rbac::bootstrap_objects());
    for (kind, obj) in objects {
        let key = store::object_key(kind, &obj);
        if store.get(kind, &key).is_some() {
            continue;
        }
        match server::create_object(store, kind, obj).await {
            Ok(_) => {}
            Err(e) if e.code == 409 => {}
            Err(e) => {
                return Err(Error::Bootstrap(format!(
                    "cannot create {} {key}: {}",
                    kind.resource(),
                    e.message
                )))
            }
        }
    }
    Ok(())
}

/// The resourceVersion an in-memory store starts at: the time in
/// microseconds, so any resourceVersion of an earlier run is older.
fn start_rv() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

/// A started server, before it is wrapped in a [`Handle`].
struct Running {
    addr: SocketAddr,
    https: bool,
    store: Arc<store::Store>,
    stop: signal::Sender<bool>,
}

impl Running {
    fn into_handle(self, thread: Option<std::thread::JoinHandle<()>>) -> Handle {
        Handle {
            addr: self.addr,
            https: self.https,
            store: self.store,
            stop: self.stop,
            thread,
        }
    }
}

impl Double {
    /// Starts a double on the current tokio runtime and returns once it
    /// accepts connections. On a current-thread runtime it serves only
    /// while the caller awaits; a caller that blocks the thread uses
    /// [`Double::start_blocking`].
    pub async fn start(opts: Options) -> Result<Handle, Error> {
        Ok(launch(opts).await?.into_handle(None))
    }
}

async fn launch(opts: Options) -> Result<Running, Error> {
    let store_opts = store::StoreOptions {
        history: opts.watch_history,
        watcher_buffer: opts.watcher_buffer,
    };
    let store = Arc::new(match &opts.etcd {
        None => store::Store::in_memory(start_rv(), store_opts),
        Some(e) => {
            let backend = etcd::EtcdBackend::connect(e).await?;
            store::Store::on_etcd(backend, store_opts).await?
        }
    });
    bootstrap(&store).await?;
    let audit = match &opts.audit_log_path {
        Some(p) => Some(audit::AuditLog::open(p)?),
        None => None,
    };
    let acceptor = opts.tls.as_ref().map(tls_acceptor).transpose()?;
    let want = SocketAddr::new(opts.bind_address, opts.port);
    let listener = TcpListener::bind(want)
        .await
        .map_err(|source| Error::Listen { addr: want, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| Error::Listen { addr: want, source })?;
    let (stop, stopped) = signal::channel(false);
    let address = match addr.ip() {
        ip if ip.is_unspecified() => format!("127.0.0.1:{}", addr.port()),
        _ => addr.to_string(),
    };
    let app = Arc::new(server::App {
        store: store.clone(),
        authn: auth::Authenticator::new(&opts.tokens, opts.anonymous_auth),
        mode: opts.authorization,
        audit,
        bookmark_interval: opts.bookmark_interval,
        shutdown: stopped.clone(),
        address,
    });
    let router = axum::Router::new().fallback(server::handle).with_state(app);
    tokio::spawn(serve(listener, acceptor, router, stopped));
    Ok(Running {
        addr,
        https: opts.tls.is_some(),
        store,
        stop,
    })
}

impl Double {
    /// Starts a double on a runtime of its own (a background thread), for
    /// tests that are not async.
    pub fn start_blocking(opts: Options) -> Result<Handle, Error> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("kube-api-double".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(Error::Config(format!("cannot start a runtime: {e}"))));
                        return;
                    }
                };
                rt.block_on(async move {
                    match launch(opts).await {
                        Ok(running) => {
                            let mut stopped = running.stop.subscribe();
                            let _ = tx.send(Ok(running));
                            until_stopped(&mut stopped).await;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .map_err(|e| Error::Config(format!("cannot start a thread: {e}")))?;
        match rx.recv() {
            Ok(Ok(running)) => Ok(running.into_handle(Some(thread))),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(Error::Config("the double's thread ended early".into())),
        }
    }
}

impl Handle {
    /// `https://127.0.0.1:<port>` (or `http://...` without TLS).
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        let host = match self.addr.ip() {
            ip if ip.is_unspecified() => "127.0.0.1".to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        format!("{scheme}://{host}:{}", self.addr.port())
    }

    /// The address the double listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The latest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.store.current_rv()
    }

    /// Drops the watch history of every resource, ends every open watch and
    /// moves the resourceVersion on by one (as an etcd compaction plus a
    /// watch-cache restart look to clients): every watch or paged list that
    /// resumes from a resourceVersion handed out before gets 410 Expired; a
    /// client that lists again gets the new resourceVersion and watches
    /// from it.
    pub fn compact(&self) {
        self.store.compact();
    }

    /// Stops serving: closes the listener, every connection and every watch.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Resolves once the stop signal is set (or its sender is gone).
async fn until_stopped(rx: &mut signal::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn serve(
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    router: axum::Router,
    mut stopped: signal::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = until_stopped(&mut stopped) => return,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let acceptor = acceptor.clone();
        let mut conn_stopped = stopped.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(server::Peer(peer));
                    router.clone().oneshot(req.map(axum::body::Body::new))
                },
            );
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            match acceptor {
                Some(acceptor) => {
                    let tls = tokio::select! {
                        r = acceptor.accept(stream) => match r {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                        },
                        _ = until_stopped(&mut conn_stopped) => return,
                    };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
                    tokio::select! {
                        r = conn => if let Err(e) = r { tracing::debug!(%peer, error = %e, "connection ended") },
                        _ = until_stopped(&mut conn_stopped) => {}
                    }
                }
                None => {
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    tokio::select! {
                        r = conn => if let Err(e) = r { tracing::debug!(%peer, error = %e, "connection ended") },
                        _ = until_stopped(&mut conn_stopped) => {}
                    }
                }
            }
        });
    }
}
