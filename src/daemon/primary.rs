//! The primary's replication: the snapshot pass driver, its schedule, and verify.

use std::collections::HashSet;
use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use quinn::Connection;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::Site;
use super::runtime::VolumeRuntime;
use super::volume::VolumeHandle;
use super::worker::{Job, JobCtx};
use crate::hash::Hash;
use crate::proto::messages::{
    ChunkHave, ChunkPut, ErrorCode, PUT_CHUNKS_MAX, PUT_NODES_MAX, Request, Response,
};
use crate::proto::pass::{Ask, Compare, ToSend};
use crate::store::encode_chunk_at;
use crate::store::state::{PassReport, VolumeRecord};
use crate::store::tree::Tree;
use crate::transport::endpoint::{CallBytes, call};
use crate::volume::{delta, image};

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("the link to the DR site is down; the pass will run when it is back")]
    LinkDown,
    #[error("DR site: {1}")]
    Peer(ErrorCode, String),
    #[error("the resync was superseded (the journal filled up during it); it starts again")]
    Superseded,
    #[error("link: {0}")]
    Link(String),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(
        "image {0} changed while the pass read it; the next pass will pick up the new state (for a live image, replicate a snapshot of it, or use async mode)"
    )]
    ImageChanged(String),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("protocol: {0}")]
    Protocol(String),
}

/// A pass's link and counters.
pub(super) struct Wire {
    conn: Connection,
    frame_max: u64,
    bytes: std::sync::Mutex<CallBytes>,
    site: Arc<Site>,
}

impl Wire {
    /// The link to the peer, for a one-off exchange.
    pub(super) fn to_peer(site: &Arc<Site>) -> Result<Wire, PassError> {
        let conn = site.link().ok_or(PassError::LinkDown)?;
        let frame_max = site.frame_bytes_max();
        Ok(Wire {
            conn,
            frame_max,
            bytes: Default::default(),
            site: site.clone(),
        })
    }

    pub(super) async fn call(&self, req: &Request) -> Result<Response, PassError> {
        let (resp, b) = call(&self.conn, req, self.frame_max)
            .await
            .map_err(|e| PassError::Link(e.to_string()))?;
        let mut t = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        t.sent += b.sent;
        t.received += b.received;
        drop(t);
        self.site
            .count_wire(crate::daemon::link::traffic_kind(req), b.sent, b.received);
        match resp {
            Response::Error { code, message } => Err(PassError::Peer(code, message)),
            r => Ok(r),
        }
    }
}

pub(super) fn unexpected(what: &str, r: &Response) -> PassError {
    PassError::Protocol(
        format!("expected {what}, got {r:?}")
            .chars()
            .take(200)
            .collect(),
    )
}

/// A pass over a live, journaled image (the seed or a resync of a
/// continuous volume): chunks may change while they are read, and the
/// journal from the resync's start streams on top. The commit's consistency
/// marker comes from the stream once every chunk sent was read.
pub struct Fuzzy {
    pub stream: Arc<super::stream::VolumeStream>,
}

