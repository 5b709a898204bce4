//! Epoch histories: who was primary for a volume, in which generation, and
//! from which state each generation began. Comparing two sites' histories
//! tells, on every (re)connect, whether they are in step, one is behind the
//! other, or they forked (split brain): the model is DRBD's generation
//! identifiers, with an explicit list instead of four UUID slots.

use serde::{Deserialize, Serialize};

use crate::hash::Hash;

/// Entries a history keeps (the oldest go first). Invariant 6.
pub const EPOCH_HISTORY_ENTRIES_MAX: usize = 32;
/// Bytes of a site name in an entry.
pub const SITE_NAME_BYTES_MAX: usize = 64;

/// A random 128-bit generation id: a re-added volume, or a rebuilt site with
/// the same name, never matches an old entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Gen(#[serde(with = "gen_hex")] pub u128);

mod gen_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&format!("{v:032x}"))
        } else {
            s.serialize_u128(*v)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            u128::from_str_radix(&s, 16).map_err(serde::de::Error::custom)
        } else {
            u128::deserialize(d)
        }
    }
}

impl Gen {
    pub fn random() -> Gen {
        Gen(rand::random())
    }
}

/// The state a new epoch began from: the last record of the previous epoch
/// that the promoted site had applied, and the tree root of that state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fork {
    pub epoch: u64,
    pub seq: u64,
    pub checksum: u64,
    pub root: Hash,
}

/// One generation: `site` became primary with `epoch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochEntry {
    pub epoch: u64,
    pub site: String,
    pub generation: Gen,
    /// `None` for the first entry (the volume was added with this site as primary).
    pub fork: Option<Fork>,
}

/// A volume's epoch history, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct History(pub Vec<EpochEntry>);

/// How a site's history relates to its peer's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Relation {
    /// Neither side has a history for the volume.
    BothEmpty,
    /// This site has none yet (a replica being created): it adopts the peer's.
    LocalEmpty,
    /// The peer has none yet.
    PeerEmpty,
    /// Equal histories.
    InStep,
    /// This site's history is a strict prefix of the peer's: the peer is ahead.
    LocalBehind,
    /// The peer's history is a strict prefix of this site's.
    LocalAhead,
    /// They share a beginning and then diverge: both sites promoted. The
    /// last common entry, if any.
    Forked { common: Option<EpochEntry> },
    /// No entry in common (two different volumes under one name, or
    /// histories pruned past each other): counts as split brain.
    Unrelated,
}

impl Relation {
    /// Split brain: both sites have written since a common state.
    pub fn is_split(&self) -> bool {
        matches!(self, Relation::Forked { .. } | Relation::Unrelated)
    }
}

