//! `flannelctl leases [--local-store DIR | --etcd-endpoints URLS ... |
//! --kube-subnet-mgr ...] [--json]`: who holds which subnet, and whether
//! flanneld programs it (lease admission, with the network config).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flannel_core::admit::{admit_as_observer, ClusterNets};
use flannel_core::config::NetConfig;
use flannel_core::lease::{Lease, LeaseKey, VxlanBackendData};
use serde::Serialize;

/// Errors of reading leases, with the store involved.
#[derive(Debug, thiserror::Error)]
pub enum LeasesError {
    #[error("reading leases from the local store {path}: {source}")]
    Store {
        path: String,
        #[source]
        source: flannel_store::StoreError,
    },
    #[error(
        "local store {path} does not exist: give the directory passed to flanneld --local-store"
    )]
    Missing { path: String },
    #[error("starting a runtime for the store: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("{0}")]
    EtcdConnect(#[source] flannel_store::etcd::ConnectError),
    #[error("reading leases from etcd at {endpoints}: {source}")]
    Etcd {
        endpoints: String,
        #[source]
        source: flannel_store::StoreError,
    },
    #[error("reading the Nodes' leases: {0}")]
    Kube(#[source] flannel_store::kube::KubeStoreError),
    #[error("network config {path}: {detail}")]
    Config { path: String, detail: String },
}

/// One lease as `flannelctl leases` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseRow {
    /// `10.244.1.0/24` (and/or the IPv6 subnet).
    pub subnet: String,
    pub public_ip: Option<Ipv4Addr>,
    /// The lease's backend as flanneld reads it: its `BackendType`, and
    /// `udp` when it has none (upstream's udp leases, and ours, carry none).
    pub backend_type: String,
    pub vni: Option<u32>,
    pub vtep_mac: Option<String>,
    /// Seconds since the Unix epoch; `None` for a reservation.
    pub expires_unix: Option<u64>,
    /// A lease without expiry, pinned to the node with this PublicIP.
    pub reservation: bool,
    /// What flanneld does with it, decided as by a node that holds none of
    /// the leases: `ok` (programmed), `expired`, or `skipped: <why>`
    /// (lease admission); `None` without the network config.
    pub status: Option<String>,
}

impl LeaseRow {
    pub fn from_lease(l: &Lease) -> LeaseRow {
        let mut subnet = Vec::new();
        if let Some(v4) = l.key.ipv4 {
            subnet.push(v4.to_string());
        }
        if let Some(v6) = l.key.ipv6 {
            subnet.push(v6.to_string());
        }
        let vx: Option<VxlanBackendData> = l.attrs.backend_data.as_ref().and_then(|d| d.parse());
        LeaseRow {
            subnet: subnet.join(" "),
            public_ip: l.attrs.public_ip,
            backend_type: l.attrs.effective_backend_type().to_string(),
            vni: vx.map(|d| d.vni),
            vtep_mac: vx.map(|d| d.vtep_mac.to_string()),
            expires_unix: l
                .expiration
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            reservation: l.expiration.is_none(),
            status: None,
        }
    }
}

/// The rows of `leases` (sorted by key), each with its [`LeaseRow::status`]
/// when `cfg` is known.
pub fn rows(leases: &[Lease], cfg: Option<&NetConfig>, now: SystemTime) -> Vec<LeaseRow> {
    let mut rows: Vec<(LeaseKey, LeaseRow)> = leases
        .iter()
        .map(|l| (l.key, LeaseRow::from_lease(l)))
        .collect();
    rows.sort_by_key(|(k, _)| *k);
    if let Some(cfg) = cfg {
        let a = admit_as_observer(&ClusterNets::from_config(cfg), leases, now);
        let ok: std::collections::BTreeSet<LeaseKey> = a.admitted.iter().map(|l| l.key).collect();
        let why: std::collections::BTreeMap<LeaseKey, String> = a
            .rejected
            .into_iter()
            .map(|r| (r.key, r.reason.to_string()))
            .collect();
        for (k, row) in &mut rows {
            row.status = Some(if ok.contains(k) {
                "ok".into()
            } else if let Some(w) = why.get(k) {
                format!("skipped: {w}")
            } else {
                "expired".into()
            });
        }
    }
    rows.into_iter().map(|(_, r)| r).collect()
}

