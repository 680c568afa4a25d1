//! Keeps the masquerade (`--ip-masq`) and forward (`--iptables-forward-rules`)
//! rules, and with either of them the encapsulation guard (pods' datagrams
//! to the vxlan or udp port dropped, see [`flannel_core::rules`]), in line,
//! level-triggered: every `--iptables-resync` seconds the
//! rules are read back (`iptables-save` / `nft -j list table`), compared with
//! the desired set of [`flannel_core::rules`], and rewritten only when they
//! differ. A deleted rule comes back, a rule inserted among ours makes the
//! whole chain (nftables: the whole table) be rewritten in order, and a new
//! network or subnet replaces the old rules.
//!
//! At start the mode not in use is removed completely (nftables mode removes
//! the FLANNEL-POSTRTG/FLANNEL-FWD chains and their jumps from nat/filter of
//! iptables and ip6tables; iptables mode deletes the flannel-ipv4/ipv6
//! tables), and so is a family or chain no longer wanted. At shutdown the
//! rules of the mode in use are removed, as upstream does.
//!
//! iptables has no kernel API worth driving directly (its rule blobs are
//! private to the iptables binaries, and iptables-nft encodes rules as nft
//! expressions); `iptables-restore --noflush` gives one atomic transaction
//! per table. nftables is read with `nft -j list table` and written with
//! `nft -j -f -` (one transaction) through the `nftables` crate's typed
//! schema and helpers; only a table's skeleton with its comments goes
//! through `nft -f -` in nft's syntax (see [`rules::NftTable::skeleton_script`]).
//! All of it runs in the daemon's own network namespace.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use flannel_core::config::{BackendConfig, NetConfig};
use flannel_core::lease::{IpFamily, LeaseKey};
use flannel_core::rules::{self, FamilyNets, Mode, RuleOptions, RulesError, RulesInput, FAMILIES};
use flannel_core::wire;
use nftables::helper as nft_helper;
use nftables::schema::{NfListObject, NfObject, Nftables};

use crate::flags::Flags;
use crate::health::RulesMetrics;

/// A failure to read or write rules.
#[derive(Debug, thiserror::Error)]
pub enum RulesIoError {
    #[error("running `{cmd}`: {source}; {}", spawn_hint(.source))]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// nft ran but failed; the crate's error keeps nft's output in fields,
    /// shown here.
    #[error("`{cmd}` failed: {}", nft_detail(.source))]
    Nft {
        cmd: String,
        #[source]
        source: nft_helper::NftablesError,
    },
    #[error(transparent)]
    Parse(#[from] RulesError),
}

/// What to do about a command that could not be started: only a missing
/// binary is about installing iptables / nftables; running out of file
/// descriptors, processes or memory is about flanneld or the node.
fn spawn_hint(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EMFILE) => {
            let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map(|(soft, _)| soft.to_string())
                .unwrap_or_else(|_| "?".into());
            format!("flanneld has run out of file descriptors (open files limit {limit}), which has nothing to do with iptables; see what holds them (ls -l /proc/<flanneld pid>/fd) and raise the limit (systemd: LimitNOFILE=)")
        }
        Some(libc::ENFILE) => "the system has run out of file descriptors (fs.file-max), which has nothing to do with iptables; find what holds them".into(),
        Some(libc::EAGAIN) | Some(libc::ENOMEM) => "the node is out of processes or memory; the next pass retries".into(),
        _ if e.kind() == std::io::ErrorKind::NotFound => "install it (Debian: iptables / nftables) or run flanneld without --ip-masq and with --iptables-forward-rules=false".into(),
        _ if e.kind() == std::io::ErrorKind::PermissionDenied => "check the permissions of the binary and that flanneld runs as root".into(),
        _ => "the next pass retries".into(),
    }
}

fn nft_detail(e: &nft_helper::NftablesError) -> String {
    match e {
        nft_helper::NftablesError::NftFailed { stdout, stderr, .. } => {
            let out = format!("{} {}", stderr.trim(), stdout.trim());
            if out.trim().is_empty() {
                e.to_string()
            } else {
                format!("{e}: {}", out.trim())
            }
        }
        other => other.to_string(),
    }
}

