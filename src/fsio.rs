//! The I/O seam: the writes, truncations, fsyncs, creations and removals of
//! the journal, the redo log, the images and the small state files go
//! through [`Io`], so that a test can make any of them fail and can
//! simulate a power loss.
//!
//! [`RealIo`] calls the OS. [`FaultyIo`] (chosen when `FERRY_FAULTS_FILE`
//! names a control file) calls the OS too, but first consults the rules in
//! that file, read again whenever it changes, one per line:
//!
//! ```text
//! fail OP PATH-PART [after=N] [times=M] [err=eio|enospc|torn]
//! powerloss [seed=N]
//! clock +SECONDS
//! ```
//!
//! `OP` is `write`, `sync`, `setlen`, `create`, `remove` or `any`; the rule
//! applies to operations on paths containing `PATH-PART`, lets the first `N`
//! of them through, then fails the next `M` (default: every one, until the
//! rule is removed). `torn` writes the first half of the data and then fails
//! with EIO. Every injected fault is logged (`fsio: injected ...`).
//! `clock` shifts the process's wall clock ([`crate::util::now_unix_ms`])
//! by that many seconds, either way: a clock jump.
//!
//! Power loss: with `FERRY_POWERLOSS=1`, the seam keeps, for every file it
//! writes, what an fsync has not yet made durable (the bytes each write
//! replaced, the length at the last fsync, files created or removed since
//! their directory was last synced). A failed fsync leaves its writes
//! undurable for good, as Linux does (it marks the pages clean), until they
//! are written again. The line `powerloss` in the control file stops every
//! I/O through the seam, puts every tracked file back to its durable state
//! and kills the process at once (with `FERRY_POWERLOSS=writeback`, which
//! pages the page cache wrote back before the cut is drawn from `seed`, so
//! that a run's cut is the same for the same writes): what a restart then finds is what a power
//! cut would have left of those files. RocksDB's files are not behind the
//! seam (the binding offers no custom environment); the store's durable
//! writes are synced by RocksDB's own write-ahead log.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

/// The file operations that durability depends on.
pub trait Io: Send + Sync {
    /// Writes all of `data` at `off`.
    fn write_at(&self, f: &File, path: &Path, data: &[u8], off: u64) -> io::Result<()>;
    fn set_len(&self, f: &File, path: &Path, len: u64) -> io::Result<()>;
    /// fsync (data and the metadata needed to read it back).
    fn sync(&self, f: &File, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (files created, removed or renamed) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Opens `path` for reading and writing, creating it when absent.
    fn open_rw(&self, path: &Path, create: bool) -> io::Result<File>;
    /// Opens the existing `path` for writing past the page cache
    /// (O_DIRECT), or `None` where that is not offered: the file system
    /// refuses the flag, or the seam must see every write through the
    /// cache (the power-cut simulator reads back what a write replaces).
    /// What such a handle writes is durable only after an fsync, as any
    /// other write.
    fn open_direct(&self, path: &Path) -> io::Result<Option<File>>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
}

/// The OS, nothing in between.
pub struct RealIo;

impl Io for RealIo {
    fn write_at(&self, f: &File, _path: &Path, data: &[u8], off: u64) -> io::Result<()> {
        f.write_all_at(data, off)
    }

    fn set_len(&self, f: &File, _path: &Path, len: u64) -> io::Result<()> {
        f.set_len(len)
    }

    fn sync(&self, f: &File, _path: &Path) -> io::Result<()> {
        f.sync_data()
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn open_rw(&self, path: &Path, create: bool) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
    }

