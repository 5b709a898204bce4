//! Throughput of the primitives a snapshot pass pays for: blake3 over 64 KiB
//! chunks, zstd level 1 on them (the store's own encoding), and the zero
//! check, on a given image; and what a collection's listing of a DR store
//! holding those chunks costs.
//!
//!   cargo bench --bench primitives -- IMAGE

use std::time::Instant;

fn main() {
    let Some(path) = std::env::args().skip(1).find(|a| !a.starts_with("--")) else {
        eprintln!("usage: cargo bench --bench primitives -- IMAGE");
        return;
    };
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cannot read {path}: {e}");
            return;
        }
    };
    let mb = data.len() as f64 / 1e6;
    // A pass's scan as it runs: the image read from the page cache (warmed
    // by the read above) and named on every thread it uses.
    let t = Instant::now();
    let (tree, _) = ferry::volume::image::scan(
        std::path::Path::new(&path),
        65536,
        &std::sync::atomic::AtomicU64::new(0),
    )
    .expect("scan");
    let scan_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let zero = data
        .chunks(65536)
        .filter(|c| ferry::hash::is_all_zero(c))
        .count();
    let zero_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut n = 0u64;
    for c in data.chunks(65536) {
        n ^= blake3::hash(c).as_bytes()[0] as u64;
    }
    let b3_s = t.elapsed().as_secs_f64();
    // What the DR side pays to rebuild a chunk from a delta: the name of the
    // bytes it rebuilt over and of the rebuilt chunk (one 4 KiB block
    // rewritten), hashed apart or as a pair.
    let full: Vec<&[u8]> = data.chunks_exact(65536).take(4096).collect();
    let patched: Vec<Vec<u8>> = full
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut p = c.to_vec();
            p[(i % 16) * 4096] ^= 0xff;
            p
        })
        .collect();
    let t = Instant::now();
    for (a, b) in full.iter().zip(&patched) {
        n ^= (ferry::hash::Hash::of_chunk(a).0[0] ^ ferry::hash::Hash::of_chunk(b).0[0]) as u64;
    }
    let apart_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (a, b) in full.iter().zip(&patched) {
        let (ha, hb) = ferry::hash::Hash::of_chunk_pair(a, b);
        n ^= (ha.0[0] ^ hb.0[0]) as u64;
    }
    let pair_s = t.elapsed().as_secs_f64();
    let nonzero: Vec<&[u8]> = data
        .chunks(65536)
        .filter(|c| !ferry::hash::is_all_zero(c))
        .collect();
    let nz_mb = nonzero.len() as f64 * 65536.0 / 1e6;
    let t = Instant::now();
    let mut out = 0usize;
    for c in &nonzero {
        out += ferry::store::encode_chunk(c).len();
    }
    let z_s = t.elapsed().as_secs_f64();
    // The chunks the encoding stores raw without trying zstd, and what zstd
    // would have made of them.
    let stored_raw: Vec<&&[u8]> = nonzero
        .iter()
        .filter(|c| ferry::store::looks_incompressible(c))
        .collect();
    let zstd_would_make: usize = stored_raw
        .iter()
        .map(|c| {
            ferry::store::compress_frame(c, 1)
                .map(|z| z.len().min(c.len()))
                .unwrap_or(c.len())
        })
        .sum();
    // The wire: chunk records framed 64 to a PutChunks, encoded and decoded.
    use ferry::proto::messages::{ChunkPut, Request};
    let records: Vec<(ferry::hash::Hash, Vec<u8>)> = nonzero
        .iter()
        .map(|c| {
            (
                ferry::hash::Hash::of_chunk(c),
                ferry::store::encode_chunk(c),
            )
        })
        .collect();
    let rec_mb = records.iter().map(|r| r.1.len()).sum::<usize>() as f64 / 1e6;
    let t = Instant::now();
    for batch in records.chunks(64) {
        let req = Request::PutChunks {
            volume: "v".into(),
            items: batch
                .iter()
                .map(|(hash, record)| ChunkPut::Full {
                    hash: *hash,
                    record: record.clone(),
                })
                .collect(),
        };
        let enc = ferry::proto::frame::encode(&req).expect("encode");
        let dec: Request = ferry::proto::frame::decode(&enc[4..]).expect("decode");
        std::hint::black_box(dec);
    }
    let wire_s = t.elapsed().as_secs_f64();
    // The continuous stream: 4 KiB writes as journal records, encoded (as
    // appended) and decoded (as read back and at the DR side), checksums
    // computed and checked.
    use ferry::volume::journal::{Kind, Record, decode_records};
    let pieces: Vec<&[u8]> = data.chunks_exact(4096).take(65536).collect();
    let rec4_mb = pieces.len() as f64 * 4096.0 / 1e6;
    let t = Instant::now();
    for (i, batch) in pieces.chunks(256).enumerate() {
        let mut raw = Vec::with_capacity(batch.len() * (4096 + 40));
        for (k, p) in batch.iter().enumerate() {
            let r = Record {
                seq: (i * 256 + k) as u64 + 1,
                kind: Kind::Write,
                offset: 0,
                len: 4096,
                epoch: 1,
                data: p.to_vec(),
            };
            raw.extend_from_slice(&r.encode());
        }
        std::hint::black_box(decode_records(&raw, 1 << 20).expect("decode"));
    }
    let rec4_s = t.elapsed().as_secs_f64();
    // A collection lists every chunk name of the DR store. The store's
    // blob files are written past the page cache, so a listing that read
    // values would read the whole store from the disk.
    use ferry::store::ChunkStore;
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = ferry::store::RocksStore::open(dir.path()).expect("open the store");
    for (i, (hash, _)) in records.iter().enumerate() {
        store.put_chunk(hash, nonzero[i]).expect("put");
    }
    store.apply(Vec::new(), true).expect("flush");
    let t = Instant::now();
    let listed = store.chunk_names().expect("list").len();
    let list_s = t.elapsed().as_secs_f64();
    // What a promotion's capture and a pass's compare ask for every chunk.
    let t = Instant::now();
    let held = records
        .iter()
        .filter(|(hash, _)| store.has_chunk(hash).expect("has"))
        .count();
    let has_s = t.elapsed().as_secs_f64();
    assert_eq!(held, records.len());
    println!("| primitive on {path} ({mb:.0} MB, {zero} zero chunks) | throughput |");
    println!("|---|---|");
    println!("| zero check, all chunks | {:.0} MB/s |", mb / zero_s);
    println!(
        "| blake3, all 64 KiB chunks, one core | {:.0} MB/s |",
        mb / b3_s
    );
    println!(
        "| a pass's scan of the image (read, zero check, blake3), {} threads | {:.0} ms ({:.0} MB/s of data) |",
        std::thread::available_parallelism()
            .map_or(1, |t| t.get())
            .min(4)
            .min(data.len().div_ceil(32 << 20)),
        scan_s * 1e3,
        nz_mb / scan_s
    );
    std::hint::black_box(tree.root);
    println!(
        "| a 64 KiB chunk and the same with one 4 KiB block rewritten, named apart / as a pair ({} pairs), one core | {:.1} / {:.1} us a pair |",
        full.len(),
        apart_s * 1e6 / full.len().max(1) as f64,
        pair_s * 1e6 / full.len().max(1) as f64
    );
    println!(
        "| zstd level 1 (ferry's chunk encoding), non-zero chunks, one core | {:.0} MB/s ({:.0} MB -> {:.0} MB) |",
        nz_mb / z_s,
        nz_mb,
        out as f64 / 1e6
    );
    println!(
        "| chunks stored raw without trying zstd | {} of {} ({:.1} MB; zstd level 1 would make them {:.1} MB) |",
        stored_raw.len(),
        nonzero.len(),
        stored_raw.len() as f64 * 65536.0 / 1e6,
        zstd_would_make as f64 / 1e6
    );
    println!(
        "| chunk records framed (PutChunks of 64), encoded and decoded, one core | {:.0} MB/s |",
        rec_mb / wire_s
    );
    println!(
        "| 4 KiB journal records, encoded and decoded, one core | {:.0} MB/s |",
        rec4_mb / rec4_s
    );
    println!(
        "| a collection's listing of a RocksDB store of the non-zero chunks ({listed} chunks, {:.0} MB stored) | {:.1} ms |",
        out as f64 / 1e6,
        list_s * 1e3
    );
    println!(
        "| whether that store holds each of its chunks, one question at a time | {:.1} us each ({:.0} ms for all) |",
        has_s * 1e6 / held.max(1) as f64,
        has_s * 1e3
    );
    std::hint::black_box(n);
}
