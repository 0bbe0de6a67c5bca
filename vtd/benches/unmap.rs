//! What an unmap costs through the driver and the unit's invalidation queue.
//!
//! - `strict_4k`: one 4 KiB page per unmap, `FlushPolicy::Strict`, in a domain with 0 or
//!   16 ATS devices. Each unmap submits one page-selective IOTLB descriptor, one device-TLB
//!   descriptor per ATS device and one wait, and returns once every device answered. The
//!   devices' ports answer either at once, inside `DevicePort::invalidate` (`sync`), or
//!   from one other thread through a channel (`thread`).
//! - `deferred_4k`: the same unmaps with `Deferred { max_entries: 256, max_delay: 10 ms }`
//!   and 16 ATS devices (synchronous ports); the timed loop includes the flushes (one per
//!   256 unmaps), so the time per unmap is amortized and its inverse is unmaps per second.
//!
//! Pages are mapped 512 at a time outside the timed region and unmapped one by one inside
//! it; a page kept mapped in the next 2 MiB keeps the upper tables alive.
//!
//! Run: `cargo bench -p dmar-vtd --bench unmap`

use std::hint::black_box;
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dmar_vtd::driver::{DomainKind, Driver, DriverConfig, FlushPolicy, Perm};
use dmar_vtd::unit::tables::AddressWidth;
use dmar_vtd::unit::{DeviceInvalidation, DevicePort, HostMemory, Unit, UnitConfig};
use dmar_vtd::{DomainId, Hpa, ITag, Iova, SourceId};

const MEMORY: u64 = 4 << 30;
const PAGE: u64 = 4096;
/// Pages mapped per untimed round: one last-level table.
const BATCH: u64 = 512;
const BASE: u64 = 0x10_0000_0000;
const DEVICES: u8 = 16;

/// Answers at once, from inside the unit's call (the unit calls ports without its lock).
#[derive(Debug)]
struct SyncPort {
    unit: Weak<Unit>,
}

impl DevicePort for SyncPort {
    fn invalidate(&self, request: DeviceInvalidation) {
        if let Some(unit) = self.unit.upgrade() {
            let _ = unit.device_tlb_completed(request.sid, request.itag);
        }
    }
}

/// Hands the request to the completer thread.
#[derive(Debug)]
struct ThreadPort {
    tx: mpsc::Sender<(SourceId, ITag)>,
}

impl DevicePort for ThreadPort {
    fn invalidate(&self, request: DeviceInvalidation) {
        let _ = self.tx.send((request.sid, request.itag));
    }
}

#[derive(Clone, Copy, Debug)]
enum Ports {
    Sync,
    Thread,
}

struct Setup {
    driver: Driver,
    did: DomainId,
}

fn setup(policy: FlushPolicy, devices: u8, ports: Ports) -> Setup {
    let unit = Arc::new(Unit::new(UnitConfig::default(), Arc::new(HostMemory::new(MEMORY).expect("memory"))));
    let driver = Driver::new(unit.clone(), DriverConfig::for_memory(MEMORY).with_flush(policy)).expect("driver");
    let did = driver.create_domain(DomainKind::Paging, AddressWidth::Aw48).expect("domain");
    let tx = match ports {
        Ports::Sync => None,
        Ports::Thread => {
            let (tx, rx) = mpsc::channel::<(SourceId, ITag)>();
            let weak = Arc::downgrade(&unit);
            std::thread::spawn(move || {
                for (sid, itag) in rx {
                    let Some(unit) = weak.upgrade() else { return };
                    let _ = unit.device_tlb_completed(sid, itag);
                }
            });
            Some(tx)
        }
    };
    for i in 0..devices {
        let sid = SourceId::new(1, i, 0);
        let port: Arc<dyn DevicePort> = match &tx {
            None => Arc::new(SyncPort { unit: Arc::downgrade(&unit) }),
            Some(tx) => Arc::new(ThreadPort { tx: tx.clone() }),
        };
        unit.bind_device_port(sid, port, 32).expect("bind");
        driver.attach(sid, did, true).expect("attach");
    }
    driver.map(did, Iova(BASE + BATCH * PAGE), Hpa(0x100_0000), PAGE, Perm::RW).expect("keeper page");
    Setup { driver, did }
}

/// Times `iters` single-page unmaps, mapping them `BATCH` at a time outside the timing;
/// `flush_deferred` runs inside it (a no-op under strict flushing).
fn time_unmaps(s: &Setup, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let n = (iters - done).min(BATCH);
        // One page off 2 MiB alignment: 4 KiB leaves, never a superpage.
        s.driver.map(s.did, Iova(BASE), Hpa(0x200_1000), n * PAGE, Perm::RW).expect("map");
        let start = Instant::now();
        for i in 0..n {
            black_box(s.driver.unmap(s.did, Iova(BASE + i * PAGE), PAGE).expect("unmap"));
        }
        s.driver.flush_deferred().expect("flush");
        total += start.elapsed();
        done += n;
    }
    total
}

fn strict(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmap/strict_4k");
    g.throughput(Throughput::Elements(1));
    for (name, devices, ports) in [
        ("ats_devices=0", 0, Ports::Sync),
        ("ats_devices=16/sync", DEVICES, Ports::Sync),
        ("ats_devices=16/thread", DEVICES, Ports::Thread),
    ] {
        let s = setup(FlushPolicy::Strict, devices, ports);
        g.bench_function(name, |b| b.iter_custom(|iters| time_unmaps(&s, iters)));
    }
    g.finish();
}

fn deferred(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmap/deferred_4k");
    g.throughput(Throughput::Elements(1));
    let policy = FlushPolicy::Deferred { max_entries: 256, max_delay: Duration::from_millis(10) };
    let s = setup(policy, DEVICES, Ports::Sync);
    g.bench_function("ats_devices=16/sync", |b| b.iter_custom(|iters| time_unmaps(&s, iters)));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    targets = strict, deferred
}
criterion_main!(benches);
