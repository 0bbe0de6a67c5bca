//! A minimal HTTP/1.1 endpoint for Prometheus `/metrics`.
//!
//! The metrics exporter's own listener cannot take a pre-bound socket, which tests need
//! (`127.0.0.1:0`), so the processes serve the rendered text themselves: one request per
//! connection, a bounded request head read under a deadline, `GET /metrics`, `GET /` and
//! `GET /healthz`, nothing else (404). What the text contains is the caller's
//! [`Render`]; this module owns only the HTTP around it.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Produces the `/metrics` body on each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// How long a client may take to send its request head: a connection that never
/// finishes one must not hold a task forever.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest request head read; the request line is all that matters.
const HEAD_LIMIT: usize = 8192;

/// Serves `/metrics` (the text `render` returns) until `shutdown`. `name` answers `/` and
/// `/healthz`.
pub async fn serve_metrics(listener: TcpListener, name: &'static str, render: Render, shutdown: CancellationToken) {
    serve(listener, name, render, shutdown, HEAD_TIMEOUT).await;
}

async fn serve(
    listener: TcpListener,
    name: &'static str,
    render: Render,
    shutdown: CancellationToken,
    head_timeout: Duration,
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
        let render = render.clone();
        tokio::spawn(async move {
            if let Err(e) = respond(conn, name, &render, head_timeout).await {
                tracing::debug!(error = %e, "metrics request failed");
            }
        });
    }
}

async fn respond(mut conn: TcpStream, name: &str, render: &Render, head_timeout: Duration) -> std::io::Result<()> {
    let mut buf = vec![0u8; HEAD_LIMIT];
    let mut n = 0;
    let head = tokio::time::timeout(head_timeout, async {
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
        return Ok(()); // too slow: close without an answer
    }
    let request = String::from_utf8_lossy(&buf[..n]);
    let (status, ctype, body) = if request.starts_with("GET /metrics ") || request.starts_with("GET /metrics?") {
        ("200 OK", "text/plain; version=0.0.4", render())
    } else if request.starts_with("GET / ") || request.starts_with("GET /healthz ") {
        ("200 OK", "text/plain", format!("{name}\n"))
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    /// A responder on 127.0.0.1:0 rendering a fixed text; returns its address and the
    /// token that stops it.
    async fn start(head_timeout: Duration) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let render: Render = Arc::new(|| "# TYPE dmar_test_total counter\ndmar_test_total 7\n".to_owned());
        let task = tokio::spawn(serve(listener, "dmar-test", render, shutdown.clone(), head_timeout));
        (addr, shutdown, task)
    }

    /// Sends `request` and reads the whole answer (the server closes the connection).
    async fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(request.as_bytes()).await.expect("write");
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut answer))
            .await
            .expect("answered")
            .expect("read");
        answer
    }

    #[tokio::test]
    async fn metrics_root_and_unknown_paths() {
        let (addr, shutdown, task) = start(HEAD_TIMEOUT).await;
        let metrics = exchange(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let body = "# TYPE dmar_test_total counter\ndmar_test_total 7\n";
        assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
        assert!(metrics.contains("Content-Type: text/plain; version=0.0.4\r\n"), "{metrics}");
        assert!(metrics.contains(&format!("Content-Length: {}\r\n", body.len())), "{metrics}");
        assert!(metrics.ends_with(&format!("\r\n\r\n{body}")), "{metrics}");
        let query = exchange(addr, "GET /metrics?name=x HTTP/1.1\r\n\r\n").await;
        assert!(query.starts_with("HTTP/1.1 200 OK\r\n") && query.ends_with(body), "{query}");
        for path in ["/", "/healthz"] {
            let answer = exchange(addr, &format!("GET {path} HTTP/1.1\r\n\r\n")).await;
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("\r\n\r\ndmar-test\n"), "{answer}");
        }
        for request in
            ["GET /metricsx HTTP/1.1\r\n\r\n", "GET /nope HTTP/1.1\r\n\r\n", "POST /metrics HTTP/1.1\r\n\r\n"]
        {
            let answer = exchange(addr, request).await;
            assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{request:?}: {answer}");
            assert!(answer.ends_with("\r\n\r\nnot found\n"), "{answer}");
        }
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("stops").expect("join");
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_head_is_closed_without_an_answer() {
        let (addr, shutdown, _task) = start(Duration::from_millis(50)).await;
        let answer = exchange(addr, "GET /metrics HTTP/1.1\r\nHost: slow").await;
        assert_eq!(answer, "");
        // The responder still serves others.
        assert!(exchange(addr, "GET /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 200 OK"));
        shutdown.cancel();
    }
}
