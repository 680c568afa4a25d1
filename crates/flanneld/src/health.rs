//! The health endpoint (`--healthz-ip`, `--healthz-port`): an HTTP/1.1
//! server on the daemon's tokio runtime.
//!
//! - `GET /healthz`: 200 while the process runs (as upstream).
//! - `GET /readyz`: 503 until subnet.env has been written and the first
//!   pass of the masquerade/forward rules has applied without error (or no
//!   rules are wanted), then 200 (as upstream: ready once rules and
//!   subnet.env are in place). Readiness is latched: a later failing rules
//!   pass shows in `/metrics`, not here.
//! - `GET /metrics`: flannel-rs's own (upstream has none), Prometheus /
//!   OpenMetrics text. Everything is read at scrape time from counters the
//!   reconciler and rules threads already keep; the udp datapath's packet
//!   counters are read from its atomics, so scraping adds nothing to the
//!   packet path.
//!
//! The listener is bound before the daemon writes anything, so a port in use
//! or an address not on the node stops flanneld with nothing changed.
//!
//! Whoever can reach the port can open connections, so they are bounded:
//! at most [`MAX_CONNECTIONS`] are served at once (a new one closes the
//! oldest, so a flood of idle or slow connections neither exhausts the
//! daemon's file descriptors nor keeps a fresh probe waiting), a client has
//! [`HEADER_TIMEOUT`] to send a request's headers (also between requests of
//! a keep-alive connection), and no connection lives longer than
//! [`CONNECTION_LIFETIME`]. axum's `serve` has none of these, so the
//! connections are driven with hyper directly (axum's own HTTP stack).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use flannel_core::udp::Counters as UdpCounters;
use flannel_core::wire;
use flannel_core::wireguard::Counters as WgCounters;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};

use crate::backend::{udp, wireguard};
use crate::reconcile::PassReport;

/// Path of the metrics (flannel-rs only; upstream has no metrics endpoint).
pub const METRICS_PATH: &str = "/metrics";
/// Prefix of every metric name.
pub const METRIC_PREFIX: &str = "flanneld";
/// Content type of `/metrics` (what prometheus-client's text encoder writes).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const BODY_RUNNING: &str = "flanneld is running\n";
const BODY_READY: &str = "flanneld is ready\n";
const BODY_NOT_READY: &str = "flanneld is not ready yet\n";
const BODY_NOT_FOUND: &str = "404 page not found\n";

