//! FECTL.IP withdrawal (VT-d 10.4.10): a fault event held pending by the mask is cleared
//! by hardware once software has serviced every condition behind it (every F clear, so
//! PPF reads clear; PFO, IQE, ICE and ITE clear), and unmasking afterwards sends nothing.
//! While any of them is still set, unmasking sends the held message exactly once.

mod common;

use std::sync::Arc;

use common::{Messages, Rig};
use dmar_vtd::unit::invalidation::descriptor::encode;
use dmar_vtd::unit::regs::{self, event, frcd, fsts};
use dmar_vtd::unit::{Direction, EventSource, IotlbInvalidation, UnitConfig};
use dmar_vtd::{Iova, SourceId};

/// No context entry exists for it: its DMA faults (root entry not present).
const STRANGER: SourceId = SourceId::new(0x20, 0, 0);
const DATA: u32 = 0x4142;
const ADDR: u32 = 0xfee0_2000;

/// A unit with translation on and the fault event programmed but masked (IM = 1).
fn rig() -> (Rig, Arc<Messages>) {
    let events = Arc::new(Messages::default());
    let rig = Rig::with_events(UnitConfig::default(), events.clone());
    rig.unit.write32(regs::FEDATA, DATA).expect("fedata");
    rig.unit.write32(regs::FEADDR, ADDR).expect("feaddr");
    rig.unit.write32(regs::FEUADDR, 0).expect("feuaddr");
    assert_eq!(rig.unit.read32(regs::FECTL).expect("fectl"), event::IM, "masked at reset");
    (rig, events)
}

fn fault(rig: &Rig, page: u64) {
    assert!(rig.unit.translate(STRANGER, Iova(page << 12), Direction::Read).is_err());
}

fn fectl(rig: &Rig) -> u32 {
    rig.unit.read32(regs::FECTL).expect("fectl")
}

/// The fault handler's service, as Linux `dmar_fault` does it: clear F in each record
/// from FRI on (one 32-bit write to the top doubleword), then write back PFO and PPF.
fn service_records(rig: &Rig) {
    let status = rig.unit.read32(regs::FSTS).expect("fsts");
    let mut index = u64::from((status >> fsts::FRI_SHIFT) & 0xff);
    loop {
        let at = regs::FRCD_BASE + regs::FRCD_BYTES * index;
        if rig.unit.read64(at + 8).expect("frcd hi") & frcd::F == 0 {
            break;
        }
        rig.unit.write32(at + frcd::F_DWORD, (frcd::F >> 32) as u32).expect("clear F");
        index = (index + 1) % regs::NUM_FAULT_RECORDS as u64;
    }
    rig.unit.write32(regs::FSTS, fsts::PFO | fsts::PPF).expect("clear PFO");
}

fn sent() -> Vec<(EventSource, u64, u32)> {
    vec![(EventSource::Fault, u64::from(ADDR), DATA)]
}

#[test]
fn faults_serviced_while_masked_send_nothing_on_unmask() {
    let (rig, events) = rig();
    fault(&rig, 1);
    fault(&rig, 2);
    assert_eq!(fectl(&rig), event::IM | event::IP, "held");
    service_records(&rig);
    assert_eq!(rig.unit.read32(regs::FSTS).expect("fsts") & (fsts::PPF | fsts::PFO), 0);
    assert_eq!(fectl(&rig), event::IM, "IP withdrawn");
    rig.unit.write32(regs::FECTL, 0).expect("unmask");
    assert_eq!(events.take(), [], "no stale message");
    // The next fault is a new interrupt condition and is sent at once.
    fault(&rig, 3);
    assert_eq!(events.take(), sent());
}

