//! Register map of the remapping unit (VT-d 10.4): offsets, field positions, the small
//! `Copy` types for the registers both sides decode ([`Iqercd`]), and the capability values
//! dmar advertises.
//!
//! This module is the single home of register offsets and bit positions: the unit (which
//! implements the registers) and the driver (which programs them) both name them from
//! here. The behaviour behind a register write (handshakes, invalidation, fault clearing)
//! lives with the hardware that owns it (`unit::mmio` dispatches). Descriptor and table
//! entry layouts are not registers: they live with their codecs (`unit::invalidation::
//! descriptor`, `unit::prq`, `unit::tables`, `unit::interrupt::irte`).

/// VER_REG (32; VT-d 10.4.1).
pub const VER: u64 = 0x00;
/// CAP_REG (64; VT-d 10.4.2).
pub const CAP: u64 = 0x08;
/// ECAP_REG (64; VT-d 10.4.3).
pub const ECAP: u64 = 0x10;
/// GCMD_REG (32, write-only; VT-d 10.4.4).
pub const GCMD: u64 = 0x18;
/// GSTS_REG (32, read-only; VT-d 10.4.5).
pub const GSTS: u64 = 0x1c;
/// RTADDR_REG (64; VT-d 10.4.6).
pub const RTADDR: u64 = 0x20;
/// CCMD_REG (64; VT-d 10.4.7): context command.
pub const CCMD: u64 = 0x28;
/// FSTS_REG (32; VT-d 10.4.9): fault status.
pub const FSTS: u64 = 0x34;
/// FECTL_REG (32; VT-d 10.4.10): fault event control. The fault event's register block
/// (FECTL, FEDATA, FEADDR, FEUADDR) starts here; see [`event`].
pub const FECTL: u64 = 0x38;
/// FEDATA_REG (32; VT-d 10.4.11).
pub const FEDATA: u64 = FECTL + event::DATA;
/// FEADDR_REG (32; VT-d 10.4.12).
pub const FEADDR: u64 = FECTL + event::ADDR;
/// FEUADDR_REG (32; VT-d 10.4.13).
pub const FEUADDR: u64 = FECTL + event::UADDR;
/// PMEN_REG (32; VT-d 10.4.16): protected memory enable; see [`pmen`] and `unit::pmr`.
pub const PMEN: u64 = 0x64;
/// PLMBASE_REG (32; VT-d 10.4.17): base of the protected low-memory region; see [`pmr`].
pub const PLMBASE: u64 = 0x68;
/// PLMLIMIT_REG (32; VT-d 10.4.18): last byte of the protected low-memory region.
pub const PLMLIMIT: u64 = 0x6c;
/// PHMBASE_REG (64; VT-d 10.4.19): base of the protected high-memory region.
pub const PHMBASE: u64 = 0x70;
/// PHMLIMIT_REG (64; VT-d 10.4.20): last byte of the protected high-memory region.
pub const PHMLIMIT: u64 = 0x78;
/// Every offset the protected memory registers decode, PMEN to PHMLIMIT.
pub const PMR_REGS: std::ops::Range<u64> = PMEN..PHMLIMIT + 8;
/// Invalidation queue head (64; VT-d 10.4.21): `QH[18:4]`, hardware-owned.
pub const IQH: u64 = 0x80;
/// Invalidation queue tail (64; VT-d 10.4.22): `QT[18:4]`, software-owned.
pub const IQT: u64 = 0x88;
/// Invalidation queue address (64; VT-d 10.4.23): `IQA[63:12]`, DW 11, `QS[2:0]`.
pub const IQA: u64 = 0x90;
/// Invalidation completion status (32; VT-d 10.4.24): IWC bit 0, write 1 to clear.
pub const ICS: u64 = 0x9c;
/// Invalidation event control (32; VT-d 10.4.25). The invalidation event's register block
/// (IECTL, IEDATA, IEADDR, IEUADDR) starts here; see [`event`].
pub const IECTL: u64 = 0xa0;
/// Invalidation event data (VT-d 10.4.26).
pub const IEDATA: u64 = IECTL + event::DATA;
/// Invalidation event address (VT-d 10.4.27).
pub const IEADDR: u64 = IECTL + event::ADDR;
/// Invalidation event upper address (VT-d 10.4.28).
pub const IEUADDR: u64 = IECTL + event::UADDR;
/// Invalidation queue error record (64; VT-d 10.4.29): see [`Iqercd`].
pub const IQERCD: u64 = 0xb0;
/// Interrupt remapping table address (64; VT-d 10.4.30): see [`irta`].
pub const IRTA: u64 = 0xb8;
/// PQH_REG (64; VT-d 10.4.31): page request queue head, a byte offset software advances.
pub const PQH: u64 = 0xc0;
/// PQT_REG (64; VT-d 10.4.32): page request queue tail, a byte offset hardware advances.
pub const PQT: u64 = 0xc8;
/// PQA_REG (64; VT-d 10.4.33): page request queue address and size; see [`pq`].
pub const PQA: u64 = 0xd0;
/// PRS_REG (32; VT-d 10.4.34): page request status; see [`prs`].
pub const PRS: u64 = 0xdc;
/// PECTL_REG (32; VT-d 10.4.35): page request event control. The page request event's
/// register block (PECTL, PEDATA, PEADDR, PEUADDR) starts here; see [`event`].
pub const PECTL: u64 = 0xe0;
/// PEDATA_REG (32; VT-d 10.4.36).
pub const PEDATA: u64 = PECTL + event::DATA;
/// PEADDR_REG (32; VT-d 10.4.37): bits 31:2 of the message address.
pub const PEADDR: u64 = PECTL + event::ADDR;
/// PEUADDR_REG (32; VT-d 10.4.38).
pub const PEUADDR: u64 = PECTL + event::UADDR;
/// Every offset the page request queue decodes, PQH to PEUADDR (0xd8 is reserved and
/// reads 0).
pub const PRQ_REGS: std::ops::Range<u64> = PQH..PEUADDR + 4;
/// IOTLB register block offset (ECAP.IRO × 16): IVA_REG (VT-d 10.4.8.2); IOTLB_REG is at +8.
pub const IVA: u64 = 0xf0;
/// IOTLB_REG (64; VT-d 10.4.8.1).
pub const IOTLB: u64 = IVA + 8;
/// First fault recording register (CAP.FRO × 16; VT-d 10.4.14); each is 16 bytes.
pub const FRCD_BASE: u64 = 0x220;
/// Bytes per fault recording register.
pub const FRCD_BYTES: u64 = 16;
/// Number of fault recording registers (CAP.NFR + 1).
pub const NUM_FAULT_RECORDS: usize = 8;
/// One past the last fault recording register.
pub const FRCD_END: u64 = FRCD_BASE + FRCD_BYTES * NUM_FAULT_RECORDS as u64;
/// Size of the register window in bytes.
pub const WINDOW_SIZE: u64 = 0x1000;

