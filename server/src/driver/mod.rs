//! The driver model: the software that programs the remapping unit, after the Linux
//! intel-iommu driver (`drivers/iommu/intel/iommu.c`).
//!
//! It owns everything a kernel driver owns: the table memory (`frames`), the root and
//! context tables (`context`), protection domains and their ids (`domain`), the
//! second-stage page tables (`pagetable`), and the invalidation each change needs
//! (`invalidate`, through the register interface in `registers`). It talks to the unit only
//! through registers and host memory, exactly as a real driver would, so whatever it gets
//! wrong shows up as faults or stale translations in the unit.
//!
//! It does not translate DMA (the unit does), does not know about the network, and does
//! not yet do queued invalidation, device-TLB invalidation or deferred flushing: those
//! plug in at [`FlushPolicy`] and `invalidate`.
//!
//! Locking: the context tables and attachments sit behind one lock; each domain's page
//! tables behind its own, so map/unmap on different domains run in parallel; the register
//! interface behind a third (a flush is a multi-register handshake). Order: context, then
//! the domain registry, then a domain, then the registers.

mod context;
mod domain;
mod error;
mod frames;
mod invalidate;
mod pagetable;
mod registers;

use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tracing::debug;

use self::context::{Attachment, ContextTables};
use self::domain::{Domain, Domains};
pub use self::error::{AddressField, DriverError};
use self::frames::FrameAllocator;
use self::invalidate::{ContextScope, IotlbScope, page_scope};
use self::pagetable::PageTable;
use self::registers::{Capabilities, Registers};
use crate::ids::{DomainId, Hpa, Iova, PAGE_SIZE, SourceId};
use crate::unit::Unit;
use crate::unit::memory::HostMemory;
use crate::unit::tables::{AddressWidth, ContextEntry, TranslationType};

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

/// When the driver invalidates after an unmap.
///
/// Only `Strict` exists yet: every unmap flushes before it returns. Deferred flushing
/// (Linux flush queues) and device-TLB invalidation for ATS devices plug in here.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
#[non_exhaustive]
pub enum FlushPolicy {
    /// Flush the IOTLB and paging-structure caches before unmap returns.
    #[default]
    Strict,
}

/// How the driver is set up.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DriverConfig {
    /// `(base, len)` of host memory reserved for root, context and page tables. Mappings
    /// may not target it.
    pub table_region: (Hpa, u64),
    /// Invalidation policy.
    pub flush: FlushPolicy,
}

impl DriverConfig {
    /// The top eighth of a memory of `size` bytes, at most [`MAX_TABLE_REGION`], page
    /// aligned, with strict flushing.
    pub fn for_memory(size: u64) -> Self {
        let end = size & !(PAGE_SIZE - 1);
        let len = (size / 8).min(MAX_TABLE_REGION) & !(PAGE_SIZE - 1);
        Self { table_region: (Hpa(end - len), len), flush: FlushPolicy::Strict }
    }
}

/// The driver for one remapping unit.
pub struct Driver {
    unit: Arc<Unit>,
    memory: Arc<HostMemory>,
    regs: Registers,
    caps: Capabilities,
    frames: FrameAllocator,
    flush: FlushPolicy,
    context: Mutex<ContextTables>,
    domains: RwLock<Domains>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("caps", &self.caps)
            .field("table_region", &self.frames.region())
            .field("table_frames_in_use", &self.frames.in_use())
            .field("flush", &self.flush)
            .finish_non_exhaustive()
    }
}

/// Checks a map/unmap range: non-empty, page aligned, no 64-bit overflow. Returns its end.
fn check_range(iova: Iova, len: u64) -> Result<u64, DriverError> {
    if len == 0 {
        return Err(DriverError::ZeroLength);
    }
    if !iova.is_page_aligned() {
        return Err(DriverError::Unaligned { field: AddressField::Iova, value: iova.0 });
    }
    if !len.is_multiple_of(PAGE_SIZE) {
        return Err(DriverError::Unaligned { field: AddressField::Len, value: len });
    }
    iova.0.checked_add(len).ok_or(DriverError::Overflow)
}

