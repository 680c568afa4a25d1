//! Command-line flags, with upstream flanneld's names. Every flag can also be
//! set from the environment as `FLANNELD_<FLAG_IN_CAPITALS_WITH_UNDERSCORES>`
//! (e.g. `FLANNELD_IFACE`, `FLANNELD_IP_MASQ`), as upstream allows.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser};
use flannel_core::wire;
use flannel_store::etcd::EtcdOptions;
use flannel_store::kube::{KubeStoreError, NodeIdentity};

/// flannel-rs node daemon: leases a pod subnet and programs the overlay
/// (vxlan, host-gw or udp backend, IPv4, IPv6 or both).
///
/// Every flag can also be set from the environment as FLANNELD_<FLAG> (e.g.
/// FLANNELD_IFACE=eth0,eth1). Boolean flags accept --flag, --flag=true and
/// --flag=false (Go's flag package semantics, which existing manifests rely on).
#[derive(Debug, Clone, Parser)]
#[command(name = "flanneld", version, after_help = KUBE_ENV_HELP)]
pub struct Flags {
    /// Path of the network configuration (net-conf.json), read with
    /// --local-store (DIR/config when this file is missing); with etcd the
    /// configuration is etcd's <etcd-prefix>/config instead.
    #[arg(long, env = "FLANNELD_NET_CONFIG_PATH", default_value = wire::DEFAULT_NET_CONFIG_PATH)]
    pub net_config_path: PathBuf,

    /// Where to write the subnet.env file the CNI plugin reads.
    #[arg(long, env = "FLANNELD_SUBNET_FILE", default_value = wire::DEFAULT_SUBNET_FILE)]
    pub subnet_file: PathBuf,

    /// Interface (name or IP address) to use for inter-host traffic; may be
    /// repeated: the first one that exists and has a global address of each
    /// enabled family wins.
    #[arg(long = "iface", env = "FLANNELD_IFACE", value_delimiter = ',')]
    pub iface: Vec<String>,