/// VER_REG: architecture version 1.0 (major in bits 7:4, minor in 3:0).
pub const VERSION: u64 = 0x10;

/// The register block of one interrupt-generating event (VT-d 10.4.10-10.4.13 fault event,
/// 10.4.25-10.4.28 invalidation event, 10.4.35-10.4.38 page request event): the control
/// register, then the message data, address and upper address, 4 bytes apart.
pub mod event {
    /// xxCTL: IM and IP.
    pub const CTL: u64 = 0;
    /// xxDATA: the message data.
    pub const DATA: u64 = 4;
    /// xxADDR: bits 31:2 of the message address.
    pub const ADDR: u64 = 8;
    /// xxUADDR: bits 63:32 of the message address.
    pub const UADDR: u64 = 12;
    /// Size of the block.
    pub const BYTES: u64 = 16;
    /// xxCTL.IM: interrupt mask (set at reset).
    pub const IM: u32 = 1 << 31;
    /// xxCTL.IP: interrupt pending (read-only to software).
    pub const IP: u32 = 1 << 30;
    /// xxADDR bits 1:0 are reserved: the address is DWORD aligned.
    pub const ADDR_MASK: u32 = !3;
}

/// GCMD/GSTS bits (the same positions in both registers; VT-d 10.4.4, 10.4.5).
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
    /// GSTS bits that reflect persistent state; the rest report one-shot commands and must
    /// not be written back into GCMD (VT-d 10.4.4: "Status & 0x96FFFFFF").
    pub const PERSISTENT: u32 = 0x96ff_ffff;
}

