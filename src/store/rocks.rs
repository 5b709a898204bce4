//! The RocksDB [`ChunkStore`]: one database, three column families.
//!
//! - `chunks`: chunk records (see `codec`), values in integrated BlobDB blob
//!   files so that compaction moves keys, not 64 KiB payloads. RocksDB's own
//!   compression is off there: records are already zstd or incompressible.
//!   Blob garbage collection is off in ordinary compactions: with it on,
//!   every compaction rewrote the live records of the oldest quarter of the
//!   blob files, garbage or not (a seed of 1 GiB wrote another 0.5 GB, and
//!   a large store would have rewritten a quarter of itself at every
//!   compaction). Only deletions make garbage, and only a collection
//!   deletes: it then calls `reclaim_space`, which rewrites live records
//!   only once half the blob bytes or more are garbage.
//! - `nodes`: tree nodes, small and hot.
//! - `meta`: volume state, recovery points, pairing tokens.
//! - `bases`: for each chunk stored as a delta, its base's name (small:
//!   a collection reads it whole to keep the bases of the deltas it keeps).
//!
//! Whole chunk records skip the write-ahead log: logged, every chunk byte was
//! written twice (the log, then the blob file at the memtable's flush), a
//! third of what a seed writes at the DR side. Instead, an `apply` that is
//! synced, or that puts a node (whose presence promises its chunks), first
//! flushes the chunks column family when a chunk was put since the last
//! flush: a synced `apply` still makes every earlier `put_chunk` durable, and
//! no node outlives its chunks in a crash. A chunk put and not yet flushed is
//! lost when the daemon dies; nothing durable names it then, and a pass asks
//! for it again. Deltas (small, with their `bases` entry) and a scrub's
//! repairs stay logged. The other column families share one log.

use std::path::Path;

use librocksdb_sys as ffi;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions,
};

use super::codec::{
    CHUNK_BYTES_MAX, CheckedChunk, decode_chunk, encode_chunk, encode_delta, parse_delta,
};
use super::memory::{check_chunk, check_shape, verify_node};
use super::tree::Node;
use super::{ChunkStore, DeltaParts, Op, Reclaimed, StoreError, StoreStats};
use crate::hash::Hash;

/// The chunks column family's memtable. Chunk records skip the log, so a
/// daemon killed before a flush loses at most two of these (the active one
/// and the one being flushed; a third stalls the writes) of records that
/// nothing durable names yet: a seed resumed after it sends them again.
pub const CHUNKS_WRITE_BUFFER_BYTES: u64 = 64 << 20;

/// `reclaim_space` rewrites the live chunk records once at least this
/// share of the blob files' bytes is garbage: it then writes no more bytes
/// than it frees.
const RECLAIM_GARBAGE_SHARE: f64 = 0.5;

const CF_CHUNKS: &str = "chunks";
const CF_NODES: &str = "nodes";
const CF_META: &str = "meta";
const CF_BASES: &str = "bases";

/// A RocksDB iterator over one column family that loads no blob values
/// (`allow_unprepared_value`), with the read options it was made with and
/// the upper bound they point to; all are destroyed when it drops (the
/// iterator first). It borrows the database, so it cannot outlive it; the
/// C API's pointers stay inside.
struct KeyIter<'a> {
    opts: *mut ffi::rocksdb_readoptions_t,
    iter: *mut ffi::rocksdb_iterator_t,
    /// The options keep a pointer to it, not a copy: it lives as long.
    _upper: Option<Box<[u8]>>,
    _db: std::marker::PhantomData<&'a DB>,
}

impl<'a> KeyIter<'a> {
    /// An iterator over the keys of `cf` below `upper` (all without one).
    /// `scan`: a listing of the whole family, which leaves the block cache
    /// to the reads; a point question fills it as a get would.
    fn new(
        db: &'a DB,
        cf: &'a rocksdb::ColumnFamily,
        upper: Option<Box<[u8]>>,
        scan: bool,
    ) -> KeyIter<'a> {
        use rocksdb::{AsColumnFamilyRef, AsRawPtr};
        // SAFETY: the database and the handle are borrowed for 'a, which
        // the iterator cannot outlive; the options are set before the
        // iterator is made from them; the bound's heap buffer does not move
        // when the box does, and is dropped after the iterator and options.
        unsafe {
            let opts = ffi::rocksdb_readoptions_create();
            ffi::rocksdb_readoptions_set_allow_unprepared_value(opts, 1);
            ffi::rocksdb_readoptions_set_fill_cache(opts, u8::from(!scan));
            if let Some(b) = &upper {
                ffi::rocksdb_readoptions_set_iterate_upper_bound(opts, b.as_ptr().cast(), b.len());
            }
            let iter = ffi::rocksdb_create_iterator_cf(db.as_raw_ptr(), opts, cf.inner());
            KeyIter {
                opts,
                iter,
                _upper: upper,
                _db: std::marker::PhantomData,
            }
        }
    }

    fn seek_to_first(&mut self) {
        // SAFETY: the iterator is live until `self` drops.
        unsafe { ffi::rocksdb_iter_seek_to_first(self.iter) }
    }

    /// To the first key at or after `key`.
    fn seek(&mut self, key: &[u8]) {
        // SAFETY: as above; RocksDB copies what it keeps of `key`.
        unsafe { ffi::rocksdb_iter_seek(self.iter, key.as_ptr().cast(), key.len()) }
    }

    fn next(&mut self) {
        // SAFETY: as above; called only where `key` gave a key.
        unsafe { ffi::rocksdb_iter_next(self.iter) }
    }

    /// The key the iterator is at, `None` past the end (or on an error:
    /// see `take_error`). Borrowed until the iterator moves.
    fn key(&self) -> Option<&[u8]> {
        // SAFETY: the key pointer is read only while the iterator is valid,
        // for the length RocksDB gives with it, and the borrow of `self`
        // keeps it from moving (every move takes `&mut self`).
        unsafe {
            if ffi::rocksdb_iter_valid(self.iter) == 0 {
                return None;
            }
            let mut len: libc::size_t = 0;
            let k = ffi::rocksdb_iter_key(self.iter, &mut len);
            (!k.is_null()).then(|| std::slice::from_raw_parts(k.cast::<u8>(), len))
        }
    }

    /// The error that ended the iteration, if one did.
    fn take_error(&self) -> Result<(), StoreError> {
        let mut err: *mut libc::c_char = std::ptr::null_mut();
        // SAFETY: `err` is set to a string RocksDB allocated, or left null;
        // it is copied, then freed with RocksDB's own free.
        unsafe {
            ffi::rocksdb_iter_get_error(self.iter, &mut err);
            if err.is_null() {
                return Ok(());
            }
            let msg = std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned();
            ffi::rocksdb_free(err.cast());
            Err(StoreError::Read(msg))
        }
    }
}

