//! ATS link throughput: translations served per second and server CPU time per
//! translation, for batch sizes 1, 16, 64 and 256, over loopback, in plaintext and over
//! mutual TLS (docs/SECURITY.md) in the same run.
//!
//! The server runs as its own process (the `dmar-server` binary of this build), so its CPU
//! time (from the Stats call, user + system) is not mixed with the client's. Two links
//! each keep a window of messages in flight; every message carries `batch` translation
//! requests for pages that stay in the IOTLB, so the figure is the cost of the link, not
//! of page walks.
//!
//! With TLS, the server runs as `dmar-server --tls-dir` with a development PKI made for
//! the run: the links go as a device identity that holds the bench's requester ids, the
//! Control calls as an operator.
//!
//! Run: `cargo bench -p dmar-server --bench link` (env `DMAR_BENCH_SECS` sets the measured
//! time per batch size, default 3; `DMAR_BENCH_TRANSPORT` = `plaintext`, `tls` or `both`,
//! the default).

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dmar_auth::{AgentSpec, DevPki, DevPkiSpec, Identity, Policy, RequesterIdRange, RequesterIdSet};
use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::*;
use dmar_test_support::{Link, attach, create_domain, function, map, tls_channel};
use dmar_vtd::SourceId;
use tonic::transport::{Channel, Endpoint};

const LINKS: u32 = 2;
const WINDOW: usize = 32;
const PAGES: u64 = 256;

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

async fn cpu_ns(c: &mut ControlClient<Channel>) -> u64 {
    c.get_stats(GetStatsRequest {}).await.expect("stats").into_inner().cpu_time_ns
}

/// Drives one link for `secs`, returns the translations completed.
async fn drive(to: Transport, sid: u32, batch: usize, until: Instant) -> u64 {
    let f = Function { invalidate_queue_depth: 32, page_request_capacity: 0, ..function(sid) };
    let channel = to.channel(DEVICE).await.expect("connect");
    let mut link = Link::open_on(channel, "bench", vec![f]).await.expect("bind");
    let mut tag = 0u64;
    let mut next = |n: usize| {
        let translations = (0..n)
            .map(|_| {
                tag += 1;
                TranslationRequest { tag, source_id: sid, address: (tag % PAGES) << 12, no_write: false }
            })
            .collect();
        LinkUp { translations, ..Default::default() }
    };
    for _ in 0..WINDOW {
        link.send(next(batch)).await;
    }
    let mut done = 0u64;
    while let Some(m) = link.message().await.expect("link") {
        done += m.completions.len() as u64;
        if Instant::now() >= until {
            break;
        }
        link.send(next(batch)).await;
    }
    done
}

const DEVICE: &str = "bench-device";
const OPERATOR: &str = "operator";

/// How the bench reaches the server: plaintext, or mutual TLS with the run's PKI.
#[derive(Clone)]
struct Transport {
    addr: SocketAddr,
    pki: Option<std::sync::Arc<DevPki>>,
}

impl Transport {
    fn name(&self) -> &'static str {
        if self.pki.is_some() { "mutual TLS" } else { "plaintext" }
    }

    /// A connected channel as identity `name` (ignored in plaintext).
    async fn channel(&self, name: &str) -> Result<Channel, tonic::transport::Error> {
        match &self.pki {
            None => Endpoint::from_shared(format!("http://{}", self.addr)).expect("uri").connect().await,
            Some(pki) => tls_channel(self.addr, pki, name).await,
        }
    }
}

