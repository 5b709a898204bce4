//! Serving NBD connections: the handshake, then requests read in order and
//! carried out concurrently, replies matched by handle. Every length and
//! offset is checked before anything is allocated.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, mpsc};

use super::export::{Export, Exports, Extent};
use super::proto::*;

/// Per-connection bounds (invariant 6).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest READ or WRITE payload; advertised as the maximum block size.
    pub request_bytes_max: u32,
    /// Requests carried out at once per connection; more wait in the socket.
    pub inflight_max: usize,
    /// Options a client may send before it picks an export.
    pub options_max: usize,
    /// Largest option payload read into memory.
    pub option_bytes_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_bytes_max: 32 << 20,
            inflight_max: 64,
            options_max: 64,
            option_bytes_max: 16 << 10,
        }
    }
}

/// Replies gathered into one write, at most (a large read goes alone).
const REPLY_BATCH_BYTES: usize = 256 << 10;
/// How long a reply may wait for the client to read it.
const REPLY_WRITE_MAX: Duration = Duration::from_secs(60);
/// Requests up to this size run in place on the connection's task.
const INLINE_BYTES_MAX: u64 = 256 << 10;
/// Read buffer per connection: request headers and small writes arrive in few reads.
const READ_BUFFER_BYTES: usize = 256 << 10;

/// Told the latency of each request: (export, command, duration).
pub type Observer = Arc<dyn Fn(&str, &'static str, Duration) + Send + Sync>;

/// Binds the Unix socket clients connect to (mode 0660), replacing a stale one.
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    }
    Ok(listener)
}

/// Backoff of an accept loop after a failed accept (out of descriptors):
/// the pending connection waits in the backlog until descriptors are free.
pub const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("client closed the connection")]
    Closed,
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

pub(super) fn eof(e: std::io::Error) -> NbdError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        NbdError::Closed
    } else {
        NbdError::Io(e)
    }
}

/// Payload bytes of READ and WRITE requests held in memory at once,
/// across every connection of a server, counted in 4 KiB units: a request
/// takes its share before its buffer is allocated (invariant 6).
pub struct Budget {
    units: Arc<Semaphore>,
    total: u32,
}

const BUDGET_UNIT: u64 = 4096;

impl Budget {
    /// A budget of `bytes` (at least one largest request).
    pub fn new(bytes: u64, request_bytes_max: u32) -> Budget {
        let total = (bytes.max(request_bytes_max as u64) / BUDGET_UNIT).min(u32::MAX as u64) as u32;
        Budget {
            units: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    async fn take(&self, len: u64) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.units
            .clone()
            .acquire_many_owned(self.units(len))
            .await
            .ok()
    }

    /// `take` when the share is free now.
    fn try_take(&self, len: u64) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.units
            .clone()
            .try_acquire_many_owned(self.units(len))
            .ok()
    }

    fn units(&self, len: u64) -> u32 {
        len.div_ceil(BUDGET_UNIT).clamp(1, self.total as u64) as u32
    }
}

/// Serves one connection: handshake, then transmission until DISC or EOF.
pub async fn serve_conn<S>(
    stream: S,
    exports: Arc<dyn Exports>,
    limits: Limits,
    budget: Arc<Budget>,
    observer: Option<Observer>,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let Some(session) = super::handshake::handshake(&mut rd, &mut wr, &*exports, limits).await?
    else {
        return Ok(());
    };
    let rd = tokio::io::BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    transmission(rd, wr, session, limits, budget, observer).await
}

pub(super) async fn discard<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> Result<(), NbdError> {
    let copied = tokio::io::copy(&mut r.take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        Err(NbdError::Closed)
    } else {
        Ok(())
    }
}

/// How a reply goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// A simple reply: its header, then a read's data.
    Simple,
    /// A structured reply in one chunk: a read's data from this offset,
    /// or its error.
    Data(u64),
    /// A structured BLOCK_STATUS chunk (`data` is its payload), or its error.
    Status,
}

