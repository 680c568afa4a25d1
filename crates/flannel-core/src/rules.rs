//! Masquerade (`--ip-masq`) and forward (`--iptables-forward-rules`) rules:
//! the desired rule sets, in iptables mode and in nftables mode
//! (net-conf.json `EnableNFTables`), and the parsers that turn what the
//! kernel holds back into the same form, so that the daemon can compare and
//! rewrite only when they differ.
//!
//! Per address family, with NET the cluster network and POD this node's
//! subnet, the masquerade rules are, in this order (first match wins):
//!
//! 1. kube-proxy's mark 0x4000 set: return (kube-proxy masquerades it itself);
//! 2. POD -> NET: return (pod to pod, keep the source);
//! 3. NET -> POD: return;
//! 4. not NET -> POD: return (external traffic to our pods keeps its source);
//! 5. NET -> anything but multicast: masquerade (pods leaving the cluster);
//! 6. not NET -> NET: masquerade (the host talking to pods elsewhere).
//!
//! With either of them, and a backend that encapsulates in UDP (vxlan:
//! `Port` or 8472; udp: `Port` or 8285), the encapsulation guard drops
//! datagrams from pods (NET) to that port, in the raw table's PREROUTING
//! (before conntrack, routing and masquerade; nftables: a filter chain on
//! the prerouting hook at priority raw):
//!
//! 1. NET -> an address of this node, UDP to PORT: drop (a pod talking to
//!    its own node's, or, after the overlay, another node's VTEP);
//! 2. NET -> not NET, UDP to PORT: drop (a pod talking to another node's
//!    underlay address: masqueraded, it would pass the receiver's checks).
//!
//! Without it a pod can hand any node a vxlan or udp-backend datagram that
//! is delivered with whatever inner source it forged. The node's own
//! encapsulated traffic is locally generated and never crosses PREROUTING
//! on the way out; peers' arrives from their PublicIP, outside NET. Upstream
//! has no such rule.
//!
//! Upstream's nftables rule 4 tests `saddr != POD, daddr NET`, which also
//! returns everything rule 6 should masquerade; here rule 4 has the same
//! operands as in iptables mode. Upstream's nftables rule 1 matches the mark
//! exactly (`meta mark 0x4000`); here it tests the bit, as iptables'
//! `--mark 0x4000/0x4000` does.
//!
//! iptables rules are rendered exactly as `iptables-save` prints them, so the
//! parsed chain compares equal when nothing changed. The nftables half (the
//! `nft` submodule, re-exported here) is behind the crate feature `nft`:
//! it types nft's JSON schema with the `nftables` crate, which only flanneld
//! needs; the CNI plugin links flannel-core without it.

use std::collections::BTreeMap;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::lease::IpFamily;
use crate::wire;

#[cfg(feature = "nft")]
mod nft;
#[cfg(feature = "nft")]
pub use nft::{
    nft_delete_batch, nft_desired, nft_plan, nft_table, parse_nft_json, NftActual, NftChain,
    NftPlan, NftTable,
};

/// Why rules could not be computed or the kernel's rules not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("rules: the {family:?} subnet {subnet} is not inside the network {network}; check the lease and net-conf.json Network/IPv6Network")]
    SubnetOutsideNetwork {
        family: IpFamily,
        network: IpNet,
        subnet: IpNet,
    },
    #[error("rules: iptables-save output line {line_no} is not understood: {line:?}")]
    SaveOutput { line_no: usize, line: String },
    #[error("rules: `nft -j list table` output is not understood: {0}")]
    NftJson(String),
}

/// Which firewall the rules are written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// `iptables-restore` / `ip6tables-restore` chains FLANNEL-POSTRTG and FLANNEL-FWD.
    Iptables,
    /// nftables tables `ip flannel-ipv4` and `ip6 flannel-ipv6` (`EnableNFTables`).
    Nftables,
}

