//! Embedded mode: a dmar-server and dmar-agents started in this process on loopback
//! (127.0.0.1:0), so that `dmar-loadgen` with no arguments measures the whole system
//! with nothing else running. They are driven over real gRPC exactly like remote ones.

use std::time::Duration;

use anyhow::Context as _;
use dmar_agent::{AgentConfig, FunctionConfig, Listeners as AgentListeners};
use dmar_server::service::{Listeners, ServerConfig};
use dmar_vtd::SourceId;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running embedded system.
#[derive(Debug)]
pub(crate) struct Embedded {
    /// Server gRPC address.
    pub(crate) server: String,
    /// Agent control addresses.
    pub(crate) agents: Vec<String>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// Requester id of function `f` of agent `a`: bus 0x10 + a, device f, function 0.
pub(crate) fn embedded_sid(agent: u32, function: u32) -> SourceId {
    SourceId::new(0x10 + agent as u8, (function % 32) as u8, 0)
}

impl Embedded {
    /// Starts a server and `agents` agents with `functions_per_agent` ATS functions each.
    /// `pri` gives every function a page request capacity (demand paging needs it; other
    /// scenarios leave it off so that a not-present translation faults at once).
    pub(crate) async fn start(
        agents: u32,
        functions_per_agent: u32,
        atc_capacity: usize,
        pri: bool,
    ) -> anyhow::Result<Embedded> {
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let grpc = TcpListener::bind("127.0.0.1:0").await.context("bind the embedded server")?;
        let server = format!("http://{}", grpc.local_addr()?);
        let s = shutdown.clone();
        let config = ServerConfig { memory_size: 2 << 30, ..ServerConfig::default() };
        tasks.push(tokio::spawn(async move {
            if let Err(e) = dmar_server::service::serve(config, Listeners { grpc, metrics: None }, s).await {
                tracing::error!(error = %e, "embedded server failed");
            }
        }));
        let mut agent_addrs = Vec::new();
        for a in 0..agents {
            let functions = (0..functions_per_agent)
                .map(|f| {
                    let mut fc = FunctionConfig::new(embedded_sid(a, f));
                    fc.atc_capacity = atc_capacity;
                    fc.page_request_capacity = if pri { 16 } else { 0 };
                    fc
                })
                .collect();
            let mut config = AgentConfig::new(server.clone(), functions);
            config.name = format!("embedded-agent-{a}");
            let control = TcpListener::bind("127.0.0.1:0").await.context("bind an embedded agent")?;
            agent_addrs.push(control.local_addr()?.to_string());
            let s = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                let listeners = AgentListeners { control: Some(control), metrics: None };
                if let Err(e) = dmar_agent::run(config, listeners, s).await {
                    tracing::error!(error = %e, "embedded agent failed");
                }
            }));
        }
        Ok(Embedded { server, agents: agent_addrs, shutdown, tasks })
    }

    /// Stops everything and waits (bounded) for it to finish.
    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}
