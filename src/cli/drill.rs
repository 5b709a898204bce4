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
