//! The driver model: the software that programs the remapping unit, after the Linux
//! intel-iommu driver (`drivers/iommu/intel/iommu.c`, `dmar.c`).
//!
//! It owns everything a kernel driver owns: the table memory (`frames`), the root and
//! context tables (`context`), protection domains and their ids (`domain`), the
//! second-stage page tables (`pagetable`), and the invalidation each change needs
//! (`invalidate`), carried out through the invalidation queue (`queue`) when the unit has
//! one (ECAP.QI) or through the register interface (`registers`) otherwise, and deferred
//! when the flush policy says so (`deferred`). It talks to the unit only through registers
//! and host memory, exactly as a real driver would, so whatever it gets wrong shows up as
//! faults or stale translations in the unit.
//!
//! It does not translate DMA (the unit does), does not know about the network, and does not
//! talk to devices: device-TLB invalidations leave through the unit's device ports.
//!
//! Invalidation rules (VT-d 6.5.3.3, 6.5.2.5; Linux `intel_iommu_tlb_sync`,
//! `domain_context_clear_one`, `dma-iommu.c` flush queue):
//! - An unmap invalidates the IOTLB page-selectively (domain-selectively above CAP.MAMV)
//!   and, in the same batch before the single wait, the device TLB of every ATS device
//!   attached to the domain, over the same aligned block (the whole space after a
//!   domain-selective fallback). Table frames it retired are freed only after that.
//! - [`FlushPolicy::Strict`] returns after the invalidations completed;
//!   [`FlushPolicy::Deferred`] returns after clearing the entries and queues the range. A
//!   domain's queue is flushed (one domain-selective IOTLB invalidation, a device-TLB
//!   invalidate-all per ATS device, one wait) when it holds `max_entries` ranges, when its
//!   oldest range is older than `max_delay` (checked on every driver call, and by
//!   [`Driver::poll_deferred`] for a timer), before a map that overlaps a queued range,
//!   and by [`Driver::flush_deferred`].
//! - Detach invalidates the context cache (device-selective), the IOTLB (domain-selective)
//!   and, for an ATS device, its whole device TLB; attaching an ATS device invalidates its
//!   device TLB before the TT=01b entry is written, so it starts empty.
//!
//! Locking: the context tables and attachments sit behind one lock; each domain's page
//! tables, ATS devices and deferred unmaps behind its own, so map/unmap on different
//! domains run in parallel; the register interface behind a third (a flush is a
//! multi-register handshake) and the invalidation queue behind a fourth, held only to
//! write descriptors (waits happen outside it). Order: context, then the domain registry,
//! then a domain, then the deferred index, the registers or the queue. Deferred flushes
//! that come due are run at the start of a driver call, before any lock is taken.

mod context;
mod deferred;
mod domain;
mod error;
mod frames;
mod interrupts;
mod invalidate;
mod page_requests;
mod pagetable;
mod queue;
mod registers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tracing::{debug, warn};

use self::context::{Attachment, ContextTables};
use self::deferred::DeferredDomains;
use self::domain::{Domain, DomainState, Domains};
pub use self::error::{AddressField, DriverError};
use self::frames::FrameAllocator;
pub use self::interrupts::IRT_ENTRIES;
use self::invalidate::{ContextScope, DeviceTlbRange, Invalidation, Invalidator, IotlbScope, page_scope};
use self::pagetable::PageTable;
use self::queue::InvalidationQueue;
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

