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
    if len % PAGE_SIZE != 0 {
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
        domains.map.insert(did, Arc::new(Domain::new(did, kind, aw, tables)));
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
