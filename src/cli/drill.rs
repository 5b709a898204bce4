//! `ferry drill start|stop|report`: failover drills at the DR site.

use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;

use super::{Client, print_json};
use crate::daemon::api::{DrillStartRequest, DrillStarted};
use crate::failover::drill::{DrillReport, DrillResult};
use crate::units::human_duration;
use crate::util::utc;

pub async fn start(dir: &Path, name: &str, point: Option<u64>, json: bool) -> anyhow::Result<()> {
    let r: DrillStarted = Client::new(dir)
        .post(
            &format!("/volumes/{name}/drill/start"),
            &DrillStartRequest { point },
        )
        .await?;
    if json {
        return print_json(&r);
    }
    let s = &r.state;
    println!(
        "drill {} started: recovery point {} of {name} ({}, {} old) cloned in {:.1} ms",
        s.id,
        s.point,
        s.point_source,
        human_duration((s.started_ms / 1000).saturating_sub(s.point_created)),
        s.ready_ms
    );
    println!(
        "the clone is writable over NBD as export {} on {}\n  qemu-system-x86_64 -drive file=nbd+unix:///{}?socket={}\nstart the cloned guest on an isolated network (it keeps its identity and addresses);\nreplication into the replica goes on; end the drill with `ferry drill stop {name}`",
        r.export, r.socket, r.export, r.socket
    );
    Ok(())
}

pub async fn stop(dir: &Path, name: &str, json: bool) -> anyhow::Result<ExitCode> {
    let r: DrillReport = Client::new(dir)
        .post(
            &format!("/volumes/{name}/drill/stop"),
            &serde_json::json!({}),
        )
        .await?;
    if json {
        print_json(&r)?;
    } else {
        print!("{}", r.text());
        println!(
            "report: {}",
            crate::failover::drill::reports_dir(dir)
                .join(format!("{}.txt", r.id))
                .display()
        );
    }
    Ok(if r.result == DrillResult::Passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub async fn report(dir: &Path, name: &str, last: bool, json: bool) -> anyhow::Result<()> {
    let mut all: Vec<DrillReport> = Client::new(dir)
        .get(&format!("/volumes/{name}/drill/reports"))
        .await?;
    if last {
        all = all.pop().into_iter().collect();
    }
    if json {
        return if last {
            match all.first() {
                Some(r) => print_json(r),
                None => bail!("no drill of {name} has been recorded yet"),
            }
        } else {
            print_json(&all)
        };
    }
    if all.is_empty() {
        println!(
            "no drill of {name} has been recorded yet; start one with `ferry drill start {name}`"
        );
        return Ok(());
    }
    if last {
        print!("{}", all[0].text());
        return Ok(());
    }
    println!(
        "{:<28} {:<8} {:>6} {:>10} {:>10} {:<20}",
        "DRILL", "RESULT", "POINT", "RPO", "READY", "STARTED (UTC)"
    );
    for r in &all {
        println!(
            "{:<28} {:<8} {:>6} {:>10} {:>8.1}ms {:<20}",
            r.id,
            r.result,
            r.point,
            human_duration(r.point_age_at_start_s),
            r.ready_ms,
            utc(r.started)
        );
    }
    Ok(())
}

/// `ferry audit [--verify]`: reads `DIR/audit.log` directly (no daemon
/// needed) and checks its hash chain.
pub fn audit(dir: &Path, verify: bool, json: bool) -> anyhow::Result<ExitCode> {
    let (entries, verdict) = crate::failover::audit::read(dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot read {}: {e}",
            dir.join(crate::failover::audit::AUDIT_LOG).display()
        )
    })?;
    if json {
        print_json(&serde_json::json!({ "entries": entries, "verdict": verdict }))?;
    } else {
        for e in &entries {
            println!(
                "{:>5} {} {:<18} {:<12} {:<5} by {}{}",
                e.seq,
                utc(e.time_ms / 1000),
                e.action,
                e.volume,
                e.phase,
                e.by,
                e.outcome
                    .as_ref()
                    .map(|o| format!(": {o}"))
                    .unwrap_or_default()
            );
        }
        match &verdict.broken {
            None if verify => println!("audit chain verified: {} entries, intact", verdict.entries),
            None => {}
            Some((line, why)) => println!("AUDIT CHAIN BROKEN at line {line}: {why}"),
        }
    }
    Ok(if verify && verdict.broken.is_some() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
