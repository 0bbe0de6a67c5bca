//! An agent as compose runs it: mutual TLS to a real server whose policy gives the agent's
//! identity the device role only, a TLS control port, and a plaintext health-only port for
//! the container probe (`dmar_agent::run_with_health`); and the baseline such an agent can
//! run (over its link, not through Control).

use std::net::SocketAddr;
use std::time::Duration;

use dmar_agent::{AgentConfig, AgentSecurity, AgentTls, FunctionConfig, Listeners};
use dmar_auth::{DevPki, DevPkiSpec};
use dmar_e2e::{PATIENCE, eventually, sid, tls_channel};
use dmar_proto::v1::agent_control_client::AgentControlClient;
use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::*;
use dmar_server::service::{Security, ServerConfig, serve};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A TLS server and one TLS agent (`agent-0`, device role, functions 00:01.0 and 00:01.1)
/// with its control, metrics and health ports on loopback.
struct Stack {
    pki: DevPki,
    server_addr: SocketAddr,
    control: SocketAddr,
    health: SocketAddr,
    server_stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    agent_stop: CancellationToken,
    agent: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start() -> Stack {
        dmar_auth::tls::install_default_crypto_provider();
        let pki = DevPki::generate(&DevPkiSpec::default()).expect("dev pki");
        let dir = tempfile::tempdir().expect("temp dir");
        pki.write_to(dir.path(), false).expect("write the certificates");

        let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server_addr = grpc.local_addr().expect("addr");
        let material = pki.tls_material("dmar-server").expect("server material");
        let config = ServerConfig {
            memory_size: 1 << 30,
            security: Security::mutual_tls(material, pki.policy.clone()),
            ..ServerConfig::default()
        };
        let server_stop = CancellationToken::new();
        let s = server_stop.clone();
        let listeners = dmar_server::service::Listeners { grpc, metrics: None };
        let server = tokio::spawn(async move { serve(config, listeners, s).await.expect("serve") });

        let tls = AgentTls::from_dir(dir.path(), "agent-0", "localhost").expect("agent tls");
        let functions = vec![FunctionConfig::new(sid("00:01.0")), FunctionConfig::new(sid("00:01.1"))];
        let config = AgentConfig {
            name: "agent-0".into(),
            security: AgentSecurity::mutual_tls(tls),
            reconnect_initial: Duration::from_millis(20),
            reconnect_max: Duration::from_millis(200),
            ..AgentConfig::new(format!("https://{server_addr}"), functions)
        };
        let control = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let health = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (control_addr, health_addr) = (control.local_addr().expect("addr"), health.local_addr().expect("addr"));
        let agent_stop = CancellationToken::new();
        let s = agent_stop.clone();
        let listeners = Listeners { control: Some(control), metrics: None };
        let agent = tokio::spawn(async move {
            dmar_agent::run_with_health(config, listeners, Some(health), s).await.expect("agent runs");
        });
        Stack {
            pki,
            server_addr,
            control: control_addr,
            health: health_addr,
            server_stop,
            server,
            agent_stop,
            agent,
            _dir: dir,
        }
    }

    /// The agent's control port as the operator (mutual TLS).
    async fn operator(&self) -> AgentControlClient<Channel> {
        AgentControlClient::new(tls_channel(self.control, &self.pki, "operator").await.expect("connect"))
    }

    /// The server's Control service as `name` (mutual TLS).
    async fn server_control(&self, name: &str) -> ControlClient<Channel> {
        ControlClient::new(tls_channel(self.server_addr, &self.pki, name).await.expect("connect"))
    }

    async fn stop(self) {
        self.agent_stop.cancel();
        tokio::time::timeout(PATIENCE, self.agent).await.expect("agent stops").expect("join");
        self.server_stop.cancel();
        tokio::time::timeout(PATIENCE, self.server).await.expect("server stops").expect("join");
    }
}

/// A plaintext HTTP/2 channel to `addr`.
async fn plaintext(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))?.connect_timeout(Duration::from_secs(5)).connect().await
}

