//! Queued invalidation: every descriptor type, malformed descriptors (IQE, the queue
//! stops, software recovers), device-TLB invalidations through device ports (ITags,
//! out-of-order completions, time-outs into ITE, unexpected completions into ICE).

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use common::{Bell, Rig};
use dmar_vtd::clock::{Clock, ManualClock};
use dmar_vtd::unit::interrupt::IecInvalidation;
use dmar_vtd::unit::invalidation::descriptor::{WaitDesc, encode};
use dmar_vtd::unit::prq::{PageGroupResponse, ResponseCode};
use dmar_vtd::unit::regs::{self, fsts};
use dmar_vtd::unit::tables::{AddressWidth, SlPte, TranslationType};
use dmar_vtd::unit::{ContextInvalidation, IotlbInvalidation};
use dmar_vtd::unit::{
    DeviceInvalidation, DevicePort, Direction, EventSource, InvalidationDoorbell, UnexpectedCompletion, UnitConfig,
    UnitEvents,
};
use dmar_vtd::{DomainId, Hpa, ITag, Iova, SourceId};
use parking_lot::Mutex;

const SID: SourceId = SourceId::new(0, 8, 0);
const AW: AddressWidth = AddressWidth::Aw48;
const STATUS: Hpa = Hpa(0x80_0000);

/// A device port that records what it receives and answers only when told.
#[derive(Debug, Default)]
struct Recorder {
    invalidations: Mutex<Vec<DeviceInvalidation>>,
    responses: Mutex<Vec<PageGroupResponse>>,
}

impl DevicePort for Recorder {
    fn invalidate(&self, request: DeviceInvalidation) {
        self.invalidations.lock().push(request);
    }
    fn page_response(&self, response: PageGroupResponse) {
        self.responses.lock().push(response);
    }
}

/// A recorder bound as the device port of `sid` with invalidate queue depth `depth`.
fn bound(rig: &Rig, sid: SourceId, depth: u8) -> Arc<Recorder> {
    let port = Arc::new(Recorder::default());
    rig.unit.bind_device_port(sid, port.clone(), depth).expect("bind");
    port
}

#[derive(Debug, Default)]
struct Interrupts(Mutex<Vec<(EventSource, u64, u32)>>);
impl UnitEvents for Interrupts {
    fn interrupt_message(&self, source: EventSource, addr: u64, data: u32) {
        self.0.lock().push((source, addr, data));
    }
}

fn wait(data: u32) -> (u64, u64) {
    encode::wait(WaitDesc {
        interrupt: false,
        status_write: true,
        fence: true,
        status_data: data,
        status_addr: STATUS.0,
    })
}

fn status(rig: &Rig) -> u64 {
    rig.mem.read_u64(STATUS).expect("status") & 0xffff_ffff
}

fn fsts(rig: &Rig) -> u32 {
    rig.unit.read32(regs::FSTS).expect("fsts")
}

fn head(rig: &Rig) -> u64 {
    rig.unit.read64(regs::IQH).expect("iqh") >> 4
}

#[test]
fn cache_invalidation_descriptors_and_wait() {
    let mut rig = Rig::new();
    rig.enable_queue();
    let top = rig.attach(SID, 5, TranslationType::Untranslated, AW);
    let pte = rig.map(top, AW, Iova(0x1000), Hpa(0x1000_0000), 1, true, true);
    assert!(rig.unit.translate(SID, Iova(0x1000), Direction::Read).is_ok());
    rig.mem.write_u64(pte, SlPte::leaf(Hpa(0x2000_0000), true, true, false).to_bits()).expect("pte");
    // Stale until the page-selective IOTLB descriptor is processed.
    assert_eq!(rig.unit.translate(SID, Iova(0x1000), Direction::Read).map(|t| t.hpa), Ok(Hpa(0x1000_0000)));
    rig.submit(&[
        encode::context(ContextInvalidation::Device { did: DomainId(5), sid: SID, function_mask: 0 }),
        encode::iotlb(IotlbInvalidation::Page { did: DomainId(5), addr: Iova(0x1000), am: 0, ih: false }),
        encode::iec(IecInvalidation::Global),
        wait(0xabcd),
    ]);
    assert_eq!(status(&rig), 0xabcd, "wait status written");
    assert_eq!(head(&rig), 4);
    assert_eq!(rig.unit.translate(SID, Iova(0x1000), Direction::Read).map(|t| t.hpa), Ok(Hpa(0x2000_0000)));
    let s = rig.unit.stats();
    assert_eq!((s.qi_context, s.qi_iotlb, s.qi_iec, s.qi_wait), (1, 1, 1, 1));
}