/// Checks that `[iova, end)` fits the domain's width (VT-d 3.6: the AGAW).
fn check_width(aw: AddressWidth, iova: Iova, end: u64) -> Result<(), DriverError> {
    let limit = 1u64 << aw.bits();
    if end > limit {
        return Err(DriverError::BeyondWidth { iova: Iova(iova.0.max(limit)), width_bits: aw.bits() });
    }
    Ok(())
}

impl Driver {
    /// Takes over `unit`: allocates the root table, points the unit at it, flushes the
    /// context cache and IOTLB globally and enables translation (Linux `init_dmars`:
    /// `iommu_set_root_entry`, the global flushes, `iommu_enable_translation`).
    pub fn new(unit: Arc<Unit>, config: DriverConfig) -> Result<Driver, DriverError> {
        let memory = unit.memory().clone();
        let (base, len) = config.table_region;
        let frames = FrameAllocator::new(memory.clone(), base, len)?;
        let regs = Registers::new(unit.clone());
        let caps = regs.capabilities()?;
        let context = ContextTables::new(&frames)?;
        regs.set_root_table(context.root())?;
        // VT-d 6.5.3.3 / 11.4.4: after setting the root table pointer, software must
        // invalidate the context cache and then the IOTLB globally.
        regs.flush_context(ContextScope::Global)?;
        regs.flush_iotlb(IotlbScope::Global, caps.read_drain, caps.write_drain)?;
        regs.enable_translation()?;
        debug!(root = %context.root(), "remapping unit enabled");
        Ok(Driver {
            unit,
            memory,
            regs,
            caps,
            frames,
            flush: config.flush,
            context: Mutex::new(context),
            domains: RwLock::new(Domains::default()),
        })
    }

    /// The unit this driver programs.
    pub fn unit(&self) -> &Arc<Unit> {
        &self.unit
    }

    /// Page-table frames in use (root, context and page tables): for tests and metrics.
    pub fn table_frames_in_use(&self) -> usize {
        self.frames.in_use()
    }

    fn domain(&self, did: DomainId) -> Result<Arc<Domain>, DriverError> {
        self.domains.read().map.get(&did).cloned().ok_or(DriverError::UnknownDomain(did))
    }

    /// Creates a domain and returns its id (the lowest free id in 1..=0xffff).
    pub fn create_domain(&self, kind: DomainKind, aw: AddressWidth) -> Result<DomainId, DriverError> {
        if !self.caps.supports(aw) {
            return Err(DriverError::UnsupportedWidth(aw));
        }
        if kind == DomainKind::Identity && !self.caps.pass_through {
            return Err(DriverError::PassThroughUnsupported);
        }
        let tables = match kind {
            DomainKind::Paging => Some(PageTable::new(&self.frames, aw)?),
            DomainKind::Blocked | DomainKind::Identity => None,
        };
        let mut domains = self.domains.write();
        let Some(did) = domains.ids.alloc() else {
            drop(domains);
            if let Some(t) = tables {
                self.frames.free(t.top());
            }
            return Err(DriverError::DomainIdsExhausted);
        };
        domains.map.insert(did, Arc::new(Domain::new(kind, aw, tables)));
        debug!(domain = did.0, ?kind, ?aw, "domain created");
        Ok(did)
    }

    /// Destroys a domain with no devices attached, freeing all its table frames.
    pub fn destroy_domain(&self, did: DomainId) -> Result<(), DriverError> {
        let ctx = self.context.lock();
        let devices = ctx.attached(did).count();
        if devices != 0 {
            return Err(DriverError::DomainInUse { did, devices });
        }
        let domain = self.domains.write().map.remove(&did).ok_or(DriverError::UnknownDomain(did))?;
        let mut state = domain.state.lock();
        state.alive = false;
        let mut retired = Vec::new();
        if let Some(t) = state.tables.take() {
            t.collect_frames(&self.memory, &mut retired);
            // Detach already flushed this domain; flush once more before its tables
            // and its id are reused, in case a walk raced with the last detach.
            self.flush_iotlb(IotlbScope::Domain(did))?;
        }
        drop(state);
        self.frames.free_all(retired);
        self.domains.write().ids.release(did);
        drop(ctx);
        debug!(domain = did.0, "domain destroyed");
        Ok(())
    }

