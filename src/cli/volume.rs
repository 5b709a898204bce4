//! `ferry volume add` and `ferry volume list`.

use std::path::Path;

use anyhow::bail;

use super::{Client, print_json};
use crate::daemon::api::{AddVolume, VolumeInfo};
use crate::store::state::Mode;
use crate::units::{ByteSize, Dur, human_bytes};

pub async fn add(
    dir: &Path,
    name: &str,
    path: &Path,
    mode: Mode,
    interval: Dur,
    chunk_size: ByteSize,
    rpo_target: Option<Dur>,
) -> anyhow::Result<()> {
    if chunk_size.0 > u32::MAX as u64 {
        bail!("--chunk-size {chunk_size} is too large (4MiB at most)");
    }
    let abs = std::path::absolute(path)?;
    let req = AddVolume {
        name: name.into(),
        path: abs.display().to_string(),
        mode,
        interval_ms: interval.0.as_millis() as u64,
        chunk_size: chunk_size.0 as u32,
        rpo_target_ms: rpo_target.map(|d| d.0.as_millis() as u64).unwrap_or(0),
    };
    let v: VolumeInfo = Client::new(dir).post("/volumes", &req).await?;
    println!(
        "protecting {} ({}, {}) in {} mode every {interval}; first pass starting",
        v.name,
        v.path,
        human_bytes(v.size),
        v.mode
    );
    Ok(())
}

pub async fn list(dir: &Path, json: bool) -> anyhow::Result<()> {
    let vols: Vec<VolumeInfo> = Client::new(dir).get("/volumes").await?;
    if json {
        return print_json(&vols);
    }
    println!(
        "{:<20} {:<8} {:<9} {:>10} {:>7}  IMAGE",
        "NAME", "ROLE", "MODE", "SIZE", "CHUNK"
    );
    for v in vols {
        println!(
            "{:<20} {:<8} {:<9} {:>10} {:>7}  {}",
            v.name,
            v.role,
            v.mode,
            human_bytes(v.size),
            ByteSize(v.chunk_size as u64).to_string(),
            v.path
        );
    }
    Ok(())
}
