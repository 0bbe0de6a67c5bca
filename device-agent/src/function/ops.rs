//! The accesses a function has in progress: what each one is waiting for and who wants
//! its outcome.
//!
//! A slab indexed by small integers (so the tables that refer to accesses, such as the
//! outstanding-tag map, hold a `u32`), with a serial number per access so that a stale
//! reference (a late baseline answer, a release of an access the link already failed)
//! can never touch a newer access in a reused slot.

use std::time::Instant;

use super::{Dma, Mode};

/// Index of an access in the slab.
pub(crate) type OpId = u32;

/// Names one access for as long as it lives: a slot and the serial of its occupant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AccessKey {
    pub(crate) op: OpId,
    pub(crate) serial: u64,
}

/// Who started an access and wants its outcome; `T` is the caller's token (the task's
/// reply channel; a plain number in tests).
#[derive(Debug)]
pub(crate) enum Owner<T> {
    /// An access of workload run `run`.
    Workload { run: u64 },
    /// A single access; the outcome goes to the caller.
    Caller(T),
    /// A hold: the caller is answered once the translation is known, and the DMA waits
    /// for a release.
    Hold(T),
    /// A held access (its hold already answered); the release's caller, once released.
    Held(Option<T>),
}

/// What an access is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// Not started.
    New,
    /// A unary baseline translation.
    Baseline,
    /// A translation request (its own or one it joined).
    Translation,
    /// A page group response (or a free PRI slot).
    PageRequest,
    /// Translated; the DMA waits for a release.
    Held,
    /// Its DMA.
    Dma,
}

/// Where the DMA goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    /// A translated request to this host address.
    Translated(u64),
    /// An untranslated request to the access's IOVA.
    Untranslated,
}

/// One access in progress.
#[derive(Debug)]
pub(super) struct Op<T> {
    pub(super) serial: u64,
    pub(super) iova: u64,
    pub(super) write: bool,
    pub(super) len: u32,
    pub(super) mode: Mode,
    pub(super) translate_only: bool,
    /// When it started (its intended start in open loop).
    pub(super) start: Instant,
    pub(super) owner: Owner<T>,
    pub(super) stage: Stage,
    pub(super) target: Option<Target>,
    pub(super) size_shift: u8,
    pub(super) atc_hit: bool,
    pub(super) coalesced: bool,
    pub(super) page_requested: bool,
    /// Its page request succeeded once already: no second one.
    pub(super) pri_done: bool,
    /// ITags whose completion waits for this access's DMA.
    pub(super) blocks: u32,
}

impl<T> Op<T> {
    pub(super) fn new(serial: u64, dma: Dma, start: Instant, owner: Owner<T>) -> Self {
        Self {
            serial,
            iova: dma.iova,
            write: dma.write,
            len: dma.len,
            mode: dma.mode,
            translate_only: dma.translate_only,
            start,
            owner,
            stage: Stage::New,
            target: None,
            size_shift: 0,
            atc_hit: false,
            coalesced: false,
            page_requested: false,
            pri_done: false,
            blocks: 0,
        }
    }

    /// Whether the access holds a device-TLB translation for a DMA that has not completed:
    /// what an invalidation must wait for.
    pub(super) fn uses_translation(&self) -> bool {
        matches!(self.stage, Stage::Held | Stage::Dma) && matches!(self.target, Some(Target::Translated(_)))
    }
}

/// The slab.
#[derive(Debug)]
pub(super) struct Ops<T> {
    slots: Vec<Option<Op<T>>>,
    free: Vec<OpId>,
    live: usize,
}

impl<T> Default for Ops<T> {
    fn default() -> Self {
        Self { slots: Vec::new(), free: Vec::new(), live: 0 }
    }
}

impl<T> Ops<T> {
    pub(super) fn insert(&mut self, op: Op<T>) -> OpId {
        self.live += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(op);
                i
            }
            None => {
                self.slots.push(Some(op));
                (self.slots.len() - 1) as OpId
            }
        }
    }

    pub(super) fn get(&self, id: OpId) -> Option<&Op<T>> {
        self.slots.get(id as usize).and_then(Option::as_ref)
    }

    pub(super) fn get_mut(&mut self, id: OpId) -> Option<&mut Op<T>> {
        self.slots.get_mut(id as usize).and_then(Option::as_mut)
    }

    pub(super) fn remove(&mut self, id: OpId) -> Option<Op<T>> {
        let op = self.slots.get_mut(id as usize)?.take()?;
        self.free.push(id);
        self.live -= 1;
        Some(op)
    }

    pub(super) fn len(&self) -> usize {
        self.live
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (OpId, &Op<T>)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| s.as_ref().map(|op| (i as OpId, op)))
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (OpId, &mut Op<T>)> {
        self.slots.iter_mut().enumerate().filter_map(|(i, s)| s.as_mut().map(|op| (i as OpId, op)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(serial: u64) -> Op<()> {
        Op::new(serial, Dma::read(0), Instant::now(), Owner::Workload { run: 1 })
    }

    #[test]
    fn slots_are_reused_and_counted() {
        let mut ops = Ops::<()>::default();
        let a = ops.insert(op(1));
        let b = ops.insert(op(2));
        assert_eq!(ops.len(), 2);
        assert_eq!(ops.remove(a).map(|o| o.serial), Some(1));
        assert!(ops.remove(a).is_none());
        let c = ops.insert(op(3));
        assert_eq!(c, a, "the free slot is reused");
        assert_eq!(ops.get(c).map(|o| o.serial), Some(3));
        assert_eq!(ops.iter().count(), 2);
        assert!(ops.get_mut(b).is_some());
        assert!(ops.get(99).is_none());
    }
}
