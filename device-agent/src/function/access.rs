//! The life of an access, in the state machine: device-TLB lookup, misses and their
//! coalescing, translation completions, the DMA, and the baseline path.
//!
//! An access goes: lookup → hit: DMA (translated, or untranslated for a U entry) → done;
//! miss: a tagged translation request, or joining one already outstanding for the same
//! page and access (coalescing) → completion → cached if it grants anything (and is at
//! least the smallest translation unit) → DMA; or, when the completion grants nothing
//! and PRI may help, a page request (`pri`) and a retry. A completion for a page an
//! invalidation covered after the request went out may carry the removed translation: it
//! is discarded and asked again. Baseline accesses replace the first steps with a unary
//! translation ([`Effect::Baseline`]); link-baseline accesses with a translation request
//! of their own whose completion serves that access only (no lookup, no coalescing,
//! nothing cached, no page request). PCIe ATS 10.2 (translation requests and
//! completions: R, W, U, the range size).

use super::machine::{Direct, Effect, Machine, Miss, MissKey, TagUse};
use super::messages::{
    BaselineAnswer, Completion, DmaCompletion, DmaRequest, TranslationCompletion, TranslationRequest, Up,
};
use super::ops::{AccessKey, OpId, Owner, Stage, Target};
use super::{DmaError, DmaResult, Mode};
use crate::atc::{AtcEntry, Inserted, Lookup, Perms};
use crate::function::handle::HeldInfo;

impl<T> Machine<T> {
    /// Takes `tag` off the outstanding tags if `pick` accepts what it is outstanding for (a
    /// translation request, or a DMA); otherwise leaves the tags as they are.
    #[inline]
    fn answered<U>(&mut self, tag: u64, pick: impl FnOnce(TagUse) -> Option<U>) -> Option<U> {
        let found = self.tags.get(&tag).copied().and_then(pick)?;
        self.tags.remove(&tag);
        Some(found)
    }

    pub(super) fn begin(&mut self, id: OpId) {
        let Some(op) = self.ops.get(id) else { return };
        match op.mode {
            Mode::Baseline => self.baseline(id),
            Mode::LinkBaseline => self.link_baseline(id),
            Mode::Ats if !self.cfg.ats => self.dispatch(id, Target::Untranslated, 0),
            Mode::Ats => self.lookup(id, true),
        }
    }

    /// Looks the access up; `count` is false for retries (the access was counted once).
    pub(super) fn lookup(&mut self, id: OpId, count: bool) {
        let Some(op) = self.ops.get_mut(id) else { return };
        match self.atc.lookup(op.iova, op.write) {
            Lookup::Hit { hpa, size_shift } => {
                if count {
                    self.counters.atc_hits += 1;
                    op.atc_hit = true;
                }
                self.dispatch(id, Target::Translated(hpa), size_shift);
            }
            Lookup::Untranslated => {
                if count {
                    self.counters.atc_hits += 1;
                    op.atc_hit = true;
                }
                self.dispatch(id, Target::Untranslated, 0);
            }
            Lookup::NoPermission | Lookup::Miss => {
                if count {
                    self.counters.atc_misses += 1;
                }
                self.miss(id);
            }
        }
    }

    fn miss(&mut self, id: OpId) {
        let Some(op) = self.ops.get_mut(id) else { return };
        op.stage = Stage::Translation;
        let key = MissKey { page: op.iova >> 12, write: op.write };
        if let Some(m) = self.misses.get_mut(&key) {
            m.waiters.push(id);
            op.coalesced = true;
            self.counters.coalesced_misses += 1;
            return;
        }
        let mut waiters = self.spare.pop().unwrap_or_default();
        waiters.push(id);
        self.request_translation(key, waiters);
    }

    fn request_translation(&mut self, key: MissKey, waiters: Vec<OpId>) {
        if self.generation.is_none() {
            return self.fail_all(waiters, DmaResult::LinkDown);
        }
        self.send_translation(key.page, key.write, TagUse::Translation(key));
        self.misses.insert(key, Miss { waiters, stale: false });
    }

