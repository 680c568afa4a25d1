//! The local directory store: create/list/update/delete, reservations,
//! expiry, bad files, ownership checks and the on-disk format.

mod common;

use std::time::{Duration, SystemTime};

use common::{attrs, key, TempDir};
use flannel_core::lease::Lease;
use flannel_store::{LocalStore, Store, StoreError};

fn lease(k: &str, node: u8) -> Lease {
    Lease {
        key: key(k),
        attrs: attrs(node),
        expiration: None,
    }
}

#[tokio::test]
async fn round_trip_create_list_update_delete() {
    let dir = TempDir::new("roundtrip");
    let store = LocalStore::open(dir.path()).unwrap();
    let empty = store.list_leases().await.unwrap();
    assert!(empty.leases.is_empty());

    let before = SystemTime::now();
    let ttl = Duration::from_secs(60);
    let created = store
        .create_lease(&lease("10.244.1.0-24", 1), Some(ttl))
        .await
        .unwrap()
        .expect("key was free");
    let exp = created.expiration.expect("a lease with a TTL expires");
    assert!(exp > before + Duration::from_secs(59) && exp <= SystemTime::now() + ttl);
    assert_eq!(created.attrs, attrs(1));

    let snap = store.list_leases().await.unwrap();
    assert_eq!(snap.leases, vec![created.clone()]);
    assert!(snap.revision > empty.revision);

    // Create-if-absent: a second create on a live key is refused.
    let second = store
        .create_lease(&lease("10.244.1.0-24", 2), Some(ttl))
        .await
        .unwrap();
    assert_eq!(second, None);
    assert_eq!(
        store.list_leases().await.unwrap().leases,
        vec![created.clone()]
    );

    // Update with new attributes (same owner) and a longer TTL.
    let mut changed = created.clone();
    changed.attrs.backend_data = Some(flannel_core::lease::BackendData::new(
        &serde_json::json!({"VNI": 1, "VtepMAC": "02:aa:bb:cc:dd:ee"}),
    ));
    let updated = store
        .update_lease(&changed, Some(Duration::from_secs(120)))
        .await
        .unwrap();
    assert_eq!(updated.attrs, changed.attrs);
    assert!(updated.expiration.unwrap() > exp);
    let snap2 = store.list_leases().await.unwrap();
    assert_eq!(snap2.leases, vec![updated.clone()]);
    assert!(snap2.revision > snap.revision);

    // A second store on the same dir (another daemon) sees the same.
    let other = LocalStore::open(dir.path()).unwrap();
    assert_eq!(other.list_leases().await.unwrap().leases, vec![updated]);

    store.delete_lease(&key("10.244.1.0-24")).await.unwrap();
    assert!(store.list_leases().await.unwrap().leases.is_empty());
    assert!(!store.lease_path(&key("10.244.1.0-24")).exists());
    // Deleting what is absent is success.
    store.delete_lease(&key("10.244.1.0-24")).await.unwrap();
}

