//! The agent's Prometheus metrics: names, descriptions, buckets, and the handles the
//! functions and the link touch.
//!
//! Naming follows `dmar_agent_<name>_<unit>`, counters end `_total`, base units, and labels
//! are bounded enums, never requester ids (the scrape's `instance` names the agent). The one
//! exception is `dmar_auth_connection_refusals_total`, counted by `dmar-auth`'s accept loop
//! under the same name in every process that uses it.
//!
//! The recorder is process-wide and built once (a `OnceLock`), but it is *not* installed
//! as the global `metrics` recorder: the handles are registered on it directly. So several
//! agents share it in one process (their series add up), and a dmar server embedded in
//! the same process keeps its own global recorder. Functions count in plain integers and
//! flush the differences here every 100 ms, so no access pays for an atomic.
//!
//! [`METRICS`] lists every metric with its type, labels, unit and description: the
//! descriptions and buckets are made from it, its tests check the registered exposition
//! and `docs/METRICS.md` against it.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::counters::Counters;
use crate::security::Refusal;

mod catalog;

pub use self::catalog::{Kind, LabelDoc, METRIC_NAMES, METRICS, MetricDoc};

/// The handles every function and link of the process share.
#[derive(Debug, Clone)]
pub(crate) struct AgentMetrics {
    accesses_ok: Counter,
    accesses_fault: Counter,
    accesses_aborted: Counter,
    lookups_hit: Counter,
    lookups_miss: Counter,
    coalesced: Counter,
    evictions: Counter,
    invalidated_entries: Counter,
    pub(crate) atc_entries: Gauge,
    translation_requests: Counter,
    translation_errors: Counter,
    stale_completions: Counter,
    pub(crate) translation_duration: Histogram,
    faults: Counter,
    invalidations: Counter,
    pub(crate) invalidation_duration: Histogram,
    page_requests_sent: Counter,
    page_requests_failed: Counter,
    dma_ok: Counter,
    dma_failed: Counter,
    dma_untranslated: Counter,
    baseline_calls: Counter,
    pub(crate) link_up: Gauge,
    pub(crate) link_connections: Counter,
    pub(crate) link_messages_up: Counter,
    pub(crate) link_messages_down: Counter,
    pub(crate) link_batch_items: Histogram,
    pub(crate) functions: Gauge,
    /// Refused control requests, indexed by [`Refusal`] (`reason` label).
    pub(crate) refusals: [Counter; Refusal::ALL.len()],
    /// Connections the control and health ports closed unserved.
    pub(crate) connection_refusals: dmar_auth::ConnectionRefusals,
}

struct Registry {
    /// Keeps the recorder alive beside its handles.
    _recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    metrics: AgentMetrics,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(build)
}

/// The process-wide handles.
pub(crate) fn handles() -> AgentMetrics {
    registry().metrics.clone()
}

/// The renderer of the process-wide agent registry (what `/metrics` serves).
pub(crate) fn prometheus() -> PrometheusHandle {
    registry().handle.clone()
}

/// The recorder builder with the agent's buckets: every histogram of [`METRICS`] gets its own.
fn buckets() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    dmar_process::metric_doc::prometheus_builder(METRICS)
}

