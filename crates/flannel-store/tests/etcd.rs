//! The etcd v3 store against real etcd servers: every test starts its own
//! `etcd` on 127.0.0.1 (free ports, temp data dir, killed and removed on drop).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use common::{attrs, key, net_config};
use etcd_client::{Client, GetOptions, PutOptions};
use flannel_core::lease::{Lease, LeaseAttrs, LeaseEvent, LeaseKey};
use flannel_store::etcd::{missing_config_message, ConnectError, EtcdOptions, EtcdStore};
use flannel_store::testsupport::{EtcdCluster, EtcdServer, ServerTls, TestDir};
use flannel_store::{acquire_lease, renew_lease, AcquireError, Store, StoreError, WatchEvent};
use tokio::sync::mpsc;

const GOLDEN: &str = r#"{"PublicIP":"172.16.1.14","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"26:62:24:f0:61:01"}}"#;
const PREFIX: &str = "/coreos.com/network";
const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest wait for one watch message.
const WAIT: Duration = Duration::from_secs(20);

async fn connect(etcd: &EtcdServer) -> EtcdStore {
    EtcdStore::connect(etcd.store_options())
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", etcd.endpoint()))
}

/// A plain etcd client for raw reads and writes next to the store.
async fn raw(etcd: &EtcdServer) -> Client {
    Client::connect([etcd.endpoint()], None)
        .await
        .expect("raw etcd client")
}

fn subnet_key(k: &str) -> String {
    format!("{PREFIX}/subnets/{k}")
}

async fn raw_get(c: &mut Client, k: &str) -> Option<etcd_client::KeyValue> {
    c.get(k, None)
        .await
        .expect("raw get")
        .kvs()
        .first()
        .cloned()
}

async fn ttl_of(c: &mut Client, lease: i64) -> i64 {
    c.lease_time_to_live(lease, None)
        .await
        .expect("timetolive")
        .ttl()
}

fn golden_attrs() -> LeaseAttrs {
    LeaseAttrs::from_json(GOLDEN).unwrap()
}

fn lease(k: &str, a: LeaseAttrs) -> Lease {
    Lease {
        key: key(k),
        attrs: a,
        expiration: None,
    }
}

fn assert_expires_in(l: &Lease, ttl: Duration) {
    let exp = l.expiration.expect("lease has an expiration");
    let left = exp
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    assert!(
        left <= ttl + Duration::from_secs(1) && left + Duration::from_secs(3) >= ttl,
        "expires in {left:?}, expected about {ttl:?}"
    );
}

async fn next(rx: &mut mpsc::Receiver<WatchEvent>) -> WatchEvent {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("watch message within the time limit")
        .expect("watch channel open")
}

/// What a watcher knows: snapshots replace it, events change it.
#[derive(Default)]
struct View {
    leases: BTreeMap<LeaseKey, Lease>,
    snapshots: usize,
}

impl View {
    fn apply(&mut self, ev: WatchEvent) {
        match ev {
            WatchEvent::Snapshot(s) => {
                self.snapshots += 1;
                self.leases = s.leases.into_iter().map(|l| (l.key, l)).collect();
            }
            WatchEvent::Events { events, .. } => {
                for e in events {
                    match e {
                        LeaseEvent::Upsert(l) => {
                            self.leases.insert(l.key, l);
                        }
                        LeaseEvent::Removed(k) => {
                            self.leases.remove(&k);
                        }
                    }
                }
            }
        }
    }

    /// Applies messages until `done` holds.
    async fn until(
        &mut self,
        rx: &mut mpsc::Receiver<WatchEvent>,
        what: &str,
        done: impl Fn(&View) -> bool,
    ) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(ev)) => self.apply(ev),
                Ok(None) => panic!("watch channel closed while waiting for {what}"),
                Err(_) => panic!(
                    "timed out waiting for {what}; view: {} leases ({:?}...), {} snapshots",
                    self.leases.len(),
                    self.leases.keys().take(5).collect::<Vec<_>>(),
                    self.snapshots
                ),
            }
        }
    }

    fn keys(&self) -> BTreeSet<LeaseKey> {
        self.leases.keys().copied().collect()
    }
}

