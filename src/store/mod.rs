//! The content-addressed store: chunks, tree nodes, volume state and recovery points.

mod codec;
pub mod conformance;
pub mod gc;
mod memory;
mod rocks;
pub mod scrub;
pub mod state;
pub mod tree;

pub use codec::{
    CHUNK_BYTES_MAX, CheckedChunk, StoredDelta, compress_frame, decode_checked, decode_chunk,
    decompress_frame, encode_chunk, encode_chunk_at, encode_delta, looks_incompressible,
    parse_delta,
};
pub use memory::MemoryStore;
pub use rocks::{CHUNKS_WRITE_BUFFER_BYTES, RocksStore};

use crate::hash::Hash;

/// Errors of the store, by subject and verb.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("chunk {hash:?}: content does not match its name (expected {hash}, got {actual})")]
    ChunkMismatch { hash: Hash, actual: Hash },
    #[error("chunk {hash:?}: stored record is damaged: {reason}")]
    ChunkCorrupt { hash: Hash, reason: String },
    #[error("chunk {0:?}: the all-zero name is reserved; zero chunks are never stored")]
    ZeroChunk(Hash),
    #[error("chunk of {0} bytes exceeds the 4 MiB chunk limit")]
    ChunkTooLarge(usize),
    #[error("node {hash:?}: content does not match its name")]
    NodeMismatch { hash: Hash },
    #[error("node {hash:?}: stored record is damaged: {reason}")]
    NodeCorrupt { hash: Hash, reason: String },
    #[error("store: cannot open {path}: {message}")]
    Open { path: String, message: String },
    #[error("store: read failed: {0}")]
    Read(String),
    #[error("store: write failed: {0}")]
    Write(String),
}

/// A meta key and its value.
pub type MetaEntry = (Vec<u8>, Vec<u8>);

/// One change in an atomic [`ChunkStore::apply`] batch.
#[derive(Clone, Debug)]
pub enum Op {
    /// Record a tree node (its encoding, see [`tree::Node`]). The caller asserts
    /// that every chunk and node below it is already in the store.
    PutNode(Hash, Vec<u8>),
    PutMeta(Vec<u8>, Vec<u8>),
    DeleteMeta(Vec<u8>),
    /// Garbage collection only: the caller asserts no kept root reaches it.
    DeleteNode(Hash),
    /// Garbage collection only: the caller asserts no kept root reaches it,
    /// and that every node that could reach it was deleted first.
    DeleteChunk(Hash),
}

/// Sizes for operator reads; RocksDB gives estimates.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct StoreStats {
    pub chunks: u64,
    pub nodes: u64,
    /// Bytes the chunk records take after compression (estimate on RocksDB).
    pub chunk_bytes: u64,
    /// Of the chunks, those kept as the blocks that differ from a base.
    #[serde(default)]
    pub delta_chunks: u64,
}

/// A stored delta's parts ([`ChunkStore::get_delta`]): `base` (all zeros: a
/// hole) of `len` bytes with `blocks` replaced by `data`. Not checked: only
/// the rebuilt chunk's name says it is right.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaParts {
    pub base: Hash,
    pub len: usize,
    pub blocks: Vec<u32>,
    pub data: Vec<u8>,
}

/// What [`ChunkStore::reclaim_space`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reclaimed {
    /// Bytes the chunk records' files took before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Live records were moved out of files mostly holding deleted ones.
    pub relocated: bool,
}

