//! How a chunk is laid out in the store and on the wire: a one-byte codec tag,
//! the uncompressed length, then the payload (zstd, or raw when zstd does not pay).
//!
//! The store also keeps some chunks as deltas (a tag never accepted from
//! the wire): the name of a base chunk the store holds whole, the 4 KiB
//! blocks that differ from it, and those blocks as an encoded chunk.

use super::StoreError;
use crate::hash::Hash;

/// The largest chunk ferry handles (DESIGN: chunk sizes 4 KiB to 4 MiB).
pub const CHUNK_BYTES_MAX: usize = 4 << 20;

const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;
/// Store only: `[tag][len u32][base 32][count u32][count x block u32][blocks, encoded]`.
const CODEC_DELTA: u8 = 2;
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

/// One zstd frame of `data` at `level` (its content size in the header),
/// with this thread's compression context: creating a context per call
/// costs as much as compressing a small chunk.
pub fn compress_frame(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((at, comp)) = c.as_mut()
            && *at != level
        {
            if comp.set_compression_level(level).is_ok() {
                *at = level;
            } else {
                *c = None;
            }
        }
        if c.is_none() {
            *c = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        match c.as_mut() {
            Some((_, comp)) => comp.compress(data),
            None => zstd::bulk::compress(data, level),
        }
    })
}

/// Decompresses one zstd frame of at most `max` bytes, with this thread's
/// context. The buffer is the size the frame's header declares (checked
/// against `max` first), not `max`: a batch limit of tens of MiB allocated
/// for every batch of a few records cost a fresh mapping and its page
/// faults each time. A frame that declares less than it holds fails; one
/// without a declared size gets `max`.
pub fn decompress_frame(data: &[u8], max: usize) -> std::io::Result<Vec<u8>> {
    let cap = match zstd::zstd_safe::get_frame_content_size(data) {
        Ok(Some(n)) if n > max as u64 => {
            return Err(std::io::Error::other(format!(
                "the frame declares {n} bytes, over the {max}-byte limit"
            )));
        }
        Ok(Some(n)) => n as usize,
        _ => max,
    };
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        let mut out = match d.as_mut() {
            Some(d) => d.decompress(data, cap),
            None => zstd::bulk::decompress(data, cap),
        }?;
        // Sized by the limit (no declared size): keep only what it holds.
        if out.capacity() > out.len().saturating_mul(2) {
            out.shrink_to_fit();
        }
        Ok(out)
    })
}

/// Encodes chunk bytes for storage or transfer: zstd when it saves at least
/// 1/32 of the size, raw otherwise (random data would only cost CPU on read).
pub fn encode_chunk(data: &[u8]) -> Vec<u8> {
    encode_chunk_at(data, ZSTD_LEVEL)
}

/// As [`encode_chunk`], at zstd `level` (a pass adapts it to whether the
/// link or the cores hold it back). Any level decodes the same way.
/// A chunk that [`looks_incompressible`] is stored raw without trying zstd.
pub fn encode_chunk_at(data: &[u8], level: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + data.len());
    out.push(CODEC_RAW);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    if !looks_incompressible(data) {
        let compressed = compress_frame(data, level);
        if let Ok(compressed) = compressed
            && compressed.len() + data.len() / 32 < data.len()
        {
            out[0] = CODEC_ZSTD;
            out.extend_from_slice(&compressed);
            return out;
        }
    }
    out.extend_from_slice(data);
    out
}

/// Samples [`looks_incompressible`] takes, evenly spaced, and their bytes.
const SAMPLES: usize = 256;
const SAMPLE_BYTES: usize = 16;
/// Bits per byte of the sample's byte histogram at or above which a chunk
/// is taken as incompressible. zstd stores a chunk only when it saves a
/// thirty-second of it (above); order-0 coding cannot save that at 7.76
/// bits per byte or more, and a sample of 4,096 bytes of random data
/// measures about 7.955 (the estimate is biased low by about 0.045).
const INCOMPRESSIBLE_BITS: f64 = 7.85;