/// CCMD fields (VT-d 10.4.7).
pub mod ccmd {
    /// Invalidate context cache (set by software, cleared by hardware when done).
    pub const ICC: u64 = 1 << 63;
    /// CIRG (request granularity) shift; CAIG (actual granularity) is at 59.
    pub const CIRG_SHIFT: u32 = 61;
    /// CAIG shift.
    pub const CAIG_SHIFT: u32 = 59;
    /// CIRG and CAIG are 2 bits wide.
    pub const GRANULARITY_MASK: u64 = 3;
    /// Global granularity.
    pub const GLOBAL: u64 = 1;
    /// Domain-selective granularity.
    pub const DOMAIN: u64 = 2;
    /// Device-selective granularity.
    pub const DEVICE: u64 = 3;
    /// FM (function mask) shift, 2 bits.
    pub const FM_SHIFT: u32 = 32;
    /// FM is 2 bits wide.
    pub const FM_MASK: u64 = 3;
    /// SID shift, 16 bits.
    pub const SID_SHIFT: u32 = 16;
    /// DID: bits 15:0.
    pub const DID_MASK: u64 = 0xffff;
}

/// IOTLB_REG and IVA_REG fields (VT-d 10.4.8.1, 10.4.8.2).
pub mod iotlb {
    /// Invalidate IOTLB (set by software, cleared by hardware when done).
    pub const IVT: u64 = 1 << 63;
    /// IIRG shift (request granularity).
    pub const IIRG_SHIFT: u32 = 60;
    /// IAIG shift (actual granularity).
    pub const IAIG_SHIFT: u32 = 57;
    /// IIRG and IAIG are 2 bits wide.
    pub const GRANULARITY_MASK: u64 = 3;
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
    /// DID is 16 bits wide.
    pub const DID_MASK: u64 = 0xffff;
    /// IVA: the page address, bits 63:12.
    pub const IVA_ADDR_MASK: u64 = !0xfff;
    /// IVA: invalidation hint (leaf entries only; keep paging-structure caches).
    pub const IVA_IH: u64 = 1 << 6;
    /// IVA: address mask field (2^AM pages).
    pub const IVA_AM_MASK: u64 = 0x3f;
}

/// FSTS bits (VT-d 10.4.9).
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
    /// The queue errors: each stops the invalidation queue until software clears it.
    pub const QUEUE_ERRORS: u32 = IQE | ICE | ITE;
    /// Bits software clears by writing 1 (RW1C).
    pub const RW1C: u32 = PFO | QUEUE_ERRORS;
}

/// FECTL bits: the same positions as every event control register ([`event::IM`],
/// [`event::IP`]).
pub mod fectl {
    /// Interrupt mask.
    pub const IM: u32 = super::event::IM;
    /// Interrupt pending.
    pub const IP: u32 = super::event::IP;
}

/// Fault recording register fields (VT-d 10.4.14), in the 128-bit register as a low and a
/// high quadword.
pub mod frcd {
    /// Low quadword: FI, the faulting page address, bits 63:12.
    pub const FI_MASK: u64 = !0xfff;
    /// High quadword: SID, bits 79:64 of the register.
    pub const SID_SHIFT: u32 = 0;
    /// SID is 16 bits wide.
    pub const SID_MASK: u64 = 0xffff;
    /// High quadword: PP, a PASID is present, bit 95 of the register.
    pub const PP: u64 = 1 << 31;
    /// High quadword: FR, the fault reason, bits 103:96 of the register.
    pub const FR_SHIFT: u32 = 32;
    /// FR is 8 bits wide.
    pub const FR_MASK: u64 = 0xff;
    /// High quadword: PV, the PASID value, bits 123:104 of the register.
    pub const PV_SHIFT: u32 = 40;
    /// PV is 20 bits wide.
    pub const PV_MASK: u64 = 0xf_ffff;
    /// High quadword: AT, the address type, bits 125:124 of the register.
    pub const AT_SHIFT: u32 = 60;
    /// AT is 2 bits wide.
    pub const AT_MASK: u64 = 3;
    /// Offset of the register's top doubleword, the one holding F: software clears F with
    /// one 32-bit write there (Linux `dmar_fault`).
    pub const F_DWORD: u64 = 12;
    /// High quadword: T, 1 for reads, bit 126 of the register.
    pub const T: u64 = 1 << 62;
    /// High quadword: F, the fault bit, bit 127 of the register; write 1 to clear.
    pub const F: u64 = 1 << 63;
}

