//! `ferry volume remove NAME`: the volume stops being protected at this
//! site. Its jobs stop, its journal (or redo log) and, at the DR site, the
//! replica image ferry owns are deleted, then its record and its recovery
//! points go in one durable batch (their chunks go at the next GC). The
//! primary's image file is the operator's and is never touched.
//!
//! The peer is not told: it keeps its side until removed there too. A
//! volume added again under the same name starts a new lineage (a new
//! generation in its history), so the other site's old copy is never taken
//! for it: the sites see forked histories (a split brain) and the operator
//! says which data wins with `ferry resolve`, the other kept as a point.

use std::sync::Arc;

use super::Site;
use crate::store::Op;
use crate::store::state::{self, Role};

/// What a removal did.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Removed {
    pub volume: String,
    pub role: Role,
    /// Recovery points dropped (their chunks go at the next GC).
    pub points: usize,
    /// Files and directories ferry owned and deleted.
    pub deleted: Vec<String>,
}

pub async fn remove(site: &Arc<Site>, name: &str) -> Result<Removed, String> {
    let h = site
        .handle(name)
        .ok_or_else(|| format!("no volume named {name}; see `ferry volume list`"))?;
    if site.drills.is_running(name) {
        return Err(format!(
            "a drill of {name} is running: `ferry drill stop {name}` first"
        ));
    }
    if site.resolving(name) || site.handing_over(name) || h.peer_writes_held() {
        return Err(format!(
            "a failover or resolve of {name} is in progress; wait until it ends"
        ));
    }
    let clients = h.nbd_clients();
    if clients > 0 {
        return Err(format!(
            "{clients} NBD client(s) are connected to {name}: stop their VMs first"
        ));
    }
    let rec = h.record();
    // No new write or peer request from here on.
    h.gate.close("the volume is being removed");
    h.hold_peer_writes(Some("the volume is being removed at this site".into()));
    h.stop().await;
    site.volumes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(name);
    let mut deleted = Vec::new();
    let mut paths = vec![site.journal_dir(name), site.replica.redo_dir.join(name)];
    let owned_image =
        rec.role == Role::Replica && rec.path.parent() == Some(site.replica.replica_dir.as_path());
    if owned_image {
        paths.push(rec.path.clone());
    }
    // Files first: a crash before the records go leaves a volume that
    // resyncs (its journal gone), never a stale journal for a new volume.
    for p in &paths {
        let gone = if p.is_dir() {
            std::fs::remove_dir_all(p)
        } else if p.exists() {
            std::fs::remove_file(p)
        } else {
            continue;
        };
        gone.map_err(|e| format!("cannot delete {}: {e}", p.display()))?;
        if let Some(parent) = p.parent()
            && let Ok(d) = std::fs::File::open(parent)
        {
            d.sync_all()
                .map_err(|e| format!("cannot sync {}: {e}", parent.display()))?;
        }
        deleted.push(p.display().to_string());
    }
    let points = state::list_points(&*site.store, name).map_err(|e| e.to_string())?;
    let mut ops: Vec<Op> = points
        .iter()
        .map(|p| Op::DeleteMeta(state::point_key(name, p.id)))
        .collect();
    for (k, _) in site
        .store
        .scan_meta(&super::replica::pending_prefix(name))
        .map_err(|e| e.to_string())?
    {
        ops.push(Op::DeleteMeta(k));
    }
    ops.push(state::delete_volume_op(name));
    site.store.apply(ops, true).map_err(|e| e.to_string())?;
    // The peer learns at once that this site no longer holds the volume.
    site.rehello();
    tracing::warn!(volume = name, role = %rec.role, points = points.len(), "volume removed at this site");
    Ok(Removed {
        volume: name.to_string(),
        role: rec.role,
        points: points.len(),
        deleted,
    })
}
