//! Serving NBD connections: the handshake, then requests read in order and
//! carried out concurrently, replies matched by handle. Every length and
//! offset is checked before anything is allocated.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, mpsc};

use super::export::{Export, Exports};
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

fn eof(e: std::io::Error) -> NbdError {
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
    let Some((name, export)) = handshake(&mut rd, &mut wr, &*exports, limits).await? else {
        return Ok(());
    };
    let rd = tokio::io::BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    transmission(rd, wr, name, export, limits, budget, observer).await
}

async fn option_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await?;
    Ok(())
}

async fn discard<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> Result<(), NbdError> {
    let copied = tokio::io::copy(&mut r.take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        Err(NbdError::Closed)
    } else {
        Ok(())
    }
}

fn transmission_flags() -> u16 {
    TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES
}

/// Parses `u32 name length, name` at the start of an INFO/GO payload.
fn parse_name(data: &[u8]) -> Option<(String, &[u8])> {
    let len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4 + len)?;
    Some((String::from_utf8(name.to_vec()).ok()?, &data[4 + len..]))
}

/// Longest a client waits in the handshake for an export that is pending
/// (a restarted primary waiting for its peer's `Hello`).
const PENDING_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// The export `name`; when it is pending, waits (bounded) until it is there.
async fn get_or_wait(exports: &dyn Exports, name: &str) -> Option<Arc<dyn Export>> {
    if let Some(e) = exports.get(name) {
        return Some(e);
    }
    let mut w = exports.pending(name)?;
    let deadline = tokio::time::Instant::now() + PENDING_WAIT_MAX;
    loop {
        if let Some(e) = exports.get(name) {
            return Some(e);
        }
        exports.pending(name)?;
        match tokio::time::timeout_at(deadline, w.changed()).await {
            Ok(Ok(())) => {}
            _ => return exports.get(name),
        }
    }
}

async fn handshake<R, W>(
    r: &mut R,
    w: &mut W,
    exports: &dyn Exports,
    limits: Limits,
) -> Result<Option<(String, Arc<dyn Export>)>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello).await?;
    let cflags = r.read_u32().await.map_err(eof)?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {cflags:#x}"
        )));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    for _ in 0..limits.options_max {
        let magic = r.read_u64().await.map_err(eof)?;
        if magic != IHAVEOPT {
            return Err(NbdError::Protocol(format!("bad option magic {magic:#x}")));
        }
        let opt = r.read_u32().await.map_err(eof)?;
        let len = r.read_u32().await.map_err(eof)?;
        if len > limits.option_bytes_max {
            if opt == OPT_EXPORT_NAME {
                return Err(NbdError::Protocol(format!("export name of {len} bytes")));
            }
            discard(r, len as u64).await?;
            option_reply(w, opt, REP_ERR_TOO_BIG, b"option too large").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await.map_err(eof)?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                // This option has no error reply: an unknown name closes the connection.
                let Some(export) = get_or_wait(exports, &name).await else {
                    return Err(NbdError::Protocol(format!("unknown export '{name}'")));
                };
                let mut b = Vec::with_capacity(10 + 124);
                b.extend_from_slice(&export.size().to_be_bytes());
                b.extend_from_slice(&transmission_flags().to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&b).await?;
                return Ok(Some((name, export)));
            }
            OPT_ABORT => {
                let _ = option_reply(w, opt, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(w, opt, REP_ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                for n in exports.names() {
                    let mut d = (n.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(n.as_bytes());
                    option_reply(w, opt, REP_SERVER, &d).await?;
                }
                option_reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, rest)) = parse_name(&data) else {
                    option_reply(w, opt, REP_ERR_INVALID, b"malformed INFO/GO request").await?;
                    continue;
                };
                let n = rest
                    .get(0..2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize);
                if n.is_none_or(|n| rest.len() != 2 + 2 * n) {
                    option_reply(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        b"malformed information request list",
                    )
                    .await?;
                    continue;
                }
                let Some(export) = get_or_wait(exports, &name).await else {
                    option_reply(
                        w,
                        opt,
                        REP_ERR_UNKNOWN,
                        format!("no export named '{name}'").as_bytes(),
                    )
                    .await?;
                    continue;
                };
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&export.size().to_be_bytes());
                info.extend_from_slice(&transmission_flags().to_be_bytes());
                option_reply(w, opt, REP_INFO, &info).await?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                bs.extend_from_slice(&1u32.to_be_bytes());
                bs.extend_from_slice(&4096u32.to_be_bytes());
                bs.extend_from_slice(&limits.request_bytes_max.to_be_bytes());
                option_reply(w, opt, REP_INFO, &bs).await?;
                option_reply(w, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok(Some((name, export)));
                }
            }
            _ => option_reply(w, opt, REP_ERR_UNSUP, b"option not supported").await?,
        }
    }
    Err(NbdError::Protocol(format!(
        "more than {} options",
        limits.options_max
    )))
}

