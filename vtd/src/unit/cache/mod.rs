//! The unit's translation caches (VT-d 6.2 "Translation Caching").
//!
//! One generic set-associative structure, [`SetAssoc`], backs all three caches the legacy
//! mode needs; each cache is a file of its own that fixes the key, the value and the
//! invalidation rules:
//! - [`context`]: context cache, keyed by source id (VT-d 6.2.1);
//! - [`paging`]: paging-structure cache, keyed by domain, level and address (VT-d 6.2.3);
//! - [`iotlb`]: IOTLB, keyed by domain, PASID, page number and page size (VT-d 6.2.2).
//!
//! Capacity is bounded and replacement is least-recently-used within a set, as in hardware:
//! a full cache evicts one entry, it never flushes everything. Every set has its own lock,
//! padded to its own cache lines, so concurrent translations that touch different sets do
//! not contend.
//!
//! None of these caches ever holds a not-present or faulting entry (CAP.CM = 0, VT-d 6.1),
//! so mapping a page needs no invalidation.

pub(crate) mod context;
pub(crate) mod iotlb;
pub(crate) mod paging;

use parking_lot::Mutex;

use crate::ids::DomainId;

/// Geometry of one cache: `sets × ways` entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheGeometry {
    /// Number of sets; a power of two.
    pub sets: usize,
    /// Entries per set.
    pub ways: usize,
}

impl CacheGeometry {
    /// A geometry of `sets × ways`.
    pub const fn new(sets: usize, ways: usize) -> Self {
        Self { sets, ways }
    }

    /// Total entries.
    pub const fn capacity(self) -> usize {
        self.sets * self.ways
    }

    /// Checks the geometry is usable: sets a power of two, ways in 1..=64, capacity at most
    /// 2^24 entries.
    pub fn validate(self) -> Result<(), InvalidGeometry> {
        if self.sets == 0 || !self.sets.is_power_of_two() || self.ways == 0 || self.ways > 64 {
            return Err(InvalidGeometry(self));
        }
        if self.capacity() > 1 << 24 {
            return Err(InvalidGeometry(self));
        }
        Ok(())
    }
}

/// A cache geometry that cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cache geometry {}x{} is invalid: sets must be a power of two, ways 1..=64, at most 2^24 entries", .0.sets, .0.ways)]
pub struct InvalidGeometry(pub CacheGeometry);

/// A key that picks its set by a 64-bit hash.
pub(crate) trait CacheKey: Copy + Eq {
    /// A well-mixed 64-bit hash; the top bits select the set.
    fn hash64(&self) -> u64;
}

/// A key that covers one naturally aligned region of one domain's input addresses: what
/// the IOTLB and the paging-structure cache have in common for page-selective invalidation.
pub(crate) trait RegionKey {
    /// The domain the entry belongs to.
    fn did(&self) -> DomainId;

    /// First input address the entry covers, and its size in bytes.
    fn region(&self) -> (u64, u64);

    /// Whether a page-selective invalidation of `[base, end)` in `did` spares this entry:
    /// it belongs to another domain or its region does not overlap the range (VT-d
    /// 6.5.1.2: every entry that overlaps goes, whatever its page size).
    #[inline]
    fn outside(&self, did: DomainId, base: u64, end: u64) -> bool {
        let (start, size) = self.region();
        self.did() != did || start >= end || start.saturating_add(size) <= base
    }
}

/// Fibonacci hashing: spreads sequential page numbers over all sets.
#[inline]
pub(crate) const fn mix(x: u64) -> u64 {
    x.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[derive(Clone, Copy)]
struct Slot<K, V> {
    key: K,
    value: V,
    stamp: u64,
}

struct SetInner<K, V> {
    slots: Vec<Slot<K, V>>,
    clock: u64,
}

/// One set, aligned to two cache lines so neighbouring sets never share one.
#[repr(align(128))]
struct Set<K, V> {
    inner: Mutex<SetInner<K, V>>,
}

/// What an insertion did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Inserted<K> {
    /// The key was present; its value was replaced.
    Replaced,
    /// A free way took the entry.
    Filled,
    /// The least recently used entry of the set, with this key, made room.
    Evicted(K),
}

/// A bounded set-associative cache with per-set LRU replacement.
pub(crate) struct SetAssoc<K, V> {
    sets: Box<[Set<K, V>]>,
    ways: usize,
    shift: u32,
}

impl<K: CacheKey, V: Copy> SetAssoc<K, V> {
    /// A cache of the given (validated) geometry.
    pub(crate) fn new(geometry: CacheGeometry) -> Self {
        let sets = (0..geometry.sets)
            .map(|_| Set { inner: Mutex::new(SetInner { slots: Vec::with_capacity(geometry.ways), clock: 0 }) })
            .collect();
        let bits = geometry.sets.trailing_zeros();
        // With one set, shift by 64 would overflow: select set 0 by masking instead.
        Self { sets, ways: geometry.ways, shift: 64 - bits }
    }

    #[inline]
    fn set_of(&self, key: &K) -> &Set<K, V> {
        let idx = if self.shift == 64 { 0 } else { (key.hash64() >> self.shift) as usize };
        &self.sets[idx]
    }

    /// Looks `key` up and marks it most recently used.
    #[inline]
    pub(crate) fn get(&self, key: &K) -> Option<V> {
        let mut set = self.set_of(key).inner.lock();
        set.clock += 1;
        let clock = set.clock;
        set.slots.iter_mut().find(|s| s.key == *key).map(|s| {
            s.stamp = clock;
            s.value
        })
    }

