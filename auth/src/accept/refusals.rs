//! Connections the acceptor closes before serving them: counted per reason in
//! [`CONNECTION_REFUSALS`] and logged at warn at most once a second per reason, with the
//! number of refusals the log left out since, so a peer that hammers a port can neither
//! flood the log nor go unseen.
//!
//! This module owns the reasons ([`ConnectionRefusal`]) and their counters
//! ([`ConnectionRefusals`]), registered either on the process's global `metrics` recorder
//! (the server's) or on a recorder the process keeps for itself (the agent's). It does not
//! decide what is refused: the accept loop (`accept`) and the limiter do.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dmar_process::{RateLimit, client_text};
use metrics::{Counter, Key, KeyName, Label, Metadata, Recorder, SharedString};
use tracing::{debug, warn};

use crate::identity::Identity;

/// The counter of refused connections, labelled `reason` ([`ConnectionRefusal::label`]).
/// The same name in every process that accepts connections through this crate (the
/// server's gRPC and health ports, an agent's control port); the scrape's `instance` tells
/// them apart.
pub const CONNECTION_REFUSALS: &str = "dmar_auth_connection_refusals_total";

const DESCRIPTION: &str = "Connections closed before they were served, by reason (max_connections, handshake_failed, \
                           handshake_timeout, no_first_bytes, unusable_identity)";

/// Why the acceptor closed a connection: the bounded `reason` label of
/// [`CONNECTION_REFUSALS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectionRefusal {
    /// The peer's identity (or the shared bucket of unnamed and anonymous peers) holds its
    /// `max_connections` already.
    MaxConnections,
    /// The TLS handshake failed: a plaintext client, a certificate from another CA, a peer
    /// that left part way.
    HandshakeFailed,
    /// The TLS handshake did not finish within the handshake time-out.
    HandshakeTimeout,
    /// A plaintext peer sent nothing within the time-out (the plaintext handshake time-out).
    NoFirstBytes,
    /// The certificate chains to the CA but carries no usable identity (an issuing mistake).
    UnusableIdentity,
}

impl ConnectionRefusal {
    /// Every reason, in label order.
    pub const ALL: [ConnectionRefusal; 5] = [
        ConnectionRefusal::MaxConnections,
        ConnectionRefusal::HandshakeFailed,
        ConnectionRefusal::HandshakeTimeout,
        ConnectionRefusal::NoFirstBytes,
        ConnectionRefusal::UnusableIdentity,
    ];

    /// The `reason` label.
    pub const fn label(self) -> &'static str {
        match self {
            ConnectionRefusal::MaxConnections => "max_connections",
            ConnectionRefusal::HandshakeFailed => "handshake_failed",
            ConnectionRefusal::HandshakeTimeout => "handshake_timeout",
            ConnectionRefusal::NoFirstBytes => "no_first_bytes",
            ConnectionRefusal::UnusableIdentity => "unusable_identity",
        }
    }
}

/// One warn line per reason per second, process-wide.
static LOG_LIMITS: [RateLimit; ConnectionRefusal::ALL.len()] =
    [const { RateLimit::per_second() }; ConnectionRefusal::ALL.len()];

/// The refusal counters of one or more accept loops: what the metrics exporter shows, and
/// the same counts readable in process ([`ConnectionRefusals::count`]) for tests and
/// embedders without an exporter. Cheap to clone; clones count together.
#[derive(Clone, Debug)]
pub struct ConnectionRefusals {
    inner: Arc<Counts>,
}

#[derive(Debug)]
struct Counts {
    counters: [Counter; ConnectionRefusal::ALL.len()],
    counts: [AtomicU64; ConnectionRefusal::ALL.len()],
}

impl ConnectionRefusals {
    /// Counters on the global `metrics` recorder installed when this is called (the
    /// server's); with none installed only [`ConnectionRefusals::count`] sees them.
    pub fn global() -> Self {
        metrics::describe_counter!(CONNECTION_REFUSALS, DESCRIPTION);
        Self::with(|why| metrics::counter!(CONNECTION_REFUSALS, "reason" => why.label()))
    }

    /// Counters registered on `recorder`, for a process that keeps its metrics on its own
    /// recorder rather than the global one (the agent).
    pub fn on(recorder: &dyn Recorder) -> Self {
        recorder.describe_counter(KeyName::from(CONNECTION_REFUSALS), None, SharedString::from(DESCRIPTION));
        let meta = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));
        Self::with(|why| {
            let key = Key::from_parts(CONNECTION_REFUSALS, vec![Label::new("reason", why.label())]);
            recorder.register_counter(&key, &meta)
        })
    }

    fn with(counter: impl FnMut(ConnectionRefusal) -> Counter) -> Self {
        let counts = Counts { counters: ConnectionRefusal::ALL.map(counter), counts: Default::default() };
        Self { inner: Arc::new(counts) }
    }

    /// Refusals of kind `why` counted so far.
    pub fn count(&self, why: ConnectionRefusal) -> u64 {
        self.inner.counts[why as usize].load(Ordering::Relaxed)
    }

    /// Counts one refusal of the connection from `peer`; logs it at warn, or at debug when
    /// a warn line for this reason went out within the last second. `error` (a TLS
    /// error, which may quote what the peer sent) is capped and escaped.
    pub(crate) fn record(
        &self,
        why: ConnectionRefusal,
        peer: SocketAddr,
        identity: Option<&Identity>,
        error: Option<&dyn fmt::Display>,
    ) {
        let i = why as usize;
        self.inner.counters[i].increment(1);
        self.inner.counts[i].fetch_add(1, Ordering::Relaxed);
        let error = error.map(|e| client_text(&e.to_string()).to_string()).unwrap_or_default();
        // Identities are validated names (`Identity`), safe in a log line.
        let identity = identity.map(Identity::as_str);
        match LOG_LIMITS[i].check() {
            Some(suppressed) => {
                warn!(reason = why.label(), peer = %peer, identity, error, suppressed, "connection refused");
            }
            None => debug!(reason = why.label(), peer = %peer, identity, error, "connection refused"),
        }
    }
}
