//! Continuous replication (async and sync) through the NBD export, with
//! real clients, an oracle under kill -9 of either site, and a link cut
//! longer than the journal holds.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::nbd_client::NbdClient;
use common::*;
use ferry::cli::demo::Rng;
use ferry::hash::Hash;
use ferry::store::state::{Mode, PassReport, SyncFallback};

const SIZE: u64 = 8 << 20;

async fn continuous_pair(mode: Mode, fallback: SyncFallback) -> (TestPair, PathBuf) {
    let t = test_pair(false).await;
    let img = t.tmp.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(SIZE).unwrap();
    add_volume_mode(&t.p, "disk", &img, mode, fallback).await;
    wait_seeded(&t.p, &t.d, "disk").await;
    (t, img)
}

#[tokio::test(flavor = "multi_thread")]
async fn async_replica_equals_primary_when_lag_reaches_zero() {
    let t = test_pair(false).await;
    let img = t.tmp.path().join("disk.img");
    // An image with data before protection: the seed carries it.
    ferry::cli::demo::make_mixed_image(&img, 32 << 20, 7).unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    wait_seeded(&t.p, &t.d, "disk").await;
    assert_same_bytes(&img, &replica_path(&t.d, "disk"));

    // qemu-img writes a whole image into the export; qemu-io adds patterns.
    let src = t.tmp.path().join("src.img");
    ferry::cli::demo::make_mixed_image(&src, 32 << 20, 8).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(nbd_uri(&t.p, "disk")));
    run(Command::new("qemu-io")
        .args(["-f", "raw", &nbd_uri(&t.p, "disk")])
        .args([
            "-c",
            "write -P 0x5a 1M 64k",
            "-c",
            "flush",
            "-c",
            "write -z 4M 1M",
            "-c",
            "discard 8M 2M",
            "-c",
            "write -f -P 0x33 20M 8k",
            "-c",
            "flush",
        ]));
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    assert_same_bytes(&img, &replica_path(&t.d, "disk"));
    // nbdcopy reads the export back: what the workload sees is what the DR holds.
    let back = t.tmp.path().join("back.img");
    run(Command::new("nbdcopy")
        .arg(nbd_uri(&t.p, "disk"))
        .arg(&back));
    assert_same_bytes(&back, &replica_path(&t.d, "disk"));

    // Status shows the stream; a point on demand restores the same bytes.
    let v = volume(&t.p, "disk").await;
    let s = v.stream.expect("stream status");
    assert_eq!(s.lag_bytes, 0);
    assert!(s.acked_seq >= 6, "{s:?}");
    let p = create_point(&t.p, "disk").await;
    assert_eq!(
        p.seq,
        volume(&t.d, "disk").await.redo.map(|r| r.applied_seq)
    );
    let out = t.tmp.path().join("restored.img");
    let r = restore(&t.d, "disk", Some(p.id), &out).await;
    assert_eq!(r.point.id, p.id);
    assert_same_bytes(&out, &img);
    // A restore never overwrites a file.
    let again = ferry(&t.d, &["restore", "disk", "--to", out.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwrites"));
}

/// Points of an async volume keep small writes as deltas over the chunks
/// of the point before (and over that point's base again when the chunk
/// was a delta already): every point restores byte for byte, and a scrub
/// reads every chunk of every point back clean.
#[tokio::test(flavor = "multi_thread")]
async fn points_of_small_writes_keep_deltas_and_each_restores_whole() {
    let (t, img) = continuous_pair(Mode::Async, SyncFallback::Fail).await;
    let qemu_io = |cmds: &[String]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw", &nbd_uri(&t.p, "disk")]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.args(["-c", "flush"]);
        run(&mut c);
    };
    let mut states = Vec::new();
    let mut points = Vec::new();
    // 1: every chunk written whole, most with their own byte, 27 the same
    // as others and 4 zeros (the point stores them on several threads: a
    // chunk named twice once, a zero chunk not at all); 2: one 4 KiB
    // block in each of 16 chunks; 3: another block in the same chunks
    // (their base is a delta).
    let rounds: [Vec<String>; 3] = [
        (0..128)
            .map(|i| {
                let byte = if i % 32 == 31 { 0 } else { i % 100 + 1 };
                format!("write -P {byte} {} 64k", i * 65536)
            })
            .collect(),
        (0..16)
            .map(|i| format!("write -P 0x22 {} 4k", i * 512 * 1024 + 8192))
            .collect(),
        (0..16)
            .map(|i| format!("write -P 0x33 {} 4k", i * 512 * 1024 + 40960))
            .collect(),
    ];
    for cmds in &rounds {
        qemu_io(cmds);
        wait_caught_up(&t.p, "disk").await;
        wait_dr_settled(&t.d, "disk").await;
        let p = create_point(&t.p, "disk").await;
        points.push(p.id);
        states.push(std::fs::read(&img).unwrap());
    }
    let deltas = ferry_json(&t.d, &["status", "--json"])["store"]["delta_chunks"]
        .as_u64()
        .unwrap();
    assert!(
        deltas >= 32,
        "two rounds of 16 one-block writes are kept as deltas: {deltas}"
    );
    for (id, want) in points.iter().zip(&states) {
        let out = t.tmp.path().join(format!("point{id}.img"));
        restore(&t.d, "disk", Some(*id), &out).await;
        assert!(
            std::fs::read(&out).unwrap() == *want,
            "point {id} restores the volume as it was"
        );
    }
    let scrub = ferry_json(&t.d, &["scrub", "disk", "--json"]);
    assert_eq!(scrub["found"], serde_json::json!([]), "{scrub}");
}

/// The writer's record: the volume content at every flush it sent, and
/// which of those the server acknowledged.
struct Oracle {
    model: Vec<u8>,
    states: Vec<Hash>,
    /// Index in `states` of the newest acknowledged flush.
    acked: usize,
    /// Flushes the server acknowledged, and refused, since the start.
    acks: u64,
    refusals: u64,
    /// `acks`, readable while a burst runs on its thread.
    live_acks: Arc<AtomicU64>,
    rng: Rng,
}