/// How long shutdown waits for requests in flight before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Connections served at once; a new one beyond it closes the oldest.
/// Probes and scrapes need a handful.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's headers, counted from
/// the connection's start or the previous response (hyper's header read
/// timeout): idle and slowloris connections are closed after it.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest any connection lives (a body sent slowly, a response not
/// read); a keep-alive client reconnects.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// The request buffer of one connection (hyper's minimum is 8 KiB).
const MAX_BUF: usize = 16 * 1024;
/// At most one warning about a flood of connections per this interval.
const FLOOD_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// Why the health endpoint could not start. Each message names the flag.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("--healthz-port {port}: {addr} is already in use by another process; stop it or choose another --healthz-port")]
    PortInUse {
        addr: SocketAddr,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("--healthz-ip {ip}: not an address of this node; use one of its addresses, 127.0.0.1 or 0.0.0.0 (all)")]
    AddressNotOnNode {
        ip: IpAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("binding the health endpoint to {addr} (--healthz-ip/--healthz-port): {source}; fix those flags")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Where the userspace datapaths' counters are read, as the last pass
/// left them (a restarted datapath comes with new readers).
#[derive(Debug, Clone, Default)]
pub struct CounterSources {
    /// The udp backend's datapath, when it runs.
    pub udp: Option<udp::CountersReader>,
    /// The wireguard backend's userspace datapaths, one per device
    /// (`flannel-wg`, `flannel-wg-v6`).
    pub wireguard: Vec<(String, wireguard::CountersReader)>,
    /// Its kernel devices: packets and bytes from the link's counters
    /// (`ip -s link show`) as of the last full pass; the kernel counts no
    /// handshakes or drop reasons there (`wg show` has per-peer bytes).
    pub wireguard_kernel: Vec<(String, WgCounters)>,
}

/// The reconciler's part of the metrics: cheap clones sharing the same
/// atomics, updated by the reconciler thread once per pass.
#[derive(Debug, Clone, Default)]
pub struct DatapathMetrics {
    passes: Counter,
    changes: Counter,
    errors: Counter,
    peers: Gauge,
    sources: Arc<Mutex<CounterSources>>,
}

impl DatapathMetrics {
    /// Records a finished reconciliation pass and where the userspace
    /// datapaths' packet counters are read now.
    pub fn record_pass(&self, report: &PassReport, sources: CounterSources) {
        self.passes.inc();
        self.changes.inc_by(report.changes as u64);
        self.errors.inc_by(report.errors.len() as u64);
        self.peers.set(report.peers as i64);
        *self.sources.lock().unwrap_or_else(PoisonError::into_inner) = sources;
    }
}

/// The rules thread's part: passes, rewrites, failures, and whether a pass
/// has applied the rules yet (readiness).
#[derive(Debug, Clone, Default)]
pub struct RulesMetrics {
    passes: Counter,
    rewrites: Counter,
    failures: Counter,
    applied: Arc<AtomicBool>,
}

impl RulesMetrics {
    /// Records a pass over the families in use that rewrote `rewrites`
    /// chains or tables and failed `failures` times. The first pass without
    /// failure makes the rules count as applied.
    pub fn record_pass(&self, rewrites: usize, failures: usize) {
        self.passes.inc();
        self.rewrites.inc_by(rewrites as u64);
        self.failures.inc_by(failures as u64);
        if failures == 0 {
            self.applied.store(true, Ordering::Release);
        }
    }

    /// Whether a rules pass has succeeded (or nothing was wanted).
    pub fn applied(&self) -> bool {
        self.applied.load(Ordering::Acquire)
    }
}

/// The daemon's health state; cloned into the reconciler, the rules
/// thread and the server, all sharing the same atomics.
#[derive(Debug, Clone, Default)]
pub struct Health {
    subnet_env: Arc<AtomicBool>,
    pub datapath: DatapathMetrics,
    pub rules: RulesMetrics,
}

impl Health {
    /// subnet.env is in place.
    pub fn set_subnet_env_written(&self) {
        self.subnet_env.store(true, Ordering::Release);
    }

    /// Ready: subnet.env written and the rules applied.
    pub fn is_ready(&self) -> bool {
        self.subnet_env.load(Ordering::Acquire) && self.rules.applied()
    }

    /// The registry `/metrics` encodes: the shared counters, and the udp
    /// counters through a collector that reads them at scrape time.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix(METRIC_PREFIX);
        let d = &self.datapath;
        r.register(
            "reconcile_passes",
            "Reconciliation passes of the datapath",
            d.passes.clone(),
        );
        r.register(
            "reconcile_changes",
            "Kernel writes made by reconciliation passes",
            d.changes.clone(),
        );
        r.register(
            "reconcile_errors",
            "Failed steps of reconciliation passes (kernel writes, reads, unreachable peers); the next pass retries",
            d.errors.clone(),
        );
        r.register(
            "peers",
            "Peers programmed by the last reconciliation pass (per address family)",
            d.peers.clone(),
        );
        let rl = &self.rules;
        r.register(
            "rules_passes",
            "Passes over the masquerade/forward rules",
            rl.passes.clone(),
        );
        r.register(
            "rules_rewrites",
            "Chains or tables of masquerade/forward rules rewritten because they differed",
            rl.rewrites.clone(),
        );
        r.register(
            "rules_failures",
            "Failed reads or writes of masquerade/forward rules",
            rl.failures.clone(),
        );
        r.register_collector(Box::new(DatapathCollector(d.sources.clone())));
        r
    }
}

/// The userspace datapaths' counters, read from their atomics at scrape
/// time.
#[derive(Debug)]
struct DatapathCollector(Arc<Mutex<CounterSources>>);

