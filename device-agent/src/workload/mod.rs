//! Workloads: what the functions access, when, and what the run reports.
//!
//! Owns the workload description ([`WorkloadSpec`]) and its validation, the address
//! streams (`stream`), recorded traces (`trace`) and the files they may be read from
//! (`trace_files`), the per-function engine that paces accesses in closed or open loop
//! (`engine`), the run that ties the functions of one workload together (`run`) and its
//! report with HdrHistograms (`report`). How one access is performed is the function's
//! business (`function`).

pub(crate) mod engine;
mod report;
mod run;
mod stream;
mod trace;
mod trace_files;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dmar_vtd::SourceId;

pub(crate) use self::report::encode_histogram;
pub use self::report::{FunctionReport, HistogramError, LatencySummary, Report, decode_histogram};
pub use self::run::{Run, RunPhase};
pub use self::trace::{MAX_LINE_BYTES, Trace, TraceAccess, TraceError};
pub use self::trace_files::{DEFAULT_MAX_TRACE_BYTES, TraceFileError, TraceFiles};
use crate::config::FunctionConfig;
use crate::function::Mode;

pub(crate) use self::run::coordinate;

/// Longest measured duration of a run (one day).
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(86_400);
/// Most accesses in flight per function.
pub(crate) const MAX_CONCURRENCY: u32 = 4096;

/// Where a function's accesses go.
#[derive(Clone, Debug, PartialEq)]
pub enum Pattern {
    /// Uniformly random over the footprint.
    Uniform,
    /// Zipf over the footprint's 4 KiB pages: page k (counted from the base) has weight
    /// 1/(k+1)^exponent.
    Zipf {
        /// The exponent s (> 0).
        exponent: f64,
    },
    /// Consecutive buffers of the DMA size, wrapping at the footprint (a NIC ring).
    SequentialRing,
    /// Steps of `stride` bytes, wrapping at the footprint.
    Strided {
        /// The step (a positive multiple of the DMA size).
        stride: u64,
    },
    /// A recorded trace, in a loop (absolute addresses; it sets reads and writes).
    Trace(Arc<Trace>),
}

/// The address stream of one function.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamSpec {
    /// The pattern.
    pub pattern: Pattern,
    /// First IOVA of the footprint.
    pub base: u64,
    /// Bytes of the footprint (not used by traces).
    pub footprint: u64,
}

impl StreamSpec {
    /// A uniform stream over `[base, base + footprint)`.
    pub fn uniform(base: u64, footprint: u64) -> Self {
        Self { pattern: Pattern::Uniform, base, footprint }
    }

    fn validate(&self, dma_bytes: u32) -> Result<(), WorkloadError> {
        let dma = u64::from(dma_bytes);
        if let Pattern::Trace(_) = self.pattern {
            return Ok(());
        }
        if self.footprint == 0 || !self.footprint.is_multiple_of(dma) {
            return Err(WorkloadError::invalid(format!(
                "footprint must be a positive multiple of the DMA size ({dma} bytes), got {}",
                self.footprint
            )));
        }
        if !self.base.is_multiple_of(dma) {
            return Err(WorkloadError::invalid(format!("base {:#x} is not aligned to the DMA size", self.base)));
        }
        if self.base.checked_add(self.footprint - 1).is_none() {
            return Err(WorkloadError::invalid("the footprint runs past the end of the address space"));
        }
        match self.pattern {
            Pattern::Zipf { exponent } => {
                if !(exponent.is_finite() && exponent > 0.0) {
                    return Err(WorkloadError::invalid(format!("the Zipf exponent must be positive, got {exponent}")));
                }
                if !self.footprint.is_multiple_of(4096) {
                    return Err(WorkloadError::invalid("a Zipf footprint must be whole 4 KiB pages"));
                }
            }
            Pattern::Strided { stride } if stride == 0 || !stride.is_multiple_of(dma) => {
                return Err(WorkloadError::invalid(format!(
                    "the stride must be a positive multiple of the DMA size, got {stride}"
                )));
            }
            _ => {}
        }
        Ok(())
    }
}

