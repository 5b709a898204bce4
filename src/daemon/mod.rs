//! `ferry serve`: the daemon. Wires the store, the QUIC endpoint, the link to
//! the peer, one handle per volume and the admin API; every background job
//! is a named worker (`worker.rs`) that logs, retries and shows its errors;
//! stops on SIGTERM/SIGINT, joining the jobs.

pub mod admin;
pub mod api;
pub mod commit;
pub mod drills;
pub mod exports;
pub mod failover;
pub mod gate;
pub mod link;
pub mod pairing;
pub mod primary;
pub mod recent;
pub mod remove;
pub mod replica;
pub mod replica_stream;
pub mod restore;
pub mod runtime;
pub mod scrub;
pub mod stream;
pub mod streamer;
pub mod verify;
pub mod volume;
pub mod worker;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use quinn::Connection;
use tokio::sync::{Notify, watch};

use crate::config::{Config, PeerConfig};
use crate::proto::messages::VolumeHello;
use crate::store::state::{self, PassReport, Role};
use crate::store::{ChunkStore, RocksStore, StoreError};
use crate::transport::tls::{Identity, Pins, SharedPins};
use replica::{ReplicaSide, Volumes};
use volume::VolumeHandle;
use worker::{Job, JobMetrics, Jobs};

pub const ADMIN_SOCKET: &str = "admin.sock";
pub const STORE_DIR: &str = "store";
pub const NBD_SOCKET: &str = "nbd.sock";

/// One running site.
pub struct Site {
    pub dir: PathBuf,
    pub config: RwLock<Config>,
    pub identity: Identity,
    pub pins: SharedPins,
    pub store: Arc<dyn ChunkStore>,
    pub replica: Arc<ReplicaSide>,
    pub endpoint: quinn::Endpoint,
    /// The link to the peer: set once the peer's `Hello` was taken in.
    link: watch::Sender<Option<Connection>>,
    /// Every volume of the site, whatever its role.
    pub volumes: Volumes,
    pub started: Instant,
    /// Signalled when pairing pins a peer, so the dialer starts.
    pub paired: Notify,
    pub pair_lock: Mutex<()>,
    pub metrics: crate::metrics::Metrics,
    /// Site-wide jobs: accepting and dialing the peer, NBD, admin, metrics.
    pub jobs: Jobs,
    /// Passes (seeds, resyncs, snapshot passes) running at once, site-wide.
    pub passes: Arc<tokio::sync::Semaphore>,
    /// Bytes of the peer's requests held at once (`limits.peer_inflight_bytes_max`).
    pub peer_budget: Arc<tokio::sync::Semaphore>,
    /// The link's bandwidth limit now (bytes/s, 0: none), as `ferry.toml` set
    /// it or `ferry link limit` changed it; the limiter is
    /// `transport::limit::LINK`.
    pub link_limit: std::sync::atomic::AtomicU64,
    /// Failover drills running at this (DR) site.
    pub drills: drills::Drills,
    /// The hash-chained log of operator actions (drills, failovers, resolves).
    pub audit: crate::failover::audit::AuditLog,
    /// Unix seconds the link to the peer was last lost (0: not yet).
    pub link_lost_at: std::sync::atomic::AtomicU64,
    /// Itself, for jobs started from a request.
    this: std::sync::OnceLock<std::sync::Weak<Site>>,
    /// Volumes a resolve runs for at this site.
    pub resolving: Mutex<std::collections::HashSet<String>>,
    /// Volumes this site is handing over (a planned switchover waiting for
    /// the peer's answer): the peer's Hello does not start the "behind"
    /// path for them meanwhile; the hand-over finishes the change itself.
    pub handing_over: Mutex<std::collections::HashSet<String>>,
}

/// Passes that run at once, site-wide.
pub const PASSES_CONCURRENT_MAX: usize = 4;

impl Site {
    pub fn name(&self) -> String {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .site
            .clone()
    }

