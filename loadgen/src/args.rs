//! Command-line arguments and the small parsers they need. Every flag also reads
//! `DMAR_<FLAG>`; with no flags at all the load generator runs the embedded sweep.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use dmar_vtd::PAGE_SIZE;
use serde::Serialize;

/// Measures how translation throughput and latency scale with concurrent devices, and
/// what device TLBs buy over a no-device-TLB baseline.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
pub struct Cli {
    /// What to run (default: sweep).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options shared by every scenario.
    #[command(flatten)]
    pub common: Common,
}

/// The scenarios.
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Step over the number of concurrent devices; ATS and baseline per step.
    Sweep,
    /// Only the no-device-TLB baseline (of the `--baseline` kind).
    Baseline,
    /// Unmap and remap pages while devices run, under strict and deferred flushing.
    Invalidate(InvalidateArgs),
    /// Devices touch unmapped memory; page requests are answered by mapping on demand.
    DemandPaging,
}

/// Options of the invalidate scenario.
#[derive(ClapArgs, Debug, Clone)]
pub struct InvalidateArgs {
    /// Concurrent devices running while pages are unmapped and remapped.
    #[arg(long, env = "DMAR_DEVICES", default_value_t = 4)]
    pub devices: usize,
    /// Also bind a function of the load generator's own that stops answering device-TLB
    /// invalidations, behind another remapping unit than the tenants' devices, and keep
    /// strict-unmapping a page of its domain (each unmap lasts the invalidation time-out
    /// and ends DEADLINE_EXCEEDED, counted apart). Embedded without `--platform`: runs
    /// twice, on a one-unit and on a two-unit platform, and compares the tenants' strict
    /// unmap latency.
    #[arg(long, env = "DMAR_STALLED_DEVICE")]
    pub stalled_device: bool,
    /// Embedded comparison only: the device-TLB invalidation time-out of both platforms'
    /// units (a real unit's is about a second; shorter keeps the run short).
    #[arg(long, env = "DMAR_DEVICE_TLB_TIMEOUT", default_value = "200ms", value_parser = parse_duration)]
    pub device_tlb_timeout: Duration,
    /// With `--tls-dir`: the certificate in that folder the stalled device's ATS link
    /// presents (the device role, with a requester id behind another unit than the
    /// tenants'; the operator's certificate is not a device).
    #[arg(long, env = "DMAR_STALLED_DEVICE_IDENTITY", requires = "stalled_device")]
    pub stalled_device_identity: Option<String>,
}

/// Output formats.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A terminal table.
    Text,
    /// One JSON document.
    Json,
    /// CSV, one row per step.
    Csv,
}

/// How the no-device-TLB baseline translates each access.
#[derive(ValueEnum, Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BaselineKind {
    /// One unary `Control.Translate` call per access (the vhost-IOTLB style). The agents'
    /// identities need the server's operator role.
    #[default]
    Unary,
    /// One ATS translation request over each device's own link per access, the device
    /// TLB neither used nor filled. The device role suffices (compose).
    Link,
}

impl BaselineKind {
    /// The kind's name, as on the command line and in JSON and CSV.
    pub fn label(self) -> &'static str {
        match self {
            BaselineKind::Unary => "unary",
            BaselineKind::Link => "link",
        }
    }

    /// What one baseline translation is, for a report's reader.
    pub fn describe(self) -> &'static str {
        match self {
            BaselineKind::Unary => "one unary Control.Translate call per access",
            BaselineKind::Link => "one ATS translation request over the link per access, device TLB unused",
        }
    }
}

/// Address patterns.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatternArg {
    /// Uniform over the footprint.
    Uniform,
    /// Zipf over the footprint's pages.
    Zipf,
    /// A sequential ring (NIC-like).
    Sequential,
    /// Fixed stride.
    Strided,
}

/// How the footprint is mapped.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageMix {
    /// 4 KiB pages only.
    #[value(name = "4k")]
    Small,
    /// 2 MiB pages only.
    #[value(name = "2m")]
    Large,
    /// Half 2 MiB, half 4 KiB.
    Mixed,
}

