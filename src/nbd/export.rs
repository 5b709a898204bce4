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
pub struct FileExport {
    file: File,
    path: PathBuf,
    size: u64,
    fsync: bool,
}

impl FileExport {
    pub fn open(path: &Path, fsync: bool) -> io::Result<FileExport> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let size = crate::volume::image::image_size(path).map_err(io::Error::other)?;
        Ok(FileExport {
            file,
            path: path.to_path_buf(),
            size,
            fsync,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
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
        self.file.write_all_at(data, off)?;
        if fua { self.flush() } else { Ok(()) }
    }

    fn flush(&self) -> io::Result<()> {
        if self.fsync {
            self.file.sync_data()
        } else {
            Ok(())
        }
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        crate::volume::image::write_zeros(&self.file, &self.path, off, len)
            .map_err(io::Error::other)
    }

    fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        crate::volume::image::write_zeros(&self.file, &self.path, off, len)
            .map_err(io::Error::other)?;
        if fua { self.flush() } else { Ok(()) }
    }
}
