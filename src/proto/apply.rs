//! The DR side's applier of one continuous replica, without I/O.
//!
//! Records arrive in order and become durable in the redo log; the machine
//! decides when to write them into the replica image (only whole flush
//! epochs, so the image always holds a state the primary had at a flush),
//! when to take a recovery point (on schedule, only when something new was
//! applied; on demand; at once when a resync makes the image consistent),
//! and how long to back off after a failure. The driver carries out one
//! [`ApplyCommand`] at a time and reports back; time is passed in, so an
//! idle volume has no timer at all.

use std::time::{Duration, Instant};

/// Backoff after a failed command: doubles from the first value up to the last.
pub const APPLY_BACKOFF_FIRST: Duration = Duration::from_secs(1);
pub const APPLY_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Why a point is taken (recorded as the point's `source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointSource {
    OnDemand,
    ResyncComplete,
    Scheduled,
}

impl PointSource {
    pub fn label(self) -> &'static str {
        match self {
            PointSource::OnDemand => "on demand",
            PointSource::ResyncComplete => "resync complete",
            PointSource::Scheduled => "flush boundary",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyCommand {
    /// Write records `(applied, upto]` into the image (upto ends a flush
    /// epoch), fsync it, then report [`ApplyMachine::applied`].
    Apply { upto: u64 },
    /// Take a recovery point of the image as it is (a flush boundary).
    Point { source: PointSource },
}

/// The durable positions the machine starts from (the volume's record).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStart {
    /// Every record up to here is durable in the redo log.
    pub received: u64,
    /// The newest flush record in the redo log.
    pub last_flush: u64,
    /// Records written into the image.
    pub applied: u64,
    /// Records in the newest point's tree (`committed`).
    pub base: u64,
    /// The image is out of order until `applied` reaches this.
    pub inconsistent_until: Option<u64>,
    /// A resync is open: records wait for its commit before any is applied.
    pub held: bool,
}

pub struct ApplyMachine {
    received: u64,
    last_flush: u64,
    applied: u64,
    base: u64,
    inconsistent_until: Option<u64>,
    held: bool,
    point_interval: Duration,
    last_point_at: Instant,
    want_point: u64,
    points_made: u64,
    point_soon: bool,
    /// The redo log is over half full: a point (which trims it) is due now.
    pressed: bool,
    busy: Option<(ApplyCommand, u64)>,
    failing: Option<Failing>,
    /// Changes when a resync opens or commits: a command polled in an
    /// earlier generation is stale (the driver drops it).
    generation: u64,
}

struct Failing {
    error: String,
    retry_at: Instant,
    backoff: Duration,
    errors: u64,
}

/// What status shows.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApplyView {
    pub received_seq: u64,
    pub applied_seq: u64,
    pub point_seq: u64,
    pub consistent: bool,
    /// A resync is open: records are kept, not applied, until its commit.
    pub held: bool,
    pub last_error: Option<String>,
    pub errors: u64,
}

impl ApplyMachine {
    pub fn new(start: ApplyStart, point_interval: Duration, now: Instant) -> Self {
        ApplyMachine {
            received: start.received,
            last_flush: start.last_flush.max(start.applied),
            applied: start.applied,
            base: start.base,
            inconsistent_until: start.inconsistent_until,
            held: start.held,
            point_interval,
            last_point_at: now,
            want_point: 0,
            points_made: 0,
            point_soon: false,
            pressed: false,
            busy: None,
            failing: None,
            generation: 0,
        }
    }

