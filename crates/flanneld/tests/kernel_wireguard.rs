//! flanneld's wireguard backend on a kernel that has WireGuard: Debian's
//! stock kernel booted in QEMU by `scripts/kernel-vm` (this machine's own
//! kernel has no wireguard module and cannot load one). Inside the guest,
//! two node namespaces joined by a veth pair run the real `flanneld` on a
//! local store, and wireguard-tools' `wg` reads the kernel's devices back.
//! Node 1 starts with upstream flannel's kernel `flannel-wg` in place and
//! `Datapath` auto, node 2 with `Datapath` userspace. Checked from the
//! guest's console:
//! - node 1 takes the kernel device over (key, port, peer from the lease,
//!   keepalive), node 2 runs a TUN device, and pings cross both ways;
//! - level-triggered: a peer removed by hand, a peer's allowed IPs changed
//!   by hand and the deleted device come back;
//! - node 2 restarted with `Datapath` kernel replaces its TUN device by a
//!   kernel one (kernel to kernel), and restarted again writes nothing and
//!   keeps the session; node 1 restarted with userspace
//!   replaces its kernel device by a TUN (userspace to kernel);
//! - dual stack with kernel devices on both nodes: `Mode` separate
//!   (`flannel-wg-v6` on ListenPortV6, the lease's IPv6 endpoint) and
//!   `Mode` auto (one device, one peer with both subnets), `Mode` ipv6
//!   (both families over IPv6 endpoints), ping and ping6;
//! - a restart with vxlan removes `flannel-wg` and upstream's kernel
//!   `flannel-wg-v6`;
//! - a listen port taken by another WireGuard tunnel is an error naming
//!   `Backend.ListenPort`, retried every pass.
//!
//! Nothing of the guest reaches this machine's network: it has no network
//! device.

use std::path::Path;
use std::process::Command;

const INIT: &str = r#"#!/bin/sh
export PATH=/bin:/usr/bin
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
B='"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PersistentKeepaliveInterval":25'
echo "{$B}}" > /tmp/auto.json
echo "{$B,\"Datapath\":\"userspace\"}}" > /tmp/userspace.json
echo "{$B,\"Datapath\":\"kernel\"}}" > /tmp/kernel.json
echo '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}' > /tmp/vxlan.json
start() { # node config
  rm -f /tmp/n$1/subnet.env
  echo "=== $2" >> /tmp/n$1/log
  WIREGUARD_KEY_FILE=/tmp/n$1/wgkey $IP netns exec n$1 /usr/bin/flanneld --local-store ${STORE:-/tmp/store} \
    --net-config-path /tmp/$2.json --iface e$1 --subnet-file /tmp/n$1/subnet.env \
    --iptables-forward-rules=false --resync-interval 2 --healthz-port 10244 >> /tmp/n$1/log 2>&1 &
  echo $! > /tmp/n$1/pid
  for t in $(seq 60); do [ -f /tmp/n$1/subnet.env ] && break; sleep 1; done
}
stop() { kill $(cat /tmp/n$1/pid); sleep 1; }
wgx() { n=$1; shift; $IP netns exec n$n /usr/bin/wg "$@"; }
kind() { $IP -n n$1 -d link show flannel-wg | grep -q "$2"; }
pings() { # from to
  for t in $(seq 20); do $IP netns exec n$1 ping -c 1 -W 2 $2 > /dev/null && return 0; done; return 1
}
pings6() { # from to
  for t in $(seq 20); do $IP netns exec n$1 ping6 -c 1 -W 2 $2 > /dev/null && return 0; done; return 1
}
# The peer line of node $2's key in node $1's `wg show flannel-wg dump`:
# endpoint address (the port roams to a userspace peer's source port),
# allowed ips, keepalive.
peer() {
  wgx $1 show flannel-wg dump |
    awk -v k="$(wgx $1 pubkey < /tmp/n$2/wgkey)" '$1 == k {sub(/:[0-9]+$/, "", $3); print $3, $4, $8}'
}
until_true() { for t in $(seq 30); do "$@" && return 0; sleep 1; done; return 1; }

