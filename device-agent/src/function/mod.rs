//! One emulated PCIe function: its device TLB, its accesses, and everything its link
//! traffic means for them.
//!
//! Each function is one task that owns all of its state (the ATC, the outstanding
//! translation requests and their coalescing table, DMA in flight, pending invalidations,
//! page request groups, counters, the running workload). Nothing of it is shared: the link
//! reader hands the task batches of what the server sent, handles send it commands, and it
//! answers through oneshot channels. So the hit path takes no lock and no cache lock can
//! ever be held across an await.
//!
//! Files: `task` (the event loop and the life of an access), `ops` (accesses in flight),
//! `invalidation` (ITags waiting for DMA to drain), `pri` (page request groups).
//! Not here: the wire connection (`link`), what to access when (`workload`).

mod invalidation;
mod ops;
mod pri;
mod task;

use std::sync::Arc;
use std::time::Duration;

use dmar_proto::v1::{DmaCompletion, InvalidationRequest, PageGroupResponse, TranslateResponse, TranslationCompletion};
use dmar_vtd::SourceId;
use tokio::sync::{mpsc, oneshot};

use crate::atc::AtcEntry;
use crate::config::FunctionConfig;
use crate::counters::Counters;
use crate::workload::engine::Engine;

pub(crate) use self::ops::OpId;
pub(crate) use self::task::{FunctionTask, TaskParts};

/// How an access gets its translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// The device TLB; misses become ATS translation requests on the link.
    #[default]
    Ats,
    /// No device TLB: one unary `Control.Translate` call per access (the vhost-IOTLB
    /// style baseline).
    Baseline,
}

/// Largest DMA of one access: one page, so that one translation always covers it.
pub const MAX_ACCESS_BYTES: u32 = 4096;

/// One access a function makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// The untranslated address.
    pub iova: u64,
    /// A write (else a read).
    pub write: bool,
    /// Bytes moved by the DMA, 1..=4096, within one 4 KiB page.
    pub len: u32,
    /// Stop once translated: no DMA.
    pub translate_only: bool,
    /// How it is translated.
    pub mode: Mode,
}

impl Access {
    /// A 64-byte read at `iova`.
    pub const fn read(iova: u64) -> Self {
        Self { iova, write: false, len: 64, translate_only: false, mode: Mode::Ats }
    }

    /// A 64-byte write at `iova`.
    pub const fn write(iova: u64) -> Self {
        Self { iova, write: true, len: 64, translate_only: false, mode: Mode::Ats }
    }

    /// The same access, stopping at the translation.
    pub const fn translate_only(self) -> Self {
        Self { translate_only: true, ..self }
    }

    /// The same access moving `len` bytes.
    pub const fn with_len(self, len: u32) -> Self {
        Self { len, ..self }
    }

    /// The same access in the baseline mode.
    pub const fn baseline(self) -> Self {
        Self { mode: Mode::Baseline, ..self }
    }

    /// Checks the length rules.
    pub fn validate(&self) -> Result<(), InvalidAccess> {
        if self.len == 0 || self.len > MAX_ACCESS_BYTES || (self.iova & 0xfff) + u64::from(self.len) > 4096 {
            return Err(InvalidAccess { iova: self.iova, len: self.len });
        }
        Ok(())
    }
}

/// An access whose DMA would not fit one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an access of {len} bytes at {iova:#x} does not fit one 4 KiB page (1..=4096 bytes)")]
pub struct InvalidAccess {
    /// The address.
    pub iova: u64,
    /// The length.
    pub len: u32,
}

/// Why a page request did not make the page available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageRequestFailure {
    /// The response said Invalid Request.
    Invalid,
    /// The response said Response Failure: the function stops issuing page requests until
    /// its link is reset.
    Failure,
    /// Another response code.
    Other(i32),
    /// No response in time (the server's page request queue may have overflowed).
    Timeout,
}

