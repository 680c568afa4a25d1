//! Kubernetes mode (`--kube-subnet-mgr`), the part that needs no API server:
//! annotation names, a Node's lease, this node's subnet, and what flanneld
//! publishes on its Node.
//!
//! In this mode the subnet of a node is its `spec.podCIDR(s)` (assigned by
//! kube-controller-manager), and the rest of the lease travels as Node
//! annotations under a prefix (`flannel.alpha.coreos.com/`): `public-ip`,
//! `backend-type`, `backend-data`, ... A Node is a peer only once its flanneld
//! has marked it `kube-subnet-manager: "true"`. Everything here works on
//! plain maps and strings, so the Kubernetes client stays in `flannel-store`
//! and every rule is unit-tested against upstream's recorded bytes.
//!
//! Differences from upstream: a prefix that is not a valid annotation prefix
//! is refused at start (upstream's check is unanchored, so e.g. `Foo.example.com`
//! passes and every patch then fails with 422), and no empty patch is sent
//! when nothing changed.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;

use crate::config::NetConfig;
use crate::lease::{BackendData, Lease, LeaseAttrs, LeaseKey};
use crate::wire;

/// Why a Node, an annotation or the prefix cannot be used. Each message names
/// the Node or flag and, where there is one, the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeError {
    #[error("--kube-annotation-prefix {prefix:?}: {reason}; use a DNS name with at most one '/', e.g. \"flannel.alpha.coreos.com\" or \"example.com/flannel-\"")]
    Prefix {
        prefix: String,
        reason: &'static str,
    },
    #[error("node {node:?} pod cidr not assigned: give the node a spec.podCIDR (kube-controller-manager --allocate-node-cidrs=true --cluster-cidr=<Network>, or kubeadm init --pod-network-cidr=<Network>); flanneld waits for it")]
    PodCidrNotAssigned { node: String },
    #[error("node {node:?}: spec.{field} {value:?} is not a CIDR")]
    BadPodCidr {
        node: String,
        field: &'static str,
        value: String,
    },
    #[error("node {node:?} pod cidrs should be IPv4/IPv6 only or dualstack, not {cidrs:?}")]
    TooManyPodCidrs { node: String, cidrs: Vec<String> },
    #[error("node {node:?} has no {family} pod cidr although the network config enables {family}: give the node one ({family} in kube-controller-manager --cluster-cidr / kubeadm --pod-network-cidr) or disable {family} in net-conf.json")]
    MissingFamily { node: String, family: &'static str },
    #[error("subnet {network:?} specified in the flannel net config doesn't contain {cidr:?} PodCIDR of the {node:?} node: make Network in net-conf.json cover kube-controller-manager's --cluster-cidr")]
    OutsideNetwork {
        node: String,
        network: String,
        cidr: String,
    },
    #[error("node {node:?}: annotation {annotation} = {value:?} {reason}")]
    BadAnnotation {
        node: String,
        annotation: String,
        value: String,
        reason: String,
    },
}

/// The full annotation names for one `--kube-annotation-prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationNames {
    /// The normalised prefix, ending in `/` or `-`.
    pub prefix: String,
    pub subnet_manager: String,
    pub backend_type: String,
    pub backend_data: String,
    pub backend_v6_data: String,
    pub public_ip: String,
    pub public_ipv6: String,
    pub public_ip_overwrite: String,
    pub public_ipv6_overwrite: String,
    pub node_public_ip: String,
    pub node_public_ipv6: String,
}

