//! Failover drills at the DR site: a writable clone of a recovery point,
//! ready in time independent of the volume's size, exported over NBD while
//! replication goes on, never seen by the replica, reported when it ends,
//! and recorded as aborted when the daemon dies during it.

mod common;

use std::path::Path;
use std::process::Command;

use common::nbd_client::NbdClient;
use common::*;
use ferry::cli::demo::{Rng, make_mixed_image};
use ferry::daemon::api::DrillStarted;
use ferry::failover::drill::{DrillReport, DrillResult};
use ferry::store::state::{Mode, SyncFallback};

fn drill(dir: &Path, args: &[&str]) -> std::process::Output {
    let mut a = vec!["drill"];
    a.extend_from_slice(args);
    ferry(dir, &a)
}

fn drill_start(dir: &Path, name: &str) -> DrillStarted {
    let out = drill(dir, &["start", name, "--json"]);
    assert!(
        out.status.success(),
        "drill start {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn last_report(dir: &Path, name: &str) -> DrillReport {
    let out = drill(dir, &["report", name, "--last", "--json"]);
    assert!(
        out.status.success(),
        "drill report {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A sparse image of `size` with a few MiB of random data at `spots`.
fn sparse_image(path: &Path, size: u64, spots: &[u64], seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng(seed);
    for &at in spots {
        let data: Vec<u8> = (0..(1 << 20)).map(|_| rng.next_u64() as u8).collect();
        std::os::unix::fs::FileExt::write_all_at(&f, &data, at).unwrap();
    }
}

fn nbdcopy_out(socket: &Path, export: &str, to: &Path) {
    run(Command::new("nbdcopy")
        .arg(format!("nbd+unix:///{export}?socket={}", socket.display()))
        .arg(to));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drill_clones_a_point_at_once_and_never_touches_the_replica() {
    const SMALL: u64 = 64 << 20;
    const BIG: u64 = 4 << 30;
    let mut t = test_pair(true).await;
    let (small, big) = (t.tmp.path().join("small.img"), t.tmp.path().join("big.img"));
    make_mixed_image(&small, SMALL, 9).unwrap();
    sparse_image(&big, BIG, &[0, 1 << 30, BIG - (1 << 20)], 4);
    add_volume_mode(&t.p, "small", &small, Mode::Async, SyncFallback::Fail).await;
    add_volume_mode(&t.p, "big", &big, Mode::Async, SyncFallback::Fail).await;

    // Before any point: refused, with the reason. The DR site learns of the
    // volume when the primary's stream opens it; until then the refusal
    // names an unknown volume instead, which is not what this checks.
    wait_volume_known(&t.d, "small").await;
    let early = drill(&t.d, &["start", "small"]);
    if !early.status.success() {
        let err = String::from_utf8_lossy(&early.stderr);
        assert!(err.contains("no recovery point yet"), "{err}");
    } else {
        // The seed was that fast: end this drill, the test starts its own.
        assert!(drill(&t.d, &["stop", "small"]).status.success());
    }
    wait_seeded(&t.p, &t.d, "small").await;
    wait_seeded(&t.p, &t.d, "big").await;

    // At the primary a drill makes no sense.
    let at_primary = drill(&t.p, &["start", "small"]);
    assert!(!at_primary.status.success());
    assert!(
        String::from_utf8_lossy(&at_primary.stderr).contains("primary at this site"),
        "{}",
        String::from_utf8_lossy(&at_primary.stderr)
    );

    let s = drill_start(&t.d, "small");
    let b = drill_start(&t.d, "big");
    eprintln!(
        "drill ready: {:.2} ms for 64 MiB, {:.2} ms for 4 GiB",
        s.state.ready_ms, b.state.ready_ms
    );
    assert_eq!(s.export, "small@drill");
    assert_eq!(b.state.size, BIG);
    assert!(
        b.state.ready_ms < 2000.0 && b.state.ready_ms < 10.0 * s.state.ready_ms + 500.0,
        "a 4 GiB clone took {:.1} ms where a 64 MiB one took {:.1} ms: not independent of the size",
        b.state.ready_ms,
        s.state.ready_ms
    );
    let again = drill(&t.d, &["start", "small"]);
    assert!(!again.status.success(), "a second drill of one volume");

    // The clone reads as the point it was made from.
    let point = t.tmp.path().join("point.img");
    restore(&t.d, "small", Some(s.state.point), &point).await;
    let clone = t.tmp.path().join("clone.img");
    nbdcopy_out(&sock(&t.d), "small@drill", &clone);
    assert_same_bytes(&clone, &point);

    // Replication goes on during the drill: the primary's writer and the
    // drill's writer at once.
    let dsock = sock(&t.d);
    let drill_writer = std::thread::spawn(move || {
        let mut c = NbdClient::connect(&dsock, "small@drill").unwrap();
        let mut rng = Rng(3);
        let mut written = Vec::new();
        for i in 0..64u64 {
            let off = (rng.next_u64() % (SMALL / 4096 - 64)) * 4096 + (i % 3) * 512;
            let data: Vec<u8> = (0..40_000).map(|_| rng.next_u64() as u8).collect();
            c.write(off, &data).unwrap();
            written.push((off, data));
        }
        c.flush().unwrap();
        for (off, data) in &written[written.len() - 8..] {
            let mut back = vec![0u8; data.len()];
            c.read(*off, &mut back).unwrap();
            assert!(back == *data, "the clone lost a write at {off}");
        }
        c.disconnect();
        written.len()
    });
    let psock = sock(&t.p);
    let primary_writer = std::thread::spawn(move || {
        let mut c = NbdClient::connect(&psock, "small").unwrap();
        let mut rng = Rng(8);
        for _ in 0..200 {
            let off = (rng.next_u64() % (SMALL / 4096 - 16)) * 4096;
            let data: Vec<u8> = (0..65536).map(|_| rng.next_u64() as u8).collect();
            c.write(off, &data).unwrap();
        }
        c.flush().unwrap();
        c.disconnect();
    });
    assert_eq!(drill_writer.join().unwrap(), 64);
    primary_writer.join().unwrap();
    wait_caught_up(&t.p, "small").await;
    wait_dr_settled(&t.d, "small").await;
    // The replica holds the primary's writes and none of the drill's.
    assert_same_bytes(&replica_path(&t.d, "small"), &small);

    let st = volume(&t.d, "small").await;
    let dv = st.drill.expect("status shows the running drill");
    assert!(dv.bytes_written >= 64 * 40_000, "{dv:?}");

    let out = drill(&t.d, &["stop", "small"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("result: PASSED"), "{text}");
    let r = last_report(&t.d, "small");
    assert_eq!(r.result, DrillResult::Passed);
    assert_eq!(r.point, s.state.point);
    assert!(
        r.base_check.ok() && r.base_check.chunks_total == SMALL / 65536,
        "{r:?}"
    );
    assert!(r.bytes_written >= 64 * 40_000);
    assert!(r.started_by.uid.is_some(), "who ran it: {:?}", r.started_by);
    let reports = t.d.join("drills").join("reports");
    assert!(reports.join(format!("{}.json", r.id)).exists());
    assert!(reports.join(format!("{}.txt", r.id)).exists());
    assert!(
        !t.d.join("drills").join("small").exists(),
        "the clone was discarded"
    );
    assert!(
        NbdClient::connect(&sock(&t.d), "small@drill").is_err(),
        "the drill export is gone"
    );
    // The point the drill stood on is untouched.
    let point2 = t.tmp.path().join("point2.img");
    restore(&t.d, "small", Some(s.state.point), &point2).await;
    assert_same_bytes(&point2, &point);

    let m = http_get(&metrics_addr(&t.d), "/metrics");
    assert_eq!(
        sample(&m, r#"ferry_drills_total{result="passed",volume="small"}"#),
        Some(1.0),
        "{m}"
    );
    assert!(
        sample(
            &m,
            r#"ferry_last_drill_success_timestamp_seconds{volume="small"}"#
        )
        .is_some_and(|v| v as u64 >= r.stopped),
    );

    // The DR daemon dies during the drill of `big`: at its next start the
    // clone is discarded and the drill recorded as aborted.
    let mut c = NbdClient::connect(&sock(&t.d), "big@drill").unwrap();
    c.write(1 << 20, &[7u8; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);
    t.dd.kill9();
    assert!(t.d.join("drills").join("big").exists());
    t.dd = start(&t.d).await;
    assert!(
        !t.d.join("drills").join("big").exists(),
        "the orphaned clone stays"
    );
    let r = last_report(&t.d, "big");
    assert_eq!(r.result, DrillResult::Aborted);
    assert!(
        r.reason.as_deref().unwrap_or("").contains("daemon stopped"),
        "{r:?}"
    );
    let m = http_get(&metrics_addr(&t.d), "/metrics");
    assert_eq!(
        sample(&m, r#"ferry_drills_total{result="aborted",volume="big"}"#),
        Some(1.0)
    );
    // The passed drill of `small` still counts after the restart.
    assert!(
        sample(
            &m,
            r#"ferry_last_drill_success_timestamp_seconds{volume="small"}"#
        )
        .is_some_and(|v| v > 0.0)
    );
    let all = drill(&t.d, &["report", "small"]);
    assert!(String::from_utf8_lossy(&all.stdout).contains("passed"));
    // Each drill command is in the audit log, before and after, chained.
    let out = ferry(&t.d, &["audit", "--verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("intact"), "{text}");
    for what in ["drill start", "drill stop"] {
        assert!(
            text.contains(what),
            "{what} missing from the audit log: {text}"
        );
    }
}

/// The acceptance check of a drill: a kernel ext4, made on the volume at
/// the primary, mounts from the drill export at the DR site, takes writes,
/// and passes e2fsck; the replica never sees those writes.
#[tokio::test(flavor = "multi_thread")]
async fn a_kernel_ext4_mounts_from_the_drill_export_and_passes_e2fsck() {
    const SIZE: u64 = 128 << 20;
    let t = test_pair(false).await;
    let img = t.tmp.path().join("disk.img");
    // A real file system made from real files.
    let src = t.tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let mut rng = Rng(12);
    let mut files = Vec::new();
    for i in 0..40 {
        let data: Vec<u8> = (0..(1 + rng.next_u64() % 200) * 1024)
            .map(|_| rng.next_u64() as u8)
            .collect();
        std::fs::write(src.join(format!("f{i}")), &data).unwrap();
        files.push((format!("f{i}"), data));
    }
    std::fs::File::create(&img).unwrap().set_len(SIZE).unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&img));
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    wait_seeded(&t.p, &t.d, "disk").await;
    let before = file_hash(&replica_path(&t.d, "disk"));

    drill_start(&t.d, "disk");
    let (mnt, fs) = (t.tmp.path().join("nbd"), t.tmp.path().join("fs"));
    std::fs::create_dir(&fs).unwrap();
    let (mut mounts, dev) = fuse_device(&mnt, &nbd_uri(&t.d, "disk@drill"), SIZE).await;
    run(privileged("mount").arg("-o").arg("loop").arg(&dev).arg(&fs));
    mounts.dirs.push(fs.clone());
    for (name, data) in &files {
        let got = std::fs::read(fs.join(name)).unwrap();
        assert!(got == *data, "{name} differs in the drill clone");
    }
    // The drill's guest writes.
    run(privileged("cp")
        .arg(src.join("f0"))
        .arg(fs.join("drill-copy")));
    run(privileged("sync").arg("-f").arg(fs.join("drill-copy")));
    run(privileged("umount").arg(&fs));
    mounts.dirs.pop();
    run(privileged("e2fsck").args(["-f", "-n"]).arg(&dev));
    drop(mounts);

    let out = drill(&t.d, &["stop", "disk"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r = last_report(&t.d, "disk");
    assert_eq!(r.result, DrillResult::Passed);
    assert!(r.bytes_written > 0);
    // Nothing reached the replica (no writes at the primary meanwhile).
    wait_dr_settled(&t.d, "disk").await;
    assert_eq!(file_hash(&replica_path(&t.d, "disk")), before);
    assert_same_bytes(&replica_path(&t.d, "disk"), &img);
}
