//! The vxlan backend: the `flannel.<VNI>` device and the VtepMAC.
//!
//! The device, as upstream creates it:
//! `ip link add flannel.VNI type vxlan id VNI local IFACE_ADDR dev EXT dstport PORT nolearning [gbp]`,
//! `ip link set flannel.VNI mtu EXT_MTU-50 address VTEP_MAC up`,
//! `ip addr add <own subnet network address>/32 dev flannel.VNI`.
//!
//! The `local` address is the external interface's own address, as upstream
//! does: `--public-ip` may name a NAT address that is not configured on this
//! host, and the kernel must send from an address it owns.

use std::net::{IpAddr, Ipv4Addr};

use flannel_core::config::VxlanConfig;
use flannel_core::lease::{LeaseAttrs, VxlanBackendData};
use flannel_core::mac::MacAddr;
use flannel_core::wire;
use flannel_netlink::{Link, Netlink, VxlanDevice};
use ipnet::{IpNet, Ipv4Net};

use crate::iface::ExternalInterface;

/// Errors of device setup, each naming the device and the operation.
#[derive(Debug, thiserror::Error)]
pub enum VxlanError {
    #[error("vxlan device {device}: {source}")]
    Kernel {
        device: String,
        #[source]
        source: flannel_netlink::Error,
    },
}

/// The backend's `Type` and the lease's `BackendType`.
pub const BACKEND_TYPE: &str = flannel_core::lease::BACKEND_VXLAN;

/// Everything needed to (re)create and check our vxlan device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub device: VxlanDevice,
    /// `<own subnet network address>/32`.
    pub address: Ipv4Net,
}

/// The vxlan device for `cfg` on the external interface `ext`, with the
/// given MTU and VtepMAC. The MTU is the pod MTU (external MTU minus 50, or
/// the backend's `MTU` option), so pods and the device agree.
pub fn device(cfg: &VxlanConfig, ext: &ExternalInterface, mtu: u32, mac: MacAddr) -> VxlanDevice {
    VxlanDevice {
        name: wire::vxlan_device_name(cfg.vni),
        vni: cfg.vni,
        local: IpAddr::V4(ext.iface_addr),
        underlay_index: ext.index,
        port: cfg.port,
        learning: cfg.learning,
        gbp: cfg.gbp,
        mtu,
        mac: Some(mac),
    }
}

/// The device's address for our subnet: the network address as a /32
/// (10.244.1.0/24 -> 10.244.1.0/32). Peers use it as the route gateway and
/// neighbour IP; /32 keeps the kernel from adding a connected route that
/// would swallow the whole subnet onto the vxlan device.
pub fn device_address(own_subnet: Ipv4Net) -> Ipv4Net {
    Ipv4Net::new(own_subnet.network(), 32).expect("/32 is a valid prefix")
}

/// The port the kernel actually uses for a configured port (0 = 8472).
fn effective_port(port: u16) -> u16 {
    if port == 0 {
        wire::VXLAN_DEFAULT_PORT
    } else {
        port
    }
}

/// Why an existing link cannot serve as our device, or `None` when its
/// attributes that cannot be changed in place (kind, VNI, local, underlay,
/// port, learning, GBP) all match. MTU, MAC and up are fixed in place instead.
pub fn mismatch(link: &Link, want: &VxlanDevice) -> Option<String> {
    if link.kind.as_deref() != Some("vxlan") {
        return Some(format!("is of kind {:?}, not vxlan", link.kind));
    }
    let Some(info) = &link.vxlan else {
        return Some("reports no vxlan attributes".into());
    };
    let mut diffs = Vec::new();
    if info.vni != want.vni {
        diffs.push(format!("id {} (want {})", info.vni, want.vni));
    }
    if info.local != Some(want.local) {
        diffs.push(format!("local {:?} (want {})", info.local, want.local));
    }
    if info.link != Some(want.underlay_index) {
        diffs.push(format!(
            "dev {:?} (want {})",
            info.link, want.underlay_index
        ));
    }
    if effective_port(info.port) != effective_port(want.port) {
        diffs.push(format!(
            "dstport {} (want {})",
            info.port,
            effective_port(want.port)
        ));
    }
    if info.learning != want.learning {
        diffs.push(format!(
            "learning {} (want {})",
            info.learning, want.learning
        ));
    }
    if info.gbp != want.gbp {
        diffs.push(format!("gbp {} (want {})", info.gbp, want.gbp));
    }
    if diffs.is_empty() {
        None
    } else {
        Some(diffs.join(", "))
    }
}

