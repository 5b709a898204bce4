//! Failover: a forced promotion at the DR site, and what an old primary
//! does when it learns that it is behind (keep its divergent writes as a
//! pinned point, become the new primary's replica, be brought level by
//! tree comparison). The order of each step follows `FAILOVER.md`.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::Site;
use super::volume::VolumeHandle;
use crate::failover::drill::Operator;
use crate::failover::epoch::{EpochEntry, Fork, Gen, History};
use crate::hash::Hash;
use crate::store::Op;
use crate::store::state::{
    self, Mode, RecoveryPoint, Role, StreamRecord, SyncFallback, VolumeRecord,
};
use crate::store::tree::StoreNodes;

/// What `ferry failover` did.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailoverOutcome {
    Forced(ForcedReport),
    Planned(PlannedReport),
    Asserted(AssertedReport),
}

/// What `ferry failover --force` did at a site where the volume is primary
/// already and the peer is unreachable: the site asserts that it stays
/// primary (a new epoch of its own). Should the other site have been
/// promoted meanwhile, the histories fork: a split brain, shown at both
/// sites when the link returns, until `ferry resolve` names the winner.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AssertedReport {
    pub volume: String,
    pub site: String,
    pub epoch: u64,
    /// Seconds since this site last heard from its peer (`None`: not since
    /// the daemon started).
    pub last_contact_age_s: Option<u64>,
    pub took_ms: u64,
}

/// `ferry failover NAME --force` at a primary cut off from its peer.
pub async fn assert_primary(site: &Arc<Site>, name: &str) -> Result<AssertedReport, String> {
    let t0 = Instant::now();
    let h = site
        .handle(name)
        .ok_or_else(|| format!("no volume named {name}; see `ferry volume list`"))?;
    let rec = h.record();
    if rec.role != Role::Primary {
        return Err(format!(
            "volume {name} is a replica here: `--force` promotes it"
        ));
    }
    if site.link().is_some() {
        return Err(format!(
            "volume {name} is primary at this site already and the link to the peer is up; a forced failover promotes the DR copy, at the other site, when this one is unreachable"
        ));
    }
    if let Some(why) = &rec.fenced {
        return Err(format!(
            "volume {name} is fenced here ({why}): a fenced primary cannot assert that it stays primary"
        ));
    }
    if rec.split_brain || h.role_view().split_brain {
        return Err(format!(
            "volume {name} is in split brain already: `ferry resolve {name} --keep SITE`"
        ));
    }
    let Some(top) = rec.history.top().cloned() else {
        return Err(format!(
            "volume {name} has no epoch history here yet (its first seed has not begun)"
        ));
    };
    // The journal stops continuing the old epoch before the new one is
    // recorded: whatever the peer holds, it is brought level by a tree
    // comparison (or, in a split brain, after the resolve).
    if let Some(vs) = h.volume_stream() {
        vs.request_resync(
            "this site asserted that it stays primary while cut off (failover --force): the other site is brought level by a tree comparison",
        );
        if !h.record().stream.resync_needed && !vs.view().resync_running {
            return Err(format!(
                "cannot record that {name} needs a resync; see the daemon's log. Nothing was asserted"
            ));
        }
    }
    if top.site == site.name() && top.fork.is_some_and(|f| f.seq == 0 && f.root == Hash::ZERO) {
        // Asserted already, and not in step with the peer since: nothing new.
        return Ok(AssertedReport {
            volume: name.to_string(),
            site: site.name(),
            epoch: top.epoch,
            last_contact_age_s: site
                .last_contact()
                .map(|t| crate::util::now_unix().saturating_sub(t)),
            took_ms: t0.elapsed().as_millis() as u64,
        });
    }
    let epoch = rec.history.epoch().max(h.role_view().peer_epoch) + 1;
    h.assert_entry(EpochEntry {
        epoch,
        site: site.name(),
        generation: Gen::random(),
        fork: Some(Fork {
            epoch: top.epoch,
            seq: 0,
            checksum: 0,
            root: Hash::ZERO,
        }),
    })?;
    site.metrics
        .failovers
        .with_label_values(&[name, "asserted"])
        .inc();
    site.rehello();
    tracing::warn!(
        volume = name,
        epoch,
        "FORCED: this site asserts that it stays primary while cut off from its peer; if the peer was promoted too, the sites are in split brain when the link returns"
    );
    Ok(AssertedReport {
        volume: name.to_string(),
        site: site.name(),
        epoch,
        last_contact_age_s: site
            .last_contact()
            .map(|t| crate::util::now_unix().saturating_sub(t)),
        took_ms: t0.elapsed().as_millis() as u64,
    })
}

/// What `ferry failover --force` did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ForcedReport {
    pub volume: String,
    pub site: String,
    pub epoch: u64,
    /// "the replica image" or "recovery point N".
    pub promoted: String,
    /// The pinned point of the promoted state (the fork).
    pub point: RecoveryPoint,
    /// The last record of the old epoch in the promoted state.
    pub fork_seq: u64,
    /// Unix seconds the promoted state was current at the old primary (as
    /// far as this site knows: the last records received, or the point's time).
    pub state_time: u64,
    /// Its age now: the loss the operator accepted.
    pub state_age_s: u64,
    /// Sync mode with a consistent replica: every acknowledged flush is in
    /// the promoted state.
    pub rpo_zero: bool,
    /// Seconds since this site last heard from the old primary (`None`: not
    /// since the daemon started).
    pub last_contact_age_s: Option<u64>,
    /// Chunks rewritten in the image to bring it to a point.
    pub chunks_restored: u64,
    /// From the command to a writable export, milliseconds.
    pub took_ms: u64,
    pub drill_aborted: bool,
    /// Notes for the operator (a sync fallback changed, say).
    pub notes: Vec<String>,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// `ferry failover NAME --force [--point ID]` at the DR site.
pub async fn force(
    site: &Arc<Site>,
    name: &str,
    point: Option<u64>,
    by: &Operator,
) -> Result<ForcedReport, String> {
    let t0 = Instant::now();
    let h = site
        .handle(name)
        .ok_or_else(|| format!("no volume named {name}; see `ferry volume list`"))?;
    let rec = h.record();
    if rec.role == Role::Primary {
        return Err(format!(
            "volume {name} is primary at this site already; a forced failover promotes the DR copy (run it at the other site)"
        ));
    }
    if rec.history.is_empty() {
        return Err(format!(
            "volume {name} has no epoch history here yet (its first seed has not begun); nothing to promote"
        ));
    }
    // 1. No more records from the old primary: held first, then the link
    // checked (a primary that reconnects in between is refused either way).
    h.hold_peer_writes(Some("a forced failover is promoting this site".into()));
    if site.link().is_some() && !h.role_view().split_brain {
        h.hold_peer_writes(None);
        return Err(format!(
            "the primary of {name} is connected and streaming (the link is up): a forced promotion now would give the volume two primaries. Use `ferry failover {name} --planned` (zero loss); --force is for a primary that is unreachable"
        ));
    }
    // A commit admitted before the hold finishes before the state is read.
    let h2 = h.clone();
    let _ = tokio::task::spawn_blocking(move || h2.wait_for_image_writes()).await;
    let intake = h.replica_stream();
    if let Some(rs) = &intake {
        // Batches admitted before the hold: appended and known, or refused.
        rs.close_intake();
    }
    let release = |h: &VolumeHandle| {
        h.hold_peer_writes(None);
        if let Some(rs) = &intake {
            rs.reopen_intake();
        }
    };
    let mut drill_aborted = false;
    if site.drills.is_running(name) {
        drill_aborted = true;
        if let Err(e) = super::drills::stop(
            site,
            name,
            by.clone(),
            Some("a forced failover promoted the volume".into()),
        )
        .await
        {
            tracing::error!(volume = name, error = %e, "cannot end the drill");
        }
    }
    h.stop().await;
    let (s, h2, by2) = (site.clone(), h.clone(), by.clone());
    let prepared = tokio::task::spawn_blocking(move || prepare(&s, &h2, point, &by2))
        .await
        .map_err(err)
        .and_then(|r| r);
    let (ops, next, mut report) = match prepared {
        Ok(p) => p,
        Err(e) => {
            release(&h);
            h.start(site);
            return Err(e);
        }
    };
    crate::util::crash_point("force:point");
    // A journal of an earlier epoch at this site must not be replayed; the
    // redo log (its complete epochs applied) belongs to the old epoch.
    if let Err(e) = remove_dirs(&[site.journal_dir(name), site.replica.redo_dir.join(name)]) {
        release(&h);
        h.start(site);
        return Err(e);
    }
    crate::util::crash_point("force:dirs");
    // 5. Role, history and the pinned point in one batch; the gate opens
    // and the primary's jobs start.
    if let Err(e) = h.change_role(site, ops, next).await {
        release(&h);
        return Err(format!("cannot record the promotion: {e}"));
    }
    crate::util::crash_point("force:role");
    site.metrics
        .failovers
        .with_label_values(&[name, "forced"])
        .inc();
    site.rehello();
    report.drill_aborted = drill_aborted;
    report.took_ms = t0.elapsed().as_millis() as u64;
    tracing::warn!(volume = name, epoch = report.epoch, promoted = %report.promoted, state_age_s = report.state_age_s, rpo_zero = report.rpo_zero, "FORCED FAILOVER: this site is now primary and exports the volume writable");
    Ok(report)
}

