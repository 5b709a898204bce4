//! The chunks a replica's pass received, decoded and verified, kept in
//! memory until its commit: the commit writes them into the replica image
//! from here instead of reading each back from the store and decompressing
//! it again (for a 1 % pass, most of what it writes). Bounded by one budget
//! for the whole site. A chunk that came as a delta and does not fit whole
//! is kept as that delta over what the replica image holds where it goes
//! (or over zeros), a sixteenth of its size for a 4 KiB change: the commit
//! rebuilds it there and checks its name. What does not fit either way is
//! read back from the store.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::hash::Hash;

/// Bytes of decoded chunks the site keeps for commits, across volumes.
pub const RECENT_BYTES_MAX: u64 = 64 << 20;

/// Delta bases whose place in a replica image the site remembers, across
/// volumes (some 80 bytes each, the map's slack included).
pub const BASES_MAX: u64 = 1 << 18;

/// The site's budget (bytes left) that every volume's `RecentChunks` draw from.
pub fn budget() -> Arc<AtomicU64> {
    Arc::new(AtomicU64::new(RECENT_BYTES_MAX))
}

/// The site's budget of `PassBases` entries.
pub fn bases_budget() -> Arc<AtomicU64> {
    Arc::new(AtomicU64::new(BASES_MAX))
}

/// The part of the budget whole chunks leave for deltas (a quarter): a
/// chunk that came as a delta is kept whole only while at least this
/// would remain, so that a large pass keeps the rest as deltas.
pub const DELTA_RESERVE_BYTES: u64 = RECENT_BYTES_MAX / 4;

/// Takes `n` from `budget` if it has that much left.
fn take(budget: &AtomicU64, n: u64) -> bool {
    take_leaving(budget, n, 0)
}

/// Takes `n` from `budget` if at least `keep` would be left.
fn take_leaving(budget: &AtomicU64, n: u64, keep: u64) -> bool {
    budget
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
            left.checked_sub(n).filter(|after| *after >= keep)
        })
        .is_ok()
}

/// A chunk rebuilt from a delta, as that delta: `blocks` (4 KiB block
/// indices, increasing) replaced by `data` over the `len` bytes the
/// replica image held at chunk `at` when it was rebuilt (`None`: over
/// zeros). Only a way to rebuild it again; the commit checks the result's
/// name before it writes it.
pub struct DeltaOver {
    pub at: Option<u64>,
    pub len: u32,
    pub blocks: Vec<u32>,
    pub data: Vec<u8>,
}

impl DeltaOver {
    /// What keeping it costs the budget (the map entry included).
    fn cost(&self) -> u64 {
        (self.data.capacity() + self.blocks.capacity() * 4 + 64) as u64
    }
}

/// A kept chunk.
pub enum Kept {
    Whole(Arc<Vec<u8>>),
    Delta(DeltaOver),
}

/// One volume's kept chunks; its bytes go back to the budget when it is
/// cleared or dropped.
#[derive(Default)]
pub struct RecentChunks {
    chunks: HashMap<Hash, Kept>,
    bytes: u64,
    budget: Option<Arc<AtomicU64>>,
}

impl RecentChunks {
    /// Keeps `data` (verified against `hash`) if the budget has room, else
    /// `delta` (how it was rebuilt, if it was) if the budget has room for that.
    pub fn keep(
        &mut self,
        budget: &Arc<AtomicU64>,
        hash: Hash,
        data: Arc<Vec<u8>>,
        delta: Option<DeltaOver>,
    ) {
        if self.chunks.contains_key(&hash) {
            return;
        }
        let len = data.len() as u64;
        let reserve = if delta.is_some() {
            DELTA_RESERVE_BYTES
        } else {
            0
        };
        let (kept, cost) = if take_leaving(budget, len, reserve) {
            (Kept::Whole(data), len)
        } else {
            match delta {
                Some(d) if take(budget, d.cost()) => {
                    let cost = d.cost();
                    (Kept::Delta(d), cost)
                }
                _ => return,
            }
        };
        if self.budget.is_none() {
            self.budget = Some(budget.clone());
        }
        self.bytes += cost;
        self.chunks.insert(hash, kept);
    }

    pub fn get(&self, hash: &Hash) -> Option<&Kept> {
        self.chunks.get(hash)
    }

    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Forgets every chunk and gives their bytes back.
    pub fn clear(&mut self) {
        self.chunks.clear();
        if let Some(b) = &self.budget {
            b.fetch_add(self.bytes, Ordering::AcqRel);
        }
        self.bytes = 0;
    }
}

impl Drop for RecentChunks {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Delta bases a pass was offered, by name: the chunk index where the
/// replica image held each, so that rebuilding a chunk reads its base
/// there (and hashes it) instead of from the store.
#[derive(Default)]
pub struct PassBases {
    at: HashMap<Hash, u64>,
    budget: Option<Arc<AtomicU64>>,
}

impl PassBases {
    /// Remembers where `base` is, if the site's budget has room.
    pub fn note(&mut self, budget: &Arc<AtomicU64>, base: Hash, index: u64) {
        if self.at.contains_key(&base) || !take(budget, 1) {
            return;
        }
        if self.budget.is_none() {
            self.budget = Some(budget.clone());
        }
        self.at.insert(base, index);
    }

    pub fn get(&self, base: &Hash) -> Option<u64> {
        self.at.get(base).copied()
    }

