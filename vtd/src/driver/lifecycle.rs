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
use super::error::DriverError;
use super::invalidate::{Invalidation, IotlbScope};
use super::pagetable::PageTable;
use crate::ids::DomainId;
use crate::unit::tables::AddressWidth;

impl Driver {
    /// Creates a domain and returns its id (the lowest free id in 1..=0xffff).
    pub fn create_domain(&self, kind: DomainKind, aw: AddressWidth) -> Result<DomainId, DriverError> {
        if !self.caps.supports(aw) {
            return Err(DriverError::UnsupportedWidth(aw));
        }
        if kind == DomainKind::Identity && !self.caps.pass_through {
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

    /// Destroys a domain with no devices attached, freeing all its table frames (its
    /// deferred unmaps included: the domain-selective flush covers them).
    pub fn destroy_domain(&self, did: DomainId) -> Result<(), DriverError> {
        let ctx = self.context.lock();
        let devices = ctx.attached(did).count();
        if devices != 0 {
            return Err(DriverError::DomainInUse { did, devices });
        }
        let domain = self.domains.write().map.remove(&did).ok_or(DriverError::UnknownDomain(did))?;
        let mut state = domain.state.lock();
        state.alive = false;
        let mut retired = state.pending.take();
        self.deferred.forget(did);
        if let Some(t) = state.tables.take() {
            t.collect_frames(&self.memory, &mut retired);
            // Detach already flushed this domain; flush once more before its tables
            // and its id are reused, in case a walk raced with the last detach. No device
            // is attached, so no device TLB can hold its translations (detach flushed them).
            self.invalidate(&[Invalidation::Iotlb(IotlbScope::Domain(did))])?;
        }
        drop(state);
        self.frames.free_all(retired);
        self.domains.write().ids.release(did);
        drop(ctx);
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
