//! The server over real gRPC on 127.0.0.1:0: the Control service and the ATS link driven
//! by real clients, including the strict-unmap chain through a link that must complete
//! its invalidation, a link that never answers (ITE), and bad requests.

use std::net::SocketAddr;
use std::time::Duration;

use dmar_proto::v1::ats_link_client::AtsLinkClient;
use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::*;
use dmar_server::service::{Listeners, ServerConfig, serve};
use dmar_vtd::unit::UnitConfig;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

struct Booted {
    addr: SocketAddr,
    metrics: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Booted {
    async fn control(&self) -> ControlClient<Channel> {
        ControlClient::connect(format!("http://{}", self.addr)).await.expect("connect")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("stops").expect("join");
    }
}

async fn boot(timeout: Duration) -> Booted {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = grpc.local_addr().expect("addr");
    let metrics_addr = metrics.local_addr().expect("addr");
    let config = ServerConfig {
        memory_size: 1 << 30,
        unit: UnitConfig::default().with_device_tlb_timeout(timeout),
        ..ServerConfig::default()
    };
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    let task = tokio::spawn(async move {
        serve(config, Listeners { grpc, metrics: Some(metrics) }, s).await.expect("serve");
    });
    Booted { addr, metrics: metrics_addr, shutdown, task }
}

/// An agent's end of a link: send batches, receive what the server pushes.
struct Link {
    tx: mpsc::Sender<LinkUp>,
    rx: tonic::Streaming<LinkDown>,
}

impl Link {
    async fn open(addr: SocketAddr, sids: &[u32]) -> Result<Link, tonic::Status> {
        let mut client = AtsLinkClient::connect(format!("http://{addr}")).await.expect("connect");
        let (tx, rx) = mpsc::channel(16);
        let functions = sids
            .iter()
            .map(|s| Function { source_id: *s, invalidate_queue_depth: 8, page_request_capacity: 4 })
            .collect();
        tx.send(LinkUp { bind: Some(Bind { functions, agent: "test".into() }), ..Default::default() })
            .await
            .expect("send");
        let mut rx = client.open(ReceiverStream::new(rx)).await?.into_inner();
        let first = rx.message().await?.expect("bound");
        assert!(first.bound.is_some());
        Ok(Link { tx, rx })
    }

    async fn send(&self, m: LinkUp) {
        self.tx.send(m).await.expect("send");
    }

    async fn next(&mut self) -> LinkDown {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("in time")
            .expect("ok")
            .expect("message")
    }

