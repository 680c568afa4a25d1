//! The CNI verbs (ADD, DEL, CHECK, GC, STATUS, VERSION): the environment
//! and the network configuration in, a result or a spec error out.

use crate::{attach, config, ipam, ipmasq, spec};
use std::fs;
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use flannel_netlink::netns::{NetNs, NetNsError};
use flannel_netlink::Netlink;
use ipnet::IpNet;
use serde_json::Value;

use attach::{Ctx, PodAddress};
use config::{load_subnet_env, BridgeConf, NetConf};
use ipam::IpamStore;
use spec::{code, AddResult, CniError, Interface, IpConfig, Version};

/// The `CNI_*` environment of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: String,
    /// `CNI_CONTAINERID`: letters, digits, `_`, `.`, `-`, starting with a
    /// letter or digit (it names files under dataDir and the IPAM dir).
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// `CNI_IFNAME`: a valid interface name (at most 15 bytes, no `/`, `:`
    /// or blanks, not `.` or `..`).
    pub ifname: String,
}

pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn required(
    var: &impl Fn(&str) -> Option<String>,
    name: &str,
    command: &str,
) -> Result<String, CniError> {
    var(name).filter(|v| !v.is_empty()).ok_or_else(|| {
        CniError::new(
            code::INVALID_ENV,
            format!(
                "environment variable {name} is missing; the runtime must set it for {command}"
            ),
        )
    })
}

impl CniEnv {
    /// Reads and validates the variables `command` needs from the process
    /// environment (see [`CniEnv::from_vars`]).
    fn load(command: &str) -> Result<CniEnv, CniError> {
        CniEnv::from_vars(command, env_var)
    }

    /// Reads and validates the variables `command` needs through `var` (an
    /// empty value counts as unset). The container ID and interface name end
    /// up in file and link names, hence the strict checks; every error has
    /// the spec code 4 (invalid environment variables).
    pub fn from_vars(
        command: &str,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<CniEnv, CniError> {
        let (need_id, need_netns) = match command {
            "ADD" | "CHECK" => (true, true),
            "DEL" => (true, false),
            _ => (false, false),
        };
        let mut env = CniEnv {
            command: command.to_string(),
            container_id: String::new(),
            netns: var("CNI_NETNS").unwrap_or_default(),
            ifname: String::new(),
        };
        if need_id {
            env.container_id = required(&var, "CNI_CONTAINERID", command)?;
            env.ifname = required(&var, "CNI_IFNAME", command)?;
            let id_ok = env
                .container_id
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
                && env
                    .container_id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            if !id_ok {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!(
                        "CNI_CONTAINERID={:?} is invalid: use letters, digits, '_', '.' and '-', starting with a letter or digit",
                        env.container_id
                    ),
                ));
            }
            let ifn = &env.ifname;
            if ifn.len() > 15
                || ifn == "."
                || ifn == ".."
                || ifn
                    .chars()
                    .any(|c| c == '/' || c == ':' || c.is_whitespace())
            {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_IFNAME={ifn:?} is not a valid interface name: at most 15 characters, no '/', ':' or spaces"),
                ));
            }
        }
        if need_netns && env.netns.is_empty() {
            required(&var, "CNI_NETNS", command)?;
        }
        Ok(env)
    }
}

/// Opens `CNI_NETNS`; a missing or stale path means the container is
/// unknown. The node's own namespace (the plugin's) is refused
/// ([`refuse_own_netns`]).
fn open_netns(path: &str) -> Result<NetNs, CniError> {
    let ns = open_netns_path(path)?;
    refuse_own_netns(&ns, path)?;
    Ok(ns)
}

/// Error 4 when `ns` is the network namespace the plugin runs in (same
/// nsfs inode as `/proc/self/ns/net`, whatever path named it): ADD would
/// configure the node itself (its default route replaced by the pod's) and
/// DEL would delete the node's interface named CNI_IFNAME.
fn refuse_own_netns(ns: &NetNs, path: &str) -> Result<(), CniError> {
    let own = NetNs::current()
        .and_then(|own| own.same_namespace(ns))
        .map_err(|e| {
            CniError::new(
                code::KERNEL_FAILURE,
                format!("comparing CNI_NETNS={path:?} with the plugin's own namespace: {e}"),
            )
        })?;
    if own {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS={path:?} is the node's own network namespace (the one the plugin runs in), not a container's; the runtime must pass the pod sandbox's namespace"),
        ));
    }
    Ok(())
}

