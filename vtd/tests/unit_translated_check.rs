//! Translated-request checking (a dmar extension, `unit::grants`): with it on, a translated
//! request is accepted only inside a range the unit completed for the function with the
//! needed permission and not invalidated since; refusals are recorded faults (no read 0x06,
//! no write 0x05, address type translated). With it off, TT=01b is faithful: translated
//! requests go anywhere outside the interrupt range. Driven through the registers, the
//! invalidation queue and the driver, as software would.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use common::Rig;
use dmar_vtd::clock::{Clock, ManualClock};
use dmar_vtd::driver::{AttachOptions, DomainKind, Driver, DriverConfig, Perm};
use dmar_vtd::unit::invalidation::descriptor::{WaitDesc, encode};
use dmar_vtd::unit::regs::{self, ccmd, fsts};
use dmar_vtd::unit::tables::{AddressWidth, TranslationType};
use dmar_vtd::unit::{
    AtsCompletion, DmaError, FaultReason, FaultRecord, HostMemory, IotlbInvalidation, RequestKind, Unit, UnitConfig,
    UnitEvents,
};
use dmar_vtd::unit::{DeviceInvalidation, DevicePort, Direction, NoEvents};
use dmar_vtd::{DomainId, Hpa, ITag, Iova, SourceId};

const SID: SourceId = SourceId::new(0x21, 4, 0);
const DID: u16 = 9;
const AW: AddressWidth = AddressWidth::Aw48;
const STATUS: Hpa = Hpa(0x80_0000);
/// IOVA 0x1000 and 0x2000 map to consecutive frames here (read-write); 0x5000 maps
/// read-only to `RO_FRAME`.
const FRAME: u64 = 0x4000_0000;
const RO_FRAME: u64 = 0x4800_0000;
/// Host memory the function never had translated.
const ELSEWHERE: u64 = 0x7000_0000;

fn wait() -> (u64, u64) {
    encode::wait(WaitDesc { interrupt: false, status_write: true, fence: true, status_data: 1, status_addr: STATUS.0 })
}

/// A unit with the queue on, `SID` attached with TT=01b, and the mappings above.
fn rig_with(events: Arc<dyn UnitEvents>) -> (Rig, Hpa) {
    set_up(Rig::with_events(UnitConfig::default(), events))
}

/// `rig` with the queue on, `SID` attached with TT=01b, and the mappings above.
fn set_up(mut rig: Rig) -> (Rig, Hpa) {
    rig.enable_queue();
    let top = rig.attach(SID, DID, TranslationType::DeviceTlb, AW);
    rig.map(top, AW, Iova(0x1000), Hpa(FRAME), 1, true, true);
    rig.map(top, AW, Iova(0x2000), Hpa(FRAME + 0x1000), 1, true, true);
    rig.map(top, AW, Iova(0x5000), Hpa(RO_FRAME), 1, true, false);
    (rig, top)
}

fn rig() -> Rig {
    rig_with(Arc::new(NoEvents)).0
}

fn success(c: AtsCompletion) -> (u64, bool, bool) {
    match c {
        AtsCompletion::Success(e) => (e.translated.0, e.read, e.write),
        other => panic!("expected a successful completion, got {other:?}"),
    }
}

fn read(rig: &Rig, addr: u64) -> Result<(), DmaError> {
    rig.unit.translated_read(SID, Hpa(addr), &mut [0u8; 8])
}

fn write(rig: &Rig, addr: u64) -> Result<(), DmaError> {
    rig.unit.translated_write(SID, Hpa(addr), &[0xa5; 8])
}

fn refused(addr: u64, reason: FaultReason) -> Result<(), DmaError> {
    Err(DmaError::Fault { addr, reason })
}

/// The newest fault record is a translated-request refusal of `addr`.
fn last_fault_is(rig: &Rig, reason: FaultReason, addr: u64, access: Direction) {
    let last = rig.unit.fault_records().last().copied();
    let want = FaultRecord { reason, sid: SID, addr: addr & !0xfff, access, kind: RequestKind::Translated };
    assert_eq!(last, Some(want));
}

