//! The connectivity matrix: every pod pings every other pod and every node
//! (its overlay address and its underlay address), in each address family
//! of the lab, and the reply TTLs (IPv6: hop limits) are compared with the
//! hop counts the packet walk predicts. Pairs the topology rules out (host-gw
//! across two segments) are expected failures, reported with the reason.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::{
    overlay_address, Backend, IcmpFamily, Lab, LabError, NodeState, Pinger, PodState, Result,
    Topology,
};

/// What a target is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetKind {
    Pod,
    /// The node's cni0 gateway, or flannel.1 address for a node without pods.
    NodeOverlay,
    /// The node's ens3 address.
    NodeUnderlay,
}

/// A column of the matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `ubuntu-2`, `k8s-node1/cni0`, `master/flannel.1`, `k8s-node1/ens3`;
    /// IPv6 targets end in `@v6` (`ubuntu-2@v6`, `k8s-node1/ens3@v6`).
    pub label: String,
    pub ip: IpAddr,
    pub kind: TargetKind,
    /// The node the target lives on.
    pub node: String,
}

/// One cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The source itself.
    Itself,
    /// Answered with the expected TTL.
    Ok { ttl: u8, rtt: Duration },
    /// Answered, but with another TTL than the topology implies.
    WrongTtl { ttl: u8, expected: u8 },
    /// No answer before the deadline.
    NoReply,
    /// No answer, as the topology implies (host-gw across segments); why.
    ExpectedFailure { reason: String },
    /// An answer where the topology implies none.
    UnexpectedReply { ttl: u8, reason: String },
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        matches!(
            self,
            Outcome::Itself | Outcome::Ok { .. } | Outcome::ExpectedFailure { .. }
        )
    }
}

/// Rows are the pods, columns the targets.
#[derive(Debug, Clone)]
pub struct Matrix {
    /// Pod names with their first address (IPv4 in dual stack).
    pub sources: Vec<(String, IpAddr)>,
    pub targets: Vec<Target>,
    pub cells: Vec<Vec<Outcome>>,
}

impl Matrix {
    /// Pairs that were tested (the diagonal excluded).
    pub fn total(&self) -> usize {
        self.cells
            .iter()
            .flatten()
            .filter(|c| !matches!(c, Outcome::Itself))
            .count()
    }

    /// Pairs that failed.
    pub fn failed(&self) -> usize {
        self.cells.iter().flatten().filter(|c| !c.is_ok()).count()
    }

    pub fn all_ok(&self) -> bool {
        self.failed() == 0
    }

    /// Pairs that failed as expected, with the reason: `(from, to, reason)`.
    pub fn expected_failures(&self) -> Vec<(&str, &str, &str)> {
        let mut v = Vec::new();
        for ((from, _), row) in self.sources.iter().zip(&self.cells) {
            for (t, o) in self.targets.iter().zip(row) {
                if let Outcome::ExpectedFailure { reason } = o {
                    v.push((from.as_str(), t.label.as_str(), reason.as_str()));
                }
            }
        }
        v
    }

    /// The outcome of `from` (pod name) pinging the target labelled `to`.
    pub fn get(&self, from: &str, to: &str) -> Option<&Outcome> {
        let r = self.sources.iter().position(|(n, _)| n == from)?;
        let c = self.targets.iter().position(|t| t.label == to)?;
        Some(&self.cells[r][c])
    }

    /// `Err(Connectivity)` unless every pair passed.
    pub fn ensure_all_ok(&self) -> Result<()> {
        if self.all_ok() {
            Ok(())
        } else {
            Err(LabError::Connectivity {
                failed: self.failed(),
                total: self.total(),
            })
        }
    }

