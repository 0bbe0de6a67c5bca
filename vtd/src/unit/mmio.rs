//! The register file at the VT-d offsets (VT-d 10.4), as software sees it through 32- and
//! 64-bit MMIO accesses: decoding an access and dispatching it to the hardware that owns
//! the register.
//!
//! Owns the registers no other part of the unit owns: the read-only capability registers,
//! the GCMD/GSTS handshake (VT-d 10.4.4, 10.4.5: set-root-table-pointer latches RTADDR,
//! translation enable, queued invalidation enable, the interrupt remapping table pointer,
//! interrupt remapping enable, CFI), and the storage of RTADDR, CCMD, IVA, IOTLB_REG and
//! IRTA. The context command and IOTLB commands run in `invalidation` (synchronously: the
//! command bit reads back clear with the actual granularity); FSTS, the fault event and the
//! fault recording registers belong to `fault`; the queue registers to `invalidation`; the
//! page request registers to `prq`; the protected memory registers (PMEN, PLMBASE,
//! PLMLIMIT, PHMBASE, PHMLIMIT) to `pmr`. GCMD bits for features the unit does not advertise
//! (WBF, SFL, EAFL) are ignored, as reserved bits.
//!
//! Offsets inside the 4 KiB window that hold no register read as 0 and ignore writes, as
//! reserved registers do. Accesses outside the window, or not naturally aligned, are
//! errors: no hardware would decode them.

use std::sync::atomic::Ordering;

use super::Unit;
use super::event::EventSource;
use super::regs::{self, FRCD_BASE, FRCD_BYTES, FRCD_END, ccmd, event, frcd, fsts, gcmd, iotlb};
use super::tables::ADDR_MASK;

/// An MMIO access no register decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MmioError {
    /// The access reaches outside the register window.
    #[error("register offset {offset:#x} (+{width} bytes) is outside the {:#x}-byte window", regs::WINDOW_SIZE)]
    OutOfWindow {
        /// Offset of the access.
        offset: u64,
        /// Width in bytes.
        width: u64,
    },
    /// The access is not naturally aligned.
    #[error("register offset {offset:#x} is not aligned to the {width}-byte access")]
    Misaligned {
        /// Offset of the access.
        offset: u64,
        /// Width in bytes.
        width: u64,
    },
}

/// Register state not mirrored into atomics.
#[derive(Debug, Default)]
pub(crate) struct RegisterFile {
    gsts: u32,
    rtaddr: u64,
    ccmd: u64,
    iva: u64,
    iotlb: u64,
    irta: u64,
}

impl RegisterFile {
    /// Back to the reset value of every register held here: GSTS, RTADDR, CCMD, IVA,
    /// IOTLB_REG and IRTA all reset to 0 (VT-d 10.4.5-10.4.8, 10.4.30).
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }
}

fn check(offset: u64, width: u64) -> Result<(), MmioError> {
    if offset.checked_add(width).is_none_or(|end| end > regs::WINDOW_SIZE) {
        return Err(MmioError::OutOfWindow { offset, width });
    }
    if !offset.is_multiple_of(width) {
        return Err(MmioError::Misaligned { offset, width });
    }
    Ok(())
}

/// The 8-byte slot a 32-bit register at `offset` sits in.
const fn slot(offset: u64) -> u64 {
    offset & !7
}

impl Unit {
    /// Reads a 32-bit register.
    pub fn read32(&self, offset: u64) -> Result<u32, MmioError> {
        check(offset, 4)?;
        let q = self.read_slot(offset & !7);
        Ok(if offset & 4 == 0 { q as u32 } else { (q >> 32) as u32 })
    }

    /// Reads a 64-bit register (or two adjacent 32-bit ones).
    pub fn read64(&self, offset: u64) -> Result<u64, MmioError> {
        check(offset, 8)?;
        Ok(self.read_slot(offset))
    }

    /// Writes a 32-bit register.
    pub fn write32(&self, offset: u64, value: u32) -> Result<(), MmioError> {
        check(offset, 4)?;
        self.write_dword(offset, value);
        Ok(())
    }