    /// Inserts or replaces, evicting the set's least recently used entry when it is full.
    /// `admit` runs under the set lock and may refuse the insertion (it is used to drop a
    /// fill that raced with an invalidation); a refused insertion returns `None`.
    #[inline]
    pub(crate) fn insert_if(&self, key: K, value: V, admit: impl FnOnce() -> bool) -> Option<Inserted<K>> {
        let mut guard = self.set_of(&key).inner.lock();
        if !admit() {
            return None;
        }
        let set = &mut *guard;
        set.clock += 1;
        let stamp = set.clock;
        if let Some(s) = set.slots.iter_mut().find(|s| s.key == key) {
            *s = Slot { key, value, stamp };
            return Some(Inserted::Replaced);
        }
        if set.slots.len() < self.ways {
            set.slots.push(Slot { key, value, stamp });
            return Some(Inserted::Filled);
        }
        // Full: the way with the oldest stamp goes (LRU).
        let victim = set.slots.iter_mut().min_by_key(|s| s.stamp)?;
        let old = victim.key;
        *victim = Slot { key, value, stamp };
        Some(Inserted::Evicted(old))
    }

    /// Removes `key`; returns whether it was present.
    pub(crate) fn remove(&self, key: &K) -> bool {
        let mut set = self.set_of(key).inner.lock();
        match set.slots.iter().position(|s| s.key == *key) {
            Some(i) => {
                set.slots.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Keeps only the entries for which `keep` is true; returns how many were removed.
    /// Locks one set at a time.
    pub(crate) fn retain(&self, mut keep: impl FnMut(&K, &V) -> bool) -> usize {
        let mut removed = 0;
        for set in self.sets.iter() {
            let mut set = set.inner.lock();
            let before = set.slots.len();
            set.slots.retain(|s| keep(&s.key, &s.value));
            removed += before - set.slots.len();
        }
        removed
    }

    /// Drops every entry; returns how many there were.
    pub(crate) fn clear(&self) -> usize {
        self.retain(|_, _| false)
    }

    /// Entries currently held.
    pub(crate) fn len(&self) -> usize {
        self.sets.iter().map(|s| s.inner.lock().slots.len()).sum()
    }
}

impl<K, V> std::fmt::Debug for SetAssoc<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetAssoc").field("sets", &self.sets.len()).field("ways", &self.ways).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    struct K(u64);
    impl CacheKey for K {
        fn hash64(&self) -> u64 {
            mix(self.0)
        }
    }

    #[test]
    fn geometry_validation() {
        assert!(CacheGeometry::new(64, 8).validate().is_ok());
        assert!(CacheGeometry::new(1, 1).validate().is_ok());
        assert!(CacheGeometry::new(0, 8).validate().is_err());
        assert!(CacheGeometry::new(48, 8).validate().is_err());
        assert!(CacheGeometry::new(64, 0).validate().is_err());
        assert!(CacheGeometry::new(64, 65).validate().is_err());
        assert!(CacheGeometry::new(1 << 22, 8).validate().is_err());
    }

    #[test]
    fn full_set_evicts_least_recently_used_only() {
        let c: SetAssoc<K, u64> = SetAssoc::new(CacheGeometry::new(1, 4));
        for k in 0..4 {
            assert_eq!(c.insert_if(K(k), k * 10, || true), Some(Inserted::Filled));
        }
        // Touch 0, so 1 becomes the LRU.
        assert_eq!(c.get(&K(0)), Some(0));
        assert_eq!(c.insert_if(K(9), 90, || true), Some(Inserted::Evicted(K(1))));
        assert_eq!(c.len(), 4);
        assert_eq!(c.get(&K(1)), None);
        for k in [0, 2, 3, 9] {
            assert!(c.get(&K(k)).is_some(), "{k} must survive");
        }
    }

    #[test]
    fn refused_fill_leaves_cache_unchanged() {
        let c: SetAssoc<K, u64> = SetAssoc::new(CacheGeometry::new(2, 2));
        assert_eq!(c.insert_if(K(1), 1, || false), None);
        assert_eq!(c.len(), 0);
    }

    proptest! {
        /// Against a reference model: a per-set LRU list.
        #[test]
        fn matches_reference_lru(ops in proptest::collection::vec((0u8..3, 0u64..40), 1..400)) {
            let geometry = CacheGeometry::new(4, 3);
            let c: SetAssoc<K, u64> = SetAssoc::new(geometry);
            let set_of = |k: u64| (mix(k) >> 62) as usize;
            let mut model: Vec<Vec<(u64, u64)>> = vec![Vec::new(); 4]; // most recent last
            for (i, (op, k)) in ops.into_iter().enumerate() {
                let s = &mut model[set_of(k)];
                match op {
                    0 => {
                        let want = s.iter().position(|e| e.0 == k).map(|p| { let e = s.remove(p); s.push(e); e.1 });
                        prop_assert_eq!(c.get(&K(k)), want);
                    }
                    1 => {
                        let v = i as u64;
                        if let Some(p) = s.iter().position(|e| e.0 == k) { s.remove(p); }
                        else if s.len() == 3 { s.remove(0); }
                        s.push((k, v));
                        prop_assert!(c.insert_if(K(k), v, || true).is_some());
                    }
                    _ => {
                        let had = s.iter().position(|e| e.0 == k).map(|p| s.remove(p)).is_some();
                        prop_assert_eq!(c.remove(&K(k)), had);
                    }
                }
                prop_assert!(c.len() <= geometry.capacity());
                prop_assert_eq!(c.len(), model.iter().map(Vec::len).sum::<usize>());
            }
        }
    }
}
