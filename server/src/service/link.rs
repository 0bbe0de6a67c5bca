//! The ATS link service: one long-lived bidirectional stream per device agent (PCIe side).
//!
//! Owns the link protocol: the bind that must come first (each requester id bound by one
//! live link only, and routed to the unit whose device scope holds it: a function no
//! unit's scope covers is refused), the batched requests that follow (translation requests, DMA, MSI
//! writes, page requests, invalidation completions), and the server-pushed traffic
//! (invalidation requests, page group responses).
//!
//! Shape, per link:
//! - a reader task handles each inbound message in order: invalidation completions first,
//!   then translations, DMA, MSI writes and page requests, answering them in one outbound
//!   message; it waits on a bounded channel, so a slow agent slows only its own link;
//! - a writer task merges what goes out, invalidation requests first (they never queue
//!   behind translation traffic), then page responses, then completions;
//! - device ports (one per function, registered with its unit) push invalidations and
//!   page responses into bounded channels sized so that they can never be full: a
//!   function has at most its invalidate queue depth of ITags outstanding.
//!
//! Bounds, per link (what one peer can make the server do):
//! - reply bytes: every reply item takes its encoded size from the link's reply budget
//!   ([`REPLY_BUDGET_BYTES`]) before it is produced (a DMA read's data included), and gives
//!   it back when the transport takes the message. A peer that stops reading stops its own
//!   link's reader, holding at most the budget; other links and Control are unaffected;
//! - message size: one inbound message may ask for more reply bytes than a message can
//!   carry (4096 DMA reads of 64 KiB are 256 MiB). The replies are split into several
//!   outbound messages, each under [`MAX_LINK_MESSAGE_BYTES`] (tonic's default decode
//!   limit), in the order the requests came; nothing is refused for its reply size;
//! - page requests: a function may have at most its bind's `page_request_capacity` page
//!   requests outstanding, from its request until its group's response (PCIe 10.4.1,
//!   10.5.2.4). One past that is refused: a last request is answered with Response
//!   Failure for its group (PCIe 10.4.2.1: the function stops using PRI instead of
//!   waiting), others are dropped; both are counted (`dmar_server_refusals_total`);
//! - log lines a peer can cause are rate limited (one per second per kind, with the count
//!   of those left out), and peer text (the agent name) is capped and escaped.
//!
//! When a link ends, its functions are unbound; the unit completes their outstanding
//! device-TLB invalidations (the functions' device TLBs are gone: an agent that reconnects
//! starts empty), so no invalidation queue ever waits on a dead link.
//!
//! Only unit calls happen here, in place on the link's tasks: none of them waits (the
//! unit answers translations and DMA at once, and device ports never block). The link
//! never calls the driver. Wire values are decoded and encoded by [`super::wire`]; the
//! link's limits (functions per link, items per message) are defined once, in
//! [`dmar_vtd::ats`], for both ends.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use dmar_process::{RateLimit, client_text};
use dmar_proto::v1::ats_link_server::AtsLink;
use dmar_proto::v1::{DmaCompletion, InvalidationRequest, LinkDown, LinkUp, PageGroupResponse as WirePageResponse};
use dmar_vtd::ats::{MAX_FUNCTIONS_PER_LINK, MAX_ITEMS_PER_MESSAGE};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::metrics::{Metrics, Refusal};
use super::page_groups::PageGroups;
use super::wire::{self, MAX_DMA_BYTES, MAX_LINK_MESSAGE_BYTES, MAX_REPLY_ITEM_BYTES};
use super::{State, auth, status};
use dmar_vtd::ids::{Hpa, Iova, SourceId};
use dmar_vtd::unit::prq::PageGroupResponse;
use dmar_vtd::unit::{DeviceInvalidation, DevicePort, PageRequestOutcome, Unit};

