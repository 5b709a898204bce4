//! Site identities (a self-signed certificate per site) and verifiers that
//! accept exactly the pinned peer certificate, by SHA-256 fingerprint.
//! There is no certificate authority: pairing exchanges fingerprints.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::Digest;

pub const CERT_FILE: &str = "site.crt";
pub const KEY_FILE: &str = "site.key";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot create the site certificate: {0}")]
    Generate(String),
    #[error("cannot read {path}: {message} (run `ferry init` to create the site identity)")]
    Load { path: PathBuf, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A site's certificate and private key.
#[derive(Debug)]
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Makes a new self-signed identity for `site` and writes it to `dir`
    /// (the key readable by its owner only).
    pub fn generate(dir: &Path, site: &str) -> Result<Identity, TlsError> {
        let ck = rcgen::generate_simple_self_signed(vec![
            super::SERVER_NAME.to_string(),
            format!("{site}.ferry"),
        ])
        .map_err(|e| TlsError::Generate(e.to_string()))?;
        let cert_pem = ck.cert.pem();
        let key_pem = ck.signing_key.serialize_pem();
        let cp = dir.join(CERT_FILE);
        let kp = dir.join(KEY_FILE);
        crate::util::write_atomic(&cp, cert_pem.as_bytes())
            .map_err(|source| TlsError::Write { path: cp, source })?;
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&kp)
                .map_err(|source| TlsError::Write {
                    path: kp.clone(),
                    source,
                })?;
            f.write_all(key_pem.as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|source| TlsError::Write { path: kp, source })?;
        }
        Identity::load(dir)
    }

    pub fn load(dir: &Path) -> Result<Identity, TlsError> {
        let cp = dir.join(CERT_FILE);
        let kp = dir.join(KEY_FILE);
        let cert = CertificateDer::from_pem_file(&cp).map_err(|e| TlsError::Load {
            path: cp,
            message: e.to_string(),
        })?;
        let key = PrivateKeyDer::from_pem_file(&kp).map_err(|e| TlsError::Load {
            path: kp,
            message: e.to_string(),
        })?;
        Ok(Identity { cert, key })
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }
}

/// SHA-256 of a DER certificate, hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(sha2::Sha256::digest(cert.as_ref()))
}

/// Who may connect to this site. Shared with the pairing code, which opens a
/// window for unknown certificates while a token is outstanding.
#[derive(Debug, Default)]
pub struct Pins {
    /// The pinned peer fingerprint.
    pub peer: Option<String>,
    /// Until then, unknown client certificates may complete the handshake,
    /// but such a connection may only present a pairing token.
    pub pairing_until: Option<Instant>,
}

pub type SharedPins = Arc<RwLock<Pins>>;

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Accepts client certificates by pin (see [`Pins`]).
#[derive(Debug)]
pub struct PinnedClients {
    pins: SharedPins,
    algs: WebPkiSupportedAlgorithms,
}

impl PinnedClients {
    pub fn new(pins: SharedPins) -> PinnedClients {
        PinnedClients {
            pins,
            algs: algorithms(),
        }
    }
}

impl ClientCertVerifier for PinnedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        let pins = self
            .pins
            .read()
            .map_err(|_| rustls::Error::General("pin state poisoned".into()))?;
        if pins.peer.as_deref() == Some(fp.as_str()) {
            return Ok(ClientCertVerified::assertion());
        }
        if pins.pairing_until.is_some_and(|t| Instant::now() < t) {
            return Ok(ClientCertVerified::assertion());
        }
        tracing::warn!(fingerprint = %fp, "refused a connection from an unknown certificate");
        Err(rustls::Error::General(format!(
            "certificate {fp} is not the pinned peer"
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Accepts exactly one server certificate, by fingerprint.
#[derive(Debug)]
pub struct PinnedServer {
    fingerprint: String,
    algs: WebPkiSupportedAlgorithms,
}

impl PinnedServer {
    pub fn new(fingerprint: String) -> PinnedServer {
        PinnedServer {
            fingerprint,
            algs: algorithms(),
        }
    }
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        if fp == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "peer presented certificate {fp}, expected the pinned {}",
                self.fingerprint
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
