//! The acceptance test of client-driven units: a driver written only against raw RPCs
//! (ReadRegister, WriteRegister, ReadMemory, WriteMemory, with the unit's lease) takes a
//! remapping unit from its VT-d reset state to DMA remapping, fault reporting, interrupt
//! remapping and invalidation-completion events, while the built-in driver keeps serving
//! the Control API's domains, maps and translations on another unit of the same server.
//!
//! The platform ([`platform`]) has two units and no INCLUDE_PCI_ALL unit:
//! - unit 0, built-in, remaps the bridge 00:1c.0 and buses 0x01..=0x0f (device 01:00.0);
//! - unit 1, client-driven, remaps the bridge 00:1d.0 and buses 0x10..=0x1f (device
//!   10:00.0), with 64 MiB of host memory of its own for its tables and queues.
//!
//! Bus 0x40 is in no unit's scope. A second platform, with an INCLUDE_PCI_ALL unit, is
//! checked by [`an_include_all_unit_takes_every_device_no_other_unit_lists`].
//!
//! The driver itself (register map, entry and descriptor encoders, [`raw::RawUnit`]) is in
//! `raw/`, written from the VT-d specification rather than from dmar's own codecs.

mod raw;

use std::time::Duration;

use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::*;
use dmar_server::service::ServerConfig;
use dmar_test_support::{Link, Server, attach, config, create_domain, function, map};
use dmar_vtd::ids::{Hpa, SourceId};
use dmar_vtd::platform::{
    self as spec, AtsRootPorts, DEFAULT_REGISTER_BASE, PlatformSpec, Region, UnitScope, UnitSpec,
};
use dmar_vtd::unit::UnitConfig;
use tonic::Code;
use tonic::transport::Channel;

use raw::{
    Frames, PMR_GRANULE, RawUnit, cap, context_entry, desc, ecap, ectl, frcd, fsts, gcmd, irte, next, pmen, reason,
    refused, reg, remappable_msi_address, root_entry, ss_entry, ss_index, within,
};

/// Host memory: 1 GiB.
const MEMORY: u64 = 1 << 30;
/// The built-in driver's tables: the top 128 MiB.
const BUILTIN_REGION: (u64, u64) = (MEMORY - (128 << 20), 128 << 20);
/// Unit 1's region: 64 MiB below the built-in one.
const CLIENT_REGION: (u64, u64) = (0x3000_0000, 64 << 20);

/// The built-in unit.
const BUILTIN_UNIT: u32 = 0;
/// The client-driven unit.
const CLIENT_UNIT: u32 = 1;
/// 00:1c.0, the bridge of unit 0's scope.
const BUILTIN_BRIDGE: SourceId = SourceId::new(0x00, 0x1c, 0);
/// 00:1d.0, the bridge of unit 1's scope.
const CLIENT_BRIDGE: SourceId = SourceId::new(0x00, 0x1d, 0);
/// 01:00.0, behind unit 0.
const BUILTIN_DEV: SourceId = SourceId::new(0x01, 0x00, 0);
/// 10:00.0, behind unit 1.
const CLIENT_DEV: SourceId = SourceId::new(0x10, 0x00, 0);
/// 40:00.0, behind no unit.
const UNCOVERED_DEV: SourceId = SourceId::new(0x40, 0x00, 0);

/// The IOVA unit 1's driver maps for 10:00.0 ...
const IOVA: u64 = 0x4000_0000;
/// ... to this page of ordinary memory (in no driver's region).
const DATA_PAGE: u64 = 0x1000_0000;
/// An IOVA nothing maps (its level-2 entry is not present).
const UNMAPPED_IOVA: u64 = 0x5000_0000;
/// The domain id unit 1's driver gives 10:00.0.
const CLIENT_DID: u16 = 1;
/// Context entry AW = 2: a 48-bit address width, 4-level tables (VT-d 9.3).
const AW_48: u64 = 2;
/// The invalidate queue depth `function` binds (and the driver tells the unit).
const QUEUE_DEPTH: u8 = 8;

/// The IOVA the built-in driver maps for 01:00.0, and the page it maps it to.
const BUILTIN_IOVA: u64 = 0x10_0000;
const BUILTIN_HPA: u64 = 0x2000_0000;

/// The interrupt messages unit 1's driver programs (VT-d 5.1.8: address 0xFEE0_0000 with
/// the destination APIC id 0, and a vector in the data).
const MSI_ADDRESS: u32 = 0xfee0_0000;
const FAULT_DATA: u32 = 0x41;
const INVALIDATION_DATA: u32 = 0x42;
/// The interrupt remapping table entry unit 1's driver writes for 10:00.0, and what it says.
const IRTE_INDEX: u16 = 5;
const VECTOR: u8 = 0x31;
const DESTINATION: u8 = 0x2;

fn sid(s: SourceId) -> u32 {
    u32::from(s.0)
}

fn region((base, size): (u64, u64)) -> Region {
    Region { base: Hpa(base), size }
}

fn unit_config() -> UnitConfig {
    UnitConfig::default().with_device_tlb_timeout(Duration::from_secs(5))
}

