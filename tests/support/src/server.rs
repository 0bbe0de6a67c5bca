//! A dmar server booted in process on loopback, as `dmar-server` runs it, and stopped the
//! way its signal handler stops it (the shutdown token).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use dmar_proto::v1::control_client::ControlClient;
use dmar_server::service::{Listeners, ServerConfig, serve_with_health};
use dmar_vtd::unit::UnitConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{PATIENCE, http_get, sample};

/// The configuration most tests boot: 1 GiB of host memory, device-TLB invalidations timing
/// out after `device_tlb_timeout`, everything else the server's default.
pub fn config(device_tlb_timeout: Duration) -> ServerConfig {
    ServerConfig {
        memory_size: 1 << 30,
        unit: UnitConfig::default().with_device_tlb_timeout(device_tlb_timeout),
        ..ServerConfig::default()
    }
}

/// How to boot a [`Server`]: its configuration, and which listeners beside gRPC.
#[derive(Debug)]
pub struct Boot {
    config: ServerConfig,
    addr: SocketAddr,
    metrics: bool,
    health: bool,
}

impl Boot {
    /// `config` on a fresh loopback port, with no `/metrics` listener and no health port.
    pub fn new(config: ServerConfig) -> Self {
        Self { config, addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), metrics: false, health: false }
    }

    /// Serves gRPC on `addr` (to restart a server on the port it had).
    pub fn on(self, addr: SocketAddr) -> Self {
        Self { addr, ..self }
    }

    /// Adds a `/metrics` listener on a fresh port. It installs the process-wide recorder,
    /// which every server of the process then shares.
    pub fn with_metrics(self) -> Self {
        Self { metrics: true, ..self }
    }

    /// Adds the plaintext health port on a fresh port.
    pub fn with_health(self) -> Self {
        Self { health: true, ..self }
    }

    /// Binds the listeners and spawns the server; it serves until [`Server::stop`].
    pub async fn start(self) -> Server {
        let grpc = TcpListener::bind(self.addr).await.expect("bind");
        let metrics = if self.metrics { Some(fresh_port().await) } else { None };
        let health = if self.health { Some(fresh_port().await) } else { None };
        let addr = grpc.local_addr().expect("addr");
        let metrics_addr = metrics.as_ref().map(|l| l.local_addr().expect("addr"));
        let health_addr = health.as_ref().map(|l| l.local_addr().expect("addr"));
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        let config = self.config;
        let task = tokio::spawn(async move {
            serve_with_health(config, Listeners { grpc, metrics }, health, s).await.expect("serve");
        });
        Server { addr, metrics: metrics_addr, health: health_addr, shutdown, task }
    }
}

async fn fresh_port() -> TcpListener {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind")
}

/// A running server and where it listens.
#[derive(Debug)]
pub struct Server {
    /// The gRPC port: Control, the ATS link, health, reflection.
    pub addr: SocketAddr,
    metrics: Option<SocketAddr>,
    health: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Boots `config` with gRPC only (see [`Boot`] for more).
    pub async fn boot(config: ServerConfig) -> Server {
        Boot::new(config).start().await
    }

    /// A plaintext Control client.
    pub async fn control(&self) -> ControlClient<Channel> {
        ControlClient::connect(self.url()).await.expect("connect")
    }

    /// The gRPC port as a plaintext URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `/metrics` listener's address; the server must have been booted
    /// [`Boot::with_metrics`].
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics.expect("booted with a /metrics listener")
    }

    /// The plaintext health port's address; the server must have been booted
    /// [`Boot::with_health`].
    pub fn health_addr(&self) -> SocketAddr {
        self.health.expect("booted with a health port")
    }

    /// The value of the `/metrics` line that starts with `line_start` (a series with its
    /// labels and the space before the value).
    pub async fn metric(&self, line_start: &str) -> f64 {
        let body = http_get(self.metrics_addr(), "/metrics").await;
        sample(&body, line_start).unwrap_or_else(|| panic!("{line_start} missing from /metrics"))
    }

    /// Shuts the server down and waits (bounded by [`PATIENCE`]) until it has drained.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task).await.expect("server stops").expect("join");
    }
}
