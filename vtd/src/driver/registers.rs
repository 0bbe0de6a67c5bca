//! The driver's side of the unit's register interface: capability decoding and the
//! global-command handshakes (VT-d 10.4.2-10.4.6), after Linux `iommu_set_root_entry` /
//! `iommu_enable_translation`.
//!
//! It owns the register lock (Linux `iommu->register_lock`): a command that takes two
//! writes (IVA then IOTLB) or a write and a poll must not interleave with another thread's.
//! The invalidation commands built on it live in `invalidate`; once queued invalidation is
//! on, only `queue` writes the queue registers (IQA, IQT, FSTS queue bits).

use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use super::error::DriverError;
use crate::ids::Hpa;
use crate::unit::Unit;
use crate::unit::regs::{self, cap, ecap, gcmd};
use crate::unit::tables::AddressWidth;

/// How many times a handshake bit is read back before the driver gives up. dmar's unit
/// completes every command synchronously, so one read is enough; real hardware would need
/// a time-out instead (Linux `DMAR_OPERATION_TIMEOUT`).
const POLL_LIMIT: usize = 1000;

/// GSTS bits that reflect persistent state (VT-d 10.4.4).
const GSTS_PERSISTENT: u32 = gcmd::PERSISTENT;

/// What the unit advertises in CAP and ECAP that the driver relies on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Capabilities {
    /// CAP.SAGAW[12:8]: bit n set means AW=n is supported.
    sagaw: u64,
    /// Largest leaf level: 1 (4 KiB only), 2 (2 MiB, CAP.SSLPS bit 34) or 3 (1 GiB too).
    pub(crate) max_leaf_level: u32,
    /// CAP.MAMV: the largest address mask a page-selective flush accepts.
    pub(crate) mamv: u32,
    /// CAP.DRD / CAP.DWD: IOTLB flushes may ask to drain reads / writes.
    pub(crate) read_drain: bool,
    /// See `read_drain`.
    pub(crate) write_drain: bool,
    /// CAP.PSI: page-selective IOTLB invalidation is supported.
    pub(crate) page_selective: bool,
    /// ECAP.PT: context entries may use TT=10b (pass-through).
    pub(crate) pass_through: bool,
    /// ECAP.QI: the unit has an invalidation queue (VT-d 6.5.2).
    pub(crate) queued_invalidation: bool,
    /// ECAP.DT: context entries may use TT=01b, so devices may cache translations (ATS).
    pub(crate) device_tlb: bool,
    /// ECAP.MHMV: the largest index mask (IM) an interrupt entry cache invalidation may
    /// carry, so the largest block of IRTEs one invalidation covers is 2^MHMV (VT-d
    /// 6.5.2.7; Linux `ecap_max_handle_mask`).
    pub(crate) max_handle_mask: u8,
    /// CAP.FRO × 16: where the fault recording registers start (Linux
    /// `cap_fault_reg_offset`).
    pub(crate) fault_record_offset: u64,
    /// CAP.NFR + 1: how many fault recording registers there are (Linux
    /// `cap_num_fault_regs`).
    pub(crate) fault_records: usize,
}

impl Capabilities {
    /// Decodes CAP and ECAP (VT-d 10.4.2, 10.4.3).
    pub(crate) fn decode(cap_reg: u64, ecap_reg: u64) -> Self {
        let sslps = (cap_reg >> cap::SSLPS_SHIFT) & cap::SSLPS_MASK;
        // 1 GiB leaves are used only when 2 MiB ones are supported too.
        let max_leaf_level = if sslps & cap::SSLPS_2M == 0 {
            1
        } else if sslps & cap::SSLPS_1G == 0 {
            2
        } else {
            3
        };
        Self {
            sagaw: (cap_reg >> cap::SAGAW_SHIFT) & cap::SAGAW_MASK,
            max_leaf_level,
            mamv: ((cap_reg >> cap::MAMV_SHIFT) & cap::MAMV_MASK) as u32,
            read_drain: cap_reg & cap::DRD != 0,
            write_drain: cap_reg & cap::DWD != 0,
            page_selective: cap_reg & cap::PSI != 0,
            pass_through: ecap_reg & ecap::PT != 0,
            queued_invalidation: ecap_reg & ecap::QI != 0,
            device_tlb: ecap_reg & ecap::DT != 0,
            max_handle_mask: ((ecap_reg >> ecap::MHMV_SHIFT) & ecap::MHMV_MASK) as u8,
            fault_record_offset: ((cap_reg >> cap::FRO_SHIFT) & cap::FRO_MASK) * 16,
            fault_records: ((cap_reg >> cap::NFR_SHIFT) & cap::NFR_MASK) as usize + 1,
        }
    }

