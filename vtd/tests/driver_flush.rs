//! The driver's invalidation end to end, against a real unit with in-process devices:
//! queued invalidation, device-TLB invalidation of ATS devices (synchronous answers,
//! answers from other threads in any order, devices that never answer), and the strict
//! and deferred flush policies.
//!
//! Each test device keeps a small device TLB filled through `Unit::ats_translate` and
//! dropped when an invalidation request arrives, so "no cache serves the range" is checked
//! in all three places: the unit's IOTLB (`Unit::translate`), its answer to translation
//! requests (`Unit::ats_translate`), and every device's own TLB.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::Duration;

use dmar_vtd::clock::{Clock, ManualClock};
use dmar_vtd::driver::{DomainKind, Driver, DriverConfig, DriverError, FlushPolicy, Perm};
use dmar_vtd::unit::regs::{self, fsts};
use dmar_vtd::unit::tables::AddressWidth;
use dmar_vtd::unit::{
    AtsCompletion, AtsEntry, Blocked, DeviceInvalidation, DevicePort, Direction, FaultReason, HostMemory, Unit,
    UnitConfig,
};
use dmar_vtd::{DomainId, Hpa, Iova, SourceId};
use parking_lot::Mutex;
use proptest::prelude::*;

const MEMORY: u64 = 4 << 30;
const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const AW: AddressWidth = AddressWidth::Aw48;

/// How a test device answers invalidation requests.
#[derive(Debug)]
enum Answer {
    /// At once, inside `DevicePort::invalidate` (the unit calls ports without its lock).
    Sync,
    /// From the completer threads, batched and in shuffled order.
    Threads(mpsc::Sender<(Arc<Device>, DeviceInvalidation)>),
    /// Never: a vanished device.
    Never,
}

/// An ATS device with its own device TLB.
#[derive(Debug)]
struct Device {
    sid: SourceId,
    me: Weak<Device>,
    unit: Weak<Unit>,
    answer: Answer,
    /// Cached translations by page address.
    tlb: Mutex<HashMap<u64, AtsEntry>>,
    requests: Mutex<Vec<DeviceInvalidation>>,
    completed: AtomicUsize,
    /// Requests handled, whatever the unit made of the answer.
    answered: AtomicUsize,
}

impl Device {
    fn new(unit: &Arc<Unit>, sid: SourceId, answer: Answer) -> Arc<Device> {
        let dev = Arc::new_cyclic(|me| Device {
            sid,
            me: me.clone(),
            unit: Arc::downgrade(unit),
            answer,
            tlb: Mutex::new(HashMap::new()),
            requests: Mutex::new(Vec::new()),
            completed: AtomicUsize::new(0),
            answered: AtomicUsize::new(0),
        });
        unit.bind_device_port(sid, dev.clone(), 8).expect("bind port");
        dev
    }

    /// Translates through the device TLB, asking the unit on a miss (PCIe ATS).
    fn translate(&self, iova: u64) -> Option<AtsEntry> {
        let page = iova & !(PAGE - 1);
        if let Some(e) = self.tlb.lock().get(&page) {
            return Some(*e);
        }
        let unit = self.unit.upgrade()?;
        match unit.ats_translate(self.sid, Iova(page), false) {
            AtsCompletion::Success(e) if e.read || e.write => {
                self.tlb.lock().insert(page, e);
                Some(e)
            }
            _ => None,
        }
    }

    fn holds(&self, iova: u64) -> bool {
        self.tlb.lock().contains_key(&(iova & !(PAGE - 1)))
    }

    /// Drops the requested range, then acknowledges it (in that order: an answer means
    /// the device no longer uses the old translation).
    fn complete(&self, request: DeviceInvalidation) {
        let (base, size) = request.range();
        self.tlb.lock().retain(|&page, _| page.wrapping_sub(base.0) >= size);
        let accepted = match self.unit.upgrade() {
            // After a time-out (ITE) the unit abandons every outstanding ITag and may hand
            // the same tag out again before a late answer arrives: that answer then reads
            // as unexpected (ICE), as it would on a real link. The driver clears ICE.
            Some(unit) => unit.device_tlb_completed(self.sid, request.itag).is_ok(),
            None => true,
        };
        if accepted {
            self.completed.fetch_add(1, Ordering::Relaxed);
        }
        self.answered.fetch_add(1, Ordering::Release);
    }

    /// Every request sent to the device has been answered.
    fn quiet(&self) -> bool {
        let answered = self.answered.load(Ordering::Acquire);
        self.requests.lock().len() == answered
    }

    fn last_range(&self) -> Option<(Iova, u64)> {
        self.requests.lock().last().map(DeviceInvalidation::range)
    }
}

impl DevicePort for Device {
    fn invalidate(&self, request: DeviceInvalidation) {
        self.requests.lock().push(request);
        match &self.answer {
            Answer::Sync => self.complete(request),
            Answer::Threads(tx) => {
                if let Some(me) = self.me.upgrade() {
                    let _ = tx.send((me, request));
                }
            }
            Answer::Never => {}
        }
    }
}

