//! What the driver sleeps on while it waits for the invalidation queue: its subscription to
//! the unit's invalidation doorbell, dmar's stand-in for the invalidation completion event.
//!
//! Linux's `qi_submit_sync` spins on the wait descriptor's status word in memory and reads
//! FSTS between spins (`qi_check_fault`). The driver does the same, but once spinning and
//! yielding have not seen the status word move it sleeps on a [`Doorbell`] instead of
//! spinning on: the unit rings it (`unit::InvalidationDoorbell`) whenever a wait descriptor
//! completes or the queue stops on an error, which is when an invalidation completion
//! interrupt would wake a sleeping kernel thread. A ring only says "look again": the
//! driver learns what happened from the status word and the registers, never from the
//! doorbell, and sleeps with a time-out so that it keeps reading FSTS (which is how a
//! device-TLB time-out becomes ITE) even when nothing rings.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::unit::InvalidationDoorbell;

/// A counter of rings with a condition variable to sleep on. A ring with nobody asleep
/// costs two atomic operations: the lock and the condition variable are touched only when
/// a sleeper announced itself (`sleepers`), which matters because every completed wait
/// rings.
#[derive(Debug, Default)]
pub(crate) struct Doorbell {
    rings: AtomicU64,
    /// Threads inside [`Doorbell::sleep`].
    sleepers: AtomicU64,
    lock: Mutex<()>,
    rung: Condvar,
}

impl Doorbell {
    /// How many times the doorbell has rung. Read it before looking at the status word,
    /// then pass it to [`Doorbell::sleep`], so that a ring in between is not missed.
    pub(crate) fn rings(&self) -> u64 {
        self.rings.load(Ordering::Acquire)
    }

    /// Sleeps until the doorbell has rung since `seen` was read, or `timeout` passes.
    pub(crate) fn sleep(&self, seen: u64, timeout: Duration) {
        let mut guard = self.lock.lock();
        // Announce first, then look (SeqCst on both sides): either this sleeper sees the
        // ring's count, or the ringer sees the sleeper and notifies under the lock, which
        // it can only take once this thread waits.
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        if self.rings.load(Ordering::SeqCst) == seen {
            let _ = self.rung.wait_for(&mut guard, timeout);
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl InvalidationDoorbell for Doorbell {
    fn ring(&self) {
        self.rings.fetch_add(1, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) != 0 {
            let _guard = self.lock.lock();
            self.rung.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_ring_wakes_a_sleeper_and_a_missed_ring_is_not_slept_through() {
        let bell = Arc::new(Doorbell::default());
        let seen = bell.rings();
        bell.ring();
        // Rung since `seen`: returns at once, not after an hour.
        bell.sleep(seen, Duration::from_secs(3600));
        let seen = bell.rings();
        let ringer = {
            let bell = bell.clone();
            std::thread::spawn(move || bell.ring())
        };
        bell.sleep(seen, Duration::from_secs(3600));
        ringer.join().unwrap();
        assert_eq!(bell.rings(), seen + 1);
    }
}
