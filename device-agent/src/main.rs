//! `dmar-agent`: emulated PCIe functions with ATS device TLBs.
//!
//! Parses flags (each also read from `DMAR_<FLAG>`), sets up tracing, checks the
//! configuration and the plaintext rule, binds the sockets and calls
//! [`dmar_agent::run_with_health`] until SIGINT or SIGTERM. A configuration that cannot run (a bad flag, unreadable TLS
//! files, plaintext beyond loopback without `--insecure`) is one line on stderr and exit
//! status 2; a failure while running is exit status 1.

use std::process::ExitCode;

use anyhow::Context as _;
use dmar_agent::cli::{Args, listen_address};
use dmar_agent::{AgentConfig, Listeners, check_plaintext, run_with_health};
use dmar_process as process;
use tokio_util::sync::CancellationToken;

/// The exit status of a configuration that cannot run, as for a bad flag.
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let args: Args = process::parse_args("dmar-agent");
    process::init_tracing_with("info", args.log_format);
    let config = match checked_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dmar-agent: {e}");
            return ExitCode::from(USAGE);
        }
    };
    if config.security.is_tls() {
        dmar_auth::tls::install_default_crypto_provider();
    }
    process::block_on("dmar-agent", main_async(args, config))
}

/// The configuration the flags describe, validated, with the plaintext rule applied to
/// the server and the control port's address.
fn checked_config(args: &Args) -> Result<AgentConfig, String> {
    let config = args.agent_config()?;
    config.validate().map_err(|e| e.to_string())?;
    let control = listen_address(&args.control_listen).map_err(|e| format!("control address: {e}"))?;
    listen_address(&args.metrics_listen).map_err(|e| format!("metrics address: {e}"))?;
    listen_address(&args.health_listen).map_err(|e| format!("health address: {e}"))?;
    check_plaintext(&config.security, &config.server_url(), control).map_err(|e| e.to_string())?;
    Ok(config)
}

async fn bind(what: &str, addr: &str) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = listen_address(addr).map_err(anyhow::Error::msg).with_context(|| format!("{what} address"))?
    else {
        return Ok(None);
    };
    let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} ({what})"))?;
    Ok(Some(l))
}

async fn main_async(args: Args, config: AgentConfig) -> anyhow::Result<()> {
    let listeners = Listeners {
        control: bind("control", &args.control_listen).await?,
        metrics: bind("metrics", &args.metrics_listen).await?,
    };
    let health = bind("health", &args.health_listen).await?;
    let shutdown = CancellationToken::new();
    process::cancel_on_signal(shutdown.clone());
    run_with_health(config, listeners, health, shutdown).await?;
    Ok(())
}