    /// Regex matched against interface IP addresses, then names; may be
    /// repeated; tried after every --iface.
    #[arg(
        long = "iface-regex",
        env = "FLANNELD_IFACE_REGEX",
        value_delimiter = ','
    )]
    pub iface_regex: Vec<String>,

    /// Use the interface of the kernel's route to this address (`ip route get
    /// ADDR`), with the route's source address as the interface address of
    /// that family. Used only when neither --iface nor --iface-regex is given.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<IpAddr>,

    /// IPv4 address published in the lease (PublicIP), which the other nodes
    /// send to (default: the interface's IPv4 address). Ignored, with a
    /// warning, when the network config disables IPv4.
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,

    /// IPv6 address published in the lease (PublicIPv6), which the other
    /// nodes send to (default: the interface's first global IPv6 address).
    /// Ignored, with a warning, unless the network config sets EnableIPv6.
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6")]
    pub public_ipv6: Option<Ipv6Addr>,

    /// Masquerade traffic leaving the overlay (chain FLANNEL-POSTRTG, or the
    /// nftables postrtg chain; FLANNEL_IPMASQ=true in subnet.env). With this or
    /// --iptables-forward-rules, vxlan and udp also drop pods' datagrams to
    /// the encapsulation port (chain FLANNEL-ENCAP, or the nftables encap chain).
    #[arg(long, env = "FLANNELD_IP_MASQ", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub ip_masq: bool,

    /// Masquerade without --random-fully (iptables) / fully-random (nftables).
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub ip_masq_fully_random_disable: bool,

    /// Seconds between checks of the masquerade and forward rules (iptables or nftables).
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5)]
    pub iptables_resync: u64,

    /// Accept forwarded traffic from and to the network (chain FLANNEL-FWD, or the nftables forward chain).
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_value = "true", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub iptables_forward_rules: bool,

    /// Keep a blackhole route for the node's subnet(s), at the lowest priority (metric
    /// 4294967295) so that cni0's route to the subnet still wins; removed when off.
    #[arg(long, env = "FLANNELD_IP_BLACKHOLE_ROUTE", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub ip_blackhole_route: bool,

    /// Set the Node's NetworkUnavailable condition to False (reason FlannelIsUp)
    /// once the datapath is up (with --kube-subnet-mgr).
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_value = "true", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub set_node_network_unavailable: bool,

    /// Renew the lease this many minutes before it expires (1..1439).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN",
          default_value_t = wire::DEFAULT_RENEW_MARGIN_MINUTES,
          value_parser = clap::value_parser!(u64).range(1..=1439))]
    pub subnet_lease_renew_margin: u64,

    /// etcd connection flags (`--etcd-*`), shared with `flannelctl leases`.
    #[command(flatten)]
    pub etcd: EtcdFlags,

    /// Kubernetes API flags (`--kube-*`), shared with `flannelctl leases`.
    #[command(flatten)]
    pub kube: KubeFlags,

    /// Address of the health endpoint (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,
    /// Port of the health endpoint; 0 disables it.
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,

    /// flannel-rs: keep leases in this local directory instead of etcd (all
    /// flanneld processes of one machine may share it). The net-conf is read
    /// from --net-config-path, or from DIR/config when that file is missing.
    #[arg(long, env = "FLANNELD_LOCAL_STORE")]
    pub local_store: Option<PathBuf>,

    /// flannel-rs: log level or tracing filter (error, warn, info, debug, trace).
    /// RUST_LOG, when set, takes precedence.
    #[arg(long, env = "FLANNELD_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// flannel-rs test knob: lease lifetime in seconds (default 24 h).
    #[arg(long, env = "FLANNELD_LEASE_TTL", default_value_t = wire::LEASE_TTL_SECS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub lease_ttl: u64,

    /// flannel-rs: seconds between full reconciliation passes (besides event-driven ones).
    #[arg(long, env = "FLANNELD_RESYNC_INTERVAL", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub resync_interval: u64,

    /// flannel-rs: where the udp backend writes its counters as JSON
    /// (forwarded, dropped spoofed/malformed/no route), refreshed every second.
    /// Default: udp-stats.json beside --subnet-file (/run/flannel/udp-stats.json).
    #[arg(long, env = "FLANNELD_UDP_STATS_FILE")]
    pub udp_stats_file: Option<PathBuf>,
}

/// flanneld's etcd flags, one definition for every binary that talks to
/// flanneld's etcd (`flanneld`, `flannelctl leases`): same names, defaults
/// and `FLANNELD_ETCD_*` variables.
#[derive(Debug, Clone, Args)]
pub struct EtcdFlags {
    /// Comma-separated etcd endpoints (the etcd v3 store is used unless
    /// --local-store or --kube-subnet-mgr is given).
    #[arg(long, env = "FLANNELD_ETCD_ENDPOINTS", default_value = wire::DEFAULT_ETCD_ENDPOINTS)]
    pub etcd_endpoints: String,
    /// etcd key prefix.
    #[arg(long, env = "FLANNELD_ETCD_PREFIX", default_value = wire::DEFAULT_ETCD_PREFIX)]
    pub etcd_prefix: String,
    /// TLS key file for etcd.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,
    /// TLS certificate file for etcd.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,
    /// TLS CA file for etcd.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,
    /// etcd user name.
    #[arg(long, env = "FLANNELD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,
    /// etcd password.
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
}