/// The cluster network and this node's subnet in one address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyNets {
    /// NET: the cluster network (`Network` / `IPv6Network`).
    pub network: IpNet,
    /// POD: this node's lease subnet.
    pub subnet: IpNet,
}

impl FamilyNets {
    /// IPv4 network and subnet; the subnet must lie inside the network.
    pub fn v4(network: Ipv4Net, subnet: Ipv4Net) -> Result<Self, RulesError> {
        Self::checked(IpFamily::V4, IpNet::V4(network), IpNet::V4(subnet))
    }

    /// IPv6 network and subnet; the subnet must lie inside the network.
    pub fn v6(network: Ipv6Net, subnet: Ipv6Net) -> Result<Self, RulesError> {
        Self::checked(IpFamily::V6, IpNet::V6(network), IpNet::V6(subnet))
    }

    fn checked(family: IpFamily, network: IpNet, subnet: IpNet) -> Result<Self, RulesError> {
        let (network, subnet) = (network.trunc(), subnet.trunc());
        if !network.contains(&subnet) {
            return Err(RulesError::SubnetOutsideNetwork {
                family,
                network,
                subnet,
            });
        }
        Ok(Self { network, subnet })
    }
}

/// Which rules are wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RuleOptions {
    /// `--ip-masq`: the masquerade chain.
    pub masquerade: bool,
    /// Not `--ip-masq-fully-random-disable`: masquerade with `--random-fully` / `fully-random`.
    pub fully_random: bool,
    /// `--iptables-forward-rules`: the forward-accept chain.
    pub forward: bool,
    /// The backend's UDP encapsulation port (vxlan `Port` or 8472, udp
    /// `Port` or 8285; `None` for host-gw): with masquerade or forward
    /// rules wanted, the encapsulation guard drops pod traffic to it
    /// (module documentation).
    pub encap_port: Option<u16>,
}

impl RuleOptions {
    /// The port the encapsulation guard protects, when it is wanted.
    pub fn guard_port(&self) -> Option<u16> {
        self.encap_port.filter(|_| self.masquerade || self.forward)
    }
}

/// Everything the rules of a node depend on. A family without nets gets no
/// rules (and any left from an earlier run are removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesInput {
    pub mode: Mode,
    pub v4: Option<FamilyNets>,
    pub v6: Option<FamilyNets>,
    pub options: RuleOptions,
}

impl RulesInput {
    /// The nets of one family.
    pub fn nets(&self, family: IpFamily) -> Option<FamilyNets> {
        match family {
            IpFamily::V4 => self.v4,
            IpFamily::V6 => self.v6,
        }
    }

    /// True when no family wants any rule: nothing to keep in line, only
    /// leftovers to remove.
    pub fn wants_nothing(&self) -> bool {
        let any_rule = self.options.masquerade || self.options.forward;
        !any_rule || (self.v4.is_none() && self.v6.is_none())
    }
}

/// Both families, in the order they are handled.
pub const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

fn multicast(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "224.0.0.0/4",
        IpFamily::V6 => "ff00::/8",
    }
}

// ---------------------------------------------------------------- iptables

/// One flannel chain of iptables and the rule that jumps to it from a
/// built-in chain (`iptables -t TABLE -A FROM ... -j CHAIN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IptChainId {
    /// `nat` or `filter`.
    pub table: &'static str,
    /// FLANNEL-POSTRTG or FLANNEL-FWD.
    pub chain: &'static str,
    /// POSTROUTING or FORWARD.
    pub from: &'static str,
    comment: &'static str,
}

/// FLANNEL-POSTRTG in nat, from POSTROUTING.
pub const IPT_MASQ: IptChainId = IptChainId {
    table: "nat",
    chain: wire::IPT_MASQ_CHAIN,
    from: "POSTROUTING",
    comment: wire::IPT_MASQ_COMMENT,
};

