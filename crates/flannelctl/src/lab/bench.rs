//! `flannelctl bench`: throughput and latency of each datapath against the
//! underlay, in one run, on a two-worker lab.
//!
//! One fresh lab per backend (pods get the backend's MTU, as in a real
//! cluster). In each lab the bench measures, side by side:
//! - `underlay`: k8s-node1's ens3 to k8s-node2's ens3, the lab's "wire";
//! - `pod-pod`: ubuntu-1 to ubuntu-2, the path the targets are about;
//! - `node-node` (vxlan, udp, wireguard): k8s-node1 to k8s-node2's overlay
//!   address (`flannel.1` / `flannel0` / `flannel-wg`): the backend's encapsulation without the
//!   pods' veth and cni0 bridge, which tells the two costs apart.
//!
//! Throughput is TCP with one stream and with four (Debian's `iperf3` when
//! installed, else a TCP sender/receiver of our own); latency is a UDP
//! request/response ping-pong written here (p50, p99). The machine is
//! shared and a single run is noisy, so the throughput runs go in rounds:
//! each round measures every path of the lab back to back, and a path's
//! ratio is the median over rounds of its throughput divided by the same
//! round's underlay. A target is judged on that median's confidence
//! interval, never on the median alone: with the noise of this kind of
//! machine a median of a few rounds is several percent off, which is the
//! size of the margins the targets ask about. A backend that cannot run
//! (flanneld refuses it) is reported as "not available" with the daemon's
//! reason: no number is ever made up.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flannel_netlink::netns::NetNs;

use super::{io_err, ns_err, Backend, Lab, LabError, LabOptions, Result};

/// How long each throughput measurement runs.
pub const DEFAULT_SECONDS: u64 = 2;
/// How many rounds of throughput measurements each lab gets (medians are
/// reported: the machine is shared, single runs are noisy). Nine is the
/// fewest for which the median's 95% interval is narrower than the range
/// of the samples (the 2nd to the 8th).
pub const DEFAULT_REPEAT: u32 = 9;
/// The confidence the intervals of the ratios aim at.
pub const CONFIDENCE: f64 = 0.95;
/// The backends a bench measures by default, in this order.
pub const ALL_BACKENDS: [Backend; 4] = [
    Backend::Vxlan,
    Backend::HostGw,
    Backend::Udp,
    Backend::Wireguard,
];

/// The targets: pod-to-pod single-stream throughput of `.0` relative to `.1`
/// (`underlay`: the same lab's underlay), at least `.2`.
pub const TARGETS: [(Backend, Option<Backend>, f64); 4] = [
    (Backend::HostGw, None, 0.95),
    (Backend::Vxlan, None, 0.85),
    (Backend::Udp, Some(Backend::Vxlan), 0.5),
    (Backend::Wireguard, Some(Backend::Vxlan), 0.5),
];

/// One path's measurements: a throughput sample per round, and latency.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    /// Bits per second with one stream, one per round.
    pub bps_1: Vec<f64>,
    /// Bits per second with four streams, one per round.
    pub bps_4: Vec<f64>,
    pub rr_p50: Duration,
    pub rr_p99: Duration,
}

/// The median of `v` (the upper one of an even count); NaN when empty.
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The median over rounds of `a[i] / b[i]`: each sample against the one
/// measured right next to it, so that the machine's drift between rounds
/// (other work, CPU frequency, the hypervisor) cancels out.
pub fn paired_ratio(a: &[f64], b: &[f64]) -> f64 {
    median(&round_ratios(a, b))
}

/// `a[i] / b[i]` for every round both have.
fn round_ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(a, b)| a / b).collect()
}

/// A distribution-free confidence interval of a median (the sign test's):
/// the `k`-th smallest and `k`-th largest sample, with `k` as large as the
/// binomial distribution allows for [`CONFIDENCE`]; `coverage` is the
/// confidence actually reached (with five samples or fewer the interval is
/// the whole range and the coverage is below 95%: 93.75% with five).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub lo: f64,
    pub hi: f64,
    pub coverage: f64,
}

impl Interval {
    /// The interval of `a / b` from intervals of `a` and `b` (both
    /// positive): the extremes of the quotient, at the Bonferroni bound of
    /// the two coverages.
    fn quotient(self, b: Interval) -> Interval {
        Interval {
            lo: self.lo / b.hi,
            hi: self.hi / b.lo,
            coverage: (self.coverage + b.coverage - 1.0).max(0.0),
        }
    }
}

