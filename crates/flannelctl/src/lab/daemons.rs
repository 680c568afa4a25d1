//! The flanneld of each node: its arguments, starting, stopping and killing
//! it by its checked pid, and waiting until it is ready.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use flannel_netlink::netns::NetNs;
use flannel_netlink::Netlink;

use super::{nl_err, ns_err, poll_until, procs, Lab, LabError, NodeState, Result, HEALTHZ_PORT};

impl Lab {
    /// Starts the node's `flanneld` exactly as `up` does (detached, logs to
    /// `flanneld.log`, pid in `flanneld.pid`). Returns its pid. Fails if the
    /// node's daemon is already running.
    pub fn start_daemon(&self, node: &str) -> Result<u32> {
        let n = self.node(node)?;
        if let Some(pid) = self.daemon_pid(node) {
            if procs::is_lab_flanneld(pid, &self.dir()) {
                return Err(LabError::InvalidOption {
                    option: "start_daemon",
                    reason: format!("flanneld of {node} is already running (pid {pid})"),
                });
            }
        }
        let ns = NetNs::open(&n.netns).map_err(ns_err(format!("opening {}", n.netns)))?;
        // The health endpoint listens on 127.0.0.1, which a fresh namespace
        // only has once lo is up.
        let mut nl = Netlink::open_in(&ns).map_err(nl_err(format!("netlink in {node}")))?;
        if let Some(lo) = nl
            .link_by_name("lo")
            .map_err(nl_err(format!("ip link show lo in {node}")))?
        {
            nl.set_link_up(lo.index)
                .map_err(nl_err(format!("ip link set lo up in {node}")))?;
        }
        procs::spawn_flanneld(
            &ns,
            &self.state.bin_dir,
            &self.node_dir(node),
            &self.daemon_args(n)?,
            &self.store_env(n),
            &self.subnet_file(node),
        )
    }

    /// The flags every daemon gets besides `--subnet-file`.
    fn daemon_store_args(&self) -> Result<Vec<OsString>> {
        let mut args: Vec<OsString> = self.store_args()?;
        if let Some(ttl) = self.state.lease_ttl {
            args.push("--lease-ttl".into());
            args.push(ttl.to_string().into());
        }
        if self.state.ip_masq {
            args.push("--ip-masq".into());
        }
        Ok(args)
    }

    /// The flags of one node's daemon: [`Self::daemon_store_args`], the
    /// health endpoint on the node's 127.0.0.1:[`HEALTHZ_PORT`], and in labs
    /// with IPv6 `--public-ipv6` naming the node's IPv6 underlay address.
    fn daemon_args(&self, n: &NodeState) -> Result<Vec<OsString>> {
        let mut args = self.daemon_store_args()?;
        args.extend(
            [
                "--healthz-ip",
                "127.0.0.1",
                "--healthz-port",
                &HEALTHZ_PORT.to_string(),
            ]
            .map(OsString::from),
        );
        if let Some(v6) = n.underlay_ipv6.filter(|_| self.state.family.has_v6()) {
            args.push("--public-ipv6".into());
            args.push(v6.to_string().into());
        }
        Ok(args)
    }

    /// Kills the node's `flanneld` with SIGKILL (a crash: nothing is cleaned
    /// up, its lease stays until it expires), after checking that the pid
    /// really is this lab's flanneld. Returns whether a daemon was running.
    pub fn kill_daemon(&self, node: &str) -> Result<bool> {
        self.node(node)?;
        match self.daemon_pid(node) {
            Some(pid) => procs::kill_flanneld(pid, &self.dir()),
            None => Ok(false),
        }
    }

    /// Stops the node's `flanneld` with SIGTERM (SIGKILL after `timeout`),
    /// after checking that the pid really is this lab's flanneld. Returns
    /// whether a daemon was running.
    pub fn stop_daemon(&self, node: &str, timeout: Duration) -> Result<bool> {
        self.node(node)?;
        match self.daemon_pid(node) {
            Some(pid) => procs::stop_flanneld(pid, &self.dir(), timeout),
            None => Ok(false),
        }
    }

    /// The pid recorded in the node's `flanneld.pid`.
    pub fn daemon_pid(&self, node: &str) -> Option<u32> {
        procs::read_pid(&self.node_dir(node).join(procs::PID_FILE))
    }

    /// Whether the node's daemon runs (pid alive and really our flanneld).
    pub fn daemon_alive(&self, node: &str) -> bool {
        self.daemon_pid(node)
            .is_some_and(|pid| procs::is_lab_flanneld(pid, &self.dir()))
    }

