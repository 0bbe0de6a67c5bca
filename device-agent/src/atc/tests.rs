//! Unit and property tests of the device TLB against a simple reference model.

use proptest::prelude::*;

use super::*;

fn rw() -> Perms {
    Perms::new(true, true, false)
}

fn page(iova: u64, translated: u64) -> AtcEntry {
    AtcEntry::from_completion(iova, translated, 12, rw()).expect("entry")
}

fn hit(hpa: u64, size_shift: u8) -> Lookup {
    Lookup::Hit { hpa, size_shift }
}

#[test]
fn capacity_is_a_hard_bound() {
    for policy in EvictionPolicy::ALL {
        let mut atc = Atc::new(8, policy, 1).expect("atc");
        let mut evicted = 0;
        for i in 0..100u64 {
            if let Inserted::Evicted(_) = atc.insert(page(i << 12, i << 20)) {
                evicted += 1;
            }
            assert!(atc.len() <= 8, "{policy}");
        }
        assert_eq!(atc.len(), 8, "{policy}");
        assert_eq!(evicted, 92, "{policy}");
    }
    assert_eq!(Atc::new(0, EvictionPolicy::Lru, 0).err(), Some(InvalidCapacity(0)));
    assert!(Atc::new(MAX_CAPACITY + 1, EvictionPolicy::Lru, 0).is_err());
}

#[test]
fn lru_evicts_the_least_recently_used() {
    let mut atc = Atc::new(3, EvictionPolicy::Lru, 0).expect("atc");
    for i in 0..3u64 {
        atc.insert(page(i << 12, 0x100_0000 + (i << 12)));
    }
    assert_eq!(atc.lookup(0x0, false), hit(0x100_0000, 12), "a hit makes page 0 the most recent");
    assert_eq!(atc.insert(page(0x3000, 0x200_0000)), Inserted::Evicted(page(0x1000, 0x100_1000)));
    assert!(atc.peek(0x0).is_some() && atc.peek(0x1000).is_none());
}

#[test]
fn fifo_ignores_hits() {
    let mut atc = Atc::new(3, EvictionPolicy::Fifo, 0).expect("atc");
    for i in 0..3u64 {
        atc.insert(page(i << 12, i << 12));
    }
    atc.lookup(0x0, false);
    atc.lookup(0x0, true);
    assert_eq!(atc.insert(page(0x3000, 0x3000)), Inserted::Evicted(page(0, 0)));
    // Overwriting an entry keeps its place in the queue.
    assert_eq!(atc.insert(page(0x1000, 0x9000)), Inserted::Replaced);
    assert_eq!(atc.insert(page(0x4000, 0x4000)), Inserted::Evicted(page(0x1000, 0x9000)));
}

#[test]
fn random_evicts_some_entry_and_keeps_the_rest() {
    let mut atc = Atc::new(4, EvictionPolicy::Random, 42).expect("atc");
    for i in 0..4u64 {
        atc.insert(page(i << 12, i << 12));
    }
    let mut victims = std::collections::HashSet::new();
    for i in 4..200u64 {
        match atc.insert(page(i << 12, i << 12)) {
            Inserted::Evicted(v) => {
                assert!(v.iova < i << 12);
                victims.insert(v.iova >> 12);
            }
            other => panic!("expected an eviction, got {other:?}"),
        }
        assert_eq!(atc.len(), 4);
        assert!(atc.peek(i << 12).is_some(), "the new entry stays");
    }
    // The youngest entry is not always the one to go.
    assert!(victims.iter().any(|&v| v < 150));
}

#[test]
fn ranges_are_looked_up_as_completed() {
    let mut atc = Atc::new(16, EvictionPolicy::Lru, 0).expect("atc");
    let huge = AtcEntry::from_completion(0x4012_3456, 0x8000_0000, 30, rw()).expect("1 GiB");
    let large = AtcEntry::from_completion(0x20_1000, 0x60_0000, 21, rw()).expect("2 MiB");
    atc.insert(huge);
    atc.insert(large);
    atc.insert(page(0x5000, 0x7000));
    assert_eq!(atc.lookup(0x4000_0000, false), hit(0x8000_0000, 30));
    assert_eq!(atc.lookup(0x7fff_ffff, true), hit(0xbfff_ffff, 30));
    assert_eq!(atc.lookup(0x3f_ffc0, false), hit(0x7f_ffc0, 21));
    assert_eq!(atc.lookup(0x5abc, false), hit(0x7abc, 12));
    assert_eq!(atc.lookup(0x6000, false), Lookup::Miss);
    assert_eq!(atc.lookup(0x8000_0000, false), Lookup::Miss);
    assert_eq!(atc.lookup(0x1f_ffff, false), Lookup::Miss);
}

