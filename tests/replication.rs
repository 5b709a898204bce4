//! Snapshot replication between two real daemons on loopback.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use ferry::cli::demo::{make_mixed_image, scatter_writes};
use ferry::hash::{Hash, is_all_zero};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_matches_source_and_one_percent_change_sends_only_changed_blocks() {
    let pair = test_pair(false).await;
    let (tmp, p, d) = (&pair.tmp, pair.p.clone(), pair.d.clone());

    let img = tmp.path().join("disk.img");
    let size = 256 * MIB;
    make_mixed_image(&img, size, 1).unwrap();
    add_volume(&p, "disk", &img).await;

    let seed = first_pass(&p, "disk").await.unwrap();
    assert_same_bytes(&img, &replica_path(&d, "disk"));
    assert!(
        seed.chunks_zero > 0 && seed.chunks_deduped > 0,
        "the image has zero and repeated chunks: {seed:?}"
    );
    assert!(
        seed.wire_bytes < size,
        "seeding sent {} bytes on the wire for a {size}-byte image",
        seed.wire_bytes
    );
    assert!(seed.point.is_some());

    // 1% of the 4 KiB blocks, rewritten with random data.
    let offs = scatter_writes(&img, size / 4096 / 100, 99).unwrap();
    let blocks: HashSet<u64> = offs.iter().copied().collect();
    let chunks: HashSet<u64> = offs.iter().map(|o| o / 65536).collect();
    let changed_bytes = blocks.len() as u64 * 4096;
    let inc = sync(&p, "disk").await.unwrap();
    assert_same_bytes(&img, &replica_path(&d, "disk"));
    assert_eq!(
        inc.chunks_sent(),
        chunks.len() as u64,
        "exactly the changed chunks travel: {inc:?}"
    );
    assert!(
        inc.chunks_sent_delta > 0,
        "changed chunks with a base at DR go as deltas"
    );
    let ratio = inc.wire_bytes as f64 / changed_bytes as f64;
    eprintln!("seed: {seed:?}\n1% pass: {inc:?}\nwire/changed {ratio:.2}");
    assert!(
        ratio <= 1.5,
        "a 1% pass sent {} wire bytes for {changed_bytes} changed bytes ({ratio:.2}x)",
        inc.wire_bytes
    );

    // Nothing changed: nothing travels but the root question.
    let idle = sync(&p, "disk").await.unwrap();
    assert_eq!(idle.chunks_sent(), 0);
    assert!(
        idle.bytes_sent < 4096,
        "an unchanged volume costs a few hundred bytes, not {}",
        idle.bytes_sent
    );

    let out = ferry(&p, &["verify", "disk"]);
    assert!(
        out.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = ferry(&p, &["points", "disk", "--json"]);
    let pts: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        pts.len(),
        2,
        "one point per pass that changed the replica (an unchanged pass reuses the last)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_lists_the_ranges_where_the_replica_differs() {
    let pair = test_pair(false).await;
    let (tmp, p, d) = (&pair.tmp, pair.p.clone(), pair.d.clone());
    let img = tmp.path().join("disk.img");
    make_mixed_image(&img, 16 * MIB, 3).unwrap();
    add_volume(&p, "disk", &img).await;
    first_pass(&p, "disk").await.unwrap();
    let out = ferry(&p, &["verify", "disk"]);
    assert_eq!(out.status.code(), Some(0));

    // Damage the replica behind ferry's back: verify must say where.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(replica_path(&d, "disk"))
            .unwrap();
        f.write_all_at(b"rot", 5 * 65536 + 100).unwrap();
    }
    let out = ferry(&p, &["verify", "disk", "--json"]);
    assert_eq!(out.status.code(), Some(3), "differences exit 3");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["differing"], serde_json::json!([[5 * 65536, 6 * 65536]]));
    // --repair rewrites that chunk from the DR store's copy, then compares again.
    let out = ferry(&p, &["verify", "disk", "--repair", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["repaired"], 1);
    assert_same_bytes(&img, &replica_path(&d, "disk"));
}

