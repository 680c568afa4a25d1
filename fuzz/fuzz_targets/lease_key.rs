//! Lease keys: etcd keys under `.../subnets/` and the local store's file
//! names (`10.244.1.0-24`, `10.244.1.0-24&fd00:10:244:1::-64`).
//!
//! Asserts: a key that parses is in canonical form (its `Display` gives the
//! input back, so one subnet has one store key and a renew or delete hits
//! the key that was read; the one exception is an IPv6-only key written
//! without `0.0.0.0-0&`), names at least one subnet, has no host bits, and
//! goes through serde (JSON string) unchanged.
#![no_main]

use flannel_core::lease::LeaseKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(key) = s.parse::<LeaseKey>() else {
        return;
    };
    assert!(!key.is_empty(), "{s:?} parsed to an empty key");
    if let Some(n) = key.ipv4 {
        assert_eq!(n, n.trunc(), "{s:?}: IPv4 host bits");
    }
    if let Some(n) = key.ipv6 {
        assert_eq!(n, n.trunc(), "{s:?}: IPv6 host bits");
    }
    let shown = key.to_string();
    // The one other spelling accepted: an IPv6-only key without its
    // `0.0.0.0-0&` part.
    let bare_v6 = key.ipv4.is_none() && shown.strip_prefix("0.0.0.0-0&") == Some(s);
    assert!(
        shown == s || bare_v6,
        "{s:?} is accepted but is not the canonical key {shown:?}"
    );
    assert_eq!(shown.parse::<LeaseKey>().as_ref(), Ok(&key));
    let json = serde_json::to_string(&key).expect("a key serialises");
    let back: LeaseKey = serde_json::from_str(&json).expect("its JSON parses");
    assert_eq!(back, key);
});
