//! The admin API: HTTP/JSON on a Unix socket in the data directory (mode 0600,
//! so only the daemon's user and root can drive it).

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::UnixListener;

use super::api::*;
use super::worker::JobCtx;
use super::{ADMIN_SOCKET, Site, verify as verify_mod};
use crate::proto::messages::{Request, Response as PeerResponse, check_volume_name};
use crate::store::state::{self, Role, VolumeRecord};
use crate::transport::endpoint::call;
use crate::volume::image;

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

fn unavailable(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, msg.into())
}

type ApiResult<T> = Result<Json<T>, ApiError>;

pub async fn bind(site: &Arc<Site>) -> anyhow::Result<UnixListener> {
    let path = site.dir.join(ADMIN_SOCKET);
    if path.exists() {
        // A live daemon answers on it; a stale socket from a crash does not.
        if tokio::net::UnixStream::connect(&path).await.is_ok() {
            anyhow::bail!(
                "another ferry daemon is running on {} (its admin socket answers)",
                site.dir.display()
            );
        }
        std::fs::remove_file(&path)?;
    }
    let l = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

type Slot<T> = Arc<std::sync::Mutex<Option<T>>>;

/// The admin API job (its socket is bound before the daemon says it started).
pub async fn run(site: Arc<Site>, slot: Slot<UnixListener>, ctx: JobCtx) -> Result<(), String> {
    let taken = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    let listener = match taken {
        Some(l) => l,
        None => bind(&site).await.map_err(|e| e.to_string())?,
    };
    let app = Router::new()
        .route("/status", get(status))
        .route("/link/limit", post(link_limit))
        .route("/pair/token", post(pair_token))
        .route("/pair/join", post(pair_join))
        .route("/volumes", get(list_volumes).post(add_volume))
        .route("/volumes/{name}/sync", post(sync))
        .route("/volumes/{name}/progress", get(progress))
        .route("/volumes/{name}/progress/{finished}", get(progress_when))
        .route("/volumes/{name}/verify", post(verify))
        .route("/volumes/{name}/repair", post(repair))
        .route("/volumes/{name}/scrub", post(scrub))
        .route("/volumes/{name}/points", get(points).post(create_point))
        .route("/volumes/{name}/restore", post(restore))
        .route("/volumes/{name}/failover", post(failover))
        .route("/volumes/{name}/demote", post(demote))
        .route("/volumes/{name}/remove", post(remove_volume))
        .route("/volumes/{name}/clear-error", post(clear_error))
        .route("/volumes/{name}/failback", post(failback))
        .route("/volumes/{name}/resolve", post(resolve))
        .route("/volumes/{name}/drill/start", post(drill_start))
        .route("/volumes/{name}/drill/stop", post(drill_stop))
        .route("/volumes/{name}/drill/reports", get(drill_reports))
        .layer(axum::middleware::from_fn(check_caller))
        .with_state(site);
    ctx.healthy();
    let stop = ctx.clone();
    let app = app.into_make_service_with_connect_info::<Caller>();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let mut stop = stop;
            stop.stopped().await
        })
        .await
        .map_err(|e| format!("admin API: {e}"))?;
    if ctx.is_stopped() {
        Ok(())
    } else {
        Err("the admin API ended".into())
    }
}

/// Who is on the other end of an admin connection (SO_PEERCRED).
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: Option<u32>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, UnixListener>>
    for Caller
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, UnixListener>) -> Self {
        Caller {
            uid: stream.io().peer_cred().ok().map(|c| c.uid()),
        }
    }
}

/// The socket's mode already keeps others out; the credentials check holds
/// even if the mode is loosened: only root and the daemon's own user.
async fn check_caller(
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<Caller>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    match caller.uid {
        Some(0) => next.run(req).await,
        Some(u) if u == me => next.run(req).await,
        other => ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "the ferry daemon takes commands only from root or its own user (uid {me}); this caller is {}",
                other.map(|u| format!("uid {u}")).unwrap_or_else(|| "unknown".into())
            ),
        )
        .into_response(),
    }
}

