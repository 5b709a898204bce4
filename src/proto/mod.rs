//! Wire messages and the replication state machines. Nothing here does network I/O.

pub mod frame;
pub mod messages;
pub mod pass;