    /// Writes a 64-bit register (or two adjacent 32-bit ones, low first).
    pub fn write64(&self, offset: u64, value: u64) -> Result<(), MmioError> {
        check(offset, 8)?;
        match offset {
            regs::RTADDR | regs::CCMD | regs::IVA | regs::IOTLB | regs::IRTA => {
                self.write_qword(offset, value, true, true)
            }
            regs::IQA | regs::IQT => self.write_queue_reg64(offset, value),
            o if (FRCD_BASE..FRCD_END).contains(&o) => self.write_qword(offset, value, true, true),
            _ => {
                self.write_dword(offset, value as u32);
                self.write_dword(offset + 4, (value >> 32) as u32);
            }
        }
        Ok(())
    }

    /// The 8-byte slot at `offset` (8-aligned).
    fn read_slot(&self, offset: u64) -> u64 {
        let r = self.regs.lock();
        match offset {
            regs::VER => regs::VERSION,
            regs::CAP => regs::cap_value(),
            regs::ECAP => regs::ecap_value(),
            regs::GCMD => u64::from(r.gsts) << 32, // GCMD reads as 0; GSTS above it
            regs::RTADDR => r.rtaddr,
            regs::CCMD => r.ccmd,
            o if o == slot(regs::FSTS) => {
                drop(r);
                // Reading FSTS lets time pass, so software that polls it sees time-outs.
                self.poll(self.clock.now());
                u64::from(self.faults.fsts_bits() | self.queue_fsts()) << 32
            }
            o if o == regs::IQH
                || o == regs::IQT
                || o == regs::IQA
                || o == slot(regs::ICS)
                || o == regs::IECTL
                || o == regs::IEADDR
                || o == regs::IQERCD =>
            {
                drop(r);
                self.read_queue_slot(offset)
            }
            regs::FECTL | regs::FEADDR => {
                let rel = offset - regs::FECTL;
                u64::from(self.faults.read_event(rel)) | (u64::from(self.faults.read_event(rel + 4)) << 32)
            }
            regs::IVA => r.iva,
            regs::IRTA => r.irta,
            regs::IOTLB => r.iotlb,
            o if regs::PRQ_REGS.contains(&o) => {
                drop(r);
                self.prq.read64(o)
            }
            o if o == slot(regs::PMEN) || regs::PMR_REGS.contains(&o) => {
                drop(r);
                self.pmr.read_slot(o)
            }
            o if (FRCD_BASE..FRCD_END).contains(&o) => {
                let rel = o - FRCD_BASE;
                self.faults.frcd((rel / FRCD_BYTES) as usize, ((rel / 8) % 2) as usize)
            }
            _ => 0,
        }
    }

