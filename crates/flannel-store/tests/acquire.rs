//! Lease acquisition against the local store: races between many daemons,
//! exhaustion, upstream's acquisition order, renewal.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, SystemTime};

use common::{attrs, attrs_ip, key, net_config, runtime, TempDir};
use flannel_core::config::NetConfig;
use flannel_core::lease::{Lease, LeaseKey};
use flannel_store::{
    acquire_lease, renew_at, renew_lease, AcquireError, LocalStore, Store, StoreError,
};

const TTL: Duration = Duration::from_secs(30);

/// Starts `n` acquirers (threads, each with its own runtime and its own
/// `LocalStore` on `dir`, like separate daemons) at the same instant.
fn race(dir: &std::path::Path, cfg: &NetConfig, n: usize) -> Vec<Result<Lease, AcquireError>> {
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let barrier = Arc::clone(&barrier);
            let dir = dir.to_path_buf();
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let store = LocalStore::open(&dir).unwrap();
                let a = attrs_ip(Ipv4Addr::new(172, 16, 1, i as u8 + 1));
                barrier.wait();
                runtime().block_on(acquire_lease(&store, &cfg, &a, None, TTL))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn twenty_simultaneous_acquirers_get_distinct_subnets() {
    let dir = TempDir::new("race20");
    let cfg = net_config("10.244.0.0/16", 24);
    let results = race(dir.path(), &cfg, 20);
    let leases: Vec<Lease> = results.into_iter().map(|r| r.unwrap()).collect();
    let keys: BTreeSet<LeaseKey> = leases.iter().map(|l| l.key).collect();
    assert_eq!(keys.len(), 20, "duplicate subnets handed out: {leases:?}");

    // The store agrees: 20 leases, each held by the node that got it.
    let stored = runtime()
        .block_on(LocalStore::open(dir.path()).unwrap().list_leases())
        .unwrap()
        .leases;
    assert_eq!(stored.len(), 20);
    for l in &leases {
        assert!(stored.contains(l), "{l:?} missing from the store");
        let net = l.key.ipv4.unwrap();
        assert!(net.addr() >= cfg.subnet_min && net.addr() <= cfg.subnet_max);
        assert_eq!(net.prefix_len(), 24);
    }
}

#[test]
fn more_acquirers_than_subnets_exhaust_cleanly() {
    let dir = TempDir::new("exhaust");
    let cfg = net_config("10.10.0.0/28", 30);
    let available = ((u32::from(cfg.subnet_max) - u32::from(cfg.subnet_min)) >> 2) + 1;
    assert!(
        available >= 2,
        "test needs a few subnets, config gives {available}"
    );
    let n = available as usize + 5;
    let results = race(dir.path(), &cfg, n);
    let mut won = Vec::new();
    let mut exhausted = 0;
    for r in results {
        match r {
            Ok(l) => won.push(l.key),
            Err(AcquireError::Plan(e)) => {
                let msg = AcquireError::Plan(e).to_string();
                for name in ["Network", "10.10.0.0/28", "SubnetMin", "SubnetMax"] {
                    assert!(msg.contains(name), "error lacks {name}: {msg}");
                }
                exhausted += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    let distinct: BTreeSet<_> = won.iter().collect();
    assert_eq!(
        won.len(),
        available as usize,
        "exactly the available subnets are handed out"
    );
    assert_eq!(distinct.len(), won.len(), "no duplicates: {won:?}");
    assert_eq!(exhausted, n - available as usize);
}

#[tokio::test]
async fn own_public_ip_lease_comes_first() {
    let dir = TempDir::new("order-own");
    let store = LocalStore::open(dir.path()).unwrap();
    let cfg = net_config("10.244.0.0/16", 24);
    let mine = store
        .create_lease(
            &Lease {
                key: key("10.244.9.0-24"),
                attrs: attrs(1),
                expiration: None,
            },
            Some(TTL),
        )
        .await
        .unwrap()
        .unwrap();
    let got = acquire_lease(&store, &cfg, &attrs(1), Some(key("10.244.20.0-24")), TTL)
        .await
        .unwrap();
    assert_eq!(got.key, mine.key, "own lease beats the previous subnet");
    assert!(got.expiration.is_some());
    assert_eq!(store.list_leases().await.unwrap().leases.len(), 1);
}

#[tokio::test]
async fn own_reservation_is_reused_and_stays_a_reservation() {
    let dir = TempDir::new("order-res");
    let store = LocalStore::open(dir.path()).unwrap();
    let cfg = net_config("10.244.0.0/16", 24);
    store
        .create_lease(
            &Lease {
                key: key("10.244.42.0-24"),
                attrs: attrs(42),
                expiration: None,
            },
            None,
        )
        .await
        .unwrap()
        .unwrap();
    let mut newer = attrs(42);
    newer.backend_data = Some(flannel_core::lease::BackendData::new(
        &serde_json::json!({"VNI": 1, "VtepMAC": "02:42:42:42:42:42"}),
    ));
    let got = acquire_lease(&store, &cfg, &newer, None, TTL)
        .await
        .unwrap();
    assert_eq!(got.key, key("10.244.42.0-24"));
    assert_eq!(got.expiration, None, "a reservation stays a reservation");
    assert_eq!(got.attrs, newer, "our current attributes are published");
    assert_eq!(renew_at(&got, Duration::from_secs(3600)), None);

    // Others never get the reserved subnet, even as their previous one.
    let other = acquire_lease(&store, &cfg, &attrs(43), Some(key("10.244.42.0-24")), TTL)
        .await
        .unwrap();
    assert_ne!(other.key, key("10.244.42.0-24"));
}

#[tokio::test]
async fn previous_subnet_comes_second() {
    let dir = TempDir::new("order-prev");
    let store = LocalStore::open(dir.path()).unwrap();
    let cfg = net_config("10.244.0.0/16", 24);
    // Someone else's lease does not count as ours.
    store
        .create_lease(
            &Lease {
                key: key("10.244.9.0-24"),
                attrs: attrs(9),
                expiration: None,
            },
            Some(TTL),
        )
        .await
        .unwrap()
        .unwrap();
    let got = acquire_lease(&store, &cfg, &attrs(1), Some(key("10.244.20.0-24")), TTL)
        .await
        .unwrap();
    assert_eq!(got.key, key("10.244.20.0-24"));
}

#[tokio::test]
async fn taken_previous_subnet_falls_back_to_random() {
    let cfg = net_config("10.244.0.0/16", 24);
    let mut picked = BTreeSet::new();
    for i in 0..12 {
        let dir = TempDir::new("order-random");
        let store = LocalStore::open(dir.path()).unwrap();
        store
            .create_lease(
                &Lease {
                    key: key("10.244.20.0-24"),
                    attrs: attrs(9),
                    expiration: None,
                },
                Some(TTL),
            )
            .await
            .unwrap()
            .unwrap();
        let got = acquire_lease(&store, &cfg, &attrs(1), Some(key("10.244.20.0-24")), TTL)
            .await
            .unwrap();
        assert_ne!(
            got.key,
            key("10.244.20.0-24"),
            "run {i}: took someone else's subnet"
        );
        picked.insert(got.key);
    }
    // 12 draws among 254 subnets: all equal would mean the choice is not random.
    assert!(picked.len() > 1, "always the same subnet: {picked:?}");
}

#[tokio::test]
async fn lease_without_public_ip_is_refused() {
    let dir = TempDir::new("noip");
    let store = LocalStore::open(dir.path()).unwrap();
    let cfg = net_config("10.244.0.0/16", 24);
    let mut a = attrs(1);
    a.public_ip = None;
    let err = acquire_lease(&store, &cfg, &a, None, TTL)
        .await
        .unwrap_err();
    assert!(matches!(err, AcquireError::NoPublicIp), "{err}");
}

#[test]
fn renew_at_is_expiry_minus_margin() {
    let exp = SystemTime::UNIX_EPOCH + Duration::from_secs(100_000);
    let l = Lease {
        key: key("10.244.1.0-24"),
        attrs: attrs(1),
        expiration: Some(exp),
    };
    assert_eq!(
        renew_at(&l, Duration::from_secs(3600)),
        Some(exp - Duration::from_secs(3600))
    );
    // A margin beyond the remaining lifetime means renew right away.
    assert!(renew_at(&l, Duration::from_secs(200_000)).unwrap() <= SystemTime::now());
    let res = Lease {
        expiration: None,
        ..l
    };
    assert_eq!(renew_at(&res, Duration::from_secs(60)), None);
}

#[tokio::test]
async fn renew_extends_and_reports_revocation() {
    let dir = TempDir::new("renew");
    let store = LocalStore::open(dir.path()).unwrap();
    let cfg = net_config("10.244.0.0/16", 24);
    let l = acquire_lease(&store, &cfg, &attrs(1), None, Duration::from_secs(2))
        .await
        .unwrap();
    let renewed = renew_lease(&store, &l, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(renewed.expiration.unwrap() > l.expiration.unwrap() + Duration::from_secs(50));
    assert_eq!(
        store.list_leases().await.unwrap().leases,
        vec![renewed.clone()]
    );

    store.delete_lease(&l.key).await.unwrap();
    let err = renew_lease(&store, &renewed, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn own_lease_of_an_old_config_is_deleted_before_acquiring() {
    let dir = TempDir::new("stale");
    let store = LocalStore::open(dir.path()).unwrap();
    store
        .create_lease(
            &Lease {
                key: key("10.244.9.0-24"),
                attrs: attrs(1),
                expiration: None,
            },
            Some(TTL),
        )
        .await
        .unwrap()
        .unwrap();
    // SubnetLen changed from 24 to 25.
    let cfg = net_config("10.244.0.0/16", 25);
    let got = acquire_lease(&store, &cfg, &attrs(1), None, TTL)
        .await
        .unwrap();
    assert_eq!(got.key.ipv4.unwrap().prefix_len(), 25);
    let left = store.list_leases().await.unwrap().leases;
    assert_eq!(left, vec![got], "the /24 of the old config is gone");
}

#[test]
fn dual_stack_racers_never_share_either_family() {
    let dir = TempDir::new("race-dual");
    let cfg = flannel_core::config::parse(
        r#"{"Network":"10.244.0.0/20","SubnetLen":24,"EnableIPv6":true,
            "IPv6Network":"fd00:10:244::/60","IPv6SubnetLen":64,"Backend":{"Type":"vxlan"}}"#,
    )
    .unwrap();
    // 15 subnets per family (the first is skipped): 12 racers often collide.
    let results = race(dir.path(), &cfg, 12);
    let leases: Vec<Lease> = results.into_iter().map(|r| r.unwrap()).collect();
    let v4: BTreeSet<_> = leases.iter().map(|l| l.key.ipv4.unwrap()).collect();
    let v6: BTreeSet<_> = leases.iter().map(|l| l.key.ipv6.unwrap()).collect();
    assert_eq!(v4.len(), 12, "IPv4 subnet handed out twice: {leases:?}");
    assert_eq!(v6.len(), 12, "IPv6 subnet handed out twice: {leases:?}");
}

const RACE_DIR_ENV: &str = "FLANNEL_STORE_TEST_RACE_DIR";
const RACE_START_ENV: &str = "FLANNEL_STORE_TEST_RACE_START_MS";
const RACE_NODE_ENV: &str = "FLANNEL_STORE_TEST_RACE_NODE";

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// One daemon of `separate_processes_never_share_a_subnet`, run in a child
/// process of this test binary.
#[test]
#[ignore = "helper run in child processes by separate_processes_never_share_a_subnet"]
fn race_child_process() {
    let dir =
        std::env::var(RACE_DIR_ENV).expect("spawned by separate_processes_never_share_a_subnet");
    let start: u64 = std::env::var(RACE_START_ENV).unwrap().parse().unwrap();
    let node: u8 = std::env::var(RACE_NODE_ENV).unwrap().parse().unwrap();
    let cfg = net_config("10.10.0.0/24", 28);
    let store = LocalStore::open(&dir).unwrap();
    std::thread::sleep(Duration::from_millis(start.saturating_sub(unix_ms())));
    let lease = runtime()
        .block_on(acquire_lease(&store, &cfg, &attrs(node), None, TTL))
        .unwrap();
    println!("ACQUIRED {}", lease.key);
}

/// Kills (by pid) the children not yet reaped, also when the test panics.
struct Children(Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn separate_processes_never_share_a_subnet() {
    let dir = TempDir::new("race-procs");
    let exe = std::env::current_exe().unwrap();
    let start = unix_ms() + 2000;
    let n = 12u8;
    let mut children = Children(Vec::new());
    for node in 1..=n {
        let child = std::process::Command::new(&exe)
            .args(["--ignored", "--exact", "race_child_process", "--nocapture"])
            .env(RACE_DIR_ENV, dir.path())
            .env(RACE_START_ENV, start.to_string())
            .env(RACE_NODE_ENV, node.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        children.0.push(child);
    }
    let mut keys = Vec::new();
    for child in std::mem::take(&mut children.0) {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let key = stdout
            .lines()
            .find_map(|l| l.strip_prefix("ACQUIRED "))
            .unwrap_or_else(|| panic!("child printed no lease: {stdout}"))
            .to_string();
        keys.push(key);
    }
    let distinct: BTreeSet<&String> = keys.iter().collect();
    assert_eq!(
        distinct.len(),
        keys.len(),
        "a subnet went to two processes: {keys:?}"
    );
    let stored = runtime()
        .block_on(LocalStore::open(dir.path()).unwrap().list_leases())
        .unwrap()
        .leases;
    assert_eq!(stored.len(), n as usize);
}

#[tokio::test]
async fn node_whose_ipv6_address_changed_keeps_its_lease() {
    let dir = TempDir::new("v6-changed");
    let store = LocalStore::open(dir.path()).unwrap();
    let cfg = net_config("10.244.0.0/16", 24);
    let mut before = attrs(1);
    before.public_ipv6 = Some("fd00::1".parse().unwrap());
    let first = acquire_lease(&store, &cfg, &before, None, TTL)
        .await
        .unwrap();
    let mut after = attrs(1);
    after.public_ipv6 = Some("fd00::2".parse().unwrap());
    let second = acquire_lease(&store, &cfg, &after, None, TTL)
        .await
        .unwrap();
    assert_eq!(second.key, first.key);
    assert_eq!(second.attrs, after);
    assert_eq!(store.list_leases().await.unwrap().leases, vec![second]);
}
