//! Continuous replication at the DR site: one type per replica owns its
//! redo log and its applier (the [`ApplyMachine`]), takes recovery points at
//! flush boundaries, opens and closes resyncs, and repairs its image.
//!
//! Records arrive in order and are appended to the redo log (the journal
//! format, keeping the primary's sequence numbers), fsynced once per batch
//! before the primary hears "durable" (group commit). The apply job writes
//! whole flush epochs into the replica image, then records how far it got:
//! the image always holds a flush boundary, and after a crash of the daemon
//! the records after `applied_seq` are simply written again (each record
//! overwrites a range, so replay is idempotent).
//!
//! The image equals the tree `committed` plus the redo records
//! `(base_seq, applied_seq]`. A point rehashes the chunks those records
//! touched, patches the tree, stores chunks and nodes, fsyncs the image,
//! then moves `base_seq` up and trims the redo log. The image is fsynced
//! there, not after each apply: the redo log holds every record since
//! `base_seq` durably, so after a host restart (the page cache, and with
//! it image writes since the last point, may be gone) the records since
//! `base_seq` are written again, the image counting as inconsistent until
//! they are. A resync first brings `committed` level with
//! the image that way (with a point, when the image is consistent), then
//! restarts the redo log at the resync's first record and holds the records
//! until the resync's commit has rewritten the image.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::replica::{ReplicaError, ReplicaSide, refused};
use super::volume::VolumeHandle;
use super::worker::{Job, JobCtx};
use crate::hash::Hash;
use crate::proto::apply::{ApplyCommand, ApplyMachine, ApplyStart, ApplyView, PointSource};
use crate::proto::messages::{
    ErrorCode, Response, STREAM_BATCH_BYTES_MAX, STREAM_RECORD_DATA_MAX, STREAM_RECORDS_MAX,
};
use crate::store::state::{self, RecoveryPoint, VolumeRecord};
use crate::store::tree::{self, FANOUT, StoreNodes, Tree, chunk_range};
use crate::store::{Op, StoreError};
use crate::volume::image;
use crate::volume::journal::{Journal, JournalError, JournalView, Kind, RecordRef, check_records};

/// The source of a promotion's point; such points are pinned.
pub const PROMOTION: &str = "promotion";

/// Bytes of redo records read at once when applying.
const APPLY_READ_BYTES: u64 = 64 << 20;
/// Records received and not applied yet that the redo log keeps in memory
/// as they came (two full batches): the applier writes them from there
/// instead of reading them back from the log and checking them again,
/// which was a fifth of the DR site's CPU under small writes. It applies
/// whole flush epochs, so this covers clients that flush at least every
/// 16 MiB or so, and those that never flush, since the primary adds a
/// flush record of its own after the write that crosses 4 MiB
/// (`stream::checkpoint_bytes`); past it (writes larger than 4 MiB each;
/// an applier far behind; a restart) it reads the log. Per
/// continuous volume, only while records wait.
pub(crate) const REDO_KEPT_BYTES: usize = 16 << 20;
/// How long `ferry points --create` waits for the point.
const POINT_WAIT: Duration = Duration::from_secs(60);
/// Bytes of chunks a repair rebuilds in memory at once.
const REPAIR_BATCH_BYTES: u64 = 64 << 20;

pub struct ReplicaStream {
    name: String,
    journal: Mutex<Journal>,
    machine: Mutex<ApplyMachine>,
    /// Points made or failures, for `ferry points --create` waiting.
    cond: Condvar,
    /// Wakes the apply job: records arrived, a point is wanted, a resync committed.
    wake: tokio::sync::Notify,
    /// The newest point (id, Unix seconds), for the primary's status.
    last_point: Mutex<Option<(u64, u64)>>,
    /// Unix seconds the last batch of records arrived (0: not since the
    /// daemon started).
    last_received: std::sync::atomic::AtomicU64,
    /// The redo log's bytes after the last point's trim: pressure makes a
    /// point only once a quarter more has come since (the trim drops whole
    /// segments, so a point may free nothing; it is not repeated then).
    redo_mark: std::sync::atomic::AtomicU64,
    /// Set under the journal lock when a promotion begins: no batch is
    /// appended after it, and every batch appended before it is known to
    /// the apply machine.
    intake_closed: std::sync::atomic::AtomicBool,
    /// Batches that came ahead of their predecessor wait on this (with the
    /// journal's lock) until it is appended.
    arrived: Condvar,
    /// Moves on when a waiting batch can no longer follow: a new stream, a
    /// resync, or a batch before it refused.
    generation: std::sync::atomic::AtomicU64,
    /// Chunks the records applied since the last point touched, so that a
    /// point does not read the redo log back to find them.
    touched: Mutex<Touched>,
}

/// The chunks that the redo records in `(after, upto]` touch, gathered by
/// the applier as it writes them. A point uses it only when that range is
/// exactly the image's (base_seq, applied_seq]: after a restart, a resync
/// or a failed apply it does not match, and the point reads the log.
struct Touched {
    after: u64,
    upto: u64,
    chunks: BTreeSet<u64>,
}

impl Touched {
    /// Matches nothing (a restart: the applier has gathered nothing yet).
    fn unknown() -> Touched {
        Touched {
            after: u64::MAX,
            upto: 0,
            chunks: BTreeSet::new(),
        }
    }

