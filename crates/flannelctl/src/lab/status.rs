//! `flannelctl lab status`: nodes, daemons, leases and pods of a lab.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::SystemTime;

use ipnet::Ipv4Net;

use super::{procs, Lab};
use crate::leases::{self, LeaseRow};

/// Health of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonStatus {
    pub node: String,
    pub netns: String,
    /// `/run/netns/<netns>` exists.
    pub netns_present: bool,
    pub underlay_ip: Ipv4Addr,
    pub subnet: Ipv4Net,
    /// The underlay segment (1 or 2).
    pub segment: u8,
    pub pid: Option<u32>,
    /// The pid is alive and is this lab's flanneld.
    pub alive: bool,
    pub subnet_env_present: bool,
    /// The daemon's `/readyz`: `Ok(true)` once subnet.env is written and
    /// its rules applied; `Err` when it did not answer.
    pub ready: Result<bool, String>,
}

impl DaemonStatus {
    pub fn healthy(&self) -> bool {
        self.netns_present && self.alive && self.subnet_env_present && self.ready == Ok(true)
    }
}

/// Everything `lab status` shows.
#[derive(Debug, Clone)]
pub struct LabStatus {
    pub name: String,
    /// `vxlan`, `vxlan (DirectRouting)`, `host-gw`, `udp`.
    pub backend: String,
    /// `flat` or `two-segment`.
    pub topology: String,
    /// `ipv4`, `ipv6` or `dual-stack`.
    pub family: String,
    /// flanneld runs with `--ip-masq`.
    pub ip_masq: bool,
    /// `local /run/flannel-lab/NAME/store` or `etcd http://172.16.1.8:2379`.
    pub store: String,
    /// For `--store etcd` and `kube`: the etcd process (pid, running).
    pub etcd: Option<(Option<u32>, bool)>,
    /// For `--store kube`: the API server process (pid, running).
    pub apiserver: Option<(Option<u32>, bool)>,
    /// Whether the store answered a read of every lease, or why not.
    pub store_health: Result<(), String>,
    pub nodes: Vec<DaemonStatus>,
    /// The leases of the lab's store, or why they could not be read.
    pub leases: Result<Vec<LeaseRow>, String>,
    /// `(pod, node, netns present, address)`.
    pub pods: Vec<(String, String, bool, Vec<std::net::IpAddr>)>,
}

impl LabStatus {
    /// Every node's namespace, daemon and subnet.env are in place and the
    /// store answers.
    pub fn healthy(&self) -> bool {
        self.nodes.iter().all(DaemonStatus::healthy) && self.store_health.is_ok()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "lab {}", self.name);
        let _ = writeln!(
            out,
            "backend: {}  topology: {}  family: {}  ip-masq: {}",
            self.backend,
            self.topology,
            self.family,
            if self.ip_masq { "on" } else { "off" }
        );
        let _ = writeln!(out, "\nstore: {}", self.store);
        if let Some((pid, alive)) = self.etcd {
            let _ = writeln!(
                out,
                "  etcd pid {} {}",
                pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                if alive { "running" } else { "stopped" }
            );
        }
        if let Some((pid, alive)) = self.apiserver {
            let _ = writeln!(
                out,
                "  kube-apiserver pid {} {}",
                pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                if alive { "running" } else { "stopped" }
            );
        }
        let _ = writeln!(
            out,
            "  health: {}",
            match &self.store_health {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("DOWN: {e}"),
            }
        );
        let _ = writeln!(out, "\nnodes:");
        let _ = writeln!(
            out,
            "  {:<12} {:<4} {:<15} {:<15} {:<8} {:<10} {:<10} {:<10} HEALTH",
            "NODE", "SEG", "UNDERLAY", "SUBNET", "PID", "DAEMON", "SUBNET.ENV", "READYZ"
        );
        for n in &self.nodes {
            let _ = writeln!(
                out,
                "  {:<12} {:<4} {:<15} {:<15} {:<8} {:<10} {:<10} {:<10} {}",
                n.node,
                n.segment,
                n.underlay_ip.to_string(),
                n.subnet.to_string(),
                n.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                if n.alive { "running" } else { "stopped" },
                if n.subnet_env_present {
                    "present"
                } else {
                    "missing"
                },
                match n.ready {
                    Ok(true) => "ready",
                    Ok(false) => "not ready",
                    Err(_) => "no answer",
                },
                if !n.netns_present {
                    "netns missing"
                } else if n.healthy() {
                    "ok"
                } else {
                    "DOWN"
                }
            );
        }
        let _ = writeln!(out, "\nleases:");
        match &self.leases {
            Ok(rows) => {
                for l in leases::render_table(rows, SystemTime::now()).lines() {
                    let _ = writeln!(out, "  {l}");
                }
            }
            Err(e) => {
                let _ = writeln!(out, "  unavailable: {e}");
            }
        }
        let _ = writeln!(out, "\npods:");
        for (pod, node, present, ip) in &self.pods {
            let _ = writeln!(
                out,
                "  {:<12} on {:<12} {}{}",
                pod,
                node,
                if ip.is_empty() {
                    "(no address)".to_string()
                } else {
                    ip.iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                },
                if *present { "" } else { "  (netns missing)" }
            );
        }
        out
    }
}

pub(crate) fn collect(lab: &Lab) -> LabStatus {
    let netns_present = |ns: &str| Path::new("/run/netns").join(ns).exists();
    let nodes = lab
        .state
        .nodes
        .iter()
        .map(|n| {
            let pid = lab.daemon_pid(&n.name);
            DaemonStatus {
                node: n.name.clone(),
                netns: n.netns.clone(),
                netns_present: netns_present(&n.netns),
                underlay_ip: n.underlay_ip,
                subnet: n.subnet,
                segment: n.segment,
                pid,
                alive: pid.is_some_and(|p| procs::is_lab_flanneld(p, &lab.dir())),
                subnet_env_present: lab.subnet_file(&n.name).is_file(),
                ready: lab.daemon_ready(&n.name),
            }
        })
        .collect();
    let cfg = lab.state.net_config();
    let leases = lab
        .leases()
        .map(|l| leases::rows(&l, Some(&cfg), SystemTime::now()))
        .map_err(|e| e.to_string());
    let store_health = leases.as_ref().map(|_| ()).map_err(Clone::clone);
    let etcd = lab.etcd_process();
    let apiserver = (lab.state.store == super::StoreKind::Kube)
        .then(|| (lab.kube_dir().pid(), lab.apiserver_alive()));
    let pods = lab
        .state
        .pods
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                p.node.clone(),
                netns_present(&p.netns),
                p.addresses(),
            )
        })
        .collect();
    let st = &lab.state;
    LabStatus {
        name: st.name.clone(),
        backend: if st.direct_routing {
            format!("{} (DirectRouting)", st.backend)
        } else {
            st.backend.to_string()
        },
        topology: st.topology.to_string(),
        family: st.family.to_string(),
        ip_masq: st.ip_masq,
        store: lab.store_description(),
        etcd,
        apiserver,
        store_health,
        nodes,
        leases,
        pods,
    }
}

impl Lab {
    /// Status of the lab for `flannelctl lab status`.
    pub fn status(&self) -> LabStatus {
        collect(self)
    }
}
