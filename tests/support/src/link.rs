//! An agent's raw end of an ATS link: the bind, batches sent as they are written, and the
//! server's messages as they arrive. No device TLB and no rules of a function: a test
//! says exactly what crosses the link (dmar-agent is the real device side).

use std::net::SocketAddr;

use dmar_proto::v1::ats_link_client::AtsLinkClient;
use dmar_proto::v1::{
    Bind, DmaCompletion, DmaRequest, Function, InvalidationRequest, LinkDown, LinkUp, TranslationCompletion,
    TranslationRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::PATIENCE;

/// Messages the test may send ahead of the stream (the link bench's window is 32).
const SEND_AHEAD: usize = 64;

/// `source_id` as tests bind it: ATS with an invalidate queue depth of 8, PRI with room for
/// 4 outstanding page requests. Change a field with `Function { .., ..function(sid) }`.
pub fn function(source_id: u32) -> Function {
    Function { source_id, invalidate_queue_depth: 8, page_request_capacity: 4 }
}

/// One ATS link, bound.
#[derive(Debug)]
pub struct Link {
    tx: mpsc::Sender<LinkUp>,
    rx: tonic::Streaming<LinkDown>,
}

impl Link {
    /// Opens a plaintext link to `addr` and binds `functions` as `agent`; the server's
    /// refusal is the error.
    pub async fn open(addr: SocketAddr, agent: &str, functions: Vec<Function>) -> Result<Link, tonic::Status> {
        let channel = Channel::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect");
        Self::open_on(channel, agent, functions).await
    }

    /// [`Link::open`] over `channel` (a TLS channel, or one through a relay).
    pub async fn open_on(channel: Channel, agent: &str, functions: Vec<Function>) -> Result<Link, tonic::Status> {
        let (tx, rx) = mpsc::channel(SEND_AHEAD);
        tx.send(LinkUp { bind: Some(Bind { functions, agent: agent.into() }), ..Default::default() })
            .await
            .expect("send");
        let mut rx = AtsLinkClient::new(channel).open(ReceiverStream::new(rx)).await?.into_inner();
        let first = rx.message().await?.expect("bound");
        assert!(first.bound.is_some(), "the first message answers the bind");
        Ok(Link { tx, rx })
    }

    /// Sends one batch.
    pub async fn send(&self, m: LinkUp) {
        self.tx.send(m).await.expect("send");
    }

    /// The next message as the stream yields it: `None` once the server closed the link,
    /// the status it closed it with, or a message the client could not decode.
    pub async fn message(&mut self) -> Result<Option<LinkDown>, tonic::Status> {
        self.rx.message().await
    }

    /// The next message, which must arrive (bounded by [`PATIENCE`]) and decode.
    pub async fn next(&mut self) -> LinkDown {
        tokio::time::timeout(PATIENCE, self.message())
            .await
            .expect("in time")
            .expect("a message the client can decode")
            .expect("message")
    }

    /// Reads until the server ends the link with a status, and returns it.
    pub async fn closed_with(&mut self) -> tonic::Status {
        loop {
            match self.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("closed without a status"),
                Err(s) => break s,
            }
        }
    }

    /// Asks for one translation of `address` (tagged with the address) and waits for the
    /// first completion.
    pub async fn translate(&mut self, sid: u32, address: u64) -> TranslationCompletion {
        self.send(LinkUp {
            translations: vec![TranslationRequest { tag: address, source_id: sid, address, no_write: false }],
            ..Default::default()
        })
        .await;
        loop {
            if let Some(c) = self.next().await.completions.into_iter().next() {
                return c;
            }
        }
    }

    /// Sends one DMA request and waits for the first DMA completion.
    pub async fn dma(&mut self, request: DmaRequest) -> DmaCompletion {
        self.send(LinkUp { dma: vec![request], ..Default::default() }).await;
        loop {
            if let Some(c) = self.next().await.dma.into_iter().next() {
                return c;
            }
        }
    }

    /// Waits for the next invalidation request.
    pub async fn invalidation(&mut self) -> InvalidationRequest {
        loop {
            if let Some(i) = self.next().await.invalidations.into_iter().next() {
                return i;
            }
        }
    }
}
