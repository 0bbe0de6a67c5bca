//! IOTLB (VT-d 6.2.2): leaf translations by domain, PASID, page number and page size.
//!
//! Keys carry a PASID (0 for requests without one) so that PASID-granular caching can be
//! added without changing the structure. Superpage translations are cached at their own
//! size, so a lookup probes the 4 KiB key first and then the 2 MiB and 1 GiB keys, but only
//! while entries of that size exist: exact per-size counts are kept for that purpose.
//!
//! Each entry remembers the address and the bits of the leaf entry it was built from. A hit
//! can then re-read that word and tell whether software changed the table without
//! invalidating (a "stale use"); the cached translation is served regardless, exactly as
//! hardware does.

use std::sync::atomic::{AtomicI64, Ordering};

use super::{CacheGeometry, CacheKey, Inserted, RegionKey, SetAssoc, mix};
use crate::ids::{DomainId, Hpa, Iova};
use crate::unit::tables::level_shift;

/// IOTLB tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IotlbKey {
    did: DomainId,
    /// Page-table level of the leaf: 1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB.
    level: u8,
    pasid: u32,
    /// `iova >> level_shift(level)`.
    vpn: u64,
}

impl IotlbKey {
    #[inline]
    pub(crate) fn new(did: DomainId, iova: Iova, level: u32) -> Self {
        Self { did, level: level as u8, pasid: 0, vpn: iova.0 >> level_shift(level) }
    }
}

impl RegionKey for IotlbKey {
    fn did(&self) -> DomainId {
        self.did
    }

    fn region(&self) -> (u64, u64) {
        let shift = level_shift(u32::from(self.level));
        (self.vpn << shift, 1u64 << shift)
    }
}

impl CacheKey for IotlbKey {
    #[inline]
    fn hash64(&self) -> u64 {
        mix(self.vpn ^ (u64::from(self.did.0) << 40) ^ (u64::from(self.level) << 58) ^ (u64::from(self.pasid) << 20))
    }
}

/// A cached leaf translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IotlbEntry {
    /// Output address of the first byte of the page.
    pub(crate) frame: Hpa,
    /// Cumulative read permission of the walk.
    pub(crate) read: bool,
    /// Cumulative write permission of the walk.
    pub(crate) write: bool,
    /// Where the leaf entry lives, and its bits when it was read (stale-use detection).
    pub(crate) pte_addr: Hpa,
    pub(crate) pte: u64,
}

/// The IOTLB.
#[derive(Debug)]
pub(crate) struct Iotlb {
    cache: SetAssoc<IotlbKey, IotlbEntry>,
    /// Live entries per leaf level (index = level), to skip superpage probes.
    per_level: [AtomicI64; 4],
}

/// Above this many 4 KiB pages a page-selective invalidation scans the whole cache instead
/// of probing each page's key.
const PROBE_LIMIT_PAGES: u64 = 64;

impl Iotlb {
    pub(crate) fn new(geometry: CacheGeometry) -> Self {
        Self { cache: SetAssoc::new(geometry), per_level: Default::default() }
    }

    /// The entry covering `iova` in `did`, with its level.
    #[inline]
    pub(crate) fn lookup(&self, did: DomainId, iova: Iova) -> Option<(IotlbEntry, u32)> {
        for level in 1..=3u32 {
            if level > 1 && self.per_level[level as usize].load(Ordering::Relaxed) <= 0 {
                continue;
            }
            if let Some(e) = self.cache.get(&IotlbKey::new(did, iova, level)) {
                return Some((e, level));
            }
        }
        None
    }

    /// Caches a leaf translation found by a walk, unless `admit` refuses it under the set
    /// lock (a walk that raced with an invalidation).
    #[inline]
    pub(crate) fn fill(&self, did: DomainId, iova: Iova, level: u32, entry: IotlbEntry, admit: impl FnOnce() -> bool) {
        let key = IotlbKey::new(did, iova, level);
        match self.cache.insert_if(key, entry, admit) {
            Some(Inserted::Filled) => {
                self.per_level[level as usize].fetch_add(1, Ordering::Relaxed);
            }
            Some(Inserted::Evicted(old)) => {
                self.per_level[level as usize].fetch_add(1, Ordering::Relaxed);
                self.per_level[usize::from(old.level)].fetch_sub(1, Ordering::Relaxed);
            }
            Some(Inserted::Replaced) | None => {}
        }
    }

