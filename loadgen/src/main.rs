//! `dmar-loadgen`: with no arguments, runs the embedded translation sweep.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use dmar_loadgen::{SweepConfig, parse_steps, run_sweep};

/// Measures how translation throughput scales with concurrent devices.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Concurrent device counts to step over.
    #[arg(long, env = "DMAR_STEPS", default_value = "1,2,4,8")]
    steps: String,
    /// Measured time per step, in milliseconds.
    #[arg(long, env = "DMAR_DURATION_MS", default_value_t = 1000)]
    duration_ms: u64,
    /// Bytes mapped per device (a multiple of 4096).
    #[arg(long, env = "DMAR_FOOTPRINT", default_value_t = 8 << 20)]
    footprint: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmar-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let config = SweepConfig {
        steps: parse_steps(&args.steps)?,
        duration: Duration::from_millis(args.duration_ms),
        footprint: args.footprint,
    };
    println!("embedded unit sweep: {} ms per step, {} KiB per device", args.duration_ms, args.footprint >> 10);
    println!("{:>8} {:>14} {:>14} {:>10} {:>7}", "devices", "translations", "per second", "IOTLB hit", "faults");
    run_sweep(&config, |r| {
        println!(
            "{:>8} {:>14} {:>14.0} {:>9.1}% {:>7}",
            r.devices,
            r.translations,
            r.per_second,
            r.iotlb_hit_ratio * 100.0,
            r.faults
        );
    })?;
    Ok(())
}
