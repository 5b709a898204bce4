//! Forced failover after the primary dies, and the old primary's return:
//! it fences itself, keeps its own state as a pinned divergent point, becomes
//! the new primary's replica and receives only the chunks that differ.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::nbd_client::NbdClient;
use common::oracle::*;
use common::*;
use ferry::cli::demo::{Rng, make_mixed_image};
use ferry::daemon::failover::ForcedReport;
use ferry::store::state::{Mode, RecoveryPoint, Role, SyncFallback};

const SIZE: u64 = 32 << 20;
const CHUNK: usize = 64 << 10;

/// Writes and flushes until `stop` or the first error (the primary died).
/// Every op is logged before it is sent; `acked` counts the flushes the
/// server acknowledged.
fn writer(socket: &Path, stop: &AtomicBool, acked: &AtomicUsize) -> Vec<Op> {
    let mut c = NbdClient::connect(socket, "disk").expect("the export is there");
    let mut rng = Rng(21);
    let mut log = Vec::new();
    'run: while !stop.load(Ordering::Relaxed) {
        for _ in 0..1 + rng.next_u64() % 3 {
            let len = (1 + rng.next_u64() % 16) * 4096;
            let off = (rng.next_u64() % ((SIZE - len) / 4096)) * 4096;
            let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            log.push(Op::Write(off, data.clone()));
            if c.write(off, &data).is_err() {
                break 'run;
            }
        }
        log.push(Op::Flush);
        if c.flush().is_err() {
            break;
        }
        acked.fetch_add(1, Ordering::SeqCst);
    }
    log
}

fn nbdcopy_out(socket: &Path, export: &str, to: &Path) {
    let _ = std::fs::remove_file(to);
    run(Command::new("nbdcopy")
        .arg(format!("nbd+unix:///{export}?socket={}", socket.display()))
        .arg(to));
}

async fn points(dir: &Path) -> Vec<RecoveryPoint> {
    ferry::cli::Client::new(dir)
        .get("/volumes/disk/points")
        .await
        .unwrap()
}

