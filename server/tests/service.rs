//! The server over real gRPC on 127.0.0.1:0: the Control service and the ATS link driven
//! by real clients, including the strict-unmap chain through a link that must complete
//! its invalidation, a link that never answers (ITE), and bad requests.

use std::time::Duration;

use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::*;
use dmar_test_support::{Boot, Link, Server, config, function, http_get, map, paging_domain, strict_unmap};
use tonic::Code;
use tonic::transport::Channel;

const SID: u32 = 0x0108; // 01:01.0

/// A server with a `/metrics` listener whose device-TLB invalidations time out after `timeout`.
async fn boot(timeout: Duration) -> Server {
    Boot::new(config(timeout)).with_metrics().start().await
}

/// A link binding `sids` as the agent "test".
async fn open(server: &Server, sids: &[u32]) -> Result<Link, tonic::Status> {
    Link::open(server.addr, "test", sids.iter().map(|s| function(*s)).collect()).await
}

/// A server (device-TLB time-out `timeout`) with `SID` attached to a paging domain that maps
/// the page at `iova` to `hpa`, read-write, and a link bound for `SID`.
async fn one_page(timeout: Duration, iova: u64, hpa: u64) -> (Server, ControlClient<Channel>, u32, Link) {
    let server = boot(timeout).await;
    let mut c = server.control().await;
    let did = paging_domain(&mut c, &[SID]).await;
    map(&mut c, did, iova, hpa, 0x1000, true).await;
    let link = open(&server, &[SID]).await.expect("link");
    (server, c, did, link)
}

