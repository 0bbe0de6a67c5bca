//! A real dmar server booted in process on 127.0.0.1, the Control calls the tests need,
//! and agents pointed at it.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use dmar_agent::{Agent, AgentConfig, FunctionConfig, LinkState, SourceId};
use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::*;
use dmar_server::service::{Listeners, ServerConfig, serve};
use dmar_vtd::unit::UnitConfig;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// How long a test waits for something that must happen (a bound, never a measurement).
pub const PATIENCE: Duration = Duration::from_secs(20);

pub struct Server {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn control(&self) -> ControlClient<Channel> {
        ControlClient::connect(format!("http://{}", self.addr)).await.expect("connect")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task).await.expect("server stops").expect("join");
    }
}

/// Boots a server on a fresh port; device-TLB invalidations time out after `timeout`.
pub async fn boot(timeout: Duration) -> Server {
    boot_on("127.0.0.1:0".parse().expect("addr"), timeout).await
}

/// Boots a server on `addr` (to restart one on the port it had).
pub async fn boot_on(addr: SocketAddr, timeout: Duration) -> Server {
    let grpc = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let addr = grpc.local_addr().expect("addr");
    let config = ServerConfig {
        memory_size: 1 << 30,
        unit: UnitConfig::default().with_device_tlb_timeout(timeout),
        ..ServerConfig::default()
    };
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    let task = tokio::spawn(async move {
        serve(config, Listeners { grpc, metrics: None }, s).await.expect("serve");
    });
    Server { addr, shutdown, task }
}

/// A paging domain with `sids` attached with ATS.
pub async fn paging_domain(c: &mut ControlClient<Channel>, sids: &[SourceId]) -> u32 {
    let did = c
        .create_domain(CreateDomainRequest { kind: DomainKind::Paging as i32, address_width: 48 })
        .await
        .expect("domain")
        .into_inner()
        .domain_id;
    for sid in sids {
        c.attach(AttachRequest { source_id: u32::from(sid.0), domain_id: did, ats: true }).await.expect("attach");
    }
    did
}

pub async fn map(c: &mut ControlClient<Channel>, did: u32, iova: u64, hpa: u64, length: u64, write: bool) {
    c.map(MapRequest {
        domain_id: did,
        ranges: vec![MapRange { iova, hpa, length, permissions: Some(Permissions { read: true, write }) }],
    })
    .await
    .expect("map");
}

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

/// An agent configuration for `server` with quick reconnection.
pub fn agent_config(server: &Server, functions: Vec<FunctionConfig>) -> AgentConfig {
    AgentConfig {
        name: "test-agent".into(),
        reconnect_initial: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
        ..AgentConfig::new(server.url(), functions)
    }
}

pub fn sid(s: &str) -> SourceId {
    s.parse().expect("requester id")
}

/// Starts an agent and waits for its link to be bound.
pub async fn start_agent(config: AgentConfig) -> (Agent, CancellationToken) {
    let shutdown = CancellationToken::new();
    let agent = Agent::start(config, shutdown.clone()).expect("agent");
    connected_after(&agent, 0).await;
    (agent, shutdown)
}

/// Waits until the link is bound with a generation above `generation`.
pub async fn connected_after(agent: &Agent, generation: u64) -> LinkState {
    tokio::time::timeout(PATIENCE, agent.wait_for_link(|s| s.connected && s.generation > generation))
        .await
        .expect("the link binds in time")
        .expect("agent running")
}

pub async fn stop_agent(agent: Agent, shutdown: CancellationToken) {
    shutdown.cancel();
    agent.stopped().await;
}

/// Polls `check` until it holds (bounded by [`PATIENCE`]).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One plain HTTP/1.1 GET (the `/metrics` listeners speak nothing else); the whole answer,
/// head included.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}
