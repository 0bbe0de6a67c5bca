//! Rendering reports: a terminal table, JSON, or CSV, for each scenario's report.
//!
//! Owns the formats only; the figures are computed in [`crate::report`].

use std::fmt::Write as _;

use serde::Serialize;

use crate::report::{DemandReport, InvalidateReport, SweepReport};

fn rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// A duration in nanoseconds, in the unit that reads best.
pub(crate) fn ns(v: u64) -> String {
    if v >= 1_000_000 {
        format!("{:.2}ms", v as f64 / 1e6)
    } else if v >= 1_000 {
        format!("{:.1}µs", v as f64 / 1e3)
    } else {
        format!("{v}ns")
    }
}

/// The terminal table.
pub(crate) fn text(r: &SweepReport) -> String {
    let s = &r.settings;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "dmar sweep: {} agents{}{}, {:.1} s per run after {:.1} s warm-up, {} in flight per device{}, {} KiB {} footprint, {} pattern, {:.0}% writes{}{}",
        s.agents,
        if s.embedded { " (embedded)" } else { "" },
        if s.tls { " over mutual TLS" } else { "" },
        s.duration_s,
        s.warmup_s,
        s.concurrency,
        if s.rate_per_device > 0.0 {
            format!(", open loop at {}/s per device", rate(s.rate_per_device))
        } else {
            String::new()
        },
        s.footprint >> 10,
        s.page_mix,
        s.pattern,
        s.write_fraction * 100.0,
        if s.translate_only { ", translate only" } else { ", with DMA" },
        if s.check_translated { ", translated requests checked" } else { "" },
    );
    if s.embedded {
        let _ = writeln!(
            out,
            "embedded: CPU/tr is the whole process's CPU (server, agents, load generator) per served translation"
        );
    }
    let _ = writeln!(
        out,
        "{:>7} {:>11} {:>11} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>10} {:>11} {:>8}",
        "devices",
        "device tr/s",
        "served tr/s",
        "ATC hit",
        "miss p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "faults",
        "CPU/tr",
        "baseline/s",
        "ATS/base"
    );
    for st in &r.steps {
        let a = &st.ats;
        let m = &a.miss_latency;
        let _ = writeln!(
            out,
            "{:>7} {:>11} {:>11} {:>6.1}% {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>10} {:>11} {:>8}",
            st.devices,
            rate(a.device_translations_per_s),
            rate(a.server_translations_per_s),
            a.atc_hit_ratio * 100.0,
            ns(m.p50_ns),
            ns(m.p90_ns),
            ns(m.p99_ns),
            ns(m.p999_ns),
            ns(m.max_ns),
            a.counts.faults,
            a.server_cpu_ns_per_translation.map_or("-".to_owned(), |c| ns(c as u64)),
            st.baseline.as_ref().map_or("-".to_owned(), |b| rate(b.device_translations_per_s)),
            st.ats_over_baseline.map_or("-".to_owned(), |x| format!("{x:.1}x")),
        );
    }
    if let Some(b) = r.steps.iter().filter_map(|s| s.baseline.as_ref()).next_back() {
        let kind = s.baseline.unwrap_or_default();
        let _ = writeln!(
            out,
            "baseline ({}): {}; p50 {} p99 {} at {} devices",
            kind.label(),
            kind.describe(),
            ns(b.miss_latency.p50_ns),
            ns(b.miss_latency.p99_ns),
            b.devices
        );
    }
    out
}

/// One JSON document.
pub(crate) fn json(r: &impl Serialize) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(r)? + "\n")
}

