//! The RocksDB [`ChunkStore`]: one database, three column families.
//!
//! - `chunks`: chunk records (see `codec`), values in integrated BlobDB blob
//!   files so that compaction moves keys, not 64 KiB payloads. RocksDB's own
//!   compression is off there: records are already zstd or incompressible.
//! - `nodes`: tree nodes, small and hot.
//! - `meta`: volume state, recovery points, pairing tokens.
//!
//! All three share one write-ahead log, so a synced `apply` makes every earlier
//! `put_chunk` durable as well.

use std::path::Path;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions,
};

use super::codec::{CHUNK_BYTES_MAX, decode_chunk, encode_chunk};
use super::memory::{check_chunk, verify_node};
use super::tree::Node;
use super::{ChunkStore, Op, StoreError, StoreStats};
use crate::hash::Hash;

const CF_CHUNKS: &str = "chunks";
const CF_NODES: &str = "nodes";
const CF_META: &str = "meta";

pub struct RocksStore {
    db: DB,
}

impl RocksStore {
    pub fn open(path: &Path) -> Result<RocksStore, StoreError> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_keep_log_file_num(4);

        let cache = Cache::new_lru_cache(64 << 20);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);

        let mut chunks = Options::default();
        chunks.set_enable_blob_files(true);
        chunks.set_min_blob_size(1024);
        chunks.set_blob_file_size(256 << 20);
        chunks.set_enable_blob_gc(true);
        chunks.set_write_buffer_size(64 << 20);
        chunks.set_compression_type(rocksdb::DBCompressionType::None);
        chunks.set_blob_compression_type(rocksdb::DBCompressionType::None);
        chunks.set_block_based_table_factory(&table);

        let mut nodes = Options::default();
        nodes.set_block_based_table_factory(&table);
        nodes.set_compression_type(rocksdb::DBCompressionType::None);
        let mut meta = Options::default();
        meta.set_block_based_table_factory(&table);

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunks),
            ColumnFamilyDescriptor::new(CF_NODES, nodes),
            ColumnFamilyDescriptor::new(CF_META, meta),
        ];
        let db = DB::open_cf_descriptors(&db_opts, path, cfs).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(RocksStore { db })
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| StoreError::Read(format!("column family {name} missing")))
    }

    fn prop(&self, cf: &str, name: &str) -> u64 {
        self.cf(cf)
            .ok()
            .and_then(|cf| self.db.property_int_value_cf(cf, name).ok().flatten())
            .unwrap_or(0)
    }

    fn names(&self, cf: &str) -> Result<Vec<Hash>, StoreError> {
        let cf = self.cf(cf)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, _) = item.map_err(|e| StoreError::Read(e.to_string()))?;
            // Keys are 32-byte names; anything else is not ours and is left alone.
            if let Ok(k) = <[u8; 32]>::try_from(&k[..]) {
                out.push(Hash(k));
            }
        }
        Ok(out)
    }

    /// Test hook: damage a stored chunk record in place.
    pub fn corrupt_chunk(&self, hash: &Hash) -> Result<(), StoreError> {
        let cf = self.cf(CF_CHUNKS)?;
        if let Some(mut rec) = self
            .db
            .get_cf(cf, hash.0)
            .map_err(|e| StoreError::Read(e.to_string()))?
        {
            if let Some(last) = rec.last_mut() {
                *last ^= 0x55;
            }
            self.db
                .put_cf(cf, hash.0, rec)
                .map_err(|e| StoreError::Write(e.to_string()))?;
        }
        Ok(())
    }
}

/// A failed read: RocksDB's checksums found the record damaged (reported
/// as the object's damage, which `ferry scrub` repairs), or another error.
fn read_error(e: rocksdb::Error, damaged: impl FnOnce(String) -> StoreError) -> StoreError {
    if e.kind() == rocksdb::ErrorKind::Corruption {
        damaged(e.to_string())
    } else {
        StoreError::Read(e.to_string())
    }
}

impl ChunkStore for RocksStore {
    fn put_chunk(&self, hash: &Hash, data: &[u8]) -> Result<bool, StoreError> {
        check_chunk(hash, data)?;
        if self.has_chunk(hash)? {
            return Ok(false);
        }
        let cf = self.cf(CF_CHUNKS)?;
        self.db
            .put_cf(cf, hash.0, encode_chunk(data))
            .map_err(|e| StoreError::Write(e.to_string()))?;
        Ok(true)
    }

