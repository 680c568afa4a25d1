//! Leases: which node holds which subnet and how to reach it.
//!
//! The JSON of [`LeaseAttrs`] is byte-compatible with upstream flannel's etcd
//! value: `{"PublicIP":"172.16.1.14","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"26:62:24:f0:61:01"}}`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::SystemTime;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Deserializer, Serialize};

use crate::mac::MacAddr;

mod record;
pub use record::{from_unix_ms, to_unix_ms, LeaseRecord};

/// The attributes a node publishes with its lease (upstream's `LeaseAttrs`).
///
/// Field order, `null` for a missing `PublicIPv6` and the omission of an
/// empty `BackendType` / absent `BackendData` / `BackendV6Data` follow
/// upstream. A missing IPv4 `PublicIP` (IPv6-only node) is written as
/// `"0.0.0.0"`, as upstream does, and `"0.0.0.0"` or `null` read back as `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// The derives become inherent functions, which the trait impls of
// `object_only!` call (after checking that the value is a JSON object).
#[serde(remote = "Self")]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP", default, with = "public_ip_v4")]
    pub public_ip: Option<Ipv4Addr>,
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub backend_type: String,
    /// Backend-specific data; for vxlan a [`VxlanBackendData`], for
    /// wireguard a `wireguard::WireguardBackendData`.
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<BackendData>,
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_v6_data: Option<BackendData>,
}

/// `Serialize` and `Deserialize` for a struct derived with
/// `#[serde(remote = "Self")]`, deserialized from a map only. serde's derive
/// also takes a sequence of the fields in order (`["1.2.3.4",null,"vxlan"]`),
/// which Go's decoding into upstream's struct refuses; so does every reader
/// of a lease value (etcd values, local store files, `flannelctl`).
macro_rules! object_only {
    ($ty:ident, $expecting:expr) => {
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                // The derived (inherent) function: inherent items win over the trait's.
                $ty::serialize(self, s)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct ObjectOnly;
                impl<'de> serde::de::Visitor<'de> for ObjectOnly {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        map: A,
                    ) -> Result<$ty, A::Error> {
                        $ty::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    }
                }
                d.deserialize_map(ObjectOnly)
            }
        }
    };
}
pub(crate) use object_only;

object_only!(
    LeaseAttrs,
    "a lease value: a JSON object like {\"PublicIP\":\"172.16.1.14\",...}"
);

/// A lease's backend data (`BackendData`, `BackendV6Data`), kept as its
/// JSON text: exactly what was read (a peer's value is written back byte for
/// byte, whatever its field order or numbers) or what our structs serialise
/// to (upstream's field order: vxlan `VNI`, `VtepMAC`; wireguard
/// `PublicKey`, `Port`). A few dozen bytes per lease, where a parsed
/// `serde_json::Value` object costs a B-tree node (about 700 bytes); it is
/// parsed when read ([`BackendData::parse`]).
#[derive(Clone)]
pub struct BackendData(Box<serde_json::value::RawValue>);

impl BackendData {
    /// `value` as backend data.
    pub fn new<T: Serialize>(value: &T) -> BackendData {
        BackendData(serde_json::value::to_raw_value(value).expect("backend data serialises"))
    }

    /// JSON text as backend data (checked to be JSON; surrounding blanks
    /// dropped).
    pub fn from_json(text: &str) -> Result<BackendData, serde_json::Error> {
        serde_json::value::RawValue::from_string(text.trim().to_string()).map(BackendData)
    }

    /// The JSON text.
    pub fn as_json(&self) -> &str {
        self.0.get()
    }

    /// The data as `T`; `None` when it is not one.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Option<T> {
        serde_json::from_str(self.0.get()).ok()
    }
}

impl PartialEq for BackendData {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Eq for BackendData {}

impl fmt::Debug for BackendData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.get())
    }
}

