//! The agent's control port and trace files under attack, with `dmar_agent::run` serving
//! real sockets on loopback.
//!
//! The control port under mutual TLS is tested on its own, with certificates from a
//! `DevPki` written to a temp dir and the agent pointed at a server URL nobody listens on
//! (the server's TLS is built elsewhere): it must serve anyway, admit the trusted
//! identity, refuse an untrusted one, a client without a certificate, one from another
//! CA and a plaintext one, and still answer health probes without a certificate. The
//! link's TLS is tested against a stub ATS link server that demands a client certificate.
//! Trace files are tested against a real plaintext server: only files inside the trace
//! directory, bounded, with errors that never echo a file's content.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dmar_agent::{AgentConfig, AgentSecurity, AgentTls, FunctionConfig, Identity, Listeners};
use dmar_auth::accept::{AcceptConfig, PeerInfo};
use dmar_auth::{ClientAuth, DevPki, DevPkiSpec, TlsMaterial};
use dmar_e2e::*;
use dmar_proto::v1::agent_control_client::AgentControlClient;
use dmar_proto::v1::ats_link_server::{AtsLink, AtsLinkServer};
use dmar_proto::v1::*;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

/// A refusal counter's value on the agent's `/metrics` (the registry is process-wide: other
/// tests add to it too, so compare with at least).
async fn refusals(agent: &RunningAgent, reason: &str) -> u64 {
    let body = http_get(agent.metrics, "/metrics").await;
    let series = format!("dmar_agent_control_refusals_total{{reason=\"{reason}\"}} ");
    sample(&body, &series).unwrap_or(0)
}

/// A loopback address nothing listens on.
async fn closed_port() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