/// One snapshot pass of `rec` to the DR site over `conn`.
pub async fn run_pass(
    site: &Arc<Site>,
    conn: Connection,
    rec: &VolumeRecord,
    rt: &Arc<VolumeRuntime>,
    fuzzy: Option<Fuzzy>,
) -> Result<PassReport, PassError> {
    // A bounded number of passes at once, site-wide: each reads its image
    // on several threads (hundreds of volumes seeding together would not).
    rt.progress.set_phase("queued");
    let _permit = site
        .passes
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| PassError::Protocol(e.to_string()))?;
    let started_at = Instant::now();
    let udp0 = conn.stats().udp_tx.bytes + conn.stats().udp_rx.bytes;
    let limits = site
        .config
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .limits
        .clone();
    let wire = Arc::new(Wire {
        conn: conn.clone(),
        frame_max: limits.frame_bytes_max.0,
        bytes: Default::default(),
        site: site.clone(),
    });
    let path = rec.path.clone();
    let size = image::image_size(&path)?;
    rt.progress.reset(size);

    // 1. Scan the image into a tree (a live volume's written chunks only,
    //    when it can).
    let chunk_size = rec.chunk_size;
    let rt2 = rt.clone();
    let p2 = path.clone();
    let live = fuzzy.as_ref().map(|f| f.stream.clone());
    let (tree, scan) = tokio::task::spawn_blocking(move || {
        let progress = &rt2.progress.scanned;
        match live {
            Some(vs) => vs.scan(&p2, chunk_size, progress),
            None => image::scan(&p2, chunk_size, progress),
        }
    })
    .await
    .map_err(|e| PassError::Protocol(e.to_string()))??;
    let mut tree = Arc::new(tree);
    let mut overrides: Vec<(u64, Hash)> = Vec::new();
    let mut report = PassReport {
        root: tree.root,
        started: crate::util::now_unix(),
        size: tree.size,
        bytes_read: scan.bytes_read,
        chunks_total: tree.leaves().len() as u64,
        chunks_zero: scan.zero,
        ..Default::default()
    };

    report.phase_ms.scan = started_at.elapsed().as_millis() as u64;
    let mut mark = Instant::now();
    // The milliseconds from the last lap to `end`, which starts the next.
    let mut lap = |end: Instant| {
        let ms = end.saturating_duration_since(mark).as_millis() as u64;
        mark = end;
        ms
    };

    // 2. Open the volume at the DR site.
    rt.progress.set_phase("comparing");
    let r = wire
        .call(&Request::Open {
            volume: rec.name.clone(),
            size: tree.size,
            chunk_size,
            mode: rec.mode,
            history: rec.history.clone(),
        })
        .await?;
    let Response::Opened { committed } = r else {
        return Err(unexpected("Opened", &r));
    };

    if committed != Some(tree.root) {
        // 3. Compare top-down; send missing nodes; list missing chunks.
        // 4. Send the chunks as the answers name them: batches built on
        //    blocking threads, carried on parallel streams, bounded by
        //    inflight_bytes_max. The DR side reads the delta bases of one
        //    question while the chunks of the last go.
        let mut cmp = Compare::new(&tree);
        let to = SendTo {
            wire: &wire,
            tree: &tree,
            path: &path,
            volume: &rec.name,
            limits: &limits,
            rt,
            fuzzy: fuzzy.is_some(),
        };
        let (mut segmenter, segments) = Segmenter::new(&limits, rt);
        let compare = async {
            // Node levels go one question at a time; chunk questions travel
            // several at once (CHUNK_ASKS_INFLIGHT) to hide the round trips.
            let mut asks: JoinSet<(u64, Result<Response, PassError>)> = JoinSet::new();
            loop {
                while let Some((id, ask)) = cmp.poll_ask(&tree) {
                    match ask {
                        Ask::Nodes { hashes, .. } => {
                            let r = wire.call(&Request::HaveNodes { hashes }).await?;
                            let Response::Have(have) = r else {
                                return Err(unexpected("Have", &r));
                            };
                            let missing = cmp
                                .handle_nodes(id, &tree, &have)
                                .map_err(|e| PassError::Protocol(e.to_string()))?;
                            put_nodes(&wire, &rec.name, &tree, &missing).await?;
                        }
                        Ask::Chunks { items } => {
                            let (w, volume) = (wire.clone(), rec.name.clone());
                            asks.spawn(async move {
                                (id, w.call(&Request::HaveChunks { volume, items }).await)
                            });
                        }
                    }
                }
                let Some(done) = asks.join_next().await else {
                    break;
                };
                let (id, r) = done.map_err(|e| PassError::Protocol(e.to_string()))?;
                let r = r?;
                let Response::Chunks(have) = r else {
                    return Err(unexpected("Chunks", &r));
                };
                let items = cmp
                    .handle_chunks(id, have)
                    .map_err(|e| PassError::Protocol(e.to_string()))?;
                for item in items {
                    segmenter.push(&tree, item);
                }
            }
            if !cmp.is_done() {
                return Err(PassError::Protocol(
                    "tree comparison stopped before it was done".into(),
                ));
            }
            // The last batch goes, and the send ends after it.
            drop(segmenter);
            rt.progress.set_phase("sending");
            Ok(Instant::now())
        };
        let send = send_chunks(&to, segments, &mut report);
        // The compare's time includes the sends that went during it.
        let (compared, sent) = tokio::try_join!(compare, send)?;
        report.phase_ms.compare = lap(compared);

        let rounds_max = if fuzzy.is_some() { 8 } else { 3 };
        let mut rounds = 1;
        let mut taken = Rounds::default();
        let mut pending = taken.after(&tree, sent, &mut report, &mut overrides);
        while !pending.is_empty() {
            rounds += 1;
            if rounds > rounds_max {
                return Err(PassError::Protocol(
                    "the DR side keeps refusing rebuilt chunks (or the image keeps changing under the pass)".into(),
                ));
            }
            let (mut segmenter, segments) = Segmenter::new(&limits, rt);
            for item in pending {
                segmenter.push(&tree, item);
            }
            drop(segmenter);
            let sent = send_chunks(&to, segments, &mut report).await?;
            pending = taken.after(&tree, sent, &mut report, &mut overrides);
        }
    }

    if !overrides.is_empty() {
        // Chunks written since the scan went with their new content: name
        // them in the tree, and send the nodes on their paths.
        let t = patched_tree(&tree, &overrides);
        let mut wanted: Vec<(usize, usize)> = Vec::new();
        for level in 1..=t.height() as usize {
            let mut idx: Vec<usize> = overrides
                .iter()
                .map(|&(i, _)| (i as usize) / crate::store::tree::FANOUT.pow(level as u32))
                .collect();
            idx.sort_unstable();
            idx.dedup();
            wanted.extend(idx.into_iter().map(|i| (level, i)));
        }
        put_nodes(&wire, &rec.name, &t, &wanted).await?;
        tree = Arc::new(t);
        report.root = tree.root;
    }
    report.phase_ms.send = lap(Instant::now());
    // Everything neither zero nor sent was already at the DR side, or repeated within the image.
    report.chunks_deduped =
        (report.chunks_total - report.chunks_zero).saturating_sub(report.chunks_sent());

    // 5. Commit: the DR side writes its image, fsyncs and records a point.
    //    A fuzzy pass names the last record appended now, after every chunk
    //    it sent was read: chunks read after the scan may hold writes up to
    //    here, so the DR image is a flush state only once the stream passes it.
    let fuzzy = match &fuzzy {
        Some(f) => Some(f.stream.resync_marker().ok_or_else(|| {
            PassError::Protocol("no resync is running for this fuzzy pass".into())
        })?),
        None => None,
    };
    rt.progress.set_phase("committing");
    let r = wire
        .call(&Request::Commit {
            volume: rec.name.clone(),
            root_node: tree.root_node().encode(),
            fuzzy,
        })
        .await?;
    match r {
        Response::Committed { point } if fuzzy.is_none() => report.point = Some(point.id),
        Response::CommittedFuzzy if fuzzy.is_some() => {}
        r => return Err(unexpected("Committed", &r)),
    }
    report.phase_ms.commit = lap(Instant::now());
    let b = *wire.bytes.lock().unwrap_or_else(|p| p.into_inner());
    report.bytes_sent = b.sent;
    report.bytes_received = b.received;
    report.wire_bytes =
        (conn.stats().udp_tx.bytes + conn.stats().udp_rx.bytes).saturating_sub(udp0);
    report.duration_ms = started_at.elapsed().as_millis() as u64;
    rt.progress.set_phase("done");
    Ok(report)
}

