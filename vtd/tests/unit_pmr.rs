//! DMA protected memory regions (VT-d 10.4.16-10.4.20): firmware programs them through the
//! registers before handing over, so devices behind a unit with translation disabled cannot
//! reach the protected memory; the OS enables translation and only then clears EPM (Linux
//! `iommu_disable_protect_mem_regions`). Blocked accesses record no fault. Checked here:
//! the firmware sequence, each route the regions guard (translation off, pass-through,
//! translated requests) and the one they do not (remapped requests), the registers' read
//! back, PRS, reset, and a property test against a reference model of the region test.

mod common;

use std::sync::Arc;

use common::Rig;
use dmar_vtd::driver::{DomainKind, Driver, DriverConfig, Perm};
use dmar_vtd::unit::regs::{self, fsts, pmen};
use dmar_vtd::unit::tables::{AddressWidth, TranslationType};
use dmar_vtd::unit::{AtsCompletion, DmaError, HostMemory, Unit, UnitConfig};
use dmar_vtd::{Hpa, Iova, SourceId};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Room for a high region above 4 GiB.
const MEMORY: u64 = 8 * GIB;
const SID: SourceId = SourceId::new(0, 4, 0);
/// The low region firmware protects: [16 MiB, 32 MiB).
const LOW: (u32, u32) = (16 * MIB as u32, 30 * MIB as u32);
/// The high region: [6 GiB, 6 GiB + 4 MiB).
const HIGH: (u64, u64) = (6 * GIB, 6 * GIB + 2 * MIB);

fn unit(memory: u64) -> Arc<Unit> {
    Arc::new(Unit::new(UnitConfig::default(), Arc::new(HostMemory::new(memory).expect("memory"))))
}

fn pmen(unit: &Unit) -> u32 {
    unit.read32(regs::PMEN).expect("pmen")
}

/// The firmware sequence (`unit` module docs): bases and limits, then EPM, then poll PRS.
fn protect(unit: &Unit, low: (u32, u32), high: (u64, u64)) {
    unit.write32(regs::PLMBASE, low.0).expect("plmbase");
    unit.write32(regs::PLMLIMIT, low.1).expect("plmlimit");
    unit.write64(regs::PHMBASE, high.0).expect("phmbase");
    unit.write64(regs::PHMLIMIT, high.1).expect("phmlimit");
    unit.write32(regs::PMEN, pmen::EPM).expect("epm");
    wait_prs(unit, true);
}

/// Polls PRS until it reads `on` (the unit switches at once: the first read sees it).
fn wait_prs(unit: &Unit, on: bool) {
    for _ in 0..1000 {
        if (pmen(unit) & pmen::PRS != 0) == on {
            return;
        }
        std::hint::spin_loop();
    }
    panic!("PRS never became {on}");
}

/// The Linux step once translation is on: clear EPM, wait for PRS to clear.
fn unprotect(unit: &Unit) {
    let v = pmen(unit) & !pmen::EPM;
    unit.write32(regs::PMEN, v).expect("clear epm");
    wait_prs(unit, false);
}

fn read(unit: &Unit, sid: SourceId, addr: u64) -> Result<(), DmaError> {
    unit.dma_read(sid, Iova(addr), &mut [0u8; 8])
}

fn write(unit: &Unit, sid: SourceId, addr: u64) -> Result<(), DmaError> {
    unit.dma_write(sid, Iova(addr), &[0x5a; 8])
}

fn protected(addr: u64) -> Result<(), DmaError> {
    Err(DmaError::ProtectedMemory { addr })
}

/// No fault was recorded and FSTS is clear: PMR blocks are not remapping faults.
fn assert_no_fault(unit: &Unit) {
    assert_eq!(unit.fault_records(), []);
    assert_eq!(unit.read32(regs::FSTS).expect("fsts") & (fsts::PPF | fsts::PFO), 0);
}

#[test]
fn capabilities_advertise_both_regions() {
    let cap = unit(MEMORY).read64(regs::CAP).expect("cap");
    assert_ne!(cap & regs::cap::PLMR, 0, "PLMR");
    assert_ne!(cap & regs::cap::PHMR, 0, "PHMR");
}

