//! A server with several remapping units, through its Control API and real ATS links: the
//! routing of requester ids to units, a built-in-driver domain spanning two units, the
//! refusals that keep a client-driven unit's registers and memory its owner's, and the
//! per-unit statistics.
//!
//! The raw-driver workflow on a client-driven unit is `raw_driver.rs`.

use std::time::Duration;

use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::*;
use dmar_server::service::ServerConfig;
use dmar_test_support::{Link, Server, attach, function, map, paging_domain, strict_unmap};
use dmar_vtd::ids::{Hpa, SourceId};
use dmar_vtd::platform::{PlatformSpec, Region, ScopeEntry, UnitDriver, UnitScope, UnitSpec};
use dmar_vtd::unit::UnitConfig;
use tonic::Code;
use tonic::transport::Channel;

const MEMORY: u64 = 1 << 30;
/// The built-in driver's tables: the top 128 MiB.
const BUILTIN: Region = Region { base: Hpa(MEMORY - (128 << 20)), size: 128 << 20 };
/// Unit 2's owner region: 64 MiB below the built-in region.
const CLIENT: Region = Region { base: Hpa(MEMORY - (192 << 20)), size: 64 << 20 };

/// Behind unit 0 (bridge 00:1c.0, buses 0x01-0x0f).
const SID_A: u32 = 0x0100;
/// Behind unit 1 (bridge 00:1d.0, buses 0x10-0x1f).
const SID_B: u32 = 0x1000;
/// Behind unit 2 (client-driven, bridge 00:1e.0, buses 0x20-0x2f).
const SID_C: u32 = 0x2000;
/// No unit covers bus 0x40.
const SID_NONE: u32 = 0x4000;

fn unit(name: &str, bridge: SourceId, buses: std::ops::RangeInclusive<u8>, driver: UnitDriver, i: u64) -> UnitSpec {
    UnitSpec {
        name: name.to_owned(),
        register_base: 0xfed9_0000 + i * 0x1000,
        scope: UnitScope::Devices(vec![ScopeEntry::Bridge { bridge, buses }]),
        config: UnitConfig::default().with_device_tlb_timeout(Duration::from_millis(300)),
        driver,
    }
}

/// Two built-in units and one client-driven unit.
fn three_units() -> ServerConfig {
    let spec = PlatformSpec {
        segment: 0,
        memory_size: MEMORY,
        units: vec![
            unit("dmar0", SourceId::new(0, 0x1c, 0), 0x01..=0x0f, UnitDriver::BuiltIn, 0),
            unit("dmar1", SourceId::new(0, 0x1d, 0), 0x10..=0x1f, UnitDriver::BuiltIn, 1),
            unit("dmar2", SourceId::new(0, 0x1e, 0), 0x20..=0x2f, UnitDriver::Client { region: CLIENT }, 2),
        ],
        builtin_region: BUILTIN,
        reserved: Vec::new(),
        ats_root_ports: None,
        satc: Vec::new(),
    };
    ServerConfig { platform: Some(spec), ..ServerConfig::default() }
}