#[tokio::test]
async fn layout_json_and_ttl_match_upstream() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let mut c = raw(&etcd).await;

    // Config: absent is Ok(None) with a v3 hint; present is returned verbatim.
    assert_eq!(store.get_network_config().await.unwrap(), None);
    assert!(missing_config_message(store.prefix()).contains("/coreos.com/network/config"));
    let conf = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
    c.put(format!("{PREFIX}/config"), conf, None).await.unwrap();
    assert_eq!(
        store.get_network_config().await.unwrap().as_deref(),
        Some(conf)
    );

    // A lease: exact key and bytes, attached to an etcd lease with the TTL.
    let created = store
        .create_lease(&lease("10.244.1.0-24", golden_attrs()), Some(DAY))
        .await
        .unwrap()
        .expect("key was free");
    assert_expires_in(&created, DAY);
    let kv = raw_get(&mut c, &subnet_key("10.244.1.0-24"))
        .await
        .expect("key written at the upstream path");
    assert_eq!(kv.value(), GOLDEN.as_bytes());
    assert_ne!(kv.lease(), 0, "a lease key carries an etcd lease");
    let ttl = ttl_of(&mut c, kv.lease()).await;
    assert!(
        (DAY.as_secs() as i64 - 5..=DAY.as_secs() as i64).contains(&ttl),
        "TTL {ttl}"
    );

    // Dual stack key form.
    let dual = "10.244.2.0-24&fd00:10:244:2::-64";
    let mut a = attrs(2);
    a.public_ipv6 = Some("fd00::2".parse().unwrap());
    store
        .create_lease(&lease(dual, a.clone()), Some(DAY))
        .await
        .unwrap()
        .expect("dual key free");
    let kv = raw_get(&mut c, &subnet_key(dual)).await.expect("dual key");
    assert_eq!(kv.value(), a.to_json().as_bytes());

    // The same key again, or one overlapping it in either family: taken.
    assert_eq!(
        store
            .create_lease(&lease("10.244.1.0-24", attrs(3)), Some(DAY))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .create_lease(
                &lease("10.244.2.0-24&fd00:10:244:99::-64", attrs(3)),
                Some(DAY)
            )
            .await
            .unwrap(),
        None
    );
    let kv = raw_get(&mut c, &subnet_key("10.244.1.0-24")).await.unwrap();
    assert_eq!(
        kv.value(),
        GOLDEN.as_bytes(),
        "a lost create changes nothing"
    );

    // Reading back: attributes, expiration from the remaining TTL, revision
    // of the read.
    let snap = store.list_leases().await.unwrap();
    let rev = c
        .get(
            format!("{PREFIX}/subnets/"),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert_eq!(snap.revision, rev as u64);
    assert_eq!(snap.leases.len(), 2);
    let l = snap
        .leases
        .iter()
        .find(|l| l.key == key("10.244.1.0-24"))
        .unwrap();
    assert_eq!(l.attrs, golden_attrs());
    assert_expires_in(l, DAY);

    // A lease written by upstream flannel (raw put with its own etcd lease)
    // reads the same way.
    let grant = c.lease_grant(600, None).await.unwrap();
    let upstream = r#"{"PublicIP":"172.16.1.15","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"26:62:24:f0:61:02"}}"#;
    c.put(
        subnet_key("10.244.3.0-24"),
        upstream,
        Some(PutOptions::new().with_lease(grant.id())),
    )
    .await
    .unwrap();
    let snap = store.list_leases().await.unwrap();
    let l = snap
        .leases
        .iter()
        .find(|l| l.key == key("10.244.3.0-24"))
        .unwrap();
    assert_eq!(l.attrs.to_json(), upstream);
    assert_expires_in(l, Duration::from_secs(600));

    // Upstream's udp lease (no BackendType) and host-gw lease (no
    // BackendData, or null) read as udp and host-gw.
    for (k, value, backend) in [
        (
            "10.244.4.0-24",
            r#"{"PublicIP":"172.16.1.16","PublicIPv6":null}"#,
            "udp",
        ),
        (
            "10.244.5.0-24",
            r#"{"PublicIP":"172.16.1.17","PublicIPv6":null,"BackendType":"host-gw"}"#,
            "host-gw",
        ),
        (
            "10.244.6.0-24",
            r#"{"PublicIP":"172.16.1.18","PublicIPv6":null,"BackendType":"host-gw","BackendData":null}"#,
            "host-gw",
        ),
    ] {
        c.put(
            subnet_key(k),
            value,
            Some(PutOptions::new().with_lease(grant.id())),
        )
        .await
        .unwrap();
        let snap = store.list_leases().await.unwrap();
        let l = snap.leases.iter().find(|l| l.key == key(k)).unwrap();
        assert_eq!(l.attrs.effective_backend_type(), backend, "{value}");
        assert_eq!(l.attrs.backend_data, None, "{value}");
    }
    // Ours for udp is upstream's value, byte for byte.
    let ours = LeaseAttrs::new_udp("172.16.1.19".parse().unwrap());
    store
        .create_lease(&lease("10.244.7.0-24", ours), Some(DAY))
        .await
        .unwrap()
        .expect("free");
    let kv = raw_get(&mut c, &subnet_key("10.244.7.0-24")).await.unwrap();
    assert_eq!(
        kv.value(),
        br#"{"PublicIP":"172.16.1.19","PublicIPv6":null}"#
    );

    // Delete, and delete again (absent is success).
    store.delete_lease(&key("10.244.1.0-24")).await.unwrap();
    store.delete_lease(&key("10.244.1.0-24")).await.unwrap();
    assert!(raw_get(&mut c, &subnet_key("10.244.1.0-24"))
        .await
        .is_none());
}

#[tokio::test]
async fn reservation_is_kept_and_never_reallocated() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let mut c = raw(&etcd).await;
    // 10.5.0.0/22 in /24s: SubnetMin skips 10.5.0.0, so 10.5.1-3 are leasable.
    let cfg = net_config("10.5.0.0/22", 24);
    // An operator's reservation for node 9: a key without an etcd lease.
    c.put(subnet_key("10.5.1.0-24"), attrs(9).to_json(), None)
        .await
        .unwrap();

    let a = acquire_lease(&store, &cfg, &attrs(1), None, DAY)
        .await
        .unwrap();
    let b = acquire_lease(&store, &cfg, &attrs(2), None, DAY)
        .await
        .unwrap();
    let mut got: Vec<_> = [a.key, b.key].into_iter().collect();
    got.sort();
    assert_eq!(got, vec![key("10.5.2.0-24"), key("10.5.3.0-24")]);
    match acquire_lease(&store, &cfg, &attrs(3), None, DAY).await {
        Err(AcquireError::Plan(_)) => {}
        other => panic!("the reserved subnet must not be handed out: {other:?}"),
    }
    // Node 9 gets its reservation, and it stays a reservation (no etcd lease).
    let r = acquire_lease(&store, &cfg, &attrs(9), None, DAY)
        .await
        .unwrap();
    assert_eq!(r.key, key("10.5.1.0-24"));
    assert_eq!(r.expiration, None);
    let kv = raw_get(&mut c, &subnet_key("10.5.1.0-24")).await.unwrap();
    assert_eq!(kv.lease(), 0);
    assert_eq!(kv.value(), attrs(9).to_json().as_bytes());
    let listed = store.list_leases().await.unwrap();
    let res = listed.leases.iter().find(|l| l.key == r.key).unwrap();
    assert!(res.is_reservation());
}

