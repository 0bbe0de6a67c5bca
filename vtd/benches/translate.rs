//! Translation-path micro-benchmarks of the unit model (issue targets: IOTLB hit <= 40 ns,
//! 4-level walk with hot tables <= 80 ns). Tables are built with raw entries (the unit
//! tests' `Rig`) so that the benchmark depends on the unit alone.
//!
//! Run: `cargo bench -p dmar-vtd --bench translate` (`-- translated_check` for the
//! translated-request checking cases alone).

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
    // Skipped by a name filter, the bench translated nothing: nothing to check.
    let ran = s.iotlb_hits + s.iotlb_misses > 0;
    assert!(!ran || s.iotlb_hits * 100 < s.iotlb_misses, "the bench must miss the IOTLB: {s:?}");
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

/// Translated-request checking (`unit::grants`), off against on.
///
/// `ats_translate/*`: ATS translations (IOTLB hits) rotating over 64 pages: the grant
/// recording cost. `on_regrant`: the pages map linearly and were granted before, so each
/// completion finds its range granted already (a device asking again). `on_new_grant`: the
/// pages cannot merge and a function may hold 32 grants, so each completion is a new grant
/// that evicts the oldest: the full cost, revocation of the overlap, coverage update and
/// eviction included.
///
/// `translated_read/*`: 64-byte translated reads rotating over the granted pages, with 1
/// grant or 256 grants that cannot merge: the lookup cost.
fn translated_check(c: &mut Criterion) {
    const PAGES: u64 = 64;
    for case in ["off", "on_regrant", "on_new_grant"] {
        let config = UnitConfig::default().with_translated_grants(32);
        let mut b = Rig::with_config(config);
        let top = attach(&mut b, SID, 1, AddressWidth::Aw48);
        // Linear (one merged grant), or every other host page (no two grants merge).
        let spread = if case == "on_new_grant" { 13 } else { 12 };
        for p in 0..PAGES {
            map4k(&mut b, top, AddressWidth::Aw48, p << 12, 0x4000_0000 + (p << spread));
        }
        b.unit.set_translated_check(SID, case != "off");
        let mut i = 0u64;
        c.bench_function(&format!("translated_check/ats_translate/{case}"), |bench| {
            bench.iter(|| {
                i = (i + 1) % PAGES;
                black_box(b.unit.ats_translate(SID, Iova(i << 12), false))
            })
        });
        let s = b.unit.stats();
        let want = match case {
            "off" => 0,
            "on_regrant" => 1,
            _ => 32,
        };
        assert!(s.ats_success == 0 || b.unit.translated_grants(SID) == want, "{case}: {s:?}");
        assert!(case != "on_new_grant" || s.translated_check_evictions + 32 >= s.translated_check_grants);
    }
    for (on, grants) in [(false, 256u64), (true, 1), (true, 256)] {
        let mut b = Rig::with_config(UnitConfig::default());
        let top = attach(&mut b, SID, 1, AddressWidth::Aw48);
        // Every other host page, so no two grants merge.
        for p in 0..grants {
            map4k(&mut b, top, AddressWidth::Aw48, p << 12, 0x4000_0000 + (p << 13));
        }
        b.unit.set_translated_check(SID, on);
        for p in 0..grants {
            b.unit.ats_translate(SID, Iova(p << 12), false);
        }
        assert_eq!(b.unit.translated_grants(SID), if on { grants as usize } else { 0 });
        let name = match (on, grants) {
            (false, _) => "translated_check/translated_read/off".to_owned(),
            (true, n) => format!("translated_check/translated_read/on_{n}_grants"),
        };
        let mut buf = [0u8; 64];
        let mut i = 0u64;
        c.bench_function(&name, |bench| {
            bench.iter(|| {
                i = (i + 1) % (grants * 64);
                // 64 slots of 64 bytes per page, pages in turn.
                let addr = 0x4000_0000 + ((i % grants) << 13) + ((i / grants) << 6);
                black_box(b.unit.translated_read(SID, Hpa(addr), &mut buf)).ok()
            })
        });
        assert_eq!(b.unit.stats().translated_check_refusals, 0);
    }
}

criterion_group!(benches, iotlb_hit, walks, context_miss, ats, translated_check);
criterion_main!(benches);
