//! Named network namespaces, as `ip netns` manages them (a bind mount of
//! `/proc/<tid>/ns/net` on `/run/netns/NAME`), and running code inside one.
//!
//! `setns(2)` changes the namespace of the calling *thread*. Doing that on an
//! async worker or the main thread would leak the namespace into unrelated
//! work, so [`NetNs::run`] always runs the closure on a dedicated OS thread.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};

/// Where `ip netns` pins named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Errors of namespace handling, with the namespace involved.
#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("netns {name}: {op}: {source}")]
    Sys {
        name: String,
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("netns {name}: {op}: {source}")]
    Io {
        name: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("netns {name}: the thread running inside it panicked")]
    Panicked { name: String },
}

fn sys<'a>(name: &'a str, op: &'static str) -> impl FnOnce(nix::Error) -> NetNsError + 'a {
    move |source| NetNsError::Sys {
        name: name.to_string(),
        op,
        source,
    }
}

fn io<'a>(name: &'a str, op: &'static str) -> impl FnOnce(std::io::Error) -> NetNsError + 'a {
    move |source| NetNsError::Io {
        name: name.to_string(),
        op,
        source,
    }
}

/// A handle on a network namespace (an open fd on its nsfs inode).
pub struct NetNs {
    /// Display name: the `ip netns` name or the path it was opened from.
    pub name: String,
    /// Bind-mount path when the namespace is named.
    pub path: Option<PathBuf>,
    fd: OwnedFd,
}

impl std::fmt::Debug for NetNs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetNs")
            .field("name", &self.name)
            .field("path", &self.path)
            .finish()
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A namespace name becomes a file name below [`NETNS_RUN_DIR`]: refuse
/// anything that could escape that directory.
fn check_name(name: &str) -> Result<(), NetNsError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(NetNsError::Io {
            name: name.to_string(),
            op: "check name",
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a namespace name must be a non-empty file name without '/' (like `ip netns add NAME`)",
            ),
        });
    }
    Ok(())
}

/// Serialises the "make /run/netns a shared mount point" step within this
/// process, so parallel tests do not stack several bind mounts on it.
static RUN_DIR_LOCK: Mutex<()> = Mutex::new(());

/// As `ip netns add` does: /run/netns must be a mount point with shared
/// propagation, so that namespace mounts made below it are seen by other
/// mount namespaces (and unmounts propagate back). If it is not a mount point
/// yet (`MS_SHARED` then fails with EINVAL), bind it onto itself first.
/// Only /run/netns is touched.
fn ensure_run_dir(name: &str) -> Result<(), NetNsError> {
    let _guard = RUN_DIR_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::create_dir_all(NETNS_RUN_DIR).map_err(io(name, "create /run/netns"))?;
    // Other processes (parallel test binaries, the CNI plugin) may do the
    // same at the same time: an flock on the directory inode (the same
    // inode before and after the bind mount) serialises us with them.
    let dir = std::fs::File::open(NETNS_RUN_DIR).map_err(io(name, "open /run/netns"))?;
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io(name, "lock /run/netns")(std::io::Error::last_os_error()));
    }
    let make_shared = || {
        mount(
            Some("none"),
            NETNS_RUN_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match make_shared() {
        Ok(()) => Ok(()),
        Err(Errno::EINVAL) => {
            mount(
                Some(NETNS_RUN_DIR),
                NETNS_RUN_DIR,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(sys(name, "bind mount /run/netns on itself"))?;
            make_shared().map_err(sys(name, "mount --make-rshared /run/netns"))
        }
        Err(e) => Err(sys(name, "mount --make-rshared /run/netns")(e)),
    }
}

/// Opens an nsfs file and checks that it really is one (an empty file left
/// behind in /run/netns would otherwise be accepted and fail much later).
fn open_nsfs(name: &str, path: &Path) -> Result<OwnedFd, NetNsError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io(name, "open"))?;
    let fd: OwnedFd = file.into();
    let st = fstatfs(&fd).map_err(sys(name, "fstatfs"))?;
    if st.filesystem_type() != NSFS_MAGIC {
        return Err(NetNsError::Io {
            name: name.to_string(),
            op: "open",
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} is not a namespace file (nsfs); it may be a stale leftover: remove it with `ip netns del`",
                    path.display()
                ),
            ),
        });
    }
    Ok(fd)
}

