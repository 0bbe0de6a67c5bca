//! Tests of the driver's calls against a real unit: configuration, domain lifecycle,
//! attach, map and unmap.

use std::time::Duration;

use super::*;
use crate::ids::{Hpa, Iova, PAGE_SIZE, SourceId};
use crate::unit::tables::AddressWidth;
use crate::unit::{Blocked, Direction, FaultReason, UnitConfig};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const SID: SourceId = SourceId::new(2, 3, 1);

fn driver_with(memory: u64, config: DriverConfig) -> Driver {
    let unit = Arc::new(Unit::new(UnitConfig::default(), Arc::new(HostMemory::new(memory).unwrap())));
    Driver::new(unit, config).unwrap()
}

fn driver() -> Driver {
    driver_with(4 * GIB, DriverConfig::for_memory(4 * GIB))
}

fn blocked(reason: FaultReason) -> Result<Hpa, Blocked> {
    Err(Blocked { reason: Some(reason) })
}

fn translate(d: &Driver, sid: SourceId, iova: u64, access: Direction) -> Result<Hpa, Blocked> {
    d.unit().translate(sid, Iova(iova), access).map(|t| t.hpa)
}

#[test]
fn driver_is_send_and_sync() {
    crate::testing::assert_send_sync::<Driver>();
}

#[test]
fn table_region_is_the_capped_top_eighth() {
    assert_eq!(DriverConfig::for_memory(64 * MIB).table_region, (Hpa(56 * MIB), 8 * MIB));
    assert_eq!(DriverConfig::for_memory(8 * GIB).table_region, (Hpa(8 * GIB - 256 * MIB), 256 * MIB));
    let (base, len) = DriverConfig::for_memory(2 * MIB + 4096 * 3).table_region;
    assert!(base.is_page_aligned() && len.is_multiple_of(PAGE_SIZE) && base.0 + len <= 2 * MIB + 4096 * 3);
    // too small to hold a table: refused, not a panic
    let unit = Arc::new(Unit::new(UnitConfig::default(), Arc::new(HostMemory::new(2 * MIB).unwrap())));
    let cfg = DriverConfig { table_region: (Hpa(0), 0), ..DriverConfig::for_memory(2 * MIB) };
    assert!(matches!(Driver::new(unit, cfg), Err(DriverError::InvalidTableRegion { .. })));
}

#[test]
fn config_defaults_to_strict_queued_invalidation() {
    let cfg = DriverConfig::for_memory(64 * MIB);
    assert_eq!((cfg.flush, cfg.queued_invalidation), (FlushPolicy::Strict, true));
    let lazy = cfg.with_flush(FlushPolicy::DEFERRED).with_queued_invalidation(false);
    assert_eq!(lazy.flush, FlushPolicy::Deferred { max_entries: 256, max_delay: Duration::from_millis(10) });
    assert!(!lazy.queued_invalidation);
    let d = driver_with(64 * MIB, cfg);
    assert!(d.queued_invalidation());
    assert_eq!(d.flush_policy(), FlushPolicy::Strict);
    assert!(!d.deferred_due() && d.pending_deferred() == 0);
    assert!(!driver_with(64 * MIB, lazy).queued_invalidation());
}

#[test]
fn init_enables_translation_with_an_empty_root_table() {
    let d = driver();
    assert!(d.unit().translation_enabled());
    assert_eq!(d.table_frames_in_use(), 1);
    assert_eq!(translate(&d, SID, 0, Direction::Read), blocked(FaultReason::RootEntryNotPresent));
}

#[test]
fn domain_ids_are_reused_and_destroy_waits_for_detach() {
    let d = driver();
    let a = d.create_domain(DomainKind::Paging, AddressWidth::Aw48).unwrap();
    let b = d.create_domain(DomainKind::Identity, AddressWidth::Aw48).unwrap();
    assert_eq!((a, b), (DomainId(1), DomainId(2)));
    d.attach(SID, a, false).unwrap();
    assert_eq!(d.attached(a), vec![SID]);
    assert_eq!(d.destroy_domain(a), Err(DriverError::DomainInUse { did: a, devices: 1 }));
    d.map(a, Iova(0), Hpa(0), 4 * MIB + 4096, Perm::RW).unwrap();
    assert_eq!(d.detach(SID), Ok(Some(a)));
    assert_eq!(d.detach(SID), Ok(None));
    d.destroy_domain(a).unwrap();
    assert_eq!(d.destroy_domain(a), Err(DriverError::UnknownDomain(a)));
    assert_eq!(d.map(a, Iova(0), Hpa(0), 4096, Perm::RW), Err(DriverError::UnknownDomain(a)));
    // root + the bus's context table are all that is left
    assert_eq!(d.table_frames_in_use(), 2);
    assert_eq!(d.create_domain(DomainKind::Blocked, AddressWidth::Aw39), Ok(a));
    assert_eq!(d.domains(), vec![a, b]);
    assert_eq!(d.domain_info(b), Some((DomainKind::Identity, AddressWidth::Aw48)));
}