/// `P(X <= j)` for `X ~ Binomial(n, 1/2)`, for `j` in `0..=n`.
fn binomial_half_cdf(n: usize) -> Vec<f64> {
    // ln C(n, j) grows term by term; 2^-n is applied in the log domain so
    // that large `n` neither overflows nor underflows.
    let ln_half_n = n as f64 * 0.5f64.ln();
    let mut ln_c = 0.0f64;
    let mut acc = 0.0;
    (0..=n)
        .map(|j| {
            if j > 0 {
                ln_c += ((n - j + 1) as f64).ln() - (j as f64).ln();
            }
            acc += (ln_c + ln_half_n).exp();
            acc
        })
        .collect()
}

/// The sign test's interval of the median of `v`; `None` when empty.
pub fn median_interval(v: &[f64]) -> Option<Interval> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let cdf = binomial_half_cdf(n);
    let tail = (1.0 - CONFIDENCE) / 2.0;
    // The interval [x(k), x(n+1-k)] (1-based) misses the median with
    // probability 2 P(X <= k-1); the largest k that keeps this <= 1-CONF.
    let k = (1..=n.div_ceil(2))
        .take_while(|&k| cdf[k - 1] <= tail)
        .last()
        .unwrap_or(1);
    Some(Interval {
        lo: v[k - 1],
        hi: v[n - k],
        coverage: 1.0 - 2.0 * cdf[k - 1],
    })
}

/// What a ratio's interval says of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The whole interval is at or above the target.
    Met,
    /// The whole interval is below the target.
    Missed,
    /// The interval holds the target: the noise of this run cannot tell.
    Undecided,
}

impl Verdict {
    pub fn of(interval: Interval, target: f64) -> Verdict {
        if interval.lo >= target {
            Verdict::Met
        } else if interval.hi < target {
            Verdict::Missed
        } else {
            Verdict::Undecided
        }
    }
}

/// What one path gave.
#[derive(Debug, Clone)]
pub struct PathResult {
    /// `underlay`, `pod-pod`, `node-node`.
    pub name: &'static str,
    /// `k8s-node1/ens3 -> k8s-node2/ens3`, `ubuntu-1 -> ubuntu-2`.
    pub between: String,
    pub samples: Samples,
}

/// What one backend's lab gave: its paths (the underlay first), or why the
/// backend could not be measured.
#[derive(Debug, Clone)]
pub struct LabResult {
    pub backend: Backend,
    pub outcome: std::result::Result<Vec<PathResult>, String>,
}

impl LabResult {
    fn path(&self, name: &str) -> Option<&PathResult> {
        self.outcome.as_ref().ok()?.iter().find(|p| p.name == name)
    }

    /// Single-stream throughput of `path` relative to this lab's underlay
    /// (the median of the per-round ratios).
    pub fn ratio(&self, path: &str) -> Option<f64> {
        let base = self.path("underlay")?;
        Some(paired_ratio(
            &self.path(path)?.samples.bps_1,
            &base.samples.bps_1,
        ))
    }

    /// The interval of the median of `path`'s per-round single-stream
    /// ratios to the underlay.
    pub fn ratio_interval(&self, path: &str) -> Option<Interval> {
        let base = &self.path("underlay")?.samples.bps_1;
        median_interval(&round_ratios(&self.path(path)?.samples.bps_1, base))
    }
}

/// The report of a bench run.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// `iperf3 3.12` or `built-in TCP streams`.
    pub tool: String,
    pub seconds: u64,
    pub repeat: u32,
    pub labs: Vec<LabResult>,
}

fn gbit(bps: f64) -> String {
    format!("{:.2} Gbit/s", bps / 1e9)
}

impl BenchReport {
    fn lab(&self, backend: Backend) -> Option<&LabResult> {
        self.labs.iter().find(|l| l.backend == backend)
    }

    /// Pod-to-pod single-stream throughput of `backend` relative to its own
    /// lab's underlay, or (with `base`) to `base`'s pod-to-pod path: the
    /// quotient of the two underlay-relative ratios, so that each backend is
    /// held against the underlay measured next to it.
    pub fn ratio(&self, backend: Backend, base: Option<Backend>) -> Option<f64> {
        let r = self.lab(backend)?.ratio("pod-pod")?;
        match base {
            None => Some(r),
            Some(b) => Some(r / self.lab(b)?.ratio("pod-pod")?),
        }
    }