impl Oracle {
    fn new(seed: u64) -> Oracle {
        let model = vec![0u8; SIZE as usize];
        let states = vec![Hash::of_chunk(&model)];
        Oracle {
            model,
            states,
            acked: 0,
            acks: 0,
            refusals: 0,
            live_acks: Arc::new(AtomicU64::new(0)),
            rng: Rng(seed),
        }
    }

    /// Random writes and flushes until `stop`, or until the connection
    /// fails; a flush refused by the server (sync mode, DR away) is not fatal.
    fn burst(&mut self, socket: &Path, stop: &AtomicBool) -> Result<(), String> {
        let mut c = NbdClient::connect(socket, "disk").map_err(|e| e.to_string())?;
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..1 + self.rng.next_u64() % 6 {
                let blocks = SIZE / 4096;
                let off = (self.rng.next_u64() % blocks) * 4096;
                let len = ((1 + self.rng.next_u64() % 16) * 4096).min(SIZE - off) as usize;
                let mut data = vec![0u8; len];
                for w in data.chunks_mut(8) {
                    w.copy_from_slice(&self.rng.next_u64().to_le_bytes()[..w.len()]);
                }
                c.write(off, &data).map_err(|e| format!("write: {e}"))?;
                self.model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            self.flush(&mut c)?;
        }
        // End on a flush, so that the last state is a flush state.
        self.flush(&mut c)?;
        c.disconnect();
        Ok(())
    }

    /// A flush, recorded as acknowledged or refused (sync mode, DR away).
    fn flush(&mut self, c: &mut NbdClient) -> Result<(), String> {
        self.states.push(Hash::of_chunk(&self.model));
        match c.flush() {
            Ok(()) => {
                self.acked = self.states.len() - 1;
                self.acks += 1;
                self.live_acks.store(self.acks, Ordering::SeqCst);
                Ok(())
            }
            Err(e) if e.to_string().contains("server error") => {
                self.refusals += 1;
                Ok(())
            }
            Err(e) => Err(format!("flush: {e}")),
        }
    }

    /// After the primary restarts, what it serves is the truth again (the
    /// write in flight at the kill may or may not be there).
    fn reread(&mut self, socket: &Path) {
        let mut c = NbdClient::connect(socket, "disk").unwrap();
        for (i, piece) in self.model.chunks_mut(1 << 20).enumerate() {
            c.read((i as u64) << 20, piece).unwrap();
        }
        c.disconnect();
    }
}

/// Runs a burst on a thread while `during` runs; returns the oracle.
async fn with_burst<F: std::future::Future<Output = ()>>(
    mut o: Oracle,
    socket: PathBuf,
    during: F,
) -> (Oracle, Result<(), String>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let h = std::thread::spawn(move || {
        let r = o.burst(&socket, &s2);
        (o, r)
    });
    during.await;
    stop.store(true, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || h.join().unwrap())
        .await
        .unwrap()
}

async fn primary_kills(mode: Mode) {
    let (mut t, img) = continuous_pair(mode, SyncFallback::Fail).await;
    let mut o = Oracle::new(mode as u64 + 11);
    let mut rng = Rng(99);
    let mut dr_idx = 0usize;
    let rounds = 20;
    for round in 0..rounds {
        let wait = Duration::from_millis(50 + rng.next_u64() % 350);
        let pd = &mut t.pd;
        let acks_before = o.acks;
        let live = o.live_acks.clone();
        let (o2, r) = with_burst(o, sock(&t.p), async move {
            tokio::time::sleep(wait).await;
            // In sync mode the kill waits for a flush of this round to be
            // acknowledged (a fresh connection's first one can take longer
            // than the shortest wait on a busy machine): the round checks it.
            let t0 = Instant::now();
            while mode == Mode::Sync
                && live.load(Ordering::SeqCst) <= acks_before
                && t0.elapsed() < Duration::from_secs(30)
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            pd.kill9();
        })
        .await;
        o = o2;
        assert!(r.is_err(), "round {round}: the writer outlived the primary");
        // What the DR site would promote now: its image when consistent; its
        // last point while a resync (which the primary's death interrupted) lasts.
        let (state, h) =
            dr_state_after_primary_loss(&t.d, "disk", &t.tmp.path().join("p.img")).await;
        let idx = o.states.iter().rposition(|s| *s == h).unwrap_or_else(|| {
            panic!("round {round}: the DR {state} is not any flush state of the primary")
        });
        assert!(
            idx >= dr_idx,
            "round {round}: the DR image went back in time"
        );
        if mode == Mode::Sync {
            assert_eq!(
                state, "image",
                "round {round}: a restart of the primary must not leave the DR side resyncing"
            );
            assert!(
                o.acks > acks_before,
                "round {round}: no flush was acknowledged ({} refused): nothing was checked",
                o.refusals
            );
            assert!(
                idx >= o.acked,
                "round {round}: an acknowledged sync flush ({}) is missing at DR (has {idx})",
                o.acked
            );
        }
        dr_idx = idx;
        t.pd = start(&t.p).await;
        wait_link(&t.p).await;
        o.reread(&sock(&t.p));
    }
    assert!(
        o.acks >= rounds,
        "only {} flushes were acknowledged in {rounds} rounds ({} refused)",
        o.acks,
        o.refusals
    );
    // Quiet: the DR side ends equal to the primary.
    let (o, r) = with_burst(
        o,
        sock(&t.p),
        tokio::time::sleep(Duration::from_millis(200)),
    )
    .await;
    r.unwrap();
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    assert_eq!(
        file_hash(&replica_path(&t.d, "disk")),
        *o.states.last().unwrap()
    );
    assert_same_bytes(&img, &replica_path(&t.d, "disk"));
}

