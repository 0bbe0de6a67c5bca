//! Invalidation (VT-d 6.5): how software tells the unit that its caches may hold stale
//! entries, through the registers or the invalidation queue, and how device-TLB
//! invalidations reach the devices.
//!
//! - `caches`: what an invalidation does to the context cache, IOTLB and
//!   paging-structure caches (VT-d 6.5.1).
//! - `registers`: register-based invalidation, CCMD and IVA/IOTLB_REG (VT-d 10.4.7, 10.4.8).
//! - `queue`: the invalidation queue, its registers (IQA, IQH, IQT, ICS, the invalidation
//!   event, IQERCD, FSTS.IQE/ICE/ITE) and in-order descriptor processing (VT-d 6.5.2).
//! - [`descriptor`]: the 128-bit descriptor layouts, decoding and encoders.
//! - `ports`: device ports, ITag accounting and device-TLB invalidation time-outs.
//! - `doorbell`: the invalidation doorbell, dmar's documented stand-in for the invalidation
//!   completion event, which the driver model sleeps on between polls of its status word.
//!
//! Not here: the page request queue and the admission of page requests (`unit::prq`;
//! page group response descriptors are fetched by the queue, decoded there), the fault
//! recording registers (`unit::fault`), and the register dispatch (`unit::mmio`).
//!
//! Everything that leaves the unit while the queue runs (requests to device ports,
//! interrupt messages, the fault event, the doorbell) is collected as `Effects` under the
//! queue lock and carried out by `Unit::apply` after it is released, so a port may answer
//! synchronously from inside its call.

mod caches;
pub mod descriptor;
mod doorbell;
mod ports;
mod queue;
mod registers;

use std::sync::Arc;
use std::time::Duration;

pub use caches::{ContextInvalidation, IotlbInvalidation};
pub use doorbell::InvalidationDoorbell;
pub use ports::{DeviceInvalidation, DevicePort, PortError, UnexpectedCompletion};
pub(crate) use queue::QueueState;

use super::Unit;
use super::event::{EventSource, Message};
use super::prq::PageGroupResponse;

/// Work to do once the queue lock is released: calls into ports and event subscribers
/// never happen under it, so a port may complete synchronously.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Send an ATS invalidation request to a device.
    Invalidate(Arc<dyn DevicePort>, DeviceInvalidation),
    /// Send a page group response to a device.
    PageResponse(Arc<dyn DevicePort>, PageGroupResponse),
    /// Send the invalidation completion event's message.
    Interrupt(Message),
    /// A device-TLB invalidation completed after this long.
    Completed(Duration),
    /// A queue error was newly set while no other error was pending: raise the fault event.
    FaultEvent,
}

/// The effects collected under the queue lock, and whether the doorbells must ring (a wait
/// descriptor completed or the queue stopped on an error). Ringing is a flag, not an
/// [`Effect`], so that a queue run that only completes a wait allocates nothing.
#[derive(Debug, Default)]
pub(crate) struct Effects {
    items: Vec<Effect>,
    ring: bool,
}

impl Effects {
    /// Queues `effect`, to be carried out in order.
    pub(crate) fn push(&mut self, effect: Effect) {
        self.items.push(effect);
    }

    /// Rings the doorbells once everything else is done.
    pub(crate) fn ring(&mut self) {
        self.ring = true;
    }
}

impl Unit {
    /// Carries out `effects`, in order, with no lock held; the doorbells ring last.
    pub(crate) fn apply(&self, effects: Effects) {
        for e in effects.items {
            match e {
                Effect::Invalidate(port, request) => port.invalidate(request),
                Effect::PageResponse(port, response) => port.page_response(response),
                Effect::Interrupt((addr, data)) => {
                    self.events.interrupt_message(EventSource::InvalidationCompletion, addr, data)
                }
                Effect::FaultEvent => self.faults.queue_error_event(&*self.events),
                Effect::Completed(latency) => self.events.device_tlb_completed(latency),
            }
        }
        if effects.ring {
            self.ring_doorbells();
        }
    }
}
