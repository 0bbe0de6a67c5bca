//! Fans the unit's notifications out: fault records, remapped interrupts and page
//! requests go to any number of gRPC watchers through bounded broadcast channels, and
//! the unit's sampled timings go to the metrics.
//!
//! A watcher that falls more than [`EVENT_BUFFER`] events behind loses the oldest ones
//! (counted in `dmar_server_watch_events_dropped_total` and logged); the unit never blocks
//! on a slow watcher.
//!
//! The unit calls the hub synchronously, from whichever thread made the unit act, so
//! nothing here waits or calls back into the unit or the driver. Faults and page requests
//! are not broadcast from here: they reach software through registers and memory, as on
//! hardware. The hub tells the two events apart by their message data ([`FAULT_VECTOR`],
//! [`PAGE_REQUEST_VECTOR`], which the driver programs) and wakes the matching pump
//! ([`super::background`]), which services the fault recording registers or drains the
//! page request queue through the driver and broadcasts what it read. Events are encoded
//! by [`super::wire`].
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
use dmar_vtd::unit::{EventSource, FaultReason, FaultRecord, UnitEvents};

/// The page request event's message data: the driver programs PEDATA with it, and the hub
/// recognises the event by it.
pub(crate) const PAGE_REQUEST_VECTOR: u32 = 0x5052;

/// The fault event's message data: the driver programs FEDATA with it, and the hub
/// recognises the event by it.
pub(crate) const FAULT_VECTOR: u32 = 0x4645;

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
    fault_event: Arc<Notify>,
}

impl EventHub {
    /// A hub that wakes `page_request_event` and `fault_event` when the unit raises them.
    pub(crate) fn new(metrics: Metrics, page_request_event: Arc<Notify>, fault_event: Arc<Notify>) -> Self {
        Self {
            faults: broadcast::channel(EVENT_BUFFER).0,
            interrupts: broadcast::channel(EVENT_BUFFER).0,
            page_requests: broadcast::channel(EVENT_BUFFER).0,
            page_groups: Arc::default(),
            metrics,
            page_request_event,
            fault_event,
        }
    }

    /// Wakes the fault pump as the fault event would: for the ticker, which finds faults
    /// pending that raised no event (VT-d 7.3: none is raised while PPF or PFO is set).
    pub(crate) fn wake_fault_pump(&self) {
        self.fault_event.notify_one();
    }
}

impl UnitEvents for EventHub {
    fn fault_recorded(&self, record: &FaultRecord) {
        self.metrics.faults[usize::from(record.reason.code())].increment(1);
    }

    fn fault_dropped(&self, _reason: FaultReason, _overflow: bool) {}

    fn interrupt_message(&self, _source: EventSource, _addr: u64, data: u32) {
        match data {
            PAGE_REQUEST_VECTOR => self.page_request_event.notify_one(),
            FAULT_VECTOR => self.fault_event.notify_one(),
            _ => {}
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
