//! Deferred invalidation, after the Linux DMA flush queue (`dma-iommu.c` `fq_ring_add` /
//! `fq_flush_iotlb` / `fq_flush_timeout`; 256 entries, 10 ms): the bookkeeping of unmaps
//! whose IOTLB and device-TLB invalidation has not happened yet, and the flushes that
//! settle them.
//!
//! This module owns each domain's list of pending ranges with the table frames those
//! unmaps retired ([`PendingFlush`], kept in the domain's state under its lock), the
//! driver-wide index of which domains have a flush due and when ([`DeferredDomains`]), so
//! that a timer can ask "is any flush overdue?" with one atomic load, and the flush itself:
//! on every unit the domain spans, one domain-selective IOTLB invalidation, a device-TLB
//! invalidate-all per ATS device behind it and one wait, after which the retired frames are
//! freed (the paging-structure caches may
//! point at them until then, VT-d 6.5.1.2).
//!
//! Ages are measured on the unit's clock. A domain is flushed when its list reaches
//! `max_entries` (by the unmap that fills it), before a map that overlaps a pending range
//! (`mapping`), when the owner calls [`Driver::poll_deferred`] after its oldest unmap's
//! deadline, on [`Driver::flush_deferred`], and when it is destroyed. Nothing else runs a
//! due flush: no driver call does work for other domains behind its caller's back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use tracing::debug;

use super::Driver;
use super::domain::DomainState;
use super::error::DriverError;
use super::invalidate::IotlbScope;
use crate::ids::{DomainId, Hpa};

/// A domain's unmaps waiting for their invalidation.
#[derive(Debug, Default)]
pub(crate) struct PendingFlush {
    /// `[start, end)` of each pending unmap: its leaves and the spans of the tables it
    /// retired (everything a cache may still translate).
    ranges: Vec<(u64, u64)>,
    /// Smallest range covering every pending one: most maps are rejected by it alone.
    envelope: Option<(u64, u64)>,
    /// Table frames retired by the pending unmaps, to free after the flush.
    frames: Vec<Hpa>,
    /// When the flush is due (the earliest deadline of the pending unmaps).
    deadline: Option<Instant>,
}

impl PendingFlush {
    /// Queues one unmap's stale range and retired frames, due by `deadline`.
    pub(crate) fn push(&mut self, (start, end): (u64, u64), frames: Vec<Hpa>, deadline: Instant) {
        self.ranges.push((start, end));
        self.envelope = Some(match self.envelope {
            None => (start, end),
            Some((s, e)) => (s.min(start), e.max(end)),
        });
        self.frames.extend(frames);
        self.deadline = Some(self.deadline.map_or(deadline, |d| d.min(deadline)));
    }

    /// Pending unmaps.
    pub(crate) fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Table frames the pending unmaps retired: the domain still holds them.
    pub(crate) fn frames(&self) -> usize {
        self.frames.len()
    }

    /// True when nothing is pending.
    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// When the flush is due, if anything is pending.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// True when `[start, end)` overlaps a pending range: a map there must flush first, or
    /// the new mapping could be shadowed by a stale IOTLB or paging-structure entry.
    pub(crate) fn overlaps(&self, start: u64, end: u64) -> bool {
        let hit = |(s, e): (u64, u64)| s < end && start < e;
        self.envelope.is_some_and(hit) && self.ranges.iter().copied().any(hit)
    }

    /// Forgets every pending unmap (after their flush) and returns the frames to free.
    pub(crate) fn take(&mut self) -> Vec<Hpa> {
        self.ranges.clear();
        self.envelope = None;
        self.deadline = None;
        std::mem::take(&mut self.frames)
    }
}

/// "No deadline" in [`DeferredDomains::earliest`].
const NONE: u64 = u64::MAX;

/// The domains with pending unmaps and their flush deadlines.
#[derive(Debug)]
pub(crate) struct DeferredDomains {
    /// Origin of the nanosecond clock in `earliest`: no deadline is earlier.
    base: Instant,
    /// The earliest deadline of any domain, in nanoseconds since `base`; [`NONE`] when no
    /// domain has anything pending. Read without the lock.
    earliest: AtomicU64,
    due: Mutex<HashMap<DomainId, Instant>>,
}

