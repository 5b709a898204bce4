//! The QUIC link between two sites: identities, certificate pinning, pairing.

pub mod endpoint;
pub mod limit;
pub mod pairing;
pub mod tls;

/// ALPN of the replication protocol; a peer speaking anything else is refused.
pub const ALPN: &[u8] = b"ferry/1";
/// The name every site presents; identity comes from the pinned fingerprint, not names.
pub const SERVER_NAME: &str = "ferry";
