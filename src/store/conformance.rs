//! The conformance suite every [`ChunkStore`] implementation must pass.
//! Each check panics with the guarantee it found broken.

use super::tree::{Node, Tree};
use super::{ChunkStore, Op, StoreError};
use crate::hash::Hash;

/// Runs every check against fresh stores made by `make`.
pub fn run_all(make: &dyn Fn() -> Box<dyn ChunkStore>) {
    chunks_round_trip_and_are_idempotent(&*make());
    a_chunk_under_a_wrong_name_is_refused_and_not_stored(&*make());
    the_zero_name_is_refused(&*make());
    nodes_are_verified_and_stored_only_through_apply(&*make());
    meta_scans_by_prefix_in_order_and_batches_apply_whole(&*make());
    stats_count_chunks(&*make());
    names_list_everything_and_deletes_remove_it(&*make());
}

pub fn names_list_everything_and_deletes_remove_it(s: &dyn ChunkStore) {
    let mut put = Vec::new();
    for i in 0..5u32 {
        let d = sample(200 + i, 4096);
        let h = Hash::of_chunk(&d);
        s.put_chunk(&h, &d).unwrap();
        put.push(h);
    }
    let t = Tree::build(5 * 4096, 4096, put.clone());
    let (nh, n) = (t.levels[1][0], t.node(1, 0));
    s.apply(vec![Op::PutNode(nh, n.encode())], true).unwrap();
    let mut names = s.chunk_names().unwrap();
    names.sort();
    let mut want = put.clone();
    want.sort();
    assert_eq!(names, want, "chunk_names lists every chunk once");
    assert_eq!(s.node_names().unwrap(), vec![nh]);
    s.apply(vec![Op::DeleteNode(nh), Op::DeleteChunk(put[0])], true)
        .unwrap();
    assert!(!s.has_node(&nh).unwrap());
    assert!(!s.has_chunk(&put[0]).unwrap());
    assert!(
        s.has_chunk(&put[1]).unwrap(),
        "a delete removes only what it names"
    );
    assert_eq!(s.chunk_names().unwrap().len(), 4);
}

fn sample(i: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| ((j as u32).wrapping_mul(31).wrapping_add(i * 7919) >> 3) as u8 | 1)
        .collect()
}

pub fn chunks_round_trip_and_are_idempotent(s: &dyn ChunkStore) {
    for (i, len) in [(1u32, 4096usize), (2, 65536), (3, 1), (4, 4 << 20)] {
        let data = sample(i, len);
        let h = Hash::of_chunk(&data);
        assert!(!s.has_chunk(&h).unwrap(), "a chunk never put is absent");
        assert!(s.put_chunk(&h, &data).unwrap(), "first put is new");
        assert!(
            !s.put_chunk(&h, &data).unwrap(),
            "second put of the same chunk is not new"
        );
        assert!(s.has_chunk(&h).unwrap());
        assert_eq!(
            s.get_chunk(&h).unwrap().as_deref(),
            Some(&data[..]),
            "read back equals what was put"
        );
    }
    let text = b"compressible ".repeat(5000);
    let h = Hash::of_chunk(&text);
    s.put_chunk(&h, &text).unwrap();
    assert_eq!(s.get_chunk(&h).unwrap().unwrap(), text);
    // A chunk that arrived encoded is stored as it came, and reads back the same.
    let more = b"arrived compressed ".repeat(3000);
    let h = Hash::of_chunk(&more);
    let record = super::encode_chunk(&more);
    let checked = super::decode_checked(&record, more.len(), &h).unwrap();
    assert!(s.put_chunk_record(&checked, record.clone()).unwrap());
    assert!(!s.put_chunk_record(&checked, record.clone()).unwrap());
    assert_eq!(s.get_chunk(&h).unwrap().unwrap(), more);
    // Only a checked name makes a chunk to put so.
    let wrong = Hash::of_chunk(b"not it");
    assert!(super::decode_checked(&record, more.len(), &wrong).is_err());
    assert!(super::CheckedChunk::check(wrong, more.clone()).is_none());
    assert!(super::CheckedChunk::check(h, more.clone()).is_some());
    // A chunk rebuilt and checked goes in without another hash, and only
    // under the name it was checked against, with the name of what it was
    // rebuilt over.
    // 64 KiB: named from its subtrees (Hash::of_chunk_pair).
    let over: Vec<u8> = b"rebuilt over this "
        .iter()
        .cycle()
        .take(65536)
        .copied()
        .collect();
    let mut rebuilt = over.clone();
    rebuilt[100] ^= 1;
    let rh = Hash::of_chunk(&rebuilt);
    let (none, _) = super::CheckedChunk::check_with(wrong, rebuilt.clone(), &over);
    assert!(none.is_none());
    let (chunk, over_name) = super::CheckedChunk::check_with(rh, rebuilt.clone(), &over);
    assert_eq!(over_name, Hash::of_chunk(&over));
    let chunk = chunk.unwrap();
    assert!(s.put_checked(&chunk).unwrap());
    assert!(!s.put_checked(&chunk).unwrap());
    assert_eq!(s.get_chunk(&rh).unwrap().unwrap(), rebuilt);
    assert_eq!(s.get_chunk(&Hash::of_chunk(b"absent")).unwrap(), None);
}

pub fn a_chunk_under_a_wrong_name_is_refused_and_not_stored(s: &dyn ChunkStore) {
    let data = sample(9, 65536);
    let wrong = Hash::of_chunk(b"something else");
    assert!(matches!(
        s.put_chunk(&wrong, &data),
        Err(StoreError::ChunkMismatch { .. })
    ));
    assert!(
        !s.has_chunk(&wrong).unwrap(),
        "a refused chunk is not stored"
    );
    let huge = vec![1u8; (4 << 20) + 1];
    assert!(matches!(
        s.put_chunk(&Hash::of_chunk(&huge), &huge),
        Err(StoreError::ChunkTooLarge(_))
    ));
}