impl AnnotationNames {
    /// Normalises and checks `--kube-annotation-prefix` as upstream does: at
    /// most one `/`; without one, `/` is appended; a prefix that then ends in
    /// neither `/` nor `-` gets a `-`. The result must be
    /// `<dns-name>/` or `<dns-name>/<name>-` (lowercase letters, digits, `_`,
    /// `-`, and dots between the name's labels).
    pub fn new(prefix: &str) -> Result<AnnotationNames, KubeError> {
        let err = |reason| KubeError::Prefix {
            prefix: prefix.to_string(),
            reason,
        };
        let mut p = prefix.to_string();
        match p.matches('/').count() {
            0 => p.push('/'),
            1 => {}
            _ => return Err(err("it contains more than one '/'")),
        }
        if !p.ends_with('/') && !p.ends_with('-') {
            p.push('-');
        }
        let (domain, name) = p.split_once('/').expect("one '/'");
        let label_ok = |l: &str| !l.is_empty() && l.bytes().all(annotation_byte);
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2 || !labels.iter().all(|l| label_ok(l)) {
            return Err(err(
                "the part before '/' must be a dotted name of lowercase letters, digits, '_' and '-'",
            ));
        }
        if !name.is_empty() && (name.len() < 2 || !label_ok(name)) {
            return Err(err(
                "the part after '/' must be lowercase letters, digits, '_' and '-', ending in '-'",
            ));
        }
        let n = |suffix: &str| format!("{p}{suffix}");
        Ok(AnnotationNames {
            subnet_manager: n(wire::KUBE_ANNOTATION_SUBNET_MANAGER),
            backend_type: n(wire::KUBE_ANNOTATION_BACKEND_TYPE),
            backend_data: n(wire::KUBE_ANNOTATION_BACKEND_DATA),
            backend_v6_data: n(wire::KUBE_ANNOTATION_BACKEND_V6_DATA),
            public_ip: n(wire::KUBE_ANNOTATION_PUBLIC_IP),
            public_ipv6: n(wire::KUBE_ANNOTATION_PUBLIC_IPV6),
            public_ip_overwrite: n(wire::KUBE_ANNOTATION_PUBLIC_IP_OVERWRITE),
            public_ipv6_overwrite: n(wire::KUBE_ANNOTATION_PUBLIC_IPV6_OVERWRITE),
            node_public_ip: n(wire::KUBE_ANNOTATION_NODE_PUBLIC_IP),
            node_public_ipv6: n(wire::KUBE_ANNOTATION_NODE_PUBLIC_IPV6),
            prefix: p,
        })
    }

    /// Whether `key` is one of flannel's annotations (starts with the prefix).
    pub fn is_ours(&self, key: &str) -> bool {
        key.starts_with(&self.prefix)
    }
}

fn annotation_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
}

/// What flannel reads of a Node object.
#[derive(Debug, Clone, Copy)]
pub struct NodeView<'a> {
    /// `metadata.name`.
    pub name: &'a str,
    /// `metadata.annotations`.
    pub annotations: &'a BTreeMap<String, String>,
    /// `spec.podCIDR`.
    pub pod_cidr: Option<&'a str>,
    /// `spec.podCIDRs`.
    pub pod_cidrs: &'a [String],
}

/// A Node's pod CIDRs, one per family at most.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodCidrs {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
}

