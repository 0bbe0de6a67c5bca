//! Resetting a unit: [`Unit::reset`] puts every register, cache and piece of request state
//! back where [`Unit::new`] leaves it, as a platform reset does to the hardware.
//!
//! Owns the order of the reset and its locking; each part resets what it owns itself (the
//! register file in `mmio`, the fault recorder in `fault`, the invalidation queue and the
//! device ports' ITags in `invalidation`, the page request queue in `prq`, the interrupt
//! remapper in `interrupt`, the protected memory registers in `pmr`, the translated-request
//! grants in `grants`; the translation caches are emptied by their global invalidations).
//!
//! Not reset, because none of it is hardware state software can program or read:
//! - the counters ([`Unit::stats`]), which count since the unit was built;
//! - the device ports ([`Unit::bind_device_port`]) and invalidation doorbells
//!   ([`Unit::subscribe_invalidation_doorbell`]): wiring to the functions and to the
//!   driver model, as a device stays plugged into its slot across a platform reset;
//! - the construction-time configuration, memory, clock and event subscriber;
//! - host memory: tables, queues and status words software wrote stay as they are.
//!
//! Locking: the register-file lock, then the invalidation queue lock, are held across the
//! whole reset, so no GCMD command, register-based invalidation or queue run interleaves
//! with it; everything else is reset under them, one lock at a time. That order is the one
//! the unit already nests in (a GCMD write takes the queue lock under the register lock, a
//! fault-event register read the fault recorder's under it, a queue run the cache-set,
//! interrupt-entry-cache and grant-shard locks under the queue lock), and no path takes the
//! register or queue lock while holding one of the others, so a reset cannot deadlock with
//! concurrent requests, register accesses or device completions. The doorbells ring after
//! every lock is released, as `Unit::apply` rings them.
//!
//! Requests in flight when the reset runs finish against either side of it, as on a bus:
//! translation goes off and the root table pointer is cleared before the invalidation
//! epoch moves, so a walk either began before the epoch moved (its cache fills are refused)
//! or reads the cleared state. A fault such a request records after the reset, or a message
//! another thread collected before it and delivers after it, lands in the reset registers
//! like one that arrived just after the reset.

use std::sync::atomic::Ordering;

use super::Unit;

impl Unit {
    /// Resets the unit: every register returns to its reset value and every cache and
    /// queue to the state [`Unit::new`] builds, as a power-good platform reset does (the
    /// fault status and recording registers are sticky and survive any other reset, VT-d
    /// 10.3; this one clears them too).
    ///
    /// Afterwards GSTS reads 0: translation is disabled, so untranslated requests pass
    /// through untranslated and translated requests unchecked (VT-d 10.4.5, TES = 0),
    /// translation requests are refused, interrupt remapping is off and queued invalidation
    /// disabled. RTADDR, CCMD, IVA, IOTLB_REG, IRTA, the queue registers (IQH, IQT, IQA, ICS,
    /// IQERCD), the page request registers (PQH, PQT, PQA, PRS), the protected memory
    /// registers (PMEN, PLMBASE, PLMLIMIT, PHMBASE, PHMLIMIT: no region is enforced), FSTS,
    /// the fault recording registers and every event's data and address read 0, and FECTL,
    /// IECTL and PECTL read IM = 1 (VT-d 10.4). VER, CAP and ECAP are read-only and do not
    /// change. The context cache, paging-structure caches, IOTLB and interrupt entry cache
    /// are empty, and no walk that was in flight can refill them. Device-TLB invalidations
    /// still outstanding are abandoned (their late completions are ignored), and the
    /// invalidation doorbells ring so that whoever sleeps on one looks again.
    /// Translated-request checking is off for every function, with no grant held: a driver
    /// turns it on again when it attaches a function.
    ///
    /// Kept: the counters ([`Unit::stats`] counts since the unit was built), the device
    /// ports and doorbells (wiring, not registers), and host memory. See the module docs
    /// for the order and the locking.
    pub fn reset(&self) {
        self.reset_with(None);
    }

    /// [`Unit::reset`] as a platform with pre-boot DMA protection performs it: every
    /// register at its reset value except the protected memory regions, which firmware
    /// programs over all of host memory and enables (PMEN.EPM) before translation goes off,
    /// so that at no point of the reset does a device behind the unit reach memory
    /// untranslated (VT-d 10.4.16-10.4.20; the firmware sequence is in the module docs of
    /// [`crate::unit`]). A driver takes over as Linux does: tables, translation on, then
    /// EPM cleared.
    pub fn reset_protected(&self) {
        self.reset_with(Some(self.memory.size()));
    }

    /// The reset, with firmware's protection over `protect` bytes of memory if asked.
    fn reset_with(&self, protect: Option<u64>) {
        {
            let mut regs = self.regs.lock();
            let mut queue = self.queue.lock();
            if let Some(size) = protect {
                self.pmr.protect_all(size);
            }
            // Translation and interrupt remapping off first, so nothing translates or
            // remaps through the old tables from here on.
            self.translation_enabled.store(false, Ordering::Release);
            self.root_table.store(0, Ordering::Release);
            self.interrupts.reset();
            regs.reset();
            // VT-d 6.5: caches empty. The epoch moves before entries go, as for an
            // invalidation, so no walk that read the old tables fills a cache afterwards.
            self.begin_invalidation();
            self.context_cache.invalidate_all();
            self.paging_cache.invalidate_all();
            self.iotlb.invalidate_all();
            self.grants.reset();
            queue.reset();
            self.faults.reset();
            self.prq.reset();
            if protect.is_none() {
                self.pmr.reset();
            }
        }
        tracing::debug!("remapping unit reset");
        self.ring_doorbells();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::unit::regs::{self, event};
    use crate::unit::{HostMemory, UnitConfig};

    #[test]
    fn reset_of_a_fresh_unit_changes_nothing_visible() {
        let unit = Unit::new(
            UnitConfig::default(),
            Arc::new(HostMemory::new(crate::unit::memory::MIN_MEMORY_SIZE).expect("memory")),
        );
        let before: Vec<u64> = (0..regs::WINDOW_SIZE).step_by(8).map(|o| unit.read64(o).expect("read")).collect();
        unit.reset();
        let after: Vec<u64> = (0..regs::WINDOW_SIZE).step_by(8).map(|o| unit.read64(o).expect("read")).collect();
        assert_eq!(before, after);
        for ctl in [regs::FECTL, regs::IECTL, regs::PECTL] {
            assert_eq!(unit.read32(ctl).expect("ctl"), event::IM, "IM set, IP clear at reset");
        }
        assert_eq!(unit.read32(regs::FSTS).expect("fsts"), 0);
    }
}
