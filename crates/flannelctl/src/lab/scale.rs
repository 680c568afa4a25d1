//! `flannelctl bench scale`: the control plane at scale, measured from
//! outside the daemon, for our flanneld and (when Debian's `flannel`
//! package is installed) upstream's, side by side.
//!
//! For each store (the local directory, etcd) and each number N of peer
//! leases, in namespaces of its own:
//!
//! ```text
//!   <tag>-n   the node: eth0 172.20.0.1/16, flanneld (vxlan), etcd on 127.0.0.1
//!   <tag>-p   the other end of eth0's veth pair (172.20.0.2/16)
//! ```
//!
//! N leases are loaded into the store first (peers 10.0.0.0/24,
//! 10.0.1.0/24, ... of Network 10.0.0.0/8, PublicIPs in eth0's subnet so
//! every FDB, neighbour and route entry is valid; the node acquires from
//! 10.255.0.0/16 through SubnetMin/SubnetMax), then flanneld starts and the
//! bench measures, polling the node's kernel over netlink (never the
//! daemon's logs):
//! - cold start: from the spawn until flannel.1 holds N routes, N permanent
//!   neighbours and N FDB entries;
//! - one-event latency: a new lease is written, then the time until its
//!   route is in the kernel (`ip route get`); then the lease is removed and
//!   the time until the route is gone; p50/p99 over repeated single-lease
//!   adds and removals;
//! - repair: some routes are deleted with netlink, then the time until all
//!   are back (none within the limit: "no repair", as upstream's vxlan does
//!   not repair routes);
//! - memory: the steady VmRSS once the daemon is idle after all that (the
//!   median of readings over a second), and the peak (VmHWM), from /proc.
//!
//! Upstream flanneld runs on etcd only (it has no local store), against the
//! same etcd setup with the same N and the same lease values, measured the
//! same way; ratios ours/upstream are printed when both ran. The goals of
//! the scale issue are judged at the end.

use std::fmt::Write as _;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flannel_core::datapath::Route;
use flannel_core::lease::{Lease, LeaseAttrs, LeaseKey, VxlanBackendData};
use flannel_core::mac::MacAddr;
use flannel_netlink::netns::NetNs;
use flannel_netlink::Netlink;
use flannel_store::etcd::{EtcdOptions, EtcdStore};
use flannel_store::{LocalStore, Store};
use ipnet::{IpNet, Ipv4Net};

use super::{check_interrupted, io_err, nl_err, ns_err, LabError, Result};

/// The sizes `scripts/bench-scale` measures by default.
pub const DEFAULT_SIZES: [usize; 3] = [1_000, 5_000, 20_000];
/// Single-lease adds (and as many removals) per run.
pub const DEFAULT_EVENTS: usize = 50;
/// Routes deleted for the repair measurement.
pub const DEFAULT_REPAIR: usize = 1_000;
/// The most peers a run can have (subnets 10.0.0.0/24 .. 10.254.255.0/24
/// less the event leases').
pub const MAX_SIZE: usize = 60_000;
/// Where a run keeps its store, config, subnet.env and logs.
pub const BENCH_ROOT: &str = "/run/flannel-bench-scale";
/// Where Debian's `flannel` package puts upstream's daemon.
pub const UPSTREAM_PACKAGE: &str = "flannel";
/// Overrides the upstream binary (default: from the Debian package).
pub const UPSTREAM_ENV: &str = "FLANNEL_BENCH_UPSTREAM";

/// The issue's goals: cold start per size, event latency, RSS per size.
pub const COLD_GOALS: [(usize, f64); 2] = [(5_000, 0.5), (20_000, 2.0)];
/// One lease event to kernel, any size (judged on the median).
pub const EVENT_GOAL_MS: f64 = 10.0;
/// VmRSS per size, MiB.
pub const RSS_GOALS: [(usize, f64); 2] = [(5_000, 20.0), (20_000, 40.0)];

const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 20, 0, 1);
const PEER_NS_IP: Ipv4Addr = Ipv4Addr::new(172, 20, 0, 2);
const UNDERLAY_PREFIX: u8 = 16;
const DEVICE: &str = "flannel.1";
const NET_CONF: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":24,"SubnetMin":"10.255.0.0","SubnetMax":"10.255.255.0","Backend":{"Type":"vxlan","VNI":1}}"#;
const ETCD_URL: &str = "http://127.0.0.1:2379";
/// How long a single event may take before the run is declared failed.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the repair may take before it counts as "no repair".
const REPAIR_TIMEOUT: Duration = Duration::from_secs(30);

/// The lease store of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleStore {
    Local,
    Etcd,
}

impl std::fmt::Display for ScaleStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScaleStore::Local => "local",
            ScaleStore::Etcd => "etcd",
        })
    }
}

