//! Flannel's wire names: every etcd key, annotation, file path and device name
//! that upstream flannel defines lives here and nowhere else.

/// Default `--net-config-path`.
pub const DEFAULT_NET_CONFIG_PATH: &str = "/etc/kube-flannel/net-conf.json";
/// Default `--subnet-file`.
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
/// Default `--etcd-prefix`.
pub const DEFAULT_ETCD_PREFIX: &str = "/coreos.com/network";
/// Default `--etcd-endpoints`.
pub const DEFAULT_ETCD_ENDPOINTS: &str = "http://127.0.0.1:4001,http://127.0.0.1:2379";
/// Key (below the prefix) holding the net-conf JSON in etcd.
pub const ETCD_CONFIG_KEY: &str = "config";
/// Directory (below the prefix) holding one key per lease in etcd.
pub const ETCD_SUBNETS_DIR: &str = "subnets";
/// flanneld's health endpoint (`--healthz-port`): 200 while the process runs.
pub const HEALTHZ_PATH: &str = "/healthz";
/// flanneld's readiness endpoint: 200 once rules and subnet.env are in place.
pub const READYZ_PATH: &str = "/readyz";
/// Default `--kube-annotation-prefix`.
pub const DEFAULT_KUBE_ANNOTATION_PREFIX: &str = "flannel.alpha.coreos.com";
/// Kubernetes mode: Node annotation names are the normalised
/// `--kube-annotation-prefix` (`flannel.alpha.coreos.com/`) followed by one of
/// these. `kube-subnet-manager: "true"` marks a Node flannel manages.
pub const KUBE_ANNOTATION_SUBNET_MANAGER: &str = "kube-subnet-manager";
/// The lease's `BackendType` (`vxlan`, `host-gw`; empty for udp, as upstream writes).
pub const KUBE_ANNOTATION_BACKEND_TYPE: &str = "backend-type";
/// The lease's `BackendData` as JSON text (`{"VNI":1,"VtepMAC":"..."}`, or `null`).
pub const KUBE_ANNOTATION_BACKEND_DATA: &str = "backend-data";
/// The lease's `BackendV6Data` as JSON text.
pub const KUBE_ANNOTATION_BACKEND_V6_DATA: &str = "backend-v6-data";
/// The lease's `PublicIP`.
pub const KUBE_ANNOTATION_PUBLIC_IP: &str = "public-ip";
/// The lease's `PublicIPv6`.
pub const KUBE_ANNOTATION_PUBLIC_IPV6: &str = "public-ipv6";
/// Set by the operator: published as `public-ip` instead of the node's own
/// address (a NAT's outside address, say).
pub const KUBE_ANNOTATION_PUBLIC_IP_OVERWRITE: &str = "public-ip-overwrite";
/// Set by the operator: published as `public-ipv6` instead of the node's own address.
pub const KUBE_ANNOTATION_PUBLIC_IPV6_OVERWRITE: &str = "public-ipv6-overwrite";
/// Set by the operator: used as `--public-ip` (interface selection included).
pub const KUBE_ANNOTATION_NODE_PUBLIC_IP: &str = "node-public-ip";
/// Set by the operator: used as `--public-ipv6`.
pub const KUBE_ANNOTATION_NODE_PUBLIC_IPV6: &str = "node-public-ipv6";
/// Kubernetes mode: this node's Node name (else `POD_NAME`/`POD_NAMESPACE`).
pub const ENV_NODE_NAME: &str = "NODE_NAME";
/// Kubernetes mode: flanneld's pod, whose `spec.nodeName` is the Node.
pub const ENV_POD_NAME: &str = "POD_NAME";
/// Kubernetes mode: the namespace of `POD_NAME`.
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";
/// Kubernetes mode: upstream's capacity of its Node event channel (the manifest sets 5000).
pub const ENV_EVENT_QUEUE_DEPTH: &str = "EVENT_QUEUE_DEPTH";
/// Kubernetes mode: with "true", upstream goes on starting when its Node cache did not sync in time.
pub const ENV_CONT_WHEN_CACHE_NOT_READY: &str = "CONT_WHEN_CACHE_NOT_READY";
/// Every environment variable besides `FLANNELD_*` that flanneld reads in Kubernetes mode.
pub const KUBE_ENV_VARS: &[&str] = &[
    ENV_NODE_NAME,
    ENV_POD_NAME,
    ENV_POD_NAMESPACE,
    ENV_EVENT_QUEUE_DEPTH,
    ENV_CONT_WHEN_CACHE_NOT_READY,
];
/// `EVENT_QUEUE_DEPTH` when unset (upstream's default).
pub const DEFAULT_EVENT_QUEUE_DEPTH: u32 = 5000;
/// The Node condition flanneld sets to `False` once its datapath is up.
pub const KUBE_CONDITION_NETWORK_UNAVAILABLE: &str = "NetworkUnavailable";
/// The condition's `reason`.
pub const KUBE_CONDITION_REASON: &str = "FlannelIsUp";
/// The condition's `message`.
pub const KUBE_CONDITION_MESSAGE: &str = "Flannel is running on this node";