    /// The live connection to the peer, if any.
    pub fn link(&self) -> Option<Connection> {
        self.link
            .borrow()
            .as_ref()
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    /// Changes whenever the link comes or goes.
    pub fn link_watch(&self) -> watch::Receiver<Option<Connection>> {
        self.link.subscribe()
    }

    pub fn set_link(&self, conn: Option<Connection>) {
        let old = self.link.send_replace(conn);
        if let Some(old) = old {
            old.close(0u32.into(), b"replaced by a newer connection");
        }
    }

    /// Forgets `conn` as the link unless a newer one replaced it already;
    /// every volume learns that the peer is gone.
    pub fn clear_link(&self, conn: &Connection) {
        let cleared = self.link.send_if_modified(|l| {
            if l.as_ref()
                .is_some_and(|c| c.stable_id() == conn.stable_id())
            {
                *l = None;
                true
            } else {
                false
            }
        });
        if cleared {
            self.link_lost_at.store(
                crate::util::now_unix(),
                std::sync::atomic::Ordering::Relaxed,
            );
            for h in self.handles() {
                h.link_down();
            }
        }
    }

    /// Every volume handle.
    pub fn handles(&self) -> Vec<Arc<VolumeHandle>> {
        self.volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn handle(&self, name: &str) -> Option<Arc<VolumeHandle>> {
        self.volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// What this site says about its volumes in its `Hello`.
    pub fn hello_volumes(&self) -> Vec<VolumeHello> {
        self.handles().iter().map(|h| h.hello()).collect()
    }

    /// Takes in the peer's `Hello`: each volume's role machine compares the
    /// histories and decides (in step, behind, split brain).
    pub fn peer_hello(&self, volumes: &[VolumeHello]) {
        let by_name: HashMap<&str, &VolumeHello> =
            volumes.iter().map(|v| (v.name.as_str(), v)).collect();
        for h in self.handles() {
            let peer = by_name.get(h.name.as_str()).copied();
            h.peer_hello(peer);
            if peer.is_none()
                && h.role() == state::Role::Primary
                && let Some(vs) = h.volume_stream()
            {
                // The DR site holds no copy (removed there): a stream has
                // nothing to continue, so the volume is seeded again.
                let v = vs.view();
                if !v.resync_needed && !v.resync_running {
                    vs.request_resync("the DR site holds no copy of the volume (removed there?)");
                }
            }
            if let Some(ahead) = h.take_behind() {
                self.spawn_become_replica(&h, ahead);
            }
        }
    }

    /// Starts the job that makes a volume this site learnt it is behind on
    /// the replica of the side that is ahead (`failover::become_replica`).
    pub fn spawn_become_replica(
        &self,
        h: &Arc<VolumeHandle>,
        ahead: crate::failover::epoch::History,
    ) {
        let Some(site) = self.me() else { return };
        if self
            .handing_over
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&h.name)
        {
            tracing::info!(volume = %h.name, "the peer's newer epoch is this site's own hand-over: the switchover finishes the change");
            return;
        }
        let name = format!("become-replica {} epoch {}", h.name, ahead.epoch());
        let h2 = h.clone();
        self.jobs.spawn_once(&name, || {
            Job::spawn(&name, &h2.name.clone(), self.job_metrics(), move |_ctx| {
                failover::become_replica(site.clone(), h2.clone(), ahead.clone())
            })
        });
    }

    /// Whether a resolve of `name` runs at this site.
    /// A planned switchover of the volume is handing it over now.
    pub fn handing_over(&self, name: &str) -> bool {
        self.handing_over
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    pub fn resolving(&self, name: &str) -> bool {
        self.resolving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    /// Sends this site's `Hello` again on the live link (a volume changed
    /// role): the peer's role machines decide anew, and so do ours on its answer.
    pub fn rehello(&self) {
        let (Some(site), Some(conn)) = (self.me(), self.link()) else {
            return;
        };
        tokio::spawn(async move {
            if let Err(e) = link::say_hello(&site, &conn).await {
                tracing::warn!(error = %e, "a new Hello on the link failed; the next reconnect sends one");
            }
        });
    }

    /// Unix seconds this site last heard from its peer: now while the link
    /// is up, else when it went down (`None`: not since the daemon started).
    pub fn last_contact(&self) -> Option<u64> {
        if self.link().is_some() {
            return Some(crate::util::now_unix());
        }
        match self.link_lost_at.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            t => Some(t),
        }
    }

    fn me(&self) -> Option<Arc<Site>> {
        self.this.get().and_then(|w| w.upgrade())
    }

    pub fn job_metrics(&self) -> JobMetrics {
        JobMetrics {
            errors: self.metrics.job_errors.clone(),
            failing: self.metrics.job_failing.clone(),
        }
    }

    /// Pins `peer` in memory and in the config file.
    pub fn set_peer(&self, peer: PeerConfig) -> Result<(), crate::config::ConfigError> {
        let mut cfg = self.config.write().unwrap_or_else(|p| p.into_inner());
        cfg.peer = Some(peer.clone());
        cfg.save(&self.dir)?;
        let mut pins = self.pins.write().unwrap_or_else(|p| p.into_inner());
        // The pairing window stays open until its tokens expire, so that a
        // second use of a token gets a clear "already used" instead of a TLS alert.
        pins.peer = Some(peer.fingerprint);
        drop(pins);
        self.paired.notify_waiters();
        Ok(())
    }

    /// Runs an operator action between two audit entries: `begin` (durable
    /// before anything happens; the action is refused if it cannot be
    /// written) and `end` with its outcome.
    pub async fn audited<T, F>(
        &self,
        action: &str,
        volume: &str,
        by: &crate::failover::drill::Operator,
        details: serde_json::Value,
        run: F,
    ) -> Result<T, String>
    where
        F: std::future::Future<Output = Result<T, String>>,
    {
        self.audit
            .append(action, volume, "begin", by, details, None)
            .map_err(|e| {
                format!(
                    "cannot write the audit log {}: {e}; the action was not run",
                    self.dir.join(crate::failover::audit::AUDIT_LOG).display()
                )
            })?;
        let r = run.await;
        let outcome = match &r {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("error: {e}"),
        };
        if let Err(e) = self.audit.append(
            action,
            volume,
            "end",
            by,
            serde_json::Value::Null,
            Some(outcome),
        ) {
            tracing::error!(action, volume, error = %e, "cannot write the outcome to the audit log");
        }
        r
    }

    /// Records a completed pass in the volume's record (durable).
    pub fn record_pass(&self, h: &VolumeHandle, report: PassReport) -> Result<(), StoreError> {
        h.update(true, |rec| {
            rec.committed = Some(report.root);
            rec.size = report.size;
            rec.totals.passes += 1;
            rec.totals.bytes_logical += report.size;
            rec.totals.bytes_sent += report.bytes_sent;
            rec.totals.chunks_sent += report.chunks_sent();
            rec.last_pass = Some(report);
        })
    }

    /// The congestion controller of the link (the config's, as it started).
    pub fn congestion(&self) -> crate::config::Congestion {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .limits
            .congestion
    }

    /// The frame limit for exchanges with the peer.
    pub fn frame_bytes_max(&self) -> u64 {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .limits
            .frame_bytes_max
            .0
    }

    /// The paired site's name (empty when not paired).
    pub fn peer_label(&self) -> String {
        let cfg = self.config.read().unwrap_or_else(|p| p.into_inner());
        cfg.peer
            .as_ref()
            .map(|p| p.name.clone())
            .unwrap_or_default()
    }

    /// Counts stream bytes on the link, by kind.
    pub fn count_wire(&self, kind: &str, sent: u64, received: u64) {
        let peer = self.peer_label();
        self.metrics
            .wire_sent_bytes
            .with_label_values(&[&peer, kind])
            .inc_by(sent);
        self.metrics
            .wire_received_bytes
            .with_label_values(&[&peer, kind])
            .inc_by(received);
    }

    /// Counts a completed pass.
    pub fn observe_pass(&self, volume: &str, r: &PassReport) {
        let m = &self.metrics;
        m.passes.with_label_values(&[volume, "ok"]).inc();
        m.pass_duration_seconds
            .with_label_values(&[volume])
            .observe(r.duration_ms as f64 / 1000.0);
        m.bytes_read
            .with_label_values(&[volume])
            .inc_by(r.bytes_read);
        m.chunks_sent
            .with_label_values(&[volume, "whole"])
            .inc_by(r.chunks_sent_full);
        m.chunks_sent
            .with_label_values(&[volume, "delta"])
            .inc_by(r.chunks_sent_delta);
        m.chunks_deduplicated
            .with_label_values(&[volume])
            .inc_by(r.chunks_deduped);
        m.chunks_zero_skipped
            .with_label_values(&[volume])
            .inc_by(r.chunks_zero);
        let ratio = if r.bytes_encoded > 0 {
            r.bytes_changed as f64 / r.bytes_encoded as f64
        } else {
            1.0
        };
        m.compression_ratio.with_label_values(&[volume]).set(ratio);
    }

    /// Sets the state gauges from the site as it is now (at each scrape).
    pub fn refresh_metrics(&self) -> Result<(), StoreError> {
        let m = &self.metrics;
        let peer = self.peer_label();
        if !peer.is_empty() {
            m.touch_peer(&peer);
            let conn = self.link();
            m.link_up
                .with_label_values(&[&peer])
                .set(i64::from(conn.is_some()));
            m.link_rtt_seconds
                .with_label_values(&[&peer])
                .set(conn.as_ref().map(|c| c.rtt().as_secs_f64()).unwrap_or(0.0));
            m.link_udp_payload_bytes.with_label_values(&[&peer]).set(
                conn.map(|c| i64::from(c.stats().path.current_mtu))
                    .unwrap_or(0),
            );
        }
        m.link_limit_bytes
            .set(self.link_limit.load(std::sync::atomic::Ordering::Relaxed) as i64);
        let waited = crate::transport::limit::LINK.throttled_seconds();
        let counted = m.link_throttled_seconds.get();
        if waited > counted {
            m.link_throttled_seconds.inc_by(waited - counted);
        }
        let take =
            |n: &std::sync::atomic::AtomicU64| n.swap(0, std::sync::atomic::Ordering::Relaxed);
        m.gc_deleted_chunks.inc_by(take(&self.replica.gc_deleted));
        m.gc_failures.inc_by(take(&self.replica.gc_failures));
        m.store_reclaimed_bytes
            .inc_by(take(&self.replica.reclaimed_bytes));
        let st = self.store.stats()?;
        m.store_bytes.set(st.chunk_bytes as i64);
        m.store_chunks.set(st.chunks as i64);
        m.store_delta_chunks.set(st.delta_chunks as i64);
        let now = crate::util::now_unix();
        for h in self.handles() {
            let v = h.record();
            let name = v.name.as_str();
            let primary = v.role == Role::Primary;
            m.touch_volume(name, primary);
            for role in ["primary", "replica"] {
                m.volume_role
                    .with_label_values(&[name, role])
                    .set(i64::from(v.role.to_string() == role));
            }
            m.volume_mode
                .with_label_values(&[name, &v.mode.to_string()])
                .set(1);
            let rv = h.role_view();
            m.volume_epoch
                .with_label_values(&[name])
                .set(rv.epoch as i64);
            m.split_brain
                .with_label_values(&[name])
                .set(i64::from(rv.split_brain));
            m.volume_created_timestamp
                .with_label_values(&[name])
                .set(v.created as f64);
            m.volume_consistent
                .with_label_values(&[name])
                .set(i64::from(state::consistent(&v)));
            m.volume_size_bytes
                .with_label_values(&[name])
                .set(v.size as i64);
            let stream = if primary {
                h.volume_stream().map(|s| s.view())
            } else {
                None
            };
            let redo = h.replica_stream().map(|r| r.view());
            let (jb, jmax) = match (&stream, &redo) {
                (Some(s), _) => (s.journal_bytes, s.journal_bytes_max),
                (None, Some(r)) => (r.redo_bytes, self.replica.journal_bytes_max),
                _ => (0, 0),
            };
            m.journal_bytes.with_label_values(&[name]).set(jb as i64);
            if let Some(s) = &stream {
                m.resync_scan_chunks
                    .with_label_values(&[name])
                    .set(s.resync_scan_chunks.unwrap_or(s.chunks) as i64);
            }
            m.journal_bytes_max
                .with_label_values(&[name])
                .set(jmax as i64);
            m.sync_degraded
                .with_label_values(&[name])
                .set(i64::from(stream.as_ref().is_some_and(|s| s.degraded)));
            m.image_io_error.with_label_values(&[name]).set(i64::from(
                stream.as_ref().is_some_and(|s| s.io_error.is_some()),
            ));
            if primary && v.mode == state::Mode::Sync {
                m.rpo_zero
                    .with_label_values(&[name])
                    .set(i64::from(stream.as_ref().is_some_and(|s| s.rpo_zero)));
            }
            m.last_successful_drill_timestamp.with_label_values(&[name]);
            m.verify_mismatch_bytes.with_label_values(&[name]);
            if primary {
                let ratio = m.compression_ratio.with_label_values(&[name]);
                if ratio.get() == 0.0 {
                    ratio.set(1.0);
                }
                m.rpo_target_seconds
                    .with_label_values(&[name])
                    .set(v.rpo_target_ms() as f64 / 1000.0);
                let point_time = v
                    .last_pass
                    .as_ref()
                    .map(|p| p.started + p.duration_ms / 1000);
                let since = v.last_pass.as_ref().map(|p| p.started).unwrap_or(v.created);
                let point_time = match &stream {
                    Some(s) => s.dr_point.map(|(_, t)| t),
                    None => point_time,
                };
                if let Some(t) = point_time {
                    m.recovery_point_age_seconds
                        .with_label_values(&[name])
                        .set(now.saturating_sub(t) as f64);
                }
                if let Some(s) = &stream {
                    m.lag_seconds.with_label_values(&[name]).set(s.lag_seconds);
                    m.lag_bytes
                        .with_label_values(&[name])
                        .set(s.lag_bytes as i64);
                    continue;
                }
                m.lag_seconds
                    .with_label_values(&[name])
                    .set(now.saturating_sub(since) as f64);
                let lag = Some(h.run.view())
                    .filter(|p| p.state.running && p.phase == "sending")
                    .map(|p| p.to_send.saturating_sub(p.sent))
                    .unwrap_or(0);
                m.lag_bytes.with_label_values(&[name]).set(lag as i64);
            } else {
                let points = state::list_points(&*self.store, name)?;
                m.recovery_points
                    .with_label_values(&[name])
                    .set(points.len() as i64);
                if let Some(p) = points.last() {
                    m.recovery_point_age_seconds
                        .with_label_values(&[name])
                        .set(now.saturating_sub(p.created) as f64);
                }
            }
        }
        Ok(())
    }

    /// Protects a new volume at this site (primary): records it, then starts
    /// its jobs.
    pub fn add_volume(self: &Arc<Self>, rec: state::VolumeRecord) -> Result<(), StoreError> {
        self.store.apply(vec![state::put_volume_op(&rec)], true)?;
        let h = VolumeHandle::new(self.store.clone(), rec, false);
        self.volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(h.name.clone(), h.clone());
        h.start(self);
        // The peer compares the new volume's history with what it holds
        // under that name at once (a name used before is another lineage).
        self.rehello();
        Ok(())
    }

    /// Opens a continuous primary's journal and replays it onto the image.
    /// A continuous primary's journal and stream: the one open, or opened
    /// now, which replays the journal onto the image (blocking). One opener
    /// at a time per volume: a stream job stopped while it opened one may
    /// still be at it when a removal or a demotion opens it to replay.
    pub fn open_volume_stream(
        &self,
        h: &Arc<VolumeHandle>,
    ) -> Result<Arc<stream::VolumeStream>, String> {
        let _one = h.stream_open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(vs) = h.volume_stream() {
            return Ok(vs);
        }
        let (fsync, journal_max, link_down_max) = {
            let cfg = self.config.read().unwrap_or_else(|p| p.into_inner());
            (
                cfg.fsync,
                cfg.limits.journal_bytes_max.0,
                cfg.limits.link_down_max.0,
            )
        };
        let flush = self.metrics.flush_seconds.with_label_values(&[&h.name]);
        let checkpoints = self
            .metrics
            .journal_checkpoints
            .with_label_values(&[&h.name]);
        let vs = stream::VolumeStream::open(
            h,
            &self.journal_dir(&h.name),
            journal_max,
            fsync,
            link_down_max,
            flush,
            checkpoints,
        )?;
        h.set_volume_stream(vs.clone());
        Ok(vs)
    }

    /// Where a continuous volume's write journal lives.
    pub fn journal_dir(&self, volume: &str) -> PathBuf {
        self.dir.join("journal").join(volume)
    }

    /// Starts a site-wide job.
    fn spawn_job<F, Fut>(self: &Arc<Self>, name: &str, body: F)
    where
        F: Fn(Arc<Site>, worker::JobCtx) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        let site = self.clone();
        let job = Job::spawn(name, "", self.job_metrics(), move |ctx| {
            body(site.clone(), ctx)
        });
        self.jobs.add(job);
    }
}

/// Raises the soft limit on open files to the hard limit: a DR center's
/// daemon holds a journal (or redo log) and an image per volume.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct passed, nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                tracing::warn!(soft = lim.rlim_cur, "cannot raise the open file limit");
            }
        }
    }
}

