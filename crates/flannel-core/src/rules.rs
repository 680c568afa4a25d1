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
//! Upstream's nftables rule 4 tests `saddr != POD, daddr NET`, which also
//! returns everything rule 6 should masquerade; here rule 4 has the same
//! operands as in iptables mode. Upstream's nftables rule 1 matches the mark
//! exactly (`meta mark 0x4000`); here it tests the bit, as iptables'
//! `--mark 0x4000/0x4000` does.
//!
//! iptables rules are rendered exactly as `iptables-save` prints them, so the
//! parsed chain compares equal when nothing changed. nftables tables are
//! typed values of nft's JSON schema (the `nftables` crate) in the form nft
//! lists them; [`parse_nft_json`] types `nft -j list table` output and drops
//! what nft adds (handles), so an unchanged table compares equal, and
//! [`nft_plan`] says what to write.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nftables::batch::Batch;
use nftables::expr::{
    BinaryOperation, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix,
};
use nftables::schema::{Chain, FlushObject, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Match, NATFlag, Operator, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde_json::Value;

use crate::lease::IpFamily;
use crate::wire;

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
        spec.ends_with(&format!("-j {}", self.chain))
            || spec.ends_with(&format!("-g {}", self.chain))
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

/// The desired FLANNEL-POSTRTG (nat) and FLANNEL-FWD (filter) chains of one
/// family (`iptables` for IPv4, `ip6tables` for IPv6).
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
    vec![
        IptDesired {
            id: IPT_MASQ,
            rules: masq,
        },
        IptDesired {
            id: IPT_FORWARD,
            rules: fwd,
        },
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
            tables.entry(name.to_string()).or_default();
            current = Some(name.to_string());
        } else if line == "COMMIT" {
            current = None;
        } else {
            let table = current
                .as_ref()
                .and_then(|t| tables.get_mut(t))
                .ok_or_else(bad)?;
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().ok_or_else(bad)?;
                table.chains.entry(name.to_string()).or_default();
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let (chain, spec) = rule.split_once(' ').ok_or_else(bad)?;
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
            if chain.is_none() && jumps.is_empty() {
                return None;
            }
            lines.extend(jumps.iter().map(|j| format!("-D {} {j}", id.from)));
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

// ---------------------------------------------------------------- nftables

/// The nftables family keyword and flannel's table of one address family.
pub fn nft_table(family: IpFamily) -> (&'static str, &'static str) {
    match family {
        IpFamily::V4 => ("ip", wire::NFT_TABLE_V4),
        IpFamily::V6 => ("ip6", wire::NFT_TABLE_V6),
    }
}

fn nft_family(family: IpFamily) -> NfFamily {
    match family {
        IpFamily::V4 => NfFamily::IP,
        IpFamily::V6 => NfFamily::IP6,
    }
}

/// A base chain of flannel's nftables table and its rules, in order, as
/// `nft -j list table` gives them less what nft adds (handles).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftChain {
    pub chain: Chain<'static>,
    pub rules: Vec<Rule<'static>>,
}

/// flannel's nftables table of one family (`table ip flannel-ipv4`) as
/// typed `nft` JSON objects without handles: the desired one from
/// [`nft_desired`] and the kernel's from [`parse_nft_json`] compare equal
/// when nothing needs writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftTable {
    pub table: Table<'static>,
    /// The base chains in creation order (the order `nft list` shows).
    pub chains: Vec<NftChain>,
    /// Anything else in the table (sets, maps, counters, ...); never desired.
    pub other: Vec<NfListObject<'static>>,
}

/// `srcnat`: the standard priority of source NAT.
const NFT_SRCNAT: i32 = 100;
/// `filter`: the standard priority of filtering.
const NFT_FILTER: i32 = 0;

