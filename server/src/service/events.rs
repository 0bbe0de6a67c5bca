//! Fans the unit's notifications out: fault records, remapped interrupts and page
//! requests go to any number of gRPC watchers through bounded broadcast channels, and
//! the unit's sampled timings go to the metrics.
//!
//! A watcher that falls more than [`EVENT_BUFFER`] events behind loses the oldest ones
//! (and is told how many in the log); the unit never blocks on a slow watcher.
//!
//! The unit calls the hub synchronously, from whichever thread made the unit act, so
//! nothing here waits or calls back into the unit or the driver. Page requests are not
//! broadcast from here: the hub only wakes the page request pump
//! ([`super::background`]), which drains the queue through the driver. Events are
//! encoded by [`super::wire`].
//!
//! The hub also holds the page groups outstanding per bound function
//! ([`super::page_groups::PageGroups`]): the links admit and release them, and the Control
//! service checks software's page group responses against them, so the record sits with
//! the page request events that watchers answer.

use std::sync::Arc;
use std::time::Duration;

use dmar_proto::v1::{FaultEvent, InterruptEvent, PageRequestEvent};
use tokio::sync::{Notify, broadcast};

use super::metrics::Metrics;
use super::page_groups::PageGroups;
use super::wire;
use dmar_vtd::ids::SourceId;
use dmar_vtd::unit::interrupt::Remapped;
use dmar_vtd::unit::{FaultReason, FaultRecord, UnitEvents};

/// The page request event's message data: the driver programs PEDATA with it, and the hub
/// recognises the event by it.
pub(crate) const PAGE_REQUEST_VECTOR: u32 = 0x5052;

/// Events buffered per stream before slow watchers start losing them.
pub(crate) const EVENT_BUFFER: usize = 4096;

/// The unit's event sink in the server.
#[derive(Debug)]
pub(crate) struct EventHub {
    pub(crate) faults: broadcast::Sender<FaultEvent>,
    pub(crate) interrupts: broadcast::Sender<InterruptEvent>,
    pub(crate) page_requests: broadcast::Sender<PageRequestEvent>,
    /// Page groups outstanding per bound function.
    pub(crate) page_groups: Arc<PageGroups>,
    metrics: Metrics,
    page_request_event: Arc<Notify>,
}

impl EventHub {
    pub(crate) fn new(metrics: Metrics, page_request_event: Arc<Notify>) -> Self {
        Self {
            faults: broadcast::channel(EVENT_BUFFER).0,
            interrupts: broadcast::channel(EVENT_BUFFER).0,
            page_requests: broadcast::channel(EVENT_BUFFER).0,
            page_groups: Arc::default(),
            metrics,
            page_request_event,
        }
    }
}

impl UnitEvents for EventHub {
    fn fault_recorded(&self, record: &FaultRecord) {
        self.metrics.faults[usize::from(record.reason.code())].increment(1);
        // No watcher is not an error.
        let _ = self.faults.send(wire::fault_event(record));
    }

    fn fault_dropped(&self, _reason: FaultReason, _overflow: bool) {}

    fn interrupt_message(&self, _addr: u64, data: u32) {
        if data == PAGE_REQUEST_VECTOR {
            self.page_request_event.notify_one();
        }
    }

    fn interrupt_remapped(&self, sid: SourceId, i: &Remapped) {
        let _ = self.interrupts.send(wire::interrupt_event(sid, i));
    }

    fn walk_sampled(&self, duration: Duration) {
        self.metrics.walk_duration.record(duration.as_secs_f64());
    }

    fn device_tlb_completed(&self, latency: Duration) {
        self.metrics.devtlb_duration.record(latency.as_secs_f64());
    }
}
