//! A journal batch as the DR side receives it (records concatenated), and
//! a delta applied to a base chunk.
#![no_main]
use ferry::volume::journal;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The DR side checks a batch without copying it out (check_records):
    // it must agree with the decoder.
    let decoded = journal::decode_records(data, 1024);
    let checked = journal::check_records(data, 1024);
    assert_eq!(decoded.is_ok(), checked.is_ok());
    if data.len() > 8 {
        let (blocks, rest) = data.split_at(8);
        let blocks: Vec<u32> = blocks
            .chunks(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let (base, delta) = rest.split_at(rest.len() / 2);
        let _ = ferry::volume::delta::apply(base, &blocks, delta);
    }
});
