//! The function task driven by hand with a fake link: the orderings a real server makes
//! rare (a completion overtaken by an invalidation, PRI time-outs, reused ITags, U and STU
//! completions, a link lost mid-access) made deterministic.

use dmar_proto::v1::TranslationEntry;
use tokio::sync::oneshot;

use super::*;
use crate::link::{PrioItem, UpItem};
use crate::metrics;

struct Rig {
    task: FunctionTask,
    up: mpsc::UnboundedReceiver<UpItem>,
    prio: mpsc::UnboundedReceiver<PrioItem>,
}

fn rig(config: FunctionConfig) -> Rig {
    let (link, up, prio) = LinkTx::pair_for_tests();
    let (inbox, _rx) = mpsc::unbounded_channel();
    let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
    let mut task = FunctionTask::new(TaskParts {
        config: Arc::new(config),
        link,
        control: ControlClient::new(channel),
        inbox,
        tasks: TaskTracker::new(),
        metrics: metrics::handles(),
        page_request_timeout: Duration::from_secs(5),
    });
    task.on_inbound(Inbound::LinkUp { generation: 1 });
    Rig { task, up, prio }
}

fn config() -> FunctionConfig {
    FunctionConfig::new(dmar_vtd::SourceId::new(0, 1, 0))
}

impl Rig {
    fn access(&mut self, access: Access) -> oneshot::Receiver<AccessOutcome> {
        let (tx, rx) = oneshot::channel();
        self.task.on_command(Command::Access { access, reply: tx });
        rx
    }

    /// What the function sent this turn.
    fn sent(&mut self) -> Vec<UpKind> {
        self.task.flush_outbox();
        let mut out = Vec::new();
        while let Ok(u) = self.up.try_recv() {
            out.extend(u.items);
        }
        out
    }

    fn completions(&mut self) -> Vec<u32> {
        let mut out = Vec::new();
        while let Ok(p) = self.prio.try_recv() {
            out.push(p.completion.itag);
        }
        out
    }

    fn down(&mut self, d: FunctionDown) {
        self.task.on_inbound(Inbound::Down(d));
    }

    fn complete(&mut self, tag: u64, entry: TranslationEntry) {
        let c = TranslationCompletion {
            tag,
            source_id: self.task.sid,
            status: CompletionStatus::Success as i32,
            entry: Some(entry),
        };
        self.down(FunctionDown { completions: vec![c], ..Default::default() });
    }

    fn invalidate(&mut self, itag: u32, address: u64) {
        let i = InvalidationRequest { source_id: self.task.sid, itag, address };
        self.down(FunctionDown { invalidations: vec![i], ..Default::default() });
    }
}

fn translation(sent: &[UpKind]) -> TranslationRequest {
    match sent {
        [UpKind::Translation(t)] => *t,
        other => panic!("expected one translation request, got {other:?}"),
    }
}

fn rw(translated: u64, size_shift: u32) -> TranslationEntry {
    TranslationEntry { translated_address: translated, size_shift, read: true, write: true, ..Default::default() }
}

#[tokio::test]
async fn a_completion_overtaken_by_an_invalidation_is_asked_again() {
    let mut r = rig(config());
    let mut done = r.access(Access::read(0x5040).translate_only());
    let first = translation(&r.sent());
    assert_eq!((first.address, first.no_write), (0x5000, true));
    // The server unmapped the page after answering, and its invalidation overtook the
    // completion: nothing is cached or in flight, so it completes at once.
    r.invalidate(3, 0x5000);
    assert_eq!(r.completions(), [3]);
    r.complete(first.tag, rw(0x9000, 12));
    assert!(done.try_recv().is_err(), "the stale translation is not used");
    let second = translation(&r.sent());
    assert_ne!(second.tag, first.tag);
    r.complete(second.tag, rw(0xa000, 12));
    let o = done.try_recv().expect("done");
    assert_eq!((o.result, o.translated), (AccessResult::Ok, Some(0xa040)));
    let c = r.task.snapshot().counters;
    assert_eq!((c.stale_completions, c.translations_requested, c.atc_misses), (1, 2, 1));
}

