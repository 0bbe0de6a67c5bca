//! `dmar-loadgen`: with no arguments, starts a server and agents in process and runs a
//! short sweep; otherwise drives the given server and agents.

use std::process::ExitCode;

use dmar_loadgen::args::Cli;
use dmar_loadgen::{Outcome, execute, plot};

fn main() -> ExitCode {
    let cli: Cli = dmar_process::parse_args("dmar-loadgen");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dmar-loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmar-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    let outcome = execute(cli).await?;
    let text = outcome.render(cli.common.format)?;
    match &cli.common.output {
        Some(path) => {
            std::fs::write(path, &text).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?
        }
        None => print!("{text}"),
    }
    if let Some(path) = &cli.common.plot {
        match &outcome {
            Outcome::Sweep(r) => plot::plot(r, path)?,
            _ => anyhow::bail!("--plot draws sweeps only"),
        }
    }
    Ok(())
}
