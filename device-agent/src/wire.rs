//! Every conversion between `dmar_proto` messages and the agent's own types, in one place.
//!
//! Owns the wire forms of: the ATS link (the bind and its answer, what a function sends up
//! and what the server sends down: `function::messages`; a function's task converts its
//! own traffic, so the link's shared tasks only move messages), the baseline's unary
//! `Control.Translate`, and the AgentControl service (workload descriptions, accesses,
//! reports, progress, agent information). Not here: moving messages (`link`, `task`),
//! serving the gRPC calls and mapping errors to statuses (`control`), deciding anything
//! about an access (`function`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmar_proto::v1 as pb;
use dmar_vtd::SourceId;
use hdrhistogram::Histogram;

use crate::atc::EvictionPolicy;
use crate::config::{AgentConfig, FunctionConfig};
use crate::counters::Counters;
use crate::function::messages::{
    BaselineAnswer, Completion, DmaCompletion, Grant, InvalidationRequest, PageGroupResponse, PageResponseCode,
    TranslationCompletion, Up,
};
use crate::function::{Dma, DmaOutcome, DmaResult, FunctionSnapshot, Mode};
use crate::link::UpKind;
use crate::workload::{
    LatencySummary, Pattern, Report, Run, RunPhase, StreamSpec, Trace, TraceError, TraceFileError, WorkloadError,
    WorkloadSpec, encode_histogram,
};

/// Bytes a DMA write carries.
const WRITE_PATTERN: u8 = 0x5a;

// ---- the ATS link -------------------------------------------------------------------------

/// The first message of a connection: the agent's functions and their capabilities.
pub(crate) fn bind(config: &AgentConfig) -> pb::LinkUp {
    let functions = config
        .functions
        .iter()
        .map(|f| pb::Function {
            source_id: u32::from(f.sid.0),
            invalidate_queue_depth: u32::from(f.invalidate_queue_depth),
            page_request_capacity: u32::from(f.page_request_capacity),
        })
        .collect();
    pb::LinkUp { bind: Some(pb::Bind { functions, agent: config.name.clone() }), ..Default::default() }
}

/// The requester ids the server bound, if `m` answers the bind.
pub(crate) fn bound(m: pb::LinkDown) -> Option<Vec<u32>> {
    m.bound.map(|b| b.source_ids)
}

/// A function's request in its wire form (a write carries its payload).
pub(crate) fn up(source_id: u32, up: Up) -> UpKind {
    match up {
        Up::Translation(t) => UpKind::Translation(pb::TranslationRequest {
            tag: t.tag,
            source_id,
            address: t.address,
            no_write: t.no_write,
        }),
        Up::Dma(d) => UpKind::Dma(pb::DmaRequest {
            tag: d.tag,
            source_id,
            translated: d.translated,
            address: d.address,
            write: d.write,
            length: if d.write { 0 } else { d.len },
            data: if d.write { vec![WRITE_PATTERN; d.len as usize] } else { Vec::new() },
        }),
        Up::Page(p) => UpKind::Page(pb::PageRequest {
            source_id,
            address: p.address,
            read: p.read,
            write: p.write,
            group_index: u32::from(p.group_index),
            last: p.last,
        }),
    }
}

/// An invalidation completion for `itag`.
pub(crate) fn invalidation_completion(source_id: u32, itag: u32) -> pb::InvalidationCompletion {
    pb::InvalidationCompletion { source_id, itag }
}

pub(crate) fn invalidation_request(x: &pb::InvalidationRequest) -> InvalidationRequest {
    InvalidationRequest { itag: x.itag, address: x.address }
}

/// A completion; an unknown status reads as Completer Abort, a success without an entry
/// as R=W=0.
pub(crate) fn translation_completion(x: &pb::TranslationCompletion) -> TranslationCompletion {
    let completion = match pb::CompletionStatus::try_from(x.status) {
        Ok(pb::CompletionStatus::Success) => {
            let e = x.entry.unwrap_or_default();
            Completion::Success(Grant {
                translated: e.translated_address,
                size_shift: e.size_shift,
                read: e.read,
                write: e.write,
                untranslated_only: e.untranslated_only,
            })
        }
        Ok(pb::CompletionStatus::UnsupportedRequest) => Completion::UnsupportedRequest,
        Ok(pb::CompletionStatus::CompleterAbort) | Err(_) => Completion::CompleterAbort,
    };
    TranslationCompletion { tag: x.tag, completion }
}