    /// Nothing touched since record `seq` (a point or a resync at it).
    fn empty_at(seq: u64) -> Touched {
        Touched {
            after: seq,
            upto: seq,
            chunks: BTreeSet::new(),
        }
    }
}

/// How long a batch waits for the batches before it (the primary keeps
/// several in flight, each on a stream of its own, so they may arrive out
/// of order); past it the batch is refused and sent again.
const PREDECESSOR_WAIT: Duration = Duration::from_secs(10);

/// What status shows of a replica's stream.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RedoView {
    pub redo_bytes: u64,
    pub received_seq: u64,
    pub applied_seq: u64,
    /// Records in the newest point's tree.
    #[serde(default)]
    pub point_seq: u64,
    /// A resync is open: records are kept, not applied, until its commit.
    #[serde(default)]
    pub held: bool,
    pub last_error: Option<String>,
}

fn jerr(e: JournalError) -> ReplicaError {
    ReplicaError::Refused(ErrorCode::Internal, e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Chunk indices a record touches.
fn touched_chunks(r: &RecordRef, chunk_size: u32, out: &mut BTreeSet<u64>) {
    if r.kind == Kind::Flush || r.len == 0 {
        return;
    }
    let cs = chunk_size as u64;
    let first = r.offset / cs;
    let last = (r.offset + r.len as u64 - 1) / cs;
    out.extend(first..=last);
}

/// Calls `f` on every redo record in `(after, upto]`, in order, where it
/// lies (no copy of its data).
fn for_each_record(
    view: &JournalView,
    after: u64,
    upto: u64,
    mut f: impl FnMut(&RecordRef) -> Result<(), ReplicaError>,
) -> Result<(), ReplicaError> {
    let mut from = after + 1;
    while from <= upto {
        let recs = view.read_in_place(from, APPLY_READ_BYTES).map_err(jerr)?;
        let mut last = None;
        for r in recs.iter() {
            last = Some(r.seq);
            if r.seq > upto {
                return Ok(());
            }
            f(&r)?;
            from = r.seq + 1;
        }
        if last.is_none() {
            return Err(refused(format!("redo record {from} is missing")));
        }
    }
    Ok(())
}

impl ReplicaStream {
    /// Opens the redo log of a continuous replica and the applier's state
    /// (blocking).
    pub fn open(side: &ReplicaSide, h: &VolumeHandle) -> Result<Arc<ReplicaStream>, ReplicaError> {
        let rec = h.record();
        let dir = side.redo_dir.join(&rec.name);
        let (mut j, recovered) = Journal::open(&dir, side.journal_bytes_max).map_err(jerr)?;
        if recovered.cut_bytes > 0 {
            tracing::warn!(volume = %rec.name, cut_bytes = recovered.cut_bytes, "redo log had a torn tail; the primary sends it again");
        }
        j.keep_tail(REDO_KEPT_BYTES);
        match rec.stream.resync_from {
            // A resync is open: its records start at `from` (a crash may have
            // come before the old records were dropped).
            Some(from) if j.first_seq() != from => j.reset(from).map_err(jerr)?,
            Some(_) => {}
            None if j.next_seq() <= rec.stream.base_seq + 1 => {
                j.reset(rec.stream.base_seq + 1).map_err(jerr)?
            }
            None => {}
        }
        // The newest complete flush epoch already here.
        let mut last_flush = rec.stream.applied_seq;
        let view = j.view();
        let mut from = (rec.stream.applied_seq + 1).max(j.first_seq());
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
        let rec = after_restart(h, rec, last_flush)?;
        let start = ApplyStart {
            received: j.next_seq() - 1,
            last_flush,
            applied: rec.stream.applied_seq,
            base: rec.stream.base_seq,
            inconsistent_until: rec.stream.inconsistent_until,
            held: rec.stream.resync_from.is_some(),
        };
        let last_point = state::list_points(&*side.store, &rec.name)?
            .pop()
            .map(|p| (p.id, p.created));
        Ok(Arc::new(ReplicaStream {
            name: rec.name.clone(),
            journal: Mutex::new(j),
            machine: Mutex::new(ApplyMachine::new(
                start,
                side.point_interval,
                Instant::now(),
            )),
            cond: Condvar::new(),
            wake: tokio::sync::Notify::new(),
            last_point: Mutex::new(last_point),
            last_received: Default::default(),
            redo_mark: Default::default(),
            intake_closed: Default::default(),
            arrived: Condvar::new(),
            generation: Default::default(),
            touched: Mutex::new(Touched::unknown()),
        }))
    }

    pub fn view(&self) -> RedoView {
        let redo_bytes = lock(&self.journal).bytes();
        let a: ApplyView = lock(&self.machine).view();
        RedoView {
            redo_bytes,
            received_seq: a.received_seq,
            applied_seq: a.applied_seq,
            point_seq: a.point_seq,
            held: a.held,
            last_error: a.last_error,
        }
    }

    /// Batches waiting for a predecessor give up: it will not come (the
    /// sender starts again from what it heard was durable).
    fn refuse_followers(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.arrived.notify_all();
    }

    /// The stream handshake: the next record wanted, or why a resync must come first.
    pub fn stream_open(
        &self,
        rec: &VolumeRecord,
        size: u64,
        chunk_size: u32,
        incarnation: u64,
    ) -> Response {
        let resync = if rec.applying.is_some() {
            Some("a commit is being applied".to_string())
        } else if rec.stream.resync_from.is_some() {
            Some("a resync is open and must finish".to_string())
        } else if rec.size != size || rec.chunk_size != chunk_size {
            Some("the volume's shape changed".to_string())
        } else if rec.stream.source != incarnation {
            Some(format!(
                "its records continue journal {:016x}, not this one ({incarnation:016x})",
                rec.stream.source
            ))
        } else {
            None
        };
        // A new stream: batches of an older one still waiting give up.
        let j = lock(&self.journal);
        self.refuse_followers();
        Response::StreamOpened {
            next_seq: j.next_seq(),
            resync,
        }
    }

    /// Appends a batch to the redo log, durably, and says up to where. Every
    /// record must carry `epoch`, the epoch this site is in step at with its
    /// primary: a record of another epoch comes from a lineage this replica
    /// does not follow.
    pub fn records(
        &self,
        side: &ReplicaSide,
        size: u64,
        epoch: u64,
        first: u64,
        data: &[u8],
    ) -> Result<Response, ReplicaError> {
        let raw_max = (STREAM_BATCH_BYTES_MAX as usize) + STREAM_RECORD_DATA_MAX + (1 << 20);
        let raw = crate::store::decompress_frame(data, raw_max).map_err(|e| {
            ReplicaError::Refused(
                ErrorCode::Malformed,
                format!("journal batch does not decompress within {raw_max} bytes: {e}"),
            )
        })?;
        // Checked, not copied out: the batch is appended as it came.
        let raw = Arc::new(raw);
        let recs = check_records(&raw, STREAM_RECORDS_MAX)
            .map_err(|e| ReplicaError::Refused(ErrorCode::Malformed, e))?;
        for (i, r) in recs.iter().enumerate() {
            if first.checked_add(i as u64) != Some(r.seq) {
                return Err(ReplicaError::Refused(
                    ErrorCode::Malformed,
                    format!(
                        "journal batch from {first} is not in order at record {}",
                        r.seq
                    ),
                ));
            }
            if u64::from(r.epoch) != epoch {
                return Err(ReplicaError::Refused(
                    ErrorCode::StaleEpoch,
                    format!(
                        "journal record {} was written under epoch {}, but this site follows epoch {epoch} of the volume",
                        r.seq, r.epoch
                    ),
                ));
            }
            let end = r.offset.checked_add(r.len as u64);
            if r.kind != Kind::Flush && end.is_none_or(|e| e > size) {
                return Err(ReplicaError::Refused(
                    ErrorCode::Malformed,
                    format!(
                        "journal record {} writes past the end of the {size}-byte volume",
                        r.seq
                    ),
                ));
            }
        }
        let generation = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        let mut j = lock(&self.journal);
        // Sent ahead of the batch before it: wait for that one (bounded).
        let deadline = Instant::now() + PREDECESSOR_WAIT;
        while first > j.next_seq() {
            let now = Instant::now();
            if now >= deadline
                || self.generation.load(std::sync::atomic::Ordering::SeqCst) != generation
                || self.intake_closed.load(std::sync::atomic::Ordering::SeqCst)
            {
                return Err(refused(format!(
                    "journal batch from {first} skips ahead of record {}",
                    j.next_seq()
                )));
            }
            j = self
                .arrived
                .wait_timeout(j, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        if self.intake_closed.load(std::sync::atomic::Ordering::SeqCst) {
            self.refuse_followers();
            return Err(refused(
                "this site is being promoted: it takes no more records for the volume",
            ));
        }
        // Records below the redo log's next one were sent again after a
        // lost answer; the rest goes in as it came, in one write.
        let next = j.next_seq();
        let new = &recs[recs.iter().take_while(|r| r.seq < next).count()..];
        let flush = new
            .iter()
            .rev()
            .find(|r| r.kind == Kind::Flush)
            .map(|r| r.seq);
        if let Some(base) = new.first().map(|r| r.start) {
            let starts: Vec<usize> = new.iter().map(|r| r.start - base).collect();
            match j.append_encoded(&raw, base, &starts) {
                Ok(_) => {}
                Err(JournalError::Full { bytes, max }) => {
                    self.refuse_followers();
                    return Err(ReplicaError::Refused(
                        ErrorCode::Busy,
                        format!(
                            "the DR redo log is full ({bytes} of {max} bytes) while the replica catches up; retry"
                        ),
                    ));
                }
                Err(e) => {
                    self.refuse_followers();
                    // A record torn by the failure was cut off; if even
                    // that failed, go back to what an fsync made durable.
                    if j.failure().is_some()
                        && let Err(r) = j.rewind_to_synced()
                    {
                        tracing::error!(volume = %self.name, error = %r, "cannot rewind the redo log");
                    }
                    return Err(jerr(e));
                }
            }
        }
        if side.fsync
            && let Err(e) = j.sync()
        {
            // A failed fsync may have lost the batch whatever a later one
            // says: cut back to what was durable, so that the sender's
            // retry writes the records again (and syncs them) before
            // anything is acknowledged.
            tracing::error!(volume = %self.name, error = %e, "the redo log could not be made durable; the batch is refused and taken again on retry");
            self.refuse_followers();
            if let Err(r) = j.rewind_to_synced() {
                tracing::error!(volume = %self.name, error = %r, "cannot rewind the redo log");
            }
            return Err(jerr(e));
        }
        let upto = j.next_seq() - 1;
        self.last_received.store(
            crate::util::now_unix(),
            std::sync::atomic::Ordering::Relaxed,
        );
        // Under the journal lock: once `close_intake` has the lock, every
        // appended batch is known to the machine.
        // Past half the redo log, a point (which trims it) is due at once
        // rather than at the next interval: at a high write rate the log
        // would fill before the interval ends.
        let mark = self.redo_mark.load(std::sync::atomic::Ordering::Relaxed);
        let pressed = j.bytes() > j.bytes_max() / 2 && j.bytes() > mark + j.bytes_max() / 4;
        {
            let mut m = lock(&self.machine);
            m.received(upto, flush);
            m.set_pressed(pressed);
        }
        self.arrived.notify_all();
        drop(j);
        if flush.is_some() || pressed {
            self.wake.notify_one();
        }
        Ok(Response::Durable {
            upto,
            point: *lock(&self.last_point),
        })
    }

    /// `ferry points NAME --create`: a point at the next flush boundary
    /// (blocking: waits for the apply job).
    pub fn create_point(&self, side: &ReplicaSide) -> Result<Response, ReplicaError> {
        let ticket = lock(&self.machine).want_point();
        self.wake.notify_one();
        let deadline = Instant::now() + POINT_WAIT;
        let mut m = lock(&self.machine);
        let errors_before = m.view().errors;
        while m.points_made() < ticket {
            if m.view().errors > errors_before
                && let Some(e) = m.last_error()
            {
                return Err(refused(e.to_string()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(refused("no point within 60s; see the DR site's log"));
            }
            m = self
                .cond
                .wait_timeout(m, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        drop(m);
        state::list_points(&*side.store, &self.name)?
            .pop()
            .map(Response::Point)
            .ok_or_else(|| refused("the point was not recorded"))
    }

    /// A resync opens at `from_seq` of journal `incarnation` (blocking):
    /// `committed` is brought level with the image (a point when the image
    /// is consistent), the redo log restarts at `from_seq`, and the records
    /// that arrive wait for the resync's commit.
    pub fn resync_begin(
        &self,
        side: &ReplicaSide,
        h: &VolumeHandle,
        from_seq: u64,
        incarnation: u64,
    ) -> Result<(), ReplicaError> {
        if from_seq == 0 {
            return Err(ReplicaError::Refused(
                ErrorCode::Malformed,
                "a resync starts at record 1 or later".into(),
            ));
        }
        let _io = lock(&h.io);
        let _gc = side.gc_lock.read().unwrap_or_else(|p| p.into_inner());
        let rec = h.record();
        if rec.applying.is_some() {
            return Err(refused("a commit is being applied; begin again"));
        }
        if rec.stream.resync_from.is_none() && rec.committed.is_some() {
            // Every complete flush epoch in the redo log first (the log is
            // reset below): after a host restart or a failed fsync the
            // image holds an unknown mix of the records since the last
            // point until they are written again, and the rebase below
            // rehashes and fsyncs what they touched.
            self.apply_complete_locked(side, h)?;
            // A point when something was applied since the last one and the
            // image is a flush state: the freshest state to fall back on
            // while the resync runs.
            let with_point = state::consistent(&h.record());
            self.rebase(side, h, "before resync", with_point, false)?;
        }
        let before = from_seq - 1;
        h.update(true, |r| {
            r.stream.resync_from = Some(from_seq);
            r.stream.source = incarnation;
            r.stream.base_seq = before;
            r.stream.applied_seq = before;
            r.stream.applied_checksum = 0;
            r.stream.inconsistent_until = None;
        })?;
        *lock(&self.touched) = Touched::empty_at(before);
        {
            let mut j = lock(&self.journal);
            self.refuse_followers();
            j.reset(from_seq).map_err(jerr)?;
            self.redo_mark
                .store(0, std::sync::atomic::Ordering::Relaxed);
        }
        lock(&self.machine).resync_opened(from_seq);
        tracing::info!(volume = %rec.name, from_seq, "resync opened; records wait for its commit");
        Ok(())
    }

    /// The resync's tree is in the image (its commit landed): records from
    /// its start apply on top; consistent once they pass `until`.
    pub fn resync_committed(&self, until: u64) {
        lock(&self.machine).resync_committed(until);
        self.wake.notify_one();
    }

    /// Writes the complete flush epochs received into the image and records
    /// how far it got (the next point fsyncs it; see the module's doc).
    fn apply(
        &self,
        side: &ReplicaSide,
        h: &VolumeHandle,
        upto: u64,
        generation: u64,
    ) -> Result<(), ReplicaError> {
        let _io = lock(&h.io);
        let _gc = side.gc_lock.read().unwrap_or_else(|p| p.into_inner());
        self.apply_locked(side, h, upto, generation)
    }

    /// [`ReplicaStream::apply`] with the volume's io lock and the
    /// collection lock held by the caller.
    fn apply_locked(
        &self,
        side: &ReplicaSide,
        h: &VolumeHandle,
        upto: u64,
        generation: u64,
    ) -> Result<(), ReplicaError> {
        let rec = h.record();
        if lock(&self.machine).generation() != generation
            || rec.stream.resync_from.is_some()
            || rec.applying.is_some()
        {
            // A resync opened since the command was polled: nothing is
            // applied before its commit (the machine knows, and holds).
            return Ok(());
        }
        let mut last_checksum = None;
        let became = rec.stream.inconsistent_until.is_some_and(|u| upto >= u);
        if upto > rec.stream.applied_seq {
            let f = image::open_replica(&rec.path)?;
            let view = lock(&self.journal).view();
            // Gathered on from where the last apply ended, else not at all
            // (given up until the next point, which reads the log).
            let mut touched = std::mem::replace(&mut *lock(&self.touched), Touched::unknown());
            let gather = touched.upto == rec.stream.applied_seq;
            for_each_record(&view, rec.stream.applied_seq, upto, |r| {
                if r.seq == upto {
                    last_checksum = Some(r.checksum);
                }
                if gather {
                    touched_chunks(r, rec.chunk_size, &mut touched.chunks);
                }
                write_record(&f, &rec, r)
            })?;
            if gather {
                touched.upto = upto;
                *lock(&self.touched) = touched;
            }
            // The next point fsyncs the image (the redo log holds these
            // records until then); the record saying it is consistent
            // again is durable, so the image is too, first.
            if side.fsync && became {
                self.sync_image(h, &f, &rec.path)?;
            }
            lock(&self.journal).forget_kept(upto);
        }
        // A lost applied_seq only means records are written again: durable
        // only when consistency changes.
        h.update(became, |r| {
            if let Some(sum) = last_checksum
                && upto > r.stream.applied_seq
            {
                r.stream.applied_checksum = sum;
            }
            r.stream.applied_seq = r.stream.applied_seq.max(upto);
            if r.stream
                .inconsistent_until
                .is_some_and(|u| r.stream.applied_seq >= u)
            {
                r.stream.inconsistent_until = None;
            }
        })?;
        if lock(&self.machine).applied(upto) {
            tracing::info!(volume = %self.name, seq = upto, "replica consistent again after the resync");
        }
        Ok(())
    }

    /// Unix seconds records last arrived: since this daemon started, else
    /// the redo log's last change on disk (0: unknown).
    pub fn last_received(&self) -> u64 {
        match self
            .last_received
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => lock(&self.journal).modified_unix().unwrap_or(0),
            t => t,
        }
    }

    /// A promotion begins: no more records are appended (or acknowledged).
    pub fn close_intake(&self) {
        let _j = lock(&self.journal);
        self.intake_closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The promotion was refused part way: records are taken again.
    pub fn reopen_intake(&self) {
        self.intake_closed
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// A forced failover, with the apply job stopped: applies every complete
    /// flush epoch durable in the redo log (in sync mode those flushes were
    /// acknowledged) and returns how far the image got (blocking).
    pub fn apply_durable(&self, side: &ReplicaSide, h: &VolumeHandle) -> Result<u64, ReplicaError> {
        let _io = lock(&h.io);
        let _gc = side.gc_lock.read().unwrap_or_else(|p| p.into_inner());
        if let Some(upto) = self.apply_complete_locked(side, h)? {
            tracing::info!(volume = %self.name, seq = upto, "redo log applied up to its last complete flush before the promotion");
        }
        Ok(h.record().stream.applied_seq)
    }

    /// Applies every complete flush epoch in the redo log not applied yet
    /// (none while a resync holds them), with the volume's io lock and the
    /// collection lock held by the caller; says up to where, if it did.
    fn apply_complete_locked(
        &self,
        side: &ReplicaSide,
        h: &VolumeHandle,
    ) -> Result<Option<u64>, ReplicaError> {
        let (upto, held, generation) = {
            let m = lock(&self.machine);
            (m.last_flush(), m.view().held, m.generation())
        };
        if held || upto <= h.record().stream.applied_seq {
            return Ok(None);
        }
        self.apply_locked(side, h, upto, generation)?;
        Ok(Some(upto))
    }

    /// The promotion point: `committed` brought level with the consistent
    /// image and recorded as a pinned point (blocking).
    pub fn promotion_point(
        &self,
        side: &ReplicaSide,
        h: &VolumeHandle,
    ) -> Result<RecoveryPoint, ReplicaError> {
        let _io = lock(&h.io);
        let _gc = side.gc_lock.read().unwrap_or_else(|p| p.into_inner());
        if !state::consistent(&h.record()) {
            return Err(refused("the replica image is not a consistent state"));
        }
        self.rebase(side, h, PROMOTION, true, true)?.ok_or_else(|| {
            refused("the replica has no committed tree to take the promotion point of")
        })
    }

    /// Brings `committed` level with the image: the chunks the records
    /// `(base_seq, applied_seq]` touched are rehashed and stored, the tree
    /// patched; with `with_point`, recorded as a recovery point `source`.
    /// Returns the point (blocking; the caller holds the volume's io lock).
    fn rebase(
        &self,
        side: &ReplicaSide,
        h: &VolumeHandle,
        source: &str,
        with_point: bool,
        force: bool,
    ) -> Result<Option<RecoveryPoint>, ReplicaError> {
        let rec = h.record();
        let Some(base) = rec.committed else {
            return Ok(None);
        };
        let applied = rec.stream.applied_seq;
        if applied <= rec.stream.base_seq && !force {
            return Ok(None);
        }
        // The chunks the applier saw the records touch, else read from the log.
        let gathered = std::mem::replace(&mut *lock(&self.touched), Touched::unknown());
        let mut dirty = BTreeSet::new();
        if gathered.after == rec.stream.base_seq && gathered.upto == applied {
            dirty = gathered.chunks;
        } else if applied > rec.stream.base_seq {
            let view = lock(&self.journal).view();
            for_each_record(&view, rec.stream.base_seq, applied, |r| {
                touched_chunks(r, rec.chunk_size, &mut dirty);
                Ok(())
            })?;
        }
        let nodes = StoreNodes(&*side.store);
        let mut leaves = Vec::with_capacity(tree::chunk_count(rec.size, rec.chunk_size) as usize);
        tree::for_each_leaf(&nodes, &base, &mut |_, h| {
            leaves.push(h);
            Ok(())
        })?;
        let f = image::open_replica(&rec.path)?;
        for (i, hash) in store_dirty_chunks(side, &rec, &f, &dirty, &leaves)? {
            if let Some(l) = leaves.get_mut(i as usize) {
                *l = hash;
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
                ops.push(Op::PutNode(tree::Node::hash_encoded(&bytes), bytes));
            }
        }
        ops.push(Op::PutNode(t.root, t.root_node().encode()));
        // The redo log drops the records up to `applied` below: the image
        // must hold their writes durably first (applies do not fsync).
        if side.fsync {
            self.sync_image(h, &f, &rec.path)?;
        }
        let mut next = rec.clone();
        next.committed = Some(t.root);
        next.stream.base_seq = applied;
        let mut point = None;
        let mut dropped = Vec::new();
        if with_point {
            let points = state::list_points(&*side.store, &rec.name)?;
            let p = RecoveryPoint {
                id: points.last().map(|p| p.id + 1).unwrap_or(1),
                volume: rec.name.clone(),
                root: t.root,
                created: crate::util::trusted_now_unix(),
                size: rec.size,
                source: source.into(),
                seq: Some(applied),
                pinned: (source == PROMOTION).then(|| PROMOTION.to_string()),
            };
            next.totals.passes += 1;
            let mut all = points;
            all.push(p.clone());
            dropped = side.prune(&all, p.created);
            ops.push(state::put_point_op(&p));
            ops.extend(
                dropped
                    .iter()
                    .map(|id| Op::DeleteMeta(state::point_key(&rec.name, *id))),
            );
            point = Some(p);
        }
        h.apply_with(ops, next, true)?;
        *lock(&self.touched) = Touched::empty_at(applied);
        let old_segments = {
            let mut j = lock(&self.journal);
            j.trim(applied).map_err(jerr)?;
            self.redo_mark
                .store(j.bytes(), std::sync::atomic::Ordering::Relaxed);
            j.take_dropped()
        };
        // Deleted past the lock, which the records arriving need.
        drop(old_segments);
        if let Some(p) = &point {
            tracing::info!(volume = %rec.name, point = p.id, seq = applied, chunks = dirty.len(), source, "recovery point");
            *lock(&self.last_point) = Some((p.id, p.created));
        }
        if !dropped.is_empty() {
            side.gc_due();
        }
        Ok(point)
    }

    /// Takes a point of the image as it is now (a flush boundary); `None`
    /// when a resync opened since the command was polled (no point then).
    fn point(
        &self,
        side: &ReplicaSide,
        h: &VolumeHandle,
        source: PointSource,
        generation: u64,
    ) -> Result<Option<u64>, ReplicaError> {
        let seq = {
            let _io = lock(&h.io);
            let _gc = side.gc_lock.read().unwrap_or_else(|p| p.into_inner());
            let rec = h.record();
            if lock(&self.machine).generation() != generation || !state::consistent(&rec) {
                return Ok(None);
            }
            let force = source != PointSource::Scheduled;
            self.rebase(side, h, source.label(), true, force)?;
            h.record().stream.applied_seq
        };
        side.collect_garbage_if_due();
        Ok(Some(seq))
    }

    /// Rewrites the listed chunks of the image as it should hold them now:
    /// the committed tree's chunk (verified on read) with the redo records
    /// applied since written over it (blocking).
    pub fn repair(
        &self,
        side: &ReplicaSide,
        h: &VolumeHandle,
        indices: &[u64],
    ) -> Result<u64, ReplicaError> {
        let _io = lock(&h.io);
        let _gc = side.gc_lock.read().unwrap_or_else(|p| p.into_inner());
        let rec = h.record();
        if !state::consistent(&rec) {
            return Err(refused(format!(
                "volume {} is being resynced: its image is not yet a state to repair from. Wait until `ferry status {0}` at the DR site shows it consistent, then verify again (the resync itself rewrites every chunk that differs)",
                rec.name
            )));
        }
        let view = lock(&self.journal).view();
        repair_chunks(side, &rec, indices, |touched_by| {
            for_each_record(
                &view,
                rec.stream.base_seq,
                rec.stream.applied_seq,
                touched_by,
            )
        })
    }

    /// fsyncs the replica image (the caller holds the volume's io lock). A
    /// failure is shown (`image_sync_failed`) and rewinds the applier: the
    /// kernel may have dropped the writes since the last point (it marks
    /// the pages clean), so a retry that only fsynced again would trust
    /// them; every record since the last point is written again first, the
    /// image inconsistent until then (durably: a restart must not skip it).
    fn sync_image(
        &self,
        h: &VolumeHandle,
        f: &std::fs::File,
        path: &std::path::Path,
    ) -> Result<(), ReplicaError> {
        let Err(e) = image::sync(f, path) else {
            return Ok(());
        };
        h.image_sync_failed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let (base, until) = lock(&self.machine).rewind();
        *lock(&self.touched) = Touched::unknown();
        if let Err(u) = h.update(true, |r| {
            r.stream.applied_seq = base;
            r.stream.applied_checksum = 0;
            r.stream.inconsistent_until = until;
        }) {
            tracing::error!(volume = %self.name, error = %u, "cannot record that the replica image's writes since its last point are written again");
        }
        tracing::error!(volume = %self.name, error = %e, from = base + 1, "an fsync of the replica image failed: the records since its last point are written again before the next one, and it is inconsistent until then");
        Err(e.into())
    }

    fn note_failure(&self, e: &str) {
        lock(&self.machine).failed(e.to_string(), Instant::now());
        self.cond.notify_all();
    }
}

/// Rebuilds `indices` from the committed tree, then lets `replay` pass the
/// records to write over them (none for a snapshot replica), and writes the
/// result into the image; fsyncs. Returns the chunks written.
pub(super) fn repair_chunks(
    side: &ReplicaSide,
    rec: &VolumeRecord,
    indices: &[u64],
    replay: impl Fn(&mut dyn FnMut(&RecordRef) -> Result<(), ReplicaError>) -> Result<(), ReplicaError>,
) -> Result<u64, ReplicaError> {
    let Some(root) = rec.committed else {
        return Err(refused(format!(
            "volume {} has no committed state to repair from yet",
            rec.name
        )));
    };
    let nodes = StoreNodes(&*side.store);
    let (size, chunk_size, _, _) = tree::root_shape(&nodes, &root)?;
    let f = image::open_replica(&rec.path)?;
    image::set_len(&f, &rec.path, size)?;
    let mut n = 0;
    let per = (REPAIR_BATCH_BYTES / chunk_size as u64).max(1) as usize;
    for batch in indices.chunks(per) {
        let mut bufs: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for &index in batch {
            let Some(leaf) = tree::leaf_at(&nodes, &root, index)? else {
                continue;
            };
            let (start, end) = chunk_range(size, chunk_size, index);
            let data = if leaf.is_zero() {
                vec![0u8; (end - start) as usize]
            } else {
                let d = side
                    .store
                    .get_chunk(&leaf)?
                    .ok_or_else(|| StoreError::Read(format!("chunk {} vanished", leaf.short())))?;
                if d.len() as u64 != end - start {
                    return Err(StoreError::Read(format!(
                        "chunk {} has {} bytes where {} fit",
                        leaf.short(),
                        d.len(),
                        end - start
                    ))
                    .into());
                }
                d
            };
            bufs.insert(start, data);
        }
        // The records since the tree, written over the chunks they touch.
        replay(&mut |r: &RecordRef| {
            if r.kind == Kind::Flush || r.len == 0 {
                return Ok(());
            }
            let (a, b) = (r.offset, r.offset + r.len as u64);
            for (&start, buf) in bufs.range_mut(a.saturating_sub(chunk_size as u64 - 1)..b) {
                let end = start + buf.len() as u64;
                let (lo, hi) = (a.max(start), b.min(end));
                if lo >= hi {
                    continue;
                }
                let dst = &mut buf[(lo - start) as usize..(hi - start) as usize];
                match r.kind {
                    Kind::Write => {
                        dst.copy_from_slice(&r.data[(lo - a) as usize..(hi - a) as usize])
                    }
                    _ => dst.fill(0),
                }
            }
            Ok(())
        })?;
        for (start, buf) in &bufs {
            image::write_at(&f, &rec.path, *start, buf)?;
            n += 1;
        }
    }
    if side.fsync {
        image::sync(&f, &rec.path)?;
    }
    tracing::warn!(volume = %rec.name, chunks = n, "replica image repaired");
    Ok(n)
}

/// At the replica stream's open: in another boot of the host than the one
/// the image was last written under, its writes since the last point (which
/// fsynced it) may be lost, in any mix. Every record since that point is
/// written again (the redo log holds them all durably), and the image counts
/// as inconsistent until the newest complete flush epoch is (the applied
/// position the record held may be older than what was written, so not
/// that). Durable, with the boot, before anything is applied.
fn after_restart(
    h: &VolumeHandle,
    rec: VolumeRecord,
    last_flush: u64,
) -> Result<VolumeRecord, ReplicaError> {
    let boot = crate::fsio::boot_id();
    if boot.is_empty() || rec.stream.boot_id == boot {
        return Ok(rec);
    }
    let rebooted = !rec.stream.boot_id.is_empty()
        && rec.stream.resync_from.is_none()
        && rec.applying.is_none()
        && last_flush > rec.stream.base_seq;
    let rec = h.update(true, |r| {
        r.stream.boot_id = boot.clone();
        if rebooted {
            r.stream.applied_seq = r.stream.base_seq;
            r.stream.applied_checksum = 0;
            r.stream.inconsistent_until =
                Some(r.stream.inconsistent_until.unwrap_or(0).max(last_flush));
        }
        r.clone()
    })?;
    if rebooted {
        tracing::warn!(volume = %rec.name, from = rec.stream.base_seq + 1, upto = last_flush, "the host restarted since the replica image was last written: the records since its last point are written again, and it is inconsistent until then");
    }
    Ok(rec)
}

/// Writes one redo record into the replica image.
fn write_record(f: &std::fs::File, rec: &VolumeRecord, r: &RecordRef) -> Result<(), ReplicaError> {
    match r.kind {
        Kind::Write => image::write_at(f, &rec.path, r.offset, r.data)?,
        Kind::Zero | Kind::Trim => {
            image::write_zeros(f, &rec.path, r.offset, r.len as u64)?;
        }
        Kind::Flush => {}
    }
    Ok(())
}

/// Threads a rebase reads, hashes and stores dirty chunks on, and the
/// fewest chunks one of them takes.
const REBASE_THREADS_MAX: usize = 4;
const REBASE_PART_MIN: usize = 64;

/// Reads each dirty chunk of the replica image, names it and stores it
/// (as the blocks that differ from its committed leaf, found by comparing
/// with it: the committed leaves are collection roots, and the caller
/// holds the gc lock); returns the new leaves. Several chunks at a time:
/// reading a committed leaf is a read of the store's disk, one at a time
/// it made the promotion point of a planned switchover most of its
/// downtime. A chunk named twice is stored once.
fn store_dirty_chunks(
    side: &ReplicaSide,
    rec: &VolumeRecord,
    f: &std::fs::File,
    dirty: &BTreeSet<u64>,
    leaves: &[Hash],
) -> Result<Vec<(u64, Hash)>, ReplicaError> {
    let dirty: Vec<u64> = dirty.iter().copied().collect();
    let claimed = Mutex::new(std::collections::HashSet::new());
    let one = |i: u64| -> Result<(u64, Hash), ReplicaError> {
        let (start, end) = chunk_range(rec.size, rec.chunk_size, i);
        let mut buf = vec![0u8; (end - start) as usize];
        std::os::unix::fs::FileExt::read_exact_at(f, &mut buf, start)
            .map_err(|e| StoreError::Read(format!("replica image: {e}")))?;
        if buf.iter().all(|b| *b == 0) {
            return Ok((i, Hash::ZERO));
        }
        let hash = Hash::of_chunk(&buf);
        if lock(&claimed).insert(hash) {
            let old = leaves.get(i as usize).copied().unwrap_or(Hash::ZERO);
            side.store.put_chunk_over(&hash, &buf, &old)?;
        }
        Ok((i, hash))
    };
    let per = dirty
        .len()
        .div_ceil(REBASE_THREADS_MAX)
        .max(REBASE_PART_MIN);
    let results: Vec<Result<Vec<(u64, Hash)>, ReplicaError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = dirty
            .chunks(per)
            .map(|part| {
                let one = &one;
                scope.spawn(move || part.iter().map(|&i| one(i)).collect())
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(
                        StoreError::Write("a thread storing a point's chunks panicked".into())
                            .into(),
                    )
                })
            })
            .collect()
    });
    let mut out = Vec::with_capacity(dirty.len());
    for r in results {
        out.extend(r?);
    }
    Ok(out)
}

/// Starts the apply job of a continuous replica (opening its redo log
/// first), unless it runs already.
pub fn spawn(side: &Arc<ReplicaSide>, h: &Arc<VolumeHandle>) {
    let (side, h2) = (side.clone(), h.clone());
    h.jobs.spawn_once("apply", || {
        Job::spawn("apply", &h.name, side.job_metrics.clone(), move |ctx| {
            run(side.clone(), h2.clone(), ctx)
        })
    });
}

/// The replica's stream part, opened on first use (blocking).
pub fn ensure(side: &ReplicaSide, h: &VolumeHandle) -> Result<Arc<ReplicaStream>, ReplicaError> {
    h.replica_stream_or(|| ReplicaStream::open(side, h))?
        .ok_or_else(|| {
            ReplicaError::Refused(
                ErrorCode::NotReplica,
                format!("volume {} is primary at this site", h.name),
            )
        })
}

/// The apply job: carries out the apply machine's commands on the site's
/// bounded pool of blocking threads, one at a time per volume, and waits on
/// events (records, point requests, a resync's commit) or on the machine's
/// own timer (the next scheduled point, a retry) in between.
async fn run(side: Arc<ReplicaSide>, h: Arc<VolumeHandle>, mut ctx: JobCtx) -> Result<(), String> {
    let rs = {
        let (s, h2) = (side.clone(), h.clone());
        tokio::task::spawn_blocking(move || ensure(&s, &h2))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
    };
    loop {
        let (cmd, generation) = {
            let mut m = lock(&rs.machine);
            (m.poll(Instant::now()), m.generation())
        };
        let Some(cmd) = cmd else {
            let t = lock(&rs.machine).poll_timeout();
            tokio::select! {
                _ = rs.wake.notified() => {}
                _ = sleep_until(t) => {}
                _ = ctx.stopped() => return Ok(()),
            }
            continue;
        };
        let permit = side
            .pool
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (s, h2, rs2) = (side.clone(), h.clone(), rs.clone());
        let r = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            match cmd {
                ApplyCommand::Apply { upto } => rs2.apply(&s, &h2, upto, generation),
                ApplyCommand::Point { source } => {
                    if let Some(seq) = rs2.point(&s, &h2, source, generation)? {
                        lock(&rs2.machine).point_taken(seq, Instant::now());
                        rs2.cond.notify_all();
                    }
                    Ok(())
                }
            }
        })
        .await;
        let err = match r {
            Ok(Ok(())) => {
                lock(&rs.machine).finished();
                ctx.healthy();
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(j) => format!("the {cmd:?} step panicked: {j}"),
        };
        // Shown in status and counted; the machine backs off and retries.
        ctx.error(&format!("{cmd:?}: {err}"));
        rs.note_failure(&err);
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