impl Form {
    /// READ and BLOCK_STATUS are answered structured once the client asked
    /// for it; every other command keeps simple replies (which the
    /// protocol allows).
    fn of(cmd: u16, off: u64, structured: bool) -> Form {
        match cmd {
            CMD_READ if structured => Form::Data(off),
            CMD_BLOCK_STATUS if structured => Form::Status,
            _ => Form::Simple,
        }
    }
}

/// Runs one BLOCK_STATUS reply describes at most: 32 KiB of payload.
const BLOCK_STATUS_RUNS_MAX: usize = 4096;

/// One reply: header and, for a successful read, its data.
struct Reply {
    handle: u64,
    error: u32,
    form: Form,
    data: Vec<u8>,
    /// The request's share of the server's payload budget, given back once
    /// the reply is written (a client that does not read its replies holds
    /// its reads' buffers, and so waits for the budget, not the daemon).
    held: Option<tokio::sync::OwnedSemaphorePermit>,
}

async fn transmission<R, W>(
    mut r: tokio::io::BufReader<R>,
    mut w: W,
    session: super::handshake::Negotiated,
    limits: Limits,
    budget: Arc<Budget>,
    observer: Option<Observer>,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let super::handshake::Negotiated {
        name,
        export,
        structured,
        allocation,
    } = session;
    let (tx, mut rx) = mpsc::channel::<Reply>(limits.inflight_max);
    let writer = tokio::spawn(async move {
        let mut b = Vec::new();
        // The batch's shares of the payload budget, held until it is written.
        let mut holds = Vec::new();
        while let Some(first) = rx.recv().await {
            // Every reply ready now goes out in one write.
            b.clear();
            holds.clear();
            let mut next = Some(first);
            while let Some(rep) = next {
                encode_reply(&mut b, &rep);
                holds.push(rep.held);
                next = if b.len() < REPLY_BATCH_BYTES {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            // A client that stops reading its replies holds their share of
            // the budget: it gets a while, then the connection ends.
            match tokio::time::timeout(REPLY_WRITE_MAX, w.write_all(&b)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    tracing::warn!(
                        "an NBD client read no reply for {REPLY_WRITE_MAX:?}; closing its connection"
                    );
                    return;
                }
            }
            if b.capacity() > 2 * REPLY_BATCH_BYTES {
                // A large read went out: do not keep its buffer per connection.
                b = Vec::new();
            }
        }
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    });
    let slots = Arc::new(Semaphore::new(limits.inflight_max));
    // Small requests already read, not yet carried out (see `Smalls`).
    let mut smalls = Smalls {
        queue: Vec::new(),
        in_place: tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread,
        tx: tx.clone(),
        observer: observer.clone(),
        name: name.clone(),
    };
    let size = export.size();
    let max = limits.request_bytes_max as u64;
    let mut revoked = export.revoked();
    if let Some(w) = &mut revoked {
        w.mark_unchanged();
    }
    let result = loop {
        // Nothing queued waits on the client: the queue runs before any
        // read that would wait for it (the client may be waiting for those
        // replies before it sends more).
        if r.buffer().len() < 28 && smalls.run().await.is_err() {
            break Ok(());
        }
        let mut hdr = [0u8; 28];
        let read = r.read_exact(&mut hdr);
        // A withdrawn export ends the connection: the client learns at once
        // instead of at its next write.
        let got = match &mut revoked {
            Some(w) => tokio::select! {
                got = read => got,
                _ = w.changed() => {
                    tracing::info!(export = %name, "export withdrawn; closing the connection");
                    break Ok(());
                }
            },
            None => read.await,
        };
        if let Err(e) = got {
            break Err(eof(e));
        }
        let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        if magic != REQUEST_MAGIC {
            break Err(NbdError::Protocol(format!("bad request magic {magic:#x}")));
        }
        let flags = u16::from_be_bytes([hdr[4], hdr[5]]);
        let cmd = u16::from_be_bytes([hdr[6], hdr[7]]);
        let handle = u64::from_be_bytes(hdr[8..16].try_into().unwrap_or_default());
        let off = u64::from_be_bytes(hdr[16..24].try_into().unwrap_or_default());
        let len = u32::from_be_bytes([hdr[24], hdr[25], hdr[26], hdr[27]]) as u64;
        let in_range = off.checked_add(len).is_some_and(|end| end <= size);
        let fua = flags & CMD_FLAG_FUA != 0;
        // Checks that need no I/O answer at once; the connection lives on.
        let form = Form::of(cmd, off, structured);
        let reject = |error: u32| Reply {
            handle,
            error,
            form,
            data: Vec::new(),
            held: None,
        };
        let early = match cmd {
            CMD_DISC => break Ok(()),
            CMD_READ if len > max => Some(reject(EOVERFLOW)),
            CMD_READ if !in_range => Some(reject(EINVAL)),
            CMD_WRITE if len > max => {
                // Too large to hold: skip its payload in bounded pieces, then refuse it.
                if smalls.run().await.is_err() {
                    break Ok(());
                }
                if let Err(e) = discard(&mut r, len).await {
                    break Err(e);
                }
                Some(reject(EOVERFLOW))
            }
            CMD_WRITE if !in_range => {
                if smalls.run().await.is_err() {
                    break Ok(());
                }
                if let Err(e) = discard(&mut r, len).await {
                    break Err(e);
                }
                Some(reject(ENOSPC))
            }
            CMD_TRIM | CMD_WRITE_ZEROES if !in_range => Some(reject(ENOSPC)),
            // Fast zero: refused at once where zeroing would write zeros,
            // so the client writes them itself (or skips them).
            CMD_WRITE_ZEROES if flags & CMD_FLAG_FAST_ZERO != 0 && !export.zeroes_fast() => {
                Some(reject(ENOTSUP))
            }
            // Without `base:allocation` negotiated there is nothing to report.
            CMD_BLOCK_STATUS if !allocation || len == 0 || !in_range => Some(reject(EINVAL)),
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS => {
                None
            }
            _ => Some(reject(EINVAL)),
        };
        if let Some(rep) = early {
            if smalls.run().await.is_err() || tx.send(rep).await.is_err() {
                break Ok(());
            }
            continue;
        }
        // A request slot of this connection, then the server's budget for
        // its payload, and only then its buffer: a client that pipelines
        // maximal writes waits (its data stays in the socket) instead of
        // making the daemon allocate for all of them.
        // Queued requests hold slots and budget: they run before a wait.
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if smalls.run().await.is_err() {
                    break Ok(());
                }
                let Ok(p) = slots.clone().acquire_owned().await else {
                    break Ok(());
                };
                p
            }
        };
        let bytes = if matches!(cmd, CMD_READ | CMD_WRITE) {
            let b = match budget.try_take(len) {
                Some(b) => Some(b),
                None if smalls.run().await.is_err() => break Ok(()),
                None => budget.take(len).await,
            };
            let Some(b) = b else {
                break Ok(());
            };
            Some(b)
        } else {
            None
        };
        let mut payload = Vec::new();
        if cmd == CMD_WRITE {
            if r.buffer().len() < len as usize && smalls.run().await.is_err() {
                break Ok(());
            }
            payload = vec![0u8; len as usize];
            if let Err(e) = r.read_exact(&mut payload).await {
                break Err(eof(e));
            }
        }
        let req = Small {
            export: export.clone(),
            cmd,
            handle,
            off,
            len,
            fua,
            form,
            runs_max: if flags & CMD_FLAG_REQ_ONE != 0 {
                1
            } else {
                BLOCK_STATUS_RUNS_MAX
            },
            payload,
            bytes,
            permit,
        };
        // Small reads and writes through the page cache take microseconds:
        // they queue, and run together once no further request is already
        // read (see `Smalls`). Flushes, FUA and large requests, which can
        // wait on the disk, go to a blocking thread of their own, after
        // the requests read before them.
        // A block status asks the file system (or the drill's tree) where
        // data is, without reading it: small whatever its length.
        if cmd == CMD_BLOCK_STATUS || (cmd != CMD_FLUSH && !fua && len <= INLINE_BYTES_MAX) {
            smalls.queue.push(req);
            continue;
        }
        if smalls.run().await.is_err() {
            break Ok(());
        }
        let (tx, observer, name) = (tx.clone(), observer.clone(), name.clone());
        tokio::task::spawn_blocking(move || {
            let (rep, permit) = req.execute(observer.as_ref(), &name);
            let _ = tx.blocking_send(rep);
            drop(permit);
        });
    };
    // DISC or EOF: let requests in flight finish and their replies go out, then close.
    let _ = smalls.run().await;
    drop(smalls);
    let _ = slots.acquire_many(limits.inflight_max as u32).await;
    drop(tx);
    let _ = writer.await;
    match result {
        Err(NbdError::Closed) => Ok(()),
        other => other,
    }
}

