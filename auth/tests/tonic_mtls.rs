//! Real tonic servers on `127.0.0.1:0` behind both ways of serving TLS, with tonic clients:
//! the caller's identity reaches the service, and connection quotas hold.

use std::sync::Arc;

use anyhow::Result;
use dmar_auth::accept::{AcceptConfig, ConnectionLimiter, PeerInfo, incoming};
use dmar_auth::{ClientAuth, DevPki, DevPkiSpec, Identity, Policy, TlsMaterial};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::InterceptorLayer;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

type Seen = Arc<Mutex<Vec<String>>>;

/// An interceptor that records the caller and refuses callers without an identity, the way
/// a dmar service gate would.
fn gate(
    seen: Seen,
    read: fn(&Request<()>) -> Option<Identity>,
) -> InterceptorLayer<impl Clone + FnMut(Request<()>) -> Result<Request<()>, Status>> {
    InterceptorLayer::new(move |req: Request<()>| match read(&req) {
        Some(id) => {
            seen.lock().push(id.to_string());
            Ok(req)
        }
        None => Err(Status::unauthenticated("a client certificate is required")),
    })
}

async fn channel(port: u16, client: &TlsMaterial) -> Result<Channel> {
    Ok(Endpoint::from_shared(format!("https://127.0.0.1:{port}"))?
        .tls_config(client.tonic_client_config("localhost"))?
        .connect()
        .await?)
}

async fn check(channel: Channel) -> Result<(), Status> {
    HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.map(|_| ())
}

#[tokio::test]
async fn the_custom_acceptor_hands_each_request_its_peer() -> Result<()> {
    dmar_auth::tls::install_default_crypto_provider();
    let pki = DevPki::generate(&DevPkiSpec::default())?;
    let server = pki.tls_material("dmar-server")?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let mut policy = pki.policy.clone();
    // Only one connection for the observer, to see the limiter at work.
    let observer = Identity::new("observer")?;
    let mut entries: Vec<_> = policy.iter().map(|(i, g)| (i.clone(), g.clone())).collect();
    for (id, grant) in &mut entries {
        if *id == observer {
            grant.quotas.max_connections = 1;
        }
    }
    policy = Policy::new(entries)?;
    let limiter = ConnectionLimiter::new(Arc::new(policy), ConnectionLimiter::DEFAULT_UNLISTED_MAX);
    let accepted = incoming(
        listener,
        server.rustls_server_config(ClientAuth::Optional)?,
        Some(limiter.clone()),
        AcceptConfig::default(),
    );

    let seen: Seen = Arc::default();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let stop = CancellationToken::new();
    let serve = tokio::spawn(
        Server::builder()
            .layer(gate(seen.clone(), |req| PeerInfo::of(req).and_then(|p| p.identity().cloned())))
            .add_service(health)
            .serve_with_incoming_shutdown(accepted, stop.clone().cancelled_owned()),
    );

    // An operator and an agent: admitted, identified.
    check(channel(port, &pki.tls_material("operator")?).await?).await?;
    check(channel(port, &pki.tls_material("agent-0")?).await?).await?;
    assert_eq!(*seen.lock(), ["operator", "agent-0"]);

    // The observer's first connection is admitted; its second is closed by the limiter.
    let first = channel(port, &pki.tls_material("observer")?).await?;
    check(first.clone()).await?;
    assert_eq!(limiter.live(Some(&observer)), 1);
    let second = match channel(port, &pki.tls_material("observer")?).await {
        Ok(ch) => check(ch).await.is_ok(),
        Err(_) => false,
    };
    assert!(!second, "a second observer connection was admitted");
    check(first).await?;

    // A probe without a certificate completes the handshake, but the gate refuses its call.
    let anonymous = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&pki.ca_cert_pem))
        .domain_name("localhost");
    let probe = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))?.tls_config(anonymous)?.connect().await?;
    let status = check(probe).await.expect_err("a call without identity");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert_eq!(*seen.lock(), ["operator", "agent-0", "observer", "observer"]);

    stop.cancel();
    serve.await??;
    Ok(())
}

#[tokio::test]
async fn tonic_builtin_tls_gives_peer_certs_an_identity() -> Result<()> {
    dmar_auth::tls::install_default_crypto_provider();
    let pki = DevPki::generate(&DevPkiSpec::default())?;
    let server = pki.tls_material("dmar-server")?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();

    let seen: Seen = Arc::default();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let stop = CancellationToken::new();
    let serve = tokio::spawn(
        Server::builder()
            .tls_config(server.tonic_server_config(ClientAuth::Required))?
            .layer(gate(seen.clone(), |req| Identity::from_peer_certs(req.peer_certs()).ok()))
            .add_service(health)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.clone().cancelled_owned()),
    );

    check(channel(port, &pki.tls_material("observer")?).await?).await?;
    assert_eq!(*seen.lock(), ["observer"]);

    // A client from another CA does not get through.
    let other = DevPki::generate(&DevPkiSpec::default())?;
    let stranger = other.cert("operator").expect("issued");
    let stranger =
        TlsMaterial::from_pem(pki.ca_cert_pem.as_bytes(), stranger.cert_pem.as_bytes(), stranger.key_pem.as_bytes())?;
    let refused = match channel(port, &stranger).await {
        Ok(ch) => check(ch).await.is_err(),
        Err(_) => true,
    };
    assert!(refused);
    assert_eq!(*seen.lock(), ["observer"]);

    stop.cancel();
    serve.await??;
    Ok(())
}