/// Steps 2-4 (blocking): apply the durable flushes, choose the state, take
/// the pinned promotion point, and build the new record.
fn prepare(
    site: &Arc<Site>,
    h: &Arc<VolumeHandle>,
    point: Option<u64>,
    _by: &Operator,
) -> Result<(Vec<Op>, VolumeRecord, ForcedReport), String> {
    let name = h.name.clone();
    let side = &site.replica;
    let continuous = h.record().mode.continuous();
    let mut last_received = 0;
    // 2. Every complete flush epoch durable in the redo log.
    if continuous && h.record().committed.is_some() {
        let rs = super::replica_stream::ensure(side, h).map_err(err)?;
        rs.close_intake();
        rs.apply_durable(side, h).map_err(err)?;
        crate::util::crash_point("force:applied");
        last_received = rs.last_received();
    }
    let rec = h.record();
    let now = crate::util::now_unix();
    let consistent = state::consistent(&rec) && rec.committed.is_some();
    let mut ops = Vec::new();
    let mut chunks_restored = 0;
    // The last applied record's checksum names the fork when the image
    // itself is promoted (a point's state names no record).
    let fork_checksum = match point {
        None if consistent => rec.stream.applied_checksum,
        _ => 0,
    };
    // 3-4. The state, and its pinned point.
    let (promoted, p, fork_seq, state_time) = match point {
        None if consistent => {
            let p = if continuous {
                let rs = super::replica_stream::ensure(side, h).map_err(err)?;
                rs.promotion_point(side, h).map_err(err)?
            } else {
                let p = new_point(site, &rec, rec.committed.unwrap_or(Hash::ZERO), None)?;
                ops.push(state::put_point_op(&p));
                p
            };
            let t = if last_received > 0 {
                last_received
            } else {
                // A snapshot replica holds its last pass: the newest point of
                // that root (taken when the pass committed).
                state::list_points(&*site.store, &name)
                    .map_err(err)?
                    .iter()
                    .rev()
                    .find(|q| Some(q.root) == rec.committed && q.pinned.is_none())
                    .map(|q| q.created)
                    .unwrap_or(p.created)
            };
            let seq = rec.stream.applied_seq;
            ("the replica image".to_string(), p, seq, t)
        }
        _ => {
            let points = state::list_points(&*site.store, &name).map_err(err)?;
            let from = match point {
                Some(id) => points.iter().find(|p| p.id == id).cloned().ok_or_else(|| {
                    format!("volume {name} has no recovery point {id}; see `ferry points {name}`")
                })?,
                None => points.last().cloned().ok_or_else(|| {
                    format!(
                        "the replica of {name} is not consistent (a resync or a commit was in progress) and there is no recovery point: nothing safe to promote"
                    )
                })?,
            };
            let _io = h.io.lock().unwrap_or_else(|p| p.into_inner());
            // Durably first: the image no longer matches the record. A crash
            // in the rewrite finishes it at the next start (as an
            // interrupted commit), leaves the replica inconsistent, and makes
            // any stream from the old primary resync; the failover is run again.
            h.update(true, |r| {
                r.applying = Some(from.root);
                r.committed = None;
                r.stream.source = 0;
                r.stream.resync_from = None;
                r.stream.inconsistent_until = Some(u64::MAX);
            })
            .map_err(err)?;
            chunks_restored =
                super::restore::restore_in_place(&*site.store, &from.root, &rec.path, side.fsync)
                    .map_err(err)?;
            let p = new_point(site, &rec, from.root, Some(from.id))?;
            ops.push(state::put_point_op(&p));
            (
                format!("recovery point {}", from.id),
                p,
                from.seq.unwrap_or(0),
                from.created,
            )
        }
    };
    // The new generation.
    let old_top = rec.history.top().cloned();
    let epoch = rec.history.epoch() + 1;
    let mut history = rec.history.clone();
    history.push(EpochEntry {
        epoch,
        site: site.name(),
        generation: Gen::random(),
        fork: old_top.map(|t| Fork {
            epoch: t.epoch,
            seq: fork_seq,
            checksum: fork_checksum,
            root: p.root,
        }),
    });
    let mut notes = Vec::new();
    let mut stream = StreamRecord {
        resync_needed: continuous,
        resync_reason: if continuous {
            "promoted by a forced failover: the other site is brought level by a tree comparison"
                .into()
        } else {
            String::new()
        },
        sync_wait_ms: rec.stream.sync_wait_ms,
        sync_fallback: rec.stream.sync_fallback,
        ..Default::default()
    };
    if rec.mode == Mode::Sync && stream.sync_fallback == SyncFallback::Fail {
        stream.sync_fallback = SyncFallback::Degrade;
        notes.push(
            "sync fallback set to degrade: with the old primary gone, every flush would otherwise fail; RPO 0 returns once the other site is level again".into(),
        );
    }
    let next = VolumeRecord {
        role: Role::Primary,
        interval_ms: if rec.interval_ms == 0 {
            30_000
        } else {
            rec.interval_ms
        },
        size: p.size,
        committed: None,
        applying: None,
        last_pass: None,
        stream,
        history,
        fenced: None,
        split_brain: false,
        ..rec.clone()
    };
    let last_contact_age_s = site.last_contact().map(|t| now.saturating_sub(t));
    let report = ForcedReport {
        volume: name.clone(),
        site: site.name(),
        epoch,
        promoted,
        point: p,
        fork_seq,
        state_time,
        state_age_s: now.saturating_sub(state_time),
        rpo_zero: rec.mode == Mode::Sync && consistent && point.is_none(),
        last_contact_age_s,
        chunks_restored,
        took_ms: 0,
        drill_aborted: false,
        notes,
    };
    Ok((ops, next, report))
}

