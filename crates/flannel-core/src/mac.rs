//! Ethernet (MAC) addresses, serialised as upstream does: `"26:62:24:f0:61:01"`.

use std::fmt;
use std::str::FromStr;

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

/// A string that is not `xx:xx:xx:xx:xx:xx`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid MAC address {0:?}: expected six hex octets separated by ':'")]
pub struct ParseMacError(pub String);

impl MacAddr {
    /// A random locally administered unicast address (as the kernel's `eth_random_addr`).
    pub fn random<R: rand::Rng + ?Sized>(rng: &mut R) -> Self {
        let mut b = [0u8; 6];
        rng.fill(&mut b);
        b[0] = (b[0] & 0xfe) | 0x02;
        MacAddr(b)
    }
    /// The six octets.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = ParseMacError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in out.iter_mut() {
            let p = parts.next().ok_or_else(|| ParseMacError(s.into()))?;
            if p.len() != 2 {
                return Err(ParseMacError(s.into()));
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| ParseMacError(s.into()))?;
        }
        if parts.next().is_some() {
            return Err(ParseMacError(s.into()));
        }
        Ok(MacAddr(out))
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m: MacAddr = "26:62:24:f0:61:01".parse().unwrap();
        assert_eq!(m.to_string(), "26:62:24:f0:61:01");
        assert!("26:62:24:f0:61".parse::<MacAddr>().is_err());
        assert!("26:62:24:f0:61:01:02".parse::<MacAddr>().is_err());
        assert!("zz:62:24:f0:61:01".parse::<MacAddr>().is_err());
    }

    #[test]
    fn random_is_local_unicast() {
        let mut rng = rand::rng();
        for _ in 0..100 {
            let m = MacAddr::random(&mut rng);
            assert_eq!(m.0[0] & 0x01, 0);
            assert_eq!(m.0[0] & 0x02, 0x02);
        }
    }
}