/// PMEN_REG bits (VT-d 10.4.16); bits 30:1 are reserved and read 0.
pub mod pmen {
    /// EPM, enable protected memory: software sets it to turn both protected regions on
    /// and clears it to turn them off.
    pub const EPM: u32 = 1 << 31;
    /// PRS, protected region status (read-only): set while the regions are enforced.
    /// Software polls it after changing EPM before changing EPM again (Linux
    /// `iommu_disable_protect_mem_regions`). The unit switches at once, so PRS reads the
    /// value last written to EPM.
    pub const PRS: u32 = 1 << 0;
}

/// Protected memory region base and limit fields (VT-d 10.4.17-10.4.20).
///
/// Each register implements the bits above its N reserved low bits, which read 0 (VT-d
/// 10.4.17: software finds N by writing all ones and looking for the highest zero bit).
/// dmar implements N = 20 for all four, so both regions are 2 MiB granular: a base is
/// decoded with bits 20:0 as zeros, a limit with bits 20:0 as ones (VT-d 10.4.18), and
/// base = limit protects one 2 MiB block. The high registers also do not implement the
/// bits at and above the host address width (VT-d 10.4.19, 10.4.20: "bits 63:HAW"), which
/// read 0 too.
pub mod pmr {
    /// N + 1: the reserved low bits of every base and limit register (bits 20:0).
    pub const GRANULE_SHIFT: u32 = 21;
    /// The region granularity, 2 MiB.
    pub const GRANULE: u64 = 1 << GRANULE_SHIFT;
    /// PLMBASE/PLMLIMIT: the implemented bits, 31:21.
    pub const LOW_MASK: u32 = !((GRANULE as u32) - 1);
    /// PHMBASE/PHMLIMIT: the implemented bits, HAW-1:21.
    pub const HIGH_MASK: u64 = ((1u64 << crate::unit::tables::HOST_ADDRESS_WIDTH) - 1) & !(GRANULE - 1);
}

/// IQH/IQT/IQA fields (VT-d 10.4.21-10.4.23).
pub mod iq {
    /// IQH.QH / IQT.QT: the descriptor index, bits 18:4 (128-bit descriptors).
    pub const OFFSET_MASK: u64 = 0x7_fff0;
    /// IQH/IQT hold a byte offset: index << 4.
    pub const INDEX_SHIFT: u32 = 4;
    /// IQA: the queue base, bits 63:12.
    pub const IQA_BASE_MASK: u64 = !0xfff;
    /// IQA.DW: 256-bit descriptors (needs scalable mode).
    pub const IQA_DW: u64 = 1 << 11;
    /// IQA.QS: 2^(QS+8) 128-bit entries.
    pub const IQA_QS_MASK: u64 = 7;
    /// IQA bits 10:3 are reserved.
    pub const IQA_RESERVED: u64 = 0x7f8;
    /// ICS.IWC: invalidation wait descriptor complete.
    pub const ICS_IWC: u32 = 1 << 0;
}

/// IQERCD_REG (VT-d 10.4.29): why the invalidation queue stopped. `IQEI[3:0]` is valid while
/// FSTS.IQE is set, `ITESID[47:32]` while ITE is, `ICESID[63:48]` while ICE is. Hardware writes
/// each field when it sets the matching FSTS bit; software reads it before clearing that bit
/// (Linux `qi_check_fault`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Iqercd(u64);

