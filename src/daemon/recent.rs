//! The chunks a replica's pass received, decoded and verified, kept in
//! memory until its commit: the commit writes them into the replica image
//! from here instead of reading each back from the store and decompressing
//! it again (for a 1 % pass, most of what it writes). Bounded by one budget
//! for the whole site; what does not fit is read back from the store as
//! before.

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

/// Takes `n` from `budget` if it has that much left.
fn take(budget: &AtomicU64, n: u64) -> bool {
    budget
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
            left.checked_sub(n)
        })
        .is_ok()
}

/// One volume's kept chunks; its bytes go back to the budget when it is
/// cleared or dropped.
#[derive(Default)]
pub struct RecentChunks {
    chunks: HashMap<Hash, Arc<Vec<u8>>>,
    bytes: u64,
    budget: Option<Arc<AtomicU64>>,
}

impl RecentChunks {
    /// Keeps `data` (verified against `hash`) if the budget has room.
    pub fn keep(&mut self, budget: &Arc<AtomicU64>, hash: Hash, data: Arc<Vec<u8>>) {
        if self.chunks.contains_key(&hash) {
            return;
        }
        let len = data.len() as u64;
        if !take(budget, len) {
            return;
        }
        if self.budget.is_none() {
            self.budget = Some(budget.clone());
        }
        self.bytes += len;
        self.chunks.insert(hash, data);
    }

    pub fn get(&self, hash: &Hash) -> Option<&Arc<Vec<u8>>> {
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
        a.keep(&budget, h(1), Arc::new(vec![1; 6]));
        a.keep(&budget, h(1), Arc::new(vec![1; 6]));
        b.keep(&budget, h(2), Arc::new(vec![2; 6]));
        assert!(b.is_empty(), "over the budget: not kept");
        b.keep(&budget, h(3), Arc::new(vec![3; 4]));
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