impl NetNs {
    /// `ip netns add NAME`: creates a namespace and pins it at `/run/netns/NAME`,
    /// with `lo` up.
    pub fn add(name: &str) -> Result<NetNs, NetNsError> {
        check_name(name)?;
        ensure_run_dir(name)?;
        let path = Path::new(NETNS_RUN_DIR).join(name);
        // O_EXCL: never take over somebody else's namespace of the same name.
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&path)
            .map_err(io(name, "create mount point file"))?;

        let pinned = std::thread::scope(|s| {
            s.spawn(|| -> Result<(), NetNsError> {
                // Only this short-lived thread moves into the new namespace.
                unshare(CloneFlags::CLONE_NEWNET).map_err(sys(name, "unshare(CLONE_NEWNET)"))?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &path,
                    Some("none"),
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(sys(name, "bind mount /proc/thread-self/ns/net"))?;
                Ok(())
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NetNsError::Panicked {
                    name: name.to_string(),
                })
            })
        });
        if let Err(e) = pinned {
            let _ = umount2(&path, MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }

        let result = (|| {
            let ns = NetNs::open(name)?;
            ns.run(|| -> Result<(), crate::Error> {
                let mut nl = crate::Netlink::open()?;
                match nl.link_by_name("lo")? {
                    Some(lo) => nl.set_link_up(lo.index),
                    None => Err(crate::Error::LinkNotFound {
                        op: "ip link set dev lo up".into(),
                        name: "lo".into(),
                    }),
                }
            })?
            .map_err(|e| NetNsError::Io {
                name: name.to_string(),
                op: "ip link set dev lo up",
                source: std::io::Error::other(e),
            })?;
            Ok(ns)
        })();
        if result.is_err() {
            let _ = NetNs::delete(name);
        }
        result
    }

    /// `ip netns` lookup: opens `/run/netns/NAME`.
    pub fn open(name: &str) -> Result<NetNs, NetNsError> {
        check_name(name)?;
        let path = Path::new(NETNS_RUN_DIR).join(name);
        let fd = open_nsfs(name, &path)?;
        Ok(NetNs {
            name: name.to_string(),
            path: Some(path),
            fd,
        })
    }

    /// Opens any nsfs path (`/proc/PID/ns/net`, `/var/run/netns/x`), as CNI_NETNS gives.
    pub fn open_path(path: &Path) -> Result<NetNs, NetNsError> {
        let name = path.display().to_string();
        let fd = open_nsfs(&name, path)?;
        Ok(NetNs {
            name,
            path: None,
            fd,
        })
    }

    /// The namespace of the calling thread (`/proc/thread-self/ns/net`).
    pub fn current() -> Result<NetNs, NetNsError> {
        NetNs::open_path(Path::new("/proc/thread-self/ns/net"))
    }

    /// Whether `other` is the same namespace as this one (the same nsfs
    /// inode: `stat -L -c %d:%i` of both paths match), however each was
    /// opened.
    pub fn same_namespace(&self, other: &NetNs) -> Result<bool, NetNsError> {
        let a = nix::sys::stat::fstat(&self.fd).map_err(sys(&self.name, "fstat"))?;
        let b = nix::sys::stat::fstat(&other.fd).map_err(sys(&other.name, "fstat"))?;
        Ok((a.st_dev, a.st_ino) == (b.st_dev, b.st_ino))
    }

    /// The namespace fd, e.g. for `Netlink::add_veth` or `set_link_netns`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Runs `f` on a fresh OS thread that has entered this namespace; the
    /// thread exits afterwards, so no other code ever runs in the wrong namespace.
    pub fn run<F, R>(&self, f: F) -> Result<R, NetNsError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        std::thread::scope(|s| {
            self.spawn_in(s, f).join().unwrap_or_else(|_| {
                Err(NetNsError::Panicked {
                    name: self.name.clone(),
                })
            })
        })
    }

    /// Like [`NetNs::run`] but returns at once: `f` runs on a new thread of
    /// `scope` that entered this namespace, so the caller can do other work
    /// before joining the handle for the result.
    pub fn spawn_in<'scope, 'env, F, R>(
        &'env self,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        f: F,
    ) -> std::thread::ScopedJoinHandle<'scope, Result<R, NetNsError>>
    where
        F: FnOnce() -> R + Send + 'scope,
        R: Send + 'scope,
    {
        scope.spawn(move || -> Result<R, NetNsError> {
            setns(&self.fd, CloneFlags::CLONE_NEWNET)
                .map_err(sys(&self.name, "setns(CLONE_NEWNET)"))?;
            Ok(f())
        })
    }

    /// `ip netns del NAME`: unmounts and removes `/run/netns/NAME`; absent is success.
    ///
    /// The namespace itself disappears (with its links) once nothing else
    /// holds it: no process inside, no open fd, no socket created in it.
    pub fn delete(name: &str) -> Result<(), NetNsError> {
        check_name(name)?;
        let path = Path::new(NETNS_RUN_DIR).join(name);
        // MNT_DETACH: a lazy unmount succeeds even while another thread
        // still has the namespace file open.
        match umount2(&path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(sys(name, "umount")(e)),
        }
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(name, "remove mount point file")(e)),
        }
    }
}

