//! The remapper end to end: IRTEs written into host memory, MSIs in, interrupts or faults
//! out. One test per rule of the module docs, plus the cache's staleness and invalidation
//! contract.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::ids::Hpa;

const TABLE: Hpa = Hpa(0x10_0000);
/// S = 7: 256 entries.
const S: u8 = 7;

fn dev() -> SourceId {
    SourceId::new(0x03, 0x04, 0)
}

fn memory() -> HostMemory {
    HostMemory::new(64 << 20).expect("valid size")
}

fn put_at(mem: &HostMemory, table: Hpa, index: u16, e: Irte) {
    let at = Irte::address(table, u32::from(index)).expect("in range");
    mem.write_u64(at, e.lo).expect("in memory");
    mem.write_u64(Hpa(at.0 + 8), e.hi).expect("in memory");
}

fn put(mem: &HostMemory, index: u16, e: Irte) {
    put_at(mem, TABLE, index, e);
}

/// Memory holding `e` at `index` of the table at [`TABLE`], and a [`remapper`] over it.
fn with_entry(mode: ApicMode, index: u16, e: Irte) -> (HostMemory, InterruptRemapper) {
    let mem = memory();
    put(&mem, index, e);
    (mem, remapper(mode))
}

/// A remapper with IRE on over a 256-entry table at [`TABLE`].
fn remapper(mode: ApicMode) -> InterruptRemapper {
    let ir = InterruptRemapper::default();
    ir.set_table(Irta::new(TABLE, S, mode).to_bits());
    ir.enable(true);
    ir
}

fn remap(ir: &InterruptRemapper, mem: &HostMemory, sid: SourceId, handle: u16) -> Result<Remapped, IrFault> {
    let (addr, data) = msi_remappable(handle, false);
    ir.remap(mem, sid, addr, data)
}

fn fault(reason: FaultReason, index: Option<u16>, fpd: bool) -> Result<Remapped, IrFault> {
    Err(IrFault { reason, index, fpd })
}

#[test]
fn remapper_is_send_and_sync() {
    crate::testing::assert_send_sync::<InterruptRemapper>();
}

#[test]
fn remaps_through_the_irte_in_xapic_mode() {
    let mem = memory();
    let ir = remapper(ApicMode::XApic);
    let e = Irte::remapped(0x41, 0x07, ApicMode::XApic)
        .with_delivery_mode(DeliveryMode::LowestPriority)
        .with_trigger(Trigger::Level)
        .with_destination_mode(DestinationMode::Logical)
        .with_redirection_hint(true);
    put(&mem, 5, e);
    assert_eq!(
        remap(&ir, &mem, dev(), 5),
        Ok(Remapped {
            vector: 0x41,
            destination: 0x07,
            delivery_mode: DeliveryMode::LowestPriority,
            trigger: Trigger::Level,
            destination_mode: DestinationMode::Logical,
            redirection_hint: true,
            index: Some(5),
        })
    );
    // The MSI data is not used without SHV.
    let (addr, _) = msi_remappable(5, false);
    assert_eq!(ir.remap(&mem, dev(), addr, 0xffff_ffff).map(|r| r.vector), Ok(0x41));
    // The top handle bit (address bit 2) is decoded; a 65536-entry table reaches it.
    ir.set_table(Irta::new(TABLE, 15, ApicMode::XApic).to_bits());
    put(&mem, 0x8003, Irte::remapped(0x42, 1, ApicMode::XApic));
    assert_eq!(remap(&ir, &mem, dev(), 0x8003).map(|r| (r.vector, r.index)), Ok((0x42, Some(0x8003))));
}

#[test]
fn x2apic_mode_delivers_the_full_destination() {
    let (mem, ir) = with_entry(ApicMode::X2Apic, 1, Irte::remapped(0x30, 0x0001_0203, ApicMode::X2Apic));
    assert_eq!(remap(&ir, &mem, dev(), 1).map(|r| r.destination), Ok(0x0001_0203));
    // The same entry read in xAPIC mode has reserved DST bits set.
    let xapic = remapper(ApicMode::XApic);
    assert_eq!(remap(&xapic, &mem, dev(), 1), fault(FaultReason::IrEntryReserved, Some(1), false));
    // An xAPIC-encoded entry gives DST[15:8] in xAPIC mode and all of DST in x2APIC mode.
    put(&mem, 2, Irte::remapped(0x30, 0x12, ApicMode::XApic));
    assert_eq!(remap(&xapic, &mem, dev(), 2).map(|r| r.destination), Ok(0x12));
    assert_eq!(remap(&ir, &mem, dev(), 2).map(|r| r.destination), Ok(0x1200));
}

