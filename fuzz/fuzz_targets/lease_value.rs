//! Lease values: etcd values (upstream's `LeaseAttrs` JSON) and the local
//! store's lease files (`{"LeaseAttrs":{...},"ExpiresUnixMs":...}`).
//!
//! Asserts: what parses is a JSON object; it encodes and parses back to the
//! same value, and its encoding is stable (encode, parse, encode gives the
//! same text); `BackendData` is kept byte for byte; the backend data
//! accessors (vxlan, wireguard) never panic and agree with a direct parse.
#![no_main]

use flannel_core::lease::{LeaseAttrs, LeaseRecord, VxlanBackendData};
use flannel_core::wireguard::WireguardBackendData;
use libfuzzer_sys::fuzz_target;

fn check_attrs(a: &LeaseAttrs) {
    let json = a.to_json();
    let back = LeaseAttrs::from_json(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
    assert_eq!(&back, a, "{json}");
    assert_eq!(back.to_json(), json);
    if let Some(d) = &a.backend_data {
        assert!(
            json.contains(d.as_json()),
            "BackendData not kept as read: {json}"
        );
        assert_eq!(a.vxlan_data(), d.parse::<VxlanBackendData>());
        let _ = d.parse::<WireguardBackendData>();
    }
    if let Some(d) = &a.backend_v6_data {
        assert_eq!(a.vxlan_v6_data(), d.parse::<VxlanBackendData>());
    }
    let _ = a.effective_backend_type();
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(a) = LeaseAttrs::from_json(text) {
            assert!(
                text.trim_start().starts_with('{'),
                "not an object: {text:?}"
            );
            check_attrs(&a);
        }
    }
    if let Ok(r) = LeaseRecord::from_json(data) {
        let text = String::from_utf8_lossy(data);
        assert!(
            text.trim_start().starts_with('{'),
            "not an object: {text:?}"
        );
        check_attrs(&r.attrs);
        let json = r.to_json();
        let back = LeaseRecord::from_json(&json).expect("an encoded record parses");
        assert_eq!(back, r);
        assert_eq!(back.to_json(), json);
        assert_eq!(
            r.expiration().map(flannel_core::lease::to_unix_ms),
            r.expires_unix_ms
        );
    }
});
