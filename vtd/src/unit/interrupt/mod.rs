//! Interrupt remapping (VT-d 5.1): what the unit does with an MSI write to 0xFEEx_xxxx.
//!
//! An `InterruptRemapper` owns the interrupt-remapping state of one remapping unit: the
//! latched interrupt remapping table address (IRTA, with EIME and the table size), the IRE
//! and CFI enables, the interrupt entry cache (`entry_cache`) and its counters. Given a
//! request's source id, MSI address and data it answers with the interrupt to deliver
//! ([`Remapped`]) or the fault that blocks it ([`IrFault`]). The formats it reads live in
//! [`irte`] (the IRTE, VT-d 9.10, and IRTA) and [`msi`] (the compatibility and remappable
//! MSI formats, VT-d 5.1.2).
//!
//! It does not own the registers, the fault recording registers or interrupt delivery: the
//! unit decodes GCMD/IRTA writes and calls `InterruptRemapper::set_table`,
//! `InterruptRemapper::enable` and `InterruptRemapper::set_compat_allowed`; it decides
//! whether a fault is recorded ([`IrFault::should_record`]) and records it with the index in
//! `FI[63:48]` ([`IrFault::fault_info`]); it hands a [`Remapped`] interrupt to whatever models
//! the APICs. Posted interrupts (IRTE IM = 1, VT-d 9.11) are not implemented (ECAP.PI = 0).
//! Like the rest of the hardware model this is plain synchronous Rust: `Send + Sync`, every
//! method takes `&self`, nothing blocks beyond a per-set cache lock.
//!
//! The policies, in the order a request meets them (VT-d 5.1.4, 5.1.4.1):
//! 1. IRE off: every interrupt request passes through unremapped, decoded from the
//!    compatibility format (a remappable-format message then carries meaningless fields,
//!    as on hardware). A message that cannot be delivered (not in 0xFEEx_xxxx, reserved
//!    delivery mode) is refused with 0x20 and `fpd = true`: remapping is off, so it is not
//!    a recordable fault.
//! 2. Address bits 63:32 nonzero, or bits 31:20 not 0xFEE: 0x20.
//! 3. Compatibility format (address bit 4 = 0): passed through (decoded as in 1) when
//!    GSTS.CFIS = 1 and IRTA.EIME = 0; blocked with 0x25 otherwise: VT-d 5.1.4 blocks
//!    compatibility-format interrupts in x2APIC mode whatever CFI says.
//! 4. Remappable format: with SHV, data bits 31:16 must be 0 (0x20) and the subhandle
//!    `data[15:0]` is added to the handle. An index at or above 2^(S+1) faults with 0x21.
//! 5. The IRTE comes from the interrupt entry cache, or from memory at IRTA + 16 × index
//!    (0x23 if it cannot be read, or if IRE is on with no table ever latched).
//! 6. P clear: 0x22. Reserved bits (including IM = 1, SVT = 11b, reserved DLM encodings and,
//!    in xAPIC mode, DST bits other than 15:8): 0x24. Source-id verification fails: 0x26.
//!    These three are qualified: the IRTE's FPD suppresses their recording.
//!
//! Caching (VT-d "Interrupt Entry Cache"; invalidation VT-d 6.5.2.7): only present,
//! reserved-clean IRTEs are cached, so a fault never needs an invalidation to clear. A
//! changed IRTE stays invisible until software invalidates its index, or the aligned block
//! of 2^IM indices holding it: the unit advertises ECAP.MHMV = 15 (`regs::MHMV`), so the
//! block of a multi-vector MSI (handle plus subhandles, step 4) goes in one descriptor. A new table latched
//! by SIRTP does not flush the cache either (this unit reports CAP.ESIRTPS = 0): software
//! must follow SIRTP with a global IEC invalidation, as Linux does. With
//! `InterruptRemapper::with_stale_detection` every hit re-reads the IRTE and counts
//! uses of entries that no longer match memory.
//!
//! An IRTE is two 64-bit words and host memory is atomic per word, so software that
//! rewrites a present entry while interrupts arrive can be seen half-written; real software
//! updates present IRTEs with one 128-bit store (Linux `modify_irte`), which this model
//! cannot offer, or clears P first.

