//! Root integration tests of IPv6 and dual stack: real `flanneld` processes
//! in network namespaces.
//!
//! Topology: the shared underlay (a switch namespace with a bridge, one
//! namespace per node with `eth0`), where each node's `eth0` gets an IPv6
//! address `fd00:16::1N/64` (nodad) next to its `172.16.1.1N/24`, or instead
//! of it for an IPv6-only underlay. Leases live in a temporary local-store
//! directory. Each node gets the first address of its subnet(s) on `lo` as
//! a ping target standing in for a pod. Namespaces, processes (killed by
//! PID) and directories go on drop, also on panic.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use flannel_core::datapath::{FdbEntry, Neighbour, Route};
use flannel_core::lease::{Lease, VxlanBackendData, BACKEND_HOST_GW, BACKEND_VXLAN};
use flannel_core::mac::MacAddr;
use flannel_core::subnet_env::SubnetEnv;
use flannel_netlink::Link;
use flannel_store::{LocalStore, Store};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

mod common;
use common::{
    block_on, flanneld_in, local_store_flags, ping_in, read_log, wait_for, Daemon, NodeNs, Testbed,
};

const NETWORK: &str = "10.244.0.0/16";
const NETWORK6: &str = "fd00:10:244::/56";
// IPv6SubnetMax keeps random subnets below fd00:10:244:c8::/64: tests inject stale
// subnets above it, which must never be a node's own.
const V6_VXLAN: &str = r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", "IPv6SubnetMax": "fd00:10:244:c7::", "Backend": {"Type": "vxlan"}}"#;
const DUAL_VXLAN: &str = r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", "IPv6SubnetMax": "fd00:10:244:c7::", "Backend": {"Type": "vxlan"}}"#;
const DUAL_HOST_GW: &str = r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", "IPv6SubnetMax": "fd00:10:244:c7::", "Backend": {"Type": "host-gw"}}"#;
const DUAL_VXLAN_DIRECT: &str = r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", "IPv6SubnetMax": "fd00:10:244:c7::", "Backend": {"Type": "vxlan", "DirectRouting": true}}"#;
const V6_DEV: &str = "flannel-v6.1";
const V4_DEV: &str = "flannel.1";

/// The kernel objects one node holds on one vxlan device.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DeviceState {
    link: Link,
    addrs: Vec<IpNet>,
    routes: Vec<Route>,
    neighbours: Vec<Neighbour>,
    fdb: Vec<FdbEntry>,
}

struct Node {
    ip4: Option<Ipv4Addr>,
    ip6: Ipv6Addr,
    base: NodeNs,
}

impl std::ops::Deref for Node {
    type Target = NodeNs;
    fn deref(&self) -> &NodeNs {
        &self.base
    }
}

impl Node {
    fn eth0(&self) -> u32 {
        self.link("eth0").unwrap().index
    }
    /// Everything on the vxlan device `name`, sorted; routes are those
    /// inside `network` through the device, except the kernel's own
    /// (`proto kernel`) route for the device's IPv6 address (an IPv6
    /// address gets a prefix route even as a /128; IPv4 /32 gets none).
    fn device_state(&self, name: &str, network: IpNet) -> Option<DeviceState> {
        let link = self.link(name)?;
        let idx = link.index;
        let (addrs, mut routes, mut neighbours, mut fdb) = self.nl(move |nl| {
            (
                nl.list_addresses(idx).unwrap(),
                nl.list_routes().unwrap(),
                nl.list_neighbours(idx).unwrap(),
                nl.list_fdb(idx).unwrap(),
            )
        });
        routes.retain(|r| {
            r.oif == idx
                && network.contains(&r.dst)
                && !(r.gateway.is_none() && addrs.contains(&r.dst))
        });
        routes.sort();
        neighbours.sort();
        fdb.sort();
        Some(DeviceState {
            link,
            addrs,
            routes,
            neighbours,
            fdb,
        })
    }
    /// Routes inside `network` with a gateway on eth0, sorted.
    fn gateway_routes(&self, network: IpNet) -> Vec<Route> {
        let eth0 = self.eth0();
        let mut r: Vec<Route> = self
            .nl(|nl| nl.list_routes().unwrap())
            .into_iter()
            .filter(|r| network.contains(&r.dst) && r.oif == eth0 && r.gateway.is_some())
            .collect();
        r.sort();
        r
    }
    /// Puts the first address of each subnet on lo (idempotent).
    fn add_targets(&self, subnets: &[IpNet]) {
        let addrs: Vec<IpNet> = subnets
            .iter()
            .map(|s| IpNet::new(first(*s), s.max_prefix_len()).unwrap())
            .collect();
        self.nl(|nl| {
            let lo = nl.link_by_name("lo").unwrap().unwrap();
            let have = nl.list_addresses(lo.index).unwrap();
            for a in addrs {
                if !have.contains(&a) {
                    nl.add_address_nodad(lo.index, a).unwrap();
                }
            }
            nl.set_link_up(lo.index).unwrap();
        });
    }
}

