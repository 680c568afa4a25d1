//! The wireguard backend on the kernel's WireGuard, as upstream runs it:
//! `ip link add flannel-wg type wireguard`, `wg set flannel-wg private-key
//! /run/flannel/wgkey listen-port 51820`, a `wg set flannel-wg peer KEY
//! endpoint IP:PORT allowed-ips SUBNET [persistent-keepalive N]
//! [preshared-key PSK]` per remote lease, and the same MTU, addresses,
//! up state and routes as the userspace datapath ([`super::wireguard`]).
//!
//! Level-triggered: every full pass reads the device back (`wg show
//! flannel-wg dump`), puts back a deleted device, a changed key or port,
//! and writes only the peers that differ from the leases'
//! ([`flannel_core::wireguard::peer_updates`]); a peer that is right is
//! not touched, so its session survives. Event passes diff against what
//! the last full pass read plus the writes since: an event costs the peers
//! it changes. The kernel sends no notification when somebody else changes
//! a peer (`wg set` by hand); the timer's full pass puts it back.
//!
//! [`WgDevice`] is one device of either kind; `Datapath` in the config
//! picks which (the daemon probes the kernel once at start).

use flannel_core::wireguard::{peer_updates, Counters, KernelPeer, PeerUpdate, WgPeer};
use flannel_netlink::wireguard::{WgDeviceSet, WireguardNetlink};
use flannel_netlink::{LinkStats, Netlink};

use super::wireguard::{
    ensure_link, port_field, CountersReader, WgDatapath, WgDeviceSpec, WireguardError,
};

/// The kernel's link type of a WireGuard device (`IFLA_INFO_KIND`).
pub const LINK_KIND: &str = "wireguard";

/// One kernel WireGuard device and the generic netlink socket that
/// configures it.
pub struct KernelDevice {
    spec: WgDeviceSpec,
    wg: WireguardNetlink,
    /// The kernel's peers as of the last read-back and our writes since.
    have: Vec<KernelPeer>,
    /// The peers of the leases, as last handed in.
    want: Vec<WgPeer>,
    /// The link's counters as of the last [`Self::ensure`].
    stats: LinkStats,
}

impl std::fmt::Debug for KernelDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDevice")
            .field("device", &self.spec.device)
            .field("peers", &self.have.len())
            .finish()
    }
}

impl KernelDevice {
    /// Makes the kernel hold the device as `spec` wants it: creates it
    /// (replacing a device of another kind of that name, such as the
    /// userspace datapath's TUN device), sets the private key and listen
    /// port when they differ, reads its peers back for [`Self::set_peers`],
    /// and fixes MTU, addresses, up state and the cluster routes. Returns
    /// the device's index and a line per change.
    pub fn ensure(
        this: &mut Option<KernelDevice>,
        nl: &mut Netlink,
        spec: &WgDeviceSpec,
    ) -> Result<(u32, Vec<String>), WireguardError> {
        let dev = &spec.device;
        let k = |source| WireguardError::Kernel {
            device: dev.clone(),
            source,
        };
        // The kernel binds the port when the key is set on a device that is
        // up, or when the device goes up.
        let port_in_use = |e: flannel_netlink::Error| {
            if e.raw_os_error() == Some(libc::EADDRINUSE) {
                WireguardError::PortInUse {
                    device: dev.clone(),
                    field: port_field(spec),
                    port: spec.port,
                }
            } else {
                k(e)
            }
        };
        let mut changes = Vec::new();
        let mut link = nl.link_by_name(dev).map_err(k)?;
        if let Some(l) = link
            .as_ref()
            .filter(|l| l.kind.as_deref() != Some(LINK_KIND))
        {
            nl.del_link(l.index).map_err(k)?;
            changes.push(format!(
                "deleted {dev} (kind {}) to put a kernel wireguard device in its place",
                l.kind.as_deref().unwrap_or("unknown")
            ));
            link = None;
        }
        if link.is_none() {
            nl.add_wireguard_link(dev, Some(spec.mtu)).map_err(k)?;
            changes.push(format!("added {dev} (ip link add {dev} type wireguard)"));
        }
        // Opened after the link exists: creating it loads the module,
        // which registers the generic netlink family.
        let (wg, want) = match this.take() {
            Some(d) => (d.wg, d.want),
            None => (WireguardNetlink::open().map_err(k)?, Vec::new()),
        };
        let mut me = KernelDevice {
            spec: spec.clone(),
            wg,
            have: Vec::new(),
            want,
            stats: LinkStats::default(),
        };
        let state = me.wg.get_device(dev).map_err(k)?.ok_or_else(|| {
            k(flannel_netlink::Error::LinkNotFound {
                op: format!("wg show {dev}"),
                name: dev.clone(),
            })
        })?;
        let key = (state.private_key != Some(spec.keys.private)).then_some(&spec.keys.private);
        let port = (state.listen_port != spec.port).then_some(spec.port);
        if key.is_some() || port.is_some() {
            let set = WgDeviceSet {
                private_key: key,
                listen_port: port,
                peers: &[],
            };
            me.wg.set_device(dev, &set).map_err(port_in_use)?;
            if key.is_some() {
                changes.push(format!(
                    "set {dev} private-key (public key {})",
                    spec.keys.public
                ));
            }
            if let Some(p) = port {
                changes.push(format!(
                    "set {dev} listen-port {p} (was {})",
                    state.listen_port
                ));
            }
        }
        me.have = state.peers.into_iter().map(|p| p.peer).collect();
        let link = nl.link_by_name(dev).map_err(k)?.ok_or_else(|| {
            k(flannel_netlink::Error::LinkNotFound {
                op: "ip link show".into(),
                name: dev.clone(),
            })
        })?;
        ensure_link(nl, &link, spec, &mut changes).map_err(port_in_use)?;
        me.stats = nl.link_stats(link.index).map_err(k)?.unwrap_or_default();
        *this = Some(me);
        Ok((link.index, changes))
    }