/// Starts `writer` on the primary's export and waits (bounded) until it
/// has `flushes` acknowledged flushes.
async fn start_writer(
    socket: &Path,
    flushes: usize,
) -> (
    Arc<AtomicBool>,
    Arc<AtomicUsize>,
    std::thread::JoinHandle<Vec<Op>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let (s2, a2, socket) = (stop.clone(), acked.clone(), socket.to_path_buf());
    let w = std::thread::spawn(move || writer(&socket, &s2, &a2));
    let t0 = Instant::now();
    while acked.load(Ordering::SeqCst) < flushes {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the writer is stuck"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (stop, acked, w)
}

/// Waits (bounded) until the volume at `dir` is a consistent replica.
async fn wait_level_replica(dir: &Path) {
    let t0 = Instant::now();
    loop {
        let v = volume(dir, "disk").await;
        if v.role == Role::Replica && v.consistency == "consistent" {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "not a level replica: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Restarts the daemon at `dir` to die at `step`, runs `ferry ARGS` at
/// `at` (it fails: a daemon of the step died), waits for the death and
/// starts the daemon again as usual.
async fn dies_at(daemon: &mut Daemon, dir: &Path, step: &str, at: &Path, args: &[&str]) {
    daemon.kill9();
    *daemon = start_crashing_at(dir, step).await;
    // Both ends: the other site's link is up again only once the restarted
    // one's Hello has been answered.
    wait_link(dir).await;
    wait_link(at).await;
    let out = ferry(at, args);
    assert!(!out.status.success(), "{step}: the daemon did not die");
    assert!(
        daemon.wait_exit(Duration::from_secs(10)),
        "{step}: still running; its log:\n{}",
        std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default()
    );
    *daemon = start(dir).await;
    wait_link(dir).await;
    wait_link(at).await;
}

/// 64 KiB chunks that differ between two images of one size.
fn differing_chunks(a: &[u8], b: &[u8]) -> u64 {
    a.chunks(CHUNK)
        .zip(b.chunks(CHUNK))
        .filter(|(x, y)| x != y)
        .count() as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn forced_failover_keeps_every_acked_sync_flush_and_the_old_primary_returns_as_a_replica() {
    let mut t = test_pair(false).await;
    let img = t.tmp.path().join("disk.img");
    make_mixed_image(&img, SIZE, 17).unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Sync, SyncFallback::Fail).await;
    wait_seeded(&t.p, &t.d, "disk").await;
    let initial = std::fs::read(&img).unwrap();

    let (stop, acked, w) = start_writer(&sock(&t.p), 30).await;

    // While the primary is connected and streaming, a forced failover is refused.
    let refused = ferry(&t.d, &["failover", "disk", "--force"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("--planned"), "{err}");
    // At the primary, --force asserts it stays primary: refused while the
    // link is up (the chaos runner's split-brain scenario runs it cut off).
    let refused = ferry(&t.p, &["failover", "disk", "--force"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("link to the peer is up"), "{err}");

    // The primary dies mid-write.
    t.pd.kill9();
    stop.store(true, Ordering::Relaxed);
    let log = tokio::task::spawn_blocking(move || w.join().unwrap())
        .await
        .unwrap();
    let acked = acked.load(Ordering::SeqCst);
    assert!(
        acked >= 30,
        "only {acked} flushes acknowledged: nothing checked"
    );

    // The DR site notices the loss, then the operator forces the failover.
    let t0 = Instant::now();
    let report: ForcedReport = loop {
        let out = ferry(&t.d, &["failover", "disk", "--force", "--json"]);
        if out.status.success() {
            break serde_json::from_slice(&out.stdout).unwrap();
        }
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            err.contains("connected and streaming") && t0.elapsed() < Duration::from_secs(40),
            "{err}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("{report:?}");
    assert_eq!(report.epoch, 2);
    assert!(report.rpo_zero, "{report:?}");
    assert_eq!(report.promoted, "the replica image");
    assert!(report.point.pinned.is_some());
    assert!(report.last_contact_age_s.is_some());

    // The promoted export is a flush state of the writer, at or after the
    // last flush it saw acknowledged (sync: nothing acknowledged is lost).
    let promoted = t.tmp.path().join("promoted.img");
    nbdcopy_out(&sock(&t.d), "disk", &promoted);
    let state = std::fs::read(&promoted).unwrap();
    let i = flush_state_index(&initial, &log, &state)
        .expect("the promoted state is not a flush state of the writer");
    assert!(
        i >= acked,
        "the promoted state is flush {i}; {acked} were acknowledged"
    );
    let st = volume(&t.d, "disk").await;
    assert_eq!(st.role, Role::Primary);
    assert_eq!(st.role_state.epoch, 2);

    // The new primary takes writes at once.
    let mut c = NbdClient::connect(&sock(&t.d), "disk").unwrap();
    let mut rng = Rng(99);
    for k in 0..6u64 {
        let data: Vec<u8> = (0..20_000).map(|_| rng.next_u64() as u8).collect();
        c.write(k * 5 * CHUNK as u64 + 777, &data).unwrap();
    }
    c.flush().unwrap();
    c.disconnect();

    // The old primary comes back: behind, it fences itself, keeps its state
    // as a pinned divergent point and becomes the new primary's replica.
    t.pd = start(&t.p).await;
    wait_level_replica(&t.p).await;
    assert!(
        NbdClient::connect(&sock(&t.p), "disk").is_err(),
        "the old primary still exports the volume"
    );
    wait_caught_up(&t.d, "disk").await;
    wait_dr_settled(&t.p, "disk").await;
    assert_same_bytes(&img, &replica_path(&t.d, "disk"));

    // Its own state before the failback is kept, pinned.
    let old_points = points(&t.p).await;
    let divergent = old_points
        .iter()
        .find(|p| p.pinned.as_deref() == Some("divergent"))
        .unwrap_or_else(|| panic!("no divergent point: {old_points:?}"));
    let kept = t.tmp.path().join("divergent.img");
    restore(&t.p, "disk", Some(divergent.id), &kept).await;
    let kept = std::fs::read(&kept).unwrap();
    let fi = flush_state_index(&initial, &log, &kept);
    let applied = |ops: &[Op]| {
        let mut m = initial.clone();
        for op in ops {
            if let Op::Write(off, d) = op {
                m[*off as usize..*off as usize + d.len()].copy_from_slice(d);
            }
        }
        m
    };
    // Every write the writer sent, or all but the last when the kill cut
    // that one short (logged before it was sent, never acknowledged: the
    // daemon may have died before or after writing it).
    let last_unsure = matches!(log.last(), Some(Op::Write(..)));
    assert!(
        fi.is_some_and(|i| i >= acked)
            || kept == applied(&log)
            || (last_unsure && kept == applied(&log[..log.len() - 1])),
        "the divergent point is not the old primary's last state"
    );

    // Only the differing chunks travelled back.
    let now = std::fs::read(&img).unwrap();
    let differ = differing_chunks(&kept, &now);
    let pass = volume(&t.d, "disk")
        .await
        .last_pass
        .expect("the resync's pass report");
    eprintln!(
        "failback resync: {} chunks differ, {} sent ({} whole, {} delta), wire {} bytes",
        differ,
        pass.chunks_sent(),
        pass.chunks_sent_full,
        pass.chunks_sent_delta,
        pass.wire_bytes
    );
    assert!(differ >= 6, "the new primary's writes are not there");
    assert!(
        pass.chunks_sent() <= differ,
        "{} chunks sent where {differ} differ",
        pass.chunks_sent()
    );
    assert!(pass.bytes_changed < SIZE / 8);

    // Every step is in the audit log, chained.
    let out = ferry(&t.d, &["audit", "--verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("failover --force"),
        "{text}"
    );
}

/// A planned switchover under writes: refused while a client is connected
/// (unless told to disconnect it), loses nothing (the new primary's image
/// is the old primary's at the hand-over), and the replication runs the
/// other way from the new primary's journal, with no resync.
#[tokio::test(flavor = "multi_thread")]
async fn planned_switchover_under_writes_loses_nothing_and_reverses_without_a_resync() {
    let t = test_pair(false).await;
    let img = t.tmp.path().join("disk.img");
    make_mixed_image(&img, SIZE, 23).unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    wait_seeded(&t.p, &t.d, "disk").await;

    let (stop, acked, w) = start_writer(&sock(&t.p), 20).await;
    // With a client connected: refused, with the reason (at the DR site
    // the primary is asked, and answers the same).
    let at_dr = ferry(&t.d, &["failover", "disk", "--planned"]);
    assert!(!at_dr.status.success());
    let err = String::from_utf8_lossy(&at_dr.stderr);
    assert!(err.contains("--disconnect-clients"), "{err}");
    let busy = ferry(&t.p, &["failover", "disk", "--planned"]);
    assert!(!busy.status.success());
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(err.contains("--disconnect-clients"), "{err}");

    // Under writes, with the client cut off by the switchover itself.
    let r = ferry_json(
        &t.p,
        &[
            "failover",
            "disk",
            "--planned",
            "--disconnect-clients",
            "--json",
        ],
    );
    eprintln!("{r}");
    stop.store(true, Ordering::Relaxed);
    let log = tokio::task::spawn_blocking(move || w.join().unwrap())
        .await
        .unwrap();
    assert!(acked.load(Ordering::SeqCst) >= 20 && !log.is_empty());
    assert_eq!(r["epoch"], 2);
    let downtime = r["downtime_ms"].as_u64().unwrap();

    // Nothing lost: the new primary's image is the old primary's, whole
    // (every write that reached it, flushed or not).
    let new_primary = replica_path(&t.d, "disk");
    assert_same_bytes(&img, &new_primary);
    let d = volume(&t.d, "disk").await;
    assert_eq!(d.role, Role::Primary);
    assert!(d.gate.is_none(), "the new primary takes writes");
    let p = volume(&t.p, "disk").await;
    assert_eq!(p.role, Role::Replica);
    assert!(NbdClient::connect(&sock(&t.p), "disk").is_err());

    // Writes at the new primary reach the old one through the journal: no
    // resync, no pass.
    let mut c = NbdClient::connect(&sock(&t.d), "disk").unwrap();
    let mut rng = Rng(5);
    for k in 0..40u64 {
        let data: Vec<u8> = (0..8192).map(|_| rng.next_u64() as u8).collect();
        c.write((k * 97 % 4000) * 8192, &data).unwrap();
        if k % 8 == 7 {
            c.flush().unwrap();
        }
    }
    c.flush().unwrap();
    c.disconnect();
    wait_caught_up(&t.d, "disk").await;
    wait_dr_settled(&t.p, "disk").await;
    assert_same_bytes(&new_primary, &img);
    let d = volume(&t.d, "disk").await;
    let s = d.stream.unwrap();
    assert!(!s.resync_needed && !s.resync_running, "{s:?}");
    assert!(
        d.last_pass.is_none(),
        "a pass ran after the switchover: {:?}",
        d.last_pass
    );
    assert!(s.acked_seq >= 45, "records streamed: {s:?}");
    eprintln!("planned switchover downtime {downtime} ms");

    // Failback, asked for at the old primary (a replica now): a planned
    // switchover back, run by the current primary; again no resync.
    let back = ferry(&t.p, &["failback", "disk", "--json"]);
    assert!(
        back.status.success(),
        "{}",
        String::from_utf8_lossy(&back.stderr)
    );
    let b: serde_json::Value = serde_json::from_slice(&back.stdout).unwrap();
    assert_eq!(
        (b["epoch"].as_u64(), b["new_primary"].as_str()),
        (Some(3), Some("primary"))
    );
    assert_same_bytes(&img, &new_primary);
    let p = volume(&t.p, "disk").await;
    assert_eq!((p.role, p.role_state.epoch), (Role::Primary, 3));
    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    c.write(4096, &[9u8; 8192]).unwrap();
    c.flush().unwrap();
    c.disconnect();
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    assert_same_bytes(&img, &new_primary);
    let p = volume(&t.p, "disk").await;
    assert!(p.last_pass.is_none(), "a pass ran after the failback");
    let again = ferry(&t.p, &["failback", "disk"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("original site"));

    let audit = ferry(&t.p, &["audit", "--verify"]);
    let text = String::from_utf8_lossy(&audit.stdout);
    assert!(
        audit.status.success() && text.contains("failover --planned") && text.contains("failback"),
        "{text}"
    );
    let audit = ferry(&t.d, &["audit", "--verify"]);
    assert!(String::from_utf8_lossy(&audit.stdout).contains("promote (planned)"));
}

/// A kill at each step of a forced promotion, and of the returning old
/// primary's capture: every restart finishes the step or leaves a safe
/// state (a consistent replica, never a mix), and nothing acknowledged in
/// sync mode is lost in the end.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_each_step_of_a_promotion_or_a_capture_loses_nothing() {
    let mut t = test_pair(false).await;
    let img = t.tmp.path().join("disk.img");
    make_mixed_image(&img, SIZE, 29).unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Sync, SyncFallback::Fail).await;
    wait_seeded(&t.p, &t.d, "disk").await;
    let initial = std::fs::read(&img).unwrap();
    let (stop, acked, w) = start_writer(&sock(&t.p), 20).await;
    t.pd.kill9();
    stop.store(true, Ordering::Relaxed);
    let log = tokio::task::spawn_blocking(move || w.join().unwrap())
        .await
        .unwrap();
    let acked = acked.load(Ordering::SeqCst);

    // The DR site dies at each step before the role changes: it restarts
    // as a consistent replica, and the failover can be run again.
    for step in ["force:applied", "force:point", "force:dirs"] {
        t.dd.kill9();
        t.dd = start_crashing_at(&t.d, step).await;
        let out = ferry(&t.d, &["failover", "disk", "--force"]);
        assert!(!out.status.success(), "{step}: the daemon did not die");
        assert!(
            t.dd.wait_exit(Duration::from_secs(10)),
            "{step}: still running"
        );
        t.dd = start(&t.d).await;
        let v = volume(&t.d, "disk").await;
        assert_eq!(v.role, Role::Replica, "{step}: {v:?}");
        assert_eq!(v.consistency, "consistent", "{step}: {v:?}");
        assert_eq!(v.role_state.epoch, 1, "{step}");
    }
    // At the last step the role has changed: the restart is the new primary.
    t.dd.kill9();
    t.dd = start_crashing_at(&t.d, "force:role").await;
    let _ = ferry(&t.d, &["failover", "disk", "--force"]);
    assert!(
        t.dd.wait_exit(Duration::from_secs(10)),
        "force:role: still running"
    );
    t.dd = start(&t.d).await;
    let v = volume(&t.d, "disk").await;
    assert_eq!((v.role, v.role_state.epoch), (Role::Primary, 2), "{v:?}");
    let promoted = t.tmp.path().join("promoted.img");
    nbdcopy_out(&sock(&t.d), "disk", &promoted);
    let i = flush_state_index(&initial, &log, &std::fs::read(&promoted).unwrap())
        .expect("the promoted state is not a flush state of the writer");
    assert!(i >= acked, "flush {i} promoted; {acked} were acknowledged");

    // The old primary returns and dies right after keeping its state as a
    // point: the restart captures again and becomes a level replica.
    t.pd = start_crashing_at(&t.p, "capture:point").await;
    assert!(
        t.pd.wait_exit(Duration::from_secs(30)),
        "the old primary did not reach its capture"
    );
    t.pd = start(&t.p).await;
    wait_level_replica(&t.p).await;
    wait_caught_up(&t.d, "disk").await;
    wait_dr_settled(&t.p, "disk").await;
    assert_same_bytes(&img, &promoted);
    let kept = points(&t.p).await;
    assert!(
        kept.iter()
            .filter(|p| p.pinned.as_deref() == Some("divergent"))
            .count()
            >= 1,
        "{kept:?}"
    );
}

/// A kill at each step of a planned switchover, at either site: while the
/// outcome is in doubt the old primary stays fenced (it never reopens on a
/// guess), asking again or the peer's `Hello` settles it, and the new
/// primary's image is the old primary's at the hand-over, every time.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_each_step_of_a_planned_switchover_loses_nothing() {
    let mut t = test_pair(false).await;
    let img = t.tmp.path().join("disk.img");
    make_mixed_image(&img, SIZE, 31).unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    wait_seeded(&t.p, &t.d, "disk").await;
    let dr_img = replica_path(&t.d, "disk");
    let mut writer = None;

    // The DR site dies at each step of its promotion before its role
    // changes: the primary says IN DOUBT and stays fenced; the DR site
    // restarts a consistent replica of epoch 1; asking again goes on.
    let mut handed = Vec::new();
    for step in ["promote:point", "promote:dirs"] {
        t.dd.kill9();
        t.dd = start_crashing_at(&t.d, step).await;
        wait_link(&t.d).await;
        wait_link(&t.p).await;
        if writer.is_none() {
            writer = Some(start_writer(&sock(&t.p), 20).await);
        }
        let out = ferry(
            &t.p,
            &["failover", "disk", "--planned", "--disconnect-clients"],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("IN DOUBT"),
            "{step}: {err}"
        );
        eprintln!("{step}: {err}");
        assert!(
            t.dd.wait_exit(Duration::from_secs(10)),
            "{step}: still running; its log:\n{}",
            std::fs::read_to_string(t.d.with_extension("log")).unwrap_or_default()
        );
        if handed.is_empty() {
            handed = std::fs::read(&img).unwrap();
        }
        t.dd = start(&t.d).await;
        wait_link(&t.d).await;
        let d = volume(&t.d, "disk").await;
        assert_eq!(
            (d.role, d.role_state.epoch, d.consistency.as_str()),
            (Role::Replica, 1, "consistent"),
            "{step}: {d:?}"
        );
        let p = volume(&t.p, "disk").await;
        assert_eq!(p.role, Role::Primary, "{step}");
        assert!(p.gate.is_some(), "{step}: the old primary reopened: {p:?}");
        assert!(std::fs::read(&img).unwrap() == handed, "{step}");
    }
    // The switchover cut the writer off; every write it made is in the
    // state handed over.
    let (stop, acked, w) = writer.take().unwrap();
    stop.store(true, Ordering::Relaxed);
    let log = tokio::task::spawn_blocking(move || w.join().unwrap())
        .await
        .unwrap();
    assert!(acked.load(Ordering::SeqCst) >= 20 && !log.is_empty());

    // The DR site dies right after its role changed: it restarts as the
    // primary, and its Hello makes the fenced old primary its replica.
    let args = ["failover", "disk", "--planned"];
    dies_at(&mut t.dd, &t.d, "promote:role", &t.p, &args).await;
    wait_level_replica(&t.p).await;
    let d = volume(&t.d, "disk").await;
    assert_eq!((d.role, d.role_state.epoch), (Role::Primary, 2), "{d:?}");
    assert!(
        std::fs::read(&dr_img).unwrap() == handed,
        "the new primary's image is not the old one's at the hand-over"
    );
    assert_eq!(volume(&t.p, "disk").await.role_state.epoch, 2);

    // Writes at the new primary, then it dies right after recording its
    // hand-over (before Promote is sent): it restarts fenced, in doubt;
    // asking again completes the switchover back.
    let mut c = NbdClient::connect(&sock(&t.d), "disk").unwrap();
    for k in 0..16u64 {
        c.write(k * 131072, &[k as u8 + 1; 8192]).unwrap();
    }
    c.flush().unwrap();
    c.disconnect();
    wait_caught_up(&t.d, "disk").await;
    let handed = std::fs::read(&dr_img).unwrap();
    let args = ["failover", "disk", "--planned"];
    dies_at(&mut t.dd, &t.d, "planned:handoff", &t.d, &args).await;
    let d = volume(&t.d, "disk").await;
    assert!(
        d.role == Role::Primary && d.gate.is_some(),
        "an in-doubt hand-over reopened: {d:?}"
    );
    let out = ferry(&t.d, &["failover", "disk", "--planned", "--json"]);
    assert!(
        out.status.success(),
        "asking again: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_level_replica(&t.d).await;
    let p = volume(&t.p, "disk").await;
    assert_eq!((p.role, p.role_state.epoch), (Role::Primary, 3), "{p:?}");
    assert!(std::fs::read(&img).unwrap() == handed);

    // The primary dies right after the DR side answered Promoted: the
    // restart learns from the Hello that its peer is primary now.
    let handed = std::fs::read(&img).unwrap();
    let args = ["failover", "disk", "--planned"];
    dies_at(&mut t.pd, &t.p, "planned:promoted", &t.p, &args).await;
    wait_level_replica(&t.p).await;
    let d = volume(&t.d, "disk").await;
    assert_eq!((d.role, d.role_state.epoch), (Role::Primary, 4), "{d:?}");
    assert!(std::fs::read(&dr_img).unwrap() == handed);
    wait_dr_settled(&t.p, "disk").await;
    assert_same_bytes(&img, &dr_img);
    for dir in [&t.p, &t.d] {
        let out = ferry(dir, &["audit", "--verify"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A snapshot-mode volume's writers reach its image directly, so its
/// planned switchover needs the operator's word that they are stopped: a
/// last pass carries every write to the DR site, which is promoted only if
/// it holds exactly that pass; the old primary becomes its replica; and the
/// failback goes the same way.
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_volume_switches_over_once_its_writers_are_stopped() {
    let t = test_pair(false).await;
    let img = t.tmp.path().join("disk.img");
    make_mixed_image(&img, SIZE, 37).unwrap();
    add_volume(&t.p, "disk", &img).await;
    first_pass(&t.p, "disk").await.unwrap();

    let out = ferry(&t.p, &["failover", "disk", "--planned"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--workload-stopped"),
        "{err}"
    );
    // The VM wrote after the last pass, then was shut down.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&[0x5a; 3 * 65536], 5 << 20).unwrap();
        f.sync_all().unwrap();
    }
    let r = ferry_json(
        &t.d,
        &[
            "failover",
            "disk",
            "--planned",
            "--workload-stopped",
            "--json",
        ],
    );
    assert_eq!(
        (r["epoch"].as_u64(), r["new_primary"].as_str()),
        (Some(2), Some("dr"))
    );
    let dr_img = replica_path(&t.d, "disk");
    assert_same_bytes(&img, &dr_img);
    let d = volume(&t.d, "disk").await;
    assert_eq!((d.role, d.gate.is_none()), (Role::Primary, true), "{d:?}");
    assert_eq!(volume(&t.p, "disk").await.role, Role::Replica);

    // The new primary takes writes; its passes reach the old primary.
    let mut c = NbdClient::connect(&sock(&t.d), "disk").unwrap();
    c.write(65536, &[7u8; 65536]).unwrap();
    c.flush().unwrap();
    c.disconnect();
    let out = ferry(&t.d, &["sync", "disk", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_dr_settled(&t.p, "disk").await;
    assert_same_bytes(&dr_img, &img);

    // Failback, asked for at the old primary, the same way.
    let out = ferry(&t.p, &["failback", "disk", "--workload-stopped", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = volume(&t.p, "disk").await;
    assert_eq!((p.role, p.role_state.epoch), (Role::Primary, 3), "{p:?}");
    assert_same_bytes(&img, &dr_img);
    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    c.write(0, &[3u8; 4096]).unwrap();
    c.flush().unwrap();
    c.disconnect();
    let out = ferry(&t.p, &["sync", "disk", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_bytes(&img, &dr_img);
}
