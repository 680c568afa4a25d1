//! The lab's etcd (`lab up --store etcd`): one real etcd server inside the
//! master's namespace, listening on the master's underlay address (where
//! every node's flanneld reaches it) and on 127.0.0.1 of that namespace,
//! with its data directory, log and pid file in `<labdir>/etcd/`.
//!
//! The root namespace cannot reach 172.16.1.8, so every client request of
//! flannelctl runs on a thread that entered the master's namespace
//! ([`NetNs::run`]) with a current-thread tokio runtime.

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flannel_netlink::netns::NetNs;
use flannel_netlink::Netlink;
use flannel_store::etcd::{EtcdOptions, EtcdStore};

use super::{io_err, nl_err, ns_err, procs, write_atomic, LabError, Result};

/// The etcd server binary (Debian package `etcd-server`).
pub const ETCD_BINARY: &str = "etcd";
/// Overrides where the etcd binary is (default: found in `PATH`).
pub const ETCD_BINARY_ENV: &str = "FLANNEL_LAB_ETCD";
/// etcd's client port (the IANA one, as in a real cluster).
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// etcd's peer port.
pub const ETCD_PEER_PORT: u16 = 2380;
/// `<labdir>/etcd`: data directory, log and pid file.
pub(crate) const ETCD_DIR: &str = "etcd";
pub(crate) const ETCD_PID_FILE: &str = "etcd.pid";
pub(crate) const ETCD_LOG_FILE: &str = "etcd.log";

/// The client URL every daemon of the lab is given: `http://172.16.1.8:2379`.
pub fn client_url(ip: Ipv4Addr) -> String {
    format!("http://{ip}:{ETCD_CLIENT_PORT}")
}

/// The etcd binary: `$FLANNEL_LAB_ETCD`, else `etcd` in `PATH`.
pub fn etcd_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(ETCD_BINARY_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(LabError::EtcdMissing {
                path: p.display().to_string(),
            })
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(ETCD_BINARY))
        .find(|p| p.is_file())
        .ok_or_else(|| LabError::EtcdMissing {
            path: format!("{ETCD_BINARY} in PATH"),
        })
}

/// Starts etcd inside `ns` (the master's namespace), detached (own session),
/// logging to `dir/etcd.log`, pid in `dir/etcd.pid`, data in `dir/data`.
/// A second start with the same data directory resumes the same one-member
/// cluster (etcd ignores the `--initial-*` flags once the data exists).
///
/// `ip netns exec NAME-master etcd --name NAME-master --data-dir DIR/data
/// --listen-client-urls http://172.16.1.8:2379,http://127.0.0.1:2379 ...`
pub(crate) fn spawn(ns: &NetNs, lab: &str, dir: &Path, ip: Ipv4Addr) -> Result<u32> {
    let binary = etcd_binary()?;
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let (out, err) = procs::log_output(&dir.join(ETCD_LOG_FILE))?;
    let client = client_url(ip);
    let peer = format!("http://{ip}:{ETCD_PEER_PORT}");
    let member = format!("{lab}-master");
    let mut cmd = Command::new(&binary);
    // etcd reads every flag from ETCD_<FLAG> too: the caller's must not leak in.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ETCD_") {
            cmd.env_remove(key);
        }
    }
    cmd.arg("--name")
        .arg(&member)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--listen-client-urls")
        .arg(format!("{client},http://127.0.0.1:{ETCD_CLIENT_PORT}"))
        .arg("--advertise-client-urls")
        .arg(&client)
        .arg("--listen-peer-urls")
        .arg(&peer)
        .arg("--initial-advertise-peer-urls")
        .arg(&peer)
        .arg("--initial-cluster")
        .arg(format!("{member}={peer}"))
        .arg("--initial-cluster-state")
        .arg("new")
        .arg("--initial-cluster-token")
        .arg(format!("flannel-lab-{lab}"))
        // Metrics stay inside the namespace too (default would be none, but be explicit).
        .arg("--listen-metrics-urls")
        .arg("http://127.0.0.1:2381")
        .arg("--logger")
        .arg("zap")
        .arg("--log-outputs")
        .arg("stderr")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    super::procs::detach(&mut cmd);
    let child = ns
        .run(move || -> Result<std::process::Child> {
            // A fresh namespace has lo down: 127.0.0.1 would not answer.
            let mut nl = Netlink::open().map_err(nl_err("opening netlink in the master"))?;
            if let Some(lo) = nl
                .link_by_name("lo")
                .map_err(nl_err("ip link show lo in the master"))?
            {
                nl.set_link_up(lo.index)
                    .map_err(nl_err("ip link set lo up in the master"))?;
            }
            cmd.spawn()
                .map_err(io_err(format!("starting {}", binary.display())))
        })
        .map_err(ns_err(format!("entering {} to start etcd", ns.name)))??;
    let pid = child.id();
    procs::adopt(child);
    write_atomic(&dir.join(ETCD_PID_FILE), format!("{pid}\n").as_bytes())?;
    Ok(pid)
}

