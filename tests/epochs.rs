//! Epoch histories exchanged in the `Hello` of every connection: sites in
//! step replicate; a primary that learns its peer holds a higher epoch
//! fences itself at once (invariant 5); forked histories are split brain.
//! Until failover lands, a test makes the DR side's history move by editing
//! its store while it is stopped, as a promotion there would.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::nbd_client::NbdClient;
use common::*;
use ferry::failover::epoch::{EpochEntry, Fork, Gen};
use ferry::hash::Hash;
use ferry::store::state::{self, Mode, SyncFallback};
use ferry::store::{ChunkStore, RocksStore};

/// Rewrites a stopped site's record of `name` with `f`.
fn edit_record(dir: &Path, name: &str, f: impl FnOnce(&mut state::VolumeRecord)) {
    let store = RocksStore::open(&dir.join("store")).unwrap();
    let mut rec = state::get_volume(&store, name).unwrap().unwrap();
    f(&mut rec);
    store.apply(vec![state::put_volume_op(&rec)], true).unwrap();
}

fn promotion(epoch: u64, site: &str, generation: u128) -> EpochEntry {
    EpochEntry {
        epoch,
        site: site.into(),
        generation: Gen(generation),
        fork: Some(Fork {
            epoch: epoch - 1,
            seq: 1,
            checksum: 0,
            root: Hash::ZERO,
        }),
    }
}