#[test]
fn wait_with_interrupt_flag_sets_iwc_and_raises_the_event() {
    let events = Arc::new(Interrupts::default());
    let mut rig = Rig::with_events(UnitConfig::default(), events.clone());
    rig.enable_queue();
    rig.unit.write32(regs::IEDATA, 0x41).expect("iedata");
    rig.unit.write32(regs::IEADDR, 0xfee0_0000).expect("ieaddr");
    rig.unit.write32(regs::IECTL, 0).expect("unmask");
    let w = WaitDesc { interrupt: true, status_write: false, fence: false, status_data: 0, status_addr: 0 };
    rig.submit(&[encode::wait(w)]);
    assert_eq!(rig.unit.read32(regs::ICS).expect("ics") & 1, 1, "IWC");
    assert_eq!(*events.0.lock(), vec![(EventSource::InvalidationCompletion, 0xfee0_0000, 0x41)]);
    // IWC is write-1-to-clear; while set no further event is raised.
    rig.submit(&[encode::wait(w)]);
    assert_eq!(events.0.lock().len(), 1);
    rig.unit.write32(regs::ICS, 1).expect("clear");
    assert_eq!(rig.unit.read32(regs::ICS).expect("ics") & 1, 0);
    rig.submit(&[encode::wait(w)]);
    assert_eq!(events.0.lock().len(), 2);
}

#[test]
fn malformed_descriptor_stops_the_queue_until_software_recovers() {
    let mut rig = Rig::new();
    rig.enable_queue();
    let (qw0, qw1) = encode::iotlb(IotlbInvalidation::Global);
    rig.submit(&[wait(1), (qw0 | (1 << 8), qw1), wait(2)]);
    assert_eq!(status(&rig), 1, "descriptors before the bad one ran");
    assert_ne!(fsts(&rig) & fsts::IQE, 0);
    assert_eq!(rig.unit.read64(regs::IQERCD).expect("iqercd") & 0xf, 4, "IQEI: reserved field");
    assert_eq!(head(&rig), 1, "IQH stays on the bad descriptor");
    // More work is not fetched while IQE is set.
    rig.submit(&[wait(3)]);
    assert_eq!(status(&rig), 1);
    // Software replaces the bad descriptor (Linux copies the wait over it) and clears IQE.
    let q = rig.unit.read64(regs::IQA).expect("iqa") & !0xfff;
    let (w0, w1) = wait(7);
    rig.mem.write_u64(Hpa(q + 16), w0).expect("fix");
    rig.mem.write_u64(Hpa(q + 24), w1).expect("fix");
    rig.unit.write32(regs::FSTS, fsts::IQE).expect("clear IQE");
    assert_eq!(fsts(&rig) & fsts::IQE, 0);
    assert_eq!(status(&rig), 3, "the queue ran to the tail");
    assert_eq!(head(&rig), 4);
}

#[test]
fn each_queue_error_code() {
    for (desc, iqei) in [
        ((0u64, 0u64), 3u64), // type 0
        ((6, 0), 3),          // PASID-IOTLB: no scalable mode
        (encode::iotlb(IotlbInvalidation::Page { did: DomainId(1), addr: Iova(0), am: 19, ih: false }), 4), // AM > MAMV
        ((wait(1).0, 0x2_0000_0000_0000), 2), // status address outside memory
    ] {
        let mut rig = Rig::new();
        rig.enable_queue();
        rig.submit(&[desc]);
        assert_ne!(fsts(&rig) & fsts::IQE, 0, "{desc:x?}");
        assert_eq!(rig.unit.read64(regs::IQERCD).expect("iqercd") & 0xf, iqei, "{desc:x?}");
    }
    // A tail beyond the queue size.
    let mut rig = Rig::new();
    rig.enable_queue();
    rig.unit.write32(regs::IQT, 256 << 4).expect("iqt");
    assert_eq!(rig.unit.read64(regs::IQERCD).expect("iqercd") & 0xf, 1);
}

