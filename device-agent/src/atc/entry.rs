//! One device-TLB entry: a translation range exactly as a completion gave it, with its
//! permissions, and the answer a lookup gives.
//!
//! Owns the rules that read an entry (PCIe 10.2.3, Translation Completion: R, W, U bits;
//! a naturally aligned range of `2^size_shift` bytes). Not the cache itself (`atc`) nor
//! the wire decoding (`wire`).

/// Smallest range a completion can describe (one 4 KiB page).
pub(crate) const MIN_SIZE_SHIFT: u8 = 12;
/// Largest range the cache keeps (the cache key needs the shift to be below 64).
pub(crate) const MAX_SIZE_SHIFT: u8 = 63;

/// The permission bits of an entry: R, W and U (untranslated only) of a translation
/// completion. Exe and Priv are never granted by VT-d in legacy mode and are not kept.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Perms(u8);

impl Perms {
    const READ: u8 = 1;
    const WRITE: u8 = 2;
    const UNTRANSLATED: u8 = 4;

    /// Builds the bits of a completion.
    pub const fn new(read: bool, write: bool, untranslated_only: bool) -> Self {
        Self(
            ((read as u8) * Self::READ)
                | ((write as u8) * Self::WRITE)
                | ((untranslated_only as u8) * Self::UNTRANSLATED),
        )
    }
    /// R: translated reads allowed.
    pub const fn read(self) -> bool {
        self.0 & Self::READ != 0
    }
    /// W: translated writes allowed.
    pub const fn write(self) -> bool {
        self.0 & Self::WRITE != 0
    }
    /// U: the range must be accessed with untranslated requests.
    pub const fn untranslated_only(self) -> bool {
        self.0 & Self::UNTRANSLATED != 0
    }
    /// Whether the entry grants anything (R=W=0 completions are not cached).
    pub const fn any(self) -> bool {
        self.0 & (Self::READ | Self::WRITE) != 0
    }
    /// Whether the entry grants the access (`write` or read).
    #[inline]
    pub const fn allows(self, write: bool) -> bool {
        self.0 & if write { Self::WRITE } else { Self::READ } != 0
    }
}

/// Why a completion cannot become an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// The range size is outside 4 KiB..=2^63 bytes.
    #[error("range size 2^{0} is outside 2^12..=2^63 bytes")]
    SizeShift(u32),
    /// The translated address is not aligned to the range size.
    #[error("translated address {0:#x} is not aligned to its range")]
    Misaligned(u64),
}

/// A cached translation: the naturally aligned range of `2^size_shift` bytes containing the
/// address that was asked for, translated to `translated`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct AtcEntry {
    /// First untranslated address of the range (aligned to its size).
    pub iova: u64,
    /// First translated address of the range (aligned to its size).
    pub translated: u64,
    /// log2 of the range size in bytes.
    pub size_shift: u8,
    /// R, W, U.
    pub perms: Perms,
}

impl AtcEntry {
    /// The entry a completion describes for a request at `iova`: the completion's range is
    /// the naturally aligned one that contains `iova` (PCIe ATS 2.2.3).
    pub fn from_completion(iova: u64, translated: u64, size_shift: u32, perms: Perms) -> Result<Self, EntryError> {
        if !(u32::from(MIN_SIZE_SHIFT)..=u32::from(MAX_SIZE_SHIFT)).contains(&size_shift) {
            return Err(EntryError::SizeShift(size_shift));
        }
        let mask = (1u64 << size_shift) - 1;
        if translated & mask != 0 {
            return Err(EntryError::Misaligned(translated));
        }
        Ok(Self { iova: iova & !mask, translated, size_shift: size_shift as u8, perms })
    }

    /// Range size in bytes.
    pub const fn size(&self) -> u64 {
        1u64 << self.size_shift
    }

    /// Last untranslated address of the range.
    pub const fn last(&self) -> u64 {
        self.iova + (self.size() - 1)
    }

    /// Whether `iova` lies in the range.
    pub const fn contains(&self, iova: u64) -> bool {
        iova >= self.iova && iova <= self.last()
    }

    /// Whether the range meets the inclusive range `first..=last`.
    pub const fn overlaps(&self, first: u64, last: u64) -> bool {
        self.iova <= last && self.last() >= first
    }

    /// The translated address of `iova` (which must lie in the range).
    #[inline]
    pub const fn translate(&self, iova: u64) -> u64 {
        self.translated | (iova & (self.size() - 1))
    }
}

/// What the device TLB says about an access.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Lookup {
    /// A translated request may go to `hpa`.
    Hit {
        /// The translated address of the accessed byte.
        hpa: u64,
        /// log2 of the size of the entry's range.
        size_shift: u8,
    },
    /// The entry says U: the access must be an untranslated request.
    Untranslated,
    /// An entry covers the address but does not grant the access: a translated request
    /// would break its permissions (e.g. no write through a read-only entry); the
    /// function must ask again.
    NoPermission,
    /// No entry covers the address.
    Miss,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perms_read_back() {
        let p = Perms::new(true, false, false);
        assert!(p.read() && !p.write() && !p.untranslated_only() && p.any());
        assert!(p.allows(false) && !p.allows(true));
        let p = Perms::new(false, true, true);
        assert!(!p.read() && p.write() && p.untranslated_only());
        assert!(!Perms::new(false, false, true).any());
    }

    #[test]
    fn entries_are_naturally_aligned_ranges() {
        let e = AtcEntry::from_completion(0x20_1234, 0x4000_0000, 21, Perms::new(true, true, false)).expect("entry");
        assert_eq!(e.iova, 0x20_0000);
        assert_eq!(e.size(), 2 << 20);
        assert!(e.contains(0x3f_ffff) && !e.contains(0x40_0000) && !e.contains(0x1f_ffff));
        assert_eq!(e.translate(0x20_1234), 0x4000_1234);
        assert!(e.overlaps(0x3f_f000, 0x50_0000) && !e.overlaps(0x40_0000, 0x50_0000));
        assert_eq!(AtcEntry::from_completion(0, 0x1000, 21, Perms::default()), Err(EntryError::Misaligned(0x1000)));
        assert_eq!(AtcEntry::from_completion(0, 0, 11, Perms::default()), Err(EntryError::SizeShift(11)));
        assert_eq!(AtcEntry::from_completion(0, 0, 64, Perms::default()), Err(EntryError::SizeShift(64)));
    }
}