    /// Whether the node's flanneld says it is ready: `GET /readyz` on its
    /// health endpoint, from inside the node's namespace. `Err` says why it
    /// did not answer.
    pub fn daemon_ready(&self, node: &str) -> std::result::Result<bool, String> {
        let ns = self.netns(node).map_err(|e| e.to_string())?;
        ns.run(|| procs::http_get_status(HEALTHZ_PORT, flannel_core::wire::READYZ_PATH))
            .map_err(|e| e.to_string())?
            .map(|status| status == 200)
    }

    /// Waits until the node's subnet.env names its reserved subnet, then
    /// until its flanneld answers `/readyz` with 200 (subnet.env written and
    /// the masquerade/forward rules applied).
    pub fn wait_daemon_ready(&self, node: &str, deadline: Instant) -> Result<()> {
        self.wait_subnet_env(node, deadline)?;
        poll_until(deadline, &format!("/readyz of flanneld on {node}"), || {
            if self.daemon_ready(node) == Ok(true) {
                return Ok(true);
            }
            self.ensure_daemon_alive(node)?;
            Ok(false)
        })
    }

    /// Waits until the node's subnet.env names its reserved subnet.
    pub fn wait_subnet_env(&self, node: &str, deadline: Instant) -> Result<()> {
        let n = self.node(node)?.clone();
        let path = self.subnet_file(node);
        let want = self.state.lease_key(&n);
        poll_until(deadline, &format!("{} of {node}", path.display()), || {
            if let Ok(text) = std::fs::read_to_string(&path) {
                if let Ok(env) = flannel_core::subnet_env::SubnetEnv::parse(&text) {
                    let got = env.lease_key();
                    if got == Some(want) {
                        return Ok(true);
                    }
                    return Err(LabError::WrongSubnet {
                        node: node.to_string(),
                        got: got.map(|g| g.to_string()).unwrap_or_else(|| "none".into()),
                        want: want.to_string(),
                        log: self.log_path(node).display().to_string(),
                    });
                }
            }
            self.ensure_daemon_alive(node)?;
            Ok(false)
        })
    }

    /// Waits until every node's lease carries its VtepMAC.
    pub fn wait_leases_published(&self, deadline: Instant) -> Result<()> {
        poll_until(deadline, "every node's lease to be published", || {
            let leases = self.leases()?;
            let missing: Vec<&NodeState> = self
                .state
                .nodes
                .iter()
                .filter(|n| !leases.iter().any(|l| self.is_published(n, l)))
                .collect();
            for n in &missing {
                self.ensure_daemon_alive(&n.name)?;
            }
            Ok(missing.is_empty())
        })
    }

    /// The node's `flanneld.log` (the daemon's stderr, appended across restarts).
    pub fn log_path(&self, node: &str) -> PathBuf {
        self.node_dir(node).join(procs::LOG_FILE)
    }

    pub(super) fn ensure_daemon_alive(&self, node: &str) -> Result<()> {
        if self.daemon_alive(node) {
            return Ok(());
        }
        let log = self.log_path(node);
        Err(LabError::DaemonDied {
            node: node.to_string(),
            pid: self.daemon_pid(node).unwrap_or(0),
            log: log.display().to_string(),
            tail: procs::tail(&log, 15),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::{LabState, StoreKind};

    #[test]
    fn daemons_get_the_store_flags_and_the_ttl() {
        let mut lab = Lab {
            state: LabState::plan("t1", 1, 1500, PathBuf::from("/bin")),
        };
        let args = |lab: &Lab| -> Vec<String> {
            lab.daemon_store_args()
                .unwrap()
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            args(&lab),
            [
                "--local-store",
                "/run/flannel-lab/t1/store",
                "--net-config-path",
                "/run/flannel-lab/t1/net-conf.json"
            ]
        );
        lab.state.ip_masq = true;
        assert_eq!(args(&lab).last().map(String::as_str), Some("--ip-masq"));
        lab.state.ip_masq = false;
        lab.state.store = StoreKind::Etcd;
        lab.state.lease_ttl = Some(7);
        assert_eq!(
            args(&lab),
            [
                "--etcd-endpoints",
                "http://172.16.1.8:2379",
                "--lease-ttl",
                "7"
            ]
        );
        assert_eq!(
            lab.etcd_lease_key("k8s-node1").unwrap(),
            "/coreos.com/network/subnets/10.244.1.0-24"
        );
        let err = lab.require_etcd("stop_store");
        assert!(err.is_ok());
        lab.state.store = StoreKind::Local;
        let err = lab.stop_store().unwrap_err().to_string();
        assert!(err.contains("--store etcd"), "{err}");
    }
}
