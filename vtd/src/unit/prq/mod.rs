//! The page request queue: PCIe PRI page requests without PASID, as the remapping hardware
//! reports them to software (VT-d 7.5) and as software answers them (VT-d 7.6).
//!
//! Owns:
//! - the page request as the unit receives it from a device ([`PageRequest`]) and its
//!   32-byte page request descriptor in the queue (VT-d 7.5; VTD-REFERENCE b.6);
//! - the queue registers PQH, PQT, PQA, PRS (PPR, PRO) and the page request event
//!   registers PECTL, PEDATA, PEADDR, PEUADDR (VT-d 10.4, PQH_REG to PEUADDR_REG; b.1),
//!   with the rules for overflow (VT-d 7.5.1) and for the page request event
//!   ([`PageRequestQueue`]);
//! - the page group response ([`PageGroupResponse`]) and the decoding of the type-9
//!   invalidation descriptor that carries it (VT-d 7.6; b.5 type 9).
//!
//! Not owned here: deciding whether a device may issue page requests at all (ECAP.PRS, the
//! device's PRI enable, context-entry checks), fetching descriptors from the invalidation
//! queue, and delivering messages. Every call returns what must leave the unit (an
//! interrupt message for [`UnitEvents::interrupt_message`](super::UnitEvents), a response
//! for the device) instead of sending it, so the caller routes it after the queue's lock is
//! released.
//!
//! The queue in host memory at PQA is the only storage: a request either lands there or is
//! dropped (and, for the last request of a group, answered by the hardware itself), so
//! nothing here grows with the number of requests.

mod descriptor;
mod queue;

pub use descriptor::{
    DescriptorError, PAGE_GROUP_RESPONSE_TYPE, PAGE_REQUEST_TYPE, PageGroupResponse, PageRequest, ResponseCode,
    ResponseError,
};
pub use queue::{DrainError, Drained, PageRequestQueue, QueueAddress, QueueAddressError, Submitted};

/// Size of one page request descriptor in bytes (VT-d 7.5: 256-bit descriptors; b.6).
pub const DESCRIPTOR_SIZE: u64 = 32;

/// ECAP.PRS (bit 29): page requests supported. Advertise it once requests are routed here.
pub const ECAP_PRS: u64 = 1 << 29;

/// Register offsets in the unit's MMIO window (VT-d 10.4; VTD-REFERENCE b.1).
pub mod regs {
    use std::ops::Range;

    /// PQH_REG (64): page request queue head, a byte offset software advances.
    pub const PQH: u64 = 0xc0;
    /// PQT_REG (64): page request queue tail, a byte offset hardware advances.
    pub const PQT: u64 = 0xc8;
    /// PQA_REG (64): page request queue address and size.
    pub const PQA: u64 = 0xd0;
    /// PRS_REG (32): page request status.
    pub const PRS: u64 = 0xdc;
    /// PECTL_REG (32): page request event control.
    pub const PECTL: u64 = 0xe0;
    /// PEDATA_REG (32): page request event interrupt data.
    pub const PEDATA: u64 = 0xe4;
    /// PEADDR_REG (32): page request event interrupt address, bits 31:2.
    pub const PEADDR: u64 = 0xe8;
    /// PEUADDR_REG (32): page request event interrupt upper address.
    pub const PEUADDR: u64 = 0xec;
    /// Every offset the queue decodes: route MMIO accesses in this range to
    /// [`PageRequestQueue`](super::PageRequestQueue). 0xd8 is reserved (reads 0).
    pub const RANGE: Range<u64> = PQH..PEUADDR + 4;

    /// PQH/PQT: the offset field, bits 18:5 (32-byte aligned, up to 512 KiB).
    pub const OFFSET_MASK: u64 = 0x7_ffe0;

    /// PRS bits; both are write-1-to-clear (VT-d 10.4, PRS_REG).
    pub mod prs {
        /// Pending page request: a descriptor was added since software last cleared it.
        pub const PPR: u32 = 1 << 0;
        /// Page request overflow: a request was dropped because the queue was full.
        pub const PRO: u32 = 1 << 1;
    }

    /// PECTL bits (VT-d 10.4, PECTL_REG), at the same positions as FECTL's.
    pub mod pectl {
        /// Interrupt mask (set at reset).
        pub const IM: u32 = 1 << 31;
        /// Interrupt pending (read-only to software).
        pub const IP: u32 = 1 << 30;
    }
}
