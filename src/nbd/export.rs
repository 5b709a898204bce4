//! What an NBD export serves: a block device's reads, writes and flushes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A block device behind an export. Calls block; the server runs them off
/// the async runtime. `flush` (and a write with `fua`) returns only when the
/// data is durable: NBD clients rely on it (invariant 7).
pub trait Export: Send + Sync {
    fn size(&self) -> u64;
    fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write(&self, off: u64, data: &[u8], fua: bool) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    /// Discard: the range may read back as anything the device chooses; ours reads zeros.
    fn trim(&self, off: u64, len: u64) -> io::Result<()>;
    fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> io::Result<()>;
    /// Changes when the export is withdrawn (its volume's write gate
    /// closed): open connections then end after their requests in flight.
    fn revoked(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
    /// Where `[off, off+len)` is stored, as runs from `off` (NBD's
    /// `base:allocation`): at least one run and at most `runs_max`, adding
    /// up to at most `len`. A hole reads as zeros; any doubt is data, so
    /// the default says data everywhere.
    fn allocation(&self, _off: u64, len: u64, _runs_max: usize) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent { len, hole: false }])
    }
    /// Whether zeroing a range costs about nothing (a hole punched or a
    /// record journaled, never zeros written): NBD's fast zero.
    fn zeroes_fast(&self) -> bool {
        false
    }
    /// Whether every connection to this export sees the same data and a
    /// FLUSH (or FUA write) on any connection makes durable every write
    /// any connection had completed before it: NBD's multi-conn, which
    /// lets clients open several connections at once.
    fn multi_conn(&self) -> bool {
        false
    }
}

/// A run of an export's allocation map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Nothing is stored there: it reads as zeros.
    pub hole: bool,
}

/// Adds a run to `runs`, merged with the last one when they agree; false
/// (and nothing added) once `runs_max` runs are there and it would be a new one.
pub fn push_extent(runs: &mut Vec<Extent>, len: u64, hole: bool, runs_max: usize) -> bool {
    if len == 0 {
        return true;
    }
    if let Some(last) = runs.last_mut()
        && last.hole == hole
    {
        last.len += len;
        return true;
    }
    if runs.len() >= runs_max {
        return false;
    }
    runs.push(Extent { len, hole });
    true
}

/// The exports a server offers, by name.
pub trait Exports: Send + Sync {
    fn get(&self, name: &str) -> Option<Arc<dyn Export>>;
    fn names(&self) -> Vec<String>;
    /// An export that is not there yet but will be (a restarted primary
    /// waiting for its peer's `Hello`): changes when it may be.
    fn pending(&self, _name: &str) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// A raw image file (or block device) as an export.
///
/// A failed fsync is sticky (invariant 7): the writes it covered may be
/// gone from the disk however a later fsync ends (Linux marks the pages
/// clean), so every later flush fails too until [`FileExport::resync_from`]
/// has written them again and an fsync succeeded.
pub struct FileExport {
    file: File,
    path: PathBuf,
    size: u64,
    fsync: bool,
    io: Arc<dyn crate::fsio::Io>,
    failed: std::sync::Mutex<Option<String>>,
    /// Zeroing punches a hole (where it cannot, zeros are written: a
    /// device, a file system without hole punching).
    holes: std::sync::atomic::AtomicBool,
}

impl FileExport {
    pub fn open(path: &Path, fsync: bool) -> io::Result<FileExport> {
        let io = crate::fsio::global().clone();
        let file = io.open_rw(path, false)?;
        let size = crate::volume::image::image_size(path).map_err(io::Error::other)?;
        let holes = crate::volume::image::punches_holes(&file, size).into();
        Ok(FileExport {
            holes,
            file,
            path: path.to_path_buf(),
            size,
            fsync,
            io,
            failed: std::sync::Mutex::new(None),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why flushes fail since an fsync failed (None: they do not).
    pub fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts failed (a failure recorded before a restart that could not
    /// be repaired then).
    pub fn set_failure(&self, why: String) {
        *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// After the writes a failed fsync covered were written again: an
    /// fsync that succeeds now makes them durable and ends the failure; one
    /// that fails starts it (or goes on with it). Under the same lock as a
    /// flush's fsync: an error one of them took from the kernel (which
    /// reports it once) is never cleared by the other's success.
    pub fn sync_again(&self) -> io::Result<()> {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = self.io.sync(&self.file, &self.path) {
            if failed.is_none() {
                tracing::error!(image = %self.path.display(), error = %e, "fsync failed: flushes of this image fail until its unsynced writes are written again");
                *failed = Some(format!("an fsync of {} failed ({e})", self.path.display()));
            }
            return Err(e);
        }
        *failed = None;
        Ok(())
    }

    fn zero(&self, off: u64, len: u64) -> io::Result<()> {
        let punched = crate::volume::image::write_zeros(&self.file, &self.path, off, len)
            .map_err(io::Error::other)?;
        if !punched {
            // Zeros were written: a fast zero is refused from now on.
            self.holes
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    fn failed_error(why: &str) -> io::Error {
        io::Error::other(format!(
            "{why}; flushes fail until the writes it covered are written again"
        ))
    }
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }

    fn write(&self, off: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.io.write_at(&self.file, &self.path, data, off)?;
        if fua { self.flush() } else { Ok(()) }
    }

    fn flush(&self) -> io::Result<()> {
        if !self.fsync {
            return Ok(());
        }
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = failed.as_deref() {
            return Err(Self::failed_error(why));
        }
        if let Err(e) = self.io.sync(&self.file, &self.path) {
            let why = format!("an fsync of {} failed ({e})", self.path.display());
            tracing::error!(image = %self.path.display(), error = %e, "fsync failed: flushes of this image fail until its unsynced writes are written again");
            *failed = Some(why);
            return Err(e);
        }
        Ok(())
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.zero(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        self.zero(off, len)?;
        if fua { self.flush() } else { Ok(()) }
    }

    fn allocation(&self, off: u64, len: u64, runs_max: usize) -> io::Result<Vec<Extent>> {
        Ok(crate::volume::image::allocation(
            &self.file, off, len, runs_max,
        ))
    }

    fn zeroes_fast(&self) -> bool {
        self.holes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// One file behind every connection: the page cache is shared, and an
    /// fsync covers every write to the file, through whichever descriptor.
    fn multi_conn(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_export_maps_its_holes_and_zeroes_by_punching() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let e = FileExport::open(&p, true).unwrap();
        assert!(e.zeroes_fast(), "the test's file system punches holes");
        assert!(e.multi_conn());
        e.write(65536, &[7u8; 8192], false).unwrap();
        let run = |len, hole| Extent { len, hole };
        assert_eq!(
            e.allocation(0, 1 << 20, 16).unwrap(),
            vec![
                run(65536, true),
                run(8192, false),
                run((1 << 20) - 73728, true)
            ]
        );
        assert_eq!(e.allocation(0, 1 << 20, 1).unwrap(), vec![run(65536, true)]);
        assert_eq!(e.allocation(69632, 100, 16).unwrap(), vec![run(100, false)]);
        e.write_zeroes(65536, 8192, false).unwrap();
        assert_eq!(
            e.allocation(0, 1 << 20, 16).unwrap(),
            vec![run(1 << 20, true)]
        );
        assert!(e.zeroes_fast(), "a hole was punched");
    }
}
