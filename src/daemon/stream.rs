//! Continuous replication at the primary (async and sync volumes): the
//! journaled NBD export, and the state the streamer shares with it.
//!
//! Write path: past the volume's write gate, under one lock, each write is
//! appended to the journal first and then written to the image, so the
//! journal order is the image's order and every image write has its record
//! (a restart replays the journal onto the image, which makes a write torn
//! by a crash whole again). FLUSH appends a Flush record and fsyncs the
//! journal: while the journal holds every write since the image's last
//! fsync (it journals and no resync is due), that makes them durable, since
//! a restart replays them; the image is fsynced as a checkpoint, every 30 s
//! or when the records it holds back take a quarter of the journal,
//! before the journal drops records (a fallback, a resync, a removal, a
//! demotion), and by a flush while a resync is due or after a failed fsync.
//! In sync mode the flush then waits until the DR site has every record up
//! to it durably: the stream session decides when it is done, fails or
//! degrades.
//!
//! When the journal fills, or the link stays down too long, the journal's
//! records are dropped (its numbering goes on) and the volume is marked for
//! a resync (durably): the streamer brings the DR copy level by a tree
//! comparison of the live image while it streams the journal from the
//! resync's start, so that flushes keep completing during a seed or resync.
//! The resync's scan reads only the chunks written since the last scan
//! began (`volume::dirty`).

use std::io;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::gate::Gate;
use super::volume::{VolumeHandle, gate_error};
use crate::nbd::{Export, FileExport};
use crate::proto::messages::{FuzzyCommit, STREAM_RECORD_DATA_MAX};
use crate::proto::stream::{
    FlushTarget, FlushVerdict, OpenVerdict, SessionView, StreamConfig, StreamSession,
};
use crate::store::state::{Mode, StreamRecord, VolumeRecord};
use crate::volume::dirty::{self, DirtyMap};
use crate::volume::image::{self, ImageError, ScanStats};
use crate::volume::journal::{Journal, JournalError, JournalView, Kind, Record};

/// Default wait of a sync volume's flush for the DR site.
pub const SYNC_WAIT_DEFAULT: Duration = Duration::from_secs(10);

pub struct VolumeStream {
    pub name: String,
    image: FileExport,
    fsync: bool,
    mode: Mode,
    gate: Arc<Gate>,
    handle: Weak<VolumeHandle>,
    /// The volume's epoch: every journal record carries it.
    epoch: Arc<std::sync::atomic::AtomicU64>,
    inner: Mutex<Inner>,
    acked_cond: Condvar,
    /// Wakes the streamer: records were appended, or a resync was asked for.
    pub wake: tokio::sync::Notify,
    flush_seconds: prometheus::Histogram,
    /// Flush records the primary added itself (see [`checkpoint_bytes`]).
    checkpoints: prometheus::IntCounter,
    /// The image's checkpoint running beside the stream, if one was started.
    checkpointing: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The names the last scan gave every chunk (see `volume::dirty`).
    leaves_path: std::path::PathBuf,
    /// The map of chunks written since that scan, kept by a clean stop.
    map_path: std::path::PathBuf,
    /// The volume's chunk size (what its scans count in).
    chunk_size: u32,
    /// One scan at a time: a pass whose future was dropped (a superseded
    /// resync) may still be scanning when the next one starts, and the
    /// next must start from the map and names that one leaves.
    scanning: Mutex<()>,
}

struct Inner {
    journal: Journal,
    session: StreamSession,
    /// The DR side's newest recovery point (id, Unix seconds), as it last said.
    dr_point: Option<(u64, u64)>,
    /// The last record whose image write an fsync of the image covered:
    /// the journal keeps every record after it (even once the DR site has
    /// it), so that a restart replays them and the writes a failed fsync
    /// covered can be written again.
    image_synced: u64,
    /// When the image was last fsynced (for the checkpoint's interval).
    image_synced_at: Instant,
    /// The writes a failed fsync covered are gone from the journal (found
    /// at the start): only `ferry volume clear-error` ends the failure.
    lost: bool,
    /// Write bytes journaled since the last flush record: past
    /// [`checkpoint_bytes`] a write is followed by a flush record of the
    /// primary's own, so that the DR side can apply (it applies whole flush
    /// epochs) and trim its redo log while a client writes without flushing.
    unflushed: u64,
    /// The chunks written since the last scan began, and the token of the
    /// names that scan saved: a resync reads only those chunks. `None`
    /// until a scan begins in this run of the daemon, after a scan or a
    /// save of its names that failed, while and after the image's fsync
    /// failed, and when the operator asked for a full one.
    dirty: Option<(DirtyMap, u64)>,
    /// The daemon is stopping and kept the map (`park`): every write fails.
    parked: bool,
    /// A resync asked for while one ran (`ferry sync`), and why: it follows
    /// when the running one commits (one that does not runs again anyway).
    resync_again: Option<String>,
}

/// At most this long between a write and the image fsync (checkpoint) that
/// lets the journal drop its record, while the DR site keeps up: it bounds
/// what a restart replays and what the journal holds for the image. Linux
/// writes a dirty page back by itself after 30 s (`dirty_expire_centisecs`),
/// so by then the fsync finds little left to write; a shorter interval made
/// the primary write the image back itself (measured: 15-20 % fewer 4 KiB
/// writes without flushes, docs/benchmarks.md).
const IMAGE_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(30);

/// Releases the volume's lock after a trim, then deletes the segments it
/// dropped: deleting one took 25 ms, with every write of the volume waiting.
fn unlock(mut g: MutexGuard<'_, Inner>) {
    let dropped = g.journal.take_dropped();
    drop(g);
    drop(dropped);
}

/// The newest journal records kept in memory for the stream (it reads
/// them from there while it keeps up, instead of from the segment).
const JOURNAL_TAIL_BYTES: usize = 16 << 20;

/// Unflushed write bytes after which the journal gets a flush record of
/// its own: an eighth of the journal, at most 4 MiB. The DR side's state
/// at it is a prefix of the write order (invariant 2); no fsync is implied
/// at the primary, which needs none for it. At most a quarter of what the
/// DR side keeps in memory of the records it has not applied
/// (`REDO_KEPT_BYTES`), so that it applies a client's writes that never
/// flush from there: at 64 MiB it read each epoch back from its redo log
/// and checked it again, a quarter of its CPU under 4 KiB writes. The
/// record follows the write that crosses it, so an epoch may end up to
/// one write (32 MiB at most) past it.
fn checkpoint_bytes(journal_bytes_max: u64) -> u64 {
    (journal_bytes_max / 8).clamp(1, CHECKPOINT_BYTES_MAX)
}

