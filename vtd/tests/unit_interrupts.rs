//! Interrupt remapping through the unit's registers and request path: IRTA/SIRTP/IRE, MSI
//! writes remapped and delivered to subscribers, IR faults recorded in the fault
//! recording registers with the interrupt index, and the interrupt entry cache kept
//! coherent by queued invalidation. The remapping rules themselves (every IR fault
//! reason, every SVT mode) are tested in `unit::interrupt`.

mod common;

use std::sync::Arc;

use common::Rig;
use dmar_vtd::unit::interrupt::IecInvalidation;
use dmar_vtd::unit::interrupt::{
    ApicMode, Irta, Irte, Remapped, SourceQualifier, SourceValidation, msi_compatibility, msi_remappable,
};
use dmar_vtd::unit::invalidation::descriptor::encode;
use dmar_vtd::unit::regs::{self, gcmd};
use dmar_vtd::unit::{DmaError, FaultReason, UnitConfig, UnitEvents};
use dmar_vtd::{Hpa, Iova, SourceId};
use parking_lot::Mutex;

const SID: SourceId = SourceId::new(3, 0, 1);

#[derive(Debug, Default)]
struct Delivered(Mutex<Vec<(SourceId, Remapped)>>);
impl UnitEvents for Delivered {
    fn interrupt_remapped(&self, sid: SourceId, interrupt: &Remapped) {
        self.0.lock().push((sid, *interrupt));
    }
}

/// A unit with a 256-entry interrupt remapping table, remapping enabled.
fn rig(events: Arc<Delivered>) -> (Rig, Hpa) {
    let mut rig = Rig::with_events(UnitConfig::default(), events);
    let table = rig.alloc();
    // 256 entries x 16 bytes = one page; S = 7 gives 2^(7+1) entries.
    rig.unit.write64(regs::IRTA, Irta::new(table, 7, ApicMode::XApic).to_bits()).expect("irta");
    rig.unit.write32(regs::GCMD, gcmd::TE | gcmd::SIRTP).expect("sirtp");
    rig.unit.write32(regs::GCMD, gcmd::TE | gcmd::IRE).expect("ire");
    let gsts = rig.unit.read32(regs::GSTS).expect("gsts");
    assert_ne!(gsts & gcmd::SIRTP, 0, "IRTPS");
    assert_ne!(gsts & gcmd::IRE, 0, "IRES");
    (rig, table)
}

fn set_irte(rig: &Rig, table: Hpa, index: u64, e: Irte) {
    rig.mem.write_u64(Hpa(table.0 + index * 16), e.lo).expect("irte");
    rig.mem.write_u64(Hpa(table.0 + index * 16 + 8), e.hi).expect("irte");
}

#[test]
fn msi_writes_are_remapped_and_delivered() {
    let events = Arc::new(Delivered::default());
    let (rig, table) = rig(events.clone());
    let sv = SourceValidation::Requester { sid: SID, qualifier: SourceQualifier::Exact };
    set_irte(&rig, table, 5, Irte::remapped(0x31, 2, ApicMode::XApic).with_source_validation(sv));
    let (addr, data) = msi_remappable(5, false);
    let r = rig.unit.msi_write(SID, addr, data).expect("remapped");
    assert_eq!((r.vector, r.destination, r.index), (0x31, 2, Some(5)));
    // The same through an untranslated DWORD write (the DMA path).
    rig.unit.dma_write(SID, Iova(addr), &data.to_le_bytes()).expect("dma msi");
    assert_eq!(events.0.lock().len(), 2);
    assert!(events.0.lock().iter().all(|(sid, i)| *sid == SID && i.vector == 0x31));
}

