//! The local directory store: leases kept as files in a directory shared by
//! every flanneld process of one machine (the lab runs several daemons in
//! several network namespaces on one filesystem).
//!
//! # Layout
//!
//! ```text
//! DIR/
//!   lock                     empty; flock(2)ed around every read-modify-write
//!   revision                 decimal counter, +1 on every change of subnets/
//!   config                   optional: the net-conf JSON (see get_network_config)
//!   subnets/
//!     10.244.1.0-24          one file per lease, named by the LeaseKey string
//!     10.244.2.0-24&fd00:10:244:2::-64
//!     .tmp.*                 a write in progress (ignored by readers)
//! ```
//!
//! A lease file holds one JSON record:
//!
//! ```json
//! {"LeaseAttrs":{"PublicIP":"172.16.1.14","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"26:62:24:f0:61:01"}},"ExpiresUnixMs":1764213406123}
//! ```
//!
//! `LeaseAttrs` is upstream's lease value, byte for byte. `ExpiresUnixMs` is
//! the expiration in milliseconds since the Unix epoch; `null` (or absent)
//! makes the lease a reservation, which never expires and is never handed to
//! another node. An operator can reserve a subnet by writing such a file by
//! hand (write it elsewhere and `mv` it in, so no reader sees half a file).
//!
//! # Concurrency
//!
//! Every writer holds an exclusive `flock` on `DIR/lock` for its whole
//! read-modify-write, so two daemons starting at the same instant cannot both
//! create the same subnet. Files are replaced atomically (temp file in the same
//! directory, fsync, rename, fsync of the directory), so lock-free readers
//! (the watch) never see a torn file. Full scans take the lock shared so the
//! revision they report matches what they read.
//!
//! `create_lease` is create-if-absent widened to "create if no live lease
//! overlaps the key in either family": in dual stack two racing nodes can
//! pick the same IPv4 subnet with different IPv6 subnets, which are
//! different file names; a plain exists-check would hand the subnet out twice.
//!
//! A writer garbage-collects what it finds under the lock: expired leases and
//! `.tmp.*` files (with the lock held exclusively no write can be in progress,
//! so any temp file is a leftover of a crashed writer).
//!
//! A file whose name is not a lease key or whose content does not parse is
//! skipped with a warning naming it; it never hides the other leases. So is
//! anything that is not a regular file (a FIFO, a directory, a symlink, a
//! device) or is larger than 64 KiB: files are opened with `O_NONBLOCK |
//! O_NOFOLLOW` and checked with `fstat` before a byte is read, so nothing in
//! `subnets/` can block a reader. A create
//! on such a key replaces it (it is not a lease anybody can be holding).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use flannel_core::lease::{
    from_unix_ms, to_unix_ms, Lease, LeaseAttrs, LeaseEvent, LeaseKey, LeaseRecord,
};
use flannel_core::wire;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::sync::mpsc;

use crate::{LeaseSnapshot, Result, Store, StoreError, WatchEvent};

/// Default interval of the watch's safety resync (a full rescan that only
/// emits differences; inotify is the real source of events).
pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(60);

/// Capacity of a watch channel. The watch thread waits when it is full.
const WATCH_CHANNEL_CAPACITY: usize = 256;

/// The watch thread wakes at least this often to notice a dropped receiver
/// (a closed mpsc channel cannot be polled together with the inotify fd).
const WATCH_MAX_SLEEP: Duration = Duration::from_secs(5);

/// After a failed read the watch resyncs this soon.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// Below this many files per thread, a full read stays on one thread.
const PARALLEL_READ_MIN: usize = 1024;

/// Prefix of files being written; readers ignore every dot file.
const TMP_PREFIX: &str = ".tmp.";

/// A lease store in a local directory shared by the flanneld processes of one
/// machine. See the module documentation for the layout.
#[derive(Debug)]
pub struct LocalStore {
    layout: Arc<Layout>,
    resync_interval: Duration,
    /// Read end of a pipe whose write end only this store holds: when the
    /// store is dropped the write end closes, every watch thread sees POLLHUP
    /// and stops, which closes its channel.
    shutdown_rx: Arc<OwnedFd>,
    _shutdown_tx: OwnedFd,
}

/// The paths of a store directory.
#[derive(Debug)]
struct Layout {
    dir: PathBuf,
    subnets: PathBuf,
    lock: PathBuf,
    revision: PathBuf,
    config: PathBuf,
}

/// What reading one file of `subnets/` gave.
#[derive(Debug)]
enum FileState {
    Absent,
    /// Not a lease: the reason, for the warning.
    Bad(String),
    /// Could not be read now for a reason that passes (out of file
    /// descriptors or memory): says nothing about the lease, which must be
    /// neither skipped nor dropped; the operation fails or retries.
    Unreadable(std::io::Error),
    Lease(Lease),
}

