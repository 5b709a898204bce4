//! Volume state and recovery points, kept as JSON records under meta keys.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ChunkStore, Op, StoreError};
use crate::hash::Hash;

/// A volume's role at this site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Replica,
}

/// How a volume is replicated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Periodic passes over the whole image; the daemon is not in the write path.
    Snapshot,
    /// Writes go through ferry's NBD export, are journaled and streamed in
    /// order; FLUSH completes on local durability. RPO = the lag.
    Async,
    /// As async, but FLUSH and FUA complete only once every earlier write is
    /// durable at the DR site. RPO = 0.
    Sync,
}

impl Mode {
    /// True when ferry is in the write path (journal and stream).
    pub fn continuous(self) -> bool {
        matches!(self, Mode::Async | Mode::Sync)
    }
}

/// What a sync volume's flush does when the DR site stays unreachable past
/// its wait.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SyncFallback {
    /// The flush fails (EIO): the workload learns that its data is not yet safe at DR.
    #[default]
    Fail,
    /// The volume runs as async until the DR site has caught up again.
    Degrade,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        })
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Snapshot => "snapshot",
            Mode::Async => "async",
            Mode::Sync => "sync",
        })
    }
}

/// Everything a site remembers about one volume.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    pub role: Role,
    pub mode: Mode,
    /// The protected image (primary) or the replica image (replica).
    pub path: PathBuf,
    pub chunk_size: u32,
    /// Snapshot pass interval, milliseconds (primary).
    pub interval_ms: u64,
    /// RPO target, milliseconds (primary): alerts fire when the newest
    /// recovery point is older. 0 means twice the interval.
    #[serde(default)]
    pub rpo_target_ms: u64,
    /// Size at the last completed pass.
    pub size: u64,
    pub created: u64,
    /// Root the replica image holds (replica), or that the DR side last
    /// confirmed (primary).
    pub committed: Option<Hash>,
    /// Replica only: a root being written into the image. While set, the image
    /// is inconsistent and the last recovery point is the state to trust.
    pub applying: Option<Hash>,
    /// Totals since the volume was added.
    #[serde(default)]
    pub totals: Totals,
    /// Primary only: the last pass that completed.
    #[serde(default)]
    pub last_pass: Option<PassReport>,
    /// Continuous replication state (async and sync volumes).
    #[serde(default)]
    pub stream: StreamRecord,
    /// Who was primary in which generation (`failover::epoch`); written in
    /// the same batch as the role, so the two never disagree on disk.
    #[serde(default)]
    pub history: crate::failover::epoch::History,
    /// Fenced: no local writes (the site learnt of a higher epoch, or an
    /// operator demoted the volume), and why.
    #[serde(default)]
    pub fenced: Option<String>,
    /// The sites' histories forked: replication of the volume stopped until
    /// an operator resolves it.
    #[serde(default)]
    pub split_brain: bool,
    /// Primary, planned switchover: the volume was handed over at this
    /// record and stays fenced until the peer's answer (or its `Hello`)
    /// says whether it was promoted.
    #[serde(default)]
    pub handoff: Option<u64>,
    /// The checksum of that record: the DR side promotes only if the
    /// record it applied last has the same epoch, number and checksum.
    #[serde(default)]
    pub handoff_checksum: u64,
    /// The other site's entries a resolved split brain set aside (at most
    /// a few): a peer whose history ends in one is behind, not forked.
    #[serde(default)]
    pub superseded: Vec<crate::failover::epoch::EpochEntry>,
    /// This site must become the replica of the side with this history (a
    /// resolve it lost): resumed at start until done.
    #[serde(default)]
    pub behind_of: Option<crate::failover::epoch::History>,
}

