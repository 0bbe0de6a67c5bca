//! The state machine driven by hand: no runtime, no channels, no network. Time is whatever
//! the test says it is, so orderings a real server makes rare (completions out of order, a
//! completion overtaken by an invalidation, page request time-outs, reused ITags, a link
//! lost mid-access) are deterministic.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{By, Effect, Machine};
use crate::config::FunctionConfig;
use crate::function::handle::HeldInfo;
use crate::function::messages::{
    BaselineAnswer, Completion, DmaCompletion, DmaRequest, Grant, InvalidationRequest, PageGroupResponse, PageRequest,
    PageResponseCode, TranslationCompletion, TranslationRequest, Up,
};
use crate::function::ops::{AccessKey, Owner};
use crate::function::{Dma, DmaError, DmaOutcome, DmaResult, PageRequestFailure};

const PRI_TIMEOUT: Duration = Duration::from_secs(5);

/// What the server sends a function in one message.
#[derive(Default)]
struct FunctionDown {
    invalidations: Vec<InvalidationRequest>,
    completions: Vec<TranslationCompletion>,
    dma: Vec<DmaCompletion>,
    page_responses: Vec<PageGroupResponse>,
}

/// A machine and everything it asked for so far, sorted by kind.
struct Rig {
    m: Machine<u32>,
    now: Instant,
    next_caller: u32,
    sent: Vec<Up>,
    completions: Vec<u32>,
    outcomes: HashMap<u32, DmaOutcome>,
    workload: Vec<(u64, DmaOutcome)>,
    held: HashMap<u32, HeldInfo>,
    baseline: Vec<(AccessKey, u64, bool)>,
    translated: Vec<(Option<u64>, Duration)>,
    invalidated: Vec<Duration>,
}

fn config() -> FunctionConfig {
    FunctionConfig::new(dmar_vtd::SourceId::new(0, 1, 0))
}

/// A machine on connection 1.
fn rig(config: FunctionConfig) -> Rig {
    let now = Instant::now();
    let mut m = Machine::new(Arc::new(config), PRI_TIMEOUT, now);
    m.connected(1);
    Rig {
        m,
        now,
        next_caller: 0,
        sent: Vec::new(),
        completions: Vec::new(),
        outcomes: HashMap::new(),
        workload: Vec::new(),
        held: HashMap::new(),
        baseline: Vec::new(),
        translated: Vec::new(),
        invalidated: Vec::new(),
    }
}

fn rw(translated: u64, size_shift: u32) -> Grant {
    Grant { translated, size_shift, read: true, write: true, untranslated_only: false }
}

