//! `dmar-server`: the emulated VT-d remapping unit as a gRPC service.
//!
//! Parses flags (each also read from `DMAR_<FLAG>`), sets up tracing, binds the sockets and
//! calls [`dmar_server::service::serve`] until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use dmar_process::{self as process, LogFormat};
use dmar_server::service::{Listeners, ServerConfig, serve};
use dmar_vtd::driver::FlushPolicy;
use dmar_vtd::unit::{CacheGeometry, UnitConfig};
use tokio_util::sync::CancellationToken;

/// The dmar remapping server: an emulated Intel VT-d unit with ATS device-TLB support.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// gRPC listen address (Control, ATS link, health, reflection).
    #[arg(long, env = "DMAR_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Prometheus /metrics listen address; "off" disables it.
    #[arg(long, env = "DMAR_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    metrics_listen: String,
    /// Emulated host memory size, in bytes or with a K/M/G/T suffix (binary units).
    #[arg(long, env = "DMAR_MEMORY", default_value = "4G", value_parser = parse_size)]
    memory: u64,
    /// IOTLB geometry, SETSxWAYS.
    #[arg(long, env = "DMAR_IOTLB", default_value = "256x8", value_parser = parse_geometry)]
    iotlb: CacheGeometry,
    /// Context-cache geometry, SETSxWAYS.
    #[arg(long, env = "DMAR_CONTEXT_CACHE", default_value = "64x4", value_parser = parse_geometry)]
    context_cache: CacheGeometry,
    /// Paging-structure cache geometry, SETSxWAYS.
    #[arg(long, env = "DMAR_PAGING_CACHE", default_value = "128x4", value_parser = parse_geometry)]
    paging_cache: CacheGeometry,
    /// Device-TLB invalidation time-out in milliseconds (then ITE).
    #[arg(long, env = "DMAR_INVALIDATION_TIMEOUT_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    invalidation_timeout_ms: u64,
    /// Flush policy for unmaps that do not choose one.
    #[arg(long, env = "DMAR_FLUSH", value_enum, default_value_t = Flush::Strict)]
    flush: Flush,
    /// Deferred flush queue: flush when this many ranges are queued.
    #[arg(long, env = "DMAR_DEFERRED_MAX_ENTRIES", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    deferred_max_entries: u64,
    /// Deferred flush queue: flush when the oldest range is this old, in milliseconds.
    #[arg(long, env = "DMAR_DEFERRED_MAX_DELAY_MS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    deferred_max_delay_ms: u64,
    /// Do not re-read source entries on cache hits to count stale uses.
    #[arg(long, env = "DMAR_NO_STALE_DETECTION")]
    no_stale_detection: bool,
    /// Log format.
    #[arg(long, env = "DMAR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Flush {
    Strict,
    Deferred,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix {c:?} (use K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_geometry(s: &str) -> Result<CacheGeometry, String> {
    let (sets, ways) = s.split_once(['x', 'X']).ok_or_else(|| format!("{s:?} is not SETSxWAYS"))?;
    let g = CacheGeometry::new(
        sets.parse().map_err(|_| format!("{sets:?} is not a set count"))?,
        ways.parse().map_err(|_| format!("{ways:?} is not a way count"))?,
    );
    g.validate().map_err(|e| e.to_string())?;
    Ok(g)
}

fn main() -> ExitCode {
    let args: Args = process::parse_args("dmar-server");
    process::init_tracing_with("info", args.log_format);
    process::block_on("dmar-server", run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let unit = UnitConfig::default()
        .with_iotlb(args.iotlb)?
        .with_context_cache(args.context_cache)?
        .with_paging_cache(args.paging_cache)?
        .with_stale_detection(!args.no_stale_detection)
        .with_device_tlb_timeout(Duration::from_millis(args.invalidation_timeout_ms));
    let deferred = FlushPolicy::Deferred {
        max_entries: args.deferred_max_entries as usize,
        max_delay: Duration::from_millis(args.deferred_max_delay_ms),
    };
    let config = ServerConfig {
        memory_size: args.memory,
        unit,
        default_flush: match args.flush {
            Flush::Strict => FlushPolicy::Strict,
            Flush::Deferred => deferred,
        },
        deferred,
    };
    let grpc = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let metrics =
        match process::listen_address(&args.metrics_listen).map_err(anyhow::Error::msg).context("metrics address")? {
            None => None,
            Some(addr) => {
                Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?)
            }
        };
    let shutdown = CancellationToken::new();
    process::cancel_on_signal(shutdown.clone());
    serve(config, Listeners { grpc, metrics }, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_geometries_parse() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("4Q").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_geometry("64x4"), Ok(CacheGeometry::new(64, 4)));
        assert!(parse_geometry("63x4").is_err());
        assert!(parse_geometry("64").is_err());
    }
}