/// The network config in `path` (flanneld's `--net-config-path`); `Err`
/// says why lease admission cannot be shown.
pub fn net_conf_file(path: &Path) -> Result<NetConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "network config {}: {e}; give --net-config-path to see which leases flanneld programs",
            path.display()
        )
    })?;
    flannel_core::config::parse(&text)
        .map_err(|e| format!("network config {}: {e}", path.display()))
}

/// The leases themselves of a local store directory, sorted by subnet.
pub fn read_local(dir: &Path) -> Result<Vec<Lease>, LeasesError> {
    if !dir.is_dir() {
        return Err(LeasesError::Missing {
            path: dir.display().to_string(),
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LeasesError::Runtime)?;
    let map = |source| LeasesError::Store {
        path: dir.display().to_string(),
        source,
    };
    let leases = rt.block_on(async {
        use flannel_store::Store;
        let store = flannel_store::LocalStore::open(dir).map_err(map)?;
        store.list_leases().await.map_err(map)
    })?;
    let mut leases = leases.leases;
    leases.sort_by_key(|l| l.key);
    Ok(leases)
}

/// Every lease held in etcd below `opts.prefix`, sorted by subnet, and
/// the network config there (`Err`: why there is none to decide admission
/// with). One connection attempt; an unreachable etcd is an error naming
/// the endpoints.
///
/// `etcdctl --endpoints=URLS get --prefix /coreos.com/network/subnets/`,
/// `etcdctl get /coreos.com/network/config`
pub fn list_etcd(
    opts: flannel_store::etcd::EtcdOptions,
) -> Result<(Vec<Lease>, Result<NetConfig, String>), LeasesError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LeasesError::Runtime)?;
    let endpoints = opts.endpoints.join(",");
    let (leases, config) = rt.block_on(async {
        use flannel_store::Store;
        let store = flannel_store::etcd::EtcdStore::connect(opts)
            .await
            .map_err(LeasesError::EtcdConnect)?;
        let config = match store.get_network_config().await {
            Ok(Some(text)) => flannel_core::config::parse(&text)
                .map_err(|e| format!("network config in etcd: {e}")),
            Ok(None) => Err("no network config in etcd".to_string()),
            Err(e) => Err(format!("reading the network config from etcd: {e}")),
        };
        let leases = store
            .list_leases()
            .await
            .map_err(|source| LeasesError::Etcd { endpoints, source })?;
        Ok::<_, LeasesError>((leases, config))
    })?;
    let mut leases = leases.leases;
    leases.sort_by_key(|l| l.key);
    Ok((leases, config))
}

/// The leases themselves held in etcd, sorted by subnet ([`list_etcd`]
/// without the config).
pub fn read_etcd(opts: flannel_store::etcd::EtcdOptions) -> Result<Vec<Lease>, LeasesError> {
    list_etcd(opts).map(|(leases, _)| leases)
}

/// The leases of the Nodes (Kubernetes mode), read as flanneld reads them,
/// and the managed Nodes skipped with why. The address families come from
/// `net_conf` (the ConfigMap's net-conf.json) when it exists, else IPv4.
///
/// `kubectl get nodes -o yaml`, for flannel.
pub fn read_kube(
    kube: &flanneld::flags::KubeFlags,
    net_conf: &Path,
) -> Result<flannel_store::kube::NodeLeases, LeasesError> {
    let cfg_err = |detail: String| LeasesError::Config {
        path: net_conf.display().to_string(),
        detail,
    };
    let text = match std::fs::read_to_string(net_conf) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => r#"{"Network":"0.0.0.0/0"}"#.into(),
        Err(e) => return Err(cfg_err(e.to_string())),
    };
    let cfg = flannel_core::config::parse(&text).map_err(|e| cfg_err(e.to_string()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LeasesError::Runtime)?;
    rt.block_on(flannel_store::kube::list_node_leases(
        kube.kube_api_url.as_deref().filter(|u| !u.is_empty()),
        kube.kubeconfig_file
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty()),
        &kube.kube_annotation_prefix,
        &cfg,
    ))
    .map_err(LeasesError::Kube)
}

