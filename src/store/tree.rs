//! The Merkle tree over a volume's chunk hashes.
//!
//! Level 0 holds the chunk hashes (leaves, `Hash::ZERO` for zero chunks).
//! A node at level `l >= 1` names up to [`FANOUT`] hashes of level `l - 1`.
//! The root node names the top node plus the volume's size and chunk size, so
//! equal roots mean equal volumes of equal shape. Every node is named by a keyed
//! blake3 of its encoding, so nodes and chunks live in separate name spaces.

use super::StoreError;
use crate::hash::Hash;

/// Children per node: a 1 GiB volume at 64 KiB chunks is three levels deep.
pub const FANOUT: usize = 256;
const NODE_CONTEXT: &str = "ferry 2026-11 tree node v1";
const ROOT_TAG: u8 = 0xFF;
/// A node of FANOUT children plus its header; the largest node encoding.
pub const NODE_BYTES_MAX: usize = 3 + FANOUT * 32;

/// A decoded tree node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    /// Names the hashes one level down (level 1 names chunks).
    Inner { level: u8, children: Vec<Hash> },
    /// Names the top inner node and the volume's shape.
    Root {
        size: u64,
        chunk_size: u32,
        height: u8,
        top: Hash,
    },
}

impl Node {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Node::Inner { level, children } => {
                let mut out = Vec::with_capacity(3 + children.len() * 32);
                out.push(*level);
                out.extend_from_slice(&(children.len() as u16).to_le_bytes());
                for c in children {
                    out.extend_from_slice(&c.0);
                }
                out
            }
            Node::Root {
                size,
                chunk_size,
                height,
                top,
            } => {
                let mut out = Vec::with_capacity(46);
                out.push(ROOT_TAG);
                out.extend_from_slice(&size.to_le_bytes());
                out.extend_from_slice(&chunk_size.to_le_bytes());
                out.push(*height);
                out.extend_from_slice(&top.0);
                out
            }
        }
    }

    /// Decodes a node, checking every length before use.
    pub fn decode(bytes: &[u8]) -> Result<Node, String> {
        let (&tag, rest) = bytes.split_first().ok_or("empty node")?;
        if tag == ROOT_TAG {
            if rest.len() != 8 + 4 + 1 + 32 {
                return Err(format!("root node of {} bytes", bytes.len()));
            }
            let size = u64::from_le_bytes(rest[0..8].try_into().map_err(|_| "size")?);
            let chunk_size = u32::from_le_bytes(rest[8..12].try_into().map_err(|_| "chunk size")?);
            let height = rest[12];
            let top = Hash(rest[13..45].try_into().map_err(|_| "top")?);
            if !(4096..=(4 << 20)).contains(&chunk_size)
                || !chunk_size.is_power_of_two()
                || height == 0
            {
                return Err("root node with an invalid shape".into());
            }
            // The size must fit the tree: a root from a hostile peer that
            // names an enormous size over a small tree would make the DR
            // side size its replica (and everything sized by chunks) to it.
            if size > VOLUME_BYTES_MAX {
                return Err(format!(
                    "root node of a {size}-byte volume, over the {VOLUME_BYTES_MAX}-byte limit"
                ));
            }
            if height != height_for(chunk_count(size, chunk_size)) {
                return Err(format!(
                    "root node of height {height} for {} chunks (height {})",
                    chunk_count(size, chunk_size),
                    height_for(chunk_count(size, chunk_size))
                ));
            }
            return Ok(Node::Root {
                size,
                chunk_size,
                height,
                top,
            });
        }
        if tag == 0 || rest.len() < 2 {
            return Err("inner node with a bad header".into());
        }
        let n = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        if n > FANOUT || rest.len() != 2 + n * 32 {
            return Err(format!(
                "inner node declares {n} children in {} bytes",
                bytes.len()
            ));
        }
        let children = rest[2..]
            .chunks_exact(32)
            .map(|c| Hash(c.try_into().unwrap_or([0; 32])))
            .collect();
        Ok(Node::Inner {
            level: tag,
            children,
        })
    }

    /// The name of an encoded node.
    pub fn hash_encoded(bytes: &[u8]) -> Hash {
        let mut h = blake3::Hasher::new_derive_key(NODE_CONTEXT);
        h.update(bytes);
        Hash(*h.finalize().as_bytes())
    }
}

/// The largest volume a root may describe (1 PiB).
pub const VOLUME_BYTES_MAX: u64 = 1 << 50;