async fn dr_kills(mode: Mode) {
    let (mut t, img) = continuous_pair(mode, SyncFallback::Fail).await;
    let mut o = Oracle::new(mode as u64 + 23);
    let mut rng = Rng(7);
    for round in 0..20 {
        let (w1, w2) = (
            Duration::from_millis(50 + rng.next_u64() % 350),
            Duration::from_millis(rng.next_u64() % 300),
        );
        let dd = &mut t.dd;
        let (o2, r) = with_burst(o, sock(&t.p), async move {
            tokio::time::sleep(w1).await;
            dd.kill9();
            tokio::time::sleep(w2).await;
        })
        .await;
        o = o2;
        r.unwrap_or_else(|e| panic!("round {round}: the writer failed: {e}"));
        t.dd = start(&t.d).await;
        wait_caught_up(&t.p, "disk").await;
        wait_dr_settled(&t.d, "disk").await;
        assert_eq!(
            file_hash(&replica_path(&t.d, "disk")),
            *o.states.last().unwrap(),
            "round {round}: after the DR restart its image is not the last flush state"
        );
        if round % 4 == 0 {
            // A point taken now restores that same state.
            let p = create_point(&t.d, "disk").await;
            let out = t.tmp.path().join(format!("r{round}.img"));
            restore(&t.d, "disk", Some(p.id), &out).await;
            assert_eq!(file_hash(&out), *o.states.last().unwrap());
            std::fs::remove_file(&out).unwrap();
        }
    }
    assert_same_bytes(&img, &replica_path(&t.d, "disk"));
}