/// flanneld's Kubernetes flags, one definition for every binary that reads
/// flanneld's store (`flanneld`, `flannelctl leases`).
#[derive(Debug, Clone, Args)]
pub struct KubeFlags {
    /// Use the Kubernetes API as the subnet store: the subnet is the Node's
    /// spec.podCIDR(s), the rest of the lease is published as Node annotations.
    /// The Node is NODE_NAME, else the one POD_NAME in POD_NAMESPACE runs on.
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub kube_subnet_mgr: bool,
    /// Kubernetes API server URL (with --kube-subnet-mgr); overrides the
    /// kubeconfig's server. Without this and --kubeconfig-file: the in-cluster
    /// service account config.
    #[arg(long, env = "FLANNELD_KUBE_API_URL")]
    pub kube_api_url: Option<String>,
    /// Prefix of flannel's Node annotations (with --kube-subnet-mgr): a DNS name,
    /// optionally followed by "/" and a name; "/" or "-" is appended as upstream.
    #[arg(long, env = "FLANNELD_KUBE_ANNOTATION_PREFIX", default_value = wire::DEFAULT_KUBE_ANNOTATION_PREFIX)]
    pub kube_annotation_prefix: String,
    /// kubeconfig file for the Kubernetes API (with --kube-subnet-mgr).
    #[arg(long, env = "FLANNELD_KUBECONFIG_FILE")]
    pub kubeconfig_file: Option<PathBuf>,
}

impl EtcdFlags {
    /// The store options these flags select; `--etcd-endpoints` is split at
    /// commas, blanks around and between commas ignored.
    pub fn options(&self) -> EtcdOptions {
        EtcdOptions {
            endpoints: self
                .etcd_endpoints
                .split(',')
                .map(|e| e.trim().to_string())
                .filter(|e| !e.is_empty())
                .collect(),
            prefix: self.etcd_prefix.clone(),
            ca_file: self.etcd_cafile.clone(),
            cert_file: self.etcd_certfile.clone(),
            key_file: self.etcd_keyfile.clone(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone(),
            ..EtcdOptions::default()
        }
    }
}

impl Flags {
    /// The etcd store options `--etcd-*` select (see [`EtcdFlags::options`]).
    pub fn etcd_options(&self) -> EtcdOptions {
        self.etcd.options()
    }
    /// `--subnet-lease-renew-margin` as a duration.
    pub fn renew_margin(&self) -> Duration {
        Duration::from_secs(self.subnet_lease_renew_margin * 60)
    }
    /// `--lease-ttl` as a duration.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl)
    }
    /// `--udp-stats-file`, else `udp-stats.json` beside `--subnet-file`, so
    /// daemons of one machine with their own subnet files (the lab) keep
    /// their counters apart.
    pub fn udp_stats_file(&self) -> PathBuf {
        self.udp_stats_file.clone().unwrap_or_else(|| {
            self.subnet_file
                .with_file_name(crate::backend::udp::STATS_FILE_NAME)
        })
    }

    /// `--resync-interval` as a duration.
    pub fn resync_interval(&self) -> Duration {
        Duration::from_secs(self.resync_interval)
    }
}

/// `flanneld --help`'s closing text: the variables Kubernetes mode reads
/// besides FLANNELD_* (see [`KubeEnv`]; a unit test keeps it in line with
/// [`wire::KUBE_ENV_VARS`]).
const KUBE_ENV_HELP: &str = "\
Kubernetes mode (--kube-subnet-mgr) also reads (kube-flannel.yml sets all but NODE_NAME):
  NODE_NAME                  this node's name; when unset, the node of the pod POD_NAMESPACE/POD_NAME
  POD_NAME, POD_NAMESPACE    flanneld's own pod (fieldRef metadata.name / metadata.namespace)
  EVENT_QUEUE_DEPTH          a positive integer (default 5000); checked, no effect in flannel-rs
  CONT_WHEN_CACHE_NOT_READY  true or false (default false); checked, no effect in flannel-rs";

/// A Kubernetes-mode environment variable with a value flanneld refuses.
#[derive(Debug, thiserror::Error)]
#[error("environment variable {var}={value:?}: {msg}")]
pub struct FlagsError {
    pub var: &'static str,
    pub value: String,
    pub msg: &'static str,
}

