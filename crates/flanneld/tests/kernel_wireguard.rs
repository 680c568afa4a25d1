//! flanneld's wireguard backend on a kernel that has WireGuard: Debian's
//! stock kernel booted in QEMU by `scripts/kernel-vm` (this machine's own
//! kernel has no wireguard module and cannot load one). Inside the guest,
//! two node namespaces joined by a veth pair run the real `flanneld` on a
//! local store; node 1 starts with upstream flannel's kernel `flannel-wg`
//! device in place. Checked from the guest's console: the probe finds
//! kernel WireGuard, the kernel device is replaced by flanneld's TUN device,
//! a ping crosses the userspace datapath, and a restart with vxlan removes
//! upstream's kernel `flannel-wg-v6` and our `flannel-wg`. Nothing of the
//! guest reaches this machine's network: it has no network device.

use std::path::Path;
use std::process::Command;

const INIT: &str = r#"#!/bin/sh
export PATH=/bin
IP=/usr/bin/ip
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp; mount -t tmpfs run /run
modprobe wireguard && modprobe tun && modprobe veth && modprobe vxlan && echo "MARK modules loaded"
$IP netns add n1; $IP netns add n2
$IP link add e1 netns n1 type veth peer name e2 netns n2
for i in 1 2; do
  $IP -n n$i addr add 172.16.1.1$i/24 dev e$i; $IP -n n$i link set e$i up; $IP -n n$i link set lo up
done
$IP -n n1 link add flannel-wg type wireguard && echo "MARK upstream flannel-wg created"
mkdir -p /tmp/store /tmp/n1 /tmp/n2
echo '{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}' > /tmp/wg.json
echo '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}' > /tmp/vxlan.json
start() { # node config
  WIREGUARD_KEY_FILE=/tmp/n$1/wgkey $IP netns exec n$1 /usr/bin/flanneld --local-store /tmp/store \
    --net-config-path /tmp/$2.json --iface e$1 --subnet-file /tmp/n$1/subnet.env \
    --iptables-forward-rules=false >> /tmp/n$1/log 2>&1 &
  echo $! > /tmp/n$1/pid
}
start 1 wg; start 2 wg
for t in $(seq 60); do [ -f /tmp/n1/subnet.env ] && [ -f /tmp/n2/subnet.env ] && break; sleep 1; done
S2=$(grep FLANNEL_SUBNET /tmp/n2/subnet.env | cut -d= -f2 | cut -d/ -f1)
$IP -n n2 addr add $S2/32 dev lo
$IP -n n1 -d link show flannel-wg | grep -q "tun type tun" && echo "MARK flannel-wg is a tun device"
for t in $(seq 20); do $IP netns exec n1 ping -c 1 -W 2 $S2 > /dev/null && echo "MARK ping over flannel-wg" && break; done
kill $(cat /tmp/n1/pid); sleep 1
$IP -n n1 link add flannel-wg-v6 type wireguard && echo "MARK upstream flannel-wg-v6 created"
rm /tmp/n1/subnet.env; start 1 vxlan
for t in $(seq 60); do [ -f /tmp/n1/subnet.env ] && break; sleep 1; done
$IP -n n1 link show flannel.1 > /dev/null && echo "MARK flannel.1 up with vxlan"
$IP -n n1 link show flannel-wg > /dev/null 2>&1 || echo "MARK flannel-wg removed"
$IP -n n1 link show flannel-wg-v6 > /dev/null 2>&1 || echo "MARK flannel-wg-v6 removed"
echo "LOG1-BEGIN"; cat /tmp/n1/log; echo "LOG1-END"
poweroff -f
"#;

#[test]
fn on_a_kernel_with_wireguard_upstreams_devices_give_way_and_pods_talk() {
    for (cmd, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("cpio", "cpio"),
        ("depmod", "kmod"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {cmd}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "needs {cmd} (Debian package {pkg}; scripts/test installs it)"
        );
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = std::env::temp_dir().join(format!("flanneld-it-kvm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let init = dir.join("init");
    std::fs::write(&init, INIT).unwrap();
    let out = Command::new(root.join("scripts/kernel-vm"))
        .arg(&init)
        .arg(env!("CARGO_BIN_EXE_flanneld"))
        .env("KERNEL_VM_CACHE", root.join("target/kernel-vm"))
        .output()
        .expect("run scripts/kernel-vm");
    let _ = std::fs::remove_dir_all(&dir);
    let console = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let show = || format!("console:\n{console}\nstderr:\n{stderr}");
    for mark in [
        "MARK modules loaded",
        "MARK upstream flannel-wg created",
        "MARK flannel-wg is a tun device",
        "MARK ping over flannel-wg",
        "MARK upstream flannel-wg-v6 created",
        "MARK flannel.1 up with vxlan",
        "MARK flannel-wg removed",
        "MARK flannel-wg-v6 removed",
    ] {
        assert!(console.contains(mark), "missing {mark:?}\n{}", show());
    }
    let log = console
        .split("LOG1-BEGIN")
        .nth(1)
        .and_then(|l| l.split("LOG1-END").next())
        .unwrap_or_default();
    assert!(
        log.contains("the kernel has WireGuard (link type wireguard)"),
        "the probe: {log}"
    );
    assert!(
        log.contains(r#"recreating it device="flannel-wg" kind=Some("wireguard")"#),
        "upstream's kernel device replaced: {log}"
    );
}
