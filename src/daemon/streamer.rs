//! The primary's streamer for one continuous volume: resyncs by tree
//! comparison when needed, then sends the journal in order, in batches,
//! and trims it as the DR side confirms durability.

use std::sync::Arc;
use std::time::Duration;

use super::Site;
use super::primary::{Fuzzy, PassError, run_pass};
use super::runtime::VolumeRuntime;
use super::stream::VolumeStream;
use crate::proto::messages::{Request, Response, STREAM_BATCH_BYTES_MAX};
use crate::store::state;
use crate::transport::endpoint::call;

/// zstd level for journal batches: fast, since the stream is latency-bound.
const STREAM_ZSTD_LEVEL: i32 = 1;

pub async fn run(site: Arc<Site>, name: String, rt: Arc<VolumeRuntime>, vs: Arc<VolumeStream>) {
    loop {
        let link_down_max = site
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .limits
            .link_down_max
            .0;
        let Some(conn) = site.link() else {
            vs.link_state(false, link_down_max);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                _ = site.shutdown.notified() => return,
            }
        };
        vs.link_state(true, link_down_max);
        let Ok(Some(rec)) = state::get_volume(&*site.store, &name) else {
            return;
        };
        let r = tokio::select! {
            r = stream_once(&site, conn, &rec, &rt, &vs) => r,
            _ = site.shutdown.notified() => return,
        };
        if let Err(e) = r {
            tracing::warn!(volume = %name, error = %e, "stream interrupted; starting again");
            rt.state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .last_error = Some(e.to_string());
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = site.shutdown.notified() => return,
            }
        }
    }
}

/// One connection's worth of streaming: a resync first if needed, then the
/// journal until the link drops or a resync is needed again.
async fn stream_once(
    site: &Arc<Site>,
    conn: quinn::Connection,
    rec: &state::VolumeRecord,
    rt: &Arc<VolumeRuntime>,
    vs: &Arc<VolumeStream>,
) -> Result<(), PassError> {
    let frame_max = site.frame_bytes_max();
    if vs.resync_needed() {
        resync(site, conn.clone(), rec, rt, vs).await?;
    }
    let r = exchange(
        site,
        &conn,
        frame_max,
        &Request::StreamOpen {
            volume: rec.name.clone(),
            size: rec.size,
            chunk_size: rec.chunk_size,
            mode: rec.mode,
        },
    )
    .await?;
    let Response::StreamOpened {
        next_seq,
        need_resync,
    } = r
    else {
        return Err(PassError::Protocol(format!(
            "expected StreamOpened, got {r:?}"
        )));
    };
    if need_resync {
        vs.request_resync("the DR side has no copy to stream onto");
        return Ok(());
    }
    if !vs.start_at(next_seq) {
        return Ok(());
    }
    tracing::info!(volume = %rec.name, from = next_seq, "streaming the journal");
    loop {
        if vs.resync_needed() {
            return Ok(());
        }
        let (view, acked) = vs.journal_view();
        let from = acked + 1;
        let batch = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let recs = view
                .read_from(from, STREAM_BATCH_BYTES_MAX)
                .map_err(|e| e.to_string())?;
            let raw: Vec<u8> = recs.iter().flat_map(|r| r.encode()).collect();
            let last = recs.last().map(|r| r.seq);
            let data = zstd::bulk::compress(&raw, STREAM_ZSTD_LEVEL).map_err(|e| e.to_string())?;
            Ok((last, raw.len() as u64, data))
        })
        .await
        .map_err(|e| PassError::Protocol(e.to_string()))?;
        let (last, raw_bytes, data) = match batch {
            Ok(b) => b,
            // The journal was dropped under us (a fallback): resync.
            Err(e) if vs.resync_needed() => {
                tracing::debug!(error = %e, "journal dropped while reading");
                return Ok(());
            }
            Err(e) => return Err(PassError::Protocol(format!("reading the journal: {e}"))),
        };
        let Some(last) = last else {
            if conn.close_reason().is_some() {
                return Err(PassError::LinkDown);
            }
            tokio::select! {
                _ = vs.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            continue;
        };
        let r = exchange(
            site,
            &conn,
            frame_max,
            &Request::Records {
                volume: rec.name.clone(),
                first: from,
                data,
            },
        )
        .await?;
        match r {
            Response::Durable { upto, point } if upto >= from && upto <= last => {
                vs.acked(upto, raw_bytes);
                vs.set_dr_point(point);
            }
            other => {
                return Err(PassError::Protocol(format!(
                    "expected Durable up to {last}, got {other:?}"
                )));
            }
        }
    }
}

/// A tree comparison of the live image with the DR copy, after which the
/// journal (restarted just before the read) is streamed on top.
async fn resync(
    site: &Arc<Site>,
    conn: quinn::Connection,
    rec: &state::VolumeRecord,
    rt: &Arc<VolumeRuntime>,
    vs: &Arc<VolumeStream>,
) -> Result<(), PassError> {
    let from_seq = vs
        .begin_resync()
        .map_err(|e| PassError::Protocol(format!("restarting the journal: {e}")))?;
    {
        let mut st = rt.state.lock().unwrap_or_else(|p| p.into_inner());
        st.running = true;
        st.started += 1;
    }
    tracing::info!(volume = %rec.name, from_seq, "resync by tree comparison");
    let fuzzy = Fuzzy {
        from_seq,
        stream: vs.clone(),
    };
    let result = run_pass(site, conn, rec, rt, Some(fuzzy)).await;
    let outcome = match result {
        Ok(report) => site
            .record_pass(&rec.name, report.clone())
            .map(|_| report)
            .map_err(PassError::from),
        Err(e) => Err(e),
    };
    let mut st = rt.state.lock().unwrap_or_else(|p| p.into_inner());
    st.running = false;
    st.finished += 1;
    rt.progress.set_phase("streaming");
    match outcome {
        Ok(report) => {
            site.observe_pass(&rec.name, &report);
            tracing::info!(volume = %rec.name, sent = report.chunks_sent(), ms = report.duration_ms, "resync complete; streaming");
            vs.end_resync(from_seq);
            st.last_error = None;
            st.last_report = Some(report);
            Ok(())
        }
        Err(e) => {
            site.metrics
                .passes
                .with_label_values(&[rec.name.as_str(), "failed"])
                .inc();
            st.last_error = Some(e.to_string());
            Err(e)
        }
    }
}

/// One request and its answer on a stream of its own, counted as journal traffic.
async fn exchange(
    site: &Site,
    conn: &quinn::Connection,
    frame_max: u64,
    req: &Request,
) -> Result<Response, PassError> {
    let (resp, b) = call(conn, req, frame_max)
        .await
        .map_err(|e| PassError::Link(e.to_string()))?;
    site.count_wire("journal", b.sent, b.received);
    match resp {
        Response::Error { message } => Err(PassError::Peer(message)),
        r => Ok(r),
    }
}
