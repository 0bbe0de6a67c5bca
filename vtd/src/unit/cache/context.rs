//! Context cache (VT-d 6.2.1): the context entries the unit has read, by source id.
//!
//! Only present, valid entries are cached. An entry keeps being used until software
//! invalidates it through the context command register (VT-d 6.5.1.1) or a context-cache
//! invalidation descriptor, even if the entry in memory has changed since: the address the
//! entry was read from is kept so that such stale uses can be detected and counted.

use super::{CacheGeometry, CacheKey, SetAssoc, mix};
use crate::ids::{DomainId, Hpa, SourceId};
use crate::unit::tables::ContextEntry;

impl CacheKey for SourceId {
    #[inline]
    fn hash64(&self) -> u64 {
        mix(u64::from(self.0) | 0x5a5a_0000)
    }
}

/// A cached context entry and where in memory it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CachedContext {
    pub(crate) entry: ContextEntry,
    pub(crate) entry_addr: Hpa,
}

/// The context cache.
#[derive(Debug)]
pub(crate) struct ContextCache {
    cache: SetAssoc<SourceId, CachedContext>,
}

impl ContextCache {
    pub(crate) fn new(geometry: CacheGeometry) -> Self {
        Self { cache: SetAssoc::new(geometry) }
    }

    #[inline]
    pub(crate) fn lookup(&self, sid: SourceId) -> Option<CachedContext> {
        self.cache.get(&sid)
    }

    #[inline]
    pub(crate) fn fill(&self, sid: SourceId, ctx: CachedContext, admit: impl FnOnce() -> bool) {
        self.cache.insert_if(sid, ctx, admit);
    }

    /// Global invalidation (CIRG/G = 01b).
    pub(crate) fn invalidate_all(&self) -> usize {
        self.cache.clear()
    }

    /// Domain-selective invalidation (10b): every entry tagged with `did`.
    pub(crate) fn invalidate_domain(&self, did: DomainId) -> usize {
        self.cache.retain(|_, c| c.entry.domain() != did)
    }

    /// Device-selective invalidation (11b): the source id with the function mask applied
    /// (FM 0: none; 1: ignore function bit 2; 2: bits 2:1; 3: bits 2:0). Entries of other
    /// domains may be dropped too; invalidating more than asked is always allowed
    /// (VT-d 6.5.1.1).
    pub(crate) fn invalidate_device(&self, sid: SourceId, function_mask: u8) -> usize {
        masked_functions(sid, function_mask).filter(|s| self.cache.remove(s)).count()
    }

    pub(crate) fn len(&self) -> usize {
        self.cache.len()
    }
}

/// The source ids a device-selective context invalidation of `sid` with function mask
/// `function_mask` names (VT-d 6.5.1.1, CCMD.FM / descriptor FM: 0 ignores no function
/// bit, 1 bit 2, 2 bits 2:1, 3 bits 2:0).
pub(crate) fn masked_functions(sid: SourceId, function_mask: u8) -> impl Iterator<Item = SourceId> {
    let mask: u16 = match function_mask & 3 {
        0 => 0,
        1 => 0b100,
        2 => 0b110,
        _ => 0b111,
    };
    let base = sid.0 & !mask;
    (0..=mask).filter(move |f| f & !mask == 0).map(move |f| SourceId(base | f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unit::tables::{AddressWidth, TranslationType};

    fn ctx(did: u16) -> CachedContext {
        CachedContext {
            entry: ContextEntry::new(
                DomainId(did),
                TranslationType::Untranslated,
                AddressWidth::Aw48,
                Hpa(0x1000),
                false,
            ),
            entry_addr: Hpa(0x2000),
        }
    }

    #[test]
    fn device_selective_honours_the_function_mask() {
        let c = ContextCache::new(CacheGeometry::new(16, 4));
        for f in 0..8 {
            c.fill(SourceId::new(0, 3, f), ctx(1), || true);
        }
        assert_eq!(c.invalidate_device(SourceId::new(0, 3, 1), 0), 1);
        assert_eq!(c.invalidate_device(SourceId::new(0, 3, 2), 1), 2, "functions 2 and 6");
        assert_eq!(c.invalidate_device(SourceId::new(0, 3, 0), 2), 2, "functions 0, 2, 4, 6: only 0 and 4 remain");
        assert_eq!(c.len(), 3);
        for f in [3, 5, 7] {
            assert!(c.lookup(SourceId::new(0, 3, f)).is_some());
        }
    }

    #[test]
    fn domain_selective_keeps_other_domains() {
        let c = ContextCache::new(CacheGeometry::new(16, 4));
        c.fill(SourceId(1), ctx(1), || true);
        c.fill(SourceId(2), ctx(2), || true);
        assert_eq!(c.invalidate_domain(DomainId(1)), 1);
        assert!(c.lookup(SourceId(2)).is_some());
        assert_eq!(c.invalidate_all(), 1);
    }
}
