//! Faults from a device to `WatchFaults`, end to end: untranslated DMA over an ATS link to
//! pages that are not mapped, recorded by the unit in its fault recording registers,
//! serviced by the server's driver on each fault event (Linux `dmar_fault`), and streamed
//! to a watcher.
//!
//! The unit has 8 fault recording registers (CAP.NFR + 1) and, like hardware, drops a fault
//! that finds the next one still full (FSTS.PFO). So "every fault reaches the watcher" can
//! only hold while the driver keeps up; what always holds, and what these tests check, is
//! that no fault disappears uncounted: every fault is either streamed exactly once or
//! counted as an overflow (`faults_overflowed` in GetStats,
//! `dmar_unit_faults_dropped_total{cause="overflow"}` in /metrics).

use std::collections::HashMap;

use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::*;
use dmar_test_support::{Link, PATIENCE, Server, attach, config, create_domain, function};
use tonic::transport::Channel;

const SID: u32 = 0x0210; // 02:02.0
/// The first page the device reads; nothing is mapped anywhere.
const BASE: u64 = 0x4000_0000;
const FAULTS: u64 = 1000;
/// VT-d 7.1.3: a read through a not-present second-stage entry.
const NO_READ: u32 = 0x06;

/// A server with `SID` attached, without ATS, to an empty paging domain, a link bound for
/// it, and a watcher of faults subscribed before any fault happens.
async fn rig() -> (Server, ControlClient<Channel>, Link, tonic::Streaming<FaultEvent>) {
    let server = Server::boot(config(std::time::Duration::from_secs(5))).await;
    let mut c = server.control().await;
    let did = create_domain(&mut c, DomainKind::Paging).await;
    attach(&mut c, did, SID, false).await;
    // The stream exists once the call has returned: the server subscribed before answering.
    let watch = c.watch_faults(WatchRequest {}).await.expect("watch").into_inner();
    let link = Link::open(server.addr, "faults", vec![function(SID)]).await.expect("link");
    (server, c, link, watch)
}

/// An untranslated 8-byte read of page `n`.
fn read(n: u64) -> DmaRequest {
    DmaRequest {
        tag: n,
        source_id: SID,
        translated: false,
        address: BASE + (n << 12),
        write: false,
        length: 8,
        data: vec![],
    }
}

/// Reads DMA completions until `count` have arrived; each must be a fault.
async fn completions(link: &mut Link, count: u64) {
    let mut seen = 0;
    while seen < count {
        for d in link.next().await.dma {
            assert!(!d.ok && d.fault_reason == NO_READ, "DMA {} was not refused with 0x06: {d:?}", d.tag);
            seen += 1;
        }
    }
}

async fn unit_stats(c: &mut ControlClient<Channel>) -> HashMap<String, u64> {
    c.get_stats(GetStatsRequest {}).await.expect("stats").into_inner().unit
}

/// Reads `count` fault events (bounded by [`PATIENCE`]) and returns the pages they name,
/// checking that each is one of the rig's faults.
async fn events(watch: &mut tonic::Streaming<FaultEvent>, count: u64) -> Vec<u64> {
    let mut pages = Vec::new();
    while (pages.len() as u64) < count {
        let e = tokio::time::timeout(PATIENCE, watch.message())
            .await
            .unwrap_or_else(|_| panic!("{} of {count} fault events arrived", pages.len()))
            .expect("stream")
            .expect("event");
        assert_eq!((e.reason, e.source_id, e.write, e.address_type, e.pasid), (NO_READ, SID, false, 0, None));
        pages.push((e.address - BASE) >> 12);
    }
    pages
}

/// Checks the accounting once every DMA was answered (so every fault was logged): each
/// fault was recorded or overflowed, each recorded one reaches the watcher once, in order.
/// Returns (recorded, overflowed).
async fn account(c: &mut ControlClient<Channel>, watch: &mut tonic::Streaming<FaultEvent>) -> (u64, u64) {
    let s = unit_stats(c).await;
    let (recorded, overflowed) = (s["faults_recorded"], s["faults_overflowed"]);
    assert_eq!(recorded + overflowed, FAULTS, "a fault neither recorded nor counted as lost");
    let pages = events(watch, recorded).await;
    assert!(pages.windows(2).all(|w| w[0] < w[1]), "each fault once, oldest first");
    assert!(pages.iter().all(|p| *p < FAULTS));
    (recorded, overflowed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_faults_in_a_row_reach_the_watcher() {
    let (server, mut c, mut link, mut watch) = rig().await;
    // One DMA per round trip, as a device retrying one buffer would: the fault pump runs
    // between them.
    for n in 0..FAULTS {
        link.send(LinkUp { dma: vec![read(n)], ..Default::default() }).await;
        completions(&mut link, 1).await;
    }
    let (recorded, overflowed) = account(&mut c, &mut watch).await;
    eprintln!("paced: {recorded} faults streamed, {overflowed} overflowed");
    // Before the driver serviced the registers, the 9th fault onward overflowed for the
    // life of the server: 8 events.
    assert!(recorded > 8, "{recorded} events: the watcher went silent");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_that_overruns_the_registers_is_counted_and_the_stream_goes_on() {
    let (server, mut c, mut link, mut watch) = rig().await;
    // A thousand faults in one link message arrive faster than any handler can service 8
    // registers: most overflow, as on hardware.
    link.send(LinkUp { dma: (0..FAULTS).map(read).collect(), ..Default::default() }).await;
    completions(&mut link, FAULTS).await;
    let (recorded, overflowed) = account(&mut c, &mut watch).await;
    eprintln!("burst: {recorded} faults streamed, {overflowed} overflowed");
    assert!(overflowed > 0, "a thousand faults in one message cannot all fit in 8 registers");
    // The driver cleared PFO: the next fault is recorded and streamed.
    link.send(LinkUp { dma: vec![read(FAULTS)], ..Default::default() }).await;
    completions(&mut link, 1).await;
    assert_eq!(events(&mut watch, 1).await, [FAULTS]);
    let s = unit_stats(&mut c).await;
    assert_eq!((s["faults_recorded"], s["faults_overflowed"]), (recorded + 1, overflowed));
    server.stop().await;
}
