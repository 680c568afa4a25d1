//! The connectivity matrix: every pod pings every other pod and every node
//! (its overlay address and its underlay address), and the reply TTLs are
//! compared with the hop counts the packet walk predicts.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::{overlay_address, Lab, LabError, NodeState, Pinger, PodState, Result};

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
    /// `ubuntu-2`, `k8s-node1/cni0`, `master/flannel.1`, `k8s-node1/ens3`.
    pub label: String,
    pub ip: Ipv4Addr,
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
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Itself | Outcome::Ok { .. })
    }
}

/// Rows are the pods, columns the targets.
#[derive(Debug, Clone)]
pub struct Matrix {
    /// Pod names with their addresses.
    pub sources: Vec<(String, Ipv4Addr)>,
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
        let _ = writeln!(
            out,
            "{} of {} pairs OK (pod to pod across nodes: ttl 62, as in the seed)",
            self.total() - self.failed().min(self.total()),
            self.total()
        );
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

/// The targets of a lab: pods, then per node its overlay and underlay address.
pub(crate) fn targets(lab: &Lab) -> Vec<Target> {
    let mut t = Vec::new();
    for p in &lab.state.pods {
        if let Some(ip) = p.ip {
            t.push(Target {
                label: p.name.clone(),
                ip: ip.addr(),
                kind: TargetKind::Pod,
                node: p.node.clone(),
            });
        }
    }
    for n in &lab.state.nodes {
        let has_pods = lab.state.pods.iter().any(|p| p.node == n.name);
        let dev = if has_pods { "cni0" } else { "flannel.1" };
        t.push(Target {
            label: format!("{}/{dev}", n.name),
            ip: overlay_address(&lab.state, n),
            kind: TargetKind::NodeOverlay,
            node: n.name.clone(),
        });
    }
    for n in &lab.state.nodes {
        t.push(underlay_target(n));
    }
    t
}

fn underlay_target(n: &NodeState) -> Target {
    Target {
        label: format!("{}/ens3", n.name),
        ip: n.underlay_ip,
        kind: TargetKind::NodeUnderlay,
        node: n.name.clone(),
    }
}

/// Pings every target from every pod, one thread per pod. A pair is retried
/// until it answers or `per_pair` has passed (the first packets may race the
/// daemons' last writes).
pub(crate) fn run(lab: &Lab, per_pair: Duration) -> Result<Matrix> {
    let targets = targets(lab);
    let pods: Vec<_> = lab.state.pods.iter().filter(|p| p.ip.is_some()).collect();
    let sources = pods
        .iter()
        .map(|p| (p.name.clone(), p.ip.expect("filtered").addr()))
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

fn row(lab: &Lab, pod: &PodState, targets: &[Target], per_pair: Duration) -> Result<Vec<Outcome>> {
    let mut pinger = Pinger::open_in(&lab.netns(&pod.name)?)?;
    let mut row = Vec::new();
    for t in targets {
        if t.kind == TargetKind::Pod && t.label == pod.name {
            row.push(Outcome::Itself);
            continue;
        }
        let expected = expected_ttl(&pod.node, t);
        let deadline = Instant::now() + per_pair;
        let mut outcome = Outcome::NoReply;
        while Instant::now() < deadline {
            match pinger.echo(t.ip, Duration::from_millis(500)) {
                Ok(Some(r)) if r.ttl == expected => {
                    outcome = Outcome::Ok {
                        ttl: r.ttl,
                        rtt: r.rtt,
                    };
                    break;
                }
                Ok(Some(r)) => {
                    outcome = Outcome::WrongTtl {
                        ttl: r.ttl,
                        expected,
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
        row.push(outcome);
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(kind: TargetKind, node: &str) -> Target {
        Target {
            label: "x".into(),
            ip: Ipv4Addr::LOCALHOST,
            kind,
            node: node.into(),
        }
    }

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
                ("ubuntu-1".into(), Ipv4Addr::new(10, 244, 1, 2)),
                ("ubuntu-2".into(), Ipv4Addr::new(10, 244, 2, 2)),
            ],
            targets: vec![
                Target {
                    label: "ubuntu-1".into(),
                    ip: Ipv4Addr::new(10, 244, 1, 2),
                    kind: TargetKind::Pod,
                    node: "k8s-node1".into(),
                },
                Target {
                    label: "ubuntu-2".into(),
                    ip: Ipv4Addr::new(10, 244, 2, 2),
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
