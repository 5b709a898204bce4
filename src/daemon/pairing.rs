//! Pairing: issuing one-time tokens and accepting or presenting them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::Connection;

use super::Site;
use super::link::peer_fingerprint;
use crate::config::PeerConfig;
use crate::proto::frame;
use crate::proto::messages::{Request, Response};
use crate::store::Op;
use crate::transport::endpoint;
use crate::transport::pairing::{IssuedToken, Token, hash_secret, secrets_match};
use crate::util::now_unix;

/// A pairing connection gets this long to present its token.
const PAIR_TIMEOUT: Duration = Duration::from_secs(10);
/// Pairing requests are tiny; anything larger is not one.
const PAIR_FRAME_BYTES_MAX: u64 = 4096;

fn token_key(id: &str) -> Vec<u8> {
    format!("token/{id}").into_bytes()
}

/// Issues a one-time token valid for `ttl`.
pub fn issue(site: &Arc<Site>, ttl: Duration, address: Option<&str>) -> Result<Token, String> {
    let cfg = site
        .config
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(p) = &cfg.peer {
        return Err(format!(
            "this site is already paired with '{}' ({}); a site has one peer",
            p.name, p.address
        ));
    }
    if ttl.is_zero() || ttl > Duration::from_secs(24 * 3600) {
        return Err("--ttl must be between 1s and 24h".into());
    }
    let expires = now_unix() + ttl.as_secs().max(1);
    let address = match address {
        Some(a) => a
            .parse::<std::net::SocketAddr>()
            .map_err(|_| format!("--address '{a}' is not HOST:PORT"))?
            .to_string(),
        None if cfg.listen.ip().is_unspecified() => {
            return Err(format!(
                "this site listens on {}, which the other site cannot dial; give the address it should use with --address HOST:PORT",
                cfg.listen
            ));
        }
        None => cfg.listen.to_string(),
    };
    let (token, issued) = Token::new(&cfg.site, &address, &site.identity.fingerprint(), expires);
    let rec = serde_json::to_vec(&issued).map_err(|e| e.to_string())?;
    site.store
        .apply(vec![Op::PutMeta(token_key(&token.id), rec)], true)
        .map_err(|e| e.to_string())?;
    let until = Instant::now() + ttl;
    let mut pins = site.pins.write().unwrap_or_else(|p| p.into_inner());
    pins.pairing_until = Some(pins.pairing_until.map_or(until, |t| t.max(until)));
    tracing::info!(token = %token.id, expires, "pairing token issued");
    Ok(token)
}

/// Serves a connection from an unpinned certificate: it may present a token, nothing else.
pub async fn serve_pairing(site: Arc<Site>, conn: Connection) {
    let remote = conn.remote_address();
    let r = tokio::time::timeout(PAIR_TIMEOUT, async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let (req, _) = frame::read::<Request, _>(&mut recv, PAIR_FRAME_BYTES_MAX)
            .await
            .map_err(|e| e.to_string())?;
        let resp = match accept(&site, &conn, req) {
            Ok(r) => r,
            Err(message) => {
                tracing::warn!(%remote, error = %message, "pairing refused");
                Response::error(crate::proto::messages::ErrorCode::Refused, message)
            }
        };
        frame::write(&mut send, &resp, PAIR_FRAME_BYTES_MAX)
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        let _ = send.stopped().await;
        Ok::<_, String>(())
    })
    .await;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(%remote, error = %e, "pairing connection failed"),
        Err(_) => tracing::warn!(%remote, "pairing connection presented no token in time"),
    }
    conn.close(0u32.into(), b"pairing done");
}