fn open_netns_path(path: &str) -> Result<NetNs, CniError> {
    NetNs::open_path(Path::new(path)).map_err(|e| {
        let c = match &e {
            NetNsError::Io { source, .. }
                if matches!(source.kind(), ErrorKind::NotFound | ErrorKind::InvalidInput) =>
            {
                code::UNKNOWN_CONTAINER
            }
            _ => code::INVALID_ENV,
        };
        CniError::new(c, format!("CNI_NETNS={path:?} cannot be used: {e}"))
    })
}

fn io_error(path: &Path, op: &str, e: std::io::Error) -> CniError {
    CniError::new(code::IO_FAILURE, format!("{}: {op}: {e}", path.display()))
}

/// Saves the rendered config as `dataDir/<containerID>` (dir 0700, file 0600),
/// written to a temporary file and renamed so DEL never reads half a file.
/// Writes the rendered config to `dataDir/<containerID>` (temp file +
/// rename). Returns its path and whether one was there already (an ADD
/// repeated for the same container).
fn save_config(
    data_dir: &Path,
    container_id: &str,
    rendered: &Value,
) -> Result<(PathBuf, bool), CniError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|e| io_error(data_dir, "create directory", e))?;
    let path = data_dir.join(container_id);
    let tmp = data_dir.join(format!(".{container_id}.tmp"));
    let body = serde_json::to_vec(rendered).expect("a JSON value serialises");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io_error(&tmp, "create", e))?;
    f.write_all(&body).map_err(|e| io_error(&tmp, "write", e))?;
    let existed = path.exists();
    fs::rename(&tmp, &path).map_err(|e| io_error(&path, "rename into place", e))?;
    Ok((path, existed))
}

/// Reads back a saved config; `Ok(None)` when there is none.
fn load_saved(data_dir: &Path, container_id: &str) -> Result<Option<Value>, CniError> {
    let path = data_dir.join(container_id);
    match fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            CniError::new(
                code::DECODING_FAILURE,
                format!(
                    "{}: saved config is not JSON ({e}); delete the file if the pod is gone",
                    path.display()
                ),
            )
        }),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(&path, "read", e)),
    }
}

fn remove_file(path: &Path) -> Result<(), CniError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(path, "remove", e)),
    }
}

/// What a failed ADD has to take back, newest first. Only what this call
/// made: a repeated ADD that fails (the interface exists already) leaves the
/// earlier attachment's saved config and addresses alone.
enum Undo {
    RemoveFile(PathBuf),
    RemoveAddress(IpAddr),
    DeleteHostLink(String),
    RemoveIpMasq,
}