/// The two-unit platform of this file.
fn platform() -> PlatformSpec {
    PlatformSpec {
        segment: 0,
        memory_size: MEMORY,
        units: vec![
            UnitSpec {
                name: "dmar0".into(),
                register_base: DEFAULT_REGISTER_BASE,
                scope: UnitScope::Devices(vec![spec::ScopeEntry::Bridge {
                    bridge: BUILTIN_BRIDGE,
                    buses: 0x01..=0x0f,
                }]),
                config: unit_config(),
                driver: spec::UnitDriver::BuiltIn,
            },
            UnitSpec {
                name: "dmar1".into(),
                register_base: DEFAULT_REGISTER_BASE + 0x1000,
                scope: UnitScope::Devices(vec![spec::ScopeEntry::Bridge { bridge: CLIENT_BRIDGE, buses: 0x10..=0x1f }]),
                config: unit_config(),
                driver: spec::UnitDriver::Client { region: region(CLIENT_REGION) },
            },
        ],
        builtin_region: region(BUILTIN_REGION),
        reserved: Vec::new(),
        ats_root_ports: Some(AtsRootPorts::All),
        satc: Vec::new(),
    }
}

async fn boot(spec: PlatformSpec) -> Server {
    Server::boot(ServerConfig { platform: Some(spec), ..config(Duration::from_secs(5)) }).await
}

async fn get_platform(c: &mut ControlClient<Channel>) -> Platform {
    within("GetPlatform", c.get_platform(GetPlatformRequest {})).await.expect("platform").into_inner()
}

fn bridge_entry(bridge: SourceId, secondary: u32, subordinate: u32) -> ScopeEntry {
    ScopeEntry { source_id: sid(bridge), bridge: true, secondary_bus: secondary, subordinate_bus: subordinate }
}

// ---------------------------------------------------------------------------------------
// The DMAR table, parsed by hand (VT-d 8.1, 8.3, 8.3.1)
// ---------------------------------------------------------------------------------------

/// A DRHD structure (VT-d 8.3).
#[derive(Debug)]
struct Drhd {
    flags: u8,
    segment: u16,
    register_base: u64,
    scope: Vec<DeviceScope>,
}

/// A device scope entry (VT-d 8.3.1): its type (1 endpoint, 2 sub-hierarchy), the bus its
/// path starts on, and the path's (device, function) pairs.
#[derive(Debug, PartialEq, Eq)]
struct DeviceScope {
    kind: u8,
    start_bus: u8,
    path: Vec<(u8, u8)>,
}

/// DRHD flag INCLUDE_PCI_ALL (VT-d 8.3).
const INCLUDE_PCI_ALL: u8 = 1;

fn bytes<const N: usize>(t: &[u8], at: usize) -> [u8; N] {
    t.get(at..at + N).unwrap_or_else(|| panic!("{N} bytes at {at} are past the table's end")).try_into().expect("N")
}

/// The DRHD structures of a DMAR table, after checking its header: the 36-byte ACPI header
/// (signature, length, checksum), then HAW, flags and 10 reserved bytes, then structures of
/// (type u16, length u16, ...).
fn parse_dmar(t: &[u8]) -> Vec<Drhd> {
    assert!(t.len() >= 48, "a DMAR table has a 48-byte header; got {} bytes", t.len());
    assert_eq!(&t[0..4], b"DMAR", "signature");
    assert_eq!(u32::from_le_bytes(bytes(t, 4)) as usize, t.len(), "the header's length is the table's");
    let sum = t.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    assert_eq!(sum, 0, "the bytes of an ACPI table sum to 0 mod 256");
    let haw = t[36];
    assert!((38..64).contains(&(u32::from(haw) + 1)), "host address width {} bits", u32::from(haw) + 1);
    let mut drhds = Vec::new();
    let mut at = 48;
    while at < t.len() {
        let kind = u16::from_le_bytes(bytes(t, at));
        let len = usize::from(u16::from_le_bytes(bytes(t, at + 2)));
        assert!(len >= 4 && at + len <= t.len(), "structure at {at} of length {len} fits the table");
        let s = &t[at..at + len];
        if kind == 0 {
            assert!(len >= 16, "a DRHD is at least 16 bytes");
            let mut scope = Vec::new();
            let mut e = 16;
            while e < len {
                let entry_len = usize::from(s[e + 1]);
                assert!(entry_len >= 6 && (entry_len - 6) % 2 == 0 && e + entry_len <= len, "scope entry at {e}");
                let path = s[e + 6..e + entry_len].chunks(2).map(|p| (p[0], p[1])).collect();
                scope.push(DeviceScope { kind: s[e], start_bus: s[e + 5], path });
                e += entry_len;
            }
            drhds.push(Drhd {
                flags: s[4],
                segment: u16::from_le_bytes(bytes(s, 6)),
                register_base: u64::from_le_bytes(bytes(s, 8)),
                scope,
            });
        }
        at += len;
    }
    drhds
}

async fn dmar_table(c: &mut ControlClient<Channel>) -> Vec<u8> {
    let r = ReadAcpiTableRequest { signature: "DMAR".into() };
    within("ReadAcpiTable", c.read_acpi_table(r)).await.expect("DMAR").into_inner().data
}

// ---------------------------------------------------------------------------------------
// The steps
// ---------------------------------------------------------------------------------------

