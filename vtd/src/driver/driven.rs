//! One remapping unit the driver drives (Linux `struct intel_iommu`): what the driver keeps
//! per unit, taking a unit over, and invalidating on several units at once.
//!
//! Per unit: its registers and the register lock, its capabilities, its invalidator (its
//! own invalidation queue, so a device that stalls one unit's queue holds back no other
//! unit), its root and context tables with the attachments of the devices behind it, its
//! interrupt remapping table and page request queue once enabled. Their frames come from
//! the driver's one frame allocator. Not here: anything platform-wide (the frame allocator,
//! domains, deferred unmaps: `mod`), or what the per-unit structures hold (`context`,
//! `queue`, `interrupts`, `page_requests`, `faults`).

use std::sync::Arc;

use parking_lot::Mutex;
use tracing::debug;

use super::Driver;
use super::config::DriverConfig;
use super::context::ContextTables;
use super::domain::DomainState;
use super::error::DriverError;
use super::frames::FrameAllocator;
use super::invalidate::{
    ContextScope, DeviceTlbRange, Invalidation, Invalidator, IotlbScope, Pending, with_device_tlbs,
};
use super::queue::InvalidationQueue;
use super::registers::{Capabilities, Registers};
use crate::ids::{Hpa, UnitId};
use crate::unit::Unit;

/// A unit the driver has taken over.
#[derive(Debug)]
pub(crate) struct Driven {
    pub(crate) id: UnitId,
    pub(crate) unit: Arc<Unit>,
    pub(crate) regs: Registers,
    pub(crate) caps: Capabilities,
    pub(crate) invalidator: Invalidator,
    /// Frames held for the driver's life outside the tables (the invalidation queue).
    fixed_frames: usize,
    /// The interrupt remapping table, once enabled.
    pub(crate) irt: Mutex<Option<Hpa>>,
    /// The page request queue, once enabled; held while it is drained.
    pub(crate) prq: Mutex<Option<Hpa>>,
    /// The root and context tables and the attachments of the devices behind the unit.
    pub(crate) context: Mutex<ContextTables>,
}

impl Driven {
    /// Takes `unit` over (Linux `init_dmars` for one iommu): turns queued invalidation on
    /// when the unit has it and the config allows it (`intel_iommu_init_qi`), allocates the
    /// root table, points the unit at it, invalidates the context cache and the IOTLB
    /// globally (`iommu_set_root_entry`) and enables translation
    /// (`iommu_enable_translation`).
    pub(crate) fn take_over(
        id: UnitId,
        unit: Arc<Unit>,
        frames: &FrameAllocator,
        config: &DriverConfig,
    ) -> Result<Self, DriverError> {
        let regs = Registers::new(unit.clone());
        let caps = regs.capabilities()?;
        let (invalidator, fixed_frames) = if caps.queued_invalidation && config.queued_invalidation {
            let queue = InvalidationQueue::enable(unit.memory().clone(), &regs, frames)?;
            (Invalidator::queued(queue, &caps), InvalidationQueue::FRAMES)
        } else {
            (Invalidator::registers(&caps), 0)
        };
        let context = ContextTables::new(frames)?;
        regs.set_root_table(context.root())?;
        // VT-d 6.5.3.3 / 11.4.4: after setting the root table pointer, software must
        // invalidate the context cache and then the IOTLB globally.
        invalidator
            .run(&regs, &[Invalidation::Context(ContextScope::Global), Invalidation::Iotlb(IotlbScope::Global)])?;
        regs.enable_translation()?;
        debug!(unit = %id, root = %context.root(), queued = invalidator.is_queued(), "remapping unit enabled");
        Ok(Self {
            id,
            unit,
            regs,
            caps,
            invalidator,
            fixed_frames,
            irt: Mutex::new(None),
            prq: Mutex::new(None),
            context: Mutex::new(context),
        })
    }

    /// Carries out `batch` on this unit and returns once it has completed.
    pub(crate) fn invalidate(&self, batch: &[Invalidation]) -> Result<(), DriverError> {
        self.invalidator.run(&self.regs, batch)
    }

    /// ATS needs TT=01b (ECAP.DT) and device-TLB invalidation (queue descriptors only).
    pub(crate) fn ats_supported(&self) -> bool {
        self.caps.device_tlb && self.invalidator.is_queued()
    }

    /// Frames the unit holds outside the tables: its invalidation queue, its interrupt
    /// remapping table and page request queue once enabled.
    pub(crate) fn fixed_frames(&self) -> usize {
        self.fixed_frames + usize::from(self.irt.lock().is_some()) + usize::from(self.prq.lock().is_some())
    }