#[test]
fn unmasking_while_a_fault_is_still_recorded_sends_one_message() {
    let (rig, events) = rig();
    fault(&rig, 1);
    fault(&rig, 2);
    // Only the first record is serviced: PPF still reads set.
    rig.unit.write32(regs::FRCD_BASE + frcd::F_DWORD, (frcd::F >> 32) as u32).expect("clear F");
    assert_ne!(rig.unit.read32(regs::FSTS).expect("fsts") & fsts::PPF, 0);
    assert_eq!(fectl(&rig), event::IM | event::IP, "still pending");
    rig.unit.write32(regs::FECTL, 0).expect("unmask");
    assert_eq!(events.take(), sent());
    assert_eq!(fectl(&rig), 0);
    rig.unit.write32(regs::FECTL, 0).expect("again");
    assert_eq!(events.take(), [], "sent once");
}

#[test]
fn an_overflow_keeps_the_event_pending_until_pfo_is_cleared() {
    let (rig, events) = rig();
    for page in 0..=regs::NUM_FAULT_RECORDS as u64 {
        fault(&rig, page);
    }
    assert_ne!(rig.unit.read32(regs::FSTS).expect("fsts") & fsts::PFO, 0);
    // Every F cleared, PFO left set.
    for index in 0..regs::NUM_FAULT_RECORDS as u64 {
        let at = regs::FRCD_BASE + regs::FRCD_BYTES * index + frcd::F_DWORD;
        rig.unit.write32(at, (frcd::F >> 32) as u32).expect("clear F");
    }
    assert_eq!(fectl(&rig), event::IM | event::IP, "PFO still set");
    rig.unit.write32(regs::FSTS, fsts::PFO).expect("clear PFO");
    assert_eq!(fectl(&rig), event::IM, "withdrawn with PFO");
    rig.unit.write32(regs::FECTL, 0).expect("unmask");
    assert_eq!(events.take(), []);
}

#[test]
fn a_queue_error_keeps_the_event_pending_and_its_clearing_withdraws_it() {
    let (mut rig, events) = rig();
    rig.enable_queue();
    // A global IOTLB invalidation with a reserved bit set: IQE.
    let (qw0, qw1) = encode::iotlb(IotlbInvalidation::Global);
    rig.submit(&[(qw0 | (1 << 8), qw1)]);
    assert_ne!(rig.unit.read32(regs::FSTS).expect("fsts") & fsts::IQE, 0);
    fault(&rig, 1);
    assert_eq!(fectl(&rig), event::IM | event::IP);
    // The fault is serviced, the queue error not yet.
    service_records(&rig);
    assert_eq!(fectl(&rig), event::IM | event::IP, "IQE still set");
    // Software fixes the queue (a wait descriptor over the bad one) and clears IQE.
    let q = rig.unit.read64(regs::IQA).expect("iqa") & !0xfff;
    rig.mem.write_u64(dmar_vtd::Hpa(q), encode::iotlb(IotlbInvalidation::Global).0).expect("fix");
    rig.unit.write32(regs::FSTS, fsts::IQE).expect("clear IQE");
    assert_eq!(rig.unit.read32(regs::FSTS).expect("fsts") & fsts::IQE, 0);
    assert_eq!(fectl(&rig), event::IM, "withdrawn");
    rig.unit.write32(regs::FECTL, 0).expect("unmask");
    assert_eq!(events.take(), []);
}

#[test]
fn a_queue_error_left_set_is_sent_on_unmask() {
    let (mut rig, events) = rig();
    rig.enable_queue();
    let (qw0, qw1) = encode::iotlb(IotlbInvalidation::Global);
    rig.submit(&[(qw0 | (1 << 8), qw1)]);
    assert_eq!(fectl(&rig), event::IM | event::IP);
    // Clearing an FSTS bit that is not set services nothing.
    rig.unit.write32(regs::FSTS, fsts::PFO).expect("clear PFO");
    assert_eq!(fectl(&rig), event::IM | event::IP);
    rig.unit.write32(regs::FECTL, 0).expect("unmask");
    assert_eq!(events.take(), sent());
}