impl Serialize for BackendData {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for BackendData {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Box::<serde_json::value::RawValue>::deserialize(d).map(BackendData)
    }
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

/// Upstream's `PublicIP` is a plain IPv4 value: the unset one is `0.0.0.0`.
mod public_ip_v4 {
    use std::net::Ipv4Addr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ip: &Option<Ipv4Addr>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&ip.unwrap_or(Ipv4Addr::UNSPECIFIED))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv4Addr>, D::Error> {
        Ok(Option::<Ipv4Addr>::deserialize(d)?.filter(|ip| !ip.is_unspecified()))
    }
}

/// A store key that is not a lease key (`10.244.1.0-24`,
/// `10.244.1.0-24&fd00:10:244:1::-64`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid lease key {key:?}: {reason}; expected \"10.244.1.0-24\" or \"10.244.1.0-24&fd00:10:244:1::-64\"")]
pub struct ParseLeaseKeyError {
    pub key: String,
    pub reason: String,
}

impl LeaseKey {
    /// An IPv4-only key.
    pub fn v4(net: Ipv4Net) -> Self {
        LeaseKey {
            ipv4: Some(net),
            ipv6: None,
        }
    }

    /// An IPv6-only key.
    pub fn v6(net: Ipv6Net) -> Self {
        LeaseKey {
            ipv4: None,
            ipv6: Some(net),
        }
    }

    /// A dual-stack key.
    pub fn dual(v4: Ipv4Net, v6: Ipv6Net) -> Self {
        LeaseKey {
            ipv4: Some(v4),
            ipv6: Some(v6),
        }
    }

    /// Neither family set: not a usable key.
    pub fn is_empty(&self) -> bool {
        self.ipv4.is_none() && self.ipv6.is_none()
    }

    /// Whether the two keys share an address in either family.
    pub fn overlaps(&self, other: &LeaseKey) -> bool {
        let v4 =
            matches!((self.ipv4, other.ipv4), (Some(a), Some(b)) if crate::ip::overlaps(&a, &b));
        let v6 =
            matches!((self.ipv6, other.ipv6), (Some(a), Some(b)) if crate::ip::overlaps(&a, &b));
        v4 || v6
    }
}

/// Upstream's store key: `10.244.1.0-24`, dual stack
/// `10.244.1.0-24&fd00:10:244:1::-64`, IPv6 only `0.0.0.0-0&fd00:10:244:1::-64`
/// (upstream always writes an IPv4 part).
impl fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ipv4 {
            Some(n) => write!(f, "{}-{}", n.addr(), n.prefix_len())?,
            None => f.write_str("0.0.0.0-0")?,
        }
        if let Some(n) = self.ipv6 {
            write!(f, "&{}-{}", n.addr(), n.prefix_len())?;
        }
        Ok(())
    }
}