/// The first usable address of a subnet (what subnet.env names).
fn first(s: IpNet) -> IpAddr {
    match s {
        IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) + 1)),
        IpNet::V6(n) => IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) + 1)),
    }
}

/// Pod-to-pod ping from `src` (on lo) to `dst`, IPv4 or IPv6.
fn ping(node: &Node, src: IpAddr, dst: IpAddr) -> bool {
    ping_in(&node.ns.name, Some(src), dst)
}

/// What node `i` knows of a peer: its subnet, public IP and VtepMAC of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Peer {
    subnet: IpNet,
    public_ip: IpAddr,
    mac: MacAddr,
}

/// The packet-walk triple per peer on the device `dev`.
fn vxlan_tables(dev: u32, peers: &[Peer]) -> (Vec<Route>, Vec<Neighbour>, Vec<FdbEntry>) {
    let mut routes = Vec::new();
    let mut neighbours = Vec::new();
    let mut fdb = Vec::new();
    for p in peers {
        let gw = p.subnet.network();
        routes.push(Route {
            dst: p.subnet,
            gateway: Some(gw),
            oif: dev,
            onlink: true,
        });
        neighbours.push(Neighbour {
            ifindex: dev,
            ip: gw,
            mac: p.mac,
        });
        fdb.push(FdbEntry {
            ifindex: dev,
            mac: p.mac,
            dst: p.public_ip,
        });
    }
    routes.sort();
    neighbours.sort();
    fdb.sort();
    (routes, neighbours, fdb)
}

/// This file's nodes on the shared testbed ([`common::Cluster`]).
type Cluster = common::Cluster<Node>;

impl Cluster {
    /// `n` nodes; `ipv4_underlay: false` removes the IPv4 addresses from
    /// the nodes' eth0 (an IPv6-only underlay).
    fn new(tag: &str, n: usize, config: &str, ipv4_underlay: bool) -> Cluster {
        let (bed, underlay) = Testbed::new(&format!("ipv6-{tag}"), "fd6", n, None, config);
        let mut nodes = Vec::new();
        for (idx, (base, ip)) in underlay.into_iter().enumerate() {
            let ip6: Ipv6Addr = format!("fd00:16::1{}", idx + 1).parse().unwrap();
            base.nl(|nl| {
                let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
                nl.add_address_nodad(eth0.index, IpNet::V6(Ipv6Net::new(ip6, 64).unwrap()))
                    .unwrap();
                if !ipv4_underlay {
                    nl.del_address(eth0.index, IpNet::V4(Ipv4Net::new(ip, 24).unwrap()))
                        .unwrap();
                }
            });
            nodes.push(Node {
                ip4: ipv4_underlay.then_some(ip),
                ip6,
                base,
            });
        }
        Cluster { nodes, bed }
    }

    fn start(&self, i: usize) -> Daemon {
        self.start_with(i, &[])
    }

    fn start_with(&self, i: usize, extra: &[&str]) -> Daemon {
        let mut args = vec!["--iface", "eth0"];
        args.extend_from_slice(extra);
        self.spawn(i, &args)
    }

    /// Starts flanneld on node `i` with the test's store, config and
    /// subnet.env plus `extra` (no `--iface`).
    fn spawn(&self, i: usize, extra: &[&str]) -> Daemon {
        let node = &self.nodes[i];
        let mut cmd = flanneld_in(&node.ns, &node.log());
        cmd.args(local_store_flags(
            &self.store,
            &self.config,
            &node.subnet_file(),
        ))
        .args(["--resync-interval", "30"])
        .args(extra);
        Daemon(Some(cmd.spawn().expect("spawn flanneld")))
    }

    fn stop(&self, i: usize, d: Daemon) {
        d.stop(&self.nodes[i].log());
    }

