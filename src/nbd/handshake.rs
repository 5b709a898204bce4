//! The NBD handshake (fixed newstyle): options until the client picks an
//! export. Besides `NBD_OPT_GO`, `INFO`, `LIST` and `EXPORT_NAME`, it
//! negotiates structured replies and the `base:allocation` metadata
//! context, which let clients such as nbdcopy, `qemu-img convert` and
//! qemu skip the holes of a volume, a drill clone or a restore.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::export::{Export, Exports};
use super::proto::*;
use super::server::{Limits, NbdError, discard, eof};

/// What the handshake agreed on.
pub struct Negotiated {
    pub name: String,
    pub export: Arc<dyn Export>,
    /// Reads (and block status) are answered with structured replies.
    pub structured: bool,
    /// `base:allocation` was selected for this export: BLOCK_STATUS works.
    pub allocation: bool,
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

async fn unknown_export<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    name: &str,
) -> Result<(), NbdError> {
    let why = format!("no export named '{name}'");
    option_reply(w, opt, REP_ERR_UNKNOWN, why.as_bytes()).await
}

fn transmission_flags(export: &dyn Export) -> u16 {
    let mut f = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_SEND_FAST_ZERO;
    if export.multi_conn() {
        f |= TFLAG_CAN_MULTI_CONN;
    }
    f
}

/// Reads `u32 length, string` at the start of `data`.
fn parse_string(data: &[u8]) -> Option<(String, &[u8])> {
    let len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let s = data.get(4..4usize.checked_add(len)?)?;
    Some((String::from_utf8(s.to_vec()).ok()?, &data[4 + len..]))
}

/// A `LIST_META_CONTEXT` or `SET_META_CONTEXT` request: the export's name
/// and the queries.
fn parse_meta(data: &[u8]) -> Option<(String, Vec<String>)> {
    let (name, mut rest) = parse_string(data)?;
    let n = u32::from_be_bytes(rest.get(0..4)?.try_into().ok()?);
    rest = &rest[4..];
    let mut queries = Vec::new();
    for _ in 0..n {
        // Each query takes at least its 4-byte length: the loop ends when
        // the option's bytes (bounded before they were read) run out.
        let (q, r) = parse_string(rest)?;
        queries.push(q);
        rest = r;
    }
    rest.is_empty().then_some((name, queries))
}

/// Whether a query selects `base:allocation`: the name itself, or (to
/// list) the whole `base:` namespace.
fn selects_allocation(query: &str, listing: bool) -> bool {
    query == META_BASE_ALLOCATION || (listing && query == "base:")
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

/// Options until the client picks an export (`None`: it aborted).
pub async fn handshake<R, W>(
    r: &mut R,
    w: &mut W,
    exports: &dyn Exports,
    limits: Limits,
) -> Result<Option<Negotiated>, NbdError>
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
    let mut structured = false;
    // The export `base:allocation` was last selected for.
    let mut allocation_for: Option<String> = None;
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
                b.extend_from_slice(&transmission_flags(&*export).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&b).await?;
                let allocation = allocation_for.as_deref() == Some(name.as_str());
                return Ok(Some(Negotiated {
                    name,
                    export,
                    structured,
                    allocation,
                }));
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
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_reply(w, opt, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")
                        .await?;
                    continue;
                }
                structured = true;
                option_reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let setting = opt == OPT_SET_META_CONTEXT;
                if !structured {
                    option_reply(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        b"metadata contexts need structured replies first",
                    )
                    .await?;
                    continue;
                }
                // Only a SET answered without an error counts: a failed one
                // leaves no context selected.
                if setting {
                    allocation_for = None;
                }
                let Some((name, queries)) = parse_meta(&data) else {
                    option_reply(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        b"malformed metadata context request",
                    )
                    .await?;
                    continue;
                };
                if exports.get(&name).is_none() && exports.pending(&name).is_none() {
                    unknown_export(w, opt, &name).await?;
                    continue;
                }
                // Listing with no query lists every context; setting with
                // none selects none.
                let chosen = if queries.is_empty() {
                    !setting
                } else {
                    queries.iter().any(|q| selects_allocation(q, !setting))
                };
                if setting {
                    allocation_for = chosen.then(|| name.clone());
                }
                if chosen {
                    let id = if setting { META_BASE_ALLOCATION_ID } else { 0 };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                    option_reply(w, opt, REP_META_CONTEXT, &d).await?;
                }
                option_reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, rest)) = parse_string(&data) else {
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
                    unknown_export(w, opt, &name).await?;
                    continue;
                };
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&export.size().to_be_bytes());
                info.extend_from_slice(&transmission_flags(&*export).to_be_bytes());
                option_reply(w, opt, REP_INFO, &info).await?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                bs.extend_from_slice(&1u32.to_be_bytes());
                bs.extend_from_slice(&4096u32.to_be_bytes());
                bs.extend_from_slice(&limits.request_bytes_max.to_be_bytes());
                option_reply(w, opt, REP_INFO, &bs).await?;
                option_reply(w, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    // A context selected for another export does not carry over.
                    let allocation = allocation_for.as_deref() == Some(name.as_str());
                    return Ok(Some(Negotiated {
                        name,
                        export,
                        structured,
                        allocation,
                    }));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(s.as_bytes());
        b
    }

    #[test]
    fn metadata_requests_parse_and_bad_ones_are_refused() {
        let mut b = string("vol");
        b.extend_from_slice(&2u32.to_be_bytes());
        b.extend(string("base:allocation"));
        b.extend(string("qemu:dirty-bitmap:x"));
        let (name, q) = parse_meta(&b).unwrap();
        assert_eq!(name, "vol");
        assert_eq!(q, vec!["base:allocation", "qemu:dirty-bitmap:x"]);
        // A count past the data, a short string, trailing bytes: refused.
        let mut bad = string("vol");
        bad.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta(&bad).is_none());
        let mut short = string("vol");
        short.extend_from_slice(&1u32.to_be_bytes());
        short.extend_from_slice(&100u32.to_be_bytes());
        assert!(parse_meta(&short).is_none());
        let mut trailing = b.clone();
        trailing.push(0);
        assert!(parse_meta(&trailing).is_none());
        assert!(parse_string(&u32::MAX.to_be_bytes()).is_none());
        assert!(selects_allocation("base:", true));
        assert!(!selects_allocation("base:", false));
        assert!(!selects_allocation("qemu:allocation-depth", true));
    }
}
