//! Continuous replication at the DR site: the redo log, the applier and
//! recovery points at flush boundaries.
//!
//! Records arrive in order and are appended to a per-volume redo log (the
//! journal format, keeping the primary's sequence numbers), which is fsynced
//! once per batch before the primary hears "durable" (group commit). An
//! applier thread writes records into the replica image only up to the last
//! complete flush epoch, fsyncs the image, then advances `applied_seq`: the
//! image always holds a flush boundary, and after a crash the records after
//! `applied_seq` are simply written again (each record overwrites a range,
//! so replay is idempotent).
//!
//! Points: the image equals the tree `committed` plus the redo records
//! `(base_seq, applied_seq]`. A point rehashes the chunks those records
//! touched, patches the tree, stores chunks and nodes, and then moves
//! `base_seq` up and trims the redo log.

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::replica::{ReplicaError, ReplicaSide};
use crate::hash::Hash;
use crate::proto::messages::{
    Response, STREAM_BATCH_BYTES_MAX, STREAM_RECORD_DATA_MAX, STREAM_RECORDS_MAX,
};
use crate::store::gc;
use crate::store::state::{self, RecoveryPoint, VolumeRecord};
use crate::store::tree::{self, FANOUT, StoreNodes, Tree, chunk_range};
use crate::store::{Op, StoreError};
use crate::volume::image;
use crate::volume::journal::{Journal, JournalError, Kind, Record, decode_records};

/// Bytes of redo records read at once when applying.
const APPLY_READ_BYTES: u64 = 64 << 20;
/// How long `ferry points --create` waits for the point.
const POINT_WAIT: Duration = Duration::from_secs(60);

pub struct RedoVolume {
    name: String,
    journal: Mutex<Journal>,
    st: Mutex<RedoState>,
    cond: Condvar,
}

#[derive(Default)]
struct RedoState {
    /// The newest Flush record in the redo log.
    last_flush: u64,
    applied: u64,
    want_point: u64,
    points_made: u64,
    last_point: Option<RecoveryPoint>,
    last_point_at: Option<Instant>,
    /// The image just became consistent after a resync: a point now.
    point_soon: bool,
    error: Option<String>,
}

/// What status shows of a replica's stream.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RedoView {
    pub redo_bytes: u64,
    pub received_seq: u64,
    pub applied_seq: u64,
    pub last_error: Option<String>,
}

fn st(rv: &RedoVolume) -> MutexGuard<'_, RedoState> {
    rv.st.lock().unwrap_or_else(|p| p.into_inner())
}

fn journal(rv: &RedoVolume) -> MutexGuard<'_, Journal> {
    rv.journal.lock().unwrap_or_else(|p| p.into_inner())
}

fn jerr(e: JournalError) -> ReplicaError {
    ReplicaError::Refused(e.to_string())
}

impl RedoVolume {
    pub fn view(&self) -> RedoView {
        let j = journal(self);
        let s = st(self);
        RedoView {
            redo_bytes: j.bytes(),
            received_seq: j.next_seq() - 1,
            applied_seq: s.applied,
            last_error: s.error.clone(),
        }
    }
}

/// Chunk indices a record touches.
fn touched(r: &Record, chunk_size: u32, out: &mut BTreeSet<u64>) {
    if r.kind == Kind::Flush || r.len == 0 {
        return;
    }
    let cs = chunk_size as u64;
    let first = r.offset / cs;
    let last = (r.offset + r.len as u64 - 1) / cs;
    out.extend(first..=last);
}

