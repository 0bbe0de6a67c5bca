//! Interrupt remapping, the driver's side (VT-d 5.1, 9.10; Linux
//! `drivers/iommu/intel/irq_remapping.c`): the interrupt remapping table, its entries,
//! and the interrupt-entry-cache invalidation each change needs.
//!
//! Owns, per unit, one 4 KiB table of 256 entries (IRTA.S = 7) taken from the table region
//! for the driver's life, xAPIC mode (IRTA.EIME = 0). An entry is written and invalidated one index
//! at a time (Linux `modify_irte`); the block of a multi-vector MSI is cleared and
//! invalidated with one index-masked descriptor, within ECAP.MHMV (Linux `free_irte`). Compatibility-format interrupts stay blocked
//! (GCMD.CFI clear), as Linux leaves them once remapping is on.

use super::Driver;
use super::driven::Driven;
use super::error::DriverError;
use super::invalidate::Invalidation;
use crate::ids::{Hpa, UnitId};
use crate::unit::interrupt::IecInvalidation;
use crate::unit::interrupt::{ApicMode, Irta};
use crate::unit::invalidation::descriptor::encode;
use crate::unit::regs::{self, gcmd};

/// Entries in the driver's interrupt remapping table.
pub const IRT_ENTRIES: u32 = 256;

impl Driver {
    /// Turns interrupt remapping on for every driven unit
    /// ([`Driver::enable_interrupt_remapping_on`] each, in order; stops at the first
    /// failure).
    pub fn enable_interrupt_remapping(&self) -> Result<(), DriverError> {
        self.units.iter().try_for_each(|u| self.enable_interrupt_remapping_on(u.id))
    }

    /// Allocates unit `unit`'s interrupt remapping table, latches it (IRTA, GCMD.SIRTP),
    /// invalidates the interrupt entry cache globally (SIRTP does not flush it:
    /// CAP.ESIRTPS = 0) and turns remapping on (GCMD.IRE). Needs queued invalidation
    /// (VT-d 6.5.2.7). Each unit has its own table (Linux `intel_setup_irq_remapping` per
    /// iommu).
    pub fn enable_interrupt_remapping_on(&self, unit: UnitId) -> Result<(), DriverError> {
        let u = self.driven(unit)?;
        u.enable_once(&self.frames, &u.irt, |table| {
            u.regs.write64(regs::IRTA, Irta::new(table, 7, ApicMode::XApic).to_bits())?;
            u.regs.global_command(gcmd::SIRTP, "set interrupt remapping table pointer")?;
            u.invalidate(&[Invalidation::Raw(encode::iec(IecInvalidation::Global).0, 0)])?;
            u.regs.global_command(gcmd::IRE, "interrupt remapping enable")
        })
    }

    /// [`Driver::set_interrupt_entry_on`] the first unit.
    pub fn set_interrupt_entry(&self, index: u16, lo: u64, hi: u64) -> Result<(), DriverError> {
        self.set_interrupt_entry_on(self.first().id, index, lo, hi)
    }

    /// Writes entry `index` of unit `unit`'s interrupt remapping table (the raw 128-bit
    /// IRTE, VT-d 9.10) and invalidates its interrupt-entry-cache entry before returning
    /// (Linux `modify_irte`: one index, IM = 0, also for an entry of a multi-vector block).
    pub fn set_interrupt_entry_on(&self, unit: UnitId, index: u16, lo: u64, hi: u64) -> Result<(), DriverError> {
        let u = self.driven(unit)?;
        let at = u.irte_address(u32::from(index))?;
        // The low quadword holds P: write the high one first so a present entry is never
        // seen half-written (the unit reads 64-bit words).
        self.memory.write_u64(Hpa(at.0 + 8), hi)?;
        self.memory.write_u64(at, lo)?;
        u.invalidate_interrupt_entries(index, 0)
    }

    /// [`Driver::clear_interrupt_entries_on`] the first unit.
    pub fn clear_interrupt_entries(&self, index: u16, index_mask: u8) -> Result<(), DriverError> {
        self.clear_interrupt_entries_on(self.first().id, index, index_mask)
    }

    /// Clears the block of 2^`index_mask` entries of unit `unit`'s table that holds `index`
    /// (`index` rounded down to the block's alignment: the block one invalidation with
    /// IM = `index_mask` covers, VT-d 6.5.2.7) and invalidates the whole block with that
    /// one descriptor, as Linux frees the IRTEs of a multi-vector MSI (`free_irte`,
    /// `clear_entries`). A mask above the unit's ECAP.MHMV is refused, as Linux refuses to
    /// allocate such a block (`alloc_irte`).
    pub fn clear_interrupt_entries_on(&self, unit: UnitId, index: u16, index_mask: u8) -> Result<(), DriverError> {
        let u = self.driven(unit)?;
        let max = u.caps.max_handle_mask;
        if index_mask > max {
            return Err(DriverError::InterruptMask { mask: index_mask, max });
        }
        // MHMV is a 4-bit field: at most 2^15 entries.
        let count = 1u32 << index_mask;
        let first = u32::from(index) & !(count - 1);
        u.irte_address(first + count - 1)?;
        for i in first..first + count {
            let at = u.irte_address(i)?;
            // P (low quadword) first: no request sees a present, half-cleared entry.
            self.memory.write_u64(at, 0)?;
            self.memory.write_u64(Hpa(at.0 + 8), 0)?;
        }
        u.invalidate_interrupt_entries(index, index_mask)
    }
}

