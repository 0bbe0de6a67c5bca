//! Rendering reports: a terminal table, JSON, or CSV, for each scenario's report.
//!
//! Owns the formats only; the figures are computed in [`crate::report`].

use std::fmt::Write as _;

use serde::Serialize;

use crate::platform::PlatformSummary;
use crate::report::{DemandReport, InvalidateReport, Latency, StalledComparison, SweepReport};

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
    if let Some(p) = &s.platform {
        let _ = writeln!(out, "{}", p.line());
    }
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
        "devices,device_translations_per_s,server_translations_per_s,atc_hit_ratio,miss_p50_ns,miss_p90_ns,miss_p99_ns,miss_p999_ns,miss_max_ns,faults,server_cpu_ns_per_translation,lookups,atc_hits,atc_misses,coalesced_misses,translations_requested,baseline_translations_per_s,baseline_p50_ns,baseline_p99_ns,ats_over_baseline,baseline_kind,platform\n",
    );
    let kind = r.settings.baseline.map_or("", |k| k.label());
    let platform = cell(r.settings.platform.as_ref());
    for s in &r.steps {
        let a = &s.ats;
        let m = &a.miss_latency;
        let b = s.baseline.as_ref();
        let _ = writeln!(
            out,
            "{},{:.1},{:.1},{:.6},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
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
            platform,
        );
    }
    out
}

/// The platform's CSV cell (`dmar0:1;dmar1:4`), empty when unknown.
fn cell(p: Option<&PlatformSummary>) -> String {
    p.map_or_else(String::new, PlatformSummary::cell)
}

/// The invalidate scenario's table, one row per flush policy, after the platform and the
/// stalled device (if any).
pub(crate) fn invalidate_text(r: &InvalidateReport) -> String {
    let mut out = String::new();
    if let Some(p) = &r.platform {
        out += &p.line();
        out += "\n";
    }
    if let Some(s) = &r.stalled {
        let timeout = s.device_tlb_timeout_ms.map_or_else(String::new, |ms| format!(" ({ms:.0} ms)"));
        let _ = writeln!(
            out,
            "stalled device {} behind {} (tenants behind {}): {} strict unmaps, {} ended by the device-TLB time-out{timeout}, p50 {}; {} invalidations never answered",
            s.source_id,
            s.unit_name,
            s.tenant_units.join(", "),
            s.unmaps,
            s.timed_out,
            ns(s.unmap_latency.p50_ns),
            s.invalidations_ignored,
        );
    }
    let stalled = r.stalled.is_some();
    out += &format!(
        "{:<9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12} {:>8} {:>10} {:>7}{}\n",
        "policy",
        "unmaps/s",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "device tr/s",
        "checked",
        "stale use",
        "re-asks",
        if stalled { format!(" {:>8}", "waited") } else { String::new() },
    );
    for p in &r.phases {
        let l = &p.unmap_latency;
        let (checked, stale) = if p.policy == "strict" {
            (p.checked.to_string(), p.use_after_invalidation.to_string())
        } else {
            ("-".to_owned(), "-".to_owned())
        };
        out += &format!(
            "{:<9} {:>9.0} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12.0} {:>8} {:>10} {:>7}{}\n",
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
            p.stale_completions,
            if stalled {
                format!(" {:>8}", p.slow_unmaps.map_or("-".to_owned(), |n| n.to_string()))
            } else {
                String::new()
            },
        );
    }
    if stalled {
        out += "waited: unmaps that took at least half the device-TLB time-out (queued behind the stalled device)\n";
    }
    out
}

/// The invalidate scenario's CSV header.
const INVALIDATE_CSV_HEADER: &str = "policy,unmaps,unmaps_per_s,p50_ns,p90_ns,p99_ns,p999_ns,max_ns,device_translations_per_s,checked,use_after_invalidation,stale_completions,slow_unmaps,platform,stalled_device,stalled_unit";

/// The invalidate scenario's CSV rows, each prefixed with `prefix`.
fn invalidate_rows(out: &mut String, r: &InvalidateReport, prefix: &str) {
    let platform = cell(r.platform.as_ref());
    let (sid, unit) =
        r.stalled.as_ref().map_or((String::new(), String::new()), |s| (s.source_id.clone(), s.unit_name.clone()));
    for p in &r.phases {
        let l = &p.unmap_latency;
        let _ = writeln!(
            out,
            "{prefix}{},{},{:.1},{},{},{},{},{},{:.1},{},{},{},{},{},{},{}",
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
            p.stale_completions,
            p.slow_unmaps.map_or_else(String::new, |n| n.to_string()),
            platform,
            sid,
            unit,
        );
    }
}

