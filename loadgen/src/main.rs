//! `dmar-loadgen`: with no arguments, starts a server and agents in process and runs a
//! short sweep; otherwise drives the given server and agents.

use std::process::ExitCode;

use dmar_loadgen::args::{Cli, Command};
use dmar_loadgen::{Outcome, execute, plot};

fn main() -> ExitCode {
    let cli: Cli = dmar_process::parse_args("dmar-loadgen");
    // Plaintext beyond loopback is a configuration that cannot run: one line, status 2,
    // before anything is started or dialled.
    if let Err(e) = dmar_loadgen::security::check_common(&cli.common) {
        eprintln!("dmar-loadgen: {e}");
        return ExitCode::from(2);
    }
    // Quiet by default: standard output carries the report. With a stalled device the
    // embedded server's device-TLB time-outs are the point of the run (the report counts
    // them), not warnings.
    let stalled = matches!(&cli.command, Some(Command::Invalidate(i)) if i.stalled_device);
    let filter = if stalled { "warn,dmar_vtd::unit::invalidation=error,dmar_vtd::driver::queue=error" } else { "warn" };
    dmar_process::init_tracing_with(filter, dmar_process::LogFormat::Plain);
    dmar_process::block_on("dmar-loadgen", run(&cli))
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