/// Step 1: GetPlatform and the DMAR table describe the two units.
async fn the_platform_is_described(c: &mut ControlClient<Channel>) {
    let p = get_platform(c).await;
    assert_eq!(p.memory_size, MEMORY);
    assert_eq!(p.builtin_region, Some(MemoryRegion { base: BUILTIN_REGION.0, size: BUILTIN_REGION.1 }));
    assert_eq!(p.units.len(), 2, "{p:?}");
    let (u0, u1) = (&p.units[0], &p.units[1]);
    assert_eq!((u0.unit, u0.name.as_str(), u0.register_base), (0, "dmar0", DEFAULT_REGISTER_BASE));
    assert_eq!(u0.driver, UnitDriver::BuiltIn as i32);
    assert!(!u0.include_all && u0.region.is_none() && !u0.claimed, "{u0:?}");
    assert_eq!(u0.scope, vec![bridge_entry(BUILTIN_BRIDGE, 0x01, 0x0f)]);
    assert_eq!((u1.unit, u1.name.as_str(), u1.register_base), (1, "dmar1", DEFAULT_REGISTER_BASE + 0x1000));
    assert_eq!(u1.driver, UnitDriver::Client as i32);
    assert_eq!(u1.region, Some(MemoryRegion { base: CLIENT_REGION.0, size: CLIENT_REGION.1 }));
    assert!(!u1.include_all && !u1.claimed, "{u1:?}");
    assert_eq!(u1.scope, vec![bridge_entry(CLIENT_BRIDGE, 0x10, 0x1f)]);

    let drhds = parse_dmar(&dmar_table(c).await);
    assert_eq!(drhds.len(), 2, "one DRHD per unit: {drhds:?}");
    for (d, u) in drhds.iter().zip(&p.units) {
        assert_eq!((d.register_base, d.segment), (u.register_base, 0), "DRHD of unit {}", u.unit);
        assert_eq!(d.flags & INCLUDE_PCI_ALL, 0, "no unit is INCLUDE_PCI_ALL");
    }
    // A sub-hierarchy entry (type 2) names the bridge by its path from its bus; its
    // secondary buses are the bridge's own configuration, not the table's.
    let bridge = |b: SourceId| vec![DeviceScope { kind: 2, start_bus: b.bus(), path: vec![(b.dev(), b.func())] }];
    assert_eq!(drhds[0].scope, bridge(BUILTIN_BRIDGE));
    assert_eq!(drhds[1].scope, bridge(CLIENT_BRIDGE));
}

/// Step 2: the client-driven unit sits at its reset values, and nobody writes it or its
/// region without its lease. Returns the whole fresh register window.
async fn the_unclaimed_unit_is_at_reset_and_guarded(c: &mut ControlClient<Channel>) -> Vec<u32> {
    let fresh = raw::read_window(c, CLIENT_UNIT).await;
    let dword = |offset: u64| fresh[(offset / 4) as usize];
    let qword = |offset: u64| u64::from(dword(offset)) | (u64::from(dword(offset + 4)) << 32);
    assert_ne!(dword(reg::VER), 0, "VER");
    assert_eq!(dword(reg::GSTS), 0, "GSTS: nothing enabled at reset");
    let (cap, ecap) = (qword(reg::CAP), qword(reg::ECAP));
    assert_ne!(cap, 0, "CAP");
    assert_ne!(cap & cap::SAGAW_48, 0, "CAP.SAGAW offers 4-level tables: {cap:#x}");
    assert_ne!(ecap & ecap::QI, 0, "ECAP.QI: {ecap:#x}");
    assert_ne!(ecap & ecap::IR, 0, "ECAP.IR: {ecap:#x}");
    assert_ne!(ecap & ecap::DT, 0, "ECAP.DT: {ecap:#x}");
    assert_eq!(qword(reg::RTADDR), 0, "RTADDR");
    assert_eq!(dword(reg::FSTS), 0, "FSTS");
    for (name, ctl) in [("FECTL", reg::FECTL), ("IECTL", reg::IECTL), ("PECTL", reg::PECTL)] {
        assert_eq!(dword(ctl), ectl::IM, "{name}: IM set at reset, nothing pending");
    }
    assert_eq!(dword(reg::ICS), 0, "ICS");
    // Handed over as firmware with pre-boot DMA protection hands a unit to an OS: the
    // protected low-memory region covers all of memory and is enforced (VT-d 10.4.16-18).
    assert_ne!(cap & cap::PLMR, 0, "CAP.PLMR: {cap:#x}");
    assert_eq!(dword(reg::PMEN), pmen::EPM | pmen::PRS, "PMEN: EPM set, PRS shows it");
    assert_eq!(dword(reg::PLMBASE), 0, "PLMBASE");
    assert!(
        u64::from(dword(reg::PLMLIMIT)) + PMR_GRANULE >= MEMORY,
        "PLMLIMIT {:#x} covers the 1 GiB of memory",
        dword(reg::PLMLIMIT)
    );

    let lease = String::new();
    let write = |unit: u32, lease: &str| WriteRegisterRequest {
        offset: reg::FEDATA,
        width: 4,
        value: 1,
        unit,
        lease: lease.into(),
    };
    let s = refused("WriteRegister without the lease", c.write_register(write(CLIENT_UNIT, &lease))).await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let s = refused("WriteRegister on the built-in unit", c.write_register(write(BUILTIN_UNIT, &lease))).await;
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    let r = ResetUnitRequest { unit: CLIENT_UNIT, lease: lease.clone() };
    let s = refused("ResetUnit without the lease", c.reset_unit(r)).await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    for (what, address) in [("unit 1's region", CLIENT_REGION.0), ("the built-in region", BUILTIN_REGION.0)] {
        let r = WriteMemoryRequest { address, data: vec![0xff; 8], lease: lease.clone() };
        let s = refused(what, c.write_memory(r)).await;
        assert_eq!(s.code(), Code::PermissionDenied, "WriteMemory into {what}: {s:?}");
    }
    let s = refused("ClaimUnit of the built-in unit", c.claim_unit(ClaimUnitRequest { unit: BUILTIN_UNIT })).await;
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert_eq!(raw::read_window(c, CLIENT_UNIT).await, fresh, "the refused writes changed nothing");
    fresh
}

