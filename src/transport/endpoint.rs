//! The QUIC endpoint: one per site, listening and dialing, mutually
//! authenticated by pinned certificates only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, TransportConfig, VarInt};

use super::tls::{Identity, PinnedClients, PinnedServer, SharedPins, TlsError, provider};
use super::{ALPN, SERVER_NAME};
use crate::config::Congestion;
use crate::proto::frame::{self, FrameError};
use crate::proto::messages::{Request, Response};

/// Streams one side may open at once; chunk batches use a handful.
const STREAMS_MAX: u32 = 32;
/// Bytes a stream may have in flight unread. Every stream's window together
/// fits the connection's: a receiver that leaves some streams unread (their
/// requests wait for a share of `limits.peer_inflight_bytes_max`) can still
/// take in the rest of the streams it reads, so a peer that opens every
/// stream with a maximal frame cannot stall the others (2 MiB per stream is
/// 40 MB/s a stream at 50 ms round trips).
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = STREAMS_MAX * STREAM_WINDOW;

fn transport(congestion: Congestion) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(STREAMS_MAX));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.keep_alive_interval(Some(Duration::from_secs(3)));
    // A peer that vanished (kill -9, power loss) sends no close: with keep-alives
    // every 3 s, 10 s of silence means it is gone and the dialer redials.
    t.max_idle_timeout(Some(VarInt::from_u32(10_000).into()));
    // Windows sized for a long fat link (100 Mbit/s x 50 ms needs ~640 KB;
    // 8 streams of a pass take 1 Gbit/s x 50 ms).
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(CONNECTION_WINDOW));
    t.send_window(64 << 20);
    match congestion {
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
    };
    Arc::new(t)
}

fn server_config(
    id: &Identity,
    pins: SharedPins,
    congestion: Congestion,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(PinnedClients::new(pins)))
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport(congestion));
    Ok(cfg)
}

/// A client configuration that trusts only `peer_fingerprint`.
pub fn client_config(
    id: &Identity,
    peer_fingerprint: &str,
    congestion: Congestion,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer::new(peer_fingerprint.to_string())))
        .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport(congestion));
    Ok(cfg)
}

/// The key of the endpoint's stateless resets, derived from the site's
/// private key so that it survives a restart: a restarted site answers the
/// peer's packets on the old connection with a reset the peer trusts, and
/// the peer redials at its next keep-alive instead of at the idle timeout.
/// The connection ids it hands out are keyed the same way, so that the
/// restarted endpoint recognises them as its own and answers with the reset.
fn endpoint_config(id: &Identity) -> quinn::EndpointConfig {
    let k = blake3::derive_key(
        "ferry 2026-11 quic stateless reset key",
        id.key.secret_der(),
    );
    let mut cfg =
        quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k)));
    let cid_key = u64::from_le_bytes(
        blake3::derive_key("ferry 2026-11 quic connection id key", id.key.secret_der())[..8]
            .try_into()
            .unwrap_or_default(),
    );
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    cfg
}

/// Binds the site's endpoint. It accepts connections from the pinned peer (or,
/// during a pairing window, from a site presenting a token) and dials out.
pub fn bind(
    listen: SocketAddr,
    id: &Identity,
    pins: SharedPins,
    congestion: Congestion,
) -> Result<Endpoint, std::io::Error> {
    let cfg = server_config(id, pins, congestion).map_err(std::io::Error::other)?;
    let socket = std::net::UdpSocket::bind(listen)?;
    size_socket_buffers(&socket);
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
    Endpoint::new(endpoint_config(id), Some(cfg), socket, runtime)
}

/// UDP socket buffers of the endpoint. The 208 KiB Linux gives by default
/// fill in a fraction of a millisecond at a few Gbit/s: while the daemon is
/// busy, the kernel drops what arrives, and QUIC resends it (a loopback seed
/// sent a third more bytes than the data under BBR, which does not slow
/// down for loss).
const SOCKET_BUFFER_BYTES: libc::c_int = 8 << 20;

/// Sizes the socket's buffers to `SOCKET_BUFFER_BYTES`: past the kernel's
/// `net.core.rmem_max`/`wmem_max` where the daemon may (root), else up to
/// them, with a warning that says how to raise them.
fn size_socket_buffers(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let set = |opt: libc::c_int| {
        // SAFETY: setsockopt reads an int from a live local; the fd is open.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&SOCKET_BUFFER_BYTES as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    let get = |opt: libc::c_int| {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into a live local.
        let ok = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        } == 0;
        if ok { v } else { 0 }
    };
    for (force, plain, get_opt, sysctl) in [
        (
            libc::SO_RCVBUFFORCE,
            libc::SO_RCVBUF,
            libc::SO_RCVBUF,
            "net.core.rmem_max",
        ),
        (
            libc::SO_SNDBUFFORCE,
            libc::SO_SNDBUF,
            libc::SO_SNDBUF,
            "net.core.wmem_max",
        ),
    ] {
        if !set(force) {
            set(plain);
        }
        // The kernel reports twice what it was asked (its bookkeeping).
        let got = get(get_opt) / 2;
        if got < SOCKET_BUFFER_BYTES / 2 {
            tracing::warn!(
                bytes = got,
                "the QUIC socket's buffer is small: packets will be dropped on a fast link; raise {sysctl} (sysctl -w {sysctl}={SOCKET_BUFFER_BYTES}) or run the daemon as root"
            );
        }
    }
}

/// An endpoint that only dials (for `pair join` before the daemon pins anything,
/// and for tests acting as a site).
pub fn client_only() -> Result<Endpoint, std::io::Error> {
    Endpoint::client("0.0.0.0:0".parse().map_err(std::io::Error::other)?)
}

pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    id: &Identity,
    peer_fingerprint: &str,
    congestion: Congestion,
) -> Result<Connection, String> {
    let cfg = client_config(id, peer_fingerprint, congestion).map_err(|e| e.to_string())?;
    let connecting = endpoint
        .connect_with(cfg, addr, SERVER_NAME)
        .map_err(|e| e.to_string())?;
    connecting.await.map_err(|e| e.to_string())
}

/// Bytes a request cost on streams: written and read, frames included.
#[derive(Clone, Copy, Debug, Default)]
pub struct CallBytes {
    pub sent: u64,
    pub received: u64,
}

/// One request and its response on a fresh bidirectional stream.
pub async fn call(
    conn: &Connection,
    req: &Request,
    frame_max: u64,
) -> Result<(Response, CallBytes), FrameError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| FrameError::Io(std::io::Error::other(e)))?;
    let sent = frame::write_quic(&mut send, req, frame_max).await?;
    send.finish()
        .map_err(|e| FrameError::Io(std::io::Error::other(e)))?;
    let (resp, received) = frame::read::<Response, _>(&mut recv, frame_max).await?;
    Ok((resp, CallBytes { sent, received }))
}