impl LocalStore {
    /// Opens (creating if needed) the store in `dir`: `mkdir -p DIR/subnets`,
    /// creates `DIR/lock` and `DIR/revision` when missing.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let layout = Layout {
            subnets: dir.join(wire::LOCAL_STORE_SUBNETS_DIR),
            lock: dir.join(wire::LOCAL_STORE_LOCK_FILE),
            revision: dir.join(wire::LOCAL_STORE_REVISION_FILE),
            config: dir.join(wire::LOCAL_STORE_CONFIG_FILE),
            dir,
        };
        fs::create_dir_all(&layout.subnets).map_err(|e| io_err(&layout.subnets, e))?;
        {
            let _lock = layout.lock(FlockArg::LockExclusive)?;
            match fs::metadata(&layout.revision) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    layout.write_atomic(&layout.dir, &layout.revision, b"0\n")?;
                }
                Err(e) => return Err(io_err(&layout.revision, e)),
            }
        }
        let (rx, tx) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| StoreError::Io {
            path: "pipe (watch shutdown)".into(),
            source: e.into(),
        })?;
        Ok(LocalStore {
            layout: Arc::new(layout),
            resync_interval: DEFAULT_RESYNC_INTERVAL,
            shutdown_rx: Arc::new(rx),
            _shutdown_tx: tx,
        })
    }

    /// Sets the interval of the watch's safety resync (default 60 s) for
    /// watches started afterwards.
    pub fn with_resync_interval(mut self, interval: Duration) -> Self {
        self.resync_interval = interval;
        self
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.layout.dir
    }

    /// The file that holds (or would hold) the lease `key`.
    pub fn lease_path(&self, key: &LeaseKey) -> PathBuf {
        self.layout.subnets.join(key.to_string())
    }

    /// Writes many leases at once, as they are (expiration included), each
    /// replacing any file of its key: for loading a store in bulk (a
    /// benchmark's thousands of peers, a migration). Unlike
    /// [`Store::create_lease`] it checks no overlap and collects no
    /// garbage: the caller vouches for the set. One exclusive lock and one
    /// revision bump for all; every file is still replaced atomically
    /// (written aside, renamed in), so watchers never see half a file. With
    /// `durable` the files are synced (one `syncfs`) before they are renamed
    /// in and the directory after, and the revision is bumped; without,
    /// nothing is synced and the revision (whose file is written with a
    /// sync) stays: a throwaway store, a benchmark's, where a sync would
    /// measure the disk.
    pub async fn import(&self, leases: Vec<Lease>, durable: bool) -> Result<()> {
        self.blocking(move |l| {
            let _lock = l.lock(FlockArg::LockExclusive)?;
            l.ensure_subnets_dir()?;
            let mut staged = Vec::with_capacity(leases.len());
            for (i, lease) in leases.iter().enumerate() {
                let name = file_name(&lease.key)?;
                let tmp = l
                    .subnets
                    .join(format!("{TMP_PREFIX}import.{}.{i}", std::process::id()));
                fs::write(&tmp, record_json(lease)).map_err(|e| io_err(&tmp, e))?;
                staged.push((tmp, l.subnets.join(name)));
            }
            if durable {
                let dir = File::open(&l.subnets).map_err(|e| io_err(&l.subnets, e))?;
                nix::unistd::syncfs(&dir).map_err(|e| io_err(&l.subnets, e.into()))?;
            }
            for (tmp, path) in &staged {
                fs::rename(tmp, path).map_err(|e| io_err(path, e))?;
            }
            if durable {
                l.sync_subnets_dir()?;
                l.bump_revision()?;
            }
            Ok(())
        })
        .await
    }

    /// Runs blocking file work off the async workers.
    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Layout) -> Result<T> + Send + 'static,
    {
        let layout = Arc::clone(&self.layout);
        tokio::task::spawn_blocking(move || f(&layout))
            .await
            .map_err(|e| StoreError::Unavailable(format!("local store worker failed: {e}")))?
    }
}

