//! Every DMA-remapping fault reason the unit can raise (VT-d 7.1.3),
//! each raised by a request and checked in the fault recording registers: reason, source
//! id, address, read/write and request kind. Interrupt-remapping reasons (0x20-0x26) come
//! with interrupt remapping.

mod common;

use common::Rig;
use dmar_vtd::unit::regs::{self, fsts};
use dmar_vtd::unit::tables::{AddressWidth, ContextEntry, RootEntry, SlPte, TranslationType};
use dmar_vtd::unit::{AtsCompletion, Blocked, Direction, FaultReason, FaultRecord, RequestKind};
use dmar_vtd::{DomainId, Hpa, Iova, SourceId};

const SID: SourceId = SourceId::new(0x12, 3, 1);

fn expect_one(rig: &Rig, reason: FaultReason, addr: u64, access: Direction, kind: RequestKind) {
    let records = rig.unit.fault_records();
    assert_eq!(
        records,
        vec![FaultRecord { reason, sid: SID, addr: addr & !0xfff, access, kind }],
        "recorded fault for {reason}"
    );
    // The same, through the registers software reads.
    let fsts_v = rig.unit.read32(regs::FSTS).expect("fsts");
    assert_ne!(fsts_v & fsts::PPF, 0, "PPF");
    let fri = u64::from((fsts_v >> fsts::FRI_SHIFT) & 0xff);
    let lo = rig.unit.read64(regs::FRCD_BASE + 16 * fri).expect("frcd lo");
    let hi = rig.unit.read64(regs::FRCD_BASE + 16 * fri + 8).expect("frcd hi");
    assert_eq!(lo, addr & !0xfff, "FI");
    assert_eq!(hi & 0xffff, u64::from(SID.0), "SID");
    assert_eq!((hi >> 32) & 0xff, u64::from(reason.code()), "FR");
    assert_eq!((hi >> 62) & 1, u64::from(access == Direction::Read), "T");
    assert_eq!((hi >> 60) & 3, kind as u64, "AT");
    assert_eq!(hi >> 63, 1, "F");
}

fn read(rig: &Rig, iova: u64) -> Result<dmar_vtd::unit::Translation, Blocked> {
    rig.unit.translate(SID, Iova(iova), Direction::Read)
}

fn blocked(reason: FaultReason) -> Result<dmar_vtd::unit::Translation, Blocked> {
    Err(Blocked { reason: Some(reason) })
}

#[test]
fn root_entry_not_present_0x01() {
    let rig = Rig::new();
    assert_eq!(read(&rig, 0x1000), blocked(FaultReason::RootEntryNotPresent));
    expect_one(&rig, FaultReason::RootEntryNotPresent, 0x1000, Direction::Read, RequestKind::Untranslated);
}

#[test]
fn context_entry_not_present_0x02() {
    let mut rig = Rig::new();
    rig.set_context(SourceId::new(0x12, 3, 0), ContextEntry::default()); // creates the bus's table only
    assert_eq!(rig.unit.translate(SID, Iova(0x5000), Direction::Write), blocked(FaultReason::ContextEntryNotPresent));
    expect_one(&rig, FaultReason::ContextEntryNotPresent, 0x5000, Direction::Write, RequestKind::Untranslated);
}

#[test]
fn invalid_context_programming_0x03() {
    // TT = 11b.
    let mut rig = Rig::new();
    let mut e = ContextEntry::new(DomainId(1), TranslationType::Untranslated, AddressWidth::Aw48, Hpa(0x2000), false);
    e.lo |= 3 << 2;
    rig.set_context(SID, e);
    assert_eq!(read(&rig, 0x1000), blocked(FaultReason::ContextEntryInvalid));
    expect_one(&rig, FaultReason::ContextEntryInvalid, 0x1000, Direction::Read, RequestKind::Untranslated);
    // An AW the unit does not support (0 = 30-bit, not in SAGAW).
    let mut rig = Rig::new();
    let mut e = ContextEntry::new(DomainId(1), TranslationType::Untranslated, AddressWidth::Aw48, Hpa(0x2000), false);
    e.hi &= !7;
    rig.set_context(SID, e);
    assert_eq!(read(&rig, 0x1000), blocked(FaultReason::ContextEntryInvalid));
    expect_one(&rig, FaultReason::ContextEntryInvalid, 0x1000, Direction::Read, RequestKind::Untranslated);
}

#[test]
fn address_beyond_width_0x04() {
    let mut rig = Rig::new();
    rig.attach(SID, 1, TranslationType::Untranslated, AddressWidth::Aw39);
    let iova = 1u64 << 39;
    assert_eq!(read(&rig, iova), blocked(FaultReason::AddressBeyondWidth));
    expect_one(&rig, FaultReason::AddressBeyondWidth, iova, Direction::Read, RequestKind::Untranslated);
}

