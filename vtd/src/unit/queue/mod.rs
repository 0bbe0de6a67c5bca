//! Queued invalidation (VT-d 6.5.2): the invalidation queue, its registers, and the
//! device-TLB invalidations it sends through device ports.
//!
//! Owns IQA/IQH/IQT, ICS and the invalidation event (IECTL/IEDATA/IEADDR), IQERCD and the
//! FSTS queue-error bits (IQE, ICE, ITE), and the outstanding ITags of every bound device
//! port. Processing is in order and runs whenever something can make progress: software
//! moves the tail, a device completes an invalidation, time passes ([`Unit::poll`]), or
//! software clears an error.
//!
//! Rules, with their spec sections:
//! - A malformed descriptor (unknown type, reserved bits, AM above MAMV), an invalid tail,
//!   or a descriptor or status address the unit cannot access sets IQE with IQEI; IQH
//!   stays on the offending descriptor and the queue stops until software clears IQE
//!   (VT-d 6.5.2.10).
//! - A device-TLB descriptor takes an ITag for its function, at most the lesser of the
//!   function's invalidate queue depth and the descriptor's MIP outstanding (a function
//!   with none free stalls the queue until one completes). Functions with no bound port
//!   have no device TLB: the descriptor completes at once.
//! - A wait descriptor completes only once every earlier descriptor has, device-TLB ones
//!   included (VT-d 6.5.2.8): status write, then IWC and the invalidation event.
//! - An ITag outstanding longer than the configured time-out sets ITE with the function's
//!   SID in IQERCD.ITESID; every outstanding device-TLB invalidation is abandoned, a wait
//!   the queue was stalled on is aborted without its status write, and fetching stops
//!   until software clears ITE (VT-d 6.5.2.10; Linux `qi_check_fault` resubmits). A vanished
//!   device therefore never hangs the queue.
//! - A completion for an ITag that is not outstanding sets ICE with ICESID.
//! - Unbinding a port (the device went away) completes its outstanding invalidations: a
//!   function that comes back starts with an empty device TLB.

pub mod descriptor;
pub mod port;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::descriptor::{Descriptor, QueueErrorCode, decode};
use self::port::{DeviceInvalidation, DevicePort, PageResponse, PortState};
use super::Unit;
use super::interrupt::IecInvalidation;
use super::prq::PageGroupResponse;
use super::regs::{fectl, fsts};
use crate::ids::{Hpa, ITag, SourceId};

/// A port could not be bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// Another port already serves this function.
    #[error("requester id {0} is already bound to a device port")]
    AlreadyBound(SourceId),
    /// The invalidate queue depth is outside 1..=32.
    #[error("invalidate queue depth {0} is outside 1..=32")]
    InvalidDepth(u8),
}

/// A completion the unit did not expect (it also sets ICE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalidation completion from {sid} for ITag {} that is not outstanding", itag.0)]
pub struct UnexpectedCompletion {
    /// The function.
    pub sid: SourceId,
    /// The tag it carried.
    pub itag: ITag,
}

/// A counter bumped whenever the queue completes a wait descriptor or stops on an error,
/// with a condition variable, so that software waiting for its wait descriptor can sleep
/// until something happened instead of polling memory on a timer.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    count: parking_lot::Mutex<u64>,
    changed: parking_lot::Condvar,
}

impl Progress {
    fn bump(&self) {
        *self.count.lock() += 1;
        self.changed.notify_all();
    }
}

/// State of the invalidation queue.
#[derive(Debug)]
pub(crate) struct QueueState {
    iqa: u64,
    /// Index of the next descriptor hardware fetches.
    head: u64,
    iqt: u64,
    enabled: bool,
    iqe: bool,
    ice: bool,
    ite: bool,
    iqercd: u64,
    iwc: bool,
    iectl_im: bool,
    iectl_ip: bool,
    iedata: u32,
    ieaddr: u32,
    ieuaddr: u32,
    ports: HashMap<SourceId, PortState>,
}

