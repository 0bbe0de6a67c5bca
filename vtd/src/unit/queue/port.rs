//! The device port: how device-TLB invalidations leave the unit and how their completions
//! come back (PCIe ATS invalidation request / completion).
//!
//! The network layer implements [`DevicePort`] for each bound function; tests implement it
//! in process. Ports must not block: they hand the request to a queue or a channel and the
//! device answers later through [`crate::unit::Unit::device_tlb_completed`].

use std::time::Instant;

use crate::ats::range as srange;
use crate::ids::{ITag, Iova, SourceId};

/// The most invalidations a function can have outstanding (ATS: 5-bit ITag).
pub const MAX_QUEUE_DEPTH: u8 = 32;

/// An ATS invalidation request for one function's device TLB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInvalidation {
    /// The function.
    pub sid: SourceId,
    /// The tag the completion must carry.
    pub itag: ITag,
    /// Untranslated address with the S-bit range encoding in bit 0.
    pub addr_s: u64,
}

impl DeviceInvalidation {
    /// The invalidated range: first address and size in bytes.
    pub fn range(&self) -> (Iova, u64) {
        srange::decode(self.addr_s)
    }
}

/// A page group response on its way to a function (PCIe PRI).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageResponse {
    /// The function.
    pub sid: SourceId,
    /// Page request group index.
    pub prgi: u16,
    /// Response code: 0 success, 1 invalid request, 0xF response failure.
    pub code: u8,
}

/// Where a function's device-side traffic from the unit goes.
pub trait DevicePort: Send + Sync + std::fmt::Debug {
    /// Delivers an invalidation request. Must not block.
    fn invalidate(&self, request: DeviceInvalidation);
    /// Delivers a page group response. Must not block.
    fn page_response(&self, _response: PageResponse) {}
}

/// Per-function bookkeeping of outstanding ITags.
#[derive(Debug)]
pub(crate) struct PortState {
    pub(crate) port: std::sync::Arc<dyn DevicePort>,
    /// Invalidate queue depth the function advertised (1..=32).
    pub(crate) depth: u8,
    /// Bit i: ITag i is outstanding.
    pub(crate) in_use: u32,
    /// Bit i: ITag i was abandoned by a time-out; a late completion for it is ignored.
    pub(crate) abandoned: u32,
    pub(crate) sent_at: [Option<Instant>; MAX_QUEUE_DEPTH as usize],
}

impl PortState {
    pub(crate) fn new(port: std::sync::Arc<dyn DevicePort>, depth: u8) -> Self {
        Self { port, depth: depth.clamp(1, MAX_QUEUE_DEPTH), in_use: 0, abandoned: 0, sent_at: [None; 32] }
    }

    /// Takes the lowest free ITag, if fewer than `limit` are outstanding.
    pub(crate) fn take(&mut self, limit: u8, now: Instant) -> Option<ITag> {
        let limit = limit.min(self.depth);
        if self.in_use.count_ones() >= u32::from(limit) {
            return None;
        }
        let tag = (!self.in_use).trailing_zeros();
        if tag >= 32 {
            return None;
        }
        self.in_use |= 1 << tag;
        self.abandoned &= !(1 << tag);
        self.sent_at[tag as usize] = Some(now);
        Some(ITag(tag as u8))
    }

    pub(crate) fn outstanding(&self) -> u32 {
        self.in_use.count_ones()
    }
}