fn rw() -> Option<Permissions> {
    Some(Permissions { read: true, write: true })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_translate_over_the_link_and_strict_unmap_waits_for_the_device() {
    let (server, c, did, mut link) = one_page(Duration::from_secs(5), 0x10_0000, 0x20_0000).await;
    let done = link.translate(SID, 0x10_0123).await;
    assert_eq!(done.status, CompletionStatus::Success as i32);
    let e = done.entry.expect("entry");
    assert_eq!((e.translated_address, e.size_shift, e.read, e.write), (0x20_0000, 12, true, true));

    // Strict unmap: the link receives the invalidation and must complete it.
    let mut c2 = c.clone();
    let unmap = tokio::spawn(async move { strict_unmap(&mut c2, did, 0x10_0000, 0x1000).await });
    let inv = link.invalidation().await;
    assert_eq!(inv.source_id, SID);
    assert_eq!(inv.address & !0xfff, 0x10_0000);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!unmap.is_finished(), "the unmap waits for the device's completion");
    link.send(LinkUp {
        invalidation_completions: vec![InvalidationCompletion { source_id: SID, itag: inv.itag }],
        ..Default::default()
    })
    .await;
    let r = unmap.await.expect("join");
    assert_eq!(r.unmapped_bytes, 0x1000);
    let after = link.translate(SID, 0x10_0123).await;
    let e = after.entry.expect("entry");
    assert!(!e.read && !e.write, "not present after the unmap");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_never_answers_yields_ite_and_others_keep_working() {
    let server = boot(Duration::from_millis(200)).await;
    let mut c = server.control().await;
    let other = 0x0110;
    let did = paging_domain(&mut c, &[SID]).await;
    let did2 = paging_domain(&mut c, &[other]).await;
    for d in [did, did2] {
        map(&mut c, d, 0, 0x40_0000, 0x2000, true).await;
    }
    let _silent = open(&server, &[SID]).await.expect("link");
    let mut healthy = open(&server, &[other]).await.expect("link");
    let err = c
        .unmap(UnmapRequest {
            domain_id: did,
            ranges: vec![UnmapRange { iova: 0, length: 0x1000 }],
            policy: FlushPolicy::Strict as i32,
        })
        .await
        .expect_err("time-out");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    // The other link is still served, and its own strict unmaps complete.
    assert_eq!(healthy.translate(other, 0x1000).await.status, CompletionStatus::Success as i32);
    let mut c2 = c.clone();
    let unmap = tokio::spawn(async move { strict_unmap(&mut c2, did2, 0, 0x1000).await });
    let inv = healthy.invalidation().await;
    healthy
        .send(LinkUp {
            invalidation_completions: vec![InvalidationCompletion { source_id: other, itag: inv.itag }],
            ..Default::default()
        })
        .await;
    unmap.await.expect("join");
    let stats = c.get_stats(GetStatsRequest {}).await.expect("stats").into_inner();
    assert!(stats.unit["device_tlb_timeouts"] >= 1);
    assert_eq!(stats.live_links, 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_useful_statuses() {
    let server = boot(Duration::from_secs(1)).await;
    let mut c = server.control().await;
    let code = |r: Result<tonic::Response<_>, tonic::Status>| -> Code {
        let _: &Option<tonic::Response<()>> = &None;
        match r {
            Ok(_) => Code::Ok,
            Err(s) => {
                assert!(!s.message().is_empty());
                s.code()
            }
        }
    };
    let did = paging_domain(&mut c, &[SID]).await;
    let map = |did, iova, len| MapRequest {
        domain_id: did,
        ranges: vec![MapRange { iova, hpa: 0x80_0000, length: len, permissions: rw() }],
    };
    assert_eq!(code(c.map(map(77, 0, 0x1000)).await.map(|_| tonic::Response::new(()))), Code::NotFound);
    assert_eq!(code(c.map(map(0, 0, 0x1000)).await.map(|_| tonic::Response::new(()))), Code::InvalidArgument);
    assert_eq!(code(c.map(map(did, 0x123, 0x1000)).await.map(|_| tonic::Response::new(()))), Code::InvalidArgument);
    assert_eq!(code(c.map(map(did, 1 << 48, 0x1000)).await.map(|_| tonic::Response::new(()))), Code::InvalidArgument);
    c.map(map(did, 0, 0x2000)).await.expect("map");
    assert_eq!(code(c.map(map(did, 0x1000, 0x1000)).await.map(|_| tonic::Response::new(()))), Code::AlreadyExists);
    let many = MapRequest {
        domain_id: did,
        ranges: (0..5000u64).map(|i| MapRange { iova: i << 12, hpa: 0, length: 0x1000, permissions: rw() }).collect(),
    };
    assert_eq!(code(c.map(many).await.map(|_| tonic::Response::new(()))), Code::ResourceExhausted);
    let bad_desc = SubmitInvalidationsRequest {
        descriptors: vec![Descriptor { qw0: 0x2 | (1 << 4) | (1 << 8), qw1: 0 }],
        unit: 0,
    };
    assert_eq!(code(c.submit_invalidations(bad_desc).await.map(|_| tonic::Response::new(()))), Code::InvalidArgument);
    // The queue recovered: a good descriptor goes through.
    let good = SubmitInvalidationsRequest { descriptors: vec![Descriptor { qw0: 0x2 | (1 << 4), qw1: 0 }], unit: 0 };
    c.submit_invalidations(good).await.expect("good descriptor");
    assert_eq!(
        code(
            c.read_register(ReadRegisterRequest { offset: 0x1000, width: 4, unit: 0 })
                .await
                .map(|_| tonic::Response::new(()))
        ),
        Code::InvalidArgument
    );
    // Links: double bind and unbound requester ids.
    let mut link = open(&server, &[SID]).await.expect("link");
    let again = open(&server, &[SID]).await.expect_err("refused");
    assert_eq!(again.code(), Code::AlreadyExists);
    link.send(LinkUp {
        translations: vec![TranslationRequest { tag: 1, source_id: 0x0200, address: 0, no_write: true }],
        ..Default::default()
    })
    .await;
    let err = link.closed_with().await;
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("not bound"), "{}", err.message());
    // The server is still healthy and the requester id is free again once the link closed.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(open(&server, &[SID]).await.is_ok());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_exposes_every_metric() {
    let (server, _c, _did, mut link) = one_page(Duration::from_secs(1), 0, 0x80_0000).await;
    link.translate(SID, 0).await;
    let body = http_get(server.metrics_addr(), "/metrics").await;
    for name in dmar_server::service::metrics::METRIC_NAMES {
        assert!(body.contains(name), "{name} missing from /metrics");
    }
    // Servers of concurrent tests share the process-wide recorder: check shape, not value.
    assert!(body.lines().any(|l| l.starts_with("dmar_link_messages_total{kind=\"translation\"}")), "{body}");
    server.stop().await;
}
