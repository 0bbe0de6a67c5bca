//! Property test of the driver model against a reference model.
//!
//! Random sequences of map, unmap and translate operations run against a real driver
//! programming a real unit; after every operation the unit's answer for a set of probe
//! addresses (everything recently translated plus the edges of the operation) must agree
//! with a plain map of leaves. Probing after unmap catches missing or too-narrow IOTLB
//! and paging-structure invalidations: a stale cached translation would still succeed.

use std::collections::BTreeMap;
use std::sync::Arc;

use dmar_vtd::driver::{DomainKind, Driver, DriverConfig, DriverError, Perm};
use dmar_vtd::unit::tables::AddressWidth;
use dmar_vtd::unit::{Blocked, Direction, FaultReason, HostMemory, Unit, UnitConfig};
use dmar_vtd::{DomainId, Hpa, Iova, SourceId};
use proptest::prelude::*;

const PAGE: u64 = 4096;
/// 4 KiB pages in 2 MiB and in 1 GiB.
const P2M: u64 = 512;
const P1G: u64 = 512 * 512;
const MEMORY: u64 = 8 << 30;
/// Each region is a 4 GiB window of IOVA space.
const REGION_PAGES: u64 = 4 * P1G;
const SID: SourceId = SourceId::new(0x3a, 0x1f, 7);
/// The interrupt address range: untranslated requests there are interrupts, not DMA.
const INTERRUPT_RANGE: std::ops::Range<u64> = 0xfee0_0000..0xfef0_0000;

/// Where in IOVA space an operation lands: a region, then GiB, 2 MiB block and page
/// inside it. Small ranges make operations collide.
#[derive(Clone, Copy, Debug)]
struct Loc {
    region: usize,
    gig: u64,
    mid: u64,
    low: u64,
}

#[derive(Clone, Copy, Debug)]
enum Size {
    /// `n` 4 KiB pages, hpa anywhere.
    Small(u64),
    /// `n` 2 MiB blocks; the hpa is `skew` pages past a 2 MiB boundary (0: aligned, so
    /// 2 MiB leaves; otherwise 4 KiB leaves).
    Huge2M { n: u64, skew: u64 },
    /// 1 GiB; the hpa is `skew` 2 MiB blocks past a 1 GiB boundary.
    Huge1G { skew: u64 },
}

#[derive(Clone, Debug)]
enum Op {
    Map { at: Loc, size: Size, frame: u64, perm: Perm },
    Unmap { at: Loc, pages: u64, aligned: bool },
    Translate { at: Loc, offset: u64, write: bool },
}

/// One leaf as the driver should have written it.
#[derive(Clone, Copy, Debug)]
struct Leaf {
    pages: u64,
    frame: u64,
    perm: Perm,
}

/// The reference model: leaves by first page.
#[derive(Default, Debug)]
struct Model {
    leaves: BTreeMap<u64, Leaf>,
}

impl Model {
    fn leaf_at(&self, page: u64) -> Option<(u64, Leaf)> {
        let (&start, &leaf) = self.leaves.range(..=page).next_back()?;
        (page < start + leaf.pages).then_some((start, leaf))
    }

    fn first_mapped(&self, start: u64, end: u64) -> Option<u64> {
        if self.leaf_at(start).is_some() {
            return Some(start);
        }
        self.leaves.range(start..end).next().map(|(&p, _)| p)
    }

    /// The driver's rule: the largest leaf for which iova, hpa and the rest of the range
    /// are aligned.
    fn map(&mut self, page: u64, frame: u64, pages: u64, perm: Perm) {
        let mut done = 0;
        while done < pages {
            let (p, f, rest) = (page + done, frame + done, pages - done);
            let size = [P1G, P2M, 1]
                .into_iter()
                .find(|&s| p.is_multiple_of(s) && f.is_multiple_of(s) && rest >= s)
                .unwrap_or(1);
            self.leaves.insert(p, Leaf { pages: size, frame: f, perm });
            done += size;
        }
    }