    /// Sends a translation request for `page`, its completion to go to `answer`.
    fn send_translation(&mut self, page: u64, write: bool, answer: TagUse) {
        let tag = self.next_tag();
        let req = TranslationRequest { tag, address: page << 12, no_write: !write };
        self.effects.push_back(Effect::Send(Up::Translation(req)));
        self.counters.translations_requested += 1;
        self.tags.insert(tag, answer);
    }

    pub(super) fn on_completion(&mut self, c: TranslationCompletion) {
        let answer = self.answered(c.tag, |u| (!matches!(u, TagUse::Dma(_))).then_some(u));
        let key = match answer {
            Some(TagUse::Translation(k)) => k,
            Some(TagUse::Direct(d)) => return self.on_direct_completion(d, c.completion),
            _ => {
                tracing::debug!(tag = c.tag, "completion for no outstanding translation request");
                return;
            }
        };
        let Some(miss) = self.misses.remove(&key) else { return };
        if miss.stale {
            // The completion may carry a translation the invalidation removed.
            self.counters.stale_completions += 1;
            return self.request_translation(key, miss.waiters);
        }
        match self.granted(key.page, c.completion) {
            Ok(None) => {
                for &w in &miss.waiters {
                    self.record_miss(w);
                    self.no_access(w);
                }
                self.recycle(miss.waiters);
            }
            Ok(Some(entry)) => {
                // PCIe ATS 10.5.1.3: a function caches nothing below its STU.
                if u32::from(entry.size_shift) < 12 + u32::from(self.cfg.smallest_translation_unit) {
                    self.counters.stu_violations += 1;
                } else if let Inserted::Evicted(_) = self.atc.insert(entry) {
                    self.counters.evictions += 1;
                }
                for &w in &miss.waiters {
                    self.record_miss(w);
                    self.resolve(w, &entry);
                }
                self.recycle(miss.waiters);
            }
            Err(e) => self.fail_all(miss.waiters, DmaResult::Fault(e)),
        }
    }

    /// What a completion for `page` grants: an entry, nothing (R=W=0: not present), or an
    /// error (UR, CA, a malformed range; counted).
    fn granted(&mut self, page: u64, completion: Completion) -> Result<Option<AtcEntry>, DmaError> {
        match completion {
            Completion::Success(g) => {
                let perms = Perms::new(g.read, g.write, g.untranslated_only);
                if !perms.any() {
                    return Ok(None);
                }
                AtcEntry::from_completion(page << 12, g.translated, g.size_shift, perms).map(Some).map_err(|err| {
                    tracing::debug!(error = %err, "malformed translation completion");
                    self.counters.translation_errors += 1;
                    DmaError::Malformed
                })
            }
            Completion::UnsupportedRequest => {
                self.counters.translation_errors += 1;
                Err(DmaError::UnsupportedRequest)
            }
            Completion::CompleterAbort => {
                self.counters.translation_errors += 1;
                Err(DmaError::CompleterAbort)
            }
        }
    }

    /// Applies a fresh completion to one waiting access.
    fn resolve(&mut self, id: OpId, entry: &AtcEntry) {
        let Some(op) = self.ops.get(id) else { return };
        if !entry.perms.allows(op.write) {
            self.no_access(id);
        } else if entry.perms.untranslated_only() {
            self.dispatch(id, Target::Untranslated, 0);
        } else {
            let hpa = entry.translate(op.iova);
            self.dispatch(id, Target::Translated(hpa), entry.size_shift);
        }
    }

    /// The access has its translation (or knows it must go untranslated).
    fn dispatch(&mut self, id: OpId, target: Target, size_shift: u8) {
        let Some(op) = self.ops.get_mut(id) else { return };
        op.target = Some(target);
        op.size_shift = size_shift;
        if op.translate_only {
            return self.finish(id, DmaResult::Ok);
        }
        if let Owner::Hold(_) = op.owner {
            let Owner::Hold(caller) = std::mem::replace(&mut op.owner, Owner::Held(None)) else {
                return;
            };
            op.stage = Stage::Held;
            let translated = match target {
                Target::Translated(hpa) => Some(hpa),
                Target::Untranslated => None,
            };
            let held = HeldInfo { key: AccessKey { op: id, serial: op.serial }, translated };
            self.effects.push_back(Effect::Held { caller, held });
            return;
        }
        self.send_dma(id);
    }

