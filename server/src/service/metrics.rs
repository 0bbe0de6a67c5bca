//! The server's Prometheus metrics: names, descriptions, buckets, and the handles the hot
//! paths touch.
//!
//! Naming follows `dmar_<subsystem>_<name>_<unit>` with base units and `_total` counters;
//! labels are bounded enums, never device ids. Counters the unit already keeps (lock-free,
//! striped) are copied into the exporter by [`Metrics::refresh`] when `/metrics` is
//! scraped, rather than counted twice on the translation path.
//!
//! [`METRICS`] lists every metric with its type, labels, unit and description: the
//! descriptions and buckets are made from it, its tests check the registered exposition
//! and `docs/METRICS.md` against it. It does not register the handles (`Metrics::new`,
//! the access checks and the accept loop do).

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, KeyName, SharedString, Unit, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use dmar_vtd::unit::{FaultReason, UnitStats};

/// Histogram buckets for page walks (seconds): 25 ns to 100 µs.
const WALK_BUCKETS: &[f64] = &[25e-9, 50e-9, 100e-9, 200e-9, 400e-9, 800e-9, 1.6e-6, 3.2e-6, 10e-6, 100e-6];
/// Histogram buckets for device-TLB invalidations (seconds): 10 µs to 10 s.
const DEVTLB_BUCKETS: &[f64] = &[10e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 10e-3, 50e-3, 250e-3, 1.0, 10.0];
/// Histogram buckets for link message handling (seconds).
const LINK_BUCKETS: &[f64] = &[1e-6, 5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 1e-3, 10e-3];

/// The recorder builder with dmar's buckets: every histogram of [`METRICS`] gets its own.
fn builder() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    let mut builder = PrometheusBuilder::new();
    for m in METRICS {
        if let Kind::Histogram(buckets) = m.kind {
            builder = builder.set_buckets_for_metric(Matcher::Full(m.name.into()), buckets)?;
        }
    }
    Ok(builder)
}

/// Installs the global Prometheus recorder with dmar's buckets. Returns the render handle
/// (the caller serves it) or an error if a recorder is already installed.
pub(crate) fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    builder()?.install_recorder()
}

/// What Prometheus types a metric as.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// Only grows (or is copied from a counter that only grows).
    Counter,
    /// Set to the current value.
    Gauge,
    /// Samples in these explicit buckets (without them the exporter would render a summary).
    Histogram(&'static [f64]),
}

impl Kind {
    /// The Prometheus type name (`# TYPE` in the exposition).
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram(_) => "histogram",
        }
    }
}

/// One label of a metric and every value it takes (labels are bounded sets).
#[derive(Clone, Copy, Debug)]
pub struct LabelDoc {
    /// The label's name.
    pub name: &'static str,
    /// Every value the server registers for it.
    pub values: &'static [&'static str],
}

/// One metric the server exports: the single source of its description (`# HELP`), its
/// buckets, and its row in `docs/METRICS.md`, so the three cannot drift apart.
#[derive(Clone, Copy, Debug)]
pub struct MetricDoc {
    /// The family name, `dmar_<subsystem>_<name>_<unit>`.
    pub name: &'static str,
    /// Counter, gauge, or histogram with its buckets.
    pub kind: Kind,
    /// The labels with their values; empty for an unlabelled metric.
    pub labels: &'static [LabelDoc],
    /// The base unit, if the value has one.
    pub unit: Option<Unit>,
    /// The one-line description the exporter serves as `# HELP`.
    pub help: &'static str,
    /// What an operator needs beyond `help` (carried into the docs, not the exposition).
    pub notes: &'static str,
}

