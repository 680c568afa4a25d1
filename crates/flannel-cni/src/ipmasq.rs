//! The bridge plugin's `ipMasq`: when flanneld runs without `--ip-masq`
//! (`FLANNEL_IPMASQ=false`), each pod address gets a masquerade chain in the
//! nat table, as the reference bridge plugin writes it (iptables backend), so
//! that a pod created by one plugin is cleaned up by the other:
//!
//! ```text
//! -A POSTROUTING -s <pod ip>/32 -m comment --comment "name: \"<net>\" id: \"<cid>\"" -j CNI-<hash>
//! -A CNI-<hash> -d <pod subnet> -m comment --comment "..." -j ACCEPT
//! -A CNI-<hash> ! -d 224.0.0.0/4 -m comment --comment "..." -j MASQUERADE      (IPv6: ff00::/8)
//! ```
//!
//! `<hash>` is the first 24 hex digits of SHA-512(network name + container
//! ID). Written with one `iptables-restore --noflush` per family (only what
//! is missing: a repeated ADD adds nothing), read with `iptables-save -t
//! nat`. DEL finds the POSTROUTING jumps by their comment, so it also removes
//! what the reference plugin wrote.

use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use flannel_core::rules::{iptables_restore_input, parse_iptables_save, IptTable};
use ipnet::IpNet;

use crate::spec::{code, CniError};

