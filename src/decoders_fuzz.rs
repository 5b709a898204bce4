//! Every decoder of input from a peer, a client or a file, fed arbitrary
//! bytes and corrupted valid encodings: each returns an error or a value,
//! never panics, and never allocates by what the input claims (run under
//! the test harness's memory; a claim of gigabytes would abort it). The NBD
//! server's own is in `nbd::server::fuzz`.

use proptest::prelude::*;

use crate::hash::Hash;
use crate::proto::frame;
use crate::proto::messages::{ChunkPut, Request, Response};
use crate::store::tree::{Node, Tree};
use crate::volume::journal::{self, Kind};

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

/// Flips bytes of `b` at the given places.
fn corrupt(mut b: Vec<u8>, flips: &[(prop::sample::Index, u8)]) -> Vec<u8> {
    if b.is_empty() {
        return b;
    }
    for (at, v) in flips {
        let i = at.index(b.len());
        b[i] ^= v;
    }
    b
}

fn flips() -> impl Strategy<Value = Vec<(prop::sample::Index, u8)>> {
    proptest::collection::vec((any::<prop::sample::Index>(), 1..=255u8), 1..6)
}

/// A journal batch as the streamer sends it: records, concatenated.
fn records() -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    let (mut j, _) = journal::Journal::open(d.path(), 1 << 20).unwrap();
    j.append(Kind::Write, 4096, 8, b"abcdefgh").unwrap();
    j.append(Kind::Flush, 0, 0, &[]).unwrap();
    j.append(Kind::Trim, 0, 65536, &[]).unwrap();
    j.read_from(1, 1 << 20)
        .unwrap()
        .iter()
        .flat_map(|r| r.encode())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn wire_frames(b in bytes(4096), f in flips()) {
        let _ = frame::decode::<Request>(&b);
        let _ = frame::decode::<Response>(&b);
        // A valid request, corrupted.
        let req = Request::PutChunks {
            volume: "v".into(),
            items: vec![ChunkPut::Delta {
                hash: Hash::of_chunk(b"x"),
                base: Hash::ZERO,
                len: 65536,
                blocks: vec![1, 2, 3],
                record: crate::store::encode_chunk(&[7u8; 12288]),
            }],
        };
        let enc = frame::encode(&req).unwrap();
        if let Ok(r) = frame::decode::<Request>(&corrupt(enc[4..].to_vec(), &f)) {
            let _ = r.check();
        }
    }

    #[test]
    fn store_delta_records(b in bytes(4096), f in flips()) {
        let rec = crate::store::encode_delta(
            65536,
            &Hash::of_chunk(b"base"),
            &[1, 5],
            &crate::store::encode_chunk(&[3u8; 8192]),
        );
        for r in [b, corrupt(rec, &f)] {
            // What the store does with a record it reads: parse, decode the
            // blocks, lay them over a base of the declared length.
            if let Ok(Some(d)) = crate::store::parse_delta(&r)
                && let Ok(blocks) = crate::store::decode_chunk(d.blocks_record, d.len, None)
            {
                let _ = crate::volume::delta::apply(&vec![0u8; d.len], &d.blocks, &blocks);
            }
        }
    }

    #[test]
    fn tree_nodes(b in bytes(2048), f in flips()) {
        let _ = Node::decode(&b);
        let t = Tree::build(3 << 20, 65536, (0..48u8).map(|i| Hash::of_chunk(&[i])).collect());
        let _ = Node::decode(&corrupt(t.root_node().encode(), &f));
        let _ = Node::decode(&corrupt(t.node(1, 0).encode(), &f));
    }

    #[test]
    fn chunk_records(b in bytes(4096), f in flips()) {
        let _ = crate::store::decode_chunk(&b, 65536, None);
        let enc = crate::store::encode_chunk(&[5u8; 65536]);
        let _ = crate::store::decode_chunk(&corrupt(enc, &f), 65536, Some(&Hash::of_chunk(&[5u8; 65536])));
    }

    #[test]
    fn deltas(base in bytes(8192), blocks in proptest::collection::vec(any::<u32>(), 0..8), data in bytes(8192)) {
        let _ = crate::volume::delta::apply(&base, &blocks, &data);
    }

    #[test]
    fn journal_records(b in bytes(4096), f in flips()) {
        // The check that takes a batch as it came agrees with the decoder.
        for input in [b.clone(), corrupt(records(), &f)] {
            let decoded = journal::decode_records(&input, 1024);
            let checked = journal::check_records(&input, 1024);
            prop_assert_eq!(decoded.is_ok(), checked.is_ok());
            if let (Ok(d), Ok(c)) = (decoded, checked) {
                prop_assert_eq!(d.iter().map(|r| r.seq).collect::<Vec<_>>(), c.iter().map(|r| r.seq).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn journal_files_on_open(f in flips(), cut in 0usize..4096) {
        // A segment damaged on disk (a torn or flipped tail): the journal
        // opens to a prefix of its records, or refuses with an error.
        let d = tempfile::tempdir().unwrap();
        {
            let (mut j, _) = journal::Journal::open(d.path(), 1 << 20).unwrap();
            for i in 0..6u64 {
                j.append(Kind::Write, i * 4096, 16, &[i as u8; 16]).unwrap();
            }
            j.sync().unwrap();
        }
        for e in std::fs::read_dir(d.path()).unwrap() {
            let p = e.unwrap().path();
            let b = std::fs::read(&p).unwrap();
            let mut b = corrupt(b, &f);
            b.truncate(b.len().saturating_sub(cut % 64));
            std::fs::write(&p, b).unwrap();
        }
        if let Ok((j, _)) = journal::Journal::open(d.path(), 1 << 20)
            && j.next_seq() > 1
        {
            let kept = j.read_from(1, 1 << 20);
            prop_assert!(kept.is_ok(), "an opened journal cannot read its records: {:?}", kept.err());
            let kept = kept.unwrap_or_default();
            for (i, r) in kept.iter().enumerate() {
                prop_assert_eq!(&r.data[..], &[i as u8; 16][..], "record {} is not what was written", i + 1);
            }
        }
    }

    #[test]
    fn config_files(text in "[ -~\n]{0,512}", f in flips()) {
        let _ = toml::from_str::<crate::config::Config>(&text);
        let valid = "site = \"a\"\nlisten = \"127.0.0.1:1\"\n[limits]\nframe_bytes_max = \"16MiB\"\n[retention]\nall = \"1h\"\n";
        let bad = corrupt(valid.as_bytes().to_vec(), &f);
        if let Ok(t) = std::str::from_utf8(&bad)
            && let Ok(c) = toml::from_str::<crate::config::Config>(t)
        {
            let _ = c.validate();
        }
    }

    #[test]
    fn pairing_tokens_and_fault_rules(s in "[ -~]{0,256}") {
        let _ = crate::transport::pairing::Token::decode(&s);
        let _ = crate::fsio::Rule::parse(&s);
        let _ = s.parse::<crate::units::ByteSize>();
        let _ = s.parse::<crate::units::Dur>();
    }
}
