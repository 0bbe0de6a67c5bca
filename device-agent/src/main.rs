//! `dmar-agent`: emulated PCIe functions with ATS device TLBs.
//!
//! Parses flags (each also read from `DMAR_<FLAG>`), sets up tracing, binds the sockets and
//! calls [`dmar_agent::run`] until SIGINT or SIGTERM.

use std::process::ExitCode;

use anyhow::Context as _;
use dmar_agent::cli::{Args, LogFormat, listen_address};
use dmar_agent::{Listeners, run};
use dmar_process as process;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args: Args = process::parse_args("dmar-agent");
    process::init_tracing(matches!(args.log_format, LogFormat::Json));
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

async fn bind(what: &str, addr: &str) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = listen_address(addr).map_err(anyhow::Error::msg).with_context(|| format!("{what} address"))?
    else {
        return Ok(None);
    };
    let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} ({what})"))?;
    Ok(Some(l))
}

async fn main_async(args: Args) -> anyhow::Result<()> {
    let config = args.agent_config().map_err(anyhow::Error::msg)?;
    config.validate()?;
    let listeners = Listeners {
        control: bind("control", &args.control_listen).await?,
        metrics: bind("metrics", &args.metrics_listen).await?,
    };
    let shutdown = CancellationToken::new();
    process::cancel_on_signal(shutdown.clone());
    run(config, listeners, shutdown).await?;
    Ok(())
}
