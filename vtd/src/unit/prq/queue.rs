//! The page request queue's registers and the ring in host memory they describe (VT-d 7.5;
//! PQH, PQT, PQA, PRS and the page request event, VT-d 10.4.31-10.4.38).
//!
//! Hardware owns PQT and writes descriptors at it; software owns PQH and consumes from it.
//! The ring holds one entry less than its size: it is full when advancing PQT would make
//! it equal PQH. All state sits behind one lock, held while a descriptor is written (four
//! word stores, no I/O), so requests from many threads land in order; the descriptor's
//! TYPE word is stored last and PQT moves only after it, so software that reads up to PQT
//! sees whole descriptors.

use parking_lot::Mutex;

use super::DESCRIPTOR_SIZE;
use super::address::QueueAddress;
use super::descriptor::{PageGroupResponse, PageRequest, ResponseCode};
use crate::ids::Hpa;
use crate::unit::event::{EventControl, Message};
use crate::unit::memory::{HostMemory, MemoryError};
use crate::unit::regs::{self, event, pq, prs};

/// What became of a submitted page request. Whoever embeds the queue delivers `event`
/// through `UnitEvents::interrupt_message` and routes `response` to the device.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Submitted {
    /// The descriptor was written at byte `offset` of the queue and PQT advanced past it.
    Queued {
        /// Where the descriptor is (the PQT before the request).
        offset: u64,
        /// The page request event, if this request raised one and it was not masked.
        event: Option<Message>,
    },
    /// Dropped: the queue was full or PRO was already set. No response is owed (the
    /// request was not last in its group, or was a stop marker).
    Overflow {
        /// The page request event, if setting PRO raised one and it was not masked.
        event: Option<Message>,
    },
    /// Dropped like [`Submitted::Overflow`], but it was the last request of its group, so
    /// the hardware answers the group itself with Success (VT-d 7.5.1): the device will
    /// retry, fault again and send a new request.
    OverflowAutoRespond {
        /// The response for the device.
        response: PageGroupResponse,
        /// The page request event, as for [`Submitted::Overflow`].
        event: Option<Message>,
    },
    /// The queue lies outside host memory (software programmed a bad PQA): nothing was
    /// written and no register changed. A group's last request is answered with Failure,
    /// which makes the device stop issuing page requests (dmar policy; the spec leaves
    /// this case undefined).
    WriteFailed {
        /// Why the write failed.
        error: MemoryError,
        /// The response for the device, if it waits for one.
        response: Option<PageGroupResponse>,
    },
}

impl Submitted {
    /// The interrupt message to deliver, if any.
    pub(crate) fn event(&self) -> Option<(u64, u32)> {
        match *self {
            Self::Queued { event, .. } | Self::Overflow { event } | Self::OverflowAutoRespond { event, .. } => event,
            Self::WriteFailed { .. } => None,
        }
    }

    /// The response the hardware sends to the device, if any.
    pub(crate) fn response(&self) -> Option<PageGroupResponse> {
        match *self {
            Self::OverflowAutoRespond { response, .. } => Some(response),
            Self::WriteFailed { response, .. } => response,
            Self::Queued { .. } | Self::Overflow { .. } => None,
        }
    }

    /// Whether the request reached the queue.
    pub(crate) fn is_queued(&self) -> bool {
        matches!(self, Self::Queued { .. })
    }
}

#[derive(Debug, Default)]
struct State {
    pqh: u64,
    pqt: u64,
    pqa: QueueAddress,
    ppr: bool,
    pro: bool,
    /// PECTL, PEDATA, PEADDR, PEUADDR.
    event: EventControl,
}

impl State {
    /// Offsets are taken modulo the queue size: the hardware decodes only as many offset
    /// bits as the queue needs, so a stale PQH/PQT from a larger queue stays inside it.
    fn ring_mask(&self) -> u64 {
        self.pqa.bytes() - 1
    }

    /// Sets PPR or PRO. The page request event is generated only when neither was set
    /// before (VT-d 7.5; QEMU `vtd_generate_page_request_event`): software that has not
    /// serviced the last event gets no new one.
    fn set_status(&mut self, bit: u32) -> Option<Message> {
        let was_pending = self.ppr || self.pro;
        match bit {
            prs::PPR => self.ppr = true,
            _ => self.pro = true,
        }
        if was_pending { None } else { self.event.raise() }
    }