impl Default for QueueState {
    fn default() -> Self {
        Self {
            iqa: 0,
            head: 0,
            iqt: 0,
            enabled: false,
            iqe: false,
            ice: false,
            ite: false,
            iqercd: 0,
            iwc: false,
            iectl_im: true,
            iectl_ip: false,
            iedata: 0,
            ieaddr: 0,
            ieuaddr: 0,
            ports: HashMap::new(),
        }
    }
}

impl QueueState {
    fn entries(&self) -> u64 {
        1 << (8 + (self.iqa & 7))
    }

    fn base(&self) -> u64 {
        self.iqa & !0xfff
    }

    fn errors(&self) -> bool {
        self.iqe || self.ice || self.ite
    }

    fn outstanding(&self) -> u32 {
        self.ports.values().map(PortState::outstanding).sum()
    }

    fn event_message(&self) -> (u64, u32) {
        ((u64::from(self.ieuaddr) << 32) | u64::from(self.ieaddr), self.iedata)
    }
}

/// Work to do once the queue lock is released: calls into ports and event subscribers
/// never happen under it, so a port may complete synchronously.
#[derive(Debug)]
enum Effect {
    Invalidate(Arc<dyn DevicePort>, DeviceInvalidation),
    PageResponse(Arc<dyn DevicePort>, PageResponse),
    Interrupt(u64, u32),
    /// A device-TLB invalidation completed after this long.
    Completed(Duration),
    /// A queue error was newly set while no other error was pending: raise a fault event.
    FaultEvent,
}

impl Unit {
    /// Binds the device port for `sid`, a function with an ATS invalidate queue of `depth`
    /// (1..=32) entries.
    pub fn bind_device_port(&self, sid: SourceId, port: Arc<dyn DevicePort>, depth: u8) -> Result<(), PortError> {
        if !(1..=port::MAX_QUEUE_DEPTH).contains(&depth) {
            return Err(PortError::InvalidDepth(depth));
        }
        let mut q = self.queue.lock();
        if q.ports.contains_key(&sid) {
            return Err(PortError::AlreadyBound(sid));
        }
        q.ports.insert(sid, PortState::new(port, depth));
        Ok(())
    }

    /// Unbinds the port for `sid`; its outstanding invalidations count as completed (the
    /// function's device TLB is gone). Returns whether a port was bound.
    pub fn unbind_device_port(&self, sid: SourceId) -> bool {
        let mut effects = Vec::new();
        let found = {
            let mut q = self.queue.lock();
            let found = q.ports.remove(&sid).is_some();
            self.process(&mut q, Instant::now(), &mut effects);
            found
        };
        self.apply(effects);
        found
    }

    /// Whether a device port is bound for `sid`.
    pub fn has_device_port(&self, sid: SourceId) -> bool {
        self.queue.lock().ports.contains_key(&sid)
    }

    /// A device answered the invalidation tagged `itag`.
    pub fn device_tlb_completed(&self, sid: SourceId, itag: ITag) -> Result<(), UnexpectedCompletion> {
        let mut effects = Vec::new();
        let now = Instant::now();
        let result = {
            let mut q = self.queue.lock();
            let bit = 1u32.checked_shl(u32::from(itag.0)).unwrap_or(0);
            let outcome = match q.ports.get_mut(&sid) {
                Some(p) if bit != 0 && p.in_use & bit != 0 => {
                    p.in_use &= !bit;
                    if let Some(sent) = p.sent_at[usize::from(itag.0)].take() {
                        let latency = now.duration_since(sent);
                        self.counters.device_tlb_latency_ns.add(latency.as_nanos() as u64);
                        effects.push(Effect::Completed(latency));
                    }
                    self.counters.device_tlb_completions.inc();
                    Ok(())
                }
                Some(p) if bit != 0 && p.abandoned & bit != 0 => {
                    p.abandoned &= !bit; // late answer after a time-out: ignored
                    Ok(())
                }
                _ => {
                    let was = q.errors();
                    q.ice = true;
                    q.iqercd = (q.iqercd & !(0xffff << 48)) | (u64::from(sid.0) << 48);
                    self.queue_progress.bump();
                    if !was {
                        effects.push(Effect::FaultEvent);
                    }
                    Err(UnexpectedCompletion { sid, itag })
                }
            };
            self.process(&mut q, now, &mut effects);
            outcome
        };
        self.apply(effects);
        result
    }

