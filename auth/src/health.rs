//! A health-only plaintext port: `grpc.health.v1` and nothing else, for container probes
//! that cannot do TLS (`deploy/healthcheck` speaks cleartext HTTP/2 only). The server and
//! the agent each serve one beside their TLS port when given `--health-listen`.
//!
//! This module owns serving such a port the same way in both: the plaintext accept loop's
//! bounds ([`crate::plaintext_with`]: the first-bytes time-out, at most so many peers
//! waiting, refusals counted), the health service as the only route, and stopping on
//! shutdown. It does not decide the statuses: the owner's `HealthReporter` does, and the
//! port answers whatever the owner's other ports answer.

use std::future::Future;

use tokio::net::TcpListener;
use tonic_health::pb::health_server::{Health, HealthServer};

use crate::accept::{AcceptConfig, ConnectionRefusals, plaintext_with};

/// Serves `health` alone on `listener` in plaintext until `shutdown` completes. A
/// transport failure is logged, not returned: the probe port going away must not take the
/// process with it (the probe then reports the process unhealthy).
pub async fn serve_health_only<H: Health>(
    listener: TcpListener,
    health: HealthServer<H>,
    config: AcceptConfig,
    refusals: ConnectionRefusals,
    shutdown: impl Future<Output = ()> + Send,
) {
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "health-only plaintext port serving");
    let served = tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_incoming_shutdown(plaintext_with(listener, config, refusals), shutdown)
        .await;
    if let Err(e) = served {
        tracing::warn!(?addr, error = %e, "health port stopped");
    }
}
