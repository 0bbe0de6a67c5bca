//! The function's task: the thin shell that runs its state machine.
//!
//! Owns the I/O of one function: its inbox (link events, baseline answers) and command
//! channel, the `select!` loop, the clock, the unary baseline calls, the link's queues,
//! the metrics, and the running workload's engine (which paces accesses and records what
//! the run measures). Each turn it feeds the machine what arrived, with the time, carries
//! out the machine's effects, and hands the link the turn's requests as one batch. Every
//! decision about an access is the machine's (`machine`); nothing here waits on anything
//! but its inbox, its commands and its timers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmar_proto::v1::control_client::ControlClient;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

use super::handle::{Command, HeldInfo};
use super::machine::{By, Effect, Machine};
use super::messages::BaselineAnswer;
use super::ops::{AccessKey, Owner};
use super::{Dma, DmaOutcome, Mode};
use crate::config::FunctionConfig;
use crate::counters::Counters;
use crate::link::{FunctionDown, LinkTx, UpKind};
use crate::metrics::AgentMetrics;
use crate::wire;
use crate::workload::engine::{Engine, Next};

/// How often counters are flushed to metrics and progress, and page requests timed out.
const TICK: Duration = Duration::from_millis(100);
/// Workload accesses started per turn of the loop before the inbox is looked at again.
const BUDGET: u32 = 512;
/// One Prometheus sample of translation latency per this many misses (the run's
/// HdrHistograms record every miss).
const MISS_SAMPLE: u32 = 16;

/// Events from the link (and from the function's own baseline calls).
#[derive(Debug)]
pub(crate) enum Inbound {
    /// Connection `generation` is bound: start with an empty device TLB.
    Connected { generation: u64 },
    /// Connection `generation` is gone: everything that waited on it is abandoned.
    Disconnected { generation: u64 },
    /// Traffic from the server.
    Down(FunctionDown),
    /// A baseline unary translation finished.
    Baseline { key: AccessKey, answer: BaselineAnswer },
}

