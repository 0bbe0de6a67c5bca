//! The connections the accept loops close unserved are counted by reason: past an
//! identity's `max_connections`, a failed or timed-out TLS handshake, a silent plaintext
//! peer. Counted in process ([`ConnectionRefusals::count`]) and on a `metrics` recorder
//! under `dmar_auth_connection_refusals_total{reason}`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use dmar_auth::rustls::pki_types::ServerName;
use dmar_auth::tokio_rustls::TlsConnector;
use dmar_auth::tokio_rustls::client::TlsStream;
use dmar_auth::{
    AcceptConfig, CONNECTION_REFUSALS, ClientAuth, ConnectionLimiter, ConnectionRefusal, ConnectionRefusals, DevPki,
    DevPkiSpec, Identity, Policy, incoming_with, plaintext_with,
};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;

/// A recorder that keeps its counters by rendered key (`name{k=v}`).
#[derive(Default)]
struct Counters(Mutex<HashMap<String, Arc<AtomicU64>>>);

impl Counters {
    fn get(&self, key: &str) -> u64 {
        let map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(key).map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

impl Recorder for Counters {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        let mut map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Counter::from_arc(map.entry(name).or_default().clone())
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Waits (at most 5 s) until `refusals` counted `n` refusals of kind `why`.
async fn counted(refusals: &ConnectionRefusals, why: ConnectionRefusal, n: u64) -> Result<()> {
    for _ in 0..500 {
        if refusals.count(why) >= n {
            assert_eq!(refusals.count(why), n, "{why:?}");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("{why:?}: {} refusals counted, {n} expected", refusals.count(why))
}

/// A TLS client connection as `name`.
async fn connect(addr: SocketAddr, pki: &DevPki, name: &str) -> Result<TlsStream<TcpStream>> {
    let connector = TlsConnector::from(pki.tls_material(name)?.rustls_client_config()?);
    let tcp = TcpStream::connect(addr).await?;
    Ok(connector.connect(ServerName::try_from("localhost")?, tcp).await?)
}

/// True once the server has closed `stream` (end of stream or an error, within 5 s; what
/// it sent before, a TLS alert, is skipped).
async fn closed<S: AsyncReadExt + Unpin>(stream: &mut S) -> bool {
    let mut buf = [0u8; 256];
    let until_closed = async {
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), until_closed).await.is_ok()
}

#[tokio::test]
async fn refused_connections_are_counted_by_reason() -> Result<()> {
    dmar_auth::tls::install_default_crypto_provider();
    let pki = DevPki::generate(&DevPkiSpec::default())?;
    let observer = Identity::new("observer")?;
    let entries = pki.policy.iter().map(|(id, grant)| {
        let mut grant = grant.clone();
        if *id == observer {
            grant.quotas.max_connections = 2;
        }
        (id.clone(), grant)
    });
    let limiter = ConnectionLimiter::new(Arc::new(Policy::new(entries.collect::<Vec<_>>())?), 4);
    let recorder = Counters::default();
    let refusals = ConnectionRefusals::on(&recorder);
    let config = AcceptConfig { handshake_timeout: Duration::from_millis(300), max_handshakes: 8 };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let tls = pki.tls_material("dmar-server")?.rustls_server_config(ClientAuth::Optional)?;
    let mut accepted = incoming_with(listener, tls, Some(limiter.clone()), config, refusals.clone());

    // Two observer connections are admitted and held; a third is closed after its
    // handshake, and a fourth and fifth too: each counted.
    let mut held = Vec::new();
    for _ in 0..2 {
        let client = connect(addr, &pki, "observer").await?;
        let server_side = tokio::time::timeout(Duration::from_secs(5), accepted.next()).await?;
        held.push((client, server_side));
    }
    for n in 1..=3 {
        let mut refused = connect(addr, &pki, "observer").await?;
        assert!(closed(&mut refused).await, "connection {n} over the quota stays open");
        counted(&refusals, ConnectionRefusal::MaxConnections, n).await?;
    }
    assert_eq!(limiter.live(Some(&observer)), 2);
    // Another identity has its own room.
    let _operator = connect(addr, &pki, "operator").await?;
    tokio::time::timeout(Duration::from_secs(5), accepted.next()).await?;
    // One admitted connection ends: the next one is admitted again, nothing more counted.
    drop(held.pop());
    for _ in 0..100 {
        if limiter.live(Some(&observer)) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _again = connect(addr, &pki, "observer").await?;
    tokio::time::timeout(Duration::from_secs(5), accepted.next()).await?;
    assert_eq!(refusals.count(ConnectionRefusal::MaxConnections), 3);

    // A plaintext client fails the handshake; a silent one runs out of time.
    let mut plain = TcpStream::connect(addr).await?;
    plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    assert!(closed(&mut plain).await);
    counted(&refusals, ConnectionRefusal::HandshakeFailed, 1).await?;
    let mut silent = TcpStream::connect(addr).await?;
    assert!(closed(&mut silent).await);
    counted(&refusals, ConnectionRefusal::HandshakeTimeout, 1).await?;

    // A plaintext port: a silent peer is dropped and counted, a peer that leaves is not.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let plain_addr = listener.local_addr()?;
    let _plain_port = plaintext_with(listener, config, refusals.clone());
    drop(TcpStream::connect(plain_addr).await?);
    let mut silent = TcpStream::connect(plain_addr).await?;
    assert!(closed(&mut silent).await);
    counted(&refusals, ConnectionRefusal::NoFirstBytes, 1).await?;

    // The recorder saw the same counts under the metric's name and reason label.
    for why in ConnectionRefusal::ALL {
        let key = format!("{CONNECTION_REFUSALS}{{reason={}}}", why.label());
        assert_eq!(recorder.get(&key), refusals.count(why), "{key}");
    }
    assert_eq!(refusals.count(ConnectionRefusal::UnusableIdentity), 0);
    Ok(())
}
