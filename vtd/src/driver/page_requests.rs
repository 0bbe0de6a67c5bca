//! Page requests, the driver's side (VT-d 7.5-7.6; Linux `drivers/iommu/intel/prq.c`):
//! the page request queue's memory, draining it through PQH, PQT, PRS and host memory, and
//! answering page groups.
//!
//! Owns, per unit, one 4 KiB queue (PQA.PQS = 0: 128 descriptors of 32 bytes) taken from
//! the table region for the driver's life, and the page request event programming (PEDATA with a
//! caller-chosen vector, unmasked), which is how the embedder learns that requests are
//! waiting.
//!
//! Draining follows Linux `prq_event_thread`: clear PRS.PPR first (a request that lands
//! after PQT is read then raises a new event), read PQT and PQH, read the descriptors
//! between them from host memory, write PQH = PQT, and if PRS.PRO is set clear it once the
//! queue reads empty. Unlike Linux, a descriptor that cannot be read or decoded fails the
//! drain and leaves PQH where it was, so nothing is consumed. Drains are serialized by the
//! queue's lock, as Linux runs one handler thread per unit.

use super::Driver;
use super::driven::Driven;
use super::error::DriverError;
use super::invalidate::Invalidation;
use crate::ats::MAX_PRG_INDEX;
use crate::ids::{Hpa, SourceId, UnitId};
use crate::unit::INTERRUPT_RANGE_BASE;
use crate::unit::IotlbInvalidation;
use crate::unit::interrupt::IecInvalidation;
use crate::unit::invalidation::descriptor::{Descriptor, QueueErrorCode, decode};
use crate::unit::memory::HostMemory;
use crate::unit::prq::{DESCRIPTOR_SIZE, PageGroupResponse, PageRequest, QueueAddress, ResponseCode};
use crate::unit::regs::{self, MAMV, prs};

