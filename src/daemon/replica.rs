//! The DR side of replication: answers a primary's questions, verifies and
//! stores chunks, and commits a pass into the replica image.
//!
//! Commit order (invariant 2): every chunk and node of the new tree must be in
//! the store; then the nodes are promoted and the volume marked `applying`
//! (durable); then the image is rewritten where the trees differ and fsynced;
//! only then is the new root recorded with a recovery point (durable). A crash
//! anywhere leaves the previous point intact; restart re-applies `applying`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::hash::Hash;
use crate::proto::messages::{ChunkHave, ChunkPut, FuzzyCommit, Request, Response, StoreResult};
use crate::store::gc::{self, GcReport, Retention};
use crate::store::state::{self, Mode, RecoveryPoint, Role, VolumeRecord};
use crate::store::tree::{self, NODE_BYTES_MAX, Node, NodeSource, StoreNodes, chunk_range};
use crate::store::{ChunkStore, Op, StoreError, decode_chunk};
use crate::volume::{delta, image};

const PENDING_PREFIX: &str = "pnode/";
/// Threads writing chunks into a replica image at commit.
const APPLY_THREADS_MAX: usize = 4;

/// Shape announced by the primary at `Open`, for the pass in progress.
#[derive(Clone, Copy, Debug)]
struct Session {
    size: u64,
    chunk_size: u32,
}

pub struct ReplicaSide {
    pub(super) store: Arc<dyn ChunkStore>,
    replica_dir: PathBuf,
    pub(super) fsync: bool,
    sessions: Mutex<HashMap<String, Session>>,
    /// Serializes commits, applying the redo log, points, recovery and
    /// garbage collection.
    pub(super) commit_lock: Mutex<()>,
    pub(super) retention: Retention,
    /// Continuous replicas: redo logs and their appliers.
    pub(super) redo: Mutex<HashMap<String, Arc<super::redo::RedoVolume>>>,
    pub(super) redo_dir: PathBuf,
    pub(super) journal_bytes_max: u64,
    pub(super) point_interval: std::time::Duration,
    pub(super) stopping: std::sync::atomic::AtomicBool,
    /// Chunks deleted by collections the appliers ran (for the metric).
    pub gc_deleted: std::sync::atomic::AtomicU64,
    /// Per volume, chunks stored by its pass in progress (or an interrupted
    /// one the next pass resumes): collections spare them until that pass commits.
    fresh: Mutex<HashMap<String, HashSet<Hash>>>,
    /// Set when a commit pruned points, so that a collection is worth running.
    gc_due: std::sync::atomic::AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error("{0}")]
    Refused(String),
}

