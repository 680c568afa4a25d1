//! The continuous prober of `lab chaos`: every pod pings every other pod,
//! one ICMP echo per pair each [`PROBE_INTERVAL`], from a raw socket of its
//! own. Each pod's loop runs on a dedicated OS thread that entered the pod's
//! namespace ([`NetNs::run`]) and stays there: `setns(2)` never touches
//! another thread. Every probe is recorded with its send time and whether
//! its reply came within [`PROBE_TIMEOUT`]; the chaos runner attributes the
//! records to fault windows by send time.

use std::collections::HashMap;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flannel_netlink::netns::NetNs;

use super::ping::{echo_request, next_id, open_raw, reply_of, storage_of};
use super::IcmpFamily;

/// One probe per pair this often.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// A probe whose reply has not come after this long is lost.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// One probe: from pod `from` to pod `to` (indices into [`Prober::names`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeRecord {
    pub sent_at: Instant,
    pub from: u16,
    pub to: u16,
    /// The reply came in time.
    pub answered: bool,
    /// TTL of the reply (0 when lost).
    pub ttl: u8,
}

#[derive(Default)]
struct Shared {
    /// The pods probed now: (index into `names`, address).
    targets: RwLock<Vec<(u16, Ipv4Addr)>>,
    /// Every pod ever probed; a record's indices point here.
    names: Mutex<Vec<String>>,
    records: Mutex<Vec<ProbeRecord>>,
    /// Socket errors other than "no route" (which count as lost probes).
    errors: Mutex<Vec<String>>,
}

struct PodLoop {
    index: u16,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// Probes between the pods added to it, until dropped or stopped.
pub struct Prober {
    shared: Arc<Shared>,
    loops: Vec<PodLoop>,
}

impl Default for Prober {
    fn default() -> Self {
        Self::new()
    }
}

impl Prober {
    pub fn new() -> Prober {
        Prober {
            shared: Arc::default(),
            loops: Vec::new(),
        }
    }

    /// Starts probing from and to a pod (`ping` from inside `ns` to every
    /// other pod, and from every other pod to `ip`).
    pub fn add_pod(&mut self, name: &str, ns: NetNs, ip: Ipv4Addr) -> io::Result<()> {
        let index = {
            let mut names = self.shared.names.lock().expect("prober names");
            names.push(name.to_string());
            u16::try_from(names.len() - 1).map_err(|_| io::Error::other("too many pods"))?
        };
        // The socket is opened by the loop's thread inside the namespace;
        // it reports back whether that worked.
        let (tx, rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let stop = Arc::new(AtomicBool::new(false));
        let shared = self.shared.clone();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("probe-{name}"))
            .spawn(move || {
                let inner = shared.clone();
                let ran = ns.run(move || match open_raw::<Ipv4Addr>() {
                    Ok(fd) => {
                        let _ = tx.send(Ok(()));
                        pod_loop(&inner, index, fd, &stop2);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                });
                if let Err(e) = ran {
                    shared
                        .errors
                        .lock()
                        .expect("prober errors")
                        .push(e.to_string());
                }
            })?;
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(io::Error::other(format!(
                    "entering the namespace of {name}"
                )))
            }
        }
        self.shared
            .targets
            .write()
            .expect("prober targets")
            .push((index, ip));
        self.loops.push(PodLoop {
            index,
            stop,
            thread,
        });
        Ok(())
    }

    /// Stops probing from and to a pod (before it is removed).
    pub fn remove_pod(&mut self, name: &str) {
        let Some(index) = self.index_of(name) else {
            return;
        };
        self.shared
            .targets
            .write()
            .expect("prober targets")
            .retain(|(i, _)| *i != index);
        if let Some(pos) = self.loops.iter().position(|l| l.index == index) {
            let l = self.loops.remove(pos);
            l.stop.store(true, Ordering::Relaxed);
            let _ = l.thread.join();
        }
    }

    fn index_of(&self, name: &str) -> Option<u16> {
        let names = self.shared.names.lock().expect("prober names");
        names
            .iter()
            .rposition(|n| n == name)
            .and_then(|i| u16::try_from(i).ok())
    }

    /// The pods' names; [`ProbeRecord::from`] and `to` index it.
    pub fn names(&self) -> Vec<String> {
        self.shared.names.lock().expect("prober names").clone()
    }

    /// Every probe resolved so far (answered, or lost after [`PROBE_TIMEOUT`]).
    pub fn records(&self) -> Vec<ProbeRecord> {
        self.shared.records.lock().expect("prober records").clone()
    }

