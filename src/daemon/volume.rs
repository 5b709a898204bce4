//! One handle per volume: its durable record, its role and epoch machine,
//! its write gate, its background jobs, and the parts its role and mode use
//! (the journaled export of a continuous primary, the redo log and applier
//! of a continuous replica, the intake of a replica's passes). A role change
//! goes through the handle and nowhere else.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::watch;

use super::Site;
use super::gate::Gate;
use super::replica_stream::ReplicaStream;
use super::runtime::VolumeRuntime;
use super::stream::VolumeStream;
use super::worker::{JobView, Jobs};
use crate::failover::epoch::History;
use crate::failover::role::{Command, Input, PeerVolume, Refusal, RoleMachine, RoleView};
use crate::hash::Hash;
use crate::nbd::{Export, FileExport};
use crate::proto::messages::{ErrorCode, VolumeHello};
use crate::store::state::{self, Role, VolumeRecord};
use crate::store::{ChunkStore, StoreError};

/// The shape of the pass a primary opened at this replica.
#[derive(Clone, Copy, Debug)]
pub struct Session {
    pub size: u64,
    pub chunk_size: u32,
}

/// What a volume has at this site, by role: the handle's role-tagged state.
/// A role change replaces it (after the jobs of the old role have stopped).
pub enum RoleParts {
    Primary {
        /// Continuous volumes: the journaled export, once its journal is open.
        stream: Option<Arc<VolumeStream>>,
        /// Snapshot volumes: the image, opened for NBD on first use.
        file: Option<Arc<GatedFile>>,
    },
    Replica {
        /// Continuous volumes: redo log and applier, once opened.
        stream: Option<Arc<ReplicaStream>>,
        intake: Box<PassIntake>,
    },
}

impl RoleParts {
    fn for_role(role: Role) -> RoleParts {
        match role {
            Role::Primary => RoleParts::Primary {
                stream: None,
                file: None,
            },
            Role::Replica => RoleParts::Replica {
                stream: None,
                intake: Box::default(),
            },
        }
    }
}

/// A replica's intake of its primary's passes.
#[derive(Default)]
pub struct PassIntake {
    pub session: Option<Session>,
    /// Chunks stored by the pass in progress (or an interrupted one the next
    /// pass resumes): garbage collection spares them until that pass commits.
    pub fresh: HashSet<Hash>,
    /// Of those, the ones still in memory for the commit to write.
    pub recent: super::recent::RecentChunks,
    /// Where the replica image holds the delta bases the pass was offered.
    pub bases: super::recent::PassBases,
    /// The committed tree those bases are leaves of: while it is still
    /// the committed tree (a collection root), a chunk rebuilt over one of
    /// them may be stored as a delta over it.
    pub bases_root: Option<Hash>,
    /// A seed (no committed state yet): where the chunks it asked about go
    /// in the image, so that each is written there as it arrives.
    pub places: super::recent::PassBases,
    /// What a seed wrote into the image so far (taken by the commit).
    pub placed: super::recent::Placed,
}

