//! The binary formats of the legacy-mode translation structures: root entries, context
//! entries and second-stage page-table entries (VT-d 9.1, 9.3, 9.8).
//!
//! Each entry is a small `Copy` wrapper over its raw bits with named accessors; the bit
//! positions live here and nowhere else. This module decodes and encodes; it does not read
//! memory or decide what a request may do (that is `walk`).

use crate::ids::{DomainId, Hpa, Iova};
use crate::unit::field::field_enum;

/// Host address width the unit implements: physical addresses above it are reserved bits
/// in every entry (VT-d 9.x "HAW").
pub const HOST_ADDRESS_WIDTH: u32 = 46;
/// Mask of address bits [HAW-1:12].
pub const ADDR_MASK: u64 = ((1u64 << HOST_ADDRESS_WIDTH) - 1) & !0xfff;

/// Size in bytes of a root table and of a context table (256 entries of 16 bytes).
pub const TABLE_BYTES: u64 = 4096;

/// Legacy root entry (VT-d 9.1): lo = `P[0]`, `CTP[63:12]`; hi reserved.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct RootEntry {
    /// Low 64 bits.
    pub lo: u64,
    /// High 64 bits (reserved in legacy mode).
    pub hi: u64,
}

impl RootEntry {
    /// Wraps raw bits.
    pub const fn from_bits(lo: u64, hi: u64) -> Self {
        Self { lo, hi }
    }
    /// A present entry pointing at a context table.
    pub const fn new(context_table: Hpa) -> Self {
        Self { lo: (context_table.0 & ADDR_MASK) | 1, hi: 0 }
    }
    /// P: the context table pointer is valid.
    pub const fn present(self) -> bool {
        self.lo & 1 != 0
    }
    /// CTP: the context table for this bus.
    pub const fn context_table(self) -> Hpa {
        Hpa(self.lo & ADDR_MASK)
    }
    /// Reserved bits that are set: `lo[11:1]`, lo above HAW, all of hi.
    pub const fn reserved_bits(self) -> bool {
        (self.lo & !(ADDR_MASK | 1)) != 0 || self.hi != 0
    }
}

field_enum! {
    /// Context-entry translation type (VT-d 9.3, `TT[3:2]`; 11b is reserved).
    pub enum TranslationType(u64; to_bits, from_bits) {
        /// 00b: untranslated requests are remapped; translation requests and translated
        /// requests are blocked.
        Untranslated = 0,
        /// 01b: as 00b, plus ATS translation requests and translated requests (device-TLB).
        DeviceTlb = 1,
        /// 10b: untranslated requests pass through (output = input address).
        PassThrough = 2,
    }
}

field_enum! {
    /// Second-stage paging depth, encoded as the context entry's AW field (VT-d 9.3,
    /// `AW[2:0]`; 0 and 4+ are reserved or unsupported).
    #[derive(PartialOrd, Ord)]
    pub enum AddressWidth(u64; to_bits, from_bits) {
        /// AW=1: 39-bit, 3-level tables.
        Aw39 = 1,
        /// AW=2: 48-bit, 4-level tables.
        Aw48 = 2,
        /// AW=3: 57-bit, 5-level tables.
        Aw57 = 3,
    }
}

impl AddressWidth {
    /// Number of page-table levels (2 + AW).
    pub const fn levels(self) -> u32 {
        2 + self as u32
    }
    /// Adjusted guest address width in bits (30 + 9 * AW).
    pub const fn bits(self) -> u32 {
        30 + 9 * self as u32
    }
    /// True when `iova` (and so every byte up to `iova + len - 1`) fits the width.
    pub const fn covers(self, iova: Iova) -> bool {
        self.bits() >= 64 || iova.0 >> self.bits() == 0
    }
}

/// Legacy context entry (VT-d 9.3).
///
/// lo: `P[0] FPD[1] TT[3:2] reserved[11:4] SLPTPTR[63:12]`;
/// hi: `AW[2:0] AVAIL[6:3] reserved[7] DID[23:8] reserved[63:24]`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ContextEntry {
    /// Low 64 bits.
    pub lo: u64,
    /// High 64 bits.
    pub hi: u64,
}

impl ContextEntry {
    const HI_RESERVED: u64 = !0x00ff_ff7f; // bit 7 and [63:24]

