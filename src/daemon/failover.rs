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
    // 5. Role, history and the pinned point in one batch; the gate opens
    // and the primary's jobs start.
    if let Err(e) = h.change_role(site, ops, next).await {
        release(&h);
        return Err(format!("cannot record the promotion: {e}"));
    }
    // The redo log belongs to the old epoch.
    let redo = site.replica.redo_dir.join(name);
    if redo.exists()
        && let Err(e) = std::fs::remove_dir_all(&redo)
    {
        tracing::warn!(volume = name, error = %e, "cannot delete the old redo log");
    }
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
        last_received = rs.last_received();
    }
    let rec = h.record();
    let now = crate::util::now_unix();
    let consistent = state::consistent(&rec) && rec.committed.is_some();
    let mut ops = Vec::new();
    let mut chunks_restored = 0;
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
            checksum: 0,
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
        created: crate::util::now_unix(),
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
    if h.role() == Role::Replica {
        return Ok(());
    }
    if !h.record().mode.continuous() {
        // Its writers reach the image directly, not through the gate: it
        // is not scanned or overwritten while they may run. It stays fenced.
        tracing::error!(volume = %h.name, epoch = ahead.epoch(), "this snapshot-mode volume is behind its peer and stays fenced: its writers reach the image directly, so ferry does not scan or overwrite it. Stop them, save the image if it holds writes you need, and protect it again from the new primary");
        return Ok(());
    }
    h.gate
        .close("this site is behind its peer: it becomes its replica");
    if h.volume_stream().is_none() {
        // Every journaled write must be in the image before it is captured:
        // opening the journal replays it.
        let (s, h2) = (site.clone(), h.clone());
        let vs = tokio::task::spawn_blocking(move || s.open_volume_stream(&h2))
            .await
            .map_err(err)??;
        h.set_volume_stream(vs);
    }
    h.stop().await;
    let (s, h2) = (site.clone(), h.clone());
    let (ops, next, point) = tokio::task::spawn_blocking(move || capture(&s, &h2, &ahead))
        .await
        .map_err(err)??;
    h.change_role(&site, ops, next).await.map_err(err)?;
    let journal = site.journal_dir(&h.name);
    if journal.exists()
        && let Err(e) = std::fs::remove_dir_all(&journal)
    {
        tracing::warn!(volume = %h.name, error = %e, "cannot delete the old journal");
    }
    tracing::warn!(volume = %h.name, point = point.id, root = %point.root.short(), "this site's writes since the fork are kept as pinned recovery point {} (divergent); the volume is now a replica of its peer and is brought level by tree comparison", point.id);
    site.rehello();
    Ok(())
}

/// Scans the image into the store as a pinned `divergent` point and builds
/// the replica's record (blocking).
fn capture(
    site: &Site,
    h: &VolumeHandle,
    ahead: &History,
) -> Result<(Vec<Op>, VolumeRecord, RecoveryPoint), String> {
    let rec = h.record();
    // The journal was replayed onto the image when it was opened. No
    // collection runs until the point holds the chunks stored here.
    let _gc = site
        .replica
        .gc_lock
        .read()
        .unwrap_or_else(|p| p.into_inner());
    let progress = std::sync::atomic::AtomicU64::new(0);
    let (tree, _) =
        crate::volume::image::scan(&rec.path, rec.chunk_size, &progress).map_err(err)?;
    // Chunks first (each read again and checked against the scan's name,
    // since nothing writes the image now), then nodes, point and record in
    // one batch.
    let f = std::fs::File::open(&rec.path).map_err(err)?;
    for (i, leaf) in tree.leaves().iter().enumerate() {
        if leaf.is_zero() {
            continue;
        }
        if site.store.has_chunk(leaf).map_err(err)? {
            continue;
        }
        let data = crate::volume::image::read_chunk(&f, &rec.path, &tree, i as u64).map_err(err)?;
        site.store.put_chunk(leaf, &data).map_err(err)?;
    }
    let mut ops = Vec::new();
    for level in 1..tree.levels.len() {
        for i in 0..tree.levels[level].len() {
            ops.push(Op::PutNode(
                tree.levels[level][i],
                tree.node(level, i).encode(),
            ));
        }
    }
    ops.push(Op::PutNode(tree.root, tree.root_node().encode()));
    let points = state::list_points(&*site.store, &rec.name).map_err(err)?;
    let epoch = rec.history.epoch();
    let point = RecoveryPoint {
        id: points.last().map(|p| p.id + 1).unwrap_or(1),
        volume: rec.name.clone(),
        root: tree.root,
        created: crate::util::now_unix(),
        size: tree.size,
        source: format!(
            "divergent: this site's state in epoch {epoch}, set aside when {} took over with epoch {}",
            ahead.top().map(|e| e.site.as_str()).unwrap_or("?"),
            ahead.epoch()
        ),
        seq: None,
        pinned: Some("divergent".into()),
    };
    ops.push(state::put_point_op(&point));
    // The point (with its nodes) is durable before the collection lock is
    // let go; the role changes in the next batch. A crash in between
    // leaves the volume fenced with its point kept, and the next Hello
    // captures again (a second divergent point, nothing lost).
    site.store.apply(ops, true).map_err(err)?;
    let ops = Vec::new();
    let next = VolumeRecord {
        role: Role::Replica,
        size: tree.size,
        committed: Some(tree.root),
        applying: None,
        last_pass: None,
        stream: StreamRecord {
            // Not a state of the new lineage until the resync's commit.
            inconsistent_until: Some(u64::MAX),
            ..Default::default()
        },
        history: ahead.clone(),
        fenced: None,
        split_brain: false,
        ..rec
    };
    Ok((ops, next, point))
}