pub struct VolumeHandle {
    pub name: String,
    store: Arc<dyn ChunkStore>,
    rec: Mutex<VolumeRecord>,
    pub gate: Arc<Gate>,
    role: Mutex<RoleMachine>,
    /// The role machine's verdict: may replication of the volume run now?
    replicate: watch::Sender<bool>,
    pub jobs: Jobs,
    /// Passes (snapshot passes, seeds and resyncs): progress and results.
    pub run: Arc<VolumeRuntime>,
    parts: Mutex<RoleParts>,
    /// Held while a continuous primary's journal opens (see `Site::open_volume_stream`).
    pub stream_open: Mutex<()>,
    /// Replica: image-changing work (commits, applies, points, repairs),
    /// one at a time.
    pub io: Mutex<()>,
    /// An fsync of the replica image failed in this process: the page
    /// cache may then hold bytes the disk does not (Linux marks them
    /// clean), so a commit writes whole chunks instead of comparing with
    /// what the cache shows.
    pub image_sync_failed: std::sync::atomic::AtomicBool,
    /// The role machine found this site behind its peer: the history of the
    /// side that is ahead, for the job that makes this site its replica.
    behind: Mutex<Option<History>>,
    /// A restarted primary waits for the peer's `Hello` (or `startup_wait`)
    /// before it takes writes.
    awaiting_hello: std::sync::atomic::AtomicBool,
    /// NBD connections open on the export.
    nbd_clients: Arc<std::sync::atomic::AtomicUsize>,
    /// The epoch of the recorded history, for the journal's records
    /// (follows every change of the record).
    epoch: Arc<std::sync::atomic::AtomicU64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a restarted primary's gate is closed until the peer's `Hello`.
pub const AWAITING_HELLO: &str = "waiting for the peer's Hello before taking writes (startup_wait): the other site may have been promoted";

/// Why a peer's write was refused, as a wire error code.
pub fn refusal_code(r: &Refusal) -> ErrorCode {
    match r {
        Refusal::NotReplica => ErrorCode::NotReplica,
        Refusal::NotPrimary | Refusal::Fenced(_) => ErrorCode::Refused,
        Refusal::StaleEpoch { .. } => ErrorCode::StaleEpoch,
        Refusal::SplitBrain => ErrorCode::SplitBrain,
        Refusal::Behind => ErrorCode::Behind,
    }
}

impl VolumeHandle {
    /// A handle for a volume as recorded (at start, or just created). With
    /// `await_hello`, a primary's gate stays closed until the peer's `Hello`
    /// or `startup_wait_over`.
    pub fn new(
        store: Arc<dyn ChunkStore>,
        rec: VolumeRecord,
        await_hello: bool,
    ) -> Arc<VolumeHandle> {
        let mut role = RoleMachine::new(
            rec.role,
            rec.history.clone(),
            rec.fenced.clone(),
            rec.split_brain,
        );
        role.set_superseded(rec.superseded.clone());
        let role_now = rec.role;
        let epoch = Arc::new(std::sync::atomic::AtomicU64::new(rec.history.epoch()));
        let closed = match rec.role {
            Role::Primary => rec.fenced.clone(),
            Role::Replica => Some("the volume is a replica at this site".into()),
        };
        let h = Arc::new(VolumeHandle {
            name: rec.name.clone(),
            store,
            gate: Arc::new(Gate::new(closed)),
            role: Mutex::new(role),
            replicate: watch::channel(rec.role == Role::Primary && !rec.split_brain).0,
            rec: Mutex::new(rec),
            jobs: Jobs::default(),
            run: Arc::new(VolumeRuntime::default()),
            parts: Mutex::new(RoleParts::for_role(role_now)),
            stream_open: Mutex::new(()),
            io: Mutex::new(()),
            image_sync_failed: Default::default(),
            behind: Mutex::new(None),
            awaiting_hello: std::sync::atomic::AtomicBool::new(false),
            nbd_clients: Default::default(),
            epoch,
        });
        h.carry_out_role_commands();
        if await_hello && h.role() == Role::Primary && h.gate.is_open() {
            h.awaiting_hello
                .store(true, std::sync::atomic::Ordering::SeqCst);
            h.gate.close(AWAITING_HELLO);
        }
        h
    }