/// Two threads that answer invalidations in batches, in shuffled order.
fn completer_threads() -> mpsc::Sender<(Arc<Device>, DeviceInvalidation)> {
    let (tx, rx) = mpsc::channel::<(Arc<Device>, DeviceInvalidation)>();
    let rx = Arc::new(std::sync::Mutex::new(rx));
    for t in 0..2u64 {
        let rx = rx.clone();
        std::thread::spawn(move || {
            let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ t;
            loop {
                let mut batch = Vec::new();
                {
                    let Ok(rx) = rx.lock() else { return };
                    match rx.recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => return,
                    }
                    // Let more requests arrive, so that answers are batched and reordered.
                    for _ in 0..32 {
                        std::thread::yield_now();
                    }
                    batch.extend(rx.try_iter().take(64));
                }
                // Fisher-Yates with xorshift: answers arrive in any order.
                for i in (1..batch.len()).rev() {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    batch.swap(i, (seed % (i as u64 + 1)) as usize);
                }
                for (dev, request) in batch {
                    dev.complete(request);
                }
            }
        });
    }
    tx
}

fn unit_with(config: UnitConfig) -> Arc<Unit> {
    Arc::new(Unit::new(config, Arc::new(HostMemory::new(MEMORY).expect("memory"))))
}

/// A unit that reads time from `clock`.
fn unit_on(config: UnitConfig, clock: &Arc<ManualClock>) -> Arc<Unit> {
    let memory = Arc::new(HostMemory::new(MEMORY).expect("memory"));
    Arc::new(Unit::builder(config, memory).clock(clock.clone()).build())
}

/// Lets time pass for a device that never answers, on a manual clock, without sleeping:
/// whenever `silent` has been sent an invalidation and every one of `others` has answered
/// all it was sent, the clock moves on by `timeout`, and the next FSTS read makes it ITE.
/// (Should another device's invalidation still be outstanding unseen, it expires at the
/// same instant; the unit then names the lowest requester id, which the tests give the
/// silent device.)
struct Timekeeper {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl Timekeeper {
    fn start(clock: Arc<ManualClock>, timeout: Duration, silent: Arc<Device>, others: Vec<Arc<Device>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut handled = 0;
                while !stop.load(Ordering::Acquire) {
                    let sent = silent.requests.lock().len();
                    if sent > handled && others.iter().all(|d| d.quiet()) {
                        clock.advance(timeout);
                        handled = sent;
                    } else {
                        std::thread::yield_now();
                    }
                }
                handled
            })
        };
        Self { stop, thread }
    }

    /// Stops; returns how many of the silent device's requests it let time out.
    fn stop(self) -> usize {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("timekeeper")
    }
}

fn driver(unit: &Arc<Unit>, flush: FlushPolicy) -> Driver {
    Driver::new(unit.clone(), DriverConfig::for_memory(MEMORY).with_flush(flush)).expect("driver")
}

fn sid(bus: u8, dev: u8) -> SourceId {
    SourceId::new(bus, dev, 0)
}

/// The unit refuses an untranslated request to an unmapped page (R=W=0: reason 0x06).
fn unmapped(unit: &Unit, sid: SourceId, iova: u64) -> bool {
    unit.translate(sid, Iova(iova), Direction::Read) == Err(Blocked { reason: Some(FaultReason::NoRead) })
}

fn ats_no_access(unit: &Unit, sid: SourceId, iova: u64) -> bool {
    matches!(unit.ats_translate(sid, Iova(iova), false), AtsCompletion::Success(e) if !e.read && !e.write)
}

fn hpa_of(unit: &Unit, sid: SourceId, iova: u64) -> Option<Hpa> {
    unit.translate(sid, Iova(iova), Direction::Read).ok().map(|t| t.hpa)
}

/// Warms every cache: the IOTLB through an untranslated request, each device's TLB
/// through a translation request.
fn warm(unit: &Unit, devices: &[Arc<Device>], iova: u64) {
    for d in devices {
        assert!(hpa_of(unit, d.sid, iova).is_some(), "{iova:#x} mapped for {}", d.sid);
        assert!(d.translate(iova).is_some(), "{iova:#x} translatable for {}", d.sid);
    }
}

/// After an unmap returned: nothing anywhere still translates `iova`.
fn assert_gone(unit: &Unit, devices: &[Arc<Device>], iova: u64) {
    for d in devices {
        assert!(unmapped(unit, d.sid, iova), "{iova:#x} still translated for {}", d.sid);
        assert!(ats_no_access(unit, d.sid, iova), "{iova:#x} still granted to {} by ATS", d.sid);
        assert!(!d.holds(iova), "{iova:#x} still in the device TLB of {}", d.sid);
    }
}

fn fsts(unit: &Unit) -> u32 {
    unit.read32(regs::FSTS).expect("fsts")
}

// ---------------------------------------------------------------------------------------
// (a) strict

#[test]
fn queued_invalidation_is_on_and_carries_every_flush() {
    let unit = unit_with(UnitConfig::default());
    let d = driver(&unit, FlushPolicy::Strict);
    assert!(d.queued_invalidation());
    assert_ne!(unit.read32(regs::GSTS).expect("gsts") & regs::gcmd::QIE, 0, "QIES");
    assert_ne!(unit.read32(regs::GSTS).expect("gsts") & regs::gcmd::TE, 0, "TES kept");
    let did = d.create_domain(DomainKind::Paging, AW).expect("domain");
    d.attach(sid(1, 0), did, false).expect("attach");
    d.map(did, Iova(0x10_0000), Hpa(0x20_0000), PAGE, Perm::RW).expect("map");
    let before = unit.stats();
    assert_eq!(d.unmap(did, Iova(0x10_0000), PAGE), Ok(PAGE));
    let after = unit.stats();
    assert_eq!(after.qi_iotlb - before.qi_iotlb, 1, "one IOTLB descriptor");
    assert_eq!(after.qi_wait - before.qi_wait, 1, "one wait");
    assert_eq!(after.qi_device_tlb, 0, "no ATS device");
    assert_eq!(unit.read64(regs::IQT).expect("iqt"), unit.read64(regs::IQH).expect("iqh"), "queue drained");
}

