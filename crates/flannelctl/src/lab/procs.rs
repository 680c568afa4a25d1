//! The lab's processes: finding the binaries, starting `flanneld` detached
//! inside a node namespace, and stopping it again by pid — only after
//! checking that the pid still is this lab's flanneld.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flannel_netlink::netns::NetNs;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{io_err, ns_err, write_atomic, LabError, Result};

/// The daemon binary.
pub const FLANNELD_BINARY: &str = "flanneld";
/// The CNI plugin binary.
pub const CNI_BINARY: &str = "flannel";
/// Overrides where the binaries are looked up (like `--bin-dir`).
pub const BIN_DIR_ENV: &str = "FLANNEL_LAB_BIN_DIR";
/// Per node: the daemon's pid.
pub(crate) const PID_FILE: &str = "flanneld.pid";
/// Per node: the daemon's stdout and stderr.
pub(crate) const LOG_FILE: &str = "flanneld.log";
/// A lab node's WireGuard private key, in its directory (`WIREGUARD_KEY_FILE`).
pub(crate) const WIREGUARD_KEY_FILE: &str = "wgkey";

/// Where `flanneld` and `flannel` are: `explicit` (`--bin-dir`), else
/// `$FLANNEL_LAB_BIN_DIR`, else the directory of the running executable
/// (cargo puts all workspace binaries side by side). Both must exist.
pub fn resolve_bin_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    let dir = match explicit {
        Some(d) => d.to_path_buf(),
        None => match std::env::var_os(BIN_DIR_ENV) {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => {
                let exe = std::env::current_exe().map_err(io_err("finding flannelctl's path"))?;
                exe.parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("."))
            }
        },
    };
    let dir = dir.canonicalize().unwrap_or(dir);
    for binary in [FLANNELD_BINARY, CNI_BINARY] {
        let path = dir.join(binary);
        if !path.is_file() {
            return Err(LabError::BinaryMissing {
                binary,
                path: path.display().to_string(),
            });
        }
    }
    Ok(dir)
}

/// Children this process started and has not reaped yet. A daemon started
/// by a test (or by `up` in the same process) must be waited for after it is
/// killed, or it lingers as a zombie that still looks like a process.
static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());

/// Remembers a child so that it is reaped once it exits.
pub(crate) fn adopt(child: Child) {
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(child);
}

fn reap_children() {
    let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
}

/// Starts `flanneld STORE-ARGS... --subnet-file ENV` inside `ns`: spawned from a thread that entered the namespace (the
/// child inherits it), in a session of its own (`setsid`) so it survives
/// the terminal, stdout/stderr appended to `node_dir/flanneld.log`, pid
/// written to `node_dir/flanneld.pid`.
///
/// `store_args` select the store (`--local-store DIR --net-config-path
/// CONF`, or `--etcd-endpoints URL`); `extra` are further flags (e.g.
/// `--lease-ttl`).
pub(crate) fn spawn_flanneld(
    ns: &NetNs,
    bin_dir: &Path,
    node_dir: &Path,
    store_args: &[OsString],
    env: &[(OsString, OsString)],
    subnet_file: &Path,
) -> Result<u32> {
    let (out, err) = log_output(&node_dir.join(LOG_FILE))?;
    let mut cmd = Command::new(bin_dir.join(FLANNELD_BINARY));
    // Every flag of flanneld can also come from FLANNELD_<FLAG>: drop any the
    // caller's environment holds so that each lab daemon runs with exactly
    // the flags below.
    // Nor may the caller's Kubernetes-mode variables name another node (or
    // set an upstream knob flanneld would refuse).
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("FLANNELD_") || flannel_core::wire::KUBE_ENV_VARS.contains(&k.as_ref()) {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    // The log is a file: no terminal colours (honoured by tracing-subscriber).
    cmd.env("NO_COLOR", "1");
    // Each node its own WireGuard key (the default /run/flannel/wgkey
    // would be every lab node's).
    cmd.env(
        flannel_core::wire::ENV_WIREGUARD_KEY_FILE,
        node_dir.join(WIREGUARD_KEY_FILE),
    );
    // `store_args` carries --ip-masq unless the lab was made without it
    // (see `LabOptions::ip_masq`).
    cmd.args(store_args)
        .arg("--subnet-file")
        .arg(subnet_file)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    detach(&mut cmd);
    let child = ns
        .run(move || cmd.spawn())
        .map_err(ns_err(format!("entering {} to start flanneld", ns.name)))?
        .map_err(io_err(format!(
            "starting {}",
            bin_dir.join(FLANNELD_BINARY).display()
        )))?;
    let pid = child.id();
    adopt(child);
    write_atomic(&node_dir.join(PID_FILE), format!("{pid}\n").as_bytes())?;
    Ok(pid)
}

/// A spawned process's stdout and stderr: `path`, opened for appending.
pub(crate) fn log_output(path: &Path) -> Result<(Stdio, Stdio)> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    let log2 = log
        .try_clone()
        .map_err(io_err(format!("duplicating {}", path.display())))?;
    Ok((Stdio::from(log), Stdio::from(log2)))
}

