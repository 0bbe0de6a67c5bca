//! Unit and property tests of the grant table against a page-set model.

use std::collections::BTreeMap as Map;

use proptest::prelude::*;

use super::*;
use crate::ids::Hpa;

const PAGE: u64 = 4096;

fn entry(translated: u64, size_shift: u32, read: bool, write: bool) -> AtsEntry {
    AtsEntry {
        translated: Hpa(translated),
        size_shift,
        read,
        write,
        untranslated_only: false,
        exec: false,
        privileged: false,
        global: false,
    }
}

fn on(sids: &[SourceId], capacity: usize) -> GrantTable {
    let t = GrantTable::new(capacity);
    for s in sids {
        t.set(*s, true);
    }
    t
}

fn grant(t: &GrantTable, sid: SourceId, iova: u64, e: AtsEntry) -> Recorded {
    t.record(sid, t.ticket(sid), DomainId(1), Iova(iova), &e)
}

const A: SourceId = SourceId::new(1, 0, 0);
const B: SourceId = SourceId::new(1, 0, 1);

/// Recomputes the coverage from the grants and checks the stored one against it, and
/// that the eviction order names exactly the grants.
fn check_invariants(f: &FunctionGrants) {
    let mut expect = FunctionGrants::default();
    let mut prev_end = 0;
    for (&at, g) in &f.grants {
        assert!(at >= prev_end && g.end > at, "grants overlap or are empty: {:?}", f.grants);
        prev_end = g.end;
        expect.adjust(g.translated, g.translated + (g.end - at), g.read, g.write, true);
        assert!(f.age.contains(&(g.seq, at)));
    }
    assert_eq!(f.age.len(), f.grants.len());
    assert_eq!(f.cover, expect.cover, "coverage");
    for ((_, a), (b_start, _)) in f.cover.iter().zip(f.cover.iter().skip(1)) {
        assert!(a.end <= *b_start);
    }
}

#[test]
fn adjacent_grants_merge_and_a_partial_revoke_cuts() {
    let t = on(&[A], 16);
    for p in 0..8u64 {
        assert_eq!(
            grant(&t, A, p * PAGE, entry(0x10_0000 + p * PAGE, 12, true, true)),
            Recorded::Granted { evicted: 0 }
        );
    }
    assert_eq!(t.len(A), 1, "eight contiguous pages merge into one grant");
    assert!(t.permits(A, 0x10_0000, 8 * PAGE, Direction::Write));
    t.revoke(A, 3 * PAGE, PAGE);
    assert_eq!(t.len(A), 2);
    assert!(!t.permits(A, 0x10_3000, 1, Direction::Read));
    assert!(t.permits(A, 0x10_2fff, 1, Direction::Read));
    assert!(t.permits(A, 0x10_4000, 4 * PAGE, Direction::Read));
    assert!(!t.permits(A, 0x10_2000, 2 * PAGE, Direction::Read), "a request spanning the hole");
}

#[test]
fn permissions_are_as_completed() {
    let t = on(&[A], 16);
    grant(&t, A, 0, entry(0x20_0000, 12, true, false));
    assert!(t.permits(A, 0x20_0000, PAGE, Direction::Read));
    assert!(!t.permits(A, 0x20_0000, PAGE, Direction::Write));
    assert_eq!(grant(&t, A, 0x1000, entry(0x30_0000, 12, false, false)), Recorded::Nothing, "R=W=0");
    let mut u = entry(0xfee0_0000, 12, false, true);
    u.untranslated_only = true;
    assert_eq!(grant(&t, A, 0xfee0_0000, u), Recorded::Nothing, "U=1");
    assert_eq!(grant(&t, A, 0x2000, entry(0xfee0_0000, 12, true, true)), Recorded::Nothing, "interrupt range");
    assert!(!t.permits(B, 0x20_0000, 1, Direction::Read), "grants are per function");
}

#[test]
fn superpages_grant_their_whole_range_and_a_new_completion_supersedes() {
    let t = on(&[A], 16);
    grant(&t, A, 0x20_1234, entry(0x4000_0000, 21, true, true));
    assert!(t.permits(A, 0x4000_0000 + 0x1f_f000, PAGE, Direction::Write));
    grant(&t, A, 0x20_0000, entry(0x5000_0000, 21, true, false));
    assert!(!t.permits(A, 0x4000_0000, 1, Direction::Read), "the old translation was superseded");
    assert!(t.permits(A, 0x5000_0000, 1, Direction::Read));
}

