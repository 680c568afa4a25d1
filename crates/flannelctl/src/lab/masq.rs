//! The masquerade check of `--ip-masq` labs: which source address a pod's
//! packet carries when it arrives.
//!
//! A UDP socket is opened in the receiving namespace (the outside host, or
//! another pod) and one in the sending pod; the pod sends a datagram, the
//! receiver reads the source address the packet arrived with and answers
//! it. To the outside host a pod must appear as its node's underlay address
//! (masqueraded, and the answer must find its way back through the node's
//! connection tracking); to another pod it must keep its own address.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use flannel_netlink::netns::NetNs;

use super::check::expected_failure;
use super::{io_err, ns_err, Lab, LabError, Result, Target, TargetKind, OUTSIDE_IP, OUTSIDE_IPV6};

/// What one probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasqObservation {
    /// The sending pod.
    pub from: String,
    /// `outside`, or the receiving pod.
    pub to: String,
    /// Where the probe went.
    pub dst: IpAddr,
    /// The source address it arrived with (None: nothing arrived).
    pub seen_source: Option<IpAddr>,
    /// The source address it must arrive with.
    pub expected_source: IpAddr,
    /// Whether the receiver's answer reached the pod.
    pub answered: bool,
}

impl MasqObservation {
    pub fn is_ok(&self) -> bool {
        self.seen_source == Some(self.expected_source) && self.answered
    }
}

/// Every probe of a check.
#[derive(Debug, Clone, Default)]
pub struct MasqReport {
    pub observations: Vec<MasqObservation>,
}

impl MasqReport {
    pub fn all_ok(&self) -> bool {
        self.observations.iter().all(MasqObservation::is_ok)
    }

    /// The probe from `from` to `to` (`outside` or a pod) in the family of `v6`.
    pub fn get(&self, from: &str, to: &str, v6: bool) -> Option<&MasqObservation> {
        self.observations
            .iter()
            .find(|o| o.from == from && o.to == to && o.dst.is_ipv6() == v6)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for o in &self.observations {
            let _ = writeln!(
                out,
                "{:<10} -> {:<10} {:<22} arrived from {:<22} {}",
                o.from,
                o.to,
                o.dst.to_string(),
                o.seen_source
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "(nothing)".into()),
                if o.is_ok() {
                    if o.to == "outside" {
                        "OK (masqueraded to the node)".to_string()
                    } else {
                        "OK (pod address kept)".to_string()
                    }
                } else if o.seen_source.is_some() && !o.answered {
                    format!(
                        "FAIL: expected {}, and no answer came back",
                        o.expected_source
                    )
                } else {
                    format!("FAIL: expected {}", o.expected_source)
                }
            );
        }
        let bad = self.observations.iter().filter(|o| !o.is_ok()).count();
        let _ = writeln!(
            out,
            "{} of {} masquerade probes OK",
            self.observations.len() - bad,
            self.observations.len()
        );
        out
    }
}

/// Sends `from` -> `to` probes until one arrives or `within` passes, then
/// answers it. Returns the source seen and whether the answer came back.
fn probe(
    from: &NetNs,
    to: &NetNs,
    dst: IpAddr,
    within: Duration,
) -> Result<(Option<IpAddr>, bool)> {
    let bind_any = |v6: bool| -> SocketAddr {
        if v6 {
            "[::]:0".parse().expect("valid")
        } else {
            "0.0.0.0:0".parse().expect("valid")
        }
    };
    let rx = to
        .run(|| UdpSocket::bind(SocketAddr::new(dst, 0)))
        .map_err(ns_err(format!("entering {}", to.name)))?
        .map_err(io_err(format!(
            "binding a UDP socket to {dst} in {}",
            to.name
        )))?;
    let port = rx
        .local_addr()
        .map_err(io_err("reading the probe port"))?
        .port();
    let tx = from
        .run(|| UdpSocket::bind(bind_any(dst.is_ipv6())))
        .map_err(ns_err(format!("entering {}", from.name)))?
        .map_err(io_err(format!("binding a UDP socket in {}", from.name)))?;
    let step = Duration::from_millis(200);
    rx.set_read_timeout(Some(step))
        .map_err(io_err("setting a read timeout"))?;
    tx.set_read_timeout(Some(step))
        .map_err(io_err("setting a read timeout"))?;
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 512];
    let msg = b"flannel-rs lab masquerade probe";
    while Instant::now() < deadline {
        // Unreachable for now (no route yet): try again.
        let _ = tx.send_to(msg, SocketAddr::new(dst, port));
        let Ok((n, seen)) = rx.recv_from(&mut buf) else {
            continue;
        };
        if &buf[..n] != msg {
            continue;
        }
        let mut answered = false;
        for _ in 0..5 {
            // The outside host has no route to an address that was not
            // masqueraded (ENETUNREACH): no answer, which the report shows.
            if rx.send_to(b"answer", seen).is_err() {
                break;
            }
            if matches!(tx.recv_from(&mut buf), Ok((n, _)) if &buf[..n] == b"answer") {
                answered = true;
                break;
            }
        }
        return Ok((Some(seen.ip()), answered));
    }
    Ok((None, false))
}

