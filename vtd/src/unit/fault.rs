//! Primary fault logging (VT-d 7.2) and the fault event (VT-d 7.3).
//!
//! Owns the fault recording registers (FRCD, `NUM_FAULT_RECORDS` of them, used as a ring;
//! VT-d 10.4.14), the fault bits of FSTS (PPF, PFO, FRI; VT-d 10.4.9) and the fault event's
//! register block (FECTL, FEDATA, FEADDR, FEUADDR; VT-d 10.4.10-10.4.13, an
//! [`EventControl`]). The queue error bits of FSTS belong to the invalidation queue; they
//! only hold fault events back, and keep a held one pending. Later layers subscribe to recorded faults and fault-event
//! interrupts through [`UnitEvents`]; software reads and clears the records through the
//! registers (the driver's fault handler decodes them with [`FaultRecord::from_frcd`]).

use parking_lot::Mutex;

use super::event::{EventControl, EventSource, Message};
use super::fault_reason::FaultReason;
use super::regs::{NUM_FAULT_RECORDS, frcd, fsts};
use crate::ids::SourceId;

/// The direction of a request: whether it reads or writes memory. Untranslated requests
/// are checked against R or W by it, and a fault records it (FRCD.T: 1 = read, 0 = write;
/// VT-d 10.4.14). Named apart from a device's DMA access, which carries a direction, an
/// address and a length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// A read (or a translation request without write intent).
    Read,
    /// A write.
    Write,
}

/// The address type of the faulting request (FRCD.AT, PCIe AT field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// AT=00: an untranslated request (DMA with an I/O virtual address).
    Untranslated = 0,
    /// AT=01: an ATS translation request.
    TranslationRequest = 1,
    /// AT=10: a translated request (DMA with an address from a device TLB).
    Translated = 2,
}

impl RequestKind {
    /// The kind an AT value names; `None` for AT=11, which PCIe reserves.
    pub const fn from_at(at: u8) -> Option<Self> {
        match at {
            0 => Some(Self::Untranslated),
            1 => Some(Self::TranslationRequest),
            2 => Some(Self::Translated),
            _ => None,
        }
    }
}

/// Why the contents of a fault recording register are not a fault record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrcdError {
    /// F is clear: the register holds no fault.
    #[error("the fault recording register holds no fault (F clear)")]
    Empty,
    /// FR is a code no fault reason has.
    #[error("fault reason {0:#04x} is not defined")]
    UnknownReason(u8),
    /// AT is 11b, which PCIe reserves.
    #[error("address type 3 is reserved")]
    ReservedAddressType,
}

/// One recorded fault, as held in a fault recording register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// FR.
    pub reason: FaultReason,
    /// SID of the requester.
    pub sid: SourceId,
    /// FI: the faulting address, page-aligned (for interrupt faults, the interrupt index
    /// in bits 63:48).
    pub addr: u64,
    /// T.
    pub access: Direction,
    /// AT.
    pub kind: RequestKind,
}

impl FaultRecord {
    /// The 128-bit FRCD encoding as (low, high) quadwords, F set (VT-d 10.4.14).
    pub fn to_frcd(&self) -> (u64, u64) {
        let lo = self.addr & frcd::FI_MASK;
        let t = if self.access == Direction::Read { frcd::T } else { 0 };
        let hi = (u64::from(self.sid.0) << frcd::SID_SHIFT)
            | (u64::from(self.reason.code()) << frcd::FR_SHIFT)
            | ((self.kind as u64) << frcd::AT_SHIFT)
            | t
            | frcd::F;
        (lo, hi)
    }

    /// Decodes a fault recording register as software reads it, low and high quadword
    /// (VT-d 10.4.14; Linux `dma_frcd_*`): the inverse of [`FaultRecord::to_frcd`]. The
    /// PASID fields (PP, PV) are not part of a record; a reader takes them from
    /// [`frcd::PP`] and [`frcd::PV_SHIFT`] itself.
    pub fn from_frcd(lo: u64, hi: u64) -> Result<Self, FrcdError> {
        if hi & frcd::F == 0 {
            return Err(FrcdError::Empty);
        }
        let code = ((hi >> frcd::FR_SHIFT) & frcd::FR_MASK) as u8;
        let reason = FaultReason::from_code(code).ok_or(FrcdError::UnknownReason(code))?;
        let at = ((hi >> frcd::AT_SHIFT) & frcd::AT_MASK) as u8;
        let kind = RequestKind::from_at(at).ok_or(FrcdError::ReservedAddressType)?;
        Ok(Self {
            reason,
            sid: SourceId(((hi >> frcd::SID_SHIFT) & frcd::SID_MASK) as u16),
            addr: lo & frcd::FI_MASK,
            access: if hi & frcd::T != 0 { Direction::Read } else { Direction::Write },
            kind,
        })
    }
}