/// Outbound messages buffered per link before the reader waits.
const OUTBOUND_DEPTH: usize = 16;
/// Reply bytes (encoded, DMA read data included) one link may have produced that the
/// transport has not taken yet: what a peer that does not read can make the server hold.
/// Four full messages; a link that reads keeps well under it.
pub(crate) const REPLY_BUDGET_BYTES: usize = 16 << 20;
/// Reply budget taken at a time: small replies (translations) do not touch the semaphore
/// for each item.
const BUDGET_CHUNK_BYTES: usize = 64 << 10;

const _: () = assert!(wire::reply_bytes(MAX_DMA_BYTES) <= BUDGET_CHUNK_BYTES * 2);
const _: () = assert!(MAX_LINK_MESSAGE_BYTES + 2 * BUDGET_CHUNK_BYTES <= REPLY_BUDGET_BYTES);

/// Warnings a peer can cause, at most one line per second each.
static DROPPED_RESPONSES: RateLimit = RateLimit::per_second();
static PROTOCOL_ERRORS: RateLimit = RateLimit::per_second();
static OVER_CAPACITY: RateLimit = RateLimit::per_second();

/// The unit's handle on one bound function.
#[derive(Debug)]
struct LinkPort {
    invalidations: mpsc::Sender<InvalidationRequest>,
    responses: mpsc::Sender<WirePageResponse>,
    groups: Arc<PageGroups>,
}

impl DevicePort for LinkPort {
    fn invalidate(&self, r: DeviceInvalidation) {
        let msg = wire::invalidation_request(&r);
        // Sized for every function's full ITag budget: full means the link is gone.
        if self.invalidations.try_send(msg).is_err() {
            tracing::debug!(sid = %r.sid, "invalidation for a closed link dropped; unbinding completes it");
        }
    }

    fn page_response(&self, r: PageGroupResponse) {
        // Software's response or the unit's own (an overflowed queue): either way the
        // group is answered.
        self.groups.answered(r.sid, r.prgi);
        let msg = wire::page_group_response(&r);
        if self.responses.try_send(msg).is_err()
            && let Some(suppressed) = DROPPED_RESPONSES.check()
        {
            tracing::warn!(sid = %r.sid, prgi = r.prgi, suppressed, "page group response dropped: link closed or over its PRI capacity");
        }
    }
}

/// An outbound message and the reply budget it holds until the transport takes it.
type Outgoing = (Result<LinkDown, Status>, Option<OwnedSemaphorePermit>);

/// A link's outbound messages as the transport takes them: each message's reply budget
/// goes back to its link at that moment.
#[derive(Debug)]
pub(crate) struct OutboundStream {
    rx: mpsc::Receiver<Outgoing>,
}

impl Stream for OutboundStream {
    type Item = Result<LinkDown, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|next| next.map(|(msg, _budget)| msg))
    }
}

/// The gRPC face of the ATS link.
#[derive(Debug, Clone)]
pub(crate) struct LinkService {
    pub(crate) state: Arc<State>,
}

#[tonic::async_trait]
impl AtsLink for LinkService {
    type OpenStream = OutboundStream;

