//! Process plumbing shared by dmar's binaries (server and agent): tracing setup, waiting
//! for SIGINT/SIGTERM, and a minimal HTTP/1.1 endpoint for Prometheus `/metrics`.
//!
//! The metrics exporter's own listener cannot take a pre-bound socket, which tests need
//! (`127.0.0.1:0`), so the processes serve the rendered text themselves: one request per
//! connection, a bounded request head with a deadline, `GET /metrics`, `GET /` and
//! `GET /healthz`, nothing else.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Parses the command line; a bad argument exits with status 2 and one line on stderr
/// (`NAME: <what is wrong>`), while `--help` and `--version` print as usual.
pub fn parse_args<T: clap::Parser>(name: &str) -> T {
    match T::try_parse() {
        Ok(args) => args,
        Err(e) if e.use_stderr() => {
            let text = e.to_string();
            let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("invalid arguments");
            eprintln!("{name}: {}", line.trim_start_matches("error: "));
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    }
}

/// Installs the tracing subscriber: `RUST_LOG` filter (default `info`), stderr, ANSI
/// colours only on a terminal, plain or JSON lines.
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGINT or (on Unix) SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Cancels `token` when the process is asked to stop.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        token.cancel();
    });
}

/// Produces the `/metrics` body on each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `/metrics` (the text `render` returns) until `shutdown`. `name` answers `/` and
/// `/healthz`.
pub async fn serve_metrics(listener: TcpListener, name: &'static str, render: Render, shutdown: CancellationToken) {
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
            if let Err(e) = respond(conn, name, &render).await {
                tracing::debug!(error = %e, "metrics request failed");
            }
        });
    }
}

async fn respond(mut conn: TcpStream, name: &str, render: &Render) -> std::io::Result<()> {
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
