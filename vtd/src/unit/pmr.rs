//! DMA protected memory regions (PMRs; VT-d 10.4.16-10.4.20): two host address ranges,
//! the low region below 4 GiB (PLMBASE, PLMLIMIT) and the high region (PHMBASE,
//! PHMLIMIT), that firmware fences off from device DMA until the OS has remapping set up.
//!
//! Owns the five registers and the region test: PMEN.EPM switches both regions on and off
//! together, PMEN.PRS reports the switch, and [`ProtectedMemory::blocks`] says whether an
//! access overlaps an enabled region. It does not decide which requests are subject to
//! the test (the request path does, `request`), and nothing it blocks is a fault: VT-d
//! 10.4.16 says "DMA requests blocked due to protected memory region violation are not
//! recorded or reported as remapping faults", so nothing here touches the fault recorder.
//!
//! Semantics, per register (positions in `regs::pmen` and `regs::pmr`):
//! - PMEN (VT-d 10.4.16): EPM (bit 31) read-write, PRS (bit 0) read-only, the rest
//!   reserved. The unit switches at once, so PRS reads what EPM last took, and a request
//!   that starts after the write completes sees the new state (there is no queue of
//!   translated requests to drain before PRS sets).
//! - PLMBASE, PLMLIMIT (VT-d 10.4.17, 10.4.18): bits 31:21 implemented, 20:0 read 0; the
//!   region is `[PLMBASE, PLMLIMIT | 0x1f_ffff]`, and a limit below the base disables it.
//! - PHMBASE, PHMLIMIT (VT-d 10.4.19, 10.4.20): bits HAW-1:21 implemented, the rest read
//!   0; the same rule.
//! - "Software must not modify this register when protected memory regions are enabled
//!   (PRS field Set)" (VT-d 10.4.17-10.4.20) leaves such a write undefined; the unit ignores
//!   it, so an enabled region is exactly what was programmed when EPM was set.
//!
//! All five reset to 0 (EPM clear: no region enforced).

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::regs::{self, pmen, pmr};

/// The register values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Registers {
    /// PMEN.EPM, and with it PRS.
    epm: bool,
    plmbase: u32,
    plmlimit: u32,
    phmbase: u64,
    phmlimit: u64,
}

impl Registers {
    /// The first and last byte of a region programmed with `base` and `limit` (implemented
    /// bits only), or `None` when the limit is below the base (VT-d 10.4.18, 10.4.20).
    fn region(base: u64, limit: u64) -> Option<(u64, u64)> {
        (limit >= base).then_some((base, limit | (pmr::GRANULE - 1)))
    }

    /// Whether the bytes `addr..=last` overlap a region. Does not look at EPM.
    fn covers(&self, addr: u64, last: u64) -> bool {
        [Self::region(u64::from(self.plmbase), u64::from(self.plmlimit)), Self::region(self.phmbase, self.phmlimit)]
            .into_iter()
            .flatten()
            .any(|(first, end)| addr <= end && last >= first)
    }

    fn pmen(&self) -> u32 {
        if self.epm { pmen::EPM | pmen::PRS } else { 0 }
    }
}

/// The protected memory registers of one unit and the test requests go through.
#[derive(Debug, Default)]
pub(crate) struct ProtectedMemory {
    /// PMEN.EPM, mirrored for the request path: while it reads false, a request pays this
    /// one relaxed load and nothing else.
    enabled: AtomicBool,
    regs: Mutex<Registers>,
}

impl ProtectedMemory {
    /// Whether an access to host addresses `[addr, addr + len)` is refused: EPM is set and
    /// the range overlaps the low or the high region. A zero-length access is tested as
    /// one byte; a range that wraps the address space is tested up to its end.
    #[inline]
    pub(crate) fn blocks(&self, addr: u64, len: u64) -> bool {
        self.enabled.load(Ordering::Relaxed) && self.blocks_enabled(addr, len)
    }

    /// The test proper, under the register lock, so a request never sees a region half
    /// programmed; only reached while EPM is set (firmware's window, not the OS's).
    #[cold]
    #[inline(never)]
    fn blocks_enabled(&self, addr: u64, len: u64) -> bool {
        let last = addr.saturating_add(len.max(1) - 1);
        let r = self.regs.lock();
        r.epm && r.covers(addr, last)
    }

    /// The 8-byte slot at `slot` (8-aligned) among the protected memory registers: PMEN in
    /// the high half of its slot (the low half, 0x60, is reserved), PLMBASE|PLMLIMIT,
    /// PHMBASE, PHMLIMIT.
    pub(crate) fn read_slot(&self, slot: u64) -> u64 {
        let r = self.regs.lock();
        match slot {
            s if s == regs::PMEN & !7 => u64::from(r.pmen()) << 32,
            regs::PLMBASE => u64::from(r.plmbase) | (u64::from(r.plmlimit) << 32),
            regs::PHMBASE => r.phmbase,
            regs::PHMLIMIT => r.phmlimit,
            _ => 0,
        }
    }

