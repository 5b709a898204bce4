//! The NBD export driven by the real clients (qemu-img, qemu-io, nbdcopy, fio,
//! nbdfuse), and hostile NBD input on a raw socket.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// Runs an outside program; fails the test (never skips) when it is missing or fails.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} must be installed (see .ci/run): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?} failed:\n{text}");
    text
}

fn uri(dir: &Path, vol: &str) -> String {
    format!(
        "nbd+unix:///{vol}?socket={}",
        dir.join("nbd.sock").display()
    )
}

fn random_file(path: &Path, size: u64, seed: u64) {
    let mut rng = ferry::cli::demo::Rng(seed | 1);
    let data: Vec<u8> = (0..size).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(path, data).unwrap();
}

/// A primary site with one volume of `size` bytes exported over NBD (unpaired
/// unless a DR site is asked for).
async fn exported(size: u64) -> (tempfile::TempDir, PathBuf, PathBuf, Daemon) {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("primary");
    init(&p, "primary");
    let pd = start(&p).await;
    let img = tmp.path().join("vol.img");
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    add_volume(&p, "vol", &img).await;
    (tmp, p, img, pd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_writes_through_the_export_and_the_dr_copy_follows() {
    let pair = test_pair(false).await;
    let (tmp, p, d) = (&pair.tmp, pair.p.clone(), pair.d.clone());
    let img = tmp.path().join("vol.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    add_volume(&p, "vol", &img).await;
    first_pass(&p, "vol").await.unwrap();
    let src = tmp.path().join("src.img");
    random_file(&src, 64 * MIB, 1);
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &uri(&p, "vol"),
        ],
    );
    assert_same_bytes(&src, &img);
    let back = tmp.path().join("back.img");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri(&p, "vol"),
            back.to_str().unwrap(),
        ],
    );
    assert_same_bytes(&src, &back);
    let info = run("qemu-img", &["info", "--output=json", &uri(&p, "vol")]);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 64 * MIB)),
        "{info}"
    );
    sync(&p, "vol").await.unwrap();
    assert_same_bytes(&src, &replica_path(&d, "vol"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_patterns_flush_fua_discard_and_zeroes_read_back() {
    let (_tmp, p, img, _pd) = exported(16 * MIB).await;
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "flush",
            "-c",
            "write -f -P 0xcd 1M 64k",
            "-c",
            "aio_write -P 0x11 3M 512k",
            "-c",
            "aio_write -P 0x22 5M 512k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0xcd 1M 64k",
            "-c",
            "read -P 0x11 3M 512k",
            "-c",
            "read -P 0x22 5M 512k",
            "-c",
            "write -P 0xee 8M 1M",
            "-c",
            "discard 8M 1M",
            "-c",
            "read -P 0 8M 1M",
            "-c",
            "write -P 0xee 10M 1M",
            "-c",
            "write -z 10M 1M",
            "-c",
            "read -P 0 10M 1M",
            &uri(&p, "vol"),
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let data = std::fs::read(&img).unwrap();
    assert!(data[..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(
        data[MIB as usize..(MIB + 65536) as usize]
            .iter()
            .all(|&b| b == 0xcd)
    );
    assert!(
        data[(10 * MIB) as usize..(11 * MIB) as usize]
            .iter()
            .all(|&b| b == 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_both_ways_and_nbdfuse_see_the_same_bytes() {
    let (tmp, p, img, _pd) = exported(32 * MIB).await;
    let src = tmp.path().join("src.img");
    random_file(&src, 32 * MIB, 2);
    run("nbdcopy", &[src.to_str().unwrap(), &uri(&p, "vol")]);
    assert_same_bytes(&src, &img);
    let out = tmp.path().join("out.img");
    run("nbdcopy", &[&uri(&p, "vol"), out.to_str().unwrap()]);
    assert_same_bytes(&src, &out);

    // nbdfuse: the export as a file in a FUSE mount.
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut fuse = Command::new("nbdfuse")
        .arg(&mnt)
        .arg(uri(&p, "vol"))
        .spawn()
        .expect("nbdfuse must be installed");
    let file = mnt.join("nbd");
    let t0 = std::time::Instant::now();
    while !std::fs::metadata(&file)
        .map(|m| m.len() == 32 * MIB)
        .unwrap_or(false)
    {
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = Command::new("umount").arg(&mnt).status();
            let _ = fuse.kill();
            let _ = fuse.wait();
            panic!("nbdfuse did not show the export within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = std::panic::catch_unwind(|| {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file)
            .unwrap();
        let mut head = vec![0u8; MIB as usize];
        f.read_exact(&mut head).unwrap();
        assert_eq!(head, std::fs::read(&src).unwrap()[..MIB as usize]);
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"written through nbdfuse", 5 * MIB).unwrap();
        f.sync_all().unwrap();
    });
    let _ = Command::new("umount").arg(&mnt).status();
    let _ = fuse.kill();
    let _ = fuse.wait();
    r.unwrap();
    let data = std::fs::read(&img).unwrap();
    assert_eq!(
        &data[(5 * MIB) as usize..(5 * MIB) as usize + 23],
        b"written through nbdfuse"
    );
}

/// `nbdinfo --map`'s runs: (offset, length, hole).
fn allocation_map(uri: &str) -> Vec<(u64, u64, bool)> {
    run("nbdinfo", &["--map", uri])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = |i: usize| f.get(i)?.parse::<u64>().ok();
            Some((n(0)?, n(1)?, n(2)? & 1 == 1))
        })
        .collect()
}

/// The data runs of `map` (a map describes the whole export in order).
fn data_runs(map: &[(u64, u64, bool)], size: u64) -> Vec<(u64, u64)> {
    let mut at = 0;
    let mut data = Vec::new();
    for &(off, len, hole) in map {
        assert_eq!(off, at, "the map has a gap or an overlap: {map:?}");
        if !hole {
            match data.last_mut() {
                Some((o, l)) if *o + *l == off => *l += len,
                _ => data.push((off, len)),
            }
        }
        at += len;
    }
    assert_eq!(at, size, "the map covers the export: {map:?}");
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modern_clients_map_holes_and_copy_over_parallel_connections_of_a_volume_and_its_drill() {
    let t = test_pair(false).await;
    let img = t.tmp.path().join("vol.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    add_volume_mode(
        &t.p,
        "vol",
        &img,
        ferry::store::state::Mode::Async,
        Default::default(),
    )
    .await;
    first_pass(&t.p, "vol").await.unwrap();
    // What a guest would leave: a sparse disk with data at three places.
    let src = t.tmp.path().join("src.img");
    let spots = [(3 * MIB, MIB), (20 * MIB, 2 * MIB), (41 * MIB, MIB)];
    {
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(64 * MIB).unwrap();
        let mut rng = ferry::cli::demo::Rng(7);
        for (at, len) in spots {
            let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8 | 1).collect();
            std::os::unix::fs::FileExt::write_all_at(&f, &data, at).unwrap();
        }
    }
    let vol = uri(&t.p, "vol");
    // What the export offers: multi-conn, fast zero, base:allocation.
    let info: serde_json::Value = serde_json::from_str(&run("nbdinfo", &["--json", &vol])).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["can_multi_conn"], true, "{info}");
    assert_eq!(export["can_fast_zero"], true, "{info}");
    assert!(
        export["contexts"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == "base:allocation")),
        "{info}"
    );
    // Four connections at once write it (the export says they may).
    run(
        "nbdcopy",
        &["--connections=4", "--flush", src.to_str().unwrap(), &vol],
    );
    assert_same_bytes(&src, &img);
    let want: Vec<(u64, u64)> = spots.to_vec();
    assert_eq!(data_runs(&allocation_map(&vol), 64 * MIB), want);
    // qemu reads the same map.
    let qmap: serde_json::Value = serde_json::from_str(&run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &vol],
    ))
    .unwrap();
    let qdata: Vec<(u64, u64)> = qmap
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(qdata, want, "{qmap}");
    // A copy out over four connections, holes skipped, is the volume.
    let out = t.tmp.path().join("out.img");
    run("nbdcopy", &["--connections=4", &vol, out.to_str().unwrap()]);
    assert_same_bytes(&src, &out);

    // The drill clone of the point after those writes maps the same holes,
    // and its own writes show as data.
    wait_caught_up(&t.p, "vol").await;
    create_point(&t.p, "vol").await;
    let started = ferry(&t.d, &["drill", "start", "vol"]);
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let drill = uri(&t.d, "vol@drill");
    assert_eq!(data_runs(&allocation_map(&drill), 64 * MIB), want);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 10M 4k", &drill],
    );
    let mut with_write = want.clone();
    with_write.insert(1, (10 * MIB, 4096));
    assert_eq!(data_runs(&allocation_map(&drill), 64 * MIB), with_write);
    let clone = t.tmp.path().join("clone.img");
    run(
        "nbdcopy",
        &["--connections=2", &drill, clone.to_str().unwrap()],
    );
    let mut expect = std::fs::read(&src).unwrap();
    expect[(10 * MIB) as usize..(10 * MIB + 4096) as usize].fill(0x5a);
    assert!(std::fs::read(&clone).unwrap() == expect, "the drill's copy");
    assert!(ferry(&t.d, &["drill", "stop", "vol"]).status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_random_writes_verify_with_crc32c() {
    let (_tmp, p, _img, _pd) = exported(64 * MIB).await;
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", uri(&p, "vol")),
            "--rw=randwrite",
            "--bs=4k",
            "--size=32M",
            "--iodepth=32",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // No verify state file in the working directory.
            "--verify_state_save=0",
        ],
    );
    assert!(!out.contains("verify: bad"), "{out}");
    assert!(out.contains("err= 0"), "{out}");
}