/// A pinned point of `root` (the promotion's fork).
fn new_point(
    site: &Site,
    rec: &VolumeRecord,
    root: Hash,
    from: Option<u64>,
) -> Result<RecoveryPoint, String> {
    let points = state::list_points(&*site.store, &rec.name).map_err(err)?;
    let size = crate::store::tree::root_shape(&StoreNodes(&*site.store), &root)
        .map(|s| s.0)
        .unwrap_or(rec.size);
    Ok(RecoveryPoint {
        id: points.last().map(|p| p.id + 1).unwrap_or(1),
        volume: rec.name.clone(),
        root,
        created: crate::util::trusted_now_unix(),
        size,
        source: match from {
            Some(id) => format!("promotion (from point {id})"),
            None => "promotion".into(),
        },
        seq: None,
        pinned: Some("promotion".into()),
    })
}

/// The old primary learnt it is behind (its peer holds a newer epoch): with
/// its gate closed, it keeps its own state as a pinned `divergent` point,
/// drops its journal and becomes the new primary's replica, to be brought
/// level by tree comparison (only differing chunks travel). A job body: on
/// error it is retried; the volume stays fenced meanwhile.
pub async fn become_replica(
    site: Arc<Site>,
    h: Arc<VolumeHandle>,
    ahead: History,
) -> Result<(), String> {
    {
        let rec = h.record();
        if rec.role == Role::Replica && !rec.split_brain && rec.behind_of.is_none() {
            if rec.history.relation(&ahead) == crate::failover::epoch::Relation::LocalBehind {
                // Its primary asserted a new epoch while cut off (`failover
                // --force` at a primary): nothing diverged here.
                return replica_behind(site, h, ahead).await;
            }
            return Ok(());
        }
    }
    if !h.record().mode.continuous() {
        // Its writers reach the image directly, not through the gate: it
        // is not scanned or overwritten while they may run. It stays fenced.
        tracing::error!(volume = %h.name, epoch = ahead.epoch(), "this snapshot-mode volume is behind its peer and stays fenced: its writers reach the image directly, so ferry does not scan or overwrite it. Stop them, save the image if it holds writes you need, and protect it again from the new primary");
        return Ok(());
    }
    h.gate
        .close("this site is behind its peer: it becomes its replica");
    if h.role() == Role::Primary && h.volume_stream().is_none() {
        // Every journaled write must be in the image before it is captured:
        // opening the journal replays it.
        let (s, h2) = (site.clone(), h.clone());
        tokio::task::spawn_blocking(move || s.open_volume_stream(&h2))
            .await
            .map_err(err)??;
    }
    h.stop().await;
    image_durable_before_journal_goes(&h).await?;
    let (s, h2) = (site.clone(), h.clone());
    let (ops, next, point) = tokio::task::spawn_blocking(move || capture(&s, &h2, &ahead))
        .await
        .map_err(err)??;
    crate::util::crash_point("capture:point");
    remove_dirs(&[
        site.journal_dir(&h.name),
        site.replica.redo_dir.join(&h.name),
    ])?;
    h.change_role(&site, ops, next).await.map_err(err)?;
    tracing::warn!(volume = %h.name, point = point.id, root = %point.root.short(), "this site's writes since the fork are kept as pinned recovery point {} (divergent); the volume is now a replica of its peer and is brought level by tree comparison", point.id);
    site.rehello();
    Ok(())
}

/// A replica whose primary asserted a new epoch while they were apart: it
/// wrote nothing of its own, so it keeps its image as a plain point (the
/// base of the tree comparison; retention prunes it as any other), takes
/// the new history and is brought level by a tree comparison.
async fn replica_behind(
    site: Arc<Site>,
    h: Arc<VolumeHandle>,
    ahead: History,
) -> Result<(), String> {
    if !state::consistent(&h.record()) {
        return Err(format!(
            "volume {} was mid-resync here when {} asserted epoch {}: its image is no state of the volume to take a tree comparison from; remove the volume at this site and protect it again from the primary",
            h.name,
            ahead.top().map(|e| e.site.as_str()).unwrap_or("?"),
            ahead.epoch()
        ));
    }
    h.stop().await;
    let (s, h2, a) = (site.clone(), h.clone(), ahead.clone());
    let (next, point) = tokio::task::spawn_blocking(move || {
        let continuous = h2.record().mode.continuous();
        if continuous && h2.record().committed.is_some() {
            // Every complete flush epoch durable in the redo log first: in
            // sync mode they were acknowledged, and the redo log goes below.
            let rs = super::replica_stream::ensure(&s.replica, &h2).map_err(err)?;
            rs.close_intake();
            rs.apply_durable(&s.replica, &h2).map_err(err)?;
        }
        let _io = h2.io.lock().unwrap_or_else(|p| p.into_inner());
        if !state::consistent(&h2.record()) {
            return Err(format!(
                "volume {} is not consistent here after its redo log was applied; it cannot take a tree comparison from its primary's new epoch",
                h2.name
            ));
        }
        let rec = h2.record();
        let point = scan_to_point(
            &s,
            &h2,
            format!(
                "replica: its state in epoch {}, before {} asserted epoch {}",
                rec.history.epoch(),
                a.top().map(|e| e.site.as_str()).unwrap_or("?"),
                a.epoch()
            ),
            None,
        )?;
        let stream = StreamRecord {
            // Not a state of the new lineage until the resync's commit (a
            // snapshot replica's next pass replaces it whole, as always).
            inconsistent_until: continuous.then_some(u64::MAX),
            ..Default::default()
        };
        Ok::<_, String>((replica_record(rec, &point, a, stream), point))
    })
    .await
    .map_err(err)??;
    // Records of the old epoch not applied yet: the resync carries them.
    remove_dirs(&[site.replica.redo_dir.join(&h.name)])?;
    h.change_role(&site, Vec::new(), next).await.map_err(err)?;
    tracing::warn!(volume = %h.name, point = point.id, epoch = ahead.epoch(), "the primary asserted a new epoch: this replica kept its image as point {} and is brought level by tree comparison", point.id);
    site.rehello();
    Ok(())
}

/// Scans the image into the store and records it as a point (`pinned`
/// when given), durably, under the collection lock (blocking). Nothing may
/// write the image meanwhile: the caller closed the gate and stopped the jobs.
fn scan_to_point(
    site: &Site,
    h: &VolumeHandle,
    source: String,
    pinned: Option<&str>,
) -> Result<RecoveryPoint, String> {
    let rec = h.record();
    let _gc = site
        .replica
        .gc_lock
        .read()
        .unwrap_or_else(|p| p.into_inner());
    // The point becomes the state the image holds from here on (a
    // replica's `committed`, a base nothing writes again): durably, first.
    // A replica's applies do not fsync it (its points do).
    let f = std::fs::File::open(&rec.path).map_err(err)?;
    if site.replica.fsync {
        crate::volume::image::sync(&f, &rec.path).map_err(err)?;
    }
    let progress = std::sync::atomic::AtomicU64::new(0);
    let (tree, _) =
        crate::volume::image::scan(&rec.path, rec.chunk_size, &progress).map_err(err)?;
    // Chunks first, then nodes and the point in one batch.
    for (i, leaf) in tree.leaves().iter().enumerate() {
        if leaf.is_zero() || site.store.has_chunk(leaf).map_err(err)? {
            continue;
        }
        let data = crate::volume::image::read_chunk(&f, &rec.path, &tree, i as u64).map_err(err)?;
        if crate::hash::Hash::of_chunk(&data) != *leaf {
            return Err(format!(
                "chunk {i} of {} changed while it was captured; nothing may write it now",
                rec.path.display()
            ));
        }
        site.store.put_chunk(leaf, &data).map_err(err)?;
    }
    let mut ops = tree.node_ops();
    let points = state::list_points(&*site.store, &rec.name).map_err(err)?;
    let point = RecoveryPoint {
        id: points.last().map(|p| p.id + 1).unwrap_or(1),
        volume: rec.name.clone(),
        root: tree.root,
        created: crate::util::trusted_now_unix(),
        size: tree.size,
        source,
        seq: None,
        pinned: pinned.map(str::to_string),
    };
    ops.push(state::put_point_op(&point));
    site.store.apply(ops, true).map_err(err)?;
    Ok(point)
}

