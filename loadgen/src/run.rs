//! Running one workload on a set of devices spread over agents: start it on every agent
//! at once, wait for every report, and read the server's counters around it.

use std::collections::BTreeMap;

use anyhow::Context as _;
use dmar_proto::v1::{
    AddressPattern, AddressStream, FunctionWorkload, GetReportRequest, StartWorkloadRequest, WorkloadMode,
    WorkloadReport,
};

use crate::args::{Common, PatternArg};
use crate::cluster::{Cluster, Device};
use crate::report::RunSummary;
use crate::scenario::IOVA_BASE;
use dmar_vtd::PAGE_SIZE;

/// The workload request for `common`'s settings (functions are filled per agent).
pub(crate) fn workload(common: &Common, mode: WorkloadMode) -> StartWorkloadRequest {
    let pattern = match common.pattern {
        PatternArg::Uniform => AddressPattern::Uniform,
        PatternArg::Zipf => AddressPattern::Zipf,
        PatternArg::Sequential => AddressPattern::SequentialRing,
        PatternArg::Strided => AddressPattern::Strided,
    };
    StartWorkloadRequest {
        mode: mode as i32,
        duration_ms: common.duration.as_millis() as u64,
        warmup_ms: common.warmup.as_millis() as u64,
        concurrency: common.concurrency,
        rate_per_second: common.rate,
        stream: Some(AddressStream {
            pattern: pattern as i32,
            base: IOVA_BASE,
            footprint: common.footprint,
            zipf_exponent: 0.99,
            stride: PAGE_SIZE * 17,
            trace_path: String::new(),
            trace: String::new(),
        }),
        functions: Vec::new(),
        write_fraction: common.write_fraction,
        translate_only: !common.dma,
        dma_bytes: 64,
        seed: common.seed,
    }
}

/// Runs `request` on `devices` and returns the aggregated summary with the raw reports.
pub(crate) async fn run(
    cluster: &Cluster,
    devices: &[Device],
    request: &StartWorkloadRequest,
) -> anyhow::Result<(RunSummary, Vec<WorkloadReport>)> {
    let mut by_agent: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    for d in devices {
        by_agent.entry(d.agent).or_default().push(d.sid);
    }
    let before = cluster.stats().await?;
    let mut started = Vec::new();
    for (agent, sids) in &by_agent {
        let mut req = request.clone();
        req.functions = sids.iter().map(|&source_id| FunctionWorkload { source_id, stream: None }).collect();
        let handle = &cluster.agents[*agent];
        let run_id = handle
            .client
            .clone()
            .start_workload(req)
            .await
            .with_context(|| format!("agent {} refused the workload", handle.endpoint))?
            .into_inner()
            .run_id;
        started.push((*agent, run_id));
    }
    let waits = started.into_iter().map(|(agent, run_id)| {
        let mut client = cluster.agents[agent].client.clone();
        let endpoint = cluster.agents[agent].endpoint.clone();
        tokio::spawn(async move {
            client
                .get_report(GetReportRequest { run_id, wait: true })
                .await
                .map(|r| r.into_inner())
                .with_context(|| format!("report from agent {endpoint}"))
        })
    });
    let mut reports = Vec::new();
    for w in waits.collect::<Vec<_>>() {
        reports.push(w.await.context("report task")??);
    }
    let after = cluster.stats().await?;
    let mode = WorkloadMode::try_from(request.mode).unwrap_or(WorkloadMode::Ats);
    Ok((RunSummary::aggregate(devices.len(), &reports, &before, &after, mode), reports))
}
