//! Retention of recovery points, and garbage collection of what no kept
//! state needs.
//!
//! GC is mark and sweep: everything reachable from the kept roots (every
//! recovery point, every replica's committed and applying root) is kept;
//! unreachable nodes are deleted first, in one atomic batch, and only then
//! unreachable chunks. So a crash at any moment leaves no node whose subtree
//! is incomplete (the promise behind `has_node`), only chunks to collect next
//! time. Chunks a pass in progress (or an interrupted one) has stored are
//! spared, so that it keeps what it has sent; a pass that still loses a chunk
//! is caught by the commit's completeness check and sends it again.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::state::RecoveryPoint;
use super::tree::{Node, NodeSource, StoreNodes};
use super::{ChunkStore, Op, StoreError};
use crate::hash::Hash;
use crate::units::Dur;

/// Which recovery points to keep, by age (config `[retention]`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Keep every point younger than this.
    pub all: Dur,
    /// Beyond that, keep the newest point of each hour younger than this.
    pub hourly: Dur,
    /// Beyond that, keep the newest point of each day younger than this.
    pub daily: Dur,
    /// Nothing is pruned until the daemon has run this long: the wall
    /// clock is followed until then (a host that booted with a wrong clock
    /// is corrected by NTP within minutes) and not after (see
    /// [`crate::util::trusted_now_unix`]).
    pub clock_settle: Dur,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            all: Dur(std::time::Duration::from_secs(3600)),
            hourly: Dur(std::time::Duration::from_secs(86400)),
            daily: Dur(std::time::Duration::from_secs(7 * 86400)),
            clock_settle: Dur(std::time::Duration::from_secs(600)),
        }
    }
}

/// The ids of the points `r` lets go at time `now`. The newest point and
/// pinned points (`divergent`, `promotion`) are always kept.
///
/// Points are ordered by id (a sequence that only grows), never by their
/// wall-clock stamps, which a clock jump can put out of order: a point is
/// taken to be no older than any point made before it (its stamp is raised
/// to the highest stamp before it). A backward jump therefore never makes
/// new points look old, and a forward one only keeps points longer; `now`
/// comes from a clock that does not jump ([`crate::util::trusted_now_unix`]).
pub fn prune(points: &[RecoveryPoint], now: u64, r: &Retention) -> Vec<u64> {
    let mut by_id: Vec<&RecoveryPoint> = points.iter().collect();
    by_id.sort_by_key(|p| p.id);
    let newest = by_id.last().map(|p| p.id);
    let mut stamped: Vec<(u64, &RecoveryPoint)> = Vec::with_capacity(by_id.len());
    let mut high = 0u64;
    for p in by_id {
        // A stamp in the future (a clock that was ahead) counts as now.
        high = high.max(p.created.min(now));
        stamped.push((high, p));
    }
    let mut seen_buckets: HashSet<(u8, u64)> = HashSet::new();
    let mut drop = Vec::new();
    for (created, p) in stamped.into_iter().rev() {
        let age = now.saturating_sub(created);
        let keep = if Some(p.id) == newest || p.pinned.is_some() || age <= r.all.0.as_secs() {
            true
        } else if age <= r.hourly.0.as_secs() {
            seen_buckets.insert((1, created / 3600))
        } else if age <= r.daily.0.as_secs() {
            seen_buckets.insert((2, created / 86400))
        } else {
            false
        };
        if !keep {
            drop.push(p.id);
        }
    }
    drop.sort();
    drop
}

/// What a collection did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub nodes_kept: u64,
    pub nodes_deleted: u64,
    pub chunks_kept: u64,
    pub chunks_deleted: u64,
    /// Unreachable chunks spared because a pass in progress stored them.
    pub chunks_spared: u64,
}

/// Deletes chunks in batches of this many.
const DELETE_BATCH: usize = 4096;

/// Marks from `roots`, then deletes unreachable nodes, then unreachable chunks
/// not in `spare`.
pub fn collect(
    store: &dyn ChunkStore,
    roots: &[Hash],
    spare: &HashSet<Hash>,
) -> Result<GcReport, StoreError> {
    let src = StoreNodes(store);
    let (mut nodes, mut chunks) = (HashSet::new(), HashSet::new());
    for root in roots {
        mark(&src, root, &mut nodes, &mut chunks)?;
    }
    // The base of every delta kept (or spared) is kept. A base is stored
    // whole, so one round would do; repeating until nothing changes keeps
    // whatever a chain there should not be would need.
    let deltas = store.delta_bases()?;
    loop {
        let before = chunks.len();
        for (delta, base) in &deltas {
            if !base.is_zero() && (chunks.contains(delta) || spare.contains(delta)) {
                chunks.insert(*base);
            }
        }
        if chunks.len() == before {
            break;
        }
    }
    let mut report = GcReport::default();
    let dead_nodes: Vec<Op> = store
        .node_names()?
        .into_iter()
        .filter(|h| !nodes.contains(h))
        .map(Op::DeleteNode)
        .collect();
    report.nodes_deleted = dead_nodes.len() as u64;
    report.nodes_kept = nodes.len() as u64;
    if !dead_nodes.is_empty() {
        store.apply(dead_nodes, true)?;
    }
    let mut dead = Vec::new();
    for h in store.chunk_names()? {
        if chunks.contains(&h) {
            report.chunks_kept += 1;
        } else if spare.contains(&h) {
            report.chunks_spared += 1;
        } else {
            dead.push(Op::DeleteChunk(h));
        }
    }
    report.chunks_deleted = dead.len() as u64;
    for batch in dead.chunks(DELETE_BATCH) {
        store.apply(batch.to_vec(), false)?;
    }
    store.apply(Vec::new(), true)?;
    Ok(report)
}

