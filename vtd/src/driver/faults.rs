//! Fault handling, the driver's side (VT-d 7.2-7.3, 10.4.9-10.4.14; Linux `dmar_fault`,
//! `dmar_set_interrupt`, `dmar_msi_write` in `drivers/iommu/intel/dmar.c`): programming the
//! fault event, and servicing the fault recording registers when it fires.
//!
//! Owns, per unit, the fault event registers (FECTL, FEDATA, FEADDR, FEUADDR), which the
//! driver programs once with a caller-chosen vector and unmasks, and the fault half of FSTS (PPF,
//! PFO, FRI) with the fault recording registers, which it reads and clears. The queue error
//! bits of FSTS (IQE, ICE, ITE) belong to the invalidation queue (`queue`): servicing faults
//! never clears them.
//!
//! Servicing follows Linux `dmar_fault`, under the register lock: read FSTS; if PPF is set,
//! read the register at FRI and the ones after it, wrapping at CAP.NFR + 1, while their F
//! bit is set, clearing each F (write 1, RW1C) once it is read; then write FSTS with PFO and
//! PPF (PPF is read-only and recomputed from the F bits; PFO is RW1C). Two differences,
//! both so that a fast producer cannot wedge the handler or silence the event: one pass
//! reads at most CAP.NFR + 1 registers (a caller services again while a pass finds
//! faults), and a PFO that is set without PPF is cleared too (Linux clears it only when PPF
//! was set; a lone PFO would hold back every later fault event).
//!
//! The unit raises the fault event only when PPF, PFO and the queue errors were all clear
//! (VT-d 7.3), so faults recorded while software is servicing raise none: the caller
//! services again until a pass finds nothing, and may poll [`Driver::faults_pending`] on a
//! timer as a backstop. Faults the unit could not record because the registers were full
//! are lost by design (FSTS.PFO); the unit counts them (`UnitStats::faults_overflowed`).

use super::Driver;
use super::driven::Driven;
use super::error::DriverError;
use crate::ids::{Pasid, UnitId};
use crate::unit::regs::{self, frcd, fsts};
use crate::unit::{FaultRecord, INTERRUPT_RANGE_BASE};

/// One fault as the driver's fault handler reports it (Linux `dmar_fault_do_one`'s
/// arguments): the unit that recorded it, the record, and the PASID when the request
/// carried one (FRCD.PP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultReport {
    /// The unit whose fault recording registers held it.
    pub unit: UnitId,
    /// Reason, requester, address, access and address type.
    pub record: FaultRecord,
    /// FRCD.PV when FRCD.PP is set. dmar's unit runs in legacy mode and never records one.
    pub pasid: Option<Pasid>,
}

impl Driver {
    /// Programs and unmasks the fault event of every driven unit
    /// ([`Driver::enable_fault_events_on`] each, in order; stops at the first failure).
    pub fn enable_fault_events(&self, vector: u32) -> Result<(), DriverError> {
        self.units.iter().try_for_each(|u| self.enable_fault_events_on(u.id, vector))
    }

    /// Programs unit `unit`'s fault event with message data `vector` at the interrupt
    /// address range and unmasks it (Linux `dmar_set_interrupt`: `dmar_msi_write`, then
    /// `dmar_msi_unmask`). A fault recorded before this call holds FECTL.IP, so unmasking
    /// sends its event at once (VT-d 10.4.10). Unlike Linux's boot path, FSTS is not
    /// cleared wholesale: its queue error bits belong to the invalidation queue.
    pub fn enable_fault_events_on(&self, unit: UnitId, vector: u32) -> Result<(), DriverError> {
        let u = self.driven(unit)?;
        let _g = u.regs.lock();
        u.regs.write32(regs::FEDATA, vector)?;
        u.regs.write32(regs::FEADDR, INTERRUPT_RANGE_BASE as u32)?;
        u.regs.write32(regs::FEUADDR, 0)?;
        u.regs.write32(regs::FECTL, 0)?;
        // Read back, as Linux `dmar_msi_unmask` does to flush the posted write.
        u.regs.read32(regs::FECTL)?;
        Ok(())
    }