    pub(super) fn send_dma(&mut self, id: OpId) {
        if self.generation.is_none() {
            return self.finish(id, DmaResult::LinkDown);
        }
        let tag = self.next_tag();
        let Some(op) = self.ops.get_mut(id) else { return };
        let (translated, address) = match op.target {
            Some(Target::Translated(hpa)) => (true, hpa),
            _ => (false, op.iova),
        };
        op.stage = Stage::Dma;
        if !translated {
            self.counters.untranslated_dma += 1;
        }
        let req = DmaRequest { tag, translated, address, write: op.write, len: op.len };
        self.effects.push_back(Effect::Send(Up::Dma(req)));
        self.tags.insert(tag, TagUse::Dma(id));
    }

    pub(super) fn on_dma(&mut self, c: DmaCompletion) {
        let Some(id) = self.answered(c.tag, |u| if let TagUse::Dma(id) = u { Some(id) } else { None }) else {
            tracing::debug!(tag = c.tag, "DMA completion for no outstanding DMA");
            return;
        };
        if c.ok {
            self.counters.dma_ok += 1;
            self.finish(id, DmaResult::Ok);
        } else {
            self.counters.dma_failed += 1;
            self.finish(id, DmaResult::DmaFailed { fault_reason: c.fault_reason });
        }
    }

    fn baseline(&mut self, id: OpId) {
        let Some(op) = self.ops.get_mut(id) else { return };
        op.stage = Stage::Baseline;
        self.counters.baseline_calls += 1;
        let key = AccessKey { op: id, serial: op.serial };
        self.effects.push_back(Effect::Baseline { key, iova: op.iova, write: op.write });
    }

    /// A link-baseline access: a translation request of its own, whatever the device TLB
    /// holds (it is neither looked up nor filled).
    fn link_baseline(&mut self, id: OpId) {
        let Some(op) = self.ops.get_mut(id) else { return };
        op.stage = Stage::Translation;
        self.counters.baseline_calls += 1;
        let direct =
            Direct { key: AccessKey { op: id, serial: op.serial }, page: op.iova >> 12, write: op.write, stale: false };
        self.request_direct(direct);
    }

    fn request_direct(&mut self, direct: Direct) {
        if self.generation.is_none() {
            return self.finish(direct.key.op, DmaResult::LinkDown);
        }
        self.send_translation(direct.page, direct.write, TagUse::Direct(direct));
    }

    /// The completion of a link-baseline access's request: used for that access only.
    fn on_direct_completion(&mut self, d: Direct, completion: Completion) {
        match self.ops.get(d.key.op) {
            Some(op) if op.serial == d.key.serial && op.stage == Stage::Translation => {}
            _ => return,
        }
        if d.stale {
            // As for a miss: the completion may carry a translation the invalidation removed.
            self.counters.stale_completions += 1;
            return self.request_direct(Direct { stale: false, ..d });
        }
        let id = d.key.op;
        self.record_miss(id);
        match self.granted(d.page, completion) {
            Ok(Some(entry)) => self.resolve(id, &entry),
            // No page request: a retry would go through the device TLB.
            Ok(None) => self.finish(id, DmaResult::Fault(DmaError::NoAccess)),
            Err(e) => self.finish(id, DmaResult::Fault(e)),
        }
    }

    pub(super) fn on_baseline(&mut self, key: AccessKey, answer: BaselineAnswer) {
        match self.ops.get(key.op) {
            Some(op) if op.serial == key.serial && op.stage == Stage::Baseline => {}
            _ => return,
        }
        self.record_miss(key.op);
        match answer {
            BaselineAnswer::Translated { hpa, page_shift } => {
                if self.cfg.ats {
                    self.dispatch(key.op, Target::Translated(hpa), page_shift.min(63) as u8);
                } else {
                    self.dispatch(key.op, Target::Untranslated, 0);
                }
            }
            BaselineAnswer::Refused { fault_reason } => {
                self.finish(key.op, DmaResult::Fault(DmaError::Refused { fault_reason }));
            }
            BaselineAnswer::Failed => self.finish(key.op, DmaResult::LinkDown),
        }
    }
}