/// Waits until `f` holds for the volume's status at `dir`.
async fn wait_status(
    dir: &Path,
    what: &str,
    f: impl Fn(&ferry::daemon::api::VolumeStatus) -> bool,
) -> ferry::daemon::api::VolumeStatus {
    let t0 = Instant::now();
    loop {
        let v = volume(dir, "disk").await;
        if f(&v) {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what}: {:?} {:?} {:?}",
            v.role_state,
            v.gate,
            v.history
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sites_in_step_share_one_history_and_replicate() {
    let t = test_pair(false).await;
    let img = t.tmp.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    wait_seeded(&t.p, &t.d, "disk").await;
    let p = volume(&t.p, "disk").await;
    let d = volume(&t.d, "disk").await;
    assert_eq!(p.history.0.len(), 1);
    assert_eq!(p.history.0[0].site, "primary");
    assert_eq!(
        d.history, p.history,
        "the replica adopted its primary's history"
    );
    assert_eq!((p.role_state.epoch, d.role_state.epoch), (1, 1));
    assert!(p.gate.is_none(), "the primary's gate is open");
    assert!(p.role_state.replicating);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_primary_that_learns_its_peer_holds_a_higher_epoch_fences_itself_at_once() {
    let mut t = test_pair(false).await;
    let img = t.tmp.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    wait_seeded(&t.p, &t.d, "disk").await;
    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    c.write(0, &[1u8; 4096]).unwrap();
    c.flush().unwrap();

    // The DR site is promoted (as a forced failover there would do).
    t.dd.kill9();
    edit_record(&t.d, "disk", |r| {
        r.role = state::Role::Primary;
        r.history.push(promotion(2, "dr", 77));
    });
    t.dd = start(&t.d).await;
    let v = wait_status(&t.p, "the primary fences itself", |v| v.gate.is_some()).await;
    eprintln!("gate: {:?}", v.gate);
    // Its NBD client is cut off, and no new one gets the export.
    let write = c.write(4096, &[2u8; 4096]).and_then(|_| c.flush());
    assert!(write.is_err(), "a write was accepted after the fence");
    let again = NbdClient::connect(&sock(&t.p), "disk");
    assert!(again.is_err(), "the fenced volume is still exported");
    // It keeps its own state as a pinned point and becomes the replica of
    // the site that holds epoch 2.
    let v = wait_status(&t.p, "the old primary becomes a replica", |v| {
        v.role == state::Role::Replica && v.history.epoch() == 2
    })
    .await;
    assert!(v.gate.is_some());
    let points: Vec<state::RecoveryPoint> = ferry::cli::Client::new(&t.p)
        .get("/volumes/disk/points")
        .await
        .unwrap();
    assert!(
        points
            .iter()
            .any(|p| p.pinned.as_deref() == Some("divergent")),
        "{points:?}"
    );
    // A restart keeps it a replica: nothing is exported.
    t.pd.kill9();
    t.pd = start(&t.p).await;
    let v = volume(&t.p, "disk").await;
    assert_eq!(v.role, state::Role::Replica, "{v:?}");
    assert!(NbdClient::connect(&sock(&t.p), "disk").is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn forked_histories_are_split_brain_at_both_sites_and_replication_stops() {
    let mut t = test_pair(true).await;
    let img = t.tmp.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    wait_seeded(&t.p, &t.d, "disk").await;
    let replica_before = file_hash(&replica_path(&t.d, "disk"));

    // Both sites promoted from the same state: the histories fork.
    t.dd.kill9();
    t.pd.kill9();
    edit_record(&t.d, "disk", |r| {
        r.role = state::Role::Primary;
        r.history.push(promotion(2, "dr", 8));
    });
    edit_record(&t.p, "disk", |r| r.history.push(promotion(2, "primary", 9)));
    t.dd = start(&t.d).await;
    t.pd = start(&t.p).await;
    for dir in [&t.p, &t.d] {
        let v = wait_status(dir, "split brain", |v| v.role_state.split_brain).await;
        assert!(!v.role_state.replicating);
        let m = http_get(&metrics_addr(dir), "/metrics");
        assert_eq!(sample(&m, r#"ferry_split_brain{volume="disk"}"#), Some(1.0));
        assert_eq!(
            sample(&m, r#"ferry_volume_epoch{volume="disk"}"#),
            Some(2.0)
        );
    }
    // Each site keeps serving as it was: the primary still takes writes,
    // and they stay there (waiting in its journal), not at the other site.
    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    c.write(0, &[9u8; 65536]).unwrap();
    c.flush().unwrap();
    c.disconnect();
    let v = wait_status(&t.p, "the write waits in the journal", |v| {
        v.stream.as_ref().is_some_and(|s| s.lag_bytes > 0)
    })
    .await;
    assert!(v.role_state.split_brain);
    assert_eq!(file_hash(&replica_path(&t.d, "disk")), replica_before);
    // Recorded: a restart does not forget it.
    t.pd.kill9();
    t.pd = start(&t.p).await;
    assert!(volume(&t.p, "disk").await.role_state.split_brain);
    wait_link(&t.p).await;
    let primary_state = std::fs::read(&img).unwrap();

    // Resolved at the primary in favour of the DR site: the primary keeps
    // its own state (with the write it took) as a pinned point and becomes
    // the DR site's replica, brought level by tree comparison.
    let out = ferry(&t.p, &["resolve", "disk", "--keep", "dr"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = wait_status(&t.p, "the loser becomes a level replica", |v| {
        v.role == state::Role::Replica && v.consistency == "consistent" && !v.role_state.split_brain
    })
    .await;
    assert_eq!(v.history.epoch(), 3);
    let d = wait_status(&t.d, "the winner streams to it", |v| {
        !v.role_state.split_brain && v.stream.as_ref().is_some_and(|s| !s.resync_needed)
    })
    .await;
    assert_eq!(d.role, state::Role::Primary);
    wait_dr_settled(&t.p, "disk").await;
    assert_same_bytes(&img, &replica_path(&t.d, "disk"));
    assert_eq!(
        file_hash(&img),
        replica_before,
        "the winner's data is the DR's"
    );
    let points: Vec<state::RecoveryPoint> = ferry::cli::Client::new(&t.p)
        .get("/volumes/disk/points")
        .await
        .unwrap();
    let kept = points
        .iter()
        .find(|p| p.pinned.as_deref() == Some("divergent"))
        .unwrap_or_else(|| panic!("{points:?}"));
    let out = t.tmp.path().join("kept.img");
    restore(&t.p, "disk", Some(kept.id), &out).await;
    assert!(
        std::fs::read(&out).unwrap() == primary_state,
        "the losing side's data (with its write) is not kept"
    );
    let again = ferry(&t.d, &["resolve", "disk", "--keep", "primary"]);
    assert!(!again.status.success(), "a second resolve is refused");
}

/// A restarted primary takes no write before its peer's `Hello` (which
/// would tell it the other site was promoted), or before `startup_wait`
/// passes without one; an NBD client that connects meanwhile waits.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_primary_takes_writes_only_after_the_peers_hello_or_startup_wait() {
    let mut t = test_pair(false).await;
    let img = t.tmp.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    wait_seeded(&t.p, &t.d, "disk").await;

    // With the peer up, the Hello opens the gate at once.
    t.pd.kill9();
    t.pd = start(&t.p).await;
    let t0 = Instant::now();
    let mut c = tokio::task::spawn_blocking({
        let s = sock(&t.p);
        move || NbdClient::connect(&s, "disk")
    })
    .await
    .unwrap()
    .expect("the export appears once the peer's Hello is in");
    c.write(0, &[3u8; 4096]).unwrap();
    c.flush().unwrap();
    c.disconnect();
    eprintln!("export ready {:?} after the restart, peer up", t0.elapsed());

    // With the peer away, the gate stays closed for startup_wait.
    t.dd.kill9();
    t.pd.kill9();
    set_config(&t.p, |c| c.startup_wait = "6s".parse().unwrap());
    t.pd = start(&t.p).await;
    let t0 = Instant::now();
    let v = volume(&t.p, "disk").await;
    assert!(
        v.gate.as_deref().is_some_and(|g| g.contains("Hello")),
        "{:?}",
        v.gate
    );
    let mut c = tokio::task::spawn_blocking({
        let s = sock(&t.p);
        move || NbdClient::connect(&s, "disk")
    })
    .await
    .unwrap()
    .expect("the export appears after startup_wait");
    let waited = t0.elapsed();
    assert!(
        // Counted from when the daemon answers, a little after its timer
        // starts: a slow start-up on a busy machine eats into the 6 s.
        waited >= Duration::from_secs(4),
        "the export was there after {waited:?}, before startup_wait"
    );
    c.write(0, &[4u8; 4096]).unwrap();
    c.flush().unwrap();
    c.disconnect();
    assert!(volume(&t.p, "disk").await.gate.is_none());
}

/// Split brain, ten times over: both sites promoted from the same state
/// (each a new entry of its own, as two forced failovers during a
/// partition make), both take writes, the link heals. Every run: both
/// sites detect it, `resolve` makes the named site win (each way in turn,
/// asked at either site), the loser keeps its own writes as a pinned point
/// (restored and compared) and becomes a level replica. One run kills the
/// winner right after it recorded its win, one the loser right after it
/// recorded its loss: each finishes on restart.
#[tokio::test(flavor = "multi_thread")]
async fn split_brain_is_detected_and_resolved_either_way_in_ten_of_ten_runs() {
    let mut t = test_pair(false).await;
    let img = t.tmp.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    wait_seeded(&t.p, &t.d, "disk").await;
    let (pdir, ddir) = (t.p.clone(), t.d.clone());
    let image = |site: &str| {
        if site == "primary" {
            img.clone()
        } else {
            replica_path(&ddir, "disk")
        }
    };
    let dir = |site: &str| {
        if site == "primary" {
            pdir.clone()
        } else {
            ddir.clone()
        }
    };
    let other = |site: &str| if site == "primary" { "dr" } else { "primary" };
    let mut primary = "primary";
    let (mut detected, mut resolved) = (0, 0);
    for run in 0..10u64 {
        let replica = other(primary);
        let epoch = volume(&dir(primary), "disk").await.history.epoch();
        // Both promoted from the same state, while apart.
        t.pd.kill9();
        t.dd.kill9();
        edit_record(&dir(primary), "disk", |r| {
            r.history
                .push(promotion(epoch + 1, primary, 1000 + run as u128));
        });
        edit_record(&dir(replica), "disk", |r| {
            r.role = state::Role::Primary;
            r.history
                .push(promotion(epoch + 1, replica, 2000 + run as u128));
        });
        t.pd = start(&t.p).await;
        t.dd = start(&t.d).await;
        for site in ["primary", "dr"] {
            let v = wait_status(&dir(site), "split brain detected", |v| {
                v.role_state.split_brain
            })
            .await;
            assert!(!v.role_state.replicating, "run {run} at {site}");
        }
        detected += 1;
        // Each side takes writes of its own during the split.
        let mut kept = Vec::new();
        for (k, site) in ["primary", "dr"].into_iter().enumerate() {
            let mut c = NbdClient::connect(&sock(&dir(site)), "disk")
                .unwrap_or_else(|e| panic!("run {run}: {site} serves as it was: {e}"));
            let off = ((run * 2 + k as u64) % 60) * 65536;
            c.write(off, &vec![(run * 2 + k as u64 + 1) as u8; 65536])
                .unwrap();
            c.flush().unwrap();
            c.disconnect();
            kept.push(std::fs::read(image(site)).unwrap());
        }
        let (winner, loser) = if run % 2 == 0 {
            ("dr", "primary")
        } else {
            ("primary", "dr")
        };
        let (winner_state, loser_state) = if winner == "primary" {
            (kept[0].clone(), kept[1].clone())
        } else {
            (kept[1].clone(), kept[0].clone())
        };
        let at = if run % 4 < 2 { winner } else { loser };
        fn daemon<'a>(t: &'a mut TestPair, site: &str) -> &'a mut Daemon {
            if site == "primary" {
                &mut t.pd
            } else {
                &mut t.dd
            }
        }
        match run {
            3 => {
                // The winner dies right after its win is recorded: asked
                // again, it tells the loser.
                daemon(&mut t, winner).kill9();
                *daemon(&mut t, winner) = start_crashing_at(&dir(winner), "resolve:won").await;
                // The restarted site first: the other may still hold the
                // link of the process killed until the new one's Hello.
                wait_link(&dir(winner)).await;
                wait_link(&dir(loser)).await;
                let out = ferry(&dir(at), &["resolve", "disk", "--keep", winner]);
                assert!(!out.status.success(), "run {run}: the winner did not die");
                assert!(daemon(&mut t, winner).wait_exit(Duration::from_secs(10)));
                *daemon(&mut t, winner) = start(&dir(winner)).await;
                wait_link(&dir(winner)).await;
                wait_link(&dir(loser)).await;
            }
            6 => {
                // The loser dies right after recording its loss: its
                // restart goes on becoming the winner's replica.
                daemon(&mut t, loser).kill9();
                *daemon(&mut t, loser) = start_crashing_at(&dir(loser), "resolve:lost").await;
                wait_link(&dir(loser)).await;
                wait_link(&dir(winner)).await;
                let _ = ferry(&dir(winner), &["resolve", "disk", "--keep", winner]);
                assert!(daemon(&mut t, loser).wait_exit(Duration::from_secs(10)));
                *daemon(&mut t, loser) = start(&dir(loser)).await;
            }
            _ => {}
        }
        if run != 6 {
            let out = ferry(&dir(at), &["resolve", "disk", "--keep", winner]);
            assert!(
                out.status.success(),
                "run {run}: resolve at {at} --keep {winner}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v = wait_status(&dir(loser), "the loser becomes a level replica", |v| {
            v.role == state::Role::Replica
                && v.consistency == "consistent"
                && !v.role_state.split_brain
        })
        .await;
        assert!(v.history.epoch() >= epoch + 2, "run {run}: {:?}", v.history);
        wait_status(&dir(winner), "the winner streams again", |v| {
            v.role == state::Role::Primary
                && !v.role_state.split_brain
                && v.stream
                    .as_ref()
                    .is_some_and(|s| !s.resync_needed && !s.resync_running)
        })
        .await;
        wait_dr_settled(&dir(loser), "disk").await;
        assert!(
            std::fs::read(image(winner)).unwrap() == winner_state,
            "run {run}: the winner's data changed"
        );
        assert_same_bytes(&image(winner), &image(loser));
        // The loser's own writes are kept, as its newest divergent point.
        let points: Vec<state::RecoveryPoint> = ferry::cli::Client::new(&dir(loser))
            .get("/volumes/disk/points")
            .await
            .unwrap();
        let p = points
            .iter()
            .rev()
            .find(|p| p.pinned.as_deref() == Some("divergent"))
            .unwrap_or_else(|| panic!("run {run}: {points:?}"));
        let out = t.tmp.path().join(format!("kept-{run}.img"));
        restore(&dir(loser), "disk", Some(p.id), &out).await;
        assert!(
            std::fs::read(&out).unwrap() == loser_state,
            "run {run}: the losing side's writes are not kept"
        );
        resolved += 1;
        primary = winner;
    }
    assert_eq!((detected, resolved), (10, 10));
}

/// A volume removed and added again under the same name is a new lineage:
/// the DR site's copy of the old one (at a higher epoch, after a switchover
/// and back) is never streamed into the new volume, nor the new one into
/// that copy. The sites see forked histories (a split brain), and resolving
/// it keeps the old copy as a pinned point.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_removed_and_added_again_is_never_overwritten_from_its_old_lineage() {
    let mut t = test_pair(false).await;
    let img = t.tmp.path().join("disk.img");
    std::fs::write(&img, vec![0x11u8; 4 << 20]).unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    wait_seeded(&t.p, &t.d, "disk").await;
    // The old lineage moves on to epoch 3: a switchover and back.
    for (at, args) in [
        (&t.p, ["failover", "disk", "--planned"]),
        (&t.p, ["failback", "disk", "--json"]),
    ] {
        let out = ferry(at, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(volume(&t.d, "disk").await.history.epoch(), 3);
    let old_copy = std::fs::read(replica_path(&t.d, "disk")).unwrap();

    // Not while a client is connected; then removed at the primary only.
    let c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    let busy = ferry(&t.p, &["volume", "remove", "disk"]);
    assert!(!busy.status.success());
    assert!(String::from_utf8_lossy(&busy.stderr).contains("NBD client"));
    c.disconnect();
    let out = ferry(&t.p, &["volume", "remove", "disk", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = ferry(&t.p, &["volume", "list", "--json"]);
    assert!(!String::from_utf8_lossy(&list.stdout).contains("\"disk\""));
    assert!(!t.p.join("journal").join("disk").exists());
    assert!(img.exists(), "the operator's image stays");

    // Added again, with other data: a new lineage at epoch 1.
    let new_img = t.tmp.path().join("new.img");
    std::fs::write(&new_img, vec![0x22u8; 4 << 20]).unwrap();
    let new_data = std::fs::read(&new_img).unwrap();
    add_volume_mode(&t.p, "disk", &new_img, Mode::Async, SyncFallback::Fail).await;
    for dir in [&t.p, &t.d] {
        wait_status(dir, "the forked lineages are a split brain", |v| {
            v.role_state.split_brain
        })
        .await;
    }
    let v = volume(&t.p, "disk").await;
    assert_eq!(v.history.epoch(), 1, "{:?}", v.history);
    assert!(!v.role_state.replicating, "{:?}", v.role_state);
    // Not a wait for an event but a window for one that must not happen:
    // a stream or seed that ran anyway would overwrite one of the images.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        std::fs::read(&new_img).unwrap() == new_data,
        "the new volume was overwritten"
    );
    assert!(
        std::fs::read(replica_path(&t.d, "disk")).unwrap() == old_copy,
        "the old copy was overwritten before anyone chose"
    );

    // The operator keeps the new volume; the old copy stays as a point.
    let out = ferry(&t.p, &["resolve", "disk", "--keep", "primary"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_status(
        &t.d,
        "the old copy's site becomes the new volume's replica",
        |v| {
            v.role == state::Role::Replica
                && v.consistency == "consistent"
                && !v.role_state.split_brain
        },
    )
    .await;
    wait_dr_settled(&t.d, "disk").await;
    assert_same_bytes(&new_img, &replica_path(&t.d, "disk"));
    let points: Vec<state::RecoveryPoint> = ferry::cli::Client::new(&t.d)
        .get("/volumes/disk/points")
        .await
        .unwrap();
    let kept = points
        .iter()
        .rev()
        .find(|p| p.pinned.as_deref() == Some("divergent"))
        .unwrap_or_else(|| panic!("{points:?}"));
    let out = t.tmp.path().join("old.img");
    restore(&t.d, "disk", Some(kept.id), &out).await;
    assert!(
        std::fs::read(&out).unwrap() == old_copy,
        "the old copy is not kept"
    );

    // Removed at the DR site: its replica image and points go; the primary
    // still protects the volume, so it is seeded there again from scratch.
    let out = ferry(&t.d, &["volume", "remove", "disk"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("replica"));
    let t0 = Instant::now();
    loop {
        let st: ferry::daemon::api::SiteStatus =
            ferry::cli::Client::new(&t.d).get("/status").await.unwrap();
        let v = st.volumes.iter().find(|v| v.name == "disk");
        if v.is_some_and(|v| v.role == state::Role::Replica && v.consistency == "consistent") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "not seeded again at the DR site: {v:?}; the primary: {:?}",
            volume(&t.p, "disk").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_dr_settled(&t.d, "disk").await;
    assert_same_bytes(&new_img, &replica_path(&t.d, "disk"));
    let points: Vec<state::RecoveryPoint> = ferry::cli::Client::new(&t.d)
        .get("/volumes/disk/points")
        .await
        .unwrap();
    assert!(
        points
            .iter()
            .all(|p| p.pinned.as_deref() != Some("divergent")),
        "the removed replica's points are gone: {points:?}"
    );

    // A removal cut short after its records went leaves files without a
    // volume: the next start deletes them, and only them.
    std::fs::write(t.d.join("replicas").join("ghost.img"), b"x").unwrap();
    std::fs::create_dir_all(t.d.join("redo").join("ghost")).unwrap();
    t.dd.kill9();
    t.dd = start(&t.d).await;
    assert!(!t.d.join("replicas").join("ghost.img").exists());
    assert!(!t.d.join("redo").join("ghost").exists());
    assert!(replica_path(&t.d, "disk").exists());
    assert_eq!(volume(&t.d, "disk").await.role, state::Role::Replica);
}