impl ReplicaSide {
    pub fn new(
        store: Arc<dyn ChunkStore>,
        data_dir: &Path,
        fsync: bool,
        retention: Retention,
        journal_bytes_max: u64,
        point_interval: std::time::Duration,
    ) -> ReplicaSide {
        ReplicaSide {
            store,
            replica_dir: data_dir.join("replicas"),
            fsync,
            sessions: Mutex::new(HashMap::new()),
            commit_lock: Mutex::new(()),
            retention,
            redo: Mutex::new(HashMap::new()),
            redo_dir: data_dir.join("redo"),
            journal_bytes_max,
            point_interval,
            stopping: std::sync::atomic::AtomicBool::new(false),
            gc_deleted: std::sync::atomic::AtomicU64::new(0),
            fresh: Mutex::new(HashMap::new()),
            gc_due: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// True once after a commit pruned recovery points.
    pub fn take_gc_due(&self) -> bool {
        self.gc_due
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// Collects chunks and nodes that no recovery point and no replica needs.
    pub fn collect_garbage(&self) -> Result<GcReport, ReplicaError> {
        let _g = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut roots = Vec::new();
        for v in state::list_volumes(&*self.store)? {
            if v.role != Role::Replica {
                continue;
            }
            roots.extend(v.committed);
            roots.extend(v.applying);
            roots.extend(
                state::list_points(&*self.store, &v.name)?
                    .into_iter()
                    .map(|p| p.root),
            );
        }
        let spare: HashSet<Hash> = self
            .fresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flatten()
            .copied()
            .collect();
        let report = gc::collect(&*self.store, &roots, &spare)?;
        tracing::info!(?report, "garbage collected");
        Ok(report)
    }

    /// Handles one request; errors become `Response::Error` for the peer.
    pub fn handle(self: &Arc<Self>, req: Request) -> Response {
        if let Err(e) = req.check() {
            tracing::error!(error = %e, "refused a malformed request from the peer");
            return Response::Error { message: e };
        }
        let r = match req {
            Request::Open {
                volume,
                size,
                chunk_size,
                mode,
            } => self.open(&volume, size, chunk_size, mode),
            Request::HaveNodes { hashes } => hashes
                .iter()
                .map(|h| self.store.has_node(h))
                .collect::<Result<Vec<_>, _>>()
                .map(Response::Have)
                .map_err(Into::into),
            Request::PutNodes { volume, nodes } => self.put_nodes(&volume, nodes),
            Request::HaveChunks { volume, items } => self.have_chunks(&volume, items),
            Request::PutChunks { volume, items } => self.put_chunks(&volume, items),
            Request::Commit {
                volume,
                root_node,
                fuzzy,
            } => self.commit(&volume, &root_node, fuzzy),
            Request::StreamOpen {
                volume,
                size,
                chunk_size,
                ..
            } => self.stream_open(&volume, size, chunk_size),
            Request::Records {
                volume,
                first,
                data,
            } => self.records(&volume, first, &data),
            Request::CreatePoint { volume } => self.create_point(&volume),
            Request::Points { volume } => state::list_points(&*self.store, &volume)
                .map(Response::Points)
                .map_err(Into::into),
            Request::Leaves { volume, start } => self.leaves(&volume, start),
            Request::Repair { volume, indices } => self.repair(&volume, &indices),
            other => Err(ReplicaError::Refused(format!(
                "unexpected request {}",
                request_name(&other)
            ))),
        };
        r.unwrap_or_else(|e| {
            tracing::error!(error = %e, "replication request failed");
            Response::Error {
                message: e.to_string(),
            }
        })
    }

    pub(super) fn replica_record(&self, volume: &str) -> Result<VolumeRecord, ReplicaError> {
        match state::get_volume(&*self.store, volume)? {
            Some(v) if v.role == Role::Replica => Ok(v),
            Some(_) => Err(ReplicaError::Refused(format!(
                "volume {volume} is primary at this site; refusing to overwrite it"
            ))),
            None => Err(ReplicaError::Refused(format!(
                "volume {volume} is unknown here; the primary must open it first"
            ))),
        }
    }

    fn session(&self, volume: &str) -> Result<Session, ReplicaError> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume)
            .copied()
            .ok_or_else(|| ReplicaError::Refused(format!("no pass open for volume {volume}")))
    }

    fn open(
        &self,
        volume: &str,
        size: u64,
        chunk_size: u32,
        mode: Mode,
    ) -> Result<Response, ReplicaError> {
        let rec = match state::get_volume(&*self.store, volume)? {
            Some(mut v) if v.role == Role::Replica => {
                if v.mode != mode {
                    v.mode = mode;
                    self.store.apply(vec![state::put_volume_op(&v)], true)?;
                }
                v
            }
            Some(_) => {
                return Err(ReplicaError::Refused(format!(
                    "volume {volume} is primary at this site; refusing to become its replica"
                )));
            }
            None => {
                let path = self.replica_dir.join(format!("{volume}.img"));
                let f = image::open_replica(&path)?;
                image::set_len(&f, &path, 0)?;
                let rec = VolumeRecord {
                    name: volume.to_string(),
                    role: Role::Replica,
                    mode,
                    path,
                    chunk_size,
                    interval_ms: 0,
                    rpo_target_ms: 0,
                    size: 0,
                    created: crate::util::now_unix(),
                    committed: None,
                    applying: None,
                    totals: Default::default(),
                    last_pass: None,
                    stream: Default::default(),
                };
                self.store.apply(vec![state::put_volume_op(&rec)], true)?;
                tracing::info!(volume, "created replica at {}", rec.path.display());
                rec
            }
        };
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(volume.to_string(), Session { size, chunk_size });
        Ok(Response::Opened {
            committed: rec.committed,
        })
    }

    fn put_nodes(&self, volume: &str, nodes: Vec<Vec<u8>>) -> Result<Response, ReplicaError> {
        self.replica_record(volume)?;
        let mut ops = Vec::with_capacity(nodes.len());
        for bytes in nodes {
            if bytes.len() > NODE_BYTES_MAX {
                return Err(ReplicaError::Refused("node larger than a full node".into()));
            }
            Node::decode(&bytes)
                .map_err(|e| ReplicaError::Refused(format!("malformed node: {e}")))?;
            let h = Node::hash_encoded(&bytes);
            ops.push(Op::PutMeta(pending_key(volume, &h), bytes));
        }
        // Not durable on its own: a lost pending node is simply sent again.
        self.store.apply(ops, false)?;
        Ok(Response::Ok)
    }

    fn have_chunks(&self, volume: &str, items: Vec<(u64, Hash)>) -> Result<Response, ReplicaError> {
        let rec = self.replica_record(volume)?;
        let s = self.session(volume)?;
        let mut out = Vec::with_capacity(items.len());
        for (index, hash) in items {
            if hash.is_zero() || self.store.has_chunk(&hash)? {
                out.push(ChunkHave::Have);
                continue;
            }
            out.push(self.base_for(&rec, s, index)?);
        }
        Ok(Response::Chunks(out))
    }

    /// What the replica holds at `index` now, as a delta base.
    fn base_for(
        &self,
        rec: &VolumeRecord,
        s: Session,
        index: u64,
    ) -> Result<ChunkHave, ReplicaError> {
        let Some(committed) = rec.committed else {
            return Ok(ChunkHave::Missing);
        };
        if rec.chunk_size != s.chunk_size {
            return Ok(ChunkHave::Missing);
        }
        let (start, end) = chunk_range(s.size, s.chunk_size, index);
        let base =
            tree::leaf_at(&StoreNodes(&*self.store), &committed, index)?.unwrap_or(Hash::ZERO);
        if base.is_zero() {
            // A hole (or past the old end): only the written blocks need to travel.
            let zeros = vec![0u8; (end - start) as usize];
            return Ok(ChunkHave::MissingWithBase {
                base,
                blocks: delta::block_hashes(&zeros),
            });
        }
        match self.store.get_chunk(&base) {
            Ok(Some(data)) if data.len() as u64 == end - start => Ok(ChunkHave::MissingWithBase {
                base,
                blocks: delta::block_hashes(&data),
            }),
            Ok(_) => Ok(ChunkHave::Missing),
            Err(e) => {
                // A damaged base is reported and not used; the chunk comes whole.
                tracing::error!(error = %e, "stored chunk failed verification; not using it as a delta base");
                Ok(ChunkHave::Missing)
            }
        }
    }

    fn put_chunks(&self, volume: &str, items: Vec<ChunkPut>) -> Result<Response, ReplicaError> {
        self.replica_record(volume)?;
        let s = self.session(volume)?;
        let len_max = s.chunk_size as usize;
        let mut result = StoreResult::default();
        let mut verified = Vec::with_capacity(items.len());
        // Verify the whole batch first: one bad chunk refuses the batch, and nothing of it is stored.
        for item in items {
            match item {
                ChunkPut::Full { hash, record } => {
                    if hash.is_zero() {
                        return Err(ReplicaError::Refused(
                            "peer sent a chunk under the zero name".into(),
                        ));
                    }
                    let data = decode_chunk(&record, len_max, Some(&hash)).map_err(|e| {
                        ReplicaError::Refused(format!(
                            "chunk {}: {e}; batch refused, nothing stored",
                            hash.short()
                        ))
                    })?;
                    verified.push((hash, data, Some(record)));
                }
                ChunkPut::Delta {
                    hash,
                    base,
                    len,
                    blocks,
                    record,
                } => {
                    if len as usize > len_max {
                        return Err(ReplicaError::Refused(format!(
                            "chunk {}: delta of {len} bytes exceeds the chunk size",
                            hash.short()
                        )));
                    }
                    let base_data = if base.is_zero() {
                        vec![0u8; len as usize]
                    } else {
                        match self.store.get_chunk(&base)? {
                            Some(d) if d.len() == len as usize => d,
                            _ => {
                                result.need_full.push(hash);
                                continue;
                            }
                        }
                    };
                    if blocks.len() > base_data.len().div_ceil(delta::BLOCK_BYTES) {
                        return Err(ReplicaError::Refused(format!(
                            "chunk {}: delta lists more blocks than the chunk has",
                            hash.short()
                        )));
                    }
                    let data = decode_chunk(&record, base_data.len(), None).map_err(|e| {
                        ReplicaError::Refused(format!(
                            "chunk {}: delta {e}; batch refused",
                            hash.short()
                        ))
                    })?;
                    match delta::apply(&base_data, &blocks, &data) {
                        Ok(rebuilt)
                            if !hash.is_zero() && crate::hash::Hash::of_chunk(&rebuilt) == hash =>
                        {
                            verified.push((hash, rebuilt, None))
                        }
                        Ok(_) => {
                            tracing::warn!(chunk = %hash.short(), "rebuilt chunk does not match its name; asking for it whole");
                            result.need_full.push(hash);
                        }
                        Err(e) => {
                            return Err(ReplicaError::Refused(format!(
                                "chunk {}: malformed delta: {e}",
                                hash.short()
                            )));
                        }
                    }
                }
            }
        }
        for (hash, data, record) in verified {
            let new = match record {
                Some(r) => self.store.put_chunk_record(&hash, &data, r)?,
                None => self.store.put_chunk(&hash, &data)?,
            };
            if new {
                self.fresh
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(volume.to_string())
                    .or_default()
                    .insert(hash);
                result.stored += 1;
            } else {
                result.duplicate += 1;
            }
        }
        Ok(Response::Stored(result))
    }

    fn commit(
        self: &Arc<Self>,
        volume: &str,
        root_node: &[u8],
        fuzzy: Option<FuzzyCommit>,
    ) -> Result<Response, ReplicaError> {
        let _g = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut rec = self.replica_record(volume)?;
        let node = Node::decode(root_node)
            .map_err(|e| ReplicaError::Refused(format!("malformed root: {e}")))?;
        let Node::Root { height, top, .. } = node else {
            return Err(ReplicaError::Refused(
                "commit names an inner node, not a root".into(),
            ));
        };
        let root = Node::hash_encoded(root_node);
        if let Some(f) = fuzzy
            && (f.from_seq == 0 || f.consistent_at + 1 < f.from_seq)
        {
            return Err(ReplicaError::Refused(format!(
                "malformed resync commit {f:?}"
            )));
        }
        if rec.committed == Some(root) && rec.applying.is_none() && fuzzy.is_none() {
            let point = state::list_points(&*self.store, volume)?
                .into_iter()
                .rev()
                .find(|p| p.root == root);
            if let Some(point) = point {
                return Ok(Response::Committed { point });
            }
        }
        let t0 = std::time::Instant::now();
        // 1. Completeness: every node and chunk of the new tree is here.
        let pending = Pending {
            store: &*self.store,
            volume,
        };
        let mut promote = Vec::new();
        let mut missing = 0u64;
        self.collect(&pending, &top, height, &mut promote, &mut missing)?;
        if missing > 0 {
            return Err(ReplicaError::Refused(format!(
                "commit refused: {missing} chunks of the new state are not here yet"
            )));
        }
        // 2. Promote nodes, mark the image inconsistent (durable). Pending
        //    nodes of this volume that the new tree does not use came from
        //    abandoned passes: they go in the same batch.
        let mut ops: Vec<Op> = Vec::with_capacity(promote.len() * 2 + 2);
        for (k, _) in self.store.scan_meta(&pending_prefix(volume))? {
            ops.push(Op::DeleteMeta(k));
        }
        for (h, bytes) in promote {
            ops.push(Op::PutNode(h, bytes));
        }
        ops.push(Op::PutNode(root, root_node.to_vec()));
        rec.applying = Some(root);
        if let Some(f) = fuzzy {
            // Out of order from here until the stream passes `consistent_at`.
            rec.stream.inconsistent_until = Some(f.consistent_at);
            rec.stream.resync_from = Some(f.from_seq);
        }
        ops.push(state::put_volume_op(&rec));
        self.store.apply(ops, true)?;
        let checked_ms = t0.elapsed().as_millis() as u64;
        // 3 and 4.
        let point = self.finish_apply(&mut rec)?;
        // What this pass stored is now reachable from its point (or garbage).
        self.fresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(volume);
        tracing::debug!(
            volume,
            checked_ms,
            total_ms = t0.elapsed().as_millis() as u64,
            "commit timing"
        );
        Ok(match point {
            Some(point) => Response::Committed { point },
            None => Response::CommittedFuzzy,
        })
    }

    /// Applies `rec.applying`: a pass's commit (with a point) or a resync's
    /// fuzzy commit (no point; the redo log restarts at `resync_from`, and the
    /// chunks the old redo log touched are rewritten as well).
    fn finish_apply(
        self: &Arc<Self>,
        rec: &mut VolumeRecord,
    ) -> Result<Option<RecoveryPoint>, ReplicaError> {
        let Some(from) = rec.stream.resync_from else {
            return self.apply_image(rec, &[], true);
        };
        let extra = self.redo_dirty(rec, rec.stream.base_seq)?;
        rec.stream.base_seq = from - 1;
        rec.stream.applied_seq = from - 1;
        rec.stream.resync_from = None;
        // Nothing was written while the image was read: consistent at once.
        let settled = rec.stream.inconsistent_until.is_some_and(|u| u < from);
        if settled {
            rec.stream.inconsistent_until = None;
        }
        self.apply_image(rec, &extra, false)?;
        self.restart_stream(rec, from, settled)?;
        tracing::info!(volume = %rec.name, from, until = ?rec.stream.inconsistent_until, "resync applied; inconsistent until the stream catches up");
        Ok(None)
    }

    /// Walks the part of the new tree that is not already complete in the
    /// store, collecting pending nodes to promote and counting absent chunks.
    fn collect(
        &self,
        src: &Pending<'_>,
        hash: &Hash,
        level: u8,
        promote: &mut Vec<(Hash, Vec<u8>)>,
        missing: &mut u64,
    ) -> Result<(), ReplicaError> {
        if self.store.has_node(hash)? {
            return Ok(());
        }
        let Some(bytes) = src.pending_bytes(hash)? else {
            return Err(ReplicaError::Refused(format!(
                "commit refused: tree node {} was never sent",
                hash.short()
            )));
        };
        let children = match Node::decode(&bytes) {
            Ok(Node::Inner { level: l, children }) if l == level => children,
            _ => {
                return Err(ReplicaError::Refused(format!(
                    "tree node {} is not a level-{level} node",
                    hash.short()
                )));
            }
        };
        promote.push((*hash, bytes));
        for c in &children {
            if level == 1 {
                if !c.is_zero() && !self.store.has_chunk(c)? {
                    *missing += 1;
                }
            } else {
                self.collect(src, c, level - 1, promote, missing)?;
            }
        }
        Ok(())
    }

    /// Rewrites the replica image from `committed` to `applying`, fsyncs, and
    /// records the new root with a recovery point.
    fn apply_image(
        &self,
        rec: &mut VolumeRecord,
        extra: &[u64],
        with_point: bool,
    ) -> Result<Option<RecoveryPoint>, ReplicaError> {
        let Some(target) = rec.applying else {
            return Err(ReplicaError::Refused("nothing to apply".into()));
        };
        let (size, chunk_size, _, _) = tree::root_shape(&StoreNodes(&*self.store), &target)?;
        let f = image::open_replica(&rec.path)?;
        image::set_len(&f, &rec.path, size)?;
        let old = if rec.chunk_size == chunk_size {
            rec.committed
        } else {
            None
        };
        // Which chunks to write: cheap (a walk of the differing nodes) ...
        let nodes = StoreNodes(&*self.store);
        let mut todo: Vec<(u64, Hash)> = Vec::new();
        match old {
            Some(old) => tree::diff_leaves(&nodes, Some(&old), &target, &mut |i, _, h| {
                todo.push((i, h));
                Ok(())
            })?,
            // No known old state (first seed, new chunk size, or an interrupted
            // first apply): write every chunk, zeros included, whatever the image held.
            None => tree::for_each_leaf(&nodes, &target, &mut |i, h| {
                todo.push((i, h));
                Ok(())
            })?,
        }
        if !extra.is_empty() {
            let mut leaves = Vec::new();
            tree::for_each_leaf(&nodes, &target, &mut |_, h| {
                leaves.push(h);
                Ok(())
            })?;
            let have: HashSet<u64> = todo.iter().map(|(i, _)| *i).collect();
            for &i in extra {
                if let Some(h) = leaves.get(i as usize)
                    && !have.contains(&i)
                {
                    todo.push((i, *h));
                }
            }
        }
        // ... then the writing, which reads, decompresses and verifies each
        // chunk, on a few threads.
        let written = todo.len();
        let per = todo.len().div_ceil(APPLY_THREADS_MAX).max(1);
        let path = &rec.path;
        let results: Vec<Result<(), StoreError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = todo
                .chunks(per)
                .map(|part| {
                    let f = &f;
                    scope.spawn(move || {
                        for &(index, new) in part {
                            self.write_chunk(f, path, size, chunk_size, index, new)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(StoreError::Write("apply thread panicked".into())))
                })
                .collect()
        });
        for r in results {
            r?;
        }
        let t_sync = std::time::Instant::now();
        if self.fsync {
            image::sync(&f, &rec.path)?;
        }
        tracing::debug!(volume = %rec.name, fsync_ms = t_sync.elapsed().as_millis() as u64, "replica image synced");
        rec.committed = Some(target);
        rec.applying = None;
        rec.size = size;
        rec.chunk_size = chunk_size;
        rec.totals.passes += 1;
        if !with_point {
            self.store.apply(vec![state::put_volume_op(rec)], true)?;
            tracing::info!(volume = %rec.name, chunks_written = written, "replica resynced (no point: not a consistent state)");
            return Ok(None);
        }
        let points = state::list_points(&*self.store, &rec.name)?;
        let point = RecoveryPoint {
            id: points.last().map(|p| p.id + 1).unwrap_or(1),
            volume: rec.name.clone(),
            root: target,
            created: crate::util::now_unix(),
            size,
            source: "snapshot pass".into(),
            seq: None,
        };
        // Retention: the new point and the ones the policy keeps stay; the rest go.
        let mut points = points;
        points.push(point.clone());
        let dropped = gc::prune(&points, point.created, &self.retention);
        let mut ops = vec![state::put_volume_op(rec), state::put_point_op(&point)];
        ops.extend(
            dropped
                .iter()
                .map(|id| Op::DeleteMeta(state::point_key(&rec.name, *id))),
        );
        self.store.apply(ops, true)?;
        if !dropped.is_empty() {
            tracing::info!(volume = %rec.name, pruned = dropped.len(), "recovery points pruned by retention");
            self.gc_due
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        tracing::info!(volume = %rec.name, point = point.id, chunks_written = written, "replica committed");
        Ok(Some(point))
    }

    /// Writes one leaf into the replica image: a hole for a zero chunk, else
    /// the chunk read back from the store (verified on read) at its place.
    fn write_chunk(
        &self,
        f: &std::fs::File,
        path: &Path,
        size: u64,
        chunk_size: u32,
        index: u64,
        new: Hash,
    ) -> Result<(), StoreError> {
        let (start, end) = chunk_range(size, chunk_size, index);
        let r = if new.is_zero() {
            image::write_zeros(f, path, start, end - start)
        } else {
            let data = self
                .store
                .get_chunk(&new)?
                .ok_or_else(|| StoreError::Read(format!("chunk {} vanished", new.short())))?;
            if data.len() as u64 != end - start {
                return Err(StoreError::Read(format!(
                    "chunk {} has {} bytes where {} fit",
                    new.short(),
                    data.len(),
                    end - start
                )));
            }
            image::write_at(f, path, start, &data)
        };
        r.map_err(|e| StoreError::Write(e.to_string()))
    }

    /// Rewrites the listed chunks of the replica image from the store's copy
    /// of the committed state (each verified on read), then fsyncs.
    fn repair(&self, volume: &str, indices: &[u64]) -> Result<Response, ReplicaError> {
        let _g = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let rec = self.replica_record(volume)?;
        if rec.applying.is_some() {
            return Err(ReplicaError::Refused(
                "a commit is being applied; verify again when it is done".into(),
            ));
        }
        let Some(root) = rec.committed else {
            return Err(ReplicaError::Refused(format!(
                "volume {volume} has no committed state to repair from yet"
            )));
        };
        let nodes = StoreNodes(&*self.store);
        let (size, chunk_size, _, _) = tree::root_shape(&nodes, &root)?;
        let f = image::open_replica(&rec.path)?;
        image::set_len(&f, &rec.path, size)?;
        let mut n = 0;
        for &index in indices {
            if let Some(leaf) = tree::leaf_at(&nodes, &root, index)? {
                self.write_chunk(&f, &rec.path, size, chunk_size, index, leaf)?;
                n += 1;
            }
        }
        if self.fsync {
            image::sync(&f, &rec.path)?;
        }
        tracing::warn!(volume, chunks = n, "replica image repaired from the store");
        Ok(Response::Repaired { chunks: n })
    }

    /// Finishes any commit a crash interrupted (run before serving the peer).
    pub fn recover(self: &Arc<Self>) -> Result<(), ReplicaError> {
        {
            let _g = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
            for mut rec in state::list_volumes(&*self.store)? {
                if rec.role == Role::Replica && rec.applying.is_some() {
                    tracing::warn!(volume = %rec.name, "replica image was being updated at a crash; finishing the update");
                    self.finish_apply(&mut rec)?;
                }
            }
        }
        // Records received before a stop are applied now, not when the primary calls.
        self.start_streams()
    }

    /// Stops the appliers (at shutdown).
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn leaves(&self, volume: &str, start: u64) -> Result<Response, ReplicaError> {
        let rec = self.replica_record(volume)?;
        let progress = std::sync::atomic::AtomicU64::new(0);
        let (t, _) = image::scan(&rec.path, rec.chunk_size, &progress)?;
        let from = (start as usize).min(t.leaves().len());
        let to = (from + crate::proto::messages::LEAVES_MAX).min(t.leaves().len());
        Ok(Response::Leaves {
            size: t.size,
            chunk_size: t.chunk_size,
            leaves: t.leaves()[from..to].to_vec(),
            done: to == t.leaves().len(),
        })
    }
}

fn pending_prefix(volume: &str) -> Vec<u8> {
    format!("{PENDING_PREFIX}{volume}/").into_bytes()
}

fn pending_key(volume: &str, h: &Hash) -> Vec<u8> {
    format!("{PENDING_PREFIX}{volume}/{}", h.to_hex()).into_bytes()
}

/// Nodes of a volume's pass not yet committed.
struct Pending<'a> {
    store: &'a dyn ChunkStore,
    volume: &'a str,
}

impl Pending<'_> {
    fn pending_bytes(&self, h: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.get_meta(&pending_key(self.volume, h))
    }
}

