//! Map and unmap (Linux `intel_iommu_map_pages`, `intel_iommu_unmap_pages` with
//! `intel_iommu_tlb_sync`): argument checks, writing and clearing a domain's second-stage
//! page tables, and the invalidation an unmap needs under its flush policy.
//!
//! Rules:
//! - A map is all or nothing (a refusal, a frame limit included, writes nothing; a
//!   failure part way is rolled back), needs no invalidation (CAP.CM = 0: not-present entries are
//!   never cached, VT-d 6.1), except over a range a deferred unmap left stale: the domain's
//!   deferred unmaps are flushed first.
//! - A strict unmap invalidates, on every unit the domain spans, the IOTLB
//!   page-selectively (domain-selectively above that unit's CAP.MAMV) with IH only when no
//!   table was freed (VT-d 6.5.1.2), and the device TLB of every ATS device of the domain
//!   behind that unit over the same block, in one batch with one wait per unit, every unit
//!   started before any wait; table frames it retired are freed only after all of that.
//! - A deferred unmap clears the entries and queues the range (`deferred`).
//!
//! Not here: the page-table format and walk (`pagetable`), the flush queue (`deferred`).

use std::time::Duration;

use super::Driver;
use super::config::{DomainKind, FlushPolicy, Perm};
use super::domain::DomainState;
use super::error::{AddressField, DriverError};
use super::invalidate::{IotlbScope, page_scope};
use crate::ids::{DomainId, Hpa, Iova, PAGE_SIZE};
use crate::unit::tables::AddressWidth;

/// The addresses and permissions of one map request.
#[derive(Clone, Copy, Debug)]
struct MapArgs {
    iova: Iova,
    hpa: Hpa,
    len: u64,
    perm: Perm,
}

/// Checks a map/unmap range: non-empty, page aligned, no 64-bit overflow. Returns its end.
fn check_range(iova: Iova, len: u64) -> Result<u64, DriverError> {
    if len == 0 {
        return Err(DriverError::ZeroLength);
    }
    if !iova.is_page_aligned() {
        return Err(DriverError::Unaligned { field: AddressField::Iova, value: iova.0 });
    }
    if !len.is_multiple_of(PAGE_SIZE) {
        return Err(DriverError::Unaligned { field: AddressField::Len, value: len });
    }
    iova.0.checked_add(len).ok_or(DriverError::Overflow)
}

/// Checks that `[iova, end)` fits the domain's width (VT-d 3.6: the AGAW).
fn check_width(aw: AddressWidth, iova: Iova, end: u64) -> Result<(), DriverError> {
    let limit = 1u64 << aw.bits();
    if end > limit {
        return Err(DriverError::BeyondWidth { iova: Iova(iova.0.max(limit)), width_bits: aw.bits() });
    }
    Ok(())
}

impl Driver {
    /// Maps `[iova, iova + len)` to `[hpa, hpa + len)`, all or nothing: if any page of the
    /// range is already mapped nothing is written and [`DriverError::Overlap`] names it.
    ///
    /// Uses 1 GiB and 2 MiB leaves wherever iova, hpa and the rest of the range are aligned
    /// and the unit supports them (CAP.SSLPS). Needs no invalidation: with CM=0 the unit
    /// never caches not-present entries (VT-d 6.1). The exception is a range that overlaps
    /// a deferred unmap: its stale IOTLB and paging-structure entries could shadow the new
    /// mapping, so the domain's deferred unmaps are flushed first (if that fails, nothing
    /// is mapped).
    pub fn map(&self, did: DomainId, iova: Iova, hpa: Hpa, len: u64, perm: Perm) -> Result<(), DriverError> {
        self.map_inner(did, MapArgs { iova, hpa, len, perm }, None).map(|_| ())
    }

    /// [`Driver::map`] allocating at most `frame_limit` new page-table frames: an owner
    /// that charges a domain's frames to a tenant (a quota) passes what the tenant has
    /// left. A map that would need more is refused with [`DriverError::FrameLimit`] before
    /// anything is written or flushed, so a refused call leaves no partial mapping and no
    /// tables behind. Returns the frames the domain gained (at most `frame_limit`).
    pub fn map_within(
        &self,
        did: DomainId,
        iova: Iova,
        hpa: Hpa,
        len: u64,
        perm: Perm,
        frame_limit: usize,
    ) -> Result<usize, DriverError> {
        self.map_inner(did, MapArgs { iova, hpa, len, perm }, Some(frame_limit))
    }