/// When the driver invalidates after an unmap (Linux `iommu.strict`: strict vs the
/// `DMA_FQ` flush queue). Set per driver in [`DriverConfig`] and per call with
/// [`Driver::unmap_with`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
#[non_exhaustive]
pub enum FlushPolicy {
    /// Invalidate the IOTLB, the paging-structure caches and the device TLBs of the
    /// domain's ATS devices before unmap returns: once it has, no cache serves the range.
    #[default]
    Strict,
    /// Clear the entries, queue the range and return; invalidate later, in bulk. Until
    /// then devices may keep using cached translations of the range (the freed page-table
    /// pages are kept until the flush, so nothing else is ever reached through them), and
    /// a map over a queued range flushes first. Far cheaper per unmap (VTD-REFERENCE (d)).
    Deferred {
        /// Flush once a domain has this many queued unmaps (Linux: 256; 0 acts as 1).
        max_entries: usize,
        /// Flush once a domain's oldest queued unmap is this old (Linux: 10 ms).
        max_delay: Duration,
    },
}

impl FlushPolicy {
    /// Deferred flushing with the Linux flush-queue sizes: 256 entries, 10 ms.
    pub const DEFERRED: Self = Self::Deferred { max_entries: 256, max_delay: Duration::from_millis(10) };
}

/// How the driver is set up.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DriverConfig {
    /// `(base, len)` of host memory reserved for root, context and page tables and the
    /// invalidation queue. Mappings may not target it.
    pub table_region: (Hpa, u64),
    /// Default invalidation policy of unmaps.
    pub flush: FlushPolicy,
    /// Use queued invalidation when the unit offers it (ECAP.QI). Off, the driver uses the
    /// registers and refuses ATS (device TLBs can only be invalidated through the queue).
    pub queued_invalidation: bool,
}

impl DriverConfig {
    /// The top eighth of a memory of `size` bytes, at most [`MAX_TABLE_REGION`], page
    /// aligned, with strict flushing and queued invalidation.
    pub fn for_memory(size: u64) -> Self {
        let end = size & !(PAGE_SIZE - 1);
        let len = (size / 8).min(MAX_TABLE_REGION) & !(PAGE_SIZE - 1);
        Self { table_region: (Hpa(end - len), len), flush: FlushPolicy::Strict, queued_invalidation: true }
    }

    /// The same with another default flush policy.
    pub fn with_flush(mut self, flush: FlushPolicy) -> Self {
        self.flush = flush;
        self
    }

    /// The same with queued invalidation allowed or not.
    pub fn with_queued_invalidation(mut self, on: bool) -> Self {
        self.queued_invalidation = on;
        self
    }
}