/// Runs the daemon for `dir` until SIGTERM or SIGINT.
pub async fn serve(dir: &Path) -> anyhow::Result<()> {
    let config = Config::load(dir)?;
    if !config.fsync {
        tracing::warn!(
            "fsync is OFF in ferry.toml: a power loss can lose or tear data that was acknowledged. Do not run production like this."
        );
    }
    raise_nofile_limit();
    let identity = Identity::load(dir)?;
    let store: Arc<dyn ChunkStore> = Arc::new(RocksStore::open(&dir.join(STORE_DIR))?);
    let pins: SharedPins = Arc::new(RwLock::new(Pins {
        peer: config.peer.as_ref().map(|p| p.fingerprint.clone()),
        pairing_until: None,
    }));
    let endpoint = crate::transport::endpoint::bind(
        config.listen,
        &identity,
        pins.clone(),
        config.limits.congestion,
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {} (UDP): {e}; is another daemon using it?",
            config.listen
        )
    })?;
    let mut config = config;
    if config.listen.port() == 0 {
        // Port 0 means "pick one": remember the pick so that tokens and the peer can find us.
        config.listen = endpoint.local_addr()?;
        config.save(dir)?;
    }
    let nbd_tcp = match config.nbd {
        Some(addr) if !addr.ip().is_loopback() => anyhow::bail!(
            "nbd = {addr}: NBD over TCP has no authentication or encryption, so ferry serves it \
             only on a loopback address; use the Unix socket {} (or a loopback address behind \
             an SSH tunnel or a TLS proxy)",
            dir.join(NBD_SOCKET).display()
        ),
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot serve NBD on {addr} (TCP): {e}"))?;
            tracing::warn!(%addr, "NBD over TCP has no authentication: any local user of this host can read and write every exported volume through it");
            Some(l)
        }
        None => None,
    };
    let metrics_listener = match config.metrics {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot serve metrics on {addr} (TCP): {e}; is another daemon using it?"
                )
            })?;
            if addr.port() == 0 {
                config.metrics = Some(l.local_addr()?);
                config.save(dir)?;
            }
            Some(l)
        }
        None => None,
    };
    let metrics = crate::metrics::Metrics::new();
    let volumes: Volumes = Arc::new(Mutex::new(HashMap::new()));
    for rec in state::list_volumes(&*store)? {
        let mut rec = rec;
        if rec.role == Role::Primary && rec.history.is_empty() {
            // A volume from before epochs: its first generation starts now.
            rec.history = crate::failover::epoch::History::first(&config.site);
            store.apply(vec![state::put_volume_op(&rec)], true)?;
        }
        let h = VolumeHandle::new(store.clone(), rec, config.peer.is_some());
        volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(h.name.clone(), h);
    }
    crate::util::set_clock_settle(config.retention.clock_settle.0);
    let mut replica = ReplicaSide::new(
        store.clone(),
        dir,
        config.fsync,
        config.retention.clone(),
        config.limits.journal_bytes_max.0,
        config.point_interval.0,
        volumes.clone(),
        JobMetrics {
            errors: metrics.job_errors.clone(),
            failing: metrics.job_failing.clone(),
        },
    );
    replica.volumes_max = config.limits.volumes_max.clamp(1, 4096) as usize;
    let replica = replica.into_arc();
    {
        let r = replica.clone();
        tokio::task::spawn_blocking(move || r.recover()).await??;
    }
    let site = Arc::new(Site {
        dir: dir.to_path_buf(),
        config: RwLock::new(config.clone()),
        identity,
        pins,
        store,
        replica,
        endpoint,
        link: watch::channel(None).0,
        volumes,
        started: Instant::now(),
        paired: Notify::new(),
        pair_lock: Mutex::new(()),
        metrics,
        jobs: Jobs::default(),
        passes: Arc::new(tokio::sync::Semaphore::new(PASSES_CONCURRENT_MAX)),
        peer_budget: Arc::new(tokio::sync::Semaphore::new(
            config.limits.peer_inflight_bytes_max.0 as usize,
        )),
        link_limit: {
            crate::transport::limit::LINK.set(config.limits.link_bytes_per_s_max.0);
            std::sync::atomic::AtomicU64::new(config.limits.link_bytes_per_s_max.0)
        },
        drills: drills::Drills::default(),
        audit: crate::failover::audit::AuditLog::open(dir)
            .map_err(|e| anyhow::anyhow!("cannot open the audit log in {}: {e}", dir.display()))?,
        link_lost_at: Default::default(),
        this: std::sync::OnceLock::new(),
        resolving: Mutex::new(Default::default()),
        handing_over: Mutex::new(Default::default()),
    });
    let _ = site.this.set(Arc::downgrade(&site));
    drills::recover(&site);
    {
        let known: std::collections::HashSet<String> =
            site.handles().iter().map(|h| h.name.clone()).collect();
        remove::sweep(&site, &known);
    }
    let admin = admin::bind(&site).await?;
    tracing::info!(site = %config.site, listen = %config.listen, dir = %dir.display(), "ferry daemon started");

    for h in site.handles() {
        h.start(&site);
        if let Some(ahead) = h.record().behind_of {
            // A resolve this site lost, interrupted: resume it.
            site.spawn_become_replica(&h, ahead);
        }
    }
    {
        // Primaries that have not heard from the peer by then take writes.
        let (s, wait) = (site.clone(), config.startup_wait.0);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            for h in s.handles() {
                h.startup_wait_over();
            }
        });
    }
    // The exports first: once the daemon answers (ready) or has a link, a
    // client can connect.
    exports::spawn_nbd(&site, nbd_tcp);
    site.spawn_job("peer-accept", link::accept_loop);
    site.spawn_job("peer-dial", link::dial_loop);
    let admin = Arc::new(Mutex::new(Some(admin)));
    site.spawn_job("admin", move |site, ctx| {
        admin::run(site, admin.clone(), ctx)
    });
    if let Some(l) = metrics_listener {
        let l = Arc::new(Mutex::new(Some(l)));
        site.spawn_job("metrics-http", move |site, ctx| {
            admin::serve_metrics(site, l.clone(), ctx)
        });
    }

    wait_for_signal().await;
    tracing::info!("stopping");
    drills::abort_all(&site, "the daemon stopped during the drill").await;
    // The volumes' jobs first (all told at once, so they stop together),
    // then the site's.
    let handles = site.handles();
    for h in &handles {
        h.jobs.signal_all();
    }
    for h in &handles {
        h.stop().await;
    }
    site.jobs.stop_all().await;
    // No write after this (the exports' connections may outlive their
    // jobs): each primary's map of written chunks is kept for the restart.
    for h in &handles {
        if let Some(s) = h.volume_stream() {
            let path = h.record().path;
            if let Err(e) = tokio::task::spawn_blocking(move || s.park(&path)).await {
                tracing::warn!(volume = %h.name, error = %e, "keeping the map of written chunks ended abnormally");
            }
        }
    }
    // Chunk records not yet flushed (they skip the store's log) would be
    // sent again after the restart: a synced empty batch flushes them.
    if let Err(e) = site.store.apply(Vec::new(), true) {
        tracing::warn!(error = %e, "flushing the store at the stop failed");
    }
    // A reclaim may be rewriting the store's files: abandoned (its files
    // are dropped at the next open), not waited for.
    if site.replica.reclaim_running() {
        tracing::info!(
            "a reclaim of the store's space is abandoned; the next collection's reclaim does it again"
        );
    }
    site.store.stop_background_work();
    let _ = std::fs::remove_file(dir.join(NBD_SOCKET));
    if let Some(c) = site.link() {
        c.close(0u32.into(), b"shutting down");
    }
    site.endpoint.close(0u32.into(), b"shutting down");
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(2), site.endpoint.wait_idle()).await;
    let _ = std::fs::remove_file(dir.join(ADMIN_SOCKET));
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
