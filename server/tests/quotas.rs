//! Per-identity quotas on a real server behind mutual TLS: the `max_frames` quota on the
//! page-table frames an operator's domains hold, refused with RESOURCE_EXHAUSTED and
//! counted in `dmar_server_quota_refusals_total{quota="max_frames"}`, one identity at its
//! quota leaving another's room untouched.

use anyhow::Result;
use dmar_auth::{DevPki, DevPkiSpec, Identity, Policy};
use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::*;
use dmar_server::service::{Security, ServerConfig};
use dmar_test_support::{Boot, Server, http_get, sample, tls_channel};
use tonic::Code;
use tonic::transport::Channel;

/// The frames operator-a may hold: a paging domain's top table, the three tables under
/// one 4 KiB page (4-level tables) and one more last-level table.
const A_MAX_FRAMES: u64 = 5;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// operator-a may hold [`A_MAX_FRAMES`] frames; operator-b has the default quotas.
fn pki() -> Result<DevPki> {
    let spec = DevPkiSpec {
        operators: vec![Identity::new("operator-a")?, Identity::new("operator-b")?],
        ..DevPkiSpec::default()
    };
    let mut pki = DevPki::generate(&spec)?;
    let entries = pki.policy.iter().map(|(id, grant)| {
        let mut grant = grant.clone();
        if id.as_str() == "operator-a" {
            grant.quotas.max_frames = A_MAX_FRAMES;
        }
        (id.clone(), grant)
    });
    pki.policy = Policy::new(entries.collect::<Vec<_>>())?;
    Ok(pki)
}

/// A server behind mutual TLS with that policy, and a `/metrics` listener.
async fn boot(pki: &DevPki) -> Result<Server> {
    dmar_auth::tls::install_default_crypto_provider();
    let security = Security::mutual_tls(pki.tls_material("dmar-server")?, pki.policy.clone());
    let config = ServerConfig { memory_size: 1 << 30, security, ..ServerConfig::default() };
    Ok(Boot::new(config).with_metrics().start().await)
}

async fn control(server: &Server, pki: &DevPki, name: &str) -> Result<ControlClient<Channel>> {
    Ok(ControlClient::new(tls_channel(server.addr, pki, name).await?))
}

/// `dmar_server_quota_refusals_total{quota="max_frames"}` (0 before the first).
async fn frame_refusals(server: &Server) -> f64 {
    let body = http_get(server.metrics_addr(), "/metrics").await;
    sample(&body, "dmar_server_quota_refusals_total{quota=\"max_frames\"} ").unwrap_or(0.0)
}

fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, contains: &str) {
    let status = r.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(contains), "{:?} does not mention {contains:?}", status.message());
}

async fn paging_domain(c: &mut ControlClient<Channel>) -> Result<u32, tonic::Status> {
    let r = CreateDomainRequest { kind: DomainKind::Paging as i32, address_width: 48 };
    Ok(c.create_domain(r).await?.into_inner().domain_id)
}

fn range(iova: u64, hpa: u64, length: u64) -> MapRange {
    MapRange { iova, hpa, length, permissions: Some(Permissions { read: true, write: true }) }
}