impl DeferredDomains {
    /// An empty index whose deadlines are all at or after `origin` (the clock's now).
    pub(crate) fn new(origin: Instant) -> Self {
        Self { base: origin, earliest: AtomicU64::new(NONE), due: Mutex::new(HashMap::new()) }
    }

    fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(NONE - 1)
    }

    fn refresh(&self, due: &HashMap<DomainId, Instant>) {
        let earliest = due.values().min().map_or(NONE, |&t| self.nanos(t));
        self.earliest.store(earliest, Ordering::Release);
    }

    /// Records that `did`'s flush is due by `deadline` (called under the domain's lock).
    pub(crate) fn note(&self, did: DomainId, deadline: Instant) {
        let mut due = self.due.lock();
        let d = due.entry(did).or_insert(deadline);
        *d = (*d).min(deadline);
        let n = self.nanos(deadline);
        self.earliest.fetch_min(n, Ordering::AcqRel);
    }

    /// Records that `did` has nothing pending any more (called under the domain's lock).
    pub(crate) fn forget(&self, did: DomainId) {
        let mut due = self.due.lock();
        if due.remove(&did).is_some() {
            self.refresh(&due);
        }
    }

    /// Cheap check: does any domain have deferred unmaps? No lock, no clock read.
    pub(crate) fn any_pending(&self) -> bool {
        self.earliest.load(Ordering::Acquire) != NONE
    }

    /// True when the earliest deadline is at or before `now`.
    pub(crate) fn maybe_due(&self, now: Instant) -> bool {
        let earliest = self.earliest.load(Ordering::Acquire);
        earliest != NONE && earliest <= self.nanos(now)
    }

    /// The domains whose deadline is at or before `now`.
    pub(crate) fn due(&self, now: Instant) -> Vec<DomainId> {
        self.due.lock().iter().filter(|(_, t)| **t <= now).map(|(did, _)| *did).collect()
    }

    /// Every domain with pending unmaps.
    pub(crate) fn all(&self) -> Vec<DomainId> {
        self.due.lock().keys().copied().collect()
    }
}

impl Driver {
    /// Deferred unmaps not yet invalidated, over all domains.
    pub fn pending_deferred(&self) -> usize {
        self.deferred
            .all()
            .into_iter()
            .filter_map(|did| self.domain(did).ok())
            .map(|d| d.state.lock().pending.len())
            .sum()
    }

    /// Flushes every domain whose oldest deferred unmap is older than its `max_delay`
    /// (Linux `fq_flush_timeout`), by the unit's clock. No other driver call does this: the
    /// owner calls it from a timer, so that flushes come due even when the driver is idle.
    /// Returns the first error after trying every due domain.
    pub fn poll_deferred(&self) -> Result<(), DriverError> {
        let now = self.clock.now();
        if !self.deferred.maybe_due(now) {
            return Ok(());
        }
        self.flush_domains(self.deferred.due(now))
    }

    /// Whether some domain's deferred flush is due: a cheap check (one atomic load when
    /// nothing is pending) for a timer to run [`Driver::poll_deferred`] only when needed.
    pub fn deferred_due(&self) -> bool {
        self.deferred.any_pending() && self.deferred.maybe_due(self.clock.now())
    }

    /// Flushes every deferred unmap of every domain now.
    pub fn flush_deferred(&self) -> Result<(), DriverError> {
        self.flush_domains(self.deferred.all())
    }