/// The driver for one remapping unit.
pub struct Driver {
    unit: Arc<Unit>,
    memory: Arc<HostMemory>,
    regs: Registers,
    caps: Capabilities,
    frames: FrameAllocator,
    /// Frames held for the driver's life outside the tables (the invalidation queue).
    fixed_frames: usize,
    /// The interrupt remapping table, once enabled.
    irt: Mutex<Option<Hpa>>,
    /// Whether the page request queue is set up.
    prq: Mutex<bool>,
    invalidator: Invalidator,
    flush: FlushPolicy,
    context: Mutex<ContextTables>,
    domains: RwLock<Domains>,
    deferred: DeferredDomains,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("caps", &self.caps)
            .field("table_region", &self.frames.region())
            .field("table_frames_in_use", &self.table_frames_in_use())
            .field("queued_invalidation", &self.invalidator.is_queued())
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

/// The IOTLB invalidation followed by the matching device-TLB invalidation of every ATS
/// device of the domain: one batch, one wait (VT-d 6.5.2.5: a device TLB is invalidated
/// after the IOTLB, so the device cannot refetch the stale translation from it).
fn with_device_tlbs(iotlb: IotlbScope, range: DeviceTlbRange, state: &DomainState) -> Vec<Invalidation> {
    let mut batch = Vec::with_capacity(1 + state.ats_devices.len());
    batch.push(Invalidation::Iotlb(iotlb));
    batch.extend(state.ats_devices.iter().map(|&sid| Invalidation::DeviceTlb { sid, range }));
    batch
}

/// What detaching a device did.
#[derive(Clone, Copy, Debug)]
struct Detached {
    did: DomainId,
    /// The device's TLB was invalidated (it had a TT=01b entry).
    device_tlb_flushed: bool,
}

impl Driver {
    /// Takes over `unit` (Linux `init_dmars`): turns queued invalidation on when the unit
    /// has it and the config allows it (`intel_iommu_init_qi`), allocates the root table,
    /// points the unit at it, invalidates the context cache and the IOTLB globally
    /// (`iommu_set_root_entry`) and enables translation (`iommu_enable_translation`).
    pub fn new(unit: Arc<Unit>, config: DriverConfig) -> Result<Driver, DriverError> {
        let memory = unit.memory().clone();
        let (base, len) = config.table_region;
        let frames = FrameAllocator::new(memory.clone(), base, len)?;
        let regs = Registers::new(unit.clone());
        let caps = regs.capabilities()?;
        let (invalidator, fixed_frames) = if caps.queued_invalidation && config.queued_invalidation {
            let queue = InvalidationQueue::enable(memory.clone(), &regs, &frames)?;
            (Invalidator::queued(queue, &caps), InvalidationQueue::FRAMES)
        } else {
            (Invalidator::registers(&caps), 0)
        };
        let context = ContextTables::new(&frames)?;
        regs.set_root_table(context.root())?;
        // VT-d 6.5.3.3 / 11.4.4: after setting the root table pointer, software must
        // invalidate the context cache and then the IOTLB globally.
        invalidator
            .run(&regs, &[Invalidation::Context(ContextScope::Global), Invalidation::Iotlb(IotlbScope::Global)])?;
        regs.enable_translation()?;
        debug!(root = %context.root(), queued = invalidator.is_queued(), "remapping unit enabled");
        Ok(Driver {
            unit,
            memory,
            regs,
            caps,
            frames,
            fixed_frames,
            irt: Mutex::new(None),
            prq: Mutex::new(false),
            invalidator,
            flush: config.flush,
            context: Mutex::new(context),
            domains: RwLock::new(Domains::default()),
            deferred: DeferredDomains::default(),
        })
    }

    /// The unit this driver programs.
    pub fn unit(&self) -> &Arc<Unit> {
        &self.unit
    }

    /// Whether invalidations go through the invalidation queue (else the registers).
    pub fn queued_invalidation(&self) -> bool {
        self.invalidator.is_queued()
    }

    /// The default flush policy of [`Driver::unmap`].
    pub fn flush_policy(&self) -> FlushPolicy {
        self.flush
    }

    /// Page-table frames in use (root, context and page tables, including tables retired
    /// by deferred unmaps and not yet freed; not the invalidation queue): for tests and
    /// metrics.
    pub fn table_frames_in_use(&self) -> usize {
        let extra = usize::from(self.irt.lock().is_some()) + usize::from(*self.prq.lock());
        self.frames.in_use().saturating_sub(self.fixed_frames + extra)
    }

    /// Deferred unmaps not yet invalidated, over all domains.
    pub fn pending_deferred(&self) -> usize {
        self.deferred
            .all()
            .into_iter()
            .filter_map(|did| self.domain(did).ok())
            .map(|d| d.state.lock().pending.len())
            .sum()
    }

    fn domain(&self, did: DomainId) -> Result<Arc<Domain>, DriverError> {
        self.domains.read().map.get(&did).cloned().ok_or(DriverError::UnknownDomain(did))
    }

    fn invalidate(&self, batch: &[Invalidation]) -> Result<(), DriverError> {
        self.invalidator.run(&self.regs, batch)
    }

    /// ATS needs TT=01b (ECAP.DT) and device-TLB invalidation (queue descriptors only).
    fn ats_supported(&self) -> bool {
        self.caps.device_tlb && self.invalidator.is_queued()
    }

