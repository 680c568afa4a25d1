//! `flannelctl bench`: throughput and latency of each datapath against the
//! underlay, in one run, on a two-worker lab.
//!
//! Paths measured: the underlay (k8s-node1's ens3 to k8s-node2's ens3), then
//! pod to pod (ubuntu-1 to ubuntu-2) over vxlan, host-gw and udp, in a fresh
//! lab per backend (pods get the backend's MTU, as in a real cluster). For each path: TCP throughput
//! with one stream and with four (Debian's `iperf3` when installed, else a
//! TCP sender/receiver of our own), and UDP request/response latency (a
//! ping-pong of small datagrams written here, p50 and p99). A backend that
//! cannot run (flanneld refuses it) is reported as "not available" with the
//! daemon's reason: no number is ever made up.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flannel_netlink::netns::NetNs;

use super::{io_err, ns_err, Backend, Lab, LabError, LabOptions, Result};

/// How long each throughput measurement runs.
pub const DEFAULT_SECONDS: u64 = 3;
/// How many times each throughput measurement is repeated (the median is
/// reported: the machine is shared, single runs are noisy).
pub const DEFAULT_REPEAT: u32 = 3;

/// What one path gave.
#[derive(Debug, Clone)]
pub struct PathResult {
    /// `underlay`, `vxlan`, `host-gw`, `udp`.
    pub name: String,
    /// `node1/ens3 -> node2/ens3`, `ubuntu-1 -> ubuntu-2`.
    pub between: String,
    /// Bits per second with 1 and with 4 streams, and the UDP RR p50 and p99;
    /// or why the path could not be measured.
    pub outcome: std::result::Result<Measured, String>,
}

#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub bps_1: f64,
    pub bps_4: f64,
    pub rr_p50: Duration,
    pub rr_p99: Duration,
}

/// The report of a bench run.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// `iperf3 3.12` or `built-in TCP streams`.
    pub tool: String,
    pub seconds: u64,
    pub repeat: u32,
    pub paths: Vec<PathResult>,
}

fn gbit(bps: f64) -> String {
    format!("{:.2} Gbit/s", bps / 1e9)
}

