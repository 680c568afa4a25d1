//! `flannelctl`: command-line wiring only; the work is in the library.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use flannel_core::wire;
use flannelctl::install;
use flannelctl::lab::{self, Lab, LabOptions};
use flannelctl::leases;
use flanneld::flags::EtcdFlags;

#[derive(Parser)]
#[command(name = "flannelctl", version, about = "The flannel-rs operator's tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A whole flannel cluster in network namespaces of this machine.
    #[command(subcommand)]
    Lab(LabCommand),
    /// Throughput and latency of the underlay and of pod-to-pod traffic over
    /// vxlan, host-gw, udp and wireguard, in a two-worker lab, as ratios to the underlay;
    /// `bench scale`: the control plane at N leases.
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        kind: Option<BenchKind>,
        #[command(flatten)]
        net: NetBenchArgs,
    },
    /// The path a packet to DST takes through this node, as its kernel routes
    /// it now: the route, and on flannel.1 the neighbour, the FDB entry and
    /// the VTEP it is encapsulated to; on cni0 the bridge port; on flannel0
    /// flanneld's udp peer. Ends where the packet leaves the node, is
    /// delivered, or is dropped (exit 1). No root needed.
    Explain {
        /// The destination address.
        dst: std::net::IpAddr,
        /// flanneld's `--local-store`, to name the udp backend's peer (its
        /// peers are the leases' PublicIPs); without it the leases are read
        /// from etcd (flanneld's flags and FLANNELD_* variables), and only
        /// when the packet goes to flanneld's udp datapath.
        #[arg(long, env = "FLANNELD_LOCAL_STORE", value_name = "DIR")]
        local_store: Option<PathBuf>,
        #[command(flatten)]
        etcd: EtcdFlags,
    },
    /// Install the CNI plugin and its conflist on this node, each atomically
    /// (temporary file beside the destination, fsync, rename): the plugin as
    /// `<plugin-dir>/flannel` (mode 0755), then the conflist (mode 0644),
    /// after checking it with the plugin's own parser (a conflist the plugin
    /// refuses installs nothing). The defaults are kube-flannel.yml's paths.
    InstallCni {
        /// The plugin binary (in the image: /flannel).
        #[arg(long, value_name = "FILE", default_value = wire::IMAGE_CNI_PLUGIN)]
        plugin_src: PathBuf,
        /// The node's CNI plugin directory.
        #[arg(long, value_name = "DIR", default_value = wire::CNI_BIN_DIR)]
        plugin_dir: PathBuf,
        /// The conflist to install (the ConfigMap's cni-conf.json).
        #[arg(long, value_name = "FILE", default_value = wire::MANIFEST_CNI_CONF)]
        conf_src: PathBuf,
        /// Where the container runtime reads it.
        #[arg(long, value_name = "FILE", default_value = wire::CNI_CONFLIST)]
        conf_dest: PathBuf,
    },
    /// The leases of a store: subnet, public IP, backend, VtepMAC, expiry,
    /// and whether flanneld programs each (STATUS: `ok`, `expired` or
    /// `skipped: <why>`, as a node holding none of them decides).
    ///
    /// Reads the store flanneld would use with the same flags (and the same
    /// FLANNELD_* variables): the Nodes with `--kube-subnet-mgr` (the
    /// address families from --net-config-path when it exists, else IPv4),
    /// `--local-store DIR`, else etcd.
    Leases {
        /// The directory flanneld uses as `--local-store`.
        #[arg(long, env = "FLANNELD_LOCAL_STORE", value_name = "DIR")]
        local_store: Option<PathBuf>,
        #[command(flatten)]
        etcd: EtcdFlags,
        #[command(flatten)]
        kube: flanneld::flags::KubeFlags,
        /// flanneld's `--net-config-path`: the net-conf.json it reads in
        /// Kubernetes mode and with `--local-store`, which decides the STATUS
        /// column (which leases flanneld programs); with etcd the config is
        /// read from etcd.
        #[arg(long, env = "FLANNELD_NET_CONFIG_PATH", default_value = wire::DEFAULT_NET_CONFIG_PATH)]
        net_config_path: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct NetBenchArgs {
    /// Name of the lab the bench builds (and removes).
    #[arg(long, default_value = "bench")]
    name: String,
    /// Directory holding flanneld and flannel (default: next to flannelctl).
    #[arg(long, env = lab::BIN_DIR_ENV, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = lab::bench::DEFAULT_SECONDS)]
    seconds: u64,
    /// Rounds of throughput measurements per lab (medians are printed;
    /// ratios are the median of the per-round ratios to the underlay, and
    /// a target is judged on that median's confidence interval: more
    /// rounds narrow it).
    #[arg(long, default_value_t = lab::bench::DEFAULT_REPEAT)]
    repeat: u32,
    /// Only these backends (repeatable, or comma-separated): `vxlan`,
    /// `host-gw`, `udp`, `wireguard` (default: all four, which the
    /// targets need; udp and wireguard are judged against vxlan).
    #[arg(long = "backend", value_name = "BACKEND", value_delimiter = ',')]
    backends: Vec<lab::Backend>,
}

#[derive(Subcommand)]
enum BenchKind {
    /// The control plane at scale: one vxlan node with N peer leases, on the
    /// local store and on etcd, in namespaces of its own: cold start until
    /// every route, neighbour and FDB entry is in the kernel, one-lease
    /// event latency (p50/p99 of adds and removals), repair of deleted
    /// routes, RSS. Upstream flanneld (Debian package `flannel`) is measured
    /// the same way on etcd when installed, with the ratios ours/upstream.
    /// Exits 1 when our flanneld does not converge.
    Scale {
        /// Numbers of peer leases (comma-separated or repeated).
        #[arg(long = "n", value_delimiter = ',', default_values_t = lab::scale::DEFAULT_SIZES)]
        sizes: Vec<usize>,
        /// Stores (repeatable): `local`, `etcd` (default: both).
        #[arg(long = "store", value_name = "STORE")]
        stores: Vec<lab::scale::ScaleStore>,
        /// Single-lease adds (and as many removals) per run.
        #[arg(long, default_value_t = lab::scale::DEFAULT_EVENTS)]
        events: usize,
        /// Routes deleted for the repair measurement.
        #[arg(long, default_value_t = lab::scale::DEFAULT_REPAIR)]
        repair: usize,
        /// Directory holding our flanneld (default: next to flannelctl).
        #[arg(long, env = lab::BIN_DIR_ENV, value_name = "DIR")]
        bin_dir: Option<PathBuf>,
        /// Upstream's flanneld (default: from Debian's `flannel` package;
        /// also $FLANNEL_BENCH_UPSTREAM).
        #[arg(long, value_name = "PATH")]
        upstream: Option<PathBuf>,
    },
}

fn print_leases(rows: &[leases::LeaseRow], json: bool) {
    if json {
        println!("{}", leases::render_json(rows));
    } else {
        print!("{}", leases::render_table(rows, SystemTime::now()));
    }
}

#[derive(Args)]
struct NameArg {
    /// Lab name (prefixes every namespace: NAME-master, NAME-k8s-node1, ...).
    #[arg(long, env = "FLANNEL_LAB_NAME", default_value = lab::DEFAULT_NAME)]
    name: String,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build the lab, start flanneld on every node, attach the pods, check connectivity.
    Up {
        #[command(flatten)]
        name: NameArg,
        /// Number of workers k8s-node1..k8s-nodeN (besides the master).
        #[arg(long, default_value_t = lab::DEFAULT_NODES)]
        nodes: u32,
        /// Underlay MTU; pods get MTU - 50.
        #[arg(long, default_value_t = lab::DEFAULT_MTU)]
        mtu: u32,
        /// Directory holding flanneld and flannel (default: next to flannelctl).
        #[arg(long, env = lab::BIN_DIR_ENV, value_name = "DIR")]
        bin_dir: Option<PathBuf>,
        /// Leave what was built in place when `up` fails.
        #[arg(long)]
        keep_on_failure: bool,
        /// Do not run the connectivity check after `up`.
        #[arg(long)]
        no_check: bool,
        /// The store the daemons share: `local` (a directory in the labdir),
        /// `etcd` (a real etcd server in the master's namespace) or `kube`
        /// (etcd and a kube-apiserver there, one Node per node with its
        /// podCIDR, every flanneld with --kube-subnet-mgr).
        #[arg(long, default_value_t = lab::StoreKind::Local)]
        store: lab::StoreKind,
        /// With --store kube: the kube-apiserver binary to run (default:
        /// $KUBE_APISERVER, else kube-apiserver in PATH). It is given
        /// kube-apiserver's own flags.
        #[arg(long, value_name = "PATH")]
        kube_apiserver: Option<PathBuf>,
        /// flanneld's --lease-ttl in seconds (default: flanneld's, 24 h).
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
        lease_ttl: Option<u64>,
        /// No reservations: nodes hold ordinary leases that expire when not
        /// renewed (their subnets stay deterministic through a seeded subnet.env).
        #[arg(long)]
        no_reservations: bool,
        /// The flannel backend: `vxlan`, `host-gw`, `udp` or `wireguard`.
        #[arg(long, default_value_t = lab::Backend::Vxlan)]
        backend: lab::Backend,
        /// vxlan `DirectRouting`: plain routes to peers on the node's own segment.
        #[arg(long)]
        direct_routing: bool,
        /// IPv6 only: `EnableIPv4: false`, IPv6 pods and underlay (fd00:10:244::/56).
        #[arg(long, conflicts_with = "dual_stack")]
        ipv6: bool,
        /// Dual stack: IPv4 and IPv6 pods and underlay.
        #[arg(long)]
        dual_stack: bool,
        /// Run flanneld with --ip-masq (the default, as kube-flannel.yml does)
        /// and add the `outside` host (203.0.113.1) behind the gateway, which
        /// `lab check` probes for masquerading.
        #[arg(long, overrides_with = "no_ip_masq")]
        ip_masq: bool,
        /// Run flanneld without --ip-masq (no outside host, no masquerade probes).
        #[arg(long)]
        no_ip_masq: bool,
        /// `flat` (one switch) or `two-segment` (two switches joined by a router).
        #[arg(long, default_value_t = lab::Topology::Flat)]
        topology: lab::Topology,
    },
    /// Restart every flanneld of the running lab with another backend.
    SwitchBackend {
        #[command(flatten)]
        name: NameArg,
        /// The new backend: `vxlan`, `host-gw`, `udp` or `wireguard`.
        backend: lab::Backend,
        /// vxlan `DirectRouting`.
        #[arg(long)]
        direct_routing: bool,
        /// How long to wait for the daemons (seconds).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Stop or start the lab's store server: etcd (`--store etcd`) or the
    /// kube-apiserver (`--store kube`; etcd behind it keeps running): an
    /// outage and its end. `stop` keeps the data; `start` resumes on the
    /// same data and addresses.
    Store {
        #[command(flatten)]
        name: NameArg,
        /// `stop` or `start`.
        #[arg(value_parser = ["stop", "start"])]
        action: String,
    },
    /// Add a worker (the next k8s-nodeI, with its pod ubuntu-I) to the running lab.
    AddNode {
        #[command(flatten)]
        name: NameArg,
        /// How long to wait for its lease and pod (seconds).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Remove a worker (k8s-nodeI) and its pods from the running lab: its
    /// flanneld stopped, CNI DEL for its pods, its lease (or Node) deleted,
    /// its namespaces removed; waits until no node routes its subnet.
    RemoveNode {
        #[command(flatten)]
        name: NameArg,
        /// The worker to remove (`k8s-node<i>`; never the master).
        node: String,
        /// How long to wait for the peers to drop its routes (seconds).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// A chaos soak of the running lab: a seeded random series of faults
    /// (printed first) while every pod pings every other pod each 100 ms:
    /// kill -9 and restart of a flanneld, a rolling restart, deletion of
    /// flannel.1 / one route / one neighbour / one FDB entry / every FDB
    /// entry / cni0's route on a node, a store outage (etcd stopped, or the
    /// local store read-only), a node added and one removed, a backend
    /// switch vxlan <-> host-gw (flat topology). Per fault: pings lost,
    /// time until every node's kernel holds the expected routes,
    /// neighbours and FDB entries again, verdict. Exits 1 when a fault is
    /// not repaired within its bound or loses pings where none may be lost
    /// (restarts, store outage, one entry's drift, a new node), or more
    /// than its bound. IPv4 labs with vxlan (no DirectRouting) or host-gw
    /// on --store local or etcd; the lab is left running, changed by the faults.
    Chaos {
        #[command(flatten)]
        name: NameArg,
        /// Planned length of the run in minutes (the plan's faults fill it).
        #[arg(long, default_value_t = 5.0)]
        minutes: f64,
        /// Seed of the fault series (default: from the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// The leases of the lab's store (whichever it is).
    Leases {
        #[command(flatten)]
        name: NameArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ping every node and pod from every pod again and print the matrix.
    Check {
        #[command(flatten)]
        name: NameArg,
    },
    /// The path of one packet from FROM to TO, namespace by namespace, as the
    /// kernels route it now: routes, neighbours, FDB entries, encapsulation,
    /// bridge ports (packet-walk.txt, read off the lab). Exits 1 when the
    /// packet would be dropped, saying where and why.
    Explain {
        #[command(flatten)]
        name: NameArg,
        /// Where the packet starts: a pod, a node, `router`, `outside`.
        from: String,
        /// Where it goes: an address, a pod (its first address, IPv4 first),
        /// a node (its underlay address) or `outside`.
        to: String,
    },
    /// Nodes, daemons, leases and pods.
    Status {
        #[command(flatten)]
        name: NameArg,
    },
    /// Run a command inside a node's, pod's or the underlay's namespace.
    Exec {
        #[command(flatten)]
        name: NameArg,
        /// `master`, `k8s-node<i>`, `ubuntu-<i>` or `underlay`.
        target: String,
        /// The command, after `--`.
        #[arg(last = true, required = true)]
        cmd: Vec<OsString>,
    },
    /// Stop the daemons, detach the pods, remove every namespace and file of the lab.
    Down {
        #[command(flatten)]
        name: NameArg,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flannelctl: {}", render_error(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text
/// the message already holds: the library errors embed their source in
/// their own message, so anyhow's `{:#}` would print it twice.
fn render_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn print_check(lab: &Lab) -> anyhow::Result<ExitCode> {
    let m = lab.check()?;
    print!("{}", m.render());
    let mut ok = m.all_ok();
    if !ok {
        eprintln!("flannelctl: {}", m.ensure_all_ok().unwrap_err());
    }
    if lab.state.ip_masq {
        let r = lab.check_masq()?;
        print!("{}", r.render());
        ok &= r.all_ok();
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Bench {
            kind:
                Some(BenchKind::Scale {
                    sizes,
                    stores,
                    events,
                    repair,
                    bin_dir,
                    upstream,
                }),
            ..
        } => {
            use lab::scale::{self, ScaleStore};
            let opts = scale::ScaleOptions {
                sizes,
                stores: if stores.is_empty() {
                    vec![ScaleStore::Local, ScaleStore::Etcd]
                } else {
                    stores
                },
                events,
                repair,
                bin_dir: lab::resolve_bin_dir(bin_dir.as_deref())?,
                upstream: scale::find_upstream(upstream.as_deref()),
                progress: true,
            };
            // Ctrl-C ends the bench at its next step and removes what it built.
            let report = {
                let _interrupts = lab::InterruptGuard::install()?;
                scale::run(&opts)?
            };
            print!("{}", report.render());
            Ok(if report.ours_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Bench {
            kind: None,
            net:
                NetBenchArgs {
                    name,
                    bin_dir,
                    seconds,
                    repeat,
                    backends,
                },
        } => {
            let backends = if backends.is_empty() {
                lab::bench::ALL_BACKENDS.to_vec()
            } else {
                backends
            };
            // Ctrl-C (or SIGTERM/SIGHUP) ends the bench at its next step and
            // removes its lab.
            let report = {
                let _interrupts = lab::InterruptGuard::install()?;
                lab::bench::run(&name, bin_dir.as_deref(), &backends, seconds, repeat, true)?
            };
            print!("{}", report.render());
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain {
            dst,
            local_store,
            etcd,
        } => {
            use flannelctl::explain::Leases;
            let leases = match local_store {
                Some(dir) => Leases::Known(leases::read_local(&dir)?),
                None => {
                    let opts = etcd.options();
                    Leases::OnDemand(Box::new(move || {
                        leases::read_etcd(opts).map_err(|e| e.to_string())
                    }))
                }
            };
            let here = "this node";
            let mut view = flannelctl::explain::KernelView::open_here(here, leases)?;
            let walk = flannelctl::explain::walk(&mut view, here, dst);
            print!("{}", walk.render(&dst.to_string()));
            Ok(if walk.dropped() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::InstallCni {
            plugin_src,
            plugin_dir,
            conf_src,
            conf_dest,
        } => {
            let done = install::install_cni(&install::CniInstall {
                plugin_src,
                plugin_dir,
                conf_src,
                conf_dest,
            })?;
            println!(
                "installed {} (mode {:o})",
                done.plugin.display(),
                install::PLUGIN_MODE
            );
            println!(
                "installed {} (mode {:o}): network {}, cniVersion {}, plugins {}",
                done.conflist.display(),
                install::CONFLIST_MODE,
                done.parsed.name,
                done.parsed.cni_version,
                done.parsed.plugin_types.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Leases {
            local_store,
            etcd,
            kube,
            net_config_path,
            json,
        } => {
            let (all, cfg) = match local_store {
                _ if kube.kube_subnet_mgr => {
                    let found = leases::read_kube(&kube, &net_config_path)?;
                    for (node, why) in &found.skipped {
                        eprintln!("flannelctl: skipped Node {node}: {why}");
                    }
                    (found.leases, leases::net_conf_file(&net_config_path))
                }
                Some(dir) => (
                    leases::read_local(&dir)?,
                    leases::net_conf_file(&net_config_path),
                ),
                None => leases::list_etcd(etcd.options())?,
            };
            if let Err(why) = &cfg {
                eprintln!("flannelctl: no STATUS column: {why}");
            }
            print_leases(
                &leases::rows(&all, cfg.as_ref().ok(), SystemTime::now()),
                json,
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Lab(LabCommand::Store { name, action }) => {
            let lab = Lab::open(&name.name)?;
            let server = if lab.state.store == lab::StoreKind::Kube {
                "the API server"
            } else {
                "etcd"
            };
            if action == "stop" {
                let was = lab.stop_store()?;
                println!(
                    "{server} of lab {} {}",
                    lab.name(),
                    if was { "stopped" } else { "was not running" }
                );
            } else {
                let pid = lab.start_store()?;
                println!(
                    "{server} of lab {} started: pid {pid}, {}",
                    lab.name(),
                    lab.store_description()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Lab(LabCommand::AddNode { name, timeout }) => {
            let mut lab = Lab::open(&name.name)?;
            let node = lab.add_node(std::time::Duration::from_secs(timeout))?;
            let n = lab.node(&node)?;
            println!(
                "{node} {} {} joined lab {}",
                n.underlay_ip,
                n.subnet,
                lab.name()
            );
            for p in lab.state.pods.iter().filter(|p| p.node == node) {
                if let Some(ip) = p.ip {
                    println!("pod {} on {}: {}", p.name, p.node, ip);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Lab(LabCommand::RemoveNode {
            name,
            node,
            timeout,
        }) => {
            let mut lab = Lab::open(&name.name)?;
            lab.remove_node(&node, std::time::Duration::from_secs(timeout))?;
            println!("{node} left lab {}", lab.name());
            Ok(ExitCode::SUCCESS)
        }
        Command::Lab(LabCommand::Chaos {
            name,
            minutes,
            seed,
        }) => {
            let mut lab = Lab::open(&name.name)?;
            // Ctrl-C ends the run after the fault under way.
            let report = {
                let _interrupts = lab::InterruptGuard::install()?;
                lab.chaos(&lab::ChaosOptions { minutes, seed }, &mut |line| {
                    use std::io::Write;
                    print!("{line}");
                    let _ = std::io::stdout().flush();
                })?
            };
            print!("{}", report.summary());
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Lab(LabCommand::Leases { name, json }) => {
            let lab = Lab::open(&name.name)?;
            let all = lab.leases()?;
            let cfg = lab.state.net_config();
            print_leases(&leases::rows(&all, Some(&cfg), SystemTime::now()), json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Lab(LabCommand::Up {
            name,
            nodes,
            mtu,
            bin_dir,
            keep_on_failure,
            no_check,
            store,
            kube_apiserver,
            lease_ttl,
            no_reservations,
            backend,
            direct_routing,
            ipv6,
            dual_stack,
            ip_masq,
            no_ip_masq,
            topology,
        }) => {
            let ip_masq = ip_masq || !no_ip_masq;
            let opts = LabOptions {
                name: name.name,
                nodes,
                mtu,
                bin_dir,
                keep_on_failure,
                progress: true,
                store,
                kube_apiserver,
                lease_ttl,
                reservations: !no_reservations,
                backend,
                direct_routing,
                family: if ipv6 {
                    lab::Family::V6
                } else if dual_stack {
                    lab::Family::Dual
                } else {
                    lab::Family::V4
                },
                ip_masq,
                topology,
                ..LabOptions::default()
            };
            // Ctrl-C while the lab is being built removes what was built;
            // once it is up, Ctrl-C is Ctrl-C again.
            let lab = {
                let _interrupts = lab::InterruptGuard::install()?;
                Lab::up(&opts).context("lab up")?
            };
            println!(
                "lab {} is up: {} in {}",
                lab.name(),
                lab.state
                    .nodes
                    .iter()
                    .map(|n| format!("{} {} {}", n.name, n.underlay_ip, n.subnet))
                    .collect::<Vec<_>>()
                    .join(", "),
                lab.dir().display()
            );
            println!("store: {}", lab.store_description());
            let st = &lab.state;
            println!(
                "backend: {}{}, topology: {}, family: {}, ip-masq: {}",
                st.backend,
                if st.direct_routing {
                    " (DirectRouting)"
                } else {
                    ""
                },
                st.topology,
                st.family,
                if st.ip_masq { "on" } else { "off" }
            );
            for p in &lab.state.pods {
                if let Some(ip) = p.ip {
                    println!("pod {} on {}: {}", p.name, p.node, ip);
                }
                if let Some(ip) = p.ipv6 {
                    println!("pod {} on {}: {}", p.name, p.node, ip);
                }
            }
            if no_check {
                return Ok(ExitCode::SUCCESS);
            }
            print_check(&lab)
        }
        Command::Lab(LabCommand::SwitchBackend {
            name,
            backend,
            direct_routing,
            timeout,
        }) => {
            let mut lab = Lab::open(&name.name)?;
            lab.switch_backend(
                backend,
                direct_routing,
                std::time::Duration::from_secs(timeout),
            )?;
            println!("lab {} now runs {backend}", lab.name());
            print_check(&lab)
        }
        Command::Lab(LabCommand::Check { name }) => print_check(&Lab::open(&name.name)?),
        Command::Lab(LabCommand::Explain { name, from, to }) => {
            let lab = Lab::open(&name.name)?;
            let dst = lab.explain_target(&to)?;
            let walk = lab.explain(&from, dst)?;
            let label = if to == dst.to_string() {
                to
            } else {
                format!("{to} ({dst})")
            };
            print!("{}", walk.render(&label));
            Ok(if walk.delivered() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Lab(LabCommand::Status { name }) => {
            let status = Lab::open(&name.name)?.status();
            print!("{}", status.render());
            Ok(if status.healthy() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Lab(LabCommand::Exec { name, target, cmd }) => {
            let code = lab::exec(&name.name, &target, &cmd)?;
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
        Command::Lab(LabCommand::Down { name }) => {
            lab::down(&name.name)?;
            println!("lab {} is down", name.name);
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::render_error;

    #[derive(Debug, thiserror::Error)]
    #[error("reading leases from etcd at http://h:2379: {0}")]
    struct Embeds(#[source] std::io::Error);

    #[test]
    fn a_cause_embedded_in_the_message_is_printed_once() {
        let io = std::io::Error::other("connection refused");
        let e = anyhow::Error::new(Embeds(io)).context("flannelctl leases");
        assert_eq!(
            render_error(&e),
            "flannelctl leases: reading leases from etcd at http://h:2379: connection refused"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(render_error(&plain), "outer: inner");
    }
}
