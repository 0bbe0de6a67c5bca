//! Accepting TLS connections for a tonic server: handshakes off the accept loop, the peer's
//! identity read once per connection, and connections counted per identity.
//!
//! This module owns the accept loop ([`incoming`], and [`plaintext`] for insecure and
//! health-only ports with the same time-out and bound), the per-connection facts a service reads
//! from each request ([`PeerInfo`]), the `max_connections` quota ([`ConnectionLimiter`]) and
//! the count of connections it closes unserved ([`ConnectionRefusals`], in `refusals`).
//! It does not decide whether an RPC is allowed: services look the identity up in the
//! [`crate::Policy`] themselves.
//!
//! With this acceptor, tonic's `Request::peer_certs()` returns `None` (tonic only fills it for
//! its own stream type); read [`PeerInfo::of`] instead, which also carries the certificates.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::identity::Identity;
use crate::policy::Policy;

mod refusals;

pub use self::refusals::{CONNECTION_REFUSALS, ConnectionRefusal, ConnectionRefusals};

/// How the acceptor treats connections before they reach tonic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptConfig {
    /// A peer that has not finished the handshake by then is dropped, so a silent client
    /// holds nothing for long.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; beyond it the loop stops accepting until one ends,
    /// bounding the memory and tasks unauthenticated peers can make the server spend.
    pub max_handshakes: usize,
}

impl Default for AcceptConfig {
    /// 10 seconds, 256 handshakes.
    fn default() -> Self {
        Self { handshake_timeout: Duration::from_secs(10), max_handshakes: 256 }
    }
}

/// What a service knows about the peer of a connection, attached by tonic to every request
/// on it (as the connection's `ConnectInfo`).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    identity: Option<Identity>,
    remote_addr: Option<SocketAddr>,
    local_addr: Option<SocketAddr>,
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl PeerInfo {
    /// Peer info made by hand: for service tests that put it in a request's extensions to
    /// exercise their authorization without TLS, and for servers that identify peers some
    /// other way.
    pub fn new(identity: Option<Identity>, remote_addr: Option<SocketAddr>) -> Self {
        Self { identity, remote_addr, local_addr: None, certs: None }
    }

    /// The peer info of the connection `request` arrived on, or `None` when the server does
    /// not use [`incoming`] (plain TCP, tonic's own TLS).
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&PeerInfo> {
        request.extensions().get::<PeerInfo>()
    }

    /// The peer's identity; `None` when it presented no certificate (only possible with
    /// [`crate::ClientAuth::Optional`]), in which case only health may be answered.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// The peer's address, for logs.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote_addr
    }

    /// The local address the peer connected to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// The verified certificate chain the peer presented, leaf first.
    pub fn peer_certs(&self) -> Option<Arc<Vec<CertificateDer<'static>>>> {
        self.certs.clone()
    }
}

/// A TLS connection whose handshake has completed and whose peer has been identified and
/// admitted. Dropping it releases its [`ConnectionLimiter`] slot.
#[derive(Debug)]
pub struct PeerStream {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
    _slot: Option<ConnectionSlot>,
}

impl PeerStream {
    /// The peer this stream talks to.
    pub fn info(&self) -> &PeerInfo {
        &self.info
    }

    /// The TLS stream, for the negotiated protocol or cipher suite.
    pub fn get_ref(&self) -> &TlsStream<TcpStream> {
        &self.inner
    }
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The stream of admitted connections [`incoming`] returns, for
/// `tonic::transport::Server::serve_with_incoming(_shutdown)`. It never yields an error:
/// failed handshakes and refused peers are counted ([`ConnectionRefusals`]), logged
/// (rate-limited) and dropped, because one bad client must not stop the server.
#[derive(Debug)]
pub struct Incoming(ReceiverStream<Result<PeerStream, Infallible>>);

impl Stream for Incoming {
    type Item = Result<PeerStream, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.0).poll_next(cx)
    }
}

/// Accepts TCP connections on `listener`, completes TLS handshakes with `tls` in their own
/// tasks, reads each peer's identity and, with a `limiter`, admits it against its
/// `max_connections`. Refusals are counted on the global `metrics` recorder
/// ([`ConnectionRefusals::global`]; [`incoming_with`] to count elsewhere). Must be called
/// inside a tokio runtime; the accept task ends when the returned stream is dropped (when
/// tonic shuts down).
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limiter: Option<Arc<ConnectionLimiter>>,
    config: AcceptConfig,
) -> Incoming {
    incoming_with(listener, tls, limiter, config, ConnectionRefusals::global())
}

/// [`incoming`] counting its refusals in `refusals`.
pub fn incoming_with(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limiter: Option<Arc<ConnectionLimiter>>,
    config: AcceptConfig,
    refusals: ConnectionRefusals,
) -> Incoming {
    let (tx, rx) = mpsc::channel(16);
    let acceptor = TlsAcceptor::from(tls);
    accept_loop(listener, config, tx, move |tcp, remote, permit, tx| {
        let job =
            Handshake { acceptor: acceptor.clone(), limiter: limiter.clone(), refusals: refusals.clone(), tx, config };
        tokio::spawn(job.run(tcp, remote, permit));
    });
    Incoming(ReceiverStream::new(rx))
}