/// One reply: header and, for a successful read, its data.
struct Reply {
    handle: u64,
    error: u32,
    data: Vec<u8>,
    /// The request's share of the server's payload budget, given back once
    /// the reply is written (a client that does not read its replies holds
    /// its reads' buffers, and so waits for the budget, not the daemon).
    held: Option<tokio::sync::OwnedSemaphorePermit>,
}

async fn transmission<R, W>(
    mut r: tokio::io::BufReader<R>,
    mut w: W,
    name: String,
    export: Arc<dyn Export>,
    limits: Limits,
    budget: Arc<Budget>,
    observer: Option<Observer>,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Send + Unpin + 'static,
{
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
                b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                b.extend_from_slice(&rep.error.to_be_bytes());
                b.extend_from_slice(&rep.handle.to_be_bytes());
                b.extend_from_slice(&rep.data);
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
        let reject = |error: u32| Reply {
            handle,
            error,
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
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES => None,
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
            payload,
            bytes,
            permit,
        };
        // Small reads and writes through the page cache take microseconds:
        // they queue, and run together once no further request is already
        // read (see `Smalls`). Flushes, FUA and large requests, which can
        // wait on the disk, go to a blocking thread of their own, after
        // the requests read before them.
        if cmd != CMD_FLUSH && !fua && len <= INLINE_BYTES_MAX {
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
        let mut rep = execute(
            &*self.export,
            self.cmd,
            self.handle,
            self.off,
            self.len,
            self.fua,
            &self.payload,
        );
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
fn execute(
    export: &dyn Export,
    cmd: u16,
    handle: u64,
    off: u64,
    len: u64,
    fua: bool,
    payload: &[u8],
) -> Reply {
    let res = match cmd {
        CMD_READ => {
            let mut buf = vec![0u8; len as usize];
            export.read(off, &mut buf).map(|_| buf)
        }
        CMD_WRITE => export.write(off, payload, fua).map(|_| Vec::new()),
        CMD_FLUSH => export.flush().map(|_| Vec::new()),
        CMD_TRIM => export.trim(off, len).map(|_| Vec::new()),
        _ => export.write_zeroes(off, len, fua).map(|_| Vec::new()),
    };
    match res {
        Ok(data) => Reply {
            handle,
            error: 0,
            data,
            held: None,
        },
        Err(e) => {
            tracing::error!(error = %e, command = command_name(cmd), "NBD request failed");
            Reply {
                handle,
                error: match e.raw_os_error() {
                    Some(libc::ENOSPC) => ENOSPC,
                    Some(libc::EPERM) => EPERM,
                    _ if e.kind() == std::io::ErrorKind::PermissionDenied => EPERM,
                    _ => EIO,
                },
                data: Vec::new(),
                held: None,
            }
        }
    }
}

/// A hostile client's session run against an in-memory export over an
/// in-memory pipe: shared by the proptest cases below and the cargo-fuzz
/// target `nbd_requests` (feature `fuzzing`).
#[cfg(any(test, feature = "fuzzing"))]
pub mod harness {
    use super::*;

    pub const SIZE: u64 = 1 << 20;

    /// An in-memory export that notes any access past its end (the server
    /// runs it off the runtime, where a panic would only fail the request).
    struct Mem(std::sync::Mutex<Vec<u8>>, std::sync::atomic::AtomicBool);

    impl Mem {
        fn range(&self, off: u64, len: u64) -> std::io::Result<std::ops::Range<usize>> {
            match off.checked_add(len) {
                Some(end) if end <= SIZE => Ok(off as usize..end as usize),
                _ => {
                    self.1.store(true, std::sync::atomic::Ordering::SeqCst);
                    Err(std::io::Error::other(
                        "an access past the end reached the export",
                    ))
                }
            }
        }
    }

    impl Export for Mem {
        fn size(&self) -> u64 {
            SIZE
        }
        fn read(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
            let r = self.range(off, buf.len() as u64)?;
            buf.copy_from_slice(&self.0.lock().unwrap()[r]);
            Ok(())
        }
        fn write(&self, off: u64, data: &[u8], _fua: bool) -> std::io::Result<()> {
            let r = self.range(off, data.len() as u64)?;
            self.0.lock().unwrap()[r].copy_from_slice(data);
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn trim(&self, off: u64, len: u64) -> std::io::Result<()> {
            self.write_zeroes(off, len, false)
        }
        fn write_zeroes(&self, off: u64, len: u64, _fua: bool) -> std::io::Result<()> {
            let r = self.range(off, len)?;
            self.0.lock().unwrap()[r].fill(0);
            Ok(())
        }
    }

    struct One(Arc<dyn Export>);

    impl Exports for One {
        fn get(&self, name: &str) -> Option<Arc<dyn Export>> {
            (name == "v").then(|| self.0.clone())
        }
        fn names(&self) -> Vec<String> {
            vec!["v".into()]
        }
    }

    /// A valid client's bytes: fixed newstyle, `NBD_OPT_GO` for "v", then
    /// `requests` (command, flags, offset, length).
    pub fn session(requests: &[(u16, u16, u64, u32)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&7u32.to_be_bytes());
        b.extend_from_slice(&1u32.to_be_bytes());
        b.push(b'v');
        b.extend_from_slice(&0u16.to_be_bytes());
        for (i, &(cmd, flags, off, len)) in requests.iter().enumerate() {
            b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            b.extend_from_slice(&flags.to_be_bytes());
            b.extend_from_slice(&cmd.to_be_bytes());
            b.extend_from_slice(&(i as u64).to_be_bytes());
            b.extend_from_slice(&off.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
            if cmd == CMD_WRITE {
                b.extend(std::iter::repeat_n(0xab, len.min(1 << 16) as usize));
            }
        }
        b
    }

    /// Serves `input` as one client that then hangs up; the server must end
    /// within 10 s. Returns the export's bytes and what the server sent.
    pub fn serve(input: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mem = Arc::new(Mem(
            std::sync::Mutex::new(vec![0; SIZE as usize]),
            std::sync::atomic::AtomicBool::new(false),
        ));
        let export: Arc<dyn Export> = mem.clone();
        let sent = rt.block_on(async move {
            let (client, server) = tokio::io::duplex(1 << 16);
            let limits = Limits {
                request_bytes_max: 1 << 16,
                inflight_max: 4,
                options_max: 8,
                option_bytes_max: 4096,
            };
            let budget = Arc::new(Budget::new(1 << 20, limits.request_bytes_max));
            let srv = tokio::spawn(serve_conn(
                server,
                Arc::new(One(export)),
                limits,
                budget,
                None,
            ));
            let (mut rd, mut wr) = tokio::io::split(client);
            let drain = tokio::spawn(async move {
                let mut sent = Vec::new();
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = rd.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if sent.len() < (1 << 20) {
                        sent.extend_from_slice(&buf[..n]);
                    }
                }
                sent
            });
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
            let done = tokio::time::timeout(Duration::from_secs(10), srv).await;
            let joined = done.expect("the server did not end after the client hung up");
            let _ended = joined.expect("the server panicked");
            tokio::time::timeout(Duration::from_secs(10), drain)
                .await
                .expect("the server's side stayed open")
                .unwrap_or_default()
        });
        assert!(
            !mem.1.load(std::sync::atomic::Ordering::SeqCst),
            "the server passed an access past the end to the export"
        );
        let bytes = mem.0.lock().unwrap().clone();
        (bytes, sent)
    }
}

/// The server against hostile clients: random bytes, and valid sessions
/// with random corruption, must end the connection cleanly (an error or
/// EOF), never panic or hang, and never write outside the export.
#[cfg(test)]
mod fuzz {
    use super::harness::*;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_harness_reaches_transmission() {
        let (bytes, sent) = serve(session(&[
            (CMD_WRITE, 0, 4096, 8192),
            (CMD_READ, 0, 0, 4096),
            (CMD_DISC, 0, 0, 0),
        ]));
        assert!(bytes[4096..12288].iter().all(|&b| b == 0xab));
        assert!(bytes[..4096].iter().all(|&b| b == 0));
        // The READ's reply: its simple reply header, then 4 KiB of zeros.
        let magic = SIMPLE_REPLY_MAGIC.to_be_bytes();
        let replies = sent.windows(4).filter(|w| *w == magic).count();
        assert!(replies >= 2, "{replies} replies");
    }

    fn request() -> impl Strategy<Value = (u16, u16, u64, u32)> {
        (
            prop_oneof![
                Just(CMD_READ),
                Just(CMD_WRITE),
                Just(CMD_FLUSH),
                Just(CMD_TRIM),
                Just(CMD_WRITE_ZEROES),
                Just(CMD_DISC),
                any::<u16>()
            ],
            prop_oneof![Just(0u16), Just(CMD_FLAG_FUA), any::<u16>()],
            prop_oneof![0..SIZE, Just(SIZE - 1), Just(u64::MAX - 4095), any::<u64>()],
            prop_oneof![0u32..(1 << 16), Just(u32::MAX), any::<u32>()],
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_bytes_end_the_connection_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            serve(bytes);
        }

        #[test]
        fn valid_sessions_with_hostile_requests_end_cleanly(reqs in proptest::collection::vec(request(), 0..24)) {
            serve(session(&reqs));
        }

        #[test]
        fn corrupted_sessions_end_cleanly(
            reqs in proptest::collection::vec(request(), 1..12),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut b = session(&reqs);
            for (at, v) in flips {
                let i = at.index(b.len());
                b[i] ^= v;
            }
            serve(b);
        }
    }
}