#[test]
fn attach_writes_the_context_entry_each_kind_needs() {
    let d = driver();
    let paging = d.create_domain(DomainKind::Paging, AddressWidth::Aw39).unwrap();
    let identity = d.create_domain(DomainKind::Identity, AddressWidth::Aw48).unwrap();
    let block = d.create_domain(DomainKind::Blocked, AddressWidth::Aw48).unwrap();
    d.map(paging, Iova(0x10_0000), Hpa(0x20_0000), 4096, Perm::READ).unwrap();

    d.attach(SID, paging, true).unwrap();
    assert_eq!(translate(&d, SID, 0x10_0123, Direction::Read), Ok(Hpa(0x20_0123)));
    assert_eq!(translate(&d, SID, 0x10_0123, Direction::Write), blocked(FaultReason::NoWrite));
    // re-attach elsewhere: the old translation must not survive in any cache
    d.attach(SID, identity, false).unwrap();
    assert_eq!(d.attached(paging), vec![]);
    assert_eq!(translate(&d, SID, 0x10_0123, Direction::Read), Ok(Hpa(0x10_0123)));
    d.attach(SID, block, false).unwrap();
    assert_eq!(translate(&d, SID, 0x10_0123, Direction::Read), blocked(FaultReason::ContextEntryNotPresent));
    d.attach(SID, paging, false).unwrap();
    assert_eq!(translate(&d, SID, 0x10_0123, Direction::Read), Ok(Hpa(0x20_0123)));
    d.detach(SID).unwrap();
    assert_eq!(translate(&d, SID, 0x10_0123, Direction::Read), blocked(FaultReason::ContextEntryNotPresent));
    // another function on the same bus still has no entry
    let other = SourceId::new(2, 3, 2);
    assert_eq!(translate(&d, other, 0, Direction::Read), blocked(FaultReason::ContextEntryNotPresent));
    assert_eq!(d.attach(SID, DomainId(77), false), Err(DriverError::UnknownDomain(DomainId(77))));
    assert_eq!(d.lookup(identity, Iova(0x1234)), Some((Hpa(0x1234), Perm::RW, PAGE_SIZE)));
    assert_eq!(d.lookup(block, Iova(0x1234)), None);
}

#[test]
fn map_refuses_bad_requests_without_writing() {
    let d = driver();
    let did = d.create_domain(DomainKind::Paging, AddressWidth::Aw39).unwrap();
    let identity = d.create_domain(DomainKind::Identity, AddressWidth::Aw39).unwrap();
    let frames = d.table_frames_in_use();
    assert_eq!(d.map(identity, Iova(0), Hpa(0), 4096, Perm::RW), Err(DriverError::NotPaging(identity)));
    assert_eq!(d.unmap(identity, Iova(0), 4096), Err(DriverError::NotPaging(identity)));
    assert_eq!(
        d.map(did, Iova(0), Hpa(0x1800), 4096, Perm::RW),
        Err(DriverError::Unaligned { field: AddressField::Hpa, value: 0x1800 })
    );
    assert_eq!(
        d.map(did, Iova(1 << 39), Hpa(0), 4096, Perm::RW),
        Err(DriverError::BeyondWidth { iova: Iova(1 << 39), width_bits: 39 })
    );
    assert_eq!(d.unmap(did, Iova(0), 0), Err(DriverError::ZeroLength));
    assert_eq!(d.unmap(did, Iova(u64::MAX - 4095), 8192), Err(DriverError::Overflow));
    assert!(matches!(
        d.map(did, Iova(0), Hpa(u64::MAX - 4095), 8192, Perm::RW),
        Err(DriverError::HpaOutOfRange { .. })
    ));
    assert_eq!(d.table_frames_in_use(), frames);
    // an overlap anywhere in the range refuses the whole request
    d.map(did, Iova(3 * MIB), Hpa(0), 4096, Perm::RW).unwrap();
    let frames = d.table_frames_in_use();
    assert_eq!(d.map(did, Iova(0), Hpa(0), 4 * MIB, Perm::RW), Err(DriverError::Overlap { iova: Iova(3 * MIB) }));
    assert_eq!(d.lookup(did, Iova(0)), None);
    assert_eq!(d.table_frames_in_use(), frames);
}