    /// A table: one row per pod, one column per target; cells show the
    /// reply TTL (`62`), `-` for the pod itself, `FAIL` or `ttl N!=M`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let src_w = self
            .sources
            .iter()
            .map(|(n, ip)| n.len() + ip.to_string().len() + 3)
            .max()
            .unwrap_or(4)
            .max(4);
        let cell = |o: &Outcome| match o {
            Outcome::Itself => "-".to_string(),
            Outcome::Ok { ttl, .. } => format!("ttl {ttl}"),
            Outcome::WrongTtl { ttl, expected } => format!("ttl {ttl}!={expected}"),
            Outcome::NoReply => "FAIL".to_string(),
            Outcome::ExpectedFailure { .. } => "refused".to_string(),
            Outcome::UnexpectedReply { ttl, .. } => format!("ttl {ttl} UNEXPECTED"),
        };
        let widths: Vec<usize> = self
            .targets
            .iter()
            .enumerate()
            .map(|(c, t)| {
                let w = self
                    .cells
                    .iter()
                    .map(|r| cell(&r[c]).len())
                    .max()
                    .unwrap_or(0);
                w.max(t.label.len()).max(t.ip.to_string().len())
            })
            .collect();
        let _ = write!(out, "{:src_w$}", "from \\ to");
        for (t, w) in self.targets.iter().zip(&widths) {
            let _ = write!(out, "  {:w$}", t.label);
        }
        out.push('\n');
        let _ = write!(out, "{:src_w$}", "");
        for (t, w) in self.targets.iter().zip(&widths) {
            let _ = write!(out, "  {:w$}", t.ip.to_string());
        }
        out.push('\n');
        for ((name, ip), row) in self.sources.iter().zip(&self.cells) {
            let _ = write!(out, "{:src_w$}", format!("{name} ({ip})"));
            for (o, w) in row.iter().zip(&widths) {
                let _ = write!(out, "  {:w$}", cell(o));
            }
            out.push('\n');
        }
        let mut out: String = out.lines().map(|l| format!("{}\n", l.trim_end())).collect();
        let expected = self.expected_failures();
        let _ = writeln!(
            out,
            "{} of {} pairs OK (pod to pod across nodes: ttl 62, as in the seed){}",
            self.total() - self.failed().min(self.total()),
            self.total(),
            if expected.is_empty() {
                String::new()
            } else {
                format!(", {} of them expected failures", expected.len())
            }
        );
        for (from, to, reason) in expected {
            let _ = writeln!(out, "  refused (expected) {from} -> {to}: {reason}");
        }
        for ((from, _), row) in self.sources.iter().zip(&self.cells) {
            for (t, o) in self.targets.iter().zip(row) {
                if let Outcome::UnexpectedReply { reason, .. } = o {
                    let _ = writeln!(
                        out,
                        "  UNEXPECTED reply {from} -> {}: expected none: {reason}",
                        t.label
                    );
                }
            }
        }
        out
    }
}

/// The TTL a reply must arrive with: 64 minus one per router on the way back.
/// A pod's own node and a pod on the same bridge answer directly (64);
/// another node's reply is routed by the pod's node (63); a pod on another
/// node has its reply routed by both nodes (62).
fn expected_ttl(src_node: &str, target: &Target) -> u8 {
    let same_node = src_node == target.node;
    match (&target.kind, same_node) {
        (TargetKind::Pod, true) => 64,
        (TargetKind::Pod, false) => 62,
        (_, true) => 64,
        (_, false) => 63,
    }
}

/// The targets of a lab: pods, then per node its overlay and underlay
/// address; IPv4 first, then IPv6 (labels ending in `@v6`).
pub(crate) fn targets(lab: &Lab) -> Vec<Target> {
    let mut t = Vec::new();
    let st = &lab.state;
    for v6 in [false, true] {
        if (!v6 && !st.family.has_v4()) || (v6 && !st.family.has_v6()) {
            continue;
        }
        let sfx = if v6 { "@v6" } else { "" };
        for p in &st.pods {
            let ip = if v6 {
                p.ipv6.map(|n| IpAddr::V6(n.addr()))
            } else {
                p.ip.map(|n| IpAddr::V4(n.addr()))
            };
            if let Some(ip) = ip {
                t.push(Target {
                    label: format!("{}{sfx}", p.name),
                    ip,
                    kind: TargetKind::Pod,
                    node: p.node.clone(),
                });
            }
        }
        for n in &st.nodes {
            let has_pods = st.pods.iter().any(|p| p.node == n.name);
            let dev = if has_pods {
                "cni0".to_string()
            } else {
                // A node without pods holds its overlay address on the
                // backend's device; host-gw has none (and no address).
                // IPv6 has no such address on flannel-v6.1 or flannel0.
                match st.backend.overlay_device() {
                    Some(d) if !v6 => d,
                    _ => continue,
                }
            };
            let ip = if v6 {
                match n.subnet_v6 {
                    Some(s) => IpAddr::V6(first_host_v6(s)),
                    None => continue,
                }
            } else {
                IpAddr::V4(overlay_address(st, n))
            };
            t.push(Target {
                label: format!("{}/{dev}{sfx}", n.name),
                ip,
                kind: TargetKind::NodeOverlay,
                node: n.name.clone(),
            });
        }
        for n in &st.nodes {
            let ip = if v6 {
                match n.underlay_ipv6 {
                    Some(a) => IpAddr::V6(a),
                    None => continue,
                }
            } else {
                IpAddr::V4(n.underlay_ip)
            };
            t.push(underlay_target(n, ip, sfx));
        }
    }
    t
}

fn first_host_v6(net: ipnet::Ipv6Net) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::from(u128::from(net.network()) + 1)
}

fn underlay_target(n: &NodeState, ip: IpAddr, sfx: &str) -> Target {
    Target {
        label: format!("{}/ens3{sfx}", n.name),
        ip,
        kind: TargetKind::NodeUnderlay,
        node: n.name.clone(),
    }
}

