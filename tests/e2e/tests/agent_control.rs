//! The AgentControl service of an agent run with `dmar_agent::run` against a real server:
//! workloads in closed and open loop, translate-only and baseline, progress and reports
//! with mergeable histograms, input validation, health and metrics.

use std::time::Duration;

use dmar_agent::workload::decode_histogram;
use dmar_agent::{FunctionConfig, SourceId};
use dmar_e2e::*;
use dmar_proto::v1::agent_control_client::AgentControlClient;
use dmar_proto::v1::*;
use tonic::Code;
use tonic::transport::Channel;

const BASE: u64 = 0x100_0000;
const FOOTPRINT: u64 = 1 << 20;

struct Booted {
    server: Option<Server>,
    agent: RunningAgent,
    functions: Vec<SourceId>,
}

impl Booted {
    async fn client(&self) -> AgentControlClient<Channel> {
        self.agent.client().await
    }

    async fn stop(self) {
        self.agent.stop().await;
        if let Some(server) = self.server {
            server.stop().await;
        }
    }
}

/// A server with the footprint mapped for two functions, and an agent serving its ports.
async fn boot_agent() -> Booted {
    let server = boot(Duration::from_secs(30)).await;
    let functions = vec![sid("00:06.0"), sid("00:06.1")];
    let mut c = server.control().await;
    let did = paging_domain(&mut c, &functions).await;
    map(&mut c, did, BASE, 0x20_0000, FOOTPRINT, true).await;
    let config = agent_config(&server, functions.iter().map(|s| FunctionConfig::new(*s)).collect());
    let agent = RunningAgent::start(config).await;
    agent.connected().await;
    let booted = Booted { server: Some(server), agent, functions };
    let mut client = booted.client().await;
    let info = client.get_agent_info(GetAgentInfoRequest {}).await.expect("info").into_inner();
    assert_eq!(info.functions.len(), 2);
    assert_eq!(info.functions[0].name, "00:06.0");
    assert_eq!(info.functions[0].atc_capacity, 2048);
    assert_eq!(info.functions[0].eviction, EvictionPolicy::Lru as i32);
    booted
}

fn uniform() -> AddressStream {
    AddressStream { pattern: AddressPattern::Uniform as i32, base: BASE, footprint: FOOTPRINT, ..Default::default() }
}

fn request(duration_ms: u64) -> StartWorkloadRequest {
    StartWorkloadRequest {
        duration_ms,
        warmup_ms: 50,
        concurrency: 8,
        stream: Some(uniform()),
        write_fraction: 0.25,
        seed: 42,
        ..Default::default()
    }
}

/// Follows a run's progress to its end; returns the final report and how many progress
/// messages came before it.
async fn watch(client: &mut AgentControlClient<Channel>, run_id: u64) -> (WorkloadReport, usize) {
    let mut stream =
        client.watch_workload(WatchWorkloadRequest { run_id, interval_ms: 50 }).await.expect("watch").into_inner();
    let mut before = 0;
    loop {
        let p =
            tokio::time::timeout(PATIENCE, stream.message()).await.expect("progress").expect("ok").expect("message");
        assert_eq!(p.run_id, run_id);
        if p.done {
            return (p.report.expect("the last message carries the report"), before);
        }
        before += 1;
    }
}