fn cmd_add(env: &CniEnv, conf: &NetConf) -> Result<Value, CniError> {
    let senv = load_subnet_env(&conf.subnet_file)?;
    let rendered = conf.render_delegate(&senv)?;
    let bconf = BridgeConf::from_rendered(&rendered)?;
    let pod = open_netns(&env.netns)?;
    std::thread::scope(|scope| {
        // The pod's socket opens on its own thread while this one does the
        // node's side; it is first needed to configure the pod end.
        let mut pod_nl = attach::PodSocket::open(&pod, scope);
        let store = IpamStore::open_locked(&bconf.ipam.network_dir)?;
        let mut nl = Netlink::open().ctx(|| "open netlink".into())?;
        let mut undo: Vec<Undo> = Vec::new();
        let result = add_steps(
            env,
            conf,
            &rendered,
            &bconf,
            &mut pod_nl,
            &store,
            &mut nl,
            &mut undo,
        );
        let Err(e) = result else {
            return result;
        };
        let mut failures = Vec::new();
        for step in undo.into_iter().rev() {
            let r = match step {
                Undo::RemoveFile(p) => remove_file(&p),
                Undo::RemoveAddress(ip) => store.remove(ip).map_err(CniError::from),
                Undo::DeleteHostLink(name) => {
                    attach::del_host_link(&mut nl, &name).map_err(CniError::from)
                }
                Undo::RemoveIpMasq => {
                    ipmasq::teardown(&bconf.name, &env.container_id).map_err(CniError::from)
                }
            };
            if let Err(u) = r {
                failures.push(u.msg);
            }
        }
        if failures.is_empty() {
            Err(e)
        } else {
            Err(e.with_details(format!(
                "cleaning up after the failure also failed: {}",
                failures.join("; ")
            )))
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn add_steps(
    env: &CniEnv,
    conf: &NetConf,
    rendered: &Value,
    bconf: &BridgeConf,
    pod_nl: &mut attach::PodSocket<'_, '_>,
    store: &IpamStore,
    nl: &mut Netlink,
    undo: &mut Vec<Undo>,
) -> Result<Value, CniError> {
    // Saved first so that a DEL after a crash half-way finds what to undo.
    let (saved, repeated) = save_config(&conf.data_dir, &env.container_id, rendered)?;
    if !repeated {
        undo.push(Undo::RemoveFile(saved));
    }
    // The config is saved before any address is taken, so without an earlier
    // saved config this attachment holds no address yet.
    let allocs = store.allocate(&bconf.ipam, &env.container_id, &env.ifname, repeated)?;
    undo.extend(
        allocs
            .iter()
            .filter(|a| a.new)
            .map(|a| Undo::RemoveAddress(a.ip)),
    );
    let addrs: Vec<PodAddress> = allocs
        .iter()
        .map(|a| PodAddress {
            address: IpNet::new(a.ip, a.range.subnet.prefix_len()).expect("prefix of a valid net"),
            gateway: a.range.gateway,
        })
        .collect();
    let bridge = attach::ensure_bridge(nl, bconf, &addrs)?;
    let host_name = attach::host_veth_name(&env.container_id, &env.ifname);
    let veth = attach::add_veth(nl, bconf, &bridge, &host_name, &env.ifname, pod_nl)?;
    undo.push(Undo::DeleteHostLink(host_name.clone()));
    attach::set_hairpin(nl, bconf, &veth.host)?;
    let routes = attach::pod_routes(bconf, &addrs);
    attach::configure_pod(pod_nl, &veth, &env.ifname, &addrs, &routes)?;
    if bconf.ip_masq {
        undo.push(Undo::RemoveIpMasq);
        let nets: Vec<IpNet> = addrs.iter().map(|a| a.address).collect();
        ipmasq::setup(&bconf.name, &env.container_id, &nets)?;
    }
    let host = veth.host;
    let pod_mac = Some(veth.pod_mac);
    let bridge_mac = bridge.mac;
    let mac = |m: Option<flannel_core::mac::MacAddr>| m.map(|m| m.to_string()).unwrap_or_default();
    let result = AddResult {
        interfaces: vec![
            Interface {
                name: bconf.bridge.clone(),
                mac: mac(bridge_mac),
                sandbox: None,
            },
            Interface {
                name: host_name,
                mac: mac(host.mac),
                sandbox: None,
            },
            Interface {
                name: env.ifname.clone(),
                mac: mac(pod_mac),
                sandbox: Some(env.netns.clone()),
            },
        ],
        ips: addrs
            .iter()
            .map(|a| IpConfig {
                address: a.address,
                gateway: Some(a.gateway),
                interface: Some(2),
            })
            .collect(),
        routes,
        dns: bconf.ipam.dns.clone(),
    };
    Ok(result.encode(conf.version))
}

fn cmd_del(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    // Before anything: in the node's own namespace CNI_IFNAME is one of the
    // node's interfaces.
    let pod = match env.netns.is_empty() {
        true => None,
        false => NetNs::open_path(Path::new(&env.netns)).ok(),
    };
    if let Some(pod) = &pod {
        refuse_own_netns(pod, &env.netns)?;
    }
    // Without a usable saved config (ADD never ran, DEL already did, or the
    // file is damaged) the input config still says where the addresses live:
    // clean up what may be left rather than fail DEL for good.
    let saved = load_saved(&conf.data_dir, &env.container_id).unwrap_or(None);
    let ipam_dir = match saved.as_ref().map(BridgeConf::from_rendered) {
        Some(Ok(b)) => b.ipam.network_dir,
        _ => conf.ipam_network_dir()?,
    };
    let mut failures: Vec<String> = Vec::new();
    // Held until the end: no ADD of this network runs while we decide what is ours.
    let store = match IpamStore::open_locked(&ipam_dir) {
        Ok(s) => Some(s),
        Err(e) => {
            failures.push(e.to_string());
            None
        }
    };
    // A namespace that is gone took the veth pair with it.
    if let Some(pod) = &pod {
        let r = attach::open_in(pod)
            .and_then(|mut pod_nl| attach::del_pod_link(&mut pod_nl, pod, &env.ifname));
        if let Err(e) = r {
            failures.push(e.to_string());
        }
    }
    if let Some(store) = &store {
        // The host end by its derived name, for a pod namespace we could not
        // enter. Only while the attachment holds an address: then the ADD that
        // created the name succeeded, so the link is ours and not another
        // container's whose name hashed the same (our ADD then failed and
        // gave its address back).
        let owned = match store.reservations() {
            Ok(rs) => rs
                .iter()
                .any(|r| r.container_id == env.container_id && r.ifname == env.ifname),
            Err(e) => {
                failures.push(e.to_string());
                false
            }
        };
        if owned {
            let host = attach::host_veth_name(&env.container_id, &env.ifname);
            let r = Netlink::open()
                .ctx(|| "open netlink".into())
                .and_then(|mut nl| attach::del_host_link(&mut nl, &host));
            if let Err(e) = r {
                failures.push(e.to_string());
            }
        }
        if let Err(e) = store.release(&env.container_id, &env.ifname) {
            failures.push(e.to_string());
        }
    }
    if let Some(Ok(b)) = saved.as_ref().map(BridgeConf::from_rendered) {
        if b.ip_masq {
            if let Err(e) = ipmasq::teardown(&b.name, &env.container_id) {
                failures.push(e.to_string());
            }
        }
    }
    if !failures.is_empty() {
        return Err(CniError::new(
            code::KERNEL_FAILURE,
            format!("DEL incomplete: {}", failures.join("; ")),
        ));
    }
    remove_file(&conf.data_dir.join(&env.container_id))
}

fn cmd_check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    if let Ok(ns) = NetNs::open_path(Path::new(&env.netns)) {
        refuse_own_netns(&ns, &env.netns)?;
    }
    if conf.version < Version::V0_4_0 {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, the config says {}",
                conf.cni_version
            ),
        ));
    }
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "prevResult: missing; CHECK needs the result of ADD in prevResult",
        )
    })?;
    let prev = AddResult::decode(prev).map_err(|m| CniError::new(code::DECODING_FAILURE, m))?;
    let saved = load_saved(&conf.data_dir, &env.container_id)?.ok_or_else(|| {
        CniError::new(
            code::CHECK_FAILED,
            format!(
                "no saved config {}: ADD did not run for this container or DEL already did",
                conf.data_dir.join(&env.container_id).display()
            ),
        )
    })?;
    let bconf = BridgeConf::from_rendered(&saved)?;
    let pod = open_netns(&env.netns)?;
    let gateway_for = |a: &IpNet| -> Option<IpAddr> {
        bconf
            .ipam
            .range_sets
            .iter()
            .flatten()
            .find(|r| r.subnet.contains(&a.addr()))
            .map(|r| r.gateway)
    };
    let mut problems = Vec::new();
    let mut addrs = Vec::new();
    for ip in &prev.ips {
        match ip.gateway.or_else(|| gateway_for(&ip.address)) {
            Some(gateway) => addrs.push(PodAddress {
                address: ip.address,
                gateway,
            }),
            None => problems.push(format!(
                "address {} is outside the node's subnet",
                ip.address
            )),
        }
    }
    let nets: Vec<IpNet> = addrs.iter().map(|a| a.address).collect();
    let mut pod_nl = attach::open_in(&pod)?;
    problems.extend(attach::check_pod(
        &mut pod_nl,
        &pod,
        &env.ifname,
        &nets,
        &attach::expected_routes(&prev.routes, &addrs),
    )?);

    let mut nl = Netlink::open().ctx(|| "open netlink".into())?;
    let host_name = attach::host_veth_name(&env.container_id, &env.ifname);
    let bridge = nl
        .link_by_name(&bconf.bridge)
        .ctx(|| format!("look up {}", bconf.bridge))?;
    match (
        bridge,
        nl.link_by_name(&host_name)
            .ctx(|| format!("look up {host_name}"))?,
    ) {
        (None, _) => problems.push(format!("bridge {} is missing", bconf.bridge)),
        (_, None) => problems.push(format!("host veth {host_name} is missing")),
        (Some(br), Some(h)) if h.master != Some(br.index) => problems.push(format!(
            "host veth {host_name} is not enslaved to {}",
            bconf.bridge
        )),
        _ => {}
    }
    let store = IpamStore::open_locked(&bconf.ipam.network_dir)?;
    let owned = store.reservations()?;
    for a in &addrs {
        let ip = a.address.addr();
        if !owned.iter().any(|r| {
            r.ip == ip
                && r.container_id == env.container_id
                && (r.ifname == env.ifname || r.ifname.is_empty())
        }) {
            problems.push(format!(
                "address {ip} is not reserved for this container in {}",
                store.dir().display()
            ));
        }
    }
    if !problems.is_empty() {
        return Err(CniError::new(
            code::CHECK_FAILED,
            format!("CHECK failed: {}", problems.join("; ")),
        ));
    }
    Ok(())
}