    /// Lets time pass: expires device-TLB invalidations older than the configured
    /// time-out (ITE). The server calls this periodically; register reads of FSTS, IQH and
    /// ICS call it too, so software that polls sees time-outs.
    pub fn poll(&self) {
        self.poll_at(Instant::now());
    }

    /// [`Unit::poll`] at a given instant.
    pub fn poll_at(&self, now: Instant) {
        let timeout = self.config.device_tlb_timeout;
        let mut effects = Vec::new();
        {
            let mut q = self.queue.lock();
            let expired = q
                .ports
                .iter()
                .find(|(_, p)| p.sent_at.iter().flatten().any(|&t| now.saturating_duration_since(t) >= timeout))
                .map(|(sid, _)| *sid);
            let Some(sid) = expired else { return };
            let was = q.errors();
            q.ite = true;
            q.iqercd = (q.iqercd & !(0xffff << 32)) | (u64::from(sid.0) << 32);
            self.queue_progress.bump();
            let mut abandoned = 0;
            for p in q.ports.values_mut() {
                abandoned += p.in_use.count_ones();
                p.abandoned |= p.in_use;
                p.in_use = 0;
                p.sent_at = [None; 32];
            }
            self.counters.device_tlb_timeouts.add(u64::from(abandoned));
            // A wait the queue is stalled on is aborted: it will never write its status.
            if self.stalled_on_wait(&q) {
                q.head = (q.head + 1) % q.entries();
            }
            if !was {
                effects.push(Effect::FaultEvent);
            }
            tracing::warn!(%sid, abandoned, timeout = ?timeout, "device-TLB invalidation timed out (ITE)");
        }
        self.apply(effects);
    }

    fn stalled_on_wait(&self, q: &QueueState) -> bool {
        if q.head == q.iqt >> 4 {
            return false;
        }
        let at = Hpa(q.base() + q.head * 16);
        self.memory.read_u64(at).map(|qw0| descriptor::descriptor_type(qw0) == 5).unwrap_or(false)
    }