/// The operator behind a request: the socket's credentials, and the name
/// the command line gave (`x-ferry-user`).
fn operator(caller: &Caller, headers: &axum::http::HeaderMap) -> crate::failover::drill::Operator {
    crate::failover::drill::Operator {
        uid: caller.uid,
        user: caller.uid.and_then(crate::util::user_name),
        said: headers
            .get("x-ferry-user")
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty() && s.len() <= 64)
            .map(str::to_string),
    }
}

async fn drill_start(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<Caller>,
    headers: axum::http::HeaderMap,
    Json(req): Json<DrillStartRequest>,
) -> ApiResult<DrillStarted> {
    let by = operator(&caller, &headers);
    let s = site.clone();
    let details = serde_json::json!({ "point": req.point });
    let state = detached(async move {
        let s2 = s.clone();
        s.audited(
            "drill start",
            &name.clone(),
            &by.clone(),
            details,
            async move {
                tokio::task::spawn_blocking(move || super::drills::start(&s2, &name, req.point, by))
                    .await
                    .map_err(|e| e.to_string())?
            },
        )
        .await
    })
    .await?;
    Ok(Json(DrillStarted {
        export: format!("{}{}", state.volume, super::drills::DRILL_SUFFIX),
        socket: site.dir.join(super::NBD_SOCKET).display().to_string(),
        state,
    }))
}

async fn failover(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<Caller>,
    headers: axum::http::HeaderMap,
    Json(req): Json<FailoverRequest>,
) -> ApiResult<super::failover::FailoverOutcome> {
    if req.planned == req.force {
        return Err(bad(format!(
            "say how: `ferry failover {name} --planned` (zero loss, both sites up) or `--force` (at the DR site, the primary unreachable)"
        )));
    }
    let by = operator(&caller, &headers);
    if req.planned {
        let how = (req.disconnect_clients, req.workload_stopped);
        return run_planned(site, name, how, by, "failover --planned").await;
    }
    if site
        .handle(&name)
        .is_some_and(|h| h.role() == Role::Primary)
    {
        // A primary cut off from its peer asserts that it stays primary.
        if req.point.is_some() {
            return Err(bad(format!(
                "volume {name} is primary here: --point chooses the state a DR copy is promoted to"
            )));
        }
        let details = serde_json::json!({ "force": true, "stays_primary": true });
        return detached(async move {
            site.audited(
                "failover --force (stays primary)",
                &name,
                &by,
                details,
                super::failover::assert_primary(&site, &name),
            )
            .await
            .map(super::failover::FailoverOutcome::Asserted)
        })
        .await
        .map(Json);
    }
    let details = serde_json::json!({ "force": true, "point": req.point });
    detached(async move {
        site.audited(
            "failover --force",
            &name,
            &by,
            details,
            super::failover::force(&site, &name, req.point, &by),
        )
        .await
        .map(super::failover::FailoverOutcome::Forced)
    })
    .await
    .map(Json)
}

/// Runs `f` in a task of its own: a client that goes away does not cut an
/// operation (or its audit entry) in half. Its error is a bad request.
async fn detached<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T, String>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(f).await.map_err(internal)?.map_err(bad)
}

/// A planned switchover, at either site (the DR site asks the primary), in
/// a task of its own (a client that goes away does not cut it in half).
async fn run_planned(
    site: Arc<Site>,
    name: String,
    how: (bool, bool),
    by: crate::failover::drill::Operator,
    action: &'static str,
) -> ApiResult<super::failover::FailoverOutcome> {
    let details = serde_json::json!({ "planned": true, "disconnect_clients": how.0, "workload_stopped": how.1 });
    detached(async move {
        site.audited(action, &name, &by, details, async {
            match site.handle(&name).map(|h| h.role()) {
                Some(Role::Replica) => {
                    super::failover::planned_from_replica(&site, &name, how).await
                }
                _ => super::failover::planned(&site, &name, how).await,
            }
        })
        .await
        .map(super::failover::FailoverOutcome::Planned)
    })
    .await
    .map(Json)
}