#[test]
fn with_checking_on_only_completed_ranges_are_reachable() {
    let rig = rig();
    rig.unit.set_translated_check(SID, true);
    assert!(rig.unit.translated_check(SID));

    // Nothing completed yet: refused, and recorded in FRCD with the spec's read-permission
    // reason, address type translated (AT=10b), T=read.
    assert_eq!(read(&rig, FRAME + 0x10), refused(FRAME + 0x10, FaultReason::NoRead));
    let fsts_v = rig.unit.read32(regs::FSTS).expect("fsts");
    assert_ne!(fsts_v & fsts::PPF, 0, "PPF");
    let fri = u64::from((fsts_v >> fsts::FRI_SHIFT) & 0xff);
    let lo = rig.unit.read64(regs::FRCD_BASE + 16 * fri).expect("frcd lo");
    let hi = rig.unit.read64(regs::FRCD_BASE + 16 * fri + 8).expect("frcd hi");
    assert_eq!(lo, FRAME, "FI");
    assert_eq!(hi & 0xffff, u64::from(SID.0), "SID");
    assert_eq!((hi >> 32) & 0xff, 0x06, "FR: no read");
    assert_eq!((hi >> 60) & 3, RequestKind::Translated as u64, "AT: translated");
    assert_eq!((hi >> 62) & 1, 1, "T: read");

    // Completed: reachable with the completion's permissions, and only there.
    assert_eq!(success(rig.unit.ats_translate(SID, Iova(0x1000), false)), (FRAME, true, true));
    assert_eq!(read(&rig, FRAME + 0x10), Ok(()));
    assert_eq!(write(&rig, FRAME + 0xff8), Ok(()));
    assert_eq!(read(&rig, FRAME + 0xffc), refused(FRAME + 0xffc, FaultReason::NoRead), "runs past the range");
    assert_eq!(read(&rig, FRAME + 0x1000), refused(FRAME + 0x1000, FaultReason::NoRead), "mapped, not completed");
    assert_eq!(write(&rig, ELSEWHERE), refused(ELSEWHERE, FaultReason::NoWrite));
    last_fault_is(&rig, FaultReason::NoWrite, ELSEWHERE, Direction::Write);

    // A read-only completion grants no write; a no-write request grants reads only.
    assert_eq!(success(rig.unit.ats_translate(SID, Iova(0x5000), false)), (RO_FRAME, true, false));
    assert_eq!(read(&rig, RO_FRAME), Ok(()));
    assert_eq!(write(&rig, RO_FRAME), refused(RO_FRAME, FaultReason::NoWrite));
    last_fault_is(&rig, FaultReason::NoWrite, RO_FRAME, Direction::Write);
    assert_eq!(success(rig.unit.ats_translate(SID, Iova(0x2000), true)), (FRAME + 0x1000, true, false));
    assert_eq!(write(&rig, FRAME + 0x1000), refused(FRAME + 0x1000, FaultReason::NoWrite));
    // Both pages are readable now: a read across them is allowed.
    assert_eq!(read(&rig, FRAME + 0xffc), Ok(()));

    // Not present: R=W=0 grants nothing. Another function gets nothing from SID's grants.
    let (_, r, w) = success(rig.unit.ats_translate(SID, Iova(0x9000), false));
    assert!(!r && !w);
    let other = SourceId::new(0x21, 4, 1);
    rig.unit.set_translated_check(other, true);
    assert!(matches!(
        rig.unit.translated_read(other, Hpa(FRAME), &mut [0u8; 4]),
        Err(DmaError::Fault { reason: FaultReason::ContextEntryNotPresent, .. })
    ));

    let s = rig.unit.stats();
    assert_eq!(s.translated_check_refusals, 6);
    assert_eq!(s.translated_check_grants, 3);
    assert_eq!(s.translated_blocked, 7, "refusals are blocked translated requests, with the context fault");
}

