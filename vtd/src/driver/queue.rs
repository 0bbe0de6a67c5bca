//! Queued invalidation, the driver's side (VT-d 6.5.2; registers VT-d 10.4.21-10.4.29): the
//! invalidation queue in host memory, its status page, submission with a wait descriptor,
//! and recovery from queue errors, after Linux `drivers/iommu/intel/dmar.c`
//! (`dmar_enable_qi`, `qi_submit_sync`, `qi_check_fault`).
//!
//! This module owns the 4 KiB queue (256 128-bit descriptors, IQA.QS=0) and a status page,
//! both taken from the table region for the driver's life, the software tail, and the
//! record of every submission still in flight. It does not choose what to invalidate.
//!
//! Rules:
//! - Every submission is its descriptors followed by one wait descriptor (SW=1, FN=1) that
//!   writes a fresh 32-bit sequence number to the status word. The unit processes the
//!   queue in order and a wait completes only after every earlier descriptor has, device-TLB
//!   invalidations included (VT-d 6.5.2.8), so a status word at or past a submission's
//!   number means it completed (the AMD IOMMU driver's `cmd_sem` scheme; Linux intel uses a
//!   status slot per descriptor instead). Sequence numbers skip 0, the status page's
//!   initial value.
//! - One lock guards the tail and the in-flight list; it is held only to write descriptors
//!   and move IQT, never while waiting. Waiters poll the status word in memory without it,
//!   reading FSTS as they go (a register read lets time pass in the unit, so a device-TLB
//!   time-out becomes ITE), spinning first, then yielding, then sleeping on the doorbell
//!   (`doorbell`: the stand-in for the invalidation completion event) with a time-out.
//!   A slot is reused only once IQH has moved past it.
//! - IQE (a malformed descriptor; VT-d 6.5.2.10): IQH stays on the bad descriptor. The
//!   driver overwrites it with a no-op wait (SW=0) and clears IQE so the queue runs on
//!   (Linux copies its wait descriptor there), and the submission that owned it fails with
//!   [`DriverError::Hardware`] naming IQERCD.IQEI and the descriptor: the driver builds
//!   its descriptors itself, so this means a bug. A descriptor software handed in raw
//!   (`Driver::submit_descriptors`) is checked first, but some errors only the unit sees
//!   (a wait whose status address it cannot write): that submission fails with
//!   [`DriverError::InvalidDescriptor`], the caller's error.
//! - ITE (a device did not answer in time): the unit abandoned every outstanding device-TLB
//!   invalidation and skipped the wait it was stalled on. As in Linux, every submission
//!   whose wait had not completed is marked aborted before ITE is cleared, and its
//!   submitter resubmits it, without the device-TLB descriptors of the device named by
//!   IQERCD.ITESID. So the IOTLB, paging-structure caches and other devices' TLBs are
//!   always invalidated before [`InvalidationQueue::run`] returns; the timed-out device is
//!   reported as [`DriverError::DeviceTlbTimeout`].
//! - ICE (a completion nobody asked for) stops the queue too; it is cleared and logged,
//!   as Linux does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tracing::{debug, warn};

use super::doorbell::Doorbell;
use super::error::DriverError;
use super::frames::FrameAllocator;
use super::invalidate::Invalidation;
use super::registers::Registers;
use crate::ids::{Hpa, SourceId};
use crate::unit::InvalidationDoorbell;
use crate::unit::invalidation::descriptor::{QueueErrorCode, WaitDesc, encode};
use crate::unit::memory::HostMemory;
use crate::unit::regs::{self, Iqercd, fsts, iq};

/// Descriptors in the queue: IQA.QS=0 gives 2^(0+8) 128-bit entries, one 4 KiB page
/// (VT-d 10.4.23).
const ENTRIES: u64 = 256;
/// Bytes per descriptor (128-bit descriptors: IQA.DW=0).
const DESC_SIZE: u64 = 16;
/// Most descriptors in one submission before its wait; bigger batches are split, so a
/// submission never needs more than half the queue.
const MAX_BATCH: usize = 127;
/// How many times a batch is resubmitted after time-outs before the driver gives up. Each
/// attempt that times out drops one unresponsive device, so this bounds the wait even when
/// several devices are gone.
const MAX_ATTEMPTS: usize = 16;