impl std::str::FromStr for ScaleStore {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "local" => Ok(ScaleStore::Local),
            "etcd" => Ok(ScaleStore::Etcd),
            _ => Err(format!("unknown store {s:?}: use local or etcd")),
        }
    }
}

/// Which flanneld.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    Ours,
    Upstream,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub sizes: Vec<usize>,
    pub stores: Vec<ScaleStore>,
    pub events: usize,
    pub repair: usize,
    /// Directory holding our flanneld.
    pub bin_dir: PathBuf,
    /// Upstream's flanneld, or why there is none.
    pub upstream: std::result::Result<PathBuf, String>,
    /// Print progress to stderr.
    pub progress: bool,
}

/// One daemon's numbers for one store and size.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    pub cold: Duration,
    pub add: Vec<Duration>,
    pub del: Vec<Duration>,
    /// Routes deleted, and how long until all were back (`None`: not
    /// within [`REPAIR_TIMEOUT`]).
    pub repair: (usize, Option<Duration>),
    pub rss_kib: u64,
    pub peak_kib: u64,
    /// The anonymous part of VmRSS (RssAnon): the heap and stacks, without
    /// the executable's pages in the page cache.
    pub anon_kib: u64,
}

/// One daemon's outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Measured(Measurement),
    /// Not run, and why ("not installed", "no local store").
    NotRun(String),
    /// Ran and failed (did not converge, died): the reason.
    Failed(String),
}

/// One store and size.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub store: ScaleStore,
    pub n: usize,
    pub ours: Outcome,
    pub upstream: Outcome,
}

/// The whole run.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleReport {
    pub rows: Vec<Row>,
    pub load_before: String,
    pub load_after: String,
}

/// The `p`-quantile (0..=1) of `v`, nearest rank.
pub fn quantile(v: &[Duration], p: f64) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort();
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Upstream flanneld: `explicit`, else `$FLANNEL_BENCH_UPSTREAM`, else
/// the `flanneld` of Debian's installed `flannel` package; `Err` says why
/// there is none.
pub fn find_upstream(explicit: Option<&Path>) -> std::result::Result<PathBuf, String> {
    let given = explicit.map(Path::to_path_buf).or_else(|| {
        std::env::var_os(UPSTREAM_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    if let Some(p) = given {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{} does not exist", p.display()))
        };
    }
    let status = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", UPSTREAM_PACKAGE])
        .stderr(Stdio::null())
        .output();
    let installed = status.as_ref().is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).ends_with("installed")
    });
    if !installed {
        return Err(format!("not installed (Debian package {UPSTREAM_PACKAGE})"));
    }
    let files = Command::new("dpkg-query")
        .args(["-L", UPSTREAM_PACKAGE])
        .output()
        .map_err(|e| format!("dpkg-query -L {UPSTREAM_PACKAGE}: {e}"))?;
    upstream_binary_in(&String::from_utf8_lossy(&files.stdout))
        .ok_or_else(|| format!("package {UPSTREAM_PACKAGE} is installed but ships no flanneld"))
}

