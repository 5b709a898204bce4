//! Keeping the link to the peer: dialing with backoff (the joining site),
//! accepting (the other), and serving the peer's requests.

use std::sync::Arc;
use std::time::Duration;

use quinn::Connection;

use super::Site;
use crate::proto::frame;
use crate::proto::messages::{PROTOCOL_VERSION, Request, Response};
use crate::transport::endpoint;
use crate::transport::tls::fingerprint;

/// Accepts connections: the pinned peer's become the link; others may only pair.
pub async fn accept_loop(site: Arc<Site>) {
    loop {
        let incoming = tokio::select! {
            i = site.endpoint.accept() => i,
            _ = site.shutdown.notified() => return,
        };
        let Some(incoming) = incoming else { return };
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
                tracing::info!(remote = %conn.remote_address(), "peer connected");
                site.set_link(Some(conn.clone()));
                serve_peer(site.clone(), conn.clone()).await;
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

/// Dials the pinned peer and redials after a loss, backing off up to `reconnect_max`.
pub async fn dial_loop(site: Arc<Site>) {
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
                _ = site.shutdown.notified() => return,
            }
        };
        match endpoint::connect(
            &site.endpoint,
            peer.address,
            &site.identity,
            &peer.fingerprint,
        )
        .await
        {
            Ok(conn) => {
                backoff = Duration::from_millis(200);
                tracing::info!(peer = %peer.name, address = %peer.address, "link up");
                site.set_link(Some(conn.clone()));
                let serve = serve_peer(site.clone(), conn.clone());
                tokio::select! {
                    _ = serve => {}
                    _ = site.shutdown.notified() => {
                        conn.close(0u32.into(), b"shutting down");
                        return;
                    }
                }
                site.clear_link(&conn);
                tracing::warn!(peer = %peer.name, reason = ?conn.close_reason(), "link down; redialing");
            }
            Err(e) => {
                tracing::warn!(peer = %peer.name, address = %peer.address, error = %e, retry_in = ?backoff, "cannot reach the peer");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = site.shutdown.notified() => return,
        }
        backoff = (backoff * 2).min(max);
    }
}

/// Serves the peer's requests until the connection closes.
pub async fn serve_peer(site: Arc<Site>, conn: Connection) {
    let frame_max = site.frame_bytes_max();
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let site = site.clone();
        tokio::spawn(async move {
            let (req, read) = match frame::read::<Request, _>(&mut recv, frame_max).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "bad frame from the peer; closing that exchange");
                    let _ = frame::write(
                        &mut send,
                        &Response::Error {
                            message: e.to_string(),
                        },
                        frame_max,
                    )
                    .await;
                    let _ = send.finish();
                    return;
                }
            };
            let kind = traffic_kind(&req);
            let commit = matches!(req, Request::Commit { .. });
            let resp = match req {
                Request::Hello { .. } => Response::Hello {
                    site: site.name(),
                    version: PROTOCOL_VERSION,
                },
                Request::Pair { .. } => Response::Error {
                    message: "already paired".into(),
                },
                req => {
                    let s = site.clone();
                    tokio::task::spawn_blocking(move || s.replica.handle(req))
                        .await
                        .unwrap_or_else(|e| Response::Error {
                            message: format!("internal error: {e}"),
                        })
                }
            };
            match frame::write(&mut send, &resp, frame_max).await {
                Ok(written) => site.count_wire(kind, written, read),
                Err(e) => tracing::warn!(error = %e, "could not answer the peer"),
            }
            let _ = send.finish();
            let _ = send.stopped().await;
            if commit && site.replica.take_gc_due() {
                let s = site.clone();
                let r = tokio::task::spawn_blocking(move || s.replica.collect_garbage()).await;
                match r {
                    Ok(Ok(rep)) => site.metrics.gc_deleted_chunks.inc_by(rep.chunks_deleted),
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "garbage collection failed; nothing was deleted past the failure")
                    }
                    Err(e) => tracing::error!(error = %e, "garbage collection panicked"),
                }
            }
        });
    }
}
