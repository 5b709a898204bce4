//! The inter-site link's bandwidth limit (`limits.link_bytes_per_s_max`,
//! changed at run time by `ferry link limit`): a DR link is shared with
//! production traffic. Every frame this site sends to its peer takes its
//! bytes from one token bucket before it is written, so the average rate of
//! frames out of this site stays at the limit whatever the number of
//! streams; a burst of a quarter second's worth passes at once.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct LinkLimit {
    bucket: Mutex<Bucket>,
    /// Nanoseconds senders waited for the limit, in all.
    throttled_ns: AtomicU64,
}

struct Bucket {
    /// Bytes per second; 0: no limit.
    rate: u64,
    /// Bytes that may go now; negative: owed by senders already waiting.
    balance: f64,
    at: Option<Instant>,
}

/// The limit every frame to the peer goes through (one link per site).
pub static LINK: LinkLimit = LinkLimit::new();

impl Default for LinkLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl LinkLimit {
    pub const fn new() -> LinkLimit {
        LinkLimit {
            bucket: Mutex::new(Bucket {
                rate: 0,
                balance: 0.0,
                at: None,
            }),
            throttled_ns: AtomicU64::new(0),
        }
    }

    fn burst(rate: u64) -> f64 {
        (rate as f64 / 4.0).max(64.0 * 1024.0)
    }

    /// Sets the limit (0: none). Senders already waiting keep their turn.
    pub fn set(&self, bytes_per_s: u64) {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        // A new limit starts with a full burst; a changed one keeps what
        // is owed.
        b.balance = if b.rate == 0 {
            Self::burst(bytes_per_s)
        } else {
            b.balance.min(Self::burst(bytes_per_s))
        };
        b.rate = bytes_per_s;
        b.at = Some(Instant::now());
    }

    pub fn rate(&self) -> u64 {
        self.bucket.lock().unwrap_or_else(|p| p.into_inner()).rate
    }

    /// Seconds senders have waited for the limit since the start.
    pub fn throttled_seconds(&self) -> f64 {
        self.throttled_ns.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// How long a sender of `bytes` must wait before writing them (their
    /// bytes are taken now: the next sender waits behind them).
    pub fn reserve(&self, bytes: u64) -> Duration {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        if b.rate == 0 {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let rate = b.rate as f64;
        let elapsed = b.at.map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        b.balance = (b.balance + elapsed * rate).min(Self::burst(b.rate));
        b.at = Some(now);
        b.balance -= bytes as f64;
        if b.balance >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.balance / rate)
        }
    }

    /// Waits until `bytes` may be sent.
    pub async fn take(&self, bytes: u64) {
        let wait = self.reserve(bytes);
        if !wait.is_zero() {
            self.throttled_ns
                .fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_limit_nothing_waits() {
        let l = LinkLimit::new();
        assert_eq!(l.reserve(1 << 30), Duration::ZERO);
    }

    #[test]
    fn senders_queue_behind_each_other_at_the_rate() {
        let l = LinkLimit::new();
        l.set(1 << 20); // 1 MiB/s, a burst of 256 KiB
        assert_eq!(l.reserve(256 << 10), Duration::ZERO);
        // Eight senders of 1 MiB each at once: the last waits about 8 s.
        let waits: Vec<Duration> = (0..8).map(|_| l.reserve(1 << 20)).collect();
        for (i, w) in waits.iter().enumerate() {
            let want = (i + 1) as f64;
            assert!(
                (w.as_secs_f64() - want).abs() < 0.05,
                "sender {i} waits {w:?}, not about {want} s"
            );
        }
        // Lifted: the next sender goes at once.
        l.set(0);
        assert_eq!(l.reserve(1 << 30), Duration::ZERO);
    }

    #[test]
    fn an_idle_link_earns_no_more_than_its_burst() {
        let l = LinkLimit::new();
        l.set(4 << 20);
        std::thread::sleep(Duration::from_millis(300));
        // A quarter second's worth (1 MiB) is free, the rest waits.
        let w = l.reserve(3 << 20);
        assert!(
            (w.as_secs_f64() - 0.5).abs() < 0.05,
            "{w:?}: the idle time was banked past the burst"
        );
    }
}
