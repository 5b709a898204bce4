//! The scenarios: each sets up a pair, drives writes, injects its faults
//! on a schedule drawn from the run's seed, and checks the invariants
//! (DESIGN.md section 3) after every fault.

use std::time::Duration;

use anyhow::{Result, bail};
use ferry::store::state::{Mode, SyncFallback};
use rand::{Rng, SeedableRng};

use crate::oracle::{self, Op};
use crate::proxy::{Impair, Leg};
use crate::site::{Pair, Site, VOLUME, Writer, drained, ferry, ferry_ok};

pub const ALL: &[&str] = &[
    "kill9-primary",
    "kill9-dr",
    "powerloss-primary",
    "powerloss-dr",
    "sigstop",
    "partition",
    "flapping",
    "wan",
    "slow-link",
    "disk-image-fsync",
    "disk-journal-fsync",
    "disk-journal-enospc",
    "disk-redo-fsync",
    "disk-replica-fsync",
    "disk-redo-enospc",
    "disk-replica-eio",
    "clock-jump",
    "switchover",
    "forced-failover",
    "split-brain",
    "stays-primary",
    "bit-flip",
];

/// What one run did and found.
#[derive(Default)]
pub struct Outcome {
    pub faults: u64,
    pub violations: Vec<String>,
    pub written: u64,
    pub verified: u64,
}

struct Run {
    rng: rand::rngs::StdRng,
    seed: u64,
    log: Vec<Op>,
    out: Outcome,
}