fn mark(
    src: &StoreNodes<'_>,
    hash: &Hash,
    nodes: &mut HashSet<Hash>,
    chunks: &mut HashSet<Hash>,
) -> Result<(), StoreError> {
    if !nodes.insert(*hash) {
        return Ok(());
    }
    match src.node(hash)? {
        None => Err(StoreError::Read(format!(
            "kept tree node {} is missing",
            hash.short()
        ))),
        Some(Node::Root { top, .. }) => mark(src, &top, nodes, chunks),
        Some(Node::Inner { level, children }) => {
            for c in children {
                if level == 1 {
                    if !c.is_zero() {
                        chunks.insert(c);
                    }
                } else {
                    mark(src, &c, nodes, chunks)?;
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use crate::store::tree::Tree;

    fn point(id: u64, created: u64) -> RecoveryPoint {
        RecoveryPoint {
            id,
            volume: "v".into(),
            root: Hash::ZERO,
            created,
            size: 0,
            source: "test".into(),
            seq: None,
            pinned: None,
        }
    }

    #[test]
    fn a_clock_jump_either_way_never_prunes_what_it_should_keep() {
        let r = Retention::default();
        let t = 1_000_000_000u64;
        // Points a minute apart, then the clock jumps 30 days ahead for
        // two points, then 60 days back for two more; `now` is the trusted
        // (monotonic) time, just after the last one.
        let mut pts: Vec<RecoveryPoint> = (0..5).map(|i| point(i + 1, t + i * 60)).collect();
        pts.push(point(6, t + 300 + 30 * 86400));
        pts.push(point(7, t + 360 + 30 * 86400));
        pts.push(point(8, t + 420 - 30 * 86400));
        pts.push(point(9, t + 480 - 30 * 86400));
        assert_eq!(
            prune(&pts, t + 500, &r),
            Vec::<u64>::new(),
            "all points are minutes old by the trusted clock"
        );
    }

    #[test]
    fn retention_keeps_all_recent_then_hourly_then_daily_and_always_the_newest() {
        let now = 30 * 86400;
        let mut pts = Vec::new();
        let mut id = 0;
        // A point every 10 minutes for 10 days.
        for t in (now - 10 * 86400..=now - 600).step_by(600) {
            id += 1;
            pts.push(point(id, t));
        }
        let r = Retention::default();
        let dropped: HashSet<u64> = prune(&pts, now, &r).into_iter().collect();
        let kept: Vec<&RecoveryPoint> = pts.iter().filter(|p| !dropped.contains(&p.id)).collect();
        assert!(
            kept.iter().filter(|p| now - p.created <= 3600).count() == 6,
            "every point of the last hour"
        );
        let hourly = kept
            .iter()
            .filter(|p| (3601..=86400).contains(&(now - p.created)))
            .count();
        assert!(
            (23..=24).contains(&hourly),
            "one per hour for a day, got {hourly}"
        );
        let daily = kept
            .iter()
            .filter(|p| (86401..=7 * 86400).contains(&(now - p.created)))
            .count();
        assert!(
            (6..=7).contains(&daily),
            "one per day for a week, got {daily}"
        );
        assert!(
            kept.iter().all(|p| now - p.created <= 7 * 86400),
            "nothing older than a week"
        );
        // Only an old point: still kept, it is the newest.
        assert!(prune(&[point(1, 0)], now, &r).is_empty());
    }

    fn store_tree(s: &MemoryStore, seed: u8, n: usize) -> (Hash, Vec<Hash>) {
        let mut leaves = Vec::new();
        for i in 0..n {
            let d = vec![seed, i as u8, 1, 2, 3];
            let h = Hash::of_chunk(&d);
            s.put_chunk(&h, &d).unwrap();
            leaves.push(h);
        }
        let t = Tree::build(n as u64 * 4096, 4096, leaves.clone());
        s.apply(t.node_ops(), true).unwrap();
        (t.root, leaves)
    }

    #[test]
    fn collection_deletes_only_what_no_kept_root_reaches() {
        let s = MemoryStore::new();
        let (a, la) = store_tree(&s, 1, 300);
        let (b, lb) = store_tree(&s, 2, 10);
        let (_c, lc) = store_tree(&s, 3, 10);
        let stray = b"a chunk from a pass in progress".to_vec();
        let sh = Hash::of_chunk(&stray);
        s.put_chunk(&sh, &stray).unwrap();
        let spare: HashSet<Hash> = [sh].into();
        let r = collect(&s, &[a, b], &spare).unwrap();
        assert_eq!(r.chunks_deleted, 10);
        assert_eq!(r.chunks_spared, 1);
        for h in la.iter().chain(&lb) {
            assert!(s.has_chunk(h).unwrap(), "a reachable chunk survives");
        }
        assert!(
            lc.iter().all(|h| !s.has_chunk(h).unwrap()),
            "unreachable chunks go"
        );
        assert!(s.has_chunk(&sh).unwrap(), "a fresh chunk is spared once");
        // Every node left has its whole subtree.
        for n in s.node_names().unwrap() {
            let mut ok = true;
            let _ = mark(
                &StoreNodes(&s),
                &n,
                &mut HashSet::new(),
                &mut HashSet::new(),
            )
            .map_err(|_| ok = false);
            assert!(ok);
        }
        let r = collect(&s, &[a], &HashSet::new()).unwrap();
        assert_eq!(r.chunks_deleted, 11);
        assert!(
            collect(&s, &[b], &HashSet::new()).is_err(),
            "a kept root whose tree is gone is an error, not a silent wipe"
        );
    }
}
