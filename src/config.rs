//! The site configuration, `DIR/ferry.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, Dur};

pub const CONFIG_FILE: &str = "ferry.toml";

/// One site's configuration. Written by `ferry init`, completed by pairing;
/// operators may edit it while the daemon is stopped.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This site's name, shown to the peer and in reports.
    pub site: String,
    /// UDP address the QUIC endpoint listens on.
    pub listen: SocketAddr,
    /// HTTP address of the Prometheus `/metrics` endpoint; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    /// TCP address of the NBD export (the Unix socket `DIR/nbd.sock` is always served).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<SocketAddr>,
    /// fsync replica images and the store before acknowledging. Turning this
    /// off trades durability for speed and the daemon warns about it at start.
    #[serde(default = "default_true")]
    pub fsync: bool,
    /// The paired site, written by `ferry pair join` / accepted tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerConfig>,
    /// Bounds on memory and wire use.
    #[serde(default)]
    pub limits: Limits,
    /// Which recovery points the DR side keeps (older ones are pruned and
    /// their chunks collected).
    #[serde(default)]
    pub retention: crate::store::gc::Retention,
    /// DR side, continuous volumes: how often a recovery point is taken at a
    /// flush boundary.
    #[serde(default = "default_point_interval")]
    pub point_interval: Dur,
    /// A restarted primary exports its volumes writable only after the
    /// peer's `Hello` (which tells whether the other site was promoted
    /// meanwhile), or after this long without one.
    #[serde(default = "default_startup_wait")]
    pub startup_wait: Dur,
}

pub fn default_point_interval() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}

pub fn default_startup_wait() -> Dur {
    Dur(std::time::Duration::from_secs(30))
}

/// The other site of the pair, pinned by its certificate fingerprint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's site name.
    pub name: String,
    /// Where the peer's QUIC endpoint listens.
    pub address: SocketAddr,
    /// SHA-256 of the peer's certificate (hex). Only this certificate is accepted.
    pub fingerprint: String,
    /// True on the site that joined: it dials the peer and redials after a loss.
    /// The other site waits for the connection.
    pub dial: bool,
}

/// Limits on frames, buffers and in-flight data (invariant 6).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest protocol frame accepted from the peer.
    pub frame_bytes_max: ByteSize,
    /// Chunk payload bytes sent but not yet acknowledged, per pass.
    pub inflight_bytes_max: ByteSize,
    /// Parallel QUIC streams carrying chunk batches, per pass.
    pub streams_max: u32,
    /// Uncompressed chunk bytes in one batch frame.
    pub batch_bytes_max: ByteSize,
    /// Longest wait before redialing the peer after a failed connection.
    pub reconnect_max: Dur,
    /// Bytes of write journal per continuous volume (the primary's journal and
    /// the DR side's redo log). A full journal makes the volume fall back to a
    /// resync by tree comparison.
    pub journal_bytes_max: ByteSize,
    /// How long a continuous volume keeps journaling while the link is down
    /// before it falls back to a resync by tree comparison.
    pub link_down_max: Dur,
    /// Distinct bytes (in 4 KiB blocks) a drill's clone may have written
    /// into its overlay at the DR site; a write past it fails with ENOSPC.
    pub drill_overlay_bytes_max: ByteSize,
    /// NBD connections served at once (Unix socket and TCP together); one
    /// more is closed at once, with a warning in the log.
    pub nbd_connections_max: u32,
    /// READ and WRITE payload bytes the NBD server holds in memory at once,
    /// across every connection; a request waits for its share before its
    /// buffer is allocated.
    pub nbd_inflight_bytes_max: ByteSize,
    /// Volumes this site holds (primary and replica together, at most
    /// 4096, what one Hello carries): the peer cannot create more replicas
    /// than this, and `ferry volume add` refuses past it.
    pub volumes_max: u32,
    /// Request bytes from the peer held in memory at once (frames received
    /// and not answered yet, across its streams); a request waits for its
    /// share before its buffer is allocated. At least `frame_bytes_max`.
    pub peer_inflight_bytes_max: ByteSize,
    /// Bytes per second this site sends to its peer, at most (frames; QUIC
    /// adds a few percent); 0: no limit. `ferry link limit` changes it
    /// while the daemon runs.
    pub link_bytes_per_s_max: ByteSize,
    /// zstd level of the chunks a pass sends: 1-19, or 0 (auto): each pass
    /// starts at 1 and moves between 1 and 9, up while the link holds the
    /// pass back (chunks wait for the in-flight window) and down while the
    /// cores do (the sender waits for encoded chunks).
    pub zstd_level: u8,
    /// Congestion controller of the QUIC link to the peer: `bbr` (the
    /// default) paces to the bandwidth and round trip it measures, so
    /// random loss on a WAN (0.1 %) does not cut its rate; `cubic` backs off
    /// on every loss (a tenth of 100 Mbit/s at 50 ms and 0.1 % loss) but
    /// yields to other traffic on a shared bottleneck.
    pub congestion: Congestion,
}