    fn open_direct(&self, path: &Path) -> io::Result<Option<File>> {
        use std::os::unix::fs::OpenOptionsExt;
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
}

/// The process's seam: [`FaultyIo`] when `FERRY_FAULTS_FILE` is set, else
/// [`RealIo`] (a reference: the image write path takes no count per call).
pub fn global() -> &'static Arc<dyn Io> {
    static IO: OnceLock<Arc<dyn Io>> = OnceLock::new();
    IO.get_or_init(|| match std::env::var_os("FERRY_FAULTS_FILE") {
        Some(p) => {
            // `1`: a power cut drops every write no fsync covered;
            // `writeback`: it keeps a random half of their pages.
            let mode = std::env::var("FERRY_POWERLOSS").unwrap_or_default();
            let mut io = FaultyIo::new(mode == "1" || mode == "writeback");
            if mode == "writeback" {
                io = io.with_writeback();
            }
            let io = Arc::new(io);
            io.watch(PathBuf::from(p));
            io
        }
        None => Arc::new(RealIo),
    })
}

/// How many of `path`'s pages are in the page cache (tests of writes
/// made past it).
#[cfg(test)]
pub(crate) fn cached_pages(path: &Path) -> usize {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let page = 4096;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: a read-only shared mapping of a file we hold open, of its
    // length, unmapped before it is dropped; mincore writes one byte
    // per page into `vec`, which has one per page.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
        libc::munmap(p, len);
    }
    vec.iter().filter(|&&b| b & 1 == 1).count()
}

/// The host's boot id (`/proc/sys/kernel/random/boot_id`; empty if
/// unknown). Under the fault seam a simulated power cut counts as a reboot,
/// as a real one would: the id carries the number of cuts simulated so far
/// (kept beside the control file).
pub fn boot_id() -> String {
    let real = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    match std::env::var_os("FERRY_FAULTS_FILE") {
        Some(p) if !real.is_empty() => {
            let cuts = std::fs::read_to_string(boots_file(Path::new(&p))).unwrap_or_default();
            format!("{real}+{}", cuts.trim())
        }
        _ => real,
    }
}

fn boots_file(control: &Path) -> PathBuf {
    let mut p = control.as_os_str().to_owned();
    p.push(".boots");
    PathBuf::from(p)
}

static CLOCK_OFFSET_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// How far the control file's `clock +SECONDS` / `clock -SECONDS` line
/// shifts this process's wall clock (0 without one): a clock jump, for
/// the chaos tests. The monotonic clock does not move.
pub fn clock_offset_ms() -> i64 {
    CLOCK_OFFSET_MS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Which operation a rule names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Write,
    Sync,
    SetLen,
    Create,
    Remove,
    Any,
}

/// What a failing operation returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Eio,
    Enospc,
    /// Half the write lands, then EIO.
    Torn,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub op: Op,
    pub path_part: String,
    pub after: u64,
    pub times: Option<u64>,
    pub fault: Fault,
}

impl Rule {
    /// Parses one `fail ...` line.
    pub fn parse(line: &str) -> Result<Rule, String> {
        let mut words = line.split_whitespace();
        if words.next() != Some("fail") {
            return Err(format!("not a fail rule: {line:?}"));
        }
        let op = match words.next() {
            Some("write") => Op::Write,
            Some("sync") => Op::Sync,
            Some("setlen") => Op::SetLen,
            Some("create") => Op::Create,
            Some("remove") => Op::Remove,
            Some("any") => Op::Any,
            other => return Err(format!("unknown operation {other:?} in {line:?}")),
        };
        let path_part = words
            .next()
            .ok_or_else(|| format!("no path in {line:?}"))?
            .to_string();
        let mut rule = Rule {
            op,
            path_part,
            after: 0,
            times: None,
            fault: Fault::Eio,
        };
        for w in words {
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("{w:?} in {line:?} is not a number"))
            };
            match w.split_once('=') {
                Some(("after", v)) => rule.after = num(v)?,
                Some(("times", v)) => rule.times = Some(num(v)?),
                Some(("err", "eio")) => rule.fault = Fault::Eio,
                Some(("err", "enospc")) => rule.fault = Fault::Enospc,
                Some(("err", "torn")) => rule.fault = Fault::Torn,
                _ => return Err(format!("unknown word {w:?} in {line:?}")),
            }
        }
        Ok(rule)
    }

    fn matches(&self, op: Op, path: &Path) -> bool {
        (self.op == op || self.op == Op::Any) && path.to_string_lossy().contains(&self.path_part)
    }
}

