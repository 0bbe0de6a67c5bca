//! An agent as compose runs it: mutual TLS to a real server whose policy gives the agent's
//! identity the device role only, a TLS control port, and a plaintext health-only port for
//! the container probe (`dmar_agent::run_with_health`).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{PATIENCE, eventually, sid};
use dmar_agent::{AgentConfig, AgentSecurity, AgentTls, FunctionConfig, Listeners};
use dmar_auth::{DevPki, DevPkiSpec};
use dmar_proto::v1::agent_control_client::AgentControlClient;
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
        Stack { pki, control: control_addr, health: health_addr, server_stop, server, agent_stop, agent, _dir: dir }
    }

    /// The agent's control port as the operator (mutual TLS).
    async fn operator(&self) -> AgentControlClient<Channel> {
        let tls = self.pki.tls_material("operator").expect("operator").tonic_client_config("localhost");
        let endpoint = Endpoint::from_shared(format!("https://{}", self.control)).expect("url");
        AgentControlClient::new(endpoint.tls_config(tls).expect("tls").connect().await.expect("connect"))
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
