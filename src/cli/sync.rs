//! `ferry sync NAME [--wait]`: a pass now, with progress on a terminal and
//! plain lines otherwise.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::bail;

use super::{Client, print_json};
use crate::daemon::api::SyncResponse;
use crate::daemon::runtime::ProgressView;
use crate::store::state::PassReport;
use crate::units::human_bytes;

/// Give up waiting if no pass finishes in this long (the pass goes on).
const WAIT_MAX: Duration = Duration::from_secs(24 * 3600);

pub async fn run(dir: &Path, name: &str, wait: bool, json: bool) -> anyhow::Result<ExitCode> {
    let c = Client::new(dir);
    let path = format!("/volumes/{name}/sync");
    let r: SyncResponse = c.post(&path, &()).await?;
    if !wait {
        if json {
            print_json(&r)?;
        } else {
            println!("pass requested for {name}; `ferry status {name}` shows its result");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let tty = std::io::stderr().is_terminal() && !json;
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let started = Instant::now();
    let mut last_line = Instant::now() - Duration::from_secs(10);
    let view = loop {
        // The daemon answers when the pass ends, or after a second.
        let v: ProgressView = c
            .get(&format!("/volumes/{name}/progress/{}", r.wait_for))
            .await?;
        if v.state.finished >= r.wait_for {
            break v;
        }
        let (done, total) = if v.phase == "sending" {
            (v.sent, v.to_send)
        } else {
            (v.scanned, v.size)
        };
        if let Some(b) = &bar {
            b.set_message(v.phase.clone());
            b.set_length(total);
            b.set_position(done);
        } else if !json && last_line.elapsed() >= Duration::from_secs(2) && v.state.running {
            eprintln!(
                "{name}: {} {} of {}",
                v.phase,
                human_bytes(done),
                human_bytes(total)
            );
            last_line = Instant::now();
        }
        if started.elapsed() > WAIT_MAX {
            bail!("no pass finished within {WAIT_MAX:?}; the pass goes on in the daemon");
        }
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if let Some(err) = &view.state.last_error {
        if json {
            print_json(&view.state)?;
        }
        bail!("pass for {name} failed: {err}");
    }
    let Some(rep) = &view.state.last_report else {
        bail!("pass finished without a report")
    };
    if json {
        print_json(rep)?;
    } else {
        print_report(name, rep);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn print_report(name: &str, r: &PassReport) {
    let secs = r.duration_ms as f64 / 1000.0;
    println!(
        "{name}: recovery point {} in {secs:.2}s: read {}, {} chunks ({} zero, {} deduplicated), sent {} whole + {} delta; {} on streams, {} on the wire",
        r.point.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        human_bytes(r.bytes_read),
        r.chunks_total,
        r.chunks_zero,
        r.chunks_deduped,
        r.chunks_sent_full,
        r.chunks_sent_delta,
        human_bytes(r.bytes_sent),
        human_bytes(r.wire_bytes),
    );
}