/// Step 3: one holder at a time.
async fn the_unit_is_claimed(server: &Server, c: &mut ControlClient<Channel>) -> RawUnit {
    let mut u = RawUnit::claim(server.control().await, CLIENT_UNIT).await.expect("claim");
    let mut other = server.control().await;
    let s = refused("a second claim", other.claim_unit(ClaimUnitRequest { unit: CLIENT_UNIT })).await;
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    let forged = WriteRegisterRequest {
        offset: reg::FEDATA,
        width: 4,
        value: 1,
        unit: CLIENT_UNIT,
        lease: "0".repeat(u.lease.len()),
    };
    let s = refused("a write with a forged lease", other.write_register(forged)).await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(get_platform(c).await.units[1].claimed, "GetPlatform shows the claim");
    // The owner writes its region.
    u.write_qwords(CLIENT_REGION.0, &[0]).await;
    u
}

/// Before its driver is up, the unit's devices reach no memory: with translation off their
/// DMA addresses are host addresses, all inside firmware's protected region, and a blocked
/// access is not a remapping fault (VT-d 10.4.16: "not recorded or reported").
async fn firmware_protection_blocks_dma_until_the_driver_is_up(u: &mut RawUnit, link: &mut Link) {
    let write = DmaRequest {
        tag: 0,
        source_id: sid(CLIENT_DEV),
        translated: false,
        address: DATA_PAGE,
        write: true,
        length: 0,
        data: vec![0xbb; 16],
    };
    let d = within("DMA write under PMEN.EPM", link.dma(write)).await;
    assert!(!d.ok, "protected memory is out of a device's reach: {d:?}");
    assert_eq!(d.fault_reason, 0, "not a remapping fault: {d:?}");
    assert_eq!(u.read_mem(DATA_PAGE, 16).await, vec![0; 16], "the blocked write changed nothing");
    assert_eq!(u.read32(reg::FSTS).await, 0, "nothing recorded");
}

/// What unit 1's driver put where in its region.
#[derive(Debug)]
struct Layout {
    root: u64,
    context: u64,
}

/// Step 4: root, context and page tables; the root table pointer; the invalidation queue
/// with a global context-cache and IOTLB invalidation; translation enabled (the order of
/// Linux `init_dmars`: `iommu_set_root_entry`, `dmar_enable_qi`, the global flushes,
/// `iommu_enable_translation`).
async fn translation_is_programmed(u: &mut RawUnit, frames: &mut Frames) -> Layout {
    let root = frames.frame();
    let context = frames.frame();
    let tables = [frames.frame(), frames.frame(), frames.frame(), frames.frame()];
    // The leaf first, then up: no present entry ever points at a table not written yet.
    u.write_qwords(tables[3] + ss_index(IOVA, 1) * 8, &[ss_entry(DATA_PAGE, true, true)]).await;
    for level in 2..=4 {
        let table = tables[4 - level as usize];
        let below = tables[5 - level as usize];
        u.write_qwords(table + ss_index(IOVA, level) * 8, &[ss_entry(below, true, true)]).await;
    }
    let entry = context_entry(tables[0], CLIENT_DID, AW_48, true);
    u.write_qwords(context + u64::from(CLIENT_DEV.devfn()) * 16, &entry).await;
    u.write_qwords(root + u64::from(CLIENT_DEV.bus()) * 16, &root_entry(context)).await;

    u.write64(reg::RTADDR, root).await;
    assert_eq!(u.read64(reg::RTADDR).await, root, "RTADDR reads back");
    u.gcmd(gcmd::SRTP).await;

    let (queue, status) = (frames.frame(), frames.frame());
    u.enable_queue(queue, status).await;
    assert_eq!(u.read64(reg::IQA).await, queue, "IQA reads back (QS 0: 256 entries)");
    u.invalidate(&[desc::context_global(), desc::iotlb_global()]).await;
    assert_eq!(u.read64(reg::IQH).await, u.read64(reg::IQT).await, "the unit consumed every descriptor");

    u.gcmd(gcmd::TE).await;
    let gsts = u.read32(reg::GSTS).await;
    assert_eq!(gsts & (gcmd::TE | gcmd::QIE), gcmd::TE | gcmd::QIE, "TES and QIES both held: {gsts:#x}");
    // Remapping is up: firmware's protection can go (Linux, after `iommu_enable_translation`).
    u.disable_protected_memory().await;
    assert_eq!(u.read32(reg::PMEN).await, 0, "PMEN: EPM and PRS clear");
    Layout { root, context }
}

async fn translate(c: &mut ControlClient<Channel>, dev: SourceId, iova: u64, access: AccessKind) -> TranslateResponse {
    let r = TranslateRequest { source_id: sid(dev), iova, access: access as i32 };
    within("Translate", c.translate(r)).await.unwrap_or_else(|s| panic!("translate for {dev}: {s}")).into_inner()
}

/// Step 9, first half: the built-in unit serves the Control API while unit 1 is a client's,
/// and Control routes each requester id to its own unit.
async fn the_builtin_unit_serves_control(c: &mut ControlClient<Channel>) {
    let did = within("CreateDomain", create_domain(c, DomainKind::Paging)).await;
    within("Attach", attach(c, did, sid(BUILTIN_DEV), false)).await;
    within("Map", map(c, did, BUILTIN_IOVA, BUILTIN_HPA, 0x1000, true)).await;
    builtin_translates(c).await;
    // The built-in driver maps nothing into the client's region: its tables are its owner's.
    let into_client = MapRange {
        iova: BUILTIN_IOVA + 0x1000,
        hpa: CLIENT_REGION.0,
        length: 0x1000,
        permissions: Some(Permissions { read: true, write: true }),
    };
    let s =
        refused("a map into unit 1's region", c.map(MapRequest { domain_id: did, ranges: vec![into_client] })).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");

    let t = translate(c, CLIENT_DEV, IOVA + 0x10, AccessKind::Read).await;
    assert!(t.ok, "10:00.0 translates through its client's tables: {t:?}");
    assert_eq!((t.hpa, t.page_shift, t.unit), (DATA_PAGE + 0x10, 12, CLIENT_UNIT));

    let r = AttachRequest { source_id: sid(CLIENT_DEV), domain_id: did, ..Default::default() };
    let s = refused("attach of 10:00.0", c.attach(r)).await;
    assert_eq!(s.code(), Code::FailedPrecondition, "10:00.0's unit is client-driven: {s:?}");
    let r = TranslateRequest { source_id: sid(UNCOVERED_DEV), iova: IOVA, access: AccessKind::Read as i32 };
    let s = refused("translate for 40:00.0", c.translate(r)).await;
    assert_eq!(s.code(), Code::FailedPrecondition, "no unit covers bus 0x40: {s:?}");
}