fn need_1_1(conf: &NetConf, verb: &str) -> Result<(), CniError> {
    if conf.version < Version::V1_1_0 {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{verb} exists from cniVersion 1.1.0; the config says {}",
                conf.cni_version
            ),
        ));
    }
    Ok(())
}

fn cmd_gc(conf: &NetConf) -> Result<(), CniError> {
    need_1_1(conf, "GC")?;
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "cni.dev/valid-attachments: missing; GC needs the list of attachments to keep",
        )
    })?;
    let is_valid = |id: &str, ifname: &str| {
        valid
            .iter()
            .any(|(v, i)| v == id && (ifname.is_empty() || i == ifname))
    };
    let mut failures = Vec::new();
    let store = IpamStore::open_locked(&conf.ipam_network_dir()?)?;
    let mut nl = Netlink::open().ctx(|| "open netlink".into())?;
    for r in store.reservations()? {
        if is_valid(&r.container_id, &r.ifname) {
            continue;
        }
        if let Err(e) = store.remove(r.ip) {
            failures.push(e.to_string());
        }
        if !r.ifname.is_empty() {
            let host = attach::host_veth_name(&r.container_id, &r.ifname);
            if let Err(e) = attach::del_host_link(&mut nl, &host) {
                failures.push(e.to_string());
            }
        }
    }
    // Saved configs of this network whose container is not in the list.
    match fs::read_dir(&conf.data_dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => failures.push(io_error(&conf.data_dir, "list", e).msg),
        Ok(rd) => {
            for ent in rd.flatten() {
                let Some(id) = ent.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if id.starts_with('.') || valid.iter().any(|(v, _)| *v == id) {
                    continue;
                }
                let ours = fs::read(ent.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .is_some_and(|v| {
                        v.get("name").and_then(Value::as_str) == Some(conf.name.as_str())
                    });
                if ours {
                    if let Err(e) = remove_file(&ent.path()) {
                        failures.push(e.msg);
                    }
                }
            }
        }
    }
    if !failures.is_empty() {
        return Err(CniError::new(
            code::IO_FAILURE,
            format!("GC incomplete: {}", failures.join("; ")),
        ));
    }
    Ok(())
}

