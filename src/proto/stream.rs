//! The primary's stream session of one continuous volume, without I/O.
//!
//! It keeps what the primary knows of the DR side's copy: which journal
//! records are durable there, whether a resync is needed or running, whether
//! the link has been down too long, whether a sync volume runs degraded; and
//! it decides: where the stream starts after a handshake (only where the DR
//! side's records provably continue this journal), when to fall back to a
//! resync, when a sync flush is complete, fails or degrades, and which record
//! a resync's commit must name as its consistency marker. The journaled
//! export and the streamer carry out its decisions; time is passed in.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::messages::FuzzyCommit;
use crate::store::state::{Mode, SyncFallback};

/// Granularity of the write times kept for the lag in seconds.
const LAG_TICK: Duration = Duration::from_millis(5);

#[derive(Clone, Copy, Debug)]
pub struct StreamConfig {
    pub mode: Mode,
    pub fallback: SyncFallback,
    /// How long a sync flush waits for the DR site.
    pub sync_wait: Duration,
    /// How long the journal keeps records for a link that is down before a
    /// resync replaces them.
    pub link_down_max: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Resync {
    None,
    /// Needed, not started (why, for the operator).
    Needed(String),
    /// Running since the journal's record `from`; the `gen`-th resync.
    Running {
        from: u64,
        gen_: u64,
        reason: String,
    },
}

/// What a flush waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushTarget {
    /// Every record up to this one durable at the DR site.
    Record(u64),
    /// The writes before the flush were not journaled (a resync was pending):
    /// they reach the DR site with the commit of resync number `n`.
    Resync(u64),
}

/// What a sync flush does now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlushVerdict {
    /// Every record up to the flush is durable at the DR site (or the volume
    /// is async, or runs degraded).
    Done,
    /// Wait for an acknowledgment until this moment.
    Wait(Instant),
    /// The wait ran out; the volume runs as async until the DR side catches up.
    Degraded,
    /// The wait ran out and the volume's fallback is `fail`.
    Fail(String),
}

/// What the handshake decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenVerdict {
    /// Stream from this record.
    StreamFrom(u64),
    /// The DR side cannot continue from this journal: resync (the reason).
    Resync(String),
}

pub struct StreamSession {
    cfg: StreamConfig,
    next_seq: u64,
    /// Every record in `covered_from..=acked` is durable at the DR site.
    acked: u64,
    /// While a resync runs, records before its start are at the DR site
    /// only once its commit lands.
    covered_from: u64,
    resync: Resync,
    /// Records are journaled; false between a fallback (the journal's records
    /// dropped) and the start of the resync that replaces them.
    journaling: bool,
    /// Resyncs begun, and the number of the last one that committed.
    resyncs_begun: u64,
    resyncs_committed: u64,
    /// After a resync, the DR copy is consistent (and RPO 0 in force again)
    /// once the stream reaches the commit's marker.
    rpo_zero_from: u64,
    degraded: bool,
    link_down_since: Option<Instant>,
    unacked_bytes: u64,
    /// (first record appended in a tick, when): the oldest unacknowledged write's age.
    times: VecDeque<(u64, Instant)>,
}

/// What status and metrics show.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SessionView {
    pub next_seq: u64,
    pub acked_seq: u64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub degraded: bool,
    pub resync_needed: bool,
    pub resync_running: bool,
    pub resync_reason: String,
    /// Sync volumes: every acknowledged flush is durable at the DR site. Not
    /// in force while a resync runs or the volume runs degraded.
    pub rpo_zero: bool,
}

