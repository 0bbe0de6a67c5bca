//! Report types and their aggregation from agent and server figures.
//!
//! A run's figures come from two sides measured over different windows, so each ratio is
//! taken within one side: device-side rates from the agents' measured window; server CPU
//! per served translation from the server's counters over the whole run (CPU and served
//! translations both include the warm-up).

use dmar_proto::v1::{LatencySummary, Stats, WorkloadCounters, WorkloadMode, WorkloadReport};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::Deserializer;
use serde::Serialize;

use crate::args::BaselineKind;
use crate::platform::PlatformSummary;

/// Latency percentiles in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ns: u64,
    /// 90th percentile.
    pub p90_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Largest.
    pub max_ns: u64,
}

impl Latency {
    /// Percentiles of one histogram.
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50_ns: h.value_at_quantile(0.5),
            p90_ns: h.value_at_quantile(0.9),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            max_ns: h.max(),
        }
    }

    /// Merges the agents' serialized histograms (HdrHistogram V2); summaries without one
    /// are skipped.
    pub fn merge<'a>(summaries: impl IntoIterator<Item = &'a LatencySummary>) -> Latency {
        let mut total: Option<Histogram<u64>> = None;
        for s in summaries {
            if s.histogram.is_empty() {
                continue;
            }
            let Ok(h) = Deserializer::new().deserialize::<u64, _>(&mut &s.histogram[..]) else { continue };
            match total.as_mut() {
                Some(t) => {
                    let _ = t.add(&h);
                }
                None => total = Some(h),
            }
        }
        total.as_ref().map_or_else(Latency::default, Latency::of)
    }
}

/// Agent counters summed over the agents of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Accesses issued.
    pub accesses: u64,
    /// Device-TLB hits.
    pub atc_hits: u64,
    /// Device-TLB misses.
    pub atc_misses: u64,
    /// Misses that joined an outstanding request for the same page.
    pub coalesced_misses: u64,
    /// Translation requests sent to the server.
    pub translations_requested: u64,
    /// Accesses that faulted.
    pub faults: u64,
    /// Invalidations the devices handled.
    pub invalidations_handled: u64,
    /// Page requests sent.
    pub page_requests: u64,
    /// Page requests that failed.
    pub page_request_failures: u64,
    /// DMA completed.
    pub dma_ok: u64,
    /// DMA refused.
    pub dma_failed: u64,
    /// Baseline translations: unary Translate calls, or link requests of one access each.
    pub baseline_calls: u64,
    /// Accesses abandoned without a translation: the link went down, or a unary baseline
    /// call failed (refused).
    pub aborted: u64,
}

impl Counts {
    fn add(&mut self, c: &WorkloadCounters) {
        self.accesses += c.accesses;
        self.atc_hits += c.atc_hits;
        self.atc_misses += c.atc_misses;
        self.coalesced_misses += c.coalesced_misses;
        self.translations_requested += c.translations_requested;
        self.faults += c.faults;
        self.invalidations_handled += c.invalidations_handled;
        self.page_requests += c.page_requests;
        self.page_request_failures += c.page_request_failures;
        self.dma_ok += c.dma_ok;
        self.dma_failed += c.dma_failed;
        self.baseline_calls += c.baseline_calls;
        self.aborted += c.aborted;
    }

    /// Device-TLB lookups.
    pub fn lookups(&self) -> u64 {
        self.atc_hits + self.atc_misses
    }
}

/// One workload run over some devices.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunSummary {
    /// Devices that ran.
    pub devices: usize,
    /// Agents they were spread over.
    pub agents: usize,
    /// Longest measured window among the agents, in seconds.
    pub measured_s: f64,
    /// Summed counters.
    pub counts: Counts,
    /// Device-side translations per second: device-TLB hits plus misses (ATS runs), or
    /// baseline translations (unary Translate calls, or link requests of one access each).
    pub device_translations_per_s: f64,
    /// Translations the server served per second (requests the devices sent).
    pub server_translations_per_s: f64,
    /// Device-TLB hit ratio.
    pub atc_hit_ratio: f64,
    /// Latency of a translation a device had to fetch (miss, or a unary call).
    pub miss_latency: Latency,
    /// Latency of every access.
    pub access_latency: Latency,
    /// Server CPU time per translation it served, in nanoseconds (whole run).
    pub server_cpu_ns_per_translation: Option<f64>,
}