/// A request read and admitted (its slot and its share of the budget
/// taken), to be carried out.
struct Small {
    export: Arc<dyn Export>,
    cmd: u16,
    handle: u64,
    off: u64,
    len: u64,
    fua: bool,
    form: Form,
    /// Runs a BLOCK_STATUS reply may describe (1 with `REQ_ONE`).
    runs_max: usize,
    payload: Vec<u8>,
    bytes: Option<tokio::sync::OwnedSemaphorePermit>,
    permit: tokio::sync::OwnedSemaphorePermit,
}

impl Small {
    /// Carries it out; the reply, and the slot to give back once it is sent.
    fn execute(
        self,
        observer: Option<&Observer>,
        name: &str,
    ) -> (Reply, tokio::sync::OwnedSemaphorePermit) {
        let started = Instant::now();
        let mut rep = execute(&*self.export, &self, &self.payload);
        drop(self.payload);
        rep.held = self.bytes;
        if let Some(o) = observer {
            o(name, command_name(self.cmd), started.elapsed());
        }
        (rep, self.permit)
    }
}

/// A connection's small requests, read back to back while the client's
/// bytes were already buffered, then carried out together in one step off
/// the runtime's thread: one `block_in_place` (two thread switches) for a
/// queue of them instead of one per request, a quarter of a 4 KiB write's
/// cost at queue depth 32. Run on the runtime's thread instead, a request
/// that blocks (writeback throttling a write, a lock held by a flush) would
/// stall every task there.
struct Smalls {
    queue: Vec<Small>,
    /// `block_in_place` needs the multi-threaded runtime; elsewhere the
    /// queue goes to a blocking thread.
    in_place: bool,
    tx: mpsc::Sender<Reply>,
    observer: Option<Observer>,
    name: String,
}