/// Where the VtepMAC came from (logged at startup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacSource {
    /// The MAC of the `flannel.<VNI>` device already present.
    ExistingDevice,
    /// The VtepMAC of our previous lease in the store.
    PreviousLease,
    /// Freshly generated.
    Random,
}

/// The VtepMAC must survive restarts, or peers keep a stale neighbour entry
/// (an upstream bug): reuse the existing device's MAC, else the one our
/// previous lease published, else make one up.
pub fn choose_vtep_mac(
    existing: Option<&Link>,
    previous_lease: Option<MacAddr>,
    rng: &mut impl rand::Rng,
) -> (MacAddr, MacSource) {
    if let Some(mac) = existing
        .filter(|l| l.kind.as_deref() == Some("vxlan"))
        .and_then(|l| l.mac)
        .filter(|m| *m != MacAddr::default())
    {
        return (mac, MacSource::ExistingDevice);
    }
    if let Some(mac) = previous_lease {
        return (mac, MacSource::PreviousLease);
    }
    (MacAddr::random(rng), MacSource::Random)
}

/// The attributes we publish with our lease.
pub fn lease_attrs(public_ip: Ipv4Addr, vni: u32, mac: MacAddr) -> LeaseAttrs {
    let data = VxlanBackendData { vni, vtep_mac: mac };
    LeaseAttrs::new_vxlan(Some(public_ip), Some(data), None, None)
}

/// The VtepMAC published in a lease of ours, if it is a vxlan lease with the same VNI.
pub fn lease_vtep_mac(attrs: &LeaseAttrs, vni: u32) -> Option<MacAddr> {
    if attrs.backend_type != BACKEND_TYPE {
        return None;
    }
    let data = attrs.vxlan_data()?;
    (data.vni == vni).then_some(data.vtep_mac)
}

