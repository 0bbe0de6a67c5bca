//! One function as a sans-IO state machine: everything a function decides, nothing it
//! waits for.
//!
//! The machine owns the function's state (its device TLB, the accesses in progress, the
//! outstanding translation requests and their coalescing table, the pending invalidations,
//! the page request groups, the counters) and changes it only when an input comes in:
//! an access to start ([`Machine::start`]), a release of a held DMA, what the server sent
//! ([`Machine::receive`]), a baseline answer, the link coming up or going down, or time
//! passing ([`Machine::tick`]). Every input carries the time; the machine never reads a
//! clock. What it wants done comes out as [`Effect`]s, in order, through
//! [`Machine::poll_effect`]: requests for the link, invalidation completions for its
//! priority path, unary baseline calls, outcomes for whoever asked, and the timings the
//! metrics and the running workload record. Like the remapping unit's hardware model
//! (`dmar_vtd::unit`), it can be driven by hand: its tests need no runtime and no network.
//!
//! Files: this one (inputs, outputs, the end of an access), `access` (hits, misses,
//! coalescing, completions, DMA, the baseline paths), `invalidation` (drain-before-ack),
//! `pri` (page requests). Not here: channels, tasks, the wire format, the workload's
//! pacing (`task`, `wire`, `workload`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::handle::HeldInfo;
use super::invalidation::Invalidations;
use super::messages::{
    BaselineAnswer, DmaCompletion, InvalidationRequest, PageGroupResponse, TranslationCompletion, Up,
};
use super::ops::{AccessKey, Op, OpId, Ops, Owner, Stage, Target};
use super::pri::Pri;
use super::{Dma, DmaOutcome, DmaResult, FunctionSnapshot};
use crate::atc::{Atc, AtcEntry, Lookup};
use crate::config::FunctionConfig;
use crate::counters::Counters;
use crate::fasthash::FastMap;

/// A miss's coalescing key: the 4 KiB page and the access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MissKey {
    pub(super) page: u64,
    pub(super) write: bool,
}

impl std::hash::Hash for MissKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64((self.page << 1) | u64::from(self.write));
    }
}

/// An outstanding translation request and the accesses waiting for it.
#[derive(Debug)]
pub(super) struct Miss {
    pub(super) waiters: Vec<OpId>,
    /// An invalidation covered the page after the request was sent.
    pub(super) stale: bool,
}

/// What a tag answers.
#[derive(Debug, Clone, Copy)]
pub(super) enum TagUse {
    Translation(MissKey),
    /// The translation request of one link-baseline access (no device TLB, no coalescing).
    Direct(Direct),
    Dma(OpId),
}

/// A link-baseline access's outstanding translation request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Direct {
    pub(super) key: AccessKey,
    pub(super) page: u64,
    pub(super) write: bool,
    /// An invalidation covered the page after the request was sent.
    pub(super) stale: bool,
}

/// Who gets an access's outcome.
#[derive(Debug)]
pub(crate) enum By<T> {
    /// The workload run `run` (its engine counts the access and records its latency).
    Workload { run: u64 },
    /// The caller that started (or released) it.
    Caller(T),
}

/// What the machine wants done, in the order it must happen.
#[derive(Debug)]
pub(crate) enum Effect<T> {
    /// Queue a request for the server; a turn's requests go out as one link message.
    Send(Up),
    /// Send an invalidation completion for `itag` now, on the link's priority path
    /// (invalidations never wait behind translation traffic).
    Complete { itag: u32 },
    /// Make the unary translation call of a baseline access; answer with
    /// [`Machine::baseline_answer`].
    Baseline { key: AccessKey, iova: u64, write: bool },
    /// A hold's translation is known: answer its caller. The DMA waits for
    /// [`Machine::release`].
    Held { caller: T, held: HeldInfo },
    /// An access ended.
    Finished { by: By<T>, outcome: DmaOutcome },
    /// A miss got its translation `latency` after the access started (a workload run's
    /// access when `run` is set).
    Translated { run: Option<u64>, latency: Duration },
    /// An invalidation completed, `after` its (first) request arrived.
    Invalidated { after: Duration },
}

/// Spare waiter lists kept for reuse.
const SPARE_LISTS: usize = 64;

/// The state of one function. `T` is the token of whoever waits for an access (the task's
/// reply channel).
#[derive(Debug)]
pub(crate) struct Machine<T> {
    pub(super) cfg: Arc<FunctionConfig>,
    pub(super) sid: u32,
    pub(super) atc: Atc,
    /// The connection in use; `None` while the link is down.
    pub(super) generation: Option<u64>,
    pub(super) page_request_timeout: Duration,
    /// The time of the input being handled.
    pub(super) now: Instant,
    pub(super) next_tag: u64,
    pub(super) next_serial: u64,
    pub(super) ops: Ops<T>,
    pub(super) misses: FastMap<MissKey, Miss>,
    pub(super) tags: FastMap<u64, TagUse>,
    /// Emptied waiter lists, reused so a miss allocates nothing.
    pub(super) spare: Vec<Vec<OpId>>,
    pub(super) invalidations: Invalidations,
    pub(super) pri: Pri,
    pub(super) counters: Counters,
    pub(super) effects: VecDeque<Effect<T>>,
}

