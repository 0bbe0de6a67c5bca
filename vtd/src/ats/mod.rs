//! The PCIe ATS and PRI encodings and limits that both ends of an ATS link share: the
//! remapping unit (which forwards device-TLB invalidations and queues page requests) and
//! the device side (which decodes invalidation requests and numbers its page requests).
//!
//! This module owns the wire-level rules of PCIe, not VT-d's descriptor formats (those are
//! in [`crate::unit`]) and not dmar's protobuf messages (those are in `dmar-proto`).

pub mod range;

/// The most invalidation requests a function may have outstanding, and so the number of
/// ITags (PCIe 10.5.1.2: Invalidate Queue Depth, 0 meaning 32; ITag is 5 bits, 10.3.1).
pub const MAX_QUEUE_DEPTH: u8 = 32;

/// Bits in a page request group index (PCIe 10.4.1: PRG Index is 9 bits).
pub const PRG_INDEX_BITS: u32 = 9;

/// The largest page request group index.
pub const MAX_PRG_INDEX: u16 = (1 << PRG_INDEX_BITS) - 1;

/// The most functions one ATS link binds. A dmar link limit, not a PCIe one: it bounds the
/// per-link state a peer can make the server hold.
pub const MAX_FUNCTIONS_PER_LINK: usize = 256;

/// The most items (translations, DMAs, page requests, completions) in one link message,
/// in either direction. A dmar link limit that bounds the work one message can cause.
pub const MAX_ITEMS_PER_MESSAGE: usize = 4096;