fn cmd_status(conf: &NetConf) -> Result<(), CniError> {
    need_1_1(conf, "STATUS")?;
    load_subnet_env(&conf.subnet_file).map(|_| ()).map_err(|e| {
        CniError::new(
            code::PLUGIN_NOT_AVAILABLE,
            format!("plugin not available: {e}"),
        )
    })
}

/// Runs one call; `Ok(Some(v))` is printed on stdout, `Ok(None)` prints nothing.
pub fn run(command: &str, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    match command {
        "VERSION" => {
            let v = config::peek_version(stdin)
                .filter(|v| Version::parse(v).is_some_and(|v| v.is_supported()))
                .unwrap_or_else(|| spec::LATEST_VERSION.to_string());
            return Ok(Some(spec::version_info(&v)));
        }
        "ADD" | "DEL" | "CHECK" | "GC" | "STATUS" => {}
        other => {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_COMMAND={other:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"),
            ))
        }
    }
    let conf = NetConf::parse(stdin)?;
    let env = CniEnv::load(command)?;
    match env.command.as_str() {
        "ADD" => cmd_add(&env, &conf).map(Some),
        "DEL" => cmd_del(&env, &conf).map(|_| None),
        "CHECK" => cmd_check(&env, &conf).map(|_| None),
        "GC" => cmd_gc(&conf).map(|_| None),
        _ => cmd_status(&conf).map(|_| None),
    }
}