#[test]
fn no_write_permission_0x05() {
    let mut rig = Rig::new();
    let top = rig.attach(SID, 1, TranslationType::Untranslated, AddressWidth::Aw48);
    rig.map(top, AddressWidth::Aw48, Iova(0x7000), Hpa(0x20_0000), 1, true, false);
    assert!(read(&rig, 0x7000).is_ok());
    assert_eq!(rig.unit.translate(SID, Iova(0x7008), Direction::Write), blocked(FaultReason::NoWrite));
    expect_one(&rig, FaultReason::NoWrite, 0x7008, Direction::Write, RequestKind::Untranslated);
}

#[test]
fn no_read_permission_0x06() {
    // Not present (R=W=0) and write-only both refuse reads with 0x06.
    let mut rig = Rig::new();
    let top = rig.attach(SID, 1, TranslationType::Untranslated, AddressWidth::Aw48);
    rig.map(top, AddressWidth::Aw48, Iova(0x9000), Hpa(0x20_0000), 1, false, true);
    assert!(rig.unit.translate(SID, Iova(0x9000), Direction::Write).is_ok());
    assert_eq!(read(&rig, 0x9000), blocked(FaultReason::NoRead));
    expect_one(&rig, FaultReason::NoRead, 0x9000, Direction::Read, RequestKind::Untranslated);
    let rig2 = {
        let mut r = Rig::new();
        r.attach(SID, 1, TranslationType::Untranslated, AddressWidth::Aw48);
        r
    };
    assert_eq!(read(&rig2, 0xa000), blocked(FaultReason::NoRead));
    expect_one(&rig2, FaultReason::NoRead, 0xa000, Direction::Read, RequestKind::Untranslated);
}

#[test]
fn paging_entry_access_error_0x07() {
    let mut rig = Rig::new();
    let top = rig.attach(SID, 1, TranslationType::Untranslated, AddressWidth::Aw48);
    // The level-4 entry points to a table beyond the 4 GiB memory.
    rig.mem.write_u64(top, SlPte::table(Hpa(common::MEMORY + 0x1000)).to_bits()).expect("pte");
    assert_eq!(read(&rig, 0x3000), blocked(FaultReason::PagingEntryAccess));
    expect_one(&rig, FaultReason::PagingEntryAccess, 0x3000, Direction::Read, RequestKind::Untranslated);
}

#[test]
fn root_table_invalid_0x08() {
    let rig = Rig::new();
    rig.unit.write64(regs::RTADDR, common::MEMORY + 0x10_0000).expect("rtaddr");
    rig.unit.write32(regs::GCMD, dmar_vtd::unit::regs::gcmd::SRTP | dmar_vtd::unit::regs::gcmd::TE).expect("srtp");
    assert_eq!(read(&rig, 0x1000), blocked(FaultReason::RootTableInvalid));
    expect_one(&rig, FaultReason::RootTableInvalid, 0x1000, Direction::Read, RequestKind::Untranslated);
}

#[test]
fn context_table_invalid_0x09() {
    let rig = Rig::new();
    rig.set_root(SID.bus(), RootEntry::new(Hpa(common::MEMORY + 0x4000_0000)));
    assert_eq!(read(&rig, 0x1000), blocked(FaultReason::ContextTableInvalid));
    expect_one(&rig, FaultReason::ContextTableInvalid, 0x1000, Direction::Read, RequestKind::Untranslated);
}

#[test]
fn root_entry_reserved_0x0a() {
    let mut rig = Rig::new();
    rig.attach(SID, 1, TranslationType::Untranslated, AddressWidth::Aw48);
    let ctx_table = Hpa(rig.mem.read_u64(Hpa(rig.root.0 + u64::from(SID.bus()) * 16)).expect("root") & !0xfff);
    rig.set_root(SID.bus(), RootEntry::from_bits(ctx_table.0 | 1 | (1 << 5), 0));
    assert_eq!(read(&rig, 0x1000), blocked(FaultReason::RootEntryReserved));
    expect_one(&rig, FaultReason::RootEntryReserved, 0x1000, Direction::Read, RequestKind::Untranslated);
}

#[test]
fn context_entry_reserved_0x0b() {
    let mut rig = Rig::new();
    let mut e = ContextEntry::new(DomainId(1), TranslationType::Untranslated, AddressWidth::Aw48, Hpa(0x2000), false);
    e.hi |= 1 << 40;
    rig.set_context(SID, e);
    assert_eq!(read(&rig, 0x1000), blocked(FaultReason::ContextEntryReserved));
    expect_one(&rig, FaultReason::ContextEntryReserved, 0x1000, Direction::Read, RequestKind::Untranslated);
}