    /// The interval of [`BenchReport::ratio`].
    pub fn interval(&self, backend: Backend, base: Option<Backend>) -> Option<Interval> {
        let r = self.lab(backend)?.ratio_interval("pod-pod")?;
        match base {
            None => Some(r),
            Some(b) => Some(r.quotient(self.lab(b)?.ratio_interval("pod-pod")?)),
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "TCP throughput ({}; {} rounds of {} s per path, medians; ratio: median over rounds against the \
             same round's underlay) and UDP request/response latency",
            self.tool, self.repeat, self.seconds
        );
        let _ = writeln!(
            out,
            "{:<8} {:<10} {:<34} {:>14} {:>6} {:>14} {:>6} {:>10} {:>10} {:>6}",
            "lab",
            "path",
            "between",
            "1 stream",
            "ratio",
            "4 streams",
            "ratio",
            "rr p50",
            "rr p99",
            "p50 x"
        );
        for lab in &self.labs {
            let paths = match &lab.outcome {
                Ok(paths) => paths,
                Err(why) => {
                    let _ = writeln!(
                        out,
                        "{:<8} {:<10} not available: {why}",
                        lab.backend.to_string(),
                        "pod-pod"
                    );
                    continue;
                }
            };
            let base = paths.iter().find(|p| p.name == "underlay");
            for p in paths {
                let s = &p.samples;
                let r = |v: &[f64], b: Option<&[f64]>| {
                    b.map(|b| format!("{:.2}", paired_ratio(v, b)))
                        .unwrap_or_else(|| "-".into())
                };
                let _ = writeln!(
                    out,
                    "{:<8} {:<10} {:<34} {:>14} {:>6} {:>14} {:>6} {:>8.0}us {:>8.0}us {:>6}",
                    lab.backend.to_string(),
                    p.name,
                    p.between,
                    gbit(median(&s.bps_1)),
                    r(&s.bps_1, base.map(|b| &b.samples.bps_1[..])),
                    gbit(median(&s.bps_4)),
                    r(&s.bps_4, base.map(|b| &b.samples.bps_4[..])),
                    s.rr_p50.as_secs_f64() * 1e6,
                    s.rr_p99.as_secs_f64() * 1e6,
                    base.map(|b| format!(
                        "{:.2}",
                        s.rr_p50.as_secs_f64() / b.samples.rr_p50.as_secs_f64()
                    ))
                    .unwrap_or_else(|| "-".into()),
                );
            }
        }
        let _ = writeln!(
            out,
            "targets (pod-to-pod, single stream; the interval is the median's distribution-free \
             confidence interval over the rounds, and decides):"
        );
        for (backend, base, target) in TARGETS {
            let base_name = base.map_or("underlay".to_string(), |b| b.to_string());
            let line = match (self.ratio(backend, base), self.interval(backend, base)) {
                (Some(r), Some(i)) => format!(
                    "{backend} / {base_name} = {r:.3}, {:.0}% interval {:.3}..{:.3} (target >= {target}): {}",
                    i.coverage * 100.0,
                    i.lo,
                    i.hi,
                    match Verdict::of(i, target) {
                        Verdict::Met => "met",
                        Verdict::Missed => "MISSED",
                        Verdict::Undecided =>
                            "UNDECIDED (the interval holds the target; more --repeat narrows it)",
                    }
                ),
                _ => format!("{backend} / {base_name}: not measured (target >= {target})"),
            };
            let _ = writeln!(out, "  {line}");
        }
        out
    }
}

