//! host-local IPAM, compatible on disk with the reference plugin, so that a
//! node can switch between it and us without losing track of addresses:
//!
//! - `<dataDir>/<network>/<ip>`: one file per address, created exclusively,
//!   holding `"<containerID>\r\n<ifname>"` (no trailing newline; the
//!   reference plugin's exact bytes, checked against /usr/lib/cni/host-local),
//! - `last_reserved_ip.<set index>`: where the round-robin resumes,
//! - `lock`: flock(2)ed for the whole operation so concurrent ADDs on the
//!   node never hand out one address twice.
//!
//! The choice of the next address is pure ([`next_free`]) and unit-tested.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::config::{IpamConf, Range};
use crate::spec::{code, CniError};

use flannel_core::wire::{
    CNI_IPAM_LAST_RESERVED_PREFIX as LAST_RESERVED_PREFIX, CNI_IPAM_LINE_BREAK as LINE_BREAK,
    CNI_IPAM_LOCK_FILE as LOCK_FILE,
};

/// Errors of the address store, each with the path involved.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("IPAM store {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no IP addresses available in range set {ranges}: every address is taken; free addresses by deleting stale pods or give the node a larger subnet")]
    Exhausted { ranges: String },
}

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> CniError {
        let c = match e {
            IpamError::Io { .. } => code::IO_FAILURE,
            IpamError::Exhausted { .. } => code::ADDRESSES_EXHAUSTED,
        };
        CniError::new(c, e.to_string())
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> IpamError + 'a {
    move |source| IpamError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4((v as u32).into())
    } else {
        IpAddr::V6(v.into())
    }
}

fn in_range(r: &Range, ip: IpAddr) -> bool {
    ip.is_ipv4() == r.range_start.is_ipv4() && r.range_start <= ip && ip <= r.range_end
}

/// The next address to hand out from a range set, host-local style: round
/// robin, starting after `last_reserved` when it lies in the set (else at the
/// first range's start), wrapping around once, skipping each range's gateway
/// and every address `taken` reports.
pub fn next_free(
    set: &[Range],
    last_reserved: Option<IpAddr>,
    taken: impl Fn(IpAddr) -> bool,
) -> Option<IpAddr> {
    if set.is_empty() {
        return None;
    }
    let size = |r: &Range| to_u128(r.range_end) - to_u128(r.range_start) + 1;
    let total = set.iter().map(size).fold(0u128, u128::saturating_add);
    let (mut ri, mut cur) =
        match last_reserved.and_then(|l| set.iter().position(|r| in_range(r, l)).map(|i| (i, l))) {
            Some((i, l)) => (i, Some(to_u128(l))),
            None => (0, None),
        };
    let mut steps: u128 = 0;
    while steps < total {
        let next = match cur {
            None => to_u128(set[ri].range_start),
            Some(c) if c < to_u128(set[ri].range_end) => c + 1,
            Some(_) => {
                ri = (ri + 1) % set.len();
                to_u128(set[ri].range_start)
            }
        };
        cur = Some(next);
        steps += 1;
        let ip = from_u128(next, set[ri].range_start.is_ipv4());
        if ip != set[ri].gateway && !taken(ip) {
            return Some(ip);
        }
    }
    None
}

/// Overwrites a small file's content without truncating it to zero first:
/// ext4 treats "truncate to 0, then rewrite" as a replace and starts
/// writeback of the file when it is closed (`auto_da_alloc`), which costs a
/// disk round trip on every ADD. Writing from offset 0 and then cutting to the
/// new length leaves the same bytes without that.
fn write_in_place(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)?;
    f.write_all_at(content, 0)?;
    f.set_len(content.len() as u64)
}

/// One address file's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub ip: IpAddr,
    pub container_id: String,
    /// Empty for files written by old plugins that stored only the container ID.
    pub ifname: String,
}

/// An address handed to an attachment, with the range it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub ip: IpAddr,
    pub range: Range,
    /// Reserved by this call (false: the attachment held it already).
    pub new: bool,
}

/// The IPAM directory of one network, locked for as long as this value lives.
pub struct IpamStore {
    dir: PathBuf,
    _lock: Flock<File>,
}