/// Notifications a remapping unit gives to whoever embeds it. All methods have empty
/// defaults; they are called synchronously from the request path, so they must be quick.
pub trait UnitEvents: Send + Sync + std::fmt::Debug {
    /// A fault was written to a fault recording register.
    fn fault_recorded(&self, _record: &FaultRecord) {}
    /// A fault was dropped: suppressed by FPD, or lost to a fault overflow.
    fn fault_dropped(&self, _reason: FaultReason, _overflow: bool) {}
    /// The unit sends one of its own interrupt messages: the event `source` names, to the
    /// address and with the data software programmed in that event's registers (for the
    /// fault event FEUADDR:FEADDR and FEDATA). These are not remapped (VT-d 5.1: interrupts
    /// the remapping hardware generates itself bypass interrupt remapping).
    fn interrupt_message(&self, _source: EventSource, _addr: u64, _data: u32) {}
    /// A sampled page walk took this long (one walk in [`WALK_SAMPLE_PERIOD`] per thread
    /// is timed, so the translation path stays cheap).
    fn walk_sampled(&self, _duration: std::time::Duration) {}
    /// An MSI write from `sid` was remapped (or passed through) into this interrupt.
    fn interrupt_remapped(&self, _sid: SourceId, _interrupt: &super::interrupt::Remapped) {}
    /// A device answered a device-TLB invalidation after this long.
    fn device_tlb_completed(&self, _latency: std::time::Duration) {}
}

/// One page walk in this many (per thread) is timed for [`UnitEvents::walk_sampled`].
pub const WALK_SAMPLE_PERIOD: u32 = 64;

/// The events sink used when nobody subscribes.
#[derive(Debug, Default)]
pub struct NoEvents;
impl UnitEvents for NoEvents {}

/// What happened to a fault handed to the recorder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Logged {
    /// Written to FRCD[index].
    Recorded(usize),
    /// Not recorded: a qualified fault with FPD set.
    Suppressed,
    /// Not recorded: the next register still held an unread fault (PFO set).
    Overflow,
}

#[derive(Debug, Default)]
struct State {
    records: [Option<FaultRecord>; NUM_FAULT_RECORDS],
    /// Next register hardware writes.
    next: usize,
    /// FRI: the first register written while PPF was clear.
    fri: usize,
    pfo: bool,
    /// FECTL, FEDATA, FEADDR, FEUADDR.
    event: EventControl,
}

impl State {
    fn ppf(&self) -> bool {
        self.records.iter().any(Option::is_some)
    }
}

/// Primary fault logging state.
#[derive(Debug)]
pub(crate) struct FaultRecorder {
    state: Mutex<State>,
}

impl FaultRecorder {
    pub(crate) fn new() -> Self {
        Self { state: Mutex::new(State::default()) }
    }

    /// Logs a fault (VT-d 7.2.1). `fpd` is the context entry's fault processing disable,
    /// which suppresses qualified faults only (VT-d 7.1.2). `other_pending` is true while
    /// another condition that blocks fault events (FSTS.IQE/ICE/ITE) is set.
    pub(crate) fn log(&self, record: FaultRecord, fpd: bool, other_pending: bool, events: &dyn UnitEvents) -> Logged {
        if fpd && record.reason.qualified() {
            events.fault_dropped(record.reason, false);
            return Logged::Suppressed;
        }
        let (logged, message) = {
            let mut s = self.state.lock();
            let was_pending = s.ppf() || s.pfo || other_pending;
            let idx = s.next;
            if s.records[idx].is_some() {
                // The register we would write still holds a fault software has not
                // cleared: set PFO and drop this one.
                s.pfo = true;
                let msg = if was_pending { None } else { s.event.raise() };
                (Logged::Overflow, msg)
            } else {
                if !s.ppf() {
                    s.fri = idx;
                }
                s.records[idx] = Some(record);
                s.next = (idx + 1) % NUM_FAULT_RECORDS;
                let msg = if was_pending { None } else { s.event.raise() };
                (Logged::Recorded(idx), msg)
            }
        };
        match logged {
            Logged::Recorded(_) => events.fault_recorded(&record),
            _ => events.fault_dropped(record.reason, true),
        }
        if let Some((addr, data)) = message {
            events.interrupt_message(EventSource::Fault, addr, data);
        }
        logged
    }

    /// A queue error (IQE, ICE, ITE) was newly set while no other queue error was pending:
    /// raise the fault event unless a fault is already pending (VT-d 7.3).
    pub(crate) fn queue_error_event(&self, events: &dyn UnitEvents) {
        let message = {
            let mut s = self.state.lock();
            if s.ppf() || s.pfo { None } else { s.event.raise() }
        };
        if let Some((addr, data)) = message {
            events.interrupt_message(EventSource::Fault, addr, data);
        }
    }

