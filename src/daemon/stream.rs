//! Continuous replication at the primary (async and sync volumes): the
//! journaled NBD export and the state the streamer shares with it.
//!
//! Write path: under one lock, each write is appended to the journal first
//! and then written to the image, so the journal order is the image's order
//! and every image write has its record (a restart replays the journal onto
//! the image, which makes a write torn by a crash whole again). FLUSH fsyncs
//! the image, appends a Flush record and fsyncs the journal. In sync mode the
//! flush then waits until the DR site has every record up to it durably.
//!
//! When the journal fills, or the link stays down too long, the journal is
//! dropped and the volume is marked for a resync (durably): the streamer
//! brings the DR copy level by a tree comparison (a "fuzzy" pass over the
//! live image, with the journal restarted before the read), then streams on.

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::nbd::{Export, FileExport};
use crate::proto::messages::STREAM_RECORD_DATA_MAX;
use crate::store::ChunkStore;
use crate::store::state::{self, Mode, SyncFallback, VolumeRecord};
use crate::volume::journal::{Journal, JournalError, JournalView, Kind, Record};

/// Default wait of a sync volume's flush for the DR site.
pub const SYNC_WAIT_DEFAULT: Duration = Duration::from_secs(10);
/// Granularity of the write times kept for the lag in seconds.
const LAG_TICK: Duration = Duration::from_millis(5);

pub struct VolumeStream {
    pub name: String,
    image: FileExport,
    store: Arc<dyn ChunkStore>,
    fsync: bool,
    mode: Mode,
    sync_wait: Duration,
    fallback: SyncFallback,
    inner: Mutex<Inner>,
    acked_cond: Condvar,
    /// Wakes the streamer: records were appended, or a resync was asked for.
    pub wake: tokio::sync::Notify,
    flush_seconds: prometheus::Histogram,
}

struct Inner {
    journal: Journal,
    /// False between a fallback and the start of the resync that follows.
    journaling: bool,
    resync_needed: bool,
    resync_reason: String,
    /// Every record up to here is durable at the DR site.
    acked: u64,
    /// Sync mode running as async after the DR site stayed unreachable.
    degraded: bool,
    unacked_bytes: u64,
    /// (first record appended in a tick, when): the age of the oldest unacknowledged write.
    times: VecDeque<(u64, Instant)>,
    link_down_since: Option<Instant>,
    /// The DR side's newest recovery point (id, Unix seconds), as it last said.
    dr_point: Option<(u64, u64)>,
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
    pub resync_reason: String,
    /// The DR side's newest recovery point: id and Unix seconds.
    pub dr_point: Option<(u64, u64)>,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn jerr(e: JournalError) -> io::Error {
    io::Error::other(e.to_string())
}

/// This boot of the host; another value after a restart means the page
/// cache (unflushed writes) may be gone.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl VolumeStream {
    /// Opens the volume's journal in `journal_dir`, replays it onto the image
    /// and decides whether a resync must come first.
    pub fn open(
        rec: &VolumeRecord,
        journal_dir: &Path,
        journal_bytes_max: u64,
        store: Arc<dyn ChunkStore>,
        fsync: bool,
        flush_seconds: prometheus::Histogram,
    ) -> Result<Arc<VolumeStream>, String> {
        let ctx = |e: &dyn std::fmt::Display| format!("volume {}: {e}", rec.name);
        let image = FileExport::open(&rec.path, fsync).map_err(|e| ctx(&e))?;
        let (journal, recovered) =
            Journal::open(journal_dir, journal_bytes_max).map_err(|e| ctx(&e))?;
        if recovered.cut_bytes > 0 {
            tracing::warn!(volume = %rec.name, cut_bytes = recovered.cut_bytes, "journal had a torn tail; cut at the last whole record");
        }
        // Make every journaled write present in the image, in order (idempotent).
        let view = journal.view();
        let mut from = journal.first_seq();
        let mut replayed = 0u64;
        loop {
            let recs = view.read_from(from, 64 << 20).map_err(|e| ctx(&e))?;
            let Some(last) = recs.last().map(|r| r.seq) else {
                break;
            };
            for r in &recs {
                apply_record(&image, r).map_err(|e| ctx(&e))?;
            }
            replayed += recs.len() as u64;
            from = last + 1;
        }
        if replayed > 0 {
            image.flush().map_err(|e| ctx(&e))?;
            tracing::info!(volume = %rec.name, records = replayed, "journal replayed onto the image");
        }
        let mut rec2 = rec.clone();
        let boot = boot_id();
        if !rec2.stream.boot_id.is_empty() && rec2.stream.boot_id != boot && !boot.is_empty() {
            rec2.stream.resync_needed = true;
            rec2.stream.resync_reason =
                "the host restarted: writes that were never flushed may be lost from the journal"
                    .into();
        }
        rec2.stream.boot_id = boot;
        store
            .apply(vec![state::put_volume_op(&rec2)], true)
            .map_err(|e| ctx(&e))?;
        let acked = journal.first_seq() - 1;
        let unacked_bytes = journal.bytes();
        let resync_needed = rec2.stream.resync_needed;
        Ok(Arc::new(VolumeStream {
            name: rec.name.clone(),
            image,
            store,
            fsync,
            mode: rec.mode,
            sync_wait: match rec.stream.sync_wait_ms {
                0 => SYNC_WAIT_DEFAULT,
                ms => Duration::from_millis(ms),
            },
            fallback: rec.stream.sync_fallback,
            inner: Mutex::new(Inner {
                journal,
                journaling: !resync_needed,
                resync_needed,
                resync_reason: rec2.stream.resync_reason.clone(),
                acked,
                degraded: false,
                unacked_bytes,
                times: VecDeque::new(),
                link_down_since: None,
                dr_point: None,
            }),
            acked_cond: Condvar::new(),
            wake: tokio::sync::Notify::new(),
            flush_seconds,
        }))
    }