const fn label(name: &'static str, values: &'static [&'static str]) -> LabelDoc {
    LabelDoc { name, values }
}

/// Every metric the server exports, in the order of `docs/METRICS.md`. Names and label
/// values are an interface: dashboards, `deploy/prometheus/rules.yml` and tests use them.
pub const METRICS: &[MetricDoc] = &[
    MetricDoc {
        name: "dmar_unit_translations_total",
        kind: Kind::Counter,
        labels: &[
            label("kind", &["untranslated", "ats", "translated"]),
            label("result", &["ok", "blocked", "no_access", "error"]),
        ],
        unit: None,
        help: "Requests answered by the unit, by kind and result",
        notes: "`ats`/`no_access` is a successful completion with R=W=0. Summed over the platform's units.",
    },
    MetricDoc {
        name: "dmar_unit_cache_lookups_total",
        kind: Kind::Counter,
        labels: &[label("cache", &["iotlb", "context", "paging"]), label("result", &["hit", "miss"])],
        unit: None,
        help: "Lookups in the unit's caches, by cache and result",
        notes: "Hit ratio = hit / (hit + miss).",
    },
    MetricDoc {
        name: "dmar_unit_walks_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Page walks (IOTLB misses)",
        notes: "",
    },
    MetricDoc {
        name: "dmar_unit_walk_loads_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Page-table entries read by walks",
        notes: "",
    },
    MetricDoc {
        name: "dmar_unit_walk_duration_seconds",
        kind: Kind::Histogram(WALK_BUCKETS),
        labels: &[],
        unit: Some(Unit::Seconds),
        help: "Duration of sampled page walks (one in 64 per thread)",
        notes: "Buckets from 25 ns to 100 µs.",
    },
    MetricDoc {
        name: "dmar_unit_stale_uses_total",
        kind: Kind::Counter,
        labels: &[label("cache", &["iotlb", "context"])],
        unit: None,
        help: "Cache hits served although the source entry had changed",
        notes: "Software changed the entry in memory without invalidating the cache.",
    },
    MetricDoc {
        name: "dmar_unit_faults_total",
        kind: Kind::Counter,
        labels: &[label(
            "reason",
            &[
                "root_entry_not_present",
                "context_entry_not_present",
                "context_entry_invalid",
                "address_beyond_width",
                "no_write",
                "no_read",
                "paging_entry_access",
                "root_table_invalid",
                "context_table_invalid",
                "root_entry_reserved",
                "context_entry_reserved",
                "paging_entry_reserved",
                "translation_type_blocked",
                "interrupt_address",
                "ir_request_reserved",
                "ir_index_overflow",
                "ir_entry_not_present",
                "ir_table_access",
                "ir_entry_reserved",
                "ir_compat_blocked",
                "ir_source_id",
            ],
        )],
        unit: None,
        help: "Faults recorded, by reason",
        notes: "Recorded in the fault recording registers; the `reason` is the VT-d fault reason's name \
                (`FaultReason` in dmar-vtd). Each reaches `WatchFaults` once the driver services the registers.",
    },
    MetricDoc {
        name: "dmar_unit_faults_dropped_total",
        kind: Kind::Counter,
        labels: &[label("cause", &["fpd", "overflow"])],
        unit: None,
        help: "Faults not recorded, by cause (fpd, overflow)",
        notes: "Suppressed by a context entry's fault processing disable (`fpd`), or lost because all 8 fault \
                recording registers still held faults the driver had not yet serviced (`overflow`, FSTS.PFO: \
                faults arriving faster than the server's fault pump). Recorded plus `overflow` is every \
                recordable fault.",
    },
    MetricDoc {
        name: "dmar_unit_protected_memory_blocked_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "DMA blocked by a protected memory region (PMEN.EPM), recorded as no fault",
        notes: "VT-d 10.4.16: untranslated while translation is off, pass-through, or translated requests into a \
                region. Client-driven units start with the regions over all memory (docs/PLATFORM.md), so \
                devices behind them show up here until the owner enables translation. Summed over the \
                platform's units.",
    },
    MetricDoc {
        name: "dmar_unit_invalidation_descriptors_total",
        kind: Kind::Counter,
        labels: &[label("type", &["context", "iotlb", "device_tlb", "iec", "wait", "page_response"])],
        unit: None,
        help: "Invalidation descriptors processed, by type",
        notes: "",
    },
    MetricDoc {
        name: "dmar_unit_invalidation_queue_errors_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Invalidation queue errors (IQE)",
        notes: "",
    },
    MetricDoc {
        name: "dmar_unit_device_tlb_invalidation_duration_seconds",
        kind: Kind::Histogram(DEVTLB_BUCKETS),
        labels: &[],
        unit: Some(Unit::Seconds),
        help: "Round trip of device-TLB invalidations to their function",
        notes: "Buckets from 10 µs to 10 s.",
    },
    MetricDoc {
        name: "dmar_unit_device_tlb_timeouts_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Device-TLB invalidations abandoned by a time-out (ITE)",
        notes: "",
    },
    MetricDoc {
        name: "dmar_unit_translated_check_refusals_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Translated requests refused by translated-request checking (outside what the unit completed for the \
               function)",
        notes: "Only functions attached with `check_translated` (docs/SECURITY.md): outside every range the unit \
                completed for the function, or without the permission. Each is also a recorded fault \
                (`no_read`/`no_write`) and a blocked translated request.",
    },
    MetricDoc {
        name: "dmar_unit_translated_check_grants_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Translation completions recorded as grants for translated-request checking",
        notes: "",
    },
    MetricDoc {
        name: "dmar_unit_translated_check_evictions_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Grants evicted because a function reached its bound (translated-request checking)",
        notes: "The bound is 4096 grants per function.",
    },
    MetricDoc {
        name: "dmar_link_connections",
        kind: Kind::Gauge,
        labels: &[],
        unit: None,
        help: "Live ATS links",
        notes: "",
    },
    MetricDoc {
        name: "dmar_link_bound_functions",
        kind: Kind::Gauge,
        labels: &[],
        unit: None,
        help: "Functions bound on live ATS links",
        notes: "",
    },
    MetricDoc {
        name: "dmar_link_messages_total",
        kind: Kind::Counter,
        labels: &[label("kind", &["translation", "dma", "invalidation", "msi", "page_request"])],
        unit: None,
        help: "ATS link items, by kind",
        notes: "Items received over ATS links (several to a message).",
    },
    MetricDoc {
        name: "dmar_link_batch_duration_seconds",
        kind: Kind::Histogram(LINK_BUCKETS),
        labels: &[],
        unit: Some(Unit::Seconds),
        help: "Time to handle one inbound link message",
        notes: "Buckets from 1 µs to 10 ms.",
    },
    MetricDoc {
        name: "dmar_link_reply_budget_waits_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Times a link stopped reading until the agent took the replies it owed (reply byte budget full)",
        notes: "The budget is 16 MiB of replies not yet taken by the transport: an agent that does not read.",
    },
    MetricDoc {
        name: "dmar_prq_page_requests_total",
        kind: Kind::Counter,
        labels: &[label("result", &["queued", "overflow"])],
        unit: None,
        help: "Page requests, by result (queued, overflow)",
        notes: "From functions, over their links.",
    },
    MetricDoc {
        name: "dmar_interrupt_remapped_total",
        kind: Kind::Counter,
        labels: &[label("result", &["remapped", "blocked"])],
        unit: None,
        help: "MSI writes, by result",
        notes: "From functions, over their links.",
    },
    MetricDoc {
        name: "dmar_server_cpu_used_seconds",
        kind: Kind::Gauge,
        labels: &[],
        unit: Some(Unit::Seconds),
        help: "CPU time used by the server process",
        notes: "User plus system, read from `/proc/self/stat` at each scrape.",
    },
    MetricDoc {
        name: "dmar_server_refusals_total",
        kind: Kind::Counter,
        labels: &[label(
            "reason",
            &[
                "page_request_capacity",
                "page_group_not_outstanding",
                "invalid_descriptor",
                "link_protocol",
                "unit_ownership",
            ],
        )],
        unit: None,
        help: "Peer requests refused with a status or a PCIe failure response, by reason",
        notes: "`page_request_capacity`: a page request past its function's bound capacity (a last request is \
                answered with Response Failure, others dropped). `page_group_not_outstanding`: \
                `RespondPageRequest` for a group with no request outstanding (FAILED_PRECONDITION). \
                `invalid_descriptor`: a raw invalidation descriptor refused by the driver or the unit \
                (INVALID_ARGUMENT). `link_protocol`: a link closed for breaking the protocol. `unit_ownership`: a \
                call on a unit or memory region its caller does not own (docs/SECURITY.md, \"Client-driven \
                units\"): a claim of a held or built-in unit, a register or region write without the unit's lease \
                (PERMISSION_DENIED), a write into the built-in driver's region, a map into a client-driven unit's \
                region, a built-in-only call aimed at a client-driven unit.",
    },
    MetricDoc {
        name: "dmar_server_auth_refusals_total",
        kind: Kind::Counter,
        labels: &[label(
            "reason",
            &[
                "no_certificate",
                "unknown_identity",
                "wrong_role",
                "requester_id_range",
                "requester_id_owned",
                "domain_owner",
            ],
        )],
        unit: None,
        help: "Calls refused by authentication or authorisation, by reason",
        notes: "docs/SECURITY.md: no client certificate (UNAUTHENTICATED), an identity the policy does not name, a \
                role the method does not allow, a bind outside the device's requester-id ranges or of an id \
                another identity owns, a domain destroyed by an operator who did not create it \
                (PERMISSION_DENIED). Logged at most once a second per reason.",
    },
    MetricDoc {
        name: "dmar_server_quota_refusals_total",
        kind: Kind::Counter,
        labels: &[label("quota", &["max_links", "max_domains", "max_frames"])],
        unit: None,
        help: "Calls refused because the caller reached a quota, by quota",
        notes: "RESOURCE_EXHAUSTED: a link past `max_links`, a domain past `max_domains`, a map (or a new paging \
                domain) needing more page-table frames than the domain owner's `max_frames` leaves.",
    },
    MetricDoc {
        name: "dmar_server_watch_events_dropped_total",
        kind: Kind::Counter,
        labels: &[label("stream", &["faults", "interrupts", "page_requests", "unit_interrupts"])],
        unit: None,
        help: "Events a watcher lost by falling more than 4096 behind its stream, by stream",
        notes: "The oldest go first; the unit never waits for a watcher.",
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
        notes: "Counted by the accept loop (`dmar-auth`) on the gRPC port and the health port: an identity already \
                holding its `max_connections` (unnamed and anonymous peers share one bucket of 16), a failed TLS \
                handshake (a plaintext client, another CA's certificate), a handshake not finished within 10 s, a \
                plaintext peer silent for 10 s, a CA-signed certificate without a usable identity. Logged at warn \
                at most once a second per reason. The same metric on every agent (its control and health ports).",
    },
];

/// Every metric name of [`METRICS`], for dashboards and tests.
pub const METRIC_NAMES: &[&str] = &{
    let mut names = [""; METRICS.len()];
    let mut i = 0;
    while i < METRICS.len() {
        names[i] = METRICS[i].name;
        i += 1;
    }
    names
};

/// Why the server refused a peer's request: the `reason` label of
/// `dmar_server_refusals_total` (a bounded set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A page request past its function's outstanding page request capacity.
    PageRequestCapacity,
    /// A page group response for a group that is not outstanding.
    PageGroupNotOutstanding,
    /// A raw invalidation descriptor the driver or the unit refused.
    InvalidDescriptor,
    /// A link message that broke the protocol (the link is closed).
    LinkProtocol,
    /// A call on a unit or region its caller does not own: a claim of a held or built-in
    /// unit, a write without the unit's lease, a write or map into a driver's region, a
    /// raw call on a unit of the other kind.
    UnitOwnership,
}

