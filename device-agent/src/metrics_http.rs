//! A minimal HTTP/1.1 endpoint serving `GET /metrics` from the agent's Prometheus registry.
//!
//! The exporter's own listener cannot take a pre-bound socket, which tests need
//! (`127.0.0.1:0`), so the agent serves the rendered text itself: one request per
//! connection, a bounded request head, nothing else. It also runs the registry's upkeep so
//! histogram samples never pile up between scrapes.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::metrics;

/// Serves until `shutdown`.
pub(crate) async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    let mut upkeep = tokio::time::interval(Duration::from_secs(5));
    loop {
        let (conn, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = upkeep.tick() => {
                metrics::upkeep();
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tokio::spawn(async move {
            if let Err(e) = respond(conn).await {
                tracing::debug!(error = %e, "metrics request failed");
            }
        });
    }
}

async fn respond(mut conn: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
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
        ("200 OK", "text/plain; version=0.0.4", metrics::prometheus().render())
    } else if request.starts_with("GET / ") || request.starts_with("GET /healthz ") {
        ("200 OK", "text/plain", "dmar-agent\n".to_owned())
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
