//! The metric list against the exposition and against docs/METRICS.md.

use dmar_process::metric_doc;

use super::*;

/// The doc section the table generates, between these two lines.
const BEGIN: &str = "<!-- generated: agent metrics -->";
const END: &str = "<!-- end: agent metrics -->";

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

#[test]
fn names_are_unique_and_well_formed() {
    let problems = metric_doc::check_names(METRICS);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(METRIC_NAMES.len(), METRICS.len());
}

#[test]
fn exposition_matches_the_table() {
    let text = exposition();
    let problems = metric_doc::check_exposition(&text, METRICS);
    assert!(problems.is_empty(), "{}\n\nexposition:\n{text}", problems.join("\n"));
    assert!(text.contains("dmar_agent_translation_duration_seconds_bucket"), "explicit buckets:\n{text}");
}

#[test]
fn docs_list_every_metric() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/METRICS.md");
    let doc = std::fs::read_to_string(path).expect("docs/METRICS.md");
    if let Err(e) = metric_doc::check_doc(&doc, BEGIN, END, METRICS) {
        panic!("{e}");
    }
}