/// CSV, one row per step.
pub(crate) fn csv(r: &SweepReport) -> String {
    let mut out = String::from(
        "devices,device_translations_per_s,server_translations_per_s,atc_hit_ratio,miss_p50_ns,miss_p90_ns,miss_p99_ns,miss_p999_ns,miss_max_ns,faults,server_cpu_ns_per_translation,lookups,atc_hits,atc_misses,coalesced_misses,translations_requested,baseline_translations_per_s,baseline_p50_ns,baseline_p99_ns,ats_over_baseline,baseline_kind\n",
    );
    let kind = r.settings.baseline.map_or("", |k| k.label());
    for s in &r.steps {
        let a = &s.ats;
        let m = &a.miss_latency;
        let b = s.baseline.as_ref();
        let _ = writeln!(
            out,
            "{},{:.1},{:.1},{:.6},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            s.devices,
            a.device_translations_per_s,
            a.server_translations_per_s,
            a.atc_hit_ratio,
            m.p50_ns,
            m.p90_ns,
            m.p99_ns,
            m.p999_ns,
            m.max_ns,
            a.counts.faults,
            a.server_cpu_ns_per_translation.map_or(String::new(), |c| format!("{c:.1}")),
            a.counts.lookups(),
            a.counts.atc_hits,
            a.counts.atc_misses,
            a.counts.coalesced_misses,
            a.counts.translations_requested,
            b.map_or(String::new(), |b| format!("{:.1}", b.device_translations_per_s)),
            b.map_or(String::new(), |b| b.miss_latency.p50_ns.to_string()),
            b.map_or(String::new(), |b| b.miss_latency.p99_ns.to_string()),
            s.ats_over_baseline.map_or(String::new(), |x| format!("{x:.2}")),
            if b.is_some() { kind } else { "" },
        );
    }
    out
}

/// The invalidate scenario's table, one row per flush policy.
pub(crate) fn invalidate_text(r: &InvalidateReport) -> String {
    let mut out = format!(
        "{:<9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12} {:>8} {:>10} {:>7}\n",
        "policy", "unmaps/s", "p50", "p90", "p99", "p99.9", "max", "device tr/s", "checked", "stale use", "re-asks"
    );
    for p in &r.phases {
        let l = &p.unmap_latency;
        let (checked, stale) = if p.policy == "strict" {
            (p.checked.to_string(), p.use_after_invalidation.to_string())
        } else {
            ("-".to_owned(), "-".to_owned())
        };
        out += &format!(
            "{:<9} {:>9.0} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12.0} {:>8} {:>10} {:>7}\n",
            p.policy,
            p.unmaps_per_s,
            ns(l.p50_ns),
            ns(l.p90_ns),
            ns(l.p99_ns),
            ns(l.p999_ns),
            ns(l.max_ns),
            p.devices.device_translations_per_s,
            checked,
            stale,
            p.stale_completions
        );
    }
    out
}

/// The invalidate scenario as CSV, one row per flush policy.
pub(crate) fn invalidate_csv(r: &InvalidateReport) -> String {
    let mut out = String::from(
        "policy,unmaps,unmaps_per_s,p50_ns,p90_ns,p99_ns,p999_ns,max_ns,device_translations_per_s,checked,use_after_invalidation,stale_completions\n",
    );
    for p in &r.phases {
        let l = &p.unmap_latency;
        out += &format!(
            "{},{},{:.1},{},{},{},{},{},{:.1},{},{},{}\n",
            p.policy,
            p.unmaps,
            p.unmaps_per_s,
            l.p50_ns,
            l.p90_ns,
            l.p99_ns,
            l.p999_ns,
            l.max_ns,
            p.devices.device_translations_per_s,
            p.checked,
            p.use_after_invalidation,
            p.stale_completions
        );
    }
    out
}

/// The demand-paging scenario in one line.
pub(crate) fn demand_text(r: &DemandReport) -> String {
    let [pages, p50, p99, accesses, requests, failed, faults] = demand_fields(r);
    format!(
        "demand paging: {pages} pages mapped on request; service p50 {p50} ns p99 {p99} ns; {accesses} accesses, {requests} page requests, {failed} failed, {faults} faults\n"
    )
}

/// The demand-paging scenario as CSV, one row.
pub(crate) fn demand_csv(r: &DemandReport) -> String {
    let row: Vec<String> = demand_fields(r).iter().map(u64::to_string).collect();
    format!(
        "pages_mapped,service_p50_ns,service_p99_ns,accesses,page_requests,page_request_failures,faults\n{}\n",
        row.join(",")
    )
}

/// The demand-paging report's figures, in the order both renderings print them.
fn demand_fields(r: &DemandReport) -> [u64; 7] {
    let c = &r.devices.counts;
    [
        r.pages_mapped,
        r.service_latency.p50_ns,
        r.service_latency.p99_ns,
        c.accesses,
        c.page_requests,
        c.page_request_failures,
        c.faults,
    ]
}
