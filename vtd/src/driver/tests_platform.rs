//! Tests of one driver over several units sharing one host memory: routing requester ids to
//! units, domains spanning units, invalidation reaching every spanned unit (and only
//! those), per-unit features, the isolation of a unit whose device stalls, and a property
//! test against a model.
//!
//! Every unit runs with stale detection off: a cache hit then keeps serving the old
//! translation, so a missed invalidation shows as a translation that still succeeds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex as PlMutex;
use proptest::prelude::*;

use super::*;
use crate::clock::ManualClock;
use crate::ids::{Hpa, Iova, SourceId};
use crate::platform::{DEFAULT_REGISTER_BASE, ScopeEntry, UnitDriver, UnitScope, UnitSpec};
use crate::unit::prq::{PageRequest, ResponseCode};
use crate::unit::tables::AddressWidth;
use crate::unit::{Blocked, DeviceInvalidation, DevicePort, Direction, FaultReason, PageRequestOutcome};

const MEMORY: u64 = 256 << 20;
const PAGE: u64 = 4096;
const AW: AddressWidth = AddressWidth::Aw48;

/// The first bus behind unit `i`'s bridge: unit `i` covers buses `bus(i)..=bus(i) + 0xf`.
const fn bus(i: usize) -> u8 {
    0x10 * (i as u8 + 1)
}

/// Function `dev` on unit `i`'s first bus.
const fn sid_on(i: usize, dev: u8) -> SourceId {
    SourceId::new(bus(i), dev, 0)
}

/// A requester id no unit covers.
const UNROUTED: SourceId = SourceId::new(0xf0, 1, 0);

/// A platform of `n` built-in units, unit `i` covering the sub-hierarchy below the bridge
/// at 00:0(i+1).0.
fn spec(n: usize, config: UnitConfig) -> PlatformSpec {
    let mut spec = PlatformSpec::single(MEMORY, config);
    spec.units = (0..n)
        .map(|i| UnitSpec {
            name: format!("dmar{i}"),
            register_base: DEFAULT_REGISTER_BASE + 0x1000 * i as u64,
            scope: UnitScope::Devices(vec![ScopeEntry::Bridge {
                bridge: SourceId::new(0, i as u8 + 1, 0),
                buses: bus(i)..=bus(i) + 0xf,
            }]),
            config,
            driver: UnitDriver::BuiltIn,
        })
        .collect();
    spec
}

/// The units of a platform over one memory, on one manual clock.
struct Platform {
    spec: PlatformSpec,
    clock: Arc<ManualClock>,
    units: Vec<Arc<Unit>>,
}

impl Platform {
    fn new(n: usize, config: UnitConfig) -> Self {
        let spec = spec(n, config.with_stale_detection(false));
        let memory = Arc::new(HostMemory::new(MEMORY).unwrap());
        let clock = Arc::new(ManualClock::new());
        let units = spec
            .units
            .iter()
            .map(|u| Arc::new(Unit::builder(u.config, memory.clone()).clock(clock.clone()).build()))
            .collect();
        Self { spec, clock, units }
    }

    /// A driver of the units `which` (by index), with the platform's routing.
    fn driver_of(&self, which: &[usize], flush: FlushPolicy) -> Result<Driver, DriverError> {
        let units = which.iter().map(|&i| (UnitId(i as u16), self.units[i].clone())).collect();
        Driver::for_units(units, Routing::new(&self.spec), DriverConfig::for_memory(MEMORY).with_flush(flush))
    }

    fn driver(&self) -> Driver {
        let all: Vec<usize> = (0..self.units.len()).collect();
        self.driver_of(&all, FlushPolicy::Strict).unwrap()
    }
}

/// An ATS function behind a unit that answers device-TLB invalidations at once, or never
/// once `stall` is set (a vanished device).
#[derive(Debug)]
struct Device {
    sid: SourceId,
    unit: Weak<Unit>,
    stall: AtomicBool,
    received: PlMutex<Vec<DeviceInvalidation>>,
}

impl Device {
    fn bind(unit: &Arc<Unit>, sid: SourceId) -> Arc<Device> {
        let dev = Arc::new(Device {
            sid,
            unit: Arc::downgrade(unit),
            stall: AtomicBool::new(false),
            received: PlMutex::new(Vec::new()),
        });
        unit.bind_device_port(sid, dev.clone(), 8).unwrap();
        dev
    }

