//! Talks to the running daemon over its admin socket.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::daemon::ADMIN_SOCKET;
use crate::daemon::api::ErrorBody;

/// Largest admin response read; status of thousands of volumes fits easily.
const RESPONSE_BYTES_MAX: usize = 64 << 20;

/// Who runs the command, as the environment says (the user behind sudo
/// first); the daemon records it beside the socket's credentials.
fn operator_name() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect()
}

pub struct Client {
    sock: PathBuf,
    dir: PathBuf,
}

impl Client {
    pub fn new(dir: &Path) -> Client {
        Client {
            sock: dir.join(ADMIN_SOCKET),
            dir: dir.to_path_buf(),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send("GET", path, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send("POST", path, Some(serde_json::to_vec(body)?))
            .await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<T> {
        let stream = tokio::net::UnixStream::connect(&self.sock).await.map_err(|e| {
            anyhow!(
                "cannot reach the ferry daemon at {}: {e}\nhint: start it with `ferry serve --dir {}`, or pass the right --dir / FERRY_DIR",
                self.sock.display(),
                self.dir.display()
            )
        })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "ferry")
            .header("content-type", "application/json")
            .header("x-ferry-user", operator_name())
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = sender
            .send_request(req)
            .await
            .context("admin request failed")?;
        let status = resp.status();
        let limited = http_body_util::Limited::new(resp.into_body(), RESPONSE_BYTES_MAX);
        let bytes = limited
            .collect()
            .await
            .map_err(|e| anyhow!("reading the daemon's answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            if let Ok(e) = serde_json::from_slice::<ErrorBody>(&bytes) {
                bail!("{}", e.error);
            }
            bail!(
                "daemon answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("daemon sent an unexpected answer to {path}"))
    }
}
