//! The primary's stream job for one continuous volume: it opens the journal,
//! then, whenever the link is up and the volume may replicate, proves where
//! the DR side's records continue the journal and streams from there in
//! order, in batches; or, when a resync is needed, opens one at the DR side
//! and streams the journal from the resync's start while the tree comparison
//! runs, so that flushes keep completing. It waits on events (records
//! appended, the link, the role machine, a timer the stream session asked
//! for), never on a polling loop.

use std::sync::Arc;

use quinn::Connection;

use super::Site;
use super::primary::{Fuzzy, PassError, run_pass};
use super::stream::{Checkpoint, VolumeStream};
use super::volume::VolumeHandle;
use super::worker::{Job, JobCtx};
use crate::proto::messages::{
    ErrorCode, Request, Response, STREAM_BATCH_BYTES_MAX, STREAM_RECORDS_MAX,
};
use crate::proto::stream::OpenVerdict;
use crate::store::state::Mode;
use crate::transport::endpoint::call;

/// zstd level for journal batches: fast, since the stream is latency-bound.
const STREAM_ZSTD_LEVEL: i32 = 1;

/// Starts the volume's stream job.
pub fn spawn(site: &Arc<Site>, h: &Arc<VolumeHandle>) {
    let (site, h2) = (site.clone(), h.clone());
    let job = Job::spawn("stream", &h.name, site.job_metrics(), move |ctx| {
        run(site.clone(), h2.clone(), ctx)
    });
    h.jobs.add(job);
}