/// The page cache's unit of writeback, for a power cut's model.
const PAGE: u64 = 4096;

/// One rule and how many operations it has seen.
struct Armed {
    text: String,
    rule: Rule,
    seen: u64,
}

/// What a file looks like to a power cut: the bytes each write since the
/// last fsync replaced (oldest first), and the length at that fsync.
#[derive(Default)]
struct Undurable {
    len_at_sync: Option<u64>,
    /// Resized since its last fsync: a power cut restores it whole (a
    /// truncation is metadata, all or nothing, unlike page writeback).
    resized: bool,
    undo: Vec<(u64, Vec<u8>)>,
    /// Old bytes a failed fsync left on the disk for good (until written again).
    lost: Vec<(u64, Vec<u8>)>,
}

#[derive(Default)]
struct Tracking {
    files: HashMap<PathBuf, Undurable>,
    /// Created since their directory was synced: gone after a power cut.
    created: Vec<PathBuf>,
    /// Removed since their directory was synced: (where, the stash holding it).
    removed: Vec<(PathBuf, PathBuf)>,
    /// Renamed since their directory was synced: (from, to, stash of the old `to`).
    renamed: Vec<(PathBuf, PathBuf, Option<PathBuf>)>,
    stash_n: u64,
}

/// The seam that fails operations on command and can simulate a power cut.
pub struct FaultyIo {
    rules: Mutex<Vec<Armed>>,
    powerloss: bool,
    /// A power cut keeps a random half of the pages written since their
    /// file's last fsync (the page cache wrote them back), not none.
    writeback: bool,
    tracking: Mutex<Tracking>,
    /// Every operation holds it shared; a power cut takes it alone.
    gate: RwLock<()>,
    injected: std::sync::atomic::AtomicU64,
    /// `FERRY_FSIO_TRACE=1`: every operation on stderr (debugging a run).
    trace: bool,
}

fn fault_error(f: Fault) -> io::Error {
    match f {
        Fault::Enospc => io::Error::from_raw_os_error(libc::ENOSPC),
        Fault::Eio | Fault::Torn => io::Error::from_raw_os_error(libc::EIO),
    }
}

/// Whether a power cut finds page `page` of `path` written back: one bit
/// of `blake3(seed, the path's last two parts, page)`, the same for the
/// same cut wherever the run's temporary directory is.
fn written_back_draw(seed: u64, path: &Path, page: u64) -> bool {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    for part in path.components().rev().take(2) {
        h.update(part.as_os_str().as_encoded_bytes());
        h.update(b"/");
    }
    h.update(&page.to_le_bytes());
    h.finalize().as_bytes()[0] & 1 == 1
}

/// Removes `[off, off+len)` from saved ranges, keeping what lies outside it.
fn cut_out(ranges: &mut Vec<(u64, Vec<u8>)>, off: u64, len: u64) {
    let end = off + len;
    let mut out = Vec::with_capacity(ranges.len());
    for (o, b) in ranges.drain(..) {
        let e = o + b.len() as u64;
        if e <= off || o >= end {
            out.push((o, b));
            continue;
        }
        if o < off {
            out.push((o, b[..(off - o) as usize].to_vec()));
        }
        if e > end {
            out.push((end, b[(end - o) as usize..].to_vec()));
        }
    }
    *ranges = out;
}

impl FaultyIo {
    pub fn new(powerloss: bool) -> FaultyIo {
        FaultyIo {
            rules: Mutex::new(Vec::new()),
            powerloss,
            writeback: false,
            tracking: Mutex::new(Tracking::default()),
            gate: RwLock::new(()),
            injected: std::sync::atomic::AtomicU64::new(0),
            trace: std::env::var("FERRY_FSIO_TRACE").is_ok_and(|v| v == "1"),
        }
    }