/// One counter family: a row per label set.
fn encode_counters<const L: usize>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[([(&str, &str); L], u64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, n) in rows {
        ConstCounter::new(*n).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

/// `flanneld_udp_*`: one row per direction or reason.
fn encode_udp(e: &mut DescriptorEncoder<'_>, c: &UdpCounters) -> Result<(), std::fmt::Error> {
    let dir = |d| [("direction", d)];
    let reason = |r| [("reason", r)];
    encode_counters(
        e,
        "udp_packets",
        "Packets carried by the udp backend (tx: flannel0 to a peer, rx: a peer to flannel0)",
        &[(dir("tx"), c.tx_packets), (dir("rx"), c.rx_packets)],
    )?;
    encode_counters(
        e,
        "udp_bytes",
        "Bytes of inner packets carried by the udp backend",
        &[(dir("tx"), c.tx_bytes), (dir("rx"), c.rx_bytes)],
    )?;
    encode_counters(
        e,
        "udp_dropped",
        "Packets dropped by the udp backend, by reason",
        &[
            (reason("spoofed"), c.dropped_spoofed),
            (reason("malformed"), c.dropped_malformed),
            (reason("no_route"), c.dropped_no_route),
            (reason("tun_invalid"), c.dropped_tun_invalid),
            (reason("send_error"), c.send_errors),
            (reason("tun_write_error"), c.tun_write_errors),
        ],
    )
}

/// One row per device and value of `label`: `f` gives a device's values.
fn per_device<'a, const N: usize>(
    devices: &[(&'a str, WgCounters)],
    label: &'a str,
    f: impl Fn(&WgCounters) -> [(&'a str, u64); N],
) -> Vec<([(&'a str, &'a str); 2], u64)> {
    devices
        .iter()
        .flat_map(|(dev, c)| f(c).map(|(v, n)| ([("device", *dev), (label, v)], n)))
        .collect()
}

/// `flanneld_wireguard_*`: one row per device and direction or reason.
fn encode_wireguard(
    e: &mut DescriptorEncoder<'_>,
    devices: &[(&str, WgCounters)],
    kernel: &[(&str, WgCounters)],
) -> Result<(), std::fmt::Error> {
    let all: Vec<(&str, WgCounters)> = devices.iter().chain(kernel).copied().collect();
    encode_counters(
        e,
        "wireguard_packets",
        "Packets carried by the wireguard backend (tx: device to a peer, encrypted; rx: from a peer, decrypted, to the device; kernel devices: as of the last full pass)",
        &per_device(&all, "direction", |c| {
            [("tx", c.tx_packets), ("rx", c.rx_packets)]
        }),
    )?;
    encode_counters(
        e,
        "wireguard_bytes",
        "Bytes of inner packets carried by the wireguard backend",
        &per_device(&all, "direction", |c| {
            [("tx", c.tx_bytes), ("rx", c.rx_bytes)]
        }),
    )?;
    encode_counters(
        e,
        "wireguard_handshakes",
        "WireGuard handshake messages of the userspace datapath (sent: initiations and responses; received: initiations, responses and cookie replies)",
        &per_device(devices, "direction", |c| {
            [("sent", c.handshakes_sent), ("received", c.handshakes_received)]
        }),
    )?;
    encode_counters(
        e,
        "wireguard_dropped",
        "Packets dropped by the wireguard backend's userspace datapath, by reason (invalid: no valid WireGuard message for us; not_allowed: decrypted, but its source is outside the peer's allowed IPs)",
        &per_device(devices, "reason", |c| {
            [
                ("no_peer", c.dropped_no_peer),
                ("tun_invalid", c.dropped_tun_invalid),
                ("invalid", c.dropped_invalid),
                ("not_allowed", c.dropped_not_allowed),
                ("send_error", c.send_errors),
                ("tun_write_error", c.tun_write_errors),
            ]
        }),
    )
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = &s.udp {
            encode_udp(&mut encoder, &UdpCounters::from_array(r.read()))?;
        }
        if !s.wireguard.is_empty() || !s.wireguard_kernel.is_empty() {
            let devices: Vec<(&str, WgCounters)> = s
                .wireguard
                .iter()
                .map(|(d, r)| (d.as_str(), WgCounters::from_array(r.read())))
                .collect();
            let kernel: Vec<(&str, WgCounters)> = s
                .wireguard_kernel
                .iter()
                .map(|(d, c)| (d.as_str(), *c))
                .collect();
            encode_wireguard(&mut encoder, &devices, &kernel)?;
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AppState {
    health: Health,
    registry: Arc<Registry>,
}

async fn healthz() -> &'static str {
    BODY_RUNNING
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, &'static str) {
    if s.health.is_ready() {
        (StatusCode::OK, BODY_READY)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, BODY_NOT_READY)
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &s.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], out).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "encoding the metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding the metrics failed\n",
            )
                .into_response()
        }
    }
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, BODY_NOT_FOUND)
}

