//! The invalidation doorbell: dmar's stand-in for the invalidation completion event, for
//! software that waits on the invalidation queue without burning a CPU.
//!
//! On hardware, software learns that a wait descriptor completed by reading its status word
//! in memory (Linux `qi_submit_sync` spins on it) or from the invalidation completion event
//! (IWC and the IECTL message, VT-d 6.5.2.8), and learns of a queue error by reading FSTS
//! (`qi_check_fault`). A driver model polling memory in a tight loop would steal a core
//! from the emulated devices that must answer its device-TLB invalidations, so the unit
//! also rings every subscribed [`InvalidationDoorbell`] whenever a wait descriptor
//! completes (whatever its IF bit says) or the queue stops on an error (IQE, ICE, ITE).
//! A ring carries no information: the subscriber still reads the status word and FSTS,
//! exactly as it would after an interrupt. It is rung after the queue lock is released
//! (an [`super::Effect`]), after the status write it announces.
//!
//! Not a register and not visible to software that programs the unit through MMIO: it is an
//! in-process notification, like `UnitEvents`, for the driver model on top of the unit.

use std::sync::Weak;

use crate::unit::Unit;

/// Something that sleeps until the invalidation queue makes progress.
pub trait InvalidationDoorbell: Send + Sync + std::fmt::Debug {
    /// A wait descriptor completed or the queue stopped on an error. Called with no unit
    /// lock held; must be quick and must not call back into the unit.
    fn ring(&self);
}

impl Unit {
    /// Subscribes `doorbell` to invalidation progress. It is held weakly: dropping it
    /// unsubscribes.
    pub fn subscribe_invalidation_doorbell(&self, doorbell: Weak<dyn InvalidationDoorbell>) {
        let mut bells = self.doorbells.lock();
        bells.retain(|b| b.strong_count() > 0);
        bells.push(doorbell);
    }

    /// Rings every subscribed doorbell.
    pub(crate) fn ring_doorbells(&self) {
        let bells = self.doorbells.lock();
        for bell in bells.iter().filter_map(Weak::upgrade) {
            bell.ring();
        }
    }
}
