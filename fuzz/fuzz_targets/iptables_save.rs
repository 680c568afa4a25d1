//! `iptables-save` output (`flannel_core::rules::parse_iptables_save`) and
//! the `iptables-restore --noflush` plan computed from it (`iptables_plan`).
//!
//! Asserts:
//! - round trip: the parsed tables, written back as iptables-save text,
//!   parse to the same tables;
//! - convergence: for every desired flannel chain (wanted with the rules of
//!   a v4 and a v6 cluster, and not wanted), the plan applied to a model of
//!   the kernel's tables with iptables-restore's semantics (a declared chain
//!   is flushed, -D needs the exact rule, -X needs an empty chain that no
//!   rule jumps to, any failure fails the whole transaction) succeeds, and
//!   planning again on the result has nothing left to do.
#![no_main]

use std::collections::BTreeMap;

use flannel_core::lease::IpFamily;
use flannel_core::rules::{
    iptables_desired, iptables_plan, parse_iptables_save, FamilyNets, IptTable, RuleOptions,
};
use libfuzzer_sys::fuzz_target;

fn render(tables: &BTreeMap<String, IptTable>) -> String {
    let mut s = String::new();
    for (name, t) in tables {
        s.push_str(&format!("*{name}\n"));
        for c in t.chains.keys() {
            s.push_str(&format!(":{c} - [0:0]\n"));
        }
        for (c, rules) in &t.chains {
            for r in rules {
                if r.is_empty() {
                    s.push_str(&format!("-A {c}\n"));
                } else {
                    s.push_str(&format!("-A {c} {r}\n"));
                }
            }
        }
        s.push_str("COMMIT\n");
    }
    s
}

const BUILTIN: &[&str] = &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// Whether `spec` sends packets to `chain` (its target, printed last).
fn targets(spec: &str, chain: &str) -> bool {
    let w: Vec<&str> = spec.split_ascii_whitespace().collect();
    w.len() >= 2 && matches!(w[w.len() - 2], "-j" | "-g") && w[w.len() - 1] == chain
}

/// `iptables-restore --noflush` of `lines` on `t`: all or nothing.
fn restore(t: &IptTable, lines: &[String]) -> Result<IptTable, String> {
    let mut t = t.clone();
    for l in lines {
        if let Some(decl) = l.strip_prefix(':') {
            let name = decl
                .split_ascii_whitespace()
                .next()
                .ok_or("empty declaration")?;
            t.chains.insert(name.to_string(), Vec::new());
            continue;
        }
        let (verb, rest) = l.split_once(' ').ok_or(format!("{l}: no verb"))?;
        let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
        let rules = t
            .chains
            .get_mut(chain)
            .ok_or(format!("{l}: no chain {chain}"))?;
        match verb {
            "-A" => rules.push(spec.to_string()),
            "-D" => {
                let i = rules
                    .iter()
                    .position(|r| r == spec)
                    .ok_or(format!("{l}: no such rule"))?;
                rules.remove(i);
            }
            "-F" => rules.clear(),
            "-X" => {
                if !rules.is_empty() || BUILTIN.contains(&chain) {
                    return Err(format!("{l}: chain not empty or built in"));
                }
                if t.chains.values().flatten().any(|r| targets(r, chain)) {
                    return Err(format!("{l}: chain still referenced"));
                }
                t.chains.remove(chain);
            }
            _ => return Err(format!("{l}: unknown verb")),
        }
    }
    Ok(t)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(tables) = parse_iptables_save(text) else {
        return;
    };
    let again = render(&tables);
    assert_eq!(
        parse_iptables_save(&again).as_ref(),
        Ok(&tables),
        "{text:?}\n-> {again:?}"
    );

    let options = RuleOptions {
        masquerade: true,
        fully_random: true,
        forward: true,
        encap_port: Some(8472),
    };
    let v4 = FamilyNets::v4(
        "10.244.0.0/16".parse().unwrap(),
        "10.244.1.0/24".parse().unwrap(),
    )
    .unwrap();
    let v6 = FamilyNets::v6(
        "fd00:10:244::/56".parse().unwrap(),
        "fd00:10:244:1::/64".parse().unwrap(),
    )
    .unwrap();
    let wanted = [
        iptables_desired(IpFamily::V4, Some(v4), options),
        iptables_desired(IpFamily::V6, Some(v6), options),
        iptables_desired(IpFamily::V4, None, options),
    ];
    for d in wanted.iter().flatten() {
        let mut kernel = tables.get(d.id.table).cloned().unwrap_or_default();
        // The kernel always has its built-in chains.
        kernel.chains.entry(d.id.from.to_string()).or_default();
        let Some(lines) = iptables_plan(d, Some(&kernel)) else {
            continue;
        };
        let after = restore(&kernel, &lines)
            .unwrap_or_else(|e| panic!("{text:?}: the plan {lines:?} fails: {e}"));
        assert_eq!(
            iptables_plan(d, Some(&after)),
            None,
            "{text:?}: {lines:?} does not converge"
        );
    }
});
