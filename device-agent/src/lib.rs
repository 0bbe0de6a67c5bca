//! dmar-agent: emulated PCIe functions with ATS device TLBs, on one ATS link to a dmar
//! server.
//!
//! An agent hosts one or more functions (requester ids `bb:dd.f`). Each keeps its own
//! address translation cache ([`atc`]): bounded, range entries exactly as completed, R/W/U
//! enforced, LRU/random/FIFO eviction. Misses become tagged translation requests,
//! pipelined, coalesced per page and access, batched into link messages ([`link`]).
//! Invalidation requests drop the covered entries and complete once no DMA still uses
//! them; PRI page requests resolve not-present pages; a workload engine issues DMA in
//! closed or open loop over uniform, Zipf, ring, strided or recorded streams, or runs the
//! unary no-device-TLB baseline ([`workload`]). The load generator drives agents through
//! the `AgentControl` gRPC service and collects HdrHistogram reports.
//!
//! Embedding: [`Agent::start`] for direct access to the functions (tests, the load
//! generator), [`run`] for the whole agent with its control and metrics ports (what the
//! binary calls).
//!
//! Modules: [`atc`] the device TLB; [`config`] configuration; [`function`] one function's
//! task and accesses; [`link`] the ATS link; [`workload`] workloads, runs and reports;
//! `control` the gRPC service; [`metrics`] Prometheus; [`cli`] the command line.

pub mod agent;
pub mod atc;
pub mod cli;
pub mod config;
mod control;
pub mod counters;
mod fasthash;
pub mod function;
pub mod link;
pub mod metrics;
mod metrics_http;
pub mod workload;

pub use agent::{Agent, AgentError, Listeners, run, serve};
pub use config::{AgentConfig, ConfigError, FunctionConfig};
pub use counters::Counters;
pub use dmar_vtd::SourceId;
pub use function::{
    Access, AccessError, AccessOutcome, AccessResult, Fault, FunctionHandle, FunctionSnapshot, HeldDma, Mode,
    PageRequestFailure, Stopped,
};
pub use link::LinkState;
pub use workload::{Pattern, Report, Run, RunPhase, StreamSpec, WorkloadError, WorkloadSpec};