#[tokio::test]
async fn untranslated_only_entries_send_untranslated_dma() {
    let mut r = rig(config());
    let mut done = r.access(Access::write(0x7000));
    let t = translation(&r.sent());
    r.complete(t.tag, TranslationEntry { untranslated_only: true, ..rw(0, 12) });
    let dma = match r.sent().as_slice() {
        [UpKind::Dma(d)] => d.clone(),
        other => panic!("{other:?}"),
    };
    assert!(!dma.translated && dma.write && dma.address == 0x7000 && dma.data.len() == 64);
    r.down(FunctionDown {
        dma: vec![DmaCompletion { tag: dma.tag, source_id: r.task.sid, ok: true, ..Default::default() }],
        ..Default::default()
    });
    let o = done.try_recv().expect("done");
    assert!(o.untranslated && o.is_ok() && o.translated.is_none());
    // The next access hits the U entry and goes untranslated without asking.
    let _kept = r.access(Access::read(0x7100));
    assert!(matches!(r.sent().as_slice(), [UpKind::Dma(d)] if !d.translated));
    assert_eq!(r.task.snapshot().counters.untranslated_dma, 2);
}

#[tokio::test]
async fn completions_below_the_stu_are_used_but_not_cached() {
    let mut r = rig(FunctionConfig { smallest_translation_unit: 9, ..config() });
    let mut done = r.access(Access::read(0x20_1000).translate_only());
    let t = translation(&r.sent());
    r.complete(t.tag, rw(0x4000, 12));
    assert_eq!(done.try_recv().expect("done").translated, Some(0x4000));
    let s = r.task.snapshot();
    assert_eq!((s.counters.stu_violations, s.atc_entries), (1, 0));
    // A 2 MiB completion is at least the STU: cached.
    let _kept = r.access(Access::read(0x40_0000).translate_only());
    let t = translation(&r.sent());
    r.complete(t.tag, rw(0x80_0000, 21));
    assert_eq!(r.task.snapshot().atc_entries, 1);
    // An invalidation of one page inside it is widened to the 2 MiB unit.
    r.invalidate(0, 0x5f_f000);
    assert_eq!(r.task.snapshot().atc_entries, 0);
}

#[tokio::test]
async fn page_requests_time_out_and_the_backlog_moves_on() {
    let mut r = rig(FunctionConfig { page_request_capacity: 1, ..config() });
    let mut a = r.access(Access::read(0x1000).translate_only());
    let mut b = r.access(Access::read(0x2000).translate_only());
    let sent = r.sent();
    assert_eq!(sent.len(), 2);
    for k in sent {
        let UpKind::Translation(t) = k else { panic!("{k:?}") };
        r.complete(t.tag, TranslationEntry::default());
    }
    // R=W=0: one page request (capacity 1); the other access waits for a slot.
    let first = match r.sent().as_slice() {
        [UpKind::Page(p)] => *p,
        other => panic!("{other:?}"),
    };
    assert!(first.last && first.read && !first.write && first.address == 0x1000);
    assert_eq!(r.task.snapshot().outstanding_page_requests, 1);
    r.task.on_tick(Instant::now() + Duration::from_secs(6));
    let oa = a.try_recv().expect("timed out");
    assert_eq!(oa.result, AccessResult::Fault(Fault::PageRequest(PageRequestFailure::Timeout)));
    assert!(oa.page_requested);
    let second = match r.sent().as_slice() {
        [UpKind::Page(p)] => *p,
        other => panic!("{other:?}"),
    };
    assert_eq!(second.address, 0x2000);
    assert_ne!(second.group_index, first.group_index);
    // A late answer for the timed-out group is ignored; a Response Failure stops PRI.
    r.down(FunctionDown {
        page_responses: vec![
            PageGroupResponse { source_id: r.task.sid, group_index: first.group_index, code: 0 },
            PageGroupResponse { source_id: r.task.sid, group_index: second.group_index, code: 15 },
        ],
        ..Default::default()
    });
    let ob = b.try_recv().expect("refused");
    assert_eq!(ob.result, AccessResult::Fault(Fault::PageRequest(PageRequestFailure::Failure)));
    let mut c = r.access(Access::read(0x3000).translate_only());
    let t = translation(&r.sent());
    r.complete(t.tag, TranslationEntry::default());
    assert_eq!(c.try_recv().expect("fault").result, AccessResult::Fault(Fault::NoAccess), "PRI is stopped");
    assert!(r.sent().is_empty());
    assert_eq!(r.task.snapshot().counters.page_request_failures, 2);
    // A new connection starts PRI again.
    r.task.on_inbound(Inbound::LinkDown { generation: 1 });
    r.task.on_inbound(Inbound::LinkUp { generation: 2 });
    assert!(!r.task.pri.stopped);
}