mod entry_cache;
pub mod irte;
pub mod msi;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::ids::SourceId;
use crate::unit::cache::{CacheGeometry, InvalidGeometry};
use crate::unit::fault_reason::FaultReason;
use crate::unit::memory::HostMemory;
use crate::unit::stats::Counter;

use entry_cache::InterruptEntryCache;
pub use irte::{
    ApicMode, DeliveryMode, DestinationMode, IRTE_BYTES, Irta, Irte, SourceQualifier, SourceValidation, Trigger,
};
use msi::RemappableMsi;
use msi::is_interrupt_address;
pub use msi::{msi_compatibility, msi_remappable};

/// Interrupt entry cache geometry of [`InterruptRemapper::default`]: 64 sets × 4 ways.
pub(crate) const DEFAULT_IEC_GEOMETRY: CacheGeometry = CacheGeometry::new(64, 4);

/// The interrupt remapping fault reasons, 0x20..=0x26, in code order.
#[cfg(test)]
pub(crate) const IR_FAULT_REASONS: [FaultReason; 7] = [
    FaultReason::IrRequestReserved,
    FaultReason::IrIndexOverflow,
    FaultReason::IrEntryNotPresent,
    FaultReason::IrTableAccess,
    FaultReason::IrEntryReserved,
    FaultReason::IrCompatBlocked,
    FaultReason::IrSourceId,
];

/// The interrupt a request delivers, as the APICs receive it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Remapped {
    /// The vector.
    pub vector: u8,
    /// The destination APIC id: 8 bits in xAPIC mode and for compatibility-format
    /// pass-through, 32 bits in x2APIC mode.
    pub destination: u32,
    /// How the interrupt is delivered.
    pub delivery_mode: DeliveryMode,
    /// Edge or level.
    pub trigger: Trigger,
    /// Physical or logical destination.
    pub destination_mode: DestinationMode,
    /// The redirection hint.
    pub redirection_hint: bool,
    /// The IRTE the interrupt went through; `None` when it was passed through unremapped.
    pub index: Option<u16>,
}

/// Why an interrupt request was blocked. The remapper records nothing itself: the caller
/// records the fault when [`IrFault::should_record`] says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("interrupt request blocked: {reason}")]
pub struct IrFault {
    /// One of the interrupt remapping reasons 0x20..=0x26.
    pub reason: FaultReason,
    /// The interrupt index the request named, when it could be decoded (the fault record
    /// carries it in `FI[63:48]`).
    pub index: Option<u16>,
    /// Fault processing disabled: do not record. Set when the IRTE that raised a qualified
    /// fault (0x22, 0x24, 0x26) has FPD set, and for messages remapping never owned (IRE
    /// off, or compatibility-format pass-through) that could not be delivered.
    pub fpd: bool,
}

impl IrFault {
    const fn new(reason: FaultReason, index: Option<u16>) -> Self {
        Self { reason, index, fpd: false }
    }

    /// A qualified fault raised through `irte` at `index`: its FPD decides recording
    /// (VT-d 9.10 FPD).
    const fn through(reason: FaultReason, index: u16, irte: Irte) -> Self {
        Self { reason, index: Some(index), fpd: irte.fpd() }
    }

    /// Whether the fault goes into a fault recording register.
    pub const fn should_record(&self) -> bool {
        !self.fpd
    }

    /// The low qword of the fault record's FI field: the interrupt index in bits 63:48,
    /// zero when there is none (VT-d 10.4.14, FRCD_REG.FI).
    pub const fn fault_info(&self) -> u64 {
        match self.index {
            Some(i) => (i as u64) << 48,
            None => 0,
        }
    }
}

/// An interrupt entry cache invalidation (IEC descriptor, VT-d 6.5.2.7): what the queued
/// invalidation's type-4 descriptor carries, and what the remapper drops for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IecInvalidation {
    /// G = 0: every cached entry.
    Global,
    /// G = 1: 2^`index_mask` entries from `index` rounded down to that alignment.
    Index {
        /// IIDX: an index in the block.
        index: u16,
        /// IM: log2 of the number of entries (16 or more covers every index).
        index_mask: u8,
    },
}

