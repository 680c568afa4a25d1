//! /run/flannel/subnet.env in upstream's format: what flanneld tells the CNI
//! plugin about this node's lease.
//!
//! ```text
//! FLANNEL_NETWORK=10.244.0.0/16
//! FLANNEL_SUBNET=10.244.1.1/24
//! FLANNEL_IPV6_NETWORK=fd00:10:244::/56
//! FLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64
//! FLANNEL_MTU=1450
//! FLANNEL_IPMASQ=true
//! ```
//!
//! `FLANNEL_SUBNET` is the first usable address of the lease with the
//! lease's prefix, not the network address.

use std::fmt::Write as _;
use std::str::FromStr;

use ipnet::{Ipv4Net, Ipv6Net};

use crate::config::NetConfig;
use crate::ip;
use crate::lease::LeaseKey;
use crate::wire::{
    ENV_IPMASQ, ENV_IPV6_NETWORK, ENV_IPV6_SUBNET, ENV_MTU, ENV_NETWORK, ENV_SUBNET,
};

/// The content of subnet.env.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`: the cluster network.
    pub network: Option<Ipv4Net>,
    /// `FLANNEL_SUBNET`: first usable address of the lease with its prefix
    /// (`10.244.1.1/24`).
    pub subnet: Option<Ipv4Net>,
    /// `FLANNEL_IPV6_NETWORK`.
    pub ipv6_network: Option<Ipv6Net>,
    /// `FLANNEL_IPV6_SUBNET` (`fd00:10:244:1::1/64`).
    pub ipv6_subnet: Option<Ipv6Net>,
    /// `FLANNEL_MTU`: the MTU for pods.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`: flanneld masquerades, so the bridge plugin must not.
    pub ipmasq: bool,
}

/// A subnet.env that cannot be used. Each message names the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetEnvError {
    #[error("subnet.env has no {var}: flanneld writes it once it holds a lease; check that flanneld runs on this node")]
    Missing { var: &'static str },
    #[error("subnet.env: {var}={value:?} is invalid: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("subnet.env line {line_no} is not VAR=value: {line:?}")]
    Malformed { line_no: usize, line: String },
}

impl SubnetEnvError {
    /// The variable concerned, if any.
    pub fn var(&self) -> Option<&'static str> {
        match self {
            SubnetEnvError::Missing { var } | SubnetEnvError::Invalid { var, .. } => Some(var),
            SubnetEnvError::Malformed { .. } => None,
        }
    }
}

impl SubnetEnv {
    /// The subnet.env for a lease under `cfg`: each family the config
    /// enables and the lease carries gets its two lines.
    pub fn new(cfg: &NetConfig, lease: &LeaseKey, mtu: u32, ipmasq: bool) -> Self {
        let v4 = lease.ipv4.filter(|_| cfg.enable_ipv4);
        let v6 = lease.ipv6.filter(|_| cfg.enable_ipv6);
        SubnetEnv {
            network: v4.and(cfg.network),
            subnet: v4.map(|n| ip::first_usable(&n)),
            ipv6_network: v6.and(cfg.ipv6_network),
            ipv6_subnet: v6.map(|n| ip::first_usable(&n)),
            mtu,
            ipmasq,
        }
    }