/// The height [`Tree::build`] gives a tree of `leaves` leaves.
pub fn height_for(leaves: u64) -> u8 {
    let (mut h, mut span) = (1u8, FANOUT as u64);
    while span < leaves {
        span = span.saturating_mul(FANOUT as u64);
        h += 1;
    }
    h
}

/// A whole tree held in memory, as the primary builds it from an image.
#[derive(Clone, Debug)]
pub struct Tree {
    pub size: u64,
    pub chunk_size: u32,
    /// `levels[0]` are the leaves; the last level has exactly one node.
    pub levels: Vec<Vec<Hash>>,
    pub root: Hash,
}

impl Tree {
    pub fn build(size: u64, chunk_size: u32, leaves: Vec<Hash>) -> Tree {
        let mut levels = vec![leaves];
        loop {
            let below = levels.last().map(Vec::as_slice).unwrap_or(&[]);
            let level = levels.len() as u8;
            let mut up: Vec<Hash> = below
                .chunks(FANOUT)
                .map(|c| {
                    Node::hash_encoded(
                        &Node::Inner {
                            level,
                            children: c.to_vec(),
                        }
                        .encode(),
                    )
                })
                .collect();
            if up.is_empty() {
                up.push(Node::hash_encoded(
                    &Node::Inner {
                        level,
                        children: vec![],
                    }
                    .encode(),
                ));
            }
            let done = up.len() == 1;
            levels.push(up);
            if done {
                break;
            }
        }
        let height = (levels.len() - 1) as u8;
        let top = levels[levels.len() - 1][0];
        let root = Node::hash_encoded(
            &Node::Root {
                size,
                chunk_size,
                height,
                top,
            }
            .encode(),
        );
        Tree {
            size,
            chunk_size,
            levels,
            root,
        }
    }

    pub fn height(&self) -> u8 {
        (self.levels.len() - 1) as u8
    }

    pub fn leaves(&self) -> &[Hash] {
        &self.levels[0]
    }

    pub fn root_node(&self) -> Node {
        Node::Root {
            size: self.size,
            chunk_size: self.chunk_size,
            height: self.height(),
            top: self.levels[self.levels.len() - 1][0],
        }
    }

    /// Every node of the tree, inner nodes bottom up and then the root, as
    /// the store ops that record them (a tree kept whole).
    pub fn node_ops(&self) -> Vec<super::Op> {
        let mut ops = Vec::new();
        for (level, hashes) in self.levels.iter().enumerate().skip(1) {
            for (i, h) in hashes.iter().enumerate() {
                ops.push(super::Op::PutNode(*h, self.node(level, i).encode()));
            }
        }
        ops.push(super::Op::PutNode(self.root, self.root_node().encode()));
        ops
    }

    /// The inner node at `level >= 1`, index `index`.
    pub fn node(&self, level: usize, index: usize) -> Node {
        let below = &self.levels[level - 1];
        let start = (index * FANOUT).min(below.len());
        let end = ((index + 1) * FANOUT).min(below.len());
        Node::Inner {
            level: level as u8,
            children: below[start..end].to_vec(),
        }
    }

    /// Byte range of chunk `index` within the volume.
    pub fn chunk_range(&self, index: u64) -> (u64, u64) {
        chunk_range(self.size, self.chunk_size, index)
    }
}

/// Byte range `[start, end)` of chunk `index` in a volume of `size` bytes.
pub fn chunk_range(size: u64, chunk_size: u32, index: u64) -> (u64, u64) {
    let start = index.saturating_mul(chunk_size as u64).min(size);
    (start, (start + chunk_size as u64).min(size))
}

/// Number of chunks in a volume.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(chunk_size as u64)
}

/// Where nodes come from when walking a stored tree.
pub trait NodeSource {
    fn node(&self, hash: &Hash) -> Result<Option<Node>, StoreError>;
}

/// The leaves of the tree under a root, by index, for lookups that mostly
/// go in index order (the leaves of one question, a walk of a newer tree):
/// the nodes on the last path are kept, one per level, so each node is read
/// and verified once per run of lookups under it, and memory is the tree's
/// height in nodes whatever the volume's size.
pub struct LeafCursor<'a> {
    src: &'a dyn NodeSource,
    height: u8,
    top: Hash,
    /// Per level below the root (`path[l - 1]` for level `l`): the index of
    /// the node kept in its level, and its children.
    path: Vec<Option<(u64, Vec<Hash>)>>,
}