impl<T> Machine<T> {
    /// A function with an empty device TLB and no link yet.
    pub(crate) fn new(cfg: Arc<FunctionConfig>, page_request_timeout: Duration, now: Instant) -> Self {
        // Validated by the agent's configuration.
        let atc = Atc::new(cfg.atc_capacity, cfg.eviction, u64::from(cfg.sid.0) ^ 0x5851_f42d_4c95_7f2d)
            .unwrap_or_else(|_| unreachable!("capacity validated"));
        Self {
            sid: u32::from(cfg.sid.0),
            cfg,
            atc,
            generation: None,
            page_request_timeout,
            now,
            next_tag: 0,
            next_serial: 0,
            ops: Ops::default(),
            misses: FastMap::default(),
            tags: FastMap::default(),
            spare: Vec::new(),
            invalidations: Invalidations::default(),
            pri: Pri::default(),
            counters: Counters::default(),
            effects: VecDeque::new(),
        }
    }

    /// The next thing to do, if any.
    #[inline]
    pub(crate) fn poll_effect(&mut self) -> Option<Effect<T>> {
        self.effects.pop_front()
    }

    // ---- inputs ------------------------------------------------------------------------

    /// Starts an access for `owner`; `started` is when its latency counts from (its
    /// intended start in open loop, else `now`).
    pub(crate) fn start(&mut self, dma: Dma, owner: Owner<T>, started: Instant, now: Instant) {
        self.now = now;
        let op = Op::new(self.next_serial, dma, started, owner);
        self.next_serial += 1;
        let id = self.ops.insert(op);
        self.begin(id);
    }

    /// A translate-only ATS access that hits finishes here, with no state and no effect:
    /// the workload's fast path. False when it does not hit (nothing is counted then).
    #[inline]
    pub(crate) fn try_hit(&mut self, iova: u64, write: bool) -> bool {
        if let Lookup::Hit { .. } = self.atc.lookup(iova, write) {
            self.counters.atc_hits += 1;
            self.counters.accesses += 1;
            true
        } else {
            false
        }
    }

    /// Sends a held access's DMA; `caller` gets its outcome. A key that names no held
    /// access (the link failed it meanwhile) is answered at once with `LinkDown`.
    pub(crate) fn release(&mut self, key: AccessKey, caller: T, now: Instant) {
        self.now = now;
        match self.ops.get_mut(key.op) {
            Some(o) if o.serial == key.serial && o.stage == Stage::Held => {
                o.owner = Owner::Held(Some(caller));
                self.send_dma(key.op);
            }
            _ => {
                let outcome = DmaOutcome {
                    result: DmaResult::LinkDown,
                    atc_hit: false,
                    coalesced: false,
                    page_requested: false,
                    untranslated: false,
                    translated: None,
                    size_shift: 0,
                    latency: Duration::ZERO,
                };
                self.effects.push_back(Effect::Finished { by: By::Caller(caller), outcome });
            }
        }
    }

    /// What the server sent for this function in one link message.
    pub(crate) fn receive(
        &mut self,
        invalidations: impl IntoIterator<Item = InvalidationRequest>,
        completions: impl IntoIterator<Item = TranslationCompletion>,
        dma: impl IntoIterator<Item = DmaCompletion>,
        page_responses: impl IntoIterator<Item = PageGroupResponse>,
        now: Instant,
    ) {
        self.now = now;
        // Invalidations first: a completion in the same message may predate them.
        for i in invalidations {
            self.on_invalidation(i);
        }
        for c in completions {
            self.on_completion(c);
        }
        for c in dma {
            self.on_dma(c);
        }
        for r in page_responses {
            self.on_page_response(r);
        }
    }

    /// The answer to an [`Effect::Baseline`] call.
    pub(crate) fn baseline_answer(&mut self, key: AccessKey, answer: BaselineAnswer, now: Instant) {
        self.now = now;
        self.on_baseline(key, answer);
    }

    /// Connection `generation` is bound: every connection starts with an empty device TLB
    /// and PRI allowed.
    pub(crate) fn connected(&mut self, generation: u64) {
        self.generation = Some(generation);
        self.atc.clear();
        self.pri.clear();
    }

    /// Connection `generation` is gone: the device TLB is emptied, what waited on the link
    /// fails, and outstanding invalidations are forgotten (the server completes those of
    /// an unbound function itself). Baseline accesses do not use the link and go on.
    pub(crate) fn disconnected(&mut self, generation: u64, now: Instant) {
        self.now = now;
        if self.generation.is_some_and(|g| g != generation) {
            return;
        }
        self.generation = None;
        self.atc.clear();
        self.misses.clear();
        self.tags.clear();
        self.invalidations.clear();
        self.pri.clear();
        let lost: Vec<OpId> = self.ops.iter().filter(|(_, op)| op.stage != Stage::Baseline).map(|(id, _)| id).collect();
        for id in lost {
            if let Some(op) = self.ops.get_mut(id) {
                op.blocks = 0;
            }
            self.finish(id, DmaResult::LinkDown);
        }
    }

