//! A frame body from a peer: decoded as a request and as a response, and a
//! decoded request's bounds checked (what `serve_peer` does before acting).
#![no_main]
use ferry::proto::frame;
use ferry::proto::messages::{Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = frame::decode::<Request>(data) {
        let _ = r.check();
    }
    let _ = frame::decode::<Response>(data);
});