/// `ferry failback NAME`: a planned switchover back to the site the volume
/// was first protected at.
async fn failback(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<Caller>,
    headers: axum::http::HeaderMap,
    Json(req): Json<FailoverRequest>,
) -> ApiResult<super::failover::FailoverOutcome> {
    let h = site
        .handle(&name)
        .ok_or_else(|| bad(format!("no volume named {name}; see `ferry volume list`")))?;
    let history = h.record().history;
    let (Some(first), Some(top)) = (history.0.first(), history.top()) else {
        return Err(bad(format!("volume {name} has no epoch history here yet")));
    };
    if first.site == top.site {
        return Err(bad(format!(
            "volume {name} is primary at its original site {} already (epoch {}); nothing to fail back",
            top.site, top.epoch
        )));
    }
    let by = operator(&caller, &headers);
    let how = (req.disconnect_clients, req.workload_stopped);
    run_planned(site, name, how, by, "failback").await
}

async fn resolve(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<Caller>,
    headers: axum::http::HeaderMap,
    Json(req): Json<ResolveRequest>,
) -> ApiResult<ResolveResponse> {
    let by = operator(&caller, &headers);
    detached(async move {
        site.audited(
            "resolve",
            &name,
            &by,
            serde_json::json!({ "keep": req.keep }),
            super::failover::resolve(&site, &name, &req.keep),
        )
        .await
    })
    .await
    .map(|outcome| Json(ResolveResponse { outcome }))
}

/// `ferry volume clear-error`: after a failed fsync of a primary's image
/// whose writes could not be written again, the operator has checked the
/// disk and accepts what it holds.
async fn clear_error(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<Caller>,
    headers: axum::http::HeaderMap,
) -> ApiResult<serde_json::Value> {
    let by = operator(&caller, &headers);
    detached(async move {
        site.audited(
            "volume clear-error",
            &name,
            &by,
            serde_json::json!({}),
            async {
                let h = site
                    .handle(&name)
                    .ok_or_else(|| format!("no volume {name} at this site"))?;
                let vs = h
                    .volume_stream()
                    .ok_or_else(|| format!("volume {name} has no journaled export here"))?;
                tokio::task::spawn_blocking(move || vs.clear_io_error())
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("the fsync still fails: {e}"))?;
                Ok(serde_json::json!({ "cleared": name }))
            },
        )
        .await
    })
    .await
    .map(Json)
}

async fn remove_volume(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<Caller>,
    headers: axum::http::HeaderMap,
) -> ApiResult<super::remove::Removed> {
    let by = operator(&caller, &headers);
    detached(async move {
        site.audited(
            "volume remove",
            &name,
            &by,
            serde_json::json!({}),
            super::remove::remove(&site, &name),
        )
        .await
    })
    .await
    .map(Json)
}

async fn demote(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<Caller>,
    headers: axum::http::HeaderMap,
    Json(req): Json<DemoteRequest>,
) -> ApiResult<VolumeStatusBrief> {
    let by = operator(&caller, &headers);
    let h = site
        .handle(&name)
        .ok_or_else(|| bad(format!("no volume named {name}; see `ferry volume list`")))?;
    let reason = req
        .reason
        .unwrap_or_else(|| format!("demoted by the operator ({by})"));
    site.audited(
        "demote",
        &name,
        &by,
        serde_json::json!({ "reason": reason }),
        async { h.demote(&reason) },
    )
    .await
    .map_err(bad)?;
    Ok(Json(VolumeStatusBrief {
        name: name.clone(),
        role: h.role(),
        gate: h.gate.closed_because(),
    }))
}

async fn drill_stop(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<Caller>,
    headers: axum::http::HeaderMap,
) -> ApiResult<crate::failover::drill::DrillReport> {
    let by = operator(&caller, &headers);
    detached(async move {
        site.audited(
            "drill stop",
            &name,
            &by,
            serde_json::Value::Null,
            super::drills::stop(&site, &name, by.clone(), None),
        )
        .await
    })
    .await
    .map(Json)
}

async fn drill_reports(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
) -> ApiResult<Vec<crate::failover::drill::DrillReport>> {
    let dir = site.dir.clone();
    tokio::task::spawn_blocking(move || crate::failover::drill::read_reports(&dir, Some(&name)))
        .await
        .map_err(internal)?
        .map(Json)
        .map_err(internal)
}

