//! Reading and writing volume images (regular files or block devices).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::hash::{Hash, is_all_zero};
use crate::store::tree::{Tree, chunk_count};

/// Bytes read per system call while scanning: small enough that what one
/// read copied is still in the CPU's cache when blake3 reads it (8 MiB
/// reads were slower), large enough that the kernel's readahead keeps the
/// disk busy.
const SCAN_READ_BYTES: usize = 1 << 20;

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

/// Threads reading and hashing an image in parallel.
const SCAN_THREADS_MAX: usize = 4;

/// Bytes of the image a scan thread takes at a time: the threads take the
/// next part as they finish one, so that an image whose data sits in one
/// half (most are: a file system fills from the start) keeps them all busy.
const SCAN_PART_BYTES: u64 = 32 << 20;

/// Reads the whole image and names every chunk; zero chunks get `Hash::ZERO`.
/// `progress` counts bytes read, for the operator's progress bar.
pub fn scan(
    path: &Path,
    chunk_size: u32,
    progress: &AtomicU64,
) -> Result<(Tree, ScanStats), ImageError> {
    let size = image_size(path)?;
    let n = chunk_count(size, chunk_size);
    let parts = parts_of(&[(0, n)], chunk_size, size);
    let mut leaves = Vec::with_capacity(n as usize);
    let mut stats = ScanStats::default();
    for (_, (l, zero, read)) in scan_parts(path, chunk_size, size, &parts, progress)? {
        leaves.extend(l);
        stats.zero += zero;
        stats.bytes_read += read;
    }
    Ok((Tree::build(size, chunk_size, leaves), stats))
}

/// Names the chunks `dirty` marks, reading only them, and gives every other
/// chunk its name in `base` (the names of the scan the map started at; see
/// [`super::dirty`]). The tree is the one [`scan`] would build while the
/// map is right.
pub fn scan_dirty(
    path: &Path,
    chunk_size: u32,
    progress: &AtomicU64,
    base: Vec<Hash>,
    dirty: &super::dirty::DirtyMap,
) -> Result<(Tree, ScanStats), ImageError> {
    let size = image_size(path)?;
    let n = chunk_count(size, chunk_size);
    if base.len() as u64 != n || dirty.chunks() != n {
        return Err(ImageError::Size {
            path: path.display().to_string(),
            size,
            reason: format!(
                "the last scan named {} chunks and its map covers {}, the image has {n}",
                base.len(),
                dirty.chunks()
            ),
        });
    }
    let parts = parts_of(&dirty.runs(), chunk_size, size);
    // The chunks not read count as scanned, for the progress bar.
    let dirty_bytes: u64 = parts.iter().map(|p| p.2 - p.1).sum();
    progress.fetch_add(size - dirty_bytes, Ordering::Relaxed);
    let mut leaves = base;
    let mut stats = ScanStats::default();
    for (first, (l, _, read)) in scan_parts(path, chunk_size, size, &parts, progress)? {
        let at = first as usize;
        leaves[at..at + l.len()].copy_from_slice(&l);
        stats.bytes_read += read;
    }
    stats.zero = leaves.iter().filter(|h| h.is_zero()).count() as u64;
    Ok((Tree::build(size, chunk_size, leaves), stats))
}

/// Runs of chunks `[first, end)` as parts of at most `SCAN_PART_BYTES`:
/// (first chunk, start byte, end byte).
fn parts_of(runs: &[(u64, u64)], chunk_size: u32, size: u64) -> Vec<(u64, u64, u64)> {
    let cs = chunk_size as u64;
    // Whole chunks per part.
    let per = (SCAN_PART_BYTES / cs).max(1);
    runs.iter()
        .flat_map(|&(first, end)| {
            (first..end)
                .step_by(per as usize)
                .map(move |c| (c, c * cs, ((c + per).min(end) * cs).min(size)))
        })
        .collect()
}