/// The daemon among a package's file list (`dpkg -L`).
pub fn upstream_binary_in(files: &str) -> Option<PathBuf> {
    files
        .lines()
        .map(str::trim)
        .filter(|l| l.ends_with("/flanneld") || l.ends_with("/flannel"))
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// The `i`-th peer's lease: subnet 10.(i/256).(i%256).0/24, PublicIP in
/// eth0's subnet (never the node's or the peer namespace's address), a
/// VtepMAC of its own.
pub fn peer_lease(i: usize) -> Lease {
    let subnet =
        Ipv4Net::new(Ipv4Addr::new(10, (i >> 8) as u8, i as u8, 0), 24).expect("a /24 is valid");
    let host = i + 3;
    let public = Ipv4Addr::new(172, 20, (host >> 8) as u8, host as u8);
    let mac = MacAddr([
        0x02,
        0xfb,
        (i >> 24) as u8,
        (i >> 16) as u8,
        (i >> 8) as u8,
        i as u8,
    ]);
    Lease {
        key: LeaseKey {
            ipv4: Some(subnet),
            ipv6: None,
        },
        attrs: LeaseAttrs::new_vxlan(
            Some(public),
            Some(VxlanBackendData {
                vni: 1,
                vtep_mac: mac,
            }),
            None,
            None,
        ),
        expiration: None,
    }
}

/// The `r`-th event lease: from the top of the peers' range down, never one
/// of the N peers for N <= [`MAX_SIZE`].
pub fn event_lease(r: usize) -> Lease {
    peer_lease(65_279 - r)
}

/// The load average line of /proc/loadavg.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Runs every store and size; the report has a row for each.
pub fn run(opts: &ScaleOptions) -> Result<ScaleReport> {
    if !nix::unistd::geteuid().is_root() {
        return Err(LabError::NeedsRoot);
    }
    if let Some(n) = opts.sizes.iter().find(|n| **n == 0 || **n > MAX_SIZE) {
        return Err(LabError::InvalidOption {
            option: "--n",
            reason: format!("{n} peers: use 1..={MAX_SIZE}"),
        });
    }
    if opts.events + 1 > 65_280 - MAX_SIZE {
        return Err(LabError::InvalidOption {
            option: "--events",
            reason: format!("at most {}", 65_280 - MAX_SIZE - 1),
        });
    }
    let load_before = load_average();
    let mut rows = Vec::new();
    let mut run_no = 0;
    for &store in &opts.stores {
        for &n in &opts.sizes {
            let mut one = |daemon: Daemon| -> Result<Outcome> {
                run_no += 1;
                let tag = format!("fsb{}-{run_no}", std::process::id());
                if opts.progress {
                    eprintln!("bench scale: {store} N={n} {daemon:?} ...");
                }
                match measure(opts, store, n, daemon, &tag) {
                    Ok(m) => Ok(Outcome::Measured(m)),
                    Err(LabError::Interrupted) => Err(LabError::Interrupted),
                    Err(e) => Ok(Outcome::Failed(e.to_string())),
                }
            };
            let ours = one(Daemon::Ours)?;
            let upstream = match (&opts.upstream, store) {
                (Err(why), _) => Outcome::NotRun(why.clone()),
                (Ok(_), ScaleStore::Local) => Outcome::NotRun("upstream has no local store".into()),
                (Ok(_), ScaleStore::Etcd) => one(Daemon::Upstream)?,
            };
            rows.push(Row {
                store,
                n,
                ours,
                upstream,
            });
        }
    }
    Ok(ScaleReport {
        rows,
        load_before,
        load_after: load_average(),
    })
}

/// The namespaces, files and processes of one run, removed on drop
/// (processes first, by the pid we started).
struct Run {
    tag: String,
    dir: PathBuf,
    node: Option<NetNs>,
    peer_ns: Option<String>,
    children: Vec<Child>,
}

impl Drop for Run {
    fn drop(&mut self) {
        for c in &mut self.children {
            stop_child(c);
        }
        self.node = None;
        let _ = NetNs::delete(&format!("{}-n", self.tag));
        if let Some(p) = self.peer_ns.take() {
            let _ = NetNs::delete(&p);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// SIGTERM, then SIGKILL after 5 s; reaped.
fn stop_child(c: &mut Child) {
    if matches!(c.try_wait(), Ok(Some(_))) {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(c.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(c.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// The node and the peer namespace, joined by a veth pair.
fn build(tag: &str) -> Result<Run> {
    let dir = Path::new(BENCH_ROOT).join(tag);
    fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let mut run = Run {
        tag: tag.to_string(),
        dir,
        node: None,
        peer_ns: None,
        children: Vec::new(),
    };
    let node_name = format!("{tag}-n");
    let peer_name = format!("{tag}-p");
    let node = NetNs::add(&node_name).map_err(ns_err(format!("ip netns add {node_name}")))?;
    run.node = Some(node);
    let peer = NetNs::add(&peer_name).map_err(ns_err(format!("ip netns add {peer_name}")))?;
    run.peer_ns = Some(peer_name.clone());
    let node = run.node.as_ref().expect("set above");
    let mut nl = Netlink::open_in(node).map_err(nl_err(format!("netlink in {node_name}")))?;
    let eth = nl
        .add_veth("eth0", "eth0", peer.fd(), None)
        .map_err(nl_err("ip link add eth0 type veth peer name eth0"))?;
    let addr = |ip| IpNet::new(IpAddr::V4(ip), UNDERLAY_PREFIX).expect("valid prefix");
    nl.add_address(eth.index, addr(NODE_IP))
        .map_err(nl_err("ip addr add 172.20.0.1/16 dev eth0"))?;
    nl.set_link_up(eth.index)
        .map_err(nl_err("ip link set eth0 up"))?;
    let mut pnl = Netlink::open_in(&peer).map_err(nl_err(format!("netlink in {peer_name}")))?;
    let peth = pnl
        .link_by_name("eth0")
        .map_err(nl_err("ip link show eth0"))?
        .ok_or_else(|| LabError::BadState {
            path: peer_name.clone(),
            detail: "the veth's peer end is missing".into(),
        })?;
    pnl.add_address(peth.index, addr(PEER_NS_IP))
        .map_err(nl_err("ip addr add 172.20.0.2/16 dev eth0"))?;
    pnl.set_link_up(peth.index)
        .map_err(nl_err("ip link set eth0 up"))?;
    Ok(run)
}

/// What the kernel of the node holds on flannel.1.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    ifindex: u32,
    routes: usize,
    neighbours: usize,
    fdb: usize,
}

fn counts(nl: &mut Netlink) -> Result<Option<Counts>> {
    let Some(dev) = nl
        .link_by_name(DEVICE)
        .map_err(nl_err("ip link show flannel.1"))?
    else {
        return Ok(None);
    };
    let routes = nl
        .list_routes()
        .map_err(nl_err("ip route show"))?
        .iter()
        .filter(|r| r.oif == dev.index && r.gateway.is_some())
        .count();
    let neighbours = nl
        .list_neighbours(dev.index)
        .map_err(nl_err("ip neigh show dev flannel.1"))?
        .len();
    let fdb = nl
        .list_fdb(dev.index)
        .map_err(nl_err("bridge fdb show dev flannel.1"))?
        .len();
    Ok(Some(Counts {
        ifindex: dev.index,
        routes,
        neighbours,
        fdb,
    }))
}

/// Whether `subnet` is routed into flannel.1 now (`ip route get`).
fn routed(nl: &mut Netlink, ifindex: u32, subnet: Ipv4Net) -> bool {
    let probe = IpAddr::V4(Ipv4Addr::from(u32::from(subnet.network()) + 1));
    nl.get_route(probe).is_ok_and(|r| r.oif == ifindex)
}

/// Polls `f` (sleeping `pause` between tries) until it holds or `limit`
/// passes; the time it took, or `None`.
fn time_until(
    start: Instant,
    limit: Duration,
    pause: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<Option<Duration>> {
    loop {
        if f()? {
            return Ok(Some(start.elapsed()));
        }
        check_interrupted()?;
        if start.elapsed() > limit {
            return Ok(None);
        }
        std::thread::sleep(pause);
    }
}

/// VmRSS, VmHWM and RssAnon of `pid`, KiB.
fn memory(pid: u32) -> Result<(u64, u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).map_err(io_err(format!("reading {path}")))?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:"), field("RssAnon:")))
}

/// Samples of the steady resident set, and the pause between two.
const RSS_SAMPLES: usize = 11;
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// [`memory`] once the daemon is idle: after a settling second, the median
/// of [`RSS_SAMPLES`] readings over about a second (VmRSS and RssAnon each;
/// VmHWM from the last). One reading can land in the debounced full pass
/// that follows the repair, whose transient buffers are freed again a few
/// milliseconds later.
fn steady_memory(pid: u32) -> Result<(u64, u64, u64)> {
    std::thread::sleep(Duration::from_secs(1));
    let mut rss = Vec::with_capacity(RSS_SAMPLES);
    let mut anon = Vec::with_capacity(RSS_SAMPLES);
    let mut peak = 0;
    for i in 0..RSS_SAMPLES {
        if i > 0 {
            std::thread::sleep(RSS_SAMPLE_EVERY);
        }
        let (r, p, a) = memory(pid)?;
        rss.push(r);
        anon.push(a);
        peak = p;
    }
    Ok((median_kib(rss), peak, median_kib(anon)))
}

fn median_kib(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The store of a run, as the bench writes it.
enum Writer {
    Local(LocalStore),
    Etcd(EtcdStore),
}

impl Writer {
    async fn put(&self, leases: Vec<Lease>) -> std::result::Result<(), flannel_store::StoreError> {
        match self {
            Writer::Local(s) => s.import(leases, false).await,
            Writer::Etcd(s) => s.import(&leases).await,
        }
    }

    async fn remove(&self, key: &LeaseKey) -> std::result::Result<(), flannel_store::StoreError> {
        match self {
            // By hand, as an operator may (see the local store's docs):
            // the watch sees the file go.
            Writer::Local(s) => {
                let path = s.lease_path(key);
                fs::remove_file(&path).map_err(|e| flannel_store::StoreError::Io {
                    path: path.display().to_string(),
                    source: e,
                })
            }
            Writer::Etcd(s) => s.delete_lease(key).await,
        }
    }
}

fn store_err(what: &str) -> impl FnOnce(flannel_store::StoreError) -> LabError + '_ {
    move |e| LabError::Store {
        path: what.to_string(),
        source: e,
    }
}

/// One daemon, one store, one size: everything inside the node's
/// namespace, on one thread (etcd on 127.0.0.1 there, flanneld spawned
/// from there, the kernel polled there).
fn measure(
    opts: &ScaleOptions,
    store: ScaleStore,
    n: usize,
    daemon: Daemon,
    tag: &str,
) -> Result<Measurement> {
    let mut run = build(tag)?;
    let node = NetNs::open(&format!("{tag}-n")).map_err(ns_err("opening the node namespace"))?;
    let dir = run.dir.clone();
    let children = &mut run.children;
    node.run(|| measure_inside(opts, store, n, daemon, &dir, children))
        .map_err(ns_err("entering the node namespace"))?
}

fn measure_inside(
    opts: &ScaleOptions,
    store: ScaleStore,
    n: usize,
    daemon: Daemon,
    dir: &Path,
    children: &mut Vec<Child>,
) -> Result<Measurement> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("starting a runtime"))?;
    let conf = dir.join("net-conf.json");
    fs::write(&conf, NET_CONF).map_err(io_err(format!("writing {}", conf.display())))?;
    let log = dir.join("flanneld.log");
    let subnet_env = dir.join("subnet.env");
    let peers: Vec<Lease> = (0..n).map(peer_lease).collect();

    // The store, loaded with N peers before the daemon starts.
    let (writer, store_args): (Writer, Vec<String>) = match store {
        ScaleStore::Local => {
            let sdir = dir.join("store");
            let s =
                LocalStore::open(&sdir).map_err(store_err("opening the bench's local store"))?;
            rt.block_on(s.import(peers, true))
                .map_err(store_err("loading the peers"))?;
            let args = vec![
                "--local-store".into(),
                sdir.display().to_string(),
                "--net-config-path".into(),
                conf.display().to_string(),
            ];
            (Writer::Local(s), args)
        }
        ScaleStore::Etcd => {
            children.push(spawn_etcd(dir)?);
            let s = rt.block_on(connect_etcd())?;
            rt.block_on(s.put_network_config(NET_CONF))
                .map_err(store_err("etcd put config"))?;
            rt.block_on(s.import(&peers))
                .map_err(store_err("etcd: loading the peers"))?;
            (
                Writer::Etcd(s),
                vec![format!("--etcd-endpoints={ETCD_URL}")],
            )
        }
    };

    let mut nl = Netlink::open().map_err(nl_err("netlink in the node"))?;
    let bin = match daemon {
        Daemon::Ours => opts.bin_dir.join(super::FLANNELD_BINARY),
        Daemon::Upstream => opts
            .upstream
            .clone()
            .map_err(|why| LabError::InvalidOption {
                option: "upstream",
                reason: why,
            })?,
    };
    let logf = fs::File::create(&log).map_err(io_err(format!("creating {}", log.display())))?;
    let logf2 = logf.try_clone().map_err(io_err("duplicating the log"))?;
    let mut cmd = Command::new(&bin);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("FLANNELD_") || k == "RUST_LOG" {
            cmd.env_remove(&key);
        }
    }
    cmd.env("NO_COLOR", "1")
        .args(&store_args)
        .arg("--iface=eth0")
        .arg(format!("--subnet-file={}", subnet_env.display()))
        .arg("--ip-masq=false")
        .stdin(Stdio::null())
        .stdout(Stdio::from(logf))
        .stderr(Stdio::from(logf2));

    // Cold start.
    let start = Instant::now();
    let child = cmd
        .spawn()
        .map_err(io_err(format!("starting {}", bin.display())))?;
    let pid = child.id();
    children.push(child);
    let cold_limit = Duration::from_secs(60).max(Duration::from_millis(5 * n as u64));
    let mut pause = Duration::from_millis(5);
    let mut ifindex = 0;
    let cold = time_until(start, cold_limit, Duration::ZERO, || {
        if let Some(Ok(Some(st))) = children.last_mut().map(Child::try_wait) {
            return Err(daemon_died(st, &log));
        }
        // Poll at most as often as a dump takes, so the bench does not
        // starve the daemon of CPU.
        let t = Instant::now();
        let c = counts(&mut nl)?;
        pause = (t.elapsed() * 2).max(Duration::from_millis(2));
        std::thread::sleep(pause);
        Ok(match c {
            Some(c) => {
                ifindex = c.ifindex;
                c.routes >= n && c.neighbours >= n && c.fdb >= n
            }
            None => false,
        })
    })?
    .ok_or_else(|| not_converged(&mut nl, n, cold_limit, &log))?;
    // The poll slept after its last dump: count only until that dump.
    let cold = cold.saturating_sub(pause);

    // One-event latency: adds and removals of single leases.
    let mut add = Vec::with_capacity(opts.events);
    let mut del = Vec::with_capacity(opts.events);
    let tick = Duration::from_micros(200);
    for r in 0..opts.events {
        let l = event_lease(r);
        let subnet = l.key.ipv4.expect("IPv4 lease");
        let t = Instant::now();
        rt.block_on(writer.put(vec![l.clone()]))
            .map_err(store_err("writing an event lease"))?;
        let took = time_until(t, EVENT_TIMEOUT, tick, || {
            Ok(routed(&mut nl, ifindex, subnet))
        })?
        .ok_or_else(|| event_lost("added", &l.key, &log))?;
        add.push(took);
        let t = Instant::now();
        rt.block_on(writer.remove(&l.key))
            .map_err(store_err("removing an event lease"))?;
        let took = time_until(t, EVENT_TIMEOUT, tick, || {
            Ok(!routed(&mut nl, ifindex, subnet))
        })?
        .ok_or_else(|| event_lost("removed", &l.key, &log))?;
        del.push(took);
        std::thread::sleep(Duration::from_millis(10));
    }

    // Repair: delete some routes, time until all are back.
    let k = opts.repair.min(n);
    // Above flanneld's nexthop threshold the routes name nexthop objects,
    // and a delete that names a gateway does not match those: delete by id.
    let victims: Vec<(Route, Option<u32>)> = nl
        .list_route_entries()
        .map_err(nl_err("ip route show"))?
        .into_iter()
        .filter(|e| e.route.oif == ifindex && e.route.gateway.is_some())
        .take(k)
        .map(|e| (e.route, e.nhid))
        .collect();
    for (r, nhid) in &victims {
        match nhid {
            Some(id) => nl.del_route_nhid(r.dst, *id),
            None => nl.del_route(r),
        }
        .map_err(nl_err("ip route del"))?;
    }
    let victims: Vec<Route> = victims.into_iter().map(|(r, _)| r).collect();
    let t = Instant::now();
    let repaired = time_until(t, REPAIR_TIMEOUT, Duration::from_millis(5), || {
        Ok(victims
            .iter()
            .all(|r| r.dst.addr().is_ipv4() && routed_net(&mut nl, ifindex, r.dst)))
    })?;

    let (rss_kib, peak_kib, anon_kib) = steady_memory(pid)?;
    Ok(Measurement {
        cold,
        add,
        del,
        repair: (victims.len(), repaired),
        rss_kib,
        peak_kib,
        anon_kib,
    })
}

fn routed_net(nl: &mut Netlink, ifindex: u32, dst: IpNet) -> bool {
    match dst {
        IpNet::V4(v4) => routed(nl, ifindex, v4),
        IpNet::V6(_) => false,
    }
}

fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

fn daemon_died(st: std::process::ExitStatus, log: &Path) -> LabError {
    LabError::BadState {
        path: log.display().to_string(),
        detail: format!("flanneld exited ({st}); last lines:\n{}", log_tail(log)),
    }
}

fn not_converged(nl: &mut Netlink, n: usize, limit: Duration, log: &Path) -> LabError {
    let have = counts(nl).ok().flatten().unwrap_or_default();
    LabError::Timeout {
        what: format!(
            "flannel.1 to hold {n} routes, neighbours and FDB entries (has {}, {}, {}); last lines of {}:\n{}",
            have.routes,
            have.neighbours,
            have.fdb,
            log.display(),
            log_tail(log)
        ),
        secs: limit.as_secs_f64(),
    }
}

fn event_lost(what: &str, key: &LeaseKey, log: &Path) -> LabError {
    LabError::Timeout {
        what: format!(
            "the route of lease {key} to be {what} in the kernel; last lines of {}:\n{}",
            log.display(),
            log_tail(log)
        ),
        secs: EVENT_TIMEOUT.as_secs_f64(),
    }
}

/// Debian's etcd on 127.0.0.1 of the calling thread's namespace, data in
/// `dir/etcd`.
fn spawn_etcd(dir: &Path) -> Result<Child> {
    let binary = super::etcd_binary()?;
    let data = dir.join("etcd");
    let logp = dir.join("etcd.log");
    let log = fs::File::create(&logp).map_err(io_err(format!("creating {}", logp.display())))?;
    let log2 = log
        .try_clone()
        .map_err(io_err("duplicating the etcd log"))?;
    let mut cmd = Command::new(&binary);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ETCD_") {
            cmd.env_remove(key);
        }
    }
    cmd.args([
        "--name=bench",
        "--listen-client-urls=http://127.0.0.1:2379",
        "--advertise-client-urls=http://127.0.0.1:2379",
        "--listen-peer-urls=http://127.0.0.1:2380",
        "--initial-advertise-peer-urls=http://127.0.0.1:2380",
        "--initial-cluster=bench=http://127.0.0.1:2380",
        "--listen-metrics-urls=http://127.0.0.1:2381",
    ])
    .arg(format!("--data-dir={}", data.display()))
    .stdin(Stdio::null())
    .stdout(Stdio::from(log))
    .stderr(Stdio::from(log2))
    .spawn()
    .map_err(io_err(format!("starting {}", binary.display())))
}

async fn connect_etcd() -> Result<EtcdStore> {
    let opts = EtcdOptions {
        endpoints: vec![ETCD_URL.to_string()],
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
        ..EtcdOptions::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match EtcdStore::connect(opts.clone()).await {
            Ok(s) if s.list_leases().await.is_ok() => return Ok(s),
            Ok(_) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok(_) => {
                return Err(LabError::Etcd {
                    endpoint: ETCD_URL.into(),
                    detail: "answers connections but not reads".into(),
                })
            }
            Err(e) => {
                return Err(LabError::Etcd {
                    endpoint: ETCD_URL.into(),
                    detail: e.to_string(),
                })
            }
        }
    }
}

impl Measurement {
    fn p(&self, v: &[Duration], q: f64) -> f64 {
        quantile(v, q).map_or(f64::NAN, ms)
    }
}

impl ScaleReport {
    /// Whether every run of our daemon was measured.
    pub fn ours_ok(&self) -> bool {
        self.rows
            .iter()
            .all(|r| matches!(r.ours, Outcome::Measured(_)))
    }

    /// The table, the ratios and the goals' verdicts.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "flannelctl bench scale: one vxlan node, N peer leases; load average {} before, {} after",
            self.load_before, self.load_after
        );
        let _ = writeln!(
            out,
            "{:<6} {:>6}  {:<14} {:>8}  {:>15}  {:>15}  {:>14}  {:>9}  {:>8}  {:>8}",
            "store",
            "N",
            "flanneld",
            "cold s",
            "add p50/p99 ms",
            "del p50/p99 ms",
            "repair",
            "RSS MiB",
            "peak MiB",
            "anon MiB"
        );
        for r in &self.rows {
            for (who, o) in [("ours", &r.ours), ("upstream", &r.upstream)] {
                let _ = write!(out, "{:<6} {:>6}  {:<14} ", r.store, r.n, who);
                match o {
                    Outcome::Measured(m) => {
                        let repair = match m.repair {
                            (k, Some(d)) => format!("{k} in {:.2} s", d.as_secs_f64()),
                            (k, None) => format!("{k}: none {}s", REPAIR_TIMEOUT.as_secs()),
                        };
                        let _ = writeln!(
                            out,
                            "{:>8.3}  {:>15}  {:>15}  {:>14}  {:>9.1}  {:>8.1}  {:>8.1}",
                            m.cold.as_secs_f64(),
                            format!("{:.1}/{:.1}", m.p(&m.add, 0.5), m.p(&m.add, 0.99)),
                            format!("{:.1}/{:.1}", m.p(&m.del, 0.5), m.p(&m.del, 0.99)),
                            repair,
                            mib(m.rss_kib),
                            mib(m.peak_kib),
                            mib(m.anon_kib)
                        );
                    }
                    Outcome::NotRun(why) => {
                        let _ = writeln!(out, "n/a: {why}");
                    }
                    Outcome::Failed(why) => {
                        let _ = writeln!(out, "FAILED: {why}");
                    }
                }
            }
            if let (Outcome::Measured(a), Outcome::Measured(b)) = (&r.ours, &r.upstream) {
                let ratio = |x: f64, y: f64| {
                    if y > 0.0 {
                        format!("{:.2}", x / y)
                    } else {
                        "-".into()
                    }
                };
                let repair = match (a.repair.1, b.repair.1) {
                    (Some(x), Some(y)) => ratio(x.as_secs_f64(), y.as_secs_f64()),
                    (Some(_), None) => "upstream none".into(),
                    _ => "-".into(),
                };
                let _ = writeln!(
                    out,
                    "{:<6} {:>6}  {:<14} {:>8}  {:>15}  {:>15}  {:>14}  {:>9}  {:>8}  {:>8}",
                    r.store,
                    r.n,
                    "ours/upstream",
                    ratio(a.cold.as_secs_f64(), b.cold.as_secs_f64()),
                    ratio(a.p(&a.add, 0.5), b.p(&b.add, 0.5)),
                    ratio(a.p(&a.del, 0.5), b.p(&b.del, 0.5)),
                    repair,
                    ratio(a.rss_kib as f64, b.rss_kib as f64),
                    ratio(a.peak_kib as f64, b.peak_kib as f64),
                    ratio(a.anon_kib as f64, b.anon_kib as f64)
                );
            }
        }
        let _ = writeln!(out, "goals (ours):");
        for line in self.verdicts() {
            let _ = writeln!(out, "  {line}");
        }
        out
    }

    /// One line per goal that applies to a measured row: "met" or "MISSED".
    pub fn verdicts(&self) -> Vec<String> {
        let mut v = Vec::new();
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        for r in &self.rows {
            let Outcome::Measured(m) = &r.ours else {
                if let Outcome::Failed(_) = &r.ours {
                    v.push(format!("{} N={}: FAILED (see above)", r.store, r.n));
                }
                continue;
            };
            for (n, secs) in COLD_GOALS {
                if r.n == n {
                    let got = m.cold.as_secs_f64();
                    v.push(format!(
                        "{} N={n}: cold start <= {secs} s: {} ({got:.3} s)",
                        r.store,
                        verdict(got <= secs)
                    ));
                }
            }
            let (a, d) = (m.p(&m.add, 0.5), m.p(&m.del, 0.5));
            if !m.add.is_empty() {
                v.push(format!(
                    "{} N={}: one event -> kernel <= {EVENT_GOAL_MS} ms (p50): {} (add {a:.1} ms, removal {d:.1} ms)",
                    r.store,
                    r.n,
                    verdict(a <= EVENT_GOAL_MS && d <= EVENT_GOAL_MS)
                ));
            }
            for (n, limit) in RSS_GOALS {
                if r.n == n {
                    let got = mib(m.rss_kib);
                    v.push(format!(
                        "{} N={n}: RSS <= {limit} MiB: {} ({got:.1} MiB, peak {:.1})",
                        r.store,
                        verdict(got <= limit),
                        mib(m.peak_kib)
                    ));
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(quantile(&v, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(quantile(&v[..1], 0.99), Some(Duration::from_millis(1)));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn peer_and_event_leases_never_collide_and_stay_in_range() {
        let peers: std::collections::BTreeSet<LeaseKey> =
            (0..MAX_SIZE).map(|i| peer_lease(i).key).collect();
        assert_eq!(peers.len(), MAX_SIZE);
        for r in 0..(65_280 - MAX_SIZE - 1) {
            assert!(!peers.contains(&event_lease(r).key), "{r}");
        }
        let net: Ipv4Net = "10.0.0.0/8".parse().unwrap();
        let own: Ipv4Net = "10.255.0.0/16".parse().unwrap();
        for i in [0, 1, 255, 256, MAX_SIZE - 1] {
            let l = peer_lease(i);
            let s = l.key.ipv4.unwrap();
            assert!(net.contains(&s) && !own.contains(&s), "{s}");
            let ip = l.attrs.public_ip.unwrap();
            assert!(ip != NODE_IP && ip != PEER_NS_IP, "{ip}");
            assert!(Ipv4Net::new(NODE_IP, UNDERLAY_PREFIX)
                .unwrap()
                .contains(&ip));
        }
        assert_ne!(
            peer_lease(1).attrs.vxlan_data(),
            peer_lease(2).attrs.vxlan_data()
        );
    }

    #[test]
    fn upstream_binary_from_the_package_file_list() {
        let dir = std::env::temp_dir().join(format!("fsb-test-{}", std::process::id()));
        fs::create_dir_all(dir.join("usr/bin")).unwrap();
        let bin = dir.join("usr/bin/flanneld");
        fs::write(&bin, "").unwrap();
        let list = format!(
            "/.\n/usr\n/usr/share/doc/flannel/README\n{}\n",
            bin.display()
        );
        assert_eq!(upstream_binary_in(&list), Some(bin.clone()));
        assert_eq!(upstream_binary_in("/usr/share/doc/flannel/README\n"), None);
        let e = find_upstream(Some(&dir.join("nope"))).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        assert_eq!(find_upstream(Some(&bin)).unwrap(), bin);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn verdicts_judge_each_goal_at_its_size() {
        let m = |cold_ms: u64, ev_ms: u64, rss_mib: u64| {
            Outcome::Measured(Measurement {
                cold: Duration::from_millis(cold_ms),
                add: vec![Duration::from_millis(ev_ms); 3],
                del: vec![Duration::from_millis(ev_ms); 3],
                repair: (10, Some(Duration::from_millis(300))),
                rss_kib: rss_mib * 1024,
                peak_kib: rss_mib * 1024,
                anon_kib: rss_mib * 512,
            })
        };
        let report = ScaleReport {
            rows: vec![
                Row {
                    store: ScaleStore::Local,
                    n: 5_000,
                    ours: m(400, 3, 18),
                    upstream: Outcome::NotRun("not installed".into()),
                },
                Row {
                    store: ScaleStore::Etcd,
                    n: 20_000,
                    ours: m(2_500, 30, 39),
                    upstream: m(5_000, 60, 80),
                },
            ],
            load_before: "1 1 1".into(),
            load_after: "1 1 1".into(),
        };
        let v = report.verdicts();
        assert!(
            v.iter()
                .any(|l| l.starts_with("local N=5000: cold start <= 0.5 s: met")),
            "{v:?}"
        );
        assert!(
            v.iter()
                .any(|l| l.starts_with("etcd N=20000: cold start <= 2 s: MISSED")),
            "{v:?}"
        );
        assert!(v
            .iter()
            .any(|l| l.starts_with("etcd N=20000: one event -> kernel <= 10 ms (p50): MISSED")));
        assert!(v
            .iter()
            .any(|l| l.starts_with("etcd N=20000: RSS <= 40 MiB: met")));
        let text = report.render();
        assert!(text.contains("ours/upstream"), "{text}");
        assert!(text.contains("n/a: not installed"), "{text}");
        assert!(report.ours_ok());
    }
}
