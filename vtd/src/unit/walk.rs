//! Finding a translation: the context lookup (VT-d 3.4.2-3.4.3) and the second-stage page
//! walk (VT-d 3.7), both through the unit's caches.
//!
//! Owns the order of checks and the fault reason each failed check yields. The rules,
//! with the spec and QEMU (`vtd_dev_to_context_entry`, `vtd_iova_to_slpte`) as references:
//! - root table beyond memory: 0x08; root entry P clear: 0x01; root reserved bits: 0x0A;
//! - context table beyond memory: 0x09; context P clear: 0x02 (FPD is honoured even then,
//!   as QEMU does); context reserved bits: 0x0B; TT=11b or an AW the unit does not
//!   support (SAGAW): 0x03;
//! - input address beyond the context's AW: 0x04;
//! - a paging entry beyond memory: 0x07; reserved bits in a paging entry: 0x0C;
//! - a not-present entry, or missing permission: 0x06 for reads, 0x05 for writes.
//!
//! A walk does not decide whether a request may proceed: it returns the cumulative
//! permissions and the request layer applies them (translation requests report R=W=0
//! rather than faulting).

use std::sync::atomic::Ordering;

use super::Unit;
use super::cache::context::CachedContext;
use super::cache::iotlb::IotlbEntry;
use super::cache::paging::PagingEntry;
use super::fault::WALK_SAMPLE_PERIOD;
use super::fault_reason::FaultReason;
use super::tables::{AddressWidth, ContextEntry, RootEntry, SlPte, TranslationType, level_index, level_shift};
use crate::ids::{DomainId, Hpa, Iova, SourceId};

/// A decoded, valid context entry.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Context {
    pub(crate) did: DomainId,
    pub(crate) tt: TranslationType,
    pub(crate) aw: Option<AddressWidth>,
    pub(crate) table: Hpa,
    pub(crate) fpd: bool,
}

/// A failed check, with the FPD of the context entry when one was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fault {
    pub(crate) reason: FaultReason,
    pub(crate) fpd: bool,
}

impl Fault {
    fn unqualified(reason: FaultReason) -> Self {
        Self { reason, fpd: false }
    }
}

/// The leaf a walk (or an IOTLB hit) found for an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Leaf {
    /// Output address of the first byte of the page (meaningless without permissions).
    pub(crate) frame: Hpa,
    /// log2 of the page size.
    pub(crate) shift: u32,
    pub(crate) read: bool,
    pub(crate) write: bool,
}

impl Leaf {
    /// Nothing mapped: a not-present entry on the way.
    const NONE: Leaf = Leaf { frame: Hpa(0), shift: 12, read: false, write: false };
}

/// Decodes a context entry read from memory (or a cached one).
fn decode(entry: ContextEntry) -> Result<Context, Fault> {
    let fpd = entry.fault_processing_disabled();
    if !entry.present() {
        return Err(Fault { reason: FaultReason::ContextEntryNotPresent, fpd });
    }
    if entry.reserved_bits() {
        return Err(Fault { reason: FaultReason::ContextEntryReserved, fpd });
    }
    let tt =
        TranslationType::from_bits(entry.tt_bits()).ok_or(Fault { reason: FaultReason::ContextEntryInvalid, fpd })?;
    // The AW field only matters when the second stage is walked.
    let aw = AddressWidth::from_bits(entry.aw_bits());
    if tt != TranslationType::PassThrough && aw.is_none() {
        return Err(Fault { reason: FaultReason::ContextEntryInvalid, fpd });
    }
    Ok(Context { did: entry.domain(), tt, aw, table: entry.second_level_table(), fpd })
}

impl Unit {
    /// The context for `sid`, from the context cache or from the root and context tables.
    /// `epoch` is the invalidation epoch read when the request started.
    #[inline]
    pub(crate) fn context(&self, sid: SourceId, epoch: u64) -> Result<Context, Fault> {
        if let Some(cached) = self.context_cache.lookup(sid) {
            self.counters.context_hits.inc();
            if self.config.stale_detection {
                let now = self.read_context_entry(cached.entry_addr);
                if now != Some(cached.entry) {
                    self.counters.stale_context_uses.inc();
                    tracing::debug!(%sid, "stale context-cache entry used: the context entry changed without invalidation");
                }
            }
            return decode(cached.entry);
        }
        self.counters.context_misses.inc();
        let (entry, entry_addr) = self.fetch_context(sid)?;
        let ctx = decode(entry)?;
        self.context_cache.fill(sid, CachedContext { entry, entry_addr }, || self.epoch_is(epoch));
        Ok(ctx)
    }

    fn read_context_entry(&self, addr: Hpa) -> Option<ContextEntry> {
        let lo = self.memory.read_u64(addr).ok()?;
        let hi = self.memory.read_u64(Hpa(addr.0 + 8)).ok()?;
        Some(ContextEntry::from_bits(lo, hi))
    }

