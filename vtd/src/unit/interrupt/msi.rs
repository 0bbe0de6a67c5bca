//! The two MSI formats an interrupt request can arrive in: the compatibility format (Intel
//! SDM vol. 3 "Message Signalled Interrupts"; VT-d 5.1.2.1) and the remappable format
//! (VT-d 5.1.2.2).
//!
//! An interrupt request is a DWORD write to 0xFEEx_xxxx; address bit 4 tells the formats
//! apart. This module owns the bit layouts, their decoders and the public encoders that
//! drivers and tests use to program devices. It does not decide what a request may do.
//!
//! Compatibility format. Address: 0xFEE in bits 31:20 · destination APIC id 19:12 ·
//! reserved 11:5 · format 4 = 0 · RH 3 · DM 2. Data: vector 7:0 · delivery mode 10:8 ·
//! level-assert 14 · trigger 15.
//!
//! Remappable format. Address: 0xFEE in bits 31:20 · handle bits 14:0 in 19:5 · format 4 = 1
//! · SHV 3 · handle bit 15 in 2. Data, when SHV = 1: the subhandle in 15:0, bits 31:16
//! reserved; with SHV = 0 the data is not used.

use super::Remapped;
use super::irte::{DeliveryMode, DestinationMode, Trigger};
use crate::unit::request::{INTERRUPT_RANGE_BASE, overlaps_interrupt_range};

const FORMAT_REMAPPABLE: u64 = 1 << 4;
const SHV: u64 = 1 << 3;
const RH: u64 = 1 << 3;
const DM: u64 = 1 << 2;
const HANDLE_15: u64 = 1 << 2;
const HANDLE_LO_SHIFT: u32 = 5;
const DEST_SHIFT: u32 = 12;
const DATA_DLM_SHIFT: u32 = 8;
const DATA_LEVEL_ASSERT: u32 = 1 << 14;
const DATA_TRIGGER_LEVEL: u32 = 1 << 15;

/// Whether a write to `addr` is an interrupt request: bits 31:20 are 0xFEE. Bits 63:32 are
/// not looked at; a remapping unit faults a nonzero upper half with 0x20.
pub const fn is_interrupt_address(addr: u64) -> bool {
    overlaps_interrupt_range(addr & 0xffff_ffff, 1)
}

/// Address bit 4: the request is in remappable format.
pub(crate) const fn is_remappable(addr: u64) -> bool {
    addr & FORMAT_REMAPPABLE != 0
}

/// A decoded remappable-format request (VT-d 5.1.2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RemappableMsi {
    /// `HANDLE[15:0]`.
    pub(crate) handle: u16,
    /// SHV: the data carries a subhandle.
    pub(crate) shv: bool,
    /// The subhandle (`data[15:0]`); 0 without SHV.
    pub(crate) subhandle: u16,
}

impl RemappableMsi {
    /// Decodes the handle fields of `addr` and, with SHV, the subhandle of `data`. Returns
    /// `Err(handle)` when SHV = 1 and data bits 31:16 are set (reserved; fault 0x20).
    pub(crate) const fn decode(addr: u64, data: u32) -> Result<Self, u16> {
        let handle = (((addr >> HANDLE_LO_SHIFT) & 0x7fff) | if addr & HANDLE_15 != 0 { 1 << 15 } else { 0 }) as u16;
        let shv = addr & SHV != 0;
        if !shv {
            return Ok(Self { handle, shv, subhandle: 0 });
        }
        if data >> 16 != 0 {
            return Err(handle);
        }
        Ok(Self { handle, shv, subhandle: data as u16 })
    }

    /// interrupt_index = handle (+ subhandle with SHV), computed without wrapping: a sum
    /// above 0xFFFF is beyond any table and faults with 0x21 (VT-d 5.1.4).
    pub(crate) const fn index(self) -> u32 {
        self.handle as u32 + self.subhandle as u32
    }
}

/// Decodes a compatibility-format request into the interrupt it asks for (used when it is
/// passed through unremapped). `None` when the address is outside the interrupt range or
/// the delivery mode is a reserved encoding: such a message cannot be delivered.
pub(crate) const fn decode_compatibility(addr: u64, data: u32) -> Option<Remapped> {
    if addr >> 32 != 0 || !is_interrupt_address(addr) {
        return None;
    }
    let Some(delivery_mode) = DeliveryMode::from_bits(((data >> DATA_DLM_SHIFT) & 0b111) as u8) else {
        return None;
    };
    Some(Remapped {
        vector: data as u8,
        destination: ((addr >> DEST_SHIFT) & 0xff) as u32,
        delivery_mode,
        trigger: if data & DATA_TRIGGER_LEVEL != 0 { Trigger::Level } else { Trigger::Edge },
        destination_mode: if addr & DM != 0 { DestinationMode::Logical } else { DestinationMode::Physical },
        redirection_hint: addr & RH != 0,
        index: None,
    })
}