/// Reads and names `parts` on up to `SCAN_THREADS_MAX` threads, each taking
/// the next part as it finishes one; returns each part's first chunk and
/// what it found, in the parts' order, or the first failure.
fn scan_parts(
    path: &Path,
    chunk_size: u32,
    size: u64,
    parts: &[(u64, u64, u64)],
    progress: &AtomicU64,
) -> Result<Vec<(u64, RangeScan)>, ImageError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(SCAN_THREADS_MAX)
        .min(parts.len())
        .max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let taken: Vec<Vec<(usize, Result<RangeScan, ImageError>)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    // One read buffer per thread, for all its parts.
                    let mut buf = Vec::new();
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(_, start, end)) = parts.get(i) else {
                            break;
                        };
                        let r = scan_range(path, chunk_size, start, end, progress, &mut buf);
                        failed.fetch_or(r.is_err(), Ordering::Relaxed);
                        done.push((i, r));
                    }
                    done
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    vec![(
                        usize::MAX,
                        Err(ImageError::Size {
                            path: path.display().to_string(),
                            size,
                            reason: "scan thread panicked".into(),
                        }),
                    )]
                })
            })
            .collect()
    });
    let mut results: Vec<(usize, Result<RangeScan, ImageError>)> =
        taken.into_iter().flatten().collect();
    // A failure (the first in the threads' order), else every part in the
    // image's order.
    if let Some(i) = results.iter().position(|(_, r)| r.is_err())
        && let (_, Err(e)) = results.swap_remove(i)
    {
        return Err(e);
    }
    results.sort_unstable_by_key(|(i, _)| *i);
    if results.len() != parts.len() {
        return Err(ImageError::Size {
            path: path.display().to_string(),
            size,
            reason: "scan ended before every part was read".into(),
        });
    }
    results
        .into_iter()
        .map(|(i, r)| Ok((parts[i].0, r?)))
        .collect()
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
    let (leaves, _, _) = scan_range(
        path,
        chunk_size,
        from * cs,
        (to * cs).min(size),
        &progress,
        &mut Vec::new(),
    )?;
    Ok((size, leaves))
}

/// A range's chunk names, how many of them are zero, and the bytes read.
type RangeScan = (Vec<Hash>, u64, u64);

fn scan_range(
    path: &Path,
    chunk_size: u32,
    start: u64,
    end: u64,
    progress: &AtomicU64,
    buf: &mut Vec<u8>,
) -> Result<RangeScan, ImageError> {
    let f = File::open(path).map_err(io(path, "open"))?;
    let cs = chunk_size as u64;
    let step = (SCAN_READ_BYTES as u64).max(cs) / cs * cs;
    buf.resize(step as usize, 0);
    let mut leaves = Vec::with_capacity(((end - start) / cs + 1) as usize);
    let (mut zero, mut read) = (0, 0);
    let mut off = start;
    // Holes (a sparse image's unwritten ranges) are zeros without reading
    // them: the file system says where data is. Devices and file systems
    // without SEEK_DATA report data everywhere, and zero detection stays.
    let mut holes = Holes::new(&f);
    while off < end {
        let (data, data_end) = holes.next_data(off, end);
        // Whole chunks before the data are holes.
        let skip = (data.min(end) - off) / cs * cs;
        if skip > 0 {
            let n = skip / cs;
            leaves.extend(std::iter::repeat_n(Hash::ZERO, n as usize));
            zero += n;
            off += skip;
            progress.fetch_add(skip, Ordering::Relaxed);
            continue;
        }
        // Read up to the end of the chunk where the data ends.
        let to = data_end.div_ceil(cs).saturating_mul(cs).clamp(off + 1, end);
        let want = (to - off).min(step) as usize;
        let got = &mut buf[..want];
        f.read_exact_at(got, off).map_err(io(path, "read"))?;
        for c in got.chunks(cs as usize) {
            if is_all_zero(c) {
                zero += 1;
                leaves.push(Hash::ZERO);
            } else {
                leaves.push(Hash::of_chunk(c));
            }
        }
        off += want as u64;
        read += want as u64;
        progress.fetch_add(want as u64, Ordering::Relaxed);
    }
    Ok((leaves, zero, read))
}