/// FSTS bits that stop the queue.
const QUEUE_ERRORS: u32 = fsts::QUEUE_ERRORS;

/// `status` has reached `seq` (wrapping comparison of sequence numbers).
fn reached(status: u32, seq: u32) -> bool {
    status.wrapping_sub(seq) as i32 >= 0
}

/// Whether ring index `i` lies in `[first, last]`, going forward around the ring.
fn ring_contains(first: u64, last: u64, i: u64) -> bool {
    (i + ENTRIES - first) % ENTRIES <= (last + ENTRIES - first) % ENTRIES
}

/// Why a submission did not complete normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Its wait was abandoned or may have been, after a device-TLB time-out (ITE).
    Aborted {
        /// IQERCD.ITESID: the device that timed out.
        sid: SourceId,
    },
    /// One of its descriptors was refused (IQE).
    Malformed {
        /// IQERCD.IQEI.
        iqei: u8,
        /// The refused descriptor.
        qw0: u64,
        /// Its second quadword.
        qw1: u64,
    },
}

/// A submission whose waiter has not collected its result yet.
#[derive(Debug)]
struct Inflight {
    seq: u32,
    /// Ring index of its first descriptor.
    first: u64,
    /// Ring index of its wait descriptor.
    wait: u64,
    outcome: Option<Outcome>,
}

/// The software side of the queue, behind the queue lock.
#[derive(Debug)]
struct Ring {
    /// Next free index (IQT / 16).
    tail: u64,
    /// IQH / 16 as last read: slots from here to `tail` may still be unread.
    head: u64,
    /// Sequence number of the next submission (never 0).
    next_seq: u32,
    inflight: Vec<Inflight>,
}

impl Ring {
    fn free(&self) -> u64 {
        ENTRIES - 1 - (self.tail + ENTRIES - self.head) % ENTRIES
    }

    fn take_seq(&mut self) -> u32 {
        let seq = self.next_seq;
        self.next_seq = match seq.wrapping_add(1) {
            0 => 1,
            n => n,
        };
        seq
    }

    /// Removes `seq` from the in-flight list and returns how it ended.
    fn finish(&mut self, seq: u32) -> Option<Outcome> {
        let i = self.inflight.iter().position(|e| e.seq == seq)?;
        self.inflight.swap_remove(i).outcome
    }
}

/// A submission to wait for.
#[derive(Clone, Copy, Debug)]
struct Ticket {
    /// The status value its wait descriptor writes.
    seq: u32,
    /// [`InvalidationQueue::errors_handled`] when it was submitted.
    errors_handled: u64,
}

/// The first chunk of a batch, submitted by [`InvalidationQueue::start`] and not yet waited
/// for (`None`: the batch was empty).
#[derive(Debug)]
#[must_use = "a started batch must be finished"]
pub(crate) struct Started(Result<Option<Ticket>, Failure>);

/// Why one attempt at a batch failed.
#[derive(Debug)]
enum Failure {
    Outcome(Outcome),
    Driver(DriverError),
}

impl From<DriverError> for Failure {
    fn from(e: DriverError) -> Self {
        Self::Driver(e)
    }
}

/// Escalating pause for pollers: spin, then yield the CPU, then sleep briefly.
#[derive(Debug, Default)]
struct Backoff {
    round: u32,
}

impl Backoff {
    const SPINS: u32 = 64;
    const YIELDS: u32 = 256;

    /// Whether to look at FSTS this round: every 16th round while spinning and yielding (a
    /// register read takes the unit's queue lock, which answering devices need too; the
    /// errors it finds are time-outs of milliseconds), every round once sleeping.
    fn check_errors(&self) -> bool {
        self.round >= Self::SPINS + Self::YIELDS || self.round % 16 == 15
    }