impl StreamSession {
    /// A session over a journal whose next record is `next_seq` and whose
    /// records up to `acked` the DR side holds; `resync` when one is pending.
    pub fn new(cfg: StreamConfig, next_seq: u64, acked: u64, resync: Option<String>) -> Self {
        StreamSession {
            cfg,
            next_seq,
            acked,
            covered_from: 0,
            rpo_zero_from: 0,
            journaling: resync.is_none(),
            resyncs_begun: 0,
            resyncs_committed: 0,
            resync: match resync {
                Some(r) => Resync::Needed(r),
                None => Resync::None,
            },
            degraded: false,
            link_down_since: None,
            unacked_bytes: 0,
            times: VecDeque::new(),
        }
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn resync_needed(&self) -> bool {
        self.resync != Resync::None
    }

    /// Are writes journaled now (else the next resync's scan carries them)?
    pub fn journaling(&self) -> bool {
        self.journaling
    }

    /// What a flush issued now waits for (after its own record, if any).
    pub fn flush_target(&self) -> FlushTarget {
        if self.journaling {
            FlushTarget::Record(self.next_seq - 1)
        } else {
            FlushTarget::Resync(self.resyncs_begun + 1)
        }
    }

    pub fn resync_running(&self) -> Option<u64> {
        match self.resync {
            Resync::Running { from, .. } => Some(from),
            _ => None,
        }
    }

    /// A record was appended to the journal.
    pub fn appended(&mut self, seq: u64, bytes: u64, now: Instant) {
        self.next_seq = seq + 1;
        self.unacked_bytes += bytes;
        if self
            .times
            .back()
            .is_none_or(|(_, t)| now.saturating_duration_since(*t) >= LAG_TICK)
        {
            self.times.push_back((seq, now));
        }
    }

    /// The journal's records were dropped (it filled up, or the link was
    /// down too long, or the operator asked): a resync must bring the DR
    /// copy level. True when this is news (the caller records it durably).
    pub fn fall_back(&mut self, reason: &str, next_seq: u64) -> bool {
        self.next_seq = next_seq;
        self.unacked_bytes = 0;
        self.times.clear();
        self.journaling = false;
        // Every record before `next_seq` now reaches the DR copy only with
        // the commit of a resync that starts later: a flush waiting on one
        // of them waits for that (even if the stream had acknowledged it
        // into a redo log the next resync restarts).
        self.covered_from = next_seq;
        if matches!(self.resync, Resync::Needed(_)) {
            return false;
        }
        self.resync = Resync::Needed(reason.to_string());
        true
    }

    pub fn link_up(&mut self) {
        self.link_down_since = None;
    }

    pub fn link_down(&mut self, now: Instant) {
        self.link_down_since.get_or_insert(now);
    }

    fn unacked(&self) -> bool {
        self.acked + 1 < self.next_seq
    }

    /// The moment the link's absence turns into a resync, if it stays down.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.link_down_since, &self.resync) {
            (Some(since), Resync::None) if self.unacked() => Some(since + self.cfg.link_down_max),
            _ => None,
        }
    }

    /// The reason to fall back now, if the link has been down too long with
    /// records waiting (the caller drops the journal and calls `fall_back`).
    pub fn handle_timeout(&mut self, now: Instant) -> Option<String> {
        let deadline = self.poll_timeout()?;
        (now >= deadline).then(|| {
            format!(
                "the link has been down for more than {}s",
                self.cfg.link_down_max.as_secs()
            )
        })
    }

    /// The DR side's answer to the stream handshake: the next record it
    /// wants, and whether its records continue this journal (same
    /// incarnation). `first_seq` is the oldest record the journal holds.
    pub fn open(&mut self, dr_next: u64, continues: bool, first_seq: u64) -> OpenVerdict {
        if !continues {
            return OpenVerdict::Resync(
                "the DR side's records do not continue this journal (it was recreated)".into(),
            );
        }
        if dr_next < first_seq || dr_next > self.next_seq {
            return OpenVerdict::Resync(format!(
                "the DR side expects record {dr_next}, the journal holds {first_seq}..{}",
                self.next_seq
            ));
        }
        self.acked = dr_next - 1;
        self.drop_times_upto(self.acked);
        if !self.unacked() {
            self.unacked_bytes = 0;
        }
        OpenVerdict::StreamFrom(dr_next)
    }

    /// A resync starts: the journal restarts empty at `from`, writes are
    /// journaled again, and the DR side takes records from `from` on and
    /// holds them until the pass commits.
    pub fn begin_resync(&mut self, from: u64) -> u64 {
        let reason = match std::mem::replace(&mut self.resync, Resync::None) {
            Resync::Needed(r) | Resync::Running { reason: r, .. } => r,
            Resync::None => "requested".into(),
        };
        self.resyncs_begun += 1;
        self.journaling = true;
        self.next_seq = from;
        self.unacked_bytes = 0;
        self.times.clear();
        self.resync = Resync::Running {
            from,
            gen_: self.resyncs_begun,
            reason,
        };
        self.covered_from = from;
        // The DR side restarts its redo log at `from`: nothing from there on
        // is durable there yet, whatever an earlier attempt sent.
        self.acked = from.saturating_sub(1);
        from
    }

    /// The marker a resync's commit names: the last record appended now.
    /// Called after the pass has read every chunk it sent (reads after the
    /// marker would carry writes the marker does not cover).
    pub fn resync_marker(&mut self) -> Option<FuzzyCommit> {
        match self.resync {
            Resync::Running { from, .. } => {
                self.rpo_zero_from = self.next_seq - 1;
                Some(FuzzyCommit {
                    from_seq: from,
                    consistent_at: self.next_seq - 1,
                })
            }
            _ => None,
        }
    }

    /// The resync's tree landed at the DR site: everything before its start
    /// is there now.
    /// True when a running resync ended so; false when it was superseded
    /// meanwhile (a fallback): then another must run.
    pub fn resync_committed(&mut self) -> bool {
        if let Resync::Running { gen_, .. } = self.resync {
            self.resyncs_committed = gen_;
            self.resync = Resync::None;
            self.covered_from = 0;
            self.caught_up_check();
            true
        } else {
            false
        }
    }

    /// The resync did not finish (link lost, error): it must run again.
    pub fn resync_interrupted(&mut self) {
        if let Resync::Running { reason, .. } = &self.resync {
            self.resync = Resync::Needed(reason.clone());
        }
    }

    fn drop_times_upto(&mut self, upto: u64) {
        while self.times.len() > 1 && self.times[1].0 <= upto + 1 {
            self.times.pop_front();
        }
        if self.times.len() == 1 && self.times[0].0 <= upto {
            self.times.clear();
        }
    }

    fn caught_up_check(&mut self) {
        if !self.unacked() && self.resync == Resync::None {
            self.unacked_bytes = 0;
            self.degraded = false;
        }
    }

    /// The DR side holds every record up to `upto` durably (`bytes` of them
    /// new). An answer past the last record is a protocol error.
    pub fn durable(&mut self, upto: u64, bytes: u64) -> Result<bool, String> {
        if upto >= self.next_seq {
            return Err(format!(
                "the DR side acknowledged record {upto}, past the last one ({})",
                self.next_seq - 1
            ));
        }
        if upto <= self.acked {
            return Ok(false);
        }
        self.acked = upto;
        self.unacked_bytes = self.unacked_bytes.saturating_sub(bytes);
        self.drop_times_upto(upto);
        let was = self.degraded;
        self.caught_up_check();
        Ok(was && !self.degraded)
    }

    /// Is record `seq` durable at the DR site?
    pub fn durable_at_dr(&self, seq: u64) -> bool {
        self.acked >= seq && seq >= self.covered_from
    }

    /// A flush waiting since `started` for `target`.
    pub fn flush_verdict(
        &mut self,
        target: FlushTarget,
        started: Instant,
        now: Instant,
    ) -> FlushVerdict {
        let there = match target {
            FlushTarget::Record(seq) => self.durable_at_dr(seq),
            FlushTarget::Resync(n) => self.resyncs_committed >= n,
        };
        if self.cfg.mode != Mode::Sync || self.degraded || there {
            return FlushVerdict::Done;
        }
        let deadline = started + self.cfg.sync_wait;
        if now < deadline {
            return FlushVerdict::Wait(deadline);
        }
        match self.cfg.fallback {
            SyncFallback::Degrade => {
                self.degraded = true;
                FlushVerdict::Degraded
            }
            SyncFallback::Fail => {
                let why = if self.link_down_since.is_some() {
                    "the link to the DR site is down"
                } else if self.resync_needed() {
                    "the DR copy is being resynced"
                } else {
                    "no acknowledgment came"
                };
                FlushVerdict::Fail(format!(
                    "the DR site did not confirm the flush within {:.1}s ({why})",
                    self.cfg.sync_wait.as_secs_f64()
                ))
            }
        }
    }

    pub fn view(&self, now: Instant) -> SessionView {
        let lagging = self.unacked();
        SessionView {
            next_seq: self.next_seq,
            acked_seq: self.acked,
            lag_bytes: if lagging { self.unacked_bytes } else { 0 },
            lag_seconds: if lagging {
                self.times
                    .front()
                    .map(|(_, t)| now.saturating_duration_since(*t).as_secs_f64())
                    .unwrap_or(0.0)
            } else {
                0.0
            },
            degraded: self.degraded,
            resync_needed: self.resync_needed(),
            resync_running: self.resync_running().is_some(),
            resync_reason: match &self.resync {
                Resync::None => String::new(),
                Resync::Needed(r) | Resync::Running { reason: r, .. } => r.clone(),
            },
            rpo_zero: self.cfg.mode == Mode::Sync
                && !self.degraded
                && !self.resync_needed()
                && self.acked >= self.rpo_zero_from,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(2);

    #[allow(non_snake_case)]
    fn R(seq: u64) -> FlushTarget {
        FlushTarget::Record(seq)
    }

    fn session(mode: Mode, fallback: SyncFallback) -> StreamSession {
        StreamSession::new(
            StreamConfig {
                mode,
                fallback,
                sync_wait: WAIT,
                link_down_max: Duration::from_secs(900),
            },
            1,
            0,
            None,
        )
    }

    fn append(s: &mut StreamSession, n: u64, now: Instant) {
        for _ in 0..n {
            let seq = s.next_seq;
            s.appended(seq, 4136, now);
        }
    }

    #[test]
    fn a_sync_flush_completes_on_the_acknowledgment_and_fails_after_its_wait() {
        let t0 = Instant::now();
        let mut s = session(Mode::Sync, SyncFallback::Fail);
        append(&mut s, 3, t0);
        assert_eq!(s.flush_target(), FlushTarget::Record(3));
        assert_eq!(s.flush_verdict(R(3), t0, t0), FlushVerdict::Wait(t0 + WAIT));
        s.durable(3, 3 * 4136).unwrap();
        assert_eq!(s.flush_verdict(R(3), t0, t0), FlushVerdict::Done);
        append(&mut s, 2, t0);
        s.link_down(t0);
        match s.flush_verdict(R(5), t0, t0 + WAIT) {
            FlushVerdict::Fail(m) => assert!(m.contains("link") && m.contains("2.0s"), "{m}"),
            v => panic!("{v:?}"),
        }
        assert!(!s.view(t0).degraded);
    }

    #[test]
    fn a_degrading_volume_runs_async_until_the_dr_side_caught_up() {
        let t0 = Instant::now();
        let mut s = session(Mode::Sync, SyncFallback::Degrade);
        append(&mut s, 4, t0);
        assert_eq!(s.flush_verdict(R(4), t0, t0 + WAIT), FlushVerdict::Degraded);
        assert!(s.view(t0).degraded);
        assert!(!s.view(t0).rpo_zero);
        append(&mut s, 1, t0);
        assert_eq!(s.flush_verdict(R(5), t0, t0), FlushVerdict::Done);
        assert_eq!(s.durable(4, 0), Ok(false));
        assert_eq!(s.durable(5, 0), Ok(true), "caught up: sync again");
        assert!(s.view(t0).rpo_zero);
    }

    #[test]
    fn flushes_during_a_resync_complete_once_durable_at_dr_and_rpo_zero_is_not_claimed() {
        let t0 = Instant::now();
        let mut s = session(Mode::Sync, SyncFallback::Fail);
        append(&mut s, 10, t0);
        let before = s.flush_target();
        // A fallback dropped records 1..=10; until the resync starts,
        // writes are not journaled: a flush then waits for its commit.
        assert!(s.fall_back("journal full", 11));
        assert!(!s.journaling());
        assert!(s.view(t0).resync_needed && !s.view(t0).rpo_zero);
        let unjournaled = s.flush_target();
        assert_eq!(unjournaled, FlushTarget::Resync(1));
        let from = s.begin_resync(11);
        assert!(s.journaling());
        append(&mut s, 5, t0);
        // Flushes of dropped or unjournaled writes wait for the commit, not for the stream.
        assert_eq!(
            s.flush_verdict(before, t0, t0),
            FlushVerdict::Wait(t0 + WAIT)
        );
        assert_eq!(
            s.flush_verdict(unjournaled, t0, t0),
            FlushVerdict::Wait(t0 + WAIT)
        );
        assert_eq!(
            s.flush_verdict(R(15), t0, t0),
            FlushVerdict::Wait(t0 + WAIT)
        );
        s.durable(15, 0).unwrap();
        assert_eq!(
            s.flush_verdict(R(15), t0, t0),
            FlushVerdict::Done,
            "records durable in the DR redo log complete the flush during the resync"
        );
        assert_eq!(
            s.flush_verdict(before, t0, t0),
            FlushVerdict::Wait(t0 + WAIT)
        );
        assert!(!s.view(t0).rpo_zero, "RPO 0 is not in force while it runs");
        // The marker covers every record appended until the pass has sent
        // everything, including ones after the scan.
        append(&mut s, 3, t0);
        assert_eq!(
            s.resync_marker(),
            Some(FuzzyCommit {
                from_seq: from,
                consistent_at: 18
            })
        );
        s.resync_committed();
        assert_eq!(s.flush_verdict(before, t0, t0), FlushVerdict::Done);
        assert_eq!(s.flush_verdict(unjournaled, t0, t0), FlushVerdict::Done);
        assert!(!s.view(t0).rpo_zero, "records 16..18 are not there yet");
        s.durable(18, 0).unwrap();
        assert!(s.view(t0).rpo_zero);
    }

    #[test]
    fn a_fallback_during_a_resync_does_not_complete_flushes_of_dropped_records() {
        let t0 = Instant::now();
        let mut s = session(Mode::Sync, SyncFallback::Fail);
        append(&mut s, 200, t0);
        s.durable(100, 0).unwrap();
        // Records 101..=200 dropped; a flush waits on 150.
        s.fall_back("journal full", 201);
        s.begin_resync(201);
        append(&mut s, 50, t0);
        s.durable(250, 0).unwrap();
        assert_eq!(
            s.flush_verdict(R(150), t0, t0),
            FlushVerdict::Wait(t0 + WAIT)
        );
        // The journal fills again during the resync: still not there.
        s.fall_back("journal full", 251);
        assert_eq!(
            s.flush_verdict(R(150), t0, t0),
            FlushVerdict::Wait(t0 + WAIT)
        );
        assert_eq!(
            s.flush_verdict(R(240), t0, t0),
            FlushVerdict::Wait(t0 + WAIT)
        );
        assert!(!s.resync_committed(), "a superseded resync does not commit");
        s.begin_resync(251);
        append(&mut s, 1, t0);
        s.resync_marker();
        assert!(s.resync_committed());
        assert_eq!(s.flush_verdict(R(150), t0, t0), FlushVerdict::Done);
    }

    #[test]
    fn the_handshake_streams_only_where_the_dr_side_continues_this_journal() {
        let t0 = Instant::now();
        let mut s = session(Mode::Async, SyncFallback::Fail);
        append(&mut s, 200, t0);
        assert_eq!(s.open(133, true, 1), OpenVerdict::StreamFrom(133));
        assert_eq!(s.acked(), 132);
        // Same number, other records: a recreated journal.
        assert!(matches!(s.open(133, false, 1), OpenVerdict::Resync(_)));
        // Trimmed past what the DR side has, or ahead of the journal.
        assert!(matches!(s.open(10, true, 50), OpenVerdict::Resync(_)));
        assert!(matches!(s.open(500, true, 1), OpenVerdict::Resync(_)));
        assert!(s.durable(201, 0).is_err(), "an ack past the last record");
    }

    #[test]
    fn a_link_down_too_long_with_records_waiting_falls_back_and_idle_has_no_timer() {
        let t0 = Instant::now();
        let mut s = session(Mode::Async, SyncFallback::Fail);
        s.link_down(t0);
        assert_eq!(s.poll_timeout(), None, "nothing waits: no timer");
        append(&mut s, 1, t0 + Duration::from_secs(60));
        let deadline = t0 + Duration::from_secs(900);
        assert_eq!(s.poll_timeout(), Some(deadline));
        assert_eq!(s.handle_timeout(deadline - Duration::from_secs(1)), None);
        let why = s.handle_timeout(deadline).unwrap();
        assert!(why.contains("900s"));
        assert!(s.fall_back(&why, 2));
        assert!(!s.fall_back(&why, 2), "already needed");
        assert_eq!(s.poll_timeout(), None);
        s.link_up();
        assert_eq!(s.view(t0).lag_bytes, 0);
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_unacknowledged_write() {
        let t0 = Instant::now();
        let mut s = session(Mode::Async, SyncFallback::Fail);
        append(&mut s, 1, t0);
        append(&mut s, 1, t0 + Duration::from_secs(3));
        let v = s.view(t0 + Duration::from_secs(5));
        assert_eq!(v.lag_seconds, 5.0);
        assert_eq!(v.lag_bytes, 2 * 4136);
        s.durable(1, 4136).unwrap();
        assert_eq!(s.view(t0 + Duration::from_secs(5)).lag_seconds, 2.0);
        s.durable(2, 4136).unwrap();
        let v = s.view(t0 + Duration::from_secs(5));
        assert_eq!((v.lag_seconds, v.lag_bytes), (0.0, 0));
    }
}