#[test]
fn a_revocation_after_the_ticket_forces_a_retry() {
    let t = on(&[A], 16);
    let ticket = t.ticket(A);
    t.revoke(A, 0, PAGE);
    assert_eq!(t.record(A, ticket, DomainId(1), Iova(0), &entry(0x10_0000, 12, true, true)), Recorded::Raced);
    assert!(!t.permits(A, 0x10_0000, 1, Direction::Read));
    // Also when checking went off and on meanwhile.
    let ticket = t.ticket(A);
    t.set(A, false);
    t.set(A, true);
    assert_eq!(t.record(A, ticket, DomainId(1), Iova(0), &entry(0x10_0000, 12, true, true)), Recorded::Raced);
}

#[test]
fn a_pending_revocation_spares_grants_recorded_after_the_descriptor() {
    let t = on(&[A], 16);
    let linear = |p: u64| entry(0x10_0000 + p * PAGE, 12, true, true);
    for p in 0..8u64 {
        grant(&t, A, p * PAGE, linear(p));
    }
    assert_eq!(t.len(A), 1);
    // Pages 2..=8 invalidated: nothing goes while the invalidation is pending.
    let pending = t.revoke_later(A, 2 * PAGE, 7 * PAGE).expect("checking is on");
    assert!(t.permits(A, 0x10_0000, 8 * PAGE, Direction::Read));
    // Translated again meanwhile: page 3 (granted already) and page 8 (new, adjacent).
    grant(&t, A, 3 * PAGE, linear(3));
    grant(&t, A, 8 * PAGE, linear(8));
    assert_eq!(t.len(A), 4, "old and new grants stay apart: 0-2, 3, 4-7, 8");
    assert_eq!(t.end_revocation(pending), 0);
    assert!(t.permits(A, 0x10_0000, 2 * PAGE, Direction::Read), "outside the range");
    assert!(!t.permits(A, 0x10_2000, 1, Direction::Read), "recorded before: revoked");
    assert!(t.permits(A, 0x10_3000, PAGE, Direction::Write), "recorded after: kept");
    assert!(!t.permits(A, 0x10_4000, 1, Direction::Read));
    assert!(!t.permits(A, 0x10_7000, 1, Direction::Read));
    assert!(t.permits(A, 0x10_8000, PAGE, Direction::Read), "recorded after: kept");
    assert_eq!(t.len(A), 3);
    // With none pending, old and new merge again.
    grant(&t, A, 2 * PAGE, linear(2));
    assert_eq!(t.len(A), 2, "0-3 and 8");
}

#[test]
fn a_translation_computed_before_the_descriptor_is_revoked_at_its_end() {
    let t = on(&[A], 16);
    // Recorded before the descriptor: revoked when the invalidation ends.
    let ticket = t.ticket(A);
    assert!(matches!(
        t.record(A, ticket, DomainId(1), Iova(0), &entry(0x10_0000, 12, true, true)),
        Recorded::Granted { .. }
    ));
    let pending = t.revoke_later(A, 0, PAGE).expect("on");
    assert!(t.permits(A, 0x10_0000, 1, Direction::Read));
    // Computed before the descriptor, recorded after: computed again.
    let stale = t.ticket(A);
    let again = t.revoke_later(A, 0, PAGE).expect("on");
    assert_eq!(t.record(A, stale, DomainId(1), Iova(0), &entry(0x10_0000, 12, true, true)), Recorded::Raced);
    t.end_revocation(pending);
    assert!(!t.permits(A, 0x10_0000, 1, Direction::Read));
    // Computed after both descriptors: survives them.
    assert!(matches!(grant(&t, A, 0, entry(0x10_0000, 12, true, true)), Recorded::Granted { .. }));
    t.end_revocation(again);
    assert!(t.permits(A, 0x10_0000, 1, Direction::Read));
    // Checking off: nothing to end.
    t.set(A, false);
    assert_eq!(t.revoke_later(A, 0, PAGE), None);
}

#[test]
fn nothing_is_recorded_with_checking_off() {
    let t = GrantTable::new(16);
    assert_eq!(grant(&t, A, 0, entry(0x10_0000, 12, true, true)), Recorded::Nothing);
    assert_eq!(t.len(A), 0);
}

