//! Keeping the link to the peer: dialing with backoff (the joining site),
//! accepting (the other), the `Hello` that opens every connection, and
//! serving the peer's requests.
//!
//! The site that opens a connection sends `Hello` first: the protocol
//! version, its name, and each volume's role and epoch history. The other
//! answers with its own. Each side hands the peer's volumes to their role
//! machines (in step, behind, split brain) before the connection becomes the
//! link; a request before `Hello` is refused with `HelloFirst`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use quinn::{Connection, VarInt};

use super::Site;
use super::worker::JobCtx;
use crate::proto::frame;
use crate::proto::messages::{ErrorCode, PROTOCOL_VERSION, Request, Response, VolumeHello};
use crate::transport::endpoint;
use crate::transport::tls::fingerprint;

/// A request whose frame stops arriving for this long is dropped (its
/// share of the peer's budget released).
const PEER_STALL: Duration = Duration::from_secs(60);
/// How long an answer may take to be taken by the peer.
const ANSWER_WAIT: Duration = Duration::from_secs(300);

/// How long the opening `Hello` may take before the connection is dropped.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts connections: the pinned peer's become the link once it said
/// `Hello`; others may only pair.
pub async fn accept_loop(site: Arc<Site>, mut ctx: JobCtx) -> Result<(), String> {
    loop {
        let incoming = tokio::select! {
            i = site.endpoint.accept() => i,
            _ = ctx.stopped() => return Ok(()),
        };
        let Some(incoming) = incoming else {
            return Err("the QUIC endpoint closed".into());
        };
        let site = site.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "incoming connection failed its handshake");
                    return;
                }
            };
            let fp = peer_fingerprint(&conn);
            let pinned = site
                .config
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .peer
                .as_ref()
                .map(|p| p.fingerprint.clone());
            if fp.is_some() && fp == pinned {
                tracing::info!(remote = %conn.remote_address(), "peer connected; waiting for its Hello");
                serve_peer(site.clone(), conn.clone(), false).await;
                site.clear_link(&conn);
            } else {
                super::pairing::serve_pairing(site, conn).await;
            }
        });
    }
}

/// The `kind` label of a request's bytes: chunk payloads or control traffic.
pub fn traffic_kind(req: &Request) -> &'static str {
    match req {
        Request::PutChunks { .. } => "chunk",
        _ => "control",
    }
}

pub fn peer_fingerprint(conn: &Connection) -> Option<String> {
    let id = conn.peer_identity()?;
    let certs = id
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(fingerprint)
}

/// Sends this site's `Hello` on a new connection and takes in the answer.
pub async fn say_hello(site: &Arc<Site>, conn: &Connection) -> Result<(), String> {
    let req = Request::Hello {
        version: PROTOCOL_VERSION,
        site: site.name(),
        volumes: site.hello_volumes(),
    };
    let (resp, b) = tokio::time::timeout(
        HELLO_TIMEOUT,
        endpoint::call(conn, &req, site.frame_bytes_max()),
    )
    .await
    .map_err(|_| "the peer did not answer Hello".to_string())?
    .map_err(|e| e.to_string())?;
    site.count_wire("control", b.sent, b.received);
    match resp {
        Response::Hello {
            version,
            site: peer,
            volumes,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(version_mismatch(version));
            }
            check_hello(&peer, &volumes)?;
            site.peer_hello(&volumes);
            Ok(())
        }
        Response::Error { code, message } => {
            Err(format!("the peer refused Hello ({code:?}): {message}"))
        }
        other => Err(format!("expected Hello, got {other:?}")),
    }
}

fn version_mismatch(peer: u32) -> String {
    format!(
        "the peer speaks protocol version {peer}, this site {PROTOCOL_VERSION}: run the same ferry version at both sites"
    )
}

/// Bounds and histories of a peer's `Hello` (it comes from the network).
fn check_hello(site: &str, volumes: &[VolumeHello]) -> Result<(), String> {
    Request::Hello {
        version: PROTOCOL_VERSION,
        site: site.to_string(),
        volumes: volumes.to_vec(),
    }
    .check()
}

/// Dials the pinned peer and redials after a loss, backing off up to `reconnect_max`.
pub async fn dial_loop(site: Arc<Site>, mut ctx: JobCtx) -> Result<(), String> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let (peer, max) = {
            let cfg = site.config.read().unwrap_or_else(|p| p.into_inner());
            (cfg.peer.clone(), cfg.limits.reconnect_max.0)
        };
        let Some(peer) = peer.filter(|p| p.dial) else {
            // Not paired yet (or the peer dials us): wait until pairing changes that.
            tokio::select! {
                _ = site.paired.notified() => continue,
                _ = ctx.stopped() => return Ok(()),
            }
        };
        let connected = tokio::select! {
            c = endpoint::connect(&site.endpoint, peer.address, &site.identity, &peer.fingerprint, site.congestion()) => c,
            _ = ctx.stopped() => return Ok(()),
        };
        match connected {
            Ok(conn) => match tokio::select! {
                r = say_hello(&site, &conn) => r,
                _ = ctx.stopped() => return Ok(()),
            } {
                Ok(()) => {
                    backoff = Duration::from_millis(200);
                    ctx.healthy();
                    tracing::info!(peer = %peer.name, address = %peer.address, "link up");
                    site.set_link(Some(conn.clone()));
                    tokio::select! {
                        _ = serve_peer(site.clone(), conn.clone(), true) => {}
                        _ = ctx.stopped() => {
                            conn.close(0u32.into(), b"shutting down");
                            return Ok(());
                        }
                    }
                    site.clear_link(&conn);
                    tracing::warn!(peer = %peer.name, reason = ?conn.close_reason(), "link down; redialing");
                }
                Err(e) => {
                    conn.close(1u32.into(), b"hello failed");
                    ctx.error(&format!("Hello with {}: {e}", peer.name));
                }
            },
            Err(e) => {
                tracing::warn!(peer = %peer.name, address = %peer.address, error = %e, retry_in = ?backoff, "cannot reach the peer");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = ctx.stopped() => return Ok(()),
        }
        backoff = (backoff * 2).min(max);
    }
}