impl Drop for KeyIter<'_> {
    fn drop(&mut self) {
        // SAFETY: both were created in `new` and are destroyed once, the
        // iterator before the options it was made with.
        unsafe {
            ffi::rocksdb_iter_destroy(self.iter);
            ffi::rocksdb_readoptions_destroy(self.opts);
        }
    }
}

pub struct RocksStore {
    db: DB,
    path: std::path::PathBuf,
    /// A chunk record was written without the log since the chunks column
    /// family was last flushed; written only under `put_gate`.
    unlogged: std::sync::atomic::AtomicBool,
    /// Held (shared) by a write without the log until its flag is set, and
    /// (exclusive) by a flush while it takes the flag: a write another
    /// thread can already read is always one a flush sees.
    put_gate: std::sync::RwLock<()>,
    /// Held by a flush until it is done: a batch that must follow the
    /// chunks waits for a flush under way instead of finding the flag
    /// taken and writing before the flush ends.
    flushing: std::sync::Mutex<()>,
}

impl RocksStore {
    pub fn open(path: &Path) -> Result<RocksStore, StoreError> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        // One flush and two compactions: a reclaim's long compaction
        // leaves one for the others.
        db_opts.set_max_background_jobs(3);
        db_opts.set_keep_log_file_num(4);
        // Flushes and compactions write their files past the page cache:
        // a seed's chunk records are written once, by the device, instead
        // of copied into the cache (a third of the DR side's CPU on a seed
        // of random data) and kept there, crowding out the replica image.
        // Reads still go through it. Only where the file system takes
        // O_DIRECT.
        let direct = direct_io_works(path);
        db_opts.set_use_direct_io_for_flush_and_compaction(direct);
        if !direct {
            tracing::info!(path = %path.display(), "the store's file system takes no O_DIRECT; its files are written through the page cache");
        }