impl NodeView<'_> {
    fn annotation(&self, name: &str) -> Option<&str> {
        self.annotations.get(name).map(String::as_str)
    }

    /// Whether flanneld manages this Node (`kube-subnet-manager: "true"`).
    pub fn is_managed(&self, names: &AnnotationNames) -> bool {
        self.annotation(&names.subnet_manager) == Some("true")
    }

    /// `spec.podCIDRs` when it is not empty (at most two, one per family),
    /// else `spec.podCIDR`, as upstream reads them. Host bits are cleared,
    /// as Go's `net.ParseCIDR` does.
    pub fn pod_cidrs(&self) -> Result<PodCidrs, KubeError> {
        let (field, list): (&'static str, Vec<&str>) = if self.pod_cidrs.is_empty() {
            (
                "podCIDR",
                self.pod_cidr
                    .filter(|c| !c.is_empty())
                    .into_iter()
                    .collect(),
            )
        } else if self.pod_cidrs.len() < 3 {
            (
                "podCIDRs",
                self.pod_cidrs.iter().map(String::as_str).collect(),
            )
        } else {
            return Err(KubeError::TooManyPodCidrs {
                node: self.name.to_string(),
                cidrs: self.pod_cidrs.to_vec(),
            });
        };
        let mut out = PodCidrs::default();
        for c in list {
            match IpNet::from_str(c).map_err(|_| KubeError::BadPodCidr {
                node: self.name.to_string(),
                field,
                value: c.to_string(),
            })? {
                IpNet::V4(n) => out.v4 = Some(n.trunc()),
                IpNet::V6(n) => out.v6 = Some(n.trunc()),
            }
        }
        Ok(out)
    }

    /// The Node's lease as every peer sees it (upstream's node-to-lease), or
    /// `None` when flanneld does not manage the Node (no
    /// `kube-subnet-manager: "true"`). Each enabled family needs a pod CIDR
    /// and a public address; `backend-data` / `backend-v6-data` are JSON
    /// (`null` or absent: none). The lease never expires: it lives as long as
    /// its Node.
    pub fn lease(
        &self,
        names: &AnnotationNames,
        cfg: &NetConfig,
    ) -> Result<Option<Lease>, KubeError> {
        if !self.is_managed(names) {
            return Ok(None);
        }
        let cidrs = self.pod_cidrs()?;
        let mut key = LeaseKey {
            ipv4: None,
            ipv6: None,
        };
        let mut attrs = LeaseAttrs::new(
            self.annotation(&names.backend_type).unwrap_or(""),
            None,
            None,
        );
        if cfg.enable_ipv4 {
            key.ipv4 = Some(cidrs.v4.ok_or_else(|| self.missing("IPv4"))?);
            attrs.public_ip = Some(self.address(&names.public_ip)?);
            attrs.backend_data = self.json(&names.backend_data)?;
        }
        if cfg.enable_ipv6 {
            key.ipv6 = Some(cidrs.v6.ok_or_else(|| self.missing("IPv6"))?);
            attrs.public_ipv6 = Some(self.address(&names.public_ipv6)?);
            attrs.backend_v6_data = self.json(&names.backend_v6_data)?;
        }
        if key.is_empty() {
            return Err(KubeError::PodCidrNotAssigned {
                node: self.name.to_string(),
            });
        }
        Ok(Some(Lease {
            key,
            attrs,
            expiration: None,
        }))
    }

    /// This node's own subnets: its pod CIDR of each enabled family, which
    /// must lie inside that family's network (SubnetLen/Min/Max do not apply
    /// in this mode).
    pub fn own_key(&self, cfg: &NetConfig) -> Result<LeaseKey, KubeError> {
        let cidrs = self.pod_cidrs()?;
        if cidrs.v4.is_none() && cidrs.v6.is_none() {
            return Err(KubeError::PodCidrNotAssigned {
                node: self.name.to_string(),
            });
        }
        let outside = |network: String, cidr: String| KubeError::OutsideNetwork {
            node: self.name.to_string(),
            network,
            cidr,
        };
        let mut key = LeaseKey {
            ipv4: None,
            ipv6: None,
        };
        if cfg.enable_ipv4 {
            let cidr = cidrs.v4.ok_or_else(|| self.missing("IPv4"))?;
            match cfg.network {
                Some(net) if crate::ip::contains_net(&net, &cidr) => key.ipv4 = Some(cidr),
                net => {
                    return Err(outside(
                        net.map(|n| n.to_string()).unwrap_or_default(),
                        cidr.to_string(),
                    ))
                }
            }
        }
        if cfg.enable_ipv6 {
            let cidr = cidrs.v6.ok_or_else(|| self.missing("IPv6"))?;
            match cfg.ipv6_network {
                Some(net) if crate::ip::contains_net(&net, &cidr) => key.ipv6 = Some(cidr),
                net => {
                    return Err(outside(
                        net.map(|n| n.to_string()).unwrap_or_default(),
                        cidr.to_string(),
                    ))
                }
            }
        }
        Ok(key)
    }

    /// `node-public-ip` / `node-public-ipv6`: addresses the operator set on
    /// the Node, which replace `--public-ip` / `--public-ipv6`.
    pub fn node_public_ips(
        &self,
        names: &AnnotationNames,
    ) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), KubeError> {
        let v4 = match self.annotation(&names.node_public_ip) {
            None | Some("") => None,
            Some(_) => Some(self.address(&names.node_public_ip)?),
        };
        let v6 = match self.annotation(&names.node_public_ipv6) {
            None | Some("") => None,
            Some(_) => Some(self.address(&names.node_public_ipv6)?),
        };
        Ok((v4, v6))
    }

    fn missing(&self, family: &'static str) -> KubeError {
        KubeError::MissingFamily {
            node: self.name.to_string(),
            family,
        }
    }

    fn bad(&self, annotation: &str, reason: &str) -> KubeError {
        KubeError::BadAnnotation {
            node: self.name.to_string(),
            annotation: annotation.to_string(),
            value: self.annotation(annotation).unwrap_or("").to_string(),
            reason: reason.to_string(),
        }
    }

    fn address<A: FromStr>(&self, annotation: &str) -> Result<A, KubeError> {
        match self.annotation(annotation) {
            None => Err(self.bad(annotation, "is missing")),
            Some(v) => v
                .parse()
                .map_err(|_| self.bad(annotation, "is not an address of its family")),
        }
    }

    fn json(&self, annotation: &str) -> Result<Option<BackendData>, KubeError> {
        match self.annotation(annotation).map(str::trim) {
            None | Some("") | Some("null") => Ok(None),
            Some(v) => BackendData::from_json(v)
                .map(Some)
                .map_err(|e| self.bad(annotation, &format!("is not JSON: {e}"))),
        }
    }
}

