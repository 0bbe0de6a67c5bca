//! The Control calls tests repeat to set a server up: domains, attachments, mappings and
//! strict unmaps. Each expects success; a test that checks a refusal makes the call itself.

use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::{
    AttachRequest, CreateDomainRequest, DomainKind, FlushPolicy, MapRange, MapRequest, Permissions, UnmapRange,
    UnmapRequest, UnmapResponse,
};
use tonic::transport::Channel;

/// A new domain of `kind` with a 48-bit address width; its id.
pub async fn create_domain(c: &mut ControlClient<Channel>, kind: DomainKind) -> u32 {
    c.create_domain(CreateDomainRequest { kind: kind as i32, address_width: 48 })
        .await
        .expect("domain")
        .into_inner()
        .domain_id
}

/// A paging domain with `sids` attached with ATS.
pub async fn paging_domain<S: Copy + Into<u32>>(c: &mut ControlClient<Channel>, sids: &[S]) -> u32 {
    let did = create_domain(c, DomainKind::Paging).await;
    for sid in sids {
        attach(c, did, (*sid).into(), true).await;
    }
    did
}

/// Attaches `sid` to `did`, with or without ATS.
pub async fn attach(c: &mut ControlClient<Channel>, did: u32, sid: u32, ats: bool) {
    c.attach(AttachRequest { source_id: sid, domain_id: did, ats, ..Default::default() }).await.expect("attach");
}

/// Maps `length` bytes at `iova` to `hpa`, readable, and writable if `write`.
pub async fn map(c: &mut ControlClient<Channel>, did: u32, iova: u64, hpa: u64, length: u64, write: bool) {
    c.map(MapRequest {
        domain_id: did,
        ranges: vec![MapRange { iova, hpa, length, permissions: Some(Permissions { read: true, write }) }],
    })
    .await
    .expect("map");
}

/// Unmaps `length` bytes at `iova` with the strict policy: the call returns once every
/// device TLB that may hold the range has completed its invalidation.
pub async fn strict_unmap(c: &mut ControlClient<Channel>, did: u32, iova: u64, length: u64) -> UnmapResponse {
    c.unmap(UnmapRequest {
        domain_id: did,
        ranges: vec![UnmapRange { iova, length }],
        policy: FlushPolicy::Strict as i32,
    })
    .await
    .expect("unmap")
    .into_inner()
}
