//! The agent's `/metrics` endpoint: its own Prometheus registry served through the shared
//! [`process::serve_metrics`], plus the registry's upkeep so histogram samples never pile
//! up between scrapes.

use std::sync::Arc;
use std::time::Duration;

use dmar_process as process;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics;

/// Serves until `shutdown`, running the registry's upkeep every 5 s.
pub(crate) async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    let upkeep = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                () = upkeep.cancelled() => return,
                _ = tick.tick() => metrics::upkeep(),
            }
        }
    });
    let render: process::Render = Arc::new(|| metrics::prometheus().render());
    process::serve_metrics(listener, "dmar-agent", render, shutdown).await;
}
