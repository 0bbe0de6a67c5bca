//! The range an ATS invalidation request covers: its address with the S-bit encoding,
//! widened to the function's smallest translation unit.
//!
//! Owns the decoding on the device side (PCIe 10.2.3.2, Translation Range Size, which
//! 10.3.1's Invalidate Request reuses: S=0 is one 4 KiB page; S=1 makes the size 2^(p+1)
//! bytes, p the lowest 0 bit of ADDR at or above bit 12). The bit-level codec is shared
//! with the remapping unit (`dmar_vtd::ats::range`), so both ends of the link read the
//! encoding the same way. Not here: which entries a range drops (`atc`).

use dmar_vtd::ats::range as srange;

/// An inclusive range of untranslated addresses.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct InvalidationRange {
    /// First address.
    pub first: u64,
    /// Last address (inclusive, so the whole 64-bit space is expressible).
    pub last: u64,
}

impl InvalidationRange {
    /// Decodes ADDR|S, then widens the range to whole smallest translation units of
    /// `2^stu` 4 KiB blocks (PCIe 10.5.1.3, ATS Control register: no translation or
    /// invalidation describes less than the STU, so an invalidation always covers at
    /// least one unit). Widening can only
    /// drop more, which is always safe.
    pub fn decode(addr_s: u64, stu: u8) -> Self {
        let (base, size) = srange::decode(addr_s);
        let first = base.0;
        let last = if size == u64::MAX { u64::MAX } else { first.saturating_add(size - 1) };
        let unit_shift = 12 + u32::from(stu.min(51));
        let mask = (1u64 << unit_shift) - 1;
        Self { first: first & !mask, last: last | mask }
    }

    /// Bytes covered, saturating at `u64::MAX` for the whole space.
    pub const fn len(&self) -> u64 {
        (self.last - self.first).saturating_add(1)
    }

    /// Never empty: a decoded range covers at least one page.
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// Whether `[addr, addr + len)` meets the range.
    pub const fn overlaps(&self, addr: u64, len: u64) -> bool {
        let end = addr.saturating_add(len.saturating_sub(1));
        addr <= self.last && end >= self.first
    }
}

#[cfg(test)]
mod tests {
    use dmar_vtd::Iova;
    use proptest::prelude::*;

    use super::*;

    /// The encoding spelled out bit by bit, as the spec's table reads.
    fn reference(addr_s: u64) -> (u64, u128) {
        if addr_s & 1 == 0 {
            return (addr_s & !0xfff, 4096);
        }
        let mut p = 12;
        while p < 64 && addr_s & (1u64 << p) != 0 {
            p += 1;
        }
        let size = 1u128 << (p + 1).min(64);
        let base = if size >= 1u128 << 64 { 0 } else { addr_s & !((size as u64) - 1) };
        (base, size)
    }

    #[test]
    fn spec_examples() {
        assert_eq!(InvalidationRange::decode(0x5000, 0), InvalidationRange { first: 0x5000, last: 0x5fff });
        assert_eq!(InvalidationRange::decode(0x4001, 0), InvalidationRange { first: 0x4000, last: 0x5fff });
        assert_eq!(InvalidationRange::decode(0x5001, 0), InvalidationRange { first: 0x4000, last: 0x7fff });
        assert_eq!(InvalidationRange::decode(0x3001, 0), InvalidationRange { first: 0, last: 0x7fff });
        let all = InvalidationRange::decode(u64::MAX, 0);
        assert_eq!(all, InvalidationRange { first: 0, last: u64::MAX });
        assert_eq!(all.len(), u64::MAX);
        // An 8 KiB STU widens a single page to its unit.
        assert_eq!(InvalidationRange::decode(0x5000, 1), InvalidationRange { first: 0x4000, last: 0x5fff });
    }

    #[test]
    fn overlap_is_inclusive_of_the_last_byte() {
        let r = InvalidationRange { first: 0x1000, last: 0x1fff };
        assert!(
            r.overlaps(0xfc1, 0x40) && r.overlaps(0x1fff, 1) && !r.overlaps(0x2000, 64) && !r.overlaps(0xfc0, 0x40)
        );
    }

    proptest! {
        #[test]
        fn decoding_inverts_the_servers_encoder(addr in any::<u64>(), pages_log2 in 0u32..52) {
            let r = InvalidationRange::decode(srange::encode(Iova(addr), pages_log2), 0);
            let size = 1u64 << (12 + pages_log2);
            prop_assert_eq!(r.first, addr & !(size - 1));
            prop_assert_eq!(r.len(), size);
        }

        #[test]
        fn decoding_matches_the_bitwise_reading(addr_s in any::<u64>()) {
            let r = InvalidationRange::decode(addr_s, 0);
            let (base, size) = reference(addr_s);
            prop_assert_eq!(r.first, base);
            prop_assert_eq!(u128::from(r.last) + 1 - u128::from(r.first), size.min(1u128 << 64));
        }

        #[test]
        fn the_stu_only_widens(addr_s in any::<u64>(), stu in 0u8..20) {
            let narrow = InvalidationRange::decode(addr_s, 0);
            let wide = InvalidationRange::decode(addr_s, stu);
            prop_assert!(wide.first <= narrow.first && wide.last >= narrow.last);
            prop_assert!(wide.len() >= 1u64 << (12 + stu).min(63));
        }
    }
}
