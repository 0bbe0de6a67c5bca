//! The ATS link service: one long-lived bidirectional stream per device agent (PCIe side).
//!
//! Owns the link protocol: the bind that must come first (each requester id bound by one
//! live link only), the batched requests that follow (translation requests, DMA, MSI
//! writes, page requests, invalidation completions), and the server-pushed traffic
//! (invalidation requests, page group responses).
//!
//! Shape, per link:
//! - a reader task handles each inbound message in order: invalidation completions first,
//!   then translations, DMA, MSI writes and page requests, answering them in one outbound
//!   message; it waits on a bounded channel, so a slow agent slows only its own link;
//! - a writer task merges what goes out, invalidation requests first (they never queue
//!   behind translation traffic), then page responses, then completions;
//! - device ports (one per function, registered with the unit) push invalidations and
//!   page responses into bounded channels sized so that they can never be full: a
//!   function has at most its invalidate queue depth of ITags outstanding.
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

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use dmar_proto::v1::ats_link_server::AtsLink;
use dmar_proto::v1::{DmaCompletion, InvalidationRequest, LinkDown, LinkUp, PageGroupResponse as WirePageResponse};
use dmar_vtd::ats::{MAX_FUNCTIONS_PER_LINK, MAX_ITEMS_PER_MESSAGE};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::wire::{self, MAX_DMA_BYTES};
use super::{State, auth, status};
use dmar_vtd::ids::{Hpa, Iova, SourceId};
use dmar_vtd::unit::{DeviceInvalidation, DevicePort, PageRequestOutcome, PageResponse};

/// Outbound messages buffered per link before the reader waits.
const OUTBOUND_DEPTH: usize = 16;

/// The unit's handle on one bound function.
#[derive(Debug)]
struct LinkPort {
    invalidations: mpsc::Sender<InvalidationRequest>,
    responses: mpsc::Sender<WirePageResponse>,
}

impl DevicePort for LinkPort {
    fn invalidate(&self, r: DeviceInvalidation) {
        let msg = wire::invalidation_request(&r);
        // Sized for every function's full ITag budget: full means the link is gone.
        if self.invalidations.try_send(msg).is_err() {
            tracing::debug!(sid = %r.sid, "invalidation for a closed link dropped; unbinding completes it");
        }
    }

    fn page_response(&self, r: PageResponse) {
        let msg = wire::page_group_response(&r);
        if self.responses.try_send(msg).is_err() {
            tracing::warn!(sid = %r.sid, prgi = r.prgi, "page group response dropped: link closed or over its PRI capacity");
        }
    }
}

/// The gRPC face of the ATS link.
#[derive(Debug, Clone)]
pub(crate) struct LinkService {
    pub(crate) state: Arc<State>,
}