    /// Sets up, once, a structure that lives in one frame and needs queued invalidation
    /// (the interrupt remapping table, the page request queue; VT-d 6.5.2): `program`
    /// gets the frame and points the unit at it. A later call finds `slot` filled and
    /// returns at once.
    pub(crate) fn enable_once(
        &self,
        frames: &FrameAllocator,
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
        let frame = frames.alloc()?;
        // On failure the frame is kept: the unit may already point at it.
        program(frame)?;
        *slot = Some(frame);
        Ok(())
    }
}

impl Driver {
    /// Invalidates a domain on every unit it spans and returns once all have completed
    /// ([`invalidate_all`]): on each, the IOTLB with the scope `scope` gives for that unit's
    /// capabilities, then the matching device-TLB range of each of the domain's ATS devices
    /// behind that unit (VT-d 6.5.2.5). Called under the domain's lock, so the span cannot
    /// change meanwhile.
    pub(crate) fn invalidate_span(
        &self,
        state: &DomainState,
        scope: impl Fn(&Capabilities) -> IotlbScope,
    ) -> Result<(), DriverError> {
        self.start_span(state, scope)?.finish()
    }

    /// The first half of [`Driver::invalidate_span`]: every spanned unit's batch handed to
    /// its queue, not yet waited for, so that several domains can be started before any
    /// wait (the deferred flush of many domains at once).
    pub(crate) fn start_span(
        &self,
        state: &DomainState,
        scope: impl Fn(&Capabilities) -> IotlbScope,
    ) -> Result<Started<'_>, DriverError> {
        let mut batches = Vec::with_capacity(state.span.len());
        for (id, span) in &state.span {
            // Every spanned unit is driven: attach joins only through a driven unit.
            let unit = self.driven(*id)?;
            let iotlb = scope(&unit.caps);
            batches.push((unit, with_device_tlbs(iotlb, DeviceTlbRange::for_scope(iotlb), &span.ats_devices)));
        }
        Ok(Started::new(batches))
    }
}

/// Batches handed to their units' queues and not yet waited for ([`Started::finish`]).
pub(crate) struct Started<'a> {
    batches: Vec<(&'a Driven, Vec<Invalidation>)>,
    pending: Vec<Pending>,
}

impl<'a> Started<'a> {
    /// Hands every batch to its unit before any wait.
    pub(crate) fn new(batches: Vec<(&'a Driven, Vec<Invalidation>)>) -> Self {
        let pending = batches.iter().map(|(u, batch)| u.invalidator.start(&u.regs, batch)).collect();
        Self { batches, pending }
    }

    /// Returns once every batch has completed, with the worst result ([`invalidate_all`]).
    pub(crate) fn finish(self) -> Result<(), DriverError> {
        let mut result = Ok(());
        for ((u, batch), pending) in self.batches.iter().zip(self.pending) {
            result = worse(result, u.invalidator.finish(&u.regs, batch, pending));
        }
        result
    }
}

/// Carries out one batch per unit and returns once all have completed: every unit's batch
/// is handed to its queue before the driver waits on any, so the waits overlap (Linux
/// `iommu_flush_iotlb_psi` for each iommu of `domain->iommu_array`). A unit whose devices
/// are slow delays only the caller, never another unit's queue.
///
/// Every batch is carried out whatever the others do; the result is the worst of them: a
/// failure other than a device time-out first, else the first time-out.
pub(crate) fn invalidate_all(batches: Vec<(&Driven, Vec<Invalidation>)>) -> Result<(), DriverError> {
    Started::new(batches).finish()
}

/// The worse of two invalidation results (see [`invalidate_all`]).
pub(crate) fn worse(a: Result<(), DriverError>, b: Result<(), DriverError>) -> Result<(), DriverError> {
    match (&a, &b) {
        (Ok(()), _) => b,
        (Err(DriverError::DeviceTlbTimeout { .. }), Err(e)) if !matches!(e, DriverError::DeviceTlbTimeout { .. }) => b,
        _ => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SourceId;

    #[test]
    fn the_worse_result_wins() {
        let timeout = |n| Err(DriverError::DeviceTlbTimeout { sid: SourceId(n) });
        let broken = || Err(DriverError::Hardware("x".to_owned()));
        assert_eq!(worse(Ok(()), Ok(())), Ok(()));
        assert_eq!(worse(Ok(()), timeout(1)), timeout(1));
        assert_eq!(worse(timeout(1), timeout(2)), timeout(1));
        assert_eq!(worse(timeout(1), broken()), broken());
        assert_eq!(worse(broken(), timeout(1)), broken());
        assert_eq!(worse(broken(), Ok(())), broken());
    }
}
