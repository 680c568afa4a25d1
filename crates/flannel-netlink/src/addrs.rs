//! Addresses: `ip addr`.

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::transport::DUMP;
use crate::{is_absent, Netlink, Result};

pub(crate) fn family(ip: &IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn addr_msg(index: u32, addr: IpNet) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = family(&addr.addr());
    m.header.prefix_len = addr.prefix_len();
    m.header.scope = AddressScope::Universe;
    m.header.index = index;
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS equals it on
    // anything but point-to-point links. `ip addr add` sends both.
    m.attributes.push(AddressAttribute::Local(addr.addr()));
    m.attributes.push(AddressAttribute::Address(addr.addr()));
    m
}

impl Netlink {
    /// `ip addr replace ADDR dev INDEX`.
    ///
    /// IPv4 addresses shorter than /31 also get the broadcast address
    /// (`brd +`), as most tools set it.
    pub fn add_address(&mut self, index: u32, addr: IpNet) -> Result<()> {
        let op = format!("ip addr replace {addr} dev {index}");
        let mut m = addr_msg(index, addr);
        if let IpNet::V4(v4) = addr {
            if v4.prefix_len() < 31 {
                m.attributes
                    .push(AddressAttribute::Broadcast(v4.broadcast()));
            }
        }
        match self.t.request(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_REPLACE,
            &op,
        ) {
            Err(e) if e.is_exists() => Ok(()),
            r => r.map(drop),
        }
    }

    /// `ip addr del ADDR dev INDEX`; absent is success.
    pub fn del_address(&mut self, index: u32, addr: IpNet) -> Result<()> {
        let op = format!("ip addr del {addr} dev {index}");
        match self.t.request(
            RouteNetlinkMessage::DelAddress(addr_msg(index, addr)),
            0,
            &op,
        ) {
            Err(e) if is_absent(&e) => Ok(()),
            r => r.map(drop),
        }
    }

    /// `ip addr show dev INDEX` (global scope and all families).
    pub fn list_addresses(&mut self, index: u32) -> Result<Vec<IpNet>> {
        let op = format!("ip addr show dev {index}");
        // With NETLINK_GET_STRICT_CHK the kernel dumps only this device's
        // addresses (it ignores ifa_index otherwise): on a node with hundreds
        // of pod veths, each with its link-local address, that is the
        // difference between one message and hundreds. Strict checking is on
        // only around this dump, since it also makes the kernel reject dump
        // headers it would otherwise ignore; the filter below stays for
        // kernels without it.
        let strict = self.t.sock().set_netlink_get_strict_chk(true).is_ok();
        let mut msg = AddressMessage::default();
        if strict {
            msg.header.index = index;
        }
        let replies = self
            .t
            .request(RouteNetlinkMessage::GetAddress(msg), DUMP, &op);
        if strict {
            let _ = self.t.sock().set_netlink_get_strict_chk(false);
        }
        let replies = replies?;
        let mut out = Vec::new();
        for r in replies {
            let RouteNetlinkMessage::NewAddress(m) = r else {
                continue;
            };
            if m.header.index != index || m.header.scope != AddressScope::Universe {
                continue;
            }
            let mut local = None;
            let mut address = None;
            for a in m.attributes {
                match a {
                    AddressAttribute::Local(ip) => local = Some(ip),
                    AddressAttribute::Address(ip) => address = Some(ip),
                    _ => {}
                }
            }
            // IPv4 reports the own address in IFA_LOCAL (IFA_ADDRESS is the
            // peer on point-to-point links); IPv6 usually only in IFA_ADDRESS.
            if let Some(ip) = local.or(address) {
                if let Ok(net) = IpNet::new(ip, m.header.prefix_len) {
                    out.push(net);
                }
            }
        }
        Ok(out)
    }
}