    fn received(&self) -> usize {
        self.received.lock().len()
    }
}

impl DevicePort for Device {
    fn invalidate(&self, request: DeviceInvalidation) {
        self.received.lock().push(request);
        if !self.stall.load(Ordering::Acquire)
            && let Some(unit) = self.unit.upgrade()
        {
            // The unit calls ports without its lock: answering from here is allowed.
            let _ = unit.device_tlb_completed(self.sid, request.itag);
        }
    }
}

fn translate(unit: &Unit, sid: SourceId, iova: u64) -> Result<Hpa, Blocked> {
    unit.translate(sid, Iova(iova), Direction::Read).map(|t| t.hpa)
}

fn blocked(reason: FaultReason) -> Result<Hpa, Blocked> {
    Err(Blocked { reason: Some(reason) })
}

#[test]
fn requester_ids_route_to_their_unit_and_the_rest_is_refused() {
    let p = Platform::new(3, UnitConfig::default());
    let d = p.driver();
    assert_eq!(d.units().map(|(id, _)| id).collect::<Vec<_>>(), [UnitId(0), UnitId(1), UnitId(2)]);
    assert!(Arc::ptr_eq(d.unit(), &p.units[0]), "unit() is the first unit");
    assert!(d.unit_by_id(UnitId(2)).is_some_and(|u| Arc::ptr_eq(u, &p.units[2])));
    assert!(d.unit_by_id(UnitId(3)).is_none());
    for i in 0..3 {
        assert_eq!(d.unit_of(sid_on(i, 4)), Ok(UnitId(i as u16)));
        assert_eq!(d.unit_of(SourceId::new(bus(i) + 0xf, 31, 7)), Ok(UnitId(i as u16)));
        assert!(p.units[i].translation_enabled());
    }
    // Each unit has its own root table: root + nothing else per unit.
    assert_eq!(d.table_frames_in_use(), 3);

    let did = d.create_domain(DomainKind::Paging, AW).unwrap();
    assert_eq!(d.unit_of(UNROUTED), Err(DriverError::NoUnit(UNROUTED)));
    assert_eq!(d.attach(UNROUTED, did, false), Err(DriverError::NoUnit(UNROUTED)));
    assert_eq!(d.detach(UNROUTED), Ok(None));
    assert_eq!(d.domain_of(UNROUTED), None);
    assert_eq!(DriverError::NoUnit(UNROUTED).to_string(), "no remapping unit covers requester f0:01.0");

    // A driver of units 0 and 2 only: unit 1's devices are someone else's.
    let q = Platform::new(3, UnitConfig::default());
    let partial = q.driver_of(&[0, 2], FlushPolicy::Strict).unwrap();
    let did = partial.create_domain(DomainKind::Paging, AW).unwrap();
    let sid = sid_on(1, 2);
    let not_driven = DriverError::NotDriven { sid, unit: UnitId(1) };
    assert_eq!(partial.unit_of(sid), Err(not_driven.clone()));
    assert_eq!(partial.attach(sid, did, false), Err(not_driven.clone()));
    assert_eq!(not_driven.to_string(), "requester 20:02.0 is behind unit 1, which this driver does not drive");
    assert_eq!(partial.enable_interrupt_remapping_on(UnitId(1)), Err(DriverError::UnknownUnit(UnitId(1))));
    assert_eq!(partial.service_faults_on(UnitId(1)), Err(DriverError::UnknownUnit(UnitId(1))));
    assert_eq!(partial.submit_descriptors_on(UnitId(9), &[]), Err(DriverError::UnknownUnit(UnitId(9))));
    assert_eq!(DriverError::UnknownUnit(UnitId(9)).to_string(), "unit 9 is not driven by this driver");
}

#[test]
fn the_units_must_be_given_once_each_over_one_memory() {
    let p = Platform::new(2, UnitConfig::default());
    let routing = Routing::new(&p.spec);
    let config = DriverConfig::for_memory(MEMORY);
    assert_eq!(Driver::for_units(vec![], routing.clone(), config).map(|_| ()), Err(DriverError::NoUnits));
    let twice = vec![(UnitId(0), p.units[0].clone()), (UnitId(0), p.units[1].clone())];
    assert_eq!(
        Driver::for_units(twice, routing.clone(), config).map(|_| ()),
        Err(DriverError::DuplicateUnit(UnitId(0)))
    );
    let elsewhere = Arc::new(Unit::new(UnitConfig::default(), Arc::new(HostMemory::new(MEMORY).unwrap())));
    let mixed = vec![(UnitId(0), p.units[0].clone()), (UnitId(1), elsewhere)];
    assert_eq!(Driver::for_units(mixed, routing, config).map(|_| ()), Err(DriverError::ForeignMemory(UnitId(1))));
}