impl Store for LocalStore {
    /// `DIR/config` when it exists (lets a lab or test ship the net-conf with
    /// the store), else `Ok(None)`: the config comes from `--net-config-path`.
    async fn get_network_config(&self) -> Result<Option<String>> {
        self.blocking(|l| match fs::read_to_string(&l.config) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&l.config, e)),
        })
        .await
    }

    async fn list_leases(&self) -> Result<LeaseSnapshot> {
        self.blocking(|l| {
            let _lock = l.lock(FlockArg::LockShared)?;
            let revision = l.read_revision()?;
            let leases = l.valid_leases(SystemTime::now())?.into_values().collect();
            Ok(LeaseSnapshot { leases, revision })
        })
        .await
    }

    async fn create_lease(&self, lease: &Lease, ttl: Option<Duration>) -> Result<Option<Lease>> {
        let lease = lease.clone();
        self.blocking(move |l| {
            let name = file_name(&lease.key)?;
            let _lock = l.lock(FlockArg::LockExclusive)?;
            let now = SystemTime::now();
            let (mut changed, live) = l.collect_garbage(now, None)?;
            // Create-if-absent, widened to "if no live lease overlaps": in
            // dual stack two racing nodes may pick the same IPv4 subnet with
            // different IPv6 ones (different file names), and a config change
            // may leave leases of another length. Neither may be doubled.
            let taken = live.values().find(|held| held.key.overlaps(&lease.key));
            let result = match (taken, l.read_lease(&name)) {
                (None, FileState::Unreadable(e)) => return Err(io_err(&l.subnets.join(&name), e)),
                (Some(held), _) => {
                    tracing::debug!(wanted = %name, held = %held.key, "subnet already leased");
                    None
                }
                (None, state) => {
                    if let FileState::Bad(why) = state {
                        tracing::warn!(file = %l.subnets.join(&name).display(), problem = %why,
                            "replacing an unreadable lease file on create");
                    }
                    let stored = stamp(&lease, ttl, now);
                    l.write_lease(&name, &stored)?;
                    changed = true;
                    Some(stored)
                }
            };
            if changed {
                l.bump_revision()?;
            }
            Ok(result)
        })
        .await
    }

    /// Fails with [`StoreError::NotFound`] when the lease is gone (revoked,
    /// or expired and collected) and with [`StoreError::Conflict`] when the
    /// file is held by another node (another PublicIP/PublicIPv6). A lease
    /// that expired but is still on disk is revived: nobody else can hold it.
    async fn update_lease(&self, lease: &Lease, ttl: Option<Duration>) -> Result<Lease> {
        let lease = lease.clone();
        self.blocking(move |l| {
            let name = file_name(&lease.key)?;
            let _lock = l.lock(FlockArg::LockExclusive)?;
            let now = SystemTime::now();
            let (collected, others) = l.collect_garbage(now, Some(&name))?;
            let outcome = match l.read_lease(&name) {
                FileState::Absent => Err(StoreError::NotFound { key: name.clone() }),
                FileState::Unreadable(e) => Err(io_err(&l.subnets.join(&name), e)),
                FileState::Bad(why) => Err(StoreError::InvalidLease {
                    key: name.clone(),
                    detail: format!("stored file cannot be updated: {why}"),
                }),
                FileState::Lease(held) if !same_owner(&held.attrs, &lease.attrs) => {
                    Err(StoreError::Conflict {
                        key: name.clone(),
                        detail: format!(
                            "held by PublicIP {} / PublicIPv6 {}, not by the updater ({} / {})",
                            show(held.attrs.public_ip),
                            show(held.attrs.public_ipv6),
                            show(lease.attrs.public_ip),
                            show(lease.attrs.public_ipv6)
                        ),
                    })
                }
                FileState::Lease(held)
                    if held.is_expired(now)
                        && others.values().any(|o| o.key.overlaps(&lease.key)) =>
                {
                    // Expired, and meanwhile another node leased an
                    // overlapping key (another IPv6 half, another length).
                    let o = others.values().find(|o| o.key.overlaps(&lease.key));
                    Err(StoreError::Conflict {
                        key: name.clone(),
                        detail: format!(
                            "the lease expired and {} now holds an overlapping subnet",
                            o.map_or_else(String::new, |o| o.key.to_string())
                        ),
                    })
                }
                FileState::Lease(_) => {
                    let stored = stamp(&lease, ttl, now);
                    l.write_lease(&name, &stored).map(|()| stored)
                }
            };
            if collected || outcome.is_ok() {
                l.bump_revision()?;
            }
            outcome
        })
        .await
    }

    async fn delete_lease(&self, key: &LeaseKey) -> Result<()> {
        let key = *key;
        self.blocking(move |l| {
            let name = file_name(&key)?;
            let _lock = l.lock(FlockArg::LockExclusive)?;
            let (mut changed, _) = l.collect_garbage(SystemTime::now(), None)?;
            let path = l.subnets.join(&name);
            match fs::remove_file(&path) {
                Ok(()) => {
                    changed = true;
                    l.sync_subnets_dir()?;
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path, e)),
            }
            if changed {
                l.bump_revision()?;
            }
            Ok(())
        })
        .await
    }

    /// Watches `DIR/subnets` with inotify from a dedicated thread: each event
    /// re-reads only the file it names; a timer emits `Removed` when the
    /// nearest expiration passes; an inotify queue overflow sends a fresh
    /// `Snapshot`; a slow resync (default 60 s) emits only differences.
    async fn watch_leases(&self) -> Result<mpsc::Receiver<WatchEvent>> {
        let layout = Arc::clone(&self.layout);
        let shutdown = Arc::clone(&self.shutdown_rx);
        let resync_interval = self.resync_interval;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY);
        // Setup is blocking (inotify, first scan), so it runs off the async
        // workers too; errors reach the caller, later ones are logged.
        let watcher = tokio::task::spawn_blocking(move || {
            Watcher::start(layout, tx, shutdown, resync_interval)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("local store watch setup failed: {e}")))??;
        std::thread::Builder::new()
            .name("local-store-watch".into())
            .spawn(move || watcher.run())
            .map_err(|e| StoreError::Unavailable(format!("cannot start watch thread: {e}")))?;
        Ok(rx)
    }
}