    /// The file content, in upstream's line order; the IPv4 lines only with
    /// IPv4, the IPv6 lines only with IPv6.
    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        if let Some(n) = self.network {
            let _ = writeln!(s, "{ENV_NETWORK}={n}");
        }
        if let Some(n) = self.subnet {
            let _ = writeln!(s, "{ENV_SUBNET}={n}");
        }
        if let Some(n) = self.ipv6_network {
            let _ = writeln!(s, "{ENV_IPV6_NETWORK}={n}");
        }
        if let Some(n) = self.ipv6_subnet {
            let _ = writeln!(s, "{ENV_IPV6_SUBNET}={n}");
        }
        let _ = writeln!(s, "{ENV_MTU}={}", self.mtu);
        let _ = writeln!(s, "{ENV_IPMASQ}={}", self.ipmasq);
        s
    }

    /// Parses subnet.env. Tolerates any line order, blank lines, `#`
    /// comments, an `export ` prefix, quoted values and unknown variables
    /// (the last assignment wins). Requires `FLANNEL_MTU`, `FLANNEL_IPMASQ`
    /// and, for at least one family, both its network and subnet variables.
    pub fn parse(s: &str) -> Result<SubnetEnv, SubnetEnvError> {
        let mut network = None;
        let mut subnet = None;
        let mut ipv6_network = None;
        let mut ipv6_subnet = None;
        let mut mtu = None;
        let mut ipmasq = None;

        for (i, raw) in s.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
            let Some((var, value)) = line.split_once('=') else {
                return Err(SubnetEnvError::Malformed {
                    line_no: i + 1,
                    line: raw.to_string(),
                });
            };
            let value = unquote(value.trim());
            match var.trim() {
                v if v == ENV_NETWORK => network = Some(parse_val(ENV_NETWORK, value)?),
                v if v == ENV_SUBNET => subnet = Some(parse_val(ENV_SUBNET, value)?),
                v if v == ENV_IPV6_NETWORK => {
                    ipv6_network = Some(parse_val(ENV_IPV6_NETWORK, value)?)
                }
                v if v == ENV_IPV6_SUBNET => ipv6_subnet = Some(parse_val(ENV_IPV6_SUBNET, value)?),
                v if v == ENV_MTU => mtu = Some(parse_val(ENV_MTU, value)?),
                v if v == ENV_IPMASQ => ipmasq = Some(parse_val(ENV_IPMASQ, value)?),
                _ => {}
            }
        }

        // Each family needs both of its variables, or neither.
        match (network, subnet) {
            (Some(_), None) => return Err(SubnetEnvError::Missing { var: ENV_SUBNET }),
            (None, Some(_)) => return Err(SubnetEnvError::Missing { var: ENV_NETWORK }),
            _ => {}
        }
        match (ipv6_network, ipv6_subnet) {
            (Some(_), None) => {
                return Err(SubnetEnvError::Missing {
                    var: ENV_IPV6_SUBNET,
                })
            }
            (None, Some(_)) => {
                return Err(SubnetEnvError::Missing {
                    var: ENV_IPV6_NETWORK,
                })
            }
            _ => {}
        }
        if network.is_none() && ipv6_network.is_none() {
            return Err(SubnetEnvError::Missing { var: ENV_NETWORK });
        }
        if let (Some(n), Some(s)) = (network, subnet) {
            if !ip::contains_net::<Ipv4Net>(&n, &s) {
                return Err(SubnetEnvError::Invalid {
                    var: ENV_SUBNET,
                    value: s.to_string(),
                    reason: format!("it is not inside {ENV_NETWORK}={n}"),
                });
            }
        }
        if let (Some(n), Some(s)) = (ipv6_network, ipv6_subnet) {
            if !ip::contains_net::<Ipv6Net>(&n, &s) {
                return Err(SubnetEnvError::Invalid {
                    var: ENV_IPV6_SUBNET,
                    value: s.to_string(),
                    reason: format!("it is not inside {ENV_IPV6_NETWORK}={n}"),
                });
            }
        }
        Ok(SubnetEnv {
            network,
            subnet,
            ipv6_network,
            ipv6_subnet,
            mtu: mtu.ok_or(SubnetEnvError::Missing { var: ENV_MTU })?,
            ipmasq: ipmasq.ok_or(SubnetEnvError::Missing { var: ENV_IPMASQ })?,
        })
    }

    /// The lease the file was written for (`FLANNEL_SUBNET=10.244.1.1/24` ->
    /// `10.244.1.0/24`): the candidate of acquisition step (2). `None` when
    /// the file names no subnet.
    pub fn lease_key(&self) -> Option<LeaseKey> {
        let key = LeaseKey {
            ipv4: self.subnet.map(|n| ip::network_of(&n)),
            ipv6: self.ipv6_subnet.map(|n| ip::network_of(&n)),
        };
        (!key.is_empty()).then_some(key)
    }
}

impl FromStr for SubnetEnv {
    type Err = SubnetEnvError;
    /// Same as [`SubnetEnv::parse`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SubnetEnv::parse(s)
    }
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|x| x.strip_suffix(q)) {
            return inner;
        }
    }
    v
}

