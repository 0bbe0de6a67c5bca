//! Refused control requests: counted per reason, logged at most once a second per reason.
//!
//! A client that is refused can retry as fast as it likes; a log line per refusal would
//! let it fill the disk and drown everything else. So each reason has a one-second
//! window: the first refusal in it is logged with the number suppressed since the last
//! line, the rest are only counted (`dmar_agent_control_refusals_total{reason}`).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dmar_auth::Identity;
use metrics::Counter;

use super::name::printable_name;
use crate::metrics::AgentMetrics;

/// At most one log line per reason in this time.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Why a control request was refused: a bounded label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// TLS without a client certificate (health excepted).
    NoCertificate,
    /// A verified certificate whose identity the control port does not trust.
    UntrustedIdentity,
    /// A trace file named while the agent has no trace directory.
    TraceDisabled,
    /// A trace path that is absolute, climbs with `..`, leads outside the directory or is
    /// not a regular file.
    TracePath,
    /// A trace file larger than the bound.
    TraceSize,
}

impl Refusal {
    /// Every reason, in label order.
    pub(crate) const ALL: [Refusal; 5] = [
        Refusal::NoCertificate,
        Refusal::UntrustedIdentity,
        Refusal::TraceDisabled,
        Refusal::TracePath,
        Refusal::TraceSize,
    ];

    /// The `reason` label.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Refusal::NoCertificate => "no_certificate",
            Refusal::UntrustedIdentity => "untrusted_identity",
            Refusal::TraceDisabled => "trace_disabled",
            Refusal::TracePath => "trace_path",
            Refusal::TraceSize => "trace_size",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// Who was refused, for the log line.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Refused<'a> {
    /// The peer's address.
    pub(crate) peer: Option<SocketAddr>,
    /// The peer's verified identity.
    pub(crate) identity: Option<&'a Identity>,
    /// The trace path asked for (printed through `printable_name`).
    pub(crate) path: Option<&'a str>,
}

/// One reason's log window.
#[derive(Debug, Default, Clone, Copy)]
struct Window {
    last: Option<Instant>,
    suppressed: u64,
}

impl Window {
    /// Whether a line may be written at `now`: `Some(n)` with the refusals suppressed
    /// since the last line, or `None` (and one more suppressed).
    fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < LOG_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// The refusal counters and log windows of one agent's control port.
#[derive(Debug)]
pub(crate) struct Refusals {
    counters: [Counter; Refusal::ALL.len()],
    windows: Mutex<[Window; Refusal::ALL.len()]>,
}

impl Refusals {
    pub(crate) fn new(metrics: &AgentMetrics) -> Self {
        Self { counters: metrics.refusals.clone(), windows: Mutex::new([Window::default(); Refusal::ALL.len()]) }
    }

    /// Counts a refusal, and logs it unless its reason was logged less than a second ago.
    pub(crate) fn refuse(&self, reason: Refusal, who: Refused<'_>) {
        self.counters[reason.index()].increment(1);
        let admitted = {
            let mut windows = self.windows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            windows[reason.index()].admit(Instant::now())
        };
        if let Some(suppressed) = admitted {
            tracing::warn!(
                reason = reason.as_str(),
                peer = ?who.peer,
                identity = who.identity.map(Identity::as_str),
                path = who.path.map(printable_name),
                suppressed,
                "control request refused"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_second_with_the_count_of_the_rest() {
        let t0 = Instant::now();
        let mut w = Window::default();
        assert_eq!(w.admit(t0), Some(0));
        for ms in [1, 10, 500, 999] {
            assert_eq!(w.admit(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(w.admit(t0 + Duration::from_millis(1000)), Some(4));
        assert_eq!(w.admit(t0 + Duration::from_millis(1500)), None);
        assert_eq!(w.admit(t0 + Duration::from_secs(60)), Some(1));
        assert_eq!(w.admit(t0 + Duration::from_secs(62)), Some(0));
    }

    #[test]
    fn labels_are_in_order_and_distinct() {
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let mut labels: Vec<_> = Refusal::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Refusal::ALL.len());
    }

    #[test]
    fn every_refusal_is_counted_however_many_are_logged() {
        let refusals = Refusals::new(&crate::metrics::handles());
        let before = crate::metrics::prometheus().render();
        let count = |text: &str| -> u64 {
            text.lines()
                .find(|l| l.starts_with("dmar_agent_control_refusals_total{reason=\"trace_size\"}"))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        for _ in 0..100 {
            refusals.refuse(Refusal::TraceSize, Refused { path: Some("big\n.trace"), ..Refused::default() });
        }
        // Other tests in this process may refuse too; at least these hundred are there.
        assert!(count(&crate::metrics::prometheus().render()) >= count(&before) + 100);
    }
}