impl Smalls {
    /// Carries out the queue in order and sends the replies; an error when
    /// the replies can no longer be sent (the connection is closing).
    async fn run(&mut self) -> Result<(), ()> {
        if self.queue.is_empty() {
            return Ok(());
        }
        let queue = std::mem::take(&mut self.queue);
        let (observer, name) = (self.observer.clone(), self.name.clone());
        let work = move || -> Vec<(Reply, tokio::sync::OwnedSemaphorePermit)> {
            queue
                .into_iter()
                .map(|q| q.execute(observer.as_ref(), &name))
                .collect()
        };
        let done = if self.in_place {
            tokio::task::block_in_place(work)
        } else {
            tokio::task::spawn_blocking(work).await.map_err(|_| ())?
        };
        for (rep, permit) in done {
            self.tx.send(rep).await.map_err(|_| ())?;
            drop(permit);
        }
        Ok(())
    }
}

/// Carries out one request against the export.
fn execute(export: &dyn Export, q: &Small, payload: &[u8]) -> Reply {
    let (off, len, fua) = (q.off, q.len, q.fua);
    let res = match q.cmd {
        CMD_READ => {
            let mut buf = vec![0u8; len as usize];
            export.read(off, &mut buf).map(|_| buf)
        }
        CMD_WRITE => export.write(off, payload, fua).map(|_| Vec::new()),
        CMD_FLUSH => export.flush().map(|_| Vec::new()),
        CMD_TRIM => export.trim(off, len).map(|_| Vec::new()),
        CMD_BLOCK_STATUS => export
            .allocation(off, len, q.runs_max)
            .map(|runs| encode_status(&runs, len, q.runs_max)),
        _ => export.write_zeroes(off, len, fua).map(|_| Vec::new()),
    };
    match res {
        Ok(data) => Reply {
            handle: q.handle,
            error: 0,
            form: q.form,
            data,
            held: None,
        },
        Err(e) => {
            tracing::error!(error = %e, command = command_name(q.cmd), "NBD request failed");
            Reply {
                handle: q.handle,
                error: match e.raw_os_error() {
                    Some(libc::ENOSPC) => ENOSPC,
                    Some(libc::EPERM) => EPERM,
                    _ if e.kind() == std::io::ErrorKind::PermissionDenied => EPERM,
                    _ => EIO,
                },
                form: q.form,
                data: Vec::new(),
                held: None,
            }
        }
    }
}