/// Opens the journal once (it replays onto the image), then streams.
async fn run(site: Arc<Site>, h: Arc<VolumeHandle>, mut ctx: JobCtx) -> Result<(), String> {
    let vs = match h.volume_stream() {
        Some(vs) => vs,
        None => {
            let (s, h2) = (site.clone(), h.clone());
            let vs = tokio::task::spawn_blocking(move || s.open_volume_stream(&h2))
                .await
                .map_err(|e| e.to_string())??;
            h.run.progress.set_phase("streaming");
            vs
        }
    };
    ctx.healthy();
    let mut link_rx = site.link_watch();
    let mut repl_rx = h.replicate_watch();
    loop {
        // Wait for a link and the role machine's leave to replicate.
        let conn = loop {
            let conn = site.link();
            if conn.is_none() {
                vs.link_down();
            }
            if let Some(c) = conn
                && *repl_rx.borrow_and_update()
            {
                break c;
            }
            let timeout = vs.poll_timeout();
            tokio::select! {
                _ = link_rx.changed() => {}
                _ = repl_rx.changed() => {}
                _ = sleep_until(timeout) => vs.handle_timeout(),
                _ = ctx.stopped() => return Ok(()),
            }
        };
        vs.link_up();
        let mut stop = ctx.clone();
        let r = tokio::select! {
            r = stream_once(&site, &h, &vs, &conn, &ctx) => r,
            _ = stop.stopped() => return Ok(()),
        };
        match r {
            Ok(()) => {}
            Err(e) if conn.close_reason().is_some() => {
                tracing::info!(volume = %h.name, error = %e, "stream interrupted by the link; it resumes when the link is back");
                tokio::select! {
                    _ = link_rx.changed() => {}
                    _ = ctx.stopped() => return Ok(()),
                }
            }
            Err(PassError::Peer(code, msg))
                if matches!(
                    code,
                    ErrorCode::NotReplica | ErrorCode::Behind | ErrorCode::StaleEpoch
                ) =>
            {
                if code == ErrorCode::StaleEpoch {
                    // Records of an epoch the replica does not follow (a
                    // journal written before the records carried theirs, or
                    // before a role change): they cannot continue its copy.
                    vs.request_resync(&format!("the DR side refused the journal: {msg}"));
                }
                // The peer is changing role (a switchover, a failback, a
                // resolve): shown, and tried again on its next Hello or
                // after a short wait, not after a growing backoff.
                ctx.error(&format!("DR site: {msg}"));
                tokio::select! {
                    _ = link_rx.changed() => {}
                    _ = repl_rx.changed() => {}
                    _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                    _ = ctx.stopped() => return Ok(()),
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

async fn sleep_until(t: Option<std::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// One connection's worth of streaming: a resync first if one is needed,
/// then the journal until the link drops, a resync is needed again, or the
/// volume must stop replicating.
async fn stream_once(
    site: &Arc<Site>,
    h: &Arc<VolumeHandle>,
    vs: &Arc<VolumeStream>,
    conn: &Connection,
    ctx: &JobCtx,
) -> Result<(), PassError> {
    if vs.resync_needed() {
        return resync(site, h, vs, conn, ctx).await;
    }
    let rec = h.record();
    let r = exchange(
        site,
        conn,
        &Request::StreamOpen {
            volume: rec.name.clone(),
            size: rec.size,
            chunk_size: rec.chunk_size,
            mode: rec.mode,
            incarnation: vs.incarnation(),
        },
    )
    .await?;
    let Response::StreamOpened { next_seq, resync } = r else {
        return Err(PassError::Protocol(format!(
            "expected StreamOpened, got {r:?}"
        )));
    };
    if let Some(reason) = resync {
        vs.request_resync(&format!("the DR side: {reason}"));
        return Ok(());
    }
    match vs.open_stream(next_seq, true) {
        OpenVerdict::StreamFrom(n) => {
            tracing::info!(volume = %rec.name, from = n, "streaming the journal");
            pump(site, h, vs, conn, ctx, false).await
        }
        OpenVerdict::Resync(reason) => {
            vs.request_resync(&reason);
            Ok(())
        }
    }
}

/// Sends the journal in order from the first record the DR side lacks,
/// one batch in flight, until the link drops, a resync is needed (or, with
/// `during_resync`, the running one is superseded), or the volume must stop
/// replicating.
async fn pump(
    site: &Arc<Site>,
    h: &Arc<VolumeHandle>,
    vs: &Arc<VolumeStream>,
    conn: &Connection,
    ctx: &JobCtx,
    during_resync: bool,
) -> Result<(), PassError> {
    let mut repl_rx = h.replicate_watch();
    let superseded = |vs: &VolumeStream| {
        let v = vs.view();
        v.resync_needed && !(during_resync && v.resync_running)
    };
    // Batches sent and not yet answered, oldest first (aborted if this
    // returns: a batch the DR side then refuses or never gets is sent again
    // from what it said was durable).
    let mut window = Window::default();
    let mut next = vs.journal_view().1 + 1;
    // Woken by new records while a batch is in flight (async volumes): the
    // records wait for its answer, see below; the wake still makes the
    // stop and fallback checks.
    let mut hold = false;
    loop {
        if superseded(vs) || !*repl_rx.borrow_and_update() || ctx.is_stopped() {
            return Ok(());
        }
        // Fill the window: up to WINDOW_BATCHES batches, each on a stream
        // of its own, without waiting for the answers of the ones before.
        while window.has_room() && !(hold && window.oldest().is_some()) {
            let (view, acked) = vs.journal_view();
            let from = next.max(acked + 1);
            let batch = tokio::task::spawn_blocking(move || -> Result<_, String> {
                // The records as stored, checksums checked, sent as they are.
                let raw = view
                    .read_raw_from(from, STREAM_BATCH_BYTES_MAX, STREAM_RECORDS_MAX)
                    .map_err(|e| e.to_string())?;
                let data = crate::store::compress_frame(&raw.bytes, STREAM_ZSTD_LEVEL)
                    .map_err(|e| e.to_string())?;
                Ok((raw.last, raw.bytes.len() as u64, data))
            })
            .await
            .map_err(|e| PassError::Protocol(e.to_string()))?;
            let (last, raw_bytes, data) = match batch {
                Ok(b) => b,
                // The journal was dropped under us (a fallback): resync.
                Err(e) if superseded(vs) => {
                    tracing::debug!(error = %e, "journal dropped while reading");
                    return Ok(());
                }
                Err(e) => return Err(PassError::Protocol(format!("reading the journal: {e}"))),
            };
            let Some(last) = last else {
                break;
            };
            let req = Request::Records {
                volume: h.name.clone(),
                first: from,
                data,
            };
            let (site2, conn2) = (site.clone(), conn.clone());
            window.push(InFlight {
                from,
                last,
                raw_bytes,
                answer: tokio::spawn(async move { exchange(&site2, &conn2, &req).await }),
            });
            next = last + 1;
        }
        let room = window.has_room();
        let Some(oldest) = window.oldest() else {
            // Nothing in flight and nothing to send: wait for records.
            tokio::select! {
                _ = vs.wake.notified() => {}
                _ = conn.closed() => return Err(PassError::LinkDown),
                _ = repl_rx.changed() => {}
            }
            continue;
        };
        // The oldest answer, or new records to fill the window's room. An
        // async volume's new records wait for the answer instead (they go
        // in the next batch, one round trip later): sent as they come, a
        // busy volume made batches of a few records, and each batch costs
        // a task switch, a QUIC stream and an fsync at the DR side. A sync
        // volume's flush waits for its records, so they go at once.
        hold = false;
        let answer = tokio::select! {
            a = &mut oldest.answer => a,
            _ = vs.wake.notified(), if room => {
                hold = vs.mode() != Mode::Sync;
                continue;
            }
            _ = conn.closed() => return Err(PassError::LinkDown),
            _ = repl_rx.changed() => continue,
        };
        let Some(InFlight {
            from,
            last,
            raw_bytes,
            ..
        }) = window.pop()
        else {
            continue;
        };
        let r = answer.map_err(|e| PassError::Protocol(format!("sending records: {e}")))??;
        match r {
            // The DR side may hold more than this batch (a batch sent again
            // after a lost answer): this batch is what this answer is for.
            Response::Durable { upto, point } if upto >= from => {
                let due = vs
                    .durable(upto.min(last), raw_bytes)
                    .map_err(PassError::Protocol)?;
                // Under pressure, an async volume's stream waits for the
                // checkpoint (the writes come first; the DR side catches up
                // after it), as it did when a flush synced the image: run
                // beside the stream, the image's writeback took 15-20 % of
                // the writes without flushes. A sync volume's flushes wait
                // for the stream, so it never waits for a checkpoint.
                let idle = !vs.checkpoint_running();
                match due {
                    Checkpoint::Pressed if vs.mode() != Mode::Sync && idle => {
                        let vs = vs.clone();
                        tokio::task::spawn_blocking(move || vs.checkpoint_image())
                            .await
                            .map_err(|e| PassError::Protocol(e.to_string()))?;
                    }
                    Checkpoint::Pressed | Checkpoint::Due if idle => {
                        vs.checkpoint_beside();
                    }
                    _ => {}
                }
                vs.set_dr_point(point);
                ctx.healthy();
            }
            other => {
                return Err(PassError::Protocol(format!(
                    "expected Durable up to {last}, got {other:?}"
                )));
            }
        }
    }
}

/// Journal batches the stream keeps in flight at once, each on a QUIC
/// stream of its own: the DR side appends them in order (a batch that
/// arrives early waits for the one before it) and fsyncs each, so while one
/// is being made durable there the next ones are on the wire. Four batches
/// of up to `STREAM_BATCH_BYTES_MAX` (8 MiB) cover the bandwidth-delay
/// product of a 1 Gbit/s link up to about 250 ms of round trip.
const WINDOW_BATCHES: usize = 4;

/// One batch sent, and its answer to come.
struct InFlight {
    from: u64,
    last: u64,
    raw_bytes: u64,
    answer: tokio::task::JoinHandle<Result<Response, PassError>>,
}

/// The batches in flight, oldest first; the ones left when it is dropped
/// are aborted.
#[derive(Default)]
struct Window(std::collections::VecDeque<InFlight>);

impl Window {
    fn has_room(&self) -> bool {
        self.0.len() < WINDOW_BATCHES
    }

    fn push(&mut self, f: InFlight) {
        self.0.push_back(f);
    }

    fn oldest(&mut self) -> Option<&mut InFlight> {
        self.0.front_mut()
    }

    fn pop(&mut self) -> Option<InFlight> {
        self.0.pop_front()
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        for f in &self.0 {
            f.answer.abort();
        }
    }
}

/// A resync: the DR side opens it at the journal's oldest record; the tree
/// comparison of the live image runs while the journal streams on top; the
/// commit names the last record appended once every chunk was read.
async fn resync(
    site: &Arc<Site>,
    h: &Arc<VolumeHandle>,
    vs: &Arc<VolumeStream>,
    conn: &Connection,
    ctx: &JobCtx,
) -> Result<(), PassError> {
    let (from_seq, incarnation) = vs
        .begin_resync()
        .map_err(|e| PassError::Protocol(format!("restarting the journal: {e}")))?;
    let rt = &h.run;
    {
        let mut st = rt.state.lock().unwrap_or_else(|p| p.into_inner());
        st.running = true;
        st.started += 1;
    }
    tracing::info!(volume = %h.name, from_seq, "resync by tree comparison");
    let outcome = async {
        // The replica exists (and takes this history) before the resync opens.
        let rec = h.record();
        let size = crate::volume::image::image_size(&rec.path)?;
        let r = exchange(
            site,
            conn,
            &Request::Open {
                volume: rec.name.clone(),
                size,
                chunk_size: rec.chunk_size,
                mode: rec.mode,
                history: rec.history.clone(),
            },
        )
        .await?;
        if !matches!(r, Response::Opened { .. }) {
            return Err(PassError::Protocol(format!("expected Opened, got {r:?}")));
        }
        let r = exchange(
            site,
            conn,
            &Request::ResyncBegin {
                volume: h.name.clone(),
                from_seq,
                incarnation,
            },
        )
        .await?;
        if !matches!(r, Response::Ok) {
            return Err(PassError::Protocol(format!("expected Ok, got {r:?}")));
        }
        let pass = run_pass(
            site,
            conn.clone(),
            &rec,
            rt,
            Some(Fuzzy { stream: vs.clone() }),
        );
        let stream = pump(site, h, vs, conn, ctx, true);
        tokio::pin!(stream);
        let report = tokio::select! {
            r = pass => r?,
            r = &mut stream => {
                r?;
                // The journal filled up (or replication paused) during the
                // resync: it starts again with the journal as it is now.
                return Err(PassError::Superseded);
            }
        };
        site.record_pass(h, report.clone())?;
        Ok(report)
    }
    .await;
    let next = {
        let mut st = rt.state.lock().unwrap_or_else(|p| p.into_inner());
        st.running = false;
        st.finished += 1;
        rt.ended.notify_waiters();
        rt.progress.set_phase("streaming");
        match outcome {
            Ok(report) => {
                site.observe_pass(&h.name, &report);
                if vs.end_resync() {
                    tracing::info!(volume = %h.name, sent = report.chunks_sent(), changed_during = report.chunks_changed_during, ms = report.duration_ms, "resync complete; streaming");
                    st.last_error = None;
                    st.last_report = Some(report);
                    Ok(true)
                } else {
                    tracing::info!(volume = %h.name, "the resync committed, but a fallback superseded it meanwhile; it runs again");
                    st.last_error = Some(PassError::Superseded.to_string());
                    Ok(false)
                }
            }
            Err(PassError::Superseded) => {
                vs.resync_interrupted();
                st.last_error = Some(PassError::Superseded.to_string());
                Ok(false)
            }
            Err(e) => {
                vs.resync_interrupted();
                site.metrics
                    .passes
                    .with_label_values(&[h.name.as_str(), "failed"])
                    .inc();
                st.last_error = Some(e.to_string());
                Err(e)
            }
        }
    };
    if next? {
        ctx.healthy();
        // Stream on, from where the concurrent stream got.
        pump(site, h, vs, conn, ctx, false).await
    } else {
        Ok(())
    }
}

/// One request and its answer on a stream of its own, counted as journal traffic.
async fn exchange(site: &Site, conn: &Connection, req: &Request) -> Result<Response, PassError> {
    let (resp, b) = call(conn, req, site.frame_bytes_max())
        .await
        .map_err(|e| PassError::Link(e.to_string()))?;
    site.count_wire("journal", b.sent, b.received);
    match resp {
        Response::Error { code, message } => Err(PassError::Peer(code, message)),
        r => Ok(r),
    }
}