    /// Runs the queue as far as it can go.
    fn process(&self, q: &mut QueueState, now: Instant, effects: &mut Vec<Effect>) {
        if !q.enabled || q.errors() {
            return;
        }
        let entries = q.entries();
        let tail = q.iqt >> 4;
        let fail = |q: &mut QueueState, code: QueueErrorCode, effects: &mut Vec<Effect>| {
            q.iqe = true;
            q.iqercd = (q.iqercd & !0xf) | code as u64;
            self.queue_progress.bump();
            effects.push(Effect::FaultEvent);
            self.counters.qi_errors.inc();
            tracing::debug!(?code, head = q.head, "invalidation queue error (IQE)");
        };
        if q.iqa & (1 << 11) != 0 {
            return fail(q, QueueErrorCode::InvalidWidth, effects);
        }
        if tail >= entries || q.iqt & 0xf != 0 {
            return fail(q, QueueErrorCode::InvalidTail, effects);
        }
        while q.head != tail {
            let at = q.base() + q.head * 16;
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
                    if let Some(p) = q.ports.get_mut(&d.sid) {
                        let limit = if d.queue_depth == 0 { port::MAX_QUEUE_DEPTH } else { d.queue_depth };
                        let Some(itag) = p.take(limit, now) else {
                            return; // stalled until one of the function's ITags completes
                        };
                        let request = DeviceInvalidation { sid: d.sid, itag, addr_s: d.addr_s };
                        effects.push(Effect::Invalidate(p.port.clone(), request));
                    }
                    self.counters.qi_device_tlb.inc();
                }
                Descriptor::Iec(inv) => {
                    self.interrupts.invalidate(match inv {
                        descriptor::IecInvalidationDesc::Global => IecInvalidation::Global,
                        descriptor::IecInvalidationDesc::Index { index, index_mask } => {
                            IecInvalidation::Index { index, index_mask }
                        }
                    });
                    self.counters.qi_iec.inc();
                }
                Descriptor::Wait(w) => {
                    if q.outstanding() > 0 {
                        return; // stalled until every earlier device-TLB invalidation completes
                    }
                    if w.status_write && self.memory.write(Hpa(w.status_addr), &w.status_data.to_le_bytes()).is_err() {
                        return fail(q, QueueErrorCode::FetchError, effects);
                    }
                    if w.interrupt && !q.iwc {
                        q.iwc = true;
                        q.iectl_ip = true;
                        if !q.iectl_im {
                            q.iectl_ip = false;
                            let (addr, data) = q.event_message();
                            effects.push(Effect::Interrupt(addr, data));
                        }
                    }
                    self.counters.qi_wait.inc();
                    self.queue_progress.bump();
                }
                Descriptor::PageGroupResponse(qw0, qw1) => match self.decode_page_response(qw0, qw1) {
                    Ok(resp) => {
                        if let Some(resp) = resp
                            && let Some(p) = q.ports.get(&resp.sid)
                        {
                            effects.push(Effect::PageResponse(p.port.clone(), resp));
                        }
                        self.counters.qi_page_response.inc();
                    }
                    Err(code) => return fail(q, code, effects),
                },
            }
            q.head = (q.head + 1) % entries;
        }
    }

    fn apply(&self, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Invalidate(port, request) => port.invalidate(request),
                Effect::PageResponse(port, response) => port.page_response(response),
                Effect::Interrupt(addr, data) => self.events.interrupt_message(addr, data),
                Effect::FaultEvent => self.faults.queue_error_event(&*self.events),
                Effect::Completed(latency) => self.events.device_tlb_completed(latency),
            }
        }
    }

    /// Whether FSTS holds an invalidation-queue error, which holds back fault events.
    pub(crate) fn queue_error_pending(&self) -> bool {
        self.queue.lock().errors()
    }

    /// FSTS queue bits.
    pub(crate) fn queue_fsts(&self) -> u32 {
        let q = self.queue.lock();
        (if q.iqe { fsts::IQE } else { 0 }) | (if q.ice { fsts::ICE } else { 0 }) | (if q.ite { fsts::ITE } else { 0 })
    }

    /// FSTS write: IQE, ICE and ITE are write-1-to-clear; clearing them lets the queue
    /// resume.
    pub(crate) fn clear_queue_errors(&self, value: u32) {
        let mut effects = Vec::new();
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
            self.process(&mut q, Instant::now(), &mut effects);
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

    /// Reads a queue register (64-bit slot at an 8-aligned offset).
    pub(crate) fn queue_reg(&self, offset: u64) -> u64 {
        use super::regs::{IEADDR, IECTL, IQA, IQERCD, IQH, IQT};
        if matches!(offset, IQH | 0x98) {
            self.poll();
        }
        let q = self.queue.lock();
        match offset {
            IQH => q.head << 4,
            IQT => q.iqt,
            IQA => q.iqa,
            0x98 => u64::from(q.iwc) << 32, // ICS at 0x9c
            IECTL => {
                let ctl = (if q.iectl_im { fectl::IM } else { 0 }) | (if q.iectl_ip { fectl::IP } else { 0 });
                u64::from(ctl) | (u64::from(q.iedata) << 32)
            }
            IEADDR => u64::from(q.ieaddr) | (u64::from(q.ieuaddr) << 32),
            IQERCD => q.iqercd,
            _ => 0,
        }
    }

    /// Writes a 32-bit queue register.
    pub(crate) fn write_queue_reg32(&self, offset: u64, value: u32) {
        use super::regs::{ICS, IEADDR, IECTL, IEDATA, IEUADDR};
        let mut effects = Vec::new();
        {
            let mut q = self.queue.lock();
            match offset {
                ICS => q.iwc &= value & 1 == 0,
                IECTL => {
                    q.iectl_im = value & fectl::IM != 0;
                    if !q.iectl_im && q.iectl_ip {
                        q.iectl_ip = false;
                        let (addr, data) = q.event_message();
                        effects.push(Effect::Interrupt(addr, data));
                    }
                }
                IEDATA => q.iedata = value,
                IEADDR => q.ieaddr = value & !3,
                IEUADDR => q.ieuaddr = value,
                _ => {}
            }
        }
        self.apply(effects);
    }

    /// Writes a 64-bit queue register (IQA or IQT; IQH and IQERCD are read-only).
    pub(crate) fn write_queue_reg64(&self, offset: u64, value: u64) {
        use super::regs::{IQA, IQT};
        let mut effects = Vec::new();
        {
            let mut q = self.queue.lock();
            match offset {
                IQA => q.iqa = value & !0x7f8,
                IQT => {
                    q.iqt = value & 0x7fff0;
                    self.process(&mut q, Instant::now(), &mut effects);
                }
                _ => {}
            }
        }
        self.apply(effects);
    }

    /// Decodes a page-group-response descriptor (type 9; VT-d 7.6, VTD-REFERENCE b.5).
    /// A response without LPIG carries nothing for the device (`None`).
    fn decode_page_response(&self, qw0: u64, qw1: u64) -> Result<Option<PageResponse>, QueueErrorCode> {
        match PageGroupResponse::from_descriptor([qw0, qw1]) {
            Ok(r) => Ok(r.map(|r| PageResponse { sid: r.sid, prgi: r.prgi, code: r.code.code() })),
            Err(_) => Err(QueueErrorCode::ReservedFields),
        }
    }

    /// How many times the invalidation queue has completed a wait descriptor or stopped on
    /// an error. Read it before checking a status word, then pass it to
    /// [`Unit::wait_for_queue_progress`].
    pub fn queue_progress(&self) -> u64 {
        *self.queue_progress.count.lock()
    }

    /// Sleeps until the queue progress differs from `seen` or `timeout` passes (what an
    /// invalidation-completion interrupt gives a real driver, without the interrupt).
    /// Returns the current progress.
    pub fn wait_for_queue_progress(&self, seen: u64, timeout: Duration) -> u64 {
        let mut count = self.queue_progress.count.lock();
        if *count == seen {
            let _ = self.queue_progress.changed.wait_for(&mut count, timeout);
        }
        *count
    }

    /// Time-out after which an unanswered device-TLB invalidation sets ITE.
    pub fn device_tlb_timeout(&self) -> Duration {
        self.config.device_tlb_timeout
    }
}