    /// Waits for node `i`'s subnet.env naming `families` subnets; returns it.
    fn wait_env(&self, i: usize, d: &mut Daemon, v4: bool, v6: bool) -> SubnetEnv {
        let node = &self.nodes[i];
        wait_for("subnet.env", Duration::from_secs(15), || {
            d.check_alive(&node.log());
            let env = node.subnet_env()?;
            (env.subnet.is_some() == v4 && env.ipv6_subnet.is_some() == v6).then_some(env)
        })
    }

    fn lease_of_v6(&self, subnet: Ipv6Net) -> Lease {
        let leases = self.leases();
        leases
            .iter()
            .find(|l| l.key.ipv6 == Some(subnet))
            .unwrap_or_else(|| panic!("no lease for {subnet} in {leases:?}"))
            .clone()
    }

    /// Overwrites a lease with a full TTL (24 h), so that its holder's
    /// renewal (due an hour before expiry) does not put it back at once.
    fn update_lease(&self, l: &Lease) {
        block_on(async {
            let store = LocalStore::open(&self.store).unwrap();
            store
                .update_lease(l, Some(Duration::from_secs(24 * 3600)))
                .await
                .unwrap();
        });
    }

    /// Polls `f` on node `i` until it returns true; on timeout panics with
    /// `what`, the last value seen and the log.
    fn wait_until<T: std::fmt::Debug>(
        &self,
        i: usize,
        what: &str,
        mut f: impl FnMut() -> (bool, T),
    ) {
        let start = Instant::now();
        loop {
            let (ok, seen) = f();
            if ok {
                return;
            }
            if start.elapsed() > Duration::from_secs(10) {
                panic!(
                    "node{}: {what}: last seen {seen:#?}; log:\n{}",
                    i + 1,
                    read_log(&self.nodes[i].log())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until node `i`'s device `dev` holds exactly the triples for `peers`.
    fn wait_vxlan(&self, i: usize, dev: &str, network: &str, peers: &[Peer]) -> DeviceState {
        let net: IpNet = network.parse().unwrap();
        let mut last = None;
        self.wait_until(i, &format!("{dev} tables for {peers:?}"), || {
            let st = self.nodes[i].device_state(dev, net);
            let ok = st.as_ref().is_some_and(|st| {
                let (r, n, f) = vxlan_tables(st.link.index, peers);
                st.routes == r && st.neighbours == n && st.fdb == f
            });
            last.clone_from(&st);
            (ok, st)
        });
        last.unwrap()
    }

    fn wait_ping(&self, i: usize, src: IpNet, dst: IpNet) {
        wait_for(
            &format!("ping from node{} {} to {}", i + 1, first(src), first(dst)),
            Duration::from_secs(10),
            || ping(&self.nodes[i], first(src), first(dst)).then_some(()),
        );
    }

    /// Stops node `i`'s daemon and starts it again: the devices `devs`
    /// (name, network) keep index, MAC, addresses and tables, subnet.env is
    /// unchanged, the VtepMACs come from the existing devices, and the
    /// restarted daemon's first pass makes no kernel write. Returns the new
    /// daemon.
    fn restart_writes_nothing(&self, i: usize, d: Daemon, devs: &[(&str, &str)]) -> Daemon {
        let node = &self.nodes[i];
        let state = || -> Vec<DeviceState> {
            devs.iter()
                .map(|(name, net)| node.device_state(name, net.parse().unwrap()).unwrap())
                .collect()
        };
        let before = state();
        let env_before = fs::read_to_string(node.subnet_file()).unwrap();
        let runs = read_log(&node.log())
            .matches("using external interface")
            .count();
        self.stop(i, d);
        let mut d = self.start(i);
        let log = node.log();
        wait_for(
            "restarted daemon programmed",
            Duration::from_secs(15),
            || {
                d.check_alive(&log);
                let l = read_log(&log);
                let this_run = l.split("using external interface").nth(runs + 1)?;
                this_run.contains("datapath programmed").then_some(())
            },
        );
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(state(), before, "same devices, MACs, addresses and tables");
        assert_eq!(fs::read_to_string(node.subnet_file()).unwrap(), env_before);
        let l = read_log(&log);
        let this_run = l.split("using external interface").nth(runs + 1).unwrap();
        let programmed = this_run
            .lines()
            .find(|l| l.contains("datapath programmed"))
            .unwrap();
        assert!(
            programmed.contains("changes=0"),
            "restart pass made no kernel writes: {programmed}\n{l}"
        );
        let writes: Vec<&str> = this_run
            .lines()
            .filter(|l| l.contains(" INFO ") && l.contains("flanneld::reconcile:"))
            .collect();
        assert!(writes.is_empty(), "restart changed the kernel: {writes:#?}");
        assert_eq!(
            this_run.matches("source=ExistingDevice").count(),
            devs.len(),
            "every VtepMAC kept:\n{this_run}"
        );
        d
    }

    /// Waits for the `n`th (1-based) "datapath programmed" line of node `i`.
    fn wait_programmed(&self, i: usize, d: &mut Daemon, n: usize) {
        let log = self.nodes[i].log();
        wait_for("datapath programmed", Duration::from_secs(15), || {
            d.check_alive(&log);
            read_log(&log)
                .matches("datapath programmed")
                .nth(n - 1)
                .map(|_| ())
        });
    }
}

/// The vxlan peers of `family` as node `i` must see them, from the store.
fn vxlan_peers(c: &Cluster, i: usize, v6: bool) -> Vec<Peer> {
    let own = c.nodes[i].ip6;
    c.leases()
        .iter()
        .filter(|l| l.attrs.public_ipv6 != Some(own))
        .map(|l| {
            if v6 {
                Peer {
                    subnet: IpNet::V6(l.key.ipv6.unwrap()),
                    public_ip: IpAddr::V6(l.attrs.public_ipv6.unwrap()),
                    mac: l.attrs.vxlan_v6_data().unwrap().vtep_mac,
                }
            } else {
                Peer {
                    subnet: IpNet::V4(l.key.ipv4.unwrap()),
                    public_ip: IpAddr::V4(l.attrs.public_ip.unwrap()),
                    mac: l.attrs.vxlan_data().unwrap().vtep_mac,
                }
            }
        })
        .collect()
}

#[test]
fn vxlan_ipv6_only_over_an_ipv6_underlay() {
    let c = Cluster::new("v6only", 3, V6_VXLAN, false);
    let mut d: Vec<Daemon> = (0..3).map(|i| c.start(i)).collect();
    let envs: Vec<SubnetEnv> = (0..3)
        .map(|i| c.wait_env(i, &mut d[i], false, true))
        .collect();
    let subnets: Vec<IpNet> = envs
        .iter()
        .map(|e| IpNet::V6(e.lease_key().unwrap().ipv6.unwrap()))
        .collect();

    for (i, env) in envs.iter().enumerate() {
        // subnet.env: only the IPv6 lines; the subnet's first address; the
        // MTU of vxlan over an IPv6 underlay (1500 - 70).
        let text = fs::read_to_string(c.nodes[i].subnet_file()).unwrap();
        let want = format!(
            "FLANNEL_IPV6_NETWORK={NETWORK6}\nFLANNEL_IPV6_SUBNET={}/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n",
            first(subnets[i])
        );
        assert_eq!(text, want);
        assert!(env.network.is_none() && env.subnet.is_none());
        let l = c.lease_of_v6(env.ipv6_subnet.unwrap().trunc());
        // The lease as upstream's IPv6-only vxlan: PublicIP 0.0.0.0 (read
        // back as none), PublicIPv6, BackendV6Data with the device's MAC.
        assert_eq!(l.attrs.backend_type, BACKEND_VXLAN);
        assert_eq!(l.attrs.public_ip, None);
        assert_eq!(l.attrs.public_ipv6, Some(c.nodes[i].ip6));
        assert!(l.attrs.backend_data.is_none(), "{l:?}");
        let data = l.attrs.vxlan_v6_data().unwrap();
        let dev = c.nodes[i].link(V6_DEV).expect("flannel-v6.1");
        assert_eq!(dev.mac, Some(data.vtep_mac));
        assert_eq!(data.vni, 1);
        assert_eq!(dev.mtu, 1430);
        let info = dev.vxlan.unwrap();
        assert_eq!(info.local, Some(IpAddr::V6(c.nodes[i].ip6)));
        assert_eq!(info.link, Some(c.nodes[i].eth0()));
        assert!(!info.learning);
        assert!(c.nodes[i].link(V4_DEV).is_none(), "no IPv4 device");
    }
    let mut states = Vec::new();
    for (i, subnet) in subnets.iter().enumerate() {
        let peers = vxlan_peers(&c, i, true);
        assert_eq!(peers.len(), 2);
        let st = c.wait_vxlan(i, V6_DEV, NETWORK6, &peers);
        // The device's address: its subnet's network address as a /128.
        assert_eq!(st.addrs, vec![IpNet::new(subnet.network(), 128).unwrap()]);
        states.push(st);
        c.nodes[i].add_targets(&[*subnet]);
    }
    for i in 0..3 {
        for j in 0..3 {
            if i != j {
                c.wait_ping(i, subnets[i], subnets[j]);
            }
        }
    }

    // Drift: a deleted IPv6 route and NDP entry come back.
    let peers0 = vxlan_peers(&c, 0, true);
    let (r, n, f) = vxlan_tables(states[0].link.index, &peers0);
    c.nodes[0].nl(|nl| {
        nl.del_route(&r[0]).unwrap();
        nl.del_neighbour(&n[1]).unwrap();
        nl.del_fdb(&f[0]).unwrap();
    });
    c.wait_vxlan(0, V6_DEV, NETWORK6, &peers0);
    c.wait_ping(0, subnets[0], subnets[1]);
    c.wait_ping(0, subnets[0], subnets[2]);

    // The whole flannel-v6.1 deleted: recreated with the same VtepMAC and
    // programmed again (upstream leaves it empty).
    let idx = states[0].link.index;
    c.nodes[0].nl(|nl| nl.del_link(idx).unwrap());
    let st = c.wait_vxlan(0, V6_DEV, NETWORK6, &peers0);
    assert_ne!(st.link.index, idx, "a new device");
    assert_eq!(st.link.mac, states[0].link.mac, "same VtepMAC");
    assert_eq!(st.addrs, states[0].addrs);
    c.wait_ping(0, subnets[0], subnets[1]);

    // Restart: same subnet, same VtepMAC, no kernel write.
    let d0 = c.restart_writes_nothing(0, d.remove(0), &[(V6_DEV, NETWORK6)]);
    let before = c.nodes[0]
        .device_state(V6_DEV, NETWORK6.parse().unwrap())
        .unwrap();

    // Stale IPv6 entries of a node that vanished while the daemon was down
    // are removed at start.
    c.stop(0, d0);
    let gone = Peer {
        subnet: "fd00:10:244:ee::/64".parse().unwrap(),
        public_ip: "fd00:16::99".parse().unwrap(),
        mac: "02:00:00:00:ee:01".parse().unwrap(),
    };
    let (r, n, f) = vxlan_tables(before.link.index, &[gone]);
    c.nodes[0].nl(|nl| {
        nl.replace_fdb(&f[0]).unwrap();
        nl.replace_neighbour(&n[0]).unwrap();
        nl.replace_route(&r[0]).unwrap();
    });
    let mut d0 = c.start(0);
    c.wait_programmed(0, &mut d0, 3);
    c.wait_vxlan(0, V6_DEV, NETWORK6, &peers0);
    c.wait_ping(0, subnets[0], subnets[1]);
    c.stop(0, d0);
    for (i, daemon) in d.into_iter().enumerate() {
        c.stop(i + 1, daemon);
    }
}

#[test]
fn vxlan_dual_stack_two_devices_and_a_v6_only_update_is_applied() {
    let c = Cluster::new("dual", 2, DUAL_VXLAN, true);
    let mut d: Vec<Daemon> = (0..2).map(|i| c.start(i)).collect();
    let envs: Vec<SubnetEnv> = (0..2)
        .map(|i| c.wait_env(i, &mut d[i], true, true))
        .collect();
    let keys: Vec<_> = envs.iter().map(|e| e.lease_key().unwrap()).collect();
    let s4: Vec<IpNet> = keys.iter().map(|k| IpNet::V4(k.ipv4.unwrap())).collect();
    let s6: Vec<IpNet> = keys.iter().map(|k| IpNet::V6(k.ipv6.unwrap())).collect();

    for i in 0..2 {
        let text = fs::read_to_string(c.nodes[i].subnet_file()).unwrap();
        let want = format!(
            "FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET={}/24\nFLANNEL_IPV6_NETWORK={NETWORK6}\nFLANNEL_IPV6_SUBNET={}/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n",
            first(s4[i]),
            first(s6[i])
        );
        assert_eq!(text, want, "pods fit flannel-v6.1 (IPv6 underlay)");
        let l = c.lease_of_v6(keys[i].ipv6.unwrap());
        assert_eq!(l.key, keys[i], "one dual-stack lease");
        assert_eq!(l.attrs.public_ip, c.nodes[i].ip4);
        assert_eq!(l.attrs.public_ipv6, Some(c.nodes[i].ip6));
        let v4 = c.nodes[i].link(V4_DEV).unwrap();
        let v6 = c.nodes[i].link(V6_DEV).unwrap();
        assert_eq!(l.attrs.vxlan_data().unwrap().vtep_mac, v4.mac.unwrap());
        assert_eq!(l.attrs.vxlan_v6_data().unwrap().vtep_mac, v6.mac.unwrap());
        assert_ne!(v4.mac, v6.mac, "one VtepMAC per device");
        assert_eq!((v4.mtu, v6.mtu), (1450, 1430));
        assert_eq!(
            v4.vxlan.unwrap().local,
            c.nodes[i].ip4.map(IpAddr::V4),
            "flannel.1 sends from eth0's IPv4 address"
        );
        assert_eq!(
            v6.vxlan.unwrap().local,
            Some(IpAddr::V6(c.nodes[i].ip6)),
            "flannel-v6.1 from its IPv6 address"
        );
        c.wait_vxlan(i, V4_DEV, NETWORK, &vxlan_peers(&c, i, false));
        c.wait_vxlan(i, V6_DEV, NETWORK6, &vxlan_peers(&c, i, true));
        c.nodes[i].add_targets(&[s4[i], s6[i]]);
    }
    for (i, j) in [(0, 1), (1, 0)] {
        c.wait_ping(i, s4[i], s4[j]);
        c.wait_ping(i, s6[i], s6[j]);
    }

    // Restart: both devices, subnets and VtepMACs kept, no kernel write.
    let d0 = c.restart_writes_nothing(0, d.remove(0), &[(V4_DEV, NETWORK), (V6_DEV, NETWORK6)]);
    d.insert(0, d0);

    // An update of node2's lease that changes only its IPv6 side (another
    // BackendV6Data VtepMAC) is applied on node1; the IPv4 side stays.
    // node2 is stopped first: a running holder sees its lease drift from
    // what it published and writes its own back, racing the edit.
    let d1 = d.remove(1);
    c.stop(1, d1);
    let v4_before = c.nodes[0]
        .device_state(V4_DEV, NETWORK.parse().unwrap())
        .unwrap();
    let orig = c.lease_of_v6(keys[1].ipv6.unwrap());
    let new_mac: MacAddr = "02:aa:00:00:06:99".parse().unwrap();
    let mut changed = orig.clone();
    changed.attrs.backend_v6_data =
        Some(flannel_core::lease::BackendData::new(&VxlanBackendData {
            vni: 1,
            vtep_mac: new_mac,
        }));
    c.update_lease(&changed);
    let want6 = vec![Peer {
        subnet: s6[1],
        public_ip: IpAddr::V6(c.nodes[1].ip6),
        mac: new_mac,
    }];
    c.wait_vxlan(0, V6_DEV, NETWORK6, &want6);
    assert_eq!(
        c.nodes[0]
            .device_state(V4_DEV, NETWORK.parse().unwrap())
            .unwrap(),
        v4_before,
        "IPv4 side untouched"
    );
    // And back: node2, started again, publishes its own VtepMACs.
    let mut d1 = c.start(1);
    c.wait_env(1, &mut d1, true, true);
    d.push(d1);
    let back6 = vec![Peer {
        mac: orig.attrs.vxlan_v6_data().unwrap().vtep_mac,
        ..want6[0]
    }];
    c.wait_vxlan(0, V6_DEV, NETWORK6, &back6);
    c.wait_ping(0, s6[0], s6[1]);
    c.wait_ping(0, s4[0], s4[1]);

    for (i, daemon) in d.into_iter().enumerate() {
        c.stop(i, daemon);
    }
}

#[test]
fn host_gw_dual_stack_routes_each_family_via_its_public_ip() {
    let c = Cluster::new("hgw", 2, DUAL_HOST_GW, true);
    let mut d: Vec<Daemon> = (0..2).map(|i| c.start(i)).collect();
    let envs: Vec<SubnetEnv> = (0..2)
        .map(|i| c.wait_env(i, &mut d[i], true, true))
        .collect();
    let keys: Vec<_> = envs.iter().map(|e| e.lease_key().unwrap()).collect();
    let s4: Vec<IpNet> = keys.iter().map(|k| IpNet::V4(k.ipv4.unwrap())).collect();
    let s6: Vec<IpNet> = keys.iter().map(|k| IpNet::V6(k.ipv6.unwrap())).collect();
    let net4: IpNet = NETWORK.parse().unwrap();
    let net6: IpNet = NETWORK6.parse().unwrap();
    let via = |dst: IpNet, gw: IpAddr, oif: u32| Route {
        dst,
        gateway: Some(gw),
        oif,
        onlink: false,
    };
    for i in 0..2 {
        let j = 1 - i;
        let env = &envs[i];
        assert_eq!(env.mtu, 1500, "host-gw: no overhead");
        assert_eq!(env.ipv6_network, Some(NETWORK6.parse().unwrap()));
        let l = c.lease_of_v6(keys[i].ipv6.unwrap());
        assert_eq!(l.attrs.backend_type, BACKEND_HOST_GW);
        assert_eq!(l.attrs.public_ipv6, Some(c.nodes[i].ip6));
        assert!(l.attrs.backend_data.is_none() && l.attrs.backend_v6_data.is_none());
        let eth0 = c.nodes[i].eth0();
        let want4 = vec![via(s4[j], IpAddr::V4(c.nodes[j].ip4.unwrap()), eth0)];
        let want6 = vec![via(s6[j], IpAddr::V6(c.nodes[j].ip6), eth0)];
        c.wait_until(i, "host-gw routes", || {
            let got = (
                c.nodes[i].gateway_routes(net4),
                c.nodes[i].gateway_routes(net6),
            );
            (got == (want4.clone(), want6.clone()), got)
        });
        assert!(c.nodes[i].link(V4_DEV).is_none() && c.nodes[i].link(V6_DEV).is_none());
        c.nodes[i].add_targets(&[s4[i], s6[i]]);
    }
    for (i, j) in [(0, 1), (1, 0)] {
        c.wait_ping(i, s4[i], s4[j]);
        c.wait_ping(i, s6[i], s6[j]);
    }
    // Drift: the IPv6 route comes back.
    let eth0 = c.nodes[0].eth0();
    let r6 = via(s6[1], IpAddr::V6(c.nodes[1].ip6), eth0);
    c.nodes[0].nl(|nl| nl.del_route(&r6).unwrap());
    c.wait_until(0, "IPv6 host-gw route back", || {
        let got = c.nodes[0].gateway_routes(net6);
        (got == vec![r6.clone()], got)
    });
    c.wait_ping(0, s6[0], s6[1]);
    for (i, daemon) in d.into_iter().enumerate() {
        c.stop(i, daemon);
    }
}

#[test]
fn vxlan_dual_stack_direct_routing_per_family() {
    let c = Cluster::new("direct", 2, DUAL_VXLAN_DIRECT, true);
    let mut d: Vec<Daemon> = (0..2).map(|i| c.start(i)).collect();
    let keys: Vec<_> = (0..2)
        .map(|i| c.wait_env(i, &mut d[i], true, true).lease_key().unwrap())
        .collect();
    let s4: Vec<IpNet> = keys.iter().map(|k| IpNet::V4(k.ipv4.unwrap())).collect();
    let s6: Vec<IpNet> = keys.iter().map(|k| IpNet::V6(k.ipv6.unwrap())).collect();
    for (i, j) in [(0, 1), (1, 0)] {
        // The peer is on eth0's subnet in both families: a plain route via
        // its PublicIP / PublicIPv6, and nothing on the vxlan devices.
        let eth0 = c.nodes[i].eth0();
        let via = |dst: IpNet, gw: IpAddr| Route {
            dst,
            gateway: Some(gw),
            oif: eth0,
            onlink: false,
        };
        let want4 = vec![via(s4[j], IpAddr::V4(c.nodes[j].ip4.unwrap()))];
        let want6 = vec![via(s6[j], IpAddr::V6(c.nodes[j].ip6))];
        c.wait_until(i, "direct routes", || {
            let got = (
                c.nodes[i].gateway_routes(NETWORK.parse().unwrap()),
                c.nodes[i].gateway_routes(NETWORK6.parse().unwrap()),
            );
            (got == (want4.clone(), want6.clone()), got)
        });
        c.wait_vxlan(i, V4_DEV, NETWORK, &[]);
        c.wait_vxlan(i, V6_DEV, NETWORK6, &[]);
        c.nodes[i].add_targets(&[s4[i], s6[i]]);
    }
    for (i, j) in [(0, 1), (1, 0)] {
        c.wait_ping(i, s4[i], s4[j]);
        c.wait_ping(i, s6[i], s6[j]);
    }
    for (i, daemon) in d.into_iter().enumerate() {
        c.stop(i, daemon);
    }
}

#[test]
fn bad_ipv6_input_is_refused_before_touching_the_kernel() {
    // An IPv4-only underlay.
    let c = Cluster::new("refuse", 1, DUAL_VXLAN, false);
    let node = &c.nodes[0];
    // Put back the IPv4 address and drop the IPv6 one: eth0 is IPv4 only.
    node.nl(|nl| {
        let eth0 = nl.link_by_name("eth0").unwrap().unwrap().index;
        nl.add_address(eth0, "172.16.1.11/24".parse().unwrap())
            .unwrap();
        nl.del_address(eth0, "fd00:16::11/64".parse().unwrap())
            .unwrap();
    });
    let cases: [(&str, &[&str], &str); 4] = [
        // Dual stack needs an IPv6 address on the external interface.
        (DUAL_VXLAN, &[], "no global IPv6 address"),
        (V6_VXLAN, &[], "no global IPv6 address"),
        (
            r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", "IPv6SubnetLen": 127}"#,
            &[],
            "IPv6SubnetLen",
        ),
        (DUAL_VXLAN, &["--public-ipv6", "fd00::zz"], "--public-ipv6"),
    ];
    for (cfg, extra, needle) in cases {
        fs::write(&c.config, cfg).unwrap();
        let _ = fs::remove_file(node.log());
        let mut d = c.start_with(0, extra);
        let st = wait_for("flanneld to exit", Duration::from_secs(10), || {
            d.0.as_mut().unwrap().try_wait().unwrap()
        });
        let log = read_log(&node.log());
        assert!(!st.success(), "{cfg} {extra:?} must fail; log:\n{log}");
        assert!(
            log.contains(needle),
            "error for {cfg} {extra:?} must name {needle:?}:\n{log}"
        );
        assert!(node.link(V4_DEV).is_none() && node.link(V6_DEV).is_none());
        assert!(!node.subnet_file().exists(), "no subnet.env for {cfg}");
        assert!(c.leases().is_empty(), "no lease for {cfg}");
    }
}

#[test]
fn ipv6_only_picks_the_interface_of_the_ipv6_default_route() {
    let c = Cluster::new("v6default", 1, V6_VXLAN, false);
    let node = &c.nodes[0];
    let eth0 = node.eth0();
    node.nl(|nl| {
        nl.replace_route(&Route {
            dst: "::/0".parse().unwrap(),
            gateway: Some("fd00:16::1".parse().unwrap()),
            oif: eth0,
            onlink: false,
        })
        .unwrap()
    });
    // No --iface: the IPv6 default route's interface, its IPv6 address.
    let mut d = c.spawn(0, &[]);
    let env = c.wait_env(0, &mut d, false, true);
    let log = read_log(&node.log());
    let line = log
        .lines()
        .find(|l| l.contains("using external interface"))
        .unwrap();
    assert!(
        line.contains("iface=eth0") && line.contains("public_ipv6=Some(fd00:16::11)"),
        "{line}"
    );
    let l = c.lease_of_v6(env.ipv6_subnet.unwrap().trunc());
    assert_eq!(l.attrs.public_ipv6, Some(node.ip6));
    let dev = node.link(V6_DEV).unwrap();
    assert_eq!(dev.vxlan.unwrap().local, Some(IpAddr::V6(node.ip6)));
    c.stop(0, d);
    // --public-ipv6 is published (another address is another node to the
    // store, so this is a new lease); the device still sends from eth0's
    // own address.
    let mut d = c.spawn(0, &["--public-ipv6", "2001:db8::11"]);
    let published: Ipv6Addr = "2001:db8::11".parse().unwrap();
    c.wait_until(0, "a lease with --public-ipv6", || {
        d.check_alive(&node.log());
        let leases = c.leases();
        let ok = leases
            .iter()
            .any(|l| l.attrs.public_ipv6 == Some(published) && l.attrs.vxlan_v6_data().is_some());
        (ok, leases)
    });
    assert_eq!(
        node.link(V6_DEV).unwrap().vxlan.unwrap().local,
        Some(IpAddr::V6(node.ip6))
    );
    c.stop(0, d);
}
