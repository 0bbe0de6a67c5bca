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

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use dmar_vtd::unit::{FaultReason, UnitStats};

/// The recorder builder with dmar's buckets: every histogram of [`METRICS`] gets its own.
fn builder() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    dmar_process::metric_doc::prometheus_builder(METRICS)
}

/// Installs the global Prometheus recorder with dmar's buckets. Returns the render handle
/// (the caller serves it) or an error if a recorder is already installed.
pub(crate) fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    builder()?.install_recorder()
}

mod catalog;

pub use self::catalog::{Kind, LabelDoc, METRIC_NAMES, METRICS, MetricDoc};

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
    metrics::with_recorder(|r| dmar_process::metric_doc::describe(r, METRICS));
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
mod tests;
