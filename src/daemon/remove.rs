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
    let was_open = h.gate.is_open();
    h.gate.close("the volume is being removed");
    h.hold_peer_writes(Some("the volume is being removed at this site".into()));
    h.stop().await;
    // The journal goes with the volume: a flush counted on it, so the image
    // must hold its writes durably first. A journal not open yet (its image
    // could not be opened at the start) is opened now, which replays it.
    let durable = if rec.role == Role::Primary && rec.mode.continuous() {
        let (s, h2) = (site.clone(), h.clone());
        tokio::task::spawn_blocking(move || match s.open_volume_stream(&h2) {
            Ok(vs) => vs
                .make_image_durable()
                .map_err(|e| format!("its image cannot be made durable ({e})")),
            Err(e) => nothing_to_replay(&s, &h2, &e),
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
    } else {
        Ok(())
    };
    if let Err(e) = durable {
        h.hold_peer_writes(None);
        if was_open {
            h.gate.open();
        }
        h.start(site);
        return Err(format!("cannot remove {name}: {e}; nothing was removed"));
    }
    // The records first, in one durable batch: a crash after it leaves only
    // files without a volume, which the next start deletes (`sweep`); never
    // a record that claims a replica whose image or redo log is gone.
    let removed = state::list_points(&*site.store, name)
        .map_err(|e| e.to_string())
        .and_then(|points| {
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
            site.store
                .apply(ops, true)
                .map_err(|e| e.to_string())
                .map(|_| points)
        });
    let points = match removed {
        Ok(p) => p,
        Err(e) => {
            // Nothing changed: the volume goes on as it was.
            h.hold_peer_writes(None);
            if was_open {
                h.gate.open();
            }
            h.start(site);
            return Err(format!("cannot remove {name}: {e}; nothing was removed"));
        }
    };
    site.volumes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(name);
    let mut deleted = Vec::new();
    for p in owned_files(site, &rec) {
        match delete(&p) {
            Ok(true) => deleted.push(p.display().to_string()),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(volume = name, error = %e, "a file of the removed volume stays until the next start")
            }
        }
    }
    tracing::warn!(volume = name, role = %rec.role, points = points.len(), "volume removed at this site");
    // The peer learns at once that this site no longer holds the volume.
    site.rehello();
    Ok(Removed {
        volume: name.to_string(),
        role: rec.role,
        points: points.len(),
        deleted,
    })
}

/// A primary's journal that cannot be replayed (`why`: its stream cannot
/// open) may go only if it holds no record a restart would replay: such a
/// record's write may be missing from the image, and a flush counted on it.
fn nothing_to_replay(
    site: &Site,
    h: &super::volume::VolumeHandle,
    why: &str,
) -> Result<(), String> {
    let dir = site.journal_dir(&h.name);
    if !dir.exists() {
        return Ok(());
    }
    let max = site
        .config
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .limits
        .journal_bytes_max
        .0;
    let (journal, _) = crate::volume::journal::Journal::open(&dir, max).map_err(|e| {
        format!(
            "the volume's stream cannot open ({why}) and its journal cannot be read ({e}); it may hold acknowledged writes the image lacks. Fix that and remove it again; to drop those writes, delete {} first",
            dir.display()
        )
    })?;
    let next = journal.next_seq();
    let Some(first) =
        super::stream::replay_start(&h.record().stream, journal.first_seq()).filter(|&f| f < next)
    else {
        return Ok(());
    };
    Err(format!(
        "its journal ({}) holds writes, records {first} to {}, that flushes counted on and that are not replayed onto the image yet, and the volume's stream cannot open to replay them ({why}). Fix that (`ferry status {}` shows it) and remove it again; to drop those writes, delete {} first",
        dir.display(),
        next - 1,
        h.name,
        dir.display()
    ))
}

/// The files ferry owns for a volume at this site: its journal, its redo
/// log and, for a replica, its image under `DIR/replicas/`.
fn owned_files(site: &Site, rec: &state::VolumeRecord) -> Vec<std::path::PathBuf> {
    let mut paths = vec![
        site.journal_dir(&rec.name),
        site.replica.redo_dir.join(&rec.name),
    ];
    if rec.role == Role::Replica && rec.path.parent() == Some(site.replica.replica_dir.as_path()) {
        paths.push(rec.path.clone());
    }
    paths
}

/// Deletes a file or directory, durably in its parent; `false`: not there.
fn delete(p: &std::path::Path) -> Result<bool, String> {
    let gone = if p.is_dir() {
        std::fs::remove_dir_all(p)
    } else if p.exists() {
        std::fs::remove_file(p)
    } else {
        return Ok(false);
    };
    gone.map_err(|e| format!("cannot delete {}: {e}", p.display()))?;
    if let Some(parent) = p.parent()
        && let Ok(d) = std::fs::File::open(parent)
    {
        d.sync_all()
            .map_err(|e| format!("cannot sync {}: {e}", parent.display()))?;
    }
    Ok(true)
}

/// At start: journals, redo logs and replica images of volumes that have no
/// record (a removal that crashed after its records went) are deleted.
pub fn sweep(site: &Site, known: &std::collections::HashSet<String>) {
    let dirs = [
        (site.dir.join("journal"), ""),
        (site.replica.redo_dir.clone(), ""),
        (site.replica.replica_dir.clone(), ".img"),
    ];
    for (dir, suffix) in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(suffix) else {
                continue;
            };
            if known.contains(name) {
                continue;
            }
            match delete(&e.path()) {
                Ok(_) => {
                    tracing::warn!(path = %e.path().display(), "deleted a file of a removed volume (the removal was cut short)")
                }
                Err(e) => tracing::error!(error = %e, "cannot delete a file of a removed volume"),
            }
        }
    }
}