/// 01:00.0 translates through the built-in unit.
async fn builtin_translates(c: &mut ControlClient<Channel>) {
    let t = translate(c, BUILTIN_DEV, BUILTIN_IOVA + 0x234, AccessKind::Write).await;
    assert!(t.ok, "01:00.0 translates through the built-in driver's domain: {t:?}");
    assert_eq!((t.hpa, t.unit), (BUILTIN_HPA + 0x234, BUILTIN_UNIT));
}

/// Step 5: the function behind unit 1 translates over ATS (context TT=01b), its device TLB
/// is invalidated through the raw queue, and its DMA lands where the client's tables say.
async fn the_device_uses_the_client_tables(u: &mut RawUnit, link: &mut Link) -> Vec<u8> {
    let done = within("translation request", link.translate(sid(CLIENT_DEV), IOVA)).await;
    assert_eq!(done.status, CompletionStatus::Success as i32, "{done:?}");
    let e = done.entry.expect("an entry");
    assert_eq!((e.translated_address, e.size_shift, e.read, e.write), (DATA_PAGE, 12, true, true), "{e:?}");
    assert!(!e.untranslated_only, "{e:?}");

    // A device-TLB invalidation: the wait behind it completes only once the function has
    // answered (VT-d 6.5.2.8: a wait completes after every earlier descriptor).
    let status = u.next_status();
    u.submit(&[desc::device_tlb_page(CLIENT_DEV.0, QUEUE_DEPTH, IOVA), desc::wait(Some(status), false)]).await;
    let inv = within("invalidation request", link.invalidation()).await;
    assert_eq!((inv.source_id, inv.address), (sid(CLIENT_DEV), IOVA), "one page, S = 0: {inv:?}");
    assert_ne!(u.read_mem32(status.0).await, status.1, "the wait waits for the device");
    let completion = InvalidationCompletion { source_id: inv.source_id, itag: inv.itag };
    link.send(LinkUp { invalidation_completions: vec![completion], ..Default::default() }).await;
    u.wait_status(status).await;

    let payload = b"written by 10:00.0 through unit 1".to_vec();
    let write = DmaRequest {
        tag: 1,
        source_id: sid(CLIENT_DEV),
        translated: false,
        address: IOVA + 0x10,
        write: true,
        length: 0,
        data: payload.clone(),
    };
    let d = within("DMA write", link.dma(write)).await;
    assert!(d.ok, "{d:?}");
    assert_eq!(u.read_mem(DATA_PAGE + 0x10, payload.len() as u32).await, payload, "the DMA landed at the HPA");
    let read = DmaRequest {
        tag: 2,
        source_id: sid(CLIENT_DEV),
        address: IOVA + 0x10,
        length: payload.len() as u32,
        ..Default::default()
    };
    let d = within("DMA read", link.dma(read)).await;
    assert!(d.ok && d.data == payload, "{d:?}");
    payload
}

/// An untranslated DMA of 10:00.0 at `address`, which the unit must refuse with `reason`.
async fn faulting_dma(link: &mut Link, address: u64, write: bool, reason: u8) {
    let r = DmaRequest {
        tag: address,
        source_id: sid(CLIENT_DEV),
        translated: false,
        address,
        write,
        length: if write { 0 } else { 8 },
        data: if write { vec![0xee; 8] } else { Vec::new() },
    };
    let d = within("faulting DMA", link.dma(r)).await;
    assert!(!d.ok, "a DMA at {address:#x} must fault: {d:?}");
    assert_eq!(d.fault_reason, u32::from(reason), "{d:?}");
}

/// Services the pending primary fault as Linux `dmar_fault` does: FSTS.FRI names the
/// record (at CAP.FRO × 16 + 16 × FRI), F is cleared with a write of 1, and PFO too; then
/// FSTS shows nothing pending. Checks the record against the DMA that faulted.
async fn service_fault(u: &mut RawUnit, page: u64, write: bool, expected: u8) {
    let status = u.read32(reg::FSTS).await;
    assert_ne!(status & fsts::PPF, 0, "FSTS.PPF: a fault is pending ({status:#x})");
    let cap = u.read64(reg::CAP).await;
    let index = fsts::fault_record_index(status);
    assert!(index < cap::fault_records(cap), "FRI {index} names a fault recording register");
    let at = cap::fault_records_offset(cap) + 16 * index;
    let (lo, hi) = (u.read64(at).await, u.read64(at + 8).await);
    assert_ne!(hi & frcd::F, 0, "FRCD {index}.F ({hi:#x})");
    assert_eq!(lo & !0xfff, page, "FRCD.FI: the faulting page");
    assert_eq!(frcd::sid(hi), CLIENT_DEV.0, "FRCD.SID");
    assert_eq!(frcd::reason(hi), expected, "FRCD.FR");
    assert_eq!(hi & frcd::T == 0, write, "FRCD.T: 0 for a write, 1 for a read");
    u.write32(at + frcd::F_DWORD, frcd::F_IN_DWORD).await;
    assert_eq!(u.read64(at + 8).await & frcd::F, 0, "F is write-1-to-clear");
    if status & fsts::PFO != 0 {
        u.write32(reg::FSTS, fsts::PFO).await;
    }
    let status = u.read32(reg::FSTS).await;
    assert_eq!(status & (fsts::PPF | fsts::PFO), 0, "nothing pending once F is clear ({status:#x})");
}