    /// Socket errors seen so far.
    pub fn errors(&self) -> Vec<String> {
        self.shared.errors.lock().expect("prober errors").clone()
    }

    /// Stops every loop.
    pub fn stop(&mut self) {
        for l in &self.loops {
            l.stop.store(true, Ordering::Relaxed);
        }
        for l in self.loops.drain(..) {
            let _ = l.thread.join();
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A request in flight.
struct InFlight {
    sent_at: Instant,
    to: u16,
    ip: Ipv4Addr,
}

/// One pod's loop: a round of requests to every other pod each interval,
/// replies matched by sequence number and source, timeouts recorded as
/// lost. Runs inside the pod's namespace.
fn pod_loop(shared: &Shared, me: u16, fd: OwnedFd, stop: &AtomicBool) {
    let id = next_id();
    let mut seq: u16 = 0;
    let mut in_flight: HashMap<u16, InFlight> = HashMap::new();
    let mut next_round = Instant::now();
    let mut buf = [0u8; 2048];
    let record = |r: ProbeRecord| shared.records.lock().expect("prober records").push(r);
    let error = |e: String| shared.errors.lock().expect("prober errors").push(e);
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next_round {
            let targets = shared.targets.read().expect("prober targets").clone();
            for (to, ip) in targets.into_iter().filter(|(i, _)| *i != me) {
                seq = seq.wrapping_add(1);
                let sent_at = Instant::now();
                match send(&fd, id, seq, ip) {
                    Ok(true) => {
                        in_flight.insert(seq, InFlight { sent_at, to, ip });
                    }
                    // No route right now: the probe is lost.
                    Ok(false) => record(ProbeRecord {
                        sent_at,
                        from: me,
                        to,
                        answered: false,
                        ttl: 0,
                    }),
                    Err(e) => error(format!("sending to {ip}: {e}")),
                }
            }
            next_round += PROBE_INTERVAL;
            // After a stall (the machine was busy), no burst of rounds.
            if next_round + PROBE_INTERVAL < now {
                next_round = now + PROBE_INTERVAL;
            }
        }
        let wait = next_round.saturating_duration_since(Instant::now());
        match poll_in(&fd, wait.min(Duration::from_millis(20))) {
            Ok(true) => loop {
                match recv(&fd, &mut buf) {
                    Ok(Some(len)) => {
                        let Some(r) = reply_of::<Ipv4Addr>(&buf[..len], None, None, id) else {
                            continue;
                        };
                        if in_flight.get(&r.seq).is_some_and(|f| f.ip == r.from) {
                            let f = in_flight.remove(&r.seq).expect("present");
                            record(ProbeRecord {
                                sent_at: f.sent_at,
                                from: me,
                                to: f.to,
                                answered: f.sent_at.elapsed() <= PROBE_TIMEOUT,
                                ttl: r.ttl,
                            });
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        error(format!("receiving: {e}"));
                        break;
                    }
                }
            },
            Ok(false) => {}
            Err(e) => error(format!("poll: {e}")),
        }
        let now = Instant::now();
        in_flight.retain(|_, f| {
            let late = now.duration_since(f.sent_at) > PROBE_TIMEOUT;
            if late {
                record(ProbeRecord {
                    sent_at: f.sent_at,
                    from: me,
                    to: f.to,
                    answered: false,
                    ttl: 0,
                });
            }
            !late
        });
    }
}

/// `Ok(false)` when the kernel has no path right now (the probe is lost).
fn send(fd: &OwnedFd, id: u16, seq: u16, dst: Ipv4Addr) -> io::Result<bool> {
    let packet = echo_request::<Ipv4Addr>(id, seq);
    let (addr, len) = storage_of(dst);
    // SAFETY: valid buffer and a socket address of the stated length.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            libc::MSG_DONTWAIT,
            (&addr as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if sent < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(errno) if Ipv4Addr::NO_PATH_ERRNOS.contains(&errno) => Ok(false),
            // A full socket buffer (the path is stuck): lost too.
            Some(libc::EAGAIN) | Some(libc::ENOBUFS) => Ok(false),
            _ => Err(e),
        };
    }
    Ok(true)
}

fn poll_in(fd: &OwnedFd, wait: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = wait.as_millis().clamp(1, 1000) as libc::c_int;
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(n > 0)
}

/// One datagram, without blocking; `None` when there is none.
fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: zeroed plain-old-data, filled by recvfrom.
    let mut from: libc::sockaddr_storage = unsafe { zeroed() };
    let mut from_len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: buf and from are live buffers of the lengths given.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
            (&mut from as *mut libc::sockaddr_storage).cast(),
            &mut from_len,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(n as usize))
}
