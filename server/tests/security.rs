//! The server behind mutual TLS on 127.0.0.1:0, with real certificates from a development
//! CA written to a temporary directory: who may connect, which roles may call what,
//! requester-id ownership and its release, link and domain quotas, health and reflection,
//! and a capture of the bytes on the wire.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use dmar_auth::{AgentSpec, CertKind, DevPki, DevPkiSpec, Identity, Policy, TlsFiles, TlsMaterial};
use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::*;
use dmar_server::service::{Security, ServerConfig};
use dmar_test_support::{Boot, Link, function};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// 00:01.0, 00:01.1, 00:02.0, 00:02.1 and 00:03.0 as wire requester ids.
const SID_01_0: u32 = 1 << 3;
const SID_01_1: u32 = (1 << 3) | 1;
const SID_02_0: u32 = 2 << 3;
const SID_02_1: u32 = (2 << 3) | 1;
const SID_03_0: u32 = 3 << 3;

/// A server with a health port, and the PKI whose files it loaded.
struct Server {
    addr: SocketAddr,
    health: SocketAddr,
    pki: DevPki,
    running: dmar_test_support::Server,
    _dir: tempfile::TempDir,
}

/// agent-0 may bind 00:01.0-00:01.7; agent-1 00:01.0-00:02.7 with one link at a time;
/// operator-2 may hold one domain.
fn pki() -> Result<DevPki> {
    let spec = DevPkiSpec {
        agents: vec!["agent-0=00:01.0-00:01.7".parse::<AgentSpec>()?, "agent-1=00:01.0-00:02.7".parse()?],
        operators: vec![Identity::new("operator")?, Identity::new("operator-2")?],
        ..DevPkiSpec::default()
    };
    let mut pki = DevPki::generate(&spec)?;
    let entries = pki.policy.iter().map(|(id, grant)| {
        let mut grant = grant.clone();
        match id.as_str() {
            "agent-1" => grant.quotas.max_links = 1,
            "operator-2" => grant.quotas.max_domains = 1,
            _ => {}
        }
        (id.clone(), grant)
    });
    pki.policy = Policy::new(entries.collect::<Vec<_>>())?;
    Ok(pki)
}

async fn boot_with(security: impl FnOnce(&std::path::Path) -> Result<Security>) -> Result<Server> {
    dmar_auth::tls::install_default_crypto_provider();
    let pki = pki()?;
    let dir = tempfile::tempdir()?;
    pki.write_to(dir.path(), false)?;
    let security = security(dir.path())?;
    let config = ServerConfig { memory_size: 1 << 30, security, ..ServerConfig::default() };
    let running = Boot::new(config).with_health().start().await;
    Ok(Server { addr: running.addr, health: running.health_addr(), pki, running, _dir: dir })
}

/// The server as `dmar-server --tls-dir DIR` runs it: files from the directory.
async fn boot() -> Result<Server> {
    boot_with(|dir| {
        let material = TlsFiles::from_dir(dir, "dmar-server").load()?;
        Ok(Security::mutual_tls(material, Policy::load(dir.join("policy.toml"))?))
    })
    .await
}

impl Server {
    async fn channel_at(&self, addr: SocketAddr, name: &str) -> Result<Channel> {
        let material = self.pki.tls_material(name)?;
        Ok(endpoint(addr, material.tonic_client_config("localhost"))?.connect().await?)
    }

    async fn channel(&self, name: &str) -> Result<Channel> {
        self.channel_at(self.addr, name).await
    }

    async fn control(&self, name: &str) -> Result<ControlClient<Channel>> {
        Ok(ControlClient::new(self.channel(name).await?))
    }

    /// A TLS client that trusts the CA but presents no certificate.
    async fn anonymous(&self) -> Result<Channel> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.pki.ca_cert_pem))
            .domain_name("localhost");
        Ok(endpoint(self.addr, tls)?.connect().await?)
    }

    async fn stop(self) {
        self.running.stop().await;
    }
}

fn endpoint(addr: SocketAddr, tls: ClientTlsConfig) -> Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?.connect_timeout(Duration::from_secs(5)))
}

