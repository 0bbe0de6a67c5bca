//! Invalidation requests a function has received but not yet completed.
//!
//! PCIe ATS 3.x: a function completes an invalidation only after it has dropped the
//! covered entries *and* every request that used one of them has completed. The function
//! drops entries at once; what remains is the drain. Each pending ITag (0..=31, at most
//! the invalidate queue depth at once) counts the DMAs it waits for, and each DMA carries
//! a 32-bit mask of the ITags waiting on it, so a completion costs a few bit operations
//! and no search. Only DMAs whose range meets the invalidated range are waited for:
//! unrelated traffic never delays an invalidation.

use std::time::Instant;

/// Number of ITags (PCIe: 5 bits).
pub(super) const ITAGS: usize = 32;

#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    /// When the (first) request arrived.
    pub(super) received: Instant,
    /// DMAs still in flight through a covered translation.
    waiting: u32,
    /// Requests received for this ITag (more than one only if the server reused an
    /// outstanding ITag; each gets its completion).
    pub(super) requests: u32,
}

/// The pending ITags of one function.
#[derive(Debug, Default)]
pub(super) struct Invalidations {
    slots: [Option<Pending>; ITAGS],
}

impl Invalidations {
    /// Records a request for `itag` that waits for `waiting` more DMAs; true when it can
    /// complete now.
    pub(super) fn arrive(&mut self, itag: usize, waiting: u32, now: Instant) -> bool {
        let p = self.slots[itag].get_or_insert(Pending { received: now, waiting: 0, requests: 0 });
        p.requests += 1;
        p.waiting += waiting;
        p.waiting == 0
    }

    /// One DMA that `itag` waited for has completed; true when `itag` can complete now.
    pub(super) fn release(&mut self, itag: usize) -> bool {
        match &mut self.slots[itag] {
            Some(p) => {
                p.waiting = p.waiting.saturating_sub(1);
                p.waiting == 0
            }
            None => false,
        }
    }

    /// Takes a completed ITag out.
    pub(super) fn take(&mut self, itag: usize) -> Option<Pending> {
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
pub(super) fn itags(mut mask: u32) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        Some(i)
    })
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