    /// True when the unit walks tables of this width.
    pub(crate) fn supports(&self, aw: AddressWidth) -> bool {
        self.sagaw & (1 << (aw as u64)) != 0
    }

    /// What both `self` and `other` offer: the capabilities a domain may rely on when its
    /// page tables are shared by several units (Linux `domain_update_iommu_cap` takes the
    /// same intersection over the domain's iommus: superpage levels, address widths).
    /// Per-unit fields (drain bits, MAMV, PSI, fault registers) keep the lesser value too,
    /// but the driver reads those from each unit's own capabilities.
    pub(crate) fn meet(self, other: Self) -> Self {
        Self {
            sagaw: self.sagaw & other.sagaw,
            max_leaf_level: self.max_leaf_level.min(other.max_leaf_level),
            mamv: self.mamv.min(other.mamv),
            read_drain: self.read_drain && other.read_drain,
            write_drain: self.write_drain && other.write_drain,
            page_selective: self.page_selective && other.page_selective,
            pass_through: self.pass_through && other.pass_through,
            queued_invalidation: self.queued_invalidation && other.queued_invalidation,
            device_tlb: self.device_tlb && other.device_tlb,
            max_handle_mask: self.max_handle_mask.min(other.max_handle_mask),
            fault_record_offset: self.fault_record_offset.min(other.fault_record_offset),
            fault_records: self.fault_records.min(other.fault_records),
        }
    }
}

/// Serialized access to the unit's registers.
pub(crate) struct Registers {
    unit: Arc<Unit>,
    lock: Mutex<()>,
}

impl std::fmt::Debug for Registers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registers").finish_non_exhaustive()
    }
}

fn mmio(what: &str, offset: u64, e: impl std::fmt::Display) -> DriverError {
    DriverError::Hardware(format!("{what} at {offset:#x} failed: {e}"))
}

impl Registers {
    pub(crate) fn new(unit: Arc<Unit>) -> Self {
        Self { unit, lock: Mutex::new(()) }
    }

    /// The unit behind the registers, for subscribing to its invalidation doorbell.
    pub(crate) fn unit(&self) -> &Unit {
        &self.unit
    }

