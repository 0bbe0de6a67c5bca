//! ATS link throughput: translations served per second and server CPU time per
//! translation, for batch sizes 1, 16, 64 and 256, over loopback.
//!
//! The server runs as its own process (the `dmar-server` binary of this build), so its CPU
//! time (from the Stats call, user + system) is not mixed with the client's. Two links
//! each keep a window of messages in flight; every message carries `batch` translation
//! requests for pages that stay in the IOTLB, so the figure is the cost of the link, not
//! of page walks.
//!
//! Run: `cargo bench -p dmar-server --bench link` (env `DMAR_BENCH_SECS` sets the measured
//! time per batch size, default 3).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dmar_proto::v1::ats_link_client::AtsLinkClient;
use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

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

async fn cpu_ns(c: &mut ControlClient<tonic::transport::Channel>) -> u64 {
    c.get_stats(GetStatsRequest {}).await.expect("stats").into_inner().cpu_time_ns
}

/// Drives one link for `secs`, returns the translations completed.
async fn drive(addr: String, sid: u32, batch: usize, until: Instant) -> u64 {
    let mut client = AtsLinkClient::connect(addr).await.expect("connect");
    let (tx, rx) = mpsc::channel(WINDOW * 2);
    let f = Function { source_id: sid, invalidate_queue_depth: 32, page_request_capacity: 0 };
    tx.send(LinkUp { bind: Some(Bind { functions: vec![f], agent: "bench".into() }), ..Default::default() })
        .await
        .expect("bind");
    let mut down = client.open(ReceiverStream::new(rx)).await.expect("open").into_inner();
    down.message().await.expect("bound").expect("bound");
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
        tx.send(next(batch)).await.expect("send");
    }
    let mut done = 0u64;
    while let Some(m) = down.message().await.expect("link") {
        done += m.completions.len() as u64;
        if Instant::now() >= until {
            break;
        }
        tx.send(next(batch)).await.expect("send");
    }
    done
}

fn main() {
    let secs: u64 = std::env::var("DMAR_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let port = free_port();
    let server = Server(
        Command::new(env!("CARGO_BIN_EXE_dmar-server"))
            .env("DMAR_LISTEN", format!("127.0.0.1:{port}"))
            .env("DMAR_METRICS_LISTEN", "off")
            .env("DMAR_MEMORY", "1G")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start dmar-server"),
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async move {
        let addr = format!("http://127.0.0.1:{port}");
        let mut c = loop {
            match ControlClient::connect(addr.clone()).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let did = c
            .create_domain(CreateDomainRequest { kind: DomainKind::Paging as i32, address_width: 48 })
            .await
            .expect("domain")
            .into_inner()
            .domain_id;
        let perms = Some(Permissions { read: true, write: true });
        c.map(MapRequest { domain_id: did, ranges: vec![MapRange { iova: 0, hpa: 0x100_1000, length: PAGES << 12, permissions: perms }] })
            .await
            .expect("map");
        println!("ATS link throughput, {LINKS} links, window {WINDOW} messages, {secs} s per batch size, server in its own process");
        println!("{:>6} {:>16} {:>22}", "batch", "translations/s", "server CPU/translation");
        for (round, batch) in [1usize, 16, 64, 256].into_iter().enumerate() {
            let sids: Vec<u32> = (0..LINKS).map(|l| 0x0100 + (round as u32) * 8 + l).collect();
            for sid in &sids {
                c.attach(AttachRequest { source_id: *sid, domain_id: did, ats: true }).await.expect("attach");
            }
            // Warm-up, then the measured run.
            let warm = Instant::now() + Duration::from_millis(500);
            let _ = futures_join(sids.iter().map(|s| drive(addr.clone(), *s, batch, warm)).collect()).await;
            let cpu0 = cpu_ns(&mut c).await;
            let start = Instant::now();
            let until = start + Duration::from_secs(secs);
            let done: u64 = futures_join(sids.iter().map(|s| drive(addr.clone(), *s, batch, until)).collect()).await.iter().sum();
            let elapsed = start.elapsed().as_secs_f64();
            let cpu = cpu_ns(&mut c).await.saturating_sub(cpu0);
            println!("{batch:>6} {:>16.0} {:>19.3} µs", done as f64 / elapsed, cpu as f64 / 1000.0 / done.max(1) as f64);
        }
    });
    drop(server);
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