/// Serves `GET /metrics` (Prometheus text format) on the metrics address.
pub async fn serve_metrics(
    site: Arc<Site>,
    slot: Slot<tokio::net::TcpListener>,
    ctx: JobCtx,
) -> Result<(), String> {
    let addr = site
        .config
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .metrics;
    let listener = super::exports::take_or_bind(&slot, addr, "metrics").await?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(site);
    ctx.healthy();
    let stop = ctx.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let mut stop = stop;
            stop.stopped().await
        })
        .await
        .map_err(|e| format!("metrics endpoint: {e}"))?;
    if ctx.is_stopped() {
        Ok(())
    } else {
        Err("the metrics endpoint ended".into())
    }
}

async fn metrics(State(site): State<Arc<Site>>) -> Response {
    let s = site.clone();
    let body = tokio::task::spawn_blocking(move || {
        if let Err(e) = s.refresh_metrics() {
            tracing::warn!(error = %e, "metrics refresh failed; serving the last values");
        }
        s.metrics.render()
    })
    .await
    .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
        .into_response()
}

async fn pair_token(
    State(site): State<Arc<Site>>,
    Json(req): Json<TokenRequest>,
) -> ApiResult<TokenResponse> {
    let t = super::pairing::issue(
        &site,
        std::time::Duration::from_millis(req.ttl_ms),
        req.address.as_deref(),
    )
    .map_err(bad)?;
    Ok(Json(TokenResponse {
        token: t.encode(),
        expires: t.expires,
    }))
}

async fn pair_join(
    State(site): State<Arc<Site>>,
    Json(req): Json<JoinRequest>,
) -> ApiResult<JoinResponse> {
    let peer = super::pairing::join(&site, &req.token).await.map_err(bad)?;
    Ok(Json(JoinResponse {
        peer: peer.name,
        address: peer.address.to_string(),
    }))
}

fn info(v: &VolumeRecord) -> VolumeInfo {
    VolumeInfo {
        name: v.name.clone(),
        role: v.role,
        mode: v.mode,
        size: v.size,
        chunk_size: v.chunk_size,
        path: v.path.display().to_string(),
        interval_ms: v.interval_ms,
    }
}

async fn list_volumes(State(site): State<Arc<Site>>) -> ApiResult<Vec<VolumeInfo>> {
    let mut vols: Vec<VolumeRecord> = site.handles().iter().map(|h| h.record()).collect();
    vols.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(vols.iter().map(info).collect()))
}

async fn add_volume(
    State(site): State<Arc<Site>>,
    Json(req): Json<AddVolume>,
) -> ApiResult<VolumeInfo> {
    check_volume_name(&req.name).map_err(bad)?;
    let cs = req.chunk_size;
    if !cs.is_power_of_two() || !(4096..=(4 << 20)).contains(&cs) {
        return Err(bad(format!(
            "--chunk-size {cs} must be a power of two from 4KiB to 4MiB"
        )));
    }
    if req.interval_ms < 1000 {
        return Err(bad("--interval must be at least 1s"));
    }
    if site.handle(&req.name).is_some() {
        return Err(bad(format!(
            "volume {} already exists at this site",
            req.name
        )));
    }
    let held = site.handles().len();
    if held >= site.replica.volumes_max {
        return Err(bad(format!(
            "this site holds {held} volumes, its limit (limits.volumes_max)"
        )));
    }
    let path = std::fs::canonicalize(&req.path)
        .map_err(|e| bad(format!("cannot open image {}: {e}", req.path)))?;
    let size = image::image_size(&path).map_err(|e| bad(e.to_string()))?;
    std::fs::File::open(&path)
        .map_err(|e| bad(format!("cannot read image {}: {e}", path.display())))?;
    let rec = VolumeRecord {
        name: req.name.clone(),
        role: Role::Primary,
        mode: req.mode,
        path,
        chunk_size: cs,
        interval_ms: req.interval_ms,
        rpo_target_ms: req.rpo_target_ms,
        size,
        created: crate::util::trusted_now_unix(),
        committed: None,
        applying: None,
        totals: Default::default(),
        last_pass: None,
        stream: state::StreamRecord {
            // A continuous volume starts with a seed: a tree comparison of
            // the live image, with the journal streamed on top.
            resync_needed: req.mode.continuous(),
            resync_reason: if req.mode.continuous() {
                "first seed".into()
            } else {
                String::new()
            },
            sync_wait_ms: req.sync_wait_ms,
            sync_fallback: req.sync_fallback,
            ..Default::default()
        },
        history: crate::failover::epoch::History::first(&site.name()),
        fenced: None,
        split_brain: false,
        handoff: None,
        handoff_checksum: 0,
        superseded: Vec::new(),
        behind_of: None,
    };
    site.add_volume(rec.clone()).map_err(internal)?;
    tracing::info!(volume = %rec.name, path = %rec.path.display(), "volume protected");
    Ok(Json(info(&rec)))
}

