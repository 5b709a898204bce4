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
//! so on back to a full scan.
//!
//! A clean stop of the daemon keeps the map: it refuses every later write,
//! fsyncs the image and writes the map to a file with what the image's
//! inode said then (device, inode number, size, modification and change
//! times) and where the journal stood. The next start takes the map back
//! only if all of that still holds, and deletes the file (durably) before
//! any write: a write by another program while the daemon was down changes
//! the image's change time. After a crash (kill, power loss) there is no
//! such file and the first resync reads everything: nothing says what the
//! crash, or another program, left in the image; nor after a failed fsync
//! of the image, whose pages may read back as written and later as the
//! disk holds them. A block device keeps no map over a stop: its inode's
//! times do not follow writes.

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

    /// The chunk size the map counts in.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
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
/// other's). No fsync here: only a clean stop that keeps the map for the
/// restart needs the names durable, and it fsyncs them then.
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

/// Deletes the file at `path` (the names or the kept map) and any
/// [`temp_path`] of it a crash left half written, logging what cannot be
/// deleted.
pub fn remove_with_temps(path: &Path) {
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
            tracing::warn!(file = %e.path().display(), error = %err, "cannot delete a file of an earlier scan");
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

/// What a clean stop saw of the image it kept a map for: if any of it
/// differs at the next start, something wrote the image (or replaced it)
/// while the daemon was down, and the map is not taken back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl ImageStamp {
    /// The image's stamp; `None` for anything but a regular file (a block
    /// device's inode times do not follow its writes).
    pub fn of(path: &Path) -> std::io::Result<Option<ImageStamp>> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(m.is_file().then(|| ImageStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }))
    }

    fn words(&self) -> [u64; 7] {
        [
            self.dev,
            self.ino,
            self.len,
            self.mtime.0 as u64,
            self.mtime.1 as u64,
            self.ctime.0 as u64,
            self.ctime.1 as u64,
        ]
    }
}

/// The image's stamp as a clean stop keeps it: its metadata made durable
/// (`durable`: the times too, so that a power loss does not bring back
/// older ones and refuse the map), and the stop held until the file
/// system's clock has moved past its change time. A write by another
/// program after that changes the time the map holds, even on a file
/// system whose times count whole seconds (as git's "racy clean" rule).
pub fn stamp_settled(path: &Path, durable: bool) -> Result<ImageStamp, String> {
    let at = |e: std::io::Error| format!("{}: {e}", path.display());
    if durable {
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(at)?;
    }
    let stamp = ImageStamp::of(path)
        .map_err(at)?
        .ok_or("the image is not a regular file: its times do not follow its writes")?;
    // Times in whole seconds: a tick is a second (two on some file
    // systems); otherwise the kernel's coarse clock, a few milliseconds.
    let tick = if stamp.ctime.1 == 0 && stamp.mtime.1 == 0 {
        std::time::Duration::from_secs(2)
    } else {
        std::time::Duration::from_millis(50)
    };
    let ctime = std::time::UNIX_EPOCH
        + std::time::Duration::new(
            stamp.ctime.0.max(0) as u64,
            stamp.ctime.1.clamp(0, 999_999_999) as u32,
        );
    match std::time::SystemTime::now().duration_since(ctime) {
        Ok(since) if since >= tick => {}
        Ok(since) => std::thread::sleep(tick - since),
        // Behind the image's times (another host's clock set them, or
        // ours went back): nothing says when their tick ends.
        Err(_) => {
            return Err(
                "the image's change time is ahead of this host's clock: its times cannot tell a later write".into(),
            );
        }
    }
    // Nothing wrote it meanwhile.
    match ImageStamp::of(path).map_err(at)? {
        Some(again) if again == stamp => Ok(stamp),
        _ => Err("the image changed while the stop waited for its times to settle".into()),
    }
}

/// What a map kept over a stop goes with, besides its scan's names: the
/// image as the stop left it, where the journal stood (its incarnation and
/// next record: a start that wrote through it moved them), and the host's
/// boot when the image was not fsynced (the stop's fsync was skipped by
/// configuration: a reboot may have lost the page cache the map relies on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kept {
    pub stamp: ImageStamp,
    pub incarnation: u64,
    pub next_seq: u64,
    pub boot: Option<String>,
}