impl<'a> LeafCursor<'a> {
    pub fn new(src: &'a dyn NodeSource, root: &Hash) -> Result<LeafCursor<'a>, StoreError> {
        let (_, _, height, top) = root_shape(src, root)?;
        Ok(LeafCursor {
            src,
            height,
            top,
            path: vec![None; height as usize],
        })
    }

    /// The leaf at `index`, or `None` past the end.
    pub fn leaf(&mut self, index: u64) -> Result<Option<Hash>, StoreError> {
        let mut hash = self.top;
        for level in (1..=self.height).rev() {
            let span = (FANOUT as u64).pow(u32::from(level) - 1);
            let node = index / span / FANOUT as u64;
            if level == self.height && node != 0 {
                return Ok(None);
            }
            let Some(slot) = self.path.get_mut(usize::from(level) - 1) else {
                return Ok(None);
            };
            let kids = match slot {
                Some((at, kids)) if *at == node => kids,
                _ => &mut slot.insert((node, children(self.src, &hash, level)?)).1,
            };
            match kids.get(((index / span) % FANOUT as u64) as usize) {
                Some(h) => hash = *h,
                None => return Ok(None),
            }
        }
        Ok(Some(hash))
    }
}

/// A store's committed nodes as a [`NodeSource`].
pub struct StoreNodes<'a>(pub &'a dyn super::ChunkStore);

impl NodeSource for StoreNodes<'_> {
    fn node(&self, hash: &Hash) -> Result<Option<Node>, StoreError> {
        match self.0.get_node(hash)? {
            None => Ok(None),
            Some(bytes) => {
                Node::decode(&bytes)
                    .map(Some)
                    .map_err(|reason| StoreError::NodeCorrupt {
                        hash: *hash,
                        reason,
                    })
            }
        }
    }
}

fn need(src: &dyn NodeSource, hash: &Hash) -> Result<Node, StoreError> {
    src.node(hash)?
        .ok_or_else(|| StoreError::Read(format!("tree node {} is missing", hash.short())))
}

/// The shape a root names.
pub fn root_shape(src: &dyn NodeSource, root: &Hash) -> Result<(u64, u32, u8, Hash), StoreError> {
    match need(src, root)? {
        Node::Root {
            size,
            chunk_size,
            height,
            top,
        } => Ok((size, chunk_size, height, top)),
        Node::Inner { .. } => Err(StoreError::NodeCorrupt {
            hash: *root,
            reason: "expected a root node".into(),
        }),
    }
}

/// The children of the inner node `hash` at `level`.
pub fn children(src: &dyn NodeSource, hash: &Hash, level: u8) -> Result<Vec<Hash>, StoreError> {
    match need(src, hash)? {
        Node::Inner { level: l, children } if l == level => Ok(children),
        _ => Err(StoreError::NodeCorrupt {
            hash: *hash,
            reason: format!("expected an inner node at level {level}"),
        }),
    }
}

/// Calls `f(index, leaf)` for every leaf of the tree under `root`, in order.
pub fn for_each_leaf(
    src: &dyn NodeSource,
    root: &Hash,
    f: &mut dyn FnMut(u64, Hash) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let (size, chunk_size, height, top) = root_shape(src, root)?;
    let want = chunk_count(size, chunk_size);
    let mut next = 0u64;
    let bad = |reason: String| StoreError::NodeCorrupt {
        hash: *root,
        reason,
    };
    walk(src, &top, height, &mut next, &mut |i, h| {
        if i >= want {
            return Err(bad(format!(
                "the tree has more leaves than its {want} chunks"
            )));
        }
        f(i, h)
    })?;
    if next != want {
        return Err(bad(format!("the tree has {next} leaves for {want} chunks")));
    }
    Ok(())
}

fn walk(
    src: &dyn NodeSource,
    hash: &Hash,
    level: u8,
    next: &mut u64,
    f: &mut dyn FnMut(u64, Hash) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    for child in children(src, hash, level)? {
        if level == 1 {
            f(*next, child)?;
            *next += 1;
        } else {
            walk(src, &child, level - 1, next, f)?;
        }
    }
    Ok(())
}