/// The desired table of one family, `None` when the family wants no rule
/// (then the table must not exist).
///
/// Every expression is written in the form nft itself lists it (a /32 or
/// /128 as a bare address, the mark as a number, one NAT flag), so that the
/// listing of an unchanged table compares equal.
pub fn nft_desired(
    family: IpFamily,
    nets: Option<FamilyNets>,
    options: RuleOptions,
) -> Option<NftTable> {
    let n = nets?;
    let (_, name) = nft_table(family);
    let nf = nft_family(family);
    let base_chain = |chain: &'static str, kind: NfChainType, hook: NfHook, prio: i32| Chain {
        family: nf,
        table: name.into(),
        name: chain.into(),
        newname: None,
        handle: None,
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        dev: None,
        policy: Some(NfChainPolicy::Accept),
    };
    let rule = |chain: &'static str, expr: Vec<Statement<'static>>| Rule {
        family: nf,
        table: name.into(),
        chain: chain.into(),
        expr: expr.into(),
        handle: None,
        index: None,
        comment: None,
    };
    let saddr = |op, net| nft_match(family, "saddr", op, net);
    let daddr = |op, net| nft_match(family, "daddr", op, net);
    let (eq, ne) = (Operator::EQ, Operator::NEQ);
    let mut chains = Vec::new();
    if options.masquerade {
        let c = wire::NFT_MASQ_CHAIN;
        let (net, pod) = (n.network, n.subnet);
        let masq = || {
            Statement::Masquerade(options.fully_random.then(|| NAT {
                addr: None,
                family: None,
                port: None,
                flags: Some(HashSet::from([NATFlag::FullyRandom])),
            }))
        };
        let ret = || Statement::Return(None);
        let m = wire::KUBE_PROXY_MASQ_MARK;
        let mark = Statement::Match(Match {
            left: Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                Expression::Named(NamedExpression::Meta(Meta { key: MetaKey::Mark })),
                Expression::Number(m),
            ))),
            right: Expression::Number(m),
            op: eq,
        });
        let rules = vec![
            rule(c, vec![mark, ret()]),
            rule(c, vec![saddr(eq, pod), daddr(eq, net), ret()]),
            rule(c, vec![saddr(eq, net), daddr(eq, pod), ret()]),
            rule(c, vec![saddr(ne, net), daddr(eq, pod), ret()]),
            rule(
                c,
                vec![saddr(eq, net), daddr(ne, multicast_net(family)), masq()],
            ),
            rule(c, vec![saddr(ne, net), daddr(eq, net), masq()]),
        ];
        chains.push(NftChain {
            chain: base_chain(c, NfChainType::NAT, NfHook::Postrouting, NFT_SRCNAT),
            rules,
        });
    }
    if options.forward {
        let c = wire::NFT_FORWARD_CHAIN;
        let accept = || Statement::Accept(None);
        chains.push(NftChain {
            chain: base_chain(c, NfChainType::Filter, NfHook::Forward, NFT_FILTER),
            rules: vec![
                rule(c, vec![saddr(eq, n.network), accept()]),
                rule(c, vec![daddr(eq, n.network), accept()]),
            ],
        });
    }
    if chains.is_empty() {
        return None;
    }
    Some(NftTable {
        table: Table {
            family: nf,
            name: name.into(),
            handle: None,
        },
        chains,
        other: Vec::new(),
    })
}

fn multicast_net(family: IpFamily) -> IpNet {
    multicast(family).parse().expect("a valid multicast prefix")
}

/// `ip saddr NET`, `ip6 daddr != NET`, ...
fn nft_match(
    family: IpFamily,
    field: &'static str,
    op: Operator,
    net: IpNet,
) -> Statement<'static> {
    let (protocol, _) = nft_table(family);
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(
            PayloadField {
                protocol: protocol.into(),
                field: field.into(),
            },
        ))),
        right: nft_net(net),
        op,
    })
}

/// nft lists a full-length prefix as the bare address.
fn nft_net(n: IpNet) -> Expression<'static> {
    let addr = Expression::String(n.addr().to_string().into());
    if n.prefix_len() == n.max_prefix_len() {
        addr
    } else {
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(addr),
            len: n.prefix_len().into(),
        }))
    }
}