    /// Time passes: page request groups past their deadline fail, and the backlog moves
    /// into the freed slots.
    pub(crate) fn tick(&mut self, now: Instant) {
        self.now = now;
        self.expire_page_requests();
    }

    /// Shutdown: every access still in progress ends with `LinkDown`.
    pub(crate) fn abort_all(&mut self, now: Instant) {
        self.now = now;
        let ids: Vec<OpId> = self.ops.iter().map(|(id, _)| id).collect();
        for id in ids {
            if let Some(op) = self.ops.get_mut(id) {
                op.blocks = 0;
            }
            self.finish(id, DmaResult::LinkDown);
        }
    }

    /// Empties the device TLB; returns how many entries it held.
    pub(crate) fn clear_cache(&mut self) -> usize {
        self.atc.clear()
    }

    // ---- state -------------------------------------------------------------------------

    /// The connection in use, if the link is up.
    pub(crate) fn generation(&self) -> Option<u64> {
        self.generation
    }

    /// Counters since the function started.
    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Entries in the device TLB.
    pub(crate) fn atc_len(&self) -> usize {
        self.atc.len()
    }

    /// The device TLB's entries, most recently used (or inserted) first.
    pub(crate) fn entries(&mut self) -> Vec<AtcEntry> {
        self.atc.entries()
    }

    /// The function's state now.
    pub(crate) fn snapshot(&self) -> FunctionSnapshot {
        FunctionSnapshot {
            sid: self.cfg.sid,
            atc_entries: self.atc.len(),
            counters: self.counters,
            link_generation: self.generation,
            outstanding_translations: self.misses.len(),
            pending_invalidations: self.invalidations.len(),
            dma_in_flight: self.ops.iter().filter(|(_, op)| matches!(op.stage, Stage::Dma | Stage::Held)).count(),
            outstanding_page_requests: self.pri.outstanding(),
            accesses_in_flight: self.ops.len(),
        }
    }

    // ---- the end of an access ------------------------------------------------------------

    pub(super) fn fail_all(&mut self, ids: Vec<OpId>, result: DmaResult) {
        for &id in &ids {
            self.finish(id, result);
        }
        self.recycle(ids);
    }

    /// Ends an access: releases the invalidations that waited for it, counts it, answers
    /// whoever asked.
    pub(super) fn finish(&mut self, id: OpId, result: DmaResult) {
        let Some(op) = self.ops.remove(id) else { return };
        if op.blocks != 0 {
            self.release_invalidations(op.blocks);
        }
        self.counters.accesses += 1;
        match result {
            DmaResult::Fault(_) => self.counters.faults += 1,
            DmaResult::LinkDown => self.counters.aborted += 1,
            DmaResult::Ok | DmaResult::DmaFailed { .. } => {}
        }
        let translated = match op.target {
            Some(Target::Translated(hpa)) => Some(hpa),
            _ => None,
        };
        let outcome = DmaOutcome {
            result,
            atc_hit: op.atc_hit,
            coalesced: op.coalesced,
            page_requested: op.page_requested,
            untranslated: op.target == Some(Target::Untranslated),
            translated,
            size_shift: op.size_shift,
            latency: self.now.saturating_duration_since(op.start),
        };
        let by = match op.owner {
            Owner::Workload { run } => By::Workload { run },
            Owner::Caller(t) | Owner::Hold(t) | Owner::Held(Some(t)) => By::Caller(t),
            Owner::Held(None) => return,
        };
        self.effects.push_back(Effect::Finished { by, outcome });
    }

    /// Reports how long the access waited for its translation.
    pub(super) fn record_miss(&mut self, id: OpId) {
        let Some(op) = self.ops.get(id) else { return };
        let run = match op.owner {
            Owner::Workload { run } => Some(run),
            _ => None,
        };
        let latency = self.now.saturating_duration_since(op.start);
        self.effects.push_back(Effect::Translated { run, latency });
    }

    /// Returns an emptied waiter list for reuse.
    pub(super) fn recycle(&mut self, mut list: Vec<OpId>) {
        if self.spare.len() < SPARE_LISTS && list.capacity() <= 64 {
            list.clear();
            self.spare.push(list);
        }
    }

    /// A tag for a translation or DMA request, unique per link: the requester id in the
    /// top bits.
    pub(super) fn next_tag(&mut self) -> u64 {
        self.next_tag = self.next_tag.wrapping_add(1);
        (u64::from(self.sid) << 48) | (self.next_tag & ((1 << 48) - 1))
    }
}

#[cfg(test)]
mod tests;
