//! A client's bytes (handshake, options, requests) against the NBD server
//! over an in-memory pipe: the session must end within 10 s after the
//! client hangs up, and no access past the export's end may reach it (the
//! harness panics on either, which libFuzzer reports). An input whose first
//! byte is odd starts with a valid handshake, so that the search reaches
//! the transmission phase (requests) as often as the negotiation; with its
//! second bit set too, that handshake asks for structured replies and
//! `base:allocation` (so block status requests are served).
#![no_main]
use ferry::nbd::harness;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mut input = if first & 1 == 1 {
        harness::session_with(&[], first & 2 == 2)
    } else {
        Vec::new()
    };
    input.extend_from_slice(rest);
    let _ = harness::serve(input);
});
