//! Register map of the remapping unit (VT-d 10.4; VTD-REFERENCE b.1, b.2): offsets, field
//! positions, and the capability values dmar advertises.
//!
//! This module is the single home of register bit positions. The behaviour behind a
//! register write (handshakes, invalidation, fault clearing) lives in `unit::mmio`.

/// VER_REG (32): version 1.0.
pub const VER: u64 = 0x00;
/// CAP_REG (64).
pub const CAP: u64 = 0x08;
/// ECAP_REG (64).
pub const ECAP: u64 = 0x10;
/// GCMD_REG (32, write-only).
pub const GCMD: u64 = 0x18;
/// GSTS_REG (32, read-only).
pub const GSTS: u64 = 0x1c;
/// RTADDR_REG (64).
pub const RTADDR: u64 = 0x20;
/// CCMD_REG (64): context command.
pub const CCMD: u64 = 0x28;
/// FSTS_REG (32): fault status.
pub const FSTS: u64 = 0x34;
/// FECTL_REG (32): fault event control.
pub const FECTL: u64 = 0x38;
/// FEDATA_REG (32).
pub const FEDATA: u64 = 0x3c;
/// FEADDR_REG (32).
pub const FEADDR: u64 = 0x40;
/// FEUADDR_REG (32).
pub const FEUADDR: u64 = 0x44;
/// Invalidation queue head (64; QH[18:4], hardware-owned).
pub const IQH: u64 = 0x80;
/// Invalidation queue tail (64; QT[18:4], software-owned).
pub const IQT: u64 = 0x88;
/// Invalidation queue address (64): IQA[63:12], DW 11, QS[2:0].
pub const IQA: u64 = 0x90;
/// Invalidation completion status (32): IWC bit 0, write 1 to clear.
pub const ICS: u64 = 0x9c;
/// Invalidation event control (32): IM 31, IP 30.
pub const IECTL: u64 = 0xa0;
/// Invalidation event data.
pub const IEDATA: u64 = 0xa4;
/// Invalidation event address.
pub const IEADDR: u64 = 0xa8;
/// Invalidation event upper address.
pub const IEUADDR: u64 = 0xac;
/// Invalidation queue error record (64): IQEI[3:0], ITESID[47:32], ICESID[63:48].
pub const IQERCD: u64 = 0xb0;
/// Interrupt remapping table address (64): IRTA[63:12], EIME 11, S[3:0].
pub const IRTA: u64 = 0xb8;
/// IOTLB register block offset (ECAP.IRO × 16): IVA_REG; IOTLB_REG is at +8.
pub const IVA: u64 = 0xf0;
/// IOTLB_REG (64).
pub const IOTLB: u64 = IVA + 8;
/// First fault recording register (CAP.FRO × 16); each is 16 bytes.
pub const FRCD_BASE: u64 = 0x220;
/// Number of fault recording registers (CAP.NFR + 1).
pub const NUM_FAULT_RECORDS: usize = 8;
/// Size of the register window in bytes.
pub const WINDOW_SIZE: u64 = 0x1000;

/// GCMD/GSTS bits (the same positions in both registers).
pub mod gcmd {
    /// Translation enable.
    pub const TE: u32 = 1 << 31;
    /// Set root table pointer (GSTS: RTPS, root table pointer status).
    pub const SRTP: u32 = 1 << 30;
    /// Write buffer flush.
    pub const WBF: u32 = 1 << 27;
    /// Queued invalidation enable.
    pub const QIE: u32 = 1 << 26;
    /// Interrupt remapping enable.
    pub const IRE: u32 = 1 << 25;
    /// Set interrupt remap table pointer.
    pub const SIRTP: u32 = 1 << 24;
    /// Compatibility format interrupt.
    pub const CFI: u32 = 1 << 23;
}

/// CCMD fields.
pub mod ccmd {
    /// Invalidate context cache (set by software, cleared by hardware when done).
    pub const ICC: u64 = 1 << 63;
    /// CIRG (request granularity) shift; CAIG (actual granularity) is at 59.
    pub const CIRG_SHIFT: u32 = 61;
    /// CAIG shift.
    pub const CAIG_SHIFT: u32 = 59;
    /// Global granularity.
    pub const GLOBAL: u64 = 1;
    /// Domain-selective granularity.
    pub const DOMAIN: u64 = 2;
    /// Device-selective granularity.
    pub const DEVICE: u64 = 3;
    /// FM (function mask) shift, 2 bits.
    pub const FM_SHIFT: u32 = 32;
    /// SID shift, 16 bits.
    pub const SID_SHIFT: u32 = 16;
}

