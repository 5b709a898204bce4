//! A journal (or redo log: the same format) segment as found on disk after
//! a crash or a bad disk: the journal opens to a prefix of its records or
//! refuses with an error, and what it opened it can read.
#![no_main]
use ferry::volume::journal::{Journal, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let d = tempfile::tempdir().unwrap();
    {
        let (mut j, _) = Journal::open(d.path(), 1 << 20).unwrap();
        j.append(Kind::Write, 0, 16, &[1u8; 16]).unwrap();
        j.sync().unwrap();
    }
    // The segment's bytes become the input.
    for e in std::fs::read_dir(d.path()).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::write(&p, data).unwrap();
        }
    }
    if let Ok((j, _)) = Journal::open(d.path(), 1 << 20) {
        let next = j.next_seq();
        if next > 1 {
            j.read_from(1, 1 << 20)
                .expect("an opened journal cannot read its records");
        }
    }
});
