//! The DR side of replication: the state all replicas share, and the
//! answers to a primary's requests. A request reaches a volume only through
//! its handle, and only when the handle's role machine admits the peer's
//! writes (a replica in step with its primary). Passes are taken in here
//! (questions, nodes, verified chunks); commits are in `commit.rs`, the
//! continuous part of a replica in `replica_stream.rs`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use tokio::sync::Semaphore;

use super::recent::DeltaOver;
use super::replica_stream::{self, ReplicaStream};
use super::volume::{Session, VolumeHandle, refusal_code};
use super::worker::JobMetrics;
use crate::failover::epoch::History;
use crate::hash::Hash;
use crate::proto::messages::{ChunkHave, ChunkPut, ErrorCode, Request, Response, StoreResult};
use crate::store::gc::{self, GcReport, Retention};
use crate::store::state::{self, Mode, Role, VolumeRecord};
use crate::store::tree::{self, NODE_BYTES_MAX, Node, NodeSource, StoreNodes, chunk_range};
use crate::store::{CheckedChunk, ChunkStore, Op, StoreError, decode_checked, decode_chunk};
use crate::volume::{delta, image};

const PENDING_PREFIX: &str = "pnode/";
/// Bytes of contiguous seed chunks written into a replica image with one
/// call (past the page cache where the file system takes it).
const SEED_RUN_BYTES: usize = 1 << 20;

pub type Volumes = Arc<Mutex<HashMap<String, Arc<VolumeHandle>>>>;

/// What the DR side's replicas share: the store, directories, limits, the
/// garbage collection lock and the bounded pool their jobs' blocking work
/// runs on.
pub struct ReplicaSide {
    pub store: Arc<dyn ChunkStore>,
    pub replica_dir: PathBuf,
    pub redo_dir: PathBuf,
    pub fsync: bool,
    pub retention: Retention,
    pub journal_bytes_max: u64,
    pub point_interval: Duration,
    pub volumes: Volumes,
    /// Volumes the site may hold: a peer's `Open` of one more is refused.
    pub volumes_max: usize,
    /// Commits, applies and points take it shared; a collection, exclusive.
    pub gc_lock: RwLock<()>,
    /// Chunks deleted by collections (for the metric).
    pub gc_deleted: AtomicU64,
    gc_due: AtomicBool,
    /// Collections or reclaims that failed, and bytes reclaims gave back
    /// (for the metrics).
    pub gc_failures: AtomicU64,
    pub reclaimed_bytes: AtomicU64,
    /// The last collection's failure, until one succeeds; the last
    /// reclaim's, until a reclaim succeeds.
    gc_error: Mutex<Option<String>>,
    reclaim_error: Mutex<Option<String>>,
    /// A reclaim is wanted, and one is running (one at a time).
    reclaim_due: AtomicBool,
    reclaiming: AtomicBool,
    /// The last reclaim failed: the next collection reclaims even if it
    /// deleted nothing.
    reclaim_retry: AtomicBool,
    /// Blocking work of volume jobs (applying, points): a bounded pool.
    pub pool: Arc<Semaphore>,
    pub job_metrics: JobMetrics,
    /// Points that running drills stand on: retention keeps them.
    pub drill_pins: Mutex<std::collections::HashSet<(String, u64)>>,
    /// What passes may keep of their chunks in memory for their commits,
    /// and of where their delta bases are.
    recent_budget: Arc<AtomicU64>,
    bases_budget: Arc<AtomicU64>,
    rt: tokio::runtime::Handle,
    /// Itself, for spawning jobs from a request's thread.
    this: std::sync::OnceLock<std::sync::Weak<ReplicaSide>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error("{1}")]
    Refused(ErrorCode, String),
}

impl ReplicaError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ReplicaError::Refused(c, _) => *c,
            _ => ErrorCode::Internal,
        }
    }
}

/// A refusal the same request would meet again.
pub fn refused(msg: impl Into<String>) -> ReplicaError {
    ReplicaError::Refused(ErrorCode::Refused, msg.into())
}