    /// Back to the reset state (VT-d 10.4.9-10.4.14): no record held (every FRCD reads 0,
    /// so FSTS.PPF and FRI are clear), PFO clear, the next fault goes to FRCD[0], FECTL
    /// back to IM set with IP clear, and FEDATA, FEADDR, FEUADDR 0. The fault status and
    /// recording fields are sticky (RW1CS, ROS: VT-d 10.3 re-initializes them only on a
    /// power-good reset), so this is the reset of a unit powered up again, not of a warm
    /// reset that would keep them for software to read after it.
    pub(crate) fn reset(&self) {
        *self.state.lock() = State::default();
    }

    /// The records currently held (F set), in register order.
    pub(crate) fn records(&self) -> Vec<FaultRecord> {
        self.state.lock().records.iter().flatten().copied().collect()
    }

    /// FSTS fault bits: PFO, PPF, FRI.
    pub(crate) fn fsts_bits(&self) -> u32 {
        let s = self.state.lock();
        let mut v = 0;
        if s.pfo {
            v |= fsts::PFO;
        }
        if s.ppf() {
            v |= fsts::PPF | ((s.fri as u32) << fsts::FRI_SHIFT);
        }
        v
    }

    /// Withdraws the fault event held pending (IP set, IM set) when every condition that
    /// can cause it has been serviced: no fault recording register holds a fault (PPF
    /// clear), PFO clear, and, as `queue_errors` says, IQE, ICE and ITE clear.
    ///
    /// VT-d 10.4.10 (FECTL.IP): IP is cleared by hardware "as soon as the interrupt
    /// message pending condition is serviced", either by hardware sending the message (IM
    /// cleared) or by "software servicing all the pending interrupt status fields in the
    /// Fault Status register": clearing F in every fault recording register with a fault,
    /// "causing the PPF field in Fault Status register to be evaluated as Clear", and
    /// clearing the other status fields (PFO, IQE, ICE, ITE; APF and AFO belong to
    /// advanced fault logging, which dmar does not implement). Unmasking afterwards sends
    /// nothing: the faults it would announce are gone.
    pub(crate) fn withdraw_if_serviced(&self, queue_errors: bool) {
        let mut s = self.state.lock();
        if !s.ppf() && !s.pfo && !queue_errors {
            s.event.withdraw();
        }
    }

    /// FSTS write: PFO is write-1-to-clear.
    pub(crate) fn clear_pfo(&self) {
        self.state.lock().pfo = false;
    }

    /// Reads quadword `half` (0 = low, 1 = high) of FRCD[`index`].
    pub(crate) fn frcd(&self, index: usize, half: usize) -> u64 {
        let s = self.state.lock();
        match s.records.get(index).copied().flatten() {
            Some(r) => {
                let (lo, hi) = r.to_frcd();
                if half == 0 { lo } else { hi }
            }
            None => 0,
        }
    }

    /// Writing 1 to F clears FRCD[`index`] (and with it, perhaps, PPF).
    pub(crate) fn clear_frcd(&self, index: usize) {
        if let Some(slot) = self.state.lock().records.get_mut(index) {
            *slot = None;
        }
    }

    /// Reads the fault event register at `rel` within its block (FECTL, FEDATA, FEADDR,
    /// FEUADDR; VT-d 10.4.10-10.4.13).
    pub(crate) fn read_event(&self, rel: u64) -> u32 {
        self.state.lock().event.read(rel)
    }

