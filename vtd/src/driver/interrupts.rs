//! Interrupt remapping, the driver's side (VT-d 5.1, 9.10; Linux
//! `drivers/iommu/intel/irq_remapping.c`): the interrupt remapping table, its entries,
//! and the interrupt-entry-cache invalidation each change needs.
//!
//! Owns one 4 KiB table of 256 entries (IRTA.S = 7) taken from the table region for the
//! driver's life, xAPIC mode (IRTA.EIME = 0). Compatibility-format interrupts stay blocked
//! (GCMD.CFI clear), as Linux leaves them once remapping is on.

use super::Driver;
use super::error::DriverError;
use super::invalidate::Invalidation;
use crate::ids::Hpa;
use crate::unit::interrupt::IecInvalidation;
use crate::unit::interrupt::{ApicMode, Irta};
use crate::unit::invalidation::descriptor::encode;
use crate::unit::regs::{self, gcmd};

/// Entries in the driver's interrupt remapping table.
pub const IRT_ENTRIES: u32 = 256;

impl Driver {
    /// Allocates the interrupt remapping table, latches it (IRTA, GCMD.SIRTP), invalidates
    /// the interrupt entry cache globally (SIRTP does not flush it: CAP.ESIRTPS = 0) and
    /// turns remapping on (GCMD.IRE). Needs queued invalidation (VT-d 6.5.2.7).
    pub fn enable_interrupt_remapping(&self) -> Result<(), DriverError> {
        self.enable_once(&self.irt, |table| {
            self.regs.write64(regs::IRTA, Irta::new(table, 7, ApicMode::XApic).to_bits())?;
            self.regs.global_command(gcmd::SIRTP, "set interrupt remapping table pointer")?;
            self.invalidator.run(&self.regs, &[Invalidation::Raw(encode::iec(IecInvalidation::Global).0, 0)])?;
            self.regs.global_command(gcmd::IRE, "interrupt remapping enable")
        })
    }

    /// Writes interrupt remapping table entry `index` (the raw 128-bit IRTE, VT-d 9.10) and
    /// invalidates its interrupt-entry-cache entry before returning.
    pub fn set_interrupt_entry(&self, index: u16, lo: u64, hi: u64) -> Result<(), DriverError> {
        let table = (*self.irt.lock()).ok_or(DriverError::InterruptRemappingDisabled)?;
        if u32::from(index) >= IRT_ENTRIES {
            return Err(DriverError::InterruptIndex { index, entries: IRT_ENTRIES });
        }
        let at = Hpa(table.0 + u64::from(index) * 16);
        // The low quadword holds P: write the high one first so a present entry is never
        // seen half-written (the unit reads 64-bit words).
        self.memory.write_u64(Hpa(at.0 + 8), hi)?;
        self.memory.write_u64(at, lo)?;
        let (qw0, qw1) = encode::iec(IecInvalidation::Index { index, index_mask: 0 });
        self.invalidator.run(&self.regs, &[Invalidation::Raw(qw0, qw1)])
    }
}
