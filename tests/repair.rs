//! `ferry verify --repair` on continuous volumes: the DR image is ahead of
//! its last recovery point (redo records applied since), so a repair must
//! rebuild a damaged chunk as the image should hold it now, not as the last
//! point had it.

mod common;

use std::time::Duration;

use common::nbd_client::NbdClient;
use common::*;
use ferry::store::state::{Mode, SyncFallback};

#[tokio::test(flavor = "multi_thread")]
async fn repair_of_an_async_replica_keeps_the_writes_applied_since_its_last_point() {
    let mut t = test_pair(false).await;
    // No scheduled points at DR: the image stays ahead of the last point.
    t.dd.kill9();
    set_config(&t.d, |c| {
        c.point_interval = ferry::units::Dur(Duration::from_secs(3600))
    });
    t.dd = start(&t.d).await;
    wait_link(&t.p).await;
    let img = t.tmp.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    add_volume_mode(&t.p, "disk", &img, Mode::Async, SyncFallback::Fail).await;
    wait_seeded(&t.p, &t.d, "disk").await;

    let mut c = NbdClient::connect(&sock(&t.p), "disk").unwrap();
    c.write(0, &[0x11; 65536]).unwrap();
    c.flush().unwrap();
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    let before = create_point(&t.p, "disk").await;
    // Written after the point: applied at DR, in no point yet.
    c.write(4096, &[0x22; 8192]).unwrap();
    c.flush().unwrap();
    c.disconnect();
    wait_caught_up(&t.p, "disk").await;
    wait_dr_settled(&t.d, "disk").await;
    assert_same_bytes(&img, &replica_path(&t.d, "disk"));
    let points = volume(&t.d, "disk").await.last_point.unwrap();
    assert_eq!(points.id, before.id, "no point was taken since");

    // The DR disk damages that chunk.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(replica_path(&t.d, "disk"))
            .unwrap();
        f.write_all_at(b"rot", 100).unwrap();
    }
    let out = ferry(&t.p, &["verify", "disk", "--json"]);
    assert_eq!(out.status.code(), Some(3), "the damage is found");
    let out = ferry(&t.p, &["verify", "disk", "--repair", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "repair leaves the replica equal to the primary: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_bytes(&img, &replica_path(&t.d, "disk"));
    // The next point records the repaired chunk as the primary has it.
    let p = create_point(&t.p, "disk").await;
    let out = t.tmp.path().join("after.img");
    restore(&t.d, "disk", Some(p.id), &out).await;
    assert_same_bytes(&img, &out);
}