impl History {
    /// The history of a volume added at `site`: epoch 1, a fresh generation.
    pub fn first(site: &str) -> History {
        History(vec![EpochEntry {
            epoch: 1,
            site: site.to_string(),
            generation: Gen::random(),
            fork: None,
        }])
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn top(&self) -> Option<&EpochEntry> {
        self.0.last()
    }

    /// The current epoch (0 while the history is empty).
    pub fn epoch(&self) -> u64 {
        self.top().map(|e| e.epoch).unwrap_or(0)
    }

    /// Appends a generation (a promotion), dropping the oldest past the bound.
    pub fn push(&mut self, e: EpochEntry) {
        self.0.push(e);
        if self.0.len() > EPOCH_HISTORY_ENTRIES_MAX {
            let extra = self.0.len() - EPOCH_HISTORY_ENTRIES_MAX;
            self.0.drain(..extra);
        }
    }

    /// Checks a history that came from the peer before it is compared or adopted.
    pub fn check(&self) -> Result<(), String> {
        if self.0.len() > EPOCH_HISTORY_ENTRIES_MAX {
            return Err(format!(
                "epoch history of {} entries (at most {EPOCH_HISTORY_ENTRIES_MAX})",
                self.0.len()
            ));
        }
        let mut last = 0u64;
        for e in &self.0 {
            if e.epoch <= last {
                return Err(format!(
                    "epoch history not increasing at epoch {} (after {last})",
                    e.epoch
                ));
            }
            if e.site.is_empty() || e.site.len() > SITE_NAME_BYTES_MAX {
                return Err("epoch history names a site of an impossible length".into());
            }
            if let Some(f) = e.fork
                && f.epoch >= e.epoch
            {
                return Err(format!(
                    "epoch {} forks from epoch {}, which is not older",
                    e.epoch, f.epoch
                ));
            }
            last = e.epoch;
        }
        Ok(())
    }

    fn position(&self, e: &EpochEntry) -> Option<usize> {
        self.0.iter().position(|x| x == e)
    }

    /// Compares this site's history with the peer's.
    pub fn relation(&self, peer: &History) -> Relation {
        match (self.is_empty(), peer.is_empty()) {
            (true, true) => return Relation::BothEmpty,
            (true, false) => return Relation::LocalEmpty,
            (false, true) => return Relation::PeerEmpty,
            _ => {}
        }
        // Align the two lists where one's oldest entry appears in the other
        // (either may have dropped old entries past the bound).
        let (mut l, mut p) = if let Some(i) = peer.position(&self.0[0]) {
            (0, i)
        } else if let Some(j) = self.position(&peer.0[0]) {
            (j, 0)
        } else {
            return Relation::Unrelated;
        };
        let mut common = None;
        while l < self.0.len() && p < peer.0.len() && self.0[l] == peer.0[p] {
            common = Some(self.0[l].clone());
            l += 1;
            p += 1;
        }
        match (l == self.0.len(), p == peer.0.len()) {
            (true, true) => Relation::InStep,
            (true, false) => Relation::LocalBehind,
            (false, true) => Relation::LocalAhead,
            (false, false) => Relation::Forked { common },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(epoch: u64, site: &str, generation: u128) -> EpochEntry {
        EpochEntry {
            epoch,
            site: site.into(),
            generation: Gen(generation),
            fork: (epoch > 1).then_some(Fork {
                epoch: epoch - 1,
                seq: epoch * 100,
                checksum: 7,
                root: Hash::ZERO,
            }),
        }
    }

    #[test]
    fn equal_histories_are_in_step_and_a_prefix_is_behind() {
        let a = History(vec![entry(1, "a", 1), entry(2, "b", 2)]);
        let mut b = a.clone();
        assert_eq!(a.relation(&b), Relation::InStep);
        b.push(entry(3, "a", 3));
        assert_eq!(a.relation(&b), Relation::LocalBehind);
        assert_eq!(b.relation(&a), Relation::LocalAhead);
        assert!(!a.relation(&b).is_split());
    }

    #[test]
    fn two_promotions_from_one_state_are_a_fork() {
        let base = History(vec![entry(1, "a", 1)]);
        let mut x = base.clone();
        x.push(entry(2, "b", 2));
        let mut y = base.clone();
        y.push(entry(2, "a", 9));
        let r = x.relation(&y);
        assert_eq!(
            r,
            Relation::Forked {
                common: Some(entry(1, "a", 1))
            }
        );
        assert!(r.is_split());
        // A re-added volume: same name, another generation from the start.
        let other = History(vec![entry(1, "a", 5)]);
        assert_eq!(base.relation(&other), Relation::Unrelated);
        assert!(base.relation(&other).is_split());
    }

    #[test]
    fn histories_pruned_at_different_points_still_compare() {
        let mut long = History::default();
        for e in 1..=40 {
            long.push(entry(e, if e % 2 == 0 { "b" } else { "a" }, e as u128));
        }
        assert_eq!(long.0.len(), EPOCH_HISTORY_ENTRIES_MAX);
        let short = History(long.0[20..].to_vec());
        assert_eq!(short.relation(&long), Relation::InStep);
        assert_eq!(long.relation(&short), Relation::InStep);
        let behind = History(long.0[10..25].to_vec());
        assert_eq!(behind.relation(&long), Relation::LocalBehind);
    }

    #[test]
    fn empty_sides_and_malformed_histories() {
        let a = History(vec![entry(1, "a", 1)]);
        let e = History::default();
        assert_eq!(e.relation(&a), Relation::LocalEmpty);
        assert_eq!(a.relation(&e), Relation::PeerEmpty);
        assert_eq!(e.relation(&e), Relation::BothEmpty);
        assert!(a.check().is_ok());
        assert!(
            History(vec![entry(2, "a", 1), entry(2, "b", 2)])
                .check()
                .is_err()
        );
        assert!(History(vec![entry(1, "", 1)]).check().is_err());
        let long = History((1..=33).map(|e| entry(e, "a", e as u128)).collect());
        assert!(long.check().is_err());
        let json = serde_json::to_string(&History::first("a")).unwrap();
        let back: History = serde_json::from_str(&json).unwrap();
        assert_eq!(back.epoch(), 1);
        let wire = postcard::to_stdvec(&a).unwrap();
        assert_eq!(postcard::from_bytes::<History>(&wire).unwrap(), a);
    }
}