fn chain_comment(name: &str) -> Option<&'static str> {
    match name {
        n if n == wire::NFT_MASQ_CHAIN => Some(wire::NFT_MASQ_CHAIN_COMMENT),
        n if n == wire::NFT_FORWARD_CHAIN => Some(wire::NFT_FORWARD_CHAIN_COMMENT),
        _ => None,
    }
}

/// The keyword nft uses for a typed value (`nat`, `postrouting`, `accept`):
/// its JSON string.
fn keyword<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

impl NftTable {
    /// The table's family as nft spells it (`ip`, `ip6`).
    fn family_keyword(&self) -> String {
        keyword(&self.table.family)
    }

    /// True when the table and its chains are as in `other`, rules aside.
    fn same_skeleton(&self, other: &NftTable) -> bool {
        self.table == other.table
            && self.other == other.other
            && self.chains.len() == other.chains.len()
            && self
                .chains
                .iter()
                .zip(&other.chains)
                .all(|(a, b)| a.chain == b.chain)
    }

    /// `nft -f -` input (nft's own syntax) that replaces the table with its
    /// chains, comments included but without rules, atomically: `add` (so
    /// that `delete` cannot fail on a missing table), `delete`, then the
    /// table. Like `nft -f` of
    /// `add table ip flannel-ipv4; delete table ip flannel-ipv4; table ip flannel-ipv4 { ... }`.
    ///
    /// This is the one part not written as JSON through the `nftables`
    /// crate: table and chain comments (what operators see in `nft list
    /// table`) exist neither in the crate's `Table`/`Chain` (0.6) nor in the
    /// JSON that nft 1.0.6 (Debian 12) reads: it silently drops them.
    pub fn skeleton_script(&self) -> String {
        let fam = self.family_keyword();
        let name = &self.table.name;
        let mut s = format!(
            "add table {fam} {name}\ndelete table {fam} {name}\ntable {fam} {name} {{\n\tcomment \"{}{name}\"\n",
            wire::NFT_TABLE_COMMENT_PREFIX
        );
        for c in &self.chains {
            let c = &c.chain;
            let _ = writeln!(s, "\tchain {} {{", c.name);
            if let Some(comment) = chain_comment(&c.name) {
                let _ = writeln!(s, "\t\tcomment \"{comment}\"");
            }
            if let (Some(kind), Some(hook), Some(prio)) = (c._type, c.hook, c.prio) {
                let policy = c.policy.unwrap_or(NfChainPolicy::Accept);
                let _ = writeln!(
                    s,
                    "\t\ttype {} hook {} priority {prio}; policy {};",
                    keyword(&kind),
                    keyword(&hook),
                    keyword(&policy)
                );
            }
            s.push_str("\t}\n");
        }
        s.push_str("}\n");
        s
    }

