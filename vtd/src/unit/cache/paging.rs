//! Paging-structure cache (VT-d 6.2.3): the non-leaf part of recent walks.
//!
//! An entry says "for addresses in this region of this domain, the table at `level` is at
//! `table`, reached with these cumulative permissions", so an IOTLB miss that hits here
//! costs one load per remaining level instead of a full walk. Entries are dropped by
//! global, domain-selective and (unless the invalidation hint is set) page-selective IOTLB
//! invalidations, which is what the spec requires of them (VT-d 6.5.1.2, IH).

use super::{CacheGeometry, CacheKey, RegionKey, SetAssoc, mix};
use crate::ids::{DomainId, Hpa, Iova};
use crate::unit::tables::level_shift;

/// Paging-structure cache tag: the table at `level` covering `iova` in `did`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PagingKey {
    did: DomainId,
    level: u8,
    /// `iova >> level_shift(level + 1)`: the region one table at `level` maps.
    tag: u64,
}

impl PagingKey {
    #[inline]
    pub(crate) fn new(did: DomainId, iova: Iova, level: u32) -> Self {
        Self { did, level: level as u8, tag: iova.0 >> level_shift(level + 1) }
    }
}

impl RegionKey for PagingKey {
    fn did(&self) -> DomainId {
        self.did
    }

    fn region(&self) -> (u64, u64) {
        let shift = level_shift(u32::from(self.level) + 1);
        (self.tag.checked_shl(shift).unwrap_or(u64::MAX), 1u64.checked_shl(shift).unwrap_or(u64::MAX))
    }
}

impl CacheKey for PagingKey {
    #[inline]
    fn hash64(&self) -> u64 {
        mix(self.tag ^ (u64::from(self.did.0) << 40) ^ (u64::from(self.level) << 58))
    }
}

/// Where the walk continues, and the permissions granted by the levels above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PagingEntry {
    pub(crate) table: Hpa,
    pub(crate) read: bool,
    pub(crate) write: bool,
}

/// The paging-structure cache.
#[derive(Debug)]
pub(crate) struct PagingCache {
    cache: SetAssoc<PagingKey, PagingEntry>,
}

impl PagingCache {
    pub(crate) fn new(geometry: CacheGeometry) -> Self {
        Self { cache: SetAssoc::new(geometry) }
    }

    /// The deepest cached table on the way to `iova` in a `levels`-level structure.
    #[inline]
    pub(crate) fn lookup(&self, did: DomainId, iova: Iova, levels: u32) -> Option<(u32, PagingEntry)> {
        (1..levels).find_map(|level| self.cache.get(&PagingKey::new(did, iova, level)).map(|e| (level, e)))
    }

    #[inline]
    pub(crate) fn fill(&self, did: DomainId, iova: Iova, level: u32, entry: PagingEntry, admit: impl FnOnce() -> bool) {
        self.cache.insert_if(PagingKey::new(did, iova, level), entry, admit);
    }

    pub(crate) fn invalidate_all(&self) -> usize {
        self.cache.clear()
    }

    pub(crate) fn invalidate_domain(&self, did: DomainId) -> usize {
        self.cache.retain(|k, _| k.did != did)
    }

    /// Every entry of `did` whose region overlaps `[base, base + len)`.
    pub(crate) fn invalidate_range(&self, did: DomainId, base: u64, len: u64) -> usize {
        let end = base.saturating_add(len);
        self.cache.retain(|k, _| k.outside(did, base, end))
    }

    pub(crate) fn len(&self) -> usize {
        self.cache.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deepest_level_wins_and_range_invalidation_is_selective() {
        let c = PagingCache::new(CacheGeometry::new(16, 4));
        let e = |t| PagingEntry { table: Hpa(t), read: true, write: true };
        c.fill(DomainId(1), Iova(0x1234_5000), 2, e(0x2000), || true);
        c.fill(DomainId(1), Iova(0x1234_5000), 1, e(0x1000), || true);
        assert_eq!(c.lookup(DomainId(1), Iova(0x1234_6000), 4), Some((1, e(0x1000))));
        // Outside the level-1 table's 2 MiB region but inside the level-2 table's 1 GiB.
        assert_eq!(c.lookup(DomainId(1), Iova(0x1000_0000), 4), Some((2, e(0x2000))));
        assert_eq!(c.invalidate_range(DomainId(1), 0x1234_5000, 0x1000), 2);
        assert_eq!(c.len(), 0);
    }
}