/// The pid in a pid file.
/// Makes a lab process outlive `flannelctl`: it starts a session of its own
/// (`setsid`), so no terminal hang-up or Ctrl-C of the caller reaches it.
pub(crate) fn detach(cmd: &mut Command) {
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
}

pub(crate) fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The command line of a process.
pub(crate) fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Process state letter from /proc/PID/stat (`R`, `S`, `Z`, ...).
fn proc_state(pid: u32) -> Option<char> {
    stat_state(&format!("/proc/{pid}/stat"))
}

/// The state letter of a `/proc/.../stat` file.
fn stat_state(path: &str) -> Option<char> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name may contain spaces and parentheses: the state follows the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

/// Alive: some thread of it has not exited. A killed process's main thread
/// is a zombie while its other threads are still exiting, and they hold
/// the process's files until the last one is gone: a flanneld started
/// again before that finds its health port still bound.
pub(crate) fn is_alive(pid: u32) -> bool {
    reap_children();
    let live = |s: Option<char>| matches!(s, Some(s) if s != 'Z' && s != 'X');
    live(proc_state(pid))
        || std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
            tasks.flatten().any(|t| {
                live(stat_state(&format!(
                    "/proc/{pid}/task/{}/stat",
                    t.file_name().to_string_lossy()
                )))
            })
        })
}

/// Whether `pid` is a live `flanneld` whose command line points into `lab_dir`.
pub(crate) fn is_lab_flanneld(pid: u32, lab_dir: &Path) -> bool {
    is_lab_process(pid, lab_dir, FLANNELD_BINARY)
}

/// Whether `pid` is a live `binary` (by the file name of argv\[0\]) whose
/// command line names a path inside `lab_dir` (a daemon's files, etcd's
/// data directory): a recycled pid of another program never matches.
pub(crate) fn is_lab_process(pid: u32, lab_dir: &Path, binary: &str) -> bool {
    if !is_alive(pid) {
        return false;
    }
    let Some(args) = cmdline(pid) else {
        return false;
    };
    let is_binary = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == binary);
    let prefix = lab_dir.to_string_lossy();
    is_binary
        && args
            .iter()
            .any(|a| Path::new(a).starts_with(prefix.as_ref()))
}

/// Every live process whose command line names a path inside this lab's
/// directory (the daemons; a leftover one is a leak).
pub fn lab_processes(name: &str) -> Vec<u32> {
    reap_children();
    let dir = super::lab_dir(name);
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|&pid| {
            is_alive(pid)
                && cmdline(pid)
                    .is_some_and(|args| args.iter().any(|a| Path::new(a).starts_with(&dir)))
        })
        .collect()
}

/// SIGTERM, wait up to `timeout`, then SIGKILL. Only signals `pid` if it is
/// this lab's flanneld; returns whether it was.
pub(crate) fn stop_flanneld(pid: u32, lab_dir: &Path, timeout: Duration) -> Result<bool> {
    stop_process(pid, lab_dir, FLANNELD_BINARY, timeout)
}

