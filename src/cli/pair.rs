//! `ferry pair token` and `ferry pair join`.

use std::path::Path;

use super::{Client, print_json};
use crate::daemon::api::{JoinRequest, JoinResponse, TokenRequest, TokenResponse};
use crate::units::Dur;

pub async fn token(
    dir: &Path,
    ttl: Dur,
    address: Option<std::net::SocketAddr>,
    json: bool,
) -> anyhow::Result<()> {
    let r: TokenResponse = Client::new(dir)
        .post(
            "/pair/token",
            &TokenRequest {
                ttl_ms: ttl.0.as_millis() as u64,
                address: address.map(|a| a.to_string()),
            },
        )
        .await?;
    if json {
        return print_json(&r);
    }
    println!("{}", r.token);
    eprintln!("one-time token, valid for {ttl}: run `ferry pair join TOKEN` at the other site");
    Ok(())
}

pub async fn join(dir: &Path, token: &str) -> anyhow::Result<()> {
    let r: JoinResponse = Client::new(dir)
        .post(
            "/pair/join",
            &JoinRequest {
                token: token.to_string(),
            },
        )
        .await?;
    println!(
        "paired with '{}' at {}; both sites now pin each other's certificate",
        r.peer, r.address
    );
    Ok(())
}
