//! The command line: every flag, each also read from `DMAR_<FLAG>`, and its translation
//! into an [`AgentConfig`]. Zero flags work locally (a server on 127.0.0.1:50051, plaintext
//! on loopback). Not here: the rules a configuration must follow (`config`), the plaintext
//! rule (`security`), tracing and signals (`dmar_process`).

use dmar_process::LogFormat;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use dmar_auth::Identity;
use dmar_vtd::SourceId;
use dmar_vtd::ats::{MAX_ITEMS_PER_MESSAGE, MAX_QUEUE_DEPTH};

use crate::atc::{EvictionPolicy, MAX_CAPACITY};
use crate::config::{AgentConfig, FunctionConfig, MAX_PAGE_REQUESTS, MAX_STU};
use crate::security::{
    AgentSecurity, AgentTls, DEFAULT_SERVER_NAME, DEFAULT_TLS_NAME, DEFAULT_TRUSTED_CLIENT, printable_name,
};
use crate::workload::DEFAULT_MAX_TRACE_BYTES;

/// Devices on one bus (PCI: a 5-bit device number): the most `auto:N` functions.
const DEVICES_PER_BUS: u8 = 32;

/// Emulated PCIe functions with ATS device TLBs, on one ATS link to a dmar server.
#[derive(Parser, Debug, Clone)]
#[command(name = "dmar-agent", version, about)]
pub struct Args {
    /// The dmar server's gRPC URL, or host:port (https:// with --tls-dir, http:// without).
    #[arg(long, env = "DMAR_SERVER", default_value = "127.0.0.1:50051")]
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
    /// A plaintext port answering only gRPC health, for probes that cannot do TLS
    /// (dmar.v1.AgentControl is SERVING while the ATS link is bound); "off" disables it.
    #[arg(long, env = "DMAR_HEALTH_LISTEN", default_value = "off")]
    pub health_listen: String,
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
    /// Directory with `ca.pem` and this agent's `NAME.pem` and `NAME.key` (as dmar-certs
    /// writes them): mutual TLS on the ATS link (https://) and on the control port.
    #[arg(long, env = "DMAR_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Which certificate in --tls-dir is this agent's own [default: --name if given, else
    /// agent-0].
    #[arg(long, env = "DMAR_TLS_NAME", value_name = "NAME", value_parser = parse_identity)]
    pub tls_name: Option<Identity>,
    /// The name the server's certificate must carry (a DNS name or IP address in its SANs).
    #[arg(long, env = "DMAR_SERVER_NAME", value_name = "NAME", default_value = DEFAULT_SERVER_NAME)]
    pub server_name: String,
    /// Identities (certificate common names) the control port serves with --tls-dir;
    /// repeatable or comma separated. Others get PERMISSION_DENIED; health is open.
    #[arg(long = "trust-client", env = "DMAR_TRUST_CLIENTS", value_name = "NAME", default_value = DEFAULT_TRUSTED_CLIENT, value_delimiter = ',', value_parser = parse_identity)]
    pub trust_clients: Vec<Identity>,
    /// Allow plaintext beyond loopback: anyone on the path reads DMA payloads and anyone
    /// who reaches the control port drives the device. Without it and without --tls-dir,
    /// the server and the control port must both be on loopback.
    #[arg(long, env = "DMAR_INSECURE")]
    pub insecure: bool,
    /// The only directory trace workloads may read files from (relative paths inside it);
    /// without it, trace files are refused and only inline traces work.
    #[arg(long, env = "DMAR_TRACE_DIR", value_name = "DIR")]
    pub trace_dir: Option<PathBuf>,
    /// Largest trace file read, in bytes.
    #[arg(long, env = "DMAR_MAX_TRACE_BYTES", default_value_t = DEFAULT_MAX_TRACE_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_trace_bytes: u64,
    /// Log format.
    #[arg(long, env = "DMAR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
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

fn parse_identity(s: &str) -> Result<Identity, String> {
    Identity::new(s.trim()).map_err(|e| e.to_string())
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
    /// The certificate the agent presents: --tls-name, else --name (which must then be a
    /// certificate name), else agent-0.
    pub fn tls_identity(&self) -> Result<Identity, String> {
        match (&self.tls_name, &self.name) {
            (Some(id), _) => Ok(id.clone()),
            (None, Some(name)) => Identity::new(name).map_err(|_| {
                format!("--name {:?} is not a certificate name: give --tls-name NAME", printable_name(name))
            }),
            (None, None) => Ok(Identity::new(DEFAULT_TLS_NAME).expect("a valid built-in name")),
        }
    }

    /// The security settings the flags describe; reads the TLS files.
    pub fn security(&self) -> Result<AgentSecurity, String> {
        let tls = match &self.tls_dir {
            None => None,
            Some(dir) => {
                let name = self.tls_identity()?;
                Some(
                    AgentTls::from_dir(dir, name.as_str(), &self.server_name)
                        .map_err(|e| dmar_process::error_chain(&e))?,
                )
            }
        };
        Ok(AgentSecurity { tls, trusted_clients: self.trust_clients.clone(), insecure: self.insecure })
    }

    /// The agent configuration the flags describe (reading the TLS files).
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
            security: self.security()?,
            trace_dir: self.trace_dir.clone(),
            max_trace_bytes: self.max_trace_bytes,
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
        assert_eq!(c.server_url(), "http://127.0.0.1:50051");
        assert_eq!(c.security, AgentSecurity::default());
        assert_eq!(c.trace_dir, None);
        assert_eq!(c.max_trace_bytes, 64 << 20);
        let control = listen_address(&a.control_listen).expect("addr");
        assert_eq!(crate::check_plaintext(&c.security, &c.server_url(), control), Ok(()));
    }

