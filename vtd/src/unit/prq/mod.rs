//! The page request queue: PCIe PRI page requests without PASID, as the remapping hardware
//! reports them to software (VT-d 7.5) and as software answers them (VT-d 7.6).
//!
//! Owns:
//! - the page request as the unit receives it from a device ([`PageRequest`]) and its
//!   32-byte page request descriptor in the queue (VT-d 7.5.1), and the page group
//!   response ([`PageGroupResponse`]) with the type-9 invalidation descriptor that carries
//!   it (VT-d 7.6) (`descriptor`);
//! - the queue registers PQH, PQT, PQA ([`QueueAddress`]), PRS (PPR, PRO) and the page
//!   request event (PECTL, PEDATA, PEADDR, PEUADDR, an `EventControl`; VT-d
//!   10.4.31-10.4.38), with the rules for overflow (VT-d 7.5.1) and for the page request
//!   event (`queue`);
//! - admission: whether a device may issue page requests at all (its context entry must
//!   enable device TLBs), and routing what the queue returns (`admission`).
//!
//! Not owned here: fetching page group responses from the invalidation queue (the
//! invalidation queue decodes them with [`PageGroupResponse::from_descriptor`] and sends
//! them through the function's device port), register offsets (`unit::regs`), and
//! delivering messages: the queue returns what must leave the unit (an interrupt message,
//! a response for the device) instead of sending it, so the caller routes it after the
//! queue's lock is released.
//!
//! The queue in host memory at PQA is the only storage: a request either lands there or is
//! dropped (and, for the last request of a group, answered by the hardware itself), so
//! nothing here grows with the number of requests.

mod address;
mod admission;
mod descriptor;
mod queue;
#[cfg(test)]
mod tests;

pub use address::{QueueAddress, QueueAddressError};
pub use admission::{PageRequestError, PageRequestOutcome};
pub use descriptor::{
    DescriptorError, PAGE_GROUP_RESPONSE_TYPE, PAGE_REQUEST_TYPE, PageGroupResponse, PageRequest, ResponseCode,
    ResponseError,
};
pub(crate) use queue::PageRequestQueue;

/// Size of one page request descriptor in bytes (VT-d 7.5.1: 256-bit descriptors).
pub const DESCRIPTOR_SIZE: u64 = 32;
