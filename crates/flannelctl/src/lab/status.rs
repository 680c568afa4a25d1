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
    pub pid: Option<u32>,
    /// The pid is alive and is this lab's flanneld.
    pub alive: bool,
    pub subnet_env_present: bool,
}

impl DaemonStatus {
    pub fn healthy(&self) -> bool {
        self.netns_present && self.alive && self.subnet_env_present
    }
}

/// Everything `lab status` shows.
#[derive(Debug, Clone)]
pub struct LabStatus {
    pub name: String,
    /// `local /run/flannel-lab/NAME/store` or `etcd http://172.16.1.8:2379`.
    pub store: String,
    /// For `--store etcd`: the etcd process (pid, running).
    pub etcd: Option<(Option<u32>, bool)>,
    /// Whether the store answered a read of every lease, or why not.
    pub store_health: Result<(), String>,
    pub nodes: Vec<DaemonStatus>,
    /// The leases of the lab's store, or why they could not be read.
    pub leases: Result<Vec<LeaseRow>, String>,
    /// `(pod, node, netns present, address)`.
    pub pods: Vec<(String, String, bool, Option<Ipv4Net>)>,
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
        let _ = writeln!(out, "\nstore: {}", self.store);
        if let Some((pid, alive)) = self.etcd {
            let _ = writeln!(
                out,
                "  etcd pid {} {}",
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
            "  {:<12} {:<15} {:<15} {:<8} {:<10} {:<10} HEALTH",
            "NODE", "UNDERLAY", "SUBNET", "PID", "DAEMON", "SUBNET.ENV"
        );
        for n in &self.nodes {
            let _ = writeln!(
                out,
                "  {:<12} {:<15} {:<15} {:<8} {:<10} {:<10} {}",
                n.node,
                n.underlay_ip.to_string(),
                n.subnet.to_string(),
                n.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                if n.alive { "running" } else { "stopped" },
                if n.subnet_env_present {
                    "present"
                } else {
                    "missing"
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
                ip.map(|i| i.to_string())
                    .unwrap_or_else(|| "(no address)".into()),
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
                pid,
                alive: pid.is_some_and(|p| procs::is_lab_flanneld(p, &lab.dir())),
                subnet_env_present: lab.subnet_file(&n.name).is_file(),
            }
        })
        .collect();
    let leases = lab
        .leases()
        .map(|mut l| {
            l.sort_by_key(|l| l.key);
            l.iter().map(LeaseRow::from_lease).collect::<Vec<_>>()
        })
        .map_err(|e| e.to_string());
    let store_health = leases.as_ref().map(|_| ()).map_err(Clone::clone);
    let etcd =
        (lab.state.store == super::StoreKind::Etcd).then(|| (lab.etcd_pid(), lab.etcd_alive()));
    let pods = lab
        .state
        .pods
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                p.node.clone(),
                netns_present(&p.netns),
                p.ip,
            )
        })
        .collect();
    LabStatus {
        name: lab.state.name.clone(),
        store: lab.store_description(),
        etcd,
        store_health,
        nodes,
        leases,
        pods,
    }
}
