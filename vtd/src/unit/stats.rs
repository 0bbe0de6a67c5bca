//! Event counters of one unit.
//!
//! Counters sit on the translation path, so each is striped over cache-line-padded cells
//! and a thread adds to "its" cell: concurrent translations on different cores do not
//! bounce one line between them. Reading sums the cells; a snapshot is not atomic across
//! counters, which is fine for monitoring.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

const STRIPES: usize = 16;

#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

/// A striped, monotonically increasing counter.
pub(crate) struct Counter {
    cells: [Padded; STRIPES],
}

impl Default for Counter {
    fn default() -> Self {
        Self { cells: std::array::from_fn(|_| Padded::default()) }
    }
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.get())
    }
}

static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's stripe. The fast path is one thread-local load, small enough to inline
/// into every counter on the translation path; the first use per thread is out of line.
#[inline]
fn stripe() -> usize {
    let v = STRIPE.get();
    if v != usize::MAX { v } else { assign_stripe() }
}

#[cold]
#[inline(never)]
fn assign_stripe() -> usize {
    let v = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
    STRIPE.set(v);
    v
}

impl Counter {
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.cells[stripe()].0.fetch_add(n, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn inc(&self) {
        self.add(1);
    }

    pub(crate) fn get(&self) -> u64 {
        self.cells.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Live counters of one unit.
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $( pub(crate) $name: Counter, )*
        }

        /// A snapshot of a unit's counters (see [`crate::unit::Unit::stats`]).
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct UnitStats {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl Counters {
            pub(crate) fn snapshot(&self) -> UnitStats {
                UnitStats { $( $name: self.$name.get(), )* }
            }
        }

        impl UnitStats {
            /// Every counter with its name, in declaration order.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![ $( (stringify!($name), self.$name), )* ]
            }
        }

        /// Counter by counter: a platform's totals over its units.
        impl std::ops::AddAssign for UnitStats {
            fn add_assign(&mut self, other: Self) {
                $( self.$name = self.$name.wrapping_add(other.$name); )*
            }
        }
    };
}

counters! {
    /// Untranslated requests translated successfully (including pass-through).
    untranslated_ok,
    /// Untranslated requests blocked (faulted, or refused without a fault).
    untranslated_blocked,
    /// ATS translation requests completed with Success (any permissions).
    ats_success,
    /// ATS translation requests completed with R=W=0.
    ats_no_access,
    /// ATS translation requests completed with UR or CA.
    ats_error,
    /// Translated requests allowed.
    translated_ok,
    /// Translated requests blocked.
    translated_blocked,
    /// Translated requests refused by translated-request checking (no grant covered them
    /// with the permission needed); also counted in `translated_blocked`.
    translated_check_refusals,
    /// Translation completions recorded as grants for translated-request checking.
    translated_check_grants,
    /// Grants evicted because a function reached its bound.
    translated_check_evictions,
    /// Translations computed again because an invalidation for the function ran while
    /// they were in flight.
    translated_check_retries,
    /// DMA refused because it touched an enabled protected memory region (no fault is
    /// recorded for these, VT-d 10.4.16); also counted in `untranslated_blocked` or
    /// `translated_blocked`.
    protected_memory_blocked,
    /// Context-cache hits.
    context_hits,
    /// Context-cache misses (root and context entries read from memory).
    context_misses,
    /// IOTLB hits.
    iotlb_hits,
    /// IOTLB misses.
    iotlb_misses,
    /// Paging-structure cache hits (walks that skipped levels).
    paging_hits,
    /// Paging-structure cache misses (walks from the top).
    paging_misses,
    /// Page walks (IOTLB misses that read page-table entries).
    walks,
    /// Page-table entries read by walks.
    walk_loads,
    /// IOTLB hits served while the leaf entry in memory differed (software changed the
    /// table without invalidating).
    stale_iotlb_uses,
    /// Context-cache hits served while the context entry in memory differed.
    stale_context_uses,
    /// Faults written to fault recording registers.
    faults_recorded,
    /// Qualified faults suppressed by FPD.
    faults_suppressed,
    /// Faults lost to a full fault-recording ring (PFO).
    faults_overflowed,
    /// Context-cache invalidations performed.
    context_invalidations,
    /// IOTLB invalidations performed (any granularity).
    iotlb_invalidations,
    /// Cache entries dropped by invalidations (all caches).
    entries_invalidated,
    /// Context-cache invalidation descriptors processed.
    qi_context,
    /// IOTLB invalidation descriptors processed.
    qi_iotlb,
    /// Device-TLB invalidation descriptors processed.
    qi_device_tlb,
    /// Interrupt-entry-cache invalidation descriptors processed.
    qi_iec,
    /// Invalidation-wait descriptors completed.
    qi_wait,
    /// Page-group-response descriptors processed.
    qi_page_response,
    /// Invalidation queue errors (IQE).
    qi_errors,
    /// Device-TLB invalidations completed by their device.
    device_tlb_completions,
    /// Sum of device-TLB invalidation round trips, in nanoseconds.
    device_tlb_latency_ns,
    /// Device-TLB invalidations abandoned by a time-out (ITE).
    device_tlb_timeouts,
}