#[test]
fn running_out_of_table_memory_rolls_the_map_back() {
    // queue + status page + root + context + top + L2 + one L1: the second L1 table
    // cannot be allocated
    let region = (Hpa(60 * MIB), 7 * PAGE_SIZE);
    let d = driver_with(64 * MIB, DriverConfig { table_region: region, ..DriverConfig::for_memory(64 * MIB) });
    let did = d.create_domain(DomainKind::Paging, AddressWidth::Aw39).unwrap();
    d.attach(SID, did, false).unwrap();
    let frames = d.table_frames_in_use();
    assert_eq!(frames, 3);
    // 4 KiB pages straddling a 2 MiB boundary need two L1 tables
    let (iova, len) = (2 * MIB - 8 * 4096, 16 * 4096);
    assert_eq!(translate(&d, SID, iova, Direction::Read), blocked(FaultReason::NoRead));
    assert_eq!(d.map(did, Iova(iova), Hpa(4096), len, Perm::RW), Err(DriverError::OutOfTableMemory));
    assert_eq!(d.lookup(did, Iova(iova)), None);
    assert_eq!(translate(&d, SID, iova, Direction::Read), blocked(FaultReason::NoRead));
    assert_eq!(d.table_frames_in_use(), frames, "rollback freed the tables it allocated");
    // half of it fits
    d.map(did, Iova(iova), Hpa(4096), len / 2, Perm::RW).unwrap();
    assert_eq!(translate(&d, SID, iova, Direction::Write), Ok(Hpa(4096)));
}

#[test]
fn unmap_flushes_so_no_stale_translation_survives() {
    let d = driver();
    let did = d.create_domain(DomainKind::Paging, AddressWidth::Aw48).unwrap();
    d.attach(SID, did, true).unwrap();
    d.map(did, Iova(GIB), Hpa(GIB), GIB, Perm::RW).unwrap();
    d.map(did, Iova(4 * GIB), Hpa(0), 2 * MIB + 4096, Perm::RW).unwrap();
    for iova in [GIB + 5, 4 * GIB + 7, 4 * GIB + 2 * MIB] {
        assert!(translate(&d, SID, iova, Direction::Read).is_ok()); // now cached
    }
    assert_eq!(d.unmap(did, Iova(GIB + 2 * MIB), 4096), Err(DriverError::PartialSuperpage { iova: Iova(GIB) }));
    assert_eq!(d.unmap(did, Iova(0), 8 * GIB), Ok(GIB + 2 * MIB + 4096));
    for iova in [GIB + 5, 4 * GIB + 7, 4 * GIB + 2 * MIB] {
        assert_eq!(translate(&d, SID, iova, Direction::Read), blocked(FaultReason::NoRead));
    }
    assert_eq!(d.unit().stats().stale_iotlb_uses, 0);
}

#[test]
fn domains_map_in_parallel() {
    let d = Arc::new(driver());
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                let did = d.create_domain(DomainKind::Paging, AddressWidth::Aw48).unwrap();
                for i in 0..64 {
                    let iova = Iova(t * GIB + i * 2 * 4096);
                    d.map(did, iova, Hpa(i * 4096), 4096, Perm::RW).unwrap();
                    assert_eq!(d.unmap(did, iova, 8192), Ok(4096));
                }
                did
            })
        })
        .collect();
    for h in handles {
        let did = h.join().unwrap();
        d.destroy_domain(did).unwrap();
    }
    assert_eq!(d.table_frames_in_use(), 1);
}