/// A snapshot of the remapper's counters.
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) struct InterruptStats {
    /// Requests remapped through an IRTE.
    pub(crate) remapped: u64,
    /// Requests passed through unremapped (IRE off, or allowed compatibility format).
    pub(crate) passed_through: u64,
    /// Requests blocked, by reason: element `i` counts reason 0x20 + `i`.
    pub(crate) blocked: [u64; 7],
    /// Interrupt entry cache hits.
    pub(crate) cache_hits: u64,
    /// Interrupt entry cache misses (IRTEs read from memory).
    pub(crate) cache_misses: u64,
    /// Fills refused because an invalidation ran while the IRTE was read.
    pub(crate) cache_fills_refused: u64,
    /// Cache hits whose entry no longer matched memory (with stale detection on).
    pub(crate) stale_hits: u64,
    /// IEC invalidations performed.
    pub(crate) invalidations: u64,
}

#[cfg(test)]
impl InterruptStats {
    /// Requests blocked with `reason` (0 for a reason that is not an interrupt one).
    pub(crate) fn blocked_by(&self, reason: FaultReason) -> u64 {
        reason_slot(reason).and_then(|i| self.blocked.get(i).copied()).unwrap_or(0)
    }

    /// Requests blocked for any reason.
    pub(crate) fn blocked_total(&self) -> u64 {
        self.blocked.iter().sum()
    }
}

fn reason_slot(reason: FaultReason) -> Option<usize> {
    reason.code().checked_sub(FaultReason::IrRequestReserved.code()).map(usize::from).filter(|&i| i < 7)
}

#[derive(Debug, Default)]
struct Counters {
    remapped: Counter,
    passed_through: Counter,
    blocked: [Counter; 7],
    cache_hits: Counter,
    cache_misses: Counter,
    cache_fills_refused: Counter,
    stale_hits: Counter,
    invalidations: Counter,
}

/// IRTA value meaning "no table latched yet": a latched value never has bits 10:4 set.
const NO_TABLE: u64 = u64::MAX;

/// The interrupt-remapping hardware of one unit (VT-d 5.1). See the module docs for the
/// rules it applies.
#[derive(Debug)]
pub(crate) struct InterruptRemapper {
    /// The IRTA latched by the last SIRTP, or [`NO_TABLE`].
    irta: AtomicU64,
    /// GSTS.IRES.
    enabled: AtomicBool,
    /// GSTS.CFIS.
    compat_allowed: AtomicBool,
    stale_detection: bool,
    cache: InterruptEntryCache,
    counters: Counters,
}

impl Default for InterruptRemapper {
    /// Reset state, with a [`DEFAULT_IEC_GEOMETRY`] entry cache and stale detection off.
    fn default() -> Self {
        Self::with_geometry(DEFAULT_IEC_GEOMETRY)
    }
}

impl InterruptRemapper {
    /// A remapper in its reset state (IRE and CFI off, no table) whose interrupt entry cache
    /// has `geometry`.
    pub(crate) fn new(geometry: CacheGeometry) -> Result<Self, InvalidGeometry> {
        geometry.validate()?;
        Ok(Self::with_geometry(geometry))
    }

    fn with_geometry(geometry: CacheGeometry) -> Self {
        Self {
            irta: AtomicU64::new(NO_TABLE),
            enabled: AtomicBool::new(false),
            compat_allowed: AtomicBool::new(false),
            stale_detection: false,
            cache: InterruptEntryCache::new(geometry),
            counters: Counters::default(),
        }
    }

    /// Turns stale-use detection on or off. On, every cache hit costs two extra memory
    /// loads.
    pub(crate) fn with_stale_detection(mut self, on: bool) -> Self {
        self.stale_detection = on;
        self
    }

