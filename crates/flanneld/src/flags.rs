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

/// flannel-rs node daemon: leases a pod subnet and programs the vxlan overlay.
///
/// Every flag can also be set from the environment as FLANNELD_<FLAG> (e.g.
/// FLANNELD_IFACE=eth0,eth1). Boolean flags accept --flag, --flag=true and
/// --flag=false (Go's flag package semantics, which existing manifests rely on).
#[derive(Debug, Clone, Parser)]
#[command(name = "flanneld", version)]
pub struct Flags {
    /// Path of the network configuration (net-conf.json).
    #[arg(long, env = "FLANNELD_NET_CONFIG_PATH", default_value = wire::DEFAULT_NET_CONFIG_PATH)]
    pub net_config_path: PathBuf,

    /// Where to write the subnet.env file the CNI plugin reads.
    #[arg(long, env = "FLANNELD_SUBNET_FILE", default_value = wire::DEFAULT_SUBNET_FILE)]
    pub subnet_file: PathBuf,

    /// Interface (name or IP address) to use for inter-host traffic; may be
    /// repeated, the first one that exists wins.
    #[arg(long = "iface", env = "FLANNELD_IFACE", value_delimiter = ',')]
    pub iface: Vec<String>,

    /// Regex matched against interface IP addresses, then names; may be repeated.
    #[arg(
        long = "iface-regex",
        env = "FLANNELD_IFACE_REGEX",
        value_delimiter = ','
    )]
    pub iface_regex: Vec<String>,

    /// Pick the interface whose route reaches this address (accepted; not implemented yet).
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<IpAddr>,

    /// IPv4 address announced to the other nodes (default: the interface's address).
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,

    /// IPv6 address announced to the other nodes (IPv6 is not implemented yet).
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

    /// Set the node's NetworkUnavailable condition (with --kube-subnet-mgr).
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

    /// Use the Kubernetes API as the subnet store (not implemented yet).
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub kube_subnet_mgr: bool,
    /// Kubernetes API server URL (with --kube-subnet-mgr).
    #[arg(long, env = "FLANNELD_KUBE_API_URL")]
    pub kube_api_url: Option<String>,
    /// Annotation prefix on Node objects (with --kube-subnet-mgr).
    #[arg(long, env = "FLANNELD_KUBE_ANNOTATION_PREFIX", default_value = wire::DEFAULT_KUBE_ANNOTATION_PREFIX)]
    pub kube_annotation_prefix: String,
    /// kubeconfig file (with --kube-subnet-mgr).
    #[arg(long, env = "FLANNELD_KUBECONFIG_FILE")]
    pub kubeconfig_file: Option<PathBuf>,

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
        assert!(!f.kube_subnet_mgr);
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
        assert!(f.ip_masq && f.kube_subnet_mgr && f.ip_blackhole_route);
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
        assert!(parse(&["--kube-subnet-mgr"]).unwrap().kube_subnet_mgr);
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
}