pub(crate) fn dma_completion(x: &pb::DmaCompletion) -> DmaCompletion {
    DmaCompletion { tag: x.tag, ok: x.ok, fault_reason: x.fault_reason }
}

pub(crate) fn page_group_response(x: &pb::PageGroupResponse) -> PageGroupResponse {
    let code = match pb::PageResponseCode::try_from(x.code) {
        Ok(pb::PageResponseCode::Success) => PageResponseCode::Success,
        Ok(pb::PageResponseCode::Invalid) => PageResponseCode::Invalid,
        Ok(pb::PageResponseCode::Failure) => PageResponseCode::Failure,
        Err(_) => PageResponseCode::Other(x.code),
    };
    PageGroupResponse { group_index: x.group_index, code }
}

// ---- the baseline -------------------------------------------------------------------------

/// The unary translation of a baseline access.
pub(crate) fn translate_request(source_id: u32, iova: u64, write: bool) -> pb::TranslateRequest {
    let access = if write { pb::AccessKind::Write } else { pb::AccessKind::Read };
    pb::TranslateRequest { source_id, iova, access: access as i32 }
}

/// What the baseline call's result means for the access.
pub(crate) fn baseline_answer(result: Result<pb::TranslateResponse, tonic::Status>) -> BaselineAnswer {
    match result {
        Ok(r) if r.ok => BaselineAnswer::Translated { hpa: r.hpa, page_shift: r.page_shift },
        Ok(r) => BaselineAnswer::Refused { fault_reason: r.fault_reason },
        Err(s) => {
            tracing::debug!(error = %s.message(), "baseline translation call failed");
            BaselineAnswer::Failed
        }
    }
}

// ---- AgentControl: requests -----------------------------------------------------------------

/// A requester id the agent hosts (`hosted` says which).
pub(crate) fn source_id(raw: u32, hosted: impl Fn(SourceId) -> bool) -> Result<SourceId, WorkloadError> {
    let sid = u16::try_from(raw)
        .map(SourceId)
        .map_err(|_| WorkloadError::Invalid(format!("requester id {raw:#x} does not fit 16 bits")))?;
    if !hosted(sid) {
        return Err(WorkloadError::UnknownFunction(sid));
    }
    Ok(sid)
}

/// The DMA an `Access` call asks for (64 bytes when the length is not set).
pub(crate) fn dma(r: &pb::AccessRequest) -> Dma {
    Dma {
        iova: r.iova,
        write: r.write,
        len: if r.length == 0 { 64 } else { r.length },
        translate_only: r.translate_only,
        mode: Mode::Ats,
    }
}

fn invalid(s: impl Into<String>) -> WorkloadError {
    WorkloadError::Invalid(s.into())
}

fn trace_error(e: TraceError) -> WorkloadError {
    WorkloadError::Invalid(e.to_string())
}

/// A stream description; `load` reads a trace file (blocking).
fn stream_spec(
    s: &pb::AddressStream,
    load: &impl Fn(&str) -> Result<Trace, TraceFileError>,
) -> Result<StreamSpec, WorkloadError> {
    let pattern = match pb::AddressPattern::try_from(s.pattern) {
        Ok(pb::AddressPattern::Uniform) => Pattern::Uniform,
        Ok(pb::AddressPattern::Zipf) => {
            Pattern::Zipf { exponent: if s.zipf_exponent == 0.0 { 1.0 } else { s.zipf_exponent } }
        }
        Ok(pb::AddressPattern::SequentialRing) => Pattern::SequentialRing,
        Ok(pb::AddressPattern::Strided) => Pattern::Strided { stride: if s.stride == 0 { 4096 } else { s.stride } },
        Ok(pb::AddressPattern::Trace) => {
            let trace = if !s.trace_path.is_empty() {
                load(&s.trace_path)?
            } else if !s.trace.is_empty() {
                Trace::parse(&s.trace).map_err(trace_error)?
            } else {
                return Err(invalid("a trace stream needs trace_path or trace"));
            };
            Pattern::Trace(Arc::new(trace))
        }
        Ok(pb::AddressPattern::Unspecified) => return Err(invalid("the stream's pattern is not set")),
        Err(_) => return Err(invalid(format!("unknown address pattern {}", s.pattern))),
    };
    Ok(StreamSpec { pattern, base: s.base, footprint: s.footprint })
}

