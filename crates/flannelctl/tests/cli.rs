//! The `flannelctl` binary as an operator uses it: `lab up`, `status`,
//! `exec`, `leases`, `down`, finding flanneld and flannel next to itself.
//! Needs root, and `cargo build --workspace --bins` first.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

const FLANNELCTL: &str = env!("CARGO_BIN_EXE_flannelctl");

fn require_root_and_binaries() {
    if !nix::unistd::geteuid().is_root() {
        panic!("needs root: these tests build labs in network namespaces (run them with sudo, or scripts/test)");
    }
    let dir = Path::new(FLANNELCTL).parent().unwrap();
    for b in ["flanneld", "flannel"] {
        assert!(
            dir.join(b).is_file(),
            "{b} is not built in {}: run `cargo build --workspace --bins` (same target dir) before these tests",
            dir.display()
        );
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(100);

fn unique_name() -> String {
    format!(
        "t{}n{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The flannelctl binary with `args`, finding its daemons next to itself
/// and using no lab name from the environment.
fn flannelctl_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(FLANNELCTL);
    cmd.args(args)
        .env_remove("FLANNEL_LAB_BIN_DIR")
        .env_remove("FLANNEL_LAB_NAME");
    cmd
}

/// flannelctl started with its output piped, to be signalled while it runs.
fn spawn_flannelctl(args: &[&str]) -> std::process::Child {
    flannelctl_command(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn flannelctl(args: &[&str]) -> Output {
    let out = flannelctl_command(args).output().unwrap();
    eprintln!(
        "$ flannelctl {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        if let Err(e) = flannelctl::lab::down(&self.0) {
            eprintln!("lab down {}: {e}", self.0);
        }
    }
}

/// `flannelctl lab exec --name NAME TARGET -- CMD...`.
fn lab_exec(name: &str, target: &str, cmd: &[&str]) -> Output {
    let mut args = vec!["lab", "exec", "--name", name, target, "--"];
    args.extend_from_slice(cmd);
    flannelctl(&args)
}

#[test]
fn operator_session() {
    require_root_and_binaries();
    let name = unique_name();
    let _guard = Down(name.clone());

    let up = flannelctl(&["lab", "up", "--name", &name]);
    assert!(
        up.status.success(),
        "lab up failed: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let stdout = String::from_utf8_lossy(&up.stdout);
    assert!(stdout.contains("14 of 14 pairs OK"), "{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("ubuntu-1 "))
        .expect("a matrix row for ubuntu-1");
    assert!(row.contains("ttl 62"), "{row}");

    let again = flannelctl(&["lab", "up", "--name", &name]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("lab down --name"));

    let status = flannelctl(&["lab", "status", "--name", &name]);
    assert!(status.status.success());
    let s = String::from_utf8_lossy(&status.stdout);
    assert_eq!(s.matches("running").count(), 3, "{s}");
    assert!(s.contains("never (reservation)"), "{s}");

    let check = flannelctl(&["lab", "check", "--name", &name]);
    assert!(check.status.success());

    // exec passes the exit code through and runs inside the namespace.
    let e = flannelctl(&[
        "lab", "exec", "--name", &name, "ubuntu-1", "--", "sh", "-c", "exit 7",
    ]);
    assert_eq!(e.status.code(), Some(7));
    let e = flannelctl(&["lab", "exec", "--name", &name, "nowhere", "--", "true"]);
    assert_eq!(e.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&e.stderr).contains("unknown lab target"));
    let e = lab_exec(&name, "k8s-node1", &["cat", "/proc/net/route"]);
    assert!(e.status.success());
    // /proc/net/route of node1: its ens3 and flannel.1, not the machine's interfaces.
    let routes = String::from_utf8_lossy(&e.stdout);
    assert!(
        routes.contains("ens3") && routes.contains("flannel.1"),
        "{routes}"
    );

    // lab explain: the packet walk through the binary; 0 when delivered.
    let x = flannelctl(&["lab", "explain", "--name", &name, "ubuntu-1", "ubuntu-2"]);
    let text = String::from_utf8_lossy(&x.stdout);
    assert!(x.status.success(), "{text}");
    assert!(
        text.contains("encapsulated in UDP to 172.16.1.13:8472, VNI 1")
            && text.contains("delivered to ubuntu-2"),
        "{text}"
    );
    // explain on a node (run inside k8s-node1 as on a real node): to the
    // node's edge. Dropped is exit 1: a blackholed address.
    let e = lab_exec(&name, "k8s-node1", &[FLANNELCTL, "explain", "10.244.2.2"]);
    let text = String::from_utf8_lossy(&e.stdout);
    assert!(e.status.success(), "{text}");
    assert!(
        text.contains("fdb: ") && text.contains("leaves this node for the VTEP 172.16.1.13"),
        "{text}"
    );
    let blackholed =
        format!("ip route add blackhole 10.250.0.0/16 && {FLANNELCTL} explain 10.250.0.1");
    let e = lab_exec(&name, "k8s-node1", &["sh", "-c", &blackholed]);
    let text = String::from_utf8_lossy(&e.stdout);
    assert_eq!(e.status.code(), Some(1), "{text}");
    assert!(
        text.contains("dropped in this node: ip route get 10.250.0.1: blackhole route"),
        "{text}"
    );

    let store = format!("/run/flannel-lab/{name}/store");
    let l = flannelctl(&["leases", "--local-store", &store, "--json"]);
    assert!(l.status.success());
    let v: serde_json::Value = serde_json::from_slice(&l.stdout).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for r in rows {
        assert_eq!(r["reservation"], true);
        assert_eq!(r["backend_type"], "vxlan");
        assert!(r["vtep_mac"].as_str().is_some_and(|m| m.len() == 17), "{r}");
    }
    let l = flannelctl(&["leases", "--local-store", &store]);
    assert!(String::from_utf8_lossy(&l.stdout).contains("172.16.1.14"));

    assert!(flannelctl(&["lab", "down", "--name", &name])
        .status
        .success());
    assert!(flannelctl(&["lab", "down", "--name", &name])
        .status
        .success());
    assert!(flannelctl::lab::lab_namespaces(&name).is_empty());
    assert!(flannelctl::lab::lab_processes(&name).is_empty());
    let status = flannelctl(&["lab", "status", "--name", &name]);
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stderr).contains("does not exist"));
}

#[test]
fn backend_and_topology_options_through_the_binary() {
    require_root_and_binaries();
    let out = flannelctl(&["lab", "up", "--backend", "ipip"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`vxlan`, `host-gw`, `udp` or `wireguard`"),
        "{err}"
    );

    let name = unique_name();
    let _down = Down(name.clone());
    let out = flannelctl(&[
        "lab",
        "up",
        "--name",
        &name,
        "--backend",
        "host-gw",
        "--direct-routing",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--direct-routing") && err.contains("vxlan backend"),
        "{err}"
    );
    assert!(flannelctl::lab::lab_namespaces(&name).is_empty());

    // host-gw over two segments: `up` succeeds, the cross-segment pairs are
    // expected failures with their reason.
    let out = flannelctl(&[
        "lab",
        "up",
        "--name",
        &name,
        "--backend",
        "host-gw",
        "--topology",
        "two-segment",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("refused (expected) ubuntu-1 -> ubuntu-2: host-gw across segments"),
        "{stdout}"
    );
    let out = flannelctl(&["lab", "status", "--name", &name]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("backend: host-gw  topology: two-segment"),
        "{stdout}"
    );
    let out = flannelctl(&[
        "lab", "exec", "--name", &name, "router", "--", "ip", "-4", "addr", "show", "seg2",
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("172.16.2.1/24"));

    // Switched to vxlan with DirectRouting: every pair answers.
    let out = flannelctl(&[
        "lab",
        "switch-backend",
        "--name",
        &name,
        "vxlan",
        "--direct-routing",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("now runs vxlan") && !stdout.contains("refused"),
        "{stdout}"
    );
    let out = flannelctl(&[
        "lab",
        "exec",
        "--name",
        &name,
        "k8s-node1",
        "--",
        "ip",
        "route",
    ]);
    let routes = String::from_utf8_lossy(&out.stdout);
    assert!(
        routes.contains("10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink"),
        "{routes}"
    );
    let out = flannelctl(&["lab", "down", "--name", &name]);
    assert!(out.status.success());
    assert!(flannelctl::lab::lab_namespaces(&name).is_empty());
}

/// Ctrl-C while `lab up` builds: the command stops at its next step, removes
/// every namespace, daemon and file it made, and says it was interrupted.
/// Sends `sig` to the flannelctl this test started (by its pid).
fn signal(child: &std::process::Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

/// Nothing of lab `name` is left: namespaces, daemons, directory.
fn assert_lab_gone(name: &str) {
    use flannelctl::lab::{lab_dir, lab_namespaces, lab_processes};
    assert_eq!(lab_namespaces(name), Vec::<String>::new());
    assert_eq!(lab_processes(name), Vec::<u32>::new());
    assert!(
        !lab_dir(name).exists(),
        "{} is left",
        lab_dir(name).display()
    );
}

#[test]
fn interrupted_lab_up_removes_what_it_built() {
    use flannelctl::lab::{lab_namespaces, lab_processes};
    use std::time::{Duration, Instant};
    require_root_and_binaries();
    let name = unique_name();
    let _down = Down(name.clone());
    let child = spawn_flannelctl(&["lab", "up", "--name", &name]);
    // Interrupt once namespaces and daemons exist (the build then still
    // waits for the daemons' leases, attaches pods and checks masquerading).
    let deadline = Instant::now() + Duration::from_secs(30);
    while lab_processes(&name).is_empty() {
        assert!(
            Instant::now() < deadline,
            "lab up started no flanneld in 30 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!lab_namespaces(&name).is_empty());
    signal(&child, nix::sys::signal::Signal::SIGINT);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(!out.status.success(), "lab up went on after SIGINT");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_lab_gone(&name);
}

#[test]
fn interrupted_bench_removes_its_lab() {
    use flannelctl::lab::lab_namespaces;
    use std::io::BufRead;
    require_root_and_binaries();
    let name = unique_name();
    let _down = Down(name.clone());
    let mut child = spawn_flannelctl(&[
        "bench",
        "--name",
        &name,
        "--backend",
        "host-gw",
        "--seconds",
        "2",
        "--repeat",
        "3",
    ]);
    // SIGTERM (as from a service manager or `kill`) once it measures.
    let mut seen = Vec::new();
    for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains("throughput round 1/") {
            assert!(!lab_namespaces(&name).is_empty());
            signal(&child, nix::sys::signal::Signal::SIGTERM);
        }
    }
    let status = child.wait().unwrap();
    let stderr = seen.join("\n");
    eprintln!("{stderr}");
    assert!(
        stderr.contains("throughput round 1/"),
        "the bench never measured"
    );
    assert!(!status.success(), "the bench went on after SIGTERM");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(!stderr.contains("throughput round 3/"), "{stderr}");
    assert_lab_gone(&name);
}

#[test]
fn short_bench_reports_every_path_and_judges_its_target_on_an_interval() {
    require_root_and_binaries();
    let name = unique_name();
    let _down = Down(name.clone());
    let out = flannelctl(&[
        "bench",
        "--name",
        &name,
        "--backend",
        "host-gw",
        "--seconds",
        "1",
        "--repeat",
        "3",
    ]);
    assert!(out.status.success());
    let report = String::from_utf8_lossy(&out.stdout);
    for path in ["underlay", "pod-pod"] {
        let row = report
            .lines()
            .find(|l| l.starts_with("host-gw") && l.contains(path))
            .unwrap_or_else(|| panic!("no {path} row:\n{report}"));
        // Measured numbers: a throughput, and a latency in microseconds.
        assert!(row.contains("Gbit/s") && row.contains("us"), "{row}");
        assert!(!row.contains("NaN"), "{row}");
    }
    // Three rounds give the whole range at 75%; the verdict is one of three.
    let target = report
        .lines()
        .find(|l| l.contains("host-gw / underlay = "))
        .unwrap_or_else(|| panic!("no target line:\n{report}"));
    assert!(target.contains("75% interval "), "{target}");
    assert!(
        ["met", "MISSED", "UNDECIDED"]
            .iter()
            .any(|v| target.contains(&format!("): {v}"))),
        "{target}"
    );
    // The other targets need labs this run did not build.
    assert!(
        report.contains("vxlan / underlay: not measured")
            && report.contains("udp / vxlan: not measured"),
        "{report}"
    );
    assert_lab_gone(&name);
}