    /// Pauses; `seen` is the doorbell's ring count read before the caller last looked.
    fn snooze(&mut self, doorbell: &Doorbell, seen: u64) {
        if self.round < Self::SPINS {
            std::hint::spin_loop();
        } else if self.round < Self::SPINS + Self::YIELDS {
            std::thread::yield_now();
        } else {
            // Sleep until the unit completes a wait or stops on an error (the doorbell, for
            // the invalidation completion event), waking at least every 1 ms to read FSTS
            // so that time-outs are noticed even when nothing else polls the unit.
            let k = (self.round - Self::SPINS - Self::YIELDS).min(6);
            doorbell.sleep(seen, Duration::from_micros(15 << k));
        }
        self.round = self.round.saturating_add(1);
    }
}

/// The invalidation queue of one unit.
#[derive(Debug)]
pub(crate) struct InvalidationQueue {
    memory: Arc<HostMemory>,
    /// The queue page (IQA).
    base: Hpa,
    /// The status word every wait descriptor writes (first 4 bytes of the status page).
    status: Hpa,
    ring: Mutex<Ring>,
    /// Bumped whenever queue errors are handled, so waiters know to look for an outcome.
    errors_handled: AtomicU64,
    /// Rung by the unit when a wait completes or the queue stops on an error.
    doorbell: Arc<Doorbell>,
}

impl InvalidationQueue {
    /// Allocates the queue and its status page and turns queued invalidation on (Linux
    /// `dmar_enable_qi`): QIE off if a previous owner left it on, IQT = 0, IQA = the queue
    /// with QS=0 and DW=0 (128-bit descriptors: no scalable mode), then GCMD.QIE with the
    /// rest of the command state kept (VT-d 10.4.4). Enabling resets IQH to 0.
    pub(crate) fn enable(
        memory: Arc<HostMemory>,
        regs: &Registers,
        frames: &FrameAllocator,
    ) -> Result<Self, DriverError> {
        let base = frames.alloc()?;
        let status = match frames.alloc() {
            Ok(f) => f,
            Err(e) => {
                frames.free(base);
                return Err(e);
            }
        };
        regs.disable_queued_invalidation()?;
        regs.write64(regs::IQT, 0)?;
        regs.write64(regs::IQA, base.0)?;
        regs.enable_queued_invalidation()?;
        let doorbell = Arc::new(Doorbell::default());
        let weak: Weak<dyn InvalidationDoorbell> = Arc::downgrade(&doorbell) as Weak<Doorbell>;
        regs.unit().subscribe_invalidation_doorbell(weak);
        debug!(queue = %base, status = %status, entries = ENTRIES, "queued invalidation enabled");
        Ok(Self {
            memory,
            base,
            status,
            ring: Mutex::new(Ring { tail: 0, head: 0, next_seq: 1, inflight: Vec::new() }),
            errors_handled: AtomicU64::new(0),
            doorbell,
        })
    }

    /// Frames the queue holds for the driver's life (queue page and status page).
    pub(crate) const FRAMES: usize = 2;

    /// Runs `batch` and returns once every request in it has completed.
    ///
    /// After a device-TLB time-out the batch is resubmitted without the timed-out device's
    /// descriptors (the unit abandoned every outstanding device-TLB invalidation, other
    /// devices' included), and the time-out is reported once the rest has completed: see
    /// the module rules.
    pub(crate) fn run(
        &self,
        regs: &Registers,
        batch: &[Invalidation],
        read_drain: bool,
        write_drain: bool,
    ) -> Result<(), DriverError> {
        let started = self.start(regs, batch, read_drain, write_drain);
        self.finish(regs, batch, started, read_drain, write_drain)
    }