    /// Reads the root and context entries for `sid` (VT-d 3.4.2).
    fn fetch_context(&self, sid: SourceId) -> Result<(ContextEntry, Hpa), Fault> {
        let root_table = self.root_table.load(Ordering::Acquire);
        let root_addr = Hpa(root_table + u64::from(sid.bus()) * 16);
        let (Ok(lo), Ok(hi)) = (self.memory.read_u64(root_addr), self.memory.read_u64(Hpa(root_addr.0 + 8))) else {
            return Err(Fault::unqualified(FaultReason::RootTableInvalid));
        };
        let root = RootEntry::from_bits(lo, hi);
        if !root.present() {
            return Err(Fault::unqualified(FaultReason::RootEntryNotPresent));
        }
        if root.reserved_bits() {
            return Err(Fault::unqualified(FaultReason::RootEntryReserved));
        }
        let entry_addr = Hpa(root.context_table().0 + u64::from(sid.devfn()) * 16);
        let entry = self.read_context_entry(entry_addr).ok_or(Fault::unqualified(FaultReason::ContextTableInvalid))?;
        Ok((entry, entry_addr))
    }

    /// The leaf translation of `iova` in `ctx` (second-stage only; not for pass-through),
    /// from the IOTLB or by walking. Checks the address width first.
    #[inline]
    pub(crate) fn second_stage(&self, ctx: &Context, iova: Iova, epoch: u64) -> Result<Leaf, Fault> {
        let aw = ctx.aw.ok_or(Fault { reason: FaultReason::ContextEntryInvalid, fpd: ctx.fpd })?;
        if !aw.covers(iova) {
            return Err(Fault { reason: FaultReason::AddressBeyondWidth, fpd: ctx.fpd });
        }
        if let Some((e, level)) = self.iotlb.lookup(ctx.did, iova) {
            self.counters.iotlb_hits.inc();
            if self.config.stale_detection && self.memory.read_u64(e.pte_addr).ok() != Some(e.pte) {
                self.counters.stale_iotlb_uses.inc();
                tracing::debug!(did = ctx.did.0, %iova, "stale IOTLB entry used: the page-table entry changed without invalidation");
            }
            return Ok(Leaf { frame: e.frame, shift: level_shift(level), read: e.read, write: e.write });
        }
        self.counters.iotlb_misses.inc();
        self.walk(ctx, aw, iova, epoch)
    }

    /// Walks the second-stage tables, timing one walk in `WALK_SAMPLE_PERIOD` per thread.
    fn walk(&self, ctx: &Context, aw: AddressWidth, iova: Iova, epoch: u64) -> Result<Leaf, Fault> {
        thread_local! {
            static COUNTDOWN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
        }
        let sample = COUNTDOWN.with(|c| {
            let v = c.get();
            c.set(if v == 0 { WALK_SAMPLE_PERIOD - 1 } else { v - 1 });
            v == 0
        });
        if !sample {
            return self.walk_tables(ctx, aw, iova, epoch);
        }
        let start = self.clock.now();
        let r = self.walk_tables(ctx, aw, iova, epoch);
        self.events.walk_sampled(self.clock.now().saturating_duration_since(start));
        r
    }

    /// Walks the second-stage tables from the deepest cached table (VT-d 3.7.1).
    fn walk_tables(&self, ctx: &Context, aw: AddressWidth, iova: Iova, epoch: u64) -> Result<Leaf, Fault> {
        self.counters.walks.inc();
        let fault = |reason| Fault { reason, fpd: ctx.fpd };
        let (mut level, mut table, mut read, mut write) = match self.paging_cache.lookup(ctx.did, iova, aw.levels()) {
            Some((level, e)) => {
                self.counters.paging_hits.inc();
                (level, e.table, e.read, e.write)
            }
            None => {
                self.counters.paging_misses.inc();
                (aw.levels(), ctx.table, true, true)
            }
        };
        let mut loads = 0;
        let leaf = loop {
            let pte_addr = Hpa(table.0 + level_index(iova, level) * 8);
            loads += 1;
            let bits = self.memory.read_u64(pte_addr).map_err(|_| fault(FaultReason::PagingEntryAccess))?;
            let pte = SlPte::from_bits(bits);
            if !pte.present() {
                break Leaf::NONE;
            }
            if pte.reserved_bits(level) {
                self.counters.walk_loads.add(loads);
                return Err(fault(FaultReason::PagingEntryReserved));
            }
            read &= pte.readable();
            write &= pte.writable();
            if level == 1 || pte.superpage() {
                let shift = level_shift(level);
                let leaf = Leaf { frame: pte.addr(), shift, read, write };
                if read || write {
                    let entry = IotlbEntry { frame: leaf.frame, read, write, pte_addr, pte: bits };
                    self.iotlb.fill(ctx.did, iova, level, entry, || self.epoch_is(epoch));
                }
                break leaf;
            }
            if !(read || write) {
                break Leaf::NONE;
            }
            table = pte.addr();
            level -= 1;
            let entry = PagingEntry { table, read, write };
            self.paging_cache.fill(ctx.did, iova, level, entry, || self.epoch_is(epoch));
        };
        self.counters.walk_loads.add(loads);
        Ok(leaf)
    }
}
