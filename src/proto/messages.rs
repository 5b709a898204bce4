//! The messages two sites exchange. Each request travels on its own QUIC
//! stream, framed by [`super::frame`], and gets exactly one response.

use serde::{Deserialize, Serialize};

use crate::failover::epoch::History;
use crate::hash::Hash;
use crate::store::state::{Mode, RecoveryPoint, Role};
use crate::volume::delta::BlockHash;

/// Version 2: `Hello` carries each volume's epoch history, errors are typed,
/// resyncs open with `ResyncBegin`, streams prove they continue a journal.
/// Version 3: recovery points say whether they are pinned; `Promote`.
/// Version 4: journal records carry their epoch; `Promote` names the last
/// record by its checksum too.
pub const PROTOCOL_VERSION: u32 = 4;
/// Volumes one `Hello` may describe.
pub const HELLO_VOLUMES_MAX: usize = 4096;
/// Hashes in one `HaveNodes` or `HaveChunks` question.
pub const ASK_ITEMS_MAX: usize = 16384;
/// Nodes in one `PutNodes`.
pub const PUT_NODES_MAX: usize = 1024;
/// Chunks in one `PutChunks` batch.
pub const PUT_CHUNKS_MAX: usize = 4096;
/// Leaves in one `Leaves` answer.
pub const LEAVES_MAX: usize = 65536;
/// Uncompressed journal bytes in one `Records` batch (records are at most
/// `STREAM_RECORD_DATA_MAX` of data each, so one always fits).
pub const STREAM_BATCH_BYTES_MAX: u64 = 8 << 20;
/// Data in one journal record on the wire: larger NBD writes are split.
pub const STREAM_RECORD_DATA_MAX: usize = 4 << 20;
/// Records in one `Records` batch.
pub const STREAM_RECORDS_MAX: usize = 65536;
/// Volume names: short, printable, usable as a file name.
pub const VOLUME_NAME_BYTES_MAX: usize = 64;

/// What a site says about one of its volumes when it greets its peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeHello {
    pub name: String,
    pub role: Role,
    pub history: History,
}