#[test]
fn paging_entry_reserved_0x0c() {
    // SNP (bit 11) is reserved: the unit reports no snoop control.
    let mut rig = Rig::new();
    let top = rig.attach(SID, 1, TranslationType::Untranslated, AddressWidth::Aw48);
    let a = rig.map(top, AddressWidth::Aw48, Iova(0x4000), Hpa(0x20_0000), 1, true, true);
    rig.mem.write_u64(a, rig.mem.read_u64(a).expect("pte") | SlPte::SNP).expect("pte");
    assert_eq!(read(&rig, 0x4000), blocked(FaultReason::PagingEntryReserved));
    expect_one(&rig, FaultReason::PagingEntryReserved, 0x4000, Direction::Read, RequestKind::Untranslated);
    // PS at level 4 is reserved too.
    let mut rig = Rig::new();
    let top = rig.attach(SID, 1, TranslationType::Untranslated, AddressWidth::Aw48);
    rig.mem.write_u64(top, SlPte::leaf(Hpa(0), true, true, true).to_bits()).expect("pte");
    assert_eq!(read(&rig, 0x4000), blocked(FaultReason::PagingEntryReserved));
    expect_one(&rig, FaultReason::PagingEntryReserved, 0x4000, Direction::Read, RequestKind::Untranslated);
}

#[test]
fn translation_type_blocks_ats_and_translated_requests_0x0d() {
    let mut rig = Rig::new();
    let top = rig.attach(SID, 1, TranslationType::Untranslated, AddressWidth::Aw48);
    rig.map(top, AddressWidth::Aw48, Iova(0x4000), Hpa(0x20_0000), 1, true, true);
    assert_eq!(rig.unit.ats_translate(SID, Iova(0x4000), false), AtsCompletion::UnsupportedRequest);
    expect_one(&rig, FaultReason::TranslationTypeBlocked, 0x4000, Direction::Write, RequestKind::TranslationRequest);

    let mut rig = Rig::new();
    rig.attach(SID, 1, TranslationType::PassThrough, AddressWidth::Aw48);
    assert_eq!(
        rig.unit.check_translated(SID, Hpa(0x20_0000), 64, Direction::Read),
        Err(Blocked { reason: Some(FaultReason::TranslationTypeBlocked) })
    );
    expect_one(&rig, FaultReason::TranslationTypeBlocked, 0x20_0000, Direction::Read, RequestKind::Translated);
}

#[test]
fn output_in_interrupt_range_0x0e() {
    // An untranslated request whose translation lands in 0xFEEx_xxxx.
    let mut rig = Rig::new();
    let top = rig.attach(SID, 1, TranslationType::DeviceTlb, AddressWidth::Aw48);
    rig.map(top, AddressWidth::Aw48, Iova(0x4000), Hpa(0xfee0_0000), 1, true, true);
    assert_eq!(rig.unit.translate(SID, Iova(0x4010), Direction::Write), blocked(FaultReason::InterruptAddress));
    expect_one(&rig, FaultReason::InterruptAddress, 0x4010, Direction::Write, RequestKind::Untranslated);
    // A translated request into the range.
    let mut rig = Rig::new();
    rig.attach(SID, 1, TranslationType::DeviceTlb, AddressWidth::Aw48);
    let mut buf = [0u8; 4];
    assert!(rig.unit.translated_read(SID, Hpa(0xfee0_1000), &mut buf).is_err());
    expect_one(&rig, FaultReason::InterruptAddress, 0xfee0_1000, Direction::Read, RequestKind::Translated);
}

#[test]
fn fault_processing_disable_suppresses_qualified_faults_only() {
    let mut rig = Rig::new();
    let top = rig.alloc();
    rig.set_context(SID, ContextEntry::new(DomainId(1), TranslationType::Untranslated, AddressWidth::Aw48, top, true));
    // A qualified fault: the request still fails, nothing is recorded.
    assert_eq!(read(&rig, 0x1000), blocked(FaultReason::NoRead));
    assert!(rig.unit.fault_records().is_empty());
    assert_eq!(rig.unit.stats().faults_suppressed, 1);
    // FPD is honoured even in a not-present entry (as QEMU does).
    let e = ContextEntry::from_bits(2, 0);
    rig.set_context(SourceId::new(0x12, 3, 2), e);
    assert!(rig.unit.translate(SourceId::new(0x12, 3, 2), Iova(0), Direction::Read).is_err());
    assert!(rig.unit.fault_records().is_empty());
    // An unqualified fault is recorded regardless.
    rig.set_root(0x40, RootEntry::default());
    assert!(rig.unit.translate(SourceId::new(0x40, 0, 0), Iova(0), Direction::Read).is_err());
    assert_eq!(rig.unit.fault_records().len(), 1);
}