#[test]
fn a_domain_spans_the_units_of_its_devices_and_an_unmap_invalidates_each() {
    let p = Platform::new(2, UnitConfig::default());
    let d = p.driver();
    let (a, b, c) = (sid_on(0, 1), sid_on(1, 1), sid_on(1, 2));
    let (dev_a, dev_b) = (Device::bind(&p.units[0], a), Device::bind(&p.units[1], b));
    let did = d.create_domain(DomainKind::Paging, AW).unwrap();
    assert_eq!(d.domain_units(did), []);
    d.attach(a, did, true).unwrap();
    assert_eq!(d.domain_units(did), [UnitId(0)]);
    d.attach(b, did, true).unwrap();
    d.attach(c, did, false).unwrap();
    assert_eq!(d.domain_units(did), [UnitId(0), UnitId(1)]);
    assert_eq!(d.attached(did), [a, b, c]);

    // One page table, read through both units.
    d.map(did, Iova(0x40_0000), Hpa(0x80_0000), 4 * PAGE, Perm::RW).unwrap();
    for iova in [0x40_0000, 0x40_3123] {
        let hpa = Hpa(0x80_0000 + (iova - 0x40_0000));
        assert_eq!(translate(&p.units[0], a, iova), Ok(hpa));
        assert_eq!(translate(&p.units[1], b, iova), Ok(hpa));
        assert_eq!(translate(&p.units[1], c, iova), Ok(hpa));
    }
    // A unit knows only its own devices: unit 0 has no context table for unit 1's bus.
    assert_eq!(translate(&p.units[0], b, 0x40_0000), blocked(FaultReason::RootEntryNotPresent));

    let before: Vec<_> = p.units.iter().map(|u| u.stats().qi_iotlb).collect();
    let received = (dev_a.received(), dev_b.received());
    assert_eq!(d.unmap(did, Iova(0x40_0000), 2 * PAGE), Ok(2 * PAGE));
    for (i, u) in p.units.iter().enumerate() {
        assert_eq!(u.stats().qi_iotlb, before[i] + 1, "unit {i} got one IOTLB invalidation");
    }
    assert_eq!((dev_a.received(), dev_b.received()), (received.0 + 1, received.1 + 1), "each through its unit");
    for iova in [0x40_0000, 0x40_1fff] {
        assert_eq!(translate(&p.units[0], a, iova), blocked(FaultReason::NoRead));
        assert_eq!(translate(&p.units[1], b, iova), blocked(FaultReason::NoRead));
        assert_eq!(translate(&p.units[1], c, iova), blocked(FaultReason::NoRead));
    }
    assert_eq!(translate(&p.units[1], c, 0x40_2000), Ok(Hpa(0x80_2000)), "the rest stays mapped");
    assert!(p.units.iter().all(|u| u.stats().device_tlb_timeouts == 0));
}

