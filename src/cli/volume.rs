//! `ferry volume add`, `ferry volume list`, `ferry volume remove` and `ferry volume clear-error`.

use std::path::Path;

use super::{Client, print_json};
use crate::daemon::api::{AddVolume, VolumeInfo};
use crate::units::{ByteSize, Dur, human_bytes};

pub async fn add(dir: &Path, req: &AddVolume) -> anyhow::Result<()> {
    let v: VolumeInfo = Client::new(dir).post("/volumes", req).await?;
    let how = if v.mode.continuous() {
        format!(
            "writes go through NBD export '{}' on {}; seeding the DR copy now",
            v.name,
            dir.join(crate::daemon::NBD_SOCKET).display()
        )
    } else {
        format!(
            "every {}; first pass starting",
            Dur(std::time::Duration::from_millis(v.interval_ms))
        )
    };
    println!(
        "protecting {} ({}, {}) in {} mode: {how}",
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

pub async fn remove(dir: &Path, name: &str, json: bool) -> anyhow::Result<()> {
    let r: crate::daemon::remove::Removed = Client::new(dir)
        .post(&format!("/volumes/{name}/remove"), &serde_json::json!({}))
        .await?;
    if json {
        return print_json(&r);
    }
    println!(
        "{} is no longer protected at this site (it was the {} here); {} recovery point(s) dropped (their chunks go at the next GC){}",
        r.volume,
        r.role,
        r.points,
        if r.deleted.is_empty() {
            String::new()
        } else {
            format!("; deleted {}", r.deleted.join(", "))
        }
    );
    println!(
        "the other site keeps its side until `ferry volume remove {}` is run there too; a volume added again under this name is a new lineage, never continued from the old copy",
        r.volume
    );
    Ok(())
}

/// `ferry volume clear-error NAME`: flushes work again after a failed fsync
/// of the image whose writes could not be written again.
pub async fn clear_error(dir: &Path, name: &str, json: bool) -> anyhow::Result<()> {
    let r: serde_json::Value = Client::new(dir)
        .post(
            &format!("/volumes/{name}/clear-error"),
            &serde_json::json!({}),
        )
        .await?;
    if json {
        return print_json(&r);
    }
    println!(
        "{name}: flushes work again; the writes the failed fsync covered may be lost from this image (the guest was told: its flush failed)"
    );
    Ok(())
}
