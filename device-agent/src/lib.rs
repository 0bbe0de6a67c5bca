//! dmar-agent: emulated PCIe functions with ATS device TLBs, on one ATS link to a dmar
//! server.
//!
//! An agent hosts one or more functions (requester ids `bb:dd.f`). Each keeps its own
//! address translation cache ([`atc`]): bounded, range entries exactly as completed, R/W/U
//! enforced, LRU/random/FIFO eviction. Misses become tagged translation requests,
//! pipelined, coalesced per page and access, batched into link messages. Invalidation
//! requests drop the covered entries and complete once no DMA still uses them; PRI page
//! requests resolve not-present pages; a workload engine issues DMA in closed or open loop
//! over uniform, Zipf, ring, strided or recorded streams, or runs a no-device-TLB
//! baseline, unary (`Control.Translate`) or over the link ([`workload`]). The load generator drives agents through the
//! `AgentControl` gRPC service and collects HdrHistogram reports.
//!
//! Embedding: [`Agent::start`] for direct access to the functions (tests, the load
//! generator), [`run`] for the whole agent with its control and metrics ports, and
//! [`run_with_health`] with a plaintext health-only port beside them (what the binary
//! calls).
//!
//! Security: with [`AgentSecurity`] holding [`AgentTls`], the link and the control port use
//! mutual TLS and only trusted identities may drive the control port; without it both are
//! plaintext, which [`check_plaintext`] allows on loopback only (or with `insecure`).
//! Trace files are read only from [`AgentConfig::trace_dir`].
//!
//! Modules: [`atc`] the device TLB; `function` one function (a sans-IO state machine and
//! the task that drives it); `link` the ATS link; `wire` every protobuf conversion;
//! [`workload`] workloads, runs and reports; `agent` wiring and lifecycle; `control` the
//! AgentControl service; `security` TLS settings, the plaintext rule, the control port's
//! gate; `config` configuration; [`metrics`] Prometheus; [`cli`] the command line.

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
mod security;
mod wire;
pub mod workload;

pub use agent::{Agent, AgentError, Listeners, run, run_with_health};
pub use config::{AgentConfig, ConfigError, FunctionConfig};
pub use counters::Counters;
/// The identity and TLS material types [`AgentSecurity`] is made of, so embedders need not
/// name `dmar-auth` themselves.
pub use dmar_auth::{Identity, TlsMaterial};
pub use dmar_vtd::SourceId;
pub use function::{
    AccessError, Dma, DmaError, DmaOutcome, DmaResult, FunctionHandle, FunctionSnapshot, HeldDma, InvalidDma, Mode,
    PageRequestFailure, Stopped,
};
pub use link::LinkState;
pub use security::{
    AgentSecurity, AgentTls, DEFAULT_SERVER_NAME, DEFAULT_TLS_NAME, DEFAULT_TRUSTED_CLIENT, MAX_NAME_CHARS,
    PlaintextRefused, TlsSetupError, check_plaintext, printable_name,
};
pub use workload::{Pattern, Report, Run, RunPhase, StreamSpec, WorkloadError, WorkloadSpec};