#[test]
fn context_invalidations_clear_the_functions_they_name() {
    let t = on(&[A, B, SourceId::new(2, 0, 0)], 16);
    for s in [A, B, SourceId::new(2, 0, 0)] {
        grant(&t, s, 0, entry(0x10_0000, 12, true, true));
    }
    t.context_invalidated(ContextInvalidation::Device { did: DomainId(1), sid: A, function_mask: 0 });
    assert_eq!((t.len(A), t.len(B)), (0, 1));
    t.context_invalidated(ContextInvalidation::Domain(DomainId(2)));
    assert_eq!(t.len(B), 1, "another domain");
    t.context_invalidated(ContextInvalidation::Domain(DomainId(1)));
    assert_eq!((t.len(B), t.len(SourceId::new(2, 0, 0))), (0, 0));
}

/// Software moved A from domain 1 to domain 2 and A translated under 2 before the
/// domain-selective invalidation of 1: what A was granted under 1 must still go with it.
#[test]
fn a_domain_invalidation_reaches_a_function_that_moved_to_another_domain() {
    let t = on(&[A], 16);
    grant(&t, A, 0, entry(0x10_0000, 12, true, true));
    t.record(A, t.ticket(A), DomainId(2), Iova(0x10_0000), &entry(0x90_0000, 12, true, true));
    assert_eq!(t.len(A), 2);
    t.context_invalidated(ContextInvalidation::Domain(DomainId(3)));
    assert_eq!(t.len(A), 2, "another domain");
    t.context_invalidated(ContextInvalidation::Domain(DomainId(1)));
    assert_eq!(t.len(A), 0);
}

#[test]
fn the_bound_evicts_the_oldest() {
    let t = on(&[A], 4);
    let mut evicted = 0;
    // Not contiguous in the translated space: no merging.
    for p in 0..10u64 {
        if let Recorded::Granted { evicted: n } =
            grant(&t, A, p * PAGE, entry(0x100_0000 + p * 2 * PAGE, 12, true, true))
        {
            evicted += n;
        }
    }
    assert_eq!((t.len(A), evicted), (4, 6));
    assert!(!t.permits(A, 0x100_0000, 1, Direction::Read), "the oldest went");
    assert!(t.permits(A, 0x100_0000 + 18 * PAGE, 1, Direction::Read), "the newest stays");
}

/// One step of the property test: small address spaces so that grants overlap, alias
/// and touch often.
#[derive(Clone, Debug)]
enum Op {
    Grant {
        sid: usize,
        iova_page: u64,
        pages_log2: u32,
        hpa_page: u64,
        read: bool,
        write: bool,
    },
    Revoke {
        sid: usize,
        page: u64,
        pages: u64,
    },
    /// A device-TLB descriptor processed: revokes when an `End` picks it.
    Begin {
        sid: usize,
        page: u64,
        pages: u64,
    },
    /// Ends one of the pending revocations (an index into them, modulo their number).
    End {
        pick: usize,
    },
    Clear {
        sid: usize,
    },
    Check {
        sid: usize,
        hpa_page: u64,
        offset: u64,
        len: u64,
        write: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, 0..32u64, 0..3u32, 0..32u64, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(sid, iova_page, pages_log2, hpa_page, linear, read, write)| {
                // Half the grants map linearly (translated = untranslated + 4 pages), so
                // neighbours merge; the others land anywhere, so pages alias.
                let hpa_page = if linear { iova_page + 4 } else { hpa_page };
                Op::Grant { sid, iova_page, pages_log2, hpa_page, read, write }
            }
        ),
        2 => (0..2usize, 0..32u64, 1..8u64).prop_map(|(sid, page, pages)| Op::Revoke { sid, page, pages }),
        2 => (0..2usize, 0..32u64, 1..8u64).prop_map(|(sid, page, pages)| Op::Begin { sid, page, pages }),
        2 => (0..8usize).prop_map(|pick| Op::End { pick }),
        1 => (0..2usize).prop_map(|sid| Op::Clear { sid }),
        4 => (0..2usize, 0..34u64, 0..PAGE, 1..3 * PAGE, any::<bool>())
            .prop_map(|(sid, hpa_page, offset, len, write)| Op::Check { sid, hpa_page, offset, len, write }),
    ]
}

/// The reference: per function, untranslated page → (translated page, R, W, the
/// number of descriptors processed before it was completed).
type Model = Vec<Map<u64, (u64, bool, bool, u64)>>;