#[test]
fn device_tlb_invalidations_reach_the_port_and_the_wait_waits_for_them() {
    let mut rig = Rig::new();
    rig.enable_queue();
    let ports: Vec<(SourceId, Arc<Recorder>)> =
        (0..3).map(|i| SourceId::new(1, i, 0)).map(|sid| (sid, bound(&rig, sid, 8))).collect();
    let mut descs: Vec<(u64, u64)> =
        ports.iter().map(|(sid, _)| encode::device_tlb(*sid, 0, Iova(0x4000_0000), 4)).collect();
    descs.push(wait(9));
    rig.submit(&descs);
    for (sid, p) in &ports {
        let got = p.invalidations.lock().clone();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].sid, *sid);
        assert_eq!(got[0].range(), (Iova(0x4000_0000), 16 * 4096));
    }
    assert_eq!(status(&rig), 0, "the wait is held back");
    // Answers arrive out of order; the wait completes only after the last.
    for idx in [2usize, 0] {
        let (sid, p) = &ports[idx];
        rig.unit.device_tlb_completed(*sid, p.invalidations.lock()[0].itag).expect("complete");
        assert_eq!(status(&rig), 0);
    }
    let (sid, p) = &ports[1];
    rig.unit.device_tlb_completed(*sid, p.invalidations.lock()[0].itag).expect("complete");
    assert_eq!(status(&rig), 9);
    assert_eq!(rig.unit.stats().device_tlb_completions, 3);
}

#[test]
fn itags_are_bounded_by_the_queue_depth() {
    let mut rig = Rig::new();
    rig.enable_queue();
    let port = bound(&rig, SID, 2);
    rig.submit(&[
        encode::device_tlb(SID, 0, Iova(0x1000), 0),
        encode::device_tlb(SID, 0, Iova(0x2000), 0),
        encode::device_tlb(SID, 0, Iova(0x3000), 0),
        wait(1),
    ]);
    let sent = port.invalidations.lock().clone();
    assert_eq!(sent.len(), 2, "depth 2: the third waits for a free ITag");
    assert_ne!(sent[0].itag, sent[1].itag);
    rig.unit.device_tlb_completed(SID, sent[1].itag).expect("complete");
    let sent = port.invalidations.lock().clone();
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[2].itag, sent[1].itag, "the freed tag is reused");
    assert_eq!(sent[2].range(), (Iova(0x3000), 4096));
    rig.unit.device_tlb_completed(SID, sent[0].itag).expect("complete");
    assert_eq!(status(&rig), 0);
    rig.unit.device_tlb_completed(SID, sent[2].itag).expect("complete");
    assert_eq!(status(&rig), 1);
}

