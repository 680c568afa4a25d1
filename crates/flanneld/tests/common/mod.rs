//! Harness shared by the flanneld root integration tests: the "needs root"
//! check, polling, temporary directories, and the underlay every test
//! cluster sits on (a switch namespace with bridge `br0`, one namespace per
//! node joined to it by a veth pair whose node side is `eth0`,
//! 172.16.1.1N/24). Everything is removed on drop, also on panic.
#![allow(dead_code)]

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use flannel_netlink::netns::ScopedNetNs;
use flannel_netlink::Netlink;
use ipnet::{IpNet, Ipv4Net};

pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("needs root: these tests create network namespaces and run flanneld in them (run as root)");
    }
}

/// Polls `f` every 100 ms until it gives a value; panics naming `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// flanneld's nexthop objects in `nl`'s namespace (`ip nexthop show`
/// less every object not in our id range with our protocol), by gateway.
pub fn our_nexthops(nl: &mut Netlink) -> Vec<flannel_netlink::Nexthop> {
    use flanneld::nexthops::{owns_id, PROTOCOL};
    let mut v: Vec<_> = nl
        .list_nexthops()
        .unwrap()
        .into_iter()
        .filter(|h| owns_id(h.id) && h.protocol == PROTOCOL)
        .collect();
    v.sort_by_key(|h| h.gateway);
    v
}

pub fn read_log(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_default()
}

/// Waits until the log at `p` has not grown for `quiet`: flanneld has run
/// the passes that earlier changes started. Panics after 20 s of a log
/// that keeps growing.
pub fn wait_log_quiet(p: &Path, quiet: Duration) {
    let start = Instant::now();
    let len = || fs::metadata(p).map_or(0, |m| m.len());
    let (mut last, mut since) = (len(), Instant::now());
    while since.elapsed() < quiet {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} kept growing for 20 s:\n{}",
            p.display(),
            read_log(p)
        );
        std::thread::sleep(Duration::from_millis(50));
        let now = len();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
}

/// `flanneld` to be run inside `ns` (setns(2) between fork and exec, and
/// SIGKILL when the test dies), logging to `log`, with exactly the flags the
/// caller adds: no `FLANNELD_*` or `RUST_LOG` from the test's environment.
pub fn flanneld_in(ns: &ScopedNetNs, log: &Path) -> std::process::Command {
    use std::os::fd::{AsRawFd, BorrowedFd};
    use std::os::unix::process::CommandExt;
    let logf = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let fd = ns.fd().as_raw_fd();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flanneld"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FLANNELD_") {
            cmd.env_remove(key);
        }
    }
    // Nor may the caller's Kubernetes-mode variables name a Node.
    for key in flannel_core::wire::KUBE_ENV_VARS {
        cmd.env_remove(key);
    }
    cmd.env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf);
    // SAFETY: between fork and exec only async-signal-safe syscalls run:
    // setns(2) into the node's namespace (the fd stays open in the child
    // until exec), and prctl(2) so the daemon dies with the test.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(
                BorrowedFd::borrow_raw(fd),
                nix::sched::CloneFlags::CLONE_NEWNET,
            )?;
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            Ok(())
        });
    }
    cmd
}

/// The flags every test node's flanneld gets: the shared local store, the
/// test's net-conf.json, the node's subnet.env, debug logging.
pub fn local_store_flags(store: &Path, config: &Path, subnet_file: &Path) -> Vec<String> {
    let path = |p: &Path| p.to_str().expect("UTF-8 test path").to_string();
    vec![
        "--local-store".into(),
        path(store),
        "--net-config-path".into(),
        path(config),
        "--subnet-file".into(),
        path(subnet_file),
        "--log-level".into(),
        "debug".into(),
    ]
}

/// Runs a future to completion on a current-thread runtime (store reads in tests).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A flanneld process, killed by PID and reaped on drop.
pub struct Daemon(pub Option<std::process::Child>);

