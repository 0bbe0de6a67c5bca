//! Agents against a real dmar server on 127.0.0.1: hit and miss accounting, coalescing,
//! permissions, invalidation after unmap, DMA in flight delaying an invalidation, a
//! server restart, and PRI with a control-plane subscriber.

use std::time::Duration;

use dmar_agent::{Dma, DmaError, DmaResult, FunctionConfig, PageRequestFailure};
use dmar_e2e::*;
use dmar_proto::v1::{GetStatsRequest, PageResponseCode, RespondPageRequestRequest, WatchRequest};

const LONG: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_misses_coalescing_and_permissions_are_accounted() {
    let server = boot(LONG).await;
    let mut c = server.control().await;
    let f = sid("00:01.0");
    let did = paging_domain(&mut c, &[f]).await;
    map(&mut c, did, 0x10_0000, 0x20_0000, 16 << 12, true).await;
    map(&mut c, did, 0x30_0000, 0x40_0000, 0x1000, false).await;
    let (agent, shutdown) = start_agent(agent_config(&server, vec![FunctionConfig::new(f)])).await;
    let dev = agent.function(f).expect("function");

    let first = dev.access(Dma::read(0x10_0040)).await.expect("access");
    assert_eq!(first.result, DmaResult::Ok);
    assert!(!first.atc_hit);
    assert_eq!((first.translated, first.size_shift), (Some(0x20_0040), 12));
    let again = dev.access(Dma::read(0x10_0080)).await.expect("access");
    assert!(again.atc_hit && again.is_ok());
    assert_eq!(again.translated, Some(0x20_0080));

    // The read asked for no-write, so the entry grants reads only: a write misses, asks
    // for write access, and replaces the entry; the next write hits.
    let w = dev.access(Dma::write(0x10_0000)).await.expect("access");
    assert!(!w.atc_hit && w.is_ok());
    assert!(dev.access(Dma::write(0x10_0100)).await.expect("access").atc_hit);

    // Eight concurrent misses on one page: one translation request.
    let burst = dev.access_many(vec![Dma::read(0x10_5000); 8]).await.expect("burst");
    assert!(burst.iter().all(|o| o.is_ok() && !o.atc_hit));
    assert_eq!(burst.iter().filter(|o| o.coalesced).count(), 7);

    // No write through a read-only entry; reads are fine; nothing mapped is a fault
    // without PRI; translate-only sends no DMA.
    let r = dev.access(Dma::read(0x30_0000)).await.expect("access");
    assert!(r.is_ok());
    let ro = dev.access(Dma::write(0x30_0000)).await.expect("access");
    assert_eq!(ro.result, DmaResult::Fault(DmaError::NoAccess));
    let hole = dev.access(Dma::read(0x50_0000)).await.expect("access");
    assert_eq!(hole.result, DmaResult::Fault(DmaError::NoAccess));
    let t = dev.access(Dma::read(0x10_0000).translate_only()).await.expect("access");
    assert!(t.is_ok() && t.atc_hit && t.translated == Some(0x20_0000));

    let s = dev.snapshot().await.expect("snapshot");
    let n = s.counters;
    assert_eq!(n.accesses, 2 + 2 + 8 + 1 + 1 + 1 + 1);
    assert_eq!(n.atc_hits, 1 + 1 + 1);
    // page 0 read, page 0 write, page 5 x8, 0x30_0000 read, its write (a permission
    // miss), the hole.
    assert_eq!(n.atc_misses, 1 + 1 + 8 + 1 + 1 + 1);
    assert_eq!(n.coalesced_misses, 7);
    assert_eq!(n.translations_requested, 1 + 1 + 1 + 1 + 1 + 1);
    assert_eq!(n.faults, 2);
    assert_eq!(n.dma_ok, 2 + 2 + 8 + 1, "a fault or translate-only access sends no DMA");
    assert_eq!(n.dma_failed, 0);
    assert_eq!(s.atc_entries, 3, "page 0 (RW), page 5, the read-only page");
    let stats = c.get_stats(GetStatsRequest {}).await.expect("stats").into_inner();
    assert_eq!(stats.link_translations, n.translations_requested, "the server served exactly what was sent");
    stop_agent(agent, shutdown).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_unmap_the_next_access_misses_and_sees_the_new_mapping() {
    let server = boot(LONG).await;
    let mut c = server.control().await;
    let f = sid("00:02.0");
    let did = paging_domain(&mut c, &[f]).await;
    map(&mut c, did, 0x8000_0000, 0x10_0000, 0x1000, true).await;
    let (agent, shutdown) = start_agent(agent_config(&server, vec![FunctionConfig::new(f)])).await;
    let dev = agent.function(f).expect("function");
    assert_eq!(dev.access(Dma::read(0x8000_0010)).await.expect("access").translated, Some(0x10_0010));
    assert!(dev.access(Dma::read(0x8000_0020)).await.expect("access").atc_hit);

    // A strict unmap returns only once the agent has completed the invalidation.
    assert_eq!(strict_unmap(&mut c, did, 0x8000_0000, 0x1000).await.unmapped_bytes, 0x1000);
    let s = dev.snapshot().await.expect("snapshot");
    assert_eq!(s.counters.invalidations_handled, 1);
    assert_eq!(s.counters.invalidated_entries, 1);
    assert_eq!(s.atc_entries, 0);

    map(&mut c, did, 0x8000_0000, 0x70_0000, 0x1000, true).await;
    let after = dev.access(Dma::read(0x8000_0010)).await.expect("access");
    assert!(!after.atc_hit, "the entry is gone");
    assert_eq!(after.translated, Some(0x70_0010), "the new mapping");
    stop_agent(agent, shutdown).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dma_in_flight_delays_the_invalidation_that_covers_it() {
    let server = boot(LONG).await;
    let mut c = server.control().await;
    let f = sid("00:03.0");
    let did = paging_domain(&mut c, &[f]).await;
    map(&mut c, did, 0x1000, 0x10_0000, 0x1000, true).await;
    map(&mut c, did, 0x2000, 0x20_0000, 0x1000, true).await;
    map(&mut c, did, 0x3000, 0x30_0000, 0x1000, true).await;
    let (agent, shutdown) = start_agent(agent_config(&server, vec![FunctionConfig::new(f)])).await;
    let dev = agent.function(f).expect("function");

    // A DMA in flight on another page does not hold an invalidation back.
    let unrelated = dev.hold(Dma::read(0x3000)).await.expect("hold").expect("translated");
    assert_eq!(strict_unmap(&mut c, did, 0x2000, 0x1000).await.unmapped_bytes, 0x1000);

    let held = dev.hold(Dma::write(0x1000)).await.expect("hold").expect("translated");
    assert_eq!(held.translated(), Some(0x10_0000));
    let mut c2 = c.clone();
    let unmap = tokio::spawn(async move { strict_unmap(&mut c2, did, 0x1000, 0x1000).await });
    eventually("the agent receives the invalidation", || async {
        dev.snapshot().await.expect("snapshot").pending_invalidations == 1
    })
    .await;
    let s = dev.snapshot().await.expect("snapshot");
    assert_eq!(s.atc_entries, 1, "the covered entry is dropped at once; the other page's stays");
    // The agent has not completed the invalidation, so the strict unmap cannot be done.
    assert!(!unmap.is_finished());
    // The link keeps being serviced meanwhile.
    assert!(dev.access(Dma::read(0x3040)).await.expect("access").is_ok());

    let done = held.release().await.expect("release");
    assert_eq!(done.result, DmaResult::Ok, "the DMA used the translation it had");
    let r = tokio::time::timeout(PATIENCE, unmap).await.expect("unmap completes").expect("join");
    assert_eq!(r.unmapped_bytes, 0x1000);
    let s = dev.snapshot().await.expect("snapshot");
    assert_eq!((s.pending_invalidations, s.counters.invalidations_handled), (0, 2));
    assert!(unrelated.release().await.expect("release").is_ok());
    stop_agent(agent, shutdown).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_reconnects_with_an_empty_cache() {
    let server = boot(LONG).await;
    let addr = server.addr;
    let f = sid("00:04.0");
    let mut c = server.control().await;
    let did = paging_domain(&mut c, &[f]).await;
    map(&mut c, did, 0x4000, 0x10_0000, 0x1000, true).await;
    let (agent, shutdown) = start_agent(agent_config(&server, vec![FunctionConfig::new(f)])).await;
    let dev = agent.function(f).expect("function");
    assert!(dev.access(Dma::read(0x4000)).await.expect("access").is_ok());
    assert!(dev.access(Dma::read(0x4000)).await.expect("access").atc_hit);
    let before = agent.link_state();
    assert_eq!(dev.entries().await.expect("entries").len(), 1);

    drop(c);
    server.stop().await;
    tokio::time::timeout(PATIENCE, agent.wait_for_link(|s| !s.connected)).await.expect("link down").expect("agent");
    assert!(dev.entries().await.expect("entries").is_empty(), "the cache is dropped with the link");
    let down = dev.access(Dma::read(0x4000)).await.expect("access");
    assert_eq!(down.result, DmaResult::LinkDown);

    let server = boot_on(addr, LONG).await;
    let mut c = server.control().await;
    let did = paging_domain(&mut c, &[f]).await;
    map(&mut c, did, 0x4000, 0x50_0000, 0x1000, true).await;
    let after = connected_after(&agent, before.generation).await;
    assert_eq!(after.generation, before.generation + 1);
    assert!(dev.entries().await.expect("entries").is_empty());
    let fresh = dev.access(Dma::read(0x4000)).await.expect("access");
    assert!(!fresh.atc_hit && fresh.is_ok());
    assert_eq!(fresh.translated, Some(0x50_0000), "the new server's mapping");
    stop_agent(agent, shutdown).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_request_is_answered_by_a_control_plane_subscriber() {
    let server = boot(LONG).await;
    let mut c = server.control().await;
    let f = sid("00:05.0");
    let did = paging_domain(&mut c, &[f]).await;
    let mut requests = c.watch_page_requests(WatchRequest {}).await.expect("watch").into_inner();
    // The subscriber: maps what is asked for below 0x100000, refuses the rest.
    let mut sub = c.clone();
    let subscriber = tokio::spawn(async move {
        let mut served = Vec::new();
        while let Ok(Some(p)) = requests.message().await {
            let code = if p.address < 0x10_0000 {
                map(&mut sub, did, p.address, 0x60_0000 + p.address, 0x1000, true).await;
                PageResponseCode::Success
            } else {
                PageResponseCode::Invalid
            };
            served.push((p.address, p.write, p.last));
            sub.respond_page_request(RespondPageRequestRequest {
                source_id: p.source_id,
                group_index: p.group_index,
                code: code as i32,
            })
            .await
            .expect("respond");
            if served.len() == 2 {
                return served;
            }
        }
        served
    });
    let config = FunctionConfig { page_request_capacity: 4, ..FunctionConfig::new(f) };
    let (agent, shutdown) = start_agent(agent_config(&server, vec![config])).await;
    let dev = agent.function(f).expect("function");

    let paged = dev.access(Dma::write(0x7000)).await.expect("access");
    assert_eq!(paged.result, DmaResult::Ok);
    assert!(paged.page_requested);
    assert_eq!(paged.translated, Some(0x60_7000));
    assert!(dev.access(Dma::write(0x7040)).await.expect("access").atc_hit, "the page is cached now");

    let refused = dev.access(Dma::read(0x20_0000)).await.expect("access");
    assert_eq!(refused.result, DmaResult::Fault(DmaError::PageRequest(PageRequestFailure::Invalid)));

    let served = tokio::time::timeout(PATIENCE, subscriber).await.expect("subscriber").expect("join");
    assert_eq!(served, [(0x7000, true, true), (0x20_0000, false, true)]);
    let n = dev.snapshot().await.expect("snapshot").counters;
    assert_eq!((n.page_requests, n.page_request_failures, n.faults), (2, 1, 1));
    assert_eq!(n.translations_requested, 3, "the retry after the page request is a fresh translation");
    stop_agent(agent, shutdown).await;
    server.stop().await;
}