/// Keeps this site's state as a pinned `divergent` point and builds the
/// replica's record (blocking). The point is durable before the role
/// changes in the next batch: a crash in between leaves the volume fenced
/// with its point kept, and the next Hello captures again (a second
/// divergent point, nothing lost).
fn capture(
    site: &Site,
    h: &VolumeHandle,
    ahead: &History,
) -> Result<(Vec<Op>, VolumeRecord, RecoveryPoint), String> {
    let rec = h.record();
    let epoch = rec.history.epoch();
    // A planned hand-over whose answer was lost: nothing diverged if the
    // new epoch forked exactly at the handed-over record.
    let handed_over = rec.handoff.is_some_and(|n| {
        ahead
            .0
            .iter()
            .any(|e| e.fork.is_some_and(|f| f.epoch == epoch && f.seq == n))
    });
    let point = if handed_over {
        scan_to_point(
            site,
            h,
            format!(
                "switchover: the state handed over at record {} of epoch {epoch}",
                rec.handoff.unwrap_or(0)
            ),
            None,
        )?
    } else {
        scan_to_point(
            site,
            h,
            format!(
                "divergent: this site's state in epoch {epoch}, set aside when {} took over with epoch {}",
                ahead.top().map(|e| e.site.as_str()).unwrap_or("?"),
                ahead.epoch()
            ),
            Some("divergent"),
        )?
    };
    let stream = StreamRecord {
        // Not a state of the new lineage until the resync's commit.
        inconsistent_until: Some(u64::MAX),
        ..Default::default()
    };
    let next = replica_record(rec, &point, ahead.clone(), stream);
    Ok((Vec::new(), next, point))
}

/// The record of a volume that becomes the replica of `history`'s primary,
/// its image being the state of `point`.
fn replica_record(
    rec: VolumeRecord,
    point: &RecoveryPoint,
    history: History,
    stream: StreamRecord,
) -> VolumeRecord {
    VolumeRecord {
        role: Role::Replica,
        size: point.size,
        committed: Some(point.root),
        applying: None,
        last_pass: None,
        stream,
        history,
        fenced: None,
        split_brain: false,
        handoff: None,
        handoff_checksum: 0,
        behind_of: None,
        ..rec
    }
}

/// What `ferry failover --planned` did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlannedReport {
    pub volume: String,
    /// The site that is primary now.
    pub new_primary: String,
    pub epoch: u64,
    /// The last record of the old epoch, applied at the new primary.
    pub handed_over_at: u64,
    /// From the gate closing here to the new primary's export being writable.
    pub downtime_ms: u64,
    /// NBD clients that were connected and were disconnected.
    pub clients_disconnected: usize,
    /// This site's state at the hand-over, kept as a point here (the base
    /// of its replica from now on).
    pub point: RecoveryPoint,
}

