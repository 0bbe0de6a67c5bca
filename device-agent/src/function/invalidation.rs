//! Invalidation requests, in the state machine: drop at once, complete after the drain.
//!
//! PCIe 10.3.1 (Invalidate Request) and 10.3.2 (Invalidate Completion): a function
//! completes an invalidation only after it has dropped the covered entries *and* every
//! request that used one of them has completed. The machine drops entries at once (the
//! S-bit range widened to the smallest translation unit, `atc::InvalidationRange`) and
//! marks outstanding translation requests for covered pages stale; what remains is the
//! drain. Each pending ITag (0..=31, at most the invalidate queue depth at once) counts the
//! DMAs it waits for, and each DMA carries a 32-bit mask of the ITags waiting on it, so a
//! completion costs a few bit operations and no search. Only DMAs whose range meets the
//! invalidated range are waited for: unrelated traffic never delays an invalidation.
//! Nothing waits here: the machine keeps serving every other input meanwhile.

use std::time::Instant;

use dmar_vtd::ats::MAX_QUEUE_DEPTH;

use super::machine::{Effect, Machine, TagUse};
use super::messages::InvalidationRequest;
use crate::atc::InvalidationRange;

/// Number of ITags: one per invalidation a function may have outstanding.
const ITAGS: usize = MAX_QUEUE_DEPTH as usize;

#[derive(Debug, Clone, Copy)]
struct Pending {
    /// When the (first) request arrived.
    received: Instant,
    /// DMAs still in flight through a covered translation.
    waiting: u32,
    /// Requests received for this ITag (more than one only if the server reused an
    /// outstanding ITag; each gets its completion).
    requests: u32,
}

/// The pending ITags of one function.
#[derive(Debug, Default)]
pub(super) struct Invalidations {
    slots: [Option<Pending>; ITAGS],
}

impl Invalidations {
    /// Records a request for `itag` that waits for `waiting` more DMAs; true when it can
    /// complete now.
    fn arrive(&mut self, itag: usize, waiting: u32, now: Instant) -> bool {
        let p = self.slots[itag].get_or_insert(Pending { received: now, waiting: 0, requests: 0 });
        p.requests += 1;
        p.waiting += waiting;
        p.waiting == 0
    }

    /// One DMA that `itag` waited for has completed; true when `itag` can complete now.
    fn release(&mut self, itag: usize) -> bool {
        match &mut self.slots[itag] {
            Some(p) => {
                p.waiting = p.waiting.saturating_sub(1);
                p.waiting == 0
            }
            None => false,
        }
    }

    /// Takes a completed ITag out.
    fn take(&mut self, itag: usize) -> Option<Pending> {
        self.slots[itag].take()
    }

    /// ITags pending.
    pub(super) fn len(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// Forgets everything (the link went down: the server completes them itself).
    pub(super) fn clear(&mut self) {
        self.slots = [None; ITAGS];
    }
}

/// The ITags set in `mask`.
fn itags(mut mask: u32) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        Some(i)
    })
}

impl<T> Machine<T> {
    pub(super) fn on_invalidation(&mut self, req: InvalidationRequest) {
        let range = InvalidationRange::decode(req.address, self.cfg.smallest_translation_unit);
        self.counters.invalidated_entries += self.atc.invalidate(range) as u64;
        for (key, miss) in &mut self.misses {
            if range.overlaps(key.page << 12, 4096) {
                miss.stale = true;
            }
        }
        for tag in self.tags.values_mut() {
            if let TagUse::Direct(d) = tag
                && range.overlaps(d.page << 12, 4096)
            {
                d.stale = true;
            }
        }
        let itag = req.itag as usize;
        if itag >= ITAGS {
            tracing::warn!(itag, "invalidation with an ITag above 31; completed without draining");
            return self.send_completions(req.itag, 1, self.now);
        }
        let bit = 1u32 << itag;
        let mut waiting = 0;
        for (_, op) in self.ops.iter_mut() {
            if op.uses_translation() && op.blocks & bit == 0 && range.overlaps(op.iova, u64::from(op.len)) {
                op.blocks |= bit;
                waiting += 1;
            }
        }
        if self.invalidations.arrive(itag, waiting, self.now) {
            self.complete_invalidation(itag);
        }
    }

    /// A DMA that the ITags in `blocks` waited for has completed (or was abandoned).
    pub(super) fn release_invalidations(&mut self, blocks: u32) {
        for itag in itags(blocks) {
            if self.invalidations.release(itag) {
                self.complete_invalidation(itag);
            }
        }
    }

    fn complete_invalidation(&mut self, itag: usize) {
        if let Some(p) = self.invalidations.take(itag) {
            self.send_completions(itag as u32, p.requests, p.received);
        }
    }

    fn send_completions(&mut self, itag: u32, requests: u32, received: Instant) {
        for _ in 0..requests {
            self.effects.push_back(Effect::Complete { itag });
        }
        self.counters.invalidations_handled += u64::from(requests);
        self.effects.push_back(Effect::Invalidated { after: self.now.saturating_duration_since(received) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_itag_completes_when_its_last_dma_does() {
        let now = Instant::now();
        let mut inv = Invalidations::default();
        assert!(inv.arrive(3, 0, now), "nothing in flight: complete at once");
        assert_eq!(inv.take(3).map(|p| p.requests), Some(1));
        assert!(!inv.arrive(5, 2, now));
        assert_eq!(inv.len(), 1);
        assert!(!inv.release(5));
        assert!(inv.release(5));
        assert!(inv.take(5).is_some());
        assert!(!inv.release(5), "a released ITag is gone");
        assert!(!inv.arrive(7, 1, now));
        assert!(!inv.arrive(7, 0, now), "a reused ITag still waits for the first one's DMA");
        assert!(inv.release(7));
        assert_eq!(inv.take(7).map(|p| p.requests), Some(2));
        assert_eq!(itags(0b1010_0001).collect::<Vec<_>>(), [0, 5, 7]);
        inv.arrive(1, 1, now);
        inv.clear();
        assert_eq!(inv.len(), 0);
    }
}