/// The stream of plaintext connections [`plaintext`] returns: TCP streams whose peer sent
/// its first bytes in time. Like [`Incoming`], it never yields an error.
#[derive(Debug)]
pub struct PlainIncoming(ReceiverStream<Result<TcpStream, Infallible>>);

impl Stream for PlainIncoming {
    type Item = Result<TcpStream, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.0).poll_next(cx)
    }
}

/// Accepts plaintext TCP connections on `listener` for an insecure server or a health-only
/// port, with the same bounds as [`incoming`]: a peer that sends nothing within
/// `config.handshake_timeout` is dropped (the plaintext equivalent of a handshake
/// time-out), and at most `config.max_handshakes` connections wait for their first bytes at
/// once. Refusals are counted on the global `metrics` recorder ([`plaintext_with`] to count
/// elsewhere). Must be called inside a tokio runtime; the accept task ends when the stream
/// is dropped.
pub fn plaintext(listener: TcpListener, config: AcceptConfig) -> PlainIncoming {
    plaintext_with(listener, config, ConnectionRefusals::global())
}

/// [`plaintext`] counting its refusals in `refusals`.
pub fn plaintext_with(listener: TcpListener, config: AcceptConfig, refusals: ConnectionRefusals) -> PlainIncoming {
    let (tx, rx) = mpsc::channel(16);
    accept_loop(listener, config, tx, move |tcp, remote, permit, tx| {
        let refusals = refusals.clone();
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            match tokio::time::timeout(config.handshake_timeout, tcp.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {
                    drop(permit);
                    let _ = tx.send(Ok(tcp)).await;
                }
                // The peer left: nothing was refused.
                Ok(_) => debug!(peer = %remote, "connection closed before its first bytes"),
                Err(_) => refusals.record(ConnectionRefusal::NoFirstBytes, remote, None, None),
            }
        });
    });
    PlainIncoming(ReceiverStream::new(rx))
}

/// The accept loop both kinds of port share: at most `config.max_handshakes` connections
/// between accept and their first step (`admit` holds the permit until then), accept
/// errors paced, `TCP_NODELAY` set; ends when the stream side (`tx`) is dropped.
fn accept_loop<T: Send + 'static>(
    listener: TcpListener,
    config: AcceptConfig,
    tx: mpsc::Sender<T>,
    admit: impl Fn(TcpStream, SocketAddr, OwnedSemaphorePermit, mpsc::Sender<T>) + Send + 'static,
) {
    let permits = Arc::new(Semaphore::new(config.max_handshakes.max(1)));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = tx.closed() => break,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => break,
                r = listener.accept() => match r {
                    Ok(pair) => pair,
                    Err(e) => {
                        accept_failed(&e).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            admit(tcp, remote, permit, tx.clone());
        }
    });
}