/// The status of `service`, or the call's error code.
async fn status(health: &mut HealthClient<Channel>, service: &str) -> Result<i32, Code> {
    let answer = health.check(HealthCheckRequest { service: service.into() }).await.map_err(|s| s.code())?;
    Ok(answer.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_port_answers_in_plaintext_and_the_control_port_does_not() {
    let stack = Stack::start().await;
    let mut health = HealthClient::new(plaintext(stack.health).await.expect("the health port speaks plaintext"));
    assert_eq!(status(&mut health, "").await, Ok(ServingStatus::Serving as i32), "the process is up");
    // AgentControl turns SERVING once the link is bound under the device identity.
    eventually("AgentControl SERVING on the health port", || {
        let mut h = health.clone();
        async move { status(&mut h, "dmar.v1.AgentControl").await == Ok(ServingStatus::Serving as i32) }
    })
    .await;
    let info = stack.operator().await.get_agent_info(GetAgentInfoRequest {}).await.expect("info").into_inner();
    assert!(info.connected, "SERVING means the link is bound");

    // The health port serves health only: no agent control, no reflection.
    let over_health = AgentControlClient::new(plaintext(stack.health).await.expect("channel"))
        .get_agent_info(GetAgentInfoRequest {})
        .await;
    assert_eq!(over_health.expect_err("control over the health port").code(), Code::Unimplemented);

    // The control port still refuses plaintext: no TLS, no answer (health included).
    if let Ok(channel) = plaintext(stack.control).await {
        let refused = AgentControlClient::new(channel.clone()).get_agent_info(GetAgentInfoRequest {}).await;
        assert!(refused.is_err(), "plaintext got an answer from the control port");
        assert!(status(&mut HealthClient::new(channel), "").await.is_err(), "plaintext health on the control port");
    }

    // The server goes away: AgentControl is NOT_SERVING until the link is back.
    stack.server_stop.cancel();
    eventually("AgentControl NOT_SERVING without the server", || {
        let mut h = health.clone();
        async move { status(&mut h, "dmar.v1.AgentControl").await == Ok(ServingStatus::NotServing as i32) }
    })
    .await;
    assert_eq!(status(&mut health, "").await, Ok(ServingStatus::Serving as i32));
    stack.stop().await;
}

/// Footprint of the baseline workloads, mapped for both functions.
const BASE: u64 = 0x4000_0000;
const FOOTPRINT: u64 = 1 << 20;

/// Runs a 300 ms workload of `mode` on both functions (DMA included) and returns its
/// report.
async fn run_workload(agent: &mut AgentControlClient<Channel>, mode: WorkloadMode) -> WorkloadReport {
    let stream = AddressStream {
        pattern: AddressPattern::Uniform as i32,
        base: BASE,
        footprint: FOOTPRINT,
        ..Default::default()
    };
    let request = StartWorkloadRequest {
        mode: mode as i32,
        duration_ms: 300,
        concurrency: 4,
        stream: Some(stream),
        write_fraction: 0.3,
        dma_bytes: 64,
        seed: 7,
        ..Default::default()
    };
    let run_id = agent.start_workload(request).await.expect("workload starts").into_inner().run_id;
    let report = agent.get_report(GetReportRequest { run_id, wait: true });
    tokio::time::timeout(PATIENCE, report).await.expect("the run ends").expect("report").into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_identity_runs_the_link_baseline() {
    let stack = Stack::start().await;
    let mut agent = stack.operator().await;
    eventually("the agent's link bound", || {
        let mut a = agent.clone();
        async move { a.get_agent_info(GetAgentInfoRequest {}).await.is_ok_and(|i| i.into_inner().connected) }
    })
    .await;
    // The operator maps the footprint and attaches both functions with ATS.
    let mut control = stack.server_control("operator").await;
    let create = CreateDomainRequest { kind: DomainKind::Paging as i32, address_width: 48 };
    let domain_id = control.create_domain(create).await.expect("domain").into_inner().domain_id;
    let range = MapRange {
        iova: BASE,
        hpa: 0x100_0000,
        length: FOOTPRINT,
        permissions: Some(Permissions { read: true, write: true }),
    };
    control.map(MapRequest { domain_id, ranges: vec![range] }).await.expect("map");
    for name in ["00:01.0", "00:01.1"] {
        let source_id = u32::from(sid(name).0);
        control.attach(AttachRequest { source_id, domain_id, ats: true, ..Default::default() }).await.expect("attach");
    }
    let served_before = control.get_stats(GetStatsRequest {}).await.expect("stats").into_inner().link_translations;

    // The link baseline: every access is one translation request over the agent's own
    // link, under its device identity; nothing is cached, everything completes.
    let report = run_workload(&mut agent, WorkloadMode::LinkBaseline).await;
    assert_eq!(report.mode, WorkloadMode::LinkBaseline as i32);
    let c = report.totals.expect("totals");
    assert!(c.baseline_calls > 0, "{c:?}");
    assert_eq!(c.translations_requested, c.baseline_calls, "one request per access, no coalescing");
    assert_eq!((c.atc_hits, c.atc_misses, c.faults, c.aborted, c.dma_failed), (0, 0, 0, 0, 0), "{c:?}");
    assert!(c.dma_ok > 0, "translated DMA completed: {c:?}");
    assert!(report.functions.iter().all(|f| f.atc_entries == 0), "the device TLBs stay empty");
    assert!(report.miss_latency.as_ref().is_some_and(|m| m.count > 0), "every translation timed");
    let served = control.get_stats(GetStatsRequest {}).await.expect("stats").into_inner().link_translations;
    assert!(served - served_before >= c.baseline_calls, "the server served them over the link");

    // The unary baseline needs Control.Translate, which a device identity may not call:
    // its accesses end without a translation.
    let report = run_workload(&mut agent, WorkloadMode::Baseline).await;
    let c = report.totals.expect("totals");
    assert!(c.baseline_calls > 0 && c.aborted > 0 && c.dma_ok == 0, "{c:?}");
    stack.stop().await;
}
