//! The counters a function keeps about its accesses and the link traffic they cause.
//!
//! Owns the set of counters (one list, so the report, the progress stream, the Prometheus
//! metrics and the proto all name the same things) and their arithmetic. A function keeps
//! plain `u64`s that only its state machine writes; readers get copies (snapshots,
//! progress every 100 ms), so the hot path touches no atomic. Not here: their Prometheus
//! names (`metrics`) and wire form (`wire`).

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Counters of accesses and of the traffic they caused (see the proto's
        /// `WorkloadCounters` for each one's meaning).
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct Counters {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Counters {
            /// `self - earlier`, field by field (saturating, so a reset never underflows).
            pub fn since(&self, earlier: &Counters) -> Counters {
                Counters { $($name: self.$name.saturating_sub(earlier.$name),)* }
            }

            /// Adds `other` field by field.
            pub fn add(&mut self, other: &Counters) {
                $(self.$name = self.$name.saturating_add(other.$name);)*
            }
        }
    };
}

counters! {
    /// Accesses finished, successfully or not.
    accesses,
    /// Accesses the device TLB answered.
    atc_hits,
    /// Accesses the device TLB could not answer.
    atc_misses,
    /// Misses that joined an outstanding translation request.
    coalesced_misses,
    /// Translation requests sent.
    translations_requested,
    /// UR or CA completions (and malformed ones).
    translation_errors,
    /// Completions discarded because an invalidation overtook them.
    stale_completions,
    /// Accesses refused for want of a usable translation.
    faults,
    /// Invalidation requests completed.
    invalidations_handled,
    /// Entries dropped by invalidations.
    invalidated_entries,
    /// Entries evicted to make room.
    evictions,
    /// Page requests sent.
    page_requests,
    /// Page requests refused or never answered.
    page_request_failures,
    /// DMA requests completed.
    dma_ok,
    /// DMA requests refused by the server.
    dma_failed,
    /// DMA requests sent untranslated.
    untranslated_dma,
    /// Baseline translations: unary Control.Translate calls (baseline mode), or link
    /// requests of one access each (link baseline mode).
    baseline_calls,
    /// Accesses abandoned because the link went down.
    aborted,
    /// Completions smaller than the smallest translation unit.
    stu_violations,
}

impl Counters {
    /// Hits over lookups, 0 without lookups.
    pub fn hit_ratio(&self) -> f64 {
        let lookups = self.atc_hits + self.atc_misses;
        if lookups == 0 { 0.0 } else { self.atc_hits as f64 / lookups as f64 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_is_field_by_field() {
        let mut a = Counters { accesses: 10, atc_hits: 7, atc_misses: 3, ..Default::default() };
        let b = Counters { accesses: 4, atc_hits: 9, ..Default::default() };
        let d = a.since(&b);
        assert_eq!((d.accesses, d.atc_hits, d.atc_misses), (6, 0, 3));
        a.add(&b);
        assert_eq!((a.accesses, a.atc_hits), (14, 16));
        assert!((Counters { atc_hits: 3, atc_misses: 1, ..Default::default() }.hit_ratio() - 0.75).abs() < 1e-9);
    }
}
