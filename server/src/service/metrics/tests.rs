//! The metric list against the exposition and against docs/METRICS.md.

use dmar_process::metric_doc;

use super::*;
use crate::service::auth::{Access, Security};

/// The doc section the table below generates, between these two lines.
const BEGIN: &str = "<!-- generated: server metrics -->";
const END: &str = "<!-- end: server metrics -->";

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
    assert!(text.contains("dmar_unit_walk_duration_seconds_bucket"), "explicit buckets:\n{text}");
}

#[test]
fn docs_list_every_metric() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/METRICS.md");
    let doc = std::fs::read_to_string(path).expect("docs/METRICS.md");
    if let Err(e) = metric_doc::check_doc(&doc, BEGIN, END, METRICS) {
        panic!("{e}");
    }
}