#[tokio::test]
async fn invalidations_wait_for_covering_dma_and_reused_itags_get_each_their_completion() {
    let mut r = rig(config());
    // Cache page 0x1000, then start a DMA through it.
    let _kept = r.access(Access::read(0x1000).translate_only());
    let t = translation(&r.sent());
    r.complete(t.tag, rw(0x9000, 12));
    let mut dma_done = r.access(Access::read(0x1040));
    let dma = match r.sent().as_slice() {
        [UpKind::Dma(d)] => d.clone(),
        other => panic!("{other:?}"),
    };
    assert!(dma.translated && dma.address == 0x9040);
    // Two requests with ITag 4 (a server reusing an outstanding ITag), one with ITag 40.
    r.invalidate(4, 0x1000);
    r.invalidate(4, 0x1000);
    r.invalidate(40, 0x8000);
    assert_eq!(r.completions(), [40], "an ITag above 31 is completed without waiting");
    assert_eq!(r.task.snapshot().pending_invalidations, 1);
    r.down(FunctionDown {
        dma: vec![DmaCompletion { tag: dma.tag, source_id: r.task.sid, ok: true, ..Default::default() }],
        ..Default::default()
    });
    assert!(dma_done.try_recv().expect("done").is_ok());
    assert_eq!(r.completions(), [4, 4]);
    assert_eq!(r.task.snapshot().counters.invalidations_handled, 3);
}

#[tokio::test]
async fn losing_the_link_fails_what_waited_on_it_and_empties_the_cache() {
    let mut r = rig(config());
    let _kept = r.access(Access::read(0x1000).translate_only());
    let t = translation(&r.sent());
    r.complete(t.tag, rw(0x9000, 12));
    let (tx, mut held) = oneshot::channel();
    r.task.on_command(Command::Hold { access: Access::read(0x1000), reply: tx });
    let info = held.try_recv().expect("held").expect("translated");
    let mut waiting = r.access(Access::read(0x2000));
    r.sent();
    r.task.on_inbound(Inbound::LinkDown { generation: 1 });
    assert_eq!(waiting.try_recv().expect("failed").result, AccessResult::LinkDown);
    let (tx, mut released) = oneshot::channel();
    r.task.on_command(Command::Release { op: info.op, serial: info.serial, reply: tx });
    assert_eq!(released.try_recv().expect("answered").result, AccessResult::LinkDown);
    let s = r.task.snapshot();
    assert_eq!((s.atc_entries, s.accesses_in_flight, s.link_generation), (0, 0, None));
    assert_eq!(s.counters.aborted, 2);
    // While the link is down, accesses fail at once instead of waiting.
    let mut now = r.access(Access::read(0x3000));
    assert_eq!(now.try_recv().expect("failed").result, AccessResult::LinkDown);
    assert!(r.sent().is_empty());
}
