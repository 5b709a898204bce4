//! A hostile client's session run against an in-memory export over an
//! in-memory pipe: shared by the proptest cases below and the cargo-fuzz
//! target `nbd_requests` (feature `fuzzing`).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::export::{Export, Exports, Extent, push_extent};
use super::proto::*;
use super::server::{Budget, Limits, serve_conn};

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
    /// All-zero 4 KiB blocks are holes.
    fn allocation(&self, off: u64, len: u64, runs_max: usize) -> std::io::Result<Vec<Extent>> {
        let r = self.range(off, len)?;
        let m = self.0.lock().unwrap();
        let mut runs = Vec::new();
        for piece in m[r].chunks(4096) {
            let hole = piece.iter().all(|b| *b == 0);
            if !push_extent(&mut runs, piece.len() as u64, hole, runs_max) {
                break;
            }
        }
        Ok(runs)
    }
    fn zeroes_fast(&self) -> bool {
        true
    }
    fn multi_conn(&self) -> bool {
        true
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
    session_with(requests, false)
}

/// `session`, and with `structured` the client first asks for
/// structured replies and `base:allocation` (so BLOCK_STATUS works).
pub fn session_with(requests: &[(u16, u16, u64, u32)], structured: bool) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    if structured {
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        let mut meta = 1u32.to_be_bytes().to_vec();
        meta.push(b'v');
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&(META_BASE_ALLOCATION.len() as u32).to_be_bytes());
        meta.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&OPT_SET_META_CONTEXT.to_be_bytes());
        b.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        b.extend_from_slice(&meta);
    }
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

/// The server against hostile clients: random bytes, and valid sessions
/// with random corruption, must end the connection cleanly (an error or
/// EOF), never panic or hang, and never write outside the export.
#[cfg(test)]
mod fuzz {
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

    /// The structured replies in `sent` (after the handshake): (flags,
    /// type, handle, payload).
    fn structured_replies(sent: &[u8]) -> Vec<(u16, u16, u64, Vec<u8>)> {
        let magic = STRUCTURED_REPLY_MAGIC.to_be_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i + 20 <= sent.len() {
            if sent[i..i + 4] != magic {
                i += 1;
                continue;
            }
            let flags = u16::from_be_bytes([sent[i + 4], sent[i + 5]]);
            let kind = u16::from_be_bytes([sent[i + 6], sent[i + 7]]);
            let handle = u64::from_be_bytes(sent[i + 8..i + 16].try_into().unwrap());
            let len = u32::from_be_bytes(sent[i + 16..i + 20].try_into().unwrap()) as usize;
            out.push((flags, kind, handle, sent[i + 20..i + 20 + len].to_vec()));
            i += 20 + len;
        }
        out
    }

    #[test]
    fn block_status_reports_holes_and_reads_are_structured() {
        let (_, sent) = serve(session_with(
            &[
                (CMD_WRITE, 0, 4096, 8192),
                (CMD_BLOCK_STATUS, 0, 0, 65536),
                (CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 65536),
                (CMD_READ, 0, 4096, 4096),
                (CMD_BLOCK_STATUS, 0, SIZE - 4096, 8192),
                (CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 4096, 4096),
                (CMD_BLOCK_STATUS, 0, 0, 16384),
                (CMD_READ, 0, 4096, 0),
                (CMD_DISC, 0, 0, 0),
            ],
            true,
        ));
        let replies = structured_replies(&sent);
        let status = |handle: u64| -> Vec<(u32, u32)> {
            let (flags, kind, _, p) = replies
                .iter()
                .find(|r| r.2 == handle)
                .unwrap_or_else(|| panic!("no structured reply to request {handle}"));
            assert_eq!((*flags, *kind), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS));
            assert_eq!(p[..4], META_BASE_ALLOCATION_ID.to_be_bytes());
            p[4..]
                .chunks(8)
                .map(|e| {
                    (
                        u32::from_be_bytes(e[..4].try_into().unwrap()),
                        u32::from_be_bytes(e[4..].try_into().unwrap()),
                    )
                })
                .collect()
        };
        let hole = STATE_HOLE | STATE_ZERO;
        assert_eq!(
            status(1),
            vec![(4096, hole), (8192, 0), (65536 - 12288, hole)]
        );
        assert_eq!(status(2), vec![(4096, hole)], "REQ_ONE: one extent");
        let (flags, kind, _, p) = replies.iter().find(|r| r.2 == 3).unwrap();
        assert_eq!((*flags, *kind), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA));
        assert_eq!(p[..8], 4096u64.to_be_bytes());
        assert!(p[8..].len() == 4096 && p[8..].iter().all(|b| *b == 0xab));
        // Past the end: a structured error.
        let (_, kind, _, p) = replies.iter().find(|r| r.2 == 4).unwrap();
        assert_eq!(*kind, REPLY_TYPE_ERROR);
        assert_eq!(p[..4], EINVAL.to_be_bytes());
        assert_eq!(
            status(6),
            vec![(8192, hole), (4096, 0), (4096, hole)],
            "a fast zero made a hole"
        );
        // A read of nothing: no data chunk (it would have to hold a byte).
        let (flags, kind, _, p) = replies.iter().find(|r| r.2 == 7).unwrap();
        assert_eq!(
            (*flags, *kind, p.len()),
            (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
        );
    }

    #[test]
    fn block_status_without_the_context_is_refused() {
        // Simple replies only: the block status gets EINVAL, simply.
        let (_, sent) = serve(session(&[
            (CMD_BLOCK_STATUS, 0, 0, 4096),
            (CMD_DISC, 0, 0, 0),
        ]));
        let mut reply = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        reply.extend_from_slice(&EINVAL.to_be_bytes());
        reply.extend_from_slice(&0u64.to_be_bytes());
        assert!(sent.windows(reply.len()).any(|w| w == reply));
        assert!(structured_replies(&sent).is_empty());
    }

    fn request() -> impl Strategy<Value = (u16, u16, u64, u32)> {
        (
            prop_oneof![
                Just(CMD_READ),
                Just(CMD_WRITE),
                Just(CMD_FLUSH),
                Just(CMD_TRIM),
                Just(CMD_WRITE_ZEROES),
                Just(CMD_BLOCK_STATUS),
                Just(CMD_DISC),
                any::<u16>()
            ],
            prop_oneof![
                Just(0u16),
                Just(CMD_FLAG_FUA),
                Just(CMD_FLAG_REQ_ONE),
                Just(CMD_FLAG_FAST_ZERO),
                any::<u16>()
            ],
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
        fn valid_sessions_with_hostile_requests_end_cleanly(
            reqs in proptest::collection::vec(request(), 0..24),
            structured in any::<bool>(),
        ) {
            serve(session_with(&reqs, structured));
        }

        #[test]
        fn corrupted_sessions_end_cleanly(
            reqs in proptest::collection::vec(request(), 1..12),
            structured in any::<bool>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut b = session_with(&reqs, structured);
            for (at, v) in flips {
                let i = at.index(b.len());
                b[i] ^= v;
            }
            serve(b);
        }
    }
}