/// Per-connection errors (the peer left before accept) are routine; others (out of file
/// descriptors) deserve a warning and a pause so the loop does not spin.
async fn accept_failed(e: &io::Error) {
    match e.kind() {
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted => {
            debug!(error = %e, "accept failed");
        }
        _ => {
            warn!(error = %e, "accept failed; pausing");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

struct Handshake {
    acceptor: TlsAcceptor,
    limiter: Option<Arc<ConnectionLimiter>>,
    refusals: ConnectionRefusals,
    tx: mpsc::Sender<Result<PeerStream, Infallible>>,
    config: AcceptConfig,
}

impl Handshake {
    async fn run(self, tcp: TcpStream, remote: SocketAddr, permit: OwnedSemaphorePermit) {
        let local = tcp.local_addr().ok();
        let tls = match tokio::time::timeout(self.config.handshake_timeout, self.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                self.refusals.record(ConnectionRefusal::HandshakeFailed, remote, None, Some(&e));
                return;
            }
            Err(_) => {
                self.refusals.record(ConnectionRefusal::HandshakeTimeout, remote, None, None);
                return;
            }
        };
        drop(permit);
        let certs = tls.get_ref().1.peer_certificates().map(|c| Arc::new(c.to_vec()));
        let identity = match &certs {
            None => None,
            Some(chain) => match Identity::from_peer_certs(Some(chain.clone())) {
                Ok(id) => Some(id),
                Err(e) => {
                    // The CA signed it, so this is an issuing mistake worth seeing.
                    self.refusals.record(ConnectionRefusal::UnusableIdentity, remote, None, Some(&e));
                    return;
                }
            },
        };
        let slot = match &self.limiter {
            None => None,
            Some(limiter) => match limiter.try_acquire(identity.as_ref()) {
                Ok(slot) => Some(slot),
                Err(e) => {
                    self.refusals.record(ConnectionRefusal::MaxConnections, remote, identity.as_ref(), Some(&e));
                    return;
                }
            },
        };
        debug!(peer = %remote, identity = identity.as_ref().map(Identity::as_str), "connection admitted");
        let info = PeerInfo { identity, remote_addr: Some(remote), local_addr: local, certs };
        let _ = self.tx.send(Ok(PeerStream { inner: tls, info, _slot: slot })).await;
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("connection limit of {limit} reached")]
pub struct ConnectionLimitError {
    /// The limit that applied.
    pub limit: u32,
}

/// Counts live connections per identity and refuses those beyond the identity's
/// `max_connections` quota.
///
/// Peers the policy does not name, and peers without a certificate, share one bucket with
/// its own limit: they can learn why they are refused but cannot hold many sockets.
#[derive(Debug)]
pub struct ConnectionLimiter {
    policy: Arc<Policy>,
    unlisted_max: u32,
    live: Mutex<HashMap<Option<Identity>, u32>>,
}

impl ConnectionLimiter {
    /// The limit for the shared bucket of unnamed and anonymous peers unless told otherwise.
    pub const DEFAULT_UNLISTED_MAX: u32 = 16;

    /// A limiter applying `policy`'s quotas, and `unlisted_max` to everyone else together.
    pub fn new(policy: Arc<Policy>, unlisted_max: u32) -> Arc<Self> {
        Arc::new(Self { policy, unlisted_max, live: Mutex::new(HashMap::new()) })
    }

    /// Takes a connection slot for `identity` (`None`: no certificate), released when the
    /// returned slot is dropped.
    pub fn try_acquire(self: &Arc<Self>, identity: Option<&Identity>) -> Result<ConnectionSlot, ConnectionLimitError> {
        let (key, limit) = match identity.and_then(|id| self.policy.grant(id).map(|g| (id, g))) {
            Some((id, grant)) => (Some(id.clone()), grant.quotas.max_connections),
            None => (None, self.unlisted_max),
        };
        let mut live = self.live.lock();
        let count = live.entry(key.clone()).or_insert(0);
        if *count >= limit {
            return Err(ConnectionLimitError { limit });
        }
        *count += 1;
        Ok(ConnectionSlot { limiter: self.clone(), key })
    }

    /// Live connections counted for `identity` (`None`, or a name the policy does not know:
    /// the shared bucket).
    pub fn live(&self, identity: Option<&Identity>) -> u32 {
        let key = identity.filter(|id| self.policy.grant(id).is_some()).cloned();
        self.live.lock().get(&key).copied().unwrap_or(0)
    }
}

/// One admitted connection's place in its identity's count.
#[derive(Debug)]
pub struct ConnectionSlot {
    limiter: Arc<ConnectionLimiter>,
    key: Option<Identity>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut live = self.limiter.live.lock();
        if let Some(count) = live.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                live.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Arc<Policy> {
        Arc::new(
            Policy::from_toml_str(
                "[[identity]]\nname = \"op\"\nroles = [\"operator\"]\nmax_connections = 2\n\
                 [[identity]]\nname = \"none\"\nroles = [\"observer\"]\nmax_connections = 0\n",
            )
            .unwrap(),
        )
    }

    #[test]
    fn limiter_counts_per_identity_and_releases_on_drop() {
        let limiter = ConnectionLimiter::new(policy(), 1);
        let op = Identity::new("op").unwrap();
        let a = limiter.try_acquire(Some(&op)).unwrap();
        let b = limiter.try_acquire(Some(&op)).unwrap();
        assert_eq!(limiter.try_acquire(Some(&op)).unwrap_err(), ConnectionLimitError { limit: 2 });
        assert_eq!(limiter.live(Some(&op)), 2);
        drop(a);
        let _c = limiter.try_acquire(Some(&op)).unwrap();
        drop(b);
        assert_eq!(limiter.live(Some(&op)), 1);

        let none = Identity::new("none").unwrap();
        assert_eq!(limiter.try_acquire(Some(&none)).unwrap_err(), ConnectionLimitError { limit: 0 });
    }

    #[tokio::test]
    async fn plaintext_drops_silent_peers_and_admits_talking_ones() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_stream::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = AcceptConfig { handshake_timeout: Duration::from_millis(200), max_handshakes: 4 };
        let mut accepted = plaintext(listener, config);
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut talking = TcpStream::connect(addr).await.unwrap();
        talking.write_all(b"PRI").await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), accepted.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(got.peer_addr().unwrap(), talking.local_addr().unwrap());
        // The silent peer is closed by the server after the time-out.
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0);
    }

    #[test]
    fn peer_info_travels_in_request_extensions() {
        let mut req = tonic::Request::new(());
        assert!(PeerInfo::of(&req).is_none());
        req.extensions_mut().insert(PeerInfo::new(Some(Identity::insecure()), None));
        assert_eq!(PeerInfo::of(&req).and_then(PeerInfo::identity), Some(&Identity::insecure()));
    }

    #[test]
    fn unlisted_and_anonymous_peers_share_one_bucket() {
        let limiter = ConnectionLimiter::new(policy(), 1);
        let stranger = Identity::new("stranger").unwrap();
        let slot = limiter.try_acquire(None).unwrap();
        assert!(limiter.try_acquire(Some(&stranger)).is_err());
        assert_eq!(limiter.live(Some(&stranger)), 1);
        drop(slot);
        assert_eq!(limiter.live(None), 0);
        let _slot = limiter.try_acquire(Some(&stranger)).unwrap();
    }
}