/// FLANNEL-ENCAP in raw, from PREROUTING.
pub const IPT_ENCAP: IptChainId = IptChainId {
    table: "raw",
    chain: wire::IPT_ENCAP_CHAIN,
    from: "PREROUTING",
    comment: wire::IPT_ENCAP_COMMENT,
};

/// FLANNEL-FWD in filter, from FORWARD.
pub const IPT_FORWARD: IptChainId = IptChainId {
    table: "filter",
    chain: wire::IPT_FORWARD_CHAIN,
    from: "FORWARD",
    comment: wire::IPT_FORWARD_COMMENT,
};

impl IptChainId {
    /// The jump rule's spec as `iptables-save` prints it (after `-A FROM `).
    pub fn jump(&self) -> String {
        format!(
            "-m comment --comment \"{}\" -j {}",
            self.comment, self.chain
        )
    }

    fn is_jump(&self, spec: &str) -> bool {
        // By tokens, as iptables reads a rule: `-j  CHAIN` (any blanks) is
        // the same jump as `-j CHAIN`, which is what iptables-save prints.
        let mut tokens = spec.split_ascii_whitespace().rev();
        tokens.next() == Some(self.chain) && matches!(tokens.next(), Some("-j" | "-g"))
    }
}

/// What one flannel iptables chain should hold: `Some(rules)` (rule specs as
/// `iptables-save` prints them after `-A CHAIN `), or `None` when the chain
/// and its jump must not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptDesired {
    pub id: IptChainId,
    pub rules: Option<Vec<String>>,
}

/// The desired FLANNEL-POSTRTG (nat), FLANNEL-FWD (filter) and
/// FLANNEL-ENCAP (raw) chains of one family (`iptables` for IPv4,
/// `ip6tables` for IPv6).
pub fn iptables_desired(
    family: IpFamily,
    nets: Option<FamilyNets>,
    options: RuleOptions,
) -> Vec<IptDesired> {
    let masq = nets
        .filter(|_| options.masquerade)
        .map(|n| iptables_masq_rules(family, n, options.fully_random));
    let fwd = nets
        .filter(|_| options.forward)
        .map(|n| iptables_forward_rules(n.network));
    let guard = nets
        .zip(options.guard_port())
        .map(|(n, port)| iptables_guard_rules(n.network, port));
    vec![
        IptDesired {
            id: IPT_MASQ,
            rules: masq,
        },
        IptDesired {
            id: IPT_FORWARD,
            rules: fwd,
        },
        IptDesired {
            id: IPT_ENCAP,
            rules: guard,
        },
    ]
}

fn iptables_guard_rules(net: IpNet, port: u16) -> Vec<String> {
    let c = format!("-m comment --comment \"{}\"", wire::IPT_ENCAP_COMMENT);
    let udp = format!("-p udp -m udp --dport {port}");
    vec![
        format!("-s {net} {udp} -m addrtype --dst-type LOCAL {c} -j DROP"),
        format!("-s {net} ! -d {net} {udp} {c} -j DROP"),
    ]
}

fn iptables_masq_rules(family: IpFamily, n: FamilyNets, fully_random: bool) -> Vec<String> {
    let c = format!("-m comment --comment \"{}\"", wire::IPT_MASQ_COMMENT);
    let (net, pod) = (n.network, n.subnet);
    let masq = if fully_random {
        "MASQUERADE --random-fully"
    } else {
        "MASQUERADE"
    };
    let m = wire::KUBE_PROXY_MASQ_MARK;
    vec![
        format!("-m mark --mark {m:#x}/{m:#x} {c} -j RETURN"),
        format!("-s {pod} -d {net} {c} -j RETURN"),
        format!("-s {net} -d {pod} {c} -j RETURN"),
        format!("! -s {net} -d {pod} {c} -j RETURN"),
        format!("-s {net} ! -d {} {c} -j {masq}", multicast(family)),
        format!("! -s {net} -d {net} {c} -j {masq}"),
    ]
}