    /// A primary waiting for the peer's first `Hello` before taking writes.
    pub fn awaiting_hello(&self) -> bool {
        self.awaiting_hello
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Ends the wait for the peer's `Hello`: the gate opens unless the role
    /// machine fenced the volume meanwhile.
    fn end_hello_wait(&self, why: &str) {
        if !self
            .awaiting_hello
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        if self.role() == Role::Primary && lock(&self.role).admit_local_write().is_ok() {
            self.gate.open();
            tracing::info!(volume = %self.name, "{why}: the volume takes writes");
        }
    }

    /// `startup_wait` passed without a `Hello` from the peer.
    pub fn startup_wait_over(&self) {
        if self.awaiting_hello() {
            tracing::warn!(volume = %self.name, "no Hello from the peer within startup_wait; if the other site was promoted meanwhile, writes taken from now on are set aside when the link returns");
        }
        self.end_hello_wait("startup_wait passed");
    }

    /// The volume's record as it is now.
    pub fn record(&self) -> VolumeRecord {
        lock(&self.rec).clone()
    }

    pub fn role(&self) -> Role {
        lock(&self.rec).role
    }

    /// Changes the record durably (or not, when `durable` is false: a lost
    /// change must be harmless then); memory changes only if the store did.
    pub fn update<R>(
        &self,
        durable: bool,
        f: impl FnOnce(&mut VolumeRecord) -> R,
    ) -> Result<R, StoreError> {
        let mut g = lock(&self.rec);
        let mut next = g.clone();
        let r = f(&mut next);
        self.store
            .apply(vec![state::put_volume_op(&next)], durable)?;
        self.set(&mut g, next);
        Ok(r)
    }

    /// Writes `ops` and the record `next` in one batch, then takes `next`
    /// as the record (a commit, a point).
    pub fn apply_with(
        &self,
        mut ops: Vec<crate::store::Op>,
        next: VolumeRecord,
        durable: bool,
    ) -> Result<(), StoreError> {
        let mut g = lock(&self.rec);
        ops.push(state::put_volume_op(&next));
        self.store.apply(ops, durable)?;
        self.set(&mut g, next);
        Ok(())
    }

    fn set(&self, g: &mut VolumeRecord, next: VolumeRecord) {
        self.epoch
            .store(next.history.epoch(), std::sync::atomic::Ordering::SeqCst);
        *g = next;
    }

    /// The epoch of the recorded history, shared with the journal writer.
    pub fn epoch_cell(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.epoch.clone()
    }

    /// What this site says about the volume in its `Hello`.
    pub fn hello(&self) -> VolumeHello {
        let g = lock(&self.rec);
        VolumeHello {
            name: g.name.clone(),
            role: g.role,
            history: g.history.clone(),
        }
    }

    /// The peer's `Hello` said this about the volume (`None`: it does not know it).
    pub fn peer_hello(&self, peer: Option<&VolumeHello>) {
        let input = Input::PeerHello(peer.map(|p| PeerVolume {
            role: p.role,
            history: p.history.clone(),
        }));
        lock(&self.role).handle(input, Instant::now());
        self.carry_out_role_commands();
        self.end_hello_wait("the peer's Hello arrived");
    }

    /// NBD connections open on the volume's export now.
    pub fn nbd_clients(&self) -> usize {
        self.nbd_clients.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The counter an export's connections hold.
    pub fn nbd_counter(&self) -> Arc<std::sync::atomic::AtomicUsize> {
        self.nbd_clients.clone()
    }

    /// A planned switchover did not happen (the peer refused, or its
    /// `Hello` shows it was not promoted): the hand-over fence goes.
    pub fn unfence(&self) {
        lock(&self.role).unfence();
        self.carry_out_role_commands();
        if let Err(e) = self.update(true, |r| {
            r.fenced = None;
            r.handoff = None;
            r.handoff_checksum = 0;
        }) {
            tracing::error!(volume = %self.name, error = %e, "cannot record the end of the fence; it holds until the next start");
        }
    }

    /// `ferry demote`: fences a primary durably, promoting nothing.
    pub fn demote(&self, reason: &str) -> Result<(), String> {
        if self.role() != Role::Primary {
            return Err(format!(
                "volume {} is a replica here; only a primary is demoted",
                self.name
            ));
        }
        lock(&self.role).handle(
            Input::Demote {
                reason: reason.to_string(),
            },
            Instant::now(),
        );
        self.carry_out_role_commands();
        match self.record().fenced {
            Some(_) => Ok(()),
            None => Err("the fence could not be recorded; see the daemon's log".into()),
        }
    }

    /// A primary cut off from its peer asserts that it stays primary: the
    /// new entry is durable first, then the role machine compares with it.
    pub fn assert_entry(&self, e: crate::failover::epoch::EpochEntry) -> Result<(), String> {
        if self.role() != Role::Primary {
            return Err(format!("volume {} is not primary here", self.name));
        }
        self.update(true, |r| {
            r.history.push(e.clone());
            if r.mode.continuous() {
                // With the epoch, durably: the journal does not continue
                // the old one (whatever the stream did before). A journal
                // that journaled until now (its stream not open, or no
                // fallback) is replayed whole at its next open.
                if !r.stream.resync_needed {
                    r.stream.replay_from = Some(0);
                }
                r.stream.resync_needed = true;
                r.stream.resync_reason = "this site asserted that it stays primary while cut off (failover --force): the other site is brought level by a tree comparison".into();
            }
        })
        .map_err(|e| format!("cannot record the new epoch: {e}"))?;
        lock(&self.role).assert_local(e);
        Ok(())
    }

    pub fn link_down(&self) {
        lock(&self.role).handle(Input::LinkDown, Instant::now());
        self.carry_out_role_commands();
    }

    /// A replica's first request from its primary carries the primary's
    /// history: a new replica adopts it; any other relation is refused.
    pub fn adopt_history(&self, history: &History) -> Result<(), Refusal> {
        let r = lock(&self.role).adopt(history.clone());
        self.carry_out_role_commands();
        r?;
        if self.record().history.is_empty() {
            self.update(true, |r| r.history = history.clone())
                .map_err(|e| Refusal::Fenced(format!("cannot record the history: {e}")))?;
        }
        Ok(())
    }

    /// The history of the side that is ahead, once, when the role machine
    /// found this site behind.
    pub fn take_behind(&self) -> Option<History> {
        lock(&self.behind).take()
    }

    /// The newest entry of the peer's last `Hello` for the volume.
    pub fn peer_top(&self) -> Option<crate::failover::epoch::EpochEntry> {
        lock(&self.role).peer_top()
    }

    /// May the peer write this volume here now?
    pub fn admit_peer_write(&self) -> Result<(), Refusal> {
        lock(&self.role).admit_peer_write()
    }

    /// Waits until no peer write is writing the image (a commit holds the
    /// io lock for all it writes). After `hold_peer_writes`, one admitted
    /// before the hold has then finished, and one that takes the lock
    /// later refuses (it checks again under the lock).
    pub fn wait_for_image_writes(&self) {
        drop(lock(&self.io));
    }

    /// A promotion holds the peer's writes now.
    pub fn peer_writes_held(&self) -> bool {
        lock(&self.role).is_held()
    }

    /// Refuses the peer's writes from now on (`Some`), or again admits them.
    pub fn hold_peer_writes(&self, why: Option<String>) {
        lock(&self.role).hold_peer_writes(why);
    }

    /// Changes the volume's role: its jobs stop, `ops` and `next` are
    /// written in one durable batch (role and history never disagree on
    /// disk), the role machine, parts and gate are rebuilt from `next`, and
    /// the new role's jobs start. On a failed write the old role's jobs
    /// start again and nothing changed.
    pub async fn change_role(
        self: &Arc<Self>,
        site: &Arc<Site>,
        ops: Vec<crate::store::Op>,
        next: VolumeRecord,
    ) -> Result<(), StoreError> {
        self.jobs.stop_all().await;
        if let Err(e) = self.apply_with(ops, next.clone(), true) {
            self.start(site);
            return Err(e);
        }
        *lock(&self.parts) = RoleParts::for_role(next.role);
        let mut m = RoleMachine::new(
            next.role,
            next.history.clone(),
            next.fenced.clone(),
            next.split_brain,
        );
        m.set_superseded(next.superseded.clone());
        *lock(&self.role) = m;
        self.replicate
            .send_replace(next.role == Role::Primary && !next.split_brain);
        self.carry_out_role_commands();
        self.start(site);
        Ok(())
    }

    pub fn role_view(&self) -> RoleView {
        let mut v = lock(&self.role).view(Instant::now());
        // What the jobs go by: a primary added after the last Hello
        // replicates until a Hello says otherwise.
        v.replicating = self.replicating();
        v
    }

    /// Waits for the role machine's verdict on replication.
    pub fn replicate_watch(&self) -> watch::Receiver<bool> {
        self.replicate.subscribe()
    }

    pub fn replicating(&self) -> bool {
        *self.replicate.borrow()
    }

    /// Carries out what the role machine decided, in order.
    fn carry_out_role_commands(&self) {
        loop {
            let cmd = lock(&self.role).poll();
            let Some(cmd) = cmd else { break };
            match cmd {
                Command::OpenGate => self.gate.open(),
                Command::CloseGate { reason } => {
                    self.gate.close(&reason);
                    if self.role() == Role::Primary {
                        tracing::warn!(volume = %self.name, reason, "volume fenced: no more writes at this site");
                        if let Err(e) = self.update(true, |r| r.fenced = Some(reason.clone())) {
                            tracing::error!(volume = %self.name, error = %e, "cannot record the fence; it holds until the daemon stops");
                        }
                    }
                }
                Command::AdoptHistory(h) => {
                    if let Err(e) = self.update(true, |r| r.history = h) {
                        tracing::error!(volume = %self.name, error = %e, "cannot record the adopted history");
                    }
                }
                Command::Replicate => {
                    self.replicate
                        .send_if_modified(|r| !std::mem::replace(r, true));
                }
                Command::Pause { reason } => {
                    if self
                        .replicate
                        .send_if_modified(|r| std::mem::replace(r, false))
                    {
                        tracing::warn!(volume = %self.name, reason, "replication of the volume paused");
                    }
                }
                Command::SplitBrain { local, peer } => {
                    tracing::error!(volume = %self.name, ?local, ?peer, "SPLIT BRAIN: the two sites' histories of this volume forked; replication stopped, each site keeps serving as it was");
                    if let Err(e) = self.update(true, |r| r.split_brain = true) {
                        tracing::error!(volume = %self.name, error = %e, "cannot record the split brain");
                    }
                }
                Command::KeepDivergent { since } => {
                    // Carried out by the job that makes this site a replica
                    // (`failover::become_replica`), before anything is overwritten.
                    tracing::warn!(volume = %self.name, ?since, "this site is behind its peer; its state is kept as a divergent point before it is resynced");
                }
                Command::ResyncFrom { ahead } => {
                    tracing::warn!(volume = %self.name, epoch = ahead.epoch(), "this site is behind its peer: it becomes its replica and is resynced from it");
                    *lock(&self.behind) = Some(ahead);
                }
            }
        }
    }

    /// The NBD export of a primary volume (none while the gate is closed).
    pub fn export(&self, fsync: bool) -> Option<Arc<dyn Export>> {
        if !self.gate.is_open() {
            return None;
        }
        let rec = self.record();
        let mut parts = lock(&self.parts);
        let RoleParts::Primary { stream, file } = &mut *parts else {
            return None;
        };
        if rec.mode.continuous() {
            // Writes go through the journal; no journal, no export.
            return stream.clone().map(|s| s as Arc<dyn Export>);
        }
        if let Some(e) = file {
            return Some(e.clone() as Arc<dyn Export>);
        }
        match FileExport::open(&rec.path, fsync) {
            Ok(f) => {
                let e = Arc::new(GatedFile {
                    file: f,
                    gate: self.gate.clone(),
                });
                *file = Some(e.clone());
                Some(e as Arc<dyn Export>)
            }
            Err(e) => {
                tracing::error!(volume = %self.name, error = %e, "cannot open the volume for NBD");
                None
            }
        }
    }

    /// A continuous primary's journaled export, once opened.
    pub fn set_volume_stream(&self, vs: Arc<VolumeStream>) {
        if let RoleParts::Primary { stream, .. } = &mut *lock(&self.parts) {
            *stream = Some(vs);
        }
    }

    /// A continuous replica's redo log and applier: the one there, or `open`'s.
    pub fn replica_stream_or<E>(
        &self,
        open: impl FnOnce() -> Result<Arc<ReplicaStream>, E>,
    ) -> Result<Option<Arc<ReplicaStream>>, E> {
        let mut parts = lock(&self.parts);
        let RoleParts::Replica { stream, .. } = &mut *parts else {
            return Ok(None);
        };
        if stream.is_none() {
            *stream = Some(open()?);
        }
        Ok(stream.clone())
    }

    /// A replica's pass intake (`None` at a primary).
    pub fn with_intake<R>(&self, f: impl FnOnce(&mut PassIntake) -> R) -> Option<R> {
        match &mut *lock(&self.parts) {
            RoleParts::Replica { intake, .. } => Some(f(intake)),
            RoleParts::Primary { .. } => None,
        }
    }

    /// Starts the jobs the volume's role and mode need.
    pub fn start(self: &Arc<Self>, site: &Arc<Site>) {
        let rec = self.record();
        match (rec.role, rec.mode.continuous()) {
            (Role::Primary, true) => {
                // The export exists once the journal is open: open it now, so
                // that a client may write the moment the volume is added (or
                // the daemon has started). On failure the job tries again.
                if let Err(e) = tokio::task::block_in_place(|| site.open_volume_stream(self)) {
                    tracing::error!(volume = %self.name, error = %e, "cannot open the volume's journal; its stream job retries")
                }
                super::streamer::spawn(site, self)
            }
            (Role::Primary, false) => super::primary::spawn_passes(site, self),
            (Role::Replica, true) => {
                if rec.committed.is_some() || rec.stream.resync_from.is_some() {
                    super::replica_stream::spawn(&site.replica, self);
                }
            }
            (Role::Replica, false) => {}
        }
    }

    /// Stops every job of the volume and waits for them.
    pub async fn stop(&self) {
        self.jobs.stop_all().await;
    }

    pub fn job_views(&self) -> Vec<JobView> {
        self.jobs.views()
    }

    /// The replica's continuous part, if open.
    pub fn replica_stream(&self) -> Option<Arc<ReplicaStream>> {
        match &*lock(&self.parts) {
            RoleParts::Replica { stream, .. } => stream.clone(),
            RoleParts::Primary { .. } => None,
        }
    }

    /// The primary's journaled export, if open.
    pub fn volume_stream(&self) -> Option<Arc<VolumeStream>> {
        match &*lock(&self.parts) {
            RoleParts::Primary { stream, .. } => stream.clone(),
            RoleParts::Replica { .. } => None,
        }
    }

    /// Unix seconds the volume was created here.
    pub fn created(&self) -> u64 {
        lock(&self.rec).created
    }
}

/// A snapshot volume's image behind the volume's write gate.
pub struct GatedFile {
    file: FileExport,
    gate: Arc<Gate>,
}

fn fenced(why: String) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!("volume is not writable here: {why}"),
    )
}

impl Export for GatedFile {
    fn size(&self) -> u64 {
        self.file.size()
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read(off, buf)
    }

    fn write(&self, off: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        let _pass = self.gate.enter().map_err(fenced)?;
        self.file.write(off, data, fua)
    }

    fn flush(&self) -> std::io::Result<()> {
        self.file.flush()
    }

    fn trim(&self, off: u64, len: u64) -> std::io::Result<()> {
        let _pass = self.gate.enter().map_err(fenced)?;
        self.file.trim(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> std::io::Result<()> {
        let _pass = self.gate.enter().map_err(fenced)?;
        self.file.write_zeroes(off, len, fua)
    }

    fn revoked(&self) -> Option<watch::Receiver<u64>> {
        Some(self.gate.watch())
    }

    fn allocation(
        &self,
        off: u64,
        len: u64,
        runs_max: usize,
    ) -> std::io::Result<Vec<crate::nbd::Extent>> {
        self.file.allocation(off, len, runs_max)
    }

    fn zeroes_fast(&self) -> bool {
        self.file.zeroes_fast()
    }

    fn multi_conn(&self) -> bool {
        self.file.multi_conn()
    }
}

/// `fenced` for the journaled export too.
pub fn gate_error(why: String) -> std::io::Error {
    fenced(why)
}