    /// SIRTP: latches the IRTA register value `irta` (base, EIME, S; reserved bits 10:4 are
    /// dropped). Cached entries are kept: software must invalidate the IEC globally after
    /// SIRTP (no ESIRTPS).
    pub(crate) fn set_table(&self, irta: u64) {
        self.irta.store(Irta::from_bits(irta).to_bits(), Ordering::Release);
    }

    /// The table latched by the last SIRTP, if any (GSTS.IRTPS).
    pub(crate) fn table(&self) -> Option<Irta> {
        match self.irta.load(Ordering::Acquire) {
            NO_TABLE => None,
            v => Some(Irta::from_bits(v)),
        }
    }

    /// GCMD.IRE: turns interrupt remapping on or off.
    pub(crate) fn enable(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
    }

    /// GSTS.IRES.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// GCMD.CFI: whether compatibility-format interrupts pass through while remapping is
    /// on (only in xAPIC mode; VT-d 5.1.4).
    pub(crate) fn set_compat_allowed(&self, cfi: bool) {
        self.compat_allowed.store(cfi, Ordering::Release);
    }

    /// GSTS.CFIS.
    pub(crate) fn compat_allowed(&self) -> bool {
        self.compat_allowed.load(Ordering::Acquire)
    }

    /// Back to the reset state: remapping and CFI off (GSTS.IRES, CFIS), no table latched
    /// (IRTPS), the cache empty. Remapping goes off first; the global invalidation then
    /// bumps the cache epoch, so a remap that read an IRTE before cannot fill it after.
    /// The counters are kept.
    pub(crate) fn reset(&self) {
        self.enable(false);
        self.set_compat_allowed(false);
        self.irta.store(NO_TABLE, Ordering::Release);
        self.invalidate(IecInvalidation::Global);
    }

    /// Remaps the interrupt request `sid` made by writing `data` to `addr`.
    pub(crate) fn remap(&self, mem: &HostMemory, sid: SourceId, addr: u64, data: u32) -> Result<Remapped, IrFault> {
        let result = self.remap_inner(mem, sid, addr, data);
        match &result {
            Ok(r) if r.index.is_some() => self.counters.remapped.inc(),
            Ok(_) => self.counters.passed_through.inc(),
            Err(f) => {
                if let Some(c) = reason_slot(f.reason).and_then(|i| self.counters.blocked.get(i)) {
                    c.inc();
                }
            }
        }
        result
    }

    fn remap_inner(&self, mem: &HostMemory, sid: SourceId, addr: u64, data: u32) -> Result<Remapped, IrFault> {
        if !self.enabled() {
            return pass_through(addr, data);
        }
        // VT-d 5.1.4.1 (0x20): an interrupt request is a DWORD write below 4 GiB to
        // 0xFEEx_xxxx (QEMU `vtd_interrupt_remap_msi` checks the same).
        if addr >> 32 != 0 || !is_interrupt_address(addr) {
            return Err(IrFault::new(FaultReason::IrRequestReserved, None));
        }
        let table = self.table();
        if !msi::is_remappable(addr) {
            // VT-d 5.1.4: compatibility format is blocked when EIME = 1 or CFIS = 0.
            let x2apic = table.is_some_and(|t| t.mode() == ApicMode::X2Apic);
            if self.compat_allowed() && !x2apic {
                return pass_through(addr, data);
            }
            return Err(IrFault::new(FaultReason::IrCompatBlocked, None));
        }
        // VT-d 5.1.2.2: with SHV, data[31:16] is reserved (0x20).
        let request = RemappableMsi::decode(addr, data)
            .map_err(|handle| IrFault::new(FaultReason::IrRequestReserved, Some(handle)))?;
        let wide_index = request.index();
        // The index as the fault record can hold it (16 bits); only an out-of-range index
        // can be wider.
        let index = wide_index as u16;
        let Some(table) = table else {
            return Err(IrFault::new(FaultReason::IrTableAccess, Some(index)));
        };
        if wide_index >= table.entries() {
            return Err(IrFault::new(FaultReason::IrIndexOverflow, Some(index)));
        }
        let mode = table.mode();
        let irte = self.entry(mem, table, index)?;
        // VT-d 9.10: P comes first; with P clear no other field is checked, but the
        // fault is qualified, so FPD still decides whether it is recorded.
        if !irte.present() {
            return Err(IrFault::through(FaultReason::IrEntryNotPresent, index, irte));
        }
        if irte.reserved_bits(mode) {
            return Err(IrFault::through(FaultReason::IrEntryReserved, index, irte));
        }
        // `reserved_bits` rejected SVT = 11b and reserved DLM encodings already.
        let reserved = IrFault::through(FaultReason::IrEntryReserved, index, irte);
        let validation = irte.source_validation().ok_or(reserved)?;
        let delivery_mode = irte.delivery_mode().ok_or(reserved)?;
        // VT-d 9.10 SVT/SQ/SID.
        if !validation.admits(sid) {
            return Err(IrFault::through(FaultReason::IrSourceId, index, irte));
        }
        Ok(Remapped {
            vector: irte.vector(),
            destination: irte.destination(mode),
            delivery_mode,
            trigger: irte.trigger(),
            destination_mode: irte.destination_mode(),
            redirection_hint: irte.redirection_hint(),
            index: Some(index),
        })
    }