    /// PRS write-1-to-clear. Once software has serviced both conditions a pending masked
    /// event is withdrawn (IP clears), as FECTL.IP does for the fault status bits.
    fn clear_status(&mut self, bits: u32) {
        if bits & prs::PPR != 0 {
            self.ppr = false;
        }
        if bits & prs::PRO != 0 {
            self.pro = false;
        }
        if !self.ppr && !self.pro {
            self.event.withdraw();
        }
    }

    fn prs(&self) -> u32 {
        (if self.ppr { prs::PPR } else { 0 }) | (if self.pro { prs::PRO } else { 0 })
    }

    /// The 32-bit register at `offset` (4-aligned).
    fn dword(&self, offset: u64) -> u32 {
        let q = match offset & !7 {
            regs::PQH => self.pqh,
            regs::PQT => self.pqt,
            regs::PQA => self.pqa.to_bits(),
            _ => {
                return match offset {
                    regs::PRS => self.prs(),
                    o if (regs::PECTL..regs::PECTL + event::BYTES).contains(&o) => self.event.read(o - regs::PECTL),
                    _ => 0,
                };
            }
        };
        if offset & 4 == 0 { q as u32 } else { (q >> 32) as u32 }
    }

    fn write_dword(&mut self, offset: u64, value: u32) -> Option<Message> {
        let merge = |old: u64| {
            if offset & 4 == 0 {
                (old & !0xffff_ffff) | u64::from(value)
            } else {
                (old & 0xffff_ffff) | (u64::from(value) << 32)
            }
        };
        match offset & !7 {
            regs::PQH => self.pqh = merge(self.pqh) & pq::OFFSET_MASK,
            regs::PQT => self.pqt = merge(self.pqt) & pq::OFFSET_MASK,
            regs::PQA => self.pqa = QueueAddress::from_bits(merge(self.pqa.to_bits())),
            _ => match offset {
                regs::PRS => self.clear_status(value),
                // IP is read-only; clearing IM while IP is set sends the held message (VT-d
                // 10.4.35, the same rule as FECTL).
                o if (regs::PECTL..regs::PECTL + event::BYTES).contains(&o) => {
                    return self.event.write(o - regs::PECTL, value);
                }
                _ => {}
            },
        }
        None
    }
}

/// The page request queue of one remapping unit: its registers, and the ring in host
/// memory they describe.
///
/// Hardware side: [`submit`](Self::submit). Software side: the registers, which software
/// reads and writes through the unit's MMIO window, and the descriptors in host memory.
#[derive(Debug)]
pub(crate) struct PageRequestQueue {
    state: Mutex<State>,
}

impl Default for PageRequestQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl PageRequestQueue {
    /// The queue at reset: every register zero except PECTL.IM (VT-d 10.4.35).
    pub(crate) fn new() -> Self {
        Self { state: Mutex::new(State::default()) }
    }

    /// Back to the state [`Self::new`] builds (VT-d 10.4.31-10.4.38): PQH, PQT, PQA and PRS
    /// 0, PECTL back to IM set with IP clear, PEDATA, PEADDR, PEUADDR 0. The descriptors
    /// already written stay in host memory, which the unit does not own.
    pub(crate) fn reset(&self) {
        *self.state.lock() = State::default();
    }

    /// Reads the 32-bit register at `offset` (in [`regs::PRQ_REGS`], 4-aligned; the MMIO
    /// dispatcher has checked both). Reserved offsets read 0.
    #[cfg(test)]
    pub(crate) fn read32(&self, offset: u64) -> u32 {
        self.state.lock().dword(offset & !3)
    }

    /// Reads the 64-bit slot at `offset` (8-aligned): PQH, PQT and PQA whole, or two
    /// adjacent 32-bit registers (PRS in the high half of 0xd8; PECTL|PEDATA at 0xe0;
    /// PEADDR|PEUADDR at 0xe8).
    pub(crate) fn read64(&self, offset: u64) -> u64 {
        let offset = offset & !7;
        let s = self.state.lock();
        u64::from(s.dword(offset)) | (u64::from(s.dword(offset + 4)) << 32)
    }

    /// Writes the 32-bit register at `offset`; a half of a 64-bit register merges with
    /// the other half. Returns the interrupt message to deliver, when the write unmasks a
    /// pending page request event.
    pub(crate) fn write32(&self, offset: u64, value: u32) -> Option<(u64, u32)> {
        self.state.lock().write_dword(offset & !3, value)
    }