#[test]
fn with_translation_disabled_dma_into_the_regions_is_blocked_and_outside_passes() {
    let unit = unit(MEMORY);
    assert!(!unit.translation_enabled());
    protect(&unit, LOW, HIGH);
    for sid in [SID, SourceId::new(0x80, 0x1f, 7)] {
        for addr in [16 * MIB, 20 * MIB + 0x123, 32 * MIB - 8, 6 * GIB, 6 * GIB + 4 * MIB - 8] {
            assert_eq!(read(&unit, sid, addr), protected(addr), "read {addr:#x}");
            assert_eq!(write(&unit, sid, addr), protected(addr), "write {addr:#x}");
        }
        for addr in [0, 16 * MIB - 8, 32 * MIB, 4 * GIB, 6 * GIB - 8, 6 * GIB + 4 * MIB] {
            read(&unit, sid, addr).expect("read outside");
            write(&unit, sid, addr).expect("write outside");
        }
    }
    let mut buf = [0u8; 8];
    unit.memory().read(Hpa(20 * MIB + 0x123), &mut buf).expect("read");
    assert_eq!(buf, [0; 8], "nothing written inside");
    // A write straddling the region's start writes up to it, then stops (as a bus does
    // for a DMA that faults mid-way).
    let at = 16 * MIB - 4;
    assert_eq!(unit.dma_write(SID, Iova(at), &[0xee; 8]), protected(16 * MIB));
    unit.memory().read(Hpa(at), &mut buf).expect("read");
    assert_eq!(buf, [0xee, 0xee, 0xee, 0xee, 0, 0, 0, 0]);
    // Translated requests are blocked too while translation is disabled.
    assert_eq!(unit.translated_read(SID, Hpa(17 * MIB), &mut buf), protected(17 * MIB));
    assert_eq!(unit.translated_write(SID, Hpa(32 * MIB - 4), &[1; 8]), protected(32 * MIB - 4));
    unit.translated_write(SID, Hpa(32 * MIB), &[1; 8]).expect("outside");
    assert_no_fault(&unit);
    let stats = unit.stats();
    assert_eq!(stats.protected_memory_blocked, 23);
    assert_eq!(stats.faults_recorded + stats.faults_suppressed + stats.faults_overflowed, 0);
}

#[test]
fn interrupt_requests_are_not_memory_accesses() {
    let unit = unit(MEMORY);
    // A low region over the interrupt address range (firmware should not, but may).
    protect(&unit, (0xfe00_0000, 0xffe0_0000), (1, 0));
    unit.dma_write(SID, Iova(0xfee0_0000), &0x41u32.to_le_bytes()).expect("an MSI is an interrupt");
}

#[test]
fn linux_enables_translation_then_clears_epm_and_remapped_dma_works_throughout() {
    let unit = unit(MEMORY);
    let config = DriverConfig::for_memory(MEMORY);
    let (tables, tables_len) = config.table_region;
    // Firmware protects low memory and the region the OS will build its tables in.
    protect(&unit, LOW, (tables.0, tables.0 + tables_len - 1));
    // The unit's own reads of its tables are not checked (VT-d 10.4.16): the driver takes
    // the unit over with its tables inside the protected region.
    let driver = Driver::new(unit.clone(), config).expect("driver");
    assert!(unit.translation_enabled());
    let did = driver.create_domain(DomainKind::Paging, AddressWidth::Aw48).expect("domain");
    driver.attach(SID, did, false).expect("attach");
    let iova = Iova(0x10_0000);
    driver.map(did, iova, Hpa(20 * MIB), 0x2000, Perm::RW).expect("map into the low region");
    // Remapped DMA is not checked against the regions, even while EPM is still set.
    assert_ne!(pmen(&unit) & pmen::PRS, 0);
    unit.dma_write(SID, iova, &[7; 16]).expect("remapped write");
    let mut buf = [0u8; 16];
    unit.dma_read(SID, iova, &mut buf).expect("remapped read");
    assert_eq!(buf, [7; 16]);
    unprotect(&unit);
    assert_eq!(pmen(&unit), 0);
    unit.dma_read(SID, Iova(iova.0 + 0x1000), &mut buf).expect("still works");
    assert_no_fault(&unit);
    assert_eq!(unit.stats().protected_memory_blocked, 0);
}

