//! The scenarios: each sets up a pair, drives writes, injects its faults
//! on a schedule drawn from the run's seed, and checks the invariants
//! (DESIGN.md section 3) after every fault.

use std::time::Duration;

use anyhow::{Result, bail};
use ferry::store::state::Mode;
use rand::{Rng, SeedableRng};

use crate::oracle::{self, Op};
use crate::proxy::{Impair, Leg};
use crate::site::{Pair, Site, Writer};

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
    "clock-jump",
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
            // applier rests at the last complete flush epoch.
            if applied != last.0 {
                last = (applied, std::time::Instant::now());
            } else if v.consistency == "consistent" && last.1.elapsed() > Duration::from_millis(700)
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
    let proxy = matches!(name, "partition" | "flapping" | "wan" | "slow-link");
    let mode = match name {
        "partition" | "flapping" | "slow-link" => Mode::Async,
        _ => mode_for(&mut r.rng),
    };
    let every = (name == "clock-jump").then_some(Duration::from_secs(1));
    let mut pair = Pair::new_with(mode, proxy, r.seed, every).await?;
    eprintln!(
        "  {name} seed {seed}: {mode:?} volume at {}",
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
        other => bail!("no scenario {other:?} (one of {ALL:?}, or all)"),
    }
    r.converge(&mut pair).await?;
    r.out.faults += pair.p.injected() + pair.d.injected();
    r.out.written = oracle::acked_bytes(&r.log);
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
        pair.p.power_cut()?;
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
        pair.d.power_cut()?;
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
    let w = r.writer(pair)?;
    w.wait_acked(5, Duration::from_secs(60)).await?;
    let cycles = if flapping { 8 } else { 3 };
    for _ in 0..cycles {
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
            down: leg,
        });
    }
    r.out.faults += 1;
    let w = r.writer(pair)?;
    w.wait_acked(r.rng.random_range(10..30), Duration::from_secs(180))
        .await?;
    r.finish(w).await;
    Ok(())
}

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
        other => bail!("no disk scenario {other:?}"),
    };
    let w = r.writer(pair)?;
    w.wait_acked(r.rng.random_range(3..15), Duration::from_secs(60))
        .await?;
    let site = if primary_side { &pair.p } else { &pair.d };
    site.set_faults(rule)?;
    let t0 = std::time::Instant::now();
    while site.injected() == 0 && t0.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if site.injected() == 0 {
        r.violation(format!("the fault {rule:?} was never hit: nothing checked"));
    }
    if name == "disk-image-fsync" {
        // The flush whose fsync failed must fail: nothing acknowledged.
        let t0 = std::time::Instant::now();
        while w.failed.load(std::sync::atomic::Ordering::SeqCst) == 0
            && t0.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if w.failed.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            r.violation("a flush was acknowledged although the image's fsync failed".into());
        }
    }
    site.set_faults("")?;
    w.wait_acked(r.rng.random_range(3..15), Duration::from_secs(60))
        .await?;
    if primary_side {
        pair.p.power_cut()?;
        r.finish(w).await;
        pair.p.start().await?;
        wait_stream(&pair.p).await?;
        r.check_primary(pair)?;
    } else {
        let bound = r.dr_acked(pair).await?;
        pair.d.power_cut()?;
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
