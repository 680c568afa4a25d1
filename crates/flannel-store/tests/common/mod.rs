//! Helpers shared by the store tests: unique temp dirs, configs, attributes.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use flannel_core::config::NetConfig;
use flannel_core::lease::{LeaseAttrs, LeaseKey};

/// A directory under the system temp dir, unique per process and call,
/// removed (with its content) when dropped, also on panic.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "flannel-store-test-{}-{}-{name}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create test dir");
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A config from net-conf JSON, parsed by core.
pub fn net_config(network: &str, subnet_len: u8) -> NetConfig {
    let json = format!(
        r#"{{"Network":"{network}","SubnetLen":{subnet_len},"Backend":{{"Type":"vxlan"}}}}"#
    );
    flannel_core::config::parse(&json).expect("test config parses")
}

/// Lease attributes of node `n`: PublicIP 172.16.0.n, vxlan VNI 1.
pub fn attrs(n: u8) -> LeaseAttrs {
    attrs_ip(Ipv4Addr::new(172, 16, 0, n))
}

pub fn attrs_ip(ip: Ipv4Addr) -> LeaseAttrs {
    let o = ip.octets();
    LeaseAttrs {
        public_ip: Some(ip),
        public_ipv6: None,
        backend_type: "vxlan".into(),
        backend_data: Some(flannel_core::lease::BackendData::new(&serde_json::json!({
            "VNI": 1,
            "VtepMAC": format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]),
        }))),
        backend_v6_data: None,
    }
}

pub fn key(s: &str) -> LeaseKey {
    s.parse().expect("test lease key parses")
}

/// A single-threaded runtime for tests that run several acquirers on threads.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}