/// PQA.PQS of the driver's queue: one 4 KiB page.
const PQS: u8 = 0;

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
    /// Sets up the page request queue of every driven unit
    /// ([`Driver::enable_page_requests_on`] each, in order; stops at the first failure).
    /// Every unit sends its events with the same message data.
    pub fn enable_page_requests(&self, vector: u32) -> Result<(), DriverError> {
        self.units.iter().try_for_each(|u| self.enable_page_requests_on(u.id, vector))
    }

    /// Sets up unit `unit`'s page request queue and unmasks its page request event with
    /// message data `vector` (sent to the unit's event subscribers), as Linux
    /// `intel_iommu_enable_prq` does: PQH = PQT = 0, then PQA. Needs queued invalidation,
    /// which carries the responses.
    pub fn enable_page_requests_on(&self, unit: UnitId, vector: u32) -> Result<(), DriverError> {
        let u = self.driven(unit)?;
        u.enable_once(&self.frames, &u.prq, |queue| {
            let pqa = QueueAddress::new(queue, PQS).map_err(|e| DriverError::PageRequestQueue(e.to_string()))?;
            u.regs.write64(regs::PQH, 0)?;
            u.regs.write64(regs::PQT, 0)?;
            u.regs.write64(regs::PQA, pqa.to_bits())?;
            u.regs.write32(regs::PEDATA, vector)?;
            u.regs.write32(regs::PEADDR, INTERRUPT_RANGE_BASE as u32)?;
            u.regs.write32(regs::PECTL, 0)
        })
    }

    /// Takes every request waiting in the page request queue of every unit that has one
    /// enabled: each unit's oldest first, units in order (a request's unit is
    /// [`Driver::unit_of`] its requester id; [`Driver::respond_page_request`] routes the
    /// same way). [`DriverError::PageRequestsDisabled`] when no unit has its queue on.
    ///
    /// A unit whose drain fails consumed nothing (see the module rules): when other units
    /// drained requests, those are returned and the failure is logged, so none of them is
    /// lost; else the failure is returned.
    pub fn drain_page_requests(&self) -> Result<Vec<PageRequest>, DriverError> {
        Ok(self.drain_page_requests_by_unit()?.into_iter().map(|(_, r)| r).collect())
    }

    /// [`Driver::drain_page_requests`], each request with the unit whose queue held it.
    pub fn drain_page_requests_by_unit(&self) -> Result<Vec<(UnitId, PageRequest)>, DriverError> {
        let mut requests = Vec::new();
        let mut failure = None;
        let mut enabled = false;
        for u in &self.units {
            match u.drain_page_requests(&self.memory) {
                Ok(r) => {
                    enabled = true;
                    requests.extend(r.into_iter().map(|r| (u.id, r)));
                }
                Err(DriverError::PageRequestsDisabled) => {}
                Err(e) => {
                    enabled = true;
                    tracing::warn!(unit = %u.id, error = %e, "page request queue not drained");
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) if requests.is_empty() => Err(e),
            _ if !enabled => Err(DriverError::PageRequestsDisabled),
            _ => Ok(requests),
        }
    }

    /// Takes every request waiting in unit `unit`'s page request queue, oldest first (Linux
    /// `prq_event_thread`; see the module rules).
    pub fn drain_page_requests_on(&self, unit: UnitId) -> Result<Vec<PageRequest>, DriverError> {
        self.driven(unit)?.drain_page_requests(&self.memory)
    }

    /// Answers page request group `prgi` of `sid` with a page group response descriptor
    /// through the invalidation queue of the unit `sid` routes to (VT-d 7.6): the unit that
    /// received the requests; returns once the unit has sent it.
    pub fn respond_page_request(&self, sid: SourceId, prgi: u16, code: ResponseCode) -> Result<(), DriverError> {
        let u = self.driven_for(sid)?;
        if u.prq.lock().is_none() {
            return Err(DriverError::PageRequestsDisabled);
        }
        let [qw0, qw1] = PageGroupResponse { sid, prgi: prgi & MAX_PRG_INDEX, code }.to_descriptor();
        u.invalidate(&[Invalidation::Raw(qw0, qw1)])
    }

    /// [`Driver::submit_descriptors_on`] the first unit.
    pub fn submit_descriptors(&self, descs: &[(u64, u64)]) -> Result<(), DriverError> {
        self.submit_descriptors_on(self.first().id, descs)
    }

    /// Submits software's own invalidation descriptors to unit `unit`'s queue, then a
    /// wait, and returns once they have completed. Each is checked first (reserved bits,
    /// known type, the unit's limits): a malformed one is refused without touching the
    /// queue.
    pub fn submit_descriptors_on(&self, unit: UnitId, descs: &[(u64, u64)]) -> Result<(), DriverError> {
        let u = self.driven(unit)?;
        if !u.invalidator.is_queued() {
            return Err(DriverError::QueueDisabled);
        }
        let mut batch = Vec::with_capacity(descs.len());
        for &(qw0, qw1) in descs {
            let invalid = |why: String| DriverError::InvalidDescriptor { qw0, qw1, why };
            match decode(qw0, qw1).map_err(|code| invalid(describe(code).to_owned()))? {
                Descriptor::Iotlb(IotlbInvalidation::Page { am, .. }) if u64::from(am) > MAMV => {
                    return Err(invalid(format!("address mask {am} exceeds MAMV {MAMV}")));
                }
                // VT-d 6.5.2.7: IM must not exceed ECAP.MHMV.
                Descriptor::Iec(IecInvalidation::Index { index_mask, .. }) if index_mask > u.caps.max_handle_mask => {
                    return Err(invalid(format!("index mask {index_mask} exceeds MHMV {}", u.caps.max_handle_mask)));
                }
                Descriptor::PageGroupResponse(..) => {
                    PageGroupResponse::from_descriptor([qw0, qw1]).map_err(|e| invalid(e.to_string()))?;
                }
                _ => {}
            }
            batch.push(Invalidation::Raw(qw0, qw1));
        }
        u.invalidate(&batch)
    }
}