/// Why an access could not be performed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The translation grants no such access (not present, or lacking the permission),
    /// and PRI could not help (disabled, stopped, or already tried).
    NoAccess,
    /// The completion said Unsupported Request (the context does not allow ATS).
    UnsupportedRequest,
    /// The completion said Completer Abort.
    CompleterAbort,
    /// The completion could not be read (a misaligned range).
    Malformed,
    /// A page request failed.
    PageRequest(PageRequestFailure),
    /// The baseline's unary translation was refused with this fault reason.
    Refused {
        /// VT-d fault reason code (0 when refused without a fault).
        fault_reason: u32,
    },
}

/// How an access ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessResult {
    /// Translated, and the DMA (if any) completed.
    Ok,
    /// No usable translation.
    Fault(Fault),
    /// The server refused the DMA.
    DmaFailed {
        /// The fault reason it gave.
        fault_reason: u32,
    },
    /// The link (or, in baseline mode, the control channel) went down under it, or was
    /// down.
    LinkDown,
}

/// What happened to an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessOutcome {
    /// How it ended.
    pub result: AccessResult,
    /// The device TLB answered it.
    pub atc_hit: bool,
    /// It joined another access's translation request.
    pub coalesced: bool,
    /// It needed a page request.
    pub page_requested: bool,
    /// Its DMA was (or would be) untranslated.
    pub untranslated: bool,
    /// Its translated address, when translated.
    pub translated: Option<u64>,
    /// log2 of the range that translated it (0 when not translated).
    pub size_shift: u8,
    /// From its start to its end.
    pub latency: Duration,
}

impl AccessOutcome {
    /// Whether it succeeded.
    pub fn is_ok(&self) -> bool {
        self.result == AccessResult::Ok
    }
}

/// A function's state at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct FunctionSnapshot {
    /// Requester id.
    pub sid: SourceId,
    /// Entries in the device TLB.
    pub atc_entries: usize,
    /// Counters since the agent started.
    pub counters: Counters,
    /// The connection the function is using, if the link is up.
    pub link_generation: Option<u64>,
    /// Translation requests outstanding.
    pub outstanding_translations: usize,
    /// Invalidations received and not yet completed (waiting for DMA to drain).
    pub pending_invalidations: usize,
    /// Accesses whose DMA is in flight or held back (see [`FunctionHandle::hold`]).
    pub dma_in_flight: usize,
    /// Page request groups outstanding.
    pub outstanding_page_requests: usize,
    /// Accesses in progress of any kind.
    pub accesses_in_flight: usize,
}

/// The function's task has stopped: the agent is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the function has stopped (the agent is shutting down)")]
pub struct Stopped;

/// Why an access could not even start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The access breaks the length rules.
    #[error(transparent)]
    Invalid(#[from] InvalidAccess),
    /// The function has stopped.
    #[error(transparent)]
    Stopped(#[from] Stopped),
}

/// What the server sent for one function in one link message.
#[derive(Debug, Default)]
pub(crate) struct FunctionDown {
    pub(crate) invalidations: Vec<InvalidationRequest>,
    pub(crate) completions: Vec<TranslationCompletion>,
    pub(crate) dma: Vec<DmaCompletion>,
    pub(crate) page_responses: Vec<PageGroupResponse>,
}

impl FunctionDown {
    pub(crate) fn is_empty(&self) -> bool {
        self.invalidations.is_empty()
            && self.completions.is_empty()
            && self.dma.is_empty()
            && self.page_responses.is_empty()
    }
}

/// Events from the link (and from the function's own baseline calls).
#[derive(Debug)]
pub(crate) enum Inbound {
    /// Connection `generation` is bound: start with an empty device TLB.
    LinkUp { generation: u64 },
    /// Connection `generation` is gone: everything that waited on it is abandoned.
    LinkDown { generation: u64 },
    /// Traffic from the server.
    Down(FunctionDown),
    /// A baseline unary translation finished.
    Baseline { op: OpId, serial: u64, result: Result<TranslateResponse, tonic::Status> },
}

/// A translation held for a DMA that has not been sent yet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeldInfo {
    op: OpId,
    serial: u64,
    translated: Option<u64>,
}