// Raw protocol helpers for the hostile-input test.
fn handshake(s: &mut UnixStream, name: &str) -> u64 {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    export_name(s, name)
}

/// The rest of the handshake after the server's greeting: the export's size.
fn export_name(s: &mut UnixStream, name: &str) -> u64 {
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&1u32.to_be_bytes()); // EXPORT_NAME
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name.as_bytes());
    s.write_all(&opt).unwrap();
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).unwrap();
    u64::from_be_bytes(rep[..8].try_into().unwrap())
}

fn request(s: &mut UnixStream, cmd: u16, handle: u64, off: u64, len: u32, payload: &[u8]) {
    try_request(s, cmd, handle, off, len, payload).unwrap();
}

fn try_request(
    s: &mut UnixStream,
    cmd: u16,
    handle: u64,
    off: u64,
    len: u32,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut r = Vec::new();
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&cmd.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&off.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r.extend_from_slice(payload);
    s.write_all(&r)
}

/// (error, handle) of the next simple reply, reading `data` bytes after it on success.
fn reply(s: &mut UnixStream, data: usize) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
    let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
    if err == 0 && data > 0 {
        let mut d = vec![0u8; data];
        s.read_exact(&mut d).unwrap();
    }
    (err, u64::from_be_bytes(h[8..16].try_into().unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_nbd_input_gets_errors_and_changes_nothing() {
    let (_tmp, p, img, _pd) = exported(4 * MIB).await;
    let sock = p.join("nbd.sock");
    let before = std::fs::read(&img).unwrap();

    // A malformed handshake: garbage instead of an option. The server hangs up; nothing else.
    let mut s = UnixStream::connect(&sock).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"NOTANOPTIONATALL1234").unwrap();
    let mut buf = [0u8; 1];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        s.read(&mut buf).unwrap_or(0),
        0,
        "the server closes on a bad option magic"
    );
    // An unknown export name closes too.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.read_exact(&mut hello).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"IHAVEOPT\0\0\0\x01\0\0\0\x04nope").unwrap();
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);

    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(handshake(&mut s, "vol"), 4 * MIB);
    // A read far larger than the limit: EOVERFLOW, and the connection lives.
    request(&mut s, 0, 1, 0, u32::MAX, &[]);
    assert_eq!(reply(&mut s, 0), (75, 1));
    // Past the end: EINVAL for a read, ENOSPC for a write (its payload skipped).
    request(&mut s, 0, 2, 4 * MIB - 10, 4096, &[]);
    assert_eq!(reply(&mut s, 0), (22, 2));
    request(&mut s, 1, 3, u64::MAX - 100, 512, &[0x55; 512]);
    assert_eq!(reply(&mut s, 0), (28, 3));
    request(&mut s, 6, 4, 4 * MIB, 1 << 30, &[]);
    assert_eq!(reply(&mut s, 0), (28, 4));
    // An unknown command: EINVAL.
    request(&mut s, 99, 5, 0, 0, &[]);
    assert_eq!(reply(&mut s, 0), (22, 5));
    // Still serving: a good read works.
    request(&mut s, 0, 6, 0, 4096, &[]);
    assert_eq!(reply(&mut s, 4096), (0, 6));
    // DISC, then a write: the write must never land.
    request(&mut s, 2, 7, 0, 0, &[]);
    // (The server may already have closed: then even sending it fails, which is fine.)
    let _ = try_request(&mut s, 1, 8, 0, 4096, &[0x77; 4096]);
    assert_eq!(
        s.read(&mut buf).unwrap_or(0),
        0,
        "no reply after DISC; the server closes"
    );
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(std::fs::read(&img).unwrap() == before, "no data changed");

    // The daemon is alive and serving after all that.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(handshake(&mut s, "vol"), 4 * MIB);
}

