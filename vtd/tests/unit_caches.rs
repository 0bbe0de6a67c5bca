//! Cache semantics of the unit: stale entries stay in use until invalidated (and are
//! counted), each invalidation granularity drops what it must, capacity is bounded, and
//! the register interface behaves as the spec's handshakes say.

mod common;

use common::Rig;
use dmar_vtd::unit::regs::{self, ccmd, gcmd, iotlb};
use dmar_vtd::unit::tables::{AddressWidth, ContextEntry, SlPte, TranslationType};
use dmar_vtd::unit::{CacheGeometry, Direction, MmioError, UnitConfig};
use dmar_vtd::{Hpa, Iova, SourceId};

const SID: SourceId = SourceId::new(0, 4, 0);
const AW: AddressWidth = AddressWidth::Aw48;

fn hpa(rig: &Rig, iova: u64, access: Direction) -> Option<Hpa> {
    rig.unit.translate(SID, Iova(iova), access).ok().map(|t| t.hpa)
}

/// A rig with `SID` attached to domain 7, the page at 0x1000 mapped read-write to 0x30_0000,
/// and one translation of it done, so that the caches hold it.
fn cached_page() -> Rig {
    let mut rig = Rig::new();
    let top = rig.attach(SID, 7, TranslationType::Untranslated, AW);
    rig.map(top, AW, Iova(0x1000), Hpa(0x30_0000), 1, true, true);
    assert!(hpa(&rig, 0x1000, Direction::Read).is_some());
    rig
}

#[test]
fn stale_iotlb_entry_is_served_until_invalidated() {
    let mut rig = Rig::new();
    let top = rig.attach(SID, 7, TranslationType::Untranslated, AW);
    let pte = rig.map(top, AW, Iova(0x40_0000), Hpa(0x1000_0000), 1, true, true);
    assert_eq!(hpa(&rig, 0x40_0010, Direction::Read), Some(Hpa(0x1000_0010)));

    // Software retargets the page without invalidating: the IOTLB keeps the old frame.
    rig.mem.write_u64(pte, SlPte::leaf(Hpa(0x2000_0000), true, true, false).to_bits()).expect("pte");
    assert_eq!(hpa(&rig, 0x40_0010, Direction::Read), Some(Hpa(0x1000_0010)), "stale entry served");
    assert_eq!(hpa(&rig, 0x40_0020, Direction::Write), Some(Hpa(0x1000_0020)), "stale entry served");
    assert_eq!(rig.unit.stats().stale_iotlb_uses, 2);

    // Page-selective invalidation of that page: the new translation appears.
    rig.invalidate_page(7, Iova(0x40_0000));
    assert_eq!(hpa(&rig, 0x40_0010, Direction::Read), Some(Hpa(0x2000_0010)));
    assert_eq!(rig.unit.stats().stale_iotlb_uses, 2, "no further stale use");

    // Same for an unmap: the cached translation survives until the invalidation.
    rig.mem.write_u64(pte, 0).expect("pte");
    assert!(hpa(&rig, 0x40_0010, Direction::Read).is_some());
    rig.invalidate_page(7, Iova(0x40_0000));
    assert!(hpa(&rig, 0x40_0010, Direction::Read).is_none());
}

#[test]
fn stale_context_entry_is_served_until_invalidated() {
    let mut rig = cached_page();
    // Detach without invalidating: the cached context (and IOTLB) still translate.
    rig.set_context(SID, ContextEntry::default());
    assert!(hpa(&rig, 0x1000, Direction::Read).is_some());
    assert_eq!(rig.unit.stats().stale_context_uses, 1);
    // Device-selective context invalidation, then domain-selective IOTLB (VT-d 6.5.3.3).
    rig.unit
        .write64(regs::CCMD, ccmd::ICC | (ccmd::DEVICE << ccmd::CIRG_SHIFT) | (u64::from(SID.0) << ccmd::SID_SHIFT) | 7)
        .expect("ccmd");
    assert!(hpa(&rig, 0x1000, Direction::Read).is_none());
}

