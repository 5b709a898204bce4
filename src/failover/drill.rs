//! A failover drill's clone: a writable copy-on-write view of a recovery
//! point, and the drill's report.
//!
//! A point is a tree of immutable chunks, so the clone needs no copy: it is
//! ready as soon as its overlay file exists (in time independent of the
//! volume's size). Reads come from the overlay where the drill wrote, else
//! from the point's chunks (each verified against its name on read);
//! writes go to the overlay only, so the replica and the store never see a
//! drill write. The map of written 4 KiB blocks lives in memory: a drill
//! does not outlive its daemon (a restart discards the clone and records
//! the drill as aborted), so the overlay needs no fsync either.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::blockmap::BlockMap;
use crate::hash::Hash;
use crate::nbd::{Export, Extent};
use crate::store::ChunkStore;
use crate::store::tree::{self, FANOUT, StoreNodes};

/// The overlay's block: the unit a partial write copies up from the base.
pub const BLOCK: u64 = 4096;
/// Inner nodes the clone keeps decoded (each at most 8 KiB of hashes).
const NODE_CACHE_MAX: usize = 1024;
/// Most of a clone one block status reply looks at, in bytes and in the
/// point's chunks (each a walk down its tree).
const STATUS_SCAN_BYTES_MAX: u64 = 1 << 30;
const STATUS_LEAVES_MAX: u64 = 4096;
/// Base chunks the clone keeps decoded (a 4 KiB read of a 64 KiB chunk
/// would otherwise decompress it sixteen times).
const CHUNK_CACHE_MAX: usize = 32;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The writable clone of one recovery point.
pub struct DrillClone {
    store: Arc<dyn ChunkStore>,
    size: u64,
    chunk_size: u32,
    height: u8,
    top: Hash,
    overlay: File,
    overlay_path: PathBuf,
    written: Mutex<BlockMap>,
    /// The most the overlay may hold (distinct 4 KiB blocks written):
    /// `limits.drill_overlay_bytes_max`. A write past it fails with ENOSPC.
    overlay_max: u64,
    /// Writes one at a time: a partial block is copied up, then written.
    write_lock: Mutex<()>,
    nodes: Mutex<HashMap<Hash, Arc<Vec<Hash>>>>,
    chunks: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
    pub bytes_written: AtomicU64,
    pub bytes_read: AtomicU64,
    /// The first error a read of the base met (a missing or damaged chunk):
    /// the drill fails with it.
    pub base_error: Mutex<Option<String>>,
    revoked: tokio::sync::watch::Sender<u64>,
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl DrillClone {
    /// Creates the overlay (a sparse file at `overlay`) over the point `root`.
    /// Reads a handful of tree nodes, whatever the volume's size.
    pub fn create(
        store: Arc<dyn ChunkStore>,
        root: &Hash,
        overlay: &Path,
        overlay_max: u64,
    ) -> Result<DrillClone, String> {
        let (size, chunk_size, height, top) = tree::root_shape(&StoreNodes(&*store), root)
            .map_err(|e| format!("the point's tree cannot be read: {e}"))?;
        if chunk_size == 0 || u64::from(chunk_size) % BLOCK != 0 {
            return Err(format!(
                "the point's chunk size {chunk_size} is not a multiple of 4 KiB"
            ));
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(overlay)
            .map_err(|e| format!("cannot create the overlay {}: {e}", overlay.display()))?;
        f.set_len(size)
            .map_err(|e| format!("cannot size the overlay {}: {e}", overlay.display()))?;
        Ok(DrillClone {
            store,
            size,
            chunk_size,
            height,
            top,
            overlay: f,
            overlay_path: overlay.to_path_buf(),
            written: Mutex::new(BlockMap::default()),
            overlay_max,
            write_lock: Mutex::new(()),
            nodes: Mutex::new(HashMap::new()),
            chunks: Mutex::new(VecDeque::new()),
            bytes_written: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            base_error: Mutex::new(None),
            revoked: tokio::sync::watch::channel(0).0,
        })
    }

    pub fn overlay_path(&self) -> &Path {
        &self.overlay_path
    }

    /// Ends the clone's NBD connections (the drill stops).
    pub fn revoke(&self) {
        self.revoked.send_modify(|g| *g += 1);
    }

    fn children(&self, hash: &Hash, level: u8) -> Result<Arc<Vec<Hash>>, String> {
        if let Some(c) = lock(&self.nodes).get(hash) {
            return Ok(c.clone());
        }
        let kids = Arc::new(
            tree::children(&StoreNodes(&*self.store), hash, level).map_err(|e| e.to_string())?,
        );
        let mut cache = lock(&self.nodes);
        if cache.len() >= NODE_CACHE_MAX {
            cache.clear();
        }
        cache.insert(*hash, kids.clone());
        Ok(kids)
    }

    fn leaf(&self, index: u64) -> Result<Hash, String> {
        let mut hash = self.top;
        for level in (1..=self.height).rev() {
            let span = (FANOUT as u64).pow(u32::from(level) - 1);
            let kids = self.children(&hash, level)?;
            let i = ((index / span) % FANOUT as u64) as usize;
            hash = *kids
                .get(i)
                .ok_or_else(|| format!("chunk {index} is missing from the point's tree"))?;
        }
        Ok(hash)
    }

    /// Chunk `index` of the base, verified (zeros for a hole).
    fn base_chunk(&self, index: u64) -> Result<Arc<Vec<u8>>, String> {
        if let Some((_, c)) = lock(&self.chunks).iter().find(|(i, _)| *i == index) {
            return Ok(c.clone());
        }
        let (start, end) = tree::chunk_range(self.size, self.chunk_size, index);
        let leaf = self.leaf(index)?;
        let data = if leaf.is_zero() {
            vec![0u8; (end - start) as usize]
        } else {
            let d = self
                .store
                .get_chunk(&leaf)
                .map_err(|e| format!("chunk {} of the point: {e}", leaf.short()))?
                .ok_or_else(|| format!("chunk {} of the point is missing", leaf.short()))?;
            if d.len() as u64 != end - start {
                return Err(format!(
                    "chunk {} has {} bytes where {} fit",
                    leaf.short(),
                    d.len(),
                    end - start
                ));
            }
            d
        };
        let data = Arc::new(data);
        let mut cache = lock(&self.chunks);
        if cache.len() >= CHUNK_CACHE_MAX {
            cache.pop_front();
        }
        cache.push_back((index, data.clone()));
        Ok(data)
    }

    /// Copies `[off, off+buf.len())` of the base into `buf`.
    fn read_base(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let cs = u64::from(self.chunk_size);
        let mut done = 0usize;
        while done < buf.len() {
            let at = off + done as u64;
            let index = at / cs;
            let chunk = self.base_chunk(index).map_err(|e| {
                lock(&self.base_error).get_or_insert_with(|| e.clone());
                other(e)
            })?;
            let within = (at - index * cs) as usize;
            let n = (chunk.len() - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&chunk[within..within + n]);
            done += n;
        }
        Ok(())
    }

    fn check_range(&self, off: u64, len: u64) -> io::Result<()> {
        if off.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "request past the end of the drill clone",
            ));
        }
        Ok(())
    }

    /// Writes `[off, off+len)` with `data` (or zeros when `None`): whole
    /// blocks straight into the overlay, partial ones copied up first.
    fn put(&self, off: u64, len: u64, data: Option<&[u8]>) -> io::Result<()> {
        self.check_range(off, len)?;
        if len == 0 {
            return Ok(());
        }
        let _one = lock(&self.write_lock);
        let end = off + len;
        let (first, last) = (off / BLOCK, (end - 1) / BLOCK);
        {
            let w = lock(&self.written);
            let would = (w.blocks() + w.unset_in(first, last + 1)).saturating_mul(BLOCK);
            if would > self.overlay_max {
                tracing::warn!(
                    overlay = %self.overlay_path.display(),
                    would,
                    max = self.overlay_max,
                    "drill write refused: the overlay would pass limits.drill_overlay_bytes_max (ENOSPC to the client)"
                );
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        // Partial blocks at either end: copy up the base (or the overlay's
        // block, if written) and merge.
        for b in [first, last] {
            let (bs, be) = (b * BLOCK, ((b + 1) * BLOCK).min(self.size));
            let (ps, pe) = (off.max(bs), end.min(be));
            if ps == bs && pe == be {
                continue;
            }
            let mut block = vec![0u8; (be - bs) as usize];
            if lock(&self.written).get(b) {
                self.overlay.read_exact_at(&mut block, bs)?;
            } else {
                self.read_base(bs, &mut block)?;
            }
            let piece = &mut block[(ps - bs) as usize..(pe - bs) as usize];
            match data {
                Some(d) => piece.copy_from_slice(&d[(ps - off) as usize..(pe - off) as usize]),
                None => piece.fill(0),
            }
            self.overlay.write_all_at(&block, bs)?;
            lock(&self.written).set_range(b, b + 1);
            if first == last {
                break;
            }
        }
        // Whole blocks in between.
        let ws = if off.is_multiple_of(BLOCK) {
            off
        } else {
            (first + 1) * BLOCK
        };
        let we = if end.is_multiple_of(BLOCK) || end == self.size {
            end
        } else {
            last * BLOCK
        };
        if ws < we {
            match data {
                Some(d) => self
                    .overlay
                    .write_all_at(&d[(ws - off) as usize..(we - off) as usize], ws)?,
                None => crate::volume::image::write_zeros(
                    &self.overlay,
                    &self.overlay_path,
                    ws,
                    we - ws,
                )
                .map(|_| ())
                .map_err(other)?,
            }
            lock(&self.written).set_range(ws / BLOCK, we.div_ceil(BLOCK));
        }
        self.bytes_written.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

impl Export for DrillClone {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(off, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = off + done as u64;
            let block = at / BLOCK;
            let written = lock(&self.written).get(block);
            // A run of blocks with the same source.
            let mut run_end = ((block + 1) * BLOCK).min(off + buf.len() as u64);
            while run_end < off + buf.len() as u64
                && lock(&self.written).get(run_end / BLOCK) == written
            {
                run_end = ((run_end / BLOCK + 1) * BLOCK).min(off + buf.len() as u64);
            }
            let n = (run_end - at) as usize;
            let part = &mut buf[done..done + n];
            if written {
                self.overlay.read_exact_at(part, at)?;
            } else {
                self.read_base(at, part)?;
            }
            done += n;
        }
        self.bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn write(&self, off: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        self.put(off, data.len() as u64, Some(data))
    }

    /// The clone is discarded with its daemon, so its writes need no fsync.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.put(off, len, None)
    }

    fn write_zeroes(&self, off: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.put(off, len, None)
    }

    fn revoked(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.revoked.subscribe())
    }

    /// Written blocks as the overlay holds them (a zeroed range is a hole
    /// punched there), the rest as the point's tree names them (a zero
    /// chunk is a hole): a copy of a drill clone skips what the point
    /// never held, as one of the volume does.
    ///
    /// One reply looks at most at `STATUS_SCAN_BYTES_MAX` and
    /// `STATUS_LEAVES_MAX` chunks of the point (the protocol lets it
    /// describe less than asked; the client asks again from there).
    fn allocation(&self, off: u64, len: u64, runs_max: usize) -> io::Result<Vec<Extent>> {
        self.check_range(off, len)?;
        let end = off + len.min(STATUS_SCAN_BYTES_MAX);
        let cs = u64::from(self.chunk_size);
        let mut runs = Vec::new();
        let mut leaves = 0;
        let mut at = off;
        while at < end {
            // A run of blocks with the same source (within one chunk for the base).
            let (written, run_end) = {
                let w = lock(&self.written);
                let written = w.get(at / BLOCK);
                let limit = if written {
                    end
                } else {
                    ((at / cs + 1) * cs).min(end)
                };
                let run_end = w.run_end(at / BLOCK, limit.div_ceil(BLOCK)) * BLOCK;
                (written, run_end.min(limit))
            };
            if !written {
                leaves += 1;
                if leaves > STATUS_LEAVES_MAX && !runs.is_empty() {
                    break;
                }
            }
            let fits = if written {
                let sub =
                    crate::volume::image::allocation(&self.overlay, at, run_end - at, runs_max);
                let covered: u64 = sub.iter().map(|r| r.len).sum();
                sub.into_iter()
                    .all(|r| crate::nbd::export::push_extent(&mut runs, r.len, r.hole, runs_max))
                    && covered == run_end - at
            } else {
                let hole = self.leaf(at / cs).map_err(other)?.is_zero();
                crate::nbd::export::push_extent(&mut runs, run_end - at, hole, runs_max)
            };
            if !fits {
                break;
            }
            at = run_end;
        }
        Ok(runs)
    }

    /// Zeros punch a hole in the overlay (a partial block is copied up).
    fn zeroes_fast(&self) -> bool {
        true
    }

    /// One clone behind every connection.
    fn multi_conn(&self) -> bool {
        true
    }
}

/// The check of the clone's base: every chunk of the point read and verified
/// against its name, every tree node against its hash.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseCheck {
    pub chunks_total: u64,
    pub chunks_verified: u64,
    /// Holes (all-zero chunks), which need no read.
    pub chunks_zero: u64,
    pub bytes_verified: u64,
    pub done: bool,
    /// Problems found (at most a few are kept).
    pub errors: Vec<String>,
}