    /// The generation commands are polled in (see `generation`).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn consistent(&self) -> bool {
        !self.held && self.inconsistent_until.is_none_or(|u| self.applied >= u)
    }

    pub fn applied_seq(&self) -> u64 {
        self.applied
    }

    /// The newest complete flush epoch durable in the redo log.
    pub fn last_flush(&self) -> u64 {
        self.last_flush
    }

    /// Records up to `upto` are durable in the redo log; `flush` is the
    /// newest flush record among them, if any.
    pub fn received(&mut self, upto: u64, flush: Option<u64>) {
        self.received = self.received.max(upto);
        if let Some(f) = flush {
            self.last_flush = self.last_flush.max(f);
        }
    }

    /// Whether the redo log is over half full (said after every batch): a
    /// point then trims it at once instead of at the next interval.
    pub fn set_pressed(&mut self, pressed: bool) {
        self.pressed = pressed;
    }

    /// A resync opened at `from_seq`: the redo log restarts there and its
    /// records wait for the commit; the image stays as it is (the last state).
    pub fn resync_opened(&mut self, from_seq: u64) {
        let before = from_seq.saturating_sub(1);
        // A command polled before the resync opened finds it open and does
        // nothing: it is not waited for.
        self.busy = None;
        self.generation += 1;
        self.held = true;
        self.received = before;
        self.last_flush = before;
        self.applied = before;
        self.base = before;
        self.point_soon = false;
    }

    /// The resync's tree is in the image: records from the resync's start
    /// apply on top, and the image is consistent once they pass `until`.
    pub fn resync_committed(&mut self, until: u64) {
        self.generation += 1;
        self.held = false;
        if until <= self.applied {
            self.inconsistent_until = None;
            self.point_soon = true;
        } else {
            self.inconsistent_until = Some(until);
        }
    }

    /// `ferry points --create`: returns a ticket; the point is made once
    /// [`ApplyMachine::points_made`] reaches it.
    pub fn want_point(&mut self) -> u64 {
        self.want_point += 1;
        self.want_point
    }

    pub fn points_made(&self) -> u64 {
        self.points_made
    }

    /// The next command, if one is due now.
    pub fn poll(&mut self, now: Instant) -> Option<ApplyCommand> {
        if self.busy.is_some() {
            return None;
        }
        if self.failing.as_ref().is_some_and(|f| now < f.retry_at) {
            return None;
        }
        let cmd = if !self.held && self.last_flush > self.applied {
            ApplyCommand::Apply {
                upto: self.last_flush,
            }
        } else if !self.consistent() {
            return None;
        } else if self.want_point > self.points_made {
            ApplyCommand::Point {
                source: PointSource::OnDemand,
            }
        } else if self.point_soon {
            ApplyCommand::Point {
                source: PointSource::ResyncComplete,
            }
        } else if self.applied > self.base
            && (self.pressed || now >= self.last_point_at + self.point_interval)
        {
            ApplyCommand::Point {
                source: PointSource::Scheduled,
            }
        } else {
            return None;
        };
        self.busy = Some((cmd, self.want_point));
        Some(cmd)
    }

    /// When [`ApplyMachine::poll`] may next have something without a new
    /// input: a retry after a failure, or the next scheduled point. `None`
    /// when idle (nothing applied since the last point).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.busy.is_some() {
            return None;
        }
        if let Some(f) = &self.failing {
            return Some(f.retry_at);
        }
        if self.consistent() && self.applied > self.base {
            if self.pressed {
                return Some(self.last_point_at);
            }
            return Some(self.last_point_at + self.point_interval);
        }
        None
    }

    /// The image holds every record up to `upto`, durably. True when it
    /// just became consistent (a resync has caught up).
    pub fn applied(&mut self, upto: u64) -> bool {
        let was = self.consistent();
        self.applied = self.applied.max(upto);
        self.busy = None;
        self.failing = None;
        let now_consistent = self.inconsistent_until.is_none_or(|u| self.applied >= u);
        if now_consistent && self.inconsistent_until.is_some() {
            self.inconsistent_until = None;
        }
        let became = !was && self.consistent();
        if became {
            self.point_soon = true;
        }
        became
    }

    /// An fsync of the image failed: the writes since the last point (its
    /// last good fsync) may be gone from the disk whatever a later fsync
    /// says, so every record after `base` is written again, and the image
    /// is not a flush state until they are (the command still fails and
    /// backs off: call [`ApplyMachine::failed`] too).
    /// Returns the applied position and `inconsistent_until` to record.
    pub fn rewind(&mut self) -> (u64, Option<u64>) {
        let upto = self.applied.max(self.last_flush);
        if upto > self.base {
            self.inconsistent_until = Some(self.inconsistent_until.unwrap_or(0).max(upto));
        }
        self.applied = self.base;
        (self.applied, self.inconsistent_until)
    }

    /// A point of the image at `seq` is recorded.
    pub fn point_taken(&mut self, seq: u64, now: Instant) {
        if let Some((ApplyCommand::Point { .. }, ticket)) = self.busy.take() {
            self.points_made = self.points_made.max(ticket);
        }
        self.base = self.base.max(seq);
        self.last_point_at = now;
        self.point_soon = false;
        self.failing = None;
    }

    /// The command is over, whatever it did (one that found its generation
    /// stale did nothing): the next one may be polled.
    pub fn finished(&mut self) {
        self.busy = None;
    }

    /// The command failed: retry after a backoff that grows while it keeps failing.
    pub fn failed(&mut self, error: String, now: Instant) {
        self.busy = None;
        let (backoff, errors) = match &self.failing {
            Some(f) => ((f.backoff * 2).min(APPLY_BACKOFF_MAX), f.errors + 1),
            None => (APPLY_BACKOFF_FIRST, 1),
        };
        self.failing = Some(Failing {
            error,
            retry_at: now + backoff,
            backoff,
            errors,
        });
    }

    pub fn last_error(&self) -> Option<&str> {
        self.failing.as_ref().map(|f| f.error.as_str())
    }

    pub fn view(&self) -> ApplyView {
        ApplyView {
            received_seq: self.received,
            applied_seq: self.applied,
            point_seq: self.base,
            consistent: self.consistent(),
            held: self.held,
            last_error: self.failing.as_ref().map(|f| f.error.clone()),
            errors: self.failing.as_ref().map(|f| f.errors).unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IVL: Duration = Duration::from_secs(10);

    fn machine(t0: Instant) -> ApplyMachine {
        ApplyMachine::new(ApplyStart::default(), IVL, t0)
    }

    #[test]
    fn a_failed_fsync_writes_the_records_since_the_point_again() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        m.received(4, Some(4));
        assert_eq!(m.poll(t0), Some(ApplyCommand::Apply { upto: 4 }));
        m.applied(4);
        assert_eq!(
            m.poll(t0 + IVL),
            Some(ApplyCommand::Point {
                source: PointSource::Scheduled
            })
        );
        m.point_taken(4, t0 + IVL);
        m.received(9, Some(8));
        assert_eq!(m.poll(t0 + IVL), Some(ApplyCommand::Apply { upto: 8 }));
        m.applied(8);
        let t1 = t0 + 2 * IVL;
        assert_eq!(
            m.poll(t1),
            Some(ApplyCommand::Point {
                source: PointSource::Scheduled
            })
        );
        // The point's fsync fails: back to the point at 4, inconsistent
        // until 8 is written again; no point before that.
        assert_eq!(m.rewind(), (4, Some(8)));
        m.failed("fsync: EIO".into(), t1);
        assert!(!m.consistent());
        assert_eq!(m.poll(t1), None, "backing off");
        let t2 = t1 + APPLY_BACKOFF_FIRST;
        assert_eq!(m.poll(t2), Some(ApplyCommand::Apply { upto: 8 }));
        assert!(m.applied(8), "consistent again");
        assert_eq!(
            m.poll(t2),
            Some(ApplyCommand::Point {
                source: PointSource::ResyncComplete
            })
        );
    }

    #[test]
    fn only_whole_flush_epochs_are_applied() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        m.received(5, None);
        assert_eq!(m.poll(t0), None, "no flush yet: nothing to apply");
        m.received(9, Some(7));
        assert_eq!(m.poll(t0), Some(ApplyCommand::Apply { upto: 7 }));
        assert_eq!(m.poll(t0), None, "one command at a time");
        assert!(!m.applied(7));
        assert_eq!(m.applied_seq(), 7);
        assert_eq!(m.poll(t0), None);
    }

    #[test]
    fn points_come_on_schedule_only_when_something_new_was_applied() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        assert_eq!(m.poll_timeout(), None, "idle: no timer at all");
        m.received(3, Some(3));
        assert_eq!(m.poll(t0), Some(ApplyCommand::Apply { upto: 3 }));
        m.applied(3);
        assert_eq!(m.poll_timeout(), Some(t0 + IVL));
        assert_eq!(m.poll(t0 + IVL - Duration::from_millis(1)), None);
        let t1 = t0 + IVL;
        assert_eq!(
            m.poll(t1),
            Some(ApplyCommand::Point {
                source: PointSource::Scheduled
            })
        );
        m.point_taken(3, t1);
        assert_eq!(m.poll_timeout(), None, "the point covers everything");
        assert_eq!(m.poll(t1 + IVL * 5), None);
    }

    #[test]
    fn a_redo_log_over_half_full_makes_a_point_due_at_once() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        m.received(3, Some(3));
        m.set_pressed(true);
        assert_eq!(m.poll(t0), Some(ApplyCommand::Apply { upto: 3 }));
        m.applied(3);
        assert_eq!(m.poll_timeout(), Some(t0), "due now, not at the interval");
        let at = t0 + Duration::from_millis(5);
        assert_eq!(
            m.poll(at),
            Some(ApplyCommand::Point {
                source: PointSource::Scheduled
            })
        );
        m.point_taken(3, at);
        // Nothing applied since: pressure alone makes no point.
        assert_eq!(m.poll_timeout(), None);
        assert_eq!(m.poll(at), None);
        m.set_pressed(false);
        m.received(5, Some(5));
        assert_eq!(m.poll(at), Some(ApplyCommand::Apply { upto: 5 }));
        m.applied(5);
        assert_eq!(m.poll(at), None, "no pressure: the interval again");
    }

    #[test]
    fn an_on_demand_point_waits_for_the_apply_and_is_counted() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        m.received(4, Some(4));
        let ticket = m.want_point();
        assert_eq!(m.poll(t0), Some(ApplyCommand::Apply { upto: 4 }));
        m.applied(4);
        assert_eq!(
            m.poll(t0),
            Some(ApplyCommand::Point {
                source: PointSource::OnDemand
            })
        );
        assert!(m.points_made() < ticket);
        m.point_taken(4, t0);
        assert!(m.points_made() >= ticket);
    }

    #[test]
    fn a_resync_holds_records_until_its_commit_then_a_point_marks_consistency() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        m.received(10, Some(10));
        m.poll(t0);
        m.applied(10);
        m.resync_opened(20);
        assert!(!m.consistent());
        m.received(30, Some(28));
        assert_eq!(m.poll(t0), None, "held: the image keeps its last state");
        assert_eq!(m.poll_timeout(), None);
        // The pass sent chunks read up to record 35: consistent from there.
        m.resync_committed(35);
        assert_eq!(m.poll(t0), Some(ApplyCommand::Apply { upto: 28 }));
        assert!(!m.applied(28), "28 < 35: still out of order");
        assert_eq!(m.poll(t0), None, "no point of an inconsistent image");
        m.received(40, Some(36));
        assert_eq!(m.poll(t0), Some(ApplyCommand::Apply { upto: 36 }));
        assert!(m.applied(36), "consistent once past the pass's marker");
        assert_eq!(
            m.poll(t0),
            Some(ApplyCommand::Point {
                source: PointSource::ResyncComplete
            })
        );
        m.point_taken(36, t0);
        assert_eq!(m.poll(t0), None);
        assert_eq!(m.view().point_seq, 36);
    }

    #[test]
    fn a_resync_that_read_a_quiet_image_is_consistent_at_its_commit() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        m.resync_opened(1);
        m.resync_committed(0);
        assert!(m.consistent());
        assert_eq!(
            m.poll(t0),
            Some(ApplyCommand::Point {
                source: PointSource::ResyncComplete
            })
        );
    }

    #[test]
    fn failures_back_off_and_show_until_a_command_succeeds() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        m.received(2, Some(2));
        assert_eq!(m.poll(t0), Some(ApplyCommand::Apply { upto: 2 }));
        m.failed("disk full".into(), t0);
        assert_eq!(m.poll(t0), None);
        assert_eq!(m.poll_timeout(), Some(t0 + APPLY_BACKOFF_FIRST));
        let t1 = t0 + APPLY_BACKOFF_FIRST;
        assert_eq!(m.poll(t1), Some(ApplyCommand::Apply { upto: 2 }));
        m.failed("disk full".into(), t1);
        assert_eq!(m.poll_timeout(), Some(t1 + APPLY_BACKOFF_FIRST * 2));
        assert_eq!(m.view().errors, 2);
        assert_eq!(m.last_error(), Some("disk full"));
        let t2 = t1 + APPLY_BACKOFF_FIRST * 2;
        assert!(m.poll(t2).is_some());
        m.applied(2);
        assert_eq!(m.last_error(), None);
    }
}