fn primary_volume(site: &Site, name: &str) -> Result<Arc<super::volume::VolumeHandle>, ApiError> {
    match site.handle(name) {
        Some(h) if h.role() == Role::Primary => Ok(h),
        Some(_) => Err(bad(format!(
            "volume {name} is a replica at this site; run this at the primary site"
        ))),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no volume named {name}; see `ferry volume list`"),
        )),
    }
}

async fn sync(State(site): State<Arc<Site>>, Path(name): Path<String>) -> ApiResult<SyncResponse> {
    let h = primary_volume(&site, &name)?;
    if h.record().mode.continuous() {
        // A continuous volume streams all the time; `sync` brings the DR
        // copy level by a tree comparison (after a suspected divergence).
        let wait_for = h
            .run
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .started
            + 1;
        let vs = h.volume_stream().ok_or_else(|| {
            unavailable("the volume's journal is not open; see `ferry status` and the daemon's log")
        })?;
        // Read whole: the operator may suspect the image itself.
        vs.forget_scan();
        if !vs.request_resync("requested by the operator (ferry sync)") {
            return Err(unavailable(
                "no resync can begin while the image cannot be fsynced (the journal keeps the only durable copy of some writes); see `ferry status` and the daemon's log",
            ));
        }
        vs.wake.notify_one();
        return Ok(Json(SyncResponse { wait_for }));
    }
    Ok(Json(SyncResponse {
        wait_for: h.run.trigger_pass(),
    }))
}

async fn progress(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
) -> ApiResult<super::runtime::ProgressView> {
    let h = primary_volume(&site, &name)?;
    Ok(Json(h.run.view()))
}

/// Longest `GET /volumes/NAME/progress/N` holds its answer.
const PROGRESS_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// The progress once the volume's `finished` count reaches N, or after a
/// second: `ferry sync --wait` returns when its pass ends, not at its next poll.
async fn progress_when(
    State(site): State<Arc<Site>>,
    Path((name, finished)): Path<(String, u64)>,
) -> ApiResult<super::runtime::ProgressView> {
    let h = primary_volume(&site, &name)?;
    Ok(Json(
        h.run.view_when_finished(finished, PROGRESS_WAIT_MAX).await,
    ))
}

async fn verify(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
) -> ApiResult<VerifyResponse> {
    let rec = primary_volume(&site, &name)?.record();
    let r = verify_mod::verify(&site, &rec).await;
    record_verify(&site, &name, &r);
    r.map(Json).map_err(|e| unavailable(e.to_string()))
}

async fn repair(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
) -> ApiResult<VerifyResponse> {
    let rec = primary_volume(&site, &name)?.record();
    let r = verify_mod::verify_and_repair(&site, &rec).await;
    record_verify(&site, &name, &r);
    r.map(Json).map_err(|e| unavailable(e.to_string()))
}

/// `ferry link limit RATE|off`: the link's bandwidth limit, now, until the
/// daemon restarts (then `limits.link_bytes_per_s_max` applies again).
async fn link_limit(
    State(site): State<Arc<Site>>,
    Json(req): Json<super::api::LinkLimitRequest>,
) -> ApiResult<super::api::LinkLimitRequest> {
    let before = site
        .link_limit
        .swap(req.bytes_per_s, std::sync::atomic::Ordering::Relaxed);
    crate::transport::limit::LINK.set(req.bytes_per_s);
    tracing::info!(
        before,
        now = req.bytes_per_s,
        "link bandwidth limit changed (bytes/s, 0: none); until a restart, then limits.link_bytes_per_s_max applies"
    );
    Ok(Json(req))
}

