//! `Unit::reset`: a unit a driver programmed completely (queued invalidation, translation,
//! interrupt remapping, page requests, fault events) and that recorded faults reads, after
//! the reset, exactly what a freshly built unit reads at every offset of its register
//! window; it then passes DMA through untranslated (TES = 0), its caches are empty, and a
//! driver takes it over again. Outstanding device-TLB invalidations are abandoned, the
//! ports stay bound and the counters keep counting.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use common::{Bell, Messages, Rig};
use dmar_vtd::driver::{AttachOptions, DomainKind, Driver, DriverConfig, Perm};
use dmar_vtd::unit::interrupt::{DeliveryMode, DestinationMode, Trigger, msi_compatibility};
use dmar_vtd::unit::invalidation::descriptor::{WaitDesc, encode};
use dmar_vtd::unit::prq::{PageGroupResponse, PageRequest};
use dmar_vtd::unit::regs::{self, fsts, gcmd};
use dmar_vtd::unit::tables::{AddressWidth, TranslationType};
use dmar_vtd::unit::{
    AtsCompletion, CacheOccupancy, DeviceInvalidation, DevicePort, Direction, EventSource, FaultReason, FaultRecord,
    HostMemory, InvalidationDoorbell, PageRequestOutcome, PortError, Translation, Unit, UnitConfig,
};
use dmar_vtd::{Hpa, Iova, SourceId};
use parking_lot::Mutex;

const MEMORY: u64 = 64 << 20;
/// An ATS function the driver attaches to a paging domain.
const SID: SourceId = SourceId::new(0, 3, 0);
/// A function nobody attaches: its DMA faults while translation is on.
const STRANGER: SourceId = SourceId::new(0, 9, 0);
const FAULT_VECTOR: u32 = 0x46;
const PAGE_REQUEST_VECTOR: u32 = 0x51;
const IOVA: Iova = Iova(0x40_0000);
const TARGET: Hpa = Hpa(0x20_0000);

/// A compatibility-format MSI: vector 0x30, fixed, edge, to APIC 0.
fn compatibility_msi() -> (u64, u32) {
    msi_compatibility(0, 0x30, DeliveryMode::Fixed, Trigger::Edge, DestinationMode::Physical)
}

fn unit(events: Arc<Messages>) -> Arc<Unit> {
    let memory = Arc::new(HostMemory::new(MEMORY).expect("memory"));
    Arc::new(Unit::with_events(UnitConfig::default(), memory, events))
}

/// What software reads at every offset of the window: each aligned doubleword, then each
/// aligned quadword.
fn window(unit: &Unit) -> (Vec<u32>, Vec<u64>) {
    let dwords = (0..regs::WINDOW_SIZE).step_by(4).map(|o| unit.read32(o).expect("read32")).collect();
    let qwords = (0..regs::WINDOW_SIZE).step_by(8).map(|o| unit.read64(o).expect("read64")).collect();
    (dwords, qwords)
}

fn assert_same_window(unit: &Unit, fresh: &Unit) {
    let (d, q) = window(unit);
    let (fd, fq) = window(fresh);
    for (i, (got, want)) in d.iter().zip(&fd).enumerate() {
        assert_eq!(got, want, "32-bit register at {:#05x}", i * 4);
    }
    for (i, (got, want)) in q.iter().zip(&fq).enumerate() {
        assert_eq!(got, want, "64-bit register at {:#05x}", i * 8);
    }
}

/// A driver that has programmed everything it can on `unit`, with `SID` attached through
/// ATS (translated-request checking on) to a domain mapping `IOVA` to `TARGET`.
fn programmed(unit: &Arc<Unit>) -> Driver {
    let driver = Driver::new(unit.clone(), DriverConfig::for_memory(MEMORY)).expect("driver");
    driver.enable_interrupt_remapping().expect("interrupt remapping");
    driver.enable_page_requests(PAGE_REQUEST_VECTOR).expect("page requests");
    driver.enable_fault_events(FAULT_VECTOR).expect("fault events");
    let did = driver.create_domain(DomainKind::Paging, AddressWidth::Aw48).expect("domain");
    driver.attach_with(SID, did, AttachOptions::new(true).with_check_translated(true)).expect("attach");
    driver.map(did, IOVA, TARGET, 0x1000, Perm::RW).expect("map");
    driver
}

