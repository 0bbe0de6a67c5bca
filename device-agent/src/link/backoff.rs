//! Exponential reconnection back-off with jitter.

use std::time::Duration;

/// Delays between connection attempts: doubling from `initial` up to `max`, each with up to
/// 25% random jitter so that many agents restarted together do not reconnect in lockstep.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    seed: u64,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration, seed: u64) -> Self {
        Self { initial, max, current: initial, seed: seed | 1 }
    }

    /// The next delay; the one after it is twice as long (up to the maximum).
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let jitter = base.mul_f64((self.seed % 1000) as f64 / 4000.0);
        (base + jitter).min(self.max)
    }

    /// Starts over after a successful connection.
    pub(crate) fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_maximum_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 3);
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(100) && d[0] <= Duration::from_millis(125));
        assert!(d[1] >= Duration::from_millis(200) && d[1] <= Duration::from_millis(250));
        assert!(d.iter().all(|x| *x <= Duration::from_secs(1)));
        assert_eq!(d[7], Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }
}
