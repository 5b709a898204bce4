//! The primary's write journal: an append-only, checksummed, sequence-numbered
//! log of writes not yet durable at the DR site, in segment files.
//!
//! Layout: `DIR/<first seq, 20 digits>.log` segments. A record is a 40-byte
//! header (magic, kind, sequence, offset, length, epoch, checksum) and, for
//! writes, the data. The epoch is the volume's epoch the primary wrote the
//! record under: a replica takes only records of the epoch it is in step at. The checksum (keyed blake3, 64 bits) covers header and data, so a
//! torn or damaged record is detected; on open the log is cut at the first
//! record that does not check, and the caller is told how much was cut.
//!
//! Sequence numbers start at 1 and have no holes, and they never go back:
//! the DR side names its position by them. `trim(upto)` drops whole segments
//! once the DR side has acknowledged everything in them; an emptied journal
//! keeps an empty segment named after the next record, created (and made
//! durable in the directory) before the old segments are deleted, so a crash
//! at any moment leaves the numbering where it was. The journal is bounded by
//! `bytes_max` (invariant 6): an append that would pass it fails with
//! [`JournalError::Full`], and the caller falls back to a resync.
//!
//! Each journal directory has an incarnation, a random id written when the
//! directory is created (`DIR/incarnation`): records are identified by
//! (incarnation, sequence), so a journal that was lost and created again is
//! never taken for the continuation of the old one.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::fsio::Io;

const MAGIC: u32 = 0x4652_4a31; // "FRJ1"
pub const HEADER_BYTES: usize = 40;
/// Largest data in one record (one NBD request at most).
pub const RECORD_DATA_MAX: u32 = 32 << 20;
/// A new segment starts when the current one passes this.
const SEGMENT_BYTES: u64 = 64 << 20;
const CHECK_CONTEXT: &str = "ferry 2026-11 journal record v1";
/// A segment remembers where a record starts about every this many bytes,
/// so that a read from the middle seeks there instead of decoding the
/// segment from its start (which made every batch of the stream cost the
/// whole segment: most of the primary's CPU under small writes).
const INDEX_STRIDE: u64 = 256 << 10;
/// Read buffer of a scan or a read of records.
const READ_BUFFER_BYTES: usize = 256 << 10;
const INCARNATION_FILE: &str = "incarnation";

/// What a record says happened to the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    /// `len` bytes of data at `offset`.
    Write = 1,
    /// `len` zero bytes at `offset` (NBD WRITE_ZEROES).
    Zero = 2,
    /// `len` bytes at `offset` discarded; they read back as zeros (NBD TRIM).
    Trim = 3,
    /// A flush boundary: every earlier record is part of a crash-consistent state.
    Flush = 4,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Write,
            2 => Kind::Zero,
            3 => Kind::Trim,
            4 => Kind::Flush,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub kind: Kind,
    pub offset: u64,
    pub len: u32,
    /// The volume's epoch at the primary when the record was written.
    pub epoch: u32,
    /// The written bytes (`Kind::Write` only; empty otherwise).
    pub data: Vec<u8>,
}

impl Record {
    pub fn bytes(&self) -> u64 {
        (HEADER_BYTES + self.data.len()) as u64
    }

    fn header(&self) -> [u8; 32] {
        header_of(self.seq, self.kind, self.offset, self.len, self.epoch)
    }

    /// The record's checksum (header and data): what a planned switchover
    /// names the last handed-over record by, with its epoch and number.
    pub fn checksum(&self) -> u64 {
        checksum(&self.header(), &self.data)
    }

    pub fn encode(&self) -> Vec<u8> {
        encode_parts(&self.header(), &self.data)
    }
}

/// A record read in place (from the redo log's memory or a buffer read
/// from a segment), its checksum checked when it was taken or read.
#[derive(Clone, Copy, Debug)]
pub struct RecordRef<'a> {
    pub seq: u64,
    pub kind: Kind,
    pub offset: u64,
    pub len: u32,
    pub epoch: u32,
    /// The checksum its header carries (header and data; checked).
    pub checksum: u64,
    /// The written bytes (`Kind::Write` only; empty otherwise).
    pub data: &'a [u8],
}

impl RecordRef<'_> {
    pub fn to_record(&self) -> Record {
        Record {
            seq: self.seq,
            kind: self.kind,
            offset: self.offset,
            len: self.len,
            epoch: self.epoch,
            data: self.data.to_vec(),
        }
    }
}

/// Records read in place: [`JournalView::read_in_place`].
pub struct Records(Vec<Kept>);

impl Records {
    /// The records, in order.
    pub fn iter(&self) -> impl Iterator<Item = RecordRef<'_>> {
        self.0.iter().flat_map(|k| Split(k.bytes()))
    }
}

/// Walks encoded records that were checked already.
struct Split<'a>(&'a [u8]);

impl<'a> Iterator for Split<'a> {
    type Item = RecordRef<'a>;

    fn next(&mut self) -> Option<RecordRef<'a>> {
        let h = Head::parse(self.0.get(..HEADER_BYTES)?)?;
        let end = HEADER_BYTES + h.data_len as usize;
        let data = self.0.get(HEADER_BYTES..end)?;
        self.0 = &self.0[end..];
        Some(h.with(data))
    }
}

/// A record's header without its checksum.
fn header_of(seq: u64, kind: Kind, offset: u64, len: u32, epoch: u32) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4] = kind as u8;
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..24].copy_from_slice(&offset.to_le_bytes());
    b[24..28].copy_from_slice(&len.to_le_bytes());
    b[28..32].copy_from_slice(&epoch.to_le_bytes());
    b
}

/// A record's bytes from its header (without the checksum) and data.
fn encode_parts(header: &[u8; 32], data: &[u8]) -> Vec<u8> {
    // Header and data side by side first, hashed in one piece (fed apart,
    // blake3 hashes a 4 KiB record one block at a time, several times
    // slower), then the data moves up behind the checksum.
    let n = data.len();
    let mut b = Vec::with_capacity(HEADER_BYTES + n);
    b.extend_from_slice(header);
    b.extend_from_slice(data);
    let sum = checksum_of(&b);
    b.extend_from_slice(&[0u8; HEADER_BYTES - 32]);
    b.copy_within(32..32 + n, HEADER_BYTES);
    b[32..HEADER_BYTES].copy_from_slice(&sum.to_le_bytes());
    b
}

/// An epoch as records carry it: epochs count promotions, so `u32` is
/// plenty; one that does not fit is an error, never a wrap.
pub fn record_epoch(epoch: u64) -> Result<u32, JournalError> {
    u32::try_from(epoch).map_err(|_| JournalError::EpochTooLarge(epoch))
}

/// The checksum of a record whose header (32 bytes, without the checksum)
/// and data are given apart (rare uses; the hot paths hash them in one piece).
fn checksum(header: &[u8], data: &[u8]) -> u64 {
    let mut h = check_hasher();
    h.update(header);
    h.update(data);
    let out = h.finalize();
    u64::from_le_bytes(out.as_bytes()[..8].try_into().unwrap_or_default())
}

/// The checksum of header and data given in one piece: the same value as
/// [`checksum`], at blake3's SIMD speed.
fn checksum_of(header_and_data: &[u8]) -> u64 {
    let mut h = check_hasher();
    h.update(header_and_data);
    let out = h.finalize();
    u64::from_le_bytes(out.as_bytes()[..8].try_into().unwrap_or_default())
}

fn check_hasher() -> blake3::Hasher {
    // Deriving the context's key is a hash of its own: done once.
    static BASE: std::sync::LazyLock<blake3::Hasher> =
        std::sync::LazyLock::new(|| blake3::Hasher::new_derive_key(CHECK_CONTEXT));
    BASE.clone()
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error(
        "journal is full ({bytes} of {max} bytes); the volume falls back to dirty-chunk tracking"
    )]
    Full { bytes: u64, max: u64 },
    #[error("journal record of {0} bytes exceeds the record limit")]
    TooLarge(u32),
    #[error("journal has no record {0} (trimmed, or never written)")]
    Missing(u64),
    #[error("epoch {0} does not fit a journal record")]
    EpochTooLarge(u64),
    #[error("record {got} arrived where record {want} was expected")]
    OutOfOrder { got: u64, want: u64 },
    #[error(
        "journal {path} cannot be trusted since an earlier failure ({why}); it takes nothing more until it is reset"
    )]
    Failed { path: PathBuf, why: String },
}

impl JournalError {
    /// The OS error behind it, if any (ENOSPC stays ENOSPC for the client).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            JournalError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// What opening found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub records: u64,
    /// Bytes cut from the tail: a torn last write, or damage (then everything after it).
    pub cut_bytes: u64,
}

#[derive(Clone)]
struct Segment {
    first: u64,
    path: PathBuf,
    bytes: u64,
    /// How much of it an fsync made durable, and the record after that part.
    synced_bytes: u64,
    synced_next: u64,
    /// Where records start, about every [`INDEX_STRIDE`] bytes: shared with
    /// the views taken of the journal (entries are only added, or cut off
    /// past the end when the segment is cut back).
    index: SegmentIndex,
}

/// (record number, byte offset) pairs of a segment, in order.
#[derive(Clone, Default)]
struct SegmentIndex(Arc<std::sync::Mutex<Vec<(u64, u64)>>>);