impl Rig {
    /// Sorts the machine's effects into the rig's lists.
    fn collect(&mut self) {
        while let Some(e) = self.m.poll_effect() {
            match e {
                Effect::Send(up) => self.sent.push(up),
                Effect::Complete { itag } => self.completions.push(itag),
                Effect::Baseline { key, iova, write } => self.baseline.push((key, iova, write)),
                Effect::Held { caller, held } => assert!(self.held.insert(caller, held).is_none()),
                Effect::Finished { by: By::Caller(c), outcome } => assert!(self.outcomes.insert(c, outcome).is_none()),
                Effect::Finished { by: By::Workload { run }, outcome } => self.workload.push((run, outcome)),
                Effect::Translated { run, latency } => self.translated.push((run, latency)),
                Effect::Invalidated { after } => self.invalidated.push(after),
            }
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    fn start(&mut self, dma: Dma, hold: bool) -> u32 {
        let c = self.next_caller;
        self.next_caller += 1;
        let owner = if hold { Owner::Hold(c) } else { Owner::Caller(c) };
        self.m.start(dma, owner, self.now, self.now);
        self.collect();
        c
    }

    fn access(&mut self, dma: Dma) -> u32 {
        self.start(dma, false)
    }

    fn hold(&mut self, dma: Dma) -> u32 {
        self.start(dma, true)
    }

    fn release(&mut self, held: HeldInfo) -> u32 {
        let c = self.next_caller;
        self.next_caller += 1;
        self.m.release(held.key, c, self.now);
        self.collect();
        c
    }

    fn outcome(&mut self, caller: u32) -> Option<DmaOutcome> {
        self.outcomes.remove(&caller)
    }

    /// What went to the link since the last call.
    fn sent(&mut self) -> Vec<Up> {
        std::mem::take(&mut self.sent)
    }

    /// The one translation request sent since the last call.
    fn translation(&mut self) -> TranslationRequest {
        match self.sent().as_slice() {
            [Up::Translation(t)] => *t,
            other => panic!("expected one translation request, got {other:?}"),
        }
    }

    fn dma(&mut self) -> DmaRequest {
        match self.sent().as_slice() {
            [Up::Dma(d)] => *d,
            other => panic!("expected one DMA request, got {other:?}"),
        }
    }

    fn page_request(&mut self) -> PageRequest {
        match self.sent().as_slice() {
            [Up::Page(p)] => *p,
            other => panic!("expected one page request, got {other:?}"),
        }
    }

    fn completions(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.completions)
    }

    fn receive(&mut self, d: FunctionDown) {
        self.m.receive(d.invalidations, d.completions, d.dma, d.page_responses, self.now);
        self.collect();
    }

    fn complete_with(&mut self, tag: u64, completion: Completion) {
        self.receive(FunctionDown {
            completions: vec![TranslationCompletion { tag, completion }],
            ..Default::default()
        });
    }

    fn complete(&mut self, tag: u64, grant: Grant) {
        self.complete_with(tag, Completion::Success(grant));
    }

    fn dma_done(&mut self, tag: u64, ok: bool) {
        let fault_reason = if ok { 0 } else { 5 };
        self.receive(FunctionDown { dma: vec![DmaCompletion { tag, ok, fault_reason }], ..Default::default() });
    }

    fn invalidate(&mut self, itag: u32, address: u64) {
        self.receive(FunctionDown { invalidations: vec![InvalidationRequest { itag, address }], ..Default::default() });
    }

    fn page_response(&mut self, group_index: u16, code: PageResponseCode) {
        let r = PageGroupResponse { group_index: u32::from(group_index), code };
        self.receive(FunctionDown { page_responses: vec![r], ..Default::default() });
    }

    /// Caches `page` → `translated` through a translate-only miss.
    fn cache(&mut self, page: u64, translated: u64) {
        let c = self.access(Dma::read(page).translate_only());
        let t = self.translation();
        self.complete(t.tag, rw(translated, 12));
        assert!(self.outcome(c).expect("cached").is_ok());
    }
}

// ---- hits and misses ------------------------------------------------------------------------

#[test]
fn a_device_tlb_hit_sends_only_the_dma() {
    let mut r = rig(config());
    r.cache(0x1000, 0x9000);
    let before = *r.m.counters();
    let c = r.access(Dma::write(0x1040));
    let d = r.dma();
    assert_eq!((d.translated, d.address, d.write, d.len), (true, 0x9040, true, 64), "no translation request");
    assert!(r.outcome(c).is_none(), "done only when the DMA is");
    r.advance(Duration::from_micros(3));
    r.dma_done(d.tag, true);
    let o = r.outcome(c).expect("done");
    assert!(o.is_ok() && o.atc_hit && !o.coalesced);
    assert_eq!((o.translated, o.size_shift, o.latency), (Some(0x9040), 12, Duration::from_micros(3)));
    let n = r.m.counters().since(&before);
    assert_eq!((n.accesses, n.atc_hits, n.atc_misses, n.translations_requested, n.dma_ok), (1, 1, 0, 0, 1));
    // The workload's fast path: a translate-only hit with no state and no effect.
    assert!(r.m.try_hit(0x1080, false));
    assert!(!r.m.try_hit(0x2000, false), "a miss is left to a full access");
    assert!(r.m.poll_effect().is_none());
    assert_eq!(r.m.counters().since(&before).atc_hits, 2);
}

#[test]
fn misses_completed_out_of_order_each_get_their_own_translation() {
    let mut r = rig(config());
    let a = r.access(Dma::read(0x1010).translate_only());
    let b = r.access(Dma::write(0x2020).translate_only());
    let sent = r.sent();
    let [Up::Translation(ta), Up::Translation(tb)] = sent.as_slice() else { panic!("{sent:?}") };
    assert_eq!((ta.address, ta.no_write, tb.address, tb.no_write), (0x1000, true, 0x2000, false));
    assert_ne!(ta.tag, tb.tag);
    r.advance(Duration::from_micros(7));
    r.complete(tb.tag, rw(0xb000, 12));
    assert!(r.outcome(a).is_none(), "a waits for its own completion");
    assert_eq!(r.outcome(b).expect("b").translated, Some(0xb020));
    r.advance(Duration::from_micros(1));
    r.complete(ta.tag, rw(0xa000, 12));
    let oa = r.outcome(a).expect("a");
    assert_eq!((oa.translated, oa.atc_hit, oa.latency), (Some(0xa010), false, Duration::from_micros(8)));
    assert_eq!(r.translated, [(None, Duration::from_micros(7)), (None, Duration::from_micros(8))]);
    // Both are cached now; a completion for a tag nobody waits for changes nothing.
    assert_eq!(r.m.atc_len(), 2);
    r.complete(ta.tag, rw(0xf000, 12));
    assert!(r.m.try_hit(0x1000, false) && r.outcomes.is_empty());
}

#[test]
fn accesses_to_one_page_share_one_translation_request() {
    let mut r = rig(config());
    let readers: Vec<u32> = (0..3).map(|i| r.access(Dma::read(0x5000 + i * 0x40).translate_only())).collect();
    let writer = r.access(Dma::write(0x5000).translate_only());
    let sent = r.sent();
    assert_eq!(sent.len(), 2, "one request per page and access: {sent:?}");
    let [Up::Translation(read), Up::Translation(write)] = sent.as_slice() else { panic!("{sent:?}") };
    assert!(read.no_write && !write.no_write);
    r.complete(read.tag, rw(0x9000, 12));
    let o: Vec<DmaOutcome> = readers.iter().map(|c| r.outcome(*c).expect("done")).collect();
    assert_eq!(o.iter().map(|o| o.coalesced).collect::<Vec<_>>(), [false, true, true]);
    assert_eq!(o.iter().map(|o| o.translated).collect::<Vec<_>>(), [Some(0x9000), Some(0x9040), Some(0x9080)]);
    r.complete(write.tag, rw(0x9000, 12));
    assert!(r.outcome(writer).expect("done").is_ok());
    let n = r.m.counters();
    assert_eq!((n.atc_misses, n.coalesced_misses, n.translations_requested), (4, 2, 2));
}

#[test]
fn failed_and_malformed_completions_fail_every_waiter() {
    let mut r = rig(config());
    let a = r.access(Dma::read(0x1000));
    let b = r.access(Dma::read(0x1040));
    let t = r.translation();
    r.complete_with(t.tag, Completion::UnsupportedRequest);
    for c in [a, b] {
        assert_eq!(r.outcome(c).expect("done").result, DmaResult::Fault(DmaError::UnsupportedRequest));
    }
    let c = r.access(Dma::read(0x2000));
    let t = r.translation();
    r.complete_with(t.tag, Completion::CompleterAbort);
    assert_eq!(r.outcome(c).expect("done").result, DmaResult::Fault(DmaError::CompleterAbort));
    let d = r.access(Dma::read(0x3000));
    let t = r.translation();
    r.complete(t.tag, rw(0x1000, 21));
    assert_eq!(r.outcome(d).expect("done").result, DmaResult::Fault(DmaError::Malformed), "misaligned range");
    // No PRI: R=W=0 is a fault, and so is a write through a read-only grant.
    let e = r.access(Dma::read(0x4000));
    let t = r.translation();
    r.complete(t.tag, Grant::default());
    assert_eq!(r.outcome(e).expect("done").result, DmaResult::Fault(DmaError::NoAccess));
    let f = r.access(Dma::write(0x6000));
    let t = r.translation();
    r.complete(t.tag, Grant { write: false, ..rw(0x6000, 12) });
    assert_eq!(r.outcome(f).expect("done").result, DmaResult::Fault(DmaError::NoAccess));
    let n = r.m.counters();
    assert_eq!((n.translation_errors, n.faults, n.accesses), (3, 6, 6));
    assert!(r.sent().is_empty(), "no DMA for a failed access");
}

#[test]
fn a_completion_overtaken_by_an_invalidation_is_asked_again() {
    let mut r = rig(config());
    let done = r.access(Dma::read(0x5040).translate_only());
    let first = r.translation();
    assert_eq!((first.address, first.no_write), (0x5000, true));
    // The server unmapped the page after answering, and its invalidation overtook the
    // completion: nothing is cached or in flight, so it completes at once.
    r.invalidate(3, 0x5000);
    assert_eq!(r.completions(), [3]);
    r.complete(first.tag, rw(0x9000, 12));
    assert!(r.outcome(done).is_none(), "the stale translation is not used");
    let second = r.translation();
    assert_ne!(second.tag, first.tag);
    r.complete(second.tag, rw(0xa000, 12));
    let o = r.outcome(done).expect("done");
    assert_eq!((o.result, o.translated), (DmaResult::Ok, Some(0xa040)));
    let c = r.m.counters();
    assert_eq!((c.stale_completions, c.translations_requested, c.atc_misses), (1, 2, 1));
}

#[test]
fn untranslated_only_entries_send_untranslated_dma() {
    let mut r = rig(config());
    let done = r.access(Dma::write(0x7000));
    let t = r.translation();
    r.complete(t.tag, Grant { untranslated_only: true, ..rw(0, 12) });
    let dma = r.dma();
    assert!(!dma.translated && dma.write && dma.address == 0x7000 && dma.len == 64);
    r.dma_done(dma.tag, true);
    let o = r.outcome(done).expect("done");
    assert!(o.untranslated && o.is_ok() && o.translated.is_none());
    // The next access hits the U entry and goes untranslated without asking.
    let _kept = r.access(Dma::read(0x7100));
    assert!(!r.dma().translated);
    assert_eq!(r.m.counters().untranslated_dma, 2);
}

#[test]
fn completions_below_the_stu_are_used_but_not_cached() {
    let mut r = rig(FunctionConfig { smallest_translation_unit: 9, ..config() });
    let done = r.access(Dma::read(0x20_1000).translate_only());
    let t = r.translation();
    r.complete(t.tag, rw(0x4000, 12));
    assert_eq!(r.outcome(done).expect("done").translated, Some(0x4000));
    assert_eq!((r.m.counters().stu_violations, r.m.atc_len()), (1, 0));
    // A 2 MiB completion is at least the STU: cached.
    let _kept = r.access(Dma::read(0x40_0000).translate_only());
    let t = r.translation();
    r.complete(t.tag, rw(0x80_0000, 21));
    assert_eq!(r.m.atc_len(), 1);
    // An invalidation of one page inside it is widened to the 2 MiB unit.
    r.invalidate(0, 0x5f_f000);
    assert_eq!(r.m.atc_len(), 0);
}

// ---- invalidations --------------------------------------------------------------------------

#[test]
fn an_invalidation_is_acknowledged_only_after_the_dma_using_the_translation_completes() {
    let mut r = rig(config());
    r.cache(0x1000, 0x9000);
    r.cache(0x3000, 0xb000);
    let in_flight = r.access(Dma::read(0x1040));
    let dma = r.dma();
    assert!(dma.translated && dma.address == 0x9040);
    r.advance(Duration::from_micros(2));
    r.invalidate(4, 0x1000);
    assert_eq!(r.m.atc_len(), 1, "the covered entry is dropped at once");
    assert!(r.completions().is_empty(), "not acknowledged while the DMA uses the old translation");
    assert_eq!(r.m.snapshot().pending_invalidations, 1);
    // Meanwhile everything else goes on: an invalidation of another page completes at once,
    // and the other page still hits.
    r.invalidate(5, 0x7000);
    assert_eq!(r.completions(), [5]);
    let other = r.access(Dma::read(0x3000).translate_only());
    assert!(r.outcome(other).expect("hit").atc_hit);
    r.advance(Duration::from_micros(3));
    r.dma_done(dma.tag, true);
    assert!(r.outcome(in_flight).expect("done").is_ok(), "the DMA used the translation it had");
    assert_eq!(r.completions(), [4]);
    assert_eq!(r.invalidated, [Duration::ZERO, Duration::from_micros(3)], "timed from the request's arrival");
    assert_eq!(r.m.snapshot().pending_invalidations, 0);
    let n = r.m.counters();
    assert_eq!((n.invalidations_handled, n.invalidated_entries), (2, 1));
}

#[test]
fn invalidations_wait_for_covering_dma_and_reused_itags_get_each_their_completion() {
    let mut r = rig(config());
    r.cache(0x1000, 0x9000);
    let dma_done = r.access(Dma::read(0x1040));
    let dma = r.dma();
    // Two requests with ITag 4 (a server reusing an outstanding ITag), one with ITag 40.
    r.invalidate(4, 0x1000);
    r.invalidate(4, 0x1000);
    r.invalidate(40, 0x8000);
    assert_eq!(r.completions(), [40], "an ITag above 31 is completed without waiting");
    assert_eq!(r.m.snapshot().pending_invalidations, 1);
    r.dma_done(dma.tag, true);
    assert!(r.outcome(dma_done).expect("done").is_ok());
    assert_eq!(r.completions(), [4, 4]);
    assert_eq!(r.m.counters().invalidations_handled, 3);
}

#[test]
fn a_held_dma_holds_its_invalidation_until_released() {
    let mut r = rig(config());
    r.cache(0x1000, 0x9000);
    let h = r.hold(Dma::write(0x1000));
    let held = r.held.remove(&h).expect("held");
    assert_eq!(held.translated, Some(0x9000));
    assert!(r.sent().is_empty(), "no DMA before the release");
    r.invalidate(2, 0x1000);
    assert!(r.completions().is_empty());
    let rel = r.release(held);
    let d = r.dma();
    assert_eq!((d.address, d.write), (0x9000, true));
    assert!(r.completions().is_empty(), "the DMA is still in flight");
    r.dma_done(d.tag, false);
    assert_eq!(r.outcome(rel).expect("done").result, DmaResult::DmaFailed { fault_reason: 5 });
    assert_eq!(r.completions(), [2], "a failed DMA no longer uses the translation either");
    // A second release of the same hold names nothing.
    let again = r.release(held);
    assert_eq!(r.outcome(again).expect("answered").result, DmaResult::LinkDown);
}

// ---- PRI ------------------------------------------------------------------------------------

#[test]
fn a_page_request_then_a_successful_retry() {
    let mut r = rig(FunctionConfig { page_request_capacity: 4, ..config() });
    let done = r.access(Dma::write(0x7000));
    let t = r.translation();
    r.advance(Duration::from_micros(10));
    r.complete(t.tag, Grant::default());
    let p = r.page_request();
    assert_eq!((p.address, p.read, p.write, p.last), (0x7000, true, true, true));
    assert!(r.outcome(done).is_none(), "the access waits for the page");
    r.page_response(p.group_index, PageResponseCode::Success);
    let retry = r.translation();
    assert_eq!((retry.address, retry.no_write), (0x7000, false));
    assert_ne!(retry.tag, t.tag);
    r.complete(retry.tag, rw(0x60_7000, 12));
    let d = r.dma();
    assert_eq!(d.address, 0x60_7000);
    r.dma_done(d.tag, true);
    let o = r.outcome(done).expect("done");
    assert!(o.is_ok() && o.page_requested && !o.atc_hit);
    let n = r.m.counters();
    assert_eq!((n.page_requests, n.translations_requested, n.atc_misses, n.faults), (1, 2, 1, 0));
    // A retry that is refused again is a fault: one page request per access.
    let again = r.access(Dma::read(0x8000).translate_only());
    let t = r.translation();
    r.complete(t.tag, Grant::default());
    let p = r.page_request();
    r.page_response(p.group_index, PageResponseCode::Success);
    let t = r.translation();
    r.complete(t.tag, Grant::default());
    assert_eq!(r.outcome(again).expect("done").result, DmaResult::Fault(DmaError::NoAccess));
    assert!(r.sent().is_empty());
}

#[test]
fn page_requests_time_out_and_the_backlog_moves_on() {
    let mut r = rig(FunctionConfig { page_request_capacity: 1, ..config() });
    let a = r.access(Dma::read(0x1000).translate_only());
    let b = r.access(Dma::read(0x2000).translate_only());
    let sent = r.sent();
    assert_eq!(sent.len(), 2);
    for k in sent {
        let Up::Translation(t) = k else { panic!("{k:?}") };
        r.complete(t.tag, Grant::default());
    }
    // R=W=0: one page request (capacity 1); the other access waits for a slot.
    let first = r.page_request();
    assert!(first.last && first.read && !first.write && first.address == 0x1000);
    assert_eq!(r.m.snapshot().outstanding_page_requests, 1);
    r.advance(PRI_TIMEOUT - Duration::from_millis(1));
    r.m.tick(r.now);
    r.collect();
    assert!(r.outcome(a).is_none() && r.sent().is_empty(), "not before its deadline");
    r.advance(Duration::from_millis(1));
    r.m.tick(r.now);
    r.collect();
    let oa = r.outcome(a).expect("timed out");
    assert_eq!(oa.result, DmaResult::Fault(DmaError::PageRequest(PageRequestFailure::Timeout)));
    assert!(oa.page_requested);
    let second = r.page_request();
    assert_eq!(second.address, 0x2000);
    assert_ne!(second.group_index, first.group_index);
    // A late answer for the timed-out group is ignored; a Response Failure stops PRI.
    r.page_response(first.group_index, PageResponseCode::Success);
    assert!(r.sent().is_empty());
    r.page_response(second.group_index, PageResponseCode::Failure);
    let ob = r.outcome(b).expect("refused");
    assert_eq!(ob.result, DmaResult::Fault(DmaError::PageRequest(PageRequestFailure::Failure)));
    let c = r.access(Dma::read(0x3000).translate_only());
    let t = r.translation();
    r.complete(t.tag, Grant::default());
    assert_eq!(r.outcome(c).expect("fault").result, DmaResult::Fault(DmaError::NoAccess), "PRI is stopped");
    assert!(r.sent().is_empty());
    assert_eq!(r.m.counters().page_request_failures, 2);
    // A new connection starts PRI again.
    r.m.disconnected(1, r.now);
    r.m.connected(2);
    let d = r.access(Dma::read(0x3000).translate_only());
    let t = r.translation();
    r.complete(t.tag, Grant::default());
    assert_eq!(r.page_request().address, 0x3000);
    assert!(r.outcome(d).is_none());
}

#[test]
fn a_page_request_refused_as_invalid_or_unknown_fails_the_group() {
    let mut r = rig(FunctionConfig { page_request_capacity: 4, ..config() });
    let a = r.access(Dma::read(0x1000).translate_only());
    let b = r.access(Dma::read(0x1040).translate_only());
    let t = r.translation();
    r.complete(t.tag, Grant::default());
    let p = r.page_request();
    r.page_response(p.group_index, PageResponseCode::Invalid);
    for c in [a, b] {
        let o = r.outcome(c).expect("refused");
        assert_eq!(o.result, DmaResult::Fault(DmaError::PageRequest(PageRequestFailure::Invalid)));
    }
    let c = r.access(Dma::read(0x2000).translate_only());
    let t = r.translation();
    r.complete(t.tag, Grant::default());
    let p = r.page_request();
    r.page_response(p.group_index, PageResponseCode::Other(7));
    assert_eq!(
        r.outcome(c).expect("refused").result,
        DmaResult::Fault(DmaError::PageRequest(PageRequestFailure::Other(7)))
    );
    assert_eq!(r.m.counters().page_requests, 2, "the coalesced access shared its group");
}

// ---- the link -------------------------------------------------------------------------------

#[test]
fn losing_the_link_fails_what_waited_on_it_empties_the_tlb_and_forgets_invalidations() {
    let mut r = rig(config());
    r.cache(0x1000, 0x9000);
    r.cache(0x5000, 0xd000);
    let h = r.hold(Dma::read(0x1000));
    let held = r.held.remove(&h).expect("held");
    let in_flight = r.access(Dma::read(0x1040));
    let dma = r.dma();
    r.invalidate(6, 0x1000);
    assert_eq!(r.m.snapshot().pending_invalidations, 1);
    assert_eq!(r.m.atc_len(), 1, "the other page stays cached");
    let waiting = r.access(Dma::read(0x2000));
    let t = r.translation();
    let baseline = r.access(Dma::read(0x4000).translate_only().baseline());
    let [(key, 0x4000, false)] = r.baseline.as_slice() else { panic!("{:?}", r.baseline) };
    let key = *key;

    r.m.disconnected(1, r.now);
    r.collect();
    assert_eq!(r.outcome(waiting).expect("failed").result, DmaResult::LinkDown);
    assert_eq!(r.outcome(in_flight).expect("failed").result, DmaResult::LinkDown);
    assert!(r.outcome(baseline).is_none(), "a baseline access does not use the link");
    assert!(r.completions().is_empty(), "the server completes an unbound function's invalidations");
    let rel = r.release(held);
    assert_eq!(r.outcome(rel).expect("answered").result, DmaResult::LinkDown);
    let s = r.m.snapshot();
    assert_eq!(
        (s.atc_entries, s.pending_invalidations, s.outstanding_translations, s.link_generation),
        (0, 0, 0, None)
    );
    assert_eq!((s.accesses_in_flight, s.counters.aborted), (1, 3));
    // While the link is down, accesses fail at once instead of waiting.
    let now = r.access(Dma::read(0x3000));
    assert_eq!(r.outcome(now).expect("failed").result, DmaResult::LinkDown);
    assert!(r.sent().is_empty());
    // A late completion from the old connection changes nothing; the baseline answer
    // still finishes its access.
    r.m.connected(2);
    r.complete(t.tag, rw(0xa000, 12));
    r.dma_done(dma.tag, true);
    assert!(r.outcomes.is_empty() && r.m.atc_len() == 0);
    r.m.baseline_answer(key, BaselineAnswer::Translated { hpa: 0x4_4000, page_shift: 12 }, r.now);
    r.collect();
    assert_eq!(r.outcome(baseline).expect("done").translated, Some(0x4_4000));
    // A link-down event for an older connection is ignored.
    r.cache(0x1000, 0x9000);
    r.m.disconnected(1, r.now);
    assert_eq!(r.m.atc_len(), 1);
}

#[test]
fn a_new_connection_starts_with_an_empty_device_tlb() {
    let mut r = rig(config());
    r.cache(0x1000, 0x9000);
    r.m.connected(2);
    assert_eq!((r.m.atc_len(), r.m.generation()), (0, Some(2)));
    let c = r.access(Dma::read(0x1000).translate_only());
    r.translation();
    assert!(r.outcome(c).is_none(), "a miss");
}

// ---- baseline and workload accesses -----------------------------------------------------------

#[test]
fn baseline_accesses_use_the_unary_answer() {
    let mut r = rig(config());
    let ok = r.access(Dma::write(0x1000).baseline());
    let refused = r.access(Dma::read(0x2000).translate_only().baseline());
    let gone = r.access(Dma::read(0x3000).translate_only().baseline());
    let calls = std::mem::take(&mut r.baseline);
    assert_eq!(
        calls.iter().map(|c| (c.1, c.2)).collect::<Vec<_>>(),
        [(0x1000, true), (0x2000, false), (0x3000, false)]
    );
    assert!(r.sent().is_empty(), "nothing on the link");
    r.m.baseline_answer(calls[0].0, BaselineAnswer::Translated { hpa: 0x5000, page_shift: 12 }, r.now);
    r.m.baseline_answer(calls[1].0, BaselineAnswer::Refused { fault_reason: 6 }, r.now);
    r.m.baseline_answer(calls[2].0, BaselineAnswer::Failed, r.now);
    // A second answer for the same access is stale.
    r.m.baseline_answer(calls[1].0, BaselineAnswer::Failed, r.now);
    r.collect();
    let d = r.dma();
    assert_eq!((d.translated, d.address), (true, 0x5000));
    r.dma_done(d.tag, true);
    assert!(r.outcome(ok).expect("done").is_ok());
    assert_eq!(r.outcome(refused).expect("done").result, DmaResult::Fault(DmaError::Refused { fault_reason: 6 }));
    assert_eq!(r.outcome(gone).expect("done").result, DmaResult::LinkDown);
    let n = r.m.counters();
    assert_eq!((n.baseline_calls, n.atc_hits, n.atc_misses, n.accesses), (3, 0, 0, 3));
    // Without ATS, the baseline's translation is used untranslated.
    let mut r = rig(FunctionConfig { ats: false, ..config() });
    let c = r.access(Dma::read(0x1000).baseline());
    let (key, ..) = r.baseline[0];
    r.m.baseline_answer(key, BaselineAnswer::Translated { hpa: 0x5000, page_shift: 12 }, r.now);
    r.collect();
    assert_eq!((r.dma().translated, r.outcome(c).map(|o| o.result)), (false, None));
}

#[test]
fn link_baseline_accesses_ask_the_link_each_time_and_cache_nothing() {
    let mut r = rig(config());
    r.cache(0x1000, 0x9000);
    let before = *r.m.counters();
    // A cached page is asked for all the same; two accesses to one page send two requests.
    let a = r.access(Dma::read(0x1000).translate_only().link_baseline());
    let b = r.access(Dma::read(0x1040).translate_only().link_baseline());
    let sent = r.sent();
    let [Up::Translation(ta), Up::Translation(tb)] = sent.as_slice() else { panic!("{sent:?}") };
    assert_eq!((ta.address, tb.address), (0x1000, 0x1000));
    r.complete(ta.tag, rw(0x7000, 12));
    assert_eq!(r.outcome(a).expect("translated").translated, Some(0x7000), "this completion, not the cache");
    assert!(r.outcome(b).is_none(), "b waits for its own completion");
    r.complete(tb.tag, rw(0x7000, 12));
    assert_eq!(r.outcome(b).expect("translated").translated, Some(0x7040));
    // With DMA: translated DMA from the completion; nothing was cached.
    let c = r.access(Dma::write(0x2000).link_baseline());
    let t = r.translation();
    r.complete(t.tag, rw(0x8000, 12));
    let d = r.dma();
    assert_eq!((d.translated, d.address, d.write), (true, 0x8000, true));
    r.dma_done(d.tag, true);
    assert!(r.outcome(c).expect("done").is_ok());
    assert_eq!(r.m.atc_len(), 1, "only the page cached before");
    let n = *r.m.counters();
    assert_eq!(n.baseline_calls - before.baseline_calls, 3);
    assert_eq!(n.translations_requested - before.translations_requested, 3);
    assert_eq!((n.atc_hits - before.atc_hits, n.atc_misses - before.atc_misses), (0, 0));
    assert_eq!(r.translated.len(), 4, "every access's translation is timed (and the cache fill)");

    // A completion overtaken by an invalidation is asked again, as for a miss.
    let e = r.access(Dma::read(0x5000).translate_only().link_baseline());
    let t = r.translation();
    r.invalidate(3, 0x5000);
    assert_eq!(r.completions(), [3], "nothing in flight used the page");
    r.complete(t.tag, rw(0x6000, 12));
    assert!(r.outcome(e).is_none(), "the stale translation is not used");
    let again = r.translation();
    r.complete(again.tag, rw(0x6000, 12));
    assert!(r.outcome(e).expect("translated").is_ok());
    assert_eq!(r.m.counters().stale_completions, 1);

    // Not present, UR: faults, and no page request even with PRI.
    let mut r = rig(FunctionConfig { page_request_capacity: 4, ..config() });
    let f = r.access(Dma::read(0x3000).translate_only().link_baseline());
    let t = r.translation();
    r.complete(t.tag, Grant { read: false, write: false, ..rw(0, 12) });
    assert_eq!(r.outcome(f).expect("faulted").result, DmaResult::Fault(DmaError::NoAccess));
    let g = r.access(Dma::read(0x3000).translate_only().link_baseline());
    let t = r.translation();
    r.complete_with(t.tag, Completion::UnsupportedRequest);
    assert_eq!(r.outcome(g).expect("faulted").result, DmaResult::Fault(DmaError::UnsupportedRequest));
    assert!(r.sent().is_empty(), "no page request");
    // The link goes down under one: it fails like any access that waits on the link.
    let h = r.access(Dma::read(0x3000).translate_only().link_baseline());
    r.translation();
    r.m.disconnected(1, r.now);
    r.collect();
    assert_eq!(r.outcome(h).expect("failed").result, DmaResult::LinkDown);
}

#[test]
fn workload_accesses_report_to_their_run_from_their_intended_start() {
    let mut r = rig(config());
    let intended = r.now;
    r.advance(Duration::from_micros(4));
    r.m.start(Dma::read(0x1000).translate_only(), Owner::Workload { run: 9 }, intended, r.now);
    r.collect();
    let t = r.translation();
    r.advance(Duration::from_micros(6));
    r.complete(t.tag, rw(0x9000, 12));
    assert_eq!(r.translated, [(Some(9), Duration::from_micros(10))]);
    let [(9, o)] = r.workload.as_slice() else { panic!("{:?}", r.workload) };
    assert_eq!((o.latency, o.translated), (Duration::from_micros(10), Some(0x9000)));
}

#[test]
fn without_ats_every_dma_is_untranslated() {
    let mut r = rig(FunctionConfig { ats: false, ..config() });
    let c = r.access(Dma::write(0x1234));
    let d = r.dma();
    assert_eq!((d.translated, d.address), (false, 0x1234));
    r.dma_done(d.tag, true);
    let o = r.outcome(c).expect("done");
    assert!(o.is_ok() && o.untranslated && !o.atc_hit);
    assert_eq!(r.m.counters().atc_misses + r.m.counters().atc_hits, 0, "no device TLB");
}

#[test]
fn shutdown_ends_every_access() {
    let mut r = rig(config());
    r.cache(0x1000, 0x9000);
    let h = r.hold(Dma::read(0x1000));
    let held = r.held.remove(&h).expect("held");
    let waiting = r.access(Dma::read(0x2000));
    let base = r.access(Dma::read(0x3000).baseline());
    r.m.abort_all(r.now);
    r.collect();
    assert_eq!(r.outcome(waiting).expect("ended").result, DmaResult::LinkDown);
    assert_eq!(r.outcome(base).expect("ended").result, DmaResult::LinkDown);
    assert!(r.outcome(h).is_none(), "a held access's caller was answered already");
    let rel = r.release(held);
    assert_eq!(r.outcome(rel).expect("answered").result, DmaResult::LinkDown);
    assert_eq!(r.m.snapshot().accesses_in_flight, 0);
}