/// Sends the inner nodes `(level, index)` of `tree` the DR side lacks, in batches.
async fn put_nodes(
    wire: &Wire,
    volume: &str,
    tree: &Tree,
    which: &[(usize, usize)],
) -> Result<(), PassError> {
    for batch in which.chunks(PUT_NODES_MAX) {
        let nodes = batch
            .iter()
            .map(|&(l, i)| tree.node(l, i).encode())
            .collect();
        let r = wire
            .call(&Request::PutNodes {
                volume: volume.to_string(),
                nodes,
            })
            .await?;
        if !matches!(r, Response::Ok) {
            return Err(unexpected("Ok", &r));
        }
    }
    Ok(())
}

/// `tree` with some leaves renamed.
fn patched_tree(tree: &Tree, overrides: &[(u64, Hash)]) -> Tree {
    let mut leaves = tree.leaves().to_vec();
    for &(i, h) in overrides {
        if let Some(l) = leaves.get_mut(i as usize) {
            *l = h;
        }
    }
    Tree::build(tree.size, tree.chunk_size, leaves)
}

/// Threads encoding (reading, hashing, compressing) chunk batches in a pass.
const ENCODE_THREADS_MAX: usize = 4;

/// What the rounds of sending of a pass did so far.
#[derive(Default)]
struct Rounds {
    /// Chunks the DR side has now, by name: sent as scanned.
    delivered: HashSet<Hash>,
    /// Places whose chunk changed under the pass and went with its new content.
    overridden: HashSet<u64>,
}

impl Rounds {
    /// Takes in one round (`overrides`: the chunks that changed under the
    /// pass, with their new names) and returns what the next must send.
    fn after(
        &mut self,
        tree: &Tree,
        sent: Sent,
        report: &mut PassReport,
        overrides: &mut Vec<(u64, Hash)>,
    ) -> Vec<ToSend> {
        report.chunks_changed_during += sent.changed.len() as u64;
        self.delivered.extend(sent.delivered);
        self.overridden.extend(sent.changed.iter().map(|&(i, _)| i));
        let retry: HashSet<Hash> = sent.retry.into_iter().collect();
        let whole = |i: usize, h: &Hash| ToSend {
            index: i as u64,
            hash: *h,
            have: ChunkHave::Missing,
        };
        // Resend whole what could not be rebuilt from a delta.
        let mut pending = tree
            .leaves()
            .iter()
            .enumerate()
            .filter(|(i, h)| retry.contains(h) && !self.overridden.contains(&(*i as u64)))
            .map(|(i, h)| whole(i, h))
            .collect::<Vec<_>>();
        // A chunk that changed under the pass went with its new content;
        // the content it had may still be needed where the same chunk
        // sits elsewhere in the image (asked about once, by name): send
        // it from one of those places.
        let lost: HashSet<Hash> = sent
            .changed
            .iter()
            .map(|&(i, _)| tree.leaves()[i as usize])
            .filter(|h| !self.delivered.contains(h))
            .collect();
        if !lost.is_empty() {
            pending.extend(
                tree.leaves()
                    .iter()
                    .enumerate()
                    .filter(|(i, h)| lost.contains(h) && !self.overridden.contains(&(*i as u64)))
                    .map(|(i, h)| whole(i, h)),
            );
        }
        overrides.extend(sent.changed);
        let mut seen = HashSet::new();
        pending.retain(|s| seen.insert(s.hash));
        pending
    }
}