/// The invalidate scenario as CSV, one row per flush policy.
pub(crate) fn invalidate_csv(r: &InvalidateReport) -> String {
    let mut out = format!("{INVALIDATE_CSV_HEADER}\n");
    invalidate_rows(&mut out, r, "");
    out
}

/// The tenants' strict unmap latency of a run.
fn strict(r: &InvalidateReport) -> Latency {
    r.phases.iter().find(|p| p.policy == "strict").map(|p| p.unmap_latency).unwrap_or_default()
}

/// The stalled-device comparison: the headline (tenants' strict unmaps, one unit against
/// two, with their ratio), then each run's own table.
pub(crate) fn comparison_text(r: &StalledComparison) -> String {
    let mut out = format!(
        "dmar invalidate with a stalled device (embedded): device-TLB invalidation time-out {:.0} ms on every unit\n",
        r.device_tlb_timeout_ms
    );
    let (one, two) = (strict(&r.one_unit), strict(&r.two_units));
    let slow = |x: &InvalidateReport| {
        x.phases
            .iter()
            .find(|p| p.policy == "strict")
            .and_then(|p| p.slow_unmaps)
            .map_or("-".to_owned(), |n| n.to_string())
    };
    let where_ = |x: &InvalidateReport| {
        x.stalled.as_ref().map_or("-".to_owned(), |s| {
            if s.tenant_units == [s.unit_name.clone()] {
                format!("{} on {}, the tenants' unit", s.source_id, s.unit_name)
            } else {
                format!("{} on {}, tenants on {}", s.source_id, s.unit_name, s.tenant_units.join(", "))
            }
        })
    };
    let ratio = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.1}x"));
    let _ = writeln!(out, "stalled device: one unit {}; two units {}", where_(&r.one_unit), where_(&r.two_units));
    let _ = writeln!(out, "{:<30} {:>12} {:>12} {:>9}", "tenants' strict unmaps", "one unit", "two units", "one/two");
    let _ = writeln!(out, "{:<30} {:>12} {:>12}", "  unmaps", one.count, two.count);
    let _ =
        writeln!(out, "{:<30} {:>12} {:>12} {:>9}", "  p50", ns(one.p50_ns), ns(two.p50_ns), ratio(r.strict_p50_ratio));
    let _ =
        writeln!(out, "{:<30} {:>12} {:>12} {:>9}", "  p99", ns(one.p99_ns), ns(two.p99_ns), ratio(r.strict_p99_ratio));
    let _ = writeln!(out, "{:<30} {:>12} {:>12}", "  max", ns(one.max_ns), ns(two.max_ns));
    let _ =
        writeln!(out, "{:<30} {:>12} {:>12}", "  waited >= half the time-out", slow(&r.one_unit), slow(&r.two_units));
    for (name, x) in [("one unit", &r.one_unit), ("two units", &r.two_units)] {
        let _ = writeln!(out, "\n{name}:");
        out += &invalidate_text(x);
    }
    out
}

/// The stalled-device comparison as CSV: each run's rows, the run named first.
pub(crate) fn comparison_csv(r: &StalledComparison) -> String {
    let mut out = format!("run,device_tlb_timeout_ms,{INVALIDATE_CSV_HEADER}\n");
    let t = r.device_tlb_timeout_ms;
    invalidate_rows(&mut out, &r.one_unit, &format!("one_unit,{t:.0},"));
    invalidate_rows(&mut out, &r.two_units, &format!("two_units,{t:.0},"));
    out
}

/// The demand-paging scenario in one line.
pub(crate) fn demand_text(r: &DemandReport) -> String {
    let [pages, p50, p99, accesses, requests, failed, faults] = demand_fields(r);
    let platform = r.platform.as_ref().map_or_else(String::new, |p| p.line() + "\n");
    format!(
        "{platform}demand paging: {pages} pages mapped on request; service p50 {p50} ns p99 {p99} ns; {accesses} accesses, {requests} page requests, {failed} failed, {faults} faults\n"
    )
}

/// The demand-paging scenario as CSV, one row.
pub(crate) fn demand_csv(r: &DemandReport) -> String {
    let row: Vec<String> = demand_fields(r).iter().map(u64::to_string).collect();
    format!(
        "pages_mapped,service_p50_ns,service_p99_ns,accesses,page_requests,page_request_failures,faults,platform\n{},{}\n",
        row.join(","),
        cell(r.platform.as_ref())
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
