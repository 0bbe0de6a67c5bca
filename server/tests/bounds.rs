//! What one peer can make the server do, over real gRPC on 127.0.0.1:0: reply bytes held
//! for a link that does not read, outbound message sizes, page requests past a function's
//! capacity, log volume and peer text in the log, page group responses without a request,
//! and a raw descriptor the unit refuses.
//!
//! The tests share the process (its RSS, its log subscriber, its metrics recorder), so
//! they run one at a time.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::*;
use dmar_server::service::ServerConfig;
use dmar_test_support::{Boot, Link, Server, attach, create_domain, function, paging_domain};
use tonic::Code;
use tonic::transport::Channel;

/// One test at a time: they measure the process.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Emulated memory: small, so that its pages do not blur the RSS measurement.
const MEMORY: u64 = 64 << 20;
const SID: u32 = 0x0108; // 01:01.0
/// The largest DMA read the link allows, and the most items per link message.
const DMA_BYTES: u32 = 64 << 10;
const ITEMS: usize = 4096;

// ---- the log, captured ----

/// Log bytes written since the process started.
static LOG_BYTES: AtomicUsize = AtomicUsize::new(0);
/// The log's first bytes, kept to look for forged lines.
static LOG_TEXT: Mutex<Vec<u8>> = Mutex::new(Vec::new());
const LOG_KEPT: usize = 16 << 20;

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG_BYTES.fetch_add(buf.len(), Ordering::Relaxed);
        let mut kept = LOG_TEXT.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() + buf.len() <= LOG_KEPT {
            kept.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures the process's log at the servers' default level.
fn capture_log() {
    static INIT: Once = Once::new();
    INIT.call_once(|| assert!(dmar_process::init_tracing_to("info", || Capture), "subscriber installed"));
}

fn log_text() -> String {
    String::from_utf8_lossy(&LOG_TEXT.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

// ---- the server and a raw link ----

/// A server on small memory with a `/metrics` listener, logging into the capture.
async fn boot() -> Server {
    capture_log();
    Boot::new(ServerConfig { memory_size: MEMORY, ..ServerConfig::default() }).with_metrics().start().await
}

/// A link binding `SID` as `agent`, with room for `capacity` outstanding page requests, and
/// tonic's default limits (4 MiB decode).
async fn open(server: &Server, agent: &str, capacity: u32) -> Result<Link, tonic::Status> {
    Link::open(server.addr, agent, vec![Function { page_request_capacity: capacity, ..function(SID) }]).await
}

/// Attaches `SID` to a pass-through domain (DMA reads host memory as is).
async fn pass_through(c: &mut ControlClient<Channel>) {
    let did = create_domain(c, DomainKind::Identity).await;
    attach(c, did, SID, false).await;
}

/// Attaches `SID` with ATS (and so PRI) to a paging domain.
async fn with_pri(c: &mut ControlClient<Channel>) {
    paging_domain(c, &[SID]).await;
}

/// One link message of the most DMA reads of the most bytes: 256 MiB of replies.
fn big_reads(first_tag: u64) -> LinkUp {
    let dma = (0..ITEMS as u64)
        .map(|i| DmaRequest {
            tag: first_tag + i,
            source_id: SID,
            translated: false,
            address: 0x10_0000,
            write: false,
            length: DMA_BYTES,
            data: Vec::new(),
        })
        .collect();
    LinkUp { dma, ..Default::default() }
}

/// `n` one-request page groups, their indexes going round `groups`.
fn page_requests(n: usize, groups: std::ops::Range<u32>) -> LinkUp {
    let page_requests = (0..n)
        .map(|i| PageRequest {
            source_id: SID,
            address: (i as u64) << 12,
            read: true,
            write: false,
            group_index: groups.start + (i as u32 % groups.len() as u32),
            last: true,
        })
        .collect();
    LinkUp { page_requests, ..Default::default() }
}

/// This process's resident set in bytes (`VmRSS`).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb << 10
}

// ---- the tests ----

/// The bound on what a link that never reads makes the server hold: its reply budget
/// (16 MiB) plus transport buffers, far below this.
const RSS_GROWTH_BOUND: u64 = 256 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_does_not_read_costs_only_its_reply_budget() {
    let _serial = SERIAL.lock().await;
    let server = boot().await;
    let mut c = server.control().await;
    pass_through(&mut c).await;
    let link = open(&server, "silent", 0).await.expect("link");
    let before = rss_bytes();
    // 1 GiB of replies asked for; none read.
    for m in 0..4u64 {
        link.send(big_reads(m * ITEMS as u64)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let grown = rss_bytes().saturating_sub(before);
    assert!(grown < RSS_GROWTH_BOUND, "RSS grew by {} MiB", grown >> 20);
    // The server still serves everyone else.
    let stats = tokio::time::timeout(Duration::from_secs(5), c.get_stats(GetStatsRequest {}))
        .await
        .expect("Control answers in time")
        .expect("stats")
        .into_inner();
    assert_eq!(stats.live_links, 1);
    assert!(server.metric("dmar_link_reply_budget_waits_total ").await >= 1.0);
    drop(link);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_too_big_for_one_message_are_split_for_a_default_client() {
    let _serial = SERIAL.lock().await;
    let server = boot().await;
    let mut c = server.control().await;
    pass_through(&mut c).await;
    c.write_memory(WriteMemoryRequest {
        address: 0x10_0000,
        data: vec![0xa5; DMA_BYTES as usize],
        ..Default::default()
    })
    .await
    .expect("write");
    let mut link = open(&server, "reader", 0).await.expect("link");
    link.send(big_reads(0)).await;
    let (mut tags, mut messages) = (Vec::new(), 0);
    while tags.len() < ITEMS {
        // `next` fails if a message is over the client's 4 MiB decode limit.
        let m = link.next().await;
        messages += 1;
        for d in m.dma {
            assert!(d.ok, "read {} faulted: {}", d.tag, d.fault_reason);
            assert_eq!(d.data.len(), DMA_BYTES as usize);
            assert!(d.data.iter().all(|b| *b == 0xa5));
            tags.push(d.tag);
        }
    }
    assert_eq!(tags, (0..ITEMS as u64).collect::<Vec<_>>(), "in request order");
    assert!(messages >= 64, "256 MiB in {messages} messages");
    server.stop().await;
}

/// What a flood of page requests past capacity may write to the log.
const LOG_FLOOD_BOUND: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_requests_past_capacity_are_refused_counted_and_logged_once_a_second() {
    let _serial = SERIAL.lock().await;
    let server = boot().await;
    let mut c = server.control().await;
    with_pri(&mut c).await;
    let link = open(&server, "flooder", 4).await.expect("link");
    let refused_before = server.metric("dmar_server_refusals_total{reason=\"page_request_capacity\"} ").await;
    let log_before = LOG_BYTES.load(Ordering::Relaxed);
    // The capacity, outstanding (nobody answers them) ...
    link.send(page_requests(4, 0..4)).await;
    // ... then 40960 more one-request groups, replies never read. (A refusal answers its
    // group with Response Failure, so these use other group indexes.)
    let messages = 10;
    for _ in 0..messages {
        link.send(page_requests(ITEMS, 4..512)).await;
    }
    let want = (messages * ITEMS) as f64;
    let mut refused = 0.0;
    for _ in 0..100 {
        refused = server.metric("dmar_server_refusals_total{reason=\"page_request_capacity\"} ").await - refused_before;
        if refused >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(refused, want, "every request past the capacity is counted");
    let logged = LOG_BYTES.load(Ordering::Relaxed) - log_before;
    assert!(logged < LOG_FLOOD_BOUND, "{logged} bytes of log");
    assert!(log_text().contains("page request past the function's capacity refused"));
    drop(link);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_agent_name_with_a_newline_cannot_forge_or_flood_the_log() {
    let _serial = SERIAL.lock().await;
    let server = boot().await;
    let name = format!("evil\nINFO forged: line{}", "x".repeat(3 << 20));
    let log_before = LOG_BYTES.load(Ordering::Relaxed);
    let link = open(&server, &name, 0).await.expect("bound: the name is only logged");
    drop(link);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logged = LOG_BYTES.load(Ordering::Relaxed) - log_before;
    assert!(logged < 4096, "{logged} bytes of log");
    let log = log_text();
    assert!(log.contains("evil\\nINFO forged: line"), "escaped in the log");
    assert!(!log.lines().any(|l| l.starts_with("INFO forged")), "no forged line");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_group_response_needs_an_outstanding_group() {
    let _serial = SERIAL.lock().await;
    let server = boot().await;
    let mut c = server.control().await;
    with_pri(&mut c).await;
    let respond =
        |group_index| RespondPageRequestRequest { source_id: SID, group_index, code: PageResponseCode::Success as i32 };
    let err = c.respond_page_request(respond(5)).await.expect_err("nothing outstanding");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("not outstanding"), "{}", err.message());
    let mut events = c.watch_page_requests(WatchRequest {}).await.expect("watch").into_inner();
    let mut link = open(&server, "pri", 4).await.expect("link");
    link.send(LinkUp {
        page_requests: vec![PageRequest {
            source_id: SID,
            address: 0x5000,
            read: true,
            write: false,
            group_index: 5,
            last: true,
        }],
        ..Default::default()
    })
    .await;
    let event = tokio::time::timeout(Duration::from_secs(5), events.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("event");
    assert_eq!((event.source_id, event.group_index), (SID, 5));
    // Another group, another requester id: still refused.
    assert_eq!(
        c.respond_page_request(respond(6)).await.map(|_| ()).map_err(|s| s.code()),
        Err(Code::FailedPrecondition)
    );
    let other = RespondPageRequestRequest { source_id: SID + 1, ..respond(5) };
    assert_eq!(c.respond_page_request(other).await.map(|_| ()).map_err(|s| s.code()), Err(Code::FailedPrecondition));
    c.respond_page_request(respond(5)).await.expect("outstanding");
    let response = loop {
        if let Some(r) = link.next().await.page_responses.into_iter().next() {
            break r;
        }
    };
    assert_eq!((response.group_index, response.code), (5, PageResponseCode::Success as i32));
    // Answered: a second response is refused.
    let err = c.respond_page_request(respond(5)).await.expect_err("answered already");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(server.metric("dmar_server_refusals_total{reason=\"page_group_not_outstanding\"} ").await >= 4.0);
    // Open streams hold the server's graceful shutdown.
    drop((events, link));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_descriptor_the_unit_cannot_write_is_the_clients_error() {
    let _serial = SERIAL.lock().await;
    let server = boot().await;
    let mut c = server.control().await;
    // Wait descriptor (type 5) with SW and FN, status data 7, status address beyond memory.
    let wait = |status_addr| Descriptor { qw0: 5 | (1 << 5) | (1 << 6) | (7 << 32), qw1: status_addr };
    let err = c
        .submit_invalidations(SubmitInvalidationsRequest {
            descriptors: vec![wait(MEMORY + 0x1000)],
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("invalid invalidation descriptor"), "{}", err.message());
    assert!(server.metric("dmar_server_refusals_total{reason=\"invalid_descriptor\"} ").await >= 1.0);
    // The queue runs on.
    c.submit_invalidations(SubmitInvalidationsRequest { descriptors: vec![wait(0x1000)], ..Default::default() })
        .await
        .expect("good wait");
    let status = c.read_memory(ReadMemoryRequest { address: 0x1000, length: 4 }).await.expect("read").into_inner();
    assert_eq!(status.data, 7u32.to_le_bytes());
    server.stop().await;
}