impl RunSummary {
    /// Aggregates the agents' reports and the server's counters around a run of `mode`.
    pub fn aggregate(
        devices: usize,
        reports: &[WorkloadReport],
        before: &Stats,
        after: &Stats,
        mode: WorkloadMode,
    ) -> RunSummary {
        let baseline = matches!(mode, WorkloadMode::Baseline | WorkloadMode::LinkBaseline);
        let mut counts = Counts::default();
        let mut rate = 0.0;
        let mut server_rate = 0.0;
        let mut measured_s: f64 = 0.0;
        for r in reports {
            let c = r.totals.unwrap_or_default();
            counts.add(&c);
            let s = r.measured_ns as f64 / 1e9;
            measured_s = measured_s.max(s);
            if s > 0.0 {
                let translations = if baseline { c.baseline_calls } else { c.atc_hits + c.atc_misses };
                rate += translations as f64 / s;
                server_rate += (if baseline { c.baseline_calls } else { c.translations_requested }) as f64 / s;
            }
        }
        let served = if mode == WorkloadMode::Baseline {
            // Unary Translate calls are not link translations: use the unit's untranslated count.
            let field = |s: &Stats| {
                s.unit.get("untranslated_ok").copied().unwrap_or(0)
                    + s.unit.get("untranslated_blocked").copied().unwrap_or(0)
            };
            field(after).saturating_sub(field(before))
        } else {
            after.link_translations.saturating_sub(before.link_translations)
        };
        let cpu = after.cpu_time_ns.saturating_sub(before.cpu_time_ns);
        let lookups = counts.lookups();
        RunSummary {
            devices,
            agents: reports.len(),
            measured_s,
            device_translations_per_s: rate,
            server_translations_per_s: server_rate,
            atc_hit_ratio: if lookups == 0 { 0.0 } else { counts.atc_hits as f64 / lookups as f64 },
            miss_latency: Latency::merge(reports.iter().filter_map(|r| r.miss_latency.as_ref())),
            access_latency: Latency::merge(reports.iter().filter_map(|r| r.access_latency.as_ref())),
            server_cpu_ns_per_translation: (served > 0 && cpu > 0).then(|| cpu as f64 / served as f64),
            counts,
        }
    }
}

/// One step of a sweep.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Step {
    /// Concurrent devices.
    pub devices: usize,
    /// The ATS run (device TLBs on).
    pub ats: RunSummary,
    /// The baseline run (no device TLB; its kind is `Settings::baseline`).
    pub baseline: Option<RunSummary>,
    /// Device-side translations/s of the ATS path over the baseline's, same run.
    pub ats_over_baseline: Option<f64>,
}

/// The settings a report was produced with.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Settings {
    /// Embedded (in-process server and agents) or remote.
    pub embedded: bool,
    /// Mutual TLS on the control channels (and, embedded, on the ATS links).
    pub tls: bool,
    /// Agents.
    pub agents: usize,
    /// Measured seconds per run.
    pub duration_s: f64,
    /// Warm-up seconds per run.
    pub warmup_s: f64,
    /// Accesses in flight per device.
    pub concurrency: u32,
    /// Fixed rate per device (0: closed loop).
    pub rate_per_device: f64,
    /// Bytes mapped per device.
    pub footprint: u64,
    /// Page-size mix.
    pub page_mix: String,
    /// Address pattern.
    pub pattern: String,
    /// Fraction of writes.
    pub write_fraction: f64,
    /// Translate only (no DMA).
    pub translate_only: bool,
    /// The baseline's kind (`unary` or `link`); `None` when no baseline ran.
    pub baseline: Option<BaselineKind>,
    /// Devices attached with translated-request checking.
    pub check_translated: bool,
    /// CPUs of the machine that ran the load generator.
    pub cpus: usize,
    /// The server's remapping units, the devices behind each and what each translated.
    pub platform: Option<PlatformSummary>,
}

/// A sweep's full report.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SweepReport {
    /// How it was run.
    pub settings: Settings,
    /// The steps.
    pub steps: Vec<Step>,
}