fn mode(raw: i32) -> Result<Mode, WorkloadError> {
    match pb::WorkloadMode::try_from(raw) {
        Ok(pb::WorkloadMode::Unspecified | pb::WorkloadMode::Ats) => Ok(Mode::Ats),
        Ok(pb::WorkloadMode::Baseline) => Ok(Mode::Baseline),
        Ok(pb::WorkloadMode::LinkBaseline) => Ok(Mode::LinkBaseline),
        Err(_) => Err(invalid(format!("unknown workload mode {raw}"))),
    }
}

/// The workload a `StartWorkload` call describes, for the agent's functions `sids`
/// (`hosted` says which requester ids those are); `load` reads trace files, so this may
/// block.
pub(crate) fn workload_spec(
    r: pb::StartWorkloadRequest,
    sids: &[SourceId],
    load: impl Fn(&str) -> Result<Trace, TraceFileError>,
) -> Result<WorkloadSpec, WorkloadError> {
    if !(r.rate_per_second.is_finite() && r.rate_per_second >= 0.0) {
        return Err(invalid(format!("the rate must be 0 or positive, got {}", r.rate_per_second)));
    }
    if r.duration_ms == 0 {
        return Err(invalid("duration_ms must be positive"));
    }
    let default = match &r.stream {
        Some(s) => Some(stream_spec(s, &load)?),
        None => None,
    };
    let mut streams = Vec::new();
    if r.functions.is_empty() {
        let Some(d) = default else {
            return Err(invalid("set `stream`, or list `functions` with their streams"));
        };
        for sid in sids {
            streams.push((*sid, d.clone()));
        }
    } else {
        for f in &r.functions {
            let sid = source_id(f.source_id, |s| sids.contains(&s))?;
            let s = match (&f.stream, &default) {
                (Some(s), _) => stream_spec(s, &load)?,
                (None, Some(d)) => d.clone(),
                (None, None) => {
                    return Err(invalid(format!("function {sid} has no stream and there is no default")));
                }
            };
            streams.push((sid, s));
        }
    }
    Ok(WorkloadSpec {
        mode: mode(r.mode)?,
        duration: Duration::from_millis(r.duration_ms),
        warmup: Duration::from_millis(r.warmup_ms),
        concurrency: r.concurrency.max(1),
        rate_per_second: (r.rate_per_second > 0.0).then_some(r.rate_per_second),
        streams,
        write_fraction: r.write_fraction,
        translate_only: r.translate_only,
        dma_bytes: if r.dma_bytes == 0 { 64 } else { r.dma_bytes },
        seed: r.seed,
    })
}

// ---- AgentControl: answers --------------------------------------------------------------------

/// The answer to an `Access` call.
pub(crate) fn access_response(o: &DmaOutcome) -> pb::AccessResponse {
    let (result, fault_reason) = match o.result {
        DmaResult::Ok => (pb::AccessResult::Ok, 0),
        DmaResult::Fault(_) => (pb::AccessResult::Fault, 0),
        DmaResult::DmaFailed { fault_reason } => (pb::AccessResult::DmaFailed, fault_reason),
        DmaResult::LinkDown => (pb::AccessResult::LinkDown, 0),
    };
    pb::AccessResponse {
        result: result as i32,
        atc_hit: o.atc_hit,
        coalesced: o.coalesced,
        page_requested: o.page_requested,
        untranslated: o.untranslated,
        translated_address: o.translated.unwrap_or(0),
        size_shift: u32::from(o.size_shift),
        fault_reason,
        latency_ns: o.latency.as_nanos() as u64,
    }
}

