//! Which chunks of a continuous volume were written since its last scan,
//! and the names that scan gave every chunk: a resync reads and names only
//! the written chunks and takes the others' names from the last scan
//! (DRBD's bitmap does the same for its resyncs). The map lives in memory,
//! one bit per chunk (2 MiB for 1 TiB of 64 KiB chunks); the names live in
//! a file beside the journal, 32 bytes per chunk, read back only by a
//! resync.
//!
//! What makes a name from the last scan right: every write of the volume
//! goes through its export, which marks the chunks it touches under the
//! same lock as it writes the image, and the map starts empty at the
//! moment a scan starts (under that lock too). A chunk the map does not
//! mark is then as the scan read it, or as the scan before it read it, and
//! so on back to a full scan. A daemon that restarts starts with no map, so
//! its first resync reads everything: nothing says what a crash, or another
//! program while the daemon was down, left in the image; nor after a failed
//! fsync of the image, whose pages may read back as written and later as
//! the disk holds them.

use std::io::{Read, Write};
use std::path::Path;

use crate::hash::Hash;

/// One bit per chunk of the volume.
#[derive(Clone, Debug)]
pub struct DirtyMap {
    chunk_size: u64,
    chunks: u64,
    words: Vec<u64>,
    marked: u64,
}

impl DirtyMap {
    pub fn new(size: u64, chunk_size: u32) -> DirtyMap {
        let chunks = crate::store::tree::chunk_count(size, chunk_size);
        DirtyMap {
            chunk_size: u64::from(chunk_size.max(1)),
            chunks,
            words: vec![0; chunks.div_ceil(64) as usize],
            marked: 0,
        }
    }

    /// The chunks of the volume the map covers.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// The chunks marked.
    pub fn marked(&self) -> u64 {
        self.marked
    }

    /// Marks every chunk `[off, off + len)` touches (clipped to the volume).
    pub fn mark(&mut self, off: u64, len: u64) {
        if len == 0 || self.chunks == 0 {
            return;
        }
        let first = off / self.chunk_size;
        let last =
            (off.saturating_add(len - 1) / self.chunk_size).min(self.chunks.saturating_sub(1));
        let mut i = first;
        while i <= last {
            let (w, b) = ((i / 64) as usize, i % 64);
            // Whole words at once where the range covers them.
            if b == 0 && last - i >= 63 {
                self.marked += u64::from(64 - self.words[w].count_ones());
                self.words[w] = u64::MAX;
                i += 64;
                continue;
            }
            if self.words[w] & (1 << b) == 0 {
                self.words[w] |= 1 << b;
                self.marked += 1;
            }
            i += 1;
        }
    }

    pub fn is_marked(&self, chunk: u64) -> bool {
        chunk < self.chunks && self.words[(chunk / 64) as usize] & (1 << (chunk % 64)) != 0
    }

    /// The marked chunks as runs `[first, end)`, in order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (w, &word) in self.words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let i = w as u64 * 64 + b;
                match runs.last_mut() {
                    Some((_, end)) if *end == i => *end = i + 1,
                    _ => runs.push((i, i + 1)),
                }
            }
        }
        runs
    }
}

/// The file's first bytes, then the volume's size, its chunk size, and the
/// scan's token (which map it goes with); then 32 bytes per chunk.
const MAGIC: &[u8; 8] = b"ferryLV1";
const HEADER: usize = 8 + 8 + 4 + 8;

fn header(size: u64, chunk_size: u32, token: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&size.to_le_bytes());
    h[16..20].copy_from_slice(&chunk_size.to_le_bytes());
    h[20..].copy_from_slice(&token.to_le_bytes());
    h
}

/// Writes the names a scan gave every chunk, for the map `token` (in a
/// new file renamed over the old: a reader sees one scan's names or the
/// other's). No fsync: a restart trusts no map, so the file only matters
/// to this run of the daemon.
pub fn save_leaves(
    path: &Path,
    size: u64,
    chunk_size: u32,
    token: u64,
    leaves: &[Hash],
) -> std::io::Result<()> {
    // A file of its own per scan, never one another scan writes too.
    let tmp = temp_path(path, token);
    let written = (|| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let mut f = std::io::BufWriter::with_capacity(1 << 20, f);
        f.write_all(&header(size, chunk_size, token))?;
        for l in leaves {
            f.write_all(&l.0)?;
        }
        f.into_inner().map_err(|e| e.into_error())?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn temp_path(path: &Path, token: u64) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{token:016x}.new"));
    path.with_file_name(name)
}

/// Deletes the names file at `path` and any a scan left half written (a
/// crash while it saved them), logging what cannot be deleted.
pub fn remove_leaves(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let name = name.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&name)
            && let Err(err) = std::fs::remove_file(e.path())
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %e.path().display(), error = %err, "cannot delete the names of an earlier scan");
        }
    }
}

