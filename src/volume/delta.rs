//! Sub-chunk deltas: when the DR side holds an older version of a chunk at the
//! same place, only the 4 KiB blocks that changed travel. The DR side rebuilds
//! the chunk from its base and verifies the result against the chunk's name
//! before storing it, so a wrong block hash can cost a resend, never data.

/// The granularity of a delta: the block size of file systems and databases.
pub const BLOCK_BYTES: usize = 4096;

/// A short name for one block, only to find the blocks that changed: 128
/// bits make an accidental match negligible, and the rebuilt chunk's name
/// (blake3) catches one anyway, so it need not resist a crafted collision
/// (which can only make a chunk travel whole). XXH3-128 costs a small part
/// of blake3 on a 4 KiB block, which blake3 hashes at half its speed.
pub type BlockHash = [u8; 16];

pub fn block_hashes(data: &[u8]) -> Vec<BlockHash> {
    data.chunks(BLOCK_BYTES)
        .map(|b| xxhash_rust::xxh3::xxh3_128(b).to_le_bytes())
        .collect()
}

/// Indices of the blocks of `new` whose hash differs from `base`'s; `None`
/// when the shapes differ and a delta cannot apply.
pub fn changed_blocks(new: &[u8], base: &[BlockHash]) -> Option<Vec<u32>> {
    let mine = block_hashes(new);
    if mine.len() != base.len() {
        return None;
    }
    Some(
        mine.iter()
            .zip(base)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i as u32)
            .collect(),
    )
}

/// Concatenates the listed blocks of `new`.
pub fn extract(new: &[u8], blocks: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks.len() * BLOCK_BYTES);
    for &b in blocks {
        let start = b as usize * BLOCK_BYTES;
        out.extend_from_slice(&new[start..(start + BLOCK_BYTES).min(new.len())]);
    }
    out
}

/// Rebuilds a chunk: `base` with the listed blocks replaced from `data`.
/// Every index and length is checked; a mismatch is an error, not a panic.
pub fn apply(base: &[u8], blocks: &[u32], data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = base.to_vec();
    let mut at = 0usize;
    let mut last: Option<u32> = None;
    for &b in blocks {
        if last.is_some_and(|l| b <= l) {
            return Err("block indices are not strictly increasing".into());
        }
        last = Some(b);
        let start = (b as usize)
            .checked_mul(BLOCK_BYTES)
            .filter(|&s| s < base.len())
            .ok_or("block index past the chunk")?;
        let end = (start + BLOCK_BYTES).min(base.len());
        let len = end - start;
        let src = data
            .get(at..at + len)
            .ok_or("delta data shorter than its blocks")?;
        out[start..end].copy_from_slice(src);
        at += len;
    }
    if at != data.len() {
        return Err("delta data longer than its blocks".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delta_rebuilds_the_new_chunk_from_the_old() {
        let base: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
        let mut new = base.clone();
        new[5000] ^= 1;
        new[65535] ^= 1;
        let blocks = changed_blocks(&new, &block_hashes(&base)).unwrap();
        assert_eq!(blocks, vec![1, 15]);
        let data = extract(&new, &blocks);
        assert_eq!(data.len(), 2 * BLOCK_BYTES);
        assert_eq!(apply(&base, &blocks, &data).unwrap(), new);
    }

    #[test]
    fn hostile_deltas_are_errors() {
        let base = vec![1u8; 8192];
        assert!(apply(&base, &[2], &[0u8; 4096]).is_err());
        assert!(apply(&base, &[1, 0], &[0u8; 8192]).is_err());
        assert!(apply(&base, &[0], &[0u8; 100]).is_err());
        assert!(apply(&base, &[0], &[0u8; 5000]).is_err());
        assert!(apply(&base, &[u32::MAX], &[]).is_err());
        assert!(changed_blocks(&[0u8; 4096], &block_hashes(&base)).is_none());
    }
}
