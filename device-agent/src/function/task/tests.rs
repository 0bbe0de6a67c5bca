//! The task itself, run on a runtime with its real channels and a link end the test reads:
//! one batch per turn, stamped with its connection; invalidation completions on the
//! priority path; answers to handles; shutdown. What the machine decides is tested in
//! `machine/tests.rs`.

use std::time::Duration;

use dmar_proto::v1::{CompletionStatus, InvalidationRequest, TranslationCompletion, TranslationEntry};

use super::*;
use crate::function::{AccessError, DmaOutcome, DmaResult, FunctionHandle};
use crate::link::{PrioItem, UpItem};
use crate::metrics;

/// A bound on waiting for what must happen (never a measurement).
const PATIENCE: Duration = Duration::from_secs(10);

struct Rig {
    handle: FunctionHandle,
    inbox: mpsc::UnboundedSender<Inbound>,
    up: mpsc::UnboundedReceiver<UpItem>,
    prio: mpsc::UnboundedReceiver<PrioItem>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    sid: u32,
}

fn start() -> Rig {
    let config = Arc::new(FunctionConfig::new(dmar_vtd::SourceId::new(0, 1, 0)));
    let (link, up, prio) = LinkTx::pair_for_tests();
    let (inbox, inbound) = mpsc::unbounded_channel();
    let (commands_tx, commands) = mpsc::channel(16);
    // Never called: no access here is in baseline mode.
    let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
    let task = FunctionTask::new(TaskParts {
        config: config.clone(),
        link,
        control: ControlClient::new(channel),
        inbox: inbox.clone(),
        tasks: TaskTracker::new(),
        metrics: metrics::handles(),
        page_request_timeout: Duration::from_secs(5),
    });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(task.run(inbound, commands, shutdown.clone()));
    inbox.send(Inbound::Connected { generation: 1 }).expect("inbox");
    let sid = u32::from(config.sid.0);
    Rig { handle: FunctionHandle::new(config, commands_tx), inbox, up, prio, shutdown, task, sid }
}

impl Rig {
    async fn batch(&mut self) -> UpItem {
        tokio::time::timeout(PATIENCE, self.up.recv()).await.expect("a batch in time").expect("link queue open")
    }

    /// A successful read-only completion translating to `translated`.
    fn complete(&self, tag: u64, translated: u64) {
        let entry =
            TranslationEntry { translated_address: translated, size_shift: 12, read: true, ..Default::default() };
        let c = TranslationCompletion {
            tag,
            source_id: self.sid,
            status: CompletionStatus::Success as i32,
            entry: Some(entry),
        };
        self.inbox.send(Inbound::Down(FunctionDown { completions: vec![c], ..Default::default() })).expect("inbox");
    }

    /// Starts a read of `address` through the handle, answered whenever the task answers.
    fn read_in_background(&self, address: u64) -> tokio::task::JoinHandle<Result<DmaOutcome, AccessError>> {
        let h = self.handle.clone();
        tokio::spawn(async move { h.access(Dma::read(address)).await })
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task).await.expect("stops").expect("join");
    }
}

fn translations(b: &UpItem, sid: u32) -> Vec<u64> {
    b.items
        .iter()
        .map(|u| match u {
            UpKind::Translation(t) if t.source_id == sid => t.tag,
            other => panic!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn a_turn_is_one_batch_and_completions_take_the_priority_path() {
    let mut r = start();
    let h = r.handle.clone();
    let accesses = tokio::spawn(async move {
        h.access_many((0..3).map(|i| Dma::read(0x1000 * (i + 1)).translate_only()).collect()).await
    });
    let b = r.batch().await;
    assert_eq!(b.generation, 1);
    let tags = translations(&b, r.sid);
    assert_eq!(tags.len(), 3, "three misses in one turn, one message");
    for (i, tag) in tags.iter().enumerate() {
        r.complete(*tag, 0x10_0000 * (i as u64 + 1));
    }
    let outcomes = tokio::time::timeout(PATIENCE, accesses).await.expect("answered").expect("join").expect("ok");
    assert_eq!(
        outcomes.iter().map(|o| o.translated).collect::<Vec<_>>(),
        [Some(0x10_0000), Some(0x20_0000), Some(0x30_0000)]
    );
    let i = InvalidationRequest { source_id: r.sid, itag: 7, address: 0x1000 };
    r.inbox.send(Inbound::Down(FunctionDown { invalidations: vec![i], ..Default::default() })).expect("inbox");
    let p = tokio::time::timeout(PATIENCE, r.prio.recv()).await.expect("in time").expect("open");
    assert_eq!((p.generation, p.completion.source_id, p.completion.itag), (1, r.sid, 7));
    assert_eq!(r.handle.snapshot().await.expect("snapshot").atc_entries, 2);
    r.stop().await;
}

#[tokio::test]
async fn requests_queued_before_a_reconnection_keep_the_old_connection_stamp() {
    let mut r = start();
    let access = r.read_in_background(0x1000);
    let tag = translations(&r.batch().await, r.sid)[0];
    // One burst: the completion queues a DMA, then the connection is replaced. The DMA
    // leaves stamped with connection 1, which the link's next writer drops.
    r.complete(tag, 0x9000);
    r.inbox.send(Inbound::Disconnected { generation: 1 }).expect("inbox");
    r.inbox.send(Inbound::Connected { generation: 2 }).expect("inbox");
    let b = r.batch().await;
    assert_eq!(b.generation, 1);
    assert!(matches!(b.items.as_slice(), [UpKind::Dma(d)] if d.translated && d.address == 0x9000));
    let o = tokio::time::timeout(PATIENCE, access).await.expect("answered").expect("join").expect("ok");
    assert_eq!(o.result, DmaResult::LinkDown);
    assert_eq!(r.handle.snapshot().await.expect("snapshot").link_generation, Some(2));
    r.stop().await;
}

#[tokio::test]
async fn shutdown_answers_every_access_still_waiting() {
    let mut r = start();
    let access = r.read_in_background(0x1000);
    r.batch().await;
    let handle = r.handle.clone();
    r.stop().await;
    let o = tokio::time::timeout(PATIENCE, access).await.expect("answered").expect("join").expect("ok");
    assert_eq!(o.result, DmaResult::LinkDown);
    assert!(handle.snapshot().await.is_err(), "the task is gone");
}
