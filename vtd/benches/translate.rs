//! Translation-path micro-benchmarks of the unit model (issue targets: IOTLB hit <= 40 ns,
//! 4-level walk with hot tables <= 80 ns). Tables are built with raw entries so that the
//! benchmark depends on the unit alone.
//!
//! Run: `cargo bench -p dmar-vtd --bench translate`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use dmar_vtd::unit::regs::{self, gcmd};
use dmar_vtd::unit::tables::{AddressWidth, ContextEntry, RootEntry, SlPte, TranslationType, level_index};
use dmar_vtd::unit::{CacheGeometry, Direction, HostMemory, Unit, UnitConfig};
use dmar_vtd::{DomainId, Hpa, Iova, SourceId};

struct Bench {
    unit: Unit,
    mem: Arc<HostMemory>,
    next: u64,
    root: Hpa,
}

impl Bench {
    fn new(config: UnitConfig) -> Self {
        let mem = Arc::new(HostMemory::new(4 << 30).expect("memory"));
        let unit = Unit::new(config, mem.clone());
        let mut b = Self { unit, mem, next: 0x100_0000, root: Hpa(0) };
        b.root = b.alloc();
        b.unit.write64(regs::RTADDR, b.root.0).expect("rtaddr");
        b.unit.write32(regs::GCMD, gcmd::SRTP).expect("srtp");
        b.unit.write32(regs::GCMD, gcmd::TE).expect("te");
        b
    }

    fn alloc(&mut self) -> Hpa {
        let f = Hpa(self.next);
        self.next += 4096;
        f
    }

    /// Attaches `sid` to a new `aw` domain `did` and returns its top table.
    fn attach(&mut self, sid: SourceId, did: u16, aw: AddressWidth) -> Hpa {
        let ctx = self.alloc();
        self.mem.write_u64(Hpa(self.root.0 + u64::from(sid.bus()) * 16), RootEntry::new(ctx).lo).expect("root");
        let top = self.alloc();
        let e = ContextEntry::new(DomainId(did), TranslationType::DeviceTlb, aw, top, false);
        let at = ctx.0 + u64::from(sid.devfn()) * 16;
        self.mem.write_u64(Hpa(at), e.lo).expect("ctx");
        self.mem.write_u64(Hpa(at + 8), e.hi).expect("ctx");
        top
    }

    fn map4k(&mut self, top: Hpa, aw: AddressWidth, iova: u64, hpa: u64) {
        let mut table = top;
        for level in (2..=aw.levels()).rev() {
            let a = Hpa(table.0 + level_index(Iova(iova), level) * 8);
            let pte = SlPte::from_bits(self.mem.read_u64(a).expect("pte"));
            table = if pte.present() {
                pte.addr()
            } else {
                let t = self.alloc();
                self.mem.write_u64(a, SlPte::table(t).to_bits()).expect("pte");
                t
            };
        }
        let a = Hpa(table.0 + level_index(Iova(iova), 1) * 8);
        self.mem.write_u64(a, SlPte::leaf(Hpa(hpa), true, true, false).to_bits()).expect("leaf");
    }
}

const SID: SourceId = SourceId::new(1, 0, 0);

fn iotlb_hit(c: &mut Criterion) {
    for stale_detection in [true, false] {
        let mut b = Bench::new(UnitConfig::default().with_stale_detection(stale_detection));
        let top = b.attach(SID, 1, AddressWidth::Aw48);
        let pages = 64u64;
        for p in 0..pages {
            b.map4k(top, AddressWidth::Aw48, p << 12, 0x4000_0000 + (p << 12));
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
    let mut b = Bench::new(config);
    let top = b.attach(SID, 1, aw);
    let pages = [0x1000u64, if full_walk { 0x1_4000_1000 } else { 0x2000 }];
    // With a full walk, the two pages need different level-4..1 tables, which also
    // exercises two chains of hot tables.
    for (i, p) in pages.iter().enumerate() {
        b.map4k(top, aw, *p, 0x4000_0000 + (i as u64) * 0x1000);
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
    let mut b = Bench::new(config);
    let sids = [SourceId::new(1, 0, 0), SourceId::new(2, 0, 0)];
    let top = b.attach(sids[0], 1, AddressWidth::Aw48);
    let ctx = b.alloc();
    b.mem.write_u64(Hpa(b.root.0 + 2 * 16), RootEntry::new(ctx).lo).expect("root");
    let e = ContextEntry::new(DomainId(1), TranslationType::DeviceTlb, AddressWidth::Aw48, top, false);
    b.mem.write_u64(ctx, e.lo).expect("ctx");
    b.mem.write_u64(Hpa(ctx.0 + 8), e.hi).expect("ctx");
    b.map4k(top, AddressWidth::Aw48, 0x1000, 0x4000_0000);
    let mut i = 0usize;
    c.bench_function("context_cache_miss", |bench| {
        bench.iter(|| {
            i ^= 1;
            black_box(b.unit.translate(sids[i], Iova(0x1000), Direction::Read)).ok()
        })
    });
}

fn ats(c: &mut Criterion) {
    let mut b = Bench::new(UnitConfig::default());
    let top = b.attach(SID, 1, AddressWidth::Aw48);
    b.map4k(top, AddressWidth::Aw48, 0x1000, 0x4000_0000);
    c.bench_function("ats_translate/iotlb_hit", |bench| {
        bench.iter(|| black_box(b.unit.ats_translate(SID, Iova(0x1000), false)))
    });
}

criterion_group!(benches, iotlb_hit, walks, context_miss, ats);
criterion_main!(benches);