fn model_permits(m: &Map<u64, (u64, bool, bool, u64)>, addr: u64, len: u64, write: bool) -> bool {
    (addr / PAGE..=(addr + len - 1) / PAGE).all(|p| m.values().any(|&(h, r, w, _)| h == p && if write { w } else { r }))
}

/// Runs `ops` on a table with room for `capacity` grants and on the model; returns
/// whether the table ever evicted.
fn run(ops: &[Op], capacity: usize) -> Result<bool, TestCaseError> {
    let sids = [A, SourceId::new(3, 1, 0)];
    let t = on(&sids, capacity);
    let mut model: Model = vec![Map::new(); 2];
    let mut evicted_any = false;
    // Descriptors processed so far, and the pending ones: the table's, with the
    // function, its pages and the count they were processed at in the model.
    let mut processed = 0u64;
    let mut pending: Vec<(PendingRevocation, usize, std::ops::Range<u64>, u64)> = Vec::new();
    for op in ops {
        match *op {
            Op::Grant { sid, iova_page, pages_log2, hpa_page, read, write } => {
                let n = 1u64 << pages_log2;
                let (iova, hpa) = ((iova_page & !(n - 1)) * PAGE, (hpa_page & !(n - 1)) * PAGE);
                let r = grant(&t, sids[sid], iova + 0x123, entry(hpa, 12 + pages_log2, read, write));
                if read || write {
                    for i in 0..n {
                        model[sid].insert(iova / PAGE + i, (hpa / PAGE + i, read, write, processed));
                    }
                    let Recorded::Granted { evicted } = r else {
                        return Err(TestCaseError::fail(format!("{r:?}")));
                    };
                    evicted_any |= evicted > 0;
                } else {
                    prop_assert_eq!(r, Recorded::Nothing);
                }
            }
            Op::Revoke { sid, page, pages } => {
                evicted_any |= t.revoke(sids[sid], page * PAGE, pages * PAGE) > 0;
                model[sid].retain(|p, _| !(page..page + pages).contains(p));
            }
            Op::Begin { sid, page, pages } => {
                processed += 1;
                let p = t.revoke_later(sids[sid], page * PAGE, pages * PAGE).expect("checking is on");
                pending.push((p, sid, page..page + pages, processed));
            }
            Op::End { pick } => {
                if !pending.is_empty() {
                    let (p, sid, pages, before) = pending.remove(pick % pending.len());
                    evicted_any |= t.end_revocation(p) > 0;
                    model[sid].retain(|p, v| !(pages.contains(p) && v.3 < before));
                }
            }
            Op::Clear { sid } => {
                t.clear(sids[sid]);
                model[sid].clear();
            }
            Op::Check { sid, hpa_page, offset, len, write } => {
                let addr = hpa_page * PAGE + offset;
                let access = if write { Direction::Write } else { Direction::Read };
                let got = t.permits(sids[sid], addr, len, access);
                let want = model_permits(&model[sid], addr, len, write);
                if evicted_any {
                    // Eviction only ever takes away.
                    prop_assert!(!got || want, "permits what the model does not: {op:?}");
                } else {
                    prop_assert_eq!(got, want, "{:?}", op);
                }
            }
        }
        for (i, s) in sids.iter().enumerate() {
            let functions = t.shard(*s).functions.read();
            let Some(f) = functions.get(s) else {
                prop_assert!(evicted_any || model[i].is_empty());
                continue;
            };
            check_invariants(f);
            prop_assert!(f.grants.len() <= capacity);
            // The grants, page by page.
            let mut pages = Map::new();
            for (&at, g) in &f.grants {
                for p in 0..(g.end - at) / PAGE {
                    pages.insert(at / PAGE + p, (g.translated / PAGE + p, g.read, g.write));
                }
            }
            let model_pages: Map<u64, (u64, bool, bool)> =
                model[i].iter().map(|(p, &(h, r, w, _))| (*p, (h, r, w))).collect();
            if evicted_any {
                prop_assert!(pages.iter().all(|(p, v)| model_pages.get(p) == Some(v)), "evicted table grants more");
            } else {
                prop_assert_eq!(&pages, &model_pages);
            }
        }
    }
    Ok(evicted_any)
}

proptest! {
    #[test]
    fn matches_a_page_set_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(&ops, usize::MAX)?;
    }

    #[test]
    fn a_small_bound_only_takes_away(ops in proptest::collection::vec(op(), 1..80)) {
        run(&ops, 3)?;
    }
}
