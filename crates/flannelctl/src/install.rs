//! Installing the CNI plugin and its conflist on a node, atomically: what
//! the DaemonSet's init containers do (`install-conf SRC DEST`, and
//! `flannelctl install-cni` for both files at once).
//!
//! A file is never written in place: the data goes to `.<name>.tmp` in the
//! destination's own directory (same filesystem, so `rename(2)` is atomic),
//! is fsynced, gets its mode, and is renamed over the destination. The
//! container runtime, which reads `/etc/cni/net.d` at any moment, sees the
//! old file or the new one, never a torn one; a plugin binary that is
//! running keeps its old inode, where writing in place would fail with
//! ETXTBSY. Std only: the `install-conf` binary starts no async runtime.
//! Tests with files: `tests/install.rs`.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flannel_cni::config::{parse_conflist, ConfList, ConfigError};
use flannel_core::wire;

/// Mode of the installed plugin binary.
pub const PLUGIN_MODE: u32 = 0o755;
/// Mode of the installed conflist.
pub const CONFLIST_MODE: u32 = 0o644;

/// Errors of an installation, each naming the path involved.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: the destination must name a file, not a directory")]
    NoFileName { path: PathBuf },
    #[error("{path}: not a conflist the flannel plugin accepts: {source}; nothing was installed")]
    Conflist {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The mode an installed file gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The source file's permission bits (upstream's `install-conf`).
    FromSource,
    /// These permission bits (umask does not apply).
    Fixed(u32),
}

/// The temporary file an installation of `dest` writes: `.<name>.tmp` beside it.
pub fn temp_path(dest: &Path) -> Result<PathBuf, InstallError> {
    let name = dest.file_name().ok_or_else(|| InstallError::NoFileName {
        path: dest.to_path_buf(),
    })?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(".tmp");
    Ok(dir_of(dest).join(tmp))
}

fn dir_of(dest: &Path) -> PathBuf {
    match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes what `data` yields to `dest` atomically with permission bits
/// `mode` (see the module doc). The destination directory must exist. A
/// leftover temporary file of an earlier, interrupted run is replaced; on
/// failure the temporary file is removed and `dest` is untouched.
pub fn install_from(data: &mut dyn Read, dest: &Path, mode: u32) -> Result<(), InstallError> {
    let tmp = temp_path(dest)?;
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io_err("remove the leftover", &tmp)(e))
        }
        _ => {}
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    let result = (|| {
        io::copy(data, &mut f).map_err(io_err("write", &tmp))?;
        f.flush().map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        // fchmod: the creation mode was cut by the umask.
        f.set_permissions(Permissions::from_mode(mode))
            .map_err(io_err("chmod", &tmp))?;
        fs::rename(&tmp, dest).map_err(io_err("rename the temporary file over", dest))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // The rename itself survives a crash once the directory is synced; some
    // filesystems refuse fsync on a directory, which loses nothing here.
    if let Ok(d) = File::open(dir_of(dest)) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Copies `src` to `dest` atomically (`install-conf SRC DEST`). `src` is
/// followed if it is a symlink (a ConfigMap volume's files are).
pub fn install_file(src: &Path, dest: &Path, mode: Mode) -> Result<(), InstallError> {
    let mut f = File::open(src).map_err(io_err("open", src))?;
    let mode = match mode {
        Mode::Fixed(m) => m,
        Mode::FromSource => {
            f.metadata()
                .map_err(io_err("stat", src))?
                .permissions()
                .mode()
                & 0o7777
        }
    };
    install_from(&mut f, dest, mode)
}

/// What `flannelctl install-cni` installs; the defaults are kube-flannel.yml's paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniInstall {
    /// The plugin binary to install (`/flannel` in the image).
    pub plugin_src: PathBuf,
    /// The host's CNI plugin directory; the plugin becomes `<dir>/flannel`.
    pub plugin_dir: PathBuf,
    /// The conflist (`/etc/kube-flannel/cni-conf.json`, from the ConfigMap).
    pub conf_src: PathBuf,
    /// Where the runtime reads it (`/etc/cni/net.d/10-flannel.conflist`).
    pub conf_dest: PathBuf,
}

impl Default for CniInstall {
    fn default() -> Self {
        CniInstall {
            plugin_src: wire::IMAGE_CNI_PLUGIN.into(),
            plugin_dir: wire::CNI_BIN_DIR.into(),
            conf_src: wire::MANIFEST_CNI_CONF.into(),
            conf_dest: wire::CNI_CONFLIST.into(),
        }
    }
}

/// What [`install_cni`] did.
#[derive(Debug, Clone)]
pub struct CniInstalled {
    /// The installed plugin binary.
    pub plugin: PathBuf,
    /// The installed conflist.
    pub conflist: PathBuf,
    /// The conflist as the plugin's parser read it.
    pub parsed: ConfList,
}

/// Installs the plugin (mode 0755) and then the conflist (mode 0644), both
/// atomically. The conflist is read once and checked first with the
/// plugin's own parser ([`parse_conflist`]): a conflist the plugin would
/// refuse installs nothing. The plugin goes first because a runtime takes
/// the node's network as ready as soon as a conflist is there.
pub fn install_cni(req: &CniInstall) -> Result<CniInstalled, InstallError> {
    let conf = fs::read(&req.conf_src).map_err(io_err("read", &req.conf_src))?;
    let parsed = parse_conflist(&conf).map_err(|source| InstallError::Conflist {
        path: req.conf_src.clone(),
        source,
    })?;
    let plugin = req.plugin_dir.join(wire::CNI_PLUGIN_TYPE);
    install_file(&req.plugin_src, &plugin, Mode::Fixed(PLUGIN_MODE))?;
    install_from(&mut conf.as_slice(), &req.conf_dest, CONFLIST_MODE)?;
    Ok(CniInstalled {
        plugin,
        conflist: req.conf_dest.clone(),
        parsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_file_is_hidden_beside_the_destination() {
        assert_eq!(
            temp_path(Path::new("/etc/cni/net.d/10-flannel.conflist")).unwrap(),
            Path::new("/etc/cni/net.d/.10-flannel.conflist.tmp")
        );
        assert_eq!(temp_path(Path::new("x")).unwrap(), Path::new("./.x.tmp"));
        let e = temp_path(Path::new("/")).unwrap_err().to_string();
        assert!(e.contains("must name a file"), "{e}");
    }

    #[test]
    fn defaults_are_the_manifests_paths() {
        let d = CniInstall::default();
        assert_eq!(d.plugin_src, Path::new("/flannel"));
        assert_eq!(d.plugin_dir, Path::new("/opt/cni/bin"));
        assert_eq!(d.conf_src, Path::new("/etc/kube-flannel/cni-conf.json"));
        assert_eq!(d.conf_dest, Path::new("/etc/cni/net.d/10-flannel.conflist"));
    }
}