/// IOTLB_REG and IVA_REG fields.
pub mod iotlb {
    /// Invalidate IOTLB (set by software, cleared by hardware when done).
    pub const IVT: u64 = 1 << 63;
    /// IIRG shift (request granularity).
    pub const IIRG_SHIFT: u32 = 60;
    /// IAIG shift (actual granularity).
    pub const IAIG_SHIFT: u32 = 57;
    /// Global.
    pub const GLOBAL: u64 = 1;
    /// Domain-selective.
    pub const DOMAIN: u64 = 2;
    /// Page-selective within a domain.
    pub const PAGE: u64 = 3;
    /// Drain reads.
    pub const DR: u64 = 1 << 49;
    /// Drain writes.
    pub const DW: u64 = 1 << 48;
    /// DID shift, 16 bits.
    pub const DID_SHIFT: u32 = 32;
    /// IVA: invalidation hint (leaf entries only; keep paging-structure caches).
    pub const IVA_IH: u64 = 1 << 6;
    /// IVA: address mask field (2^AM pages).
    pub const IVA_AM_MASK: u64 = 0x3f;
}

/// FSTS bits.
pub mod fsts {
    /// Primary fault overflow.
    pub const PFO: u32 = 1 << 0;
    /// Primary pending fault.
    pub const PPF: u32 = 1 << 1;
    /// Invalidation queue error.
    pub const IQE: u32 = 1 << 4;
    /// Invalidation completion error.
    pub const ICE: u32 = 1 << 5;
    /// Invalidation time-out error.
    pub const ITE: u32 = 1 << 6;
    /// Fault record index shift (8 bits).
    pub const FRI_SHIFT: u32 = 8;
    /// Bits software clears by writing 1 (RW1C).
    pub const RW1C: u32 = PFO | IQE | ICE | ITE;
}

/// FECTL bits.
pub mod fectl {
    /// Interrupt mask.
    pub const IM: u32 = 1 << 31;
    /// Interrupt pending.
    pub const IP: u32 = 1 << 30;
}

/// Largest page-selective invalidation the unit accepts, as an address-mask value
/// (CAP.MAMV; QEMU and Linux use 18, i.e. 1 GiB).
pub const MAMV: u64 = 18;

/// The CAP value dmar advertises: exactly what the model implements.
///
/// ND=6 (16-bit domain ids), SAGAW 39/48/57-bit, MGAW=57, FRO, NFR, PSI with MAMV,
/// 2 MiB and 1 GiB second-stage superpages, DRD/DWD. Not set: RWBF (no write-buffer
/// flushing needed), CM (not-present entries are never cached), PLMR/PHMR (no protected
/// memory regions), ZLR.
pub const fn cap_value() -> u64 {
    let nd = 6u64;
    let sagaw = (1u64 << 1) | (1 << 2) | (1 << 3); // bits 9, 10, 11 of CAP
    let mgaw = 57u64 - 1;
    let fro = FRCD_BASE / 16;
    let sslps = 0b11u64; // 2M and 1G
    let psi = 1u64 << 39;
    let nfr = (NUM_FAULT_RECORDS as u64) - 1;
    nd | (sagaw << 8)
        | (mgaw << 16)
        | (fro << 24)
        | (sslps << 34)
        | psi
        | (nfr << 40)
        | (MAMV << 48)
        | (1 << 54)
        | (1 << 55)
}

/// The ECAP value dmar advertises: device-TLB (DT) and pass-through (PT), with the IOTLB
/// registers at IRO. Queued invalidation and interrupt remapping are advertised only once
/// the model implements them.
pub const fn ecap_value() -> u64 {
    let qi = 1u64 << 1;
    let ir = 1u64 << 3;
    let eim = 1u64 << 4;
    let dt = 1u64 << 2;
    let pt = 1u64 << 6;
    let iro = IVA / 16;
    qi | dt | ir | eim | pt | (iro << 8) | super::prq::ECAP_PRS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_decode_to_what_the_model_implements() {
        let cap = cap_value();
        assert_eq!(cap & 7, 6, "ND");
        assert_eq!((cap >> 8) & 0x1f, 0b01110, "SAGAW 39/48/57");
        assert_eq!(((cap >> 16) & 0x3f) + 1, 57, "MGAW");
        assert_eq!(((cap >> 24) & 0x3ff) * 16, FRCD_BASE, "FRO");
        assert_eq!(((cap >> 40) & 0xff) + 1, NUM_FAULT_RECORDS as u64, "NFR");
        assert_eq!((cap >> 48) & 0x3f, MAMV, "MAMV");
        assert_ne!(cap & (1 << 39), 0, "PSI");
        assert_eq!(cap & (1 << 7), 0, "CM clear");
        let ecap = ecap_value();
        assert_eq!(((ecap >> 8) & 0x3ff) * 16, IVA, "IRO");
        assert_ne!(ecap & (1 << 6), 0, "PT is in ECAP, not CAP");
        assert_ne!(ecap & 0b10, 0, "QI");
        assert_ne!(ecap & 0b1000, 0, "IR");
        assert_ne!(ecap & (1 << 29), 0, "PRS");
    }
}