#[test]
fn register_invalidation_still_works_and_refuses_ats() {
    let unit = unit_with(UnitConfig::default());
    let cfg = DriverConfig::for_memory(MEMORY).with_queued_invalidation(false);
    let d = Driver::new(unit.clone(), cfg).expect("driver");
    assert!(!d.queued_invalidation());
    let did = d.create_domain(DomainKind::Paging, AW).expect("domain");
    let s = sid(1, 0);
    assert_eq!(d.attach(s, did, true), Err(DriverError::AtsUnsupported(s)));
    assert_eq!(d.domain_of(s), None);
    d.attach(s, did, false).expect("attach");
    d.map(did, Iova(0x10_0000), Hpa(0x20_0000), PAGE, Perm::RW).expect("map");
    assert_eq!(hpa_of(&unit, s, 0x10_0000), Some(Hpa(0x20_0000)));
    assert_eq!(d.unmap(did, Iova(0x10_0000), PAGE), Ok(PAGE));
    assert!(unmapped(&unit, s, 0x10_0000));
    let st = unit.stats();
    assert_eq!((st.qi_iotlb, st.qi_wait), (0, 0), "nothing went through the queue");
    assert!(st.iotlb_invalidations > 0);
}

#[test]
fn strict_unmap_leaves_nothing_in_any_cache() {
    let unit = unit_with(UnitConfig::default());
    let d = driver(&unit, FlushPolicy::Strict);
    let did = d.create_domain(DomainKind::Paging, AW).expect("domain");
    let devices: Vec<Arc<Device>> = (0..4).map(|i| Device::new(&unit, sid(2, i), Answer::Sync)).collect();
    for dev in &devices {
        d.attach(dev.sid, did, true).expect("attach");
    }
    let plain = sid(2, 9); // a device without ATS in the same domain
    d.attach(plain, did, false).expect("attach");
    let base = 0x4000_0000u64;
    d.map(did, Iova(base), Hpa(0x1000_0000), 64 * PAGE, Perm::RW).expect("map 4K pages");
    d.map(did, Iova(base + 2 * MIB), Hpa(0x2000_0000), 2 * MIB, Perm::RW).expect("map a 2M page");
    for p in 0..64 {
        warm(&unit, &devices, base + p * PAGE);
    }
    warm(&unit, &devices, base + 2 * MIB + 0x5000);

    // one page
    assert_eq!(d.unmap(did, Iova(base + 7 * PAGE), PAGE), Ok(PAGE));
    assert_gone(&unit, &devices, base + 7 * PAGE);
    assert!(unmapped(&unit, plain, base + 7 * PAGE));
    for dev in &devices {
        assert_eq!(dev.last_range(), Some((Iova(base + 7 * PAGE), PAGE)), "S=0: one page");
        assert!(dev.holds(base + 8 * PAGE), "a page-selective invalidation keeps the neighbours");
    }
    // three pages straddling an 8-page boundary: the PSI block and the device range agree
    assert_eq!(d.unmap(did, Iova(base + 6 * PAGE), 3 * PAGE), Ok(2 * PAGE));
    for p in 6..9 {
        assert_gone(&unit, &devices, base + p * PAGE);
    }
    for dev in &devices {
        assert_eq!(dev.last_range(), Some((Iova(base), 16 * PAGE)));
    }
    // the superpage
    assert_eq!(d.unmap(did, Iova(base + 2 * MIB), 2 * MIB), Ok(2 * MIB));
    assert_gone(&unit, &devices, base + 2 * MIB + 0x5000);
    // everything else, retiring tables (IH=0)
    assert_eq!(d.unmap(did, Iova(base), 64 * PAGE), Ok(61 * PAGE));
    for p in 0..64 {
        assert_gone(&unit, &devices, base + p * PAGE);
    }
    assert_eq!(unit.stats().stale_iotlb_uses, 0);
    assert_eq!(unit.stats().device_tlb_timeouts, 0);
}

#[test]
fn a_domain_selective_fallback_invalidates_whole_device_tlbs() {
    let unit = unit_with(UnitConfig::default());
    let d = driver(&unit, FlushPolicy::Strict);
    let did = d.create_domain(DomainKind::Paging, AW).expect("domain");
    let dev = Device::new(&unit, sid(3, 1), Answer::Sync);
    d.attach(dev.sid, did, true).expect("attach");
    // 2 GiB straddling a 1 GiB boundary needs more than MAMV=18: domain-selective
    d.map(did, Iova(0x4000_0000 - PAGE), Hpa(0x1000_0000), 2 * PAGE, Perm::RW).expect("map");
    warm(&unit, std::slice::from_ref(&dev), 0x4000_0000 - PAGE);
    warm(&unit, std::slice::from_ref(&dev), 0x4000_0000);
    assert_eq!(d.unmap(did, Iova(0x4000_0000 - PAGE), 2 * PAGE), Ok(2 * PAGE));
    assert_eq!(dev.last_range(), Some((Iova(0), u64::MAX)), "the whole space");
    assert_gone(&unit, std::slice::from_ref(&dev), 0x4000_0000 - PAGE);
    assert_gone(&unit, std::slice::from_ref(&dev), 0x4000_0000);
}