/// The desired rules of this node from the flags, the config and our lease.
/// A family is included when the config enables it and the lease has a
/// subnet in it.
pub fn input_from(flags: &Flags, cfg: &NetConfig, own: &LeaseKey) -> RulesInput {
    let v4 = match (cfg.enable_ipv4, cfg.network, own.ipv4) {
        (true, Some(net), Some(sub)) => keep(FamilyNets::v4(net, sub)),
        _ => None,
    };
    let v6 = match (cfg.enable_ipv6, cfg.ipv6_network, own.ipv6) {
        (true, Some(net), Some(sub)) => keep(FamilyNets::v6(net, sub)),
        _ => None,
    };
    RulesInput {
        mode: if cfg.enable_nftables {
            Mode::Nftables
        } else {
            Mode::Iptables
        },
        v4,
        v6,
        options: RuleOptions {
            masquerade: flags.ip_masq,
            fully_random: !flags.ip_masq_fully_random_disable,
            forward: flags.iptables_forward_rules,
            encap_port: encap_port(&cfg.backend),
        },
    }
}

/// The UDP port the backend encapsulates in, for the encapsulation guard:
/// vxlan's `Port` (0: the kernel's 8472), udp's `Port`; none for host-gw,
/// and none for wireguard, whose datagrams a pod cannot forge (each is
/// authenticated with the peers' keys, and one that is not is dropped).
pub fn encap_port(backend: &BackendConfig) -> Option<u16> {
    match backend {
        BackendConfig::Vxlan(v) if v.port == 0 => Some(wire::VXLAN_DEFAULT_PORT),
        BackendConfig::Vxlan(v) => Some(v.port),
        BackendConfig::Udp(u) => Some(u.port),
        BackendConfig::HostGw | BackendConfig::Wireguard(_) => None,
    }
}

fn keep(r: Result<FamilyNets, RulesError>) -> Option<FamilyNets> {
    r.map_err(|e| tracing::error!(error = %e, "no masquerade/forward rules for this family"))
        .ok()
}

/// What a pass changed: one line per rewritten chain or table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub changed: Vec<String>,
}

fn ipt_bins(f: IpFamily) -> (&'static str, &'static str) {
    match f {
        IpFamily::V4 => ("iptables-save", "iptables-restore"),
        IpFamily::V6 => ("ip6tables-save", "ip6tables-restore"),
    }
}