/// A TLS channel to the agent's control port, trusting `ca` and presenting `client`'s
/// certificate if any; the agent's certificate names `localhost`.
async fn tls_channel(port: u16, ca: &str, client: Option<&TlsMaterial>) -> Result<Channel, tonic::transport::Error> {
    let tls = match client {
        Some(m) => m.tonic_client_config("localhost"),
        None => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost"),
    };
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// What `GetAgentInfo` gets over a channel: the status code, and the agent's name when OK.
async fn info(channel: Result<Channel, tonic::transport::Error>) -> (Code, Option<String>) {
    let Ok(channel) = channel else {
        return (Code::Unavailable, None);
    };
    match AgentControlClient::new(channel).get_agent_info(GetAgentInfoRequest {}).await {
        Ok(r) => (Code::Ok, Some(r.into_inner().agent)),
        Err(s) => (s.code(), None),
    }
}

async fn reflection(channel: Channel) -> Result<(), tonic::Status> {
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream =
        ServerReflectionClient::new(channel).server_reflection_info(tokio_stream::iter([list])).await?.into_inner();
    stream.message().await?.ok_or_else(|| tonic::Status::internal("no answer"))?;
    Ok(())
}

fn pki() -> DevPki {
    DevPki::generate(&DevPkiSpec::default()).expect("dev pki")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_control_port_serves_trusted_identities_only() {
    dmar_auth::tls::install_default_crypto_provider();
    let pki = pki();
    let dir = tempfile::tempdir().expect("temp dir");
    pki.write_to(dir.path(), false).expect("write the certificates");
    let tls = AgentTls::from_dir(dir.path(), "agent-0", "dmar-server").expect("agent tls");
    // A name that would forge log lines and fill them: cut before it is logged or reported.
    let forged = format!("agent-0\nINFO operator logged in{}", "x".repeat(3 << 20));
    let config = AgentConfig {
        name: forged.clone(),
        security: AgentSecurity::mutual_tls(tls),
        reconnect_initial: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(200),
        ..AgentConfig::new(format!("https://{}", closed_port().await), vec![FunctionConfig::new(sid("00:07.0"))])
    };
    let agent = RunningAgent::start(config).await;
    let port = agent.control.port();
    let ca = pki.ca_cert_pem.as_str();

    // The trusted identity gets in, though the link to the server is down.
    let operator = pki.tls_material("operator").expect("operator");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let name = loop {
        match info(tls_channel(port, ca, Some(&operator)).await).await {
            (Code::Ok, Some(name)) => break name,
            other => assert!(tokio::time::Instant::now() < deadline, "the operator never got in: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(name, dmar_agent::printable_name(&forged));
    assert!(name.starts_with("agent-0\\nINFO") && name.len() <= dmar_agent::MAX_NAME_CHARS, "{name}");
    let operator_channel = tls_channel(port, ca, Some(&operator)).await.expect("operator channel");
    reflection(operator_channel.clone()).await.expect("reflection for the operator");

    // A verified identity the agent does not trust: PERMISSION_DENIED, on every call.
    let before_untrusted = refusals(&agent, "untrusted_identity").await;
    let observer = pki.tls_material("observer").expect("observer");
    assert_eq!(info(tls_channel(port, ca, Some(&observer)).await).await, (Code::PermissionDenied, None));
    let mallory = pki.issue(&Identity::new("mallory").expect("name"), dmar_auth::CertKind::Client, &[]).expect("issue");
    let mallory =
        TlsMaterial::from_pem(ca.as_bytes(), mallory.cert_pem.as_bytes(), mallory.key_pem.as_bytes()).expect("mallory");
    let mut client = AgentControlClient::new(tls_channel(port, ca, Some(&mallory)).await.expect("channel"));
    let access = client.access(AccessRequest { source_id: 0x0038, iova: 0x1000, ..Default::default() }).await;
    assert_eq!(access.expect_err("DMA as the device").code(), Code::PermissionDenied);
    let start = client.start_workload(StartWorkloadRequest { duration_ms: 100, ..Default::default() }).await;
    assert_eq!(start.expect_err("a workload").code(), Code::PermissionDenied);
    // An agent's own certificate is from the same CA, but it is no operator either.
    let agent_cert = pki.tls_material("agent-0").expect("agent-0");
    assert_eq!(info(tls_channel(port, ca, Some(&agent_cert)).await).await.0, Code::PermissionDenied);

    // No certificate: UNAUTHENTICATED, but health answers, and reflection is closed.
    let before_anonymous = refusals(&agent, "no_certificate").await;
    let anonymous = tls_channel(port, ca, None).await.expect("a probe completes the handshake");
    assert_eq!(info(Ok(anonymous.clone())).await, (Code::Unauthenticated, None));
    let mut health = HealthClient::new(anonymous.clone());
    let overall = health.check(HealthCheckRequest { service: String::new() }).await.expect("health").into_inner();
    assert_eq!(overall.status, ServingStatus::Serving as i32);
    let control = health.check(HealthCheckRequest { service: "dmar.v1.AgentControl".into() }).await.expect("health");
    assert_eq!(control.into_inner().status, ServingStatus::NotServing as i32, "no link, no workloads");
    assert_eq!(
        reflection(anonymous).await.expect_err("reflection without a certificate").code(),
        Code::Unauthenticated
    );
    assert_eq!(
        reflection(tls_channel(port, ca, Some(&observer)).await.expect("channel")).await.map_err(|s| s.code()),
        Err(Code::PermissionDenied)
    );

    // A certificate from another CA (the client trusts the right one): the handshake fails.
    let other = pki_other_ca_operator(ca);
    let (code, name) = info(tls_channel(port, ca, Some(&other)).await).await;
    assert!(name.is_none() && !matches!(code, Code::Ok | Code::PermissionDenied | Code::Unauthenticated), "{code:?}");
    let mut other_health = match tls_channel(port, ca, Some(&other)).await {
        Ok(ch) => Some(HealthClient::new(ch)),
        Err(_) => None,
    };
    if let Some(h) = other_health.as_mut() {
        assert!(
            h.check(HealthCheckRequest { service: String::new() }).await.is_err(),
            "another CA's client got through"
        );
    }

    // Plaintext: no TLS, no answer.
    let plain =
        Endpoint::from_shared(format!("http://127.0.0.1:{port}")).expect("url").connect_timeout(Duration::from_secs(5));
    let (code, name) = info(plain.connect().await).await;
    assert!(name.is_none() && code != Code::Ok, "{code:?}");
    if let Ok(ch) = plain.connect().await {
        assert!(HealthClient::new(ch).check(HealthCheckRequest { service: String::new() }).await.is_err());
    }

    // The trusted identity still gets in, and every refusal was counted.
    assert_eq!(info(Ok(operator_channel)).await.0, Code::Ok);
    assert!(refusals(&agent, "untrusted_identity").await >= before_untrusted + 5);
    assert!(refusals(&agent, "no_certificate").await >= before_anonymous + 2);

    // With TLS the agent refuses trace files it has no directory for.
    let mut operator_client = AgentControlClient::new(tls_channel(port, ca, Some(&operator)).await.expect("channel"));
    let refused = operator_client.start_workload(trace_request("any.trace")).await.expect_err("no trace dir");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("--trace-dir"), "{}", refused.message());
    agent.stop().await;
}

/// An operator certificate from another CA, presented by a client that trusts `ca`.
fn pki_other_ca_operator(ca: &str) -> TlsMaterial {
    let other = pki();
    let stranger = other.cert("operator").expect("issued");
    TlsMaterial::from_pem(ca.as_bytes(), stranger.cert_pem.as_bytes(), stranger.key_pem.as_bytes()).expect("material")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_beyond_loopback_is_refused_unless_insecure() {
    let functions = || vec![FunctionConfig::new(sid("00:07.1"))];
    let far = AgentConfig::new("http://192.0.2.1:50051", functions());
    let err =
        dmar_agent::run(far.clone(), Listeners::default(), CancellationToken::new()).await.expect_err("plaintext");
    assert!(matches!(err, dmar_agent::AgentError::Plaintext(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "refusing plaintext to 192.0.2.1:50051: give --tls-dir DIR (docs/SECURITY.md) or --insecure"
    );
    assert!(dmar_agent::Agent::start(far.clone(), CancellationToken::new()).is_err());

    // A control port beyond loopback is refused too, even with the server on loopback.
    let open = tokio::net::TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let near = AgentConfig::new(format!("http://{}", closed_port().await), functions());
    let listeners = Listeners { control: Some(open), metrics: None };
    let err = dmar_agent::run(near, listeners, CancellationToken::new()).await.expect_err("plaintext control port");
    assert!(err.to_string().starts_with("refusing plaintext on the control port"), "{err}");

    // Insecure says so explicitly.
    let insecure = AgentConfig { security: AgentSecurity { insecure: true, ..AgentSecurity::default() }, ..far };
    let shutdown = CancellationToken::new();
    let agent = dmar_agent::Agent::start(insecure, shutdown.clone()).expect("insecure starts");
    stop_agent(agent, shutdown).await;
}

fn trace_request(path: &str) -> StartWorkloadRequest {
    StartWorkloadRequest {
        duration_ms: 100,
        concurrency: 1,
        stream: Some(AddressStream {
            pattern: AddressPattern::Trace as i32,
            trace_path: path.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

const TRACE_BASE: u64 = 0x100_0000;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
}

/// A trace directory with a good trace, a bad one, a big one and links out, beside a
/// directory of secrets.
fn trace_tree(root: &Path) -> PathBuf {
    let traces = root.join("traces");
    let secrets = root.join("secrets");
    std::fs::create_dir_all(&traces).expect("mkdir");
    std::fs::create_dir_all(&secrets).expect("mkdir");
    write(&secrets.join("passwd"), "root:x:0:0:root:/root:/bin/bash\n");
    write(&traces.join("good.trace"), &format!("# two\n{TRACE_BASE:#x} w\n{:#x} r\n", TRACE_BASE + 0x1000));
    write(&traces.join("bad.trace"), &format!("{TRACE_BASE:#x} r\nAWS_SECRET_ACCESS_KEY=hunter2 w\n"));
    write(&traces.join("big.trace"), &format!("{TRACE_BASE:#x} r\n").repeat(1000));
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(secrets.join("passwd"), traces.join("passwd")).expect("link");
        std::os::unix::fs::symlink("/dev/zero", traces.join("zero")).expect("link");
        std::os::unix::fs::symlink("/proc/self/environ", traces.join("environ")).expect("link");
    }
    traces
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_files_stay_inside_the_trace_dir_and_never_echo_content() {
    let server = boot(Duration::from_secs(30)).await;
    let functions = vec![sid("00:08.0")];
    let mut c = server.control().await;
    let did = paging_domain(&mut c, &functions).await;
    map(&mut c, did, TRACE_BASE, 0x20_0000, 1 << 20, true).await;
    let tmp = tempfile::tempdir().expect("temp dir");
    let traces = trace_tree(tmp.path());
    let config = AgentConfig {
        trace_dir: Some(traces.clone()),
        max_trace_bytes: 4096,
        ..agent_config(&server, functions.iter().map(|s| FunctionConfig::new(*s)).collect())
    };
    let agent = RunningAgent::start(config).await;
    agent.connected().await;
    let mut client = agent.client().await;
    let before_path = refusals(&agent, "trace_path").await;
    let before_size = refusals(&agent, "trace_size").await;

    let secrets = tmp.path().join("secrets").join("passwd");
    let mut refused = vec![
        "/etc/passwd".to_owned(),
        "/proc/self/environ".to_owned(),
        secrets.to_str().expect("utf-8 temp path").to_owned(),
        "../secrets/passwd".to_owned(),
        "./../secrets/passwd".to_owned(),
    ];
    if cfg!(unix) {
        refused.extend(["passwd", "zero", "environ"].map(str::to_owned));
    }
    for path in &refused {
        let e = client.start_workload(trace_request(path)).await.expect_err(path);
        assert_eq!(e.code(), Code::InvalidArgument, "{path}: {}", e.message());
        assert!(!e.message().contains("root") && !e.message().contains("bash"), "{path}: {}", e.message());
    }

    let big = client.start_workload(trace_request("big.trace")).await.expect_err("oversize");
    assert_eq!(big.code(), Code::InvalidArgument);
    assert!(big.message().contains("larger than 4096 bytes"), "{}", big.message());

    let bad = client.start_workload(trace_request("bad.trace")).await.expect_err("malformed");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("line 2"), "{}", bad.message());
    assert!(!bad.message().contains("SECRET") && !bad.message().contains("hunter2"), "{}", bad.message());

    let missing = client.start_workload(trace_request("missing.trace")).await.expect_err("missing");
    assert_eq!(missing.code(), Code::InvalidArgument);

    // A good trace inside the directory runs.
    let run = client.start_workload(trace_request("good.trace")).await.expect("a trace inside the dir").into_inner();
    let report = client.get_report(GetReportRequest { run_id: run.run_id, wait: true }).await.expect("report");
    assert!(report.into_inner().totals.expect("totals").accesses > 0);

    assert!(refusals(&agent, "trace_path").await >= before_path + refused.len() as u64);
    assert!(refusals(&agent, "trace_size").await > before_size);
    agent.stop().await;
    server.stop().await;
}

/// What the stub link server saw of each bind: the peer's verified identity and the
/// agent name it sent.
type Binds = Arc<Mutex<Vec<(String, String)>>>;

/// An ATS link server that answers the bind and then only drains the link, behind
/// `dmar_auth`'s acceptor requiring a client certificate: enough to see the agent's side
/// of a mutual-TLS link.
#[derive(Clone)]
struct StubLink {
    binds: Binds,
}

#[tonic::async_trait]
impl AtsLink for StubLink {
    type OpenStream = ReceiverStream<Result<LinkDown, Status>>;

    async fn open(&self, request: Request<Streaming<LinkUp>>) -> Result<Response<Self::OpenStream>, Status> {
        let identity = PeerInfo::of(&request)
            .and_then(PeerInfo::identity)
            .map(ToString::to_string)
            .ok_or_else(|| Status::unauthenticated("no certificate"))?;
        let mut inbound = request.into_inner();
        let bind = inbound.message().await?.and_then(|m| m.bind).ok_or_else(|| Status::invalid_argument("no bind"))?;
        self.binds.lock().expect("binds").push((identity, bind.agent.clone()));
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let bound = Bound { source_ids: bind.functions.iter().map(|f| f.source_id).collect() };
        tx.send(Ok(LinkDown { bound: Some(bound), ..Default::default() }))
            .await
            .map_err(|_| Status::internal("gone"))?;
        tokio::spawn(async move {
            while let Ok(Some(_)) = inbound.message().await {}
            drop(tx);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_is_mutual_tls_with_the_expected_server_name() {
    dmar_auth::tls::install_default_crypto_provider();
    let pki = pki();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server_tls = pki.tls_material("dmar-server").expect("server").rustls_server_config(ClientAuth::Required);
    let incoming = dmar_auth::incoming(listener, server_tls.expect("server config"), None, AcceptConfig::default());
    let binds = Binds::default();
    let stop = CancellationToken::new();
    let served = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AtsLinkServer::new(StubLink { binds: binds.clone() }))
            .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()),
    );

    let agent = |material: TlsMaterial, server_name: &str, name: &str| AgentConfig {
        name: name.to_owned(),
        security: AgentSecurity::mutual_tls(AgentTls::new(material, server_name).expect("tls")),
        reconnect_initial: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(50),
        connect_timeout: Duration::from_secs(2),
        // host:port gets https:// with TLS.
        ..AgentConfig::new(addr.to_string(), vec![FunctionConfig::new(sid("00:09.0"))])
    };

    // The right CA, the right server name: the link binds, and the server reads the
    // agent's identity from its certificate.
    let good = agent(pki.tls_material("agent-0").expect("agent"), "dmar-server", "tls-agent");
    assert_eq!(good.server_url(), format!("https://{addr}"));
    let (a, shutdown) = start_agent(good).await;
    assert_eq!(binds.lock().expect("binds").clone(), [("agent-0".to_owned(), "tls-agent".to_owned())]);
    stop_agent(a, shutdown).await;

    // A server name its certificate does not carry, or a server the agent's CA did not
    // sign: the agent never binds. A certificate the server's CA did not sign: the server
    // never lets it bind.
    let other = pki_other_ca_operator(&pki.ca_cert_pem);
    // The agent's own certificate, but trusting another CA than the server's.
    let other_ca = DevPki::generate(&DevPkiSpec::default()).expect("pki");
    let ours = pki.cert("agent-0").expect("agent");
    let foreign =
        TlsMaterial::from_pem(other_ca.ca_cert_pem.as_bytes(), ours.cert_pem.as_bytes(), ours.key_pem.as_bytes())
            .expect("foreign");
    for (what, config) in [
        ("a wrong server name", agent(pki.tls_material("agent-0").expect("agent"), "not-the-server", "wrong-name")),
        ("a client certificate from another ca", agent(other, "dmar-server", "stranger")),
        ("a server from another ca", agent(foreign, "dmar-server", "foreign")),
    ] {
        let shutdown = CancellationToken::new();
        let a = dmar_agent::Agent::start(config, shutdown.clone()).expect("start");
        let bound = tokio::time::timeout(Duration::from_millis(500), a.wait_for_link(|s| s.connected)).await;
        assert!(bound.is_err(), "{what}: the link bound");
        stop_agent(a, shutdown).await;
    }
    assert_eq!(binds.lock().expect("binds").len(), 1, "only the good agent ever bound");
    stop.cancel();
    served.await.expect("join").expect("serve");
}
