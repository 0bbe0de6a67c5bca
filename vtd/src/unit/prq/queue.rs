//! The page request queue registers and the ring they describe (VT-d 7.5; b.1).
//!
//! Hardware owns PQT and writes descriptors at it; software owns PQH and consumes from it.
//! The ring holds one entry less than its size: it is full when advancing PQT would make
//! it equal PQH. All state sits behind one lock, held while a descriptor is written (four
//! word stores, no I/O), so requests from many threads land in order and a drain sees
//! either all of a descriptor or none of it.

use parking_lot::Mutex;

use super::DESCRIPTOR_SIZE;
use super::descriptor::{DescriptorError, PageGroupResponse, PageRequest, ResponseCode};
use super::regs::{self, OFFSET_MASK, pectl, prs};
use crate::ids::{Hpa, PAGE_SIZE};
use crate::unit::memory::{HostMemory, MemoryError};

/// An interrupt message (address, data) for `UnitEvents::interrupt_message`.
type Message = (u64, u32);

/// PQA_REG: base and size of the page request queue (VT-d 10.4, PQA_REG; b.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct QueueAddress(u64);

impl QueueAddress {
    /// Bits software can write: PQA bits 63:12 and PQS bits 2:0; bits 11:3 are reserved.
    pub const WRITABLE: u64 = 0xffff_ffff_ffff_f007;
    /// Largest PQS: 2^(7+7) entries, 512 KiB, the reach of the PQH/PQT offset field.
    pub const MAX_PQS: u8 = 7;

    /// A queue of 2^(`pqs`+7) 32-byte entries at `base`, which must be 4 KiB aligned.
    pub fn new(base: Hpa, pqs: u8) -> Result<Self, QueueAddressError> {
        if !base.is_page_aligned() {
            return Err(QueueAddressError::Misaligned(base));
        }
        if pqs > Self::MAX_PQS {
            return Err(QueueAddressError::SizeOutOfRange(pqs));
        }
        Ok(Self(base.0 | u64::from(pqs)))
    }

    /// The register value as hardware latches it: reserved bits read back as zero.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits & Self::WRITABLE)
    }

    /// The register value.
    pub const fn to_bits(self) -> u64 {
        self.0
    }

    /// The 4 KiB-aligned base of the queue.
    pub const fn base(self) -> Hpa {
        Hpa(self.0 & !(PAGE_SIZE - 1))
    }

    /// PQS: the queue spans 2^PQS 4 KiB pages.
    pub const fn pqs(self) -> u8 {
        (self.0 & 7) as u8
    }

    /// Number of descriptors: 2^(PQS+7) (b.1).
    pub const fn entries(self) -> u64 {
        1 << (self.pqs() + 7)
    }

    /// Size of the queue in bytes.
    pub const fn bytes(self) -> u64 {
        self.entries() * DESCRIPTOR_SIZE
    }
}

/// Why a queue address cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueAddressError {
    /// The base is not 4 KiB aligned.
    #[error("page request queue base {0} is not 4 KiB aligned")]
    Misaligned(Hpa),
    /// PQS is a 3-bit field.
    #[error("page request queue size {0} exceeds the maximum of 7")]
    SizeOutOfRange(u8),
}

/// What became of a submitted page request. Whoever embeds the queue delivers `event`
/// through `UnitEvents::interrupt_message` and routes `response` to the device.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submitted {
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
    pub fn event(&self) -> Option<(u64, u32)> {
        match *self {
            Self::Queued { event, .. } | Self::Overflow { event } | Self::OverflowAutoRespond { event, .. } => event,
            Self::WriteFailed { .. } => None,
        }
    }

    /// The response the hardware sends to the device, if any.
    pub fn response(&self) -> Option<PageGroupResponse> {
        match *self {
            Self::OverflowAutoRespond { response, .. } => Some(response),
            Self::WriteFailed { response, .. } => response,
            Self::Queued { .. } | Self::Overflow { .. } => None,
        }
    }

    /// Whether the request reached the queue.
    pub fn is_queued(&self) -> bool {
        matches!(self, Self::Queued { .. })
    }
}

