//! Small file-system helpers shared by the daemon and the CLI.

use std::path::Path;

/// Replaces `path` with `data` so that a crash leaves either the old or the
/// new content, never a torn file.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    crate::fsio::write_atomic(&**crate::fsio::global(), path, data)
}

/// The login name of `uid`, from the password database.
pub fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: getpwuid_r writes only into `pwd` and `buf` (of the length
    // passed) and sets `result` to `pwd` or null.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let r = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if r != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(pwd.pw_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// The crash tests' hook: when `FERRY_CRASH_AT` names this step, the
/// daemon dies here at once (as a kill -9 would find it), so that a test can
/// check what a restart makes of the step.
pub fn crash_point(step: &str) {
    if std::env::var("FERRY_CRASH_AT").is_ok_and(|s| s == step) {
        eprintln!("FERRY_CRASH_AT={step}: aborting here");
        std::process::abort();
    }
}

/// Milliseconds since the Unix epoch (the wall clock, as the system
/// says; the chaos tests can shift it through the I/O seam's control file).
pub fn now_unix_ms() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    (ms + crate::fsio::clock_offset_ms()).max(0) as u64
}

/// Seconds since the Unix epoch (the wall clock).
pub fn now_unix() -> u64 {
    now_unix_ms() / 1000
}

/// The site's trusted clock: Unix seconds that do not jump with the wall
/// clock. Until the clock has settled (`retention.clock_settle` after the
/// daemon started: a host that boots with a wrong clock has it stepped by
/// NTP within minutes), it follows the wall clock; at the first reading
/// after that it takes the wall clock once more and from then on counts by
/// the monotonic clock alone. So a clock set 30 days ahead (or back) while
/// the daemon runs does not make every recovery point 30 days old (or new),
/// and a boot-time correction is still followed. Ages that decide what to
/// delete (retention) use it, and so do points' stamps. A jump is logged.
pub fn trusted_now_unix() -> u64 {
    TRUSTED.now(now_unix(), std::time::Instant::now())
}

/// Whether the trusted clock has settled: retention prunes nothing before.
pub fn clock_settled() -> bool {
    TRUSTED.settled(std::time::Instant::now())
}

/// How long after the start the wall clock is followed (config
/// `retention.clock_settle`); set once at the daemon's start.
pub fn set_clock_settle(d: std::time::Duration) {
    if !d.is_zero() {
        tracing::info!(
            settle_s = d.as_secs(),
            "retention prunes no recovery point until the clock has settled (retention.clock_settle after the start)"
        );
    }
    TRUSTED
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .0
        .get_or_insert_with(std::time::Instant::now);
    TRUSTED
        .settle_ms
        .store(d.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
}

static TRUSTED: TrustedClock = TrustedClock::new();

/// The first reading's instant; once settled, the wall clock then and its instant.
type ClockState = (
    Option<std::time::Instant>,
    Option<(u64, std::time::Instant)>,
);

/// See [`trusted_now_unix`].
struct TrustedClock {
    settle_ms: std::sync::atomic::AtomicU64,
    /// The first reading's instant, and the base once settled: the wall
    /// clock then and its instant.
    state: std::sync::Mutex<ClockState>,
    warned_skew: std::sync::atomic::AtomicI64,
}

const SETTLE_DEFAULT_MS: u64 = 600_000;

impl TrustedClock {
    const fn new() -> TrustedClock {
        TrustedClock {
            settle_ms: std::sync::atomic::AtomicU64::new(SETTLE_DEFAULT_MS),
            state: std::sync::Mutex::new((None, None)),
            warned_skew: std::sync::atomic::AtomicI64::new(0),
        }
    }

    fn settled(&self, at: std::time::Instant) -> bool {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let start = *g.0.get_or_insert(at);
        let settle = std::time::Duration::from_millis(
            self.settle_ms.load(std::sync::atomic::Ordering::Relaxed),
        );
        g.1.is_some() || at.saturating_duration_since(start) >= settle
    }

    fn now(&self, wall: u64, at: std::time::Instant) -> u64 {
        use std::sync::atomic::Ordering;
        let settled = self.settled(at);
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !settled {
            return wall;
        }
        let (wall0, t0) = *g.1.get_or_insert((wall, at));
        drop(g);
        let trusted = wall0 + at.saturating_duration_since(t0).as_secs();
        let skew = wall as i64 - trusted as i64;
        let warned = self.warned_skew.load(Ordering::Relaxed);
        if (skew - warned).abs() > 300 {
            self.warned_skew.store(skew, Ordering::Relaxed);
            tracing::warn!(
                skew_seconds = skew,
                "the wall clock jumped: recovery point ages and stamps go by the daemon's monotonic clock, not the wall clock"
            );
        }
        trusted
    }
}

/// `YYYY-MM-DD HH:MM:SS` from Unix seconds (civil-from-days, no time zone data needed).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_trusted_clock_follows_the_wall_clock_until_it_settles_then_ignores_its_jumps() {
        let c = super::TrustedClock::new();
        c.settle_ms
            .store(600_000, std::sync::atomic::Ordering::Relaxed);
        let t0 = std::time::Instant::now();
        let min = |m: u64| t0 + std::time::Duration::from_secs(m * 60);
        const DAY: u64 = 86400;
        // The host booted 30 days ahead; NTP steps it back after 2 minutes.
        assert_eq!(
            c.now(100_000_000 + 30 * DAY, min(0)),
            100_000_000 + 30 * DAY
        );
        assert!(!c.settled(min(1)));
        assert_eq!(c.now(100_000_120, min(2)), 100_000_120);
        // Settled: the wall clock is taken once more, then only the
        // monotonic clock counts, whatever the wall clock says.
        assert!(c.settled(min(10)));
        assert_eq!(c.now(100_000_600, min(10)), 100_000_600);
        assert_eq!(c.now(100_000_660 + 30 * DAY, min(11)), 100_000_660);
        assert_eq!(c.now(100_000_720 - 60 * DAY, min(12)), 100_000_720);
        assert!(c.settled(min(12)));
    }

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_795_000_000), "2026-11-18 11:06:40");
    }
}
