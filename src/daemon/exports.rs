//! The site's NBD exports (its primary volumes whose write gate is open, by
//! name) and the jobs that accept NBD connections.

use std::sync::{Arc, Mutex};

use super::Site;
use super::worker::JobCtx;
use crate::nbd::{ACCEPT_BACKOFF_FIRST, ACCEPT_BACKOFF_MAX, Export, Exports, Limits, Observer};
use crate::store::state::Role;

pub struct SiteExports {
    site: Arc<Site>,
}

impl SiteExports {
    pub fn new(site: Arc<Site>) -> SiteExports {
        SiteExports { site }
    }
}

impl Exports for SiteExports {
    fn get(&self, name: &str) -> Option<Arc<dyn Export>> {
        if name.ends_with(super::drills::DRILL_SUFFIX) {
            return self.site.drills.export(name).map(|c| c as Arc<dyn Export>);
        }
        let fsync = self
            .site
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .fsync;
        let h = self.site.handle(name)?;
        let e = h.export(fsync)?;
        Some(Arc::new(Counted::new(e, h.nbd_counter())))
    }

    fn pending(&self, name: &str) -> Option<tokio::sync::watch::Receiver<u64>> {
        let h = self.site.handle(name)?;
        h.awaiting_hello().then(|| h.gate.opened())
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .site
            .handles()
            .into_iter()
            .filter(|h| h.role() == Role::Primary && h.gate.is_open())
            .map(|h| h.name.clone())
            .collect();
        names.extend(self.site.drills.export_names());
        names
    }
}

/// Starts the NBD jobs: the Unix socket `DIR/nbd.sock` always, TCP where configured.
pub fn spawn_nbd(site: &Arc<Site>, tcp: Option<tokio::net::TcpListener>) {
    let exports: Arc<dyn Exports> = Arc::new(SiteExports::new(site.clone()));
    let bounds = {
        let cfg = site.config.read().unwrap_or_else(|p| p.into_inner());
        Bounds {
            budget: Arc::new(crate::nbd::Budget::new(
                cfg.limits.nbd_inflight_bytes_max.0,
                Limits::default().request_bytes_max,
            )),
            connections: Arc::new(tokio::sync::Semaphore::new(
                cfg.limits.nbd_connections_max.max(1) as usize,
            )),
            max: cfg.limits.nbd_connections_max.max(1),
        }
    };
    let s = site.clone();
    let observer: Observer = Arc::new(move |volume, cmd, took| {
        s.metrics
            .nbd_request_seconds
            .with_label_values(&[volume, cmd])
            .observe(took.as_secs_f64());
    });
    let shared = Shared {
        exports,
        observer,
        bounds,
    };
    if let Some(tcp) = tcp {
        let (shared, slot) = (shared.clone(), Arc::new(Mutex::new(Some(tcp))));
        site.spawn_job("nbd-tcp", move |site, ctx| {
            serve_tcp(site, slot.clone(), shared.clone(), ctx)
        });
    }
    // Bound here, before the daemon answers or dials its peer: a client may
    // connect as soon as the daemon is ready (a failure is the job's first
    // error, and it binds again).
    let path = site.dir.join(super::NBD_SOCKET);
    let bound = crate::nbd::bind_unix(&path).map_err(|e| bind_error(&path, e));
    let slot = Arc::new(Mutex::new(Some(bound)));
    site.spawn_job("nbd-unix", move |site, ctx| {
        serve_unix(site, slot.clone(), shared.clone(), ctx)
    });
}

/// What the NBD jobs hand each connection.
#[derive(Clone)]
struct Shared {
    exports: Arc<dyn Exports>,
    observer: Observer,
    bounds: Bounds,
}

fn bind_error(path: &std::path::Path, e: std::io::Error) -> String {
    format!("cannot serve NBD on {}: {e}", path.display())
}

/// What every NBD connection of the site shares: the payload budget and
/// the connection limit.
#[derive(Clone)]
struct Bounds {
    budget: Arc<crate::nbd::Budget>,
    connections: Arc<tokio::sync::Semaphore>,
    max: u32,
}

/// Accepts on the Unix socket `DIR/nbd.sock`.
/// The bind made at the start (its error is the job's first) or, when the
/// job runs again, a new one.
type UnixSlot = Mutex<Option<Result<tokio::net::UnixListener, String>>>;