/// Steps 5 and 6, the faults: with the fault event programmed and unmasked, a DMA to an
/// unmapped IOVA faults, and the unit records it and sends the fault event; once software
/// has serviced it, the next fault sends the event again (VT-d 7.3: no event while PPF is
/// set). Faults of a client-driven unit also reach WatchFaults.
async fn unmapped_iovas_fault_and_send_the_fault_event(
    u: &mut RawUnit,
    link: &mut Link,
    unit_irqs: &mut tonic::Streaming<UnitInterrupt>,
    c: &mut ControlClient<Channel>,
) {
    u.write32(reg::FEDATA, FAULT_DATA).await;
    u.write32(reg::FEADDR, MSI_ADDRESS).await;
    u.write32(reg::FEUADDR, 0).await;
    let mut faults = within("WatchFaults", c.watch_faults(WatchRequest {})).await.expect("watch").into_inner();
    u.write32(reg::FECTL, 0).await;
    assert_eq!(u.read32(reg::FECTL).await, 0, "unmasked, nothing pending");

    for (page, write, expected) in
        [(UNMAPPED_IOVA, true, reason::NO_WRITE), (UNMAPPED_IOVA + 0x1000, false, reason::NO_READ)]
    {
        faulting_dma(link, page, write, expected).await;
        let m = next(unit_irqs, "the fault event").await;
        assert_eq!(m.source, UnitEventSource::Fault as i32, "{m:?}");
        assert_eq!((m.unit, m.address, m.data), (CLIENT_UNIT, u64::from(MSI_ADDRESS), FAULT_DATA), "{m:?}");
        let f = next(&mut faults, "the fault record on WatchFaults").await;
        assert_eq!(
            (f.unit, f.source_id, f.reason, f.address, f.write),
            (CLIENT_UNIT, sid(CLIENT_DEV), u32::from(expected), page, write),
            "{f:?}"
        );
        service_fault(u, page, write, expected).await;
        assert_eq!(u.read32(reg::FECTL).await, 0, "the event was sent: IP clear");
    }
}

/// Step 7: interrupt remapping. The table (256 entries: IRTA.S = 7, xAPIC: EIME = 0), its
/// pointer latched, the interrupt entry cache flushed, remapping enabled (Linux
/// `iommu_set_irq_remapping`, `iommu_enable_irq_remapping`); then an entry for 10:00.0 with
/// source-id verification, flushed by index (`modify_irte`, `qi_flush_iec`).
async fn an_msi_is_remapped(u: &mut RawUnit, frames: &mut Frames, link: &mut Link, c: &mut ControlClient<Channel>) {
    let table = frames.frame();
    u.write64(reg::IRTA, table | 7).await;
    u.gcmd(gcmd::SIRTP).await;
    u.invalidate(&[desc::iec_global()]).await;
    u.gcmd(gcmd::IRE).await;
    let gsts = u.read32(reg::GSTS).await;
    let held = gcmd::TE | gcmd::QIE | gcmd::IRE;
    assert_eq!(gsts & held, held, "enabling IRE kept TE and QIE: {gsts:#x}");

    u.write_qwords(table + u64::from(IRTE_INDEX) * 16, &irte(VECTOR, DESTINATION, Some(CLIENT_DEV.0))).await;
    u.invalidate(&[desc::iec_entry(IRTE_INDEX)]).await;

    let mut irqs = within("WatchInterrupts", c.watch_interrupts(WatchRequest {})).await.expect("watch").into_inner();
    // The same entry two ways (VT-d 5.1.2.2): handle 5; handle 4 with subhandle 1 (SHV).
    for (handle, shv, data) in [(IRTE_INDEX, false, 0), (IRTE_INDEX - 1, true, 1)] {
        let msi = MsiWrite { source_id: sid(CLIENT_DEV), address: remappable_msi_address(handle, shv), data };
        link.send(LinkUp { msi: vec![msi], ..Default::default() }).await;
        let e = next(&mut irqs, "the remapped interrupt").await;
        assert_eq!(
            (e.unit, e.source_id, e.index),
            (CLIENT_UNIT, sid(CLIENT_DEV), Some(u32::from(IRTE_INDEX))),
            "{e:?}"
        );
        assert_eq!((e.vector, e.destination), (u32::from(VECTOR), u32::from(DESTINATION)), "{e:?}");
        assert_eq!((e.delivery_mode, e.level, e.logical), (0, false, false), "fixed, edge, physical: {e:?}");
    }
}