/// How far behind a volume may be for a planned switchover to begin.
const PLANNED_LAG_MAX_S: f64 = 5.0;
/// How long the primary waits for the DR side to hold every record.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long the primary waits for the DR side's answer to `Promote`.
const PROMOTE_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// `ferry failover NAME --planned` at the primary: zero loss by
/// construction. Writes stop, the journal drains, the DR side confirms it
/// applied through the last record and promotes itself; this site becomes
/// its replica, fed from the new primary's journal (no resync).
pub async fn planned(
    site: &Arc<Site>,
    name: &str,
    (disconnect_clients, workload_stopped): (bool, bool),
) -> Result<PlannedReport, String> {
    let h = site
        .handle(name)
        .ok_or_else(|| format!("no volume named {name}; see `ferry volume list`"))?;
    let rec = h.record();
    if rec.role != Role::Primary {
        return Err(format!(
            "volume {name} is a replica here; run `ferry failover {name} --planned` at its primary"
        ));
    }
    if let Some(n) = rec.handoff {
        // A hand-over in doubt: ask again. A promoted DR side answers as it
        // did; one that was not promoted promotes now or refuses.
        if site.link().is_none() {
            return Err(format!(
                "the hand-over of {name} at record {n} is in doubt and the DR site is not connected: this site stays fenced"
            ));
        }
        let peer = site.peer_label();
        let last = (rec.history.epoch(), n, rec.handoff_checksum);
        let root = match rec.mode.continuous() {
            true => Hash::ZERO,
            false => rec.last_pass.as_ref().map(|p| p.root).unwrap_or(Hash::ZERO),
        };
        return hand_over(site, &h, &peer, last, root, Instant::now(), 0).await;
    }
    if !rec.mode.continuous() {
        if !workload_stopped {
            return Err(format!(
                "volume {name} is in snapshot mode: its writers reach the image directly, so ferry cannot stop them; stop them (shut the VM down), then run `ferry failover {name} --planned --workload-stopped`: a last pass must then find the image unchanged"
            ));
        }
        return planned_snapshot(site, h, disconnect_clients).await;
    }
    if let Some(why) = h.gate.closed_because() {
        return Err(format!("volume {name} takes no writes here now: {why}"));
    }
    if site.link().is_none() {
        return Err(format!(
            "the DR site is not connected; a planned switchover needs it (for a disaster: `ferry failover {name} --force` at the DR site)"
        ));
    }
    let vs = h
        .volume_stream()
        .ok_or_else(|| "the volume's journal is not open; see `ferry status`".to_string())?;
    let v = vs.view();
    if v.resync_needed || v.resync_running {
        return Err(format!(
            "volume {name} is resyncing ({}): wait until `ferry status {name}` says streaming",
            v.resync_reason
        ));
    }
    if !h.replicating() {
        return Err(format!(
            "replication of {name} is paused: {}",
            h.role_view().peer_relation
        ));
    }
    if v.degraded || v.lag_seconds > PLANNED_LAG_MAX_S {
        return Err(format!(
            "volume {name} lags the DR site by {:.1} s{}: wait until it has caught up",
            v.lag_seconds,
            if v.degraded { " (sync degraded)" } else { "" }
        ));
    }
    let clients = clients_allowed(&h, disconnect_clients)?;
    let peer = site.peer_label();
    // Writes stop (those in progress finish first), then everything written
    // is sealed with a flush record and must reach the DR side.
    let t0 = Instant::now();
    let handing_over = close_for_hand_over(&h, &peer);
    let reopen = |h: &VolumeHandle, why: String| reopen_after(h, &handing_over, why);
    let vs2 = vs.clone();
    let (n, checksum) = match tokio::task::spawn_blocking(move || vs2.seal()).await {
        Ok(Ok(sealed)) => sealed,
        Ok(Err(e)) => return Err(reopen(&h, format!("cannot seal the journal: {e}"))),
        Err(e) => return Err(reopen(&h, format!("cannot seal the journal: {e}"))),
    };
    let deadline = Instant::now() + DRAIN_WAIT;
    loop {
        let v = vs.view();
        if v.resync_needed || v.resync_running {
            return Err(reopen(
                &h,
                "the stream fell back to a resync while draining".to_string(),
            ));
        }
        if v.acked_seq >= n {
            break;
        }
        if Instant::now() > deadline {
            return Err(reopen(
                &h,
                format!(
                    "the DR site did not confirm record {n} within {}s",
                    DRAIN_WAIT.as_secs()
                ),
            ));
        }
        vs.wake.notify_one();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // The hand-over is recorded durably before Promote is sent: if the
    // answer is lost, this site stays fenced until it learns the outcome.
    let epoch = rec.history.epoch();
    let fence = format!(
        "handed over to {peer} at record {n} of epoch {epoch} (planned switchover); fenced until the outcome is known"
    );
    // Fence and hand-over in one durable write, then the gate and machine.
    h.update(true, |r| {
        r.fenced = Some(fence.clone());
        r.handoff = Some(n);
        r.handoff_checksum = checksum;
    })
    .map_err(err)?;
    h.demote(&fence)?;
    crate::util::crash_point("planned:handoff");
    hand_over(
        site,
        &h,
        &peer,
        (epoch, n, checksum),
        Hash::ZERO,
        t0,
        clients,
    )
    .await
}

/// NBD clients still connected: refused unless they may be cut off.
fn clients_allowed(h: &VolumeHandle, disconnect_clients: bool) -> Result<usize, String> {
    let clients = h.nbd_clients();
    if clients > 0 && !disconnect_clients {
        return Err(format!(
            "{clients} NBD client(s) are connected to {}: stop their VMs first, or pass --disconnect-clients",
            h.name
        ));
    }
    Ok(clients)
}

/// A planned switchover closes the gate for its hand-over; returns why.
fn close_for_hand_over(h: &VolumeHandle, peer: &str) -> String {
    let why = format!("planned switchover to {peer}: handing over");
    h.gate.close(&why);
    why
}

/// The switchover is off: only the hand-over's own closing of the gate is
/// undone (a fence a Hello set meanwhile, a newer epoch, stays).
fn reopen_after(h: &VolumeHandle, handing_over: &str, why: String) -> String {
    if h.gate.closed_because().as_deref() == Some(handing_over) {
        h.gate.open();
        format!("{why}; the switchover did not happen and writes are taken again")
    } else {
        format!("{why}; the switchover did not happen")
    }
}

/// How long the last pass of a snapshot-mode switchover may take.
const LAST_PASS_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// A planned switchover of a snapshot-mode volume whose writers the
/// operator stopped: the gate closes (NBD writes stop), a last pass runs and
/// must find nothing changing while it reads (else the writers are not
/// stopped, and the switchover is off); the DR site then holds exactly the
/// image, and is promoted if its committed state is that pass's root.
async fn planned_snapshot(
    site: &Arc<Site>,
    h: Arc<VolumeHandle>,
    disconnect_clients: bool,
) -> Result<PlannedReport, String> {
    let name = h.name.clone();
    if let Some(why) = h.gate.closed_because() {
        return Err(format!("volume {name} takes no writes here now: {why}"));
    }
    if site.link().is_none() {
        return Err(format!(
            "the DR site is not connected; a planned switchover needs it (for a disaster: `ferry failover {name} --force` at the DR site)"
        ));
    }
    if !h.replicating() {
        return Err(format!(
            "replication of {name} is paused: {}",
            h.role_view().peer_relation
        ));
    }
    let clients = clients_allowed(&h, disconnect_clients)?;
    let peer = site.peer_label();
    let t0 = Instant::now();
    let handing_over = close_for_hand_over(&h, &peer);
    let reopen = |why: String| reopen_after(&h, &handing_over, why);
    // The last pass starts after the gate closed.
    let wait_for = h.run.trigger_pass();
    let deadline = Instant::now() + LAST_PASS_WAIT;
    let (error, report) = loop {
        {
            let st = h.run.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.finished >= wait_for {
                break (st.last_error.clone(), st.last_report.clone());
            }
        }
        if Instant::now() > deadline {
            return Err(reopen(format!(
                "the last pass did not end within {}s",
                LAST_PASS_WAIT.as_secs()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let report = match (error, report) {
        (Some(e), _) => return Err(reopen(format!("the last pass failed: {e}"))),
        (None, None) => return Err(reopen("the last pass left no report".into())),
        (None, Some(r)) if r.chunks_changed_during > 0 => {
            return Err(reopen(format!(
                "the image changed while the last pass read it ({} chunks): its writers are not stopped",
                r.chunks_changed_during
            )));
        }
        (None, Some(r)) => r,
    };
    let epoch = h.record().history.epoch();
    let fence = format!(
        "handed over to {peer} at its last pass (root {}) of epoch {epoch} (planned switchover); fenced until the outcome is known",
        report.root
    );
    h.update(true, |r| {
        r.fenced = Some(fence.clone());
        r.handoff = Some(0);
        r.handoff_checksum = 0;
    })
    .map_err(err)?;
    h.demote(&fence)?;
    hand_over(site, &h, &peer, (epoch, 0, 0), report.root, t0, clients).await
}

/// Sends `Promote` for the last record, `(epoch, n, checksum)`, or for a
/// snapshot-mode volume its last pass's `root` (the volume is fenced with
/// its hand-over recorded) and, once the DR side is primary, makes this
/// site its replica. A refusal lifts the fence; a lost or busy answer
/// leaves it (in doubt: `ferry failover --planned` asks again).
async fn hand_over(
    site: &Arc<Site>,
    h: &Arc<VolumeHandle>,
    peer: &str,
    (epoch, n, checksum): (u64, u64, u64),
    root: Hash,
    t0: Instant,
    clients: usize,
) -> Result<PlannedReport, String> {
    let name = h.name.as_str();
    let _marked = HandingOver::mark(site, name);
    // The link as it is now: the drain may have outlived the connection
    // the switchover began on.
    let Some(conn) = site.link() else {
        return Err(format!(
            "IN DOUBT: the link to {peer} went down before the hand-over was sent; this site stays fenced: run `ferry failover {name} --planned` again once it is back"
        ));
    };
    let req = crate::proto::messages::Request::Promote {
        volume: name.to_string(),
        epoch,
        seq: n,
        checksum,
        root,
    };
    let answer = tokio::time::timeout(
        PROMOTE_WAIT,
        crate::transport::endpoint::call(&conn, &req, site.frame_bytes_max()),
    )
    .await;
    let (history, incarnation, next_seq) = match answer {
        Ok(Ok((
            crate::proto::messages::Response::Promoted {
                history,
                incarnation,
                next_seq,
            },
            _,
        ))) => {
            history
                .check()
                .map_err(|e| format!("the DR site answered with a bad history: {e}"))?;
            (history, incarnation, next_seq)
        }
        Ok(Ok((
            crate::proto::messages::Response::Error {
                code: crate::proto::messages::ErrorCode::Busy,
                message,
            },
            _,
        ))) => {
            return Err(format!(
                "IN DOUBT: {peer} is busy with the promotion ({message}); this site stays fenced: run `ferry failover {name} --planned` again to learn the outcome"
            ));
        }
        Ok(Ok((crate::proto::messages::Response::Error { code, message }, _))) => {
            // The DR side refused before promoting anything: the hand-over is off.
            h.unfence();
            return Err(format!(
                "the DR site refused the promotion ({code:?}): {message}; the switchover did not happen and writes are taken again"
            ));
        }
        Ok(Ok((other, _))) => {
            return Err(format!(
                "IN DOUBT: the DR site answered {other:?}; this site stays fenced until the sites' histories settle it"
            ));
        }
        Ok(Err(e)) => {
            return Err(format!(
                "IN DOUBT: the hand-over was sent but the answer was lost ({e}); this site stays fenced and never reopens on a guess: when the link returns, the histories say whether {peer} was promoted"
            ));
        }
        Err(_) => {
            return Err(format!(
                "IN DOUBT: no answer from {peer} within {}s; this site stays fenced until the histories settle it",
                PROMOTE_WAIT.as_secs()
            ));
        }
    };
    let downtime_ms = t0.elapsed().as_millis() as u64;
    crate::util::crash_point("planned:promoted");
    let new_epoch = history.epoch();
    let peer = peer.to_string();
    // This site becomes the new primary's replica: its image is the state
    // at record n; the local scan gives the replica its base tree (no wire
    // traffic), and the new primary's journal feeds it from `next_seq`.
    h.stop().await;
    image_durable_before_journal_goes(h).await?;
    let (s, h2) = (site.clone(), h.clone());
    let mut point = tokio::task::spawn_blocking(move || {
        scan_to_point(
            &s,
            &h2,
            format!("switchover: the state handed over at record {n} of epoch {epoch}"),
            None,
        )
    })
    .await
    .map_err(err)??;
    if root != Hash::ZERO && point.root != root {
        // Snapshot mode: the image is not the last pass's state, so a
        // writer ran after it. Its writes are kept, pinned, before the new
        // primary's passes overwrite the image.
        point.pinned = Some("divergent".into());
        site.store
            .apply(vec![state::put_point_op(&point)], true)
            .map_err(err)?;
        tracing::warn!(volume = %h.name, point = point.id, "the image changed after the last pass of the switchover (its writers were not stopped): those writes are kept as pinned divergent point {}", point.id);
    }
    let stream = StreamRecord {
        source: incarnation,
        base_seq: next_seq.saturating_sub(1),
        applied_seq: next_seq.saturating_sub(1),
        ..Default::default()
    };
    let next = replica_record(h.record(), &point, history, stream);
    // The old journal (handed over) and any redo log of an earlier epoch
    // go before the replica's jobs can open them.
    remove_dirs(&[site.journal_dir(name), site.replica.redo_dir.join(name)])?;
    h.change_role(site, Vec::new(), next).await.map_err(err)?;
    let name = name.to_string();
    let name = name.as_str();
    site.metrics
        .failovers
        .with_label_values(&[name, "planned"])
        .inc();
    site.rehello();
    tracing::warn!(volume = name, new_primary = %peer, epoch = new_epoch, record = n, downtime_ms, "PLANNED SWITCHOVER: the volume is primary at {peer} now; this site is its replica");
    Ok(PlannedReport {
        volume: name.to_string(),
        new_primary: peer,
        epoch: new_epoch,
        handed_over_at: n,
        downtime_ms,
        clients_disconnected: clients,
        point,
    })
}

/// The DR side of a planned switchover: promotes itself if the last record
/// it applied is record `seq` of `epoch` with `checksum` (the primary
/// stopped writes and saw them durable here), with no resync either way.
pub async fn promote_planned(
    site: &Arc<Site>,
    name: &str,
    (epoch, seq, checksum): (u64, u64, u64),
    root: Hash,
) -> crate::proto::messages::Response {
    use crate::proto::messages::{ErrorCode, Response};
    if let Err(e) = crate::proto::messages::check_volume_name(name) {
        return Response::error(ErrorCode::Malformed, e);
    }
    let Some(h) = site.handle(name) else {
        return Response::error(ErrorCode::Unknown, format!("volume {name} is unknown here"));
    };
    let rec = h.record();
    if rec.role == Role::Primary
        && let Some(top) = rec.history.top()
        && top.site == site.name()
        && top.fork.is_some_and(|f| {
            // A snapshot-mode hand-over (no records) is named by its root.
            f.epoch == epoch
                && f.seq == seq
                && f.checksum == checksum
                && (seq != 0 || f.root == root)
        })
    {
        // Promoted by this very hand-over already (the answer was lost).
        return match h.volume_stream() {
            Some(vs) => Response::Promoted {
                history: rec.history.clone(),
                incarnation: vs.incarnation(),
                next_seq: vs.first_seq(),
            },
            None => Response::Promoted {
                history: rec.history.clone(),
                incarnation: 0,
                next_seq: 1,
            },
        };
    }
    if rec.role != Role::Replica {
        return Response::error(
            ErrorCode::Refused,
            format!("volume {name} is not a replica here"),
        );
    }
    if h.peer_writes_held() {
        return Response::error(
            ErrorCode::Busy,
            format!("a promotion of {name} is in progress here"),
        );
    }
    if rec.history.epoch() != epoch {
        return Response::error(
            ErrorCode::StaleEpoch,
            format!(
                "this site holds epoch {} of {name}, not {epoch}",
                rec.history.epoch()
            ),
        );
    }
    if let Err(r) = h.admit_peer_write() {
        return Response::error(super::volume::refusal_code(&r), r.to_string());
    }
    let by = crate::failover::drill::Operator {
        said: Some("the primary (planned switchover)".into()),
        ..Default::default()
    };
    let r = site
        .audited(
            "promote (planned)",
            name,
            &by,
            serde_json::json!({ "epoch": epoch, "seq": seq, "checksum": format!("{checksum:016x}"), "root": root.to_string() }),
            async {
                if rec.mode.continuous() {
                    promote_planned_steps(site, &h, (epoch, seq, checksum)).await
                } else {
                    promote_snapshot_steps(site, &h, epoch, root).await
                }
            },
        )
        .await;
    match r {
        Ok(resp) => resp,
        Err(e) => Response::error(ErrorCode::Refused, e),
    }
}

async fn promote_planned_steps(
    site: &Arc<Site>,
    h: &Arc<VolumeHandle>,
    (epoch, seq, checksum): (u64, u64, u64),
) -> Result<crate::proto::messages::Response, String> {
    let name = h.name.clone();
    h.hold_peer_writes(Some("a planned switchover is promoting this site".into()));
    let rs = {
        let (s, h2) = (site.clone(), h.clone());
        tokio::task::spawn_blocking(move || super::replica_stream::ensure(&s.replica, &h2))
            .await
            .map_err(err)?
            .map_err(err)
    };
    let rs = match rs {
        Ok(rs) => rs,
        Err(e) => {
            h.hold_peer_writes(None);
            return Err(e);
        }
    };
    rs.close_intake();
    end_drill(site, &name).await;
    h.stop().await;
    let (s, h2, rs2) = (site.clone(), h.clone(), rs.clone());
    let prepared = tokio::task::spawn_blocking(move || -> Result<RecoveryPoint, String> {
        let applied = rs2.apply_durable(&s.replica, &h2).map_err(err)?;
        if applied != seq || !state::consistent(&h2.record()) {
            return Err(format!(
                "this site applied through record {applied}, not {seq}: the switchover cannot be zero-loss"
            ));
        }
        let have = h2.record().stream.applied_checksum;
        if have != checksum {
            return Err(format!(
                "record {seq} applied here has checksum {have:016x}, the primary's has {checksum:016x}: not the same record, so the switchover cannot be zero-loss"
            ));
        }
        let p = rs2.promotion_point(&s.replica, &h2).map_err(err)?;
        crate::util::crash_point("promote:point");
        Ok(p)
    })
    .await
    .map_err(err)
    .and_then(|r| r);
    let p = match prepared {
        Ok(p) => p,
        Err(e) => {
            rs.reopen_intake();
            h.hold_peer_writes(None);
            h.start(site);
            return Err(e);
        }
    };
    let (history, next) = promoted_record(
        site,
        h.record(),
        Fork {
            epoch,
            seq,
            checksum,
            root: p.root,
        },
    );
    // A journal of an earlier epoch must not be replayed, and the redo
    // log (applied through `seq`) belongs to the old epoch: both go first.
    if let Err(e) = remove_dirs(&[site.journal_dir(&name), site.replica.redo_dir.join(&name)]) {
        rs.reopen_intake();
        h.hold_peer_writes(None);
        h.start(site);
        return Err(e);
    }
    crate::util::crash_point("promote:dirs");
    if let Err(e) = h.change_role(site, Vec::new(), next).await {
        rs.reopen_intake();
        h.hold_peer_writes(None);
        return Err(format!("cannot record the promotion: {e}"));
    }
    crate::util::crash_point("promote:role");
    let (incarnation, next_seq) = match h.volume_stream() {
        Some(vs) => (vs.incarnation(), vs.first_seq()),
        // The journal did not open: the old primary will be resynced.
        None => (0, 1),
    };
    site.metrics
        .failovers
        .with_label_values(&[&name, "planned"])
        .inc();
    site.rehello();
    tracing::warn!(volume = %name, epoch = epoch + 1, record = seq, "PLANNED SWITCHOVER: this site is now primary and exports the volume writable");
    Ok(crate::proto::messages::Response::Promoted {
        history,
        incarnation,
        next_seq,
    })
}

/// The record of a replica promoted by a planned switchover from `fork`:
/// a new epoch of this site's, and the primary's role.
fn promoted_record(site: &Site, rec: VolumeRecord, fork: Fork) -> (History, VolumeRecord) {
    let mut history = rec.history.clone();
    history.push(EpochEntry {
        epoch: fork.epoch + 1,
        site: site.name(),
        generation: Gen::random(),
        fork: Some(fork),
    });
    let next = VolumeRecord {
        role: Role::Primary,
        interval_ms: if rec.interval_ms == 0 {
            30_000
        } else {
            rec.interval_ms
        },
        committed: None,
        applying: None,
        last_pass: None,
        stream: StreamRecord {
            sync_wait_ms: rec.stream.sync_wait_ms,
            sync_fallback: rec.stream.sync_fallback,
            ..Default::default()
        },
        history: history.clone(),
        fenced: None,
        split_brain: false,
        handoff: None,
        handoff_checksum: 0,
        ..rec
    };
    (history, next)
}

/// A promotion by planned switchover ends a running drill (recorded as aborted).
async fn end_drill(site: &Arc<Site>, name: &str) {
    if site.drills.is_running(name)
        && let Err(e) = super::drills::stop(
            site,
            name,
            crate::failover::drill::Operator::default(),
            Some("a planned switchover promoted the volume".into()),
        )
        .await
    {
        tracing::error!(volume = %name, error = %e, "cannot end the drill");
    }
}

/// The DR side of a snapshot-mode switchover: promoted if its committed
/// state is the root of the primary's last pass (its writers stopped).
async fn promote_snapshot_steps(
    site: &Arc<Site>,
    h: &Arc<VolumeHandle>,
    epoch: u64,
    root: Hash,
) -> Result<crate::proto::messages::Response, String> {
    let name = h.name.clone();
    h.hold_peer_writes(Some("a planned switchover is promoting this site".into()));
    let rec = h.record();
    if rec.committed != Some(root) || rec.applying.is_some() {
        h.hold_peer_writes(None);
        return Err(format!(
            "this site's committed state is {}, not the primary's last pass {root}: the switchover cannot be zero-loss",
            rec.committed
                .map(|r| r.to_string())
                .unwrap_or_else(|| "none".into())
        ));
    }
    end_drill(site, &name).await;
    h.stop().await;
    let p = match new_point(site, &rec, root, None) {
        Ok(p) => p,
        Err(e) => {
            h.hold_peer_writes(None);
            h.start(site);
            return Err(e);
        }
    };
    let fork = Fork {
        epoch,
        seq: 0,
        checksum: 0,
        root,
    };
    let (history, next) = promoted_record(site, rec, fork);
    if let Err(e) = h
        .change_role(site, vec![state::put_point_op(&p)], next)
        .await
    {
        h.hold_peer_writes(None);
        return Err(format!("cannot record the promotion: {e}"));
    }
    site.metrics
        .failovers
        .with_label_values(&[&name, "planned"])
        .inc();
    site.rehello();
    tracing::warn!(volume = %name, epoch = epoch + 1, root = %root, "PLANNED SWITCHOVER: this site is now primary of the snapshot-mode volume and exports it writable");
    Ok(crate::proto::messages::Response::Promoted {
        history,
        incarnation: 0,
        next_seq: 1,
    })
}

/// The primary runs a planned switchover its peer (the DR site) asked for.
pub async fn switchover_for_peer(
    site: &Arc<Site>,
    name: &str,
    (disconnect_clients, workload_stopped): (bool, bool),
) -> crate::proto::messages::Response {
    use crate::proto::messages::{ErrorCode, Response};
    if let Err(e) = crate::proto::messages::check_volume_name(name) {
        return Response::error(ErrorCode::Malformed, e);
    }
    let by = crate::failover::drill::Operator {
        said: Some("the peer (switchover asked for at the DR site)".into()),
        ..Default::default()
    };
    match site
        .audited(
            "failover --planned",
            name,
            &by,
            serde_json::json!({ "planned": true, "disconnect_clients": disconnect_clients, "workload_stopped": workload_stopped, "from": "peer" }),
            planned(site, name, (disconnect_clients, workload_stopped)),
        )
        .await
    {
        Ok(r) => Response::SwitchedOver(r),
        Err(e) => Response::error(ErrorCode::Refused, e),
    }
}

/// `ferry failover NAME --planned` at the DR site: the primary runs it.
pub async fn planned_from_replica(
    site: &Arc<Site>,
    name: &str,
    (disconnect_clients, workload_stopped): (bool, bool),
) -> Result<PlannedReport, String> {
    use crate::proto::messages::{Request, Response};
    let conn = site.link().ok_or_else(|| {
        format!("the primary of {name} is not connected; a planned switchover needs it (for a disaster: `ferry failover {name} --force`)")
    })?;
    let req = Request::Switchover {
        volume: name.to_string(),
        disconnect_clients,
        workload_stopped,
    };
    let answer = tokio::time::timeout(
        DRAIN_WAIT.max(LAST_PASS_WAIT) + PROMOTE_WAIT + std::time::Duration::from_secs(60),
        crate::transport::endpoint::call(&conn, &req, site.frame_bytes_max()),
    )
    .await
    .map_err(|_| "no answer from the primary; see `ferry status` at both sites".to_string())?
    .map_err(|e| format!("asking the primary: {e}; see `ferry status` at both sites"))?;
    match answer.0 {
        Response::SwitchedOver(r) => Ok(r),
        Response::Error { message, .. } => Err(format!("the primary: {message}")),
        other => Err(format!("the primary answered {other:?}")),
    }
}

/// `ferry resolve NAME --keep SITE`, at either site: SITE's data wins the
/// split brain; the other site keeps its own state as a pinned divergent
/// point and becomes SITE's replica, brought level by tree comparison.
pub async fn resolve(site: &Arc<Site>, name: &str, keep: &str) -> Result<String, String> {
    let h = site
        .handle(name)
        .ok_or_else(|| format!("no volume named {name}; see `ferry volume list`"))?;
    let retry = {
        let rec = h.record();
        !rec.split_brain && h.peer_top().is_some_and(|t| rec.superseded.contains(&t))
    };
    if !h.record().split_brain && !retry {
        return Err(format!(
            "no split brain is recorded for {name} at this site; `ferry status {name}` shows the sites' relation"
        ));
    }
    let me = site.name();
    let peer = site.peer_label();
    let conn = site.link().ok_or_else(|| {
        "the other site is not connected: both must be up to resolve (its data is kept as a point there)".to_string()
    })?;
    if keep == peer {
        // The winner runs it.
        let req = crate::proto::messages::Request::Resolve {
            volume: name.to_string(),
            keep: keep.to_string(),
            history: Default::default(),
        };
        let (resp, _) = crate::transport::endpoint::call(&conn, &req, site.frame_bytes_max())
            .await
            .map_err(|e| format!("asking {peer}: {e}"))?;
        return match resp {
            crate::proto::messages::Response::Ok => Ok(format!(
                "{peer}'s data wins; this site keeps its own state as a pinned divergent point and becomes {peer}'s replica"
            )),
            crate::proto::messages::Response::Error { message, .. } => {
                Err(format!("{peer}: {message}"))
            }
            other => Err(format!("{peer} answered {other:?}")),
        };
    }
    if keep != me {
        return Err(format!(
            "--keep names a site of this pair: {me} (this one) or {peer}"
        ));
    }
    // This site wins: an entry that supersedes both forks, durable with
    // the cleared split brain and the loser's fork set aside, first; then
    // the loser is told (again, if a first telling was lost: the loser's
    // fork is superseded here, so it reads as behind meanwhile).
    let _one = ResolveGuard::take(site, name)?;
    let rec = h.record();
    let epoch = rec.history.epoch();
    if !retry {
        let epoch = rec.history.epoch().max(h.role_view().peer_epoch) + 1;
        let mut history = rec.history.clone();
        history.push(EpochEntry {
            epoch,
            site: me.clone(),
            generation: Gen::random(),
            fork: rec.history.top().map(|t| Fork {
                epoch: t.epoch,
                seq: 0,
                checksum: 0,
                root: Hash::ZERO,
            }),
        });
        let mut superseded = rec.superseded.clone();
        superseded.extend(h.peer_top());
        let drop_old = superseded.len().saturating_sub(8);
        superseded.drain(..drop_old);
        let next = VolumeRecord {
            history,
            split_brain: false,
            superseded,
            ..rec
        };
        h.change_role(site, Vec::new(), next).await.map_err(err)?;
        crate::util::crash_point("resolve:won");
    }
    let req = crate::proto::messages::Request::Resolve {
        volume: name.to_string(),
        keep: me.clone(),
        history: h.record().history,
    };
    let told = crate::transport::endpoint::call(&conn, &req, site.frame_bytes_max()).await;
    match told {
        Ok((crate::proto::messages::Response::Ok, _)) => {}
        Ok((crate::proto::messages::Response::Error { message, .. }, _)) => {
            return Err(format!(
                "this site's data wins (recorded here), but {peer} refused: {message}; run the same resolve again once it can take it"
            ));
        }
        Ok((other, _)) => return Err(format!("{peer} answered {other:?}; run the resolve again")),
        Err(e) => {
            return Err(format!(
                "this site's data wins (recorded here), but telling {peer} failed: {e}; run the same resolve again"
            ));
        }
    }
    site.rehello();
    let epoch = h.record().history.epoch().max(epoch);
    tracing::warn!(
        volume = name,
        epoch,
        "split brain resolved: this site's data wins; the other site keeps its own as a pinned point and is resynced from here"
    );
    Ok(format!(
        "this site's data wins (epoch {epoch}); {peer} keeps its own state as a pinned divergent point and becomes this site's replica, brought level by tree comparison"
    ))
}

/// The peer asks: it won (`history` set) and this site loses, or (empty
/// `history`) this site is named the winner and runs it.
pub async fn resolve_from_peer(
    site: &Arc<Site>,
    name: &str,
    keep: &str,
    history: History,
) -> crate::proto::messages::Response {
    use crate::proto::messages::{ErrorCode, Response};
    if let Err(e) = crate::proto::messages::check_volume_name(name) {
        return Response::error(ErrorCode::Malformed, e);
    }
    let by = crate::failover::drill::Operator {
        said: Some(format!("the peer (resolve --keep {keep})")),
        ..Default::default()
    };
    if history.is_empty() {
        return match site
            .audited(
                "resolve",
                name,
                &by,
                serde_json::json!({ "keep": keep, "asked_by": "peer" }),
                resolve(site, name, keep),
            )
            .await
        {
            Ok(_) => Response::Ok,
            Err(e) => Response::error(ErrorCode::Refused, e),
        };
    }
    let Some(h) = site.handle(name) else {
        return Response::error(ErrorCode::Unknown, format!("volume {name} is unknown here"));
    };
    if let Err(e) = history.check() {
        return Response::error(ErrorCode::Malformed, e);
    }
    if !h.record().split_brain && h.record().behind_of.is_none() {
        return Response::error(
            ErrorCode::Refused,
            format!("no split brain is recorded for {name} here"),
        );
    }
    if history.top().map(|e| e.site.as_str()) != Some(keep) || keep == site.name() {
        return Response::error(
            ErrorCode::Malformed,
            "a resolve that names the wrong winner",
        );
    }
    if site.resolving(name) {
        return Response::error(
            ErrorCode::Busy,
            format!("a resolve of {name} runs at this site; one resolve at a time"),
        );
    }
    // Durable before the answer: a restart resumes becoming the replica.
    let reason = format!("split brain resolved in favour of {keep}: becoming its replica");
    if let Err(e) = h.update(true, |r| {
        r.fenced = Some(reason.clone());
        r.behind_of = Some(history.clone());
    }) {
        return Response::error(
            ErrorCode::Internal,
            format!("cannot record the resolve: {e}"),
        );
    }
    h.gate.close(&reason);
    crate::util::crash_point("resolve:lost");
    if let Err(e) = site.audit.append(
        "resolve (this site loses)",
        name,
        "begin",
        &by,
        serde_json::json!({ "keep": keep, "epoch": history.epoch() }),
        None,
    ) {
        return Response::error(
            ErrorCode::Internal,
            format!("cannot write the audit log: {e}"),
        );
    }
    tracing::warn!(
        volume = name,
        winner = keep,
        "split brain resolved in favour of the peer: this site keeps its state as a pinned divergent point and becomes its replica"
    );
    site.spawn_become_replica(&h, history);
    Response::Ok
}

/// Deletes directories of an earlier epoch (a journal, a redo log) and
/// makes that durable in their parents; a failure stops the step.
fn remove_dirs(dirs: &[std::path::PathBuf]) -> Result<(), String> {
    for d in dirs {
        if d.exists() {
            std::fs::remove_dir_all(d)
                .map_err(|e| format!("cannot delete {}: {e}", d.display()))?;
            if let Some(parent) = d.parent()
                && let Ok(f) = std::fs::File::open(parent)
            {
                f.sync_all()
                    .map_err(|e| format!("cannot sync {}: {e}", parent.display()))?;
            }
        }
    }
    Ok(())
}

/// One resolve of a volume at a time at this site.
struct ResolveGuard {
    site: Arc<Site>,
    name: String,
}

impl ResolveGuard {
    fn take(site: &Arc<Site>, name: &str) -> Result<ResolveGuard, String> {
        let mut set = site.resolving.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(name.to_string()) {
            return Err(format!(
                "a resolve of {name} is running at this site already"
            ));
        }
        Ok(ResolveGuard {
            site: site.clone(),
            name: name.to_string(),
        })
    }
}

impl Drop for ResolveGuard {
    fn drop(&mut self) {
        self.site
            .resolving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

/// Marks a volume as being handed over while a `hand_over` runs.
struct HandingOver {
    site: Arc<Site>,
    name: String,
}

impl HandingOver {
    fn mark(site: &Arc<Site>, name: &str) -> HandingOver {
        site.handing_over
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
        HandingOver {
            site: site.clone(),
            name: name.to_string(),
        }
    }
}

impl Drop for HandingOver {
    fn drop(&mut self) {
        self.site
            .handing_over
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

/// A primary's journal is about to go (it becomes a replica): a flush
/// counted on the journal, so the image must hold its writes durably first
/// (a replica's image is durable up to its base).
async fn image_durable_before_journal_goes(h: &Arc<VolumeHandle>) -> Result<(), String> {
    let Some(vs) = h.volume_stream() else {
        return Ok(());
    };
    tokio::task::spawn_blocking(move || vs.make_image_durable())
        .await
        .map_err(err)?
        .map_err(|e| format!("cannot make the image durable before its journal goes: {e}"))
}