async fn translate(c: &mut ControlClient<Channel>, sid: u32, iova: u64) -> Result<TranslateResponse, tonic::Status> {
    c.translate(TranslateRequest { source_id: sid, iova, access: AccessKind::Read as i32 })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn requests_go_to_the_unit_whose_scope_holds_the_requester_id() {
    let server = Server::boot(three_units()).await;
    let mut c = server.control().await;
    let platform = c.get_platform(GetPlatformRequest {}).await.expect("platform").into_inner();
    assert_eq!(platform.units.len(), 3);
    assert_eq!(platform.units[2].driver, dmar_proto::v1::UnitDriver::Client as i32);
    let did = paging_domain(&mut c, &[SID_A]).await;
    attach(&mut c, did, SID_B, true).await;
    map(&mut c, did, 0x10_0000, 0x20_0000, 0x1000, true).await;
    let a = translate(&mut c, SID_A, 0x10_0000).await.expect("translate A");
    let b = translate(&mut c, SID_B, 0x10_0000).await.expect("translate B");
    assert!(a.ok && b.ok, "one domain serves both units: {a:?} {b:?}");
    assert_eq!((a.unit, b.unit, a.hpa, b.hpa), (0, 1, 0x20_0000, 0x20_0000));
    let none = translate(&mut c, SID_NONE, 0).await.expect_err("no unit covers bus 0x40");
    assert_eq!(none.code(), Code::FailedPrecondition, "{none:?}");
    let refused = Link::open(server.addr, "stray", vec![function(SID_NONE)]).await.expect_err("unrouted bind");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    // Unit 2 is client-driven: the built-in driver does not attach its devices.
    let attach_c = c
        .attach(AttachRequest { source_id: SID_C, domain_id: did, ..Default::default() })
        .await
        .expect_err("client-driven unit");
    assert_eq!(attach_c.code(), Code::FailedPrecondition, "{attach_c:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_strict_unmap_invalidates_the_device_tlbs_behind_every_unit_the_domain_spans() {
    let server = Server::boot(three_units()).await;
    let mut c = server.control().await;
    // Attached before their links are open, so the attach has no device TLB to empty.
    let did = paging_domain(&mut c, &[SID_A, SID_B]).await;
    let mut link_a = Link::open(server.addr, "a", vec![function(SID_A)]).await.expect("link A");
    let mut link_b = Link::open(server.addr, "b", vec![function(SID_B)]).await.expect("link B");
    map(&mut c, did, 0x40_0000, 0x80_0000, 0x1000, true).await;
    // Both functions cache the translation, each through its own unit.
    for (link, sid) in [(&mut link_a, SID_A), (&mut link_b, SID_B)] {
        let t = link.translate(sid, 0x40_0000).await;
        assert_eq!(t.status, CompletionStatus::Success as i32, "{t:?}");
    }
    let mut control = c.clone();
    let unmap = tokio::spawn(async move { strict_unmap(&mut control, did, 0x40_0000, 0x1000).await });
    // Each unit sends its device-TLB invalidation to its own function; the unmap returns
    // once both answered.
    for (link, sid) in [(&mut link_a, SID_A), (&mut link_b, SID_B)] {
        let inv = link.invalidation().await;
        assert_eq!(inv.source_id, sid);
        link.send(LinkUp {
            invalidation_completions: vec![InvalidationCompletion { source_id: sid, itag: inv.itag }],
            ..Default::default()
        })
        .await;
    }
    assert_eq!(unmap.await.expect("unmap task").unmapped_bytes, 0x1000);
    for sid in [SID_A, SID_B] {
        assert!(!translate(&mut c, sid, 0x40_0000).await.expect("translate").ok, "{sid:#x} still translates");
    }
    let stats = c.get_stats(GetStatsRequest {}).await.expect("stats").into_inner();
    assert_eq!(stats.units.len(), 3);
    let ats = |u: usize| stats.units[u].counters.get("ats_success").copied().unwrap_or(0);
    assert_eq!((ats(0), ats(1), ats(2)), (1, 1, 0), "each unit counted its own completion");
    assert_eq!(stats.unit.get("ats_success"), Some(&2), "the totals add the units up");
    server.stop().await;
}

#[tokio::test]
async fn a_client_driven_units_registers_and_memory_are_its_owners() {
    let server = Server::boot(three_units()).await;
    let mut c = server.control().await;
    let write = |unit: u32, lease: &str| WriteRegisterRequest {
        offset: 0x18, // GCMD
        width: 4,
        value: 0,
        unit,
        lease: lease.to_owned(),
    };
    let builtin = c.write_register(write(0, "")).await.expect_err("built-in unit");
    assert_eq!(builtin.code(), Code::FailedPrecondition, "{builtin:?}");
    let unclaimed = c.write_register(write(2, "")).await.expect_err("no lease");
    assert_eq!(unclaimed.code(), Code::PermissionDenied, "{unclaimed:?}");
    let missing = c.write_register(write(7, "")).await.expect_err("no unit 7");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");

    let mut claim = c.claim_unit(ClaimUnitRequest { unit: 2 }).await.expect("claim").into_inner();
    let lease = claim.message().await.expect("lease").expect("first message").lease;
    assert_eq!(lease.len(), 32, "128 bits in hex");
    c.write_register(write(2, &lease)).await.expect("the owner writes");
    let other = server.control().await.claim_unit(ClaimUnitRequest { unit: 2 }).await;
    let second = match other {
        Ok(stream) => stream.into_inner().message().await.expect_err("held"),
        Err(e) => e,
    };
    assert_eq!(second.code(), Code::FailedPrecondition, "{second:?}");
    let wrong = c.write_register(write(2, &"0".repeat(32))).await.expect_err("wrong lease");
    assert_eq!(wrong.code(), Code::PermissionDenied, "{wrong:?}");

    // Memory: the built-in region is nobody's to write, the client region its owner's only.
    let wm = |address: u64, lease: &str| WriteMemoryRequest { address, data: vec![1; 8], lease: lease.to_owned() };
    let tables = c.write_memory(wm(BUILTIN.base.0 + 0x1000, &lease)).await.expect_err("built-in region");
    assert_eq!(tables.code(), Code::PermissionDenied, "{tables:?}");
    let foreign = c.write_memory(wm(CLIENT.base.0, "")).await.expect_err("without the lease");
    assert_eq!(foreign.code(), Code::PermissionDenied, "{foreign:?}");
    c.write_memory(wm(CLIENT.base.0, &lease)).await.expect("the owner writes its region");
    c.write_memory(wm(0x10_0000, "")).await.expect("ordinary memory");
    // The built-in driver maps nothing into the client's region.
    let did = paging_domain(&mut c, &[SID_A]).await;
    let map_into = c
        .map(MapRequest {
            domain_id: did,
            ranges: vec![MapRange {
                iova: 0,
                hpa: CLIENT.base.0,
                length: 0x1000,
                permissions: Some(Permissions { read: true, write: true }),
            }],
        })
        .await
        .expect_err("client region");
    assert_eq!(map_into.code(), Code::InvalidArgument, "{map_into:?}");

    // Release: the region is zeroed and the unit is free again.
    c.release_unit(ReleaseUnitRequest { unit: 2, lease: lease.clone() }).await.expect("release");
    assert!(claim.message().await.expect("stream ends").is_none(), "the claim stream ends with the lease");
    let back = c.read_memory(ReadMemoryRequest { address: CLIENT.base.0, length: 8 }).await.expect("read");
    assert_eq!(back.into_inner().data, vec![0; 8], "the region is zeroed for the next owner");
    let stale = c.write_register(write(2, &lease)).await.expect_err("the old lease");
    assert_eq!(stale.code(), Code::PermissionDenied, "{stale:?}");
    let mut again = c.claim_unit(ClaimUnitRequest { unit: 2 }).await.expect("claim again").into_inner();
    assert!(again.message().await.expect("lease").is_some());
    drop(again);
    server.stop().await;
}

#[tokio::test]
async fn devices_behind_a_client_driven_unit_reach_no_memory_until_its_owner_takes_over() {
    let server = Server::boot(three_units()).await;
    let mut c = server.control().await;
    let pmen = |c: &mut ControlClient<Channel>| {
        let mut c = c.clone();
        async move {
            let r = ReadRegisterRequest { offset: 0x64, width: 4, unit: 2 };
            c.read_register(r).await.expect("PMEN").into_inner().value
        }
    };
    assert_eq!(pmen(&mut c).await, 0x8000_0001, "firmware enabled the protected regions (EPM, PRS)");
    c.write_memory(WriteMemoryRequest { address: 0x10_0000, data: vec![7; 8], ..Default::default() })
        .await
        .expect("write");
    let mut link = Link::open(server.addr, "c", vec![function(SID_C)]).await.expect("link C");
    let read = DmaRequest { source_id: SID_C, address: 0x10_0000, length: 8, ..Default::default() };
    let blocked = link.dma(read.clone()).await;
    assert!(!blocked.ok, "translation is off, but the regions fence memory off: {blocked:?}");
    assert_eq!(blocked.fault_reason, 0, "a protected-region block records no fault");

    let mut claim = c.claim_unit(ClaimUnitRequest { unit: 2 }).await.expect("claim").into_inner();
    let lease = claim.message().await.expect("lease").expect("first").lease;
    c.reset_unit(ResetUnitRequest { unit: 2, lease: lease.clone() }).await.expect("reset");
    assert_eq!(pmen(&mut c).await, 0, "a hardware reset clears the regions");
    let passed = link.dma(read.clone()).await;
    assert!(passed.ok && passed.data == vec![7; 8], "reset state: untranslated pass-through: {passed:?}");
    c.release_unit(ReleaseUnitRequest { unit: 2, lease }).await.expect("release");
    assert_eq!(pmen(&mut c).await, 0x8000_0001, "released: firmware protects memory again");
    assert!(!link.dma(read).await.ok);
    server.stop().await;
}

/// Claims unit 2 and returns its claim stream and lease.
async fn claim(c: &mut ControlClient<Channel>) -> (tonic::Streaming<UnitLease>, String) {
    let mut stream = c.claim_unit(ClaimUnitRequest { unit: 2 }).await.expect("claim").into_inner();
    let lease = stream.message().await.expect("lease").expect("first message").lease;
    (stream, lease)
}

/// The old owner keeps writing its region and clearing PMEN.EPM while it releases the unit:
/// whatever the interleaving, the next owner finds the region zeroed and memory protected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_write_of_the_old_owner_lands_after_its_release() {
    let server = Server::boot(three_units()).await;
    let mut c = server.control().await;
    for round in 0..30 {
        let (mut stream, lease) = claim(&mut c).await;
        let (mut w, mut r) = (server.control().await, server.control().await);
        let (l1, l2) = (lease.clone(), lease.clone());
        let memory = tokio::spawn(async move {
            let write =
                |lease: String| WriteMemoryRequest { address: CLIENT.base.0, data: vec![0xaa; 256 << 10], lease };
            while w.write_memory(write(l1.clone())).await.is_ok() {}
        });
        let register = tokio::spawn(async move {
            let pmen = |lease: String| WriteRegisterRequest { offset: 0x64, width: 4, value: 0, unit: 2, lease };
            while r.write_register(pmen(l2.clone())).await.is_ok() {}
        });
        tokio::time::sleep(Duration::from_millis(3)).await;
        c.release_unit(ReleaseUnitRequest { unit: 2, lease }).await.expect("release");
        assert!(stream.message().await.expect("ends").is_none());
        memory.await.expect("memory writer");
        register.await.expect("register writer");
        let data = c
            .read_memory(ReadMemoryRequest { address: CLIENT.base.0, length: 256 << 10 })
            .await
            .expect("read")
            .into_inner()
            .data;
        assert!(data.iter().all(|b| *b == 0), "round {round}: the old owner's bytes outlived the release");
        let pmen = c.read_register(ReadRegisterRequest { offset: 0x64, width: 4, unit: 2 }).await.expect("PMEN");
        assert_eq!(pmen.into_inner().value, 0x8000_0001, "round {round}: memory unprotected after the release");
    }
    server.stop().await;
}

#[tokio::test]
async fn wait_descriptors_write_no_status_into_a_drivers_region() {
    use dmar_vtd::unit::invalidation::descriptor::{WaitDesc, encode};
    let server = Server::boot(three_units()).await;
    let mut c = server.control().await;
    let wait = |status_addr: u64| {
        let (qw0, qw1) =
            encode::wait(WaitDesc { interrupt: false, status_write: true, fence: true, status_data: 1, status_addr });
        SubmitInvalidationsRequest { descriptors: vec![Descriptor { qw0, qw1 }], unit: 0 }
    };
    for (what, addr) in [("client region", CLIENT.base.0 + 0x100), ("built-in region", BUILTIN.end() - 0x100)] {
        let refused = c.submit_invalidations(wait(addr)).await.expect_err(what);
        assert_eq!(refused.code(), Code::PermissionDenied, "{what}: {refused:?}");
        let back = c.read_memory(ReadMemoryRequest { address: addr, length: 4 }).await.expect("read");
        assert_eq!(back.into_inner().data, vec![0; 4], "{what}: nothing written");
    }
    c.submit_invalidations(wait(0x10_0000)).await.expect("ordinary memory");
    let status = c.read_memory(ReadMemoryRequest { address: 0x10_0000, length: 4 }).await.expect("read");
    assert_eq!(status.into_inner().data, vec![1, 0, 0, 0]);
    // The claim stream that ends after an explicit release does not end a newer lease.
    let (first, lease) = claim(&mut c).await;
    c.release_unit(ReleaseUnitRequest { unit: 2, lease }).await.expect("release");
    let (_second, lease) = claim(&mut c).await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let gcmd = WriteRegisterRequest { offset: 0x18, width: 4, value: 0, unit: 2, lease };
    c.write_register(gcmd).await.expect("the newer lease still holds");
    server.stop().await;
}

#[tokio::test]
async fn the_dmar_table_on_the_wire_has_one_drhd_per_unit_with_its_scope() {
    use dmar_vtd::acpi::{ScopeKind, parse_dmar};
    let server = Server::boot(three_units()).await;
    let mut c = server.control().await;
    let table = c.read_acpi_table(ReadAcpiTableRequest { signature: "DMAR".into() }).await.expect("DMAR");
    let bytes = table.into_inner().data;
    assert_eq!(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)), 0, "the checksum makes the bytes sum to 0");
    let dmar = parse_dmar(&bytes).expect("a valid table");
    let platform = c.get_platform(GetPlatformRequest {}).await.expect("platform").into_inner();
    assert_eq!(dmar.drhds.len(), platform.units.len());
    for (drhd, unit) in dmar.drhds.iter().zip(&platform.units) {
        assert_eq!(drhd.register_base, unit.register_base, "{}", unit.name);
        assert!(!drhd.include_pci_all);
        assert_eq!(drhd.scope.len(), 1);
        assert_eq!(drhd.scope[0].kind, ScopeKind::Bridge);
        assert_eq!(drhd.scope[0].source_id().map(u32::from), Some(unit.scope[0].source_id), "{}", unit.name);
    }
    let other = c.read_acpi_table(ReadAcpiTableRequest { signature: "APIC".into() }).await.expect_err("only DMAR");
    assert_eq!(other.code(), Code::NotFound);
    server.stop().await;
}
