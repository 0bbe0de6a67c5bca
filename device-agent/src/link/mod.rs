//! The agent's end of the ATS link: one long-lived bidirectional stream to the server
//! carrying every function's traffic.
//!
//! Owns connecting, binding the functions (the first message), reconnecting with
//! exponential back-off, and moving messages: the writer (`writer`) batches what the
//! functions queue; the reader routes what the server sends to the functions by requester
//! id, one batch per function per message. Neither ever waits on a function: the
//! functions' inboxes are unbounded, and what can be in them is bounded by the protocol
//! (completions answer requests the function itself sent; invalidations are bounded by
//! its invalidate queue depth). So the reader keeps servicing the link whatever a
//! function is waiting for, the rule that keeps vhost-user-style deadlocks out.
//!
//! Every connection has a generation number. A function learns it from the `Connected`
//! event and stamps what it queues with it; the writer drops anything stamped with an
//! older one, because the function has already failed the accesses behind it on the
//! `Disconnected` event. The link moves wire messages and converts nothing: each
//! function's task converts its own traffic (`wire`), so the work that grows with the
//! traffic stays spread over the functions. Not here: what a function does with its
//! traffic (`function`).

mod backoff;
mod writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dmar_proto::v1::ats_link_client::AtsLinkClient;
use dmar_proto::v1::{
    DmaCompletion, DmaRequest, InvalidationCompletion, InvalidationRequest, LinkDown, LinkUp, PageGroupResponse,
    PageRequest, TranslationCompletion, TranslationRequest,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::Endpoint;

use self::backoff::Backoff;
use crate::config::AgentConfig;
use crate::function::Inbound;
use crate::metrics::AgentMetrics;
use crate::wire;

/// Outbound messages buffered towards gRPC before the writer waits.
const OUTBOUND_DEPTH: usize = 32;
/// Largest message accepted from the server (DMA read data rides in completions).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The state of the link, as the functions and the control service see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LinkState {
    /// Bound now.
    pub connected: bool,
    /// Successful binds so far; while connected, the number of the current connection.
    pub generation: u64,
}

/// A request a function queues for the server, in its wire form.
#[derive(Debug)]
pub(crate) enum UpKind {
    Translation(TranslationRequest),
    Dma(DmaRequest),
    Page(PageRequest),
}

/// Requests a function queued in one turn of its loop, stamped with the connection they
/// were meant for (one channel operation per turn, not per request).
#[derive(Debug)]
pub(crate) struct UpItem {
    pub(crate) generation: u64,
    pub(crate) items: Vec<UpKind>,
}

/// An invalidation completion stamped with its connection.
#[derive(Debug)]
pub(crate) struct PrioItem {
    pub(crate) generation: u64,
    pub(crate) completion: InvalidationCompletion,
}

/// What the server sent for one function in one link message, as it came.
#[derive(Debug, Default)]
pub(crate) struct FunctionDown {
    pub(crate) invalidations: Vec<InvalidationRequest>,
    pub(crate) completions: Vec<TranslationCompletion>,
    pub(crate) dma: Vec<DmaCompletion>,
    pub(crate) page_responses: Vec<PageGroupResponse>,
}

impl FunctionDown {
    fn is_empty(&self) -> bool {
        self.invalidations.is_empty()
            && self.completions.is_empty()
            && self.dma.is_empty()
            && self.page_responses.is_empty()
    }
}

/// The functions' side of the link's queues.
#[derive(Debug, Clone)]
pub(crate) struct LinkTx {
    up: mpsc::UnboundedSender<UpItem>,
    prio: mpsc::UnboundedSender<PrioItem>,
}

impl LinkTx {
    /// Queues a function's requests; false if the link task is gone (the agent is stopping).
    pub(crate) fn send(&self, generation: u64, items: Vec<UpKind>) -> bool {
        self.up.send(UpItem { generation, items }).is_ok()
    }

    /// A link end whose queues a test reads directly.
    #[cfg(test)]
    pub(crate) fn pair_for_tests() -> (LinkTx, mpsc::UnboundedReceiver<UpItem>, mpsc::UnboundedReceiver<PrioItem>) {
        let (up, up_rx) = mpsc::unbounded_channel();
        let (prio, prio_rx) = mpsc::unbounded_channel();
        (LinkTx { up, prio }, up_rx, prio_rx)
    }

