//! Content names: blake3 hashes of chunks and tree nodes.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A 32-byte blake3 digest naming a chunk or a tree node.
///
/// `Hash::ZERO` is reserved for all-zero chunks: they are never hashed,
/// stored or sent, so no real content can be named by it (a blake3 output of
/// all zeros is not a practical concern).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    pub const ZERO: Hash = Hash([0u8; 32]);

    /// Names a chunk's bytes. Callers must not hash an all-zero chunk.
    pub fn of_chunk(data: &[u8]) -> Hash {
        Hash(*blake3::hash(data).as_bytes())
    }

    pub fn is_zero(&self) -> bool {
        *self == Hash::ZERO
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Hash> {
        let bytes = hex::decode(s).ok()?;
        Some(Hash(bytes.try_into().ok()?))
    }

    /// The first 12 hex digits: enough for an operator to tell points apart.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.short())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Hex in human-readable formats (JSON for operators), 32 raw bytes on the wire.
impl Serialize for Hash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_hex())
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            Hash::from_hex(&s).ok_or_else(|| serde::de::Error::custom("a hash is 64 hex digits"))
        } else {
            <[u8; 32]>::deserialize(d).map(Hash)
        }
    }
}

/// True when every byte is zero; such chunks are holes, not content.
pub fn is_all_zero(data: &[u8]) -> bool {
    // Compare in u128 words where aligned: this runs over every byte read.
    let (head, body, tail) = unsafe { data.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_sees_a_single_set_byte_anywhere() {
        let mut buf = vec![0u8; 4099];
        assert!(is_all_zero(&buf));
        for i in [0, 1, 17, 2048, 4098] {
            buf[i] = 1;
            assert!(!is_all_zero(&buf), "byte {i}");
            buf[i] = 0;
        }
    }

    #[test]
    fn json_shows_hex_and_the_wire_carries_bytes() {
        let h = Hash::of_chunk(b"abc");
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"{}\"", h.to_hex()));
        assert_eq!(serde_json::from_str::<Hash>(&json).unwrap(), h);
        let wire = postcard::to_stdvec(&h).unwrap();
        assert_eq!(wire.len(), 32);
        assert_eq!(postcard::from_bytes::<Hash>(&wire).unwrap(), h);
    }

    #[test]
    fn hex_round_trips() {
        let h = Hash::of_chunk(b"abc");
        assert_eq!(Hash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(Hash::from_hex("zz"), None);
    }
}
