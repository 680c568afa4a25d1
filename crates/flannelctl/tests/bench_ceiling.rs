//! `scripts/bench-ceiling`, the bare kernel's throughput on the lab's
//! topology, runs for real: one short round (with flanneld's rules, the
//! longer code path) measures every path and leaves no namespace behind. Needs root and iperf3 (scripts/test installs it).

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn bench_ceiling_measures_every_path_and_removes_its_namespaces() {
    if !nix::unistd::geteuid().is_root() {
        panic!("needs root: scripts/bench-ceiling builds network namespaces (run with sudo, or scripts/test)");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench-ceiling");
    let child = Command::new(&script)
        .args(["1", "1", "rules"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running scripts/bench-ceiling");
    let prefix = format!("kc{}-", child.id());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "bench-ceiling failed");
    assert!(
        stdout.contains("with flanneld's --ip-masq and forward rules"),
        "{stdout}"
    );
    for path in ["underlay", "bridge-routes", "vxlan-pods", "vxlan-nodes"] {
        let row = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(path))
            .unwrap_or_else(|| panic!("no {path} row"));
        let gbit: f64 = row.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(gbit > 0.0, "{row}");
        assert!(row.contains("ratio ") && row.contains("interval "), "{row}");
    }
    let left = common::namespaces_with_prefix(&prefix);
    assert!(left.is_empty(), "bench-ceiling left {left:?}");
}
