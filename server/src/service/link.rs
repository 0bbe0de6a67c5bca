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

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use dmar_proto::v1::ats_link_server::AtsLink;
use dmar_proto::v1::{
    Bound, CompletionStatus, DmaCompletion, InvalidationRequest, LinkDown, LinkUp,
    PageGroupResponse as WirePageResponse, TranslationCompletion, TranslationEntry,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::State;
use super::status;
use dmar_vtd::ids::{Hpa, ITag, Iova, SourceId};
use dmar_vtd::unit::prq::PageRequest;
use dmar_vtd::unit::{AtsCompletion, DeviceInvalidation, DevicePort, PageResponse};

/// Most functions one link may bind.
pub const MAX_FUNCTIONS_PER_LINK: usize = 256;
/// Most items (of all kinds) in one inbound message.
pub const MAX_ITEMS_PER_MESSAGE: usize = 4096;
/// Largest DMA payload per request.
pub const MAX_DMA_BYTES: usize = 64 << 10;
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
        let msg = InvalidationRequest { source_id: u32::from(r.sid.0), itag: u32::from(r.itag.0), address: r.addr_s };
        // Sized for every function's full ITag budget: full means the link is gone.
        if self.invalidations.try_send(msg).is_err() {
            tracing::debug!(sid = %r.sid, "invalidation for a closed link dropped; unbinding completes it");
        }
    }

    fn page_response(&self, r: PageResponse) {
        let msg =
            WirePageResponse { source_id: u32::from(r.sid.0), group_index: u32::from(r.prgi), code: i32::from(r.code) };
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
            let sid = status::source_id(f.source_id)?;
            if !seen.insert(sid) {
                return Err(Status::invalid_argument(format!("requester id {sid} appears twice in the bind")));
            }
            if !(1..=32).contains(&f.invalidate_queue_depth) {
                return Err(Status::invalid_argument(format!(
                    "invalidate queue depth {} of {sid} is outside 1..=32",
                    f.invalidate_queue_depth
                )));
            }
            itag_budget += f.invalidate_queue_depth as usize;
            pri_budget += f.page_request_capacity.min(512) as usize;
            sids.push((sid, f.invalidate_queue_depth as u8));
        }
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
        let bound = LinkDown {
            bound: Some(Bound { source_ids: sids.iter().map(|(s, _)| u32::from(s.0)).collect() }),
            ..Default::default()
        };
        out_tx.send(Ok(bound)).await.map_err(|_| Status::cancelled("link closed during bind"))?;
        let (done_tx, done_rx) = mpsc::channel(OUTBOUND_DEPTH);
        let bound_sids: HashSet<SourceId> = sids.iter().map(|(s, _)| *s).collect();
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

fn bound_sid(bound: &HashSet<SourceId>, raw: u32) -> Result<SourceId, Status> {
    let sid = status::source_id(raw)?;
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
        let itag =
            u8::try_from(c.itag).map_err(|_| Status::invalid_argument(format!("ITag {} is out of range", c.itag)))?;
        // An unexpected completion sets ICE in the unit; that is the device's error to
        // report, not the link's.
        let _ = unit.device_tlb_completed(sid, ITag(itag));
    }
    m.link_invalidations.increment(msg.invalidation_completions.len() as u64);
    let mut reply = LinkDown::default();
    reply.completions.reserve(msg.translations.len());
    for t in &msg.translations {
        let sid = bound_sid(bound, t.source_id)?;
        let c = match unit.ats_translate(sid, Iova(t.address), t.no_write) {
            AtsCompletion::Success(e) => TranslationCompletion {
                tag: t.tag,
                source_id: t.source_id,
                status: CompletionStatus::Success as i32,
                entry: Some(TranslationEntry {
                    translated_address: e.translated.0,
                    size_shift: e.size_shift,
                    read: e.read,
                    write: e.write,
                    untranslated_only: e.untranslated_only,
                    exec: e.exec,
                    privileged: e.privileged,
                    global: e.global,
                }),
            },
            AtsCompletion::UnsupportedRequest => TranslationCompletion {
                tag: t.tag,
                source_id: t.source_id,
                status: CompletionStatus::UnsupportedRequest as i32,
                entry: None,
            },
            AtsCompletion::CompleterAbort => TranslationCompletion {
                tag: t.tag,
                source_id: t.source_id,
                status: CompletionStatus::CompleterAbort as i32,
                entry: None,
            },
        };
        reply.completions.push(c);
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
            Err(e) => done.fault_reason = status::dma_fault_code(&e),
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
        let prgi = status::group_index(p.group_index)?;
        let req = PageRequest {
            sid,
            addr: Iova(p.address & !0xfff),
            read: p.read,
            write: p.write,
            prgi,
            last: p.last,
            private_data: None,
        };
        match unit.page_request(req) {
            Ok(dmar_vtd::unit::PageRequestOutcome::Queued) => m.prq_queued.increment(1),
            Ok(dmar_vtd::unit::PageRequestOutcome::Dropped) => m.prq_overflow.increment(1),
            Err(e) => {
                // The function may not use PRI: answer the group with a response failure so
                // it stops, rather than leaving it waiting.
                tracing::debug!(error = %e, "page request refused");
                if p.last {
                    reply.page_responses.push(WirePageResponse {
                        source_id: p.source_id,
                        group_index: p.group_index,
                        code: 0xf,
                    });
                }
            }
        }
    }
    m.link_page_requests.increment(msg.page_requests.len() as u64);
    let empty = reply.completions.is_empty() && reply.dma.is_empty() && reply.page_responses.is_empty();
    Ok(if empty { None } else { Some(reply) })
}