    /// Wraps raw bits.
    pub const fn from_bits(lo: u64, hi: u64) -> Self {
        Self { lo, hi }
    }
    /// A present entry. `table` is ignored by hardware for pass-through but still encoded.
    pub const fn new(did: DomainId, tt: TranslationType, aw: AddressWidth, table: Hpa, fpd: bool) -> Self {
        let lo = (table.0 & ADDR_MASK) | (tt.to_bits() << 2) | ((fpd as u64) << 1) | 1;
        let hi = ((did.0 as u64) << 8) | aw.to_bits();
        Self { lo, hi }
    }
    /// P.
    pub const fn present(self) -> bool {
        self.lo & 1 != 0
    }
    /// FPD: fault processing disable for qualified faults (VT-d 7.1.2).
    pub const fn fault_processing_disabled(self) -> bool {
        self.lo & 2 != 0
    }
    /// Raw TT field.
    pub const fn tt_bits(self) -> u64 {
        (self.lo >> 2) & 3
    }
    /// SLPTPTR: the top-level second-stage table.
    pub const fn second_level_table(self) -> Hpa {
        Hpa(self.lo & ADDR_MASK)
    }
    /// Raw AW field.
    pub const fn aw_bits(self) -> u64 {
        self.hi & 7
    }
    /// DID.
    pub const fn domain(self) -> DomainId {
        DomainId(((self.hi >> 8) & 0xffff) as u16)
    }
    /// Reserved bits that are set: `lo[11:4]`, lo above HAW, hi bit 7 and `[63:24]`.
    pub const fn reserved_bits(self) -> bool {
        (self.lo & 0xff0) != 0 || (self.lo >> HOST_ADDRESS_WIDTH) != 0 || (self.hi & Self::HI_RESERVED) != 0
    }
}

/// Second-stage page-table entry (VT-d 9.8).
///
/// `R[0] W[1] X[2] EMT[5:3] IPAT[6] PS[7] A[8] D[9] SNP[11] ADDR[HAW-1:12] TM[62]`;
/// bits 52..=61 and 63 are ignored.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
pub struct SlPte(pub u64);

impl SlPte {
    /// Read permission.
    pub const R: u64 = 1 << 0;
    /// Write permission.
    pub const W: u64 = 1 << 1;
    /// Page size: this entry is a leaf at level 2 (2 MiB) or 3 (1 GiB).
    pub const PS: u64 = 1 << 7;
    /// Snoop behaviour (reserved unless snoop control is reported; dmar reports SC=0).
    pub const SNP: u64 = 1 << 11;

    /// Wraps raw bits.
    pub const fn from_bits(v: u64) -> Self {
        Self(v)
    }
    /// The raw bits.
    pub const fn to_bits(self) -> u64 {
        self.0
    }
    /// A non-leaf entry pointing at the next table, granting R and W (the driver keeps
    /// permissions at the leaf, as Linux does).
    pub const fn table(next: Hpa) -> Self {
        Self((next.0 & ADDR_MASK) | Self::R | Self::W)
    }
    /// A leaf entry; `superpage` sets PS (for levels 2 and 3).
    pub const fn leaf(frame: Hpa, read: bool, write: bool, superpage: bool) -> Self {
        Self((frame.0 & ADDR_MASK) | (read as u64) | ((write as u64) << 1) | ((superpage as u64) << 7))
    }
    /// An entry is present when R or W is set (VT-d 9.8: second-stage entries have no P bit).
    pub const fn present(self) -> bool {
        self.0 & (Self::R | Self::W) != 0
    }
    /// R.
    pub const fn readable(self) -> bool {
        self.0 & Self::R != 0
    }
    /// W.
    pub const fn writable(self) -> bool {
        self.0 & Self::W != 0
    }
    /// PS.
    pub const fn superpage(self) -> bool {
        self.0 & Self::PS != 0
    }
    /// ADDR: next table or frame.
    pub const fn addr(self) -> Hpa {
        Hpa(self.0 & ADDR_MASK)
    }