    /// One `nft -j -f -` transaction that flushes every chain of the table
    /// and adds its rules in order: the rules are replaced atomically and
    /// the chains (with their comments) stay.
    pub fn rules_batch(&self) -> Nftables<'static> {
        let mut b = Batch::new();
        for c in &self.chains {
            b.add_cmd(NfCmd::Flush(FlushObject::Chain(c.chain.clone())));
            for r in &c.rules {
                b.add(NfListObject::Rule(r.clone()));
            }
        }
        b.to_nftables()
    }

    /// Normalises a listing of flannel's table (`nft -j list table ip
    /// flannel-ipv4`, parsed): the metainfo and the handles nft adds are
    /// dropped, rules are put under their chains.
    pub fn from_listing(listing: Nftables<'static>) -> Result<Self, RulesError> {
        let bad = |what: String| RulesError::NftJson(what);
        let mut table: Option<Table<'static>> = None;
        let mut chains: Vec<NftChain> = Vec::new();
        let mut other = Vec::new();
        let mut rules: Vec<Rule<'static>> = Vec::new();
        for obj in listing.objects.into_owned() {
            let NfObject::ListObject(obj) = obj else {
                return Err(bad(format!("a command in a listing: {obj:?}")));
            };
            match obj {
                NfListObject::MetainfoObject(_) => {}
                NfListObject::Table(t) if table.is_none() => {
                    table = Some(Table { handle: None, ..t });
                }
                NfListObject::Chain(c) => chains.push(NftChain {
                    chain: Chain { handle: None, ..c },
                    rules: Vec::new(),
                }),
                NfListObject::Rule(r) => rules.push(Rule {
                    handle: None,
                    index: None,
                    ..r
                }),
                o => other.push(o),
            }
        }
        let table = table.ok_or_else(|| bad("no table in the listing".into()))?;
        for r in rules {
            let chain = chains
                .iter_mut()
                .find(|c| c.chain.name == r.chain)
                .ok_or_else(|| bad(format!("a rule in the undeclared chain {}", r.chain)))?;
            chain.rules.push(r);
        }
        Ok(Self {
            table,
            chains,
            other,
        })
    }
}

/// What nft holds of flannel's table of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftActual {
    /// No such table.
    Absent,
    /// The table, normalised.
    Listed(NftTable),
    /// The table exists but its listing is not understood (a foreign rule
    /// the `nftables` crate cannot type): it is replaced.
    Unreadable(RulesError),
}

/// What brings one family's table in line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftPlan {
    /// Nothing to do.
    InLine,
    /// Only rules differ: one JSON transaction ([`NftTable::rules_batch`]).
    Rules(Nftables<'static>),
    /// The table is missing, unreadable or its chains differ: replace the
    /// table and its chains ([`NftTable::skeleton_script`]), then add the
    /// rules. Two transactions, because the first must be nft syntax to
    /// carry the comments; between them the new chains are empty (accept,
    /// no NAT), which happens only when the structure itself was wrong.
    Rebuild {
        skeleton: String,
        rules: Nftables<'static>,
    },
    /// The table must go ([`nft_delete_batch`]).
    Delete(Nftables<'static>),
}

/// Compares desired and actual as typed values and says what to write.
pub fn nft_plan(family: IpFamily, desired: Option<&NftTable>, actual: &NftActual) -> NftPlan {
    match (desired, actual) {
        (None, NftActual::Absent) => NftPlan::InLine,
        (None, _) => NftPlan::Delete(nft_delete_batch(family)),
        (Some(want), NftActual::Listed(got)) if got == want => NftPlan::InLine,
        (Some(want), NftActual::Listed(got)) if got.same_skeleton(want) => {
            NftPlan::Rules(want.rules_batch())
        }
        (Some(want), _) => NftPlan::Rebuild {
            skeleton: want.skeleton_script(),
            rules: want.rules_batch(),
        },
    }
}

/// One `nft -j -f -` transaction that removes flannel's table of one
/// family; `add` first so that a missing table is not an error. Like
/// `nft add table ip flannel-ipv4; nft delete table ip flannel-ipv4`.
pub fn nft_delete_batch(family: IpFamily) -> Nftables<'static> {
    let (_, name) = nft_table(family);
    let table = Table {
        family: nft_family(family),
        name: name.into(),
        handle: None,
    };
    let mut b = Batch::new();
    b.add(NfListObject::Table(table.clone()));
    b.delete(NfListObject::Table(table));
    b.to_nftables()
}

/// Parses `nft -j list table FAMILY NAME` output into the normalised table.
///
/// nft lists a NAT statement's single flag as a string (`"flags":
/// "fully-random"`), which the `nftables` crate (0.6) only reads as a list;
/// such flags are put in a list first. That is the one fix-up of nft's JSON
/// done by hand; everything else is the crate's typed schema.
pub fn parse_nft_json(text: &str) -> Result<NftTable, RulesError> {
    let mut v: Value =
        serde_json::from_str(text).map_err(|e| RulesError::NftJson(e.to_string()))?;
    nat_flags_as_lists(&mut v);
    let listing: Nftables<'static> =
        serde_json::from_value(v).map_err(|e| RulesError::NftJson(e.to_string()))?;
    NftTable::from_listing(listing)
}