/// Whoever waits for an access of this task: the machine's caller token.
#[derive(Debug)]
pub(crate) enum Reply {
    /// An access or a release: the outcome.
    Outcome(oneshot::Sender<DmaOutcome>),
    /// A hold: the held translation, or the outcome if the access failed before its DMA.
    Hold(oneshot::Sender<Result<HeldInfo, DmaOutcome>>),
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

/// One function's task: its machine and the I/O around it.
#[derive(Debug)]
pub(crate) struct FunctionTask {
    machine: Machine<Reply>,
    cfg: Arc<FunctionConfig>,
    sid: u32,
    link: LinkTx,
    control: ControlClient<Channel>,
    inbox: mpsc::UnboundedSender<Inbound>,
    tasks: TaskTracker,
    metrics: AgentMetrics,
    /// Requests the machine queued this turn, sent as one batch before the loop waits.
    outbox: Vec<UpKind>,
    miss_samples: u32,
    flushed: Counters,
    flushed_entries: usize,
    engine: Option<Box<Engine>>,
    /// Stops the baseline calls in flight with the function.
    shutdown: CancellationToken,
}

impl FunctionTask {
    pub(crate) fn new(p: TaskParts) -> Self {
        Self {
            machine: Machine::new(p.config.clone(), p.page_request_timeout, Instant::now()),
            sid: u32::from(p.config.sid.0),
            cfg: p.config,
            link: p.link,
            control: p.control,
            inbox: p.inbox,
            tasks: p.tasks,
            metrics: p.metrics,
            outbox: Vec::new(),
            miss_samples: 0,
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

    // ---- inputs --------------------------------------------------------------------------

    fn on_inbound(&mut self, ev: Inbound) {
        match ev {
            Inbound::Down(d) => self.machine.receive(
                d.invalidations.iter().map(wire::invalidation_request),
                d.completions.iter().map(wire::translation_completion),
                d.dma.iter().map(wire::dma_completion),
                d.page_responses.iter().map(wire::page_group_response),
                Instant::now(),
            ),
            // Requests queued so far belong to the old connection: they leave stamped
            // with it, and the link drops them.
            Inbound::Connected { generation } => {
                self.flush_outbox();
                self.machine.connected(generation);
            }
            Inbound::Disconnected { generation } => {
                self.flush_outbox();
                self.machine.disconnected(generation, Instant::now());
            }
            Inbound::Baseline { key, answer } => self.machine.baseline_answer(key, answer, Instant::now()),
        }
        self.apply_effects();
    }

    fn on_command(&mut self, cmd: Command) {
        let now = Instant::now();
        match cmd {
            Command::Access { dma, reply } => self.machine.start(dma, Owner::Caller(Reply::Outcome(reply)), now, now),
            Command::AccessMany { dmas } => {
                for (dma, reply) in dmas {
                    self.machine.start(dma, Owner::Caller(Reply::Outcome(reply)), now, now);
                }
            }
            Command::Hold { dma, reply } => self.machine.start(dma, Owner::Hold(Reply::Hold(reply)), now, now),
            Command::Release { key, reply } => self.machine.release(key, Reply::Outcome(reply), now),
            Command::Snapshot { reply } => {
                let _ = reply.send(self.machine.snapshot());
            }
            Command::Entries { reply } => {
                let _ = reply.send(self.machine.entries());
            }
            Command::Clear { reply } => {
                let _ = reply.send(self.machine.clear_cache());
            }
            Command::Start { engine } => {
                if let Some(mut old) = self.engine.take() {
                    old.abort(now, self.machine.counters(), self.machine.atc_len());
                }
                self.engine = Some(engine);
            }
        }
        self.apply_effects();
    }

    fn on_tick(&mut self, now: Instant) {
        self.machine.tick(now);
        self.apply_effects();
        self.flush_metrics();
        if let Some(e) = self.engine.as_ref() {
            e.publish(self.machine.counters());
        }
    }

    // ---- the workload --------------------------------------------------------------------

    /// Starts the workload's due accesses; says when to come back.
    fn pump(&mut self) -> Wake {
        let Some(engine) = self.engine.as_mut() else { return Wake::Idle };
        let now = Instant::now();
        if engine.advance(now, self.machine.counters(), self.machine.atc_len()) {
            self.engine = None;
            return Wake::Idle;
        }
        if !engine.issuing() {
            return Wake::At(engine.deadline());
        }
        let needs_link = !(engine.mode == Mode::Baseline && engine.translate_only);
        if needs_link && self.machine.generation().is_none() {
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
                    if fast && self.machine.try_hit(iova, write) {
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
        let dma = Dma { iova, write, len: engine.dma_bytes, translate_only: engine.translate_only, mode: engine.mode };
        let owner = Owner::Workload { run: engine.run.id };
        let now = Instant::now();
        self.machine.start(dma, owner, intended.unwrap_or(now), now);
        // Now, not at the end of the turn: an access that ended frees its slot for the
        // next one.
        self.apply_effects();
    }

    // ---- effects -------------------------------------------------------------------------

    fn apply_effects(&mut self) {
        while let Some(effect) = self.machine.poll_effect() {
            match effect {
                Effect::Send(up) => self.outbox.push(wire::up(self.sid, up)),
                Effect::Complete { itag } => {
                    if let Some(generation) = self.machine.generation() {
                        self.link.complete(generation, wire::invalidation_completion(self.sid, itag));
                    }
                }
                Effect::Baseline { key, iova, write } => self.baseline_call(key, iova, write),
                Effect::Held { caller, held } => {
                    if let Reply::Hold(tx) = caller {
                        let _ = tx.send(Ok(held));
                    }
                }
                Effect::Finished { by, outcome } => self.deliver(by, outcome),
                Effect::Translated { run, latency } => {
                    self.miss_samples = self.miss_samples.wrapping_add(1);
                    if self.miss_samples.is_multiple_of(MISS_SAMPLE) {
                        self.metrics.translation_duration.record(latency.as_secs_f64());
                    }
                    if let Some(run) = run
                        && let Some(e) = self.engine.as_mut()
                        && e.run.id == run
                        && e.recording()
                    {
                        let _ = e.miss.record(nanos(latency));
                    }
                }
                Effect::Invalidated { after } => {
                    self.metrics.invalidation_duration.record(after.as_secs_f64());
                    if let Some(e) = self.engine.as_mut()
                        && e.recording()
                    {
                        let _ = e.invalidation.record(nanos(after));
                    }
                }
            }
        }
    }

    fn deliver(&mut self, by: By<Reply>, outcome: DmaOutcome) {
        match by {
            By::Workload { run } => {
                if let Some(e) = self.engine.as_mut()
                    && e.run.id == run
                {
                    e.in_flight = e.in_flight.saturating_sub(1);
                    if e.recording() {
                        let _ = e.access.record(nanos(outcome.latency));
                    }
                }
            }
            By::Caller(Reply::Outcome(tx)) => {
                let _ = tx.send(outcome);
            }
            By::Caller(Reply::Hold(tx)) => {
                let _ = tx.send(Err(outcome));
            }
        }
    }

    fn baseline_call(&mut self, key: AccessKey, iova: u64, write: bool) {
        let req = wire::translate_request(self.sid, iova, write);
        let mut client = self.control.clone();
        let inbox = self.inbox.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                result = client.translate(req) => {
                    let answer = wire::baseline_answer(result.map(tonic::Response::into_inner));
                    let _ = inbox.send(Inbound::Baseline { key, answer });
                }
                () = shutdown.cancelled() => {}
            }
        });
    }

    /// Sends what this turn queued, as one batch.
    fn flush_outbox(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        match self.machine.generation() {
            Some(generation) => {
                let items = std::mem::take(&mut self.outbox);
                if !self.link.send(generation, items) {
                    tracing::debug!("link task gone; requests dropped");
                }
            }
            None => self.outbox.clear(),
        }
    }

    fn flush_metrics(&mut self) {
        let counters = *self.machine.counters();
        self.metrics.flush(&counters.since(&self.flushed));
        self.flushed = counters;
        let entries = self.machine.atc_len();
        if entries != self.flushed_entries {
            self.metrics.atc_entries.increment(entries as f64 - self.flushed_entries as f64);
            self.flushed_entries = entries;
        }
    }

    /// Shutdown: every access still waiting is answered, the run (if any) reports.
    fn stop(&mut self) {
        let now = Instant::now();
        self.machine.abort_all(now);
        self.apply_effects();
        if let Some(mut e) = self.engine.take() {
            e.abort(now, self.machine.counters(), self.machine.atc_len());
        }
        self.machine.clear_cache();
        self.flush_metrics();
    }
}

/// A latency in whole nanoseconds, at least 1 (HdrHistograms record no zero).
fn nanos(d: Duration) -> u64 {
    (d.as_nanos() as u64).max(1)
}

#[cfg(test)]
mod tests;
