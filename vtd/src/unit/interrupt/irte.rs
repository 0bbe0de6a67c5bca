//! The binary formats interrupt remapping reads: the interrupt remapping table entry
//! (IRTE, VT-d 9.10) and the IRTA register value that locates the table (VT-d 10.4.30).
//!
//! Each format is a small `Copy` wrapper over its raw bits with named accessors; the IRTE's
//! bit positions live here and nowhere else, IRTA's with the other registers in
//! `unit::regs`. This module decodes, checks reserved bits and
//! encodes; it does not read memory, cache entries or decide what an interrupt may do
//! (that is the remapper in the parent module).

use crate::ids::{Hpa, SourceId};
use crate::unit::field::field_enum;
use crate::unit::regs::irta;

/// Size of one IRTE in bytes.
pub const IRTE_BYTES: u64 = 16;

/// How the platform's local APICs are addressed, latched from IRTA.EIME (VT-d 5.1.7, 5.1.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApicMode {
    /// EIME = 0: 8-bit APIC ids, in IRTE `DST[15:8]`.
    XApic,
    /// EIME = 1 (extended interrupt mode): 32-bit x2APIC ids, all of DST.
    X2Apic,
}

field_enum! {
    /// Delivery mode (IRTE `DLM[7:5]`; the same encoding as the compatibility-format MSI
    /// data bits 10:8). 011b and 110b are reserved.
    pub enum DeliveryMode(u8; to_bits, from_bits) {
        /// 000b: deliver the vector to the destination.
        Fixed = 0,
        /// 001b: deliver to the lowest-priority processor among the destinations.
        LowestPriority = 1,
        /// 010b: system management interrupt; the vector is ignored.
        Smi = 2,
        /// 100b: non-maskable interrupt; the vector is ignored.
        Nmi = 4,
        /// 101b: INIT; the vector is ignored.
        Init = 5,
        /// 111b: external interrupt (8259-style); the vector comes from the PIC.
        ExtInt = 7,
    }
}

/// Trigger mode (IRTE TM, bit 4; MSI data bit 15).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// TM = 0.
    Edge,
    /// TM = 1.
    Level,
}

/// Destination mode (IRTE DM, bit 2; MSI address bit 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DestinationMode {
    /// DM = 0: the destination is an APIC id.
    Physical,
    /// DM = 1: the destination is a logical APIC id (a set of processors).
    Logical,
}

/// Source-id qualifier (IRTE `SQ[81:80]`): which low bits of the requester id an SVT=01b
/// check ignores, so one entry can serve several functions of a device (VT-d 9.10).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SourceQualifier {
    /// 00b: compare all 16 bits.
    Exact = 0,
    /// 01b: ignore bit 2 (function bit 2).
    IgnoreBit2 = 1,
    /// 10b: ignore bits 2:1.
    IgnoreBits2To1 = 2,
    /// 11b: ignore bits 2:0 (the whole function number).
    IgnoreBits2To0 = 3,
}

impl SourceQualifier {
    /// Decodes the 2-bit field (every value is defined).
    pub const fn from_bits(v: u8) -> Self {
        match v & 3 {
            0 => Self::Exact,
            1 => Self::IgnoreBit2,
            2 => Self::IgnoreBits2To1,
            _ => Self::IgnoreBits2To0,
        }
    }

    /// The requester-id bits this qualifier ignores.
    pub const fn ignored_bits(self) -> u16 {
        match self {
            Self::Exact => 0,
            Self::IgnoreBit2 => 0b100,
            Self::IgnoreBits2To1 => 0b110,
            Self::IgnoreBits2To0 => 0b111,
        }
    }
}

/// Source validation (IRTE `SVT[83:82]` with SID and SQ): which requesters may use an entry
/// (VT-d 9.10). SVT = 11b is reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceValidation {
    /// SVT = 00b: any requester.
    None,
    /// SVT = 01b: the requester id must equal `sid` outside the bits `qualifier` ignores.
    Requester {
        /// The expected requester id.
        sid: SourceId,
        /// Which function bits are not compared.
        qualifier: SourceQualifier,
    },
    /// SVT = 10b: the requester's bus must lie in `start..=end`. Encoded as `SID[15:8]` =
    /// start bus, `SID[7:0]` = end bus, as the spec and Linux `set_irte_verify_bus` do (QEMU
    /// `vtd_irte_get` reads the bytes the other way round).
    BusRange {
        /// First bus allowed.
        start: u8,
        /// Last bus allowed (inclusive).
        end: u8,
    },
}

