//! The harness every test of a dmar server uses: a server booted in process on loopback
//! ([`Boot`], [`Server`]), an agent's raw end of an ATS link ([`Link`]), and the Control
//! calls tests repeat ([`paging_domain`], [`map`], [`strict_unmap`]).
//!
//! It owns what a test needs to reach a real server over real gRPC, and nothing a test
//! checks: assertions stay in the tests. It does not start agents (dmar-e2e does that with
//! `dmar_agent`), so a crate that must not depend on the agent can use it.
//!
//! A test file under `server/tests/` (dmar-server has this crate as a dev-dependency) needs
//! a few lines:
//!
//! ```no_run
//! use dmar_test_support::{Link, Server, config, function, map, paging_domain};
//!
//! # async fn example() {
//! let server = Server::boot(config(std::time::Duration::from_secs(5))).await;
//! let mut c = server.control().await;
//! let did = paging_domain(&mut c, &[0x0108u32]).await;
//! map(&mut c, did, 0x10_0000, 0x20_0000, 0x1000, true).await;
//! let mut link = Link::open(server.addr, "test", vec![function(0x0108)]).await.expect("bound");
//! let done = link.translate(0x0108, 0x10_0000).await;
//! server.stop().await;
//! # }
//! ```
//!
//! [`Boot`] adds what some tests need on top: a `/metrics` listener ([`Server::metric`]), a
//! plaintext health port, a chosen address (to restart a server on its port). A test that
//! serves TLS builds the [`ServerConfig`]'s `security` and opens links with
//! [`Link::open_on`] over its own channel.

mod control;
mod link;
mod server;

use std::net::SocketAddr;
use std::time::Duration;

pub use control::{attach, create_domain, map, paging_domain, strict_unmap};
pub use link::{Link, function};
pub use server::{Boot, Server, config};

/// How long a test waits for something that must happen (a bound, never a measurement).
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Polls `check` until it holds (bounded by [`PATIENCE`]).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A channel to `addr` over mutual TLS as `name`, one of `pki`'s identities (the server's
/// certificate names `localhost`). The transport's error is returned, so a test can wait
/// for a server that is still starting.
pub async fn tls_channel(
    addr: SocketAddr,
    pki: &dmar_auth::DevPki,
    name: &str,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let tls = pki.tls_material(name).expect("an identity of the PKI").tonic_client_config("localhost");
    tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("url")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// One plain HTTP/1.1 GET (the `/metrics` listeners speak nothing else); the whole answer,
/// head included.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// The value of the line of a Prometheus exposition that starts with `line_start` (a series
/// with its labels and the space before the value), if there is one and it parses.
pub fn sample<T: std::str::FromStr>(exposition: &str, line_start: &str) -> Option<T> {
    exposition.lines().find_map(|l| l.strip_prefix(line_start)).and_then(|v| v.trim().parse().ok())
}