/// Continuous replication state of a volume, at either site.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StreamRecord {
    /// Primary: an fsync of the image failed and the writes it covered have
    /// not been written again yet (why, and the last record a good fsync
    /// covered). Kept across restarts: until they are rewritten from the
    /// journal, or an operator clears it, every flush fails (invariant 7).
    #[serde(default)]
    pub image_io_error: Option<(String, u64)>,
    /// Primary: the DR copy must be brought level by a tree comparison before
    /// streaming (first seed, journal overflow, long outage, crash of the host).
    #[serde(default)]
    pub resync_needed: bool,
    /// Primary: why, for the operator.
    #[serde(default)]
    pub resync_reason: String,
    /// Primary: the first journal record a restart may replay while a
    /// resync is pending. The records before it predate the fallback to
    /// that resync, and writes after the fallback were not journaled (the
    /// resync's scan carries them), so replaying those would take them
    /// back; the records from it on were journaled since the resync began,
    /// every write in order, and a flush may have counted on them. `None`
    /// (a new volume, a record older than this field): none is replayed.
    #[serde(default)]
    pub replay_from: Option<u64>,
    /// Primary, sync mode: how long a flush waits for the DR site, milliseconds.
    #[serde(default)]
    pub sync_wait_ms: u64,
    #[serde(default)]
    pub sync_fallback: SyncFallback,
    /// Primary: the host boot this journal was last written under; another
    /// boot means unflushed page cache may have been lost, so a resync follows.
    /// Replica: the host boot its image was last written under; another
    /// boot means the writes since the last point (the image's last fsync)
    /// may be lost, so the redo log is applied again from there.
    #[serde(default)]
    pub boot_id: String,
    /// Replica: every record up to here is part of `committed` (the newest point's tree).
    #[serde(default)]
    pub base_seq: u64,
    /// Replica: records applied to the image (always at a flush boundary).
    #[serde(default)]
    pub applied_seq: u64,
    /// Replica: the checksum of record `applied_seq` (0: not known, as
    /// after a resync's commit, which applies no record).
    #[serde(default)]
    pub applied_checksum: u64,
    /// Replica: the image is being resynced out of order and is not a
    /// consistent state until `applied_seq` reaches this.
    #[serde(default)]
    pub inconsistent_until: Option<u64>,
    /// Replica: a resync is open since this record: the records from here
    /// wait in the redo log for the resync's commit (the image keeps its
    /// last state until then; with `applying` set, that commit is being applied).
    #[serde(default)]
    pub resync_from: Option<u64>,
    /// Replica: the incarnation of the primary's journal the redo log
    /// continues (0: none yet); a stream from another one needs a resync.
    #[serde(default)]
    pub source: u64,
}

/// Cumulative counters for status.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Totals {
    pub passes: u64,
    pub bytes_logical: u64,
    pub bytes_sent: u64,
    pub chunks_sent: u64,
}

/// What one replication pass did and cost.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PassReport {
    pub root: Hash,
    pub started: u64,
    pub duration_ms: u64,
    pub size: u64,
    /// Bytes read from the image to build its tree.
    pub bytes_read: u64,
    pub chunks_total: u64,
    pub chunks_zero: u64,
    /// Chunks the DR side already had (dedup, or stored by an interrupted pass).
    pub chunks_deduped: u64,
    pub chunks_sent_full: u64,
    pub chunks_sent_delta: u64,
    /// Seeds and resyncs of continuous volumes: chunks written between the
    /// scan and their sending, which went with their newer content.
    #[serde(default)]
    pub chunks_changed_during: u64,
    /// Bytes of chunk content that changed (full chunks plus changed blocks).
    pub bytes_changed: u64,
    /// Encoded (compressed) bytes of the chunks and deltas sent.
    #[serde(default)]
    pub bytes_encoded: u64,
    /// Payload bytes the primary wrote to QUIC streams (frames included).
    pub bytes_sent: u64,
    /// Payload bytes the primary read from QUIC streams.
    pub bytes_received: u64,
    /// UDP bytes sent plus received on the link during the pass, QUIC and TLS overhead included.
    pub wire_bytes: u64,
    pub point: Option<u64>,
    /// Where the time went, milliseconds: reading and hashing the image,
    /// comparing trees (with the chunks sent as the comparison names them),
    /// sending what was left once it ended, and the DR side's commit.
    #[serde(default)]
    pub phase_ms: PhaseMs,
    /// The zstd level the pass's chunks ended at (`limits.zstd_level`, or
    /// where the automatic choice settled); 0: nothing was sent.
    #[serde(default)]
    pub zstd_level: i32,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct PhaseMs {
    pub scan: u64,
    pub compare: u64,
    pub send: u64,
    pub commit: u64,
}