#[test]
fn with_translation_enabled_pass_through_dma_into_a_region_is_blocked() {
    let unit = unit(MEMORY);
    protect(&unit, LOW, HIGH);
    let driver = Driver::new(unit.clone(), DriverConfig::for_memory(MEMORY)).expect("driver");
    let identity = driver.create_domain(DomainKind::Identity, AddressWidth::Aw48).expect("identity");
    driver.attach(SID, identity, false).expect("attach");
    assert_eq!(read(&unit, SID, 17 * MIB), protected(17 * MIB));
    assert_eq!(write(&unit, SID, 6 * GIB + MIB), protected(6 * GIB + MIB));
    write(&unit, SID, 33 * MIB).expect("outside");
    assert_no_fault(&unit);
    // Once the OS clears EPM, pass-through reaches everything.
    unprotect(&unit);
    read(&unit, SID, 17 * MIB).expect("unprotected");
}

#[test]
fn a_raw_pass_through_context_is_checked_and_a_paging_context_is_not() {
    let mut rig = Rig::new();
    let remapped = SourceId::new(0, 5, 0);
    rig.attach(SID, 1, TranslationType::PassThrough, AddressWidth::Aw48);
    let top = rig.attach(remapped, 2, TranslationType::Untranslated, AddressWidth::Aw48);
    rig.map(top, AddressWidth::Aw48, Iova(0x4000), Hpa(17 * MIB), 1, true, true);
    protect(&rig.unit, LOW, (1, 0));
    assert_eq!(read(&rig.unit, SID, 17 * MIB), protected(17 * MIB));
    read(&rig.unit, remapped, 0x4000).expect("remapped into the region: not checked");
    assert_no_fault(&rig.unit);
}

#[test]
fn translated_requests_into_a_region_are_blocked_but_translation_requests_are_not() {
    let mut rig = Rig::new();
    let top = rig.attach(SID, 3, TranslationType::DeviceTlb, AddressWidth::Aw48);
    rig.map(top, AddressWidth::Aw48, Iova(0x8000), Hpa(18 * MIB), 1, true, true);
    rig.map(top, AddressWidth::Aw48, Iova(0x9000), Hpa(40 * MIB), 1, true, true);
    protect(&rig.unit, LOW, (1, 0));
    // The translation request is answered: it returns a translation, it accesses nothing.
    let AtsCompletion::Success(entry) = rig.unit.ats_translate(SID, Iova(0x8000), false) else {
        panic!("translation request refused");
    };
    assert_eq!(entry.translated, Hpa(18 * MIB));
    assert!(entry.read && entry.write);
    // The translated request using it is blocked, all or nothing.
    let mut buf = [0u8; 8];
    assert_eq!(rig.unit.translated_read(SID, entry.translated, &mut buf), protected(18 * MIB));
    assert_eq!(rig.unit.translated_write(SID, entry.translated, &[9; 8]), protected(18 * MIB));
    rig.mem.read(entry.translated, &mut buf).expect("read");
    assert_eq!(buf, [0; 8], "nothing written");
    rig.unit.translated_write(SID, Hpa(40 * MIB), &[9; 8]).expect("outside");
    assert_no_fault(&rig.unit);
    assert_eq!(rig.unit.stats().translated_blocked, 2);
}