/// Options shared by every scenario.
#[derive(ClapArgs, Debug, Clone)]
pub struct Common {
    /// Server gRPC URL; with no server and no agents everything runs embedded on loopback.
    #[arg(long, global = true, env = "DMAR_SERVER")]
    pub server: Option<String>,
    /// Agent control endpoints (host:port, comma separated; a name resolving to several
    /// addresses means several agents).
    #[arg(long, global = true, env = "DMAR_AGENTS", value_delimiter = ',')]
    pub agents: Vec<String>,
    /// Device counts to step over.
    #[arg(long, global = true, env = "DMAR_STEPS", default_value = "1,2,4,8", value_parser = parse_steps)]
    pub steps: Steps,
    /// Measured time per run (e.g. 500ms, 2s).
    #[arg(long, global = true, env = "DMAR_DURATION", default_value = "1s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Warm-up before measuring.
    #[arg(long, global = true, env = "DMAR_WARMUP", default_value = "300ms", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Accesses in flight per device (closed loop).
    #[arg(long, global = true, env = "DMAR_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: u32,
    /// Fixed rate per device in accesses/s (open loop; latency from the intended send
    /// time). 0 = closed loop.
    #[arg(long, global = true, env = "DMAR_RATE", default_value_t = 0.0)]
    pub rate: f64,
    /// Bytes mapped per device.
    #[arg(long, global = true, env = "DMAR_FOOTPRINT", default_value = "16M", value_parser = parse_size)]
    pub footprint: u64,
    /// Page sizes of the mapping.
    #[arg(long, global = true, env = "DMAR_PAGE_MIX", value_enum, default_value_t = PageMix::Small)]
    pub page_mix: PageMix,
    /// Address pattern.
    #[arg(long, global = true, env = "DMAR_PATTERN", value_enum, default_value_t = PatternArg::Zipf)]
    pub pattern: PatternArg,
    /// Fraction of accesses that write (0..=1).
    #[arg(long, global = true, env = "DMAR_WRITE_FRACTION", default_value_t = 0.3)]
    pub write_fraction: f64,
    /// Also perform each access's DMA over the link (translated DMA after a device-TLB
    /// hit). Off by default: the sweep measures translation, and a DMA round trip would
    /// dominate every access.
    #[arg(long, global = true, env = "DMAR_DMA")]
    pub dma: bool,
    /// Attach every device with translated-request checking (dmar's extension: the server
    /// accepts a device's translated DMA only inside ranges it completed for it), to
    /// measure what the check costs; with `--dma` the DMA is checked too.
    #[arg(long, global = true, env = "DMAR_CHECK_TRANSLATED")]
    pub check_translated: bool,
    /// Device TLB entries per function (embedded agents).
    #[arg(long, global = true, env = "DMAR_ATC_CAPACITY", default_value_t = 2048)]
    pub atc_capacity: usize,
    /// Embedded mode: the platform file of the embedded server (its remapping units and
    /// their device scopes; the server's `--platform`, docs/PLATFORM.md). Default: one unit
    /// for every device. A remote server has its own.
    #[arg(long, global = true, env = "DMAR_PLATFORM")]
    pub platform: Option<PathBuf>,
    /// Embedded mode: agents to start.
    #[arg(long, global = true, env = "DMAR_EMBEDDED_AGENTS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub embedded_agents: u32,
    /// Skip the baseline runs of a sweep.
    #[arg(long, global = true, env = "DMAR_NO_BASELINE")]
    pub no_baseline: bool,
    /// The baseline's kind: `unary` (one Control.Translate call per access; the agents'
    /// identities need the operator role) or `link` (one ATS translation request over the
    /// device's link per access, device TLB unused; the device role suffices).
    #[arg(long, global = true, env = "DMAR_BASELINE", value_enum, default_value_t = BaselineKind::Unary)]
    pub baseline: BaselineKind,
    /// Output format.
    #[arg(long, global = true, env = "DMAR_FORMAT", value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Write the report to this file instead of standard output.
    #[arg(long, global = true, env = "DMAR_OUTPUT")]
    pub output: Option<PathBuf>,
    /// Write an SVG chart of throughput and p99 miss latency against device count.
    #[arg(long, global = true, env = "DMAR_PLOT")]
    pub plot: Option<PathBuf>,
    /// Seed for the address streams.
    #[arg(long, global = true, env = "DMAR_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Mutual TLS to the server and the agents: `DIR/ca.pem` and this client's
    /// `NAME.pem`/`NAME.key` (the layout `dmar-certs` writes). Remote runs only.
    #[arg(long, global = true, env = "DMAR_TLS_DIR", conflicts_with = "tls")]
    pub tls_dir: Option<PathBuf>,
    /// Which certificate in `--tls-dir` is this client's: an identity with the operator
    /// role on the server, trusted by the agents' control ports.
    #[arg(long, global = true, env = "DMAR_TLS_NAME", default_value = "operator")]
    pub tls_name: String,
    /// The name the server's certificate must carry, whatever host `--server` dials.
    #[arg(long, global = true, env = "DMAR_SERVER_NAME", default_value = "dmar-server")]
    pub server_name: String,
    /// The name every agent's certificate must carry (a SAN all agents share, as under
    /// compose), whatever address an agent is dialled at.
    #[arg(long, global = true, env = "DMAR_AGENT_SERVER_NAME", default_value = "agent")]
    pub agent_server_name: String,
    /// Allow plaintext to a server or agent beyond loopback: anyone on the path can then
    /// read and drive the control traffic.
    #[arg(long, global = true, env = "DMAR_INSECURE")]
    pub insecure: bool,
    /// Embedded mode only: run the embedded server and agents with mutual TLS, from an
    /// in-memory development CA, to measure what TLS costs.
    #[arg(long, global = true, env = "DMAR_TLS")]
    pub tls: bool,
}