    fn write_dword(&self, offset: u64, value: u32) {
        match offset {
            regs::GCMD => self.write_gcmd(value),
            regs::FSTS => {
                if value & fsts::PFO != 0 {
                    self.faults.clear_pfo();
                }
                self.clear_queue_errors(value);
                // VT-d 10.4.10: a held fault event is withdrawn once all is serviced.
                self.withdraw_fault_event();
            }
            o if (regs::FECTL..regs::FECTL + event::BYTES).contains(&o) => {
                self.faults.write_event(o - regs::FECTL, value, &*self.events)
            }
            o if o == regs::ICS || (regs::IECTL..regs::IECTL + event::BYTES).contains(&o) => {
                self.write_queue_reg32(offset, value)
            }
            o if regs::PMR_REGS.contains(&o) => self.pmr.write32(o, value),
            o if regs::PRQ_REGS.contains(&o) => {
                if let Some((addr, data)) = self.prq.write32(o, value) {
                    self.events.interrupt_message(EventSource::PageRequest, addr, data);
                }
            }
            o if matches!(slot(o), regs::IQA | regs::IQT) => {
                let old = self.read_queue_slot(slot(o));
                let merged = if o & 4 == 0 {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                self.write_queue_reg64(slot(o), merged);
            }
            o if matches!(slot(o), regs::RTADDR | regs::CCMD | regs::IVA | regs::IOTLB | regs::IRTA)
                || (FRCD_BASE..FRCD_END).contains(&o) =>
            {
                let high = o & 4 != 0;
                let shifted = if high { u64::from(value) << 32 } else { u64::from(value) };
                self.write_qword(slot(o), shifted, !high, high);
            }
            _ => {}
        }
    }

    /// Writes the halves selected by `lo`/`hi` of the 64-bit register at `offset`.
    fn write_qword(&self, offset: u64, value: u64, lo: bool, hi: bool) {
        let mask = (if lo { 0xffff_ffff } else { 0 }) | (if hi { 0xffff_ffff_0000_0000 } else { 0 });
        let merge = |old: u64| (old & !mask) | (value & mask);
        match offset {
            regs::RTADDR => {
                let mut r = self.regs.lock();
                r.rtaddr = merge(r.rtaddr);
            }
            regs::IVA => {
                let mut r = self.regs.lock();
                r.iva = merge(r.iva);
            }
            regs::IRTA => {
                let mut r = self.regs.lock();
                r.irta = merge(r.irta);
            }
            regs::CCMD => {
                let v = {
                    let mut r = self.regs.lock();
                    r.ccmd = merge(r.ccmd);
                    r.ccmd
                };
                // The command runs when the half holding ICC is written.
                if hi && v & ccmd::ICC != 0 {
                    let done = self.exec_ccmd(v);
                    self.regs.lock().ccmd = done;
                }
            }
            regs::IOTLB => {
                let (v, iva) = {
                    let mut r = self.regs.lock();
                    r.iotlb = merge(r.iotlb);
                    (r.iotlb, r.iva)
                };
                if hi && v & iotlb::IVT != 0 {
                    let done = self.exec_iotlb(v, iva);
                    self.regs.lock().iotlb = done;
                }
            }
            o => {
                // FRCD: writing 1 to F (bit 127, i.e. bit 63 of the high quadword) clears it.
                let rel = o - FRCD_BASE;
                if rel % FRCD_BYTES == 8 && hi && value & frcd::F != 0 {
                    self.faults.clear_frcd((rel / FRCD_BYTES) as usize);
                    // VT-d 10.4.10: the last F cleared (PPF clear) may withdraw the event.
                    self.withdraw_fault_event();
                }
            }
        }
    }

    /// GCMD (VT-d 10.4.4): one command per write; the status bits follow at once.
    fn write_gcmd(&self, value: u32) {
        let mut r = self.regs.lock();
        if value & gcmd::SRTP != 0 {
            // Latch the root table pointer; scalable mode (RTADDR.TTM) is not supported, so
            // only the address is used.
            self.root_table.store(r.rtaddr & ADDR_MASK, Ordering::Release);
            r.gsts |= gcmd::SRTP; // RTPS sits at the same position as SRTP
        }
        // Interrupt remapping (VT-d 10.4.4): SIRTP latches IRTA (the interrupt entry cache
        // is not flushed: CAP.ESIRTPS = 0), IRE enables remapping, CFI lets
        // compatibility-format interrupts through.
        if value & gcmd::SIRTP != 0 {
            self.interrupts.set_table(r.irta);
            r.gsts |= gcmd::SIRTP;
        }
        let ire = value & gcmd::IRE != 0;
        if ire != (r.gsts & gcmd::IRE != 0) {
            r.gsts ^= gcmd::IRE; // IRES
            self.interrupts.enable(ire);
        }
        let cfi = value & gcmd::CFI != 0;
        if cfi != (r.gsts & gcmd::CFI != 0) {
            r.gsts ^= gcmd::CFI; // CFIS
            self.interrupts.set_compat_allowed(cfi);
        }
        let qie = value & gcmd::QIE != 0;
        if qie != (r.gsts & gcmd::QIE != 0) {
            r.gsts ^= gcmd::QIE; // QIES sits at the same position as QIE
            self.set_queue_enabled(qie);
        }
        let te = value & gcmd::TE != 0;
        if te != (r.gsts & gcmd::TE != 0) {
            if te {
                r.gsts |= gcmd::TE;
            } else {
                r.gsts &= !gcmd::TE;
            }
            self.translation_enabled.store(te, Ordering::Release);
            tracing::debug!(enabled = te, "DMA remapping translation enable changed");
        }
    }
}
