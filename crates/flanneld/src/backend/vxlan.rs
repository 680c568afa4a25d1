//! The vxlan backend: the `flannel.<VNI>` (IPv4) and `flannel-v6.<VNI>`
//! (IPv6) devices and their VtepMACs.
//!
//! The devices, as upstream creates them, one per enabled address family:
//! `ip link add flannel.VNI type vxlan id VNI local IFACE_ADDR dev EXT dstport PORT nolearning [gbp]`,
//! `ip link set flannel.VNI mtu EXT_MTU-50 address VTEP_MAC up`,
//! `ip addr add <own subnet network address>/32 dev flannel.VNI`;
//! for IPv6 `flannel-v6.VNI` with the interface's IPv6 address as `local`
//! (an IPv6 underlay: 70 bytes of overhead), its own VtepMAC (published as
//! `BackendV6Data`) and `<own IPv6 subnet network address>/128 nodad`.
//! Both devices share VNI and port: the kernel keeps IPv4 and IPv6 vxlan
//! sockets apart.
//!
//! The `local` address is the external interface's own address, as upstream
//! does: `--public-ip` may name a NAT address that is not configured on this
//! host, and the kernel must send from an address it owns.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flannel_core::config::VxlanConfig;
use flannel_core::lease::{IpFamily, LeaseAttrs, VxlanBackendData};
use flannel_core::mac::MacAddr;
use flannel_core::wire;
use flannel_netlink::{Link, Netlink, VxlanDevice};
use ipnet::IpNet;

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
    /// `<own subnet network address>/32` (IPv6: `/128`).
    pub address: IpNet,
}

impl DeviceSpec {
    /// The address family the device carries (that of its address).
    pub fn family(&self) -> IpFamily {
        match self.address {
            IpNet::V4(_) => IpFamily::V4,
            IpNet::V6(_) => IpFamily::V6,
        }
    }
}

/// The device name for `family`: `flannel.<VNI>` or `flannel-v6.<VNI>`.
pub fn device_name(vni: u32, family: IpFamily) -> String {
    match family {
        IpFamily::V4 => wire::vxlan_device_name(vni),
        IpFamily::V6 => wire::vxlan_v6_device_name(vni),
    }
}

/// The vxlan device of `family` for `cfg`, sending from `local` (the
/// external interface's own address of the underlay family) on the
/// interface `underlay_index`, with the given MTU and VtepMAC. The MTU is
/// the external MTU minus the encapsulation overhead of `local`'s family
/// (50 bytes over IPv4, 70 over IPv6), or the backend's `MTU` option.
pub fn device(
    cfg: &VxlanConfig,
    family: IpFamily,
    local: IpAddr,
    underlay_index: u32,
    mtu: u32,
    mac: MacAddr,
) -> VxlanDevice {
    VxlanDevice {
        name: device_name(cfg.vni, family),
        vni: cfg.vni,
        local,
        underlay_index,
        port: cfg.port,
        learning: cfg.learning,
        gbp: cfg.gbp,
        mtu,
        mac: Some(mac),
    }
}