impl Layout {
    /// `flock DIR/lock`; released when the guard drops.
    fn lock(&self, arg: FlockArg) -> Result<Flock<File>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.lock)
            .map_err(|e| io_err(&self.lock, e))?;
        // flock is per open file description: opening the file anew for every
        // operation makes threads of one process exclude each other too.
        let mut file = file;
        loop {
            match Flock::lock(file, arg) {
                Ok(guard) => return Ok(guard),
                Err((f, Errno::EINTR)) => file = f,
                Err((_, errno)) => return Err(io_err(&self.lock, errno.into())),
            }
        }
    }

    fn read_revision(&self) -> Result<u64> {
        match fs::read_to_string(&self.revision) {
            Ok(s) => s.trim().parse().map_err(|e| StoreError::Io {
                path: self.revision.display().to_string(),
                source: std::io::Error::new(
                    ErrorKind::InvalidData,
                    format!("not a decimal counter ({e}); delete the file to restart at 0"),
                ),
            }),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_err(&self.revision, e)),
        }
    }

    /// Caller holds the exclusive lock.
    fn bump_revision(&self) -> Result<u64> {
        let next = self.read_revision()? + 1;
        self.write_atomic(&self.dir, &self.revision, format!("{next}\n").as_bytes())?;
        Ok(next)
    }

    /// Writes `path` (inside `dir`) so that no reader ever sees part of it:
    /// temp file in the same directory, fsync, rename over, fsync the directory.
    fn write_atomic(&self, dir: &Path, path: &Path, data: &[u8]) -> Result<()> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let base = path
            .file_name()
            .and_then(OsStr::to_str)
            .unwrap_or("file")
            .to_owned();
        let tmp = dir.join(format!(
            "{TMP_PREFIX}{base}.{}.{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&tmp, e));
        }
        if let Err(e) = fs::rename(&tmp, path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(path, e));
        }
        sync_dir(dir)
    }

    fn write_lease(&self, name: &str, lease: &Lease) -> Result<()> {
        let json = record_json(lease);
        self.write_atomic(&self.subnets, &self.subnets.join(name), &json)
    }

    fn sync_subnets_dir(&self) -> Result<()> {
        sync_dir(&self.subnets)
    }

    /// Reads one file of `subnets/`; no lock needed (files are replaced atomically).
    fn read_lease(&self, name: &str) -> FileState {
        let key: LeaseKey = match name.parse() {
            Ok(k) => k,
            Err(e) => return FileState::Bad(format!("file name is not a lease key: {e}")),
        };
        // Another spelling of a key (`010.244.1.0-24`) would let a create on
        // the canonical name hand the same subnet out twice.
        let canonical = key.to_string();
        if canonical != name {
            return FileState::Bad(format!(
                "file name is not the canonical lease key; rename it to {canonical}"
            ));
        }
        let path = self.subnets.join(name);
        let data = match read_regular(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == ErrorKind::NotFound => return FileState::Absent,
            Err(e) if is_transient(&e) => return FileState::Unreadable(e),
            Err(e) => return FileState::Bad(format!("cannot read: {e}")),
        };
        match LeaseRecord::from_json(&data) {
            Ok(r) => FileState::Lease(Lease {
                key,
                expiration: r.expiration(),
                attrs: r.attrs,
            }),
            Err(e) => FileState::Bad(format!(
                "content is not a lease record ({e}); expected {{\"LeaseAttrs\":{{...}},\"ExpiresUnixMs\":<ms or null>}}"
            )),
        }
    }

    /// Recreates `DIR/subnets` if someone removed it; writers call it under the lock.
    fn ensure_subnets_dir(&self) -> Result<()> {
        fs::create_dir_all(&self.subnets).map_err(|e| io_err(&self.subnets, e))
    }

    /// Names of the lease files (dot files excluded); none when the directory is gone.
    fn names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let entries = match fs::read_dir(&self.subnets) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(names),
            Err(e) => return Err(io_err(&self.subnets, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&self.subnets, e))?;
            match entry.file_name().into_string() {
                Ok(n) if n.starts_with('.') => {}
                Ok(n) => names.push(n),
                Err(n) => tracing::warn!(file = %self.subnets.join(&n).display(),
                    "skipping lease file: name is not UTF-8"),
            }
        }
        names.sort();
        Ok(names)
    }

    /// Reads many files of `subnets/`, on a few threads when there are
    /// many (each file is an open, a read and a parse: thousands of them are
    /// most of a cold start).
    fn read_many(&self, names: &[String]) -> Vec<FileState> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(4)
            .min(names.len() / PARALLEL_READ_MIN + 1);
        if threads <= 1 {
            return names.iter().map(|n| self.read_lease(n)).collect();
        }
        let chunk = names.len().div_ceil(threads);
        std::thread::scope(|s| {
            let parts: Vec<_> = names
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || part.iter().map(|n| self.read_lease(n)).collect::<Vec<_>>())
                })
                .collect();
            parts
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    }

    /// Every readable, unexpired lease by file name; bad files are skipped with a warning.
    fn valid_leases(&self, now: SystemTime) -> Result<BTreeMap<String, Lease>> {
        let mut out = BTreeMap::new();
        let names = self.names()?;
        let states = self.read_many(&names);
        for (name, state) in names.into_iter().zip(states) {
            match state {
                FileState::Lease(l) if !l.is_expired(now) => {
                    out.insert(name, l);
                }
                FileState::Lease(_) | FileState::Absent => {}
                FileState::Unreadable(e) => return Err(io_err(&self.subnets.join(&name), e)),
                FileState::Bad(why) => {
                    tracing::warn!(file = %self.subnets.join(&name).display(), problem = %why,
                        "skipping lease file")
                }
            }
        }
        Ok(out)
    }

    /// Removes `.tmp.*` files in `dir` (left by a writer that crashed
    /// between create and rename). Caller holds the exclusive lock.
    fn remove_stale_temp_files(&self, dir: &Path) -> Result<()> {
        let entries = fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_err(dir, e))?;
            if !entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                continue;
            }
            match fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::debug!(file = %entry.path().display(), "removed stale temp file")
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&entry.path(), e)),
            }
        }
        Ok(())
    }

    /// Deletes expired leases (except `keep`) and temp files left by crashed
    /// writers. Caller holds the exclusive lock. Returns whether a lease was
    /// deleted, and the live leases that remain (by file name).
    fn collect_garbage(
        &self,
        now: SystemTime,
        keep: Option<&str>,
    ) -> Result<(bool, BTreeMap<String, Lease>)> {
        self.ensure_subnets_dir()?;
        self.remove_stale_temp_files(&self.dir)?;
        let mut deleted = false;
        let mut live = BTreeMap::new();
        let mut names = Vec::new();
        let mut doomed = Vec::new();
        let entries = fs::read_dir(&self.subnets).map_err(|e| io_err(&self.subnets, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&self.subnets, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with(TMP_PREFIX) {
                doomed.push((name, false));
            } else if !name.starts_with('.') && Some(name.as_str()) != keep {
                names.push(name);
            }
        }
        let states = self.read_many(&names);
        for (name, state) in names.into_iter().zip(states) {
            match state {
                FileState::Lease(l) if l.is_expired(now) => doomed.push((name, true)),
                FileState::Lease(l) => {
                    live.insert(name, l);
                }
                FileState::Absent | FileState::Bad(_) => {}
                FileState::Unreadable(e) => return Err(io_err(&self.subnets.join(&name), e)),
            }
        }
        for (name, lease) in doomed {
            let path = self.subnets.join(&name);
            match fs::remove_file(&path) {
                Ok(()) => {
                    if lease {
                        tracing::debug!(file = %path.display(), "deleted expired lease");
                        deleted = true;
                    }
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path, e)),
            }
        }
        if deleted {
            self.sync_subnets_dir()?;
        }
        Ok((deleted, live))
    }
}