    /// Writes the fault event register at `rel`; unmasking a pending event sends it
    /// (VT-d 10.4.10).
    pub(crate) fn write_event(&self, rel: u64, value: u32, events: &dyn UnitEvents) {
        let message: Option<Message> = self.state.lock().event.write(rel, value);
        if let Some((addr, data)) = message {
            events.interrupt_message(EventSource::Fault, addr, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unit::regs::event;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug, Default)]
    struct Counting {
        messages: AtomicUsize,
    }
    impl UnitEvents for Counting {
        fn interrupt_message(&self, source: EventSource, _addr: u64, _data: u32) {
            assert_eq!(source, EventSource::Fault, "the recorder raises only the fault event");
            self.messages.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn rec(addr: u64) -> FaultRecord {
        FaultRecord {
            reason: FaultReason::NoRead,
            sid: SourceId(0x10),
            addr,
            access: Direction::Read,
            kind: RequestKind::Untranslated,
        }
    }

    #[test]
    fn ring_overflows_into_pfo_and_recovers_after_clear() {
        let f = FaultRecorder::new();
        let ev = Counting::default();
        for i in 0..NUM_FAULT_RECORDS {
            assert_eq!(f.log(rec(i as u64 * 0x1000), false, false, &ev), Logged::Recorded(i));
        }
        assert_eq!(f.log(rec(0xdead_0000), false, false, &ev), Logged::Overflow);
        assert_ne!(f.fsts_bits() & fsts::PFO, 0);
        assert_eq!(f.records().len(), NUM_FAULT_RECORDS);
        f.clear_frcd(0);
        f.clear_pfo();
        assert_eq!(f.log(rec(0xbeef_0000), false, false, &ev), Logged::Recorded(0));
        // PPF never cleared, so FRI still names the first record written while it was
        // clear (VT-d 10.4.9): software scans forward from there.
        assert_eq!(f.fsts_bits() >> fsts::FRI_SHIFT & 0xff, 0);
    }

    #[test]
    fn fpd_suppresses_qualified_faults_only() {
        let f = FaultRecorder::new();
        assert_eq!(f.log(rec(0), true, false, &NoEvents), Logged::Suppressed);
        let mut root = rec(0);
        root.reason = FaultReason::RootEntryNotPresent;
        assert_eq!(f.log(root, true, false, &NoEvents), Logged::Recorded(0));
    }

    #[test]
    fn fault_event_is_masked_until_im_clears_then_sent_once() {
        let f = FaultRecorder::new();
        let ev = Counting::default();
        f.log(rec(0), false, false, &ev);
        assert_eq!(ev.messages.load(Ordering::SeqCst), 0, "IM is set at reset");
        assert_ne!(f.read_event(event::CTL) & event::IP, 0);
        f.write_event(event::CTL, 0, &ev);
        assert_eq!(ev.messages.load(Ordering::SeqCst), 1);
        assert_eq!(f.read_event(event::CTL) & event::IP, 0);
        // PPF still set: a further fault raises no event.
        f.log(rec(0x1000), false, false, &ev);
        assert_eq!(ev.messages.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_held_event_is_withdrawn_only_once_every_condition_is_serviced() {
        let f = FaultRecorder::new();
        let ev = Counting::default();
        f.log(rec(0), false, false, &ev);
        f.log(rec(0x1000), false, false, &ev);
        let ip = |f: &FaultRecorder| f.read_event(event::CTL) & event::IP != 0;
        f.clear_frcd(0);
        f.withdraw_if_serviced(false);
        assert!(ip(&f), "FRCD[1] still holds a fault: PPF set");
        f.clear_frcd(1);
        f.withdraw_if_serviced(true);
        assert!(ip(&f), "a queue error is still set");
        f.withdraw_if_serviced(false);
        assert!(!ip(&f));
        f.write_event(event::CTL, 0, &ev);
        assert_eq!(ev.messages.load(Ordering::SeqCst), 0, "nothing stale on unmask");
    }

    #[test]
    fn frcd_encoding() {
        let r = FaultRecord {
            reason: FaultReason::NoWrite,
            sid: SourceId::new(3, 4, 5),
            addr: 0x1234_5678,
            access: Direction::Write,
            kind: RequestKind::Translated,
        };
        let (lo, hi) = r.to_frcd();
        assert_eq!(lo, 0x1234_5000);
        assert_eq!(hi & 0xffff, u64::from(SourceId::new(3, 4, 5).0));
        assert_eq!((hi >> 32) & 0xff, 0x05);
        assert_eq!((hi >> 60) & 3, 2);
        assert_eq!((hi >> 62) & 1, 0, "T=0 for writes");
        assert_eq!(hi >> 63, 1, "F");
        assert_eq!(FaultRecord::from_frcd(lo, hi), Ok(FaultRecord { addr: 0x1234_5000, ..r }), "FI is a page");
    }

    #[test]
    fn frcd_decoding_round_trips_and_refuses_what_is_no_record() {
        let ir = FaultRecord {
            reason: FaultReason::IrEntryNotPresent,
            sid: SourceId::new(0xff, 0x1f, 7),
            addr: 0x00ff_0000_0000_0000,
            access: Direction::Write,
            kind: RequestKind::Untranslated,
        };
        let r = rec(0xfedc_b000);
        for record in [r, ir] {
            let (lo, hi) = record.to_frcd();
            assert_eq!(FaultRecord::from_frcd(lo, hi), Ok(record));
        }
        let (lo, hi) = r.to_frcd();
        assert_eq!(FaultRecord::from_frcd(lo | 0xfff, hi), Ok(r), "FI bits 11:0 are not the address");
        assert_eq!(FaultRecord::from_frcd(lo, hi & !frcd::F), Err(FrcdError::Empty));
        assert_eq!(FaultRecord::from_frcd(lo, hi & !(0xff << 32)), Err(FrcdError::UnknownReason(0)));
        assert_eq!(FaultRecord::from_frcd(lo, hi | (3 << 60)), Err(FrcdError::ReservedAddressType));
    }
}