#[test]
fn each_domain_counts_the_table_frames_it_holds() {
    let d = driver();
    let a = d.create_domain(DomainKind::Paging, AddressWidth::Aw48).unwrap();
    let b = d.create_domain(DomainKind::Paging, AddressWidth::Aw48).unwrap();
    let identity = d.create_domain(DomainKind::Identity, AddressWidth::Aw48).unwrap();
    let unit_frames = d.table_frames_in_use();
    assert_eq!((d.domain_frames(a), d.domain_frames(b), d.domain_frames(identity)), (Ok(1), Ok(1), Ok(0)));
    // one 4 KiB page: the top table plus a level-3, level-2 and level-1 table
    d.map(a, Iova(0), Hpa(0), 4096, Perm::RW).unwrap();
    assert_eq!(d.domain_frames(a), Ok(4));
    // its neighbour uses the same tables; a 2 MiB leaf needs no level-1 table
    d.map(a, Iova(4096), Hpa(4096), 4096, Perm::RW).unwrap();
    d.map(a, Iova(2 * MIB), Hpa(2 * MIB), 2 * MIB, Perm::RW).unwrap();
    assert_eq!(d.domain_frames(a), Ok(4));
    assert_eq!(d.domain_frames(b), Ok(1), "domains do not share frames");
    assert_eq!(d.table_frames_in_use(), unit_frames + 3);
    // an unmap that empties tables gives them back (strict: at once)
    assert_eq!(d.unmap(a, Iova(0), 2 * 4096), Ok(2 * 4096));
    assert_eq!(d.domain_frames(a), Ok(3), "the level-1 table went");
    assert_eq!(d.unmap(a, Iova(0), 4 * MIB), Ok(2 * MIB));
    assert_eq!(d.domain_frames(a), Ok(1));
    // deferred: the retired tables are held until the flush
    d.map(a, Iova(GIB), Hpa(0), 4096, Perm::RW).unwrap();
    assert_eq!(d.unmap_with(a, Iova(GIB), 4096, FlushPolicy::DEFERRED), Ok(4096));
    assert_eq!(d.domain_frames(a), Ok(4));
    d.flush_deferred().unwrap();
    assert_eq!(d.domain_frames(a), Ok(1));
    // destroying gives every frame back, retired ones included
    d.map(a, Iova(GIB), Hpa(0), 4096, Perm::RW).unwrap();
    d.map(a, Iova(2 * GIB), Hpa(0), 4096, Perm::RW).unwrap();
    assert_eq!(d.unmap_with(a, Iova(GIB), 4096, FlushPolicy::DEFERRED), Ok(4096));
    assert_eq!(d.domain_frames(a), Ok(6));
    d.destroy_domain(a).unwrap();
    assert_eq!(d.domain_frames(a), Err(DriverError::UnknownDomain(a)));
    assert_eq!(d.table_frames_in_use(), unit_frames - 1);
}

#[test]
fn a_map_past_its_frame_limit_writes_nothing() {
    let d = driver();
    let did = d.create_domain(DomainKind::Paging, AddressWidth::Aw48).unwrap();
    d.attach(SID, did, false).unwrap();
    d.map(did, Iova(0), Hpa(0), 4096, Perm::RW).unwrap();
    let (frames, unit_frames) = (d.domain_frames(did).unwrap(), d.table_frames_in_use());
    let flushes = d.unit().stats().iotlb_invalidations;
    // 4 KiB pages across a 1 GiB boundary: a level-2 and two level-1 tables
    let (iova, len) = (GIB - 4 * 4096, 8 * 4096);
    assert_eq!(
        d.map_within(did, Iova(iova), Hpa(MIB), len, Perm::RW, 2),
        Err(DriverError::FrameLimit { needed: 3, limit: 2 })
    );
    assert_eq!((d.domain_frames(did), d.table_frames_in_use()), (Ok(frames), unit_frames));
    for page in [iova, GIB - 4096, GIB, iova + len - 4096] {
        assert_eq!(d.lookup(did, Iova(page)), None);
        assert_eq!(translate(&d, SID, page, Direction::Read), blocked(FaultReason::NoRead));
    }
    assert_eq!(d.unit().stats().iotlb_invalidations, flushes, "no rollback flush was needed");
    // enough room: it maps, and says what it took
    assert_eq!(d.map_within(did, Iova(iova), Hpa(MIB), len, Perm::RW, 3), Ok(3));
    assert_eq!(d.domain_frames(did), Ok(frames + 3));
    assert_eq!(translate(&d, SID, GIB, Direction::Write), Ok(Hpa(MIB + 4 * 4096)));
    // a map into tables that exist needs nothing, so a limit of zero passes it
    assert_eq!(d.map_within(did, Iova(4096), Hpa(0), 4096, Perm::RW, 0), Ok(0));
    // an overlap is still an overlap, whatever the limit
    assert_eq!(d.map_within(did, Iova(0), Hpa(0), 4096, Perm::RW, 0), Err(DriverError::Overlap { iova: Iova(0) }));
}