/// `[off, off+len)` of `f` as runs of data and holes (NBD's
/// `base:allocation`), at most `runs_max` of them, adding up to at most
/// `len` (at least one run when `len` is not 0). Where the file system
/// cannot tell, all is data.
pub fn allocation(f: &File, off: u64, len: u64, runs_max: usize) -> Vec<crate::nbd::Extent> {
    let end = off.saturating_add(len);
    let mut holes = Holes::new(f);
    let mut runs = Vec::new();
    let mut at = off;
    while at < end {
        let (data, data_end) = holes.next_data(at, end);
        let data = data.clamp(at, end);
        let data_end = data_end.clamp(data, end);
        if !crate::nbd::export::push_extent(&mut runs, data - at, true, runs_max)
            || !crate::nbd::export::push_extent(&mut runs, data_end - data, false, runs_max)
        {
            break;
        }
        if data_end <= at {
            break;
        }
        at = data_end;
    }
    runs
}

/// Where a file's data is (`lseek` with `SEEK_DATA` and `SEEK_HOLE`).
struct Holes<'a> {
    f: &'a File,
    /// False once the file system said it cannot tell: all is data.
    works: bool,
    /// The last data extent found, `[start, end)`.
    extent: (u64, u64),
}

impl<'a> Holes<'a> {
    fn new(f: &'a File) -> Holes<'a> {
        Holes {
            f,
            works: true,
            extent: (0, 0),
        }
    }

    /// The first data at or after `off` and where that data ends (`end`
    /// when there is none before it). Any doubt counts as data.
    fn next_data(&mut self, off: u64, end: u64) -> (u64, u64) {
        if !self.works {
            return (off, end);
        }
        if self.extent.0 <= off && off < self.extent.1 {
            return (off, self.extent.1.min(end));
        }
        use std::os::fd::AsRawFd;
        let fd = self.f.as_raw_fd();
        let Ok(at) = libc::off_t::try_from(off) else {
            return (off, end);
        };
        // SAFETY: lseek on a descriptor this struct borrows; the offset it
        // moves is not used (every read is positioned).
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                // No data after `off`: a hole to the end of the file.
                return (end, end);
            }
            self.works = false;
            return (off, end);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < data {
            self.works = false;
            return (off, end);
        }
        self.extent = (data as u64, hole as u64);
        (data as u64, (hole as u64).min(end).max(data as u64))
    }
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

/// Whether hole punching works on `f` (of `size` bytes): a hole punched
/// past its end, which changes nothing, either works or says it cannot.
pub fn punches_holes(f: &File, size: u64) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(at) = libc::off_t::try_from(size) else {
        return false;
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is open.
    unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at,
            4096,
        ) == 0
    }
}

/// Writes zeros over `[off, off+len)`: punches a hole where the file system can,
/// keeping replicas sparse, and writes zeros where it cannot (block devices).
/// True when a hole was punched.
pub fn write_zeros(f: &File, path: &Path, off: u64, len: u64) -> Result<bool, ImageError> {
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
        return Ok(true);
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
    Ok(false)
}

/// What O_DIRECT wants aligned: the memory, the offset and the length (the
/// largest logical block of Linux block devices and file systems).
const DIRECT_ALIGN: usize = 4096;

/// Whether a refused O_DIRECT write was logged (once per process; the
/// writer of that image goes on through the page cache).
static DIRECT_REFUSAL_LOGGED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