/// What a watch remembers of one lease: enough to tell a change and to
/// expire it, not the lease itself.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cached {
    expiration: Option<SystemTime>,
    digest: u64,
}

/// The watch's view of the directory: digests by lease key (a lease file's
/// name is its key's canonical form, [`Layout::read_lease`] refuses any
/// other), and the expirations in order, so that an event and the expiry
/// timer cost what they concern, not the number of leases.
#[derive(Debug, Default, PartialEq, Eq)]
struct Cache {
    by_key: BTreeMap<LeaseKey, Cached>,
    expiring: BTreeSet<(SystemTime, LeaseKey)>,
}

/// A digest of everything a lease says (key, expiration, attributes).
fn digest(l: &Lease) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    l.key.hash(&mut h);
    l.expiration.hash(&mut h);
    l.attrs.to_json().hash(&mut h);
    h.finish()
}

impl Cache {
    /// The cache of a full read, built at once: a map grown by inserts in
    /// key order leaves its nodes about half empty (20,000 leases).
    fn of<'l>(leases: impl IntoIterator<Item = &'l Lease> + Clone) -> Cache {
        Cache {
            by_key: leases
                .clone()
                .into_iter()
                .map(|l| {
                    let c = Cached {
                        expiration: l.expiration,
                        digest: digest(l),
                    };
                    (l.key, c)
                })
                .collect(),
            expiring: leases
                .into_iter()
                .filter_map(|l| Some((l.expiration?, l.key)))
                .collect(),
        }
    }

    fn holds(&self, l: &Lease) -> bool {
        self.by_key
            .get(&l.key)
            .is_some_and(|c| c.expiration == l.expiration && c.digest == digest(l))
    }

    fn insert(&mut self, l: &Lease) {
        self.remove(&l.key);
        if let Some(t) = l.expiration {
            self.expiring.insert((t, l.key));
        }
        self.by_key.insert(
            l.key,
            Cached {
                expiration: l.expiration,
                digest: digest(l),
            },
        );
    }

    /// Forgets a lease; its key when it was known.
    fn remove(&mut self, key: &LeaseKey) -> Option<LeaseKey> {
        let c = self.by_key.remove(key)?;
        if let Some(t) = c.expiration {
            self.expiring.remove(&(t, *key));
        }
        Some(*key)
    }

    /// Forgets the lease of the file `name` (a name that is no lease key
    /// never held one).
    fn remove_file(&mut self, name: &str) -> Option<LeaseKey> {
        self.remove(&name.parse().ok()?)
    }

    /// Forgets the leases expired by `now`; their keys.
    fn expire(&mut self, now: SystemTime) -> Vec<LeaseKey> {
        let mut gone = Vec::new();
        while let Some(&(t, key)) = self.expiring.first() {
            if t > now {
                break;
            }
            gone.extend(self.remove(&key));
        }
        gone
    }

    fn nearest_expiration(&self) -> Option<SystemTime> {
        self.expiring.first().map(|(t, _)| *t)
    }

    #[cfg(test)]
    fn keys(&self) -> Vec<LeaseKey> {
        self.by_key.keys().copied().collect()
    }
}

/// The watch: one per `watch_leases` call, on its own OS thread.
struct Watcher {
    layout: Arc<Layout>,
    tx: mpsc::Sender<WatchEvent>,
    shutdown: Arc<OwnedFd>,
    inotify: Inotify,
    /// The watch on `DIR/subnets`.
    wd: WatchDescriptor,
    /// False after the directory vanished and re-adding the watch failed.
    watching: bool,
    /// What the receiver knows: unexpired leases by file name, as digests
    /// (the receiver holds the leases themselves).
    cache: Cache,
    resync_interval: Duration,
    next_resync: Instant,
}

impl Watcher {
    fn watch_mask() -> AddWatchFlags {
        AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
    }

    /// Adds the inotify watch, then reads the snapshot (in that order, so no
    /// change between the two is lost) and queues it.
    fn start(
        layout: Arc<Layout>,
        tx: mpsc::Sender<WatchEvent>,
        shutdown: Arc<OwnedFd>,
        resync_interval: Duration,
    ) -> Result<Self> {
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(|e| {
                StoreError::Io {
                    path: "inotify_init1".into(),
                    source: e.into(),
                }
            })?;
        let wd = inotify
            .add_watch(&layout.subnets, Self::watch_mask())
            .map_err(|e| io_err(&layout.subnets, e.into()))?;
        let mut w = Watcher {
            layout,
            tx,
            shutdown,
            inotify,
            wd,
            watching: true,
            cache: Cache::default(),
            resync_interval,
            next_resync: Instant::now() + resync_interval,
        };
        let snapshot = w.full_read()?;
        w.tx.try_send(WatchEvent::Snapshot(snapshot))
            .map_err(|_| StoreError::Unavailable("watch receiver dropped during setup".into()))?;
        Ok(w)
    }

    fn run(mut self) {
        match self.run_loop() {
            Ok(()) => {
                tracing::debug!(dir = %self.layout.dir.display(), "local store watch stopped")
            }
            Err(e) => tracing::error!(dir = %self.layout.dir.display(), error = %e,
                "local store watch failed; closing the watch channel"),
        }
    }

