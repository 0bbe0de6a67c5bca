//! An embedded dmar server and one agent in one process: maps a footprint, runs the same
//! workload through the device TLBs (ATS) and through the unary baseline, and prints both
//! reports. The shape the load generator follows.
//!
//! `cargo run --release -p dmar-loadgen --example one_agent -- [FUNCTIONS] [SECONDS] [CONCURRENCY] [FOOTPRINT_MIB]`

use std::time::Duration;

use dmar_agent::workload::LatencySummary;
use dmar_agent::{Agent, AgentConfig, FunctionConfig, Mode, SourceId, StreamSpec, WorkloadSpec};
use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::{AttachRequest, CreateDomainRequest, DomainKind, MapRange, MapRequest, Permissions};
use dmar_server::service::{Listeners, ServerConfig, serve};
use tokio_util::sync::CancellationToken;

const BASE: u64 = 0x1_0000_0000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let functions: u8 = args.next().map_or(Ok(2), |s| s.parse())?;
    let seconds: u64 = args.next().map_or(Ok(2), |s| s.parse())?;
    let concurrency: u32 = args.next().map_or(Ok(64), |s| s.parse())?;
    let footprint: u64 = args.next().map_or(Ok(4), |s| s.parse::<u64>())? << 20;

    let shutdown = CancellationToken::new();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = grpc.local_addr()?;
    let server = tokio::spawn(serve(
        ServerConfig { memory_size: 1 << 30, ..ServerConfig::default() },
        Listeners { grpc, metrics: None },
        shutdown.clone(),
    ));
    let mut control = ControlClient::connect(format!("http://{addr}")).await?;
    let sids: Vec<SourceId> = (0..functions).map(|i| SourceId::new(1, i, 0)).collect();
    let did = control
        .create_domain(CreateDomainRequest { kind: DomainKind::Paging as i32, address_width: 48 })
        .await?
        .into_inner()
        .domain_id;
    for sid in &sids {
        control
            .attach(AttachRequest { source_id: u32::from(sid.0), domain_id: did, ats: true, check_translated: false })
            .await?;
    }
    let rw = Some(Permissions { read: true, write: true });
    control
        .map(MapRequest {
            domain_id: did,
            ranges: vec![MapRange { iova: BASE, hpa: 0x100_1000, length: footprint, permissions: rw }],
        })
        .await?;

    let config = AgentConfig::new(format!("http://{addr}"), sids.iter().map(|s| FunctionConfig::new(*s)).collect());
    let agent = Agent::start(config, shutdown.child_token())?;
    agent.wait_for_link(|s| s.connected).await?;
    let streams: Vec<_> = sids.iter().map(|s| (*s, StreamSpec::uniform(BASE, footprint))).collect();
    for (mode, translate_only) in [(Mode::Ats, true), (Mode::Ats, false), (Mode::Baseline, true)] {
        let spec = WorkloadSpec {
            mode,
            translate_only,
            duration: Duration::from_secs(seconds),
            warmup: Duration::from_millis(200),
            concurrency,
            ..WorkloadSpec::new(streams.clone())
        };
        let run = agent.start_workload(spec).await?;
        let r = run.finished().await;
        let miss = LatencySummary::of(&r.miss_latency);
        let access = LatencySummary::of(&r.access_latency);
        println!(
            "{mode:?}{}: {:>12.0} accesses/s, hit ratio {:.4}, translations requested {}, coalesced {}, \
             access p50 {} ns p99 {} ns, miss p50 {} ns p99 {} ns",
            if translate_only { " translate-only" } else { " with DMA" },
            r.accesses_per_second(),
            r.totals.hit_ratio(),
            r.totals.translations_requested,
            r.totals.coalesced_misses,
            access.p50_ns,
            access.p99_ns,
            miss.p50_ns,
            miss.p99_ns,
        );
    }
    shutdown.cancel();
    agent.stopped().await;
    server.await??;
    Ok(())
}
