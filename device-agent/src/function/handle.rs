//! The way in to a running function: a cheap, cloneable handle that sends the function's
//! task commands and waits for its answers.
//!
//! Owns the commands a task accepts and the public handle API ([`FunctionHandle`],
//! [`HeldDma`]). What the task does with a command is `task`'s and `machine`'s.

use std::sync::Arc;

use dmar_vtd::SourceId;
use tokio::sync::{mpsc, oneshot};

use super::ops::AccessKey;
use super::{Dma, DmaOutcome, InvalidDma};
use crate::atc::AtcEntry;
use crate::config::FunctionConfig;
use crate::counters::Counters;
use crate::workload::engine::Engine;

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
    /// The DMA breaks the length rules.
    #[error(transparent)]
    Invalid(#[from] InvalidDma),
    /// The function has stopped.
    #[error(transparent)]
    Stopped(#[from] Stopped),
}

/// A translation held for a DMA that has not been sent yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeldInfo {
    pub(crate) key: AccessKey,
    pub(crate) translated: Option<u64>,
}

/// Requests from handles.
#[derive(Debug)]
pub(crate) enum Command {
    Access { dma: Dma, reply: oneshot::Sender<DmaOutcome> },
    AccessMany { dmas: Vec<(Dma, oneshot::Sender<DmaOutcome>)> },
    Hold { dma: Dma, reply: oneshot::Sender<Result<HeldInfo, DmaOutcome>> },
    Release { key: AccessKey, reply: oneshot::Sender<DmaOutcome> },
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
    pub async fn access(&self, dma: Dma) -> Result<DmaOutcome, AccessError> {
        dma.validate()?;
        Ok(self.ask(|reply| Command::Access { dma, reply }).await?)
    }

    /// Starts all `dmas` in the same turn of the function's task (so that misses on the
    /// same page and access coalesce), then waits for all their outcomes, in order.
    pub async fn access_many(&self, dmas: Vec<Dma>) -> Result<Vec<DmaOutcome>, AccessError> {
        for d in &dmas {
            d.validate()?;
        }
        let (pairs, receivers): (Vec<_>, Vec<_>) = dmas
            .into_iter()
            .map(|d| {
                let (tx, rx) = oneshot::channel();
                ((d, tx), rx)
            })
            .unzip();
        self.send(Command::AccessMany { dmas: pairs }).await?;
        let mut out = Vec::with_capacity(receivers.len());
        for rx in receivers {
            out.push(rx.await.map_err(|_| Stopped)?);
        }
        Ok(out)
    }

    /// Translates `dma` and holds the translation as a DMA in flight without sending the
    /// DMA: until [`HeldDma::release`], an invalidation that covers it cannot complete.
    /// Returns the outcome instead when the access fails before its DMA.
    pub async fn hold(&self, dma: Dma) -> Result<Result<HeldDma, DmaOutcome>, AccessError> {
        dma.validate()?;
        let r = self.ask(|reply| Command::Hold { dma, reply }).await?;
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
    pub async fn release(self) -> Result<DmaOutcome, Stopped> {
        let key = self.info.key;
        self.function.ask(|reply| Command::Release { key, reply }).await
    }
}