/// Why a pair cannot work in this lab, if it cannot: with host-gw across
/// two segments flanneld installs no route to a peer on the other segment
/// (its PublicIP is not directly connected), so neither the peer's pods and
/// cni0 nor, for the replies, its underlay address answer a pod.
pub(crate) fn expected_failure(lab: &Lab, src: &NodeState, target: &Target) -> Option<String> {
    let st = &lab.state;
    if st.backend != Backend::HostGw || st.topology != Topology::TwoSegment {
        return None;
    }
    let dst = st.node(&target.node)?;
    if dst.segment == src.segment {
        return None;
    }
    // With --ip-masq the request to an underlay address leaves masqueraded
    // as the node's own address, so the reply comes back through the router.
    if st.ip_masq && target.kind == TargetKind::NodeUnderlay {
        return None;
    }
    let (subnet, public) = match target.ip {
        IpAddr::V4(_) => (dst.subnet.to_string(), dst.underlay_ip.to_string()),
        IpAddr::V6(_) => (
            dst.subnet_v6.map(|s| s.to_string()).unwrap_or_default(),
            dst.underlay_ipv6.map(|a| a.to_string()).unwrap_or_default(),
        ),
    };
    let (src_subnet, src_public) = match target.ip {
        IpAddr::V4(_) => (src.subnet.to_string(), src.underlay_ip.to_string()),
        IpAddr::V6(_) => (
            src.subnet_v6.map(|s| s.to_string()).unwrap_or_default(),
            src.underlay_ipv6.map(|a| a.to_string()).unwrap_or_default(),
        ),
    };
    // To a pod or cni0 the request has no route; to the underlay address
    // the request goes through the router but the reply has no route back:
    // the refusal that matters is then the target node's.
    let (refuser, refused, refused_ip) = if target.kind == TargetKind::NodeUnderlay {
        (dst, src_subnet, src_public)
    } else {
        (src, subnet, public.clone())
    };
    let logged = std::fs::read_to_string(lab.log_path(&refuser.name))
        .map(|log| {
            log.lines()
                .any(|l| l.contains("host-gw") && l.contains(&refused) && l.contains(&refused_ip))
        })
        .unwrap_or(false);
    let what = if target.kind == TargetKind::NodeUnderlay {
        format!(
            "the reply from {} has no route back: host-gw across segments",
            target.node
        )
    } else {
        "host-gw across segments".to_string()
    };
    Some(format!(
        "{what}: {} ({public}) is on segment {}, {} on segment {}; flanneld on {} refuses the route to {refused} ({})",
        dst.name,
        dst.segment,
        src.name,
        src.segment,
        refuser.name,
        if logged {
            "it says so in its log"
        } else {
            "NOT found in its log"
        }
    ))
}

/// Pings every target from every pod, one thread per pod. A pair is retried
/// until it answers or `per_pair` has passed (the first packets may race the
/// daemons' last writes).
pub(crate) fn run(lab: &Lab, per_pair: Duration) -> Result<Matrix> {
    let targets = targets(lab);
    let pods: Vec<_> = lab
        .state
        .pods
        .iter()
        .filter(|p| !p.addresses().is_empty())
        .collect();
    let sources = pods
        .iter()
        .map(|p| (p.name.clone(), p.addresses()[0]))
        .collect();
    let rows: Vec<Result<Vec<Outcome>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = pods
            .iter()
            .map(|pod| scope.spawn(|| row(lab, pod, &targets, per_pair)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ping thread panicked"))
            .collect()
    });
    Ok(Matrix {
        sources,
        targets,
        cells: rows.into_iter().collect::<Result<_>>()?,
    })
}

/// A pod's two pingers (opened when the lab has the family).
struct Pingers {
    v4: Option<Pinger>,
    v6: Option<Pinger<Ipv6Addr>>,
}

impl Pingers {
    /// One echo; `(ttl or hop limit, rtt)` of the reply.
    fn echo(&mut self, ip: IpAddr, timeout: Duration) -> std::io::Result<Option<(u8, Duration)>> {
        fn one<A: IcmpFamily>(
            p: &mut Option<Pinger<A>>,
            a: A,
            timeout: Duration,
        ) -> std::io::Result<Option<(u8, Duration)>> {
            match p {
                Some(p) => Ok(p.echo(a, timeout)?.map(|r| (r.ttl, r.rtt))),
                None => Ok(None),
            }
        }
        match ip {
            IpAddr::V4(a) => one(&mut self.v4, a, timeout),
            IpAddr::V6(a) => one(&mut self.v6, a, timeout),
        }
    }
}

