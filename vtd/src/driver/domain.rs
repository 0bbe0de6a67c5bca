//! Protection domains as the driver sees them (VT-d 3.4.3; Linux `struct dmar_domain`):
//! their kind, address width and page tables, and the allocation of domain ids.
//!
//! This module owns the per-domain lock that serializes changes to one domain's tables
//! (map and unmap on different domains never wait for each other) and the id space
//! 1..=0xffff (0 is reserved, VT-d CAP.ND=6 gives 16-bit ids). Which devices use a domain
//! is recorded with the context tables; the domain keeps only the set of its ATS devices
//! (whose device TLBs every unmap must invalidate, Linux `domain->devices` walked by
//! `iommu_flush_dev_iotlb`) and its deferred unmaps, both under the domain's lock so that
//! an attach cannot slip between an unmap and its invalidation.
//!
//! It also owns the count of table frames each domain holds ([`Domain::frames`]): the
//! tables linked into its tree, the top-level one included, plus the tables its deferred
//! unmaps retired and have not freed yet. The count is published after every change under
//! the domain's lock and read without it, so an owner charging frames to a tenant (a quota)
//! never waits behind a domain's invalidation.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use super::DomainKind;
use super::deferred::PendingFlush;
use super::pagetable::PageTable;
use crate::ids::{DomainId, Hpa, SourceId};
use crate::unit::tables::AddressWidth;

/// The mutable part of a domain, behind its lock.
#[derive(Debug)]
pub(crate) struct DomainState {
    /// False once the domain is destroyed: a caller that looked the domain up just
    /// before must not touch freed tables.
    pub(crate) alive: bool,
    /// The page tables of a paging domain.
    pub(crate) tables: Option<PageTable>,
    /// Attached devices with ATS on (context TT=01b): their device TLBs are invalidated
    /// after the IOTLB on every unmap (VT-d 6.5.2.5).
    pub(crate) ats_devices: BTreeSet<SourceId>,
    /// Unmaps whose invalidation is deferred (`FlushPolicy::Deferred`).
    pub(crate) pending: PendingFlush,
}

impl DomainState {
    /// Table frames the domain holds now: its tree and the retired tables waiting for a
    /// deferred flush.
    pub(crate) fn frames(&self) -> usize {
        self.tables.as_ref().map_or(0, PageTable::frames) + self.pending.frames()
    }
}

/// One protection domain.
#[derive(Debug)]
pub(crate) struct Domain {
    pub(crate) kind: DomainKind,
    pub(crate) aw: AddressWidth,
    /// The top-level table (paging domains), fixed for the domain's life: context entries
    /// point at it.
    pub(crate) top: Option<Hpa>,
    pub(crate) state: Mutex<DomainState>,
    /// [`DomainState::frames`] as of the last change, readable without the lock.
    frames: AtomicUsize,
}

impl Domain {
    pub(crate) fn new(kind: DomainKind, aw: AddressWidth, tables: Option<PageTable>) -> Self {
        let frames = AtomicUsize::new(tables.as_ref().map_or(0, PageTable::frames));
        Self {
            kind,
            aw,
            top: tables.as_ref().map(PageTable::top),
            frames,
            state: Mutex::new(DomainState {
                alive: true,
                tables,
                ats_devices: BTreeSet::new(),
                pending: PendingFlush::default(),
            }),
        }
    }

    /// Publishes the frame count of `state` (this domain's, under its lock) after a change.
    pub(crate) fn settle(&self, state: &DomainState) {
        self.frames.store(state.frames(), Ordering::Release);
    }

    /// The table frames the domain held after its last change (see the module doc).
    pub(crate) fn frames(&self) -> usize {
        self.frames.load(Ordering::Acquire)
    }
}

/// Domain ids in use: the lowest free id is handed out first, so freed ids are reused
/// (Linux allocates them from an IDA the same way).
#[derive(Debug)]
pub(crate) struct DomainIds {
    /// Lowest id never handed out.
    next: u32,
    /// Ids below `next` that were released.
    free: BTreeSet<u16>,
}

impl Default for DomainIds {
    fn default() -> Self {
        Self {
            next: 1, // 0 reserved
            free: BTreeSet::new(),
        }
    }
}

impl DomainIds {
    pub(crate) fn alloc(&mut self) -> Option<DomainId> {
        if let Some(id) = self.free.pop_first() {
            return Some(DomainId(id));
        }
        let id = u16::try_from(self.next).ok()?;
        self.next += 1;
        Some(DomainId(id))
    }

    pub(crate) fn release(&mut self, id: DomainId) {
        if id.0 != 0 && u32::from(id.0) < self.next {
            self.free.insert(id.0);
        }
    }
}

/// Every live domain by id, with the id allocator.
#[derive(Debug, Default)]
pub(crate) struct Domains {
    pub(crate) map: HashMap<DomainId, Arc<Domain>>,
    pub(crate) ids: DomainIds,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_at_one_reuse_the_lowest_and_run_out() {
        let mut ids = DomainIds::default();
        assert_eq!(ids.alloc(), Some(DomainId(1)));
        assert_eq!(ids.alloc(), Some(DomainId(2)));
        assert_eq!(ids.alloc(), Some(DomainId(3)));
        ids.release(DomainId(2));
        ids.release(DomainId(1));
        ids.release(DomainId(0)); // never handed out: ignored
        ids.release(DomainId(900)); // never handed out: ignored
        assert_eq!(ids.alloc(), Some(DomainId(1)));
        assert_eq!(ids.alloc(), Some(DomainId(2)));
        assert_eq!(ids.alloc(), Some(DomainId(4)));
        let mut n = 4;
        while let Some(id) = ids.alloc() {
            n += 1;
            assert_eq!(id, DomainId(n));
        }
        assert_eq!(n, 0xffff);
        ids.release(DomainId(0x1234));
        assert_eq!(ids.alloc(), Some(DomainId(0x1234)));
        assert_eq!(ids.alloc(), None);
    }
}