    /// Writes the peers among `peers` that the kernel does not hold as
    /// wanted and removes those it should not hold. Returns a line saying
    /// how many, `None` when nothing was written; on an error nothing is
    /// assumed written, so the next pass sends it all again.
    pub fn set_peers(&mut self, peers: Vec<WgPeer>) -> Result<Option<String>, WireguardError> {
        let want: Vec<KernelPeer> = peers
            .iter()
            .map(|p| KernelPeer::new(p, self.spec.psk, self.spec.keepalive))
            .collect();
        self.want = peers;
        let updates = peer_updates(&want, &self.have);
        if updates.is_empty() {
            return Ok(None);
        }
        for u in &updates {
            match u {
                PeerUpdate::Set(p) => {
                    tracing::debug!(device = %self.spec.device, peer = %p.public_key, endpoint = ?p.endpoint, allowed_ips = ?p.allowed_ips, "wg set peer")
                }
                PeerUpdate::Remove(key) => {
                    tracing::debug!(device = %self.spec.device, peer = %key, "wg set peer remove")
                }
            }
        }
        let set = WgDeviceSet {
            private_key: None,
            listen_port: None,
            peers: &updates,
        };
        self.wg
            .set_device(&self.spec.device, &set)
            .map_err(|source| WireguardError::Kernel {
                device: self.spec.device.clone(),
                source,
            })?;
        self.have = want;
        let removed = updates
            .iter()
            .filter(|u| matches!(u, PeerUpdate::Remove(_)))
            .count();
        Ok(Some(format!(
            "wg set {}: {} peers written, {removed} removed",
            self.spec.device,
            updates.len() - removed
        )))
    }
}

/// One wireguard device of either datapath.
#[derive(Debug)]
pub enum WgDevice {
    /// The userspace datapath on a TUN device.
    Userspace(WgDatapath),
    /// The kernel's WireGuard.
    Kernel(KernelDevice),
}

impl WgDevice {
    /// The device's name.
    pub fn device(&self) -> &str {
        match self {
            WgDevice::Userspace(d) => d.device(),
            WgDevice::Kernel(d) => &d.spec.device,
        }
    }

    /// [`WgDatapath::ensure`] or [`KernelDevice::ensure`], as `spec.kernel`
    /// says; a device of the other datapath is stopped first (its threads
    /// joined) and its link replaced. A kernel WireGuard link of the name
    /// (ours, or upstream's) goes before the userspace datapath starts: it
    /// holds the listen port the datapath binds first.
    pub fn ensure(
        this: &mut Option<WgDevice>,
        nl: &mut Netlink,
        spec: &WgDeviceSpec,
    ) -> Result<(u32, Vec<String>), WireguardError> {
        if spec.kernel {
            let mut k = match this.take() {
                Some(WgDevice::Kernel(k)) => Some(k),
                _ => None,
            };
            let r = KernelDevice::ensure(&mut k, nl, spec);
            *this = k.map(WgDevice::Kernel);
            r
        } else {
            let mut u = match this.take() {
                Some(WgDevice::Userspace(u)) => Some(u),
                _ => None,
            };
            let mut changes = Vec::new();
            if u.is_none() {
                let k = |source| WireguardError::Kernel {
                    device: spec.device.clone(),
                    source,
                };
                if let Some(l) = nl
                    .link_by_name(&spec.device)
                    .map_err(k)?
                    .filter(|l| l.kind.as_deref() == Some(LINK_KIND))
                {
                    nl.del_link(l.index).map_err(k)?;
                    changes.push(format!(
                        "deleted {} (kernel wireguard) to put the userspace datapath in its place",
                        spec.device
                    ));
                }
            }
            let r = WgDatapath::ensure(&mut u, nl, spec);
            *this = u.map(WgDevice::Userspace);
            r.map(|(index, more)| {
                changes.extend(more);
                (index, changes)
            })
        }
    }

    /// Hands the device its peers; returns whether the peer set changed
    /// and, for a kernel device, a line for the writes it took.
    pub fn set_peers(
        &mut self,
        peers: Vec<WgPeer>,
    ) -> Result<(bool, Option<String>), WireguardError> {
        match self {
            WgDevice::Userspace(d) => Ok((d.set_peers(peers), None)),
            WgDevice::Kernel(d) => {
                let changed = d.want != peers;
                Ok((changed, d.set_peers(peers)?))
            }
        }
    }

    /// The peers in use.
    pub fn peers(&self) -> Vec<WgPeer> {
        match self {
            WgDevice::Userspace(d) => d.peers(),
            WgDevice::Kernel(d) => d.want.clone(),
        }
    }

    /// The userspace datapath's counters.
    pub fn counters_reader(&self) -> Option<CountersReader> {
        match self {
            WgDevice::Userspace(d) => Some(d.counters_reader()),
            WgDevice::Kernel(_) => None,
        }
    }

    /// A kernel device's packets and bytes (the link's counters as of the
    /// last full pass; the kernel keeps no handshake or drop counts there).
    pub fn kernel_counters(&self) -> Option<Counters> {
        match self {
            WgDevice::Userspace(_) => None,
            WgDevice::Kernel(d) => Some(Counters {
                tx_packets: d.stats.tx_packets,
                tx_bytes: d.stats.tx_bytes,
                rx_packets: d.stats.rx_packets,
                rx_bytes: d.stats.rx_bytes,
                ..Counters::default()
            }),
        }
    }
}