impl Driven {
    /// Drains this unit's page request queue (see the module rules).
    fn drain_page_requests(&self, memory: &HostMemory) -> Result<Vec<PageRequest>, DriverError> {
        let prq = self.prq.lock();
        let base = (*prq).ok_or(DriverError::PageRequestsDisabled)?;
        // Byte offsets of whole descriptors inside the queue (Linux `PRQ_RING_MASK`).
        let bytes = QueueAddress::new(base, PQS).map_err(|e| DriverError::PageRequestQueue(e.to_string()))?.bytes();
        let mask = (bytes - 1) & !(DESCRIPTOR_SIZE - 1);
        // Clear PPR before reading the tail, so that a request added after the read
        // raises a new event.
        self.regs.write32(regs::PRS, prs::PPR)?;
        let tail = self.regs.read64(regs::PQT)? & mask;
        let mut head = self.regs.read64(regs::PQH)? & mask;
        let mut requests = Vec::with_capacity((((tail + bytes - head) & mask) / DESCRIPTOR_SIZE) as usize);
        while head != tail {
            requests.push(read_page_request(memory, base, head)?);
            head = (head + DESCRIPTOR_SIZE) & mask;
        }
        self.regs.write64(regs::PQH, tail)?;
        // Overflow: requests were dropped, and groups seen only in part will never
        // complete. PRO is cleared only once the queue is empty (no request is written
        // while it is set, so it stays empty until then).
        if self.regs.read32(regs::PRS)? & prs::PRO != 0 {
            let head = self.regs.read64(regs::PQH)? & mask;
            let tail = self.regs.read64(regs::PQT)? & mask;
            if head == tail {
                self.regs.write32(regs::PRS, prs::PRO)?;
                tracing::debug!(unit = %self.id, "page request queue overflow cleared");
            }
        }
        Ok(requests)
    }
}