    pub fn view(&self) -> StreamView {
        let g = lock(&self.inner);
        let next = g.journal.next_seq();
        let lag_seconds = if g.acked + 1 < next {
            g.times
                .front()
                .map(|(_, t)| t.elapsed().as_secs_f64())
                .unwrap_or(0.0)
        } else {
            0.0
        };
        StreamView {
            journal_bytes: g.journal.bytes(),
            journal_bytes_max: g.journal.bytes_max(),
            next_seq: next,
            acked_seq: g.acked,
            lag_bytes: if g.acked + 1 < next {
                g.unacked_bytes
            } else {
                0
            },
            lag_seconds,
            degraded: g.degraded,
            resync_needed: g.resync_needed,
            resync_reason: g.resync_reason.clone(),
            dr_point: g.dr_point,
        }
    }

    pub fn set_dr_point(&self, p: Option<(u64, u64)>) {
        if p.is_some() {
            lock(&self.inner).dr_point = p;
        }
    }

    pub fn resync_needed(&self) -> bool {
        lock(&self.inner).resync_needed
    }

    /// Appends to the journal (when journaling); a full journal makes the
    /// volume fall back to a resync instead of failing the write.
    fn log(&self, g: &mut Inner, kind: Kind, off: u64, len: u32, data: &[u8]) -> io::Result<()> {
        if !g.journaling {
            return Ok(());
        }
        match g.journal.append(kind, off, len, data) {
            Ok(seq) => {
                g.unacked_bytes += (crate::volume::journal::HEADER_BYTES + data.len()) as u64;
                if g.times.back().is_none_or(|(_, t)| t.elapsed() >= LAG_TICK) {
                    g.times.push_back((seq, Instant::now()));
                }
                Ok(())
            }
            Err(JournalError::Full { bytes, max }) => {
                self.fall_back(
                    g,
                    &format!(
                        "the journal filled up ({bytes} of {max} bytes) before the DR site took it"
                    ),
                );
                Ok(())
            }
            Err(e) => Err(jerr(e)),
        }
    }