impl SourceValidation {
    /// Whether a request from `sid` passes this check.
    pub const fn admits(self, sid: SourceId) -> bool {
        match self {
            Self::None => true,
            Self::Requester { sid: want, qualifier } => {
                let keep = !qualifier.ignored_bits();
                sid.0 & keep == want.0 & keep
            }
            Self::BusRange { start, end } => start <= sid.bus() && sid.bus() <= end,
        }
    }
}

/// One interrupt remapping table entry in remapped format (VT-d 9.10).
///
/// lo: P 0 · FPD 1 · DM 2 · RH 3 · TM 4 · `DLM[7:5]` · `AVAIL[11:8]` · `rsvd[14:12]` · IM 15
/// · `V[23:16]` · `rsvd[31:24]` · `DST[63:32]`.
/// hi: `SID[15:0]` · `SQ[17:16]` · `SVT[19:18]` · `rsvd[63:20]`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Irte {
    /// Low 64 bits (bits 63:0 of the entry).
    pub lo: u64,
    /// High 64 bits (bits 127:64 of the entry).
    pub hi: u64,
}

// Field positions (VT-d 9.10).
const P: u64 = 1 << 0;
const FPD: u64 = 1 << 1;
const DM: u64 = 1 << 2;
const RH: u64 = 1 << 3;
const TM: u64 = 1 << 4;
const DLM_SHIFT: u32 = 5;
const IM: u64 = 1 << 15;
const VECTOR_SHIFT: u32 = 16;
const DST_SHIFT: u32 = 32;
/// lo reserved bits independent of the APIC mode: [14:12] and [31:24].
const LO_RSVD: u64 = (0b111 << 12) | (0xff << 24);
/// DST bits reserved in xAPIC mode: `DST[7:0]` and `DST[31:16]`, i.e. bits 39:32 and 63:48.
const LO_RSVD_XAPIC_DST: u64 = (0xff << 32) | (0xffff << 48);
const SQ_SHIFT: u32 = 16;
const SVT_SHIFT: u32 = 18;
/// hi reserved bits: [127:84] of the entry.
const HI_RSVD: u64 = !0 << 20;

impl Irte {
    /// Wraps raw bits.
    pub const fn from_bits(lo: u64, hi: u64) -> Self {
        Self { lo, hi }
    }

    /// A present, fixed, edge-triggered, physical-destination entry for `vector` at
    /// `destination`, with no source validation: the common case, refined with the `with_*`
    /// builders. In xAPIC mode only the low 8 bits of `destination` are encoded (in
    /// `DST[15:8]`); in x2APIC mode all 32.
    pub const fn remapped(vector: u8, destination: u32, mode: ApicMode) -> Self {
        let dst = match mode {
            ApicMode::XApic => (destination & 0xff) << 8,
            ApicMode::X2Apic => destination,
        };
        Self { lo: P | ((vector as u64) << VECTOR_SHIFT) | ((dst as u64) << DST_SHIFT), hi: 0 }
    }

    /// Sets the delivery mode.
    pub const fn with_delivery_mode(mut self, mode: DeliveryMode) -> Self {
        self.lo = (self.lo & !(0b111 << DLM_SHIFT)) | ((mode.to_bits() as u64) << DLM_SHIFT);
        self
    }

    /// Sets the trigger mode.
    pub const fn with_trigger(mut self, trigger: Trigger) -> Self {
        self.lo = match trigger {
            Trigger::Edge => self.lo & !TM,
            Trigger::Level => self.lo | TM,
        };
        self
    }

    /// Sets the destination mode.
    pub const fn with_destination_mode(mut self, mode: DestinationMode) -> Self {
        self.lo = match mode {
            DestinationMode::Physical => self.lo & !DM,
            DestinationMode::Logical => self.lo | DM,
        };
        self
    }