/// Whether `pid` is this lab's etcd (alive, `etcd`, data directory in the labdir).
pub(crate) fn is_lab_etcd(pid: u32, lab_dir: &Path) -> bool {
    procs::is_lab_process(pid, lab_dir, ETCD_BINARY)
}

/// Stops this lab's etcd (SIGTERM, SIGKILL after `timeout`) after checking
/// its command line; returns whether it was running.
pub(crate) fn stop(pid: u32, lab_dir: &Path, timeout: Duration) -> Result<bool> {
    procs::stop_process(pid, lab_dir, ETCD_BINARY, timeout)
}

/// The options flannelctl uses to reach the lab's etcd from inside the
/// master's namespace: the daemons' endpoint, short timeouts (a lab
/// operation should fail fast when etcd is stopped).
pub(crate) fn client_options(ip: Ipv4Addr) -> EtcdOptions {
    EtcdOptions {
        endpoints: vec![client_url(ip)],
        request_timeout: Duration::from_secs(3),
        connect_timeout: Duration::from_secs(2),
        ..EtcdOptions::default()
    }
}

/// Connects to the lab's etcd from a thread inside `ns` and runs `f` on a
/// current-thread runtime there.
pub(crate) fn block_on<T, F, Fut>(ns: &NetNs, opts: EtcdOptions, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce(EtcdStore) -> Fut + Send,
    Fut: Future<Output = Result<T>>,
{
    let endpoint = opts.endpoints.join(",");
    ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io_err("starting a runtime for etcd"))?;
        rt.block_on(async move {
            let store = EtcdStore::connect(opts).await.map_err(|e| LabError::Etcd {
                endpoint: endpoint.clone(),
                detail: e.to_string(),
            })?;
            f(store).await
        })
    })
    .map_err(ns_err(format!("entering {} to reach etcd", ns.name)))?
}

/// Waits until etcd answers a read (it has elected itself leader).
pub(crate) fn wait_ready(
    ns: &NetNs,
    ip: Ipv4Addr,
    pid: u32,
    lab_dir: &Path,
    log: &Path,
    deadline: Instant,
) -> Result<()> {
    let start = Instant::now();
    loop {
        match block_on(ns, client_options(ip), |_| async { Ok(()) }) {
            Ok(()) => return Ok(()),
            Err(e) => {
                if !is_lab_etcd(pid, lab_dir) {
                    return Err(LabError::EtcdDied {
                        pid,
                        log: log.display().to_string(),
                        tail: procs::tail(log, 15),
                    });
                }
                if Instant::now() >= deadline {
                    return Err(LabError::Timeout {
                        what: format!("etcd (pid {pid}) to answer: {e}"),
                        secs: start.elapsed().as_secs_f64(),
                    });
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