    /// Stops journaling and marks the volume for a resync (durably).
    fn fall_back(&self, g: &mut Inner, reason: &str) {
        tracing::warn!(volume = %self.name, reason, "falling back to a resync by tree comparison");
        g.journaling = false;
        g.resync_needed = true;
        g.resync_reason = reason.to_string();
        let next = g.journal.next_seq();
        if let Err(e) = g.journal.reset(next) {
            tracing::error!(volume = %self.name, error = %e, "cannot drop the journal");
        }
        g.unacked_bytes = 0;
        g.times.clear();
        self.persist_resync(true, reason);
        self.acked_cond.notify_all();
        self.wake.notify_one();
    }

    fn persist_resync(&self, needed: bool, reason: &str) {
        let r = state::get_volume(&*self.store, &self.name).and_then(|v| match v {
            Some(mut v) => {
                v.stream.resync_needed = needed;
                v.stream.resync_reason = reason.to_string();
                self.store.apply(vec![state::put_volume_op(&v)], true)
            }
            None => Ok(()),
        });
        if let Err(e) = r {
            tracing::error!(volume = %self.name, error = %e, "cannot record the resync state");
        }
    }

    /// Asks for a resync (operator request, or the DR side has no base).
    pub fn request_resync(&self, reason: &str) {
        let mut g = lock(&self.inner);
        if !g.resync_needed {
            self.fall_back(&mut g, reason);
        }
    }

    /// Starts a resync: the journal restarts empty and journaling resumes,
    /// so that every write from here on is streamed after the tree comparison.
    /// Returns the first record the comparison may have missed.
    pub fn begin_resync(&self) -> io::Result<u64> {
        let mut g = lock(&self.inner);
        let next = g.journal.next_seq();
        g.journal.reset(next).map_err(jerr)?;
        g.journaling = true;
        g.unacked_bytes = 0;
        g.times.clear();
        Ok(next)
    }

    /// The next record to be appended.
    pub fn next_seq(&self) -> u64 {
        lock(&self.inner).journal.next_seq()
    }

    /// The DR copy now holds the tree compared at `from_seq`: stream from there.
    pub fn end_resync(&self, from_seq: u64) {
        let mut g = lock(&self.inner);
        g.resync_needed = false;
        g.resync_reason.clear();
        g.acked = from_seq - 1;
        drop(g);
        self.persist_resync(false, "");
    }

    /// Link state, for the fallback after `link_down_max`.
    pub fn link_state(&self, up: bool, link_down_max: Duration) {
        let mut g = lock(&self.inner);
        if up {
            g.link_down_since = None;
            return;
        }
        let since = *g.link_down_since.get_or_insert_with(Instant::now);
        if since.elapsed() > link_down_max && g.journaling && g.acked + 1 < g.journal.next_seq() {
            let reason = format!(
                "the link has been down for more than {}s",
                link_down_max.as_secs()
            );
            self.fall_back(&mut g, &reason);
        }
    }

    /// Where the DR side wants the stream to start; false when the journal
    /// cannot serve it (then a resync was requested).
    pub fn start_at(&self, dr_next: u64) -> bool {
        let mut g = lock(&self.inner);
        let (first, next) = (g.journal.first_seq(), g.journal.next_seq());
        if dr_next < first || dr_next > next {
            let reason =
                format!("the DR side expects record {dr_next}, the journal holds {first}..{next}");
            self.fall_back(&mut g, &reason);
            return false;
        }
        g.acked = dr_next - 1;
        let acked = g.acked;
        if let Err(e) = g.journal.trim(acked) {
            tracing::warn!(volume = %self.name, error = %e, "cannot trim the journal");
        }
        true
    }