const CHECKPOINT_BYTES_MAX: u64 = 4 << 20;

/// Whether the image is due a checkpoint ([`VolumeStream::checkpoint_image`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpoint {
    No,
    /// The oldest record the DR site has waited [`IMAGE_CHECKPOINT_INTERVAL`].
    Due,
    /// Those records take a quarter of the journal.
    Pressed,
}

/// What status and metrics show of a continuous volume at the primary.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct StreamView {
    pub journal_bytes: u64,
    pub journal_bytes_max: u64,
    pub next_seq: u64,
    pub acked_seq: u64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub degraded: bool,
    pub resync_needed: bool,
    /// A resync (or the seed) is running now.
    #[serde(default)]
    pub resync_running: bool,
    pub resync_reason: String,
    /// Sync volumes: every acknowledged flush is durable at the DR site. Not
    /// in force while a seed or resync runs, or while degraded.
    #[serde(default)]
    pub rpo_zero: bool,
    /// The DR side's newest recovery point: id and Unix seconds.
    pub dr_point: Option<(u64, u64)>,
    /// Why flushes fail here since an fsync of the image failed (until the
    /// writes it covered are written again).
    #[serde(default)]
    pub io_error: Option<String>,
    /// The chunks the next resync's scan reads (those written since the
    /// last scan), of `chunks`; `None`: it reads the whole image (no map:
    /// no scan yet in this run, a crash, a failed fsync, `ferry sync`).
    #[serde(default)]
    pub resync_scan_chunks: Option<u64>,
    /// The volume's chunks.
    #[serde(default)]
    pub chunks: u64,
}

/// A journal error for the NBD client: ENOSPC stays ENOSPC.
fn jerr(e: JournalError) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::other(e.to_string()),
    }
}

/// Where the replay of a journal whose first record is `first` starts when
/// it opens: while a resync is pending, at the first record journaled since
/// that resync began (see `StreamRecord::replay_from`); `None`: nowhere.
pub fn replay_start(rec: &StreamRecord, first: u64) -> Option<u64> {
    if !rec.resync_needed {
        return Some(first);
    }
    rec.replay_from.map(|from| from.max(first))
}