    /// Takes the register lock for a multi-step command.
    pub(crate) fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock()
    }

    pub(crate) fn read32(&self, offset: u64) -> Result<u32, DriverError> {
        self.unit.read32(offset).map_err(|e| mmio("32-bit read", offset, e))
    }

    pub(crate) fn read64(&self, offset: u64) -> Result<u64, DriverError> {
        self.unit.read64(offset).map_err(|e| mmio("64-bit read", offset, e))
    }

    pub(crate) fn write32(&self, offset: u64, value: u32) -> Result<(), DriverError> {
        self.unit.write32(offset, value).map_err(|e| mmio("32-bit write", offset, e))
    }

    pub(crate) fn write64(&self, offset: u64, value: u64) -> Result<(), DriverError> {
        self.unit.write64(offset, value).map_err(|e| mmio("64-bit write", offset, e))
    }

    /// Reads a register until `done(value)` holds; returns the last value read.
    pub(crate) fn poll64(&self, offset: u64, what: &str, done: impl Fn(u64) -> bool) -> Result<u64, DriverError> {
        for _ in 0..POLL_LIMIT {
            let v = self.read64(offset)?;
            if done(v) {
                return Ok(v);
            }
            std::hint::spin_loop();
        }
        Err(DriverError::Hardware(format!("{what} did not complete")))
    }

    /// Reads CAP and ECAP.
    pub(crate) fn capabilities(&self) -> Result<Capabilities, DriverError> {
        Ok(Capabilities::decode(self.read64(regs::CAP)?, self.read64(regs::ECAP)?))
    }

    /// Issues one global command and waits for its status bit (VT-d 10.4.4/10.4.5): the
    /// value written is the current persistent state plus the new command, since GCMD
    /// sets the whole command state at once.
    pub(crate) fn global_command(&self, command: u32, what: &str) -> Result<(), DriverError> {
        let _g = self.lock();
        let status = self.read32(regs::GSTS)? & GSTS_PERSISTENT;
        self.write32(regs::GCMD, status | command)?;
        // GSTS reports each command at the same bit position as GCMD (RTPS = SRTP, ...).
        for _ in 0..POLL_LIMIT {
            if self.read32(regs::GSTS)? & command != 0 {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        Err(DriverError::Hardware(format!("{what} did not complete")))
    }

    /// Points the unit at a root table: RTADDR, then GCMD.SRTP and wait for GSTS.RTPS
    /// (VT-d 10.4.6; Linux `iommu_set_root_entry`). Legacy mode: RTADDR.TTM = 00.
    pub(crate) fn set_root_table(&self, root: Hpa) -> Result<(), DriverError> {
        self.write64(regs::RTADDR, root.0)?;
        self.global_command(gcmd::SRTP, "set root table pointer")
    }

    /// Turns translation on: GCMD.TE and wait for GSTS.TES (VT-d 10.4.4).
    pub(crate) fn enable_translation(&self) -> Result<(), DriverError> {
        self.global_command(gcmd::TE, "translation enable")
    }

    /// Turns queued invalidation on: GCMD.QIE and wait for GSTS.QIES (VT-d 10.4.4; Linux
    /// `__dmar_enable_qi`). IQA and IQT must be programmed first.
    pub(crate) fn enable_queued_invalidation(&self) -> Result<(), DriverError> {
        self.global_command(gcmd::QIE, "queued invalidation enable")
    }

    /// Turns queued invalidation off if it is on (Linux `__dmar_disable_qi`: a previous
    /// owner may have left it enabled), writing the persistent state without QIE.
    pub(crate) fn disable_queued_invalidation(&self) -> Result<(), DriverError> {
        let _g = self.lock();
        let status = self.read32(regs::GSTS)? & GSTS_PERSISTENT;
        if status & gcmd::QIE == 0 {
            return Ok(());
        }
        self.write32(regs::GCMD, status & !gcmd::QIE)?;
        for _ in 0..POLL_LIMIT {
            if self.read32(regs::GSTS)? & gcmd::QIE == 0 {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        Err(DriverError::Hardware("queued invalidation disable did not complete".to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_advertised_capabilities() {
        let caps = Capabilities::decode(regs::cap_value(), regs::ecap_value());
        assert!(caps.supports(AddressWidth::Aw39));
        assert!(caps.supports(AddressWidth::Aw48));
        assert!(caps.supports(AddressWidth::Aw57));
        assert_eq!(caps.max_leaf_level, 3);
        assert_eq!(u64::from(caps.mamv), regs::MAMV);
        assert!(caps.page_selective && caps.pass_through);
        assert!(caps.read_drain && caps.write_drain);
        assert!(caps.queued_invalidation && caps.device_tlb);
        assert_eq!(u64::from(caps.max_handle_mask), regs::MHMV);
        assert_eq!((caps.fault_record_offset, caps.fault_records), (regs::FRCD_BASE, regs::NUM_FAULT_RECORDS));

        let bare = Capabilities::decode(1 << 10, 0);
        assert!(!bare.supports(AddressWidth::Aw39) && bare.supports(AddressWidth::Aw48));
        assert_eq!(bare.max_leaf_level, 1);
        assert!(!bare.pass_through && !bare.page_selective && !bare.queued_invalidation && !bare.device_tlb);
        assert_eq!(bare.max_handle_mask, 0);
        assert_eq!(Capabilities::decode(1 << 34, 0).max_leaf_level, 2);
    }
}