#[test]
fn permissions_are_enforced() {
    let mut atc = Atc::new(16, EvictionPolicy::Lru, 0).expect("atc");
    atc.insert(AtcEntry::from_completion(0x1000, 0x9000, 12, Perms::new(true, false, false)).expect("ro"));
    atc.insert(AtcEntry::from_completion(0x2000, 0xa000, 12, Perms::new(false, true, false)).expect("wo"));
    atc.insert(AtcEntry::from_completion(0x3000, 0xb000, 12, Perms::new(true, true, true)).expect("u"));
    atc.insert(AtcEntry::from_completion(0x4000, 0xc000, 12, Perms::new(false, true, true)).expect("u, wo"));
    assert_eq!(atc.lookup(0x1008, false), hit(0x9008, 12));
    assert_eq!(atc.lookup(0x1008, true), Lookup::NoPermission, "no write through a read-only entry");
    assert_eq!(atc.lookup(0x2008, false), Lookup::NoPermission);
    assert_eq!(atc.lookup(0x2008, true), hit(0xa008, 12));
    assert_eq!(atc.lookup(0x3008, false), Lookup::Untranslated);
    assert_eq!(atc.lookup(0x3008, true), Lookup::Untranslated);
    assert_eq!(atc.lookup(0x4008, false), Lookup::NoPermission, "U does not grant a read");
    assert_eq!(atc.lookup(0x4008, true), Lookup::Untranslated);
}

#[test]
fn invalidation_drops_what_the_range_meets() {
    let mut atc = Atc::new(64, EvictionPolicy::Lru, 0).expect("atc");
    for i in 0..16u64 {
        atc.insert(page(i << 12, i << 12));
    }
    let large = AtcEntry::from_completion(0x20_0000, 0x40_0000, 21, rw()).expect("2 MiB");
    atc.insert(large);
    // One page (S=0).
    assert_eq!(atc.invalidate(InvalidationRange::decode(0x3000, 0)), 1);
    assert_eq!(atc.lookup(0x3000, false), Lookup::Miss);
    assert_eq!(atc.lookup(0x4000, false), hit(0x4000, 12));
    // 32 KiB at 0x8000 (bits 14:12 = 011 under S=1): pages 8..=15.
    assert_eq!(atc.invalidate(InvalidationRange::decode(0x8000 | 0x3000 | 1, 0)), 8);
    assert_eq!(atc.len(), 16 - 1 - 8 + 1);
    // A 4 KiB invalidation inside a 2 MiB entry drops the whole entry.
    assert_eq!(atc.invalidate(InvalidationRange::decode(0x2f_f000, 0)), 1);
    assert_eq!(atc.lookup(0x20_0000, false), Lookup::Miss);
    // A global invalidation (every S bit) takes the scan path.
    assert_eq!(atc.invalidate(InvalidationRange::decode(u64::MAX, 0)), 7);
    assert!(atc.is_empty());
}

#[test]
fn clearing_starts_over() {
    let mut atc = Atc::new(4, EvictionPolicy::Lru, 0).expect("atc");
    for i in 0..4u64 {
        atc.insert(page(i << 12, i << 12));
    }
    assert_eq!(atc.clear(), 4);
    assert!(atc.is_empty() && atc.entries().is_empty());
    assert_eq!(atc.lookup(0, false), Lookup::Miss);
    atc.insert(page(0, 0x1000));
    assert_eq!(atc.lookup(0, false), hit(0x1000, 12));
}

/// The reference: a list in eviction order, searched linearly.
#[derive(Debug)]
struct Model {
    entries: Vec<AtcEntry>,
    capacity: usize,
    policy: EvictionPolicy,
}