    /// The kind and address width of a domain.
    pub fn domain_info(&self, did: DomainId) -> Option<(DomainKind, AddressWidth)> {
        self.domain(did).ok().map(|d| (d.kind, d.aw))
    }

    /// Ids of every live domain, ascending.
    pub fn domains(&self) -> Vec<DomainId> {
        let mut ids: Vec<DomainId> = self.domains.read().map.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Attaches a device to a domain by writing its context entry (Linux
    /// `domain_context_mapping_one`). A device attached elsewhere is detached first.
    ///
    /// Paging: TT=01b when the device uses ATS, else 00b, SLPTPTR = the domain's top
    /// table, AW = its width. Identity: TT=10b (pass-through). Blocked: the entry stays
    /// not present, so every request faults.
    pub fn attach(&self, sid: SourceId, did: DomainId, ats: bool) -> Result<(), DriverError> {
        let mut ctx = self.context.lock();
        // Looked up under the context lock: destroy holds it too, so the domain cannot go
        // away between here and the entry write.
        let domain = self.domain(did)?;
        let wanted = Attachment { did, ats };
        if ctx.devices.get(&sid) == Some(&wanted) {
            return Ok(());
        }
        self.detach_locked(&mut ctx, sid)?;
        let entry = match domain.kind {
            DomainKind::Blocked => None,
            DomainKind::Identity => {
                Some(ContextEntry::new(did, TranslationType::PassThrough, domain.aw, Hpa(0), false))
            }
            DomainKind::Paging => {
                let tt = if ats { TranslationType::DeviceTlb } else { TranslationType::Untranslated };
                let top = domain.top.ok_or(DriverError::NotPaging(did))?;
                Some(ContextEntry::new(did, tt, domain.aw, top, false))
            }
        };
        if let Some(entry) = entry {
            ctx.install(&self.memory, &self.frames, sid, entry)?;
        }
        ctx.devices.insert(sid, wanted);
        debug!(sid = %sid, domain = did.0, ats, "device attached");
        Ok(())
    }

    /// Detaches a device: clears its context entry and flushes. Returns the domain it was
    /// attached to, or `None` if it was not attached.
    pub fn detach(&self, sid: SourceId) -> Result<Option<DomainId>, DriverError> {
        let mut ctx = self.context.lock();
        self.detach_locked(&mut ctx, sid)
    }

    fn detach_locked(&self, ctx: &mut ContextTables, sid: SourceId) -> Result<Option<DomainId>, DriverError> {
        let Some(att) = ctx.devices.remove(&sid) else {
            return Ok(None);
        };
        let old = ctx.clear(&self.memory, sid)?;
        if old.present() {
            // VT-d 6.5.3.3 (Linux `domain_context_clear_one`): device-selective
            // context-cache invalidation tagged with the old DID, then a domain-selective
            // IOTLB flush of the old domain. (Device-TLB flushes for ATS devices belong
            // here once the device port exists.)
            let old_did = old.domain();
            self.regs.flush_context(ContextScope::Device { sid, did: old_did })?;
            self.flush_iotlb(IotlbScope::Domain(old_did))?;
        }
        debug!(sid = %sid, domain = att.did.0, "device detached");
        Ok(Some(att.did))
    }

    /// The devices attached to a domain, ascending (empty for an unknown domain).
    pub fn attached(&self, did: DomainId) -> Vec<SourceId> {
        self.context.lock().attached(did).collect()
    }

    /// The domain a device is attached to.
    pub fn domain_of(&self, sid: SourceId) -> Option<DomainId> {
        self.context.lock().devices.get(&sid).map(|a| a.did)
    }

    /// Maps `[iova, iova + len)` to `[hpa, hpa + len)`, all or nothing: if any page of the
    /// range is already mapped nothing is written and [`DriverError::Overlap`] names it.
    ///
    /// Uses 1 GiB and 2 MiB leaves wherever iova, hpa and the rest of the range are aligned
    /// and the unit supports them (CAP.SSLPS). Needs no invalidation: with CM=0 the unit
    /// never caches not-present entries (VT-d 6.1).
    pub fn map(&self, did: DomainId, iova: Iova, hpa: Hpa, len: u64, perm: Perm) -> Result<(), DriverError> {
        let end = check_range(iova, len)?;
        if !hpa.is_page_aligned() {
            return Err(DriverError::Unaligned { field: AddressField::Hpa, value: hpa.0 });
        }
        if !perm.read && !perm.write {
            return Err(DriverError::NoAccess);
        }
        let size = self.memory.size();
        if hpa.0.checked_add(len).is_none_or(|e| e > size) {
            return Err(DriverError::HpaOutOfRange { hpa, len, size });
        }
        if self.frames.contains(hpa, len) {
            return Err(DriverError::HpaInTableRegion { hpa, len });
        }
        let domain = self.domain(did)?;
        if domain.kind != DomainKind::Paging {
            return Err(DriverError::NotPaging(did));
        }
        check_width(domain.aw, iova, end)?;

        let mut state = domain.state.lock();
        if !state.alive {
            return Err(DriverError::UnknownDomain(did));
        }
        let tables = state.tables.as_mut().ok_or(DriverError::NotPaging(did))?;
        if let Some(found) = tables.first_mapped(&self.memory, iova.0, end)? {
            return Err(DriverError::Overlap { iova: Iova(found) });
        }
        let mapped = tables.map(&self.memory, &self.frames, iova.0, hpa.0, len, perm, self.caps.max_leaf_level);
        if let Err(e) = mapped {
            // All or nothing: take back what was written (the range was empty before).
            // Devices may already have used the partial mapping, so this is a full unmap
            // with its flush.
            self.unmap_locked(did, tables, iova.0, end)?;
            return Err(e);
        }
        Ok(())
    }

    /// Unmaps every mapping inside `[iova, iova + len)` and returns the bytes unmapped
    /// (holes are skipped). A superpage only partly inside the range is refused with
    /// [`DriverError::PartialSuperpage`] and nothing changes.
    ///
    /// Page-table pages that become empty are unlinked, the IOTLB is flushed
    /// page-selectively (domain-selectively above CAP.MAMV), and only then are the pages
    /// freed (Linux `intel_iommu_unmap` + `intel_iommu_tlb_sync`).
    pub fn unmap(&self, did: DomainId, iova: Iova, len: u64) -> Result<u64, DriverError> {
        let end = check_range(iova, len)?;
        let domain = self.domain(did)?;
        if domain.kind != DomainKind::Paging {
            return Err(DriverError::NotPaging(did));
        }
        check_width(domain.aw, iova, end)?;
        let mut state = domain.state.lock();
        if !state.alive {
            return Err(DriverError::UnknownDomain(did));
        }
        let tables = state.tables.as_mut().ok_or(DriverError::NotPaging(did))?;
        tables.check_unmap(&self.memory, iova.0, end)?;
        self.unmap_locked(did, tables, iova.0, end)
    }

    /// Clears `[start, end)`, flushes per the policy, frees the retired tables.
    fn unmap_locked(&self, did: DomainId, tables: &mut PageTable, start: u64, end: u64) -> Result<u64, DriverError> {
        let mut retired = Vec::new();
        let out = tables.unmap(&self.memory, start, end, &mut retired)?;
        if let Some((first, last)) = out.span {
            match self.flush {
                FlushPolicy::Strict => {
                    // VT-d 6.5.1.2: IH=1 only when no paging-structure entry changed.
                    let ih = out.tables_freed == 0;
                    let scope = if self.caps.page_selective {
                        page_scope(did, first, last, ih, self.caps.mamv)
                    } else {
                        IotlbScope::Domain(did)
                    };
                    // On failure the retired frames leak rather than be reused while the
                    // unit may still cache them.
                    self.flush_iotlb(scope)?;
                }
            }
        }
        self.frames.free_all(retired);
        Ok(out.bytes)
    }

    fn flush_iotlb(&self, scope: IotlbScope) -> Result<(), DriverError> {
        self.regs.flush_iotlb(scope, self.caps.read_drain, self.caps.write_drain)
    }

    /// Software walk of a domain's tables: the host address `iova` maps to, the
    /// permissions and the size of the page that maps it. Identity domains map every
    /// address to itself; blocked domains map nothing.
    pub fn lookup(&self, did: DomainId, iova: Iova) -> Option<(Hpa, Perm, u64)> {
        let domain = self.domain(did).ok()?;
        if !domain.aw.covers(iova) {
            return None;
        }
        match domain.kind {
            DomainKind::Blocked => None,
            DomainKind::Identity => Some((Hpa(iova.0), Perm::RW, PAGE_SIZE)),
            DomainKind::Paging => {
                let state = domain.state.lock();
                state.tables.as_ref()?.lookup(&self.memory, iova.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unit::{Access, Blocked, FaultReason, UnitConfig};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const SID: SourceId = SourceId::new(2, 3, 1);

    fn driver_with(memory: u64, config: DriverConfig) -> Driver {
        let unit = Arc::new(Unit::new(UnitConfig::default(), Arc::new(HostMemory::new(memory).unwrap())));
        Driver::new(unit, config).unwrap()
    }

    fn driver() -> Driver {
        driver_with(4 * GIB, DriverConfig::for_memory(4 * GIB))
    }

    fn blocked(reason: FaultReason) -> Result<Hpa, Blocked> {
        Err(Blocked { reason: Some(reason) })
    }

    fn translate(d: &Driver, sid: SourceId, iova: u64, access: Access) -> Result<Hpa, Blocked> {
        d.unit().translate(sid, Iova(iova), access).map(|t| t.hpa)
    }

    #[test]
    fn driver_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Driver>();
    }

    #[test]
    fn table_region_is_the_capped_top_eighth() {
        assert_eq!(DriverConfig::for_memory(64 * MIB).table_region, (Hpa(56 * MIB), 8 * MIB));
        assert_eq!(DriverConfig::for_memory(8 * GIB).table_region, (Hpa(8 * GIB - 256 * MIB), 256 * MIB));
        let (base, len) = DriverConfig::for_memory(2 * MIB + 4096 * 3).table_region;
        assert!(base.is_page_aligned() && len.is_multiple_of(PAGE_SIZE) && base.0 + len <= 2 * MIB + 4096 * 3);
        // too small to hold a table: refused, not a panic
        let unit = Arc::new(Unit::new(UnitConfig::default(), Arc::new(HostMemory::new(2 * MIB).unwrap())));
        let cfg = DriverConfig { table_region: (Hpa(0), 0), flush: FlushPolicy::Strict };
        assert!(matches!(Driver::new(unit, cfg), Err(DriverError::InvalidTableRegion { .. })));
    }

    #[test]
    fn init_enables_translation_with_an_empty_root_table() {
        let d = driver();
        assert!(d.unit().translation_enabled());
        assert_eq!(d.table_frames_in_use(), 1);
        assert_eq!(translate(&d, SID, 0, Access::Read), blocked(FaultReason::RootEntryNotPresent));
    }

    #[test]
    fn domain_ids_are_reused_and_destroy_waits_for_detach() {
        let d = driver();
        let a = d.create_domain(DomainKind::Paging, AddressWidth::Aw48).unwrap();
        let b = d.create_domain(DomainKind::Identity, AddressWidth::Aw48).unwrap();
        assert_eq!((a, b), (DomainId(1), DomainId(2)));
        d.attach(SID, a, false).unwrap();
        assert_eq!(d.attached(a), vec![SID]);
        assert_eq!(d.destroy_domain(a), Err(DriverError::DomainInUse { did: a, devices: 1 }));
        d.map(a, Iova(0), Hpa(0), 4 * MIB + 4096, Perm::RW).unwrap();
        assert_eq!(d.detach(SID), Ok(Some(a)));
        assert_eq!(d.detach(SID), Ok(None));
        d.destroy_domain(a).unwrap();
        assert_eq!(d.destroy_domain(a), Err(DriverError::UnknownDomain(a)));
        assert_eq!(d.map(a, Iova(0), Hpa(0), 4096, Perm::RW), Err(DriverError::UnknownDomain(a)));
        // root + the bus's context table are all that is left
        assert_eq!(d.table_frames_in_use(), 2);
        assert_eq!(d.create_domain(DomainKind::Blocked, AddressWidth::Aw39), Ok(a));
        assert_eq!(d.domains(), vec![a, b]);
        assert_eq!(d.domain_info(b), Some((DomainKind::Identity, AddressWidth::Aw48)));
    }

    #[test]
    fn attach_writes_the_context_entry_each_kind_needs() {
        let d = driver();
        let paging = d.create_domain(DomainKind::Paging, AddressWidth::Aw39).unwrap();
        let identity = d.create_domain(DomainKind::Identity, AddressWidth::Aw48).unwrap();
        let block = d.create_domain(DomainKind::Blocked, AddressWidth::Aw48).unwrap();
        d.map(paging, Iova(0x10_0000), Hpa(0x20_0000), 4096, Perm::READ).unwrap();

        d.attach(SID, paging, true).unwrap();
        assert_eq!(translate(&d, SID, 0x10_0123, Access::Read), Ok(Hpa(0x20_0123)));
        assert_eq!(translate(&d, SID, 0x10_0123, Access::Write), blocked(FaultReason::NoWrite));
        // re-attach elsewhere: the old translation must not survive in any cache
        d.attach(SID, identity, false).unwrap();
        assert_eq!(d.attached(paging), vec![]);
        assert_eq!(translate(&d, SID, 0x10_0123, Access::Read), Ok(Hpa(0x10_0123)));
        d.attach(SID, block, false).unwrap();
        assert_eq!(translate(&d, SID, 0x10_0123, Access::Read), blocked(FaultReason::ContextEntryNotPresent));
        d.attach(SID, paging, false).unwrap();
        assert_eq!(translate(&d, SID, 0x10_0123, Access::Read), Ok(Hpa(0x20_0123)));
        d.detach(SID).unwrap();
        assert_eq!(translate(&d, SID, 0x10_0123, Access::Read), blocked(FaultReason::ContextEntryNotPresent));
        // another function on the same bus still has no entry
        let other = SourceId::new(2, 3, 2);
        assert_eq!(translate(&d, other, 0, Access::Read), blocked(FaultReason::ContextEntryNotPresent));
        assert_eq!(d.attach(SID, DomainId(77), false), Err(DriverError::UnknownDomain(DomainId(77))));
        assert_eq!(d.lookup(identity, Iova(0x1234)), Some((Hpa(0x1234), Perm::RW, PAGE_SIZE)));
        assert_eq!(d.lookup(block, Iova(0x1234)), None);
    }

    #[test]
    fn map_refuses_bad_requests_without_writing() {
        let d = driver();
        let did = d.create_domain(DomainKind::Paging, AddressWidth::Aw39).unwrap();
        let identity = d.create_domain(DomainKind::Identity, AddressWidth::Aw39).unwrap();
        let frames = d.table_frames_in_use();
        assert_eq!(d.map(identity, Iova(0), Hpa(0), 4096, Perm::RW), Err(DriverError::NotPaging(identity)));
        assert_eq!(d.unmap(identity, Iova(0), 4096), Err(DriverError::NotPaging(identity)));
        assert_eq!(
            d.map(did, Iova(0), Hpa(0x1800), 4096, Perm::RW),
            Err(DriverError::Unaligned { field: AddressField::Hpa, value: 0x1800 })
        );
        assert_eq!(
            d.map(did, Iova(1 << 39), Hpa(0), 4096, Perm::RW),
            Err(DriverError::BeyondWidth { iova: Iova(1 << 39), width_bits: 39 })
        );
        assert_eq!(d.unmap(did, Iova(0), 0), Err(DriverError::ZeroLength));
        assert_eq!(d.unmap(did, Iova(u64::MAX - 4095), 8192), Err(DriverError::Overflow));
        assert!(matches!(
            d.map(did, Iova(0), Hpa(u64::MAX - 4095), 8192, Perm::RW),
            Err(DriverError::HpaOutOfRange { .. })
        ));
        assert_eq!(d.table_frames_in_use(), frames);
        // an overlap anywhere in the range refuses the whole request
        d.map(did, Iova(3 * MIB), Hpa(0), 4096, Perm::RW).unwrap();
        let frames = d.table_frames_in_use();
        assert_eq!(d.map(did, Iova(0), Hpa(0), 4 * MIB, Perm::RW), Err(DriverError::Overlap { iova: Iova(3 * MIB) }));
        assert_eq!(d.lookup(did, Iova(0)), None);
        assert_eq!(d.table_frames_in_use(), frames);
    }

    #[test]
    fn running_out_of_table_memory_rolls_the_map_back() {
        // root + context + top + L2 + one L1: the second L1 table cannot be allocated
        let region = (Hpa(60 * MIB), 5 * PAGE_SIZE);
        let d = driver_with(64 * MIB, DriverConfig { table_region: region, flush: FlushPolicy::Strict });
        let did = d.create_domain(DomainKind::Paging, AddressWidth::Aw39).unwrap();
        d.attach(SID, did, false).unwrap();
        let frames = d.table_frames_in_use();
        assert_eq!(frames, 3);
        // 4 KiB pages straddling a 2 MiB boundary need two L1 tables
        let (iova, len) = (2 * MIB - 8 * 4096, 16 * 4096);
        assert_eq!(translate(&d, SID, iova, Access::Read), blocked(FaultReason::NoRead));
        assert_eq!(d.map(did, Iova(iova), Hpa(4096), len, Perm::RW), Err(DriverError::OutOfTableMemory));
        assert_eq!(d.lookup(did, Iova(iova)), None);
        assert_eq!(translate(&d, SID, iova, Access::Read), blocked(FaultReason::NoRead));
        assert_eq!(d.table_frames_in_use(), frames, "rollback freed the tables it allocated");
        // half of it fits
        d.map(did, Iova(iova), Hpa(4096), len / 2, Perm::RW).unwrap();
        assert_eq!(translate(&d, SID, iova, Access::Write), Ok(Hpa(4096)));
    }

    #[test]
    fn unmap_flushes_so_no_stale_translation_survives() {
        let d = driver();
        let did = d.create_domain(DomainKind::Paging, AddressWidth::Aw48).unwrap();
        d.attach(SID, did, true).unwrap();
        d.map(did, Iova(GIB), Hpa(GIB), GIB, Perm::RW).unwrap();
        d.map(did, Iova(4 * GIB), Hpa(0), 2 * MIB + 4096, Perm::RW).unwrap();
        for iova in [GIB + 5, 4 * GIB + 7, 4 * GIB + 2 * MIB] {
            assert!(translate(&d, SID, iova, Access::Read).is_ok()); // now cached
        }
        assert_eq!(d.unmap(did, Iova(GIB + 2 * MIB), 4096), Err(DriverError::PartialSuperpage { iova: Iova(GIB) }));
        assert_eq!(d.unmap(did, Iova(0), 8 * GIB), Ok(GIB + 2 * MIB + 4096));
        for iova in [GIB + 5, 4 * GIB + 7, 4 * GIB + 2 * MIB] {
            assert_eq!(translate(&d, SID, iova, Access::Read), blocked(FaultReason::NoRead));
        }
        assert_eq!(d.unit().stats().stale_iotlb_uses, 0);
    }

    #[test]
    fn domains_map_in_parallel() {
        let d = Arc::new(driver());
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    let did = d.create_domain(DomainKind::Paging, AddressWidth::Aw48).unwrap();
                    for i in 0..64 {
                        let iova = Iova(t * GIB + i * 2 * 4096);
                        d.map(did, iova, Hpa(i * 4096), 4096, Perm::RW).unwrap();
                        assert_eq!(d.unmap(did, iova, 8192), Ok(4096));
                    }
                    did
                })
            })
            .collect();
        for h in handles {
            let did = h.join().unwrap();
            d.destroy_domain(did).unwrap();
        }
        assert_eq!(d.table_frames_in_use(), 1);
    }
}