    /// Submits the first chunk of `batch` (all of it up to [`MAX_BATCH`] requests) without
    /// waiting, so that a caller invalidating on several units can have every unit working
    /// before it waits on any (Linux `iommu_flush_iotlb_psi` per iommu of the domain).
    /// [`Self::finish`] with the same batch waits for it and does the rest.
    pub(crate) fn start(
        &self,
        regs: &Registers,
        batch: &[Invalidation],
        read_drain: bool,
        write_drain: bool,
    ) -> Started {
        let chunk = &batch[..batch.len().min(MAX_BATCH)];
        if chunk.is_empty() {
            return Started(Ok(None));
        }
        let descs = chunk.iter().map(|op| op.descriptor(read_drain, write_drain));
        Started(self.submit(regs, descs).map(Some))
    }

    /// Completes a batch [`Self::start`] began: waits for its first chunk, runs the rest,
    /// and resubmits after time-outs as [`Self::run`] describes.
    pub(crate) fn finish(
        &self,
        regs: &Registers,
        batch: &[Invalidation],
        started: Started,
        read_drain: bool,
        write_drain: bool,
    ) -> Result<(), DriverError> {
        let mut ops = std::borrow::Cow::Borrowed(batch);
        let mut timed_out = None;
        let mut started = Some(started);
        for attempt in 0..MAX_ATTEMPTS {
            let outcome = match started.take() {
                Some(Started(first)) => first.and_then(|ticket| {
                    if let Some(ticket) = ticket {
                        self.wait(regs, ticket)?;
                    }
                    self.run_once(regs, ops.get(MAX_BATCH..).unwrap_or_default(), read_drain, write_drain)
                }),
                None => self.run_once(regs, &ops, read_drain, write_drain),
            };
            match outcome {
                Ok(()) => {
                    return match timed_out {
                        Some(sid) => Err(DriverError::DeviceTlbTimeout { sid }),
                        None => Ok(()),
                    };
                }
                Err(Failure::Outcome(Outcome::Aborted { sid })) => {
                    let before = ops.len();
                    ops.to_mut().retain(|op| !matches!(op, Invalidation::DeviceTlb { sid: s, .. } if *s == sid));
                    if ops.len() != before {
                        timed_out.get_or_insert(sid);
                    }
                    debug!(%sid, attempt, "invalidation aborted by a device-TLB time-out; resubmitting");
                }
                Err(Failure::Outcome(Outcome::Malformed { iqei, qw0, qw1 })) => {
                    // A descriptor the caller wrote (software's raw submission) is the
                    // caller's error, e.g. a wait whose status address the unit cannot
                    // write (IQEI 2); one the driver built means a bug.
                    if ops.iter().any(|op| matches!(op, Invalidation::Raw(a, b) if (*a, *b) == (qw0, qw1))) {
                        return Err(DriverError::InvalidDescriptor {
                            qw0,
                            qw1,
                            why: format!("the unit refused it (invalidation queue error {iqei})"),
                        });
                    }
                    return Err(DriverError::Hardware(format!(
                        "invalidation queue error {iqei} on descriptor {qw0:#018x} {qw1:#018x}"
                    )));
                }
                Err(Failure::Driver(e)) => return Err(e),
            }
        }
        Err(DriverError::Hardware(format!("invalidation aborted by device-TLB time-outs {MAX_ATTEMPTS} times")))
    }

    fn run_once(
        &self,
        regs: &Registers,
        ops: &[Invalidation],
        read_drain: bool,
        write_drain: bool,
    ) -> Result<(), Failure> {
        if ops.is_empty() {
            return Ok(());
        }
        for chunk in ops.chunks(MAX_BATCH) {
            let descs = chunk.iter().map(|op| op.descriptor(read_drain, write_drain));
            let ticket = self.submit(regs, descs)?;
            self.wait(regs, ticket)?;
        }
        Ok(())
    }

