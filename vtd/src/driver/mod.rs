//! The driver model: the software that programs the remapping units, after the Linux
//! intel-iommu driver (`drivers/iommu/intel/iommu.c`, `dmar.c`, `prq.c`).
//!
//! One driver drives several units over one host memory, as Linux drives one
//! `struct intel_iommu` per DRHD with one set of domains. It owns everything a kernel driver
//! owns, a file per responsibility: the configuration (`config`), the table memory
//! (`frames`), each driven unit (`driven`) with its root and context tables (`context`),
//! protection domains, their ids and lifecycle (`domain`, `lifecycle`), attaching devices
//! (`attach`), the second-stage page tables (`pagetable`) and map/unmap on them
//! (`mapping`), and the invalidation each change needs (`invalidate`), carried out through
//! each unit's invalidation queue (`queue`) when it has one (ECAP.QI) or through its
//! register interface (`registers`) otherwise, and deferred when the flush policy says so
//! (`deferred`). Interrupt remapping (`interrupts`), page requests (`page_requests`) and
//! the fault event with the fault recording registers (`faults`) complete it.
//!
//! Platform-wide: the host memory, the clock (the first unit's), the one frame allocator
//! over the one table region, the routing of requester ids to units (VT-d 8.3.1), the
//! domain registry with its one id space, each domain's page tables and deferred unmaps,
//! and the flush policy. Per unit (`driven`): registers, capabilities, the invalidator
//! (its own queue), the root and context tables with the attachments behind it, the
//! interrupt remapping table and the page request queue. A device is attached through the
//! unit its requester id routes to; a domain spans the units with at least one of its
//! devices attached, uses the same domain id on each (ids are per unit in VT-d), and every
//! unit's context entries point at its one page-table tree. Domain capabilities (address
//! widths, superpage levels, pass-through) are the intersection over every driven unit,
//! since a domain may be attached anywhere (Linux `domain_update_iommu_cap`).
//!
//! It talks to the units only through registers and host memory, exactly as a real driver
//! would, so whatever it gets wrong shows up as faults or stale translations in a unit.
//! The exceptions are documented where they happen: in `doorbell`, while waiting for an
//! invalidation queue it sleeps on the unit's invalidation doorbell, a stand-in for the
//! invalidation completion event, and still learns what happened from the status word and
//! registers; in `attach`, it switches the unit's translated-request checking (a dmar
//! extension no register holds) for the devices the operator asked it for.
//! Time (the age of deferred unmaps) is read from the first unit's clock.
//!
//! It does not translate DMA (the units do), does not know about the network, and does not
//! talk to devices: device-TLB invalidations leave through the unit's device ports.
//!
//! Invalidation rules (VT-d 6.5.3.3, 6.5.2.5; Linux `intel_iommu_tlb_sync`,
//! `domain_context_clear_one`, `dma-iommu.c` flush queue):
//! - An unmap invalidates, on every unit the domain spans, the IOTLB page-selectively
//!   (domain-selectively above that unit's CAP.MAMV) and, in the same batch before the
//!   single wait, the device TLB of every ATS device of the domain behind that unit, over
//!   the same aligned block (the whole space after a domain-selective fallback). Every
//!   spanned unit gets its batch before the driver waits on any, so the waits overlap and
//!   a unit's slow device delays no other unit. Table frames it retired are freed only
//!   after all of that.
//! - [`FlushPolicy::Strict`] returns after the invalidations completed;
//!   [`FlushPolicy::Deferred`] returns after clearing the entries and queues the range. A
//!   domain's queue is flushed (per spanned unit: one domain-selective IOTLB invalidation,
//!   a device-TLB invalidate-all per ATS device behind it; one wait per unit, overlapped)
//!   when it holds `max_entries` ranges (by the unmap that fills it), before a map that
//!   overlaps a queued range, when the owner calls [`Driver::poll_deferred`] after the
//!   oldest range is `max_delay` old (the owner's timer: no other driver call runs a flush
//!   that came due), by [`Driver::flush_deferred`], and when the domain is destroyed.
//! - Detach invalidates, on the device's unit, the context cache (device-selective), the
//!   IOTLB (domain-selective) and, for an ATS device, its whole device TLB; only then does
//!   the domain's span forget it. Attaching counts the device into the span before its
//!   entry is written, and an ATS device's TLB is invalidated before the TT=01b entry is
//!   written, so it starts empty.
//!
//! Locking, in the order locks are taken:
//! 1. a unit's context lock (its root and context tables and attachments): attach and
//!    detach hold the one of the device's unit across the whole change and its
//!    invalidations; calls that read several (`attached`) take them one at a time;
//! 2. a domain's lock (its page tables, span, ATS devices and deferred unmaps): map, unmap
//!    and flushes hold it across their invalidations on every spanned unit, so map/unmap
//!    on different domains run in parallel; attach and detach take it briefly to join or
//!    leave the span; destroy holds it while it checks the span is empty, so it sees the
//!    attachments of all units without their context locks. Only the deferred flush of
//!    many domains holds several, taken in ascending domain id order, so that every
//!    domain's invalidations are handed to the units before it waits for any;
//! 3. the leaves, never held while taking another of the above: the domain registry (held
//!    only to look up, insert or remove), the deferred index, a unit's register lock (a
//!    flush is a multi-register handshake), its invalidation queue lock (held only to
//!    write descriptors: waits happen outside it), the frame allocator. A unit's page
//!    request queue and interrupt remapping table slots are held while they are used and
//!    taken before that unit's register and queue locks.
//!
//! Races: a detach racing an unmap of the same domain is safe either way: the unmap
//! reaches the device's unit while the device is in the span, and once it left, the
//! detach's domain-selective invalidation of that unit came after the entry was cleared.
//! An attach racing an unmap joins the span under the domain's lock before its entry is
//! written, so the unit either has no entry for the domain yet or gets the invalidation. A
//! unit that comes back into a span it left is invalidated for the domain before the new
//! entry is written: unmaps in between did not reach it, and a walk that raced with the
//! last detach may have left an entry behind.