    fn unmap(&mut self, start: u64, end: u64) -> Result<u64, DriverError> {
        for probe in [start, end - 1] {
            if let Some((s, leaf)) = self.leaf_at(probe)
                && leaf.pages > 1
                && (s < start || s + leaf.pages > end)
            {
                return Err(DriverError::PartialSuperpage { iova: Iova(s * PAGE) });
            }
        }
        let gone: Vec<u64> = self.leaves.range(start..end).map(|(&p, _)| p).collect();
        let mut bytes = 0;
        for p in gone {
            if let Some(leaf) = self.leaves.remove(&p) {
                bytes += leaf.pages * PAGE;
            }
        }
        Ok(bytes)
    }
}

struct Harness {
    aw: AddressWidth,
    unit: Arc<Unit>,
    driver: Driver,
    did: DomainId,
    model: Model,
    /// Pages recently translated (kept warm in the IOTLB) and re-checked after every op.
    probes: Vec<(u64, u64)>,
    baseline_frames: usize,
}

impl Harness {
    fn new(aw: AddressWidth) -> Self {
        let memory = Arc::new(HostMemory::new(MEMORY).expect("memory"));
        let unit = Arc::new(Unit::new(UnitConfig::default(), memory));
        let driver = Driver::new(unit.clone(), DriverConfig::for_memory(MEMORY)).expect("driver");
        let did = driver.create_domain(DomainKind::Paging, aw).expect("domain");
        driver.attach(SID, did, true).expect("attach");
        let baseline_frames = driver.table_frames_in_use();
        Self { aw, unit, driver, did, model: Model::default(), probes: Vec::new(), baseline_frames }
    }

    fn region_base(&self, region: usize) -> u64 {
        let top = 1u64 << (self.aw.bits() - 12);
        [0, top / 2, top - REGION_PAGES][region % 3]
    }

    fn page(&self, at: Loc) -> u64 {
        self.region_base(at.region) + at.gig * P1G + at.mid * P2M + at.low
    }

    /// The unit's answer for one address must match the model's.
    fn check(&self, page: u64, offset: u64, write: bool) -> Result<(), TestCaseError> {
        let iova = page * PAGE + offset;
        let access = if write { Direction::Write } else { Direction::Read };
        let got = self.unit.translate(SID, Iova(iova), access);
        let lookup = self.driver.lookup(self.did, Iova(iova));
        if iova >> self.aw.bits() != 0 {
            prop_assert_eq!(lookup, None);
            let beyond = Blocked { reason: Some(FaultReason::AddressBeyondWidth) };
            prop_assert_eq!(got, Err(beyond), "iova {:#x}", iova);
            return Ok(());
        }
        if INTERRUPT_RANGE.contains(&iova) {
            prop_assert_eq!(got, Err(Blocked { reason: None }), "interrupt range {:#x}", iova);
            return Ok(());
        }
        match self.model.leaf_at(page) {
            Some((start, leaf)) => {
                let hpa = (leaf.frame + page - start) * PAGE + offset;
                let shift = 12 + leaf.pages.trailing_zeros();
                prop_assert_eq!(lookup, Some((Hpa(hpa), leaf.perm, leaf.pages * PAGE)));
                let allowed = if write { leaf.perm.write } else { leaf.perm.read };
                if allowed {
                    let t = got.map_err(|b| TestCaseError::fail(format!("{iova:#x}: {b:?}, model {leaf:?}")))?;
                    prop_assert_eq!(t.hpa, Hpa(hpa), "iova {:#x}", iova);
                    prop_assert_eq!(t.page_shift, shift, "iova {:#x}", iova);
                    prop_assert_eq!((t.read, t.write), (leaf.perm.read, leaf.perm.write));
                } else {
                    prop_assert_eq!(got, Err(fault(write)), "iova {:#x} perm {:?}", iova, leaf.perm);
                }
            }
            None => {
                prop_assert_eq!(lookup, None, "iova {:#x}", iova);
                prop_assert_eq!(got, Err(fault(write)), "unmapped iova {:#x}", iova);
            }
        }
        Ok(())
    }

