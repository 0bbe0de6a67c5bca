//! What an invalidation does to the caches (VT-d 6.5.1): the requests both interfaces
//! carry, register-based (`registers`) and queued (`queue`), and their effect on the context
//! cache, the IOTLB and the paging-structure caches.
//!
//! Every operation first bumps the unit's invalidation epoch, then drops entries, so a walk
//! that read the tables before the invalidation cannot refill a cache after it.
//! Invalidating more than asked is always allowed by the spec; invalidating less never.
//! Decoding the requests from registers or descriptors is not done here.

use crate::ids::{DomainId, Iova, SourceId};
use crate::unit::Unit;
use crate::unit::regs::MAMV;

/// A context-cache invalidation request (VT-d 6.5.1.1, CCMD.CIRG / descriptor G).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextInvalidation {
    /// Every entry.
    Global,
    /// Entries tagged with a domain.
    Domain(DomainId),
    /// Entries for a source id, with a function mask (FM, 0..=3).
    Device {
        /// Domain the entries are tagged with.
        did: DomainId,
        /// Source id.
        sid: SourceId,
        /// FM: how many low function bits to ignore.
        function_mask: u8,
    },
}

/// An IOTLB invalidation request (VT-d 6.5.1.2, IOTLB_REG.IIRG / descriptor G).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotlbInvalidation {
    /// Every entry, and every paging-structure cache entry.
    Global,
    /// Entries of one domain, and its paging-structure cache entries.
    Domain(DomainId),
    /// Page-selective within a domain: `2^am` 4 KiB pages at `addr` (aligned down to
    /// that size). With `ih` (invalidation hint) the paging-structure caches are kept.
    Page {
        /// Domain.
        did: DomainId,
        /// Address (low bits below the range size are ignored).
        addr: Iova,
        /// Address mask: log2 of the page count.
        am: u8,
        /// Invalidation hint: only leaf entries changed.
        ih: bool,
    },
}

/// The granularity the hardware actually performed (CAIG / IAIG).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Performed {
    /// Global.
    Global = 1,
    /// Domain-selective.
    Domain = 2,
    /// Device- or page-selective.
    Selective = 3,
}

/// An invalidation request the unit refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum InvalidationError {
    /// AM above CAP.MAMV.
    #[error("address mask {am} exceeds the supported maximum {MAMV}")]
    AddressMaskTooLarge {
        /// The requested AM.
        am: u8,
    },
}

impl Unit {
    /// Performs a context-cache invalidation.
    pub(crate) fn invalidate_context(&self, inv: ContextInvalidation) -> Performed {
        self.begin_invalidation();
        let (n, performed) = match inv {
            ContextInvalidation::Global => (self.context_cache.invalidate_all(), Performed::Global),
            ContextInvalidation::Domain(did) => (self.context_cache.invalidate_domain(did), Performed::Domain),
            ContextInvalidation::Device { sid, function_mask, .. } => {
                (self.context_cache.invalidate_device(sid, function_mask), Performed::Selective)
            }
        };
        // Translated-request checking: what the named functions were granted under their
        // old context entries goes with them.
        self.grants.context_invalidated(inv);
        self.counters.context_invalidations.inc();
        self.counters.entries_invalidated.add(n as u64);
        performed
    }

    /// Performs an IOTLB invalidation (with the paging-structure caches it implies).
    pub(crate) fn invalidate_iotlb(&self, inv: IotlbInvalidation) -> Result<Performed, InvalidationError> {
        if let IotlbInvalidation::Page { am, .. } = inv
            && u64::from(am) > MAMV
        {
            return Err(InvalidationError::AddressMaskTooLarge { am });
        }
        self.begin_invalidation();
        let (n, performed) = match inv {
            IotlbInvalidation::Global => {
                (self.iotlb.invalidate_all() + self.paging_cache.invalidate_all(), Performed::Global)
            }
            IotlbInvalidation::Domain(did) => {
                (self.iotlb.invalidate_domain(did) + self.paging_cache.invalidate_domain(did), Performed::Domain)
            }
            IotlbInvalidation::Page { did, addr, am, ih } => {
                let len = 1u64 << (12 + u32::from(am));
                let base = addr.0 & !(len - 1);
                let mut n = self.iotlb.invalidate_range(did, base, len);
                if !ih {
                    n += self.paging_cache.invalidate_range(did, base, len);
                }
                (n, Performed::Selective)
            }
        };
        self.counters.iotlb_invalidations.inc();
        self.counters.entries_invalidated.add(n as u64);
        Ok(performed)
    }
}