/// What one [`PageRequestQueue::drain`] consumed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// The requests from PQH to PQT, oldest first.
    pub requests: Vec<PageRequest>,
    /// PRO was set and has been cleared, now that the queue is empty: requests were lost
    /// since the last drain, and groups seen only in part will never complete (Linux
    /// discards them, `iopf_queue_discard_partial`).
    pub overflow_cleared: bool,
}

/// Why a drain consumed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DrainError {
    /// A queue entry cannot be read (PQA now points outside host memory).
    #[error("page request queue entry at offset {offset:#x} cannot be read")]
    Memory {
        /// Byte offset of the entry in the queue.
        offset: u64,
        /// The failed access.
        #[source]
        source: MemoryError,
    },
    /// A queue entry does not decode: software overwrote it. Skip it by writing PQH.
    #[error("page request queue entry at offset {offset:#x} is malformed")]
    Malformed {
        /// Byte offset of the entry in the queue.
        offset: u64,
        /// What is wrong with it.
        #[source]
        source: DescriptorError,
    },
}

#[derive(Debug)]
struct State {
    pqh: u64,
    pqt: u64,
    pqa: QueueAddress,
    ppr: bool,
    pro: bool,
    im: bool,
    ip: bool,
    pedata: u32,
    peaddr: u32,
    peuaddr: u32,
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
        if was_pending { None } else { self.raise() }
    }

    /// Page request event generation, as for the fault event (VT-d 7.3, 7.5): set IP;
    /// unless masked, send the message and clear IP.
    fn raise(&mut self) -> Option<Message> {
        self.ip = true;
        if self.im {
            return None;
        }
        self.ip = false;
        Some(self.message())
    }

    fn message(&self) -> Message {
        ((u64::from(self.peuaddr) << 32) | u64::from(self.peaddr), self.pedata)
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
            self.ip = false;
        }
    }

    fn prs(&self) -> u32 {
        (if self.ppr { prs::PPR } else { 0 }) | (if self.pro { prs::PRO } else { 0 })
    }

    fn pectl(&self) -> u32 {
        (if self.im { pectl::IM } else { 0 }) | (if self.ip { pectl::IP } else { 0 })
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
                    regs::PECTL => self.pectl(),
                    regs::PEDATA => self.pedata,
                    regs::PEADDR => self.peaddr,
                    regs::PEUADDR => self.peuaddr,
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
            regs::PQH => self.pqh = merge(self.pqh) & OFFSET_MASK,
            regs::PQT => self.pqt = merge(self.pqt) & OFFSET_MASK,
            regs::PQA => self.pqa = QueueAddress::from_bits(merge(self.pqa.to_bits())),
            _ => match offset {
                regs::PRS => self.clear_status(value),
                regs::PECTL => {
                    // IP is read-only. Clearing IM while IP is set sends the held message
                    // (VT-d 10.4, PECTL_REG; the same rule as FECTL).
                    self.im = value & pectl::IM != 0;
                    if !self.im && self.ip {
                        self.ip = false;
                        return Some(self.message());
                    }
                }
                regs::PEDATA => self.pedata = value,
                regs::PEADDR => self.peaddr = value & !3,
                regs::PEUADDR => self.peuaddr = value,
                _ => {}
            },
        }
        None
    }
}

/// The page request queue of one remapping unit: its registers, and the ring in host
/// memory they describe.
///
/// Hardware side: [`submit`](Self::submit). Software side: the registers, and
/// [`drain`](Self::drain), which does what a driver's page request handler does.
#[derive(Debug)]
pub struct PageRequestQueue {
    state: Mutex<State>,
}

