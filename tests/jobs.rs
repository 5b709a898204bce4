//! Background jobs never stop without a word: a job that meets an error logs
//! it, retries with backoff, and goes on when the cause is gone.

mod common;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::nbd_client::NbdClient;
use common::*;

/// Sets the soft limit on open files of process `pid`; returns the old limits.
fn set_nofile(pid: u32, soft: u64) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads `new` and writes `old`, both valid for the call.
    let r = unsafe {
        let cur = libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old);
        assert_eq!(cur, 0, "prlimit read");
        let new = libc::rlimit {
            rlim_cur: soft,
            rlim_max: old.rlim_max,
        };
        libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut())
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    old
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64
}

/// Out of file descriptors (EMFILE), an accept fails. The NBD server logs it,
/// waits, and accepts again once descriptors are free: it does not end.
#[tokio::test(flavor = "multi_thread")]
async fn the_nbd_server_outlives_running_out_of_file_descriptors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("primary");
    init_with_metrics(&p, "primary");
    let pd = start(&p).await;
    let img = tmp.path().join("vol.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    add_volume(&p, "vol", &img).await;
    NbdClient::connect(&sock(&p), "vol").unwrap().disconnect();

    let pid = pd.pid();
    let old = set_nofile(pid, open_fds(pid) + 4);
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(UnixStream::connect(sock(&p)).unwrap());
    }
    let log = p.with_extension("log");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("Too many open files")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the daemon never ran out of descriptors: nothing was checked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
    set_nofile(pid, old.rlim_cur);

    let t0 = Instant::now();
    let mut c = loop {
        match NbdClient::connect(&sock(&p), "vol") {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "the NBD server stopped for good after EMFILE: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let mut buf = vec![0u8; 4096];
    c.read(0, &mut buf).unwrap();
    c.disconnect();
    // The failure was shown, and counted, not swallowed.
    let st: ferry::daemon::api::SiteStatus =
        ferry::cli::Client::new(&p).get("/status").await.unwrap();
    let job = st.jobs.iter().find(|j| j.name == "nbd-unix").unwrap();
    assert!(job.errors >= 1, "{job:?}");
    assert_eq!(job.state, "running");
    assert!(job.last_error.is_none(), "it recovered: {job:?}");
    let m = http_get(&metrics_addr(&p), "/metrics");
    let n = sample(&m, r#"ferry_job_errors_total{job="nbd-unix",volume=""}"#).unwrap();
    assert!(n >= 1.0, "{n}");
    assert_eq!(
        sample(&m, r#"ferry_job_failing{job="nbd-unix",volume=""}"#),
        Some(0.0)
    );
    drop(pd);
}