    /// See `writeback`.
    pub fn with_writeback(mut self) -> FaultyIo {
        self.writeback = true;
        self
    }

    fn note(&self, what: std::fmt::Arguments<'_>) {
        if self.trace {
            eprintln!("fsio-trace: {what}");
        }
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Replaces the rules; a rule whose line is unchanged keeps its count.
    /// `Some(seed)` when the text asks for a power cut.
    pub fn set_rules(&self, text: &str) -> Result<Option<u64>, String> {
        let mut powerloss = None;
        let mut clock = 0i64;
        let mut next = Vec::new();
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(rest) = line.strip_prefix("powerloss") {
                let rest = rest.trim();
                powerloss = Some(if rest.is_empty() {
                    rand::random::<u64>()
                } else {
                    rest.strip_prefix("seed=")
                        .and_then(|v| v.parse::<u64>().ok())
                        .ok_or_else(|| format!("powerloss takes seed=N, not {rest:?}"))?
                });
                continue;
            }
            if let Some(v) = line.strip_prefix("clock ") {
                clock = v
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| format!("clock offset {v:?} is not a number of seconds"))?;
                continue;
            }
            let rule = Rule::parse(line)?;
            let seen = rules
                .iter()
                .find(|a| a.text == line)
                .map(|a| a.seen)
                .unwrap_or(0);
            next.push(Armed {
                text: line.to_string(),
                rule,
                seen,
            });
        }
        *rules = next;
        CLOCK_OFFSET_MS.store(
            clock.saturating_mul(1000),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(powerloss)
    }

