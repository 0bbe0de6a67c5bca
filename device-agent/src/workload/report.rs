//! The report of a run: counters over the measured interval and HdrHistograms of access,
//! miss and invalidation latency, with their percentiles and a portable encoding so that
//! the load generator can merge the histograms of many agents.

use std::time::Duration;

use dmar_vtd::SourceId;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};

use super::{Mode, RunPhase};
use crate::counters::Counters;

/// A latency histogram in nanoseconds with 3 significant digits (0.1 % resolution at
/// every percentile), growing to fit whatever is recorded.
pub(crate) fn new_histogram() -> Histogram<u64> {
    // 3 significant digits is always a valid precision.
    Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits are valid"))
}

/// Encodes a histogram in the HdrHistogram V2 format (uncompressed), the encoding of the
/// proto's `LatencySummary.histogram`; empty histograms encode as no bytes.
pub(crate) fn encode_histogram(h: &Histogram<u64>) -> Vec<u8> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    match V2Serializer::new().serialize(h, &mut out) {
        Ok(_) => out,
        Err(e) => {
            tracing::warn!(error = ?e, "histogram could not be encoded");
            Vec::new()
        }
    }
}

/// Why bytes are not a histogram.
#[derive(Debug, thiserror::Error)]
#[error("not an HdrHistogram V2 encoding: {0}")]
pub struct HistogramError(String);

/// Decodes [`encode_histogram`]'s output (no bytes is an empty histogram).
pub fn decode_histogram(bytes: &[u8]) -> Result<Histogram<u64>, HistogramError> {
    if bytes.is_empty() {
        return Ok(new_histogram());
    }
    let mut h: Histogram<u64> =
        Deserializer::new().deserialize(&mut &bytes[..]).map_err(|e| HistogramError(format!("{e:?}")))?;
    h.auto(true);
    Ok(h)
}

/// The usual percentiles of a histogram, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct LatencySummary {
    /// Values recorded.
    pub count: u64,
    /// Mean.
    pub mean_ns: f64,
    /// Median.
    pub p50_ns: u64,
    /// 90th percentile.
    pub p90_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Largest value.
    pub max_ns: u64,
}

impl LatencySummary {
    /// Summarizes `h`.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean_ns: h.mean(),
            p50_ns: h.value_at_quantile(0.5),
            p90_ns: h.value_at_quantile(0.9),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            max_ns: h.max(),
        }
    }
}

/// The counters of one function in a run.
#[derive(Clone, Debug, PartialEq)]
pub struct FunctionReport {
    /// Requester id.
    pub sid: SourceId,
    /// Counters over the measured interval.
    pub counters: Counters,
    /// Device TLB entries at the end.
    pub atc_entries: usize,
}

/// The result of a run.
#[derive(Clone, Debug)]
pub struct Report {
    /// The run.
    pub run_id: u64,
    /// FINISHED or STOPPED.
    pub phase: RunPhase,
    /// Its translation mode.
    pub mode: Mode,
    /// Whether it stopped at translations.
    pub translate_only: bool,
    /// The interval the counters cover.
    pub measured: Duration,
    /// Counters summed over the functions.
    pub totals: Counters,
    /// Counters per function, in requester-id order.
    pub functions: Vec<FunctionReport>,
    /// Start (intended start in open loop) to end of each access.
    pub access_latency: Histogram<u64>,
    /// Start of an access that missed to the arrival of its translation.
    pub miss_latency: Histogram<u64>,
    /// Invalidation request to completion.
    pub invalidation_latency: Histogram<u64>,
}

impl Report {
    /// Accesses per second over the measured interval.
    pub fn accesses_per_second(&self) -> f64 {
        let s = self.measured.as_secs_f64();
        if s > 0.0 { self.totals.accesses as f64 / s } else { 0.0 }
    }
}

/// What one function hands in at the end of a run.
#[derive(Debug)]
pub(crate) struct FunctionRunReport {
    pub(crate) sid: SourceId,
    pub(crate) counters: Counters,
    pub(crate) measured: Duration,
    pub(crate) stopped: bool,
    pub(crate) atc_entries: usize,
    pub(crate) access: Histogram<u64>,
    pub(crate) miss: Histogram<u64>,
    pub(crate) invalidation: Histogram<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_round_trip_and_summarize() {
        let mut h = new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 1000).expect("record");
        }
        h.record(5_000_000_000).expect("large values grow the histogram");
        let back = decode_histogram(&encode_histogram(&h)).expect("decode");
        assert_eq!(back, h);
        let s = LatencySummary::of(&back);
        assert_eq!(s.count, 1001);
        assert!((495_000..=505_000).contains(&s.p50_ns), "{s:?}");
        assert!(s.p999_ns <= s.max_ns && s.max_ns >= 4_990_000_000);
        assert_eq!(LatencySummary::of(&new_histogram()), LatencySummary::default());
        assert!(encode_histogram(&new_histogram()).is_empty());
        assert!(decode_histogram(&[]).expect("empty").is_empty());
        assert!(decode_histogram(b"garbage").is_err());
    }
}