/// The environment variables Kubernetes mode reads besides `FLANNELD_*`
/// ([`wire::KUBE_ENV_VARS`]), as [`kube_env`] reads and validates them. An
/// empty variable counts as unset, as in upstream (Go's `os.Getenv`).
///
/// - `NODE_NAME`, `POD_NAME`, `POD_NAMESPACE`: which Node is this node's,
///   by upstream's rule ([`KubeEnv::node`]): `NODE_NAME` when set, else the
///   node the pod `POD_NAMESPACE`/`POD_NAME` runs on (kube-flannel.yml sets
///   these two from the pod's metadata).
/// - `EVENT_QUEUE_DEPTH` (default 5000): upstream sizes the channel between
///   its Node informer and its lease watcher with it. flannel-rs's Kubernetes
///   store hands Node changes to the daemon through a channel of fixed size
///   that applies backpressure (the watcher waits, nothing is dropped), and
///   each reconciliation pass works from the whole lease cache, so the value
///   is validated (a positive integer) and otherwise has no effect. Upstream
///   takes 0 or a negative number as its default; flannel-rs refuses them.
/// - `CONT_WHEN_CACHE_NOT_READY` (default false): with "true", upstream goes
///   on starting when its Node cache has not synced before a timeout,
///   instead of exiting. flannel-rs has no such timeout: the store waits for
///   its first full list of Nodes (retrying while the API server is away),
///   so both values behave the same. The value is validated ("true" or
///   "false"; upstream takes anything but "true" as false) and logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeEnv {
    pub node_name: Option<String>,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub event_queue_depth: u32,
    pub cont_when_cache_not_ready: bool,
}

impl KubeEnv {
    /// Reads the variables through `get` (a name to its value, `None` when
    /// unset); [`kube_env`] passes the process environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<KubeEnv, FlagsError> {
        let read = |var: &str| get(var).filter(|v| !v.is_empty());
        let event_queue_depth = match read(wire::ENV_EVENT_QUEUE_DEPTH) {
            None => wire::DEFAULT_EVENT_QUEUE_DEPTH,
            Some(v) => match v.parse::<u32>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(FlagsError {
                        var: wire::ENV_EVENT_QUEUE_DEPTH,
                        value: v,
                        msg: "expected a positive integer such as 5000 (kube-flannel.yml's value), or leave it unset",
                    })
                }
            },
        };
        let cont_when_cache_not_ready = match read(wire::ENV_CONT_WHEN_CACHE_NOT_READY) {
            None => false,
            Some(v) if v == "false" => false,
            Some(v) if v == "true" => true,
            Some(v) => {
                return Err(FlagsError {
                    var: wire::ENV_CONT_WHEN_CACHE_NOT_READY,
                    value: v,
                    msg: "expected \"true\" or \"false\"",
                })
            }
        };
        Ok(KubeEnv {
            node_name: read(wire::ENV_NODE_NAME),
            pod_name: read(wire::ENV_POD_NAME),
            pod_namespace: read(wire::ENV_POD_NAMESPACE),
            event_queue_depth,
            cont_when_cache_not_ready,
        })
    }

    /// This node's Node: `NODE_NAME`, else the pod `POD_NAMESPACE`/`POD_NAME`
    /// (an error when neither is complete).
    pub fn node(&self) -> Result<NodeIdentity, KubeStoreError> {
        NodeIdentity::from_env(
            self.node_name.as_deref(),
            self.pod_name.as_deref(),
            self.pod_namespace.as_deref(),
        )
    }

    /// One INFO line: the two upstream knobs and that they change nothing here.
    pub fn log_summary(&self) {
        tracing::info!(
            event_queue_depth = self.event_queue_depth,
            cont_when_cache_not_ready = self.cont_when_cache_not_ready,
            "EVENT_QUEUE_DEPTH and CONT_WHEN_CACHE_NOT_READY are checked but have no effect in flannel-rs: Node events are never dropped, and startup waits for the first full list of Nodes"
        );
    }
}