impl Daemon {
    /// SIGTERM, then wait for a clean exit.
    pub fn stop(mut self, log: &Path) {
        let mut c = self.0.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(
                    st.success(),
                    "flanneld exited with {st}; log:\n{}",
                    read_log(log)
                );
                return;
            }
            if start.elapsed() > Duration::from_secs(15) {
                let _ = c.kill();
                let _ = c.wait();
                panic!("flanneld ignored SIGTERM; log:\n{}", read_log(log));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Panics with the log when flanneld has exited.
    pub fn check_alive(&mut self, log: &Path) {
        if let Ok(Some(st)) = self.0.as_mut().unwrap().try_wait() {
            panic!("flanneld exited with {st}; log:\n{}", read_log(log));
        }
    }

    /// SIGKILL: no shutdown cleanup, as after a crash.
    pub fn crash(mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "flanneld-it-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Builds the underlay: namespaces `<prefix>-sw` (bridge `br0`, with
/// `switch_addr` when given) and `<prefix>-n<i>` for i in 1..=n, node i on
/// 172.16.1.(10+i)/24 via its `eth0`. Returns the switch and the nodes with
/// their addresses.
pub fn underlay(
    prefix: &str,
    n: usize,
    switch_addr: Option<&str>,
) -> (ScopedNetNs, Vec<(ScopedNetNs, Ipv4Addr)>) {
    let switch = ScopedNetNs::unique(&format!("{prefix}-sw")).unwrap();
    switch
        .run(|| {
            let mut nl = Netlink::open().unwrap();
            let br = nl.add_bridge("br0", None).unwrap();
            if let Some(a) = switch_addr {
                nl.add_address(br.index, a.parse().unwrap()).unwrap();
            }
            nl.set_link_up(br.index).unwrap();
        })
        .unwrap();
    let mut nodes = Vec::new();
    for i in 1..=n {
        let ns = ScopedNetNs::unique(&format!("{prefix}-n{i}")).unwrap();
        let ip = Ipv4Addr::new(172, 16, 1, 10 + i as u8);
        switch
            .run(|| {
                let mut nl = Netlink::open().unwrap();
                let br = nl.link_by_name("br0").unwrap().unwrap();
                let host = nl
                    .add_veth(&format!("n{i}"), "eth0", ns.fd(), Some(1500))
                    .unwrap();
                nl.set_link_master(host.index, br.index).unwrap();
                nl.set_link_up(host.index).unwrap();
            })
            .unwrap();
        ns.run(|| {
            let mut nl = Netlink::open().unwrap();
            let eth0 = nl
                .link_by_name("eth0")
                .unwrap()
                .expect("eth0 in node namespace");
            nl.add_address(eth0.index, IpNet::V4(Ipv4Net::new(ip, 24).unwrap()))
                .unwrap();
            nl.set_link_up(eth0.index).unwrap();
        })
        .unwrap();
        nodes.push((ns, ip));
    }
    (switch, nodes)
}

/// What every simulated node of these tests has: its namespace and its
/// directory (flanneld.log, subnet.env). A test's own `Node` wraps it
/// (`Deref`) and adds what that test needs.
pub struct NodeNs {
    pub dir: PathBuf,
    pub ns: ScopedNetNs,
}

impl NodeNs {
    pub fn log(&self) -> PathBuf {
        self.dir.join("flanneld.log")
    }

    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    /// Runs `f` with a netlink socket opened inside the node's namespace.
    pub fn nl<R: Send>(&self, f: impl FnOnce(&mut Netlink) -> R + Send) -> R {
        self.ns
            .run(|| f(&mut Netlink::open().expect("open netlink")))
            .expect("run in namespace")
    }

    pub fn subnet_env(&self) -> Option<flannel_core::subnet_env::SubnetEnv> {
        flannel_core::subnet_env::SubnetEnv::parse(&fs::read_to_string(self.subnet_file()).ok()?)
            .ok()
    }

    /// `ip link show NAME` in the node's namespace.
    pub fn link(&self, name: &str) -> Option<flannel_netlink::Link> {
        let name = name.to_string();
        self.nl(move |nl| nl.link_by_name(&name).unwrap())
    }

    /// Waits up to `secs` until `read()` gives `want`; panics with what it
    /// gave last and the daemon's log.
    #[allow(dead_code)] // not every test file waits this way
    pub fn wait_eq<T: PartialEq + std::fmt::Debug>(
        &self,
        what: &str,
        secs: u64,
        want: &T,
        mut read: impl FnMut() -> T,
    ) {
        let start = Instant::now();
        loop {
            let got = read();
            if &got == want {
                return;
            }
            if start.elapsed() > Duration::from_secs(secs) {
                panic!(
                    "{what}: {got:?}, want {want:?}; log:\n{}",
                    read_log(&self.log())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `ip netns exec NS ping -c 1 -W 1 [-I SRC] DST`: whether it was answered.
pub fn ping_in(ns: &str, src: Option<IpAddr>, dst: IpAddr) -> bool {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", ns, "ping", "-c", "1", "-W", "1"]);
    if let Some(src) = src {
        cmd.arg("-I").arg(src.to_string());
    }
    cmd.arg(dst.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// What every simulated cluster of these tests has besides its nodes: the
/// switch namespace, a local store and the net-conf.json, all in a temporary
/// directory. A test's `Cluster` holds its nodes first (they go before the
/// switch when dropped) and this (`Deref`).
pub struct Testbed {
    pub switch: ScopedNetNs,
    pub store: PathBuf,
    pub config: PathBuf,
    pub tmp: TempDir,
}

impl Testbed {
    /// `n` nodes on one switch (see [`underlay`]), each with a directory of
    /// its own, and `config` as net-conf.json. `tag` names the temporary
    /// directory, `prefix` the namespaces.
    pub fn new(
        tag: &str,
        prefix: &str,
        n: usize,
        switch_addr: Option<&str>,
        config: &str,
    ) -> (Testbed, Vec<(NodeNs, Ipv4Addr)>) {
        require_root();
        let tmp = TempDir::new(tag);
        let (switch, underlay) = underlay(prefix, n, switch_addr);
        let nodes = underlay
            .into_iter()
            .enumerate()
            .map(|(idx, (ns, ip))| {
                let dir = tmp.0.join(format!("node{}", idx + 1));
                fs::create_dir_all(&dir).unwrap();
                (NodeNs { dir, ns }, ip)
            })
            .collect();
        let bed = Testbed {
            switch,
            store: tmp.0.join("store"),
            config: tmp.0.join("net-conf.json"),
            tmp,
        };
        bed.set_config(config);
        (bed, nodes)
    }

    pub fn set_config(&self, config: &str) {
        fs::write(&self.config, config).unwrap();
    }

    /// Every lease in the store.
    pub fn leases(&self) -> Vec<flannel_core::lease::Lease> {
        use flannel_store::Store;
        block_on(async {
            let store = flannel_store::LocalStore::open(&self.store).unwrap();
            store.list_leases().await.unwrap().leases
        })
    }
}

/// A test file's nodes (`N`: its own node type, wrapping a [`NodeNs`]) and
/// the testbed (switch, store, config). Field order is drop order: the
/// nodes go before their switch. Each file adds its own `impl Cluster`.
#[allow(dead_code)] // not every test file builds a cluster this way
pub struct Cluster<N> {
    pub nodes: Vec<N>,
    pub bed: Testbed,
}

impl<N> std::ops::Deref for Cluster<N> {
    type Target = Testbed;
    fn deref(&self) -> &Testbed {
        &self.bed
    }
}

/// An IPv4/UDP packet (UDP checksum 0: none) from `src` to `dst`, as a pod sends it.
pub fn inner_udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.ip().octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    p[20..22].copy_from_slice(&src.port().to_be_bytes());
    p[22..24].copy_from_slice(&dst.port().to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    flannel_core::udp::fill_ipv4_checksum(&mut p);
    p
}
