//! `ferry serve`: the daemon. Wires the store, the QUIC endpoint, the link to
//! the peer, the volume schedulers and the admin API, and stops on SIGTERM/SIGINT.

pub mod admin;
pub mod api;
pub mod exports;
pub mod link;
pub mod pairing;
pub mod primary;
pub mod redo;
pub mod replica;
pub mod restore;
pub mod runtime;
pub mod stream;
pub mod streamer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use quinn::Connection;
use tokio::sync::Notify;

use crate::config::{Config, PeerConfig};
use crate::store::state::{self, PassReport, Role};
use crate::store::{ChunkStore, RocksStore, StoreError};
use crate::transport::tls::{Identity, Pins, SharedPins};
use replica::ReplicaSide;
use runtime::VolumeRuntime;

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
    link: Mutex<Option<Connection>>,
    pub volumes: Mutex<HashMap<String, Arc<VolumeRuntime>>>,
    pub started: Instant,
    pub shutdown: Notify,
    /// Signalled when pairing pins a peer, so the dialer starts.
    pub paired: Notify,
    pub pair_lock: Mutex<()>,
    pub metrics: crate::metrics::Metrics,
}

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
        let g = self.link.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().filter(|c| c.close_reason().is_none()).cloned()
    }

    pub fn set_link(&self, conn: Option<Connection>) {
        let old = std::mem::replace(
            &mut *self.link.lock().unwrap_or_else(|p| p.into_inner()),
            conn,
        );
        if let Some(old) = old {
            old.close(0u32.into(), b"replaced by a newer connection");
        }
    }

    /// Forgets `conn` as the link unless a newer one replaced it already.
    pub fn clear_link(&self, conn: &Connection) {
        let mut g = self.link.lock().unwrap_or_else(|p| p.into_inner());
        if g.as_ref()
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            *g = None;
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

    /// Records a completed pass in the volume's record (durable).
    pub fn record_pass(&self, name: &str, report: PassReport) -> Result<(), StoreError> {
        let Some(mut rec) = state::get_volume(&*self.store, name)? else {
            return Ok(());
        };
        rec.committed = Some(report.root);
        rec.size = report.size;
        rec.totals.passes += 1;
        rec.totals.bytes_logical += report.size;
        rec.totals.bytes_sent += report.bytes_sent;
        rec.totals.chunks_sent += report.chunks_sent();
        rec.last_pass = Some(report);
        self.store.apply(vec![state::put_volume_op(&rec)], true)
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

    fn peer_label(&self) -> String {
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
                .set(conn.map(|c| c.rtt().as_secs_f64()).unwrap_or(0.0));
        }
        m.gc_deleted_chunks.inc_by(
            self.replica
                .gc_deleted
                .swap(0, std::sync::atomic::Ordering::Relaxed),
        );
        let st = self.store.stats()?;
        m.store_bytes.set(st.chunk_bytes as i64);
        m.store_chunks.set(st.chunks as i64);
        let now = crate::util::now_unix();
        for v in state::list_volumes(&*self.store)? {
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
            // Epochs arrive with failover; until then every volume is in its first.
            m.volume_epoch.with_label_values(&[name]).set(1);
            m.volume_consistent
                .with_label_values(&[name])
                .set(i64::from(state::consistent(&v)));
            m.volume_size_bytes
                .with_label_values(&[name])
                .set(v.size as i64);
            let stream = if primary {
                self.volumes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(name)
                    .and_then(|rt| rt.stream.get().map(|s| s.view()))
            } else {
                None
            };
            let redo = self.replica.redo_view(name);
            let (jb, jmax) = match (&stream, &redo) {
                (Some(s), _) => (s.journal_bytes, s.journal_bytes_max),
                (None, Some(r)) => (r.redo_bytes, self.replica.journal_bytes_max),
                _ => (0, 0),
            };
            m.journal_bytes.with_label_values(&[name]).set(jb as i64);
            m.journal_bytes_max
                .with_label_values(&[name])
                .set(jmax as i64);
            m.sync_degraded
                .with_label_values(&[name])
                .set(i64::from(stream.as_ref().is_some_and(|s| s.degraded)));
            m.split_brain.with_label_values(&[name]).set(0);
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
                let rt = self
                    .volumes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(name)
                    .cloned();
                let lag = rt
                    .map(|r| r.view())
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

    /// Starts the pass scheduler (snapshot) or the journal and its streamer
    /// (async, sync) of a primary volume (once).
    pub fn start_volume(self: &Arc<Self>, name: &str) -> Arc<VolumeRuntime> {
        let mut vols = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rt) = vols.get(name) {
            return rt.clone();
        }
        let rt = Arc::new(VolumeRuntime::default());
        vols.insert(name.to_string(), rt.clone());
        let rec = state::get_volume(&*self.store, name).ok().flatten();
        match rec {
            Some(rec) if rec.mode.continuous() => {
                let (fsync, journal_max) = {
                    let cfg = self.config.read().unwrap_or_else(|p| p.into_inner());
                    (cfg.fsync, cfg.limits.journal_bytes_max.0)
                };
                let flush = self.metrics.flush_seconds.with_label_values(&[name]);
                match stream::VolumeStream::open(
                    &rec,
                    &self.journal_dir(name),
                    journal_max,
                    self.store.clone(),
                    fsync,
                    flush,
                ) {
                    Ok(vs) => {
                        let _ = rt.stream.set(vs.clone());
                        rt.progress.set_phase("streaming");
                        tokio::spawn(streamer::run(
                            self.clone(),
                            name.to_string(),
                            rt.clone(),
                            vs,
                        ));
                    }
                    Err(e) => {
                        tracing::error!(volume = name, error = %e, "cannot open the volume's journal; it is not exported or replicated");
                        rt.state
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .last_error = Some(e);
                    }
                }
            }
            _ => {
                tokio::spawn(primary::schedule(
                    self.clone(),
                    name.to_string(),
                    rt.clone(),
                ));
            }
        }
        rt
    }

    /// Where a continuous volume's write journal lives.
    pub fn journal_dir(&self, volume: &str) -> PathBuf {
        self.dir.join("journal").join(volume)
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
    let identity = Identity::load(dir)?;
    let store: Arc<dyn ChunkStore> = Arc::new(RocksStore::open(&dir.join(STORE_DIR))?);
    let pins: SharedPins = Arc::new(RwLock::new(Pins {
        peer: config.peer.as_ref().map(|p| p.fingerprint.clone()),
        pairing_until: None,
    }));
    let endpoint = crate::transport::endpoint::bind(config.listen, &identity, pins.clone())
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
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot serve NBD on {addr} (TCP): {e}"))?,
        ),
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
    let replica = Arc::new(ReplicaSide::new(
        store.clone(),
        dir,
        config.fsync,
        config.retention.clone(),
        config.limits.journal_bytes_max.0,
        config.point_interval.0,
    ));
    replica.recover()?;
    let site = Arc::new(Site {
        dir: dir.to_path_buf(),
        config: RwLock::new(config.clone()),
        identity,
        pins,
        store,
        replica,
        endpoint,
        link: Mutex::new(None),
        volumes: Mutex::new(HashMap::new()),
        started: Instant::now(),
        shutdown: Notify::new(),
        paired: Notify::new(),
        pair_lock: Mutex::new(()),
        metrics: crate::metrics::Metrics::new(),
    });
    let admin = admin::bind(&site).await?;
    tracing::info!(site = %config.site, listen = %config.listen, dir = %dir.display(), "ferry daemon started");

    for rec in state::list_volumes(&*site.store)? {
        if rec.role == Role::Primary {
            site.start_volume(&rec.name);
        }
    }
    tokio::spawn(link::accept_loop(site.clone()));
    tokio::spawn(link::dial_loop(site.clone()));
    let admin_task = tokio::spawn(admin::run(site.clone(), admin));
    let nbd_task = tokio::spawn(serve_nbd(site.clone(), nbd_tcp));
    let metrics_task =
        metrics_listener.map(|l| tokio::spawn(admin::serve_metrics(site.clone(), l)));

    wait_for_signal().await;
    tracing::info!("stopping");
    site.shutdown.notify_waiters();
    site.replica.stop();
    admin_task.abort();
    nbd_task.abort();
    let _ = std::fs::remove_file(dir.join(NBD_SOCKET));
    if let Some(t) = metrics_task {
        t.abort();
    }
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

/// Exports the site's primary volumes over NBD on `DIR/nbd.sock` and, where
/// configured, on TCP.
async fn serve_nbd(site: Arc<Site>, tcp: Option<tokio::net::TcpListener>) {
    let exports: Arc<dyn crate::nbd::Exports> = Arc::new(exports::SiteExports::new(site.clone()));
    let s = site.clone();
    let observer: crate::nbd::Observer = Arc::new(move |volume, cmd, took| {
        s.metrics
            .nbd_request_seconds
            .with_label_values(&[volume, cmd])
            .observe(took.as_secs_f64());
    });
    let limits = crate::nbd::Limits::default();
    if let Some(tcp) = tcp {
        let (exports, observer) = (exports.clone(), observer.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = tcp.accept().await else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                let (exports, observer) = (exports.clone(), observer.clone());
                tokio::spawn(async move {
                    if let Err(e) =
                        crate::nbd::serve_conn(stream, exports, limits, Some(observer)).await
                    {
                        tracing::warn!(%peer, error = %e, "NBD connection ended with an error");
                    }
                });
            }
        });
    }
    let path = site.dir.join(NBD_SOCKET);
    if let Err(e) = crate::nbd::serve_unix(&path, exports, limits, Some(observer)).await {
        tracing::error!(error = %e, path = %path.display(), "NBD server stopped");
    }
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
