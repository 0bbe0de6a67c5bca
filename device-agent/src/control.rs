//! The AgentControl gRPC service: the load generator's handle on an agent.
//!
//! Thin: decode and validate a request, call the [`Agent`], encode the answer. Domain
//! errors become gRPC statuses here and nowhere else.

use std::sync::Arc;
use std::time::Duration;

use dmar_proto::v1 as pb;
use dmar_proto::v1::agent_control_server::AgentControl;
use dmar_vtd::SourceId;
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::agent::Agent;
use crate::atc::EvictionPolicy;
use crate::counters::Counters;
use crate::function::{Access, AccessError, AccessResult, Mode, Stopped};
use crate::workload::{
    LatencySummary, Pattern, Report, Run, RunPhase, StreamSpec, Trace, TraceError, WorkloadError, WorkloadSpec,
    encode_histogram,
};

/// The service.
#[derive(Debug, Clone)]
pub(crate) struct ControlService {
    agent: Agent,
}

impl ControlService {
    pub(crate) fn new(agent: Agent) -> Self {
        Self { agent }
    }

    fn sid(&self, raw: u32) -> Result<SourceId, Status> {
        let sid = u16::try_from(raw)
            .map(SourceId)
            .map_err(|_| Status::invalid_argument(format!("requester id {raw:#x} does not fit 16 bits")))?;
        if self.agent.function(sid).is_none() {
            return Err(Status::not_found(format!("function {sid} is not hosted by this agent")));
        }
        Ok(sid)
    }
}

// ---- errors -------------------------------------------------------------------------------

fn workload_status(e: WorkloadError) -> Status {
    let msg = e.to_string();
    match e {
        WorkloadError::Invalid(_) => Status::invalid_argument(msg),
        WorkloadError::UnknownFunction(_) | WorkloadError::NoSuchRun(_) => Status::not_found(msg),
        WorkloadError::Busy(_) => Status::failed_precondition(msg),
        WorkloadError::ShuttingDown => Status::unavailable(msg),
    }
}

fn stopped(e: Stopped) -> Status {
    Status::unavailable(e.to_string())
}

fn access_status(e: AccessError) -> Status {
    match e {
        AccessError::Invalid(e) => Status::invalid_argument(e.to_string()),
        AccessError::Stopped(e) => stopped(e),
    }
}

fn trace_status(e: TraceError) -> Status {
    Status::invalid_argument(e.to_string())
}

// ---- decoding -----------------------------------------------------------------------------

async fn stream_spec(s: &pb::AddressStream) -> Result<StreamSpec, Status> {
    let pattern = match pb::AddressPattern::try_from(s.pattern) {
        Ok(pb::AddressPattern::Uniform) => Pattern::Uniform,
        Ok(pb::AddressPattern::Zipf) => {
            Pattern::Zipf { exponent: if s.zipf_exponent == 0.0 { 1.0 } else { s.zipf_exponent } }
        }
        Ok(pb::AddressPattern::SequentialRing) => Pattern::SequentialRing,
        Ok(pb::AddressPattern::Strided) => Pattern::Strided { stride: if s.stride == 0 { 4096 } else { s.stride } },
        Ok(pb::AddressPattern::Trace) => {
            let trace = if !s.trace_path.is_empty() {
                let path = s.trace_path.clone();
                tokio::task::spawn_blocking(move || Trace::load(path))
                    .await
                    .map_err(|e| Status::internal(format!("trace loading failed: {e}")))?
                    .map_err(trace_status)?
            } else if !s.trace.is_empty() {
                Trace::parse(&s.trace).map_err(trace_status)?
            } else {
                return Err(Status::invalid_argument("a trace stream needs trace_path or trace"));
            };
            Pattern::Trace(Arc::new(trace))
        }
        Ok(pb::AddressPattern::Unspecified) => return Err(Status::invalid_argument("the stream's pattern is not set")),
        Err(_) => return Err(Status::invalid_argument(format!("unknown address pattern {}", s.pattern))),
    };
    Ok(StreamSpec { pattern, base: s.base, footprint: s.footprint })
}

fn mode(raw: i32) -> Result<Mode, Status> {
    match pb::WorkloadMode::try_from(raw) {
        Ok(pb::WorkloadMode::Unspecified | pb::WorkloadMode::Ats) => Ok(Mode::Ats),
        Ok(pb::WorkloadMode::Baseline) => Ok(Mode::Baseline),
        Err(_) => Err(Status::invalid_argument(format!("unknown workload mode {raw}"))),
    }
}

