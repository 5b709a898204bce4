//! Scrubbing: every node and chunk that a set of roots (a volume's recovery
//! points) reaches is read back and checked against its name, and what is
//! damaged or missing is put back from an image that holds the same bytes
//! (a chunk is its name's content wherever it is found, so any copy that
//! hashes to the name is the chunk). What no copy holds is reported with
//! the roots that reach it: those points can no longer be restored whole.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::tree::{Node, Tree};
use super::{ChunkStore, Op, StoreError};
use crate::hash::Hash;

/// One damaged or missing object.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Damage {
    /// `chunk` or `node`.
    pub kind: String,
    pub hash: String,
    pub reason: String,
}

/// What a walk over a set of roots found.
#[derive(Clone, Debug, Default)]
pub struct Walk {
    pub nodes_checked: u64,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub damaged_chunks: HashMap<Hash, String>,
    pub damaged_nodes: HashMap<Hash, String>,
    /// Indices of `roots` that reach damage.
    pub roots_damaged: Vec<usize>,
}

impl Walk {
    pub fn damage(&self) -> Vec<Damage> {
        let mut out: Vec<Damage> = self
            .damaged_nodes
            .iter()
            .map(|(h, r)| Damage {
                kind: "node".into(),
                hash: h.to_string(),
                reason: r.clone(),
            })
            .chain(self.damaged_chunks.iter().map(|(h, r)| Damage {
                kind: "chunk".into(),
                hash: h.to_string(),
                reason: r.clone(),
            }))
            .collect();
        out.sort_by(|a, b| (&a.kind, &a.hash).cmp(&(&b.kind, &b.hash)));
        out
    }

    pub fn is_clean(&self) -> bool {
        self.damaged_chunks.is_empty() && self.damaged_nodes.is_empty()
    }
}

/// Reads and checks every node and chunk `roots` reach, each once. A
/// damaged node's subtree cannot be walked; the node itself is reported.
/// Errors only when the store cannot be read at all (not for damage).
pub fn walk(store: &dyn ChunkStore, roots: &[Hash]) -> Walk {
    let mut w = Walk::default();
    // Per node: whether its subtree reaches damage (a node is walked once).
    let mut seen: HashMap<Hash, bool> = HashMap::new();
    let mut chunks_seen: HashSet<Hash> = HashSet::new();
    for (i, root) in roots.iter().enumerate() {
        if node(store, root, None, &mut w, &mut seen, &mut chunks_seen) {
            w.roots_damaged.push(i);
        }
    }
    w
}

/// Checks `hash` (a node at `level`, or a root when `None`) and below it.
/// Returns true when damage is reachable from it.
fn node(
    store: &dyn ChunkStore,
    hash: &Hash,
    level: Option<u8>,
    w: &mut Walk,
    seen: &mut HashMap<Hash, bool>,
    chunks_seen: &mut HashSet<Hash>,
) -> bool {
    if let Some(&bad) = seen.get(hash) {
        return bad;
    }
    w.nodes_checked += 1;
    let decoded = match store.get_node(hash) {
        Ok(Some(bytes)) => Node::decode(&bytes),
        Ok(None) => Err("missing".to_string()),
        Err(e) => Err(e.to_string()),
    };
    let bad = match decoded {
        Err(reason) => {
            w.damaged_nodes.insert(*hash, reason);
            true
        }
        Ok(Node::Root { top, height, .. }) if level.is_none() => {
            node(store, &top, Some(height), w, seen, chunks_seen)
        }
        Ok(Node::Inner { level: l, children }) if level == Some(l) && l >= 1 => {
            let mut bad = false;
            for c in children {
                if l == 1 {
                    if c.is_zero() {
                        continue;
                    }
                    if chunks_seen.insert(c) {
                        w.chunks_checked += 1;
                        match store.get_chunk(&c) {
                            Ok(Some(data)) => w.bytes_checked += data.len() as u64,
                            Ok(None) => {
                                w.damaged_chunks.insert(c, "missing".into());
                            }
                            Err(e) => {
                                w.damaged_chunks.insert(c, e.to_string());
                            }
                        }
                    }
                    bad |= w.damaged_chunks.contains_key(&c);
                } else {
                    bad |= node(store, &c, Some(l - 1), w, seen, chunks_seen);
                }
            }
            bad
        }
        Ok(other) => {
            w.damaged_nodes.insert(
                *hash,
                format!("a {} node where level {level:?} was expected", kind(&other)),
            );
            true
        }
    };
    seen.insert(*hash, bad);
    bad
}

fn kind(n: &Node) -> &'static str {
    match n {
        Node::Root { .. } => "root",
        Node::Inner { .. } => "inner",
    }
}

/// What [`repair`] put back.
#[derive(Clone, Copy, Debug, Default)]
pub struct Repaired {
    pub chunks: u64,
    pub nodes: u64,
}

