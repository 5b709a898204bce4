//! The admin API's request and response bodies, shared by daemon and CLI.

use serde::{Deserialize, Serialize};

use super::primary::VerifyReport;
use super::runtime::ProgressView;
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
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub role: Role,
    pub mode: Mode,
    pub size: u64,
    /// `consistent`, or `applying` while a replica image is being rewritten.
    pub consistency: String,
    pub last_point: Option<RecoveryPoint>,
    pub last_point_age_s: Option<u64>,
    pub totals: Totals,
    pub last_pass: Option<PassReport>,
    pub last_error: Option<String>,
    pub progress: Option<ProgressView>,
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
    pub volumes: Vec<VolumeStatus>,
}

pub type VerifyResponse = VerifyReport;