    /// Sets the redirection hint.
    pub const fn with_redirection_hint(mut self, on: bool) -> Self {
        self.lo = if on { self.lo | RH } else { self.lo & !RH };
        self
    }

    /// Sets fault processing disable: qualified faults through this entry are not recorded.
    pub const fn with_fpd(mut self, on: bool) -> Self {
        self.lo = if on { self.lo | FPD } else { self.lo & !FPD };
        self
    }

    /// Sets the present bit.
    pub const fn with_present(mut self, on: bool) -> Self {
        self.lo = if on { self.lo | P } else { self.lo & !P };
        self
    }

    /// Sets the source-validation fields (SID, SQ, SVT).
    pub const fn with_source_validation(mut self, sv: SourceValidation) -> Self {
        let (svt, sq, sid): (u64, u64, u64) = match sv {
            SourceValidation::None => (0, 0, 0),
            SourceValidation::Requester { sid, qualifier } => (1, qualifier as u64, sid.0 as u64),
            SourceValidation::BusRange { start, end } => (2, 0, ((start as u64) << 8) | end as u64),
        };
        self.hi = (self.hi & !0xf_ffff) | (svt << SVT_SHIFT) | (sq << SQ_SHIFT) | sid;
        self
    }

    /// P: the entry is valid; when clear every other field is ignored (VT-d 9.10).
    pub const fn present(self) -> bool {
        self.lo & P != 0
    }

    /// FPD: qualified faults through this entry are not recorded (VT-d 9.10, 7.1.2).
    pub const fn fpd(self) -> bool {
        self.lo & FPD != 0
    }

    /// DM: how the destination is interpreted.
    pub const fn destination_mode(self) -> DestinationMode {
        if self.lo & DM != 0 { DestinationMode::Logical } else { DestinationMode::Physical }
    }

    /// RH: the redirection hint passed on to the interrupt fabric.
    pub const fn redirection_hint(self) -> bool {
        self.lo & RH != 0
    }

    /// TM: edge or level.
    pub const fn trigger(self) -> Trigger {
        if self.lo & TM != 0 { Trigger::Level } else { Trigger::Edge }
    }

    /// The raw DLM field.
    pub const fn delivery_mode_bits(self) -> u8 {
        ((self.lo >> DLM_SHIFT) & 0b111) as u8
    }

    /// DLM, or `None` for a reserved encoding.
    pub const fn delivery_mode(self) -> Option<DeliveryMode> {
        DeliveryMode::from_bits(self.delivery_mode_bits())
    }

    /// IM: 1 = posted-interrupt format (VT-d 9.11), which this unit does not implement
    /// (ECAP.PI = 0), so the bit is reserved here.
    pub const fn posted(self) -> bool {
        self.lo & IM != 0
    }

    /// V: the vector delivered.
    pub const fn vector(self) -> u8 {
        ((self.lo >> VECTOR_SHIFT) & 0xff) as u8
    }

    /// The raw 32-bit DST field.
    pub const fn destination_field(self) -> u32 {
        (self.lo >> DST_SHIFT) as u32
    }

    /// The destination APIC id as the APIC mode reads DST: `DST[15:8]` in xAPIC mode, all 32
    /// bits in x2APIC mode (VT-d 9.10).
    pub const fn destination(self, mode: ApicMode) -> u32 {
        match mode {
            ApicMode::XApic => (self.destination_field() >> 8) & 0xff,
            ApicMode::X2Apic => self.destination_field(),
        }
    }

    /// The raw SID field.
    pub const fn sid_field(self) -> u16 {
        self.hi as u16
    }

    /// SQ.
    pub const fn source_qualifier(self) -> SourceQualifier {
        SourceQualifier::from_bits(((self.hi >> SQ_SHIFT) & 3) as u8)
    }

    /// The raw SVT field.
    pub const fn svt_bits(self) -> u8 {
        ((self.hi >> SVT_SHIFT) & 3) as u8
    }