    async fn translate(&mut self, sid: u32, address: u64) -> TranslationCompletion {
        self.send(LinkUp {
            translations: vec![TranslationRequest { tag: address, source_id: sid, address, no_write: false }],
            ..Default::default()
        })
        .await;
        loop {
            let m = self.next().await;
            if let Some(c) = m.completions.into_iter().next() {
                return c;
            }
        }
    }
}

const SID: u32 = 0x0108; // 01:01.0

async fn paging_domain_with(c: &mut ControlClient<Channel>, sid: u32) -> u32 {
    let did = c
        .create_domain(CreateDomainRequest { kind: DomainKind::Paging as i32, address_width: 48 })
        .await
        .expect("domain")
        .into_inner()
        .domain_id;
    c.attach(AttachRequest { source_id: sid, domain_id: did, ats: true }).await.expect("attach");
    did
}

fn rw() -> Option<Permissions> {
    Some(Permissions { read: true, write: true })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_translate_over_the_link_and_strict_unmap_waits_for_the_device() {
    let server = boot(Duration::from_secs(5)).await;
    let mut c = server.control().await;
    let did = paging_domain_with(&mut c, SID).await;
    c.map(MapRequest {
        domain_id: did,
        ranges: vec![MapRange { iova: 0x10_0000, hpa: 0x20_0000, length: 0x1000, permissions: rw() }],
    })
    .await
    .expect("map");
    let mut link = Link::open(server.addr, &[SID]).await.expect("link");
    let done = link.translate(SID, 0x10_0123).await;
    assert_eq!(done.status, CompletionStatus::Success as i32);
    let e = done.entry.expect("entry");
    assert_eq!((e.translated_address, e.size_shift, e.read, e.write), (0x20_0000, 12, true, true));

    // Strict unmap: the link receives the invalidation and must complete it.
    let mut c2 = c.clone();
    let unmap = tokio::spawn(async move {
        c2.unmap(UnmapRequest {
            domain_id: did,
            ranges: vec![UnmapRange { iova: 0x10_0000, length: 0x1000 }],
            policy: FlushPolicy::Strict as i32,
        })
        .await
    });
    let inv = loop {
        let m = link.next().await;
        if let Some(i) = m.invalidations.into_iter().next() {
            break i;
        }
    };
    assert_eq!(inv.source_id, SID);
    assert_eq!(inv.address & !0xfff, 0x10_0000);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!unmap.is_finished(), "the unmap waits for the device's completion");
    link.send(LinkUp {
        invalidation_completions: vec![InvalidationCompletion { source_id: SID, itag: inv.itag }],
        ..Default::default()
    })
    .await;
    let r = unmap.await.expect("join").expect("unmap");
    assert_eq!(r.into_inner().unmapped_bytes, 0x1000);
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
    let did = paging_domain_with(&mut c, SID).await;
    let did2 = paging_domain_with(&mut c, other).await;
    for d in [did, did2] {
        c.map(MapRequest {
            domain_id: d,
            ranges: vec![MapRange { iova: 0, hpa: 0x40_0000, length: 0x2000, permissions: rw() }],
        })
        .await
        .expect("map");
    }
    let _silent = Link::open(server.addr, &[SID]).await.expect("link");
    let mut healthy = Link::open(server.addr, &[other]).await.expect("link");
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
    let unmap = tokio::spawn(async move {
        c2.unmap(UnmapRequest { domain_id: did2, ranges: vec![UnmapRange { iova: 0, length: 0x1000 }], policy: 1 })
            .await
    });
    let inv = loop {
        if let Some(i) = healthy.next().await.invalidations.into_iter().next() {
            break i;
        }
    };
    healthy
        .send(LinkUp {
            invalidation_completions: vec![InvalidationCompletion { source_id: other, itag: inv.itag }],
            ..Default::default()
        })
        .await;
    unmap.await.expect("join").expect("unmap");
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
    let did = paging_domain_with(&mut c, SID).await;
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
    let bad_desc =
        SubmitInvalidationsRequest { descriptors: vec![Descriptor { qw0: 0x2 | (1 << 4) | (1 << 8), qw1: 0 }] };
    assert_eq!(code(c.submit_invalidations(bad_desc).await.map(|_| tonic::Response::new(()))), Code::InvalidArgument);
    // The queue recovered: a good descriptor goes through.
    let good = SubmitInvalidationsRequest { descriptors: vec![Descriptor { qw0: 0x2 | (1 << 4), qw1: 0 }] };
    c.submit_invalidations(good).await.expect("good descriptor");
    assert_eq!(
        code(c.read_register(ReadRegisterRequest { offset: 0x1000, width: 4 }).await.map(|_| tonic::Response::new(()))),
        Code::InvalidArgument
    );
    // Links: double bind and unbound requester ids.
    let mut link = Link::open(server.addr, &[SID]).await.expect("link");
    let again = Link::open(server.addr, &[SID]).await.err().expect("refused");
    assert_eq!(again.code(), Code::AlreadyExists);
    link.send(LinkUp {
        translations: vec![TranslationRequest { tag: 1, source_id: 0x0200, address: 0, no_write: true }],
        ..Default::default()
    })
    .await;
    let err = loop {
        match link.rx.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("closed without a status"),
            Err(s) => break s,
        }
    };
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("not bound"), "{}", err.message());
    // The server is still healthy and the requester id is free again once the link closed.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(Link::open(server.addr, &[SID]).await.is_ok());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_exposes_every_metric() {
    let server = boot(Duration::from_secs(1)).await;
    let mut c = server.control().await;
    let did = paging_domain_with(&mut c, SID).await;
    c.map(MapRequest {
        domain_id: did,
        ranges: vec![MapRange { iova: 0, hpa: 0x80_0000, length: 0x1000, permissions: rw() }],
    })
    .await
    .expect("map");
    let mut link = Link::open(server.addr, &[SID]).await.expect("link");
    link.translate(SID, 0).await;
    let body = http_get(server.metrics, "/metrics").await;
    for name in dmar_server::service::metrics::METRIC_NAMES {
        assert!(body.contains(name), "{name} missing from /metrics");
    }
    // Servers of concurrent tests share the process-wide recorder: check shape, not value.
    assert!(body.lines().any(|l| l.starts_with("dmar_link_messages_total{kind=\"translation\"}")), "{body}");
    server.stop().await;
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}
