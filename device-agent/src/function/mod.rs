//! One emulated PCIe function: its device TLB, its accesses, and everything its link
//! traffic means for them.
//!
//! A function is a sans-IO state machine (`machine`) driven by a thin task (`task`).
//! The machine owns all of the function's state (the ATC, the accesses in progress, the
//! outstanding translation requests and their coalescing table, pending invalidations,
//! page request groups, counters) and turns inputs (an access, what the server sent, the
//! link coming up or down, the time) into effects (requests for the link, outcomes for
//! callers, timings). The task owns the channels: the link reader hands it batches of
//! what the server sent, handles send it commands, and it answers through oneshot
//! channels; it also paces the running workload. Nothing of a function is shared, so the
//! hit path takes no lock and no cache lock can ever be held across an await.
//!
//! Files: `dma` (the public request and outcome types), `handle` (the handle and its
//! commands), `messages` (link messages in the agent's types), `machine` (the state
//! machine's inputs and outputs), `access` (hits, misses, coalescing, DMA), `invalidation`
//! (drain-before-ack), `pri` (page requests), `ops` (accesses in progress), `task` (the
//! event loop). Not here: the wire format (`wire`), the connection (`link`), what to
//! access when (`workload`).

mod access;
mod dma;
mod handle;
mod invalidation;
mod machine;
pub(crate) mod messages;
mod ops;
mod pri;
mod task;

pub use self::dma::{Dma, DmaError, DmaOutcome, DmaResult, InvalidDma, Mode, PageRequestFailure};
pub(crate) use self::handle::Command;
pub use self::handle::{AccessError, FunctionHandle, FunctionSnapshot, HeldDma, Stopped};
pub(crate) use self::task::{FunctionTask, Inbound, TaskParts};