/// A batch ready to travel, with its encoded size for the in-flight bound.
struct Batch {
    items: Vec<ChunkPut>,
    /// Fuzzy passes: chunks that changed since the scan, with their new
    /// names (`Hash::ZERO` for a chunk that became all zeros: nothing is sent).
    changed: Vec<(u64, Hash)>,
    /// Names of the chunks sent as they were scanned.
    delivered: Vec<Hash>,
    encoded: u64,
    raw: u64,
    /// The zstd level its chunks were encoded at.
    level: i32,
}

/// What one round of sending did.
struct Sent {
    /// Deltas the DR side could not rebuild: send these whole.
    retry: Vec<Hash>,
    changed: Vec<(u64, Hash)>,
    delivered: Vec<Hash>,
}

/// Cuts the chunks to send into the batches `send_chunks` encodes, as they
/// come (a compare's answers, or a round's list), and counts their bytes
/// for the operator's progress; the pass's phase is "sending" from the
/// first batch on. The channel is not bounded: it holds at most the
/// missing chunks of the tree, one `ToSend` each, as the list that a
/// comparison used to collect before its sends did.
struct Segmenter {
    tx: std::sync::mpsc::Sender<Vec<ToSend>>,
    cur: Vec<ToSend>,
    raw: u64,
    batch_max: u64,
    rt: Arc<VolumeRuntime>,
    sending: bool,
}

impl Segmenter {
    fn new(
        limits: &crate::config::Limits,
        rt: &Arc<VolumeRuntime>,
    ) -> (Segmenter, std::sync::mpsc::Receiver<Vec<ToSend>>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let s = Segmenter {
            tx,
            cur: Vec::new(),
            raw: 0,
            batch_max: limits.batch_bytes_max.0,
            rt: rt.clone(),
            sending: false,
        };
        (s, rx)
    }

    fn push(&mut self, tree: &Tree, item: ToSend) {
        let (a, b) = tree.chunk_range(item.index);
        self.raw += b - a;
        self.rt.progress.to_send.fetch_add(b - a, Ordering::Relaxed);
        self.cur.push(item);
        if self.raw >= self.batch_max || self.cur.len() >= PUT_CHUNKS_MAX {
            self.flush();
        }
    }

    /// Hands over the batch begun, if any: what is listed goes now, without
    /// waiting for a batch to fill.
    fn flush(&mut self) {
        if !self.cur.is_empty() {
            if !self.sending {
                self.sending = true;
                self.rt.progress.set_phase("sending");
            }
            // A send that ended (on an error) no longer takes any: the
            // pass reports its error.
            let _ = self.tx.send(std::mem::take(&mut self.cur));
            self.raw = 0;
        }
    }
}

/// The wall time during which every encoding worker of a send waited for
/// a batch to encode (the comparison's answers): that wait is neither the
/// cores' time nor the link's when the zstd level is chosen.
struct Starved {
    workers: usize,
    /// Workers waiting; since when all of them have been; the time all of
    /// them waited before.
    state: std::sync::Mutex<(usize, Option<Instant>, Duration)>,
}