    async fn open(&self, request: Request<Streaming<LinkUp>>) -> Result<Response<Self::OpenStream>, Status> {
        let caller = auth::caller(&request)?;
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("link closed before its bind"))?;
        let bind =
            first.bind.ok_or_else(|| Status::failed_precondition("the first link message must bind functions"))?;
        if bind.functions.is_empty() || bind.functions.len() > MAX_FUNCTIONS_PER_LINK {
            return Err(Status::invalid_argument(format!(
                "a link binds 1 to {MAX_FUNCTIONS_PER_LINK} functions, got {}",
                bind.functions.len()
            )));
        }
        let mut sids = Vec::with_capacity(bind.functions.len());
        let mut seen = HashSet::new();
        let mut itag_budget = 0usize;
        let mut pri_budget = 0usize;
        for f in &bind.functions {
            let sid = wire::source_id(f.source_id)?;
            if !seen.insert(sid) {
                return Err(Status::invalid_argument(format!("requester id {sid} appears twice in the bind")));
            }
            let depth = wire::queue_depth(sid, f.invalidate_queue_depth)?;
            // The unit whose scope holds the function takes its requests (VT-d 8.3.1).
            let unit = self.state.units.route(sid)?.unit.clone();
            itag_budget += usize::from(depth);
            pri_budget += wire::outstanding_page_groups(f);
            sids.push((sid, depth, unit));
        }
        // The caller's ranges, requester-id ownership and max_links; held until the link ends.
        let claim = self.state.access.claim_link(&caller, sids.iter().map(|(s, _, _)| *s))?;
        let (inv_tx, inv_rx) = mpsc::channel(itag_budget + 1);
        let (resp_tx, resp_rx) = mpsc::channel(pri_budget + 16);
        let groups = self.state.hub.page_groups.clone();
        let port = Arc::new(LinkPort { invalidations: inv_tx, responses: resp_tx, groups: groups.clone() });
        for (i, (sid, depth, unit)) in sids.iter().enumerate() {
            if let Err(e) = unit.bind_device_port(*sid, port.clone(), *depth) {
                for (bound, _, unit) in &sids[..i] {
                    unit.unbind_device_port(*bound);
                }
                return Err(status::port(e));
            }
        }
        drop(port);
        let state = self.state.clone();
        state.links.fetch_add(1, Ordering::Relaxed);
        state.bound_functions.fetch_add(sids.len() as u64, Ordering::Relaxed);
        state.metrics.connections.increment(1.0);
        state.metrics.bound_functions.increment(sids.len() as f64);
        // Peer text: capped and escaped, and only the capped copy outlives the bind.
        let agent = client_text(&bind.agent).to_string();
        tracing::info!(%agent, functions = sids.len(), "ATS link bound");
        for (f, (sid, _, _)) in bind.functions.iter().zip(&sids) {
            groups.bind(*sid, f.page_request_capacity);
        }

        let (out_tx, out_rx) = mpsc::channel(OUTBOUND_DEPTH);
        let bound_order: Vec<SourceId> = sids.iter().map(|(s, _, _)| *s).collect();
        let bound = LinkDown { bound: Some(wire::bound(&bound_order)), ..Default::default() };
        let (done_tx, done_rx) = mpsc::channel(OUTBOUND_DEPTH);
        let bound_sids: Bound = sids.into_iter().map(|(s, _, unit)| (s, unit)).collect();
        if out_tx.send((Ok(bound), None)).await.is_err() {
            unbind(&state, &groups, &bound_sids);
            return Err(Status::cancelled("link closed during bind"));
        }
        let tracker = state.tasks.clone();
        let shutdown = state.shutdown.clone();
        tracker.spawn(writer(inv_rx, resp_rx, done_rx, out_tx.clone()));
        tracker.spawn(async move {
            let budget = Arc::new(Semaphore::new(REPLY_BUDGET_BYTES));
            let link = Link { bound: &bound_sids, groups: &groups, budget: &budget };
            tokio::select! {
                () = reader(&state, &mut inbound, &link, &done_tx, &out_tx) => {}
                () = shutdown.cancelled() => {
                    let _ = out_tx.send((Err(Status::unavailable("server shutting down")), None)).await;
                }
            }
            unbind(&state, &groups, &bound_sids);
            drop(claim);
            tracing::info!(%agent, "ATS link closed; its functions are unbound");
        });
        Ok(Response::new(OutboundStream { rx: out_rx }))
    }
}

/// Unbinds a link's functions and stops counting the link.
fn unbind(state: &State, groups: &PageGroups, sids: &Bound) {
    for (sid, unit) in sids {
        // The record goes first: once the unit lets go, a new link may bind the function.
        groups.unbind(*sid);
        unit.unbind_device_port(*sid);
    }
    state.links.fetch_sub(1, Ordering::Relaxed);
    state.bound_functions.fetch_sub(sids.len() as u64, Ordering::Relaxed);
    state.metrics.connections.decrement(1.0);
    state.metrics.bound_functions.decrement(sids.len() as f64);
}