impl BaseCheck {
    pub fn ok(&self) -> bool {
        self.done && self.errors.is_empty()
    }
}

/// Errors a check keeps in its report.
const CHECK_ERRORS_MAX: usize = 16;

/// Reads every chunk of the tree under `root` and verifies it. `stop`
/// says when to give up (the drill ended first); `progress` sees the counts.
pub fn check_base(
    store: &dyn ChunkStore,
    root: &Hash,
    stop: &dyn Fn() -> bool,
    progress: &dyn Fn(&BaseCheck),
) -> BaseCheck {
    let mut c = BaseCheck::default();
    let nodes = StoreNodes(store);
    let (size, chunk_size) = match tree::root_shape(&nodes, root) {
        Ok((s, cs, _, _)) => (s, cs),
        Err(e) => {
            c.errors.push(format!("the point's root: {e}"));
            c.done = true;
            return c;
        }
    };
    let walked = tree::for_each_leaf(&nodes, root, &mut |i, h| {
        if stop() {
            return Err(crate::store::StoreError::Read("stopped".into()));
        }
        c.chunks_total += 1;
        if h.is_zero() {
            c.chunks_zero += 1;
        } else {
            let (start, end) = tree::chunk_range(size, chunk_size, i);
            match store.get_chunk(&h) {
                Ok(Some(d)) if d.len() as u64 == end - start => {
                    c.chunks_verified += 1;
                    c.bytes_verified += d.len() as u64;
                }
                Ok(Some(d)) => {
                    if c.errors.len() < CHECK_ERRORS_MAX {
                        c.errors.push(format!(
                            "chunk {i} ({}) has {} bytes where {} fit",
                            h.short(),
                            d.len(),
                            end - start
                        ))
                    }
                }
                Ok(None) => {
                    if c.errors.len() < CHECK_ERRORS_MAX {
                        c.errors
                            .push(format!("chunk {i} ({}) is missing", h.short()))
                    }
                }
                Err(e) => {
                    if c.errors.len() < CHECK_ERRORS_MAX {
                        c.errors.push(format!("chunk {i} ({}): {e}", h.short()))
                    }
                }
            }
        }
        if c.chunks_total % 1024 == 0 {
            progress(&c);
        }
        Ok(())
    });
    match walked {
        Ok(()) => c.done = true,
        Err(_) if stop() => {}
        Err(e) => {
            c.errors.push(format!("the point's tree: {e}"));
            c.done = true;
        }
    }
    let expected = tree::chunk_count(size, chunk_size);
    if c.done && c.errors.is_empty() && c.chunks_total != expected {
        c.errors.push(format!(
            "the tree has {} chunks where the size needs {expected}",
            c.chunks_total
        ));
    }
    progress(&c);
    c
}

