//! `dmar-server`: the emulated VT-d remapping unit as a gRPC service.
//!
//! Parses flags (each also read from `DMAR_<FLAG>`), sets up tracing, binds the sockets and
//! calls [`dmar_server::service::serve`] until SIGINT or SIGTERM.
//!
//! Security: with `--tls-dir` the gRPC port speaks mutual TLS and authorises every call
//! against the policy; without it, plaintext is served only on a loopback address or with
//! `--insecure` (docs/SECURITY.md).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use dmar_auth::{Policy, TlsFiles};
use dmar_process::{self as process, LogFormat};
use dmar_server::service::{Listeners, Security, ServerConfig, serve_with_health};
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
    /// The platform file: several remapping units, their device scopes and memory regions,
    /// which of them the built-in driver drives (docs/PLATFORM.md). Without it: one unit for
    /// every device, driven by the built-in driver. The file sets the memory size and each
    /// unit's caches, so it cannot be combined with --memory, --iotlb, --context-cache,
    /// --paging-cache, --invalidation-timeout-ms or --no-stale-detection.
    #[arg(long, env = "DMAR_PLATFORM", conflicts_with_all = ["memory", "iotlb", "context_cache", "paging_cache", "invalidation_timeout_ms", "no_stale_detection"])]
    platform: Option<PathBuf>,
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
    /// Directory with `ca.pem`, `NAME.pem` and `NAME.key` (see `dmar-certs`): serve mutual
    /// TLS and authorise every call against the policy.
    #[arg(long, env = "DMAR_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// The server's certificate and key file name in the TLS directory.
    #[arg(long, env = "DMAR_TLS_NAME", default_value = "dmar-server")]
    tls_name: String,
    /// The policy file (identities, roles, requester ids, quotas); default
    /// `TLS_DIR/policy.toml`. Required with TLS.
    #[arg(long, env = "DMAR_POLICY")]
    policy: Option<PathBuf>,
    /// Serve plaintext on a non-loopback address: anyone who reaches the port holds every
    /// role, including reading and writing every tenant's memory.
    #[arg(long, env = "DMAR_INSECURE")]
    insecure: bool,
    /// A plaintext port answering only gRPC health, for probes that cannot do TLS; "off"
    /// disables it.
    #[arg(long, env = "DMAR_HEALTH_LISTEN", default_value = "off")]
    health_listen: String,
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

/// The plaintext rule: without TLS, serve only on a loopback address unless `insecure`.
/// The error is the one line the binary prints before exiting 2.
fn plaintext_allowed(listen: SocketAddr, insecure: bool) -> Result<(), String> {
    if insecure || listen.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!("dmar-server: refusing plaintext on {listen}: give --tls-dir DIR (docs/SECURITY.md) or --insecure"))
    }
}

/// The security settings the flags ask for; the error is one line for exit code 2.
fn security(args: &Args) -> Result<Security, String> {
    let Some(dir) = &args.tls_dir else {
        plaintext_allowed(args.listen, args.insecure)?;
        return Ok(Security::plaintext());
    };
    let material = TlsFiles::from_dir(dir, &args.tls_name)
        .load()
        .map_err(|e| format!("dmar-server: {}", process::error_chain(&e)))?;
    let policy_path = args.policy.clone().unwrap_or_else(|| dir.join("policy.toml"));
    let policy = Policy::load(&policy_path).map_err(|e| {
        format!("dmar-server: TLS needs a policy: {} (--policy FILE, docs/SECURITY.md)", process::error_chain(&e))
    })?;
    Ok(Security::mutual_tls(material, policy))
}

fn main() -> ExitCode {
    let args: Args = process::parse_args("dmar-server");
    process::init_tracing_with("info", args.log_format);
    dmar_auth::tls::install_default_crypto_provider();
    let security = match security(&args) {
        Ok(s) => s,
        Err(line) => {
            eprintln!("{line}");
            return ExitCode::from(2);
        }
    };
    process::block_on("dmar-server", run(args, security))
}

async fn run(args: Args, security: Security) -> anyhow::Result<()> {
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
    let platform = match &args.platform {
        Some(path) => Some(
            dmar_server::platform_file::load(path)
                .map_err(|e| anyhow::anyhow!("platform file {}: {}", path.display(), process::error_chain(&e)))?,
        ),
        None => None,
    };
    let config = ServerConfig {
        platform,
        memory_size: args.memory,
        unit,
        default_flush: match args.flush {
            Flush::Strict => FlushPolicy::Strict,
            Flush::Deferred => deferred,
        },
        deferred,
        security,
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
    let health =
        match process::listen_address(&args.health_listen).map_err(anyhow::Error::msg).context("health address")? {
            None => None,
            Some(addr) => {
                Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?)
            }
        };
    let shutdown = CancellationToken::new();
    process::cancel_on_signal(shutdown.clone());
    serve_with_health(config, Listeners { grpc, metrics }, health, shutdown).await?;
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

    #[test]
    fn plaintext_needs_loopback_or_insecure() {
        let any: SocketAddr = "0.0.0.0:50051".parse().expect("addr");
        assert_eq!(
            plaintext_allowed(any, false),
            Err(
                "dmar-server: refusing plaintext on 0.0.0.0:50051: give --tls-dir DIR (docs/SECURITY.md) or --insecure"
                    .to_owned()
            )
        );
        assert_eq!(plaintext_allowed(any, true), Ok(()));
        assert_eq!(plaintext_allowed("127.0.0.1:50051".parse().expect("addr"), false), Ok(()));
        assert_eq!(plaintext_allowed("[::1]:50051".parse().expect("addr"), false), Ok(()));
        assert!(plaintext_allowed("10.0.0.5:50051".parse().expect("addr"), false).is_err());
    }

    #[test]
    fn tls_without_a_policy_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dmar_auth::DevPki::generate(&dmar_auth::DevPkiSpec::default()).expect("pki");
        pki.write_to(dir.path(), false).expect("write");
        std::fs::remove_file(dir.path().join("policy.toml")).expect("remove");
        let args = Args::parse_from(["dmar-server", "--tls-dir", dir.path().to_str().expect("utf-8")]);
        let err = security(&args).expect_err("no policy");
        assert!(err.contains("TLS needs a policy"), "{err}");
        assert!(!err.contains('\n'));
    }
}
