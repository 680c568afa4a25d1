//! `Lab::add_node`: a new worker with its pod joins the running lab, in two
//! halves so that a node can begin joining while the store is down.

use std::time::{Duration, Instant};

use flannel_netlink::netns::NetNs;

use super::{
    io_err, node_name, ns_err, plan_node, plan_pod, poll_until, require_root, topology, Lab,
    LabError, Result, StoreKind, MAX_NODES,
};

impl Lab {
    /// Adds a worker `k8s-node<I>` (I = the highest index + 1) with its pod
    /// `ubuntu-<I>` to the running lab and waits until its lease is
    /// published and the pod attached; the other nodes are not touched.
    /// Returns the node's name.
    pub fn add_node(&mut self, timeout: Duration) -> Result<String> {
        let node = self.begin_add_node()?;
        self.finish_add_node(&node, Instant::now() + timeout)?;
        Ok(node)
    }

    /// First half of [`Lab::add_node`]: namespace, underlay port, the
    /// reservation (or, with the store unreachable or reservations off, a
    /// seeded subnet.env naming the planned subnet) and the daemon. Does not
    /// wait for the store: while etcd is stopped the new daemon keeps
    /// trying to reach it.
    pub fn begin_add_node(&mut self) -> Result<String> {
        self.begin_add_node_with(true)
    }

    /// [`Lab::begin_add_node`]; with `--store kube` and `assign_pod_cidr`
    /// false, the node's Node is registered without a podCIDR (as before
    /// kube-controller-manager allocates one; see
    /// [`Lab::kube_assign_pod_cidr`]): its flanneld waits for it.
    pub fn begin_add_node_with(&mut self, assign_pod_cidr: bool) -> Result<String> {
        require_root()?;
        let index = self.state.nodes.iter().map(|n| n.index).max().unwrap_or(0) + 1;
        if index > MAX_NODES {
            return Err(LabError::InvalidOption {
                option: "add_node",
                reason: format!("the lab already has {MAX_NODES} workers"),
            });
        }
        let name = node_name(index);
        let node = plan_node(
            &self.state.name,
            index,
            self.state.topology,
            self.state.family,
        );
        // Recorded first, so that `down` knows it whatever fails below.
        self.state.nodes.push(node.clone());
        self.state.pods.push(plan_pod(&self.state.name, index));
        self.state.save()?;
        let switch = self.switch_netns(&node);
        let underlay = NetNs::open(&switch).map_err(ns_err(format!("opening {switch}")))?;
        let ns =
            NetNs::add(&node.netns).map_err(ns_err(format!("creating the namespace of {name}")))?;
        topology::wire_node(&underlay, &ns, &node, self.state.mtu)?;
        std::fs::create_dir_all(self.node_dir(&name))
            .map_err(io_err(format!("creating the directory of {name}")))?;
        if self.state.store == StoreKind::Kube {
            self.kube_register_node(&node, assign_pod_cidr)?;
        } else if self.state.reservations {
            match self.write_reservation(&node) {
                Ok(()) => {}
                // The store is down (an outage test): the seeded subnet.env
                // still makes the daemon ask for the planned subnet.
                Err(LabError::Etcd { .. })
                | Err(LabError::Store {
                    source: flannel_store::StoreError::Unavailable(_),
                    ..
                }) => self.seed_subnet_env(&node)?,
                Err(e) => return Err(e),
            }
        } else {
            self.seed_subnet_env(&node)?;
        }
        self.start_daemon(&name)?;
        Ok(name)
    }

    /// Second half of [`Lab::add_node`]: waits until the node's lease carries
    /// its VtepMAC (store errors count as "not yet": etcd may be coming
    /// back) and its subnet.env is right, then attaches its pod.
    pub fn finish_add_node(&mut self, node: &str, deadline: Instant) -> Result<()> {
        let n = self.node(node)?.clone();
        let mut last_error = String::new();
        poll_until(
            deadline,
            &format!("the lease of {node} with its VtepMAC"),
            || {
                match self.leases() {
                    Ok(leases) => {
                        if leases.iter().any(|l| self.is_published(&n, l)) {
                            return Ok(true);
                        }
                    }
                    Err(e) => last_error = e.to_string(),
                }
                self.ensure_daemon_alive(node)?;
                Ok(false)
            },
        )
        .map_err(|e| match e {
            LabError::Timeout { what, secs } if !last_error.is_empty() => LabError::Timeout {
                what: format!("{what} (last store error: {last_error})"),
                secs,
            },
            e => e,
        })?;
        self.wait_daemon_ready(node, deadline)?;
        for i in 0..self.state.pods.len() {
            if self.state.pods[i].node == node && self.state.pods[i].addresses().is_empty() {
                let a = self.attach_pod(i)?;
                self.state.pods[i].ip = a.ipv4;
                self.state.pods[i].gateway = a.gateway;
                self.state.pods[i].ipv6 = a.ipv6;
                self.state.save()?;
            }
        }
        Ok(())
    }
}
