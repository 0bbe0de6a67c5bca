//! The function's task: its event loop and the life of an access.
//!
//! An access goes: device TLB lookup → hit: DMA (translated, or untranslated for a U
//! entry) → done; miss: a tagged translation request (or joining one already outstanding
//! for the same page and access: coalescing) → completion → cached (if it grants
//! anything) → DMA, or a page request when it granted nothing and PRI may help → retry.
//! Baseline accesses replace the first steps with a unary `Control.Translate` call.
//!
//! Invalidations drop the covered entries at once, mark outstanding translation requests
//! for covered pages stale (their completions may predate the invalidation: they are
//! discarded and asked again), and complete when the DMAs that used a covered
//! translation have completed (`invalidation`). The loop keeps serving the link and the
//! workload meanwhile; nothing here ever waits on anything but its inbox.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::{
    AccessKind, CompletionStatus, DmaCompletion, DmaRequest, InvalidationCompletion, InvalidationRequest,
    PageGroupResponse, PageRequest, PageResponseCode, TranslateRequest, TranslateResponse, TranslationCompletion,
    TranslationRequest,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

use super::invalidation::{ITAGS, Invalidations, itags};
use super::ops::{Op, OpId, Ops, Origin, Stage, Target};
use super::pri::Pri;
use super::{
    Access, AccessOutcome, AccessResult, Command, Fault, FunctionDown, FunctionSnapshot, HeldInfo, Inbound, Mode,
    PageRequestFailure,
};
use crate::atc::{Atc, AtcEntry, Inserted, InvalidationRange, Lookup, Perms};
use crate::config::FunctionConfig;
use crate::counters::Counters;
use crate::fasthash::FastMap;
use crate::link::{LinkTx, UpKind};
use crate::metrics::AgentMetrics;
use crate::workload::engine::{Engine, Next};

/// How often counters are flushed to metrics and progress, and page requests timed out.
const TICK: Duration = Duration::from_millis(100);
/// Workload accesses started per turn of the loop before the inbox is looked at again.
const BUDGET: u32 = 512;
/// Bytes a DMA write carries.
const WRITE_PATTERN: u8 = 0x5a;

/// A miss's coalescing key: the 4 KiB page and the access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MissKey {
    pub(crate) page: u64,
    pub(crate) write: bool,
}

impl std::hash::Hash for MissKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64((self.page << 1) | u64::from(self.write));
    }
}

/// One Prometheus sample of translation latency per this many misses (the run's
/// HdrHistograms record every miss).
const MISS_SAMPLE: u32 = 16;
/// Spare waiter lists kept for reuse.
const SPARE_LISTS: usize = 64;

/// An outstanding translation request and the accesses waiting for it.
#[derive(Debug)]
struct Miss {
    waiters: Vec<OpId>,
    /// An invalidation covered the page after the request was sent.
    stale: bool,
}

/// What a tag answers.
#[derive(Debug, Clone, Copy)]
enum TagUse {
    Translation(MissKey),
    Dma(OpId),
}

/// When the loop should come back to the workload.
#[derive(Debug, Clone, Copy)]
enum Wake {
    Now,
    At(Instant),
    Idle,
}

async fn wait(w: Wake) {
    match w {
        Wake::Now => tokio::task::yield_now().await,
        Wake::At(t) => tokio::time::sleep_until(t.into()).await,
        Wake::Idle => std::future::pending().await,
    }
}

/// What a function task is built from.
#[derive(Debug)]
pub(crate) struct TaskParts {
    pub(crate) config: Arc<FunctionConfig>,
    pub(crate) link: LinkTx,
    pub(crate) control: ControlClient<Channel>,
    pub(crate) inbox: mpsc::UnboundedSender<Inbound>,
    pub(crate) tasks: TaskTracker,
    pub(crate) metrics: AgentMetrics,
    pub(crate) page_request_timeout: Duration,
}

