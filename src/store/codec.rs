//! How a chunk is laid out in the store and on the wire: a one-byte codec tag,
//! the uncompressed length, then the payload (zstd, or raw when zstd does not pay).

use super::StoreError;
use crate::hash::Hash;

/// The largest chunk ferry handles (DESIGN: chunk sizes 4 KiB to 4 MiB).
pub const CHUNK_BYTES_MAX: usize = 4 << 20;

const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const HEADER: usize = 5;
/// zstd level of the chunks the store encodes itself (rebuilt from a
/// delta at the DR site, read from an image for a point or a failover),
/// which the site pays for while a pass, an apply or a promotion waits: 1,
/// zstd's fastest regular level (level 3 took a fifth of the DR site's CPU
/// in a 1 % pass, for some 5 % fewer bytes). What a pass sends is stored
/// at the level it was sent at.
const ZSTD_LEVEL: i32 = 1;

thread_local! {
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
}

/// Encodes chunk bytes for storage or transfer: zstd when it saves at least
/// 1/32 of the size, raw otherwise (random data would only cost CPU on read).
pub fn encode_chunk(data: &[u8]) -> Vec<u8> {
    encode_chunk_at(data, ZSTD_LEVEL)
}

/// As [`encode_chunk`], at zstd `level` (a pass adapts it to whether the
/// link or the cores hold it back). Any level decodes the same way.
pub fn encode_chunk_at(data: &[u8], level: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + data.len());
    out.push(CODEC_RAW);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    // One compression context per thread: creating one per chunk costs as much as a small chunk.
    let compressed = COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        let mut stale = false;
        if let Some((at, comp)) = c.as_mut()
            && *at != level
        {
            if comp.set_compression_level(level).is_ok() {
                *at = level;
            } else {
                stale = true;
            }
        }
        if stale || c.is_none() {
            *c = zstd::bulk::Compressor::new(level)
                .ok()
                .map(|comp| (level, comp));
        }
        c.as_mut().map(|(_, c)| c.compress(data))
    });
    if let Some(Ok(compressed)) = compressed
        && compressed.len() + data.len() / 32 < data.len()
    {
        out[0] = CODEC_ZSTD;
        out.extend_from_slice(&compressed);
        return out;
    }
    out.extend_from_slice(data);
    out
}

/// Decodes an encoded chunk, refusing a declared size over `len_max` before
/// allocating, and verifies the bytes against `hash` when one is given.
pub fn decode_chunk(
    record: &[u8],
    len_max: usize,
    hash: Option<&Hash>,
) -> Result<Vec<u8>, DecodeError> {
    if record.len() < HEADER {
        return Err(DecodeError::Truncated);
    }
    let len = u32::from_le_bytes([record[1], record[2], record[3], record[4]]) as usize;
    if len > len_max || len > CHUNK_BYTES_MAX {
        return Err(DecodeError::TooLarge {
            len,
            max: len_max.min(CHUNK_BYTES_MAX),
        });
    }
    let payload = &record[HEADER..];
    let data = match record[0] {
        CODEC_RAW => {
            if payload.len() != len {
                return Err(DecodeError::LengthMismatch {
                    declared: len,
                    actual: payload.len(),
                });
            }
            payload.to_vec()
        }
        CODEC_ZSTD => {
            let data = DECOMPRESSOR
                .with(|d| {
                    let mut d = d.borrow_mut();
                    if d.is_none() {
                        *d = zstd::bulk::Decompressor::new().ok();
                    }
                    match d.as_mut() {
                        Some(d) => d.decompress(payload, len),
                        None => zstd::bulk::decompress(payload, len),
                    }
                })
                .map_err(|e| DecodeError::Zstd(e.to_string()))?;
            if data.len() != len {
                return Err(DecodeError::LengthMismatch {
                    declared: len,
                    actual: data.len(),
                });
            }
            data
        }
        other => return Err(DecodeError::UnknownCodec(other)),
    };
    if let Some(hash) = hash {
        let actual = Hash::of_chunk(&data);
        if actual != *hash {
            return Err(DecodeError::Mismatch {
                expected: *hash,
                actual,
            });
        }
    }
    Ok(data)
}

/// Why an encoded chunk could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("record shorter than its header")]
    Truncated,
    #[error("declared size {len} exceeds the limit {max}")]
    TooLarge { len: usize, max: usize },
    #[error("declared size {declared} but {actual} bytes")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("zstd: {0}")]
    Zstd(String),
    #[error("unknown codec tag {0}")]
    UnknownCodec(u8),
    #[error("content hash {actual} does not match name {expected}")]
    Mismatch { expected: Hash, actual: Hash },
}

impl DecodeError {
    pub fn into_store(self, hash: Hash) -> StoreError {
        match self {
            DecodeError::Mismatch { actual, .. } => StoreError::ChunkMismatch { hash, actual },
            other => StoreError::ChunkCorrupt {
                hash,
                reason: other.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_level_decodes_and_a_thread_switches_levels_freely() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 97) as u8).collect();
        let h = Hash::of_chunk(&data);
        let mut sizes = Vec::new();
        for level in [1, 9, 3, 19, 1] {
            let rec = encode_chunk_at(&data, level);
            assert_eq!(decode_chunk(&rec, 65536, Some(&h)).unwrap(), data);
            sizes.push(rec.len());
        }
        assert_eq!(
            sizes[0], sizes[4],
            "level 1 again after 19 gives level 1's bytes"
        );
    }

    #[test]
    fn compressible_chunks_shrink_and_random_ones_stay_raw() {
        let text = b"ferry ".repeat(10_000);
        let enc = encode_chunk(&text);
        assert_eq!(enc[0], CODEC_ZSTD);
        assert!(enc.len() < text.len() / 10);
        assert_eq!(
            decode_chunk(&enc, 1 << 20, Some(&Hash::of_chunk(&text))).unwrap(),
            text
        );

        let random: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let enc = encode_chunk(&random);
        assert_eq!(decode_chunk(&enc, 1 << 20, None).unwrap(), random);
    }

    #[test]
    fn a_zstd_bomb_is_refused_by_its_declared_size() {
        let big = vec![7u8; 2 << 20];
        let mut enc = encode_chunk(&big);
        assert_eq!(
            decode_chunk(&enc, 64 << 10, None),
            Err(DecodeError::TooLarge {
                len: 2 << 20,
                max: 64 << 10
            })
        );
        // Lying about the size: zstd must not write past the declared capacity.
        enc[1..5].copy_from_slice(&(1000u32).to_le_bytes());
        assert!(matches!(
            decode_chunk(&enc, 64 << 10, None),
            Err(DecodeError::Zstd(_))
        ));
    }

    #[test]
    fn a_wrong_name_is_an_error() {
        let enc = encode_chunk(b"hello");
        let wrong = Hash::of_chunk(b"world");
        assert!(matches!(
            decode_chunk(&enc, 100, Some(&wrong)),
            Err(DecodeError::Mismatch { .. })
        ));
    }
}
