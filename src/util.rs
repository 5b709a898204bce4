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

/// Unix seconds that do not jump with the wall clock: the wall clock when
/// the daemon first asked, plus the monotonic time since. Ages that decide
/// what to delete (retention) use this, so a clock set 30 days ahead does
/// not make every recovery point 30 days old. A jump is logged once.
pub fn trusted_now_unix() -> u64 {
    use std::sync::atomic::{AtomicI64, Ordering};
    static BASE: std::sync::OnceLock<(u64, std::time::Instant)> = std::sync::OnceLock::new();
    static WARNED_SKEW: AtomicI64 = AtomicI64::new(0);
    let (wall0, t0) = *BASE.get_or_init(|| (now_unix(), std::time::Instant::now()));
    let trusted = wall0 + t0.elapsed().as_secs();
    let skew = now_unix() as i64 - trusted as i64;
    let warned = WARNED_SKEW.load(Ordering::Relaxed);
    if (skew - warned).abs() > 300 {
        WARNED_SKEW.store(skew, Ordering::Relaxed);
        tracing::warn!(
            skew_seconds = skew,
            "the wall clock jumped: recovery point ages go by the daemon's monotonic clock, not the wall clock"
        );
    }
    trusted
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
    fn utc_formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_795_000_000), "2026-11-18 11:06:40");
    }
}
