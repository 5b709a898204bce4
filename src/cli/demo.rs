//! `ferry demo`: two sites on this machine, the whole story, narrated.
//! It runs the real binary as two daemons on loopback in a temporary
//! directory and drives them through the same admin API operators use.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use super::Client;
use crate::daemon::api::{
    AddVolume, JoinRequest, JoinResponse, SiteStatus, SyncResponse, TokenRequest, TokenResponse,
    VerifyResponse, VolumeInfo,
};
use crate::daemon::runtime::ProgressView;
use crate::store::state::{Mode, PassReport};
use crate::units::human_bytes;

/// Writes a VM-like test image of `size` bytes: zero regions (free space),
/// repeated blocks (copies of the same file), compressible text (logs, configs)
/// and random data (compressed media, encrypted files), in 1 MiB regions.
pub fn make_mixed_image(path: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let region = 1u64 << 20;
    let mut rng = Rng(seed | 1);
    let repeated: Vec<u8> = (0..region).map(|_| rng.next_u64() as u8).collect();
    let words = [
        "ferry", "replica", "volume", "chunk", "primary", "disaster", "recovery", "point", "block",
        "site",
    ];
    let mut off = 0;
    while off < size {
        let len = region.min(size - off) as usize;
        let kind = rng.next_u64() % 10;
        let buf: Option<Vec<u8>> = match kind {
            0..=2 => None,
            3..=4 => Some(repeated[..len].to_vec()),
            5..=6 => {
                let mut t = Vec::with_capacity(len + 16);
                while t.len() < len {
                    let w = words[(rng.next_u64() % words.len() as u64) as usize];
                    t.extend_from_slice(
                        format!("{} {w} {}\n", rng.next_u64() % 100_000, off).as_bytes(),
                    );
                }
                t.truncate(len);
                Some(t)
            }
            _ => Some((0..len).map(|_| rng.next_u64() as u8).collect()),
        };
        if let Some(b) = buf {
            f.write_all_at(&b, off)?;
        }
        off += len as u64;
    }
    f.sync_all()
}

/// Overwrites `count` random 4 KiB blocks with random data; returns their offsets.
pub fn scatter_writes(path: &Path, count: u64, seed: u64) -> std::io::Result<Vec<u64>> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let size = f.metadata()?.len();
    let blocks = size / 4096;
    let mut rng = Rng(seed | 1);
    let mut offs = Vec::new();
    for _ in 0..count {
        let off = (rng.next_u64() % blocks) * 4096;
        let data: Vec<u8> = (0..4096).map(|_| rng.next_u64() as u8).collect();
        f.write_all_at(&data, off)?;
        offs.push(off);
    }
    f.sync_all()?;
    Ok(offs)
}

/// xorshift64*: deterministic test data without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// A daemon child process, stopped (SIGTERM) when dropped.
pub struct Daemon {
    pub dir: PathBuf,
    child: Child,
}

impl Daemon {
    pub fn start(exe: &Path, dir: &Path, log: &Path) -> anyhow::Result<Daemon> {
        Daemon::start_with_env(exe, dir, log, &[])
    }