impl VolumeStream {
    /// Opens the volume's journal in `journal_dir`, replays it onto the image
    /// and decides whether a resync must come first (blocking).
    pub fn open(
        handle: &Arc<VolumeHandle>,
        journal_dir: &Path,
        journal_bytes_max: u64,
        fsync: bool,
        link_down_max: Duration,
        flush_seconds: prometheus::Histogram,
        checkpoints: prometheus::IntCounter,
    ) -> Result<Arc<VolumeStream>, String> {
        let rec = handle.record();
        let ctx = |e: &dyn std::fmt::Display| format!("volume {}: {e}", rec.name);
        // The image as the daemon finds it, before it touches it (the
        // opening probes whether it can punch holes).
        let stamp = dirty::ImageStamp::of(&rec.path);
        let image = FileExport::open(&rec.path, fsync).map_err(|e| ctx(&e))?;
        let leaves_path = journal_dir.join(SCAN_LEAVES_FILE);
        let map_path = journal_dir.join(SCAN_MAP_FILE);
        let (mut journal, recovered) =
            Journal::open(journal_dir, journal_bytes_max).map_err(|e| ctx(&e))?;
        journal.keep_tail(JOURNAL_TAIL_BYTES);
        let boot = crate::fsio::boot_id();
        // The map a clean stop kept, if the image and journal are as it
        // left them; otherwise the last scan's names go too: no map says
        // what changed since.
        let mut kept = if recovered.cut_bytes > 0 || rec.stream.image_io_error.is_some() {
            dirty::remove_map(&map_path).map(|()| None)
        } else {
            take_kept_map(&rec, stamp, image.size(), &map_path, &journal, &boot)
        }
        .unwrap_or_else(|why| {
            tracing::warn!(volume = %rec.name, why, "the map of the chunks written since the last scan is not taken back: the next resync reads the whole image");
            None
        });
        // (The map file itself is gone: what a crash left half written.)
        dirty::remove_with_temps(&map_path);
        if kept.is_none() {
            dirty::remove_with_temps(&leaves_path);
        }
        let rebooted =
            !rec.stream.boot_id.is_empty() && rec.stream.boot_id != boot && !boot.is_empty();
        // Records cut in the same boot of the host are damage, not a torn
        // tail (a power loss restarts the host; the daemon's own crash
        // leaves whole appends in the page cache): the image, which that
        // page cache kept, holds every write, newer than the cut journal,
        // so replaying it would take back the writes after the cut; and
        // the DR side may lack them, so a resync brings it level. (After a
        // failed image fsync the replay is what repairs it: kept.)
        let damaged = recovered.cut_bytes > 0 && !rebooted && rec.stream.image_io_error.is_none();
        if damaged {
            tracing::error!(volume = %rec.name, cut_bytes = recovered.cut_bytes, "the journal was damaged: records were cut at the restart of the daemon; the image holds every write (this boot's page cache kept them), so the journal is not replayed, and the DR copy is brought level by a resync");
        } else if recovered.cut_bytes > 0 {
            tracing::warn!(volume = %rec.name, cut_bytes = recovered.cut_bytes, "journal had a torn tail; cut at the last whole record");
        }
        let mut journal = journal;
        // Make every journaled write present in the image, in order
        // (idempotent): a flush counted on the journal, not the image. While
        // a resync is pending, only the records journaled since it began:
        // writes between its fallback and its start were not journaled, and
        // replaying older records would take them back (the resync's scan
        // reads the image as it is).
        let start = replay_start(&rec.stream, journal.first_seq());
        let stale = start.is_none_or(|s| s >= journal.next_seq());
        if stale && journal.first_seq() < journal.next_seq() {
            let next = journal.next_seq();
            journal.reset(next).map_err(|e| ctx(&e))?;
            tracing::info!(volume = %rec.name, "a resync is pending and the journal's records predate it: they are dropped, not replayed");
        }
        // (Older records left by a reset that did not finish stay until the
        // resync's start resets the journal; no replay reads them.)
        let first = start.unwrap_or(0).max(journal.first_seq());
        let view = journal.view();
        let mut from = if damaged { journal.next_seq() } else { first };
        let mut replayed = 0u64;
        loop {
            let recs = view.read_from(from, 64 << 20).map_err(|e| ctx(&e))?;
            let Some(last) = recs.last().map(|r| r.seq) else {
                break;
            };
            for r in &recs {
                apply_record(&image, r).map_err(|e| ctx(&e))?;
                if let Some((map, _)) = &mut kept
                    && r.kind != Kind::Flush
                {
                    map.mark(r.offset, u64::from(r.len));
                }
            }
            replayed += recs.len() as u64;
            from = last + 1;
        }
        if replayed > 0 {
            image.flush().map_err(|e| ctx(&e))?;
            tracing::info!(volume = %rec.name, records = replayed, "journal replayed onto the image");
        }
        // An image fsync that failed before the restart: the replay above
        // wrote its writes again if the journal still holds them all.
        let mut io_error = rec.stream.image_io_error.clone();
        // The last record a good image fsync covered: the records after it
        // may be lost from the image.
        let mut image_synced = first - 1;
        let mut lost = false;
        if let Some((why, synced)) = &io_error {
            // (A journal that lost its records and began again holds none.)
            if !rec.stream.resync_needed
                && journal.first_seq() <= synced + 1
                && journal.next_seq() > *synced
            {
                tracing::info!(volume = %rec.name, "the writes an earlier failed fsync covered were written again from the journal; flushes work again");
                io_error = None;
            } else {
                tracing::error!(volume = %rec.name, error = %why, "an fsync of the image failed before the restart and the journal no longer holds what it covered: flushes fail until `ferry volume clear-error` (check the disk first)");
                image_synced = image_synced.min(*synced);
                lost = true;
                image.set_failure(format!(
                    "{why}; the journal no longer holds what it covered: check the disk, then `ferry volume clear-error {}`",
                    rec.name
                ));
            }
        }
        let next = journal.next_seq();
        let rec = handle
            .update(true, |r| {
                if rebooted {
                    r.stream.resync_needed = true;
                    r.stream.resync_reason = "the host restarted: writes that were never flushed may be lost from the journal".into();
                } else if damaged && !r.stream.resync_needed {
                    r.stream.resync_needed = true;
                    r.stream.resync_reason = format!(
                        "the journal was damaged ({} bytes of records cut at the restart): the DR copy may lack their writes",
                        recovered.cut_bytes
                    );
                }
                if r.stream.resync_needed {
                    // Replayed above: from here until the resync begins,
                    // writes are not journaled.
                    r.stream.replay_from = Some(next);
                }
                r.stream.boot_id = boot.clone();
                r.stream.image_io_error = io_error.clone();
                r.clone()
            })
            .map_err(|e| ctx(&e))?;
        let session = StreamSession::new(
            stream_config(&rec, link_down_max),
            journal.next_seq(),
            journal.first_seq() - 1,
            rec.stream
                .resync_needed
                .then(|| rec.stream.resync_reason.clone()),
        );
        Ok(Arc::new(VolumeStream {
            name: rec.name.clone(),
            image,
            fsync,
            mode: rec.mode,
            gate: handle.gate.clone(),
            handle: Arc::downgrade(handle),
            epoch: handle.epoch_cell(),
            inner: Mutex::new(Inner {
                image_synced,
                image_synced_at: Instant::now(),
                lost,
                journal,
                session,
                dr_point: None,
                unflushed: 0,
                dirty: kept,
                parked: false,
                resync_again: None,
            }),
            acked_cond: Condvar::new(),
            wake: tokio::sync::Notify::new(),
            flush_seconds,
            checkpoints,
            checkpointing: Mutex::new(None),
            leaves_path,
            map_path,
            chunk_size: rec.chunk_size,
            scanning: Mutex::new(()),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn view(&self) -> StreamView {
        let g = self.lock();
        let s: SessionView = g.session.view(Instant::now());
        StreamView {
            journal_bytes: g.journal.bytes(),
            journal_bytes_max: g.journal.bytes_max(),
            next_seq: s.next_seq,
            acked_seq: s.acked_seq,
            lag_bytes: s.lag_bytes,
            lag_seconds: s.lag_seconds,
            degraded: s.degraded,
            resync_needed: s.resync_needed,
            resync_running: s.resync_running,
            resync_reason: s.resync_reason,
            rpo_zero: s.rpo_zero,
            dr_point: g.dr_point,
            io_error: self.image.failure(),
            resync_scan_chunks: g.dirty.as_ref().map(|(m, _)| m.marked()),
            chunks: crate::store::tree::chunk_count(self.image.size(), self.chunk_size),
        }
    }

    pub fn set_dr_point(&self, p: Option<(u64, u64)>) {
        if p.is_some() {
            self.lock().dr_point = p;
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn resync_needed(&self) -> bool {
        self.lock().session.resync_needed()
    }

    pub fn incarnation(&self) -> u64 {
        self.lock().journal.incarnation()
    }

    /// The first record the journal still holds (a new primary's journal
    /// holds every record until its replica has them).
    pub fn first_seq(&self) -> u64 {
        self.lock().journal.first_seq()
    }

    /// Appends to the journal; a full journal makes the volume fall back to
    /// a resync instead of failing the write.
    fn log(&self, g: &mut Inner, kind: Kind, off: u64, len: u32, data: &[u8]) -> io::Result<()> {
        if g.parked {
            return Err(io::Error::other(format!(
                "volume {}: the daemon is stopping",
                self.name
            )));
        }
        // Marked before the image is written, under the same lock as the
        // write (whatever becomes of the record): see `volume::dirty`.
        if kind != Kind::Flush
            && let Some((map, _)) = &mut g.dirty
        {
            map.mark(off, u64::from(len));
        }
        if !g.session.journaling() {
            // A resync is pending: its scan will carry this write.
            g.unflushed = 0;
            return Ok(());
        }
        let epoch = crate::volume::journal::record_epoch(
            self.epoch.load(std::sync::atomic::Ordering::SeqCst),
        )
        .map_err(jerr)?;
        g.journal.set_epoch(epoch);
        match g.journal.append(kind, off, len, data) {
            Ok(seq) => {
                let bytes = (crate::volume::journal::HEADER_BYTES + data.len()) as u64;
                g.session.appended(seq, bytes, Instant::now());
                g.unflushed = match kind {
                    Kind::Flush => 0,
                    _ => g.unflushed + data.len() as u64,
                };
                Ok(())
            }
            Err(JournalError::Full { bytes, max }) => {
                let why = format!(
                    "the journal filled up ({bytes} of {max} bytes) before the DR site took it"
                );
                if self.fall_back(g, &why) {
                    Ok(())
                } else {
                    Err(io::Error::other(format!(
                        "{why}, and the image cannot be fsynced to let it drop records: the write is refused"
                    )))
                }
            }
            Err(e) => {
                tracing::error!(volume = %self.name, error = %e, "a journal append failed; the write fails");
                if let Some(why) = g.journal.failure() {
                    let why = format!("the journal failed ({why})");
                    self.fall_back(g, &why);
                }
                Err(jerr(e))
            }
        }
    }

    /// fsyncs the image; after a failed fsync, first writes again (from the
    /// journal) what that fsync covered. Records up to the one returned
    /// are durable in the image then.
    fn sync_image(&self) -> io::Result<()> {
        // Appends and their image writes happen under the lock together:
        // every record numbered below this has its write in the image.
        let covered = self.lock().journal.next_seq() - 1;
        if self.image.failure().is_some() {
            let mut g = self.lock();
            self.rewrite_locked(&mut g)?;
        } else if let Err(e) = self.image.flush() {
            let g = self.lock();
            // Not if a writer repaired it meanwhile (under the lock, as
            // this is): the record would then say failed while nothing is.
            if self.image.failure().is_some() {
                self.persist_io_error(Some((e.to_string(), g.image_synced)));
            }
            return Err(e);
        }
        let mut g = self.lock();
        g.image_synced = g.image_synced.max(covered);
        g.image_synced_at = Instant::now();
        Ok(())
    }

    /// Before the journal drops records (under the lock, so no write comes
    /// between): fsyncs the image, since a flush may have counted on those
    /// records for durability; after a failed fsync, first writes them
    /// again from the journal.
    fn settle_image_locked(&self, g: &mut Inner) -> io::Result<()> {
        let covered = g.journal.next_seq() - 1;
        if !self.fsync || covered <= g.image_synced {
            return Ok(());
        }
        if self.image.failure().is_none()
            && let Err(e) = self.image.flush()
        {
            self.persist_io_error(Some((e.to_string(), g.image_synced)));
        }
        if self.image.failure().is_some() {
            self.rewrite_locked(g)?;
        }
        g.image_synced = covered;
        g.image_synced_at = Instant::now();
        Ok(())
    }

    /// Whether a flush may count on the journal alone: it journals, no
    /// resync is due (a resync drops records at a restart without replaying
    /// them) and no failed image fsync waits to be repaired.
    fn journal_covers(&self) -> bool {
        if !self.fsync || self.image.failure().is_some() {
            return false;
        }
        let g = self.lock();
        g.session.journaling() && !g.session.resync_needed()
    }

    /// Records (or clears) a failed image fsync in the volume's record.
    fn persist_io_error(&self, e: Option<(String, u64)>) {
        let Some(h) = self.handle.upgrade() else {
            return;
        };
        if let Err(err) = h.update(true, |r| r.stream.image_io_error = e) {
            tracing::error!(volume = %self.name, error = %err, "cannot record the image's fsync state");
        }
    }

    /// `ferry volume clear-error`: the operator has checked the disk; an
    /// fsync that succeeds now ends the failure (what it lost stays lost).
    pub fn clear_io_error(&self) -> io::Result<()> {
        let mut g = self.lock();
        if let Err(e) = self.image.sync_again() {
            // It failed again (or for the first time): recorded, as any.
            self.persist_io_error(Some((e.to_string(), g.image_synced)));
            return Err(e);
        }
        // Every write in the image now is durable (writes take the lock).
        g.image_synced = g.journal.next_seq() - 1;
        g.lost = false;
        // Writes the failure lost are in no map: the next scan reads all.
        g.dirty = None;
        self.persist_io_error(None);
        tracing::warn!(volume = %self.name, "the image's fsync failure was cleared by the operator; flushes work again");
        Ok(())
    }

    /// Writes every journaled record since the last good fsync into the
    /// image again and fsyncs it (under the lock: no write comes between).
    fn rewrite_locked(&self, g: &mut Inner) -> io::Result<()> {
        // What the image held after its fsync failed is not known: the
        // next scan reads all of it.
        g.dirty = None;
        let why = self.image.failure().unwrap_or_default();
        let from = g.image_synced + 1;
        if g.lost || !g.session.journaling() || g.journal.first_seq() > from {
            return Err(io::Error::other(format!(
                "{why}; the journal no longer holds every write since the last good fsync, so they cannot be written again: flushes fail until the disk is checked and `ferry volume clear-error {}` is run",
                self.name
            )));
        }
        let view = g.journal.view();
        let mut at = from;
        loop {
            let recs = view.read_from(at, 8 << 20).map_err(jerr)?;
            let Some(last) = recs.last() else { break };
            at = last.seq + 1;
            for r in &recs {
                apply_record(&self.image, r)?;
            }
        }
        self.image.sync_again()?;
        self.persist_io_error(None);
        tracing::info!(volume = %self.name, from, upto = at - 1, "the writes a failed fsync covered were written again and synced; flushes work again");
        Ok(())
    }

    /// Drops the journal's records (its numbering goes on) and marks the
    /// volume for a resync (durably).
    /// False, with nothing dropped, while the image cannot be fsynced: the
    /// journal's records are then the only durable copy of writes whose
    /// flushes were acknowledged (a flush counts on the journal).
    fn fall_back(&self, g: &mut Inner, reason: &str) -> bool {
        // The journal is about to drop its records: the image must hold
        // what they hold (after a failed fsync, they are the only way to
        // write its writes again).
        if let Err(e) = self.settle_image_locked(g) {
            tracing::error!(volume = %self.name, error = %e, reason, "the journal keeps its records instead of falling back to a resync: the image cannot be fsynced, and they are the only durable copy of acknowledged writes; writes fail once it is full, flushes until the fsync works");
            return false;
        }
        let next = g.journal.next_seq();
        if let Err(e) = g.journal.reset(next) {
            tracing::error!(volume = %self.name, error = %e, "cannot drop the journal's records");
        }
        // Writes go unjournaled from here: a restart must not replay the
        // records before `next` (also when a resync was pending already,
        // as after an interrupted one, which journals on meanwhile).
        let journaled = g.session.journaling();
        if g.session.fall_back(reason, next) {
            tracing::warn!(volume = %self.name, reason, "falling back to a resync by tree comparison");
            self.persist_resync(true, Some(reason), Some(next));
        } else if journaled {
            self.persist_resync(true, None, Some(next));
        }
        self.acked_cond.notify_all();
        self.wake.notify_one();
        true
    }

    /// Records whether a resync is needed (and why, unless `None`: as
    /// recorded), and with a fallback the first record a restart may replay
    /// meanwhile (see `StreamRecord::replay_from`).
    fn persist_resync(&self, needed: bool, reason: Option<&str>, replay_from: Option<u64>) {
        let Some(h) = self.handle.upgrade() else {
            return;
        };
        let r = h.update(true, |r| {
            r.stream.resync_needed = needed;
            if let Some(reason) = reason {
                r.stream.resync_reason = reason.to_string();
            }
            if replay_from.is_some() {
                r.stream.replay_from = replay_from;
            }
        });
        if let Err(e) = r {
            tracing::error!(volume = %self.name, error = %e, "cannot record the resync state");
        }
    }

    /// Asks for a resync (operator request, or the DR side cannot continue).
    /// False when the journal cannot drop its records for one (the image
    /// cannot be fsynced: they are the only durable copy of some writes).
    pub fn request_resync(&self, reason: &str) -> bool {
        let mut g = self.lock();
        if g.session.resync_running().is_none() {
            self.fall_back(&mut g, reason)
        } else {
            // The running one may have read before the request: another
            // follows it (and `ferry sync --wait` waits for that one).
            g.resync_again = Some(reason.to_string());
            true
        }
    }

    /// Link state, for the fallback after `link_down_max`.
    pub fn link_up(&self) {
        self.lock().session.link_up();
    }

    pub fn link_down(&self) {
        self.lock().session.link_down(Instant::now());
    }

    /// When the link's absence turns into a resync, if it stays down.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.lock().session.poll_timeout()
    }

    pub fn handle_timeout(&self) {
        let mut g = self.lock();
        if let Some(reason) = g.session.handle_timeout(Instant::now())
            && !self.fall_back(&mut g, &reason)
        {
            // Kept: asked again after another `link_down_max`.
            g.session.link_up();
            g.session.link_down(Instant::now());
        }
    }

    /// Starts a resync: the journal restarts empty (its numbering goes on)
    /// and journals again, so that every write from here on reaches the DR
    /// side in the stream, on top of the tree comparison that follows.
    /// Returns the first record and the journal's incarnation.
    pub fn begin_resync(&self) -> io::Result<(u64, u64)> {
        let mut g = self.lock();
        self.settle_image_locked(&mut g)?;
        let next = g.journal.next_seq();
        g.journal.reset(next).map_err(jerr)?;
        let from = g.session.begin_resync(next);
        Ok((from, g.journal.incarnation()))
    }

    /// Scans the image for a seed or a resync: only the chunks written since
    /// the last scan when this run of the daemon has that scan's names and
    /// its map, the whole image otherwise. Either way the map starts again
    /// empty as the scan begins, and this scan's names are kept for the next.
    pub fn scan(
        &self,
        path: &Path,
        chunk_size: u32,
        progress: &std::sync::atomic::AtomicU64,
    ) -> Result<(crate::store::tree::Tree, ScanStats), ImageError> {
        let _one = self.scanning.lock().unwrap_or_else(|p| p.into_inner());
        let size = image::image_size(path)?;
        let token = rand::random::<u64>();
        // Read before the volume's lock: the image's own lock is held
        // through an fsync, and writes wait for the volume's. A failure
        // that comes after this is seen by the next scan (or its repair
        // forgets the map).
        let failed = self.image.failure().is_some();
        let last = {
            let mut g = self.lock();
            if failed {
                // Pages whose writeback failed may read back as written and
                // later as the disk holds them: no name can be trusted
                // until the failure is repaired (which forgets the map).
                g.dirty = None;
                None
            } else {
                g.dirty.replace((DirtyMap::new(size, chunk_size), token))
            }
        };
        let base = last.and_then(|(map, last_token)| {
            match dirty::load_leaves(&self.leaves_path, size, chunk_size, last_token) {
                Ok(leaves) => Some((leaves, map)),
                Err(why) => {
                    tracing::warn!(volume = %self.name, why, "the whole image is scanned: the last scan's names cannot be read");
                    None
                }
            }
        });
        let scanned = match base {
            Some((leaves, map)) => {
                tracing::info!(volume = %self.name, chunks = map.marked(), of = map.chunks(), "scanning only the chunks written since the last scan");
                image::scan_dirty(path, chunk_size, progress, leaves, &map)
            }
            None => image::scan(path, chunk_size, progress),
        };
        // Kept only while this scan's map is the volume's (not forgotten
        // meanwhile): names no map goes with would only take space.
        if self.lock().dirty.as_ref().is_none_or(|(_, t)| *t != token) {
            return scanned;
        }
        let kept = scanned
            .as_ref()
            .map_err(|e| e.to_string())
            .and_then(|(tree, _)| {
                dirty::save_leaves(&self.leaves_path, size, chunk_size, token, tree.leaves())
                    .map_err(|e| format!("cannot keep the scan's names: {e}"))
            });
        if let Err(why) = kept {
            // The writes this map lost are in no other: the next scan reads all.
            let mut g = self.lock();
            if g.dirty.as_ref().is_some_and(|(_, t)| *t == token) {
                g.dirty = None;
            }
            drop(g);
            tracing::warn!(volume = %self.name, why, "the next resync scans the whole image");
        }
        scanned
    }

    /// At a clean stop of the daemon: refuses every later write, fsyncs the
    /// image and keeps the map of the chunks written since the last scan
    /// in a file, with what the image's inode and the journal say now, for
    /// the next start (see `volume::dirty`). Nothing is kept when there is
    /// no map, the image's fsync fails or failed, or the image is not a
    /// regular file; the next resync then reads the whole image.
    pub fn park(&self, path: &Path) {
        // A scan still running (a superseded resync's) may save its names
        // after this: none is kept then. Held through the save otherwise.
        let _one = match self.scanning.try_lock() {
            Ok(g) => g,
            Err(e) => {
                self.lock().parked = true;
                let why = match e {
                    std::sync::TryLockError::WouldBlock => "a scan is running at the stop",
                    std::sync::TryLockError::Poisoned(_) => "a scan ended abnormally in this run",
                };
                tracing::warn!(volume = %self.name, why, "no map of the chunks written since the last scan is kept: the first resync after the restart reads the whole image");
                return;
            }
        };
        let (map, incarnation, next_seq) = {
            let mut g = self.lock();
            g.parked = true;
            let Some((map, token)) = g.dirty.clone() else {
                tracing::info!(volume = %self.name, "no map of the chunks written since the last scan to keep (no scan in this run of the daemon, or it was dropped): the first resync after the restart reads the whole image");
                return;
            };
            ((map, token), g.journal.incarnation(), g.journal.next_seq())
        };
        let size = self.image.size();
        let chunk_size = map.0.chunk_size() as u32;
        let kept = (|| {
            // A failure the stream has seen, or one now: no name holds.
            if let Some(why) = self.image.failure() {
                return Err(why);
            }
            self.image
                .flush()
                .map_err(|e| format!("the image's fsync failed: {e}"))?;
            // Without the stop's fsync, only this boot's page cache holds
            // what the map says.
            let boot = match (self.fsync, crate::fsio::boot_id()) {
                (true, _) => None,
                (false, b) if !b.is_empty() => Some(b),
                (false, _) => return Err("the image is not fsynced (configuration) and the host's boot id cannot be read".into()),
            };
            let stamp = dirty::stamp_settled(path, self.fsync)?;
            // The names the map goes with must outlive a power loss too.
            if self.fsync {
                std::fs::File::open(&self.leaves_path)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| format!("{}: {e}", self.leaves_path.display()))?;
            }
            let kept = dirty::Kept {
                stamp,
                incarnation,
                next_seq,
                boot,
            };
            dirty::save_map(&self.map_path, size, chunk_size, (&map.0, map.1), &kept)
                .map_err(|e| format!("cannot write {}: {e}", self.map_path.display()))
        })();
        match kept {
            Ok(()) => {
                tracing::info!(volume = %self.name, chunks = map.0.marked(), of = map.0.chunks(), "kept the map of the chunks written since the last scan: the next resync after the restart reads only those")
            }
            Err(why) => {
                tracing::warn!(volume = %self.name, why, "the map of the chunks written since the last scan is not kept: the first resync after the restart reads the whole image")
            }
        }
    }

    /// The next scan reads the whole image (`ferry sync` asks for this: an
    /// operator who suspects the image was written behind the export).
    pub fn forget_scan(&self) {
        self.lock().dirty = None;
    }

    /// The marker for the resync's commit, taken when the pass has read
    /// every chunk it sent.
    pub fn resync_marker(&self) -> Option<FuzzyCommit> {
        self.lock().session.resync_marker()
    }

    /// The resync's tree landed at the DR site. False when a fallback
    /// superseded it meanwhile (the volume still needs a resync).
    pub fn end_resync(&self) -> bool {
        let mut g = self.lock();
        let done = g.session.resync_committed();
        let again = g.resync_again.take();
        if done {
            // Under the lock: a fallback cannot slip in between.
            self.persist_resync(false, Some(""), None);
            if let Some(reason) = again {
                tracing::info!(volume = %self.name, reason, "a resync was asked for while this one ran: another follows, reading the whole image");
                // As asked (the map may be one this resync began since).
                g.dirty = None;
                self.fall_back(&mut g, &reason);
            }
        }
        drop(g);
        self.acked_cond.notify_all();
        done
    }

    /// The resync did not finish; it runs again.
    pub fn resync_interrupted(&self) {
        let mut g = self.lock();
        g.session.resync_interrupted();
        // It runs again: that run serves a request made meanwhile.
        g.resync_again = None;
    }

    /// The DR side's answer to the stream handshake.
    pub fn open_stream(&self, dr_next: u64, continues: bool) -> OpenVerdict {
        let mut g = self.lock();
        let first = g.journal.first_seq();
        let v = g.session.open(dr_next, continues, first);
        let kept = self.trim_bound(&g);
        if let OpenVerdict::StreamFrom(n) = v
            && let Err(e) = g.journal.trim((n - 1).min(kept))
        {
            tracing::warn!(volume = %self.name, error = %e, "cannot trim the journal");
        }
        unlock(g);
        v
    }

    /// The journal as it is now (to read records without holding it), and
    /// the last record the DR side holds.
    pub fn journal_view(&self) -> (JournalView, u64) {
        let g = self.lock();
        (g.journal.view(), g.session.acked())
    }

    /// The DR site holds every record up to `upto` durably. Says whether
    /// the image is due a checkpoint: the records the DR side has wait only
    /// for it.
    pub fn durable(&self, upto: u64, bytes: u64) -> Result<Checkpoint, String> {
        let mut g = self.lock();
        let caught_up = g.session.durable(upto, bytes)?;
        if caught_up {
            tracing::info!(volume = %self.name, "the DR site has caught up; sync mode again");
        }
        // Trimming during a resync is safe too: a resync that has to start
        // again scans the image again, which holds what was trimmed.
        let kept = self.trim_bound(&g);
        if let Err(e) = g.journal.trim(upto.min(kept)) {
            tracing::warn!(volume = %self.name, error = %e, "cannot trim the journal");
        }
        // Records the DR site has but no image fsync covered yet hold the
        // journal (a flush counts on it, not on the image).
        let due = if upto <= kept {
            Checkpoint::No
        } else if g.journal.bytes() > g.journal.bytes_max() / 4 {
            Checkpoint::Pressed
        } else if g.image_synced_at.elapsed() >= IMAGE_CHECKPOINT_INTERVAL {
            Checkpoint::Due
        } else {
            Checkpoint::No
        };
        unlock(g);
        self.acked_cond.notify_all();
        Ok(due)
    }

    /// Whether a checkpoint started by [`VolumeStream::checkpoint_beside`] runs.
    pub fn checkpoint_running(&self) -> bool {
        self.checkpointing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }

    /// Runs the image's checkpoint on a thread of its own at a lower CPU
    /// priority, so that the writes it trails and the stream come first
    /// (logged if no thread starts: the next answer tries again).
    pub fn checkpoint_beside(self: &Arc<Self>) {
        let mut slot = self.checkpointing.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let vs = self.clone();
        let started = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                // SAFETY: plain syscalls on this thread's own id.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
                }
                vs.checkpoint_image();
            });
        match started {
            Ok(t) => *slot = Some(t),
            Err(e) => {
                tracing::warn!(volume = %self.name, error = %e, "cannot start the image's checkpoint; the next answer tries again")
            }
        }
    }

    /// The image's checkpoint: fsyncs it, then drops the records the DR site
    /// has that waited for it (blocking; see [`VolumeStream::durable`]). A
    /// failed fsync is logged and shown; the next flush writes the records
    /// again and fails if it cannot.
    pub fn checkpoint_image(&self) {
        if let Err(e) = self.sync_image() {
            tracing::error!(volume = %self.name, error = %e, "the image's checkpoint fsync failed: its writes since the last one are written again from the journal");
            return;
        }
        let mut g = self.lock();
        let upto = g.session.acked().min(self.trim_bound(&g));
        if let Err(e) = g.journal.trim(upto) {
            tracing::warn!(volume = %self.name, error = %e, "cannot trim the journal");
        }
        unlock(g);
    }

    /// Before the journal is deleted with the volume's state (removal,
    /// demotion): the image holds every write, durably.
    pub fn make_image_durable(&self) -> io::Result<()> {
        // A checkpoint still running ends first: it would trim a journal
        // that may be gone by then.
        let running = self
            .checkpointing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = running
            && t.join().is_err()
        {
            tracing::error!(volume = %self.name, "the image's checkpoint thread panicked; the image is fsynced now");
        }
        let mut g = self.lock();
        if g.session.journaling() {
            self.settle_image_locked(&mut g)
        } else {
            drop(g);
            self.sync_image()
        }
    }

    /// The last record the journal may drop: one an fsync of the image covered.
    fn trim_bound(&self, g: &Inner) -> u64 {
        if self.fsync { g.image_synced } else { u64::MAX }
    }

    /// In sync mode: waits until record `seq` is durable at the DR site, or
    /// the wait runs out (then the volume's fallback decides).
    fn wait_durable(&self, target: FlushTarget) -> io::Result<()> {
        let started = Instant::now();
        let mut g = self.lock();
        loop {
            match g.session.flush_verdict(target, started, Instant::now()) {
                FlushVerdict::Done => return Ok(()),
                FlushVerdict::Degraded => {
                    tracing::warn!(volume = %self.name, "the DR site did not confirm a flush in time; running as async until it catches up");
                    return Ok(());
                }
                FlushVerdict::Fail(why) => {
                    return Err(io::Error::other(format!(
                        "sync volume {}: {why}",
                        self.name
                    )));
                }
                FlushVerdict::Wait(until) => {
                    let left = until.saturating_duration_since(Instant::now());
                    g = self
                        .acked_cond
                        .wait_timeout(g, left)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            }
        }
    }

    /// A planned switchover, with the gate closed: everything written is
    /// made durable here and sealed with a flush record; returns its number
    /// and checksum (the last record the DR side must hold).
    pub fn seal(&self) -> io::Result<(u64, u64)> {
        self.sync_image()?;
        let mut g = self.lock();
        if !g.session.journaling() {
            return Err(io::Error::other(
                "a resync is pending: the journal does not hold every write",
            ));
        }
        self.log(&mut g, Kind::Flush, 0, 0, &[])?;
        if self.fsync
            && let Err(e) = g.journal.sync()
        {
            self.fall_back(
                &mut g,
                &format!("the journal could not be made durable ({e})"),
            );
            return Err(jerr(e));
        }
        let n = g.journal.next_seq() - 1;
        let sum = g.journal.last_checksum();
        drop(g);
        self.wake.notify_one();
        Ok((n, sum))
    }

    /// The local part of a FLUSH (the caller holds the gate): fsync the
    /// image unless the journal covers it, append a flush record, fsync the
    /// journal. Returns what the flush then waits for.
    fn flush_local(&self) -> io::Result<FlushTarget> {
        let by_journal = self.journal_covers();
        if !by_journal {
            self.sync_image()?;
        }
        let (mut target, plan) = {
            let mut g = self.lock();
            self.log(&mut g, Kind::Flush, 0, 0, &[])?;
            let plan = (self.fsync && g.session.journaling()).then(|| g.journal.plan_sync());
            (g.session.flush_target(), plan)
        };
        // The journal's fsync runs without the volume's lock: the writes
        // of every connection go on meanwhile (they waited for it, a
        // millisecond or more per flush).
        let run = match &plan {
            Some(Ok(p)) => Some(p.run()),
            _ => None,
        };
        let image_too = {
            let mut g = self.lock();
            let synced = match (plan, run) {
                (Some(Ok(p)), Some(r)) => g.journal.finish_sync(&p, r),
                (Some(Err(e)), _) => Err(e),
                _ => Ok(()),
            };
            if let Err(e) = synced {
                // The fallback fsyncs the image before it drops the
                // records, so the flush holds there if that fsync does;
                // what the journal held for the DR site may not be: a
                // resync carries it instead (the records are dropped, never
                // sent as if durable).
                tracing::error!(volume = %self.name, error = %e, "the journal could not be made durable");
                self.fall_back(
                    &mut g,
                    &format!("the journal could not be made durable ({e})"),
                );
                if let Some(why) = self.image.failure() {
                    return Err(io::Error::other(why));
                }
            }
            if !g.session.journaling() {
                // Fallen back since the append: the flush waits for the
                // resync that carries its writes.
                target = g.session.flush_target();
            }
            // A fallback or a resync since the check (the append above may
            // be one): the records may go without a replay, so the image
            // must be durable after all (the fallback synced it, or could
            // not and kept them: then this flush fails).
            by_journal && (!g.session.journaling() || g.session.resync_needed())
        };
        if image_too {
            self.sync_image()?;
        }
        self.wake.notify_one();
        Ok(target)
    }

    /// The rest of a FLUSH, outside the gate (a fence does not wait for the
    /// DR site): in sync mode, until the DR site holds it.
    fn flush_wait(&self, target: FlushTarget, t0: Instant) -> io::Result<()> {
        let r = if self.mode == Mode::Sync {
            self.wait_durable(target)
        } else {
            Ok(())
        };
        self.flush_seconds.observe(t0.elapsed().as_secs_f64());
        r
    }

    fn zero_range(&self, kind: Kind, off: u64, len: u64, fua: bool) -> io::Result<()> {
        let pass = self.gate.enter().map_err(gate_error)?;
        {
            let mut g = self.lock();
            let mut at = 0u64;
            while at < len {
                let n = (len - at).min(crate::volume::journal::RECORD_DATA_MAX as u64);
                self.log(&mut g, kind, off + at, n as u32, &[])?;
                at += n;
            }
            self.image.write_zeroes(off, len, false)?;
        }
        self.wake.notify_one();
        if !fua {
            return Ok(());
        }
        let t0 = Instant::now();
        let target = self.flush_local()?;
        drop(pass);
        self.flush_wait(target, t0)
    }
}

fn stream_config(rec: &VolumeRecord, link_down_max: Duration) -> StreamConfig {
    StreamConfig {
        mode: rec.mode,
        fallback: rec.stream.sync_fallback,
        sync_wait: match rec.stream.sync_wait_ms {
            0 => SYNC_WAIT_DEFAULT,
            ms => Duration::from_millis(ms),
        },
        link_down_max,
    }
}

/// The file in the journal's directory with the last scan's names.
const SCAN_LEAVES_FILE: &str = "scan.leaves";
/// The file in which a clean stop keeps the map of chunks written since.
const SCAN_MAP_FILE: &str = "scan.map";

/// The map a clean stop kept for this volume, if the image and the journal
/// (just opened, not yet replayed) are as that stop left them.
fn take_kept_map(
    rec: &VolumeRecord,
    stamp: io::Result<Option<dirty::ImageStamp>>,
    size: u64,
    path: &Path,
    journal: &Journal,
    boot: &str,
) -> Result<Option<(DirtyMap, u64)>, String> {
    let stamp = match stamp {
        Ok(Some(s)) => s,
        Ok(None) => return dirty::remove_map(path).map(|()| None),
        Err(e) => {
            dirty::remove_map(path)?;
            return Err(format!("{}: {e}", rec.path.display()));
        }
    };
    let now = dirty::Kept {
        stamp,
        incarnation: journal.incarnation(),
        next_seq: journal.next_seq(),
        boot: Some(boot.to_string()),
    };
    let taken = dirty::take_map(path, size, rec.chunk_size, &now)?;
    if let Some((map, _)) = &taken {
        tracing::info!(volume = %rec.name, chunks = map.marked(), of = map.chunks(), "took back the map of the chunks written since the last scan, kept by the clean stop: the next resync reads only those");
    }
    Ok(taken)
}

/// Writes a journal record into an image (replay at the primary's restart).
fn apply_record(image: &FileExport, r: &Record) -> io::Result<()> {
    match r.kind {
        Kind::Write => image.write(r.offset, &r.data, false),
        Kind::Zero | Kind::Trim => image.write_zeroes(r.offset, r.len as u64, false),
        Kind::Flush => Ok(()),
    }
}

impl Export for VolumeStream {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.image.read(off, buf)
    }

    fn write(&self, off: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let pass = self.gate.enter().map_err(gate_error)?;
        {
            let mut g = self.lock();
            let mut at = 0usize;
            for piece in data.chunks(STREAM_RECORD_DATA_MAX) {
                self.log(
                    &mut g,
                    Kind::Write,
                    off + at as u64,
                    piece.len() as u32,
                    piece,
                )?;
                at += piece.len();
            }
            self.image.write(off, data, false)?;
            if !fua && g.unflushed >= checkpoint_bytes(g.journal.bytes_max()) {
                // The write itself is done: a checkpoint that cannot be
                // appended (the journal then falls back to a resync) does
                // not fail it.
                match self.log(&mut g, Kind::Flush, 0, 0, &[]) {
                    Ok(()) => self.checkpoints.inc(),
                    Err(e) => {
                        tracing::warn!(volume = %self.name, error = %e, "a checkpoint flush record could not be appended")
                    }
                }
            }
        }
        self.wake.notify_one();
        if !fua {
            return Ok(());
        }
        let t0 = Instant::now();
        let target = self.flush_local()?;
        drop(pass);
        self.flush_wait(target, t0)
    }

    fn flush(&self) -> io::Result<()> {
        let t0 = Instant::now();
        let target = {
            let _pass = self.gate.enter().map_err(gate_error)?;
            self.flush_local()?
        };
        self.flush_wait(target, t0)
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.zero_range(Kind::Trim, off, len, false)
    }

    fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        self.zero_range(Kind::Zero, off, len, fua)
    }

    fn revoked(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.gate.watch())
    }

    fn allocation(
        &self,
        off: u64,
        len: u64,
        runs_max: usize,
    ) -> io::Result<Vec<crate::nbd::Extent>> {
        self.image.allocation(off, len, runs_max)
    }

    /// A zeroed range is one journal record and a hole punched in the image.
    fn zeroes_fast(&self) -> bool {
        self.image.zeroes_fast()
    }

    /// Every connection writes through this one stream, under its lock: a
    /// FLUSH syncs the image and journals its mark after every record
    /// logged before it, whichever connection wrote it, and in sync mode
    /// waits until the DR site holds all of them.
    fn multi_conn(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_of_a_client_that_never_flushes_fit_what_the_dr_side_keeps_in_memory() {
        let kept = crate::daemon::replica_stream::REDO_KEPT_BYTES as u64;
        for journal in [1u64 << 20, 8 << 20, 64 << 20, 1 << 30, 1 << 40] {
            let c = checkpoint_bytes(journal);
            assert!(c >= 1 && c <= (journal / 8).max(1), "{journal}: {c}");
            // An epoch, the next one arriving, and a batch in flight.
            assert!(4 * c <= kept, "{journal}: {c} against {kept} kept");
        }
    }
}
