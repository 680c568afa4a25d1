//! A lease file of flannel-rs's local store (`DIR/subnets/<lease key>`):
//! `{"LeaseAttrs":{...upstream's lease value...},"ExpiresUnixMs":<ms or null>}`.
//! The store itself (files, locks, the watch) is flannel-store's; the
//! encoding lives here so that it is tested and fuzzed without it.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize};

use super::{object_only, LeaseAttrs};

/// One lease file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct LeaseRecord {
    /// Upstream's lease value, byte for byte.
    #[serde(rename = "LeaseAttrs")]
    pub attrs: LeaseAttrs,
    /// The expiration in milliseconds since the Unix epoch; `None` (`null`
    /// or absent) for a reservation.
    #[serde(rename = "ExpiresUnixMs", default)]
    pub expires_unix_ms: Option<u64>,
}

object_only!(
    LeaseRecord,
    "a lease record: a JSON object like {\"LeaseAttrs\":{...},\"ExpiresUnixMs\":<ms or null>}"
);

impl LeaseRecord {
    /// The record of `attrs` expiring at `expiration` (`None`: a reservation),
    /// at the file's millisecond precision.
    pub fn new(attrs: LeaseAttrs, expiration: Option<SystemTime>) -> Self {
        LeaseRecord {
            attrs,
            expires_unix_ms: expiration.map(to_unix_ms),
        }
    }

    /// The expiration as a time.
    pub fn expiration(&self) -> Option<SystemTime> {
        self.expires_unix_ms.map(from_unix_ms)
    }

    /// Parses a lease file's content.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The file's content: the JSON record and a newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec(self).expect("a lease record serialises");
        json.push(b'\n');
        json
    }
}

impl fmt::Display for LeaseRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.to_json()))
    }
}

/// Milliseconds since the Unix epoch, 0 before it, saturating.
pub fn to_unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64)
        .unwrap_or(0)
}

/// The time `ms` milliseconds after the Unix epoch.
pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOLDEN: &str = r#"{"LeaseAttrs":{"PublicIP":"172.16.1.14","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"26:62:24:f0:61:01"}},"ExpiresUnixMs":1764213406123}"#;

    #[test]
    fn golden_round_trip() {
        let r = LeaseRecord::from_json(GOLDEN.as_bytes()).unwrap();
        assert_eq!(r.expires_unix_ms, Some(1764213406123));
        assert_eq!(r.to_json(), format!("{GOLDEN}\n").into_bytes());
        let reservation = LeaseRecord::from_json(br#"{"LeaseAttrs":{"PublicIP":"172.16.1.14"}}"#);
        assert_eq!(reservation.unwrap().expiration(), None);
    }

    /// serde's derive reads a struct from a JSON array of its fields too;
    /// a lease file or value never is one (found by fuzz/lease_value).
    #[test]
    fn arrays_are_not_records_or_lease_values() {
        for bad in [
            r#"[{"PublicIP":"172.16.1.14"},1764213406123]"#,
            r#"{"LeaseAttrs":["172.16.1.14",null,"vxlan"],"ExpiresUnixMs":null}"#,
            r#"{"LeaseAttrs":[],"ExpiresUnixMs":null}"#,
        ] {
            let e = LeaseRecord::from_json(bad.as_bytes()).expect_err(bad);
            assert!(e.to_string().contains("JSON object"), "{bad}: {e}");
        }
        let e = serde_json::from_str::<LeaseAttrs>(r#"["172.16.1.14",null,"vxlan"]"#).unwrap_err();
        assert!(
            e.to_string().contains("a lease value: a JSON object"),
            "{e}"
        );
    }
}
