//! The per-function workload engine: which access comes next, and when.
//!
//! Owns pacing and the run's bookkeeping inside one function: closed loop (keep
//! `concurrency` accesses in flight, start the next as one ends) or open loop (start
//! accesses on a fixed schedule from the run's start; an access's latency counts from its
//! *intended* start, so a stall shows up in every access it delayed instead of being
//! hidden by the ones that were never sent — wrk2's rule against coordinated omission);
//! the warm-up / measure / drain phases; the counters' snapshot at each phase change and
//! the histograms recorded while measuring. The function performs the accesses and tells
//! the engine when they end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmar_vtd::SourceId;
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::oneshot;

use super::report::{FunctionRunReport, new_histogram};
use super::stream::AddressGen;
use super::{Mode, Run, StreamSpec, WorkloadSpec};
use crate::counters::Counters;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    WarmingUp,
    Measuring { since: Instant },
    Draining { deadline: Instant },
    Done,
}

#[derive(Debug)]
struct OpenLoop {
    interval_ns: f64,
    issued: u64,
}

/// What the function should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Start this access; `intended` is its scheduled start in open loop.
    Issue { iova: u64, write: bool, intended: Option<Instant> },
    /// Nothing until an access ends (or the phase changes).
    Wait,
    /// Nothing before this instant.
    SleepUntil(Instant),
}

/// One function's part of a run.
#[derive(Debug)]
pub(crate) struct Engine {
    pub(crate) run: Arc<Run>,
    slot: usize,
    sid: SourceId,
    addresses: AddressGen,
    rng: SmallRng,
    write_fraction: f64,
    pub(crate) mode: Mode,
    pub(crate) translate_only: bool,
    pub(crate) dma_bytes: u32,
    concurrency: u32,
    /// Accesses of this run in flight (the function counts them).
    pub(crate) in_flight: u32,
    open: Option<OpenLoop>,
    phase: Phase,
    snapshot: Counters,
    measured: Counters,
    measured_for: Duration,
    stopped: bool,
    drain_timeout: Duration,
    pub(crate) access: Histogram<u64>,
    pub(crate) miss: Histogram<u64>,
    pub(crate) invalidation: Histogram<u64>,
    report: Option<oneshot::Sender<FunctionRunReport>>,
}