/// `BackendData` as upstream writes it into the annotation: compact JSON,
/// `null` when there is none.
fn backend_json(v: &Option<BackendData>) -> String {
    v.as_ref()
        .map_or_else(|| "null".to_string(), |d| d.as_json().to_string())
}

/// The annotations flanneld owns on its Node for `attrs`, as upstream
/// assigns them: `backend-type`; `backend-data` and `public-ip` unless
/// this is vxlan without IPv4; `backend-v6-data` and `public-ipv6` for vxlan
/// with IPv6 data and for host-gw with an IPv6 address; `kube-subnet-manager`.
/// A `public-ip-overwrite` / `public-ipv6-overwrite` annotation the operator
/// set is published instead of our own address.
pub fn desired_annotations(
    names: &AnnotationNames,
    attrs: &LeaseAttrs,
    current: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let overwrite = |name: &str| current.get(name).filter(|v| !v.is_empty()).cloned();
    let mut out = BTreeMap::new();
    out.insert(names.backend_type.clone(), attrs.backend_type.clone());
    let vxlan = attrs.backend_type == wire::BACKEND_TYPE_VXLAN;
    let wireguard = attrs.backend_type == wire::BACKEND_TYPE_WIREGUARD;
    let host_gw = attrs.backend_type == wire::BACKEND_TYPE_HOST_GW;
    if !vxlan || attrs.backend_data.is_some() {
        out.insert(
            names.backend_data.clone(),
            backend_json(&attrs.backend_data),
        );
        let ip = overwrite(&names.public_ip_overwrite)
            .unwrap_or_else(|| attrs.public_ip.unwrap_or(Ipv4Addr::UNSPECIFIED).to_string());
        out.insert(names.public_ip.clone(), ip);
    }
    let v6_data = attrs.backend_v6_data.is_some();
    let has_v6 = attrs.public_ipv6.is_some();
    if (vxlan && v6_data) || (wireguard && v6_data && has_v6) || (host_gw && has_v6) {
        out.insert(
            names.backend_v6_data.clone(),
            backend_json(&attrs.backend_v6_data),
        );
        let ip = overwrite(&names.public_ipv6_overwrite)
            .or_else(|| attrs.public_ipv6.map(|ip| ip.to_string()))
            .unwrap_or_default();
        out.insert(names.public_ipv6.clone(), ip);
    }
    out.insert(names.subnet_manager.clone(), "true".to_string());
    out
}

/// The entries of `desired` that `current` does not already hold.
pub fn annotation_changes(
    current: &BTreeMap<String, String>,
    desired: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    desired
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The strategic-merge patch of `nodes/<name>/status` that sets `changes`:
/// `{"metadata":{"annotations":{...}}}`, keys sorted, as upstream's two-way
/// merge patch is.
pub fn annotation_patch(changes: &BTreeMap<String, String>) -> String {
    serde_json::json!({ "metadata": { "annotations": changes } }).to_string()
}

/// One condition, with upstream's field order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Condition<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    status: &'a str,
    last_heartbeat_time: &'a str,
    last_transition_time: &'a str,
    reason: &'a str,
    message: &'a str,
}

