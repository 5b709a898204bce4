//! `ferry init`: a new site's config, identity and empty store.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, bail};

use crate::config::{Config, Limits};
use crate::daemon::STORE_DIR;
use crate::store::RocksStore;
use crate::transport::tls::Identity;

pub fn run(
    dir: &Path,
    site: &str,
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
) -> anyhow::Result<()> {
    if site.is_empty()
        || site.len() > 64
        || !site
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("site name '{site}' must be 1 to 64 letters, digits, '-' or '_'");
    }
    if Config::path(dir).exists() {
        bail!(
            "{} already holds a ferry site; refusing to overwrite its identity",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let id = Identity::generate(dir, site)?;
    RocksStore::open(&dir.join(STORE_DIR))?;
    let cfg = Config {
        site: site.to_string(),
        listen,
        metrics,
        nbd: None,
        fsync: true,
        peer: None,
        limits: Limits::default(),
        retention: Default::default(),
        point_interval: crate::config::default_point_interval(),
        startup_wait: crate::config::default_startup_wait(),
    };
    cfg.save(dir)?;
    println!("initialized site '{site}' in {}", dir.display());
    println!("certificate fingerprint: {}", id.fingerprint());
    println!(
        "next: `ferry serve --dir {}`, then pair with `ferry pair token` / `ferry pair join`",
        dir.display()
    );
    Ok(())
}
