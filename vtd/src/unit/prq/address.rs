//! PQA_REG, the page request queue address register (VT-d 10.4.33), as a value: where the
//! queue is and how big. Software builds it ([`QueueAddress::new`]); the unit latches it
//! ([`QueueAddress::from_bits`]). The field positions are `unit::regs::pq`'s.

use super::DESCRIPTOR_SIZE;
use crate::ids::Hpa;
use crate::unit::regs::pq;

/// PQA_REG: base and size of the page request queue (VT-d 10.4.33).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct QueueAddress(u64);

impl QueueAddress {
    /// Bits software can write: PQA bits 63:12 and PQS bits 2:0; bits 11:3 are reserved.
    pub const WRITABLE: u64 = pq::PQA_WRITABLE;
    /// Largest PQS: 2^(7+7) entries, 512 KiB, the reach of the PQH/PQT offset field.
    pub const MAX_PQS: u8 = 7;

    /// A queue of 2^(`pqs`+7) 32-byte entries at `base`, which must be 4 KiB aligned.
    pub fn new(base: Hpa, pqs: u8) -> Result<Self, QueueAddressError> {
        if !base.is_page_aligned() {
            return Err(QueueAddressError::Misaligned(base));
        }
        if pqs > Self::MAX_PQS {
            return Err(QueueAddressError::SizeOutOfRange(pqs));
        }
        Ok(Self(base.0 | u64::from(pqs)))
    }

    /// The register value as hardware latches it: reserved bits read back as zero.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits & Self::WRITABLE)
    }

    /// The register value.
    pub const fn to_bits(self) -> u64 {
        self.0
    }

    /// The 4 KiB-aligned base of the queue.
    pub const fn base(self) -> Hpa {
        Hpa(self.0 & pq::PQA_BASE_MASK)
    }

    /// PQS: the queue spans 2^PQS 4 KiB pages.
    pub const fn pqs(self) -> u8 {
        (self.0 & pq::PQA_PQS_MASK) as u8
    }

    /// Number of descriptors: 2^(PQS+7) (VT-d 10.4.33).
    pub const fn entries(self) -> u64 {
        1 << (self.pqs() + 7)
    }

    /// Size of the queue in bytes.
    pub const fn bytes(self) -> u64 {
        self.entries() * DESCRIPTOR_SIZE
    }
}

/// Why a queue address cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueAddressError {
    /// The base is not 4 KiB aligned.
    #[error("page request queue base {0} is not 4 KiB aligned")]
    Misaligned(Hpa),
    /// PQS is a 3-bit field.
    #[error("page request queue size {0} exceeds the maximum of 7")]
    SizeOutOfRange(u8),
}