/// Calls `f(index, old_leaf, new_leaf)` for every leaf that differs between
/// two trees (old absent = `Hash::ZERO` beyond its end), skipping equal subtrees.
/// Cost: O(changes x height) node reads when the shapes match.
pub fn diff_leaves(
    src: &dyn NodeSource,
    old: Option<&Hash>,
    new: &Hash,
    f: &mut dyn FnMut(u64, Hash, Hash) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let (new_size, new_cs, new_h, new_top) = root_shape(src, new)?;
    let want = chunk_count(new_size, new_cs);
    let mut f = |i: u64, o: Hash, n: Hash| {
        if i >= want {
            return Err(StoreError::NodeCorrupt {
                hash: *new,
                reason: format!("the tree has more leaves than its {want} chunks"),
            });
        }
        f(i, o, n)
    };
    let f: &mut dyn FnMut(u64, Hash, Hash) -> Result<(), StoreError> = &mut f;
    if let Some(old) = old {
        let (_, old_cs, old_h, old_top) = root_shape(src, old)?;
        if old_cs == new_cs && old_h == new_h {
            return diff_nodes(src, Some(&old_top), &new_top, new_h, 0, f);
        }
        // Shapes differ (resize across a level or a new chunk size): compare leaf by leaf.
        let mut old_leaves = Vec::new();
        if old_cs == new_cs {
            for_each_leaf(src, old, &mut |_, h| {
                old_leaves.push(h);
                Ok(())
            })?;
        }
        return for_each_leaf(src, new, &mut |i, h| {
            let o = old_leaves.get(i as usize).copied().unwrap_or(Hash::ZERO);
            if o != h { f(i, o, h) } else { Ok(()) }
        });
    }
    diff_nodes(src, None, &new_top, new_h, 0, f)
}

fn diff_nodes(
    src: &dyn NodeSource,
    old: Option<&Hash>,
    new: &Hash,
    level: u8,
    first_leaf: u64,
    f: &mut dyn FnMut(u64, Hash, Hash) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    if old == Some(new) {
        return Ok(());
    }
    let new_children = children(src, new, level)?;
    let old_children = match old {
        Some(o) => children(src, o, level)?,
        None => Vec::new(),
    };
    let span = (FANOUT as u64).pow(level as u32 - 1);
    for (i, n) in new_children.iter().enumerate() {
        let o = old_children.get(i);
        let start = first_leaf + i as u64 * span;
        if level == 1 {
            let o = o.copied().unwrap_or(Hash::ZERO);
            if o != *n {
                f(start, o, *n)?;
            }
        } else {
            diff_nodes(src, o, n, level - 1, start, f)?;
        }
    }
    Ok(())
}