    #[test]
    fn security_flags_reach_the_configuration() -> Result<(), Box<dyn std::error::Error>> {
        let pki = dmar_auth::DevPki::generate(&dmar_auth::DevPkiSpec {
            agents: vec!["rack-7=00:01.0".parse()?, "agent-0=00:02.0".parse()?],
            ..dmar_auth::DevPkiSpec::default()
        })?;
        let dir = tempfile::tempdir()?;
        pki.write_to(dir.path(), false)?;
        let tls_dir = dir.path().to_str().ok_or("utf-8 temp path")?;

        // --tls-dir: https by default, the certificate named by --name, TLS for the server name.
        let a = Args::try_parse_from([
            "dmar-agent",
            "--tls-dir",
            tls_dir,
            "--name",
            "rack-7",
            "--trust-client",
            "operator,loadgen",
            "--trust-client",
            "observer",
            "--trace-dir",
            "/srv/traces",
            "--max-trace-bytes",
            "4096",
        ])?;
        let c = a.agent_config()?;
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.server_url(), "https://127.0.0.1:50051");
        let tls = c.security.tls.as_ref().ok_or("tls")?;
        assert_eq!(tls.material().identity().map(Identity::as_str), Some("rack-7"));
        assert_eq!(tls.server_name(), "dmar-server");
        let names: Vec<&str> = c.security.trusted_clients.iter().map(Identity::as_str).collect();
        assert_eq!(names, ["operator", "loadgen", "observer"]);
        assert_eq!(c.trace_dir, Some(PathBuf::from("/srv/traces")));
        assert_eq!(c.max_trace_bytes, 4096);
        // Beyond loopback is fine with TLS.
        let far = Args::try_parse_from(["dmar-agent", "--tls-dir", tls_dir, "--server", "dmar-server:50051"])?;
        let far = far.agent_config()?;
        assert_eq!(far.server_url(), "https://dmar-server:50051");
        assert_eq!(crate::check_plaintext(&far.security, &far.server_url(), listen_address("0.0.0.0:1")?), Ok(()));
        // The default certificate is agent-0; --tls-name picks another.
        let named = Args::try_parse_from(["dmar-agent", "--tls-dir", tls_dir, "--tls-name", "rack-7"])?;
        assert_eq!(named.tls_identity()?.as_str(), "rack-7");
        assert_eq!(Args::try_parse_from(["dmar-agent", "--tls-dir", tls_dir])?.tls_identity()?.as_str(), "agent-0");

        // An http:// URL with --tls-dir is refused, as is a --name that is no certificate name.
        let http = Args::try_parse_from(["dmar-agent", "--tls-dir", tls_dir, "--server", "http://127.0.0.1:1"])?;
        assert!(http.agent_config()?.validate().is_err());
        let odd = Args::try_parse_from(["dmar-agent", "--tls-dir", tls_dir, "--name", "a/../../b"])?;
        assert!(odd.agent_config().is_err());
        assert!(Args::try_parse_from(["dmar-agent", "--tls-name", "../ca"]).is_err());
        assert!(Args::try_parse_from(["dmar-agent", "--trust-client", "a b"]).is_err());
        assert!(Args::try_parse_from(["dmar-agent", "--max-trace-bytes", "0"]).is_err());
        // Missing files are an error, not a silent fallback to plaintext.
        let missing = Args::try_parse_from(["dmar-agent", "--tls-dir", "/nonexistent", "--tls-name", "x"])?;
        assert!(missing.agent_config().is_err());
        Ok(())
    }

    #[test]
    fn plaintext_beyond_loopback_needs_insecure() -> Result<(), Box<dyn std::error::Error>> {
        let far = Args::try_parse_from(["dmar-agent", "--server", "dmar-server:50051"])?;
        let c = far.agent_config()?;
        let refused = crate::check_plaintext(&c.security, &c.server_url(), listen_address(&far.control_listen)?)
            .expect_err("plaintext to dmar-server");
        assert_eq!(
            refused.to_string(),
            "refusing plaintext to dmar-server:50051: give --tls-dir DIR (docs/SECURITY.md) or --insecure"
        );
        let open = Args::try_parse_from(["dmar-agent", "--control-listen", "0.0.0.0:50061"])?;
        let c = open.agent_config()?;
        assert!(crate::check_plaintext(&c.security, &c.server_url(), listen_address(&open.control_listen)?).is_err());
        let insecure = Args::try_parse_from([
            "dmar-agent",
            "--server",
            "dmar-server:50051",
            "--control-listen",
            "0.0.0.0:1",
            "--insecure",
        ])?;
        let c = insecure.agent_config()?;
        assert_eq!(crate::check_plaintext(&c.security, &c.server_url(), listen_address("0.0.0.0:1")?), Ok(()));
        Ok(())
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
        assert_eq!(listen_address(&a.health_listen), Ok(None), "off by default");
        let probe = Args::try_parse_from(["dmar-agent", "--health-listen", "127.0.0.1:50062"]).expect("flags");
        assert_eq!(listen_address(&probe.health_listen), Ok(Some("127.0.0.1:50062".parse().expect("addr"))));
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
