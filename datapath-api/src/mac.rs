//! MAC addresses as `aa:bb:cc:dd:ee:ff` strings on the wire and in output.

use std::{fmt, str::FromStr};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a MAC address (expected aa:bb:cc:dd:ee:ff)")]
pub struct ParseMacError(String);

impl FromStr for MacAddr {
    type Err = ParseMacError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(|| ParseMacError(s.to_owned()))?;
            if part.len() != 2 {
                return Err(ParseMacError(s.to_owned()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| ParseMacError(s.to_owned()))?;
        }
        if parts.next().is_some() {
            return Err(ParseMacError(s.to_owned()));
        }
        Ok(MacAddr(out))
    }
}

impl TryFrom<&[u8]> for MacAddr {
    type Error = ParseMacError;
    fn try_from(b: &[u8]) -> Result<Self, Self::Error> {
        <[u8; 6]>::try_from(b).map(MacAddr).map_err(|_| ParseMacError(format!("{b:02x?}")))
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
    fn round_trips() {
        let m: MacAddr = "0a:1b:2c:3d:4e:5f".parse().unwrap();
        assert_eq!(m.to_string(), "0a:1b:2c:3d:4e:5f");
        assert!("0a:1b:2c:3d:4e".parse::<MacAddr>().is_err());
        assert!("0a:1b:2c:3d:4e:5f:00".parse::<MacAddr>().is_err());
        assert!("zz:1b:2c:3d:4e:5f".parse::<MacAddr>().is_err());
    }
}
