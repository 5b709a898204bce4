//! Wire messages and the replication state machines. Nothing here does network I/O.

pub mod apply;
pub mod frame;
pub mod messages;
pub mod pass;
pub mod stream;
