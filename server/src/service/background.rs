//! The server's own tasks, the ones no client call drives: the ticker, which lets time
//! pass for the unit and runs the deferred flushes that came due, and the page request
//! pump, which drains the page request queue to watchers.
//!
//! The driver does not run due deferred flushes by itself: the ticker is the one place
//! that does (Linux `fq_flush_timeout`), on the blocking pool like every driver call. Its
//! period follows the deferred policies' `max_delay` ([`tick_period`]), so a queued unmap
//! is flushed about one tick after it came due: half a `max_delay`, within 1..=5 ms.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::{State, wire};
use dmar_vtd::driver::FlushPolicy;

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
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        state.unit.poll(state.unit.clock().now());
        // A cheap check (atomics) in place; the flush itself waits for devices.
        if state.driver.deferred_due() {
            let driver = state.driver.clone();
            match tokio::task::spawn_blocking(move || driver.poll_deferred()).await {
                Ok(Ok(())) => {}
                // Retried on the next tick (the driver keeps what it could not flush).
                Ok(Err(e)) => tracing::warn!(error = %e, "deferred flush failed"),
                Err(e) => tracing::warn!(error = %e, "deferred flush task failed"),
            }
        }
    }
}

/// Drains the page request queue whenever the unit raises its page request event, and
/// hands the requests to watchers.
pub(super) async fn page_request_pump(state: Arc<State>, notify: Arc<Notify>) {
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = notify.notified() => {}
        }
        let driver = state.driver.clone();
        match tokio::task::spawn_blocking(move || driver.drain_page_requests()).await {
            Ok(Ok(requests)) => {
                for r in &requests {
                    // No watcher is not an error.
                    let _ = state.hub.page_requests.send(wire::page_request_event(r));
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "page request queue drain failed"),
            Err(e) => tracing::warn!(error = %e, "page request queue drain task failed"),
        }
    }
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
