//! A pair of real `ferry serve` processes in a temporary directory, and
//! the writer that drives the primary's NBD export.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry::cli::Client;
use ferry::cli::demo::Daemon;
use ferry::daemon::api::{AddVolume, SiteStatus, VolumeInfo, VolumeStatus};
use ferry::store::state::{Mode, SyncFallback};
use rand::{Rng, SeedableRng};

use crate::nbd_client::NbdClient;
use crate::oracle::Op;
use crate::proxy::Proxy;

pub const VOLUME: &str = "disk";
pub const SIZE: u64 = 32 << 20;

/// This program, which is also `ferry` when `CHAOS_AS_FERRY` is set: the
/// daemons under test are the library the runner was built with.
fn exe() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("chaos-tests"))
}

pub fn ferry(dir: &Path, args: &[&str]) -> Result<Output> {
    Ok(Command::new(exe())
        .env("CHAOS_AS_FERRY", "1")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()?)
}

pub fn ferry_ok(dir: &Path, args: &[&str]) -> Result<String> {
    let out = ferry(dir, args)?;
    if !out.status.success() {
        bail!("ferry {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub struct Site {
    pub dir: PathBuf,
    pub log: PathBuf,
    /// The I/O seam's control file (`fail ...` rules, `powerloss`).
    pub faults: PathBuf,
    pub daemon: Option<Daemon>,
}

impl Site {
    pub async fn start(&mut self) -> Result<()> {
        std::fs::write(&self.faults, "")?;
        let faults = self.faults.display().to_string();
        let mut d = Daemon::start_with_env(
            &exe(),
            &self.dir,
            &self.log,
            &[
                ("CHAOS_AS_FERRY", "1"),
                ("FERRY_FAULTS_FILE", &faults),
                ("FERRY_POWERLOSS", "writeback"),
                (
                    "FERRY_FSIO_TRACE",
                    &std::env::var("FERRY_FSIO_TRACE").unwrap_or_default(),
                ),
            ],
        )?;
        d.ready().await?;
        self.daemon = Some(d);
        Ok(())
    }

    pub fn kill9(&mut self) {
        if let Some(d) = self.daemon.as_mut() {
            d.kill9();
        }
        self.daemon = None;
    }

    /// The power cut: the seam drops every write no fsync covered and the
    /// process dies at once; `seed` (from the run's) draws which unsynced
    /// pages the page cache had written back.
    pub fn power_cut(&mut self, seed: u64) -> Result<()> {
        std::fs::write(&self.faults, format!("powerloss seed={seed}\n"))?;
        let Some(mut d) = self.daemon.take() else {
            return Ok(());
        };
        if !d.wait_exit(Duration::from_secs(10)) {
            d.kill9();
            bail!("{}: no power cut within 10 s", self.dir.display());
        }
        Ok(())
    }

    pub fn signal(&self, sig: i32) {
        if let Some(d) = &self.daemon {
            // SAFETY: kill only sends a signal to our own child.
            unsafe {
                libc::kill(d.pid() as libc::pid_t, sig);
            }
        }
    }

    /// The site's name (its directory's, as `ferry init --site` was given).
    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn set_faults(&self, rules: &str) -> Result<()> {
        Ok(std::fs::write(&self.faults, rules)?)
    }

    /// Faults the seam injected in this site's daemon (from its log).
    pub fn injected(&self) -> u64 {
        self.log_count("fsio: injected")
    }

    /// How often the daemon's log says `what` (since the site was made).
    pub fn log_count(&self, what: &str) -> u64 {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches(what)
            .count() as u64
    }

    pub async fn status(&self) -> Result<SiteStatus> {
        Client::new(&self.dir).get("/status").await
    }

    pub async fn volume(&self) -> Result<VolumeStatus> {
        self.status()
            .await?
            .volumes
            .into_iter()
            .find(|v| v.name == VOLUME)
            .context("no volume")
    }

    /// The volume's recovery points here (ids, oldest first).
    pub async fn points(&self) -> Result<Vec<u64>> {
        let pts: Vec<ferry::store::state::RecoveryPoint> = Client::new(&self.dir)
            .get(&format!("/volumes/{VOLUME}/points"))
            .await?;
        let mut ids: Vec<u64> = pts.into_iter().map(|p| p.id).collect();
        ids.sort();
        Ok(ids)
    }

    pub async fn wait_link(&self, within: Duration) -> Result<()> {
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if self.status().await.is_ok_and(|s| s.link.up) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("{}: the link did not come up", self.dir.display())
    }
}

pub struct Pair {
    /// The volume's primary site now, and its replica (they trade places
    /// in a failover).
    pub p: Site,
    pub d: Site,
    pub proxy: Option<Proxy>,
    /// The primary's image, and the replica's.
    pub img: PathBuf,
    pub rimg: PathBuf,
    /// The primary's image when the writer's log (the oracle) begins.
    pub initial: Vec<u8>,
    pub mode: Mode,
    /// What a sync volume's flush does when the DR site does not confirm
    /// it within the sync wait (10 s).
    pub fallback: SyncFallback,
    /// Last: the daemons stop before their directories go.
    pub tmp: tempfile::TempDir,
}

impl Pair {
    /// Two initialised, paired, running sites (the primary's link through
    /// a proxy when asked) and a seeded volume of `SIZE` bytes.
    /// `dr_point_interval`: the DR site makes a recovery point this often;
    /// `journal_max`: the primary's journal holds this much at most.
    pub async fn new_with(
        mode: Mode,
        fallback: SyncFallback,
        with_proxy: bool,
        seed: u64,
        dr_point_interval: Option<Duration>,
        journal_max: Option<u64>,
    ) -> Result<Pair> {
        let tmp = tempfile::Builder::new().prefix("ferry-chaos-").tempdir()?;
        let site = |name: &str| Site {
            dir: tmp.path().join(name),
            log: tmp.path().join(format!("{name}.log")),
            faults: tmp.path().join(format!("{name}.faults")),
            daemon: None,
        };
        let (mut p, mut d) = (site("primary"), site("dr"));
        for (s, name) in [(&p, "primary"), (&d, "dr")] {
            ferry_ok(&s.dir, &["init", "--site", name, "--listen", "127.0.0.1:0"])?;
        }
        if let Some(every) = dr_point_interval {
            let mut cfg = ferry::config::Config::load(&d.dir)?;
            cfg.point_interval = ferry::units::Dur(every);
            // Retention at once: the scenario checks what it prunes.
            cfg.retention.clock_settle = ferry::units::Dur(Duration::ZERO);
            cfg.save(&d.dir)?;
        }
        if let Some(max) = journal_max {
            let mut cfg = ferry::config::Config::load(&p.dir)?;
            cfg.limits.journal_bytes_max = ferry::units::ByteSize(max);
            cfg.save(&p.dir)?;
        }
        p.start().await?;
        d.start().await?;
        let token = ferry_ok(&d.dir, &["pair", "token", "--ttl", "10m"])?;
        ferry_ok(&p.dir, &["pair", "join", token.trim()])?;
        p.wait_link(Duration::from_secs(30)).await?;
        let mut proxy = None;
        if with_proxy {
            p.daemon = None; // SIGTERM
            let mut cfg = ferry::config::Config::load(&p.dir)?;
            let peer = cfg.peer.as_mut().context("no peer after pairing")?;
            let px = Proxy::start(peer.address, seed)?;
            peer.address = px.addr;
            cfg.save(&p.dir)?;
            proxy = Some(px);
            p.start().await?;
            p.wait_link(Duration::from_secs(30)).await?;
        }
        let img = tmp.path().join("disk.img");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut initial = vec![0u8; SIZE as usize];
        rng.fill(&mut initial[..4 << 20]);
        std::fs::write(&img, &initial)?;
        std::fs::File::open(&img)?.sync_all()?;
        let req = AddVolume {
            name: VOLUME.into(),
            path: img.display().to_string(),
            mode,
            interval_ms: 3_600_000,
            chunk_size: 65536,
            rpo_target_ms: 0,
            sync_wait_ms: 10_000,
            sync_fallback: fallback,
        };
        let _: VolumeInfo = Client::new(&p.dir).post("/volumes", &req).await?;
        let rimg = d.dir.join("replicas").join(format!("{VOLUME}.img"));
        let pair = Pair {
            p,
            d,
            proxy,
            img,
            rimg,
            initial,
            mode,
            fallback,
            tmp,
        };
        pair.wait_level(Duration::from_secs(90)).await?;
        Ok(pair)
    }

    pub fn replica(&self) -> PathBuf {
        self.rimg.clone()
    }

    /// After a failover: the sites trade roles, and the oracle starts
    /// again from `initial`, the new primary's state.
    pub fn swap_roles(&mut self, initial: Vec<u8>) {
        std::mem::swap(&mut self.p, &mut self.d);
        std::mem::swap(&mut self.img, &mut self.rimg);
        self.initial = initial;
    }

    /// Until the primary has nothing unacknowledged and no resync pending,
    /// and the DR side is consistent with its applier at rest.
    pub async fn wait_level(&self, within: Duration) -> Result<()> {
        let t0 = Instant::now();
        let mut last = (u64::MAX, Instant::now());
        loop {
            if t0.elapsed() > within {
                let (p, d) = (self.p.volume().await.ok(), self.d.volume().await.ok());
                bail!(
                    "not level within {within:?}: primary {:?}, DR {:?} {:?}",
                    p.and_then(|v| v.stream),
                    d.as_ref().map(|v| v.consistency.clone()),
                    d.and_then(|v| v.redo)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (Ok(p), Ok(d)) = (self.p.volume().await, self.d.volume().await) else {
                continue;
            };
            let Some(s) = p.stream else { continue };
            if s.resync_needed || s.resync_running || s.acked_seq + 1 < s.next_seq {
                continue;
            }
            let applied = d.redo.as_ref().map(|r| r.applied_seq).unwrap_or(0);
            if applied != last.0 {
                last = (applied, Instant::now());
            }
            if d.consistency == "consistent"
                && d.last_point.is_some()
                && (drained(&d) || last.1.elapsed() > Duration::from_secs(3))
            {
                return Ok(());
            }
        }
    }
}

/// The DR side has applied every record it received (none held for a
/// resync). An apply writes a whole flush epoch and fsyncs before its
/// sequence moves: a pause in the sequence alone does not mean the image
/// is still.
pub fn drained(v: &VolumeStatus) -> bool {
    v.redo
        .as_ref()
        .is_some_and(|r| !r.held && r.received_seq > 0 && r.applied_seq >= r.received_seq)
}

/// A writer on the primary's export: random 4-64 KiB writes and a flush
/// after every one to three, each logged with whether it was acknowledged.
pub struct Writer {
    pub stop: Arc<AtomicBool>,
    pub acked: Arc<AtomicUsize>,
    pub failed: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<Vec<Op>>,
}

impl Writer {
    pub fn start(socket: &Path, seed: u64) -> Result<Writer> {
        Self::paced(socket, seed, Duration::ZERO)
    }

    /// A writer that rests `pace` after each flush: for runs that wait long
    /// (a link's idle timeout), so that its log (every write's bytes, in
    /// memory) stays small.
    pub fn paced(socket: &Path, seed: u64, pace: Duration) -> Result<Writer> {
        let mut c = NbdClient::connect(socket, VOLUME)?;
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let (s, a, f) = (stop.clone(), acked.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut log = Vec::new();
            let mut errors_in_row = 0;
            while !s.load(Ordering::Relaxed) && errors_in_row < 20 {
                for _ in 0..rng.random_range(1..=3) {
                    let len = rng.random_range(1..=16u64) * 4096;
                    let off = rng.random_range(0..(SIZE - len) / 4096) * 4096;
                    let mut data = vec![0u8; len as usize];
                    rng.fill(&mut data[..]);
                    match c.write(off, &data) {
                        Ok(()) => log.push(Op::Write(off, data)),
                        Err(_) => {
                            log.push(Op::MaybeWrite(off, data));
                            errors_in_row += 1;
                        }
                    }
                }
                match c.flush() {
                    Ok(()) => {
                        log.push(Op::Flush);
                        a.fetch_add(1, Ordering::SeqCst);
                        errors_in_row = 0;
                        if !pace.is_zero() {
                            std::thread::sleep(pace);
                        }
                    }
                    Err(_) => {
                        log.push(Op::FailedFlush);
                        f.fetch_add(1, Ordering::SeqCst);
                        errors_in_row += 1;
                        // A fault may clear; a dead connection fails at once
                        // and ends the writer after a second or so.
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
            log
        });
        Ok(Writer {
            stop,
            acked,
            failed,
            thread,
        })
    }

    /// Waits (bounded) until `n` more flushes were acknowledged.
    pub async fn wait_acked(&self, n: usize, within: Duration) -> Result<()> {
        let want = self.acked.load(Ordering::SeqCst) + n;
        let t0 = Instant::now();
        while self.acked.load(Ordering::SeqCst) < want {
            if t0.elapsed() > within || self.thread.is_finished() {
                bail!(
                    "the writer got {} of {want} acknowledged flushes",
                    self.acked.load(Ordering::SeqCst)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    pub async fn finish(self) -> Vec<Op> {
        self.stop.store(true, Ordering::SeqCst);
        tokio::task::spawn_blocking(move || self.thread.join().unwrap_or_default())
            .await
            .unwrap_or_default()
    }
}
