//! How an agent is built: the server it links to, the functions it hosts with their ATS,
//! PRI and device-TLB settings, the link's timing, its security settings and where trace
//! files may be read.
//!
//! Owns the configuration types and their validation (every rule a bind or a cache would
//! otherwise reject later). Parsing command lines is `cli`'s job; what the security
//! settings mean is `security`'s.

use std::path::PathBuf;
use std::time::Duration;

use dmar_vtd::SourceId;
use dmar_vtd::ats::{MAX_FUNCTIONS_PER_LINK, MAX_ITEMS_PER_MESSAGE, MAX_PRG_INDEX, MAX_QUEUE_DEPTH};

use crate::atc::{DEFAULT_CAPACITY, EvictionPolicy, MAX_CAPACITY};
use crate::security::AgentSecurity;
use crate::workload::{DEFAULT_MAX_TRACE_BYTES, TraceFiles};

/// Most page request groups a function may have outstanding: one per PRG index.
pub(crate) const MAX_PAGE_REQUESTS: u16 = MAX_PRG_INDEX + 1;
/// Largest smallest translation unit (PCIe 10.5.1.3: STU is a 5-bit field).
pub(crate) const MAX_STU: u8 = 31;

/// One emulated PCIe function.
#[derive(Clone, Debug, PartialEq)]
pub struct FunctionConfig {
    /// Requester id.
    pub sid: SourceId,
    /// ATS enabled: a device TLB and translated DMA. Without it every DMA is untranslated.
    pub ats: bool,
    /// ATS invalidate queue depth, 1..=32 (PCIe 10.5.1.2: ATS Capability register,
    /// Invalidate Queue Depth).
    pub invalidate_queue_depth: u8,
    /// ATS smallest translation unit: ranges below 2^stu 4 KiB blocks are not cached and
    /// invalidations are widened to whole units (PCIe 10.5.1.3: ATS Control register,
    /// STU), 0..=31.
    pub smallest_translation_unit: u8,
    /// Outstanding page requests allowed (PRI capacity); 0 disables PRI.
    pub page_request_capacity: u16,
    /// Device TLB capacity in entries.
    pub atc_capacity: usize,
    /// Device TLB eviction policy.
    pub eviction: EvictionPolicy,
}

impl FunctionConfig {
    /// A function with the defaults: ATS on, queue depth 32, 4 KiB STU, no PRI, 2048 LRU
    /// entries.
    pub fn new(sid: SourceId) -> Self {
        Self {
            sid,
            ats: true,
            invalidate_queue_depth: MAX_QUEUE_DEPTH,
            smallest_translation_unit: 0,
            page_request_capacity: 0,
            atc_capacity: DEFAULT_CAPACITY,
            eviction: EvictionPolicy::Lru,
        }
    }

    /// Whether the function may issue page requests.
    pub fn pri(&self) -> bool {
        self.page_request_capacity > 0
    }
}

/// A whole agent.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentConfig {
    /// Name sent in the bind (for the server's logs) and reported to the load generator;
    /// cut to printable ASCII and `MAX_NAME_CHARS` when the agent starts.
    pub name: String,
    /// The server's gRPC URL (`https://host:port` with TLS, `http://host:port` without; a
    /// bare `host:port` gets the scheme that matches).
    pub server: String,
    /// The functions, each with its own device TLB.
    pub functions: Vec<FunctionConfig>,
    /// First reconnection delay; doubles after every failed attempt.
    pub reconnect_initial: Duration,
    /// Longest reconnection delay.
    pub reconnect_max: Duration,
    /// Time allowed to connect and bind.
    pub connect_timeout: Duration,
    /// Most items per link message.
    pub max_batch: usize,
    /// A page request with no page group response by then counts as failed.
    pub page_request_timeout: Duration,
    /// Longest wait for accesses in flight at the end of a workload run.
    pub drain_timeout: Duration,
    /// TLS on the link and the control port, and who may use the control port. The
    /// default is plaintext, allowed on loopback only.
    pub security: AgentSecurity,
    /// The only directory trace workloads may name files in; `None` refuses trace files
    /// (inline traces still work).
    pub trace_dir: Option<PathBuf>,
    /// Largest trace file read, in bytes.
    pub max_trace_bytes: u64,
}

