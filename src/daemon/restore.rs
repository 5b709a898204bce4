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
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// Writes the image of `point` to a new file `to` (every chunk verified on
/// read), fsyncs it, and returns the bytes of data written (holes not counted).
pub fn restore(
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
        let data = store.get_chunk(&h)?.ok_or_else(|| {
            crate::store::StoreError::Read(format!("chunk {} of the point is missing", h.short()))
        })?;
        let (start, end) = chunk_range(size, chunk_size, i);
        if data.len() as u64 != end - start {
            return Err(crate::store::StoreError::Read(format!(
                "chunk {} has {} bytes where {} fit",
                h.short(),
                data.len(),
                end - start
            )));
        }
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
