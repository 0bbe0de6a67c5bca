//! Protection domains as the driver sees them (VT-d 3.4.3; Linux `struct dmar_domain`):
//! their kind, address width and page tables, and the allocation of domain ids.
//!
//! This module owns the per-domain lock that serializes changes to one domain's tables
//! (map and unmap on different domains never wait for each other) and the id space
//! 1..=0xffff (0 is reserved, VT-d CAP.ND=6 gives 16-bit ids). The id space is global: a
//! domain uses the same id on every unit it spans (ids are per unit in VT-d, so one id
//! per domain is always free on every unit). Which device uses which domain is recorded
//! with each unit's context tables; the domain keeps its span ([`DomainState::span`]: per
//! unit, how many of its devices are attached there and which of them use ATS, Linux
//! `domain->iommu_array` and `domain->devices` walked by `iommu_flush_dev_iotlb`) and its
//! deferred unmaps, both under the domain's lock, so that an attach cannot slip between an
//! unmap and its invalidation and a destroy cannot slip past an attach.
//!
//! It also owns the count of table frames each domain holds ([`Domain::frames`]): the
//! tables linked into its tree, the top-level one included, plus the tables its deferred
//! unmaps retired and have not freed yet. The count is published after every change under
//! the domain's lock and read without it, so an owner charging frames to a tenant (a quota)
//! never waits behind a domain's invalidation.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use super::DomainKind;
use super::deferred::PendingFlush;
use super::error::DriverError;
use super::pagetable::PageTable;
use crate::ids::{DomainId, Hpa, SourceId, UnitId};
use crate::unit::tables::AddressWidth;

/// The mutable part of a domain, behind its lock.
#[derive(Debug)]
pub(crate) struct DomainState {
    /// False once the domain is destroyed: a caller that looked the domain up just
    /// before must not touch freed tables.
    pub(crate) alive: bool,
    /// The page tables of a paging domain.
    pub(crate) tables: Option<PageTable>,
    /// The units the domain spans: those with at least one of its devices attached (or
    /// being attached or detached). Every domain-wide invalidation goes to each of them.
    pub(crate) span: BTreeMap<UnitId, UnitSpan>,
    /// Every unit the domain was ever attached through: destroy flushes them all once
    /// more before the id and tables are reused.
    pub(crate) visited: BTreeSet<UnitId>,
    /// Unmaps whose invalidation is deferred (`FlushPolicy::Deferred`).
    pub(crate) pending: PendingFlush,
}

/// What a domain has on one unit.
#[derive(Debug, Default)]
pub(crate) struct UnitSpan {
    /// Devices behind the unit attached to the domain, counted from before their context
    /// entry is written until after the invalidation that follows clearing it.
    pub(crate) devices: usize,
    /// Those with ATS on (context TT=01b): their device TLBs are invalidated, through this
    /// unit, after its IOTLB on every unmap (VT-d 6.5.2.5).
    pub(crate) ats_devices: BTreeSet<SourceId>,
}

impl DomainState {
    /// Counts `sid` in on `unit` (with its device TLB if `ats`) before its context entry is
    /// written: from now on every invalidation of the domain reaches that unit. Refused
    /// once the domain is destroyed. Returns true when the unit comes back into the span
    /// after having left it: unmaps since then did not reach it.
    pub(crate) fn join(&mut self, did: DomainId, unit: UnitId, sid: SourceId, ats: bool) -> Result<bool, DriverError> {
        if !self.alive {
            return Err(DriverError::UnknownDomain(did));
        }
        let returning = !self.span.contains_key(&unit) && self.visited.contains(&unit);
        let span = self.span.entry(unit).or_default();
        span.devices += 1;
        if ats {
            span.ats_devices.insert(sid);
        }
        self.visited.insert(unit);
        Ok(returning)
    }

    /// Undoes [`Self::join`], once `sid`'s entry is cleared and invalidated on `unit`.
    pub(crate) fn leave(&mut self, unit: UnitId, sid: SourceId) {
        if let Some(span) = self.span.get_mut(&unit) {
            span.ats_devices.remove(&sid);
            span.devices = span.devices.saturating_sub(1);
            if span.devices == 0 {
                self.span.remove(&unit);
            }
        }
    }

    /// Devices attached to the domain on every unit.
    pub(crate) fn devices(&self) -> usize {
        self.span.values().map(|s| s.devices).sum()
    }

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
                span: BTreeMap::new(),
                visited: BTreeSet::new(),
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