#[test]
fn detach_and_attach_invalidate_the_device_tlb() {
    let unit = unit_with(UnitConfig::default());
    let d = driver(&unit, FlushPolicy::Strict);
    let a = d.create_domain(DomainKind::Paging, AW).expect("domain");
    let b = d.create_domain(DomainKind::Paging, AW).expect("domain");
    let dev = Device::new(&unit, sid(4, 0), Answer::Sync);
    d.attach(dev.sid, a, true).expect("attach");
    assert_eq!(dev.last_range(), Some((Iova(0), u64::MAX)), "attach starts from an empty device TLB");
    d.map(a, Iova(0x1000), Hpa(0x10_0000), PAGE, Perm::RW).expect("map");
    assert!(dev.translate(0x1000).is_some());
    let sent = dev.requests.lock().len();
    // moving to another domain: the old domain's translation must not survive anywhere
    d.attach(dev.sid, b, true).expect("re-attach");
    assert!(!dev.holds(0x1000));
    assert_eq!(dev.requests.lock().len(), sent + 1, "one invalidate-all, not two");
    assert!(ats_no_access(&unit, dev.sid, 0x1000));
    d.map(b, Iova(0x1000), Hpa(0x30_0000), PAGE, Perm::RW).expect("map");
    assert_eq!(dev.translate(0x1000).map(|e| e.translated), Some(Hpa(0x30_0000)));
    assert_eq!(d.detach(dev.sid), Ok(Some(b)));
    assert!(!dev.holds(0x1000));
    assert_eq!(unit.ats_translate(dev.sid, Iova(0x1000), false), AtsCompletion::UnsupportedRequest);
}

#[test]
fn answers_from_other_threads_in_any_order_with_concurrent_submitters() {
    let unit = unit_with(UnitConfig::default());
    let d = Arc::new(driver(&unit, FlushPolicy::Strict));
    let tx = completer_threads();
    let workers: Vec<_> = (0..3u8)
        .map(|t| {
            let (unit, d) = (unit.clone(), d.clone());
            let devices: Vec<Arc<Device>> =
                (0..4).map(|i| Device::new(&unit, sid(10 + t, i), Answer::Threads(tx.clone()))).collect();
            std::thread::spawn(move || {
                let did = d.create_domain(DomainKind::Paging, AW).expect("domain");
                for dev in &devices {
                    d.attach(dev.sid, did, true).expect("attach");
                }
                for i in 0..60u64 {
                    let iova = 0x1_0000_0000 + (i % 7) * 2 * MIB + (i % 5) * PAGE;
                    let pages = 1 + i % 3;
                    d.map(did, Iova(iova), Hpa(0x1000_0000 + i * PAGE), pages * PAGE, Perm::RW).expect("map");
                    for p in 0..pages {
                        warm(&unit, &devices, iova + p * PAGE);
                    }
                    assert_eq!(d.unmap(did, Iova(iova), pages * PAGE), Ok(pages * PAGE));
                    for p in 0..pages {
                        assert_gone(&unit, &devices, iova + p * PAGE);
                    }
                }
                devices.iter().map(|dev| dev.completed.load(Ordering::Relaxed)).sum::<usize>()
            })
        })
        .collect();
    let completed: usize = workers.into_iter().map(|w| w.join().expect("worker")).sum();
    // 3 domains x 4 devices x (1 attach + 60 unmaps)
    assert_eq!(completed, 3 * 4 * 61);
    assert_eq!(unit.stats().device_tlb_completions, completed as u64);
    assert_eq!(unit.stats().stale_iotlb_uses, 0);
}

// ---------------------------------------------------------------------------------------
// (b) a device that never answers