/// Chunks a clean seed sends: distinct non-zero chunks.
fn distinct_chunks(img: &std::path::Path) -> u64 {
    let data = std::fs::read(img).unwrap();
    data.chunks(65536)
        .filter(|c| !is_all_zero(c))
        .map(Hash::of_chunk)
        .collect::<HashSet<_>>()
        .len() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dr_kill_during_seed_resumes_without_resending_stored_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let (p, d) = (tmp.path().join("primary"), tmp.path().join("dr"));
    init(&p, "primary");
    init(&d, "dr");
    // A small window makes "chunks in flight at the kill" a tight bound.
    set_limits(&p, |l| {
        l.inflight_bytes_max = ferry::units::ByteSize(4 * MIB);
        l.batch_bytes_max = ferry::units::ByteSize(MIB);
        l.streams_max = 4;
    });
    let _pd = start(&p).await;
    let mut dd = start(&d).await;
    pair(&p, &d, "10m").await;

    // Incompressible, so that a chunk record is a chunk's size and the
    // records the DR store had not flushed at the kill (they skip its log)
    // are a known number of chunks.
    let img = tmp.path().join("disk.img");
    let mut rng = ferry::cli::demo::Rng(5);
    let bytes: Vec<u8> = (0..320 * MIB).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(&img, bytes).unwrap();
    let clean = distinct_chunks(&img);
    add_volume(&p, "disk", &img).await;
    // The scheduler's first pass starts at once; kill the DR daemon part
    // way through it, past what its store may hold unflushed.
    let mut killed_at = 0;
    for _ in 0..4000 {
        let v = progress(&p, "disk").await;
        if v.phase == "sending" && v.to_send > 0 && v.sent * 10 >= v.to_send * 6 {
            dd.kill9();
            killed_at = v.chunks_sent_total;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(killed_at > 0, "the kill happened during the seed");
    drop(dd);
    let _dd = start(&d).await;
    wait_link(&p).await;
    let mut report = None;
    for _ in 0..5 {
        match sync(&p, "disk").await {
            Ok(r) => {
                report = Some(r);
                break;
            }
            Err(e) => eprintln!("pass after restart: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let report = report.expect("a pass completes after the DR restart");
    assert_same_bytes(&img, &replica_path(&d, "disk"));
    let total = progress(&p, "disk").await.chunks_sent_total;
    // In flight at the kill: at most one batch per stream plus the one counted
    // before its stream opened; a batch closes at 1 MiB, 16 chunks of 64 KiB.
    let inflight_max = (4 + 1) * 16;
    // Stored but not yet flushed: two memtables of 64 KiB records.
    let unflushed_max = 2 * ferry::store::CHUNKS_WRITE_BUFFER_BYTES / (64 * 1024);
    eprintln!(
        "clean seed {clean} chunks; {killed_at} counted at the kill; {total} sent in all; the resumed pass sent {}",
        report.chunks_sent()
    );
    assert!(
        killed_at > inflight_max + unflushed_max,
        "the kill came after {killed_at} chunks, not past what may be lost"
    );
    assert!(
        report.chunks_deduped > 0,
        "the resumed pass found chunks stored before the kill"
    );
    assert!(
        total <= clean + inflight_max + unflushed_max,
        "sent {total} chunks in all; a clean seed sends {clean}; in flight at most \
         {inflight_max}, not yet flushed at most {unflushed_max}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_old_points_and_gc_keeps_what_the_newest_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let (p, d) = (tmp.path().join("primary"), tmp.path().join("dr"));
    init(&p, "primary");
    init_with_metrics(&d, "dr");
    // Keep only the newest point.
    let mut cfg = ferry::config::Config::load(&d).unwrap();
    let zero = ferry::units::Dur(Duration::ZERO);
    cfg.retention = ferry::store::gc::Retention {
        all: zero,
        hourly: zero,
        daily: zero,
        clock_settle: zero,
    };
    cfg.save(&d).unwrap();
    let _pd = start(&p).await;
    let _dd = start(&d).await;
    pair(&p, &d, "10m").await;

    let img = tmp.path().join("disk.img");
    make_mixed_image(&img, 32 * MIB, 21).unwrap();
    let original = std::fs::read(&img).unwrap();
    add_volume(&p, "disk", &img).await;
    first_pass(&p, "disk").await.unwrap();
    // Points are timed in seconds: let the first one age.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Overwrite a quarter of the image with new random data: the old chunks become garbage.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        let mut rng = ferry::cli::demo::Rng(77);
        let fresh: Vec<u8> = (0..8 * MIB).map(|_| rng.next_u64() as u8).collect();
        f.write_all_at(&fresh, 0).unwrap();
    }
    // And scattered 4 KiB writes elsewhere: those chunks are kept as deltas
    // over the pruned point's chunks, which must then stay.
    scatter_writes(&img, 48, 5).unwrap();
    let second = std::fs::read(&img).unwrap();
    sync(&p, "disk").await.unwrap();
    let out = ferry(&d, &["points", "disk", "--json"]);
    let pts: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(pts.len(), 1, "only the newest point is kept");
    assert_eq!(pts[0]["id"], 2);
    // GC runs after the commit that pruned; give it a moment.
    let mut deleted = 0.0;
    for _ in 0..100 {
        deleted = sample(
            &http_get(&metrics_addr(&d), "/metrics"),
            "ferry_gc_deleted_chunks_total",
        )
        .unwrap_or(0.0);
        if deleted > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        deleted > 0.0,
        "garbage collection deleted the chunks only the pruned point needed"
    );
    let deltas = ferry_json(&d, &["status", "--json"])["store"]["delta_chunks"]
        .as_u64()
        .unwrap();
    assert!(deltas > 0, "the scattered writes are kept as deltas");
    let out = tmp.path().join("point2.img");
    restore(&d, "disk", Some(2), &out).await;
    assert_eq!(
        std::fs::read(&out).unwrap(),
        second,
        "the kept point restores whole after its deltas' bases lost their point"
    );
    let scrub = ferry_json(&d, &["scrub", "disk", "--json"]);
    assert_eq!(scrub["found"], serde_json::json!([]), "{scrub}");
    assert!(scrub["chunks_checked"].as_u64().unwrap() > deltas);

    // Back to the original content: chunks and nodes the DR side dropped must travel
    // again (a node it still claims would be skipped and the commit refused).
    std::fs::write(&img, &original).unwrap();
    let back = sync(&p, "disk").await.unwrap();
    assert!(back.chunks_sent() > 0);
    assert_same_bytes(&img, &replica_path(&d, "disk"));
    assert!(ferry(&p, &["verify", "disk"]).status.success());
}

/// A DR daemon killed and started again is noticed by the primary at its
/// next keep-alive (the restarted endpoint answers the old connection with
/// a stateless reset the primary trusts), not after the 10 s idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_redialed_before_the_idle_timeout() {
    let mut pair = test_pair(false).await;
    wait_link(&pair.p).await;
    for round in 0..3 {
        pair.dd.kill9();
        pair.dd = start(&pair.d).await;
        // From the moment the restarted daemon serves: its start-up (RocksDB
        // opening on a busy machine) is not the redial being measured.
        let t0 = std::time::Instant::now();
        wait_link(&pair.d).await;
        let took = t0.elapsed();
        eprintln!("round {round}: link back {took:?} after the restart");
        assert!(
            took < Duration::from_secs(8),
            "round {round}: the primary took {took:?} to redial a restarted peer"
        );
    }
}

/// An operator caps the link (`ferry link limit`) while a seed runs: what
/// the primary sends slows to the cap, status and metrics say so, and
/// lifting it takes effect at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_limit_set_at_run_time_caps_what_a_seed_sends() {
    let pair = test_pair(true).await;
    let (p, d) = (&pair.p, &pair.d);
    wait_link(p).await;
    let out = ferry(p, &["link", "limit", "16Mbit"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: ferry::daemon::api::SiteStatus =
        ferry::cli::Client::new(p).get("/status").await.unwrap();
    assert_eq!(st.link.limit_bytes_per_s, 2_000_000);
    assert!(
        String::from_utf8_lossy(&ferry(p, &["status"]).stdout).contains("sending at most"),
        "ferry status does not show the limit"
    );

    // 8 MiB that zstd cannot shrink: at 2 MB/s (a burst of 0.5 MB) the
    // seed takes at least 3.5 s, however fast the machine.
    let img = pair.tmp.path().join("limited.img");
    let mut data = vec![0u8; 8 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&img, &data).unwrap();
    let t0 = std::time::Instant::now();
    add_volume(p, "limited", &img).await;
    let r = first_pass(p, "limited").await.unwrap();
    let took = t0.elapsed();
    assert!(
        r.wire_bytes > 8 << 20,
        "the seed sent {} bytes",
        r.wire_bytes
    );
    assert!(
        took >= Duration::from_millis(3500),
        "8 MiB went through a 2 MB/s limit in {took:?}"
    );
    assert_same_bytes(&img, &replica_path(d, "limited"));
    let m = http_get(&metrics_addr(p), "/metrics");
    assert_eq!(sample(&m, "ferry_link_limit_bytes_per_second"), Some(2e6));
    let waited = sample(&m, "ferry_link_throttled_seconds_total").unwrap_or(0.0);
    assert!(waited >= 3.0, "senders waited {waited} s in all");

    // Lifted: status and the metric say so.
    let out = ferry(p, &["link", "limit", "off"]);
    assert!(out.status.success());
    let st: ferry::daemon::api::SiteStatus =
        ferry::cli::Client::new(p).get("/status").await.unwrap();
    assert_eq!(st.link.limit_bytes_per_s, 0);
    let m = http_get(&metrics_addr(p), "/metrics");
    assert_eq!(sample(&m, "ferry_link_limit_bytes_per_second"), Some(0.0));
    // A rate that is no rate is refused before it reaches the daemon.
    let out = ferry(p, &["link", "limit", "fast"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a rate is"), "{err}");
}