#[test]
fn ir_faults_are_recorded_with_the_interrupt_index() {
    let (rig, table) = rig(Arc::new(Delivered::default()));
    // 0x22: entry 9 not present.
    let (addr, data) = msi_remappable(9, false);
    assert_eq!(rig.unit.msi_write(SID, addr, data).map_err(|f| f.reason), Err(FaultReason::IrEntryNotPresent));
    // 0x26: source-id verification fails.
    let sv = SourceValidation::Requester { sid: SourceId::new(4, 0, 0), qualifier: SourceQualifier::Exact };
    set_irte(&rig, table, 10, Irte::remapped(0x40, 1, ApicMode::XApic).with_source_validation(sv));
    let (addr, data) = msi_remappable(10, false);
    assert_eq!(rig.unit.msi_write(SID, addr, data).map_err(|f| f.reason), Err(FaultReason::IrSourceId));
    // 0x21: index beyond the 256-entry table, through the DMA path.
    let (addr, data) = msi_remappable(300, false);
    assert_eq!(
        rig.unit.dma_write(SID, Iova(addr), &data.to_le_bytes()),
        Err(DmaError::Fault { addr, reason: FaultReason::IrIndexOverflow })
    );
    // 0x25: compatibility format while CFI is clear.
    let (addr, data) = msi_compatibility(
        1,
        0x20,
        dmar_vtd::unit::interrupt::DeliveryMode::Fixed,
        dmar_vtd::unit::interrupt::Trigger::Edge,
        dmar_vtd::unit::interrupt::DestinationMode::Physical,
    );
    assert_eq!(rig.unit.msi_write(SID, addr, data).map_err(|f| f.reason), Err(FaultReason::IrCompatBlocked));

    let records = rig.unit.fault_records();
    let got: Vec<(FaultReason, u64)> = records.iter().map(|r| (r.reason, r.addr >> 48)).collect();
    assert_eq!(
        got,
        vec![
            (FaultReason::IrEntryNotPresent, 9),
            (FaultReason::IrSourceId, 10),
            (FaultReason::IrIndexOverflow, 300),
            (FaultReason::IrCompatBlocked, 0),
        ]
    );
    // FRCD: FI carries the index in bits 63:48.
    assert_eq!(rig.unit.read64(regs::FRCD_BASE).expect("frcd") >> 48, 9);
}

#[test]
fn interrupt_entry_cache_is_invalidated_by_queued_invalidation() {
    let (mut rig, table) = rig(Arc::new(Delivered::default()));
    rig.enable_queue();
    set_irte(&rig, table, 1, Irte::remapped(0x50, 1, ApicMode::XApic));
    let (addr, data) = msi_remappable(1, false);
    assert_eq!(rig.unit.msi_write(SID, addr, data).map(|r| r.vector), Ok(0x50));
    // Software changes the entry: the cached one is used until invalidated.
    set_irte(&rig, table, 1, Irte::remapped(0x51, 1, ApicMode::XApic));
    assert_eq!(rig.unit.msi_write(SID, addr, data).map(|r| r.vector), Ok(0x50));
    rig.submit(&[encode::iec(IecInvalidation::Index { index: 1, index_mask: 0 })]);
    assert_eq!(rig.unit.msi_write(SID, addr, data).map(|r| r.vector), Ok(0x51));
}

#[test]
fn a_multi_vector_block_is_remapped_by_subhandle_and_invalidated_at_once() {
    let (mut rig, table) = rig(Arc::new(Delivered::default()));
    rig.enable_queue();
    // Software sizes blocks by ECAP.MHMV (Linux `alloc_irte` refuses a mask above it).
    let ecap = rig.unit.read64(regs::ECAP).expect("ecap");
    let mhmv = (ecap >> regs::ecap::MHMV_SHIFT) & regs::ecap::MHMV_MASK;
    assert!(mhmv >= 3, "ECAP.MHMV {mhmv}: an 8-vector block must be allowed");
    // An 8-vector MSI: IRTEs 16..=23, the device programmed with handle 16 and SHV, and
    // one entry outside the block.
    for i in 16..=24u64 {
        set_irte(&rig, table, i, Irte::remapped(0x40 + i as u8, 1, ApicMode::XApic));
    }
    let (addr, data) = msi_remappable(16, true);
    let raise = |sub: u32| rig.unit.msi_write(SID, addr, data | sub).map(|r| (r.vector, r.index));
    // VT-d 5.1.3: with SHV the interrupt index is handle + subhandle.
    for s in 0..8u32 {
        assert_eq!(raise(s), Ok((0x50 + s as u8, Some(16 + s as u16))), "subhandle {s}");
    }
    assert_eq!(raise(8).map(|(_, i)| i), Ok(Some(24)));
    // Software retargets every vector of the block: the cached entries are served until
    // one invalidation with IM = 3 drops all eight, and only them.
    for i in 16..=24u64 {
        set_irte(&rig, table, i, Irte::remapped(0xa0 + i as u8, 2, ApicMode::XApic));
    }
    assert_eq!(raise(5).map(|(v, _)| v), Ok(0x55), "stale until invalidated");
    rig.submit(&[encode::iec(IecInvalidation::Index { index: 19, index_mask: 3 })]);
    for s in 0..8u32 {
        assert_eq!(raise(s), Ok((0xb0 + s as u8, Some(16 + s as u16))), "subhandle {s}");
    }
    assert_eq!(raise(8).map(|(v, _)| v), Ok(0x58), "entry 24 is outside the block: still cached");
}