#[tokio::test]
async fn file_holds_upstream_attrs_json_and_expiration() {
    let dir = TempDir::new("format");
    let store = LocalStore::open(dir.path()).unwrap();
    let stored = store
        .create_lease(&lease("10.244.7.0-24", 7), Some(Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap();
    let text = std::fs::read_to_string(dir.path().join("subnets/10.244.7.0-24")).unwrap();
    let upstream = serde_json::to_string(&attrs(7)).unwrap();
    assert!(
        text.contains(&format!("\"LeaseAttrs\":{upstream}")),
        "file {text} lacks the upstream attrs JSON {upstream}"
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ms = v["ExpiresUnixMs"].as_u64().expect("expiration in ms");
    let exp_ms = stored
        .expiration
        .unwrap()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert_eq!(ms, exp_ms);
    assert!(dir.path().join("lock").exists());
    let rev: u64 = std::fs::read_to_string(dir.path().join("revision"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(rev >= 1);

    store
        .create_lease(&lease("10.244.8.0-24", 8), None)
        .await
        .unwrap()
        .unwrap();
    let text = std::fs::read_to_string(dir.path().join("subnets/10.244.8.0-24")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        v["ExpiresUnixMs"].is_null(),
        "reservation stores null: {text}"
    );
    // No temp files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("subnets"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn reservation_never_expires_and_is_never_replaced() {
    let dir = TempDir::new("reservation");
    let store = LocalStore::open(dir.path()).unwrap();
    let res = store
        .create_lease(&lease("10.244.5.0-24", 5), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.expiration, None);
    // A short-lived lease next to it, so a writer runs garbage collection.
    store
        .create_lease(&lease("10.244.6.0-24", 6), Some(Duration::from_millis(50)))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(
        store
            .create_lease(&lease("10.244.5.0-24", 9), Some(Duration::from_secs(60)))
            .await
            .unwrap(),
        None,
        "a reservation is never handed to another node"
    );
    assert_eq!(store.list_leases().await.unwrap().leases, vec![res.clone()]);
    assert!(store.lease_path(&key("10.244.5.0-24")).exists());
    assert!(
        !store.lease_path(&key("10.244.6.0-24")).exists(),
        "expired lease garbage-collected by the writer"
    );
    // Updating the reservation with ttl None keeps it a reservation.
    let kept = store.update_lease(&res, None).await.unwrap();
    assert_eq!(kept.expiration, None);
}

#[tokio::test]
async fn expired_lease_is_free_again() {
    let dir = TempDir::new("expiry");
    let store = LocalStore::open(dir.path()).unwrap();
    store
        .create_lease(&lease("10.244.3.0-24", 3), Some(Duration::from_millis(150)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.list_leases().await.unwrap().leases.len(), 1);
    assert_eq!(
        store
            .create_lease(&lease("10.244.3.0-24", 4), Some(Duration::from_secs(60)))
            .await
            .unwrap(),
        None,
        "still live"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        store.list_leases().await.unwrap().leases.is_empty(),
        "list excludes expired leases"
    );
    // The file is still there until a writer collects it: list never deletes.
    assert!(store.lease_path(&key("10.244.3.0-24")).exists());
    let taken = store
        .create_lease(&lease("10.244.3.0-24", 4), Some(Duration::from_secs(60)))
        .await
        .unwrap()
        .expect("an expired lease may be replaced");
    assert_eq!(taken.attrs, attrs(4));
    assert_eq!(store.list_leases().await.unwrap().leases, vec![taken]);
}

#[tokio::test]
async fn bad_files_are_skipped_not_fatal() {
    let dir = TempDir::new("badfiles");
    let store = LocalStore::open(dir.path()).unwrap();
    let good = store
        .create_lease(&lease("10.244.1.0-24", 1), Some(Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap();
    let subnets = dir.path().join("subnets");
    std::fs::write(subnets.join("10.244.2.0-24"), b"{not json").unwrap();
    std::fs::write(
        subnets.join("10.244.3.0-24"),
        br#"{"LeaseAttrs":{"PublicIP":7}}"#,
    )
    .unwrap();
    std::fs::write(
        subnets.join("not-a-key"),
        std::fs::read(store.lease_path(&good.key)).unwrap(),
    )
    .unwrap();
    let snap = store.list_leases().await.unwrap();
    assert_eq!(snap.leases, vec![good]);
    // A create on a key whose file is garbage replaces it.
    let fixed = store
        .create_lease(&lease("10.244.2.0-24", 2), Some(Duration::from_secs(60)))
        .await
        .unwrap()
        .expect("garbage is not a lease");
    assert!(store.list_leases().await.unwrap().leases.contains(&fixed));
    // Update refuses to overwrite garbage it cannot check the owner of.
    let err = store
        .update_lease(&lease("10.244.3.0-24", 3), Some(Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidLease { .. }), "{err}");
}

#[tokio::test]
async fn update_refuses_absent_and_foreign_leases() {
    let dir = TempDir::new("update");
    let store = LocalStore::open(dir.path()).unwrap();
    let err = store
        .update_lease(&lease("10.244.1.0-24", 1), Some(Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { ref key } if key == "10.244.1.0-24"),
        "{err}"
    );

    store
        .create_lease(&lease("10.244.1.0-24", 1), Some(Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap();
    let err = store
        .update_lease(&lease("10.244.1.0-24", 2), Some(Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("172.16.0.1"), "{err}");
    assert_eq!(
        store.list_leases().await.unwrap().leases[0].attrs,
        attrs(1),
        "the owner's lease is untouched"
    );
}

#[tokio::test]
async fn expired_own_lease_is_revived_by_update() {
    let dir = TempDir::new("revive");
    let store = LocalStore::open(dir.path()).unwrap();
    let l = store
        .create_lease(&lease("10.244.1.0-24", 1), Some(Duration::from_millis(50)))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(store.list_leases().await.unwrap().leases.is_empty());
    let renewed = store
        .update_lease(&l, Some(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(store.list_leases().await.unwrap().leases, vec![renewed]);
}

#[tokio::test]
async fn network_config_from_dir_config_file() {
    let dir = TempDir::new("config");
    let store = LocalStore::open(dir.path()).unwrap();
    assert_eq!(store.get_network_config().await.unwrap(), None);
    let json = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
    std::fs::write(dir.path().join("config"), json).unwrap();
    assert_eq!(
        store.get_network_config().await.unwrap().as_deref(),
        Some(json)
    );
}

#[tokio::test]
async fn stale_temp_files_are_collected_by_writers() {
    let dir = TempDir::new("tmpgc");
    let store = LocalStore::open(dir.path()).unwrap();
    let stale = dir.path().join("subnets/.tmp.10.244.1.0-24.999999.0");
    std::fs::write(&stale, b"half").unwrap();
    let stale_rev = dir.path().join(".tmp.revision.999999.0");
    std::fs::write(&stale_rev, b"4").unwrap();
    assert!(store.list_leases().await.unwrap().leases.is_empty());
    store
        .create_lease(&lease("10.244.2.0-24", 2), Some(Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap();
    assert!(!stale.exists());
    assert!(!stale_rev.exists());
}

#[tokio::test]
async fn create_refuses_keys_overlapping_a_live_lease() {
    let dir = TempDir::new("overlap");
    let store = LocalStore::open(dir.path()).unwrap();
    let ttl = Some(Duration::from_secs(60));
    store
        .create_lease(&lease("10.244.1.0-24&fd00:0:0:1::-64", 1), ttl)
        .await
        .unwrap()
        .unwrap();
    // Same IPv4 subnet, another IPv6 one: another file name, same subnet.
    assert_eq!(
        store
            .create_lease(&lease("10.244.1.0-24&fd00:0:0:2::-64", 2), ttl)
            .await
            .unwrap(),
        None
    );
    // Same IPv6 subnet, another IPv4 one.
    assert_eq!(
        store
            .create_lease(&lease("10.244.2.0-24&fd00:0:0:1::-64", 2), ttl)
            .await
            .unwrap(),
        None
    );
    // Another length covering it (a changed SubnetLen).
    assert_eq!(
        store
            .create_lease(&lease("10.244.0.0-23", 2), ttl)
            .await
            .unwrap(),
        None
    );
    assert!(store
        .create_lease(&lease("10.244.2.0-24&fd00:0:0:2::-64", 2), ttl)
        .await
        .unwrap()
        .is_some());
    assert_eq!(store.list_leases().await.unwrap().leases.len(), 2);
}

#[tokio::test]
async fn non_canonical_file_name_is_skipped() {
    let dir = TempDir::new("canonical");
    let store = LocalStore::open(dir.path()).unwrap();
    let good = store
        .create_lease(&lease("10.244.4.0-24&fd00:0:0:4::-64", 4), None)
        .await
        .unwrap()
        .unwrap();
    let content = std::fs::read(store.lease_path(&good.key)).unwrap();
    // Parses to a key, but not spelled as the store spells it.
    std::fs::write(
        dir.path().join("subnets/10.244.5.0-24&fd00:0000:0:5::-64"),
        &content,
    )
    .unwrap();
    assert_eq!(store.list_leases().await.unwrap().leases, vec![good]);
}

#[tokio::test]
async fn expired_lease_is_not_revived_over_an_overlapping_one() {
    let dir = TempDir::new("revive-overlap");
    let store = LocalStore::open(dir.path()).unwrap();
    let mine = store
        .create_lease(
            &lease("10.244.1.0-24&fd00:0:0:1::-64", 1),
            Some(Duration::from_millis(50)),
        )
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Another node takes the IPv4 half with another IPv6 subnet. Its create
    // garbage-collects our expired file; put it back as if no writer had
    // collected it yet.
    let theirs = store
        .create_lease(
            &lease("10.244.1.0-24&fd00:0:0:2::-64", 2),
            Some(Duration::from_secs(60)),
        )
        .await
        .unwrap()
        .expect("the expired lease does not hold the subnet");
    let expired_record = format!(
        r#"{{"LeaseAttrs":{},"ExpiresUnixMs":1}}"#,
        serde_json::to_string(&attrs(1)).unwrap()
    );
    std::fs::write(store.lease_path(&mine.key), expired_record).unwrap();
    let err = store
        .update_lease(&mine, Some(Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert_eq!(store.list_leases().await.unwrap().leases, vec![theirs]);
}

/// A FIFO, a directory and a symlink named like leases in `subnets/`
/// (issue 14 item 4): opening a FIFO for reading blocks until a writer
/// comes, which froze the watch thread of every daemon while /healthz
/// stayed 200. Each is skipped, listing and the watch stay prompt, and
/// the real leases are delivered.
#[tokio::test]
async fn fifo_directory_and_symlink_in_subnets_are_skipped_without_blocking() {
    use std::os::unix::fs::symlink;
    use tokio::time::timeout;
    let dir = TempDir::new("nonregular");
    let store = LocalStore::open(dir.path()).unwrap();
    let good = store
        .create_lease(&lease("10.244.1.0-24", 1), None)
        .await
        .unwrap()
        .unwrap();
    let subnets = dir.path().join("subnets");
    // On failure, release any reader stuck in open(2) on a FIFO (a writer
    // opening and closing it gives the reader EOF), so that a regression
    // fails the test instead of hanging the runtime's shutdown.
    struct Unblock(Vec<std::path::PathBuf>);
    impl Drop for Unblock {
        fn drop(&mut self) {
            use std::os::unix::fs::OpenOptionsExt;
            for p in &self.0 {
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(nix::libc::O_NONBLOCK)
                    .open(p);
            }
        }
    }
    let _unblock = Unblock(vec![
        subnets.join("10.244.9.0-24"),
        subnets.join("10.244.5.0-24"),
    ]);
    nix::unistd::mkfifo(
        &subnets.join("10.244.9.0-24"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    std::fs::create_dir(subnets.join("10.244.8.0-24")).unwrap();
    // A symlink to a well-formed lease file: still not a regular file of
    // the store (it could as well point at a FIFO or /dev/zero).
    symlink(store.lease_path(&good.key), subnets.join("10.244.7.0-24")).unwrap();
    // A regular file far larger than any lease record.
    std::fs::write(subnets.join("10.244.6.0-24"), vec![b' '; 2 << 20]).unwrap();

    let bound = Duration::from_secs(5);
    let snap = timeout(bound, store.list_leases())
        .await
        .expect("list_leases must not block on a FIFO")
        .unwrap();
    assert_eq!(snap.leases, vec![good.clone()]);

    let mut rx = timeout(bound, store.watch_leases())
        .await
        .expect("the watch must start despite a FIFO")
        .unwrap();
    match timeout(bound, rx.recv()).await.expect("a snapshot") {
        Some(flannel_store::WatchEvent::Snapshot(s)) => assert_eq!(s.leases, vec![good.clone()]),
        other => panic!("expected a snapshot, got {other:?}"),
    }
    // A FIFO appearing while the watch runs, then a real lease: the watch
    // thread reads past the FIFO and delivers the lease.
    nix::unistd::mkfifo(
        &subnets.join("10.244.5.0-24"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let second = store
        .create_lease(&lease("10.244.2.0-24", 2), None)
        .await
        .unwrap()
        .unwrap();
    let got = timeout(bound, async {
        loop {
            match rx.recv().await {
                Some(flannel_store::WatchEvent::Events { events, .. }) => {
                    if events.contains(&flannel_core::lease::LeaseEvent::Upsert(second.clone())) {
                        return;
                    }
                }
                Some(_) => {}
                None => panic!("watch closed"),
            }
        }
    })
    .await;
    assert!(got.is_ok(), "the watch thread is stuck on the FIFO");
    // Writers (which garbage-collect under the lock) are not stuck either,
    // and never remove what is not a lease file of theirs.
    timeout(bound, store.delete_lease(&second.key))
        .await
        .expect("delete must not block on a FIFO")
        .unwrap();
    assert!(subnets.join("10.244.9.0-24").exists());
    assert!(subnets.join("10.244.8.0-24").is_dir());
}

#[tokio::test]
async fn import_writes_many_leases_as_they_are() {
    let dir = TempDir::new("import");
    let store = LocalStore::open(dir.path()).unwrap();
    let rev = store.list_leases().await.unwrap().revision;
    let later = SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000);
    let mut leases: Vec<Lease> = (1..=200u8)
        .map(|i| lease(&format!("10.{i}.0.0-24"), i))
        .collect();
    leases[0].expiration = Some(later);
    store.import(leases.clone(), true).await.unwrap();
    let mut got = store.list_leases().await.unwrap();
    got.leases.sort_by_key(|l| l.key);
    leases.sort_by_key(|l| l.key);
    assert_eq!(got.leases, leases, "every lease, expiration included");
    assert_eq!(got.revision, rev + 1, "one revision bump for all");
    // No temp file left; an import over existing keys replaces them.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("subnets"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    let mut again = lease("10.1.0.0-24", 9);
    again.expiration = None;
    store.import(vec![again.clone()], false).await.unwrap();
    let list = store.list_leases().await.unwrap();
    assert!(list.leases.contains(&again));
    assert_eq!(list.leases.len(), 200);
    assert_eq!(
        list.revision,
        rev + 1,
        "a throwaway import leaves the revision"
    );
}
