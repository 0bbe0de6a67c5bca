//! dmar-agent: emulated PCIe functions with ATS device TLBs, on one ATS link to a dmar
//! server.
//!
//! An agent hosts one or more functions (requester ids `bb:dd.f`). Each keeps its own
//! address translation cache ([`atc`]): bounded, range entries exactly as completed, R/W/U
//! enforced, LRU/random/FIFO eviction. Misses become tagged translation requests,
//! pipelined, coalesced per page and access, batched into link messages. Invalidation
//! requests drop the covered entries and complete once no DMA still uses them; PRI page
//! requests resolve not-present pages; a workload engine issues DMA in closed or open loop
//! over uniform, Zipf, ring, strided or recorded streams, or runs the unary
//! no-device-TLB baseline ([`workload`]). The load generator drives agents through the
//! `AgentControl` gRPC service and collects HdrHistogram reports.
//!
//! Embedding: [`Agent::start`] for direct access to the functions (tests, the load
//! generator), [`run`] for the whole agent with its control and metrics ports (what the
//! binary calls).
//!
//! Modules: [`atc`] the device TLB; `function` one function (a sans-IO state machine and
//! the task that drives it); `link` the ATS link; `wire` every protobuf conversion;
//! [`workload`] workloads, runs and reports; `agent` wiring and lifecycle; `control` the
//! AgentControl service; `config` configuration; [`metrics`] Prometheus; [`cli`] the
//! command line.

mod agent;
pub mod atc;
pub mod cli;
mod config;
mod control;
mod counters;
mod fasthash;
mod function;
mod link;
pub mod metrics;
mod metrics_http;
mod wire;
pub mod workload;

pub use agent::{Agent, AgentError, Listeners, run};
pub use config::{AgentConfig, ConfigError, FunctionConfig};
pub use counters::Counters;
pub use dmar_vtd::SourceId;
pub use function::{
    AccessError, Dma, DmaError, DmaOutcome, DmaResult, FunctionHandle, FunctionSnapshot, HeldDma, InvalidDma, Mode,
    PageRequestFailure, Stopped,
};
pub use link::LinkState;
pub use workload::{Pattern, Report, Run, RunPhase, StreamSpec, WorkloadError, WorkloadSpec};