/// Whether zstd would not pay on `data`, judged cheaply from a sample (as
/// btrfs' compression heuristic does): a chunk of random or already
/// compressed bytes (encrypted files, media, archives) cost a seed the
/// whole of zstd's match search for nothing, 16 % of the primary's CPU on
/// a random image. Two signs say it might pay and leave the choice to
/// zstd: a byte histogram of the sample below [`INCOMPRESSIBLE_BITS`]
/// (what entropy coding saves), or two equal samples (repeats that
/// matches find: duplicated blocks land on equal offsets in them). A
/// chunk too small for a full sample is always tried. What it misses: a
/// random block repeated at a period that is no multiple of the sample's
/// spacing (256 bytes in a 64 KiB chunk) is stored raw though zstd would
/// shrink it; image data repeats in whole file system blocks.
pub fn looks_incompressible(data: &[u8]) -> bool {
    let stride = data.len() / SAMPLES;
    if stride < SAMPLE_BYTES {
        return false;
    }
    let mut hist = [0u32; 256];
    let mut samples = [0u128; SAMPLES];
    for (i, s) in samples.iter_mut().enumerate() {
        let at = i * stride;
        let mut b = [0u8; SAMPLE_BYTES];
        b.copy_from_slice(&data[at..at + SAMPLE_BYTES]);
        for &x in &b {
            hist[x as usize] += 1;
        }
        *s = u128::from_le_bytes(b);
    }
    let n = (SAMPLES * SAMPLE_BYTES) as f64;
    let bits: f64 = hist
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    if bits < INCOMPRESSIBLE_BITS {
        return false;
    }
    samples.sort_unstable();
    samples.windows(2).all(|w| w[0] != w[1])
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
            let data =
                decompress_frame(payload, len).map_err(|e| DecodeError::Zstd(e.to_string()))?;
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

/// As [`decode_chunk`] with the name checked, as a [`CheckedChunk`]: a store
/// keeps it without hashing its bytes again.
pub fn decode_checked(
    record: &[u8],
    len_max: usize,
    hash: &Hash,
) -> Result<CheckedChunk, DecodeError> {
    let data = decode_chunk(record, len_max, Some(hash))?;
    Ok(CheckedChunk {
        hash: *hash,
        data: std::sync::Arc::new(data),
    })
}

/// A chunk's bytes and the name they were checked against. Only checking
/// makes one ([`CheckedChunk::check`], [`decode_checked`]): what a store
/// may keep under that name without hashing the bytes again.
#[derive(Clone, Debug)]
pub struct CheckedChunk {
    hash: Hash,
    data: std::sync::Arc<Vec<u8>>,
}

impl CheckedChunk {
    /// `data` named `hash`, or `None` when blake3 says otherwise.
    pub fn check(hash: Hash, data: Vec<u8>) -> Option<CheckedChunk> {
        (Hash::of_chunk(&data) == hash).then(|| CheckedChunk {
            hash,
            data: std::sync::Arc::new(data),
        })
    }

    /// `data` checked against `hash` as [`CheckedChunk::check`] does, and
    /// the name of `other`, bytes of the same length that `data` mostly
    /// shares (what it was rebuilt over), for little more than the cost of
    /// one name ([`Hash::of_chunk_pair`]).
    pub fn check_with(hash: Hash, data: Vec<u8>, other: &[u8]) -> (Option<CheckedChunk>, Hash) {
        let (name, other_name) = Hash::of_chunk_pair(&data, other);
        let chunk = (name == hash).then(|| CheckedChunk {
            hash,
            data: std::sync::Arc::new(data),
        });
        (chunk, other_name)
    }

    pub fn hash(&self) -> Hash {
        self.hash
    }

    pub fn data(&self) -> &std::sync::Arc<Vec<u8>> {
        &self.data
    }
}

/// A stored delta: `base` (all zeros: a hole) with `blocks` replaced by
/// the bytes `blocks_record` decodes to.
#[derive(Debug, PartialEq)]
pub struct StoredDelta<'a> {
    pub len: usize,
    pub base: Hash,
    pub blocks: Vec<u32>,
    pub blocks_record: &'a [u8],
}

/// A store record for chunk bytes `len` long, kept as `blocks` over `base`,
/// with `blocks_record` the listed blocks encoded by [`encode_chunk`].
pub fn encode_delta(len: usize, base: &Hash, blocks: &[u32], blocks_record: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 36 + 4 * blocks.len() + blocks_record.len());
    out.push(CODEC_DELTA);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&base.0);
    out.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
    for b in blocks {
        out.extend_from_slice(&b.to_le_bytes());
    }
    out.extend_from_slice(blocks_record);
    out
}

