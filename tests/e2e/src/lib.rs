//! End-to-end tests of dmar: real servers and real agents on loopback, exercised together.
//! The tests are in `tests/`; this library is what they share.
//!
//! The server side is `dmar-test-support`'s (a real dmar server booted in process on
//! 127.0.0.1, and the Control calls tests repeat), re-exported here; this adds agents
//! pointed at it. A test file starts with `use dmar_e2e::*;`.

use std::net::SocketAddr;
use std::time::Duration;

use dmar_agent::{Agent, AgentConfig, FunctionConfig, LinkState, Listeners, SourceId};
use dmar_proto::v1::GetAgentInfoRequest;
use dmar_proto::v1::agent_control_client::AgentControlClient;
use dmar_test_support::{Boot, config};
pub use dmar_test_support::{
    PATIENCE, Server, eventually, http_get, map, paging_domain, sample, strict_unmap, tls_channel,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Boots a server on a fresh port; device-TLB invalidations time out after `timeout`.
pub async fn boot(timeout: Duration) -> Server {
    Server::boot(config(timeout)).await
}

/// Boots a server on `addr` (to restart one on the port it had).
pub async fn boot_on(addr: SocketAddr, timeout: Duration) -> Server {
    Boot::new(config(timeout)).on(addr).start().await
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

/// A requester id written `bb:dd.f`.
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

/// Stops an agent and waits until its tasks have ended.
pub async fn stop_agent(agent: Agent, shutdown: CancellationToken) {
    shutdown.cancel();
    agent.stopped().await;
}

/// An agent as its binary runs it (`dmar_agent::run`), serving its control port and
/// `/metrics` on loopback ports.
#[derive(Debug)]
pub struct RunningAgent {
    /// The AgentControl port (plaintext unless the configuration asks for TLS).
    pub control: SocketAddr,
    /// The `/metrics` listener.
    pub metrics: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningAgent {
    /// Binds the ports and runs `config` until [`RunningAgent::stop`].
    pub async fn start(config: AgentConfig) -> RunningAgent {
        let control = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (c, m) = (control.local_addr().expect("addr"), metrics.local_addr().expect("addr"));
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        let task = tokio::spawn(async move {
            dmar_agent::run(config, Listeners { control: Some(control), metrics: Some(metrics) }, s)
                .await
                .expect("run");
        });
        RunningAgent { control: c, metrics: m, shutdown, task }
    }

    /// A plaintext AgentControl client.
    pub async fn client(&self) -> AgentControlClient<Channel> {
        AgentControlClient::connect(format!("http://{}", self.control)).await.expect("connect")
    }

    /// Waits until the agent reports its link bound (over a plaintext control port).
    pub async fn connected(&self) {
        let client = self.client().await;
        eventually("the agent's link is bound", || {
            let mut client = client.clone();
            async move { client.get_agent_info(GetAgentInfoRequest {}).await.expect("info").into_inner().connected }
        })
        .await;
    }

    /// Shuts the agent down and waits (bounded by [`PATIENCE`]) until it has stopped.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task).await.expect("agent stops").expect("join");
    }
}