    fn retain_counted(&self, mut keep: impl FnMut(&IotlbKey) -> bool) -> usize {
        let mut dropped = [0i64; 4];
        let n = self.cache.retain(|k, _| {
            let keep = keep(k);
            if !keep {
                dropped[usize::from(k.level)] += 1;
            }
            keep
        });
        for (level, d) in dropped.iter().enumerate() {
            if *d != 0 {
                self.per_level[level].fetch_sub(*d, Ordering::Relaxed);
            }
        }
        n
    }

    /// Global invalidation.
    pub(crate) fn invalidate_all(&self) -> usize {
        self.retain_counted(|_| false)
    }

    /// Domain-selective invalidation.
    pub(crate) fn invalidate_domain(&self, did: DomainId) -> usize {
        self.retain_counted(|k| k.did != did)
    }

    /// Page-selective invalidation of `[base, base + len)` in `did` (`base` and `len`
    /// already aligned by the caller per the AM rules): every entry, of any page size, that
    /// overlaps the range.
    pub(crate) fn invalidate_range(&self, did: DomainId, base: u64, len: u64) -> usize {
        let end = base.saturating_add(len);
        if len / 4096 <= PROBE_LIMIT_PAGES {
            let mut n = 0;
            for level in 1..=3u32 {
                if level > 1 && self.per_level[level as usize].load(Ordering::Relaxed) <= 0 {
                    continue;
                }
                let step = 1u64 << level_shift(level);
                let mut a = base & !(step - 1);
                while a < end {
                    if self.cache.remove(&IotlbKey::new(did, Iova(a), level)) {
                        self.per_level[level as usize].fetch_sub(1, Ordering::Relaxed);
                        n += 1;
                    }
                    a = match a.checked_add(step) {
                        Some(v) => v,
                        None => break,
                    };
                }
            }
            return n;
        }
        self.retain_counted(|k| k.outside(did, base, end))
    }

    pub(crate) fn len(&self) -> usize {
        self.cache.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(frame: u64) -> IotlbEntry {
        IotlbEntry { frame: Hpa(frame), read: true, write: true, pte_addr: Hpa(0), pte: 0 }
    }

    #[test]
    fn superpage_entries_are_found_from_any_address_inside() {
        let t = Iotlb::new(CacheGeometry::new(64, 4));
        t.fill(DomainId(1), Iova(0x4000_0000), 2, entry(0x20_0000), || true);
        let (e, level) = t.lookup(DomainId(1), Iova(0x401f_f123)).expect("hit");
        assert_eq!((e.frame, level), (Hpa(0x20_0000), 2));
        assert!(t.lookup(DomainId(2), Iova(0x4000_0000)).is_none());
        assert!(t.lookup(DomainId(1), Iova(0x4020_0000)).is_none());
    }

    #[test]
    fn range_invalidation_by_probe_and_by_scan_agree() {
        for len in [0x1000u64, 0x100_0000] {
            let t = Iotlb::new(CacheGeometry::new(64, 8));
            for p in 0..32u64 {
                t.fill(DomainId(1), Iova(p << 12), 1, entry(p << 12), || true);
                t.fill(DomainId(2), Iova(p << 12), 1, entry(p << 12), || true);
            }
            t.fill(DomainId(1), Iova(0x20_0000), 2, entry(0), || true);
            let removed = t.invalidate_range(DomainId(1), 0x3000, len);
            let expect = if len == 0x1000 { 1 } else { 29 + 1 };
            assert_eq!(removed, expect, "len {len:#x}");
            assert!(t.lookup(DomainId(2), Iova(0x3000)).is_some(), "other domain untouched");
        }
    }

    #[test]
    fn per_level_counts_follow_evictions() {
        let t = Iotlb::new(CacheGeometry::new(1, 2));
        t.fill(DomainId(1), Iova(0), 3, entry(0), || true);
        t.fill(DomainId(1), Iova(0x1000), 1, entry(0), || true);
        t.fill(DomainId(1), Iova(0x2000), 1, entry(0), || true); // evicts the 1 GiB entry
        assert_eq!(t.per_level[3].load(Ordering::Relaxed), 0);
        assert_eq!(t.per_level[1].load(Ordering::Relaxed), 2);
        assert_eq!(t.invalidate_all(), 2);
        assert_eq!(t.per_level[1].load(Ordering::Relaxed), 0);
    }
}