/// One function as `GetAgentInfo` describes it.
pub(crate) fn agent_function(s: &FunctionSnapshot, c: &FunctionConfig) -> pb::AgentFunction {
    pb::AgentFunction {
        source_id: u32::from(s.sid.0),
        name: s.sid.to_string(),
        ats: c.ats,
        invalidate_queue_depth: u32::from(c.invalidate_queue_depth),
        smallest_translation_unit: u32::from(c.smallest_translation_unit),
        page_request_capacity: u32::from(c.page_request_capacity),
        atc_capacity: c.atc_capacity as u32,
        eviction: policy(c.eviction) as i32,
        atc_entries: s.atc_entries as u32,
        lifetime: Some(counters(&s.counters)),
    }
}

/// Counters in their wire form.
pub(crate) fn counters(c: &Counters) -> pb::WorkloadCounters {
    pb::WorkloadCounters {
        accesses: c.accesses,
        atc_hits: c.atc_hits,
        atc_misses: c.atc_misses,
        coalesced_misses: c.coalesced_misses,
        translations_requested: c.translations_requested,
        translation_errors: c.translation_errors,
        stale_completions: c.stale_completions,
        faults: c.faults,
        invalidations_handled: c.invalidations_handled,
        invalidated_entries: c.invalidated_entries,
        evictions: c.evictions,
        page_requests: c.page_requests,
        page_request_failures: c.page_request_failures,
        dma_ok: c.dma_ok,
        dma_failed: c.dma_failed,
        untranslated_dma: c.untranslated_dma,
        baseline_calls: c.baseline_calls,
        aborted: c.aborted,
        stu_violations: c.stu_violations,
    }
}

fn latency(h: &Histogram<u64>) -> pb::LatencySummary {
    let s = LatencySummary::of(h);
    pb::LatencySummary {
        count: s.count,
        mean_ns: s.mean_ns,
        p50_ns: s.p50_ns,
        p90_ns: s.p90_ns,
        p99_ns: s.p99_ns,
        p999_ns: s.p999_ns,
        max_ns: s.max_ns,
        histogram: encode_histogram(h),
    }
}

fn phase(p: RunPhase) -> pb::RunState {
    match p {
        RunPhase::WarmingUp => pb::RunState::WarmingUp,
        RunPhase::Measuring => pb::RunState::Measuring,
        RunPhase::Draining => pb::RunState::Draining,
        RunPhase::Finished => pb::RunState::Finished,
        RunPhase::Stopped => pb::RunState::Stopped,
    }
}

fn workload_mode(m: Mode) -> pb::WorkloadMode {
    match m {
        Mode::Ats => pb::WorkloadMode::Ats,
        Mode::Baseline => pb::WorkloadMode::Baseline,
        Mode::LinkBaseline => pb::WorkloadMode::LinkBaseline,
    }
}

fn policy(p: EvictionPolicy) -> pb::EvictionPolicy {
    match p {
        EvictionPolicy::Lru => pb::EvictionPolicy::Lru,
        EvictionPolicy::Random => pb::EvictionPolicy::Random,
        EvictionPolicy::Fifo => pb::EvictionPolicy::Fifo,
    }
}

/// A final report in its wire form.
pub(crate) fn report(r: &Report) -> pb::WorkloadReport {
    pb::WorkloadReport {
        run_id: r.run_id,
        state: phase(r.phase) as i32,
        mode: workload_mode(r.mode) as i32,
        measured_ns: r.measured.as_nanos() as u64,
        totals: Some(counters(&r.totals)),
        functions: r
            .functions
            .iter()
            .map(|f| pb::FunctionReport {
                source_id: u32::from(f.sid.0),
                counters: Some(counters(&f.counters)),
                atc_entries: f.atc_entries as u32,
            })
            .collect(),
        access_latency: Some(latency(&r.access_latency)),
        miss_latency: Some(latency(&r.miss_latency)),
        invalidation_latency: Some(latency(&r.invalidation_latency)),
        accesses_per_second: r.accesses_per_second(),
        atc_hit_ratio: r.totals.hit_ratio(),
    }
}

