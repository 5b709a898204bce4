//! Who may connect, pairing tokens, and a hostile peer's input.

mod common;

use std::time::Duration;

use common::*;
use ferry::failover::epoch::History;
use ferry::hash::Hash;
use ferry::proto::frame;
use ferry::proto::messages::{ChunkHave, ChunkPut, ErrorCode, PROTOCOL_VERSION, Request, Response};
use ferry::store::encode_chunk;
use ferry::store::state::Mode;
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
    let r = connect(&ep, t.address.parse().unwrap(), &id, &t.fingerprint).await;
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
    let r = connect(&ep, t.address.parse().unwrap(), &pid, &"00".repeat(32)).await;
    assert!(
        r.is_err(),
        "a certificate other than the pinned one is refused"
    );

    // The pair still works.
    let st: ferry::daemon::api::SiteStatus =
        ferry::cli::Client::new(&p).get("/status").await.unwrap();
    assert!(st.link.up);
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
    let t = Token::decode(&token).unwrap();
    let id = Identity::load(&p).unwrap();
    let ep = client_only().unwrap();
    let conn = connect(&ep, t.address.parse().unwrap(), &id, &t.fingerprint)
        .await
        .expect("the pinned primary connects");
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
    let (r, _) = call(
        &conn,
        &Request::Hello {
            version: PROTOCOL_VERSION,
            site: "primary".into(),
            volumes: vec![],
        },
        max,
    )
    .await
    .unwrap();
    assert!(matches!(r, Response::Hello { .. }), "{r:?}");
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