    /// Returns when the receiver or the store is dropped.
    fn run_loop(&mut self) -> Result<()> {
        loop {
            if self.tx.is_closed() {
                return Ok(());
            }
            let now = SystemTime::now();
            let expired = self.expire(now);
            if !expired.is_empty() {
                self.send_events(expired)?;
            }

            let mut sleep =
                WATCH_MAX_SLEEP.min(self.next_resync.saturating_duration_since(Instant::now()));
            if let Some(exp) = self.nearest_expiration() {
                sleep = sleep.min(exp.duration_since(now).unwrap_or_default());
            }
            // Round up: waking a hair early would only loop back to poll.
            let ms = sleep.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            let (inotify_ready, shutdown) = {
                let mut fds = [
                    PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.shutdown.as_fd(), PollFlags::POLLIN),
                ];
                match poll(
                    &mut fds,
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
                ) {
                    Ok(_) => {}
                    Err(Errno::EINTR) => continue,
                    Err(e) => {
                        return Err(StoreError::Io {
                            path: "poll (inotify)".into(),
                            source: e.into(),
                        })
                    }
                }
                (
                    fds[0].any().unwrap_or(false),
                    fds[1].revents().is_some_and(|r| !r.is_empty()),
                )
            };
            if shutdown {
                return Ok(());
            }
            let mut outcome = Ok(());
            if inotify_ready {
                outcome = self.handle_inotify();
            }
            if outcome.is_ok() && Instant::now() >= self.next_resync {
                outcome = self.resync();
            }
            if let Err(e) = outcome {
                if self.tx.is_closed() {
                    return Ok(());
                }
                // A failed read (a file system hiccup) must not end the watch:
                // the resync a second from now repairs the receiver's view.
                tracing::warn!(dir = %self.layout.subnets.display(), error = %e,
                    "local store watch: read failed; resyncing in 1 s");
                self.next_resync = self.next_resync.min(Instant::now() + RETRY_AFTER_ERROR);
            }
        }
    }

    fn handle_inotify(&mut self) -> Result<()> {
        let mut names = BTreeSet::new();
        let mut overflow = false;
        let mut lost_dir = false;
        loop {
            match self.inotify.read_events() {
                Ok(events) => {
                    for ev in events {
                        if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                            overflow = true;
                        }
                        // Only the current watch: after a re-add, the old
                        // watch's IN_IGNORED still arrives and means nothing.
                        if ev.wd == self.wd
                            && ev.mask.intersects(
                                AddWatchFlags::IN_IGNORED
                                    | AddWatchFlags::IN_DELETE_SELF
                                    | AddWatchFlags::IN_MOVE_SELF,
                            )
                        {
                            lost_dir = true;
                        }
                        if let Some(name) = ev.name.and_then(|n| n.into_string().ok()) {
                            if !name.starts_with('.') {
                                names.insert(name);
                            }
                        }
                    }
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(StoreError::Io {
                        path: format!("inotify on {}", self.layout.subnets.display()),
                        source: e.into(),
                    })
                }
            }
        }
        self.apply(names, overflow, lost_dir)
    }

    /// Recreates `DIR/subnets` if needed and watches it again.
    fn rewatch(&mut self) -> Result<()> {
        fs::create_dir_all(&self.layout.subnets).map_err(|e| io_err(&self.layout.subnets, e))?;
        self.wd = self
            .inotify
            .add_watch(&self.layout.subnets, Self::watch_mask())
            .map_err(|e| io_err(&self.layout.subnets, e.into()))?;
        self.watching = true;
        Ok(())
    }

    /// Turns one batch of inotify events into watch messages.
    fn apply(&mut self, names: BTreeSet<String>, overflow: bool, lost_dir: bool) -> Result<()> {
        if lost_dir {
            // Someone removed or moved DIR/subnets: watch a fresh one and
            // tell the receiver what is there now.
            tracing::warn!(dir = %self.layout.subnets.display(),
                "lease directory removed or moved; recreating it and resending a snapshot");
            self.watching = false;
            self.rewatch()?;
        }
        if overflow || lost_dir {
            // Events were lost: only a full snapshot is trustworthy.
            let snapshot = self.full_read()?;
            return self.send(WatchEvent::Snapshot(snapshot));
        }
        let now = SystemTime::now();
        let events: Vec<LeaseEvent> = names
            .into_iter()
            .filter_map(|n| self.refresh(&n, now))
            .collect();
        if events.is_empty() {
            Ok(())
        } else {
            self.send_events(events)
        }
    }

    /// Re-reads one file and returns what changed for the receiver.
    fn refresh(&mut self, name: &str, now: SystemTime) -> Option<LeaseEvent> {
        match self.layout.read_lease(name) {
            FileState::Lease(l) if !l.is_expired(now) => {
                if self.cache.holds(&l) {
                    None
                } else {
                    self.cache.insert(&l);
                    Some(LeaseEvent::Upsert(l))
                }
            }
            FileState::Lease(_) | FileState::Absent => {
                self.cache.remove_file(name).map(LeaseEvent::Removed)
            }
            FileState::Unreadable(e) => {
                // The receiver keeps what it knows; a full read soon
                // catches up.
                tracing::warn!(file = %self.layout.subnets.join(name).display(), error = %e,
                    "cannot read lease file now; keeping the last known state and retrying in 1 s");
                self.next_resync = self.next_resync.min(Instant::now() + RETRY_AFTER_ERROR);
                None
            }
            FileState::Bad(why) => {
                tracing::warn!(file = %self.layout.subnets.join(name).display(), problem = %why,
                    "skipping lease file");
                self.cache.remove_file(name).map(LeaseEvent::Removed)
            }
        }
    }

    /// Drops the leases that expired by `now` and returns their `Removed`.
    fn expire(&mut self, now: SystemTime) -> Vec<LeaseEvent> {
        self.cache
            .expire(now)
            .into_iter()
            .map(LeaseEvent::Removed)
            .collect()
    }

    fn nearest_expiration(&self) -> Option<SystemTime> {
        self.cache.nearest_expiration()
    }

    /// Full scan under the shared lock; replaces the cache.
    fn full_read(&mut self) -> Result<LeaseSnapshot> {
        let (revision, leases) = {
            let _lock = self.layout.lock(FlockArg::LockShared)?;
            (
                self.layout.read_revision()?,
                self.layout.valid_leases(SystemTime::now())?,
            )
        };
        self.next_resync = Instant::now() + self.resync_interval;
        self.cache = Cache::of(leases.values());
        Ok(LeaseSnapshot {
            leases: leases.into_values().collect(),
            revision,
        })
    }

    /// The safety resync: a full scan that sends only the differences.
    fn resync(&mut self) -> Result<()> {
        if !self.watching {
            self.rewatch()?;
        }
        let old = std::mem::take(&mut self.cache);
        let snapshot = self.full_read()?;
        let mut events = Vec::new();
        for key in old.by_key.keys() {
            if !self.cache.by_key.contains_key(key) {
                events.push(LeaseEvent::Removed(*key));
            }
        }
        for l in snapshot.leases {
            if !old.holds(&l) {
                events.push(LeaseEvent::Upsert(l));
            }
        }
        if !events.is_empty() {
            tracing::debug!(
                count = events.len(),
                "local store resync found missed changes"
            );
            self.send_events(events)?;
        }
        Ok(())
    }

    fn send_events(&self, events: Vec<LeaseEvent>) -> Result<()> {
        let revision = self.layout.read_revision().unwrap_or(0);
        self.send(WatchEvent::Events { events, revision })
    }

    fn send(&self, ev: WatchEvent) -> Result<()> {
        self.tx
            .blocking_send(ev)
            .map_err(|_| StoreError::Unavailable("watch receiver dropped".into()))
    }
}