#[test]
fn a_silent_device_times_out_and_everything_else_keeps_working() {
    let timeout = Duration::from_millis(50);
    let clock = Arc::new(ManualClock::new());
    let unit = unit_on(UnitConfig::default().with_device_tlb_timeout(timeout), &clock);
    let d = driver(&unit, FlushPolicy::Strict);
    let a = d.create_domain(DomainKind::Paging, AW).expect("domain");
    let b = d.create_domain(DomainKind::Paging, AW).expect("domain");
    let silent = Device::new(&unit, sid(5, 0), Answer::Sync);
    let healthy = Device::new(&unit, sid(5, 1), Answer::Sync);
    let other = Device::new(&unit, sid(6, 0), Answer::Threads(completer_threads()));
    d.attach(silent.sid, a, true).expect("attach");
    d.attach(healthy.sid, a, true).expect("attach");
    d.attach(other.sid, b, true).expect("attach");
    // From now on the first device stops answering.
    let silent = {
        unit.unbind_device_port(silent.sid);
        Device::new(&unit, silent.sid, Answer::Never)
    };
    let time = Timekeeper::start(clock.clone(), timeout, silent.clone(), vec![healthy.clone(), other.clone()]);

    d.map(a, Iova(0x8000), Hpa(0x10_0000), 4 * PAGE, Perm::RW).expect("map");
    let both = [silent.clone(), healthy.clone()];
    warm(&unit, &both, 0x8000);
    let start = clock.now();
    assert_eq!(d.unmap(a, Iova(0x8000), PAGE), Err(DriverError::DeviceTlbTimeout { sid: silent.sid }));
    assert!(clock.now() - start >= timeout, "only a time-out ends the wait");
    // The IOTLB and the healthy device were invalidated all the same; ITE is cleared.
    assert!(unmapped(&unit, healthy.sid, 0x8000));
    assert!(ats_no_access(&unit, healthy.sid, 0x8000));
    assert!(!healthy.holds(0x8000));
    assert!(silent.holds(0x8000), "only the silent device may still cache it");
    assert_eq!(fsts(&unit) & (fsts::ITE | fsts::IQE | fsts::ICE), 0);
    assert!(unit.stats().device_tlb_timeouts >= 1);

    // Other domains and devices are unaffected.
    d.map(b, Iova(0x8000), Hpa(0x20_0000), PAGE, Perm::RW).expect("map");
    warm(&unit, std::slice::from_ref(&other), 0x8000);
    assert_eq!(d.unmap(b, Iova(0x8000), PAGE), Ok(PAGE));
    assert_gone(&unit, std::slice::from_ref(&other), 0x8000);

    // Detaching the silent device times out too, but it is detached: its translated
    // requests are blocked, so its stale entries are harmless.
    assert_eq!(d.detach(silent.sid), Err(DriverError::DeviceTlbTimeout { sid: silent.sid }));
    assert_eq!(d.domain_of(silent.sid), None);
    assert!(unit.check_translated(silent.sid, Hpa(0x10_0000), 8, Direction::Read).is_err());
    // Without it the domain's unmaps complete again.
    warm(&unit, std::slice::from_ref(&healthy), 0x9000);
    assert_eq!(d.unmap(a, Iova(0x9000), PAGE), Ok(PAGE));
    assert_gone(&unit, std::slice::from_ref(&healthy), 0x9000);
    // A device whose TLB cannot be confirmed empty does not get ATS back.
    assert_eq!(d.attach(silent.sid, a, true), Err(DriverError::DeviceTlbTimeout { sid: silent.sid }));
    assert_eq!(d.domain_of(silent.sid), None);
    assert_eq!(fsts(&unit) & fsts::ITE, 0);
    assert_eq!(time.stop(), 3, "unmap, detach and attach each timed out once");
}

