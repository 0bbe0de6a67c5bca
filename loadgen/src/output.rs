//! Rendering reports: a terminal table, JSON, or CSV.

use std::fmt::Write as _;

use crate::report::SweepReport;

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
pub fn ns(v: u64) -> String {
    if v >= 1_000_000 {
        format!("{:.2}ms", v as f64 / 1e6)
    } else if v >= 1_000 {
        format!("{:.1}µs", v as f64 / 1e3)
    } else {
        format!("{v}ns")
    }
}

/// The terminal table.
pub fn text(r: &SweepReport) -> String {
    let s = &r.settings;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "dmar sweep: {} agents{}, {:.1} s per run after {:.1} s warm-up, {} in flight per device{}, {} KiB {} footprint, {} pattern, {:.0}% writes{}",
        s.agents,
        if s.embedded { " (embedded)" } else { "" },
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
        let _ = writeln!(
            out,
            "baseline: one unary Translate per access; p50 {} p99 {} at {} devices",
            ns(b.miss_latency.p50_ns),
            ns(b.miss_latency.p99_ns),
            b.devices
        );
    }
    out
}

/// One JSON document.
pub fn json(r: &SweepReport) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(r)? + "\n")
}

/// CSV, one row per step.
pub fn csv(r: &SweepReport) -> String {
    let mut out = String::from(
        "devices,device_translations_per_s,server_translations_per_s,atc_hit_ratio,miss_p50_ns,miss_p90_ns,miss_p99_ns,miss_p999_ns,miss_max_ns,faults,server_cpu_ns_per_translation,lookups,atc_hits,atc_misses,coalesced_misses,translations_requested,baseline_translations_per_s,baseline_p50_ns,baseline_p99_ns,ats_over_baseline\n",
    );
    for s in &r.steps {
        let a = &s.ats;
        let m = &a.miss_latency;
        let b = s.baseline.as_ref();
        let _ = writeln!(
            out,
            "{},{:.1},{:.1},{:.6},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
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
        );
    }
    out
}
