//! Deferred invalidation: the bookkeeping of unmaps whose IOTLB and device-TLB
//! invalidation has not happened yet, after the Linux DMA flush queue (`dma-iommu.c`
//! `fq_ring_add` / `fq_flush_iotlb` / `fq_flush_timeout`; 256 entries, 10 ms).
//!
//! This module owns two things: each domain's list of pending ranges with the table frames
//! those unmaps retired ([`PendingFlush`], kept in the domain's state under its lock), and
//! the driver-wide index of which domains have a flush due and when ([`DeferredDomains`]),
//! so that every driver call can check "is any flush overdue?" with one atomic load.
//!
//! It does not invalidate and does not decide policy: the driver flushes a domain (one
//! domain-selective IOTLB invalidation, a device-TLB invalidate-all per ATS device and one
//! wait) when its list reaches `max_entries`, when its deadline passes, before a map that
//! overlaps a pending range, and on request; only then are the retired frames freed, since
//! the paging-structure caches may still point at them (VT-d 6.5.1.2).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

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
    /// Origin of the nanosecond clock in `earliest`.
    base: Instant,
    /// The earliest deadline of any domain, in nanoseconds since `base`; [`NONE`] when no
    /// domain has anything pending. Read without the lock on every driver call.
    earliest: AtomicU64,
    due: Mutex<HashMap<DomainId, Instant>>,
}

impl Default for DeferredDomains {
    fn default() -> Self {
        Self { base: Instant::now(), earliest: AtomicU64::new(NONE), due: Mutex::new(HashMap::new()) }
    }
}

impl DeferredDomains {
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

    /// Cheap check: might some domain's flush be due at `now`? No lock, no clock read
    /// when nothing is pending.
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
        let d = DeferredDomains::default();
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