impl ReplicaSide {
    /// The redo log and applier of a continuous replica, opened on first use.
    pub(super) fn redo_volume(
        self: &Arc<Self>,
        rec: &VolumeRecord,
    ) -> Result<Arc<RedoVolume>, ReplicaError> {
        let mut map = self.redo.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rv) = map.get(&rec.name) {
            return Ok(rv.clone());
        }
        let dir = self.redo_dir.join(&rec.name);
        let (mut j, recovered) = Journal::open(&dir, self.journal_bytes_max).map_err(jerr)?;
        if recovered.cut_bytes > 0 {
            tracing::warn!(volume = %rec.name, cut_bytes = recovered.cut_bytes, "redo log had a torn tail; the primary sends it again");
        }
        let base = rec.stream.base_seq;
        if j.next_seq() <= base + 1 {
            j.reset(base + 1).map_err(jerr)?;
        }
        // The newest complete flush epoch already here.
        let mut last_flush = rec.stream.applied_seq;
        let view = j.view();
        let mut from = rec.stream.applied_seq + 1;
        if from >= j.first_seq() {
            loop {
                let recs = view.read_from(from, APPLY_READ_BYTES).map_err(jerr)?;
                let Some(last) = recs.last().map(|r| r.seq) else {
                    break;
                };
                if let Some(f) = recs.iter().rev().find(|r| r.kind == Kind::Flush) {
                    last_flush = last_flush.max(f.seq);
                }
                from = last + 1;
            }
        }
        let rv = Arc::new(RedoVolume {
            name: rec.name.clone(),
            journal: Mutex::new(j),
            st: Mutex::new(RedoState {
                last_flush,
                applied: rec.stream.applied_seq,
                last_point_at: Some(Instant::now()),
                ..Default::default()
            }),
            cond: Condvar::new(),
        });
        map.insert(rec.name.clone(), rv.clone());
        let (side, rv2) = (self.clone(), rv.clone());
        std::thread::Builder::new()
            .name(format!("apply-{}", rec.name))
            .spawn(move || side.applier(rv2))
            .map_err(|e| ReplicaError::Refused(format!("cannot start the applier: {e}")))?;
        Ok(rv)
    }

    pub fn redo_view(&self, volume: &str) -> Option<RedoView> {
        self.redo
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume)
            .map(|rv| rv.view())
    }

    /// Opens the redo logs of every continuous replica (at start), so that
    /// records received before a crash are applied without waiting for the primary.
    pub fn start_streams(self: &Arc<Self>) -> Result<(), ReplicaError> {
        for rec in state::list_volumes(&*self.store)? {
            if rec.role == state::Role::Replica && rec.mode.continuous() && rec.committed.is_some()
            {
                self.redo_volume(&rec)?;
            }
        }
        Ok(())
    }

    pub(super) fn stream_open(
        self: &Arc<Self>,
        volume: &str,
        size: u64,
        chunk_size: u32,
    ) -> Result<Response, ReplicaError> {
        let need = Response::StreamOpened {
            next_seq: 0,
            need_resync: true,
        };
        let Some(rec) = state::get_volume(&*self.store, volume)? else {
            return Ok(need);
        };
        if rec.role != state::Role::Replica {
            return Err(ReplicaError::Refused(format!(
                "volume {volume} is primary at this site; refusing to become its replica"
            )));
        }
        if rec.committed.is_none()
            || rec.applying.is_some()
            || rec.size != size
            || rec.chunk_size != chunk_size
            || !rec.mode.continuous()
        {
            return Ok(need);
        }
        let rv = self.redo_volume(&rec)?;
        let next_seq = journal(&rv).next_seq();
        Ok(Response::StreamOpened {
            next_seq,
            need_resync: false,
        })
    }

    /// Appends a batch to the redo log, durably, and says up to where.
    pub(super) fn records(
        self: &Arc<Self>,
        volume: &str,
        first: u64,
        data: &[u8],
    ) -> Result<Response, ReplicaError> {
        let rec = self.replica_record(volume)?;
        if !rec.mode.continuous() || rec.committed.is_none() {
            return Err(ReplicaError::Refused(format!(
                "volume {volume} has no continuous copy here yet; resync first"
            )));
        }
        let raw_max = (STREAM_BATCH_BYTES_MAX as usize) + STREAM_RECORD_DATA_MAX + (1 << 20);
        let raw = zstd::bulk::decompress(data, raw_max).map_err(|e| {
            ReplicaError::Refused(format!(
                "journal batch does not decompress within {raw_max} bytes: {e}"
            ))
        })?;
        let recs = decode_records(&raw, STREAM_RECORDS_MAX).map_err(ReplicaError::Refused)?;
        for (i, r) in recs.iter().enumerate() {
            if r.seq != first + i as u64 {
                return Err(ReplicaError::Refused(format!(
                    "journal batch from {first} is not in order at record {}",
                    r.seq
                )));
            }
            let end = r.offset.checked_add(r.len as u64);
            if r.kind != Kind::Flush && end.is_none_or(|e| e > rec.size) {
                return Err(ReplicaError::Refused(format!(
                    "journal record {} writes past the end of the {}-byte volume",
                    r.seq, rec.size
                )));
            }
        }
        let rv = self.redo_volume(&rec)?;
        let mut j = journal(&rv);
        let mut flush = None;
        for r in &recs {
            if r.seq < j.next_seq() {
                continue; // sent again after a lost answer
            }
            match j.append_record(r) {
                Ok(_) => {}
                Err(JournalError::Full { bytes, max }) => {
                    return Err(ReplicaError::Refused(format!(
                        "the DR redo log is full ({bytes} of {max} bytes) while the replica catches up; retry"
                    )));
                }
                Err(e) => return Err(jerr(e)),
            }
            if r.kind == Kind::Flush {
                flush = Some(r.seq);
            }
        }
        if self.fsync {
            j.sync().map_err(jerr)?;
        }
        let upto = j.next_seq() - 1;
        drop(j);
        let mut s = st(&rv);
        if let Some(f) = flush {
            s.last_flush = s.last_flush.max(f);
            rv.cond.notify_all();
        }
        if s.last_point.is_none() {
            s.last_point = state::list_points(&*self.store, volume)?.pop();
        }
        let point = s.last_point.as_ref().map(|p| (p.id, p.created));
        Ok(Response::Durable { upto, point })
    }

    /// `ferry points NAME --create`: a point at the next flush boundary.
    pub(super) fn create_point(self: &Arc<Self>, volume: &str) -> Result<Response, ReplicaError> {
        let rec = self.replica_record(volume)?;
        if !state::consistent(&rec) {
            return Err(ReplicaError::Refused(format!(
                "volume {volume} is being resynced and is not consistent yet; its last point stays the one to use"
            )));
        }
        if !rec.mode.continuous() {
            return Err(ReplicaError::Refused(format!(
                "volume {volume} is in snapshot mode: every pass makes a point (`ferry sync {volume}`)"
            )));
        }
        let rv = self.redo_volume(&rec)?;
        let mut s = st(&rv);
        s.want_point += 1;
        let want = s.want_point;
        rv.cond.notify_all();
        let deadline = Instant::now() + POINT_WAIT;
        while s.points_made < want {
            if let Some(e) = &s.error {
                return Err(ReplicaError::Refused(e.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ReplicaError::Refused(
                    "no point within 60s; see the DR site's log".into(),
                ));
            }
            s = rv
                .cond
                .wait_timeout(s, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        s.last_point
            .clone()
            .map(Response::Point)
            .ok_or_else(|| ReplicaError::Refused("the point was not recorded".into()))
    }

    /// The applier thread of one volume: applies complete flush epochs and
    /// takes points on schedule and on demand.
    fn applier(self: Arc<Self>, rv: Arc<RedoVolume>) {
        loop {
            {
                let mut s = st(&rv);
                let due = s
                    .last_point_at
                    .is_none_or(|t| t.elapsed() >= self.point_interval);
                if s.last_flush <= s.applied
                    && s.want_point <= s.points_made
                    && !due
                    && !s.point_soon
                {
                    s = rv
                        .cond
                        .wait_timeout(s, Duration::from_millis(500))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                drop(s);
            }
            if self.stopping.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let r = self.apply_redo(&rv).and_then(|became_consistent| {
                let (soon, want, due) = {
                    let mut s = st(&rv);
                    (
                        std::mem::take(&mut s.point_soon),
                        s.want_point > s.points_made,
                        s.last_point_at
                            .is_none_or(|t| t.elapsed() >= self.point_interval),
                    )
                };
                let became_consistent = became_consistent || soon;
                let source = if want {
                    Some("on demand")
                } else if became_consistent {
                    Some("resync complete")
                } else if due {
                    Some("flush boundary")
                } else {
                    None
                };
                match source {
                    Some(src) => self.redo_point(&rv, src, want || became_consistent),
                    None => Ok(()),
                }
            });
            let mut s = st(&rv);
            match r {
                Ok(()) => s.error = None,
                Err(e) => {
                    if s.error.as_deref() != Some(&e.to_string()) {
                        tracing::error!(volume = %rv.name, error = %e, "applying the redo log failed; retrying");
                    }
                    s.error = Some(e.to_string());
                    rv.cond.notify_all();
                    drop(s);
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// Writes the complete flush epochs received into the image, fsyncs it,
    /// and records how far it got. True when the image just became consistent.
    fn apply_redo(&self, rv: &RedoVolume) -> Result<bool, ReplicaError> {
        let target = st(rv).last_flush;
        let _g = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut rec = self.replica_record(&rv.name)?;
        if target <= rec.stream.applied_seq {
            st(rv).applied = rec.stream.applied_seq;
            return Ok(false);
        }
        let f = image::open_replica(&rec.path)?;
        let view = journal(rv).view();
        let mut from = rec.stream.applied_seq + 1;
        while from <= target {
            let recs = view.read_from(from, APPLY_READ_BYTES).map_err(jerr)?;
            if recs.is_empty() {
                return Err(ReplicaError::Refused(format!(
                    "redo record {from} is missing"
                )));
            }
            for r in recs.iter().take_while(|r| r.seq <= target) {
                write_record(&f, &rec, r)?;
                from = r.seq + 1;
            }
            if recs.last().is_some_and(|r| r.seq > target) {
                break;
            }
        }
        if self.fsync {
            image::sync(&f, &rec.path)?;
        }
        rec.stream.applied_seq = target;
        let became_consistent =
            rec.stream.inconsistent_until.is_some_and(|u| target >= u) && rec.applying.is_none();
        if became_consistent {
            rec.stream.inconsistent_until = None;
            tracing::info!(volume = %rec.name, seq = target, "replica consistent again after the resync");
        }
        // A lost applied_seq only means records are written again: durable
        // only when consistency changes.
        self.store
            .apply(vec![state::put_volume_op(&rec)], became_consistent)?;
        st(rv).applied = target;
        Ok(became_consistent)
    }

    /// Takes a recovery point of the image as it is now (a flush boundary).
    fn redo_point(&self, rv: &RedoVolume, source: &str, force: bool) -> Result<(), ReplicaError> {
        let g = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut rec = self.replica_record(&rv.name)?;
        let mark = |rv: &RedoVolume, p: Option<RecoveryPoint>| {
            let mut s = st(rv);
            s.last_point_at = Some(Instant::now());
            if p.is_some() {
                s.last_point = p;
            }
            s.points_made = s.want_point;
            rv.cond.notify_all();
        };
        if !state::consistent(&rec) {
            mark(rv, None);
            return Ok(());
        }
        let Some(base) = rec.committed else {
            mark(rv, None);
            return Ok(());
        };
        let applied = rec.stream.applied_seq;
        if applied <= rec.stream.base_seq && !force {
            mark(rv, None);
            return Ok(());
        }
        // Which chunks changed since the base tree.
        let mut dirty = BTreeSet::new();
        let view = journal(rv).view();
        let mut from = rec.stream.base_seq + 1;
        while from <= applied {
            let recs = view.read_from(from, APPLY_READ_BYTES).map_err(jerr)?;
            if recs.is_empty() {
                break;
            }
            for r in recs.iter().take_while(|r| r.seq <= applied) {
                touched(r, rec.chunk_size, &mut dirty);
                from = r.seq + 1;
            }
            if recs.last().is_some_and(|r| r.seq > applied) {
                break;
            }
        }
        let nodes = StoreNodes(&*self.store);
        let mut leaves = Vec::with_capacity(tree::chunk_count(rec.size, rec.chunk_size) as usize);
        tree::for_each_leaf(&nodes, &base, &mut |_, h| {
            leaves.push(h);
            Ok(())
        })?;
        let f = image::open_replica(&rec.path)?;
        for &i in &dirty {
            let (start, end) = chunk_range(rec.size, rec.chunk_size, i);
            let mut buf = vec![0u8; (end - start) as usize];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, start)
                .map_err(|e| StoreError::Read(format!("replica image: {e}")))?;
            let h = if buf.iter().all(|b| *b == 0) {
                Hash::ZERO
            } else {
                let h = Hash::of_chunk(&buf);
                self.store.put_chunk(&h, &buf)?;
                h
            };
            if let Some(l) = leaves.get_mut(i as usize) {
                *l = h;
            }
        }
        let t = Tree::build(rec.size, rec.chunk_size, leaves);
        let mut ops = Vec::new();
        for level in 1..=t.height() as usize {
            let mut idx: Vec<usize> = dirty
                .iter()
                .map(|&i| i as usize / FANOUT.pow(level as u32))
                .collect();
            idx.dedup();
            for i in idx {
                let bytes = t.node(level, i).encode();
                ops.push(Op::PutNode(
                    crate::store::tree::Node::hash_encoded(&bytes),
                    bytes,
                ));
            }
        }
        ops.push(Op::PutNode(t.root, t.root_node().encode()));
        let points = state::list_points(&*self.store, &rec.name)?;
        let point = RecoveryPoint {
            id: points.last().map(|p| p.id + 1).unwrap_or(1),
            volume: rec.name.clone(),
            root: t.root,
            created: crate::util::now_unix(),
            size: rec.size,
            source: source.into(),
            seq: Some(applied),
        };
        rec.committed = Some(t.root);
        rec.stream.base_seq = applied;
        rec.totals.passes += 1;
        let mut all = points;
        all.push(point.clone());
        let dropped = gc::prune(&all, point.created, &self.retention);
        ops.push(state::put_volume_op(&rec));
        ops.push(state::put_point_op(&point));
        ops.extend(
            dropped
                .iter()
                .map(|id| Op::DeleteMeta(state::point_key(&rec.name, *id))),
        );
        self.store.apply(ops, true)?;
        journal(rv).trim(applied).map_err(jerr)?;
        tracing::info!(volume = %rec.name, point = point.id, seq = applied, chunks = dirty.len(), source, "recovery point");
        mark(rv, Some(point));
        drop(g);
        if !dropped.is_empty() {
            match self.collect_garbage() {
                Ok(r) => self
                    .gc_deleted
                    .fetch_add(r.chunks_deleted, std::sync::atomic::Ordering::Relaxed),
                Err(e) => {
                    tracing::error!(error = %e, "garbage collection failed; nothing was deleted past the failure");
                    0
                }
            };
        }
        Ok(())
    }

    /// A fuzzy commit replaced the image: the redo log restarts at `from_seq`.
    pub(super) fn restart_stream(
        self: &Arc<Self>,
        rec: &VolumeRecord,
        from_seq: u64,
        consistent: bool,
    ) -> Result<(), ReplicaError> {
        let rv = self.redo_volume(rec)?;
        journal(&rv).reset(from_seq).map_err(jerr)?;
        let mut s = st(&rv);
        s.applied = from_seq - 1;
        s.last_flush = from_seq - 1;
        // A consistent image after a resync gets its point at once.
        s.point_soon = consistent;
        rv.cond.notify_all();
        Ok(())
    }

    /// Chunk indices the redo log touches after `after` (a fuzzy commit
    /// rewrites them too, since the image may hold their newer content).
    pub(super) fn redo_dirty(
        self: &Arc<Self>,
        rec: &VolumeRecord,
        after: u64,
    ) -> Result<Vec<u64>, ReplicaError> {
        if rec.committed.is_none() || !rec.mode.continuous() {
            return Ok(Vec::new());
        }
        let rv = self.redo_volume(rec)?;
        let (view, first) = {
            let j = journal(&rv);
            (j.view(), j.first_seq())
        };
        let mut dirty = BTreeSet::new();
        let mut from = (after + 1).max(first);
        loop {
            let recs = match view.read_from(from, APPLY_READ_BYTES) {
                Ok(r) => r,
                Err(JournalError::Missing(_)) => break,
                Err(e) => return Err(jerr(e)),
            };
            let Some(last) = recs.last().map(|r| r.seq) else {
                break;
            };
            for r in &recs {
                touched(r, rec.chunk_size, &mut dirty);
            }
            from = last + 1;
        }
        Ok(dirty.into_iter().collect())
    }
}

/// Writes one redo record into the replica image.
fn write_record(f: &std::fs::File, rec: &VolumeRecord, r: &Record) -> Result<(), ReplicaError> {
    match r.kind {
        Kind::Write => image::write_at(f, &rec.path, r.offset, &r.data)?,
        Kind::Zero | Kind::Trim => image::write_zeros(f, &rec.path, r.offset, r.len as u64)?,
        Kind::Flush => {}
    }
    Ok(())
}