#[test]
fn subhandle_is_added_with_shv() {
    let (mem, ir) = with_entry(ApicMode::XApic, 8, Irte::remapped(0x80, 1, ApicMode::XApic));
    put(&mem, 11, Irte::remapped(0x83, 1, ApicMode::XApic));
    let (addr, data) = msi_remappable(8, true);
    assert_eq!(ir.remap(&mem, dev(), addr, data | 3).map(|r| (r.vector, r.index)), Ok((0x83, Some(11))));
    assert_eq!(ir.remap(&mem, dev(), addr, data).map(|r| (r.vector, r.index)), Ok((0x80, Some(8))));
    // Without SHV the same data is ignored.
    let (addr, data) = msi_remappable(8, false);
    assert_eq!(ir.remap(&mem, dev(), addr, data | 3).map(|r| r.index), Ok(Some(8)));
}

#[test]
fn fault_0x20_reserved_request_fields() {
    let (mem, ir) = with_entry(ApicMode::XApic, 4, Irte::remapped(0x20, 1, ApicMode::XApic));
    let (addr, data) = msi_remappable(4, true);
    assert_eq!(ir.remap(&mem, dev(), addr, data | 0x1_0000), fault(FaultReason::IrRequestReserved, Some(4), false));
    assert_eq!(ir.remap(&mem, dev(), addr | 1 << 32, data), fault(FaultReason::IrRequestReserved, None, false));
    assert_eq!(ir.remap(&mem, dev(), 0xfed0_0010, 0), fault(FaultReason::IrRequestReserved, None, false));
    assert!(ir.remap(&mem, dev(), addr, data).is_ok());
    assert_eq!(ir.stats().blocked_by(FaultReason::IrRequestReserved), 3);
}

#[test]
fn fault_0x21_index_beyond_the_table() {
    let (mem, ir) = with_entry(ApicMode::XApic, 255, Irte::remapped(0x20, 1, ApicMode::XApic));
    assert!(remap(&ir, &mem, dev(), 255).is_ok());
    assert_eq!(remap(&ir, &mem, dev(), 256), fault(FaultReason::IrIndexOverflow, Some(256), false));
    // handle + subhandle counts: 250 + 6 = 256.
    let (addr, data) = msi_remappable(250, true);
    assert_eq!(ir.remap(&mem, dev(), addr, data | 6), fault(FaultReason::IrIndexOverflow, Some(256), false));
    // A sum past 16 bits does not wrap into the table even at the largest size.
    ir.set_table(Irta::new(TABLE, 15, ApicMode::XApic).to_bits());
    let (addr, data) = msi_remappable(0xffff, true);
    assert_eq!(ir.remap(&mem, dev(), addr, data | 1), fault(FaultReason::IrIndexOverflow, Some(0), false));
}

#[test]
fn fault_0x22_entry_not_present_honours_fpd() {
    let mem = memory();
    let ir = remapper(ApicMode::XApic);
    assert_eq!(remap(&ir, &mem, dev(), 9), fault(FaultReason::IrEntryNotPresent, Some(9), false));
    let e = Irte::remapped(0x20, 1, ApicMode::XApic).with_present(false).with_fpd(true);
    put(&mem, 9, e);
    let f = remap(&ir, &mem, dev(), 9).expect_err("not present");
    assert_eq!(f, IrFault { reason: FaultReason::IrEntryNotPresent, index: Some(9), fpd: true });
    assert!(!f.should_record());
    // Not-present entries are not cached: making it present needs no invalidation.
    put(&mem, 9, e.with_present(true));
    assert_eq!(remap(&ir, &mem, dev(), 9).map(|r| r.vector), Ok(0x20));
}