async fn map(c: &mut ControlClient<Channel>, domain_id: u32, ranges: Vec<MapRange>) -> Result<u64, tonic::Status> {
    Ok(c.map(MapRequest { domain_id, ranges }).await?.into_inner().mapped_bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_at_its_frame_quota_cannot_grow_its_tables() -> Result<()> {
    let pki = pki()?;
    let server = boot(&pki).await?;
    let refusals = frame_refusals(&server).await;
    let (mut a, mut b) = (control(&server, &pki, "operator-a").await?, control(&server, &pki, "operator-b").await?);
    let quota = format!("operator-a reached its max_frames quota of {A_MAX_FRAMES}");

    // 1 (top) + 3 (the tables under the first page) of 5.
    let da = paging_domain(&mut a).await?;
    map(&mut a, da, vec![range(0, 0, 4096)]).await?;
    // The second gigabyte needs a level-2 and a level-1 table: one more than is left. The
    // refusal writes nothing, and a request whose first range fits is undone whole.
    assert_code(map(&mut a, da, vec![range(GIB, 0, 4096)]).await, Code::ResourceExhausted, &quota);
    assert_code(
        map(&mut a, da, vec![range(2 * MIB, 0, 4096), range(GIB, 0, 4096)]).await,
        Code::ResourceExhausted,
        "range 1: operator-a reached its max_frames quota",
    );
    // Maps that need no new table, or exactly what is left, pass; 2 MiB leaves take none.
    assert_eq!(map(&mut a, da, vec![range(4096, 0, 4096), range(4 * MIB, 0, 2 * MIB)]).await?, 4096 + 2 * MIB);
    assert_eq!(map(&mut a, da, vec![range(2 * MIB, 0, 4096)]).await?, 4096);
    // At the quota now: any new table is refused, and so is a new paging domain (its top
    // table is a frame); a mapping into the tables already there still passes.
    assert_code(map(&mut a, da, vec![range(8 * MIB + 4096, 0, 4096)]).await, Code::ResourceExhausted, &quota);
    assert_code(paging_domain(&mut a).await, Code::ResourceExhausted, &quota);
    map(&mut a, da, vec![range(2 * 4096, 0, 4096)]).await?;
    let r = CreateDomainRequest { kind: DomainKind::Blocked as i32, address_width: 48 };
    a.create_domain(r).await?;

    // operator-b's room is its own.
    let db = paging_domain(&mut b).await?;
    map(&mut b, db, vec![range(0, 0, 4096), range(GIB, 0, 4096), range(512 * GIB, 0, 4096)]).await?;

    // Unmapping gives frames back (strict: at once), so operator-a maps again.
    let unmap = UnmapRequest {
        domain_id: da,
        ranges: vec![UnmapRange { iova: 2 * MIB, length: 4096 }],
        policy: FlushPolicy::Strict as i32,
    };
    a.unmap(unmap).await?;
    map(&mut a, da, vec![range(8 * MIB + 4096, 0, 4096)]).await?;
    // Destroying the domain gives every frame back.
    a.destroy_domain(DestroyDomainRequest { domain_id: da }).await?;
    let da = paging_domain(&mut a).await?;
    map(&mut a, da, vec![range(GIB, 0, 4096)]).await?;

    // Four refusals, each counted.
    assert_eq!(frame_refusals(&server).await - refusals, 4.0);
    server.stop().await;
    Ok(())
}

/// The driver gives a destroyed domain's id to the next domain. A destroy racing a create
/// of the same identity must not erase the new domain's owner (which would let another
/// operator destroy it and give its slot back twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroy_racing_a_create_leaves_the_new_domain_owned() -> Result<()> {
    let pki = pki()?;
    let server = boot(&pki).await?;
    let (mut a, b) = (control(&server, &pki, "operator-a").await?, control(&server, &pki, "operator-b").await?);
    let blocked = || CreateDomainRequest { kind: DomainKind::Blocked as i32, address_width: 48 };
    let mut old = b.clone().create_domain(blocked()).await?.into_inner().domain_id;
    for _ in 0..100 {
        let (mut b1, mut b2) = (b.clone(), b.clone());
        let destroy = tokio::spawn(async move { b1.destroy_domain(DestroyDomainRequest { domain_id: old }).await });
        let create = tokio::spawn(async move { b2.create_domain(blocked()).await });
        destroy.await??;
        let new = create.await??.into_inner().domain_id;
        let other = a.destroy_domain(DestroyDomainRequest { domain_id: new }).await;
        assert_code(other, Code::PermissionDenied, "belongs to operator-b");
        old = new;
    }
    server.stop().await;
    Ok(())
}
