//! Translated-request checking over real gRPC on 127.0.0.1:0: a function attached with
//! `check_translated` reaches, with translated DMA on its ATS link, only what the server
//! completed for it and has not invalidated since; the refusals come back as DMA
//! completions with the fault reason, as `WatchFaults` events (address type translated)
//! and in `GetStats`. Attached without it, translated DMA reaches any host address, as
//! TT=01b does on hardware.

use std::time::Duration;

use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::*;
use dmar_test_support::{Link, PATIENCE, Server, config, create_domain, function, map};
use tonic::transport::Channel;

const SID: u32 = 0x0210; // 02:02.0
/// IOVA 0x10_0000..0x10_2000 maps to these host pages.
const IOVA: u64 = 0x10_0000;
const HPA: u64 = 0x20_0000;
/// Host memory the function never had translated.
const ELSEWHERE: u64 = 0x30_0000;
/// VT-d fault reasons the refusals carry (VT-d 7.1.3): no write, no read.
const NO_WRITE: u32 = 0x05;
const NO_READ: u32 = 0x06;

/// A server with a paging domain, `SID` attached to it with ATS (and checking if
/// `check_translated`) and two read-write pages mapped: the server, a control client and
/// the domain.
async fn setup(check_translated: bool) -> (Server, ControlClient<Channel>, u32) {
    let server = Server::boot(config(Duration::from_secs(5))).await;
    let mut c = server.control().await;
    let did = create_domain(&mut c, DomainKind::Paging).await;
    c.attach(AttachRequest { source_id: SID, domain_id: did, ats: true, check_translated }).await.expect("attach");
    map(&mut c, did, IOVA, HPA, 0x2000, true).await;
    (server, c, did)
}

async fn open(server: &Server) -> Result<Link, tonic::Status> {
    Link::open(server.addr, "test", vec![function(SID)]).await
}

/// A translated (AT=10b) DMA of 64 bytes at `address`.
async fn translated_dma(link: &mut Link, address: u64, write: bool) -> DmaCompletion {
    let data = if write { vec![0x5a; 64] } else { Vec::new() };
    let length = if write { 0 } else { 64 };
    link.dma(DmaRequest { tag: address, source_id: SID, translated: true, address, write, length, data }).await
}

fn refused_with(c: &DmaCompletion, reason: u32) {
    assert!(!c.ok, "refused: {c:?}");
    assert_eq!(c.fault_reason, reason, "{c:?}");
}

async fn unit_stat(c: &mut ControlClient<Channel>, name: &str) -> u64 {
    let stats = c.get_stats(GetStatsRequest {}).await.expect("stats").into_inner();
    *stats.unit.get(name).unwrap_or_else(|| panic!("{name} missing from GetStats"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checked_functions_reach_only_what_was_completed_and_not_invalidated() {
    let (server, mut c, did) = setup(true).await;
    let mut faults = c.watch_faults(WatchRequest {}).await.expect("watch").into_inner();
    let mut link = open(&server).await.expect("link");

    // Nothing completed yet.
    refused_with(&translated_dma(&mut link, HPA, false).await, NO_READ);
    let done = link.translate(SID, IOVA).await;
    assert_eq!(done.status, CompletionStatus::Success as i32);
    let e = done.entry.expect("entry");
    assert_eq!((e.translated_address, e.read, e.write), (HPA, true, true));
    let ok = translated_dma(&mut link, HPA + 0x40, false).await;
    assert!(ok.ok && ok.data.len() == 64, "{ok:?}");
    assert!(translated_dma(&mut link, HPA + 0x80, true).await.ok);
    // Mapped but never completed for the function, and memory it never had translated.
    refused_with(&translated_dma(&mut link, HPA + 0x1000, false).await, NO_READ);
    refused_with(&translated_dma(&mut link, ELSEWHERE, true).await, NO_WRITE);

    // Each refusal is a recorded fault: source id, page, direction, address type 2.
    let mut events = Vec::new();
    for _ in 0..3 {
        let e = tokio::time::timeout(Duration::from_secs(10), faults.message()).await.expect("in time");
        events.push(e.expect("ok").expect("event"));
    }
    let seen: Vec<_> = events.iter().map(|f| (f.source_id, f.address, f.reason, f.write, f.address_type)).collect();
    assert_eq!(
        seen,
        vec![
            (SID, HPA, NO_READ, false, 2),
            (SID, HPA + 0x1000, NO_READ, false, 2),
            (SID, ELSEWHERE, NO_WRITE, true, 2)
        ]
    );

    // A strict unmap invalidates the function's device TLB: until the function answers it
    // may still use its translation (PCIe 10.3); once it has, the range is revoked, before
    // the unmap returns.
    let mut c2 = c.clone();
    let unmap = tokio::spawn(async move {
        let ranges = vec![UnmapRange { iova: IOVA, length: 0x1000 }];
        c2.unmap(UnmapRequest { domain_id: did, ranges, policy: FlushPolicy::Strict as i32 }).await
    });
    let inv = link.invalidation().await;
    let before_answer = translated_dma(&mut link, HPA, false).await;
    assert!(before_answer.ok, "{before_answer:?}");
    let answer = InvalidationCompletion { source_id: SID, itag: inv.itag };
    link.send(LinkUp { invalidation_completions: vec![answer], ..Default::default() }).await;
    unmap.await.expect("join").expect("unmap");
    refused_with(&translated_dma(&mut link, HPA, false).await, NO_READ);

    assert_eq!(unit_stat(&mut c, "translated_check_refusals").await, 4);
    assert_eq!(unit_stat(&mut c, "translated_check_grants").await, 1);
    drop((faults, link));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchecked_functions_reach_any_host_address_as_tt01_allows() {
    let (server, mut c, _) = setup(false).await;
    let mut link = open(&server).await.expect("link");
    // Never translated: allowed all the same (VT-d 4.2.4 trusts the device TLB).
    assert!(translated_dma(&mut link, ELSEWHERE, true).await.ok);
    assert!(translated_dma(&mut link, HPA + 0x1000, false).await.ok);
    assert_eq!(unit_stat(&mut c, "translated_check_refusals").await, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checking_ends_with_the_link_and_comes_back_empty() {
    let (server, _c, _) = setup(true).await;
    let mut link = open(&server).await.expect("link");
    link.translate(SID, IOVA).await;
    assert!(translated_dma(&mut link, HPA, false).await.ok);
    drop(link);
    // The function's device TLB went with its link, and so did its grants.
    let relink = async {
        loop {
            if let Ok(link) = open(&server).await {
                break link;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let mut link = tokio::time::timeout(PATIENCE, relink).await.expect("the requester id is free again");
    refused_with(&translated_dma(&mut link, HPA, false).await, NO_READ);
    server.stop().await;
}
