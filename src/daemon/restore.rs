//! Writing a recovery point out as an image file at the DR site: what an
//! operator does to start from a point when the replica image is not the
//! state to use (mid-resync) or to inspect an older state.

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::store::ChunkStore;
use crate::store::state::RecoveryPoint;
use crate::store::tree::{self, StoreNodes, chunk_range};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{0} exists; restore writes a new file and never overwrites one")]
    Exists(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{0} (`ferry scrub` on the volume finds every damaged record and puts back what the image holds)"
    )]
    Store(#[from] crate::store::StoreError),
}

/// Writes the image of `point` to a new file `to` (every chunk verified on
/// read), fsyncs it, and returns the bytes of data written (holes not counted).
/// On any error (a damaged chunk among them) the file is removed: a restore
/// leaves the whole point or nothing.
pub fn restore(
    store: &dyn ChunkStore,
    point: &RecoveryPoint,
    to: &Path,
) -> Result<u64, RestoreError> {
    let r = restore_new(store, point, to);
    if let Err(e) = &r
        && !matches!(e, RestoreError::Exists(_))
    {
        let _ = std::fs::remove_file(to);
    }
    r
}

fn restore_new(
    store: &dyn ChunkStore,
    point: &RecoveryPoint,
    to: &Path,
) -> Result<u64, RestoreError> {
    let werr = |source| RestoreError::Write {
        path: to.display().to_string(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                RestoreError::Exists(to.display().to_string())
            } else {
                werr(e)
            }
        })?;
    let nodes = StoreNodes(store);
    let (size, chunk_size, _, _) = tree::root_shape(&nodes, &point.root)?;
    f.set_len(size).map_err(werr)?;
    let mut written = 0u64;
    let mut err = None;
    tree::for_each_leaf(&nodes, &point.root, &mut |i, h| {
        if h.is_zero() {
            return Ok(());
        }
        let (start, end) = chunk_range(size, chunk_size, i);
        let data = point_chunk(store, &h, end - start)?;
        if let Err(e) = f.write_all_at(&data, start) {
            err.get_or_insert(e);
        }
        written += data.len() as u64;
        Ok(())
    })?;
    if let Some(e) = err {
        return Err(werr(e));
    }
    f.sync_all().map_err(werr)?;
    Ok(written)
}

/// Makes the image at `path` hold the point `root` (a promotion to a point):
/// every chunk is read from the image and compared, and only differing
/// chunks are written (each verified on read from the store), then the
/// image is fsynced. Returns the chunks rewritten.
pub fn restore_in_place(
    store: &dyn ChunkStore,
    root: &crate::hash::Hash,
    path: &Path,
    fsync: bool,
) -> Result<u64, RestoreError> {
    let werr = |source| RestoreError::Write {
        path: path.display().to_string(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(werr)?;
    let nodes = StoreNodes(store);
    let (size, chunk_size, _, _) = tree::root_shape(&nodes, root)?;
    f.set_len(size).map_err(werr)?;
    let mut buf = vec![0u8; chunk_size as usize];
    let mut rewritten = 0u64;
    let mut err = None;
    tree::for_each_leaf(&nodes, root, &mut |i, h| {
        let (start, end) = chunk_range(size, chunk_size, i);
        let have = &mut buf[..(end - start) as usize];
        if let Err(e) = std::os::unix::fs::FileExt::read_exact_at(&f, have, start) {
            err.get_or_insert(e);
            return Ok(());
        }
        let same = if h.is_zero() {
            have.iter().all(|b| *b == 0)
        } else {
            !have.iter().all(|b| *b == 0) && crate::hash::Hash::of_chunk(have) == h
        };
        if same {
            return Ok(());
        }
        rewritten += 1;
        let r = if h.is_zero() {
            crate::volume::image::write_zeros(&f, path, start, end - start)
                .map(|_| ())
                .map_err(std::io::Error::other)
        } else {
            let data = point_chunk(store, &h, end - start)?;
            f.write_all_at(&data, start)
        };
        if let Err(e) = r {
            err.get_or_insert(e);
        }
        Ok(())
    })?;
    if let Some(e) = err {
        return Err(werr(e));
    }
    if fsync {
        f.sync_all().map_err(werr)?;
    }
    Ok(rewritten)
}

/// A chunk of a point, read and verified, of the length its place needs.
fn point_chunk(
    store: &dyn ChunkStore,
    h: &crate::hash::Hash,
    len: u64,
) -> Result<Vec<u8>, crate::store::StoreError> {
    let data = store.get_chunk(h)?.ok_or_else(|| {
        crate::store::StoreError::Read(format!("chunk {} of the point is missing", h.short()))
    })?;
    if data.len() as u64 != len {
        return Err(crate::store::StoreError::Read(format!(
            "chunk {} has {} bytes where {len} fit",
            h.short(),
            data.len()
        )));
    }
    Ok(data)
}
