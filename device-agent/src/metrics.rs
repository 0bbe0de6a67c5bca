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

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::counters::Counters;
use crate::security::Refusal;

/// Buckets of translation (miss) latency, seconds: 5 µs to 1 s.
const TRANSLATION_BUCKETS: &[f64] =
    &[5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 10e-3, 100e-3, 1.0];
/// Buckets of invalidation handling time, seconds: 1 µs to 1 s.
const INVALIDATION_BUCKETS: &[f64] = &[1e-6, 5e-6, 10e-6, 50e-6, 100e-6, 500e-6, 1e-3, 5e-3, 25e-3, 100e-3, 1.0];
/// Buckets of items per outbound link message.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];

/// What Prometheus types a metric as.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// Only grows.
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
    /// Every value the agent registers for it.
    pub values: &'static [&'static str],
}

/// One metric the agent exports: the single source of its description (`# HELP`), its
/// buckets, and its row in `docs/METRICS.md`, so the three cannot drift apart.
#[derive(Clone, Copy, Debug)]
pub struct MetricDoc {
    /// The family name, `dmar_agent_<name>_<unit>`.
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
pub const METRIC_NAMES: &[&str] = &{
    let mut names = [""; METRICS.len()];
    let mut i = 0;
    while i < METRICS.len() {
        names[i] = METRICS[i].name;
        i += 1;
    }
    names
};

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
    let mut builder = PrometheusBuilder::new();
    for m in METRICS {
        if let Kind::Histogram(buckets) = m.kind {
            builder = builder.set_buckets_for_metric(Matcher::Full(m.name.into()), buckets)?;
        }
    }
    Ok(builder)
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
    for m in METRICS {
        let (name, help) = (KeyName::from(m.name), SharedString::from(m.help));
        match m.kind {
            Kind::Counter => r.describe_counter(name, m.unit, help),
            Kind::Gauge => r.describe_gauge(name, m.unit, help),
            Kind::Histogram(_) => r.describe_histogram(name, m.unit, help),
        }
    }
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
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// The doc section the table generates, between these two lines.
    const BEGIN: &str = "<!-- generated: agent metrics -->";
    const END: &str = "<!-- end: agent metrics -->";

    /// What the exposition says about one metric family.
    #[derive(Debug, Default)]
    struct Family {
        kind: String,
        help: Option<String>,
        labels: BTreeMap<String, BTreeSet<String>>,
    }

    /// The process-wide exposition after every handle moved once (each histogram holds a
    /// sample, so it renders).
    fn exposition() -> String {
        let m = handles();
        m.translation_duration.record(1e-4);
        m.invalidation_duration.record(1e-5);
        m.link_batch_items.record(3.0);
        m.link_connections.increment(1);
        m.link_messages_up.increment(1);
        m.link_messages_down.increment(1);
        m.functions.increment(1.0);
        m.link_up.increment(1.0);
        m.atc_entries.increment(1.0);
        m.refusals[0].increment(1);
        m.flush(&Counters {
            accesses: 2,
            faults: 1,
            atc_hits: 1,
            atc_misses: 1,
            coalesced_misses: 1,
            evictions: 1,
            invalidated_entries: 1,
            translations_requested: 1,
            translation_errors: 1,
            stale_completions: 1,
            invalidations_handled: 1,
            page_requests: 1,
            page_request_failures: 1,
            dma_ok: 1,
            dma_failed: 1,
            untranslated_dma: 1,
            baseline_calls: 1,
            aborted: 1,
            ..Default::default()
        });
        prometheus().render()
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
        assert!(text.contains("dmar_agent_translation_duration_seconds_bucket"), "explicit buckets:\n{text}");
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