    /// Runs the deferred flushes that are due; called at the start of every driver call,
    /// with no lock held. Failures are logged here: they belong to other domains than the
    /// caller's, and the flush is retried on the next call.
    fn run_due_flushes(&self) {
        if !self.deferred.any_pending() {
            return;
        }
        if let Err(e) = self.poll_deferred() {
            warn!(error = %e, "deferred invalidation failed");
        }
    }

    /// Flushes every domain whose oldest deferred unmap is older than its `max_delay`
    /// (Linux `fq_flush_timeout`). Every driver call does this first; a timer should call
    /// it too, so that an idle driver still flushes on time. Returns the first error after
    /// trying every due domain.
    pub fn poll_deferred(&self) -> Result<(), DriverError> {
        let now = Instant::now();
        if !self.deferred.maybe_due(now) {
            return Ok(());
        }
        self.flush_domains(self.deferred.due(now))
    }

    /// Whether some domain's deferred flush is due: a cheap check (one atomic load when
    /// nothing is pending) for a timer to run [`Driver::poll_deferred`] only when needed.
    pub fn deferred_due(&self) -> bool {
        self.deferred.any_pending() && self.deferred.maybe_due(Instant::now())
    }

    /// Flushes every deferred unmap of every domain now.
    pub fn flush_deferred(&self) -> Result<(), DriverError> {
        self.flush_domains(self.deferred.all())
    }

