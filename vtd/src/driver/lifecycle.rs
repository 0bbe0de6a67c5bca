//! Domain lifecycle (Linux `intel_iommu_domain_alloc` / `intel_iommu_domain_free`):
//! creating a domain with its id and top-level table, and destroying it once no device is
//! attached, with the flush that must come before its tables and id are reused.
//!
//! Not here: attaching devices (`attach`), mapping (`mapping`), and the domain's state and
//! id allocator themselves (`domain`).

use std::sync::Arc;

use tracing::debug;

use super::Driver;
use super::config::DomainKind;
use super::domain::Domain;
use super::driven::invalidate_all;
use super::error::DriverError;
use super::invalidate::{Invalidation, IotlbScope};
use super::pagetable::PageTable;
use crate::ids::DomainId;
use crate::unit::tables::AddressWidth;

impl Driver {
    /// Creates a domain and returns its id (the lowest free id in 1..=0xffff).
    pub fn create_domain(&self, kind: DomainKind, aw: AddressWidth) -> Result<DomainId, DriverError> {
        // A domain may be attached through any driven unit: it needs what all of them offer.
        if !self.common.supports(aw) {
            return Err(DriverError::UnsupportedWidth(aw));
        }
        if kind == DomainKind::Identity && !self.common.pass_through {
            return Err(DriverError::PassThroughUnsupported);
        }
        let tables = match kind {
            DomainKind::Paging => Some(PageTable::new(&self.frames, aw)?),
            DomainKind::Blocked | DomainKind::Identity => None,
        };
        let mut domains = self.domains.write();
        let Some(did) = domains.ids.alloc() else {
            drop(domains);
            if let Some(t) = tables {
                self.frames.free(t.top());
            }
            return Err(DriverError::DomainIdsExhausted);
        };
        domains.map.insert(did, Arc::new(Domain::new(kind, aw, tables)));
        debug!(domain = did.0, ?kind, ?aw, "domain created");
        Ok(did)
    }

    /// Destroys a domain with no devices attached on any unit, freeing all its table
    /// frames (its deferred unmaps included: the domain-selective flush covers them).
    pub fn destroy_domain(&self, did: DomainId) -> Result<(), DriverError> {
        let domain = self.domain(did)?;
        let mut state = domain.state.lock();
        if !state.alive {
            return Err(DriverError::UnknownDomain(did));
        }
        // The span counts every device of every unit from before its entry is written
        // until after its detach's invalidations, and attach joins it under this lock: no
        // unit can gain an attachment once this check passed.
        let devices = state.devices();
        if devices != 0 {
            return Err(DriverError::DomainInUse { did, devices });
        }
        state.alive = false;
        self.domains.write().map.remove(&did);
        let mut retired = state.pending.take();
        self.deferred.forget(did);
        let mut result = Ok(());
        if let Some(t) = state.tables.take() {
            t.collect_frames(&self.memory, &mut retired);
            // Detach already flushed this domain on each unit; flush once more on every
            // unit it was ever attached through, before its tables and its id are reused,
            // in case a walk raced with the last detach. No device is attached, so no
            // device TLB can hold its translations (detach flushed them).
            let batch = vec![Invalidation::Iotlb(IotlbScope::Domain(did))];
            let units: Vec<_> =
                state.visited.iter().filter_map(|id| self.driven(*id).ok()).map(|u| (u, batch.clone())).collect();
            result = invalidate_all(units);
        }
        drop(state);
        // A failed flush leaks the frames and the id rather than reuse what a unit may
        // still cache.
        result?;
        self.frames.free_all(retired);
        self.domains.write().ids.release(did);
        debug!(domain = did.0, "domain destroyed");
        Ok(())
    }

    /// The kind and address width of a domain.
    pub fn domain_info(&self, did: DomainId) -> Option<(DomainKind, AddressWidth)> {
        self.domain(did).ok().map(|d| (d.kind, d.aw))
    }

    /// Ids of every live domain, ascending.
    pub fn domains(&self) -> Vec<DomainId> {
        let mut ids: Vec<DomainId> = self.domains.read().map.keys().copied().collect();
        ids.sort_unstable();
        ids
    }
}