#[test]
fn fault_0x23_table_unreadable() {
    let mem = memory();
    let ir = InterruptRemapper::default();
    ir.enable(true);
    // IRE on, no table latched.
    assert_eq!(remap(&ir, &mem, dev(), 3), fault(FaultReason::IrTableAccess, Some(3), false));
    // A 512-entry (8 KiB) table whose second half lies past the end of memory.
    let end = Hpa(mem.size() - 0x1000);
    ir.set_table(Irta::new(end, 8, ApicMode::XApic).to_bits());
    put_at(&mem, end, 255, Irte::remapped(0x20, 1, ApicMode::XApic));
    assert!(remap(&ir, &mem, dev(), 255).is_ok());
    assert_eq!(remap(&ir, &mem, dev(), 256), fault(FaultReason::IrTableAccess, Some(256), false));
    // A table entirely above memory.
    ir.set_table(Irta::new(Hpa(1 << 36), S, ApicMode::XApic).to_bits());
    assert_eq!(remap(&ir, &mem, dev(), 1), fault(FaultReason::IrTableAccess, Some(1), false));
    let f = IrFault { reason: FaultReason::IrTableAccess, index: Some(0xabcd), fpd: false };
    assert!(f.should_record());
    assert_eq!(f.fault_info(), 0xabcd << 48, "FI[63:48] = interrupt index");
}

#[test]
fn fault_0x24_reserved_irte_bits_honour_fpd() {
    let mem = memory();
    let ir = remapper(ApicMode::XApic);
    let good = Irte::remapped(0x20, 1, ApicMode::XApic);
    let bad = [
        ("rsvd lo[14:12]", Irte::from_bits(good.lo | 1 << 13, good.hi)),
        ("IM = 1 (posted)", Irte::from_bits(good.lo | 1 << 15, good.hi)),
        ("rsvd lo[31:24]", Irte::from_bits(good.lo | 1 << 24, good.hi)),
        ("xAPIC DST[7:0]", Irte::from_bits(good.lo | 1 << 32, good.hi)),
        ("xAPIC DST[31:16]", Irte::from_bits(good.lo | 1 << 63, good.hi)),
        ("rsvd hi[63:20]", Irte::from_bits(good.lo, 1 << 20)),
        ("SVT = 11b", Irte::from_bits(good.lo, 3 << 18)),
        ("DLM = 011b", Irte::from_bits(good.lo | 3 << 5, good.hi)),
        ("DLM = 110b", Irte::from_bits(good.lo | 6 << 5, good.hi)),
    ];
    for (i, (what, e)) in bad.iter().enumerate() {
        let index = 20 + i as u16;
        put(&mem, index, *e);
        assert_eq!(remap(&ir, &mem, dev(), index), fault(FaultReason::IrEntryReserved, Some(index), false), "{what}");
        put(&mem, index, e.with_fpd(true));
        assert_eq!(remap(&ir, &mem, dev(), index), fault(FaultReason::IrEntryReserved, Some(index), true), "{what}");
    }
    // Faulting entries are not cached: a fixed entry is used without an invalidation.
    put(&mem, 20, good);
    assert!(remap(&ir, &mem, dev(), 20).is_ok());
    assert_eq!(ir.stats().blocked_by(FaultReason::IrEntryReserved), 2 * bad.len() as u64);
}

#[test]
fn fault_0x25_compatibility_format_policy() {
    let mem = memory();
    let ir = remapper(ApicMode::XApic);
    let (addr, data) = msi_compatibility(0x05, 0x61, DeliveryMode::Fixed, Trigger::Edge, DestinationMode::Physical);
    // CFIS = 0: blocked.
    assert_eq!(ir.remap(&mem, dev(), addr, data), fault(FaultReason::IrCompatBlocked, None, false));
    // CFIS = 1 in xAPIC mode: passed through, unremapped.
    ir.set_compat_allowed(true);
    let r = ir.remap(&mem, dev(), addr, data).expect("passes through");
    assert_eq!((r.vector, r.destination, r.index), (0x61, 0x05, None));
    // x2APIC mode blocks compatibility format whatever CFI says (VT-d 5.1.4).
    ir.set_table(Irta::new(TABLE, S, ApicMode::X2Apic).to_bits());
    assert_eq!(ir.remap(&mem, dev(), addr, data), fault(FaultReason::IrCompatBlocked, None, false));
    // An undeliverable pass-through message is refused but not recordable.
    ir.set_table(Irta::new(TABLE, S, ApicMode::XApic).to_bits());
    let f = ir.remap(&mem, dev(), addr, (data & !(7 << 8)) | 3 << 8).expect_err("reserved delivery mode");
    assert_eq!(f, IrFault { reason: FaultReason::IrRequestReserved, index: None, fpd: true });
    let s = ir.stats();
    assert_eq!((s.passed_through, s.blocked_by(FaultReason::IrCompatBlocked)), (1, 2));
}

