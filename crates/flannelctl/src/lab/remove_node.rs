//! `Lab::remove_node`: a worker and its pods leave the running lab, as
//! `kubectl drain` + `kubectl delete node` + the machine switched off would
//! have them leave: its flanneld stopped, its pods deleted (CNI DEL), its
//! lease (or Node) deleted from the store so that every peer drops its
//! routes, its namespaces and directory removed.

use std::time::{Duration, Instant};

use flannel_netlink::netns::NetNs;
use flannel_netlink::Netlink;
use ipnet::IpNet;

use super::{
    absent_ok, io_err, nl_err, ns_err, pods, poll_until, require_root, Lab, LabError, Result,
};

impl Lab {
    /// Removes worker `node` (never the master, which runs the lab's
    /// servers) with its pods, then waits until no other node routes its
    /// subnet any more.
    pub fn remove_node(&mut self, node: &str, timeout: Duration) -> Result<()> {
        require_root()?;
        let n = self.node(node)?.clone();
        if n.index == 0 {
            return Err(LabError::InvalidOption {
                option: "remove-node",
                reason: "the master runs the lab's store servers and stays; remove a worker (k8s-node<i>)".into(),
            });
        }
        self.stop_daemon(node, Duration::from_secs(5))?;
        let node_ns = NetNs::open(&n.netns).map_err(ns_err(format!("opening {}", n.netns)))?;
        let config = pods::cni_config(&self.node_dir(node), &self.subnet_file(node));
        let pods: Vec<_> = self
            .state
            .pods
            .iter()
            .filter(|p| p.node == node)
            .cloned()
            .collect();
        for pod in &pods {
            pods::invoke("DEL", &node_ns, &self.state.bin_dir, pod, node, &config)?;
            NetNs::delete(&pod.netns)
                .map_err(ns_err(format!("deleting the namespace of {}", pod.name)))?;
        }
        drop(node_ns);
        // Without a reservation the lease would stay until it expires; the
        // store forgets the node now (Kubernetes: its Node is deleted).
        self.delete_node_lease(&n)?;
        // The veth goes with the namespace, its switch end with it.
        NetNs::delete(&n.netns).map_err(ns_err(format!("deleting the namespace of {node}")))?;
        absent_ok(std::fs::remove_dir_all(self.node_dir(node))).map_err(io_err(format!(
            "removing {}",
            self.node_dir(node).display()
        )))?;
        self.state.nodes.retain(|x| x.name != node);
        self.state.pods.retain(|p| p.node != node);
        self.state.save()?;
        let gone = IpNet::V4(n.subnet);
        poll_until(
            Instant::now() + timeout,
            &format!("every node to drop its route to {} ({node})", n.subnet),
            || {
                for other in &self.state.nodes {
                    let ns = self.netns(&other.name)?;
                    let mut nl = Netlink::open_in(&ns)
                        .map_err(nl_err(format!("netlink in {}", other.name)))?;
                    let routes = nl
                        .list_routes()
                        .map_err(nl_err(format!("ip route show in {}", other.name)))?;
                    if routes.iter().any(|r| r.dst == gone) {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )
    }
}