    /// The IRTE for `index`: cached, or read from the table and cached when usable.
    fn entry(&self, mem: &HostMemory, table: Irta, index: u16) -> Result<Irte, IrFault> {
        // The epoch is taken before the lookup and the memory read, so an invalidation that
        // completes after either refuses the fill.
        let epoch = self.cache.epoch();
        if let Some(irte) = self.cache.lookup(index) {
            self.counters.cache_hits.inc();
            if self.stale_detection && read_irte(mem, table, index).is_some_and(|now| now != irte) {
                self.counters.stale_hits.inc();
            }
            return Ok(irte);
        }
        self.counters.cache_misses.inc();
        // VT-d 5.1.4.1 (0x23): the table cannot be read.
        let irte = read_irte(mem, table, index).ok_or(IrFault::new(FaultReason::IrTableAccess, Some(index)))?;
        if irte.present() && !irte.reserved_bits(table.mode()) && !self.cache.fill(index, irte, epoch) {
            self.counters.cache_fills_refused.inc();
        }
        Ok(irte)
    }

    /// Performs an IEC invalidation; returns how many cached entries were dropped. When it
    /// returns, no remap that read the table before it was called can still fill the cache.
    pub(crate) fn invalidate(&self, inv: IecInvalidation) -> usize {
        self.counters.invalidations.inc();
        match inv {
            IecInvalidation::Global => self.cache.invalidate_all(),
            IecInvalidation::Index { index, index_mask } => self.cache.invalidate_indices(index, index_mask),
        }
    }

    /// Entries the interrupt entry cache holds.
    #[cfg(test)]
    pub(crate) fn cached_entries(&self) -> usize {
        self.cache.len()
    }

    /// A snapshot of the counters.
    #[cfg(test)]
    pub(crate) fn stats(&self) -> InterruptStats {
        let c = &self.counters;
        InterruptStats {
            remapped: c.remapped.get(),
            passed_through: c.passed_through.get(),
            blocked: c.blocked.each_ref().map(Counter::get),
            cache_hits: c.cache_hits.get(),
            cache_misses: c.cache_misses.get(),
            cache_fills_refused: c.cache_fills_refused.get(),
            stale_hits: c.stale_hits.get(),
            invalidations: c.invalidations.get(),
        }
    }
}

/// An unremapped interrupt, decoded from the compatibility format.
fn pass_through(addr: u64, data: u32) -> Result<Remapped, IrFault> {
    msi::decode_compatibility(addr, data).ok_or(IrFault {
        reason: FaultReason::IrRequestReserved,
        index: None,
        fpd: true,
    })
}

/// Reads IRTE `index` of `table`; `None` when any of it lies outside memory.
fn read_irte(mem: &HostMemory, table: Irta, index: u16) -> Option<Irte> {
    let at = Irte::address(table.base(), u32::from(index))?;
    let lo = mem.read_u64(at).ok()?;
    let hi = mem.read_u64(at.checked_add(8)?).ok()?;
    Some(Irte::from_bits(lo, hi))
}
