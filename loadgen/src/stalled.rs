//! The stalled device of the invalidate scenario (`--stalled-device`): a function the load
//! generator binds itself on an ATS link of its own, attaches with ATS to a paging domain
//! of its own, and then lets hang: it stops answering device-TLB invalidation requests
//! (PCIe ATS Invalidate Request, never an Invalidate Completion). A background task keeps
//! strict-unmapping and remapping one page of its domain; every such unmap waits for the
//! unit's device-TLB invalidation time-out (ITE, VT-d 6.5.2.10) and ends
//! DEADLINE_EXCEEDED, which is what the stall is for: it is counted, not an error.
//!
//! The function answers while it is being attached: attaching an ATS device invalidates
//! its device TLB first, and a device that does not answer is left detached (the
//! driver's rule). A device that hangs after it was set up is also the realistic case.
//!
//! Owns the raw link (the bind, reading the server's messages so that its writer never
//! waits on this link, the completions while answering) and the unmap loop. Not here:
//! where the function goes ([`crate::platform::plan_stall`]) or the tenants' unmaps.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use dmar_proto::v1::ats_link_client::AtsLinkClient;
use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::*;
use dmar_vtd::{PAGE_SIZE, SourceId};
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

use crate::report::Latency;
use crate::scenario::{self, HPA_BASE, IOVA_BASE, Prepared};

/// The agent name the link binds under (server logs).
const AGENT_NAME: &str = "dmar-loadgen-stalled-device";
/// The function's ATS invalidate queue depth.
const QUEUE_DEPTH: u32 = 8;
/// How long to wait for the unmap in progress when stopping, beyond a time-out or two.
const STOP_PATIENCE: Duration = Duration::from_secs(30);

/// What the stalled device saw, when it is stopped.
#[derive(Debug, Clone, Default)]
pub(crate) struct StallCounts {
    /// Strict unmaps of its page.
    pub(crate) unmaps: u64,
    /// Of those, DEADLINE_EXCEEDED.
    pub(crate) timed_out: u64,
    /// Invalidation requests it never answered.
    pub(crate) ignored: u64,
    /// Each unmap's duration.
    pub(crate) latency: Latency,
}

/// A bound, attached function that no longer answers invalidations, and the task that
/// keeps unmapping its page.
#[derive(Debug)]
pub(crate) struct StalledDevice {
    /// Its requester id.
    pub(crate) sid: SourceId,
    prepared: Prepared,
    control: ControlClient<Channel>,
    answering: Arc<AtomicBool>,
    ignored: Arc<AtomicU64>,
    link_stop: CancellationToken,
    link: JoinHandle<()>,
    unmap_stop: CancellationToken,
    unmapper: Option<Unmapper>,
}

/// The unmap loop's task: unmaps, of which timed out, and each unmap's duration.
type Unmapper = JoinHandle<anyhow::Result<(u64, u64, Histogram<u64>)>>;

impl StalledDevice {
    /// Binds `sid` on a new link over `link_channel` (a device identity under TLS),
    /// attaches it with ATS to a new paging domain through `control`, maps one page, and
    /// stops answering invalidations. Nothing is unmapped yet: [`StalledDevice::start`].
    pub(crate) async fn attach(
        link_channel: Channel,
        control: ControlClient<Channel>,
        sid: SourceId,
    ) -> anyhow::Result<StalledDevice> {
        let (tx, rx) = mpsc::channel::<LinkUp>(16);
        let function =
            Function { source_id: u32::from(sid), invalidate_queue_depth: QUEUE_DEPTH, page_request_capacity: 0 };
        let bind = Bind { functions: vec![function], agent: AGENT_NAME.to_owned() };
        tx.send(LinkUp { bind: Some(bind), ..Default::default() }).await.context("stalled device link")?;
        let mut down = AtsLinkClient::new(link_channel)
            .open(ReceiverStream::new(rx))
            .await
            .with_context(|| format!("the server refused the stalled device's link for {sid}"))?
            .into_inner();
        let bound = tokio::time::timeout(Duration::from_secs(10), down.message())
            .await
            .context("no answer to the stalled device's bind")?
            .with_context(|| format!("binding the stalled device {sid}"))?
            .and_then(|m| m.bound)
            .map(|b| b.source_ids)
            .unwrap_or_default();
        if !bound.contains(&u32::from(sid)) {
            bail!("the server did not bind the stalled device {sid}");
        }
        let answering = Arc::new(AtomicBool::new(true));
        let ignored = Arc::new(AtomicU64::new(0));
        let link_stop = CancellationToken::new();
        let link = tokio::spawn(serve_link(tx, down, answering.clone(), ignored.clone(), link_stop.clone()));
        let mut device = StalledDevice {
            sid,
            prepared: Prepared { sid: u32::from(sid), domain: 0 },
            control,
            answering,
            ignored,
            link_stop,
            link,
            unmap_stop: CancellationToken::new(),
            unmapper: None,
        };
        match device.set_up().await {
            Ok(prepared) => device.prepared = prepared,
            Err(e) => {
                let _ = device.stop().await;
                return Err(e);
            }
        }
        device.answering.store(false, Ordering::Release);
        Ok(device)
    }