/// The delta a store record holds; `None` when it holds the chunk whole.
/// Every length is checked against the record before anything is allocated.
pub fn parse_delta(record: &[u8]) -> Result<Option<StoredDelta<'_>>, DecodeError> {
    if record.first() != Some(&CODEC_DELTA) {
        return Ok(None);
    }
    let fixed = HEADER + 32 + 4;
    if record.len() < fixed {
        return Err(DecodeError::Truncated);
    }
    let len = u32::from_le_bytes([record[1], record[2], record[3], record[4]]) as usize;
    if len > CHUNK_BYTES_MAX {
        return Err(DecodeError::TooLarge {
            len,
            max: CHUNK_BYTES_MAX,
        });
    }
    let mut base = [0u8; 32];
    base.copy_from_slice(&record[HEADER..HEADER + 32]);
    let count = u32::from_le_bytes([
        record[HEADER + 32],
        record[HEADER + 33],
        record[HEADER + 34],
        record[HEADER + 35],
    ]) as usize;
    let blocks_end = count
        .checked_mul(4)
        .and_then(|n| n.checked_add(fixed))
        .filter(|&e| e <= record.len() && count <= len.div_ceil(crate::volume::delta::BLOCK_BYTES))
        .ok_or(DecodeError::Truncated)?;
    let blocks = record[fixed..blocks_end]
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(Some(StoredDelta {
        len,
        base: Hash(base),
        blocks,
        blocks_record: &record[blocks_end..],
    }))
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

    /// Random bytes are stored raw without zstd being tried; text, a chunk
    /// partly zero, and random blocks repeated within the chunk are left to
    /// zstd, which compresses each; a chunk too small to sample is tried.
    #[test]
    fn a_chunk_of_random_bytes_skips_zstd_and_compressible_ones_do_not() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect()
        };
        for size in [4096, 65536, 1 << 20] {
            let r = random(size);
            assert!(looks_incompressible(&r), "random, {size} bytes");
            let enc = encode_chunk(&r);
            assert_eq!(enc[0], CODEC_RAW);
            assert_eq!(
                decode_chunk(&enc, size, Some(&Hash::of_chunk(&r))).unwrap(),
                r
            );
        }
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog, 0123456789. "
            .iter()
            .copied()
            .cycle()
            .zip(random(65536))
            .map(|(t, r)| if r < 8 { r } else { t })
            .collect();
        let mut partly_zero = random(65536);
        partly_zero[..8192].fill(0);
        let block = random(4096);
        let repeated: Vec<u8> = block.iter().copied().cycle().take(65536).collect();
        let mut two_halves = random(32768);
        two_halves.extend_from_within(..);
        for (what, data) in [
            ("text", &text),
            ("partly zero", &partly_zero),
            ("a 4 KiB block repeated", &repeated),
            ("two equal halves", &two_halves),
        ] {
            assert!(!looks_incompressible(data), "{what}");
            let enc = encode_chunk(data);
            assert_eq!(enc[0], CODEC_ZSTD, "{what}");
            assert!(enc.len() < data.len() * 15 / 16, "{what}: {}", enc.len());
        }
        assert!(!looks_incompressible(&random(4095)));
        // What the sample misses: a random block repeated at a period that
        // is not a multiple of the sample's spacing compresses, but its
        // pieces all differ. Stored raw; such chunks are rare in images.
        let period = random(3000);
        let periodic: Vec<u8> = period.iter().copied().cycle().take(65536).collect();
        assert!(looks_incompressible(&periodic));
        assert_eq!(encode_chunk(&periodic)[0], CODEC_RAW, "zstd is not tried");
    }

    /// A frame is decompressed into the size its header declares, refused
    /// when that is over the limit; one that declares no size gets the
    /// limit; one that holds more than it declares fails.
    #[test]
    fn a_frame_decompresses_into_its_declared_size_within_the_limit() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let f = compress_frame(&data, 1).unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&f).unwrap(),
            Some(data.len() as u64)
        );
        let out = decompress_frame(&f, 1 << 30).unwrap();
        assert_eq!(out, data);
        assert_eq!(
            out.capacity(),
            data.len(),
            "sized by the header, not the limit"
        );
        let e = decompress_frame(&f, data.len() - 1).unwrap_err();
        assert!(e.to_string().contains("over the"), "{e}");
        // No declared size (a streaming encoder): bounded by the limit.
        let streamed = zstd::stream::encode_all(&data[..], 1).unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&streamed).unwrap(),
            None
        );
        let out = decompress_frame(&streamed, 1 << 24).unwrap();
        assert_eq!(out, data);
        assert!(out.capacity() < 2 * data.len(), "{}", out.capacity());
        assert!(decompress_frame(&streamed, data.len() - 1).is_err());
        // A header that declares less than the frame holds.
        let mut lying = f.clone();
        let fcs = (data.len() as u32 - 1).to_le_bytes();
        let at = lying
            .windows(4)
            .position(|w| w == (data.len() as u32).to_le_bytes())
            .unwrap();
        lying[at..at + 4].copy_from_slice(&fcs);
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&lying).unwrap(),
            Some(data.len() as u64 - 1)
        );
        assert!(decompress_frame(&lying, 1 << 30).is_err());
    }

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
    fn a_delta_record_is_parsed_with_every_length_checked_and_never_decodes_as_a_chunk() {
        let base = Hash::of_chunk(b"base");
        let inner = encode_chunk(&[9u8; 8192]);
        let rec = encode_delta(65536, &base, &[3, 7], &inner);
        let d = parse_delta(&rec).unwrap().unwrap();
        assert_eq!(
            (d.len, d.base, &d.blocks[..]),
            (65536, base, &[3u32, 7][..])
        );
        assert_eq!(d.blocks_record, &inner[..]);
        assert_eq!(parse_delta(&encode_chunk(b"whole")).unwrap(), None);
        // The wire's decoder knows no deltas.
        assert_eq!(
            decode_chunk(&rec, 65536, None),
            Err(DecodeError::UnknownCodec(CODEC_DELTA))
        );
        for cut in [1, 5, 40, 44] {
            assert!(parse_delta(&rec[..cut]).is_err(), "cut at {cut}");
        }
        let mut lying = rec.clone();
        lying[37..41].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_delta(&lying), Err(DecodeError::Truncated));
        let mut more = rec.clone();
        more[37..41].copy_from_slice(&17u32.to_le_bytes());
        more.extend_from_slice(&[0u8; 64]);
        assert!(
            parse_delta(&more).is_err(),
            "more blocks than the chunk has"
        );
        let mut huge = rec;
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            parse_delta(&huge),
            Err(DecodeError::TooLarge { .. })
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
