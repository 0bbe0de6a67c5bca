//! The command line: every flag, each also read from `DMAR_<FLAG>`, and its translation
//! into an [`AgentConfig`]. Zero flags work locally (a server on 127.0.0.1:50051).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use dmar_server::SourceId;

use crate::atc::EvictionPolicy;
use crate::config::{AgentConfig, FunctionConfig};

/// Emulated PCIe functions with ATS device TLBs, on one ATS link to a dmar server.
#[derive(Parser, Debug, Clone)]
#[command(name = "dmar-agent", version, about)]
pub struct Args {
    /// The dmar server's gRPC URL (or host:port).
    #[arg(long, env = "DMAR_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Requester ids of the functions to host, bus:dev.fn in hex, comma separated.
    #[arg(long, env = "DMAR_FUNCTIONS", default_value = "00:01.0", value_delimiter = ',', value_parser = parse_sid)]
    pub functions: Vec<SourceId>,
    /// The agent's name (in the server's logs and the control service).
    #[arg(long, env = "DMAR_NAME", default_value = "dmar-agent")]
    pub name: String,
    /// AgentControl gRPC listen address; "off" disables it.
    #[arg(long, env = "DMAR_CONTROL_LISTEN", default_value = "127.0.0.1:50061")]
    pub control_listen: String,
    /// Prometheus /metrics listen address; "off" disables it.
    #[arg(long, env = "DMAR_METRICS_LISTEN", default_value = "127.0.0.1:9465")]
    pub metrics_listen: String,
    /// Device TLB entries per function.
    #[arg(long, env = "DMAR_ATC_CAPACITY", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..=(1 << 24)))]
    pub atc_capacity: u32,
    /// Device TLB eviction policy: lru, random or fifo.
    #[arg(long, env = "DMAR_EVICTION", default_value = "lru", value_parser = parse_policy)]
    pub eviction: EvictionPolicy,
    /// ATS invalidate queue depth per function.
    #[arg(long, env = "DMAR_INVALIDATE_QUEUE_DEPTH", default_value_t = 32, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub invalidate_queue_depth: u8,
    /// ATS smallest translation unit: log2 of 4 KiB blocks.
    #[arg(long, env = "DMAR_SMALLEST_TRANSLATION_UNIT", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=31))]
    pub smallest_translation_unit: u8,
    /// Outstanding page requests per function (PRI); 0 disables PRI.
    #[arg(long, env = "DMAR_PAGE_REQUEST_CAPACITY", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=512))]
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
    #[arg(long, env = "DMAR_MAX_BATCH", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=4096))]
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

fn parse_sid(s: &str) -> Result<SourceId, String> {
    s.trim().parse::<SourceId>().map_err(|e| e.to_string())
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
    pub fn agent_config(&self) -> AgentConfig {
        let functions = self
            .functions
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
        AgentConfig {
            name: self.name.clone(),
            reconnect_initial: Duration::from_millis(self.reconnect_initial_ms),
            reconnect_max: Duration::from_millis(self.reconnect_max_ms.max(self.reconnect_initial_ms)),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            max_batch: self.max_batch as usize,
            page_request_timeout: Duration::from_millis(self.page_request_timeout_ms),
            ..AgentConfig::new(self.server.clone(), functions)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_flags_work_locally() {
        let a = Args::try_parse_from(["dmar-agent"]).expect("defaults");
        let c = a.agent_config();
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
        let c = a.agent_config();
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
}
