//! Image I/O, chunking, hashing and block deltas.

pub mod delta;
pub mod dirty;
pub mod image;
pub mod journal;