    /// Services the fault recording registers of every driven unit once
    /// ([`Driver::service_faults_on`] each, in order) and returns the faults read, each
    /// unit's oldest first. A unit that fails is logged and skipped (the others' faults are
    /// cleared from their registers: returning an error would lose them); its error is
    /// returned only when no unit reported a fault.
    pub fn service_faults(&self) -> Result<Vec<FaultReport>, DriverError> {
        let mut reports = Vec::new();
        let mut failure = None;
        for u in &self.units {
            match u.service_faults() {
                Ok(mut r) => reports.append(&mut r),
                Err(e) => {
                    tracing::warn!(unit = %u.id, error = %e, "fault recording registers not serviced");
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) if reports.is_empty() => Err(e),
            _ => Ok(reports),
        }
    }

    /// Services unit `unit`'s fault recording registers once (see the module rules) and
    /// returns the faults read, oldest first. An empty result means FSTS showed no pending
    /// fault.
    pub fn service_faults_on(&self, unit: UnitId) -> Result<Vec<FaultReport>, DriverError> {
        self.driven(unit)?.service_faults()
    }

    /// Whether any driven unit's FSTS shows a pending fault (PPF) or an overflow (PFO):
    /// register reads that never wait, for an owner's timer that backs up the fault event.
    pub fn faults_pending(&self) -> Result<bool, DriverError> {
        for u in &self.units {
            if u.faults_pending()? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether unit `unit`'s FSTS shows a pending fault (PPF) or an overflow (PFO).
    pub fn faults_pending_on(&self, unit: UnitId) -> Result<bool, DriverError> {
        self.driven(unit)?.faults_pending()
    }
}

impl Driven {
    /// One servicing pass over this unit's fault recording registers (module rules).
    fn service_faults(&self) -> Result<Vec<FaultReport>, DriverError> {
        let _g = self.regs.lock();
        let status = self.regs.read32(regs::FSTS)?;
        let mut reports = Vec::new();
        if status & (fsts::PPF | fsts::PFO) == 0 {
            return Ok(reports);
        }
        if status & fsts::PPF != 0 {
            let count = self.caps.fault_records;
            let mut index = ((status >> fsts::FRI_SHIFT) & 0xff) as usize % count;
            for _ in 0..count {
                let at = self.caps.fault_record_offset + (index as u64) * regs::FRCD_BYTES;
                let hi = self.regs.read64(at + 8)?;
                if hi & frcd::F == 0 {
                    break;
                }
                let lo = self.regs.read64(at)?;
                match FaultRecord::from_frcd(lo, hi) {
                    Ok(record) => reports.push(FaultReport { unit: self.id, record, pasid: pasid(hi) }),
                    // Cleared all the same, or the register would stay full for good.
                    Err(e) => tracing::debug!(index, error = %e, "fault recording register not understood"),
                }
                // VT-d 10.4.14: F is RW1C.
                self.regs.write32(at + frcd::F_DWORD, (frcd::F >> 32) as u32)?;
                index = (index + 1) % count;
            }
        }
        if status & fsts::PFO != 0 {
            tracing::debug!(unit = %self.id, "fault recording registers overflowed: faults were lost");
        }
        // VT-d 10.4.9: PFO is RW1C; PPF is read-only (written as Linux does, to no effect).
        self.regs.write32(regs::FSTS, fsts::PFO | fsts::PPF)?;
        Ok(reports)
    }

    fn faults_pending(&self) -> Result<bool, DriverError> {
        Ok(self.regs.read32(regs::FSTS)? & (fsts::PPF | fsts::PFO) != 0)
    }
}

/// FRCD.PV when FRCD.PP is set (`hi` is the register's high quadword).
fn pasid(hi: u64) -> Option<Pasid> {
    (hi & frcd::PP != 0).then_some(Pasid(((hi >> frcd::PV_SHIFT) & frcd::PV_MASK) as u32))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::driver::DomainKind;
    use crate::ids::{Iova, SourceId};
    use crate::unit::tables::AddressWidth;
    use crate::unit::{Direction, EventSource, FaultReason, RequestKind, UnitEvents};

    const VECTOR: u32 = 0x46;
    const SID: SourceId = SourceId::new(0, 5, 0);

    /// Counts fault event messages.
    #[derive(Debug, Default)]
    struct FaultEvents(AtomicUsize);
    impl UnitEvents for FaultEvents {
        fn interrupt_message(&self, source: EventSource, addr: u64, data: u32) {
            if source == EventSource::Fault && data == VECTOR && addr == INTERRUPT_RANGE_BASE {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// A driver with fault events on, and `SID` attached to an empty paging domain, so
    /// every DMA from it faults.
    fn driver() -> (Driver, Arc<FaultEvents>) {
        let events = Arc::new(FaultEvents::default());
        let d = crate::testing::driver(64 << 20, events.clone());
        d.enable_fault_events(VECTOR).unwrap();
        let did = d.create_domain(DomainKind::Paging, AddressWidth::Aw48).unwrap();
        d.attach(SID, did, false).unwrap();
        (d, events)
    }

    /// A read of page `n` from `SID`, which faults.
    fn fault(d: &Driver, n: u64) {
        assert!(d.unit().dma_read(SID, Iova(n << 12), &mut [0; 8]).is_err());
    }

    fn expected(n: u64) -> FaultReport {
        let record = FaultRecord {
            reason: FaultReason::NoRead,
            sid: SID,
            addr: n << 12,
            access: Direction::Read,
            kind: RequestKind::Untranslated,
        };
        FaultReport { unit: UnitId(0), record, pasid: None }
    }

    fn fsts(d: &Driver) -> u32 {
        d.unit().read32(regs::FSTS).unwrap()
    }

    #[test]
    fn every_fault_is_reported_when_each_event_is_serviced() {
        let (d, events) = driver();
        let mut reports = Vec::new();
        let mut serviced = 0;
        for n in 0..1000 {
            fault(&d, n);
            // What the fault interrupt's handler does when the event arrives.
            if events.0.load(Ordering::SeqCst) > serviced {
                serviced += 1;
                reports.extend(d.service_faults().unwrap());
            }
        }
        assert_eq!(serviced, 1000, "one event per fault: each found the registers clear");
        assert_eq!(reports, (0..1000).map(expected).collect::<Vec<_>>());
        assert!(d.unit().fault_records().is_empty(), "every FRCD cleared");
        assert_eq!(fsts(&d) & (fsts::PPF | fsts::PFO), 0);
        let stats = d.unit().stats();
        assert_eq!((stats.faults_recorded, stats.faults_overflowed), (1000, 0));
    }

    #[test]
    fn an_overrun_is_counted_cleared_and_the_event_rearmed() {
        let (d, events) = driver();
        let records = d.first().caps.fault_records as u64;
        // Nobody services: the registers fill, later faults overflow, one event in all.
        for n in 0..records + 3 {
            fault(&d, n);
        }
        assert_eq!(events.0.load(Ordering::SeqCst), 1);
        assert_eq!(fsts(&d) & (fsts::PPF | fsts::PFO), fsts::PPF | fsts::PFO);
        assert_eq!(d.unit().stats().faults_overflowed, 3, "the loss is counted");
        assert_eq!(d.service_faults().unwrap(), (0..records).map(expected).collect::<Vec<_>>());
        assert_eq!(fsts(&d) & (fsts::PPF | fsts::PFO), 0, "PFO cleared, every F cleared");
        assert_eq!(d.service_faults().unwrap(), vec![], "nothing left");
        // The next fault finds FSTS clear and raises a new event; the ring goes on from
        // where it was (FRI follows the register written).
        fault(&d, 0x77);
        assert_eq!(events.0.load(Ordering::SeqCst), 2);
        assert_eq!(d.service_faults().unwrap(), vec![expected(0x77)]);
    }

    #[test]
    fn faults_recorded_while_servicing_are_found_by_the_next_pass() {
        let (d, events) = driver();
        fault(&d, 1);
        fault(&d, 2);
        assert!(d.faults_pending().unwrap());
        assert_eq!(d.service_faults().unwrap(), vec![expected(1), expected(2)]);
        assert!(!d.faults_pending().unwrap());
        // A fault while PPF is set raises no event; the backstop sees it pending.
        fault(&d, 3);
        fault(&d, 4);
        assert_eq!(events.0.load(Ordering::SeqCst), 2);
        assert!(d.faults_pending().unwrap());
        assert_eq!(d.service_faults().unwrap(), vec![expected(3), expected(4)]);
    }

    #[test]
    fn a_fault_recorded_before_enabling_is_delivered_by_the_unmask() {
        let events = Arc::new(FaultEvents::default());
        let d = crate::testing::driver(64 << 20, events.clone());
        // No context for SID at all: a root-entry fault, recorded while FECTL.IM is set.
        fault(&d, 9);
        assert_eq!(events.0.load(Ordering::SeqCst), 0, "masked at reset");
        d.enable_fault_events(VECTOR).unwrap();
        assert_eq!(events.0.load(Ordering::SeqCst), 1, "IP was held: unmasking sends it");
        let reports = d.service_faults().unwrap();
        assert_eq!(reports.iter().map(|r| r.record.reason).collect::<Vec<_>>(), [FaultReason::RootEntryNotPresent]);
    }

    #[test]
    fn the_pasid_fields_are_decoded_when_present() {
        assert_eq!(pasid(0), None);
        assert_eq!(pasid(frcd::PP | (0xabcde << frcd::PV_SHIFT)), Some(Pasid(0xabcde)));
        assert_eq!(pasid(0xabcde << frcd::PV_SHIFT), None, "PV means nothing without PP");
    }
}