    /// Page-table frames domain `did` holds (see `domain`): its tables, the top-level one
    /// included, and the tables its deferred unmaps retired and have not freed yet. They
    /// go up on a map that needs new tables, down on an unmap that empties tables (once
    /// they are freed: at once under the strict policy, at the flush under the deferred
    /// one), and to nothing when the domain is destroyed. Non-paging domains hold none.
    /// Read without waiting for the domain's lock.
    pub fn domain_frames(&self, did: DomainId) -> Result<usize, DriverError> {
        Ok(self.domain(did)?.frames())
    }

    fn map_inner(&self, did: DomainId, args: MapArgs, frame_limit: Option<usize>) -> Result<usize, DriverError> {
        let MapArgs { iova, hpa, len, perm } = args;
        let end = check_range(iova, len)?;
        if !hpa.is_page_aligned() {
            return Err(DriverError::Unaligned { field: AddressField::Hpa, value: hpa.0 });
        }
        if !perm.read && !perm.write {
            return Err(DriverError::NoAccess);
        }
        let size = self.memory.size();
        if hpa.0.checked_add(len).is_none_or(|e| e > size) {
            return Err(DriverError::HpaOutOfRange { hpa, len, size });
        }
        if self.frames.contains(hpa, len) {
            return Err(DriverError::HpaInTableRegion { hpa, len });
        }
        let domain = self.domain(did)?;
        if domain.kind != DomainKind::Paging {
            return Err(DriverError::NotPaging(did));
        }
        check_width(domain.aw, iova, end)?;

        let mut guard = domain.state.lock();
        let state = &mut *guard;
        if !state.alive {
            return Err(DriverError::UnknownDomain(did));
        }
        let tables = state.tables.as_ref().ok_or(DriverError::NotPaging(did))?;
        if let Some(found) = tables.first_mapped(&self.memory, iova.0, end)? {
            return Err(DriverError::Overlap { iova: Iova(found) });
        }
        if let Some(limit) = frame_limit {
            let needed = tables.frames_needed(&self.memory, iova.0, hpa.0, len, self.common.max_leaf_level)?;
            if needed > limit {
                return Err(DriverError::FrameLimit { needed, limit });
            }
        }
        let before = tables.frames();
        let result = self.map_locked(did, state, iova.0, hpa.0, end, perm);
        domain.settle(state);
        result?;
        Ok(state.tables.as_ref().map_or(0, |t| t.frames().saturating_sub(before)))
    }

    /// Flushes the deferred unmaps the range overlaps and writes the range; rolls a
    /// failed write back.
    fn map_locked(
        &self,
        did: DomainId,
        state: &mut DomainState,
        iova: u64,
        hpa: u64,
        end: u64,
        perm: Perm,
    ) -> Result<(), DriverError> {
        if state.pending.overlaps(iova, end) {
            self.flush_pending(did, state)?;
        }
        let tables = state.tables.as_mut().ok_or(DriverError::NotPaging(did))?;
        let mapped = tables.map(&self.memory, &self.frames, iova, hpa, end - iova, perm, self.common.max_leaf_level);
        if let Err(e) = mapped {
            // All or nothing: take back what was written (the range was empty before).
            // Devices may already have used the partial mapping, so this is a full unmap
            // with its flush.
            self.unmap_locked(did, state, iova, end, FlushPolicy::Strict)?;
            return Err(e);
        }
        Ok(())
    }

    /// Unmaps every mapping inside `[iova, iova + len)` with the driver's flush policy and
    /// returns the bytes unmapped (holes are skipped). See [`Driver::unmap_with`].
    pub fn unmap(&self, did: DomainId, iova: Iova, len: u64) -> Result<u64, DriverError> {
        self.unmap_with(did, iova, len, self.flush)
    }

