//! Helpers for black-box tests: real `ferry` daemons on loopback in temporary directories.
#![allow(dead_code)]

pub mod nbd_client;
pub mod oracle;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ferry::cli::Client;
pub use ferry::cli::demo::Daemon;
use ferry::daemon::api::*;
use ferry::daemon::runtime::ProgressView;
use ferry::hash::Hash;
use ferry::store::state::{Mode, PassReport, RecoveryPoint};

pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry"))
}

/// Runs a `ferry` command that must succeed and print JSON (`--json`).
pub fn ferry_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = ferry(dir, args);
    assert!(
        out.status.success(),
        "ferry {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ferry {args:?} printed no JSON ({e})"))
}

pub fn ferry(dir: &Path, args: &[&str]) -> Output {
    Command::new(exe())
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("run ferry")
}

pub fn init(dir: &Path, site: &str) {
    let out = ferry(dir, &["init", "--site", site, "--listen", "127.0.0.1:0"]);
    assert!(
        out.status.success(),
        "init {site}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Changes a site's limits before its daemon starts.
pub fn set_limits(dir: &Path, f: impl FnOnce(&mut ferry::config::Limits)) {
    let mut cfg = ferry::config::Config::load(dir).unwrap();
    f(&mut cfg.limits);
    cfg.save(dir).unwrap();
}

pub async fn start(dir: &Path) -> Daemon {
    let log = dir.with_extension("log");
    let mut d = Daemon::start(&exe(), dir, &log).expect("start daemon");
    d.ready()
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", std::fs::read_to_string(&log).unwrap_or_default()));
    d
}

/// Pairs `primary` (joins) with `dr` (issues the token); returns the token.
pub async fn pair(primary: &Path, dr: &Path, ttl: &str) -> String {
    let out = ferry(dr, &["pair", "token", "--ttl", ttl]);
    assert!(
        out.status.success(),
        "token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = ferry(primary, &["pair", "join", &token]);
    assert!(
        out.status.success(),
        "join: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_link(primary).await;
    token
}

/// Waits (30 s at most: a peer that died is noticed at the QUIC idle
/// timeout, 10 s) until the site at `dir` has its link up.
pub async fn wait_link(dir: &Path) {
    for _ in 0..600 {
        let st: SiteStatus = Client::new(dir).get("/status").await.unwrap();
        if st.link.up {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("link did not come up");
}

pub async fn add_volume(primary: &Path, name: &str, img: &Path) {
    add_volume_mode(primary, name, img, Mode::Snapshot, Default::default()).await
}

/// Adds a volume in `mode` (sync volumes wait 2 s for the DR site, then `fallback`).
pub async fn add_volume_mode(
    primary: &Path,
    name: &str,
    img: &Path,
    mode: Mode,
    fallback: ferry::store::state::SyncFallback,
) {
    add_volume_waiting(primary, name, img, mode, fallback, 2000).await
}

/// Adds a volume whose sync flushes wait `sync_wait_ms` for the DR site.
pub async fn add_volume_waiting(
    primary: &Path,
    name: &str,
    img: &Path,
    mode: Mode,
    fallback: ferry::store::state::SyncFallback,
    sync_wait_ms: u64,
) {
    let req = AddVolume {
        name: name.into(),
        path: img.display().to_string(),
        mode,
        interval_ms: 3_600_000,
        chunk_size: 65536,
        rpo_target_ms: 0,
        sync_wait_ms,
        sync_fallback: fallback,
    };
    let _: VolumeInfo = Client::new(primary).post("/volumes", &req).await.unwrap();
}

/// Requests a pass and waits for it; returns its report or its error.
pub async fn sync(primary: &Path, name: &str) -> Result<PassReport, String> {
    let c = Client::new(primary);
    let r: SyncResponse = c
        .post(&format!("/volumes/{name}/sync"), &())
        .await
        .map_err(|e| e.to_string())?;
    for _ in 0..6000 {
        let v = progress(primary, name).await;
        if v.state.finished >= r.wait_for {
            return match v.state.last_error {
                Some(e) => Err(e),
                None => Ok(v.state.last_report.unwrap()),
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("pass did not finish in 5 minutes");
}

/// The report of the first pass, which `volume add` starts at once.
pub async fn first_pass(primary: &Path, name: &str) -> Result<PassReport, String> {
    tokio::time::timeout(
        Duration::from_secs(300),
        ferry::cli::demo::wait_pass(&Client::new(primary), name, 1),
    )
    .await
    .map_err(|_| "first pass did not finish in 5 minutes".to_string())?
    .map_err(|e| e.to_string())
}

pub async fn progress(primary: &Path, name: &str) -> ProgressView {
    Client::new(primary)
        .get(&format!("/volumes/{name}/progress"))
        .await
        .unwrap()
}

/// Byte-for-byte comparison, reporting the first differing offset.
pub fn assert_same_bytes(a: &Path, b: &Path) {
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    assert_eq!(
        fa.metadata().unwrap().len(),
        fb.metadata().unwrap().len(),
        "sizes differ"
    );
    let (mut ba, mut bb) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    let mut off = 0u64;
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            break;
        }
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            panic!("images differ at byte {}", off + i as u64);
        }
        off += n as u64;
    }
}

pub fn replica_path(dr: &Path, name: &str) -> PathBuf {
    dr.join("replicas").join(format!("{name}.img"))
}

/// A plain HTTP/1.0 GET on loopback; returns the body (panics on a non-200).
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::Write;
    let mut s =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "GET {path}: {head}"
    );
    body.to_string()
}

/// Percent-encodes a query parameter.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of one sample in Prometheus text format, by name and exact labels
/// (`name{a="x",b="y"}` as the exporter prints them, labels sorted).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

pub fn metrics_addr(dir: &Path) -> String {
    ferry::config::Config::load(dir)
        .unwrap()
        .metrics
        .expect("metrics address")
        .to_string()
}

pub fn init_with_metrics(dir: &Path, site: &str) {
    ferry::cli::demo::init_site(&exe(), dir, site).unwrap_or_else(|e| panic!("init {site}: {e}"));
}

/// Two paired sites on loopback, "primary" and "dr", daemons running.
pub struct TestPair {
    pub p: PathBuf,
    pub d: PathBuf,
    pub pd: Daemon,
    pub dd: Daemon,
    pub token: String,
    /// Last: the daemons stop before their directories go.
    pub tmp: tempfile::TempDir,
}

impl Drop for TestPair {
    /// A failed test shows the end of both daemons' logs.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for dir in [&self.p, &self.d] {
                let log = std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!(
                    "--- last lines of {} ---",
                    dir.with_extension("log").display()
                );
                for l in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

pub async fn test_pair(metrics: bool) -> TestPair {
    let tmp = tempfile::tempdir().unwrap();
    let (p, d) = (tmp.path().join("primary"), tmp.path().join("dr"));
    for (dir, name) in [(&p, "primary"), (&d, "dr")] {
        if metrics {
            init_with_metrics(dir, name)
        } else {
            init(dir, name)
        }
    }
    let pd = start(&p).await;
    let dd = start(&d).await;
    let token = pair(&p, &d, "10m").await;
    TestPair {
        tmp,
        p,
        d,
        pd,
        dd,
        token,
    }
}

// Continuous volumes (async, sync): waits and reads shared by the tests.

pub async fn volume(dir: &Path, name: &str) -> VolumeStatus {
    let st: SiteStatus = Client::new(dir).get("/status").await.unwrap();
    st.volumes
        .into_iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name} at {}", dir.display()))
}

/// Waits until a site lists the volume (the DR site learns of it when the
/// primary's first pass or stream opens it).
pub async fn wait_volume_known(dir: &Path, name: &str) {
    let t0 = Instant::now();
    loop {
        let st: SiteStatus = Client::new(dir).get("/status").await.unwrap();
        if st.volumes.iter().any(|v| v.name == name) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{} never listed {name}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the primary has streamed everything it journaled and the
/// DR side has no resync pending.
pub async fn wait_caught_up(p: &Path, name: &str) {
    let t0 = Instant::now();
    loop {
        let v = volume(p, name).await;
        if let Some(s) = &v.stream
            && !s.resync_needed
            && s.acked_seq + 1 >= s.next_seq
        {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "primary did not catch up: {:?}",
            v.stream
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the DR side's applier is idle and returns the volume's
/// status then: it has applied every record it received (records after the
/// last flush are never applied, so where those remain, its applied
/// sequence has stood still for 3 s). An apply writes every whole flush
/// epoch received before the sequence moves, so a short pause in the
/// sequence does not mean the image is still.
async fn wait_applier_idle(
    d: &Path,
    name: &str,
    ready: impl Fn(&VolumeStatus) -> bool,
) -> VolumeStatus {
    let t0 = Instant::now();
    let mut last = (u64::MAX, Instant::now());
    loop {
        let v = volume(d, name).await;
        let applied = v.redo.as_ref().map(|r| r.applied_seq).unwrap_or(0);
        if applied != last.0 {
            last = (applied, Instant::now());
        }
        let drained = v
            .redo
            .as_ref()
            .is_some_and(|r| !r.held && r.received_seq > 0 && r.applied_seq >= r.received_seq);
        if ready(&v) && (drained || last.1.elapsed() > Duration::from_secs(3)) {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "DR side did not settle: {} {:?}",
            v.consistency,
            v.redo
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the DR side is consistent and its applier is idle.
pub async fn wait_dr_settled(d: &Path, name: &str) {
    wait_applier_idle(d, name, |v| v.consistency == "consistent").await;
}

/// Waits for the seed of a new continuous volume: consistent, with a point.
pub async fn wait_seeded(p: &Path, d: &Path, name: &str) {
    wait_caught_up(p, name).await;
    let t0 = Instant::now();
    loop {
        let v = volume(d, name).await;
        if v.consistency == "consistent" && v.last_point.is_some() {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no seed: {v:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn file_hash(path: &Path) -> Hash {
    Hash::of_chunk(&std::fs::read(path).unwrap())
}

pub fn sock(p: &Path) -> PathBuf {
    p.join("nbd.sock")
}

pub fn nbd_uri(p: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock(p).display())
}

pub fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (is it installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub async fn create_point(dir: &Path, name: &str) -> RecoveryPoint {
    Client::new(dir)
        .post(&format!("/volumes/{name}/points"), &())
        .await
        .unwrap()
}

pub async fn restore(d: &Path, name: &str, point: Option<u64>, to: &Path) -> RestoreResponse {
    Client::new(d)
        .post(
            &format!("/volumes/{name}/restore"),
            &RestoreRequest {
                point,
                to: to.display().to_string(),
            },
        )
        .await
        .unwrap()
}

/// After the primary died: waits until the DR side's applier stops moving,
/// then names what a failover would promote: the replica image when it is
/// consistent, else (a resync was interrupted) the last recovery point,
/// restored to `scratch`. Returns ("image" or "last point", its hash).
pub async fn dr_state_after_primary_loss(
    d: &Path,
    name: &str,
    scratch: &Path,
) -> (&'static str, Hash) {
    let v = wait_applier_idle(d, name, |v| v.consistency != "applying").await;
    if v.consistency == "consistent" {
        return ("image", file_hash(&replica_path(d, name)));
    }
    let _ = std::fs::remove_file(scratch);
    restore(d, name, None, scratch).await;
    let h = file_hash(scratch);
    std::fs::remove_file(scratch).unwrap();
    ("last point", h)
}

/// Changes a site's config while its daemon is stopped.
pub fn set_config(dir: &Path, f: impl FnOnce(&mut ferry::config::Config)) {
    let mut cfg = ferry::config::Config::load(dir).unwrap();
    f(&mut cfg);
    cfg.save(dir).unwrap();
}

/// Runs a command that needs root (mount, umount): as it is for root, else
/// through `sudo -n` (a sudo user running the tests).
pub fn privileged(program: &str) -> std::process::Command {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::process::Command::new(program)
    } else {
        let mut c = std::process::Command::new("sudo");
        c.args(["-n", program]);
        c
    }
}

/// Mounts that must go when the test ends, however it ends.
pub struct Mounts {
    pub dirs: Vec<std::path::PathBuf>,
    pub fuse: Option<std::process::Child>,
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            let _ = privileged("umount").arg("-l").arg(d).status();
        }
        if let Some(f) = &mut self.fuse {
            let _ = f.kill();
            let _ = f.wait();
        }
    }
}

/// Exposes an NBD export as a file (`MNT/nbd`) through nbdfuse, for the
/// kernel's loop device; the mount goes when the returned guard drops.
pub async fn fuse_device(mnt: &Path, uri: &str, size: u64) -> (Mounts, PathBuf) {
    std::fs::create_dir_all(mnt).unwrap();
    let mounts = Mounts {
        dirs: vec![mnt.to_path_buf()],
        fuse: Some(
            privileged("nbdfuse")
                .arg(mnt)
                .arg(uri)
                .spawn()
                .expect("nbdfuse must be installed"),
        ),
    };
    let dev = mnt.join("nbd");
    let t0 = Instant::now();
    while std::fs::metadata(&dev).map(|m| m.len()).ok() != Some(size) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "nbdfuse did not mount {uri}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (mounts, dev)
}

/// Starts a daemon that dies at the named step (`FERRY_CRASH_AT`); it is
/// ready unless it reached that step (and died) while starting.
pub async fn start_crashing_at(dir: &Path, step: &str) -> Daemon {
    let log = dir.with_extension("log");
    let mut d = Daemon::start_with_env(&exe(), dir, &log, &[("FERRY_CRASH_AT", step)])
        .expect("start daemon");
    let _ = d.ready().await;
    d
}

/// A process's resident memory now and at its peak, in bytes (`/proc`).
pub fn rss_and_peak(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |key: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
    };
    (kib("VmRSS:") * 1024, kib("VmHWM:") * 1024)
}

/// Waits (at most `within`) until a process's memory has stopped growing
/// (by less than 1 MiB for a second); returns the highest it saw.
pub async fn wait_memory_steady(pid: u32, within: Duration) -> u64 {
    let t0 = std::time::Instant::now();
    let (mut high, mut steady_since) = (rss_and_peak(pid).0, std::time::Instant::now());
    while steady_since.elapsed() < Duration::from_secs(1) {
        assert!(
            t0.elapsed() < within,
            "the daemon's memory kept growing: {} MiB",
            high >> 20
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = rss_and_peak(pid).0;
        if now > high + (1 << 20) {
            steady_since = std::time::Instant::now();
        }
        high = high.max(now);
    }
    high
}
