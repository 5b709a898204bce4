//! A volume's passes at the primary (snapshot passes, seeds, resyncs):
//! trigger, progress, results.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::store::state::PassReport;

/// Live counters of the pass in progress, read by `ferry sync --wait`.
#[derive(Debug, Default)]
pub struct Progress {
    pub size: AtomicU64,
    pub scanned: AtomicU64,
    pub to_send: AtomicU64,
    pub sent: AtomicU64,
    pub phase: Mutex<String>,
}

impl Progress {
    pub fn reset(&self, size: u64) {
        self.size.store(size, Ordering::Relaxed);
        self.scanned.store(0, Ordering::Relaxed);
        self.to_send.store(0, Ordering::Relaxed);
        self.sent.store(0, Ordering::Relaxed);
        self.set_phase("scanning");
    }

    pub fn set_phase(&self, p: &str) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = p.to_string();
    }
}

#[derive(Default)]
pub struct VolumeRuntime {
    /// Chunks put on the wire since the daemon started, failed passes included.
    pub chunks_sent_total: AtomicU64,
    pub trigger: Notify,
    /// Told when a pass ends (`ferry sync --wait` returns at once).
    pub ended: Notify,
    pub progress: Progress,
    pub state: Mutex<RunState>,
}

impl VolumeRuntime {
    /// Asks for a pass now; returns the `finished` count that means a pass
    /// begun after this call has ended.
    pub fn trigger_pass(&self) -> u64 {
        let wait_for = self.state.lock().unwrap_or_else(|p| p.into_inner()).started + 1;
        self.trigger.notify_one();
        wait_for
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunState {
    pub running: bool,
    /// Passes started and finished since the daemon started; `ferry sync`
    /// waits for `finished >= the started count it was given + 1`.
    pub started: u64,
    pub finished: u64,
    pub last_error: Option<String>,
    pub last_report: Option<PassReport>,
}

/// What `GET /volumes/NAME/progress` returns.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProgressView {
    pub state: RunState,
    pub phase: String,
    pub size: u64,
    pub scanned: u64,
    pub to_send: u64,
    pub sent: u64,
    pub chunks_sent_total: u64,
}

impl VolumeRuntime {
    /// The view once `finished` reaches `n`, or after `wait_max`.
    pub async fn view_when_finished(&self, n: u64, wait_max: std::time::Duration) -> ProgressView {
        let ended = self.ended.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        if self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finished
            < n
        {
            let _ = tokio::time::timeout(wait_max, ended).await;
        }
        self.view()
    }

    pub fn view(&self) -> ProgressView {
        let p = &self.progress;
        ProgressView {
            state: self.state.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            phase: p.phase.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            size: p.size.load(Ordering::Relaxed),
            scanned: p.scanned.load(Ordering::Relaxed),
            to_send: p.to_send.load(Ordering::Relaxed),
            sent: p.sent.load(Ordering::Relaxed),
            chunks_sent_total: self.chunks_sent_total.load(Ordering::Relaxed),
        }
    }
}