    /// Writes 64 bits at `offset` (8-aligned), as two 32-bit writes, low half first.
    #[cfg(test)]
    pub(crate) fn write64(&self, offset: u64, value: u64) -> Option<(u64, u32)> {
        let offset = offset & !7;
        let mut s = self.state.lock();
        let lo = s.write_dword(offset, value as u32);
        let hi = s.write_dword(offset + 4, (value >> 32) as u32);
        lo.or(hi)
    }

    /// PQA as last written.
    #[cfg(test)]
    pub(crate) fn queue_address(&self) -> QueueAddress {
        self.state.lock().pqa
    }

    /// PQH: the byte offset of the next descriptor software will read.
    #[cfg(test)]
    pub(crate) fn head(&self) -> u64 {
        self.state.lock().pqh
    }

    /// PQT: the byte offset of the next descriptor hardware will write.
    #[cfg(test)]
    pub(crate) fn tail(&self) -> u64 {
        self.state.lock().pqt
    }

    /// PRS: PPR and PRO.
    #[cfg(test)]
    pub(crate) fn status(&self) -> u32 {
        self.state.lock().prs()
    }

    /// Reports a page request from a device to software (VT-d 7.5.1).
    ///
    /// - While PRO is set the request is dropped, with no fault and no event (QEMU does
    ///   the same); Linux clears PRO only once it has drained the queue, and then discards
    ///   the groups it saw only in part. dmar drops here exactly as for a full queue, so
    ///   the last request of a group is still answered.
    /// - If the queue is full (PQT + 32 = PQH, modulo its size), PRO is set and the request
    ///   dropped; if it was the last of its group (LPIG) the hardware answers the group
    ///   with Success. A stop marker gets no answer: the device expects none (PCIe
    ///   10.4.1.2), and an unexpected response would only set its UPRGI status.
    /// - Otherwise the descriptor is written at PQT, PQT advances and PPR is set.
    ///
    /// Setting PPR or PRO raises the page request event when neither was set before.
    pub(crate) fn submit(&self, mem: &HostMemory, req: PageRequest) -> Submitted {
        let owed = req.expects_response().then(|| req.response(ResponseCode::Success));
        let dropped = |event| match owed {
            Some(response) => Submitted::OverflowAutoRespond { response, event },
            None => Submitted::Overflow { event },
        };
        let mut s = self.state.lock();
        if s.pro {
            return dropped(None);
        }
        let mask = s.ring_mask();
        let tail = s.pqt & mask;
        let next = (tail + DESCRIPTOR_SIZE) & mask;
        if next == s.pqh & mask {
            let event = s.set_status(prs::PRO);
            return dropped(event);
        }
        if let Err(error) = write_descriptor(mem, s.pqa.base(), tail, req.to_descriptor()) {
            let response = req.expects_response().then(|| req.response(ResponseCode::Failure));
            return Submitted::WriteFailed { error, response };
        }
        s.pqt = next;
        let event = s.set_status(prs::PPR);
        Submitted::Queued { offset: tail, event }
    }
}

/// The address of the entry at `offset`, refusing one whose 32 bytes would wrap the
/// 64-bit address space (a PQA near the top; `HostMemory` then refuses the access itself).
fn entry_address(mem: &HostMemory, base: Hpa, offset: u64) -> Result<Hpa, MemoryError> {
    match base.checked_add(offset) {
        Some(addr) if addr.checked_add(DESCRIPTOR_SIZE).is_some() => Ok(addr),
        _ => Err(MemoryError::OutOfRange { addr: base, len: offset + DESCRIPTOR_SIZE, size: mem.size() }),
    }
}

/// Writes one descriptor; TYPE (in qw0) last. The entry is 32-byte aligned inside a
/// 4 KiB-aligned queue, so the four words share a page: the first store fails or none does.
fn write_descriptor(mem: &HostMemory, base: Hpa, offset: u64, desc: [u64; 4]) -> Result<(), MemoryError> {
    let addr = entry_address(mem, base, offset)?;
    for i in [1u64, 2, 3, 0] {
        mem.write_u64(Hpa(addr.0 + 8 * i), desc[i as usize])?;
    }
    Ok(())
}