/// A BLOCK_STATUS payload for `base:allocation`: the context, then each
/// run's length and state. The runs are held to what the protocol allows
/// whatever the export said: at least one and at most `runs_max`,
/// nonempty, adding up to at most the `len` asked (which fits in 32 bits).
fn encode_status(runs: &[Extent], len: u64, runs_max: usize) -> Vec<u8> {
    let runs = &runs[..runs.len().min(runs_max.max(1))];
    let mut b = Vec::with_capacity(4 + 8 * runs.len().max(1));
    b.extend_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
    let mut left = len;
    for run in runs {
        let n = run.len.min(left);
        if n == 0 {
            break;
        }
        b.extend_from_slice(&(n as u32).to_be_bytes());
        let state = if run.hole { STATE_HOLE | STATE_ZERO } else { 0 };
        b.extend_from_slice(&state.to_be_bytes());
        left -= n;
    }
    if b.len() == 4 {
        b.extend_from_slice(&(len as u32).to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
    }
    b
}

/// Appends `rep` as it goes on the wire.
fn encode_reply(b: &mut Vec<u8>, rep: &Reply) {
    let structured = |b: &mut Vec<u8>, kind: u16, len: usize| {
        b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&rep.handle.to_be_bytes());
        b.extend_from_slice(&(len as u32).to_be_bytes());
    };
    match rep.form {
        Form::Simple => {
            b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            b.extend_from_slice(&rep.error.to_be_bytes());
            b.extend_from_slice(&rep.handle.to_be_bytes());
            b.extend_from_slice(&rep.data);
        }
        _ if rep.error != 0 => {
            // The error, and an empty message.
            structured(b, REPLY_TYPE_ERROR, 6);
            b.extend_from_slice(&rep.error.to_be_bytes());
            b.extend_from_slice(&0u16.to_be_bytes());
        }
        // A read of nothing: a data chunk must hold at least one byte.
        Form::Data(_) if rep.data.is_empty() => structured(b, REPLY_TYPE_NONE, 0),
        Form::Data(off) => {
            structured(b, REPLY_TYPE_OFFSET_DATA, 8 + rep.data.len());
            b.extend_from_slice(&off.to_be_bytes());
            b.extend_from_slice(&rep.data);
        }
        Form::Status => {
            structured(b, REPLY_TYPE_BLOCK_STATUS, rep.data.len());
            b.extend_from_slice(&rep.data);
        }
    }
}