#[test]
fn a_device_that_never_answers_yields_ite_and_the_queue_recovers() {
    let clock = Arc::new(ManualClock::new());
    let mut rig =
        Rig::with_clock(UnitConfig::default().with_device_tlb_timeout(Duration::from_millis(50)), clock.clone());
    rig.enable_queue();
    let other = SourceId::new(0, 9, 0);
    let silent = bound(&rig, SID, 4);
    let healthy = bound(&rig, other, 4);
    rig.submit(&[encode::device_tlb(SID, 0, Iova(0), 0), encode::device_tlb(other, 0, Iova(0), 0), wait(5)]);
    rig.unit.device_tlb_completed(other, healthy.invalidations.lock()[0].itag).expect("complete");
    assert_eq!(status(&rig), 0);
    clock.advance(Duration::from_millis(49));
    rig.unit.poll(clock.now());
    assert_eq!(fsts(&rig) & fsts::ITE, 0, "not yet");
    clock.advance(Duration::from_millis(1));
    rig.unit.poll(clock.now());
    assert_ne!(fsts(&rig) & fsts::ITE, 0, "ITE");
    let iqercd = rig.unit.read64(regs::IQERCD).expect("iqercd");
    assert_eq!((iqercd >> 32) & 0xffff, u64::from(SID.0), "ITESID");
    assert_eq!(status(&rig), 0, "the aborted wait never writes its status");
    assert_eq!(head(&rig), 3, "IQH is past the aborted wait");
    assert_eq!(rig.unit.stats().device_tlb_timeouts, 1);
    // A late answer is ignored without ICE.
    rig.unit.device_tlb_completed(SID, silent.invalidations.lock()[0].itag).expect("late answer");
    assert_eq!(fsts(&rig) & fsts::ICE, 0);
    // Software clears ITE and resubmits; the other device keeps being served.
    rig.unit.write32(regs::FSTS, fsts::ITE).expect("clear ITE");
    rig.submit(&[encode::device_tlb(other, 0, Iova(0), 0), wait(6)]);
    rig.unit.device_tlb_completed(other, healthy.invalidations.lock()[1].itag).expect("complete");
    assert_eq!(status(&rig), 6);
}

#[test]
fn unexpected_completions_set_ice_and_unbinding_completes_outstanding_work() {
    let mut rig = Rig::new();
    rig.enable_queue();
    let port = bound(&rig, SID, 4);
    assert!(rig.unit.bind_device_port(SID, port.clone(), 4).is_err(), "one port per requester id");
    assert!(rig.unit.bind_device_port(SourceId(1), port.clone(), 33).is_err());
    assert_eq!(rig.unit.device_tlb_completed(SID, ITag(3)), Err(UnexpectedCompletion { sid: SID, itag: ITag(3) }));
    assert_ne!(fsts(&rig) & fsts::ICE, 0);
    assert_eq!(rig.unit.read64(regs::IQERCD).expect("iqercd") >> 48, u64::from(SID.0), "ICESID");
    rig.unit.write32(regs::FSTS, fsts::ICE).expect("clear");
    rig.submit(&[encode::device_tlb(SID, 0, Iova(0), 0), wait(4)]);
    assert_eq!(status(&rig), 0);
    assert!(rig.unit.unbind_device_port(SID));
    assert_eq!(status(&rig), 4, "the vanished device's invalidation counts as done");
}

#[test]
fn page_group_responses_are_routed_to_the_function() {
    let mut rig = Rig::new();
    rig.enable_queue();
    let port = bound(&rig, SID, 4);
    let qw0 = 9 | (0xf << 12) | (u64::from(SID.0) << 16);
    let qw1 = (0x1a5 << 3) | (1 << 2);
    rig.submit(&[(qw0, qw1), wait(1)]);
    assert_eq!(*port.responses.lock(), vec![PageGroupResponse { sid: SID, prgi: 0x1a5, code: ResponseCode::Failure }]);
    // VT-d 7.6.1 (4.0 and later): qw1 bit 2 is no longer LPIG, and current Linux leaves it
    // clear (`intel_iommu_page_response`). Such a response still completes the group.
    let qw0 = 9 | (u64::from(SID.0) << 16);
    rig.submit(&[(qw0, 0x42 << 3), wait(2)]);
    assert_eq!(status(&rig), 2);
    assert_eq!(
        port.responses.lock().last().copied(),
        Some(PageGroupResponse { sid: SID, prgi: 0x42, code: ResponseCode::Success }),
        "a response without LPIG reaches the function"
    );
    // An undefined response code is a malformed descriptor.
    rig.submit(&[(9 | (5 << 12) | (u64::from(SID.0) << 16), 0)]);
    assert_ne!(fsts(&rig) & fsts::IQE, 0);
}

mod page_requests {
    use super::*;
    use dmar_vtd::unit::PageRequestOutcome;
    use dmar_vtd::unit::prq::PageRequest;
    use dmar_vtd::unit::regs::prs;