/// Serves the peer's requests until the connection closes. On a connection
/// the peer opened (`greeted` false), its first request must be `Hello`;
/// answering it makes the connection the link.
pub async fn serve_peer(site: Arc<Site>, conn: Connection, greeted: bool) {
    let frame_max = site.frame_bytes_max();
    let greeted = Arc::new(AtomicBool::new(greeted));
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let (site, conn, greeted) = (site.clone(), conn.clone(), greeted.clone());
        tokio::spawn(async move {
            // The request's share of the peer's budget is taken before its
            // buffer is allocated and held until it is answered: however
            // many streams the peer opens, its requests hold at most
            // `limits.peer_inflight_bytes_max` here.
            let body = async {
                let len = frame::read_len(&mut recv, frame_max).await?;
                let share = site
                    .peer_budget
                    .clone()
                    .acquire_many_owned(len.max(1) as u32)
                    .await
                    .map_err(|_| frame::FrameError::Closed)?;
                // At least 64 KiB/s on top of the stall allowance: a peer
                // that trickles a byte a minute gives its share back.
                let deadline = PEER_STALL + Duration::from_secs(len / (64 << 10));
                let req = tokio::time::timeout(
                    deadline,
                    frame::read_body::<Request, _>(&mut recv, len, PEER_STALL),
                )
                .await
                .map_err(|_| {
                    frame::FrameError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("a frame of {len} bytes took over {} s", deadline.as_secs()),
                    ))
                })??;
                Ok::<_, frame::FrameError>((req, 4 + len, share))
            };
            let (req, read, _share) = match body.await {
                Ok(r) => r,
                Err(frame::FrameError::Closed) => return,
                Err(e) => {
                    tracing::error!(error = %e, "bad frame from the peer; closing that exchange");
                    let _ = frame::write(
                        &mut send,
                        &Response::error(ErrorCode::Malformed, e.to_string()),
                        frame_max,
                    )
                    .await;
                    let _ = send.finish();
                    return;
                }
            };
            let kind = traffic_kind(&req);
            let resp = match req {
                Request::Hello {
                    version,
                    site: peer,
                    volumes,
                } => {
                    if version != PROTOCOL_VERSION {
                        let msg = version_mismatch(version);
                        tracing::error!(error = %msg, "refusing the peer's Hello");
                        Response::error(ErrorCode::Version, msg)
                    } else if let Err(e) = check_hello(&peer, &volumes) {
                        tracing::error!(error = %e, "refusing a malformed Hello");
                        Response::error(ErrorCode::Malformed, e)
                    } else {
                        site.peer_hello(&volumes);
                        let resp = Response::Hello {
                            version: PROTOCOL_VERSION,
                            site: site.name(),
                            volumes: site.hello_volumes(),
                        };
                        if !greeted.swap(true, Ordering::SeqCst) {
                            tracing::info!(peer = %peer, "link up");
                            site.set_link(Some(conn.clone()));
                        }
                        resp
                    }
                }
                _ if !greeted.load(Ordering::SeqCst) => Response::error(
                    ErrorCode::HelloFirst,
                    "the first request on a connection must be Hello",
                ),
                Request::Pair { .. } => Response::error(ErrorCode::Refused, "already paired"),
                Request::Promote {
                    volume,
                    epoch,
                    seq,
                    checksum,
                    root,
                } => {
                    let last = (epoch, seq, checksum);
                    super::failover::promote_planned(&site, &volume, last, root).await
                }
                Request::Resolve {
                    volume,
                    keep,
                    history,
                } => super::failover::resolve_from_peer(&site, &volume, &keep, history).await,
                Request::Switchover {
                    volume,
                    disconnect_clients,
                    workload_stopped,
                } => {
                    let how = (disconnect_clients, workload_stopped);
                    super::failover::switchover_for_peer(&site, &volume, how).await
                }
                req => {
                    let s = site.clone();
                    let commit = matches!(req, Request::Commit { .. });
                    tokio::task::spawn_blocking(move || {
                        let r = s.replica.serve(req);
                        if commit {
                            s.replica.collect_garbage_if_due();
                        }
                        r
                    })
                    .await
                    .unwrap_or_else(|e| {
                        Response::error(ErrorCode::Internal, format!("internal error: {e}"))
                    })
                }
            };
            let answer = frame::write_quic(&mut send, &resp, frame_max);
            match tokio::time::timeout(ANSWER_WAIT, answer).await {
                Ok(Ok(written)) => site.count_wire(kind, written, read),
                Ok(Err(e)) => tracing::warn!(error = %e, "could not answer the peer"),
                Err(_) => {
                    tracing::warn!(
                        "the peer read no answer for {} s; the exchange is dropped",
                        ANSWER_WAIT.as_secs()
                    );
                    let _ = send.reset(VarInt::from_u32(0));
                    return;
                }
            }
            drop(_share);
            let _ = send.finish();
            let _ = send.stopped().await;
        });
    }
}