impl Iqercd {
    const IQEI_MASK: u64 = 0xf;
    const ITESID_SHIFT: u32 = 32;
    const ICESID_SHIFT: u32 = 48;
    const SID_MASK: u64 = 0xffff;

    /// The register value; reserved bits 31:4 read back as zero.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits & !0xffff_fff0)
    }

    /// The register value.
    pub const fn to_bits(self) -> u64 {
        self.0
    }

    /// IQEI: the invalidation queue error info (the `QueueErrorCode` of the IQE).
    pub const fn iqei(self) -> u8 {
        (self.0 & Self::IQEI_MASK) as u8
    }

    /// ITESID: the requester id of the device-TLB invalidation that timed out.
    pub const fn itesid(self) -> crate::ids::SourceId {
        crate::ids::SourceId(((self.0 >> Self::ITESID_SHIFT) & Self::SID_MASK) as u16)
    }

    /// ICESID: the requester id of the unexpected invalidation completion.
    pub const fn icesid(self) -> crate::ids::SourceId {
        crate::ids::SourceId(((self.0 >> Self::ICESID_SHIFT) & Self::SID_MASK) as u16)
    }

    /// The same with IQEI replaced.
    pub const fn with_iqei(self, iqei: u8) -> Self {
        Self((self.0 & !Self::IQEI_MASK) | (iqei as u64 & Self::IQEI_MASK))
    }

    /// The same with ITESID replaced.
    pub const fn with_itesid(self, sid: crate::ids::SourceId) -> Self {
        Self((self.0 & !(Self::SID_MASK << Self::ITESID_SHIFT)) | ((sid.0 as u64) << Self::ITESID_SHIFT))
    }

    /// The same with ICESID replaced.
    pub const fn with_icesid(self, sid: crate::ids::SourceId) -> Self {
        Self((self.0 & !(Self::SID_MASK << Self::ICESID_SHIFT)) | ((sid.0 as u64) << Self::ICESID_SHIFT))
    }
}

/// IRTA_REG fields (VT-d 10.4.30).
pub mod irta {
    /// IRTA: the table base, bits 63:12.
    pub const BASE_MASK: u64 = !0xfff;
    /// EIME: extended interrupt mode (x2APIC).
    pub const EIME: u64 = 1 << 11;
    /// S: 2^(S+1) entries, bits 3:0.
    pub const S_MASK: u64 = 0xf;
}

/// PQH/PQT/PQA fields (VT-d 10.4.31-10.4.33).
pub mod pq {
    /// PQH/PQT: the offset field, bits 18:5 (32-byte aligned, up to 512 KiB).
    pub const OFFSET_MASK: u64 = 0x7_ffe0;
    /// PQA: the queue base, bits 63:12.
    pub const PQA_BASE_MASK: u64 = !0xfff;
    /// PQA.PQS: the queue spans 2^PQS 4 KiB pages, bits 2:0.
    pub const PQA_PQS_MASK: u64 = 7;
    /// PQA bits software can write: bits 63:12 and 2:0; bits 11:3 are reserved.
    pub const PQA_WRITABLE: u64 = PQA_BASE_MASK | PQA_PQS_MASK;
}

/// PRS bits (VT-d 10.4.34); both are write-1-to-clear.
pub mod prs {
    /// Pending page request: a descriptor was added since software last cleared it.
    pub const PPR: u32 = 1 << 0;
    /// Page request overflow: a request was dropped because the queue was full.
    pub const PRO: u32 = 1 << 1;
}

/// PECTL bits: the same positions as every event control register ([`event::IM`],
/// [`event::IP`]).
pub mod pectl {
    /// Interrupt mask (set at reset).
    pub const IM: u32 = super::event::IM;
    /// Interrupt pending (read-only to software).
    pub const IP: u32 = super::event::IP;
}

