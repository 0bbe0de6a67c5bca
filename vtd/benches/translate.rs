//! Translation-path micro-benchmarks of the unit model (issue targets: IOTLB hit <= 40 ns,
//! 4-level walk with hot tables <= 80 ns). Tables are built with raw entries (the unit
//! tests' `Rig`) so that the benchmark depends on the unit alone.
//!
//! Run: `cargo bench -p dmar-vtd --bench translate`

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;

use common::Rig;
use criterion::{Criterion, criterion_group, criterion_main};
use dmar_vtd::unit::tables::{AddressWidth, ContextEntry, TranslationType};
use dmar_vtd::unit::{CacheGeometry, Direction, UnitConfig};
use dmar_vtd::{DomainId, Hpa, Iova, SourceId};

/// Attaches `sid` to a new `aw` domain `did` with device TLBs allowed; its top table.
fn attach(b: &mut Rig, sid: SourceId, did: u16, aw: AddressWidth) -> Hpa {
    b.attach(sid, did, TranslationType::DeviceTlb, aw)
}

/// Maps the 4 KiB page at `iova` to `hpa`, read-write.
fn map4k(b: &mut Rig, top: Hpa, aw: AddressWidth, iova: u64, hpa: u64) {
    b.map(top, aw, Iova(iova), Hpa(hpa), 1, true, true);
}

const SID: SourceId = SourceId::new(1, 0, 0);

fn iotlb_hit(c: &mut Criterion) {
    for stale_detection in [true, false] {
        let mut b = Rig::with_config(UnitConfig::default().with_stale_detection(stale_detection));
        let top = attach(&mut b, SID, 1, AddressWidth::Aw48);
        let pages = 64u64;
        for p in 0..pages {
            map4k(&mut b, top, AddressWidth::Aw48, p << 12, 0x4000_0000 + (p << 12));
        }
        let name = if stale_detection { "iotlb_hit" } else { "iotlb_hit/no_stale_detection" };
        let mut i = 0u64;
        c.bench_function(name, |bench| {
            bench.iter(|| {
                i = (i + 1) % pages;
                black_box(b.unit.translate(SID, Iova(i << 12), Direction::Read)).ok()
            })
        });
        assert!(b.unit.stats().iotlb_misses <= pages);
    }
}

/// Two pages whose lookups evict each other from a one-entry IOTLB: every translation
/// walks. `spread` puts them in different 1 GiB regions so that a one-entry
/// paging-structure cache misses too (a full walk from the top).
fn walk_bench(c: &mut Criterion, name: &str, aw: AddressWidth, full_walk: bool) {
    let mut config = UnitConfig::default().with_iotlb(CacheGeometry::new(1, 1)).expect("geometry");
    if full_walk {
        config = config.with_paging_cache(CacheGeometry::new(1, 1)).expect("geometry");
    }
    let mut b = Rig::with_config(config);
    let top = attach(&mut b, SID, 1, aw);
    let pages = [0x1000u64, if full_walk { 0x1_4000_1000 } else { 0x2000 }];
    // With a full walk, the two pages need different level-4..1 tables, which also
    // exercises two chains of hot tables.
    for (i, p) in pages.iter().enumerate() {
        map4k(&mut b, top, aw, *p, 0x4000_0000 + (i as u64) * 0x1000);
    }
    let mut i = 0usize;
    c.bench_function(name, |bench| {
        bench.iter(|| {
            i ^= 1;
            black_box(b.unit.translate(SID, Iova(pages[i]), Direction::Read)).ok()
        })
    });
    let s = b.unit.stats();
    assert!(s.iotlb_hits * 100 < s.iotlb_misses, "the bench must miss the IOTLB: {s:?}");
}

fn walks(c: &mut Criterion) {
    walk_bench(c, "walk_4level/paging_cache_hit", AddressWidth::Aw48, false);
    walk_bench(c, "walk_4level/full", AddressWidth::Aw48, true);
    walk_bench(c, "walk_5level/full", AddressWidth::Aw57, true);
}

/// Two devices in one domain alternating through a one-entry context cache: every
/// translation reads the root and context entries, then hits the IOTLB.
fn context_miss(c: &mut Criterion) {
    let config = UnitConfig::default().with_context_cache(CacheGeometry::new(1, 1)).expect("geometry");
    let mut b = Rig::with_config(config);
    let sids = [SourceId::new(1, 0, 0), SourceId::new(2, 0, 0)];
    let top = attach(&mut b, sids[0], 1, AddressWidth::Aw48);
    b.set_context(sids[1], ContextEntry::new(DomainId(1), TranslationType::DeviceTlb, AddressWidth::Aw48, top, false));
    map4k(&mut b, top, AddressWidth::Aw48, 0x1000, 0x4000_0000);
    let mut i = 0usize;
    c.bench_function("context_cache_miss", |bench| {
        bench.iter(|| {
            i ^= 1;
            black_box(b.unit.translate(sids[i], Iova(0x1000), Direction::Read)).ok()
        })
    });
}

fn ats(c: &mut Criterion) {
    let mut b = Rig::with_config(UnitConfig::default());
    let top = attach(&mut b, SID, 1, AddressWidth::Aw48);
    map4k(&mut b, top, AddressWidth::Aw48, 0x1000, 0x4000_0000);
    c.bench_function("ats_translate/iotlb_hit", |bench| {
        bench.iter(|| black_box(b.unit.ats_translate(SID, Iova(0x1000), false)))
    });
}

criterion_group!(benches, iotlb_hit, walks, context_miss, ats);
criterion_main!(benches);