    fn request(prgi: u16, page: u64, last: bool) -> PageRequest {
        PageRequest { sid: SID, addr: Iova(page << 12), read: true, write: true, prgi, last, private_data: None }
    }

    /// What software's page request handler does, through the registers and host memory
    /// (Linux `prq_event_thread`): clear PPR, read PQT and PQH, read the descriptors, write
    /// PQH, clear PRO once the queue is empty. Returns the requests and whether PRO was
    /// cleared.
    fn drain(rig: &Rig) -> (Vec<PageRequest>, bool) {
        let pqa = rig.unit.read64(regs::PQA).expect("pqa");
        let base = pqa & !0xfff;
        let mask = (4096u64 << (pqa & 7)) - 1;
        rig.unit.write32(regs::PRS, prs::PPR).expect("clear PPR");
        let tail = rig.unit.read64(regs::PQT).expect("pqt") & mask;
        let mut head = rig.unit.read64(regs::PQH).expect("pqh") & mask;
        let mut requests = Vec::new();
        while head != tail {
            let desc: [u64; 4] =
                std::array::from_fn(|i| rig.mem.read_u64(Hpa(base + head + 8 * i as u64)).expect("entry"));
            requests.push(PageRequest::from_descriptor(desc).expect("well-formed"));
            head = (head + 32) & mask;
        }
        rig.unit.write64(regs::PQH, tail).expect("pqh");
        let overflow = rig.unit.read32(regs::PRS).expect("prs") & prs::PRO != 0;
        if overflow {
            rig.unit.write32(regs::PRS, prs::PRO).expect("clear PRO");
        }
        (requests, overflow)
    }

    fn rig_with_prq(events: Arc<Interrupts>) -> (Rig, Arc<Recorder>) {
        let mut rig = Rig::with_events(UnitConfig::default(), events);
        rig.enable_queue();
        rig.attach(SID, 3, TranslationType::DeviceTlb, AW);
        let q = rig.alloc();
        rig.unit.write64(regs::PQA, q.0).expect("pqa: 128 entries");
        rig.unit.write32(regs::PEDATA, 0x51).expect("pedata");
        rig.unit.write32(regs::PEADDR, 0xfee0_0000).expect("peaddr");
        rig.unit.write32(regs::PECTL, 0).expect("unmask");
        let port = bound(&rig, SID, 4);
        (rig, port)
    }

    #[test]
    fn round_trip_request_event_drain_and_group_response() {
        let events = Arc::new(Interrupts::default());
        let (rig, port) = rig_with_prq(events.clone());
        assert_eq!(rig.unit.page_request(request(7, 0x40, false)), Ok(PageRequestOutcome::Queued));
        assert_eq!(rig.unit.page_request(request(7, 0x41, true)), Ok(PageRequestOutcome::Queued));
        assert_eq!(*events.0.lock(), vec![(EventSource::PageRequest, 0xfee0_0000, 0x51)], "one event for PPR 0 -> 1");
        // Software drains the queue and answers the group through the invalidation queue.
        let (drained, _) = drain(&rig);
        assert_eq!(drained, vec![request(7, 0x40, false), request(7, 0x41, true)]);
        let [qw0, qw1] = PageGroupResponse { sid: SID, prgi: 7, code: ResponseCode::Success }.to_descriptor();
        rig.submit(&[(qw0, qw1), wait(1)]);
        assert_eq!(*port.responses.lock(), vec![PageGroupResponse { sid: SID, prgi: 7, code: ResponseCode::Success }]);
        // A function whose context does not enable device TLBs may not send page requests.
        let other = PageRequest { sid: SourceId::new(9, 0, 0), ..request(1, 1, true) };
        assert!(rig.unit.page_request(other).is_err());
    }

