//! `Lab::switch_backend`: the running lab moved to another backend the way
//! an operator does it, by restarting every flanneld on a new net-conf.

use std::time::{Duration, Instant};

use super::{absent_ok, io_err, masq, Backend, Lab, LabError, Result};

impl Lab {
    /// Switches the running lab to another backend the way an operator
    /// does: every flanneld is stopped, net-conf.json (or etcd's config) is
    /// rewritten, every flanneld is started again and the leases are waited
    /// for. The pods stay as they are.
    pub fn switch_backend(
        &mut self,
        backend: Backend,
        direct_routing: bool,
        timeout: Duration,
    ) -> Result<()> {
        if direct_routing && backend != Backend::Vxlan {
            return Err(LabError::InvalidOption {
                option: "--direct-routing",
                reason: format!("DirectRouting is a vxlan option, not one of {backend}"),
            });
        }
        let nodes: Vec<String> = self.state.nodes.iter().map(|n| n.name.clone()).collect();
        for n in &nodes {
            self.stop_daemon(n, Duration::from_secs(5))?;
            // The new daemon writes its own (another MTU); waiting for the
            // file must not be fooled by the old one. Its lease, which names
            // the node's address, still tells the daemon its subnet.
            absent_ok(std::fs::remove_file(self.subnet_file(n))).map_err(io_err(format!(
                "removing {}",
                self.subnet_file(n).display()
            )))?;
        }
        self.state.backend = backend;
        self.state.direct_routing = direct_routing;
        self.state.save()?;
        self.publish_net_conf()?;
        for n in &nodes {
            self.start_daemon(n)?;
        }
        let deadline = Instant::now() + timeout;
        for n in &nodes {
            self.wait_daemon_ready(n, deadline)?;
        }
        self.wait_leases_published(deadline)?;
        masq::wait_ready(self, Instant::now() + Duration::from_secs(10))
    }
}