#[test]
fn registers_implement_2_mib_granularity_below_the_host_address_width() {
    let unit = unit(MEMORY);
    // VT-d 10.4.17: software finds N by writing all ones and reading back.
    for (reg, width) in [(regs::PLMBASE, 32), (regs::PLMLIMIT, 32), (regs::PHMBASE, 64), (regs::PHMLIMIT, 64)] {
        let back = if width == 32 {
            unit.write32(reg, u32::MAX).expect("write");
            u64::from(unit.read32(reg).expect("read"))
        } else {
            unit.write64(reg, u64::MAX).expect("write");
            unit.read64(reg).expect("read")
        };
        assert_eq!(back.trailing_zeros(), 21, "{reg:#x}: bits 20:0 reserved, so N = 20");
        let top = if width == 32 { 32 } else { dmar_vtd::unit::tables::HOST_ADDRESS_WIDTH };
        assert_eq!(back, ((1u128 << top) - (1 << 21)) as u64, "{reg:#x}: implemented bits");
    }
    assert_eq!(unit.read64(regs::PLMBASE).expect("pair"), 0xffe0_0000_ffe0_0000, "PLMBASE | PLMLIMIT << 32");
    // The two halves of a 64-bit register written separately.
    unit.write32(regs::PHMBASE, 0x1234_5678).expect("low half");
    unit.write32(regs::PHMBASE + 4, 0x1).expect("high half");
    assert_eq!(unit.read64(regs::PHMBASE).expect("phmbase"), 0x1_1220_0000);
    // PMEN: only EPM is writable; the reserved bits and PRS ignore writes.
    unit.write32(regs::PMEN, !pmen::EPM).expect("pmen");
    assert_eq!(pmen(&unit), 0);
    assert_eq!(unit.read64(regs::PMEN & !7).expect("slot"), 0, "0x60 is reserved");
}

#[test]
fn prs_follows_epm_and_bases_stay_put_while_it_is_set() {
    let unit = unit(MEMORY);
    assert_eq!(pmen(&unit), 0);
    unit.write32(regs::PMEN, pmen::EPM).expect("set");
    assert_eq!(pmen(&unit), pmen::EPM | pmen::PRS);
    assert_eq!(unit.read64(regs::PMEN & !7).expect("slot") >> 32, u64::from(pmen::EPM | pmen::PRS));
    // All bases and limits 0: each region is the first 2 MiB.
    assert_eq!(read(&unit, SID, 0x1000), protected(0x1000));
    read(&unit, SID, 2 * MIB).expect("above the first 2 MiB");
    // Software must not change a region while PRS is set; the unit keeps the one it has.
    unit.write32(regs::PLMBASE, 0x40_0000).expect("ignored");
    unit.write64(regs::PHMLIMIT, 0x40_0000).expect("ignored");
    assert_eq!(unit.read32(regs::PLMBASE).expect("plmbase"), 0);
    assert_eq!(unit.read64(regs::PHMLIMIT).expect("phmlimit"), 0);
    unit.write32(regs::PMEN, 0).expect("clear");
    assert_eq!(pmen(&unit), 0);
    read(&unit, SID, 0x1000).expect("off");
    unit.write32(regs::PLMBASE, 0x40_0000).expect("now taken");
    assert_eq!(unit.read32(regs::PLMBASE).expect("plmbase"), 0x40_0000);
}

#[test]
fn reset_returns_the_registers_to_zero_and_stops_enforcing() {
    let unit = unit(MEMORY);
    protect(&unit, LOW, HIGH);
    assert_eq!(read(&unit, SID, 17 * MIB), protected(17 * MIB));
    unit.reset();
    for reg in [regs::PLMBASE, regs::PHMBASE, regs::PHMLIMIT] {
        assert_eq!(unit.read64(reg).expect("read"), 0, "{reg:#x}");
    }
    assert_eq!(pmen(&unit), 0);
    read(&unit, SID, 17 * MIB).expect("no longer protected");
}

// ---- the region test against a reference model ----

/// Addresses the property draws from: the first 24 MiB, so regions and accesses meet.
const SPACE: u64 = 24 * MIB;

/// The reference: VT-d 10.4.17-10.4.20 read literally. A register keeps bits 31:21 (low)
/// or 45:21 (high); a base decodes its low bits as 0s, a limit as 1s; a limit below the
/// base disables the region.
fn reference_regions(plm: (u32, u32), phm: (u64, u64)) -> Vec<(u64, u64)> {
    let low_mask = 0xffe0_0000u64;
    let high_mask = ((1u64 << 46) - 1) & !(2 * MIB - 1);
    let mut v = Vec::new();
    for (base, limit) in
        [(u64::from(plm.0) & low_mask, u64::from(plm.1) & low_mask), (phm.0 & high_mask, phm.1 & high_mask)]
    {
        if limit >= base {
            v.push((base, limit + 2 * MIB - 1));
        }
    }
    v
}