    /// Writes `ops` and a wait descriptor at the tail and moves IQT past them (Linux
    /// `qi_submit_sync` up to the `writel(DMAR_IQT_REG)`). Waits for room if the queue is
    /// full. Returns what [`Self::wait`] needs.
    fn submit(
        &self,
        regs: &Registers,
        descs: impl ExactSizeIterator<Item = (u64, u64)> + Clone,
    ) -> Result<Ticket, Failure> {
        let needed = descs.len() as u64 + 1;
        let mut backoff = Backoff::default();
        loop {
            let rung = self.doorbell.rings();
            {
                let mut ring = self.ring.lock();
                if ring.free() < needed {
                    ring.head = (regs.read64(regs::IQH)? >> iq::INDEX_SHIFT) % ENTRIES;
                }
                if ring.free() >= needed {
                    return self.submit_locked(&mut ring, regs, descs).map_err(Failure::from);
                }
            }
            // Full: the unit is working through it or stopped on an error.
            if backoff.check_errors() {
                self.check_errors(regs)?;
            }
            backoff.snooze(&self.doorbell, rung);
        }
    }

    fn submit_locked(
        &self,
        ring: &mut Ring,
        regs: &Registers,
        descs: impl Iterator<Item = (u64, u64)>,
    ) -> Result<Ticket, DriverError> {
        let first = ring.tail;
        let mut at = first;
        for desc in descs {
            self.write_desc(at, desc)?;
            at = (at + 1) % ENTRIES;
        }
        let seq = ring.take_seq();
        // VT-d 6.5.2.8: SW=1 writes the status, FN=1 holds later descriptors back until
        // this one (and so everything before it) is done. No interrupt: the driver polls.
        let wait = WaitDesc {
            interrupt: false,
            status_write: true,
            fence: true,
            status_data: seq,
            status_addr: self.status.0,
        };
        self.write_desc(at, encode::wait(wait))?;
        ring.inflight.push(Inflight { seq, first, wait: at, outcome: None });
        ring.tail = (at + 1) % ENTRIES;
        // The unit fetches as soon as IQT moves (and may call device ports from here).
        if let Err(e) = regs.write64(regs::IQT, ring.tail << iq::INDEX_SHIFT) {
            ring.finish(seq);
            return Err(e);
        }
        // Error handling runs under the queue lock too, so any handling that could mark
        // this submission comes after this count.
        Ok(Ticket { seq, errors_handled: self.errors_handled.load(Ordering::Acquire) })
    }

    fn write_desc(&self, index: u64, (qw0, qw1): (u64, u64)) -> Result<(), DriverError> {
        let at = self.base.0 + index * DESC_SIZE;
        // qw1 first: the unit only fetches up to IQT, which moves after both are written.
        self.memory.write_u64(Hpa(at + 8), qw1)?;
        self.memory.write_u64(Hpa(at), qw0)?;
        Ok(())
    }

    fn read_status(&self) -> Result<u32, DriverError> {
        Ok(self.memory.read_u64(self.status)? as u32)
    }

    /// Waits until the submission `seq` completed or failed (Linux `qi_submit_sync`'s
    /// polling loop, without the queue lock).
    fn wait(&self, regs: &Registers, ticket: Ticket) -> Result<(), Failure> {
        let result = self.wait_inner(regs, ticket);
        if let Err(Failure::Driver(_)) = result {
            self.ring.lock().finish(ticket.seq); // the caller gives up on it
        }
        result
    }

    fn wait_inner(&self, regs: &Registers, Ticket { seq, errors_handled }: Ticket) -> Result<(), Failure> {
        let mut backoff = Backoff::default();
        let mut seen_errors = errors_handled;
        loop {
            let rung = self.doorbell.rings();
            if reached(self.read_status()?, seq) {
                return match self.ring.lock().finish(seq) {
                    None => Ok(()),
                    Some(outcome) => Err(Failure::Outcome(outcome)),
                };
            }
            if backoff.check_errors() {
                // Reading FSTS lets time pass in the unit (`Unit::poll`), which is how a
                // device-TLB time-out becomes ITE.
                self.check_errors(regs)?;
                let handled = self.errors_handled.load(Ordering::Acquire);
                if handled != seen_errors {
                    seen_errors = handled;
                    let mut ring = self.ring.lock();
                    let failed = ring.inflight.iter().find(|e| e.seq == seq).and_then(|e| e.outcome);
                    if let Some(outcome) = failed {
                        ring.finish(seq);
                        return Err(Failure::Outcome(outcome));
                    }
                }
            }
            backoff.snooze(&self.doorbell, rung);
        }
    }