/// Lease lifetime granted on acquisition and renewal (24 h).
pub const LEASE_TTL_SECS: u64 = 24 * 60 * 60;
/// Default `--subnet-lease-renew-margin` in minutes.
pub const DEFAULT_RENEW_MARGIN_MINUTES: u64 = 60;

/// vxlan device name for a VNI: `flannel.<VNI>`.
pub fn vxlan_device_name(vni: u32) -> String {
    format!("flannel.{vni}")
}
/// IPv6 vxlan device name for a VNI: `flannel-v6.<VNI>`.
pub fn vxlan_v6_device_name(vni: u32) -> String {
    format!("flannel-v6.{vni}")
}
/// TUN device of the udp backend.
pub const UDP_TUN_DEVICE: &str = "flannel0";
/// Default UDP port of the udp backend.
pub const UDP_DEFAULT_PORT: u16 = 8285;
/// Kernel default vxlan port used by flannel (`Port: 0`).
pub const VXLAN_DEFAULT_PORT: u16 = 8472;
/// Device of the wireguard backend: IPv4 in `Mode` separate, both families
/// in the other modes.
pub const WIREGUARD_DEVICE: &str = "flannel-wg";
/// IPv6 device of the wireguard backend in `Mode` separate.
pub const WIREGUARD_DEVICE_V6: &str = "flannel-wg-v6";
/// Default `ListenPort` of the wireguard backend.
pub const WIREGUARD_DEFAULT_PORT: u16 = 51820;
/// Default `ListenPortV6` of the wireguard backend.
pub const WIREGUARD_DEFAULT_PORT_V6: u16 = 51821;
/// Where the wireguard backend keeps its private key (base64, as `wg genkey`
/// prints it), created once; `WIREGUARD_KEY_FILE` overrides it.
pub const WIREGUARD_DEFAULT_KEY_FILE: &str = "/run/flannel/wgkey";
/// Environment variable naming the wireguard private key file.
pub const ENV_WIREGUARD_KEY_FILE: &str = "WIREGUARD_KEY_FILE";

/// Bridge the CNI plugin attaches pods to.
pub const CNI_BRIDGE: &str = "cni0";
/// Default `dataDir` of the flannel CNI plugin (saved delegate configs).
pub const CNI_DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";
/// Default directory of host-local IPAM (`<dir>/<network name>/<ip>`).
pub const CNI_DEFAULT_IPAM_DIR: &str = "/var/lib/cni/networks";
/// host-local's lock file in `<ipam dir>/<network name>/` (flock'ed).
pub const CNI_IPAM_LOCK_FILE: &str = "lock";
/// host-local's round-robin state, `last_reserved_ip.<range set index>`.
pub const CNI_IPAM_LAST_RESERVED_PREFIX: &str = "last_reserved_ip.";
/// Separator between container ID and interface name in a host-local address file.
pub const CNI_IPAM_LINE_BREAK: &str = "\r\n";

/// The CNI plugin's binary name (`"type": "flannel"` in a conflist).
pub const CNI_PLUGIN_TYPE: &str = "flannel";
/// kube-flannel.yml: the CNI plugin binary inside the image, copied by the
/// `install-cni-plugin` init container (`cp -f /flannel /opt/cni/bin/flannel`).
pub const IMAGE_CNI_PLUGIN: &str = "/flannel";
/// kube-flannel.yml: the host's CNI plugin directory (hostPath `cni-plugin`).
pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
/// kube-flannel.yml: the conflist as the ConfigMap mounts it (`cni-conf.json`).
pub const MANIFEST_CNI_CONF: &str = "/etc/kube-flannel/cni-conf.json";
/// kube-flannel.yml: where the `install-cni` init container installs the conflist.
pub const CNI_CONFLIST: &str = "/etc/cni/net.d/10-flannel.conflist";