#[tokio::test(flavor = "multi_thread")]
async fn async_dr_holds_a_flush_state_after_primary_kills() {
    primary_kills(Mode::Async).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn acked_sync_flush_survives_primary_kills() {
    primary_kills(Mode::Sync).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn async_replica_recovers_after_dr_kills() {
    dr_kills(Mode::Async).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_replica_recovers_after_dr_kills() {
    dr_kills(Mode::Sync).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_flush_waits_then_fails_or_degrades_while_dr_is_away() {
    for fallback in [SyncFallback::Fail, SyncFallback::Degrade] {
        let (mut t, img) = continuous_pair(Mode::Sync, fallback).await;
        let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
        c.write(0, &[1u8; 4096]).unwrap();
        let t0 = Instant::now();
        c.flush().unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "flush with the DR up"
        );
        t.dd.kill9();
        c.write(4096, &[2u8; 4096]).unwrap();
        let t0 = Instant::now();
        let r = c.flush();
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(1900),
            "the flush waited {took:?}"
        );
        let v = volume(&t.p, "disk").await;
        match fallback {
            SyncFallback::Fail => {
                assert!(r.is_err(), "a sync flush without the DR site must fail");
                assert!(!v.stream.unwrap().degraded);
            }
            SyncFallback::Degrade => {
                r.unwrap();
                assert!(v.stream.unwrap().degraded, "status shows the degradation");
                // Degraded: flushes complete at once until the DR side is back.
                let t0 = Instant::now();
                c.flush().unwrap();
                assert!(t0.elapsed() < Duration::from_millis(1500));
            }
        }
        t.dd = start(&t.d).await;
        wait_caught_up(&t.p, "disk").await;
        wait_dr_settled(&t.d, "disk").await;
        assert!(!volume(&t.p, "disk").await.stream.unwrap().degraded);
        c.flush().unwrap();
        c.disconnect();
        wait_dr_settled(&t.d, "disk").await;
        assert_same_bytes(&img, &replica_path(&t.d, "disk"));
    }
}

/// A pair whose primary journals 1 MiB at most: a few writes while the DR
/// site is away fill it.
async fn pair_with_a_small_journal() -> TestPair {
    let mut t = test_pair(false).await;
    t.pd.kill9();
    set_limits(&t.p, |l| {
        l.journal_bytes_max = ferry::units::ByteSize(1 << 20)
    });
    t.pd = start(&t.p).await;
    wait_link(&t.p).await;
    t
}

#[tokio::test(flavor = "multi_thread")]
async fn a_link_cut_longer_than_the_journal_falls_back_to_a_resync() {
    let mut t = pair_with_a_small_journal().await;
    let img = t.tmp.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(SIZE).unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    wait_seeded(&t.p, &t.d, "disk").await;

    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    c.write(0, &vec![0x11; 256 << 10]).unwrap();
    c.flush().unwrap();
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    let before_cut = create_point(&t.p, "disk").await;
    let state_before = file_hash(&img);

    t.dd.kill9();
    for i in 0..12u64 {
        c.write((i + 1) << 19, &vec![i as u8 + 0x20; 512 << 10])
            .unwrap();
    }
    c.flush().unwrap();
    let s = volume(&t.p, "disk").await.stream.unwrap();
    assert!(s.resync_needed, "{s:?}");
    assert!(s.resync_reason.contains("journal filled up"), "{s:?}");
    assert_eq!(s.journal_bytes, 0, "the journal was dropped, not grown");
    c.disconnect();

    // While the DR copy cannot be streamed to, its last point restores the
    // state from before the cut.
    t.pd.kill9();
    t.dd = start(&t.d).await;
    let out = t.tmp.path().join("point.img");
    let r = restore(&t.d, "disk", None, &out).await;
    assert_eq!(r.point.id, before_cut.id);
    assert_eq!(file_hash(&out), state_before);

    // The link returns: a tree comparison brings the DR copy level.
    t.pd = start(&t.p).await;
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    assert_same_bytes(&img, &replica_path(&t.d, "disk"));
    let st = progress(&t.p, "disk").await;
    let report = st.state.last_report.expect("resync report");
    // 96 chunks changed, 8 alike per write: 12 travel, the rest are dedup hits.
    assert_eq!(report.chunks_sent(), 12, "{report:?}");
    assert!(report.chunks_deduped >= 84, "{report:?}");
}

/// Cuts the DR site off while 12 writes of 512 KiB from `at` (of bytes
/// from `byte` up) fill the primary's 1 MiB journal, brings it back, and
/// returns the report of the resync that brought its copy level.
async fn resync_after_a_cut(t: &mut TestPair, img: &Path, at: u64, byte: u8) -> PassReport {
    let before = progress(&t.p, "disk").await.state.finished;
    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    t.dd.kill9();
    for i in 0..12u8 {
        c.write(at + (u64::from(i) << 19), &vec![byte + i; 512 << 10])
            .unwrap();
    }
    c.flush().unwrap();
    c.disconnect();
    let s = volume(&t.p, "disk").await.stream.unwrap();
    assert!(s.resync_needed, "{s:?}");
    assert!(s.resync_reason.contains("journal filled up"), "{s:?}");
    t.dd = start(&t.d).await;
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    assert_same_bytes(img, &replica_path(&t.d, "disk"));
    let st = progress(&t.p, "disk").await.state;
    assert!(st.finished > before, "no resync ran: {st:?}");
    let r = st.last_report.expect("resync report");
    // The names it committed are the image's, whatever it read.
    let (full, _) = ferry::volume::image::scan(img, 64 << 10, &AtomicU64::new(0)).unwrap();
    assert_eq!(r.root, full.root, "{r:?}");
    r
}

/// The report of the seed of "disk", once it is over.
async fn seed_report(t: &TestPair) -> PassReport {
    wait_seeded(&t.p, &t.d, "disk").await;
    progress(&t.p, "disk")
        .await
        .state
        .last_report
        .expect("seed report")
}

/// A resync after the journal filled reads only the chunks written since
/// the last scan began (the seed's, then the last resync's), not the whole
/// image, and brings the DR copy level all the same, with writes landing
/// while the seed runs and while the DR site is away; a clean stop of the
/// primary keeps the map for its restart. A primary that was killed, or
/// whose image was written while it was down, and an operator's `ferry
/// sync`, read the whole image again: nothing then says what changed.
#[tokio::test(flavor = "multi_thread")]
async fn a_resync_reads_only_the_chunks_written_since_the_last_scan() {
    const CS: u64 = 64 << 10;
    let mut t = pair_with_a_small_journal().await;
    let img = t.tmp.path().join("disk.img");
    ferry::cli::demo::make_mixed_image(&img, 32 << 20, 11).unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    // Written the moment it is added, while its seed runs.
    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    c.write(0, &vec![0x5a; 256 << 10]).unwrap();
    c.flush().unwrap();
    c.disconnect();
    let seed = seed_report(&t).await;
    assert!(seed.bytes_read > 8 << 20, "{seed:?}");

    // 96 chunks written while the DR site is away, and perhaps the 4 of the
    // first write (if it came after the seed's scan began); less if an
    // attempt of the resync scanned and was then superseded (its map
    // carries on). The names and bytes are checked in full either way.
    let r = resync_after_a_cut(&mut t, &img, 8 << 20, 0x30).await;
    assert!(
        r.bytes_read <= 100 * CS,
        "read {} bytes: {r:?}",
        r.bytes_read
    );
    // Only what was written since that resync's scan began: 96 chunks,
    // and 2 zeroed through the export (which may punch them to a hole).
    run(Command::new("qemu-io")
        .args(["-f", "raw", &nbd_uri(&t.p, "disk")])
        .args(["-c", "write -z 9M 128k"]));
    let r = resync_after_a_cut(&mut t, &img, 20 << 20, 0x50).await;
    assert!(
        r.bytes_read <= 98 * CS,
        "read {} bytes: {r:?}",
        r.bytes_read
    );

    // A clean stop keeps the map: the resync after the restart reads the
    // 4 chunks written before the stop and the 96 after, not the image.
    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    c.write(28 << 20, &vec![0x44; 256 << 10]).unwrap();
    c.flush().unwrap();
    c.disconnect();
    wait_caught_up(&t.p, "disk").await;
    assert!(t.pd.stop(), "the primary did not stop on SIGTERM");
    assert!(t.p.join("journal/disk/scan.map").exists(), "no map kept");
    t.pd = start(&t.p).await;
    wait_caught_up(&t.p, "disk").await;
    assert!(
        !t.p.join("journal/disk/scan.map").exists(),
        "the map was not taken back"
    );
    let s = volume(&t.p, "disk").await.stream.unwrap();
    assert!(
        s.resync_scan_chunks.is_some_and(|n| (4..=8).contains(&n)) && s.chunks == 512,
        "{s:?}"
    );
    let r = resync_after_a_cut(&mut t, &img, 14 << 20, 0x60).await;
    assert!(
        r.bytes_read <= 100 * CS,
        "read {} bytes: {r:?}",
        r.bytes_read
    );
    // Not when the image was written behind the daemon's back while it was
    // down: the map does not hold that write, so the resync reads all (and
    // the DR copy gets the write).
    assert!(t.pd.stop(), "the primary did not stop on SIGTERM");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&[0xee; 4096], 25 << 20).unwrap();
    }
    t.pd = start(&t.p).await;
    wait_caught_up(&t.p, "disk").await;
    let r = resync_after_a_cut(&mut t, &img, 2 << 20, 0x70).await;
    assert!(r.bytes_read >= seed.bytes_read, "{r:?} after {seed:?}");
    // Nor after a crash: a killed primary keeps no map.
    t.pd.kill9();
    t.pd = start(&t.p).await;
    wait_caught_up(&t.p, "disk").await;
    let s = volume(&t.p, "disk").await.stream.unwrap();
    assert_eq!(s.resync_scan_chunks, None, "{s:?}");
    let r = resync_after_a_cut(&mut t, &img, 4 << 20, 0x80).await;
    assert!(r.bytes_read >= seed.bytes_read, "{r:?} after {seed:?}");
    // Nor does an operator's `ferry sync`, after a write since.
    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    c.write(30 << 20, &vec![0x99; 64 << 10]).unwrap();
    c.flush().unwrap();
    c.disconnect();
    let r = sync(&t.p, "disk").await.unwrap();
    assert!(r.bytes_read >= seed.bytes_read, "{r:?} after {seed:?}");
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    assert_same_bytes(&img, &replica_path(&t.d, "disk"));
}