/// Without a device port the function has no device TLB: the invalidation ends, and
/// revokes, as it is processed.
#[test]
fn a_device_tlb_invalidation_revokes_its_range_when_processed() {
    let rig = rig();
    rig.unit.set_translated_check(SID, true);
    success(rig.unit.ats_translate(SID, Iova(0x1000), false));
    success(rig.unit.ats_translate(SID, Iova(0x2000), false));
    success(rig.unit.ats_translate(SID, Iova(0x5000), false));
    assert_eq!(rig.unit.translated_grants(SID), 2, "0x1000 and 0x2000 merged");

    // One page (S=0) at 0x1000: that page goes, its neighbour stays.
    rig.submit(&[encode::device_tlb(SID, 0, Iova(0x1000), 0), wait()]);
    assert_eq!(read(&rig, FRAME), refused(FRAME, FaultReason::NoRead));
    last_fault_is(&rig, FaultReason::NoRead, FRAME, Direction::Read);
    assert_eq!(read(&rig, FRAME + 0x1000), Ok(()));
    assert_eq!(read(&rig, RO_FRAME), Ok(()));

    // The whole space (Linux's MAX_AGAW_PFN_WIDTH): everything goes.
    rig.submit(&[encode::device_tlb(SID, 0, Iova(0), 52), wait()]);
    assert_eq!(read(&rig, FRAME + 0x1000), refused(FRAME + 0x1000, FaultReason::NoRead));
    assert_eq!(read(&rig, RO_FRAME), refused(RO_FRAME, FaultReason::NoRead));
    assert_eq!(rig.unit.translated_grants(SID), 0);

    // Translated again: reachable again.
    success(rig.unit.ats_translate(SID, Iova(0x1000), false));
    assert_eq!(read(&rig, FRAME), Ok(()));
    // Another function's invalidation leaves SID's grants alone.
    rig.submit(&[encode::device_tlb(SourceId::new(0x21, 4, 1), 0, Iova(0x1000), 0), wait()]);
    assert_eq!(read(&rig, FRAME), Ok(()));
}

/// A device port that records the invalidations it receives; the test answers them.
#[derive(Debug, Default)]
struct Port(Mutex<Vec<DeviceInvalidation>>);

impl DevicePort for Port {
    fn invalidate(&self, request: DeviceInvalidation) {
        self.0.lock().expect("port").push(request);
    }
}

impl Port {
    fn last_itag(&self) -> ITag {
        self.0.lock().expect("port").last().expect("an invalidation was sent").itag
    }
}

/// The device-TLB invalidation time-out, on a clock the test moves.
const DEVTLB_TIMEOUT: Duration = Duration::from_millis(50);

/// The unit of `rig()` on a manual clock, with checking on for `SID`, `SID`'s device port
/// bound, and 0x1000, 0x2000 and 0x5000 translated (two grants: 0x1000-0x2fff and 0x5000).
fn bound_rig() -> (Rig, Arc<Port>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let config = UnitConfig::default().with_device_tlb_timeout(DEVTLB_TIMEOUT);
    let (rig, _) = set_up(Rig::with_parts(config, Arc::new(NoEvents), clock.clone()));
    let port = Arc::new(Port::default());
    rig.unit.bind_device_port(SID, port.clone(), 4).expect("bind");
    rig.unit.set_translated_check(SID, true);
    for iova in [0x1000, 0x2000, 0x5000] {
        success(rig.unit.ats_translate(SID, Iova(iova), false));
    }
    assert_eq!(rig.unit.translated_grants(SID), 2);
    (rig, port, clock)
}

fn status(rig: &Rig) -> u64 {
    rig.mem.read_u64(STATUS).expect("status")
}