/// CAP_REG fields (VT-d 10.4.2).
pub mod cap {
    /// ND: number of domains supported, bits 2:0.
    pub const ND_MASK: u64 = 7;
    /// SAGAW: supported adjusted guest address widths, bits 12:8 (bit n: AW=n).
    pub const SAGAW_SHIFT: u32 = 8;
    /// SAGAW is 5 bits wide.
    pub const SAGAW_MASK: u64 = 0x1f;
    /// MGAW − 1, bits 21:16.
    pub const MGAW_SHIFT: u32 = 16;
    /// MGAW is 6 bits wide.
    pub const MGAW_MASK: u64 = 0x3f;
    /// FRO: fault recording register offset / 16, bits 33:24.
    pub const FRO_SHIFT: u32 = 24;
    /// FRO is 10 bits wide.
    pub const FRO_MASK: u64 = 0x3ff;
    /// SSLPS: second-stage large page sizes, bits 37:34 (bit 34: 2 MiB, bit 35: 1 GiB).
    pub const SSLPS_SHIFT: u32 = 34;
    /// SSLPS is 4 bits wide.
    pub const SSLPS_MASK: u64 = 0xf;
    /// SSLPS value bit: 2 MiB pages.
    pub const SSLPS_2M: u64 = 1 << 0;
    /// SSLPS value bit: 1 GiB pages.
    pub const SSLPS_1G: u64 = 1 << 1;
    /// PSI: page-selective invalidation.
    pub const PSI: u64 = 1 << 39;
    /// NFR − 1: number of fault recording registers, bits 47:40.
    pub const NFR_SHIFT: u32 = 40;
    /// NFR is 8 bits wide.
    pub const NFR_MASK: u64 = 0xff;
    /// MAMV: maximum address mask value, bits 53:48.
    pub const MAMV_SHIFT: u32 = 48;
    /// MAMV is 6 bits wide.
    pub const MAMV_MASK: u64 = 0x3f;
    /// DWD: write draining.
    pub const DWD: u64 = 1 << 54;
    /// DRD: read draining.
    pub const DRD: u64 = 1 << 55;
    /// CM: caching mode (not-present entries may be cached).
    pub const CM: u64 = 1 << 7;
    /// PLMR: the protected low-memory region is supported (PLMBASE, PLMLIMIT).
    pub const PLMR: u64 = 1 << 5;
    /// PHMR: the protected high-memory region is supported (PHMBASE, PHMLIMIT).
    pub const PHMR: u64 = 1 << 6;
}

/// ECAP_REG fields (VT-d 10.4.3).
pub mod ecap {
    /// QI: queued invalidation.
    pub const QI: u64 = 1 << 1;
    /// DT: device-TLB (ATS).
    pub const DT: u64 = 1 << 2;
    /// IR: interrupt remapping.
    pub const IR: u64 = 1 << 3;
    /// EIM: extended interrupt mode (x2APIC).
    pub const EIM: u64 = 1 << 4;
    /// PT: pass-through (context TT=10b).
    pub const PT: u64 = 1 << 6;
    /// IRO: IOTLB register offset / 16, bits 17:8.
    pub const IRO_SHIFT: u32 = 8;
    /// IRO is 10 bits wide.
    pub const IRO_MASK: u64 = 0x3ff;
    /// MHMV: maximum handle mask value, bits 23:20: the largest IM an interrupt entry
    /// cache invalidation may carry (VT-d 6.5.2.7).
    pub const MHMV_SHIFT: u32 = 20;
    /// MHMV is 4 bits wide.
    pub const MHMV_MASK: u64 = 0xf;
    /// PRS: page requests.
    pub const PRS: u64 = 1 << 29;
}

/// Largest page-selective invalidation the unit accepts, as an address-mask value
/// (CAP.MAMV; QEMU and Linux use 18, i.e. 1 GiB).
pub const MAMV: u64 = 18;

/// Largest index mask an interrupt-entry-cache invalidation may carry (ECAP.MHMV): one
/// invalidation covers up to 2^15 entries, so a multi-vector MSI's block of IRTEs (a
/// handle plus subhandles, VT-d 5.1.2.2) is invalidated at once. Linux refuses multi-vector
/// MSI under interrupt remapping when the block's mask exceeds it (`alloc_irte`, so
/// MHMV = 0 means single vectors only); QEMU advertises 15 (`VTD_ECAP_MHMV`). The unit
/// honours any IM (16 and above cover every index).
pub const MHMV: u64 = 15;

