//! `flannelctl lab up`: checks the options, plans the lab, then builds it
//! step by step (underlay, nodes, store, daemons, pods), removing it all
//! again when a step fails.

use std::time::{Duration, Instant};

use flannel_netlink::netns::NetNs;

use super::{
    check_interrupted, down, interrupted, io_err, lab_dir, lab_namespaces, masq, ns_err,
    require_root, resolve_bin_dir, store, topology, validate_name, write_atomic, Backend, Lab,
    LabError, LabOptions, LabState, NodeState, Result, StoreKind, LAB_ROOT, MAX_NODES,
    UNDERLAY_PREFIX,
};

impl Lab {
    /// `flannelctl lab up`: builds the topology, starts the daemons, waits
    /// for them, attaches the pods. On failure everything built so far is
    /// removed again unless `keep_on_failure`.
    pub fn up(opts: &LabOptions) -> Result<Lab> {
        require_root()?;
        validate_name(&opts.name)?;
        if opts.nodes == 0 || opts.nodes > MAX_NODES {
            return Err(LabError::InvalidOption {
                option: "--nodes",
                reason: format!("{} is out of range: use 1 to {MAX_NODES}", opts.nodes),
            });
        }
        if !(1280..=9000).contains(&opts.mtu) {
            return Err(LabError::InvalidOption {
                option: "--mtu",
                reason: format!(
                    "{} is out of range: use 1280 to 9000 (pods get MTU - 50)",
                    opts.mtu
                ),
            });
        }
        if opts.direct_routing && opts.backend != Backend::Vxlan {
            return Err(LabError::InvalidOption {
                option: "--direct-routing",
                reason: format!(
                    "DirectRouting is an option of the vxlan backend, not of {}: drop it or use --backend vxlan",
                    opts.backend
                ),
            });
        }
        let bin_dir = resolve_bin_dir(opts.bin_dir.as_deref())?;
        let kube_apiserver = store::check_installed(opts.store, opts.kube_apiserver.as_deref())?;
        let dir = lab_dir(&opts.name);
        let leftovers = lab_namespaces(&opts.name);
        if !leftovers.is_empty() {
            return Err(LabError::Exists {
                name: opts.name.clone(),
                what: format!("namespaces {}", leftovers.join(", ")),
            });
        }
        std::fs::create_dir_all(LAB_ROOT).map_err(io_err(format!("creating {LAB_ROOT}")))?;
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(LabError::Exists {
                    name: opts.name.clone(),
                    what: format!("{} is present", dir.display()),
                })
            }
            Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
        }
        if opts.lease_ttl == Some(0) {
            return Err(LabError::InvalidOption {
                option: "--lease-ttl",
                reason: "0 is out of range: give the lease lifetime in seconds, at least 1"
                    .to_string(),
            });
        }
        let mut state = LabState::plan_with(
            &opts.name,
            opts.nodes,
            opts.mtu,
            bin_dir,
            opts.topology,
            opts.family,
        );
        state.backend = opts.backend;
        state.direct_routing = opts.direct_routing;
        state.ip_masq = opts.ip_masq;
        state.store = opts.store;
        state.kube_apiserver = kube_apiserver;
        state.lease_ttl = opts.lease_ttl;
        state.reservations = opts.reservations;
        let mut lab = Lab { state };
        match lab.build(opts.ready_timeout, opts.progress) {
            Ok(()) => Ok(lab),
            Err(e) => {
                if !opts.keep_on_failure {
                    if let Err(down_err) = down(&opts.name) {
                        eprintln!("cleaning up after the failed `lab up`: {down_err}");
                    }
                }
                // A step can also fail because the interrupt killed the
                // command it ran (the terminal signals the whole group).
                if interrupted() {
                    return Err(LabError::Interrupted);
                }
                Err(e)
            }
        }
    }

    fn build(&mut self, ready_timeout: Duration, progress: bool) -> Result<()> {
        // Every step ends here: an interrupt stops the build at the next one.
        let say = |msg: String| {
            if progress {
                eprintln!("lab {}: {msg}", self.state.name);
            }
            check_interrupted()
        };
        self.state.save()?;
        for line in topology::build_network(&self.state)? {
            say(line)?;
        }
        for node in &self.state.nodes {
            let ns = NetNs::add(&node.netns)
                .map_err(ns_err(format!("creating the namespace of {}", node.name)))?;
            let switch = NetNs::open(&self.switch_netns(node))
                .map_err(ns_err(format!("opening the switch of {}", node.name)))?;
            topology::wire_node(&switch, &ns, node, self.state.mtu)?;
            std::fs::create_dir_all(self.node_dir(&node.name))
                .map_err(io_err(format!("creating the directory of {}", node.name)))?;
            say(format!(
                "node {} ({}): ens3 {}/{UNDERLAY_PREFIX}{}, default via {}, ip_forward=1",
                node.name,
                node.netns,
                node.underlay_ip,
                node.underlay_ipv6
                    .map(|a| format!(" {a}/64"))
                    .unwrap_or_default(),
                node.gateway()
            ))?;
        }

        write_atomic(&self.net_conf_path(), self.state.net_conf_json().as_bytes())?;
        if let Some(line) = self.create_store(ready_timeout)? {
            say(line)?;
        }
        let nodes: Vec<NodeState> = self.state.nodes.clone();
        let kube = self.state.store == StoreKind::Kube;
        for n in &nodes {
            if self.state.reservations || kube {
                self.write_reservation(n)?;
            } else {
                self.seed_subnet_env(n)?;
            }
        }
        say(format!(
            "store {}: {} {}",
            self.store_description(),
            if kube {
                "Nodes with their podCIDR"
            } else if self.state.reservations {
                "reservations"
            } else {
                "no reservations; subnet.env seeded with"
            },
            self.state
                .nodes
                .iter()
                .map(|n| format!("{} -> {}", n.subnet, n.underlay_ip))
                .collect::<Vec<_>>()
                .join(", ")
        ))?;

        for node in &self.state.nodes {
            let pid = self.start_daemon(&node.name)?;
            say(format!(
                "flanneld on {}: pid {pid}, log {}",
                node.name,
                self.log_path(&node.name).display()
            ))?;
        }
        let deadline = Instant::now() + ready_timeout;
        for node in &self.state.nodes {
            self.wait_daemon_ready(&node.name, deadline)?;
        }
        self.wait_leases_published(deadline)?;
        say(format!(
            "every flanneld wrote subnet.env, answers /readyz and published its {} lease",
            self.state.backend
        ))?;

        for i in 0..self.state.pods.len() {
            let a = self.attach_pod(i)?;
            self.state.pods[i].ip = a.ipv4;
            self.state.pods[i].gateway = a.gateway;
            self.state.pods[i].ipv6 = a.ipv6;
            self.state.save()?;
            let pod = &self.state.pods[i];
            say(format!(
                "pod {} ({}) on {}: eth0 {} (CNI ADD via the flannel plugin)",
                pod.name,
                pod.netns,
                pod.node,
                pod.addresses()
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ))?;
        }
        if self.state.ip_masq {
            masq::wait_ready(self, Instant::now() + Duration::from_secs(10))?;
            say("every pod's packet to the outside host leaves masqueraded".to_string())?;
        }
        Ok(())
    }
}