fn build() -> Registry {
    // Only empty bucket lists are refused, and these are constants.
    let builder = buckets().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "histogram buckets refused; histograms become summaries");
        PrometheusBuilder::new()
    });
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    let r = &recorder;
    describe(r);
    let metrics = AgentMetrics {
        accesses_ok: counter(r, "dmar_agent_accesses_total", &[("result", "ok")]),
        accesses_fault: counter(r, "dmar_agent_accesses_total", &[("result", "fault")]),
        accesses_aborted: counter(r, "dmar_agent_accesses_total", &[("result", "aborted")]),
        lookups_hit: counter(r, "dmar_agent_atc_lookups_total", &[("result", "hit")]),
        lookups_miss: counter(r, "dmar_agent_atc_lookups_total", &[("result", "miss")]),
        coalesced: counter(r, "dmar_agent_atc_coalesced_misses_total", &[]),
        evictions: counter(r, "dmar_agent_atc_evictions_total", &[]),
        invalidated_entries: counter(r, "dmar_agent_atc_invalidated_entries_total", &[]),
        atc_entries: r.register_gauge(&key("dmar_agent_atc_entries", &[]), &meta()),
        translation_requests: counter(r, "dmar_agent_translation_requests_total", &[]),
        translation_errors: counter(r, "dmar_agent_translation_errors_total", &[]),
        stale_completions: counter(r, "dmar_agent_translation_stale_completions_total", &[]),
        translation_duration: r.register_histogram(&key("dmar_agent_translation_duration_seconds", &[]), &meta()),
        faults: counter(r, "dmar_agent_faults_total", &[]),
        invalidations: counter(r, "dmar_agent_invalidations_total", &[]),
        invalidation_duration: r.register_histogram(&key("dmar_agent_invalidation_duration_seconds", &[]), &meta()),
        page_requests_sent: counter(r, "dmar_agent_page_requests_total", &[("result", "sent")]),
        page_requests_failed: counter(r, "dmar_agent_page_requests_total", &[("result", "failed")]),
        dma_ok: counter(r, "dmar_agent_dma_total", &[("result", "ok"), ("kind", "any")]),
        dma_failed: counter(r, "dmar_agent_dma_total", &[("result", "failed"), ("kind", "any")]),
        dma_untranslated: counter(r, "dmar_agent_dma_total", &[("result", "sent"), ("kind", "untranslated")]),
        baseline_calls: counter(r, "dmar_agent_baseline_calls_total", &[]),
        link_up: r.register_gauge(&key("dmar_agent_link_up", &[]), &meta()),
        link_connections: counter(r, "dmar_agent_link_connections_total", &[]),
        link_messages_up: counter(r, "dmar_agent_link_messages_total", &[("direction", "up")]),
        link_messages_down: counter(r, "dmar_agent_link_messages_total", &[("direction", "down")]),
        link_batch_items: r.register_histogram(&key("dmar_agent_link_batch_items", &[]), &meta()),
        functions: r.register_gauge(&key("dmar_agent_functions", &[]), &meta()),
        refusals: Refusal::ALL
            .map(|reason| counter(r, "dmar_agent_control_refusals_total", &[("reason", reason.as_str())])),
        connection_refusals: dmar_auth::ConnectionRefusals::on(r),
    };
    Registry { _recorder: recorder, handle, metrics }
}

fn meta() -> Metadata<'static> {
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()))
}

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, *v)).collect();
    Key::from_parts(name, labels)
}

fn counter(r: &PrometheusRecorder, name: &'static str, labels: &[(&'static str, &'static str)]) -> Counter {
    r.register_counter(&key(name, labels), &meta())
}

/// Describes every metric of [`METRICS`] to `r`. The first description of a name wins, so
/// these are the ones served (`dmar-auth` describes its own counter after).
fn describe(r: &PrometheusRecorder) {
    dmar_process::metric_doc::describe(r, METRICS);
}

impl AgentMetrics {
    /// Adds a function's counter increments since its last flush.
    pub(crate) fn flush(&self, d: &Counters) {
        let add = |c: &Counter, n: u64| {
            if n > 0 {
                c.increment(n);
            }
        };
        let ok = d.accesses.saturating_sub(d.faults + d.aborted + d.dma_failed);
        add(&self.accesses_ok, ok);
        add(&self.accesses_fault, d.faults + d.dma_failed);
        add(&self.accesses_aborted, d.aborted);
        add(&self.lookups_hit, d.atc_hits);
        add(&self.lookups_miss, d.atc_misses);
        add(&self.coalesced, d.coalesced_misses);
        add(&self.evictions, d.evictions);
        add(&self.invalidated_entries, d.invalidated_entries);
        add(&self.translation_requests, d.translations_requested);
        add(&self.translation_errors, d.translation_errors);
        add(&self.stale_completions, d.stale_completions);
        add(&self.faults, d.faults);
        add(&self.invalidations, d.invalidations_handled);
        add(&self.page_requests_sent, d.page_requests);
        add(&self.page_requests_failed, d.page_request_failures);
        add(&self.dma_ok, d.dma_ok);
        add(&self.dma_failed, d.dma_failed);
        add(&self.dma_untranslated, d.untranslated_dma);
        add(&self.baseline_calls, d.baseline_calls);
    }
}

/// Drains histogram samples into their buckets so memory stays bounded between scrapes.
pub(crate) fn upkeep() {
    registry().handle.run_upkeep();
}

#[cfg(test)]
mod tests;
