//! `flannel_netlink::wireguard` against a real kernel WireGuard: this
//! machine's kernel has none, so the test boots Debian's stock kernel in
//! QEMU (`scripts/kernel-vm`, no network device, no root needed) with this
//! very test binary inside, and runs the `#[ignore]`d `guest` test there as
//! the guest's root. The guest test sets 20,000 peers (chunked writes),
//! reads them back (a multi-part dump), applies a diff of
//! [`peer_updates`] and reads again, and checks the replies for a missing
//! device and for a link that is not WireGuard.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use flannel_core::wireguard::{peer_updates, KernelPeer, PeerUpdate, SecretKey, WgKey};
use flannel_netlink::wireguard::{WgDeviceSet, WireguardNetlink};
use flannel_netlink::Netlink;

const PEERS: u32 = 20_000;

#[test]
fn wireguard_netlink_on_a_kernel_with_wireguard() {
    // scripts/kernel-vm checks for what it needs itself (stderr, below).
    let me = std::env::current_exe().unwrap();
    let name = me.file_name().unwrap().to_str().unwrap().to_string();
    let init = format!(
        "#!/bin/sh\nexport PATH=/bin:/usr/bin\n\
         mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmp /tmp\n\
         modprobe wireguard && echo 'MARK modules loaded'\n\
         /usr/bin/{name} --ignored --exact guest --nocapture --test-threads 1 && echo 'MARK guest passed'\n\
         poweroff -f\n"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = std::env::temp_dir().join(format!("fnl-wg-vm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("init"), init).unwrap();
    let out = Command::new(root.join("scripts/kernel-vm"))
        .arg(dir.join("init"))
        .arg(&me)
        .env("KERNEL_VM_CACHE", root.join("target/kernel-vm"))
        .output()
        .expect("run scripts/kernel-vm");
    let _ = std::fs::remove_dir_all(&dir);
    let console = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for mark in ["MARK modules loaded", "MARK guest passed"] {
        assert!(
            console.contains(mark),
            "missing {mark:?}\nconsole:\n{console}\nstderr:\n{stderr}"
        );
    }
}

fn peer(i: u32) -> KernelPeer {
    let mut key = [0u8; 32];
    key[..4].copy_from_slice(&i.to_be_bytes());
    // Not all-zero: a zero key is no peer.
    key[31] = 1;
    KernelPeer {
        public_key: WgKey(key),
        preshared_key: None,
        endpoint: Some(SocketAddr::from((
            [172, 16, (i >> 8) as u8, i as u8],
            51820,
        ))),
        allowed_ips: vec![format!("10.{}.{}.0/24", i >> 8, i & 0xff).parse().unwrap()],
        persistent_keepalive: 0,
    }
}

fn sorted(mut v: Vec<KernelPeer>) -> Vec<KernelPeer> {
    v.sort_by_key(|p| p.public_key);
    v
}

/// `wg set wgtest0 peer ...` for each update.
fn set_peers(wg: &mut WireguardNetlink, peers: &[PeerUpdate]) {
    let set = WgDeviceSet {
        peers,
        ..WgDeviceSet::default()
    };
    wg.set_device("wgtest0", &set).unwrap();
}

/// Runs inside the guest only (as its root, on a kernel with WireGuard).
#[test]
#[ignore = "runs inside the QEMU guest of wireguard_netlink_on_a_kernel_with_wireguard"]
fn guest() {
    let mut nl = Netlink::open().unwrap();
    nl.add_wireguard_link("wgtest0", Some(1420)).unwrap();
    let mut wg = WireguardNetlink::open().unwrap();
    let fresh = wg.get_device("wgtest0").unwrap().expect("device");
    assert_eq!((fresh.private_key, fresh.listen_port), (None, 0));
    assert!(fresh.peers.is_empty());
    assert_eq!(wg.get_device("nosuchdev").unwrap(), None);
    assert_eq!(
        wg.get_device("lo").unwrap(),
        None,
        "lo is no WireGuard device"
    );

    // Key, port, and one peer with everything flannel sets.
    let key = SecretKey(WgKey([0x40; 32]));
    let mut full = peer(PEERS + 1);
    full.preshared_key = Some(SecretKey(WgKey([7; 32])));
    full.persistent_keepalive = 25;
    full.allowed_ips.push("fd00:0:0:1::/64".parse().unwrap());
    full.endpoint = Some("[fd00::1]:51821".parse().unwrap());
    let set = WgDeviceSet {
        private_key: Some(&key),
        listen_port: Some(51820),
        peers: &[PeerUpdate::Set(full.clone())],
    };
    wg.set_device("wgtest0", &set).unwrap();
    let dev = wg.get_device("wgtest0").unwrap().unwrap();
    assert_eq!(dev.private_key, Some(key));
    assert_eq!(dev.listen_port, 51820);
    assert_eq!(dev.peers.len(), 1);
    assert_eq!(dev.peers[0].peer, full);
    // Clearing the PSK and keepalive.
    let mut plain = full.clone();
    plain.preshared_key = None;
    plain.persistent_keepalive = 0;
    set_peers(&mut wg, &[PeerUpdate::Set(plain.clone())]);
    let dev = wg.get_device("wgtest0").unwrap().unwrap();
    assert_eq!(dev.peers[0].peer, plain);
    assert_eq!(dev.private_key, Some(key), "a peer write keeps the key");

    // 20,000 peers in chunks, read back whole.
    let want: Vec<KernelPeer> = (0..PEERS).map(peer).collect();
    let updates = peer_updates(&want, &[plain]);
    assert_eq!(updates.len(), PEERS as usize + 1);
    let t = Instant::now();
    set_peers(&mut wg, &updates);
    let set_took = t.elapsed();
    let t = Instant::now();
    let dev = wg.get_device("wgtest0").unwrap().unwrap();
    let get_took = t.elapsed();
    let have: Vec<KernelPeer> = dev.peers.into_iter().map(|p| p.peer).collect();
    assert_eq!(have.len(), PEERS as usize);
    assert_eq!(sorted(have.clone()), sorted(want.clone()));
    println!("{PEERS} peers: set in {set_took:?}, read back in {get_took:?}");

    // A diff of 30: 10 removed, 10 moved, 10 new.
    let mut next = want.clone();
    next.retain(|p| p.public_key.0[3] % 200 != 1 || p.public_key.0[2] % 8 != 0);
    let removed = want.len() - next.len();
    for (k, p) in next.iter_mut().take(10).enumerate() {
        p.allowed_ips = vec![format!("10.250.{k}.0/24").parse().unwrap()];
    }
    next.extend((PEERS + 10..PEERS + 20).map(peer));
    let diff = peer_updates(&next, &have);
    assert_eq!(diff.len(), removed + 20);
    let t = Instant::now();
    set_peers(&mut wg, &diff);
    println!("a diff of {} written in {:?}", diff.len(), t.elapsed());
    let dev = wg.get_device("wgtest0").unwrap().unwrap();
    let again: Vec<KernelPeer> = dev.peers.into_iter().map(|p| p.peer).collect();
    assert_eq!(sorted(again.clone()), sorted(next.clone()));
    assert!(peer_updates(&next, &again).is_empty());
    // The guest powers off with the device in place: deleting a device of
    // 20,000 peers takes the kernel minutes under emulation (it flushes
    // its work queues once per peer).
}
