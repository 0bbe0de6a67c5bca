//! The invalidation queue (VT-d 6.5.2): its registers and the in-order processing of the
//! descriptors software writes into it.
//!
//! Owns IQA, IQH, IQT (VT-d 10.4.21-10.4.23), ICS (10.4.24), the invalidation completion
//! event (IECTL, IEDATA, IEADDR, IEUADDR, 10.4.25-10.4.28, an [`EventControl`]), IQERCD
//! (10.4.29) and the queue error bits of FSTS (IQE, ICE, ITE). Processing runs whenever
//! something can make progress: software moves the tail, a device completes an
//! invalidation, time passes ([`Unit::poll`]), or software clears an error.
//!
//! Rules, with their spec sections:
//! - A malformed descriptor (unknown type, reserved bits, AM above MAMV), an invalid tail,
//!   or a descriptor or status address the unit cannot access sets IQE with IQEI; IQH
//!   stays on the offending descriptor and the queue stops until software clears IQE
//!   (VT-d 6.5.2.10).
//! - A device-TLB descriptor goes out through the function's device port (`ports`), or
//!   completes at once for a function with no bound port (it has no device TLB). Either
//!   way it revokes the range from the function's translated-request grants
//!   (`crate::unit::grants`) recorded before it was processed, when it ends: at once
//!   without a port, else when the function acknowledges it or it times out (`ports`).
//! - A wait descriptor completes only once every earlier descriptor has, device-TLB ones
//!   included (VT-d 6.5.2.8): status write, then IWC and the invalidation event.
//! - IQE, ICE and ITE each stop fetching until software clears them; the first one set
//!   while none was pending raises the fault event (VT-d 7.3).
//!
//! Not here: what an invalidation does to the caches (`caches`), device ports and ITags
//! (`ports`), page group responses' layout (`crate::unit::prq`).

use std::collections::HashMap;
use std::time::Instant;

use super::descriptor::{self, Descriptor, QueueErrorCode, decode};
use super::ports::{DeviceInvalidation, PortState};
use super::{Effect, Effects};
use crate::ids::{Hpa, SourceId};
use crate::unit::Unit;
use crate::unit::event::EventControl;
use crate::unit::prq::PageGroupResponse;
use crate::unit::regs::{self, Iqercd, fsts, iq};

/// Bytes per descriptor: 128-bit descriptors only (IQA.DW = 0; 256-bit ones need scalable
/// mode, VT-d 6.5.2).
const DESCRIPTOR_BYTES: u64 = 16;

/// Why the queue stopped: the FSTS bit and the IQERCD field it records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QueueError {
    /// IQE with IQEI.
    Invalid(QueueErrorCode),
    /// ICE with ICESID.
    UnexpectedCompletion(SourceId),
    /// ITE with ITESID.
    TimedOut(SourceId),
}

/// State of the invalidation queue and of the device ports it sends through, behind the
/// queue lock.
#[derive(Debug, Default)]
pub(crate) struct QueueState {
    iqa: u64,
    /// Index of the next descriptor hardware fetches.
    head: u64,
    iqt: u64,
    enabled: bool,
    iqe: bool,
    ice: bool,
    ite: bool,
    iqercd: Iqercd,
    iwc: bool,
    /// IECTL, IEDATA, IEADDR, IEUADDR.
    event: EventControl,
    pub(crate) ports: HashMap<SourceId, PortState>,
}

impl QueueState {
    fn entries(&self) -> u64 {
        1 << (8 + (self.iqa & iq::IQA_QS_MASK))
    }

    fn base(&self) -> u64 {
        self.iqa & iq::IQA_BASE_MASK
    }

    fn tail(&self) -> u64 {
        self.iqt >> iq::INDEX_SHIFT
    }

    fn errors(&self) -> bool {
        self.iqe || self.ice || self.ite
    }

    fn outstanding(&self) -> u32 {
        self.ports.values().map(PortState::outstanding).sum()
    }

    /// Back to the reset state (VT-d 10.4.21-10.4.29): IQH, IQT, IQA, ICS and IQERCD 0,
    /// queued invalidation off (GSTS.QIES), no queue error in FSTS, IECTL back to IM set
    /// with IP clear, IEDATA, IEADDR, IEUADDR 0. The device ports stay bound (they are the
    /// wiring to the functions, not registers); what they had outstanding is abandoned
    /// (`PortState::reset`).
    pub(crate) fn reset(&mut self) {
        let ports = std::mem::take(&mut self.ports);
        *self = Self { ports, ..Self::default() };
        for port in self.ports.values_mut() {
            port.reset();
        }
    }

    /// Moves IQH past the descriptor it is on.
    pub(crate) fn skip_head(&mut self) {
        self.head = (self.head + 1) % self.entries();
    }
}

