//! `flannelctl bench scale` runs for real at a small N, as a test that it
//! works (not timed): on both stores our flanneld must reach full kernel
//! state (the bench exits 1 when it does not converge), every measurement
//! must be printed, and nothing of the bench may be left behind. Needs
//! root and etcd (scripts/test installs it).

mod common;

use std::process::{Command, Stdio};

#[test]
fn bench_scale_converges_on_both_stores_and_removes_its_namespaces() {
    if !nix::unistd::geteuid().is_root() {
        panic!("needs root: flannelctl bench scale builds network namespaces (run with sudo, or scripts/test)");
    }
    let child = Command::new(env!("CARGO_BIN_EXE_flannelctl"))
        .args([
            "bench", "scale", "--n", "200", "--events", "5", "--repair", "50",
        ])
        .env_remove("FLANNEL_BENCH_UPSTREAM")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running flannelctl bench scale");
    let prefix = format!("fsb{}-", child.id());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "bench scale failed");
    for store in ["local", "etcd"] {
        let row = stdout
            .lines()
            .find(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.len() > 3 && w[0] == store && w[1] == "200" && w[2] == "ours"
            })
            .unwrap_or_else(|| panic!("no {store} row for ours"));
        let cold: f64 = row.split_whitespace().nth(3).unwrap().parse().unwrap();
        assert!(cold > 0.0, "{row}");
        assert!(
            row.contains("50 in "),
            "the deleted routes were not repaired: {row}"
        );
        assert!(
            stdout.contains(&format!("{store} N=200: one event -> kernel")),
            "{stdout}"
        );
    }
    let left = common::namespaces_with_prefix(&prefix);
    assert!(left.is_empty(), "bench scale left {left:?}");
    assert!(
        !std::path::Path::new(flannelctl::lab::scale::BENCH_ROOT)
            .join(format!("{prefix}1"))
            .exists(),
        "bench scale left its directory"
    );
}
