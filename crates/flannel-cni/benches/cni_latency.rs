//! ADD/DEL latency of the `flannel` plugin against the reference plugins
//! (Debian's containernetworking-plugins: bridge + host-local) with the
//! equivalent config, each run exactly as a runtime runs it, in a node
//! namespace of its own. `cargo bench -p flannel-cni`; set
//! `FLANNEL_CNI_BENCH_N` to change the number of pods (default 100) and
//! `FLANNEL_CNI_BENCH_BIN` to measure another build of the plugin (e.g. the
//! static build `scripts/bench-cni` makes, as the plugin is shipped).
//!
//! Target: our ADD p50 at most a quarter of the reference's.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::Duration;

use common::{need_root, netns_path, Node};
use flannel_netlink::netns::ScopedNetNs;
use serde_json::{json, Value};

const OURS: &str = env!("CARGO_BIN_EXE_flannel");
const REF_BRIDGE: &str = "/usr/lib/cni/bridge";
const REF_HOST_LOCAL: &str = "/usr/lib/cni/host-local";

struct Stats {
    min: Duration,
    p50: Duration,
    p95: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Stats {
        min: v[0],
        p50: at(0.5),
        p95: at(0.95),
    }
}

fn ms(d: Duration) -> String {
    format!("{:8.2} ms", d.as_secs_f64() * 1e3)
}

/// One side of the comparison: a plugin binary, its config, its own node.
struct Side<'a> {
    node: &'a Node,
    bin: &'a Path,
    conf: Value,
    /// Interface name inside the pods, so both sides can share the pods.
    ifname: &'static str,
    add: Vec<Duration>,
    del: Vec<Duration>,
    version: Vec<Duration>,
}

impl Side<'_> {
    fn call(&mut self, verb: &str, i: usize, pod: &ScopedNetNs) {
        let out = self.node.cni(
            self.bin,
            verb,
            &format!("bench{i}"),
            &netns_path(pod),
            self.ifname,
            &self.conf,
        );
        out.expect_ok();
        if verb == "ADD" {
            self.add.push(out.elapsed);
        } else {
            self.del.push(out.elapsed);
        }
    }
}

/// N ADDs (one per pod) then N DELs, the sides taking turns call by call so
/// that both see the same load on the machine.
fn run(sides: &mut [Side<'_>], pods: &[ScopedNetNs]) {
    // One warm-up pair each so every binary starts from the page cache.
    for s in sides.iter_mut() {
        s.call("ADD", usize::MAX, &pods[0]);
        s.call("DEL", usize::MAX, &pods[0]);
        s.add.clear();
        s.del.clear();
    }
    // Process start-up alone: VERSION does no work, so this is the floor under ADD/DEL.
    for _ in pods {
        for s in sides.iter_mut() {
            let out = s.node.exec(
                s.bin,
                &[("CNI_COMMAND", "VERSION")],
                br#"{"cniVersion":"0.3.1"}"#,
            );
            out.expect_ok();
            s.version.push(out.elapsed);
        }
    }
    for verb in ["ADD", "DEL"] {
        for (i, p) in pods.iter().enumerate() {
            for s in sides.iter_mut() {
                s.call(verb, i, p);
            }
        }
    }
}

fn main() {
    need_root();
    let n: usize = std::env::var("FLANNEL_CNI_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
        .max(2);
    let pods: Vec<ScopedNetNs> = (0..n)
        .map(|_| ScopedNetNs::unique("fcni-benchp").unwrap())
        .collect();

    let ours_bin = std::env::var("FLANNEL_CNI_BENCH_BIN").unwrap_or_else(|_| OURS.to_string());
    println!("flannel-rs plugin measured: {ours_bin}");
    let ours_node = Node::new("fcni-bench");
    let mut sides = vec![Side {
        node: &ours_node,
        bin: Path::new(&ours_bin),
        conf: ours_node.conf("0.3.1"),
        ifname: "eth0",
        add: Vec::new(),
        del: Vec::new(),
        version: Vec::new(),
    }];
    // The config upstream's flannel plugin hands to bridge for the manifest's conflist.
    let ref_node = Node::new("fcni-benchref");
    let have_ref = Path::new(REF_BRIDGE).exists() && Path::new(REF_HOST_LOCAL).exists();
    if have_ref {
        sides.push(Side {
            node: &ref_node,
            bin: Path::new(REF_BRIDGE),
            conf: json!({
                "cniVersion": "0.3.1", "name": "cbr0", "type": "bridge", "bridge": "cni0",
                "mtu": 1450, "ipMasq": false, "isGateway": true,
                "hairpinMode": true, "isDefaultGateway": true,
                "ipam": {"type": "host-local", "dataDir": ref_node.ipam_dir(),
                         "ranges": [[{"subnet": "10.244.1.0/24"}]], "routes": [{"dst": "10.244.0.0/16"}]}
            }),
            ifname: "eth1",
            add: Vec::new(),
            del: Vec::new(),
            version: Vec::new(),
        });
    }
    run(&mut sides, &pods);

    println!(
        "flannel CNI plugin latency, {n} pods, ADDs then DELs, sides interleaved (spawn to exit)"
    );
    println!("{:<32} {:>11} {:>11} {:>11}", "", "min", "p50", "p95");
    let row =
        |name: &str, s: &Stats| println!("{name:<32} {} {} {}", ms(s.min), ms(s.p50), ms(s.p95));
    let ours = (stats(sides[0].add.clone()), stats(sides[0].del.clone()));
    row("flannel-rs ADD", &ours.0);
    row("flannel-rs DEL", &ours.1);
    row(
        "flannel-rs VERSION (start-up)",
        &stats(sides[0].version.clone()),
    );
    if !have_ref {
        println!("reference plugins not found at {REF_BRIDGE} / {REF_HOST_LOCAL} (Debian package containernetworking-plugins): no comparison");
        return;
    }
    let refs = (stats(sides[1].add.clone()), stats(sides[1].del.clone()));
    row("reference bridge+host-local ADD", &refs.0);
    row("reference bridge+host-local DEL", &refs.1);
    row("reference bridge VERSION", &stats(sides[1].version.clone()));
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!(
        "ratio ours/reference: ADD p50 {:.3} (min {:.3}), DEL p50 {:.3} (min {:.3})",
        ratio(ours.0.p50, refs.0.p50),
        ratio(ours.0.min, refs.0.min),
        ratio(ours.1.p50, refs.1.p50),
        ratio(ours.1.min, refs.1.min)
    );
    let met = ours.0.p50.as_secs_f64() * 4.0 <= refs.0.p50.as_secs_f64();
    println!(
        "target (our ADD p50 <= 1/4 of the reference's): {}",
        if met { "met" } else { "NOT met" }
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average during the run: {} on {} CPUs (a loaded machine inflates both sides with scheduling delay)",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
}