impl Refusal {
    const ALL: [Refusal; 5] = [
        Self::PageRequestCapacity,
        Self::PageGroupNotOutstanding,
        Self::InvalidDescriptor,
        Self::LinkProtocol,
        Self::UnitOwnership,
    ];

    /// The label value.
    fn name(self) -> &'static str {
        match self {
            Self::PageRequestCapacity => "page_request_capacity",
            Self::PageGroupNotOutstanding => "page_group_not_outstanding",
            Self::InvalidDescriptor => "invalid_descriptor",
            Self::LinkProtocol => "link_protocol",
            Self::UnitOwnership => "unit_ownership",
        }
    }
}

/// Describes every metric of [`METRICS`] to the current recorder. The first description of a
/// name wins, so these are the ones served even where another module describes its own.
fn describe() {
    metrics::with_recorder(|r| {
        for m in METRICS {
            let (name, help) = (KeyName::from(m.name), SharedString::from(m.help));
            match m.kind {
                Kind::Counter => r.describe_counter(name, m.unit, help),
                Kind::Gauge => r.describe_gauge(name, m.unit, help),
                Kind::Histogram(_) => r.describe_histogram(name, m.unit, help),
            }
        }
    });
}

/// A counter mirrored from one field of the unit's stats.
type Mirrored = (Counter, fn(&UnitStats) -> u64);

