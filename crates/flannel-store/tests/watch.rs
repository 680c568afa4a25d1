//! The local store's inotify watch: snapshot, upserts, removals, expiry,
//! bad files, bursts, shutdown.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{attrs, key, TempDir};
use flannel_core::lease::{Lease, LeaseEvent, LeaseKey};
use flannel_store::{LocalStore, Store, WatchEvent};
use tokio::sync::mpsc::Receiver;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

fn lease(k: &str, node: u8) -> Lease {
    Lease {
        key: key(k),
        attrs: attrs(node),
        expiration: None,
    }
}

async fn next(rx: &mut Receiver<WatchEvent>) -> WatchEvent {
    timeout(WAIT, rx.recv())
        .await
        .expect("watch event within 5 s")
        .expect("watch channel open")
}

/// The next `Events` message's events.
async fn next_events(rx: &mut Receiver<WatchEvent>) -> Vec<LeaseEvent> {
    match next(rx).await {
        WatchEvent::Events { events, .. } => events,
        other => panic!("expected events, got {other:?}"),
    }
}

/// Asserts that nothing arrives for `d`.
async fn quiet(rx: &mut Receiver<WatchEvent>, d: Duration) {
    if let Ok(ev) = timeout(d, rx.recv()).await {
        panic!("unexpected watch message: {ev:?}");
    }
}