#[test]
fn register_invalidation_completes_and_reports_granularity() {
    let rig = Rig::new();
    rig.unit.write64(regs::CCMD, ccmd::ICC | (ccmd::DOMAIN << ccmd::CIRG_SHIFT) | 3).expect("ccmd");
    let v = rig.unit.read64(regs::CCMD).expect("ccmd");
    assert_eq!(v & ccmd::ICC, 0, "ICC clears on completion");
    assert_eq!((v >> ccmd::CAIG_SHIFT) & 3, ccmd::DOMAIN);

    rig.unit
        .write64(regs::IOTLB, iotlb::IVT | (iotlb::DOMAIN << iotlb::IIRG_SHIFT) | (3 << iotlb::DID_SHIFT))
        .expect("iotlb");
    let v = rig.unit.read64(regs::IOTLB).expect("iotlb");
    assert_eq!(v & iotlb::IVT, 0);
    assert_eq!((v >> iotlb::IAIG_SHIFT) & 3, iotlb::DOMAIN);

    // AM above MAMV is refused: IAIG reads 0 and nothing is invalidated.
    rig.unit.write64(regs::IVA, 19).expect("iva");
    rig.unit
        .write64(regs::IOTLB, iotlb::IVT | (iotlb::PAGE << iotlb::IIRG_SHIFT) | (3 << iotlb::DID_SHIFT))
        .expect("iotlb");
    let v = rig.unit.read64(regs::IOTLB).expect("iotlb");
    assert_eq!((v & iotlb::IVT, (v >> iotlb::IAIG_SHIFT) & 3), (0, 0));

    // 32-bit halves: the command runs when the upper half (with IVT) is written.
    rig.unit.write32(regs::IOTLB, 0).expect("lo");
    rig.unit.write32(regs::IOTLB + 4, ((iotlb::IVT | (iotlb::GLOBAL << iotlb::IIRG_SHIFT)) >> 32) as u32).expect("hi");
    let v = rig.unit.read64(regs::IOTLB).expect("iotlb");
    assert_eq!((v & iotlb::IVT, (v >> iotlb::IAIG_SHIFT) & 3), (0, iotlb::GLOBAL));
}

#[test]
fn invalidation_hint_keeps_paging_structure_caches() {
    let rig = cached_page();
    let occupied = rig.unit.cache_occupancy();
    assert_eq!((occupied.iotlb, occupied.paging), (1, 3), "leaf + the three tables below the top");
    // PSI with IH=1: only the leaf goes.
    rig.unit.write64(regs::IVA, 0x1000 | iotlb::IVA_IH).expect("iva");
    rig.unit
        .write64(regs::IOTLB, iotlb::IVT | (iotlb::PAGE << iotlb::IIRG_SHIFT) | (7 << iotlb::DID_SHIFT))
        .expect("iotlb");
    assert_eq!((rig.unit.cache_occupancy().iotlb, rig.unit.cache_occupancy().paging), (0, 3));
    // PSI with IH=0: the paging-structure entries covering the page go as well.
    assert!(hpa(&rig, 0x1000, Direction::Read).is_some());
    rig.invalidate_page(7, Iova(0x1000));
    assert_eq!((rig.unit.cache_occupancy().iotlb, rig.unit.cache_occupancy().paging), (0, 0));
}

#[test]
fn a_full_iotlb_evicts_one_entry_never_everything() {
    let config = UnitConfig::default().with_iotlb(CacheGeometry::new(4, 2)).expect("geometry");
    let mut rig = Rig::with_config(config);
    let top = rig.attach(SID, 1, TranslationType::Untranslated, AW);
    for p in 0..64u64 {
        rig.map(top, AW, Iova(p << 12), Hpa(0x4000_0000 + (p << 12)), 1, true, true);
    }
    for p in 0..64u64 {
        assert_eq!(hpa(&rig, p << 12, Direction::Read), Some(Hpa(0x4000_0000 + (p << 12))));
        assert!(rig.unit.cache_occupancy().iotlb <= 8);
    }
    assert_eq!(rig.unit.cache_occupancy().iotlb, 8, "full, not flushed");
    // The most recent translations hit.
    let before = rig.unit.stats().iotlb_hits;
    assert!(hpa(&rig, 63 << 12, Direction::Read).is_some());
    assert_eq!(rig.unit.stats().iotlb_hits, before + 1);
}

#[test]
fn superpages_translate_every_offset() {
    let mut rig = Rig::new();
    let aw = AddressWidth::Aw57;
    let top = rig.attach(SID, 1, TranslationType::Untranslated, aw);
    rig.map(top, aw, Iova(1 << 30), Hpa(2 << 30), 3, true, true);
    rig.map(top, aw, Iova(0x20_0000), Hpa(0x60_0000), 2, true, false);
    let t = rig.unit.translate(SID, Iova((1 << 30) + 0x1234_5678), Direction::Write).expect("1G");
    assert_eq!((t.hpa, t.page_shift), (Hpa((2 << 30) + 0x1234_5678), 30));
    let t = rig.unit.translate(SID, Iova(0x3f_ffff), Direction::Read).expect("2M");
    assert_eq!((t.hpa, t.page_shift), (Hpa(0x7f_ffff), 21));
}