async fn scrub(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
) -> ApiResult<super::scrub::ScrubReport> {
    if site.handle(&name).is_none() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no volume named {name}"),
        ));
    }
    let s = site.clone();
    let n = name.clone();
    let r = tokio::task::spawn_blocking(move || super::scrub::scrub(&s, &n))
        .await
        .map_err(internal)?;
    if let Err(e) = &r {
        tracing::error!(volume = %name, error = %e, "scrub failed");
        site.metrics
            .scrub_runs
            .with_label_values(&[&name, "error"])
            .inc();
    }
    r.map(Json).map_err(unavailable)
}

/// Counts a verify run and remembers how many bytes differed.
fn record_verify(site: &Site, name: &str, r: &Result<VerifyResponse, super::primary::PassError>) {
    let m = &site.metrics;
    match r {
        Ok(v) => {
            m.verify_runs
                .with_label_values(&[name, if v.in_sync { "in_sync" } else { "differs" }])
                .inc();
            m.verify_mismatch_bytes
                .with_label_values(&[name])
                .set(v.differing.iter().map(|(a, b)| b - a).sum::<u64>() as i64);
        }
        Err(_) => m.verify_runs.with_label_values(&[name, "error"]).inc(),
    }
}

async fn points(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
) -> ApiResult<Vec<state::RecoveryPoint>> {
    match site.handle(&name).map(|h| h.record()) {
        Some(v) if v.role == Role::Replica => Ok(Json(
            state::list_points(&*site.store, &name).map_err(internal)?,
        )),
        Some(_) => {
            // Points live at the DR site; the primary asks for them.
            let conn = site.link().ok_or_else(|| {
                unavailable("the link to the DR site is down; run `ferry points` at the DR site")
            })?;
            match call(
                &conn,
                &Request::Points { volume: name },
                site.frame_bytes_max(),
            )
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .0
            {
                PeerResponse::Points(p) => Ok(Json(p)),
                PeerResponse::Error { message, .. } => {
                    Err(unavailable(format!("DR site: {message}")))
                }
                other => Err(internal(format!("unexpected answer {other:?}"))),
            }
        }
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no volume named {name}"),
        )),
    }
}

/// `ferry points NAME --create`: a recovery point at the next flush boundary.
async fn create_point(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
) -> ApiResult<state::RecoveryPoint> {
    let rec = site
        .handle(&name)
        .map(|h| h.record())
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no volume named {name}")))?;
    let resp = if rec.role == Role::Replica {
        let s = site.clone();
        tokio::task::spawn_blocking(move || match s.replica.create_point(&name) {
            Ok(r) => r,
            Err(e) => PeerResponse::error(e.code(), e.to_string()),
        })
        .await
        .map_err(internal)?
    } else {
        let conn = site.link().ok_or_else(|| {
            unavailable("the link to the DR site is down; run this at the DR site")
        })?;
        call(
            &conn,
            &Request::CreatePoint { volume: name },
            site.frame_bytes_max(),
        )
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .0
    };
    match resp {
        PeerResponse::Point(p) => Ok(Json(p)),
        PeerResponse::Error { message, .. } => Err(unavailable(format!("DR site: {message}"))),
        other => Err(internal(format!("unexpected answer {other:?}"))),
    }
}

/// `ferry restore NAME --to PATH [--point ID]`, at the DR site.
async fn restore(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
    Json(req): Json<RestoreRequest>,
) -> ApiResult<RestoreResponse> {
    match site.handle(&name).map(|h| h.record()) {
        Some(v) if v.role == Role::Replica => {}
        Some(_) => {
            return Err(bad(format!(
                "volume {name} is primary here; recovery points live at the DR site: run `ferry restore` there"
            )));
        }
        None => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no volume named {name}"),
            ));
        }
    }
    let points = state::list_points(&*site.store, &name).map_err(internal)?;
    let point = match req.point {
        Some(id) => points.into_iter().find(|p| p.id == id).ok_or_else(|| {
            bad(format!(
                "volume {name} has no point {id}; see `ferry points {name}`"
            ))
        })?,
        None => points
            .into_iter()
            .next_back()
            .ok_or_else(|| bad(format!("volume {name} has no recovery point yet")))?,
    };
    let to = std::path::PathBuf::from(&req.to);
    let (s, p) = (site.clone(), point.clone());
    let written = tokio::task::spawn_blocking(move || super::restore::restore(&*s.store, &p, &to))
        .await
        .map_err(internal)?
        .map_err(|e| bad(e.to_string()))?;
    tracing::info!(volume = %name, point = point.id, to = %req.to, "recovery point restored to a file");
    Ok(Json(RestoreResponse {
        point,
        path: req.to,
        bytes_written: written,
    }))
}