/// [`probe`] again, from a fresh socket (a new port: connection tracking
/// keeps a flow's first translation, or its lack, for its whole life),
/// until the packet arrives from `expected` and is answered, or `within`
/// passes: flanneld puts its rules in place on its own thread, shortly
/// after it wrote subnet.env. Returns the last observation.
fn probe_until(
    from: &NetNs,
    to: &NetNs,
    dst: IpAddr,
    expected: IpAddr,
    within: Duration,
) -> Result<(Option<IpAddr>, bool)> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let got = probe(from, to, dst, left.min(Duration::from_secs(1)))?;
        if (got.0 == Some(expected) && got.1) || Instant::now() >= deadline {
            return Ok(got);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The masquerade check: every pod to the outside host (in each family),
/// and every pod to every pod on another node (the pairs the topology
/// allows).
pub(crate) fn run(lab: &Lab) -> Result<MasqReport> {
    let st = &lab.state;
    if !st.ip_masq {
        return Err(LabError::InvalidOption {
            option: "check_masq",
            reason: format!(
                "lab {} runs flanneld without --ip-masq and has no outside host: make it with `lab up --ip-masq`",
                st.name
            ),
        });
    }
    let outside = NetNs::open(&st.outside_netns())
        .map_err(ns_err(format!("opening {}", st.outside_netns())))?;
    let within = Duration::from_secs(5);
    let mut report = MasqReport::default();
    for p in &st.pods {
        let node = lab.node(&p.node)?;
        let pod_ns = lab.netns(&p.name)?;
        let mut families: Vec<(IpAddr, IpAddr, IpAddr)> = Vec::new();
        if let Some(ip) = p.ip {
            families.push((
                IpAddr::V4(ip.addr()),
                IpAddr::V4(OUTSIDE_IP),
                IpAddr::V4(node.underlay_ip),
            ));
        }
        if let (Some(ip), Some(u6)) = (p.ipv6, node.underlay_ipv6) {
            families.push((
                IpAddr::V6(ip.addr()),
                IpAddr::V6(OUTSIDE_IPV6),
                IpAddr::V6(u6),
            ));
        }
        for (own, outside_ip, node_ip) in families {
            let (seen, answered) = probe_until(&pod_ns, &outside, outside_ip, node_ip, within)?;
            report.observations.push(MasqObservation {
                from: p.name.clone(),
                to: "outside".into(),
                dst: outside_ip,
                seen_source: seen,
                expected_source: node_ip,
                answered,
            });
            for q in st.pods.iter().filter(|q| q.node != p.node) {
                let dst = match own {
                    IpAddr::V4(_) => q.ip.map(|n| IpAddr::V4(n.addr())),
                    IpAddr::V6(_) => q.ipv6.map(|n| IpAddr::V6(n.addr())),
                };
                let Some(dst) = dst else { continue };
                let target = Target {
                    label: q.name.clone(),
                    ip: dst,
                    kind: TargetKind::Pod,
                    node: q.node.clone(),
                };
                if expected_failure(lab, node, &target).is_some() {
                    continue;
                }
                let (seen, answered) =
                    probe_until(&pod_ns, &lab.netns(&q.name)?, dst, own, within)?;
                report.observations.push(MasqObservation {
                    from: p.name.clone(),
                    to: q.name.clone(),
                    dst,
                    seen_source: seen,
                    expected_source: own,
                    answered,
                });
            }
        }
    }
    Ok(report)
}

/// Waits until every pod's packet to the outside host arrives
/// masqueraded, or `deadline` passes (then the check reports what is
/// wrong): flanneld installs its rules on its own thread, a moment after it
/// wrote subnet.env and published its lease. Pings sent before would set
/// up connection-tracking entries without translation.
pub(crate) fn wait_ready(lab: &Lab, deadline: Instant) -> Result<()> {
    let st = &lab.state;
    if !st.ip_masq {
        return Ok(());
    }
    let outside = NetNs::open(&st.outside_netns())
        .map_err(ns_err(format!("opening {}", st.outside_netns())))?;
    for p in &st.pods {
        let node = lab.node(&p.node)?;
        let pod_ns = lab.netns(&p.name)?;
        let mut want = Vec::new();
        if p.ip.is_some() {
            want.push((IpAddr::V4(OUTSIDE_IP), IpAddr::V4(node.underlay_ip)));
        }
        if let (Some(_), Some(u6)) = (p.ipv6, node.underlay_ipv6) {
            want.push((IpAddr::V6(OUTSIDE_IPV6), IpAddr::V6(u6)));
        }
        for (dst, expected) in want {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            probe_until(&pod_ns, &outside, dst, expected, left)?;
        }
    }
    Ok(())
}

impl Lab {
    /// The masquerade check of an `--ip-masq` lab: every pod's packet to
    /// the outside host arrives from its node's address, every pod's packet
    /// to a pod on another node from the pod's own.
    pub fn check_masq(&self) -> Result<MasqReport> {
        run(self)
    }
}