/// The routes, for the server and the tests.
fn router(health: Health) -> Router {
    let state = AppState {
        registry: Arc::new(health.registry()),
        health,
    };
    Router::new()
        .route(wire::HEALTHZ_PATH, get(healthz))
        .route(wire::READYZ_PATH, get(readyz))
        .route(METRICS_PATH, get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// The running endpoint. [`HealthServer::shutdown`] stops it; dropping it
/// aborts the server task.
pub struct HealthServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl HealthServer {
    /// Binds `ip:port` (port 0: any free port, for tests) and serves on the
    /// current tokio runtime. Like `ss -ltn sport = :PORT` coming up.
    pub async fn start(ip: IpAddr, port: u16, health: Health) -> Result<HealthServer, HealthError> {
        let addr = SocketAddr::new(ip, port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::AddrInUse => HealthError::PortInUse { addr, port, source },
                std::io::ErrorKind::AddrNotAvailable => {
                    HealthError::AddressNotOnNode { ip, source }
                }
                _ => HealthError::Bind { addr, source },
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| HealthError::Bind { addr, source })?;
        let (stop, stopped) = oneshot::channel::<()>();
        let app = router(health);
        let task = tokio::spawn(serve(listener, app, stopped));
        tracing::info!(%addr, "health endpoint listening (/healthz, /readyz, /metrics)");
        Ok(HealthServer {
            addr,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets requests in flight finish (at most
    /// [`SHUTDOWN_GRACE`]; an idle keep-alive connection does not hold it
    /// up), and returns once the listener is closed.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                task.abort();
                let _ = task.await;
            }
        }
    }
}

/// The connections being served, by age (accept order).
type Live = Arc<Mutex<BTreeMap<u64, AbortHandle>>>;

fn lock(live: &Live) -> std::sync::MutexGuard<'_, BTreeMap<u64, AbortHandle>> {
    live.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Removes a connection from [`Live`] when its task ends or is aborted.
struct Registered {
    id: u64,
    live: Live,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.live).remove(&self.id);
    }
}

/// Closes the oldest connection; returns whether there was one.
fn close_oldest(live: &Live) -> bool {
    match lock(live).pop_first() {
        Some((_, h)) => {
            h.abort();
            true
        }
        None => false,
    }
}

/// Logs `what` at warn level at most once per [`FLOOD_WARN_INTERVAL`],
/// else at debug level.
fn warn_flood(last: &mut Option<Instant>, what: std::fmt::Arguments<'_>) {
    if last.is_none_or(|t| t.elapsed() >= FLOOD_WARN_INTERVAL) {
        *last = Some(Instant::now());
        tracing::warn!("health endpoint: {what}");
    } else {
        tracing::debug!("health endpoint: {what}");
    }
}

/// The accept loop: each connection on a task of its own, at most
/// [`MAX_CONNECTIONS`] of them (module documentation). On `stopped` the
/// listener closes and every connection finishes its request in flight.
async fn serve(listener: TcpListener, app: Router, mut stopped: oneshot::Receiver<()>) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let live: Live = Arc::default();
    let mut tasks = JoinSet::new();
    let mut next_id = 0u64;
    let mut warned = None;
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if lock(&live).len() >= MAX_CONNECTIONS {
                        close_oldest(&live);
                        warn_flood(&mut warned, format_args!(
                            "{MAX_CONNECTIONS} connections open (the latest from {peer}); closing the oldest for each new one"));
                    }
                    let id = next_id;
                    next_id += 1;
                    let reg = Registered { id, live: Arc::clone(&live) };
                    // Inserted under the lock the task's `Registered` takes
                    // to remove itself, so a task that ends at once is not
                    // left behind in the map.
                    let mut map = lock(&live);
                    let handle = tasks.spawn(serve_connection(stream, app.clone(), stop_rx.clone(), reg));
                    map.insert(id, handle);
                }
                Err(e) => {
                    // Out of file descriptors: closing the oldest connection
                    // frees one for the next accept. Anything else is about
                    // the one connection (ECONNABORTED) or passes.
                    let fds = matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE));
                    if fds {
                        close_oldest(&live);
                    }
                    warn_flood(&mut warned, format_args!("accepting a connection failed: {e}{}",
                        if fds { " (out of file descriptors; closed the oldest connection)" } else { "" }));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
}