/// The device's address for our subnet: the network address as a host
/// route (10.244.1.0/24 -> 10.244.1.0/32, fd00:10:244:1::/64 ->
/// fd00:10:244:1::/128). Peers use it as the route gateway and neighbour
/// IP; the full-length prefix keeps the kernel from adding a connected route
/// that would swallow the whole subnet onto the vxlan device.
pub fn device_address(own_subnet: IpNet) -> IpNet {
    let len = own_subnet.max_prefix_len();
    IpNet::new(own_subnet.network(), len).expect("the full length is a valid prefix")
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

/// The attributes we publish with our lease (IPv4 only).
pub fn lease_attrs(public_ip: Ipv4Addr, vni: u32, mac: MacAddr) -> LeaseAttrs {
    lease_attrs_dual(Some((public_ip, mac)), None, vni)
}

/// The attributes we publish with our lease: per enabled family the public
/// IP and that device's VtepMAC (`BackendData` for `flannel.<VNI>`,
/// `BackendV6Data` for `flannel-v6.<VNI>`).
pub fn lease_attrs_dual(
    v4: Option<(Ipv4Addr, MacAddr)>,
    v6: Option<(Ipv6Addr, MacAddr)>,
    vni: u32,
) -> LeaseAttrs {
    let data = |vtep_mac| VxlanBackendData { vni, vtep_mac };
    LeaseAttrs::new_vxlan(
        v4.map(|(ip, _)| ip),
        v4.map(|(_, m)| data(m)),
        v6.map(|(ip, _)| ip),
        v6.map(|(_, m)| data(m)),
    )
}

/// The VtepMAC of `family` published in a lease of ours, if it is a vxlan
/// lease with the same VNI.
pub fn lease_vtep_mac(attrs: &LeaseAttrs, vni: u32, family: IpFamily) -> Option<MacAddr> {
    if attrs.effective_backend_type() != BACKEND_TYPE {
        return None;
    }
    let data = match family {
        IpFamily::V4 => attrs.vxlan_data(),
        IpFamily::V6 => attrs.vxlan_v6_data(),
    }?;
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
    let want_addr = spec.address;
    let addrs = nl.list_addresses(link.index).map_err(k)?;
    if !addrs.contains(&want_addr) {
        // nodad: the IPv6 address must be usable at once as the source of
        // node-to-pod traffic (DAD would keep it tentative for a second).
        nl.add_address_nodad(link.index, want_addr).map_err(k)?;
        changes.push(format!("added address {want_addr} to {}", want.name));
    }
    // Another global address of the device's family is a leftover of a
    // previous subnet (list_addresses omits the IPv6 link-local one).
    for a in addrs
        .iter()
        .filter(|a| a.addr().is_ipv4() == want_addr.addr().is_ipv4() && **a != want_addr)
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

/// Deletes our vxlan device `name` (`ip link del NAME`) when it exists and
/// is a flannel vxlan device: the device of an address family the config no
/// longer enables. Returns a line when one was removed.
pub fn remove_device(nl: &mut Netlink, name: &str) -> Result<Option<String>, VxlanError> {
    let k = |source| VxlanError::Kernel {
        device: name.to_string(),
        source,
    };
    match nl.link_by_name(name).map_err(k)? {
        Some(l) if crate::backend::hostgw::is_vxlan_leftover(&l) => {
            nl.del_link(l.index).map_err(k)?;
            Ok(Some(format!(
                "removed {name} (ifindex {}): its address family is not enabled any more",
                l.index
            )))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_netlink::VxlanInfo;

    fn dev4(mtu: u32) -> VxlanDevice {
        device(
            &VxlanConfig::default(),
            IpFamily::V4,
            IpAddr::V4(Ipv4Addr::new(172, 16, 1, 14)),
            2,
            mtu,
            mac(),
        )
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
        let d = dev4(1450);
        assert_eq!(d.name, "flannel.1");
        assert_eq!(d.vni, 1);
        assert_eq!(d.local, IpAddr::V4(Ipv4Addr::new(172, 16, 1, 14)));
        assert_eq!(d.underlay_index, 2);
        assert!(!d.learning);
        assert_eq!(d.mtu, 1450);
        assert_eq!(
            device_address("10.244.1.0/24".parse().unwrap()),
            "10.244.1.0/32".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn v6_device_as_upstream() {
        let local: IpAddr = "fd00:1::14".parse().unwrap();
        let d = device(
            &VxlanConfig {
                vni: 7,
                ..VxlanConfig::default()
            },
            IpFamily::V6,
            local,
            2,
            1430,
            mac(),
        );
        assert_eq!(d.name, "flannel-v6.7");
        assert_eq!((d.vni, d.local, d.mtu), (7, local, 1430));
        let spec = DeviceSpec {
            device: d,
            address: device_address("fd00:10:244:1::/64".parse().unwrap()),
        };
        assert_eq!(
            spec.address,
            "fd00:10:244:1::/128".parse::<IpNet>().unwrap()
        );
        assert_eq!(spec.family(), IpFamily::V6);
    }

    #[test]
    fn mismatch_detects_fixed_attributes_only() {
        let d = dev4(1450);
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
        let d = dev4(1450);
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
        assert_eq!(lease_vtep_mac(&a, 1, IpFamily::V4), Some(mac()));
        assert_eq!(lease_vtep_mac(&a, 1, IpFamily::V6), None);
        assert_eq!(
            lease_vtep_mac(&a, 2, IpFamily::V4),
            None,
            "another VNI's MAC is not ours"
        );
    }

    #[test]
    fn dual_stack_lease_attrs_carry_one_vtep_mac_per_family() {
        let m6: MacAddr = "02:00:00:00:06:01".parse().unwrap();
        let a = lease_attrs_dual(
            Some((Ipv4Addr::new(172, 16, 1, 14), mac())),
            Some(("fd00:1::14".parse().unwrap(), m6)),
            1,
        );
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"PublicIP":"172.16.1.14","PublicIPv6":"fd00:1::14","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"26:62:24:f0:61:01"},"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:06:01"}}"#
        );
        assert_eq!(lease_vtep_mac(&a, 1, IpFamily::V6), Some(m6));
        // IPv6 only: PublicIP "0.0.0.0" and no BackendData, as upstream.
        let a = lease_attrs_dual(None, Some(("fd00:1::14".parse().unwrap(), m6)), 1);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:1::14","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:06:01"}}"#
        );
        assert_eq!(lease_vtep_mac(&a, 1, IpFamily::V4), None);
    }
}
