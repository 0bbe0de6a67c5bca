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