/// `iperf3 --version`'s first line, when iperf3 is installed.
fn iperf3_version() -> Option<String> {
    let out = Command::new("iperf3").arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

/// Runs the bench: for each of `backends`, a two-worker lab named `name`,
/// its paths, `down`.
pub fn run(
    name: &str,
    bin_dir: Option<&Path>,
    backends: &[Backend],
    seconds: u64,
    repeat: u32,
    progress: bool,
) -> Result<BenchReport> {
    if seconds == 0 || repeat == 0 {
        return Err(LabError::InvalidOption {
            option: "--seconds/--repeat",
            reason: "both must be at least 1".into(),
        });
    }
    let say = |m: &str| {
        if progress {
            eprintln!("bench: {m}");
        }
    };
    let tool = iperf3_version();
    let how = How {
        iperf3: tool.is_some(),
        seconds,
        repeat,
    };
    let mut labs = Vec::new();
    for &backend in backends {
        let opts = LabOptions {
            name: name.to_string(),
            nodes: 2,
            bin_dir: bin_dir.map(Path::to_path_buf),
            backend,
            ..LabOptions::default()
        };
        say(&format!("lab up ({backend}, 2 workers)"));
        let lab = match Lab::up(&opts) {
            Ok(lab) => lab,
            // `up` removed what it built; an interrupt ends the bench.
            Err(LabError::Interrupted) => return Err(LabError::Interrupted),
            Err(e) => {
                labs.push(LabResult {
                    backend,
                    outcome: Err(unavailable_reason(e)),
                });
                continue;
            }
        };
        let result = measure_lab(&lab, backend, how, &say);
        let down = super::down(name);
        labs.push(LabResult {
            backend,
            outcome: result?,
        });
        down?;
    }
    Ok(BenchReport {
        tool: tool.unwrap_or_else(|| "built-in TCP streams (iperf3 not installed)".into()),
        seconds,
        repeat,
        labs,
    })
}

/// How to measure.
#[derive(Debug, Clone, Copy)]
struct How {
    iperf3: bool,
    seconds: u64,
    repeat: u32,
}

/// One path of a lab: from `src` to `dst` in `dst_ns`.
struct Route {
    name: &'static str,
    between: String,
    src: NetNs,
    dst_ns: NetNs,
    dst: IpAddr,
}

/// The paths of one lab (the underlay first), measured in rounds; or why
/// the pods do not reach each other.
fn measure_lab(
    lab: &Lab,
    backend: Backend,
    how: How,
    say: &dyn Fn(&str),
) -> Result<std::result::Result<Vec<PathResult>, String>> {
    let m = lab.check()?;
    if !m.all_ok() {
        return Ok(Err(format!(
            "the connectivity check failed:\n{}",
            m.render()
        )));
    }
    let n2 = lab.node("k8s-node2")?.clone();
    let pod2 = lab.pod("ubuntu-2")?.ip.expect("pod has an IPv4 address");
    let mut routes = vec![
        Route {
            name: "underlay",
            between: "k8s-node1/ens3 -> k8s-node2/ens3".into(),
            src: lab.netns("k8s-node1")?,
            dst_ns: lab.netns("k8s-node2")?,
            dst: IpAddr::V4(n2.underlay_ip),
        },
        Route {
            name: "pod-pod",
            between: "ubuntu-1 -> ubuntu-2".into(),
            src: lab.netns("ubuntu-1")?,
            dst_ns: lab.netns("ubuntu-2")?,
            dst: IpAddr::V4(pod2.addr()),
        },
    ];
    // The overlay device of a node holds the subnet's network address.
    if let Some(dev) = backend.overlay_device() {
        routes.push(Route {
            name: "node-node",
            between: format!("k8s-node1 -> k8s-node2/{dev}"),
            src: lab.netns("k8s-node1")?,
            dst_ns: lab.netns("k8s-node2")?,
            dst: IpAddr::V4(n2.subnet.network()),
        });
    }
    let mut samples = vec![Samples::default(); routes.len()];
    for (r, s) in routes.iter().zip(samples.iter_mut()) {
        super::check_interrupted()?;
        say(&format!("{backend} lab: {} latency", r.name));
        (s.rr_p50, s.rr_p99) = udp_rr(&r.src, &r.dst_ns, r.dst, Duration::from_secs(2))?;
    }
    for round in 1..=how.repeat {
        say(&format!(
            "{backend} lab: throughput round {round}/{}",
            how.repeat
        ));
        for (r, s) in routes.iter().zip(samples.iter_mut()) {
            super::check_interrupted()?;
            s.bps_1.push(throughput(r, 1, how)?);
        }
        for (r, s) in routes.iter().zip(samples.iter_mut()) {
            super::check_interrupted()?;
            s.bps_4.push(throughput(r, 4, how)?);
        }
    }
    Ok(Ok(routes
        .into_iter()
        .zip(samples)
        .map(|(r, samples)| PathResult {
            name: r.name,
            between: r.between,
            samples,
        })
        .collect()))
}

/// Why a backend is not available: the daemon's own last words when it
/// died, else the error.
fn unavailable_reason(e: LabError) -> String {
    match e {
        LabError::DaemonDied { tail, .. } => tail
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("flanneld exited")
            .trim()
            .to_string(),
        e => e.to_string(),
    }
}

/// One TCP throughput measurement of `r` with `streams` streams.
fn throughput(r: &Route, streams: u32, how: How) -> Result<f64> {
    if how.iperf3 {
        iperf3(&r.src, &r.dst_ns, r.dst, streams, how.seconds)
    } else {
        tcp_streams(
            &r.src,
            &r.dst_ns,
            r.dst,
            streams,
            Duration::from_secs(how.seconds),
        )
    }
}

/// `iperf3 -s -1 -B DST` in `dst_ns`, `iperf3 -c DST -t SECS -O 1 -P STREAMS -J`
/// in `src` (the first second, TCP's slow start, omitted); the receiver's
/// bits per second. The client is retried while
/// the server is not listening yet; the server is killed by its pid if it
/// is still there afterwards.
fn iperf3(src: &NetNs, dst_ns: &NetNs, dst: IpAddr, streams: u32, seconds: u64) -> Result<f64> {
    let mut server = dst_ns
        .run(|| {
            Command::new("iperf3")
                .args(["-s", "-1", "-B", &dst.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        })
        .map_err(ns_err(format!("entering {}", dst_ns.name)))?
        .map_err(io_err("starting iperf3 -s"))?;
    let result = (|| -> Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = src
                .run(|| {
                    Command::new("iperf3")
                        .args([
                            "-c",
                            &dst.to_string(),
                            "-t",
                            &seconds.to_string(),
                            "-O",
                            "1",
                            "-P",
                            &streams.to_string(),
                            "-J",
                        ])
                        .output()
                })
                .map_err(ns_err(format!("entering {}", src.name)))?
                .map_err(io_err("running iperf3 -c"))?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
                return Ok(bps);
            }
            let err = v["error"].as_str().unwrap_or("no JSON result").to_string();
            if Instant::now() >= deadline {
                return Err(LabError::Io {
                    context: format!("iperf3 -c {dst}"),
                    source: std::io::Error::other(err),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })();
    // The server exits after one test (-1); make sure, then reap it.
    if !matches!(server.try_wait(), Ok(Some(_))) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && !matches!(server.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !matches!(server.try_wait(), Ok(Some(_))) {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
    result
}

/// Our own TCP throughput: `streams` connections from `src` to a listener
/// in `dst_ns`, each sending 128 KiB writes for `dur`; the bytes received
/// per second, in bits.
fn tcp_streams(
    src: &NetNs,
    dst_ns: &NetNs,
    dst: IpAddr,
    streams: u32,
    dur: Duration,
) -> Result<f64> {
    let listener = dst_ns
        .run(|| TcpListener::bind(SocketAddr::new(dst, 0)))
        .map_err(ns_err(format!("entering {}", dst_ns.name)))?
        .map_err(io_err(format!("listening on {dst}")))?;
    let addr = listener.local_addr().map_err(io_err("listener address"))?;
    let mut conns = Vec::new();
    for _ in 0..streams {
        let c = src
            .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
            .map_err(ns_err(format!("entering {}", src.name)))?
            .map_err(io_err(format!("connecting to {addr}")))?;
        conns.push(c);
    }
    let mut accepted = Vec::new();
    for _ in 0..streams {
        accepted.push(listener.accept().map_err(io_err("accepting"))?.0);
    }
    let received = std::thread::scope(|s| {
        for mut c in conns {
            s.spawn(move || {
                let buf = vec![0x5au8; 128 * 1024];
                let end = Instant::now() + dur;
                while Instant::now() < end {
                    if c.write_all(&buf).is_err() {
                        break;
                    }
                }
            });
        }
        let readers: Vec<_> = accepted
            .into_iter()
            .map(|mut c| {
                s.spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut total = 0u64;
                    let end = Instant::now() + dur;
                    while Instant::now() < end {
                        match c.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => total += n as u64,
                            Err(_) => {}
                        }
                    }
                    total
                })
            })
            .collect();
        readers
            .into_iter()
            .map(|h| h.join().unwrap_or(0))
            .sum::<u64>()
    });
    Ok(received as f64 * 8.0 / dur.as_secs_f64())
}

/// UDP request/response: 64-byte datagrams sent one at a time from `src`
/// and echoed by a socket in `dst_ns`, for `dur`; p50 and p99 round trips.
fn udp_rr(src: &NetNs, dst_ns: &NetNs, dst: IpAddr, dur: Duration) -> Result<(Duration, Duration)> {
    let server = dst_ns
        .run(|| UdpSocket::bind(SocketAddr::new(dst, 0)))
        .map_err(ns_err(format!("entering {}", dst_ns.name)))?
        .map_err(io_err(format!("binding a UDP socket to {dst}")))?;
    let addr = server.local_addr().map_err(io_err("server address"))?;
    let bind_any: SocketAddr = if dst.is_ipv6() {
        "[::]:0".parse().expect("valid")
    } else {
        "0.0.0.0:0".parse().expect("valid")
    };
    let client = src
        .run(|| UdpSocket::bind(bind_any))
        .map_err(ns_err(format!("entering {}", src.name)))?
        .map_err(io_err("binding a UDP socket"))?;
    client
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(io_err("read timeout"))?;
    server
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(io_err("read timeout"))?;
    let mut samples = Vec::new();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let stop = &stop;
        let server = &server;
        s.spawn(move || {
            let mut buf = [0u8; 256];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, from)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(&buf[..n], from);
                }
            }
        });
        let msg = [0x42u8; 64];
        let mut buf = [0u8; 256];
        let end = Instant::now() + dur;
        while Instant::now() < end {
            let t = Instant::now();
            if client.send_to(&msg, addr).is_err() {
                continue;
            }
            if let Ok((n, _)) = client.recv_from(&mut buf) {
                if n == msg.len() {
                    samples.push(t.elapsed());
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    if samples.is_empty() {
        return Err(LabError::Io {
            context: format!("UDP request/response to {addr}"),
            source: std::io::Error::other("no answer"),
        });
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize];
    Ok((pct(0.5), pct(0.99)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &'static str, bps_1: &[f64]) -> PathResult {
        PathResult {
            name,
            between: "a -> b".into(),
            samples: Samples {
                bps_1: bps_1.to_vec(),
                bps_4: bps_1.iter().map(|b| b * 2.0).collect(),
                rr_p50: Duration::from_micros(40),
                rr_p99: Duration::from_micros(90),
            },
        }
    }

    #[test]
    fn paired_ratio_follows_the_drift_of_the_rounds() {
        // The machine slowed down by half in round 2: the pod path kept 0.8
        // of the underlay measured next to it in every round.
        let underlay = [10.0, 5.0, 10.0];
        let pod = [8.0, 4.0, 8.0];
        assert!((paired_ratio(&pod, &underlay) - 0.8).abs() < 1e-9);
        // Unpaired medians would say 1.0 here (8 / 8), paired says 0.5.
        assert!((paired_ratio(&[8.0, 8.0, 8.0], &[16.0, 4.0, 16.0]) - 0.5).abs() < 1e-9);
        assert!(paired_ratio(&[], &[]).is_nan());
    }

    #[test]
    fn binomial_half_cdf_sums_the_binomial_coefficients() {
        let cdf = binomial_half_cdf(3);
        let want = [1.0 / 8.0, 4.0 / 8.0, 7.0 / 8.0, 1.0];
        assert!(
            cdf.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
            "{cdf:?}"
        );
        // Large counts stay finite and end at 1.
        let big = binomial_half_cdf(2000);
        assert!((big[2000] - 1.0).abs() < 1e-9 && (big[1000] - 0.5).abs() < 0.01);
    }

    #[test]
    fn median_interval_takes_the_sign_tests_order_statistics() {
        assert_eq!(median_interval(&[]), None);
        // Five samples: the whole range, at 1 - 2/32.
        let i = median_interval(&[5.0, 1.0, 4.0, 2.0, 3.0]).unwrap();
        assert_eq!((i.lo, i.hi), (1.0, 5.0));
        assert!((i.coverage - 0.9375).abs() < 1e-12);
        // Nine: the 2nd to the 8th, at 1 - 2 * 10/512.
        let v: Vec<f64> = (1..=9).rev().map(f64::from).collect();
        let i = median_interval(&v).unwrap();
        assert_eq!((i.lo, i.hi), (2.0, 8.0));
        assert!((i.coverage - (1.0 - 20.0 / 512.0)).abs() < 1e-12);
        // Twenty: P(X <= 5) = 0.0207 <= 0.025 < P(X <= 6): the 6th to the 15th.
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        let i = median_interval(&v).unwrap();
        assert_eq!((i.lo, i.hi), (6.0, 15.0));
        assert!(i.coverage >= CONFIDENCE && i.coverage < 0.96, "{i:?}");
    }

    #[test]
    fn a_verdict_needs_the_whole_interval_on_one_side() {
        let i = |lo, hi| Interval {
            lo,
            hi,
            coverage: 0.96,
        };
        assert_eq!(Verdict::of(i(0.95, 1.1), 0.95), Verdict::Met);
        assert_eq!(Verdict::of(i(0.7, 0.84), 0.85), Verdict::Missed);
        assert_eq!(Verdict::of(i(0.8, 0.9), 0.85), Verdict::Undecided);
        // A quotient's interval spans both ends and loses both coverages' misses.
        let q = i(0.4, 0.5).quotient(i(0.8, 1.0));
        assert!((q.lo - 0.4).abs() < 1e-12 && (q.hi - 0.625).abs() < 1e-12);
        assert!((q.coverage - 0.92).abs() < 1e-12);
    }

    #[test]
    fn targets_hold_each_backend_against_its_own_underlay() {
        let report = BenchReport {
            tool: "iperf 3.12".into(),
            seconds: 3,
            repeat: 3,
            labs: vec![
                LabResult {
                    backend: Backend::Vxlan,
                    outcome: Ok(vec![
                        path("underlay", &[10.0, 10.0, 10.0]),
                        path("pod-pod", &[9.0, 8.6, 8.8]),
                        path("node-node", &[9.5, 9.5, 9.5]),
                    ]),
                },
                LabResult {
                    backend: Backend::HostGw,
                    outcome: Ok(vec![
                        path("underlay", &[20.0, 20.0, 20.0]),
                        path("pod-pod", &[19.0, 19.2, 18.0]),
                    ]),
                },
                LabResult {
                    backend: Backend::Udp,
                    outcome: Err("refused: udp needs IPv4".into()),
                },
            ],
        };
        assert!((report.ratio(Backend::Vxlan, None).unwrap() - 0.88).abs() < 1e-9);
        assert!((report.ratio(Backend::HostGw, None).unwrap() - 0.95).abs() < 1e-9);
        assert_eq!(report.ratio(Backend::Udp, Some(Backend::Vxlan)), None);
        let text = report.render();
        assert!(
            text.contains(
                "vxlan / underlay = 0.880, 75% interval 0.860..0.900 (target >= 0.85): met"
            ),
            "{text}"
        );
        assert!(
            // The median is at the target, but the rounds spread below it.
            text.contains(
                "host-gw / underlay = 0.950, 75% interval 0.900..0.960 (target >= 0.95): UNDECIDED"
            ),
            "{text}"
        );
        assert!(
            text.contains("udp / vxlan: not measured (target >= 0.5)"),
            "{text}"
        );
        assert!(
            text.contains("not available: refused: udp needs IPv4"),
            "{text}"
        );
        let node_node = text
            .lines()
            .find(|l| l.contains("node-node"))
            .expect("node-node row");
        assert!(node_node.contains(" 0.95 "), "{node_node}");
    }

    #[test]
    fn udp_is_held_against_vxlan_through_both_underlays() {
        let lab = |backend, underlay: f64, pod: f64| LabResult {
            backend,
            outcome: Ok(vec![
                path("underlay", &[underlay; 3]),
                path("pod-pod", &[pod; 3]),
            ]),
        };
        let report = BenchReport {
            tool: "t".into(),
            seconds: 1,
            repeat: 3,
            // udp's lab ran on a slower machine moment: 0.3 of its underlay
            // against vxlan's 0.75 of its own is 0.4 of vxlan.
            labs: vec![lab(Backend::Vxlan, 12.0, 9.0), lab(Backend::Udp, 10.0, 3.0)],
        };
        let r = report.ratio(Backend::Udp, Some(Backend::Vxlan)).unwrap();
        assert!((r - 0.4).abs() < 1e-9, "{r}");
        assert!(report
            .render()
            .contains("udp / vxlan = 0.400, 50% interval 0.400..0.400 (target >= 0.5): MISSED"));
    }
}