fn nat_flags_as_lists(v: &mut Value) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(nat_flags_as_lists),
        Value::Object(o) => {
            for (k, body) in o.iter_mut() {
                if matches!(k.as_str(), "masquerade" | "snat" | "dnat" | "redirect") {
                    if let Some(flags) = body.get_mut("flags").filter(|f| f.is_string()) {
                        *flags = Value::Array(vec![flags.take()]);
                    }
                }
                nat_flags_as_lists(body);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4() -> FamilyNets {
        FamilyNets::v4(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
        )
        .unwrap()
    }
    fn v6() -> FamilyNets {
        FamilyNets::v6(
            "fd00:10:244::/56".parse().unwrap(),
            "fd00:10:244:1::/64".parse().unwrap(),
        )
        .unwrap()
    }
    const ALL: RuleOptions = RuleOptions {
        masquerade: true,
        fully_random: true,
        forward: true,
    };

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

    #[test]
    fn iptables_save_garbage_is_an_error() {
        let e = parse_iptables_save("*nat\n-Z what\nCOMMIT\n").unwrap_err();
        assert!(matches!(e, RulesError::SaveOutput { line_no: 2, .. }));
        assert!(parse_iptables_save("-A X y\n").is_err());
    }

    #[test]
    fn nft_skeleton_golden() {
        let t = nft_desired(IpFamily::V4, Some(v4()), ALL).unwrap();
        assert_eq!(
            t.skeleton_script(),
            "add table ip flannel-ipv4
delete table ip flannel-ipv4
table ip flannel-ipv4 {
\tcomment \"rules for flannel-ipv4\"
\tchain postrtg {
\t\tcomment \"chain to manage traffic masquerading by flannel\"
\t\ttype nat hook postrouting priority 100; policy accept;
\t}
\tchain forward {
\t\tcomment \"chain to accept flannel traffic\"
\t\ttype filter hook forward priority 0; policy accept;
\t}
}
"
        );
    }

    /// What goes to `nft -j -f -`: the crate's serialisation of the typed rules.
    #[test]
    fn nft_rules_batch_json_golden() {
        let t = nft_desired(IpFamily::V4, Some(v4()), ALL).unwrap();
        let json = serde_json::to_string(&t.rules_batch()).unwrap();
        let c = r#""family":"ip","table":"flannel-ipv4""#;
        let p = |f: &str, addr: &str, len: u8| {
            format!(
                r#"{{"left":{{"payload":{{"protocol":"ip","field":"{f}"}}}},"right":{{"prefix":{{"addr":"{addr}","len":{len}}}}},"#
            )
        };
        let (net, pod, mc) = (("10.244.0.0", 16), ("10.244.1.0", 24), ("224.0.0.0", 4));
        let m = |f, op, (a, l): (&str, u8)| format!(r#"{{"match":{}"op":"{op}"}}}}"#, p(f, a, l));
        let rule = |chain: &str, stmts: Vec<String>| {
            format!(
                r#"{{"add":{{"rule":{{{c},"chain":"{chain}","expr":[{}]}}}}}}"#,
                stmts.join(",")
            )
        };
        let ret = r#"{"return":null}"#.to_string();
        let masq = r#"{"masquerade":{"flags":["fully-random"]}}"#.to_string();
        let acc = r#"{"accept":null}"#.to_string();
        let mark =
            r#"{"match":{"left":{"&":[{"meta":{"key":"mark"}},16384]},"right":16384,"op":"=="}}"#;
        let flush = |chain: &str, kind: &str, hook: &str, prio: u8| {
            format!(
                r#"{{"flush":{{"chain":{{{c},"name":"{chain}","type":"{kind}","hook":"{hook}","prio":{prio},"policy":"accept"}}}}}}"#
            )
        };
        let want = [
            flush("postrtg", "nat", "postrouting", 100),
            rule("postrtg", vec![mark.to_string(), ret.clone()]),
            rule(
                "postrtg",
                vec![m("saddr", "==", pod), m("daddr", "==", net), ret.clone()],
            ),
            rule(
                "postrtg",
                vec![m("saddr", "==", net), m("daddr", "==", pod), ret.clone()],
            ),
            rule(
                "postrtg",
                vec![m("saddr", "!=", net), m("daddr", "==", pod), ret.clone()],
            ),
            rule(
                "postrtg",
                vec![m("saddr", "==", net), m("daddr", "!=", mc), masq.clone()],
            ),
            rule(
                "postrtg",
                vec![m("saddr", "!=", net), m("daddr", "==", net), masq.clone()],
            ),
            flush("forward", "filter", "forward", 0),
            rule("forward", vec![m("saddr", "==", net), acc.clone()]),
            rule("forward", vec![m("daddr", "==", net), acc.clone()]),
        ];
        assert_eq!(json, format!(r#"{{"nftables":[{}]}}"#, want.join(",")));
    }

    #[test]
    fn nft_ipv6_fully_random_off_forward_off() {
        let opts = RuleOptions {
            masquerade: true,
            fully_random: false,
            forward: false,
        };
        let t = nft_desired(IpFamily::V6, Some(v6()), opts).unwrap();
        assert_eq!(t.chains.len(), 1);
        assert_eq!(t.table.family, NfFamily::IP6);
        let r = &t.chains[0].rules;
        let json = |i: usize| serde_json::to_string(&r[i].expr).unwrap();
        assert_eq!(
            json(3),
            r#"[{"match":{"left":{"payload":{"protocol":"ip6","field":"saddr"}},"right":{"prefix":{"addr":"fd00:10:244::","len":56}},"op":"!="}},{"match":{"left":{"payload":{"protocol":"ip6","field":"daddr"}},"right":{"prefix":{"addr":"fd00:10:244:1::","len":64}},"op":"=="}},{"return":null}]"#
        );
        assert_eq!(
            json(4),
            r#"[{"match":{"left":{"payload":{"protocol":"ip6","field":"saddr"}},"right":{"prefix":{"addr":"fd00:10:244::","len":56}},"op":"=="}},{"match":{"left":{"payload":{"protocol":"ip6","field":"daddr"}},"right":{"prefix":{"addr":"ff00::","len":8}},"op":"!="}},{"masquerade":null}]"#
        );
        assert!(t
            .skeleton_script()
            .contains("table ip6 flannel-ipv6 {\n\tcomment \"rules for flannel-ipv6\"\n"));
        assert_eq!(nft_desired(IpFamily::V6, None, ALL), None);
        assert_eq!(
            nft_desired(IpFamily::V4, Some(v4()), RuleOptions::default()),
            None
        );
        assert_eq!(
            serde_json::to_string(&nft_delete_batch(IpFamily::V6)).unwrap(),
            r#"{"nftables":[{"add":{"table":{"family":"ip6","name":"flannel-ipv6"}}},{"delete":{"table":{"family":"ip6","name":"flannel-ipv6"}}}]}"#
        );
    }

    #[test]
    fn nft_host_prefix_is_a_bare_address() {
        let n = FamilyNets::v4(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.7.1/32".parse().unwrap(),
        )
        .unwrap();
        let t = nft_desired(IpFamily::V4, Some(n), ALL).unwrap();
        let json = serde_json::to_string(&t.chains[0].rules[1].expr).unwrap();
        assert!(json.contains(r#""right":"10.244.7.1""#), "{json}");
    }

    /// `nft -j list table ip flannel-ipv4` as nft 1.0.6 prints the desired table.
    const NFT_JSON: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "ip", "name": "flannel-ipv4", "handle": 2}}, {"chain": {"family": "ip", "table": "flannel-ipv4", "name": "postrtg", "handle": 1, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}, {"chain": {"family": "ip", "table": "flannel-ipv4", "name": "forward", "handle": 2, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}, {"rule": {"family": "ip", "table": "flannel-ipv4", "chain": "postrtg", "handle": 3, "expr": [{"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 16384]}, "right": 16384}}, {"return": null}]}}, {"rule": {"family": "ip", "table": "flannel-ipv4", "chain": "postrtg", "handle": 4, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.244.1.0", "len": 24}}}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"return": null}]}}, {"rule": {"family": "ip", "table": "flannel-ipv4", "chain": "postrtg", "handle": 5, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "10.244.1.0", "len": 24}}}}, {"return": null}]}}, {"rule": {"family": "ip", "table": "flannel-ipv4", "chain": "postrtg", "handle": 6, "expr": [{"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "10.244.1.0", "len": 24}}}}, {"return": null}]}}, {"rule": {"family": "ip", "table": "flannel-ipv4", "chain": "postrtg", "handle": 7, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "224.0.0.0", "len": 4}}}}, {"masquerade": {"flags": "fully-random"}}]}}, {"rule": {"family": "ip", "table": "flannel-ipv4", "chain": "postrtg", "handle": 8, "expr": [{"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"masquerade": {"flags": "fully-random"}}]}}, {"rule": {"family": "ip", "table": "flannel-ipv4", "chain": "forward", "handle": 9, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"accept": null}]}}, {"rule": {"family": "ip", "table": "flannel-ipv4", "chain": "forward", "handle": 10, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"accept": null}]}}]}"#;

    fn listed(json: &str) -> NftActual {
        NftActual::Listed(parse_nft_json(json).unwrap())
    }

    #[test]
    fn nft_json_of_the_desired_table_compares_equal() {
        let want = nft_desired(IpFamily::V4, Some(v4()), ALL).unwrap();
        let got = parse_nft_json(NFT_JSON).unwrap();
        assert_eq!(got, want);
        assert_eq!(
            nft_plan(IpFamily::V4, Some(&want), &listed(NFT_JSON)),
            NftPlan::InLine
        );
        // Without fully-random the rules differ, the chains do not.
        let plain = nft_desired(
            IpFamily::V4,
            Some(v4()),
            RuleOptions {
                fully_random: false,
                ..ALL
            },
        )
        .unwrap();
        assert_eq!(
            nft_plan(IpFamily::V4, Some(&plain), &listed(NFT_JSON)),
            NftPlan::Rules(plain.rules_batch())
        );
        let plain_json = NFT_JSON.replace(r#"{"flags": "fully-random"}"#, "null");
        assert_eq!(parse_nft_json(&plain_json).unwrap(), plain);
    }

    #[test]
    fn nft_json_with_a_foreign_rule_or_upstreams_rule_4_differs_in_rules_only() {
        let want = nft_desired(IpFamily::V4, Some(v4()), ALL).unwrap();
        let foreign = NFT_JSON.replace(
            r#"{"return": null}]}}, {"rule": {"family": "ip", "table": "flannel-ipv4", "chain": "postrtg", "handle": 5"#,
            r#"{"counter": {"packets": 0, "bytes": 0}}, {"return": null}]}}, {"rule": {"family": "ip", "table": "flannel-ipv4", "chain": "postrtg", "handle": 5"#,
        );
        assert_ne!(foreign, NFT_JSON);
        assert_ne!(parse_nft_json(&foreign).unwrap(), want);
        assert_eq!(
            nft_plan(IpFamily::V4, Some(&want), &listed(&foreign)),
            NftPlan::Rules(want.rules_batch())
        );
        // Upstream's rule 4: saddr != POD, daddr NET.
        let upstream4 = NFT_JSON.replace(
            r#""handle": 6, "expr": [{"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "10.244.1.0", "len": 24}}}}"#,
            r#""handle": 6, "expr": [{"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.244.1.0", "len": 24}}}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}"#,
        );
        assert_ne!(upstream4, NFT_JSON);
        let got = parse_nft_json(&upstream4).unwrap();
        assert_eq!(got.chains[0].rules[2], want.chains[0].rules[2]);
        assert_ne!(got.chains[0].rules[3], want.chains[0].rules[3]);
        assert_eq!(
            nft_plan(IpFamily::V4, Some(&want), &NftActual::Listed(got)),
            NftPlan::Rules(want.rules_batch())
        );
    }

    #[test]
    fn nft_chains_differing_absent_or_unreadable_rebuild_the_table() {
        let want = nft_desired(IpFamily::V4, Some(v4()), ALL).unwrap();
        let rebuild = NftPlan::Rebuild {
            skeleton: want.skeleton_script(),
            rules: want.rules_batch(),
        };
        assert_eq!(
            nft_plan(IpFamily::V4, Some(&want), &NftActual::Absent),
            rebuild
        );
        let unreadable = NftActual::Unreadable(RulesError::NftJson("x".into()));
        assert_eq!(nft_plan(IpFamily::V4, Some(&want), &unreadable), rebuild);
        // The forward chain at another priority.
        let prio = NFT_JSON.replace(r#""prio": 0"#, r#""prio": 10"#);
        assert_eq!(nft_plan(IpFamily::V4, Some(&want), &listed(&prio)), rebuild);
        // No forward chain wanted: an extra chain.
        let masq_only = nft_desired(
            IpFamily::V4,
            Some(v4()),
            RuleOptions {
                forward: false,
                ..ALL
            },
        )
        .unwrap();
        assert!(matches!(
            nft_plan(IpFamily::V4, Some(&masq_only), &listed(NFT_JSON)),
            NftPlan::Rebuild { .. }
        ));
        // A set in our table.
        let set = NFT_JSON.replace(
            r#"{"chain": {"family": "ip", "table": "flannel-ipv4", "name": "postrtg""#,
            r#"{"set": {"family": "ip", "name": "s", "table": "flannel-ipv4", "type": "ipv4_addr", "handle": 11}}, {"chain": {"family": "ip", "table": "flannel-ipv4", "name": "postrtg""#,
        );
        assert_ne!(set, NFT_JSON);
        assert_eq!(parse_nft_json(&set).unwrap().other.len(), 1);
        assert_eq!(nft_plan(IpFamily::V4, Some(&want), &listed(&set)), rebuild);
        // Nothing wanted.
        assert_eq!(
            nft_plan(IpFamily::V4, None, &listed(NFT_JSON)),
            NftPlan::Delete(nft_delete_batch(IpFamily::V4))
        );
        assert_eq!(
            nft_plan(IpFamily::V4, None, &unreadable),
            NftPlan::Delete(nft_delete_batch(IpFamily::V4))
        );
        assert_eq!(
            nft_plan(IpFamily::V4, None, &NftActual::Absent),
            NftPlan::InLine
        );
    }

    #[test]
    fn nft_json_garbage_is_an_error() {
        assert!(parse_nft_json("not json").is_err());
        assert!(parse_nft_json("{}").is_err());
        // No table.
        assert!(parse_nft_json(r#"{"nftables": []}"#).is_err());
        // A rule of a chain not listed.
        let orphan = NFT_JSON.replace(
            r#""chain": "forward", "handle": 9"#,
            r#""chain": "gone", "handle": 9"#,
        );
        assert!(
            matches!(parse_nft_json(&orphan), Err(RulesError::NftJson(e)) if e.contains("gone"))
        );
        // A statement the crate has no type for.
        let unknown = NFT_JSON.replace(r#"{"accept": null}"#, r#"{"no-such-statement": 1}"#);
        assert!(parse_nft_json(&unknown).is_err());
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