thread_local! {
    /// The aligned buffer runs are gathered in, kept by the thread: a fresh
    /// megabyte per batch was a fresh mapping, its page faults and zeroing.
    static DIRECT_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Writes runs of whole chunks into a replica image past the page cache
/// (O_DIRECT): a seed writes every byte of the image once, and copying it
/// into the page cache first was a fifth of the DR side's CPU, with the
/// commit's fsync writing it out anyway. A run is gathered into one
/// aligned buffer and written with one call. Where the seam or the file
/// system offers no O_DIRECT, or a run is not aligned (the last chunk of
/// an image), it writes through `buffered` as [`write_at`] does; a file
/// system that takes the open but refuses the write (EINVAL) has the
/// writer go on through `buffered`, the run written again there.
/// Durability is unchanged: only the commit's fsync makes any of it so.
pub struct DirectWriter<'a> {
    buffered: &'a File,
    path: &'a Path,
    direct: Option<File>,
}

impl<'a> DirectWriter<'a> {
    pub fn new(buffered: &'a File, path: &'a Path) -> Self {
        let direct = match crate::fsio::global().open_direct(path) {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "no O_DIRECT handle on the replica image; writing through the page cache");
                None
            }
        };
        DirectWriter {
            buffered,
            path,
            direct,
        }
    }

    /// Writes `pieces` one after the other from `off`.
    pub fn write_run(&mut self, off: u64, pieces: &[&[u8]]) -> Result<(), ImageError> {
        let len: usize = pieces.iter().map(|p| p.len()).sum();
        if let Some(d) = &self.direct
            && off.is_multiple_of(DIRECT_ALIGN as u64)
            && len.is_multiple_of(DIRECT_ALIGN)
        {
            let wrote = DIRECT_BUF.with(|b| {
                let mut buf = b.borrow_mut();
                let want = len.checked_add(DIRECT_ALIGN)?;
                if buf.len() < want {
                    *buf = vec![0u8; want];
                }
                let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
                let out = buf.get_mut(at..at.checked_add(len)?)?;
                let mut n = 0;
                for p in pieces {
                    out[n..n + p.len()].copy_from_slice(p);
                    n += p.len();
                }
                Some(crate::fsio::global().write_at(d, self.path, out, off))
            });
            match wrote {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                    if !DIRECT_REFUSAL_LOGGED.swap(true, Ordering::Relaxed) {
                        tracing::info!(path = %self.path.display(), "the replica's file system refuses O_DIRECT writes; its seed is written through the page cache");
                    }
                    self.direct = None;
                }
                Some(Err(e)) => return Err(io(self.path, "write")(e)),
                // No aligned buffer (not expected): through the cache.
                None => {}
            }
        }
        let mut at = off;
        for p in pieces {
            write_at(self.buffered, self.path, at, p)?;
            at += p.len() as u64;
        }
        Ok(())
    }
}

pub fn write_at(f: &File, path: &Path, off: u64, data: &[u8]) -> Result<(), ImageError> {
    crate::fsio::global()
        .write_at(f, path, data, off)
        .map_err(io(path, "write"))
}

/// Reads `buf.len()` bytes at `off` as `read_exact_at` does, but what the
/// file system reports as holes is zeroed in `buf` without a read: reading
/// a hole has the kernel allocate and zero page-cache pages for nothing
/// (in a replica of a VM image, most of a chunk can be hole). Past the
/// end of the file reads as zeros where the file system reports holes;
/// where it cannot (no `SEEK_DATA`), the read fails as `read_exact_at`'s.
/// Like the scan, this trusts the file system's `SEEK_HOLE`: a file system
/// that reported data as a hole would corrupt what `cp` and `qemu-img`
/// copy too.
pub fn read_sparse(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let end = off.checked_add(buf.len() as u64).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "read past 2^64 bytes")
    })?;
    let mut holes = Holes::new(f);
    let mut at = off;
    while at < end {
        let (data, data_end) = holes.next_data(at, end);
        let data = data.clamp(at, end);
        // No end reported past the start: read the rest.
        let data_end = if data_end > data {
            data_end.min(end)
        } else {
            end
        };
        buf[(at - off) as usize..(data - off) as usize].fill(0);
        if data < end {
            f.read_exact_at(
                &mut buf[(data - off) as usize..(data_end - off) as usize],
                data,
            )?;
        }
        at = data_end.max(data);
    }
    Ok(())
}