    fn put_chunk_record(
        &self,
        hash: &Hash,
        data: &[u8],
        record: Vec<u8>,
    ) -> Result<bool, StoreError> {
        check_chunk(hash, data)?;
        if self.has_chunk(hash)? {
            return Ok(false);
        }
        let cf = self.cf(CF_CHUNKS)?;
        self.db
            .put_cf(cf, hash.0, record)
            .map_err(|e| StoreError::Write(e.to_string()))?;
        Ok(true)
    }

    fn replace_chunk(&self, hash: &Hash, data: &[u8]) -> Result<(), StoreError> {
        check_chunk(hash, data)?;
        let cf = self.cf(CF_CHUNKS)?;
        self.db
            .put_cf(cf, hash.0, encode_chunk(data))
            .map_err(|e| StoreError::Write(e.to_string()))
    }

    fn get_chunk(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        let cf = self.cf(CF_CHUNKS)?;
        let rec = self.db.get_pinned_cf(cf, hash.0).map_err(|e| {
            read_error(e, |reason| StoreError::ChunkCorrupt {
                hash: *hash,
                reason,
            })
        })?;
        rec.map(|r| decode_chunk(&r, CHUNK_BYTES_MAX, Some(hash)).map_err(|e| e.into_store(*hash)))
            .transpose()
    }

    fn has_chunk(&self, hash: &Hash) -> Result<bool, StoreError> {
        let cf = self.cf(CF_CHUNKS)?;
        if !self.db.key_may_exist_cf(cf, hash.0) {
            return Ok(false);
        }
        // get_pinned avoids copying the value; with blob files only the index entry is read.
        Ok(self
            .db
            .get_pinned_cf(cf, hash.0)
            .map_err(|e| StoreError::Read(e.to_string()))?
            .is_some())
    }

    fn get_node(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        let cf = self.cf(CF_NODES)?;
        let rec = self.db.get_cf(cf, hash.0).map_err(|e| {
            read_error(e, |reason| StoreError::NodeCorrupt {
                hash: *hash,
                reason,
            })
        })?;
        rec.map(|r| verify_node(hash, r)).transpose()
    }

    fn has_node(&self, hash: &Hash) -> Result<bool, StoreError> {
        let cf = self.cf(CF_NODES)?;
        Ok(self
            .db
            .get_pinned_cf(cf, hash.0)
            .map_err(|e| StoreError::Read(e.to_string()))?
            .is_some())
    }

    fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let cf = self.cf(CF_META)?;
        self.db
            .get_cf(cf, key)
            .map_err(|e| StoreError::Read(e.to_string()))
    }

    fn scan_meta(&self, prefix: &[u8]) -> Result<Vec<super::MetaEntry>, StoreError> {
        let cf = self.cf(CF_META)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            cf,
            rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward),
        ) {
            let (k, v) = item.map_err(|e| StoreError::Read(e.to_string()))?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn apply(&self, ops: Vec<Op>, durable: bool) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let (nodes, meta) = (self.cf(CF_NODES)?, self.cf(CF_META)?);
        for op in ops {
            match op {
                Op::PutNode(h, bytes) => {
                    if Node::hash_encoded(&bytes) != h {
                        return Err(StoreError::NodeMismatch { hash: h });
                    }
                    batch.put_cf(nodes, h.0, bytes);
                }
                Op::PutMeta(k, v) => batch.put_cf(meta, k, v),
                Op::DeleteMeta(k) => batch.delete_cf(meta, k),
                Op::DeleteNode(h) => batch.delete_cf(nodes, h.0),
                Op::DeleteChunk(h) => batch.delete_cf(self.cf(CF_CHUNKS)?, h.0),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(durable);
        self.db
            .write_opt(batch, &wo)
            .map_err(|e| StoreError::Write(e.to_string()))
    }

    fn chunk_names(&self) -> Result<Vec<Hash>, StoreError> {
        self.names(CF_CHUNKS)
    }

    fn node_names(&self) -> Result<Vec<Hash>, StoreError> {
        self.names(CF_NODES)
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        Ok(StoreStats {
            chunks: self.prop(CF_CHUNKS, "rocksdb.estimate-num-keys"),
            nodes: self.prop(CF_NODES, "rocksdb.estimate-num-keys"),
            chunk_bytes: self.prop(CF_CHUNKS, "rocksdb.total-blob-file-size")
                + self.prop(CF_CHUNKS, "rocksdb.cur-size-all-mem-tables")
                + self.prop(CF_CHUNKS, "rocksdb.total-sst-files-size"),
        })
    }
}