/// A link over `channel` binding `sids` as `agent` (no PRI, an invalidate queue depth of 4).
async fn open_link(channel: Channel, agent: &str, sids: &[u32]) -> Result<Link, tonic::Status> {
    let functions =
        sids.iter().map(|s| Function { invalidate_queue_depth: 4, page_request_capacity: 0, ..function(*s) }).collect();
    Link::open_on(channel, agent, functions).await
}

async fn health_check(channel: Channel) -> Result<(), tonic::Status> {
    HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.map(|_| ())
}

fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, contains: &str) {
    let status = r.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(contains), "{:?} does not mention {contains:?}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_certificate_only_health_answers() -> Result<()> {
    let server = boot().await?;
    let anonymous = server.anonymous().await?;
    health_check(anonymous.clone()).await?;
    let stats = ControlClient::new(anonymous.clone()).get_stats(GetStatsRequest {}).await;
    assert_code(stats, Code::Unauthenticated, "a client certificate is required");
    let link = open_link(anonymous.clone(), "nobody", &[SID_01_0]).await;
    assert_code(link, Code::Unauthenticated, "certificate");
    let refl = tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(anonymous)
        .server_reflection_info(tokio_stream::iter([list_services_v1alpha()]))
        .await;
    assert_code(refl, Code::Unauthenticated, "certificate");

    // The plaintext health port answers probes, and nothing else.
    let probe = Endpoint::from_shared(format!("http://{}", server.health))?.connect().await?;
    health_check(probe.clone()).await?;
    assert_code(ControlClient::new(probe).get_stats(GetStatsRequest {}).await, Code::Unimplemented, "");
    server.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_foreign_ca_clients_do_not_get_through() -> Result<()> {
    let server = boot().await?;
    // Plaintext HTTP/2 to the TLS port: the handshake never completes.
    let plain = async {
        let ch = Endpoint::from_shared(format!("http://{}", server.addr))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect()
            .await?;
        ControlClient::new(ch).get_stats(GetStatsRequest {}).await?;
        anyhow::Ok(())
    };
    assert!(plain.await.is_err(), "a plaintext client got an answer from the TLS port");

    // A certificate from another CA, even with a name the policy knows.
    let other = DevPki::generate(&DevPkiSpec::default())?;
    let stranger = other.cert("operator").context("issued")?;
    let stranger = TlsMaterial::from_pem(
        server.pki.ca_cert_pem.as_bytes(),
        stranger.cert_pem.as_bytes(),
        stranger.key_pem.as_bytes(),
    )?;
    let foreign = async {
        let ch = endpoint(server.addr, stranger.tonic_client_config("localhost"))?.connect().await?;
        ControlClient::new(ch).get_stats(GetStatsRequest {}).await?;
        anyhow::Ok(())
    };
    assert!(foreign.await.is_err(), "a client of another CA got an answer");

    // The right CA, but an identity the policy does not name.
    let unlisted = server.pki.issue(&Identity::new("mallory")?, CertKind::Client, &[])?;
    let unlisted = TlsMaterial::from_pem(
        server.pki.ca_cert_pem.as_bytes(),
        unlisted.cert_pem.as_bytes(),
        unlisted.key_pem.as_bytes(),
    )?;
    let ch = endpoint(server.addr, unlisted.tonic_client_config("localhost"))?.connect().await?;
    let stats = ControlClient::new(ch).get_stats(GetStatsRequest {}).await;
    assert_code(stats, Code::PermissionDenied, "mallory is not in the server's policy");
    server.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_what_each_identity_may_call() -> Result<()> {
    let server = boot().await?;
    // An observer reads stats but cannot change state.
    let mut observer = server.control("observer").await?;
    observer.get_stats(GetStatsRequest {}).await?;
    let map = observer.map(MapRequest { domain_id: 1, ranges: vec![] }).await;
    assert_code(map, Code::PermissionDenied, "the operator role is required; observer holds observer");
    assert_code(
        open_link(server.channel("observer").await?, "observer", &[SID_01_0]).await,
        Code::PermissionDenied,
        "the device role is required",
    );

    // A device identity gets nothing from Control.
    let mut device = server.control("agent-0").await?;
    let read = device.read_memory(ReadMemoryRequest { address: 0, length: 16 }).await;
    assert_code(read, Code::PermissionDenied, "the operator role is required; agent-0 holds device");
    assert_code(device.get_stats(GetStatsRequest {}).await, Code::PermissionDenied, "observer role");

    // A device binds inside its ranges only, and the refusal names the first id outside.
    let link = open_link(server.channel("agent-0").await?, "agent-0", &[SID_01_0, SID_02_0, SID_03_0]).await;
    assert_code(link, Code::PermissionDenied, "agent-0 may not bind requester id 00:02.0");
    let _link = open_link(server.channel("agent-0").await?, "agent-0", &[SID_01_0]).await?;

    // An operator may do everything, and an operator cannot bind requester ids.
    let mut operator = server.control("operator").await?;
    operator.get_stats(GetStatsRequest {}).await?;
    operator.read_memory(ReadMemoryRequest { address: 0, length: 16 }).await?;
    assert_code(
        open_link(server.channel("operator").await?, "op", &[SID_01_1]).await,
        Code::PermissionDenied,
        "device role",
    );

    // Reflection, both versions, answers any identity the policy names.
    let ch = server.channel("agent-0").await?;
    let mut alpha = tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(ch.clone())
        .server_reflection_info(tokio_stream::iter([list_services_v1alpha()]))
        .await?
        .into_inner();
    let answer = alpha.message().await?.context("a v1alpha answer")?;
    assert!(format!("{answer:?}").contains("dmar.v1.Control"), "{answer:?}");
    let mut v1 = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter([tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        }]))
        .await?
        .into_inner();
    assert!(v1.message().await?.is_some());
    server.stop().await;
    Ok(())
}