/// Why the masquerade rules could not be written or removed.
#[derive(Debug, thiserror::Error)]
pub enum IpMasqError {
    #[error("ipMasq: running `{cmd}`: {source}; install iptables, or run flanneld with --ip-masq so that the plugin need not masquerade")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ipMasq: `{cmd}` failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("ipMasq: {what} {value:?} may only hold letters, digits, '_', '.' and '-' to be used in an iptables comment")]
    BadName { what: &'static str, value: String },
    #[error("ipMasq: {0}")]
    Parse(#[from] flannel_core::rules::RulesError),
}

impl From<IpMasqError> for CniError {
    fn from(e: IpMasqError) -> Self {
        CniError::new(code::KERNEL_FAILURE, e.to_string())
    }
}

fn run(cmd: &str, args: &[&str], stdin: &[u8]) -> Result<Vec<u8>, IpMasqError> {
    let line = format!("{cmd} {}", args.join(" "));
    let spawn = |source| IpMasqError::Spawn {
        cmd: line.clone(),
        source,
    };
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let Some(mut pipe) = child.stdin.take() {
        // A failed write shows up as the command's failure.
        let _ = pipe.write_all(stdin);
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if !out.status.success() {
        return Err(IpMasqError::Failed {
            cmd: line,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

fn check_name(what: &'static str, value: &str) -> Result<(), IpMasqError> {
    let ok = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(IpMasqError::BadName {
            what,
            value: value.to_string(),
        })
    }
}

/// `CNI-` and the first 24 hex digits of SHA-512(network + container ID),
/// the reference plugins' chain name.
pub fn chain_name(network: &str, container_id: &str) -> String {
    use sha2::{Digest, Sha512};
    let digest = Sha512::new()
        .chain_update(network.as_bytes())
        .chain_update(container_id.as_bytes())
        .finalize();
    let mut name = String::from("CNI-");
    for b in &digest[..12] {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

/// The rule comment, `name: "<network>" id: "<container ID>"`, quoted as
/// `iptables-save` prints it (names are checked to need no other escaping).
fn comment_arg(network: &str, container_id: &str) -> String {
    format!("\"name: \\\"{network}\\\" id: \\\"{container_id}\\\"\"")
}

/// One address's rules, as `iptables-save` prints them: (chain rules, the POSTROUTING jump).
fn address_rules(chain: &str, comment: &str, addr: IpNet) -> (Vec<String>, String) {
    let c = format!("-m comment --comment {comment}");
    let multicast = match addr {
        IpNet::V4(_) => "224.0.0.0/4",
        IpNet::V6(_) => "ff00::/8",
    };
    let host = IpNet::from(addr.addr());
    (
        vec![
            format!("-d {} {c} -j ACCEPT", addr.trunc()),
            format!("! -d {multicast} {c} -j MASQUERADE"),
        ],
        format!("-s {host} {c} -j {chain}"),
    )
}

/// The restore lines that add what is missing for `addrs` (one family).
fn setup_lines(chain: &str, comment: &str, addrs: &[IpNet], nat: Option<&IptTable>) -> Vec<String> {
    let existing = nat.and_then(|t| t.chains.get(chain));
    let post = nat.and_then(|t| t.chains.get("POSTROUTING"));
    let mut lines = Vec::new();
    if existing.is_none() {
        lines.push(format!(":{chain} - [0:0]"));
    }
    let mut chain_rules: Vec<String> = existing.cloned().unwrap_or_default();
    let mut jumps: Vec<String> = post.cloned().unwrap_or_default();
    for a in addrs {
        let (rules, jump) = address_rules(chain, comment, *a);
        for r in rules {
            if !chain_rules.contains(&r) {
                lines.push(format!("-A {chain} {r}"));
                chain_rules.push(r);
            }
        }
        if !jumps.contains(&jump) {
            lines.push(format!("-A POSTROUTING {jump}"));
            jumps.push(jump);
        }
    }
    lines
}

/// The restore lines that remove a container's jumps (found by comment) and chain.
fn teardown_lines(chain: &str, comment: &str, nat: Option<&IptTable>) -> Vec<String> {
    let Some(nat) = nat else {
        return Vec::new();
    };
    let marker = format!("--comment {comment} ");
    let mut lines: Vec<String> = nat
        .chains
        .get("POSTROUTING")
        .into_iter()
        .flatten()
        .filter(|r| r.contains(&marker) && r.contains(" -j CNI-"))
        .map(|r| format!("-D POSTROUTING {r}"))
        .collect();
    if nat.chains.contains_key(chain) {
        lines.push(format!("-F {chain}"));
        lines.push(format!("-X {chain}"));
    }
    lines
}

fn tools(v6: bool) -> (&'static str, &'static str) {
    if v6 {
        ("ip6tables-save", "ip6tables-restore")
    } else {
        ("iptables-save", "iptables-restore")
    }
}

fn read_nat(save: &str) -> Result<Option<IptTable>, IpMasqError> {
    let out = run(save, &["-t", "nat"], b"")?;
    Ok(parse_iptables_save(&String::from_utf8_lossy(&out))?.remove("nat"))
}

/// Masquerades traffic from `addrs` leaving their subnets (ADD; idempotent).
/// Like the reference plugin's iptables backend.
pub fn setup(network: &str, container_id: &str, addrs: &[IpNet]) -> Result<(), IpMasqError> {
    check_name("network name", network)?;
    check_name("container ID", container_id)?;
    let chain = chain_name(network, container_id);
    let comment = comment_arg(network, container_id);
    for v6 in [false, true] {
        let fam: Vec<IpNet> = addrs
            .iter()
            .copied()
            .filter(|a| matches!(a.addr(), IpAddr::V6(_)) == v6)
            .collect();
        if fam.is_empty() {
            continue;
        }
        let (save, restore) = tools(v6);
        let lines = setup_lines(&chain, &comment, &fam, read_nat(save)?.as_ref());
        if !lines.is_empty() {
            run(
                restore,
                &["--noflush", "--wait=5"],
                iptables_restore_input("nat", &lines).as_bytes(),
            )?;
        }
    }
    Ok(())
}

/// Removes a container's masquerade chain and jumps in both families (DEL).
/// A family whose tools are missing has nothing to remove.
pub fn teardown(network: &str, container_id: &str) -> Result<(), IpMasqError> {
    check_name("network name", network)?;
    check_name("container ID", container_id)?;
    let chain = chain_name(network, container_id);
    let comment = comment_arg(network, container_id);
    let mut failures = Vec::new();
    for v6 in [false, true] {
        let (save, restore) = tools(v6);
        let nat = match read_nat(save) {
            Ok(n) => n,
            Err(IpMasqError::Spawn { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                continue
            }
            Err(e) => {
                failures.push(e.to_string());
                continue;
            }
        };
        let lines = teardown_lines(&chain, &comment, nat.as_ref());
        if !lines.is_empty() {
            if let Err(e) = run(
                restore,
                &["--noflush", "--wait=5"],
                iptables_restore_input("nat", &lines).as_bytes(),
            ) {
                failures.push(e.to_string());
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(IpMasqError::Failed {
            cmd: "removing the masquerade rules".into(),
            stderr: failures.join("; "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAIN: &str = "CNI-0123456789abcdef01234567";

    #[test]
    fn chain_name_is_the_reference_plugins() {
        // `printf cbr0abc123 | sha512sum | cut -c1-24`
        assert_eq!(chain_name("cbr0", "abc123"), "CNI-3e9a3d0f9583cdc0e7133af3");
    }

    #[test]
    fn rules_as_iptables_save_prints_them() {
        let c = comment_arg("cbr0", "abc");
        assert_eq!(c, r#""name: \"cbr0\" id: \"abc\"""#);
        let (rules, jump) = address_rules(CHAIN, &c, "10.244.1.7/24".parse().unwrap());
        assert_eq!(
            rules,
            [
                format!("-d 10.244.1.0/24 -m comment --comment {c} -j ACCEPT"),
                format!("! -d 224.0.0.0/4 -m comment --comment {c} -j MASQUERADE"),
            ]
        );
        assert_eq!(
            jump,
            format!("-s 10.244.1.7/32 -m comment --comment {c} -j {CHAIN}")
        );
        let (rules, jump) = address_rules(CHAIN, &c, "fd00:10:244:1::7/64".parse().unwrap());
        assert!(rules[0].starts_with("-d fd00:10:244:1::/64 "));
        assert!(rules[1].starts_with("! -d ff00::/8 "));
        assert!(jump.starts_with("-s fd00:10:244:1::7/128 "));
    }

    #[test]
    fn setup_adds_only_what_is_missing() {
        let c = comment_arg("cbr0", "abc");
        let a: IpNet = "10.244.1.7/24".parse().unwrap();
        let fresh = setup_lines(CHAIN, &c, &[a], None);
        assert_eq!(fresh.len(), 4);
        assert_eq!(fresh[0], format!(":{CHAIN} - [0:0]"));
        assert!(fresh[3].starts_with("-A POSTROUTING -s 10.244.1.7/32"));
        // After that restore, iptables-save shows everything: nothing more to add.
        let save = format!(
            "*nat\n:POSTROUTING ACCEPT [0:0]\n:{CHAIN} - [0:0]\n{}\nCOMMIT\n",
            fresh[1..].join("\n")
        );
        let t = parse_iptables_save(&save).unwrap();
        assert!(setup_lines(CHAIN, &c, &[a], t.get("nat")).is_empty());
        // Teardown removes the jump and the chain; another container's jump stays.
        let other = comment_arg("cbr0", "zzz");
        let save2 = save.replace(
            "COMMIT",
            &format!(
                "-A POSTROUTING -s 10.244.1.8/32 -m comment --comment {other} -j CNI-ffff\nCOMMIT"
            ),
        );
        let t = parse_iptables_save(&save2).unwrap();
        assert_eq!(
            teardown_lines(CHAIN, &c, t.get("nat")),
            [
                format!("-D POSTROUTING -s 10.244.1.7/32 -m comment --comment {c} -j {CHAIN}"),
                format!("-F {CHAIN}"),
                format!("-X {CHAIN}"),
            ]
        );
        assert!(teardown_lines(CHAIN, &c, None).is_empty());
    }

    #[test]
    fn names_that_would_need_escaping_are_refused() {
        assert!(check_name("container ID", "abc-1_2.3").is_ok());
        let e = check_name("container ID", "a\"b").unwrap_err();
        assert!(e.to_string().contains("container ID"));
    }
}