/// Runs a command with `stdin`; `Ok(stdout)` on exit 0.
fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<String, RulesIoError> {
    let line = format!("{cmd} {}", args.join(" "));
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RulesIoError::Spawn {
            cmd: line.clone(),
            source,
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error shows up as the command's failure below.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| RulesIoError::Spawn {
            cmd: line.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(RulesIoError::Failed {
            cmd: line,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Brings one family's iptables chains in line with `desired` (chains with
/// `rules: None` are removed). `ip6tables` for IPv6. Like
/// `iptables-save | <compare> | iptables-restore --noflush --wait=5`
/// (`--wait`: legacy iptables serialises writers with the xtables lock,
/// which kube-proxy holds at times).
pub fn sync_iptables_family(
    family: IpFamily,
    desired: &[rules::IptDesired],
) -> Result<SyncReport, RulesIoError> {
    let (save, restore) = ipt_bins(family);
    let tables = rules::parse_iptables_save(&run(save, &[], None)?)?;
    let mut input = String::new();
    let mut report = SyncReport::default();
    for d in desired {
        if let Some(lines) = rules::iptables_plan(d, tables.get(d.id.table)) {
            let what = if d.rules.is_some() {
                "rewritten"
            } else {
                "removed"
            };
            report
                .changed
                .push(format!("{save} -t {}: {} {what}", d.id.table, d.id.chain));
            input.push_str(&rules::iptables_restore_input(d.id.table, &lines));
        }
    }
    if !input.is_empty() {
        run(restore, &["--noflush", "--wait=5"], Some(&input))?;
    }
    Ok(report)
}

/// Reads flannel's nftables table of one family, like `nft -j list table ip
/// flannel-ipv4`, typed and normalised. A table whose listing cannot be
/// typed (a foreign rule the `nftables` crate does not know) is
/// [`rules::NftActual::Unreadable`], to be replaced, not an error.
pub fn read_nft_table(family: IpFamily) -> Result<rules::NftActual, RulesIoError> {
    let (fam, name) = rules::nft_table(family);
    // Listing the tables first tells "absent" from a failure without parsing nft's error text.
    let tables =
        nft_helper::get_current_ruleset_with_args(nft_helper::DEFAULT_NFT, ["list", "tables", fam])
            .map_err(|e| nft_error(format!("nft -j list tables {fam}"), e))?;
    let exists = tables
        .objects
        .iter()
        .any(|o| matches!(o, NfObject::ListObject(NfListObject::Table(t)) if t.name == name));
    if !exists {
        return Ok(rules::NftActual::Absent);
    }
    // The raw text, not get_current_ruleset_with_args: parse_nft_json first
    // fixes up nft's single NAT flag, which the crate cannot read as it is.
    let json =
        nft_helper::get_current_ruleset_raw(nft_helper::DEFAULT_NFT, ["list", "table", fam, name])
            .map_err(|e| nft_error(format!("nft -j list table {fam} {name}"), e))?;
    Ok(match rules::parse_nft_json(&json) {
        Ok(t) => rules::NftActual::Listed(t),
        Err(e) => rules::NftActual::Unreadable(e),
    })
}

fn nft_error(cmd: String, e: nft_helper::NftablesError) -> RulesIoError {
    match e {
        nft_helper::NftablesError::NftExecution { inner, .. } => {
            RulesIoError::Spawn { cmd, source: inner }
        }
        other => RulesIoError::Nft { cmd, source: other },
    }
}

/// `nft -j -f -` of one transaction, through the `nftables` crate.
fn apply_nft(what: &str, batch: &Nftables<'_>) -> Result<(), RulesIoError> {
    nft_helper::apply_ruleset(batch).map_err(|e| nft_error(format!("nft -j -f - ({what})"), e))
}

/// Brings one family's nftables table in line (`None`: delete it).
pub fn sync_nft_family(
    family: IpFamily,
    desired: Option<&rules::NftTable>,
) -> Result<SyncReport, RulesIoError> {
    let actual = read_nft_table(family)?;
    let (fam, name) = rules::nft_table(family);
    let mut report = SyncReport::default();
    if let rules::NftActual::Unreadable(e) = &actual {
        tracing::info!(error = %e, "nft table {fam} {name} not understood; replacing it");
    }
    match rules::nft_plan(family, desired, &actual) {
        rules::NftPlan::InLine => {}
        rules::NftPlan::Rules(batch) => {
            apply_nft("flannel's rules", &batch)?;
            report
                .changed
                .push(format!("nft table {fam} {name}: rules rewritten"));
        }
        rules::NftPlan::Rebuild { skeleton, rules } => {
            run("nft", &["-f", "-"], Some(&skeleton))?;
            apply_nft("flannel's rules", &rules)?;
            report
                .changed
                .push(format!("nft table {fam} {name} rewritten"));
        }
        rules::NftPlan::Delete(batch) => {
            apply_nft("deleting flannel's table", &batch)?;
            report
                .changed
                .push(format!("nft table {fam} {name} removed"));
        }
    }
    Ok(report)
}

/// One level-triggered pass over the families in `families` for the mode
/// of `input`. Errors are collected; every family is tried.
pub fn sync(input: &RulesInput, families: &[IpFamily]) -> (SyncReport, Vec<RulesIoError>) {
    let mut report = SyncReport::default();
    let mut errors = Vec::new();
    for &f in families {
        let nets = input.nets(f);
        let r = match input.mode {
            Mode::Iptables => {
                sync_iptables_family(f, &rules::iptables_desired(f, nets, input.options))
            }
            Mode::Nftables => {
                sync_nft_family(f, rules::nft_desired(f, nets, input.options).as_ref())
            }
        };
        match r {
            Ok(r) => report.changed.extend(r.changed),
            Err(e) => errors.push(e),
        }
    }
    (report, errors)
}

/// Removes everything flannel has in one mode, both families
/// (iptables: chains FLANNEL-POSTRTG in nat, FLANNEL-FWD in filter and
/// FLANNEL-ENCAP in raw with their jumps; nftables: tables flannel-ipv4
/// and flannel-ipv6).
pub fn remove_mode(mode: Mode) -> (SyncReport, Vec<RulesIoError>) {
    let nothing = RulesInput {
        mode,
        v4: None,
        v6: None,
        options: RuleOptions::default(),
    };
    sync(&nothing, &FAMILIES)
}

fn other(mode: Mode) -> Mode {
    match mode {
        Mode::Iptables => Mode::Nftables,
        Mode::Nftables => Mode::Iptables,
    }
}

/// Logs what a pass changed, and its errors: at error level when they
/// differ from the previous pass's, at debug level when they repeat (a
/// missing `iptables` binary is reported once, not every few seconds).
#[derive(Default)]
struct PassLog {
    last_errors: Vec<String>,
}

impl PassLog {
    fn log(&mut self, what: &str, report: &SyncReport, errors: &[RulesIoError]) {
        for c in &report.changed {
            tracing::info!("{what}: {c}");
        }
        let texts: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        let repeated = texts == self.last_errors;
        for e in &texts {
            if repeated {
                tracing::debug!(error = %e, "{what} (still failing)");
            } else {
                tracing::error!(error = %e, "{what}");
            }
        }
        self.last_errors = texts;
    }
}

/// Leftovers of what is not in use; the tools may well be missing then
/// (no nft on an iptables node, no ip6tables in an IPv4 cluster).
fn log_cleanup(what: &str, report: &SyncReport, errors: &[RulesIoError]) {
    for c in &report.changed {
        tracing::info!("{what}: {c}");
    }
    for e in errors {
        tracing::debug!(error = %e, "{what}");
    }
}

/// The families in use (errors reported), then the others (leftovers only,
/// errors at debug level).
fn full_pass(input: &RulesInput, log: &mut PassLog, metrics: &RulesMetrics) {
    let in_use = families_in_use(input);
    let (r, e) = sync(input, &in_use);
    if input.wants_nothing() {
        log_cleanup("removing rules no longer wanted", &r, &e);
        // Nothing wanted: leftovers that cannot be removed (the tools may
        // be missing) do not keep the node from being ready.
        metrics.record_pass(r.changed.len(), 0);
    } else {
        log.log("rules", &r, &e);
        metrics.record_pass(r.changed.len(), e.len());
    }
    let unused: Vec<IpFamily> = FAMILIES
        .into_iter()
        .filter(|f| !in_use.contains(f))
        .collect();
    let (r, e) = sync(input, &unused);
    log_cleanup("removing rules of a family not in use", &r, &e);
}

enum Msg {
    Update(RulesInput),
    Stop,
}

/// The thread that keeps the rules in line. Dropping it without
/// [`RulesManager::shutdown`] ends the thread and leaves the rules in place.
pub struct RulesManager {
    tx: mpsc::Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

impl RulesManager {
    /// Removes the other mode's rules, applies `input` and then checks it
    /// every `resync` on a thread of its own.
    pub fn start(input: RulesInput, resync: Duration) -> Self {
        RulesManager::start_with(input, resync, RulesMetrics::default())
    }

    /// [`RulesManager::start`], recording every pass in `metrics` (the
    /// health endpoint's readiness and `/metrics`).
    pub fn start_with(input: RulesInput, resync: Duration, metrics: RulesMetrics) -> Self {
        let (tx, rx) = mpsc::channel();
        let resync = resync.max(Duration::from_millis(100));
        let thread = std::thread::Builder::new()
            .name("rules".into())
            .spawn(move || run_loop(input, resync, rx, metrics))
            .expect("spawning the rules thread");
        Self {
            tx,
            thread: Some(thread),
        }
    }

    /// New nets (our lease changed): the old rules are replaced at once.
    pub fn update(&self, input: RulesInput) {
        let _ = self.tx.send(Msg::Update(input));
    }

    /// Removes the rules of the mode in use and stops the thread.
    pub fn shutdown(mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn families_in_use(input: &RulesInput) -> Vec<IpFamily> {
    FAMILIES
        .into_iter()
        .filter(|f| input.nets(*f).is_some())
        .collect()
}

fn run_loop(
    mut input: RulesInput,
    resync: Duration,
    rx: mpsc::Receiver<Msg>,
    metrics: RulesMetrics,
) {
    let mode_name = |m: Mode| match m {
        Mode::Iptables => "iptables",
        Mode::Nftables => "nftables",
    };
    tracing::info!(mode = mode_name(input.mode), masquerade = input.options.masquerade,
        fully_random = input.options.fully_random, forward = input.options.forward,
        v4 = ?input.v4, v6 = ?input.v6, resync = ?resync, "starting masquerade/forward rules");
    let (r, e) = remove_mode(other(input.mode));
    log_cleanup(
        &format!(
            "removing {} rules of the mode not in use",
            mode_name(other(input.mode))
        ),
        &r,
        &e,
    );
    let mut log = PassLog::default();
    full_pass(&input, &mut log, &metrics);
    if input.wants_nothing() {
        // Nothing to keep in line; wait for new input or shutdown.
        loop {
            match rx.recv() {
                Ok(Msg::Update(i)) if !i.wants_nothing() => {
                    input = i;
                    full_pass(&input, &mut log, &metrics);
                    break;
                }
                Ok(Msg::Update(_)) => continue,
                Ok(Msg::Stop) | Err(_) => return,
            }
        }
    }
    loop {
        match rx.recv_timeout(resync) {
            Ok(Msg::Update(i)) => {
                if i != input {
                    tracing::info!(v4 = ?i.v4, v6 = ?i.v6, "network or subnet changed: replacing the rules");
                }
                input = i;
                full_pass(&input, &mut log, &metrics);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let (r, e) = sync(&input, &families_in_use(&input));
                log.log("rules were not as desired", &r, &e);
                metrics.record_pass(r.changed.len(), e.len());
            }
            Ok(Msg::Stop) => {
                let (r, e) = remove_mode(input.mode);
                log.log("shutdown: removing flannel's rules", &r, &e);
                return;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use flannel_core::config;

    /// Every rules flag given explicitly: FLANNELD_* in the environment
    /// (which other tests of this binary set) cannot change them.
    fn flags(masq: bool, no_random: bool, forward: bool) -> Flags {
        Flags::try_parse_from([
            "flanneld".to_string(),
            format!("--ip-masq={masq}"),
            format!("--ip-masq-fully-random-disable={no_random}"),
            format!("--iptables-forward-rules={forward}"),
        ])
        .unwrap()
    }

    #[test]
    fn spawn_errors_name_the_real_cause() {
        let err = |source| {
            RulesIoError::Spawn {
                cmd: "iptables-save".into(),
                source,
            }
            .to_string()
        };
        let missing = err(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(missing.contains("install it"), "{missing}");
        // Issue 14 item 7: out of descriptors is not "install iptables".
        let emfile = err(std::io::Error::from_raw_os_error(libc::EMFILE));
        assert!(
            emfile.contains("out of file descriptors") && !emfile.contains("install"),
            "{emfile}"
        );
        let enfile = err(std::io::Error::from_raw_os_error(libc::ENFILE));
        assert!(
            enfile.contains("fs.file-max") && !enfile.contains("install"),
            "{enfile}"
        );
    }

    #[test]
    fn input_from_flags_config_and_lease() {
        let key = LeaseKey {
            ipv4: Some("10.244.3.0/24".parse().unwrap()),
            ipv6: Some("fd00:10:244:3::/64".parse().unwrap()),
        };
        let v4_only = config::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        let i = input_from(&flags(true, false, true), &v4_only, &key);
        assert_eq!(i.mode, Mode::Iptables);
        assert_eq!(
            i.v4,
            Some(
                FamilyNets::v4(
                    "10.244.0.0/16".parse().unwrap(),
                    "10.244.3.0/24".parse().unwrap()
                )
                .unwrap()
            )
        );
        assert_eq!(i.v6, None, "IPv6 not enabled in the config");
        assert_eq!(
            i.options,
            RuleOptions {
                masquerade: true,
                fully_random: true,
                forward: true,
                encap_port: Some(8472),
            }
        );

        let dual_nft = config::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","EnableNFTables":true}"#,
        )
        .unwrap();
        let i = input_from(&flags(false, true, false), &dual_nft, &key);
        assert_eq!(i.mode, Mode::Nftables);
        assert!(i.v4.is_some() && i.v6.is_some());
        assert_eq!(
            i.options,
            RuleOptions {
                masquerade: false,
                fully_random: false,
                forward: false,
                encap_port: Some(8472),
            }
        );
        assert!(i.wants_nothing());

        // A lease outside the network (cannot happen after acquisition) gives no rules for that family.
        let other = LeaseKey {
            ipv4: Some("10.9.0.0/24".parse().unwrap()),
            ipv6: None,
        };
        assert_eq!(
            input_from(&flags(true, false, true), &v4_only, &other).v4,
            None
        );
    }
}