/// The lease as it will be stored: expiration = now + ttl, at the
/// millisecond precision of the file so the caller and watchers agree.
/// A lease file's content (see the module docs), newline-terminated.
fn record_json(lease: &Lease) -> Vec<u8> {
    LeaseRecord::new(lease.attrs.clone(), lease.expiration).to_json()
}

fn stamp(lease: &Lease, ttl: Option<Duration>, now: SystemTime) -> Lease {
    Lease {
        key: lease.key,
        attrs: lease.attrs.clone(),
        expiration: ttl.map(|t| from_unix_ms(to_unix_ms(now + t))),
    }
}

/// Whether `new` may overwrite `held`: the node is identified by its IPv4
/// PublicIP when both name one, else by the IPv6 one. The store does not
/// know which families the config enables, so a changed IPv6 address of a
/// node identified by IPv4 (or one gained or lost) keeps its lease, as the
/// acquisition planner would.
fn same_owner(held: &LeaseAttrs, new: &LeaseAttrs) -> bool {
    match (held.public_ip, new.public_ip) {
        (Some(a), Some(b)) => a == b,
        _ => matches!((held.public_ipv6, new.public_ipv6), (Some(a), Some(b)) if a == b),
    }
}

fn show<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "null".into(), |v| v.to_string())
}

fn file_name(key: &LeaseKey) -> Result<String> {
    if key.is_empty() {
        return Err(StoreError::InvalidLease {
            key: format!("{key:?}"),
            detail: "a lease key needs an IPv4 and/or IPv6 subnet".into(),
        });
    }
    Ok(key.to_string())
}

/// Whether a failed read says nothing about the file: the process or the
/// system is out of file descriptors or memory, or the call was interrupted.
/// Skipping the lease then would drop a live peer from every datapath.
fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if [Errno::EMFILE, Errno::ENFILE, Errno::ENOMEM, Errno::ENOBUFS, Errno::EINTR, Errno::EAGAIN]
            .iter()
            .any(|x| *x as i32 == code)
    )
}

/// Largest lease file read: a record is a few hundred bytes.
const MAX_LEASE_FILE: u64 = 64 * 1024;

/// Reads a lease file that must be a regular file of at most
/// [`MAX_LEASE_FILE`] bytes, without ever blocking: `open(O_NONBLOCK |
/// O_NOFOLLOW)` returns at once on a FIFO (a plain open would wait for a
/// writer, forever, freezing the watch thread) and fails on a symlink, and
/// `fstat` refuses anything that is not a regular file before a byte is
/// read. `O_NONBLOCK` has no effect on reads of a regular file.
fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    let file = OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW).bits())
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(code) if code == Errno::ELOOP as i32 => std::io::Error::new(
                ErrorKind::InvalidInput,
                "it is a symlink; lease files must be regular files (write the file in place)",
            ),
            _ => e,
        })?;
    let meta = file.metadata()?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let kind = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device node"
        } else {
            "not a regular file"
        };
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            format!("it is {kind}; lease files must be regular files (remove it)"),
        ));
    }
    if meta.len() > MAX_LEASE_FILE {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!(
                "{} bytes is more than a lease record can be ({MAX_LEASE_FILE} bytes at most)",
                meta.len()
            ),
        ));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    // `take`: a file growing after the fstat is still read to the bound only.
    file.take(MAX_LEASE_FILE + 1).read_to_end(&mut data)?;
    if data.len() as u64 > MAX_LEASE_FILE {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("more than a lease record can be ({MAX_LEASE_FILE} bytes at most)"),
        ));
    }
    Ok(data)
}