/// The MSI address and data a device is programmed with to raise interrupt `handle` in
/// remappable format (what an interrupt-remapping-aware driver writes into the device). With
/// `shv`, the subhandle goes in the low 16 bits of the data and is added to the handle; the
/// returned data is 0 (subhandle 0), so OR the subhandle in.
pub const fn msi_remappable(handle: u16, shv: bool) -> (u64, u32) {
    let h = handle as u64;
    let addr = INTERRUPT_RANGE_BASE
        | ((h & 0x7fff) << HANDLE_LO_SHIFT)
        | FORMAT_REMAPPABLE
        | if shv { SHV } else { 0 }
        | if h & 0x8000 != 0 { HANDLE_15 } else { 0 };
    (addr, 0)
}

/// The MSI address and data of a compatibility-format interrupt (Intel SDM vol. 3
/// "Message Address/Data Register Format"), as software programs a device when interrupt
/// remapping is off. The redirection hint is clear; the level-assert bit is set, as Linux
/// does.
pub const fn msi_compatibility(
    destination: u8,
    vector: u8,
    delivery_mode: DeliveryMode,
    trigger: Trigger,
    destination_mode: DestinationMode,
) -> (u64, u32) {
    let dm = match destination_mode {
        DestinationMode::Physical => 0,
        DestinationMode::Logical => DM,
    };
    let tm = match trigger {
        Trigger::Edge => 0,
        Trigger::Level => DATA_TRIGGER_LEVEL,
    };
    let addr = INTERRUPT_RANGE_BASE | ((destination as u64) << DEST_SHIFT) | dm;
    let data = vector as u32 | ((delivery_mode.to_bits() as u32) << DATA_DLM_SHIFT) | DATA_LEVEL_ASSERT | tm;
    (addr, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remappable_encoding_round_trips_every_handle_bit() {
        for handle in [0u16, 1, 0x7fff, 0x8000, 0xffff, 0x1234] {
            for shv in [false, true] {
                let (addr, data) = msi_remappable(handle, shv);
                assert!(is_interrupt_address(addr) && is_remappable(addr));
                assert_eq!(addr >> 32, 0);
                let m = RemappableMsi::decode(addr, data);
                assert_eq!(m, Ok(RemappableMsi { handle, shv, subhandle: 0 }));
            }
        }
        // Exact positions: handle[14:0] in [19:5], handle[15] in bit 2, SHV bit 3, format bit 4.
        assert_eq!(msi_remappable(0x8001, true).0, 0xfee0_0000 | 1 << 5 | 1 << 4 | 1 << 3 | 1 << 2);
    }

    #[test]
    fn subhandle_only_with_shv() {
        let (addr, _) = msi_remappable(10, true);
        assert_eq!(RemappableMsi::decode(addr, 5).map(RemappableMsi::index), Ok(15));
        assert_eq!(RemappableMsi::decode(addr, 0x1_0005), Err(10), "data[31:16] reserved with SHV");
        let (addr, _) = msi_remappable(10, false);
        assert_eq!(RemappableMsi::decode(addr, 0xffff_ffff).map(RemappableMsi::index), Ok(10), "data ignored");
        let (addr, _) = msi_remappable(0xffff, true);
        assert_eq!(RemappableMsi::decode(addr, 1).map(RemappableMsi::index), Ok(0x1_0000), "no 16-bit wrap");
    }

    #[test]
    fn compatibility_round_trips() {
        let (addr, data) = msi_compatibility(0x42, 0x51, DeliveryMode::Nmi, Trigger::Level, DestinationMode::Logical);
        assert!(is_interrupt_address(addr) && !is_remappable(addr));
        let r = decode_compatibility(addr, data);
        assert_eq!(
            r,
            Some(Remapped {
                vector: 0x51,
                destination: 0x42,
                delivery_mode: DeliveryMode::Nmi,
                trigger: Trigger::Level,
                destination_mode: DestinationMode::Logical,
                redirection_hint: false,
                index: None,
            })
        );
        assert_eq!(decode_compatibility(addr, data & !(0b111 << 8) | 3 << 8), None, "reserved delivery mode");
        assert_eq!(decode_compatibility(0xfed0_0000, data), None, "not an interrupt address");
        assert_eq!(decode_compatibility(addr | 1 << 32, data), None);
    }
}
