//! Failover drills at the DR site: a writable clone of a recovery point,
//! exported over NBD as `NAME@drill` while replication into the replica goes
//! on untouched, and a report when it ends (`failover::drill`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::Site;
use crate::failover::drill::{
    self, BaseCheck, DrillClone, DrillReport, DrillResult, DrillState, Operator,
};
use crate::store::state::{self, Role};

/// The export name of a volume's drill clone.
pub const DRILL_SUFFIX: &str = "@drill";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A drill in progress.
pub struct Running {
    pub state: DrillState,
    pub clone: Arc<DrillClone>,
    dir: PathBuf,
    check: Arc<Mutex<BaseCheck>>,
    stop_check: Arc<AtomicBool>,
    checker: Mutex<Option<tokio::task::JoinHandle<BaseCheck>>>,
}

/// What status shows of a running drill.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DrillView {
    pub id: String,
    pub export: String,
    pub point: u64,
    pub started_ms: u64,
    pub ready_ms: f64,
    pub bytes_written: u64,
    pub base_check: BaseCheck,
}

/// The site's drills, by volume.
#[derive(Default)]
pub struct Drills {
    running: Mutex<HashMap<String, Arc<Running>>>,
    /// Drill starts one at a time (a start checks, then inserts).
    start_lock: Mutex<()>,
}

impl Drills {
    /// The clone exported as `NAME@drill`, if that drill runs.
    pub fn export(&self, export: &str) -> Option<Arc<DrillClone>> {
        let name = export.strip_suffix(DRILL_SUFFIX)?;
        lock(&self.running).get(name).map(|r| r.clone.clone())
    }

    pub fn export_names(&self) -> Vec<String> {
        lock(&self.running)
            .keys()
            .map(|n| format!("{n}{DRILL_SUFFIX}"))
            .collect()
    }

    pub fn view(&self, volume: &str) -> Option<DrillView> {
        let r = lock(&self.running).get(volume).cloned()?;
        Some(DrillView {
            id: r.state.id.clone(),
            export: format!("{volume}{DRILL_SUFFIX}"),
            point: r.state.point,
            started_ms: r.state.started_ms,
            ready_ms: r.state.ready_ms,
            bytes_written: r.clone.bytes_written.load(Ordering::Relaxed),
            base_check: lock(&r.check).clone(),
        })
    }

    pub fn is_running(&self, volume: &str) -> bool {
        lock(&self.running).contains_key(volume)
    }
}

