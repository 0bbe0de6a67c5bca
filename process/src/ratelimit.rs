//! Rate-limited logging: a warning a peer can trigger at will is written at most once per
//! interval, with the number of occurrences left out since the last line.
//!
//! One [`RateLimit`] per kind of event (usually a `static` beside the log call); it is
//! lock-free, so it costs two atomic operations on the hot path. It only decides whether
//! to log; the caller writes the line (with `suppressed` as a field).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The process's reference instant for the limiters' clocks.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Allows one event per interval through.
#[derive(Debug)]
pub struct RateLimit {
    interval_ns: u64,
    /// Nanoseconds since [`epoch`] of the last allowed event, plus one (0: never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// At most one event per `interval`.
    pub const fn new(interval: Duration) -> Self {
        Self { interval_ns: interval.as_nanos() as u64, last: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// At most one event per second: the limit for log lines a peer can cause.
    pub const fn per_second() -> Self {
        Self::new(Duration::from_secs(1))
    }

    /// Whether this event may be logged: `Some(n)` with the `n` events suppressed since
    /// the last one that was, or `None` (the event is counted as suppressed).
    pub fn check(&self) -> Option<u64> {
        self.check_at(epoch().elapsed())
    }

    fn check_at(&self, now: Duration) -> Option<u64> {
        let now = now.as_nanos() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= self.interval_ns;
        if due && self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_interval_with_the_suppressed_count() {
        let r = RateLimit::per_second();
        let ms = Duration::from_millis;
        assert_eq!(r.check_at(ms(5)), Some(0));
        for t in 6..1000 {
            assert_eq!(r.check_at(ms(t)), None);
        }
        assert_eq!(r.check_at(ms(1005)), Some(994));
        assert_eq!(r.check_at(ms(1006)), None);
        assert_eq!(r.check_at(ms(5000)), Some(1));
    }

    #[test]
    fn a_flood_from_many_threads_logs_once() {
        let r = RateLimit::new(Duration::from_secs(3600));
        let allowed: usize = std::thread::scope(|s| {
            let handles: Vec<_> =
                (0..4).map(|_| s.spawn(|| (0..10_000).filter(|_| r.check().is_some()).count())).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert_eq!(allowed, 1);
        assert_eq!(r.suppressed.load(Ordering::Relaxed), 39_999);
    }
}