impl SegmentIndex {
    fn from(entries: Vec<(u64, u64)>) -> SegmentIndex {
        SegmentIndex(Arc::new(std::sync::Mutex::new(entries)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, u64)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes record `seq` starting at `offset` if the last entry is a stride back.
    fn note(&self, seq: u64, offset: u64) {
        let mut v = self.lock();
        if v.last().is_none_or(|&(_, at)| offset >= at + INDEX_STRIDE) {
            v.push((seq, offset));
        }
    }

    /// The segment was cut back to `bytes`.
    fn cut(&self, bytes: u64) {
        self.lock().retain(|&(_, at)| at < bytes);
    }

    /// The last known record start at or before record `seq`.
    fn seek(&self, seq: u64) -> Option<(u64, u64)> {
        let v = self.lock();
        let i = v.partition_point(|&(s, _)| s <= seq);
        i.checked_sub(1).map(|i| v[i])
    }
}

pub struct Journal {
    dir: PathBuf,
    io: Arc<dyn Io>,
    segments: Vec<Segment>,
    /// Segments dropped (renamed out of the journal, see
    /// [`Journal::take_dropped`]) and not yet deleted.
    dropped: Vec<PathBuf>,
    /// Directory changes (segments created or removed) so far, and resets
    /// and rewinds so far: a [`SyncPlan`] records only what they left alone.
    dir_changes: u64,
    resets: u64,
    /// Fsyncs go one at a time ([`SyncPlan::run`] and [`Journal::sync`]),
    /// and a failed one is noted here at once, under the numbering it was
    /// for (`resets`): an fsync that succeeds after another failed (Linux
    /// reports a lost write once) then never calls durable what the failed
    /// one lost, even before the failure is recorded in `failed`.
    sync_serial: Arc<Mutex<()>>,
    sync_failed: Arc<Mutex<Option<(u64, String)>>>,
    file: Option<File>,
    /// Set when a write could not be rolled back or an fsync failed: what
    /// the segments hold is unknown, so nothing more is appended or called
    /// durable until [`Journal::reset`] (or [`Journal::rewind_to_synced`]).
    failed: Option<String>,
    next_seq: u64,
    bytes: u64,
    bytes_max: u64,
    incarnation: u64,
    /// A segment was created since the directory was last made durable.
    dir_dirty: bool,
    /// The epoch new records are written under.
    epoch: u32,
    /// The checksum of the last record appended since open (0: none yet).
    last_checksum: u64,
    /// The newest records as encoded (a primary's journal, for its stream).
    tail: Arc<Mutex<Tail>>,
}

/// The records appended last, as they were encoded, so that the stream
/// sends them (and a replica's applier writes them) without reading them
/// back from the segment and checking their checksums again (they never
/// left memory). At most `max` bytes of records; the numbers are
/// consecutive, and anything that drops or rewrites records empties it.
/// A record's bytes may share one buffer with the rest of its batch (a
/// replica's redo log keeps a batch as it came).
#[derive(Default)]
struct Tail {
    max: usize,
    bytes: usize,
    recs: VecDeque<(u64, Kept)>,
}

/// One record in memory: `range` of a buffer.
#[derive(Clone)]
struct Kept {
    buf: Arc<Vec<u8>>,
    range: std::ops::Range<usize>,
}

impl Kept {
    fn bytes(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }
}

impl Tail {
    fn push(&mut self, seq: u64, enc: Vec<u8>) {
        let n = enc.len();
        self.push_kept(
            seq,
            Kept {
                buf: Arc::new(enc),
                range: 0..n,
            },
        );
    }

    fn push_kept(&mut self, seq: u64, k: Kept) {
        if self.max == 0 {
            return;
        }
        if self.recs.back().is_some_and(|(last, _)| last + 1 != seq) {
            self.clear();
        }
        self.bytes += k.range.len();
        self.recs.push_back((seq, k));
        while self.bytes > self.max
            && let Some((_, e)) = self.recs.pop_front()
        {
            self.bytes -= e.range.len();
        }
    }

    fn clear(&mut self) {
        self.recs.clear();
        self.bytes = 0;
    }

    /// Drops the records up to `upto`.
    fn trim(&mut self, upto: u64) {
        while self.recs.front().is_some_and(|(seq, _)| *seq <= upto)
            && let Some((_, e)) = self.recs.pop_front()
        {
            self.bytes -= e.range.len();
        }
    }

    /// The records from `from` on, below `next_seq`, about `bytes_max`
    /// bytes and at most `records_max` of them (at least one); `None`
    /// unless `from` is here.
    fn read(
        &self,
        from: u64,
        next_seq: u64,
        bytes_max: u64,
        records_max: usize,
    ) -> Option<Vec<Kept>> {
        let first = self.recs.front()?.0;
        if from < first || from >= next_seq {
            return None;
        }
        // A view taken before a rewind may know of records no longer here.
        let at = usize::try_from(from - first)
            .ok()
            .filter(|&i| i < self.recs.len())?;
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for (seq, e) in self.recs.range(at..) {
            if *seq >= next_seq || bytes >= bytes_max || out.len() >= records_max {
                break;
            }
            bytes += e.range.len() as u64;
            out.push(e.clone());
        }
        (!out.is_empty()).then_some(out)
    }
}

fn lock_tail(t: &Mutex<Tail>) -> std::sync::MutexGuard<'_, Tail> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// Makes the directory's entries (created or removed files) durable.
fn sync_dir(fs: &dyn Io, dir: &Path) -> Result<(), JournalError> {
    fs.sync_dir(dir).map_err(io(dir, "fsync directory"))
}

impl Journal {
    /// Opens (or creates) the journal in `dir`, cutting a torn or damaged tail.
    pub fn open(dir: &Path, bytes_max: u64) -> Result<(Journal, Recovered), JournalError> {
        Self::open_with(dir, bytes_max, crate::fsio::global().clone())
    }

    /// [`Journal::open`] through the given I/O seam.
    pub fn open_with(
        dir: &Path,
        bytes_max: u64,
        fs: Arc<dyn Io>,
    ) -> Result<(Journal, Recovered), JournalError> {
        std::fs::create_dir_all(dir).map_err(io(dir, "create directory"))?;
        let mut firsts: Vec<(u64, PathBuf)> = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io(dir, "list"))? {
            let e = e.map_err(io(dir, "list"))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_suffix(".log")
                .and_then(|n| n.parse::<u64>().ok())
            {
                firsts.push((n, e.path()));
            } else if name.ends_with(DROPPED_SUFFIX) {
                // Dropped before a crash or a restart, not deleted yet: it
                // takes space, nothing more, if it cannot be deleted now.
                if let Err(err) = fs.remove(&e.path()) {
                    tracing::warn!(file = %e.path().display(), error = %err, "a dropped journal segment could not be deleted");
                }
            }
        }
        firsts.sort();
        // A newer, empty last segment after a gap is a reset that a crash
        // interrupted before it deleted the old segments: the reset wins.
        // Any other gap is damage, cut below (never the records before it:
        // a later segment's records cannot have been acknowledged while an
        // earlier one's were not synced, since `sync` goes in order).
        if let [.., (prev_first, prev), (last, path)] = &firsts[..]
            && std::fs::metadata(path).map(|m| m.len()).ok() == Some(0)
            && scan_segment(prev, *prev_first)?.3 + 1 < *last
        {
            for (_, p) in firsts.drain(..firsts.len() - 1) {
                fs.remove(&p).map_err(io(&p, "remove"))?;
            }
            sync_dir(&*fs, dir)?;
        }
        let incarnation = Self::incarnation_of(&*fs, dir, firsts.is_empty())?;
        let mut j = Journal {
            dir: dir.to_path_buf(),
            io: fs.clone(),
            segments: Vec::new(),
            dropped: Vec::new(),
            dir_changes: 0,
            resets: 0,
            sync_serial: Arc::default(),
            sync_failed: Arc::default(),
            file: None,
            failed: None,
            next_seq: 1,
            bytes: 0,
            bytes_max,
            incarnation,
            dir_dirty: false,
            epoch: 0,
            last_checksum: 0,
            tail: Arc::default(),
        };
        let mut rec = Recovered::default();
        let mut damaged = false;
        for (first, path) in firsts {
            if damaged {
                // Everything after damage is unusable: the sequence would have a hole.
                let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                rec.cut_bytes += len;
                fs.remove(&path).map_err(io(&path, "remove"))?;
                j.dir_dirty = true;
                continue;
            }
            if !j.segments.is_empty() && first != j.next_seq {
                damaged = true;
                rec.cut_bytes += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                fs.remove(&path).map_err(io(&path, "remove"))?;
                j.dir_dirty = true;
                continue;
            }
            if j.segments.is_empty() {
                j.next_seq = first;
            }
            let (good, count, total, last, index) = scan_segment(&path, first)?;
            rec.records += count;
            if good < total {
                rec.cut_bytes += total - good;
                let f = fs.open_rw(&path, false).map_err(io(&path, "open"))?;
                fs.set_len(&f, &path, good).map_err(io(&path, "truncate"))?;
                fs.sync(&f, &path).map_err(io(&path, "fsync"))?;
                damaged = true;
            }
            j.next_seq = last + 1;
            j.bytes += good;
            j.segments.push(Segment {
                first,
                path,
                bytes: good,
                synced_bytes: good,
                synced_next: last + 1,
                index: SegmentIndex::from(index),
            });
        }
        if j.dir_dirty {
            sync_dir(&*fs, dir)?;
            j.dir_dirty = false;
        }
        Ok((j, rec))
    }

    /// The directory's incarnation id; a directory without segments (new, or
    /// emptied behind the journal's back, so its numbering starts again)
    /// gets a new one.
    fn incarnation_of(fs: &dyn Io, dir: &Path, fresh: bool) -> Result<u64, JournalError> {
        let path = dir.join(INCARNATION_FILE);
        if !fresh
            && let Ok(text) = std::fs::read_to_string(&path)
            && let Ok(id) = u64::from_str_radix(text.trim(), 16)
        {
            return Ok(id);
        }
        let id: u64 = rand::random::<u64>().max(1);
        crate::fsio::write_atomic(fs, &path, format!("{id:016x}\n").as_bytes())
            .map_err(io(&path, "write"))?;
        Ok(id)
    }

    /// Identifies this journal's numbering: records are (incarnation, seq).
    /// Unix seconds of the newest change to the journal's files.
    pub fn modified_unix(&self) -> Option<u64> {
        std::fs::read_dir(&self.dir)
            .ok()?
            .flatten()
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .max()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs())
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The sequence number the next append gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The oldest record still held (equal to `next_seq` when empty).
    pub fn first_seq(&self) -> u64 {
        self.segments
            .first()
            .map(|s| s.first)
            .unwrap_or(self.next_seq)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn bytes_max(&self) -> u64 {
        self.bytes_max
    }

    /// Keeps the newest `max` bytes of records in memory as encoded, for
    /// [`JournalView::read_raw_from`] and [`JournalView::read_from`] (a
    /// primary's journal for its stream; a replica's redo log for its
    /// applier, which drops what it applied with [`Journal::forget_kept`]).
    pub fn keep_tail(&mut self, max: usize) {
        let mut t = lock_tail(&self.tail);
        t.max = max;
        t.clear();
    }

    /// The epoch records appended from now on carry.
    pub fn set_epoch(&mut self, epoch: u32) {
        self.epoch = epoch;
    }

    /// The checksum of the last record appended since open (0: none).
    pub fn last_checksum(&self) -> u64 {
        self.last_checksum
    }

    /// Appends a record (its `seq` is assigned here, its epoch is the
    /// journal's) and returns the sequence. Not durable until [`Journal::sync`].
    pub fn append(
        &mut self,
        kind: Kind,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<u64, JournalError> {
        self.append_at(self.epoch, kind, offset, len, data)
    }

    fn append_at(
        &mut self,
        epoch: u32,
        kind: Kind,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<u64, JournalError> {
        if len > RECORD_DATA_MAX || (kind == Kind::Write && data.len() != len as usize) {
            return Err(JournalError::TooLarge(len));
        }
        let seq = self.next_seq;
        let data = if kind == Kind::Write { data } else { &[] };
        let enc = encode_parts(&header_of(seq, kind, offset, len, epoch), data);
        self.write_encoded(&enc, &[0])?;
        lock_tail(&self.tail).push(seq, enc);
        Ok(seq)
    }

    /// Appends records already encoded and checked (a replica's redo log
    /// takes a batch from its primary as it came, in one write, without
    /// encoding each record again): `buf[base..]` holds them, `starts` are
    /// where each begins in it, and they must be numbered on from the last
    /// one here. The batch's buffer is kept in memory with them (when the
    /// journal keeps a tail). Returns the last record's number.
    pub fn append_encoded(
        &mut self,
        buf: &Arc<Vec<u8>>,
        base: usize,
        starts: &[usize],
    ) -> Result<u64, JournalError> {
        let want = self.next_seq;
        let enc = buf.get(base..).unwrap_or_default();
        // Where each record lies in `enc`: checked here, kept below.
        let ranges: Vec<std::ops::Range<usize>> = starts
            .iter()
            .enumerate()
            .map(|(i, &st)| st..starts.get(i + 1).copied().unwrap_or(enc.len()))
            .collect();
        for (i, r) in ranges.iter().enumerate() {
            let head = enc.get(r.clone()).and_then(Head::parse);
            let got = head.as_ref().map(|h| h.seq);
            if got != Some(want + i as u64)
                || head.is_some_and(|h| HEADER_BYTES as u64 + h.data_len != r.len() as u64)
            {
                return Err(JournalError::OutOfOrder {
                    got: got.unwrap_or(0),
                    want: want + i as u64,
                });
            }
        }
        if starts.first() != Some(&0) {
            return Err(JournalError::OutOfOrder { got: 0, want });
        }
        self.write_encoded(enc, starts)?;
        let mut t = lock_tail(&self.tail);
        if t.max == 0 {
            return Ok(self.next_seq - 1);
        }
        // Kept in the batch's buffer only when these records are most of
        // it: records sent again (below `base`) or spare capacity would
        // stay in memory with them, uncounted.
        let (buf, base) = if enc.len().saturating_mul(2) < buf.capacity() {
            (Arc::new(enc.to_vec()), 0)
        } else {
            (buf.clone(), base)
        };
        for (i, r) in ranges.into_iter().enumerate() {
            t.push_kept(
                want + i as u64,
                Kept {
                    buf: buf.clone(),
                    range: base + r.start..base + r.end,
                },
            );
        }
        Ok(self.next_seq - 1)
    }

    /// Drops the records up to `upto` from memory (not from the segments):
    /// a replica's applier wrote them into the image and reads them no more.
    pub fn forget_kept(&mut self, upto: u64) {
        lock_tail(&self.tail).trim(upto);
    }

    /// Writes encoded records, numbered on from `next_seq`, at the end of
    /// the newest segment (a new one past `SEGMENT_BYTES`).
    fn write_encoded(&mut self, enc: &[u8], starts: &[usize]) -> Result<(), JournalError> {
        if let Some(why) = &self.failed {
            return Err(self.failed_error(why));
        }
        if self.bytes + enc.len() as u64 > self.bytes_max {
            return Err(JournalError::Full {
                bytes: self.bytes,
                max: self.bytes_max,
            });
        }
        if self.file.is_none()
            || self
                .segments
                .last()
                .is_none_or(|s| s.bytes >= SEGMENT_BYTES)
        {
            let path = self.dir.join(format!("{:020}.log", self.next_seq));
            let f = self.io.open_rw(&path, true).map_err(io(&path, "create"))?;
            if self.segments.last().is_none_or(|s| s.path != path) {
                // A new segment: nothing of an older numbering stays in it.
                self.cut_to_empty(&f, &path)?;
                self.segments.push(Segment {
                    first: self.next_seq,
                    path: path.clone(),
                    bytes: 0,
                    synced_bytes: 0,
                    synced_next: self.next_seq,
                    index: SegmentIndex::default(),
                });
                self.dir_dirty = true;
                self.dir_changes += 1;
            }
            self.file = Some(f);
        }
        let seg = self
            .segments
            .last_mut()
            .ok_or(JournalError::Missing(self.next_seq))?;
        let f = self
            .file
            .as_ref()
            .ok_or(JournalError::Missing(self.next_seq))?;
        if let Err(e) = self.io.write_at(f, &seg.path, enc, seg.bytes) {
            // Part of it may have landed (ENOSPC, a torn write): cut it
            // off, so that the next record follows the last whole one. If
            // even that fails, the journal takes nothing more until reset.
            if let Err(t) = self.io.set_len(f, &seg.path, seg.bytes) {
                self.failed = Some(format!(
                    "a failed write could not be cut off ({e}; truncate: {t})"
                ));
            }
            return Err(JournalError::Io {
                path: seg.path.clone(),
                op: "write",
                source: e,
            });
        }
        for (i, &st) in starts.iter().enumerate() {
            seg.index
                .note(self.next_seq + i as u64, seg.bytes + st as u64);
        }
        seg.bytes += enc.len() as u64;
        self.bytes += enc.len() as u64;
        self.next_seq += starts.len() as u64;
        if let Some(&last) = starts.last() {
            self.last_checksum = enc
                .get(last + 32..last + HEADER_BYTES)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .unwrap_or_default();
        }
        Ok(())
    }

    fn failed_error(&self, why: &str) -> JournalError {
        JournalError::Failed {
            path: self.dir.clone(),
            why: why.to_string(),
        }
    }

    /// Why the journal takes nothing more (a write that could not be cut
    /// off, a failed fsync), until it is reset or rewound.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Makes every appended record durable, in every segment that has any
    /// not yet synced, and the names of the segments created or removed.
    /// A failed fsync is sticky: the records it covered may be gone from
    /// the disk whatever a later fsync says, so the journal fails every
    /// append and sync until it is reset or rewound (invariant 7).
    pub fn sync(&mut self) -> Result<(), JournalError> {
        let serial = self.sync_serial.clone();
        let _one_at_a_time = serial.lock().unwrap_or_else(|p| p.into_inner());
        self.take_sync_failure();
        if let Some(why) = &self.failed {
            return Err(self.failed_error(why));
        }
        let last = self.segments.len().saturating_sub(1);
        for i in 0..self.segments.len() {
            let seg = &self.segments[i];
            if seg.synced_bytes == seg.bytes {
                continue;
            }
            let r = match (&self.file, i == last) {
                (Some(f), true) => self.io.sync(f, &seg.path),
                _ => self
                    .io
                    .open_rw(&seg.path, false)
                    .and_then(|f| self.io.sync(&f, &seg.path)),
            };
            if let Err(e) = r {
                self.failed = Some(format!("fsync of {} failed: {e}", seg.path.display()));
                return Err(JournalError::Io {
                    path: seg.path.clone(),
                    op: "fsync",
                    source: e,
                });
            }
            let next = self.seg_end(i);
            let seg = &mut self.segments[i];
            seg.synced_bytes = seg.bytes;
            seg.synced_next = next;
        }
        if self.dir_dirty {
            if let Err(e) = sync_dir(&*self.io, &self.dir) {
                self.failed = Some(e.to_string());
                return Err(e);
            }
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// [`Journal::sync`] in three steps, so that the caller's lock is not
    /// held while the disk works: this plans it (under the lock), the
    /// plan's [`SyncPlan::run`] fsyncs (without it), and
    /// [`Journal::finish_sync`] records what it made durable (under it
    /// again). Records appended meanwhile are not called durable by it.
    pub fn plan_sync(&mut self) -> Result<SyncPlan, JournalError> {
        self.take_sync_failure();
        if let Some(why) = &self.failed {
            return Err(self.failed_error(why));
        }
        let last = self.segments.len().saturating_sub(1);
        let mut files = Vec::new();
        for i in 0..self.segments.len() {
            let seg = &self.segments[i];
            if seg.synced_bytes == seg.bytes {
                continue;
            }
            let f = match (&self.file, i == last) {
                (Some(f), true) => f.try_clone(),
                _ => self.io.open_rw(&seg.path, false),
            };
            let f = match f {
                Ok(f) => f,
                Err(e) => {
                    // As a failed fsync: what the segment holds is unknown.
                    self.failed = Some(format!("fsync of {} failed: {e}", seg.path.display()));
                    return Err(JournalError::Io {
                        path: seg.path.clone(),
                        op: "fsync",
                        source: e,
                    });
                }
            };
            files.push(PlannedSync {
                path: seg.path.clone(),
                file: f,
                bytes: seg.bytes,
                next: self.seg_end(i),
            });
        }
        Ok(SyncPlan {
            io: self.io.clone(),
            dir: self.dir.clone(),
            files,
            dir_changes: self.dir_dirty.then_some(self.dir_changes),
            resets: self.resets,
            serial: self.sync_serial.clone(),
            failed: self.sync_failed.clone(),
        })
    }

    /// A failure a [`SyncPlan::run`] noted for this numbering becomes the
    /// journal's own.
    fn take_sync_failure(&mut self) {
        let noted = self
            .sync_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((resets, why)) = noted
            && resets == self.resets
            && self.failed.is_none()
        {
            self.failed = Some(why);
        }
    }

    /// Records what `plan` made durable, `result` being its run's. A
    /// failure is sticky, as in [`Journal::sync`], and so is one recorded
    /// since the plan: this then fails too. A reset or rewind since the
    /// plan leaves nothing to record (its segments are gone).
    pub fn finish_sync(
        &mut self,
        plan: &SyncPlan,
        result: Result<(), JournalError>,
    ) -> Result<(), JournalError> {
        if plan.resets != self.resets {
            return Ok(());
        }
        self.take_sync_failure();
        if let Err(e) = result {
            if self.failed.is_none() {
                self.failed = Some(e.to_string());
            }
            return Err(e);
        }
        if let Some(why) = &self.failed {
            return Err(self.failed_error(why));
        }
        for p in &plan.files {
            if let Some(seg) = self.segments.iter_mut().find(|s| s.path == p.path) {
                seg.synced_bytes = seg.synced_bytes.max(p.bytes);
                seg.synced_next = seg.synced_next.max(p.next);
            }
        }
        if plan.dir_changes == Some(self.dir_changes) {
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// After a failed append or fsync (a replica's redo log): cuts every
    /// segment back to what an fsync made durable and goes on from there,
    /// so that the records after it are written (and synced) again. Never
    /// for a primary's journal, whose records may already be at the DR
    /// site under these numbers: that one is reset.
    pub fn rewind_to_synced(&mut self) -> Result<(), JournalError> {
        self.file = None;
        lock_tail(&self.tail).clear();
        let Some(cut) = self.segments.iter().position(|s| s.synced_bytes < s.bytes) else {
            self.failed = None;
            return Ok(());
        };
        // Segments are cut from here on: a plan made before covers them no more.
        self.resets += 1;
        // Fsyncs go in order and stop at the first failure: every segment
        // after the first one not synced holds nothing synced either.
        for seg in self.segments.drain(cut + 1..) {
            self.bytes -= seg.bytes;
            self.io.remove(&seg.path).map_err(io(&seg.path, "remove"))?;
            self.dir_dirty = true;
            self.dir_changes += 1;
        }
        let seg = &mut self.segments[cut];
        let f = self
            .io
            .open_rw(&seg.path, false)
            .map_err(io(&seg.path, "open"))?;
        self.io
            .set_len(&f, &seg.path, seg.synced_bytes)
            .map_err(io(&seg.path, "truncate"))?;
        // The cut itself durable: records that reappeared after a power cut
        // would collide with the ones written again from `synced_next`.
        self.io
            .sync(&f, &seg.path)
            .map_err(io(&seg.path, "fsync"))?;
        sync_dir(&*self.io, &self.dir)?;
        self.dir_dirty = false;
        self.bytes -= seg.bytes - seg.synced_bytes;
        seg.bytes = seg.synced_bytes;
        seg.index.cut(seg.bytes);
        self.next_seq = seg.synced_next;
        self.failed = None;
        Ok(())
    }

    /// The number after the last record of segment `i`.
    fn seg_end(&self, i: usize) -> u64 {
        self.segments
            .get(i + 1)
            .map(|s| s.first)
            .unwrap_or(self.next_seq)
    }

    /// Records from `from` on, at most `bytes_max` bytes of them (at least one).
    pub fn read_from(&self, from: u64, bytes_max: u64) -> Result<Vec<Record>, JournalError> {
        self.view().read_from(from, bytes_max)
    }

    /// What is in the journal now, to read without holding the journal
    /// (appends may go on; only the owner of the view trims).
    pub fn view(&self) -> JournalView {
        JournalView {
            segments: self.segments.clone(),
            next_seq: self.next_seq,
            tail: self.tail.clone(),
        }
    }

    /// Appends a record that already has its sequence number and epoch (a
    /// replica's redo log keeps the primary's). It must be the next one.
    pub fn append_record(&mut self, rec: &Record) -> Result<u64, JournalError> {
        if rec.seq != self.next_seq {
            return Err(JournalError::OutOfOrder {
                got: rec.seq,
                want: self.next_seq,
            });
        }
        self.append_at(rec.epoch, rec.kind, rec.offset, rec.len, &rec.data)
    }

    /// Drops every record and goes on at `next_seq`; an empty segment named
    /// after it keeps the number across a restart. The primary's journal
    /// only ever moves forward; a replica's redo log follows its primary's
    /// numbering wherever a resync restarts it.
    pub fn reset(&mut self, next_seq: u64) -> Result<(), JournalError> {
        self.reset_with(next_seq, true)
    }

    fn reset_with(&mut self, next_seq: u64, durable: bool) -> Result<(), JournalError> {
        let next_seq = next_seq.max(1);
        lock_tail(&self.tail).clear();
        // The new, empty segment first (durable in the directory when asked):
        // a crash before the old ones are gone leaves it as the reset's mark.
        let path = self.dir.join(format!("{next_seq:020}.log"));
        self.file = None;
        let f = self.io.open_rw(&path, true).map_err(io(&path, "create"))?;
        // A file of that name may hold records of an older numbering (a
        // redo log following a recreated journal): the reset starts it empty.
        self.cut_to_empty(&f, &path)?;
        if durable {
            self.io.sync(&f, &path).map_err(io(&path, "fsync"))?;
            sync_dir(&*self.io, &self.dir)?;
        }
        // The old segments go from here on: a plan made before covers
        // them no more (before this, a failure leaves them as they were).
        self.resets += 1;
        // Deleted here, not dropped for later (see `drop_file`): resets
        // are rare, and their callers (a fallback on a full journal, a
        // resync) want the space back at once.
        for seg in self.segments.drain(..) {
            if seg.path != path {
                self.io.remove(&seg.path).map_err(io(&seg.path, "remove"))?;
            }
        }
        // The removals (and, when not durable yet, the new name) are made
        // durable by the next sync; a power cut before it brings old
        // segments back, which `open` recognises as leftovers.
        self.dir_dirty = true;
        self.dir_changes += 1;
        self.bytes = 0;
        self.next_seq = next_seq;
        self.segments.push(Segment {
            first: next_seq,
            path,
            bytes: 0,
            synced_bytes: 0,
            synced_next: next_seq,
            index: SegmentIndex::default(),
        });
        self.file = Some(f);
        // Whatever failed before is gone with the old segments.
        self.failed = None;
        Ok(())
    }

    /// Empties a segment's file, if it holds anything. A file that is
    /// already empty is left alone: on ext4, a file cut to nothing and then
    /// written is written back when it is closed (for editors that replace
    /// a file by truncating it), and a segment is closed under its volume's
    /// lock when the next one opens: every 64 MiB, 64 MiB submitted there,
    /// 80 ms during which no write of the volume went on.
    fn cut_to_empty(&self, f: &File, path: &Path) -> Result<(), JournalError> {
        if f.metadata().map_or(1, |m| m.len()) > 0 {
            self.io.set_len(f, path, 0).map_err(io(path, "truncate"))?;
        }
        Ok(())
    }

    /// Takes a trimmed segment's file out of the journal: renamed, which is quick
    /// and leaves the journal's directory as a deletion would (made durable
    /// by the caller's directory fsync, in order). Deleting a 64 MiB file
    /// frees its pages and blocks, 25 ms on these machines: the caller does
    /// it away from the volume's lock ([`Journal::take_dropped`]).
    fn drop_file(&mut self, path: &Path) -> Result<(), JournalError> {
        let mut to = path.as_os_str().to_owned();
        to.push(DROPPED_SUFFIX);
        let to = PathBuf::from(to);
        self.io.rename(path, &to).map_err(io(path, "rename"))?;
        self.dropped.push(to);
        Ok(())
    }

    /// The segments dropped since the last call, to delete once the
    /// caller's lock is released (they are deleted when the returned value
    /// is dropped; a restart deletes any left).
    pub fn take_dropped(&mut self) -> Dropped {
        Dropped {
            io: self.io.clone(),
            paths: std::mem::take(&mut self.dropped),
        }
    }

    /// Drops the segments whose records are all at or below `upto`.
    pub fn trim(&mut self, upto: u64) -> Result<(), JournalError> {
        lock_tail(&self.tail).trim(upto);
        while self.segments.len() > 1 && self.segments[1].first <= upto + 1 {
            let seg = self.segments.remove(0);
            self.bytes -= seg.bytes;
            self.drop_file(&seg.path)?;
            // Made durable at once (once per segment, rare): a power cut
            // must not bring back an old segment before a gap.
            sync_dir(&*self.io, &self.dir)?;
        }
        // The last segment goes too when every record in it is acknowledged;
        // an empty one named after the next record keeps the numbering
        // across a restart (a journal that started again at 1 would not
        // match what the DR side holds).
        if self.segments.len() == 1 && upto + 1 >= self.next_seq && self.segments[0].bytes > 0 {
            self.reset_with(self.next_seq, false)?;
        }
        Ok(())
    }
}

/// An fsync of the journal planned by [`Journal::plan_sync`].
pub struct SyncPlan {
    io: Arc<dyn Io>,
    dir: PathBuf,
    files: Vec<PlannedSync>,
    /// The directory's fsync too, with the changes counted when planned.
    dir_changes: Option<u64>,
    resets: u64,
    serial: Arc<Mutex<()>>,
    failed: Arc<Mutex<Option<(u64, String)>>>,
}

struct PlannedSync {
    path: PathBuf,
    file: File,
    /// Bytes (and the record after them) the fsync makes durable.
    bytes: u64,
    next: u64,
}

impl SyncPlan {
    /// The fsyncs: every segment with bytes not yet durable, then the
    /// directory if it changed; one fsync of the journal at a time, and a
    /// failure noted before the next (see `Journal::sync_serial`).
    pub fn run(&self) -> Result<(), JournalError> {
        let _one_at_a_time = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let r = self.fsyncs();
        if let Err(e) = &r {
            let mut noted = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            // Never over a newer numbering's note (a plan of an older one
            // may run late).
            if noted
                .as_ref()
                .is_none_or(|(resets, _)| *resets < self.resets)
            {
                *noted = Some((self.resets, e.to_string()));
            }
        }
        r
    }

    fn fsyncs(&self) -> Result<(), JournalError> {
        for p in &self.files {
            self.io
                .sync(&p.file, &p.path)
                .map_err(|e| JournalError::Io {
                    path: p.path.clone(),
                    op: "fsync",
                    source: e,
                })?;
        }
        if self.dir_changes.is_some() {
            sync_dir(&*self.io, &self.dir)?;
        }
        Ok(())
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        drop(self.take_dropped());
    }
}

/// What a dropped segment's file is renamed to (its name, then this).
const DROPPED_SUFFIX: &str = ".dropped";

/// Files of dropped segments, deleted when this is dropped.
#[must_use = "dropping it deletes the files: do that away from the journal's lock"]
pub struct Dropped {
    io: Arc<dyn Io>,
    paths: Vec<PathBuf>,
}

impl Drop for Dropped {
    fn drop(&mut self) {
        for p in self.paths.drain(..) {
            if let Err(e) = self.io.remove(&p) {
                // It takes space until the journal is opened again.
                tracing::warn!(file = %p.display(), error = %e, "a dropped journal segment could not be deleted");
            }
        }
    }
}

/// A snapshot of the journal's segments, read without the journal's lock.
pub struct JournalView {
    segments: Vec<Segment>,
    next_seq: u64,
    tail: Arc<Mutex<Tail>>,
}

/// Records as they are stored (and sent): every checksum checked.
pub struct RawRecords {
    /// The encoded records, one after the other.
    pub bytes: Vec<u8>,
    /// The last record's number (none: no record).
    pub last: Option<u64>,
}

impl JournalView {
    /// Records from `from` on, at most `bytes_max` bytes of them (at least one).
    pub fn read_from(&self, from: u64, bytes_max: u64) -> Result<Vec<Record>, JournalError> {
        Ok(self
            .read_in_place(from, bytes_max)?
            .iter()
            .map(|r| r.to_record())
            .collect())
    }

    /// As [`JournalView::read_from`], without copying each record out:
    /// the records still in memory where they are (a replica's applier
    /// writes them into its image from there), the others in the buffer
    /// they were read into.
    pub fn read_in_place(&self, from: u64, bytes_max: u64) -> Result<Records, JournalError> {
        if from < self.next_seq
            && let Some(kept) =
                lock_tail(&self.tail).read(from, self.next_seq, bytes_max, usize::MAX)
        {
            return Ok(Records(kept));
        }
        let raw = self.read_raw_from(from, bytes_max, usize::MAX)?;
        let n = raw.bytes.len();
        Ok(Records(vec![Kept {
            buf: Arc::new(raw.bytes),
            range: 0..n,
        }]))
    }

    /// Records from `from` on as stored, at most `bytes_max` bytes of them
    /// (at least one), every checksum checked: what the stream sends,
    /// without decoding and encoding each record again.
    /// At most `records_max` records (a batch's limit: zero-length records
    /// take 40 bytes each, so `bytes_max` alone lets hundreds of thousands
    /// through).
    pub fn read_raw_from(
        &self,
        from: u64,
        bytes_max: u64,
        records_max: usize,
    ) -> Result<RawRecords, JournalError> {
        let first = self
            .segments
            .first()
            .map(|s| s.first)
            .unwrap_or(self.next_seq);
        let mut out = RawRecords {
            bytes: Vec::new(),
            last: None,
        };
        if from >= self.next_seq {
            return Ok(out);
        }
        if from < first {
            return Err(JournalError::Missing(from));
        }
        // Still in memory: as encoded, without a read or a checksum.
        let kept = lock_tail(&self.tail).read(from, self.next_seq, bytes_max, records_max.max(1));
        if let Some(recs) = kept {
            let mut bytes = Vec::with_capacity(recs.iter().map(|e| e.range.len()).sum());
            for e in &recs {
                bytes.extend_from_slice(e.bytes());
            }
            out.bytes = bytes;
            out.last = Some(from + recs.len() as u64 - 1);
            return Ok(out);
        }
        let start = self
            .segments
            .iter()
            .rposition(|s| s.first <= from)
            .unwrap_or(0);
        let mut count = 0usize;
        for (i, seg) in self.segments[start..].iter().enumerate() {
            let mut file = File::open(&seg.path).map_err(io(&seg.path, "open"))?;
            let mut at = 0u64;
            // Reading from the middle of the first segment: start at the
            // last record the index knows at or before `from`.
            if i == 0
                && let Some((_, offset)) = seg.index.seek(from)
                && offset < seg.bytes
            {
                file.seek(SeekFrom::Start(offset))
                    .map_err(io(&seg.path, "seek"))?;
                at = offset;
            }
            let mut f = std::io::BufReader::with_capacity(READ_BUFFER_BYTES, file);
            while at < seg.bytes {
                let mark = out.bytes.len();
                let Some((seq, bytes)) = read_raw(&mut f, seg.bytes - at, &mut out.bytes)? else {
                    break;
                };
                at += bytes;
                if seq < from {
                    out.bytes.truncate(mark);
                    continue;
                }
                if seq >= self.next_seq {
                    out.bytes.truncate(mark);
                    return Ok(out);
                }
                out.last = Some(seq);
                count += 1;
                if out.bytes.len() as u64 >= bytes_max || count >= records_max {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }
}

/// What [`check_records`] tells of one record of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordInfo {
    pub seq: u64,
    pub kind: Kind,
    pub offset: u64,
    pub len: u32,
    pub epoch: u32,
    /// Where the record begins in the batch.
    pub start: usize,
}

/// Checks records sent by the peer as [`decode_records`] does (magic,
/// lengths, checksum, at most `count_max`) without copying their data out:
/// the batch is then appended as it came ([`Journal::append_encoded`]).
pub fn check_records(bytes: &[u8], count_max: usize) -> Result<Vec<RecordInfo>, String> {
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        if out.len() >= count_max {
            return Err(format!("more than {count_max} records in one batch"));
        }
        let damaged = || format!("record {} of the batch is damaged or torn", out.len() + 1);
        let head = bytes
            .get(at..at + HEADER_BYTES)
            .and_then(Head::parse)
            .ok_or_else(damaged)?;
        let end = (at + HEADER_BYTES)
            .checked_add(head.data_len as usize)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(damaged)?;
        scratch.clear();
        scratch.extend_from_slice(&bytes[at..at + 32]);
        scratch.extend_from_slice(&bytes[at + HEADER_BYTES..end]);
        if checksum_of(&scratch) != head.sum {
            return Err(damaged());
        }
        out.push(RecordInfo {
            seq: head.seq,
            kind: head.kind,
            offset: head.offset,
            len: head.len,
            epoch: head.epoch,
            start: at,
        });
        at = end;
    }
    Ok(out)
}

/// Decodes records sent by the peer, every one checked (magic, lengths,
/// checksum) before it is trusted; at most `count_max` of them.
pub fn decode_records(mut bytes: &[u8], count_max: usize) -> Result<Vec<Record>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if out.len() >= count_max {
            return Err(format!("more than {count_max} records in one batch"));
        }
        let left = bytes.len() as u64;
        let Some(rec) = read_record(&mut bytes, left).map_err(|e| e.to_string())? else {
            return Err(format!(
                "record {} of the batch is damaged or torn",
                out.len() + 1
            ));
        };
        out.push(rec);
    }
    Ok(out)
}

/// A record's header, parsed and its lengths checked.
struct Head {
    seq: u64,
    kind: Kind,
    offset: u64,
    len: u32,
    epoch: u32,
    sum: u64,
    data_len: u64,
}

impl Head {
    fn parse(h: &[u8]) -> Option<Head> {
        let word = |r: std::ops::Range<usize>| -> u64 {
            let mut b = [0u8; 8];
            b[..r.len()].copy_from_slice(&h[r]);
            u64::from_le_bytes(b)
        };
        if h.len() < HEADER_BYTES || word(0..4) != MAGIC as u64 {
            return None;
        }
        let kind = Kind::from_u8(h[4])?;
        let len = word(24..28) as u32;
        if len > RECORD_DATA_MAX {
            return None;
        }
        Some(Head {
            seq: word(8..16),
            kind,
            offset: word(16..24),
            len,
            epoch: word(28..32) as u32,
            sum: word(32..40),
            data_len: if kind == Kind::Write { len as u64 } else { 0 },
        })
    }

    /// The record this header starts, with `data` (checked by the caller).
    fn with<'a>(&self, data: &'a [u8]) -> RecordRef<'a> {
        RecordRef {
            seq: self.seq,
            kind: self.kind,
            offset: self.offset,
            len: self.len,
            epoch: self.epoch,
            checksum: self.sum,
            data,
        }
    }
}

/// Reads one record and appends it, as stored, to `out`; checks every
/// length before allocating and the checksum before keeping it. Returns
/// its number and size, or `None` at a torn or damaged record (`out` as
/// it was).
fn read_raw<R: Read>(
    f: &mut R,
    left: u64,
    out: &mut Vec<u8>,
) -> Result<Option<(u64, u64)>, JournalError> {
    if left < HEADER_BYTES as u64 {
        return Ok(None);
    }
    let mut h = [0u8; HEADER_BYTES];
    if f.read_exact(&mut h).is_err() {
        return Ok(None);
    }
    let Some(head) = Head::parse(&h) else {
        return Ok(None);
    };
    let n = head.data_len as usize;
    if head.data_len > left - HEADER_BYTES as u64 {
        return Ok(None);
    }
    // Header and data side by side, hashed in one piece; then the data
    // moves up behind the checksum (as in `Record::encode`).
    let start = out.len();
    out.extend_from_slice(&h[..32]);
    out.resize(start + 32 + n, 0);
    if f.read_exact(&mut out[start + 32..]).is_err() || checksum_of(&out[start..]) != head.sum {
        out.truncate(start);
        return Ok(None);
    }
    out.extend_from_slice(&h[32..HEADER_BYTES]);
    out.copy_within(start + 32..start + 32 + n, start + HEADER_BYTES);
    out[start + 32..start + HEADER_BYTES].copy_from_slice(&h[32..HEADER_BYTES]);
    Ok(Some((head.seq, (HEADER_BYTES + n) as u64)))
}

/// Reads one record, checking every length before allocating; `None` at a
/// torn or damaged record.
fn read_record<R: Read>(f: &mut R, left: u64) -> Result<Option<Record>, JournalError> {
    let mut buf = Vec::new();
    if read_raw(f, left, &mut buf)?.is_none() {
        return Ok(None);
    }
    let Some(head) = Head::parse(&buf) else {
        return Ok(None);
    };
    let mut rec = head.with(&[]).to_record();
    buf.drain(..HEADER_BYTES);
    rec.data = buf;
    Ok(Some(rec))
}

/// What a scan of a segment found: bytes of good records, records, file
/// bytes, last seq, and the segment's index.
type Scanned = (u64, u64, u64, u64, Vec<(u64, u64)>);

/// Scans a segment from its start.
fn scan_segment(path: &Path, first: u64) -> Result<Scanned, JournalError> {
    let mut f = File::open(path).map_err(io(path, "open"))?;
    let total = f.seek(SeekFrom::End(0)).map_err(io(path, "seek"))?;
    f.seek(SeekFrom::Start(0)).map_err(io(path, "seek"))?;
    let mut f = std::io::BufReader::with_capacity(READ_BUFFER_BYTES, f);
    let (mut good, mut count, mut expect) = (0u64, 0u64, first);
    let mut index: Vec<(u64, u64)> = Vec::new();
    while let Some(rec) = read_record(&mut f, total - good)? {
        if rec.seq != expect {
            break;
        }
        if index
            .last()
            .is_none_or(|&(_, at)| good >= at + INDEX_STRIDE)
        {
            index.push((rec.seq, good));
        }
        good += rec.bytes();
        count += 1;
        expect += 1;
    }
    Ok((good, count, total, expect - 1, index))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsio::FaultyIo;
    use std::fs::OpenOptions;
    use std::io::Write;

    fn faulty(d: &Path, rules: &str) -> (Journal, Arc<FaultyIo>) {
        let io = Arc::new(FaultyIo::new(false));
        io.set_rules(rules).unwrap();
        let (j, _) = Journal::open_with(d, 1 << 30, io.clone()).unwrap();
        (j, io)
    }

    #[test]
    fn the_stream_reads_the_newest_records_from_memory_as_the_segment_holds_them() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut kept, _) = Journal::open(da.path(), 1 << 30).unwrap();
        let (mut plain, _) = Journal::open(db.path(), 1 << 30).unwrap();
        kept.keep_tail(10 * (HEADER_BYTES + 1024));
        for j in [&mut kept, &mut plain] {
            for i in 0..20u64 {
                j.append(Kind::Write, i * 1024, 1024, &[i as u8; 1024])
                    .unwrap();
            }
        }
        let raw = |j: &Journal, from, max| {
            let r = j.view().read_raw_from(from, max, usize::MAX).unwrap();
            (r.bytes, r.last)
        };
        // From memory (the last ten) and from the segment (older), alike.
        for (from, max) in [
            (15, u64::MAX),
            (11, 3000),
            (20, 1),
            (3, u64::MAX),
            (10, 2000),
        ] {
            assert_eq!(raw(&kept, from, max), raw(&plain, from, max), "from {from}");
        }
        assert_eq!(
            lock_tail(&kept.tail)
                .read(11, 21, u64::MAX, usize::MAX)
                .unwrap()
                .len(),
            10
        );
        assert!(
            lock_tail(&kept.tail)
                .read(10, 21, u64::MAX, usize::MAX)
                .is_none()
        );
        // A batch's record limit holds, from memory and from the segment.
        for from in [3, 15] {
            for j in [&kept, &plain] {
                let r = j.view().read_raw_from(from, u64::MAX, 2).unwrap();
                assert_eq!(r.last, Some(from + 1), "from {from}");
            }
        }
        // Trimmed records leave it; a reset empties it; numbers go on.
        kept.trim(14).unwrap();
        assert_eq!(lock_tail(&kept.tail).recs.front().unwrap().0, 15);
        kept.reset(21).unwrap();
        assert!(lock_tail(&kept.tail).recs.is_empty());
        kept.append(Kind::Write, 0, 4, &[1; 4]).unwrap();
        plain.reset(21).unwrap();
        plain.append(Kind::Write, 0, 4, &[1; 4]).unwrap();
        assert_eq!(raw(&kept, 21, u64::MAX), raw(&plain, 21, u64::MAX));
        assert_eq!(raw(&kept, 21, u64::MAX).1, Some(21));
    }

    #[test]
    fn a_write_that_fails_part_way_leaves_no_garbage_behind() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, io) = faulty(d.path(), "fail write .log after=3 times=1 err=torn");
        fill(&mut j, 3);
        let e = j.append(Kind::Write, 0, 4096, &[9u8; 4096]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        assert_eq!(io.injected(), 1);
        // The next records follow the last whole one, and all survive a reopen.
        j.append(Kind::Write, 8192, 512, &[7u8; 512]).unwrap();
        j.append(Kind::Flush, 0, 0, &[]).unwrap();
        j.sync().unwrap();
        let next = j.next_seq();
        drop(j);
        let (j, r) = Journal::open(d.path(), 1 << 30).unwrap();
        assert_eq!(r.cut_bytes, 0, "nothing torn was left in the segment");
        assert_eq!(j.next_seq(), next);
        let all = j.read_from(1, u64::MAX).unwrap();
        assert_eq!(all[all.len() - 2].data, vec![7u8; 512]);
    }

    #[test]
    fn a_power_cut_keeps_every_synced_record() {
        let d = tempfile::tempdir().unwrap();
        let io = Arc::new(FaultyIo::new(true));
        let (mut j, _) = Journal::open_with(d.path(), 1 << 30, io.clone()).unwrap();
        for round in 0..50u64 {
            for i in 0..3 {
                let data = vec![(round * 3 + i) as u8; 4096 * (1 + i as usize)];
                j.append(Kind::Write, i * 65536, data.len() as u32, &data)
                    .unwrap();
            }
            j.append(Kind::Flush, 0, 0, &[]).unwrap();
            j.sync().unwrap();
            if round % 7 == 6 {
                j.trim(j.next_seq() - 5).unwrap();
            }
        }
        let synced = j.next_seq();
        j.append(Kind::Write, 0, 512, &[1u8; 512]).unwrap();
        drop(j);
        io.restore_durable(0);
        let (j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        assert_eq!(j.next_seq(), synced, "every synced record, nothing after");
    }

    #[test]
    fn a_failed_fsync_is_sticky_until_reset_or_rewound() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _io) = faulty(d.path(), "fail sync .log after=1 times=1");
        fill(&mut j, 3); // the first fsync passes
        j.append(Kind::Write, 0, 512, &[1u8; 512]).unwrap();
        assert!(j.sync().is_err());
        // The fault is gone, yet nothing may be called durable now: the
        // failed fsync's pages may be lost whatever a new fsync says.
        assert!(matches!(j.sync(), Err(JournalError::Failed { .. })));
        assert!(j.append(Kind::Flush, 0, 0, &[]).is_err());
        let synced_next = j.next_seq() - 1;
        j.rewind_to_synced().unwrap();
        assert_eq!(j.next_seq(), synced_next, "back to what the fsync covered");
        j.append(Kind::Write, 0, 512, &[2u8; 512]).unwrap();
        j.sync().unwrap();
        let (mut k, _) = faulty(&d.path().join("k"), "fail sync .log times=1");
        k.append(Kind::Flush, 0, 0, &[]).unwrap();
        assert!(k.sync().is_err());
        let next = k.next_seq();
        k.reset(next).unwrap();
        k.append(Kind::Flush, 0, 0, &[]).unwrap();
        k.sync().unwrap();
    }

    #[test]
    fn sync_covers_every_segment_a_batch_crossed() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, io) = faulty(d.path(), "");
        let big = vec![3u8; RECORD_DATA_MAX as usize];
        // Three records of 32 MiB: the third starts a second segment.
        for i in 0..3 {
            j.append(Kind::Write, i << 25, big.len() as u32, &big)
                .unwrap();
        }
        assert_eq!(j.segments.len(), 2);
        // Each segment's fsync is seen: failing the first one fails the sync.
        io.set_rules(&format!("fail sync {:020}.log times=1", 1))
            .unwrap();
        assert!(j.sync().is_err(), "the older segment is synced too");
        assert_eq!(io.injected(), 1);
        j.rewind_to_synced().unwrap();
        assert_eq!((j.next_seq(), j.bytes(), j.segments.len()), (1, 0, 1));
    }

    fn fill(j: &mut Journal, n: u64) {
        for i in 0..n {
            let data = vec![(i % 251) as u8; 512 + (i as usize % 7) * 512];
            j.append(Kind::Write, i * 4096, data.len() as u32, &data)
                .unwrap();
            if i % 5 == 4 {
                j.append(Kind::Flush, 0, 0, &[]).unwrap();
            }
        }
        j.sync().unwrap();
    }

    /// The checksum of header and data in one piece is the checksum of
    /// them fed apart (records on disk and at the peer stay readable).
    #[test]
    fn the_one_piece_checksum_equals_the_checksum_fed_apart() {
        for n in [0usize, 1, 31, 992, 1000, 4096, 65536 + 7] {
            let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
            let r = Record {
                seq: 9,
                kind: Kind::Write,
                offset: 4096,
                len: n as u32,
                epoch: 3,
                data: data.clone(),
            };
            let enc = r.encode();
            let sum = u64::from_le_bytes(enc[32..40].try_into().unwrap());
            assert_eq!(sum, checksum(&r.header(), &data), "{n} bytes");
            assert_eq!(&enc[40..], &data[..]);
            assert_eq!(decode_records(&enc, 1).unwrap(), vec![r]);
        }
    }

    /// A replica's redo log keeps the batches it took in memory as they
    /// came (sharing each batch's buffer): its applier reads them from
    /// there exactly as the segment holds them, from any record on and
    /// with any byte limit; what it forgot, what a rewind or a reset
    /// dropped, and what passes the limit are read from the segment.
    #[test]
    fn a_redo_log_reads_the_batches_it_took_from_memory_as_the_segment_holds_them() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut kept, _) = Journal::open(da.path(), 1 << 30).unwrap();
        let (mut plain, _) = Journal::open(db.path(), 1 << 30).unwrap();
        kept.keep_tail(8 * (HEADER_BYTES + 1000));
        // Three batches of five, the first record of each one sent again
        // (a batch after a lost answer): only the new ones are appended.
        let mut next = 1u64;
        for b in 0..3u64 {
            let resent = u64::from(b > 0);
            let recs: Vec<Record> = (1 - resent..6u64)
                .map(|i| Record {
                    seq: next + i - 1,
                    kind: if i == 5 { Kind::Flush } else { Kind::Write },
                    offset: (b * 8 + i) * 4096,
                    len: if i == 5 { 0 } else { 900 + i as u32 },
                    epoch: 0,
                    data: if i == 5 {
                        vec![]
                    } else {
                        vec![(b * 8 + i) as u8; 900 + i as usize]
                    },
                })
                .collect();
            let raw: Vec<u8> = recs.iter().flat_map(|r| r.encode()).collect();
            let infos = check_records(&raw, 100).unwrap();
            let skip = resent as usize;
            let base = infos[skip].start;
            let starts: Vec<usize> = infos[skip..].iter().map(|i| i.start - base).collect();
            let raw = Arc::new(raw);
            for j in [&mut kept, &mut plain] {
                assert_eq!(j.append_encoded(&raw, base, &starts).unwrap(), next + 4);
            }
            next += 5;
        }
        let read = |j: &Journal, from, max| j.view().read_from(from, max).unwrap();
        let raw = |j: &Journal, from, max| {
            let r = j.view().read_raw_from(from, max, usize::MAX).unwrap();
            (r.bytes, r.last)
        };
        // Each batch here resent one record of its ~5: kept in its buffer;
        // a batch mostly resent is copied out (checked by capacity).
        {
            let t = lock_tail(&kept.tail);
            let (_, k) = t.recs.back().unwrap();
            assert!(k.range.start > 0, "kept where it came");
        }
        // The limit kept the newest records (about eight writes).
        let first_kept = lock_tail(&kept.tail).recs.front().unwrap().0;
        assert!(first_kept > 1 && first_kept <= 8, "{first_kept}");
        for (from, max) in [
            (1, u64::MAX),
            (4, 3000),
            (first_kept, u64::MAX),
            (9, 1),
            (15, 10),
            (12, 2500),
        ] {
            assert_eq!(
                read(&kept, from, max),
                read(&plain, from, max),
                "from {from}"
            );
            assert_eq!(raw(&kept, from, max), raw(&plain, from, max), "from {from}");
        }
        assert_eq!(read(&kept, 6, u64::MAX).len(), 10);
        assert_eq!(read(&kept, 15, u64::MAX)[0].kind, Kind::Flush);
        // Applied records are forgotten, and read from the segment alike.
        kept.forget_kept(10);
        assert_eq!(lock_tail(&kept.tail).recs.front().unwrap().0, 11);
        for from in [8, 11] {
            assert_eq!(read(&kept, from, u64::MAX), read(&plain, from, u64::MAX));
        }
        // What is kept is read from memory: with the segment damaged,
        // the kept records still read as appended; older ones do not.
        let seg = std::fs::read_dir(da.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "log"))
            .unwrap();
        let len = std::fs::metadata(&seg).unwrap().len() as usize;
        std::fs::write(&seg, vec![0x5a; len]).unwrap();
        assert_eq!(read(&kept, 11, u64::MAX), read(&plain, 11, u64::MAX));
        assert_ne!(
            kept.view().read_from(8, u64::MAX).ok(),
            Some(read(&plain, 8, u64::MAX))
        );
        // A rewind and a reset leave nothing in memory; numbers go on. A
        // view taken before the rewind asks for records no longer there
        // and gets them from the segment, or nothing.
        let old = kept.view();
        kept.rewind_to_synced().unwrap();
        assert!(lock_tail(&kept.tail).recs.is_empty());
        let first = kept.next_seq();
        let one = Record {
            seq: first,
            kind: Kind::Flush,
            offset: 0,
            len: 0,
            epoch: 0,
            data: vec![],
        };
        let enc = Arc::new(one.encode());
        kept.append_encoded(&enc, 0, &[0]).unwrap();
        assert_eq!(lock_tail(&kept.tail).recs.len(), 1);
        let _ = old.read_from(first + 3, u64::MAX);
        kept.reset(40).unwrap();
        assert!(lock_tail(&kept.tail).recs.is_empty());
        assert!(read(&kept, 40, u64::MAX).is_empty());
        // A batch of ten records sent again and one new one: the new one
        // is kept in a buffer of its own, not with the ten.
        let recs: Vec<Record> = (30..=40u64)
            .map(|seq| Record {
                seq,
                kind: Kind::Write,
                offset: 0,
                len: 900,
                epoch: 0,
                data: vec![seq as u8; 900],
            })
            .collect();
        let raw: Vec<u8> = recs.iter().flat_map(|r| r.encode()).collect();
        let infos = check_records(&raw, 100).unwrap();
        let base = infos[10].start;
        kept.append_encoded(&Arc::new(raw), base, &[0]).unwrap();
        {
            let t = lock_tail(&kept.tail);
            let (seq, k) = t.recs.back().unwrap();
            assert_eq!((*seq, k.buf.len(), k.range.clone()), (40, 940, 0..940));
        }
        assert_eq!(read(&kept, 40, u64::MAX), vec![recs[10].clone()]);
    }

    /// A batch checked by `check_records` and appended as it came reads
    /// back as the records sent; damage, numbering that does not follow and
    /// a cut in the middle of a record are refused.
    #[test]
    fn a_batch_appended_as_it_came_reads_back_as_sent() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        fill(&mut j, 3);
        let next = j.next_seq();
        let recs: Vec<Record> = (0..5u64)
            .map(|i| Record {
                seq: next + i,
                kind: if i == 4 { Kind::Flush } else { Kind::Write },
                offset: i * 4096,
                len: if i == 4 { 0 } else { 100 + i as u32 },
                epoch: 0,
                data: if i == 4 {
                    vec![]
                } else {
                    vec![i as u8; 100 + i as usize]
                },
            })
            .collect();
        let raw: Vec<u8> = recs.iter().flat_map(|r| r.encode()).collect();
        let infos = check_records(&raw, 100).unwrap();
        assert_eq!(infos.len(), 5);
        assert_eq!(infos[4].kind, Kind::Flush);
        let starts: Vec<usize> = infos.iter().map(|i| i.start).collect();
        // Numbered one past the journal's next record: refused.
        let shifted: Vec<usize> = starts[1..].iter().map(|s| s - starts[1]).collect();
        let shared = Arc::new(raw.clone());
        assert!(j.append_encoded(&shared, starts[1], &shifted).is_err());
        assert_eq!(j.append_encoded(&shared, 0, &starts).unwrap(), next + 4);
        assert_eq!(j.read_from(next, u64::MAX).unwrap(), recs);
        assert_eq!(j.last_checksum(), recs[4].checksum());
        let mut bad = raw.clone();
        bad[50] ^= 1;
        assert!(check_records(&bad, 100).is_err());
        assert!(check_records(&raw[..raw.len() - 1], 100).is_err());
        assert!(check_records(&raw, 4).is_err());
        j.sync().unwrap();
        drop(j);
        let (j, r) = Journal::open(d.path(), 1 << 30).unwrap();
        assert_eq!(r.cut_bytes, 0);
        assert_eq!(j.read_from(next, u64::MAX).unwrap(), recs);
    }

    /// Reads from the middle start at the index's nearest record: every
    /// starting record gives the same records as a scan from the start,
    /// before and after a reopen (index rebuilt by the scan) and after a
    /// cut back to what was synced (index entries past the cut dropped).
    #[test]
    fn reads_from_any_record_match_a_full_scan() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        for i in 0..400u64 {
            let data = vec![(i % 251) as u8; 4096 + (i as usize % 3) * 1000];
            j.append(Kind::Write, i * 4096, data.len() as u32, &data)
                .unwrap();
        }
        j.sync().unwrap();
        let check = |j: &Journal| {
            let all = j.read_from(j.first_seq(), u64::MAX).unwrap();
            assert_eq!(all.len() as u64, j.next_seq() - j.first_seq());
            for (k, want) in all.iter().enumerate().step_by(7) {
                let got = j.read_from(want.seq, 20_000).unwrap();
                assert_eq!(got[0], *want, "from record {}", want.seq);
                assert_eq!(got[..], all[k..k + got.len()]);
            }
        };
        check(&j);
        assert!(
            j.segments[0].index.lock().len() > 3,
            "the index has entries"
        );
        drop(j);
        let (mut j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        check(&j);
        // Records appended, not synced, then cut back: written again with
        // other contents under the same numbers, read back as written.
        for _ in 0..200u64 {
            j.append(Kind::Write, 0, 4096, &[1u8; 4096]).unwrap();
        }
        j.rewind_to_synced().unwrap();
        for _ in 0..200u64 {
            j.append(Kind::Write, 0, 2048, &[2u8; 2048]).unwrap();
        }
        check(&j);
        let tail = j.read_from(401, u64::MAX).unwrap();
        assert_eq!(tail.len(), 200);
        assert!(tail.iter().all(|r| r.data == [2u8; 2048]));
    }

    #[test]
    fn records_survive_reopen_in_order_without_holes() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, r) = Journal::open(d.path(), 1 << 30).unwrap();
        assert_eq!(r, Recovered::default());
        fill(&mut j, 50);
        let next = j.next_seq();
        drop(j);
        let (j, r) = Journal::open(d.path(), 1 << 30).unwrap();
        assert_eq!(
            r,
            Recovered {
                records: next - 1,
                cut_bytes: 0
            }
        );
        assert_eq!(j.next_seq(), next);
        let all = j.read_from(1, u64::MAX).unwrap();
        assert_eq!(all.len() as u64, next - 1);
        assert!(all.iter().enumerate().all(|(i, r)| r.seq == i as u64 + 1));
        assert_eq!(all[0].data, vec![0u8; 512]);
        assert_eq!(
            j.read_from(10, 1).unwrap().len(),
            1,
            "a byte budget still returns one record"
        );
    }

    #[test]
    fn records_carry_their_epoch_under_the_checksum() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        j.set_epoch(3);
        j.append(Kind::Write, 0, 4, &[1, 2, 3, 4]).unwrap();
        let sum3 = j.last_checksum();
        j.set_epoch(4);
        j.append(Kind::Flush, 0, 0, &[]).unwrap();
        let sum4 = j.last_checksum();
        let all = j.read_from(1, u64::MAX).unwrap();
        assert_eq!((all[0].epoch, all[1].epoch), (3, 4));
        assert_eq!((all[0].checksum(), all[1].checksum()), (sum3, sum4));
        // A redo log keeps the primary's epoch, whatever its own.
        let d2 = tempfile::tempdir().unwrap();
        let (mut redo, _) = Journal::open(d2.path(), 1 << 30).unwrap();
        redo.append_record(&all[0]).unwrap();
        assert_eq!(redo.read_from(1, u64::MAX).unwrap()[0], all[0]);
        // The epoch is covered by the checksum: another epoch, another record.
        let mut enc = all[0].encode();
        enc[28] = 9;
        assert!(decode_records(&enc, 10).is_err());
        assert!(record_epoch(u64::from(u32::MAX) + 1).is_err());
    }

    #[test]
    fn a_torn_tail_is_cut_at_the_last_whole_record() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        fill(&mut j, 10);
        let (seg, good) = (j.segments[0].path.clone(), j.bytes());
        drop(j);
        // A write torn half way through its data.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        let rec = Record {
            seq: 13,
            epoch: 1,
            kind: Kind::Write,
            offset: 0,
            len: 4096,
            data: vec![9; 4096],
        }
        .encode();
        f.write_all(&rec[..HEADER_BYTES + 100]).unwrap();
        drop(f);
        let (j, r) = Journal::open(d.path(), 1 << 30).unwrap();
        assert_eq!(r.cut_bytes, (HEADER_BYTES + 100) as u64);
        assert_eq!(j.bytes(), good);
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len(),
            good,
            "the file itself is cut"
        );
    }

    #[test]
    fn damage_in_the_middle_cuts_everything_after_it() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        fill(&mut j, 20);
        let seg = j.segments[0].path.clone();
        drop(j);
        let mut bytes = std::fs::read(&seg).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&seg, &bytes).unwrap();
        let (j, r) = Journal::open(d.path(), 1 << 30).unwrap();
        assert!(r.cut_bytes > 0 && j.bytes() < bytes.len() as u64);
        let recs = j.read_from(1, u64::MAX).unwrap();
        assert_eq!(
            recs.last().map(|r| r.seq),
            Some(j.next_seq() - 1),
            "the kept records end without a hole"
        );
    }

    #[test]
    fn the_journal_is_bounded_and_trimming_frees_space() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(d.path(), 10_000).unwrap();
        let data = vec![1u8; 4096];
        j.append(Kind::Write, 0, 4096, &data).unwrap();
        j.append(Kind::Write, 4096, 4096, &data).unwrap();
        assert!(matches!(
            j.append(Kind::Write, 8192, 4096, &data),
            Err(JournalError::Full { .. })
        ));
        j.trim(2).unwrap();
        assert_eq!(j.bytes(), 0);
        assert_eq!(
            j.append(Kind::Write, 8192, 4096, &data).unwrap(),
            3,
            "sequence numbers go on after a trim"
        );
        drop(j);
        let (mut j, _) = Journal::open(d.path(), 10_000).unwrap();
        assert_eq!(j.first_seq(), 3);
        j.trim(3).unwrap();
        assert_eq!(j.bytes(), 0);
        drop(j);
        let (j, _) = Journal::open(d.path(), 10_000).unwrap();
        assert_eq!(
            j.next_seq(),
            4,
            "a fully trimmed journal goes on where it was"
        );
        assert_eq!(j.first_seq(), 4);
        drop(j);
        let (j, _) = Journal::open(d.path(), 10_000).unwrap();
        assert!(matches!(j.read_from(1, 100), Err(JournalError::Missing(1))));
        assert!(matches!(
            Journal::open(d.path(), 10)
                .unwrap()
                .0
                .append(Kind::Write, 0, 5, b"x"),
            Err(JournalError::TooLarge(5))
        ));
    }

    #[test]
    fn segments_roll_and_trim_whole() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        let data = vec![7u8; 1 << 20];
        for i in 0..130u64 {
            j.append(Kind::Write, i << 20, 1 << 20, &data).unwrap();
        }
        j.sync().unwrap();
        assert!(j.segments.len() >= 2);
        let before = j.bytes();
        j.trim(64).unwrap();
        assert!(j.bytes() < before);
        assert!(j.first_seq() <= 65, "nothing unacknowledged is dropped");
        let recs = j.read_from(65, u64::MAX).unwrap();
        assert_eq!(recs.first().map(|r| r.seq), Some(65));
        assert_eq!(recs.len(), 66);
        // The trimmed segment left the journal at once; its file is
        // deleted when the caller lets go of it, past its lock.
        let names = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".log"))
                .collect();
            v.sort();
            v
        };
        let first = format!("{:020}.log", 1);
        assert_eq!(
            names(d.path())
                .iter()
                .filter(|n| n.starts_with(&first))
                .collect::<Vec<_>>(),
            vec![&format!("{first}{DROPPED_SUFFIX}")]
        );
        let dropped = j.take_dropped();
        assert_eq!(dropped.paths.len(), 1);
        drop(dropped);
        assert!(names(d.path()).iter().all(|n| !n.starts_with(&first)));
        assert_eq!(j.take_dropped().paths.len(), 0, "taken once");

        // Trimming everything drops the last segment too; one the caller
        // never took is deleted with the journal, and a leftover from a
        // crash when the journal opens.
        j.trim(130).unwrap();
        let live = names(d.path());
        assert!(live.iter().any(|n| n.ends_with(DROPPED_SUFFIX)), "{live:?}");
        drop(j);
        assert!(
            names(d.path()).iter().all(|n| !n.ends_with(DROPPED_SUFFIX)),
            "{:?}",
            names(d.path())
        );
        let leftover = d.path().join(format!("{:020}.log{DROPPED_SUFFIX}", 7));
        std::fs::write(&leftover, b"old records").unwrap();
        let (j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        assert!(!leftover.exists());
        assert_eq!((j.first_seq(), j.next_seq()), (131, 131));
    }

    #[test]
    fn a_power_cut_around_a_dropped_segment_keeps_the_numbering() {
        let data = vec![7u8; 1 << 20];
        // Cut after the trim (the rename made durable), before or after
        // the dropped file is deleted; then a trim to empty, not synced.
        for delete_first in [false, true] {
            let d = tempfile::tempdir().unwrap();
            let io = Arc::new(FaultyIo::new(true));
            let (mut j, _) = Journal::open_with(d.path(), 1 << 30, io.clone()).unwrap();
            for i in 0..70u64 {
                j.append(Kind::Write, i << 20, 1 << 20, &data).unwrap();
            }
            j.sync().unwrap();
            assert_eq!(j.segments.len(), 2);
            j.trim(64).unwrap();
            let dropped = j.take_dropped();
            if delete_first {
                drop(dropped);
            } else {
                std::mem::forget(dropped);
            }
            let synced = j.next_seq();
            j.append(Kind::Write, 0, 512, &[1u8; 512]).unwrap();
            drop(j);
            io.restore_durable(0);
            let (j, _) = Journal::open(d.path(), 1 << 30).unwrap();
            assert_eq!(j.next_seq(), synced, "delete first: {delete_first}");
            assert_eq!(j.read_from(65, u64::MAX).unwrap().len(), 6);
            assert!(
                std::fs::read_dir(d.path()).unwrap().all(|e| !e
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(DROPPED_SUFFIX)),
                "a leftover is deleted at open"
            );
            // Everything acknowledged: the journal keeps its numbering
            // through a reset that no sync followed.
            drop(j);
            let io = Arc::new(FaultyIo::new(true));
            let (mut j, _) = Journal::open_with(d.path(), 1 << 30, io.clone()).unwrap();
            j.trim(synced - 1).unwrap();
            drop(j.take_dropped());
            drop(j);
            io.restore_durable(0);
            let (j, _) = Journal::open(d.path(), 1 << 30).unwrap();
            assert_eq!(j.next_seq(), synced);
        }
    }

    #[test]
    fn a_sync_run_without_the_lock_calls_durable_only_what_it_planned_and_a_failure_stays() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        fill(&mut j, 3);
        j.append(Kind::Write, 0, 512, &[1u8; 512]).unwrap();
        let planned = j.next_seq();
        let plan = j.plan_sync().unwrap();
        // Appended while the fsync runs: not called durable by it.
        j.append(Kind::Write, 0, 512, &[2u8; 512]).unwrap();
        let r = plan.run();
        j.finish_sync(&plan, r).unwrap();
        j.rewind_to_synced().unwrap();
        assert_eq!(j.next_seq(), planned, "back to what the plan covered");

        // Two plans; the first one's fsync fails, the second's (the fault
        // is reported once) succeeds: neither is called durable, nor is
        // anything after.
        let (mut j, _io) = faulty(&d.path().join("f"), "fail sync .log after=1 times=1");
        fill(&mut j, 3); // the first fsync passes
        j.append(Kind::Write, 0, 512, &[3u8; 512]).unwrap();
        let a = j.plan_sync().unwrap();
        let b = j.plan_sync().unwrap();
        let ra = a.run();
        assert!(ra.is_err());
        let rb = b.run();
        assert!(rb.is_ok(), "the fault is reported once");
        assert!(j.finish_sync(&b, rb).is_err(), "b ran after a failed");
        assert!(j.finish_sync(&a, ra).is_err());
        assert!(matches!(j.sync(), Err(JournalError::Failed { .. })));
        assert!(j.plan_sync().is_err());
        // A rewind starts over; a failure noted for the old numbering is not this one's.
        j.rewind_to_synced().unwrap();
        j.append(Kind::Write, 0, 512, &[4u8; 512]).unwrap();
        let c = j.plan_sync().unwrap();
        let rc = c.run();
        j.finish_sync(&c, rc).unwrap();
        j.sync().unwrap();
    }

    #[test]
    fn a_new_segment_on_a_file_that_holds_bytes_starts_empty() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        // Bytes at the name the first segment takes (not a segment the
        // journal knows: it opened on an empty directory).
        std::fs::write(
            d.path().join(format!("{:020}.log", 1)),
            vec![0xa5u8; 10_000],
        )
        .unwrap();
        fill(&mut j, 4);
        drop(j);
        let (j, r) = Journal::open(d.path(), 1 << 30).unwrap();
        assert_eq!(r.cut_bytes, 0, "nothing of the old bytes is left to cut");
        let recs = j.read_from(1, u64::MAX).unwrap();
        assert_eq!(recs.len(), 4);
        assert_eq!(recs.last().map(|r| r.seq), Some(4));
    }

    #[test]
    fn a_redo_log_keeps_the_senders_numbers_and_refuses_damaged_batches() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(&d.path().join("a"), 1 << 30).unwrap();
        fill(&mut j, 8);
        let recs = j.read_from(1, u64::MAX).unwrap();
        let wire: Vec<u8> = recs.iter().flat_map(|r| r.encode()).collect();
        assert_eq!(decode_records(&wire, 100).unwrap(), recs);
        assert!(decode_records(&wire, 3).is_err(), "count bound");
        let mut bad = wire.clone();
        bad[HEADER_BYTES + 7] ^= 1;
        assert!(decode_records(&bad, 100).is_err(), "checksum");
        assert!(
            decode_records(&wire[..wire.len() - 1], 100).is_err(),
            "torn"
        );

        let (mut redo, _) = Journal::open(&d.path().join("b"), 1 << 30).unwrap();
        redo.reset(recs[3].seq).unwrap();
        assert!(matches!(
            redo.append_record(&recs[4]),
            Err(JournalError::OutOfOrder { .. })
        ));
        for r in &recs[3..] {
            redo.append_record(r).unwrap();
        }
        drop(redo);
        let (redo, _) = Journal::open(&d.path().join("b"), 1 << 30).unwrap();
        assert_eq!(redo.first_seq(), recs[3].seq);
        assert_eq!(redo.read_from(recs[3].seq, u64::MAX).unwrap(), recs[3..]);
        // An emptied log remembers where numbering goes on.
        let (mut e, _) = Journal::open(&d.path().join("c"), 1 << 30).unwrap();
        e.reset(500).unwrap();
        drop(e);
        assert_eq!(
            Journal::open(&d.path().join("c"), 1 << 30)
                .unwrap()
                .0
                .next_seq(),
            500
        );
    }

    #[test]
    fn numbering_survives_a_crash_at_any_step_of_a_trim_to_empty() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        fill(&mut j, 10);
        let next = j.next_seq();
        let old: Vec<PathBuf> = j.segments.iter().map(|s| s.path.clone()).collect();
        // The crash window of a trim to empty: the new empty segment exists,
        // the old ones are not deleted yet. Reopening keeps the numbering
        // (the acknowledged records come back and are sent again, harmlessly).
        let mark = d.path().join(format!("{next:020}.log"));
        File::create(&mark).unwrap();
        drop(j);
        let (j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        assert_eq!(j.next_seq(), next);
        drop(j);
        // The trim itself: never a moment without a segment naming the next record.
        let (mut j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        j.trim(next - 1).unwrap();
        for p in &old {
            assert!(!p.exists());
        }
        assert!(mark.exists());
        drop(j);
        let (j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        assert_eq!((j.first_seq(), j.next_seq()), (next, next));
    }

    #[test]
    fn an_interrupted_reset_forward_wins_over_the_records_before_it() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        fill(&mut j, 3);
        drop(j);
        // A replica's redo log reset to 100 by a resync; the crash came
        // before the old segment was deleted.
        File::create(d.path().join(format!("{:020}.log", 100))).unwrap();
        let (j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        assert_eq!((j.first_seq(), j.next_seq()), (100, 100));
        assert!(matches!(j.read_from(1, 100), Err(JournalError::Missing(1))));
    }

    #[test]
    fn a_reset_onto_a_segment_of_an_older_numbering_starts_it_empty() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        fill(&mut j, 10);
        // A redo log following a recreated journal restarts at 1, where its
        // live segment holds the old records 1.. .
        j.reset(1).unwrap();
        assert_eq!(j.read_from(1, u64::MAX).unwrap(), vec![]);
        j.append(Kind::Flush, 0, 0, &[]).unwrap();
        j.sync().unwrap();
        drop(j);
        let (j, r) = Journal::open(d.path(), 1 << 30).unwrap();
        assert_eq!(r.cut_bytes, 0);
        let recs = j.read_from(1, u64::MAX).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].kind, Kind::Flush);
    }

    #[test]
    fn the_incarnation_stays_with_the_numbering_and_changes_when_it_is_lost() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        let id = j.incarnation();
        fill(&mut j, 3);
        j.trim(j.next_seq() - 1).unwrap();
        drop(j);
        let (j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        assert_eq!(j.incarnation(), id, "same journal, same incarnation");
        drop(j);
        for e in std::fs::read_dir(d.path()).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "log") {
                std::fs::remove_file(p).unwrap();
            }
        }
        let (j, _) = Journal::open(d.path(), 1 << 30).unwrap();
        assert_eq!(j.next_seq(), 1, "its numbering is gone");
        assert_ne!(j.incarnation(), id, "so these are other records");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        #[test]
        fn any_cut_of_the_file_reopens_to_a_prefix(cut in 0usize..20_000) {
            let d = tempfile::tempdir().unwrap();
            let (mut j, _) = Journal::open(d.path(), 1 << 30).unwrap();
            fill(&mut j, 12);
            let seg = j.segments[0].path.clone();
            let all = j.read_from(1, u64::MAX).unwrap();
            drop(j);
            let bytes = std::fs::read(&seg).unwrap();
            let cut = cut.min(bytes.len());
            std::fs::write(&seg, &bytes[..cut]).unwrap();
            let (j, _) = Journal::open(d.path(), 1 << 30).unwrap();
            let kept = j.read_from(1, u64::MAX).unwrap();
            proptest::prop_assert_eq!(&kept[..], &all[..kept.len()]);
            proptest::prop_assert_eq!(j.next_seq(), kept.len() as u64 + 1);
        }
    }
}
