//! `ferry failover NAME --force` and `ferry demote NAME`.

use std::path::Path;

use super::{Client, print_json};
use crate::daemon::api::{DemoteRequest, FailoverRequest, VolumeStatusBrief};
use crate::daemon::failover::{AssertedReport, FailoverOutcome, ForcedReport, PlannedReport};
use crate::units::human_duration;
use crate::util::utc;

pub async fn force(dir: &Path, name: &str, point: Option<u64>, json: bool) -> anyhow::Result<()> {
    let r: FailoverOutcome = Client::new(dir)
        .post(
            &format!("/volumes/{name}/failover"),
            &FailoverRequest {
                force: true,
                planned: false,
                disconnect_clients: false,
                workload_stopped: false,
                point,
            },
        )
        .await?;
    match r {
        FailoverOutcome::Forced(r) => print_forced(name, dir, &r, json),
        FailoverOutcome::Asserted(r) => print_asserted(name, &r, json),
        r => anyhow::bail!("the daemon answered a forced failover with {r:?}"),
    }
}

fn print_asserted(name: &str, r: &AssertedReport, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(r);
    }
    println!(
        "volume {name} stays primary at site {}: epoch {} recorded while the peer is unreachable",
        r.site, r.epoch
    );
    match r.last_contact_age_s {
        Some(a) => println!("last contact with the peer: {} ago", human_duration(a)),
        None => println!("no contact with the peer since this daemon started"),
    }
    println!(
        "if the other site was promoted too, both took writes: when the link returns both show a split brain and neither replicates until `ferry resolve {name} --keep SITE` (the loser's writes are kept there as a pinned point). If it was not, it becomes this site's replica again, by a tree comparison."
    );
    Ok(())
}

fn print_forced(name: &str, dir: &Path, r: &ForcedReport, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(r);
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

/// A planned switchover: `action` is `failover` (`failover --planned`) or
/// `failback`; the request and its report.
pub async fn planned(
    dir: &Path,
    name: &str,
    action: &str,
    (disconnect_clients, workload_stopped): (bool, bool),
    json: bool,
) -> anyhow::Result<()> {
    let r: FailoverOutcome = Client::new(dir)
        .post(
            &format!("/volumes/{name}/{action}"),
            &FailoverRequest {
                force: false,
                planned: true,
                disconnect_clients,
                workload_stopped,
                point: None,
            },
        )
        .await?;
    let FailoverOutcome::Planned(r) = r else {
        anyhow::bail!("the daemon answered a planned switchover with {r:?}");
    };
    if json {
        return print_json(&r);
    }
    print_planned(&r);
    Ok(())
}

fn print_planned(r: &PlannedReport) {
    let at = match r.handed_over_at {
        0 => "its last pass (snapshot mode)".to_string(),
        n => format!("record {n}"),
    };
    println!(
        "volume {} switched over: {} is primary now (epoch {}), handed over at {at} with nothing lost",
        r.volume, r.new_primary, r.epoch
    );
    println!(
        "downtime: {} ms (writes stopped here until {}'s export was writable){}",
        r.downtime_ms,
        r.new_primary,
        if r.clients_disconnected > 0 {
            format!(
                "; {} NBD client(s) were disconnected",
                r.clients_disconnected
            )
        } else {
            String::new()
        }
    );
    let fed = match r.handed_over_at {
        0 => format!("updated by {}'s passes", r.new_primary),
        _ => format!("fed from {}'s journal (no resync)", r.new_primary),
    };
    println!(
        "this site is now its replica, {fed}; its state at the hand-over is point {}",
        r.point.id
    );
}

pub async fn resolve(dir: &Path, name: &str, keep: &str, json: bool) -> anyhow::Result<()> {
    let r: crate::daemon::api::ResolveResponse = Client::new(dir)
        .post(
            &format!("/volumes/{name}/resolve"),
            &crate::daemon::api::ResolveRequest {
                keep: keep.to_string(),
            },
        )
        .await?;
    if json {
        return print_json(&r);
    }
    println!("split brain of {name} resolved: {}", r.outcome);
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