    fn check_all(&self, extra: &[u64]) -> Result<(), TestCaseError> {
        // The domain holds every table frame but the root and context tables.
        let frames = self.driver.table_frames_in_use() - (self.baseline_frames - 1);
        prop_assert_eq!(self.driver.domain_frames(self.did), Ok(frames));
        for &(page, offset) in &self.probes {
            self.check(page, offset, false)?;
            self.check(page, offset, true)?;
        }
        for &page in extra {
            self.check(page, 0, false)?;
            self.check(page, PAGE - 8, true)?;
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Map { at, size, frame, perm } => {
                let (page, hpa_page, pages) = match size {
                    Size::Small(n) => (self.page(at), frame, n),
                    Size::Huge2M { n, skew } => {
                        let page = self.page(Loc { low: 0, ..at });
                        (page, frame * P2M + skew, n * P2M)
                    }
                    Size::Huge1G { skew } => {
                        let page = self.page(Loc { low: 0, mid: 0, ..at });
                        (page, frame * P1G + skew * P2M, P1G)
                    }
                };
                let got = self.driver.map(self.did, Iova(page * PAGE), Hpa(hpa_page * PAGE), pages * PAGE, perm);
                match self.model.first_mapped(page, page + pages) {
                    Some(p) => prop_assert_eq!(got, Err(DriverError::Overlap { iova: Iova(p * PAGE) })),
                    None => {
                        prop_assert_eq!(got, Ok(()));
                        self.model.map(page, hpa_page, pages, perm);
                    }
                }
                self.check_all(&[page, page + pages - 1, page + pages, page.saturating_sub(1)])
            }
            Op::Unmap { at, pages, aligned } => {
                let mut page = self.page(at);
                if aligned {
                    page &= !(pages.next_power_of_two() - 1);
                }
                let region_end = self.region_base(at.region) + REGION_PAGES;
                let end = (page + pages).min(region_end);
                let got = self.driver.unmap(self.did, Iova(page * PAGE), (end - page) * PAGE);
                let want = self.model.unmap(page, end);
                prop_assert_eq!(got, want);
                self.check_all(&[page, end - 1, end, page.saturating_sub(1)])
            }
            Op::Translate { at, offset, write } => {
                let page = self.page(at);
                if self.probes.len() >= 24 {
                    self.probes.remove(0);
                }
                self.probes.push((page, offset & !7));
                self.check(page, offset, write)
            }
        }
    }

    /// Unmaps every region and checks that every page-table page went back.
    fn finish(&mut self) -> Result<(), TestCaseError> {
        for region in 0..3 {
            let base = self.region_base(region);
            let got = self.driver.unmap(self.did, Iova(base * PAGE), REGION_PAGES * PAGE);
            let want = self.model.unmap(base, base + REGION_PAGES);
            prop_assert_eq!(got, want);
        }
        prop_assert!(self.model.leaves.is_empty());
        prop_assert_eq!(self.driver.table_frames_in_use(), self.baseline_frames);
        self.check_all(&[])
    }
}

fn fault(write: bool) -> Blocked {
    // A not-present or read-only/write-only entry: VT-d 7.1.3 reasons 0x05 / 0x06 (an
    // absent second-stage entry has R=W=0, as QEMU reports it).
    Blocked { reason: Some(if write { FaultReason::NoWrite } else { FaultReason::NoRead }) }
}

fn loc() -> impl Strategy<Value = Loc> {
    (
        0..3usize,
        prop_oneof![3 => Just(0u64), 1 => 0..4u64],
        prop_oneof![3 => Just(0u64), 1 => 0..4u64],
        prop_oneof![2 => 0..8u64, 1 => 500..512u64, 1 => 0..512u64],
    )
        .prop_map(|(region, gig, mid, low)| Loc { region, gig, mid, low })
}

fn perm() -> impl Strategy<Value = Perm> {
    prop_oneof![2 => Just(Perm::RW), 1 => Just(Perm::READ), 1 => Just(Perm::WRITE)]
}