impl Driven {
    /// Where entry `index` of the unit's table lives; refused beyond the table.
    fn irte_address(&self, index: u32) -> Result<Hpa, DriverError> {
        let table = (*self.irt.lock()).ok_or(DriverError::InterruptRemappingDisabled)?;
        if index >= IRT_ENTRIES {
            return Err(DriverError::InterruptIndex { index: index as u16, entries: IRT_ENTRIES });
        }
        Ok(Hpa(table.0 + u64::from(index) * 16))
    }

    /// One index-selective interrupt entry cache invalidation (VT-d 6.5.2.7), waited for.
    fn invalidate_interrupt_entries(&self, index: u16, index_mask: u8) -> Result<(), DriverError> {
        let (qw0, qw1) = encode::iec(IecInvalidation::Index { index, index_mask });
        self.invalidate(&[Invalidation::Raw(qw0, qw1)])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ids::SourceId;
    use crate::unit::interrupt::{Irte, msi_remappable};
    use crate::unit::{FaultReason, NoEvents};

    const SID: SourceId = SourceId::new(0, 4, 0);

    fn driver() -> Driver {
        let d = crate::testing::driver(64 << 20, Arc::new(NoEvents));
        d.enable_interrupt_remapping().unwrap();
        d
    }

    /// The interrupt a device raises with `handle` and, with SHV, subhandle `sub`.
    fn raise(d: &Driver, handle: u16, sub: u16) -> Result<(u8, Option<u16>), FaultReason> {
        let (addr, data) = msi_remappable(handle, true);
        d.unit().msi_write(SID, addr, data | u32::from(sub)).map(|r| (r.vector, r.index)).map_err(|f| f.reason)
    }

    #[test]
    fn a_multi_vector_block_is_remapped_by_subhandle_and_freed_with_one_invalidation() {
        let d = driver();
        // Four vectors of one MSI: IRTEs 8..=11, the device programmed with handle 8 and SHV
        // (Linux `intel_irq_remapping_alloc` with nr_irqs = 4: IM = 2).
        for s in 0..4u16 {
            let e = Irte::remapped(0x80 + s as u8, 1, ApicMode::XApic);
            d.set_interrupt_entry(8 + s, e.lo, e.hi).unwrap();
        }
        // VT-d 5.1.3: index = handle + subhandle.
        for s in 0..4u16 {
            assert_eq!(raise(&d, 8, s), Ok((0x80 + s as u8, Some(8 + s))), "subhandle {s}");
        }
        // Freeing the block clears all four entries and invalidates them with one IM = 2
        // descriptor; the entry cache held every one of them, so a stale vector would show.
        let before = d.unit().stats().qi_iec;
        d.clear_interrupt_entries(9, 2).unwrap();
        assert_eq!(d.unit().stats().qi_iec - before, 1, "one descriptor for the block");
        for s in 0..4u16 {
            assert_eq!(raise(&d, 8, s), Err(FaultReason::IrEntryNotPresent), "subhandle {s}");
        }
    }

    #[test]
    fn a_block_beyond_the_handle_mask_or_the_table_is_refused() {
        let d = driver();
        let max = d.first().caps.max_handle_mask;
        assert_eq!(u64::from(max), crate::unit::regs::MHMV);
        assert_eq!(d.clear_interrupt_entries(0, max + 1), Err(DriverError::InterruptMask { mask: max + 1, max }));
        // 2^8 entries is the whole 256-entry table; 2^9 would reach past it.
        assert!(d.clear_interrupt_entries(0, 8).is_ok());
        assert_eq!(d.clear_interrupt_entries(0, 9), Err(DriverError::InterruptIndex { index: 511, entries: 256 }));
        // Software's own IEC descriptor is held to the same limit.
        let too_wide = encode::iec(IecInvalidation::Index { index: 0, index_mask: max + 1 });
        assert!(matches!(d.submit_descriptors(&[too_wide]), Err(DriverError::InvalidDescriptor { .. })));
        let widest = encode::iec(IecInvalidation::Index { index: 0, index_mask: max });
        assert_eq!(d.submit_descriptors(&[widest]), Ok(()));
    }
}