start 1 auto; start 2 userspace
S1=$(grep FLANNEL_SUBNET /tmp/n1/subnet.env | cut -d= -f2)
S2=$(grep FLANNEL_SUBNET /tmp/n2/subnet.env | cut -d= -f2)
A1=${S1%.1/24}.0; A2=${S2%.1/24}.0; N2=${S2%.1/24}.0/24
$IP -n n2 addr add $A2/32 dev lo
kind 1 "wireguard" && echo "MARK n1 flannel-wg is kernel wireguard"
kind 2 "tun type tun" && echo "MARK n2 flannel-wg is a tun device"
pings 1 $A2 && echo "MARK ping kernel to userspace"
pings 2 $A1 && echo "MARK ping userspace to kernel"
[ "$(peer 1 2)" = "172.16.1.12 $N2 25" ] && echo "MARK wg show: the peer of the lease"
[ "$(wgx 1 show flannel-wg private-key)" = "$(cat /tmp/n1/wgkey)" ] && echo "MARK wg show: our private key"
[ "$(wgx 1 show flannel-wg listen-port)" = "51820" ] && echo "MARK wg show: listen-port 51820"
# /metrics: the kernel device's packets from its link counters (a full
# pass after the pings), no handshake or drop rows for it.
metric() { $IP netns exec n$1 wget -qO- http://127.0.0.1:10244/metrics | awk -v m="$2" '$1 == m {print $2}'; }
counted() { [ "$(metric 1 'flanneld_wireguard_packets_total{device="flannel-wg",direction="tx"}')" -gt 0 ]; }
until_true counted && echo "MARK metrics: kernel flannel-wg packets counted"
$IP netns exec n1 wget -qO- http://127.0.0.1:10244/metrics | grep -q 'wireguard_dropped_total{' ||
  echo "MARK metrics: no drop rows for a kernel device"
K2=$(wgx 1 pubkey < /tmp/n2/wgkey)
wgx 1 set flannel-wg peer $K2 remove
present() { [ -n "$(peer 1 2)" ]; }
until_true present && echo "MARK removed peer put back"
wgx 1 set flannel-wg peer $K2 allowed-ips 10.99.0.0/16
back() { [ "$(peer 1 2)" = "172.16.1.12 $N2 25" ]; }
until_true back && echo "MARK allowed-ips put back"
wgx 1 set flannel-wg peer $K2 endpoint 172.16.1.99:51820
until_true back && echo "MARK endpoint put back"
$IP -n n1 link del flannel-wg
until_true kind 1 "wireguard" && until_true back && pings 1 $A2 && echo "MARK deleted device put back"

stop 2; start 2 kernel
kind 2 "wireguard" && echo "MARK n2 tun replaced by kernel wireguard"
pings 1 $A2 && pings 2 $A1 && echo "MARK ping kernel to kernel"
# A restart finds the device as it wants it: no write, the session stays.
H=$(wgx 2 show flannel-wg latest-handshakes)
stop 2; start 2 kernel
since_start() { awk '/^=== /{buf=""} {buf=buf $0 "\n"} END{printf "%s", buf}' /tmp/n$1/log; }
sleep 3
since_start 2 | grep -q "wg set flannel-wg\|added flannel-wg\|private-key" ||
  echo "MARK kernel restart writes nothing"
[ "$(wgx 2 show flannel-wg latest-handshakes)" = "$H" ] && pings 1 $A2 && echo "MARK kernel restart keeps the session"

stop 1; start 1 userspace
kind 1 "tun type tun" && echo "MARK n1 kernel device replaced by a tun device"
pings 1 $A2 && pings 2 $A1 && echo "MARK ping userspace to kernel after the switch"

# Dual stack on fresh stores, kernel devices on both nodes: Mode separate
# (flannel-wg-v6 on ListenPortV6), then Mode auto (one flannel-wg).
stop 1; stop 2
for i in 1 2; do $IP -n n$i addr add fd00:16::1$i/64 dev e$i nodad; done
D='"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"wireguard"'
echo "{$D}}" > /tmp/dual.json
echo "{$D,\"Mode\":\"auto\"}}" > /tmp/dualauto.json
echo "{$D,\"Mode\":\"ipv6\",\"ListenPortV6\":51820}}" > /tmp/dualipv6.json
subnets() {
  S2=$(grep FLANNEL_SUBNET /tmp/n2/subnet.env | cut -d= -f2); A2=${S2%.1/24}.0
  V2=$(grep FLANNEL_IPV6_SUBNET /tmp/n2/subnet.env | cut -d= -f2); B2=${V2%1/64}
}
STORE=/tmp/store6; mkdir -p $STORE; start 1 dual; start 2 dual; subnets
$IP -n n1 -d link show flannel-wg-v6 | grep -q wireguard && echo "MARK separate: flannel-wg-v6 is kernel wireguard"
[ "$(wgx 1 show flannel-wg-v6 listen-port)" = "51821" ] && echo "MARK separate: flannel-wg-v6 listen-port 51821"
wgx 1 show flannel-wg-v6 endpoints | grep -q "\[fd00:16::12\]:51821" && echo "MARK separate: IPv6 endpoint of the lease"
pings6 1 $B2 && pings 1 $A2 && echo "MARK separate: ping6 and ping"
stop 1; stop 2
STORE=/tmp/store7; mkdir -p $STORE; start 1 dualauto; start 2 dualauto; subnets
$IP -n n1 link show flannel-wg-v6 > /dev/null 2>&1 || echo "MARK auto: flannel-wg-v6 removed"
wgx 1 show flannel-wg allowed-ips | grep "${A2%.0}.0/24" | grep -q "${B2}/64" && echo "MARK auto: one peer with both subnets"
pings6 1 $B2 && pings 1 $A2 && echo "MARK auto: ping6 and ping over one flannel-wg"
stop 1; stop 2
STORE=/tmp/store8; mkdir -p $STORE; start 1 dualipv6; start 2 dualipv6; subnets
wgx 1 show flannel-wg endpoints | grep -q "\[fd00:16::12\]:51820" && echo "MARK ipv6: the IPv6 endpoint"
pings6 1 $B2 && pings 1 $A2 && echo "MARK ipv6: both families over IPv6 endpoints"
stop 2; STORE=

stop 1
$IP -n n1 link add flannel-wg-v6 type wireguard && echo "MARK upstream flannel-wg-v6 created"
start 1 vxlan
$IP -n n1 link show flannel.1 > /dev/null && echo "MARK flannel.1 up with vxlan"
$IP -n n1 link show flannel-wg > /dev/null 2>&1 || echo "MARK flannel-wg removed"
$IP -n n1 link show flannel-wg-v6 > /dev/null 2>&1 || echo "MARK flannel-wg-v6 removed"
# Port taken by another WireGuard tunnel of the host: the error names the
# field, and each pass retries.
stop 1
$IP -n n1 link del flannel-wg
$IP -n n1 link add wg-other type wireguard
wgx 1 set wg-other listen-port 51820 && $IP -n n1 link set wg-other up
rm -f /tmp/n1/subnet.env; echo "=== kernel, port taken" >> /tmp/n1/log
WIREGUARD_KEY_FILE=/tmp/n1/wgkey $IP netns exec n1 /usr/bin/flanneld --local-store /tmp/store \
  --net-config-path /tmp/kernel.json --iface e1 --subnet-file /tmp/n1/subnet.env \
  --iptables-forward-rules=false --resync-interval 2 >> /tmp/n1/log 2>&1 &
echo $! > /tmp/n1/pid
taken() { since_start 1 | grep -c "listen-port 51820 (Backend.ListenPort) is in use" | grep -q "[2-9]"; }
until_true taken && echo "MARK port in use named and retried"
stop 1
for i in 1 2; do echo "LOG$i-BEGIN"; cat /tmp/n$i/log; echo "LOG$i-END"; done
poweroff -f
"#;

#[test]
fn kernel_wireguard_is_driven_repaired_and_interoperates_with_userspace() {
    // scripts/kernel-vm checks for what it needs itself; `wg` is ours.
    let found = Command::new("sh")
        .args(["-c", "command -v wg"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "needs wg (Debian package wireguard-tools; scripts/test installs it)"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = std::env::temp_dir().join(format!("flanneld-it-kvm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let init = dir.join("init");
    std::fs::write(&init, INIT).unwrap();
    let out = Command::new(root.join("scripts/kernel-vm"))
        .arg(&init)
        .arg(env!("CARGO_BIN_EXE_flanneld"))
        .arg("/usr/bin/wg")
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
        "MARK n1 flannel-wg is kernel wireguard",
        "MARK n2 flannel-wg is a tun device",
        "MARK ping kernel to userspace",
        "MARK ping userspace to kernel",
        "MARK wg show: the peer of the lease",
        "MARK wg show: our private key",
        "MARK wg show: listen-port 51820",
        "MARK metrics: kernel flannel-wg packets counted",
        "MARK metrics: no drop rows for a kernel device",
        "MARK removed peer put back",
        "MARK allowed-ips put back",
        "MARK endpoint put back",
        "MARK deleted device put back",
        "MARK n2 tun replaced by kernel wireguard",
        "MARK ping kernel to kernel",
        "MARK kernel restart writes nothing",
        "MARK kernel restart keeps the session",
        "MARK n1 kernel device replaced by a tun device",
        "MARK ping userspace to kernel after the switch",
        "MARK separate: flannel-wg-v6 is kernel wireguard",
        "MARK separate: flannel-wg-v6 listen-port 51821",
        "MARK separate: IPv6 endpoint of the lease",
        "MARK separate: ping6 and ping",
        "MARK auto: flannel-wg-v6 removed",
        "MARK auto: one peer with both subnets",
        "MARK auto: ping6 and ping over one flannel-wg",
        "MARK ipv6: the IPv6 endpoint",
        "MARK ipv6: both families over IPv6 endpoints",
        "MARK upstream flannel-wg-v6 created",
        "MARK flannel.1 up with vxlan",
        "MARK flannel-wg removed",
        "MARK flannel-wg-v6 removed",
        "MARK port in use named and retried",
    ] {
        assert!(console.contains(mark), "missing {mark:?}\n{}", show());
    }
    let log = |n: u8| {
        console
            .split(&format!("LOG{n}-BEGIN"))
            .nth(1)
            .and_then(|l| l.split(&format!("LOG{n}-END")).next())
            .unwrap_or_default()
            .to_string()
    };
    let (log1, log2) = (log(1), log(2));
    assert!(
        log1.contains(
            "the kernel has WireGuard (link type wireguard): using kernel WireGuard devices"
        ),
        "the probe: {log1}"
    );
    assert!(
        log2.contains(r#"Backend.Datapath "userspace": using the userspace WireGuard datapath"#),
        "the knob: {log2}"
    );
    // One flanneld wrote the peer at start and again after each of the
    // four hand-made changes: the repairs are the reconciler's.
    let first = log1.split("=== userspace").next().unwrap_or_default();
    assert!(
        first
            .matches("wg set flannel-wg: 1 peers written, 0 removed")
            .count()
            >= 5,
        "peer writes: {first}"
    );
    assert!(
        log2.contains(
            "deleted flannel-wg (kind tun) to put a kernel wireguard device in its place"
        ),
        "TUN replaced: {log2}"
    );
    assert!(
        log1.contains(
            "deleted flannel-wg (kernel wireguard) to put the userspace datapath in its place"
        ),
        "kernel device replaced: {log1}"
    );
    // Sessions stay: a settled full pass writes nothing.
    assert!(
        first.matches("wireguard peers updated device").count() <= 6,
        "peer set churn: {first}"
    );
}