/// See `Limits::congestion`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    #[default]
    Bbr,
    Cubic,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_bytes_max: ByteSize(16 << 20),
            inflight_bytes_max: ByteSize(64 << 20),
            streams_max: 8,
            batch_bytes_max: ByteSize(4 << 20),
            reconnect_max: Dur(std::time::Duration::from_secs(30)),
            journal_bytes_max: ByteSize(1 << 30),
            link_down_max: Dur(std::time::Duration::from_secs(15 * 60)),
            drill_overlay_bytes_max: ByteSize(64 << 30),
            nbd_connections_max: 64,
            nbd_inflight_bytes_max: ByteSize(256 << 20),
            volumes_max: 1024,
            peer_inflight_bytes_max: ByteSize(256 << 20),
            link_bytes_per_s_max: ByteSize(0),
            zstd_level: 0,
            congestion: Congestion::Bbr,
        }
    }
}

fn default_true() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read {path}: {source} (is this a ferry data directory? run `ferry init` first)"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid ferry config: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Config {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(CONFIG_FILE)
    }

    pub fn load(dir: &Path) -> Result<Config, ConfigError> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        cfg.validate()
            .map_err(|message| ConfigError::Parse { path, message })?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        let l = &self.limits;
        if l.frame_bytes_max.0 < (1 << 20) || l.frame_bytes_max.0 > (256 << 20) {
            return Err("limits.frame_bytes_max must be between 1MiB and 256MiB".into());
        }
        if l.batch_bytes_max.0 + (64 << 10) > l.frame_bytes_max.0 {
            return Err(
                "limits.batch_bytes_max must be at least 64KiB below frame_bytes_max".into(),
            );
        }
        if l.streams_max == 0 || l.streams_max > 64 {
            return Err("limits.streams_max must be between 1 and 64".into());
        }
        if l.zstd_level > 19 {
            return Err("limits.zstd_level must be 0 (auto) or a zstd level from 1 to 19".into());
        }
        if l.peer_inflight_bytes_max.0 < l.frame_bytes_max.0
            || l.peer_inflight_bytes_max.0 > (4 << 30)
        {
            return Err(
                "limits.peer_inflight_bytes_max must be between frame_bytes_max and 4GiB".into(),
            );
        }
        if l.inflight_bytes_max.0 < l.batch_bytes_max.0 {
            return Err("limits.inflight_bytes_max must be at least batch_bytes_max".into());
        }
        Ok(())
    }

    /// Writes the config atomically (temp file, fsync, rename) with a
    /// commented header so that operators know what they are looking at.
    pub fn save(&self, dir: &Path) -> Result<(), ConfigError> {
        let path = Self::path(dir);
        let body = toml::to_string_pretty(self).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let text = format!(
            "# ferry site configuration (see docs/configuration.md).\n\
             # [peer] is written by pairing; edit only while the daemon is stopped.\n\n{body}"
        );
        crate::util::write_atomic(&path, text.as_bytes())
            .map_err(|source| ConfigError::Write { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused() {
        let text = "site = \"a\"\nlisten = \"127.0.0.1:1\"\nfsnyc = false\n";
        assert!(toml::from_str::<Config>(text).is_err());
    }

    #[test]
    fn the_example_configs_parse_and_validate() {
        for f in ["deploy/examples/primary.toml", "deploy/examples/dr.toml"] {
            // `cargo test` runs in the package's root; CARGO_MANIFEST_DIR is
            // fixed at build time and stays stale when a cached build is
            // reused from another checkout.
            let cfg: Config = toml::from_str(&std::fs::read_to_string(f).unwrap())
                .unwrap_or_else(|e| panic!("{f}: {e}"));
            cfg.validate().unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }

    #[test]
    fn defaults_keep_fsync_on() {
        let cfg: Config = toml::from_str("site = \"a\"\nlisten = \"127.0.0.1:1\"\n").unwrap();
        assert!(cfg.fsync);
        assert_eq!(cfg.limits, Limits::default());
        assert!(cfg.validate().is_ok());
    }
}