fn iptables_forward_rules(net: IpNet) -> Vec<String> {
    let c = format!("-m comment --comment \"{}\"", wire::IPT_FORWARD_COMMENT);
    vec![
        format!("-s {net} {c} -j ACCEPT"),
        format!("-d {net} {c} -j ACCEPT"),
    ]
}

/// One table of `iptables-save` output: its chains and their rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IptTable {
    /// Every chain declared (`:NAME POLICY [p:b]`), built-in or not.
    pub chains: BTreeMap<String, Vec<String>>,
}

/// Parses `iptables-save` output (any number of tables) into tables by name.
/// Rule lines keep `iptables-save`'s own text after `-A CHAIN `.
pub fn parse_iptables_save(text: &str) -> Result<BTreeMap<String, IptTable>, RulesError> {
    let mut tables: BTreeMap<String, IptTable> = BTreeMap::new();
    let mut current: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_end();
        let bad = || RulesError::SaveOutput {
            line_no: i + 1,
            line: line.to_string(),
        };
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            if name.is_empty() || name.contains(|c: char| c.is_ascii_whitespace()) {
                return Err(bad());
            }
            tables.entry(name.to_string()).or_default();
            current = Some(name.to_string());
        } else if line == "COMMIT" {
            current = None;
        } else {
            let table = current
                .as_ref()
                .and_then(|t| tables.get_mut(t))
                .ok_or_else(bad)?;
            // A chain name is the first word, as iptables-save prints it
            // (`:NAME POLICY [p:b]`, `-A NAME SPEC`); iptables allows no
            // blank in one, and no empty one.
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl
                    .split_ascii_whitespace()
                    .next()
                    .filter(|_| !decl.starts_with(|c: char| c.is_ascii_whitespace()))
                    .ok_or_else(bad)?;
                table.chains.entry(name.to_string()).or_default();
            } else if let Some(rule) = line.strip_prefix("-A ") {
                // A rule without matches or target (`iptables -A CHAIN`, a
                // counter) is printed as `-A CHAIN`: its spec is empty.
                let (chain, spec) = rule
                    .split_once(|c: char| c.is_ascii_whitespace())
                    .unwrap_or((rule, ""));
                if chain.is_empty() {
                    return Err(bad());
                }
                table
                    .chains
                    .entry(chain.to_string())
                    .or_default()
                    .push(spec.to_string());
            } else {
                return Err(bad());
            }
        }
    }
    Ok(tables)
}

/// The `iptables-restore --noflush` lines (without `*TABLE` / `COMMIT`) that
/// bring one flannel chain in line, or `None` when it already is.
///
/// A wanted chain that differs in any way (a rule missing, changed, added
/// or moved) is rewritten as a whole: declaring a chain in
/// `iptables-restore --noflush` input flushes it, so the rewrite is one
/// atomic transaction and never leaves the chain half-built. The jump from
/// the built-in chain is only touched when it is not there exactly once, so
/// that its position among other software's rules is kept; a new jump is
/// appended, as upstream does.
pub fn iptables_plan(desired: &IptDesired, actual: Option<&IptTable>) -> Option<Vec<String>> {
    let id = desired.id;
    let empty = IptTable::default();
    let actual = actual.unwrap_or(&empty);
    let chain = actual.chains.get(id.chain);
    let jumps: Vec<&String> = actual
        .chains
        .get(id.from)
        .map(|rules| rules.iter().filter(|s| id.is_jump(s)).collect())
        .unwrap_or_default();
    let jump = id.jump();
    let jump_ok = jumps.len() == 1 && *jumps[0] == jump;
    let mut lines = Vec::new();
    match &desired.rules {
        Some(want) => {
            if chain == Some(want) && jump_ok {
                return None;
            }
            lines.push(format!(":{} - [0:0]", id.chain));
            if !jump_ok {
                lines.extend(jumps.iter().map(|j| format!("-D {} {j}", id.from)));
                lines.push(format!("-A {} {jump}", id.from));
            }
            lines.extend(want.iter().map(|r| format!("-A {} {r}", id.chain)));
        }
        None => {
            // `-X` fails while any rule of the table still jumps to the
            // chain (iptables: "Too many links"), and with it the whole
            // transaction, every pass: the references from every other
            // chain go first, not only the jump from `from`.
            let refs: Vec<(&String, &String)> = actual
                .chains
                .iter()
                .filter(|(c, _)| c.as_str() != id.from && c.as_str() != id.chain)
                .flat_map(|(c, rules)| rules.iter().filter(|s| id.is_jump(s)).map(move |s| (c, s)))
                .collect();
            if chain.is_none() && jumps.is_empty() && refs.is_empty() {
                return None;
            }
            lines.extend(jumps.iter().map(|j| format!("-D {} {j}", id.from)));
            lines.extend(refs.iter().map(|(c, j)| format!("-D {c} {j}")));
            if chain.is_some() {
                lines.push(format!("-F {}", id.chain));
                lines.push(format!("-X {}", id.chain));
            }
        }
    }
    Some(lines)
}

