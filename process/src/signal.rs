//! Stopping on request: SIGINT or (on Unix) SIGTERM cancels the process's root
//! cancellation token, from which each binary's graceful shutdown follows.
//!
//! What shutting down means (draining links, closing listeners) is each binary's own.

use tokio_util::sync::CancellationToken;

/// Resolves on SIGINT or (on Unix) SIGTERM: `docker stop` sends SIGTERM, a terminal
/// SIGINT.
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

/// Cancels `token` when the process is asked to stop (spawns a task on the current
/// runtime).
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        token.cancel();
    });
}
