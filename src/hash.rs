//! Content names: blake3 hashes of chunks and tree nodes.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The subtrees [`Hash::of_chunk_pair`] hashes apart: 16 blake3 chunks, the
/// most one pass of its widest SIMD takes (AVX-512; AVX2 takes 8), so that
/// hashing a chunk in these pieces costs what hashing it whole does.
const PAIR_SUBTREE_BYTES: usize = 16 * blake3::CHUNK_LEN;

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

    /// The names of two chunks of one length that share most of their
    /// bytes (a chunk and the same chunk with a few blocks rewritten), for
    /// little more than the cost of naming one: blake3 names a chunk from
    /// the chaining values of its 16 KiB subtrees, so `b`'s are hashed only
    /// where its bytes differ from `a`'s (found by comparing them, whatever
    /// the caller believes changed). Only lengths whose blake3 tree is a
    /// perfect binary tree over such subtrees are taken apart: powers of
    /// two from 32 KiB (ferry's chunk sizes from 32 KiB up, the default
    /// 64 KiB among them); others are hashed whole. Callers must not hash
    /// an all-zero chunk.
    pub fn of_chunk_pair(a: &[u8], b: &[u8]) -> (Hash, Hash) {
        use blake3::hazmat::{HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root};
        let len = a.len();
        if len != b.len() || !len.is_power_of_two() || len < 2 * PAIR_SUBTREE_BYTES {
            return (Hash::of_chunk(a), Hash::of_chunk(b));
        }
        let subtree = |data: &[u8], at: usize| {
            blake3::Hasher::new()
                .set_input_offset(at as u64)
                .update(&data[at..at + PAIR_SUBTREE_BYTES])
                .finalize_non_root()
        };
        let (mut cvs_a, mut cvs_b) = (Vec::new(), Vec::new());
        for at in (0..len).step_by(PAIR_SUBTREE_BYTES) {
            let cv = subtree(a, at);
            let same = a[at..at + PAIR_SUBTREE_BYTES] == b[at..at + PAIR_SUBTREE_BYTES];
            cvs_b.push(if same { cv } else { subtree(b, at) });
            cvs_a.push(cv);
        }
        // Up the tree: a power of two of subtrees, merged pairwise, the
        // last merge as the root.
        let root = |mut cvs: Vec<blake3::hazmat::ChainingValue>| {
            while cvs.len() > 2 {
                cvs = cvs
                    .chunks_exact(2)
                    .map(|p| merge_subtrees_non_root(&p[0], &p[1], Mode::Hash))
                    .collect();
            }
            Hash(*merge_subtrees_root(&cvs[0], &cvs[1], Mode::Hash).as_bytes())
        };
        (root(cvs_a), root(cvs_b))
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
    fn a_pair_of_chunks_is_named_as_blake3_names_each_whatever_they_share() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Split into subtrees (32 KiB and up, powers of two) and hashed whole
        // (the rest), with nothing, one block, a block across two subtrees,
        // or everything different.
        for len in [65536, 32768, 131072, 16384, 49152, 65535, 4096, 1] {
            let a: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let mut patches: Vec<Vec<u8>> = vec![a.clone()];
            let mut one = a.clone();
            let at = rng.random_range(0..len);
            one[at] ^= 1;
            patches.push(one);
            if len > 16384 {
                let mut across = a.clone();
                across[16383..16385].copy_from_slice(&[1, 2]);
                patches.push(across);
            }
            patches.push((0..len).map(|_| rng.random()).collect());
            for b in patches {
                let (ha, hb) = Hash::of_chunk_pair(&a, &b);
                assert_eq!(ha, Hash::of_chunk(&a), "len {len}");
                assert_eq!(hb, Hash::of_chunk(&b), "len {len}");
                assert_eq!(Hash::of_chunk_pair(&b, &a), (hb, ha), "len {len}");
            }
        }
        // Different lengths are named each on its own.
        let (a, b) = (vec![1u8; 65536], vec![1u8; 32768]);
        assert_eq!(
            Hash::of_chunk_pair(&a, &b),
            (Hash::of_chunk(&a), Hash::of_chunk(&b))
        );
    }

    #[test]
    fn hex_round_trips() {
        let h = Hash::of_chunk(b"abc");
        assert_eq!(Hash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(Hash::from_hex("zz"), None);
    }
}
