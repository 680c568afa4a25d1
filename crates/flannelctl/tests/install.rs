//! The installers (`flannelctl::install`) and as the DaemonSet's init
//! containers run them: `install-conf SRC DEST` (upstream's interface: usage
//! and exit codes) and `flannelctl install-cni`. No root needed: temporary
//! directories only.

mod common;

use std::fs::{self, Permissions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::TempDir;
use flannelctl::install::*;

const INSTALL_CONF: &str = env!("CARGO_BIN_EXE_install-conf");
const FLANNELCTL: &str = env!("CARGO_BIN_EXE_flannelctl");

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

const CONFLIST: &str = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

#[test]
fn install_conf_wants_exactly_two_arguments() {
    let t = TempDir::new("flannelctl-install");
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
    let t = TempDir::new("flannelctl-install");
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
    let t = TempDir::new("flannelctl-install");
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
    let t = TempDir::new("flannelctl-install");
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

fn mode_of(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn write_with_mode(p: &Path, data: &[u8], mode: u32) {
    fs::write(p, data).unwrap();
    fs::set_permissions(p, Permissions::from_mode(mode)).unwrap();
}

#[test]
fn modes_fixed_or_from_source() {
    let t = TempDir::new("flannelctl-install");
    let src = t.join("src");
    write_with_mode(&src, b"data", 0o600);
    install_file(&src, &t.join("fixed"), Mode::Fixed(0o755)).unwrap();
    assert_eq!(mode_of(&t.join("fixed")), 0o755);
    install_file(&src, &t.join("copy"), Mode::FromSource).unwrap();
    assert_eq!(mode_of(&t.join("copy")), 0o600);
    assert_eq!(fs::read(t.join("copy")).unwrap(), b"data");
    fs::set_permissions(&src, Permissions::from_mode(0o751)).unwrap();
    install_file(&src, &t.join("copy"), Mode::FromSource).unwrap();
    assert_eq!(mode_of(&t.join("copy")), 0o751);
}

#[test]
fn overwrites_the_destination_and_a_leftover_temp_file() {
    let t = TempDir::new("flannelctl-install");
    let dest = t.join("10-flannel.conflist");
    write_with_mode(&dest, b"old and much longer content", 0o600);
    // What an install killed between create and rename leaves behind.
    write_with_mode(&temp_path(&dest).unwrap(), b"torn", 0o600);
    install_from(&mut &b"new"[..], &dest, 0o644).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), b"new");
    assert_eq!(mode_of(&dest), 0o644);
    assert!(!temp_path(&dest).unwrap().exists());
    let names: Vec<_> = fs::read_dir(&t.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("10-flannel.conflist")]);
}

#[test]
fn errors_name_the_path_and_leave_nothing_behind() {
    let t = TempDir::new("flannelctl-install");
    let missing = t.join("no-such-source");
    let e = install_file(&missing, &t.join("dest"), Mode::FromSource)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("open") && e.contains(&*missing.to_string_lossy()),
        "{e}"
    );
    assert!(!t.join("dest").exists());

    let src = t.join("src");
    fs::write(&src, b"x").unwrap();
    let nodir = t.join("no-such-dir/dest");
    let e = install_file(&src, &nodir, Mode::FromSource)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&*t.join("no-such-dir/.dest.tmp").to_string_lossy()),
        "{e}"
    );

    // The destination is a directory: the rename fails, the temp file goes.
    fs::create_dir(t.join("adir")).unwrap();
    fs::write(t.join("adir/keep"), b"k").unwrap();
    let e = install_file(&src, &t.join("adir"), Mode::FromSource)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rename") && e.contains(&*t.join("adir").to_string_lossy()),
        "{e}"
    );
    assert!(!t.join(".adir.tmp").exists());
    assert_eq!(fs::read(t.join("adir/keep")).unwrap(), b"k");
}

/// A reader racing with repeated installs only ever sees the old or the
/// new content, whole (a copy in place shows an empty or short file).
#[test]
fn a_reader_never_sees_a_partial_file() {
    let t = TempDir::new("flannelctl-install");
    let dest = t.join("plugin");
    let a = vec![b'a'; 3 << 20];
    let b = vec![b'b'; 2 << 20];
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (dest, a, b, done) = (dest.clone(), a.clone(), b.clone(), done.clone());
        std::thread::spawn(move || {
            let (mut whole, mut absent) = (0u32, 0u32);
            while !done.load(Ordering::Acquire) {
                match fs::read(&dest) {
                    Ok(d) => {
                        assert!(d == a || d == b, "saw a partial file of {} bytes", d.len());
                        whole += 1;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => absent += 1,
                    Err(e) => panic!("reading {}: {e}", dest.display()),
                }
            }
            (whole, absent)
        })
    };
    for i in 0..60 {
        let data = if i % 2 == 0 { &a } else { &b };
        install_from(&mut data.as_slice(), &dest, 0o755).unwrap();
    }
    // Let the reader see the last install too.
    std::thread::sleep(std::time::Duration::from_millis(20));
    done.store(true, Ordering::Release);
    let (whole, _absent) = reader.join().unwrap();
    assert!(
        whole > 0,
        "the reader never read the file: the race was not run"
    );
    assert_eq!(fs::read(&dest).unwrap(), b);
}

#[test]
fn install_cni_installs_both_files_after_checking_the_conflist() {
    let t = TempDir::new("flannelctl-install");
    fs::create_dir_all(t.join("opt/cni/bin")).unwrap();
    fs::create_dir_all(t.join("etc/cni/net.d")).unwrap();
    write_with_mode(&t.join("flannel"), b"\x7fELF plugin", 0o700);
    write_with_mode(&t.join("cni-conf.json"), CONFLIST.as_bytes(), 0o600);
    let req = CniInstall {
        plugin_src: t.join("flannel"),
        plugin_dir: t.join("opt/cni/bin"),
        conf_src: t.join("cni-conf.json"),
        conf_dest: t.join("etc/cni/net.d/10-flannel.conflist"),
    };
    let done = install_cni(&req).unwrap();
    assert_eq!(done.plugin, t.join("opt/cni/bin/flannel"));
    assert_eq!(fs::read(&done.plugin).unwrap(), b"\x7fELF plugin");
    assert_eq!(mode_of(&done.plugin), PLUGIN_MODE);
    assert_eq!(fs::read(&done.conflist).unwrap(), CONFLIST.as_bytes());
    assert_eq!(mode_of(&done.conflist), CONFLIST_MODE);
    assert_eq!(done.parsed.plugin_types, vec!["flannel", "portmap"]);

    // A conflist the plugin refuses installs nothing, not even the plugin.
    let t2 = TempDir::new("flannelctl-install");
    fs::create_dir_all(t2.join("bin")).unwrap();
    fs::write(t2.join("flannel"), b"p").unwrap();
    fs::write(
        t2.join("bad.json"),
        br#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":"yes"}}]}"#,
    )
    .unwrap();
    let bad = CniInstall {
        plugin_src: t2.join("flannel"),
        plugin_dir: t2.join("bin"),
        conf_src: t2.join("bad.json"),
        conf_dest: t2.join("out.conflist"),
    };
    let e = install_cni(&bad).unwrap_err().to_string();
    assert!(
        e.contains("bad.json") && e.contains("plugins[0].delegate.hairpinMode"),
        "{e}"
    );
    assert!(!t2.join("bin/flannel").exists() && !t2.join("out.conflist").exists());
}