const MAP_MAGIC: &[u8; 8] = b"ferryDM1";
/// Magic, size, chunk size, token, incarnation, next record, the stamp.
const MAP_FIXED: usize = 8 + 8 + 4 + 8 + 8 + 8 + 7 * 8;
/// A boot id is a UUID (36 bytes); more than this is not one.
const BOOT_MAX: usize = 64;

/// Writes the map a clean stop keeps, with the token of its scan's names
/// (a new file, fsynced, renamed over any old one, the directory fsynced):
/// the next start finds it whole or not at all.
pub fn save_map(
    path: &Path,
    size: u64,
    chunk_size: u32,
    (map, token): (&DirtyMap, u64),
    kept: &Kept,
) -> std::io::Result<()> {
    let boot = kept.boot.as_deref().unwrap_or("").as_bytes();
    if boot.len() > BOOT_MAX {
        return Err(std::io::Error::other("the host's boot id is too long"));
    }
    let mut bytes = Vec::with_capacity(MAP_FIXED + 1 + boot.len() + map.words.len() * 8);
    bytes.extend_from_slice(MAP_MAGIC);
    bytes.extend_from_slice(&size.to_le_bytes());
    bytes.extend_from_slice(&chunk_size.to_le_bytes());
    for w in [token, kept.incarnation, kept.next_seq]
        .into_iter()
        .chain(kept.stamp.words())
    {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    bytes.push(boot.len() as u8);
    bytes.extend_from_slice(boot);
    for w in &map.words {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    let tmp = temp_path(path, token);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(d) => std::fs::File::open(d)?.sync_all(),
        None => Ok(()),
    }
}

/// Takes back the map a clean stop kept at `path` for a volume of `size`
/// bytes in chunks of `chunk_size`, with its scan's token, if it was kept
/// for the image and journal as they are `now` (whose boot is this host's);
/// why not otherwise. The file is deleted either way, and the deletion made
/// durable before this returns: no later start can take the map back after
/// writes it does not hold. `Ok(None)`: there was no file.
pub fn take_map(
    path: &Path,
    size: u64,
    chunk_size: u32,
    now: &Kept,
) -> Result<Option<(DirtyMap, u64)>, String> {
    let at = |e: std::io::Error| format!("{}: {e}", path.display());
    let f = match std::fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(at(e)),
        Ok(f) => f,
    };
    let mut map = DirtyMap::new(size, chunk_size);
    let words = map.words.len();
    // The longest map of this volume: the length is checked before reading.
    let most = (MAP_FIXED + 1 + BOOT_MAX + words * 8) as u64;
    let read = (|| {
        let len = f.metadata().map_err(at)?.len();
        if len > most {
            return Err(format!(
                "{} holds {len} bytes, more than a map of this volume",
                path.display()
            ));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        (&f).read_to_end(&mut bytes).map_err(at)?;
        Ok(bytes)
    })();
    drop(f);
    remove_map(path)?;
    let bytes = read?;
    let short = || format!("{} is too short for a map", path.display());
    let fixed = bytes.get(..MAP_FIXED).ok_or_else(short)?;
    let word =
        |i: usize| u64::from_le_bytes(fixed[20 + 8 * i..28 + 8 * i].try_into().unwrap_or([0; 8]));
    let boot_len = usize::from(*bytes.get(MAP_FIXED).ok_or_else(short)?);
    let boot = bytes
        .get(MAP_FIXED + 1..MAP_FIXED + 1 + boot_len)
        .ok_or_else(short)?;
    let bits = &bytes[MAP_FIXED + 1 + boot_len..];
    if fixed[..8] != MAP_MAGIC[..]
        || fixed[8..16] != size.to_le_bytes()
        || fixed[16..20] != chunk_size.to_le_bytes()
        || bits.len() != words * 8
    {
        return Err(format!(
            "{} is not a map of this volume's shape",
            path.display()
        ));
    }
    let stamp: Vec<u64> = (3..10).map(word).collect();
    if stamp[..] != now.stamp.words()[..] {
        return Err("the image was written, replaced or resized while the daemon was down".into());
    }
    if (word(1), word(2)) != (now.incarnation, now.next_seq) {
        return Err("the journal moved since the map was kept".into());
    }
    if !boot.is_empty() && Some(boot) != now.boot.as_deref().map(str::as_bytes) {
        return Err(
            "the host restarted since the map was kept, and the image was not fsynced at the stop"
                .into(),
        );
    }
    for (w, b) in map.words.iter_mut().zip(bits.chunks_exact(8)) {
        *w = u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    }
    // Bits past the last chunk mean nothing: cleared, then counted.
    if !map.chunks.is_multiple_of(64)
        && let Some(last) = map.words.last_mut()
    {
        *last &= (1u64 << (map.chunks % 64)) - 1;
    }
    map.marked = map.words.iter().map(|w| u64::from(w.count_ones())).sum();
    Ok(Some((map, word(0))))
}

/// Deletes a kept map and makes the deletion durable.
pub fn remove_map(path: &Path) -> Result<(), String> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot delete {}: {e}", path.display())),
    }
    sync_dir(path).map_err(|e| format!("cannot sync the directory of {}: {e}", path.display()))
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
        remove_with_temps(&p);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, vec!["00000001.log".to_string()]);
    }

    /// A kept map comes back, marks and token whole, only for the image and
    /// journal it was kept with; its file is gone after any attempt, and a
    /// file of another shape or length is refused with the reason.
    #[test]
    fn a_kept_map_comes_back_only_for_the_image_and_journal_it_was_kept_with() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::write(&img, vec![1u8; 300 * 4096 + 7]).unwrap();
        let p = dir.path().join("scan.map");
        let size = 300 * 4096 + 7;
        let mut m = DirtyMap::new(size, 4096);
        m.mark(5 * 4096, 3 * 4096);
        m.mark(size - 1, 1);
        let kept = Kept {
            // Settled: a write after it changes the image's times.
            stamp: stamp_settled(&img, false).unwrap(),
            incarnation: 3,
            next_seq: 77,
            boot: None,
        };
        let save = |k: &Kept| save_map(&p, size, 4096, (&m, 42), k).unwrap();
        let take = |k: &Kept| take_map(&p, size, 4096, k);
        save(&kept);
        let (back, token) = take(&kept).unwrap().unwrap();
        assert_eq!(
            (token, back.marked(), back.runs()),
            (42, 4, vec![(5, 8), (300, 301)])
        );
        assert!(!p.exists(), "the file outlived its taking");
        assert_eq!(take(&kept).unwrap().map(|(_, t)| t), None);

        // The journal moved, or the map is for another shape.
        save(&kept);
        let moved = Kept {
            next_seq: 78,
            ..kept.clone()
        };
        assert!(take(&moved).unwrap_err().contains("journal moved"));
        assert!(!p.exists());
        save(&kept);
        assert!(
            take_map(&p, size + 4096, 4096, &kept)
                .unwrap_err()
                .contains("shape")
        );
        // Kept without an fsync of the image: only for the same boot.
        let booted = Kept {
            boot: Some("boot-a".into()),
            ..kept.clone()
        };
        save(&booted);
        let other = Kept {
            boot: Some("boot-b".into()),
            ..kept.clone()
        };
        assert!(take(&other).unwrap_err().contains("host restarted"));
        save(&booted);
        assert!(
            take(&Kept {
                boot: Some("boot-a".into()),
                ..kept.clone()
            })
            .unwrap()
            .is_some()
        );
        // The image written while the daemon was down.
        save(&kept);
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            f.write_all_at(&[9], 100).unwrap();
        }
        let now = Kept {
            stamp: ImageStamp::of(&img).unwrap().unwrap(),
            ..kept.clone()
        };
        assert!(
            take(&now)
                .unwrap_err()
                .contains("written, replaced or resized")
        );
        // Short and overlong files.
        std::fs::write(&p, b"ferryDM1").unwrap();
        assert!(take(&kept).unwrap_err().contains("too short"));
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        assert!(take(&kept).unwrap_err().contains("more than a map"));
        assert!(!p.exists());
        // A block device (here any non-file) keeps no stamp.
        assert_eq!(ImageStamp::of(dir.path()).unwrap(), None);
    }

    /// A stop's stamp waits out the clock's tick after the image's last
    /// change, and is the image's stamp.
    #[test]
    fn a_settled_stamp_is_the_images_after_its_tick() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::write(&img, b"written just now").unwrap();
        let t0 = std::time::Instant::now();
        let s = stamp_settled(&img, true).unwrap();
        assert_eq!(Some(s), ImageStamp::of(&img).unwrap());
        assert!(t0.elapsed() >= std::time::Duration::from_millis(10));
        assert!(stamp_settled(dir.path(), false).is_err());
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
