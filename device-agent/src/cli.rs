//! The command line: every flag, each also read from `DMAR_<FLAG>`, and its translation
//! into an [`AgentConfig`]. Zero flags work locally (a server on 127.0.0.1:50051). Not
//! here: the rules a configuration must follow (`config`), tracing and signals
//! (`dmar_process`).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use dmar_vtd::SourceId;
use dmar_vtd::ats::{MAX_ITEMS_PER_MESSAGE, MAX_QUEUE_DEPTH};

use crate::atc::{EvictionPolicy, MAX_CAPACITY};
use crate::config::{AgentConfig, FunctionConfig, MAX_PAGE_REQUESTS, MAX_STU};

/// Devices on one bus (PCI: a 5-bit device number): the most `auto:N` functions.
const DEVICES_PER_BUS: u8 = 32;

/// Emulated PCIe functions with ATS device TLBs, on one ATS link to a dmar server.
#[derive(Parser, Debug, Clone)]
#[command(name = "dmar-agent", version, about)]
pub struct Args {
    /// The dmar server's gRPC URL (or host:port).
    #[arg(long, env = "DMAR_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Requester ids of the functions to host, bus:dev.fn in hex, comma separated; or
    /// `auto:N` for N functions (devices 0..N, function 0) on a bus taken from the last
    /// octet of this host's IPv4 address, so replicas of one container get distinct ids.
    #[arg(long, env = "DMAR_FUNCTIONS", default_value = "00:01.0", value_delimiter = ',', value_parser = parse_functions)]
    pub functions: Vec<Functions>,
    /// The agent's name (in the server's logs and the control service); by default the
    /// host's name, so that replicas can be told apart.
    #[arg(long, env = "DMAR_NAME")]
    pub name: Option<String>,
    /// AgentControl gRPC listen address; "off" disables it.
    #[arg(long, env = "DMAR_CONTROL_LISTEN", default_value = "127.0.0.1:50061")]
    pub control_listen: String,
    /// Prometheus /metrics listen address; "off" disables it.
    #[arg(long, env = "DMAR_METRICS_LISTEN", default_value = "127.0.0.1:9465")]
    pub metrics_listen: String,
    /// Device TLB entries per function.
    #[arg(long, env = "DMAR_ATC_CAPACITY", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..=MAX_CAPACITY as i64))]
    pub atc_capacity: u32,
    /// Device TLB eviction policy: lru, random or fifo.
    #[arg(long, env = "DMAR_EVICTION", default_value = "lru", value_parser = parse_policy)]
    pub eviction: EvictionPolicy,
    /// ATS invalidate queue depth per function.
    #[arg(long, env = "DMAR_INVALIDATE_QUEUE_DEPTH", default_value_t = MAX_QUEUE_DEPTH, value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_QUEUE_DEPTH)))]
    pub invalidate_queue_depth: u8,
    /// ATS smallest translation unit: log2 of 4 KiB blocks.
    #[arg(long, env = "DMAR_SMALLEST_TRANSLATION_UNIT", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=i64::from(MAX_STU)))]
    pub smallest_translation_unit: u8,
    /// Outstanding page requests per function (PRI); 0 disables PRI.
    #[arg(long, env = "DMAR_PAGE_REQUEST_CAPACITY", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=i64::from(MAX_PAGE_REQUESTS)))]
    pub page_request_capacity: u16,
    /// Disable ATS: no device TLB, every DMA untranslated.
    #[arg(long, env = "DMAR_NO_ATS")]
    pub no_ats: bool,
    /// A page request with no response by then fails, in milliseconds.
    #[arg(long, env = "DMAR_PAGE_REQUEST_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub page_request_timeout_ms: u64,
    /// First reconnection delay in milliseconds (doubles up to the maximum).
    #[arg(long, env = "DMAR_RECONNECT_INITIAL_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub reconnect_initial_ms: u64,
    /// Longest reconnection delay in milliseconds.
    #[arg(long, env = "DMAR_RECONNECT_MAX_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub reconnect_max_ms: u64,
    /// Time allowed to connect and bind, in milliseconds.
    #[arg(long, env = "DMAR_CONNECT_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout_ms: u64,
    /// Most items per ATS link message.
    #[arg(long, env = "DMAR_MAX_BATCH", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=MAX_ITEMS_PER_MESSAGE as u64))]
    pub max_batch: u64,
    /// Log format.
    #[arg(long, env = "DMAR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// One element of `--functions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Functions {
    /// One requester id.
    One(SourceId),
    /// `auto:N`.
    Auto(u8),
}

fn parse_functions(s: &str) -> Result<Functions, String> {
    let s = s.trim();
    if let Some(n) = s.strip_prefix("auto:") {
        return match n.parse::<u8>() {
            Ok(n) if (1..=DEVICES_PER_BUS).contains(&n) => Ok(Functions::Auto(n)),
            _ => Err(format!("{s:?}: auto needs a function count between 1 and {DEVICES_PER_BUS}")),
        };
    }
    s.parse::<SourceId>().map(Functions::One).map_err(|e| e.to_string())
}