#[tokio::test]
async fn acquisition_order_own_then_previous_then_random() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let mut c = raw(&etcd).await;
    let cfg = net_config("10.244.0.0/16", 24);

    // (1) Our own lease comes back, on the same etcd lease (kept alive).
    let first = acquire_lease(&store, &cfg, &attrs(1), None, DAY)
        .await
        .unwrap();
    let id = raw_get(&mut c, &subnet_key(&first.key.to_string()))
        .await
        .unwrap()
        .lease();
    let again = acquire_lease(&store, &cfg, &attrs(1), None, DAY)
        .await
        .unwrap();
    assert_eq!(again.key, first.key);
    let kv = raw_get(&mut c, &subnet_key(&first.key.to_string()))
        .await
        .unwrap();
    assert_eq!(kv.lease(), id, "reuse keeps the etcd lease");

    // (2) The previous subnet when free.
    let prev = key("10.244.77.0-24");
    let second = acquire_lease(&store, &cfg, &attrs(2), Some(prev), DAY)
        .await
        .unwrap();
    assert_eq!(second.key, prev);

    // (3) Otherwise a free one: not the taken previous subnet.
    let third = acquire_lease(&store, &cfg, &attrs(3), Some(prev), DAY)
        .await
        .unwrap();
    assert_ne!(third.key, prev);
    assert_ne!(third.key, first.key);
    assert!(cfg.network.unwrap().contains(&third.key.ipv4.unwrap()));

    // Another node may not update our lease.
    let stolen = Lease {
        key: first.key,
        attrs: attrs(4),
        expiration: None,
    };
    match store.update_lease(&stolen, Some(DAY)).await {
        Err(StoreError::Conflict { key, .. }) => assert!(key.contains("10.244.")),
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_acquirers_at_once_get_distinct_subnets() {
    let etcd = EtcdServer::start();
    let cfg = net_config("10.244.0.0/16", 24);
    let mut tasks = Vec::new();
    for n in 1..=20u8 {
        // Each acquirer is its own node with its own connection.
        let opts = etcd.store_options();
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let store = EtcdStore::connect(opts).await.expect("connect");
            acquire_lease(&store, &cfg, &attrs(n), None, DAY).await
        }));
    }
    let mut keys = BTreeSet::new();
    for t in tasks {
        let l = t.await.unwrap().expect("every node gets a lease");
        assert!(keys.insert(l.key), "subnet {} handed out twice", l.key);
    }
    assert_eq!(keys.len(), 20);
    let store = connect(&etcd).await;
    let listed: BTreeSet<_> = store
        .list_leases()
        .await
        .unwrap()
        .leases
        .into_iter()
        .map(|l| l.key)
        .collect();
    assert_eq!(listed, keys);
}