impl NodeSource for Pending<'_> {
    fn node(&self, hash: &Hash) -> Result<Option<Node>, StoreError> {
        match StoreNodes(self.store).node(hash)? {
            Some(n) => Ok(Some(n)),
            None => self
                .pending_bytes(hash)?
                .map(|b| {
                    Node::decode(&b).map_err(|reason| StoreError::NodeCorrupt {
                        hash: *hash,
                        reason,
                    })
                })
                .transpose(),
        }
    }
}

pub fn request_name(r: &Request) -> &'static str {
    match r {
        Request::Hello { .. } => "Hello",
        Request::Pair { .. } => "Pair",
        Request::Open { .. } => "Open",
        Request::HaveNodes { .. } => "HaveNodes",
        Request::PutNodes { .. } => "PutNodes",
        Request::HaveChunks { .. } => "HaveChunks",
        Request::PutChunks { .. } => "PutChunks",
        Request::Commit { .. } => "Commit",
        Request::StreamOpen { .. } => "StreamOpen",
        Request::Records { .. } => "Records",
        Request::CreatePoint { .. } => "CreatePoint",
        Request::Leaves { .. } => "Leaves",
        Request::Points { .. } => "Points",
        Request::Repair { .. } => "Repair",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::is_all_zero;
    use crate::store::MemoryStore;
    use crate::store::encode_chunk;
    use crate::store::tree::Tree;

    const CS: usize = 4096;

    fn image(seed: u8, chunks: usize) -> Vec<u8> {
        (0..chunks * CS)
            .map(|i| {
                if (i / CS).is_multiple_of(3) {
                    0
                } else {
                    (i as u8).wrapping_mul(seed) ^ (i / CS) as u8
                }
            })
            .collect()
    }

    fn tree_of(data: &[u8]) -> Tree {
        let leaves = data
            .chunks(CS)
            .map(|c| {
                if is_all_zero(c) {
                    Hash::ZERO
                } else {
                    Hash::of_chunk(c)
                }
            })
            .collect();
        Tree::build(data.len() as u64, CS as u32, leaves)
    }

    fn nodes_of(t: &Tree) -> Vec<Vec<u8>> {
        (1..t.levels.len())
            .flat_map(|l| (0..t.levels[l].len()).map(move |i| (l, i)))
            .map(|(l, i)| t.node(l, i).encode())
            .collect()
    }

    fn open(side: &Arc<ReplicaSide>, data: &[u8]) {
        let r = side.handle(Request::Open {
            volume: "v".into(),
            size: data.len() as u64,
            chunk_size: CS as u32,
            mode: Mode::Snapshot,
        });
        assert!(matches!(r, Response::Opened { .. }), "{r:?}");
    }

    fn send_all(side: &Arc<ReplicaSide>, data: &[u8], t: &Tree, skip: Option<usize>) -> Response {
        open(side, data);
        assert!(matches!(
            side.handle(Request::PutNodes {
                volume: "v".into(),
                nodes: nodes_of(t)
            }),
            Response::Ok
        ));
        let items = data
            .chunks(CS)
            .enumerate()
            .filter(|(i, c)| !is_all_zero(c) && Some(*i) != skip)
            .map(|(_, c)| ChunkPut::Full {
                hash: Hash::of_chunk(c),
                record: encode_chunk(c),
            })
            .collect();
        assert!(matches!(
            side.handle(Request::PutChunks {
                volume: "v".into(),
                items
            }),
            Response::Stored(_)
        ));
        side.handle(Request::Commit {
            volume: "v".into(),
            root_node: t.root_node().encode(),
            fuzzy: None,
        })
    }

    #[test]
    fn a_commit_writes_the_image_and_drops_pending_nodes_of_abandoned_passes() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let side = Arc::new(ReplicaSide::new(
            store.clone(),
            dir.path(),
            true,
            Retention::default(),
            1 << 30,
            std::time::Duration::from_secs(10),
        ));
        // An abandoned pass: its nodes arrive, no commit follows.
        let other = image(7, 600);
        open(&side, &other);
        side.handle(Request::PutNodes {
            volume: "v".into(),
            nodes: nodes_of(&tree_of(&other)),
        });
        assert!(!store.scan_meta(b"pnode/v/").unwrap().is_empty());
        // The next pass commits.
        let data = image(3, 600);
        let t = tree_of(&data);
        let r = send_all(&side, &data, &t, None);
        assert!(
            matches!(r, Response::Committed { ref point } if point.root == t.root),
            "{r:?}"
        );
        assert_eq!(
            std::fs::read(dir.path().join("replicas/v.img")).unwrap(),
            data
        );
        assert!(
            store.scan_meta(b"pnode/").unwrap().is_empty(),
            "no pending node outlives a commit"
        );
        assert!(store.has_node(&t.levels[1][0]).unwrap());
    }

    #[test]
    fn a_commit_with_a_missing_chunk_is_refused_and_the_last_point_stays() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let side = Arc::new(ReplicaSide::new(
            store.clone(),
            dir.path(),
            true,
            Retention::default(),
            1 << 30,
            std::time::Duration::from_secs(10),
        ));
        // Under 256 chunks, every non-zero chunk of an image is distinct.
        let first = image(3, 250);
        assert!(matches!(
            send_all(&side, &first, &tree_of(&first), None),
            Response::Committed { .. }
        ));
        let second = image(5, 250);
        let r = send_all(&side, &second, &tree_of(&second), Some(4));
        assert!(
            matches!(r, Response::Error { ref message } if message.contains("not here yet")),
            "{r:?}"
        );
        let rec = state::get_volume(&*store, "v").unwrap().unwrap();
        assert_eq!(
            rec.committed,
            Some(tree_of(&first).root),
            "the replica still names the first state"
        );
        assert!(rec.applying.is_none(), "the image was not touched");
        assert_eq!(
            std::fs::read(dir.path().join("replicas/v.img")).unwrap(),
            first
        );
        assert_eq!(state::list_points(&*store, "v").unwrap().len(), 1);
    }

    #[test]
    fn a_restart_finishes_an_apply_that_a_crash_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let side = Arc::new(ReplicaSide::new(
            store.clone(),
            dir.path(),
            true,
            Retention::default(),
            1 << 30,
            std::time::Duration::from_secs(10),
        ));
        let first = image(3, 250);
        let t1 = tree_of(&first);
        assert!(matches!(
            send_all(&side, &first, &t1, None),
            Response::Committed { .. }
        ));
        let second = image(5, 250);
        let t2 = tree_of(&second);
        assert!(matches!(
            send_all(&side, &second, &t2, None),
            Response::Committed { .. }
        ));
        // Rewind to the moment of a crash half way through writing the second
        // state: the record says "applying t2" over t1, and the image is torn.
        let mut rec = state::get_volume(&*store, "v").unwrap().unwrap();
        rec.committed = Some(t1.root);
        rec.applying = Some(t2.root);
        store
            .apply(
                vec![
                    state::put_volume_op(&rec),
                    Op::DeleteMeta(state::point_key("v", 2)),
                ],
                true,
            )
            .unwrap();
        let img = dir.path().join("replicas/v.img");
        let mut torn = second.clone();
        torn[100 * CS..].copy_from_slice(&first[100 * CS..]);
        torn[7 * CS..8 * CS].fill(0xEE);
        std::fs::write(&img, &torn).unwrap();
        // The daemon restarts.
        let side = Arc::new(ReplicaSide::new(
            store.clone(),
            dir.path(),
            true,
            Retention::default(),
            1 << 30,
            std::time::Duration::from_secs(10),
        ));
        side.recover().unwrap();
        assert_eq!(
            std::fs::read(&img).unwrap(),
            second,
            "the interrupted state is finished, byte for byte"
        );
        let rec = state::get_volume(&*store, "v").unwrap().unwrap();
        assert_eq!((rec.committed, rec.applying), (Some(t2.root), None));
        assert_eq!(
            state::list_points(&*store, "v")
                .unwrap()
                .last()
                .map(|p| p.root),
            Some(t2.root)
        );
    }

    fn records(side: &Arc<ReplicaSide>, recs: &[crate::volume::journal::Record]) -> Response {
        let raw: Vec<u8> = recs.iter().flat_map(|r| r.encode()).collect();
        side.handle(Request::Records {
            volume: "v".into(),
            first: recs[0].seq,
            data: zstd::bulk::compress(&raw, 1).unwrap(),
        })
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let t0 = std::time::Instant::now();
        while !f() {
            assert!(t0.elapsed().as_secs() < 20, "timed out waiting for {what}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn a_resync_keeps_the_last_point_until_the_stream_makes_the_image_consistent() {
        use crate::proto::messages::FuzzyCommit;
        use crate::volume::journal::{Kind, Record};
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let side = Arc::new(ReplicaSide::new(
            store.clone(),
            dir.path(),
            true,
            Retention::default(),
            1 << 30,
            std::time::Duration::from_secs(3600),
        ));
        let seed = |data: &[u8], from_seq: u64, consistent_at: u64| {
            let t = tree_of(data);
            side.handle(Request::Open {
                volume: "v".into(),
                size: data.len() as u64,
                chunk_size: CS as u32,
                mode: Mode::Async,
            });
            side.handle(Request::PutNodes {
                volume: "v".into(),
                nodes: nodes_of(&t),
            });
            let items = data
                .chunks(CS)
                .filter(|c| !is_all_zero(c))
                .map(|c| ChunkPut::Full {
                    hash: Hash::of_chunk(c),
                    record: encode_chunk(c),
                })
                .collect();
            side.handle(Request::PutChunks {
                volume: "v".into(),
                items,
            });
            side.handle(Request::Commit {
                volume: "v".into(),
                root_node: t.root_node().encode(),
                fuzzy: Some(FuzzyCommit {
                    from_seq,
                    consistent_at,
                }),
            })
        };
        let points = || state::list_points(&*store, "v").unwrap();
        let rec = || state::get_volume(&*store, "v").unwrap().unwrap();
        // A seed read while nothing was written: consistent at once, with a point.
        let a = image(1, 40);
        assert!(matches!(seed(&a, 1, 0), Response::CommittedFuzzy));
        wait_for("the seed's point", || points().len() == 1);
        assert_eq!(points()[0].root, tree_of(&a).root);

        // A resync read while records 10..=12 were written: out of order
        // until they are applied; the point of `a` is the one to use.
        let b = image(2, 40);
        assert!(matches!(seed(&b, 10, 12), Response::CommittedFuzzy));
        assert!(!state::consistent(&rec()));
        let r = side.handle(Request::CreatePoint { volume: "v".into() });
        assert!(
            matches!(r, Response::Error { ref message } if message.contains("not consistent")),
            "{r:?}"
        );
        assert_eq!(points().len(), 1);

        let w = |seq, offset: u64, byte: u8| Record {
            seq,
            kind: Kind::Write,
            offset,
            len: 4096,
            data: vec![byte; 4096],
        };
        let flush = |seq| Record {
            seq,
            kind: Kind::Flush,
            offset: 0,
            len: 0,
            data: vec![],
        };
        // A batch that skips ahead is refused; in order it is durable.
        assert!(matches!(
            records(&side, &[w(11, 0, 9)]),
            Response::Error { .. }
        ));
        let r = records(&side, &[w(10, 0, 7), w(11, CS as u64 * 3, 8)]);
        assert!(matches!(r, Response::Durable { upto: 11, .. }), "{r:?}");
        // Without the flush nothing is applied: still inconsistent.
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!state::consistent(&rec()));
        let r = records(&side, &[flush(12)]);
        assert!(matches!(r, Response::Durable { upto: 12, .. }), "{r:?}");
        wait_for("consistency and its point", || points().len() == 2);
        let mut want = b.clone();
        want[..4096].fill(7);
        want[CS * 3..CS * 3 + 4096].fill(8);
        let img = std::fs::read(dir.path().join("replicas/v.img")).unwrap();
        assert!(
            img == want,
            "the image is the resynced state plus the stream"
        );
        assert!(state::consistent(&rec()));
        assert_eq!(
            points()[1].root,
            tree_of(&want).root,
            "the point names the image"
        );
        assert_eq!(points()[1].seq, Some(12));
        // A record past the end of the volume is refused before anything is stored.
        let r = records(&side, &[w(13, want.len() as u64 - 100, 1)]);
        assert!(
            matches!(r, Response::Error { ref message } if message.contains("past the end")),
            "{r:?}"
        );
        side.stop();
    }
}
