//! Commits at the DR side: a pass's tree becomes the replica image.
//!
//! Order (invariant 2): every chunk and node of the new tree must be in the
//! store; then the nodes are promoted and the volume marked `applying`
//! (durable); then the image is rewritten where the trees differ and
//! fsynced; only then is the new root recorded with a recovery point
//! (durable). A crash anywhere leaves the previous point intact; a restart
//! finishes `applying`. A resync's commit (fuzzy) records no point: the
//! records held since the resync began then apply on top, and the image is
//! consistent once they pass the commit's marker.

use std::path::Path;
use std::sync::{Arc, MutexGuard};

use super::recent::{DeltaOver, Kept};
use super::replica::{Pending, ReplicaError, ReplicaSide, pending_prefix, refused};
use super::volume::{VolumeHandle, refusal_code};
use crate::hash::Hash;
use crate::proto::messages::{ErrorCode, FuzzyCommit, Response};
use crate::store::state::{self, RecoveryPoint, Role, VolumeRecord};
use crate::store::tree::{self, Node, StoreNodes, chunk_range};
use crate::store::{Op, StoreError};
use crate::volume::image;

/// Threads writing chunks into a replica image at commit.
const APPLY_THREADS_MAX: usize = 4;

fn lock<T>(m: &std::sync::Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ReplicaSide {
    pub(super) fn commit(
        &self,
        h: &Arc<VolumeHandle>,
        root_node: &[u8],
        fuzzy: Option<FuzzyCommit>,
    ) -> Result<Response, ReplicaError> {
        let _io = lock(&h.io);
        // Admitted before a promotion held the peer's writes, perhaps:
        // checked again under the lock the promotion waits on, so that no
        // commit writes a promoted image.
        h.admit_peer_write().map_err(|r| {
            ReplicaError::Refused(refusal_code(&r), format!("volume {}: {r}", h.name))
        })?;
        let _gc = self.gc_lock.read().unwrap_or_else(|p| p.into_inner());
        let volume = h.name.as_str();
        let mut rec = h.record();
        let node = Node::decode(root_node).map_err(|e| {
            ReplicaError::Refused(ErrorCode::Malformed, format!("malformed root: {e}"))
        })?;
        let Node::Root {
            height,
            top,
            chunk_size,
            ..
        } = node
        else {
            return Err(ReplicaError::Refused(
                ErrorCode::Malformed,
                "commit names an inner node, not a root".into(),
            ));
        };
        let root = Node::hash_encoded(root_node);
        if let Some(f) = fuzzy {
            if f.from_seq == 0 || f.consistent_at.saturating_add(1) < f.from_seq {
                return Err(ReplicaError::Refused(
                    ErrorCode::Malformed,
                    format!("malformed resync commit {f:?}"),
                ));
            }
            if rec.stream.resync_from != Some(f.from_seq) {
                return Err(refused(format!(
                    "no resync is open at record {} for volume {volume} (it opens with ResyncBegin)",
                    f.from_seq
                )));
            }
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
        // Known without a store lookup: what this pass stored (kept from
        // collection: `fresh` and the store write go together under the gc
        // lock), and the committed tree's chunks (a collection root) where
        // they stayed.
        let store_nodes = StoreNodes(&*self.store);
        let mut old = match rec.committed {
            Some(o) if tree::root_shape(&store_nodes, &o)?.1 == chunk_size => {
                Some(tree::LeafCursor::new(&store_nodes, &o)?)
            }
            _ => None,
        };
        let mut known = |i: u64, c: &Hash| -> Result<bool, ReplicaError> {
            if h.with_intake(|n| n.fresh.contains(c)).unwrap_or(false) {
                return Ok(true);
            }
            match old.as_mut() {
                Some(o) => Ok(o.leaf(i)? == Some(*c)),
                None => Ok(false),
            }
        };
        self.collect(
            &pending,
            &top,
            height,
            0,
            &mut known,
            &mut promote,
            &mut missing,
        )?;
        if missing > 0 {
            return Err(ReplicaError::Refused(
                ErrorCode::Refused,
                format!("commit refused: {missing} chunks of the new state are not here yet"),
            ));
        }
        // 2. Promote nodes, mark the image inconsistent (durable). Pending
        //    nodes of this volume that the new tree does not use came from
        //    abandoned passes: they go in the same batch.
        let mut ops: Vec<Op> = Vec::with_capacity(promote.len() * 2 + 2);
        for (k, _) in self.store.scan_meta(&pending_prefix(volume))? {
            ops.push(Op::DeleteMeta(k));
        }
        for (hash, bytes) in promote {
            ops.push(Op::PutNode(hash, bytes));
        }
        ops.push(Op::PutNode(root, root_node.to_vec()));
        rec.applying = Some(root);
        if let Some(f) = fuzzy {
            // Out of order from here until the stream passes `consistent_at`.
            rec.stream.inconsistent_until = Some(f.consistent_at);
        }
        h.apply_with(ops, rec, true)?;
        let checked_ms = t0.elapsed().as_millis() as u64;
        // 3 and 4.
        let point = self.finish_apply(h, true)?;
        // What this pass stored is now reachable from its point (or garbage).
        h.with_intake(|i| {
            i.fresh.clear();
            i.recent.clear();
            i.bases.clear();
            i.places.clear();
        });
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

    /// Applies `applying`: a pass's commit (with a point) or a resync's
    /// (no point; the records held since the resync began apply next). The
    /// caller holds the volume's io lock.
    /// `compare`: a chunk writes only the blocks that differ from what the
    /// image shows (see `apply_image`).
    pub(super) fn finish_apply(
        &self,
        h: &VolumeHandle,
        compare: bool,
    ) -> Result<Option<RecoveryPoint>, ReplicaError> {
        let Some(from) = h.record().stream.resync_from else {
            return self.apply_image(h, true, compare, |_| {});
        };
        let mut until = None;
        self.apply_image(h, false, compare, |r| {
            r.stream.base_seq = from - 1;
            r.stream.applied_seq = from - 1;
            r.stream.applied_checksum = 0;
            r.stream.resync_from = None;
            // Nothing was written while the pass read: consistent at once.
            if r.stream.inconsistent_until.is_some_and(|u| u < from) {
                r.stream.inconsistent_until = None;
            }
            until = Some(r.stream.inconsistent_until.unwrap_or(0));
        })?;
        let until = until.unwrap_or(0);
        if let Some(rs) = h.replica_stream() {
            rs.resync_committed(until);
        }
        tracing::info!(volume = %h.name, from, until, "resync applied; consistent once the stream passes its marker");
        Ok(None)
    }

    /// Rewrites the replica image from `committed` to `applying`, fsyncs, and
    /// records the new root with a recovery point.
    ///
    /// With `compare` (and no failed fsync of this image in this process),
    /// each chunk writes only the 4 KiB blocks that differ from what the
    /// image shows through the page cache, so the fsync writes the blocks a
    /// pass changed, not whole chunks. Without it, whole chunks: the cache
    /// may show bytes a failed fsync never wrote to the disk.
    fn apply_image(
        &self,
        h: &VolumeHandle,
        with_point: bool,
        compare: bool,
        finish: impl FnOnce(&mut VolumeRecord),
    ) -> Result<Option<RecoveryPoint>, ReplicaError> {
        let compare = compare
            && !h
                .image_sync_failed
                .load(std::sync::atomic::Ordering::SeqCst);
        let mut rec = h.record();
        let Some(target) = rec.applying else {
            return Err(refused("nothing to apply"));
        };
        let (size, chunk_size, _, _) = tree::root_shape(&StoreNodes(&*self.store), &target)?;
        let f = image::open_replica(&rec.path)?;
        // Chunks are compared where the pass changed them, not in order.
        image::advise_random(&f);
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
        // ... then the writing, on a few threads: of the chunks the pass
        // brought, those still in memory, the rest read back from the store
        // (decompressed and verified).
        let recent = h
            .with_intake(|i| std::mem::take(&mut i.recent))
            .unwrap_or_default();
        let recent = &recent;
        // What a seed already wrote into the image as it arrived (taken:
        // after this commit writes, only its own writes describe the image).
        let placed = h.with_intake(|i| i.placed.take()).unwrap_or_default();
        if old.is_none() && !placed.is_empty() {
            todo.retain(|(i, h)| h.is_zero() || placed.get(i) != Some(h));
        }
        let written = todo.len();
        let per = todo.len().div_ceil(APPLY_THREADS_MAX).max(1);
        let path = &rec.path;
        let results: Vec<Result<Sources, StoreError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = todo
                .chunks(per)
                .map(|part| {
                    let f = &f;
                    scope.spawn(move || {
                        let mut from = Sources::default();
                        for &(index, new) in part {
                            let kept = recent.get(&new);
                            let at = (index, new);
                            let src =
                                self.write_chunk(f, path, size, chunk_size, at, kept, compare)?;
                            from.0[src as usize] += 1;
                        }
                        Ok(from)
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
        let mut from = Sources::default();
        for r in results {
            for (all, n) in from.0.iter_mut().zip(r?.0) {
                *all += n;
            }
        }
        let [holes, memory, deltas, stored_deltas, store] = from.0;
        tracing::debug!(volume = %rec.name, holes, memory, deltas, stored_deltas, store, "replica chunks written, by where their bytes came from");
        let t_sync = std::time::Instant::now();
        if self.fsync {
            image::sync(&f, &rec.path).inspect_err(|_| {
                h.image_sync_failed
                    .store(true, std::sync::atomic::Ordering::SeqCst)
            })?;
        }
        tracing::debug!(volume = %rec.name, fsync_ms = t_sync.elapsed().as_millis() as u64, "replica image synced");
        rec.committed = Some(target);
        rec.applying = None;
        rec.size = size;
        rec.chunk_size = chunk_size;
        rec.totals.passes += 1;
        finish(&mut rec);
        if !with_point {
            let name = rec.name.clone();
            h.apply_with(Vec::new(), rec, true)?;
            tracing::info!(volume = %name, chunks_written = written, "replica resynced (no point: not a consistent state)");
            return Ok(None);
        }
        let points = state::list_points(&*self.store, &rec.name)?;
        let point = RecoveryPoint {
            id: points.last().map(|p| p.id + 1).unwrap_or(1),
            volume: rec.name.clone(),
            root: target,
            created: crate::util::trusted_now_unix(),
            size,
            source: "snapshot pass".into(),
            seq: None,
            pinned: None,
        };
        // Retention: the new point and the ones the policy keeps stay; the rest go.
        let mut points = points;
        points.push(point.clone());
        let dropped = self.prune(&points, point.created);
        let mut ops = vec![state::put_point_op(&point)];
        ops.extend(
            dropped
                .iter()
                .map(|id| Op::DeleteMeta(state::point_key(&rec.name, *id))),
        );
        let name = rec.name.clone();
        h.apply_with(ops, rec, true)?;
        if !dropped.is_empty() {
            tracing::info!(volume = %name, pruned = dropped.len(), "recovery points pruned by retention");
            self.gc_due();
        }
        tracing::info!(volume = %name, point = point.id, chunks_written = written, "replica committed");
        Ok(Some(point))
    }

    /// Writes one leaf into the replica image: a hole for a zero chunk, else
    /// the chunk as the pass brought it (`kept`: verified when it arrived,
    /// or rebuilt again from its delta and checked) or read back from the
    /// store (verified on read), at its place.
    #[allow(clippy::too_many_arguments)]
    fn write_chunk(
        &self,
        f: &std::fs::File,
        path: &Path,
        size: u64,
        chunk_size: u32,
        (index, new): (u64, Hash),
        kept: Option<&Kept>,
        compare: bool,
    ) -> Result<Source, StoreError> {
        let (start, end) = chunk_range(size, chunk_size, index);
        let mut src = Source::Hole;
        let r = if new.is_zero() {
            image::write_zeros(f, path, start, end - start).map(|_| ())
        } else {
            let (read, rebuilt);
            // What the image holds there, when a delta was rebuilt over it.
            let mut held = None;
            let data = match kept {
                Some(Kept::Whole(d)) => {
                    src = Source::Memory;
                    d.as_slice()
                }
                Some(Kept::Delta(d))
                    if let Some((base, r)) = rebuild_in_place(f, d, index, (start, end), &new) =>
                {
                    src = Source::Delta;
                    held = base;
                    rebuilt = r;
                    rebuilt.as_slice()
                }
                _ if let Some((base, r)) =
                    self.stored_delta_in_place(f, index, (start, end), &new) =>
                {
                    src = Source::StoredDelta;
                    held = base;
                    rebuilt = r;
                    rebuilt.as_slice()
                }
                _ => {
                    src = Source::Store;
                    read = self.store.get_chunk(&new)?.ok_or_else(|| {
                        StoreError::Read(format!("chunk {} vanished", new.short()))
                    })?;
                    read.as_slice()
                }
            };
            if data.len() as u64 != end - start {
                return Err(StoreError::Read(format!(
                    "chunk {} has {} bytes where {} fit",
                    new.short(),
                    data.len(),
                    end - start
                )));
            }
            if compare {
                match held {
                    Some(old) => image::write_diff(f, path, start, &old, data).map(|_| ()),
                    None => image::write_changed(f, path, start, data).map(|_| ()),
                }
            } else {
                image::write_at(f, path, start, data)
            }
        };
        r.map_err(|e| StoreError::Write(e.to_string()))?;
        // The disk starts on it while the other chunks are written: the
        // fsync after them then waits for less.
        image::start_writeback(f, start, end - start);
        Ok(src)
    }

    /// A chunk the store keeps as a delta, rebuilt over what the image
    /// holds at its place (or over zeros) as `rebuild_in_place` does: the
    /// delta's own record is read, not its base's (which, written past the
    /// page cache, would be a read of the disk). Usually the image holds
    /// that base there, since HaveChunks offered it from there; else `None`.
    fn stored_delta_in_place(
        &self,
        f: &std::fs::File,
        index: u64,
        range: (u64, u64),
        new: &Hash,
    ) -> Option<(Option<Vec<u8>>, Vec<u8>)> {
        let d = self.store.get_delta(new).ok()??;
        let d = DeltaOver {
            at: (!d.base.is_zero()).then_some(index),
            len: u32::try_from(d.len).ok()?,
            blocks: d.blocks,
            data: d.data,
        };
        rebuild_in_place(f, &d, index, range, new)
    }

    /// Finishes any commit a crash interrupted (run before serving the peer).
    pub fn recover(&self) -> Result<(), ReplicaError> {
        let handles: Vec<Arc<VolumeHandle>> = lock(&self.volumes).values().cloned().collect();
        for h in handles {
            let rec = h.record();
            if rec.role == Role::Replica && rec.applying.is_some() {
                tracing::warn!(volume = %rec.name, "replica image was being updated at a crash; finishing the update");
                let _io = lock(&h.io);
                // After a crash, what the page cache shows may be what an
                // earlier process's failed fsync left: whole chunks.
                self.finish_apply(&h, false)?;
            }
        }
        Ok(())
    }
}

/// Where a chunk the commit wrote came from.
#[derive(Clone, Copy)]
enum Source {
    /// A zero chunk: a hole.
    Hole,
    /// Kept whole since it arrived.
    Memory,
    /// Kept as its delta, rebuilt in place.
    Delta,
    /// Stored as a delta, rebuilt in place.
    StoredDelta,
    /// Read back from the store.
    Store,
}

/// Chunks written, by `Source`.
#[derive(Default)]
struct Sources([u64; 5]);

/// Rebuilds a chunk kept as its delta where it goes, chunk `index` at
/// `[start, end)`: over zeros, or over what the image holds there (not
/// yet written by this commit, which writes each place once). `None`
/// (read it from the store) when it was rebuilt over another place or the
/// image no longer gives the chunk's name. With the chunk, what the image
/// holds there when it was rebuilt over that (to compare with, unread).
fn rebuild_in_place(
    f: &std::fs::File,
    d: &DeltaOver,
    index: u64,
    (start, end): (u64, u64),
    new: &Hash,
) -> Option<(Option<Vec<u8>>, Vec<u8>)> {
    let in_image = match d.at {
        None => false,
        Some(at) if at == index => true,
        Some(_) => return None,
    };
    if u64::from(d.len) != end - start {
        return None;
    }
    let mut base = vec![0u8; d.len as usize];
    if in_image {
        image::read_sparse(f, &mut base, start).ok()?;
    }
    let out = crate::volume::delta::apply(&base, &d.blocks, &d.data).ok()?;
    (Hash::of_chunk(&out) == *new).then_some((in_image.then_some(base), out))
}
