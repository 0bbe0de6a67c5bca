//! Page requests, the driver's side (VT-d 7.5-7.6; Linux `drivers/iommu/intel/prq.c`):
//! the page request queue's memory, draining it, and answering page groups.
//!
//! Owns one 4 KiB queue (PQA.PQS = 0: 128 descriptors of 32 bytes) taken from the table
//! region for the driver's life, and the page request event programming (PEDATA with a
//! caller-chosen vector, unmasked), which is how the embedder learns that requests are
//! waiting.

use super::Driver;
use super::error::DriverError;
use super::invalidate::Invalidation;
use crate::ids::SourceId;
use crate::unit::invalidation::IotlbInvalidation;
use crate::unit::invalidation::descriptor::{Descriptor, QueueErrorCode, decode};
use crate::unit::prq::{PageGroupResponse, PageRequest, QueueAddress, ResponseCode};
use crate::unit::regs::{self, MAMV};
use crate::unit::request::INTERRUPT_RANGE_BASE;

fn describe(code: QueueErrorCode) -> &'static str {
    match code {
        QueueErrorCode::InvalidTail => "invalid tail",
        QueueErrorCode::FetchError => "cannot be fetched",
        QueueErrorCode::InvalidType => "unknown or unsupported descriptor type",
        QueueErrorCode::ReservedFields => "reserved fields set",
        QueueErrorCode::InvalidWidth => "invalid descriptor width",
    }
}

impl Driver {
    /// Sets up the page request queue and unmasks the page request event with message
    /// data `vector` (sent to the unit's event subscribers). Needs queued invalidation,
    /// which carries the responses.
    pub fn enable_page_requests(&self, vector: u32) -> Result<(), DriverError> {
        if !self.invalidator.is_queued() {
            return Err(DriverError::QueueDisabled);
        }
        let mut prq_on = self.prq.lock();
        if *prq_on {
            return Ok(());
        }
        let queue = self.frames.alloc()?;
        let pqa = QueueAddress::new(queue, 0).map_err(|e| DriverError::PageRequestQueue(e.to_string()))?;
        self.regs.write64(regs::PQH, 0)?;
        self.regs.write64(regs::PQA, pqa.to_bits())?;
        self.regs.write32(regs::PEDATA, vector)?;
        self.regs.write32(regs::PEADDR, INTERRUPT_RANGE_BASE as u32)?;
        self.regs.write32(regs::PECTL, 0)?;
        *prq_on = true;
        Ok(())
    }

    /// Takes every request waiting in the page request queue (Linux `prq_event_thread`).
    pub fn drain_page_requests(&self) -> Result<Vec<PageRequest>, DriverError> {
        if !*self.prq.lock() {
            return Err(DriverError::PageRequestsDisabled);
        }
        self.unit
            .page_request_queue()
            .drain(&self.memory)
            .map(|d| d.requests)
            .map_err(|e| DriverError::PageRequestQueue(e.to_string()))
    }

    /// Answers page request group `prgi` of `sid` with a page group response descriptor
    /// through the invalidation queue (VT-d 7.6); returns once the unit has sent it.
    pub fn respond_page_request(&self, sid: SourceId, prgi: u16, code: ResponseCode) -> Result<(), DriverError> {
        if !*self.prq.lock() {
            return Err(DriverError::PageRequestsDisabled);
        }
        let [qw0, qw1] = PageGroupResponse { sid, prgi: prgi & 0x1ff, code }.to_descriptor();
        self.invalidator.run(&self.regs, &[Invalidation::Raw(qw0, qw1)])
    }

    /// Submits software's own invalidation descriptors, then a wait, and returns once they
    /// have completed. Each is checked first (reserved bits, known type): a malformed one
    /// is refused without touching the queue.
    pub fn submit_descriptors(&self, descs: &[(u64, u64)]) -> Result<(), DriverError> {
        if !self.invalidator.is_queued() {
            return Err(DriverError::QueueDisabled);
        }
        let mut batch = Vec::with_capacity(descs.len());
        for &(qw0, qw1) in descs {
            let invalid = |why: String| DriverError::InvalidDescriptor { qw0, qw1, why };
            match decode(qw0, qw1).map_err(|code| invalid(describe(code).to_owned()))? {
                Descriptor::Iotlb(IotlbInvalidation::Page { am, .. }) if u64::from(am) > MAMV => {
                    return Err(invalid(format!("address mask {am} exceeds MAMV {MAMV}")));
                }
                Descriptor::PageGroupResponse(..) => {
                    PageGroupResponse::from_descriptor([qw0, qw1]).map_err(|e| invalid(e.to_string()))?;
                }
                _ => {}
            }
            batch.push(Invalidation::Raw(qw0, qw1));
        }
        self.invalidator.run(&self.regs, &batch)
    }
}