/// (size, frame) pairs whose host range stays below the interrupt range (or, for 1 GiB,
/// avoids the GiB holding it) and away from the page-table region at the top of memory.
fn size_and_frame() -> impl Strategy<Value = (Size, u64)> {
    prop_oneof![
        4 => (1..=16u64, 0..1900 * P2M).prop_map(|(n, f)| (Size::Small(n), f)),
        2 => (1..=3u64, 0..1800u64).prop_map(|(n, f)| (Size::Huge2M { n, skew: 0 }, f)),
        1 => (1..=2u64, 1..512u64, 0..1800u64).prop_map(|(n, skew, f)| (Size::Huge2M { n, skew }, f)),
        2 => prop::sample::select(vec![0u64, 1, 2, 4, 5, 6]).prop_map(|f| (Size::Huge1G { skew: 0 }, f)),
        1 => (1..512u64, 0..2u64).prop_map(|(skew, f)| (Size::Huge1G { skew }, f)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (loc(), size_and_frame(), perm()).prop_map(|(at, (size, frame), perm)| Op::Map {
            at,
            size,
            frame,
            perm
        }),
        2 => (
            loc(),
            prop_oneof![3 => 1..=16u64, 1 => Just(P2M), 1 => Just(P1G), 1 => Just(REGION_PAGES)],
            any::<bool>()
        )
            .prop_map(|(at, pages, aligned)| Op::Unmap { at, pages, aligned }),
        3 => (loc(), 0..PAGE, any::<bool>()).prop_map(|(at, offset, write)| Op::Translate {
            at,
            offset,
            write
        }),
    ]
}

fn run(aw: AddressWidth, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut h = Harness::new(aw);
    for op in ops {
        h.apply(op)?;
    }
    h.finish()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn aw39_agrees_with_the_model(ops in prop::collection::vec(op(), 1..64)) {
        run(AddressWidth::Aw39, &ops)?;
    }

    #[test]
    fn aw48_agrees_with_the_model(ops in prop::collection::vec(op(), 1..64)) {
        run(AddressWidth::Aw48, &ops)?;
    }

    #[test]
    fn aw57_agrees_with_the_model(ops in prop::collection::vec(op(), 1..64)) {
        run(AddressWidth::Aw57, &ops)?;
    }
}

/// Requests the driver must refuse, with nothing written.
#[test]
fn invalid_requests_are_typed_errors() {
    for aw in [AddressWidth::Aw39, AddressWidth::Aw48, AddressWidth::Aw57] {
        let h = Harness::new(aw);
        let (d, did) = (&h.driver, h.did);
        let top = 1u64 << aw.bits();
        let map = |iova: u64, hpa: u64, len: u64| d.map(did, Iova(iova), Hpa(hpa), len, Perm::RW);
        assert_eq!(map(0, 0, 0), Err(DriverError::ZeroLength));
        assert!(matches!(map(0x800, 0, PAGE), Err(DriverError::Unaligned { .. })));
        assert!(matches!(map(0, 0x800, PAGE), Err(DriverError::Unaligned { .. })));
        assert!(matches!(map(0, 0, 100), Err(DriverError::Unaligned { .. })));
        assert_eq!(map(!0xfff, 0, 2 * PAGE), Err(DriverError::Overflow));
        assert_eq!(
            map(top - PAGE, 0, 2 * PAGE),
            Err(DriverError::BeyondWidth { iova: Iova(top), width_bits: aw.bits() })
        );
        assert!(matches!(map(0, MEMORY - PAGE, 2 * PAGE), Err(DriverError::HpaOutOfRange { .. })));
        assert!(matches!(map(0, MEMORY - PAGE, PAGE), Err(DriverError::HpaInTableRegion { .. })));
        assert_eq!(d.map(did, Iova(0), Hpa(0), PAGE, Perm::default()), Err(DriverError::NoAccess));
        assert_eq!(
            d.map(DomainId(999), Iova(0), Hpa(0), PAGE, Perm::RW),
            Err(DriverError::UnknownDomain(DomainId(999)))
        );
        assert_eq!(d.table_frames_in_use(), h.baseline_frames, "nothing was written");

        // a mapping at the very top of the width translates; one page past it faults
        map(top - PAGE, 0x5000, PAGE).expect("top page");
        let t = h.unit.translate(SID, Iova(top - 8), Direction::Read).expect("translates");
        assert_eq!(t.hpa, Hpa(0x5ff8));
        if aw != AddressWidth::Aw57 {
            assert_eq!(
                h.unit.translate(SID, Iova(top), Direction::Read),
                Err(Blocked { reason: Some(FaultReason::AddressBeyondWidth) })
            );
        }
        assert_eq!(d.unmap(did, Iova(top - PAGE), PAGE), Ok(PAGE));
        assert_eq!(h.unit.translate(SID, Iova(top - 8), Direction::Read), Err(fault(false)));
        assert_eq!(d.table_frames_in_use(), h.baseline_frames);
    }
}