async fn status(State(site): State<Arc<Site>>) -> ApiResult<SiteStatus> {
    let cfg = site
        .config
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let conn = site.link();
    let link = LinkStatus {
        up: conn.is_some(),
        rtt_ms: conn.as_ref().map(|c| c.rtt().as_secs_f64() * 1000.0),
        udp_tx_bytes: conn.as_ref().map(|c| c.stats().udp_tx.bytes).unwrap_or(0),
        udp_rx_bytes: conn.as_ref().map(|c| c.stats().udp_rx.bytes).unwrap_or(0),
        udp_payload_bytes: conn.as_ref().map(|c| c.stats().path.current_mtu),
        limit_bytes_per_s: site.link_limit.load(std::sync::atomic::Ordering::Relaxed),
    };
    let now = crate::util::now_unix();
    let mut handles = site.handles();
    handles.sort_by(|a, b| a.name.cmp(&b.name));
    let mut volumes = Vec::new();
    for h in handles {
        let v = h.record();
        let stream = h.volume_stream().map(|s| s.view());
        let (last_point, progress, last_error) = match v.role {
            Role::Replica => (
                state::list_points(&*site.store, &v.name)
                    .map_err(internal)?
                    .pop(),
                None,
                None,
            ),
            Role::Primary => {
                let view = h.run.view();
                let point = v.last_pass.as_ref().and_then(|p| {
                    p.point.map(|id| state::RecoveryPoint {
                        id,
                        volume: v.name.clone(),
                        root: p.root,
                        created: p.started + p.duration_ms / 1000,
                        size: p.size,
                        source: "snapshot pass".into(),
                        seq: None,
                        pinned: None,
                    })
                });
                let point = point.or_else(|| {
                    // Continuous volumes: the DR side's newest point, as it last said.
                    let (id, created) = stream.as_ref()?.dr_point?;
                    Some(state::RecoveryPoint {
                        id,
                        volume: v.name.clone(),
                        root: crate::hash::Hash::ZERO,
                        created,
                        size: v.size,
                        source: "flush boundary".into(),
                        seq: None,
                        pinned: None,
                    })
                });
                let err = view.state.last_error.clone();
                (point, Some(view), err)
            }
        };
        let resyncing = v.applying.is_none() && !state::consistent(&v);
        volumes.push(VolumeStatus {
            name: v.name.clone(),
            role: v.role,
            mode: v.mode,
            size: v.size,
            consistency: if v.applying.is_some() {
                "applying".into()
            } else if resyncing {
                "resyncing".into()
            } else {
                "consistent".into()
            },
            stream,
            redo: h.replica_stream().map(|r| r.view()),
            last_point_age_s: last_point.as_ref().map(|p| now.saturating_sub(p.created)),
            last_point,
            totals: v.totals,
            last_pass: v.last_pass.clone(),
            last_error,
            progress,
            role_state: h.role_view(),
            history: v.history.clone(),
            gate: h.gate.closed_because(),
            jobs: h.job_views(),
            drill: site.drills.view(&v.name),
        });
    }
    Ok(Json(SiteStatus {
        site: cfg.site.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_s: site.started.elapsed().as_secs(),
        peer: cfg.peer.as_ref().map(|p| p.name.clone()),
        peer_address: cfg.peer.as_ref().map(|p| p.address.to_string()),
        link,
        store: site.store.stats().map_err(internal)?,
        gc_error: site.replica.last_gc_error(),
        volumes,
        jobs: site.jobs.views(),
    }))
}
