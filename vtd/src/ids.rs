//! Newtypes for the addresses and identifiers the VT-d specification keeps apart.
//!
//! A function that takes a [`SourceId`] cannot be handed a [`DomainId`] by mistake, and an
//! I/O virtual address ([`Iova`]) never mixes with a host physical address ([`Hpa`]).
//! This module owns only the types and their formatting/parsing; the rules that use them
//! live with the tables, caches and driver.

use std::fmt;
use std::str::FromStr;

/// Size of the smallest translation granule (VT-d 3.6: 4 KiB pages).
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// An I/O virtual address: what a device puts on the bus before remapping.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Iova(pub u64);

/// A host physical address in the emulated host memory.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hpa(pub u64);

macro_rules! address_impls {
    ($t:ident) => {
        impl $t {
            /// The page frame number (address >> 12).
            pub const fn pfn(self) -> u64 {
                self.0 >> PAGE_SHIFT
            }
            /// The offset inside the 4 KiB page.
            pub const fn page_offset(self) -> u64 {
                self.0 & (PAGE_SIZE - 1)
            }
            /// True when the address is 4 KiB aligned.
            pub const fn is_page_aligned(self) -> bool {
                self.page_offset() == 0
            }
            /// Adds `n` bytes, or `None` on 64-bit overflow.
            pub const fn checked_add(self, n: u64) -> Option<Self> {
                match self.0.checked_add(n) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "({:#x})"), self.0)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}
address_impls!(Iova);
address_impls!(Hpa);

/// A protection-domain identifier (VT-d 3.4.3: the DID field of a context entry).
///
/// Domain id 0 is reserved by the driver model (Linux `FLPT_DEFAULT_DID` practice with
/// caching mode); the hardware model accepts any 16-bit value.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct DomainId(pub u16);

impl fmt::Display for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A remapping unit of the platform: its index in the platform description, which is
/// also the order of the DRHD structures in the ACPI DMAR table.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct UnitId(pub u16);

impl UnitId {
    /// The index into the platform's units.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for UnitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A PCIe requester id: bus (8 bits), device (5 bits), function (3 bits).
///
/// Displays and parses as `bb:dd.f` in hexadecimal, like `00:1f.3`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SourceId(pub u16);

impl SourceId {
    /// Builds a requester id; `dev` is masked to 5 bits and `func` to 3.
    pub const fn new(bus: u8, dev: u8, func: u8) -> Self {
        Self(((bus as u16) << 8) | (((dev & 0x1f) as u16) << 3) | ((func & 0x7) as u16))
    }
    /// The bus number: the root-table index (VT-d 3.4.2).
    pub const fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }
    /// The device number.
    pub const fn dev(self) -> u8 {
        ((self.0 >> 3) & 0x1f) as u8
    }
    /// The function number.
    pub const fn func(self) -> u8 {
        (self.0 & 0x7) as u8
    }
    /// device:function as one byte: the context-table index (VT-d 3.4.3).
    pub const fn devfn(self) -> u8 {
        (self.0 & 0xff) as u8
    }
}

/// The requester id as the wire carries it (a `u32` field holding the 16 bits).
impl From<SourceId> for u32 {
    fn from(sid: SourceId) -> u32 {
        u32::from(sid.0)
    }
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{:x}", self.bus(), self.dev(), self.func())
    }
}

impl fmt::Debug for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SourceId({self})")
    }
}

/// Why a string is not a requester id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid requester id {input:?}: expected bus:dev.fn in hex, like 00:1f.3")]
pub struct ParseSourceIdError {
    input: String,
}

impl FromStr for SourceId {
    type Err = ParseSourceIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseSourceIdError { input: s.to_owned() };
        let (bus, rest) = s.split_once(':').ok_or_else(err)?;
        let (dev, func) = rest.split_once('.').ok_or_else(err)?;
        let bus = u8::from_str_radix(bus, 16).map_err(|_| err())?;
        let dev = u8::from_str_radix(dev, 16).map_err(|_| err())?;
        let func = u8::from_str_radix(func, 16).map_err(|_| err())?;
        if dev > 0x1f || func > 7 {
            return Err(err());
        }
        Ok(Self::new(bus, dev, func))
    }
}

/// A process address space id (PCIe PASID, 20 bits). Cache keys carry it so that
/// scalable-mode translation can arrive without reshaping the caches.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Pasid(pub u32);

/// An ATS invalidation tag (PCIe 10.3.1: 0..=31).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct ITag(pub u8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_id_round_trips_through_text() {
        let sid = SourceId::new(0x00, 0x1f, 3);
        assert_eq!(sid.to_string(), "00:1f.3");
        assert_eq!("00:1f.3".parse::<SourceId>(), Ok(sid));
        assert_eq!(sid.bus(), 0);
        assert_eq!(sid.devfn(), (0x1f << 3) | 3);
        let sid = SourceId::new(0xab, 0x02, 7);
        assert_eq!(sid.to_string().parse::<SourceId>(), Ok(sid));
    }

    #[test]
    fn source_id_rejects_out_of_range_parts() {
        for bad in ["", "00", "00:20.0", "00:1f.8", "100:00.0", "zz:00.0", "00:00"] {
            assert!(bad.parse::<SourceId>().is_err(), "{bad} parsed");
        }
    }
}
