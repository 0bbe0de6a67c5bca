//! The metrics a binary exports, as data: each binary keeps one list of [`MetricDoc`]s, the
//! single source of its `# HELP` descriptions, its histogram buckets and its table in
//! `docs/METRICS.md`. The checks its tests run against that list live here too: the list
//! is well formed ([`check_names`]), what the binary registers is exactly the list
//! ([`check_exposition`]), and the doc's generated section is the list ([`check_doc`]).

use std::collections::{BTreeMap, BTreeSet};

use metrics::{KeyName, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

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
    /// Every value the binary registers for it.
    pub values: &'static [&'static str],
}

/// One metric a binary exports: the single source of its description (`# HELP`), its
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

/// A label and its values, for tables of [`MetricDoc`].
pub const fn label(name: &'static str, values: &'static [&'static str]) -> LabelDoc {
    LabelDoc { name, values }
}

/// What the exposition says about one metric family.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: Option<String>,
    labels: BTreeMap<String, BTreeSet<String>>,
}

/// The `dmar_*` families of an exposition, with the label values their series carry.
fn families(text: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let Some((name, kind)) = rest.split_once(' ') else { continue };
            families.entry(name.to_owned()).or_default().kind = kind.to_owned();
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let Some((name, help)) = rest.split_once(' ') else { continue };
            families.entry(name.to_owned()).or_default().help = Some(help.to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            let Some((series, _)) = line.rsplit_once(' ') else { continue };
            let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| families.get(*f).is_some_and(|f| f.kind == "histogram")))
                .unwrap_or(name);
            let family = families.entry(family.to_owned()).or_default();
            for pair in labels.trim_end_matches('}').split(',').filter(|p| !p.is_empty()) {
                let Some((key, value)) = pair.split_once('=') else { continue };
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
pub fn markdown(metrics: &[MetricDoc]) -> String {
    let mut out = String::from("| Metric | Type | Unit | Labels | Meaning |\n|---|---|---|---|---|\n");
    for m in metrics {
        let labels: Vec<String> = m.labels.iter().map(|l| format!("`{}` = {}", l.name, l.values.join(", "))).collect();
        let unit = m.unit.map_or("", |u| u.as_str());
        let meaning = if m.notes.is_empty() { format!("{}.", m.help) } else { format!("{}. {}", m.help, m.notes) };
        out += &format!("| `{}` | {} | {unit} | {} | {meaning} |\n", m.name, m.kind.name(), labels.join("; "));
    }
    out
}

/// The names of `metrics`, in order, for a `const` list (`N` is `metrics.len()`).
pub const fn names<const N: usize>(metrics: &[MetricDoc]) -> [&'static str; N] {
    let mut names = [""; N];
    let mut i = 0;
    while i < N {
        names[i] = metrics[i].name;
        i += 1;
    }
    names
}

/// A Prometheus recorder builder with every histogram of `metrics` on its own buckets
/// (without them the exporter would render summaries).
pub fn prometheus_builder(metrics: &[MetricDoc]) -> Result<PrometheusBuilder, BuildError> {
    let mut builder = PrometheusBuilder::new();
    for m in metrics {
        if let Kind::Histogram(buckets) = m.kind {
            builder = builder.set_buckets_for_metric(Matcher::Full(m.name.into()), buckets)?;
        }
    }
    Ok(builder)
}

/// Gives `recorder` the type, unit and `# HELP` of every metric of `metrics`.
pub fn describe(recorder: &dyn Recorder, metrics: &[MetricDoc]) {
    for m in metrics {
        let (name, help) = (KeyName::from(m.name), SharedString::from(m.help));
        match m.kind {
            Kind::Counter => recorder.describe_counter(name, m.unit, help),
            Kind::Gauge => recorder.describe_gauge(name, m.unit, help),
            Kind::Histogram(_) => recorder.describe_histogram(name, m.unit, help),
        }
    }
}

/// Problems with the list itself: names listed twice or not `dmar_`, a `|` that would break
/// the table, a counter not ending `_total` or a non-counter ending so.
pub fn check_names(metrics: &[MetricDoc]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut problems = Vec::new();
    for m in metrics {
        if !seen.insert(m.name) {
            problems.push(format!("{} listed twice", m.name));
        }
        if !m.name.starts_with("dmar_") {
            problems.push(format!("{}: not a dmar_ name", m.name));
        }
        if m.help.contains('|') || m.notes.contains('|') {
            problems.push(format!("{}: a `|` breaks the Markdown table", m.name));
        }
        if (m.kind == Kind::Counter) != m.name.ends_with("_total") {
            problems.push(format!("{}: counters, and only they, end _total", m.name));
        }
    }
    problems
}

/// Differences between a Prometheus exposition `text` and `metrics`: a family registered
/// but not listed or the reverse, another type, `# HELP` text, label or label value.
pub fn check_exposition(text: &str, metrics: &[MetricDoc]) -> Vec<String> {
    let mut found = families(text);
    let mut problems = Vec::new();
    for m in metrics {
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
        let listed: BTreeMap<String, BTreeSet<String>> =
            m.labels.iter().map(|l| (l.name.to_owned(), l.values.iter().map(|v| (*v).to_owned()).collect())).collect();
        if f.labels != listed {
            problems.push(format!("{}: registered labels {:?}, listed {:?}", m.name, f.labels, listed));
        }
    }
    for name in found.keys() {
        problems.push(format!("{name}: registered but not in METRICS"));
    }
    problems
}

/// Whether `doc` carries `metrics`' table between the lines `begin` and `end`; if not, the
/// error says what to paste there.
pub fn check_doc(doc: &str, begin: &str, end: &str, metrics: &[MetricDoc]) -> Result<(), String> {
    let expected = markdown(metrics);
    let section = doc.split_once(begin).and_then(|(_, rest)| rest.split_once(end)).map(|(section, _)| section.trim());
    if section == Some(expected.trim()) {
        Ok(())
    } else {
        Err(format!(
            "docs/METRICS.md is out of date: put these lines between `{begin}` and `{end}`:\n\n{begin}\n{expected}{end}\n"
        ))
    }
}