    /// Flushes each of `dids`; returns the first error after trying them all.
    ///
    /// Every domain's invalidations are handed to the units before the driver waits for
    /// any (the domains locked in ascending id order, the one order every flusher uses), so
    /// a device that stalls one unit delays the return, never another unit's queue or the
    /// other domains' invalidations (Linux flushes each domain's queue from its own timer).
    fn flush_domains(&self, mut dids: Vec<DomainId>) -> Result<(), DriverError> {
        dids.sort_unstable();
        dids.dedup();
        let domains: Vec<_> = dids
            .into_iter()
            .filter_map(|did| match self.domain(did) {
                Ok(domain) => Some((did, domain)),
                Err(_) => {
                    self.deferred.forget(did); // destroyed meanwhile (destroy flushed it)
                    None
                }
            })
            .collect();
        let mut states: Vec<_> = domains.iter().map(|(did, d)| (*did, d, d.state.lock())).collect();
        let started: Vec<_> = states
            .iter()
            .map(|(did, _, state)| {
                let did = *did;
                (!state.pending.is_empty()).then(|| self.start_span(state, |_| IotlbScope::Domain(did)))
            })
            .collect();
        let mut first = Ok(());
        for ((did, domain, state), started) in states.iter_mut().zip(started) {
            let r = match started {
                None => {
                    self.deferred.forget(*did);
                    Ok(())
                }
                Some(started) => {
                    let result = started.and_then(super::driven::Started::finish);
                    self.flushed(*did, state, result)
                }
            };
            domain.settle(state);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Flushes a domain's deferred unmaps (Linux `fq_flush_iotlb`): on every unit the domain
    /// spans, one domain-selective IOTLB invalidation and a device-TLB invalidate-all per
    /// ATS device behind it, the units' waits overlapped; then frees the tables they
    /// retired. A unit the domain left since the unmaps needs nothing: the detach that took
    /// its last device invalidated the domain there.
    pub(crate) fn flush_pending(&self, did: DomainId, state: &mut DomainState) -> Result<(), DriverError> {
        if state.pending.is_empty() {
            self.deferred.forget(did);
            return Ok(());
        }
        let result = self.invalidate_span(state, |_| IotlbScope::Domain(did));
        self.flushed(did, state, result)
    }

    /// After a domain's flush: on success or a device time-out (the IOTLB part was done) the
    /// queue is emptied and its retired tables freed, and the time-out reported; on other
    /// errors it is kept for a retry.
    fn flushed(
        &self,
        did: DomainId,
        state: &mut DomainState,
        result: Result<(), DriverError>,
    ) -> Result<(), DriverError> {
        if matches!(result, Ok(()) | Err(DriverError::DeviceTlbTimeout { .. })) {
            let n = state.pending.len();
            self.frames.free_all(state.pending.take());
            self.deferred.forget(did);
            debug!(domain = did.0, unmaps = n, "deferred invalidation flushed");
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn pending_ranges_overlap_and_drain() {
        let now = Instant::now();
        let mut p = PendingFlush::default();
        assert!(p.is_empty() && !p.overlaps(0, u64::MAX));
        p.push((0x1000, 0x2000), vec![Hpa(0x5000)], now + Duration::from_millis(10));
        p.push((0x8000, 0xa000), vec![], now + Duration::from_millis(5));
        assert_eq!(p.len(), 2);
        assert_eq!(p.deadline(), Some(now + Duration::from_millis(5)));
        assert!(p.overlaps(0x1fff, 0x3000));
        assert!(p.overlaps(0x9000, 0x9001));
        assert!(!p.overlaps(0x2000, 0x8000), "between two ranges, inside the envelope");
        assert!(!p.overlaps(0, 0x1000));
        assert_eq!(p.take(), vec![Hpa(0x5000)]);
        assert!(p.is_empty() && p.deadline().is_none() && !p.overlaps(0, u64::MAX));
    }

    #[test]
    fn domains_come_due_in_deadline_order() {
        let d = DeferredDomains::new(Instant::now());
        let now = Instant::now();
        assert!(!d.any_pending() && !d.maybe_due(now + Duration::from_secs(3600)));
        d.note(DomainId(1), now + Duration::from_millis(50));
        d.note(DomainId(2), now + Duration::from_millis(10));
        assert!(d.any_pending());
        assert!(!d.maybe_due(now));
        assert!(d.maybe_due(now + Duration::from_millis(10)));
        assert_eq!(d.due(now + Duration::from_millis(20)), vec![DomainId(2)]);
        d.forget(DomainId(2));
        assert!(!d.maybe_due(now + Duration::from_millis(20)), "the earliest deadline moved on");
        assert!(d.maybe_due(now + Duration::from_millis(50)));
        assert_eq!(d.all(), vec![DomainId(1)]);
        d.forget(DomainId(1));
        assert!(!d.any_pending());
    }
}