/// The first protected byte of `[addr, addr + len)`, if any.
fn first_protected(regions: &[(u64, u64)], addr: u64, len: u64) -> Option<u64> {
    let last = addr + len - 1;
    regions.iter().filter(|&&(first, end)| addr <= end && last >= first).map(|&(first, _)| first.max(addr)).min()
}

fn register_value() -> impl Strategy<Value = u64> {
    // Mostly inside the space, with noise in the reserved bits; sometimes anything.
    let near =
        (0..SPACE / (2 * MIB), any::<u32>()).prop_map(|(b, noise)| (b * 2 * MIB) | (u64::from(noise) & (2 * MIB - 1)));
    prop_oneof![4 => near, 1 => any::<u64>()]
}

#[derive(Clone, Debug)]
struct Access {
    addr: u64,
    len: usize,
    write: bool,
    translated: bool,
}

fn access() -> impl Strategy<Value = Access> {
    (0..SPACE, 1..3 * 4096usize, any::<bool>(), any::<bool>()).prop_map(|(addr, len, write, translated)| Access {
        addr,
        len,
        write,
        translated,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn the_region_test_matches_the_reference(
        plm in (register_value(), register_value()),
        phm in (register_value(), register_value()),
        epm in any::<bool>(),
        accesses in proptest::collection::vec(access(), 1..12),
    ) {
        let unit = unit(32 * MIB);
        let plm = (plm.0 as u32, plm.1 as u32);
        unit.write32(regs::PLMBASE, plm.0).expect("plmbase");
        unit.write32(regs::PLMLIMIT, plm.1).expect("plmlimit");
        unit.write64(regs::PHMBASE, phm.0).expect("phmbase");
        unit.write64(regs::PHMLIMIT, phm.1).expect("phmlimit");
        if epm {
            unit.write32(regs::PMEN, pmen::EPM).expect("epm");
        }
        let regions = if epm { reference_regions(plm, phm) } else { Vec::new() };
        for (i, a) in accesses.iter().enumerate() {
            let len = a.len as u64;
            let hit = first_protected(&regions, a.addr, len);
            let data: Vec<u8> = (0..a.len).map(|k| (k as u8) ^ (i as u8 + 1)).collect();
            let mut before = vec![0u8; a.len];
            unit.memory().read(Hpa(a.addr), &mut before).expect("before");
            let got = match (a.write, a.translated) {
                (true, false) => unit.dma_write(SID, Iova(a.addr), &data),
                (true, true) => unit.translated_write(SID, Hpa(a.addr), &data),
                (false, false) => unit.dma_read(SID, Iova(a.addr), &mut vec![0; a.len]),
                (false, true) => unit.translated_read(SID, Hpa(a.addr), &mut vec![0; a.len]),
            };
            // Untranslated DMA stops at the first protected byte (region starts are page
            // aligned, so that is where its page starts); a translated request is all or
            // nothing and reports its own address.
            let want = match hit {
                None => Ok(()),
                Some(_) if a.translated => Err(DmaError::ProtectedMemory { addr: a.addr }),
                Some(p) => Err(DmaError::ProtectedMemory { addr: p }),
            };
            prop_assert_eq!(got, want, "{:?} against {:x?}", a, regions);
            if a.write {
                let written = match hit {
                    None => a.len,
                    Some(_) if a.translated => 0,
                    Some(p) => (p - a.addr) as usize,
                };
                let mut after = vec![0u8; a.len];
                unit.memory().read(Hpa(a.addr), &mut after).expect("after");
                prop_assert_eq!(&after[..written], &data[..written], "written part");
                prop_assert_eq!(&after[written..], &before[written..], "untouched part");
            }
        }
        prop_assert_eq!(unit.fault_records(), vec![]);
    }
}