/// The state of one function, owned by its task.
#[derive(Debug)]
pub(crate) struct FunctionTask {
    cfg: Arc<FunctionConfig>,
    sid: u32,
    atc: Atc,
    link: LinkTx,
    generation: Option<u64>,
    control: ControlClient<Channel>,
    inbox: mpsc::UnboundedSender<Inbound>,
    tasks: TaskTracker,
    metrics: AgentMetrics,
    page_request_timeout: Duration,
    next_tag: u64,
    next_serial: u64,
    ops: Ops,
    misses: FastMap<MissKey, Miss>,
    tags: FastMap<u64, TagUse>,
    /// Requests queued this turn, sent as one batch before the loop waits again.
    outbox: Vec<UpKind>,
    /// Emptied waiter lists, reused so a miss allocates nothing.
    spare: Vec<Vec<OpId>>,
    miss_samples: u32,
    invalidations: Invalidations,
    pri: Pri,
    counters: Counters,
    flushed: Counters,
    flushed_entries: usize,
    engine: Option<Box<Engine>>,
    /// Stops the baseline calls in flight with the function.
    shutdown: CancellationToken,
}

impl FunctionTask {
    pub(crate) fn new(p: TaskParts) -> Self {
        let cfg = p.config;
        // Validated by the agent's configuration.
        let atc = Atc::new(cfg.atc_capacity, cfg.eviction, u64::from(cfg.sid.0) ^ 0x5851_f42d_4c95_7f2d)
            .unwrap_or_else(|_| unreachable!("capacity validated"));
        Self {
            sid: u32::from(cfg.sid.0),
            cfg,
            atc,
            link: p.link,
            generation: None,
            control: p.control,
            inbox: p.inbox,
            tasks: p.tasks,
            metrics: p.metrics,
            page_request_timeout: p.page_request_timeout,
            next_tag: 0,
            next_serial: 0,
            ops: Ops::default(),
            misses: FastMap::default(),
            tags: FastMap::default(),
            outbox: Vec::new(),
            spare: Vec::new(),
            miss_samples: 0,
            invalidations: Invalidations::default(),
            pri: Pri::default(),
            counters: Counters::default(),
            flushed: Counters::default(),
            flushed_entries: 0,
            engine: None,
            shutdown: CancellationToken::new(),
        }
    }