/// Parses upstream's store key (see [`LeaseKey`]'s `Display`). An IPv4 part
/// of `0.0.0.0-0` means IPv6 only; a bare IPv6 part (`fd00::-64`) is
/// accepted as IPv6 only too. Host bits must be clear, and the key must be
/// spelt as `Display` writes it (no `010.244.1.0`, `-024`, `-+24`,
/// `FD00::` or `fd00:0::`): another spelling of the same subnet is another
/// etcd key, so a renewal or delete would miss the key that was read, and
/// two keys could hand out one subnet.
impl FromStr for LeaseKey {
    type Err = ParseLeaseKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| ParseLeaseKeyError {
            key: s.to_string(),
            reason: reason.to_string(),
        };
        let (v4_part, v6_part) = match s.split_once('&') {
            Some((a, b)) => (Some(a), Some(b)),
            None if s.contains(':') => (None, Some(s)),
            None => (Some(s), None),
        };
        let mut key = LeaseKey {
            ipv4: None,
            ipv6: None,
        };
        if let Some(p) = v4_part {
            let (addr, len) = p
                .rsplit_once('-')
                .ok_or_else(|| err("the IPv4 part has no '-<prefix length>'"))?;
            let addr: Ipv4Addr = addr
                .parse()
                .map_err(|_| err("the IPv4 part is not an IPv4 address"))?;
            let len: u8 = len
                .parse()
                .map_err(|_| err("the IPv4 prefix length is not a number"))?;
            let net =
                Ipv4Net::new(addr, len).map_err(|_| err("the IPv4 prefix length exceeds 32"))?;
            if net.trunc() != net {
                return Err(err("the IPv4 subnet has host bits set"));
            }
            if !(addr.is_unspecified() && len == 0) {
                key.ipv4 = Some(net);
            }
        }
        if let Some(p) = v6_part {
            let (addr, len) = p
                .rsplit_once('-')
                .ok_or_else(|| err("the IPv6 part has no '-<prefix length>'"))?;
            let addr: Ipv6Addr = addr
                .parse()
                .map_err(|_| err("the IPv6 part is not an IPv6 address"))?;
            let len: u8 = len
                .parse()
                .map_err(|_| err("the IPv6 prefix length is not a number"))?;
            let net =
                Ipv6Net::new(addr, len).map_err(|_| err("the IPv6 prefix length exceeds 128"))?;
            if net.trunc() != net {
                return Err(err("the IPv6 subnet has host bits set"));
            }
            key.ipv6 = Some(net);
        }
        if key.is_empty() {
            return Err(err("it names no subnet"));
        }
        let canonical = key.to_string();
        let bare_v6 = v4_part.is_none() && canonical.strip_prefix("0.0.0.0-0&") == Some(s);
        if canonical != s && !bare_v6 {
            return Err(err(&format!(
                "it is not in canonical form; write it as {canonical:?}"
            )));
        }
        Ok(key)
    }
}

impl Serialize for LeaseKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LeaseKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `BackendType` of the vxlan backend.
pub const BACKEND_VXLAN: &str = crate::wire::BACKEND_TYPE_VXLAN;
/// `BackendType` of the host-gw backend.
pub const BACKEND_HOST_GW: &str = crate::wire::BACKEND_TYPE_HOST_GW;
/// `BackendType` of the udp backend.
pub const BACKEND_UDP: &str = crate::wire::BACKEND_TYPE_UDP;

impl LeaseAttrs {
    /// Attributes without backend data, `BackendType` as given (host-gw;
    /// for udp see [`LeaseAttrs::new_udp`]).
    pub fn new(
        backend_type: &str,
        public_ip: Option<Ipv4Addr>,
        public_ipv6: Option<Ipv6Addr>,
    ) -> Self {
        LeaseAttrs {
            public_ip,
            public_ipv6,
            backend_type: backend_type.to_string(),
            backend_data: None,
            backend_v6_data: None,
        }
    }

    /// udp attributes, exactly as upstream's udp backend writes them: the
    /// PublicIP and nothing else, so `{"PublicIP":"172.16.1.12","PublicIPv6":null}`
    /// with no `BackendType` key (etcd and the local store), and in
    /// Kubernetes mode the annotations `backend-type: ""` and
    /// `backend-data: "null"`. Upstream's udp nodes ignore `BackendType`
    /// (they take every lease as a peer), so they accept this; flannel-rs's
    /// udp nodes read a missing or empty `BackendType` as udp, and `"udp"`
    /// too ([`LeaseAttrs::effective_backend_type`]).
    pub fn new_udp(public_ip: Ipv4Addr) -> Self {
        LeaseAttrs::new("", Some(public_ip), None)
    }

    /// The backend this lease is of, as flannel-rs's peer selection reads
    /// it: its `BackendType`, and udp when that is missing or empty
    /// (upstream's udp backend writes none, see [`LeaseAttrs::new_udp`]).
    /// So only a udp node takes an untyped lease as a peer's; vxlan and
    /// host-gw nodes, like upstream's, skip it. (Upstream's alloc and
    /// tencentvpc backends write no `BackendType` either; flannel-rs runs
    /// neither, and a cluster runs one backend.)
    pub fn effective_backend_type(&self) -> &str {
        if self.backend_type.is_empty() {
            BACKEND_UDP
        } else {
            &self.backend_type
        }
    }