/// The Kubernetes-mode environment of this process ([`KubeEnv`]).
pub fn kube_env() -> Result<KubeEnv, FlagsError> {
    KubeEnv::from_lookup(|var| std::env::var(var).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serialises tests that parse flags: the environment is process-global
    /// and one test sets FLANNELD_* variables.
    static ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn parse_unlocked(args: &[&str]) -> Result<Flags, clap::Error> {
        let mut v = vec!["flanneld"];
        v.extend_from_slice(args);
        Flags::try_parse_from(v)
    }

    fn parse(args: &[&str]) -> Result<Flags, clap::Error> {
        let _g = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        parse_unlocked(args)
    }

    #[test]
    fn defaults_match_upstream() {
        let f = parse(&[]).unwrap();
        assert_eq!(
            f.net_config_path,
            PathBuf::from("/etc/kube-flannel/net-conf.json")
        );
        assert_eq!(f.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(
            f.udp_stats_file(),
            PathBuf::from("/run/flannel/udp-stats.json")
        );
        let g = parse(&["--subnet-file", "/tmp/n1/subnet.env"]).unwrap();
        assert_eq!(g.udp_stats_file(), PathBuf::from("/tmp/n1/udp-stats.json"));
        let h = parse(&["--udp-stats-file", "/x/s.json"]).unwrap();
        assert_eq!(h.udp_stats_file(), PathBuf::from("/x/s.json"));
        assert_eq!(f.subnet_lease_renew_margin, 60);
        assert_eq!(f.etcd.etcd_prefix, "/coreos.com/network");
        assert_eq!(
            f.etcd.etcd_endpoints,
            "http://127.0.0.1:4001,http://127.0.0.1:2379"
        );
        assert!(!f.ip_masq);
        assert!(!f.kube.kube_subnet_mgr);
        assert_eq!(f.healthz_port, 0);
        assert_eq!(f.lease_ttl(), Duration::from_secs(86400));
        assert!(f.iface.is_empty());
        assert_eq!(f.log_level, "info");
        assert_eq!(f.iptables_resync, 5);
        assert!(f.iptables_forward_rules);
        assert!(f.set_node_network_unavailable);
        assert!(!f.ip_blackhole_route && !f.ip_masq_fully_random_disable);
    }

    #[test]
    fn upstream_manifest_flags_are_accepted() {
        let f = parse(&[
            "--ip-masq",
            "--kube-subnet-mgr",
            "--iptables-forward-rules=false",
            "--ip-blackhole-route",
            "--iptables-resync",
            "9",
            "--kube-annotation-prefix",
            "example.com",
            "--healthz-port",
            "10244",
        ])
        .unwrap();
        assert!(f.ip_masq && f.kube.kube_subnet_mgr && f.ip_blackhole_route);
        assert!(!f.iptables_forward_rules);
        assert_eq!(f.iptables_resync, 9);
        assert_eq!(f.healthz_port, 10244);
    }

    #[test]
    fn repeated_iface_and_regex_keep_order() {
        let f = parse(&[
            "--iface",
            "eth1",
            "--iface=10.0.0.2",
            "--iface-regex",
            "^en",
            "--iface-regex",
            "^eth",
        ])
        .unwrap();
        assert_eq!(f.iface, vec!["eth1", "10.0.0.2"]);
        assert_eq!(f.iface_regex, vec!["^en", "^eth"]);
    }

    #[test]
    fn bool_flags_accept_go_forms() {
        assert!(parse(&["--ip-masq"]).unwrap().ip_masq);
        assert!(parse(&["--ip-masq=true"]).unwrap().ip_masq);
        assert!(!parse(&["--ip-masq=false"]).unwrap().ip_masq);
        assert!(parse(&["--kube-subnet-mgr"]).unwrap().kube.kube_subnet_mgr);
        // `--ip-masq eth0` must not swallow the next word as the flag's value.
        assert!(parse(&["--ip-masq", "--iface", "eth0"]).unwrap().ip_masq);
    }

    #[test]
    fn renew_margin_range_is_enforced() {
        assert!(parse(&["--subnet-lease-renew-margin", "0"]).is_err());
        assert!(parse(&["--subnet-lease-renew-margin", "1440"]).is_err());
        let f = parse(&["--subnet-lease-renew-margin", "1439"]).unwrap();
        assert_eq!(f.renew_margin(), Duration::from_secs(1439 * 60));
    }

    #[test]
    fn bad_public_ip_names_the_flag() {
        let e = parse(&["--public-ip", "10.0.0"]).unwrap_err().to_string();
        assert!(e.contains("--public-ip"), "{e}");
    }

    #[test]
    fn every_flag_reads_its_env_variable() {
        let vars = [
            ("FLANNELD_IFACE", "eth9,10.1.2.3"),
            ("FLANNELD_IP_MASQ", "true"),
            ("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "5"),
            ("FLANNELD_SUBNET_FILE", "/tmp/x/subnet.env"),
            ("FLANNELD_PUBLIC_IP", "192.0.2.7"),
            ("FLANNELD_LOCAL_STORE", "/tmp/store"),
            ("FLANNELD_ETCD_PREFIX", "/p"),
            ("FLANNELD_LEASE_TTL", "30"),
        ];
        let (f, explicit) = {
            let _g = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            for (k, v) in vars {
                std::env::set_var(k, v);
            }
            let f = parse_unlocked(&[]);
            let explicit = parse_unlocked(&["--ip-masq=false", "--iface", "lo"]);
            for (k, _) in vars {
                std::env::remove_var(k);
            }
            (f, explicit)
        };
        let f = f.unwrap();
        assert_eq!(f.iface, vec!["eth9", "10.1.2.3"]);
        assert!(f.ip_masq);
        assert_eq!(f.subnet_lease_renew_margin, 5);
        assert_eq!(f.subnet_file, PathBuf::from("/tmp/x/subnet.env"));
        assert_eq!(f.public_ip, Some(Ipv4Addr::new(192, 0, 2, 7)));
        assert_eq!(f.local_store, Some(PathBuf::from("/tmp/store")));
        assert_eq!(f.etcd.etcd_prefix, "/p");
        assert_eq!(f.lease_ttl, 30);
        // A flag on the command line beats the environment.
        let explicit = explicit.unwrap();
        assert!(!explicit.ip_masq);
        assert_eq!(explicit.iface, vec!["lo"]);
    }

    #[test]
    fn etcd_flags_give_store_options() {
        let f = parse(&[
            "--etcd-endpoints",
            " http://10.0.0.1:2379 ,,https://h:2379",
            "--etcd-prefix=/x/network",
            "--etcd-cafile",
            "/ca.pem",
            "--etcd-username",
            "u",
        ])
        .unwrap();
        let o = f.etcd_options();
        assert_eq!(o.endpoints, vec!["http://10.0.0.1:2379", "https://h:2379"]);
        assert_eq!(o.prefix, "/x/network");
        assert_eq!(o.ca_file, Some(PathBuf::from("/ca.pem")));
        assert_eq!(o.username.as_deref(), Some("u"));
        assert_eq!(o.password, None);
        let d = parse(&[]).unwrap().etcd_options();
        assert_eq!(
            d.endpoints,
            vec!["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
        );
        assert_eq!(d.prefix, "/coreos.com/network");
    }

    fn env_of<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn kube_env_of_the_manifest() {
        let e = KubeEnv::from_lookup(env_of(&[
            ("POD_NAME", "kube-flannel-ds-x7k2p"),
            ("POD_NAMESPACE", "kube-flannel"),
            ("EVENT_QUEUE_DEPTH", "5000"),
            ("CONT_WHEN_CACHE_NOT_READY", "false"),
        ]))
        .unwrap();
        assert_eq!(e.event_queue_depth, 5000);
        assert!(!e.cont_when_cache_not_ready);
        assert_eq!(
            e.node().unwrap(),
            NodeIdentity::Pod {
                namespace: "kube-flannel".into(),
                name: "kube-flannel-ds-x7k2p".into()
            }
        );
        // NODE_NAME wins over the pod; the knobs' defaults; empty = unset.
        let e = KubeEnv::from_lookup(env_of(&[
            ("NODE_NAME", "k8s-node1"),
            ("POD_NAME", "p"),
            ("EVENT_QUEUE_DEPTH", ""),
            ("CONT_WHEN_CACHE_NOT_READY", "true"),
        ]))
        .unwrap();
        assert_eq!(e.node().unwrap(), NodeIdentity::Name("k8s-node1".into()));
        assert_eq!(e.event_queue_depth, 5000);
        assert!(e.cont_when_cache_not_ready);
        let e = KubeEnv::from_lookup(env_of(&[("EVENT_QUEUE_DEPTH", "7")])).unwrap();
        assert_eq!(e.event_queue_depth, 7);
        assert!(!e.cont_when_cache_not_ready);
        // No identity is the node lookup's error, not the knobs'.
        let e = e.node().unwrap_err().to_string();
        assert!(e.contains("POD_NAME and POD_NAMESPACE must be set"), "{e}");
    }

    #[test]
    fn kube_env_errors_name_the_variable() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "EVENT_QUEUE_DEPTH",
                "0",
                "EVENT_QUEUE_DEPTH=\"0\": expected a positive integer",
            ),
            ("EVENT_QUEUE_DEPTH", "-5", "EVENT_QUEUE_DEPTH=\"-5\""),
            ("EVENT_QUEUE_DEPTH", "5k", "EVENT_QUEUE_DEPTH=\"5k\""),
            ("EVENT_QUEUE_DEPTH", " 50", "EVENT_QUEUE_DEPTH=\" 50\""),
            (
                "CONT_WHEN_CACHE_NOT_READY",
                "True",
                "CONT_WHEN_CACHE_NOT_READY=\"True\": expected \"true\" or \"false\"",
            ),
            (
                "CONT_WHEN_CACHE_NOT_READY",
                "1",
                "CONT_WHEN_CACHE_NOT_READY=\"1\"",
            ),
        ];
        for (var, value, want) in cases {
            let vars = [("NODE_NAME", "n"), (*var, *value)];
            let e = KubeEnv::from_lookup(env_of(&vars)).unwrap_err().to_string();
            assert!(
                e.contains(want),
                "{var}={value}: {e:?} should contain {want:?}"
            );
        }
    }

    #[test]
    fn kube_env_reads_the_process_environment() {
        let _g = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        std::env::set_var("NODE_NAME", "from-env");
        std::env::set_var("EVENT_QUEUE_DEPTH", "12");
        let e = kube_env();
        std::env::remove_var("NODE_NAME");
        std::env::remove_var("EVENT_QUEUE_DEPTH");
        let e = e.unwrap();
        assert_eq!(e.node_name.as_deref(), Some("from-env"));
        assert_eq!(e.event_queue_depth, 12);
    }

    #[test]
    fn help_lists_every_kubernetes_variable_and_no_stale_not_implemented() {
        use clap::CommandFactory;
        let help = Flags::command().render_long_help().to_string();
        for v in wire::KUBE_ENV_VARS {
            assert!(KUBE_ENV_HELP.contains(v), "{v} missing from the after_help");
            assert!(help.contains(v), "{v} missing from --help");
        }
        for flag in ["--iface-can-reach", "--public-ipv6", "--public-ip"] {
            let at = help.find(&format!("{flag} <")).unwrap();
            let text = &help[at..at + help[at..].find("\n\n").unwrap_or(help.len() - at)];
            assert!(!text.contains("not implemented"), "{text}");
        }
    }
}