    #[test]
    fn overflow_sets_pro_and_the_hardware_answers_the_dropped_group() {
        let (rig, port) = rig_with_prq(Arc::new(Interrupts::default()));
        for i in 0..127u16 {
            assert_eq!(rig.unit.page_request(request(i % 512, u64::from(i), false)), Ok(PageRequestOutcome::Queued));
        }
        assert_eq!(rig.unit.page_request(request(200, 999, true)), Ok(PageRequestOutcome::Dropped));
        assert_ne!(rig.unit.read32(regs::PRS).expect("prs") & prs::PRO, 0, "PRO");
        assert_eq!(
            *port.responses.lock(),
            vec![PageGroupResponse { sid: SID, prgi: 200, code: ResponseCode::Success }],
            "auto success"
        );
        let (drained, overflow_cleared) = drain(&rig);
        assert_eq!(drained.len(), 127);
        assert!(overflow_cleared);
        assert_eq!(rig.unit.read32(regs::PRS).expect("prs"), 0);
        assert_eq!(rig.unit.page_request(request(1, 1, true)), Ok(PageRequestOutcome::Queued));
    }
}

#[test]
fn the_doorbell_rings_when_a_wait_completes_or_the_queue_stops() {
    let mut rig = Rig::new();
    rig.enable_queue();
    let bell = Arc::new(Bell::default());
    let weak: Weak<dyn InvalidationDoorbell> = Arc::downgrade(&bell) as Weak<Bell>;
    rig.unit.subscribe_invalidation_doorbell(weak);
    let rings = || bell.0.load(Ordering::SeqCst);
    let port = bound(&rig, SID, 4);
    rig.submit(&[encode::device_tlb(SID, 0, Iova(0), 0), wait(1)]);
    assert_eq!(rings(), 0, "the wait is held back by the device");
    let itag = port.invalidations.lock()[0].itag;
    rig.unit.device_tlb_completed(SID, itag).expect("complete");
    assert_eq!((rings(), status(&rig)), (1, 1), "rung after the status write");
    // Descriptors other than waits do not ring it; a queue error does.
    rig.submit(&[encode::iotlb(IotlbInvalidation::Global)]);
    assert_eq!(rings(), 1);
    rig.submit(&[(0, 0)]);
    assert_ne!(fsts(&rig) & fsts::IQE, 0);
    assert_eq!(rings(), 2);
    // Dropping the subscriber unsubscribes it.
    drop(bell);
    rig.unit.write32(regs::FSTS, fsts::IQE).expect("clear");
}

mod arbitrary_descriptors {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever software writes into the queue, the unit does not panic, and the queue
        /// either runs past a descriptor or stops on it with IQE; after software replaces a
        /// bad descriptor and clears IQE, the queue always drains to the tail.
        #[test]
        fn any_descriptor_stream_is_processed_or_stops_with_iqe(
            descs in proptest::collection::vec((any::<u64>(), any::<u64>(), 0u64..10), 1..24)
        ) {
            let mut rig = Rig::new();
            rig.enable_queue();
            // Bias the type field so that every descriptor type is exercised, not only
            // unknown ones.
            let descs: Vec<(u64, u64)> = descs
                .into_iter()
                .map(|(qw0, qw1, ty)| {
                    let qw0 = (qw0 & !0xe0f) | ty;
                    // Keep wait status writes inside memory most of the time.
                    let qw1 = if ty == 5 { qw1 & 0xfff_fffc } else { qw1 };
                    (qw0, qw1)
                })
                .collect();
            let total = descs.len() as u64;
            rig.submit(&descs);
            let base = rig.unit.read64(regs::IQA).expect("iqa") & !0xfff;
            for _ in 0..=total {
                let stopped = fsts(&rig) & fsts::IQE != 0;
                let h = head(&rig);
                if !stopped {
                    prop_assert_eq!(h, total, "without IQE the queue runs to the tail");
                    break;
                }
                prop_assert!(h < total);
                // Software recovery, as Linux does: overwrite the bad one with a wait.
                let (w0, w1) = wait(0x77);
                rig.mem.write_u64(Hpa(base + h * 16), w0).expect("fix");
                rig.mem.write_u64(Hpa(base + h * 16 + 8), w1).expect("fix");
                rig.unit.write32(regs::FSTS, fsts::IQE).expect("clear");
            }
            prop_assert_eq!(head(&rig), total);
        }
    }
}