/// fsync a directory so a rename or unlink in it survives a crash.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn out_of_descriptors_is_transient_a_bad_file_is_not() {
        let os = std::io::Error::from_raw_os_error;
        assert!(is_transient(&os(nix::libc::EMFILE)));
        assert!(is_transient(&os(nix::libc::ENFILE)));
        assert!(is_transient(&os(nix::libc::ENOMEM)));
        assert!(!is_transient(&os(nix::libc::EACCES)));
        assert!(!is_transient(&os(nix::libc::EISDIR)));
        assert!(!is_transient(&std::io::Error::new(
            ErrorKind::InvalidInput,
            "a FIFO"
        )));
    }

    #[test]
    fn a_cache_built_at_once_equals_one_filled_lease_by_lease() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let leases: BTreeMap<String, Lease> = (1..=40u8)
            .map(|i| {
                let key: LeaseKey = format!("10.244.{i}.0-24").parse().unwrap();
                let l = Lease {
                    key,
                    attrs: LeaseAttrs {
                        public_ip: Some(Ipv4Addr::new(172, 16, 0, i)),
                        public_ipv6: None,
                        backend_type: "vxlan".into(),
                        backend_data: None,
                        backend_v6_data: None,
                    },
                    // Some without expiry, some expiring at the same time.
                    expiration: (i % 3 != 0).then(|| t + Duration::from_secs(u64::from(i % 5))),
                };
                (key.to_string(), l)
            })
            .collect();
        let mut one_by_one = Cache::default();
        for l in leases.values() {
            one_by_one.insert(l);
        }
        let mut at_once = Cache::of(leases.values());
        assert_eq!(at_once, one_by_one);
        assert_eq!(at_once.nearest_expiration(), Some(t));
        let by = t + Duration::from_secs(1);
        let due = leases
            .values()
            .filter(|l| l.expiration.is_some_and(|e| e <= by))
            .count();
        assert!(due > 0);
        assert_eq!(at_once.expire(by).len(), due);
        assert_eq!(one_by_one.expire(by).len(), due);
        assert_eq!(at_once, one_by_one);
    }

    #[test]
    fn owner_is_identified_by_ipv4_then_ipv6() {
        let a = |v4: Option<[u8; 4]>, v6: Option<u16>| LeaseAttrs {
            public_ip: v4.map(Ipv4Addr::from),
            public_ipv6: v6.map(|x| Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, x)),
            backend_type: "vxlan".into(),
            backend_data: None,
            backend_v6_data: None,
        };
        let (ip1, ip2) = (Some([172, 16, 0, 1]), Some([172, 16, 0, 2]));
        assert!(same_owner(&a(ip1, None), &a(ip1, None)));
        assert!(same_owner(&a(ip1, None), &a(ip1, Some(1))), "gained IPv6");
        assert!(same_owner(&a(ip1, Some(1)), &a(ip1, None)), "lost IPv6");
        assert!(
            same_owner(&a(ip1, Some(1)), &a(ip1, Some(2))),
            "IPv6 changed"
        );
        assert!(same_owner(&a(None, Some(1)), &a(None, Some(1))));
        assert!(!same_owner(&a(None, Some(1)), &a(None, Some(2))));
        assert!(
            !same_owner(&a(ip1, Some(1)), &a(ip2, Some(1))),
            "IPv4 decides"
        );
        assert!(!same_owner(&a(ip1, None), &a(ip2, None)));
        assert!(
            !same_owner(&a(ip1, None), &a(None, Some(1))),
            "nothing in common"
        );
        assert!(!same_owner(&a(None, None), &a(None, None)));
    }

    /// An inotify queue overflow (cannot be provoked without changing
    /// `fs.inotify.max_queued_events`) makes the watch resend a full snapshot,
    /// which also corrects the watch's cache.
    #[test]
    fn overflow_resends_a_snapshot() {
        let dir = std::env::temp_dir().join(format!(
            "flannel-store-unit-{}-overflow",
            std::process::id()
        ));
        struct Rm(PathBuf);
        impl Drop for Rm {
            fn drop(&mut self) {
                let _ = fs::remove_dir_all(&self.0);
            }
        }
        let _rm = Rm(dir.clone());
        let store = LocalStore::open(&dir).unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let mut w = Watcher::start(
            Arc::clone(&store.layout),
            tx,
            Arc::clone(&store.shutdown_rx),
            DEFAULT_RESYNC_INTERVAL,
        )
        .unwrap();
        assert!(matches!(rx.try_recv().unwrap(), WatchEvent::Snapshot(s) if s.leases.is_empty()));

        let key: LeaseKey = "10.244.1.0-24".parse().unwrap();
        let lease = Lease {
            key,
            attrs: LeaseAttrs {
                public_ip: Some(Ipv4Addr::new(172, 16, 0, 1)),
                public_ipv6: None,
                backend_type: "vxlan".into(),
                backend_data: None,
                backend_v6_data: None,
            },
            expiration: None,
        };
        store.layout.write_lease(&key.to_string(), &lease).unwrap();
        // The write's own events are not consumed; the overflow alone must do.
        w.apply(BTreeSet::new(), true, false).unwrap();
        match rx.try_recv().unwrap() {
            WatchEvent::Snapshot(s) => assert_eq!(s.leases, vec![lease.clone()]),
            other => panic!("expected a snapshot, got {other:?}"),
        }
        assert_eq!(w.cache.keys(), vec![lease.key]);
        assert!(w.cache.holds(&lease));
        // Re-reading the same file afterwards reports nothing new.
        let mut names = BTreeSet::new();
        names.insert(key.to_string());
        w.apply(names, false, false).unwrap();
        assert!(rx.try_recv().is_err());

        // The safety resync sends only differences: none now...
        w.resync().unwrap();
        assert!(rx.try_recv().is_err());
        // ...and exactly the missed ones when the cache went stale (as if
        // inotify had dropped events).
        let phantom: LeaseKey = "10.244.2.0-24".parse().unwrap();
        w.cache = Cache::default();
        w.cache.insert(&Lease {
            key: phantom,
            ..lease.clone()
        });
        w.resync().unwrap();
        match rx.try_recv().unwrap() {
            WatchEvent::Events { events, .. } => assert_eq!(
                events,
                vec![LeaseEvent::Removed(phantom), LeaseEvent::Upsert(lease)]
            ),
            other => panic!("expected events, got {other:?}"),
        }
    }
}
