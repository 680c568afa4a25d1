//! Leases: which node holds which subnet and how to reach it.
//!
//! The JSON of [`LeaseAttrs`] is byte-compatible with upstream flannel's etcd
//! value: `{"PublicIP":"172.16.1.14","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"26:62:24:f0:61:01"}}`.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::SystemTime;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::mac::MacAddr;

/// The attributes a node publishes with its lease (upstream's `LeaseAttrs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Option<Ipv4Addr>,
    #[serde(rename = "PublicIPv6")]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(rename = "BackendType")]
    pub backend_type: String,
    /// Backend-specific data; for vxlan a [`VxlanBackendData`].
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<serde_json::Value>,
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_v6_data: Option<serde_json::Value>,
}

/// The vxlan backend's data: `{"VNI":1,"VtepMAC":"26:62:24:f0:61:01"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanBackendData {
    #[serde(rename = "VNI")]
    pub vni: u32,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: MacAddr,
}

/// The subnet(s) a lease covers. The store key is `10.244.1.0-24`, or
/// `10.244.1.0-24&fd00:10:244:1::-64` in dual stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseKey {
    pub ipv4: Option<Ipv4Net>,
    pub ipv6: Option<Ipv6Net>,
}

/// A lease as read from or written to a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: LeaseKey,
    pub attrs: LeaseAttrs,
    /// `None`: a reservation (no TTL), never reallocated and never expiring.
    pub expiration: Option<SystemTime>,
}

/// A change seen by a store watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A lease appeared or its attributes/expiry changed.
    Upsert(Lease),
    /// A lease was deleted or expired.
    Removed(LeaseKey),
}