impl Starved {
    fn new(workers: usize) -> Starved {
        Starved {
            workers,
            state: Default::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, (usize, Option<Instant>, Duration)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enter(&self) {
        let mut s = self.state();
        s.0 += 1;
        if s.0 == self.workers {
            s.1 = Some(Instant::now());
        }
    }

    fn leave(&self) {
        let mut s = self.state();
        if let Some(since) = s.1.take() {
            s.2 += since.elapsed();
        }
        s.0 = s.0.saturating_sub(1);
    }

    /// All the time every worker waited so far.
    fn total(&self) -> Duration {
        let s = self.state();
        s.2 + s.1.map_or(Duration::ZERO, |since| since.elapsed())
    }
}

impl Drop for Segmenter {
    fn drop(&mut self) {
        self.flush();
    }
}

/// What every round of a pass's sending shares.
#[derive(Clone, Copy)]
struct SendTo<'a> {
    wire: &'a Arc<Wire>,
    tree: &'a Arc<Tree>,
    path: &'a std::path::Path,
    volume: &'a str,
    limits: &'a crate::config::Limits,
    rt: &'a Arc<VolumeRuntime>,
    fuzzy: bool,
}

/// One round of sending: the chunks `segments` lists, as they come.
async fn send_chunks(
    to: &SendTo<'_>,
    segments: std::sync::mpsc::Receiver<Vec<ToSend>>,
    report: &mut PassReport,
) -> Result<Sent, PassError> {
    let SendTo {
        wire,
        tree,
        path,
        volume,
        limits,
        rt,
        fuzzy,
    } = *to;
    let mut changed: Vec<(u64, Hash)> = Vec::new();
    let mut delivered: Vec<Hash> = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(Batch, BatchStats), PassError>>(2);
    // The zstd level, fixed or adapted as the batches go (see `Balance`).
    let auto = limits.zstd_level == 0;
    let level = Arc::new(std::sync::atomic::AtomicI32::new(if auto {
        ZSTD_AUTO_START
    } else {
        i32::from(limits.zstd_level)
    }));
    let level2 = level.clone();
    let (tree2, path2) = (tree.clone(), path.to_path_buf());
    // Workers take the segments as they come (cut by a `Segmenter`),
    // encoding several batches in parallel.
    let segments = std::sync::Mutex::new(segments);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(ENCODE_THREADS_MAX);
    let starved = Arc::new(Starved::new(workers));
    let starved2 = starved.clone();
    let producer = tokio::task::spawn_blocking(move || {
        let (segments, starved) = (&segments, &starved2);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                let tx = tx.clone();
                let (tree, path, level) = (&tree2, &path2, &level2);
                scope.spawn(move || {
                    let f = match File::open(path) {
                        Ok(f) => f,
                        Err(e) => {
                            let err = image::ImageError::Io {
                                path: path.display().to_string(),
                                op: "open",
                                source: e,
                            };
                            let _ = tx.blocking_send(Err(PassError::Image(err)));
                            return;
                        }
                    };
                    loop {
                        // Ends once the segmenter is done and all are taken,
                        // or once the send ended (on an error: it no longer
                        // takes batches), within a tenth of a second.
                        starved.enter();
                        let next = {
                            let segments = segments.lock().unwrap_or_else(|p| p.into_inner());
                            loop {
                                if tx.is_closed() {
                                    break None;
                                }
                                match segments.recv_timeout(Duration::from_millis(100)) {
                                    Ok(seg) => break Some(seg),
                                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                                        if !tx.is_closed() => {}
                                    Err(_) => break None,
                                }
                            }
                        };
                        starved.leave();
                        let Some(seg) = next else { return };
                        if tx.is_closed() {
                            return;
                        }
                        let lvl = level.load(Ordering::Relaxed);
                        let r = build_batch(&f, path, tree, &seg, fuzzy, lvl);
                        let failed = r.is_err();
                        if tx.blocking_send(r).is_err() || failed {
                            return;
                        }
                    }
                });
            }
        });
    });

    // Permits count KiB so that a large in-flight bound fits a u32.
    let window = Arc::new(Semaphore::new(
        (limits.inflight_bytes_max.0 / 1024) as usize,
    ));
    let streams = Arc::new(Semaphore::new(limits.streams_max as usize));
    let mut calls: JoinSet<Result<(Response, u64), PassError>> = JoinSet::new();
    let mut retry = Vec::new();
    let mut first_err: Option<PassError> = None;
    let handle = |r: Result<Result<(Response, u64), PassError>, tokio::task::JoinError>,
                  retry: &mut Vec<Hash>|
     -> Result<(), PassError> {
        let (resp, raw) = r.map_err(|e| PassError::Protocol(e.to_string()))??;
        let Response::Stored(res) = resp else {
            return Err(unexpected("Stored", &resp));
        };
        if let Some((h, why)) = res.rejected.first() {
            return Err(PassError::Peer(
                ErrorCode::Refused,
                format!("chunk {} refused: {why}", h.short()),
            ));
        }
        retry.extend(res.need_full);
        rt.progress.sent.fetch_add(raw, Ordering::Relaxed);
        Ok(())
    };
    let mut balance = Balance::default();
    loop {
        let t = std::time::Instant::now();
        let starved_before = starved.total();
        let Some(item) = rx.recv().await else { break };
        // The wait, less the time every worker waited for a batch to encode
        // during it.
        let idle = starved.total().saturating_sub(starved_before);
        balance.cores += t.elapsed().saturating_sub(idle);
        let (batch, st) = match item {
            Ok(b) => b,
            Err(e) => {
                first_err = Some(e);
                break;
            }
        };
        rt.chunks_sent_total
            .fetch_add(st.full + st.delta, Ordering::Relaxed);
        report.chunks_sent_full += st.full;
        report.chunks_sent_delta += st.delta;
        report.bytes_changed += st.changed;
        report.bytes_encoded += batch.encoded;
        changed.extend(batch.changed.iter().copied());
        delivered.extend(batch.delivered.iter().copied());
        let kib = (batch.encoded / 1024 + 1).min(limits.inflight_bytes_max.0 / 1024) as u32;
        let t = std::time::Instant::now();
        let permit = window
            .clone()
            .acquire_many_owned(kib)
            .await
            .map_err(|e| PassError::Protocol(e.to_string()))?;
        let stream = streams
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| PassError::Protocol(e.to_string()))?;
        balance.link += t.elapsed();
        balance.sizes(batch.level, batch.raw, batch.encoded);
        if auto {
            balance.step(&level);
        }
        while let Some(done) = calls.try_join_next() {
            if let Err(e) = handle(done, &mut retry) {
                first_err = Some(e);
            }
        }
        if first_err.is_some() {
            break;
        }
        let (w, vol, raw) = (wire.clone(), volume.to_string(), batch.raw);
        calls.spawn(async move {
            let r = w
                .call(&Request::PutChunks {
                    volume: vol,
                    items: batch.items,
                })
                .await;
            drop((permit, stream));
            r.map(|resp| (resp, raw))
        });
    }
    drop(rx);
    report.zstd_level = level.load(Ordering::Relaxed);
    while let Some(done) = calls.join_next().await {
        if let Err(e) = handle(done, &mut retry) {
            first_err.get_or_insert(e);
        }
    }
    // A worker that panicked lost its batch: the pass fails on that, not
    // on the commit's missing chunks.
    if let Err(e) = producer.await {
        first_err.get_or_insert(PassError::Protocol(format!("a chunk encoder failed: {e}")));
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(Sent {
            retry,
            changed,
            delivered,
        }),
    }
}