    /// Reads FSTS and, if the queue stopped on an error, recovers it.
    fn check_errors(&self, regs: &Registers) -> Result<(), DriverError> {
        if regs.read32(regs::FSTS)? & QUEUE_ERRORS == 0 {
            return Ok(());
        }
        let mut ring = self.ring.lock();
        self.handle_errors(regs, &mut ring)
    }

    /// Linux `qi_check_fault`, under the queue lock (FSTS is read again: another waiter
    /// may have handled the error already).
    fn handle_errors(&self, regs: &Registers, ring: &mut Ring) -> Result<(), DriverError> {
        let fsts = regs.read32(regs::FSTS)?;
        if fsts & QUEUE_ERRORS == 0 {
            return Ok(());
        }
        let iqercd = Iqercd::from_bits(regs.read64(regs::IQERCD)?);
        let mut result = Ok(());
        if fsts & fsts::IQE != 0 {
            result = self.recover_iqe(regs, ring, iqercd);
        }
        if fsts & fsts::ITE != 0 {
            // The status word cannot move while ITE stops the queue: every submission not
            // reached by now lost its wait or may have lost device-TLB invalidations.
            let sid = iqercd.itesid();
            let status = self.read_status()?;
            let mut aborted = 0;
            for e in ring.inflight.iter_mut().filter(|e| e.outcome.is_none() && !reached(status, e.seq)) {
                e.outcome = Some(Outcome::Aborted { sid });
                aborted += 1;
            }
            warn!(%sid, aborted, "device-TLB invalidation timed out (ITE); resubmitting");
            regs.write32(regs::FSTS, fsts::ITE)?;
        }
        if fsts & fsts::ICE != 0 {
            let sid = iqercd.icesid();
            warn!(%sid, "unexpected invalidation completion (ICE) cleared");
            regs.write32(regs::FSTS, fsts::ICE)?;
        }
        self.errors_handled.fetch_add(1, Ordering::AcqRel);
        result
    }