impl IpamStore {
    /// Creates `dir` if needed and takes the exclusive lock (waiting for it).
    pub fn open_locked(dir: &Path) -> Result<IpamStore, IpamError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(io_err(dir, "create directory"))?;
        let lock_path = dir.join(LOCK_FILE);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o644)
            .open(&lock_path)
            .map_err(io_err(&lock_path, "open lock file"))?;
        let lock = Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, errno)| IpamError::Io {
            path: lock_path.clone(),
            op: "flock",
            source: errno.into(),
        })?;
        Ok(IpamStore {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The addresses that have a file (`ls <dir>`), without reading them.
    pub fn reserved_ips(&self) -> Result<HashSet<IpAddr>, IpamError> {
        let rd = fs::read_dir(&self.dir).map_err(io_err(&self.dir, "list"))?;
        let mut out = HashSet::new();
        for ent in rd {
            let ent = ent.map_err(io_err(&self.dir, "list"))?;
            if let Some(ip) = ent.file_name().to_str().and_then(|n| n.parse().ok()) {
                out.insert(ip);
            }
        }
        Ok(out)
    }

    /// Every address file and its owner (`ls <dir>`, then each file's content).
    pub fn reservations(&self) -> Result<Vec<Reservation>, IpamError> {
        let mut out = Vec::new();
        let rd = fs::read_dir(&self.dir).map_err(io_err(&self.dir, "list"))?;
        for ent in rd {
            let ent = ent.map_err(io_err(&self.dir, "list"))?;
            let Some(ip) = ent
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let path = ent.path();
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                // Released by someone not holding the lock (a reference plugin run by hand).
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path, "read")(e)),
            };
            let text = text.trim();
            let (container_id, ifname) = match text.split_once(LINE_BREAK) {
                Some((id, ifn)) => (id.trim().to_string(), ifn.trim().to_string()),
                None => (text.to_string(), String::new()),
            };
            out.push(Reservation {
                ip,
                container_id,
                ifname,
            });
        }
        out.sort_by_key(|r| r.ip);
        Ok(out)
    }

    fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(format!("{LAST_RESERVED_PREFIX}{set}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// One address per range set for `container_id`/`ifname`. Idempotent: an
    /// attachment that already holds an address in a set keeps it. On error
    /// nothing new stays reserved.
    ///
    /// `may_hold`: whether this attachment may already hold addresses (an
    /// ADD retried after a crash or repeated by the runtime). Only then are
    /// the owners read from every address file; otherwise the file names
    /// alone tell which addresses are taken, so an ADD reads no file per
    /// running pod.
    pub fn allocate(
        &self,
        conf: &IpamConf,
        container_id: &str,
        ifname: &str,
        may_hold: bool,
    ) -> Result<Vec<Allocation>, IpamError> {
        let existing = if may_hold {
            self.reservations()?
        } else {
            Vec::new()
        };
        let taken: HashSet<IpAddr> = if may_hold {
            existing.iter().map(|r| r.ip).collect()
        } else {
            self.reserved_ips()?
        };
        let mut out = Vec::new();
        let mut created: Vec<PathBuf> = Vec::new();
        let result = (|| {
            for (i, set) in conf.range_sets.iter().enumerate() {
                let mine = existing.iter().find(|r| {
                    r.container_id == container_id
                        && r.ifname == ifname
                        && set.iter().any(|rg| in_range(rg, r.ip))
                });
                if let Some(r) = mine {
                    let range = set
                        .iter()
                        .find(|rg| in_range(rg, r.ip))
                        .cloned()
                        .expect("checked above");
                    out.push(Allocation {
                        ip: r.ip,
                        range,
                        new: false,
                    });
                    continue;
                }
                let ip = next_free(set, self.last_reserved(i), |ip| taken.contains(&ip))
                    .ok_or_else(|| IpamError::Exhausted {
                        ranges: set
                            .iter()
                            .map(|r| format!("{}-{}", r.range_start, r.range_end))
                            .collect::<Vec<_>>()
                            .join(","),
                    })?;
                let path = self.dir.join(ip.to_string());
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(&path)
                    .map_err(io_err(&path, "reserve address"))?;
                created.push(path.clone());
                f.write_all(format!("{container_id}{LINE_BREAK}{ifname}").as_bytes())
                    .map_err(io_err(&path, "write"))?;
                let last = self.dir.join(format!("{LAST_RESERVED_PREFIX}{i}"));
                write_in_place(&last, ip.to_string().as_bytes()).map_err(io_err(&last, "write"))?;
                let range = set
                    .iter()
                    .find(|rg| in_range(rg, ip))
                    .cloned()
                    .expect("from this set");
                out.push(Allocation {
                    ip,
                    range,
                    new: true,
                });
            }
            Ok(())
        })();
        if let Err(e) = result {
            for p in created {
                let _ = fs::remove_file(p);
            }
            return Err(e);
        }
        Ok(out)
    }

    /// Removes the address files of `container_id`/`ifname` (and legacy files
    /// holding only the container ID); returns the freed addresses.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, IpamError> {
        let mut freed = Vec::new();
        for r in self.reservations()? {
            if r.container_id == container_id && (r.ifname == ifname || r.ifname.is_empty()) {
                self.remove(r.ip)?;
                freed.push(r.ip);
            }
        }
        Ok(freed)
    }

    /// Removes one address file; absent is success.
    pub fn remove(&self, ip: IpAddr) -> Result<(), IpamError> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path, "release address")(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn range(subnet: &str) -> Range {
        let v = json!({"name":"n","ipam":{"dataDir":"/x","ranges":[[{"subnet": subnet}]]}});
        crate::config::BridgeConf::from_rendered(&v)
            .unwrap()
            .ipam
            .range_sets[0][0]
            .clone()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn first_skips_network_and_gateway() {
        let r = [range("10.244.1.0/24")];
        assert_eq!(next_free(&r, None, |_| false), Some(ip("10.244.1.2")));
    }

    #[test]
    fn round_robin_after_last_reserved_and_wraps() {
        let r = [range("10.244.1.0/24")];
        assert_eq!(
            next_free(&r, Some(ip("10.244.1.7")), |_| false),
            Some(ip("10.244.1.8"))
        );
        // After the last usable address comes the first one (the gateway skipped).
        assert_eq!(
            next_free(&r, Some(ip("10.244.1.254")), |_| false),
            Some(ip("10.244.1.2"))
        );
        // A last_reserved outside the range is ignored.
        assert_eq!(
            next_free(&r, Some(ip("10.9.9.9")), |_| false),
            Some(ip("10.244.1.2"))
        );
        // Taken addresses are skipped, including the last reserved one itself on wrap.
        let taken: HashSet<IpAddr> = [ip("10.244.1.8"), ip("10.244.1.9")].into();
        assert_eq!(
            next_free(&r, Some(ip("10.244.1.7")), |a| taken.contains(&a)),
            Some(ip("10.244.1.10"))
        );
    }

    #[test]
    fn never_broadcast_and_exhaustion() {
        let r = [range("10.0.0.0/30")];
        // .0 network, .1 gateway, .3 broadcast: only .2 is usable.
        assert_eq!(next_free(&r, None, |_| false), Some(ip("10.0.0.2")));
        assert_eq!(
            next_free(&r, Some(ip("10.0.0.2")), |_| false),
            Some(ip("10.0.0.2"))
        );
        assert_eq!(next_free(&r, None, |a| a == ip("10.0.0.2")), None);
        let r = [range("10.0.0.0/24")];
        assert_eq!(
            next_free(&r, Some(ip("10.0.0.100")), |a| a != ip("10.0.0.50")),
            Some(ip("10.0.0.50"))
        );
        assert_eq!(next_free(&r, Some(ip("10.0.0.100")), |_| true), None);
    }

    #[test]
    fn ipv6_and_multi_range_sets() {
        let r = [range("fd00:10:244:1::/64")];
        assert_eq!(next_free(&r, None, |_| false), Some(ip("fd00:10:244:1::2")));
        let set = [range("10.0.0.0/30"), range("10.0.1.0/30")];
        assert_eq!(
            next_free(&set, Some(ip("10.0.0.2")), |_| false),
            Some(ip("10.0.1.2"))
        );
        assert_eq!(
            next_free(&set, Some(ip("10.0.1.2")), |_| false),
            Some(ip("10.0.0.2"))
        );
    }

    #[test]
    fn write_in_place_shrinks_and_grows() {
        let p = std::env::temp_dir().join(format!("flannel-cni-wip-{}", std::process::id()));
        write_in_place(&p, b"10.244.1.100").unwrap();
        write_in_place(&p, b"10.244.1.2").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"10.244.1.2");
        write_in_place(&p, b"fd00:10:244:1::2").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"fd00:10:244:1::2");
        fs::remove_file(&p).unwrap();
    }

    fn conf(dir: &Path, subnet: &str) -> IpamConf {
        let v = json!({"name":"n","ipam":{"dataDir": dir, "ranges":[[{"subnet": subnet}]]}});
        crate::config::BridgeConf::from_rendered(&v).unwrap().ipam
    }

    #[test]
    fn a_fresh_attachment_skips_taken_addresses_by_file_name() {
        let tmp = std::env::temp_dir().join(format!("flannel-cni-fresh-{}", std::process::id()));
        let c = conf(&tmp, "10.0.0.0/29");
        let s = IpamStore::open_locked(&c.network_dir).unwrap();
        // Files of other owners, one not even readable as host-local's format.
        fs::write(c.network_dir.join("10.0.0.2"), "other\r\neth0").unwrap();
        fs::write(c.network_dir.join("10.0.0.3"), "").unwrap();
        assert_eq!(
            s.allocate(&c, "new", "eth0", false).unwrap()[0].ip,
            ip("10.0.0.4")
        );
        // A repeated ADD (may_hold) finds its own address instead of a new one.
        assert_eq!(
            s.allocate(&c, "new", "eth0", true).unwrap()[0].ip,
            ip("10.0.0.4")
        );
        fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn store_files_match_host_local() {
        let tmp = std::env::temp_dir().join(format!("flannel-cni-ipam-{}", std::process::id()));
        let c = conf(&tmp, "10.0.0.0/29");
        let s = IpamStore::open_locked(&c.network_dir).unwrap();
        let a = s.allocate(&c, "ctr1", "eth0", true).unwrap();
        assert_eq!(a[0].ip, ip("10.0.0.2"));
        assert_eq!(
            fs::read(c.network_dir.join("10.0.0.2")).unwrap(),
            b"ctr1\r\neth0"
        );
        assert_eq!(
            fs::read_to_string(c.network_dir.join("last_reserved_ip.0")).unwrap(),
            "10.0.0.2"
        );
        assert!(c.network_dir.join("lock").exists());
        // Same attachment again: same address.
        assert_eq!(
            s.allocate(&c, "ctr1", "eth0", true).unwrap()[0].ip,
            ip("10.0.0.2")
        );
        assert_eq!(
            s.allocate(&c, "ctr1", "eth1", true).unwrap()[0].ip,
            ip("10.0.0.3")
        );
        assert_eq!(
            s.allocate(&c, "ctr2", "eth0", true).unwrap()[0].ip,
            ip("10.0.0.4")
        );
        assert_eq!(
            s.allocate(&c, "ctr3", "eth0", true).unwrap()[0].ip,
            ip("10.0.0.5")
        );
        assert_eq!(
            s.allocate(&c, "ctr4", "eth0", true).unwrap()[0].ip,
            ip("10.0.0.6")
        );
        let e = s.allocate(&c, "ctr5", "eth0", true).unwrap_err();
        assert!(e.to_string().contains("no IP addresses available"), "{e}");
        assert_eq!(CniError::from(e).code, 100);
        assert_eq!(s.release("ctr1", "eth0").unwrap(), vec![ip("10.0.0.2")]);
        assert_eq!(s.release("ctr1", "eth0").unwrap(), Vec::<IpAddr>::new());
        // Round robin continues after .6 and wraps to the freed .2.
        assert_eq!(
            s.allocate(&c, "ctr5", "eth0", true).unwrap()[0].ip,
            ip("10.0.0.2")
        );
        // A legacy file with only the container ID is released by ID.
        fs::write(c.network_dir.join("10.0.0.9"), "old").unwrap();
        assert_eq!(s.release("old", "eth0").unwrap(), vec![ip("10.0.0.9")]);
        let owners: Vec<_> = s
            .reservations()
            .unwrap()
            .into_iter()
            .map(|r| r.container_id)
            .collect();
        assert_eq!(owners, ["ctr5", "ctr1", "ctr2", "ctr3", "ctr4"]);
        drop(s);
        fs::remove_dir_all(&tmp).unwrap();
    }
}