mod attach;
mod config;
mod context;
mod deferred;
mod domain;
mod doorbell;
mod driven;
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
#[cfg(test)]
mod tests_platform;

use std::sync::Arc;

use parking_lot::RwLock;
use tracing::debug;

use self::deferred::DeferredDomains;
use self::domain::{Domain, Domains};
use self::driven::Driven;
use self::frames::FrameAllocator;
use self::registers::Capabilities;
use crate::clock::Clock;
use crate::ids::{DomainId, SourceId, UnitId};
use crate::platform::{PlatformSpec, Routing};
use crate::unit::memory::HostMemory;
use crate::unit::{Unit, UnitConfig};

pub use self::attach::AttachOptions;
pub use self::config::{DomainKind, DriverConfig, FlushPolicy, MAX_TABLE_REGION, Perm};
pub use self::error::{AddressField, DriverError};
pub use self::faults::FaultReport;
pub use self::interrupts::IRT_ENTRIES;

/// The driver of one or more remapping units over one host memory.
pub struct Driver {
    /// The driven units, in the order given; never empty.
    units: Vec<Driven>,
    /// Which unit a requester id's requests go to.
    routing: Routing,
    /// What every driven unit offers: what a domain, which may span any of them, relies on.
    common: Capabilities,
    memory: Arc<HostMemory>,
    /// The first unit's clock: deferred unmaps age by it.
    clock: Arc<dyn Clock>,
    frames: FrameAllocator,
    flush: FlushPolicy,
    domains: RwLock<Domains>,
    deferred: DeferredDomains,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("units", &self.units.iter().map(|u| u.id).collect::<Vec<_>>())
            .field("caps", &self.common)
            .field("table_region", &self.frames.region())
            .field("table_frames_in_use", &self.table_frames_in_use())
            .field("queued_invalidation", &self.queued_invalidation())
            .field("flush", &self.flush)
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// Takes over `unit` alone, with every requester id routed to it: [`Driver::for_units`]
    /// with one unit, [`UnitId`] 0, and the routing of [`PlatformSpec::single`].
    pub fn new(unit: Arc<Unit>, config: DriverConfig) -> Result<Driver, DriverError> {
        let routing = Routing::new(&PlatformSpec::single(unit.memory().size(), UnitConfig::default()));
        Self::for_units(vec![(UnitId(0), unit)], routing, config)
    }

