//! Page request admission: a device's page request (PCIe PRI) as the unit accepts it from
//! the PCIe side, before it reaches the page request queue (VT-d 7.5).
//!
//! Owns the check that the requester may issue page requests (its context entry must
//! enable device TLBs, TT=01b: PRI goes with ATS) and the delivery of what the queue
//! returns: the page request event to the unit's subscribers, and the response the hardware
//! owes a dropped group to the function's device port. The queue rules themselves are
//! `queue`'s.

use super::PageRequest;
use crate::ids::SourceId;
use crate::unit::Unit;
use crate::unit::event::EventSource;
use crate::unit::tables::TranslationType;

/// Why a page request was not accepted from a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PageRequestError {
    /// The function's context does not allow ATS (and so PRI): TT must be 01b.
    #[error("requester id {0} may not issue page requests: its context does not enable device TLBs")]
    NotAllowed(SourceId),
}

/// What became of an accepted page request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageRequestOutcome {
    /// Written to the page request queue.
    Queued,
    /// Dropped: the queue overflowed (an owed response was sent to the device).
    Dropped,
}

impl Unit {
    /// A device's page request (PCIe PRI, VT-d 7.5). Accepted only from functions whose
    /// context entry enables device TLBs (TT=01b); queued in the page request queue, with
    /// the page request event, or dropped on overflow with the response the hardware owes
    /// sent to the function's port.
    pub fn page_request(&self, req: PageRequest) -> Result<PageRequestOutcome, PageRequestError> {
        let allowed = self.translation_enabled()
            && self.context(req.sid, self.current_epoch()).is_ok_and(|c| c.tt == TranslationType::DeviceTlb);
        if !allowed {
            return Err(PageRequestError::NotAllowed(req.sid));
        }
        let submitted = self.prq.submit(&self.memory, req);
        if let Some((addr, data)) = submitted.event() {
            self.events.interrupt_message(EventSource::PageRequest, addr, data);
        }
        if let Some(r) = submitted.response()
            && let Some(port) = self.device_port(r.sid)
        {
            port.page_response(r);
        }
        Ok(if submitted.is_queued() { PageRequestOutcome::Queued } else { PageRequestOutcome::Dropped })
    }
}