/// Where an automatic zstd level starts: 1, the cheapest, so that a pass
/// through a link faster than the cores (a LAN, loopback) does not spend
/// its first 16 batches at levels 3 and 2 on the way down; through a slow
/// link the level climbs at the first decision, the cores idle anyway.
const ZSTD_AUTO_START: i32 = 1;
/// The levels an automatic choice moves between (above 9 a level costs
/// several times the CPU for a few percent of bytes). zstd's fast levels
/// below 1 were measured and left out: on the VM image of
/// docs/benchmarks.md, -3 cut a loopback seed's CPU by 4 % for 21 % more
/// bytes on the wire and in the DR store.
const ZSTD_AUTO_RANGE: std::ops::RangeInclusive<i32> = 1..=9;
/// Batches between two decisions.
const ZSTD_AUTO_EVERY: u32 = 8;

/// What held the sender back over the last batches: waiting for encoded
/// batches (the cores) or for the in-flight window and a stream (the
/// link). The level goes down while the cores are the bottleneck and up
/// while the link is, so that neither sits idle.
/// A level goes up only while it saves at least this fraction of the bytes
/// the level below it sends: past that, CPU of a production host would buy
/// next to nothing.
const ZSTD_AUTO_GAIN_MIN: f64 = 0.02;
/// Up to this level (zstd's default) a link-bound pass climbs whatever a
/// step saves.
const ZSTD_AUTO_FREE_MAX: i32 = 3;

#[derive(Default)]
struct Balance {
    cores: Duration,
    link: Duration,
    batches: u32,
    /// Per level: raw and encoded bytes of the batches encoded at it.
    by_level: [(u64, u64); 20],
    /// The highest level worth its CPU on this data, once found.
    ceiling: Option<i32>,
}

impl Balance {
    fn sizes(&mut self, level: i32, raw: u64, encoded: u64) {
        if let Some(s) = usize::try_from(level)
            .ok()
            .and_then(|l| self.by_level.get_mut(l))
        {
            s.0 += raw;
            s.1 += encoded;
        }
    }

    /// Encoded bytes per raw byte at `level`, once it has seen some.
    fn ratio(&self, level: i32) -> Option<f64> {
        let (raw, enc) = *usize::try_from(level)
            .ok()
            .and_then(|l| self.by_level.get(l))?;
        (raw >= 1 << 20).then(|| enc as f64 / raw as f64)
    }

    fn step(&mut self, level: &std::sync::atomic::AtomicI32) {
        self.batches += 1;
        if self.batches < ZSTD_AUTO_EVERY {
            return;
        }
        let now = level.load(Ordering::Relaxed);
        let next = if self.link > self.cores * 2 {
            match (self.ratio(now - 1), self.ratio(now)) {
                // The last step up bought too little: back, and no higher.
                // Not below zstd's default level: 2 buys little over 1 on
                // much data where 3 (another match finder) buys more.
                (Some(below), Some(here))
                    if now > ZSTD_AUTO_FREE_MAX && here > below * (1.0 - ZSTD_AUTO_GAIN_MIN) =>
                {
                    self.ceiling = Some(now - 1);
                    now - 1
                }
                _ => (now + 1).min(self.ceiling.unwrap_or(i32::MAX)),
            }
        } else if self.cores > self.link * 2 {
            now - 1
        } else {
            now
        };
        let next = next.clamp(*ZSTD_AUTO_RANGE.start(), *ZSTD_AUTO_RANGE.end());
        if next != now {
            tracing::debug!(
                from = now,
                to = next,
                cores_ms = self.cores.as_millis() as u64,
                link_ms = self.link.as_millis() as u64,
                "zstd level changed"
            );
            level.store(next, Ordering::Relaxed);
        }
        self.cores = Duration::ZERO;
        self.link = Duration::ZERO;
        self.batches = 0;
    }
}