#[tokio::test]
async fn snapshot_then_upsert_update_delete() {
    let dir = TempDir::new("watch-basic");
    let store = LocalStore::open(dir.path()).unwrap();
    let first = store
        .create_lease(&lease("10.244.1.0-24", 1), Some(Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap();
    let mut rx = store.watch_leases().await.unwrap();
    match next(&mut rx).await {
        WatchEvent::Snapshot(s) => {
            assert_eq!(s.leases, vec![first.clone()]);
            assert!(s.revision >= 1);
        }
        other => panic!("expected a snapshot first, got {other:?}"),
    }

    // Create.
    let second = store
        .create_lease(&lease("10.244.2.0-24", 2), Some(Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        next_events(&mut rx).await,
        vec![LeaseEvent::Upsert(second.clone())]
    );

    // Update (renewal).
    let renewed = store
        .update_lease(&second, Some(Duration::from_secs(120)))
        .await
        .unwrap();
    assert_eq!(
        next_events(&mut rx).await,
        vec![LeaseEvent::Upsert(renewed)]
    );

    // Delete.
    store.delete_lease(&first.key).await.unwrap();
    assert_eq!(
        next_events(&mut rx).await,
        vec![LeaseEvent::Removed(first.key)]
    );
    quiet(&mut rx, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn expiry_emits_removed_and_renewal_reschedules() {
    let dir = TempDir::new("watch-expiry");
    let store = LocalStore::open(dir.path()).unwrap();
    let mut rx = store.watch_leases().await.unwrap();
    assert!(matches!(next(&mut rx).await, WatchEvent::Snapshot(s) if s.leases.is_empty()));

    let short = store
        .create_lease(&lease("10.244.1.0-24", 1), Some(Duration::from_millis(400)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        next_events(&mut rx).await,
        vec![LeaseEvent::Upsert(short.clone())]
    );
    let long = store
        .create_lease(&lease("10.244.2.0-24", 2), Some(Duration::from_millis(300)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        next_events(&mut rx).await,
        vec![LeaseEvent::Upsert(long.clone())]
    );
    // Renew the second before it expires: its Removed must move out.
    let renewed = store
        .update_lease(&long, Some(Duration::from_millis(1500)))
        .await
        .unwrap();
    assert_eq!(
        next_events(&mut rx).await,
        vec![LeaseEvent::Upsert(renewed.clone())]
    );

    // Nothing was written: the timer alone reports the expiry.
    let started = std::time::Instant::now();
    assert_eq!(
        next_events(&mut rx).await,
        vec![LeaseEvent::Removed(short.key)]
    );
    assert!(started.elapsed() < Duration::from_millis(1000));
    assert!(std::time::SystemTime::now() >= short.expiration.unwrap());
    // The renewed lease survives its old expiry and goes at its new one.
    quiet(&mut rx, Duration::from_millis(500)).await;
    assert_eq!(
        next_events(&mut rx).await,
        vec![LeaseEvent::Removed(renewed.key)]
    );
    assert!(std::time::SystemTime::now() >= renewed.expiration.unwrap());
}

#[tokio::test]
async fn bad_file_is_ignored_and_the_rest_delivered() {
    let dir = TempDir::new("watch-bad");
    let store = LocalStore::open(dir.path()).unwrap();
    std::fs::write(dir.path().join("subnets/10.244.9.0-24"), b"garbage").unwrap();
    let good = store
        .create_lease(&lease("10.244.1.0-24", 1), Some(Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap();
    let mut rx = store.watch_leases().await.unwrap();
    assert!(
        matches!(next(&mut rx).await, WatchEvent::Snapshot(s) if s.leases == vec![good.clone()])
    );

    std::fs::write(dir.path().join("subnets/10.244.8.0-24"), b"{\"half\":").unwrap();
    std::fs::write(dir.path().join("subnets/junk-name"), b"{}").unwrap();
    let next_good = store
        .create_lease(&lease("10.244.2.0-24", 2), Some(Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap();
    // Only the valid lease comes through (possibly batched with nothing else).
    let mut seen = Vec::new();
    while !seen.contains(&LeaseEvent::Upsert(next_good.clone())) {
        seen.extend(next_events(&mut rx).await);
    }
    assert_eq!(seen, vec![LeaseEvent::Upsert(next_good)]);

    // A good lease turning into garbage is reported as removed.
    std::fs::write(dir.path().join("subnets/10.244.1.0-24"), b"oops").unwrap();
    assert_eq!(
        next_events(&mut rx).await,
        vec![LeaseEvent::Removed(good.key)]
    );
}

/// Applies watch messages to a map, as a daemon would.
fn apply(state: &mut BTreeMap<LeaseKey, Lease>, msg: WatchEvent) {
    match msg {
        WatchEvent::Snapshot(s) => {
            state.clear();
            state.extend(s.leases.into_iter().map(|l| (l.key, l)));
        }
        WatchEvent::Events { events, .. } => {
            for e in events {
                match e {
                    LeaseEvent::Upsert(l) => {
                        state.insert(l.key, l);
                    }
                    LeaseEvent::Removed(k) => {
                        state.remove(&k);
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn burst_of_fifty_writes_converges() {
    let dir = TempDir::new("watch-burst");
    let store = LocalStore::open(dir.path()).unwrap();
    let mut rx = store.watch_leases().await.unwrap();
    let mut state = BTreeMap::new();
    apply(&mut state, next(&mut rx).await);

    // 50 writes, from two stores (two daemons) interleaved: 30 creates,
    // 10 updates, 10 deletes.
    let other = LocalStore::open(dir.path()).unwrap();
    let ttl = Some(Duration::from_secs(60));
    let mut created = Vec::new();
    for i in 0..30u8 {
        let s = if i % 2 == 0 { &store } else { &other };
        let l = s
            .create_lease(&lease(&format!("10.244.{}.0-24", i + 1), i + 1), ttl)
            .await
            .unwrap()
            .unwrap();
        created.push(l);
    }
    for l in &created[..10] {
        let mut l = l.clone();
        l.attrs.backend_data = Some(flannel_core::lease::BackendData::new(
            &serde_json::json!({"VNI": 1, "VtepMAC": "02:00:00:00:00:99"}),
        ));
        other.update_lease(&l, ttl).await.unwrap();
    }
    for l in &created[20..30] {
        store.delete_lease(&l.key).await.unwrap();
    }

    let want: BTreeMap<LeaseKey, Lease> = store
        .list_leases()
        .await
        .unwrap()
        .leases
        .into_iter()
        .map(|l| (l.key, l))
        .collect();
    assert_eq!(want.len(), 20);
    let deadline = tokio::time::Instant::now() + WAIT;
    while state != want {
        let msg = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "watch did not converge; have {} leases, want {}",
                    state.len(),
                    want.len()
                )
            })
            .expect("watch open");
        apply(&mut state, msg);
    }
    // And nothing spurious afterwards.
    quiet(&mut rx, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn dropping_the_store_closes_the_watch() {
    let dir = TempDir::new("watch-close");
    let store = LocalStore::open(dir.path()).unwrap();
    let mut rx = store.watch_leases().await.unwrap();
    assert!(matches!(next(&mut rx).await, WatchEvent::Snapshot(_)));
    drop(store);
    let end = timeout(Duration::from_secs(2), rx.recv())
        .await
        .expect("closed promptly");
    assert!(end.is_none(), "channel closes when the store is dropped");
}

#[tokio::test]
async fn removed_subnets_dir_is_recreated_with_a_fresh_snapshot() {
    let dir = TempDir::new("watch-rmdir");
    let store = LocalStore::open(dir.path()).unwrap();
    store
        .create_lease(&lease("10.244.1.0-24", 1), Some(Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap();
    let mut rx = store.watch_leases().await.unwrap();
    assert!(matches!(next(&mut rx).await, WatchEvent::Snapshot(s) if s.leases.len() == 1));
    std::fs::remove_dir_all(dir.path().join("subnets")).unwrap();
    let mut state = BTreeMap::new();
    state.insert(key("10.244.1.0-24"), lease("10.244.1.0-24", 1));
    let deadline = tokio::time::Instant::now() + WAIT;
    while !state.is_empty() {
        let msg = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("watch reports the loss")
            .expect("watch open");
        apply(&mut state, msg);
    }
    let l = store
        .create_lease(&lease("10.244.2.0-24", 2), Some(Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap();
    while !state.contains_key(&l.key) {
        let msg = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("watch sees writes in the new dir")
            .expect("watch open");
        apply(&mut state, msg);
    }
}

#[tokio::test]
async fn safety_resync_sends_nothing_when_nothing_changed() {
    let dir = TempDir::new("watch-resync");
    let store = LocalStore::open(dir.path())
        .unwrap()
        .with_resync_interval(Duration::from_millis(50));
    store
        .create_lease(&lease("10.244.1.0-24", 1), None)
        .await
        .unwrap()
        .unwrap();
    let mut rx = store.watch_leases().await.unwrap();
    assert!(matches!(next(&mut rx).await, WatchEvent::Snapshot(s) if s.leases.len() == 1));
    // About ten resyncs happen meanwhile; none may produce a message.
    quiet(&mut rx, Duration::from_millis(600)).await;
    // And the watch still works after them.
    let l = store
        .create_lease(&lease("10.244.2.0-24", 2), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next_events(&mut rx).await, vec![LeaseEvent::Upsert(l)]);
}