/// Reads and decodes the page request descriptor at byte `offset` of the queue at `base`
/// (VT-d 7.5.1).
fn read_page_request(memory: &HostMemory, base: Hpa, offset: u64) -> Result<PageRequest, DriverError> {
    let unreadable =
        || DriverError::PageRequestQueue(format!("page request queue entry at offset {offset:#x} cannot be read"));
    let mut desc = [0u64; 4];
    for (i, word) in desc.iter_mut().enumerate() {
        let at = base.checked_add(offset + 8 * i as u64).ok_or_else(unreadable)?;
        *word = memory.read_u64(at).map_err(|_| unreadable())?;
    }
    PageRequest::from_descriptor(desc).map_err(|e| {
        tracing::debug!(offset, error = %e, "malformed page request descriptor");
        DriverError::PageRequestQueue(format!("page request queue entry at offset {offset:#x} is malformed"))
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::driver::DomainKind;
    use crate::unit::prq::PageRequest;
    use crate::unit::tables::AddressWidth;
    use crate::unit::{NoEvents, PageRequestOutcome};

    const MEMORY: u64 = 64 << 20;
    const SID: SourceId = SourceId::new(0, 3, 0);

    fn driver() -> Driver {
        let d = crate::testing::driver(MEMORY, Arc::new(NoEvents));
        d.enable_page_requests(0x60).unwrap();
        let did = d.create_domain(DomainKind::Paging, AddressWidth::Aw48).unwrap();
        d.attach(SID, did, true).unwrap();
        d
    }

    fn request(n: u64, last: bool) -> PageRequest {
        PageRequest {
            sid: SID,
            addr: crate::ids::Iova(n << 12),
            read: true,
            write: false,
            prgi: (n % 512) as u16,
            last,
            private_data: None,
        }
    }

    fn prs(d: &Driver) -> u32 {
        d.unit().read32(regs::PRS).unwrap()
    }

    #[test]
    fn drains_through_the_registers_and_clears_ppr() {
        let d = driver();
        assert_eq!(d.drain_page_requests(), Ok(vec![]));
        let sent: Vec<PageRequest> = (0..5).map(|n| request(n, n == 4)).collect();
        for r in &sent {
            assert_eq!(d.unit().page_request(*r), Ok(PageRequestOutcome::Queued));
        }
        assert_eq!(prs(&d), prs::PPR);
        assert_eq!(d.drain_page_requests(), Ok(sent));
        assert_eq!(prs(&d), 0);
        let (head, tail) = (d.unit().read64(regs::PQH).unwrap(), d.unit().read64(regs::PQT).unwrap());
        assert_eq!((head, tail), (5 * DESCRIPTOR_SIZE, 5 * DESCRIPTOR_SIZE));
    }

    #[test]
    fn an_overflow_is_cleared_once_the_queue_is_empty() {
        let d = driver();
        // 128 entries, one always free.
        for n in 0..127 {
            assert_eq!(d.unit().page_request(request(n, false)), Ok(PageRequestOutcome::Queued));
        }
        assert_eq!(d.unit().page_request(request(200, true)), Ok(PageRequestOutcome::Dropped));
        assert_eq!(prs(&d), prs::PPR | prs::PRO);
        assert_eq!(d.drain_page_requests().map(|r| r.len()), Ok(127));
        assert_eq!(prs(&d), 0, "PRO cleared with the queue empty");
        assert_eq!(d.unit().page_request(request(1, true)), Ok(PageRequestOutcome::Queued));
        assert_eq!(d.drain_page_requests(), Ok(vec![request(1, true)]));
    }

    #[test]
    fn a_malformed_entry_fails_the_drain_and_consumes_nothing() {
        let d = driver();
        let base = d.first().prq.lock().unwrap();
        assert!(d.unit().page_request(request(0, false)).is_ok());
        assert!(d.unit().page_request(request(1, true)).is_ok());
        // Software scribbles over the second entry.
        d.unit().memory().write_u64(Hpa(base.0 + DESCRIPTOR_SIZE), 0x7).unwrap();
        let Err(DriverError::PageRequestQueue(why)) = d.drain_page_requests() else { panic!("drained") };
        assert_eq!(why, "page request queue entry at offset 0x20 is malformed");
        assert_eq!(d.unit().read64(regs::PQH).unwrap(), 0, "PQH did not move");
        // Once software repairs it, the drain goes through.
        let good = request(1, true).to_descriptor();
        d.unit().memory().write_u64(Hpa(base.0 + DESCRIPTOR_SIZE), good[0]).unwrap();
        assert_eq!(d.drain_page_requests(), Ok(vec![request(0, false), request(1, true)]));
    }

    #[test]
    fn a_raw_wait_the_unit_cannot_complete_is_the_callers_error() {
        use crate::unit::invalidation::descriptor::{WaitDesc, encode};
        let d = driver();
        let wait = |status_addr| {
            encode::wait(WaitDesc { interrupt: false, status_write: true, fence: true, status_data: 7, status_addr })
        };
        // The status address is beyond memory: the unit stops the queue (IQE, IQEI 2).
        let bad = wait(MEMORY + 0x1000);
        let Err(DriverError::InvalidDescriptor { qw0, qw1, why }) = d.submit_descriptors(&[bad]) else {
            panic!("accepted")
        };
        assert_eq!((qw0, qw1), bad);
        assert!(why.contains("invalidation queue error 2"), "{why}");
        // The queue runs on.
        assert_eq!(d.submit_descriptors(&[wait(0x1000)]), Ok(()));
        assert_eq!(d.unit().memory().read_u64(Hpa(0x1000)).map(|v| v as u32), Ok(7));
    }

    #[test]
    fn page_requests_need_enabling() {
        let d = crate::testing::driver(MEMORY, Arc::new(NoEvents));
        assert_eq!(d.drain_page_requests(), Err(DriverError::PageRequestsDisabled));
        assert_eq!(d.respond_page_request(SID, 1, ResponseCode::Success), Err(DriverError::PageRequestsDisabled));
    }
}