fn malformed(msg: impl Into<String>) -> ReplicaError {
    ReplicaError::Refused(ErrorCode::Malformed, msg.into())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A volume's shape from the peer: a size a tree can describe and a chunk
/// size `ferry volume add` accepts (a power of two, 4 KiB to 4 MiB).
fn check_shape(size: u64, chunk_size: u32) -> Result<(), ReplicaError> {
    if size > tree::VOLUME_BYTES_MAX {
        return Err(malformed(format!(
            "a volume of {size} bytes (at most {} here)",
            tree::VOLUME_BYTES_MAX
        )));
    }
    if !chunk_size.is_power_of_two() || !(4096..=(4 << 20)).contains(&chunk_size) {
        return Err(malformed(format!(
            "chunk size {chunk_size}: a power of two from 4KiB to 4MiB"
        )));
    }
    Ok(())
}

fn session(h: &VolumeHandle) -> Result<Session, ReplicaError> {
    h.with_intake(|i| i.session).flatten().ok_or_else(|| {
        ReplicaError::Refused(
            ErrorCode::Unknown,
            format!("no pass open for volume {}", h.name),
        )
    })
}

/// Blocking threads for volume jobs' disk work, site-wide.
pub const POOL_THREADS_MAX: usize = 4;

/// A chunk of a batch, verified: its name, its bytes, how it is stored,
/// and how it was rebuilt if it came as a delta over bytes the commit can
/// read again (kept so when its bytes do not fit in memory).
struct Verified {
    hash: Hash,
    data: Arc<Vec<u8>>,
    encoded: Encoded,
    rebuilt_over: Option<DeltaOver>,
}

/// How a verified chunk goes into the store.
enum Encoded {
    /// As the record it came in (not compressed twice), checked against
    /// its name when it was decoded (not hashed twice).
    Record(Vec<u8>, CheckedChunk),
    /// Compressed by the store (rebuilt from a delta, and checked then).
    Whole(CheckedChunk),
    /// As the blocks a delta changed over its base (`record`: those blocks
    /// as they came), when the base is a committed leaf.
    Delta {
        base: Hash,
        blocks: Vec<u32>,
        record: Vec<u8>,
        chunk: CheckedChunk,
    },
}

impl ReplicaSide {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn ChunkStore>,
        data_dir: &Path,
        fsync: bool,
        retention: Retention,
        journal_bytes_max: u64,
        point_interval: Duration,
        volumes: Volumes,
        job_metrics: JobMetrics,
    ) -> ReplicaSide {
        ReplicaSide {
            store,
            replica_dir: data_dir.join("replicas"),
            redo_dir: data_dir.join("redo"),
            fsync,
            retention,
            journal_bytes_max,
            point_interval,
            volumes,
            volumes_max: crate::config::Limits::default().volumes_max as usize,
            gc_lock: RwLock::new(()),
            gc_deleted: AtomicU64::new(0),
            gc_due: AtomicBool::new(false),
            gc_failures: AtomicU64::new(0),
            reclaimed_bytes: AtomicU64::new(0),
            gc_error: Mutex::new(None),
            reclaim_error: Mutex::new(None),
            reclaim_due: AtomicBool::new(false),
            reclaiming: AtomicBool::new(false),
            reclaim_retry: AtomicBool::new(false),
            pool: Arc::new(Semaphore::new(POOL_THREADS_MAX)),
            job_metrics,
            drill_pins: Mutex::new(Default::default()),
            recent_budget: super::recent::budget(),
            bases_budget: super::recent::bases_budget(),
            rt: tokio::runtime::Handle::current(),
            this: std::sync::OnceLock::new(),
        }
    }

    /// Wraps the side in an `Arc` that its requests can spawn jobs from.
    pub fn into_arc(self) -> Arc<ReplicaSide> {
        let a = Arc::new(self);
        let _ = a.this.set(Arc::downgrade(&a));
        a
    }

    /// The points of one volume that retention lets go now: never a
    /// pinned one, nor one a running drill stands on. Ages count by the
    /// daemon's monotonic clock, never by a wall clock that may have jumped
    /// (`_created`, the new point's wall-clock stamp, is not trusted).
    pub fn prune(&self, points: &[state::RecoveryPoint], _created: u64) -> Vec<u64> {
        if !crate::util::clock_settled() {
            // The first minutes after a start: the wall clock may still be
            // stepped by NTP; nothing is pruned yet.
            return Vec::new();
        }
        let now = crate::util::trusted_now_unix();
        let pins = lock(&self.drill_pins);
        gc::prune(points, now, &self.retention)
            .into_iter()
            .filter(|id| {
                !points
                    .iter()
                    .any(|p| p.id == *id && pins.contains(&(p.volume.clone(), p.id)))
            })
            .collect()
    }

    /// Points were pruned: a collection is worth running.
    pub fn gc_due(&self) {
        self.gc_due.store(true, Ordering::Relaxed);
    }

    /// Runs a collection if points were pruned since the last one.
    pub fn collect_garbage_if_due(&self) {
        if self.gc_due.swap(false, Ordering::Relaxed) {
            match self.collect_garbage() {
                Ok(r) => {
                    self.gc_deleted
                        .fetch_add(r.chunks_deleted, Ordering::Relaxed);
                    *lock(&self.gc_error) = None;
                    if r.chunks_deleted > 0 || self.reclaim_retry.swap(false, Ordering::SeqCst) {
                        self.reclaim_in_background();
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "garbage collection failed; nothing was deleted past the failure");
                    self.gc_failures.fetch_add(1, Ordering::Relaxed);
                    *lock(&self.gc_error) = Some(format!("garbage collection: {e}"));
                }
            }
        }
    }

    /// The last collection's failure until a collection succeeds, else
    /// the last reclaim's until a reclaim succeeds.
    pub fn last_gc_error(&self) -> Option<String> {
        lock(&self.gc_error)
            .clone()
            .or_else(|| lock(&self.reclaim_error).clone())
    }

    /// Whether a reclaim is running (the daemon stopping abandons it).
    pub fn reclaim_running(&self) -> bool {
        self.reclaiming.load(Ordering::SeqCst)
    }

    /// Gives the disk space of the chunks a collection deleted back
    /// (`ChunkStore::reclaim_space`), off the commit's path: on a large
    /// store it rewrites gigabytes. One at a time; a collection that ends
    /// while one runs has it run once more.
    fn reclaim_in_background(&self) {
        self.reclaim_due.store(true, Ordering::SeqCst);
        if self.reclaiming.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.me();
        self.rt.spawn_blocking(move || {
            loop {
                while me.reclaim_due.swap(false, Ordering::SeqCst) {
                    let t0 = std::time::Instant::now();
                    match me.store.reclaim_space() {
                        Ok(r) => {
                            tracing::info!(
                                bytes_before = r.bytes_before,
                                bytes_after = r.bytes_after,
                                relocated = r.relocated,
                                ms = t0.elapsed().as_millis() as u64,
                                "store space reclaimed"
                            );
                            me.reclaimed_bytes.fetch_add(
                                r.bytes_before.saturating_sub(r.bytes_after),
                                Ordering::Relaxed,
                            );
                            *lock(&me.reclaim_error) = None;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "reclaiming the store's space failed; the deleted chunks' bytes stay on disk until the next collection's reclaim");
                            me.gc_failures.fetch_add(1, Ordering::Relaxed);
                            *lock(&me.reclaim_error) = Some(format!("reclaiming space: {e}"));
                            me.reclaim_retry.store(true, Ordering::SeqCst);
                        }
                    }
                }
                me.reclaiming.store(false, Ordering::SeqCst);
                // A request that came after the loop's last look and saw
                // this one running: take it.
                if !me.reclaim_due.load(Ordering::SeqCst)
                    || me.reclaiming.swap(true, Ordering::SeqCst)
                {
                    break;
                }
            }
        });
    }

    /// Collects chunks and nodes no kept state needs. Roots: every point of
    /// every volume, whatever its role, and each replica's image state
    /// (`committed`, `applying`); a primary's `committed` is not a root.
    pub fn collect_garbage(&self) -> Result<GcReport, ReplicaError> {
        let _g = self.gc_lock.write().unwrap_or_else(|p| p.into_inner());
        let handles: Vec<Arc<VolumeHandle>> = lock(&self.volumes).values().cloned().collect();
        let mut roots = Vec::new();
        let mut spare: HashSet<Hash> = HashSet::new();
        for h in &handles {
            let v = h.record();
            roots.extend(
                state::list_points(&*self.store, &v.name)?
                    .into_iter()
                    .map(|p| p.root),
            );
            if v.role == Role::Replica {
                roots.extend(v.committed);
                roots.extend(v.applying);
            }
            h.with_intake(|i| spare.extend(i.fresh.iter().copied()));
        }
        let report = gc::collect(&*self.store, &roots, &spare)?;
        tracing::info!(?report, "garbage collected");
        Ok(report)
    }

    pub fn handle(&self, name: &str) -> Option<Arc<VolumeHandle>> {
        lock(&self.volumes).get(name).cloned()
    }

    /// The replica `volume`, if the peer may write it now.
    fn replica(&self, volume: &str) -> Result<Arc<VolumeHandle>, ReplicaError> {
        let Some(h) = self.handle(volume) else {
            return Err(ReplicaError::Refused(
                ErrorCode::Unknown,
                format!("volume {volume} is unknown here; the primary must open it first"),
            ));
        };
        h.admit_peer_write().map_err(|r| {
            ReplicaError::Refused(refusal_code(&r), format!("volume {volume}: {r}"))
        })?;
        Ok(h)
    }

    /// The replica's continuous part, opened on first use, with its apply job.
    pub fn stream_of(&self, h: &Arc<VolumeHandle>) -> Result<Arc<ReplicaStream>, ReplicaError> {
        let rs = replica_stream::ensure(self, h)?;
        let _rt = self.rt.enter();
        replica_stream::spawn(&self.me(), h);
        Ok(rs)
    }

    fn me(&self) -> Arc<ReplicaSide> {
        self.this
            .get()
            .and_then(|w| w.upgrade())
            .expect("the replica side outlives its requests")
    }

    /// Handles one request; errors become typed `Response::Error`s for the peer.
    pub fn serve(&self, req: Request) -> Response {
        if let Err(e) = req.check() {
            tracing::error!(error = %e, "refused a malformed request from the peer");
            return Response::error(ErrorCode::Malformed, e);
        }
        let name = request_name(&req);
        let r = match req {
            Request::Open {
                volume,
                size,
                chunk_size,
                mode,
                history,
            } => check_shape(size, chunk_size)
                .and_then(|()| self.open(&volume, size, chunk_size, mode, &history)),
            Request::HaveNodes { hashes } => hashes
                .iter()
                .map(|h| self.store.has_node(h))
                .collect::<Result<Vec<_>, _>>()
                .map(Response::Have)
                .map_err(Into::into),
            Request::PutNodes { volume, nodes } => self
                .replica(&volume)
                .and_then(|_| self.put_nodes(&volume, nodes)),
            Request::HaveChunks { volume, items } => self
                .replica(&volume)
                .and_then(|h| self.have_chunks(&h, items)),
            Request::PutChunks { volume, items } => self
                .replica(&volume)
                .and_then(|h| self.put_chunks(&h, items)),
            Request::Commit {
                volume,
                root_node,
                fuzzy,
            } => self
                .replica(&volume)
                .and_then(|h| self.commit(&h, &root_node, fuzzy)),
            // A replica this site does not have (yet, or any more) is
            // seeded by a resync, which creates it.
            Request::StreamOpen { volume, .. } if self.handle(&volume).is_none() => {
                Ok(Response::StreamOpened {
                    next_seq: 0,
                    resync: Some("it has no copy of the volume".into()),
                })
            }
            Request::StreamOpen {
                volume,
                size,
                chunk_size,
                incarnation,
                ..
            } => check_shape(size, chunk_size)
                .and_then(|()| self.replica(&volume))
                .and_then(|h| self.stream_open(&h, size, chunk_size, incarnation)),
            Request::ResyncBegin {
                volume,
                from_seq,
                incarnation,
            } => self.replica(&volume).and_then(|h| {
                let rs = self.stream_of(&h)?;
                rs.resync_begin(self, &h, from_seq, incarnation)?;
                Ok(Response::Ok)
            }),
            Request::Records {
                volume,
                first,
                data,
            } => self.replica(&volume).and_then(|h| {
                let rec = h.record();
                if !rec.mode.continuous()
                    || (rec.committed.is_none() && rec.stream.resync_from.is_none())
                {
                    return Err(refused(format!(
                        "volume {volume} has no continuous copy here yet; resync first"
                    )));
                }
                // While a resync is open, the volume has the size its pass announced.
                let size = match rec.stream.resync_from {
                    Some(_) => session(&h)?.size,
                    None => rec.size,
                };
                self.stream_of(&h)?
                    .records(self, size, rec.history.epoch(), first, &data)
            }),
            Request::CreatePoint { volume } => self.create_point(&volume),
            Request::Points { volume } => state::list_points(&*self.store, &volume)
                .map(Response::Points)
                .map_err(Into::into),
            Request::Leaves { volume, start } => self.leaves(&volume, start),
            Request::Repair { volume, indices } => self.repair(&volume, &indices),
            Request::Promote { .. } | Request::Switchover { .. } | Request::Resolve { .. } => Err(
                refused("Promote is taken by the link, not the replica side"),
            ),
            other => Err(ReplicaError::Refused(
                ErrorCode::Malformed,
                format!("unexpected request {}", request_name(&other)),
            )),
        };
        r.unwrap_or_else(|e| {
            tracing::error!(request = name, error = %e, "replication request failed");
            Response::error(e.code(), e.to_string())
        })
    }

    fn open(
        &self,
        volume: &str,
        size: u64,
        chunk_size: u32,
        mode: Mode,
        history: &History,
    ) -> Result<Response, ReplicaError> {
        let h = match self.handle(volume) {
            Some(h) if h.role() == Role::Replica => {
                h.adopt_history(history).map_err(|r| {
                    ReplicaError::Refused(refusal_code(&r), format!("volume {volume}: {r}"))
                })?;
                if h.record().mode != mode {
                    h.update(true, |r| r.mode = mode)?;
                }
                h
            }
            Some(_) => {
                return Err(ReplicaError::Refused(
                    ErrorCode::NotReplica,
                    format!(
                        "volume {volume} is primary at this site; refusing to become its replica"
                    ),
                ));
            }
            None => {
                let held = lock(&self.volumes).len();
                if held >= self.volumes_max {
                    tracing::warn!(
                        volume,
                        held,
                        "the peer asked for one more replica than limits.volumes_max"
                    );
                    return Err(ReplicaError::Refused(
                        ErrorCode::Busy,
                        format!(
                            "this site holds {held} volumes, its limit (limits.volumes_max); refusing to create replica {volume}"
                        ),
                    ));
                }
                let path = self.replica_dir.join(format!("{volume}.img"));
                let f = image::open_replica(&path)?;
                image::set_len(&f, &path, 0)?;
                let rec = VolumeRecord {
                    name: volume.to_string(),
                    role: Role::Replica,
                    mode,
                    path,
                    chunk_size,
                    interval_ms: 0,
                    rpo_target_ms: 0,
                    size: 0,
                    created: crate::util::trusted_now_unix(),
                    committed: None,
                    applying: None,
                    totals: Default::default(),
                    last_pass: None,
                    stream: Default::default(),
                    history: history.clone(),
                    fenced: None,
                    split_brain: false,
                    handoff: None,
                    handoff_checksum: 0,
                    superseded: Vec::new(),
                    behind_of: None,
                };
                self.store.apply(vec![state::put_volume_op(&rec)], true)?;
                tracing::info!(volume, "created replica at {}", rec.path.display());
                let h = VolumeHandle::new(self.store.clone(), rec, false);
                h.adopt_history(history).map_err(|r| {
                    ReplicaError::Refused(refusal_code(&r), format!("volume {volume}: {r}"))
                })?;
                lock(&self.volumes).insert(volume.to_string(), h.clone());
                h
            }
        };
        h.with_intake(|i| {
            if i.session.is_some_and(|s| s.chunk_size != chunk_size) {
                // A seed's writes name chunks of the old size.
                i.placed.take();
            }
            i.session = Some(Session { size, chunk_size });
            // A new pass: what an earlier one kept in memory goes (its
            // chunks stay in the store, kept from collection by `fresh`).
            i.recent.clear();
            i.bases.clear();
            i.bases_root = None;
            i.places.clear();
        });
        Ok(Response::Opened {
            committed: h.record().committed,
        })
    }

    fn put_nodes(&self, volume: &str, nodes: Vec<Vec<u8>>) -> Result<Response, ReplicaError> {
        let mut ops = Vec::with_capacity(nodes.len());
        for bytes in nodes {
            if bytes.len() > NODE_BYTES_MAX {
                return Err(malformed("node larger than a full node"));
            }
            Node::decode(&bytes).map_err(|e| malformed(format!("malformed node: {e}")))?;
            let h = Node::hash_encoded(&bytes);
            ops.push(Op::PutMeta(pending_key(volume, &h), bytes));
        }
        // Not durable on its own: a lost pending node is simply sent again.
        self.store.apply(ops, false)?;
        Ok(Response::Ok)
    }

    fn have_chunks(
        &self,
        h: &VolumeHandle,
        items: Vec<(u64, Hash)>,
    ) -> Result<Response, ReplicaError> {
        let rec = h.record();
        let s = session(h)?;
        let image = Self::open_image(&rec.path);
        let mut out = Vec::with_capacity(items.len());
        let mut found = Vec::new();
        // A seed writes each chunk into the image as it arrives: there is
        // no state of the image to keep until the first commit.
        let seeding = rec.committed.is_none() && rec.applying.is_none();
        let mut places = Vec::new();
        // What the committed tree holds at an index: the chunks of a
        // committed tree are in the store (it is a collection root), so a
        // leaf that did not change needs no store lookup (which reads the
        // whole stored chunk, blob and checksum, to answer yes).
        let store_nodes = StoreNodes(&*self.store);
        let mut cursor = match rec.committed {
            Some(root) if rec.chunk_size == s.chunk_size => {
                Some(tree::LeafCursor::new(&store_nodes, &root)?)
            }
            _ => None,
        };
        let mut committed_leaf = |index: u64| -> Result<Option<Hash>, ReplicaError> {
            match cursor.as_mut() {
                Some(c) => Ok(c.leaf(index)?),
                None => Ok(None),
            }
        };
        let leaves = items
            .iter()
            .map(|(index, _)| committed_leaf(*index))
            .collect::<Result<Vec<_>, _>>()?;
        // An increment reads the image where each changed chunk is (its
        // delta base, below), one chunk at a time: the disk gets them all
        // at once first. Since a seed's chunks are written past the page
        // cache, these reads are reads of the disk.
        if let Some(f) = image.as_ref()
            && rec.committed.is_some()
            && rec.chunk_size == s.chunk_size
        {
            for ((index, hash), leaf) in items.iter().zip(&leaves) {
                let (start, end) = chunk_range(s.size, s.chunk_size, *index);
                if !hash.is_zero() && *leaf != Some(*hash) && end > start {
                    image::prefetch(f, start, end - start);
                }
            }
        }
        for ((index, hash), base) in items.into_iter().zip(leaves) {
            if hash.is_zero() {
                out.push(ChunkHave::Have);
                continue;
            }
            if base == Some(hash) || self.store.has_chunk(&hash)? {
                out.push(ChunkHave::Have);
                continue;
            }
            let have = self.base_for(&rec, s, index, base, image.as_ref())?;
            if seeding && have == ChunkHave::Missing {
                places.push((hash, index));
            }
            if let ChunkHave::MissingWithBase { base, .. } = &have
                && !base.is_zero()
            {
                found.push((*base, index));
            }
            out.push(have);
        }
        h.with_intake(|i| {
            if !found.is_empty() && i.bases_root != rec.committed {
                // Bases of another committed tree.
                i.bases.clear();
                i.bases_root = rec.committed;
            }
            for (base, index) in found {
                i.bases.note(&self.bases_budget, base, index);
            }
            for (hash, index) in places {
                i.places.note(&self.bases_budget, hash, index);
            }
        });
        Ok(Response::Chunks(out))
    }

    /// `len` bytes of the replica image at `at`, if it has them.
    fn read_image(image: Option<&std::fs::File>, at: u64, len: u64) -> Option<Vec<u8>> {
        let mut data = vec![0u8; usize::try_from(len).ok()?];
        image::read_sparse(image?, &mut data, at).ok()?;
        Some(data)
    }

    /// The replica image, opened to read chunks at the places a pass names.
    fn open_image(path: &Path) -> Option<std::fs::File> {
        let f = std::fs::File::open(path).ok()?;
        image::advise_random(&f);
        Some(f)
    }

    /// What the replica holds at `index` now, as a delta base; `leaf` is
    /// the committed tree's leaf there (`None` without a committed tree of
    /// this chunk size).
    fn base_for(
        &self,
        rec: &VolumeRecord,
        s: Session,
        index: u64,
        leaf: Option<Hash>,
        image: Option<&std::fs::File>,
    ) -> Result<ChunkHave, ReplicaError> {
        if rec.committed.is_none() || rec.chunk_size != s.chunk_size {
            return Ok(ChunkHave::Missing);
        }
        let (start, end) = chunk_range(s.size, s.chunk_size, index);
        let base = leaf.unwrap_or(Hash::ZERO);
        if base.is_zero() {
            // A hole (or past the old end): only the written blocks need to travel.
            let zeros = vec![0u8; (end - start) as usize];
            return Ok(ChunkHave::MissingWithBase {
                base,
                blocks: delta::block_hashes(&zeros),
            });
        }
        // The replica image's bytes there, not hashed (a chunk the store
        // would have to decompress): the image holds the committed state
        // wherever no record was applied since (a snapshot replica's,
        // always). Where it holds other bytes, the delta describes those,
        // `put_chunks` rebuilds over them and checks the result's name all
        // the same, and stores the chunk whole.
        if let Some(data) = Self::read_image(image, start, end - start) {
            return Ok(ChunkHave::MissingWithBase {
                base,
                blocks: delta::block_hashes(&data),
            });
        }
        match self.store.get_chunk(&base) {
            Ok(Some(data)) if data.len() as u64 == end - start => Ok(ChunkHave::MissingWithBase {
                base,
                blocks: delta::block_hashes(&data),
            }),
            Ok(_) => Ok(ChunkHave::Missing),
            Err(e) => {
                // A damaged base is reported and not used; the chunk comes whole.
                tracing::error!(error = %e, "stored chunk failed verification; not using it as a delta base");
                Ok(ChunkHave::Missing)
            }
        }
    }

    fn put_chunks(&self, h: &VolumeHandle, items: Vec<ChunkPut>) -> Result<Response, ReplicaError> {
        let s = session(h)?;
        let len_max = s.chunk_size as usize;
        let image = Self::open_image(&h.record().path);
        let mut result = StoreResult::default();
        let mut verified: Vec<Verified> = Vec::with_capacity(items.len());
        // Verify the whole batch first: one bad chunk refuses the batch, and nothing of it is stored.
        for item in items {
            match item {
                ChunkPut::Full { hash, record } => {
                    if hash.is_zero() {
                        return Err(malformed("peer sent a chunk under the zero name"));
                    }
                    let chunk = decode_checked(&record, len_max, &hash).map_err(|e| {
                        malformed(format!(
                            "chunk {}: {e}; batch refused, nothing stored",
                            hash.short()
                        ))
                    })?;
                    verified.push(Verified {
                        hash,
                        data: chunk.data().clone(),
                        encoded: Encoded::Record(record, chunk),
                        rebuilt_over: None,
                    });
                }
                ChunkPut::Delta {
                    hash,
                    base,
                    len,
                    blocks,
                    record,
                } => {
                    if len as usize > len_max {
                        return Err(malformed(format!(
                            "chunk {}: delta of {len} bytes exceeds the chunk size",
                            hash.short()
                        )));
                    }
                    let data = decode_chunk(&record, len as usize, None).map_err(|e| {
                        malformed(format!("chunk {}: delta {e}; batch refused", hash.short()))
                    })?;
                    if hash.is_zero() {
                        return Err(malformed("peer sent a chunk under the zero name"));
                    }
                    // The chunk rebuilt over `base_data`, not yet checked.
                    let rebuild = |base_data: &[u8]| -> Result<Vec<u8>, ReplicaError> {
                        if blocks.len() > base_data.len().div_ceil(delta::BLOCK_BYTES) {
                            return Err(malformed(format!(
                                "chunk {}: delta lists more blocks than the chunk has",
                                hash.short()
                            )));
                        }
                        delta::apply(base_data, &blocks, &data).map_err(|e| {
                            malformed(format!("chunk {}: malformed delta: {e}", hash.short()))
                        })
                    };
                    // The base as the replica image holds it where HaveChunks
                    // found it, not hashed on its own: the rebuilt chunk's
                    // name check catches an image that changed since. Then
                    // the store's copy (decompressed and verified).
                    let mut rebuilt = None;
                    // Whether the bytes it was rebuilt over are `base`'s (the
                    // rebuilt chunk is then `blocks` over `base`, as stored).
                    let mut over_base = true;
                    // Over what it was rebuilt, if the commit can read that
                    // again: zeros (`Some(None)`) or the image at a chunk.
                    let mut over = None;
                    if base.is_zero() {
                        rebuilt = CheckedChunk::check(hash, rebuild(&vec![0u8; len as usize])?);
                        over = Some(None);
                    } else if let Some((index, d)) = h
                        .with_intake(|i| i.bases.get(&base))
                        .flatten()
                        .and_then(|index| {
                            let at = index.checked_mul(u64::from(s.chunk_size))?;
                            Some((index, Self::read_image(image.as_ref(), at, u64::from(len))?))
                        })
                    {
                        // Both names for about the cost of one: the
                        // rebuilt chunk shares all but its blocks with `d`.
                        let (chunk, d_name) = CheckedChunk::check_with(hash, rebuild(&d)?, &d);
                        over_base = chunk.is_some() && d_name == base;
                        rebuilt = chunk;
                        over = Some(Some(index));
                    }
                    if rebuilt.is_none() && !base.is_zero() {
                        over_base = true;
                        over = None;
                        match self.store.get_chunk(&base)? {
                            Some(d) if d.len() == len as usize => {
                                rebuilt = CheckedChunk::check(hash, rebuild(&d)?)
                            }
                            _ => {
                                result.need_full.push(hash);
                                continue;
                            }
                        }
                    }
                    let rebuilt_over = over.map(|at| {
                        // Kept for a while: no slack from decoding.
                        let mut data = data;
                        data.shrink_to_fit();
                        DeltaOver {
                            at,
                            len,
                            blocks: blocks.clone(),
                            data,
                        }
                    });
                    match rebuilt {
                        Some(chunk) => verified.push(Verified {
                            hash,
                            data: chunk.data().clone(),
                            encoded: if over_base {
                                Encoded::Delta {
                                    base,
                                    blocks,
                                    record,
                                    chunk,
                                }
                            } else {
                                Encoded::Whole(chunk)
                            },
                            rebuilt_over,
                        }),
                        None => {
                            tracing::warn!(chunk = %hash.short(), "rebuilt chunk does not match its name; asking for it whole");
                            result.need_full.push(hash);
                        }
                    }
                }
            }
        }
        let placed = self.place_seed_chunks(h, s, &verified);
        // A collection reads `fresh` before it lists the store's chunks: a
        // chunk stored between the two would be deleted, and the commit
        // counts what is in `fresh` as stored. So both happen under the gc
        // lock (after the image writes above, which take the io lock).
        let _gc = self.gc_lock.read().unwrap_or_else(|p| p.into_inner());
        // A delta is stored as one over its base only while that base is a
        // leaf of the committed tree (a collection root, so it is in the
        // store and stays there with the delta), checked under the gc lock.
        let committed = h.record().committed;
        let is_committed_leaf = |base: &Hash| {
            base.is_zero()
                || h.with_intake(|i| {
                    committed.is_some() && i.bases_root == committed && i.bases.get(base).is_some()
                })
                .unwrap_or(false)
        };
        for Verified {
            hash,
            data,
            encoded,
            rebuilt_over,
        } in verified
        {
            let new = match encoded {
                Encoded::Record(r, chunk) => self.store.put_chunk_record(&chunk, r)?,
                Encoded::Delta {
                    base,
                    blocks,
                    record,
                    chunk,
                } if is_committed_leaf(&base) => {
                    self.store
                        .put_chunk_delta(&chunk, &base, &blocks, Some(record))?
                }
                Encoded::Delta { chunk, .. } | Encoded::Whole(chunk) => {
                    self.store.put_checked(&chunk)?
                }
            };
            if new {
                h.with_intake(|i| {
                    i.fresh.insert(hash);
                    if !placed.contains(&hash) {
                        i.recent.keep(&self.recent_budget, hash, data, rebuilt_over);
                    }
                });
                result.stored += 1;
            } else {
                result.duplicate += 1;
            }
        }
        Ok(Response::Stored(result))
    }

    /// A seed's chunks go into the replica image as they arrive, where the
    /// pass asked about them (the commit then writes only the rest and
    /// reads nothing back from the store). Only while the image holds no
    /// state (no committed tree, no commit applying), checked under the io
    /// lock that commits hold. Contiguous chunks go as one write, past the
    /// page cache where the file system takes it ([`image::DirectWriter`]).
    /// Returns the names written; a failed write is left to the commit,
    /// which writes every chunk not recorded here.
    fn place_seed_chunks(
        &self,
        h: &VolumeHandle,
        s: Session,
        verified: &[Verified],
    ) -> HashSet<Hash> {
        let mut done = HashSet::new();
        // Only for the pass these chunks came with: a newer Open may have
        // noted places of another shape.
        let same_pass = |i: &super::volume::PassIntake| {
            i.session
                .is_some_and(|n| n.size == s.size && n.chunk_size == s.chunk_size)
        };
        let wanted: Vec<(u64, Hash, &Arc<Vec<u8>>)> = h
            .with_intake(|i| {
                if !same_pass(i) {
                    return Vec::new();
                }
                verified
                    .iter()
                    .filter_map(|v| Some((i.places.get(&v.hash)?, v.hash, &v.data)))
                    .collect()
            })
            .unwrap_or_default();
        if wanted.is_empty() {
            return done;
        }
        let _io = lock(&h.io);
        let rec = h.record();
        // Checked again under the lock: a promotion (which restores a point
        // into the image) or a commit may have run since the request was
        // admitted.
        if rec.role != Role::Replica
            || h.admit_peer_write().is_err()
            || rec.committed.is_some()
            || rec.applying.is_some()
            || rec.chunk_size != s.chunk_size
        {
            return done;
        }
        let f = match image::open_replica(&rec.path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(volume = %h.name, error = %e, "cannot open the replica image to write seed chunks; the commit writes them");
                return done;
            }
        };
        // In the image's order, each place once, whole chunks only (a
        // short one is not where the pass said): contiguous chunks then
        // go into the image as one write.
        let mut wanted: Vec<(u64, Hash, &Arc<Vec<u8>>)> = wanted
            .into_iter()
            .filter(|(index, _, data)| {
                let (start, end) = chunk_range(s.size, s.chunk_size, *index);
                data.len() as u64 == end - start
            })
            .collect();
        wanted.sort_unstable_by_key(|w| w.0);
        wanted.dedup_by_key(|w| w.0);
        let mut out = image::DirectWriter::new(&f, &rec.path);
        let mut span: Option<(u64, u64)> = None;
        let mut rest = &wanted[..];
        while !rest.is_empty() {
            let mut n = 1;
            let mut bytes = rest[0].2.len();
            while n < rest.len()
                && rest[n].0 == rest[n - 1].0 + 1
                && bytes + rest[n].2.len() <= SEED_RUN_BYTES
            {
                bytes += rest[n].2.len();
                n += 1;
            }
            let (run, next) = rest.split_at(n);
            rest = next;
            // Whatever was placed here before is forgotten first: a write
            // that fails may leave part of these chunks over it.
            let same = h
                .with_intake(|i| {
                    for (index, _, _) in run {
                        i.placed.forget(*index);
                    }
                    same_pass(i)
                })
                .unwrap_or(false);
            if !same {
                break;
            }
            let (start, _) = chunk_range(s.size, s.chunk_size, run[0].0);
            let (_, end) = chunk_range(s.size, s.chunk_size, run[n - 1].0);
            let pieces: Vec<&[u8]> = run.iter().map(|(_, _, d)| d.as_slice()).collect();
            if let Err(e) = out.write_run(start, &pieces) {
                tracing::warn!(volume = %h.name, error = %e, "seed chunks could not be written into the replica image; the commit writes them");
                break;
            }
            span = Some(span.map_or((start, end), |(a, b)| (a.min(start), b.max(end))));
            for (index, hash, _) in run {
                if h.with_intake(|i| {
                    same_pass(i) && i.placed.note(&self.bases_budget, *index, *hash)
                })
                .unwrap_or(false)
                {
                    done.insert(*hash);
                }
            }
        }
        // Start writing what went through the page cache (a short last
        // chunk, a file system without O_DIRECT) to the disk now, so that
        // the commit's fsync finds little left to write (a hint:
        // durability is still the commit's fsync alone; the range written
        // past the cache has no dirty page to start).
        if let Some((a, b)) = span {
            image::start_writeback(&f, a, b - a);
        }
        done
    }

    fn stream_open(
        &self,
        h: &Arc<VolumeHandle>,
        size: u64,
        chunk_size: u32,
        incarnation: u64,
    ) -> Result<Response, ReplicaError> {
        let rec = h.record();
        if !rec.mode.continuous() || (rec.committed.is_none() && rec.stream.resync_from.is_none()) {
            return Ok(Response::StreamOpened {
                next_seq: 0,
                resync: Some("it has no copy to stream onto".into()),
            });
        }
        Ok(self
            .stream_of(h)?
            .stream_open(&rec, size, chunk_size, incarnation))
    }

    /// `ferry points NAME --create`: a point at the next flush boundary.
    pub fn create_point(&self, volume: &str) -> Result<Response, ReplicaError> {
        let h = self
            .handle(volume)
            .filter(|h| h.role() == Role::Replica)
            .ok_or_else(|| {
                ReplicaError::Refused(
                    ErrorCode::Unknown,
                    format!("no replica named {volume} here"),
                )
            })?;
        let rec = h.record();
        if !rec.mode.continuous() {
            return Err(refused(format!(
                "volume {volume} is in snapshot mode: every pass makes a point (`ferry sync {volume}`)"
            )));
        }
        if !state::consistent(&rec) {
            return Err(refused(format!(
                "volume {volume} is not consistent yet (a resync runs, or the records since its last point are being written again after a host restart or a failed fsync); its last point stays the one to use"
            )));
        }
        self.stream_of(&h)?.create_point(self)
    }

    fn leaves(&self, volume: &str, start: u64) -> Result<Response, ReplicaError> {
        let h = self.replica(volume)?;
        let rec = h.record();
        // Only this page's chunks are read: a verify of a large volume
        // reads it once, not once per page.
        let page = crate::proto::messages::LEAVES_MAX as u64;
        let (size, leaves) = image::scan_chunks(&rec.path, rec.chunk_size, start, page)?;
        let n = crate::store::tree::chunk_count(size, rec.chunk_size);
        Ok(Response::Leaves {
            size,
            chunk_size: rec.chunk_size,
            done: start.saturating_add(leaves.len() as u64) >= n,
            leaves,
        })
    }

    /// Rewrites the listed chunks of the replica image as it should hold
    /// them now (a continuous replica: its committed tree plus the redo
    /// records applied since), then fsyncs.
    fn repair(&self, volume: &str, indices: &[u64]) -> Result<Response, ReplicaError> {
        let h = self.replica(volume)?;
        let rec = h.record();
        if rec.applying.is_some() {
            return Err(refused(
                "a commit is being applied; verify again when it is done",
            ));
        }
        let chunks = if rec.mode.continuous() && rec.committed.is_some() {
            self.stream_of(&h)?.repair(self, &h, indices)
        } else {
            let _io = lock(&h.io);
            let _gc = self.gc_lock.read().unwrap_or_else(|p| p.into_inner());
            replica_stream::repair_chunks(self, &h.record(), indices, |_| Ok(()))
        };
        // A failed repair may have left written blocks unsynced (its fsync
        // among the failures): later commits write whole chunks.
        let chunks = chunks.inspect_err(|_| {
            h.image_sync_failed
                .store(true, std::sync::atomic::Ordering::SeqCst)
        })?;
        Ok(Response::Repaired { chunks })
    }

    /// Walks the part of the new tree that is not already complete in the
    /// store, collecting pending nodes to promote and counting absent chunks.
    /// `hash` is the node at `index` of its `level`; `known(i, c)` says
    /// whether leaf `i` named `c` is in the store without asking the store
    /// (which reads a whole stored chunk to say yes).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn collect(
        &self,
        src: &Pending<'_>,
        hash: &Hash,
        level: u8,
        index: u64,
        known: &mut dyn FnMut(u64, &Hash) -> Result<bool, ReplicaError>,
        promote: &mut Vec<(Hash, Vec<u8>)>,
        missing: &mut u64,
    ) -> Result<(), ReplicaError> {
        if self.store.has_node(hash)? {
            return Ok(());
        }
        let Some(bytes) = src.pending_bytes(hash)? else {
            return Err(refused(format!(
                "commit refused: tree node {} was never sent",
                hash.short()
            )));
        };
        let children = match Node::decode(&bytes) {
            Ok(Node::Inner { level: l, children }) if l == level => children,
            _ => {
                return Err(refused(format!(
                    "tree node {} is not a level-{level} node",
                    hash.short()
                )));
            }
        };
        promote.push((*hash, bytes));
        for (k, c) in children.iter().enumerate() {
            let i = index
                .saturating_mul(tree::FANOUT as u64)
                .saturating_add(k as u64);
            if level == 1 {
                if !c.is_zero() && !known(i, c)? && !self.store.has_chunk(c)? {
                    *missing += 1;
                }
            } else {
                self.collect(src, c, level - 1, i, &mut *known, promote, missing)?;
            }
        }
        Ok(())
    }
}

