//! The primary's side of a snapshot pass, as a state machine without I/O.
//!
//! Given the primary's tree, [`Compare`] walks it top-down against the DR
//! store: it asks which nodes the DR side holds (a held node means its whole
//! subtree is there), descends only into missing ones, and at the leaves asks
//! which chunks are missing. The driver carries each [`Ask`] to the peer,
//! feeds the answer back, sends the nodes and chunks it is told to, and
//! commits. Round trips: one per level, plus batches.

use std::collections::{HashMap, HashSet};

use super::messages::{ASK_ITEMS_MAX, ChunkHave};
use crate::hash::Hash;
use crate::store::tree::{FANOUT, Tree};

/// A question for the DR side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ask {
    /// Node hashes at `level` (>= 1), by index in that level.
    Nodes {
        level: usize,
        indices: Vec<usize>,
        hashes: Vec<Hash>,
    },
    /// Leaves by index and name; zero leaves and names already asked are left out.
    Chunks { items: Vec<(u64, Hash)> },
}

/// The answer to a [`Ask::Chunks`], for the leaves the DR side lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToSend {
    pub index: u64,
    pub hash: Hash,
    pub have: ChunkHave,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompareError {
    #[error("peer answered {got} items to a question of {asked}")]
    AnswerLength { asked: usize, got: usize },
    #[error("an answer arrived with no question outstanding")]
    Unexpected,
}

/// Top-down tree comparison. Call [`Compare::poll_ask`] until it returns
/// `None` with [`Compare::is_done`] true; feed each answer to the matching
/// `handle_*` before polling again.
#[derive(Debug)]
pub struct Compare {
    /// Level of the nodes in `frontier`; 0 means the frontier holds leaves.
    level: usize,
    frontier: Vec<usize>,
    /// Children of missing nodes: the next level's frontier.
    next: Vec<usize>,
    /// The node question awaiting its answer (one at a time: each level
    /// depends on the one above).
    nodes_out: Option<(u64, Ask)>,
    /// Chunk questions awaiting answers: independent, so several travel at once.
    chunks_out: HashMap<u64, Vec<(u64, Hash)>>,
    next_id: u64,
    asked_chunks: HashSet<Hash>,
    /// Leaves per chunk question: the answer carries block hashes per chunk
    /// and must fit a frame, so large chunks mean fewer per question.
    chunk_ask_max: usize,
    pub nodes_missing: u64,
    pub chunks_have: u64,
}