fn totals(r: &WorkloadReport) -> WorkloadCounters {
    r.totals.expect("totals")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_loop_workload_reports_counters_and_mergeable_histograms() {
    let b = boot_agent().await;
    let mut client = b.client().await;
    let run = client.start_workload(request(300)).await.expect("start").into_inner().run_id;
    let (report, progress) = watch(&mut client, run).await;
    assert!(progress >= 1, "progress while it ran");
    assert_eq!(report.state, RunState::Finished as i32);
    assert_eq!(report.mode, WorkloadMode::Ats as i32);
    let t = totals(&report);
    assert!(t.accesses > 0 && t.atc_hits > 0 && t.atc_misses > 0, "{t:?}");
    assert_eq!((t.faults, t.dma_failed, t.aborted, t.translation_errors), (0, 0, 0, 0), "{t:?}");
    assert!(t.translations_requested <= t.atc_misses, "coalescing never adds requests");
    assert!(t.dma_ok > 0);
    assert!(report.measured_ns > 0);
    assert!(report.atc_hit_ratio > 0.0 && report.atc_hit_ratio <= 1.0);
    assert_eq!(report.functions.len(), 2);
    let sum: u64 = report.functions.iter().map(|f| f.counters.as_ref().expect("counters").accesses).sum();
    assert_eq!(sum, t.accesses);
    let access = report.access_latency.clone().expect("access latency");
    let h = decode_histogram(&access.histogram).expect("decodes");
    assert_eq!(h.len(), access.count);
    assert!(access.p50_ns <= access.p99_ns && access.p99_ns <= access.max_ns);
    let miss = report.miss_latency.clone().expect("miss latency");
    assert!(miss.count > 0);
    // Reports of several agents merge by adding their histograms.
    let mut merged = decode_histogram(&miss.histogram).expect("decodes");
    merged.add(decode_histogram(&miss.histogram).expect("decodes")).expect("merge");
    assert_eq!(merged.len(), 2 * miss.count);
    // The same report again, by id and as "latest".
    let again = client.get_report(GetReportRequest { run_id: 0, wait: true }).await.expect("report").into_inner();
    assert_eq!((again.run_id, totals(&again).accesses), (run, t.accesses));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_translate_only_baseline_and_trace_runs() {
    let b = boot_agent().await;
    let mut client = b.client().await;

    // Open loop: a fixed rate per function; every access is timed from its intended start.
    let open = StartWorkloadRequest { rate_per_second: 2000.0, ..request(300) };
    let run = client.start_workload(open).await.expect("start").into_inner().run_id;
    let (report, _) = watch(&mut client, run).await;
    let t = totals(&report);
    assert!(t.accesses > 0 && t.faults == 0, "{t:?}");
    // Accesses ending while the run drains are timed too, but no longer counted.
    assert!(report.access_latency.expect("latency").count >= t.accesses);

    // Translate only: hits finish inside the function, no DMA.
    let translate = StartWorkloadRequest { translate_only: true, concurrency: 4, ..request(200) };
    let run = client.start_workload(translate).await.expect("start").into_inner().run_id;
    let (report, _) = watch(&mut client, run).await;
    let t = totals(&report);
    assert!(t.atc_hits > 0 && t.dma_ok == 0 && t.faults == 0, "{t:?}");

    // Baseline: one unary translation per access, no device TLB.
    let baseline = StartWorkloadRequest { mode: WorkloadMode::Baseline as i32, translate_only: true, ..request(200) };
    let run = client.start_workload(baseline).await.expect("start").into_inner().run_id;
    let (report, _) = watch(&mut client, run).await;
    let t = totals(&report);
    assert_eq!(report.mode, WorkloadMode::Baseline as i32);
    assert!(t.baseline_calls > 0 && t.atc_hits == 0 && t.atc_misses == 0 && t.faults == 0, "{t:?}");
    assert!(report.miss_latency.expect("latency").count > 0);

    // A recorded trace, replayed on one function.
    let trace = format!("# ring\n{:#x} w\n{:#x} r\n{:#x} r\n", BASE, BASE + 0x1000, BASE + 0x2040);
    let replay = StartWorkloadRequest {
        functions: vec![FunctionWorkload {
            source_id: u32::from(b.functions[1].0),
            stream: Some(AddressStream { pattern: AddressPattern::Trace as i32, trace, ..Default::default() }),
        }],
        stream: None,
        ..request(200)
    };
    let run = client.start_workload(replay).await.expect("start").into_inner().run_id;
    let (report, _) = watch(&mut client, run).await;
    assert_eq!(report.functions.len(), 1);
    let t = totals(&report);
    assert!(t.accesses > 0 && t.faults == 0 && t.atc_hits > 0, "{t:?}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_statuses_and_runs_can_be_stopped() {
    let b = boot_agent().await;
    let mut client = b.client().await;
    let code = |r: Result<tonic::Response<StartWorkloadResponse>, tonic::Status>| match r {
        Ok(_) => Code::Ok,
        Err(s) => {
            assert!(!s.message().is_empty());
            s.code()
        }
    };
    assert_eq!(code(client.start_workload(request(0)).await), Code::InvalidArgument);
    assert_eq!(
        code(client.start_workload(StartWorkloadRequest { stream: None, ..request(100) }).await),
        Code::InvalidArgument
    );
    let unknown =
        StartWorkloadRequest { functions: vec![FunctionWorkload { source_id: 0x0900, stream: None }], ..request(100) };
    assert_eq!(code(client.start_workload(unknown).await), Code::NotFound);
    let odd = StartWorkloadRequest { dma_bytes: 96, ..request(100) };
    assert_eq!(code(client.start_workload(odd).await), Code::InvalidArgument);
    let bad_trace = StartWorkloadRequest {
        stream: Some(AddressStream {
            pattern: AddressPattern::Trace as i32,
            trace: "zz q\n".into(),
            ..Default::default()
        }),
        ..request(100)
    };
    let err = client.start_workload(bad_trace).await.expect_err("bad trace");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("line 1"), "{}", err.message());
    let negative = StartWorkloadRequest { rate_per_second: -1.0, ..request(100) };
    assert_eq!(code(client.start_workload(negative).await), Code::InvalidArgument);

    // One run at a time; a stopped run still reports what it measured.
    let long = client.start_workload(request(60_000)).await.expect("start").into_inner().run_id;
    assert_eq!(code(client.start_workload(request(100)).await), Code::FailedPrecondition);
    let info = client.get_agent_info(GetAgentInfoRequest {}).await.expect("info").into_inner();
    assert_eq!(info.running_run_id, long);
    let partial =
        client.get_report(GetReportRequest { run_id: long, wait: false }).await.expect("partial").into_inner();
    assert!(partial.state != RunState::Finished as i32 && partial.state != RunState::Stopped as i32);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(client.stop_workload(StopWorkloadRequest { run_id: 0 }).await.expect("stop").into_inner().run_id, long);
    let stopped = client.get_report(GetReportRequest { run_id: long, wait: true }).await.expect("report").into_inner();
    assert_eq!(stopped.state, RunState::Stopped as i32);
    assert!(totals(&stopped).accesses > 0);
    assert!(stopped.measured_ns < 60_000_000_000);
    assert_eq!(
        client.get_report(GetReportRequest { run_id: 999, wait: false }).await.expect_err("no such run").code(),
        Code::NotFound
    );
    assert_eq!(
        client
            .watch_workload(WatchWorkloadRequest { run_id: long, interval_ms: 10 })
            .await
            .expect_err("interval")
            .code(),
        Code::InvalidArgument
    );

    // Single accesses and cache clearing.
    let sid = u32::from(b.functions[0].0);
    let one = client.access(AccessRequest { source_id: sid, iova: BASE + 0x40, ..Default::default() }).await;
    let one = one.expect("access").into_inner();
    assert_eq!(one.result, AccessResult::Ok as i32);
    assert_eq!(one.translated_address & 0xfff, 0x40);
    let too_long = AccessRequest { source_id: sid, iova: BASE + 0x40, length: 4096, ..Default::default() };
    assert_eq!(client.access(too_long).await.expect_err("crosses a page").code(), Code::InvalidArgument);
    assert_eq!(
        client.access(AccessRequest { source_id: 0x0900, ..Default::default() }).await.expect_err("unknown").code(),
        Code::NotFound
    );
    let cleared = client.clear_caches(ClearCachesRequest { source_ids: vec![] }).await.expect("clear").into_inner();
    assert!(cleared.dropped_entries >= 1);
    let info = client.get_agent_info(GetAgentInfoRequest {}).await.expect("info").into_inner();
    assert!(info.functions.iter().all(|f| f.atc_entries == 0));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_are_served() {
    let b = boot_agent().await;
    let channel =
        Channel::from_shared(format!("http://{}", b.agent.control)).expect("url").connect().await.expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "dmar.v1.AgentControl".into() })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let mut client = b.client().await;
    let run = client.start_workload(request(150)).await.expect("start").into_inner().run_id;
    watch(&mut client, run).await;
    // Counters reach the registry on the functions' 100 ms tick.
    eventually("the metrics carry the run", || async {
        http_get(b.agent.metrics, "/metrics").await.contains("dmar_agent_atc_lookups_total{result=\"hit\"}")
    })
    .await;
    let body = http_get(b.agent.metrics, "/metrics").await;
    for name in dmar_agent::metrics::METRIC_NAMES {
        assert!(body.contains(name), "{name} missing from /metrics");
    }
    assert!(body.contains("dmar_agent_translation_duration_seconds_bucket"), "explicit buckets");
    assert!(!body.contains("00:06"), "no per-device labels");
    assert!(http_get(b.agent.metrics, "/nothing").await.starts_with("HTTP/1.1 404"));

    // Without its link the agent cannot run workloads: NOT_SERVING until it is back.
    let mut b = b;
    if let Some(server) = b.server.take() {
        server.stop().await;
    }
    eventually("health follows the link", || {
        let mut health = health.clone();
        async move {
            let r = health.check(tonic_health::pb::HealthCheckRequest { service: "dmar.v1.AgentControl".into() }).await;
            r.expect("health").into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
        }
    })
    .await;
    b.stop().await;
}
