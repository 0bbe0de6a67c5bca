//! Interrupt entry cache (IEC): the IRTEs the remapper has read, by interrupt index
//! (VT-d "Interrupt Entry Cache"; invalidated by the IEC descriptor, VT-d 6.5.2.7).
//!
//! Only present entries without reserved bits are cached, as raw bits; a request that
//! faults leaves nothing behind, so making an entry present needs no invalidation. A cached
//! entry keeps being used after the IRTE in memory changes, until software invalidates it.
//!
//! Fills are epoch-guarded like the translation caches: an invalidation bumps the epoch
//! before it drops entries, and a fill whose lookup started in an older epoch is refused
//! under the set lock. So a remap racing with an invalidation can never put back an entry
//! it read before the invalidation completed.

use std::sync::atomic::{AtomicU64, Ordering};

use super::irte::Irte;
use crate::unit::cache::{CacheGeometry, CacheKey, SetAssoc, mix};

/// Above this many indices, an index-selective invalidation sweeps every set once instead
/// of removing index by index.
const SWEEP_THRESHOLD: u32 = 64;

/// Cache key: the interrupt index.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct IecKey(u16);

impl CacheKey for IecKey {
    #[inline]
    fn hash64(&self) -> u64 {
        mix(u64::from(self.0) | 0x1ec_0000)
    }
}

/// An invalidation epoch, read before the table is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Epoch(u64);

/// The interrupt entry cache.
#[derive(Debug)]
pub(crate) struct InterruptEntryCache {
    cache: SetAssoc<IecKey, Irte>,
    /// Bumped by every invalidation before it drops entries.
    epoch: AtomicU64,
}

impl InterruptEntryCache {
    /// A cache of the given (validated) geometry.
    pub(crate) fn new(geometry: CacheGeometry) -> Self {
        Self { cache: SetAssoc::new(geometry), epoch: AtomicU64::new(0) }
    }

    /// The current epoch; take it before looking up or reading the table.
    #[inline]
    pub(crate) fn epoch(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::SeqCst))
    }

    #[inline]
    pub(crate) fn lookup(&self, index: u16) -> Option<Irte> {
        self.cache.get(&IecKey(index))
    }

    /// Caches `irte` for `index` unless an invalidation began since `epoch` was taken.
    /// Returns whether the entry was admitted.
    #[inline]
    pub(crate) fn fill(&self, index: u16, irte: Irte, epoch: Epoch) -> bool {
        self.cache.insert_if(IecKey(index), irte, || self.epoch.load(Ordering::SeqCst) == epoch.0).is_some()
    }

    fn begin_invalidation(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Global invalidation (G = 0). Returns how many entries were dropped.
    pub(crate) fn invalidate_all(&self) -> usize {
        self.begin_invalidation();
        self.cache.clear()
    }

    /// Index-selective invalidation (G = 1): the 2^`index_mask` entries starting at
    /// `index` rounded down to that alignment (VT-d 6.5.2.7, IM field). A mask of 16 or
    /// more covers every index. Returns how many entries were dropped.
    pub(crate) fn invalidate_indices(&self, index: u16, index_mask: u8) -> usize {
        self.begin_invalidation();
        let count: u32 = 1 << u32::from(index_mask).min(16);
        let base = u32::from(index) & !(count - 1);
        let end = base + count;
        if count <= SWEEP_THRESHOLD {
            // `base + count <= 65536`, so every `i` fits in 16 bits.
            (base..end).filter(|&i| self.cache.remove(&IecKey(i as u16))).count()
        } else {
            self.cache.retain(|k, _| !(base..end).contains(&u32::from(k.0)))
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.cache.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unit::interrupt::irte::ApicMode;

    fn e(v: u8) -> Irte {
        Irte::remapped(v, 0, ApicMode::XApic)
    }

    #[test]
    fn index_selective_invalidation_is_aligned() {
        let c = InterruptEntryCache::new(CacheGeometry::new(64, 8));
        for i in 0..32u16 {
            assert!(c.fill(i, e(i as u8), c.epoch()));
        }
        // IM = 2 at index 6: entries 4..=7.
        assert_eq!(c.invalidate_indices(6, 2), 4);
        for i in 0..32u16 {
            assert_eq!(c.lookup(i).is_some(), !(4..8).contains(&i), "index {i}");
        }
        // IM = 0: exactly one entry.
        assert_eq!(c.invalidate_indices(9, 0), 1);
        assert_eq!(c.lookup(9), None);
        assert_eq!(c.lookup(8), Some(e(8)));
        // A large mask takes the sweeping path: IM = 7 at 100 covers 0..128.
        assert_eq!(c.invalidate_indices(100, 7), 32 - 5);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn huge_mask_covers_everything() {
        let c = InterruptEntryCache::new(CacheGeometry::new(16, 4));
        for i in [0u16, 0x7fff, 0xffff] {
            c.fill(i, e(1), c.epoch());
        }
        assert_eq!(c.invalidate_indices(0x1234, 31), 3);
    }

    #[test]
    fn fill_from_before_an_invalidation_is_refused() {
        let c = InterruptEntryCache::new(CacheGeometry::new(4, 2));
        let epoch = c.epoch();
        // ... the remapper reads the IRTE from memory, then software invalidates ...
        assert_eq!(c.invalidate_indices(3, 0), 0);
        assert!(!c.fill(3, e(1), epoch), "a fill begun before the invalidation must not land");
        assert_eq!(c.lookup(3), None);
        assert!(c.fill(3, e(1), c.epoch()));
        assert_eq!(c.invalidate_all(), 1);
    }
}
