//! Who may connect, pairing tokens, and a hostile peer's input.

mod common;

use std::time::Duration;

use common::nbd_client::NbdClient;
use common::*;
use ferry::cli::demo::make_mixed_image;
use ferry::failover::epoch::History;
use ferry::hash::Hash;
use ferry::proto::frame;
use ferry::proto::messages::{ChunkHave, ChunkPut, ErrorCode, PROTOCOL_VERSION, Request, Response};
use ferry::store::encode_chunk;
use ferry::store::state::{Mode, SyncFallback};
use ferry::transport::endpoint::{call, client_only, connect};
use ferry::transport::pairing::Token;
use ferry::transport::tls::Identity;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sites_are_refused_and_tokens_work_once_and_expire() {
    let tmp = tempfile::tempdir().unwrap();
    let (p, d, x, y) = (
        tmp.path().join("primary"),
        tmp.path().join("dr"),
        tmp.path().join("third"),
        tmp.path().join("late"),
    );
    for (dir, name) in [(&p, "primary"), (&d, "dr"), (&x, "third"), (&y, "late")] {
        init(dir, name);
    }
    let _dd = start(&d).await;
    let _pd = start(&p).await;
    let _xd = start(&x).await;
    let _yd = start(&y).await;

    // An expired token is refused with a clear error.
    let out = ferry(&d, &["pair", "token", "--ttl", "1s"]);
    let expired = String::from_utf8(out.stdout).unwrap().trim().to_string();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let out = ferry(&y, &["pair", "join", &expired]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("expired"), "{}", stderr(&out));

    let token = pair(&p, &d, "6s").await;

    // The same token a second time, from another site: refused, it works once.
    let out = ferry(&x, &["pair", "join", &token]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already used"), "{}", stderr(&out));

    // Once the pairing window has closed, a third site's certificate cannot even connect.
    tokio::time::sleep(Duration::from_millis(6200)).await;
    let t = Token::decode(&token).unwrap();
    let id = Identity::load(&x).unwrap();
    let ep = client_only().unwrap();
    let r = connect(
        &ep,
        t.address.parse().unwrap(),
        &id,
        &t.fingerprint,
        Default::default(),
    )
    .await;
    let conn_ok = match r {
        Err(_) => false,
        // With TLS 1.3 the client may finish before the server's verdict arrives: then the first request fails.
        Ok(c) => call(&c, &Request::Points { volume: "x".into() }, 1 << 20)
            .await
            .is_ok(),
    };
    assert!(
        !conn_ok,
        "a third site with its own certificate must not get through"
    );
    // And a site that pins the wrong fingerprint for the DR site refuses it.
    let pid = Identity::load(&p).unwrap();
    let r = connect(
        &ep,
        t.address.parse().unwrap(),
        &pid,
        &"00".repeat(32),
        Default::default(),
    )
    .await;
    assert!(
        r.is_err(),
        "a certificate other than the pinned one is refused"
    );

    // The pair still works.
    let st: ferry::daemon::api::SiteStatus =
        ferry::cli::Client::new(&p).get("/status").await.unwrap();
    assert!(st.link.up);
    let mtu = st.link.udp_payload_bytes.unwrap_or(0);
    assert!((1200..=1452).contains(&mtu), "{mtu}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_cannot_store_bad_chunks_or_exhaust_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let (p, d) = (tmp.path().join("primary"), tmp.path().join("dr"));
    init(&p, "primary");
    init(&d, "dr");
    let _dd = start(&d).await;
    let pd = start(&p).await;
    let token = pair(&p, &d, "10m").await;
    // Stop the real primary and speak for it with its own certificate.
    drop(pd);
    let (_ep, conn) = connect_as(&p, &token).await;
    let max = 16 << 20;
    let vol = "evil".to_string();
    // Nothing before Hello; a Hello in another protocol version is refused.
    let (r, _) = call(
        &conn,
        &Request::Points {
            volume: vol.clone(),
        },
        max,
    )
    .await
    .unwrap();
    assert!(
        matches!(
            r,
            Response::Error {
                code: ErrorCode::HelloFirst,
                ..
            }
        ),
        "{r:?}"
    );
    let (r, _) = call(
        &conn,
        &Request::Hello {
            version: PROTOCOL_VERSION + 1,
            site: "primary".into(),
            volumes: vec![],
        },
        max,
    )
    .await
    .unwrap();
    assert!(
        matches!(
            r,
            Response::Error {
                code: ErrorCode::Version,
                ..
            }
        ),
        "{r:?}"
    );
    say_hello_as_primary(&conn).await;
    let (r, _) = call(
        &conn,
        &Request::Open {
            volume: vol.clone(),
            size: 1 << 20,
            chunk_size: 65536,
            mode: Mode::Snapshot,
            history: History::first("primary"),
        },
        max,
    )
    .await
    .unwrap();
    assert!(matches!(r, Response::Opened { committed: None }), "{r:?}");

    // A chunk whose content does not match its name.
    let good = vec![7u8; 65536];
    let claimed = Hash::of_chunk(b"the name of something else");
    let items = vec![
        ChunkPut::Full {
            hash: Hash::of_chunk(&good),
            record: encode_chunk(&good),
        },
        ChunkPut::Full {
            hash: claimed,
            record: encode_chunk(&good),
        },
    ];
    let (r, _) = call(
        &conn,
        &Request::PutChunks {
            volume: vol.clone(),
            items,
        },
        max,
    )
    .await
    .unwrap();
    let Response::Error { message, .. } = r else {
        panic!("bad chunk accepted: {r:?}")
    };
    assert!(message.contains("does not match"), "{message}");
    let (r, _) = call(
        &conn,
        &Request::HaveChunks {
            volume: vol.clone(),
            items: vec![(0, claimed), (1, Hash::of_chunk(&good))],
        },
        max,
    )
    .await
    .unwrap();
    let Response::Chunks(have) = r else {
        panic!("{r:?}")
    };
    assert_eq!(
        have,
        vec![ChunkHave::Missing, ChunkHave::Missing],
        "nothing of a refused batch is stored"
    );

    // A zstd bomb: declares 1 GiB.
    let mut bomb = encode_chunk(&vec![0x41u8; 65536]);
    bomb[1..5].copy_from_slice(&(1u32 << 30).to_le_bytes());
    let items = vec![ChunkPut::Full {
        hash: Hash::of_chunk(&[0x41u8; 65536]),
        record: bomb,
    }];
    let (r, _) = call(
        &conn,
        &Request::PutChunks {
            volume: vol.clone(),
            items,
        },
        max,
    )
    .await
    .unwrap();
    assert!(
        matches!(r, Response::Error { ref message, .. } if message.contains("exceeds")),
        "{r:?}"
    );

    // A frame that claims 4 GiB: refused before allocation; the connection lives on.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3])
        .await
        .unwrap();
    send.finish().unwrap();
    let (r, _) = frame::read::<Response, _>(&mut recv, max).await.unwrap();
    assert!(
        matches!(r, Response::Error { ref message, .. } if message.contains("exceeds the limit")),
        "{r:?}"
    );
    // A volume name that tries to leave the data directory.
    let (r, _) = call(
        &conn,
        &Request::Open {
            volume: "../../etc".into(),
            size: 1,
            chunk_size: 65536,
            mode: Mode::Snapshot,
            history: History::first("primary"),
        },
        max,
    )
    .await
    .unwrap();
    assert!(matches!(r, Response::Error { .. }), "{r:?}");
    let (r, _) = call(&conn, &Request::Points { volume: vol }, max)
        .await
        .unwrap();
    assert!(
        matches!(r, Response::Points(ref p) if p.is_empty()),
        "{r:?}"
    );
}

/// A connection to the DR site with the primary's own certificate (its
/// endpoint must outlive it).
async fn connect_as(
    primary: &std::path::Path,
    token: &str,
) -> (quinn::Endpoint, quinn::Connection) {
    let t = Token::decode(token).unwrap();
    let id = Identity::load(primary).unwrap();
    let ep = client_only().unwrap();
    let conn = connect(
        &ep,
        t.address.parse().unwrap(),
        &id,
        &t.fingerprint,
        Default::default(),
    )
    .await
    .expect("the pinned primary connects");
    (ep, conn)
}

async fn say_hello_as_primary(conn: &quinn::Connection) {
    let (r, _) = call(
        conn,
        &Request::Hello {
            version: PROTOCOL_VERSION,
            site: "primary".into(),
            volumes: vec![],
        },
        16 << 20,
    )
    .await
    .unwrap();
    assert!(matches!(r, Response::Hello { .. }), "{r:?}");
}

/// Resident memory of a process now and at its peak, in MiB.
fn rss_mib(pid: u32) -> (u64, u64) {
    let (now, peak) = rss_and_peak(pid);
    (now >> 20, peak >> 20)
}

/// The pinned peer turned hostile, at scale: hundreds of streams that
/// claim maximal frames (some stall half way), frames of unknown message
/// types, a flood of new volume names, sizes near 2^64, a root whose size
/// disagrees with its height, zstd bombs in chunk, delta and journal
/// messages, and thousands of chunks under wrong names. Every one gets a
/// clear error, the DR daemon's memory stays under the stated bound
/// (limits.peer_inflight_bytes_max of requests at once; unbounded, the
/// frames alone would be over 3 GiB), nothing bad is stored, and the honest
/// volume goes on replicating once the real primary is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_at_scale_stays_bounded_and_the_honest_volume_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (p, d) = (tmp.path().join("primary"), tmp.path().join("dr"));
    init(&p, "primary");
    init(&d, "dr");
    set_limits(&d, |l| {
        l.volumes_max = 40;
        l.peer_inflight_bytes_max = ferry::units::ByteSize(64 << 20);
    });
    let dd = start(&d).await;
    let mut pd = start(&p).await;
    let token = pair(&p, &d, "10m").await;
    let img = tmp.path().join("honest.img");
    make_mixed_image(&img, 16 << 20, 3).unwrap();
    add_volume_mode(&p, "honest", &img, Mode::Async, SyncFallback::Fail).await;
    wait_seeded(&p, &d, "honest").await;
    pd.kill9();

    let (_ep, conn) = connect_as(&p, &token).await;
    let max = 16 << 20;
    say_hello_as_primary(&conn).await;
    // The bound counts from the daemon's size with the honest volume seeded.
    let (base, _) = rss_mib(dd.pid());

    // 1. 100 streams claim 16 MiB frames and send half, then stall; 100
    // more send whole 16 MiB frames of an unknown message type.
    let (release, released) = tokio::sync::watch::channel(false);
    let mut stalled = Vec::new();
    for _ in 0..100 {
        let conn = conn.clone();
        let mut released = released.clone();
        stalled.push(tokio::spawn(async move {
            let Ok((mut send, _recv)) = conn.open_bi().await else {
                return;
            };
            {
                let work = async {
                    send.write_all(&(16u32 << 20).to_le_bytes()).await.ok()?;
                    send.write_all(&vec![0x5a; 8 << 20]).await.ok()
                };
                tokio::select! {
                    _ = work => {}
                    _ = released.wait_for(|r| *r) => {}
                }
            }
            let _ = released.wait_for(|r| *r).await;
            let _ = send.reset(0u32.into());
        }));
    }
    let mut unknown = Vec::new();
    for i in 0..100u32 {
        let conn = conn.clone();
        unknown.push(tokio::spawn(async move {
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            let mut f = (16u32 << 20).to_le_bytes().to_vec();
            f.push(200); // no such request
            f.resize(4 + (16 << 20), i as u8);
            send.write_all(&f).await.ok()?;
            send.finish().ok()?;
            frame::read::<Response, _>(&mut recv, 1 << 20).await.ok()
        }));
    }
    // Until the daemon holds what the streams make it hold.
    wait_memory_steady(dd.pid(), Duration::from_secs(30)).await;
    let (during, peak) = rss_mib(dd.pid());
    eprintln!(
        "DR memory: {base} MiB before, {during} MiB with 200 streams of 16 MiB frames (peak {peak} MiB)"
    );
    // The stallers give up (a peer that never sends the rest is dropped
    // after 60 s; here it resets its streams).
    release.send_replace(true);
    for s in stalled {
        s.await.unwrap();
    }
    let mut answered = 0;
    for u in unknown {
        let r = tokio::time::timeout(Duration::from_secs(120), u)
            .await
            .expect("an unknown message was not answered within 120 s")
            .unwrap();
        if let Some((Response::Error { code, .. }, _)) = r {
            assert_eq!(code, ErrorCode::Malformed);
            answered += 1;
        }
    }
    assert_eq!(answered, 100, "every frame of an unknown type is refused");

    // 2. A flood of new volume names: refused past limits.volumes_max (the
    // honest volume holds one), sizes near 2^64 and bad chunk sizes too.
    let history = History::first("primary");
    let mut opened = 0;
    for i in 0..200 {
        let (r, _) = call(
            &conn,
            &Request::Open {
                volume: format!("flood{i}"),
                size: 1 << 20,
                chunk_size: 65536,
                mode: Mode::Snapshot,
                history: history.clone(),
            },
            max,
        )
        .await
        .unwrap();
        match r {
            Response::Opened { .. } => opened += 1,
            Response::Error { message, .. } => assert!(message.contains("volumes"), "{message}"),
            r => panic!("{r:?}"),
        }
    }
    assert_eq!(opened, 39, "volumes_max is 40, the honest volume is one");
    for (size, chunk_size) in [
        (u64::MAX, 65536),
        (u64::MAX - 65535, 65536),
        (1 << 20, 0),
        (1 << 20, u32::MAX),
    ] {
        let (r, _) = call(
            &conn,
            &Request::Open {
                volume: "flood0".into(),
                size,
                chunk_size,
                mode: Mode::Snapshot,
                history: history.clone(),
            },
            max,
        )
        .await
        .unwrap();
        assert!(
            matches!(r, Response::Error { .. }),
            "size {size}, chunk {chunk_size}: {r:?}"
        );
    }

    // 3. A root whose size disagrees with its height.
    let root = ferry::store::tree::Node::Root {
        size: 1 << 50,
        chunk_size: 65536,
        height: 1,
        top: Hash::of_chunk(b"top"),
    };
    let (r, _) = call(
        &conn,
        &Request::Commit {
            volume: "flood0".into(),
            root_node: root.encode(),
            fuzzy: None,
        },
        max,
    )
    .await
    .unwrap();
    assert!(
        matches!(r, Response::Error { ref message, .. } if message.contains("height")),
        "{r:?}"
    );

    // 4. zstd bombs in every compressed message: a whole chunk, a delta,
    // a journal batch.
    let mut bomb = encode_chunk(&vec![0x41u8; 65536]);
    bomb[1..5].copy_from_slice(&(1u32 << 30).to_le_bytes());
    let delta = ChunkPut::Delta {
        hash: Hash::of_chunk(&[0x41u8; 65536]),
        base: Hash::ZERO,
        len: 65536,
        blocks: (0..16).collect(),
        record: bomb.clone(),
    };
    for items in [
        vec![ChunkPut::Full {
            hash: Hash::of_chunk(&[0x41u8; 65536]),
            record: bomb.clone(),
        }],
        vec![delta],
    ] {
        let (r, _) = call(
            &conn,
            &Request::PutChunks {
                volume: "flood0".into(),
                items,
            },
            max,
        )
        .await
        .unwrap();
        assert!(matches!(r, Response::Error { .. }), "{r:?}");
    }
    let zeros = vec![0u8; 256 << 20];
    let journal_bomb = zstd::bulk::compress(&zeros, 19).unwrap();
    drop(zeros);
    let (r, _) = call(
        &conn,
        &Request::Records {
            volume: "honest".into(),
            first: 1,
            data: journal_bomb,
        },
        max,
    )
    .await
    .unwrap();
    eprintln!("a journal batch that inflates to 256 MiB: {r:?}");
    assert!(matches!(r, Response::Error { .. }), "{r:?}");

    // 5. Thousands of chunks under wrong names, on 32 streams at once.
    let mut calls = Vec::new();
    for k in 0..32u8 {
        let conn = conn.clone();
        calls.push(tokio::spawn(async move {
            let items: Vec<ChunkPut> = (0..64u8)
                .map(|i| {
                    let data = vec![k ^ i; 65536];
                    ChunkPut::Full {
                        hash: Hash::of_chunk(&[k, i]),
                        record: encode_chunk(&data),
                    }
                })
                .collect();
            let (r, _) = call(
                &conn,
                &Request::PutChunks {
                    volume: "flood0".into(),
                    items,
                },
                16 << 20,
            )
            .await
            .unwrap();
            matches!(r, Response::Error { ref message, .. } if message.contains("does not match"))
        }));
    }
    for c in calls {
        assert!(c.await.unwrap(), "a chunk under a wrong name was taken");
    }
    let (r, _) = call(
        &conn,
        &Request::HaveChunks {
            volume: "flood0".into(),
            items: (0..64u8)
                .map(|i| (i as u64, Hash::of_chunk(&[0, i])))
                .collect(),
        },
        max,
    )
    .await
    .unwrap();
    let Response::Chunks(have) = r else {
        panic!("{r:?}")
    };
    assert!(have.iter().all(|h| *h == ChunkHave::Missing));

    let (now, peak) = rss_mib(dd.pid());
    eprintln!("DR memory after every attack: {now} MiB, peak {peak} MiB (from {base} MiB)");
    // The stated bound: 64 MiB of requests held at once (each at most twice
    // briefly: its frame and its decoded form), QUIC's 64 MiB receive
    // window (its packets' buffers cost more than their payload), and the
    // allocator's slack: 400 MiB over the daemon's size. Unbounded, the
    // frames alone were over 3 GiB. Measured: some 260-275 MiB over.
    assert!(
        peak < base + 400,
        "the DR daemon grew from {base} to {peak} MiB under the hostile peer"
    );

    // The real primary returns: the honest volume goes on replicating.
    conn.close(0u32.into(), b"bye");
    drop(conn);
    let _pd = start(&p).await;
    wait_link(&p).await;
    let mut c = NbdClient::connect(&sock(&p), "honest").unwrap();
    for k in 0..32u64 {
        c.write(k * 300_000 % (15 << 20), &vec![k as u8 + 1; 12288])
            .unwrap();
    }
    c.flush().unwrap();
    c.disconnect();
    wait_caught_up(&p, "honest").await;
    wait_dr_settled(&d, "honest").await;
    assert_same_bytes(&img, &replica_path(&d, "honest"));
}