/// Why a request failed: the receiver's decision, typed, so that the sender
/// acts on the code and shows the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Malformed or out of bounds; nothing was done.
    Malformed,
    /// Refused for the reason given; the same request would be refused again.
    Refused,
    /// The volume is primary at the receiving site.
    NotReplica,
    /// The receiver knows no such volume, or no pass is open for it.
    Unknown,
    /// The sender's epoch history for the volume is behind the receiver's.
    StaleEpoch,
    /// The two sites' histories for the volume forked.
    SplitBrain,
    /// The receiver is behind for the volume and waits for a resync.
    Behind,
    /// The receiver is full for now (its redo log); retry later.
    Busy,
    /// The first request on a connection must be `Hello`.
    HelloFirst,
    /// The two sites speak different protocol versions.
    Version,
    /// The receiver failed (its store, its disk); a retry may succeed.
    Internal,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// First request on every connection, from the site that opened it:
    /// the protocol version first, then who is calling and what it holds.
    Hello {
        version: u32,
        site: String,
        volumes: Vec<VolumeHello>,
    },
    /// Pairing: prove the token's secret; the caller's certificate gets pinned.
    Pair {
        token_id: String,
        secret: String,
        site: String,
        listen: String,
    },
    /// Primary to DR before a pass: the DR side creates the replica on first
    /// contact, with the primary's epoch history.
    Open {
        volume: String,
        size: u64,
        chunk_size: u32,
        mode: Mode,
        history: History,
    },
    /// Which of these tree nodes does the DR store hold (whole subtrees)?
    HaveNodes {
        hashes: Vec<Hash>,
    },
    /// Nodes of the pass's tree that the DR side lacks (kept pending until commit).
    PutNodes {
        volume: String,
        nodes: Vec<Vec<u8>>,
    },
    /// For each leaf (index, name): does the DR side have the chunk, and if not,
    /// what does its replica hold there now (the base for a delta)?
    HaveChunks {
        volume: String,
        items: Vec<(u64, Hash)>,
    },
    PutChunks {
        volume: String,
        items: Vec<ChunkPut>,
    },
    /// Make the replica image equal the tree under `root` and record a point.
    /// With `fuzzy`, the tree was read from a live image while writes went
    /// on: no point is recorded, and the image stays inconsistent until the
    /// journal from `fuzzy.from_seq` has been applied through `fuzzy.consistent_at`.
    Commit {
        volume: String,
        #[serde(with = "serde_bytes")]
        root_node: Vec<u8>,
        fuzzy: Option<FuzzyCommit>,
    },
    /// The replica image's own chunk names, read from disk now (for verify).
    Leaves {
        volume: String,
        start: u64,
    },
    Points {
        volume: String,
    },
    /// Rewrite these chunks of the replica image from the DR store's copy of
    /// the committed state (after `verify` found them different).
    Repair {
        volume: String,
        indices: Vec<u64>,
    },
    /// Primary to DR before streaming a continuous volume's journal: which
    /// record does the DR side expect next, and do its records continue this
    /// journal (`incarnation`)?
    StreamOpen {
        volume: String,
        size: u64,
        chunk_size: u32,
        mode: Mode,
        incarnation: u64,
    },
    /// A resync of a continuous volume starts: the DR side keeps its image
    /// as it is (its last state), restarts its redo log at `from_seq` of the
    /// journal `incarnation`, and holds the records that arrive until the
    /// resync's `Commit`.
    ResyncBegin {
        volume: String,
        from_seq: u64,
        incarnation: u64,
    },
    /// Journal records `first ..` in order: journal encoding (each record
    /// checksummed), concatenated, zstd-compressed. Answered once durable.
    Records {
        volume: String,
        first: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Take a recovery point at the next flush boundary.
    CreatePoint {
        volume: String,
    },
    /// After a split brain: the sender's data wins. `history` is its
    /// history with the entry that supersedes the receiver's; the receiver
    /// keeps its own state as a pinned point and becomes its replica.
    /// `keep` names the winner when the receiver is asked to run it.
    Resolve {
        volume: String,
        keep: String,
        history: History,
    },
    /// Planned switchover asked for at the DR site: the primary runs it.
    Switchover {
        volume: String,
        disconnect_clients: bool,
        /// A snapshot-mode volume: the operator says its writers are off.
        workload_stopped: bool,
    },
    /// Planned switchover, from the primary: it takes no more writes, and
    /// every record through `seq` of `epoch` is durable at the DR side.
    /// The DR side promotes itself if it applied exactly through there.
    Promote {
        volume: String,
        epoch: u64,
        seq: u64,
        /// The checksum of record `seq` (see `Record::checksum`).
        checksum: u64,
        /// A snapshot-mode volume (no records: `seq` 0): the root of the
        /// last pass, which the DR side must hold as its committed state.
        root: Hash,
    },
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FuzzyCommit {
    /// The first journal record not certainly in the tree.
    pub from_seq: u64,
    /// The last record appended while the image was read.
    pub consistent_at: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    Hello {
        version: u32,
        site: String,
        volumes: Vec<VolumeHello>,
    },
    Paired {
        site: String,
    },
    Opened {
        committed: Option<Hash>,
    },
    Have(Vec<bool>),
    Chunks(Vec<ChunkHave>),
    Stored(StoreResult),
    Committed {
        point: RecoveryPoint,
    },
    Leaves {
        size: u64,
        chunk_size: u32,
        leaves: Vec<Hash>,
        done: bool,
    },
    Points(Vec<RecoveryPoint>),
    Ok,
    Error {
        code: ErrorCode,
        message: String,
    },
    Repaired {
        chunks: u64,
    },
    /// Fuzzy commit done: no point, the image is inconsistent until the stream catches up.
    CommittedFuzzy,
    StreamOpened {
        /// The next record the DR side wants (everything before is durable there).
        next_seq: u64,
        /// The DR side cannot take the stream as it is (no base, or records
        /// of another journal): resync by tree comparison first, and why.
        resync: Option<String>,
    },
    /// Every record up to `upto` is durable at the DR site; `point` is the
    /// newest recovery point there (id, Unix seconds), for the primary's status.
    Durable {
        upto: u64,
        point: Option<(u64, u64)>,
    },
    Point(RecoveryPoint),
    /// The planned switchover the DR site asked for is done.
    SwitchedOver(crate::daemon::failover::PlannedReport),
    /// The DR side is the primary now: its history, and the journal whose
    /// records the old primary receives from here on (no resync).
    Promoted {
        history: History,
        incarnation: u64,
        next_seq: u64,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ChunkHave {
    Have,
    Missing,
    /// Missing, but the replica holds an older chunk of the same length here
    /// (or a hole: `base` is `Hash::ZERO`); these are its 4 KiB block names.
    MissingWithBase {
        base: Hash,
        blocks: Vec<BlockHash>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ChunkPut {
    /// A whole chunk, encoded as in the store (`codec`).
    Full {
        hash: Hash,
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
    },
    /// The `blocks` of the chunk that differ from `base`, concatenated and
    /// encoded. `base` may be `Hash::ZERO`: a hole, rebuilt as `len` zeros.
    Delta {
        hash: Hash,
        base: Hash,
        len: u32,
        blocks: Vec<u32>,
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
    },
}

impl Response {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error {
            code,
            message: message.into(),
        }
    }
}

impl ChunkPut {
    pub fn hash(&self) -> Hash {
        match self {
            ChunkPut::Full { hash, .. } | ChunkPut::Delta { hash, .. } => *hash,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StoreResult {
    pub stored: u32,
    pub duplicate: u32,
    /// Deltas whose rebuilt chunk did not match: send these whole.
    pub need_full: Vec<Hash>,
    /// Chunks refused (wrong hash, malformed); nothing was stored for them.
    pub rejected: Vec<(Hash, String)>,
}

/// Checks a volume name before it reaches a path or a key.
pub fn check_volume_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > VOLUME_NAME_BYTES_MAX {
        return Err(format!(
            "volume name must be 1 to {VOLUME_NAME_BYTES_MAX} bytes"
        ));
    }
    if name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "volume name '{name}' may use only letters, digits, '-', '_' and '.', and not start with '.'"
        ));
    }
    Ok(())
}

impl Request {
    /// Checks counts that the frame size alone does not bound tightly enough.
    pub fn check(&self) -> Result<(), String> {
        let vol = |v: &str| check_volume_name(v);
        match self {
            Request::HaveNodes { hashes } if hashes.len() > ASK_ITEMS_MAX => {
                Err("too many hashes in one question".into())
            }
            Request::PutNodes { nodes, volume } => {
                vol(volume)?;
                if nodes.len() > PUT_NODES_MAX {
                    Err("too many nodes in one batch".into())
                } else {
                    Ok(())
                }
            }
            Request::HaveChunks { items, volume } => {
                vol(volume)?;
                if items.len() > ASK_ITEMS_MAX {
                    Err("too many chunks in one question".into())
                } else {
                    Ok(())
                }
            }
            Request::PutChunks { items, volume } => {
                vol(volume)?;
                if items.len() > PUT_CHUNKS_MAX {
                    Err("too many chunks in one batch".into())
                } else {
                    Ok(())
                }
            }
            Request::Hello { site, volumes, .. } => {
                if site.is_empty() || site.len() > crate::failover::epoch::SITE_NAME_BYTES_MAX {
                    return Err("site name of an impossible length".into());
                }
                if volumes.len() > HELLO_VOLUMES_MAX {
                    return Err(format!("more than {HELLO_VOLUMES_MAX} volumes in a Hello"));
                }
                for v in volumes {
                    vol(&v.name)?;
                    v.history.check()?;
                }
                Ok(())
            }
            Request::Open {
                volume,
                chunk_size,
                history,
                ..
            } => {
                vol(volume)?;
                history.check()?;
                if !chunk_size.is_power_of_two() || !(4096..=(4 << 20)).contains(chunk_size) {
                    return Err(format!(
                        "chunk size {chunk_size} is not a power of two from 4KiB to 4MiB"
                    ));
                }
                Ok(())
            }
            Request::Commit { volume, .. }
            | Request::Leaves { volume, .. }
            | Request::Points { volume }
            | Request::CreatePoint { volume }
            | Request::Promote { volume, .. }
            | Request::Switchover { volume, .. }
            | Request::Resolve { volume, .. }
            | Request::Records { volume, .. } => vol(volume),
            Request::StreamOpen { volume, .. } => vol(volume),
            Request::ResyncBegin {
                volume, from_seq, ..
            } => {
                vol(volume)?;
                if *from_seq == 0 {
                    return Err("a resync cannot begin at record 0".into());
                }
                Ok(())
            }
            Request::Repair { volume, indices } => {
                vol(volume)?;
                if indices.len() > ASK_ITEMS_MAX {
                    Err("too many chunks in one repair".into())
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte payloads travel as postcard bytes (one copy, not one call per
    /// element), which postcard encodes exactly as a sequence of u8: a
    /// peer of an earlier build reads them as before.
    #[test]
    fn byte_payloads_keep_the_wire_encoding_of_a_byte_sequence() {
        #[derive(Serialize)]
        enum Plain {
            Full { hash: Hash, record: Vec<u8> },
        }
        let record: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
        let hash = Hash::of_chunk(b"x");
        let now = postcard::to_stdvec(&ChunkPut::Full {
            hash,
            record: record.clone(),
        })
        .unwrap();
        let before = postcard::to_stdvec(&Plain::Full {
            hash,
            record: record.clone(),
        })
        .unwrap();
        assert_eq!(now, before);
        match postcard::from_bytes::<ChunkPut>(&before).unwrap() {
            ChunkPut::Full { record: r, .. } => assert_eq!(r, record),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn volume_names_that_could_escape_a_directory_are_refused() {
        for bad in ["", "../x", "a/b", ".hidden", "a b", &"x".repeat(65)] {
            assert!(check_volume_name(bad).is_err(), "{bad}");
        }
        for good in ["vm-01", "db_data.raw", "A1"] {
            assert!(check_volume_name(good).is_ok(), "{good}");
        }
    }
}
