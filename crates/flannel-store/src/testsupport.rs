//! Throwaway etcd servers for tests (feature `test-support`): each one is a
//! real `etcd` process (Debian's etcd-server) on 127.0.0.1 with free ports
//! and a temporary data dir, killed by PID and removed when dropped, also
//! when the test panics.
//!
//! ```no_run
//! # async fn t() {
//! use flannel_store::testsupport::EtcdServer;
//! let etcd = EtcdServer::start();
//! let store = flannel_store::etcd::EtcdStore::connect(etcd.store_options()).await.unwrap();
//! # }
//! ```

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::etcd::EtcdOptions;

/// The etcd binary (override with `FLANNEL_TEST_ETCD`).
pub const ETCD_BINARY: &str = "etcd";

/// How long a server may take to report healthy.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A directory under the system temp dir, unique per process and call,
/// removed with its content when dropped.
#[derive(Debug)]
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new(name: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "flannel-etcd-test-{}-{}-{name}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        TestDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Server-side TLS of a test etcd: PEM files, clients must present a
/// certificate signed by `ca` (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Ports of one member: clients, peers, and plain-HTTP metrics (`/health`).
#[derive(Debug, Clone, Copy)]
struct Ports {
    client: u16,
    peer: u16,
    metrics: u16,
}

/// One member's fixed command line (kept for restarts).
#[derive(Debug, Clone)]
struct MemberSpec {
    name: String,
    ports: Ports,
    initial_cluster: String,
    tls: Option<ServerTls>,
    /// More etcd flags, e.g. `--auth-token-ttl=1`.
    extra_args: Vec<String>,
}

/// A running test etcd member (or a stopped one that can be restarted on
/// the same ports and data dir).
#[derive(Debug)]
pub struct EtcdServer {
    spec: MemberSpec,
    child: Option<Child>,
    dir: TestDir,
}

/// Picks `n` distinct free loopback ports (bind port 0, then release). They
/// stay unused until etcd binds them unless another process is very quick;
/// the listeners are held together so one call never returns a port twice.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

fn etcd_binary() -> String {
    std::env::var("FLANNEL_TEST_ETCD").unwrap_or_else(|_| ETCD_BINARY.to_string())
}

impl EtcdServer {
    /// A single-member etcd on plain HTTP, healthy when this returns.
    pub fn start() -> Self {
        Self::start_with_tls(None)
    }

    /// A single-member etcd, serving clients over TLS with client
    /// certificates when `tls` is set.
    pub fn start_with_tls(tls: Option<ServerTls>) -> Self {
        Self::start_with(tls, &[])
    }

    /// A single-member etcd with more command-line flags (`--auth-token-ttl=1`, ...).
    pub fn start_with(tls: Option<ServerTls>, extra_args: &[&str]) -> Self {
        let mut attempt = 1;
        loop {
            let p = free_ports(3);
            let ports = Ports {
                client: p[0],
                peer: p[1],
                metrics: p[2],
            };
            let name = "m0".to_string();
            let spec = MemberSpec {
                initial_cluster: format!("{name}=http://127.0.0.1:{}", ports.peer),
                name,
                ports,
                tls: tls.clone(),
                extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            };
            let mut s = Self::spawn(spec);
            match s.try_wait_healthy() {
                Ok(()) => return s,
                // Another process took a port between our probe and etcd's
                // bind: pick new ports.
                Err(e) if attempt < 3 && e.contains("address already in use") => attempt += 1,
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn spawn(spec: MemberSpec) -> Self {
        let dir = TestDir::new(&format!("etcd-{}", spec.name));
        let mut s = EtcdServer {
            spec,
            child: None,
            dir,
        };
        s.launch();
        s
    }

    /// Starts the process (first start or restart on the same data dir).
    fn launch(&mut self) {
        assert!(
            self.child.is_none(),
            "etcd {} already running",
            self.spec.name
        );
        let s = &self.spec;
        let scheme = if s.tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{}", s.ports.client);
        let peer_url = format!("http://127.0.0.1:{}", s.ports.peer);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("create etcd log file");
        let mut cmd = Command::new(etcd_binary());
        cmd.arg("--name")
            .arg(&s.name)
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(&s.initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(format!("flannel-test-{}", std::process::id()))
            .arg("--listen-metrics-urls")
            .arg(format!("http://127.0.0.1:{}", s.ports.metrics))
            // Fast elections keep cluster tests quick; the minimum lease TTL
            // (1.5 election timeouts) drops to about 1 s.
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log);
        cmd.args(&s.extra_args);
        if let Some(tls) = &s.tls {
            cmd.arg("--cert-file")
                .arg(&tls.cert_file)
                .arg("--key-file")
                .arg(&tls.key_file)
                .arg("--trusted-ca-file")
                .arg(&tls.ca_file)
                .arg("--client-cert-auth");
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run `{}`: {e}; the etcd tests need the etcd server (apt-get install etcd-server)",
                etcd_binary()
            )
        });
        self.child = Some(child);
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// The end of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Whether `/health` on the metrics port says true (a leader is known).
    pub fn is_healthy(&self) -> bool {
        let addr = format!("127.0.0.1:{}", self.spec.ports.metrics);
        let Ok(mut conn) = TcpStream::connect_timeout(
            &addr.parse().expect("loopback address"),
            Duration::from_millis(200),
        ) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let req = format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        if conn.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut body = String::new();
        let _ = conn.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    /// Waits until `/health` is true; panics with the log tail otherwise.
    pub fn wait_healthy(&mut self) {
        if let Err(e) = self.try_wait_healthy() {
            panic!("{e}");
        }
    }

    /// Waits until `/health` is true; the error carries the log tail.
    fn try_wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "etcd {} exited at start ({status}); log:\n{}",
                        self.spec.name,
                        self.log_tail()
                    ));
                }
            }
            if self.is_healthy() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err(format!(
            "etcd {} not healthy after {START_TIMEOUT:?}; log:\n{}",
            self.spec.name,
            self.log_tail()
        ))
    }

    /// The client URL (`http://127.0.0.1:<port>` or `https://...`).
    pub fn endpoint(&self) -> String {
        let scheme = if self.spec.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.spec.ports.client)
    }

    /// Store options for this server: its endpoint, the default prefix,
    /// short timeouts. Add TLS files or credentials as needed.
    pub fn store_options(&self) -> EtcdOptions {
        EtcdOptions {
            endpoints: vec![self.endpoint()],
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            ..EtcdOptions::default()
        }
    }

    /// The member's directory (data dir and log), removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the process (SIGTERM, SIGKILL after 5 s) and keeps the data
    /// dir and ports for [`EtcdServer::restart`].
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the process at once (SIGKILL), keeping the data dir.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the stopped server again on the same ports and data dir and
    /// waits until it is healthy.
    pub fn restart(&mut self) {
        self.launch();
        self.wait_healthy();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        // SIGKILL: a test etcd has nothing to save, and its dir goes next.
        self.kill();
    }
}

/// A multi-member etcd cluster on loopback (one process per member).
#[derive(Debug)]
pub struct EtcdCluster {
    pub members: Vec<EtcdServer>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until every one is healthy.
    pub fn start(n: usize) -> Self {
        let p = free_ports(3 * n);
        let ports: Vec<Ports> = (0..n)
            .map(|i| Ports {
                client: p[3 * i],
                peer: p[3 * i + 1],
                metrics: p[3 * i + 2],
            })
            .collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}=http://127.0.0.1:{}", p.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<EtcdServer> = ports
            .iter()
            .enumerate()
            .map(|(i, &ports)| {
                EtcdServer::spawn(MemberSpec {
                    name: format!("m{i}"),
                    ports,
                    initial_cluster: initial_cluster.clone(),
                    tls: None,
                    extra_args: Vec::new(),
                })
            })
            .collect();
        for m in &mut members {
            m.wait_healthy();
        }
        EtcdCluster { members }
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::endpoint).collect()
    }

    /// Store options listing every member.
    pub fn store_options(&self) -> EtcdOptions {
        EtcdOptions {
            endpoints: self.endpoints(),
            ..self.members[0].store_options()
        }
    }
}
