//! Tests of the page request queue: registers, submission, overflow, the event, and a
//! reference-model property test.

use super::queue::*;
use super::{
    DESCRIPTOR_SIZE, DescriptorError, PageGroupResponse, PageRequest, QueueAddress, QueueAddressError, ResponseCode,
};
use crate::ids::Hpa;
use crate::ids::{Iova, SourceId};
use crate::unit::memory::MIN_MEMORY_SIZE;
use crate::unit::memory::{HostMemory, MemoryError};
use crate::unit::regs::{self, pectl, pq::OFFSET_MASK, prs};
use proptest::prelude::*;
use std::collections::VecDeque;

const BASE: Hpa = Hpa(0x10_0000);
const PEADDR: u32 = 0xfee0_1000;
const PEDATA: u32 = 0x4041;

fn memory() -> HostMemory {
    HostMemory::new(MIN_MEMORY_SIZE).unwrap()
}

/// What one [`drain`] consumed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Drained {
    /// The requests from PQH to PQT, oldest first.
    requests: Vec<PageRequest>,
    /// PRO was set and was cleared, the queue being empty.
    overflow_cleared: bool,
}

/// Why a drain consumed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DrainError {
    /// The entry at this offset cannot be read.
    Memory { offset: u64 },
    /// The entry at this offset does not decode.
    Malformed { offset: u64, source: DescriptorError },
}

/// Consumes every request between PQH and PQT through the registers and host memory, as a
/// driver's page request handler does (Linux `prq_event_thread`): clear PPR, read PQT and
/// PQH, read the descriptors, write PQH, and clear PRO once the queue is empty. On an error
/// PQH is left where it was.
fn drain(q: &PageRequestQueue, mem: &HostMemory) -> Result<Drained, DrainError> {
    let pqa = QueueAddress::from_bits(q.read64(regs::PQA));
    let mask = pqa.bytes() - 1;
    q.write32(regs::PRS, prs::PPR);
    let tail = q.read64(regs::PQT) & mask;
    let mut head = q.read64(regs::PQH) & mask;
    let mut requests = Vec::new();
    while head != tail {
        let mut desc = [0u64; 4];
        for (i, word) in desc.iter_mut().enumerate() {
            let at = pqa.base().checked_add(head + 8 * i as u64).ok_or(DrainError::Memory { offset: head })?;
            *word = mem.read_u64(at).map_err(|_| DrainError::Memory { offset: head })?;
        }
        let req =
            PageRequest::from_descriptor(desc).map_err(|source| DrainError::Malformed { offset: head, source })?;
        requests.push(req);
        head = (head + DESCRIPTOR_SIZE) & mask;
    }
    q.write64(regs::PQH, tail);
    let mut overflow_cleared = false;
    if q.read32(regs::PRS) & prs::PRO != 0 && q.read64(regs::PQH) & mask == q.read64(regs::PQT) & mask {
        q.write32(regs::PRS, prs::PRO);
        overflow_cleared = true;
    }
    Ok(Drained { requests, overflow_cleared })
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
    crate::testing::assert_send_sync::<PageRequestQueue>();
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
    let drained = drain(&q, &mem).unwrap();
    assert_eq!(drained, Drained { requests: sent, overflow_cleared: false });
    assert_eq!(q.head(), q.tail());
    assert_eq!(q.status(), 0, "drain clears PPR");
    assert_eq!(drain(&q, &mem).unwrap(), Drained::default());
}

#[test]
fn stop_markers_are_queued_like_requests() {
    let mem = memory();
    let q = queue(0, true);
    let mut stop = req(9, true);
    stop.read = false;
    stop.write = false;
    assert!(q.submit(&mem, stop).is_queued());
    let got = drain(&q, &mem).unwrap().requests;
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
    let drained = drain(&q, &mem).unwrap();
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
    drain(&q, &mem).unwrap();
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
    drain(&q, &mem).unwrap();
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
        assert_eq!(drain(&q, &mem).unwrap().requests, sent);
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
    assert_eq!(drain(&q, &mem).unwrap().requests, vec![req(0, false)]);
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
    let err = drain(&q, &mem).unwrap_err();
    assert_eq!(err, DrainError::Malformed { offset: 32, source: DescriptorError::WrongType(7) });
    // PPR was cleared before the queue was read (as Linux does); PQH did not move.
    assert_eq!((q.head(), q.status()), (0, 0));
    // Moving PQA out of memory makes the entries unreadable.
    q.write64(regs::PQA, MIN_MEMORY_SIZE);
    assert!(matches!(drain(&q, &mem), Err(DrainError::Memory { offset: 0, .. })));
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
    let mut got: Vec<u64> = drain(&q, &mem).unwrap().requests.iter().map(|r| (r.addr.0 - 0x4000_0000) >> 12).collect();
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
                    let d = drain(&q, &mem).unwrap();
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
