//! The audit log: every drill, failover, failback, resolve and demote is
//! appended to `DIR/audit.log` before it runs and again with its outcome.
//! JSON lines; each names the blake3 hash of the line before it, so that an
//! edited, removed or reordered line breaks the chain (`ferry audit --verify`).
//! Each line is fsynced before the action goes on.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::drill::Operator;

pub const AUDIT_LOG: &str = "audit.log";
/// A line longer than this is damage, not an entry.
pub const AUDIT_LINE_BYTES_MAX: usize = 64 << 10;
/// The `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    /// Unix milliseconds.
    pub time_ms: u64,
    /// The blake3 hash (hex) of the previous line's bytes.
    pub prev: String,
    /// `drill start`, `drill stop`, `failover --force`, `demote`, ...
    pub action: String,
    pub volume: String,
    /// `begin` (before it runs) or `end` (with its outcome).
    pub phase: String,
    pub by: Operator,
    /// What was asked (the point, the options).
    #[serde(default)]
    pub details: serde_json::Value,
    /// `end` only: `ok: ...` or `error: ...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

fn line_hash(line: &[u8]) -> String {
    blake3::hash(line).to_hex().to_string()
}

/// The site's audit log, open for appending.
pub struct AuditLog {
    path: PathBuf,
    /// (next seq, hash of the last line); appends one at a time.
    tail: Mutex<(u64, String)>,
}

impl AuditLog {
    /// Opens (or creates) the log and finds its tail, reading a bounded
    /// piece at a time. A torn last line (a crash mid-append: that action
    /// was refused) is cut off. Damage in the middle is not repaired:
    /// appends go on after it, and `--verify` shows where it broke.
    pub fn open(dir: &Path) -> io::Result<AuditLog> {
        let path = dir.join(AUDIT_LOG);
        let mut tail = (1, GENESIS.to_string());
        if let Ok(f) = File::open(&path) {
            let mut r = io::BufReader::new(f);
            let mut line = Vec::new();
            let mut whole = 0u64;
            let mut hasher = blake3::Hasher::new();
            let mut long = false;
            loop {
                line.clear();
                let got = io::Read::take(&mut r, AUDIT_LINE_BYTES_MAX as u64)
                    .read_until(b'\n', &mut line)?;
                if got == 0 {
                    break;
                }
                if line.last() != Some(&b'\n') {
                    // Longer than the bound (hash it on), or the torn end.
                    hasher.update(&line);
                    long = true;
                    if got < AUDIT_LINE_BYTES_MAX {
                        break;
                    }
                    continue;
                }
                line.pop();
                hasher.update(&line);
                let seq = if long {
                    tail.0
                } else {
                    serde_json::from_slice::<AuditEntry>(&line)
                        .map(|e| e.seq)
                        .unwrap_or(tail.0)
                };
                tail = (seq + 1, hasher.finalize().to_hex().to_string());
                hasher = blake3::Hasher::new();
                long = false;
                whole = r.stream_position()?;
            }
            let len = std::fs::metadata(&path)?.len();
            if len > whole {
                tracing::warn!(file = %path.display(), bytes = len - whole, "the audit log ends in a torn line; cut off");
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(whole)?;
                f.sync_all()?;
            }
        }
        Ok(AuditLog {
            path,
            tail: Mutex::new(tail),
        })
    }

    /// Appends one entry and makes it durable; returns its seq.
    pub fn append(
        &self,
        action: &str,
        volume: &str,
        phase: &str,
        by: &Operator,
        details: serde_json::Value,
        outcome: Option<String>,
    ) -> io::Result<u64> {
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let e = AuditEntry {
            seq: tail.0,
            time_ms: crate::util::now_unix_ms(),
            prev: tail.1.clone(),
            action: action.into(),
            volume: volume.into(),
            phase: phase.into(),
            by: by.clone(),
            details,
            outcome,
        };
        let line = serde_json::to_vec(&e).map_err(io::Error::other)?;
        if line.len() > AUDIT_LINE_BYTES_MAX {
            return Err(io::Error::other("audit entry too large"));
        }
        let new = !self.path.exists();
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let mut buf = line.clone();
        buf.push(b'\n');
        f.write_all(&buf)?;
        f.sync_data()?;
        if new && let Some(parent) = self.path.parent() {
            File::open(parent)?.sync_all()?;
        }
        *tail = (e.seq + 1, line_hash(&line));
        Ok(e.seq)
    }
}