/// The CAP value dmar advertises: exactly what the model implements.
///
/// ND=6 (16-bit domain ids), SAGAW 39/48/57-bit, MGAW=57, FRO, NFR, PSI with MAMV,
/// 2 MiB and 1 GiB second-stage superpages, DRD/DWD, and both protected memory regions
/// (PLMR, PHMR: PMEN, PLMBASE, PLMLIMIT, PHMBASE, PHMLIMIT, 2 MiB granular; see [`pmr`]).
/// Not set: RWBF (no write-buffer flushing needed), CM (not-present entries are never
/// cached), ZLR.
pub const fn cap_value() -> u64 {
    let nd = 6u64;
    let sagaw = (1u64 << 1) | (1 << 2) | (1 << 3); // AW 1, 2, 3: 39, 48, 57 bits
    let mgaw = 57u64 - 1;
    let fro = FRCD_BASE / 16;
    let sslps = cap::SSLPS_2M | cap::SSLPS_1G;
    let nfr = (NUM_FAULT_RECORDS as u64) - 1;
    nd | (sagaw << cap::SAGAW_SHIFT)
        | (mgaw << cap::MGAW_SHIFT)
        | (fro << cap::FRO_SHIFT)
        | (sslps << cap::SSLPS_SHIFT)
        | cap::PSI
        | (nfr << cap::NFR_SHIFT)
        | (MAMV << cap::MAMV_SHIFT)
        | cap::DWD
        | cap::DRD
        | cap::PLMR
        | cap::PHMR
}

/// The ECAP value dmar advertises: queued invalidation (QI), device-TLB (DT), interrupt
/// remapping with x2APIC mode (IR, EIM) and index-masked entry cache invalidation up to
/// [`MHMV`], pass-through (PT) and page requests (PRS), with the IOTLB registers at IRO.
pub const fn ecap_value() -> u64 {
    let iro = IVA / 16;
    ecap::QI
        | ecap::DT
        | ecap::IR
        | ecap::EIM
        | ecap::PT
        | (iro << ecap::IRO_SHIFT)
        | (MHMV << ecap::MHMV_SHIFT)
        | ecap::PRS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SourceId;

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
        assert_eq!(cap & (0b11 << 5), 0b11 << 5, "PLMR and PHMR");
        let ecap = ecap_value();
        assert_eq!(((ecap >> 8) & 0x3ff) * 16, IVA, "IRO");
        assert_ne!(ecap & (1 << 6), 0, "PT is in ECAP, not CAP");
        assert_ne!(ecap & 0b10, 0, "QI");
        assert_ne!(ecap & 0b1000, 0, "IR");
        assert_ne!(ecap & (1 << 29), 0, "PRS");
        assert_eq!((ecap >> 20) & 0xf, 15, "MHMV: IEC invalidations of up to 2^15 entries, as QEMU");
    }

    #[test]
    fn event_blocks_sit_where_the_spec_puts_them() {
        assert_eq!((FEDATA, FEADDR, FEUADDR), (0x3c, 0x40, 0x44));
        assert_eq!((IEDATA, IEADDR, IEUADDR), (0xa4, 0xa8, 0xac));
        assert_eq!((PEDATA, PEADDR, PEUADDR), (0xe4, 0xe8, 0xec));
    }

    #[test]
    fn iqercd_fields_round_trip() {
        let r = Iqercd::default().with_iqei(4).with_itesid(SourceId(0x1234)).with_icesid(SourceId(0xfedc));
        assert_eq!(r.to_bits(), 0xfedc_1234_0000_0004);
        assert_eq!((r.iqei(), r.itesid(), r.icesid()), (4, SourceId(0x1234), SourceId(0xfedc)));
        assert_eq!(Iqercd::from_bits(r.to_bits()), r);
        assert_eq!(Iqercd::from_bits(u64::MAX).to_bits(), 0xffff_ffff_0000_000f, "bits 31:4 are reserved");
        let r = r.with_itesid(SourceId(1)).with_iqei(0x1f);
        assert_eq!((r.iqei(), r.itesid(), r.icesid()), (0xf, SourceId(1), SourceId(0xfedc)));
    }
}