/// How a drill ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrillResult {
    Passed,
    Failed,
    Aborted,
}

impl std::fmt::Display for DrillResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DrillResult::Passed => "passed",
            DrillResult::Failed => "failed",
            DrillResult::Aborted => "aborted",
        })
    }
}

/// Who ran a command: the admin socket's peer credentials, and the name the
/// client gave (the user behind sudo, say).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operator {
    pub uid: Option<u32>,
    pub user: Option<String>,
    /// As the command line said it (`SUDO_USER`, else `USER`): not verified.
    #[serde(default)]
    pub said: Option<String>,
}

impl std::fmt::Display for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.user, self.uid) {
            (Some(u), Some(id)) => write!(f, "{u} (uid {id})")?,
            (None, Some(id)) => write!(f, "uid {id}")?,
            _ => write!(f, "unknown")?,
        }
        if let Some(s) = self
            .said
            .as_ref()
            .filter(|s| Some(*s) != self.user.as_ref())
        {
            write!(f, ", as {s}")?;
        }
        Ok(())
    }
}

/// What a running drill remembers (also `drill.json` in its directory, so
/// that a restart can record it as aborted).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DrillState {
    pub id: String,
    pub volume: String,
    pub site: String,
    pub point: u64,
    pub point_root: Hash,
    pub point_created: u64,
    pub point_source: String,
    pub size: u64,
    /// Unix milliseconds.
    pub started_ms: u64,
    /// From the command to the export being ready, milliseconds.
    pub ready_ms: f64,
    pub started_by: Operator,
}