#[tonic::async_trait]
impl AtsLink for LinkService {
    type OpenStream = ReceiverStream<Result<LinkDown, Status>>;

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
            itag_budget += usize::from(depth);
            pri_budget += wire::outstanding_page_groups(f);
            sids.push((sid, depth));
        }
        // The caller's ranges, requester-id ownership and max_links; held until the link ends.
        let claim = self.state.access.claim_link(&caller, sids.iter().map(|(s, _)| *s))?;
        let (inv_tx, inv_rx) = mpsc::channel(itag_budget + 1);
        let (resp_tx, resp_rx) = mpsc::channel(pri_budget + 16);
        let port = Arc::new(LinkPort { invalidations: inv_tx, responses: resp_tx });
        let unit = self.state.unit.clone();
        for (i, (sid, depth)) in sids.iter().enumerate() {
            if let Err(e) = unit.bind_device_port(*sid, port.clone(), *depth) {
                for (bound, _) in &sids[..i] {
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
        tracing::info!(agent = %bind.agent, functions = sids.len(), "ATS link bound");

        let (out_tx, out_rx) = mpsc::channel(OUTBOUND_DEPTH);
        let bound_order: Vec<SourceId> = sids.iter().map(|(s, _)| *s).collect();
        let bound = LinkDown { bound: Some(wire::bound(&bound_order)), ..Default::default() };
        out_tx.send(Ok(bound)).await.map_err(|_| Status::cancelled("link closed during bind"))?;
        let (done_tx, done_rx) = mpsc::channel(OUTBOUND_DEPTH);
        let bound_sids: HashSet<SourceId> = bound_order.into_iter().collect();
        let tracker = state.tasks.clone();
        let shutdown = state.shutdown.clone();
        tracker.spawn(writer(inv_rx, resp_rx, done_rx, out_tx.clone()));
        tracker.spawn(async move {
            tokio::select! {
                () = reader(&state, &mut inbound, &bound_sids, &done_tx, &out_tx) => {}
                () = shutdown.cancelled() => {
                    let _ = out_tx.send(Err(Status::unavailable("server shutting down"))).await;
                }
            }
            for sid in &bound_sids {
                state.unit.unbind_device_port(*sid);
            }
            drop(claim);
            state.links.fetch_sub(1, Ordering::Relaxed);
            state.bound_functions.fetch_sub(bound_sids.len() as u64, Ordering::Relaxed);
            state.metrics.connections.decrement(1.0);
            state.metrics.bound_functions.decrement(bound_sids.len() as f64);
            tracing::info!(agent = %bind.agent, "ATS link closed; its functions are unbound");
        });
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }
}

/// Merges outbound traffic, invalidations first.
async fn writer(
    mut invalidations: mpsc::Receiver<InvalidationRequest>,
    mut responses: mpsc::Receiver<WirePageResponse>,
    mut completions: mpsc::Receiver<LinkDown>,
    out: mpsc::Sender<Result<LinkDown, Status>>,
) {
    loop {
        let msg = tokio::select! {
            biased;
            Some(first) = invalidations.recv() => {
                let mut m = LinkDown { invalidations: vec![first], ..Default::default() };
                while let Ok(more) = invalidations.try_recv() {
                    m.invalidations.push(more);
                }
                m
            }
            Some(first) = responses.recv() => {
                let mut m = LinkDown { page_responses: vec![first], ..Default::default() };
                while let Ok(more) = responses.try_recv() {
                    m.page_responses.push(more);
                }
                m
            }
            next = completions.recv() => match next {
                Some(m) => m,
                None => return, // the reader is done
            },
        };
        if out.send(Ok(msg)).await.is_err() {
            return; // the agent is gone
        }
    }
}

/// Handles inbound messages until the agent closes the link or breaks the protocol.
async fn reader(
    state: &State,
    inbound: &mut Streaming<LinkUp>,
    bound: &HashSet<SourceId>,
    done: &mpsc::Sender<LinkDown>,
    out: &mpsc::Sender<Result<LinkDown, Status>>,
) {
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
        match handle(state, msg, bound) {
            Ok(Some(reply)) => {
                if done.send(reply).await.is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(status) => {
                tracing::warn!(error = %status.message(), "ATS link protocol error; closing the link");
                let _ = out.send(Err(status)).await;
                return;
            }
        }
        state.metrics.batch_duration.record(start.elapsed().as_secs_f64());
    }
}

/// A requester id from an inbound item: it must be one this link bound.
fn bound_sid(bound: &HashSet<SourceId>, raw: u32) -> Result<SourceId, Status> {
    let sid = wire::source_id(raw)?;
    if bound.contains(&sid) {
        Ok(sid)
    } else {
        Err(Status::failed_precondition(format!("requester id {sid} is not bound on this link")))
    }
}

/// Handles one inbound message; returns the reply, if any.
fn handle(state: &State, msg: LinkUp, bound: &HashSet<SourceId>) -> Result<Option<LinkDown>, Status> {
    if msg.bind.is_some() {
        return Err(Status::failed_precondition("functions are bound once, in the first message"));
    }
    let items = msg.invalidation_completions.len()
        + msg.translations.len()
        + msg.dma.len()
        + msg.msi.len()
        + msg.page_requests.len();
    if items > MAX_ITEMS_PER_MESSAGE {
        return Err(Status::resource_exhausted(format!(
            "{items} items in one link message; at most {MAX_ITEMS_PER_MESSAGE}"
        )));
    }
    let unit = &state.unit;
    let m = &state.metrics;
    for c in &msg.invalidation_completions {
        let sid = bound_sid(bound, c.source_id)?;
        let itag = wire::itag(c.itag)?;
        // An unexpected completion sets ICE in the unit; that is the device's error to
        // report, not the link's.
        let _ = unit.device_tlb_completed(sid, itag);
    }
    m.link_invalidations.increment(msg.invalidation_completions.len() as u64);
    let mut reply = LinkDown::default();
    reply.completions.reserve(msg.translations.len());
    for t in &msg.translations {
        let sid = bound_sid(bound, t.source_id)?;
        reply.completions.push(wire::translation_completion(t, unit.ats_translate(sid, Iova(t.address), t.no_write)));
    }
    m.link_translations.increment(msg.translations.len() as u64);
    state.link_translations.fetch_add(msg.translations.len() as u64, Ordering::Relaxed);
    for d in &msg.dma {
        let sid = bound_sid(bound, d.source_id)?;
        let mut done =
            DmaCompletion { tag: d.tag, source_id: d.source_id, ok: false, fault_reason: 0, data: Vec::new() };
        let result = if d.write {
            if d.data.len() > MAX_DMA_BYTES {
                return Err(Status::invalid_argument(format!(
                    "DMA write of {} bytes; at most {MAX_DMA_BYTES}",
                    d.data.len()
                )));
            }
            if d.translated {
                unit.translated_write(sid, Hpa(d.address), &d.data)
            } else {
                unit.dma_write(sid, Iova(d.address), &d.data)
            }
        } else {
            let len = d.length as usize;
            if len > MAX_DMA_BYTES {
                return Err(Status::invalid_argument(format!("DMA read of {len} bytes; at most {MAX_DMA_BYTES}")));
            }
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
        reply.dma.push(done);
    }
    m.link_dma.increment(msg.dma.len() as u64);
    for w in &msg.msi {
        let sid = bound_sid(bound, w.source_id)?;
        match unit.msi_write(sid, w.address, w.data) {
            Ok(_) => m.irq_remapped.increment(1),
            Err(_) => m.irq_blocked.increment(1),
        }
    }
    m.link_msi.increment(msg.msi.len() as u64);
    for p in &msg.page_requests {
        let sid = bound_sid(bound, p.source_id)?;
        match unit.page_request(wire::page_request(sid, p)?) {
            Ok(PageRequestOutcome::Queued) => m.prq_queued.increment(1),
            Ok(PageRequestOutcome::Dropped) => m.prq_overflow.increment(1),
            Err(e) => {
                // The function may not use PRI: answer the group with a response failure so
                // it stops, rather than leaving it waiting.
                tracing::debug!(error = %e, "page request refused");
                if p.last {
                    reply.page_responses.push(wire::refused_page_group(p));
                }
            }
        }
    }
    m.link_page_requests.increment(msg.page_requests.len() as u64);
    let empty = reply.completions.is_empty() && reply.dma.is_empty() && reply.page_responses.is_empty();
    Ok(if empty { None } else { Some(reply) })
}