fn list_services_v1alpha() -> tonic_reflection::pb::v1alpha::ServerReflectionRequest {
    tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requester_ids_stay_with_their_owner_until_an_operator_releases_them() -> Result<()> {
    let server = boot().await?;
    let mut operator = server.control("operator").await?;
    let link = open_link(server.channel("agent-0").await?, "agent-0", &[SID_01_0]).await?;
    // Another identity whose ranges include the id cannot take it while it is bound...
    assert_code(
        open_link(server.channel("agent-1").await?, "agent-1", &[SID_01_0]).await,
        Code::PermissionDenied,
        "requester id 00:01.0 belongs to agent-0; an operator can release it",
    );
    // ...nor can an operator release it from a live link.
    let release = ReleaseRequesterIdsRequest { source_ids: vec![SID_01_0], all: false };
    assert_code(operator.release_requester_ids(release.clone()).await, Code::FailedPrecondition, "live link");

    // The link drops; the id is still agent-0's.
    drop(link);
    assert_code(
        open_link(server.channel("agent-1").await?, "agent-1", &[SID_01_0]).await,
        Code::PermissionDenied,
        "belongs to agent-0",
    );
    // Releasing is an operator's call, not a device's.
    let by_device = server.control("agent-1").await?.release_requester_ids(release.clone()).await;
    assert_code(by_device, Code::PermissionDenied, "operator role");
    let released = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match operator.release_requester_ids(release.clone()).await {
                Ok(r) => return r.into_inner().released,
                // The link's end is noticed asynchronously.
                Err(s) if s.code() == Code::FailedPrecondition => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(s) => panic!("release: {s:?}"),
            }
        }
    })
    .await?;
    assert_eq!(released, 1);
    let _taken = open_link(server.channel("agent-1").await?, "agent-1", &[SID_01_0]).await?;
    server.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_and_domains_are_bounded_per_identity() -> Result<()> {
    let server = boot().await?;
    // agent-1 may hold one link; a second is refused, and allowed once the first ends.
    let first = open_link(server.channel("agent-1").await?, "agent-1", &[SID_02_0]).await?;
    assert_code(
        open_link(server.channel("agent-1").await?, "agent-1", &[SID_02_1]).await,
        Code::ResourceExhausted,
        "agent-1 reached its max_links quota of 1",
    );
    // Another identity is not affected.
    let _other = open_link(server.channel("agent-0").await?, "agent-0", &[SID_01_0]).await?;
    drop(first);
    tokio::time::timeout(Duration::from_secs(5), async {
        while open_link(server.channel("agent-1").await.expect("channel"), "agent-1", &[SID_02_1]).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await?;

    // operator-2 may hold one domain; at its quota, operator still creates domains.
    let paging = || CreateDomainRequest { kind: DomainKind::Paging as i32, address_width: 48 };
    let mut op2 = server.control("operator-2").await?;
    let mut op = server.control("operator").await?;
    let did = op2.create_domain(paging()).await?.into_inner().domain_id;
    assert_code(
        op2.create_domain(paging()).await,
        Code::ResourceExhausted,
        "operator-2 reached its max_domains quota of 1",
    );
    let theirs = op.create_domain(paging()).await?.into_inner().domain_id;
    // A domain belongs to the identity that created it.
    assert_code(
        op.destroy_domain(DestroyDomainRequest { domain_id: did }).await,
        Code::PermissionDenied,
        "belongs to operator-2",
    );
    op2.destroy_domain(DestroyDomainRequest { domain_id: did }).await?;
    op2.create_domain(paging()).await?;
    op.destroy_domain(DestroyDomainRequest { domain_id: theirs }).await?;
    server.stop().await;
    Ok(())
}

/// A TCP relay recording every byte in both directions.
async fn relay(to: SocketAddr) -> Result<(SocketAddr, Arc<Mutex<Vec<u8>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(to).await else { return };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, record.clone()));
            tokio::spawn(pump(sr, cw, record.clone()));
        }
    });
    Ok((addr, seen))
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    seen: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        seen.lock().await.extend_from_slice(&buf[..n]);
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