/// Starts a drill of `volume` on `point` (the newest when `None`).
pub fn start(
    site: &Arc<Site>,
    volume: &str,
    point: Option<u64>,
    by: Operator,
) -> Result<DrillState, String> {
    let t0 = Instant::now();
    let _one = lock(&site.drills.start_lock);
    let h = site
        .handle(volume)
        .ok_or_else(|| format!("no volume named {volume}; see `ferry volume list`"))?;
    if h.role() != Role::Replica {
        return Err(format!(
            "volume {volume} is primary at this site: a drill runs at the DR site, on a copy of a recovery point"
        ));
    }
    if site.drills.is_running(volume) {
        return Err(format!(
            "a drill of {volume} is running already (export {volume}{DRILL_SUFFIX}); end it with `ferry drill stop {volume}`"
        ));
    }
    // Choose and pin the point under the volume's io lock: no commit or
    // point can prune it in between.
    let p = {
        let _io = lock(&h.io);
        let points = state::list_points(&*site.store, volume).map_err(|e| e.to_string())?;
        let p = match point {
            Some(id) => points.iter().find(|p| p.id == id).cloned().ok_or_else(|| {
                format!("volume {volume} has no recovery point {id}; see `ferry points {volume}`")
            })?,
            None => points.last().cloned().ok_or_else(|| {
                format!(
                    "volume {volume} has no recovery point yet (its seed has not completed); see `ferry status {volume}`"
                )
            })?,
        };
        lock(&site.replica.drill_pins).insert((volume.to_string(), p.id));
        p
    };
    let unpin = || {
        lock(&site.replica.drill_pins).remove(&(volume.to_string(), p.id));
    };
    let dir = drill::drills_dir(&site.dir).join(volume);
    if dir.exists() {
        // A leftover the start-up cleanup did not get (it runs before any
        // drill can start, so this is a stray directory): clear it.
        let _ = std::fs::remove_dir_all(&dir);
    }
    let created = std::fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
        .and_then(|_| {
            let max = site
                .config
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .limits
                .drill_overlay_bytes_max
                .0;
            DrillClone::create(site.store.clone(), &p.root, &dir.join("clone.img"), max)
        });
    let clone = match created {
        Ok(c) => Arc::new(c),
        Err(e) => {
            unpin();
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    let started_ms = crate::util::now_unix_ms();
    let state = DrillState {
        id: format!("{volume}-{started_ms}"),
        volume: volume.to_string(),
        site: site.name(),
        point: p.id,
        point_root: p.root,
        point_created: p.created,
        point_source: p.source.clone(),
        size: crate::nbd::Export::size(&*clone),
        started_ms,
        ready_ms: 0.0,
        started_by: by,
    };
    let mut state = state;
    if let Err(e) = crate::util::write_atomic(
        &dir.join("drill.json"),
        &serde_json::to_vec_pretty(&state).unwrap_or_default(),
    ) {
        unpin();
        let _ = std::fs::remove_dir_all(&dir);
        return Err(format!("cannot record the drill in {}: {e}", dir.display()));
    }
    state.ready_ms = t0.elapsed().as_secs_f64() * 1000.0;
    // The content check of the base runs beside the drill.
    let check = Arc::new(Mutex::new(BaseCheck::default()));
    let stop_check = Arc::new(AtomicBool::new(false));
    let checker = {
        let (store, root, check, stop) = (
            site.store.clone(),
            p.root,
            check.clone(),
            stop_check.clone(),
        );
        tokio::task::spawn_blocking(move || {
            drill::check_base(&*store, &root, &|| stop.load(Ordering::Relaxed), &|c| {
                *lock(&check) = c.clone()
            })
        })
    };
    let running = Arc::new(Running {
        state: state.clone(),
        clone,
        dir,
        check,
        stop_check,
        checker: Mutex::new(Some(checker)),
    });
    lock(&site.drills.running).insert(volume.to_string(), running);
    tracing::info!(volume, drill = %state.id, point = p.id, ready_ms = state.ready_ms, by = %state.started_by, "drill started: clone exported as {volume}{DRILL_SUFFIX}");
    Ok(state)
}

/// Ends the drill of `volume`: the clone is withdrawn and discarded, the
/// report written. `abort` gives the reason when the drill did not end by
/// `ferry drill stop` (a forced failover, a shutdown).
pub async fn stop(
    site: &Arc<Site>,
    volume: &str,
    by: Operator,
    abort: Option<String>,
) -> Result<DrillReport, String> {
    let r = lock(&site.drills.running).remove(volume).ok_or_else(|| {
        format!("no drill of {volume} is running; start one with `ferry drill start {volume}`")
    })?;
    r.clone.revoke();
    if abort.is_some() {
        r.stop_check.store(true, Ordering::Relaxed);
    }
    let checker = lock(&r.checker).take();
    let check = match checker {
        Some(j) => match j.await {
            Ok(c) => c,
            Err(e) => BaseCheck {
                done: true,
                errors: vec![format!("the base check ended abnormally: {e}")],
                ..lock(&r.check).clone()
            },
        },
        None => lock(&r.check).clone(),
    };
    let now_ms = crate::util::now_unix_ms();
    let base_error = lock(&r.clone.base_error).clone();
    let (result, reason) = match (&abort, check.ok(), base_error) {
        (Some(why), ..) => (DrillResult::Aborted, Some(why.clone())),
        (None, true, None) => (DrillResult::Passed, None),
        (None, true, Some(e)) => (
            DrillResult::Failed,
            Some(format!("a read of the clone failed: {e}")),
        ),
        (None, false, _) => (
            DrillResult::Failed,
            Some(format!(
                "the base does not match the point's tree: {}",
                check.errors.join("; ")
            )),
        ),
    };
    let s = &r.state;
    let report = DrillReport {
        base_check: check,
        bytes_written: r.clone.bytes_written.load(Ordering::Relaxed),
        bytes_read: r.clone.bytes_read.load(Ordering::Relaxed),
        ..DrillReport::of(
            s,
            format!("{}{DRILL_SUFFIX}", s.volume),
            now_ms,
            by,
            result,
            reason,
        )
    };
    finish(site, &report)?;
    if let Err(e) = std::fs::remove_dir_all(&r.dir) {
        tracing::warn!(volume, dir = %r.dir.display(), error = %e, "cannot delete the drill's clone");
    }
    lock(&site.replica.drill_pins).remove(&(volume.to_string(), s.point));
    Ok(report)
}

/// Writes the report and counts the drill.
fn finish(site: &Site, report: &DrillReport) -> Result<(), String> {
    let path = drill::write_report(&site.dir, report)
        .map_err(|e| format!("cannot write the drill report: {e}"))?;
    let result = report.result.to_string();
    site.metrics
        .drills
        .with_label_values(&[&report.volume, &result])
        .inc();
    if report.result == DrillResult::Passed {
        site.metrics
            .last_successful_drill_timestamp
            .with_label_values(&[&report.volume])
            .set(report.stopped as f64);
    }
    let level_ok = report.result == DrillResult::Passed;
    if level_ok {
        tracing::info!(volume = %report.volume, drill = %report.id, report = %path.display(), "drill passed");
    } else {
        tracing::warn!(volume = %report.volume, drill = %report.id, result, reason = ?report.reason, report = %path.display(), "drill did not pass");
    }
    Ok(())
}

/// At start-up: a drill left by a daemon that stopped during it is recorded
/// as aborted and its clone deleted; the last passed drill of each volume
/// sets its gauge again.
pub fn recover(site: &Site) {
    let root = drill::drills_dir(&site.dir);
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.flatten() {
            let dir = e.path();
            if !dir.is_dir() || dir == drill::reports_dir(&site.dir) {
                continue;
            }
            let state = std::fs::read(dir.join("drill.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<DrillState>(&b).ok());
            match state {
                Some(s) => {
                    let report = DrillReport::of(
                        &s,
                        format!("{}{DRILL_SUFFIX}", s.volume),
                        crate::util::now_unix_ms(),
                        Operator::default(),
                        DrillResult::Aborted,
                        Some(
                            "the daemon stopped during the drill; its clone was discarded at the next start"
                                .into(),
                        ),
                    );
                    if let Err(e) = finish(site, &report) {
                        tracing::error!(volume = %s.volume, error = %e, "cannot record the aborted drill");
                        continue;
                    }
                }
                None => {
                    tracing::warn!(dir = %dir.display(), "a drill directory without a readable drill.json: deleted");
                }
            }
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::error!(dir = %dir.display(), error = %e, "cannot delete a leftover drill clone");
            }
        }
    }
    match drill::read_reports(&site.dir, None) {
        Ok(reports) => {
            for r in reports.iter().filter(|r| r.result == DrillResult::Passed) {
                site.metrics
                    .last_successful_drill_timestamp
                    .with_label_values(&[&r.volume])
                    .set(r.stopped as f64);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the drill reports"),
    }
}

/// Stops every running drill as aborted (the daemon stops).
pub async fn abort_all(site: &Arc<Site>, why: &str) {
    let names: Vec<String> = lock(&site.drills.running).keys().cloned().collect();
    for n in names {
        if let Err(e) = stop(site, &n, Operator::default(), Some(why.to_string())).await {
            tracing::error!(volume = %n, error = %e, "cannot end the drill");
        }
    }
}
