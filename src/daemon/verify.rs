//! `ferry verify`: the primary image against the DR replica image, read
//! now, chunk by chunk; and `--repair`, which has the DR side rewrite the
//! differing chunks as its replica should hold them.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Site;
use super::primary::{PassError, Wire, unexpected};
use crate::hash::Hash;
use crate::proto::messages::{Request, Response};
use crate::store::state::VolumeRecord;
use crate::volume::image;

/// The result of comparing the primary image with the DR replica image.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub volume: String,
    pub primary_size: u64,
    pub replica_size: u64,
    pub chunk_size: u32,
    pub chunks_compared: u64,
    /// Byte ranges `[start, end)` whose content differs.
    pub differing: Vec<(u64, u64)>,
    pub in_sync: bool,
    /// Chunks rewritten at the DR side from its store (`verify --repair`).
    #[serde(default)]
    pub repaired: u64,
}

/// Verifies, asks the DR side to rewrite what differs from its store's copy of
/// the committed state, and verifies again.
pub async fn verify_and_repair(
    site: &Arc<Site>,
    rec: &VolumeRecord,
) -> Result<VerifyReport, PassError> {
    let first = verify(site, rec).await?;
    if first.in_sync {
        return Ok(first);
    }
    let wire = Wire::to_peer(site)?;
    let cs = first.chunk_size as u64;
    let indices: Vec<u64> = first
        .differing
        .iter()
        .flat_map(|&(a, b)| (a / cs)..b.div_ceil(cs))
        .collect();
    let mut repaired = 0;
    for batch in indices.chunks(crate::proto::messages::ASK_ITEMS_MAX) {
        let r = wire
            .call(&Request::Repair {
                volume: rec.name.clone(),
                indices: batch.to_vec(),
            })
            .await?;
        let Response::Repaired { chunks } = r else {
            return Err(unexpected("Repaired", &r));
        };
        repaired += chunks;
    }
    let mut after = verify(site, rec).await?;
    after.repaired = repaired;
    Ok(after)
}

/// Reads both images now and compares their chunk names.
pub async fn verify(site: &Arc<Site>, rec: &VolumeRecord) -> Result<VerifyReport, PassError> {
    let wire = Wire::to_peer(site)?;
    let (path, cs) = (rec.path.clone(), rec.chunk_size);
    let local = tokio::task::spawn_blocking(move || image::scan(&path, cs, &Default::default()))
        .await
        .map_err(|e| PassError::Protocol(e.to_string()))??
        .0;
    let mut remote: Vec<Hash> = Vec::new();
    let (mut rsize, mut rcs);
    loop {
        let r = wire
            .call(&Request::Leaves {
                volume: rec.name.clone(),
                start: remote.len() as u64,
            })
            .await?;
        let Response::Leaves {
            size,
            chunk_size,
            leaves,
            done,
        } = r
        else {
            return Err(unexpected("Leaves", &r));
        };
        (rsize, rcs) = (size, chunk_size);
        let empty = leaves.is_empty();
        remote.extend(leaves);
        if done || empty {
            break;
        }
    }
    let mut report = VerifyReport {
        volume: rec.name.clone(),
        primary_size: local.size,
        replica_size: rsize,
        chunk_size: cs,
        ..Default::default()
    };
    if rcs != cs {
        report.differing.push((0, local.size.max(rsize)));
        return Ok(report);
    }
    let n = local.leaves().len().max(remote.len());
    for i in 0..n {
        let a = local.leaves().get(i);
        let b = remote.get(i);
        report.chunks_compared += 1;
        if a != b {
            let start = i as u64 * cs as u64;
            let end = (start + cs as u64).min(local.size.max(rsize));
            match report.differing.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => report.differing.push((start, end)),
            }
        }
    }
    report.in_sync = report.differing.is_empty() && local.size == rsize;
    Ok(report)
}