/// Puts back what `w` found damaged, from `tree` (the tree of an image
/// scanned now) and `read_chunk` (reads that image's chunk `i`): a chunk is
/// taken only when the bytes read hash to its name, a node only when the
/// image's tree has a node of that name. Durable when it returns Ok.
pub fn repair(
    store: &dyn ChunkStore,
    w: &Walk,
    tree: &Tree,
    read_chunk: &mut dyn FnMut(u64) -> std::io::Result<Vec<u8>>,
) -> Result<Repaired, StoreError> {
    let mut done = Repaired::default();
    if !w.damaged_chunks.is_empty() {
        let mut want: HashSet<Hash> = w.damaged_chunks.keys().copied().collect();
        for (i, leaf) in tree.leaves().iter().enumerate() {
            if want.is_empty() {
                break;
            }
            if !want.contains(leaf) {
                continue;
            }
            // The image may change under the scan; what is read is checked.
            let Ok(data) = read_chunk(i as u64) else {
                continue;
            };
            if Hash::of_chunk(&data) == *leaf {
                store.replace_chunk(leaf, &data)?;
                want.remove(leaf);
                done.chunks += 1;
            }
        }
    }
    if !w.damaged_nodes.is_empty() {
        let mut found: HashMap<Hash, Vec<u8>> = HashMap::new();
        if w.damaged_nodes.contains_key(&tree.root) {
            found.insert(tree.root, tree.root_node().encode());
        }
        for (level, hashes) in tree.levels.iter().enumerate().skip(1) {
            for (i, h) in hashes.iter().enumerate() {
                if w.damaged_nodes.contains_key(h) && !found.contains_key(h) {
                    found.insert(*h, tree.node(level, i).encode());
                }
            }
        }
        let ops: Vec<Op> = found.into_iter().map(|(h, b)| Op::PutNode(h, b)).collect();
        done.nodes = ops.len() as u64;
        if !ops.is_empty() {
            store.apply(ops, false)?;
        }
    }
    store.apply(Vec::new(), true)?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use crate::store::tree::Tree;

    fn chunk(i: u8) -> Vec<u8> {
        vec![i; 4096]
    }

    /// Stores the tree of `data` (4 KiB chunks) as a point would be.
    fn put_tree(s: &MemoryStore, data: &[Vec<u8>]) -> Tree {
        let leaves = data
            .iter()
            .map(|c| {
                let h = Hash::of_chunk(c);
                s.put_chunk(&h, c).unwrap();
                h
            })
            .collect();
        let t = Tree::build(data.len() as u64 * 4096, 4096, leaves);
        s.apply(t.node_ops(), true).unwrap();
        t
    }

    #[test]
    fn a_scrub_finds_damage_names_the_points_it_breaks_and_repairs_from_an_image() {
        let s = MemoryStore::new();
        let old: Vec<Vec<u8>> = (1..=4).map(chunk).collect();
        let mut new = old.clone();
        new[3] = chunk(9);
        let t_old = put_tree(&s, &old);
        let t_new = put_tree(&s, &new);
        let roots = [t_old.root, t_new.root];
        assert!(walk(&s, &roots).is_clean());

        // Chunk 1 is in both points; chunk 4 only in the old one.
        s.corrupt_chunk(&Hash::of_chunk(&chunk(1)));
        s.corrupt_chunk(&Hash::of_chunk(&chunk(4)));
        let w = walk(&s, &roots);
        assert_eq!(w.damaged_chunks.len(), 2);
        assert_eq!(w.roots_damaged, vec![0, 1]);
        assert_eq!(w.chunks_checked, 5, "each chunk is read once");

        // The image holds the new point: chunk 1 comes back, chunk 4 cannot.
        let mut read = |i: u64| Ok(new[i as usize].clone());
        let r = repair(&s, &w, &t_new, &mut read).unwrap();
        assert_eq!(r.chunks, 1);
        let after = walk(&s, &roots);
        assert_eq!(after.roots_damaged, vec![0], "only the old point is broken");
        assert_eq!(
            after.damage(),
            vec![Damage {
                kind: "chunk".into(),
                hash: Hash::of_chunk(&chunk(4)).to_string(),
                reason: after.damaged_chunks.values().next().unwrap().clone(),
            }]
        );
        assert_eq!(
            s.get_chunk(&Hash::of_chunk(&chunk(1))).unwrap().unwrap(),
            chunk(1)
        );
    }

    #[test]
    fn bytes_that_do_not_hash_to_the_name_are_never_put_back() {
        let s = MemoryStore::new();
        let data: Vec<Vec<u8>> = (1..=2).map(chunk).collect();
        let t = put_tree(&s, &data);
        s.corrupt_chunk(&Hash::of_chunk(&chunk(2)));
        let w = walk(&s, &[t.root]);
        // The image changed since: chunk 1's place holds other bytes.
        let mut read = |_i: u64| Ok(chunk(7));
        assert_eq!(repair(&s, &w, &t, &mut read).unwrap().chunks, 0);
        assert!(!walk(&s, &[t.root]).is_clean());
    }

    #[test]
    fn a_missing_node_is_reported_and_rebuilt_from_the_image_tree() {
        let s = MemoryStore::new();
        let data: Vec<Vec<u8>> = (1..=3).map(chunk).collect();
        let t = put_tree(&s, &data);
        let inner = t.levels[1][0];
        s.apply(vec![Op::DeleteNode(inner)], true).unwrap();
        let w = walk(&s, &[t.root]);
        assert_eq!(
            w.damaged_nodes.get(&inner).map(String::as_str),
            Some("missing")
        );
        assert_eq!(w.roots_damaged, vec![0]);
        let mut read = |i: u64| Ok(data[i as usize].clone());
        assert_eq!(repair(&s, &w, &t, &mut read).unwrap().nodes, 1);
        assert!(walk(&s, &[t.root]).is_clean());
    }
}