    /// SVT with its SID and SQ operands, or `None` for the reserved SVT = 11b.
    pub const fn source_validation(self) -> Option<SourceValidation> {
        match self.svt_bits() {
            0 => Some(SourceValidation::None),
            1 => Some(SourceValidation::Requester {
                sid: SourceId(self.sid_field()),
                qualifier: self.source_qualifier(),
            }),
            2 => Some(SourceValidation::BusRange { start: (self.sid_field() >> 8) as u8, end: self.sid_field() as u8 }),
            _ => None,
        }
    }

    /// Whether a present entry has reserved bits or encodings set, so that using it must
    /// fault with 0x24 (VT-d 9.10): `lo[14:12]`, IM (posted format is not
    /// supported), `lo[31:24]`, in xAPIC mode `DST[7:0]` and `DST[31:16]`, `hi[63:20]` (entry bits
    /// 127:84), SVT = 11b, and the reserved DLM encodings 011b and 110b.
    pub const fn reserved_bits(self, mode: ApicMode) -> bool {
        let lo_rsvd = match mode {
            ApicMode::XApic => LO_RSVD | IM | LO_RSVD_XAPIC_DST,
            ApicMode::X2Apic => LO_RSVD | IM,
        };
        self.lo & lo_rsvd != 0 || self.hi & HI_RSVD != 0 || self.svt_bits() == 3 || self.delivery_mode().is_none()
    }

    /// Where entry `index` of a table at `base` lives, or `None` on address overflow.
    pub const fn address(base: Hpa, index: u32) -> Option<Hpa> {
        base.checked_add(index as u64 * IRTE_BYTES)
    }
}

/// The interrupt remapping table address register value (IRTA_REG, VT-d 10.4.30):
/// `IRTA[63:12]` the table base, EIME bit 11, `S[3:0]` with 2^(S+1) entries. Bits 10:4
/// are reserved and dropped when latched.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Irta(u64);

const IRTA_BASE: u64 = irta::BASE_MASK;
const IRTA_EIME: u64 = irta::EIME;
const IRTA_S: u64 = irta::S_MASK;

impl Irta {
    /// The register value, with its reserved bits 10:4 cleared.
    pub const fn from_bits(v: u64) -> Self {
        Self(v & (IRTA_BASE | IRTA_EIME | IRTA_S))
    }

    /// A table at `base` (4 KiB aligned; low bits are dropped) of 2^(`size_field`+1)
    /// entries (`size_field` is masked to 4 bits) in the given APIC mode.
    pub const fn new(base: Hpa, size_field: u8, mode: ApicMode) -> Self {
        let eime = match mode {
            ApicMode::XApic => 0,
            ApicMode::X2Apic => IRTA_EIME,
        };
        Self((base.0 & IRTA_BASE) | eime | (size_field as u64 & IRTA_S))
    }

    /// The register value.
    pub const fn to_bits(self) -> u64 {
        self.0
    }

    /// IRTA: the table base.
    pub const fn base(self) -> Hpa {
        Hpa(self.0 & IRTA_BASE)
    }

    /// EIME: the APIC mode IRTEs are read in.
    pub const fn mode(self) -> ApicMode {
        if self.0 & IRTA_EIME != 0 { ApicMode::X2Apic } else { ApicMode::XApic }
    }

    /// S: the size field.
    pub const fn size_field(self) -> u8 {
        (self.0 & IRTA_S) as u8
    }