fn human_expiry(row: &LeaseRow, now: SystemTime) -> String {
    let Some(secs) = row.expires_unix else {
        return "never (reservation)".to_string();
    };
    let at = UNIX_EPOCH + Duration::from_secs(secs);
    match at.duration_since(now) {
        Ok(left) => {
            let s = left.as_secs();
            format!("in {}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
        }
        Err(_) => "expired".to_string(),
    }
}

/// A table: SUBNET PUBLIC-IP BACKEND VNI VTEP-MAC EXPIRES STATUS.
pub fn render_table(rows: &[LeaseRow], now: SystemTime) -> String {
    let header = [
        "SUBNET",
        "PUBLIC-IP",
        "BACKEND",
        "VNI",
        "VTEP-MAC",
        "EXPIRES",
        "STATUS",
    ];
    let dash = || "-".to_string();
    let lines: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.subnet.clone(),
                r.public_ip.map(|i| i.to_string()).unwrap_or_else(dash),
                r.backend_type.clone(),
                r.vni.map(|v| v.to_string()).unwrap_or_else(dash),
                r.vtep_mac.clone().unwrap_or_else(dash),
                human_expiry(r, now),
                r.status.clone().unwrap_or_else(dash),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for l in &lines {
        for (w, c) in widths.iter_mut().zip(l) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let _ = write!(s, "{c:w$}  ");
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&header);
    for l in &lines {
        line(&l.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}

/// JSON array of [`LeaseRow`].
pub fn render_json(rows: &[LeaseRow]) -> String {
    serde_json::to_string_pretty(rows).expect("rows serialise")
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_core::lease::{LeaseAttrs, LeaseKey};

    fn lease(subnet: &str, exp: Option<SystemTime>, data: Option<serde_json::Value>) -> Lease {
        let data = data.map(|d| flannel_core::lease::BackendData::new(&d));
        Lease {
            key: LeaseKey {
                ipv4: Some(subnet.parse().unwrap()),
                ipv6: None,
            },
            attrs: LeaseAttrs {
                public_ip: Some("172.16.1.14".parse().unwrap()),
                public_ipv6: None,
                backend_type: "vxlan".into(),
                backend_data: data,
                backend_v6_data: None,
            },
            expiration: exp,
        }
    }

    #[test]
    fn rows_show_mac_expiry_and_reservations() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let rows = [
            LeaseRow::from_lease(&lease(
                "10.244.1.0/24",
                None,
                Some(serde_json::json!({"VNI":1,"VtepMAC":"26:62:24:f0:61:01"})),
            )),
            LeaseRow::from_lease(&lease(
                "10.244.2.0/24",
                Some(now + Duration::from_secs(3661)),
                None,
            )),
        ];
        assert!(rows[0].reservation);
        assert_eq!(rows[0].vtep_mac.as_deref(), Some("26:62:24:f0:61:01"));
        assert_eq!(rows[0].vni, Some(1));
        assert!(!rows[1].reservation);
        assert_eq!(rows[1].expires_unix, Some(1_003_661));
        let t = render_table(&rows, now);
        assert!(t.starts_with("SUBNET"), "{t}");
        assert!(
            t.contains("10.244.1.0/24") && t.contains("never (reservation)"),
            "{t}"
        );
        assert!(t.contains("in 1h01m01s"), "{t}");
        let j: serde_json::Value = serde_json::from_str(&render_json(&rows)).unwrap();
        assert_eq!(j[0]["subnet"], "10.244.1.0/24");
        assert_eq!(j[1]["reservation"], false);
    }

    #[test]
    fn a_lease_without_backend_type_shows_as_udp() {
        let mut l = lease("10.244.3.0/24", None, None);
        l.attrs = LeaseAttrs::from_json(r#"{"PublicIP":"172.16.1.12","PublicIPv6":null}"#).unwrap();
        let row = LeaseRow::from_lease(&l);
        assert_eq!(row.backend_type, "udp");
        let t = render_table(&[row], UNIX_EPOCH);
        let line = t.lines().nth(1).unwrap();
        assert!(
            line.starts_with("10.244.3.0/24") && line.contains("172.16.1.12  udp"),
            "{t}"
        );
    }

    #[test]
    fn status_says_which_leases_flanneld_programs() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let later = Some(now + Duration::from_secs(60));
        let vx = |subnet: &str, ip: &str, mac: &str, exp| {
            let mut l = lease(
                subnet,
                exp,
                Some(serde_json::json!({"VNI": 1, "VtepMAC": mac})),
            );
            l.attrs.public_ip = Some(ip.parse().unwrap());
            l
        };
        let leases = [
            vx("10.244.2.0/24", "172.16.1.13", "52:17:43:ba:2e:56", later),
            vx("10.244.1.0/24", "172.16.1.14", "26:62:24:f0:61:01", later),
            // Another node's PublicIP, a broadcast VtepMAC, the underlay's
            // subnet, an expired lease.
            vx("10.244.3.0/24", "172.16.1.14", "02:00:00:00:00:03", later),
            vx("10.244.4.0/24", "172.16.1.44", "ff:ff:ff:ff:ff:ff", later),
            vx("172.16.1.0/24", "172.16.1.99", "02:00:00:00:00:99", later),
            vx(
                "10.244.5.0/24",
                "172.16.1.55",
                "02:00:00:00:00:05",
                Some(now - Duration::from_secs(1)),
            ),
        ];
        let cfg = flannel_core::config::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        let rows = rows(&leases, Some(&cfg), now);
        let status: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r.subnet.as_str(), r.status.as_deref().unwrap()))
            .collect();
        assert_eq!(
            status[0],
            ("10.244.1.0/24", "ok"),
            "sorted by key: {status:?}"
        );
        assert_eq!(status[1], ("10.244.2.0/24", "ok"));
        assert!(
            status[2].0 == "10.244.3.0/24"
                && status[2].1.starts_with("skipped: ")
                && status[2].1.contains("PublicIP 172.16.1.14")
                && status[2].1.contains("10.244.1.0-24"),
            "{status:?}"
        );
        assert!(
            status[3].1.starts_with("skipped: ") && status[3].1.contains("VtepMAC"),
            "{status:?}"
        );
        assert_eq!(status[4], ("10.244.5.0/24", "expired"));
        assert!(
            status[5].0 == "172.16.1.0/24"
                && status[5].1.contains("not inside the cluster network"),
            "{status:?}"
        );
        let t = render_table(&rows, now);
        assert!(t.lines().next().unwrap().ends_with("STATUS"), "{t}");
        assert!(t.lines().nth(1).unwrap().ends_with("  ok"), "{t}");
        let j: serde_json::Value = serde_json::from_str(&render_json(&rows)).unwrap();
        assert_eq!(j[4]["status"], "expired");
        // Without the config nothing is claimed.
        assert!(super::rows(&leases, None, now)
            .iter()
            .all(|r| r.status.is_none()));
    }

    #[test]
    fn missing_store_is_a_clear_error() {
        let e = read_local(Path::new("/nonexistent/flannel-store")).unwrap_err();
        assert!(e.to_string().contains("--local-store"), "{e}");
    }
}