impl AgentConfig {
    /// An agent for `server` hosting `functions` with default settings.
    pub fn new(server: impl Into<String>, functions: Vec<FunctionConfig>) -> Self {
        Self {
            name: "dmar-agent".to_owned(),
            server: server.into(),
            functions,
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            max_batch: 1024,
            page_request_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            security: AgentSecurity::default(),
            trace_dir: None,
            max_trace_bytes: DEFAULT_MAX_TRACE_BYTES,
        }
    }

    /// The server URL with a scheme: `https://` with TLS, `http://` without.
    pub fn server_url(&self) -> String {
        match (self.server.contains("://"), self.security.is_tls()) {
            (true, _) => self.server.clone(),
            (false, true) => format!("https://{}", self.server),
            (false, false) => format!("http://{}", self.server),
        }
    }

    /// The trace files workloads may name.
    pub fn trace_files(&self) -> TraceFiles {
        TraceFiles::new(self.trace_dir.clone(), self.max_trace_bytes)
    }

    /// Checks every rule the link, the server's bind and the caches enforce.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.functions.is_empty() || self.functions.len() > MAX_FUNCTIONS_PER_LINK {
            return Err(ConfigError::FunctionCount(self.functions.len()));
        }
        let url = self.server_url();
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.parse::<tonic::transport::Uri>().is_err()
        {
            return Err(ConfigError::Server(self.server.clone()));
        }
        match (url.starts_with("https://"), self.security.is_tls()) {
            (false, true) => return Err(ConfigError::PlaintextUrl(self.server.clone())),
            (true, false) => return Err(ConfigError::TlsUrlWithoutTls(self.server.clone())),
            _ => {}
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.functions {
            if !seen.insert(f.sid) {
                return Err(ConfigError::Duplicate(f.sid));
            }
            if !(1..=MAX_QUEUE_DEPTH).contains(&f.invalidate_queue_depth) {
                return Err(ConfigError::QueueDepth(f.sid, f.invalidate_queue_depth));
            }
            if f.smallest_translation_unit > MAX_STU {
                return Err(ConfigError::Stu(f.sid, f.smallest_translation_unit));
            }
            if f.page_request_capacity > MAX_PAGE_REQUESTS {
                return Err(ConfigError::PageRequests(f.sid, f.page_request_capacity));
            }
            if !(1..=MAX_CAPACITY).contains(&f.atc_capacity) {
                return Err(ConfigError::Capacity(f.sid, f.atc_capacity));
            }
        }
        if !(1..=MAX_ITEMS_PER_MESSAGE).contains(&self.max_batch) {
            return Err(ConfigError::Batch(self.max_batch));
        }
        if self.reconnect_initial.is_zero() || self.reconnect_max < self.reconnect_initial {
            return Err(ConfigError::Backoff);
        }
        if self.connect_timeout.is_zero() || self.page_request_timeout.is_zero() {
            return Err(ConfigError::Timeout);
        }
        if self.max_trace_bytes == 0 {
            return Err(ConfigError::TraceBytes);
        }
        Ok(())
    }
}