/// Merges outbound traffic, invalidations first.
async fn writer(
    mut invalidations: mpsc::Receiver<InvalidationRequest>,
    mut responses: mpsc::Receiver<WirePageResponse>,
    mut completions: mpsc::Receiver<(LinkDown, OwnedSemaphorePermit)>,
    out: mpsc::Sender<Outgoing>,
) {
    loop {
        // Merged pushes stay small: at most MAX_ITEMS_PER_MESSAGE items of a few bytes.
        let (msg, budget) = tokio::select! {
            biased;
            Some(first) = invalidations.recv() => {
                let mut m = LinkDown { invalidations: vec![first], ..Default::default() };
                while m.invalidations.len() < MAX_ITEMS_PER_MESSAGE && let Ok(more) = invalidations.try_recv() {
                    m.invalidations.push(more);
                }
                (m, None)
            }
            Some(first) = responses.recv() => {
                let mut m = LinkDown { page_responses: vec![first], ..Default::default() };
                while m.page_responses.len() < MAX_ITEMS_PER_MESSAGE && let Ok(more) = responses.try_recv() {
                    m.page_responses.push(more);
                }
                (m, None)
            }
            next = completions.recv() => match next {
                Some((m, budget)) => (m, Some(budget)),
                None => return, // the reader is done
            },
        };
        if out.send((Ok(msg), budget)).await.is_err() {
            return; // the agent is gone
        }
    }
}

/// What one link's reader works with.
/// A link's bound functions and the unit each one's requests go to.
type Bound = HashMap<SourceId, Arc<Unit>>;

struct Link<'a> {
    bound: &'a Bound,
    groups: &'a PageGroups,
    budget: &'a Arc<Semaphore>,
}

/// Why a message's handling stopped the link.
enum Stop {
    /// The agent broke the protocol: the link is closed with this status.
    Protocol(Status),
    /// The agent is gone (its outbound side closed).
    Gone,
}

impl From<Status> for Stop {
    fn from(s: Status) -> Self {
        Stop::Protocol(s)
    }
}

/// Handles inbound messages until the agent closes the link or breaks the protocol.
async fn reader(
    state: &State,
    inbound: &mut Streaming<LinkUp>,
    link: &Link<'_>,
    done: &mpsc::Sender<(LinkDown, OwnedSemaphorePermit)>,
    out: &mpsc::Sender<Outgoing>,
) {
    let mut replies = Replies::new(done, link.budget, &state.metrics);
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "ATS link stream ended with an error");
                return;
            }
        };
        let start = Instant::now();
        match handle(state, msg, link, &mut replies).await {
            Ok(()) => {}
            Err(Stop::Gone) => return,
            Err(Stop::Protocol(status)) => {
                state.metrics.refused(Refusal::LinkProtocol);
                if let Some(suppressed) = PROTOCOL_ERRORS.check() {
                    tracing::warn!(error = %status.message(), suppressed, "ATS link protocol error; closing the link");
                }
                let _ = out.send((Err(status), None)).await;
                return;
            }
        }
        state.metrics.batch_duration.record(start.elapsed().as_secs_f64());
    }
}

/// The replies to inbound messages, cut into outbound messages under
/// [`MAX_LINK_MESSAGE_BYTES`], each holding the reply budget its items took.
struct Replies<'a> {
    done: &'a mpsc::Sender<(LinkDown, OwnedSemaphorePermit)>,
    budget: &'a Arc<Semaphore>,
    metrics: &'a Metrics,
    msg: LinkDown,
    /// Encoded size bound of `msg`'s items.
    bytes: usize,
    /// Budget taken for `msg` and not yet used (`spare`).
    held: Option<OwnedSemaphorePermit>,
    spare: usize,
}

