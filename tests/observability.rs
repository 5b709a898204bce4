//! Metrics against what was done, alert rules under promtool, and every
//! dashboard and alert query evaluated by a real Prometheus.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use ferry::cli::demo::{make_mixed_image, scatter_writes};
use ferry::hash::{Hash, is_all_zero};

const MIB: u64 = 1 << 20;

/// A file of the repository: `cargo test` runs in the package's root
/// (CARGO_MANIFEST_DIR is fixed at build time and stays stale when a cached
/// build is reused from another checkout).
fn repo(p: &str) -> PathBuf {
    std::env::current_dir().unwrap().join(p)
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = repo("deploy/prometheus");
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg("ferry-alerts.yml")
        .current_dir(&dir)
        .output()
        .expect("promtool is installed (Debian package prometheus)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("promtool")
        .arg("test")
        .arg("rules")
        .arg("ferry-alerts.test.yml")
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (zero chunks, distinct non-zero chunks, non-zero chunks) of an image at 64 KiB.
/// The frame of the `Hello` a site without volumes opens a connection with.
fn hello_bytes(site: &str) -> f64 {
    let hello = ferry::proto::messages::Request::Hello {
        version: ferry::proto::messages::PROTOCOL_VERSION,
        site: site.into(),
        volumes: vec![],
    };
    ferry::proto::frame::encode(&hello).unwrap().len() as f64
}

fn chunk_census(img: &Path) -> (u64, u64, u64) {
    let data = std::fs::read(img).unwrap();
    let zero = data.chunks(65536).filter(|c| is_all_zero(c)).count() as u64;
    let distinct: HashSet<Hash> = data
        .chunks(65536)
        .filter(|c| !is_all_zero(c))
        .map(Hash::of_chunk)
        .collect();
    (
        zero,
        distinct.len() as u64,
        data.chunks(65536).count() as u64 - zero,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_a_known_replication_did() {
    let pair = test_pair(true).await;
    let (tmp, p, d) = (&pair.tmp, pair.p.clone(), pair.d.clone());
    let img = tmp.path().join("disk.img");
    make_mixed_image(&img, 32 * MIB, 11).unwrap();
    let (zero, distinct, nonzero) = chunk_census(&img);
    add_volume(&p, "disk", &img).await;
    let seed = first_pass(&p, "disk").await.unwrap();

    // Adding a volume sends a Hello with it at once (the peer compares its
    // history with what it holds under that name).
    let added_hello = ferry::proto::frame::encode(&ferry::proto::messages::Request::Hello {
        version: ferry::proto::messages::PROTOCOL_VERSION,
        site: "primary".into(),
        volumes: vec![ferry::proto::messages::VolumeHello {
            name: "disk".into(),
            role: ferry::store::state::Role::Primary,
            history: volume(&p, "disk").await.history,
        }],
    })
    .unwrap()
    .len() as f64;
    let (pm, dm) = (metrics_addr(&p), metrics_addr(&d));
    let pt = http_get(&pm, "/metrics");
    let dt = http_get(&dm, "/metrics");
    let v = |t: &str, s: &str| sample(t, s).unwrap_or_else(|| panic!("no sample {s}"));
    assert_eq!(
        v(&pt, r#"ferry_passes_total{result="ok",volume="disk"}"#),
        1.0
    );
    // Every non-zero chunk is read; holes the file system reports are not.
    let read = v(&pt, r#"ferry_read_bytes_total{volume="disk"}"#);
    assert_eq!(read, seed.bytes_read as f64);
    assert!(
        (nonzero * 65536) as f64 <= read && read <= (32 * MIB) as f64,
        "read {read} bytes of a 32 MiB image with {nonzero} non-zero chunks"
    );
    assert_eq!(
        v(&pt, r#"ferry_chunks_zero_skipped_total{volume="disk"}"#),
        zero as f64
    );
    assert_eq!(
        v(&pt, r#"ferry_chunks_sent_total{how="whole",volume="disk"}"#),
        distinct as f64,
        "a seed sends each distinct chunk once"
    );
    assert_eq!(
        v(&pt, r#"ferry_chunks_deduplicated_total{volume="disk"}"#),
        (nonzero - distinct) as f64
    );
    assert_eq!(
        v(&pt, r#"ferry_pass_duration_seconds_count{volume="disk"}"#),
        1.0
    );
    assert!(
        v(&pt, r#"ferry_compression_ratio{volume="disk"}"#) > 1.0,
        "text regions compress"
    );
    // What one side wrote, the other read: the same stream bytes, by kind.
    let sent_chunk = v(
        &pt,
        r#"ferry_wire_sent_bytes_total{kind="chunk",peer="dr"}"#,
    );
    assert_eq!(
        sent_chunk,
        v(
            &dt,
            r#"ferry_wire_received_bytes_total{kind="chunk",peer="primary"}"#
        )
    );
    assert_eq!(
        v(
            &pt,
            r#"ferry_wire_received_bytes_total{kind="control",peer="dr"}"#
        ),
        v(
            &dt,
            r#"ferry_wire_sent_bytes_total{kind="control",peer="primary"}"#
        )
    );
    assert!(sent_chunk > 0.0 && sent_chunk < (32 * MIB) as f64);
    assert_eq!(
        sent_chunk
            + v(
                &pt,
                r#"ferry_wire_sent_bytes_total{kind="control",peer="dr"}"#
            ),
        seed.bytes_sent as f64 + hello_bytes("primary") + added_hello,
        "metrics agree with the pass report (and the Hellos: the one that opened the link, the one the new volume sent)"
    );
    assert_eq!(
        v(
            &pt,
            r#"ferry_wire_sent_bytes_total{kind="journal",peer="dr"}"#
        ),
        0.0,
        "snapshot mode has no journal"
    );
    assert_eq!(v(&pt, r#"ferry_link_up{peer="dr"}"#), 1.0);
    assert_eq!(v(&dt, r#"ferry_link_up{peer="primary"}"#), 1.0);
    // At least QUIC's floor, at most what a site takes.
    let mtu = v(&pt, r#"ferry_link_udp_payload_bytes{peer="dr"}"#);
    assert!((1200.0..=1452.0).contains(&mtu), "{mtu}");
    assert_eq!(
        v(&pt, r#"ferry_volume_role{role="primary",volume="disk"}"#),
        1.0
    );
    assert_eq!(
        v(&dt, r#"ferry_volume_role{role="replica",volume="disk"}"#),
        1.0
    );
    assert_eq!(v(&dt, r#"ferry_recovery_points{volume="disk"}"#), 1.0);
    assert_eq!(v(&dt, r#"ferry_volume_consistent{volume="disk"}"#), 1.0);
    assert!(v(&dt, r#"ferry_recovery_point_age_seconds{volume="disk"}"#) < 60.0);
    assert!(v(&dt, "ferry_store_chunks") >= (distinct - 1) as f64);

    // A second pass after a change, and a verify.
    let offs = scatter_writes(&img, 20, 3).unwrap();
    let changed: HashSet<u64> = offs.iter().map(|o| o / 65536).collect();
    let inc = sync(&p, "disk").await.unwrap();
    let out = ferry(&p, &["verify", "disk"]);
    assert!(out.status.success());
    let pt = http_get(&pm, "/metrics");
    let dt = http_get(&dm, "/metrics");
    assert_eq!(
        v(&pt, r#"ferry_passes_total{result="ok",volume="disk"}"#),
        2.0
    );
    let sent = v(&pt, r#"ferry_chunks_sent_total{how="whole",volume="disk"}"#)
        + v(&pt, r#"ferry_chunks_sent_total{how="delta",volume="disk"}"#);
    assert_eq!(
        sent,
        (distinct + changed.len() as u64) as f64,
        "the second pass added exactly the changed chunks"
    );
    assert_eq!(inc.chunks_sent(), changed.len() as u64);
    assert_eq!(v(&dt, r#"ferry_recovery_points{volume="disk"}"#), 2.0);
    assert_eq!(
        v(
            &pt,
            r#"ferry_verify_runs_total{result="in_sync",volume="disk"}"#
        ),
        1.0
    );
    assert_eq!(v(&pt, r#"ferry_verify_mismatch_bytes{volume="disk"}"#), 0.0);
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every PromQL expression of the dashboards, with `$volume` filled in.
fn dashboard_queries(volume: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for f in [
        "dashboards/ferry-overview.json",
        "dashboards/ferry-volume.json",
    ] {
        let d: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(repo(f)).unwrap()).unwrap();
        assert!(
            d["templating"]["list"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["type"] == "datasource"),
            "{f} has a datasource variable"
        );
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let e = t["expr"].as_str().unwrap().replace("$volume", volume);
                out.push((format!("{f}: {}", p["title"]), e));
            }
        }
    }
    out
}

/// Every alert rule's expression.
fn alert_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo("deploy/prometheus/ferry-alerts.yml")).unwrap();
    let mut out = Vec::new();
    let mut name = String::new();
    for l in text.lines() {
        let l = l.trim();
        if let Some(n) = l.strip_prefix("- alert: ") {
            name = n.to_string();
        } else if let Some(e) = l.strip_prefix("expr: ") {
            out.push((name.clone(), e.to_string()));
        }
    }
    out
}

fn query(prom: &str, q: &str) -> serde_json::Value {
    let body = http_get(prom, &format!("/api/v1/query?query={}", urlencode(q)));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "success", "query {q}: {body}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_evaluates_every_dashboard_and_alert_query_against_a_live_pair() {
    let pair = test_pair(true).await;
    let (tmp, p, d) = (&pair.tmp, pair.p.clone(), pair.d.clone());
    let (pm, dm) = (metrics_addr(&p), metrics_addr(&d));

    let port = free_port();
    let prom = format!("127.0.0.1:{port}");
    let cfg = tmp.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: ferry\n    static_configs:\n      - targets: ['{pm}']\n        labels: {{site: primary}}\n      - targets: ['{dm}']\n        labels: {{site: dr}}\n",
            repo("deploy/prometheus/ferry-alerts.yml").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(tmp.path().join("prometheus.log")).unwrap();
    let _prom = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                tmp.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus is installed (Debian package prometheus)"),
    );

    // Replicate while Prometheus watches: a seed and an incremental pass.
    let img = tmp.path().join("disk.img");
    make_mixed_image(&img, 32 * MIB, 12).unwrap();
    add_volume(&p, "disk", &img).await;
    first_pass(&p, "disk").await.unwrap();
    scatter_writes(&img, 50, 4).unwrap();
    sync(&p, "disk").await.unwrap();
    assert!(ferry(&p, &["verify", "disk"]).status.success());

    // Both targets up, and some scrapes in.
    let mut up = false;
    for _ in 0..120 {
        if std::net::TcpStream::connect(&prom).is_ok() {
            let v = query(&prom, "sum(up{job=\"ferry\"})");
            if v["data"]["result"][0]["value"][1] == "2" {
                up = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        up,
        "prometheus scrapes both daemons: {}",
        std::fs::read_to_string(tmp.path().join("prometheus.log")).unwrap_or_default()
    );
    tokio::time::sleep(Duration::from_secs(4)).await;

    let mut empty = Vec::new();
    for (panel, q) in dashboard_queries("disk") {
        let v = query(&prom, &q);
        if v["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
            empty.push(format!("{panel}: {q}"));
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries that return nothing:\n{}",
        empty.join("\n")
    );

    // Alert expressions parse and run; they return data only when firing, so
    // every metric each one reads must return data instead.
    let mut missing = Vec::new();
    for (alert, q) in alert_queries() {
        query(&prom, &q);
        let mut rest = q.as_str();
        while let Some(i) = rest.find(|c: char| c.is_ascii_lowercase()) {
            rest = &rest[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let word = &rest[..end];
            if word.starts_with("ferry_") || word == "up" {
                let v = query(&prom, word);
                if v["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
                    missing.push(format!("{alert}: {word}"));
                }
            }
            rest = &rest[end..];
        }
    }
    assert!(
        missing.is_empty(),
        "alert inputs with no data:\n{}",
        missing.join("\n")
    );

    // The rules loaded into the real Prometheus and evaluate without error.
    let rules: serde_json::Value = serde_json::from_str(&http_get(&prom, "/api/v1/rules")).unwrap();
    let rules: Vec<&serde_json::Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(rules.len(), alert_queries().len());
    for r in rules {
        assert_eq!(
            r["health"], "ok",
            "rule {} health: {}",
            r["name"], r["lastError"]
        );
    }
    // Nothing is wrong with this pair: no alert fires or is pending. (Its
    // volume was never drilled, but it is minutes old, not 30 days.) The
    // one exception is a pending FerryDaemonDown: a scrape that missed its
    // 1 s timeout on a busy machine reads as `up == 0` for a moment.
    let alerts: serde_json::Value =
        serde_json::from_str(&http_get(&prom, "/api/v1/alerts")).unwrap();
    let alerts = alerts["data"]["alerts"].as_array().unwrap();
    let wrong: Vec<_> = alerts
        .iter()
        .filter(|a| a["state"] != "pending" || a["labels"]["alertname"] != "FerryDaemonDown")
        .collect();
    assert!(wrong.is_empty(), "unexpected alerts: {wrong:?}");
}