/// Why a page request was not accepted from a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PageRequestError {
    /// The function's context does not allow ATS (and so PRI): TT must be 01b.
    #[error("requester id {0} may not issue page requests: its context does not enable device TLBs")]
    NotAllowed(SourceId),
}

/// What became of an accepted page request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageRequestOutcome {
    /// Written to the page request queue.
    Queued,
    /// Dropped: the queue overflowed (an owed response was sent to the device).
    Dropped,
}

impl Unit {
    /// A device's page request (PCIe PRI, VT-d 7.5). Accepted only from functions whose
    /// context entry enables device TLBs (TT=01b); queued in the page request queue, with
    /// the page request event, or dropped on overflow with the response the hardware owes
    /// sent to the function's port.
    pub fn page_request(&self, req: super::prq::PageRequest) -> Result<PageRequestOutcome, PageRequestError> {
        let allowed = self.translation_enabled()
            && self
                .context(req.sid, self.current_epoch())
                .is_ok_and(|c| c.tt == super::tables::TranslationType::DeviceTlb);
        if !allowed {
            return Err(PageRequestError::NotAllowed(req.sid));
        }
        let submitted = self.prq.submit(&self.memory, req);
        if let Some((addr, data)) = submitted.event() {
            self.events.interrupt_message(addr, data);
        }
        if let Some(r) = submitted.response() {
            let port = self.queue.lock().ports.get(&r.sid).map(|p| p.port.clone());
            if let Some(port) = port {
                port.page_response(PageResponse { sid: r.sid, prgi: r.prgi, code: r.code.code() });
            }
        }
        Ok(if submitted.is_queued() { PageRequestOutcome::Queued } else { PageRequestOutcome::Dropped })
    }
}