/// A workload for some functions of an agent.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadSpec {
    /// How accesses are translated.
    pub mode: Mode,
    /// Measured time (after the warm-up).
    pub duration: Duration,
    /// Time run before measuring (caches fill), not counted.
    pub warmup: Duration,
    /// Accesses in flight per function (closed loop), or their cap (open loop).
    pub concurrency: u32,
    /// Open loop: accesses per second per function on a fixed schedule; `None` is closed
    /// loop.
    pub rate_per_second: Option<f64>,
    /// The functions that take part, each with its stream.
    pub streams: Vec<(SourceId, StreamSpec)>,
    /// Fraction of writes (traces set their own).
    pub write_fraction: f64,
    /// Stop at the translation (no DMA).
    pub translate_only: bool,
    /// Bytes per DMA (a power of two, 1..=4096); accesses are aligned to it.
    pub dma_bytes: u32,
    /// Seed of the address and read/write choices (0: from the clock).
    pub seed: u64,
}

impl WorkloadSpec {
    /// A closed-loop ATS workload of one second, concurrency 1, 64-byte reads with DMA.
    pub fn new(streams: Vec<(SourceId, StreamSpec)>) -> Self {
        Self {
            mode: Mode::Ats,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            concurrency: 1,
            rate_per_second: None,
            streams,
            write_fraction: 0.0,
            translate_only: false,
            dma_bytes: 64,
            seed: 0,
        }
    }

    /// Checks the workload against the agent's functions.
    pub fn validate(&self, functions: &HashMap<SourceId, FunctionConfig>) -> Result<(), WorkloadError> {
        if self.duration.is_zero() || self.duration > MAX_DURATION {
            return Err(WorkloadError::invalid(format!(
                "the duration must be between 1 ms and {} s, got {:?}",
                MAX_DURATION.as_secs(),
                self.duration
            )));
        }
        if self.warmup > MAX_DURATION {
            return Err(WorkloadError::invalid("the warm-up is longer than a day"));
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(WorkloadError::invalid(format!(
                "concurrency must be 1..={MAX_CONCURRENCY}, got {}",
                self.concurrency
            )));
        }
        if let Some(rate) = self.rate_per_second
            && !(rate.is_finite() && rate > 0.0 && rate <= 1e9)
        {
            return Err(WorkloadError::invalid(format!("the rate must be positive and at most 1e9/s, got {rate}")));
        }
        if !(0.0..=1.0).contains(&self.write_fraction) {
            return Err(WorkloadError::invalid(format!(
                "the write fraction must be 0..=1, got {}",
                self.write_fraction
            )));
        }
        if !self.dma_bytes.is_power_of_two() || self.dma_bytes > 4096 {
            return Err(WorkloadError::invalid(format!(
                "the DMA size must be a power of two up to 4096, got {}",
                self.dma_bytes
            )));
        }
        if self.streams.is_empty() {
            return Err(WorkloadError::invalid("no function takes part"));
        }
        let mut seen = std::collections::HashSet::new();
        for (sid, stream) in &self.streams {
            let f = functions.get(sid).ok_or(WorkloadError::UnknownFunction(*sid))?;
            if !seen.insert(*sid) {
                return Err(WorkloadError::invalid(format!("function {sid} is listed twice")));
            }
            if self.translate_only && self.mode == Mode::Ats && !f.ats {
                return Err(WorkloadError::invalid(format!(
                    "function {sid} has no ATS: it cannot translate without DMA (use baseline mode or DMA)"
                )));
            }
            if self.mode == Mode::LinkBaseline && !f.ats {
                return Err(WorkloadError::invalid(format!(
                    "function {sid} has no ATS: the link baseline sends ATS translation requests"
                )));
            }
            stream.validate(self.dma_bytes)?;
        }
        Ok(())
    }
}

/// Why a workload cannot start or a run cannot be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    /// The description is malformed.
    #[error("{0}")]
    Invalid(String),
    /// A function the agent does not host.
    #[error("function {0} is not hosted by this agent")]
    UnknownFunction(SourceId),
    /// Another run is in progress.
    #[error("run {0} is still in progress; stop it or wait for its report")]
    Busy(u64),
    /// No such run.
    #[error("no run {0}")]
    NoSuchRun(u64),
    /// The agent is stopping.
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// A trace file was refused or could not be read.
    #[error(transparent)]
    TraceFile(#[from] TraceFileError),
}

