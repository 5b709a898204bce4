//! `ferry failover NAME --force` and `ferry demote NAME`.

use std::path::Path;

use super::{Client, print_json};
use crate::daemon::api::{DemoteRequest, FailoverRequest, VolumeStatusBrief};
use crate::daemon::failover::ForcedReport;
use crate::units::human_duration;
use crate::util::utc;

pub async fn force(dir: &Path, name: &str, point: Option<u64>, json: bool) -> anyhow::Result<()> {
    let r: ForcedReport = Client::new(dir)
        .post(
            &format!("/volumes/{name}/failover"),
            &FailoverRequest { force: true, point },
        )
        .await?;
    if json {
        return print_json(&r);
    }
    println!(
        "volume {name} promoted at site {}: epoch {}, from {} (records up to {} of the old epoch)",
        r.site, r.epoch, r.promoted, r.fork_seq
    );
    println!(
        "the promoted state is {} old (current at the old primary around {} UTC): writes after it are not in it",
        human_duration(r.state_age_s),
        utc(r.state_time)
    );
    if r.rpo_zero {
        println!(
            "RPO 0 was in force (sync mode, consistent replica): every acknowledged flush is in it"
        );
    } else {
        println!(
            "RPO 0 was not in force: writes the old primary acknowledged after this state may be lost"
        );
    }
    match r.last_contact_age_s {
        Some(a) => println!(
            "last contact with the old primary: {} ago",
            human_duration(a)
        ),
        None => println!("no contact with the old primary since this daemon started"),
    }
    println!(
        "pinned recovery point {} holds the promoted state (the fork){}",
        r.point.id,
        if r.chunks_restored > 0 {
            format!(
                "; {} chunks of the image were rewritten to it",
                r.chunks_restored
            )
        } else {
            String::new()
        }
    );
    if r.drill_aborted {
        println!("the running drill was stopped and recorded as aborted");
    }
    for n in &r.notes {
        println!("note: {n}");
    }
    println!(
        "writable now over NBD as export {name} on {} (took {} ms). When the old primary returns it fences itself, keeps its own writes as a pinned point and is resynced from here.",
        dir.join(crate::daemon::NBD_SOCKET).display(),
        r.took_ms
    );
    Ok(())
}

pub async fn demote(
    dir: &Path,
    name: &str,
    reason: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let r: VolumeStatusBrief = Client::new(dir)
        .post(
            &format!("/volumes/{name}/demote"),
            &DemoteRequest { reason },
        )
        .await?;
    if json {
        return print_json(&r);
    }
    println!(
        "volume {name} fenced at this site: no writes, its NBD clients disconnected ({})",
        r.gate.unwrap_or_default()
    );
    Ok(())
}