#[test]
fn fault_0x26_and_requester_id_checks_for_every_qualifier() {
    let mem = memory();
    let ir = remapper(ApicMode::XApic);
    let owner = SourceId::new(0x03, 0x04, 0);
    for (n, sq) in [
        SourceQualifier::Exact,
        SourceQualifier::IgnoreBit2,
        SourceQualifier::IgnoreBits2To1,
        SourceQualifier::IgnoreBits2To0,
    ]
    .into_iter()
    .enumerate()
    {
        let index = 40 + n as u16;
        let e = Irte::remapped(0x50, 1, ApicMode::XApic)
            .with_source_validation(SourceValidation::Requester { sid: owner, qualifier: sq });
        put(&mem, index, e);
        for func in 0..8u8 {
            let sid = SourceId::new(0x03, 0x04, func);
            let want = u16::from(func) & !sq.ignored_bits() == 0;
            let got = remap(&ir, &mem, sid, index);
            if want {
                assert_eq!(got.map(|r| r.index), Ok(Some(index)), "{sq:?} fn {func}");
            } else {
                assert_eq!(got, fault(FaultReason::IrSourceId, Some(index), false), "{sq:?} fn {func}");
            }
        }
        // Another device or bus never matches.
        assert!(remap(&ir, &mem, SourceId::new(0x03, 0x05, 0), index).is_err());
        assert!(remap(&ir, &mem, SourceId::new(0x04, 0x04, 0), index).is_err());
    }
    // The admitted function counts per qualifier: 1, 2, 4, 8.
    assert_eq!(ir.stats().remapped, 1 + 2 + 4 + 8);
    // FPD suppresses the record.
    let e = Irte::remapped(0x50, 1, ApicMode::XApic)
        .with_fpd(true)
        .with_source_validation(SourceValidation::Requester { sid: owner, qualifier: SourceQualifier::Exact });
    put(&mem, 50, e);
    assert_eq!(remap(&ir, &mem, SourceId(1), 50), fault(FaultReason::IrSourceId, Some(50), true));
}

#[test]
fn no_source_validation_admits_everyone() {
    let (mem, ir) = with_entry(
        ApicMode::XApic,
        7,
        Irte::remapped(0x50, 1, ApicMode::XApic).with_source_validation(SourceValidation::None),
    );
    for sid in [SourceId(0), SourceId(0xffff), dev()] {
        assert!(remap(&ir, &mem, sid, 7).is_ok());
    }
}

#[test]
fn bus_range_check_reads_start_from_the_upper_byte() {
    let mem = memory();
    let ir = remapper(ApicMode::XApic);
    let e = Irte::remapped(0x50, 1, ApicMode::XApic)
        .with_source_validation(SourceValidation::BusRange { start: 2, end: 5 });
    assert_eq!(e.sid_field(), 0x0205);
    put(&mem, 60, e);
    for bus in [2u8, 3, 5] {
        assert!(remap(&ir, &mem, SourceId::new(bus, 0x1f, 7), 60).is_ok(), "bus {bus} inside");
    }
    for bus in [0u8, 1, 6, 0xff] {
        assert_eq!(remap(&ir, &mem, SourceId::new(bus, 0, 0), 60), fault(FaultReason::IrSourceId, Some(60), false));
    }
    // Read the QEMU way round (0x0502), the range would be empty.
    put(&mem, 61, Irte::from_bits(e.lo, (2 << 18) | 0x0502));
    assert!(remap(&ir, &mem, SourceId::new(3, 0, 0), 61).is_err());
}

#[test]
fn remapping_off_passes_everything_through() {
    let mem = memory();
    let ir = InterruptRemapper::default();
    // No table at all, IRE off.
    let (addr, data) = msi_compatibility(0x09, 0x70, DeliveryMode::Fixed, Trigger::Edge, DestinationMode::Physical);
    assert_eq!(ir.remap(&mem, dev(), addr, data).map(|r| (r.vector, r.destination, r.index)), Ok((0x70, 9, None)));
    // A remappable-format message is not looked up either.
    let (addr, _) = msi_remappable(3, false);
    assert_eq!(ir.remap(&mem, dev(), addr, 0x33).map(|r| r.index), Ok(None));
    // Turning IRE off after use also bypasses the table and the cache.
    let ir = remapper(ApicMode::XApic);
    put(&mem, 3, Irte::remapped(0x20, 1, ApicMode::XApic));
    assert_eq!(remap(&ir, &mem, dev(), 3).map(|r| r.index), Ok(Some(3)));
    ir.enable(false);
    assert_eq!(ir.remap(&mem, dev(), addr, 0x33).map(|r| (r.vector, r.index)), Ok((0x33, None)));
    // Undeliverable while off: refused, never recorded.
    assert_eq!(ir.remap(&mem, dev(), 0x1000, 0), fault(FaultReason::IrRequestReserved, None, true));
    let s = ir.stats();
    assert_eq!((s.remapped, s.passed_through, s.cache_misses), (1, 1, 1));
}

