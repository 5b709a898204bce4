//! Writing to a continuous volume the moment it is added, while its seed
//! (a tree comparison of the live image) still runs: the DR side's first
//! consistent state must be one the primary had at a flush, and a sync
//! volume's flushes complete once their records are durable at DR.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::nbd_client::NbdClient;
use common::oracle::*;
use common::*;
use ferry::cli::demo::{Rng, make_mixed_image};
use ferry::store::state::{Mode, RecoveryPoint, SyncFallback};

/// Writes and flushes at random places until `stop`; returns the log.
fn writer(socket: &Path, size: u64, seed: u64, stop: &AtomicBool) -> Vec<Op> {
    let mut c = NbdClient::connect(socket, "disk").expect("the export is there at once");
    let mut rng = Rng(seed);
    let mut log = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..1 + rng.next_u64() % 4 {
            // Large writes: a stream batch (8 MiB) ends a few of them after
            // the scan, well before the pass has read every chunk it sends.
            let len = (1 + rng.next_u64() % 256) * 4096;
            let off = (rng.next_u64() % ((size - len) / 4096)) * 4096;
            let mut data = vec![0u8; len as usize];
            for w in data.chunks_mut(8) {
                w.copy_from_slice(&rng.next_u64().to_le_bytes()[..w.len()]);
            }
            c.write(off, &data).expect("write");
            log.push(Op::Write(off, data));
        }
        c.flush().expect("flush");
        log.push(Op::Flush);
    }
    c.disconnect();
    log
}

/// The DR side's points (none while the replica does not exist yet).
async fn dr_points(d: &Path) -> Vec<RecoveryPoint> {
    ferry::cli::Client::new(d)
        .get("/volumes/disk/points")
        .await
        .unwrap_or_default()
}

