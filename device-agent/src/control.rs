//! The AgentControl gRPC service: the load generator's handle on an agent.
//!
//! Thin: decode a request (`wire`), call the [`Agent`], encode the answer (`wire`). Domain
//! errors become gRPC statuses here and nowhere else, and refused trace files are counted
//! and logged here (`security::Refusals`). Not here: what a workload or an access does
//! (`workload`, `function`), who may call at all (`security`'s gate, in front of this).

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use dmar_proto::v1 as pb;
use dmar_proto::v1::agent_control_server::AgentControl;
use dmar_vtd::SourceId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::agent::Agent;
use crate::function::{AccessError, Stopped};
use crate::security::{Refusal, Refusals, Refused};
use crate::wire;
use crate::workload::{TraceError, TraceFileError, WorkloadError};

/// The service.
#[derive(Debug, Clone)]
pub(crate) struct AgentControlService {
    agent: Agent,
    refusals: Arc<Refusals>,
}

impl AgentControlService {
    pub(crate) fn new(agent: Agent, refusals: Arc<Refusals>) -> Self {
        Self { agent, refusals }
    }

    fn sid(&self, raw: u32) -> Result<SourceId, Status> {
        wire::source_id(raw, |sid| self.agent.function(sid).is_some()).map_err(workload_status)
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
        // FAILED_PRECONDITION when the agent reads no trace files at all (no request can
        // succeed), INVALID_ARGUMENT for what the request named.
        WorkloadError::TraceFile(TraceFileError::Disabled | TraceFileError::Directory(_)) => {
            Status::failed_precondition(msg)
        }
        WorkloadError::TraceFile(_) => Status::invalid_argument(msg),
    }
}

/// The refusal a trace file error counts as, if it is one: the agent declining to read,
/// as opposed to a file that is missing or malformed.
fn trace_refusal(e: &TraceFileError) -> Option<Refusal> {
    match e {
        TraceFileError::Disabled => Some(Refusal::TraceDisabled),
        TraceFileError::NotRelative | TraceFileError::Outside | TraceFileError::NotAFile => Some(Refusal::TracePath),
        TraceFileError::Trace(TraceError::TooLarge { .. }) => Some(Refusal::TraceSize),
        TraceFileError::Directory(_) | TraceFileError::Trace(_) => None,
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

#[tonic::async_trait]
impl AgentControl for AgentControlService {
    async fn get_agent_info(&self, _r: Request<pb::GetAgentInfoRequest>) -> Result<Response<pb::AgentInfo>, Status> {
        let link = self.agent.link_state();
        let snapshots = self.agent.snapshots().await.map_err(stopped)?;
        let functions = snapshots
            .iter()
            .filter_map(|s| Some(wire::agent_function(s, self.agent.function(s.sid)?.config())))
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
        let sids = self.agent.source_ids().to_vec();
        let peer = dmar_auth::PeerInfo::of(&r).cloned();
        let remote = peer.as_ref().and_then(dmar_auth::PeerInfo::remote_addr).or_else(|| r.remote_addr());
        let r = r.into_inner();
        let files = self.agent.config().trace_files();
        // Trace files are read here, so the decoding runs where it may block. The last path
        // asked for is the one an error is about.
        let (spec, path) = tokio::task::spawn_blocking(move || {
            let last = RefCell::new(String::new());
            let spec = wire::workload_spec(r, &sids, |path| {
                path.clone_into(&mut last.borrow_mut());
                files.load(path)
            });
            (spec, last.into_inner())
        })
        .await
        .map_err(|e| Status::internal(format!("trace loading failed: {e}")))?;
        let spec = spec.map_err(|e| {
            if let WorkloadError::TraceFile(f) = &e
                && let Some(reason) = trace_refusal(f)
            {
                let identity = peer.as_ref().and_then(dmar_auth::PeerInfo::identity);
                self.refusals.refuse(reason, Refused { peer: remote, identity, path: Some(&path) });
            }
            workload_status(e)
        })?;
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
        let run = self.agent.workload_run(r.run_id).map_err(workload_status)?;
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
                let p = wire::progress(&run);
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
        let run = self.agent.workload_run(r.run_id).map_err(workload_status)?;
        let report = if r.wait {
            let shutdown = self.agent.shutdown_token();
            tokio::select! {
                rep = run.finished() => wire::report(&rep),
                () = shutdown.cancelled() => return Err(Status::unavailable("the agent is shutting down")),
            }
        } else {
            match run.report() {
                Some(rep) => wire::report(&rep),
                None => wire::partial_report(&run),
            }
        };
        Ok(Response::new(report))
    }

    async fn access(&self, r: Request<pb::AccessRequest>) -> Result<Response<pb::AccessResponse>, Status> {
        let r = r.into_inner();
        let sid = self.sid(r.source_id)?;
        let f = self.agent.function(sid).ok_or_else(|| Status::not_found(format!("function {sid} is gone")))?;
        let o = f.access(wire::dma(&r)).await.map_err(access_status)?;
        Ok(Response::new(wire::access_response(&o)))
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