#[test]
fn stale_entry_is_served_until_invalidated() {
    let mem = memory();
    let ir = remapper(ApicMode::XApic).with_stale_detection(true);
    put(&mem, 12, Irte::remapped(0x21, 1, ApicMode::XApic));
    assert_eq!(remap(&ir, &mem, dev(), 12).map(|r| r.vector), Ok(0x21));
    // Software changes the IRTE but does not invalidate: the old entry is served.
    put(&mem, 12, Irte::remapped(0x22, 2, ApicMode::XApic));
    assert_eq!(remap(&ir, &mem, dev(), 12).map(|r| (r.vector, r.destination)), Ok((0x21, 1)));
    // Even clearing P is invisible.
    put(&mem, 12, Irte::default());
    assert_eq!(remap(&ir, &mem, dev(), 12).map(|r| r.vector), Ok(0x21));
    let s = ir.stats();
    assert_eq!((s.cache_misses, s.cache_hits, s.stale_hits), (1, 2, 2));
    // Invalidating another index changes nothing.
    assert_eq!(ir.invalidate(IecInvalidation::Index { index: 13, index_mask: 0 }), 0);
    assert_eq!(remap(&ir, &mem, dev(), 12).map(|r| r.vector), Ok(0x21));
    // Invalidating this one makes the change visible.
    assert_eq!(ir.invalidate(IecInvalidation::Index { index: 12, index_mask: 0 }), 1);
    assert_eq!(remap(&ir, &mem, dev(), 12), fault(FaultReason::IrEntryNotPresent, Some(12), false));
    put(&mem, 12, Irte::remapped(0x22, 2, ApicMode::XApic));
    assert_eq!(remap(&ir, &mem, dev(), 12).map(|r| (r.vector, r.destination)), Ok((0x22, 2)));
}

#[test]
fn index_selective_invalidation_honours_the_mask() {
    let mem = memory();
    let ir = remapper(ApicMode::XApic);
    for i in 0..16u16 {
        put(&mem, i, Irte::remapped(0x30, 1, ApicMode::XApic));
        assert!(remap(&ir, &mem, dev(), i).is_ok());
        put(&mem, i, Irte::remapped(0x31, 1, ApicMode::XApic));
    }
    assert_eq!(ir.cached_entries(), 16);
    // IM = 2 at index 6: the aligned block 4..=7.
    assert_eq!(ir.invalidate(IecInvalidation::Index { index: 6, index_mask: 2 }), 4);
    for i in 0..16u16 {
        let want = if (4..8).contains(&i) { 0x31 } else { 0x30 };
        assert_eq!(remap(&ir, &mem, dev(), i).map(|r| r.vector), Ok(want), "index {i}");
    }
    // IM = 3 at index 15: 8..=15.
    assert_eq!(ir.invalidate(IecInvalidation::Index { index: 15, index_mask: 3 }), 8);
    for i in 8..16u16 {
        assert_eq!(remap(&ir, &mem, dev(), i).map(|r| r.vector), Ok(0x31), "index {i}");
    }
    assert_eq!(ir.invalidate(IecInvalidation::Global), 16);
    assert_eq!(ir.cached_entries(), 0);
    assert_eq!(ir.stats().invalidations, 3);
}

#[test]
fn new_table_needs_a_global_invalidation() {
    let (mem, ir) = with_entry(ApicMode::XApic, 1, Irte::remapped(0x30, 1, ApicMode::XApic));
    assert_eq!(remap(&ir, &mem, dev(), 1).map(|r| r.vector), Ok(0x30));
    let other = Hpa(0x20_0000);
    put_at(&mem, other, 1, Irte::remapped(0x40, 1, ApicMode::XApic));
    ir.set_table(Irta::new(other, S, ApicMode::XApic).to_bits());
    assert_eq!(ir.table().map(Irta::base), Some(other));
    // SIRTP alone: the entry cached from the old table is still used.
    assert_eq!(remap(&ir, &mem, dev(), 1).map(|r| r.vector), Ok(0x30));
    ir.invalidate(IecInvalidation::Global);
    assert_eq!(remap(&ir, &mem, dev(), 1).map(|r| r.vector), Ok(0x40));
}