impl<'a> Replies<'a> {
    fn new(
        done: &'a mpsc::Sender<(LinkDown, OwnedSemaphorePermit)>,
        budget: &'a Arc<Semaphore>,
        metrics: &'a Metrics,
    ) -> Self {
        Self { done, budget, metrics, msg: LinkDown::default(), bytes: 0, held: None, spare: 0 }
    }

    /// Makes room for one reply item of at most `n` encoded bytes, before it is produced:
    /// sends the message so far if the item would not fit in it, and takes the item's
    /// reply budget, waiting while the link's budget is spent (the agent is not reading).
    async fn reserve(&mut self, n: usize) -> Result<(), Stop> {
        if self.bytes + n > MAX_REPLY_ITEM_BYTES {
            self.flush().await?;
        }
        if self.spare < n {
            let want = (n - self.spare).max(BUDGET_CHUNK_BYTES);
            let permit = match self.budget.clone().try_acquire_many_owned(permits(want)) {
                Ok(p) => p,
                Err(TryAcquireError::NoPermits) => {
                    self.metrics.reply_budget_waits.increment(1);
                    // What is built goes out first: budget comes back only as the
                    // transport takes messages.
                    self.flush().await?;
                    let want = n.max(BUDGET_CHUNK_BYTES);
                    let p = self.budget.clone().acquire_many_owned(permits(want)).await.map_err(|_| Stop::Gone)?;
                    self.spare = 0;
                    p
                }
                Err(TryAcquireError::Closed) => return Err(Stop::Gone),
            };
            self.spare += permit.num_permits();
            match &mut self.held {
                Some(held) => held.merge(permit),
                None => self.held = Some(permit),
            }
        }
        self.spare -= n;
        self.bytes += n;
        Ok(())
    }

    /// Sends the message built so far, with its budget, if it has items.
    async fn flush(&mut self) -> Result<(), Stop> {
        if self.bytes == 0 {
            return Ok(());
        }
        let msg = std::mem::take(&mut self.msg);
        self.bytes = 0;
        self.spare = 0;
        let Some(budget) = self.held.take() else { return Ok(()) };
        self.done.send((msg, budget)).await.map_err(|_| Stop::Gone)
    }
}

/// A byte count as semaphore permits (byte counts here are far below `u32::MAX`).
fn permits(bytes: usize) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// A requester id from an inbound item, and its unit: it must be one this link bound.
fn bound_sid(bound: &Bound, raw: u32) -> Result<(SourceId, &Unit), Status> {
    let sid = wire::source_id(raw)?;
    match bound.get(&sid) {
        Some(unit) => Ok((sid, unit)),
        None => Err(Status::failed_precondition(format!("requester id {sid} is not bound on this link"))),
    }
}