/// The report of a run still in progress: counters so far, no histograms.
pub(crate) fn partial_report(run: &Run) -> pb::WorkloadReport {
    let totals = run.progress();
    let measured = Instant::now().saturating_duration_since(run.measure_from);
    pb::WorkloadReport {
        run_id: run.id,
        state: phase(run.phase()) as i32,
        mode: workload_mode(run.mode) as i32,
        measured_ns: measured.as_nanos() as u64,
        totals: Some(counters(&totals)),
        functions: Vec::new(),
        access_latency: None,
        miss_latency: None,
        invalidation_latency: None,
        accesses_per_second: if measured.is_zero() { 0.0 } else { totals.accesses as f64 / measured.as_secs_f64() },
        atc_hit_ratio: totals.hit_ratio(),
    }
}

/// A run's progress; the last one carries the report.
pub(crate) fn progress(run: &Run) -> pb::WorkloadProgress {
    let report = run.report();
    pb::WorkloadProgress {
        run_id: run.id,
        state: phase(run.phase()) as i32,
        elapsed_ms: run.started.elapsed().as_millis() as u64,
        counters: Some(counters(&report.as_ref().map_or_else(|| run.progress(), |r| r.totals))),
        done: report.is_some(),
        report: report.as_deref().map(self::report),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::function::messages::{DmaRequest, PageRequest, TranslationRequest};

    #[test]
    fn link_items_carry_their_requester_id_and_payload() {
        let t = TranslationRequest { tag: 7, address: 0x5000, no_write: true };
        let UpKind::Translation(t) = up(0x108, Up::Translation(t)) else { panic!("translation") };
        assert_eq!((t.source_id, t.tag, t.address, t.no_write), (0x108, 7, 0x5000, true));
        let w = DmaRequest { tag: 8, translated: true, address: 0x9040, write: true, len: 64 };
        let UpKind::Dma(d) = up(0x108, Up::Dma(w)) else { panic!("dma") };
        assert_eq!((d.source_id, d.translated, d.address, d.length, d.data.len()), (0x108, true, 0x9040, 0, 64));
        assert!(d.data.iter().all(|b| *b == WRITE_PATTERN));
        let UpKind::Dma(d) = up(0x108, Up::Dma(DmaRequest { write: false, len: 32, ..w })) else { panic!("dma") };
        assert_eq!((d.length, d.data.len()), (32, 0), "a read asks for its length, carries nothing");
        let p = PageRequest { address: 0x2000, read: true, write: false, group_index: 511, last: true };
        let UpKind::Page(p) = up(0x108, Up::Page(p)) else { panic!("page") };
        assert_eq!((p.source_id, p.group_index, p.read, p.write, p.last), (0x108, 511, true, false, true));
        let c = invalidation_completion(0x108, 4);
        assert_eq!((c.source_id, c.itag), (0x108, 4));
    }

    #[test]
    fn unknown_codes_are_kept_apart() {
        let c = |status| translation_completion(&pb::TranslationCompletion { tag: 1, status, ..Default::default() });
        assert_eq!(c(0).completion, Completion::Success(Grant::default()), "no entry: R=W=0");
        assert_eq!(c(1).completion, Completion::UnsupportedRequest);
        assert_eq!(c(2).completion, Completion::CompleterAbort);
        assert_eq!(c(9).completion, Completion::CompleterAbort);
        let p = |code| page_group_response(&pb::PageGroupResponse { code, ..Default::default() }).code;
        assert_eq!(
            (p(0), p(1), p(15), p(7)),
            (
                PageResponseCode::Success,
                PageResponseCode::Invalid,
                PageResponseCode::Failure,
                PageResponseCode::Other(7)
            )
        );
        assert_eq!(baseline_answer(Err(tonic::Status::unavailable("down"))), BaselineAnswer::Failed);
    }
}