/// Requests from handles.
#[derive(Debug)]
pub(crate) enum Command {
    Access { access: Access, reply: oneshot::Sender<AccessOutcome> },
    AccessMany { accesses: Vec<(Access, oneshot::Sender<AccessOutcome>)> },
    Hold { access: Access, reply: oneshot::Sender<Result<HeldInfo, AccessOutcome>> },
    Release { op: OpId, serial: u64, reply: oneshot::Sender<AccessOutcome> },
    Snapshot { reply: oneshot::Sender<FunctionSnapshot> },
    Entries { reply: oneshot::Sender<Vec<AtcEntry>> },
    Clear { reply: oneshot::Sender<usize> },
    Start { engine: Box<Engine> },
}

/// A handle on a running function: issue accesses, inspect its device TLB.
#[derive(Debug, Clone)]
pub struct FunctionHandle {
    config: Arc<FunctionConfig>,
    commands: mpsc::Sender<Command>,
}

impl FunctionHandle {
    pub(crate) fn new(config: Arc<FunctionConfig>, commands: mpsc::Sender<Command>) -> Self {
        Self { config, commands }
    }

    /// Requester id.
    pub fn sid(&self) -> SourceId {
        self.config.sid
    }

    /// The function's configuration.
    pub fn config(&self) -> &FunctionConfig {
        &self.config
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    pub(crate) async fn send(&self, c: Command) -> Result<(), Stopped> {
        self.commands.send(c).await.map_err(|_| Stopped)
    }

    /// Performs one access and waits for its outcome.
    pub async fn access(&self, access: Access) -> Result<AccessOutcome, AccessError> {
        access.validate()?;
        Ok(self.ask(|reply| Command::Access { access, reply }).await?)
    }

    /// Starts all `accesses` in the same turn of the function's task (so that misses on
    /// the same page and access coalesce), then waits for all their outcomes, in order.
    pub async fn access_many(&self, accesses: Vec<Access>) -> Result<Vec<AccessOutcome>, AccessError> {
        for a in &accesses {
            a.validate()?;
        }
        let (pairs, receivers): (Vec<_>, Vec<_>) = accesses
            .into_iter()
            .map(|a| {
                let (tx, rx) = oneshot::channel();
                ((a, tx), rx)
            })
            .unzip();
        self.send(Command::AccessMany { accesses: pairs }).await?;
        let mut out = Vec::with_capacity(receivers.len());
        for rx in receivers {
            out.push(rx.await.map_err(|_| Stopped)?);
        }
        Ok(out)
    }

    /// Translates `access` and holds the translation as a DMA in flight without sending
    /// the DMA: until [`HeldDma::release`], an invalidation that covers it cannot
    /// complete. Returns the outcome instead when the access fails before its DMA.
    pub async fn hold(&self, access: Access) -> Result<Result<HeldDma, AccessOutcome>, AccessError> {
        access.validate()?;
        let r = self.ask(|reply| Command::Hold { access, reply }).await?;
        Ok(r.map(|info| HeldDma { function: self.clone(), info }))
    }

    /// The function's counters and queues now.
    pub async fn snapshot(&self) -> Result<FunctionSnapshot, Stopped> {
        self.ask(|reply| Command::Snapshot { reply }).await
    }

    /// The device TLB's entries, most recently used (or inserted) first.
    pub async fn entries(&self) -> Result<Vec<AtcEntry>, Stopped> {
        self.ask(|reply| Command::Entries { reply }).await
    }

    /// Empties the device TLB; returns how many entries it held.
    pub async fn clear_cache(&self) -> Result<usize, Stopped> {
        self.ask(|reply| Command::Clear { reply }).await
    }
}

/// A DMA whose translation is in use but which has not been sent (see
/// [`FunctionHandle::hold`]).
#[derive(Debug)]
pub struct HeldDma {
    function: FunctionHandle,
    info: HeldInfo,
}

impl HeldDma {
    /// The translated address the DMA will use (`None` for an untranslated DMA).
    pub fn translated(&self) -> Option<u64> {
        self.info.translated
    }

    /// Sends the DMA and waits for its completion.
    pub async fn release(self) -> Result<AccessOutcome, Stopped> {
        let HeldInfo { op, serial, .. } = self.info;
        self.function.ask(|reply| Command::Release { op, serial, reply }).await
    }
}