/// Handles, registered once.
#[derive(Clone)]
pub(crate) struct Metrics {
    translations: [Mirrored; 7],
    lookups: [Mirrored; 6],
    walks: Counter,
    walk_loads: Counter,
    stale: [Mirrored; 2],
    dropped: [Mirrored; 2],
    descriptors: [Mirrored; 6],
    queue_errors: Counter,
    devtlb_timeouts: Counter,
    translated_check: [Mirrored; 3],
    protected_memory: [Mirrored; 1],
    cpu: Gauge,
    pub(crate) walk_duration: Histogram,
    pub(crate) devtlb_duration: Histogram,
    pub(crate) faults: Arc<[Counter; 256]>,
    pub(crate) connections: Gauge,
    pub(crate) bound_functions: Gauge,
    pub(crate) link_translations: Counter,
    pub(crate) link_dma: Counter,
    pub(crate) link_invalidations: Counter,
    pub(crate) link_msi: Counter,
    pub(crate) link_page_requests: Counter,
    pub(crate) batch_duration: Histogram,
    pub(crate) prq_queued: Counter,
    pub(crate) prq_overflow: Counter,
    pub(crate) irq_remapped: Counter,
    pub(crate) irq_blocked: Counter,
    refusals: [Counter; Refusal::ALL.len()],
    pub(crate) reply_budget_waits: Counter,
    /// Events lost by slow watchers of WatchFaults, WatchInterrupts, WatchPageRequests.
    pub(crate) faults_watch_dropped: Counter,
    pub(crate) interrupts_watch_dropped: Counter,
    pub(crate) page_requests_watch_dropped: Counter,
    pub(crate) unit_interrupts_watch_dropped: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Registers every metric (with the installed recorder, or a no-op one).
    pub(crate) fn new() -> Self {
        describe();
        let t = |kind: &'static str, result: &'static str| counter!("dmar_unit_translations_total", "kind" => kind, "result" => result);
        let l = |cache: &'static str, result: &'static str| counter!("dmar_unit_cache_lookups_total", "cache" => cache, "result" => result);
        let d = |ty: &'static str| counter!("dmar_unit_invalidation_descriptors_total", "type" => ty);
        let faults: [Counter; 256] = std::array::from_fn(|code| match FaultReason::from_code(code as u8) {
            Some(r) => counter!("dmar_unit_faults_total", "reason" => r.name()),
            None => Counter::noop(),
        });
        let m = |kind: &'static str| counter!("dmar_link_messages_total", "kind" => kind);
        let w = |stream: &'static str| counter!("dmar_server_watch_events_dropped_total", "stream" => stream);
        Self {
            translations: [
                (t("untranslated", "ok"), |s| s.untranslated_ok),
                (t("untranslated", "blocked"), |s| s.untranslated_blocked),
                (t("ats", "ok"), |s| s.ats_success),
                (t("ats", "no_access"), |s| s.ats_no_access),
                (t("ats", "error"), |s| s.ats_error),
                (t("translated", "ok"), |s| s.translated_ok),
                (t("translated", "blocked"), |s| s.translated_blocked),
            ],
            lookups: [
                (l("iotlb", "hit"), |s| s.iotlb_hits),
                (l("iotlb", "miss"), |s| s.iotlb_misses),
                (l("context", "hit"), |s| s.context_hits),
                (l("context", "miss"), |s| s.context_misses),
                (l("paging", "hit"), |s| s.paging_hits),
                (l("paging", "miss"), |s| s.paging_misses),
            ],
            walks: counter!("dmar_unit_walks_total"),
            walk_loads: counter!("dmar_unit_walk_loads_total"),
            stale: [
                (counter!("dmar_unit_stale_uses_total", "cache" => "iotlb"), |s| s.stale_iotlb_uses),
                (counter!("dmar_unit_stale_uses_total", "cache" => "context"), |s| s.stale_context_uses),
            ],
            dropped: [
                (counter!("dmar_unit_faults_dropped_total", "cause" => "fpd"), |s| s.faults_suppressed),
                (counter!("dmar_unit_faults_dropped_total", "cause" => "overflow"), |s| s.faults_overflowed),
            ],
            descriptors: [
                (d("context"), |s| s.qi_context),
                (d("iotlb"), |s| s.qi_iotlb),
                (d("device_tlb"), |s| s.qi_device_tlb),
                (d("iec"), |s| s.qi_iec),
                (d("wait"), |s| s.qi_wait),
                (d("page_response"), |s| s.qi_page_response),
            ],
            queue_errors: counter!("dmar_unit_invalidation_queue_errors_total"),
            devtlb_timeouts: counter!("dmar_unit_device_tlb_timeouts_total"),
            translated_check: [
                (counter!("dmar_unit_translated_check_refusals_total"), |s| s.translated_check_refusals),
                (counter!("dmar_unit_translated_check_grants_total"), |s| s.translated_check_grants),
                (counter!("dmar_unit_translated_check_evictions_total"), |s| s.translated_check_evictions),
            ],
            protected_memory: [(counter!("dmar_unit_protected_memory_blocked_total"), |s| s.protected_memory_blocked)],
            cpu: gauge!("dmar_server_cpu_used_seconds"),
            walk_duration: histogram!("dmar_unit_walk_duration_seconds"),
            devtlb_duration: histogram!("dmar_unit_device_tlb_invalidation_duration_seconds"),
            faults: Arc::new(faults),
            connections: gauge!("dmar_link_connections"),
            bound_functions: gauge!("dmar_link_bound_functions"),
            link_translations: m("translation"),
            link_dma: m("dma"),
            link_invalidations: m("invalidation"),
            link_msi: m("msi"),
            link_page_requests: m("page_request"),
            batch_duration: histogram!("dmar_link_batch_duration_seconds"),
            prq_queued: counter!("dmar_prq_page_requests_total", "result" => "queued"),
            prq_overflow: counter!("dmar_prq_page_requests_total", "result" => "overflow"),
            irq_remapped: counter!("dmar_interrupt_remapped_total", "result" => "remapped"),
            irq_blocked: counter!("dmar_interrupt_remapped_total", "result" => "blocked"),
            refusals: Refusal::ALL.map(|r| counter!("dmar_server_refusals_total", "reason" => r.name())),
            reply_budget_waits: counter!("dmar_link_reply_budget_waits_total"),
            faults_watch_dropped: w("faults"),
            interrupts_watch_dropped: w("interrupts"),
            page_requests_watch_dropped: w("page_requests"),
            unit_interrupts_watch_dropped: w("unit_interrupts"),
        }
    }