fn accept(site: &Arc<Site>, conn: &Connection, req: Request) -> Result<Response, String> {
    let Request::Pair {
        token_id,
        secret,
        site: name,
        listen,
    } = req
    else {
        return Err(
            "this certificate is not pinned here; only a pairing token may be presented".into(),
        );
    };
    let fp = peer_fingerprint(conn).ok_or("the joining site presented no certificate")?;
    let address = listen
        .parse()
        .map_err(|_| format!("joining site sent a bad listen address '{listen}'"))?;
    if name.is_empty() || name.len() > 64 {
        return Err("joining site sent a bad site name".into());
    }
    let _g = site.pair_lock.lock().unwrap_or_else(|p| p.into_inner());
    if token_id.len() > 64 {
        return Err("unknown pairing token".into());
    }
    let key = token_key(&token_id);
    let rec = site
        .store
        .get_meta(&key)
        .map_err(|e| e.to_string())?
        .ok_or("unknown pairing token; run `ferry pair token` at the DR site for a new one")?;
    let mut issued: IssuedToken = serde_json::from_slice(&rec).map_err(|e| e.to_string())?;
    if !secrets_match(&hash_secret(&secret), &issued.secret_sha256) {
        return Err("pairing token secret is wrong".into());
    }
    if issued.used {
        return Err(
            "pairing token was already used; tokens work once: run `ferry pair token` again".into(),
        );
    }
    if now_unix() >= issued.expires {
        return Err("pairing token has expired; run `ferry pair token` again".into());
    }
    if let Some(p) = &site.config.read().unwrap_or_else(|p| p.into_inner()).peer {
        return Err(format!("this site is already paired with '{}'", p.name));
    }
    // Burn the token before anything else, durably: a crash must not let it work twice.
    issued.used = true;
    site.store
        .apply(
            vec![Op::PutMeta(
                key,
                serde_json::to_vec(&issued).map_err(|e| e.to_string())?,
            )],
            true,
        )
        .map_err(|e| e.to_string())?;
    site.set_peer(PeerConfig {
        name: name.clone(),
        address,
        fingerprint: fp,
        dial: false,
    })
    .map_err(|e| e.to_string())?;
    tracing::info!(peer = %name, %address, "paired");
    Ok(Response::Paired { site: site.name() })
}

/// Presents a token to the site that issued it, and pins it on success.
pub async fn join(site: &Arc<Site>, token: &str) -> Result<PeerConfig, String> {
    let token = Token::decode(token)?;
    if let Some(p) = &site.config.read().unwrap_or_else(|p| p.into_inner()).peer {
        return Err(format!("this site is already paired with '{}'", p.name));
    }
    if now_unix() >= token.expires {
        return Err(
            "pairing token has expired; run `ferry pair token` at the other site again".into(),
        );
    }
    let address = token
        .address
        .parse()
        .map_err(|_| format!("token names a bad address '{}'", token.address))?;
    let conn = endpoint::connect(
        &site.endpoint,
        address,
        &site.identity,
        &token.fingerprint,
        site.congestion(),
    )
    .await
    .map_err(|e| format!("cannot connect to {} at {address}: {e}", token.site))?;
    let (listen, name) = {
        let c = site.config.read().unwrap_or_else(|p| p.into_inner());
        (c.listen.to_string(), c.site.clone())
    };
    let req = Request::Pair {
        token_id: token.id.clone(),
        secret: token.secret.clone(),
        site: name,
        listen,
    };
    let r = endpoint::call(&conn, &req, PAIR_FRAME_BYTES_MAX).await;
    conn.close(0u32.into(), b"paired");
    match r {
        Ok((Response::Paired { site: peer_name }, _)) => {
            let peer = PeerConfig {
                name: peer_name,
                address,
                fingerprint: token.fingerprint,
                dial: true,
            };
            site.set_peer(peer.clone()).map_err(|e| e.to_string())?;
            Ok(peer)
        }
        Ok((Response::Error { message, .. }, _)) => {
            Err(format!("{} refused pairing: {message}", token.site))
        }
        Ok((other, _)) => Err(format!("unexpected answer to pairing: {other:?}")),
        Err(e) => Err(format!("pairing with {} failed: {e}", token.site)),
    }
}