#[test]
fn cache_capacity_is_bounded() {
    let mem = memory();
    let ir = InterruptRemapper::new(CacheGeometry::new(4, 2)).expect("valid geometry");
    ir.set_table(Irta::new(TABLE, S, ApicMode::XApic).to_bits());
    ir.enable(true);
    for i in 0..200u16 {
        put(&mem, i, Irte::remapped(i as u8, 1, ApicMode::XApic));
    }
    for round in 0..2 {
        for i in 0..200u16 {
            assert_eq!(remap(&ir, &mem, dev(), i).map(|r| r.vector), Ok(i as u8), "round {round} index {i}");
            assert!(ir.cached_entries() <= 8);
        }
    }
    assert_eq!(ir.cached_entries(), 8);
    assert!(InterruptRemapper::new(CacheGeometry::new(3, 2)).is_err());
}

#[test]
fn counters_add_up() {
    let (mem, ir) = with_entry(ApicMode::XApic, 1, Irte::remapped(0x30, 1, ApicMode::XApic));
    for _ in 0..3 {
        assert!(remap(&ir, &mem, dev(), 1).is_ok());
    }
    assert!(remap(&ir, &mem, dev(), 2).is_err());
    assert!(remap(&ir, &mem, dev(), 300).is_err());
    let s = ir.stats();
    assert_eq!((s.remapped, s.cache_hits, s.cache_misses), (3, 2, 2));
    assert_eq!(s.blocked_by(FaultReason::IrEntryNotPresent), 1);
    assert_eq!(s.blocked_by(FaultReason::IrIndexOverflow), 1);
    assert_eq!(s.blocked_by(FaultReason::NoWrite), 0);
    assert_eq!(s.blocked_total(), 2);
    assert_eq!(IR_FAULT_REASONS.map(FaultReason::code), [0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26]);
}

#[test]
fn reset_forgets_everything() {
    let mem = memory();
    let ir = remapper(ApicMode::XApic);
    ir.set_compat_allowed(true);
    put(&mem, 1, Irte::remapped(0x30, 1, ApicMode::XApic));
    assert!(remap(&ir, &mem, dev(), 1).is_ok());
    ir.reset();
    assert!(!ir.enabled() && !ir.compat_allowed() && ir.table().is_none());
    assert_eq!(ir.cached_entries(), 0);
}

#[test]
fn iec_descriptor_decoding() {
    use crate::unit::invalidation::descriptor::{Descriptor, decode};
    assert_eq!(decode(0x4, 0), Ok(Descriptor::Iec(IecInvalidation::Global)));
    let qw0 = 0x4 | 1 << 4 | 5 << 27 | 0x1234 << 32;
    assert_eq!(decode(qw0, 0), Ok(Descriptor::Iec(IecInvalidation::Index { index: 0x1234, index_mask: 5 })));
}

/// An invalidation that has returned must never be undone by a remap that read the table
/// before it: after each invalidation, the newest entry is what is served. A smoke test: the
/// race window is narrow, so the epoch guard itself is tested deterministically in
/// `entry_cache` (`fill_from_before_an_invalidation_is_refused`).
#[test]
fn concurrent_remaps_cannot_refill_an_invalidated_entry() {
    let mem = Arc::new(memory());
    let ir = Arc::new(remapper(ApicMode::XApic));
    put(&mem, 0, Irte::remapped(0, 1, ApicMode::XApic));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (mem, ir, stop) = (Arc::clone(&mem), Arc::clone(&ir), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    assert!(remap(&ir, &mem, dev(), 0).is_ok());
                }
            })
        })
        .collect();
    for v in 1..=2000u32 {
        put(&mem, 0, Irte::remapped(v as u8, 1, ApicMode::XApic));
        ir.invalidate(IecInvalidation::Index { index: 0, index_mask: 0 });
        // Once the invalidation returned, no stale fill may survive it.
        assert_eq!(remap(&ir, &mem, dev(), 0).map(|r| r.vector), Ok(v as u8), "after write {v}");
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("reader thread");
    }
}