pub(super) fn pending_prefix(volume: &str) -> Vec<u8> {
    format!("{PENDING_PREFIX}{volume}/").into_bytes()
}

fn pending_key(volume: &str, h: &Hash) -> Vec<u8> {
    format!("{PENDING_PREFIX}{volume}/{}", h.to_hex()).into_bytes()
}

/// Nodes of a volume's pass not yet committed.
pub(super) struct Pending<'a> {
    pub(super) store: &'a dyn ChunkStore,
    pub(super) volume: &'a str,
}

impl Pending<'_> {
    fn pending_bytes(&self, h: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.get_meta(&pending_key(self.volume, h))
    }
}

impl NodeSource for Pending<'_> {
    fn node(&self, hash: &Hash) -> Result<Option<Node>, StoreError> {
        match StoreNodes(self.store).node(hash)? {
            Some(n) => Ok(Some(n)),
            None => self
                .pending_bytes(hash)?
                .map(|b| {
                    Node::decode(&b).map_err(|reason| StoreError::NodeCorrupt {
                        hash: *hash,
                        reason,
                    })
                })
                .transpose(),
        }
    }
}

pub fn request_name(r: &Request) -> &'static str {
    match r {
        Request::Hello { .. } => "Hello",
        Request::Pair { .. } => "Pair",
        Request::Open { .. } => "Open",
        Request::HaveNodes { .. } => "HaveNodes",
        Request::PutNodes { .. } => "PutNodes",
        Request::HaveChunks { .. } => "HaveChunks",
        Request::PutChunks { .. } => "PutChunks",
        Request::Commit { .. } => "Commit",
        Request::StreamOpen { .. } => "StreamOpen",
        Request::ResyncBegin { .. } => "ResyncBegin",
        Request::Records { .. } => "Records",
        Request::CreatePoint { .. } => "CreatePoint",
        Request::Leaves { .. } => "Leaves",
        Request::Points { .. } => "Points",
        Request::Repair { .. } => "Repair",
        Request::Promote { .. } => "Promote",
        Request::Switchover { .. } => "Switchover",
        Request::Resolve { .. } => "Resolve",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::epoch::History;
    use crate::hash::is_all_zero;
    use crate::proto::messages::FuzzyCommit;
    use crate::store::MemoryStore;
    use crate::store::encode_chunk;
    use crate::store::tree::Tree;

    /// A runtime for the jobs the side spawns; the test thread may block.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    fn job_metrics() -> JobMetrics {
        let m = crate::metrics::Metrics::new();
        JobMetrics {
            errors: m.job_errors.clone(),
            failing: m.job_failing.clone(),
        }
    }

    /// The DR side of a site whose store holds `store`'s volumes (a start).
    fn side(store: &Arc<dyn ChunkStore>, dir: &Path, point_interval: Duration) -> Arc<ReplicaSide> {
        side_holding(
            store,
            dir,
            point_interval,
            crate::config::Limits::default().volumes_max as usize,
        )
    }

    /// As `side`, holding at most `volumes_max` volumes.
    fn side_holding(
        store: &Arc<dyn ChunkStore>,
        dir: &Path,
        point_interval: Duration,
        volumes_max: usize,
    ) -> Arc<ReplicaSide> {
        let volumes: Volumes = Default::default();
        for rec in state::list_volumes(&**store).unwrap() {
            let h = VolumeHandle::new(store.clone(), rec, false);
            volumes.lock().unwrap().insert(h.name.clone(), h);
        }
        let mut s = ReplicaSide::new(
            store.clone(),
            dir,
            true,
            Retention::default(),
            1 << 30,
            point_interval,
            volumes,
            job_metrics(),
        );
        s.volumes_max = volumes_max;
        s.into_arc()
    }

    fn history() -> History {
        History(vec![crate::failover::epoch::EpochEntry {
            epoch: 1,
            site: "primary".into(),
            generation: crate::failover::epoch::Gen(42),
            fork: None,
        }])
    }

    const CS: usize = 4096;

    fn image(seed: u8, chunks: usize) -> Vec<u8> {
        (0..chunks * CS)
            .map(|i| {
                if (i / CS).is_multiple_of(3) {
                    0
                } else {
                    (i as u8).wrapping_mul(seed) ^ (i / CS) as u8
                }
            })
            .collect()
    }

    fn tree_of(data: &[u8]) -> Tree {
        tree_in(data, CS)
    }

    /// The tree of `data` in chunks of `cs` bytes, zero chunks named so.
    fn tree_in(data: &[u8], cs: usize) -> Tree {
        let leaves = data
            .chunks(cs)
            .map(|c| {
                if is_all_zero(c) {
                    Hash::ZERO
                } else {
                    Hash::of_chunk(c)
                }
            })
            .collect();
        Tree::build(data.len() as u64, cs as u32, leaves)
    }

    fn nodes_of(t: &Tree) -> Vec<Vec<u8>> {
        (1..t.levels.len())
            .flat_map(|l| (0..t.levels[l].len()).map(move |i| (l, i)))
            .map(|(l, i)| t.node(l, i).encode())
            .collect()
    }

    /// Every non-zero chunk of `data`, whole, as a pass sends it.
    fn whole(data: &[u8]) -> Vec<ChunkPut> {
        data.chunks(CS)
            .filter(|c| !is_all_zero(c))
            .map(|c| ChunkPut::Full {
                hash: Hash::of_chunk(c),
                record: encode_chunk(c),
            })
            .collect()
    }

    fn open(side: &Arc<ReplicaSide>, data: &[u8]) {
        let r = side.serve(Request::Open {
            volume: "v".into(),
            size: data.len() as u64,
            chunk_size: CS as u32,
            mode: Mode::Snapshot,
            history: history(),
        });
        assert!(matches!(r, Response::Opened { .. }), "{r:?}");
    }

    fn send_all(side: &Arc<ReplicaSide>, data: &[u8], t: &Tree, skip: Option<usize>) -> Response {
        open(side, data);
        assert!(matches!(
            side.serve(Request::PutNodes {
                volume: "v".into(),
                nodes: nodes_of(t)
            }),
            Response::Ok
        ));
        let items = data
            .chunks(CS)
            .enumerate()
            .filter(|(i, c)| !is_all_zero(c) && Some(*i) != skip)
            .map(|(_, c)| ChunkPut::Full {
                hash: Hash::of_chunk(c),
                record: encode_chunk(c),
            })
            .collect();
        assert!(matches!(
            side.serve(Request::PutChunks {
                volume: "v".into(),
                items
            }),
            Response::Stored(_)
        ));
        side.serve(Request::Commit {
            volume: "v".into(),
            root_node: t.root_node().encode(),
            fuzzy: None,
        })
    }

    #[test]
    fn a_commit_writes_the_image_and_drops_pending_nodes_of_abandoned_passes() {
        let rt = runtime();
        let _rt = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let side = side(&store, dir.path(), Duration::from_secs(10));
        // An abandoned pass: its nodes arrive, no commit follows.
        let other = image(7, 600);
        open(&side, &other);
        side.serve(Request::PutNodes {
            volume: "v".into(),
            nodes: nodes_of(&tree_of(&other)),
        });
        assert!(!store.scan_meta(b"pnode/v/").unwrap().is_empty());
        // The next pass commits.
        let data = image(3, 600);
        let t = tree_of(&data);
        let r = send_all(&side, &data, &t, None);
        assert!(
            matches!(r, Response::Committed { ref point } if point.root == t.root),
            "{r:?}"
        );
        assert_eq!(
            std::fs::read(dir.path().join("replicas/v.img")).unwrap(),
            data
        );
        assert!(
            store.scan_meta(b"pnode/").unwrap().is_empty(),
            "no pending node outlives a commit"
        );
        assert!(store.has_node(&t.levels[1][0]).unwrap());
    }

    #[test]
    fn a_commit_admitted_before_a_promotion_held_the_peer_refuses_under_the_io_lock() {
        let rt = runtime();
        let _rt = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let side = side(&store, dir.path(), Duration::from_secs(10));
        let first = image(3, 60);
        let t1 = tree_of(&first);
        assert!(matches!(
            send_all(&side, &first, &t1, None),
            Response::Committed { .. }
        ));
        // The next pass has sent everything; its Commit was admitted (it is
        // past `replica()`) when a promotion holds the peer's writes.
        let second = image(5, 60);
        let t2 = tree_of(&second);
        open(&side, &second);
        side.serve(Request::PutNodes {
            volume: "v".into(),
            nodes: nodes_of(&t2),
        });
        side.serve(Request::PutChunks {
            volume: "v".into(),
            items: whole(&second),
        });
        let h = side.handle("v").unwrap();
        h.hold_peer_writes(Some("a forced failover is promoting this site".into()));
        h.wait_for_image_writes();
        let r = side.commit(&h, &t2.root_node().encode(), None);
        assert!(
            matches!(r, Err(ReplicaError::Refused(..))),
            "{:?}",
            r.map(|_| ())
        );
        assert_eq!(h.record().committed, Some(t1.root));
        assert!(h.record().applying.is_none());
        assert!(
            std::fs::read(dir.path().join("replicas/v.img")).unwrap() == first,
            "the image the promotion reads is the last commit's"
        );
        // Released (the promotion failed): the same commit goes through.
        h.hold_peer_writes(None);
        let r = side.commit(&h, &t2.root_node().encode(), None);
        assert!(
            matches!(r, Ok(Response::Committed { .. })),
            "{:?}",
            r.map(|_| ())
        );
        assert!(std::fs::read(dir.path().join("replicas/v.img")).unwrap() == second);
    }

    #[test]
    fn a_peer_cannot_open_more_volumes_than_the_limit() {
        let rt = runtime();
        let _rt = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let side = side_holding(&store, dir.path(), Duration::from_secs(10), 2);
        let open = |name: &str| {
            side.serve(Request::Open {
                volume: name.into(),
                size: 1 << 20,
                chunk_size: CS as u32,
                mode: Mode::Snapshot,
                history: history(),
            })
        };
        assert!(matches!(open("a"), Response::Opened { .. }));
        assert!(matches!(open("b"), Response::Opened { .. }));
        let r = open("c");
        assert!(
            matches!(&r, Response::Error { code: ErrorCode::Busy, message } if message.contains("volumes_max")),
            "{r:?}"
        );
        assert!(!dir.path().join("replicas/c.img").exists());
        // One it already holds opens again.
        assert!(matches!(open("a"), Response::Opened { .. }));
    }

    #[test]
    fn a_commit_with_a_missing_chunk_is_refused_and_the_last_point_stays() {
        let rt = runtime();
        let _rt = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let side = side(&store, dir.path(), Duration::from_secs(10));
        // Under 256 chunks, every non-zero chunk of an image is distinct.
        let first = image(3, 250);
        assert!(matches!(
            send_all(&side, &first, &tree_of(&first), None),
            Response::Committed { .. }
        ));
        let second = image(5, 250);
        let r = send_all(&side, &second, &tree_of(&second), Some(4));
        assert!(
            matches!(r, Response::Error { ref message, .. } if message.contains("not here yet")),
            "{r:?}"
        );
        let rec = state::get_volume(&*store, "v").unwrap().unwrap();
        assert_eq!(
            rec.committed,
            Some(tree_of(&first).root),
            "the replica still names the first state"
        );
        assert!(rec.applying.is_none(), "the image was not touched");
        assert_eq!(
            std::fs::read(dir.path().join("replicas/v.img")).unwrap(),
            first
        );
        assert_eq!(state::list_points(&*store, "v").unwrap().len(), 1);
    }

    #[test]
    fn unchanged_chunks_are_had_and_a_delta_whose_image_base_changed_rebuilds_from_the_store() {
        use std::os::unix::fs::FileExt;
        let rt = runtime();
        let _rt = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        // RocksDB: the store that keeps deltas as deltas.
        let store: Arc<dyn ChunkStore> =
            Arc::new(crate::store::RocksStore::open(&dir.path().join("store")).unwrap());
        let side = side(&store, dir.path(), Duration::from_secs(10));
        // Chunks of two blocks, so that a delta of one needs its base.
        let cs = 2 * delta::BLOCK_BYTES;
        let tree = |data: &[u8]| {
            let leaves = data.chunks(cs).map(Hash::of_chunk).collect();
            Tree::build(data.len() as u64, cs as u32, leaves)
        };
        let first: Vec<u8> = (0..64 * cs)
            .map(|i| (i % 251) as u8 ^ (i / cs) as u8)
            .collect();
        let t1 = tree(&first);
        let put = |items| {
            side.serve(Request::PutChunks {
                volume: "v".into(),
                items,
            })
        };
        let open = |data: &[u8]| {
            side.serve(Request::Open {
                volume: "v".into(),
                size: data.len() as u64,
                chunk_size: cs as u32,
                mode: Mode::Snapshot,
                history: history(),
            })
        };
        assert!(matches!(open(&first), Response::Opened { .. }));
        let nodes = nodes_of(&t1);
        side.serve(Request::PutNodes {
            volume: "v".into(),
            nodes,
        });
        let items = first
            .chunks(cs)
            .map(|c| ChunkPut::Full {
                hash: Hash::of_chunk(c),
                record: encode_chunk(c),
            })
            .collect();
        assert!(matches!(put(items), Response::Stored(_)));
        let r = side.serve(Request::Commit {
            volume: "v".into(),
            root_node: t1.root_node().encode(),
            fuzzy: None,
        });
        assert!(matches!(r, Response::Committed { .. }), "{r:?}");
        // The next state changes the second block of chunk 4.
        let mut second = first.clone();
        second[4 * cs + delta::BLOCK_BYTES..5 * cs].fill(0x5a);
        let t2 = tree(&second);
        assert!(matches!(open(&second), Response::Opened { .. }));
        let r = side.serve(Request::HaveChunks {
            volume: "v".into(),
            items: vec![(1, t2.levels[0][1]), (4, t2.levels[0][4])],
        });
        let Response::Chunks(have) = r else {
            panic!("{r:?}")
        };
        assert_eq!(have[0], ChunkHave::Have, "an unchanged chunk is had");
        let ChunkHave::MissingWithBase { base, blocks } = &have[1] else {
            panic!("{have:?}")
        };
        assert_eq!(*base, t1.levels[0][4], "the committed chunk is the base");
        let new = &second[4 * cs..5 * cs];
        let changed = delta::changed_blocks(new, blocks).unwrap();
        assert_eq!(changed, vec![1], "only the second block travels");
        // The replica image changes under the pass where the base was.
        let img = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join("replicas/v.img"))
            .unwrap();
        img.write_all_at(&vec![0xee; cs], 4 * cs as u64).unwrap();
        let r = put(vec![ChunkPut::Delta {
            hash: t2.levels[0][4],
            base: *base,
            len: cs as u32,
            record: encode_chunk(&delta::extract(new, &changed)),
            blocks: changed,
        }]);
        let Response::Stored(res) = r else {
            panic!("{r:?}")
        };
        assert_eq!(
            (res.stored, res.need_full.len()),
            (1, 0),
            "rebuilt from the store's copy of the base: {res:?}"
        );
        assert_eq!(
            store.get_chunk(&t2.levels[0][4]).unwrap().as_deref(),
            Some(new)
        );
        // A delta that rebuilds over what the image holds where its base
        // was, which is no longer the base: the chunk is right, but it is
        // not the blocks over the base, so it is not stored as that.
        let r = side.serve(Request::HaveChunks {
            volume: "v".into(),
            items: vec![(6, Hash::of_chunk(b"anything new"))],
        });
        assert!(matches!(r, Response::Chunks(_)), "{r:?}");
        img.write_all_at(&[0xcc; delta::BLOCK_BYTES], 6 * cs as u64)
            .unwrap();
        let mut odd = vec![0u8; cs];
        img.read_exact_at(&mut odd, 6 * cs as u64).unwrap();
        odd[delta::BLOCK_BYTES..].fill(0x77);
        let r = put(vec![ChunkPut::Delta {
            hash: Hash::of_chunk(&odd),
            base: t1.levels[0][6],
            len: cs as u32,
            record: encode_chunk(&odd[delta::BLOCK_BYTES..]),
            blocks: vec![1],
        }]);
        assert!(
            matches!(r, Response::Stored(StoreResult { stored: 1, .. })),
            "{r:?}"
        );
        assert_eq!(
            store.get_chunk(&Hash::of_chunk(&odd)).unwrap(),
            Some(odd),
            "stored as the bytes that were verified"
        );
    }

    #[test]
    fn deltas_kept_beyond_the_memory_budget_are_rebuilt_in_place_at_the_commit() {
        deltas_kept_then_committed(false, true);
    }

    /// What memory did not keep is read from the store as its delta (not
    /// its base) and rebuilt over the image too.
    #[test]
    fn deltas_the_store_keeps_are_rebuilt_in_place_without_reading_their_bases() {
        deltas_kept_then_committed(false, false);
    }

    /// After a failed fsync of the image the commit writes whole chunks
    /// without comparing (the page cache may show what never reached the
    /// disk): the deltas rebuilt in place still give the new state.
    #[test]
    fn deltas_kept_are_written_whole_after_a_failed_image_fsync() {
        deltas_kept_then_committed(true, true);
        deltas_kept_then_committed(true, false);
    }

    /// `in_memory`: the deltas stay kept for the commit; else it finds
    /// nothing kept and reads them from the store.
    fn deltas_kept_then_committed(sync_failed: bool, in_memory: bool) {
        use std::os::unix::fs::FileExt;
        let rt = runtime();
        let _rt = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let rocks = Arc::new(crate::store::RocksStore::open(&dir.path().join("store")).unwrap());
        let store: Arc<dyn ChunkStore> = rocks.clone();
        let side = side(&store, dir.path(), Duration::from_secs(10));
        // Chunks of two blocks; chunk 10 is a hole.
        let cs = 2 * delta::BLOCK_BYTES;
        let tree = |data: &[u8]| tree_in(data, cs);
        let mut first: Vec<u8> = (0..32 * cs)
            .map(|i| (i % 251) as u8 ^ (i / cs) as u8)
            .collect();
        first[10 * cs..11 * cs].fill(0);
        let serve_ok = |r: Request| {
            let r = side.serve(r);
            assert!(!matches!(r, Response::Error { .. }), "{r:?}");
            r
        };
        let pass = |data: &[u8], t: &Tree| {
            serve_ok(Request::Open {
                volume: "v".into(),
                size: data.len() as u64,
                chunk_size: cs as u32,
                mode: Mode::Snapshot,
                history: history(),
            });
            serve_ok(Request::PutNodes {
                volume: "v".into(),
                nodes: nodes_of(t),
            });
        };
        let t1 = tree(&first);
        pass(&first, &t1);
        let items = first
            .chunks(cs)
            .filter(|c| !is_all_zero(c))
            .map(|c| ChunkPut::Full {
                hash: Hash::of_chunk(c),
                record: encode_chunk(c),
            })
            .collect();
        serve_ok(Request::PutChunks {
            volume: "v".into(),
            items,
        });
        let r = serve_ok(Request::Commit {
            volume: "v".into(),
            root_node: t1.root_node().encode(),
            fuzzy: None,
        });
        assert!(matches!(r, Response::Committed { .. }), "{r:?}");

        // The next state: one block changed in chunks 4 and 7, and written
        // into the hole. No room in memory for a chunk whole.
        let mut second = first.clone();
        for c in [4, 7, 10] {
            second[c * cs + 100..c * cs + 200].fill(0x5a);
        }
        let t2 = tree(&second);
        side.recent_budget
            .store(crate::daemon::recent::DELTA_RESERVE_BYTES, Ordering::SeqCst);
        pass(&second, &t2);
        let r = serve_ok(Request::HaveChunks {
            volume: "v".into(),
            items: [4u64, 7, 10]
                .map(|i| (i, t2.levels[0][i as usize]))
                .to_vec(),
        });
        let Response::Chunks(have) = r else {
            panic!("{r:?}")
        };
        let items: Vec<ChunkPut> = [4usize, 7, 10]
            .iter()
            .zip(&have)
            .map(|(&c, have)| {
                let ChunkHave::MissingWithBase { base, blocks } = have else {
                    panic!("chunk {c}: {have:?}")
                };
                let new = &second[c * cs..(c + 1) * cs];
                let changed = delta::changed_blocks(new, blocks).unwrap();
                assert_eq!(changed, vec![0], "chunk {c}");
                ChunkPut::Delta {
                    hash: t2.levels[0][c],
                    base: *base,
                    len: cs as u32,
                    record: encode_chunk(&delta::extract(new, &changed)),
                    blocks: changed,
                }
            })
            .collect();
        let r = serve_ok(Request::PutChunks {
            volume: "v".into(),
            items,
        });
        assert!(
            matches!(r, Response::Stored(StoreResult { stored: 3, .. })),
            "{r:?}"
        );
        let h = side.handle("v").unwrap();
        for c in [4, 7, 10] {
            assert!(
                h.with_intake(|i| matches!(
                    i.recent.get(&t2.levels[0][c]),
                    Some(crate::daemon::recent::Kept::Delta(_))
                ))
                .unwrap(),
                "chunk {c} kept as its delta"
            );
        }
        if in_memory {
            // The store could not give chunks 4 and 10 back (damaged): the
            // commit must rebuild them from their kept deltas.
            rocks.corrupt_chunk(&t2.levels[0][4]).unwrap();
            rocks.corrupt_chunk(&t2.levels[0][10]).unwrap();
        } else {
            // Nothing kept; the base of chunk 4 is damaged in the store, so
            // reading chunk 4 whole fails: the commit must rebuild it from
            // its stored delta over the image (chunk 10: over zeros).
            h.with_intake(|i| i.recent.clear());
            rocks.corrupt_chunk(&t1.levels[0][4]).unwrap();
            assert!(store.get_delta(&t2.levels[0][10]).unwrap().is_some());
        }
        assert!(store.get_chunk(&t2.levels[0][4]).is_err());
        // The image changes under chunk 7: its delta no longer rebuilds
        // there, and the commit reads it from the store whole.
        let img = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("replicas/v.img"))
            .unwrap();
        img.write_all_at(&[0xee; 64], 7 * cs as u64 + 5000).unwrap();
        h.image_sync_failed.store(sync_failed, Ordering::SeqCst);
        let r = serve_ok(Request::Commit {
            volume: "v".into(),
            root_node: t2.root_node().encode(),
            fuzzy: None,
        });
        assert!(matches!(r, Response::Committed { .. }), "{r:?}");
        assert!(
            std::fs::read(dir.path().join("replicas/v.img")).unwrap() == second,
            "the image holds the new state"
        );
    }

    /// One pass without its commit: opens, sends the nodes, asks about the
    /// non-zero chunks below index `ask_below` (as a primary's compare
    /// would), and sends every non-zero chunk whole.
    fn ask_and_put(side: &Arc<ReplicaSide>, data: &[u8], ask_below: usize) -> Tree {
        let t = tree_of(data);
        open(side, data);
        side.serve(Request::PutNodes {
            volume: "v".into(),
            nodes: nodes_of(&t),
        });
        let asked: Vec<(u64, Hash)> = (0..ask_below)
            .filter(|&i| !t.levels[0][i].is_zero())
            .map(|i| (i as u64, t.levels[0][i]))
            .collect();
        let r = side.serve(Request::HaveChunks {
            volume: "v".into(),
            items: asked,
        });
        assert!(matches!(r, Response::Chunks(_)), "{r:?}");
        let items = whole(data);
        let r = side.serve(Request::PutChunks {
            volume: "v".into(),
            items,
        });
        assert!(matches!(r, Response::Stored(_)), "{r:?}");
        t
    }

    #[test]
    fn a_seed_writes_chunks_into_the_image_as_they_arrive_and_a_later_pass_waits_for_its_commit() {
        let rt = runtime();
        let _rt = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let side = side(&store, dir.path(), Duration::from_secs(10));
        let img = || std::fs::read(dir.path().join("replicas/v.img")).unwrap();
        let pass = |data: &[u8], ask_below: usize| ask_and_put(&side, data, ask_below);
        // The seed: the chunks it asked about (the first 100) are in the
        // image before the commit; the others are written by the commit.
        let first = image(3, 250);
        let t = pass(&first, 100);
        let before = img();
        // Chunk 99 is zero (a hole): the last one written is 98.
        assert_eq!(
            before.len(),
            99 * CS,
            "the chunks after 100 wait for the commit"
        );
        assert_eq!(before, first[..99 * CS]);
        let r = side.serve(Request::Commit {
            volume: "v".into(),
            root_node: t.root_node().encode(),
            fuzzy: None,
        });
        assert!(matches!(r, Response::Committed { .. }), "{r:?}");
        assert_eq!(img(), first);
        // The next pass: the image holds a point now and keeps it until
        // this pass commits.
        let second = image(5, 250);
        let t = pass(&second, 250);
        assert_eq!(img(), first, "nothing written before the commit");
        let r = side.serve(Request::Commit {
            volume: "v".into(),
            root_node: t.root_node().encode(),
            fuzzy: None,
        });
        assert!(matches!(r, Response::Committed { .. }), "{r:?}");
        assert_eq!(img(), second);
    }

    #[test]
    fn a_seed_commit_writes_a_place_an_abandoned_seed_wrote_with_another_chunk() {
        let rt = runtime();
        let _rt = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let side = side(&store, dir.path(), Duration::from_secs(10));
        let first = image(3, 250);
        let put_all = |data: &[u8]| ask_and_put(&side, data, data.len() / CS);
        // A seed places every chunk, then is abandoned (no commit).
        put_all(&first);
        // The next seed holds at chunk 5 what chunk 7 holds: stored
        // already, so it is neither asked for nor placed at 5.
        let mut second = first.clone();
        second.copy_within(7 * CS..8 * CS, 5 * CS);
        let t = put_all(&second);
        let r = side.serve(Request::Commit {
            volume: "v".into(),
            root_node: t.root_node().encode(),
            fuzzy: None,
        });
        assert!(matches!(r, Response::Committed { .. }), "{r:?}");
        assert_eq!(
            std::fs::read(dir.path().join("replicas/v.img")).unwrap(),
            second,
            "the commit wrote chunk 5, which the image held from the first seed"
        );
    }

    #[test]
    fn a_restart_finishes_an_apply_that_a_crash_interrupted() {
        let rt = runtime();
        let _rt = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let side = side(&store, dir.path(), Duration::from_secs(10));
        let first = image(3, 250);
        let t1 = tree_of(&first);
        assert!(matches!(
            send_all(&side, &first, &t1, None),
            Response::Committed { .. }
        ));
        let second = image(5, 250);
        let t2 = tree_of(&second);
        assert!(matches!(
            send_all(&side, &second, &t2, None),
            Response::Committed { .. }
        ));
        // Rewind to the moment of a crash half way through writing the second
        // state: the record says "applying t2" over t1, and the image is torn.
        let mut rec = state::get_volume(&*store, "v").unwrap().unwrap();
        rec.committed = Some(t1.root);
        rec.applying = Some(t2.root);
        store
            .apply(
                vec![
                    state::put_volume_op(&rec),
                    Op::DeleteMeta(state::point_key("v", 2)),
                ],
                true,
            )
            .unwrap();
        let img = dir.path().join("replicas/v.img");
        let mut torn = second.clone();
        torn[100 * CS..].copy_from_slice(&first[100 * CS..]);
        torn[7 * CS..8 * CS].fill(0xEE);
        std::fs::write(&img, &torn).unwrap();
        // The daemon restarts.
        let side = self::side(&store, dir.path(), Duration::from_secs(10));
        side.recover().unwrap();
        assert_eq!(
            std::fs::read(&img).unwrap(),
            second,
            "the interrupted state is finished, byte for byte"
        );
        let rec = state::get_volume(&*store, "v").unwrap().unwrap();
        assert_eq!((rec.committed, rec.applying), (Some(t2.root), None));
        assert_eq!(
            state::list_points(&*store, "v")
                .unwrap()
                .last()
                .map(|p| p.root),
            Some(t2.root)
        );
    }

    fn records(side: &Arc<ReplicaSide>, recs: &[crate::volume::journal::Record]) -> Response {
        let raw: Vec<u8> = recs.iter().flat_map(|r| r.encode()).collect();
        side.serve(Request::Records {
            volume: "v".into(),
            first: recs[0].seq,
            data: zstd::bulk::compress(&raw, 1).unwrap(),
        })
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let t0 = std::time::Instant::now();
        while !f() {
            assert!(t0.elapsed().as_secs() < 20, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn records_that_arrive_during_a_resync_wait_for_its_commit_and_the_marker_makes_it_consistent()
    {
        use crate::volume::journal::{Kind, Record};
        let rt = runtime();
        let _rt = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let side = side(&store, dir.path(), Duration::from_secs(3600));
        let pass = |data: &[u8], from_seq: u64, consistent_at: u64| {
            let t = tree_of(data);
            side.serve(Request::Open {
                volume: "v".into(),
                size: data.len() as u64,
                chunk_size: CS as u32,
                mode: Mode::Async,
                history: history(),
            });
            side.serve(Request::PutNodes {
                volume: "v".into(),
                nodes: nodes_of(&t),
            });
            let items = whole(data);
            side.serve(Request::PutChunks {
                volume: "v".into(),
                items,
            });
            side.serve(Request::Commit {
                volume: "v".into(),
                root_node: t.root_node().encode(),
                fuzzy: Some(FuzzyCommit {
                    from_seq,
                    consistent_at,
                }),
            })
        };
        let begin = |from_seq: u64| {
            side.serve(Request::ResyncBegin {
                volume: "v".into(),
                from_seq,
                incarnation: 7,
            })
        };
        let points = || state::list_points(&*store, "v").unwrap();
        let rec = || state::get_volume(&*store, "v").unwrap().unwrap();
        // A commit without an open resync is refused.
        let a = image(1, 40);
        let r = pass(&a, 1, 0);
        assert!(
            matches!(r, Response::Error { ref message, .. } if message.contains("no resync is open")),
            "{r:?}"
        );
        // A seed read while nothing was written: consistent at once, with a point.
        assert!(matches!(begin(1), Response::Ok));
        assert!(matches!(pass(&a, 1, 0), Response::CommittedFuzzy));
        wait_for("the seed's point", || points().len() == 1);
        assert_eq!(points()[0].root, tree_of(&a).root);
        assert_eq!(rec().stream.source, 7);

        let w = |seq, offset: u64, byte: u8| Record {
            seq,
            epoch: 1,
            kind: Kind::Write,
            offset,
            len: 4096,
            data: vec![byte; 4096],
        };
        let flush = |seq| Record {
            seq,
            epoch: 1,
            kind: Kind::Flush,
            offset: 0,
            len: 0,
            data: vec![],
        };
        // A resync from record 10: records 10 and 11 arrive while the pass
        // runs; they are durable (a sync flush may complete on them) but not
        // applied: the image keeps its last state.
        assert!(matches!(begin(10), Response::Ok));
        assert!(!state::consistent(&rec()));
        // The primary keeps several batches in flight: record 11's batch
        // arrives first and waits for record 10's.
        let early = {
            let (side, r) = (side.clone(), w(11, CS as u64 * 3, 8));
            std::thread::spawn(move || records(&side, &[r]))
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!early.is_finished(), "the early batch waits");
        let r = records(&side, &[w(10, 0, 7)]);
        assert!(matches!(r, Response::Durable { upto: 10, .. }), "{r:?}");
        let r = early.join().unwrap();
        assert!(matches!(r, Response::Durable { upto: 11, .. }), "{r:?}");
        // Both sent again (a lost answer): nothing changes.
        let r = records(&side, &[w(10, 0, 7), w(11, CS as u64 * 3, 8)]);
        assert!(matches!(r, Response::Durable { upto: 11, .. }), "{r:?}");
        let img = || std::fs::read(dir.path().join("replicas/v.img")).unwrap();
        assert_eq!(img(), a, "held records are not applied before the commit");
        // The pass read chunks up to record 12: consistent once 12 is applied.
        let b = image(2, 40);
        assert!(matches!(pass(&b, 10, 12), Response::CommittedFuzzy));
        let r = side.serve(Request::CreatePoint { volume: "v".into() });
        assert!(
            matches!(r, Response::Error { ref message, .. } if message.contains("not consistent")),
            "{r:?}"
        );
        assert_eq!(points().len(), 1);
        // A flush at 11 is not enough (11 < the marker 12).
        let r = records(&side, &[flush(12)]);
        assert!(matches!(r, Response::Durable { upto: 12, .. }), "{r:?}");
        wait_for("consistency and its point", || points().len() == 2);
        let mut want = b.clone();
        want[..4096].fill(7);
        want[CS * 3..CS * 3 + 4096].fill(8);
        assert!(
            img() == want,
            "the image is the resynced state plus the stream"
        );
        assert!(state::consistent(&rec()));
        assert_eq!(
            points()[1].root,
            tree_of(&want).root,
            "the point names the image"
        );
        assert_eq!(points()[1].seq, Some(12));
        assert_eq!(points()[1].source, "resync complete");
        // A record past the end of the volume is refused before anything is stored.
        let r = records(&side, &[w(13, want.len() as u64 - 100, 1)]);
        assert!(
            matches!(r, Response::Error { ref message, code: ErrorCode::Malformed } if message.contains("past the end")),
            "{r:?}"
        );
        // A stream from another journal must resync.
        let r = side.serve(Request::StreamOpen {
            volume: "v".into(),
            size: want.len() as u64,
            chunk_size: CS as u32,
            mode: Mode::Async,
            incarnation: 8,
        });
        assert!(
            matches!(r, Response::StreamOpened { resync: Some(ref why), .. } if why.contains("journal")),
            "{r:?}"
        );
    }

    #[test]
    fn repair_of_a_continuous_replica_rebuilds_chunks_with_the_records_applied_since_its_point() {
        use crate::volume::journal::{Kind, Record};
        let rt = runtime();
        let _rt = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let side = side(&store, dir.path(), Duration::from_secs(3600));
        let a = image(4, 16);
        let t = tree_of(&a);
        side.serve(Request::Open {
            volume: "v".into(),
            size: a.len() as u64,
            chunk_size: CS as u32,
            mode: Mode::Async,
            history: history(),
        });
        assert!(matches!(
            side.serve(Request::ResyncBegin {
                volume: "v".into(),
                from_seq: 1,
                incarnation: 1
            }),
            Response::Ok
        ));
        side.serve(Request::PutNodes {
            volume: "v".into(),
            nodes: nodes_of(&t),
        });
        let items = whole(&a);
        side.serve(Request::PutChunks {
            volume: "v".into(),
            items,
        });
        let r = side.serve(Request::Commit {
            volume: "v".into(),
            root_node: t.root_node().encode(),
            fuzzy: Some(FuzzyCommit {
                from_seq: 1,
                consistent_at: 0,
            }),
        });
        assert!(matches!(r, Response::CommittedFuzzy), "{r:?}");
        // A record written under another epoch (another lineage) is refused
        // and nothing of its batch is taken.
        let stale = Record {
            seq: 1,
            epoch: 2,
            kind: Kind::Write,
            offset: 0,
            len: 4,
            data: vec![0xee; 4],
        };
        let r = records(&side, &[stale]);
        assert!(
            matches!(
                &r,
                Response::Error {
                    code: ErrorCode::StaleEpoch,
                    ..
                }
            ),
            "{r:?}"
        );
        // Half of chunk 1 rewritten, applied, in no point.
        let r = records(
            &side,
            &[
                Record {
                    seq: 1,
                    epoch: 1,
                    kind: Kind::Write,
                    offset: CS as u64 + 1024,
                    len: 2048,
                    data: vec![0x5a; 2048],
                },
                Record {
                    seq: 2,
                    epoch: 1,
                    kind: Kind::Flush,
                    offset: 0,
                    len: 0,
                    data: vec![],
                },
            ],
        );
        assert!(matches!(r, Response::Durable { upto: 2, .. }), "{r:?}");
        let img = dir.path().join("replicas/v.img");
        let mut want = a.clone();
        want[CS + 1024..CS + 3072].fill(0x5a);
        wait_for("the record applied", || {
            std::fs::read(&img).unwrap() == want
        });
        // The disk damages chunk 1; a repair puts back what it must hold now.
        let mut bad = want.clone();
        bad[CS + 10] ^= 0xff;
        std::fs::write(&img, &bad).unwrap();
        let r = side.serve(Request::Repair {
            volume: "v".into(),
            indices: vec![1],
        });
        assert!(matches!(r, Response::Repaired { chunks: 1 }), "{r:?}");
        assert!(std::fs::read(&img).unwrap() == want);
    }

    /// A store whose space reclaim fails while `fail` is set; the rest of
    /// what a store must do is `inner`'s (deltas are stored whole, as the
    /// trait's defaults do: the test below stores none).
    struct ReclaimFails {
        inner: MemoryStore,
        fail: AtomicBool,
        reclaims: AtomicU64,
    }

    impl ChunkStore for ReclaimFails {
        fn put_chunk(&self, hash: &Hash, data: &[u8]) -> Result<bool, StoreError> {
            self.inner.put_chunk(hash, data)
        }
        fn replace_chunk(&self, hash: &Hash, data: &[u8]) -> Result<(), StoreError> {
            self.inner.replace_chunk(hash, data)
        }
        fn get_chunk(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get_chunk(hash)
        }
        fn has_chunk(&self, hash: &Hash) -> Result<bool, StoreError> {
            self.inner.has_chunk(hash)
        }
        fn get_node(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get_node(hash)
        }
        fn has_node(&self, hash: &Hash) -> Result<bool, StoreError> {
            self.inner.has_node(hash)
        }
        fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get_meta(key)
        }
        fn scan_meta(&self, prefix: &[u8]) -> Result<Vec<crate::store::MetaEntry>, StoreError> {
            self.inner.scan_meta(prefix)
        }
        fn apply(&self, ops: Vec<Op>, durable: bool) -> Result<(), StoreError> {
            self.inner.apply(ops, durable)
        }
        fn stats(&self) -> Result<crate::store::StoreStats, StoreError> {
            self.inner.stats()
        }
        fn reclaim_space(&self) -> Result<crate::store::Reclaimed, StoreError> {
            self.reclaims.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError::Write(
                    "compaction: No space left on device".into(),
                ));
            }
            Ok(crate::store::Reclaimed {
                bytes_before: 1000,
                bytes_after: 400,
                relocated: false,
            })
        }
        fn chunk_names(&self) -> Result<Vec<Hash>, StoreError> {
            self.inner.chunk_names()
        }
        fn node_names(&self) -> Result<Vec<Hash>, StoreError> {
            self.inner.node_names()
        }
    }

    /// Waits (bounded) until `n` reclaims ran and none is running.
    fn reclaims_done(side: &ReplicaSide, store: &ReclaimFails, n: u64) {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while store.reclaims.load(Ordering::SeqCst) < n || side.reclaim_running() {
            assert!(std::time::Instant::now() < until, "no reclaim ran");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_failed_reclaim_is_reported_kept_past_collections_and_retried_until_it_succeeds() {
        let rt = runtime();
        let _rt = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let failing = Arc::new(ReclaimFails {
            inner: MemoryStore::new(),
            fail: AtomicBool::new(true),
            reclaims: AtomicU64::new(0),
        });
        let store: Arc<dyn ChunkStore> = failing.clone();
        let side = side(&store, dir.path(), Duration::from_secs(10));
        let garbage = |seed: u8| {
            let c = image(seed, 2)[CS..].to_vec();
            store.put_chunk(&Hash::of_chunk(&c), &c).unwrap();
        };
        // A collection that deletes a chunk starts a reclaim; it fails.
        garbage(3);
        side.gc_due();
        side.collect_garbage_if_due();
        reclaims_done(&side, &failing, 1);
        assert_eq!(side.gc_failures.load(Ordering::Relaxed), 1);
        assert_eq!(side.reclaimed_bytes.load(Ordering::Relaxed), 0);
        let err = side
            .last_gc_error()
            .expect("the failure shows in the status");
        assert!(
            err.contains("reclaiming space") && err.contains("No space left"),
            "{err}"
        );
        // The next collection deletes nothing, succeeds, and keeps the
        // reclaim's error; it tries the reclaim again, which fails again.
        side.gc_due();
        side.collect_garbage_if_due();
        reclaims_done(&side, &failing, 2);
        assert_eq!(side.gc_failures.load(Ordering::Relaxed), 2);
        assert!(
            side.last_gc_error().is_some(),
            "a collection does not clear it"
        );
        // Room again: the next collection's retry succeeds and clears it.
        failing.fail.store(false, Ordering::SeqCst);
        side.gc_due();
        side.collect_garbage_if_due();
        reclaims_done(&side, &failing, 3);
        assert_eq!(side.last_gc_error(), None);
        assert_eq!(side.gc_failures.load(Ordering::Relaxed), 2);
        assert_eq!(side.reclaimed_bytes.load(Ordering::Relaxed), 600);
        // With nothing deleted and nothing to retry, no reclaim runs.
        // (A reclaim is marked running before this returns, and counted
        // before it is marked done.)
        side.gc_due();
        side.collect_garbage_if_due();
        reclaims_done(&side, &failing, 3);
        assert_eq!(failing.reclaims.load(Ordering::SeqCst), 3);
        // A collection that deletes something reclaims again.
        garbage(5);
        side.gc_due();
        side.collect_garbage_if_due();
        reclaims_done(&side, &failing, 4);
        assert_eq!(side.reclaimed_bytes.load(Ordering::Relaxed), 1200);
    }

    #[test]
    fn points_of_every_volume_are_gc_roots_whatever_its_role() {
        let rt = runtime();
        let _rt = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let side = side(&store, dir.path(), Duration::from_secs(10));
        let data = image(9, 10);
        let t = tree_of(&data);
        assert!(matches!(
            send_all(&side, &data, &t, None),
            Response::Committed { .. }
        ));
        // The volume becomes primary here (a failover): its points stay roots;
        // its committed state alone would not be one.
        let h = side.handle("v").unwrap();
        h.update(true, |r| r.role = Role::Primary).unwrap();
        let other = image(11, 10);
        let t2 = tree_of(&other);
        for c in other.chunks(CS).filter(|c| !is_all_zero(c)) {
            store.put_chunk(&Hash::of_chunk(c), c).unwrap();
        }
        let orphan = Hash::of_chunk(&other[CS..2 * CS]);
        assert!(store.has_chunk(&orphan).unwrap());
        let _ = t2;
        side.collect_garbage().unwrap();
        for c in data.chunks(CS).filter(|c| !is_all_zero(c)) {
            assert!(
                store.has_chunk(&Hash::of_chunk(c)).unwrap(),
                "a point's chunk was collected"
            );
        }
        assert!(!store.has_chunk(&orphan).unwrap(), "garbage is collected");
    }
}