/// The report a drill leaves (JSON and text) in `DIR/drills/reports/`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DrillReport {
    pub id: String,
    pub volume: String,
    pub site: String,
    pub export: String,
    pub point: u64,
    pub point_root: Hash,
    pub point_source: String,
    pub point_created: u64,
    /// The point's age when the drill started: the RPO the drill proved.
    pub point_age_at_start_s: u64,
    pub size: u64,
    pub started: u64,
    pub stopped: u64,
    pub duration_s: u64,
    /// From the command to a readable and writable export: the RTO of the clone.
    pub ready_ms: f64,
    pub base_check: BaseCheck,
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub started_by: Operator,
    pub stopped_by: Operator,
    pub result: DrillResult,
    /// Why, when it did not pass.
    pub reason: Option<String>,
}

impl DrillReport {
    /// The report of the drill `s`, ended at `stopped_ms` (the check and
    /// the byte counts are the caller's to fill in).
    pub fn of(
        s: &DrillState,
        export: String,
        stopped_ms: u64,
        stopped_by: Operator,
        result: DrillResult,
        reason: Option<String>,
    ) -> DrillReport {
        DrillReport {
            id: s.id.clone(),
            volume: s.volume.clone(),
            site: s.site.clone(),
            export,
            point: s.point,
            point_root: s.point_root,
            point_source: s.point_source.clone(),
            point_created: s.point_created,
            point_age_at_start_s: (s.started_ms / 1000).saturating_sub(s.point_created),
            size: s.size,
            started: s.started_ms / 1000,
            stopped: stopped_ms / 1000,
            duration_s: stopped_ms.saturating_sub(s.started_ms) / 1000,
            ready_ms: s.ready_ms,
            base_check: BaseCheck::default(),
            bytes_written: 0,
            bytes_read: 0,
            started_by: s.started_by.clone(),
            stopped_by,
            result,
            reason,
        }
    }

