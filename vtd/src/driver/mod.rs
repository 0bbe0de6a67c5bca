//! The driver model: the software that programs the remapping unit, after the Linux
//! intel-iommu driver (`drivers/iommu/intel/iommu.c`, `dmar.c`, `prq.c`).
//!
//! It owns everything a kernel driver owns, a file per responsibility: the configuration
//! (`config`), the table memory (`frames`), the root and context tables (`context`),
//! protection domains, their ids and lifecycle (`domain`, `lifecycle`), attaching devices
//! (`attach`), the second-stage page tables (`pagetable`) and map/unmap on them
//! (`mapping`), and the invalidation each change needs (`invalidate`), carried out through
//! the invalidation queue (`queue`) when the unit has one (ECAP.QI) or through the register
//! interface (`registers`) otherwise, and deferred when the flush policy says so
//! (`deferred`). Interrupt remapping (`interrupts`), page requests (`page_requests`) and
//! the fault event with the fault recording registers (`faults`) complete it.
//!
//! It talks to the unit only through registers and host memory, exactly as a real driver
//! would, so whatever it gets wrong shows up as faults or stale translations in the unit.
//! The exceptions are documented where they happen: in `doorbell`, while waiting for the
//! invalidation queue it sleeps on the unit's invalidation doorbell, a stand-in for the
//! invalidation completion event, and still learns what happened from the status word and
//! registers; in `attach`, it switches the unit's translated-request checking (a dmar
//! extension no register holds) for the devices the operator asked it for.
//! Time (the age of deferred unmaps) is read from the unit's clock.
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
//!   invalidate-all per ATS device, one wait) when it holds `max_entries` ranges (by the
//!   unmap that fills it), before a map that overlaps a queued range, when the owner calls
//!   [`Driver::poll_deferred`] after the oldest range is `max_delay` old (the owner's timer:
//!   no other driver call runs a flush that came due), by [`Driver::flush_deferred`], and
//!   when the domain is destroyed.
//! - Detach invalidates the context cache (device-selective), the IOTLB (domain-selective)
//!   and, for an ATS device, its whole device TLB; attaching an ATS device invalidates its
//!   device TLB before the TT=01b entry is written, so it starts empty.
//!
//! Locking: the context tables and attachments sit behind one lock; each domain's page
//! tables, ATS devices and deferred unmaps behind its own, so map/unmap on different
//! domains run in parallel; the register interface behind a third (a flush is a
//! multi-register handshake) and the invalidation queue behind a fourth, held only to
//! write descriptors (waits happen outside it). Order: context, then the domain registry,
//! then a domain, then the deferred index, the registers or the queue. The page request
//! queue has its own lock, held while it is drained.

mod attach;
mod config;
mod context;
mod deferred;
mod domain;
mod doorbell;
mod error;
mod faults;
mod frames;
mod interrupts;
mod invalidate;
mod lifecycle;
mod mapping;
mod page_requests;
mod pagetable;
mod queue;
mod registers;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tracing::debug;

use self::context::ContextTables;
use self::deferred::DeferredDomains;
use self::domain::{Domain, Domains};
use self::frames::FrameAllocator;
use self::invalidate::{ContextScope, Invalidation, Invalidator, IotlbScope};
use self::queue::InvalidationQueue;
use self::registers::{Capabilities, Registers};
use crate::clock::Clock;
use crate::ids::{DomainId, Hpa};
use crate::unit::Unit;
use crate::unit::memory::HostMemory;

pub use self::attach::AttachOptions;
pub use self::config::{DomainKind, DriverConfig, FlushPolicy, MAX_TABLE_REGION, Perm};
pub use self::error::{AddressField, DriverError};
pub use self::faults::FaultReport;
pub use self::interrupts::IRT_ENTRIES;

/// The driver for one remapping unit.
pub struct Driver {
    unit: Arc<Unit>,
    memory: Arc<HostMemory>,
    /// The unit's clock: deferred unmaps age by it.
    clock: Arc<dyn Clock>,
    regs: Registers,
    caps: Capabilities,
    frames: FrameAllocator,
    /// Frames held for the driver's life outside the tables (the invalidation queue).
    fixed_frames: usize,
    /// The interrupt remapping table, once enabled.
    irt: Mutex<Option<Hpa>>,
    /// The page request queue, once enabled; held while it is drained.
    prq: Mutex<Option<Hpa>>,
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

impl Driver {
    /// Takes over `unit` (Linux `init_dmars`): turns queued invalidation on when the unit
    /// has it and the config allows it (`intel_iommu_init_qi`), allocates the root table,
    /// points the unit at it, invalidates the context cache and the IOTLB globally
    /// (`iommu_set_root_entry`) and enables translation (`iommu_enable_translation`).
    pub fn new(unit: Arc<Unit>, config: DriverConfig) -> Result<Driver, DriverError> {
        let memory = unit.memory().clone();
        let clock = unit.clock().clone();
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
            prq: Mutex::new(None),
            invalidator,
            flush: config.flush,
            context: Mutex::new(context),
            domains: RwLock::new(Domains::default()),
            deferred: DeferredDomains::new(clock.now()),
            clock,
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
        let extra = usize::from(self.irt.lock().is_some()) + usize::from(self.prq.lock().is_some());
        self.frames.in_use().saturating_sub(self.fixed_frames + extra)
    }

    /// The live domain `did`.
    pub(crate) fn domain(&self, did: DomainId) -> Result<Arc<Domain>, DriverError> {
        self.domains.read().map.get(&did).cloned().ok_or(DriverError::UnknownDomain(did))
    }

    /// Carries out `batch` and returns once it has completed.
    pub(crate) fn invalidate(&self, batch: &[Invalidation]) -> Result<(), DriverError> {
        self.invalidator.run(&self.regs, batch)
    }

    /// ATS needs TT=01b (ECAP.DT) and device-TLB invalidation (queue descriptors only).
    pub(crate) fn ats_supported(&self) -> bool {
        self.caps.device_tlb && self.invalidator.is_queued()
    }

    /// Sets up, once, a structure that lives in one frame and needs queued invalidation
    /// (the interrupt remapping table, the page request queue; VT-d 6.5.2): `program`
    /// gets the frame and points the unit at it. A later call finds `slot` filled and
    /// returns at once.
    pub(crate) fn enable_once(
        &self,
        slot: &Mutex<Option<Hpa>>,
        program: impl FnOnce(Hpa) -> Result<(), DriverError>,
    ) -> Result<(), DriverError> {
        if !self.invalidator.is_queued() {
            return Err(DriverError::QueueDisabled);
        }
        let mut slot = slot.lock();
        if slot.is_some() {
            return Ok(());
        }
        let frame = self.frames.alloc()?;
        program(frame)?;
        *slot = Some(frame);
        Ok(())
    }
}