/// Step 8: an invalidation wait with IF sets ICS.IWC and sends the invalidation completion
/// event (VT-d 6.5.2.8, 10.4.24, 10.4.25).
async fn a_wait_with_if_sends_the_completion_event(u: &mut RawUnit, unit_irqs: &mut tonic::Streaming<UnitInterrupt>) {
    u.write32(reg::IEDATA, INVALIDATION_DATA).await;
    u.write32(reg::IEADDR, MSI_ADDRESS).await;
    u.write32(reg::IEUADDR, 0).await;
    u.write32(reg::IECTL, 0).await;
    assert_eq!(u.read32(reg::ICS).await, 0, "no IF wait has completed yet");
    u.submit(&[desc::wait(None, true)]).await;
    let m = next(unit_irqs, "the invalidation completion event").await;
    assert_eq!(m.source, UnitEventSource::InvalidationCompletion as i32, "{m:?}");
    assert_eq!((m.unit, m.address, m.data), (CLIENT_UNIT, u64::from(MSI_ADDRESS), INVALIDATION_DATA), "{m:?}");
    assert_eq!(u.read32(reg::ICS).await, raw::ICS_IWC, "ICS.IWC");
    u.write32(reg::ICS, raw::ICS_IWC).await;
    assert_eq!(u.read32(reg::ICS).await, 0, "IWC is write-1-to-clear");
}

/// Step 10: ResetUnit returns every register to its reset value and leaves memory alone;
/// ReleaseUnit zeroes the region; the unit is free for the next claim.
async fn reset_and_release(
    server: &Server,
    c: &mut ControlClient<Channel>,
    mut u: RawUnit,
    fresh: &[u32],
    frames: &Frames,
    layout: &Layout,
    payload: &[u8],
) {
    let r = ResetUnitRequest { unit: CLIENT_UNIT, lease: u.lease.clone() };
    within("ResetUnit", u.control().reset_unit(r)).await.expect("reset");
    // A hardware reset: every register at its reset value, which is what the unit was
    // handed over with, except firmware's protected memory regions: PMEN, PLMBASE,
    // PLMLIMIT, PHMBASE and PHMLIMIT reset to 0 (VT-d 10.4.16-10.4.20).
    let protected_memory = reg::PMEN..reg::PHMLIMIT + 8;
    let hardware_reset: Vec<u32> = fresh
        .iter()
        .enumerate()
        .map(|(i, v)| if protected_memory.contains(&(i as u64 * 4)) { 0 } else { *v })
        .collect();
    assert_eq!(differences(&hardware_reset, &u.window().await), "", "registers ResetUnit did not reset");
    let root = u.read_mem(layout.root + u64::from(CLIENT_DEV.bus()) * 16, 8).await;
    assert_eq!(root, raw::le(&[layout.context | 1]), "ResetUnit leaves memory alone");

    u.release().await;
    for &frame in &frames.taken {
        let page = within("ReadMemory", c.read_memory(ReadMemoryRequest { address: frame, length: 0x1000 }))
            .await
            .expect("read")
            .into_inner()
            .data;
        assert!(page.iter().all(|b| *b == 0), "frame {frame:#x} of the region is zeroed on release");
    }
    let r = ReadMemoryRequest { address: DATA_PAGE + 0x10, length: payload.len() as u32 };
    let data = within("ReadMemory", c.read_memory(r)).await.expect("read").into_inner().data;
    assert_eq!(data, payload, "memory outside the region keeps what the device wrote");
    assert!(!get_platform(c).await.units[1].claimed, "GetPlatform shows the release");

    // The next owner gets the unit as the first one did: reset, memory protected.
    let mut again = RawUnit::claim(server.control().await, CLIENT_UNIT).await.expect("a new claim after release");
    assert_eq!(differences(fresh, &again.window().await), "", "the unit after a release is not as handed over");
    again.release().await;
}

