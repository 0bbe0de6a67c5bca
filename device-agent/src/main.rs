//! `dmar-agent`: emulated PCIe functions with ATS device TLBs.
//!
//! Parses flags (each also read from `DMAR_<FLAG>`), sets up tracing, binds the sockets and
//! calls [`dmar_agent::run`] until SIGINT or SIGTERM.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use dmar_agent::cli::{Args, LogFormat, listen_address};
use dmar_agent::{Listeners, run};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dmar-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmar-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn bind(what: &str, addr: &str) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = listen_address(addr).map_err(anyhow::Error::msg).with_context(|| format!("{what} address"))?
    else {
        return Ok(None);
    };
    let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} ({what})"))?;
    Ok(Some(l))
}

async fn main_async(args: Args) -> anyhow::Result<()> {
    let config = args.agent_config();
    config.validate()?;
    let listeners = Listeners {
        control: bind("control", &args.control_listen).await?,
        metrics: bind("metrics", &args.metrics_listen).await?,
    };
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        signal.cancel();
    });
    run(config, listeners, shutdown).await?;
    Ok(())
}

async fn wait_for_signal() {
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