    /// Reserved bits that are set for an entry found at `level` (1 = 4 KiB leaf level).
    ///
    /// Follows QEMU's `vtd_slpte_nonzero_rsvd` masks (VT-d 9.8): bit 11 (SNP,
    /// since dmar reports no snoop control), address bits above HAW (bits 52..=61 and 63
    /// are ignored, not reserved), TM (62) and X (2) since dmar reports neither; at level 4
    /// and 5 also PS; for superpage leaves the address bits below the superpage size.
    pub const fn reserved_bits(self, level: u32) -> bool {
        let ignored = 0xbff0_0000_0000_0000u64; // 52..=61, 63
        let haw_and_up = !((1u64 << HOST_ADDRESS_WIDTH) - 1) & !ignored & !(1 << 62);
        let mut rsvd = Self::SNP | haw_and_up | (1 << 62) | (1 << 2);
        if level >= 4 {
            rsvd |= Self::PS;
        }
        if self.superpage() {
            if level == 2 {
                rsvd |= 0x1f_f000; // address bits 20:12
            } else if level == 3 {
                rsvd |= 0x3fff_f000; // address bits 29:12
            }
        }
        self.0 & rsvd != 0
    }
}

/// The index of `iova` into the table at `level` (VT-d 3.7: 9 bits per level above the
/// 12-bit page offset).
#[inline]
pub const fn level_index(iova: Iova, level: u32) -> u64 {
    (iova.0 >> (12 + 9 * (level - 1))) & 0x1ff
}

/// log2 of the bytes one entry at `level` maps (12 for level 1, 21 for 2, 30 for 3, ...).
#[inline]
pub const fn level_shift(level: u32) -> u32 {
    12 + 9 * (level - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_entry_round_trips() {
        let ce =
            ContextEntry::new(DomainId(0xbeef), TranslationType::DeviceTlb, AddressWidth::Aw48, Hpa(0x12_3000), true);
        assert!(ce.present());
        assert!(ce.fault_processing_disabled());
        assert_eq!(TranslationType::from_bits(ce.tt_bits()), Some(TranslationType::DeviceTlb));
        assert_eq!(AddressWidth::from_bits(ce.aw_bits()), Some(AddressWidth::Aw48));
        assert_eq!(ce.domain(), DomainId(0xbeef));
        assert_eq!(ce.second_level_table(), Hpa(0x12_3000));
        assert!(!ce.reserved_bits());
        assert!(ContextEntry::from_bits(ce.lo | 0x10, ce.hi).reserved_bits());
        assert!(ContextEntry::from_bits(ce.lo, ce.hi | 0x80).reserved_bits());
        assert!(ContextEntry::from_bits(ce.lo, ce.hi | (1 << 24)).reserved_bits());
    }

    #[test]
    fn root_entry_reserved_bits() {
        let re = RootEntry::new(Hpa(0x5000));
        assert!(re.present() && !re.reserved_bits());
        assert!(RootEntry::from_bits(re.lo | 0x2, 0).reserved_bits());
        assert!(RootEntry::from_bits(re.lo, 1).reserved_bits());
        assert!(RootEntry::from_bits(re.lo | (1 << 50), 0).reserved_bits());
    }

    #[test]
    fn pte_reserved_bits_follow_the_level() {
        let leaf = SlPte::leaf(Hpa(0x20_0000), true, true, true);
        assert!(!leaf.reserved_bits(2));
        assert!(SlPte::leaf(Hpa(0x20_1000), true, false, true).reserved_bits(2));
        assert!(!SlPte::leaf(Hpa(0x20_1000), true, false, false).reserved_bits(1));
        assert!(SlPte::leaf(Hpa(0x20_0000), true, false, true).reserved_bits(3));
        assert!(SlPte(SlPte::table(Hpa(0x1000)).0 | SlPte::PS).reserved_bits(4));
        assert!(SlPte(SlPte::table(Hpa(0x1000)).0 | SlPte::SNP).reserved_bits(1));
        // ignored bits are not reserved
        assert!(!SlPte(SlPte::table(Hpa(0x1000)).0 | (1 << 55) | (1 << 63)).reserved_bits(1));
        assert!(SlPte(SlPte::table(Hpa(0x1000)).0 | (1 << 50)).reserved_bits(1));
    }

    #[test]
    fn indices() {
        let iova = Iova(0x0000_7fff_ffff_f000);
        assert_eq!(level_index(iova, 1), 0x1ff);
        assert_eq!(level_index(iova, 4), 0xff);
        assert_eq!(AddressWidth::Aw39.levels(), 3);
        assert_eq!(AddressWidth::Aw57.bits(), 57);
        assert!(!AddressWidth::Aw39.covers(Iova(1 << 39)));
        assert!(AddressWidth::Aw39.covers(Iova((1 << 39) - 1)));
    }
}
