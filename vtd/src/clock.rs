//! Time as an input: the clock a remapping unit (and the driver on it) reads.
//!
//! The hardware model takes time as an argument where an entry point is driven by time
//! ([`crate::unit::Unit::poll`] takes `now`), and asks the [`Clock`] it was built with where
//! time is needed inside another operation (stamping a device-TLB invalidation when a
//! register write sends it, measuring a device's answer, a sampled page walk). The driver
//! reads the same clock for the age of its deferred flushes. [`SystemClock`] is the
//! default and reads the monotonic wall clock; [`ManualClock`] moves only when told to, so
//! time-out tests advance it instead of sleeping.
//!
//! This module owns only the clocks; what time means to each rule is the rule's business.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A source of monotonic time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current instant. Never earlier than an instant this clock returned before.
    fn now(&self) -> Instant;
}

/// The monotonic wall clock ([`Instant::now`]): what a unit uses unless built with another.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[inline]
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that stands still until [`ManualClock::advance`] moves it: tests use it to make
/// time-outs and deadlines pass without sleeping. Cheap to read from many threads.
#[derive(Debug)]
pub struct ManualClock {
    /// The instant the clock started at.
    origin: Instant,
    /// Nanoseconds advanced since `origin`.
    elapsed: AtomicU64,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    /// A clock that reads the current wall-clock instant until advanced.
    pub fn new() -> Self {
        Self { origin: Instant::now(), elapsed: AtomicU64::new(0) }
    }

    /// Moves the clock forward by `by` (saturating at about 584 years).
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let _ = self.elapsed.fetch_update(Ordering::AcqRel, Ordering::Acquire, |e| Some(e.saturating_add(nanos)));
    }

    /// How far the clock has been advanced in total.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.elapsed.load(Ordering::Acquire))
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.origin + self.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let c = ManualClock::new();
        let t0 = c.now();
        assert_eq!(c.now(), t0);
        c.advance(Duration::from_millis(5));
        assert_eq!(c.now() - t0, Duration::from_millis(5));
        c.advance(Duration::from_secs(1));
        assert_eq!(c.elapsed(), Duration::from_millis(1005));
    }

    #[test]
    fn the_system_clock_is_monotonic() {
        let a = SystemClock.now();
        assert!(SystemClock.now() >= a);
    }
}
