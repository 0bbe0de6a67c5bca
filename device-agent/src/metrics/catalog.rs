//! Every metric an agent exports, with its type, labels, unit and description: the one
//! list the descriptions, the buckets, the tests and `docs/METRICS.md` come from.

use metrics::Unit;

/// Buckets of translation (miss) latency, seconds: 5 µs to 1 s.
const TRANSLATION_BUCKETS: &[f64] =
    &[5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 10e-3, 100e-3, 1.0];
/// Buckets of invalidation handling time, seconds: 1 µs to 1 s.
const INVALIDATION_BUCKETS: &[f64] = &[1e-6, 5e-6, 10e-6, 50e-6, 100e-6, 500e-6, 1e-3, 5e-3, 25e-3, 100e-3, 1.0];
/// Buckets of items per outbound link message.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];

use dmar_process::metric_doc::label;
pub use dmar_process::metric_doc::{Kind, LabelDoc, MetricDoc};

/// Every metric the agent exports, in the order of `docs/METRICS.md`. Names and label
/// values are an interface: dashboards, `deploy/prometheus/rules.yml` and tests use them.
pub const METRICS: &[MetricDoc] = &[
    MetricDoc {
        name: "dmar_agent_accesses_total",
        kind: Kind::Counter,
        labels: &[label("result", &["ok", "fault", "aborted"])],
        unit: None,
        help: "Accesses finished by emulated functions, by result",
        notes: "`fault`: refused for want of a usable translation, or a DMA the server failed.",
    },
    MetricDoc {
        name: "dmar_agent_atc_lookups_total",
        kind: Kind::Counter,
        labels: &[label("result", &["hit", "miss"])],
        unit: None,
        help: "Device TLB lookups, by result",
        notes: "Hit ratio = hit / (hit + miss).",
    },
    MetricDoc {
        name: "dmar_agent_atc_coalesced_misses_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Misses that joined an outstanding translation request",
        notes: "",
    },
    MetricDoc {
        name: "dmar_agent_atc_evictions_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Device TLB entries evicted to make room",
        notes: "",
    },
    MetricDoc {
        name: "dmar_agent_atc_invalidated_entries_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Device TLB entries dropped by invalidation requests",
        notes: "",
    },
    MetricDoc {
        name: "dmar_agent_atc_entries",
        kind: Kind::Gauge,
        labels: &[],
        unit: None,
        help: "Entries held in the device TLBs of the process's functions",
        notes: "",
    },
    MetricDoc {
        name: "dmar_agent_translation_requests_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "ATS translation requests sent",
        notes: "",
    },
    MetricDoc {
        name: "dmar_agent_translation_errors_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Translation completions with UR or CA status",
        notes: "",
    },
    MetricDoc {
        name: "dmar_agent_translation_stale_completions_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Completions overtaken by an invalidation and retried",
        notes: "",
    },
    MetricDoc {
        name: "dmar_agent_translation_duration_seconds",
        kind: Kind::Histogram(TRANSLATION_BUCKETS),
        labels: &[],
        unit: Some(Unit::Seconds),
        help: "Time from a device TLB miss to its translation (page requests included); one miss in 16 per function",
        notes: "Buckets from 5 µs to 1 s.",
    },
    MetricDoc {
        name: "dmar_agent_faults_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Accesses refused for want of a usable translation",
        notes: "",
    },
    MetricDoc {
        name: "dmar_agent_invalidations_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "ATS invalidation requests completed",
        notes: "",
    },
    MetricDoc {
        name: "dmar_agent_invalidation_duration_seconds",
        kind: Kind::Histogram(INVALIDATION_BUCKETS),
        labels: &[],
        unit: Some(Unit::Seconds),
        help: "Time from an invalidation request to its completion (entries dropped, DMA drained)",
        notes: "Buckets from 1 µs to 1 s.",
    },
    MetricDoc {
        name: "dmar_agent_page_requests_total",
        kind: Kind::Counter,
        labels: &[label("result", &["sent", "failed"])],
        unit: None,
        help: "PRI page requests, by result (sent, failed)",
        notes: "`failed`: refused or never answered.",
    },
    MetricDoc {
        name: "dmar_agent_dma_total",
        kind: Kind::Counter,
        labels: &[label("result", &["ok", "failed", "sent"]), label("kind", &["any", "untranslated"])],
        unit: None,
        help: "DMA requests, by result and kind",
        notes: "Three series: `kind` = any with `result` = ok or failed counts completions (translated and \
                untranslated), `kind` = untranslated with `result` = sent counts untranslated requests as they \
                are sent.",
    },
    MetricDoc {
        name: "dmar_agent_baseline_calls_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Baseline translations: unary Control.Translate calls, or link requests of one access each (link \
               baseline)",
        notes: "",
    },
    MetricDoc {
        name: "dmar_agent_link_up",
        kind: Kind::Gauge,
        labels: &[],
        unit: None,
        help: "ATS links of the process that are bound now",
        notes: "",
    },
    MetricDoc {
        name: "dmar_agent_link_connections_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Successful ATS link binds (reconnections included)",
        notes: "",
    },
    MetricDoc {
        name: "dmar_agent_link_messages_total",
        kind: Kind::Counter,
        labels: &[label("direction", &["up", "down"])],
        unit: None,
        help: "ATS link messages, by direction",
        notes: "`up`: to the server; `down`: from it.",
    },
    MetricDoc {
        name: "dmar_agent_link_batch_items",
        kind: Kind::Histogram(BATCH_BUCKETS),
        labels: &[],
        unit: None,
        help: "Items per outbound ATS link message",
        notes: "Buckets from 1 to 4096 items.",
    },
    MetricDoc {
        name: "dmar_agent_functions",
        kind: Kind::Gauge,
        labels: &[],
        unit: None,
        help: "Emulated functions hosted by the process's agents",
        notes: "",
    },
    MetricDoc {
        name: "dmar_agent_control_refusals_total",
        kind: Kind::Counter,
        labels: &[label(
            "reason",
            &["no_certificate", "untrusted_identity", "trace_disabled", "trace_path", "trace_size"],
        )],
        unit: None,
        help: "Control port requests refused, by reason (no_certificate, untrusted_identity, trace_disabled, \
               trace_path, trace_size)",
        notes: "No client certificate (UNAUTHENTICATED), an identity outside `--trust-client` (PERMISSION_DENIED), \
                a trace workload without `--trace-dir`, a trace path outside it, a trace file over \
                `--max-trace-bytes`. Logged at most once a second per reason.",
    },
    MetricDoc {
        name: dmar_auth::CONNECTION_REFUSALS,
        kind: Kind::Counter,
        labels: &[label(
            "reason",
            &["max_connections", "handshake_failed", "handshake_timeout", "no_first_bytes", "unusable_identity"],
        )],
        unit: None,
        help: "Connections closed before they were served, by reason (max_connections, handshake_failed, \
               handshake_timeout, no_first_bytes, unusable_identity)",
        notes: "Counted by `dmar-auth`'s accept loop on the control and health ports, as on the server (see there).",
    },
];

/// Every metric name of [`METRICS`], for dashboards and tests.
pub const METRIC_NAMES: &[&str] = &dmar_process::metric_doc::names::<{ METRICS.len() }>(METRICS);