    /// Queues an invalidation completion on the priority path; false if the link task is
    /// gone.
    pub(crate) fn complete(&self, generation: u64, completion: InvalidationCompletion) -> bool {
        self.prio.send(PrioItem { generation, completion }).is_ok()
    }
}

/// Why a connection ended or could not be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    #[error("cannot connect")]
    Transport(#[from] tonic::transport::Error),
    #[error("server refused the link: {}", .0.message())]
    Status(#[from] tonic::Status),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("server closed the link during the bind")]
    Closed,
    #[error("protocol: {0}")]
    Protocol(String),
}

/// The server's endpoint as the configuration describes it: its URL, the connect
/// time-out, and mutual TLS when the security settings hold TLS material. Used by the link
/// and by the baseline's unary calls, so neither can reach the server another way.
pub(crate) fn endpoint(config: &AgentConfig) -> Result<Endpoint, tonic::transport::Error> {
    let endpoint =
        Endpoint::from_shared(config.server_url())?.connect_timeout(config.connect_timeout).tcp_nodelay(true);
    match &config.security.tls {
        Some(tls) => endpoint.tls_config(tls.client_config()),
        None => Ok(endpoint),
    }
}

/// How a live connection ended.
#[derive(Debug)]
pub(super) enum End {
    /// The server closed the stream.
    Closed,
    /// The stream failed.
    Status(tonic::Status),
    /// The agent is stopping.
    Shutdown,
}

/// Routes a function's inbound batches by requester id.
#[derive(Debug)]
struct Router {
    inboxes: Vec<mpsc::UnboundedSender<Inbound>>,
    index: HashMap<u32, usize>,
    scratch: Vec<FunctionDown>,
    touched: Vec<usize>,
}

impl Router {
    fn slot(&mut self, sid: u32) -> Option<&mut FunctionDown> {
        let Some(&i) = self.index.get(&sid) else {
            tracing::debug!(sid, "link message for a function this agent does not host");
            return None;
        };
        if self.scratch[i].is_empty() {
            self.touched.push(i);
        }
        Some(&mut self.scratch[i])
    }

    /// Adds each of `items` to the batch of the function its requester id (`sid`) names.
    #[inline]
    fn spread<T>(&mut self, items: Vec<T>, sid: impl Fn(&T) -> u32, list: impl Fn(&mut FunctionDown) -> &mut Vec<T>) {
        for x in items {
            if let Some(d) = self.slot(sid(&x)) {
                list(d).push(x);
            }
        }
    }

    fn route(&mut self, m: LinkDown) {
        self.spread(m.invalidations, |x| x.source_id, |d| &mut d.invalidations);
        self.spread(m.completions, |x| x.source_id, |d| &mut d.completions);
        self.spread(m.dma, |x| x.source_id, |d| &mut d.dma);
        self.spread(m.page_responses, |x| x.source_id, |d| &mut d.page_responses);
        for i in self.touched.drain(..) {
            let batch = std::mem::take(&mut self.scratch[i]);
            // A closed inbox means the function task has stopped (shutdown).
            let _ = self.inboxes[i].send(Inbound::Down(batch));
        }
    }

    fn broadcast(&self, event: impl Fn() -> Inbound) {
        for inbox in &self.inboxes {
            let _ = inbox.send(event());
        }
    }
}

/// The link task: connects, binds, serves, reconnects.
#[derive(Debug)]
pub(crate) struct Link {
    config: Arc<AgentConfig>,
    /// The functions' requester ids, in the configuration's order.
    sids: Vec<u32>,
    router: Router,
    up: mpsc::UnboundedReceiver<UpItem>,
    prio: mpsc::UnboundedReceiver<PrioItem>,
    state: watch::Sender<LinkState>,
    metrics: AgentMetrics,
}

impl Link {
    /// Builds the link for `config`'s functions; `inboxes` are theirs, in the same order.
    pub(crate) fn new(
        config: Arc<AgentConfig>,
        inboxes: Vec<mpsc::UnboundedSender<Inbound>>,
        metrics: AgentMetrics,
    ) -> (Link, LinkTx, watch::Receiver<LinkState>) {
        let (up_tx, up) = mpsc::unbounded_channel();
        let (prio_tx, prio) = mpsc::unbounded_channel();
        let (state, state_rx) = watch::channel(LinkState::default());
        let sids: Vec<u32> = config.functions.iter().map(|f| u32::from(f.sid.0)).collect();
        let index = sids.iter().enumerate().map(|(i, sid)| (*sid, i)).collect();
        let scratch = (0..inboxes.len()).map(|_| FunctionDown::default()).collect();
        let router = Router { inboxes, index, scratch, touched: Vec::new() };
        let link = Link { config, sids, router, up, prio, state, metrics };
        (link, LinkTx { up: up_tx, prio: prio_tx }, state_rx)
    }

    /// Runs until `shutdown`.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let seed = std::process::id() as u64 ^ self.sids.first().map_or(0, |sid| u64::from(*sid) << 32);
        let mut backoff = Backoff::new(self.config.reconnect_initial, self.config.reconnect_max, seed);
        let mut generation = 0u64;
        let url = self.config.server_url();
        loop {
            let attempt = tokio::select! {
                () = shutdown.cancelled() => break,
                r = self.connect() => r,
            };
            match attempt {
                Ok((out, inbound)) => {
                    generation += 1;
                    backoff.reset();
                    self.router.broadcast(|| Inbound::Connected { generation });
                    self.state.send_replace(LinkState { connected: true, generation });
                    self.metrics.link_up.increment(1.0);
                    self.metrics.link_connections.increment(1);
                    tracing::info!(server = %url, generation, functions = self.sids.len(), "ATS link bound");
                    let end = self.serve(out, inbound, generation, &shutdown).await;
                    self.router.broadcast(|| Inbound::Disconnected { generation });
                    self.state.send_replace(LinkState { connected: false, generation });
                    self.metrics.link_up.decrement(1.0);
                    match end {
                        End::Shutdown => break,
                        End::Closed => tracing::warn!(server = %url, "ATS link closed by the server; reconnecting"),
                        End::Status(s) => {
                            tracing::warn!(server = %url, error = %s.message(), code = ?s.code(), "ATS link failed; reconnecting")
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(server = %url, error = %dmar_process::error_chain(&e), "ATS link not established")
                }
            }
            let delay = backoff.next_delay();
            tracing::debug!(?delay, "next ATS link attempt");
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        tracing::info!("ATS link stopped");
    }

    /// Connects and binds; returns the outbound queue and the inbound stream.
    async fn connect(&self) -> Result<(mpsc::Sender<LinkUp>, Streaming<LinkDown>), LinkError> {
        let t = self.config.connect_timeout;
        let endpoint = endpoint(&self.config)?
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        let channel = tokio::time::timeout(t, endpoint.connect()).await.map_err(|_| LinkError::Timeout(t))??;
        let mut client = AtsLinkClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (out, rx) = mpsc::channel(OUTBOUND_DEPTH);
        // The server reads the bind before it answers the call, so it must be queued first.
        out.send(wire::bind(&self.config)).await.map_err(|_| LinkError::Closed)?;
        let response = tokio::time::timeout(t, client.open(ReceiverStream::new(rx)))
            .await
            .map_err(|_| LinkError::Timeout(t))??;
        let mut inbound = response.into_inner();
        let first = tokio::time::timeout(t, inbound.message()).await.map_err(|_| LinkError::Timeout(t))??;
        let mut got = wire::bound(first.ok_or(LinkError::Closed)?)
            .ok_or_else(|| LinkError::Protocol("the first message is not the bind's answer".into()))?;
        got.sort_unstable();
        let mut want = self.sids.clone();
        want.sort_unstable();
        if got != want {
            return Err(LinkError::Protocol(format!("bound {got:?}, asked for {want:?}")));
        }
        Ok((out, inbound))
    }

    /// Serves one connection until it ends.
    async fn serve(
        &mut self,
        out: mpsc::Sender<LinkUp>,
        mut inbound: Streaming<LinkDown>,
        generation: u64,
        shutdown: &CancellationToken,
    ) -> End {
        let Link { router, up, prio, metrics, config, .. } = self;
        let reader = async {
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => {
                        metrics.link_messages_down.increment(1);
                        router.route(m);
                    }
                    Ok(None) => return End::Closed,
                    Err(s) => return End::Status(s),
                }
            }
        };
        let writer = writer::write_loop(up, prio, &out, generation, config.max_batch, metrics);
        tokio::select! {
            end = reader => end,
            end = writer => end,
            () = shutdown.cancelled() => End::Shutdown,
        }
    }
}
