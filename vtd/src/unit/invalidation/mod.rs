//! Invalidation (VT-d 6.5): how software tells the unit that its caches may hold stale
//! entries, through the registers or the invalidation queue, and how device-TLB
//! invalidations reach the devices.
//!
//! - [`caches`]: what an invalidation does to the context cache, IOTLB and
//!   paging-structure caches (VT-d 6.5.1).
//! - `registers`: register-based invalidation, CCMD and IVA/IOTLB_REG (VT-d 10.4.7, 10.4.8).
//! - `queue`: the invalidation queue, its registers (IQA, IQH, IQT, ICS, the invalidation
//!   event, IQERCD, FSTS.IQE/ICE/ITE) and in-order descriptor processing (VT-d 6.5.2).
//! - [`descriptor`]: the 128-bit descriptor layouts, decoding and encoders.
//! - `ports`: device ports, ITag accounting and device-TLB invalidation time-outs.
//!
//! Not here: the page request queue and the admission of page requests (`unit::prq`;
//! page group response descriptors are fetched by the queue, decoded there), the fault
//! recording registers (`unit::fault`), and the register dispatch (`unit::mmio`).
//!
//! Everything that leaves the unit while the queue runs (requests to device ports,
//! interrupt messages, the fault event) is collected as an [`Effect`] under the queue lock
//! and carried out by [`Unit::apply`] after it is released, so a port may answer
//! synchronously from inside its call.

pub mod caches;
pub mod descriptor;
mod ports;
mod queue;
mod registers;

use std::sync::Arc;
use std::time::Duration;

pub use caches::{ContextInvalidation, InvalidationError, IotlbInvalidation, Performed};
pub use ports::{DeviceInvalidation, DevicePort, PageResponse, PortError, UnexpectedCompletion};
pub(crate) use queue::QueueState;

use super::Unit;
use super::event::Message;

/// Work to do once the queue lock is released: calls into ports and event subscribers
/// never happen under it, so a port may complete synchronously.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Send an ATS invalidation request to a device.
    Invalidate(Arc<dyn DevicePort>, DeviceInvalidation),
    /// Send a page group response to a device.
    PageResponse(Arc<dyn DevicePort>, PageResponse),
    /// Send the invalidation completion event's message.
    Interrupt(Message),
    /// A device-TLB invalidation completed after this long.
    Completed(Duration),
    /// A queue error was newly set while no other error was pending: raise the fault event.
    FaultEvent,
}

/// A counter bumped whenever the queue completes a wait descriptor or stops on an error,
/// with a condition variable, so that software waiting for its wait descriptor can sleep
/// until something happened instead of polling memory on a timer.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    count: parking_lot::Mutex<u64>,
    changed: parking_lot::Condvar,
}

impl Progress {
    fn bump(&self) {
        *self.count.lock() += 1;
        self.changed.notify_all();
    }
}

impl Unit {
    /// Carries out `effects`, in order, with no lock held.
    pub(crate) fn apply(&self, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Invalidate(port, request) => port.invalidate(request),
                Effect::PageResponse(port, response) => port.page_response(response),
                Effect::Interrupt((addr, data)) => self.events.interrupt_message(addr, data),
                Effect::FaultEvent => self.faults.queue_error_event(&*self.events),
                Effect::Completed(latency) => self.events.device_tlb_completed(latency),
            }
        }
    }

    /// How many times the invalidation queue has completed a wait descriptor or stopped on
    /// an error. Read it before checking a status word, then pass it to
    /// [`Unit::wait_for_queue_progress`].
    pub fn queue_progress(&self) -> u64 {
        *self.queue_progress.count.lock()
    }

    /// Sleeps until the queue progress differs from `seen` or `timeout` passes (what an
    /// invalidation-completion interrupt gives a real driver, without the interrupt).
    /// Returns the current progress.
    pub fn wait_for_queue_progress(&self, seen: u64, timeout: Duration) -> u64 {
        let mut count = self.queue_progress.count.lock();
        if *count == seen {
            let _ = self.queue_progress.changed.wait_for(&mut count, timeout);
        }
        *count
    }
}