    /// Writes the 32-bit register (or half of a 64-bit one) at `offset` within
    /// [`regs::PMR_REGS`]. Writes to PRS, reserved bits and unimplemented bits are dropped;
    /// so are writes to a base or limit while PRS is set (see the module docs).
    pub(crate) fn write32(&self, offset: u64, value: u32) {
        let mut r = self.regs.lock();
        if offset == regs::PMEN {
            let epm = value & pmen::EPM != 0;
            if epm != r.epm {
                r.epm = epm;
                self.enabled.store(epm, Ordering::Release);
                tracing::debug!(enabled = epm, "protected memory regions changed");
            }
            return;
        }
        if r.epm {
            return;
        }
        let half = |old: u64| {
            if offset & 4 == 0 {
                (old & !0xffff_ffff) | u64::from(value)
            } else {
                (old & 0xffff_ffff) | (u64::from(value) << 32)
            }
        };
        match offset & !7 {
            regs::PLMBASE if offset == regs::PLMBASE => r.plmbase = value & pmr::LOW_MASK,
            regs::PLMBASE => r.plmlimit = value & pmr::LOW_MASK,
            regs::PHMBASE => r.phmbase = half(r.phmbase) & pmr::HIGH_MASK,
            regs::PHMLIMIT => r.phmlimit = half(r.phmlimit) & pmr::HIGH_MASK,
            _ => {}
        }
    }

    /// Firmware's pre-boot DMA protection: the low region over `[0, min(size, 4 GiB))`,
    /// the high region over `[4 GiB, size)` when memory reaches past 4 GiB, and EPM set, as
    /// firmware programs them through the registers (the sequence in the unit's module
    /// docs). `size` is a multiple of the 2 MiB granule (`HostMemory` sizes are).
    pub(crate) fn protect_all(&self, size: u64) {
        const FOUR_GIB: u64 = 1 << 32;
        let last = |end: u64| end.saturating_sub(1) & !(pmr::GRANULE - 1);
        let mut r = self.regs.lock();
        r.plmbase = 0;
        r.plmlimit = (last(size.min(FOUR_GIB)) as u32) & pmr::LOW_MASK;
        (r.phmbase, r.phmlimit) = if size > FOUR_GIB { (FOUR_GIB, last(size) & pmr::HIGH_MASK) } else { (0, 0) };
        r.epm = true;
        self.enabled.store(true, Ordering::Release);
    }

    /// Back to the reset values (VT-d 10.4.16-10.4.20): EPM and PRS clear, every base
    /// and limit 0.
    pub(crate) fn reset(&self) {
        let mut r = self.regs.lock();
        *r = Registers::default();
        self.enabled.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn programmed(plm: (u32, u32), phm: (u64, u64)) -> ProtectedMemory {
        let p = ProtectedMemory::default();
        p.write32(regs::PLMBASE, plm.0);
        p.write32(regs::PLMLIMIT, plm.1);
        for (reg, v) in [(regs::PHMBASE, phm.0), (regs::PHMLIMIT, phm.1)] {
            p.write32(reg, v as u32);
            p.write32(reg + 4, (v >> 32) as u32);
        }
        p.write32(regs::PMEN, pmen::EPM);
        p
    }

    #[test]
    fn a_base_equal_to_its_limit_protects_one_granule() {
        let p = programmed((0x40_0000, 0x40_0000), (1, 0));
        assert!(!p.blocks(0x3f_ffff, 1));
        assert!(p.blocks(0x40_0000, 1));
        assert!(p.blocks(0x5f_ffff, 1));
        assert!(!p.blocks(0x60_0000, 1));
        assert!(p.blocks(0x3f_ffff, 2), "straddles the base");
        assert!(p.blocks(0x5f_ffff, 2), "straddles the end");
        assert!(p.blocks(0x40_0000, 0), "zero length tests one byte");
    }

    #[test]
    fn a_limit_below_its_base_disables_the_region() {
        let p = programmed((0x80_0000, 0x60_0000), (0x1_0000_0000, 0x1_0000_0000 + 14 * MIB));
        assert!(!p.blocks(0x70_0000, 1), "low region disabled");
        assert!(p.blocks(0x1_0000_0000 + 15 * MIB, 1), "high region to the end of its last 2 MiB");
        assert!(!p.blocks(0x1_0000_0000 + 16 * MIB, 1));
    }

    #[test]
    fn nothing_is_blocked_without_epm_and_writes_wait_for_it_to_clear() {
        let p = programmed((0, 0xffff_ffff), (1, 0));
        assert!(p.blocks(0, 1));
        p.write32(regs::PLMLIMIT, 0);
        assert_eq!(p.read_slot(regs::PLMBASE) >> 32, 0xffe0_0000, "ignored while PRS is set");
        p.write32(regs::PMEN, 0);
        assert!(!p.blocks(0, u64::MAX));
        assert_eq!(p.read_slot(regs::PMEN & !7), 0);
        p.write32(regs::PLMLIMIT, 0);
        assert_eq!(p.read_slot(regs::PLMBASE) >> 32, 0);
    }

    #[test]
    fn wrapping_ranges_are_tested_up_to_the_top() {
        let p = programmed((1, 0), (0x3fff_ffe0_0000, 0x3fff_ffe0_0000));
        assert!(p.blocks(0x3fff_ffff_ffff, u64::MAX));
        assert!(!p.blocks(u64::MAX, 1), "above the host address width");
    }
}
