//! The server's own tasks, the ones no client call drives: the ticker, which lets time
//! pass for the unit and runs the deferred flushes that came due, the page request pump,
//! which drains the page request queue to watchers, and the fault pump, which services the
//! fault recording registers (the driver's fault interrupt handler, Linux `dmar_fault`)
//! and hands the faults to watchers. Each pump waits for its event from the hub
//! ([`super::events`]) and calls the driver on the blocking pool.
//!
//! The driver does not run due deferred flushes by itself: the ticker is the one place
//! that does (Linux `fq_flush_timeout`), on the blocking pool like every driver call. Its
//! period follows the deferred policies' `max_delay` ([`tick_period`]), so a queued unmap
//! is flushed about one tick after it came due: half a `max_delay`, within 1..=5 ms.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::{State, wire};
use dmar_vtd::driver::{Driver, DriverError, FlushPolicy};

/// The longest tick. Besides deferred flushes, a tick expires device-TLB invalidations
/// older than the time-out (ITE) when no driver call is waiting to notice it (a waiting
/// call reads FSTS itself, which expires them too).
const MAX_TICK: Duration = Duration::from_millis(5);
/// The shortest tick: a 1 ms `max_delay` is served with 1 ms ticks rather than a busy
/// loop.
const MIN_TICK: Duration = Duration::from_millis(1);

/// The ticker's period for these flush policies: half the shortest deferred `max_delay`,
/// within [`MIN_TICK`]..=[`MAX_TICK`].
pub(super) fn tick_period(policies: &[FlushPolicy]) -> Duration {
    policies
        .iter()
        .filter_map(|p| if let FlushPolicy::Deferred { max_delay, .. } = p { Some(*max_delay / 2) } else { None })
        .fold(MAX_TICK, Duration::min)
        .max(MIN_TICK)
}

/// Lets time pass for the unit and the driver every `period` until shutdown.
pub(super) async fn ticker(state: Arc<State>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // The deferred flush in progress, if any: at most one at a time, and the ticker goes on
    // polling every unit (device-TLB time-outs) while it waits for devices.
    let mut flushing: Option<tokio::task::JoinHandle<Result<(), DriverError>>> = None;
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for slot in state.units.iter() {
            slot.unit.poll(slot.unit.clock().now());
        }
        let Some(driver) = &state.driver else { continue };
        // VT-d 7.3: a fault recorded while PPF or PFO was set raised no event. The fault
        // pump services until a pass finds nothing, so this only catches a fault that
        // landed after its last look (a register read in place, never a wait).
        if driver.faults_pending().unwrap_or(false) {
            state.hub.wake_fault_pump();
        }
        if let Some(done) = flushing.take_if(|f| f.is_finished()) {
            match done.await {
                Ok(Ok(())) => {}
                // Retried on a later tick (the driver keeps what it could not flush).
                Ok(Err(e)) => tracing::warn!(error = %e, "deferred flush failed"),
                Err(e) => tracing::warn!(error = %e, "deferred flush task failed"),
            }
        }
        // A cheap check (atomics) in place; the flush itself waits for devices.
        if flushing.is_none() && driver.deferred_due() {
            let driver = driver.clone();
            flushing = Some(tokio::task::spawn_blocking(move || driver.poll_deferred()));
        }
    }
}

/// Drains the built-in units' page request queues whenever one raises its page request
/// event, and hands the requests to watchers.
pub(super) async fn page_request_pump(state: Arc<State>, notify: Arc<Notify>) {
    let Some(driver) = state.driver.clone() else { return };
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = notify.notified() => {}
        }
        let driver = driver.clone();
        // Every unit's queue; a unit whose queue cannot be drained (logged by the driver)
        // does not cost the requests already taken from the others.
        match tokio::task::spawn_blocking(move || driver.drain_page_requests_by_unit()).await {
            Ok(Ok(requests)) => {
                for (unit, r) in &requests {
                    // No watcher is not an error.
                    let _ = state.hub.page_requests.send(wire::page_request_event(*unit, r));
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "page request queue drain failed"),
            Err(e) => tracing::warn!(error = %e, "page request queue drain task failed"),
        }
    }
}

/// Services the fault recording registers whenever the unit raises its fault event (or
/// the ticker finds faults pending), and hands the faults to watchers. A pass reads at
/// most every register once, and faults recorded during a pass raise no event, so passes
/// repeat, on the blocking pool without going back to the runtime in between, until one
/// finds nothing. Faults the unit could not record (the registers full: FSTS.PFO) are lost
/// as on hardware; the unit counts them (`faults_overflowed`).
pub(super) async fn fault_pump(state: Arc<State>, notify: Arc<Notify>) {
    let Some(driver) = state.driver.clone() else { return };
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = notify.notified() => {}
        }
        let (s, d) = (state.clone(), driver.clone());
        match tokio::task::spawn_blocking(move || service_faults(&s, &d)).await {
            Ok(Ok(Serviced::Drained)) => {}
            // A steady flood: go round again, after the others have had the registers.
            Ok(Ok(Serviced::More)) => notify.notify_one(),
            Ok(Err(e)) => tracing::warn!(error = %e, "fault servicing failed"),
            Err(e) => tracing::warn!(error = %e, "fault servicing task failed"),
        }
    }
}

/// Passes over the fault recording registers per wake-up. A device that keeps faulting
/// keeps every pass non-empty; after this many the pump gives the blocking thread and the
/// driver's register lock back and wakes itself again.
const PASSES_PER_WAKE: usize = 16;

/// What one wake-up of the fault pump left.
#[derive(Debug, PartialEq, Eq)]
enum Serviced {
    /// A pass found nothing (or the server is shutting down).
    Drained,
    /// [`PASSES_PER_WAKE`] passes all found faults: there may be more.
    More,
}

/// Services the fault recording registers until a pass finds nothing, at most
/// [`PASSES_PER_WAKE`] times, broadcasting each fault as it is read.
fn service_faults(state: &State, driver: &Driver) -> Result<Serviced, DriverError> {
    for _ in 0..PASSES_PER_WAKE {
        if state.shutdown.is_cancelled() {
            return Ok(Serviced::Drained);
        }
        let reports = driver.service_faults()?;
        if reports.is_empty() {
            return Ok(Serviced::Drained);
        }
        for r in &reports {
            // No watcher is not an error.
            let _ = state.hub.faults.send(wire::fault_event(r));
        }
    }
    Ok(Serviced::More)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deferred(ms: u64) -> FlushPolicy {
        FlushPolicy::Deferred { max_entries: 256, max_delay: Duration::from_millis(ms) }
    }

    #[test]
    fn the_tick_follows_the_shortest_deferred_delay() {
        assert_eq!(tick_period(&[FlushPolicy::Strict]), MAX_TICK);
        assert_eq!(tick_period(&[FlushPolicy::Strict, deferred(10)]), Duration::from_millis(5));
        assert_eq!(tick_period(&[deferred(100), deferred(4)]), Duration::from_millis(2));
        assert_eq!(tick_period(&[deferred(1)]), MIN_TICK);
        assert_eq!(tick_period(&[deferred(1000)]), MAX_TICK);
    }
}