#[test]
fn detach_shrinks_the_span_and_destroy_waits_for_every_unit() {
    let p = Platform::new(2, UnitConfig::default());
    let d = p.driver();
    let base = d.table_frames_in_use();
    let (a, b) = (sid_on(0, 1), sid_on(1, 1));
    let did = d.create_domain(DomainKind::Paging, AW).unwrap();
    d.attach(a, did, false).unwrap();
    d.attach(b, did, false).unwrap();
    assert_eq!(d.destroy_domain(did), Err(DriverError::DomainInUse { did, devices: 2 }));
    d.map(did, Iova(0), Hpa(0x10_0000), PAGE, Perm::READ).unwrap();
    assert_eq!(translate(&p.units[0], a, 0), Ok(Hpa(0x10_0000)));

    assert_eq!(d.detach(a), Ok(Some(did)));
    assert_eq!(d.domain_units(did), [UnitId(1)]);
    assert_eq!(translate(&p.units[0], a, 0), blocked(FaultReason::ContextEntryNotPresent));
    // Unit 0 is out of the span: an unmap no longer bothers it.
    let before = (p.units[0].stats().qi_iotlb, p.units[1].stats().qi_iotlb);
    d.map(did, Iova(PAGE), Hpa(0x10_0000), PAGE, Perm::READ).unwrap();
    assert_eq!(d.unmap(did, Iova(PAGE), PAGE), Ok(PAGE));
    assert_eq!((p.units[0].stats().qi_iotlb, p.units[1].stats().qi_iotlb), (before.0, before.1 + 1));

    // Coming back, unit 0 is invalidated for the domain first: that unmap missed it.
    let before = p.units[0].stats().qi_iotlb;
    d.attach(a, did, false).unwrap();
    assert_eq!(p.units[0].stats().qi_iotlb, before + 1);
    assert_eq!(translate(&p.units[0], a, PAGE), blocked(FaultReason::NoRead));
    assert_eq!(d.detach(a), Ok(Some(did)));

    // The attachment left on unit 1 holds the domain.
    assert_eq!(d.destroy_domain(did), Err(DriverError::DomainInUse { did, devices: 1 }));
    assert_eq!(d.detach(b), Ok(Some(did)));
    assert_eq!(d.domain_units(did), []);
    // Destroy flushes every unit the domain was ever attached through, once.
    let before = (p.units[0].stats().qi_iotlb, p.units[1].stats().qi_iotlb);
    d.destroy_domain(did).unwrap();
    assert_eq!((p.units[0].stats().qi_iotlb, p.units[1].stats().qi_iotlb), (before.0 + 1, before.1 + 1));
    // What is left: each unit's root table and the one context table of its bus.
    assert_eq!(d.table_frames_in_use(), base + 2);
}

#[test]
fn a_stalled_device_on_one_unit_does_not_delay_unmaps_on_another() {
    let timeout = Duration::from_millis(50);
    let p = Platform::new(2, UnitConfig::default().with_device_tlb_timeout(timeout));
    let d = Arc::new(p.driver());
    let (stuck, healthy) = (sid_on(0, 1), sid_on(1, 1));
    let stuck_dev = Device::bind(&p.units[0], stuck);
    let healthy_dev = Device::bind(&p.units[1], healthy);
    let on_a = d.create_domain(DomainKind::Paging, AW).unwrap();
    let on_b = d.create_domain(DomainKind::Paging, AW).unwrap();
    d.attach(stuck, on_a, true).unwrap();
    d.attach(healthy, on_b, true).unwrap();
    d.map(on_a, Iova(0), Hpa(0x10_0000), PAGE, Perm::RW).unwrap();

    // From now on the device on unit 0 never answers; the clock stands still, so unit 0's
    // queue stays stuck behind its device-TLB invalidation until the test moves it.
    stuck_dev.stall.store(true, Ordering::Release);
    let received = stuck_dev.received();
    let done = Arc::new(AtomicBool::new(false));
    let waiter = {
        let (d, done) = (d.clone(), done.clone());
        std::thread::spawn(move || {
            let r = d.unmap(on_a, Iova(0), PAGE);
            done.store(true, Ordering::Release);
            r
        })
    };
    assert!(eventually(|| stuck_dev.received() > received), "unit 0 sent the device its invalidation");

    // Unit 1 serves strict unmaps (and their device-TLB invalidations) meanwhile. They run
    // on another thread so that a regression fails here instead of hanging: a bound on
    // liveness, not a timing.
    let other = {
        let (d, unit) = (d.clone(), p.units[1].clone());
        std::thread::spawn(move || {
            for round in 0..20u64 {
                let iova = Iova(round * PAGE);
                d.map(on_b, iova, Hpa(0x20_0000), PAGE, Perm::RW).unwrap();
                assert_eq!(translate(&unit, healthy, iova.0), Ok(Hpa(0x20_0000)));
                assert_eq!(d.unmap(on_b, iova, PAGE), Ok(PAGE));
                assert_eq!(translate(&unit, healthy, iova.0), blocked(FaultReason::NoRead));
            }
        })
    };
    let finished = eventually(|| other.is_finished());
    if !finished {
        p.clock.advance(timeout); // release unit 0 so the test ends
    }
    assert!(finished, "unmaps on unit 1 waited for unit 0's stalled device");
    other.join().unwrap();
    assert!(!done.load(Ordering::Acquire), "unit 0's unmap is still waiting for its device");
    assert_eq!(healthy_dev.received(), 21, "the attach and 20 unmaps each invalidated its TLB");

    // Only the time-out ends unit 0's wait.
    p.clock.advance(timeout);
    assert_eq!(waiter.join().unwrap(), Err(DriverError::DeviceTlbTimeout { sid: stuck }));
    assert_eq!(translate(&p.units[0], stuck, 0), blocked(FaultReason::NoRead), "its IOTLB was invalidated");
    assert_eq!(p.units[1].stats().device_tlb_timeouts, 0);

    // A domain spanning both units: unit 1 gets its invalidation before the driver waits
    // on unit 0, so unit 1 is clean while unit 0 still waits for the stalled device.
    d.attach(healthy, on_a, true).unwrap();
    d.map(on_a, Iova(PAGE), Hpa(0x10_0000), PAGE, Perm::RW).unwrap();
    assert_eq!(translate(&p.units[1], healthy, PAGE), Ok(Hpa(0x10_0000)));
    let iotlb = p.units[1].stats().qi_iotlb;
    let both = {
        let d = d.clone();
        std::thread::spawn(move || d.unmap(on_a, Iova(PAGE), PAGE))
    };
    let overlapped = eventually(|| p.units[1].stats().qi_iotlb > iotlb);
    assert!(!both.is_finished(), "the unmap waits for unit 0's device");
    p.clock.advance(timeout);
    assert!(overlapped, "unit 1 was invalidated only after unit 0's wait");
    assert_eq!(both.join().unwrap(), Err(DriverError::DeviceTlbTimeout { sid: stuck }));
    assert_eq!(translate(&p.units[1], healthy, PAGE), blocked(FaultReason::NoRead));
    assert_eq!(translate(&p.units[0], stuck, PAGE), blocked(FaultReason::NoRead));
}

