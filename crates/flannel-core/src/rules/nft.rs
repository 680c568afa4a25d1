//! The nftables mode of the rules (net-conf.json `EnableNFTables`), behind
//! the crate feature `nft`: flannel's table of one family as typed values
//! of nft's JSON schema (the `nftables` crate) in the form nft lists them;
//! [`parse_nft_json`] types `nft -j list table` output and drops what nft
//! adds (handles), so an unchanged table compares equal, and [`nft_plan`]
//! says what to write. Rule order and operands are those of the parent
//! module's documentation.

use std::collections::HashSet;
use std::fmt::Write as _;

use ipnet::IpNet;
use nftables::batch::Batch;
use nftables::expr::{
    BinaryOperation, Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Payload,
    PayloadField, Prefix,
};
use nftables::schema::{Chain, FlushObject, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Match, NATFlag, Operator, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde_json::Value;

use super::{multicast, FamilyNets, RuleOptions, RulesError};
use crate::lease::IpFamily;
use crate::wire;

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
/// `raw`: the priority of the raw table, before conntrack.
const NFT_RAW: i32 = -300;

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
    if let Some(port) = options.guard_port() {
        let c = wire::NFT_ENCAP_CHAIN;
        let net = n.network;
        // `udp dport PORT`, `fib daddr type local`: as nft lists them.
        let dport = || {
            Statement::Match(Match {
                left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(
                    PayloadField {
                        protocol: "udp".into(),
                        field: "dport".into(),
                    },
                ))),
                right: Expression::Number(port.into()),
                op: eq,
            })
        };
        let local = Statement::Match(Match {
            left: Expression::Named(NamedExpression::Fib(Fib {
                result: FibResult::Type,
                flags: HashSet::from([FibFlag::Daddr]),
            })),
            right: Expression::String("local".into()),
            op: eq,
        });
        let drop = || Statement::Drop(None);
        chains.push(NftChain {
            chain: base_chain(c, NfChainType::Filter, NfHook::Prerouting, NFT_RAW),
            rules: vec![
                rule(c, vec![saddr(eq, net), dport(), local, drop()]),
                rule(c, vec![saddr(eq, net), daddr(ne, net), dport(), drop()]),
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
        n if n == wire::NFT_ENCAP_CHAIN => Some(wire::NFT_ENCAP_CHAIN_COMMENT),
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
    use crate::rules::tests::{v4, v6, ALL};

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
            encap_port: None,
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

    /// The encapsulation guard as nft 1.0.6 lists it (captured from a real
    /// `nft -j list table`) compares equal to the desired chain.
    #[test]
    fn nft_encap_guard_listing_compares_equal() {
        let chain = r#"{"chain": {"family": "ip", "table": "flannel-ipv4", "name": "encap", "handle": 3, "type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"}}, "#;
        let rules = r#", {"rule": {"family": "ip", "table": "flannel-ipv4", "chain": "encap", "handle": 20, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 8472}}, {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}}, {"drop": null}]}}, {"rule": {"family": "ip", "table": "flannel-ipv4", "chain": "encap", "handle": 21, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}}, {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 8472}}, {"drop": null}]}}"#;
        let after_forward = r#""hook": "forward", "prio": 0, "policy": "accept"}}, "#;
        let at = NFT_JSON.find(after_forward).unwrap() + after_forward.len();
        let end = NFT_JSON.rfind("]}").unwrap();
        let json = format!(
            "{}{chain}{}{rules}{}",
            &NFT_JSON[..at],
            &NFT_JSON[at..end],
            &NFT_JSON[end..]
        );
        let opts = RuleOptions {
            encap_port: Some(8472),
            ..ALL
        };
        let want = nft_desired(IpFamily::V4, Some(v4()), opts).unwrap();
        assert_eq!(parse_nft_json(&json).unwrap(), want);
        assert!(want
            .skeleton_script()
            .contains("chain encap {\n\t\tcomment \"chain to drop pod traffic to flannel's encapsulation port\"\n\t\ttype filter hook prerouting priority -300; policy accept;"));
        // Without it (host-gw), the table is the one without the chain.
        assert_ne!(
            parse_nft_json(&json).unwrap(),
            nft_desired(IpFamily::V4, Some(v4()), ALL).unwrap()
        );
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
}