fn row(lab: &Lab, pod: &PodState, targets: &[Target], per_pair: Duration) -> Result<Vec<Outcome>> {
    let ns = lab.netns(&pod.name)?;
    let mut pingers = Pingers {
        v4: pod.ip.map(|_| Pinger::open_in(&ns)).transpose()?,
        v6: pod.ipv6.map(|_| Pinger::open_in(&ns)).transpose()?,
    };
    let src = lab.node(&pod.node)?;
    let mut row = Vec::new();
    for t in targets {
        if t.kind == TargetKind::Pod && t.node == pod.node && pod.addresses().contains(&t.ip) {
            row.push(Outcome::Itself);
            continue;
        }
        let mut expected = expected_ttl(&pod.node, t);
        // With --ip-masq a pod's packet to an address outside the cluster
        // network is masqueraded, so the reply from a node on the other
        // segment returns to the node's underlay address through the router
        // (one more hop) instead of over the overlay.
        let other_segment = lab
            .state
            .node(&t.node)
            .is_some_and(|d| d.segment != src.segment);
        if lab.state.ip_masq && t.kind == TargetKind::NodeUnderlay && other_segment {
            expected -= 1;
        }
        let refusal = expected_failure(lab, src, t);
        // A pair that must fail gets one second: long enough for a reply
        // over a working path, short enough to keep the check quick.
        let budget = if refusal.is_some() {
            Duration::from_secs(1)
        } else {
            per_pair
        };
        let deadline = Instant::now() + budget;
        let mut outcome = Outcome::NoReply;
        while Instant::now() < deadline {
            match pingers.echo(t.ip, Duration::from_millis(500)) {
                Ok(Some((ttl, rtt))) => {
                    outcome = match &refusal {
                        Some(reason) => Outcome::UnexpectedReply {
                            ttl,
                            reason: reason.clone(),
                        },
                        None if ttl == expected => Outcome::Ok { ttl, rtt },
                        None => Outcome::WrongTtl { ttl, expected },
                    };
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    return Err(LabError::Io {
                        context: format!("pinging {} from {}", t.ip, pod.name),
                        source: e,
                    })
                }
            }
        }
        if let (Outcome::NoReply, Some(reason)) = (&outcome, refusal) {
            outcome = Outcome::ExpectedFailure { reason };
        }
        row.push(outcome);
    }
    Ok(row)
}

impl Lab {
    /// Pings every target from every pod and returns the matrix.
    pub fn check(&self) -> Result<Matrix> {
        run(self, Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(kind: TargetKind, node: &str) -> Target {
        Target {
            label: "x".into(),
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            kind,
            node: node.into(),
        }
    }

    use std::net::Ipv4Addr;

    #[test]
    fn ttls_follow_the_packet_walk() {
        assert_eq!(
            expected_ttl("k8s-node1", &t(TargetKind::Pod, "k8s-node2")),
            62
        );
        assert_eq!(
            expected_ttl("k8s-node1", &t(TargetKind::NodeOverlay, "k8s-node1")),
            64
        );
        assert_eq!(
            expected_ttl("k8s-node1", &t(TargetKind::NodeOverlay, "master")),
            63
        );
        assert_eq!(
            expected_ttl("k8s-node1", &t(TargetKind::NodeUnderlay, "k8s-node2")),
            63
        );
        assert_eq!(
            expected_ttl("k8s-node1", &t(TargetKind::NodeUnderlay, "k8s-node1")),
            64
        );
    }

    #[test]
    fn matrix_counts_and_renders_failures() {
        let m = Matrix {
            sources: vec![
                ("ubuntu-1".into(), IpAddr::V4(Ipv4Addr::new(10, 244, 1, 2))),
                ("ubuntu-2".into(), IpAddr::V4(Ipv4Addr::new(10, 244, 2, 2))),
            ],
            targets: vec![
                Target {
                    label: "ubuntu-1".into(),
                    ip: IpAddr::V4(Ipv4Addr::new(10, 244, 1, 2)),
                    kind: TargetKind::Pod,
                    node: "k8s-node1".into(),
                },
                Target {
                    label: "ubuntu-2".into(),
                    ip: IpAddr::V4(Ipv4Addr::new(10, 244, 2, 2)),
                    kind: TargetKind::Pod,
                    node: "k8s-node2".into(),
                },
            ],
            cells: vec![
                vec![
                    Outcome::Itself,
                    Outcome::Ok {
                        ttl: 62,
                        rtt: Duration::from_millis(1),
                    },
                ],
                vec![Outcome::NoReply, Outcome::Itself],
            ],
        };
        assert_eq!(m.total(), 2);
        assert_eq!(m.failed(), 1);
        assert!(!m.all_ok());
        assert!(m.ensure_all_ok().is_err());
        let s = m.render();
        assert!(s.contains("ttl 62") && s.contains("FAIL"), "{s}");
        assert_eq!(
            m.get("ubuntu-1", "ubuntu-2"),
            Some(&Outcome::Ok {
                ttl: 62,
                rtt: Duration::from_millis(1)
            })
        );
    }
}