    pub fn text(&self) -> String {
        use crate::units::human_bytes;
        let mut s = String::new();
        let when = chrono_like;
        s.push_str(&format!(
            "ferry drill report {}\nvolume {} at site {}, exported as {}\n",
            self.id, self.volume, self.site, self.export
        ));
        s.push_str(&format!(
            "result: {}",
            self.result.to_string().to_uppercase()
        ));
        if let Some(r) = &self.reason {
            s.push_str(&format!(" ({r})"));
        }
        s.push('\n');
        s.push_str(&format!(
            "recovery point {} ({}), taken {}: {} old when the drill started (the RPO this drill proved)\n",
            self.point,
            self.point_source,
            when(self.point_created),
            crate::units::human_duration(self.point_age_at_start_s)
        ));
        s.push_str(&format!(
            "clone ready in {:.1} ms (size {}): the RTO of the copy\n",
            self.ready_ms,
            human_bytes(self.size)
        ));
        let c = &self.base_check;
        s.push_str(&format!(
            "base check: {} of {} chunks verified against their names ({}), {} holes{}\n",
            c.chunks_verified,
            c.chunks_total,
            human_bytes(c.bytes_verified),
            c.chunks_zero,
            if c.ok() {
                ", all good".to_string()
            } else if !c.done {
                ", not finished".to_string()
            } else {
                format!(", {} problem(s): {}", c.errors.len(), c.errors.join("; "))
            }
        ));
        s.push_str(&format!(
            "during the drill: {} written to the clone, {} read\n",
            human_bytes(self.bytes_written),
            human_bytes(self.bytes_read)
        ));
        s.push_str(&format!(
            "started {} by {}; stopped {} by {} ({} later)\n",
            when(self.started),
            self.started_by,
            when(self.stopped),
            self.stopped_by,
            crate::units::human_duration(self.duration_s)
        ));
        s
    }
}