/// Handles one inbound message, queueing its replies.
async fn handle(state: &State, msg: LinkUp, link: &Link<'_>, replies: &mut Replies<'_>) -> Result<(), Stop> {
    if msg.bind.is_some() {
        return Err(Status::failed_precondition("functions are bound once, in the first message").into());
    }
    let items = msg.invalidation_completions.len()
        + msg.translations.len()
        + msg.dma.len()
        + msg.msi.len()
        + msg.page_requests.len();
    if items > MAX_ITEMS_PER_MESSAGE {
        return Err(Status::resource_exhausted(format!(
            "{items} items in one link message; at most {MAX_ITEMS_PER_MESSAGE}"
        ))
        .into());
    }
    let bound = link.bound;
    let m = &state.metrics;
    for c in &msg.invalidation_completions {
        let (sid, unit) = bound_sid(bound, c.source_id)?;
        let itag = wire::itag(c.itag)?;
        // An unexpected completion sets ICE in the unit; that is the device's error to
        // report, not the link's.
        let _ = unit.device_tlb_completed(sid, itag);
    }
    m.link_invalidations.increment(msg.invalidation_completions.len() as u64);
    for t in &msg.translations {
        let (sid, unit) = bound_sid(bound, t.source_id)?;
        replies.reserve(wire::reply_bytes(0)).await?;
        replies
            .msg
            .completions
            .push(wire::translation_completion(t, unit.ats_translate(sid, Iova(t.address), t.no_write)));
    }
    m.link_translations.increment(msg.translations.len() as u64);
    state.link_translations.fetch_add(msg.translations.len() as u64, Ordering::Relaxed);
    for d in &msg.dma {
        let (sid, unit) = bound_sid(bound, d.source_id)?;
        let mut done =
            DmaCompletion { tag: d.tag, source_id: d.source_id, ok: false, fault_reason: 0, data: Vec::new() };
        let result = if d.write {
            if d.data.len() > MAX_DMA_BYTES {
                return Err(Status::invalid_argument(format!(
                    "DMA write of {} bytes; at most {MAX_DMA_BYTES}",
                    d.data.len()
                ))
                .into());
            }
            replies.reserve(wire::reply_bytes(0)).await?;
            if d.translated {
                unit.translated_write(sid, Hpa(d.address), &d.data)
            } else {
                unit.dma_write(sid, Iova(d.address), &d.data)
            }
        } else {
            let len = d.length as usize;
            if len > MAX_DMA_BYTES {
                return Err(
                    Status::invalid_argument(format!("DMA read of {len} bytes; at most {MAX_DMA_BYTES}")).into()
                );
            }
            // The data's budget is taken before the buffer exists.
            replies.reserve(wire::reply_bytes(len)).await?;
            let mut buf = vec![0u8; len];
            let r = if d.translated {
                unit.translated_read(sid, Hpa(d.address), &mut buf)
            } else {
                unit.dma_read(sid, Iova(d.address), &mut buf)
            };
            if r.is_ok() {
                done.data = buf;
            }
            r
        };
        match result {
            Ok(()) => done.ok = true,
            Err(e) => done.fault_reason = wire::dma_fault_code(&e),
        }
        replies.msg.dma.push(done);
    }
    m.link_dma.increment(msg.dma.len() as u64);
    for w in &msg.msi {
        let (sid, unit) = bound_sid(bound, w.source_id)?;
        match unit.msi_write(sid, w.address, w.data) {
            Ok(_) => m.irq_remapped.increment(1),
            Err(_) => m.irq_blocked.increment(1),
        }
    }
    m.link_msi.increment(msg.msi.len() as u64);
    for p in &msg.page_requests {
        let (sid, unit) = bound_sid(bound, p.source_id)?;
        let request = wire::page_request(sid, p)?;
        if !link.groups.admit(sid, request.prgi) {
            // Past the function's capacity (PCIe 10.4.1). A last request gets Response
            // Failure for its group so that the function stops instead of waiting; the
            // group is answered with it.
            m.refused(Refusal::PageRequestCapacity);
            if let Some(suppressed) = OVER_CAPACITY.check() {
                tracing::warn!(%sid, suppressed, "page request past the function's capacity refused");
            }
            if p.last {
                link.groups.answered(sid, request.prgi);
                replies.reserve(wire::reply_bytes(0)).await?;
                replies.msg.page_responses.push(wire::refused_page_group(p));
            }
            continue;
        }
        match unit.page_request(request) {
            Ok(PageRequestOutcome::Queued) => m.prq_queued.increment(1),
            Ok(PageRequestOutcome::Dropped) => m.prq_overflow.increment(1),
            Err(e) => {
                // The function may not use PRI: answer the group with a response failure so
                // it stops, rather than leaving it waiting.
                tracing::debug!(error = %e, "page request refused");
                if p.last {
                    link.groups.answered(sid, request.prgi);
                    replies.reserve(wire::reply_bytes(0)).await?;
                    replies.msg.page_responses.push(wire::refused_page_group(p));
                }
            }
        }
    }
    m.link_page_requests.increment(msg.page_requests.len() as u64);
    replies.flush().await
}