#[derive(Debug, Default)]
struct BatchStats {
    full: u64,
    delta: u64,
    changed: u64,
    raw: u64,
}

impl BatchStats {
    fn add(&mut self, o: &BatchStats) {
        self.full += o.full;
        self.delta += o.delta;
        self.changed += o.changed;
        self.raw += o.raw;
    }
}

/// Encodes the chunks of one batch.
fn build_batch(
    f: &File,
    path: &std::path::Path,
    tree: &Tree,
    seg: &[ToSend],
    fuzzy: bool,
    level: i32,
) -> Result<(Batch, BatchStats), PassError> {
    let mut batch = Batch {
        changed: Vec::new(),
        delivered: Vec::new(),
        items: Vec::with_capacity(seg.len()),
        encoded: 0,
        raw: 0,
        level,
    };
    let mut stats = BatchStats::default();
    for s in seg {
        let (put, st) = match build_put(f, path, tree, s, level) {
            Err(PassError::ImageChanged(_)) if fuzzy => {
                // Send what is there now; the journal replays the writes since.
                let data = image::read_chunk(f, path, tree, s.index)?;
                if crate::hash::is_all_zero(&data) {
                    // A hole now: named so, never sent.
                    batch.changed.push((s.index, Hash::ZERO));
                    continue;
                }
                let hash = Hash::of_chunk(&data);
                batch.changed.push((s.index, hash));
                let raw = data.len() as u64;
                let put = ChunkPut::Full {
                    hash,
                    record: encode_chunk_at(&data, level),
                };
                let st = BatchStats {
                    full: 1,
                    changed: raw,
                    raw,
                    ..Default::default()
                };
                (put, st)
            }
            r => {
                let r = r?;
                batch.delivered.push(s.hash);
                r
            }
        };
        batch.raw += st.raw;
        batch.encoded += match &put {
            ChunkPut::Full { record, .. } | ChunkPut::Delta { record, .. } => {
                record.len() as u64 + 64
            }
        };
        stats.add(&st);
        batch.items.push(put);
    }
    Ok((batch, stats))
}

/// Reads one chunk, checks it still has its scanned name, and encodes it
/// whole or, when the DR side has a base here and under half the blocks
/// changed, as a delta of the changed 4 KiB blocks.
fn build_put(
    f: &File,
    path: &std::path::Path,
    tree: &Tree,
    s: &ToSend,
    level: i32,
) -> Result<(ChunkPut, BatchStats), PassError> {
    let data = image::read_chunk(f, path, tree, s.index)?;
    if Hash::of_chunk(&data) != s.hash {
        return Err(PassError::ImageChanged(path.display().to_string()));
    }
    let raw = data.len() as u64;
    if let ChunkHave::MissingWithBase { base, blocks } = &s.have
        && let Some(changed) = delta::changed_blocks(&data, blocks)
        && changed.len() * 2 < blocks.len()
    {
        let bytes = delta::extract(&data, &changed);
        let st = BatchStats {
            delta: 1,
            changed: bytes.len() as u64,
            raw,
            ..Default::default()
        };
        return Ok((
            ChunkPut::Delta {
                hash: s.hash,
                base: *base,
                len: raw as u32,
                blocks: changed,
                record: encode_chunk_at(&bytes, level),
            },
            st,
        ));
    }
    Ok((
        ChunkPut::Full {
            hash: s.hash,
            record: encode_chunk_at(&data, level),
        },
        BatchStats {
            full: 1,
            changed: raw,
            raw,
            ..Default::default()
        },
    ))
}

/// How long a pass waits for a link that is down before it counts as `link_down`.
const LINK_WAIT: Duration = Duration::from_secs(10);

/// Waits up to `max` for the link (on its changes, not by polling).
async fn wait_for_link(site: &Site, max: Duration) -> Option<Connection> {
    let mut rx = site.link_watch();
    let until = tokio::time::Instant::now() + max;
    loop {
        if let Some(c) = site.link() {
            return Some(c);
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return None },
            _ = tokio::time::sleep_until(until) => return site.link(),
        }
    }
}

/// Starts the pass job of a snapshot volume: a pass every interval and on demand.
pub fn spawn_passes(site: &Arc<Site>, h: &Arc<VolumeHandle>) {
    let (site, h2) = (site.clone(), h.clone());
    let job = Job::spawn("passes", &h.name, site.job_metrics(), move |ctx| {
        schedule(site.clone(), h2.clone(), ctx)
    });
    h.jobs.add(job);
}