    /// Polls the control file (every 10 ms) in a thread of its own.
    fn watch(self: &Arc<Self>, path: PathBuf) {
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("fsio-faults".into())
            .spawn(move || {
                let mut last = String::new();
                loop {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    if text != last {
                        match me.set_rules(&text) {
                            Ok(Some(seed)) => me.power_cut(seed),
                            Ok(None) => eprintln!("fsio: rules now {:?}", text.trim()),
                            Err(e) => eprintln!("fsio: control file {}: {e}", path.display()),
                        }
                        last = text;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            });
        if let Err(e) = spawned {
            eprintln!("fsio: cannot watch the control file: {e}");
        }
    }

    /// The fault for this operation, if a rule says so (and counts it).
    fn check(&self, op: Op, path: &Path) -> Option<Fault> {
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        for a in rules.iter_mut() {
            if !a.rule.matches(op, path) {
                continue;
            }
            a.seen += 1;
            let fires =
                a.seen > a.rule.after && a.rule.times.is_none_or(|t| a.seen <= a.rule.after + t);
            if fires {
                self.injected
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                eprintln!(
                    "fsio: injected {:?} on {op:?} of {} (rule {:?})",
                    a.rule.fault,
                    path.display(),
                    a.text
                );
                return Some(a.rule.fault);
            }
        }
        None
    }

    fn track(&self) -> std::sync::MutexGuard<'_, Tracking> {
        self.tracking.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Saves what a write or truncation of `path` is about to replace.
    fn save(&self, f: &File, path: &Path, off: u64, len: u64) -> io::Result<()> {
        if !self.powerloss {
            return Ok(());
        }
        let cur = f.metadata()?.len();
        let mut t = self.track();
        let u = t.files.entry(path.to_path_buf()).or_default();
        if u.len_at_sync.is_none() {
            u.len_at_sync = Some(cur);
        }
        let end = (off + len).min(cur);
        if end > off {
            let mut old = vec![0u8; (end - off) as usize];
            f.read_exact_at(&mut old, off)?;
            u.undo.push((off, old));
        }
        Ok(())
    }

    /// Stops every I/O, puts every tracked file back to what an fsync made
    /// durable, and dies (as a power cut would leave the files).
    pub fn power_cut(&self, seed: u64) -> ! {
        let _all = self.gate.write().unwrap_or_else(|p| p.into_inner());
        eprintln!("fsio: power cut (seed {seed}): dropping every write no fsync covered");
        self.restore_durable(seed);
        // The next start is in another boot of the host.
        if let Some(p) = std::env::var_os("FERRY_FAULTS_FILE") {
            let f = boots_file(Path::new(&p));
            let n: u64 = std::fs::read_to_string(&f)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            let _ = std::fs::write(&f, format!("{}\n", n + 1));
        }
        // SAFETY: _exit ends the process at once, as a power cut would.
        unsafe { libc::_exit(137) }
    }

    /// Puts every tracked file back to what an fsync made durable; with
    /// writeback, `seed` draws which unsynced pages had reached the disk.
    pub fn restore_durable(&self, seed: u64) {
        let mut t = self.track();
        // Each file's own undurable writes first, at the path it has now
        // (a removed file's stash, a renamed file's new name); then the
        // directory changes no sync made durable.
        for (path, u) in t.files.drain() {
            let Ok(f) = OpenOptions::new().write(true).open(&path) else {
                continue;
            };
            // The page cache may have written some pages back before the
            // cut, in any order: each 4 KiB page within the synced length
            // holds either its last content or its durable one (drawn from
            // the seed, the file and the page); past that length nothing
            // survives.
            let synced_len = u.len_at_sync.unwrap_or(0);
            let mut kept: HashMap<u64, bool> = HashMap::new();
            for (off, old) in u.undo.iter().rev() {
                let mut at = 0usize;
                while at < old.len() {
                    let pos = off + at as u64;
                    let page = pos / PAGE;
                    let n = ((page + 1) * PAGE - pos).min((old.len() - at) as u64) as usize;
                    let written_back = self.writeback
                        && !u.resized
                        && (page + 1) * PAGE <= synced_len
                        && *kept
                            .entry(page)
                            .or_insert_with(|| written_back_draw(seed, &path, page));
                    if !written_back {
                        let _ = f.write_all_at(&old[at..at + n], pos);
                    }
                    at += n;
                }
            }
            for (off, old) in u.lost.iter().rev() {
                let _ = f.write_all_at(old, *off);
            }
            if let Some(len) = u.len_at_sync {
                let _ = f.set_len(len);
            }
            let _ = f.sync_all();
        }
        for (from, to, stash) in t.renamed.drain(..).rev() {
            let _ = std::fs::rename(&to, &from);
            if let Some(s) = stash {
                let _ = std::fs::rename(&s, &to);
            }
        }
        for (path, stash) in t.removed.drain(..).rev() {
            let _ = std::fs::rename(&stash, &path);
        }
        for path in t.created.drain(..) {
            let _ = std::fs::remove_file(&path);
        }
    }

    fn stash_path(t: &mut Tracking, path: &Path) -> PathBuf {
        t.stash_n += 1;
        let name = format!(".fsio-stash-{}-{}", std::process::id(), t.stash_n);
        path.parent().unwrap_or(Path::new(".")).join(name)
    }
}

/// Whether `f` was opened with O_DIRECT.
fn is_direct(f: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL only reads the flags of a descriptor `f` keeps open.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_DIRECT != 0
}

fn parent_of(p: &Path) -> &Path {
    p.parent().unwrap_or(Path::new("."))
}

impl Io for FaultyIo {
    fn write_at(&self, f: &File, path: &Path, data: &[u8], off: u64) -> io::Result<()> {
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let fault = self.check(Op::Write, path);
        let n = match fault {
            None => data.len(),
            // Torn on a sector boundary for a handle that writes past the
            // cache (which refuses any other length).
            Some(Fault::Torn) if is_direct(f) => data.len() / 2 / 4096 * 4096,
            Some(Fault::Torn) => data.len() / 2,
            Some(_) => 0,
        };
        self.save(f, path, off, n as u64)?;
        self.note(format_args!("write {} {off} {n}", path.display()));
        f.write_all_at(&data[..n], off)?;
        if self.powerloss && n > 0 {
            let mut t = self.track();
            if let Some(u) = t.files.get_mut(path) {
                cut_out(&mut u.lost, off, n as u64);
            }
        }
        match fault {
            Some(f) => Err(fault_error(f)),
            None => Ok(()),
        }
    }

    fn set_len(&self, f: &File, path: &Path, len: u64) -> io::Result<()> {
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        if let Some(fault) = self.check(Op::SetLen, path) {
            return Err(fault_error(fault));
        }
        let cur = f.metadata()?.len();
        self.note(format_args!("set-len {} {cur} -> {len}", path.display()));
        if len < cur {
            self.save(f, path, len, cur - len)?;
        } else {
            self.save(f, path, cur, 0)?;
        }
        if self.powerloss {
            self.track()
                .files
                .entry(path.to_path_buf())
                .or_default()
                .resized = true;
        }
        f.set_len(len)
    }

    fn sync(&self, f: &File, path: &Path) -> io::Result<()> {
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        if let Some(fault) = self.check(Op::Sync, path) {
            if self.powerloss {
                // As Linux does: the pages are marked clean, the writes
                // stay lost however often fsync is called again.
                let mut t = self.track();
                if let Some(u) = t.files.get_mut(path) {
                    let undo = std::mem::take(&mut u.undo);
                    u.lost.extend(undo);
                }
            }
            return Err(fault_error(fault));
        }
        // Only what was written before the fsync began is durable by it: a
        // write racing it (a journal append while a flush's fsync runs
        // without the volume's lock) may not be.
        let before = if self.powerloss {
            self.track().files.get(path).map_or(0, |u| u.undo.len())
        } else {
            0
        };
        let len_before = f.metadata().map(|m| m.len()).ok();
        f.sync_data()?;
        self.note(format_args!("sync {}", path.display()));
        if self.powerloss {
            let mut t = self.track();
            if let Some(u) = t.files.get_mut(path) {
                u.undo.drain(..before.min(u.undo.len()));
                u.len_at_sync = if u.undo.is_empty() {
                    None
                } else {
                    len_before.or(u.len_at_sync)
                };
            }
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        if let Some(fault) = self.check(Op::Sync, dir) {
            return Err(fault_error(fault));
        }
        File::open(dir)?.sync_all()?;
        self.note(format_args!("sync-dir {}", dir.display()));
        if self.powerloss {
            let mut t = self.track();
            t.created.retain(|p| parent_of(p) != dir);
            let (gone, kept): (Vec<_>, Vec<_>) =
                t.removed.drain(..).partition(|(p, _)| parent_of(p) == dir);
            t.removed = kept;
            for (_, stash) in gone {
                let _ = std::fs::remove_file(stash);
            }
            let (done, kept): (Vec<_>, Vec<_>) = t
                .renamed
                .drain(..)
                .partition(|(_, to, _)| parent_of(to) == dir);
            t.renamed = kept;
            for (_, _, stash) in done {
                if let Some(s) = stash {
                    let _ = std::fs::remove_file(s);
                }
            }
        }
        Ok(())
    }

    fn open_rw(&self, path: &Path, create: bool) -> io::Result<File> {
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let existed = path.exists();
        if create
            && !existed
            && let Some(fault) = self.check(Op::Create, path)
        {
            return Err(fault_error(fault));
        }
        let f = RealIo.open_rw(path, create)?;
        self.note(format_args!("open {} created={}", path.display(), !existed));
        if self.powerloss && !existed {
            self.track().created.push(path.to_path_buf());
        }
        Ok(f)
    }

    fn open_direct(&self, path: &Path) -> io::Result<Option<File>> {
        if self.powerloss {
            // The power-cut simulator reads back what each write replaces
            // through the handle written with (`save`): this write-only
            // handle cannot. Its callers write through their buffered
            // handle, which a power cut treats the same way.
            return Ok(None);
        }
        // Injected failures (`fail`, `enospc`, `torn`) reach direct writes
        // as any other.
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        RealIo.open_direct(path)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        if let Some(fault) = self.check(Op::Remove, path) {
            return Err(fault_error(fault));
        }
        self.note(format_args!("remove {}", path.display()));
        if !self.powerloss {
            return std::fs::remove_file(path);
        }
        let mut t = self.track();
        if let Some(i) = t.created.iter().position(|p| p == path) {
            t.created.remove(i);
            t.files.remove(path);
            return std::fs::remove_file(path);
        }
        let stash = Self::stash_path(&mut t, path);
        std::fs::rename(path, &stash)?;
        // The file's own undurable writes go with it, kept for a power cut.
        if let Some(u) = t.files.remove(path) {
            t.files.insert(stash.clone(), u);
        }
        t.removed.push((path.to_path_buf(), stash));
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        if let Some(fault) = self.check(Op::Create, to) {
            return Err(fault_error(fault));
        }
        if !self.powerloss {
            return std::fs::rename(from, to);
        }
        let mut t = self.track();
        let stash = if to.exists() {
            let s = Self::stash_path(&mut t, to);
            std::fs::rename(to, &s)?;
            Some(s)
        } else {
            None
        };
        std::fs::rename(from, to)?;
        if let Some(u) = t.files.remove(from) {
            t.files.insert(to.to_path_buf(), u);
        }
        t.renamed
            .push((from.to_path_buf(), to.to_path_buf(), stash));
        Ok(())
    }
}

/// Replaces `path` with `data` through the seam, so that a crash leaves
/// either the old or the new content, never a torn file.
pub fn write_atomic(io: &dyn Io, path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let f = io.open_rw(&tmp, true)?;
        io.set_len(&f, &tmp, 0)?;
        io.write_at(&f, &tmp, data, 0)?;
        io.sync(&f, &tmp)?;
    }
    io.rename(&tmp, path)?;
    io.sync_dir(parent_of(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_fail_the_nth_matching_operation() {
        let d = tempfile::tempdir().unwrap();
        let io = FaultyIo::new(false);
        io.set_rules("fail sync seg after=1 times=1 err=enospc\n# note\n")
            .unwrap();
        let p = d.path().join("seg");
        let f = io.open_rw(&p, true).unwrap();
        io.sync(&f, &p).unwrap();
        let e = io.sync(&f, &p).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        io.sync(&f, &p).unwrap();
        assert_eq!(io.injected(), 1);
        assert!(Rule::parse("fail frob x").is_err());
        assert!(Rule::parse("fail write x after=y").is_err());
    }

    /// Injected faults reach a handle that writes past the page cache; a
    /// torn write there tears on a sector boundary (the kernel refuses any
    /// other length). The power-cut simulator offers no such handle.
    #[test]
    fn a_direct_handle_takes_injected_faults_and_tears_on_a_sector() {
        let d = tempfile::tempdir().unwrap();
        let io = FaultyIo::new(false);
        let p = d.path().join("img");
        let f = io.open_rw(&p, true).unwrap();
        f.set_len(1 << 20).unwrap();
        let direct = io
            .open_direct(&p)
            .unwrap()
            .expect("ext4 and xfs take O_DIRECT");
        assert!(is_direct(&direct) && !is_direct(&f));
        let mut buf = vec![0u8; 3 * 4096 + 4096];
        let at = buf.as_ptr().align_offset(4096);
        let block = &mut buf[at..at + 3 * 4096];
        block.fill(7);
        io.set_rules("fail write img times=1 err=torn").unwrap();
        let e = io.write_at(&direct, &p, block, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        let got = std::fs::read(&p).unwrap();
        assert!(got[..4096].iter().all(|&b| b == 7), "one sector written");
        assert!(got[4096..].iter().all(|&b| b == 0), "the rest not");
        io.write_at(&direct, &p, block, 0).unwrap();
        assert_eq!(io.injected(), 1);
        assert!(FaultyIo::new(true).open_direct(&p).unwrap().is_none());
    }

    #[test]
    fn a_power_cut_keeps_only_what_fsync_made_durable() {
        let d = tempfile::tempdir().unwrap();
        let io = FaultyIo::new(true);
        let p = d.path().join("img");
        std::fs::write(&p, vec![1u8; 100]).unwrap();
        let f = io.open_rw(&p, false).unwrap();
        io.write_at(&f, &p, &[2u8; 10], 0).unwrap();
        io.sync(&f, &p).unwrap();
        io.write_at(&f, &p, &[3u8; 10], 5).unwrap();
        io.write_at(&f, &p, &[4u8; 50], 90).unwrap();
        // A failed fsync loses its writes for good, unless written again.
        io.set_rules("fail sync img times=1").unwrap();
        io.write_at(&f, &p, &[5u8; 4], 20).unwrap();
        io.write_at(&f, &p, &[6u8; 4], 30).unwrap();
        assert!(io.sync(&f, &p).is_err());
        io.write_at(&f, &p, &[7u8; 2], 30).unwrap();
        io.sync(&f, &p).unwrap();
        let q = d.path().join("new");
        let g = io.open_rw(&q, true).unwrap();
        io.write_at(&g, &q, b"x", 0).unwrap();
        io.sync(&g, &q).unwrap();
        // Undo by hand, as power_cut does, without dying.
        let mut t = io.track();
        for (path, u) in t.files.drain() {
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            for (off, old) in u.undo.iter().rev().chain(u.lost.iter().rev()) {
                f.write_all_at(old, *off).unwrap();
            }
            if let Some(len) = u.len_at_sync {
                f.set_len(len).unwrap();
            }
        }
        for c in t.created.drain(..) {
            std::fs::remove_file(c).unwrap();
        }
        let got = std::fs::read(&p).unwrap();
        // The writes before the failed fsync are lost (the extension's
        // length stays: lengths are not modelled for a failed fsync); the
        // one written again after it is kept.
        let mut want = vec![1u8; 140];
        want[..10].fill(2);
        want[30..32].fill(7);
        want[100..].fill(4);
        assert_eq!(got, want, "synced writes kept, the failed fsync's lost");
        assert!(
            !q.exists(),
            "a file whose directory was never synced is gone"
        );
    }

    /// The pages a writeback power cut keeps, for one seed.
    fn cut_with_writeback(seed: u64) -> Vec<u8> {
        let d = tempfile::tempdir().unwrap();
        let io = FaultyIo::new(true).with_writeback();
        std::fs::create_dir(d.path().join("vol")).unwrap();
        let p = d.path().join("vol/img");
        let pages = 64 * PAGE as usize;
        std::fs::write(&p, vec![1u8; pages]).unwrap();
        let f = io.open_rw(&p, false).unwrap();
        io.sync(&f, &p).unwrap();
        io.write_at(&f, &p, &vec![2u8; pages], 0).unwrap();
        io.restore_durable(seed);
        std::fs::read(&p)
            .unwrap()
            .chunks(PAGE as usize)
            .map(|page| {
                assert!(page.iter().all(|b| *b == page[0]), "a page is whole");
                page[0]
            })
            .collect()
    }

    #[test]
    fn a_writeback_power_cut_is_drawn_from_its_seed() {
        let a = cut_with_writeback(7);
        assert_eq!(a, cut_with_writeback(7), "the same seed, the same pages");
        assert!(
            a.contains(&1) && a.contains(&2),
            "some pages reached the disk and some did not: {a:?}"
        );
        assert_ne!(a, cut_with_writeback(8), "another seed, other pages");
        let io = FaultyIo::new(true);
        assert_eq!(io.set_rules("powerloss seed=42").unwrap(), Some(42));
        assert!(io.set_rules("powerloss seed=x").is_err());
        assert_eq!(io.set_rules("fail sync x").unwrap(), None);
    }
}