        let cache = Cache::new_lru_cache(64 << 20);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);

        let mut chunks = Options::default();
        chunks.set_enable_blob_files(true);
        chunks.set_min_blob_size(1024);
        chunks.set_blob_file_size(256 << 20);
        chunks.set_enable_blob_gc(false);
        chunks.set_write_buffer_size(CHUNKS_WRITE_BUFFER_BYTES as usize);
        chunks.set_max_write_buffer_number(2);
        chunks.set_compression_type(rocksdb::DBCompressionType::None);
        chunks.set_blob_compression_type(rocksdb::DBCompressionType::None);
        chunks.set_block_based_table_factory(&table);

        let mut nodes = Options::default();
        nodes.set_block_based_table_factory(&table);
        nodes.set_compression_type(rocksdb::DBCompressionType::None);
        let mut meta = Options::default();
        meta.set_block_based_table_factory(&table);
        let mut bases = Options::default();
        bases.set_block_based_table_factory(&table);
        bases.set_compression_type(rocksdb::DBCompressionType::None);

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunks),
            ColumnFamilyDescriptor::new(CF_NODES, nodes),
            ColumnFamilyDescriptor::new(CF_META, meta),
            ColumnFamilyDescriptor::new(CF_BASES, bases),
        ];
        let db = DB::open_cf_descriptors(&db_opts, path, cfs).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(RocksStore {
            db,
            path: path.to_path_buf(),
            unlogged: std::sync::atomic::AtomicBool::new(false),
            put_gate: std::sync::RwLock::new(()),
            flushing: std::sync::Mutex::new(()),
        })
    }

    /// Writes a whole chunk record without the write-ahead log (see the
    /// module's comment): durable at the next flush of the chunks column
    /// family, which `apply` makes when it must.
    fn put_unlogged(&self, hash: &Hash, record: &[u8]) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        let _gate = self.put_gate.read().unwrap_or_else(|e| e.into_inner());
        self.db
            .put_cf_opt(self.cf(CF_CHUNKS)?, hash.0, record, &wo)
            .map_err(|e| StoreError::Write(e.to_string()))?;
        self.unlogged
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Flushes the chunks column family if a chunk record was written
    /// without the log since its last flush, and waits for it. On failure
    /// the flag stays set, so the next durable `apply` tries again.
    fn flush_unlogged(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        let _flushing = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        {
            // No write is between its put and its flag now.
            let _gate = self.put_gate.write().unwrap_or_else(|e| e.into_inner());
            if !self.unlogged.swap(false, SeqCst) {
                return Ok(());
            }
        }
        let mut fo = rocksdb::FlushOptions::default();
        fo.set_wait(true);
        let t0 = std::time::Instant::now();
        let flushed = self.cf(CF_CHUNKS).and_then(|cf| {
            self.db
                .flush_cf_opt(cf, &fo)
                .map_err(|e| StoreError::Write(format!("flushing chunk records: {e}")))
        });
        if flushed.is_err() {
            self.unlogged.store(true, SeqCst);
        }
        tracing::debug!(
            ms = t0.elapsed().as_millis() as u64,
            "chunk records flushed"
        );
        flushed
    }

    /// Test hook: chunk records only in the memtable (not yet in a file).
    #[cfg(test)]
    fn chunks_in_memtable(&self) -> u64 {
        self.prop(CF_CHUNKS, "rocksdb.num-entries-active-mem-table")
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

    /// The names in column family `cf`, read from its keys alone. An
    /// ordinary iterator reads the value of every entry it stops at, and a
    /// chunk's value is in a blob file: a collection's listing read the
    /// whole store from the disk. With `allow_unprepared_value` RocksDB
    /// loads a blob value only when asked for it, which this never does;
    /// rocksdb 0.25 does not wrap the option, hence the C API here.
    fn names(&self, cf: &str) -> Result<Vec<Hash>, StoreError> {
        let mut it = KeyIter::new(&self.db, self.cf(cf)?, None, true);
        let mut out = Vec::new();
        it.seek_to_first();
        while let Some(k) = it.key() {
            // Keys are 32-byte names; anything else is not ours and is left alone.
            if let Ok(k) = <[u8; 32]>::try_from(k) {
                out.push(Hash(k));
            }
            it.next();
        }
        it.take_error()?;
        Ok(out)
    }

    /// Whether column family `cf` holds `key`, without reading its value.
    fn has_key(&self, cf: &rocksdb::ColumnFamily, key: &[u8]) -> Result<bool, StoreError> {
        // Bounded to the key itself (the next key up is `key` and a 0):
        // a seek for a deleted name would otherwise walk every deleted key
        // after it, all of them when most of the store was just deleted.
        let mut upper = Vec::with_capacity(key.len() + 1);
        upper.extend_from_slice(key);
        upper.push(0);
        let mut it = KeyIter::new(&self.db, cf, Some(upper.into_boxed_slice()), false);
        it.seek(key);
        let found = it.key() == Some(key);
        it.take_error()?;
        Ok(found)
    }

    /// The base of `hash` when it is stored as a delta.
    fn base_of(&self, hash: &Hash) -> Result<Option<Hash>, StoreError> {
        let cf = self.cf(CF_BASES)?;
        let v = self
            .db
            .get_pinned_cf(cf, hash.0)
            .map_err(|e| StoreError::Read(e.to_string()))?;
        Ok(v.and_then(|v| <[u8; 32]>::try_from(&v[..]).ok().map(Hash)))
    }

    /// A chunk's bytes from its record: whole, or rebuilt over its base
    /// (which must be stored whole), then checked against its name.
    fn decode_record(&self, hash: &Hash, rec: &[u8]) -> Result<Vec<u8>, StoreError> {
        let corrupt = |reason: String| StoreError::ChunkCorrupt {
            hash: *hash,
            reason,
        };
        let Some(d) = delta_parts(hash, rec)? else {
            return decode_chunk(rec, CHUNK_BYTES_MAX, Some(hash)).map_err(|e| e.into_store(*hash));
        };
        let base = if d.base.is_zero() {
            vec![0u8; d.len]
        } else {
            let cf = self.cf(CF_CHUNKS)?;
            let brec = self
                .db
                .get_pinned_cf(cf, d.base.0)
                .map_err(|e| read_error(e, corrupt))?
                .ok_or_else(|| corrupt(format!("its delta base {} is missing", d.base.short())))?;
            if parse_delta(&brec).ok().flatten().is_some() {
                return Err(corrupt(format!(
                    "its delta base {} is itself a delta",
                    d.base.short()
                )));
            }
            decode_chunk(&brec, d.len, Some(&d.base))
                .map_err(|e| corrupt(format!("its delta base {}: {e}", d.base.short())))?
        };
        if base.len() != d.len {
            return Err(corrupt(format!(
                "delta of {} bytes over a base of {}",
                d.len,
                base.len()
            )));
        }
        let data = crate::volume::delta::apply(&base, &d.blocks, &d.data)
            .map_err(|e| corrupt(format!("delta: {e}")))?;
        let actual = Hash::of_chunk(&data);
        if actual != *hash {
            return Err(StoreError::ChunkMismatch {
                hash: *hash,
                actual,
            });
        }
        Ok(data)
    }

    /// Writes `hash` as `blocks` over `base` (`record`: those blocks,
    /// encoded), with its entry in the bases column family, atomically.
    fn write_delta(
        &self,
        hash: &Hash,
        len: usize,
        base: &Hash,
        blocks: &[u32],
        record: &[u8],
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_CHUNKS)?,
            hash.0,
            encode_delta(len, base, blocks, record),
        );
        batch.put_cf(self.cf(CF_BASES)?, hash.0, base.0);
        self.db
            .write(batch)
            .map_err(|e| StoreError::Write(e.to_string()))
    }

    /// A chunk checked against its name, compressed and stored whole
    /// unless the store has it. Returns true when it was new.
    fn put_whole(&self, hash: &Hash, data: &[u8]) -> Result<bool, StoreError> {
        if self.has_chunk(hash)? {
            return Ok(false);
        }
        self.store_whole(hash, data)
    }

    /// As `put_whole`, for a chunk the caller found absent.
    fn store_whole(&self, hash: &Hash, data: &[u8]) -> Result<bool, StoreError> {
        self.put_unlogged(hash, &encode_chunk(data))?;
        Ok(true)
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

/// A chunk record's delta, its blocks decoded (unchecked: only the chunk
/// rebuilt from it is); `None` for a whole record.
fn delta_parts(hash: &Hash, rec: &[u8]) -> Result<Option<DeltaParts>, StoreError> {
    let corrupt = |reason: String| StoreError::ChunkCorrupt {
        hash: *hash,
        reason,
    };
    let Some(d) = parse_delta(rec).map_err(|e| corrupt(format!("delta record: {e}")))? else {
        return Ok(None);
    };
    let data = decode_chunk(d.blocks_record, d.len, None)
        .map_err(|e| corrupt(format!("delta blocks: {e}")))?;
    Ok(Some(DeltaParts {
        base: d.base,
        len: d.len,
        blocks: d.blocks,
        data,
    }))
}

/// Whether files in `dir` (created if missing) can be written with
/// O_DIRECT: not every file system takes it (some refuse the open, some an
/// aligned write), and RocksDB fails its writes where it cannot.
fn direct_io_works(dir: &Path) -> bool {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const ALIGN: usize = 4096;
    if std::fs::create_dir_all(dir).is_err() {
        return false;
    }
    let probe = dir.join("DIRECT_IO_PROBE");
    let works = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .and_then(|f| {
            // An aligned block inside a buffer twice its size.
            let buf = vec![0u8; 2 * ALIGN];
            let at = buf.as_ptr().align_offset(ALIGN);
            let block = at
                .checked_add(ALIGN)
                .and_then(|end| buf.get(at..end))
                .ok_or(std::io::ErrorKind::Other)?;
            f.write_all_at(block, 0)
        })
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    works
}

/// Bytes free for an unprivileged writer on the file system holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a statvfs to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
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
        self.put_whole(hash, data)
    }

    fn put_chunk_record(&self, chunk: &CheckedChunk, record: Vec<u8>) -> Result<bool, StoreError> {
        let hash = &chunk.hash();
        check_shape(hash, chunk.data())?;
        if self.has_chunk(hash)? {
            return Ok(false);
        }
        self.put_unlogged(hash, &record)?;
        Ok(true)
    }

    fn put_checked(&self, chunk: &CheckedChunk) -> Result<bool, StoreError> {
        check_shape(&chunk.hash(), chunk.data())?;
        self.put_whole(&chunk.hash(), chunk.data())
    }

    fn put_chunk_delta(
        &self,
        chunk: &CheckedChunk,
        base: &Hash,
        blocks: &[u32],
        blocks_record: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        use crate::volume::delta::{BLOCK_BYTES, extract};
        let (hash, data) = (&chunk.hash(), chunk.data().as_slice());
        check_shape(hash, data)?;
        if self.has_chunk(hash)? {
            return Ok(false);
        }
        let count = data.len().div_ceil(BLOCK_BYTES);
        let ordered = blocks.windows(2).all(|w| w[0] < w[1])
            && blocks.last().is_none_or(|&b| (b as usize) < count);
        if !ordered || blocks.is_empty() || base == hash {
            return self.store_whole(hash, data);
        }
        let (mut base, mut blocks) = (*base, std::borrow::Cow::Borrowed(blocks));
        if !base.is_zero() && self.base_of(&base)?.is_some() {
            // The base is a delta itself: this chunk differs from the base's
            // own base in the blocks of both, and is stored over that one
            // (kept as long as the base is), so a read never takes more
            // than one base.
            let cf = self.cf(CF_CHUNKS)?;
            let rec = self
                .db
                .get_pinned_cf(cf, base.0)
                .map_err(|e| StoreError::Read(e.to_string()))?;
            match rec.as_deref().map(parse_delta) {
                Some(Ok(Some(d))) if d.len == data.len() && d.base != *hash => {
                    let mut all: Vec<u32> = d.blocks.iter().chain(blocks.iter()).copied().collect();
                    all.sort_unstable();
                    all.dedup();
                    base = d.base;
                    blocks = std::borrow::Cow::Owned(all);
                }
                _ => return self.store_whole(hash, data),
            }
        }
        // Half the blocks or more: the whole chunk costs little more, and
        // reads without a base.
        if blocks.len() * 2 > count || blocks.last().is_some_and(|&b| b as usize >= count) {
            return self.store_whole(hash, data);
        }
        let changed: usize = blocks
            .iter()
            .map(|&b| (data.len() - b as usize * BLOCK_BYTES).min(BLOCK_BYTES))
            .sum();
        let record = match blocks_record {
            Some(r)
                if r.len() >= 5
                    && u32::from_le_bytes([r[1], r[2], r[3], r[4]]) as usize == changed =>
            {
                r
            }
            _ => encode_chunk(&extract(data, &blocks)),
        };
        self.write_delta(hash, data.len(), &base, &blocks, &record)?;
        Ok(true)
    }

    fn put_chunk_over(&self, hash: &Hash, data: &[u8], base: &Hash) -> Result<bool, StoreError> {
        use crate::volume::delta::{BLOCK_BYTES, extract};
        check_chunk(hash, data)?;
        if self.has_chunk(hash)? {
            return Ok(false);
        }
        // Over the base's own base when the base is a delta: a read never
        // takes more than one base.
        let anchor = match base.is_zero() {
            true => Hash::ZERO,
            false => self.base_of(base)?.unwrap_or(*base),
        };
        let old = if anchor.is_zero() {
            Some(vec![0u8; data.len()])
        } else if self.base_of(&anchor)?.is_some() {
            None
        } else {
            // Read and verified: the blocks are found by comparing with
            // the bytes the base holds, whatever the caller thinks changed.
            // A base that cannot be read is no base: the chunk goes whole.
            self.get_chunk(&anchor).ok().flatten()
        };
        let count = data.len().div_ceil(BLOCK_BYTES);
        let blocks: Vec<u32> = match old.filter(|o| o.len() == data.len()) {
            Some(old) => data
                .chunks(BLOCK_BYTES)
                .zip(old.chunks(BLOCK_BYTES))
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(i, _)| i as u32)
                .collect(),
            None => Vec::new(),
        };
        if blocks.is_empty() || blocks.len() * 2 > count || anchor == *hash {
            // Checked and found absent above.
            return self.store_whole(hash, data);
        }
        let record = encode_chunk(&extract(data, &blocks));
        self.write_delta(hash, data.len(), &anchor, &blocks, &record)?;
        Ok(true)
    }

    fn delta_bases(&self) -> Result<Vec<(Hash, Hash)>, StoreError> {
        let cf = self.cf(CF_BASES)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(|e| StoreError::Read(e.to_string()))?;
            if let (Ok(k), Ok(v)) = (<[u8; 32]>::try_from(&k[..]), <[u8; 32]>::try_from(&v[..])) {
                out.push((Hash(k), Hash(v)));
            }
        }
        Ok(out)
    }

    fn replace_chunk(&self, hash: &Hash, data: &[u8]) -> Result<(), StoreError> {
        check_chunk(hash, data)?;
        // Whole: a delta found damaged may be so through its base.
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_CHUNKS)?, hash.0, encode_chunk(data));
        batch.delete_cf(self.cf(CF_BASES)?, hash.0);
        self.db
            .write(batch)
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
        rec.map(|r| self.decode_record(hash, &r)).transpose()
    }

    fn get_delta(&self, hash: &Hash) -> Result<Option<DeltaParts>, StoreError> {
        // Every delta has an entry there: a chunk stored whole is not read.
        if self.base_of(hash)?.is_none() {
            return Ok(None);
        }
        let cf = self.cf(CF_CHUNKS)?;
        let corrupt = |reason: String| StoreError::ChunkCorrupt {
            hash: *hash,
            reason,
        };
        match self
            .db
            .get_pinned_cf(cf, hash.0)
            .map_err(|e| read_error(e, corrupt))?
        {
            Some(rec) => delta_parts(hash, &rec),
            None => Ok(None),
        }
    }

    fn has_chunk(&self, hash: &Hash) -> Result<bool, StoreError> {
        let cf = self.cf(CF_CHUNKS)?;
        // Most names a pass asks about are new: the bloom filters answer.
        if !self.db.key_may_exist_cf(cf, hash.0) {
            return Ok(false);
        }
        // A get would read the chunk's value from its blob file (from the
        // disk: the files are written past the cache), every chunk of an
        // image again when a promotion captures it into a point. A seek
        // that loads no value finds the key alone.
        self.has_key(cf, &hash.0)
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
        // The chunks first: a synced batch makes them durable with it, and
        // a node, even unsynced (its log record survives a daemon crash),
        // promises the chunks below it.
        if durable || ops.iter().any(|op| matches!(op, Op::PutNode(..))) {
            self.flush_unlogged()?;
        }
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
                Op::DeleteChunk(h) => {
                    batch.delete_cf(self.cf(CF_CHUNKS)?, h.0);
                    batch.delete_cf(self.cf(CF_BASES)?, h.0);
                }
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

    fn reclaim_space(&self) -> Result<Reclaimed, StoreError> {
        use rocksdb::{BottommostLevelCompaction, CompactOptions};
        let cf = self.cf(CF_CHUNKS)?;
        let blob_bytes = || self.prop(CF_CHUNKS, "rocksdb.total-blob-file-size");
        let bytes_before = blob_bytes();
        // RocksDB's compact_range reports no error: a failed compaction
        // shows as a background error more.
        let compact = |force: bool| -> Result<(), StoreError> {
            let errors = || {
                self.db
                    .property_int_value("rocksdb.background-errors")
                    .ok()
                    .flatten()
                    .unwrap_or(0)
            };
            let before = errors();
            let mut o = CompactOptions::default();
            if force {
                o.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
            }
            self.db
                .compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &o);
            match errors() > before {
                true => Err(StoreError::Write(
                    "a compaction of the chunk records failed (see the store's LOG)".into(),
                )),
                false => Ok(()),
            }
        };
        // The deletions meet their records at the bottom level: the
        // records' bytes count as garbage, and a blob file holding nothing
        // else is deleted.
        compact(false)?;
        let live = self.prop(CF_CHUNKS, "rocksdb.live-blob-file-size");
        let garbage = self.prop(CF_CHUNKS, "rocksdb.live-blob-file-garbage-size");
        let relocated = garbage > 0 && garbage as f64 >= live as f64 * RECLAIM_GARBAGE_SHARE;
        if relocated {
            // The old files go only once the new ones are written.
            let need = live.saturating_sub(garbage) + live / 10;
            if let Some(free) = free_bytes(&self.path)
                && free < need
            {
                return Err(StoreError::Write(format!(
                    "{garbage} of the store's {live} blob bytes are garbage, but moving the rest \
                     needs about {need} bytes free and the disk has {free}"
                )));
            }
            let set = |on: &str| {
                self.db
                    .set_options_cf(
                        cf,
                        &[
                            ("enable_blob_garbage_collection", on),
                            ("blob_garbage_collection_age_cutoff", "1.0"),
                        ],
                    )
                    .map_err(|e| StoreError::Write(format!("blob garbage collection {on}: {e}")))
            };
            // Every bottom-level file is rewritten, and with it every live
            // record moves to a new blob file: the old files go.
            let done = set("true").and_then(|()| compact(true));
            // Off again whatever happened (RocksDB may have applied the
            // option and failed to write its options file): left on, every
            // compaction would rewrite every live record.
            let off = set("false").or_else(|_| set("false"));
            if let Err(e) = &off {
                tracing::error!(error = %e, "blob garbage collection could not be turned off again; compactions rewrite live chunk records until the daemon restarts");
            }
            done?;
            off?;
        }
        Ok(Reclaimed {
            bytes_before,
            bytes_after: blob_bytes(),
            relocated,
        })
    }

    fn stop_background_work(&self) {
        self.db.cancel_all_background_work(true);
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        Ok(StoreStats {
            chunks: self.prop(CF_CHUNKS, "rocksdb.estimate-num-keys"),
            nodes: self.prop(CF_NODES, "rocksdb.estimate-num-keys"),
            delta_chunks: self.prop(CF_BASES, "rocksdb.estimate-num-keys"),
            chunk_bytes: self.prop(CF_CHUNKS, "rocksdb.total-blob-file-size")
                + self.prop(CF_CHUNKS, "rocksdb.cur-size-all-mem-tables")
                + self.prop(CF_CHUNKS, "rocksdb.total-sst-files-size"),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::store::gc::collect;
    use crate::store::tree::Tree;

    const CHUNK: usize = 65536;

    fn chunk(seed: u64) -> Vec<u8> {
        let mut rng = crate::cli::demo::Rng(seed);
        (0..CHUNK).map(|_| rng.next_u64() as u8).collect()
    }

    /// A store in a temporary directory holding one random chunk whole:
    /// the directory, the store, the chunk and its name.
    fn with_base(seed: u64) -> (tempfile::TempDir, RocksStore, Vec<u8>, Hash) {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path()).unwrap();
        let base = chunk(seed);
        let bh = Hash::of_chunk(&base);
        s.put_chunk(&bh, &base).unwrap();
        (dir, s, base, bh)
    }

    fn checked(data: &[u8]) -> CheckedChunk {
        CheckedChunk::check(Hash::of_chunk(data), data.to_vec()).unwrap()
    }

    /// `base` with the listed 4 KiB blocks rewritten.
    fn changed(base: &[u8], blocks: &[u32], seed: u8) -> Vec<u8> {
        let mut d = base.to_vec();
        for &b in blocks {
            let at = b as usize * 4096;
            d[at..at + 4096]
                .iter_mut()
                .for_each(|x| *x = x.wrapping_add(seed));
        }
        d
    }

    /// A tree of `leaves` in the store; returns its root.
    fn tree_of(s: &RocksStore, leaves: &[Hash]) -> Hash {
        let t = Tree::build((leaves.len() * CHUNK) as u64, CHUNK as u32, leaves.to_vec());
        s.apply(t.node_ops(), true).unwrap();
        t.root
    }

    fn record_len(s: &RocksStore, h: &Hash) -> usize {
        s.db.get_cf(s.cf(CF_CHUNKS).unwrap(), h.0)
            .unwrap()
            .unwrap()
            .len()
    }

    #[test]
    fn chunk_records_skip_the_log_until_a_node_or_a_synced_batch_flushes_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path()).unwrap();
        let (a, b) = (chunk(1), chunk(2));
        let (ah, bh) = (Hash::of_chunk(&a), Hash::of_chunk(&b));
        s.put_chunk(&ah, &a).unwrap();
        assert_eq!(s.chunks_in_memtable(), 1);
        // Meta alone, unsynced, names no chunk: nothing is flushed for it.
        s.apply(vec![Op::PutMeta(b"k".to_vec(), b"v".to_vec())], false)
            .unwrap();
        assert_eq!(s.chunks_in_memtable(), 1);
        tree_of_unsynced(&s, &[ah]);
        assert_eq!(s.chunks_in_memtable(), 0, "a node flushes its chunks");
        s.put_chunk(&bh, &b).unwrap();
        s.apply(Vec::new(), true).unwrap();
        assert_eq!(s.chunks_in_memtable(), 0, "a synced batch flushes them");
        assert_eq!(s.get_chunk(&bh).unwrap().unwrap(), b);
    }

    /// The names of the blob files in a store's directory.
    fn blob_files(dir: &Path) -> std::collections::BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".blob"))
            .collect()
    }

    #[test]
    fn compactions_leave_blob_files_alone_and_a_reclaim_rewrites_them_only_when_mostly_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path()).unwrap();
        // Four rounds of 40 chunks, each flushed: four blob files.
        let rounds: Vec<Vec<(Hash, Vec<u8>)>> = (0..4u64)
            .map(|r| {
                let round: Vec<(Hash, Vec<u8>)> = (0..40)
                    .map(|i| {
                        let d = chunk(1000 * r + i);
                        (Hash::of_chunk(&d), d)
                    })
                    .collect();
                for (h, d) in &round {
                    assert!(s.put_chunk(h, d).unwrap());
                }
                s.apply(Vec::new(), true).unwrap();
                round
            })
            .collect();
        let files = blob_files(dir.path());
        assert_eq!(files.len(), 4, "{files:?}");
        // A compaction of everything keeps every record where it is.
        s.db.compact_range_cf(s.cf(CF_CHUNKS).unwrap(), None::<&[u8]>, None::<&[u8]>);
        assert_eq!(blob_files(dir.path()), files, "no record was rewritten");

        let delete = |hs: Vec<Hash>| {
            s.apply(hs.into_iter().map(Op::DeleteChunk).collect(), true)
                .unwrap()
        };
        // A whole round deleted: its file goes, nothing is rewritten.
        delete(rounds[0].iter().map(|(h, _)| *h).collect());
        let r = s.reclaim_space().unwrap();
        assert!(!r.relocated, "{r:?}");
        let quarter = r.bytes_before / 4;
        assert!(r.bytes_after.abs_diff(3 * quarter) < quarter / 10, "{r:?}");
        assert_eq!(blob_files(dir.path()).len(), 3);
        // A few chunks of each other round: garbage stays, still no rewrite.
        delete(rounds[1..].iter().map(|r| r[0].0).collect());
        let r = s.reclaim_space().unwrap();
        assert!(!r.relocated && r.bytes_after == r.bytes_before, "{r:?}");
        // Most of what is left deleted, spread over every file: the live
        // records move, and the space comes back.
        delete(
            rounds[1..]
                .iter()
                .flat_map(|r| r[1..30].iter().map(|(h, _)| *h))
                .collect(),
        );
        let r = s.reclaim_space().unwrap();
        assert!(r.relocated, "{r:?}");
        // A quarter of three quarters is left.
        assert!(
            r.bytes_after.abs_diff(3 * quarter / 4) < quarter / 10,
            "{r:?}"
        );
        assert!(
            blob_files(dir.path()).is_disjoint(&files),
            "the old files are gone"
        );
        for (i, round) in rounds.iter().enumerate() {
            for (j, (h, d)) in round.iter().enumerate() {
                let kept = i > 0 && j >= 30;
                assert_eq!(
                    s.get_chunk(h).unwrap().as_ref(),
                    kept.then_some(d),
                    "round {i} chunk {j}"
                );
            }
        }
        // And ordinary compactions leave blob garbage collection off again:
        // a new round flushed and merged with the bottom level rewrites its
        // files, and moves no record.
        let again = blob_files(dir.path());
        for i in 0..40 {
            let d = chunk(9000 + i);
            s.put_chunk(&Hash::of_chunk(&d), &d).unwrap();
        }
        s.apply(Vec::new(), true).unwrap();
        let with_new = blob_files(dir.path());
        assert_eq!(with_new.len(), again.len() + 1);
        let mut o = rocksdb::CompactOptions::default();
        o.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        s.db.compact_range_cf_opt(s.cf(CF_CHUNKS).unwrap(), None::<&[u8]>, None::<&[u8]>, &o);
        assert_eq!(blob_files(dir.path()), with_new);
    }

    /// 64 chunks (seeds from `first`) put into `s` and flushed into one
    /// blob file, of which the write left no page in the page cache: the
    /// chunks and the file.
    fn flushed_past_the_cache(
        s: &RocksStore,
        dir: &Path,
        first: u64,
    ) -> (Vec<(Hash, Vec<u8>)>, std::path::PathBuf) {
        let chunks: Vec<(Hash, Vec<u8>)> = (0..64)
            .map(|i| {
                let d = chunk(first + i);
                (Hash::of_chunk(&d), d)
            })
            .collect();
        for (h, d) in &chunks {
            s.put_chunk(h, d).unwrap();
        }
        s.apply(Vec::new(), true).unwrap();
        let files = blob_files(dir);
        assert_eq!(files.len(), 1);
        let blob = dir.join(files.first().unwrap());
        assert!(std::fs::metadata(&blob).unwrap().len() >= 64 * 65536);
        assert_eq!(
            crate::fsio::cached_pages(&blob),
            0,
            "no page of the blob file was cached by its write"
        );
        (chunks, blob)
    }

    #[test]
    fn flushed_chunk_records_are_written_past_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            direct_io_works(dir.path()),
            "the test's temporary directory must take O_DIRECT (ext4 and xfs do)"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the probe leaves nothing"
        );
        let s = RocksStore::open(dir.path()).unwrap();
        let (chunks, blob) = flushed_past_the_cache(&s, dir.path(), 7000);
        for (h, d) in &chunks {
            assert_eq!(s.get_chunk(h).unwrap().as_ref(), Some(d));
        }
        assert!(
            crate::fsio::cached_pages(&blob) > 0,
            "reads go through the cache"
        );
    }

    #[test]
    fn listing_the_chunks_or_asking_for_one_reads_no_chunk_bytes() {
        // A collection lists every name in the store; reading every value
        // with it would read the whole store from the disk each time.
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path()).unwrap();
        let (chunks, blob) = flushed_past_the_cache(&s, dir.path(), 8000);
        let mut names: Vec<Hash> = chunks.iter().map(|(h, _)| *h).collect();
        let mut listed = s.chunk_names().unwrap();
        listed.sort();
        names.sort();
        assert_eq!(listed, names);
        assert_eq!(
            crate::fsio::cached_pages(&blob),
            0,
            "the listing read no page of the blob file"
        );
        for h in &names {
            assert!(s.has_chunk(h).unwrap());
        }
        assert!(!s.has_chunk(&Hash::of_chunk(&chunk(9000))).unwrap());
        assert_eq!(
            crate::fsio::cached_pages(&blob),
            0,
            "asking whether the store holds a chunk read no page either"
        );
        // A deleted name is not held, whether its tombstone is in the
        // memtable or flushed; its neighbours still are.
        s.apply(vec![Op::DeleteChunk(names[1])], false).unwrap();
        assert!(!s.has_chunk(&names[1]).unwrap());
        s.apply(vec![Op::DeleteChunk(names[2])], true).unwrap();
        assert!(!s.has_chunk(&names[2]).unwrap());
        assert!(s.has_chunk(&names[0]).unwrap() && s.has_chunk(&names[3]).unwrap());
        assert!(s.get_chunk(&names[0]).unwrap().is_some());
        assert!(
            crate::fsio::cached_pages(&blob) > 0,
            "a read of a chunk does"
        );
    }

    /// A tree of `leaves` put in an unsynced batch; returns its root.
    fn tree_of_unsynced(s: &RocksStore, leaves: &[Hash]) -> Hash {
        let t = Tree::build((leaves.len() * CHUNK) as u64, CHUNK as u32, leaves.to_vec());
        s.apply(t.node_ops(), false).unwrap();
        t.root
    }

    /// The child of the test below: puts a chunk, a tree over it (unsynced),
    /// a second chunk, then dies without closing the store.
    #[test]
    fn crash_child_puts_two_chunks_and_a_node_then_dies() {
        let Some(dir) = std::env::var_os("FERRY_ROCKS_CRASH_DIR") else {
            return; // only as the child of the test below
        };
        let s = RocksStore::open(std::path::Path::new(&dir)).unwrap();
        let (a, b) = (chunk(1), chunk(2));
        s.put_chunk(&Hash::of_chunk(&a), &a).unwrap();
        tree_of_unsynced(&s, &[Hash::of_chunk(&a)]);
        s.put_chunk(&Hash::of_chunk(&b), &b).unwrap();
        // Dies as a killed daemon does: no close, no flush, no destructor.
        unsafe { libc::_exit(0) }
    }

    #[test]
    fn a_node_keeps_its_chunks_through_a_crash_and_an_unnamed_chunk_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::rocks::tests::crash_child_puts_two_chunks_and_a_node_then_dies",
                "--test-threads=1",
            ])
            .env("FERRY_ROCKS_CRASH_DIR", dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "the child ran: {out:?}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("test result"),
            "the child died inside the test, before the harness's tally: {out:?}"
        );
        let s = RocksStore::open(dir.path()).unwrap();
        let (a, b) = (chunk(1), chunk(2));
        let root = Tree::build(CHUNK as u64, CHUNK as u32, vec![Hash::of_chunk(&a)]).root;
        assert!(
            s.has_node(&root).unwrap(),
            "the unsynced node survived the crash"
        );
        assert_eq!(
            s.get_chunk(&Hash::of_chunk(&a)).unwrap(),
            Some(a),
            "the chunk under a surviving node survived with it"
        );
        assert!(
            !s.has_chunk(&Hash::of_chunk(&b)).unwrap(),
            "a chunk no node named was not logged (its bytes are written once, at the flush)"
        );
    }

    #[test]
    fn a_delta_reads_back_and_its_base_is_kept_exactly_as_long_as_it_is() {
        let (_dir, s, base, bh) = with_base(1);
        let new = changed(&base, &[1, 9], 3);
        let nh = Hash::of_chunk(&new);
        assert!(
            s.put_chunk_delta(&checked(&new), &bh, &[1, 9], None)
                .unwrap()
        );
        assert!(
            !s.put_chunk_delta(&checked(&new), &bh, &[1, 9], None)
                .unwrap(),
            "idempotent"
        );
        assert_eq!(s.get_chunk(&nh).unwrap().unwrap(), new);
        assert!(
            record_len(&s, &nh) < 3 * 4096,
            "only the two changed blocks are kept: {} bytes",
            record_len(&s, &nh)
        );
        assert_eq!(s.delta_bases().unwrap(), vec![(nh, bh)]);
        // A point holding only the delta keeps the base.
        let root = tree_of(&s, &[nh]);
        let r = collect(&s, &[root], &HashSet::new()).unwrap();
        assert_eq!(r.chunks_deleted, 0);
        assert_eq!(s.get_chunk(&nh).unwrap().unwrap(), new);
        // A pass in progress that stored the delta keeps it and its base.
        collect(&s, &[], &[nh].into()).unwrap();
        assert_eq!(s.get_chunk(&nh).unwrap().unwrap(), new);
        // Nothing keeps the delta: both go, and the base entry with them.
        let r = collect(&s, &[], &HashSet::new()).unwrap();
        assert_eq!(r.chunks_deleted, 2);
        assert!(!s.has_chunk(&bh).unwrap() && !s.has_chunk(&nh).unwrap());
        assert!(s.delta_bases().unwrap().is_empty());
    }

    #[test]
    fn a_delta_over_a_delta_is_kept_over_the_first_base_and_over_zeros_needs_none() {
        let (_dir, s, base, bh) = with_base(2);
        let v1 = changed(&base, &[1, 9], 5);
        let h1 = Hash::of_chunk(&v1);
        s.put_chunk_delta(&checked(&v1), &bh, &[1, 9], None)
            .unwrap();
        let v2 = changed(&v1, &[3], 7);
        let h2 = Hash::of_chunk(&v2);
        s.put_chunk_delta(&checked(&v2), &h1, &[3], None).unwrap();
        let bases: HashSet<(Hash, Hash)> = s.delta_bases().unwrap().into_iter().collect();
        assert_eq!(
            bases,
            [(h1, bh), (h2, bh)].into(),
            "one base, never a chain"
        );
        // v1 gone: v2 still reads, over the first base.
        s.apply(vec![Op::DeleteChunk(h1)], true).unwrap();
        assert_eq!(s.get_chunk(&h2).unwrap().unwrap(), v2);

        let mut hole = vec![0u8; CHUNK];
        hole[8192..12288].copy_from_slice(&base[..4096]);
        let hh = Hash::of_chunk(&hole);
        s.put_chunk_delta(&checked(&hole), &Hash::ZERO, &[2], None)
            .unwrap();
        assert!(record_len(&s, &hh) < 4096 + 100);
        assert_eq!(s.get_chunk(&hh).unwrap().unwrap(), hole);
        let r = collect(&s, &[tree_of(&s, &[hh])], &HashSet::new()).unwrap();
        assert_eq!(r.chunks_kept, 1, "a delta over zeros keeps no base");
    }

    #[test]
    fn most_blocks_changed_a_bad_block_list_or_a_wrong_record_never_make_a_bad_delta() {
        let (_dir, s, base, bh) = with_base(3);
        let most: Vec<u32> = (0..9).collect();
        let v = changed(&base, &most, 1);
        let h = Hash::of_chunk(&v);
        s.put_chunk_delta(&checked(&v), &bh, &most, None).unwrap();
        assert!(s.delta_bases().unwrap().is_empty(), "stored whole");
        assert_eq!(s.get_chunk(&h).unwrap().unwrap(), v);
        for blocks in [vec![4u32, 2], vec![2, 2], vec![16], vec![]] {
            let v = changed(&base, &[2, 4], blocks.len() as u8 + 9);
            let h = Hash::of_chunk(&v);
            s.put_chunk_delta(&checked(&v), &bh, &blocks, None).unwrap();
            assert_eq!(s.get_chunk(&h).unwrap().unwrap(), v, "{blocks:?}");
        }
        assert!(s.delta_bases().unwrap().is_empty(), "each stored whole");
        // A record of the blocks that does not fit them is not used.
        let v = changed(&base, &[6], 2);
        let h = Hash::of_chunk(&v);
        let wrong = encode_chunk(&[7u8; 100]);
        s.put_chunk_delta(&checked(&v), &bh, &[6], Some(wrong))
            .unwrap();
        assert_eq!(s.get_chunk(&h).unwrap().unwrap(), v);
    }

    #[test]
    fn a_chunk_put_over_a_base_keeps_the_blocks_that_differ_from_what_the_base_holds() {
        let (_dir, s, base, bh) = with_base(5);
        let v1 = changed(&base, &[2, 7], 1);
        let h1 = Hash::of_chunk(&v1);
        assert!(s.put_chunk_over(&h1, &v1, &bh).unwrap());
        let rec =
            s.db.get_cf(s.cf(CF_CHUNKS).unwrap(), h1.0)
                .unwrap()
                .unwrap();
        let d = parse_delta(&rec).unwrap().unwrap();
        assert_eq!((d.base, d.blocks), (bh, vec![2, 7]));
        assert_eq!(s.get_chunk(&h1).unwrap().unwrap(), v1);
        // Over a delta: over its base, with the blocks that differ from it.
        let v2 = changed(&v1, &[7, 11], 2);
        let h2 = Hash::of_chunk(&v2);
        s.put_chunk_over(&h2, &v2, &h1).unwrap();
        let rec =
            s.db.get_cf(s.cf(CF_CHUNKS).unwrap(), h2.0)
                .unwrap()
                .unwrap();
        let d = parse_delta(&rec).unwrap().unwrap();
        assert_eq!((d.base, d.blocks), (bh, vec![2, 7, 11]));
        assert_eq!(s.get_chunk(&h2).unwrap().unwrap(), v2);
        // A base that does not read back (damaged, or absent) is no base.
        let other = chunk(6);
        let oh = Hash::of_chunk(&other);
        s.put_chunk(&oh, &other).unwrap();
        s.corrupt_chunk(&oh).unwrap();
        let v3 = changed(&other, &[0], 1);
        let h3 = Hash::of_chunk(&v3);
        s.put_chunk_over(&h3, &v3, &oh).unwrap();
        let v4 = changed(&base, &[4], 9);
        let h4 = Hash::of_chunk(&v4);
        s.put_chunk_over(&h4, &v4, &Hash::of_chunk(b"never stored"))
            .unwrap();
        for (h, v) in [(h3, &v3), (h4, &v4)] {
            assert_eq!(s.get_chunk(&h).unwrap().unwrap(), *v);
            assert!(s.base_of(&h).unwrap().is_none(), "stored whole");
        }
    }

    #[test]
    fn a_damaged_base_is_reported_on_its_delta_and_putting_the_delta_back_whole_frees_it() {
        let (_dir, s, base, bh) = with_base(4);
        let v = changed(&base, &[0], 1);
        let h = Hash::of_chunk(&v);
        s.put_chunk_delta(&checked(&v), &bh, &[0], None).unwrap();
        s.corrupt_chunk(&bh).unwrap();
        match s.get_chunk(&h) {
            Err(StoreError::ChunkCorrupt { hash, reason }) => {
                assert_eq!(hash, h);
                assert!(reason.contains("delta base"), "{reason}");
            }
            other => panic!("a delta over a damaged base must not read: {other:?}"),
        }
        s.replace_chunk(&h, &v).unwrap();
        assert_eq!(s.get_chunk(&h).unwrap().unwrap(), v);
        assert!(s.delta_bases().unwrap().is_empty());
        let r = collect(&s, &[tree_of(&s, &[h])], &HashSet::new()).unwrap();
        assert_eq!(r.chunks_deleted, 1, "the damaged base is no longer needed");
    }
}
