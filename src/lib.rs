//! ferry: disaster-recovery replication of block volumes over QUIC, with
//! content-addressed dedup. See `DESIGN.md` for the shape and invariants.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod failover;
pub mod fsio;
pub mod hash;
pub mod metrics;
pub mod nbd;
pub mod proto;
pub mod store;
pub mod transport;
pub mod units;
pub mod util;
pub mod volume;

#[cfg(test)]
mod decoders_fuzz;
