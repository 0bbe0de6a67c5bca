//! The metric list against the exposition and against docs/METRICS.md.

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
    assert!(text.contains("dmar_agent_translation_duration_seconds_bucket"), "explicit buckets:\n{text}");
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