    /// vxlan attributes: `v4` goes to `BackendData` (the `flannel.<VNI>`
    /// device), `v6` to `BackendV6Data` (`flannel-v6.<VNI>`); each is present
    /// only when its family is served.
    pub fn new_vxlan(
        public_ip: Option<Ipv4Addr>,
        v4: Option<VxlanBackendData>,
        public_ipv6: Option<Ipv6Addr>,
        v6: Option<VxlanBackendData>,
    ) -> Self {
        LeaseAttrs {
            public_ip,
            public_ipv6,
            backend_type: BACKEND_VXLAN.to_string(),
            backend_data: v4.as_ref().map(BackendData::new),
            backend_v6_data: v6.as_ref().map(BackendData::new),
        }
    }

    /// `BackendData` as vxlan data; `None` when absent or malformed.
    pub fn vxlan_data(&self) -> Option<VxlanBackendData> {
        self.backend_data.as_ref()?.parse()
    }

    /// `BackendV6Data` as vxlan data; `None` when absent or malformed.
    pub fn vxlan_v6_data(&self) -> Option<VxlanBackendData> {
        self.backend_v6_data.as_ref()?.parse()
    }

    /// The public IP of one family.
    pub fn public_ip_of(&self, family: IpFamily) -> Option<IpAddr> {
        match family {
            IpFamily::V4 => self.public_ip.map(IpAddr::V4),
            IpFamily::V6 => self.public_ipv6.map(IpAddr::V6),
        }
    }

    /// The upstream JSON (the etcd value).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("LeaseAttrs serialises")
    }

    /// Parses the upstream JSON: an object. (serde alone would also take a
    /// JSON array of the fields in order; Go's decoding into upstream's
    /// struct does not, and neither does this.)
    pub fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        if !s.trim_start().starts_with('{') {
            return Err(serde::de::Error::custom(format!(
                "a lease value is a JSON object like {{\"PublicIP\":\"172.16.1.14\",...}}, not {s:?}"
            )));
        }
        serde_json::from_str(s)
    }
}

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

impl LeaseKey {
    /// The subnet of one family.
    pub fn subnet(&self, family: IpFamily) -> Option<ipnet::IpNet> {
        match family {
            IpFamily::V4 => self.ipv4.map(ipnet::IpNet::V4),
            IpFamily::V6 => self.ipv6.map(ipnet::IpNet::V6),
        }
    }
}

impl Lease {
    /// A key without TTL: it belongs to the node named by its PublicIP and
    /// is never reallocated.
    pub fn is_reservation(&self) -> bool {
        self.expiration.is_none()
    }

    /// Whether the lease's TTL has run out at `now` (never for a reservation).
    pub fn is_expired(&self, now: SystemTime) -> bool {
        matches!(self.expiration, Some(t) if t <= now)
    }

    /// Still holding its subnet at `now`: a reservation or an unexpired lease.
    pub fn is_live(&self, now: SystemTime) -> bool {
        !self.is_expired(now)
    }

    /// When to renew: `margin` (`--subnet-lease-renew-margin`) before the
    /// expiration; a time already past means "now". `None` for a
    /// reservation, which is never renewed.
    pub fn renew_at(&self, margin: std::time::Duration) -> Option<SystemTime> {
        let exp = self.expiration?;
        Some(exp.checked_sub(margin).unwrap_or(exp))
    }
}