/// The strategic-merge patch of `nodes/<name>/status` that sets
/// `NetworkUnavailable=False` (reason `FlannelIsUp`); `now` is RFC 3339 in
/// whole seconds, e.g. `2026-12-02T12:36:56Z`. Conditions merge by `type`, so
/// the others (Ready, ...) are left alone.
pub fn network_unavailable_patch(now: &str) -> String {
    let c = Condition {
        kind: wire::KUBE_CONDITION_NETWORK_UNAVAILABLE,
        status: "False",
        last_heartbeat_time: now,
        last_transition_time: now,
        reason: wire::KUBE_CONDITION_REASON,
        message: wire::KUBE_CONDITION_MESSAGE,
    };
    // Structs, not `json!`: a JSON map would sort the condition's keys.
    #[derive(Serialize)]
    struct Status<'a> {
        conditions: [Condition<'a>; 1],
    }
    #[derive(Serialize)]
    struct Patch<'a> {
        status: Status<'a>,
    }
    serde_json::to_string(&Patch {
        status: Status { conditions: [c] },
    })
    .expect("the condition patch serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn names() -> AnnotationNames {
        AnnotationNames::new(wire::DEFAULT_KUBE_ANNOTATION_PREFIX).unwrap()
    }

    fn cfg(json: &str) -> NetConfig {
        config::parse(json).unwrap()
    }

    fn v4() -> NetConfig {
        cfg(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn node<'a>(
        name: &'a str,
        annotations: &'a BTreeMap<String, String>,
        pod_cidr: Option<&'a str>,
        pod_cidrs: &'a [String],
    ) -> NodeView<'a> {
        NodeView {
            name,
            annotations,
            pod_cidr,
            pod_cidrs,
        }
    }

    #[test]
    fn prefix_normalisation_and_validation_as_upstream() {
        let n = names();
        assert_eq!(n.prefix, "flannel.alpha.coreos.com/");
        assert_eq!(n.backend_data, "flannel.alpha.coreos.com/backend-data");
        assert_eq!(
            n.public_ipv6_overwrite,
            "flannel.alpha.coreos.com/public-ipv6-overwrite"
        );
        assert_eq!(
            AnnotationNames::new("example.com/flannel")
                .unwrap()
                .public_ip,
            "example.com/flannel-public-ip"
        );
        assert_eq!(
            AnnotationNames::new("example.com/flannel-").unwrap().prefix,
            "example.com/flannel-"
        );
        assert_eq!(
            AnnotationNames::new("example.com/").unwrap().prefix,
            "example.com/"
        );
        for bad in [
            "a/b/c",
            "example",
            "Example.com",
            "example..com",
            "example.com/Flannel",
            "example.com/a b",
            "",
        ] {
            let e = AnnotationNames::new(bad).unwrap_err().to_string();
            assert!(e.contains("--kube-annotation-prefix"), "{bad}: {e}");
        }
    }

    /// The annotations of nodes-after-vxlan.json (upstream v0.20.2 against a
    /// real kube-apiserver), and what a peer makes of them.
    #[test]
    fn upstream_vxlan_node_is_a_vxlan_lease() {
        let a = map(&[
            (
                "flannel.alpha.coreos.com/backend-data",
                r#"{"VNI":1,"VtepMAC":"1e:2c:f9:33:d5:9b"}"#,
            ),
            ("flannel.alpha.coreos.com/backend-type", "vxlan"),
            ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
            ("flannel.alpha.coreos.com/public-ip", "172.16.1.12"),
            (
                "volumes.kubernetes.io/controller-managed-attach-detach",
                "true",
            ),
        ]);
        let cidrs = vec!["10.244.1.0/24".to_string()];
        let l = node("k8s-node1", &a, Some("10.244.1.0/24"), &cidrs)
            .lease(&names(), &v4())
            .unwrap()
            .unwrap();
        assert_eq!(l.key.to_string(), "10.244.1.0-24");
        assert_eq!(l.expiration, None);
        assert_eq!(
            l.attrs.to_json(),
            r#"{"PublicIP":"172.16.1.12","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"1e:2c:f9:33:d5:9b"}}"#
        );
    }

    /// nodes-after-host-gw.json and nodes-after-udp.json: backend-data is the
    /// JSON text `null`, udp's backend-type is empty.
    #[test]
    fn upstream_host_gw_and_udp_nodes() {
        for (ty, want) in [
            (
                "host-gw",
                r#"{"PublicIP":"172.16.1.13","PublicIPv6":null,"BackendType":"host-gw"}"#,
            ),
            ("", r#"{"PublicIP":"172.16.1.13","PublicIPv6":null}"#),
        ] {
            let a = map(&[
                ("flannel.alpha.coreos.com/backend-data", "null"),
                ("flannel.alpha.coreos.com/backend-type", ty),
                ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
                ("flannel.alpha.coreos.com/public-ip", "172.16.1.13"),
            ]);
            let cidrs = vec!["10.244.2.0/24".to_string()];
            let l = node("k8s-node2", &a, Some("10.244.2.0/24"), &cidrs)
                .lease(&names(), &v4())
                .unwrap()
                .unwrap();
            assert_eq!(l.attrs.to_json(), want);
            assert_eq!(l.attrs.backend_data, None);
        }
    }

    #[test]
    fn unmanaged_and_broken_nodes() {
        let cidrs = vec!["10.244.3.0/24".to_string()];
        // No kube-subnet-manager annotation: not a peer (a node whose
        // flanneld has not started, or another network's node).
        let none = map(&[("flannel.alpha.coreos.com/public-ip", "172.16.1.14")]);
        assert_eq!(
            node("n", &none, None, &cidrs)
                .lease(&names(), &v4())
                .unwrap(),
            None
        );
        let managed = |extra: &[(&str, &str)]| {
            let mut m = map(&[
                ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
                ("flannel.alpha.coreos.com/backend-type", "vxlan"),
                ("flannel.alpha.coreos.com/public-ip", "172.16.1.14"),
            ]);
            m.extend(map(extra));
            m
        };
        let bad_ip = managed(&[("flannel.alpha.coreos.com/public-ip", "172.16.1")]);
        let e = node("n3", &bad_ip, None, &cidrs)
            .lease(&names(), &v4())
            .unwrap_err()
            .to_string();
        assert!(e.contains("n3") && e.contains("public-ip"), "{e}");
        let bad_json = managed(&[("flannel.alpha.coreos.com/backend-data", "{VNI")]);
        let e = node("n3", &bad_json, None, &cidrs)
            .lease(&names(), &v4())
            .unwrap_err()
            .to_string();
        assert!(e.contains("backend-data") && e.contains("not JSON"), "{e}");
        let ok = managed(&[]);
        let e = node("n3", &ok, None, &[])
            .lease(&names(), &v4())
            .unwrap_err();
        assert_eq!(
            e,
            KubeError::MissingFamily {
                node: "n3".into(),
                family: "IPv4"
            }
        );
    }

    #[test]
    fn pod_cidrs_prefer_the_list_and_allow_one_per_family() {
        let a = BTreeMap::new();
        let both = vec!["10.244.1.0/24".to_string(), "fd00:1::/64".to_string()];
        let c = node("n", &a, Some("10.244.1.0/24"), &both)
            .pod_cidrs()
            .unwrap();
        assert_eq!(c.v4, Some("10.244.1.0/24".parse().unwrap()));
        assert_eq!(c.v6, Some("fd00:1::/64".parse().unwrap()));
        // podCIDR alone (older clusters), host bits cleared as ParseCIDR does.
        let c = node("n", &a, Some("10.244.1.7/24"), &[])
            .pod_cidrs()
            .unwrap();
        assert_eq!(c.v4, Some("10.244.1.0/24".parse().unwrap()));
        let three = vec![
            "10.244.1.0/24".to_string(),
            "fd00:1::/64".to_string(),
            "10.245.1.0/24".to_string(),
        ];
        assert!(matches!(
            node("n", &a, None, &three).pod_cidrs(),
            Err(KubeError::TooManyPodCidrs { .. })
        ));
        let e = node("n", &a, Some("banana"), &[]).pod_cidrs().unwrap_err();
        assert!(e.to_string().contains("spec.podCIDR \"banana\""), "{e}");
    }

    #[test]
    fn own_key_comes_from_the_pod_cidr_inside_the_network() {
        let a = BTreeMap::new();
        let cidrs = vec!["10.244.7.0/24".to_string()];
        assert_eq!(
            node("n1", &a, Some("10.244.7.0/24"), &cidrs)
                .own_key(&v4())
                .unwrap()
                .to_string(),
            "10.244.7.0-24"
        );
        // SubnetLen does not apply: a /25 podCIDR is this node's subnet.
        let small = vec!["10.244.7.128/25".to_string()];
        assert_eq!(
            node("n1", &a, None, &small)
                .own_key(&v4())
                .unwrap()
                .to_string(),
            "10.244.7.128-25"
        );
        let e = node("n1", &a, None, &[]).own_key(&v4()).unwrap_err();
        assert_eq!(e, KubeError::PodCidrNotAssigned { node: "n1".into() });
        assert!(e.to_string().contains("pod cidr not assigned"));
        assert!(e.to_string().contains("--allocate-node-cidrs"));
        let outside = vec!["10.99.1.0/24".to_string()];
        let e = node("n1", &a, None, &outside)
            .own_key(&v4())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(r#"subnet "10.244.0.0/16" specified in the flannel net config doesn't contain "10.99.1.0/24" PodCIDR of the "n1" node"#),
            "{e}"
        );
        let dual =
            cfg(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56"}"#);
        let e = node("n1", &a, None, &cidrs).own_key(&dual).unwrap_err();
        assert!(matches!(e, KubeError::MissingFamily { family: "IPv6", .. }));
        let both = vec!["10.244.7.0/24".to_string(), "fd00:0:0:7::/64".to_string()];
        assert_eq!(
            node("n1", &a, None, &both)
                .own_key(&dual)
                .unwrap()
                .to_string(),
            "10.244.7.0-24&fd00:0:0:7::-64"
        );
    }

    /// The annotation patches of requests-{vxlan,host-gw,udp}.json, byte for byte.
    #[test]
    fn published_annotations_are_upstreams_bytes() {
        let current = map(&[(
            "volumes.kubernetes.io/controller-managed-attach-detach",
            "true",
        )]);
        let vxlan = LeaseAttrs::new_vxlan(
            Some("172.16.1.12".parse().unwrap()),
            Some(crate::lease::VxlanBackendData {
                vni: 1,
                vtep_mac: "1e:2c:f9:33:d5:9b".parse().unwrap(),
            }),
            None,
            None,
        );
        let patch = |attrs: &LeaseAttrs| {
            annotation_patch(&annotation_changes(
                &current,
                &desired_annotations(&names(), attrs, &current),
            ))
        };
        assert_eq!(
            patch(&vxlan),
            r#"{"metadata":{"annotations":{"flannel.alpha.coreos.com/backend-data":"{\"VNI\":1,\"VtepMAC\":\"1e:2c:f9:33:d5:9b\"}","flannel.alpha.coreos.com/backend-type":"vxlan","flannel.alpha.coreos.com/kube-subnet-manager":"true","flannel.alpha.coreos.com/public-ip":"172.16.1.12"}}}"#
        );
        let host_gw = LeaseAttrs::new("host-gw", Some("172.16.1.13".parse().unwrap()), None);
        assert_eq!(
            patch(&host_gw),
            r#"{"metadata":{"annotations":{"flannel.alpha.coreos.com/backend-data":"null","flannel.alpha.coreos.com/backend-type":"host-gw","flannel.alpha.coreos.com/kube-subnet-manager":"true","flannel.alpha.coreos.com/public-ip":"172.16.1.13"}}}"#
        );
        let udp = LeaseAttrs::new("", Some("172.16.1.13".parse().unwrap()), None);
        assert_eq!(
            patch(&udp),
            r#"{"metadata":{"annotations":{"flannel.alpha.coreos.com/backend-data":"null","flannel.alpha.coreos.com/backend-type":"","flannel.alpha.coreos.com/kube-subnet-manager":"true","flannel.alpha.coreos.com/public-ip":"172.16.1.13"}}}"#
        );
        // A restart on an annotated Node changes nothing, so nothing is sent
        // (the recordings' second start has no annotation patch).
        let mut after = current.clone();
        after.extend(desired_annotations(&names(), &vxlan, &current));
        assert!(
            annotation_changes(&after, &desired_annotations(&names(), &vxlan, &after)).is_empty()
        );
    }

    #[test]
    fn overwrite_and_ipv6_annotations() {
        let current = map(&[(
            "flannel.alpha.coreos.com/public-ip-overwrite",
            "203.0.113.9",
        )]);
        let attrs = LeaseAttrs::new("host-gw", Some("172.16.1.12".parse().unwrap()), None);
        let d = desired_annotations(&names(), &attrs, &current);
        assert_eq!(d["flannel.alpha.coreos.com/public-ip"], "203.0.113.9");
        // Dual-stack host-gw publishes both families.
        let dual = LeaseAttrs::new(
            "host-gw",
            Some("172.16.1.12".parse().unwrap()),
            Some("fd00:16::12".parse().unwrap()),
        );
        let d = desired_annotations(&names(), &dual, &BTreeMap::new());
        assert_eq!(d["flannel.alpha.coreos.com/public-ipv6"], "fd00:16::12");
        assert_eq!(d["flannel.alpha.coreos.com/backend-v6-data"], "null");
        // IPv6-only vxlan: no IPv4 annotations at all.
        let v6 = LeaseAttrs::new_vxlan(
            None,
            None,
            Some("fd00:16::12".parse().unwrap()),
            Some(crate::lease::VxlanBackendData {
                vni: 1,
                vtep_mac: "02:00:00:00:00:01".parse().unwrap(),
            }),
        );
        let d = desired_annotations(&names(), &v6, &BTreeMap::new());
        assert!(!d.contains_key("flannel.alpha.coreos.com/public-ip"));
        assert!(!d.contains_key("flannel.alpha.coreos.com/backend-data"));
        assert_eq!(
            d["flannel.alpha.coreos.com/backend-v6-data"],
            r#"{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}"#
        );
        // What the patch publishes reads back as the same lease.
        let cidrs = vec!["fd00:0:0:7::/64".to_string()];
        let v6cfg = cfg(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56"}"#);
        let l = node("n", &d, None, &cidrs)
            .lease(&names(), &v6cfg)
            .unwrap()
            .unwrap();
        assert_eq!(l.attrs, v6);
    }

    #[test]
    fn node_public_ip_annotations() {
        let a = map(&[
            ("flannel.alpha.coreos.com/node-public-ip", "192.0.2.4"),
            ("flannel.alpha.coreos.com/node-public-ipv6", ""),
        ]);
        let n = node("n", &a, None, &[]);
        assert_eq!(
            n.node_public_ips(&names()).unwrap(),
            (Some("192.0.2.4".parse().unwrap()), None)
        );
        let bad = map(&[("flannel.alpha.coreos.com/node-public-ipv6", "192.0.2.4")]);
        let e = node("n", &bad, None, &[])
            .node_public_ips(&names())
            .unwrap_err()
            .to_string();
        assert!(e.contains("node-public-ipv6"), "{e}");
    }

    /// The condition patch of the recordings, byte for byte.
    #[test]
    fn condition_patch_is_upstreams() {
        assert_eq!(
            network_unavailable_patch("2026-12-02T12:36:56Z"),
            r#"{"status":{"conditions":[{"type":"NetworkUnavailable","status":"False","lastHeartbeatTime":"2026-12-02T12:36:56Z","lastTransitionTime":"2026-12-02T12:36:56Z","reason":"FlannelIsUp","message":"Flannel is running on this node"}]}}"#
        );
    }
}