/// Leaves as much state behind as a running unit has: cached translations, a grant,
/// a queued page request, recorded faults, a pending invalidation completion event.
fn exercise(unit: &Unit) {
    assert_eq!(unit.translate(SID, IOVA, Direction::Read).map(|t| t.hpa), Ok(TARGET));
    assert!(matches!(unit.ats_translate(SID, IOVA, false), AtsCompletion::Success(e) if e.read));
    assert_eq!(unit.translated_grants(SID), 1);
    let request = PageRequest {
        sid: SID,
        addr: Iova(0x80_0000),
        read: true,
        write: false,
        prgi: 3,
        last: true,
        private_data: None,
    };
    assert_eq!(unit.page_request(request), Ok(PageRequestOutcome::Queued));
    // Faults: DMA from a function with no context, and a compatibility-format interrupt
    // while remapping is on without CFI (0x25).
    for page in 0..3 {
        assert!(unit.dma_read(STRANGER, Iova(page << 12), &mut [0; 4]).is_err());
    }
    let (addr, data) = compatibility_msi();
    assert!(unit.msi_write(STRANGER, addr, data).is_err());
    // The invalidation completion event, programmed but masked: IP stays set.
    unit.write32(regs::IEDATA, 0x61).expect("iedata");
    unit.write32(regs::IEADDR, 0xfee0_1000).expect("ieaddr");
    unit.write32(regs::IEUADDR, 0).expect("ieuaddr");
    unit.write64(regs::IVA, 0x1234_5000).expect("iva");
}

#[test]
fn reset_returns_every_register_to_its_reset_value() {
    let events = Arc::new(Messages::default());
    let unit = unit(events.clone());
    let fresh = unit_like_new();
    let driver = programmed(&unit);
    exercise(&unit);
    assert!(unit.fault_records().len() >= 4, "faults recorded: {:?}", unit.fault_records());
    assert_ne!(unit.cache_occupancy(), CacheOccupancy::default());
    assert_ne!(window(&unit), window(&fresh), "the driver programmed the unit");
    let gsts = unit.read32(regs::GSTS).expect("gsts");
    assert_eq!(
        gsts & (gcmd::TE | gcmd::SRTP | gcmd::QIE | gcmd::IRE | gcmd::SIRTP),
        gcmd::TE | gcmd::SRTP | gcmd::QIE | gcmd::IRE | gcmd::SIRTP
    );
    let stats = unit.stats();
    let messages = events.count();

    unit.reset();

    assert_same_window(&unit, &fresh);
    assert_eq!(unit.read32(regs::GSTS).expect("gsts"), 0, "GSTS: everything off");
    for ctl in [regs::FECTL, regs::IECTL, regs::PECTL] {
        assert_eq!(unit.read32(ctl).expect("ctl"), regs::event::IM, "{ctl:#x}: IM set, IP clear");
    }
    assert_eq!(unit.read32(regs::FSTS).expect("fsts"), 0, "FSTS");
    assert_eq!(unit.read64(regs::CAP).expect("cap"), regs::cap_value(), "CAP is read-only");
    assert_eq!(unit.read64(regs::ECAP).expect("ecap"), regs::ecap_value(), "ECAP is read-only");
    assert_eq!(unit.fault_records(), Vec::<FaultRecord>::new());
    assert_eq!(unit.cache_occupancy(), CacheOccupancy::default(), "caches empty");
    assert!(!unit.translation_enabled());
    assert!(!unit.translated_check(SID), "checking is switched off with the rest");
    assert_eq!(unit.translated_grants(SID), 0);
    assert_eq!(events.count(), messages, "a reset sends no interrupt message");
    // The counters count on across the reset.
    let after = unit.stats();
    assert_eq!(after.faults_recorded, stats.faults_recorded);
    assert_eq!(after.untranslated_ok, stats.untranslated_ok);

    // TES = 0 (VT-d 10.4.5): untranslated requests pass through untranslated, the faulting
    // function's included, and record nothing; translated requests are not checked;
    // translation requests are refused; interrupts are not remapped.
    for sid in [SID, STRANGER] {
        assert_eq!(
            unit.translate(sid, IOVA, Direction::Write),
            Ok(Translation { hpa: Hpa(IOVA.0), page_shift: 12, read: true, write: true })
        );
        assert!(unit.dma_write(sid, Iova(0x30_0000), &[1, 2, 3, 4]).is_ok());
        assert_eq!(unit.ats_translate(sid, IOVA, false), AtsCompletion::UnsupportedRequest);
        assert!(unit.translated_read(sid, Hpa(0x50_0000), &mut [0; 8]).is_ok());
    }
    let (addr, data) = compatibility_msi();
    assert!(unit.msi_write(STRANGER, addr, data).is_ok(), "IRE off: compatibility format passes");
    let request = PageRequest {
        sid: SID,
        addr: Iova(0x80_0000),
        read: true,
        write: false,
        prgi: 4,
        last: true,
        private_data: None,
    };
    assert!(unit.page_request(request).is_err(), "no context: page requests are refused");
    assert_eq!(unit.fault_records(), Vec::<FaultRecord>::new(), "nothing faulted");
    assert_eq!(unit.cache_occupancy(), CacheOccupancy::default(), "nothing cached with translation off");
    drop(driver);
}

/// A unit as `Unit::new` builds it, with the configuration the tests use.
fn unit_like_new() -> Unit {
    Unit::new(UnitConfig::default(), Arc::new(HostMemory::new(MEMORY).expect("memory")))
}

