//! A tree node as stored or sent by a peer.
#![no_main]
use ferry::store::tree::Node;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Node::decode(data);
});
