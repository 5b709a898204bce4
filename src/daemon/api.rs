//! The admin API's request and response bodies, shared by daemon and CLI.

use serde::{Deserialize, Serialize};

use super::runtime::ProgressView;
use super::verify::VerifyReport;
use crate::store::StoreStats;
use crate::store::state::{Mode, PassReport, RecoveryPoint, Role, Totals};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRequest {
    pub ttl_ms: u64,
    /// Overrides the listen address the token carries.
    #[serde(default)]
    pub address: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token: String,
    pub expires: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinResponse {
    pub peer: String,
    pub address: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddVolume {
    pub name: String,
    pub path: String,
    pub mode: Mode,
    pub interval_ms: u64,
    pub chunk_size: u32,
    /// 0: twice the interval.
    #[serde(default)]
    pub rpo_target_ms: u64,
    /// Sync mode: how long a flush waits for the DR site (0: the default, 10 s).
    #[serde(default)]
    pub sync_wait_ms: u64,
    #[serde(default)]
    pub sync_fallback: crate::store::state::SyncFallback,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub role: Role,
    pub mode: Mode,
    pub size: u64,
    pub chunk_size: u32,
    pub path: String,
    pub interval_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SyncResponse {
    /// `ferry sync --wait` is done when a pass numbered at least this has finished.
    pub wait_for: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkStatus {
    pub up: bool,
    pub rtt_ms: Option<f64>,
    pub udp_tx_bytes: u64,
    pub udp_rx_bytes: u64,
    /// The largest UDP payload the link's path was found to carry (QUIC's
    /// path MTU discovery: 1452 on an Ethernet path, up to 8952 with jumbo
    /// frames).
    #[serde(default)]
    pub udp_payload_bytes: Option<u16>,
    /// The bandwidth limit on what this site sends (bytes/s; 0: none).
    #[serde(default)]
    pub limit_bytes_per_s: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub role: Role,
    pub mode: Mode,
    pub size: u64,
    /// `consistent`; `applying` while a replica image is being rewritten;
    /// `resyncing` while it is brought level out of order (use the last point).
    pub consistency: String,
    pub last_point: Option<RecoveryPoint>,
    pub last_point_age_s: Option<u64>,
    pub totals: Totals,
    pub last_pass: Option<PassReport>,
    pub last_error: Option<String>,
    pub progress: Option<ProgressView>,
    /// Async and sync volumes at the primary: journal, lag, fallback state.
    #[serde(default)]
    pub stream: Option<crate::daemon::stream::StreamView>,
    /// Async and sync volumes at the DR site: redo log and apply progress.
    #[serde(default)]
    pub redo: Option<crate::daemon::replica_stream::RedoView>,
    /// The role machine: epoch, relation to the peer, split brain, fence.
    #[serde(default)]
    pub role_state: crate::failover::role::RoleView,
    /// The epoch history, oldest first.
    #[serde(default)]
    pub history: crate::failover::epoch::History,
    /// Why the volume's write gate is closed (`None`: open, or a replica).
    #[serde(default)]
    pub gate: Option<String>,
    /// The volume's background jobs and their errors.
    #[serde(default)]
    pub jobs: Vec<crate::daemon::worker::JobView>,
    /// A drill running at this (DR) site.
    #[serde(default)]
    pub drill: Option<crate::daemon::drills::DrillView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SiteStatus {
    pub site: String,
    pub version: String,
    pub uptime_s: u64,
    pub peer: Option<String>,
    pub peer_address: Option<String>,
    pub link: LinkStatus,
    pub store: StoreStats,
    /// The last garbage collection's (or its space reclaim's) failure,
    /// until one succeeds.
    #[serde(default)]
    pub gc_error: Option<String>,
    pub volumes: Vec<VolumeStatus>,
    /// Site-wide jobs (accepting and dialing the peer, NBD, admin, metrics).
    #[serde(default)]
    pub jobs: Vec<crate::daemon::worker::JobView>,
}

pub type VerifyResponse = VerifyReport;

/// `ferry link limit`: bytes per second this site may send to its peer
/// (0: no limit).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkLimitRequest {
    pub bytes_per_s: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailoverRequest {
    /// Promote this site while the primary is unreachable.
    pub force: bool,
    /// Zero-loss switchover (at the primary).
    #[serde(default)]
    pub planned: bool,
    /// Planned: disconnect NBD clients that are still connected.
    #[serde(default)]
    pub disconnect_clients: bool,
    /// Planned, snapshot mode: the operator says the volume's writers are off.
    #[serde(default)]
    pub workload_stopped: bool,
    /// The point to promote (default: the replica image when consistent,
    /// else the newest point).
    pub point: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeStatusBrief {
    pub name: String,
    pub role: Role,
    /// Why writes are refused (`None`: the gate is open).
    pub gate: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResolveRequest {
    /// The site whose data wins.
    pub keep: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResolveResponse {
    pub outcome: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DemoteRequest {
    pub reason: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DrillStartRequest {
    /// The point to clone; the newest when absent.
    pub point: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DrillStarted {
    pub state: crate::failover::drill::DrillState,
    /// The NBD export name of the clone.
    pub export: String,
    /// The NBD Unix socket it is served on.
    pub socket: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreRequest {
    /// The point to restore; the newest when absent.
    pub point: Option<u64>,
    /// A new file to write the image to (absolute).
    pub to: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreResponse {
    pub point: RecoveryPoint,
    pub path: String,
    /// Bytes of data written (holes left as holes).
    pub bytes_written: u64,
}