/// Tells the kernel that `f` is read at random places: no readahead
/// around each read (which in a sparse replica mostly zero-fills pages of
/// holes nobody asked for). Only a hint.
pub fn advise_random(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a descriptor `f` keeps open; no memory is passed.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM);
    }
}

/// Asks the kernel to start reading `[off, off + len)` of `f` into the
/// page cache, without waiting: reads that follow one at a time then find
/// it there, the disk having had them all in its queue at once.
pub fn prefetch(f: &File, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain syscall on a descriptor `f` keeps open; no memory is passed.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED);
    }
}

/// The unit `write_changed` compares and writes in.
const CHANGED_BLOCK: usize = 4096;

/// Writes `data` at `off`, but only the 4 KiB blocks that differ from what
/// the file holds there (read first, through the page cache, holes as
/// zeros without a read): a chunk that changed in a few blocks dirties
/// those, so the fsync after a 1 % pass writes the changed blocks, not
/// whole chunks. Where the read fails, all of `data` is written. Returns
/// the bytes written.
pub fn write_changed(f: &File, path: &Path, off: u64, data: &[u8]) -> Result<u64, ImageError> {
    let mut old = vec![0u8; data.len()];
    if read_sparse(f, &mut old, off).is_err() {
        write_at(f, path, off, data)?;
        return Ok(data.len() as u64);
    }
    write_diff(f, path, off, &old, data)
}

/// Writes the 4 KiB blocks of `data` that differ from `old`, what the file
/// holds at `off` (the caller just read it). Returns the bytes written.
pub fn write_diff(
    f: &File,
    path: &Path,
    off: u64,
    old: &[u8],
    data: &[u8],
) -> Result<u64, ImageError> {
    if old.len() != data.len() {
        write_at(f, path, off, data)?;
        return Ok(data.len() as u64);
    }
    let mut written = 0u64;
    let mut at = 0usize;
    while at < data.len() {
        let differs = |i: usize| {
            let e = (i + CHANGED_BLOCK).min(data.len());
            data[i..e] != old[i..e]
        };
        if !differs(at) {
            at += CHANGED_BLOCK;
            continue;
        }
        // A run of differing blocks, written at once.
        let mut end = at + CHANGED_BLOCK;
        while end < data.len() && differs(end) {
            end += CHANGED_BLOCK;
        }
        let end = end.min(data.len());
        write_at(f, path, off + at as u64, &data[at..end])?;
        written += (end - at) as u64;
        at = end;
    }
    Ok(written)
}

