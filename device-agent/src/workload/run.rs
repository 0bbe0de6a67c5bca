//! A run: one workload across several functions, from start to merged report.
//!
//! Owns the run's timeline (start, end of warm-up, end), its stop signal, the progress the
//! functions publish every 100 ms, and the coordinator that collects each function's
//! final report and merges them. The functions do the work; a run only watches.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmar_vtd::SourceId;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::report::{FunctionReport, FunctionRunReport, Report, new_histogram};
use super::{Mode, WorkloadSpec};
use crate::counters::Counters;

/// The phase of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunPhase {
    /// Running, not counted yet.
    WarmingUp,
    /// Running and counted.
    Measuring,
    /// Over; accesses in flight are finishing.
    Draining,
    /// Finished after its whole duration.
    Finished,
    /// Stopped early.
    Stopped,
}

/// One workload run, shared by its functions, the coordinator and the control service.
#[derive(Debug)]
pub struct Run {
    /// The run's id.
    pub id: u64,
    /// Its translation mode.
    pub mode: Mode,
    /// Whether it stops at translations.
    pub translate_only: bool,
    /// When it started.
    pub started: Instant,
    /// When measuring starts (after the warm-up).
    pub measure_from: Instant,
    /// When measuring ends.
    pub end: Instant,
    pub(crate) stop: CancellationToken,
    progress: Vec<(SourceId, Mutex<Counters>)>,
    report: watch::Sender<Option<Arc<Report>>>,
}

impl Run {
    pub(crate) fn new(id: u64, spec: &WorkloadSpec, now: Instant) -> Arc<Run> {
        let measure_from = now + spec.warmup;
        Arc::new(Run {
            id,
            mode: spec.mode,
            translate_only: spec.translate_only,
            started: now,
            measure_from,
            end: measure_from + spec.duration,
            stop: CancellationToken::new(),
            progress: spec.streams.iter().map(|(sid, _)| (*sid, Mutex::new(Counters::default()))).collect(),
            report: watch::channel(None).0,
        })
    }

    /// Its phase now.
    pub fn phase(&self) -> RunPhase {
        if let Some(r) = self.report.borrow().as_ref() {
            return r.phase;
        }
        let now = Instant::now();
        if self.stop.is_cancelled() || now >= self.end {
            RunPhase::Draining
        } else if now < self.measure_from {
            RunPhase::WarmingUp
        } else {
            RunPhase::Measuring
        }
    }

    /// Asks every function to stop now; the report covers what was measured.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Counters over the measured interval so far, summed over functions (refreshed every
    /// 100 ms by each function).
    pub fn progress(&self) -> Counters {
        let mut sum = Counters::default();
        for (_, c) in &self.progress {
            sum.add(&c.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        }
        sum
    }

    pub(crate) fn publish(&self, slot: usize, counters: Counters) {
        if let Some((_, c)) = self.progress.get(slot) {
            *c.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = counters;
        }
    }

    /// The final report, once there is one.
    pub fn report(&self) -> Option<Arc<Report>> {
        self.report.borrow().clone()
    }

    /// Waits for the final report.
    pub async fn finished(&self) -> Arc<Report> {
        let mut rx = self.report.subscribe();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`, so this cannot happen while we borrow it.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Whether the final report is in.
    pub fn is_done(&self) -> bool {
        self.report.borrow().is_some()
    }
}

/// How long the functions have to hand in their reports once the agent shuts down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Collects the functions' reports (waiting at most until `deadline`, or a short grace
/// once `shutdown` fires: stopping functions hand in what they measured), merges them and
/// publishes the run's report.
pub(crate) async fn coordinate(
    run: Arc<Run>,
    receivers: Vec<(SourceId, oneshot::Receiver<FunctionRunReport>)>,
    deadline: Instant,
    shutdown: CancellationToken,
) -> Arc<Report> {
    let mut parts = Vec::with_capacity(receivers.len());
    let mut deadline = tokio::time::Instant::from(deadline);
    for (sid, mut rx) in receivers {
        let got = loop {
            tokio::select! {
                r = &mut rx => break Some(r),
                () = tokio::time::sleep_until(deadline) => break None,
                () = shutdown.cancelled(), if !run.stop.is_cancelled() => {
                    run.stop();
                    deadline = deadline.min(tokio::time::Instant::now() + SHUTDOWN_GRACE);
                }
            }
        };
        match got {
            Some(Ok(r)) => parts.push(r),
            Some(Err(_)) => tracing::warn!(run = run.id, %sid, "function stopped before reporting"),
            None => tracing::warn!(run = run.id, %sid, "function did not report in time"),
        }
    }
    parts.sort_by_key(|p| p.sid);
    let stopped = parts.iter().any(|p| p.stopped) || (parts.is_empty() && run.stop.is_cancelled());
    let mut report = Report {
        run_id: run.id,
        phase: if stopped { RunPhase::Stopped } else { RunPhase::Finished },
        mode: run.mode,
        translate_only: run.translate_only,
        measured: parts.iter().map(|p| p.measured).max().unwrap_or(Duration::ZERO),
        totals: Counters::default(),
        functions: Vec::with_capacity(parts.len()),
        access_latency: new_histogram(),
        miss_latency: new_histogram(),
        invalidation_latency: new_histogram(),
    };
    for p in parts {
        report.totals.add(&p.counters);
        // The histograms grow to fit, so adding cannot run out of range.
        let _ = report.access_latency.add(&p.access);
        let _ = report.miss_latency.add(&p.miss);
        let _ = report.invalidation_latency.add(&p.invalidation);
        report.functions.push(FunctionReport { sid: p.sid, counters: p.counters, atc_entries: p.atc_entries });
    }
    let report = Arc::new(report);
    run.report.send_replace(Some(report.clone()));
    tracing::info!(
        run = run.id,
        accesses = report.totals.accesses,
        per_second = report.accesses_per_second() as u64,
        hit_ratio = report.totals.hit_ratio(),
        "workload run finished"
    );
    report
}
