//! The link's writer: drains the functions' outbound queues into one `LinkUp` per batch.
//!
//! Invalidation completions have their own queue and always go first (invalidations never
//! wait behind translation traffic: the link semantics in `docs/ARCHITECTURE.md`); then
//! translation requests, DMA and page requests, in the order the functions queued them, up
//! to the batch limit. Whatever piles up while a message is being sent goes in the next
//! one, so batches grow exactly when the link is busy. The functions queue wire items
//! (converted by `wire` in their own tasks), so this one task, which every function
//! shares, only moves them.

use dmar_proto::v1::LinkUp;
use tokio::sync::mpsc;

use super::{End, PrioItem, UpItem, UpKind};
use crate::metrics::AgentMetrics;

/// Most DMA payload bytes per message: keeps messages well under gRPC's 4 MiB default.
const MAX_PAYLOAD_BYTES: usize = 1 << 20;

struct Batch {
    msg: LinkUp,
    items: usize,
    bytes: usize,
    generation: u64,
    max: usize,
}

/// The rest of a function's requests that did not fit the previous message.
type Carry = Option<std::vec::IntoIter<UpKind>>;

impl Batch {
    fn new(generation: u64, max: usize) -> Self {
        Self { msg: LinkUp::default(), items: 0, bytes: 0, generation, max }
    }

    fn full(&self) -> bool {
        self.items >= self.max || self.bytes >= MAX_PAYLOAD_BYTES
    }

    /// Adds an invalidation completion, unless it belongs to an earlier connection.
    fn completion(&mut self, p: PrioItem) {
        if p.generation == self.generation {
            self.msg.invalidation_completions.push(p.completion);
            self.items += 1;
        }
    }

    fn push(&mut self, kind: UpKind) {
        match kind {
            UpKind::Translation(t) => self.msg.translations.push(t),
            UpKind::Dma(d) => {
                self.bytes += d.data.len();
                self.msg.dma.push(d);
            }
            UpKind::Page(p) => self.msg.page_requests.push(p),
        }
        self.items += 1;
    }

    /// Adds requests from `it` until full; what is left goes to `carry`.
    fn extend(&mut self, mut it: std::vec::IntoIter<UpKind>, carry: &mut Carry) {
        while !self.full() {
            match it.next() {
                Some(k) => self.push(k),
                None => return,
            }
        }
        if it.len() > 0 {
            *carry = Some(it);
        }
    }

    /// Adds a function's requests, unless they belong to an earlier connection (the
    /// function has already failed the accesses they served).
    fn take(&mut self, u: UpItem, carry: &mut Carry) {
        if u.generation == self.generation {
            self.extend(u.items.into_iter(), carry);
        }
    }

    /// Takes whatever else is queued, completions first, without waiting.
    fn fill(
        &mut self,
        prio: &mut mpsc::UnboundedReceiver<PrioItem>,
        up: &mut mpsc::UnboundedReceiver<UpItem>,
        carry: &mut Carry,
    ) {
        while !self.full() {
            match prio.try_recv() {
                Ok(p) => self.completion(p),
                Err(_) => break,
            }
        }
        if let Some(rest) = carry.take() {
            self.extend(rest, carry);
        }
        while !self.full() && carry.is_none() {
            match up.try_recv() {
                Ok(u) => self.take(u, carry),
                Err(_) => break,
            }
        }
    }
}

/// Sends batches on `out` until the connection or the queues close.
pub(super) async fn write_loop(
    up: &mut mpsc::UnboundedReceiver<UpItem>,
    prio: &mut mpsc::UnboundedReceiver<PrioItem>,
    out: &mpsc::Sender<LinkUp>,
    generation: u64,
    max_batch: usize,
    metrics: &AgentMetrics,
) -> End {
    let mut carry: Carry = None;
    loop {
        let mut batch = Batch::new(generation, max_batch);
        if carry.is_none() {
            tokio::select! {
                biased;
                Some(p) = prio.recv() => batch.completion(p),
                Some(u) = up.recv() => batch.take(u, &mut carry),
                else => return End::Shutdown,
            }
        }
        batch.fill(prio, up, &mut carry);
        if batch.items == 0 {
            continue;
        }
        let items = batch.items;
        if out.send(batch.msg).await.is_err() {
            return End::Closed;
        }
        metrics.link_messages_up.increment(1);
        metrics.link_batch_items.record(items as f64);
    }
}

#[cfg(test)]
mod tests {
    use dmar_proto::v1::{InvalidationCompletion, TranslationRequest};

    use super::*;

    fn t(generation: u64, tags: std::ops::Range<u64>) -> UpItem {
        let items = tags
            .map(|tag| UpKind::Translation(TranslationRequest { tag, source_id: 8, address: 0, no_write: true }))
            .collect();
        UpItem { generation, items }
    }

    #[tokio::test]
    async fn batches_put_completions_first_and_drop_stale_items() {
        let (up_tx, mut up) = mpsc::unbounded_channel();
        let (prio_tx, mut prio) = mpsc::unbounded_channel();
        let (out, mut rx) = mpsc::channel(4);
        up_tx.send(t(2, 0..4)).expect("queue");
        up_tx.send(t(1, 99..100)).expect("queue");
        up_tx.send(t(2, 4..5)).expect("queue");
        prio_tx
            .send(PrioItem { generation: 2, completion: InvalidationCompletion { source_id: 8, itag: 3 } })
            .expect("queue");
        prio_tx
            .send(PrioItem { generation: 1, completion: InvalidationCompletion { source_id: 8, itag: 4 } })
            .expect("queue");
        let metrics = crate::metrics::handles();
        let writer = tokio::spawn(async move { write_loop(&mut up, &mut prio, &out, 2, 3, &metrics).await });
        let first = rx.recv().await.expect("a batch");
        assert_eq!(first.invalidation_completions.len(), 1);
        assert_eq!(first.invalidation_completions[0].itag, 3);
        assert_eq!(first.translations.len(), 2, "the batch limit counts every item");
        let second = rx.recv().await.expect("a batch");
        assert_eq!(second.translations.iter().map(|t| t.tag).collect::<Vec<_>>(), [2, 3, 4]);
        drop(up_tx);
        drop(prio_tx);
        let third = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await.expect("ends").expect("join");
        assert!(matches!(third, End::Shutdown));
        assert!(rx.try_recv().is_err(), "the stale request never goes out");
    }
}