/// Makes the kernel hold exactly our device: creates it when missing,
/// recreates it (same MAC) when an attribute that cannot change in place
/// differs, then fixes MTU, MAC, address and up. Returns the device and a
/// human-readable line for every change made (empty when all was in place).
pub fn ensure_device(
    nl: &mut Netlink,
    spec: &DeviceSpec,
) -> Result<(Link, Vec<String>), VxlanError> {
    let want = &spec.device;
    let name = want.name.clone();
    let k = |source| VxlanError::Kernel {
        device: name.clone(),
        source,
    };
    let mut changes = Vec::new();
    let mut link = match nl.link_by_name(&want.name).map_err(k)? {
        None => {
            let l = nl.add_vxlan(want).map_err(k)?;
            changes.push(format!(
                "created {} (ifindex {}, vxlan id {}, local {}, dev index {}, mac {})",
                want.name,
                l.index,
                want.vni,
                want.local,
                want.underlay_index,
                want.mac.map(|m| m.to_string()).unwrap_or_default()
            ));
            l
        }
        Some(l) => match mismatch(&l, want) {
            None => l,
            Some(why) => {
                // VNI, local, port and underlay are fixed at creation time:
                // the kernel refuses to change them on a live vxlan device.
                nl.del_link(l.index).map_err(k)?;
                let n = nl.add_vxlan(want).map_err(k)?;
                changes.push(format!(
                    "recreated {} (was: {why}; new ifindex {})",
                    want.name, n.index
                ));
                n
            }
        },
    };
    if link.mtu != want.mtu {
        nl.set_link_mtu(link.index, want.mtu).map_err(k)?;
        changes.push(format!(
            "set {} mtu {} (was {})",
            want.name, want.mtu, link.mtu
        ));
        link.mtu = want.mtu;
    }
    if let Some(mac) = want.mac {
        if link.mac != Some(mac) {
            nl.set_link_address(link.index, mac).map_err(k)?;
            changes.push(format!("set {} address {mac}", want.name));
            link.mac = Some(mac);
        }
    }
    let want_addr = IpNet::V4(spec.address);
    let addrs = nl.list_addresses(link.index).map_err(k)?;
    if !addrs.contains(&want_addr) {
        nl.add_address(link.index, want_addr).map_err(k)?;
        changes.push(format!("added address {want_addr} to {}", want.name));
    }
    // Another IPv4 address on our device is a leftover of a previous subnet.
    for a in addrs
        .iter()
        .filter(|a| a.addr().is_ipv4() && **a != want_addr)
    {
        nl.del_address(link.index, *a).map_err(k)?;
        changes.push(format!("removed stale address {a} from {}", want.name));
    }
    if !link.up {
        nl.set_link_up(link.index).map_err(k)?;
        changes.push(format!("set {} up", want.name));
        link.up = true;
    }
    Ok((link, changes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_netlink::VxlanInfo;

    fn ext() -> ExternalInterface {
        ExternalInterface {
            index: 2,
            name: "ens3".into(),
            mtu: 1500,
            iface_addr: Ipv4Addr::new(172, 16, 1, 14),
            public_ip: Ipv4Addr::new(172, 16, 1, 14),
            connected: vec!["172.16.1.14/24".parse().unwrap()],
        }
    }

    fn mac() -> MacAddr {
        "26:62:24:f0:61:01".parse().unwrap()
    }

    fn link_for(d: &VxlanDevice) -> Link {
        Link {
            index: 7,
            name: d.name.clone(),
            mtu: d.mtu,
            mac: d.mac,
            kind: Some("vxlan".into()),
            up: true,
            master: None,
            vxlan: Some(VxlanInfo {
                vni: d.vni,
                local: Some(d.local),
                link: Some(d.underlay_index),
                port: 8472,
                learning: d.learning,
                gbp: d.gbp,
            }),
        }
    }

    #[test]
    fn device_as_upstream() {
        let d = device(&VxlanConfig::default(), &ext(), 1450, mac());
        assert_eq!(d.name, "flannel.1");
        assert_eq!(d.vni, 1);
        assert_eq!(d.local, IpAddr::V4(Ipv4Addr::new(172, 16, 1, 14)));
        assert_eq!(d.underlay_index, 2);
        assert!(!d.learning);
        assert_eq!(d.mtu, 1450);
        assert_eq!(
            device_address("10.244.1.0/24".parse().unwrap()),
            "10.244.1.0/32".parse::<Ipv4Net>().unwrap()
        );
    }

    #[test]
    fn mismatch_detects_fixed_attributes_only() {
        let d = device(&VxlanConfig::default(), &ext(), 1450, mac());
        let l = link_for(&d);
        assert_eq!(mismatch(&l, &d), None, "port 0 means 8472");
        let mut other = l.clone();
        other.mtu = 1400;
        other.up = false;
        other.mac = None;
        assert_eq!(mismatch(&other, &d), None, "fixable in place");
        let mut other = l.clone();
        other.vxlan.as_mut().unwrap().vni = 2;
        assert!(mismatch(&other, &d).unwrap().contains("id 2"));
        let mut other = l.clone();
        other.vxlan.as_mut().unwrap().local = Some("172.16.1.15".parse().unwrap());
        assert!(mismatch(&other, &d).unwrap().contains("local"));
        let mut other = l.clone();
        other.vxlan.as_mut().unwrap().port = 4789;
        assert!(mismatch(&other, &d).unwrap().contains("dstport 4789"));
        let mut other = l.clone();
        other.vxlan.as_mut().unwrap().learning = true;
        assert!(mismatch(&other, &d).unwrap().contains("learning"));
        let mut other = l;
        other.kind = Some("bridge".into());
        other.vxlan = None;
        assert!(mismatch(&other, &d).unwrap().contains("bridge"));
    }

    #[test]
    fn vtep_mac_survives_restarts() {
        let d = device(&VxlanConfig::default(), &ext(), 1450, mac());
        let l = link_for(&d);
        let other: MacAddr = "02:00:00:00:00:09".parse().unwrap();
        let mut rng = rand::rng();
        assert_eq!(
            choose_vtep_mac(Some(&l), Some(other), &mut rng),
            (mac(), MacSource::ExistingDevice)
        );
        assert_eq!(
            choose_vtep_mac(None, Some(other), &mut rng),
            (other, MacSource::PreviousLease)
        );
        let (m, src) = choose_vtep_mac(None, None, &mut rng);
        assert_eq!(src, MacSource::Random);
        assert_eq!(m.0[0] & 0x03, 0x02, "locally administered unicast");
    }

    #[test]
    fn lease_attrs_round_trip_the_vtep_mac() {
        let a = lease_attrs(Ipv4Addr::new(172, 16, 1, 14), 1, mac());
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"PublicIP":"172.16.1.14","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"26:62:24:f0:61:01"}}"#
        );
        assert_eq!(lease_vtep_mac(&a, 1), Some(mac()));
        assert_eq!(lease_vtep_mac(&a, 2), None, "another VNI's MAC is not ours");
    }
}