/// The store contract. Every implementation passes [`conformance`].
///
/// - Chunks are named by the blake3 hash of their uncompressed bytes. `put_chunk`
///   verifies the name before anything is written and `get_chunk` verifies it
///   again after reading (invariant 1): a mismatch is an error, never data.
/// - The all-zero name is refused: zero chunks are holes, never stored.
/// - Nodes are stored only through `apply`, and a node's presence promises its
///   whole subtree is present: `has_node` is how peers skip subtrees.
/// - `put_chunk` need not be durable on its own, nor survive the daemon's
///   crash. `apply` is atomic and, when `durable` and it returns Ok, durable
///   together with every earlier `put_chunk`; a batch that puts a node keeps
///   the chunks put before it in any crash that keeps the node. Nothing is
///   acknowledged after a failed write (invariant 7).
/// - Meta keys are opaque bytes; `scan_meta` returns keys in byte order.
pub trait ChunkStore: Send + Sync + 'static {
    /// Stores a chunk after checking `blake3(data) == hash`. Returns true when
    /// the chunk was new. Idempotent.
    fn put_chunk(&self, hash: &Hash, data: &[u8]) -> Result<bool, StoreError>;
    /// As `put_chunk`, for a chunk already checked against its name, with
    /// `record` the encoding it was decoded from (see [`encode_chunk`]): it
    /// is stored as it is, so a chunk that arrived compressed is neither
    /// compressed nor hashed twice.
    fn put_chunk_record(&self, chunk: &CheckedChunk, record: Vec<u8>) -> Result<bool, StoreError> {
        let _ = record;
        self.put_chunk(&chunk.hash(), chunk.data())
    }
    /// As `put_chunk`, for a chunk already checked against its name (a
    /// chunk rebuilt from a delta): not hashed again.
    fn put_checked(&self, chunk: &CheckedChunk) -> Result<bool, StoreError> {
        self.put_chunk(&chunk.hash(), chunk.data())
    }
    /// As `put_checked`, for a chunk that differs from `base` (all zeros: a
    /// hole) in the 4 KiB `blocks` (strictly increasing): the store may keep
    /// only those blocks and the base's name, which costs neither compressing
    /// the whole chunk nor storing it. `blocks_record` is those blocks of
    /// the chunk encoded (see [`encode_chunk`]) if the caller has them.
    ///
    /// The caller asserts that `base` is in the store and that a collection
    /// cannot delete it while this call runs (a leaf of a committed tree,
    /// under the gc lock). From then on the store keeps `base` for as long
    /// as it keeps this chunk ([`ChunkStore::delta_bases`]). A base that is
    /// itself a delta, or a chunk most of whose blocks changed, is stored
    /// whole: reading a chunk never takes more than its base.
    fn put_chunk_delta(
        &self,
        chunk: &CheckedChunk,
        base: &Hash,
        blocks: &[u32],
        blocks_record: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        let _ = (base, blocks, blocks_record);
        self.put_checked(chunk)
    }
    /// As `put_chunk`, for a chunk that may differ from `base` (all zeros:
    /// a hole) in a few 4 KiB blocks: the store reads the base (verified)
    /// and keeps only the blocks that differ from it, when they are fewer
    /// than half. The same assertion about `base` as for `put_chunk_delta`.
    fn put_chunk_over(&self, hash: &Hash, data: &[u8], base: &Hash) -> Result<bool, StoreError> {
        let _ = base;
        self.put_chunk(hash, data)
    }
    /// Every chunk stored as a delta, with its base: a collection keeps the
    /// base of every delta it keeps.
    fn delta_bases(&self) -> Result<Vec<(Hash, Hash)>, StoreError> {
        Ok(Vec::new())
    }
    /// Writes a chunk's record whatever is stored under its name, after
    /// checking `blake3(data) == hash`: a scrub putting back a record found
    /// damaged (`put_chunk` skips a name it has). Durable with the next
    /// durable `apply`.
    fn replace_chunk(&self, hash: &Hash, data: &[u8]) -> Result<(), StoreError>;
    /// Reads and verifies a chunk; `None` when absent.
    fn get_chunk(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError>;
    /// A chunk stored as a delta, without reading its base: the base's
    /// name and the changed blocks with their bytes, for a caller that
    /// holds the base's bytes already (a replica image) and checks the
    /// rebuilt chunk's name. `None` when it is stored whole or absent.
    fn get_delta(&self, hash: &Hash) -> Result<Option<DeltaParts>, StoreError> {
        let _ = hash;
        Ok(None)
    }
    fn has_chunk(&self, hash: &Hash) -> Result<bool, StoreError>;
    /// Reads and verifies a node's encoding; `None` when absent.
    fn get_node(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError>;
    fn has_node(&self, hash: &Hash) -> Result<bool, StoreError>;
    fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    fn scan_meta(&self, prefix: &[u8]) -> Result<Vec<MetaEntry>, StoreError>;
    /// Applies `ops` atomically and durably (when `durable`).
    fn apply(&self, ops: Vec<Op>, durable: bool) -> Result<(), StoreError>;
    fn stats(&self) -> Result<StoreStats, StoreError>;
    /// Gives back the disk space of deleted chunks that the store holds
    /// until asked (RocksDB's blob files: a deleted record's bytes stay in
    /// its file until the file is rewritten). A collection calls it after
    /// it deleted chunks; it may take long on a large store.
    fn reclaim_space(&self) -> Result<Reclaimed, StoreError> {
        Ok(Reclaimed::default())
    }
    /// The daemon stops: background work (a reclaim's compaction) is
    /// abandoned, to be done again later, rather than waited for. Nothing
    /// is written after it.
    fn stop_background_work(&self) {}
    /// Every chunk name in the store, in no particular order (for GC).
    fn chunk_names(&self) -> Result<Vec<Hash>, StoreError>;
    /// Every node name in the store, in no particular order (for GC).
    fn node_names(&self) -> Result<Vec<Hash>, StoreError>;
}