/// Values and the words used to describe a bad one.
trait EnvValue: Sized {
    const WANT: &'static str;
    fn parse_env(s: &str) -> Option<Self>;
}

impl EnvValue for Ipv4Net {
    const WANT: &'static str = "expected an IPv4 CIDR like 10.244.0.0/16";
    fn parse_env(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

impl EnvValue for Ipv6Net {
    const WANT: &'static str = "expected an IPv6 CIDR like fd00:10:244::/56";
    fn parse_env(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

impl EnvValue for u32 {
    const WANT: &'static str = "expected a positive integer";
    fn parse_env(s: &str) -> Option<Self> {
        s.parse().ok().filter(|&m| m > 0)
    }
}

impl EnvValue for bool {
    const WANT: &'static str = "expected true or false";
    fn parse_env(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

fn parse_val<T: EnvValue>(var: &'static str, value: &str) -> Result<T, SubnetEnvError> {
    T::parse_env(value).ok_or_else(|| SubnetEnvError::Invalid {
        var,
        value: value.to_string(),
        reason: T::WANT.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
    const DUAL: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";
    const V6: &str = "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n";

    #[test]
    fn render_exact_and_round_trip() {
        for text in [V4, DUAL, V6] {
            let e = SubnetEnv::parse(text).unwrap();
            assert_eq!(e.render(), text);
            assert_eq!(text.parse::<SubnetEnv>().unwrap(), e);
        }
    }

    #[test]
    fn from_config_and_lease() {
        let cfg = crate::config::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
        )
        .unwrap();
        let key: LeaseKey = "10.244.1.0-24&fd00:10:244:1::-64".parse().unwrap();
        let e = SubnetEnv::new(&cfg, &key, 1450, false);
        assert_eq!(e.render(), DUAL);
        assert_eq!(e.lease_key(), Some(key));

        let cfg = crate::config::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        let key: LeaseKey = "10.244.1.0-24".parse().unwrap();
        let e = SubnetEnv::new(&cfg, &key, 1450, true);
        assert_eq!(e.render(), V4);
        assert_eq!(e.lease_key(), Some(key));
    }

    #[test]
    fn lease_key_of_v6_only() {
        let e = SubnetEnv::parse(V6).unwrap();
        assert_eq!(e.lease_key(), Some("fd00:10:244:1::-64".parse().unwrap()));
    }

    #[test]
    fn tolerant_parsing() {
        let text = "\n# written by flanneld\nFLANNEL_IPMASQ=true\n  FLANNEL_MTU = 1450 \nexport FLANNEL_SUBNET=\"10.244.1.1/24\"\nSOMETHING_ELSE=1\n\nFLANNEL_NETWORK='10.244.0.0/16'\n";
        let e = SubnetEnv::parse(text).unwrap();
        assert_eq!(e.render(), V4);
    }

    #[test]
    fn errors_name_the_variable() {
        let cases: [(&str, &str); 10] = [
            ("FLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", "FLANNEL_NETWORK"),
            ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", "FLANNEL_SUBNET"),
            ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPMASQ=true\n", "FLANNEL_MTU"),
            ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\n", "FLANNEL_IPMASQ"),
            ("FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", "FLANNEL_NETWORK"),
            ("FLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", "FLANNEL_IPV6_SUBNET"),
            ("FLANNEL_NETWORK=10.244.0.0\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", "FLANNEL_NETWORK"),
            ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.245.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", "FLANNEL_SUBNET"),
            ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=big\nFLANNEL_IPMASQ=true\n", "FLANNEL_MTU"),
            ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=yes\n", "FLANNEL_IPMASQ"),
        ];
        for (text, var) in cases {
            let e = SubnetEnv::parse(text).expect_err(text);
            assert_eq!(e.var(), Some(var), "{text}: {e}");
            assert!(e.to_string().contains(var), "{e}");
        }
        let e = SubnetEnv::parse("FLANNEL_NETWORK 10.244.0.0/16\n").unwrap_err();
        assert!(
            matches!(e, SubnetEnvError::Malformed { line_no: 1, .. }),
            "{e}"
        );
        let e = SubnetEnv::parse("").unwrap_err();
        assert!(e.to_string().contains("check that flanneld runs"), "{e}");
    }
}