    /// Unmaps every mapping inside `[iova, iova + len)` and returns the bytes unmapped
    /// (holes are skipped). A superpage only partly inside the range is refused with
    /// [`DriverError::PartialSuperpage`] and nothing changes.
    ///
    /// Page-table pages that become empty are unlinked. `Strict`: the IOTLB is invalidated
    /// page-selectively (domain-selectively above CAP.MAMV) together with the device TLBs
    /// of the domain's ATS devices, and only then are the pages freed (Linux
    /// `intel_iommu_unmap` + `intel_iommu_tlb_sync`). `Deferred`: the range and the pages
    /// are queued for the domain's next flush (Linux `queue_iova`).
    ///
    /// [`DriverError::DeviceTlbTimeout`] means the range is unmapped and the IOTLB
    /// invalidated, but the named device may still cache it.
    pub fn unmap_with(&self, did: DomainId, iova: Iova, len: u64, policy: FlushPolicy) -> Result<u64, DriverError> {
        let end = check_range(iova, len)?;
        let domain = self.domain(did)?;
        if domain.kind != DomainKind::Paging {
            return Err(DriverError::NotPaging(did));
        }
        check_width(domain.aw, iova, end)?;
        let mut state = domain.state.lock();
        if !state.alive {
            return Err(DriverError::UnknownDomain(did));
        }
        let tables = state.tables.as_ref().ok_or(DriverError::NotPaging(did))?;
        tables.check_unmap(&self.memory, iova.0, end)?;
        let result = self.unmap_locked(did, &mut state, iova.0, end, policy);
        domain.settle(&state);
        result
    }

    /// Clears `[start, end)`, invalidates or queues per `policy`, frees the retired tables
    /// once nothing can reach them.
    fn unmap_locked(
        &self,
        did: DomainId,
        state: &mut DomainState,
        start: u64,
        end: u64,
        policy: FlushPolicy,
    ) -> Result<u64, DriverError> {
        let tables = state.tables.as_mut().ok_or(DriverError::NotPaging(did))?;
        let mut retired = Vec::new();
        let out = tables.unmap(&self.memory, start, end, &mut retired)?;
        let (Some((first, last)), Some(stale)) = (out.span, out.stale_span()) else {
            self.frames.free_all(retired);
            return Ok(out.bytes);
        };
        match policy {
            FlushPolicy::Strict => {
                // VT-d 6.5.1.2: IH=1 only when no paging-structure entry changed.
                // Each spanned unit gets the scope its own CAP.PSI and CAP.MAMV allow.
                let ih = out.tables_freed == 0;
                let result = self.invalidate_span(state, |caps| {
                    if caps.page_selective {
                        page_scope(did, first, last, ih, caps.mamv)
                    } else {
                        IotlbScope::Domain(did)
                    }
                });
                // A device time-out: the IOTLB and paging-structure caches were invalidated
                // all the same, and device TLBs never hold tables. Other failures leak the
                // retired frames rather than reuse them while the unit may still cache them.
                if matches!(result, Ok(()) | Err(DriverError::DeviceTlbTimeout { .. })) {
                    self.frames.free_all(retired);
                }
                result.map(|()| out.bytes)
            }
            FlushPolicy::Deferred { max_entries, max_delay } => {
                let now = self.clock.now();
                let deadline = now.checked_add(max_delay).unwrap_or(now + Duration::from_secs(3600));
                state.pending.push(stale, retired, deadline);
                if let Some(due) = state.pending.deadline() {
                    self.deferred.note(did, due);
                }
                if state.pending.len() >= max_entries.max(1) || state.pending.deadline().is_some_and(|d| d <= now) {
                    self.flush_pending(did, state)?;
                }
                Ok(out.bytes)
            }
        }
    }

    /// Software walk of a domain's tables: the host address `iova` maps to, the
    /// permissions and the size of the page that maps it. Identity domains map every
    /// address to itself; blocked domains map nothing.
    pub fn lookup(&self, did: DomainId, iova: Iova) -> Option<(Hpa, Perm, u64)> {
        let domain = self.domain(did).ok()?;
        if !domain.aw.covers(iova) {
            return None;
        }
        match domain.kind {
            DomainKind::Blocked => None,
            DomainKind::Identity => Some((Hpa(iova.0), Perm::RW, PAGE_SIZE)),
            DomainKind::Paging => {
                let state = domain.state.lock();
                state.tables.as_ref()?.lookup(&self.memory, iova.0)
            }
        }
    }
}
