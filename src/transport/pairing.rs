//! One-time pairing tokens: `ferry pair token` prints one, `ferry pair join`
//! presents it. A token carries where to connect, the issuer's certificate
//! fingerprint (so the joiner pins it before sending anything), a secret and
//! an expiry. The issuer keeps only the secret's SHA-256, and marks the token
//! used before it answers, so a token works once.

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::Digest;

const PREFIX: &str = "ferry-pair-v1.";
/// A token longer than this is not one of ours; refuse before decoding.
const TOKEN_CHARS_MAX: usize = 2048;

/// What the token holder learns.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Token {
    pub site: String,
    pub address: String,
    pub fingerprint: String,
    pub id: String,
    pub secret: String,
    /// Unix seconds.
    pub expires: u64,
}

/// What the issuer stores (meta key `token/ID`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IssuedToken {
    pub secret_sha256: String,
    pub expires: u64,
    pub used: bool,
}

impl Token {
    pub fn new(site: &str, address: &str, fingerprint: &str, expires: u64) -> (Token, IssuedToken) {
        let id: [u8; 8] = rand::random();
        let secret: [u8; 32] = rand::random();
        let secret = hex::encode(secret);
        let issued = IssuedToken {
            secret_sha256: hash_secret(&secret),
            expires,
            used: false,
        };
        (
            Token {
                site: site.into(),
                address: address.into(),
                fingerprint: fingerprint.into(),
                id: hex::encode(id),
                secret,
                expires,
            },
            issued,
        )
    }

    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        )
    }

    pub fn decode(s: &str) -> Result<Token, String> {
        let s = s.trim();
        if s.len() > TOKEN_CHARS_MAX {
            return Err("this is not a ferry pairing token (too long)".into());
        }
        let body = s
            .strip_prefix(PREFIX)
            .ok_or("this is not a ferry pairing token (it should start with 'ferry-pair-v1.')")?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| "pairing token is damaged (bad base64); copy it again")?;
        serde_json::from_slice(&json).map_err(|_| "pairing token is damaged; copy it again".into())
    }
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

/// Compares without leaking where the first difference is.
pub fn secrets_match(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let (t, issued) = Token::new("dr", "127.0.0.1:7000", "ab", 100);
        let back = Token::decode(&t.encode()).unwrap();
        assert_eq!(back, t);
        assert!(secrets_match(
            &hash_secret(&t.secret),
            &issued.secret_sha256
        ));
        assert!(Token::decode("hello").is_err());
        assert!(Token::decode("ferry-pair-v1.!!!").is_err());
        assert!(Token::decode(&"x".repeat(5000)).is_err());
    }
}