/// The leaf at `index` under `root`, or `None` past the end.
pub fn leaf_at(src: &dyn NodeSource, root: &Hash, index: u64) -> Result<Option<Hash>, StoreError> {
    let (_, _, height, top) = root_shape(src, root)?;
    let mut hash = top;
    for level in (1..=height).rev() {
        let span = (FANOUT as u64).pow(level as u32 - 1);
        let kids = children(src, &hash, level)?;
        let i = ((index / span) % FANOUT as u64) as usize;
        match kids.get(i) {
            Some(h) => hash = *h,
            None => return Ok(None),
        }
    }
    Ok(Some(hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Map(HashMap<Hash, Node>);
    impl NodeSource for Map {
        fn node(&self, hash: &Hash) -> Result<Option<Node>, StoreError> {
            Ok(self.0.get(hash).cloned())
        }
    }
    fn index(tree: &Tree) -> Map {
        let mut m = HashMap::new();
        m.insert(tree.root, tree.root_node());
        for level in 1..tree.levels.len() {
            for i in 0..tree.levels[level].len() {
                m.insert(tree.levels[level][i], tree.node(level, i));
            }
        }
        Map(m)
    }
    fn leaves(n: usize, salt: u8) -> Vec<Hash> {
        (0..n)
            .map(|i| {
                if i % 7 == 3 {
                    Hash::ZERO
                } else {
                    Hash::of_chunk(&[(i % 251) as u8, salt, (i / 251) as u8])
                }
            })
            .collect()
    }

    #[test]
    fn a_root_whose_size_disagrees_with_its_tree_is_refused() {
        let t = Tree::build(300 * 4096, 4096, leaves(300, 1));
        assert_eq!(t.height(), height_for(300));
        let root = |size: u64, height: u8| {
            Node::Root {
                size,
                chunk_size: 4096,
                height,
                top: t.levels[t.levels.len() - 1][0],
            }
            .encode()
        };
        assert!(Node::decode(&root(300 * 4096, 2)).is_ok());
        assert!(
            Node::decode(&root(1 << 40, 2)).is_err(),
            "too big for its height"
        );
        assert!(Node::decode(&root(u64::MAX - 7, 8)).is_err(), "near 2^64");
        assert!(
            Node::decode(&root(4096, 2)).is_err(),
            "too small for its height"
        );
        // Right height, wrong leaf count: found when the leaves are walked.
        let mut src = index(&t);
        let short = root(299 * 4096, 2);
        let short_hash = Node::hash_encoded(&short);
        src.0.insert(short_hash, Node::decode(&short).unwrap());
        let r = for_each_leaf(&src, &short_hash, &mut |_, _| Ok(()));
        assert!(r.is_err(), "300 leaves under a 299-chunk root");
    }

    #[test]
    fn equal_leaves_give_equal_roots_and_any_change_moves_the_root() {
        let a = Tree::build(1 << 30, 65536, leaves(16384, 0));
        let b = Tree::build(1 << 30, 65536, leaves(16384, 0));
        assert_eq!(a.root, b.root);
        assert_eq!(a.height(), 2);
        let mut l = leaves(16384, 0);
        l[9999] = Hash::of_chunk(b"x");
        assert_ne!(Tree::build(1 << 30, 65536, l).root, a.root);
        assert_ne!(
            Tree::build((1 << 30) - 1, 65536, leaves(16384, 0)).root,
            a.root
        );
    }

    #[test]
    fn nodes_round_trip_and_bad_encodings_are_refused() {
        let t = Tree::build(300 * 4096, 4096, leaves(300, 1));
        for n in [t.root_node(), t.node(1, 0), t.node(1, 1)] {
            assert_eq!(Node::decode(&n.encode()).unwrap(), n);
        }
        let mut enc = t.node(1, 0).encode();
        enc[1] = 0xFF;
        assert!(Node::decode(&enc).is_err());
        assert!(Node::decode(&[]).is_err());
        assert!(Node::decode(&[ROOT_TAG, 1, 2]).is_err());
    }

    #[test]
    fn diff_finds_exactly_the_changed_leaves() {
        let old = Tree::build(70000 * 4096, 4096, leaves(70000, 2));
        let mut l = leaves(70000, 2);
        for i in [0usize, 255, 256, 65535, 65536, 69999] {
            l[i] = Hash::of_chunk(&i.to_le_bytes());
        }
        let new = Tree::build(70000 * 4096, 4096, l);
        let mut src = index(&old);
        src.0.extend(index(&new).0);
        let mut seen = vec![];
        diff_leaves(&src, Some(&old.root), &new.root, &mut |i, _, _| {
            seen.push(i);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![0, 255, 256, 65535, 65536, 69999]);
        for i in [0u64, 300, 65536, 69999] {
            assert_eq!(
                leaf_at(&src, &new.root, i).unwrap(),
                Some(new.leaves()[i as usize])
            );
        }
        assert_eq!(leaf_at(&src, &new.root, 70000).unwrap(), None);
    }

    #[test]
    fn a_leaf_cursor_finds_every_leaf_in_any_order_and_nothing_past_the_end() {
        // Height 3: 70000 leaves need two levels of 256 and a third.
        let t = Tree::build(70000 * 4096, 4096, leaves(70000, 5));
        let src = index(&t);
        let mut c = LeafCursor::new(&src, &t.root).unwrap();
        for i in (0..70000u64).step_by(7) {
            assert_eq!(c.leaf(i).unwrap(), Some(t.leaves()[i as usize]), "leaf {i}");
        }
        for i in [69999u64, 3, 65536, 255, 256, 0, 65535] {
            assert_eq!(c.leaf(i).unwrap(), Some(t.leaves()[i as usize]), "leaf {i}");
        }
        // Past the end, and past what the tree's height could hold (where
        // an index taken modulo the fanout would name another leaf).
        for i in [
            70000u64,
            70001,
            256 * 256 * 256,
            256 * 256 * 256 + 5,
            u64::MAX,
        ] {
            assert_eq!(c.leaf(i).unwrap(), None, "index {i}");
        }
        assert_eq!(c.leaf(5).unwrap(), Some(t.leaves()[5]));
    }

    #[test]
    fn diff_against_nothing_lists_every_nonzero_leaf_and_resizes_compare_by_leaf() {
        let small = Tree::build(10 * 4096, 4096, leaves(10, 3));
        let big = Tree::build(300 * 4096, 4096, leaves(300, 3));
        let mut src = index(&small);
        src.0.extend(index(&big).0);
        let mut n = 0;
        diff_leaves(&src, None, &small.root, &mut |_, _, _| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(
            n, 9,
            "against nothing, every non-zero leaf differs (index 3 is zero)"
        );
        let mut changed = vec![];
        diff_leaves(&src, Some(&small.root), &big.root, &mut |i, _, h| {
            if !h.is_zero() {
                changed.push(i)
            }
            Ok(())
        })
        .unwrap();
        assert!(changed.iter().all(|&i| i >= 10));
        assert_eq!(changed.len(), (10..300).filter(|i| i % 7 != 3).count());
    }
}