/// Writes a sysctl of the *calling thread's* network namespace, e.g.
/// `set_sysctl("net/ipv4/ip_forward", "1")` inside [`NetNs::run`]. The
/// `/proc/sys/net` files resolve to the namespace of the opener.
///
/// `sysctl -w KEY=VALUE`: the key is a path below `/proc/sys`; the dotted
/// form (`net.ipv4.ip_forward`) is accepted when it contains no `/` (use the
/// slash form for interface names with dots, e.g. `net/ipv4/conf/eth0.10/rp_filter`).
pub fn set_sysctl(key: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(sysctl_path(key)?, value.as_bytes())
}

/// Reads a sysctl of the calling thread's network namespace (`sysctl KEY`),
/// with the trailing newline removed.
pub fn get_sysctl(key: &str) -> std::io::Result<String> {
    let s = std::fs::read_to_string(sysctl_path(key)?)?;
    Ok(s.trim_end_matches('\n').to_string())
}

fn sysctl_path(key: &str) -> std::io::Result<PathBuf> {
    let rel = if key.contains('/') {
        key.to_string()
    } else {
        key.replace('.', "/")
    };
    if rel.is_empty() || rel.starts_with('/') || rel.split('/').any(|c| c.is_empty() || c == "..") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid sysctl key {key:?}: expected e.g. net/ipv4/ip_forward"),
        ));
    }
    Ok(Path::new("/proc/sys").join(rel))
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named namespace removed on drop (also when a test panics), for tests and the lab.
pub struct ScopedNetNs {
    pub ns: NetNs,
}

impl ScopedNetNs {
    /// Creates `PREFIX-<pid>-<counter>` so that parallel tests never collide.
    pub fn unique(prefix: &str) -> Result<ScopedNetNs, NetNsError> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        Ok(ScopedNetNs {
            ns: NetNs::add(&name)?,
        })
    }
}

impl std::ops::Deref for ScopedNetNs {
    type Target = NetNs;
    fn deref(&self) -> &NetNs {
        &self.ns
    }
}

impl Drop for ScopedNetNs {
    fn drop(&mut self) {
        let _ = NetNs::delete(&self.ns.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_keys() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").unwrap(),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.10/rp_filter").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/eth0.10/rp_filter")
        );
        for bad in [
            "",
            "/etc/passwd",
            "net/../../etc",
            "net//ipv4",
            "..",
            "net/",
        ] {
            assert!(sysctl_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn names() {
        assert!(check_name("fnl-1-2").is_ok());
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