#[test]
fn translation_disabled_and_pass_through_use_the_input_address() {
    let mut rig = Rig::new();
    rig.attach(SID, 1, TranslationType::PassThrough, AW);
    assert_eq!(hpa(&rig, 0x1234_5678, Direction::Write), Some(Hpa(0x1234_5678)));
    rig.unit.write32(regs::GCMD, 0).expect("te off");
    assert_eq!(rig.unit.read32(regs::GSTS).expect("gsts") & gcmd::TE, 0);
    assert_eq!(
        rig.unit.translate(SourceId::new(9, 9, 1), Iova(0x5000), Direction::Read).map(|t| t.hpa),
        Ok(Hpa(0x5000)),
        "TE=0: no context needed"
    );
}

#[test]
fn dma_reads_and_writes_cross_pages() {
    let mut rig = Rig::new();
    let top = rig.attach(SID, 1, TranslationType::DeviceTlb, AW);
    // Two virtually contiguous pages backed by non-contiguous frames.
    rig.map(top, AW, Iova(0x10_0000), Hpa(0x5000_0000), 1, true, true);
    rig.map(top, AW, Iova(0x10_1000), Hpa(0x3000_0000), 1, true, true);
    let data: Vec<u8> = (0..64).collect();
    rig.unit.dma_write(SID, Iova(0x10_0fe0), &data).expect("write");
    let mut a = [0u8; 32];
    let mut b = [0u8; 32];
    rig.mem.read(Hpa(0x5000_0fe0), &mut a).expect("mem");
    rig.mem.read(Hpa(0x3000_0000), &mut b).expect("mem");
    assert_eq!(&a[..], &data[..32]);
    assert_eq!(&b[..], &data[32..]);
    let mut back = vec![0u8; 64];
    rig.unit.dma_read(SID, Iova(0x10_0fe0), &mut back).expect("read");
    assert_eq!(back, data);
    // Translated DMA (TT=01) goes straight to the host address.
    rig.unit.translated_write(SID, Hpa(0x3000_0100), &[9; 8]).expect("translated");
    assert_eq!(rig.mem.read_u64(Hpa(0x3000_0100)).expect("mem"), 0x0909_0909_0909_0909);
    // Overflowing ranges are refused.
    assert!(rig.unit.dma_read(SID, Iova(u64::MAX - 3), &mut back).is_err());
}

#[test]
fn mmio_accesses_outside_the_window_or_misaligned_are_errors() {
    let rig = Rig::new();
    assert!(matches!(rig.unit.read32(regs::WINDOW_SIZE), Err(MmioError::OutOfWindow { .. })));
    assert!(matches!(rig.unit.read64(u64::MAX - 3), Err(MmioError::OutOfWindow { .. })));
    assert!(matches!(rig.unit.write64(0x24, 0), Err(MmioError::Misaligned { .. })));
    assert!(matches!(rig.unit.write32(0x1a, 0), Err(MmioError::Misaligned { .. })));
    // Read-only and reserved registers ignore writes.
    let cap = rig.unit.read64(regs::CAP).expect("cap");
    rig.unit.write64(regs::CAP, !0).expect("ignored");
    assert_eq!(rig.unit.read64(regs::CAP).expect("cap"), cap);
    assert_eq!(rig.unit.read32(0x800).expect("reserved"), 0);
}

#[test]
fn concurrent_translations_never_outlive_an_invalidation() {
    // Threads translate while the main thread remaps the page and invalidates; after each
    // invalidation completes, a fresh translation must see the new frame.
    let mut rig = Rig::new();
    let top = rig.attach(SID, 1, TranslationType::Untranslated, AW);
    let pte = rig.map(top, AW, Iova(0x7000), Hpa(0x1000_0000), 1, true, true);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let unit = rig.unit.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = unit.translate(SID, Iova(0x7000), Direction::Read);
                }
            })
        })
        .collect();
    for i in 1..2000u64 {
        let frame = Hpa(0x1000_0000 + (i % 16) * 0x1000);
        rig.mem.write_u64(pte, SlPte::leaf(frame, true, true, false).to_bits()).expect("pte");
        rig.invalidate_page(1, Iova(0x7000));
        assert_eq!(hpa(&rig, 0x7000, Direction::Read), Some(frame), "iteration {i}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.join().expect("worker");
    }
}