/// Leases exactly as upstream flanneld writes them, for the golden tests of
/// this crate (lease parsing here, peer selection in `udp` and `datapath`).
///
/// The etcd values follow upstream's `LeaseAttrs` JSON (v0.20.2 and current
/// master): udp sets only `PublicIP` (`pkg/backend/udp/udp_amd64.go`),
/// host-gw adds `"BackendType":"host-gw"`, vxlan `"BackendType":"vxlan"` and
/// `BackendData`; `BackendType`/`BackendData` are `omitempty`. The
/// Kubernetes values are the annotations of a real run
/// (`nodes-after-{udp,host-gw,vxlan}.json` of the kube recordings: node
/// `k8s-node1` 172.16.1.12 with podCIDR 10.244.1.0/24, `k8s-node2`
/// 172.16.1.13 with 10.244.2.0/24).
#[cfg(test)]
pub(crate) mod upstream {
    use super::*;

    /// Upstream's udp lease in etcd: no `BackendType`, no `BackendData`.
    pub const ETCD_UDP: &str = r#"{"PublicIP":"172.16.1.12","PublicIPv6":null}"#;
    /// Upstream's host-gw lease in etcd.
    pub const ETCD_HOST_GW: &str =
        r#"{"PublicIP":"172.16.1.12","PublicIPv6":null,"BackendType":"host-gw"}"#;
    /// The same with an explicit `null` `BackendData` (what upstream's
    /// `json.RawMessage("null")` of a Kubernetes-mode lease marshals to).
    pub const ETCD_HOST_GW_NULL_DATA: &str = r#"{"PublicIP":"172.16.1.12","PublicIPv6":null,"BackendType":"host-gw","BackendData":null}"#;
    /// Upstream's vxlan lease in etcd.
    pub const ETCD_VXLAN: &str = r#"{"PublicIP":"172.16.1.12","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"1e:2c:f9:33:d5:9b"}}"#;