    /// Number of entries: 2^(S+1), 2..=65536.
    pub const fn entries(self) -> u32 {
        1 << (self.size_field() as u32 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoder_and_accessors_agree() {
        let e = Irte::remapped(0x31, 0x12, ApicMode::XApic)
            .with_delivery_mode(DeliveryMode::LowestPriority)
            .with_trigger(Trigger::Level)
            .with_destination_mode(DestinationMode::Logical)
            .with_redirection_hint(true)
            .with_fpd(true)
            .with_source_validation(SourceValidation::Requester {
                sid: SourceId::new(3, 4, 5),
                qualifier: SourceQualifier::IgnoreBits2To1,
            });
        assert!(e.present() && e.fpd() && e.redirection_hint() && !e.posted());
        assert_eq!(e.vector(), 0x31);
        assert_eq!(e.destination_field(), 0x1200, "xAPIC id in DST[15:8]");
        assert_eq!(e.destination(ApicMode::XApic), 0x12);
        assert_eq!(e.delivery_mode(), Some(DeliveryMode::LowestPriority));
        assert_eq!(e.trigger(), Trigger::Level);
        assert_eq!(e.destination_mode(), DestinationMode::Logical);
        assert_eq!(e.svt_bits(), 1);
        assert_eq!(e.source_qualifier(), SourceQualifier::IgnoreBits2To1);
        assert_eq!(e.sid_field(), SourceId::new(3, 4, 5).0);
        assert!(!e.reserved_bits(ApicMode::XApic));
        // Exact bit positions (VT-d 9.10).
        assert_eq!(e.lo, 1 | 1 << 1 | 1 << 2 | 1 << 3 | 1 << 4 | 1 << 5 | 0x31 << 16 | 0x1200 << 32);
        assert_eq!(e.hi, 1 << 18 | 2 << 16 | u64::from(SourceId::new(3, 4, 5).0));
    }

    #[test]
    fn x2apic_destination_uses_all_32_bits() {
        let e = Irte::remapped(0x40, 0xdead_beef, ApicMode::X2Apic);
        assert_eq!(e.destination(ApicMode::X2Apic), 0xdead_beef);
        assert!(!e.reserved_bits(ApicMode::X2Apic));
        assert!(e.reserved_bits(ApicMode::XApic), "DST[31:16] and DST[7:0] are reserved in xAPIC mode");
    }

    #[test]
    fn every_reserved_field_is_caught() {
        let good = Irte::remapped(0x20, 1, ApicMode::XApic);
        assert!(!good.reserved_bits(ApicMode::XApic));
        for bit in (12..15).chain([15]).chain(24..32).chain(32..40).chain(48..64) {
            let e = Irte::from_bits(good.lo | 1 << bit, good.hi);
            assert!(e.reserved_bits(ApicMode::XApic), "lo bit {bit}");
        }
        for bit in [8, 9, 10, 11, 0] {
            // AVAIL and P are not reserved.
            assert!(!Irte::from_bits(good.lo | 1 << bit, good.hi).reserved_bits(ApicMode::XApic), "lo bit {bit}");
        }
        for bit in 20..64 {
            assert!(Irte::from_bits(good.lo, 1 << bit).reserved_bits(ApicMode::X2Apic), "hi bit {bit}");
        }
        assert!(Irte::from_bits(good.lo, 3 << 18).reserved_bits(ApicMode::XApic), "SVT = 11b");
        for dlm in [3u64, 6] {
            assert!(Irte::from_bits(good.lo | dlm << 5, 0).reserved_bits(ApicMode::XApic), "DLM {dlm}");
        }
        for dlm in [0u8, 1, 2, 4, 5, 7] {
            assert_eq!(DeliveryMode::from_bits(dlm).map(DeliveryMode::to_bits), Some(dlm));
        }
    }

    #[test]
    fn source_validation_round_trips() {
        for sv in [
            SourceValidation::None,
            SourceValidation::Requester { sid: SourceId(0xabcd), qualifier: SourceQualifier::IgnoreBits2To0 },
            SourceValidation::BusRange { start: 2, end: 9 },
        ] {
            assert_eq!(Irte::default().with_source_validation(sv).source_validation(), Some(sv));
        }
        let e = Irte::default().with_source_validation(SourceValidation::BusRange { start: 2, end: 9 });
        assert_eq!(e.sid_field(), 0x0209, "upper byte = start bus, lower byte = end bus");
    }

    #[test]
    fn irta_fields() {
        let irta = Irta::new(Hpa(0x12_3456), 7, ApicMode::X2Apic);
        assert_eq!(irta.base(), Hpa(0x12_3000));
        assert_eq!(irta.entries(), 256);
        assert_eq!(irta.mode(), ApicMode::X2Apic);
        assert_eq!(irta.to_bits(), 0x12_3000 | 1 << 11 | 7);
        assert_eq!(Irta::from_bits(0x5000 | 0x7f0 | 0xf).to_bits(), 0x500f, "bits 10:4 dropped");
        assert_eq!(Irta::from_bits(0xf).entries(), 65536);
        assert_eq!(Irta::from_bits(0).entries(), 2);
    }
}