/// What `--verify` found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub entries: u64,
    /// The first broken line (1-based) and why; `None`: the chain holds.
    pub broken: Option<(u64, String)>,
}

/// Reads the log (entries up to the first damage) and checks the chain.
pub fn read(dir: &Path) -> io::Result<(Vec<AuditEntry>, Verdict)> {
    let path = dir.join(AUDIT_LOG);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok((
                Vec::new(),
                Verdict {
                    entries: 0,
                    broken: None,
                },
            ));
        }
        Err(e) => return Err(e),
    };
    let mut r = io::BufReader::new(f);
    let mut out = Vec::new();
    let mut prev = GENESIS.to_string();
    let mut n = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let got =
            io::Read::take(&mut r, AUDIT_LINE_BYTES_MAX as u64 + 1).read_until(b'\n', &mut line)?;
        if got == 0 {
            break;
        }
        n += 1;
        let good = out.len() as u64;
        let broken = |why: String| Verdict {
            entries: good,
            broken: Some((n, why)),
        };
        if line.last() != Some(&b'\n') {
            let why = if line.len() > AUDIT_LINE_BYTES_MAX {
                "line too long".to_string()
            } else {
                "torn last line (no newline)".to_string()
            };
            return Ok((out, broken(why)));
        }
        line.pop();
        let e: AuditEntry = match serde_json::from_slice(&line) {
            Ok(e) => e,
            Err(err) => return Ok((out, broken(format!("not an audit entry: {err}")))),
        };
        if e.prev != prev {
            return Ok((
                out,
                broken(format!(
                    "names {} as the line before it, which hashes to {}: a line was changed, removed or inserted",
                    short(&e.prev),
                    short(&prev)
                )),
            ));
        }
        if e.seq != n {
            return Ok((out, broken(format!("sequence {} where {n} was due", e.seq))));
        }
        prev = line_hash(&line);
        out.push(e);
    }
    let entries = out.len() as u64;
    Ok((
        out,
        Verdict {
            entries,
            broken: None,
        },
    ))
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op() -> Operator {
        Operator {
            uid: Some(0),
            user: Some("root".into()),
            said: Some("alice".into()),
        }
    }

    #[test]
    fn the_chain_holds_across_reopens_and_breaks_on_any_edit() {
        let d = tempfile::tempdir().unwrap();
        let log = AuditLog::open(d.path()).unwrap();
        log.append(
            "drill start",
            "db",
            "begin",
            &op(),
            serde_json::json!({"point": 3}),
            None,
        )
        .unwrap();
        log.append(
            "drill start",
            "db",
            "end",
            &op(),
            serde_json::json!({}),
            Some("ok".into()),
        )
        .unwrap();
        drop(log);
        let log = AuditLog::open(d.path()).unwrap();
        assert_eq!(
            log.append("demote", "db", "begin", &op(), serde_json::json!({}), None)
                .unwrap(),
            3
        );
        let (all, v) = read(d.path()).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(v.broken, None);
        assert_eq!(all[0].details["point"], 3);

        let text = std::fs::read_to_string(d.path().join(AUDIT_LOG)).unwrap();
        // An edited outcome.
        let edited = text.replacen("\"ok\"", "\"error\"", 1);
        std::fs::write(d.path().join(AUDIT_LOG), &edited).unwrap();
        let (all, v) = read(d.path()).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(v.broken.as_ref().unwrap().0, 3, "{v:?}");
        // A removed line.
        let lines: Vec<&str> = text.lines().collect();
        std::fs::write(
            d.path().join(AUDIT_LOG),
            format!("{}\n{}\n", lines[0], lines[2]),
        )
        .unwrap();
        assert_eq!(read(d.path()).unwrap().1.broken.unwrap().0, 2);
        // A torn tail: shown by --verify, cut at the next open, and the
        // chain goes on from the last whole line.
        std::fs::write(d.path().join(AUDIT_LOG), &text[..text.len() - 5]).unwrap();
        let (all, v) = read(d.path()).unwrap();
        assert_eq!(all.len(), 2);
        assert!(v.broken.unwrap().1.contains("torn"));
        let log = AuditLog::open(d.path()).unwrap();
        log.append(
            "demote",
            "db",
            "end",
            &op(),
            serde_json::json!({}),
            Some("ok".into()),
        )
        .unwrap();
        let (all, v) = read(d.path()).unwrap();
        assert_eq!((all.len(), v.broken), (3, None));
    }
}