/// One policy's invalidation figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct InvalidatePhase {
    /// strict or deferred.
    pub policy: String,
    /// Unmap calls completed (each followed by a remap).
    pub unmaps: u64,
    /// Unmaps per second (unmap + remap pairs issued back to back from one client).
    pub unmaps_per_s: f64,
    /// Latency of the unmap call (for strict: until every cache, device TLBs included,
    /// dropped the page).
    pub unmap_latency: Latency,
    /// The devices' workload while it ran.
    pub devices: RunSummary,
    /// Strict unmaps after which the owning device was asked to translate the unmapped
    /// page before it was mapped again (a sample: one unmap in 8).
    pub checked: u64,
    /// Of those, translations the device still completed: a translation used after its
    /// invalidation completed (must be 0). Deferred unmaps are not checked: serving the
    /// old translation until the flush is what deferred flushing means.
    pub use_after_invalidation: u64,
    /// Translation completions the devices discarded because an invalidation overtook
    /// them (they asked again).
    pub stale_completions: u64,
    /// With a stalled device: unmaps that took at least half the device-TLB invalidation
    /// time-out (the configured one when embedded, else the stalled device's median
    /// unmap time), i.e. that waited behind the stalled device's invalidation.
    pub slow_unmaps: Option<u64>,
}

/// The invalidate scenario's report.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct InvalidateReport {
    /// The server's remapping units, the devices behind each and what each translated.
    pub platform: Option<PlatformSummary>,
    /// The stalled device, if the run had one (`--stalled-device`).
    pub stalled: Option<StalledReport>,
    /// Per policy.
    pub phases: Vec<InvalidatePhase>,
}

/// The function the load generator bound itself and let stall (`--stalled-device`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StalledReport {
    /// Its requester id (`bb:dd.f`).
    pub source_id: String,
    /// The unit it sits behind.
    pub unit: u32,
    /// That unit's name.
    pub unit_name: String,
    /// The units the tenants sit behind.
    pub tenant_units: Vec<String>,
    /// The configured device-TLB invalidation time-out in ms (embedded runs), else
    /// `None`; `unmap_latency` shows what the server's is.
    pub device_tlb_timeout_ms: Option<f64>,
    /// Strict unmaps of its page.
    pub unmaps: u64,
    /// Of those, ended DEADLINE_EXCEEDED by the time-out: expected, not an error.
    pub timed_out: u64,
    /// Invalidation requests it received and never answered.
    pub invalidations_ignored: u64,
    /// How long each of its unmaps took (about the time-out each).
    pub unmap_latency: Latency,
}

/// The embedded `--stalled-device` comparison: the same invalidate scenario on a one-unit
/// platform (the stalled device behind the tenants' unit) and on a two-unit platform
/// (behind the other unit), one after the other in the same run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StalledComparison {
    /// Both platforms' device-TLB invalidation time-out, in ms.
    pub device_tlb_timeout_ms: f64,
    /// One unit: the stalled device's invalidations share the tenants' queue.
    pub one_unit: InvalidateReport,
    /// Two units: the stalled device on unit 0, the tenants on unit 1.
    pub two_units: InvalidateReport,
    /// The tenants' strict unmap p50, one unit over two units.
    pub strict_p50_ratio: Option<f64>,
    /// The tenants' strict unmap p99, one unit over two units.
    pub strict_p99_ratio: Option<f64>,
}

impl StalledComparison {
    /// The comparison of two runs, with its ratios.
    pub fn new(device_tlb_timeout_ms: f64, one_unit: InvalidateReport, two_units: InvalidateReport) -> Self {
        let strict = |r: &InvalidateReport| r.phases.iter().find(|p| p.policy == "strict").map(|p| p.unmap_latency);
        let ratio = |f: fn(&Latency) -> u64| match (strict(&one_unit), strict(&two_units)) {
            (Some(a), Some(b)) if f(&b) > 0 && a.count > 0 => Some(f(&a) as f64 / f(&b) as f64),
            _ => None,
        };
        let (strict_p50_ratio, strict_p99_ratio) = (ratio(|l| l.p50_ns), ratio(|l| l.p99_ns));
        Self { device_tlb_timeout_ms, one_unit, two_units, strict_p50_ratio, strict_p99_ratio }
    }
}

/// The demand-paging scenario's report.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DemandReport {
    /// Page requests answered by mapping.
    pub pages_mapped: u64,
    /// Time from receiving a page request to its response being accepted.
    pub service_latency: Latency,
    /// The devices' workload.
    pub devices: RunSummary,
    /// The server's remapping units, the devices behind each and what each translated.
    pub platform: Option<PlatformSummary>,
}