/// subnet.env variable names.
pub const ENV_NETWORK: &str = "FLANNEL_NETWORK";
pub const ENV_SUBNET: &str = "FLANNEL_SUBNET";
pub const ENV_IPV6_NETWORK: &str = "FLANNEL_IPV6_NETWORK";
pub const ENV_IPV6_SUBNET: &str = "FLANNEL_IPV6_SUBNET";
pub const ENV_MTU: &str = "FLANNEL_MTU";
pub const ENV_IPMASQ: &str = "FLANNEL_IPMASQ";

/// Local directory store (`--local-store DIR`, flannel-rs only): lease files live in `DIR/subnets/<LeaseKey>`.
pub const LOCAL_STORE_SUBNETS_DIR: &str = "subnets";
/// Local directory store: the file every writer `flock`s.
pub const LOCAL_STORE_LOCK_FILE: &str = "lock";
/// Local directory store: the change counter.
pub const LOCAL_STORE_REVISION_FILE: &str = "revision";
/// Local directory store: optional net-conf JSON returned by `get_network_config`.
pub const LOCAL_STORE_CONFIG_FILE: &str = "config";

/// `Backend.Type` / lease `BackendType` of the vxlan backend.
pub const BACKEND_TYPE_VXLAN: &str = "vxlan";
/// `Backend.Type` / lease `BackendType` of the host-gw backend.
pub const BACKEND_TYPE_HOST_GW: &str = "host-gw";
/// `Backend.Type` / lease `BackendType` of the udp backend.
pub const BACKEND_TYPE_UDP: &str = "udp";
/// `Backend.Type` / lease `BackendType` of the wireguard backend.
pub const BACKEND_TYPE_WIREGUARD: &str = "wireguard";
/// `Backend.Type` of upstream's ipip backend (not supported yet).
pub const BACKEND_TYPE_IPIP: &str = "ipip";

/// iptables (nat table): the masquerade chain, jumped to from POSTROUTING.
pub const IPT_MASQ_CHAIN: &str = "FLANNEL-POSTRTG";
/// iptables (filter table): the forward-accept chain, jumped to from FORWARD.
pub const IPT_FORWARD_CHAIN: &str = "FLANNEL-FWD";
/// iptables (raw table): the chain dropping pod traffic to the backend's
/// encapsulation port, jumped to from PREROUTING.
pub const IPT_ENCAP_CHAIN: &str = "FLANNEL-ENCAP";
/// `-m comment --comment` of every encapsulation-guard rule and of its jump.
pub const IPT_ENCAP_COMMENT: &str = "flanneld encap guard";
/// `-m comment --comment` of every masquerade rule and of the POSTROUTING jump.
pub const IPT_MASQ_COMMENT: &str = "flanneld masq";
/// `-m comment --comment` of every forward rule and of the FORWARD jump.
pub const IPT_FORWARD_COMMENT: &str = "flanneld forward";
/// nftables mode: the IPv4 table (`ip flannel-ipv4`).
pub const NFT_TABLE_V4: &str = "flannel-ipv4";
/// nftables mode: the IPv6 table (`ip6 flannel-ipv6`).
pub const NFT_TABLE_V6: &str = "flannel-ipv6";
/// nftables mode: the nat chain on the postrouting hook.
pub const NFT_MASQ_CHAIN: &str = "postrtg";
/// nftables mode: the filter chain on the forward hook.
pub const NFT_FORWARD_CHAIN: &str = "forward";
/// nftables mode: the filter chain on the prerouting hook (priority raw)
/// dropping pod traffic to the backend's encapsulation port.
pub const NFT_ENCAP_CHAIN: &str = "encap";
/// nftables mode: the comment of the encapsulation-guard chain.
pub const NFT_ENCAP_CHAIN_COMMENT: &str =
    "chain to drop pod traffic to flannel's encapsulation port";
/// nftables mode: the comment of the nat chain.
pub const NFT_MASQ_CHAIN_COMMENT: &str = "chain to manage traffic masquerading by flannel";
/// nftables mode: the comment of the forward chain.
pub const NFT_FORWARD_CHAIN_COMMENT: &str = "chain to accept flannel traffic";
/// nftables mode: the table's comment is this followed by the table's name.
pub const NFT_TABLE_COMMENT_PREFIX: &str = "rules for ";
/// The packet mark kube-proxy sets on traffic it masquerades itself; flannel leaves it alone.
pub const KUBE_PROXY_MASQ_MARK: u32 = 0x4000;