#[tokio::test]
async fn renewal_keeps_the_etcd_lease_and_expiry_is_removed() {
    let etcd = EtcdServer::start();
    let mut opts = etcd.store_options();
    // Shorter than the idle watch below: a request timeout must not cut a watch.
    opts.request_timeout = Duration::from_secs(1);
    let store = EtcdStore::connect(opts).await.unwrap();
    let mut c = raw(&etcd).await;
    let ttl = Duration::from_secs(2);

    let mut rx = store.watch_leases().await.unwrap();
    let mut view = View::default();
    view.apply(next(&mut rx).await);
    assert_eq!(view.snapshots, 1);

    let kept = store
        .create_lease(&lease("10.244.1.0-24", attrs(1)), Some(ttl))
        .await
        .unwrap()
        .unwrap();
    let doomed = store
        .create_lease(&lease("10.244.2.0-24", attrs(2)), Some(ttl))
        .await
        .unwrap()
        .unwrap();
    let id = raw_get(&mut c, &subnet_key("10.244.1.0-24"))
        .await
        .unwrap()
        .lease();
    view.until(&mut rx, "both leases", |v| v.leases.len() == 2)
        .await;
    assert_expires_in(&view.leases[&kept.key], ttl);

    // Renew every 700 ms, same etcd lease each time, for 4 s (twice the
    // TTL) and until the lease nobody renews has expired in etcd and reached
    // the watcher as Removed, in events (no resync: the idle stream outlived
    // the request timeout). etcd revokes an expired lease through raft,
    // seconds late on a loaded machine, so the kept one is renewed all
    // along.
    let start = Instant::now();
    let mut renewed = kept.clone();
    while start.elapsed() < Duration::from_secs(4) || view.leases.contains_key(&doomed.key) {
        assert!(
            start.elapsed() < Duration::from_secs(4) + WAIT,
            "timed out waiting for the expiry of the unrenewed lease; view: {:?}",
            view.keys()
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
        renewed = renew_lease(&store, &renewed, ttl).await.unwrap();
        assert_expires_in(&renewed, ttl);
        let kv = raw_get(&mut c, &subnet_key("10.244.1.0-24"))
            .await
            .expect("renewed key still there");
        assert_eq!(kv.lease(), id, "renewal must not grant a new etcd lease");
        while let Ok(ev) = rx.try_recv() {
            view.apply(ev);
        }
    }
    assert_eq!(view.snapshots, 1, "no resync expected");
    assert!(view.leases.contains_key(&kept.key));
    assert!(raw_get(&mut c, &subnet_key("10.244.2.0-24"))
        .await
        .is_none());

    // Renewing a lease that is gone reports NotFound (upstream: "revoked").
    match renew_lease(&store, &doomed, ttl).await {
        Err(StoreError::NotFound { .. }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }

    // Revoked under us: etcd deletes the key with its lease; renewal then
    // reports NotFound (the daemon exits as upstream does).
    c.lease_revoke(id).await.unwrap();
    view.until(&mut rx, "removal after revoke", |v| {
        !v.leases.contains_key(&kept.key)
    })
    .await;
    match renew_lease(&store, &renewed, ttl).await {
        Err(StoreError::NotFound { .. }) => {}
        other => panic!("expected NotFound after revoke, got {other:?}"),
    }
}

#[tokio::test]
async fn update_reattaches_when_the_etcd_lease_is_gone() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let mut c = raw(&etcd).await;
    // A key of ours whose etcd lease is gone but the key survived: written
    // without a lease (a reservation) and then renewed as a lease.
    c.put(subnet_key("10.244.9.0-24"), attrs(9).to_json(), None)
        .await
        .unwrap();
    let l = store
        .update_lease(&lease("10.244.9.0-24", attrs(9)), Some(DAY))
        .await
        .unwrap();
    assert_expires_in(&l, DAY);
    let id = raw_get(&mut c, &subnet_key("10.244.9.0-24"))
        .await
        .unwrap()
        .lease();
    assert_ne!(id, 0, "a lease was attached");
    // Another TTL than the etcd lease was granted with: a new etcd lease,
    // the old one revoked.
    let l = store
        .update_lease(
            &lease("10.244.9.0-24", attrs(9)),
            Some(Duration::from_secs(600)),
        )
        .await
        .unwrap();
    assert_expires_in(&l, Duration::from_secs(600));
    let id2 = raw_get(&mut c, &subnet_key("10.244.9.0-24"))
        .await
        .unwrap()
        .lease();
    assert_ne!(id2, id);
    assert!(ttl_of(&mut c, id).await <= 0, "old etcd lease revoked");
    // Back to a reservation: no lease attached.
    let l = store
        .update_lease(&lease("10.244.9.0-24", attrs(9)), None)
        .await
        .unwrap();
    assert_eq!(l.expiration, None);
    assert_eq!(
        raw_get(&mut c, &subnet_key("10.244.9.0-24"))
            .await
            .unwrap()
            .lease(),
        0
    );
    // An etcd lease an operator shared with another key is left alone when
    // our key moves to a lease of its own: revoking it would delete that key.
    let shared = c.lease_grant(600, None).await.unwrap().id();
    for k in ["10.244.11.0-24", "10.244.12.0-24"] {
        let n = if k.contains(".11.") { 11 } else { 12 };
        c.put(
            subnet_key(k),
            attrs(n).to_json(),
            Some(PutOptions::new().with_lease(shared)),
        )
        .await
        .unwrap();
    }
    store
        .update_lease(&lease("10.244.11.0-24", attrs(11)), Some(DAY))
        .await
        .unwrap();
    assert_ne!(
        raw_get(&mut c, &subnet_key("10.244.11.0-24"))
            .await
            .unwrap()
            .lease(),
        shared
    );
    assert!(ttl_of(&mut c, shared).await > 0, "shared lease kept");
    assert!(raw_get(&mut c, &subnet_key("10.244.12.0-24"))
        .await
        .is_some());

    // Updating a missing key is NotFound.
    match store
        .update_lease(&lease("10.244.10.0-24", attrs(9)), Some(DAY))
        .await
    {
        Err(StoreError::NotFound { key }) => assert_eq!(key, "10.244.10.0-24"),
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_after_an_etcd_restart() {
    let mut etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    store
        .create_lease(&lease("10.244.1.0-24", attrs(1)), Some(DAY))
        .await
        .unwrap()
        .unwrap();
    let mut rx = store.watch_leases().await.unwrap();
    let mut view = View::default();
    view.apply(next(&mut rx).await);
    assert_eq!(view.keys(), [key("10.244.1.0-24")].into());
    // Make sure the watch stream is established before the restart (an event
    // arrived through it); otherwise the watch could simply start after the
    // restart and no stream would break.
    store
        .create_lease(&lease("10.244.3.0-24", attrs(3)), Some(DAY))
        .await
        .unwrap()
        .unwrap();
    view.until(&mut rx, "the lease created before the restart", |v| {
        v.leases.contains_key(&key("10.244.3.0-24"))
    })
    .await;
    store.delete_lease(&key("10.244.3.0-24")).await.unwrap();
    view.until(&mut rx, "the deletion before the restart", |v| {
        !v.leases.contains_key(&key("10.244.3.0-24"))
    })
    .await;
    assert_eq!(view.snapshots, 1);

    // Stop, write nothing, start again on the same data dir and ports.
    tokio::task::block_in_place(|| {
        etcd.stop();
        etcd.restart();
    });

    // Changes after the restart arrive (the store reconnects by itself).
    let deadline = Instant::now() + WAIT;
    let created = loop {
        match store
            .create_lease(&lease("10.244.2.0-24", attrs(2)), Some(DAY))
            .await
        {
            Ok(r) => break r,
            Err(StoreError::Unavailable(e)) if Instant::now() < deadline => {
                eprintln!("store not reconnected yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("store did not recover after the restart: {e}"),
        }
    };
    assert!(created.is_some());
    view.until(&mut rx, "the lease created after the restart", |v| {
        v.leases.contains_key(&key("10.244.2.0-24"))
    })
    .await;
    store.delete_lease(&key("10.244.1.0-24")).await.unwrap();
    view.until(&mut rx, "the deletion after the restart", |v| {
        !v.leases.contains_key(&key("10.244.1.0-24"))
    })
    .await;
    assert_eq!(view.keys(), [key("10.244.2.0-24")].into());
    assert!(
        view.snapshots >= 2,
        "a broken stream must be followed by a fresh snapshot"
    );
    // The view agrees with a fresh list, attributes included.
    let listed: BTreeMap<_, _> = store
        .list_leases()
        .await
        .unwrap()
        .leases
        .into_iter()
        .map(|l| (l.key, l.attrs))
        .collect();
    let seen: BTreeMap<_, _> = view
        .leases
        .values()
        .map(|l| (l.key, l.attrs.clone()))
        .collect();
    assert_eq!(seen, listed);
}

#[tokio::test]
async fn watch_after_compaction_sends_a_snapshot_then_events() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let mut c = raw(&etcd).await;
    store
        .create_lease(&lease("10.244.1.0-24", attrs(1)), Some(DAY))
        .await
        .unwrap()
        .unwrap();
    // A watcher that saw revision `behind` and then lost its stream...
    let behind = store.list_leases().await.unwrap().revision;
    // ...while others wrote and etcd compacted that history away.
    store
        .create_lease(&lease("10.244.2.0-24", attrs(2)), Some(DAY))
        .await
        .unwrap()
        .unwrap();
    store.delete_lease(&key("10.244.1.0-24")).await.unwrap();
    let now_rev = store.list_leases().await.unwrap().revision;
    c.compact(now_rev as i64, None).await.unwrap();

    let mut rx = store.watch_leases_since(behind);
    // The watch cannot replay the compacted history: a fresh snapshot.
    match next(&mut rx).await {
        WatchEvent::Snapshot(s) => {
            let keys: BTreeSet<_> = s.leases.iter().map(|l| l.key).collect();
            assert_eq!(keys, [key("10.244.2.0-24")].into());
            assert!(s.revision >= now_rev);
        }
        other => panic!("expected a snapshot after compaction, got {other:?}"),
    }
    // Then ordinary events, exactly the changes made after it.
    store
        .create_lease(&lease("10.244.3.0-24", attrs(3)), Some(DAY))
        .await
        .unwrap()
        .unwrap();
    match next(&mut rx).await {
        WatchEvent::Events { events, revision } => {
            assert!(revision > now_rev);
            assert_eq!(events.len(), 1, "{events:?}");
            match &events[0] {
                LeaseEvent::Upsert(l) => {
                    assert_eq!(l.key, key("10.244.3.0-24"));
                    assert_eq!(l.attrs, attrs(3));
                    assert_expires_in(l, DAY);
                }
                other => panic!("expected an upsert, got {other:?}"),
            }
        }
        other => panic!("expected events, got {other:?}"),
    }
    store.delete_lease(&key("10.244.2.0-24")).await.unwrap();
    match next(&mut rx).await {
        WatchEvent::Events { events, .. } => {
            assert_eq!(events, vec![LeaseEvent::Removed(key("10.244.2.0-24"))]);
        }
        other => panic!("expected events, got {other:?}"),
    }

    // Resuming from a revision still in history replays exactly what
    // followed it, with no snapshot.
    let mark = store.list_leases().await.unwrap().revision;
    store.delete_lease(&key("10.244.3.0-24")).await.unwrap();
    let mut rx2 = store.watch_leases_since(mark);
    match next(&mut rx2).await {
        WatchEvent::Events { events, .. } => {
            assert_eq!(events, vec![LeaseEvent::Removed(key("10.244.3.0-24"))]);
        }
        other => panic!("expected the missed event, got {other:?}"),
    }

    // Dropping the store ends its watches.
    drop(store);
    let closed = tokio::time::timeout(WAIT, async { while rx.recv().await.is_some() {} }).await;
    assert!(
        closed.is_ok(),
        "watch channel closes when the store is dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_cluster_survives_losing_one_member() {
    let mut cluster = tokio::task::block_in_place(|| EtcdCluster::start(3));
    let store = EtcdStore::connect(cluster.store_options()).await.unwrap();
    let cfg = net_config("10.244.0.0/16", 24);
    let mine = acquire_lease(&store, &cfg, &attrs(1), None, DAY)
        .await
        .unwrap();
    let mut rx = store.watch_leases().await.unwrap();
    let mut view = View::default();
    view.apply(next(&mut rx).await);

    // Kill every member in turn (restarting the previous one), so whichever
    // the client or the watch was using, and the leader, is lost once.
    for victim in 0..3 {
        tokio::task::block_in_place(|| cluster.members[victim].kill());
        let deadline = Instant::now() + WAIT;
        // Operations may fail while a new leader is elected; then they work.
        let other = loop {
            match acquire_lease(&store, &cfg, &attrs(10 + victim as u8), None, DAY).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("member {victim} down, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("store stopped working with member {victim} down: {e}"),
            }
        };
        renew_lease(&store, &mine, DAY).await.unwrap();
        assert_eq!(store.list_leases().await.unwrap().leases.len(), 2 + victim);
        view.until(&mut rx, "the lease acquired with a member down", |v| {
            v.leases.contains_key(&other.key)
        })
        .await;
        tokio::task::block_in_place(|| cluster.members[victim].restart());
    }
}

/// PEM files of a test CA, a server certificate for 127.0.0.1 and a client
/// certificate (CN `flannel-node`).
struct Pki {
    _dir: TestDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    other_ca: PathBuf,
}

fn pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let dir = TestDir::new("pki");
    let write = |name: &str, pem: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let make_ca = |cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        (cert, Issuer::new(params, key))
    };
    let (ca_cert, issuer) = make_ca("flannel test CA");
    let (other_ca_cert, _) = make_ca("some other CA");
    let leaf = |cn: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (scert, skey) = leaf(
        "etcd",
        vec!["127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (ccert, ckey) = leaf("flannel-node", vec![], ExtendedKeyUsagePurpose::ClientAuth);
    Pki {
        ca: write("ca.pem", ca_cert.pem()),
        server_cert: write("server.pem", scert),
        server_key: write("server-key.pem", skey),
        client_cert: write("client.pem", ccert),
        client_key: write("client-key.pem", ckey),
        other_ca: write("other-ca.pem", other_ca_cert.pem()),
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificates_and_password_auth() {
    let pki = pki();
    let etcd = tokio::task::block_in_place(|| {
        EtcdServer::start_with_tls(Some(ServerTls {
            ca_file: pki.ca.clone(),
            cert_file: pki.server_cert.clone(),
            key_file: pki.server_key.clone(),
        }))
    });
    let tls = |ca: &PathBuf, client: bool| EtcdOptions {
        ca_file: Some(ca.clone()),
        cert_file: client.then(|| pki.client_cert.clone()),
        key_file: client.then(|| pki.client_key.clone()),
        ..etcd.store_options()
    };

    // With the client certificate: works.
    let store = EtcdStore::connect(tls(&pki.ca, true)).await.unwrap();
    store
        .create_lease(&lease("10.244.1.0-24", golden_attrs()), Some(DAY))
        .await
        .unwrap()
        .unwrap();
    // Without one (the server demands it), or trusting another CA: refused,
    // as a retryable error naming the endpoint.
    for (what, opts) in [
        ("no client certificate", tls(&pki.ca, false)),
        ("server signed by an untrusted CA", tls(&pki.other_ca, true)),
    ] {
        let e = EtcdStore::connect(opts).await.expect_err(what);
        assert!(
            matches!(e, ConnectError::Store(StoreError::Unavailable(_))),
            "{what}: {e}"
        );
        assert!(e.to_string().contains(&etcd.endpoint()), "{what}: {e}");
    }

    // Password auth on top (etcdctl user add root; role add root; user
    // grant-role root root; auth enable).
    let mut admin = store.client();
    admin.user_add("root", "root-secret", None).await.unwrap();
    admin.role_add("root").await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();

    let authed = EtcdStore::connect(EtcdOptions {
        username: Some("root".into()),
        password: Some("root-secret".into()),
        ..tls(&pki.ca, true)
    })
    .await
    .unwrap();
    let snap = authed.list_leases().await.unwrap();
    assert_eq!(snap.leases.len(), 1);
    assert_eq!(snap.leases[0].attrs, golden_attrs());
    let mut rx = authed.watch_leases().await.unwrap();
    assert!(matches!(next(&mut rx).await, WatchEvent::Snapshot(_)));
    authed
        .create_lease(&lease("10.244.2.0-24", attrs(2)), Some(DAY))
        .await
        .unwrap()
        .unwrap();
    match next(&mut rx).await {
        WatchEvent::Events { events, .. } => {
            assert!(matches!(&events[0], LeaseEvent::Upsert(l) if l.key == key("10.244.2.0-24")))
        }
        other => panic!("expected events, got {other:?}"),
    }

    // Wrong password, or certificates only (CN flannel-node is no etcd
    // user): refused.
    let flag_of = |r: Result<EtcdStore, ConnectError>| match r {
        Err(e @ ConnectError::Option { .. }) => {
            assert!(!e.is_retryable());
            let ConnectError::Option { flag, detail } = e else {
                unreachable!()
            };
            (flag, detail)
        }
        other => panic!("expected a refusal naming a flag, got {other:?}"),
    };
    let user = |name: &str, password: &str| EtcdOptions {
        username: Some(name.into()),
        password: Some(password.into()),
        ..tls(&pki.ca, true)
    };
    let (flag, detail) = flag_of(EtcdStore::connect(user("root", "wrong")).await);
    assert_eq!(flag, "etcd-password");
    assert!(detail.contains("authentication failed"), "{detail}");
    assert!(detail.contains("\"root\""), "{detail}");
    // Certificates only: etcd takes the CN (flannel-node) as the user, and
    // there is no such user.
    let (flag, detail) = flag_of(EtcdStore::connect(tls(&pki.ca, true)).await);
    assert!(
        flag == "etcd-username" || flag == "etcd-password",
        "{flag}: {detail}"
    );

    // A least-privilege user: readwrite on the prefix only
    // (etcdctl role grant-permission flannel --prefix=true readwrite /coreos.com/network/).
    let mut admin = authed.client();
    admin
        .user_add("flannel", "flannel-secret", None)
        .await
        .unwrap();
    admin
        .user_add("nobody", "nobody-secret", None)
        .await
        .unwrap();
    admin.role_add("flannel").await.unwrap();
    admin
        .role_grant_permission(
            "flannel",
            etcd_client::Permission::read_write(format!("{PREFIX}/")).with_prefix(),
        )
        .await
        .unwrap();
    admin.user_grant_role("flannel", "flannel").await.unwrap();
    let limited = EtcdStore::connect(user("flannel", "flannel-secret"))
        .await
        .unwrap();
    let cfg = net_config("10.244.0.0/16", 24);
    let got = acquire_lease(&limited, &cfg, &attrs(3), None, DAY)
        .await
        .unwrap();
    let renewed = renew_lease(&limited, &got, DAY).await.unwrap();
    assert_eq!(renewed.key, got.key);
    let mut rx = limited.watch_leases().await.unwrap();
    match next(&mut rx).await {
        WatchEvent::Snapshot(s) => assert_eq!(s.leases.len(), 3),
        other => panic!("expected a snapshot, got {other:?}"),
    }
    // A user without permission on the prefix: a clear refusal.
    let (flag, detail) = flag_of(EtcdStore::connect(user("nobody", "nobody-secret")).await);
    assert_eq!(flag, "etcd-username");
    assert!(detail.contains("permission denied"), "{detail}");
    assert!(
        detail.contains("readwrite /coreos.com/network/"),
        "{detail}"
    );
}

/// A tracing writer into memory.
#[derive(Clone, Default)]
struct LogCapture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl LogCapture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn bad_values_are_skipped_and_harm_nothing() {
    // Capture this thread's warnings (the current-thread runtime runs the
    // store's calls here).
    let logs = LogCapture::default();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish(),
    );
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let mut c = raw(&etcd).await;
    store
        .create_lease(&lease("10.244.1.0-24", attrs(1)), Some(DAY))
        .await
        .unwrap()
        .unwrap();
    c.put(subnet_key("10.244.2.0-24"), "{not json", None)
        .await
        .unwrap();
    c.put(subnet_key("not-a-subnet"), attrs(3).to_json(), None)
        .await
        .unwrap();
    c.put(subnet_key("10.244.4.0-24"), vec![0xff, 0xfe, 0x00], None)
        .await
        .unwrap();
    c.put(format!("{PREFIX}/config"), r#"{"Network":"banana"}"#, None)
        .await
        .unwrap();

    let snap = store.list_leases().await.unwrap();
    assert_eq!(
        snap.leases.iter().map(|l| l.key).collect::<Vec<_>>(),
        vec![key("10.244.1.0-24")]
    );
    // Each skipped entry is named in a warning.
    let text = logs.text();
    for bad in ["10.244.2.0-24", "not-a-subnet", "10.244.4.0-24"] {
        assert!(
            text.lines()
                .any(|l| l.contains("WARN") && l.contains(&subnet_key(bad))),
            "no warning naming {bad}:\n{text}"
        );
    }
    // The config is returned as stored; validation is the daemon's and fails
    // cleanly.
    let conf = store.get_network_config().await.unwrap().unwrap();
    let err = flannel_core::config::parse(&conf).expect_err("invalid network");
    assert!(!err.to_string().is_empty());

    let mut rx = store.watch_leases().await.unwrap();
    let mut view = View::default();
    view.apply(next(&mut rx).await);
    assert_eq!(view.keys(), [key("10.244.1.0-24")].into());
    // Garbage written while watching: a valid lease turned bad is Removed,
    // other garbage produces nothing, later good events still arrive.
    c.put(subnet_key("10.244.1.0-24"), "[]", None)
        .await
        .unwrap();
    c.put(subnet_key("also/not-a-subnet"), "{}", None)
        .await
        .unwrap();
    store
        .create_lease(&lease("10.244.5.0-24", attrs(5)), Some(DAY))
        .await
        .unwrap()
        .unwrap();
    view.until(&mut rx, "the good lease after garbage", |v| {
        v.leases.contains_key(&key("10.244.5.0-24"))
    })
    .await;
    assert_eq!(view.keys(), [key("10.244.5.0-24")].into());

    // Acquisition works around garbage and never takes a subnet whose key
    // exists, even with an unreadable value.
    let cfg = net_config("10.244.0.0/22", 24);
    let got = acquire_lease(&store, &cfg, &attrs(7), None, DAY)
        .await
        .unwrap();
    assert_eq!(got.key, key("10.244.3.0-24"));
    // Updating an unreadable lease is a clear error, not a panic.
    match store
        .update_lease(&lease("10.244.2.0-24", attrs(1)), Some(DAY))
        .await
    {
        Err(StoreError::InvalidLease { key, detail }) => {
            assert!(key.ends_with("10.244.2.0-24"), "{key}");
            assert!(!detail.is_empty());
        }
        other => panic!("expected InvalidLease, got {other:?}"),
    }
}

#[test]
fn test_etcd_is_killed_and_removed_on_drop_even_on_panic() {
    let etcd = EtcdServer::start();
    let pid = etcd.pid().expect("running");
    let dir = etcd.dir().to_path_buf();
    assert!(dir.join("data").exists());
    // Dropped while a panic unwinds.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _etcd = etcd;
        panic!("test failure");
    }));
    assert!(r.is_err());
    // Reaped by the drop: no such process any more (not even a zombie).
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "etcd {pid} still exists"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn missing_etcd_binary_fails_with_a_clear_message() {
    // Runs in a child process: the override is process-wide.
    if std::env::var_os("FLANNEL_ETCD_TEST_CHILD").is_some() {
        EtcdServer::start();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "missing_etcd_binary_fails_with_a_clear_message",
            "--nocapture",
        ])
        .env("FLANNEL_ETCD_TEST_CHILD", "1")
        .env("FLANNEL_TEST_ETCD", "/nonexistent/etcd")
        .output()
        .unwrap();
    assert!(!out.status.success(), "must fail, never skip");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("apt-get install etcd-server"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_of_many_upstream_leases_reads_each_ttl() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let mut c = raw(&etcd).await;
    // 60 leases as upstream writes them, each on its own etcd lease, with
    // TTLs 600..=659 s so that every expiration is distinguishable.
    let mut ids = Vec::new();
    for i in 0..60u8 {
        let g = c.lease_grant(600 + i as i64, None).await.unwrap();
        c.put(
            subnet_key(&format!("10.244.{i}.0-24")),
            attrs(i).to_json(),
            Some(PutOptions::new().with_lease(g.id())),
        )
        .await
        .unwrap();
        ids.push(g.id());
    }
    for round in 0..2 {
        let snap = store.list_leases().await.unwrap();
        assert_eq!(snap.leases.len(), 60, "round {round}");
        for l in &snap.leases {
            let i = l.key.ipv4.unwrap().addr().octets()[2];
            assert_eq!(l.attrs, attrs(i));
            assert_expires_in(l, Duration::from_secs(600 + i as u64));
        }
    }
    // Revoked leases vanish from the next list.
    for id in ids.iter().step_by(2) {
        c.lease_revoke(*id).await.unwrap();
    }
    let snap = store.list_leases().await.unwrap();
    assert_eq!(snap.leases.len(), 30);
    assert!(snap
        .leases
        .iter()
        .all(|l| l.key.ipv4.unwrap().addr().octets()[2] % 2 == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_loss_fails_cleanly_and_the_watch_recovers() {
    let mut cluster = tokio::task::block_in_place(|| EtcdCluster::start(3));
    let store = EtcdStore::connect(cluster.store_options()).await.unwrap();
    store
        .create_lease(&lease("10.244.1.0-24", attrs(1)), Some(DAY))
        .await
        .unwrap()
        .unwrap();
    let mut rx = store.watch_leases().await.unwrap();
    let mut view = View::default();
    view.apply(next(&mut rx).await);

    // Two of three members gone: no leader. Requests fail (no hang, no
    // stale answer from the lone member) as Unavailable.
    tokio::task::block_in_place(|| {
        cluster.members[1].kill();
        cluster.members[2].kill();
    });
    let started = Instant::now();
    match store.list_leases().await {
        Err(StoreError::Unavailable(e)) => assert!(e.contains("127.0.0.1"), "{e}"),
        other => panic!("expected Unavailable without quorum, got {other:?}"),
    }
    eprintln!("without quorum, list failed after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(15));

    // Quorum back: writes work again and the watch delivers them.
    tokio::task::block_in_place(|| cluster.members[1].restart());
    let deadline = Instant::now() + WAIT;
    loop {
        match store
            .create_lease(&lease("10.244.2.0-24", attrs(2)), Some(DAY))
            .await
        {
            Ok(r) => {
                assert!(r.is_some());
                break;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("quorum not back yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("store did not recover with quorum back: {e}"),
        }
    }
    view.until(&mut rx, "the lease written after quorum came back", |v| {
        v.leases.contains_key(&key("10.244.2.0-24"))
    })
    .await;
    assert_eq!(
        view.keys(),
        [key("10.244.1.0-24"), key("10.244.2.0-24")].into()
    );
}

#[tokio::test]
async fn expired_auth_token_is_refreshed() {
    // Tokens live 1 s here (300 s by default): an idle daemon outlives its
    // token between renewals.
    let etcd = EtcdServer::start_with(None, &["--auth-token-ttl=1"]);
    let mut admin = raw(&etcd).await;
    admin.user_add("root", "root-secret", None).await.unwrap();
    admin.role_add("root").await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();
    let store = EtcdStore::connect(EtcdOptions {
        username: Some("root".into()),
        password: Some("root-secret".into()),
        ..etcd.store_options()
    })
    .await
    .unwrap();
    let created = store
        .create_lease(&lease("10.244.1.0-24", attrs(1)), Some(DAY))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let renewed = renew_lease(&store, &created, DAY)
        .await
        .expect("renewal after the token expired");
    assert_expires_in(&renewed, DAY);
    assert_eq!(store.list_leases().await.unwrap().leases.len(), 1);
}

#[tokio::test]
async fn watcher_that_falls_behind_a_compaction_gets_a_snapshot() {
    // Current-thread runtime: the watch task logs on this thread.
    let logs = LogCapture::default();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish(),
    );
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let mut c = raw(&etcd).await;
    let mut rx = store.watch_leases().await.unwrap();
    let mut view = View::default();
    view.apply(next(&mut rx).await);

    // Do not read: the watch channel fills, the store stops reading its
    // stream, the HTTP/2 window and etcd's buffers fill, and etcd sets the
    // watcher aside as a slow one. Large values fill the buffers quickly.
    let mut big = attrs(1);
    big.backend_data = Some(flannel_core::lease::BackendData::new(
        &serde_json::json!({"VNI": 1, "VtepMAC": "02:00:00:00:00:01", "Pad": "x".repeat(16 * 1024)}),
    ));
    let big = big.to_json();
    for i in 0..700u32 {
        let k = format!("10.{}.{}.0-24", 100 + i / 256, i % 256);
        c.put(subnet_key(&k), big.as_str(), None).await.unwrap();
    }
    // Meanwhile the history it still needs is compacted away.
    let rev = c
        .get(
            format!("{PREFIX}/subnets/"),
            Some(GetOptions::new().with_count_only()),
        )
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    c.compact(rev, None).await.unwrap();

    // Reading again: whatever was queued, then a fresh snapshot, and the
    // view ends up exactly what etcd holds.
    view.until(&mut rx, "a snapshot after the compaction", |v| {
        v.snapshots >= 2
    })
    .await;
    let text = logs.text();
    assert!(
        text.contains("etcd compacted the history the watch needed"),
        "the resync must come from the compaction:\n{text}"
    );
    store
        .create_lease(&lease("10.244.1.0-24", attrs(2)), Some(DAY))
        .await
        .unwrap()
        .unwrap();
    view.until(&mut rx, "the lease written after the resync", |v| {
        v.leases.contains_key(&key("10.244.1.0-24"))
    })
    .await;
    let listed: BTreeSet<_> = store
        .list_leases()
        .await
        .unwrap()
        .leases
        .into_iter()
        .map(|l| l.key)
        .collect();
    assert_eq!(listed.len(), 701);
    assert_eq!(view.keys(), listed);
}

#[tokio::test]
async fn list_of_thousands_of_leases_reads_every_page() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let mut c = raw(&etcd).await;
    // 2500 reservations (several list pages), 100 per transaction.
    for t in 0..25u32 {
        let ops: Vec<_> = (0..100u32)
            .map(|j| {
                let i = t * 100 + j;
                etcd_client::TxnOp::put(
                    subnet_key(&format!("10.{}.{}.0-24", 100 + i / 256, i % 256)),
                    attrs((i % 250) as u8).to_json(),
                    None,
                )
            })
            .collect();
        c.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
    }
    let snap = store.list_leases().await.unwrap();
    assert_eq!(snap.leases.len(), 2500);
    let distinct: BTreeSet<_> = snap.leases.iter().map(|l| l.key).collect();
    assert_eq!(distinct.len(), 2500);
    assert!(snap.leases.iter().all(Lease::is_reservation));
    let rev = c
        .get(
            format!("{PREFIX}/subnets/"),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!(rev.count(), 2500);
    assert_eq!(snap.revision, rev.header().unwrap().revision() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dual_stack_racers_never_share_either_family() {
    let etcd = EtcdServer::start();
    let cfg = flannel_core::config::parse(
        r#"{"Network":"10.244.0.0/20","SubnetLen":24,"EnableIPv6":true,
            "IPv6Network":"fd00:10:244::/60","IPv6SubnetLen":64,"Backend":{"Type":"vxlan"}}"#,
    )
    .unwrap();
    // 15 subnets per family: 12 racers pick colliding IPv4 subnets with
    // different IPv6 ones (different etcd keys) all the time.
    let racers = 12u8;
    let mut stores = Vec::new();
    for _ in 0..racers {
        stores.push(connect(&etcd).await);
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(racers as usize));
    let mut tasks = Vec::new();
    for (n, store) in (1..=racers).zip(stores) {
        let (cfg, barrier) = (cfg.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let mut a = attrs(n);
            a.public_ipv6 = Some(format!("fd00::{n}").parse().unwrap());
            barrier.wait().await;
            acquire_lease(&store, &cfg, &a, None, DAY).await
        }));
    }
    let mut leases = Vec::new();
    for t in tasks {
        leases.push(t.await.unwrap().expect("every racer gets a lease"));
    }
    let v4: BTreeSet<_> = leases.iter().map(|l| l.key.ipv4.unwrap()).collect();
    let v6: BTreeSet<_> = leases.iter().map(|l| l.key.ipv6.unwrap()).collect();
    assert_eq!(v4.len(), 12, "IPv4 subnet handed out twice: {leases:?}");
    assert_eq!(v6.len(), 12, "IPv6 subnet handed out twice: {leases:?}");
}

#[tokio::test]
async fn a_dead_endpoint_in_the_list_is_tolerated() {
    // As with upstream's default --etcd-endpoints, where only one of
    // 127.0.0.1:4001 and 127.0.0.1:2379 usually answers.
    let etcd = EtcdServer::start();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_endpoint = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let store = EtcdStore::connect(EtcdOptions {
        endpoints: vec![dead_endpoint, etcd.endpoint()],
        ..etcd.store_options()
    })
    .await
    .unwrap();
    let started = Instant::now();
    for i in 0..100u8 {
        store
            .create_lease(&lease(&format!("10.244.{i}.0-24"), attrs(i)), Some(DAY))
            .await
            .unwrap()
            .unwrap();
        store.list_leases().await.unwrap();
    }
    // Requests that hit the dead endpoint go to the live one at once, with
    // no pause: 100 creates and lists take well under a second or two.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Watches start on the live endpoint without a resync either: snapshot,
    // then exactly the next change.
    for i in 0..10u8 {
        let mut rx = store.watch_leases().await.unwrap();
        match next(&mut rx).await {
            WatchEvent::Snapshot(s) => assert_eq!(s.leases.len(), 100 + i as usize),
            other => panic!("expected a snapshot, got {other:?}"),
        }
        let k = format!("10.245.{i}.0-24");
        store
            .create_lease(&lease(&k, attrs(i)), Some(DAY))
            .await
            .unwrap()
            .unwrap();
        match next(&mut rx).await {
            WatchEvent::Events { events, .. } => {
                assert!(matches!(&events[..], [LeaseEvent::Upsert(l)] if l.key == key(&k)))
            }
            WatchEvent::Snapshot(s) => panic!(
                "watch {i}: expected the event, got another snapshot ({} leases at revision {})",
                s.leases.len(),
                s.revision
            ),
        }
    }
}

/// A bulk import spans several transactions and lands every lease as a
/// reservation (no etcd lease), upstream's value byte for byte.
#[tokio::test]
async fn import_puts_many_leases_in_transactions() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let n = flannel_store::etcd::IMPORT_TXN_OPS * 2 + 5;
    let leases: Vec<Lease> = (0..n)
        .map(|i| Lease {
            key: key(&format!("10.{}.{}.0-24", i / 256, i % 256)),
            attrs: attrs((i % 250) as u8 + 1),
            expiration: None,
        })
        .collect();
    store.import(&leases).await.unwrap();
    store
        .put_network_config(r#"{"Network":"10.0.0.0/8"}"#)
        .await
        .unwrap();
    let mut got = store.list_leases().await.unwrap().leases;
    got.sort_by_key(|l| l.key);
    let mut want = leases.clone();
    want.sort_by_key(|l| l.key);
    assert_eq!(got, want);
    let mut c = raw(&etcd).await;
    let kv = raw_get(&mut c, &store.lease_key(&key("10.0.5.0-24")))
        .await
        .unwrap();
    assert_eq!(kv.lease(), 0, "a reservation");
    assert_eq!(kv.value(), leases[5].attrs.to_json().as_bytes());
    assert_eq!(
        store.get_network_config().await.unwrap().as_deref(),
        Some(r#"{"Network":"10.0.0.0/8"}"#)
    );
}
