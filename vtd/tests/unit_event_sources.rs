//! The unit's own interrupt messages name the event they belong to: a unit whose three
//! event register blocks hold distinct addresses and data sends the fault event (a recorded
//! fault, then a queue error; VT-d 7.3), the invalidation completion event (a wait
//! descriptor with IF set; VT-d 6.5.2.9) and the page request event (VT-d 7.5) each with
//! its own source, address and data.

mod common;

use std::sync::Arc;

use common::{Messages, Rig};
use dmar_vtd::unit::invalidation::descriptor::{WaitDesc, encode};
use dmar_vtd::unit::prq::PageRequest;
use dmar_vtd::unit::regs::{self, frcd, fsts};
use dmar_vtd::unit::tables::{AddressWidth, TranslationType};
use dmar_vtd::unit::{Direction, EventSource, PageRequestOutcome, UnitConfig};
use dmar_vtd::{Iova, SourceId};

const SID: SourceId = SourceId::new(0, 8, 0);
const STRANGER: SourceId = SourceId::new(2, 0, 0);

/// (control register, data, address, upper address) of each event block.
const FAULT: (u64, u32, u32, u32) = (regs::FECTL, 0x4101, 0xfee0_1000, 0);
const COMPLETION: (u64, u32, u32, u32) = (regs::IECTL, 0x4202, 0xfee0_2000, 0);
const PAGE_REQUEST: (u64, u32, u32, u32) = (regs::PECTL, 0x4303, 0xfee0_3000, 1);

/// Programs an event block (data, address, upper address) and unmasks it.
fn program(rig: &Rig, (ctl, data, addr, upper): (u64, u32, u32, u32)) {
    rig.unit.write32(ctl + regs::event::DATA, data).expect("data");
    rig.unit.write32(ctl + regs::event::ADDR, addr).expect("addr");
    rig.unit.write32(ctl + regs::event::UADDR, upper).expect("upper addr");
    rig.unit.write32(ctl, 0).expect("unmask");
}

fn message(source: EventSource, (_, data, addr, upper): (u64, u32, u32, u32)) -> (EventSource, u64, u32) {
    (source, (u64::from(upper) << 32) | u64::from(addr), data)
}

#[test]
fn each_event_names_its_source_with_its_own_address_and_data() {
    let events = Arc::new(Messages::default());
    let mut rig = Rig::with_events(UnitConfig::default(), events.clone());
    rig.enable_queue();
    rig.attach(SID, 3, TranslationType::DeviceTlb, AddressWidth::Aw48);
    let prq = rig.alloc();
    rig.unit.write64(regs::PQA, prq.0).expect("pqa");
    for block in [FAULT, COMPLETION, PAGE_REQUEST] {
        program(&rig, block);
    }
    assert_eq!(events.take(), [], "nothing was pending when the events were unmasked");

    // A recorded fault (no root entry for bus 2): the fault event.
    assert!(rig.unit.translate(STRANGER, Iova(0x1000), Direction::Read).is_err());
    assert_eq!(events.take(), [message(EventSource::Fault, FAULT)]);

    // A wait descriptor with IF set: the invalidation completion event (VT-d 6.5.2.8, 6.5.2.9).
    let wait = WaitDesc { interrupt: true, status_write: false, fence: true, status_data: 0, status_addr: 0 };
    rig.submit(&[encode::wait(wait)]);
    assert_eq!(rig.unit.read32(regs::ICS).expect("ics"), 1, "IWC");
    assert_eq!(events.take(), [message(EventSource::InvalidationCompletion, COMPLETION)]);

    // A page request: the page request event, to an address above 4 GiB (PEUADDR).
    let request =
        PageRequest { sid: SID, addr: Iova(0x7000), read: true, write: false, prgi: 1, last: true, private_data: None };
    assert_eq!(rig.unit.page_request(request), Ok(PageRequestOutcome::Queued));
    assert_eq!(events.take(), [message(EventSource::PageRequest, PAGE_REQUEST)]);

    // Software services the fault; then a queue error raises the fault event again (VT-d 7.3).
    rig.unit.write32(regs::FRCD_BASE + frcd::F_DWORD, (frcd::F >> 32) as u32).expect("clear F");
    assert_eq!(rig.unit.read32(regs::FSTS).expect("fsts"), 0);
    rig.submit(&[(0, 0)]);
    assert_ne!(rig.unit.read32(regs::FSTS).expect("fsts") & fsts::IQE, 0, "IQE");
    assert_eq!(events.take(), [message(EventSource::Fault, FAULT)]);
}

#[test]
fn a_held_event_is_sent_with_its_source_when_unmasked() {
    let events = Arc::new(Messages::default());
    let mut rig = Rig::with_events(UnitConfig::default(), events.clone());
    rig.enable_queue();
    // Data and addresses programmed, every event still masked (IM = 1 at reset).
    for (ctl, data, addr, upper) in [FAULT, COMPLETION] {
        rig.unit.write32(ctl + regs::event::DATA, data).expect("data");
        rig.unit.write32(ctl + regs::event::ADDR, addr).expect("addr");
        rig.unit.write32(ctl + regs::event::UADDR, upper).expect("upper addr");
    }
    assert!(rig.unit.translate(STRANGER, Iova(0), Direction::Write).is_err());
    let wait = WaitDesc { interrupt: true, status_write: false, fence: true, status_data: 0, status_addr: 0 };
    rig.submit(&[encode::wait(wait)]);
    assert_eq!(events.take(), [], "masked: held with IP set");
    for ctl in [regs::FECTL, regs::IECTL] {
        assert_eq!(rig.unit.read32(ctl).expect("ctl"), regs::event::IM | regs::event::IP);
    }
    rig.unit.write32(regs::IECTL, 0).expect("unmask");
    rig.unit.write32(regs::FECTL, 0).expect("unmask");
    assert_eq!(
        events.take(),
        [message(EventSource::InvalidationCompletion, COMPLETION), message(EventSource::Fault, FAULT)]
    );
}
