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

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::*;
use dmar_test_support::{Link, attach, create_domain, function, map};

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
async fn drive(addr: SocketAddr, sid: u32, batch: usize, until: Instant) -> u64 {
    let f = Function { invalidate_queue_depth: 32, page_request_capacity: 0, ..function(sid) };
    let mut link = Link::open(addr, "bench", vec![f]).await.expect("bind");
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
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut c = loop {
            match ControlClient::connect(format!("http://{addr}")).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let did = create_domain(&mut c, DomainKind::Paging).await;
        map(&mut c, did, 0, 0x100_1000, PAGES << 12, true).await;
        println!("ATS link throughput, {LINKS} links, window {WINDOW} messages, {secs} s per batch size, server in its own process");
        println!("{:>6} {:>16} {:>22}", "batch", "translations/s", "server CPU/translation");
        for (round, batch) in [1usize, 16, 64, 256].into_iter().enumerate() {
            let sids: Vec<u32> = (0..LINKS).map(|l| 0x0100 + (round as u32) * 8 + l).collect();
            for sid in &sids {
                attach(&mut c, did, *sid, true).await;
            }
            // Warm-up, then the measured run.
            let warm = Instant::now() + Duration::from_millis(500);
            let _ = futures_join(sids.iter().map(|s| drive(addr, *s, batch, warm)).collect()).await;
            let cpu0 = cpu_ns(&mut c).await;
            let start = Instant::now();
            let until = start + Duration::from_secs(secs);
            let done: u64 = futures_join(sids.iter().map(|s| drive(addr, *s, batch, until)).collect()).await.iter().sum();
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