    async fn set_up(&mut self) -> anyhow::Result<Prepared> {
        let p = scenario::attach(&mut self.control, u32::from(self.sid), false)
            .await
            .with_context(|| format!("attaching the stalled device {}", self.sid))?;
        self.prepared = p;
        self.control.map(page_map(p.domain)).await.context("mapping the stalled device's page")?;
        Ok(p)
    }

    /// Starts strict-unmapping and remapping the page, back to back, until stopped.
    pub(crate) fn start(&mut self) {
        let mut control = self.control.clone();
        let domain = self.prepared.domain;
        let stop = self.unmap_stop.clone();
        self.unmapper = Some(tokio::spawn(async move {
            let mut lat = Histogram::<u64>::new(3).context("histogram")?;
            let (mut unmaps, mut timed_out) = (0u64, 0u64);
            while !stop.is_cancelled() {
                let t = Instant::now();
                let unmap = UnmapRequest {
                    domain_id: domain,
                    ranges: vec![UnmapRange { iova: IOVA_BASE, length: PAGE_SIZE }],
                    policy: FlushPolicy::Strict as i32,
                };
                match control.unmap(unmap).await {
                    Ok(_) => {}
                    Err(s) if s.code() == Code::DeadlineExceeded => timed_out += 1,
                    Err(s) => return Err(anyhow::Error::new(s).context("stalled device's Unmap")),
                }
                let _ = lat.record(t.elapsed().as_nanos() as u64);
                unmaps += 1;
                control.map(page_map(domain)).await.context("stalled device's Map")?;
            }
            Ok((unmaps, timed_out, lat))
        }));
    }

    /// Stops the unmap loop (after the unmap in progress), closes the link (the server
    /// completes what the function left unanswered), detaches the function and destroys
    /// its domain. The counts, or the unmap loop's error.
    pub(crate) async fn stop(mut self) -> anyhow::Result<StallCounts> {
        self.unmap_stop.cancel();
        let outcome = match self.unmapper.take() {
            Some(task) => match tokio::time::timeout(STOP_PATIENCE, task).await {
                Ok(Ok(Ok((unmaps, timed_out, lat)))) => Ok((unmaps, timed_out, Latency::of(&lat))),
                Ok(Ok(Err(e))) => Err(e),
                Ok(Err(e)) => Err(anyhow::Error::new(e).context("stalled device task")),
                Err(_) => Err(anyhow::anyhow!("the stalled device's unmap did not end within {STOP_PATIENCE:?}")),
            },
            None => Ok((0, 0, Latency::default())),
        };
        self.link_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.link).await;
        if self.prepared.domain != 0 {
            scenario::teardown(&mut self.control, &[self.prepared]).await;
        }
        let (unmaps, timed_out, latency) = outcome?;
        Ok(StallCounts { unmaps, timed_out, ignored: self.ignored.load(Ordering::Relaxed), latency })
    }
}

/// The page the stalled device's domain maps at [`IOVA_BASE`].
fn page_map(domain: u32) -> MapRequest {
    let perms = Some(Permissions { read: true, write: true });
    MapRequest {
        domain_id: domain,
        ranges: vec![MapRange { iova: IOVA_BASE, hpa: HPA_BASE + PAGE_SIZE, length: PAGE_SIZE, permissions: perms }],
    }
}

/// Reads the link until stopped or closed: answers invalidation requests while
/// `answering`, and only counts them afterwards.
async fn serve_link(
    tx: mpsc::Sender<LinkUp>,
    mut down: tonic::Streaming<LinkDown>,
    answering: Arc<AtomicBool>,
    ignored: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return,
            m = down.message() => m,
        };
        let Ok(Some(m)) = message else {
            tracing::debug!("stalled device link closed by the server");
            return;
        };
        if m.invalidations.is_empty() {
            continue;
        }
        if !answering.load(Ordering::Acquire) {
            ignored.fetch_add(m.invalidations.len() as u64, Ordering::Relaxed);
            continue;
        }
        let invalidation_completions =
            m.invalidations.iter().map(|i| InvalidationCompletion { source_id: i.source_id, itag: i.itag }).collect();
        if tx.send(LinkUp { invalidation_completions, ..Default::default() }).await.is_err() {
            return;
        }
    }
}