#[test]
fn a_device_tlb_invalidation_revokes_its_range_when_the_device_acknowledges_it() {
    let (rig, port, _) = bound_rig();
    rig.submit(&[encode::device_tlb(SID, 0, Iova(0x1000), 0), wait()]);
    assert_eq!(port.0.lock().expect("port").len(), 1, "sent to the device");
    assert_eq!(status(&rig), 0, "the wait waits for the device");
    // Processed, not yet acknowledged: the device may still use its translation (PCIe 10.3).
    assert_eq!(read(&rig, FRAME), Ok(()));
    assert_eq!(write(&rig, FRAME + 0x10), Ok(()));
    rig.unit.device_tlb_completed(SID, port.last_itag()).expect("ack");
    assert_eq!(status(&rig), 1);
    // Acknowledged: the page goes, its neighbour stays.
    assert_eq!(read(&rig, FRAME), refused(FRAME, FaultReason::NoRead));
    last_fault_is(&rig, FaultReason::NoRead, FRAME, Direction::Read);
    assert_eq!(read(&rig, FRAME + 0x1000), Ok(()));
    assert_eq!(read(&rig, RO_FRAME), Ok(()));

    // The whole space likewise: everything goes at the acknowledgement.
    rig.submit(&[encode::device_tlb(SID, 0, Iova(0), 52), wait()]);
    assert_eq!(read(&rig, RO_FRAME), Ok(()));
    rig.unit.device_tlb_completed(SID, port.last_itag()).expect("ack");
    assert_eq!(read(&rig, FRAME + 0x1000), refused(FRAME + 0x1000, FaultReason::NoRead));
    assert_eq!(read(&rig, RO_FRAME), refused(RO_FRAME, FaultReason::NoRead));
    assert_eq!(rig.unit.translated_grants(SID), 0);
}

#[test]
fn a_translation_completed_before_the_acknowledgement_survives_it() {
    let (rig, port, _) = bound_rig();
    rig.submit(&[encode::device_tlb(SID, 0, Iova(0), 52), wait()]);
    // The device translates 0x1000 again after the descriptor was processed: a fresh
    // translation, which the invalidation does not cover.
    assert_eq!(success(rig.unit.ats_translate(SID, Iova(0x1000), false)), (FRAME, true, true));
    assert_eq!(read(&rig, RO_FRAME), Ok(()), "not acknowledged yet");
    rig.unit.device_tlb_completed(SID, port.last_itag()).expect("ack");
    assert_eq!(status(&rig), 1);
    assert_eq!(read(&rig, FRAME), Ok(()), "recorded after the descriptor");
    assert_eq!(write(&rig, FRAME + 0xff8), Ok(()));
    assert_eq!(read(&rig, FRAME + 0x1000), refused(FRAME + 0x1000, FaultReason::NoRead), "recorded before");
    assert_eq!(read(&rig, RO_FRAME), refused(RO_FRAME, FaultReason::NoRead), "recorded before");
    assert_eq!(rig.unit.translated_grants(SID), 1);
}

#[test]
fn an_invalidation_that_times_out_revokes_its_range() {
    let (rig, port, clock) = bound_rig();
    rig.submit(&[encode::device_tlb(SID, 0, Iova(0x1000), 0), wait()]);
    clock.advance(DEVTLB_TIMEOUT - Duration::from_millis(1));
    rig.unit.poll(clock.now());
    assert_eq!(rig.unit.read32(regs::FSTS).expect("fsts") & fsts::ITE, 0, "not yet");
    assert_eq!(read(&rig, FRAME), Ok(()));
    clock.advance(Duration::from_millis(1));
    rig.unit.poll(clock.now());
    assert_ne!(rig.unit.read32(regs::FSTS).expect("fsts") & fsts::ITE, 0, "ITE");
    assert_eq!(read(&rig, FRAME), refused(FRAME, FaultReason::NoRead));
    assert_eq!(read(&rig, FRAME + 0x1000), Ok(()), "outside the range");
    // The late answer changes nothing.
    rig.unit.device_tlb_completed(SID, port.last_itag()).expect("late answer");
    assert_eq!(read(&rig, FRAME + 0x1000), Ok(()));
    assert_eq!(read(&rig, FRAME), refused(FRAME, FaultReason::NoRead));
}