/// The last octet of the IPv4 address this host routes through (no packet is sent: a
/// connected UDP socket only picks its source address).
fn host_bus() -> Result<u8, String> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("auto functions: {e}"))?;
    sock.connect("10.255.255.255:9").map_err(|e| format!("auto functions: no IPv4 route: {e}"))?;
    match sock.local_addr().map_err(|e| format!("auto functions: {e}"))?.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_unspecified() => Ok(ip.octets()[3]),
        other => Err(format!("auto functions: no usable IPv4 address (got {other})")),
    }
}

/// The host's name (`/etc/hostname`, then `$HOSTNAME`), or `dmar-agent`.
fn default_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "dmar-agent".to_owned())
}

/// Expands `--functions` into requester ids; `auto:N` uses `bus`.
fn expand_functions(specs: &[Functions], bus: impl FnOnce() -> Result<u8, String>) -> Result<Vec<SourceId>, String> {
    let mut bus = Some(bus);
    let mut auto_bus = None;
    let mut out = Vec::new();
    for spec in specs {
        match *spec {
            Functions::One(sid) => out.push(sid),
            Functions::Auto(n) => {
                let b = match auto_bus {
                    Some(b) => b,
                    None => {
                        let f = bus.take().ok_or("auto functions given twice")?;
                        let b = f()?;
                        auto_bus = Some(b);
                        b
                    }
                };
                out.extend((0..n).map(|d| SourceId::new(b, d, 0)));
            }
        }
    }
    Ok(out)
}

fn parse_policy(s: &str) -> Result<EvictionPolicy, String> {
    s.parse::<EvictionPolicy>().map_err(|e| e.to_string())
}

/// A listen address, or `None` for "off".
pub fn listen_address(s: &str) -> Result<Option<SocketAddr>, String> {
    match s.trim() {
        "" | "off" => Ok(None),
        addr => addr.parse().map(Some).map_err(|_| format!("{addr:?} is not host:port (or \"off\")")),
    }
}

impl Args {
    /// The agent configuration the flags describe.
    pub fn agent_config(&self) -> Result<AgentConfig, String> {
        let sids = expand_functions(&self.functions, host_bus)?;
        let functions = sids
            .iter()
            .map(|sid| FunctionConfig {
                ats: !self.no_ats,
                invalidate_queue_depth: self.invalidate_queue_depth,
                smallest_translation_unit: self.smallest_translation_unit,
                page_request_capacity: self.page_request_capacity,
                atc_capacity: self.atc_capacity as usize,
                eviction: self.eviction,
                ..FunctionConfig::new(*sid)
            })
            .collect();
        Ok(AgentConfig {
            name: self.name.clone().unwrap_or_else(default_name),
            reconnect_initial: Duration::from_millis(self.reconnect_initial_ms),
            reconnect_max: Duration::from_millis(self.reconnect_max_ms.max(self.reconnect_initial_ms)),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            max_batch: self.max_batch as usize,
            page_request_timeout: Duration::from_millis(self.page_request_timeout_ms),
            ..AgentConfig::new(self.server.clone(), functions)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_flags_work_locally() {
        let a = Args::try_parse_from(["dmar-agent"]).expect("defaults");
        let c = a.agent_config().expect("config");
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.functions.len(), 1);
        assert_eq!(c.functions[0].sid, SourceId::new(0, 1, 0));
        assert_eq!(c.functions[0].atc_capacity, 2048);
        assert_eq!(listen_address(&a.control_listen), Ok(Some("127.0.0.1:50061".parse().expect("addr"))));
    }

    #[test]
    fn flags_reach_the_configuration() {
        let a = Args::try_parse_from([
            "dmar-agent",
            "--functions",
            "00:01.0,00:01.1,02:1f.7",
            "--eviction",
            "fifo",
            "--atc-capacity",
            "64",
            "--page-request-capacity",
            "8",
            "--no-ats",
            "--metrics-listen",
            "off",
        ])
        .expect("flags");
        let c = a.agent_config().expect("config");
        assert_eq!(
            c.functions.iter().map(|f| f.sid.to_string()).collect::<Vec<_>>(),
            ["00:01.0", "00:01.1", "02:1f.7"]
        );
        assert!(c.functions.iter().all(|f| f.eviction == EvictionPolicy::Fifo && !f.ats && f.atc_capacity == 64));
        assert_eq!(c.functions[0].page_request_capacity, 8);
        assert_eq!(listen_address(&a.metrics_listen), Ok(None));
        assert!(Args::try_parse_from(["dmar-agent", "--functions", "00:20.0"]).is_err());
        assert!(Args::try_parse_from(["dmar-agent", "--eviction", "clock"]).is_err());
        assert!(Args::try_parse_from(["dmar-agent", "--invalidate-queue-depth", "33"]).is_err());
        assert!(listen_address("nonsense").is_err());
    }

    #[test]
    fn auto_functions_take_their_bus_from_the_host() {
        let a = Args::try_parse_from(["dmar-agent", "--functions", "auto:3,07:00.1"]).expect("flags");
        let sids = expand_functions(&a.functions, || Ok(0x2a)).expect("expand");
        assert_eq!(
            sids.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["2a:00.0", "2a:01.0", "2a:02.0", "07:00.1"]
        );
        assert!(expand_functions(&a.functions, || Err("no route".into())).is_err());
        assert!(Args::try_parse_from(["dmar-agent", "--functions", "auto:0"]).is_err());
        assert!(Args::try_parse_from(["dmar-agent", "--functions", "auto:33"]).is_err());
    }
}