    /// Forgets them all (and the map's memory) and gives the budget back.
    pub fn clear(&mut self) {
        if let Some(b) = &self.budget {
            b.fetch_add(self.at.len() as u64, Ordering::AcqRel);
        }
        self.at = HashMap::new();
    }
}

impl Drop for PassBases {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Chunks a seed wrote into the replica image as they arrived (the image
/// holds no state to keep yet): by index, the name written there, so that
/// the commit writes only the rest. Counted against the bases' budget.
#[derive(Default)]
pub struct Placed {
    at: HashMap<u64, Hash>,
    budget: Option<Arc<AtomicU64>>,
}

impl Placed {
    /// Whether the budget had room to remember it (else the commit writes
    /// the chunk again, as it would have anyway).
    pub fn note(&mut self, budget: &Arc<AtomicU64>, index: u64, hash: Hash) -> bool {
        if let Some(h) = self.at.get_mut(&index) {
            *h = hash;
            return true;
        }
        if !take(budget, 1) {
            return false;
        }
        if self.budget.is_none() {
            self.budget = Some(budget.clone());
        }
        self.at.insert(index, hash);
        true
    }

    /// Forgets what was written at `index` (about to be written over).
    pub fn forget(&mut self, index: u64) {
        if self.at.remove(&index).is_some()
            && let Some(b) = &self.budget
        {
            b.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Hands over what was written and gives the budget back.
    pub fn take(&mut self) -> HashMap<u64, Hash> {
        if let Some(b) = &self.budget {
            b.fetch_add(self.at.len() as u64, Ordering::AcqRel);
        }
        std::mem::take(&mut self.at)
    }

    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_kept_within_the_budget_and_give_it_back() {
        let budget = Arc::new(AtomicU64::new(10));
        let mut a = RecentChunks::default();
        let mut b = RecentChunks::default();
        let h = |n: u8| Hash::of_chunk(&[n]);
        a.keep(&budget, h(1), Arc::new(vec![1; 6]), None);
        a.keep(&budget, h(1), Arc::new(vec![1; 6]), None);
        b.keep(&budget, h(2), Arc::new(vec![2; 6]), None);
        assert!(b.is_empty(), "over the budget: not kept");
        b.keep(&budget, h(3), Arc::new(vec![3; 4]), None);
        assert_eq!((a.len(), b.len()), (1, 1));
        assert_eq!(budget.load(Ordering::Acquire), 0);
        a.clear();
        assert!(a.get(&h(1)).is_none());
        assert_eq!(budget.load(Ordering::Acquire), 6);
        drop(b);
        assert_eq!(
            budget.load(Ordering::Acquire),
            10,
            "a dropped intake gives back"
        );
    }

    #[test]
    fn a_chunk_without_room_whole_is_kept_as_its_delta_and_gives_it_back() {
        let total = DELTA_RESERVE_BYTES + 1000;
        let budget = Arc::new(AtomicU64::new(total));
        let mut a = RecentChunks::default();
        let h = |n: u8| Hash::of_chunk(&[n]);
        let delta = |n: u8| DeltaOver {
            at: Some(n as u64),
            len: 4096,
            blocks: vec![0],
            data: vec![n; 100],
        };
        a.keep(&budget, h(1), Arc::new(vec![1; 800]), Some(delta(1)));
        assert!(matches!(a.get(&h(1)), Some(Kept::Whole(_))), "room: whole");
        a.keep(&budget, h(2), Arc::new(vec![2; 800]), Some(delta(2)));
        assert!(
            matches!(a.get(&h(2)), Some(Kept::Delta(d)) if d.at == Some(2)),
            "whole would eat into what is left for deltas: the delta"
        );
        let left = total - 800 - (100 + 4 + 64);
        assert_eq!(budget.load(Ordering::Acquire), left);
        a.keep(&budget, h(3), Arc::new(vec![3; 800]), None);
        assert!(
            matches!(a.get(&h(3)), Some(Kept::Whole(_))),
            "no delta form: whole, from the reserve"
        );
        a.keep(&budget, h(4), Arc::new(vec![4; left as usize]), None);
        assert!(a.get(&h(4)).is_none(), "no room, no delta: not kept");
        drop(a);
        assert_eq!(budget.load(Ordering::Acquire), total);
    }

    #[test]
    fn bases_are_remembered_within_the_budget_and_give_it_back() {
        let budget = Arc::new(AtomicU64::new(2));
        let mut a = PassBases::default();
        let h = |n: u8| Hash::of_chunk(&[n]);
        a.note(&budget, h(1), 10);
        a.note(&budget, h(1), 11);
        a.note(&budget, h(2), 20);
        a.note(&budget, h(3), 30);
        assert_eq!(
            (a.get(&h(1)), a.get(&h(2)), a.get(&h(3))),
            (Some(10), Some(20), None)
        );
        assert_eq!(budget.load(Ordering::Acquire), 0);
        drop(a);
        assert_eq!(budget.load(Ordering::Acquire), 2);
    }

    #[test]
    fn placed_chunks_are_remembered_within_the_budget_and_taking_them_gives_it_back() {
        let budget = Arc::new(AtomicU64::new(2));
        let mut p = Placed::default();
        let h = |n: u8| Hash::of_chunk(&[n]);
        assert!(p.note(&budget, 1, h(1)));
        assert!(
            p.note(&budget, 1, h(2)),
            "a place written again holds the newer name"
        );
        assert!(p.note(&budget, 2, h(3)));
        assert!(
            !p.note(&budget, 3, h(4)),
            "over the budget: left to the commit"
        );
        assert_eq!(budget.load(Ordering::Acquire), 0);
        let taken = p.take();
        assert_eq!(
            (taken.get(&1), taken.get(&2), taken.len()),
            (Some(&h(2)), Some(&h(3)), 2)
        );
        assert!(p.is_empty());
        assert_eq!(budget.load(Ordering::Acquire), 2);
    }
}