fn pattern() -> Vec<u8> {
    b"dmar-capture-pattern-".iter().copied().cycle().take(4096).collect()
}

/// Writes the pattern to host memory and reads it back through `control`.
async fn write_and_read_back(control: &mut ControlClient<Channel>) -> Result<()> {
    let data = pattern();
    control.write_memory(WriteMemoryRequest { address: 0x10_0000, data: data.clone(), ..Default::default() }).await?;
    let back = control.read_memory(ReadMemoryRequest { address: 0x10_0000, length: 4096 }).await?.into_inner().data;
    assert_eq!(back, data);
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_of_the_tls_port_does_not_show_memory_contents() -> Result<()> {
    let server = boot().await?;
    let (via, seen) = relay(server.addr).await?;
    let mut control = ControlClient::new(server.channel_at(via, "operator").await?);
    write_and_read_back(&mut control).await?;
    let seen = seen.lock().await;
    assert!(seen.len() > 2 * 4096, "the relay recorded {} bytes", seen.len());
    // Not the page, and not even a 32-byte piece of it, in either direction.
    assert!(!contains(&seen, &pattern()[..32]), "the pattern crossed the wire in clear");
    drop(seen);
    server.stop().await;

    // The same relay in front of a plaintext server does see it: the relay records.
    let server = boot_with(|_| Ok(Security::plaintext())).await?;
    let (via, seen) = relay(server.addr).await?;
    let mut control = ControlClient::connect(format!("http://{via}")).await?;
    write_and_read_back(&mut control).await?;
    let seen = seen.lock().await;
    assert!(contains(&seen, &pattern()), "the relay did not record the plaintext pattern");
    drop(seen);
    server.stop().await;
    Ok(())
}

/// Finding 8: silent connections were never timed out. A peer that connects and sends
/// nothing is closed once the handshake time-out passes, on the TLS port and on the
/// plaintext health port alike, while a client that does its handshake is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_close_after_the_handshake_timeout() -> Result<()> {
    let timeout = Duration::from_millis(300);
    let server = boot_with(|dir| {
        let material = TlsFiles::from_dir(dir, "dmar-server").load()?;
        let mut security = Security::mutual_tls(material, Policy::load(dir.join("policy.toml"))?);
        security.accept.handshake_timeout = timeout;
        Ok(security)
    })
    .await?;
    for addr in [server.addr, server.health] {
        let mut silent = TcpStream::connect(addr).await?;
        let mut buf = [0u8; 64];
        // The bound is generous; what matters is that the server, not the test, ends it.
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match silent.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a silent connection to {addr} stayed open past the handshake time-out");
    }
    let mut c = server.control("operator").await?;
    c.get_stats(GetStatsRequest {}).await.context("a real client is served")?;
    server.stop().await;
    Ok(())
}