impl Unit {
    /// Stops the queue on `error`: sets its FSTS bit and IQERCD field and, when no queue
    /// error was pending, raises the fault event (VT-d 7.3).
    pub(crate) fn stop_queue(&self, q: &mut QueueState, error: QueueError, effects: &mut Effects) {
        let was = q.errors();
        match error {
            QueueError::Invalid(code) => {
                q.iqe = true;
                q.iqercd = q.iqercd.with_iqei(code as u8);
                self.counters.qi_errors.inc();
                tracing::debug!(?code, head = q.head, "invalidation queue error (IQE)");
            }
            QueueError::UnexpectedCompletion(sid) => {
                q.ice = true;
                q.iqercd = q.iqercd.with_icesid(sid);
            }
            QueueError::TimedOut(sid) => {
                q.ite = true;
                q.iqercd = q.iqercd.with_itesid(sid);
            }
        }
        effects.ring();
        if !was {
            effects.push(Effect::FaultEvent);
        }
    }

    /// Whether the queue is stalled on a wait descriptor at IQH.
    pub(crate) fn stalled_on_wait(&self, q: &QueueState) -> bool {
        if q.head == q.tail() {
            return false;
        }
        let at = Hpa(q.base() + q.head * DESCRIPTOR_BYTES);
        self.memory.read_u64(at).map(|qw0| descriptor::descriptor_type(qw0) == descriptor::WAIT_TYPE).unwrap_or(false)
    }

    /// Runs the queue as far as it can go.
    pub(crate) fn process(&self, q: &mut QueueState, now: Instant, effects: &mut Effects) {
        if !q.enabled || q.errors() {
            return;
        }
        let entries = q.entries();
        let tail = q.tail();
        let fail = |q: &mut QueueState, code: QueueErrorCode, effects: &mut Effects| {
            self.stop_queue(q, QueueError::Invalid(code), effects);
        };
        if q.iqa & iq::IQA_DW != 0 {
            return fail(q, QueueErrorCode::InvalidWidth, effects);
        }
        if tail >= entries {
            return fail(q, QueueErrorCode::InvalidTail, effects);
        }
        while q.head != tail {
            let at = q.base() + q.head * DESCRIPTOR_BYTES;
            let (Ok(qw0), Ok(qw1)) = (self.memory.read_u64(Hpa(at)), self.memory.read_u64(Hpa(at + 8))) else {
                return fail(q, QueueErrorCode::FetchError, effects);
            };
            let desc = match decode(qw0, qw1) {
                Ok(d) => d,
                Err(code) => return fail(q, code, effects),
            };
            match desc {
                Descriptor::Context(inv) => {
                    self.invalidate_context(inv);
                    self.counters.qi_context.inc();
                }
                Descriptor::Iotlb(inv) => {
                    if self.invalidate_iotlb(inv).is_err() {
                        return fail(q, QueueErrorCode::ReservedFields, effects);
                    }
                    self.counters.qi_iotlb.inc();
                }
                Descriptor::DeviceTlb(d) => {
                    let (base, len) = crate::ats::range::decode(d.addr_s);
                    if let Some(p) = q.ports.get_mut(&d.sid) {
                        let Some(itag) = p.take(d.queue_depth, now) else {
                            return; // stalled until one of the function's ITags completes
                        };
                        // Translated-request checking: the function may use the range
                        // until it acknowledges the invalidation (or it times out); the
                        // grants recorded until now go then (`ports`).
                        p.revoke_at_end(itag, self.grants.revoke_later(d.sid, base.0, len));
                        let request = DeviceInvalidation { sid: d.sid, itag, addr_s: d.addr_s };
                        effects.push(Effect::Invalidate(p.port.clone(), request));
                    } else {
                        // No device TLB: the invalidation ends as it is processed.
                        let evicted = self.grants.revoke(d.sid, base.0, len);
                        self.counters.translated_check_evictions.add(evicted as u64);
                    }
                    self.counters.qi_device_tlb.inc();
                }
                Descriptor::Iec(inv) => {
                    self.interrupts.invalidate(inv);
                    self.counters.qi_iec.inc();
                }
                Descriptor::Wait(w) => {
                    if q.outstanding() > 0 {
                        return; // stalled until every earlier device-TLB invalidation completes
                    }
                    if w.status_write && self.memory.write(Hpa(w.status_addr), &w.status_data.to_le_bytes()).is_err() {
                        return fail(q, QueueErrorCode::FetchError, effects);
                    }
                    // VT-d 6.5.2.8: IF sets IWC; the event is raised only when IWC was clear.
                    if w.interrupt && !q.iwc {
                        q.iwc = true;
                        if let Some(message) = q.event.raise() {
                            effects.push(Effect::Interrupt(message));
                        }
                    }
                    self.counters.qi_wait.inc();
                    effects.ring();
                }
                Descriptor::PageGroupResponse(qw0, qw1) => match PageGroupResponse::from_descriptor([qw0, qw1]) {
                    Ok(r) => {
                        // VT-d 7.6.1: the response completes group PRGI of RID, whatever
                        // the former LPIG bit (reserved since VT-d 4.0) holds.
                        if let Some(p) = q.ports.get(&r.sid) {
                            effects.push(Effect::PageResponse(p.port.clone(), r));
                        }
                        self.counters.qi_page_response.inc();
                    }
                    Err(_) => return fail(q, QueueErrorCode::ReservedFields, effects),
                },
            }
            q.head = (q.head + 1) % entries;
        }
    }

