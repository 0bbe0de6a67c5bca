//! Fans the unit's notifications out: fault records, remapped interrupts and page
//! requests go to any number of gRPC watchers through bounded broadcast channels, and
//! the unit's sampled timings go to the metrics.
//!
//! A watcher that falls more than [`EVENT_BUFFER`] events behind loses the oldest ones
//! (and is told how many in the log); the unit never blocks on a slow watcher.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, broadcast};

use super::metrics::Metrics;
use crate::ids::SourceId;
use crate::unit::interrupt::{DestinationMode, Remapped, Trigger};
use crate::unit::{FaultReason, FaultRecord, UnitEvents};

/// The page request event's message data: the driver programs PEDATA with it, and the hub
/// recognises the event by it.
pub const PAGE_REQUEST_VECTOR: u32 = 0x5052;

/// Events buffered per stream before slow watchers start losing them.
pub const EVENT_BUFFER: usize = 4096;

/// A remapped interrupt as streamed to watchers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterruptNote {
    /// Requester id of the MSI write.
    pub source_id: u16,
    /// Vector.
    pub vector: u8,
    /// Destination.
    pub destination: u32,
    /// Delivery mode code.
    pub delivery_mode: u8,
    /// Level-triggered.
    pub level: bool,
    /// Logical destination mode.
    pub logical: bool,
    /// IRT index, when remapped.
    pub index: Option<u16>,
}

/// A page request as streamed to watchers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequestNote {
    /// Requester id.
    pub source_id: u16,
    /// Page address.
    pub address: u64,
    /// Read requested.
    pub read: bool,
    /// Write requested.
    pub write: bool,
    /// Group index.
    pub group_index: u16,
    /// Last in group.
    pub last: bool,
}

/// The unit's event sink in the server.
#[derive(Debug)]
pub struct EventHub {
    pub(crate) faults: broadcast::Sender<FaultRecord>,
    pub(crate) interrupts: broadcast::Sender<InterruptNote>,
    pub(crate) page_requests: broadcast::Sender<PageRequestNote>,
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
        let _ = self.faults.send(*record);
    }

    fn fault_dropped(&self, _reason: FaultReason, _overflow: bool) {}

    fn interrupt_message(&self, _addr: u64, data: u32) {
        if data == PAGE_REQUEST_VECTOR {
            self.page_request_event.notify_one();
        }
    }

    fn interrupt_remapped(&self, sid: SourceId, i: &Remapped) {
        let _ = self.interrupts.send(InterruptNote {
            source_id: sid.0,
            vector: i.vector,
            destination: i.destination,
            delivery_mode: i.delivery_mode as u8,
            level: i.trigger == Trigger::Level,
            logical: i.destination_mode == DestinationMode::Logical,
            index: i.index,
        });
    }

    fn walk_sampled(&self, duration: Duration) {
        self.metrics.walk_duration.record(duration.as_secs_f64());
    }

    fn device_tlb_completed(&self, latency: Duration) {
        self.metrics.devtlb_duration.record(latency.as_secs_f64());
    }
}
