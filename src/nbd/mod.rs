//! The NBD server: fixed newstyle handshake, simple or structured replies,
//! `base:allocation` block status, multi-conn and fast zero, many requests
//! in flight per connection. It serves any [`Export`]; the daemon exports its
//! primary volumes on `DIR/nbd.sock` (and on TCP where configured) with the
//! volume name as the export name.

pub mod export;
pub mod handshake;
#[cfg(any(test, feature = "fuzzing"))]
pub mod harness;
pub mod proto;
pub mod server;

pub use export::{Export, Exports, Extent, FileExport};
pub use server::{
    ACCEPT_BACKOFF_FIRST, ACCEPT_BACKOFF_MAX, Budget, Limits, Observer, bind_unix, serve_conn,
};
