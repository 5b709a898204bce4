//! Reading and writing volume images (regular files or block devices).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::hash::{Hash, is_all_zero};
use crate::store::tree::{Tree, chunk_count};

/// Bytes read per system call while scanning: large reads keep the disk busy.
const SCAN_READ_BYTES: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {path}: {op} failed: {source}")]
    Io {
        path: String,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("image {path}: size {size} is not usable: {reason}")]
    Size {
        path: String,
        size: u64,
        reason: String,
    },
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        path: path.display().to_string(),
        op,
        source,
    }
}

/// The size of an image; block devices report theirs through seek.
pub fn image_size(path: &Path) -> Result<u64, ImageError> {
    let mut f = File::open(path).map_err(io(path, "open"))?;
    f.seek(SeekFrom::End(0)).map_err(io(path, "seek"))
}

/// Largest zero buffer when holes cannot be punched.
const ZERO_WRITE_BYTES: usize = 1 << 20;

/// Threads reading and hashing an image in parallel, each over its own range.
const SCAN_THREADS_MAX: usize = 4;

/// Reads the whole image and names every chunk; zero chunks get `Hash::ZERO`.
/// `progress` counts bytes read, for the operator's progress bar.
pub fn scan(
    path: &Path,
    chunk_size: u32,
    progress: &AtomicU64,
) -> Result<(Tree, ScanStats), ImageError> {
    let size = image_size(path)?;
    let cs = chunk_size as u64;
    let n = chunk_count(size, chunk_size);
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(SCAN_THREADS_MAX) as u64;
    // Whole chunks per part; small images take one part.
    let per = n.div_ceil(threads).max(SCAN_READ_BYTES as u64 / cs);
    let parts: Vec<(u64, u64)> = (0..n)
        .step_by(per.max(1) as usize)
        .map(|first| (first * cs, ((first + per) * cs).min(size)))
        .collect();
    let results: Vec<Result<(Vec<Hash>, u64), ImageError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .iter()
            .map(|&(start, end)| {
                scope.spawn(move || scan_range(path, chunk_size, start, end, progress))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ImageError::Size {
                        path: path.display().to_string(),
                        size,
                        reason: "scan thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut leaves = Vec::with_capacity(n as usize);
    let mut stats = ScanStats {
        bytes_read: size,
        zero: 0,
    };
    for r in results {
        let (l, zero) = r?;
        leaves.extend(l);
        stats.zero += zero;
    }
    Ok((Tree::build(size, chunk_size, leaves), stats))
}

/// Names chunks `[first, first + count)` of the image (fewer at its end):
/// one page of a verify, without reading the rest. Returns the image's size
/// and the names.
pub fn scan_chunks(
    path: &Path,
    chunk_size: u32,
    first: u64,
    count: u64,
) -> Result<(u64, Vec<Hash>), ImageError> {
    let size = image_size(path)?;
    let cs = chunk_size as u64;
    let n = chunk_count(size, chunk_size);
    let (from, to) = (first.min(n), first.saturating_add(count).min(n));
    let progress = AtomicU64::new(0);
    let (leaves, _) = scan_range(path, chunk_size, from * cs, (to * cs).min(size), &progress)?;
    Ok((size, leaves))
}

fn scan_range(
    path: &Path,
    chunk_size: u32,
    start: u64,
    end: u64,
    progress: &AtomicU64,
) -> Result<(Vec<Hash>, u64), ImageError> {
    let f = File::open(path).map_err(io(path, "open"))?;
    let cs = chunk_size as usize;
    let step = SCAN_READ_BYTES.max(cs) / cs * cs;
    let mut buf = vec![0u8; step];
    let mut leaves = Vec::with_capacity(((end - start) / chunk_size as u64 + 1) as usize);
    let mut zero = 0;
    let mut off = start;
    while off < end {
        let want = ((end - off) as usize).min(step);
        let got = &mut buf[..want];
        f.read_exact_at(got, off).map_err(io(path, "read"))?;
        for c in got.chunks(cs) {
            if is_all_zero(c) {
                zero += 1;
                leaves.push(Hash::ZERO);
            } else {
                leaves.push(Hash::of_chunk(c));
            }
        }
        off += want as u64;
        progress.fetch_add(want as u64, Ordering::Relaxed);
    }
    Ok((leaves, zero))
}

#[derive(Clone, Copy, Debug, Default)]
pub struct ScanStats {
    pub bytes_read: u64,
    pub zero: u64,
}

/// Reads chunk `index` of `tree`'s image (the caller checks it still has the
/// name the scan gave it: a pass over a live image must not send a torn state).
pub fn read_chunk(f: &File, path: &Path, tree: &Tree, index: u64) -> Result<Vec<u8>, ImageError> {
    let (start, end) = tree.chunk_range(index);
    let mut buf = vec![0u8; (end - start) as usize];
    f.read_exact_at(&mut buf, start).map_err(io(path, "read"))?;
    Ok(buf)
}

/// Opens a replica image for writing, creating it when absent.
pub fn open_replica(path: &Path) -> Result<File, ImageError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(path, "create directory"))?;
    }
    let fs = crate::fsio::global();
    let existed = path.exists();
    let f = fs.open_rw(path, true).map_err(io(path, "open"))?;
    if !existed && let Some(parent) = path.parent() {
        // A new replica's name must survive a power cut with what is
        // committed into it (the state store already names it).
        fs.sync_dir(parent).map_err(io(path, "fsync directory"))?;
    }
    Ok(f)
}

/// Writes zeros over `[off, off+len)`: punches a hole where the file system can,
/// keeping replicas sparse, and writes zeros where it cannot (block devices).
pub fn write_zeros(f: &File, path: &Path, off: u64, len: u64) -> Result<(), ImageError> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate only reads its integer arguments; the fd is open.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    // No holes here (a block device): write zeros, a bounded buffer at a time.
    let zeros = vec![0u8; (len as usize).min(ZERO_WRITE_BYTES)];
    let mut at = off;
    while at < off + len {
        let n = ((off + len - at) as usize).min(zeros.len());
        crate::fsio::global()
            .write_at(f, path, &zeros[..n], at)
            .map_err(io(path, "write"))?;
        at += n as u64;
    }
    Ok(())
}

pub fn write_at(f: &File, path: &Path, off: u64, data: &[u8]) -> Result<(), ImageError> {
    crate::fsio::global()
        .write_at(f, path, data, off)
        .map_err(io(path, "write"))
}

/// Sets a replica file's length; a block device must already be large enough.
pub fn set_len(f: &File, path: &Path, size: u64) -> Result<(), ImageError> {
    let meta = f.metadata().map_err(io(path, "stat"))?;
    if meta.file_type().is_file() {
        return crate::fsio::global()
            .set_len(f, path, size)
            .map_err(io(path, "truncate"));
    }
    let mut g = f;
    let have = g.seek(SeekFrom::End(0)).map_err(io(path, "seek"))?;
    if have < size {
        return Err(ImageError::Size {
            path: path.display().to_string(),
            size,
            reason: format!("the device holds only {have} bytes"),
        });
    }
    Ok(())
}

pub fn sync(f: &File, path: &Path) -> Result<(), ImageError> {
    crate::fsio::global()
        .sync(f, path)
        .map_err(io(path, "fsync"))
}