/// A development PKI whose device identity holds bus 1 (the bench's requester ids) and may
/// keep every link of a round open at once.
fn pki() -> DevPki {
    let bus1 = RequesterIdRange::new(SourceId::new(1, 0, 0), SourceId::new(1, 0x1f, 7)).expect("range");
    let device = Identity::new(DEVICE).expect("name");
    let spec = DevPkiSpec {
        agents: vec![AgentSpec { name: device.clone(), requester_ids: RequesterIdSet::from_ranges([bus1]) }],
        operators: vec![Identity::new(OPERATOR).expect("name")],
        ..DevPkiSpec::default()
    };
    let mut pki = DevPki::generate(&spec).expect("pki");
    let entries = pki.policy.iter().map(|(id, grant)| {
        let mut grant = grant.clone();
        if *id == device {
            grant.quotas.max_links = 4 * LINKS;
            grant.quotas.max_connections = 8 * LINKS;
        }
        (id.clone(), grant)
    });
    pki.policy = Policy::new(entries.collect::<Vec<_>>()).expect("policy");
    pki
}

fn main() {
    let secs: u64 = std::env::var("DMAR_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let transports = std::env::var("DMAR_BENCH_TRANSPORT").unwrap_or_else(|_| "both".into());
    let (plain, tls) = match transports.as_str() {
        "plaintext" => (true, false),
        "tls" => (false, true),
        "both" => (true, true),
        other => panic!("DMAR_BENCH_TRANSPORT={other:?}: expected plaintext, tls or both"),
    };
    dmar_auth::tls::install_default_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    println!(
        "ATS link throughput, {LINKS} links, window {WINDOW} messages, {secs} s per batch size, server in its own process"
    );
    println!("{:>11} {:>6} {:>16} {:>22}", "transport", "batch", "translations/s", "server CPU/translation");
    for with_tls in [false, true] {
        if (with_tls && !tls) || (!with_tls && !plain) {
            continue;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = with_tls.then(|| {
            let pki = pki();
            pki.write_to(dir.path(), false).expect("write the PKI");
            std::sync::Arc::new(pki)
        });
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_dmar-server"));
        command
            .env("DMAR_LISTEN", format!("127.0.0.1:{port}"))
            .env("DMAR_METRICS_LISTEN", "off")
            .env("DMAR_MEMORY", "1G")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        if with_tls {
            command.arg("--tls-dir").arg(dir.path());
        }
        let server = Server(command.spawn().expect("start dmar-server"));
        let to = Transport { addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)), pki };
        rt.block_on(rounds(to, secs));
        drop(server);
    }
}

/// One table's rows: each batch size on fresh requester ids of bus 1.
async fn rounds(to: Transport, secs: u64) {
    let mut c = loop {
        match to.channel(OPERATOR).await {
            Ok(channel) => break ControlClient::new(channel),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let did = create_domain(&mut c, DomainKind::Paging).await;
    map(&mut c, did, 0, 0x100_1000, PAGES << 12, true).await;
    for (round, batch) in [1usize, 16, 64, 256].into_iter().enumerate() {
        let sids: Vec<u32> = (0..LINKS).map(|l| 0x0100 + (round as u32) * 8 + l).collect();
        for sid in &sids {
            attach(&mut c, did, *sid, true).await;
        }
        // Warm-up, then the measured run.
        let warm = Instant::now() + Duration::from_millis(500);
        let _ = futures_join(sids.iter().map(|s| drive(to.clone(), *s, batch, warm)).collect()).await;
        let cpu0 = cpu_ns(&mut c).await;
        let start = Instant::now();
        let until = start + Duration::from_secs(secs);
        let done: u64 =
            futures_join(sids.iter().map(|s| drive(to.clone(), *s, batch, until)).collect()).await.iter().sum();
        let elapsed = start.elapsed().as_secs_f64();
        let cpu = cpu_ns(&mut c).await.saturating_sub(cpu0);
        let name = to.name();
        println!(
            "{name:>11} {batch:>6} {:>16.0} {:>19.3} µs",
            done as f64 / elapsed,
            cpu as f64 / 1000.0 / done.max(1) as f64
        );
    }
}

/// Runs futures concurrently on the runtime and collects their outputs in order.
async fn futures_join<F>(fs: Vec<F>) -> Vec<u64>
where
    F: std::future::Future<Output = u64> + Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("join"));
    }
    out
}