#[test]
fn a_time_out_aborts_other_submitters_who_resubmit() {
    let timeout = Duration::from_millis(50);
    let clock = Arc::new(ManualClock::new());
    let unit = unit_on(UnitConfig::default().with_device_tlb_timeout(timeout), &clock);
    let d = Arc::new(driver(&unit, FlushPolicy::Strict));
    let tx = completer_threads();
    let a = d.create_domain(DomainKind::Paging, AW).expect("domain");
    let silent = Device::new(&unit, sid(7, 0), Answer::Sync);
    d.attach(silent.sid, a, true).expect("attach");
    // From now on it stops answering.
    unit.unbind_device_port(silent.sid);
    let silent = Device::new(&unit, silent.sid, Answer::Never);
    d.map(a, Iova(0), Hpa(0x10_0000), 8 * PAGE, Perm::RW).expect("map");
    let devices: Vec<Arc<Device>> =
        (0..3).map(|i| Device::new(&unit, sid(8, i), Answer::Threads(tx.clone()))).collect();
    let time = Timekeeper::start(clock.clone(), timeout, silent.clone(), devices.clone());

    let done = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let busy = {
        let (unit, d, done, rounds) = (unit.clone(), d.clone(), done.clone(), rounds.clone());
        std::thread::spawn(move || {
            let b = d.create_domain(DomainKind::Paging, AW).expect("domain");
            for dev in &devices {
                d.attach(dev.sid, b, true).expect("attach");
            }
            // Until the other domain's time-outs are over, and at least 10 times.
            while !done.load(Ordering::Acquire) || rounds.load(Ordering::Relaxed) < 10 {
                d.map(b, Iova(0x7000), Hpa(0x40_0000), PAGE, Perm::RW).expect("map");
                warm(&unit, &devices, 0x7000);
                // Aborted by the other domain's time-out or not, this completes.
                assert_eq!(d.unmap(b, Iova(0x7000), PAGE), Ok(PAGE));
                assert_gone(&unit, &devices, 0x7000);
                rounds.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // The time-outs start once the other domain is busy.
    while rounds.load(Ordering::Relaxed) == 0 {
        std::thread::yield_now();
    }
    for p in 0..3 {
        assert_eq!(d.unmap(a, Iova(p * PAGE), PAGE), Err(DriverError::DeviceTlbTimeout { sid: silent.sid }));
        assert!(unmapped(&unit, silent.sid, p * PAGE));
    }
    done.store(true, Ordering::Release);
    busy.join().expect("busy thread");
    eprintln!("{} strict unmaps on the other domain during 3 time-outs", rounds.load(Ordering::Relaxed));
    assert_eq!(time.stop(), 3);
    assert_eq!(fsts(&unit) & fsts::ITE, 0);
}

// ---------------------------------------------------------------------------------------
// (c) deferred

const LAZY: FlushPolicy = FlushPolicy::Deferred { max_entries: 1000, max_delay: Duration::from_secs(3600) };

struct Lazy {
    unit: Arc<Unit>,
    d: Driver,
    did: DomainId,
    dev: Arc<Device>,
}

fn lazy(policy: FlushPolicy) -> Lazy {
    lazy_with(policy, unit_with(UnitConfig::default()))
}

fn lazy_on(policy: FlushPolicy, clock: &Arc<ManualClock>) -> Lazy {
    lazy_with(policy, unit_on(UnitConfig::default(), clock))
}

fn lazy_with(policy: FlushPolicy, unit: Arc<Unit>) -> Lazy {
    let d = driver(&unit, policy);
    let did = d.create_domain(DomainKind::Paging, AW).expect("domain");
    let dev = Device::new(&unit, sid(9, 0), Answer::Sync);
    d.attach(dev.sid, did, true).expect("attach");
    Lazy { unit, d, did, dev }
}

impl Lazy {
    fn map_warm(&self, iova: u64, hpa: u64) {
        self.d.map(self.did, Iova(iova), Hpa(hpa), PAGE, Perm::RW).expect("map");
        warm(&self.unit, std::slice::from_ref(&self.dev), iova);
    }

    /// Still served from the IOTLB (counted as a stale use) and the device TLB.
    fn stale(&self, iova: u64) -> bool {
        let before = self.unit.stats().stale_iotlb_uses;
        let served = hpa_of(&self.unit, self.dev.sid, iova).is_some();
        served && self.unit.stats().stale_iotlb_uses > before && self.dev.holds(iova)
    }

    fn gone(&self, iova: u64) {
        assert_gone(&self.unit, std::slice::from_ref(&self.dev), iova);
    }
}

#[test]
fn deferred_unmap_returns_before_invalidating_and_flush_catches_up() {
    let t = lazy(LAZY);
    t.map_warm(0x1000, 0x10_0000);
    let sent = t.dev.requests.lock().len();
    assert_eq!(t.d.unmap(t.did, Iova(0x1000), PAGE), Ok(PAGE));
    assert_eq!(t.d.pending_deferred(), 1);
    assert!(t.stale(0x1000), "the unit still serves the old translation");
    assert_eq!(t.dev.requests.lock().len(), sent, "no device-TLB invalidation yet");
    t.d.flush_deferred().expect("flush");
    assert_eq!(t.d.pending_deferred(), 0);
    t.gone(0x1000);
    assert_eq!(t.dev.last_range(), Some((Iova(0), u64::MAX)), "a deferred flush drops the whole device TLB");
}

#[test]
fn deferred_flush_after_max_entries() {
    let t = lazy(FlushPolicy::Deferred { max_entries: 4, max_delay: Duration::from_secs(3600) });
    for p in 1..=4 {
        t.map_warm(p * PAGE, 0x10_0000 + p * PAGE);
    }
    let waits = t.unit.stats().qi_wait;
    for p in 1..=3 {
        assert_eq!(t.d.unmap(t.did, Iova(p * PAGE), PAGE), Ok(PAGE));
    }
    assert_eq!(t.d.pending_deferred(), 3);
    assert!(t.stale(PAGE) && t.stale(3 * PAGE));
    assert_eq!(t.d.unmap(t.did, Iova(4 * PAGE), PAGE), Ok(PAGE));
    assert_eq!(t.d.pending_deferred(), 0);
    assert_eq!(t.unit.stats().qi_wait - waits, 1, "four unmaps, one flush, one wait");
    for p in 1..=4 {
        t.gone(p * PAGE);
    }
}

#[test]
fn deferred_flush_after_max_delay() {
    let policy = FlushPolicy::Deferred { max_entries: 1000, max_delay: Duration::from_millis(20) };
    let clock = Arc::new(ManualClock::new());
    let t = lazy_on(policy, &clock);
    t.map_warm(0x1000, 0x10_0000);
    t.map_warm(0x2000, 0x20_0000);
    assert_eq!(t.d.unmap(t.did, Iova(0x1000), PAGE), Ok(PAGE));
    assert!(!t.d.deferred_due());
    assert!(t.stale(0x1000));
    clock.advance(Duration::from_millis(19));
    assert!(!t.d.deferred_due());
    clock.advance(Duration::from_millis(1));
    assert!(t.d.deferred_due());
    // No other driver call runs the overdue flush behind its caller's back (here: a lookup
    // and a map elsewhere in the same domain).
    assert!(t.d.lookup(t.did, Iova(0x2000)).is_some());
    t.d.map(t.did, Iova(0x20_0000), Hpa(0x30_0000), PAGE, Perm::RW).expect("map elsewhere");
    assert!(t.d.deferred_due());
    assert_eq!(t.d.pending_deferred(), 1);
    assert!(t.stale(0x1000));
    // The owner's timer does.
    t.d.poll_deferred().expect("poll");
    assert!(!t.d.deferred_due());
    assert_eq!(t.d.pending_deferred(), 0);
    t.gone(0x1000);

    // A poll before the deadline flushes nothing.
    assert_eq!(t.d.unmap(t.did, Iova(0x2000), PAGE), Ok(PAGE));
    t.d.poll_deferred().expect("not due yet");
    assert_eq!(t.d.pending_deferred(), 1);
    clock.advance(Duration::from_millis(30));
    t.d.poll_deferred().expect("poll");
    assert_eq!(t.d.pending_deferred(), 0);
    t.gone(0x2000);
}

#[test]
fn a_map_over_a_deferred_range_flushes_first() {
    let t = lazy(LAZY);
    // A neighbour keeps the tables, so only leaves go stale (an unmap that retires tables
    // makes their whole span stale: a map anywhere in it would flush).
    t.map_warm(0x9000, 0x12_0000);
    t.map_warm(0x5000, 0x10_0000);
    t.map_warm(0x6000, 0x11_0000);
    assert_eq!(t.d.unmap(t.did, Iova(0x5000), 2 * PAGE), Ok(2 * PAGE));
    assert!(t.stale(0x5000) && t.stale(0x6000));
    // Elsewhere: no flush needed.
    t.d.map(t.did, Iova(0x20_0000), Hpa(0x30_0000), PAGE, Perm::RW).expect("map elsewhere");
    assert_eq!(t.d.pending_deferred(), 1);
    // The same IOVA, remapped: must never be served the old translation.
    t.d.map(t.did, Iova(0x6000), Hpa(0x40_0000), PAGE, Perm::READ).expect("remap");
    assert_eq!(t.d.pending_deferred(), 0);
    let stale_before = t.unit.stats().stale_iotlb_uses;
    assert_eq!(hpa_of(&t.unit, t.dev.sid, 0x6000), Some(Hpa(0x40_0000)));
    assert_eq!(t.dev.translate(0x6000).map(|e| (e.translated, e.write)), Some((Hpa(0x40_0000), false)));
    t.gone(0x5000);
    assert_eq!(t.unit.stats().stale_iotlb_uses, stale_before);
}

#[test]
fn tables_retired_by_a_deferred_unmap_are_not_reused_before_the_flush() {
    let t = lazy(LAZY);
    let region_a = 0x4000_0000u64; // a 2 MiB region with its own last-level table
    let region_b = region_a + 4 * MIB; // another one under the same level-2 table
    // Keeps the upper tables alive, so that only region A's last-level table retires and
    // region B stays outside the deferred range (a map there needs no flush).
    t.d.map(t.did, Iova(region_a + 8 * MIB), Hpa(0x60_0000), PAGE, Perm::RW).expect("map");
    t.map_warm(region_a, 0x10_0000);
    t.d.map(t.did, Iova(region_a + PAGE), Hpa(0x11_0000), PAGE, Perm::RW).expect("map");
    let frames = t.d.table_frames_in_use();
    // The walk above cached region A's last-level table in the paging-structure cache.
    assert_eq!(t.d.unmap(t.did, Iova(region_a), 2 * PAGE), Ok(2 * PAGE));
    assert_eq!(t.d.table_frames_in_use(), frames, "retired tables are still held");
    // New tables for region B must come from fresh frames. Were region A's last-level
    // table reused for region B, a walk of A+1 through the stale paging-structure entry
    // would find B's leaf at the same index and translate.
    t.d.map(t.did, Iova(region_b + PAGE), Hpa(0x50_0000), PAGE, Perm::RW).expect("map");
    assert_eq!(t.d.pending_deferred(), 1, "no flush was needed");
    assert!(unmapped(&t.unit, t.dev.sid, region_a + PAGE), "A+1 must not translate through a reused table");
    assert_eq!(hpa_of(&t.unit, t.dev.sid, region_b + PAGE), Some(Hpa(0x50_0000)));
    let with_b = t.d.table_frames_in_use();
    t.d.flush_deferred().expect("flush");
    assert!(t.d.table_frames_in_use() < with_b, "freed after the flush");
    t.gone(region_a);
    t.gone(region_a + PAGE);
}

#[test]
fn the_policy_can_be_chosen_per_unmap() {
    let t = lazy(LAZY);
    t.map_warm(0x1000, 0x10_0000);
    t.map_warm(0x2000, 0x20_0000);
    assert_eq!(t.d.unmap_with(t.did, Iova(0x1000), PAGE, FlushPolicy::Strict), Ok(PAGE));
    t.gone(0x1000);
    assert_eq!(t.d.pending_deferred(), 0);

    let unit = unit_with(UnitConfig::default());
    let d = driver(&unit, FlushPolicy::Strict);
    let did = d.create_domain(DomainKind::Paging, AW).expect("domain");
    let s = sid(1, 1);
    d.attach(s, did, false).expect("attach");
    d.map(did, Iova(0x3000), Hpa(0x30_0000), PAGE, Perm::RW).expect("map");
    assert!(hpa_of(&unit, s, 0x3000).is_some());
    assert_eq!(d.unmap_with(did, Iova(0x3000), PAGE, FlushPolicy::DEFERRED), Ok(PAGE));
    assert!(hpa_of(&unit, s, 0x3000).is_some(), "stale until the flush");
    d.flush_deferred().expect("flush");
    assert!(unmapped(&unit, s, 0x3000));
}

#[test]
fn destroying_a_domain_settles_its_deferred_unmaps() {
    let t = lazy(LAZY);
    let base_frames = t.d.table_frames_in_use();
    t.map_warm(0x4000_0000, 0x10_0000);
    assert_eq!(t.d.unmap(t.did, Iova(0x4000_0000), PAGE), Ok(PAGE));
    assert_eq!(t.d.detach(t.dev.sid), Ok(Some(t.did)));
    t.d.destroy_domain(t.did).expect("destroy");
    assert_eq!(t.d.pending_deferred(), 0);
    assert!(!t.d.deferred_due());
    // root + context table, with the domain's top table and the retired ones all freed
    assert_eq!(t.d.table_frames_in_use(), base_frames - 1);
    assert!(!t.dev.holds(0x4000_0000));
}

// ---------------------------------------------------------------------------------------
// (d) deferred against a reference model

#[derive(Clone, Debug)]
enum Op {
    Map { page: u64, pages: u64, frame: u64 },
    Unmap { page: u64, pages: u64 },
    Translate { page: u64 },
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    // Pages in two 2 MiB regions and across the 1 GiB boundary between them, so unmaps
    // retire tables and maps land on freshly retired ranges.
    let page = prop_oneof![0..1024u64, (P1G - 512)..(P1G + 512), 0..16u64];
    prop_oneof![
        4 => (page.clone(), 1..8u64, 0..100_000u64).prop_map(|(page, pages, frame)| Op::Map { page, pages, frame }),
        3 => (page.clone(), 1..600u64).prop_map(|(page, pages)| Op::Unmap { page, pages }),
        4 => page.prop_map(|page| Op::Translate { page }),
        1 => Just(Op::Flush),
    ]
}

const P1G: u64 = 512 * 512;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// With deferred flushing a mapped page always translates to its current frame (never
    /// to a stale one), an unmapped page translates at most to a frame it had before, and
    /// after a flush nothing unmapped translates and every table frame is back.
    #[test]
    fn deferred_never_serves_a_stale_translation_for_a_mapped_page(
        ops in prop::collection::vec(op(), 1..60),
        max_entries in 1..12usize,
    ) {
        let policy = FlushPolicy::Deferred { max_entries, max_delay: Duration::from_secs(3600) };
        let unit = unit_with(UnitConfig::default());
        let d = driver(&unit, policy);
        let did = d.create_domain(DomainKind::Paging, AW).expect("domain");
        let dev = Device::new(&unit, sid(0x20, 0), Answer::Sync);
        d.attach(dev.sid, did, true).expect("attach");
        let baseline = d.table_frames_in_use();
        let mut model: HashMap<u64, u64> = HashMap::new();
        let mut history: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut probes: Vec<u64> = Vec::new();
        let check = |model: &HashMap<u64, u64>, history: &HashMap<u64, Vec<u64>>, page: u64|
            -> Result<(), TestCaseError> {
            let iova = page * PAGE;
            let got = hpa_of(&unit, dev.sid, iova).map(|h| h.0 / PAGE);
            let ats = dev.translate(iova).map(|e| e.translated.0 / PAGE);
            match model.get(&page) {
                Some(&frame) => {
                    prop_assert_eq!(got, Some(frame), "page {:#x} mapped", page);
                    prop_assert_eq!(ats, Some(frame), "page {:#x} device TLB", page);
                }
                None => {
                    let old = history.get(&page).cloned().unwrap_or_default();
                    for f in [got, ats].into_iter().flatten() {
                        prop_assert!(old.contains(&f), "page {:#x} unmapped but translates to {:#x}", page, f);
                    }
                }
            }
            Ok(())
        };
        for op in &ops {
            let edges = match *op {
                Op::Map { page, pages, .. } | Op::Unmap { page, pages } => vec![page, page + pages - 1],
                Op::Translate { .. } | Op::Flush => Vec::new(),
            };
            match *op {
                Op::Map { page, pages, frame } => {
                    let free = (page..page + pages).all(|p| !model.contains_key(&p));
                    let got = d.map(did, Iova(page * PAGE), Hpa(frame * PAGE), pages * PAGE, Perm::RW);
                    prop_assert_eq!(got.is_ok(), free, "{:?}", got);
                    if free {
                        for p in 0..pages {
                            model.insert(page + p, frame + p);
                            history.entry(page + p).or_default().push(frame + p);
                        }
                    }
                }
                Op::Unmap { page, pages } => {
                    let n = (page..page + pages).filter(|p| model.remove(p).is_some()).count() as u64;
                    prop_assert_eq!(d.unmap(did, Iova(page * PAGE), pages * PAGE), Ok(n * PAGE));
                }
                Op::Translate { page } => {
                    probes.push(page);
                    if probes.len() > 16 {
                        probes.remove(0);
                    }
                }
                Op::Flush => d.flush_deferred().expect("flush"),
            }
            for &p in probes.iter().chain(&edges) {
                check(&model, &history, p)?;
            }
            // The domain's frames are every table frame but the root and context tables,
            // retired tables waiting for the flush included.
            prop_assert_eq!(d.domain_frames(did), Ok(d.table_frames_in_use() - (baseline - 1)));
        }
        d.flush_deferred().expect("flush");
        for &p in &probes {
            let iova = p * PAGE;
            if !model.contains_key(&p) {
                prop_assert!(unmapped(&unit, dev.sid, iova) && !dev.holds(iova), "page {:#x} after the flush", p);
            }
        }
        let pages: Vec<u64> = model.keys().copied().collect();
        for p in pages {
            prop_assert_eq!(d.unmap(did, Iova(p * PAGE), PAGE), Ok(PAGE));
        }
        d.flush_deferred().expect("flush");
        prop_assert_eq!(d.table_frames_in_use(), baseline);
    }
}