/// An operator's `ferry sync` while a resync runs gets a resync of its own
/// after that one, reading the whole image; `ferry sync --wait` waited for
/// a pass that never started.
#[tokio::test(flavor = "multi_thread")]
async fn ferry_sync_during_a_resync_gets_a_whole_resync_after_it() {
    let mut t = pair_with_a_small_journal().await;
    let img = t.tmp.path().join("disk.img");
    ferry::cli::demo::make_mixed_image(&img, 32 << 20, 12).unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    let seed = seed_report(&t).await;
    // 2 MiB of random data while the DR site is away: the journal fills.
    t.dd.kill9();
    let mut rng = Rng(31);
    let data: Vec<u8> = (0..2 << 20).map(|_| rng.next_u64() as u8).collect();
    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    c.write(4 << 20, &data).unwrap();
    c.flush().unwrap();
    c.disconnect();
    assert!(volume(&t.p, "disk").await.stream.unwrap().resync_needed);
    // A slow link keeps the resync running (some 8 s) while the operator asks.
    let primary = t.p.clone();
    let limit = |bytes_per_s: u64| {
        let primary = primary.clone();
        async move {
            let _: ferry::daemon::api::LinkLimitRequest = ferry::cli::Client::new(&primary)
                .post(
                    "/link/limit",
                    &ferry::daemon::api::LinkLimitRequest { bytes_per_s },
                )
                .await
                .unwrap();
        }
    };
    limit(256 << 10).await;
    t.dd = start(&t.d).await;
    let t0 = Instant::now();
    while !volume(&t.p, "disk").await.stream.unwrap().resync_running {
        assert!(t0.elapsed() < Duration::from_secs(30), "no resync ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r: ferry::daemon::api::SyncResponse = ferry::cli::Client::new(&t.p)
        .post("/volumes/disk/sync", &())
        .await
        .unwrap();
    let s = volume(&t.p, "disk").await.stream.unwrap();
    assert!(
        s.resync_running,
        "the resync ended before the request: {s:?}"
    );
    limit(0).await;
    let t0 = Instant::now();
    let st = loop {
        let v = progress(&t.p, "disk").await;
        if v.state.finished >= r.wait_for {
            break v.state;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no pass ended for the request: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(st.last_error, None, "{st:?}");
    let rep = st.last_report.expect("report");
    assert!(rep.bytes_read >= seed.bytes_read, "{rep:?} after {seed:?}");
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    assert_same_bytes(&img, &replica_path(&t.d, "disk"));
}

/// A primary whose journal lost its numbering (a crash in the window where a
/// trim had deleted the old segments before it created the new one) starts
/// again at record 1. The DR side expects record N+1 of the old numbering:
/// the stream handshake must see that these are other records and resync,
/// never stream from the middle (which would skip records 1..N of the new
/// numbering and acknowledge flushes that cover them).
#[tokio::test(flavor = "multi_thread")]
async fn a_journal_that_restarted_its_numbering_is_resynced_not_streamed_from_the_middle() {
    let (mut t, img) = continuous_pair(Mode::Async, SyncFallback::Fail).await;
    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    for i in 0..60u64 {
        c.write(i * 4096, &[i as u8 + 1; 4096]).unwrap();
        c.flush().unwrap();
    }
    c.disconnect();
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    let dr_next = volume(&t.d, "disk").await.redo.unwrap().received_seq + 1;
    assert!(dr_next > 100, "the DR side expects record {dr_next}");

    // Both sites stop; the primary's journal directory comes back empty.
    t.dd.kill9();
    t.pd.kill9();
    std::fs::remove_dir_all(t.p.join("journal").join("disk")).unwrap();
    t.pd = start(&t.p).await;
    // Writes before the DR site is back: more records than the DR side holds,
    // so that its "next record" is inside the new numbering.
    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    for i in 0..dr_next {
        c.write(
            (i % 512) * 4096 + 2 * (1 << 20),
            &[(i % 250) as u8 + 2; 4096],
        )
        .unwrap();
        if i % 3 == 2 {
            c.flush().unwrap();
        }
    }
    c.flush().unwrap();
    c.disconnect();
    let s = volume(&t.p, "disk").await.stream.unwrap();
    assert!(
        s.next_seq > dr_next,
        "the new numbering passed the DR side's: {s:?}"
    );
    t.dd = start(&t.d).await;
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    assert_same_bytes(&img, &replica_path(&t.d, "disk"));
}

/// Starts the (stopped) primary again under the fault seam, with `env` on
/// top; returns its (empty) faults file and its log, once it has a link.
async fn restart_primary_with_faults(t: &mut TestPair, env: &[(&str, &str)]) -> (PathBuf, PathBuf) {
    let (d, faults, log) = start_with_faults(&t.p, env).await;
    t.pd = d;
    (faults, log)
}

/// The same for the DR site.
async fn restart_dr_with_faults(t: &mut TestPair, env: &[(&str, &str)]) -> (PathBuf, PathBuf) {
    let (d, faults, log) = start_with_faults(&t.d, env).await;
    t.dd = d;
    (faults, log)
}

/// Writes the fault seam's rules and waits until the daemon logging to
/// `log` has read them.
fn set_fault_rule(faults: &Path, log: &Path, rule: &str) {
    let read = || {
        std::fs::read_to_string(log)
            .unwrap()
            .matches("fsio: rules now")
            .count()
    };
    let before = read();
    std::fs::write(faults, rule).unwrap();
    let t0 = Instant::now();
    while read() == before {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the rule was not read"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn start_with_faults(dir: &Path, env: &[(&str, &str)]) -> (Daemon, PathBuf, PathBuf) {
    let faults = dir.with_extension("faults");
    std::fs::write(&faults, "").unwrap();
    let log = dir.with_extension("log");
    let mut vars = vec![("FERRY_FAULTS_FILE", faults.to_str().unwrap())];
    vars.extend_from_slice(env);
    let mut d = Daemon::start_with_env(&exe(), dir, &log, &vars).unwrap();
    d.ready().await.unwrap();
    wait_link(dir).await;
    (d, faults, log)
}

/// The primary's image cannot be fsynced. A flush still holds (the journal
/// has its writes and keeps every record since the last good fsync); once
/// the journal is full, writes fail instead of a fallback dropping those
/// records, and flushes fail; once the disk works, the next flush writes
/// them again and the DR site ends equal. A failure whose records are gone
/// (the journal lost while the daemon was down) blocks flushes across
/// restarts until the operator clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_image_fsync_keeps_the_journal_and_blocks_flushes_until_repaired() {
    let mut t = test_pair(false).await;
    t.pd.kill9();
    set_limits(&t.p, |l| {
        l.journal_bytes_max = ferry::units::ByteSize(2 << 20)
    });
    let (faults, log) = restart_primary_with_faults(&mut t, &[]).await;
    let img = t.tmp.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 16 << 20]).unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    wait_seeded(&t.p, &t.d, "disk").await;
    // The image's fsyncs fail from now on (the watcher reads the file every 10 ms).
    let set_rule = |rule: &str| set_fault_rule(&faults, &log, rule);

    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    c.write(0, &[1u8; 4096]).unwrap();
    c.flush().expect("a flush before the fault");
    set_rule("fail sync disk.img\n");
    c.write(4096, &[2u8; 4096]).unwrap();
    c.flush()
        .expect("a flush that the journal makes durable holds");
    // 3 MiB without a flush would fill the 2 MiB journal: it keeps its
    // records (the image cannot be fsynced) and refuses the writes.
    let refused = (0..48u64).find(|i| c.write((1 << 20) + i * 65536, &[3u8; 65536]).is_err());
    assert!(refused.is_some(), "no write was refused");
    let s = volume(&t.p, "disk").await.stream.unwrap();
    assert!(!s.resync_needed && s.io_error.is_some(), "{s:?}");
    assert!(
        c.flush().is_err(),
        "a flush while the image cannot be fsynced fails"
    );
    // So does an operator's `ferry sync`, at once (no resync can begin).
    let e = sync(&t.p, "disk").await.unwrap_err();
    assert!(e.contains("cannot be fsynced"), "{e}");

    // The disk works again: the next flush writes the records again.
    set_rule("");
    c.flush().expect("the flush after the disk recovered");
    assert!(
        volume(&t.p, "disk")
            .await
            .stream
            .unwrap()
            .io_error
            .is_none()
    );
    wait_caught_up(&t.p, "disk").await;
    c.write(8192, &[4u8; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    let got = std::fs::read(&img).unwrap();
    assert!(
        got[4096..8192].iter().all(|&b| b == 2),
        "the acknowledged write"
    );
    assert_same_bytes(&img, &replica_path(&t.d, "disk"));

    // A failure whose records are gone: a checkpoint fails (a quarter of
    // the journal waits for it), the daemon dies and its journal is lost.
    set_rule("fail sync disk.img\n");
    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    for i in 0..12u64 {
        c.write((8 << 20) + i * 65536, &[5u8; 65536]).unwrap();
    }
    let t0 = Instant::now();
    while volume(&t.p, "disk")
        .await
        .stream
        .unwrap()
        .io_error
        .is_none()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no checkpoint failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(c);
    t.pd.kill9();
    std::fs::remove_dir_all(t.p.join("journal").join("disk")).unwrap();
    t.pd = start(&t.p).await;
    wait_link(&t.p).await;
    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    c.write(8192, &[6u8; 4096]).unwrap();
    assert!(c.flush().is_err(), "refused after the restart");
    let v = volume(&t.p, "disk").await;
    assert!(
        v.stream
            .as_ref()
            .and_then(|s| s.io_error.clone())
            .is_some_and(|e| e.contains("clear-error")),
        "{:?}",
        v.stream
    );
    let out = ferry(&t.p, &["volume", "clear-error", "disk"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.flush()
        .expect("flushes work once the operator cleared the failure");
    let audit = std::fs::read_to_string(t.p.join("audit.log")).unwrap_or_default();
    assert!(
        audit.contains("volume clear-error"),
        "the clearing is audited"
    );
}

/// An async volume whose flushed writes are in its journal only: the
/// primary loses power with the DR site down (so no checkpoint fsynced the
/// image since the seed), after two flushes with writes on both sides of
/// the first (some overwritten) and unflushed writes after the second.
struct PowerCut {
    img: PathBuf,
    log: PathBuf,
    /// What the image held at the second flush.
    acked: Vec<u8>,
}

/// The 4 KiB blocks the unflushed writes of [`power_cut_after_flushes`] hit.
const UNFLUSHED_BLOCKS: std::ops::Range<usize> = 1024..1032;

async fn power_cut_after_flushes(t: &mut TestPair) -> PowerCut {
    t.pd.kill9();
    let (faults, log) = restart_primary_with_faults(t, &[("FERRY_POWERLOSS", "1")]).await;
    let img = t.tmp.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 8 << 20]).unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    wait_seeded(&t.p, &t.d, "disk").await;
    t.dd.kill9();

    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    let mut expect = vec![0u8; 8 << 20];
    let mut put = |c: &mut NbdClient, off: usize, byte: u8| {
        c.write(off as u64, &[byte; 4096]).unwrap();
        expect[off..off + 4096].fill(byte);
    };
    for i in 0..64usize {
        put(&mut c, (i * 37 % 2048) * 4096, i as u8 + 1);
    }
    c.flush().expect("the first flush");
    for i in 0..64usize {
        put(&mut c, (i * 53 % 2048) * 4096, i as u8 + 101);
    }
    c.flush().expect("the second flush");
    let acked = expect.clone();
    for b in UNFLUSHED_BLOCKS {
        c.write((b * 4096) as u64, &[0xEE; 4096]).unwrap();
    }

    std::fs::write(&faults, "powerloss seed=7\n").unwrap();
    assert!(
        t.pd.wait_exit(Duration::from_secs(10)),
        "no power cut within 10 s"
    );
    drop(c);
    let cut = std::fs::read_to_string(&log).unwrap();
    assert!(cut.contains("fsio: power cut"), "{cut}");
    PowerCut { img, log, acked }
}

/// The image holds every write acknowledged by a flush; an unflushed one
/// is there whole or not at all.
fn assert_holds_acked(img: &Path, acked: &[u8]) {
    let got = std::fs::read(img).unwrap();
    for (i, (a, b)) in got.chunks(4096).zip(acked.chunks(4096)).enumerate() {
        if UNFLUSHED_BLOCKS.contains(&i) {
            assert!(
                a == b || a == [0xEE; 4096],
                "an unflushed write in block {i} came back torn"
            );
        } else {
            assert!(a == b, "block {i}: an acknowledged write was lost");
        }
    }
}

/// The restart said it replayed the journal, and the image holds every
/// acknowledged write.
fn assert_replayed_and_holds_acked(cut: &PowerCut) {
    let log = std::fs::read_to_string(&cut.log).unwrap();
    assert!(
        log.contains("journal replayed onto the image"),
        "the journal was not replayed: {log}"
    );
    assert_holds_acked(&cut.img, &cut.acked);
}

/// Waits until the volume's stream is open at `dir` (its journal replayed).
async fn wait_stream_open(dir: &Path, within: Duration) {
    let t0 = Instant::now();
    while volume(dir, "disk").await.stream.is_none() {
        assert!(t0.elapsed() < within, "the volume's stream did not open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A flush makes an async volume's writes durable in its journal, not in
/// the image (the image is fsynced as a checkpoint): after a power cut of
/// the primary, the restart must replay each acknowledged write from the
/// journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_writes_survive_a_power_cut_of_the_primary_by_the_journal_alone() {
    let mut t = test_pair(false).await;
    let cut = power_cut_after_flushes(&mut t).await;
    t.pd = start(&t.p).await;
    wait_stream_open(&t.p, Duration::from_secs(30)).await;
    assert_replayed_and_holds_acked(&cut);
}

/// After the power cut, the primary restarts without its image (its disk
/// not mounted yet), so the journal cannot be replayed. The operator's
/// first moves must not drop it: a removal is refused while it holds
/// records the image may lack, and a forced failover (which marks the
/// volume for a resync) does not make the later open drop them. Once the
/// image is back, the journal is replayed, and a removal then leaves the
/// image holding every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_not_yet_replayed_survives_a_removal_and_a_forced_failover() {
    let mut t = test_pair(false).await;
    let cut = power_cut_after_flushes(&mut t).await;
    let away = cut.img.with_extension("away");
    std::fs::rename(&cut.img, &away).unwrap();
    t.pd = start(&t.p).await;
    assert!(volume(&t.p, "disk").await.stream.is_none());

    let out = ferry(&t.p, &["volume", "remove", "disk"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the removal went through: {err}");
    assert!(err.contains("holds writes"), "{err}");
    assert!(t.p.join("journal").join("disk").exists());

    let out = ferry(&t.p, &["failover", "disk", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(volume(&t.p, "disk").await.stream.is_none());

    std::fs::rename(&away, &cut.img).unwrap();
    // The stream job tries again after its backoff (1, 2, 4... s).
    wait_stream_open(&t.p, Duration::from_secs(60)).await;
    assert_replayed_and_holds_acked(&cut);

    let out = ferry(&t.p, &["volume", "remove", "disk"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_holds_acked(&cut.img, &cut.acked);
}

/// A seeded async volume "disk" (8 MiB, at `img`) whose DR daemon runs
/// under the fault seam with power cuts armed (its faults file and log
/// returned) and takes scheduled points an hour apart.
async fn seeded_with_dr_power_cuts() -> (TestPair, PathBuf, PathBuf, PathBuf) {
    let mut t = test_pair(false).await;
    t.dd.kill9();
    set_config(&t.d, |c| {
        c.point_interval = ferry::units::Dur(Duration::from_secs(3600))
    });
    let (faults, log) = restart_dr_with_faults(&mut t, &[("FERRY_POWERLOSS", "1")]).await;
    let img = t.tmp.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 8 << 20]).unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    wait_seeded(&t.p, &t.d, "disk").await;
    (t, img, faults, log)
}

/// The DR side fsyncs its replica image at each recovery point, not after
/// each applied flush epoch: the redo log holds every record since the last
/// point durably. A power cut of the DR host loses the image writes since
/// that point (here, every write since the seed: points are an hour
/// apart), and the restart must write those records again; the replica
/// then equals the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dr_power_cut_writes_the_records_since_the_last_point_again() {
    let (mut t, img, faults, log) = seeded_with_dr_power_cuts().await;
    let point = volume(&t.d, "disk").await.last_point.map(|p| p.id);

    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    let mut rng = Rng(11);
    for round in 0..4u8 {
        for _ in 0..32 {
            let block = rng.next_u64() % 2048;
            c.write(block * 4096, &[round + 1; 4096]).unwrap();
        }
        c.flush().unwrap();
    }
    drop(c);
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    let replica = replica_path(&t.d, "disk");
    assert_same_bytes(&img, &replica);
    assert_eq!(
        volume(&t.d, "disk").await.last_point.map(|p| p.id),
        point,
        "a point was taken (and fsynced the image) after the writes"
    );

    std::fs::write(&faults, "powerloss seed=3\n").unwrap();
    assert!(
        t.dd.wait_exit(Duration::from_secs(10)),
        "no power cut within 10 s"
    );
    assert_ne!(
        file_hash(&replica),
        file_hash(&img),
        "the power cut lost no write of the replica image: this test would check nothing"
    );
    t.dd = start(&t.d).await;
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    let after = std::fs::read_to_string(&log).unwrap();
    assert!(
        after.contains("the records since its last point are written again"),
        "{after}"
    );
    assert_same_bytes(&img, &replica);
}

/// A failed fsync of the replica image (at a point: applies do not fsync)
/// leaves its writes undurable for good, as Linux marks the pages clean: the
/// point must not go on to trust them on a retry, but write every record
/// since the last point again first. Blocks written once before the failure
/// and never again, then a power cut of the DR host: the replica equals the
/// primary after its restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_replica_fsync_writes_the_records_since_the_last_point_again() {
    let (mut t, img, faults, log) = seeded_with_dr_power_cuts().await;

    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    for i in 0..64u64 {
        c.write(i * 65536, &[i as u8 + 1; 4096]).unwrap();
    }
    c.flush().unwrap();
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;

    set_fault_rule(&faults, &log, "fail sync /replicas/ times=1\n");
    let failed: Result<ferry::store::state::RecoveryPoint, _> = ferry::cli::Client::new(&t.d)
        .post("/volumes/disk/points", &())
        .await;
    assert!(
        failed.is_err(),
        "the point's fsync did not fail: {failed:?}"
    );
    set_fault_rule(&faults, &log, "");
    // Other blocks from here: the ones above are never written again.
    for i in 0..8u64 {
        c.write((4 << 20) + i * 4096, &[0xAB; 4096]).unwrap();
    }
    c.flush().unwrap();
    drop(c);
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    let p = create_point(&t.d, "disk").await;
    assert!(p.seq.is_some());

    std::fs::write(&faults, "powerloss seed=5\n").unwrap();
    assert!(
        t.dd.wait_exit(Duration::from_secs(10)),
        "no power cut within 10 s"
    );
    t.dd = start(&t.d).await;
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    assert_same_bytes(&img, &replica_path(&t.d, "disk"));
}

/// A journal damaged while the daemon was down (a flipped byte; the host
/// kept running, so its page cache kept the image's writes): its records
/// from the damage on are cut at the restart. Replaying the rest would
/// take back the newer writes the image holds (here the block's second
/// acknowledged write, whose record is the damaged one), and the DR side
/// may lack them: the image is kept as it is and the DR copy is resynced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_journal_is_not_replayed_over_newer_writes_and_the_dr_copy_is_resynced() {
    let (mut t, img) = continuous_pair(Mode::Async, SyncFallback::Fail).await;
    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    c.write(0, &[0x11; 4096]).unwrap();
    c.flush().unwrap();
    c.write(0, &[0x22; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);
    t.pd.kill9();

    // Flip a byte of the second write's record.
    let mut hit = 0;
    for e in std::fs::read_dir(t.p.join("journal").join("disk")).unwrap() {
        let path = e.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        if let Some(at) = bytes.windows(4096).position(|w| w == [0x22; 4096]) {
            bytes[at + 2048] ^= 0xFF;
            std::fs::write(&path, &bytes).unwrap();
            hit += 1;
        }
    }
    assert_eq!(hit, 1, "the second write's record is not in the journal");

    t.pd = start(&t.p).await;
    wait_stream_open(&t.p, Duration::from_secs(30)).await;
    let log = std::fs::read_to_string(t.p.with_extension("log")).unwrap();
    assert!(log.contains("the journal was damaged"), "{log}");
    let got = std::fs::read(&img).unwrap();
    assert!(
        got[..4096] == [0x22; 4096],
        "the acknowledged second write was taken back by the replay"
    );
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    assert_same_bytes(&img, &replica_path(&t.d, "disk"));
}

/// A client that writes several journals' worth without ever flushing (a
/// bulk copy with no sync, fio's default) at a rate the link carries: the
/// primary's own flush records let the DR side apply and trim its redo
/// log, so that neither journal fills and no resync happens; the replica
/// follows, and equals the primary once the client flushes.
#[tokio::test(flavor = "multi_thread")]
async fn writes_without_flushes_beyond_the_journals_stream_without_a_resync() {
    const VOL: u64 = 16 << 20;
    let mut t = test_pair(true).await;
    t.pd.kill9();
    t.dd.kill9();
    for dir in [&t.p, &t.d] {
        set_limits(dir, |l| {
            l.journal_bytes_max = ferry::units::ByteSize(4 << 20)
        });
    }
    t.dd = start(&t.d).await;
    t.pd = start(&t.p).await;
    wait_link(&t.p).await;
    let img = t.tmp.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(VOL).unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    wait_seeded(&t.p, &t.d, "disk").await;
    let applied_before = volume(&t.d, "disk").await.redo.unwrap().applied_seq;

    // 24 MiB (six journals) in 64 KiB writes, about 10 MB/s, no flush.
    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    let mut rng = Rng(5);
    for i in 0..384u64 {
        let off = (rng.next_u64() % (VOL / 65536)) * 65536;
        let data: Vec<u8> = (0..65536).map(|_| rng.next_u64() as u8).collect();
        c.write(off, &data).unwrap();
        if i % 16 == 15 {
            // Pacing, not waiting for anything: the scenario is a client
            // writing at a rate the link carries.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let s = volume(&t.p, "disk").await.stream.unwrap();
    assert!(!s.resync_needed && !s.resync_running, "{s:?}");
    let log = std::fs::read_to_string(t.p.with_extension("log")).unwrap();
    assert!(!log.contains("filled up"), "a journal filled: {s:?}");
    let redo = volume(&t.d, "disk").await.redo.unwrap();
    assert!(
        redo.applied_seq > applied_before,
        "the DR side applied nothing without a client flush: {redo:?}"
    );
    let m = http_get(&metrics_addr(&t.p), "/metrics");
    let checkpoints = sample(&m, r#"ferry_journal_checkpoints_total{volume="disk"}"#).unwrap();
    assert!(checkpoints >= 40.0, "{checkpoints} checkpoints for 24 MiB");

    c.flush().unwrap();
    c.disconnect();
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    assert!(!volume(&t.p, "disk").await.stream.unwrap().resync_needed);
    assert_same_bytes(&img, &replica_path(&t.d, "disk"));
}