/// A validated step list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Steps(pub Vec<usize>);

/// Parses a step list such as `1,2,4,8`: device counts 1..=256, strictly increasing.
pub fn parse_steps(s: &str) -> Result<Steps, String> {
    let steps = s
        .split(',')
        .map(|p| p.trim().parse::<usize>().map_err(|_| format!("step {:?} is not a device count", p.trim())))
        .collect::<Result<Vec<_>, _>>()?;
    if steps.is_empty() || steps.iter().any(|&n| n == 0 || n > 256) {
        return Err(format!("steps must be device counts between 1 and 256, got {s:?}"));
    }
    if steps.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("steps must increase, got {s:?}"));
    }
    Ok(Steps(steps))
}

/// Parses `250ms`, `2s`, `1m` or a bare number of milliseconds; zero is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((s, "ms"), |i| (&s[..i], &s[i..]));
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 2s)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        _ => return Err(format!("unknown duration unit {unit:?} in {s:?} (use ms, s or m)")),
    };
    if !(secs > 0.0 && secs.is_finite() && secs < 86_400.0) {
        return Err(format!("duration {s:?} must be greater than zero and below a day"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a size in bytes with an optional K/M/G suffix (binary units); it must be a
/// positive multiple of 4 KiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                _ => return Err(format!("unknown size suffix in {t:?} (use K, M or G)")),
            };
            (&t[..t.len() - 1], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{t:?} is not a size"))?;
    let v = n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("{t:?} is too large"))?;
    if v == 0 || !v.is_multiple_of(PAGE_SIZE) {
        return Err(format!("size {t:?} must be a positive multiple of 4 KiB"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers_accept_good_and_refuse_bad_input() {
        assert_eq!(parse_steps("1, 2,4"), Ok(Steps(vec![1, 2, 4])));
        assert!(parse_steps("1,x").is_err());
        assert!(parse_steps("0").is_err());
        assert!(parse_steps("4,2").is_err());
        assert!(parse_steps("").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3h").is_err());
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert!(parse_size("100").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn no_arguments_is_a_valid_embedded_sweep() {
        let cli = Cli::try_parse_from(["dmar-loadgen"]).expect("parses");
        assert!(cli.command.is_none() && cli.common.server.is_none() && cli.common.agents.is_empty());
        assert_eq!(cli.common.baseline, BaselineKind::Unary, "existing figures stay comparable");
        let link = Cli::try_parse_from(["dmar-loadgen", "--baseline", "link"]).expect("parses");
        assert_eq!(link.common.baseline, BaselineKind::Link);
        assert!(Cli::try_parse_from(["dmar-loadgen", "--baseline", "control"]).is_err());
    }
}