impl VolumeRecord {
    pub fn rpo_target_ms(&self) -> u64 {
        if self.rpo_target_ms > 0 {
            self.rpo_target_ms
        } else {
            self.interval_ms.saturating_mul(2)
        }
    }
}

impl PassReport {
    pub fn chunks_sent(&self) -> u64 {
        self.chunks_sent_full + self.chunks_sent_delta
    }
}

/// A named, immutable, crash-consistent state of a replica.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecoveryPoint {
    pub id: u64,
    pub volume: String,
    pub root: Hash,
    /// Unix seconds.
    pub created: u64,
    pub size: u64,
    /// What made it: `snapshot pass`, `flush boundary`, `on demand`.
    pub source: String,
    /// Continuous volumes: the last journal record the point includes.
    #[serde(default)]
    pub seq: Option<u64>,
    /// Why retention never prunes this point (`divergent`, `promotion`):
    /// only an operator deletes it (invariant 4).
    /// (`skip_serializing_if` is not used: points also travel in postcard.)
    #[serde(default)]
    pub pinned: Option<String>,
}

fn vol_key(name: &str) -> Vec<u8> {
    format!("vol/{name}").into_bytes()
}

fn point_prefix(volume: &str) -> Vec<u8> {
    format!("point/{volume}/").into_bytes()
}

pub fn point_key(volume: &str, id: u64) -> Vec<u8> {
    format!("point/{volume}/{id:016x}").into_bytes()
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| {
        StoreError::Read(format!(
            "record {} is damaged: {e}",
            String::from_utf8_lossy(key)
        ))
    })
}

pub fn delete_volume_op(name: &str) -> Op {
    Op::DeleteMeta(vol_key(name))
}

pub fn put_volume_op(v: &VolumeRecord) -> Op {
    Op::PutMeta(vol_key(&v.name), serde_json::to_vec(v).unwrap_or_default())
}

pub fn get_volume(s: &dyn ChunkStore, name: &str) -> Result<Option<VolumeRecord>, StoreError> {
    let key = vol_key(name);
    s.get_meta(&key)?.map(|v| decode(&key, &v)).transpose()
}

pub fn list_volumes(s: &dyn ChunkStore) -> Result<Vec<VolumeRecord>, StoreError> {
    s.scan_meta(b"vol/")?
        .iter()
        .map(|(k, v)| decode(k, v))
        .collect()
}

pub fn put_point_op(p: &RecoveryPoint) -> Op {
    Op::PutMeta(
        point_key(&p.volume, p.id),
        serde_json::to_vec(p).unwrap_or_default(),
    )
}

/// Is the replica image a consistent state that the stream moves forward
/// (no commit half applied, no resync open or catching up)?
pub fn consistent(v: &VolumeRecord) -> bool {
    v.applying.is_none()
        && v.stream.resync_from.is_none()
        && v.stream
            .inconsistent_until
            .is_none_or(|u| v.stream.applied_seq >= u)
}

pub fn list_points(s: &dyn ChunkStore, volume: &str) -> Result<Vec<RecoveryPoint>, StoreError> {
    s.scan_meta(&point_prefix(volume))?
        .iter()
        .map(|(k, v)| decode(k, v))
        .collect()
}