/// Why a configuration cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// No functions, or more than a link may bind.
    #[error("an agent hosts 1 to {MAX_FUNCTIONS_PER_LINK} functions, got {0}")]
    FunctionCount(usize),
    /// The server address is not a URL.
    #[error("server address {0:?} is not an http(s) URL or host:port")]
    Server(String),
    /// An `http://` server URL while TLS is configured: the link would be plaintext.
    #[error("server address {0:?} is http://, but TLS is configured (--tls-dir): use https://")]
    PlaintextUrl(String),
    /// An `https://` server URL without TLS settings to connect with.
    #[error("server address {0:?} is https://, but no TLS is configured: give --tls-dir DIR")]
    TlsUrlWithoutTls(String),
    /// A requester id appears twice.
    #[error("function {0} is listed twice")]
    Duplicate(SourceId),
    /// Invalidate queue depth out of range.
    #[error("invalidate queue depth {1} of {0} is outside 1..={MAX_QUEUE_DEPTH}")]
    QueueDepth(SourceId, u8),
    /// STU out of range.
    #[error("smallest translation unit {1} of {0} is outside 0..={MAX_STU}")]
    Stu(SourceId, u8),
    /// PRI capacity out of range.
    #[error("page request capacity {1} of {0} is above {MAX_PAGE_REQUESTS}")]
    PageRequests(SourceId, u16),
    /// Device TLB capacity out of range.
    #[error("device TLB capacity {1} of {0} is outside 1..={MAX_CAPACITY}")]
    Capacity(SourceId, usize),
    /// Batch size out of range.
    #[error("link batch size {0} is outside 1..={MAX_ITEMS_PER_MESSAGE}")]
    Batch(usize),
    /// Reconnection delays that make no sense.
    #[error("reconnection delays must be positive, the maximum at least the initial")]
    Backoff,
    /// A zero time-out.
    #[error("time-outs must be positive")]
    Timeout,
    /// A zero trace size bound.
    #[error("the trace size bound must be positive")]
    TraceBytes,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> AgentConfig {
        AgentConfig::new("127.0.0.1:50051", vec![FunctionConfig::new(SourceId::new(0, 1, 0))])
    }

    #[test]
    fn defaults_validate_and_urls_get_a_scheme() {
        let a = agent();
        assert_eq!(a.validate(), Ok(()));
        assert_eq!(a.server_url(), "http://127.0.0.1:50051");
        let b = AgentConfig { server: "https://dmar:443".into(), ..agent() };
        assert_eq!(b.server_url(), "https://dmar:443");
        assert_eq!(b.validate(), Err(ConfigError::TlsUrlWithoutTls("https://dmar:443".into())));
    }

    #[test]
    fn tls_wants_https() -> Result<(), Box<dyn std::error::Error>> {
        let pki = dmar_auth::DevPki::generate(&dmar_auth::DevPkiSpec::default())?;
        let tls = crate::AgentTls::new(pki.tls_material("agent-0")?, "dmar-server")?;
        let secure = AgentConfig { security: AgentSecurity::mutual_tls(tls), ..agent() };
        assert_eq!(secure.server_url(), "https://127.0.0.1:50051");
        assert_eq!(secure.validate(), Ok(()));
        let plain_url = AgentConfig { server: "http://127.0.0.1:50051".into(), ..secure.clone() };
        assert_eq!(plain_url.validate(), Err(ConfigError::PlaintextUrl("http://127.0.0.1:50051".into())));
        assert_eq!(AgentConfig { max_trace_bytes: 0, ..secure }.validate(), Err(ConfigError::TraceBytes));
        Ok(())
    }

    #[test]
    fn every_rule_is_checked() {
        let f = FunctionConfig::new(SourceId::new(0, 1, 0));
        let with = |g: FunctionConfig| AgentConfig { functions: vec![g], ..agent() };
        assert_eq!(AgentConfig { functions: vec![], ..agent() }.validate(), Err(ConfigError::FunctionCount(0)));
        assert!(matches!(
            AgentConfig { functions: vec![f.clone(), f.clone()], ..agent() }.validate(),
            Err(ConfigError::Duplicate(_))
        ));
        assert!(matches!(
            with(FunctionConfig { invalidate_queue_depth: 0, ..f.clone() }).validate(),
            Err(ConfigError::QueueDepth(..))
        ));
        assert!(matches!(
            with(FunctionConfig { invalidate_queue_depth: 33, ..f.clone() }).validate(),
            Err(ConfigError::QueueDepth(..))
        ));
        assert!(matches!(
            with(FunctionConfig { smallest_translation_unit: 32, ..f.clone() }).validate(),
            Err(ConfigError::Stu(..))
        ));
        assert!(matches!(
            with(FunctionConfig { page_request_capacity: 513, ..f.clone() }).validate(),
            Err(ConfigError::PageRequests(..))
        ));
        assert!(matches!(
            with(FunctionConfig { atc_capacity: 0, ..f.clone() }).validate(),
            Err(ConfigError::Capacity(..))
        ));
        assert!(matches!(AgentConfig { server: "ftp://x".into(), ..agent() }.validate(), Err(ConfigError::Server(_))));
        assert!(matches!(AgentConfig { max_batch: 0, ..agent() }.validate(), Err(ConfigError::Batch(0))));
        assert!(matches!(
            AgentConfig { reconnect_initial: Duration::ZERO, ..agent() }.validate(),
            Err(ConfigError::Backoff)
        ));
    }
}