impl ControlService {
    async fn workload_spec(&self, r: pb::StartWorkloadRequest) -> Result<WorkloadSpec, Status> {
        if !(r.rate_per_second.is_finite() && r.rate_per_second >= 0.0) {
            return Err(Status::invalid_argument(format!("the rate must be 0 or positive, got {}", r.rate_per_second)));
        }
        if r.duration_ms == 0 {
            return Err(Status::invalid_argument("duration_ms must be positive"));
        }
        let default = match &r.stream {
            Some(s) => Some(stream_spec(s).await?),
            None => None,
        };
        let mut streams = Vec::new();
        if r.functions.is_empty() {
            let Some(d) = default else {
                return Err(Status::invalid_argument("set `stream`, or list `functions` with their streams"));
            };
            for sid in self.agent.source_ids() {
                streams.push((*sid, d.clone()));
            }
        } else {
            for f in &r.functions {
                let sid = self.sid(f.source_id)?;
                let s = match (&f.stream, &default) {
                    (Some(s), _) => stream_spec(s).await?,
                    (None, Some(d)) => d.clone(),
                    (None, None) => {
                        return Err(Status::invalid_argument(format!(
                            "function {sid} has no stream and there is no default"
                        )));
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
}

// ---- encoding -----------------------------------------------------------------------------

/// Counters in their wire form.
pub(crate) fn wire_counters(c: &Counters) -> pb::WorkloadCounters {
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

fn wire_latency(h: &Histogram<u64>) -> pb::LatencySummary {
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

fn wire_phase(p: RunPhase) -> pb::RunState {
    match p {
        RunPhase::WarmingUp => pb::RunState::WarmingUp,
        RunPhase::Measuring => pb::RunState::Measuring,
        RunPhase::Draining => pb::RunState::Draining,
        RunPhase::Finished => pb::RunState::Finished,
        RunPhase::Stopped => pb::RunState::Stopped,
    }
}

fn wire_mode(m: Mode) -> pb::WorkloadMode {
    match m {
        Mode::Ats => pb::WorkloadMode::Ats,
        Mode::Baseline => pb::WorkloadMode::Baseline,
    }
}

fn wire_policy(p: EvictionPolicy) -> pb::EvictionPolicy {
    match p {
        EvictionPolicy::Lru => pb::EvictionPolicy::Lru,
        EvictionPolicy::Random => pb::EvictionPolicy::Random,
        EvictionPolicy::Fifo => pb::EvictionPolicy::Fifo,
    }
}

/// A final report in its wire form.
pub(crate) fn wire_report(r: &Report) -> pb::WorkloadReport {
    pb::WorkloadReport {
        run_id: r.run_id,
        state: wire_phase(r.phase) as i32,
        mode: wire_mode(r.mode) as i32,
        measured_ns: r.measured.as_nanos() as u64,
        totals: Some(wire_counters(&r.totals)),
        functions: r
            .functions
            .iter()
            .map(|f| pb::FunctionReport {
                source_id: u32::from(f.sid.0),
                counters: Some(wire_counters(&f.counters)),
                atc_entries: f.atc_entries as u32,
            })
            .collect(),
        access_latency: Some(wire_latency(&r.access_latency)),
        miss_latency: Some(wire_latency(&r.miss_latency)),
        invalidation_latency: Some(wire_latency(&r.invalidation_latency)),
        accesses_per_second: r.accesses_per_second(),
        atc_hit_ratio: r.totals.hit_ratio(),
    }
}

/// The report of a run still in progress: counters so far, no histograms.
fn partial_report(run: &Run) -> pb::WorkloadReport {
    let totals = run.progress();
    let measured = std::time::Instant::now().saturating_duration_since(run.measure_from);
    pb::WorkloadReport {
        run_id: run.id,
        state: wire_phase(run.phase()) as i32,
        mode: wire_mode(run.mode) as i32,
        measured_ns: measured.as_nanos() as u64,
        totals: Some(wire_counters(&totals)),
        functions: Vec::new(),
        access_latency: None,
        miss_latency: None,
        invalidation_latency: None,
        accesses_per_second: if measured.is_zero() { 0.0 } else { totals.accesses as f64 / measured.as_secs_f64() },
        atc_hit_ratio: totals.hit_ratio(),
    }
}

fn progress(run: &Run) -> pb::WorkloadProgress {
    let report = run.report();
    pb::WorkloadProgress {
        run_id: run.id,
        state: wire_phase(run.phase()) as i32,
        elapsed_ms: run.started.elapsed().as_millis() as u64,
        counters: Some(wire_counters(&report.as_ref().map_or_else(|| run.progress(), |r| r.totals))),
        done: report.is_some(),
        report: report.as_deref().map(wire_report),
    }
}

#[tonic::async_trait]
impl AgentControl for ControlService {
    async fn get_agent_info(&self, _r: Request<pb::GetAgentInfoRequest>) -> Result<Response<pb::AgentInfo>, Status> {
        let link = self.agent.link_state();
        let snapshots = self.agent.snapshots().await.map_err(stopped)?;
        let functions = snapshots
            .into_iter()
            .filter_map(|s| {
                let f = self.agent.function(s.sid)?;
                let c = f.config();
                Some(pb::AgentFunction {
                    source_id: u32::from(s.sid.0),
                    name: s.sid.to_string(),
                    ats: c.ats,
                    invalidate_queue_depth: u32::from(c.invalidate_queue_depth),
                    smallest_translation_unit: u32::from(c.smallest_translation_unit),
                    page_request_capacity: u32::from(c.page_request_capacity),
                    atc_capacity: c.atc_capacity as u32,
                    eviction: wire_policy(c.eviction) as i32,
                    atc_entries: s.atc_entries as u32,
                    lifetime: Some(wire_counters(&s.counters)),
                })
            })
            .collect();
        Ok(Response::new(pb::AgentInfo {
            agent: self.agent.config().name.clone(),
            server: self.agent.config().server_url(),
            connected: link.connected,
            connections: link.generation,
            functions,
            running_run_id: self.agent.running().map_or(0, |r| r.id),
        }))
    }

    async fn start_workload(
        &self,
        r: Request<pb::StartWorkloadRequest>,
    ) -> Result<Response<pb::StartWorkloadResponse>, Status> {
        let spec = self.workload_spec(r.into_inner()).await?;
        let run = self.agent.start_workload(spec).await.map_err(workload_status)?;
        Ok(Response::new(pb::StartWorkloadResponse { run_id: run.id }))
    }

    type WatchWorkloadStream = ReceiverStream<Result<pb::WorkloadProgress, Status>>;

    async fn watch_workload(
        &self,
        r: Request<pb::WatchWorkloadRequest>,
    ) -> Result<Response<Self::WatchWorkloadStream>, Status> {
        let r = r.into_inner();
        let interval = match r.interval_ms {
            0 => 500,
            50..=60_000 => r.interval_ms,
            other => return Err(Status::invalid_argument(format!("interval_ms must be 50..=60000, got {other}"))),
        };
        let run = self.agent.run(r.run_id).map_err(workload_status)?;
        let (tx, rx) = mpsc::channel(4);
        let shutdown = self.agent.shutdown_token();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(u64::from(interval)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = run.finished() => {}
                    () = shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("the agent is shutting down"))).await;
                        return;
                    }
                }
                let p = progress(&run);
                let done = p.done;
                if tx.send(Ok(p)).await.is_err() || done {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn stop_workload(
        &self,
        r: Request<pb::StopWorkloadRequest>,
    ) -> Result<Response<pb::StopWorkloadResponse>, Status> {
        let id = self.agent.stop_workload(r.into_inner().run_id).map_err(workload_status)?;
        Ok(Response::new(pb::StopWorkloadResponse { run_id: id }))
    }

    async fn get_report(&self, r: Request<pb::GetReportRequest>) -> Result<Response<pb::WorkloadReport>, Status> {
        let r = r.into_inner();
        let run = self.agent.run(r.run_id).map_err(workload_status)?;
        let report = if r.wait {
            let shutdown = self.agent.shutdown_token();
            tokio::select! {
                rep = run.finished() => wire_report(&rep),
                () = shutdown.cancelled() => return Err(Status::unavailable("the agent is shutting down")),
            }
        } else {
            match run.report() {
                Some(rep) => wire_report(&rep),
                None => partial_report(&run),
            }
        };
        Ok(Response::new(report))
    }

    async fn access(&self, r: Request<pb::AccessRequest>) -> Result<Response<pb::AccessResponse>, Status> {
        let r = r.into_inner();
        let sid = self.sid(r.source_id)?;
        let access = Access {
            iova: r.iova,
            write: r.write,
            len: if r.length == 0 { 64 } else { r.length },
            translate_only: r.translate_only,
            mode: Mode::Ats,
        };
        let f = self.agent.function(sid).ok_or_else(|| Status::not_found(format!("function {sid} is gone")))?;
        let o = f.access(access).await.map_err(access_status)?;
        let (result, fault_reason) = match o.result {
            AccessResult::Ok => (pb::AccessResult::Ok, 0),
            AccessResult::Fault(_) => (pb::AccessResult::Fault, 0),
            AccessResult::DmaFailed { fault_reason } => (pb::AccessResult::DmaFailed, fault_reason),
            AccessResult::LinkDown => (pb::AccessResult::LinkDown, 0),
        };
        Ok(Response::new(pb::AccessResponse {
            result: result as i32,
            atc_hit: o.atc_hit,
            coalesced: o.coalesced,
            page_requested: o.page_requested,
            untranslated: o.untranslated,
            translated_address: o.translated.unwrap_or(0),
            size_shift: u32::from(o.size_shift),
            fault_reason,
            latency_ns: o.latency.as_nanos() as u64,
        }))
    }

    async fn clear_caches(
        &self,
        r: Request<pb::ClearCachesRequest>,
    ) -> Result<Response<pb::ClearCachesResponse>, Status> {
        let r = r.into_inner();
        let sids: Vec<SourceId> = if r.source_ids.is_empty() {
            self.agent.source_ids().to_vec()
        } else {
            r.source_ids.iter().map(|raw| self.sid(*raw)).collect::<Result<_, _>>()?
        };
        let mut dropped = 0u64;
        for sid in sids {
            if let Some(f) = self.agent.function(sid) {
                dropped += f.clear_cache().await.map_err(stopped)? as u64;
            }
        }
        Ok(Response::new(pb::ClearCachesResponse { dropped_entries: dropped }))
    }
}
