//! The ATS invalidation range encoding (PCIe ATS 2.3.2, the Invalidate Request's S bit; VT-d 6.5.2.5, the device-TLB
//! invalidate descriptor's S field).
//!
//! S=0: one 4 KiB page at ADDR. S=1: the size is 2^(p+1) bytes where p is the position of
//! the lowest 0 bit of ADDR at or above bit 12. Shared by the unit (which forwards
//! device-TLB descriptors) and the device side (which decodes invalidation requests).

use crate::ids::Iova;

/// Encodes `2^pages_log2` 4 KiB pages containing `addr` (aligned down) as ADDR|S.
/// `pages_log2` is capped at 52 (the whole 64-bit space).
pub fn encode(addr: Iova, pages_log2: u32) -> u64 {
    let pages_log2 = pages_log2.min(52);
    if pages_log2 == 0 {
        return addr.0 & !0xfff;
    }
    let size_shift = 12 + pages_log2;
    let base = if size_shift >= 64 { 0 } else { addr.0 & !((1u64 << size_shift) - 1) };
    // Bits [12 + pages_log2 - 2 : 12] set, bit 12 + pages_log2 - 1 clear.
    let ones = ((1u64 << (pages_log2 - 1)) - 1) << 12;
    base | ones | 1
}

/// Decodes ADDR|S into (first address, size in bytes). A size of 2^64 is reported as
/// `u64::MAX` bytes from 0.
pub fn decode(addr_s: u64) -> (Iova, u64) {
    if addr_s & 1 == 0 {
        return (Iova(addr_s & !0xfff), 4096);
    }
    let p = 12 + (addr_s >> 12).trailing_ones();
    if p >= 63 {
        return (Iova(0), u64::MAX);
    }
    let size = 1u64 << (p + 1);
    (Iova(addr_s & !(size - 1) & !0xfff), size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn spec_examples() {
        assert_eq!(decode(0x5000), (Iova(0x5000), 0x1000));
        assert_eq!(decode(0x4000 | 1), (Iova(0x4000), 0x2000), "bit 12 = 0: 8K");
        assert_eq!(decode(0x5000 | 1), (Iova(0x4000), 0x4000), "bits 13:12 = 01: 16K");
        assert_eq!(decode(0x3000 | 1), (Iova(0x0), 0x8000), "bits 14:12 = 011: 32K");
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(addr in any::<u64>(), pages_log2 in 0u32..52) {
            let (base, size) = decode(encode(Iova(addr), pages_log2));
            prop_assert_eq!(size, 1u64 << (12 + pages_log2));
            prop_assert_eq!(base.0, addr & !(size - 1));
        }
    }
}