/// Runs passes for one primary volume: every interval and on demand. A
/// failed pass is recorded (status, `ferry_passes_total`) and the next one
/// runs on schedule; the job itself ends only when told to stop.
async fn schedule(site: Arc<Site>, h: Arc<VolumeHandle>, mut ctx: JobCtx) -> Result<(), String> {
    let rt = h.run.clone();
    let name = h.name.clone();
    let mut repl_rx = h.replicate_watch();
    loop {
        if !*repl_rx.borrow_and_update() {
            tokio::select! {
                _ = repl_rx.changed() => continue,
                _ = ctx.stopped() => return Ok(()),
            }
        }
        let rec = h.record();
        let interval = Duration::from_millis(rec.interval_ms.max(1000));
        {
            let mut st = rt.state.lock().unwrap_or_else(|p| p.into_inner());
            st.running = true;
            st.started += 1;
        }
        // A link that is down is often seconds from up (at start, or while
        // the dialer redials a restarted peer): give it that long first.
        let link = tokio::select! {
            c = wait_for_link(&site, LINK_WAIT) => c,
            _ = ctx.stopped() => return Ok(()),
        };
        let result = match link {
            None => Err(PassError::LinkDown),
            Some(conn) => tokio::select! {
                r = run_pass(&site, conn, &rec, &rt, None) => r,
                _ = ctx.stopped() => return Ok(()),
            },
        };
        let outcome = match result {
            Ok(report) => site
                .record_pass(&h, report.clone())
                .map(|_| report)
                .map_err(PassError::from),
            Err(e) => Err(e),
        };
        {
            let mut st = rt.state.lock().unwrap_or_else(|p| p.into_inner());
            st.running = false;
            st.finished += 1;
            rt.ended.notify_waiters();
            match outcome {
                Ok(report) => {
                    site.observe_pass(&name, &report);
                    tracing::info!(volume = %name, sent = report.chunks_sent(), deduped = report.chunks_deduped, bytes_sent = report.bytes_sent, ms = report.duration_ms, "pass complete");
                    st.last_error = None;
                    st.last_report = Some(report);
                    ctx.healthy();
                }
                Err(e) => {
                    site.metrics
                        .passes
                        .with_label_values(&[
                            name.as_str(),
                            if matches!(e, PassError::LinkDown) {
                                "link_down"
                            } else {
                                "failed"
                            },
                        ])
                        .inc();
                    tracing::warn!(volume = %name, error = %e, "pass failed");
                    if matches!(e, PassError::Store(_)) {
                        // The site's own store failed: the job's error too.
                        ctx.error(&e.to_string());
                    }
                    st.last_error = Some(e.to_string());
                }
            }
        }
        rt.progress.set_phase("idle");
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = rt.trigger.notified() => {}
            _ = ctx.stopped() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicI32;

    fn run(b: &mut Balance, level: &AtomicI32, cores_ms: u64, link_ms: u64) {
        for _ in 0..ZSTD_AUTO_EVERY {
            b.cores += Duration::from_millis(cores_ms);
            b.link += Duration::from_millis(link_ms);
            b.step(level);
        }
    }

    #[test]
    fn the_level_rises_while_the_link_holds_back_and_falls_while_the_cores_do() {
        let level = AtomicI32::new(ZSTD_AUTO_START);
        let mut b = Balance::default();
        run(&mut b, &level, 1, 50);
        assert_eq!(level.load(Ordering::Relaxed), ZSTD_AUTO_START + 1);
        for _ in 0..20 {
            run(&mut b, &level, 1, 50);
        }
        assert_eq!(level.load(Ordering::Relaxed), 9, "capped");
        for _ in 0..20 {
            run(&mut b, &level, 50, 1);
        }
        assert_eq!(level.load(Ordering::Relaxed), 1, "floored");
        // Balanced: it stays.
        run(&mut b, &level, 10, 12);
        assert_eq!(level.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_link_bound_pass_climbs_to_zstds_default_level_whatever_level_2_saves() {
        let level = AtomicI32::new(ZSTD_AUTO_START);
        let mut b = Balance::default();
        b.sizes(1, 8 << 20, 4 << 20);
        run(&mut b, &level, 1, 50);
        assert_eq!(level.load(Ordering::Relaxed), 2);
        // Level 2 saves 0.5 % of level 1's bytes: on to 3 all the same.
        b.sizes(2, 8 << 20, (4 << 20) - (20 << 10));
        run(&mut b, &level, 1, 50);
        assert_eq!(level.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_level_that_saves_almost_nothing_is_stepped_back_from_and_not_tried_again() {
        let level = AtomicI32::new(3);
        let mut b = Balance::default();
        // Link-bound; level 3 sends 50 % of the raw bytes.
        b.sizes(3, 8 << 20, 4 << 20);
        run(&mut b, &level, 1, 50);
        assert_eq!(level.load(Ordering::Relaxed), 4);
        // Level 4 saves 1 % of that: back to 3, and it stays there.
        b.sizes(4, 8 << 20, (4 << 20) - (40 << 10));
        run(&mut b, &level, 1, 50);
        assert_eq!(level.load(Ordering::Relaxed), 3);
        for _ in 0..5 {
            run(&mut b, &level, 1, 50);
        }
        assert_eq!(level.load(Ordering::Relaxed), 3);
    }
}