    /// The journal as it is now, to read records without holding it.
    pub fn journal_view(&self) -> (JournalView, u64) {
        let g = lock(&self.inner);
        (g.journal.view(), g.acked)
    }

    /// The DR site holds every record up to `upto` durably.
    pub fn acked(&self, upto: u64, bytes: u64) {
        let mut g = lock(&self.inner);
        if upto <= g.acked {
            return;
        }
        g.acked = upto;
        g.unacked_bytes = g.unacked_bytes.saturating_sub(bytes);
        while g.times.len() > 1 && g.times[1].0 <= upto + 1 {
            g.times.pop_front();
        }
        if g.times.front().is_some_and(|(s, _)| *s <= upto) && g.times.len() == 1 {
            g.times.clear();
        }
        if let Err(e) = g.journal.trim(upto) {
            tracing::warn!(volume = %self.name, error = %e, "cannot trim the journal");
        }
        let caught_up = g.journaling && upto + 1 >= g.journal.next_seq();
        if caught_up {
            g.unacked_bytes = 0;
            if g.degraded {
                g.degraded = false;
                tracing::info!(volume = %self.name, "the DR site has caught up; sync mode again");
            }
        }
        drop(g);
        self.acked_cond.notify_all();
    }

    /// In sync mode: waits until record `seq` is durable at the DR site.
    fn wait_durable(&self, seq: Option<u64>) -> io::Result<()> {
        let mut g = lock(&self.inner);
        if g.degraded {
            return Ok(());
        }
        let deadline = Instant::now() + self.sync_wait;
        loop {
            if let Some(s) = seq
                && g.acked >= s
            {
                return Ok(());
            }
            let now = Instant::now();
            if g.resync_needed || seq.is_none() || now >= deadline {
                break;
            }
            g = self
                .acked_cond
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        match self.fallback {
            SyncFallback::Degrade => {
                if !g.degraded {
                    tracing::warn!(volume = %self.name, wait_s = self.sync_wait.as_secs_f64(), "the DR site did not confirm a flush in time; running as async until it catches up");
                }
                g.degraded = true;
                Ok(())
            }
            SyncFallback::Fail => Err(io::Error::other(format!(
                "sync volume {}: the DR site did not confirm the flush within {:.1}s",
                self.name,
                self.sync_wait.as_secs_f64()
            ))),
        }
    }
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
        {
            let mut g = lock(&self.inner);
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
        }
        self.wake.notify_one();
        if fua { self.flush() } else { Ok(()) }
    }

    fn flush(&self) -> io::Result<()> {
        let t0 = Instant::now();
        self.image.flush()?;
        let seq = {
            let mut g = lock(&self.inner);
            self.log(&mut g, Kind::Flush, 0, 0, &[])?;
            if g.journaling {
                if self.fsync {
                    g.journal.sync().map_err(jerr)?;
                }
                Some(g.journal.next_seq() - 1)
            } else {
                None
            }
        };
        self.wake.notify_one();
        let r = if self.mode == Mode::Sync {
            self.wait_durable(seq)
        } else {
            Ok(())
        };
        self.flush_seconds.observe(t0.elapsed().as_secs_f64());
        r
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.zero_range(Kind::Trim, off, len, false)
    }

    fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        self.zero_range(Kind::Zero, off, len, fua)
    }
}

impl VolumeStream {
    fn zero_range(&self, kind: Kind, off: u64, len: u64, fua: bool) -> io::Result<()> {
        {
            let mut g = lock(&self.inner);
            let mut at = 0u64;
            while at < len {
                let n = (len - at).min(crate::volume::journal::RECORD_DATA_MAX as u64);
                self.log(&mut g, kind, off + at, n as u32, &[])?;
                at += n;
            }
            self.image.write_zeroes(off, len, false)?;
        }
        self.wake.notify_one();
        if fua { self.flush() } else { Ok(()) }
    }
}