async fn serve_unix(
    site: Arc<Site>,
    slot: Arc<UnixSlot>,
    shared: Shared,
    ctx: JobCtx,
) -> Result<(), String> {
    let path = site.dir.join(super::NBD_SOCKET);
    let bound = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    let listener = match bound {
        Some(l) => l?,
        None => crate::nbd::bind_unix(&path).map_err(|e| bind_error(&path, e))?,
    };
    accept_loop(
        || async { listener.accept().await.map(|(s, _)| (s, None)) },
        "",
        shared,
        ctx,
    )
    .await
}

async fn serve_tcp(
    site: Arc<Site>,
    slot: Arc<Mutex<Option<tokio::net::TcpListener>>>,
    shared: Shared,
    ctx: JobCtx,
) -> Result<(), String> {
    let addr = site.config.read().unwrap_or_else(|p| p.into_inner()).nbd;
    let listener = take_or_bind(&slot, addr, "NBD over TCP").await?;
    accept_loop(
        || async {
            listener.accept().await.map(|(s, peer)| {
                let _ = s.set_nodelay(true);
                (s, Some(peer.to_string()))
            })
        },
        " (TCP)",
        shared,
        ctx,
    )
    .await
}

/// The listener bound before the daemon said it started, or (when the job
/// runs again) a new one on `addr`.
pub async fn take_or_bind(
    slot: &Mutex<Option<tokio::net::TcpListener>>,
    addr: Option<std::net::SocketAddr>,
    what: &str,
) -> Result<tokio::net::TcpListener, String> {
    if let Some(l) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Ok(l);
    }
    let addr = addr.ok_or_else(|| format!("{what}: no address is configured"))?;
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot serve {what} on {addr}: {e}"))
}

/// Serves each accepted connection in a task of its own. A failed accept
/// (out of descriptors) is logged, shown and retried after a short
/// backoff: the loop never ends on it.
async fn accept_loop<S, F, Fut>(
    accept: F,
    kind: &str,
    shared: Shared,
    mut ctx: JobCtx,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<(S, Option<String>)>>,
{
    let Shared {
        exports,
        observer,
        bounds,
    } = shared;
    let limits = Limits::default();
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    let mut refused_warned: Option<std::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            a = accept() => a,
            _ = ctx.stopped() => return Ok(()),
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = ACCEPT_BACKOFF_FIRST;
                ctx.healthy();
                let Ok(held) = bounds.connections.clone().try_acquire_owned() else {
                    // Over the limit: closed at once (NBD has no way to say
                    // why before the handshake); said in the log, at most
                    // every 10 s.
                    if refused_warned
                        .is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(10))
                    {
                        refused_warned = Some(std::time::Instant::now());
                        tracing::warn!(
                            peer = peer.as_deref().unwrap_or("unix socket"),
                            max = bounds.max,
                            "NBD connection refused: limits.nbd_connections_max are open"
                        );
                    }
                    drop(stream);
                    continue;
                };
                let (exports, observer, budget) =
                    (exports.clone(), observer.clone(), bounds.budget.clone());
                tokio::spawn(async move {
                    let _held = held;
                    if let Err(e) =
                        crate::nbd::serve_conn(stream, exports, limits, budget, Some(observer))
                            .await
                    {
                        match peer {
                            Some(peer) => {
                                tracing::warn!(%peer, error = %e, "NBD connection ended with an error")
                            }
                            None => tracing::debug!(error = %e, "NBD connection ended"),
                        }
                    }
                });
            }
            Err(e) => {
                ctx.error(&format!("accepting an NBD connection{kind}: {e}"));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = ctx.stopped() => return Ok(()),
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// An export held by one NBD connection: counted while it lives, so that a
/// planned switchover knows whether clients are connected.
struct Counted {
    inner: Arc<dyn Export>,
    count: Arc<std::sync::atomic::AtomicUsize>,
}

impl Counted {
    fn new(inner: Arc<dyn Export>, count: Arc<std::sync::atomic::AtomicUsize>) -> Counted {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Counted { inner, count }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Export for Counted {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(off, buf)
    }
    fn write(&self, off: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        self.inner.write(off, data, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, off: u64, len: u64) -> std::io::Result<()> {
        self.inner.trim(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> std::io::Result<()> {
        self.inner.write_zeroes(off, len, fua)
    }
    fn revoked(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.revoked()
    }
    fn allocation(
        &self,
        off: u64,
        len: u64,
        runs_max: usize,
    ) -> std::io::Result<Vec<crate::nbd::Extent>> {
        self.inner.allocation(off, len, runs_max)
    }
    fn zeroes_fast(&self) -> bool {
        self.inner.zeroes_fast()
    }
    fn multi_conn(&self) -> bool {
        self.inner.multi_conn()
    }
}
