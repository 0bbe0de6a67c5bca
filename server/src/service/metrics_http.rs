//! A minimal HTTP/1.1 endpoint serving `GET /metrics` from the Prometheus handle.
//!
//! The exporter's own listener cannot be handed a pre-bound socket, which tests need
//! (`127.0.0.1:0`), so the server serves the rendered text itself. One request per
//! connection, bounded request size, nothing else.

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::State;

/// Serves until `shutdown` fires. `before_render` refreshes the gauges copied from the
/// unit.
pub(crate) async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    state: std::sync::Arc<State>,
    shutdown: CancellationToken,
) {
    loop {
        let (conn, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handle = handle.clone();
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = respond(conn, &handle, &state).await {
                tracing::debug!(error = %e, "metrics request failed");
            }
        });
    }
}

async fn respond(mut conn: TcpStream, handle: &PrometheusHandle, state: &State) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    // Read the request head (bounded), with a deadline.
    let head = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let m = conn.read(&mut buf[n..]).await?;
            if m == 0 {
                break;
            }
            n += m;
            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") || n == buf.len() {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if head.is_err() {
        return Ok(());
    }
    let request = String::from_utf8_lossy(&buf[..n]);
    let (status, ctype, body) = if request.starts_with("GET /metrics ") || request.starts_with("GET /metrics?") {
        state.metrics.refresh(&state.unit.stats());
        ("200 OK", "text/plain; version=0.0.4", handle.render())
    } else if request.starts_with("GET / ") || request.starts_with("GET /healthz ") {
        ("200 OK", "text/plain", "dmar-server\n".to_owned())
    } else {
        ("404 Not Found", "text/plain", "not found\n".to_owned())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}