    /// Whether FSTS holds an invalidation-queue error, which holds back fault events.
    pub(crate) fn queue_error_pending(&self) -> bool {
        self.queue.lock().errors()
    }

    /// Withdraws a held fault event once software has serviced every condition behind
    /// it, the queue errors included (VT-d 10.4.10; `fault`). Decided under the queue lock
    /// (the fault recorder's nests under it, as in `Unit::reset`), so an IQE, ICE or ITE
    /// set by another thread is either seen here or raises its event after the withdrawal.
    pub(crate) fn withdraw_fault_event(&self) {
        let q = self.queue.lock();
        self.faults.withdraw_if_serviced(q.errors());
    }

    /// FSTS queue bits.
    pub(crate) fn queue_fsts(&self) -> u32 {
        let q = self.queue.lock();
        (if q.iqe { fsts::IQE } else { 0 }) | (if q.ice { fsts::ICE } else { 0 }) | (if q.ite { fsts::ITE } else { 0 })
    }

    /// FSTS write: IQE, ICE and ITE are write-1-to-clear; clearing them lets the queue
    /// resume.
    pub(crate) fn clear_queue_errors(&self, value: u32) {
        let mut effects = Effects::default();
        {
            let mut q = self.queue.lock();
            if value & fsts::IQE != 0 {
                q.iqe = false;
            }
            if value & fsts::ICE != 0 {
                q.ice = false;
            }
            if value & fsts::ITE != 0 {
                q.ite = false;
            }
            self.process(&mut q, self.clock.now(), &mut effects);
        }
        self.apply(effects);
    }

    /// GCMD.QIE: enabling resets IQH to 0 (VT-d 10.4.4).
    pub(crate) fn set_queue_enabled(&self, on: bool) {
        let mut q = self.queue.lock();
        if on && !q.enabled {
            q.head = 0;
        }
        q.enabled = on;
    }

    /// Reads the 64-bit slot at `offset` (8-aligned) among the queue registers: IQH, IQT,
    /// IQA, ICS (high half of its slot), IECTL|IEDATA, IEADDR|IEUADDR, IQERCD.
    pub(crate) fn read_queue_slot(&self, offset: u64) -> u64 {
        if offset == regs::IQH || offset == regs::ICS & !7 {
            self.poll(self.clock.now());
        }
        let q = self.queue.lock();
        let pair = |lo: u64| u64::from(q.event.read(lo)) | (u64::from(q.event.read(lo + 4)) << 32);
        match offset {
            regs::IQH => q.head << iq::INDEX_SHIFT,
            regs::IQT => q.iqt,
            regs::IQA => q.iqa,
            o if o == regs::ICS & !7 => u64::from(if q.iwc { iq::ICS_IWC } else { 0 }) << 32,
            regs::IECTL => pair(regs::event::CTL),
            regs::IEADDR => pair(regs::event::ADDR),
            regs::IQERCD => q.iqercd.to_bits(),
            _ => 0,
        }
    }

    /// Writes a 32-bit queue register: ICS or the invalidation event block.
    pub(crate) fn write_queue_reg32(&self, offset: u64, value: u32) {
        let mut effects = Effects::default();
        {
            let mut q = self.queue.lock();
            match offset {
                regs::ICS if value & iq::ICS_IWC != 0 => q.iwc = false,
                o if (regs::IECTL..regs::IECTL + regs::event::BYTES).contains(&o) => {
                    if let Some(message) = q.event.write(o - regs::IECTL, value) {
                        effects.push(Effect::Interrupt(message));
                    }
                }
                _ => {}
            }
        }
        self.apply(effects);
    }

    /// Writes a 64-bit queue register (IQA or IQT; IQH and IQERCD are read-only).
    pub(crate) fn write_queue_reg64(&self, offset: u64, value: u64) {
        let mut effects = Effects::default();
        {
            let mut q = self.queue.lock();
            match offset {
                regs::IQA => q.iqa = value & !iq::IQA_RESERVED,
                regs::IQT => {
                    q.iqt = value & iq::OFFSET_MASK;
                    self.process(&mut q, self.clock.now(), &mut effects);
                }
                _ => {}
            }
        }
        self.apply(effects);
    }
}