/// The names [`save_leaves`] wrote for `token`, if the file holds exactly
/// those of a volume of `size` bytes in chunks of `chunk_size`; why not
/// otherwise.
pub fn load_leaves(
    path: &Path,
    size: u64,
    chunk_size: u32,
    token: u64,
) -> Result<Vec<Hash>, String> {
    let chunks = crate::store::tree::chunk_count(size, chunk_size);
    let want = (chunks as usize)
        .checked_mul(32)
        .and_then(|n| n.checked_add(HEADER))
        .ok_or("the volume has too many chunks")?;
    let at = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut f = std::fs::File::open(path).map_err(at)?;
    let len = f.metadata().map_err(at)?.len();
    if len != want as u64 {
        return Err(format!(
            "{} holds {len} bytes, not the {want} of {chunks} chunk names",
            path.display()
        ));
    }
    // The length was checked: the whole file, then the names out of it.
    let mut bytes = Vec::with_capacity(want);
    f.read_to_end(&mut bytes).map_err(at)?;
    if bytes.len() != want || bytes[..HEADER] != header(size, chunk_size, token) {
        return Err(format!(
            "{} belongs to another scan or volume shape",
            path.display()
        ));
    }
    Ok(bytes[HEADER..]
        .chunks_exact(32)
        .map(|b| Hash(b.try_into().unwrap_or([0; 32])))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write marks every chunk it touches, across chunk and word
    /// boundaries, clipped to the volume; the runs come out in order.
    #[test]
    fn a_write_marks_the_chunks_it_touches_and_runs_come_out_in_order() {
        let mut m = DirtyMap::new(200 * 4096 + 100, 4096);
        assert_eq!(m.chunks(), 201);
        m.mark(4095, 2); // chunks 0 and 1
        m.mark(10 * 4096, 4096); // chunk 10 only
        m.mark(60 * 4096, 70 * 4096); // 60..130, whole word 64..128 among them
        m.mark(200 * 4096 + 50, 1 << 20); // the short last chunk, clipped
        m.mark(5 * 4096, 0); // nothing
        assert_eq!(m.runs(), vec![(0, 2), (10, 11), (60, 130), (200, 201)]);
        assert_eq!(m.marked(), 2 + 1 + 70 + 1);
        // Marking again counts nothing twice.
        m.mark(0, 201 * 4096);
        assert_eq!(m.marked(), 201);
        assert_eq!(m.runs(), vec![(0, 201)]);
        assert!(m.is_marked(200) && !m.is_marked(201));
    }

    /// The names come back only for the token and shape they were saved
    /// with, and a short or foreign file is refused with the reason.
    #[test]
    fn saved_names_come_back_only_for_their_token_and_shape() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("leaves");
        let leaves: Vec<Hash> = (0..5u8).map(|i| Hash::of_chunk(&[i; 100])).collect();
        save_leaves(&p, 5 * 65536, 65536, 7, &leaves).unwrap();
        assert_eq!(load_leaves(&p, 5 * 65536, 65536, 7).unwrap(), leaves);
        assert!(
            load_leaves(&p, 5 * 65536, 65536, 8)
                .unwrap_err()
                .contains("another scan")
        );
        assert!(load_leaves(&p, 5 * 65536, 32768, 7).is_err());
        assert!(
            load_leaves(&p, 6 * 65536, 65536, 7)
                .unwrap_err()
                .contains("not the")
        );
        std::fs::write(&p, b"short").unwrap();
        assert!(load_leaves(&p, 5 * 65536, 65536, 7).is_err());
        assert!(load_leaves(&dir.path().join("none"), 65536, 65536, 7).is_err());
        // What a crash leaves half written goes with the names, and
        // nothing else in the directory does.
        std::fs::write(temp_path(&p, 9), b"half").unwrap();
        std::fs::write(dir.path().join("00000001.log"), b"segment").unwrap();
        remove_leaves(&p);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, vec!["00000001.log".to_string()]);
    }

    /// A volume of no chunks marks nothing and has no runs.
    #[test]
    fn an_empty_volume_marks_nothing() {
        let mut m = DirtyMap::new(0, 65536);
        m.mark(0, 4096);
        assert_eq!((m.chunks(), m.marked()), (0, 0));
        assert!(m.runs().is_empty());
    }
}
