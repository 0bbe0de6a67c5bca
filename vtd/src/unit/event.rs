//! The event control register block every interrupt-generating event of the unit has: the
//! fault event (FECTL, FEDATA, FEADDR, FEUADDR; VT-d 10.4.10-10.4.13), the invalidation
//! completion event (IECTL, IEDATA, IEADDR, IEUADDR; VT-d 10.4.25-10.4.28) and the page
//! request event (PECTL, PEDATA, PEADDR, PEUADDR; VT-d 10.4.35-10.4.38).
//!
//! [`EventControl`] owns the four registers and the two rules they share (VT-d 7.3 for the
//! fault event, 6.5.2.8 / 7.5 for the others): raising the event sets IP and, unless IM
//! masks it, sends the message and clears IP again; clearing IM while IP is set sends the
//! held message. It does not decide *when* an event is raised (each owner has its own
//! condition: a new fault, IWC, PPR or PRO going from 0 to 1), and it sends nothing itself:
//! a message to send is returned, for the owner to deliver once its lock is released.

use super::regs::event;

/// Which of the unit's own interrupt-generating events an interrupt message belongs to:
/// each has its own register block, so its own address and data, and software tells them
/// apart only by the vector it programmed there. Passed to `UnitEvents::interrupt_message`
/// so that an embedder need not decode its own vectors to route a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventSource {
    /// The fault event (FECTL, FEDATA, FEADDR, FEUADDR): a fault recorded, or a queue error
    /// (IQE, ICE, ITE) set, while no other fault status was pending (VT-d 7.3,
    /// Non-Recoverable Fault Event).
    Fault,
    /// The invalidation completion event (IECTL, IEDATA, IEADDR, IEUADDR): an invalidation
    /// wait descriptor with IF set completed while ICS.IWC was clear (VT-d 6.5.2.9, Hardware
    /// Generation of Invalidation Completion Events; 6.5.2.10 in revision 5, which added the
    /// HPT descriptor before it).
    InvalidationCompletion,
    /// The page request event (PECTL, PEDATA, PEADDR, PEUADDR): PRS.PPR or PRS.PRO set while
    /// neither was (VT-d 7.5, Recoverable Fault Event).
    PageRequest,
}

/// An interrupt message: address and data, for `UnitEvents::interrupt_message`.
pub(crate) type Message = (u64, u32);

/// One event's control register (IM, IP) and message registers (data, address, upper
/// address), at reset: IM set, everything else zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EventControl {
    masked: bool,
    pending: bool,
    data: u32,
    addr: u32,
    upper_addr: u32,
}

impl Default for EventControl {
    fn default() -> Self {
        Self { masked: true, pending: false, data: 0, addr: 0, upper_addr: 0 }
    }
}

impl EventControl {
    /// Event generation: set IP; unless IM is set, send the message and clear IP.
    pub(crate) fn raise(&mut self) -> Option<Message> {
        self.pending = true;
        if self.masked {
            return None;
        }
        self.pending = false;
        Some(self.message())
    }

    /// Software serviced the condition behind a held (masked) event: IP clears without a
    /// message (as hardware withdraws a pending fault event once PPF, PFO and the queue
    /// errors are clear, or a page request event once PPR and PRO are).
    pub(crate) fn withdraw(&mut self) {
        self.pending = false;
    }

    /// The message the registers describe.
    pub(crate) fn message(&self) -> Message {
        ((u64::from(self.upper_addr) << 32) | u64::from(self.addr), self.data)
    }

    /// Reads the register at `rel`, the offset within the block ([`event::CTL`] ..
    /// [`event::UADDR`]); other offsets read 0.
    pub(crate) fn read(&self, rel: u64) -> u32 {
        match rel {
            event::CTL => (if self.masked { event::IM } else { 0 }) | (if self.pending { event::IP } else { 0 }),
            event::DATA => self.data,
            event::ADDR => self.addr,
            event::UADDR => self.upper_addr,
            _ => 0,
        }
    }

    /// Writes the register at `rel`. IP is read-only; clearing IM while IP is set sends the
    /// held message (VT-d 10.4.10: "hardware ... generates the interrupt message ... when
    /// software clears IM"), which is returned. Address bits 1:0 are reserved.
    pub(crate) fn write(&mut self, rel: u64, value: u32) -> Option<Message> {
        match rel {
            event::CTL => {
                self.masked = value & event::IM != 0;
                if !self.masked && self.pending {
                    self.pending = false;
                    return Some(self.message());
                }
            }
            event::DATA => self.data = value,
            event::ADDR => self.addr = value & event::ADDR_MASK,
            event::UADDR => self.upper_addr = value,
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_events_are_held_and_sent_once_on_unmask() {
        let mut e = EventControl::default();
        assert_eq!(e.read(event::CTL), event::IM, "IM set at reset");
        e.write(event::DATA, 0x41);
        e.write(event::ADDR, 0xfee0_0003);
        e.write(event::UADDR, 1);
        assert_eq!(e.read(event::ADDR), 0xfee0_0000, "bits 1:0 reserved");
        assert_eq!(e.raise(), None);
        assert_eq!(e.read(event::CTL), event::IM | event::IP);
        assert_eq!(e.write(event::CTL, event::IM | event::IP), None, "still masked; IP read-only");
        assert_eq!(e.write(event::CTL, 0), Some((0x1_fee0_0000, 0x41)));
        assert_eq!(e.read(event::CTL), 0);
        assert_eq!(e.write(event::CTL, 0), None, "sent once");
        assert_eq!(e.raise(), Some((0x1_fee0_0000, 0x41)), "unmasked: sent at once");
        assert_eq!(e.read(event::CTL), 0);
    }

    #[test]
    fn a_withdrawn_event_is_not_sent() {
        let mut e = EventControl::default();
        assert_eq!(e.raise(), None);
        e.withdraw();
        assert_eq!(e.read(event::CTL), event::IM);
        assert_eq!(e.write(event::CTL, 0), None);
    }
}