/// Polls `cond` until it holds or a generous wall-clock bound passes; true if it held.
/// Only a broken driver ever reaches the bound (a liveness check, not a timing).
fn eventually(cond: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

#[test]
fn three_units_settle_a_deferred_flush_together() {
    let p = Platform::new(3, UnitConfig::default());
    let lazy = FlushPolicy::Deferred { max_entries: 100, max_delay: Duration::from_secs(3600) };
    let d = p.driver_of(&[0, 1, 2], lazy).unwrap();
    let did = d.create_domain(DomainKind::Paging, AW).unwrap();
    let sids: Vec<SourceId> = (0..3).map(|i| sid_on(i, 3)).collect();
    let devices: Vec<_> = sids.iter().enumerate().map(|(i, &s)| Device::bind(&p.units[i], s)).collect();
    for &s in &sids {
        d.attach(s, did, true).unwrap();
    }
    d.map(did, Iova(0x1000), Hpa(0x30_0000), PAGE, Perm::RW).unwrap();
    for (i, &s) in sids.iter().enumerate() {
        assert_eq!(translate(&p.units[i], s, 0x1000), Ok(Hpa(0x30_0000)));
    }
    assert_eq!(d.unmap(did, Iova(0x1000), PAGE), Ok(PAGE));
    // Deferred: every unit's IOTLB still serves it (stale detection is off).
    for (i, &s) in sids.iter().enumerate() {
        assert_eq!(translate(&p.units[i], s, 0x1000), Ok(Hpa(0x30_0000)), "unit {i} not yet flushed");
    }
    let received: Vec<_> = devices.iter().map(|dev| dev.received()).collect();
    d.flush_deferred().unwrap();
    for (i, &s) in sids.iter().enumerate() {
        assert_eq!(translate(&p.units[i], s, 0x1000), blocked(FaultReason::NoRead), "unit {i}");
        assert_eq!(devices[i].received(), received[i] + 1, "device TLB on unit {i}");
    }
}

#[test]
fn a_deferred_flush_hands_every_domain_to_its_units_before_waiting_for_any() {
    let timeout = Duration::from_millis(50);
    let p = Platform::new(2, UnitConfig::default().with_device_tlb_timeout(timeout));
    let lazy = FlushPolicy::Deferred { max_entries: 100, max_delay: Duration::from_secs(3600) };
    let d = Arc::new(p.driver_of(&[0, 1], lazy).unwrap());
    let (stuck, healthy) = (sid_on(0, 2), sid_on(1, 2));
    let stuck_dev = Device::bind(&p.units[0], stuck);
    let healthy_dev = Device::bind(&p.units[1], healthy);
    // Domain ids are allocated lowest first: the stalled unit's domain is flushed first.
    let on_a = d.create_domain(DomainKind::Paging, AW).unwrap();
    let on_b = d.create_domain(DomainKind::Paging, AW).unwrap();
    assert!(on_a < on_b);
    d.attach(stuck, on_a, true).unwrap();
    d.attach(healthy, on_b, true).unwrap();
    for (did, sid, unit) in [(on_a, stuck, 0), (on_b, healthy, 1)] {
        d.map(did, Iova(0), Hpa(0x40_0000), PAGE, Perm::RW).unwrap();
        assert_eq!(translate(&p.units[unit], sid, 0), Ok(Hpa(0x40_0000)));
        assert_eq!(d.unmap(did, Iova(0), PAGE), Ok(PAGE));
    }
    stuck_dev.stall.store(true, Ordering::Release);
    let before = healthy_dev.received();
    let flush = {
        let d = d.clone();
        std::thread::spawn(move || d.flush_deferred())
    };
    // Unit 1's domain is invalidated, its device included, while unit 0 still waits.
    let overlapped = eventually(|| healthy_dev.received() > before);
    let clean = translate(&p.units[1], healthy, 0);
    assert!(!flush.is_finished(), "the flush waits for unit 0's device");
    p.clock.advance(timeout);
    assert!(overlapped, "unit 1's flush waited behind unit 0's stalled device");
    assert_eq!(clean, blocked(FaultReason::NoRead), "unit 1 was flushed before unit 0's wait ended");
    assert_eq!(flush.join().unwrap(), Err(DriverError::DeviceTlbTimeout { sid: stuck }));
    assert_eq!(d.pending_deferred(), 0, "both queues emptied (a time-out still flushed the IOTLB)");
}

#[test]
fn per_unit_features_run_on_every_unit() {
    use crate::unit::interrupt::{ApicMode, Irte, msi_remappable};

    let p = Platform::new(3, UnitConfig::default());
    let d = p.driver();
    let frames = d.table_frames_in_use();
    d.enable_interrupt_remapping().unwrap();
    d.enable_page_requests(0x61).unwrap();
    d.enable_fault_events(0x62).unwrap();
    assert_eq!(d.table_frames_in_use(), frames, "IRTs and PRQs are not table frames");

    // Interrupt remapping: each unit has its own table.
    let entry = Irte::remapped(0x99, 1, ApicMode::XApic);
    d.set_interrupt_entry_on(UnitId(2), 5, entry.lo, entry.hi).unwrap();
    let (addr, data) = msi_remappable(5, false);
    let dev2 = sid_on(2, 1);
    assert_eq!(p.units[2].msi_write(dev2, addr, data).map(|r| r.vector), Ok(0x99));
    assert!(p.units[0].msi_write(sid_on(0, 1), addr, data).is_err(), "unit 0's entry 5 is empty");
    d.clear_interrupt_entries_on(UnitId(2), 5, 0).unwrap();
    assert!(p.units[2].msi_write(dev2, addr, data).is_err());

    // Faults are reported with the unit that recorded them: the two blocked interrupts.
    let units: Vec<UnitId> = d.service_faults().unwrap().iter().map(|r| r.unit).collect();
    assert_eq!(units, [UnitId(0), UnitId(2)]);
    let did = d.create_domain(DomainKind::Paging, AW).unwrap();
    let dev1 = sid_on(1, 7);
    d.attach(dev1, did, true).unwrap();
    assert!(p.units[1].dma_read(dev1, Iova(0x5000), &mut [0; 8]).is_err());
    assert_eq!(d.faults_pending_on(UnitId(0)), Ok(false));
    assert_eq!(d.faults_pending(), Ok(true));
    let reports = d.service_faults().unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!((reports[0].unit, reports[0].record.sid, reports[0].record.addr), (UnitId(1), dev1, 0x5000));
    assert_eq!(d.faults_pending(), Ok(false));

    // Page requests: drained from every unit, answered through the requester's unit.
    let request = PageRequest {
        sid: dev1,
        addr: Iova(0x7000),
        read: true,
        write: false,
        prgi: 3,
        last: true,
        private_data: None,
    };
    assert_eq!(p.units[1].page_request(request), Ok(PageRequestOutcome::Queued));
    assert_eq!(d.drain_page_requests_on(UnitId(0)), Ok(vec![]));
    assert_eq!(d.drain_page_requests(), Ok(vec![request]));
    let responses = p.units[1].stats().qi_page_response;
    d.respond_page_request(dev1, 3, ResponseCode::Success).unwrap();
    assert_eq!(p.units[1].stats().qi_page_response, responses + 1);
    assert_eq!(p.units[0].stats().qi_page_response, 0);
}

/// One step of the property test.
#[derive(Clone, Copy, Debug)]
enum Op {
    Map { domain: usize, page: u64 },
    Unmap { domain: usize, page: u64 },
    Attach { device: usize, domain: usize, ats: bool },
    Detach { device: usize },
}

/// Two devices on each of two units.
const DEVICES: [SourceId; 4] = [sid_on(0, 1), sid_on(0, 2), sid_on(1, 1), sid_on(1, 2)];
const PAGES: u64 = 6;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..2usize, 0..PAGES).prop_map(|(domain, page)| Op::Map { domain, page }),
        3 => (0..2usize, 0..PAGES).prop_map(|(domain, page)| Op::Unmap { domain, page }),
        2 => (0..4usize, 0..2usize, any::<bool>()).prop_map(|(device, domain, ats)| Op::Attach { device, domain, ats }),
        1 => (0..4usize).prop_map(|device| Op::Detach { device }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the order of maps, strict unmaps, attaches and detaches over two units,
    /// each unit translates every device's requests exactly as the model says: no cache
    /// of either unit ever serves an unmapped page or a departed domain.
    #[test]
    fn every_unit_translates_as_the_model_says(ops in proptest::collection::vec(op(), 1..40)) {
        let p = Platform::new(2, UnitConfig::default());
        let d = p.driver();
        let _ports: Vec<_> =
            DEVICES.iter().map(|&s| Device::bind(&p.units[usize::from(s.bus() != bus(0))], s)).collect();
        let dids = [d.create_domain(DomainKind::Paging, AW).unwrap(), d.create_domain(DomainKind::Paging, AW).unwrap()];
        // Model: the pages each domain maps (to a host page that names domain and page) and
        // the domain each device is attached to.
        let mut mapped = [[false; PAGES as usize]; 2];
        let mut attached: [Option<usize>; 4] = [None; 4];
        let hpa = |domain: usize, page: u64| Hpa(0x100_0000 + ((domain as u64 * PAGES + page) << 12));
        for op in ops {
            match op {
                Op::Map { domain, page } => {
                    let r = d.map(dids[domain], Iova(page * PAGE), hpa(domain, page), PAGE, Perm::RW);
                    prop_assert_eq!(r.is_ok(), !mapped[domain][page as usize]);
                    mapped[domain][page as usize] = true;
                }
                Op::Unmap { domain, page } => {
                    let was = std::mem::take(&mut mapped[domain][page as usize]);
                    prop_assert_eq!(d.unmap(dids[domain], Iova(page * PAGE), PAGE), Ok(if was { PAGE } else { 0 }));
                }
                Op::Attach { device, domain, ats } => {
                    d.attach(DEVICES[device], dids[domain], ats).unwrap();
                    attached[device] = Some(domain);
                }
                Op::Detach { device } => {
                    prop_assert_eq!(d.detach(DEVICES[device]), Ok(attached[device].take().map(|i| dids[i])));
                }
            }
            // Every device through its unit, every page: what the model says, and the caches
            // warmed for the next step.
            for (device, &sid) in DEVICES.iter().enumerate() {
                let unit = &p.units[usize::from(sid.bus() != bus(0))];
                for page in 0..PAGES {
                    let got = translate(unit, sid, page * PAGE);
                    match attached[device] {
                        // Not present: the root entry until the bus's first attach.
                        None => prop_assert!(
                            got == blocked(FaultReason::ContextEntryNotPresent)
                                || got == blocked(FaultReason::RootEntryNotPresent),
                            "{} page {}: {:?}", sid, page, got
                        ),
                        Some(domain) => {
                            let expected = if mapped[domain][page as usize] {
                                Ok(hpa(domain, page))
                            } else {
                                blocked(FaultReason::NoRead)
                            };
                            prop_assert_eq!(got, expected, "{} page {}", sid, page);
                        }
                    }
                }
            }
            for (i, &did) in dids.iter().enumerate() {
                let mut spanned: Vec<UnitId> = (0..4)
                    .filter(|&dev| attached[dev] == Some(i))
                    .map(|dev| UnitId(u16::from(DEVICES[dev].bus() != bus(0))))
                    .collect();
                spanned.dedup();
                prop_assert_eq!(d.domain_units(did), spanned);
            }
        }
    }
}