pub fn the_zero_name_is_refused(s: &dyn ChunkStore) {
    assert!(matches!(
        s.put_chunk(&Hash::ZERO, &[0u8; 4096]),
        Err(StoreError::ZeroChunk(_))
    ));
}

pub fn nodes_are_verified_and_stored_only_through_apply(s: &dyn ChunkStore) {
    let leaves: Vec<Hash> = (0..300u32)
        .map(|i| Hash::of_chunk(&i.to_le_bytes()))
        .collect();
    let t = Tree::build(300 * 4096, 4096, leaves);
    let n = t.node(1, 1);
    let h = t.levels[1][1];
    assert!(!s.has_node(&h).unwrap());
    let mut bad = n.encode();
    bad[5] ^= 1;
    assert!(matches!(
        s.apply(vec![Op::PutNode(h, bad)], true),
        Err(StoreError::NodeMismatch { .. })
    ));
    assert!(
        !s.has_node(&h).unwrap(),
        "a node under a wrong name is not stored"
    );
    s.apply(vec![Op::PutNode(h, n.encode())], true).unwrap();
    assert!(s.has_node(&h).unwrap());
    let back = s.get_node(&h).unwrap().unwrap();
    assert_eq!(Node::decode(&back).unwrap(), n);
}

pub fn meta_scans_by_prefix_in_order_and_batches_apply_whole(s: &dyn ChunkStore) {
    s.apply(
        vec![
            Op::PutMeta(b"vol/b".to_vec(), b"2".to_vec()),
            Op::PutMeta(b"vol/a".to_vec(), b"1".to_vec()),
            Op::PutMeta(b"volume".to_vec(), b"x".to_vec()),
            Op::PutMeta(b"vp/z".to_vec(), b"9".to_vec()),
        ],
        true,
    )
    .unwrap();
    let got = s.scan_meta(b"vol/").unwrap();
    assert_eq!(
        got,
        vec![
            (b"vol/a".to_vec(), b"1".to_vec()),
            (b"vol/b".to_vec(), b"2".to_vec())
        ]
    );
    s.apply(
        vec![
            Op::DeleteMeta(b"vol/a".to_vec()),
            Op::PutMeta(b"vol/c".to_vec(), b"3".to_vec()),
        ],
        true,
    )
    .unwrap();
    assert_eq!(s.get_meta(b"vol/a").unwrap(), None);
    assert_eq!(s.get_meta(b"vol/c").unwrap().as_deref(), Some(&b"3"[..]));
    // A batch with one bad node applies nothing.
    let r = s.apply(
        vec![
            Op::PutMeta(b"vol/d".to_vec(), b"4".to_vec()),
            Op::PutNode(Hash::of_chunk(b"n"), vec![1, 0, 0]),
        ],
        true,
    );
    assert!(r.is_err());
    assert_eq!(
        s.get_meta(b"vol/d").unwrap(),
        None,
        "a failed batch applies nothing"
    );
}

pub fn stats_count_chunks(s: &dyn ChunkStore) {
    for i in 0..10u32 {
        let d = sample(100 + i, 8192);
        s.put_chunk(&Hash::of_chunk(&d), &d).unwrap();
    }
    let st = s.stats().unwrap();
    assert!(
        st.chunks >= 9 && st.chunks <= 11,
        "about ten chunks counted, got {}",
        st.chunks
    );
}

#[cfg(test)]
mod tests {
    use super::super::{MemoryStore, RocksStore};
    use super::*;

    #[test]
    fn memory_store_conforms() {
        run_all(&|| Box::new(MemoryStore::new()));
    }

    #[test]
    fn rocks_store_conforms() {
        let dirs = std::sync::Mutex::new(Vec::new());
        run_all(&|| {
            let d = tempfile::tempdir().unwrap();
            let s = RocksStore::open(d.path()).unwrap();
            dirs.lock().unwrap().push(d);
            Box::new(s)
        });
    }

    #[test]
    fn rocks_store_keeps_chunks_across_reopen_and_detects_bit_rot() {
        let d = tempfile::tempdir().unwrap();
        let data = sample(1, 65536);
        let h = Hash::of_chunk(&data);
        {
            let s = RocksStore::open(d.path()).unwrap();
            s.put_chunk(&h, &data).unwrap();
            s.apply(vec![Op::PutMeta(b"k".to_vec(), b"v".to_vec())], true)
                .unwrap();
        }
        let s = RocksStore::open(d.path()).unwrap();
        assert_eq!(s.get_chunk(&h).unwrap().unwrap(), data);
        s.corrupt_chunk(&h).unwrap();
        assert!(
            s.get_chunk(&h).is_err(),
            "a damaged chunk is an error, never data"
        );
        // A scrub puts the record back; bytes of another name are refused.
        assert!(s.replace_chunk(&h, &sample(2, 65536)).is_err());
        s.replace_chunk(&h, &data).unwrap();
        s.apply(Vec::new(), true).unwrap();
        drop(s);
        let s = RocksStore::open(d.path()).unwrap();
        assert_eq!(s.get_chunk(&h).unwrap().unwrap(), data);
    }

    #[test]
    fn memory_store_detects_bit_rot() {
        let s = MemoryStore::new();
        let data = sample(2, 4096);
        let h = Hash::of_chunk(&data);
        s.put_chunk(&h, &data).unwrap();
        s.corrupt_chunk(&h);
        assert!(s.get_chunk(&h).is_err());
        s.replace_chunk(&h, &data).unwrap();
        assert_eq!(s.get_chunk(&h).unwrap().unwrap(), data);
    }
}