impl Model {
    fn find(&self, iova: u64) -> Option<usize> {
        // The cache probes range sizes from the smallest up.
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.contains(iova))
            .min_by_key(|(_, e)| e.size_shift)
            .map(|(i, _)| i)
    }

    fn lookup(&mut self, iova: u64, write: bool) -> Lookup {
        let Some(i) = self.find(iova) else { return Lookup::Miss };
        let e = self.entries[i];
        if self.policy == EvictionPolicy::Lru {
            self.entries.remove(i);
            self.entries.insert(0, e);
        }
        if !e.perms.allows(write) {
            Lookup::NoPermission
        } else if e.perms.untranslated_only() {
            Lookup::Untranslated
        } else {
            Lookup::Hit { hpa: e.translate(iova), size_shift: e.size_shift }
        }
    }

    fn insert(&mut self, e: AtcEntry, actual: Inserted) -> Result<(), TestCaseError> {
        if let Some(i) = self.entries.iter().position(|x| x.iova == e.iova && x.size_shift == e.size_shift) {
            prop_assert_eq!(actual, Inserted::Replaced);
            self.entries[i] = e;
            if self.policy == EvictionPolicy::Lru {
                let e = self.entries.remove(i);
                self.entries.insert(0, e);
            }
            return Ok(());
        }
        if self.entries.len() == self.capacity {
            let victim =
                match self.policy {
                    EvictionPolicy::Lru | EvictionPolicy::Fifo => self.entries.len() - 1,
                    EvictionPolicy::Random => match actual {
                        Inserted::Evicted(v) => self.entries.iter().position(|x| *x == v).ok_or_else(|| {
                            TestCaseError::fail(format!("evicted {v:?}, which the model does not hold"))
                        })?,
                        other => return Err(TestCaseError::fail(format!("full, but {other:?}"))),
                    },
                };
            let v = self.entries.remove(victim);
            prop_assert_eq!(actual, Inserted::Evicted(v));
        } else {
            prop_assert_eq!(actual, Inserted::New);
        }
        self.entries.insert(0, e);
        Ok(())
    }

    fn invalidate(&mut self, r: InvalidationRange) -> usize {
        let before = self.entries.len();
        self.entries.retain(|e| !e.overlaps(r.first, r.last));
        before - self.entries.len()
    }
}

#[derive(Clone, Debug)]
enum Op {
    Insert { page: u64, shift: u8, translated: u64, perms: (bool, bool, bool) },
    Lookup { addr: u64, write: bool },
    Invalidate { addr_s: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    // A 4 MiB space so that 4 KiB, 8 KiB and 2 MiB ranges meet often.
    prop_oneof![
        4 => (0u64..1024, prop::sample::select(vec![12u8, 12, 12, 13, 21]), 0u64..1 << 20, any::<(bool, bool, bool)>())
            .prop_map(|(page, shift, t, perms)| Op::Insert { page, shift, translated: t << 21, perms }),
        4 => (0u64..1 << 22, any::<bool>()).prop_map(|(addr, write)| Op::Lookup { addr, write }),
        1 => (0u64..1 << 22, any::<bool>(), 0u32..10).prop_map(|(addr, s, ones)| {
            let addr_s = if s { (addr & !0xfff) | (((1u64 << ones) - 1) << 12) | 1 } else { addr & !0xfff };
            Op::Invalidate { addr_s }
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_cache_behaves_like_the_model(
        capacity in 1usize..24,
        policy in prop::sample::select(EvictionPolicy::ALL.to_vec()),
        ops in prop::collection::vec(op(), 1..300),
    ) {
        let mut atc = Atc::new(capacity, policy, 9).expect("atc");
        let mut model = Model { entries: Vec::new(), capacity, policy };
        for op in ops {
            match op {
                Op::Insert { page, shift, translated, perms } => {
                    let (r, w, u) = perms;
                    let e = AtcEntry::from_completion(page << 12, translated, u32::from(shift), Perms::new(r, w, u))
                        .expect("entry");
                    let actual = atc.insert(e);
                    model.insert(e, actual)?;
                }
                Op::Lookup { addr, write } => {
                    prop_assert_eq!(atc.lookup(addr, write), model.lookup(addr, write));
                    prop_assert_eq!(atc.peek(addr), model.find(addr).map(|i| model.entries[i]));
                }
                Op::Invalidate { addr_s } => {
                    let r = InvalidationRange::decode(addr_s, 0);
                    prop_assert_eq!(atc.invalidate(r), model.invalidate(r));
                }
            }
            prop_assert!(atc.len() <= capacity);
            prop_assert_eq!(atc.len(), model.entries.len());
            prop_assert_eq!(atc.entries(), model.entries.clone());
        }
    }
}