/// `iptables-restore --noflush` input for one table.
pub fn iptables_restore_input(table: &str, lines: &[String]) -> String {
    let mut s = format!("*{table}\n");
    for l in lines {
        s.push_str(l);
        s.push('\n');
    }
    s.push_str("COMMIT\n");
    s
}

/// The chains of a desired set exactly as `iptables-save -t TABLE` lists
/// them for flannel: the jump line, the chain's declaration omitted, then
/// `-A CHAIN rule` lines. Used by tests and `flannelctl`-style reports.
pub fn iptables_save_lines(desired: &IptDesired) -> Vec<String> {
    let Some(rules) = &desired.rules else {
        return Vec::new();
    };
    let id = desired.id;
    let mut v = vec![format!("-A {} {}", id.from, id.jump())];
    v.extend(rules.iter().map(|r| format!("-A {} {r}", id.chain)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jump_is_read_by_tokens() {
        assert!(IPT_MASQ.is_jump("-j FLANNEL-POSTRTG"));
        assert!(IPT_MASQ.is_jump("-m comment --comment \"x\" -j  FLANNEL-POSTRTG"));
        assert!(IPT_MASQ.is_jump("-g\tFLANNEL-POSTRTG "));
        assert!(!IPT_MASQ.is_jump("-j XFLANNEL-POSTRTG"));
        assert!(!IPT_MASQ.is_jump("-j FLANNEL-POSTRTG-X"));
        assert!(!IPT_MASQ.is_jump("--comment FLANNEL-POSTRTG"));
        assert!(!IPT_MASQ.is_jump(""));
    }

    pub(super) fn v4() -> FamilyNets {
        FamilyNets::v4(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
        )
        .unwrap()
    }
    pub(super) fn v6() -> FamilyNets {
        FamilyNets::v6(
            "fd00:10:244::/56".parse().unwrap(),
            "fd00:10:244:1::/64".parse().unwrap(),
        )
        .unwrap()
    }
    pub(super) const ALL: RuleOptions = RuleOptions {
        masquerade: true,
        fully_random: true,
        forward: true,
        encap_port: None,
    };

    #[test]
    fn encap_guard_golden_and_only_with_other_rules() {
        let vxlan = RuleOptions {
            encap_port: Some(8472),
            ..ALL
        };
        let d = iptables_desired(IpFamily::V4, Some(v4()), vxlan);
        assert_eq!(d[2].id.table, "raw");
        assert_eq!(
            iptables_save_lines(&d[2]),
            [
                "-A PREROUTING -m comment --comment \"flanneld encap guard\" -j FLANNEL-ENCAP",
                "-A FLANNEL-ENCAP -s 10.244.0.0/16 -p udp -m udp --dport 8472 -m addrtype --dst-type LOCAL -m comment --comment \"flanneld encap guard\" -j DROP",
                "-A FLANNEL-ENCAP -s 10.244.0.0/16 ! -d 10.244.0.0/16 -p udp -m udp --dport 8472 -m comment --comment \"flanneld encap guard\" -j DROP",
            ]
        );
        let v6 = iptables_desired(
            IpFamily::V6,
            Some(v6()),
            RuleOptions {
                encap_port: Some(9000),
                masquerade: false,
                ..ALL
            },
        );
        assert_eq!(
            v6[2].rules.as_ref().unwrap()[1],
            "-s fd00:10:244::/56 ! -d fd00:10:244::/56 -p udp -m udp --dport 9000 -m comment --comment \"flanneld encap guard\" -j DROP"
        );
        // host-gw (no port), or no other rule wanted: no guard.
        assert!(iptables_desired(IpFamily::V4, Some(v4()), ALL)[2]
            .rules
            .is_none());
        let none = RuleOptions {
            encap_port: Some(8472),
            ..RuleOptions::default()
        };
        assert!(iptables_desired(IpFamily::V4, Some(v4()), none)[2]
            .rules
            .is_none());
        assert_eq!(none.guard_port(), None);
        assert_eq!(vxlan.guard_port(), Some(8472));
    }

    #[test]
    fn iptables_masq_golden_order_and_operands() {
        let d = iptables_desired(IpFamily::V4, Some(v4()), ALL);
        assert_eq!(
            iptables_save_lines(&d[0]),
            [
                "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG",
                "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN",
                "-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN",
                "-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment \"flanneld masq\" -j RETURN",
                "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment \"flanneld masq\" -j RETURN",
                "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully",
                "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully",
            ]
        );
        assert_eq!(d[0].id.table, "nat");
        assert_eq!(
            iptables_save_lines(&d[1]),
            [
                "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD",
                "-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT",
                "-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT",
            ]
        );
        assert_eq!(d[1].id.table, "filter");
    }

    #[test]
    fn iptables_fully_random_off_and_ipv6_multicast() {
        let opts = RuleOptions {
            fully_random: false,
            ..ALL
        };
        let d = iptables_desired(IpFamily::V6, Some(v6()), opts);
        let rules = d[0].rules.as_ref().unwrap();
        assert_eq!(
            rules[4],
            "-s fd00:10:244::/56 ! -d ff00::/8 -m comment --comment \"flanneld masq\" -j MASQUERADE"
        );
        assert!(rules.iter().all(|r| !r.contains("random-fully")));
        assert_eq!(rules[1], "-s fd00:10:244:1::/64 -d fd00:10:244::/56 -m comment --comment \"flanneld masq\" -j RETURN");
    }

    #[test]
    fn iptables_options_select_chains() {
        let none = iptables_desired(IpFamily::V4, Some(v4()), RuleOptions::default());
        assert!(none.iter().all(|d| d.rules.is_none()));
        let fwd_only = iptables_desired(
            IpFamily::V4,
            Some(v4()),
            RuleOptions {
                forward: true,
                ..Default::default()
            },
        );
        assert!(fwd_only[0].rules.is_none() && fwd_only[1].rules.is_some());
        let no_family = iptables_desired(IpFamily::V6, None, ALL);
        assert!(no_family.iter().all(|d| d.rules.is_none()));
    }

    #[test]
    fn subnet_outside_network_is_refused() {
        let e = FamilyNets::v4(
            "10.244.0.0/16".parse().unwrap(),
            "10.1.0.0/24".parse().unwrap(),
        )
        .unwrap_err();
        assert!(e
            .to_string()
            .contains("10.1.0.0/24 is not inside the network 10.244.0.0/16"));
    }

    fn save_text(nat_rules: &[&str], post: &[&str]) -> String {
        let mut s = String::from("# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [3:180]\n:FLANNEL-POSTRTG - [0:0]\n");
        for p in post {
            s.push_str(&format!("-A POSTROUTING {p}\n"));
        }
        for r in nat_rules {
            s.push_str(&format!("-A FLANNEL-POSTRTG {r}\n"));
        }
        s.push_str("COMMIT\n# Completed\n*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n");
        s
    }

    #[test]
    fn iptables_plan_in_line_is_none() {
        let d = iptables_desired(IpFamily::V4, Some(v4()), ALL);
        let want: Vec<&str> = d[0]
            .rules
            .as_ref()
            .unwrap()
            .iter()
            .map(String::as_str)
            .collect();
        let jump = d[0].id.jump();
        let t = parse_iptables_save(&save_text(&want, &["-j KUBE-POSTROUTING", &jump])).unwrap();
        assert_eq!(iptables_plan(&d[0], t.get("nat")), None);
        // filter has no FLANNEL-FWD: it must be created with its jump.
        let plan = iptables_plan(&d[1], t.get("filter")).unwrap();
        assert_eq!(plan[0], ":FLANNEL-FWD - [0:0]");
        assert_eq!(
            plan[1],
            "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD"
        );
        assert_eq!(plan.len(), 4);
        // No filter table at all is the same as an empty one.
        assert_eq!(iptables_plan(&d[1], None), Some(plan));
    }

    #[test]
    fn iptables_plan_rewrites_a_chain_with_a_foreign_or_missing_rule() {
        let d = iptables_desired(IpFamily::V4, Some(v4()), ALL);
        let want = d[0].rules.as_ref().unwrap();
        let jump = d[0].id.jump();
        let mut with_foreign: Vec<&str> = want.iter().map(String::as_str).collect();
        with_foreign.insert(2, "-s 10.9.9.9/32 -j ACCEPT");
        let t = parse_iptables_save(&save_text(&with_foreign, &[&jump])).unwrap();
        let plan = iptables_plan(&d[0], t.get("nat")).unwrap();
        // Declaration flushes; the jump is left where it is; rules in order.
        let mut expect = vec![":FLANNEL-POSTRTG - [0:0]".to_string()];
        expect.extend(want.iter().map(|r| format!("-A FLANNEL-POSTRTG {r}")));
        assert_eq!(plan, expect);

        let missing: Vec<&str> = want.iter().skip(1).map(String::as_str).collect();
        let t = parse_iptables_save(&save_text(&missing, &[&jump])).unwrap();
        assert_eq!(iptables_plan(&d[0], t.get("nat")).unwrap(), expect);
    }

    #[test]
    fn iptables_plan_fixes_duplicate_or_old_jumps() {
        let d = iptables_desired(IpFamily::V4, Some(v4()), ALL);
        let want: Vec<&str> = d[0]
            .rules
            .as_ref()
            .unwrap()
            .iter()
            .map(String::as_str)
            .collect();
        let jump = d[0].id.jump();
        let t =
            parse_iptables_save(&save_text(&want, &[&jump, "-j FLANNEL-POSTRTG", &jump])).unwrap();
        let plan = iptables_plan(&d[0], t.get("nat")).unwrap();
        assert_eq!(
            &plan[1..4],
            [
                format!("-D POSTROUTING {jump}"),
                "-D POSTROUTING -j FLANNEL-POSTRTG".to_string(),
                format!("-D POSTROUTING {jump}"),
            ]
        );
        assert_eq!(plan[4], format!("-A POSTROUTING {jump}"));
    }

    #[test]
    fn iptables_plan_removes_unwanted_chain_and_jump() {
        let d = iptables_desired(IpFamily::V4, Some(v4()), RuleOptions::default());
        let jump = d[0].id.jump();
        let t = parse_iptables_save(&save_text(&["-j MASQUERADE"], &[&jump])).unwrap();
        assert_eq!(
            iptables_plan(&d[0], t.get("nat")).unwrap(),
            [
                format!("-D POSTROUTING {jump}"),
                "-F FLANNEL-POSTRTG".to_string(),
                "-X FLANNEL-POSTRTG".to_string()
            ]
        );
        assert_eq!(iptables_plan(&d[1], t.get("filter")), None);
        assert_eq!(
            iptables_restore_input("nat", &["-F X".to_string()]),
            "*nat\n-F X\nCOMMIT\n"
        );
    }

    /// Found by fuzz/iptables_save: a foreign rule jumping to the chain
    /// from another chain made `-X` (and the whole transaction) fail on
    /// every pass.
    #[test]
    fn iptables_plan_removes_jumps_from_every_chain_before_the_chain() {
        let d = iptables_desired(IpFamily::V4, Some(v4()), RuleOptions::default());
        let jump = d[0].id.jump();
        let mut text = save_text(&["-j MASQUERADE"], &[&jump]);
        text = text.replace(
            ":FLANNEL-POSTRTG - [0:0]\n",
            ":FLANNEL-POSTRTG - [0:0]\n:OTHER - [0:0]\n-A OUTPUT -g FLANNEL-POSTRTG\n-A OTHER -s 10.0.0.0/8 -j FLANNEL-POSTRTG\n",
        );
        let t = parse_iptables_save(&text).unwrap();
        assert_eq!(
            iptables_plan(&d[0], t.get("nat")).unwrap(),
            [
                format!("-D POSTROUTING {jump}"),
                "-D OTHER -s 10.0.0.0/8 -j FLANNEL-POSTRTG".to_string(),
                "-D OUTPUT -g FLANNEL-POSTRTG".to_string(),
                "-F FLANNEL-POSTRTG".to_string(),
                "-X FLANNEL-POSTRTG".to_string()
            ]
        );
        // Only references left (the chain already gone): they are removed too.
        let t = parse_iptables_save(
            "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j FLANNEL-POSTRTG\nCOMMIT\n",
        )
        .unwrap();
        assert_eq!(
            iptables_plan(&d[0], t.get("nat")).unwrap(),
            ["-D OUTPUT -j FLANNEL-POSTRTG".to_string()]
        );
    }

    /// Found by fuzz/iptables_save: chain names are the first word, never
    /// empty; a rule without matches or target (`iptables -A CHAIN`) is
    /// printed `-A CHAIN` and has an empty spec.
    #[test]
    fn iptables_save_chain_names_and_empty_rules() {
        let t = parse_iptables_save(
            "*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING\n-A POSTROUTING\t-j X\nCOMMIT\n",
        )
        .unwrap();
        assert_eq!(t["nat"].chains["POSTROUTING"], ["", "-j X"]);
        for bad in [
            "*nat\n-A  -j X\nCOMMIT\n",
            "*nat\n: ACCEPT [0:0]\nCOMMIT\n",
            "*nat\n:\nCOMMIT\n",
            "*\n:X - [0:0]\nCOMMIT\n",
            "*n at\nCOMMIT\n",
        ] {
            assert!(parse_iptables_save(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn iptables_save_garbage_is_an_error() {
        let e = parse_iptables_save("*nat\n-Z what\nCOMMIT\n").unwrap_err();
        assert!(matches!(e, RulesError::SaveOutput { line_no: 2, .. }));
        assert!(parse_iptables_save("-A X y\n").is_err());
    }

    #[test]
    fn wants_nothing() {
        let mut i = RulesInput {
            mode: Mode::Iptables,
            v4: Some(v4()),
            v6: None,
            options: RuleOptions::default(),
        };
        assert!(i.wants_nothing());
        i.options.forward = true;
        assert!(!i.wants_nothing());
        i.v4 = None;
        assert!(i.wants_nothing());
    }
}