    /// IQE: replace the descriptor IQH stopped on with a no-op wait, mark its submission
    /// failed, clear IQE (VT-d 6.5.2.10).
    fn recover_iqe(&self, regs: &Registers, ring: &mut Ring, iqercd: Iqercd) -> Result<(), DriverError> {
        let iqei = iqercd.iqei();
        // IQEI 1 (tail beyond the queue) and 5 (IQA.DW without scalable mode) are not about
        // a descriptor: the driver programmed IQT or IQA wrong, and nothing here fixes that.
        if iqei == QueueErrorCode::InvalidTail as u8 || iqei == QueueErrorCode::InvalidWidth as u8 {
            return Err(DriverError::Hardware(format!("invalidation queue error {iqei} (queue registers)")));
        }
        let head = (regs.read64(regs::IQH)? >> iq::INDEX_SHIFT) % ENTRIES;
        let at = Hpa(self.base.0 + head * DESC_SIZE);
        let qw0 = self.memory.read_u64(at)?;
        let qw1 = self.memory.read_u64(Hpa(at.0 + 8))?;
        let noop = WaitDesc { interrupt: false, status_write: false, fence: true, status_data: 0, status_addr: 0 };
        self.write_desc(head, encode::wait(noop))?;
        // The owner may have given up waiting already; the repair is needed all the same.
        if let Some(owner) = ring.inflight.iter_mut().find(|e| ring_contains(e.first, e.wait, head)) {
            owner.outcome.get_or_insert(Outcome::Malformed { iqei, qw0, qw1 });
        }
        warn!(iqei, qw0, qw1, index = head, "invalid invalidation descriptor (IQE) replaced");
        regs.write32(regs::FSTS, fsts::IQE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{DomainId, Iova};
    use crate::unit::invalidation::IotlbInvalidation;
    use crate::unit::{Unit, UnitConfig};

    fn queue() -> (Arc<Unit>, Registers, InvalidationQueue) {
        let memory = Arc::new(HostMemory::new(64 << 20).unwrap());
        let unit = Arc::new(Unit::new(UnitConfig::default(), memory.clone()));
        let regs = Registers::new(unit.clone());
        let frames = FrameAllocator::new(memory.clone(), Hpa(32 << 20), 1 << 20).unwrap();
        let q = InvalidationQueue::enable(memory, &regs, &frames).unwrap();
        (unit, regs, q)
    }

    fn raw(q: &InvalidationQueue, regs: &Registers, descs: &[(u64, u64)]) -> Result<(), Failure> {
        let ticket = q.submit(regs, descs.iter().copied())?;
        q.wait(regs, ticket)
    }

    #[test]
    fn a_malformed_descriptor_fails_its_submission_and_the_queue_recovers() {
        let (unit, regs, q) = queue();
        assert_ne!(regs.read32(regs::GSTS).unwrap() & regs::gcmd::QIE, 0);
        let good = encode::iotlb(IotlbInvalidation::Domain(DomainId(3)));
        // AM=19 is above MAMV: the unit refuses it (IQE, IQEI=4).
        let bad = encode::iotlb(IotlbInvalidation::Page { did: DomainId(3), addr: Iova(0), am: 19, ih: false });
        let Err(Failure::Outcome(Outcome::Malformed { iqei, qw0, qw1 })) = raw(&q, &regs, &[good, bad, good]) else {
            panic!("the bad descriptor was not reported");
        };
        assert_eq!((iqei, qw0, qw1), (4, bad.0, bad.1));
        assert_eq!(regs.read32(regs::FSTS).unwrap() & QUEUE_ERRORS, 0, "IQE cleared");
        assert!(q.ring.lock().inflight.is_empty());
        // The queue runs on: later submissions complete, past the replaced descriptor.
        let waits = unit.stats().qi_wait;
        assert!(raw(&q, &regs, &[good]).is_ok());
        assert!(unit.stats().qi_wait > waits);
        assert_eq!(regs.read64(regs::IQH).unwrap(), regs.read64(regs::IQT).unwrap());
    }

    #[test]
    fn submissions_wrap_around_the_ring() {
        let (unit, regs, q) = queue();
        let desc = encode::iotlb(IotlbInvalidation::Global);
        let batch = vec![desc; MAX_BATCH];
        for _ in 0..5 {
            assert!(raw(&q, &regs, &batch).is_ok());
        }
        assert_eq!(unit.stats().qi_wait, 5);
        assert_eq!(unit.stats().qi_iotlb, 5 * MAX_BATCH as u64);
        assert_eq!(q.ring.lock().tail, (5 * (MAX_BATCH as u64 + 1)) % ENTRIES);
    }

    #[test]
    fn sequence_numbers_compare_across_the_wrap_and_skip_zero() {
        assert!(reached(5, 5) && reached(6, 5) && !reached(4, 5));
        assert!(!reached(0, 1), "the zeroed status page reaches nothing");
        assert!(reached(2, u32::MAX), "past the wrap");
        let mut ring = Ring { tail: 0, head: 0, next_seq: u32::MAX, inflight: Vec::new() };
        assert_eq!(ring.take_seq(), u32::MAX);
        assert_eq!(ring.take_seq(), 1);
    }

    #[test]
    fn ring_space_and_membership_wrap() {
        let mut ring = Ring { tail: 250, head: 10, next_seq: 1, inflight: Vec::new() };
        assert_eq!(ring.free(), 15);
        ring.tail = 5;
        assert_eq!(ring.free(), 4);
        assert!(ring_contains(250, 3, 255) && ring_contains(250, 3, 0) && ring_contains(250, 3, 3));
        assert!(!ring_contains(250, 3, 4) && !ring_contains(250, 3, 249));
        assert!(ring_contains(7, 7, 7) && !ring_contains(7, 8, 9));
    }
}
