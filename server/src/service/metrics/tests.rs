//! The metric list against the exposition and against docs/METRICS.md.

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
                .find_map(|s| name.strip_suffix(s).filter(|f| families.get(*f).is_some_and(|f| f.kind == "histogram")))
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
        let labels: Vec<String> = m.labels.iter().map(|l| format!("`{}` = {}", l.name, l.values.join(", "))).collect();
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
        let listed: BTreeMap<String, BTreeSet<String>> =
            m.labels.iter().map(|l| (l.name.to_owned(), l.values.iter().map(|v| (*v).to_owned()).collect())).collect();
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
    let section = doc.split_once(BEGIN).and_then(|(_, rest)| rest.split_once(END)).map(|(section, _)| section.trim());
    assert!(
        section == Some(expected.trim()),
        "docs/METRICS.md is out of date: put these lines between `{BEGIN}` and `{END}`:\n\n{BEGIN}\n{expected}{END}\n"
    );
}
