//! An in-memory [`ChunkStore`] for fast tests. Nothing survives the process.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use super::codec::{CHUNK_BYTES_MAX, decode_chunk, encode_chunk};
use super::tree::Node;
use super::{ChunkStore, Op, StoreError, StoreStats};
use crate::hash::Hash;

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    chunks: HashMap<Hash, Vec<u8>>,
    nodes: HashMap<Hash, Vec<u8>>,
    meta: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain maps behind: still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Test hook: damage a stored chunk record in place.
    pub fn corrupt_chunk(&self, hash: &Hash) {
        if let Some(rec) = self.lock().chunks.get_mut(hash)
            && let Some(last) = rec.last_mut()
        {
            *last ^= 0x55;
        }
    }
}

impl ChunkStore for MemoryStore {
    fn put_chunk(&self, hash: &Hash, data: &[u8]) -> Result<bool, StoreError> {
        check_chunk(hash, data)?;
        let mut g = self.lock();
        if g.chunks.contains_key(hash) {
            return Ok(false);
        }
        g.chunks.insert(*hash, encode_chunk(data));
        Ok(true)
    }

    fn replace_chunk(&self, hash: &Hash, data: &[u8]) -> Result<(), StoreError> {
        check_chunk(hash, data)?;
        self.lock().chunks.insert(*hash, encode_chunk(data));
        Ok(())
    }

    fn get_chunk(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        let rec = self.lock().chunks.get(hash).cloned();
        rec.map(|r| decode_chunk(&r, CHUNK_BYTES_MAX, Some(hash)).map_err(|e| e.into_store(*hash)))
            .transpose()
    }

    fn has_chunk(&self, hash: &Hash) -> Result<bool, StoreError> {
        Ok(self.lock().chunks.contains_key(hash))
    }

    fn get_node(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        let rec = self.lock().nodes.get(hash).cloned();
        rec.map(|r| verify_node(hash, r)).transpose()
    }

    fn has_node(&self, hash: &Hash) -> Result<bool, StoreError> {
        Ok(self.lock().nodes.contains_key(hash))
    }

    fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().meta.get(key).cloned())
    }

    fn scan_meta(&self, prefix: &[u8]) -> Result<Vec<super::MetaEntry>, StoreError> {
        let g = self.lock();
        Ok(g.meta
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn apply(&self, ops: Vec<Op>, _durable: bool) -> Result<(), StoreError> {
        for op in &ops {
            if let Op::PutNode(h, bytes) = op
                && Node::hash_encoded(bytes) != *h
            {
                return Err(StoreError::NodeMismatch { hash: *h });
            }
        }
        let mut g = self.lock();
        for op in ops {
            match op {
                Op::PutNode(h, bytes) => {
                    g.nodes.insert(h, bytes);
                }
                Op::PutMeta(k, v) => {
                    g.meta.insert(k, v);
                }
                Op::DeleteMeta(k) => {
                    g.meta.remove(&k);
                }
                Op::DeleteNode(h) => {
                    g.nodes.remove(&h);
                }
                Op::DeleteChunk(h) => {
                    g.chunks.remove(&h);
                }
            }
        }
        Ok(())
    }

    fn chunk_names(&self) -> Result<Vec<Hash>, StoreError> {
        Ok(self.lock().chunks.keys().copied().collect())
    }

    fn node_names(&self) -> Result<Vec<Hash>, StoreError> {
        Ok(self.lock().nodes.keys().copied().collect())
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        let g = self.lock();
        Ok(StoreStats {
            chunks: g.chunks.len() as u64,
            nodes: g.nodes.len() as u64,
            chunk_bytes: g.chunks.values().map(|v| v.len() as u64).sum(),
            delta_chunks: 0,
        })
    }
}

/// Checks a chunk against its name before it is stored (invariant 1).
pub(super) fn check_chunk(hash: &Hash, data: &[u8]) -> Result<(), StoreError> {
    check_shape(hash, data)?;
    let actual = Hash::of_chunk(data);
    if actual != *hash {
        return Err(StoreError::ChunkMismatch {
            hash: *hash,
            actual,
        });
    }
    Ok(())
}

/// What `check_chunk` checks but the name: for a [`super::CheckedChunk`],
/// whose name was checked when it was made.
pub(super) fn check_shape(hash: &Hash, data: &[u8]) -> Result<(), StoreError> {
    if hash.is_zero() {
        return Err(StoreError::ZeroChunk(*hash));
    }
    if data.len() > CHUNK_BYTES_MAX {
        return Err(StoreError::ChunkTooLarge(data.len()));
    }
    Ok(())
}

/// Checks a node record read back against its name.
pub(super) fn verify_node(hash: &Hash, bytes: Vec<u8>) -> Result<Vec<u8>, StoreError> {
    if Node::hash_encoded(&bytes) != *hash {
        return Err(StoreError::NodeCorrupt {
            hash: *hash,
            reason: "content does not match its name".into(),
        });
    }
    Ok(bytes)
}