/// The registers (32-bit, by offset) where `now` differs from `expected`, one a line.
fn differences(expected: &[u32], now: &[u32]) -> String {
    expected
        .iter()
        .zip(now)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| format!("{:#05x}: expected {a:#010x}, read {b:#010x}\n", i * 4))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_driver_programs_a_client_unit_from_reset_beside_the_builtin_driver() {
    let server = boot(platform()).await;
    let mut c = server.control().await;

    // Steps 1-3: discovery, the unit as handed over, the lease.
    the_platform_is_described(&mut c).await;
    let fresh = the_unclaimed_unit_is_at_reset_and_guarded(&mut c).await;
    let mut u = the_unit_is_claimed(&server, &mut c).await;
    let mut link =
        within("bind", Link::open(server.addr, "raw-driver", vec![function(sid(CLIENT_DEV))])).await.expect("bound");
    firmware_protection_blocks_dma_until_the_driver_is_up(&mut u, &mut link).await;

    // Step 4: DMA remapping, programmed by hand.
    let mut frames = Frames::new(CLIENT_REGION.0, CLIENT_REGION.1);
    let layout = translation_is_programmed(&mut u, &mut frames).await;
    // Step 9, meanwhile: the built-in unit serves Control.
    the_builtin_unit_serves_control(&mut c).await;

    // Steps 5 and 6: the device's DMA and ATS through the client's tables; its faults.
    let payload = the_device_uses_the_client_tables(&mut u, &mut link).await;
    let req = WatchUnitInterruptsRequest { unit: CLIENT_UNIT };
    let mut unit_irqs = within("WatchUnitInterrupts", c.watch_unit_interrupts(req)).await.expect("watch").into_inner();
    unmapped_iovas_fault_and_send_the_fault_event(&mut u, &mut link, &mut unit_irqs, &mut c).await;
    // Step 7: interrupt remapping; the built-in unit still translates.
    an_msi_is_remapped(&mut u, &mut frames, &mut link, &mut c).await;
    builtin_translates(&mut c).await;
    // Step 8: the invalidation completion event.
    a_wait_with_if_sends_the_completion_event(&mut u, &mut unit_irqs).await;

    // Step 10: reset, release, the next claim.
    reset_and_release(&server, &mut c, u, &fresh, &frames, &layout, &payload).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_claim_stream_releases_the_unit() {
    let server = boot(platform()).await;
    let mut c = server.control().await;
    let mut u = RawUnit::claim(server.control().await, CLIENT_UNIT).await.expect("claim");
    u.write32(reg::FEDATA, FAULT_DATA).await;
    u.write_qwords(CLIENT_REGION.0, &[0x1234]).await;
    let lease = u.lease.clone();
    drop(u);

    let deadline = tokio::time::Instant::now() + raw::WAIT;
    let mut again = loop {
        match RawUnit::claim(server.control().await, CLIENT_UNIT).await {
            Ok(u) => break u,
            Err(s) => {
                assert_eq!(s.code(), Code::FailedPrecondition, "only the old claim may stand in the way: {s:?}");
                assert!(tokio::time::Instant::now() < deadline, "the dropped claim was never released");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    assert_ne!(again.lease, lease, "a new claim has a new lease");
    let stale = WriteRegisterRequest { offset: reg::FEDATA, width: 4, value: 1, unit: CLIENT_UNIT, lease };
    let s = refused("a write with the dropped lease", c.write_register(stale)).await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert_eq!(again.read32(reg::FEDATA).await, 0, "the release reset the unit");
    assert_eq!(again.read_mem(CLIENT_REGION.0, 8).await, vec![0; 8], "the release zeroed the region");
    again.release().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_include_all_unit_takes_every_device_no_other_unit_lists() {
    // INCLUDE_PCI_ALL comes last (VT-d 8.3); here it is the built-in unit.
    let mut include_all = platform();
    include_all.units.swap(0, 1);
    include_all.units[0].register_base = DEFAULT_REGISTER_BASE;
    include_all.units[1].register_base = DEFAULT_REGISTER_BASE + 0x1000;
    include_all.units[1].scope = UnitScope::All;
    let server = boot(include_all).await;
    let mut c = server.control().await;

    let p = get_platform(&mut c).await;
    assert_eq!(p.units.len(), 2, "{p:?}");
    assert!(p.units[1].include_all && p.units[1].scope.is_empty(), "{:?}", p.units[1]);
    assert_eq!(p.units[1].driver, UnitDriver::BuiltIn as i32);
    let drhds = parse_dmar(&dmar_table(&mut c).await);
    assert_eq!(drhds.iter().map(|d| d.flags & INCLUDE_PCI_ALL).collect::<Vec<_>>(), vec![0, INCLUDE_PCI_ALL]);
    assert!(drhds[1].scope.is_empty(), "{drhds:?}");

    // 40:00.0 and 01:00.0, listed nowhere, fall to the INCLUDE_PCI_ALL unit; 10:00.0 stays
    // with the client-driven unit that lists it.
    let did = within("CreateDomain", create_domain(&mut c, DomainKind::Paging)).await;
    within("Attach", attach(&mut c, did, sid(UNCOVERED_DEV), false)).await;
    within("Map", map(&mut c, did, BUILTIN_IOVA, BUILTIN_HPA, 0x1000, true)).await;
    let t = translate(&mut c, UNCOVERED_DEV, BUILTIN_IOVA, AccessKind::Read).await;
    assert!(t.ok && t.hpa == BUILTIN_HPA && t.unit == 1, "{t:?}");
    assert_eq!(translate(&mut c, BUILTIN_DEV, BUILTIN_IOVA, AccessKind::Read).await.unit, 1);
    assert_eq!(translate(&mut c, CLIENT_DEV, IOVA, AccessKind::Read).await.unit, 0);
    let r = AttachRequest { source_id: sid(CLIENT_DEV), domain_id: did, ..Default::default() };
    let s = refused("attach of 10:00.0", c.attach(r)).await;
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    server.stop().await;
}

/// VT-d 10.4.10 (FECTL.IP): a fault event held by the mask is cleared, without a message,
/// when software services every pending fault status field (clears F in each recorded
/// FRCD, so FSTS.PPF reads clear); unmasking afterwards sends nothing. The driver here is
/// the least one that faults: an empty root table and translation enabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masked_fault_event_is_withdrawn_once_software_services_the_fault() {
    let server = boot(platform()).await;
    let mut c = server.control().await;
    let mut u = RawUnit::claim(server.control().await, CLIENT_UNIT).await.expect("claim");
    let mut frames = Frames::new(CLIENT_REGION.0, CLIENT_REGION.1);
    u.write64(reg::RTADDR, frames.frame()).await;
    u.gcmd(gcmd::SRTP).await;
    u.gcmd(gcmd::TE).await;
    let mut link =
        within("bind", Link::open(server.addr, "raw-driver", vec![function(sid(CLIENT_DEV))])).await.expect("bound");
    let req = WatchUnitInterruptsRequest { unit: CLIENT_UNIT };
    let mut unit_irqs = within("WatchUnitInterrupts", c.watch_unit_interrupts(req)).await.expect("watch").into_inner();

    faulting_dma(&mut link, IOVA, true, reason::ROOT_ENTRY_NOT_PRESENT).await;
    assert_eq!(u.read32(reg::FECTL).await, ectl::IM | ectl::IP, "the masked fault event is held");
    service_fault(&mut u, IOVA, true, reason::ROOT_ENTRY_NOT_PRESENT).await;
    assert_eq!(u.read32(reg::FECTL).await, ectl::IM, "servicing the fault withdrew the held event (IP clear)");
    u.write32(reg::FEADDR, MSI_ADDRESS).await;
    u.write32(reg::FEDATA, FAULT_DATA).await;
    u.write32(reg::FECTL, 0).await;
    let late = tokio::time::timeout(Duration::from_millis(300), unit_irqs.message()).await;
    assert!(late.is_err(), "no fault event for a fault already serviced: {late:?}");
    u.release().await;
    server.stop().await;
}
