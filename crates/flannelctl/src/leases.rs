//! `flannelctl leases [--local-store DIR | --etcd-endpoints URLS ... |
//! --kube-subnet-mgr ...] [--json]`: who holds which subnet.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flannel_core::lease::{Lease, VxlanBackendData};
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
        }
    }
}

/// Every lease of a local store directory, sorted by subnet.
pub fn list(dir: &Path) -> Result<Vec<LeaseRow>, LeasesError> {
    Ok(read_local(dir)?.iter().map(LeaseRow::from_lease).collect())
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

/// Every lease held in etcd below `opts.prefix`, sorted by subnet (one
/// connection attempt; an unreachable etcd is an error naming the endpoints).
///
/// `etcdctl --endpoints=URLS get --prefix /coreos.com/network/subnets/`
pub fn list_etcd(opts: flannel_store::etcd::EtcdOptions) -> Result<Vec<LeaseRow>, LeasesError> {
    Ok(read_etcd(opts)?.iter().map(LeaseRow::from_lease).collect())
}

/// The leases themselves held in etcd, sorted by subnet.
pub fn read_etcd(opts: flannel_store::etcd::EtcdOptions) -> Result<Vec<Lease>, LeasesError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LeasesError::Runtime)?;
    let endpoints = opts.endpoints.join(",");
    let leases = rt.block_on(async {
        use flannel_store::Store;
        let store = flannel_store::etcd::EtcdStore::connect(opts)
            .await
            .map_err(LeasesError::EtcdConnect)?;
        store
            .list_leases()
            .await
            .map_err(|source| LeasesError::Etcd { endpoints, source })
    })?;
    let mut leases = leases.leases;
    leases.sort_by_key(|l| l.key);
    Ok(leases)
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

/// A table: SUBNET PUBLIC-IP BACKEND VNI VTEP-MAC EXPIRES.
pub fn render_table(rows: &[LeaseRow], now: SystemTime) -> String {
    let header = [
        "SUBNET",
        "PUBLIC-IP",
        "BACKEND",
        "VNI",
        "VTEP-MAC",
        "EXPIRES",
    ];
    let dash = || "-".to_string();
    let lines: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.subnet.clone(),
                r.public_ip.map(|i| i.to_string()).unwrap_or_else(dash),
                r.backend_type.clone(),
                r.vni.map(|v| v.to_string()).unwrap_or_else(dash),
                r.vtep_mac.clone().unwrap_or_else(dash),
                human_expiry(r, now),
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
    fn missing_store_is_a_clear_error() {
        let e = list(Path::new("/nonexistent/flannel-store")).unwrap_err();
        assert!(e.to_string().contains("--local-store"), "{e}");
    }
}
