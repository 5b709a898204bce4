//! A stored or sent chunk record (zstd or raw): decoded against a length
//! bound, with and without the name it must match.
#![no_main]
use ferry::hash::Hash;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferry::store::decode_chunk(data, 65536, None);
    let _ = ferry::store::decode_chunk(data, 65536, Some(&Hash::of_chunk(&[0u8; 65536])));
});
