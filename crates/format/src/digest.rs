//! Content digests (SHA-256) and their text form `sha256:<64 hex>`, as OCI writes them.
//!
//! Owns: the digest value type, streaming hashing, and the stack chain digest that binds a layer
//! to the exact stack below it. Does not own: deciding what bytes get hashed (the callers do).

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The all-zero digest, used as "no parent" for a base layer.
    pub const ZERO: Digest = Digest([0; 32]);

    /// SHA-256 of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 32]
    }

    /// Lower-case hex, without the `sha256:` prefix (used for file names).
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from_digit(u32::from(b >> 4), 16).expect("nibble"));
            s.push(char::from_digit(u32::from(b & 15), 16).expect("nibble"));
        }
        s
    }

    /// The first 12 hex digits, for human output.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

/// Why a digest string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid digest {0:?}: expected sha256: followed by 64 lower-case hex digits")]
pub struct DigestParseError(pub String);

impl FromStr for Digest {
    type Err = DigestParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DigestParseError(s.to_string());
        let hex = s.strip_prefix("sha256:").unwrap_or(s);
        if hex.len() != 64 {
            return Err(err());
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let nib = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            out[i] = (nib(pair[0]).ok_or_else(err)? << 4) | nib(pair[1]).ok_or_else(err)?;
        }
        Ok(Digest(out))
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An incremental SHA-256 over everything written through it.
#[derive(Clone, Default)]
pub struct Sha256Stream(Sha256);

impl Sha256Stream {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

/// The chain digest of a stack: `ZERO` for the empty stack, and for a stack `S + L`,
/// `sha256(chain(S) || digest(L))`. A layer records the chain digest of the stack it was made
/// on, so it cannot be stacked on any other base.
pub fn chain_digest<'a>(layers: impl IntoIterator<Item = &'a Digest>) -> Digest {
    layers.into_iter().fold(Digest::ZERO, |chain, layer| {
        let mut h = Sha256::new();
        h.update(chain.0);
        h.update(layer.0);
        Digest(h.finalize().into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips() {
        let d = Digest::of(b"abc");
        assert_eq!(d.to_string(), "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn rejects_bad_text() {
        for bad in ["", "sha256:", "sha256:zz", &format!("sha256:{}", "A".repeat(64))] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn chain_depends_on_order() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        assert_eq!(chain_digest([]), Digest::ZERO);
        assert_ne!(chain_digest([&a, &b]), chain_digest([&b, &a]));
        assert_ne!(chain_digest([&a]), chain_digest([&a, &a]));
    }
}