    /// Counts one refusal.
    pub(crate) fn refused(&self, why: Refusal) {
        self.refusals[why as usize].increment(1);
    }

    /// Copies the unit's counters and the process CPU time into the exporter.
    pub(crate) fn refresh(&self, s: &UnitStats) {
        for (c, f) in self
            .translations
            .iter()
            .chain(&self.lookups)
            .chain(&self.stale)
            .chain(&self.dropped)
            .chain(&self.descriptors)
            .chain(&self.translated_check)
            .chain(&self.protected_memory)
        {
            c.absolute(f(s));
        }
        self.walks.absolute(s.walks);
        self.walk_loads.absolute(s.walk_loads);
        self.queue_errors.absolute(s.qi_errors);
        self.devtlb_timeouts.absolute(s.device_tlb_timeouts);
        if let Some(cpu) = process_cpu_time() {
            self.cpu.set(cpu.as_secs_f64());
        }
    }
}

/// CPU time (user + system) of this process, from `/proc/self/stat` (Linux; the kernel
/// reports clock ticks of 1/100 s to user space).
pub(crate) fn process_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::service::auth::{Access, Security};

    /// The doc section the table below generates, between these two lines.
    const BEGIN: &str = "<!-- generated: server metrics -->";
    const END: &str = "<!-- end: server metrics -->";

    /// What the exposition says about one metric family.
    #[derive(Debug, Default)]
    struct Family {
        kind: String,
        help: Option<String>,
        labels: BTreeMap<String, BTreeSet<String>>,
    }

    /// The exposition of a recorder (built as [`install`] builds the global one) after the
    /// server registered every metric: [`Metrics::new`], the access checks, the accept loop's
    /// refusals. Each histogram holds one sample so it renders.
    fn exposition() -> String {
        let recorder = builder().expect("buckets").build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let m = Metrics::new();
            let _access = Access::new(&Security::plaintext());
            let _refusals = dmar_auth::ConnectionRefusals::global();
            m.refresh(&UnitStats::default());
            for h in [&m.walk_duration, &m.devtlb_duration, &m.batch_duration] {
                h.record(1e-6);
            }
        });
        handle.render()
    }

    /// The `dmar_*` families of an exposition, with the label values their series carry.
    fn families(text: &str) -> BTreeMap<String, Family> {
        let mut families: BTreeMap<String, Family> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                families.entry(name.to_owned()).or_default().kind = kind.to_owned();
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                families.entry(name.to_owned()).or_default().help = Some(help.to_owned());
            } else if !line.starts_with('#') && !line.is_empty() {
                let series = line.rsplit_once(' ').expect("series value").0;
                let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        name.strip_suffix(s).filter(|f| families.get(*f).is_some_and(|f| f.kind == "histogram"))
                    })
                    .unwrap_or(name);
                let family = families.entry(family.to_owned()).or_default();
                for pair in labels.trim_end_matches('}').split(',').filter(|p| !p.is_empty()) {
                    let (key, value) = pair.split_once('=').expect("label=value");
                    if key != "le" {
                        family.labels.entry(key.to_owned()).or_default().insert(value.trim_matches('"').to_owned());
                    }
                }
            }
        }
        families.retain(|name, _| name.starts_with("dmar_"));
        families
    }

    /// The Markdown table `docs/METRICS.md` carries for `metrics`.
    fn markdown(metrics: &[MetricDoc]) -> String {
        let mut out = String::from("| Metric | Type | Unit | Labels | Meaning |\n|---|---|---|---|---|\n");
        for m in metrics {
            let labels: Vec<String> =
                m.labels.iter().map(|l| format!("`{}` = {}", l.name, l.values.join(", "))).collect();
            let unit = m.unit.map_or("", |u| u.as_str());
            let meaning = if m.notes.is_empty() { format!("{}.", m.help) } else { format!("{}. {}", m.help, m.notes) };
            out += &format!("| `{}` | {} | {unit} | {} | {meaning} |\n", m.name, m.kind.name(), labels.join("; "));
        }
        out
    }

    #[test]
    fn names_are_unique_and_well_formed() {
        let mut seen = BTreeSet::new();
        for m in METRICS {
            assert!(seen.insert(m.name), "{} listed twice", m.name);
            assert!(m.name.starts_with("dmar_"), "{}", m.name);
            assert!(!m.help.contains('|') && !m.notes.contains('|'), "{}: a `|` breaks the Markdown table", m.name);
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters, and only they, end _total",
                m.name
            );
        }
        assert_eq!(METRIC_NAMES.len(), METRICS.len());
    }

    #[test]
    fn exposition_matches_the_table() {
        let text = exposition();
        let mut found = families(&text);
        let mut problems = Vec::new();
        for m in METRICS {
            let Some(f) = found.remove(m.name) else {
                problems.push(format!("{}: in METRICS but not registered", m.name));
                continue;
            };
            if f.kind != m.kind.name() {
                problems.push(format!("{}: registered as a {}, listed as a {}", m.name, f.kind, m.kind.name()));
            }
            if f.help.as_deref() != Some(m.help) {
                problems.push(format!("{}: HELP {:?}, listed {:?}", m.name, f.help, m.help));
            }
            let listed: BTreeMap<String, BTreeSet<String>> = m
                .labels
                .iter()
                .map(|l| (l.name.to_owned(), l.values.iter().map(|v| (*v).to_owned()).collect()))
                .collect();
            if f.labels != listed {
                problems.push(format!("{}: registered labels {:?}, listed {:?}", m.name, f.labels, listed));
            }
        }
        for name in found.keys() {
            problems.push(format!("{name}: registered but not in METRICS"));
        }
        assert!(problems.is_empty(), "{}\n\nexposition:\n{text}", problems.join("\n"));
        assert!(text.contains("dmar_unit_walk_duration_seconds_bucket"), "explicit buckets:\n{text}");
    }

    #[test]
    fn docs_list_every_metric() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/METRICS.md");
        let doc = std::fs::read_to_string(path).expect("docs/METRICS.md");
        let expected = markdown(METRICS);
        let section =
            doc.split_once(BEGIN).and_then(|(_, rest)| rest.split_once(END)).map(|(section, _)| section.trim());
        assert!(
            section == Some(expected.trim()),
            "docs/METRICS.md is out of date: put these lines between `{BEGIN}` and `{END}`:\n\n{BEGIN}\n{expected}{END}\n"
        );
    }
}
