//! The installers as the DaemonSet's init containers run them:
//! `install-conf SRC DEST` (upstream's interface: usage and exit codes) and
//! `flannelctl install-cni`. No root needed: temporary directories only.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

const INSTALL_CONF: &str = env!("CARGO_BIN_EXE_install-conf");
const FLANNELCTL: &str = env!("CARGO_BIN_EXE_flannelctl");

struct TempDir(PathBuf);
impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "flannelctl-install-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run(bin: &str, args: &[&Path]) -> Output {
    let out = Command::new(bin).args(args).output().unwrap();
    eprintln!(
        "$ {bin} {:?}\n{}{}",
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn mode_of(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

const CONFLIST: &str = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

#[test]
fn install_conf_wants_exactly_two_arguments() {
    let t = TempDir::new();
    let (a, b, c) = (t.join("a"), t.join("b"), t.join("c"));
    fs::write(&a, b"x").unwrap();
    for args in [vec![], vec![a.as_path()], vec![&a, &b, &c]] {
        let out = run(INSTALL_CONF, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(out.stdout.is_empty());
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!("usage: {INSTALL_CONF} <src> <dest>\n")
        );
    }
    assert!(!b.exists() && !c.exists());
}

#[test]
fn install_conf_copies_with_the_sources_mode() {
    let t = TempDir::new();
    fs::create_dir(t.join("net.d")).unwrap();
    let src = t.join("cni-conf.json");
    fs::write(&src, CONFLIST).unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o640)).unwrap();
    let dest = t.join("net.d/10-flannel.conflist");
    fs::write(&dest, b"an older conflist").unwrap();
    let out = run(INSTALL_CONF, &[&src, &dest]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    assert_eq!(fs::read_to_string(&dest).unwrap(), CONFLIST);
    assert_eq!(mode_of(&dest), 0o640);
    assert!(!t.join("net.d/.10-flannel.conflist.tmp").exists());
}

#[test]
fn install_conf_failure_names_the_source_and_exits_1() {
    let t = TempDir::new();
    let src = t.join("missing.json");
    let dest = t.join("dest");
    let out = run(INSTALL_CONF, &[&src, &dest]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("error installing {src:?}: open {}", src.display())),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!dest.exists());
}

#[test]
fn install_cni_installs_plugin_and_conflist() {
    let t = TempDir::new();
    fs::create_dir_all(t.join("opt/cni/bin")).unwrap();
    fs::create_dir_all(t.join("etc/cni/net.d")).unwrap();
    let plugin = t.join("flannel");
    fs::write(&plugin, b"\x7fELF").unwrap();
    let conf = t.join("cni-conf.json");
    fs::write(&conf, CONFLIST).unwrap();
    let dest = t.join("etc/cni/net.d/10-flannel.conflist");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let args = [
        "install-cni".to_string(),
        "--plugin-src".into(),
        s(&plugin),
        "--plugin-dir".into(),
        s(&t.join("opt/cni/bin")),
        "--conf-src".into(),
        s(&conf),
        "--conf-dest".into(),
        s(&dest),
    ];
    let out = Command::new(FLANNELCTL).args(&args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let installed = t.join("opt/cni/bin/flannel");
    assert_eq!(fs::read(&installed).unwrap(), b"\x7fELF");
    assert_eq!(mode_of(&installed), 0o755);
    assert_eq!(fs::read_to_string(&dest).unwrap(), CONFLIST);
    assert_eq!(mode_of(&dest), 0o644);
    assert!(
        stdout.contains("network cbr0, cniVersion 0.3.1, plugins flannel, portmap"),
        "{stdout}"
    );

    // A conflist the plugin refuses: exit 1, the field named, nothing touched.
    fs::write(
        &conf,
        r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"portmap"}]}"#,
    )
    .unwrap();
    fs::write(&installed, b"old plugin").unwrap();
    let out = Command::new(FLANNELCTL).args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&*conf.to_string_lossy()) && err.contains("no entry of \"type\": \"flannel\""),
        "{err}"
    );
    assert_eq!(fs::read(&installed).unwrap(), b"old plugin");
    assert_eq!(fs::read_to_string(&dest).unwrap(), CONFLIST);
}