#[test]
fn context_invalidations_and_switching_off_clear_the_grants() {
    let rig = rig();
    rig.unit.set_translated_check(SID, true);
    success(rig.unit.ats_translate(SID, Iova(0x1000), false));
    assert_eq!(read(&rig, FRAME), Ok(()));
    let ctx =
        encode::context(dmar_vtd::unit::ContextInvalidation::Device { did: DomainId(DID), sid: SID, function_mask: 0 });
    rig.submit(&[ctx, wait()]);
    assert_eq!(read(&rig, FRAME), refused(FRAME, FaultReason::NoRead));

    success(rig.unit.ats_translate(SID, Iova(0x1000), false));
    rig.unit.set_translated_check(SID, false);
    rig.unit.set_translated_check(SID, true);
    assert_eq!(read(&rig, FRAME), refused(FRAME, FaultReason::NoRead), "switched on again: empty");
}

#[test]
fn register_based_context_invalidation_clears_too() {
    let mut rig = Rig::new();
    let top = rig.attach(SID, DID, TranslationType::DeviceTlb, AW);
    rig.map(top, AW, Iova(0x1000), Hpa(FRAME), 1, true, true);
    rig.unit.set_translated_check(SID, true);
    success(rig.unit.ats_translate(SID, Iova(0x1000), false));
    assert_eq!(read(&rig, FRAME), Ok(()));
    rig.unit.write64(regs::CCMD, ccmd::ICC | (ccmd::GLOBAL << ccmd::CIRG_SHIFT)).expect("ccmd");
    assert_eq!(read(&rig, FRAME), refused(FRAME, FaultReason::NoRead));
}

#[test]
fn with_checking_off_tt01_is_faithful() {
    let rig = rig();
    assert!(!rig.unit.translated_check(SID));
    // Never translated, never mapped: TT=01b lets the device reach it all the same.
    assert_eq!(read(&rig, ELSEWHERE), Ok(()));
    assert_eq!(write(&rig, ELSEWHERE), Ok(()));
    assert_eq!(write(&rig, FRAME), Ok(()));
    // Switched on and off again: faithful again.
    rig.unit.set_translated_check(SID, true);
    assert!(read(&rig, ELSEWHERE).is_err());
    rig.unit.set_translated_check(SID, false);
    assert_eq!(read(&rig, ELSEWHERE), Ok(()));
    // The interrupt range stays protected either way (VT-d 3.14).
    assert!(matches!(write(&rig, 0xfee0_0000), Err(DmaError::Fault { reason: FaultReason::InterruptAddress, .. })));
    assert_eq!(rig.unit.stats().translated_check_refusals, 1);
    assert_eq!(rig.unit.stats().translated_check_grants, 0);
}

#[test]
fn the_interrupt_range_is_never_granted() {
    let rig = rig();
    rig.unit.set_translated_check(SID, true);
    match rig.unit.ats_translate(SID, Iova(0xfee0_0000), false) {
        AtsCompletion::Success(e) => assert!(e.untranslated_only && e.write && !e.read),
        other => panic!("{other:?}"),
    }
    assert_eq!(rig.unit.translated_grants(SID), 0);
}

/// Unmaps a page from inside the unit's sampled-walk event, after the walk read the
/// page-table entry but before the translation is recorded: the invalidations software
/// then issues must win over the translation in flight.
#[derive(Debug, Default)]
struct UnmapDuringWalk {
    armed: AtomicBool,
    rig: OnceLock<Weak<Rig>>,
    pte: OnceLock<Hpa>,
}

impl UnitEvents for UnmapDuringWalk {
    fn walk_sampled(&self, _duration: std::time::Duration) {
        if !self.armed.swap(false, Ordering::SeqCst) {
            return;
        }
        let Some(rig) = self.rig.get().and_then(Weak::upgrade) else { return };
        rig.mem.write_u64(*self.pte.get().expect("pte"), 0).expect("clear pte");
        let page = IotlbInvalidation::Page { did: DomainId(DID), addr: Iova(0x1000), am: 0, ih: false };
        rig.submit(&[encode::iotlb(page), encode::device_tlb(SID, 0, Iova(0x1000), 0), wait()]);
    }
}