impl WorkloadError {
    fn invalid(s: impl Into<String>) -> Self {
        WorkloadError::Invalid(s.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn functions() -> HashMap<SourceId, FunctionConfig> {
        let sid = SourceId::new(0, 1, 0);
        let mut no_ats = FunctionConfig::new(SourceId::new(0, 1, 1));
        no_ats.ats = false;
        HashMap::from([(sid, FunctionConfig::new(sid)), (no_ats.sid, no_ats)])
    }

    fn spec() -> WorkloadSpec {
        WorkloadSpec::new(vec![(SourceId::new(0, 1, 0), StreamSpec::uniform(0x10_0000, 1 << 20))])
    }

    #[test]
    fn a_plain_spec_validates() {
        assert_eq!(spec().validate(&functions()), Ok(()));
    }

    #[test]
    fn bad_specs_say_why() {
        let f = functions();
        let bad = |s: WorkloadSpec| match s.validate(&f) {
            Err(e) => e,
            Ok(()) => panic!("{s:?} validated"),
        };
        assert!(matches!(bad(WorkloadSpec { duration: Duration::ZERO, ..spec() }), WorkloadError::Invalid(_)));
        assert!(matches!(bad(WorkloadSpec { concurrency: 0, ..spec() }), WorkloadError::Invalid(_)));
        assert!(matches!(bad(WorkloadSpec { rate_per_second: Some(f64::NAN), ..spec() }), WorkloadError::Invalid(_)));
        assert!(matches!(bad(WorkloadSpec { write_fraction: 1.5, ..spec() }), WorkloadError::Invalid(_)));
        assert!(matches!(bad(WorkloadSpec { dma_bytes: 96, ..spec() }), WorkloadError::Invalid(_)));
        assert!(matches!(bad(WorkloadSpec { dma_bytes: 8192, ..spec() }), WorkloadError::Invalid(_)));
        assert!(matches!(bad(WorkloadSpec { streams: vec![], ..spec() }), WorkloadError::Invalid(_)));
        let unknown = SourceId::new(9, 0, 0);
        assert_eq!(
            bad(WorkloadSpec { streams: vec![(unknown, StreamSpec::uniform(0, 4096))], ..spec() }),
            WorkloadError::UnknownFunction(unknown)
        );
        let no_ats = SourceId::new(0, 1, 1);
        let s = WorkloadSpec { streams: vec![(no_ats, StreamSpec::uniform(0, 4096))], translate_only: true, ..spec() };
        assert!(matches!(bad(s), WorkloadError::Invalid(m) if m.contains("no ATS")));
        let s =
            WorkloadSpec { streams: vec![(no_ats, StreamSpec::uniform(0, 4096))], mode: Mode::LinkBaseline, ..spec() };
        assert!(matches!(bad(s), WorkloadError::Invalid(m) if m.contains("link baseline")));
        let sid = SourceId::new(0, 1, 0);
        let stream = |pattern, base, footprint| WorkloadSpec {
            streams: vec![(sid, StreamSpec { pattern, base, footprint })],
            ..spec()
        };
        assert!(matches!(bad(stream(Pattern::Uniform, 0, 0)), WorkloadError::Invalid(_)));
        assert!(matches!(bad(stream(Pattern::Uniform, 0, 100)), WorkloadError::Invalid(_)));
        assert!(matches!(bad(stream(Pattern::Uniform, 3, 4096)), WorkloadError::Invalid(_)));
        assert!(matches!(bad(stream(Pattern::Uniform, u64::MAX - 63, 128)), WorkloadError::Invalid(_)));
        assert!(matches!(bad(stream(Pattern::Zipf { exponent: 0.0 }, 0, 4096)), WorkloadError::Invalid(_)));
        assert!(matches!(bad(stream(Pattern::Zipf { exponent: 1.0 }, 0, 64)), WorkloadError::Invalid(_)));
        assert!(matches!(bad(stream(Pattern::Strided { stride: 0 }, 0, 4096)), WorkloadError::Invalid(_)));
        assert!(matches!(bad(stream(Pattern::Strided { stride: 100 }, 0, 4096)), WorkloadError::Invalid(_)));
    }
}