/// A Unix time as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn chrono_like(t: u64) -> String {
    format!("{} UTC", crate::util::utc(t))
}

/// Where a site keeps its drills: `DIR/drills/NAME/` while one runs,
/// `DIR/drills/reports/` for what they left.
pub fn drills_dir(dir: &Path) -> PathBuf {
    dir.join("drills")
}

pub fn reports_dir(dir: &Path) -> PathBuf {
    drills_dir(dir).join("reports")
}

/// Writes a report as `ID.json` and `ID.txt` (each atomically).
pub fn write_report(dir: &Path, r: &DrillReport) -> io::Result<PathBuf> {
    let d = reports_dir(dir);
    std::fs::create_dir_all(&d)?;
    let json = d.join(format!("{}.json", r.id));
    let body = serde_json::to_vec_pretty(r).map_err(other)?;
    crate::util::write_atomic(&json, &body)?;
    crate::util::write_atomic(&d.join(format!("{}.txt", r.id)), r.text().as_bytes())?;
    Ok(json)
}

/// Reads at most this many bytes of one report file.
const REPORT_BYTES_MAX: u64 = 1 << 20;

/// The reports of `volume` (every volume when `None`), oldest first. A
/// damaged file is skipped with a warning.
pub fn read_reports(dir: &Path, volume: Option<&str>) -> io::Result<Vec<DrillReport>> {
    let d = reports_dir(dir);
    let entries = match std::fs::read_dir(&d) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in entries {
        let p = e?.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&p) else {
            continue;
        };
        if meta.len() > REPORT_BYTES_MAX {
            tracing::warn!(file = %p.display(), "drill report too large; skipped");
            continue;
        }
        match std::fs::read(&p).map(|b| serde_json::from_slice::<DrillReport>(&b)) {
            Ok(Ok(r)) if volume.is_none_or(|v| v == r.volume) => out.push(r),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(file = %p.display(), error = %e, "damaged drill report; skipped")
            }
            Err(e) => {
                tracing::warn!(file = %p.display(), error = %e, "unreadable drill report; skipped")
            }
        }
    }
    out.sort_by(|a, b| (a.started, &a.id).cmp(&(b.started, &b.id)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use crate::store::Op;
    use crate::store::tree::Tree;

    /// A point of `data` in a memory store, as a replica holds one.
    fn point(store: &dyn ChunkStore, data: &[u8], cs: u32) -> Hash {
        let mut leaves = Vec::new();
        for c in data.chunks(cs as usize) {
            if c.iter().all(|b| *b == 0) {
                leaves.push(Hash::ZERO);
            } else {
                let h = Hash::of_chunk(c);
                store.put_chunk(&h, c).unwrap();
                leaves.push(h);
            }
        }
        let t = Tree::build(data.len() as u64, cs, leaves);
        store.apply(t.node_ops(), true).unwrap();
        t.root
    }

    fn data(len: usize) -> Vec<u8> {
        let mut v: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        v[3 * 16384..5 * 16384].fill(0);
        v
    }

    #[test]
    fn a_clone_reads_its_point_and_keeps_writes_to_itself() {
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let base = data(40_000 * 4 + 1000);
        let root = point(&*store, &base, 16384);
        let dir = tempfile::tempdir().unwrap();
        let c = DrillClone::create(store.clone(), &root, &dir.path().join("o"), u64::MAX).unwrap();
        assert_eq!(c.size(), base.len() as u64);
        let mut buf = vec![0u8; base.len()];
        c.read(0, &mut buf).unwrap();
        assert_eq!(buf, base);
        // A model of the clone: the base with the drill's writes on top.
        let mut model = base.clone();
        let writes: [(u64, usize); 6] = [
            (100, 10),
            (4096, 4096),
            (8000, 20_000),
            (50_000, 1),
            (base.len() as u64 - 700, 700),
            (3 * 16384 + 5, 3),
        ];
        for (k, (off, len)) in writes.iter().enumerate() {
            let d: Vec<u8> = (0..*len).map(|i| (i + k * 31 + 1) as u8).collect();
            c.write(*off, &d, false).unwrap();
            model[*off as usize..*off as usize + len].copy_from_slice(&d);
        }
        c.write_zeroes(1000, 70_000, false).unwrap();
        model[1000..71_000].fill(0);
        c.trim(120_000, 9000).unwrap();
        model[120_000..129_000].fill(0);
        c.read(0, &mut buf).unwrap();
        assert_eq!(buf, model);
        // Unaligned reads across written and unwritten blocks.
        let mut part = vec![0u8; 12_345];
        c.read(70_001, &mut part).unwrap();
        assert_eq!(part, model[70_001..82_346]);
        // The base is untouched.
        let c2 =
            DrillClone::create(store.clone(), &root, &dir.path().join("o2"), u64::MAX).unwrap();
        c2.read(0, &mut buf).unwrap();
        assert_eq!(buf, base);
        assert!(c.read(base.len() as u64 - 1, &mut [0u8; 2]).is_err());
        assert!(c.write(u64::MAX - 1, &[1, 2], false).is_err());
        let check = check_base(&*store, &root, &|| false, &|_| {});
        assert!(check.ok(), "{check:?}");
        assert_eq!(check.chunks_zero, 2);
    }

    #[test]
    fn a_damaged_base_fails_the_read_and_the_check() {
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let base = data(6 * 16384);
        let root = point(&*store, &base, 16384);
        // Drop one chunk the point needs.
        let victim = Hash::of_chunk(&base[..16384]);
        store.apply(vec![Op::DeleteChunk(victim)], true).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let c = DrillClone::create(store.clone(), &root, &dir.path().join("o"), u64::MAX).unwrap();
        assert!(c.read(0, &mut [0u8; 512]).is_err());
        assert!(lock(&c.base_error).is_some());
        let check = check_base(&*store, &root, &|| false, &|_| {});
        assert!(!check.ok());
        assert_eq!(check.errors.len(), 1);
    }

    #[test]
    fn the_overlay_is_bounded_and_a_write_past_it_is_enospc() {
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let base = data(6 * 16384);
        let root = point(&*store, &base, 16384);
        let dir = tempfile::tempdir().unwrap();
        let c = DrillClone::create(store, &root, &dir.path().join("o"), 3 * BLOCK).unwrap();
        c.write(0, &[7u8; 8192], false).unwrap();
        // Rewriting written blocks costs nothing more.
        c.write(100, &[8u8; 4000], false).unwrap();
        // A partial write of a new block takes a whole block.
        c.write(3 * BLOCK - 10, &[9u8; 10], false).unwrap();
        let e = c.write(5 * BLOCK, &[1u8; 10], false).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        let mut buf = vec![0u8; 10];
        c.read(5 * BLOCK, &mut buf).unwrap();
        assert_eq!(
            buf,
            base[5 * BLOCK as usize..5 * BLOCK as usize + 10],
            "a refused write changed nothing"
        );
    }
}