/// Asks the kernel to start writing `[off, off + len)` of `f` back to the
/// disk without waiting (sync_file_range's WRITE): a later fsync then has
/// less to write. Only a hint; it makes nothing durable, and a failure is
/// the fsync's to report.
pub fn start_writeback(f: &File, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain syscall on a descriptor `f` keeps open; no memory is passed.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A scan of the written chunks over the last scan's names builds the
    /// tree a full scan builds: chunks written with data, written with
    /// zeros, punched to a hole, and the short last one; it reads only the
    /// marked chunks, and names that do not fit the image are refused.
    #[test]
    fn a_scan_of_the_written_chunks_builds_the_tree_a_full_scan_builds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let cs = 65536u32;
        let size = 100 * cs as u64 + 1000;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.set_len(size).unwrap();
        for c in [0u64, 1, 2, 40, 41, 99] {
            f.write_all_at(&vec![c as u8 + 1; cs as usize], c * cs as u64)
                .unwrap();
        }
        let progress = AtomicU64::new(0);
        let (before, _) = scan(&path, cs, &progress).unwrap();
        let mut map = crate::volume::dirty::DirtyMap::new(size, cs);
        let mut write = |off: u64, data: &[u8]| {
            f.write_all_at(data, off).unwrap();
            map.mark(off, data.len() as u64);
        };
        write(cs as u64 + 100, b"changed"); // chunk 1
        write(2 * cs as u64, &vec![0; cs as usize]); // chunk 2 becomes zero
        write(70 * cs as u64 - 10, &[9; 20]); // chunks 69 and 70, from holes
        write(size - 5, &[7; 5]); // the short last chunk
        let (full, full_stats) = scan(&path, cs, &progress).unwrap();
        let progress = AtomicU64::new(0);
        let (dirty, stats) =
            scan_dirty(&path, cs, &progress, before.leaves().to_vec(), &map).unwrap();
        assert_eq!(dirty.root, full.root);
        assert_eq!(dirty.leaves(), full.leaves());
        assert_ne!(dirty.root, before.root);
        assert_eq!(stats.zero, full_stats.zero);
        assert_eq!(
            progress.load(Ordering::Relaxed),
            size,
            "every byte counts as scanned"
        );
        assert!(
            stats.bytes_read <= 5 * cs as u64 + 1000 && stats.bytes_read < full_stats.bytes_read,
            "read {} of {}",
            stats.bytes_read,
            full_stats.bytes_read
        );
        // Names of another shape are refused, not trusted.
        let short = before.leaves()[1..].to_vec();
        assert!(scan_dirty(&path, cs, &progress, short, &map).is_err());
        let other = crate::volume::dirty::DirtyMap::new(size * 2, cs);
        assert!(scan_dirty(&path, cs, &progress, before.leaves().to_vec(), &other).is_err());
    }

    /// Runs of whole chunks go past the page cache and read back as
    /// written, over what the file held; a run that is not aligned (the
    /// short last chunk of an image) goes through the cache, as do all
    /// writes where the seam offers no O_DIRECT.
    #[test]
    fn a_run_of_chunks_is_written_past_the_page_cache_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.img");
        let size = 4 * 65536 + 1000;
        let f = open_replica(&path).unwrap();
        set_len(&f, &path, size).unwrap();
        // Something cached over the place first: the direct write must
        // replace it, not be hidden by it.
        write_at(&f, &path, 65536, &[9u8; 4096]).unwrap();
        sync(&f, &path).unwrap();
        let chunk = |b: u8| vec![b; 65536];
        let (a, b) = (chunk(1), chunk(2));
        let tail = vec![3u8; 1000];
        let mut w = DirectWriter::new(&f, &path);
        assert!(
            w.direct.is_some(),
            "the test's temporary directory must take O_DIRECT (ext4 and xfs do)"
        );
        w.write_run(65536, &[&a, &b]).unwrap();
        w.write_run(4 * 65536, &[&tail]).unwrap();
        sync(&f, &path).unwrap();
        let mut want = vec![0u8; size as usize];
        want[65536..2 * 65536].copy_from_slice(&a);
        want[2 * 65536..3 * 65536].copy_from_slice(&b);
        want[4 * 65536..].copy_from_slice(&tail);
        // The runs left no page in the cache (the direct write dropped the
        // one cached before); the short tail left its one.
        let cached = crate::fsio::cached_pages(&path);
        assert_eq!(cached, 1, "only the short tail goes through the cache");
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }

    /// The names a scan that reads every byte gives.
    fn naive(path: &Path, cs: u32) -> Vec<Hash> {
        let b = std::fs::read(path).unwrap();
        b.chunks(cs as usize)
            .map(|c| {
                if is_all_zero(c) {
                    Hash::ZERO
                } else {
                    Hash::of_chunk(c)
                }
            })
            .collect()
    }

    #[test]
    fn a_sparse_image_scans_to_the_same_names_reading_only_its_data() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sparse.img");
        let f = File::create(&p).unwrap();
        // 64 MiB and a tail of half a chunk: data at the start, across a
        // chunk boundary, a lone byte mid-chunk, zeros written as data, and
        // the last byte.
        let size = (64 << 20) + 32768;
        f.set_len(size).unwrap();
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        f.write_all_at(&[2u8; 8192], (5 << 20) - 4096).unwrap();
        f.write_all_at(&[3u8], (20 << 20) + 12345).unwrap();
        f.write_all_at(&[0u8; 65536], 30 << 20).unwrap();
        f.write_all_at(&[4u8], size - 1).unwrap();
        f.sync_all().unwrap();
        for cs in [4096u32, 65536, 1 << 20] {
            let (tree, stats) = scan(&p, cs, &AtomicU64::new(0)).unwrap();
            assert_eq!(tree.leaves(), &naive(&p, cs)[..], "chunk size {cs}");
            assert!(
                stats.bytes_read < 8 << 20,
                "chunk size {cs}: read {} of {size} bytes",
                stats.bytes_read
            );
            let (s, page) = scan_chunks(&p, cs, 3, 700).unwrap();
            assert_eq!(s, size);
            let all = naive(&p, cs);
            assert_eq!(page, all[3.min(all.len())..(3 + 700).min(all.len())]);
        }
    }

    #[test]
    fn a_file_without_holes_is_read_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("full.img");
        let mut b = vec![0u8; 3 << 20];
        b[1 << 20] = 9;
        std::fs::write(&p, &b).unwrap();
        let (tree, stats) = scan(&p, 65536, &AtomicU64::new(0)).unwrap();
        assert_eq!(tree.leaves(), &naive(&p, 65536)[..]);
        assert_eq!(stats.zero, 47);
        assert_eq!(stats.bytes_read, 3 << 20);
    }

    #[test]
    fn a_sparse_read_gives_the_bytes_a_full_read_gives() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sparse.img");
        let f = File::create(&p).unwrap();
        let size = 4u64 << 20;
        f.set_len(size).unwrap();
        f.write_all_at(&[7u8; 4096], 65536).unwrap();
        f.write_all_at(&[8u8; 100], (1 << 20) + 5000).unwrap();
        f.write_all_at(&[9u8], size - 1).unwrap();
        let f = File::open(&p).unwrap();
        let all = std::fs::read(&p).unwrap();
        for (off, len) in [
            (0u64, 65536usize),
            (61440, 16384),
            (65536, 4096),
            (1 << 20, 131072),
            (size - 4096, 4096),
            (0, size as usize),
        ] {
            // A buffer that held other bytes: holes must come out zero.
            let mut buf = vec![0xAAu8; len];
            read_sparse(&f, &mut buf, off).unwrap();
            let want = &all[off as usize..off as usize + len];
            assert!(buf == want, "{len} bytes at {off}");
        }
        // Past the end of the file: zeros, not an error.
        let mut buf = vec![0xAAu8; 8192];
        read_sparse(&f, &mut buf, size - 4096).unwrap();
        assert_eq!(buf[4095], 9);
        assert!(buf[..4095].iter().chain(&buf[4096..]).all(|&b| b == 0));
    }

    #[test]
    fn write_changed_writes_only_the_blocks_that_differ() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let old: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &old).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let mut new = old.clone();
        new[5000] ^= 1; // block 1
        new[9000] ^= 1; // block 2, with block 1 one run
        new[65535] ^= 1; // the last block
        assert_eq!(write_changed(&f, &p, 0, &new).unwrap(), 3 * 4096);
        assert_eq!(std::fs::read(&p).unwrap(), new);
        assert_eq!(
            write_changed(&f, &p, 0, &new).unwrap(),
            0,
            "nothing differs"
        );
        // Past the end of the file: written whole.
        assert_eq!(write_changed(&f, &p, 65536, &new[..100]).unwrap(), 100);
        assert_eq!(std::fs::read(&p).unwrap().len(), 65636);
    }
}