/// Resident memory of a process, in bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_storms_and_pipelined_maximal_requests_stay_bounded() {
    const CONNECTIONS_MAX: usize = 8;
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("primary");
    init(&p, "primary");
    set_limits(&p, |l| {
        l.nbd_connections_max = CONNECTIONS_MAX as u32;
        l.nbd_inflight_bytes_max = ferry::units::ByteSize(64 * MIB);
    });
    let pd = start(&p).await;
    let img = tmp.path().join("vol.img");
    random_file(&img, 64 * MIB, 5);
    add_volume(&p, "vol", &img).await;
    let sock = p.join("nbd.sock");
    let before = rss_and_peak(pd.pid()).0;

    // A storm of 200 connections: the first CONNECTIONS_MAX are served,
    // the others closed at once.
    let mut live = Vec::new();
    let mut refused = 0;
    for _ in 0..200 {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut hello = [0u8; 18];
        match s.read_exact(&mut hello) {
            Ok(()) => live.push(s),
            Err(_) => refused += 1,
        }
    }
    assert_eq!(live.len(), CONNECTIONS_MAX, "{refused} refused");
    assert_eq!(refused, 200 - CONNECTIONS_MAX);
    for s in live.iter_mut() {
        export_name(s, "vol");
    }
    // Every live connection pipelines 16 maximal (32 MiB) reads and reads
    // no reply: without a budget that is 8 x 16 x 32 MiB = 4 GiB of reply
    // buffers; with one, at most the budget plus a reply in writing.
    for s in live.iter_mut() {
        for h in 0..16u64 {
            request(s, 0, h, (h % 2) * 32 * MIB, (32 * MIB) as u32, &[]);
        }
    }
    // Until the daemon has taken all it will: its memory has grown by a
    // budget's half at least (a daemon starved of CPU for a second is not
    // at rest) and then stops growing (the budget is spent and every
    // connection waits on its client).
    let t0 = std::time::Instant::now();
    while rss_and_peak(pd.pid()).0.saturating_sub(before) < 32 * MIB
        && t0.elapsed() < Duration::from_secs(20)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = wait_memory_steady(pd.pid(), Duration::from_secs(20)).await;
    let grown = during.saturating_sub(before);
    assert!(
        grown >= 32 * MIB,
        "the reads were not served up to the budget ({} MiB): nothing checked",
        grown / MIB
    );
    eprintln!(
        "daemon RSS {} MiB before, {} MiB with 8 connections of 16 pipelined 32 MiB reads",
        before / MIB,
        during / MIB
    );
    // The budget (64 MiB) and, per connection, a reply being written
    // (32 MiB) and the socket's buffer.
    assert!(
        grown < (64 + CONNECTIONS_MAX as u64 * 40) * MIB,
        "RSS grew by {} MiB",
        grown / MIB
    );
    drop(live);

    // The honest client is served again once the storm's connections are
    // torn down (their requests in flight end first): a write and its
    // read-back.
    let t0 = std::time::Instant::now();
    let mut s = loop {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut hello = [0u8; 18];
        if s.read_exact(&mut hello).is_ok() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no connection slot came free"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    export_name(&mut s, "vol");
    let data = vec![0x5au8; 4096];
    request(&mut s, 1, 1, 8192, 4096, &data);
    assert_eq!(reply(&mut s, 0), (0, 1));
    request(&mut s, 0, 2, 8192, 4096, &[]);
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0);
    let mut back = vec![0u8; 4096];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, data);
    let log = std::fs::read_to_string(p.with_extension("log")).unwrap();
    assert!(
        log.contains("nbd_connections_max"),
        "the refusals are logged"
    );
}