impl Run {
    fn violation(&mut self, what: String) {
        eprintln!("    VIOLATION: {what}");
        self.out.violations.push(what);
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.rng.random_range(lo..=hi))
    }

    fn writer(&mut self, pair: &Pair) -> Result<Writer> {
        let seed = self.rng.random();
        Writer::start(&pair.p.dir.join("nbd.sock"), seed)
    }

    /// Ends a writer and adds its history. Its writes after its last
    /// acknowledged flush were never promised: a crash or power cut of the
    /// server may take them, and a later writer's flush (on another
    /// connection, to a restarted server) does not bring them back. They
    /// count as failed writes (anything until written again).
    async fn finish(&mut self, w: Writer) {
        let mut log = w.finish().await;
        let last = log.iter().rposition(|o| matches!(o, Op::Flush));
        for op in log.iter_mut().skip(last.map_or(0, |i| i + 1)) {
            if let Op::Write(off, data) = op {
                *op = Op::MaybeWrite(*off, std::mem::take(data));
            }
        }
        self.log.extend(log);
    }

    /// Invariant 7 at the primary: its image holds every write an
    /// acknowledged flush covered.
    fn check_primary(&mut self, pair: &Pair) -> Result<()> {
        let image = std::fs::read(&pair.img)?;
        for v in oracle::check_durable(&pair.initial, &self.log, &image) {
            self.violation(format!("primary image: {v}"));
        }
        self.out.verified += image.len() as u64;
        Ok(())
    }

    /// Invariants 2 and 3 at the DR site after the primary's loss: its
    /// image is exactly one flush state, and in sync mode one at or after
    /// the last acknowledged flush.
    async fn check_replica_after_loss(&mut self, pair: &Pair) -> Result<()> {
        let t0 = std::time::Instant::now();
        let mut last = (u64::MAX, std::time::Instant::now());
        loop {
            let v = pair.d.volume().await?;
            let applied = v.redo.as_ref().map(|r| r.applied_seq).unwrap_or(0);
            // Records after the last flush record are never applied: the
            // applier rests at the last complete flush epoch. An apply
            // writes a whole epoch and fsyncs before the sequence moves, so
            // only a drained redo log or a long pause means the image is
            // still.
            if applied != last.0 {
                last = (applied, std::time::Instant::now());
            }
            if v.consistency == "consistent"
                && (drained(&v) || last.1.elapsed() > Duration::from_secs(3))
            {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                self.violation(format!(
                    "the DR site did not settle to a consistent image: {} {:?}",
                    v.consistency, v.redo
                ));
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let image = std::fs::read(pair.replica())?;
        self.out.verified += image.len() as u64;
        let acked = oracle::acked_flushes(&self.log);
        match oracle::flush_state(&pair.initial, &self.log, &image) {
            None => {
                let (k, n, first) = oracle::nearest_state(&pair.initial, &self.log, &image);
                self.violation(format!(
                    "the DR image after the primary's loss is no flush state of the writer (nearest: flush {k} of {acked}, {n} blocks differ, the first at {first:?})"
                ))
            }
            Some(k) if pair.mode == Mode::Sync && k < acked => self.violation(format!(
                "sync volume: the DR image holds flush {k} of {acked} acknowledged"
            )),
            Some(_) => {}
        }
        Ok(())
    }

    /// The last record the DR site has acknowledged as durable (the
    /// primary's view, a lower bound: it only grows until a cut). One of
    /// 0 checks nothing, and says so.
    async fn dr_acked(&mut self, pair: &Pair) -> Result<u64> {
        let bound = pair
            .p
            .volume()
            .await?
            .stream
            .map(|s| s.acked_seq)
            .unwrap_or(0);
        if bound == 0 {
            self.violation(
                "the DR site had acknowledged nothing before its loss: nothing checked".into(),
            );
        }
        Ok(bound)
    }

    /// After the DR site's restart, its redo log holds at least every
    /// record it acknowledged as durable before the cut.
    async fn check_dr_holds(&mut self, pair: &Pair, bound: u64, after: &str) -> Result<()> {
        let got = pair
            .d
            .volume()
            .await?
            .redo
            .map(|x| x.received_seq)
            .unwrap_or(0);
        if got < bound {
            self.violation(format!(
                "the DR site acknowledged record {bound} as durable but holds only {got} after {after}"
            ));
        }
        Ok(())
    }

    /// The end of every run: writes go on, both sites level, and the DR
    /// image equals the primary's, which holds every acknowledged flush.
    async fn converge(&mut self, pair: &mut Pair) -> Result<()> {
        if let Some(px) = &pair.proxy {
            px.set(Impair::default());
        }
        pair.p.set_faults("")?;
        pair.d.set_faults("")?;
        let w = self.writer(pair)?;
        let r = w.wait_acked(5, Duration::from_secs(60)).await;
        self.finish(w).await;
        if let Err(e) = r {
            self.violation(format!("writes do not go on after the faults: {e}"));
            return Ok(());
        }
        if let Err(e) = pair.wait_level(Duration::from_secs(120)).await {
            self.violation(format!("the sites do not level after the faults: {e}"));
            return Ok(());
        }
        self.check_primary(pair)?;
        let (a, b) = (std::fs::read(&pair.img)?, std::fs::read(pair.replica())?);
        self.out.verified += b.len() as u64;
        if a != b {
            let first = a.iter().zip(&b).position(|(x, y)| x != y);
            self.violation(format!(
                "the level DR image differs from the primary's (first at byte {first:?})"
            ));
        }
        Ok(())
    }
}

fn mode_for(rng: &mut rand::rngs::StdRng) -> Mode {
    if rng.random_bool(0.5) {
        Mode::Sync
    } else {
        Mode::Async
    }
}

pub async fn run(name: &str, seed: u64) -> Result<Outcome> {
    let mut r = Run {
        rng: rand::rngs::StdRng::seed_from_u64(seed),
        seed,
        log: Vec::new(),
        out: Outcome::default(),
    };
    let proxy = matches!(
        name,
        "partition"
            | "flapping"
            | "wan"
            | "slow-link"
            | "forced-failover"
            | "split-brain"
            | "stays-primary"
    );
    let mode = match name {
        "partition" | "flapping" | "slow-link" => Mode::Async,
        _ => mode_for(&mut r.rng),
    };
    let every = (name == "clock-jump").then_some(Duration::from_secs(1));
    // A forced failover of a sync volume whose flushes fail rather than
    // degrade when the DR site is gone: nothing acknowledged may be lost.
    let fallback = if name == "forced-failover" && mode == Mode::Sync && r.rng.random_bool(0.5) {
        SyncFallback::Fail
    } else {
        SyncFallback::Degrade
    };
    // A link slower than the writer fills a journal of 1 MiB again and
    // again: resyncs, each reading the chunks written since the last scan,
    // superseded while the writes go on.
    let journal_max = (name == "slow-link").then_some(1 << 20);
    let mut pair = Pair::new_with(mode, fallback, proxy, r.seed, every, journal_max).await?;
    eprintln!(
        "  {name} seed {seed}: {mode:?} volume (fallback {fallback:?}) at {}",
        pair.tmp.path().display()
    );
    match name {
        "kill9-primary" | "powerloss-primary" => primary_loss(&mut r, &mut pair, name).await?,
        "kill9-dr" | "powerloss-dr" => dr_loss(&mut r, &mut pair, name).await?,
        "sigstop" => sigstop(&mut r, &mut pair).await?,
        "partition" | "flapping" => partitions(&mut r, &mut pair, name == "flapping").await?,
        "wan" | "slow-link" => wan(&mut r, &mut pair, name == "slow-link").await?,
        n if n.starts_with("disk-") => disk(&mut r, &mut pair, n).await?,
        "clock-jump" => clock_jump(&mut r, &mut pair).await?,
        "switchover" => switchover(&mut r, &mut pair).await?,
        "forced-failover" => forced_failover(&mut r, &mut pair).await?,
        "split-brain" => split_brain(&mut r, &mut pair).await?,
        "stays-primary" => stays_primary(&mut r, &mut pair).await?,
        "bit-flip" => bit_flip(&mut r, &mut pair).await?,
        other => bail!("no scenario {other:?} (one of {ALL:?}, or all)"),
    }
    r.converge(&mut pair).await?;
    r.out.faults += pair.p.injected() + pair.d.injected();
    r.out.written += oracle::acked_bytes(&r.log);
    if !r.out.violations.is_empty() {
        // Kept for a look: the directory and both logs.
        let kept = pair.tmp.keep();
        let _ = std::fs::write(kept.join("writer.log"), oracle::listing(&r.log));
        eprintln!(
            "    kept {} (the writer's log in writer.log)",
            kept.display()
        );
    }
    Ok(r.out)
}

async fn primary_loss(r: &mut Run, pair: &mut Pair, name: &str) -> Result<()> {
    let w = r.writer(pair)?;
    let n = r.rng.random_range(5..40);
    w.wait_acked(n, Duration::from_secs(60)).await?;
    tokio::time::sleep(r.ms(0, 300)).await;
    if name == "kill9-primary" {
        pair.p.kill9();
    } else {
        pair.p.power_cut(r.rng.random())?;
    }
    r.out.faults += 1;
    r.finish(w).await;
    if oracle::acked_flushes(&r.log) < n {
        r.violation("the writer's acknowledgments were not seen: nothing checked".into());
    }
    r.check_replica_after_loss(pair).await?;
    pair.p.start().await?;
    wait_stream(&pair.p).await?;
    r.check_primary(pair)?;
    pair.p.wait_link(Duration::from_secs(30)).await?;
    Ok(())
}

/// Waits until a restarted primary has its volume open (journal replayed).
async fn wait_stream(s: &Site) -> Result<()> {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if s.volume().await.is_ok_and(|v| v.stream.is_some()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the restarted primary did not open its volume")
}

async fn dr_loss(r: &mut Run, pair: &mut Pair, name: &str) -> Result<()> {
    let w = r.writer(pair)?;
    w.wait_acked(r.rng.random_range(5..40), Duration::from_secs(60))
        .await?;
    tokio::time::sleep(r.ms(0, 300)).await;
    let bound = r.dr_acked(pair).await?;
    if name == "kill9-dr" {
        pair.d.kill9();
    } else {
        pair.d.power_cut(r.rng.random())?;
    }
    r.out.faults += 1;
    tokio::time::sleep(r.ms(200, 2000)).await;
    pair.d.start().await?;
    r.check_dr_holds(pair, bound, "its restart").await?;
    w.wait_acked(3, Duration::from_secs(60)).await?;
    r.finish(w).await;
    Ok(())
}

async fn sigstop(r: &mut Run, pair: &mut Pair) -> Result<()> {
    let w = r.writer(pair)?;
    w.wait_acked(5, Duration::from_secs(60)).await?;
    for _ in 0..r.rng.random_range(2..=3) {
        let site = if r.rng.random_bool(0.5) {
            &pair.p
        } else {
            &pair.d
        };
        site.signal(libc::SIGSTOP);
        r.out.faults += 1;
        tokio::time::sleep(r.ms(500, 4000)).await;
        site.signal(libc::SIGCONT);
        w.wait_acked(3, Duration::from_secs(60)).await?;
    }
    r.finish(w).await;
    Ok(())
}

async fn partitions(r: &mut Run, pair: &mut Pair, flapping: bool) -> Result<()> {
    // Paced: an async volume's writes do not wait for the link, and the
    // oracle keeps every byte (unpaced, some 5 GB a run).
    let w = Writer::paced(&pair.p.dir.join("nbd.sock"), r.rng.random(), PACE)?;
    w.wait_acked(5, Duration::from_secs(60)).await?;
    let cycles = if flapping { 8 } else { 3 };
    for k in 0..cycles {
        let (up, down) = match r.rng.random_range(0..3) {
            0 => (true, false),
            1 => (false, true),
            _ => (true, true),
        };
        let px = pair.proxy.as_ref().expect("a proxy");
        px.set(Impair {
            up: Leg {
                cut: up,
                ..Leg::default()
            },
            down: Leg {
                cut: down,
                ..Leg::default()
            },
        });
        r.out.faults += 1;
        let cut = if flapping {
            r.ms(200, 1500)
        } else if k == 0 {
            // One long cut a run: past the QUIC idle timeout (10 s), the
            // link is down and redialed, and the journal waits.
            r.ms(10_000, 60_000)
        } else {
            r.ms(1000, 8000)
        };
        tokio::time::sleep(cut).await;
        px.set(Impair::default());
        tokio::time::sleep(if flapping {
            r.ms(200, 1500)
        } else {
            r.ms(500, 2000)
        })
        .await;
    }
    w.wait_acked(3, Duration::from_secs(60)).await?;
    r.finish(w).await;
    if let Some(px) = &pair.proxy {
        eprintln!("    the proxy dropped {} packets", px.dropped());
    }
    Ok(())
}

async fn wan(r: &mut Run, pair: &mut Pair, slow: bool) -> Result<()> {
    let leg = if slow {
        // Below the writer's rate: the journal fills, a resync follows.
        Leg {
            rate: 256 << 10,
            delay: Duration::from_millis(10),
            ..Leg::default()
        }
    } else {
        // 300 ms round trips with 1 % loss, some jitter, duplicates, reordering.
        Leg {
            delay: Duration::from_millis(150),
            jitter: Duration::from_millis(10),
            loss_pct: 1.0,
            dup_pct: 0.5,
            reorder_pct: 0.5,
            ..Leg::default()
        }
    };
    if let Some(px) = &pair.proxy {
        px.set(Impair {
            up: leg.clone(),
            down: leg.clone(),
        });
    }
    r.out.faults += 1;
    let w = r.writer(pair)?;
    w.wait_acked(r.rng.random_range(10..30), Duration::from_secs(180))
        .await?;
    r.finish(w).await;
    if slow {
        // A clean restart of the primary (an upgrade) while a resync is
        // due: it keeps its map of the chunks written since the last scan,
        // and the resyncs after it read only those. More writes follow;
        // the run's end checks the DR copy against every one.
        for _ in 0..5 {
            if pair
                .p
                .volume()
                .await?
                .stream
                .is_some_and(|s| s.resync_needed)
            {
                break;
            }
            let w = r.writer(pair)?;
            w.wait_acked(5, Duration::from_secs(60)).await?;
            r.finish(w).await;
        }
        let kept_before = std::fs::read_to_string(&pair.p.log)?
            .matches("kept the map of the chunks written")
            .count();
        if !pair.p.daemon.as_mut().is_some_and(|d| d.stop()) {
            r.violation("the primary did not stop on SIGTERM".into());
        }
        pair.p.daemon = None;
        pair.p.start().await?;
        wait_stream(&pair.p).await?;
        r.check_primary(pair)?;
        pair.p.wait_link(Duration::from_secs(30)).await?;
        // With no writes since, a resync after the restart committed the
        // names a full read of the image gives (a kept map that missed a
        // chunk would have taken a stale name for it).
        if let Some(px) = &pair.proxy {
            px.set(Impair::default());
        }
        pair.wait_level(Duration::from_secs(120)).await?;
        let st = ferry::cli::Client::new(&pair.p.dir)
            .get::<ferry::daemon::runtime::ProgressView>(&format!("/volumes/{VOLUME}/progress"))
            .await?
            .state;
        let kept = std::fs::read_to_string(&pair.p.log)?
            .matches("kept the map of the chunks written")
            .count()
            > kept_before;
        if !kept {
            eprintln!("    the clean stop kept no map (see the log): the resync read everything");
        }
        // (Counted since the restart.)
        if st.finished == 0 {
            r.violation("no resync ran after the clean restart: nothing checked".into());
        } else if let Some(rep) = st.last_report {
            let (full, _) = ferry::volume::image::scan(
                &pair.img,
                65536,
                &std::sync::atomic::AtomicU64::new(0),
            )?;
            if rep.root != full.root {
                r.violation(
                    "the resync after the clean restart committed names that are not the image's"
                        .into(),
                );
            }
        }
        if let Some(px) = &pair.proxy {
            px.set(Impair {
                up: leg.clone(),
                down: leg,
            });
        }
        let w = r.writer(pair)?;
        w.wait_acked(r.rng.random_range(5..15), Duration::from_secs(180))
            .await?;
        r.finish(w).await;
    }
    Ok(())
}

/// What the primary logs once the writes a failed image fsync covered are
/// written again from the journal and synced.
const REPAIRED: &str = "written again and synced; flushes work again";

/// A disk fault on one side while writes go on; then the fault clears,
/// writes go on, and the faulty side loses power: what it acknowledged
/// after the fault must still be there.
async fn disk(r: &mut Run, pair: &mut Pair, name: &str) -> Result<()> {
    let (primary_side, rule) = match name {
        "disk-image-fsync" => (true, "fail sync disk.img times=1"),
        "disk-journal-fsync" => (true, "fail sync /journal/ times=1"),
        "disk-journal-enospc" => (true, "fail write /journal/ times=3 err=enospc"),
        "disk-redo-fsync" => (false, "fail sync /redo/ times=1"),
        "disk-replica-fsync" => (false, "fail sync /replicas/ times=1"),
        "disk-redo-enospc" => (false, "fail write /redo/ times=3 err=enospc"),
        "disk-replica-eio" => (false, "fail write /replicas/ times=2 err=eio"),
        other => bail!("no disk scenario {other:?}"),
    };
    let w = r.writer(pair)?;
    w.wait_acked(r.rng.random_range(3..15), Duration::from_secs(60))
        .await?;
    let site = if primary_side { &pair.p } else { &pair.d };
    let repairs_before = site.log_count(REPAIRED);
    site.set_faults(rule)?;
    let t0 = std::time::Instant::now();
    while site.injected() == 0 && t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if site.injected() == 0 {
        r.violation(format!("the fault {rule:?} was never hit: nothing checked"));
    }
    if name == "disk-image-fsync" {
        // A flush counts on the journal, which keeps every record no image
        // fsync covered: the image's checkpoint fsync failed (its pages are
        // lost, as Linux marks them clean), so the writes must be written
        // again from the journal and synced, and the failure shown until
        // then. The power cut below checks that no acknowledged flush is
        // lost meanwhile.
        let t0 = std::time::Instant::now();
        let mut repaired = false;
        while t0.elapsed() < Duration::from_secs(30) {
            let failed = pair.p.volume().await?.stream.and_then(|s| s.io_error);
            if failed.is_none() && pair.p.log_count(REPAIRED) > repairs_before {
                repaired = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !repaired {
            r.violation(
                "the image's failed fsync was not repaired from the journal in 30 s".into(),
            );
        }
    }
    site.set_faults("")?;
    w.wait_acked(r.rng.random_range(3..15), Duration::from_secs(60))
        .await?;
    if primary_side {
        pair.p.power_cut(r.rng.random())?;
        r.finish(w).await;
        pair.p.start().await?;
        wait_stream(&pair.p).await?;
        r.check_primary(pair)?;
    } else {
        let bound = r.dr_acked(pair).await?;
        pair.d.power_cut(r.rng.random())?;
        pair.d.start().await?;
        r.check_dr_holds(pair, bound, "a disk fault and a power cut")
            .await?;
        r.finish(w).await;
    }
    Ok(())
}

/// Waits (bounded) until the DR site has made `n` more points.
async fn wait_points(pair: &Pair, n: usize) -> Result<Vec<u64>> {
    let before = pair.d.points().await?.last().copied().unwrap_or(0);
    let t0 = std::time::Instant::now();
    loop {
        let ids = pair.d.points().await?;
        if ids.iter().filter(|&&i| i > before).count() >= n {
            return Ok(ids);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the DR site made no {n} new points in 60 s: {ids:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The wall clock jumps 30 days ahead, then 60 days back, at the DR site
/// (where retention runs) and at the primary (drawn from the seed), while
/// points are made every second: no point retention should keep may go,
/// and the newest is always there.
async fn clock_jump(r: &mut Run, pair: &mut Pair) -> Result<()> {
    let w = r.writer(pair)?;
    w.wait_acked(3, Duration::from_secs(60)).await?;
    let before = wait_points(pair, 3).await?;
    let primary_too = r.rng.random_bool(0.5);
    for (offset, what) in [
        (30 * 86400i64, "30 days ahead"),
        (-30 * 86400, "60 days back"),
    ] {
        pair.d.set_faults(&format!("clock {offset:+}"))?;
        if primary_too {
            pair.p.set_faults(&format!("clock {:+}", -offset))?;
        }
        r.out.faults += 1 + u64::from(primary_too);
        let now = wait_points(pair, 3).await?;
        let newest = *now.last().unwrap_or(&0);
        let gone: Vec<u64> = before
            .iter()
            .filter(|i| !now.contains(i))
            .copied()
            .collect();
        if !gone.is_empty() {
            r.violation(format!(
                "after the clock jumped {what}, retention deleted points {gone:?} (minutes old)"
            ));
        }
        let made = now
            .iter()
            .filter(|&&i| i > *before.last().unwrap_or(&0))
            .count();
        if made < 3 || newest <= *before.last().unwrap_or(&0) {
            r.violation(format!(
                "after the clock jumped {what}, the new points were pruned: {now:?}"
            ));
        }
    }
    r.finish(w).await;
    Ok(())
}

impl Run {
    /// The oracle starts again at a role change: what it held is counted,
    /// and the new primary's state is where the next log begins.
    fn restart_log(&mut self) {
        self.out.written += oracle::acked_bytes(&self.log);
        self.log.clear();
    }

    /// The writes a site set aside when it lost its primacy (a forced
    /// failover it learnt of, a resolve it lost) are kept there as its
    /// newest `divergent` point: restored, it holds every flush its writer
    /// had acknowledged (`initial` and `log`: that writer's lineage).
    async fn check_divergent(
        &mut self,
        site: &Site,
        initial: &[u8],
        log: &[Op],
        tmp: &std::path::Path,
    ) -> Result<()> {
        let points: Vec<ferry::store::state::RecoveryPoint> = ferry::cli::Client::new(&site.dir)
            .get(&format!("/volumes/{VOLUME}/points"))
            .await?;
        let Some(p) = points
            .iter()
            .rev()
            .find(|p| p.pinned.as_deref() == Some("divergent"))
        else {
            self.violation(format!(
                "{} lost its primacy but kept no divergent point: {:?}",
                site.name(),
                points.iter().map(|p| (p.id, &p.pinned)).collect::<Vec<_>>()
            ));
            return Ok(());
        };
        let to = tmp.join(format!("divergent-{}-{}.img", site.name(), p.id));
        let _ = std::fs::remove_file(&to);
        ferry_ok(
            &site.dir,
            &[
                "restore",
                VOLUME,
                "--point",
                &p.id.to_string(),
                "--to",
                &to.display().to_string(),
            ],
        )?;
        let kept = std::fs::read(&to)?;
        let _ = std::fs::remove_file(&to);
        self.out.verified += kept.len() as u64;
        for v in oracle::check_durable(initial, log, &kept) {
            self.violation(format!(
                "{}'s divergent point {} lost an acknowledged write: {v}",
                site.name(),
                p.id
            ));
        }
        Ok(())
    }
}

/// The writers' rest after each flush in runs that wait for a link's idle
/// timeout (some 3 MB/s each: the oracle keeps every write's bytes).
const PACE: Duration = Duration::from_millis(20);

/// A paced writer on the primary; once it has `acks` (drawn) flushes
/// acknowledged, the link is cut both ways. Returns it and the flushes it
/// had acknowledged before the cut.
async fn cut_under_writes(
    r: &mut Run,
    pair: &Pair,
    acks: std::ops::Range<usize>,
) -> Result<(Writer, usize)> {
    let w = Writer::paced(&pair.p.dir.join("nbd.sock"), r.rng.random(), PACE)?;
    w.wait_acked(r.rng.random_range(acks), Duration::from_secs(60))
        .await?;
    let before = w.acked.load(std::sync::atomic::Ordering::SeqCst);
    pair.proxy.as_ref().expect("a proxy").set(Impair::cut());
    r.out.faults += 1;
    Ok((w, before))
}

/// Runs `ferry failover NAME --force --json` at `site` until the site no
/// longer sees its peer (the QUIC idle timeout), at most 60 s.
async fn force_when_cut_off(site: &Site) -> Result<serde_json::Value> {
    let t0 = std::time::Instant::now();
    loop {
        let out = ferry(&site.dir, &["failover", VOLUME, "--force", "--json"])?;
        if out.status.success() {
            return Ok(serde_json::from_slice(&out.stdout)?);
        }
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        let link_up =
            err.contains("connected and streaming") || err.contains("link to the peer is up");
        if !link_up || t0.elapsed() > Duration::from_secs(60) {
            bail!("failover --force at {}: {err}", site.name());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits (bounded) until `what` holds of the volume's status at `site`.
async fn wait_volume(
    site: &Site,
    what: &str,
    within: Duration,
    f: impl Fn(&ferry::daemon::api::VolumeStatus) -> bool,
) -> Result<ferry::daemon::api::VolumeStatus> {
    let t0 = std::time::Instant::now();
    loop {
        if let Ok(v) = site.volume().await
            && f(&v)
        {
            return Ok(v);
        }
        if t0.elapsed() > within {
            let v = site.volume().await.ok();
            bail!(
                "{}: not {what} within {within:?}: {:?} {:?} {:?}",
                site.name(),
                v.as_ref().map(|v| (&v.role, &v.consistency, &v.gate)),
                v.as_ref().map(|v| &v.role_state),
                v.as_ref().and_then(|v| v.last_error.clone())
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn is_level_replica(v: &ferry::daemon::api::VolumeStatus) -> bool {
    v.role == ferry::store::state::Role::Replica
        && v.consistency == "consistent"
        && !v.role_state.split_brain
}

/// A planned switchover under writes, writes at the new primary (its
/// replica killed once, drawn from the seed), and a failback under writes:
/// each hand-over loses nothing (the new primary's image is the old
/// primary's, byte for byte, and holds every acknowledged flush).
async fn switchover(r: &mut Run, pair: &mut Pair) -> Result<()> {
    for (k, action) in ["failover --planned", "failback"].into_iter().enumerate() {
        let w = r.writer(pair)?;
        w.wait_acked(r.rng.random_range(5..25), Duration::from_secs(60))
            .await?;
        if k == 1 && r.rng.random_bool(0.5) {
            // The replica dies under the new primary's writes and returns.
            pair.d.kill9();
            r.out.faults += 1;
            tokio::time::sleep(r.ms(100, 1500)).await;
            pair.d.start().await?;
            w.wait_acked(3, Duration::from_secs(60)).await?;
        }
        // Asked at the primary (the switchover) or at the replica (the
        // failback, which the primary then runs).
        let (at, args): (&Site, Vec<&str>) = if k == 0 {
            (
                &pair.p,
                vec!["failover", VOLUME, "--planned", "--disconnect-clients"],
            )
        } else {
            (&pair.d, vec!["failback", VOLUME, "--disconnect-clients"])
        };
        let out = ferry(&at.dir, &args)?;
        r.out.faults += 1;
        r.finish(w).await;
        if !out.status.success() {
            r.violation(format!(
                "{action} under writes failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
            return Ok(());
        }
        let (old, new) = (std::fs::read(&pair.img)?, std::fs::read(pair.replica())?);
        r.out.verified += new.len() as u64;
        for v in oracle::check_durable(&pair.initial, &r.log, &new) {
            r.violation(format!("after {action}, the new primary: {v}"));
        }
        if old != new {
            let first = old.iter().zip(&new).position(|(x, y)| x != y);
            r.violation(format!(
                "after {action}, the new primary's image differs from the old primary's (first at byte {first:?})"
            ));
        }
        r.restart_log();
        pair.swap_roles(new);
        wait_volume(&pair.d, "a replica", Duration::from_secs(30), |v| {
            v.role == ferry::store::state::Role::Replica
        })
        .await?;
    }
    Ok(())
}

/// The link is cut (both ways) under writes and the DR site is promoted by
/// force while the old primary goes on taking writes; the new primary takes
/// writes; the link heals. The promoted state is a flush state (in sync
/// mode at or after every flush acknowledged before the cut); the old
/// primary fences itself, keeps every write it acknowledged as a divergent
/// point, and becomes the new primary's level replica.
async fn forced_failover(r: &mut Run, pair: &mut Pair) -> Result<()> {
    let (w1, acked_before_cut) = cut_under_writes(r, pair, 5..25).await?;
    let report = force_when_cut_off(&pair.d).await?;
    r.out.faults += 1;
    eprintln!(
        "    promoted: epoch {}, {}, rpo_zero {}",
        report["epoch"], report["promoted"], report["rpo_zero"]
    );
    let promoted = std::fs::read(pair.replica())?;
    let fail = pair.mode == Mode::Sync && pair.fallback == SyncFallback::Fail;
    if fail {
        // The old primary's flushes wait for the link, then fail: none is
        // acknowledged from the cut on.
        let t0 = std::time::Instant::now();
        while w1.failed.load(std::sync::atomic::Ordering::SeqCst) == 0
            && t0.elapsed() < Duration::from_secs(60)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if w1.failed.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            r.violation(
                "sync volume with fallback fail: no flush failed while the DR site was cut off"
                    .into(),
            );
        }
    } else {
        // The old primary goes on: in sync mode its flushes wait for the
        // link, then degrade.
        w1.wait_acked(3, Duration::from_secs(60)).await?;
    }
    let w2 = Writer::paced(&pair.d.dir.join("nbd.sock"), r.rng.random(), PACE)?;
    w2.wait_acked(r.rng.random_range(3..15), Duration::from_secs(60))
        .await?;
    pair.proxy.as_ref().expect("a proxy").set(Impair::default());
    // The old primary learns it is behind: fenced, a replica.
    let became = wait_volume(
        &pair.p,
        "the new primary's level replica",
        Duration::from_secs(120),
        is_level_replica,
    )
    .await;
    w2.wait_acked(3, Duration::from_secs(60)).await?;
    let old_initial = pair.initial.clone();
    r.finish(w1).await;
    let log1 = std::mem::take(&mut r.log);
    r.out.written += oracle::acked_bytes(&log1);
    let acked_in_all = oracle::acked_flushes(&log1);
    if acked_before_cut == 0 {
        r.violation("no flush was acknowledged before the cut: nothing checked".into());
    }
    match oracle::flush_state(&old_initial, &log1, &promoted) {
        None => r.violation("the promoted image is no flush state of the old primary's writer".into()),
        Some(k) if fail && k < acked_in_all => r.violation(format!(
            "sync volume, fallback fail: the promoted image holds flush {k}; the old primary acknowledged {acked_in_all}"
        )),
        Some(k) if pair.mode == Mode::Sync && k < acked_before_cut => r.violation(format!(
            "sync volume: the promoted image holds flush {k}; {acked_before_cut} were acknowledged before the cut"
        )),
        Some(_) => {}
    }
    if let Err(e) = became {
        r.violation(format!("after the link healed: {e:#}"));
        r.finish(w2).await;
        return Ok(());
    }
    let tmp = pair.tmp.path().to_path_buf();
    r.check_divergent(&pair.p, &old_initial, &log1, &tmp)
        .await?;
    pair.swap_roles(promoted);
    r.finish(w2).await;
    Ok(())
}

/// A real split brain: the link is cut, the DR site is promoted by force
/// and the primary asserts by force that it stays primary, both take
/// writes, the link heals. Both sites must show the split brain and stop
/// replicating; `ferry resolve` (at a site, for a winner, both drawn from
/// the seed) keeps the winner's data as it was, and the loser's writes as
/// its divergent point, and makes the loser the winner's level replica.
async fn split_brain(r: &mut Run, pair: &mut Pair) -> Result<()> {
    let (w1, _) = cut_under_writes(r, pair, 5..20).await?;
    force_when_cut_off(&pair.d).await?;
    let promoted = std::fs::read(pair.replica())?;
    force_when_cut_off(&pair.p).await?;
    r.out.faults += 2;
    let w2 = Writer::paced(&pair.d.dir.join("nbd.sock"), r.rng.random(), PACE)?;
    w1.wait_acked(3, Duration::from_secs(60)).await?;
    w2.wait_acked(r.rng.random_range(3..15), Duration::from_secs(60))
        .await?;
    pair.proxy.as_ref().expect("a proxy").set(Impair::default());
    let mut detected = true;
    for site in [&pair.p, &pair.d] {
        let seen = wait_volume(site, "in split brain", Duration::from_secs(60), |v| {
            v.role_state.split_brain
        })
        .await;
        match seen {
            Ok(v) if v.role_state.replicating => r.violation(format!(
                "{} replicates in a split brain: {:?}",
                site.name(),
                v.role_state
            )),
            Ok(_) => {}
            Err(e) => {
                detected = false;
                r.violation(format!("the split brain was not detected: {e:#}"));
            }
        }
    }
    // Both go on serving their writers while the operator decides.
    w1.wait_acked(2, Duration::from_secs(60)).await?;
    w2.wait_acked(2, Duration::from_secs(60)).await?;
    let p_initial = pair.initial.clone();
    r.finish(w1).await;
    let log1 = std::mem::take(&mut r.log);
    r.finish(w2).await;
    let log2 = std::mem::take(&mut r.log);
    r.out.written += oracle::acked_bytes(&log1) + oracle::acked_bytes(&log2);
    if !detected {
        return Ok(());
    }
    let dr_wins = r.rng.random_bool(0.5);
    let (winner, loser) = if dr_wins {
        (&pair.d, &pair.p)
    } else {
        (&pair.p, &pair.d)
    };
    let at = if r.rng.random_bool(0.5) {
        winner
    } else {
        loser
    };
    let keep = winner.name();
    let winner_image = std::fs::read(if dr_wins {
        pair.replica()
    } else {
        pair.img.clone()
    })?;
    let t0 = std::time::Instant::now();
    loop {
        let out = ferry(&at.dir, &["resolve", VOLUME, "--keep", &keep])?;
        if out.status.success() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            r.violation(format!(
                "resolve --keep {keep} at {} failed: {}",
                at.name(),
                String::from_utf8_lossy(&out.stderr)
            ));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    r.out.faults += 1;
    if let Err(e) = wait_volume(
        loser,
        "the winner's level replica",
        Duration::from_secs(120),
        is_level_replica,
    )
    .await
    {
        r.violation(format!("after the resolve: {e:#}"));
        return Ok(());
    }
    let tmp = pair.tmp.path().to_path_buf();
    let (loser_initial, loser_log) = if dr_wins {
        (&p_initial, &log1)
    } else {
        (&promoted, &log2)
    };
    r.check_divergent(loser, loser_initial, loser_log, &tmp)
        .await?;
    let now = std::fs::read(if dr_wins {
        pair.replica()
    } else {
        pair.img.clone()
    })?;
    if now != winner_image {
        r.violation(format!("the resolve changed the winner's ({keep}) data"));
    }
    let (winner_initial, winner_log) = if dr_wins {
        (promoted, log2)
    } else {
        (p_initial, log1)
    };
    for v in oracle::check_durable(&winner_initial, &winner_log, &now) {
        r.violation(format!("the winner ({keep}): {v}"));
    }
    if dr_wins {
        pair.swap_roles(winner_initial);
    } else {
        pair.initial = winner_initial;
    }
    r.log = winner_log;
    Ok(())
}

/// The primary, cut off under writes, asserts by force that it stays
/// primary while the DR site is not promoted: it goes on taking writes,
/// and when the link heals the DR site becomes its level replica again
/// (a tree comparison), with no split brain.
async fn stays_primary(r: &mut Run, pair: &mut Pair) -> Result<()> {
    let (w, _) = cut_under_writes(r, pair, 5..20).await?;
    let report = force_when_cut_off(&pair.p).await?;
    r.out.faults += 1;
    if report["epoch"].as_u64() != Some(2) {
        r.violation(format!("the assertion recorded no new epoch: {report}"));
    }
    w.wait_acked(5, Duration::from_secs(60)).await?;
    pair.proxy.as_ref().expect("a proxy").set(Impair::default());
    let v = wait_volume(
        &pair.d,
        "the primary's level replica in its asserted epoch",
        Duration::from_secs(120),
        |v| is_level_replica(v) && v.role_state.epoch >= 2,
    )
    .await;
    if let Err(e) = v {
        r.violation(format!("after the link healed: {e:#}"));
    }
    w.wait_acked(3, Duration::from_secs(60)).await?;
    r.finish(w).await;
    Ok(())
}

/// `ferry ARGS --json` at `dir` whatever its exit code (verify and scrub
/// exit non-zero when they find damage); its error when it printed nothing.
/// A command that needs the link is tried again while the link is down
/// (after the DR site's restart the primary learns of it at its next
/// request), for at most 60 s.
async fn json_of<T: serde::de::DeserializeOwned>(
    dir: &std::path::Path,
    args: &[&str],
) -> Result<T> {
    let t0 = std::time::Instant::now();
    loop {
        let out = ferry(dir, args)?;
        match serde_json::from_slice(&out.stdout) {
            Ok(v) => return Ok(v),
            Err(e) => {
                let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
                if !err.contains("link") || t0.elapsed() > Duration::from_secs(60) {
                    bail!("ferry {args:?}: {e}: {err}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every `.blob` file under `dir` (the store's chunk records), by name.
fn blob_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "blob") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// XORs `mask` into the byte at `at` of `path`, in place (bit rot: the
/// file's length and everything else stay as they were).
fn flip(path: &std::path::Path, at: u64, mask: u8) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at)?;
    b[0] ^= mask;
    f.write_all_at(&b, at)?;
    f.sync_all()?;
    Ok(())
}

/// Restores point `id` at the DR site to `to`: the file's bytes, or the
/// error (after which no file may be left).
fn restore_point(site: &Site, id: u64, to: &std::path::Path) -> Result<Result<Vec<u8>, String>> {
    let _ = std::fs::remove_file(to);
    let out = ferry(
        &site.dir,
        &[
            "restore",
            VOLUME,
            "--point",
            &id.to_string(),
            "--to",
            &to.display().to_string(),
        ],
    )?;
    if out.status.success() {
        let b = std::fs::read(to)?;
        std::fs::remove_file(to)?;
        Ok(Ok(b))
    } else {
        let left = to.exists();
        let _ = std::fs::remove_file(to);
        let mut err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if left {
            err.push_str(" [AND LEFT A FILE BEHIND]");
        }
        Ok(Err(err))
    }
}

/// Bit rot at the DR site, in its store's chunk records and in its replica
/// image, while the daemons run. The damage must be found (verify finds the
/// image's, scrub and every read of a point the store's), never served (a
/// restore of a damaged point fails and leaves no file; one that succeeds
/// equals what that point restored to before the damage), and repaired
/// (scrub puts back every record the image holds, so the point taken of
/// the level image is whole again; verify --repair rewrites the image).
async fn bit_flip(r: &mut Run, pair: &mut Pair) -> Result<()> {
    let w = r.writer(pair)?;
    w.wait_acked(r.rng.random_range(10..40), Duration::from_secs(60))
        .await?;
    r.finish(w).await;
    pair.wait_level(Duration::from_secs(120)).await?;
    // A point of the level image: everything it holds, the image holds.
    let level: ferry::store::state::RecoveryPoint = serde_json::from_str(&ferry_ok(
        &pair.d.dir,
        &["points", VOLUME, "--create", "--json"],
    )?)?;
    // The restart moves the chunk records from RocksDB's memtable and
    // write-ahead log into blob files, where rot can reach them.
    pair.d.kill9();
    pair.d.start().await?;
    pair.p.wait_link(Duration::from_secs(30)).await?;
    pair.wait_level(Duration::from_secs(120)).await?;
    let ids = pair.d.points().await?;
    let tmp = pair.tmp.path().to_path_buf();
    let mut good = std::collections::BTreeMap::new();
    for &id in &ids {
        match restore_point(&pair.d, id, &tmp.join("before.img"))? {
            Ok(b) => {
                good.insert(id, b);
            }
            Err(e) => r.violation(format!("point {id} did not restore before any damage: {e}")),
        }
    }
    if !good.contains_key(&level.id) {
        r.violation(format!(
            "the point made of the level image ({}) is not listed: {ids:?}",
            level.id
        ));
        return Ok(());
    }

    // The rot: a few bytes of the store's chunk records (past each blob
    // file's 30-byte header, before its 32-byte footer), and one byte in a
    // chunk of the replica image that holds data.
    let blobs = blob_files(&pair.d.dir);
    let blobs: Vec<_> = blobs
        .into_iter()
        .filter(|p| {
            std::fs::metadata(p)
                .map(|m| m.len() > 4096)
                .unwrap_or(false)
        })
        .collect();
    if blobs.is_empty() {
        r.violation("the DR store has no blob files to damage: nothing checked".into());
        return Ok(());
    }
    for _ in 0..r.rng.random_range(1..=4) {
        let f = &blobs[r.rng.random_range(0..blobs.len())];
        let len = std::fs::metadata(f)?.len();
        let at = r.rng.random_range(30..len - 32);
        flip(f, at, 1 << r.rng.random_range(0..8))?;
        r.out.faults += 1;
    }
    let image = std::fs::read(pair.replica())?;
    let data: Vec<usize> = (0..image.len() / 65536)
        .filter(|&c| image[c * 65536..(c + 1) * 65536].iter().any(|&b| b != 0))
        .collect();
    if data.is_empty() {
        r.violation("the replica image holds no data to damage: nothing checked".into());
        return Ok(());
    }
    let chunk = data[r.rng.random_range(0..data.len())];
    let at = (chunk * 65536 + r.rng.random_range(0..65536)) as u64;
    flip(&pair.replica(), at, 1 << r.rng.random_range(0..8))?;
    r.out.faults += 1;

    // Found: verify sees the image's rot.
    let v: serde_json::Value = json_of(&pair.p.dir, &["verify", VOLUME, "--json"]).await?;
    let differing = v["differing"].as_array().cloned().unwrap_or_default();
    let covered = differing.iter().any(|d| {
        let (a, b) = (d[0].as_u64().unwrap_or(0), d[1].as_u64().unwrap_or(0));
        a <= at && at < b
    });
    if v["in_sync"].as_bool() != Some(false) || !covered {
        r.violation(format!(
            "verify did not find the flipped byte {at} of the replica image: {v}"
        ));
    }

    // Never served: a restore is the point's bytes or an error.
    let mut failed = Vec::new();
    for (&id, want) in &good {
        match restore_point(&pair.d, id, &tmp.join("after.img"))? {
            Ok(b) if b == *want => {}
            Ok(_) => r.violation(format!(
                "point {id} restored to other bytes than before the rot: damaged data served"
            )),
            Err(e) if e.contains("LEFT A FILE") => {
                r.violation(format!("a failed restore of point {id} left a file: {e}"))
            }
            Err(_) => failed.push(id),
        }
    }

    // Found and repaired: scrub sees whatever a restore tripped on, and
    // puts back all the image holds.
    let s: ferry::daemon::scrub::ScrubReport =
        json_of(&pair.d.dir, &["scrub", VOLUME, "--json"]).await?;
    if !failed.is_empty() && s.found.is_empty() {
        r.violation(format!(
            "restores of points {failed:?} failed but scrub found nothing"
        ));
    }
    for id in &failed {
        if !s.points_damaged.contains(id) && s.found.is_empty() {
            r.violation(format!(
                "point {id} failed to restore and scrub did not name it"
            ));
        }
    }
    // The verify --repair below rewrites the image from the store, then a
    // second scrub can take what the first could not from the rotten image.
    let rep: serde_json::Value =
        json_of(&pair.p.dir, &["verify", VOLUME, "--repair", "--json"]).await?;
    if rep["in_sync"].as_bool() != Some(true) {
        r.violation(format!(
            "verify --repair left the replica image different: {rep}"
        ));
    }
    let s2: ferry::daemon::scrub::ScrubReport =
        json_of(&pair.d.dir, &["scrub", VOLUME, "--json"]).await?;
    if s2.points_damaged.contains(&level.id) || s2.committed_damaged {
        r.violation(format!(
            "after scrub and repair, the point of the level image ({}) is still damaged: {:?}",
            level.id, s2.unrepaired
        ));
    }
    eprintln!(
        "    store rot: {} objects found, {}+{} put back, {} left (points {:?}); {} restores refused",
        s.found.len(),
        s.repaired_chunks + s2.repaired_chunks,
        s.repaired_nodes + s2.repaired_nodes,
        s2.unrepaired.len(),
        s2.points_damaged,
        failed.len()
    );
    // Every point scrub calls whole restores to what it held before.
    for (&id, want) in &good {
        let got = restore_point(&pair.d, id, &tmp.join("after.img"))?;
        match got {
            Ok(b) if b == *want => r.out.verified += b.len() as u64,
            Ok(_) => r.violation(format!(
                "point {id} restored to other bytes after the repair"
            )),
            Err(e) if !s2.points_damaged.contains(&id) => {
                r.violation(format!("point {id}, whole by scrub, does not restore: {e}"))
            }
            Err(_) => {}
        }
    }
    Ok(())
}