#[test]
fn ats_not_present_and_permission_problems_complete_without_fault() {
    let mut rig = Rig::new();
    let top = rig.attach(SID, 1, TranslationType::DeviceTlb, AddressWidth::Aw39);
    rig.map(top, AddressWidth::Aw39, Iova(0x20_0000), Hpa(0x4000_0000), 2, true, false);
    // Not present.
    match rig.unit.ats_translate(SID, Iova(0x1000), false) {
        AtsCompletion::Success(e) => assert!(!e.read && !e.write),
        other => panic!("{other:?}"),
    }
    // Beyond the width.
    match rig.unit.ats_translate(SID, Iova(1 << 40), false) {
        AtsCompletion::Success(e) => assert!(!e.read && !e.write),
        other => panic!("{other:?}"),
    }
    // Read-only superpage: R=1 W=0 over the naturally aligned 2 MiB range.
    match rig.unit.ats_translate(SID, Iova(0x23_4567), false) {
        AtsCompletion::Success(e) => {
            assert_eq!(
                (e.translated, e.size_shift, e.read, e.write, e.untranslated_only),
                (Hpa(0x4000_0000), 21, true, false, false)
            );
        }
        other => panic!("{other:?}"),
    }
    // The interrupt range: R=0 W=1 U=1.
    match rig.unit.ats_translate(SID, Iova(0xfee0_0000), false) {
        AtsCompletion::Success(e) => assert!(!e.read && e.write && e.untranslated_only),
        other => panic!("{other:?}"),
    }
    assert!(rig.unit.fault_records().is_empty());
    // Context problems are UR with a fault.
    assert_eq!(rig.unit.ats_translate(SourceId::new(0x13, 0, 0), Iova(0), true), AtsCompletion::UnsupportedRequest);
    assert_eq!(rig.unit.fault_records().len(), 1);
}

#[test]
fn untranslated_requests_to_the_interrupt_range_are_never_dma() {
    let mut rig = Rig::new();
    let top = rig.attach(SID, 1, TranslationType::Untranslated, AddressWidth::Aw48);
    rig.map(top, AddressWidth::Aw48, Iova(0xfee0_0000), Hpa(0x20_0000), 1, true, true);
    assert_eq!(rig.unit.translate(SID, Iova(0xfee0_0000), Direction::Write), Err(Blocked { reason: None }));
    // Anything but an aligned DWORD write there is refused...
    assert!(rig.unit.dma_write(SID, Iova(0xfee0_0ff0), &[1, 2, 3, 4, 5, 6, 7, 8]).is_err());
    let mut buf = [0u8; 4];
    assert!(rig.unit.dma_read(SID, Iova(0xfee0_0000), &mut buf).is_err());
    // ...and an aligned DWORD write is an interrupt (passed through: remapping is off).
    assert!(rig.unit.dma_write(SID, Iova(0xfee0_0000), &[0x30, 0, 0, 0]).is_ok());
    assert_eq!(rig.mem.read_u64(Hpa(0x20_0000)).expect("mem"), 0, "nothing written");
    assert!(rig.unit.fault_records().is_empty());
}

#[test]
fn fault_ring_overflow_sets_pfo_and_software_recovers() {
    let rig = Rig::new();
    for i in 0..(regs::NUM_FAULT_RECORDS as u64 + 3) {
        assert!(read(&rig, i << 12).is_err());
    }
    assert_eq!(rig.unit.fault_records().len(), regs::NUM_FAULT_RECORDS);
    assert_ne!(rig.unit.read32(regs::FSTS).expect("fsts") & fsts::PFO, 0);
    assert_eq!(rig.unit.stats().faults_overflowed, 3);
    // Software clears every record (F is write-1-to-clear) and PFO.
    for i in 0..regs::NUM_FAULT_RECORDS as u64 {
        rig.unit.write32(regs::FRCD_BASE + 16 * i + 12, 1 << 31).expect("clear F");
    }
    rig.unit.write32(regs::FSTS, fsts::PFO).expect("clear PFO");
    assert_eq!(rig.unit.read32(regs::FSTS).expect("fsts") & (fsts::PFO | fsts::PPF), 0);
    assert!(read(&rig, 0x1234_5000).is_err());
    assert_eq!(rig.unit.fault_records().len(), 1);
}