#[test]
fn a_driver_takes_the_reset_unit_over_again() {
    let events = Arc::new(Messages::default());
    let unit = unit(events.clone());
    let old = programmed(&unit);
    exercise(&unit);
    unit.reset();
    drop(old);

    let driver = Driver::new(unit.clone(), DriverConfig::for_memory(MEMORY)).expect("a driver takes the unit over");
    assert!(unit.translation_enabled());
    assert!(driver.queued_invalidation());
    driver.enable_interrupt_remapping().expect("interrupt remapping");
    driver.enable_page_requests(PAGE_REQUEST_VECTOR).expect("page requests");
    driver.enable_fault_events(FAULT_VECTOR).expect("fault events");
    let did = driver.create_domain(DomainKind::Paging, AddressWidth::Aw48).expect("domain");
    driver.attach_with(SID, did, AttachOptions::new(true).with_check_translated(true)).expect("attach");
    let other = Hpa(0x60_0000);
    driver.map(did, IOVA, other, 0x1000, Perm::READ).expect("map");
    assert_eq!(unit.translate(SID, IOVA, Direction::Read).map(|t| t.hpa), Ok(other), "the new tables");
    assert!(unit.translated_check(SID));

    // Faults are recorded and raise the fault event again, unmasked by the new driver.
    let fault_events =
        || -> Vec<u32> { events.0.lock().iter().filter(|m| m.0 == EventSource::Fault).map(|m| m.2).collect() };
    events.0.lock().clear();
    assert!(unit.translate(SID, IOVA, Direction::Write).is_err(), "read-only now");
    let faults = driver.service_faults().expect("service");
    assert_eq!(
        faults.iter().map(|f| (f.record.sid, f.record.reason)).collect::<Vec<_>>(),
        [(SID, FaultReason::NoWrite)]
    );
    assert_eq!(fault_events(), [FAULT_VECTOR]);
    assert!(unit.dma_read(STRANGER, Iova(0), &mut [0; 4]).is_err());
    let faults = driver.service_faults().expect("service");
    assert_eq!(faults.iter().map(|f| f.record.sid).collect::<Vec<_>>(), [STRANGER]);
    assert_eq!(fault_events(), [FAULT_VECTOR, FAULT_VECTOR]);
}

/// A device port that never answers.
#[derive(Debug, Default)]
struct Silent(Mutex<Vec<DeviceInvalidation>>);
impl DevicePort for Silent {
    fn invalidate(&self, request: DeviceInvalidation) {
        self.0.lock().push(request);
    }
    fn page_response(&self, _response: PageGroupResponse) {}
}

#[test]
fn outstanding_device_tlb_invalidations_are_abandoned_and_waiters_woken() {
    const STATUS: Hpa = Hpa(0x80_0000);
    let mut rig = Rig::new();
    rig.enable_queue();
    rig.attach(SID, 5, TranslationType::DeviceTlb, AddressWidth::Aw48);
    let port = Arc::new(Silent::default());
    rig.unit.bind_device_port(SID, port.clone(), 4).expect("bind");
    let bell = Arc::new(Bell::default());
    let weak: Weak<dyn InvalidationDoorbell> = Arc::downgrade(&bell) as Weak<Bell>;
    rig.unit.subscribe_invalidation_doorbell(weak);
    let wait = WaitDesc { interrupt: false, status_write: true, fence: true, status_data: 7, status_addr: STATUS.0 };
    rig.submit(&[encode::device_tlb(SID, 0, Iova(0), 0), encode::wait(wait)]);
    let sent = port.0.lock().clone();
    assert_eq!(sent.len(), 1, "the invalidation went to the device");
    assert_eq!(bell.0.load(Ordering::SeqCst), 0, "the wait is held back by the device");

    rig.unit.reset();

    assert_eq!(bell.0.load(Ordering::SeqCst), 1, "the reset wakes whoever waits on the queue");
    assert_eq!(rig.mem.read_u64(STATUS).expect("status") as u32, 0, "the wait never completed");
    // The device answers late: ignored, not an unexpected completion (ICE).
    assert_eq!(rig.unit.device_tlb_completed(SID, sent[0].itag), Ok(()));
    assert_eq!(rig.unit.read32(regs::FSTS).expect("fsts") & fsts::ICE, 0);
    // Nothing is outstanding any more, so time passing raises no time-out (ITE).
    let later = rig.unit.clock().now() + std::time::Duration::from_secs(3600);
    rig.unit.poll(later);
    assert_eq!(rig.unit.read32(regs::FSTS).expect("fsts"), 0);
    assert_eq!(rig.unit.stats().device_tlb_timeouts, 0);

    // The port is still bound: software that sets the unit up again reaches the device.
    assert_eq!(rig.unit.bind_device_port(SID, Arc::new(Silent::default()), 4), Err(PortError::AlreadyBound(SID)));
    let q = rig.enable_queue();
    assert_eq!(rig.unit.read64(regs::IQA).expect("iqa"), q.0);
    rig.submit(&[encode::device_tlb(SID, 0, Iova(0), 0)]);
    assert_eq!(port.0.lock().len(), 2, "the second invalidation reached the same port");
}