    fn flush_domains(&self, dids: Vec<DomainId>) -> Result<(), DriverError> {
        let mut first = Ok(());
        for did in dids {
            let r = match self.domain(did) {
                Ok(domain) => self.flush_pending(did, &mut domain.state.lock()),
                Err(_) => {
                    self.deferred.forget(did); // destroyed meanwhile (destroy flushed it)
                    Ok(())
                }
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Flushes a domain's deferred unmaps (Linux `fq_flush_iotlb`): one domain-selective
    /// IOTLB invalidation, a device-TLB invalidate-all per ATS device, one wait; then frees
    /// the tables they retired. On a device time-out the IOTLB part was done, so the queue
    /// is emptied anyway and the time-out reported; on other errors it is kept for a retry.
    fn flush_pending(&self, did: DomainId, state: &mut DomainState) -> Result<(), DriverError> {
        if state.pending.is_empty() {
            self.deferred.forget(did);
            return Ok(());
        }
        let batch = with_device_tlbs(IotlbScope::Domain(did), DeviceTlbRange::ALL, state);
        let result = self.invalidate(&batch);
        if matches!(result, Ok(()) | Err(DriverError::DeviceTlbTimeout { .. })) {
            let n = state.pending.len();
            self.frames.free_all(state.pending.take());
            self.deferred.forget(did);
            debug!(domain = did.0, unmaps = n, "deferred invalidation flushed");
        }
        result
    }

    /// Creates a domain and returns its id (the lowest free id in 1..=0xffff).
    pub fn create_domain(&self, kind: DomainKind, aw: AddressWidth) -> Result<DomainId, DriverError> {
        self.run_due_flushes();
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

    /// Destroys a domain with no devices attached, freeing all its table frames (its
    /// deferred unmaps included: the domain-selective flush covers them).
    pub fn destroy_domain(&self, did: DomainId) -> Result<(), DriverError> {
        self.run_due_flushes();
        let ctx = self.context.lock();
        let devices = ctx.attached(did).count();
        if devices != 0 {
            return Err(DriverError::DomainInUse { did, devices });
        }
        let domain = self.domains.write().map.remove(&did).ok_or(DriverError::UnknownDomain(did))?;
        let mut state = domain.state.lock();
        state.alive = false;
        let mut retired = state.pending.take();
        self.deferred.forget(did);
        if let Some(t) = state.tables.take() {
            t.collect_frames(&self.memory, &mut retired);
            // Detach already flushed this domain; flush once more before its tables
            // and its id are reused, in case a walk raced with the last detach. No device
            // is attached, so no device TLB can hold its translations (detach flushed them).
            self.invalidate(&[Invalidation::Iotlb(IotlbScope::Domain(did))])?;
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
    ///
    /// ATS needs device-TLB support and queued invalidation
    /// ([`DriverError::AtsUnsupported`]). The device's TLB is invalidated before its TT=01b
    /// entry is written; if the device does not answer
    /// ([`DriverError::DeviceTlbTimeout`]) it is left detached.
    pub fn attach(&self, sid: SourceId, did: DomainId, ats: bool) -> Result<(), DriverError> {
        self.run_due_flushes();
        let mut ctx = self.context.lock();
        // Looked up under the context lock: destroy holds it too, so the domain cannot go
        // away between here and the entry write.
        let domain = self.domain(did)?;
        let wanted = Attachment { did, ats };
        if ctx.devices.get(&sid) == Some(&wanted) {
            return Ok(());
        }
        let uses_ats = ats && domain.kind == DomainKind::Paging;
        if uses_ats && !self.ats_supported() {
            return Err(DriverError::AtsUnsupported(sid));
        }
        let detached = self.detach_locked(&mut ctx, sid)?;
        let entry = match domain.kind {
            DomainKind::Blocked => None,
            DomainKind::Identity => {
                Some(ContextEntry::new(did, TranslationType::PassThrough, domain.aw, Hpa(0), false))
            }
            DomainKind::Paging => {
                let tt = if uses_ats { TranslationType::DeviceTlb } else { TranslationType::Untranslated };
                let top = domain.top.ok_or(DriverError::NotPaging(did))?;
                Some(ContextEntry::new(did, tt, domain.aw, top, false))
            }
        };
        if uses_ats {
            // The device TLB must hold nothing from an earlier life before the device may
            // translate again (detach just did this if it was an ATS device).
            if !detached.is_some_and(|d| d.device_tlb_flushed) {
                let range = DeviceTlbRange::ALL;
                self.invalidate(&[Invalidation::DeviceTlb { sid, range }])?;
            }
            // Before the entry is written: from then on every unmap of the domain also
            // invalidates this device's TLB.
            domain.state.lock().ats_devices.insert(sid);
        }
        if let Some(entry) = entry
            && let Err(e) = ctx.install(&self.memory, &self.frames, sid, entry)
        {
            domain.state.lock().ats_devices.remove(&sid);
            return Err(e);
        }
        ctx.devices.insert(sid, wanted);
        debug!(sid = %sid, domain = did.0, ats = uses_ats, "device attached");
        Ok(())
    }

    /// Detaches a device: clears its context entry and flushes. Returns the domain it was
    /// attached to, or `None` if it was not attached.
    ///
    /// On [`DriverError::DeviceTlbTimeout`] the device is detached all the same (its
    /// translated requests are blocked from now on); only its device TLB is unconfirmed.
    pub fn detach(&self, sid: SourceId) -> Result<Option<DomainId>, DriverError> {
        self.run_due_flushes();
        let mut ctx = self.context.lock();
        Ok(self.detach_locked(&mut ctx, sid)?.map(|d| d.did))
    }

    fn detach_locked(&self, ctx: &mut ContextTables, sid: SourceId) -> Result<Option<Detached>, DriverError> {
        let Some(att) = ctx.devices.remove(&sid) else {
            return Ok(None);
        };
        let old = ctx.clear(&self.memory, sid)?;
        let mut device_tlb_flushed = false;
        let mut result = Ok(());
        if old.present() {
            // VT-d 6.5.3.3 (Linux `domain_context_clear_one`): device-selective
            // context-cache invalidation tagged with the old DID, a domain-selective IOTLB
            // invalidation of the old domain, and for a TT=01b entry the device's whole
            // TLB (`__iommu_flush_dev_iotlb(info, 0, MAX_AGAW_PFN_WIDTH)`); one batch.
            let old_did = old.domain();
            let mut batch = vec![
                Invalidation::Context(ContextScope::Device { sid, did: old_did }),
                Invalidation::Iotlb(IotlbScope::Domain(old_did)),
            ];
            if old.tt_bits() == TranslationType::DeviceTlb as u64 {
                batch.push(Invalidation::DeviceTlb { sid, range: DeviceTlbRange::ALL });
                device_tlb_flushed = true;
            }
            result = self.invalidate(&batch);
        }
        // Only now: unmaps that ran meanwhile still invalidated this device's TLB.
        if let Ok(domain) = self.domain(att.did) {
            domain.state.lock().ats_devices.remove(&sid);
        }
        debug!(sid = %sid, domain = att.did.0, "device detached");
        result.map(|()| Some(Detached { did: att.did, device_tlb_flushed }))
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
    /// never caches not-present entries (VT-d 6.1). The exception is a range that overlaps
    /// a deferred unmap: its stale IOTLB and paging-structure entries could shadow the new
    /// mapping, so the domain's deferred unmaps are flushed first (if that fails, nothing
    /// is mapped).
    pub fn map(&self, did: DomainId, iova: Iova, hpa: Hpa, len: u64, perm: Perm) -> Result<(), DriverError> {
        self.run_due_flushes();
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

        let mut guard = domain.state.lock();
        let state = &mut *guard;
        if !state.alive {
            return Err(DriverError::UnknownDomain(did));
        }
        let tables = state.tables.as_ref().ok_or(DriverError::NotPaging(did))?;
        if let Some(found) = tables.first_mapped(&self.memory, iova.0, end)? {
            return Err(DriverError::Overlap { iova: Iova(found) });
        }
        if state.pending.overlaps(iova.0, end) {
            self.flush_pending(did, state)?;
        }
        let tables = state.tables.as_mut().ok_or(DriverError::NotPaging(did))?;
        let mapped = tables.map(&self.memory, &self.frames, iova.0, hpa.0, len, perm, self.caps.max_leaf_level);
        if let Err(e) = mapped {
            // All or nothing: take back what was written (the range was empty before).
            // Devices may already have used the partial mapping, so this is a full unmap
            // with its flush.
            self.unmap_locked(did, state, iova.0, end, FlushPolicy::Strict)?;
            return Err(e);
        }
        Ok(())
    }

    /// Unmaps every mapping inside `[iova, iova + len)` with the driver's flush policy and
    /// returns the bytes unmapped (holes are skipped). See [`Driver::unmap_with`].
    pub fn unmap(&self, did: DomainId, iova: Iova, len: u64) -> Result<u64, DriverError> {
        self.unmap_with(did, iova, len, self.flush)
    }

    /// Unmaps every mapping inside `[iova, iova + len)` and returns the bytes unmapped
    /// (holes are skipped). A superpage only partly inside the range is refused with
    /// [`DriverError::PartialSuperpage`] and nothing changes.
    ///
    /// Page-table pages that become empty are unlinked. `Strict`: the IOTLB is invalidated
    /// page-selectively (domain-selectively above CAP.MAMV) together with the device TLBs
    /// of the domain's ATS devices, and only then are the pages freed (Linux
    /// `intel_iommu_unmap` + `intel_iommu_tlb_sync`). `Deferred`: the range and the pages
    /// are queued for the domain's next flush (Linux `queue_iova`).
    ///
    /// [`DriverError::DeviceTlbTimeout`] means the range is unmapped and the IOTLB
    /// invalidated, but the named device may still cache it.
    pub fn unmap_with(&self, did: DomainId, iova: Iova, len: u64, policy: FlushPolicy) -> Result<u64, DriverError> {
        self.run_due_flushes();
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
        let tables = state.tables.as_ref().ok_or(DriverError::NotPaging(did))?;
        tables.check_unmap(&self.memory, iova.0, end)?;
        self.unmap_locked(did, &mut state, iova.0, end, policy)
    }

    /// Clears `[start, end)`, invalidates or queues per `policy`, frees the retired tables
    /// once nothing can reach them.
    fn unmap_locked(
        &self,
        did: DomainId,
        state: &mut DomainState,
        start: u64,
        end: u64,
        policy: FlushPolicy,
    ) -> Result<u64, DriverError> {
        let tables = state.tables.as_mut().ok_or(DriverError::NotPaging(did))?;
        let mut retired = Vec::new();
        let out = tables.unmap(&self.memory, start, end, &mut retired)?;
        let (Some((first, last)), Some(stale)) = (out.span, out.stale_span()) else {
            self.frames.free_all(retired);
            return Ok(out.bytes);
        };
        match policy {
            FlushPolicy::Strict => {
                // VT-d 6.5.1.2: IH=1 only when no paging-structure entry changed.
                let ih = out.tables_freed == 0;
                let scope = if self.caps.page_selective {
                    page_scope(did, first, last, ih, self.caps.mamv)
                } else {
                    IotlbScope::Domain(did)
                };
                let batch = with_device_tlbs(scope, DeviceTlbRange::for_scope(scope), state);
                let result = self.invalidate(&batch);
                // A device time-out: the IOTLB and paging-structure caches were invalidated
                // all the same, and device TLBs never hold tables. Other failures leak the
                // retired frames rather than reuse them while the unit may still cache them.
                if matches!(result, Ok(()) | Err(DriverError::DeviceTlbTimeout { .. })) {
                    self.frames.free_all(retired);
                }
                result.map(|()| out.bytes)
            }
            FlushPolicy::Deferred { max_entries, max_delay } => {
                let now = Instant::now();
                let deadline = now.checked_add(max_delay).unwrap_or(now + Duration::from_secs(3600));
                state.pending.push(stale, retired, deadline);
                if let Some(due) = state.pending.deadline() {
                    self.deferred.note(did, due);
                }
                if state.pending.len() >= max_entries.max(1) || state.pending.deadline().is_some_and(|d| d <= now) {
                    self.flush_pending(did, state)?;
                }
                Ok(out.bytes)
            }
        }
    }

    /// Software walk of a domain's tables: the host address `iova` maps to, the
    /// permissions and the size of the page that maps it. Identity domains map every
    /// address to itself; blocked domains map nothing.
    pub fn lookup(&self, did: DomainId, iova: Iova) -> Option<(Hpa, Perm, u64)> {
        self.run_due_flushes();
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
        let cfg = DriverConfig { table_region: (Hpa(0), 0), ..DriverConfig::for_memory(2 * MIB) };
        assert!(matches!(Driver::new(unit, cfg), Err(DriverError::InvalidTableRegion { .. })));
    }

    #[test]
    fn config_defaults_to_strict_queued_invalidation() {
        let cfg = DriverConfig::for_memory(64 * MIB);
        assert_eq!((cfg.flush, cfg.queued_invalidation), (FlushPolicy::Strict, true));
        let lazy = cfg.with_flush(FlushPolicy::DEFERRED).with_queued_invalidation(false);
        assert_eq!(lazy.flush, FlushPolicy::Deferred { max_entries: 256, max_delay: Duration::from_millis(10) });
        assert!(!lazy.queued_invalidation);
        let d = driver_with(64 * MIB, cfg);
        assert!(d.queued_invalidation());
        assert_eq!(d.flush_policy(), FlushPolicy::Strict);
        assert!(!d.deferred_due() && d.pending_deferred() == 0);
        assert!(!driver_with(64 * MIB, lazy).queued_invalidation());
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
        // queue + status page + root + context + top + L2 + one L1: the second L1 table
        // cannot be allocated
        let region = (Hpa(60 * MIB), 7 * PAGE_SIZE);
        let d = driver_with(64 * MIB, DriverConfig { table_region: region, ..DriverConfig::for_memory(64 * MIB) });
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
