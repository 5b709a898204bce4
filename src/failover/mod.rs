//! Epochs and roles: who may write a volume, and what a site does when it
//! learns, from its peer, that it is behind or that the two sites forked.
//! Both are machines without I/O; the daemon's volume handle carries out
//! their commands.

pub mod audit;
pub mod blockmap;
pub mod drill;
pub mod epoch;
pub mod role;