impl Engine {
    /// The engine of function `sid`, the `slot`-th of the run.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        run: Arc<Run>,
        slot: usize,
        sid: SourceId,
        spec: &WorkloadSpec,
        stream: &StreamSpec,
        seed: u64,
        drain_timeout: Duration,
        report: oneshot::Sender<FunctionRunReport>,
    ) -> Self {
        Self {
            run,
            slot,
            sid,
            addresses: AddressGen::new(stream, spec.dma_bytes),
            rng: SmallRng::seed_from_u64(seed ^ (u64::from(sid.0) << 40) ^ 0x9e37_79b9_7f4a_7c15),
            write_fraction: spec.write_fraction,
            mode: spec.mode,
            translate_only: spec.translate_only,
            dma_bytes: spec.dma_bytes,
            concurrency: spec.concurrency,
            in_flight: 0,
            open: spec.rate_per_second.map(|r| OpenLoop { interval_ns: 1e9 / r, issued: 0 }),
            phase: Phase::WarmingUp,
            snapshot: Counters::default(),
            measured: Counters::default(),
            measured_for: Duration::ZERO,
            stopped: false,
            drain_timeout,
            access: new_histogram(),
            miss: new_histogram(),
            invalidation: new_histogram(),
            report: Some(report),
        }
    }

    /// Whether latencies are recorded now (measuring, or draining what was measured).
    pub(crate) fn recording(&self) -> bool {
        matches!(self.phase, Phase::Measuring { .. } | Phase::Draining { .. })
    }

    /// Whether new accesses start now.
    pub(crate) fn issuing(&self) -> bool {
        matches!(self.phase, Phase::WarmingUp | Phase::Measuring { .. })
    }

    /// Whether the run is closed loop.
    pub(crate) fn closed_loop(&self) -> bool {
        self.open.is_none()
    }

    /// The next phase change.
    pub(crate) fn deadline(&self) -> Instant {
        match self.phase {
            Phase::WarmingUp => self.run.measure_from,
            Phase::Measuring { .. } => self.run.end,
            Phase::Draining { deadline } => deadline,
            Phase::Done => self.run.end,
        }
    }

    /// Moves through the phases that are due; `counters` are the function's lifetime
    /// counters. Returns true once the engine has handed in its report.
    pub(crate) fn advance(&mut self, now: Instant, counters: &Counters, atc_entries: usize) -> bool {
        loop {
            match self.phase {
                Phase::WarmingUp => {
                    if self.run.stop.is_cancelled() {
                        self.stopped = true;
                        self.phase = Phase::Draining { deadline: now + self.drain_timeout };
                    } else if now >= self.run.measure_from {
                        self.snapshot = *counters;
                        self.access.reset();
                        self.miss.reset();
                        self.invalidation.reset();
                        self.phase = Phase::Measuring { since: now };
                    } else {
                        return false;
                    }
                }
                Phase::Measuring { since } => {
                    let stop = self.run.stop.is_cancelled();
                    if !(stop || now >= self.run.end) {
                        return false;
                    }
                    self.stopped = stop && now < self.run.end;
                    self.measured = counters.since(&self.snapshot);
                    self.measured_for = now.saturating_duration_since(since);
                    self.phase = Phase::Draining { deadline: now + self.drain_timeout };
                }
                Phase::Draining { deadline } => {
                    if self.in_flight > 0 && now < deadline {
                        return false;
                    }
                    if self.in_flight > 0 {
                        tracing::warn!(sid = %self.sid, in_flight = self.in_flight, "run ended with accesses in flight");
                    }
                    self.hand_in(atc_entries);
                    return true;
                }
                Phase::Done => return true,
            }
        }
    }

    /// Hands in the report now (shutdown, or a newer run replacing this one).
    pub(crate) fn abort(&mut self, now: Instant, counters: &Counters, atc_entries: usize) {
        if let Phase::Measuring { since } = self.phase {
            self.measured = counters.since(&self.snapshot);
            self.measured_for = now.saturating_duration_since(since);
        }
        self.stopped = true;
        self.hand_in(atc_entries);
    }

    fn hand_in(&mut self, atc_entries: usize) {
        self.phase = Phase::Done;
        self.run.publish(self.slot, self.measured);
        if let Some(tx) = self.report.take() {
            let _ = tx.send(FunctionRunReport {
                sid: self.sid,
                counters: self.measured,
                measured: self.measured_for,
                stopped: self.stopped,
                atc_entries,
                access: std::mem::replace(&mut self.access, new_histogram()),
                miss: std::mem::replace(&mut self.miss, new_histogram()),
                invalidation: std::mem::replace(&mut self.invalidation, new_histogram()),
            });
        }
    }

    /// The next access, if one is due.
    #[inline]
    pub(crate) fn next(&mut self, now: Instant) -> Next {
        if !self.issuing() || self.in_flight >= self.concurrency {
            return Next::Wait;
        }
        let intended = match &mut self.open {
            None => None,
            Some(o) => {
                let t = self.run.started + Duration::from_nanos((o.issued as f64 * o.interval_ns) as u64);
                if t > now {
                    return Next::SleepUntil(t);
                }
                o.issued += 1;
                Some(t)
            }
        };
        let (iova, dir) = self.addresses.next(&mut self.rng);
        let write = match dir {
            Some(w) => w,
            None => self.write_fraction > 0.0 && self.rng.random::<f64>() < self.write_fraction,
        };
        Next::Issue { iova, write, intended }
    }

    /// Publishes the measured counters so far for the progress stream.
    pub(crate) fn publish(&self, counters: &Counters) {
        let c = match self.phase {
            Phase::Measuring { .. } => counters.since(&self.snapshot),
            Phase::Draining { .. } | Phase::Done => self.measured,
            Phase::WarmingUp => Counters::default(),
        };
        self.run.publish(self.slot, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{Pattern, StreamSpec};

    fn engine(spec: &WorkloadSpec, now: Instant) -> (Engine, oneshot::Receiver<FunctionRunReport>) {
        let run = Run::new(1, spec, now);
        let (tx, rx) = oneshot::channel();
        let (sid, stream) = &spec.streams[0];
        (Engine::new(run, 0, *sid, spec, stream, 7, Duration::from_secs(1), tx), rx)
    }

    fn spec() -> WorkloadSpec {
        let sid = SourceId::new(0, 1, 0);
        let stream = StreamSpec { pattern: Pattern::SequentialRing, base: 0x1000, footprint: 0x1000 };
        WorkloadSpec {
            duration: Duration::from_millis(100),
            warmup: Duration::from_millis(10),
            concurrency: 3,
            ..WorkloadSpec::new(vec![(sid, stream)])
        }
    }

    #[test]
    fn closed_loop_keeps_the_concurrency() {
        let t0 = Instant::now();
        let (mut e, _rx) = engine(&spec(), t0);
        let mut issued = Vec::new();
        while let Next::Issue { iova, write, intended } = e.next(t0) {
            assert_eq!((write, intended), (false, None));
            issued.push(iova);
            e.in_flight += 1;
        }
        assert_eq!(issued, [0x1000, 0x1040, 0x1080], "three in flight, ring order");
        e.in_flight -= 1;
        assert!(matches!(e.next(t0), Next::Issue { iova: 0x10c0, .. }));
    }

    #[test]
    fn open_loop_follows_the_schedule_not_the_completions() {
        let t0 = Instant::now();
        let s = WorkloadSpec { rate_per_second: Some(1000.0), concurrency: 100, ..spec() };
        let (mut e, _rx) = engine(&s, t0);
        let ms = Duration::from_millis(1);
        assert_eq!(e.next(t0), Next::Issue { iova: 0x1000, write: false, intended: Some(t0) });
        assert_eq!(e.next(t0), Next::SleepUntil(t0 + ms));
        // Late: every access that was due goes out at once, each with its own intended
        // start, so the delay counts in its latency.
        let mut intended = Vec::new();
        while let Next::Issue { intended: Some(t), .. } = e.next(t0 + 5 * ms) {
            intended.push(t);
        }
        assert_eq!(intended, (1..=5).map(|i| t0 + i * ms).collect::<Vec<_>>());
        assert_eq!(e.next(t0 + 5 * ms), Next::SleepUntil(t0 + 6 * ms));
    }

    #[test]
    fn phases_snapshot_the_counters_and_hand_in_a_report() {
        let t0 = Instant::now();
        let (mut e, mut rx) = engine(&spec(), t0);
        let mut c = Counters { accesses: 5, ..Default::default() };
        assert!(!e.advance(t0, &c, 0));
        assert!(e.issuing() && !e.recording());
        assert_eq!(e.deadline(), t0 + Duration::from_millis(10));
        let start = t0 + Duration::from_millis(10);
        assert!(!e.advance(start, &c, 0));
        assert!(e.recording());
        let _ = e.access.record(1000);
        c.accesses = 25;
        c.atc_hits = 7;
        e.in_flight = 1;
        let end = t0 + Duration::from_millis(110);
        assert!(!e.advance(end, &c, 3), "draining while an access is in flight");
        assert!(!e.issuing() && e.recording());
        assert_eq!(e.next(end), Next::Wait);
        c.accesses = 40;
        e.in_flight = 0;
        assert!(e.advance(end, &c, 3));
        let r = rx.try_recv().expect("report");
        assert_eq!((r.counters.accesses, r.counters.atc_hits), (20, 7), "counters cover the measured interval only");
        assert_eq!(r.measured, Duration::from_millis(100));
        assert_eq!((r.access.len(), r.atc_entries, r.stopped), (1, 3, false));
    }

    #[test]
    fn a_stop_ends_the_run_early() {
        let t0 = Instant::now();
        let (mut e, mut rx) = engine(&spec(), t0);
        let c = Counters::default();
        e.advance(t0 + Duration::from_millis(20), &c, 0);
        e.run.stop();
        assert!(e.advance(t0 + Duration::from_millis(30), &c, 0));
        let r = rx.try_recv().expect("report");
        assert!(r.stopped);
        assert_eq!(r.measured, Duration::from_millis(10));
    }
}