    /// The `LeaseAttrs` a peer reads off a Node with these annotations
    /// (flannel-core's own Kubernetes conversion, `kube::NodeView::lease`).
    pub fn from_annotations(public_ip: &str, backend_type: &str, backend_data: &str) -> LeaseAttrs {
        let names = crate::kube::AnnotationNames::new(crate::wire::DEFAULT_KUBE_ANNOTATION_PREFIX)
            .expect("default prefix");
        let annotations = std::collections::BTreeMap::from([
            (names.subnet_manager.clone(), "true".to_string()),
            (names.public_ip.clone(), public_ip.to_string()),
            (names.backend_type.clone(), backend_type.to_string()),
            (names.backend_data.clone(), backend_data.to_string()),
        ]);
        let cidrs = ["10.244.2.0/24".to_string()];
        let node = crate::kube::NodeView {
            name: "k8s-node2",
            annotations: &annotations,
            pod_cidr: Some("10.244.2.0/24"),
            pod_cidrs: &cidrs,
        };
        let cfg = crate::config::parse(r#"{"Network":"10.244.0.0/16"}"#).expect("config");
        node.lease(&names, &cfg)
            .expect("the recorded annotations parse")
            .expect("a managed Node")
            .attrs
    }

    /// `k8s-node2` of `nodes-after-udp.json`: backend-type `""`, backend-data `"null"`.
    pub fn kube_udp() -> LeaseAttrs {
        from_annotations("172.16.1.13", "", "null")
    }

    /// `k8s-node2` of `nodes-after-host-gw.json`.
    pub fn kube_host_gw() -> LeaseAttrs {
        from_annotations("172.16.1.13", "host-gw", "null")
    }

    /// `k8s-node2` of `nodes-after-vxlan.json`.
    pub fn kube_vxlan() -> LeaseAttrs {
        from_annotations(
            "172.16.1.13",
            "vxlan",
            r#"{"VNI":1,"VtepMAC":"b6:e3:3e:76:79:d1"}"#,
        )
    }

    /// A lease without expiry of `attrs` for `key`.
    pub fn lease(key: &str, attrs: LeaseAttrs) -> Lease {
        Lease {
            key: key.parse().expect("lease key"),
            attrs,
            expiration: None,
        }
    }

    /// `attrs` parsed from one of the etcd values.
    pub fn etcd(json: &str) -> LeaseAttrs {
        LeaseAttrs::from_json(json).expect("upstream's lease parses")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const GOLDEN: &str = r#"{"PublicIP":"172.16.1.14","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"26:62:24:f0:61:01"}}"#;

    fn mac(s: &str) -> MacAddr {
        s.parse().unwrap()
    }

    #[test]
    fn golden_json() {
        let a = LeaseAttrs::new_vxlan(
            Some(Ipv4Addr::new(172, 16, 1, 14)),
            Some(VxlanBackendData {
                vni: 1,
                vtep_mac: mac("26:62:24:f0:61:01"),
            }),
            None,
            None,
        );
        assert_eq!(a.to_json(), GOLDEN);
        let back = LeaseAttrs::from_json(GOLDEN).unwrap();
        assert_eq!(back, a);
        assert_eq!(back.to_json(), GOLDEN);
        assert_eq!(
            back.vxlan_data(),
            Some(VxlanBackendData {
                vni: 1,
                vtep_mac: mac("26:62:24:f0:61:01")
            })
        );
        assert_eq!(back.vxlan_v6_data(), None);
    }

    #[test]
    fn dual_stack_json() {
        let a = LeaseAttrs::new_vxlan(
            Some(Ipv4Addr::new(172, 16, 1, 14)),
            Some(VxlanBackendData {
                vni: 1,
                vtep_mac: mac("26:62:24:f0:61:01"),
            }),
            Some("fd00::14".parse().unwrap()),
            Some(VxlanBackendData {
                vni: 1,
                vtep_mac: mac("26:62:24:f0:61:02"),
            }),
        );
        let j = a.to_json();
        assert_eq!(
            j,
            r#"{"PublicIP":"172.16.1.14","PublicIPv6":"fd00::14","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"26:62:24:f0:61:01"},"BackendV6Data":{"VNI":1,"VtepMAC":"26:62:24:f0:61:02"}}"#
        );
        let back = LeaseAttrs::from_json(&j).unwrap();
        assert_eq!(back, a);
        assert_eq!(
            back.vxlan_v6_data().unwrap().vtep_mac,
            mac("26:62:24:f0:61:02")
        );
        assert_eq!(
            back.public_ip_of(IpFamily::V6),
            Some("fd00::14".parse().unwrap())
        );
    }

    #[test]
    fn host_gw_and_v6_only_json() {
        let a = LeaseAttrs::new(BACKEND_HOST_GW, Some(Ipv4Addr::new(10, 0, 0, 2)), None);
        assert_eq!(
            a.to_json(),
            r#"{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"host-gw"}"#
        );
        let v6only = LeaseAttrs::new(BACKEND_HOST_GW, None, Some("fd00::2".parse().unwrap()));
        let j = v6only.to_json();
        assert_eq!(
            j,
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00::2","BackendType":"host-gw"}"#
        );
        assert_eq!(LeaseAttrs::from_json(&j).unwrap(), v6only);
        // Tolerated on input: null PublicIP, missing optional fields.
        let t = LeaseAttrs::from_json(r#"{"PublicIP":null}"#).unwrap();
        assert_eq!(t.public_ip, None);
        assert_eq!(t.backend_type, "");
        assert_eq!(t.to_json(), r#"{"PublicIP":"0.0.0.0","PublicIPv6":null}"#);
    }

    #[test]
    fn upstream_udp_lease_reads_as_udp_and_ours_is_byte_identical() {
        let up = upstream::etcd(upstream::ETCD_UDP);
        assert_eq!(up.public_ip, Some(Ipv4Addr::new(172, 16, 1, 12)));
        assert_eq!((up.backend_type.as_str(), &up.backend_data), ("", &None));
        assert_eq!(up.effective_backend_type(), BACKEND_UDP);
        // What we write is upstream's value, byte for byte, and reads back the same.
        let ours = LeaseAttrs::new_udp(Ipv4Addr::new(172, 16, 1, 12));
        assert_eq!(ours.to_json(), upstream::ETCD_UDP);
        assert_eq!(LeaseAttrs::from_json(&ours.to_json()).unwrap(), ours);
        assert_eq!(ours, up);
        // An explicit empty type, and "udp" (flannel-rs before it matched
        // upstream), read as udp too.
        for j in [
            r#"{"PublicIP":"172.16.1.12","PublicIPv6":null,"BackendType":""}"#,
            r#"{"PublicIP":"172.16.1.12","PublicIPv6":null,"BackendType":"udp"}"#,
        ] {
            assert_eq!(
                upstream::etcd(j).effective_backend_type(),
                BACKEND_UDP,
                "{j}"
            );
        }
        // Kubernetes mode: backend-type "" and backend-data "null".
        let kube = upstream::kube_udp();
        assert_eq!(kube.effective_backend_type(), BACKEND_UDP);
        assert_eq!(kube.backend_data, None, "\"null\" is no data");
        assert_eq!(kube, LeaseAttrs::new_udp(Ipv4Addr::new(172, 16, 1, 13)));
    }

    #[test]
    fn upstream_host_gw_and_vxlan_leases_read_as_their_backend() {
        for j in [upstream::ETCD_HOST_GW, upstream::ETCD_HOST_GW_NULL_DATA] {
            let a = upstream::etcd(j);
            assert_eq!(a.effective_backend_type(), BACKEND_HOST_GW, "{j}");
            assert_eq!(a.public_ip, Some(Ipv4Addr::new(172, 16, 1, 12)), "{j}");
            assert_eq!(a.backend_data, None, "{j}: null is no data");
        }
        // What we write for host-gw is upstream's value.
        assert_eq!(
            LeaseAttrs::new(BACKEND_HOST_GW, Some(Ipv4Addr::new(172, 16, 1, 12)), None).to_json(),
            upstream::ETCD_HOST_GW
        );
        assert_eq!(
            upstream::kube_host_gw().effective_backend_type(),
            BACKEND_HOST_GW
        );

        let vx = upstream::etcd(upstream::ETCD_VXLAN);
        assert_eq!(vx.effective_backend_type(), BACKEND_VXLAN);
        let data = VxlanBackendData {
            vni: 1,
            vtep_mac: mac("1e:2c:f9:33:d5:9b"),
        };
        assert_eq!(vx.vxlan_data(), Some(data));
        // What we write for vxlan is upstream's value.
        assert_eq!(
            LeaseAttrs::new_vxlan(Some(Ipv4Addr::new(172, 16, 1, 12)), Some(data), None, None)
                .to_json(),
            upstream::ETCD_VXLAN
        );
        let kube = upstream::kube_vxlan();
        assert_eq!(kube.effective_backend_type(), BACKEND_VXLAN);
        assert_eq!(
            kube.vxlan_data().map(|d| d.vtep_mac),
            Some(mac("b6:e3:3e:76:79:d1"))
        );
        // A null BackendData is no vxlan data (and so no vxlan peer).
        let mut null = kube;
        null.backend_data = Some(BackendData::from_json("null").unwrap());
        assert_eq!(null.vxlan_data(), None);
    }

    #[test]
    fn malformed_backend_data() {
        for bad in [
            r#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VNI":"x","VtepMAC":"26:62:24:f0:61:01"}}"#,
            r#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"nope"}}"#,
            r#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VNI":1}}"#,
            r#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":[]}"#,
            r#"{"PublicIP":"1.2.3.4","BackendType":"vxlan"}"#,
        ] {
            let a = LeaseAttrs::from_json(bad).unwrap();
            assert_eq!(a.vxlan_data(), None, "{bad}");
        }
        assert!(LeaseAttrs::from_json(r#"{"PublicIP":"1.2.3"}"#).is_err());
        assert!(LeaseAttrs::from_json(r#"{"PublicIP":"1.2.3.4","PublicIPv6":"zz"}"#).is_err());
    }

    #[test]
    fn key_string_forms() {
        let k: LeaseKey = "10.244.1.0-24".parse().unwrap();
        assert_eq!(k, LeaseKey::v4("10.244.1.0/24".parse().unwrap()));
        assert_eq!(k.to_string(), "10.244.1.0-24");

        let d = "10.244.1.0-24&fd00:10:244:1::-64";
        let k: LeaseKey = d.parse().unwrap();
        assert_eq!(
            k,
            LeaseKey::dual(
                "10.244.1.0/24".parse().unwrap(),
                "fd00:10:244:1::/64".parse().unwrap()
            )
        );
        assert_eq!(k.to_string(), d);

        let v6 = LeaseKey::v6("fd00:10:244:1::/64".parse().unwrap());
        assert_eq!(v6.to_string(), "0.0.0.0-0&fd00:10:244:1::-64");
        assert_eq!(
            "0.0.0.0-0&fd00:10:244:1::-64".parse::<LeaseKey>().unwrap(),
            v6
        );
        assert_eq!("fd00:10:244:1::-64".parse::<LeaseKey>().unwrap(), v6);

        // JSON as a string.
        assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{d}\""));
        assert_eq!(
            serde_json::from_str::<LeaseKey>(&format!("\"{d}\"")).unwrap(),
            k
        );
    }

    #[test]
    fn key_parse_errors() {
        for bad in [
            "",
            "10.244.1.0",
            "10.244.1.0/24",
            "10.244.1-24",
            "10.244.1.0-33",
            "10.244.1.0-x",
            "10.244.1.1-24",
            "0.0.0.0-0",
            "10.244.1.0-24&",
            "10.244.1.0-24&fd00::",
            "10.244.1.0-24&fd00::-129",
            "10.244.1.0-24&fd00::1-64",
            "10.244.1.0-24&10.0.0.0-8",
            // Other spellings of canonical keys (found by fuzz/lease_key).
            "10.244.1.0-024",
            "10.244.1.0-+24",
            "10.244.1.0-24&FD00::-64",
            "10.244.1.0-24&fd00:0::-64",
            "10.244.1.0-24&fd00:0:0:0:0:0:0:0-64",
            "0.0.0.0-0&fd00::-064",
            "fd00:0::-64",
        ] {
            let e = bad.parse::<LeaseKey>().expect_err(bad);
            assert!(e.to_string().contains("expected \"10.244.1.0-24\""), "{e}");
            assert_eq!(e.key, bad);
        }
    }

    #[test]
    fn key_overlap() {
        let a: LeaseKey = "10.244.1.0-24".parse().unwrap();
        let b: LeaseKey = "10.244.0.0-23".parse().unwrap();
        let c: LeaseKey = "10.244.2.0-24&fd00::-64".parse().unwrap();
        let d: LeaseKey = "fd00::-64".parse().unwrap();
        assert!(a.overlaps(&b));
        assert!(!a.overlaps(&c));
        assert!(c.overlaps(&d));
        assert!(!a.overlaps(&d));
    }

    #[test]
    fn expiry() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut l = Lease {
            key: "10.244.1.0-24".parse().unwrap(),
            attrs: LeaseAttrs::from_json(GOLDEN).unwrap(),
            expiration: None,
        };
        assert!(l.is_reservation());
        assert!(!l.is_expired(t0));
        assert!(l.is_live(t0));
        l.expiration = Some(t0);
        assert!(!l.is_reservation());
        assert!(l.is_expired(t0));
        assert!(!l.is_expired(t0 - Duration::from_secs(1)));
        assert!(l.is_expired(t0 + Duration::from_secs(1)));
        assert_eq!(
            l.renew_at(Duration::from_secs(3600)),
            Some(t0 - Duration::from_secs(3600))
        );
        l.expiration = None;
        assert_eq!(l.renew_at(Duration::from_secs(3600)), None);
    }
}