/// The seed reads the image while the writer changes it, and chunks that
/// change between the scan and their sending travel with their newer
/// content. The DR side may call itself consistent (and take its "resync
/// complete" point) only once the stream covers everything the pass sent:
/// that point must be a state the primary had at a flush.
#[tokio::test(flavor = "multi_thread")]
async fn the_first_point_after_a_seed_under_writes_is_a_flush_state_of_the_primary() {
    const SIZE: u64 = 96 << 20;
    let t = test_pair(false).await;
    let img = t.tmp.path().join("disk.img");
    // Random content: every chunk travels, so the pass reads chunks for a
    // while after its scan.
    let mut rng = Rng(5);
    let initial: Vec<u8> = (0..SIZE / 8)
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect();
    std::fs::write(&img, &initial).unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (s2, socket) = (stop.clone(), sock(&t.p));
    let w = std::thread::spawn(move || writer(&socket, SIZE, 77, &s2));

    // Until the DR side's first point exists.
    let t0 = Instant::now();
    let first = loop {
        if let Some(p) = dr_points(&t.d).await.into_iter().next() {
            break p;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no point after the seed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.store(true, Ordering::Relaxed);
    let log = tokio::task::spawn_blocking(move || w.join().unwrap())
        .await
        .unwrap();
    let flushes = log.iter().filter(|o| matches!(o, Op::Flush)).count();
    assert!(
        flushes > 5,
        "only {flushes} flushes: the seed ran without writes"
    );

    let out = t.tmp.path().join("first.img");
    restore(&t.d, "disk", Some(first.id), &out).await;
    let state = std::fs::read(&out).unwrap();
    let idx = flush_state_index(&initial, &log, &state);
    assert!(
        idx.is_some(),
        "point {} ({}) is not a state the primary had at any of its {flushes} flushes",
        first.id,
        first.source
    );
    // And the stream goes on to the end.
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    assert_same_bytes(&img, &replica_path(&t.d, "disk"));
}

/// A guest formats and uses a new sync volume at once: its flushes, sent
/// while the seed runs, complete once their records are durable in the DR
/// redo log (as DRBD's protocol C does during its initial sync), and once the
/// seed has ended, every acknowledged flush is at DR after a kill -9 of the
/// primary.
#[tokio::test(flavor = "multi_thread")]
async fn sync_flushes_during_the_seed_complete_and_survive_a_primary_kill() {
    const SIZE: u64 = 128 << 20;
    let mut t = test_pair(false).await;
    let img = t.tmp.path().join("disk.img");
    make_mixed_image(&img, SIZE, 9).unwrap();
    // A flush during the seed waits for it to reach the DR site: on a busy
    // machine that can take longer than the tests' usual 2 s.
    add_volume_waiting(&t.p, "disk", &img, Mode::Sync, SyncFallback::Fail, 30_000).await;
    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    let seeding = volume(&t.p, "disk").await.stream.unwrap().resync_needed;
    assert!(seeding, "the seed had already ended: nothing was checked");
    let mut acked = Vec::new();
    for i in 0..40u64 {
        let data = vec![i as u8 + 1; 65536];
        c.write(i * (3 << 20), &data).unwrap();
        c.flush()
            .unwrap_or_else(|e| panic!("flush {i} during the seed of a sync volume failed: {e}"));
        acked.push((i * (3 << 20), data));
    }
    wait_seeded(&t.p, &t.d, "disk").await;
    c.write(SIZE - 4096, &[0xab; 4096]).unwrap();
    c.flush().unwrap();
    acked.push((SIZE - 4096, vec![0xab; 4096]));
    t.pd.kill9();
    let scratch = t.tmp.path().join("p.img");
    let (state, _) = dr_state_after_primary_loss(&t.d, "disk", &scratch).await;
    assert_eq!(
        state, "image",
        "the seed had ended: the DR image is consistent"
    );
    let replica = std::fs::read(replica_path(&t.d, "disk")).unwrap();
    for (off, data) in &acked {
        let off = *off as usize;
        assert!(
            replica[off..off + data.len()] == data[..],
            "an acknowledged flush of the write at {off} is missing at DR"
        );
    }
}

/// The acceptance check of a sync volume: a kernel ext4 made with mkfs.ext4
/// on the volume the moment it is added (its seed still running), files
/// written and fsynced on it, a kill -9 of the primary: every file fsynced
/// is in the DR image, as the kernel reads it after its journal replay.
#[tokio::test(flavor = "multi_thread")]
async fn kernel_ext4_made_during_the_seed_of_a_sync_volume_keeps_every_fsynced_file() {
    const SIZE: u64 = 256 << 20;
    let mut t = test_pair(false).await;
    let img = t.tmp.path().join("disk.img");
    make_mixed_image(&img, SIZE, 3).unwrap();
    // A flush during the seed waits for it to reach the DR site: on a busy
    // machine that can take longer than the tests' usual 2 s.
    add_volume_waiting(&t.p, "disk", &img, Mode::Sync, SyncFallback::Fail, 30_000).await;

    let (mnt, fs) = (t.tmp.path().join("nbd"), t.tmp.path().join("fs"));
    std::fs::create_dir(&fs).unwrap();
    let (mut mounts, dev) = fuse_device(&mnt, &nbd_uri(&t.p, "disk"), SIZE).await;
    assert!(
        volume(&t.p, "disk").await.stream.unwrap().resync_needed,
        "the seed had already ended: nothing was checked"
    );
    run(std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&dev));
    run(privileged("mount").arg("-o").arg("loop").arg(&dev).arg(&fs));
    mounts.dirs.push(fs.clone());

    let mut rng = Rng(41);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut during_seed = 0;
    let mut write_files = |n: usize, files: &mut Vec<(String, Vec<u8>)>| {
        for _ in 0..n {
            let name = format!("f{}", files.len());
            let data: Vec<u8> = (0..(64 << 10) + rng.next_u64() % (256 << 10))
                .map(|_| rng.next_u64() as u8)
                .collect();
            let mut f = std::fs::File::create(fs.join(&name)).unwrap();
            std::io::Write::write_all(&mut f, &data).unwrap();
            f.sync_all().unwrap();
            // The directory entry too: fsync the directory.
            std::fs::File::open(&fs).unwrap().sync_all().unwrap();
            files.push((name, data));
        }
    };
    write_files(10, &mut files);
    if volume(&t.p, "disk").await.stream.unwrap().resync_needed {
        during_seed = files.len();
    }
    wait_seeded(&t.p, &t.d, "disk").await;
    write_files(10, &mut files);
    t.pd.kill9();
    drop(mounts);

    let scratch = t.tmp.path().join("p.img");
    let (state, _) = dr_state_after_primary_loss(&t.d, "disk", &scratch).await;
    assert_eq!(state, "image");
    // The kernel mounts a copy of the DR image (replaying the ext4 journal).
    let copy = t.tmp.path().join("dr-copy.img");
    std::fs::copy(replica_path(&t.d, "disk"), &copy).unwrap();
    let chk = t.tmp.path().join("chk");
    std::fs::create_dir(&chk).unwrap();
    run(privileged("mount")
        .arg("-o")
        .arg("loop")
        .arg(&copy)
        .arg(&chk));
    let _m = Mounts {
        dirs: vec![chk.clone()],
        fuse: None,
    };
    for (name, data) in &files {
        let got = std::fs::read(chk.join(name))
            .unwrap_or_else(|e| panic!("fsynced file {name} is not at DR: {e}"));
        assert!(got == *data, "fsynced file {name} differs at DR");
    }
    eprintln!(
        "{} fsynced files at DR ({during_seed} of them fsynced while the seed ran)",
        files.len()
    );
}
