//! How a driver is set up and what its calls take: the configuration ([`DriverConfig`]),
//! the flush policy of unmaps ([`FlushPolicy`]), domain kinds ([`DomainKind`]) and mapping
//! permissions ([`Perm`]).
//!
//! Plain values only: what the driver does with them is in the modules that act on them.

use std::time::Duration;

use crate::ids::{Hpa, PAGE_SIZE};

/// Largest page-table region [`DriverConfig::for_memory`] reserves.
pub const MAX_TABLE_REGION: u64 = 256 << 20;

/// Access rights of a mapping (VT-d 9.8: R and W of the leaf entry).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Perm {
    /// Device reads (DMA reads of memory) allowed.
    pub read: bool,
    /// Device writes allowed.
    pub write: bool,
}

impl Perm {
    /// Read-only.
    pub const READ: Self = Self { read: true, write: false };
    /// Write-only.
    pub const WRITE: Self = Self { read: false, write: true };
    /// Read and write.
    pub const RW: Self = Self { read: true, write: true };
}

/// What a domain does with a device's DMA (Linux `IOMMU_DOMAIN_BLOCKED` / `_IDENTITY` /
/// `_DMA`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum DomainKind {
    /// Every request is blocked: attached devices get a not-present context entry.
    Blocked,
    /// Requests pass through untranslated (context TT=10b; needs ECAP.PT).
    Identity,
    /// Requests are translated by the domain's second-stage page tables.
    Paging,
}

/// When the driver invalidates after an unmap (Linux `iommu.strict`: strict vs the
/// `DMA_FQ` flush queue). Set per driver in [`DriverConfig`] and per call with
/// [`Driver::unmap_with`](crate::driver::Driver::unmap_with).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
#[non_exhaustive]
pub enum FlushPolicy {
    /// Invalidate the IOTLB, the paging-structure caches and the device TLBs of the
    /// domain's ATS devices before unmap returns: once it has, no cache serves the range.
    #[default]
    Strict,
    /// Clear the entries, queue the range and return; invalidate later, in bulk. Until
    /// then devices may keep using cached translations of the range (the freed page-table
    /// pages are kept until the flush, so nothing else is ever reached through them), and
    /// a map over a queued range flushes first. Far cheaper per unmap (`docs/BENCHMARKS.md`, `unmap/deferred_4k`).
    Deferred {
        /// Flush once a domain has this many queued unmaps (Linux: 256; 0 acts as 1).
        max_entries: usize,
        /// Flush once a domain's oldest queued unmap is this old (Linux: 10 ms).
        max_delay: Duration,
    },
}

impl FlushPolicy {
    /// Deferred flushing with the Linux flush-queue sizes: 256 entries, 10 ms.
    pub const DEFERRED: Self = Self::Deferred { max_entries: 256, max_delay: Duration::from_millis(10) };
}

/// How the driver is set up.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DriverConfig {
    /// `(base, len)` of host memory reserved for root, context and page tables and the
    /// invalidation queue. Mappings may not target it.
    pub table_region: (Hpa, u64),
    /// Default invalidation policy of unmaps.
    pub flush: FlushPolicy,
    /// Use queued invalidation when the unit offers it (ECAP.QI). Off, the driver uses the
    /// registers and refuses ATS (device TLBs can only be invalidated through the queue).
    pub queued_invalidation: bool,
}

impl DriverConfig {
    /// The top eighth of a memory of `size` bytes, at most [`MAX_TABLE_REGION`], page
    /// aligned, with strict flushing and queued invalidation.
    pub fn for_memory(size: u64) -> Self {
        let end = size & !(PAGE_SIZE - 1);
        let len = (size / 8).min(MAX_TABLE_REGION) & !(PAGE_SIZE - 1);
        Self { table_region: (Hpa(end - len), len), flush: FlushPolicy::Strict, queued_invalidation: true }
    }

    /// The same with another default flush policy.
    pub fn with_flush(mut self, flush: FlushPolicy) -> Self {
        self.flush = flush;
        self
    }

    /// The same with queued invalidation allowed or not.
    pub fn with_queued_invalidation(mut self, on: bool) -> Self {
        self.queued_invalidation = on;
        self
    }
}