    /// Takes over each of `units`, in order (Linux `init_dmars`): turns queued invalidation
    /// on when the unit has it and the config allows it (`intel_iommu_init_qi`), allocates
    /// its root table, points the unit at it, invalidates its context cache and IOTLB
    /// globally (`iommu_set_root_entry`) and enables translation
    /// (`iommu_enable_translation`). `routing` says which unit each requester id is behind;
    /// a requester id routed to a unit not in `units` cannot be attached.
    ///
    /// Every unit must work on the same host memory (one table region holds every unit's
    /// tables and queues, and a domain's page tables are shared by the units it spans);
    /// deferred unmaps age by the first unit's clock. If a later unit cannot be taken over,
    /// the earlier ones stay enabled with empty root tables (every request faults) and the
    /// error is returned.
    pub fn for_units(
        units: Vec<(UnitId, Arc<Unit>)>,
        routing: Routing,
        config: DriverConfig,
    ) -> Result<Driver, DriverError> {
        let Some((_, first)) = units.first() else {
            return Err(DriverError::NoUnits);
        };
        let memory = first.memory().clone();
        let clock = first.clock().clone();
        for (i, (id, unit)) in units.iter().enumerate() {
            if !Arc::ptr_eq(unit.memory(), &memory) {
                return Err(DriverError::ForeignMemory(*id));
            }
            if units[..i].iter().any(|(other, _)| other == id) {
                return Err(DriverError::DuplicateUnit(*id));
            }
        }
        let (base, len) = config.table_region;
        let frames = FrameAllocator::new(memory.clone(), base, len)?;
        let mut driven = Vec::with_capacity(units.len());
        for (id, unit) in units {
            driven.push(Driven::take_over(id, unit, &frames, &config)?);
        }
        let common = driven.iter().map(|u| u.caps).reduce(Capabilities::meet).ok_or(DriverError::NoUnits)?;
        debug!(units = driven.len(), "remapping units taken over");
        Ok(Driver {
            units: driven,
            routing,
            common,
            memory,
            frames,
            flush: config.flush,
            domains: RwLock::new(Domains::default()),
            deferred: DeferredDomains::new(clock.now()),
            clock,
        })
    }

    /// The first unit this driver programs (the only one of [`Driver::new`]).
    pub fn unit(&self) -> &Arc<Unit> {
        &self.first().unit
    }

    /// Every unit this driver programs, in the order it took them over.
    pub fn units(&self) -> impl Iterator<Item = (UnitId, &Arc<Unit>)> + '_ {
        self.units.iter().map(|u| (u.id, &u.unit))
    }

    /// The driven unit `id`.
    pub fn unit_by_id(&self, id: UnitId) -> Option<&Arc<Unit>> {
        self.driven(id).ok().map(|u| &u.unit)
    }

    /// The unit requests from `sid` go to, if this driver drives it:
    /// [`DriverError::NoUnit`] when no unit covers `sid`, [`DriverError::NotDriven`] when
    /// its unit is not one of this driver's.
    pub fn unit_of(&self, sid: SourceId) -> Result<UnitId, DriverError> {
        self.driven_for(sid).map(|u| u.id)
    }

    /// The routing of requester ids to units the driver was built with.
    pub fn routing(&self) -> &Routing {
        &self.routing
    }

    /// Whether invalidations go through the invalidation queue (else the registers), on
    /// every driven unit.
    pub fn queued_invalidation(&self) -> bool {
        self.units.iter().all(|u| u.invalidator.is_queued())
    }

    /// The default flush policy of [`Driver::unmap`].
    pub fn flush_policy(&self) -> FlushPolicy {
        self.flush
    }

    /// Page-table frames in use (every unit's root and context tables, and page tables,
    /// including tables retired by deferred unmaps and not yet freed; not the units'
    /// invalidation queues, interrupt remapping tables or page request queues): for tests
    /// and metrics.
    pub fn table_frames_in_use(&self) -> usize {
        let fixed: usize = self.units.iter().map(Driven::fixed_frames).sum();
        self.frames.in_use().saturating_sub(fixed)
    }

    /// The first driven unit (there is always one).
    pub(crate) fn first(&self) -> &Driven {
        &self.units[0]
    }

    /// The driven unit `id`.
    pub(crate) fn driven(&self, id: UnitId) -> Result<&Driven, DriverError> {
        self.units.iter().find(|u| u.id == id).ok_or(DriverError::UnknownUnit(id))
    }

    /// The driven unit `sid` is behind.
    pub(crate) fn driven_for(&self, sid: SourceId) -> Result<&Driven, DriverError> {
        let unit = self.routing.unit_for(sid).ok_or(DriverError::NoUnit(sid))?;
        self.units.iter().find(|u| u.id == unit).ok_or(DriverError::NotDriven { sid, unit })
    }

    /// The live domain `did`.
    pub(crate) fn domain(&self, did: DomainId) -> Result<Arc<Domain>, DriverError> {
        self.domains.read().map.get(&did).cloned().ok_or(DriverError::UnknownDomain(did))
    }
}