impl Default for PageRequestQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl PageRequestQueue {
    /// The queue at reset: every register zero except PECTL.IM (VT-d 10.4, PECTL_REG).
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State {
                pqh: 0,
                pqt: 0,
                pqa: QueueAddress::default(),
                ppr: false,
                pro: false,
                im: true,
                ip: false,
                pedata: 0,
                peaddr: 0,
                peuaddr: 0,
            }),
        }
    }

    /// Reads the 32-bit register at `offset` (in [`regs::RANGE`], 4-aligned; the MMIO
    /// dispatcher has checked both). Reserved offsets read 0.
    pub fn read32(&self, offset: u64) -> u32 {
        self.state.lock().dword(offset & !3)
    }

    /// Reads the 64-bit slot at `offset` (8-aligned): PQH, PQT and PQA whole, or two
    /// adjacent 32-bit registers (PRS in the high half of 0xd8; PECTL|PEDATA at 0xe0;
    /// PEADDR|PEUADDR at 0xe8).
    pub fn read64(&self, offset: u64) -> u64 {
        let offset = offset & !7;
        let s = self.state.lock();
        u64::from(s.dword(offset)) | (u64::from(s.dword(offset + 4)) << 32)
    }

    /// Writes the 32-bit register at `offset`; a half of a 64-bit register merges with
    /// the other half. Returns the interrupt message to deliver, when the write unmasks a
    /// pending page request event.
    pub fn write32(&self, offset: u64, value: u32) -> Option<(u64, u32)> {
        self.state.lock().write_dword(offset & !3, value)
    }

    /// Writes 64 bits at `offset` (8-aligned), as two 32-bit writes, low half first.
    pub fn write64(&self, offset: u64, value: u64) -> Option<(u64, u32)> {
        let offset = offset & !7;
        let mut s = self.state.lock();
        let lo = s.write_dword(offset, value as u32);
        let hi = s.write_dword(offset + 4, (value >> 32) as u32);
        lo.or(hi)
    }

    /// PQA as last written.
    pub fn queue_address(&self) -> QueueAddress {
        self.state.lock().pqa
    }

    /// PQH: the byte offset of the next descriptor software will read.
    pub fn head(&self) -> u64 {
        self.state.lock().pqh
    }

    /// PQT: the byte offset of the next descriptor hardware will write.
    pub fn tail(&self) -> u64 {
        self.state.lock().pqt
    }

    /// PRS: PPR and PRO.
    pub fn status(&self) -> u32 {
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
    pub fn submit(&self, mem: &HostMemory, req: PageRequest) -> Submitted {
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

    /// Consumes every request between PQH and PQT, as a driver's page request handler does
    /// (Linux `prq_event_thread`): clear PPR, read the descriptors, write PQH = PQT, and,
    /// with the queue now empty, clear PRO if it was set.
    ///
    /// All or nothing: on an error no register changes. One lock is held throughout, so
    /// concurrent drains never hand out a request twice.
    pub fn drain(&self, mem: &HostMemory) -> Result<Drained, DrainError> {
        let mut s = self.state.lock();
        let mask = s.ring_mask();
        let base = s.pqa.base();
        let tail = s.pqt & mask;
        let mut head = s.pqh & mask;
        let mut requests = Vec::with_capacity((((tail + mask + 1 - head) & mask) / DESCRIPTOR_SIZE) as usize);
        while head != tail {
            let desc =
                read_descriptor(mem, base, head).map_err(|source| DrainError::Memory { offset: head, source })?;
            let req =
                PageRequest::from_descriptor(desc).map_err(|source| DrainError::Malformed { offset: head, source })?;
            requests.push(req);
            head = (head + DESCRIPTOR_SIZE) & mask;
        }
        s.pqh = tail;
        let overflow_cleared = s.pro;
        s.clear_status(prs::PPR | prs::PRO);
        Ok(Drained { requests, overflow_cleared })
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

fn read_descriptor(mem: &HostMemory, base: Hpa, offset: u64) -> Result<[u64; 4], MemoryError> {
    let addr = entry_address(mem, base, offset)?;
    let mut desc = [0u64; 4];
    for (i, word) in desc.iter_mut().enumerate() {
        *word = mem.read_u64(Hpa(addr.0 + 8 * i as u64))?;
    }
    Ok(desc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Iova, SourceId};
    use crate::unit::memory::MIN_MEMORY_SIZE;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    const BASE: Hpa = Hpa(0x10_0000);
    const PEADDR: u32 = 0xfee0_1000;
    const PEDATA: u32 = 0x4041;

    fn memory() -> HostMemory {
        HostMemory::new(MIN_MEMORY_SIZE).unwrap()
    }

    /// A queue of 2^(pqs+7) entries at BASE, with the event unmasked unless `masked`.
    fn queue(pqs: u8, masked: bool) -> PageRequestQueue {
        let q = PageRequestQueue::new();
        assert_eq!(q.write64(regs::PQA, QueueAddress::new(BASE, pqs).unwrap().to_bits()), None);
        q.write32(regs::PEDATA, PEDATA);
        q.write32(regs::PEADDR, PEADDR | 3);
        q.write32(regs::PEUADDR, 0);
        if !masked {
            assert_eq!(q.write32(regs::PECTL, 0), None);
        }
        q
    }

    fn req(n: u64, last: bool) -> PageRequest {
        PageRequest {
            sid: SourceId::new(0, 3, 0),
            addr: Iova(0x4000_0000 + n * 0x1000),
            read: true,
            write: n.is_multiple_of(2),
            prgi: (n % 512) as u16,
            last,
            private_data: None,
        }
    }

    const MSG: Option<(u64, u32)> = Some((PEADDR as u64, PEDATA));

    #[test]
    fn queue_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<PageRequestQueue>();
    }

    #[test]
    fn registers_reset_and_mask_as_the_spec_says() {
        let q = PageRequestQueue::new();
        assert_eq!(q.read32(regs::PECTL), pectl::IM, "IM set at reset");
        for o in [regs::PQH, regs::PQT, regs::PQA] {
            assert_eq!(q.read64(o), 0);
        }
        // PQH/PQT keep bits 18:5 only, through either half.
        q.write64(regs::PQH, u64::MAX);
        assert_eq!(q.head(), OFFSET_MASK);
        q.write32(regs::PQT + 4, u32::MAX);
        q.write32(regs::PQT, 0x1234_5677);
        assert_eq!(q.read64(regs::PQT), 0x1234_5677 & OFFSET_MASK);
        // PQA drops reserved bits 11:3; the halves merge.
        q.write32(regs::PQA, 0xabcd_eff8 | 5);
        q.write32(regs::PQA + 4, 0x12);
        assert_eq!(q.queue_address().to_bits(), 0x12_abcd_e005);
        assert_eq!(q.queue_address().base(), Hpa(0x12_abcd_e000));
        assert_eq!(q.queue_address().entries(), 1 << 12);
        // PEADDR ignores bits 1:0; the 64-bit slots pair the 32-bit registers.
        q.write64(regs::PEADDR, 0x0000_0001_fee0_0003);
        assert_eq!(q.read64(regs::PEADDR), 0x0000_0001_fee0_0000);
        q.write32(regs::PEDATA, 0x55);
        assert_eq!(q.read64(regs::PECTL), (0x55 << 32) | u64::from(pectl::IM));
        // IP is read-only.
        q.write32(regs::PECTL, pectl::IM | pectl::IP);
        assert_eq!(q.read32(regs::PECTL), pectl::IM);
        // 0xd8 is reserved; PRS is the high half of its slot.
        q.write32(0xd8, u32::MAX);
        assert_eq!(q.read64(0xd8), 0);
    }

    #[test]
    fn queue_address_validation() {
        assert_eq!(QueueAddress::new(Hpa(0x1800), 0), Err(QueueAddressError::Misaligned(Hpa(0x1800))));
        assert_eq!(QueueAddress::new(BASE, 8), Err(QueueAddressError::SizeOutOfRange(8)));
        let a = QueueAddress::new(BASE, 7).unwrap();
        assert_eq!((a.entries(), a.bytes()), (1 << 14, 512 * 1024));
        assert_eq!(a.bytes() - 1, OFFSET_MASK | 0x1f, "the offset field reaches the largest queue");
        let a = QueueAddress::new(BASE, 0).unwrap();
        assert_eq!((a.entries(), a.bytes()), (128, 4096));
        assert_eq!(QueueAddress::from_bits(0xfff8), QueueAddress::new(Hpa(0xf000), 0).unwrap());
    }

    #[test]
    fn submit_then_drain_round_trips() {
        let mem = memory();
        let q = queue(0, true);
        let mut sent = Vec::new();
        for n in 0..5 {
            let mut r = req(n, n == 4);
            if n == 2 {
                r.private_data = Some([0xaaaa, 0xbbbb]);
            }
            let s = q.submit(&mem, r);
            assert!(matches!(s, Submitted::Queued { offset, .. } if offset == n * 32), "{s:?}");
            assert_eq!(s.response(), None);
            sent.push(r);
        }
        assert_eq!(q.tail(), 5 * 32);
        assert_eq!(q.head(), 0);
        assert_eq!(q.status(), prs::PPR);
        // The descriptors really are in host memory, at PQA + offset.
        let qw1 = mem.read_u64(Hpa(BASE.0 + 3 * 32 + 8)).unwrap();
        assert_eq!(qw1 & !0xfff, 0x4000_3000);
        let drained = q.drain(&mem).unwrap();
        assert_eq!(drained, Drained { requests: sent, overflow_cleared: false });
        assert_eq!(q.head(), q.tail());
        assert_eq!(q.status(), 0, "drain clears PPR");
        assert_eq!(q.drain(&mem).unwrap(), Drained::default());
    }

    #[test]
    fn stop_markers_are_queued_like_requests() {
        let mem = memory();
        let q = queue(0, true);
        let mut stop = req(9, true);
        stop.read = false;
        stop.write = false;
        assert!(q.submit(&mem, stop).is_queued());
        let got = q.drain(&mem).unwrap().requests;
        assert_eq!(got, vec![stop]);
        assert!(got[0].is_stop_marker());
    }

    #[test]
    fn full_queue_sets_pro_and_answers_only_last_requests() {
        let mem = memory();
        let q = queue(0, true);
        // 128 entries, one always free: 127 fit.
        for n in 0..127 {
            assert!(q.submit(&mem, req(n, false)).is_queued(), "entry {n}");
        }
        assert_eq!(q.tail(), 127 * 32);
        assert_eq!(q.submit(&mem, req(200, false)), Submitted::Overflow { event: None });
        assert_eq!(q.status(), prs::PPR | prs::PRO);
        // Dropped last requests are answered with Success by the hardware (VT-d 7.5.1).
        let want = PageGroupResponse { sid: SourceId::new(0, 3, 0), prgi: 201, code: ResponseCode::Success };
        assert_eq!(q.submit(&mem, req(201, true)), Submitted::OverflowAutoRespond { response: want, event: None });
        // A dropped stop marker is not answered.
        let mut stop = req(202, true);
        stop.read = false;
        stop.write = false;
        assert_eq!(q.submit(&mem, stop), Submitted::Overflow { event: None });
        // Software frees space but leaves PRO set: requests are still dropped.
        q.write64(regs::PQH, 64 * 32);
        assert_eq!(q.submit(&mem, req(203, true)).response(), Some(PageGroupResponse { prgi: 203, ..want }));
        assert_eq!(q.tail(), 127 * 32, "nothing written while PRO is set");
        // Draining empties the queue and clears PRO; requests flow again.
        let drained = q.drain(&mem).unwrap();
        assert_eq!(drained.requests.len(), 127 - 64);
        assert!(drained.overflow_cleared);
        assert_eq!(q.status(), 0);
        assert!(q.submit(&mem, req(204, false)).is_queued());
    }

    #[test]
    fn overflow_with_ppr_clear_raises_the_event() {
        let mem = memory();
        let q = queue(0, false);
        assert_eq!(q.submit(&mem, req(0, false)).event(), MSG);
        for n in 1..127 {
            assert_eq!(q.submit(&mem, req(n, false)).event(), None, "PPR already set");
        }
        // Linux clears PPR before it reads the queue; an overflow after that is news.
        q.write32(regs::PRS, prs::PPR);
        assert_eq!(q.submit(&mem, req(300, false)), Submitted::Overflow { event: MSG });
        // While PRO is set, drops raise nothing.
        assert_eq!(q.submit(&mem, req(301, false)), Submitted::Overflow { event: None });
        // PRS is write-1-to-clear: writing 0 changes nothing.
        q.write32(regs::PRS, 0);
        assert_eq!(q.status(), prs::PRO);
    }

    #[test]
    fn event_is_raised_only_when_ppr_goes_from_0_to_1() {
        let mem = memory();
        let q = queue(0, false);
        let first = q.submit(&mem, req(0, false));
        assert_eq!(first.event(), MSG);
        assert_eq!(q.read32(regs::PECTL) & pectl::IP, 0, "IP clears once the message is sent");
        assert_eq!(q.submit(&mem, req(1, false)).event(), None);
        q.drain(&mem).unwrap();
        assert_eq!(q.submit(&mem, req(2, false)).event(), MSG, "PPR was cleared by the drain");
    }

    #[test]
    fn masked_event_is_held_in_ip_and_sent_on_unmask() {
        let mem = memory();
        let q = queue(0, true);
        assert_eq!(q.submit(&mem, req(0, false)).event(), None);
        assert_eq!(q.read32(regs::PECTL), pectl::IM | pectl::IP);
        assert_eq!(q.write32(regs::PECTL, pectl::IM), None, "still masked");
        assert_eq!(q.write32(regs::PECTL, 0), MSG);
        assert_eq!(q.read32(regs::PECTL), 0);
        assert_eq!(q.write32(regs::PECTL, 0), None, "sent once");
        // A masked event that software services before unmasking is withdrawn.
        q.write32(regs::PECTL, pectl::IM);
        q.drain(&mem).unwrap();
        assert_eq!(q.submit(&mem, req(1, false)).event(), None);
        assert_ne!(q.read32(regs::PECTL) & pectl::IP, 0);
        q.write32(regs::PRS, prs::PPR);
        assert_eq!(q.read32(regs::PECTL), pectl::IM);
        assert_eq!(q.write32(regs::PECTL, 0), None);
        // The upper address register takes part in the message.
        q.write32(regs::PEUADDR, 0x1);
        assert_eq!(q.submit(&mem, req(2, false)).event(), Some((0x1_0000_0000 | u64::from(PEADDR), PEDATA)));
    }

    #[test]
    fn ring_wraps_around() {
        let mem = memory();
        let q = queue(0, true);
        let mut n = 0;
        // Three times round a 128-entry ring in uneven batches.
        for batch in [100u64, 27, 90, 77, 50] {
            let mut sent = Vec::new();
            for _ in 0..batch {
                let s = q.submit(&mem, req(n, n % 3 == 0));
                let Submitted::Queued { offset, .. } = s else { panic!("dropped {n}: {s:?}") };
                assert!(offset < 4096);
                sent.push(req(n, n % 3 == 0));
                n += 1;
            }
            assert_eq!(q.drain(&mem).unwrap().requests, sent);
        }
        assert_eq!(n, 344);
        assert_eq!(q.tail(), (344 % 128) * 32);
        assert_eq!(q.head(), q.tail());
    }

    #[test]
    fn offsets_beyond_a_smaller_queue_wrap_into_it() {
        let mem = memory();
        let q = queue(1, true);
        q.write64(regs::PQH, 8000);
        q.write64(regs::PQT, 8000);
        // Shrink to one page: offset 8000 is entry 122 of 128 there.
        q.write64(regs::PQA, QueueAddress::new(BASE, 0).unwrap().to_bits());
        let s = q.submit(&mem, req(0, false));
        assert_eq!(s, Submitted::Queued { offset: 8000 - 4096, event: None });
        assert_eq!(q.drain(&mem).unwrap().requests, vec![req(0, false)]);
    }

    #[test]
    fn queue_outside_memory_writes_nothing() {
        let mem = memory();
        let q = queue(0, true);
        q.write64(regs::PQA, MIN_MEMORY_SIZE | 1);
        let s = q.submit(&mem, req(0, true));
        assert!(matches!(s, Submitted::WriteFailed { error: MemoryError::OutOfRange { .. }, .. }), "{s:?}");
        assert_eq!(s.response().map(|r| r.code), Some(ResponseCode::Failure));
        assert_eq!(q.submit(&mem, req(1, false)).response(), None);
        assert_eq!((q.tail(), q.status()), (0, 0), "no register changed");
        // At the very top of the address space the entry address itself would wrap.
        q.write64(regs::PQA, QueueAddress::WRITABLE);
        q.write64(regs::PQT, 0x1000);
        assert!(matches!(q.submit(&mem, req(2, false)), Submitted::WriteFailed { .. }));
    }

    #[test]
    fn drain_errors_consume_nothing() {
        let mem = memory();
        let q = queue(0, true);
        assert!(q.submit(&mem, req(0, false)).is_queued());
        assert!(q.submit(&mem, req(1, false)).is_queued());
        // Software scribbles over the second entry.
        mem.write_u64(Hpa(BASE.0 + 32), 0x7).unwrap();
        let err = q.drain(&mem).unwrap_err();
        assert_eq!(err, DrainError::Malformed { offset: 32, source: DescriptorError::WrongType(7) });
        assert_eq!((q.head(), q.status()), (0, prs::PPR));
        // Moving PQA out of memory makes the entries unreadable.
        q.write64(regs::PQA, MIN_MEMORY_SIZE);
        assert!(matches!(q.drain(&mem), Err(DrainError::Memory { offset: 0, .. })));
        assert_eq!(q.head(), 0);
    }

    #[test]
    fn concurrent_submitters_lose_nothing() {
        let mem = memory();
        let q = queue(2, true); // 512 entries
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let (q, mem) = (&q, &mem);
                scope.spawn(move || {
                    for i in 0..100 {
                        assert!(q.submit(mem, req(t * 1000 + i, false)).is_queued());
                    }
                });
            }
        });
        let mut got: Vec<u64> =
            q.drain(&mem).unwrap().requests.iter().map(|r| (r.addr.0 - 0x4000_0000) >> 12).collect();
        got.sort_unstable();
        let mut want: Vec<u64> = (0..4).flat_map(|t| (0..100).map(move |i| t * 1000 + i)).collect();
        want.sort_unstable();
        assert_eq!(got, want);
    }

    proptest! {
        /// Against a reference model: a bounded FIFO with a sticky overflow flag.
        #[test]
        fn matches_reference_fifo(ops in proptest::collection::vec(0u8..10, 1..600)) {
            let mem = memory();
            let q = queue(0, false);
            let mut fifo: VecDeque<PageRequest> = VecDeque::new();
            let (mut ppr, mut pro) = (false, false);
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    0..=6 => {
                        let r = req(i as u64, op == 6);
                        let pending = ppr || pro;
                        let s = q.submit(&mem, r);
                        if pro {
                            prop_assert_eq!(s.event(), None);
                            prop_assert!(!s.is_queued());
                        } else if fifo.len() == 127 {
                            pro = true;
                            prop_assert!(!s.is_queued());
                            prop_assert_eq!(s.event(), if pending { None } else { MSG });
                        } else {
                            ppr = true;
                            fifo.push_back(r);
                            prop_assert!(s.is_queued());
                            prop_assert_eq!(s.event(), if pending { None } else { MSG });
                        }
                        if !s.is_queued() {
                            prop_assert_eq!(s.response().is_some(), r.last);
                        }
                    }
                    7 | 8 => {
                        let d = q.drain(&mem).unwrap();
                        prop_assert_eq!(d.requests, fifo.drain(..).collect::<Vec<_>>());
                        prop_assert_eq!(d.overflow_cleared, pro);
                        ppr = false;
                        pro = false;
                    }
                    _ => {
                        q.write32(regs::PRS, prs::PPR);
                        ppr = false;
                    }
                }
                let status = (if ppr { prs::PPR } else { 0 }) | (if pro { prs::PRO } else { 0 });
                prop_assert_eq!(q.status(), status);
                prop_assert_eq!(((q.tail() + 4096 - q.head()) % 4096) / 32, fifo.len() as u64);
            }
        }
    }
}