#[test]
fn a_translation_that_raced_an_invalidation_is_not_granted() {
    let hook = Arc::new(UnmapDuringWalk::default());
    let (mut rig, top) = rig_with(hook.clone());
    let pte = rig.entry_addr(top, AW, Iova(0x1000), 1);
    let rig = Arc::new(rig);
    hook.rig.set(Arc::downgrade(&rig)).expect("once");
    hook.pte.set(pte).expect("once");
    rig.unit.set_translated_check(SID, true);
    hook.armed.store(true, Ordering::SeqCst);
    // One walk in 64 per thread is sampled: walk until the hook has fired (each round
    // drops the IOTLB entry so that the next translation walks).
    let page = IotlbInvalidation::Page { did: DomainId(DID), addr: Iova(0x1000), am: 0, ih: false };
    let mut last = None;
    for _ in 0..256 {
        last = Some(rig.unit.ats_translate(SID, Iova(0x1000), false));
        if !hook.armed.load(Ordering::SeqCst) {
            break;
        }
        rig.submit(&[encode::iotlb(page), wait()]);
    }
    assert!(!hook.armed.load(Ordering::SeqCst), "a sampled walk happened");
    // The walk saw the page mapped, but the device-TLB invalidation ran before the grant
    // was recorded: the unit translated again and found nothing.
    let (_, r, w) = success(last.expect("translated"));
    assert!(!r && !w, "the stale translation was not completed");
    assert_eq!(read(&rig, FRAME), refused(FRAME, FaultReason::NoRead));
    assert!(rig.unit.stats().translated_check_retries >= 1);
}

#[test]
fn the_driver_switches_checking_at_attach_and_detach() {
    const MEMORY: u64 = 1 << 30;
    let memory = Arc::new(HostMemory::new(MEMORY).expect("memory"));
    let unit = Arc::new(Unit::new(UnitConfig::default(), memory));
    let driver = Driver::new(unit.clone(), DriverConfig::for_memory(MEMORY)).expect("driver");
    let did = driver.create_domain(DomainKind::Paging, AW).expect("domain");
    driver.attach_with(SID, did, AttachOptions::new(true).with_check_translated(true)).expect("attach");
    assert!(unit.translated_check(SID));
    driver.map(did, Iova(0x10_0000), Hpa(0x20_0000), 0x2000, Perm::RW).expect("map");
    success(unit.ats_translate(SID, Iova(0x10_0000), false));
    assert!(unit.translated_read(SID, Hpa(0x20_0000), &mut [0u8; 4]).is_ok());
    assert!(unit.translated_read(SID, Hpa(0x20_1000), &mut [0u8; 4]).is_err(), "not completed");
    // A strict unmap invalidates the device TLB: the range is revoked.
    driver.unmap(did, Iova(0x10_0000), 0x1000).expect("unmap");
    assert!(unit.translated_read(SID, Hpa(0x20_0000), &mut [0u8; 4]).is_err());
    // Attached again without checking (the same domain): off, and faithful.
    driver.attach(SID, did, true).expect("attach");
    assert!(!unit.translated_check(SID));
    assert!(unit.translated_read(SID, Hpa(0x20_1000), &mut [0u8; 4]).is_ok());
    driver.attach_with(SID, did, AttachOptions::new(true).with_check_translated(true)).expect("attach");
    assert!(unit.translated_check(SID));
    driver.detach(SID).expect("detach");
    assert!(!unit.translated_check(SID));
    // Checking without ATS means nothing: no translated request is allowed at all.
    driver.attach_with(SID, did, AttachOptions::new(false).with_check_translated(true)).expect("attach");
    assert!(!unit.translated_check(SID));
}