impl BenchReport {
    fn measured(&self, name: &str) -> Option<Measured> {
        self.paths
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.outcome.as_ref().ok().copied())
    }

    /// Throughput (single stream) of `name` relative to `base`.
    pub fn ratio(&self, name: &str, base: &str) -> Option<f64> {
        Some(self.measured(name)?.bps_1 / self.measured(base)?.bps_1)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "TCP throughput ({}, median of {} runs of {} s) and UDP request/response latency",
            self.tool, self.repeat, self.seconds
        );
        let _ = writeln!(
            out,
            "{:<9} {:<32} {:>14} {:>6} {:>14} {:>6} {:>10} {:>10} {:>8}",
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
        let base = self.measured("underlay");
        for p in &self.paths {
            match &p.outcome {
                Ok(m) => {
                    let r = |v: f64, b: Option<f64>| {
                        b.map(|b| format!("{:.2}", v / b))
                            .unwrap_or_else(|| "-".into())
                    };
                    let _ = writeln!(
                        out,
                        "{:<9} {:<32} {:>14} {:>6} {:>14} {:>6} {:>8.0}us {:>8.0}us {:>8}",
                        p.name,
                        p.between,
                        gbit(m.bps_1),
                        r(m.bps_1, base.map(|b| b.bps_1)),
                        gbit(m.bps_4),
                        r(m.bps_4, base.map(|b| b.bps_4)),
                        m.rr_p50.as_secs_f64() * 1e6,
                        m.rr_p99.as_secs_f64() * 1e6,
                        base.map(|b| format!(
                            "{:.2}",
                            m.rr_p50.as_secs_f64() / b.rr_p50.as_secs_f64()
                        ))
                        .unwrap_or_else(|| "-".into()),
                    );
                }
                Err(why) => {
                    let _ = writeln!(out, "{:<9} {:<32} not available: {why}", p.name, p.between);
                }
            }
        }
        let _ = writeln!(out, "targets (single-stream throughput):");
        for (name, base, target) in [
            ("host-gw", "underlay", 0.95),
            ("vxlan", "underlay", 0.85),
            ("udp", "vxlan", 0.5),
        ] {
            let line = match self.ratio(name, base) {
                Some(r) => format!(
                    "{name} / {base} = {r:.3} (target >= {target}): {}",
                    if r >= target { "met" } else { "MISSED" }
                ),
                None => format!("{name} / {base}: not measured (target >= {target})"),
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

/// Runs the bench: a two-worker lab named `name`, the four paths, `down`.
pub fn run(
    name: &str,
    bin_dir: Option<&Path>,
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
    let mut paths = Vec::new();
    // One fresh lab per backend, as a cluster would be built: the pods get
    // the backend's own MTU (udp's 1472 is not vxlan's 1450).
    for backend in [Backend::Vxlan, Backend::HostGw, Backend::Udp] {
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
            // `up` removed what it built.
            Err(e) => {
                paths.push(PathResult {
                    name: backend.to_string(),
                    between: "ubuntu-1 -> ubuntu-2".into(),
                    outcome: Err(unavailable_reason(e)),
                });
                continue;
            }
        };
        let result = measure_lab(&lab, backend, how, &say);
        let down = super::down(name);
        paths.extend(result?);
        down?;
    }
    Ok(BenchReport {
        tool: tool.unwrap_or_else(|| "built-in TCP streams (iperf3 not installed)".into()),
        seconds,
        repeat,
        paths,
    })
}

/// How to measure.
#[derive(Debug, Clone, Copy)]
struct How {
    iperf3: bool,
    seconds: u64,
    repeat: u32,
}

/// The paths of one lab: the underlay first (in the vxlan lab), then pod to pod.
fn measure_lab(
    lab: &Lab,
    backend: Backend,
    how: How,
    say: &dyn Fn(&str),
) -> Result<Vec<PathResult>> {
    let mut paths = Vec::new();
    if backend == Backend::Vxlan {
        say("underlay: k8s-node1 -> k8s-node2");
        let n2 = lab.node("k8s-node2")?.clone();
        paths.push(PathResult {
            name: "underlay".into(),
            between: "k8s-node1/ens3 -> k8s-node2/ens3".into(),
            outcome: Ok(measure(
                &lab.netns("k8s-node1")?,
                &lab.netns("k8s-node2")?,
                IpAddr::V4(n2.underlay_ip),
                how,
            )?),
        });
    }
    say(&format!("{backend}: ubuntu-1 -> ubuntu-2"));
    let m = lab.check()?;
    let outcome = if m.all_ok() {
        let dst = lab
            .pod("ubuntu-2")?
            .ip
            .expect("pod has an IPv4 address")
            .addr();
        Ok(measure(
            &lab.netns("ubuntu-1")?,
            &lab.netns("ubuntu-2")?,
            IpAddr::V4(dst),
            how,
        )?)
    } else {
        Err(format!("the connectivity check failed:\n{}", m.render()))
    };
    paths.push(PathResult {
        name: backend.to_string(),
        between: "ubuntu-1 -> ubuntu-2".into(),
        outcome,
    });
    Ok(paths)
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

fn measure(src: &NetNs, dst_ns: &NetNs, dst: IpAddr, how: How) -> Result<Measured> {
    let once = |streams: u32| -> Result<f64> {
        if how.iperf3 {
            iperf3(src, dst_ns, dst, streams, how.seconds)
        } else {
            tcp_streams(src, dst_ns, dst, streams, Duration::from_secs(how.seconds))
        }
    };
    let median = |streams: u32| -> Result<f64> {
        let mut v = (0..how.repeat)
            .map(|_| once(streams))
            .collect::<Result<Vec<f64>>>()?;
        v.sort_by(f64::total_cmp);
        Ok(v[v.len() / 2])
    };
    let bps_1 = median(1)?;
    let bps_4 = median(4)?;
    let (rr_p50, rr_p99) = udp_rr(src, dst_ns, dst, Duration::from_secs(2))?;
    Ok(Measured {
        bps_1,
        bps_4,
        rr_p50,
        rr_p99,
    })
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
