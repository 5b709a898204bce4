//! `ferry serve`: the daemon. Wires the store, the QUIC endpoint, the link to
//! the peer, the volume schedulers and the admin API, and stops on SIGTERM/SIGINT.

pub mod admin;
pub mod api;
pub mod link;
pub mod pairing;
pub mod primary;
pub mod replica;
pub mod runtime;

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

/// One running site.
pub struct Site {
    pub dir: PathBuf,
    pub config: RwLock<Config>,
    pub identity: Identity,
    pub pins: SharedPins,
    pub store: Arc<dyn ChunkStore>,
    pub replica: ReplicaSide,
    pub endpoint: quinn::Endpoint,
    link: Mutex<Option<Connection>>,
    pub volumes: Mutex<HashMap<String, Arc<VolumeRuntime>>>,
    pub started: Instant,
    pub shutdown: Notify,
    /// Signalled when pairing pins a peer, so the dialer starts.
    pub paired: Notify,
    pub pair_lock: Mutex<()>,
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

    /// Starts the pass scheduler of a primary volume (once).
    pub fn start_volume(self: &Arc<Self>, name: &str) -> Arc<VolumeRuntime> {
        let mut vols = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rt) = vols.get(name) {
            return rt.clone();
        }
        let rt = Arc::new(VolumeRuntime::default());
        vols.insert(name.to_string(), rt.clone());
        tokio::spawn(primary::schedule(
            self.clone(),
            name.to_string(),
            rt.clone(),
        ));
        rt
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
    let replica = ReplicaSide::new(store.clone(), dir, config.fsync);
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

    wait_for_signal().await;
    tracing::info!("stopping");
    site.shutdown.notify_waiters();
    admin_task.abort();
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
