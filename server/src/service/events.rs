//! Fans the unit's notifications out: fault records, remapped interrupts and page
//! requests go to any number of gRPC watchers through bounded broadcast channels, and
//! the unit's sampled timings go to the metrics.
//!
//! A watcher that falls more than [`EVENT_BUFFER`] events behind loses the oldest ones
//! (and is told how many in the log); the unit never blocks on a slow watcher.

use std::sync::Arc;
use std::time::Duration;

use dmar_proto::v1::{FaultEvent, InterruptEvent, PageRequestEvent};
use tokio::sync::{Notify, broadcast};

use super::metrics::Metrics;
use dmar_vtd::ids::SourceId;
use dmar_vtd::unit::interrupt::{DestinationMode, Remapped, Trigger};
use dmar_vtd::unit::{Direction, FaultReason, FaultRecord, UnitEvents};

/// The page request event's message data: the driver programs PEDATA with it, and the hub
/// recognises the event by it.
pub const PAGE_REQUEST_VECTOR: u32 = 0x5052;

/// Events buffered per stream before slow watchers start losing them.
pub const EVENT_BUFFER: usize = 4096;

/// The unit's event sink in the server.
#[derive(Debug)]
pub struct EventHub {
    pub(crate) faults: broadcast::Sender<FaultEvent>,
    pub(crate) interrupts: broadcast::Sender<InterruptEvent>,
    pub(crate) page_requests: broadcast::Sender<PageRequestEvent>,
    metrics: Metrics,
    page_request_event: Arc<Notify>,
}

impl EventHub {
    pub(crate) fn new(metrics: Metrics, page_request_event: Arc<Notify>) -> Self {
        Self {
            faults: broadcast::channel(EVENT_BUFFER).0,
            interrupts: broadcast::channel(EVENT_BUFFER).0,
            page_requests: broadcast::channel(EVENT_BUFFER).0,
            metrics,
            page_request_event,
        }
    }
}

impl UnitEvents for EventHub {
    fn fault_recorded(&self, record: &FaultRecord) {
        self.metrics.faults[usize::from(record.reason.code())].increment(1);
        // No watcher is not an error.
        let _ = self.faults.send(FaultEvent {
            reason: u32::from(record.reason.code()),
            reason_name: record.reason.name().to_owned(),
            source_id: u32::from(record.sid.0),
            address: record.addr,
            write: record.access == Direction::Write,
            address_type: record.kind as u32,
        });
    }

    fn fault_dropped(&self, _reason: FaultReason, _overflow: bool) {}

    fn interrupt_message(&self, _addr: u64, data: u32) {
        if data == PAGE_REQUEST_VECTOR {
            self.page_request_event.notify_one();
        }
    }

    fn interrupt_remapped(&self, sid: SourceId, i: &Remapped) {
        let _ = self.interrupts.send(InterruptEvent {
            source_id: u32::from(sid.0),
            vector: u32::from(i.vector),
            destination: i.destination,
            delivery_mode: i.delivery_mode as u32,
            level: i.trigger == Trigger::Level,
            logical: i.destination_mode == DestinationMode::Logical,
            index: i.index.map(u32::from),
        });
    }

    fn walk_sampled(&self, duration: Duration) {
        self.metrics.walk_duration.record(duration.as_secs_f64());
    }

    fn device_tlb_completed(&self, latency: Duration) {
        self.metrics.devtlb_duration.record(latency.as_secs_f64());
    }
}
