//! Shared helpers of the root tests and the benchmark: a node namespace with
//! its own state directory, and running a CNI plugin exactly as a runtime
//! does (environment + stdin) from a thread inside the node namespace.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use flannel_netlink::netns::{NetNs, ScopedNetNs};
use serde_json::Value;

/// Fails (never skips) when not root.
pub fn need_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("needs root: these tests create network namespaces; run as root (e.g. sudo -E cargo test -p flannel-cni)");
    }
}

/// A directory removed on drop (also when a test panics).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What one plugin call printed and how it exited.
#[derive(Debug)]
pub struct Outcome {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
    /// From spawn to exit, measured inside the node namespace's thread.
    pub elapsed: Duration,
}

impl Outcome {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?} stderr {:?}",
                self.stdout, self.stderr
            )
        })
    }
    /// The spec error code, asserting the call failed.
    pub fn code(&self) -> u64 {
        assert!(!self.ok, "expected a failure, got success: {}", self.stdout);
        let v = self.json();
        assert!(v["msg"].is_string(), "error without msg: {v}");
        v["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("error without code: {v}"))
    }
    pub fn expect_ok(&self) -> &Self {
        assert!(self.ok, "plugin failed: {} {}", self.stdout, self.stderr);
        self
    }
}

/// A simulated node: its own network namespace and state directory.
pub struct Node {
    pub ns: ScopedNetNs,
    pub dir: TempDir,
}

pub const SUBNET_ENV: &str =
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

impl Node {
    pub fn new(prefix: &str) -> Node {
        let node = Node {
            ns: ScopedNetNs::unique(prefix).unwrap(),
            dir: TempDir::new(prefix),
        };
        node.write_subnet_env(SUBNET_ENV);
        node
    }

    pub fn subnet_env(&self) -> PathBuf {
        self.dir.0.join("subnet.env")
    }
    pub fn write_subnet_env(&self, text: &str) {
        std::fs::write(self.subnet_env(), text).unwrap();
    }
    pub fn data_dir(&self) -> PathBuf {
        self.dir.0.join("flannel")
    }
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.0.join("networks")
    }
    /// The network's host-local directory (`<ipam dataDir>/cbr0`).
    pub fn net_dir(&self) -> PathBuf {
        self.ipam_dir().join("cbr0")
    }

    /// The manifest's config, with every path moved into the node's directory.
    pub fn conf(&self, version: &str) -> Value {
        serde_json::json!({
            "name": "cbr0",
            "cniVersion": version,
            "type": "flannel",
            "subnetFile": self.subnet_env(),
            "dataDir": self.data_dir(),
            "ipam": {"dataDir": self.ipam_dir()},
            "delegate": {"hairpinMode": true, "isDefaultGateway": true}
        })
    }

    /// Runs `bin` inside the node namespace with `env` and `stdin`.
    pub fn exec(&self, bin: &Path, env: &[(&str, &str)], stdin: &[u8]) -> Outcome {
        let bin = bin.to_path_buf();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let stdin = stdin.to_vec();
        self.ns
            .run(move || {
                // Spawned from a thread inside the node namespace: the child inherits it.
                let start = Instant::now();
                let mut child = Command::new(&bin)
                    .env_clear()
                    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                    .envs(env)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
                // A plugin may exit without reading stdin (VERSION): a broken pipe is fine.
                if let Err(e) = child.stdin.take().unwrap().write_all(&stdin) {
                    assert_eq!(
                        e.kind(),
                        std::io::ErrorKind::BrokenPipe,
                        "writing stdin: {e}"
                    );
                }
                let out = child.wait_with_output().unwrap();
                let elapsed = start.elapsed();
                Outcome {
                    elapsed,
                    ok: out.status.success(),
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                }
            })
            .unwrap()
    }

    /// One CNI call of `bin` as a runtime makes it.
    pub fn cni(
        &self,
        bin: &Path,
        cmd: &str,
        id: &str,
        netns: &str,
        ifname: &str,
        conf: &Value,
    ) -> Outcome {
        let mut env = vec![("CNI_COMMAND", cmd), ("CNI_PATH", "/usr/lib/cni")];
        if !id.is_empty() {
            env.push(("CNI_CONTAINERID", id));
        }
        if !netns.is_empty() {
            env.push(("CNI_NETNS", netns));
        }
        if !ifname.is_empty() {
            env.push(("CNI_IFNAME", ifname));
        }
        self.exec(bin, &env, conf.to_string().as_bytes())
    }

    /// Runs a command (iproute2, ping) inside `ns` and returns stdout; panics on failure.
    pub fn sh_in(ns: &NetNs, argv: &[&str]) -> String {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        ns.run(move || {
            let out = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
            assert!(
                out.status.success(),
                "{argv:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .unwrap()
    }
}

/// The netns path a runtime passes as CNI_NETNS.
pub fn netns_path(ns: &NetNs) -> String {
    ns.path
        .as_ref()
        .expect("named namespace")
        .display()
        .to_string()
}
