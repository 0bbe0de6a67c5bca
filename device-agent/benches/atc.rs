//! The device TLB's hit path (target ≤ 20 ns per hit, `docs/BENCHMARKS.md`), per eviction
//! policy, at the default capacity of 2048 entries, plus a miss and an insertion with
//! eviction for scale.
//!
//! `cargo bench -p dmar-agent --bench atc`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use dmar_agent::atc::{Atc, AtcEntry, EvictionPolicy, Perms};

const ENTRIES: u64 = 2048;

fn filled(policy: EvictionPolicy) -> Atc {
    let mut atc = Atc::new(ENTRIES as usize, policy, 7).expect("atc");
    for i in 0..ENTRIES {
        // Scattered pages, as a real footprint would be.
        let iova = (i * 0x9e37) << 12;
        atc.insert(
            AtcEntry::from_completion(iova, 0x1_0000_0000 + (i << 12), 12, Perms::new(true, true, false))
                .expect("entry"),
        );
    }
    atc
}

/// Addresses of cached pages in a pseudo-random order, with byte offsets.
fn addresses() -> Vec<u64> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (((x % ENTRIES) * 0x9e37) << 12) | (x & 0xfc0)
        })
        .collect()
}

fn hits(c: &mut Criterion) {
    let addrs = addresses();
    let mut g = c.benchmark_group("atc_hit");
    for policy in EvictionPolicy::ALL {
        let mut atc = filled(policy);
        let mut i = 0usize;
        g.bench_function(policy.as_str(), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                black_box(atc.lookup(black_box(addrs[i]), false))
            })
        });
    }
    // A 2 MiB entry beside the 4 KiB ones: two range sizes to probe.
    let mut atc = filled(EvictionPolicy::Lru);
    atc.insert(AtcEntry::from_completion(1 << 40, 1 << 30, 21, Perms::new(true, true, false)).expect("2 MiB"));
    let mut i = 0usize;
    g.bench_function("lru_two_sizes", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(atc.lookup(black_box(addrs[i]), false))
        })
    });
    g.finish();
}

fn misses_and_inserts(c: &mut Criterion) {
    let mut atc = filled(EvictionPolicy::Lru);
    let mut n = 0u64;
    c.bench_function("atc_miss", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            black_box(atc.lookup(black_box((1 << 45) | (n << 12)), false))
        })
    });
    let mut atc = filled(EvictionPolicy::Lru);
    c.bench_function("atc_insert_evict_lru", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let e = AtcEntry::from_completion((1 << 46) | (n << 12), n << 12, 12, Perms::new(true, false, false));
            black_box(atc.insert(e.expect("entry")))
        })
    });
}

criterion_group!(benches, hits, misses_and_inserts);
criterion_main!(benches);