    /// Runs until `shutdown`.
    pub(crate) async fn run(
        mut self,
        mut inbound: mpsc::UnboundedReceiver<Inbound>,
        mut commands: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
    ) {
        self.shutdown = shutdown.clone();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self.pump();
            self.flush_outbox();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(ev) = inbound.recv() => {
                    self.on_inbound(ev);
                    // One wake-up per burst.
                    for _ in 0..64 {
                        match inbound.try_recv() {
                            Ok(ev) => self.on_inbound(ev),
                            Err(_) => break,
                        }
                    }
                }
                Some(cmd) = commands.recv() => self.on_command(cmd),
                _ = tick.tick() => self.on_tick(Instant::now()),
                () = wait(wake), if !matches!(wake, Wake::Idle) => {}
            }
        }
        self.stop();
    }

    // ---- the workload ------------------------------------------------------------------

    /// Starts the workload's due accesses; says when to come back.
    fn pump(&mut self) -> Wake {
        let Some(engine) = self.engine.as_mut() else { return Wake::Idle };
        let now = Instant::now();
        if engine.advance(now, &self.counters, self.atc.len()) {
            self.engine = None;
            return Wake::Idle;
        }
        if !engine.issuing() {
            return Wake::At(engine.deadline());
        }
        let needs_link = !(engine.mode == Mode::Baseline && engine.translate_only);
        if needs_link && self.generation.is_none() {
            // Paused until the link is back (its event wakes the loop).
            return Wake::At(engine.deadline());
        }
        // The fast path: closed-loop, translate-only ATS hits finish right here.
        let fast = engine.mode == Mode::Ats && engine.translate_only && engine.closed_loop() && self.cfg.ats;
        let recording = engine.recording();
        let mut started = 0u32;
        let mut sync_hits = 0u64;
        let wake = loop {
            let Some(engine) = self.engine.as_mut() else { break Wake::Idle };
            match engine.next(now) {
                Next::Issue { iova, write, intended } => {
                    started += 1;
                    if fast && let Lookup::Hit { .. } = self.atc.lookup(iova, write) {
                        self.counters.atc_hits += 1;
                        self.counters.accesses += 1;
                        sync_hits += 1;
                    } else {
                        self.begin_workload(iova, write, intended);
                    }
                    if started >= BUDGET {
                        break Wake::Now;
                    }
                }
                Next::Wait => break Wake::At(engine.deadline()),
                Next::SleepUntil(t) => break Wake::At(t.min(engine.deadline())),
            }
        };
        if sync_hits > 0
            && recording
            && let Some(engine) = self.engine.as_mut()
        {
            // Hits that finish synchronously are timed as a batch: a clock read per hit
            // would cost more than the hit.
            let per = (now.elapsed().as_nanos() as u64 / u64::from(started)).max(1);
            let _ = engine.access.record_n(per, sync_hits);
        }
        wake
    }

    fn begin_workload(&mut self, iova: u64, write: bool, intended: Option<Instant>) {
        let Some(engine) = self.engine.as_mut() else { return };
        engine.in_flight += 1;
        let op = Op::new(
            self.next_serial,
            iova,
            write,
            engine.dma_bytes,
            engine.mode,
            engine.translate_only,
            intended.unwrap_or_else(Instant::now),
            Origin::Workload { run: engine.run.id },
        );
        self.next_serial += 1;
        let id = self.ops.insert(op);
        self.begin(id);
    }

    fn start_engine(&mut self, engine: Box<Engine>) {
        if let Some(mut old) = self.engine.take() {
            old.abort(Instant::now(), &self.counters, self.atc.len());
        }
        self.engine = Some(engine);
    }

    // ---- the life of an access -----------------------------------------------------------

    fn access(&mut self, access: Access, origin: Origin) {
        let op = Op::new(
            self.next_serial,
            access.iova,
            access.write,
            access.len,
            access.mode,
            access.translate_only,
            Instant::now(),
            origin,
        );
        self.next_serial += 1;
        let id = self.ops.insert(op);
        self.begin(id);
    }

    fn begin(&mut self, id: OpId) {
        let Some(op) = self.ops.get(id) else { return };
        match op.mode {
            Mode::Baseline => self.baseline(id),
            Mode::Ats if !self.cfg.ats => self.dispatch(id, Target::Untranslated, 0),
            Mode::Ats => self.lookup(id, true),
        }
    }

    /// Looks the access up; `count` is false for retries (the access was counted once).
    fn lookup(&mut self, id: OpId, count: bool) {
        let Some(op) = self.ops.get_mut(id) else { return };
        match self.atc.lookup(op.iova, op.write) {
            Lookup::Hit { hpa, size_shift } => {
                if count {
                    self.counters.atc_hits += 1;
                    op.atc_hit = true;
                }
                self.dispatch(id, Target::Translated(hpa), size_shift);
            }
            Lookup::Untranslated => {
                if count {
                    self.counters.atc_hits += 1;
                    op.atc_hit = true;
                }
                self.dispatch(id, Target::Untranslated, 0);
            }
            Lookup::NoPermission | Lookup::Miss => {
                if count {
                    self.counters.atc_misses += 1;
                }
                self.miss(id);
            }
        }
    }

    fn miss(&mut self, id: OpId) {
        let Some(op) = self.ops.get_mut(id) else { return };
        op.stage = Stage::Translation;
        let key = MissKey { page: op.iova >> 12, write: op.write };
        if let Some(m) = self.misses.get_mut(&key) {
            m.waiters.push(id);
            op.coalesced = true;
            self.counters.coalesced_misses += 1;
            return;
        }
        let mut waiters = self.spare.pop().unwrap_or_default();
        waiters.push(id);
        self.request_translation(key, waiters);
    }

    /// Returns an emptied waiter list for reuse.
    fn recycle(&mut self, mut list: Vec<OpId>) {
        if self.spare.len() < SPARE_LISTS && list.capacity() <= 64 {
            list.clear();
            self.spare.push(list);
        }
    }

    /// Sends what this turn queued, as one batch.
    fn flush_outbox(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        match self.generation {
            Some(generation) => {
                let items = std::mem::take(&mut self.outbox);
                if !self.link.send(generation, items) {
                    tracing::debug!("link task gone; requests dropped");
                }
            }
            None => self.outbox.clear(),
        }
    }

    fn next_tag(&mut self) -> u64 {
        self.next_tag = self.next_tag.wrapping_add(1);
        // Unique per link: the requester id in the top bits.
        (u64::from(self.sid) << 48) | (self.next_tag & ((1 << 48) - 1))
    }

    fn request_translation(&mut self, key: MissKey, waiters: Vec<OpId>) {
        if self.generation.is_none() {
            return self.fail_all(waiters, AccessResult::LinkDown);
        }
        let tag = self.next_tag();
        let req = TranslationRequest { tag, source_id: self.sid, address: key.page << 12, no_write: !key.write };
        self.outbox.push(UpKind::Translation(req));
        self.counters.translations_requested += 1;
        self.tags.insert(tag, TagUse::Translation(key));
        self.misses.insert(key, Miss { waiters, stale: false });
    }

    /// The access has its translation (or knows it must go untranslated).
    fn dispatch(&mut self, id: OpId, target: Target, size_shift: u8) {
        let Some(op) = self.ops.get_mut(id) else { return };
        op.target = Some(target);
        op.size_shift = size_shift;
        if op.translate_only {
            return self.finish(id, AccessResult::Ok);
        }
        if let Origin::Hold(_) = op.origin {
            let Origin::Hold(reply) = std::mem::replace(&mut op.origin, Origin::Held { release: None }) else {
                return;
            };
            op.stage = Stage::Held;
            let translated = match target {
                Target::Translated(hpa) => Some(hpa),
                Target::Untranslated => None,
            };
            let _ = reply.send(Ok(HeldInfo { op: id, serial: op.serial, translated }));
            return;
        }
        self.send_dma(id);
    }

    fn send_dma(&mut self, id: OpId) {
        if self.generation.is_none() {
            return self.finish(id, AccessResult::LinkDown);
        }
        let tag = self.next_tag();
        let Some(op) = self.ops.get_mut(id) else { return };
        let (translated, address) = match op.target {
            Some(Target::Translated(hpa)) => (true, hpa),
            _ => (false, op.iova),
        };
        let req = DmaRequest {
            tag,
            source_id: self.sid,
            translated,
            address,
            write: op.write,
            length: if op.write { 0 } else { op.len },
            data: if op.write { vec![WRITE_PATTERN; op.len as usize] } else { Vec::new() },
        };
        op.stage = Stage::Dma;
        if !translated {
            self.counters.untranslated_dma += 1;
        }
        self.outbox.push(UpKind::Dma(req));
        self.tags.insert(tag, TagUse::Dma(id));
    }

    /// The translation granted nothing usable for the access.
    fn no_access(&mut self, id: OpId) {
        let Some(op) = self.ops.get(id) else { return };
        if self.cfg.pri() && !self.pri.stopped && !op.pri_done {
            self.page_request(id);
        } else {
            self.finish(id, AccessResult::Fault(Fault::NoAccess));
        }
    }

    fn page_request(&mut self, id: OpId) {
        let Some(op) = self.ops.get_mut(id) else { return };
        op.stage = Stage::PageRequest;
        op.page_requested = true;
        let key = MissKey { page: op.iova >> 12, write: op.write };
        if self.pri.join(key, id) {
            return;
        }
        if self.pri.outstanding() >= usize::from(self.cfg.page_request_capacity) {
            self.pri.backlog.push_back(id);
            return;
        }
        if self.generation.is_none() {
            return self.finish(id, AccessResult::LinkDown);
        }
        let prgi = self.pri.open(key, id, Instant::now() + self.page_request_timeout);
        let req = PageRequest {
            source_id: self.sid,
            address: key.page << 12,
            read: true,
            write: key.write,
            group_index: u32::from(prgi),
            last: true,
        };
        self.counters.page_requests += 1;
        self.outbox.push(UpKind::Page(req));
    }

    fn drain_pri_backlog(&mut self) {
        while self.pri.outstanding() < usize::from(self.cfg.page_request_capacity) {
            let Some(id) = self.pri.backlog.pop_front() else { break };
            if self.pri.stopped {
                self.finish(id, AccessResult::Fault(Fault::NoAccess));
            } else {
                self.page_request(id);
            }
        }
        if self.pri.stopped {
            let rest: Vec<OpId> = self.pri.backlog.drain(..).collect();
            self.fail_all(rest, AccessResult::Fault(Fault::NoAccess));
        }
    }

    fn fail_all(&mut self, ids: Vec<OpId>, result: AccessResult) {
        for &id in &ids {
            self.finish(id, result);
        }
        self.recycle(ids);
    }

    /// Ends an access: counts it, records its latency, answers whoever asked.
    fn finish(&mut self, id: OpId, result: AccessResult) {
        let Some(op) = self.ops.remove(id) else { return };
        if op.blocks != 0 {
            self.release_invalidations(op.blocks);
        }
        self.counters.accesses += 1;
        match result {
            AccessResult::Fault(_) => self.counters.faults += 1,
            AccessResult::LinkDown => self.counters.aborted += 1,
            AccessResult::Ok | AccessResult::DmaFailed { .. } => {}
        }
        let latency = op.start.elapsed();
        let translated = match op.target {
            Some(Target::Translated(hpa)) => Some(hpa),
            _ => None,
        };
        let outcome = AccessOutcome {
            result,
            atc_hit: op.atc_hit,
            coalesced: op.coalesced,
            page_requested: op.page_requested,
            untranslated: op.target == Some(Target::Untranslated),
            translated,
            size_shift: op.size_shift,
            latency,
        };
        match op.origin {
            Origin::Workload { run } => {
                if let Some(e) = self.engine.as_mut()
                    && e.run.id == run
                {
                    e.in_flight = e.in_flight.saturating_sub(1);
                    if e.recording() {
                        let _ = e.access.record((latency.as_nanos() as u64).max(1));
                    }
                }
            }
            Origin::Api(tx) => {
                let _ = tx.send(outcome);
            }
            Origin::Hold(tx) => {
                let _ = tx.send(Err(outcome));
            }
            Origin::Held { release: Some(tx) } => {
                let _ = tx.send(outcome);
            }
            Origin::Held { release: None } => {}
        }
    }

    fn record_miss(&mut self, id: OpId, now: Instant) {
        let Some(op) = self.ops.get(id) else { return };
        let d = now.saturating_duration_since(op.start);
        self.miss_samples = self.miss_samples.wrapping_add(1);
        if self.miss_samples.is_multiple_of(MISS_SAMPLE) {
            self.metrics.translation_duration.record(d.as_secs_f64());
        }
        if let Origin::Workload { run } = op.origin
            && let Some(e) = self.engine.as_mut()
            && e.run.id == run
            && e.recording()
        {
            let _ = e.miss.record((d.as_nanos() as u64).max(1));
        }
    }

    fn baseline(&mut self, id: OpId) {
        let Some(op) = self.ops.get_mut(id) else { return };
        op.stage = Stage::Baseline;
        self.counters.baseline_calls += 1;
        let access = if op.write { AccessKind::Write } else { AccessKind::Read };
        let req = TranslateRequest { source_id: self.sid, iova: op.iova, access: access as i32 };
        let serial = op.serial;
        let mut client = self.control.clone();
        let inbox = self.inbox.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                result = client.translate(req) => {
                    let result = result.map(tonic::Response::into_inner);
                    let _ = inbox.send(Inbound::Baseline { op: id, serial, result });
                }
                () = shutdown.cancelled() => {}
            }
        });
    }

    // ---- what the link brings ------------------------------------------------------------

    fn on_inbound(&mut self, ev: Inbound) {
        match ev {
            Inbound::Down(d) => self.on_down(d),
            Inbound::LinkUp { generation } => {
                self.generation = Some(generation);
                // Every connection starts with an empty device TLB.
                self.atc.clear();
                self.pri.clear();
            }
            Inbound::LinkDown { generation } => self.on_link_down(generation),
            Inbound::Baseline { op, serial, result } => self.on_baseline(op, serial, result),
        }
    }

    fn on_down(&mut self, d: FunctionDown) {
        let now = Instant::now();
        // Invalidations first: a completion in the same batch may predate them.
        for i in d.invalidations {
            self.on_invalidation(i, now);
        }
        for c in d.completions {
            self.on_completion(c, now);
        }
        for c in d.dma {
            self.on_dma(c);
        }
        for r in d.page_responses {
            self.on_page_response(r);
        }
    }

    fn on_completion(&mut self, c: TranslationCompletion, now: Instant) {
        let key = match self.tags.get(&c.tag) {
            Some(TagUse::Translation(k)) => *k,
            _ => {
                tracing::debug!(tag = c.tag, "completion for no outstanding translation request");
                return;
            }
        };
        self.tags.remove(&c.tag);
        let Some(miss) = self.misses.remove(&key) else { return };
        if miss.stale {
            // The completion may carry a translation the invalidation removed.
            self.counters.stale_completions += 1;
            return self.request_translation(key, miss.waiters);
        }
        match CompletionStatus::try_from(c.status) {
            Ok(CompletionStatus::Success) => {
                let e = c.entry.unwrap_or_default();
                let perms = Perms::new(e.read, e.write, e.untranslated_only);
                if !perms.any() {
                    for &w in &miss.waiters {
                        self.record_miss(w, now);
                        self.no_access(w);
                    }
                    return self.recycle(miss.waiters);
                }
                match AtcEntry::from_completion(key.page << 12, e.translated_address, e.size_shift, perms) {
                    Ok(entry) => {
                        if u32::from(entry.size_shift) < 12 + u32::from(self.cfg.smallest_translation_unit) {
                            self.counters.stu_violations += 1;
                        } else if let Inserted::Evicted(_) = self.atc.insert(entry) {
                            self.counters.evictions += 1;
                        }
                        for &w in &miss.waiters {
                            self.record_miss(w, now);
                            self.resolve(w, &entry);
                        }
                        self.recycle(miss.waiters);
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "malformed translation completion");
                        self.counters.translation_errors += 1;
                        self.fail_all(miss.waiters, AccessResult::Fault(Fault::Malformed));
                    }
                }
            }
            Ok(CompletionStatus::UnsupportedRequest) => {
                self.counters.translation_errors += 1;
                self.fail_all(miss.waiters, AccessResult::Fault(Fault::UnsupportedRequest));
            }
            Ok(CompletionStatus::CompleterAbort) | Err(_) => {
                self.counters.translation_errors += 1;
                self.fail_all(miss.waiters, AccessResult::Fault(Fault::CompleterAbort));
            }
        }
    }

    /// Applies a fresh completion to one waiting access.
    fn resolve(&mut self, id: OpId, entry: &AtcEntry) {
        let Some(op) = self.ops.get(id) else { return };
        if !entry.perms.allows(op.write) {
            self.no_access(id);
        } else if entry.perms.untranslated_only() {
            self.dispatch(id, Target::Untranslated, 0);
        } else {
            let hpa = entry.translate(op.iova);
            self.dispatch(id, Target::Translated(hpa), entry.size_shift);
        }
    }

    fn on_dma(&mut self, c: DmaCompletion) {
        let id = match self.tags.get(&c.tag) {
            Some(TagUse::Dma(id)) => *id,
            _ => {
                tracing::debug!(tag = c.tag, "DMA completion for no outstanding DMA");
                return;
            }
        };
        self.tags.remove(&c.tag);
        if c.ok {
            self.counters.dma_ok += 1;
            self.finish(id, AccessResult::Ok);
        } else {
            self.counters.dma_failed += 1;
            self.finish(id, AccessResult::DmaFailed { fault_reason: c.fault_reason });
        }
    }

    fn on_invalidation(&mut self, req: InvalidationRequest, now: Instant) {
        let range = InvalidationRange::decode(req.address, self.cfg.smallest_translation_unit);
        self.counters.invalidated_entries += self.atc.invalidate(range) as u64;
        for (key, miss) in &mut self.misses {
            if range.overlaps(key.page << 12, 4096) {
                miss.stale = true;
            }
        }
        let itag = req.itag as usize;
        if itag >= ITAGS {
            tracing::warn!(itag, "invalidation with an ITag above 31; completed without draining");
            return self.send_completions(req.itag, 1, now, now);
        }
        let bit = 1u32 << itag;
        let mut waiting = 0;
        for (_, op) in self.ops.iter_mut() {
            if op.uses_translation() && op.blocks & bit == 0 && range.overlaps(op.iova, u64::from(op.len)) {
                op.blocks |= bit;
                waiting += 1;
            }
        }
        if self.invalidations.arrive(itag, waiting, now) {
            self.complete_invalidation(itag);
        }
    }

    fn release_invalidations(&mut self, blocks: u32) {
        for itag in itags(blocks) {
            if self.invalidations.release(itag) {
                self.complete_invalidation(itag);
            }
        }
    }

    fn complete_invalidation(&mut self, itag: usize) {
        if let Some(p) = self.invalidations.take(itag) {
            self.send_completions(itag as u32, p.requests, p.received, Instant::now());
        }
    }

    fn send_completions(&mut self, itag: u32, requests: u32, received: Instant, now: Instant) {
        if let Some(generation) = self.generation {
            for _ in 0..requests {
                self.link.complete(generation, InvalidationCompletion { source_id: self.sid, itag });
            }
        }
        self.counters.invalidations_handled += u64::from(requests);
        let d = now.saturating_duration_since(received);
        self.metrics.invalidation_duration.record(d.as_secs_f64());
        if let Some(e) = self.engine.as_mut()
            && e.recording()
        {
            let _ = e.invalidation.record((d.as_nanos() as u64).max(1));
        }
    }

    fn on_page_response(&mut self, r: PageGroupResponse) {
        let Some(group) = self.pri.answer(r.group_index) else {
            tracing::debug!(prgi = r.group_index, "page group response for no outstanding group");
            return;
        };
        match PageResponseCode::try_from(r.code) {
            Ok(PageResponseCode::Success) => {
                for id in group.waiters {
                    let Some(op) = self.ops.get_mut(id) else { continue };
                    op.pri_done = true;
                    self.lookup(id, false);
                }
            }
            code => {
                self.counters.page_request_failures += 1;
                let failure = match code {
                    Ok(PageResponseCode::Invalid) => PageRequestFailure::Invalid,
                    Ok(PageResponseCode::Failure) => {
                        self.pri.stopped = true;
                        tracing::warn!(sid = %self.cfg.sid, "page request response failure: PRI stopped until the link resets");
                        PageRequestFailure::Failure
                    }
                    _ => PageRequestFailure::Other(r.code),
                };
                self.fail_all(group.waiters, AccessResult::Fault(Fault::PageRequest(failure)));
            }
        }
        self.drain_pri_backlog();
    }

    fn on_baseline(&mut self, id: OpId, serial: u64, result: Result<TranslateResponse, tonic::Status>) {
        match self.ops.get(id) {
            Some(op) if op.serial == serial && op.stage == Stage::Baseline => {}
            _ => return,
        }
        self.record_miss(id, Instant::now());
        match result {
            Ok(r) if r.ok => {
                if self.cfg.ats {
                    self.dispatch(id, Target::Translated(r.hpa), r.page_shift.min(63) as u8);
                } else {
                    self.dispatch(id, Target::Untranslated, 0);
                }
            }
            Ok(r) => self.finish(id, AccessResult::Fault(Fault::Refused { fault_reason: r.fault_reason })),
            Err(s) => {
                tracing::debug!(error = %s.message(), "baseline translation call failed");
                self.finish(id, AccessResult::LinkDown);
            }
        }
    }

    fn on_link_down(&mut self, generation: u64) {
        if self.generation.is_some_and(|g| g != generation) {
            return;
        }
        self.generation = None;
        self.outbox.clear();
        self.atc.clear();
        self.misses.clear();
        self.tags.clear();
        // The server completes the outstanding invalidations of an unbound function.
        self.invalidations.clear();
        self.pri.clear();
        let lost: Vec<OpId> = self.ops.iter().filter(|(_, op)| op.stage != Stage::Baseline).map(|(id, _)| id).collect();
        for id in lost {
            if let Some(op) = self.ops.get_mut(id) {
                op.blocks = 0;
            }
            self.finish(id, AccessResult::LinkDown);
        }
    }

    // ---- handles and time ----------------------------------------------------------------

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Access { access, reply } => self.access(access, Origin::Api(reply)),
            Command::AccessMany { accesses } => {
                for (access, reply) in accesses {
                    self.access(access, Origin::Api(reply));
                }
            }
            Command::Hold { access, reply } => self.access(access, Origin::Hold(reply)),
            Command::Release { op, serial, reply } => match self.ops.get_mut(op) {
                Some(o) if o.serial == serial && o.stage == Stage::Held => {
                    o.origin = Origin::Held { release: Some(reply) };
                    self.send_dma(op);
                }
                _ => {
                    let _ = reply.send(AccessOutcome {
                        result: AccessResult::LinkDown,
                        atc_hit: false,
                        coalesced: false,
                        page_requested: false,
                        untranslated: false,
                        translated: None,
                        size_shift: 0,
                        latency: Duration::ZERO,
                    });
                }
            },
            Command::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Command::Entries { reply } => {
                let _ = reply.send(self.atc.entries());
            }
            Command::Clear { reply } => {
                let _ = reply.send(self.atc.clear());
            }
            Command::Start { engine } => self.start_engine(engine),
        }
    }

    fn snapshot(&self) -> FunctionSnapshot {
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

    fn on_tick(&mut self, now: Instant) {
        for group in self.pri.expired(now) {
            self.counters.page_request_failures += 1;
            self.fail_all(group.waiters, AccessResult::Fault(Fault::PageRequest(PageRequestFailure::Timeout)));
        }
        self.drain_pri_backlog();
        self.flush_metrics();
        if let Some(e) = self.engine.as_ref() {
            e.publish(&self.counters);
        }
    }

    fn flush_metrics(&mut self) {
        let delta = self.counters.since(&self.flushed);
        self.metrics.flush(&delta);
        self.flushed = self.counters;
        let entries = self.atc.len();
        if entries != self.flushed_entries {
            self.metrics.atc_entries.increment(entries as f64 - self.flushed_entries as f64);
            self.flushed_entries = entries;
        }
    }

    /// Shutdown: every access still waiting is answered, the run (if any) reports.
    fn stop(&mut self) {
        let ids: Vec<OpId> = self.ops.iter().map(|(id, _)| id).collect();
        for id in ids {
            if let Some(op) = self.ops.get_mut(id) {
                op.blocks = 0;
            }
            self.finish(id, AccessResult::LinkDown);
        }
        if let Some(mut e) = self.engine.take() {
            e.abort(Instant::now(), &self.counters, self.atc.len());
        }
        self.atc.clear();
        self.flush_metrics();
    }
}

#[cfg(test)]
mod tests;