/// `kill -KILL PID` of this lab's flanneld (a crash: no cleanup, the lease
/// stays until it expires). Returns whether it was this lab's flanneld.
pub(crate) fn kill_flanneld(pid: u32, lab_dir: &Path) -> Result<bool> {
    if !is_lab_flanneld(pid, lab_dir) {
        return Ok(false);
    }
    match kill(Pid::from_raw(pid as i32), Signal::SIGKILL) {
        Ok(()) | Err(nix::Error::ESRCH) => {}
        Err(e) => {
            return Err(LabError::Io {
                context: format!("kill -KILL {pid} (flanneld)"),
                source: std::io::Error::from(e),
            })
        }
    }
    if wait_gone(pid, Duration::from_secs(5)) {
        Ok(true)
    } else {
        Err(LabError::Timeout {
            what: format!("flanneld (pid {pid}) to exit after SIGKILL"),
            secs: 5.0,
        })
    }
}

/// [`stop_flanneld`] for any of the lab's programs (`binary` is the file
/// name of its argv\[0\], e.g. `etcd`).
pub(crate) fn stop_process(
    pid: u32,
    lab_dir: &Path,
    binary: &str,
    timeout: Duration,
) -> Result<bool> {
    if !is_lab_process(pid, lab_dir, binary) {
        return Ok(false);
    }
    let target = Pid::from_raw(pid as i32);
    let signal_err = |sig: &str, e: nix::Error| LabError::Io {
        context: format!("kill -{sig} {pid} ({binary})"),
        source: std::io::Error::from(e),
    };
    match kill(target, Signal::SIGTERM) {
        Ok(()) | Err(nix::Error::ESRCH) => {}
        Err(e) => return Err(signal_err("TERM", e)),
    }
    if wait_gone(pid, timeout) {
        return Ok(true);
    }
    match kill(target, Signal::SIGKILL) {
        Ok(()) | Err(nix::Error::ESRCH) => {}
        Err(e) => return Err(signal_err("KILL", e)),
    }
    if wait_gone(pid, Duration::from_secs(5)) {
        Ok(true)
    } else {
        Err(LabError::Timeout {
            what: format!("{binary} (pid {pid}) to exit after SIGKILL"),
            secs: timeout.as_secs_f64() + 5.0,
        })
    }
}

fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `n` lines of a log file (for error messages).
pub(crate) fn tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            lines[start..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// `GET PATH` on 127.0.0.1:PORT of the calling thread's namespace (one
/// HTTP/1.1 request, `Connection: close`, 1 s timeouts): the response's
/// status code, or why there was none.
pub(crate) fn http_get_status(port: u16, path: &str) -> std::result::Result<u16, String> {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, SocketAddr, TcpStream};
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let timeout = Duration::from_secs(1);
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("GET {path}: {e}"))?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).map_err(|e| format!("GET {path}: {e}"))?;
    // "HTTP/1.1 200 OK"
    std::str::from_utf8(&head[..n])
        .ok()
        .and_then(|t| t.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("GET {path}: not an HTTP response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_not_flanneld() {
        let me = std::process::id();
        assert!(is_alive(me));
        assert!(!is_lab_flanneld(me, Path::new("/run/flannel-lab/x")));
        assert!(!is_alive(u32::MAX - 1));
    }

    #[test]
    fn a_process_whose_main_thread_exited_is_alive_until_its_last_thread() {
        // The main thread leaves by pthread_exit (a zombie in /proc), the
        // other sleeps on: the process, and its files, are still there.
        let script = "import threading, time, ctypes\n\
            threading.Thread(target=time.sleep, args=(1.5,)).start()\n\
            ctypes.CDLL(None).pthread_exit(None)\n";
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .spawn()
            .expect("python3 (scripts/test installs it)");
        let pid = child.id();
        let start = Instant::now();
        while proc_state(pid) != Some('Z') {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "main thread never exited"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(is_alive(pid), "the sleeping thread still runs");
        child.wait().unwrap();
        assert!(!is_alive(pid));
    }

    #[test]
    fn missing_binaries_are_reported_with_the_fix() {
        let err = resolve_bin_dir(Some(Path::new("/nonexistent-flannel-bin")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("flanneld"), "{err}");
        assert!(err.contains("cargo build --workspace --bins"), "{err}");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("flannelctl-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("log");
        std::fs::write(&f, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&f, 2), "c\nd");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