    /// As `start`, with extra environment (the crash tests' hook).
    pub fn start_with_env(
        exe: &Path,
        dir: &Path,
        log: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Daemon> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(exe)
            .envs(env.iter().copied())
            .arg("--dir")
            .arg(dir)
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Daemon {
            dir: dir.to_path_buf(),
            child,
        })
    }

    /// Waits (bounded) for the daemon to exit by itself; true if it did.
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < within {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub async fn ready(&mut self) -> anyhow::Result<()> {
        for _ in 0..300 {
            if let Some(st) = self.child.try_wait()? {
                bail!("daemon for {} exited with {st}", self.dir.display());
            }
            if Client::new(&self.dir)
                .get::<SiteStatus>("/status")
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("daemon for {} did not start within 30s", self.dir.display())
    }
}

impl Daemon {
    /// kill -9: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Daemon {
    /// SIGTERM, and SIGKILL if the daemon has not stopped 20 s later: a
    /// test or demo never hangs on a daemon that does not stop. True if it
    /// stopped on the SIGTERM.
    pub fn stop(&mut self) -> bool {
        if let Ok(Some(_)) = self.child.try_wait() {
            return true;
        }
        // SAFETY: kill only sends a signal to our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        if self.wait_exit(Duration::from_secs(20)) {
            return true;
        }
        eprintln!(
            "the daemon for {} did not stop within 20 s of SIGTERM; killing it",
            self.dir.display()
        );
        self.kill9();
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `ferry init` of a loopback site with ports picked at first start (demo and tests).
pub fn init_site(exe: &Path, dir: &Path, site: &str) -> anyhow::Result<()> {
    let out = Command::new(exe)
        .arg("--dir")
        .arg(dir)
        .args([
            "init",
            "--site",
            site,
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ])
        .output()?;
    if !out.status.success() {
        bail!("init {site}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

async fn sync_wait(c: &Client, name: &str) -> anyhow::Result<PassReport> {
    let r: SyncResponse = c.post(&format!("/volumes/{name}/sync"), &()).await?;
    wait_pass(c, name, r.wait_for).await
}

/// Waits until pass number `n` (counted since the daemon started) has finished.
/// `volume add` starts pass 1 at once.
pub async fn wait_pass(c: &Client, name: &str, n: u64) -> anyhow::Result<PassReport> {
    loop {
        let v: ProgressView = c.get(&format!("/volumes/{name}/progress")).await?;
        if v.state.finished >= n {
            if let Some(e) = v.state.last_error {
                bail!("pass failed: {e}");
            }
            return v.state.last_report.context("no report");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn cost(r: &PassReport) {
    let changed_ratio = if r.bytes_changed > 0 {
        r.wire_bytes as f64 / r.bytes_changed as f64
    } else {
        0.0
    };
    println!(
        "    {:.2}s; read {}; {} chunks: {} zero (never sent), {} deduplicated (at DR already, or repeated in the image), {} sent whole, {} as 4 KiB deltas",
        r.duration_ms as f64 / 1000.0,
        human_bytes(r.bytes_read),
        r.chunks_total,
        r.chunks_zero,
        r.chunks_deduped,
        r.chunks_sent_full,
        r.chunks_sent_delta
    );
    println!(
        "    content to send {}; on the wire {} ({:.1}% of the volume, {changed_ratio:.2}x that content); recovery point {}",
        human_bytes(r.bytes_changed),
        human_bytes(r.wire_bytes),
        100.0 * r.wire_bytes as f64 / r.size.max(1) as f64,
        r.point.unwrap_or(0)
    );
}

pub async fn run(size: u64, keep: bool) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let tmp = tempfile::Builder::new().prefix("ferry-demo-").tempdir()?;
    let root = tmp.path().to_path_buf();
    let (pdir, ddir) = (root.join("primary"), root.join("dr"));
    println!(
        "ferry demo: a primary site and a DR site on this machine, in {}",
        root.display()
    );

    step(
        1,
        "init two sites (certificate, config, empty RocksDB store each)",
    );
    init_site(&exe, &pdir, "primary")?;
    init_site(&exe, &ddir, "dr")?;
    let mut p = Daemon::start(&exe, &pdir, &root.join("primary.log"))?;
    let mut d = Daemon::start(&exe, &ddir, &root.join("dr.log"))?;
    p.ready().await?;
    d.ready().await?;
    let (pc, dc) = (Client::new(&pdir), Client::new(&ddir));
    println!(
        "    both daemons up (logs: {}/primary.log, dr.log)",
        root.display()
    );

    step(
        2,
        "pair: a one-time token at the DR site, joined from the primary; each pins the other's certificate",
    );
    let t: TokenResponse = dc
        .post(
            "/pair/token",
            &TokenRequest {
                ttl_ms: 600_000,
                address: None,
            },
        )
        .await?;
    let j: JoinResponse = pc
        .post(
            "/pair/join",
            &JoinRequest {
                token: t.token.clone(),
            },
        )
        .await?;
    println!("    primary paired with '{}' at {}", j.peer, j.address);
    let again: anyhow::Result<JoinResponse> =
        pc.post("/pair/join", &JoinRequest { token: t.token }).await;
    println!(
        "    the same token again: {}",
        again
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "accepted (unexpected!)".into())
    );

    step(
        3,
        &format!(
            "protect a {} VM-like image: zero regions, repeated blocks, text, random data",
            human_bytes(size)
        ),
    );
    let img = root.join("vm-disk.img");
    make_mixed_image(&img, size, 42)?;
    for _ in 0..100 {
        let st: SiteStatus = pc.get("/status").await?;
        if st.link.up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v: VolumeInfo = pc
        .post(
            "/volumes",
            &AddVolume {
                name: "vm-disk".into(),
                path: img.display().to_string(),
                mode: Mode::Snapshot,
                interval_ms: 3_600_000,
                chunk_size: 65536,
                rpo_target_ms: 0,
                sync_wait_ms: 0,
                sync_fallback: Default::default(),
            },
        )
        .await?;
    println!(
        "    volume {} ({}) in {} mode",
        v.name,
        human_bytes(v.size),
        v.mode
    );

    step(
        4,
        "seed: the first pass sends only what the DR site lacks (zeros and repeats never travel)",
    );
    let r = wait_pass(&pc, "vm-disk", 1).await?;
    cost(&r);

    step(
        5,
        "the workload changes 1% of the image in random 4 KiB writes",
    );
    let n = size / 4096 / 100;
    scatter_writes(&img, n, 7)?;
    println!("    {n} blocks rewritten ({})", human_bytes(n * 4096));

    step(
        6,
        "incremental pass: the tree comparison finds the changed chunks, and only their changed 4 KiB blocks travel",
    );
    let r = sync_wait(&pc, "vm-disk").await?;
    cost(&r);

    step(7, "verify: both sites read their images now and compare");
    let vr: VerifyResponse = pc.post("/volumes/vm-disk/verify", &()).await?;
    println!(
        "    {} chunks compared: {}",
        vr.chunks_compared,
        if vr.in_sync {
            "IN SYNC, byte for byte".to_string()
        } else {
            format!("DIFFERENT at {:?}", vr.differing)
        }
    );

    step(8, "status at the DR site");
    let st: SiteStatus = dc.get("/status").await?;
    for v in &st.volumes {
        println!(
            "    {} {} {} {} point {} ({}s old); store: {} chunks, {}",
            v.name,
            v.role,
            v.mode,
            v.consistency,
            v.last_point.as_ref().map(|p| p.id).unwrap_or(0),
            v.last_point_age_s.unwrap_or(0),
            st.store.chunks,
            human_bytes(st.store.chunk_bytes)
        );
    }
    let replica = ddir.join("replicas/vm-disk.img");
    println!("    replica image: {}", replica.display());

    step(
        9,
        "drill at the DR site: a writable copy-on-write clone of the newest point, exported over NBD",
    );
    let started: crate::daemon::api::DrillStarted = dc
        .post(
            "/volumes/vm-disk/drill/start",
            &crate::daemon::api::DrillStartRequest { point: None },
        )
        .await?;
    println!(
        "    clone of point {} ready in {:.2} ms, export {} on {} (boot a VM from it on an isolated network)",
        started.state.point, started.state.ready_ms, started.export, started.socket
    );
    let report: crate::failover::drill::DrillReport =
        dc.post("/volumes/vm-disk/drill/stop", &()).await?;
    println!(
        "    drill stopped: {} (RPO proved {} s, {} of {} chunks of the point verified); report in {}/drills/reports/",
        report.result,
        report.point_age_at_start_s,
        report.base_check.chunks_verified + report.base_check.chunks_zero,
        report.base_check.chunks_total,
        ddir.display()
    );

    step(
        10,
        "disaster: the primary is killed (-9); the DR site notices the link is gone (QUIC idle timeout, ~10 s)",
    );
    p.kill9();
    let t0 = std::time::Instant::now();
    loop {
        let st: SiteStatus = dc.get("/status").await?;
        if !st.link.up {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the DR site still sees the link up a minute after the primary died");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("    link down after {:.1} s", t0.elapsed().as_secs_f64());

    step(
        11,
        "forced failover at the DR site: promote the replica, new epoch, writable export",
    );
    let f: crate::daemon::failover::FailoverOutcome = dc
        .post(
            "/volumes/vm-disk/failover",
            &crate::daemon::api::FailoverRequest {
                force: true,
                planned: false,
                disconnect_clients: false,
                workload_stopped: false,
                point: None,
            },
        )
        .await?;
    let crate::daemon::failover::FailoverOutcome::Forced(f) = f else {
        bail!("the daemon answered a forced failover with {f:?}");
    };
    println!(
        "    promoted {} in {} ms: epoch {}, state {} s old, pinned point {}",
        f.promoted, f.took_ms, f.epoch, f.state_age_s, f.point.id
    );

    step(
        12,
        "the old primary comes back: the DR site's Hello tells it it is behind, and it fences itself",
    );
    let mut p = Daemon::start(&exe, &pdir, &root.join("primary.log"))?;
    p.ready().await?;
    let t0 = std::time::Instant::now();
    let fenced = loop {
        let st: SiteStatus = pc.get("/status").await?;
        if let Some(v) = st.volumes.first()
            && let Some(why) = v.gate.clone()
            && v.role_state.epoch == 1
            && why.contains("epoch 2")
        {
            break why;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the old primary did not fence itself");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("    old primary: FENCED ({fenced}); its image is left as it was");
    println!(
        "    the audit log of the DR site ({}/audit.log) holds the drill and the failover, hash-chained (`ferry audit --verify`)",
        ddir.display()
    );

    drop(p);
    drop(d);
    if keep {
        let kept = tmp.keep();
        println!("\nkept {}", kept.display());
    }
    if !vr.in_sync {
        bail!("the replica does not equal the primary");
    }
    println!(
        "\ndone: the DR copy equalled the primary, a drill proved it, and a forced failover made it the writable primary."
    );
    Ok(())
}
