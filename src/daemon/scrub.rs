//! `ferry scrub NAME`: reads back every node and chunk of a volume's
//! recovery points (and, at the DR site, of its replica's committed state)
//! and checks each against its name; puts back what is damaged from the
//! volume's image when the image still holds those bytes; and names the
//! points that stay damaged. Bit rot in the store is otherwise found only
//! when a restore, a drill or a commit reads the damaged chunk (each of
//! those fails with an error rather than serve it).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::Site;
use crate::store::scrub::{self, Damage};
use crate::store::state;
use crate::store::state::Role;
use crate::volume::image;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScrubReport {
    pub volume: String,
    /// Recovery points walked.
    pub points: u64,
    pub nodes_checked: u64,
    pub chunks_checked: u64,
    /// Bytes of chunk data read and checked.
    pub bytes_checked: u64,
    /// Damaged or missing objects found.
    pub found: Vec<Damage>,
    pub repaired_chunks: u64,
    pub repaired_nodes: u64,
    /// What no copy in the image could put back.
    pub unrepaired: Vec<Damage>,
    /// Points that reach unrepaired damage: they cannot be restored whole.
    pub points_damaged: Vec<u64>,
    /// The replica's committed state reaches unrepaired damage.
    pub committed_damaged: bool,
    pub seconds: f64,
}

impl ScrubReport {
    pub fn result(&self) -> &'static str {
        if !self.unrepaired.is_empty() {
            "damaged"
        } else if !self.found.is_empty() {
            "repaired"
        } else {
            "clean"
        }
    }
}

/// Scrubs `name` (blocking: run it off the runtime).
pub fn scrub(site: &Arc<Site>, name: &str) -> Result<ScrubReport, String> {
    let started = Instant::now();
    let h = site
        .handle(name)
        .ok_or_else(|| format!("no volume named {name}"))?;
    let rec = h.record();
    let store = &*site.store;
    // Garbage collection deletes nothing while the walk runs (it would
    // look like damage).
    let _gc = site
        .replica
        .gc_lock
        .read()
        .unwrap_or_else(|p| p.into_inner());
    let points = state::list_points(store, name).map_err(|e| e.to_string())?;
    let mut roots: Vec<_> = points.iter().map(|p| p.root).collect();
    let committed = if rec.role == Role::Replica {
        rec.committed
    } else {
        None
    };
    roots.extend(committed);
    let first = scrub::walk(store, &roots);
    let mut report = ScrubReport {
        volume: name.to_string(),
        points: points.len() as u64,
        nodes_checked: first.nodes_checked,
        chunks_checked: first.chunks_checked,
        bytes_checked: first.bytes_checked,
        found: first.damage(),
        ..Default::default()
    };
    let last = if first.is_clean() {
        first
    } else {
        tracing::warn!(
            volume = name,
            damaged = report.found.len(),
            "scrub found damaged or missing objects in the store; putting back what the image holds"
        );
        match repair_from_image(site, &rec.path, rec.chunk_size, &first) {
            Ok(r) => {
                report.repaired_chunks = r.chunks;
                report.repaired_nodes = r.nodes;
            }
            Err(e) => {
                tracing::error!(volume = name, error = %e, "scrub could not read the image to repair from")
            }
        }
        scrub::walk(store, &roots)
    };
    report.unrepaired = last.damage();
    for i in last.roots_damaged {
        match points.get(i) {
            Some(p) => report.points_damaged.push(p.id),
            None => report.committed_damaged = true,
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    let m = &site.metrics;
    m.scrub_runs
        .with_label_values(&[name, report.result()])
        .inc();
    m.scrub_unrepaired
        .with_label_values(&[name])
        .set(report.unrepaired.len() as i64);
    if report.unrepaired.is_empty() {
        tracing::info!(
            volume = name,
            points = report.points,
            chunks = report.chunks_checked,
            repaired_chunks = report.repaired_chunks,
            repaired_nodes = report.repaired_nodes,
            "scrub done: every point reads back whole"
        );
    } else {
        tracing::error!(volume = name, unrepaired = report.unrepaired.len(), points_damaged = ?report.points_damaged, committed_damaged = report.committed_damaged, "scrub done: damage remains that the image does not hold; those points cannot be restored whole");
    }
    Ok(report)
}

fn repair_from_image(
    site: &Arc<Site>,
    path: &std::path::Path,
    chunk_size: u32,
    w: &scrub::Walk,
) -> Result<scrub::Repaired, String> {
    let (tree, _) = image::scan(path, chunk_size, &AtomicU64::new(0)).map_err(|e| e.to_string())?;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut read = |i: u64| image::read_chunk(&f, path, &tree, i).map_err(std::io::Error::other);
    scrub::repair(&*site.store, w, &tree, &mut read).map_err(|e| e.to_string())
}