impl Compare {
    pub fn new(tree: &Tree) -> Compare {
        Compare {
            level: tree.height() as usize,
            frontier: vec![0],
            next: Vec::new(),
            nodes_out: None,
            chunks_out: HashMap::new(),
            next_id: 0,
            asked_chunks: HashSet::new(),
            chunk_ask_max: chunk_ask_max(tree.chunk_size),
            nodes_missing: 0,
            chunks_have: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.nodes_out.is_none()
            && self.chunks_out.is_empty()
            && self.frontier.is_empty()
            && self.next.is_empty()
    }

    /// The next question and its id, or `None` while the next one must wait
    /// for an answer (or when done).
    pub fn poll_ask(&mut self, tree: &Tree) -> Option<(u64, Ask)> {
        if self.nodes_out.is_some() {
            return None;
        }
        loop {
            if self.frontier.is_empty() {
                if self.next.is_empty() || self.level == 0 || !self.chunks_out.is_empty() {
                    return None;
                }
                self.level -= 1;
                self.frontier = std::mem::take(&mut self.next);
                self.frontier.reverse();
            }
            let id = self.next_id;
            if self.level == 0 {
                if self.chunks_out.len() >= CHUNK_ASKS_INFLIGHT {
                    return None;
                }
                let mut items = Vec::new();
                while items.len() < self.chunk_ask_max {
                    let Some(i) = self.frontier.pop() else { break };
                    let h = tree.levels[0][i];
                    if !h.is_zero() && self.asked_chunks.insert(h) {
                        items.push((i as u64, h));
                    }
                }
                if items.is_empty() {
                    continue;
                }
                self.next_id += 1;
                self.chunks_out.insert(id, items.clone());
                return Some((id, Ask::Chunks { items }));
            }
            let n = self.frontier.len().min(ASK_ITEMS_MAX);
            let indices: Vec<usize> = self
                .frontier
                .drain(self.frontier.len() - n..)
                .rev()
                .collect();
            let hashes = indices
                .iter()
                .map(|&i| tree.levels[self.level][i])
                .collect();
            let ask = Ask::Nodes {
                level: self.level,
                indices,
                hashes,
            };
            self.next_id += 1;
            self.nodes_out = Some((id, ask.clone()));
            return Some((id, ask));
        }
    }

    /// Takes the answer to an `Ask::Nodes`; returns the (level, index) of the
    /// nodes the DR side lacks, which the driver must send before committing.
    pub fn handle_nodes(
        &mut self,
        id: u64,
        tree: &Tree,
        have: &[bool],
    ) -> Result<Vec<(usize, usize)>, CompareError> {
        let Some((out_id, Ask::Nodes { level, indices, .. })) = self.nodes_out.take() else {
            return Err(CompareError::Unexpected);
        };
        if out_id != id {
            self.nodes_out = Some((
                out_id,
                Ask::Nodes {
                    level,
                    indices,
                    hashes: Vec::new(),
                },
            ));
            return Err(CompareError::Unexpected);
        }
        if have.len() != indices.len() {
            return Err(CompareError::AnswerLength {
                asked: indices.len(),
                got: have.len(),
            });
        }
        let below = tree.levels[level - 1].len();
        let mut missing = Vec::new();
        for (&i, &h) in indices.iter().zip(have) {
            if h {
                continue;
            }
            missing.push((level, i));
            self.nodes_missing += 1;
            let start = i * FANOUT;
            self.next.extend(start..(start + FANOUT).min(below));
        }
        Ok(missing)
    }

    /// Takes the answer to an `Ask::Chunks`; returns the chunks to send.
    pub fn handle_chunks(
        &mut self,
        id: u64,
        answers: Vec<ChunkHave>,
    ) -> Result<Vec<ToSend>, CompareError> {
        let Some(items) = self.chunks_out.remove(&id) else {
            return Err(CompareError::Unexpected);
        };
        if answers.len() != items.len() {
            return Err(CompareError::AnswerLength {
                asked: items.len(),
                got: answers.len(),
            });
        }
        let mut out = Vec::new();
        for ((index, hash), have) in items.into_iter().zip(answers) {
            if have == ChunkHave::Have {
                self.chunks_have += 1;
            } else {
                out.push(ToSend { index, hash, have });
            }
        }
        Ok(out)
    }
}

/// Chunk questions in flight at once: hides round trips on a long link.
pub const CHUNK_ASKS_INFLIGHT: usize = 4;

/// Answer bytes budgeted per chunk question (half the smallest frame limit).
const CHUNK_ANSWER_BYTES_MAX: usize = 512 << 10;

fn chunk_ask_max(chunk_size: u32) -> usize {
    let per_item = (chunk_size as usize / crate::volume::delta::BLOCK_BYTES) * 17 + 64;
    (CHUNK_ANSWER_BYTES_MAX / per_item).clamp(1, ASK_ITEMS_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// A DR side that holds the nodes and chunks of `held`.
    struct Peer {
        nodes: HashSet<Hash>,
        chunks: HashSet<Hash>,
    }
    impl Peer {
        fn holding(t: &Tree) -> Peer {
            Peer {
                nodes: t.levels[1..].iter().flatten().copied().collect(),
                chunks: t.levels[0].iter().copied().collect(),
            }
        }
    }

    fn run(tree: &Tree, peer: &Peer) -> (Vec<(usize, usize)>, Vec<u64>, usize) {
        let mut c = Compare::new(tree);
        let (mut nodes, mut chunks, mut rounds) = (vec![], vec![], 0);
        while let Some((id, ask)) = c.poll_ask(tree) {
            rounds += 1;
            match ask {
                Ask::Nodes { hashes, .. } => {
                    let have: Vec<bool> = hashes.iter().map(|h| peer.nodes.contains(h)).collect();
                    nodes.extend(c.handle_nodes(id, tree, &have).unwrap());
                }
                Ask::Chunks { items } => {
                    let have = items
                        .iter()
                        .map(|(_, h)| {
                            if peer.chunks.contains(h) {
                                ChunkHave::Have
                            } else {
                                ChunkHave::Missing
                            }
                        })
                        .collect();
                    chunks.extend(
                        c.handle_chunks(id, have)
                            .unwrap()
                            .into_iter()
                            .map(|s| s.index),
                    );
                }
            }
        }
        assert!(c.is_done());
        (nodes, chunks, rounds)
    }

    fn leaves(n: usize, salt: u32) -> Vec<Hash> {
        (0..n)
            .map(|i| {
                if i % 5 == 0 {
                    Hash::ZERO
                } else {
                    Hash::of_chunk(
                        &[(i as u32 ^ salt).to_le_bytes(), (i as u32).to_le_bytes()].concat(),
                    )
                }
            })
            .collect()
    }

    #[test]
    fn an_empty_peer_gets_every_nonzero_chunk_once() {
        let mut l = leaves(1000, 0);
        l[7] = l[3]; // a repeated chunk travels once
        let t = Tree::build(1000 * 4096, 4096, l);
        let (nodes, chunks, _) = run(
            &t,
            &Peer {
                nodes: HashSet::new(),
                chunks: HashSet::new(),
            },
        );
        assert_eq!(nodes.len(), 1 + 4);
        let expect: Vec<u64> = (0..1000u64).filter(|i| i % 5 != 0 && *i != 7).collect();
        let mut got = chunks.clone();
        got.sort();
        assert_eq!(got, expect);
    }

    #[test]
    fn a_peer_with_the_same_tree_needs_one_question() {
        let t = Tree::build(70_000 * 4096, 4096, leaves(70_000, 1));
        let (nodes, chunks, rounds) = run(&t, &Peer::holding(&t));
        assert!(nodes.is_empty() && chunks.is_empty());
        assert_eq!(rounds, 1);
    }

    #[test]
    fn only_changed_chunks_are_sent_and_only_their_paths_of_nodes() {
        let old = Tree::build(70_000 * 4096, 4096, leaves(70_000, 2));
        let mut l = leaves(70_000, 2);
        for i in [1usize, 66_001] {
            l[i] = Hash::of_chunk(b"new content");
        }
        l[300] = Hash::of_chunk(b"other new content");
        let new = Tree::build(70_000 * 4096, 4096, l);
        let (nodes, chunks, rounds) = run(&new, &Peer::holding(&old));
        // top + 2 level-2 nodes + 3 level-1 nodes lie on the changed paths
        assert_eq!(nodes.len(), 1 + 2 + 3);
        let mut c = chunks.clone();
        c.sort();
        assert_eq!(
            c,
            vec![1, 300],
            "the second copy of a new chunk is not asked twice"
        );
        assert_eq!(rounds, 4);
    }

    #[test]
    fn a_wrong_length_answer_is_an_error_not_a_panic() {
        let t = Tree::build(10 * 4096, 4096, leaves(10, 3));
        let mut c = Compare::new(&t);
        let _ = c.poll_ask(&t);
        assert_eq!(
            c.handle_nodes(0, &t, &[true, false]),
            Err(CompareError::AnswerLength { asked: 1, got: 2 })
        );
        assert_eq!(c.handle_chunks(7, vec![]), Err(CompareError::Unexpected));
    }

    #[test]
    fn chunk_questions_travel_together_and_may_be_answered_out_of_order() {
        // 64 KiB chunks ask ~1560 leaves per question: 16384 leaves make 11 questions.
        let n = 16384;
        let t = Tree::build(n as u64 * 65536, 65536, leaves(n, 9));
        let mut c = Compare::new(&t);
        let (id, ask) = c.poll_ask(&t).unwrap();
        assert!(matches!(ask, Ask::Nodes { .. }));
        assert!(
            c.poll_ask(&t).is_none(),
            "a node level waits for its answer"
        );
        let _ = c.handle_nodes(id, &t, &[false]).unwrap();
        let (id, _) = c.poll_ask(&t).unwrap();
        let missing = vec![false; t.levels[1].len()];
        c.handle_nodes(id, &t, &missing).unwrap();
        let mut out = Vec::new();
        while let Some((id, ask)) = c.poll_ask(&t) {
            out.push((id, ask));
        }
        assert_eq!(
            out.len(),
            CHUNK_ASKS_INFLIGHT,
            "chunk questions go out together, up to the bound"
        );
        let mut sent = 0;
        while let Some((id, ask)) = out.pop() {
            let Ask::Chunks { items } = ask else {
                panic!("expected chunks")
            };
            sent += c
                .handle_chunks(id, vec![ChunkHave::Missing; items.len()])
                .unwrap()
                .len();
            while let Some(more) = c.poll_ask(&t) {
                out.insert(0, more);
            }
        }
        assert!(c.is_done());
        assert_eq!(sent, leaves(n, 9).iter().filter(|h| !h.is_zero()).count());
    }
}