/// One HTTP/1.1 connection with the header timeout, the buffer bound and
/// the lifetime bound; on shutdown the request in flight finishes.
async fn serve_connection(
    stream: TcpStream,
    app: Router,
    mut stop: watch::Receiver<bool>,
    _reg: Registered,
) {
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_BUF)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    let mut conn = std::pin::pin!(conn);
    let run = async {
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = stop.wait_for(|s| *s) => {}
        }
        conn.as_mut().graceful_shutdown();
        conn.as_mut().await
    };
    match tokio::time::timeout(CONNECTION_LIFETIME, run).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "health endpoint connection ended"),
        Err(_) => {
            tracing::debug!("health endpoint connection closed after {CONNECTION_LIFETIME:?}")
        }
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fastpath::SharedCounters;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, TcpStream};

    /// A plain HTTP/1.1 GET: (status code, body).
    fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let (head, body) = resp.split_once("\r\n\r\n").expect("header end");
        let status = head
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("HTTP/1.1 "))
            .and_then(|l| l.split(' ').next())
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad status line in {head:?}"));
        (status, body.to_string())
    }

    /// Runs `f` (blocking HTTP calls) on a thread of its own while the
    /// server runs on the test's runtime.
    async fn client<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
        tokio::task::spawn_blocking(f).await.unwrap()
    }

    fn value(metrics: &str, name: &str) -> Option<String> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map(str::to_string)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn healthz_readyz_metrics_and_404() {
        let health = Health::default();
        let srv = HealthServer::start(Ipv4Addr::LOCALHOST.into(), 0, health.clone())
            .await
            .unwrap();
        let addr = srv.local_addr();
        assert_ne!(addr.port(), 0);

        let (code, body) = client(move || get(addr, "/healthz")).await;
        assert_eq!((code, body.as_str()), (200, BODY_RUNNING));

        // Not ready: neither subnet.env nor rules; then only subnet.env;
        // then a failing rules pass; then a good one.
        let ready = move || get(addr, "/readyz");
        assert_eq!(client(ready).await, (503, BODY_NOT_READY.to_string()));
        health.set_subnet_env_written();
        assert_eq!(client(ready).await.0, 503, "rules not applied yet");
        health.rules.record_pass(0, 1);
        assert_eq!(client(ready).await.0, 503, "the rules pass failed");
        health.rules.record_pass(2, 0);
        assert_eq!(client(ready).await, (200, BODY_READY.to_string()));
        // Latched: a later failure does not make the node unready.
        health.rules.record_pass(0, 1);
        assert_eq!(client(ready).await.0, 200);

        health.datapath.record_pass(
            &PassReport {
                peers: 3,
                changes: 7,
                errors: vec!["x".into(), "y".into()],
                ..PassReport::default()
            },
            CounterSources::default(),
        );
        health.datapath.record_pass(
            &PassReport {
                peers: 2,
                ..PassReport::default()
            },
            CounterSources::default(),
        );
        let (code, m) = client(move || get(addr, METRICS_PATH)).await;
        assert_eq!(code, 200, "{m}");
        for (name, want) in [
            ("flanneld_reconcile_passes_total", "2"),
            ("flanneld_reconcile_changes_total", "7"),
            ("flanneld_reconcile_errors_total", "2"),
            ("flanneld_peers", "2"),
            ("flanneld_rules_passes_total", "3"),
            ("flanneld_rules_rewrites_total", "2"),
            ("flanneld_rules_failures_total", "2"),
        ] {
            assert_eq!(value(&m, name).as_deref(), Some(want), "{name} in\n{m}");
        }
        assert!(m.contains("# TYPE flanneld_peers gauge"), "{m}");
        assert!(
            !m.contains("flanneld_udp_"),
            "no udp metrics without the udp backend:\n{m}"
        );

        for path in ["/", "/healthzz", "/metrics/x", "/readyz/"] {
            let (code, body) = client(move || get(addr, path)).await;
            assert_eq!((code, body.as_str()), (404, BODY_NOT_FOUND), "{path}");
        }

        // Shutdown closes the listener, even with an idle keep-alive
        // connection open.
        let idle = TcpStream::connect(addr).unwrap();
        tokio::time::timeout(Duration::from_secs(5), srv.shutdown())
            .await
            .expect("shutdown does not hang");
        drop(idle);
        assert!(TcpStream::connect(addr).is_err(), "still listening");
    }

    /// Whether the server has closed `s` (EOF or reset) within `within`.
    fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
        s.set_read_timeout(Some(within)).unwrap();
        let mut b = [0u8; 64];
        loop {
            match s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// Issue 14 item 7 / issue 12: many idle connections and slowloris
    /// ones neither pile up nor keep a fresh probe waiting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_and_slow_connections_are_bounded_and_timed_out() {
        let srv = HealthServer::start(Ipv4Addr::LOCALHOST.into(), 0, Health::default())
            .await
            .unwrap();
        let addr = srv.local_addr();
        let flood = MAX_CONNECTIONS + 40;
        let (answer, closed) = client(move || {
            let mut idle: Vec<TcpStream> = (0..flood)
                .map(|_| TcpStream::connect(addr).unwrap())
                .collect();
            // A fresh probe is served at once, flood or not.
            let started = Instant::now();
            let answer = get(addr, "/healthz");
            let took = started.elapsed();
            assert!(took < HEADER_TIMEOUT, "the probe waited {took:?}");
            // The oldest connections were closed to stay within the bound.
            let closed = idle
                .iter_mut()
                .map(|s| closed_by_server(s, Duration::from_millis(50)))
                .filter(|c| *c)
                .count();
            (answer, closed)
        })
        .await;
        assert_eq!(answer, (200, BODY_RUNNING.to_string()));
        assert!(
            closed > flood - MAX_CONNECTIONS,
            "{closed} of {flood} idle connections closed; at most {MAX_CONNECTIONS} may stay"
        );
        // Slowloris: headers trickled a byte at a time never complete; the
        // connection is closed by the header timeout.
        let slow_closed = client(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            let started = Instant::now();
            while started.elapsed() < HEADER_TIMEOUT * 3 {
                if s.write_all(b"X").is_err()
                    || closed_by_server(&mut s, Duration::from_millis(500))
                {
                    return Some(started.elapsed());
                }
            }
            None
        })
        .await;
        let took = slow_closed.expect("a slowloris connection is closed by the header timeout");
        assert!(
            took >= HEADER_TIMEOUT - Duration::from_secs(1),
            "closed after {took:?}"
        );
        // An idle connection that sent nothing is closed by the same timeout.
        let idle_closed = client(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            closed_by_server(&mut s, HEADER_TIMEOUT * 3)
        })
        .await;
        assert!(
            idle_closed,
            "an idle connection outlived the header timeout"
        );
        assert_eq!(client(move || get(addr, "/healthz")).await.0, 200);
        srv.shutdown().await;
    }

    /// A health server whose last pass left `sources`, and its address.
    async fn serve_sources(sources: CounterSources) -> (HealthServer, SocketAddr) {
        let health = Health::default();
        health.datapath.record_pass(&PassReport::default(), sources);
        let srv = HealthServer::start(Ipv4Addr::LOCALHOST.into(), 0, health)
            .await
            .unwrap();
        let addr = srv.local_addr();
        (srv, addr)
    }

    /// One scrape of `/metrics`, which must answer 200.
    async fn scrape(addr: SocketAddr) -> String {
        let (code, m) = client(move || get(addr, METRICS_PATH)).await;
        assert_eq!(code, 200, "{m}");
        m
    }

    /// The sample `name` of `m` is `want`.
    fn assert_sample(m: &str, name: &str, want: &str) {
        assert_eq!(value(m, name).as_deref(), Some(want), "{name} in\n{m}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn udp_counters_are_read_at_scrape_time() {
        // Counts of an earlier generation of threads, and the running one's.
        let base = UdpCounters {
            tx_packets: 10,
            tx_bytes: 1000,
            rx_packets: 12,
            rx_bytes: 1200,
            dropped_spoofed: 1,
            dropped_malformed: 2,
            dropped_no_route: 3,
            dropped_tun_invalid: 4,
            send_errors: 5,
            tun_write_errors: 6,
        };
        let running = Arc::new(SharedCounters::default());
        running.add(
            UdpCounters {
                tx_packets: 1,
                tx_bytes: 100,
                ..UdpCounters::default()
            }
            .to_array(),
        );
        let sources = CounterSources {
            udp: Some(udp::CountersReader::new(base.to_array(), running.clone())),
            ..CounterSources::default()
        };
        let (srv, addr) = serve_sources(sources).await;
        let m = scrape(addr).await;
        for (name, want) in [
            (r#"flanneld_udp_packets_total{direction="tx"}"#, "11"),
            (r#"flanneld_udp_packets_total{direction="rx"}"#, "12"),
            (r#"flanneld_udp_bytes_total{direction="tx"}"#, "1100"),
            (r#"flanneld_udp_bytes_total{direction="rx"}"#, "1200"),
            (r#"flanneld_udp_dropped_total{reason="spoofed"}"#, "1"),
            (r#"flanneld_udp_dropped_total{reason="malformed"}"#, "2"),
            (r#"flanneld_udp_dropped_total{reason="no_route"}"#, "3"),
            (r#"flanneld_udp_dropped_total{reason="tun_invalid"}"#, "4"),
            (r#"flanneld_udp_dropped_total{reason="send_error"}"#, "5"),
            (
                r#"flanneld_udp_dropped_total{reason="tun_write_error"}"#,
                "6",
            ),
        ] {
            assert_sample(&m, name, want);
        }
        assert!(!m.contains("flanneld_wireguard_"), "{m}");
        // The datapath counts on: the next scrape sees it without a pass.
        running.add(
            UdpCounters {
                tx_packets: 1,
                ..UdpCounters::default()
            }
            .to_array(),
        );
        let m = scrape(addr).await;
        assert_sample(&m, r#"flanneld_udp_packets_total{direction="tx"}"#, "12");
        srv.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wireguard_counters_are_read_per_device_at_scrape_time() {
        let v4 = WgCounters {
            tx_packets: 11,
            tx_bytes: 1100,
            rx_packets: 12,
            rx_bytes: 1200,
            dropped_no_peer: 1,
            dropped_tun_invalid: 2,
            dropped_invalid: 3,
            dropped_not_allowed: 4,
            handshakes_received: 5,
            handshakes_sent: 6,
            send_errors: 7,
            tun_write_errors: 8,
        };
        let v6 = WgCounters {
            tx_packets: 21,
            rx_packets: 22,
            dropped_invalid: 23,
            ..WgCounters::default()
        };
        let running = Arc::new(SharedCounters::default());
        let sources = CounterSources {
            udp: None,
            wireguard: vec![
                (
                    "flannel-wg".into(),
                    wireguard::CountersReader::new(v4.to_array(), running.clone()),
                ),
                (
                    "flannel-wg-v6".into(),
                    wireguard::CountersReader::new(v6.to_array(), Arc::default()),
                ),
            ],
            wireguard_kernel: Vec::new(),
        };
        let (srv, addr) = serve_sources(sources).await;
        let m = scrape(addr).await;
        let wg = |what: &str, dev: &str, label: &str| {
            format!(r#"flanneld_wireguard_{what}_total{{device="{dev}",{label}}}"#)
        };
        for (name, want) in [
            (wg("packets", "flannel-wg", r#"direction="tx""#), "11"),
            (wg("packets", "flannel-wg", r#"direction="rx""#), "12"),
            (wg("bytes", "flannel-wg", r#"direction="tx""#), "1100"),
            (wg("bytes", "flannel-wg", r#"direction="rx""#), "1200"),
            (wg("dropped", "flannel-wg", r#"reason="no_peer""#), "1"),
            (wg("dropped", "flannel-wg", r#"reason="tun_invalid""#), "2"),
            (wg("dropped", "flannel-wg", r#"reason="invalid""#), "3"),
            (wg("dropped", "flannel-wg", r#"reason="not_allowed""#), "4"),
            (
                wg("handshakes", "flannel-wg", r#"direction="received""#),
                "5",
            ),
            (wg("handshakes", "flannel-wg", r#"direction="sent""#), "6"),
            (wg("dropped", "flannel-wg", r#"reason="send_error""#), "7"),
            (
                wg("dropped", "flannel-wg", r#"reason="tun_write_error""#),
                "8",
            ),
            (wg("packets", "flannel-wg-v6", r#"direction="tx""#), "21"),
            (wg("packets", "flannel-wg-v6", r#"direction="rx""#), "22"),
            (wg("dropped", "flannel-wg-v6", r#"reason="invalid""#), "23"),
            (wg("dropped", "flannel-wg-v6", r#"reason="no_peer""#), "0"),
        ] {
            assert_sample(&m, &name, want);
        }
        assert!(!m.contains("flanneld_udp_"), "{m}");
        running.add(
            WgCounters {
                rx_packets: 3,
                ..WgCounters::default()
            }
            .to_array(),
        );
        let m = scrape(addr).await;
        assert_sample(&m, &wg("packets", "flannel-wg", r#"direction="rx""#), "15");
        srv.shutdown().await;

        // A kernel device: packets and bytes only.
        let sources = CounterSources {
            wireguard_kernel: vec![("flannel-wg".into(), v6)],
            ..CounterSources::default()
        };
        let (srv, addr) = serve_sources(sources).await;
        let m = scrape(addr).await;
        assert_sample(&m, &wg("packets", "flannel-wg", r#"direction="tx""#), "21");
        assert_sample(&m, &wg("bytes", "flannel-wg", r#"direction="rx""#), "0");
        assert!(!m.contains("flanneld_wireguard_dropped_total{"), "{m}");
        assert!(!m.contains("flanneld_wireguard_handshakes_total{"), "{m}");
        srv.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bind_errors_name_the_flag() {
        let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let e = HealthServer::start(Ipv4Addr::LOCALHOST.into(), port, Health::default())
            .await
            .err()
            .expect("port in use");
        assert!(matches!(e, HealthError::PortInUse { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("--healthz-port") && msg.contains(&port.to_string()),
            "{msg}"
        );
        // TEST-NET-1 is on no interface of any machine.
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let e = HealthServer::start(ip, 0, Health::default())
            .await
            .err()
            .expect("address not on the node");
        assert!(matches!(e, HealthError::AddressNotOnNode { .. }), "{e:?}");
        assert!(e.to_string().contains("--healthz-ip 192.0.2.1"), "{e}");
    }
}
