//! Operator reads: `ferry status`, `ferry verify`, `ferry points`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;

use super::{Client, print_json};
use crate::daemon::api::{SiteStatus, VerifyResponse};
use crate::daemon::worker::JobView;
use crate::store::state::RecoveryPoint;
use crate::store::state::Role;
use crate::units::human_bytes;
use crate::util::utc;

/// Exit code of `ferry verify` when the images differ.
pub const VERIFY_DIFFERS: u8 = 3;

fn age(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

pub async fn status(dir: &Path, name: Option<&str>, json: bool) -> anyhow::Result<()> {
    let mut st: SiteStatus = Client::new(dir).get("/status").await?;
    if let Some(n) = name {
        st.volumes.retain(|v| v.name == n);
        if st.volumes.is_empty() {
            bail!("no volume named {n}; see `ferry volume list`");
        }
    }
    if json {
        return print_json(&st);
    }
    let mut link = if st.link.up {
        let mut s = format!("up, rtt {:.1} ms", st.link.rtt_ms.unwrap_or(0.0));
        if let Some(m) = st.link.udp_payload_bytes {
            s.push_str(&format!(", UDP payloads up to {m} bytes"));
        }
        s
    } else {
        "down".into()
    };
    if st.link.limit_bytes_per_s > 0 {
        link.push_str(&format!(
            ", sending at most {}/s",
            human_bytes(st.link.limit_bytes_per_s)
        ));
    }
    println!(
        "site {} (ferry {}), peer {} at {}: link {link}",
        st.site,
        st.version,
        st.peer.as_deref().unwrap_or("(not paired)"),
        st.peer_address.as_deref().unwrap_or("-")
    );
    println!(
        "store: {} chunks ({} as deltas), {} stored",
        st.store.chunks,
        st.store.delta_chunks,
        human_bytes(st.store.chunk_bytes)
    );
    if let Some(e) = &st.gc_error {
        println!("store: garbage collection failing: {e}");
    }
    for v in &st.volumes {
        let point = match (&v.last_point, v.last_point_age_s) {
            (Some(p), Some(a)) => {
                format!("point {} ({} ago, root {})", p.id, age(a), p.root.short())
            }
            _ => "no recovery point yet".into(),
        };
        println!(
            "{:<16} {:<8} {:<9} {:>10}  {:<10} {point}",
            v.name,
            v.role,
            v.mode,
            human_bytes(v.size),
            v.consistency
        );
        println!(
            "{:<16} passes {}, logical {}, sent {}, chunks sent {}",
            "",
            v.totals.passes,
            human_bytes(v.totals.bytes_logical),
            human_bytes(v.totals.bytes_sent),
            v.totals.chunks_sent
        );
        let r = &v.role_state;
        let mut role = format!("epoch {}, peer {}", r.epoch, r.peer_relation);
        if r.split_brain {
            role.push_str(
                "; SPLIT BRAIN: replication stopped, each site serves as it was (`ferry resolve`)",
            );
        }
        if let (Role::Primary, Some(why)) = (v.role, &v.gate) {
            role.push_str(&format!("; FENCED, no writes here: {why}"));
        } else if !r.replicating && v.role == Role::Primary && st.link.up {
            role.push_str("; replication paused");
        }
        println!("{:<16} {role}", "");
        if let Some(s) = &v.stream {
            let state = if s.resync_running {
                format!(
                    "resyncing ({}); flushes wait for the DR redo log, RPO 0 not in force until it ends",
                    s.resync_reason
                )
            } else if s.resync_needed {
                format!("resync pending: {}", s.resync_reason)
            } else if s.degraded {
                "DEGRADED to async (the DR site did not confirm flushes in time)".into()
            } else if v.mode == crate::store::state::Mode::Sync && !s.rpo_zero {
                "streaming; RPO 0 in force once the DR copy has caught up".into()
            } else {
                "streaming".into()
            };
            println!(
                "{:<16} {state}; journal {} of {}, lag {} / {:.1} s (records {} of {} durable at DR)",
                "",
                human_bytes(s.journal_bytes),
                human_bytes(s.journal_bytes_max),
                human_bytes(s.lag_bytes),
                s.lag_seconds,
                s.acked_seq,
                s.next_seq.saturating_sub(1)
            );
            println!(
                "{:<16} a resync would read {}",
                "",
                match s.resync_scan_chunks {
                    Some(n) => format!(
                        "{n} of {} chunks (those written since the last scan)",
                        s.chunks
                    ),
                    None => format!(
                        "all {} chunks (no map of written chunks: no scan yet in this run, a crash, a failed fsync or `ferry sync`)",
                        s.chunks
                    ),
                }
            );
        }
        if let Some(r) = &v.redo {
            println!(
                "{:<16} redo log {}, records received {}, applied {}{}",
                "",
                human_bytes(r.redo_bytes),
                r.received_seq,
                r.applied_seq,
                if r.held {
                    " (a resync is open: records wait for its commit)"
                } else {
                    ""
                }
            );
        }
        if let Some(p) = &v.progress
            && p.state.running
        {
            println!("{:<16} pass running: {}", "", p.phase);
        }
        if let Some(e) = &v.last_error {
            println!("{:<16} last pass failed: {e}", "");
        }
        if let Some(d) = &v.drill {
            let c = &d.base_check;
            println!(
                "{:<16} DRILL running on point {} as export {} ({} written); base check {} of {} chunks{}",
                "",
                d.point,
                d.export,
                human_bytes(d.bytes_written),
                c.chunks_verified + c.chunks_zero,
                c.chunks_total,
                if c.done { ", done" } else { "" }
            );
        }
        print_failing_jobs(&v.jobs, "");
    }
    print_failing_jobs(&st.jobs, "site");
    Ok(())
}

/// Jobs whose last run failed: name, errors so far, the error.
fn print_failing_jobs(jobs: &[JobView], label: &str) {
    for j in jobs.iter().filter(|j| j.last_error.is_some()) {
        println!(
            "{:<16} job {} {}: {} error(s), last: {}",
            label,
            j.name,
            j.state,
            j.errors,
            j.last_error.as_deref().unwrap_or("")
        );
    }
}

pub async fn verify(dir: &Path, name: &str, repair: bool, json: bool) -> anyhow::Result<ExitCode> {
    let action = if repair { "repair" } else { "verify" };
    let r: VerifyResponse = Client::new(dir)
        .post(&format!("/volumes/{name}/{action}"), &())
        .await?;
    if r.repaired > 0 && !json {
        println!(
            "{name}: rewrote {} chunks of the DR image from its store, then compared again",
            r.repaired
        );
    }
    if json {
        print_json(&r)?;
    } else if r.in_sync {
        println!(
            "{name}: in sync: primary and DR images are equal ({}, {} chunks compared)",
            human_bytes(r.primary_size),
            r.chunks_compared
        );
    } else {
        println!(
            "{name}: DIFFERENT: primary {} vs replica {}; differing byte ranges:",
            human_bytes(r.primary_size),
            human_bytes(r.replica_size)
        );
        for (a, b) in &r.differing {
            println!("  {a}..{b} ({})", human_bytes(b - a));
        }
        if r.differing.is_empty() {
            println!("  (sizes differ)");
        }
    }
    Ok(if r.in_sync {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(VERIFY_DIFFERS)
    })
}

/// A link rate as an operator writes it: `off`, bytes per second (`12MiB`,
/// `12MiB/s`) or bits per second in decimal units (`100Mbit`, `1Gbit/s`).
pub fn parse_rate(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    if t == "off" || t == "none" || t == "0" {
        return Ok(0);
    }
    let t = t.strip_suffix("/s").unwrap_or(t);
    if let Some(n) = t.strip_suffix("bit") {
        let split = n.find(|c: char| !c.is_ascii_digit()).unwrap_or(n.len());
        let (num, unit) = n.split_at(split);
        let v: u64 = num
            .parse()
            .map_err(|_| anyhow::anyhow!("'{s}' is not a rate (try 100Mbit, 12MiB or off)"))?;
        let mult: u64 = match unit {
            "" => 1,
            "K" | "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            other => bail!("unknown unit '{other}bit' in '{s}' (use Kbit, Mbit, Gbit)"),
        };
        return v
            .checked_mul(mult)
            .map(|b| b / 8)
            .ok_or_else(|| anyhow::anyhow!("rate '{s}' is too large"));
    }
    t.parse::<crate::units::ByteSize>()
        .map(|b| b.0)
        .map_err(|e| {
            anyhow::anyhow!("{e}; a rate is bytes (12MiB) or bits (100Mbit) per second, or off")
        })
}

pub async fn link_limit(dir: &Path, rate: &str) -> anyhow::Result<()> {
    let bytes_per_s = parse_rate(rate)?;
    let r: crate::daemon::api::LinkLimitRequest = Client::new(dir)
        .post(
            "/link/limit",
            &crate::daemon::api::LinkLimitRequest { bytes_per_s },
        )
        .await?;
    if r.bytes_per_s == 0 {
        println!("link: no bandwidth limit (until the daemon restarts; ferry.toml decides then)");
    } else {
        println!(
            "link: this site sends at most {}/s ({:.1} Mbit/s) to its peer, until the daemon restarts (limits.link_bytes_per_s_max in ferry.toml keeps it)",
            human_bytes(r.bytes_per_s),
            r.bytes_per_s as f64 * 8.0 / 1e6
        );
    }
    Ok(())
}

pub async fn scrub(dir: &Path, name: &str, json: bool) -> anyhow::Result<ExitCode> {
    let r: crate::daemon::scrub::ScrubReport = Client::new(dir)
        .post(&format!("/volumes/{name}/scrub"), &())
        .await?;
    if json {
        print_json(&r)?;
    } else {
        println!(
            "{name}: {} points, {} chunks ({}) and {} nodes read back in {:.1} s",
            r.points,
            r.chunks_checked,
            human_bytes(r.bytes_checked),
            r.nodes_checked,
            r.seconds
        );
        for d in &r.found {
            println!("  damaged {} {}: {}", d.kind, d.hash, d.reason);
        }
        if !r.found.is_empty() {
            println!(
                "  put back from the image: {} chunks, {} nodes",
                r.repaired_chunks, r.repaired_nodes
            );
        }
        if r.unrepaired.is_empty() {
            println!("{name}: every recovery point reads back whole");
        } else {
            println!(
                "{name}: DAMAGED: {} objects could not be put back; points that cannot be restored whole: {:?}{}",
                r.unrepaired.len(),
                r.points_damaged,
                if r.committed_damaged {
                    " (and the replica's committed state)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(if r.unrepaired.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(VERIFY_DIFFERS)
    })
}

pub async fn points(dir: &Path, name: &str, json: bool) -> anyhow::Result<()> {
    let pts: Vec<RecoveryPoint> = Client::new(dir)
        .get(&format!("/volumes/{name}/points"))
        .await?;
    if json {
        return print_json(&pts);
    }
    println!(
        "{:>6}  {:<20} {:>10}  {:<14} SOURCE",
        "ID", "CREATED (UTC)", "SIZE", "ROOT"
    );
    for p in pts {
        println!(
            "{:>6}  {:<20} {:>10}  {:<14} {}",
            p.id,
            utc(p.created),
            human_bytes(p.size),
            p.root.short(),
            p.source
        );
    }
    Ok(())
}

pub async fn create_point(dir: &Path, name: &str, json: bool) -> anyhow::Result<()> {
    let p: RecoveryPoint = Client::new(dir)
        .post(&format!("/volumes/{name}/points"), &())
        .await?;
    if json {
        return print_json(&p);
    }
    println!(
        "recovery point {} of {name}: {} at {} UTC ({})",
        p.id,
        p.root.short(),
        utc(p.created),
        p.source
    );
    Ok(())
}

pub async fn restore(
    dir: &Path,
    name: &str,
    point: Option<u64>,
    to: &Path,
    json: bool,
) -> anyhow::Result<()> {
    let req = crate::daemon::api::RestoreRequest {
        point,
        to: std::path::absolute(to)?.display().to_string(),
    };
    let r: crate::daemon::api::RestoreResponse = Client::new(dir)
        .post(&format!("/volumes/{name}/restore"), &req)
        .await?;
    if json {
        return print_json(&r);
    }
    println!(
        "restored point {} of {name} ({} UTC, {}) to {}: {} of data",
        r.point.id,
        utc(r.point.created),
        human_bytes(r.point.size),
        r.path,
        human_bytes(r.bytes_written)
    );
    Ok(())
}

#[cfg(test)]
mod rate_tests {
    use super::parse_rate;

    #[test]
    fn link_rates_read_as_an_operator_writes_them() {
        assert_eq!(parse_rate("off").unwrap(), 0);
        assert_eq!(parse_rate("100Mbit").unwrap(), 12_500_000);
        assert_eq!(parse_rate("1Gbit/s").unwrap(), 125_000_000);
        assert_eq!(parse_rate("12MiB").unwrap(), 12 << 20);
        assert_eq!(parse_rate("12MiB/s").unwrap(), 12 << 20);
        for bad in ["fast", "12Xbit", "", "-1MiB"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
