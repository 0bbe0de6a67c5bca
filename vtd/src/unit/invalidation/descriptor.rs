//! 128-bit invalidation descriptors (VT-d 6.5.2.1-6.5.2.8, 7.6): decoding with the exact
//! reserved-bit checks, and encoders for software.
//!
//! Owns the bit layouts only. A descriptor that fails to decode is an invalidation queue
//! error (IQE) with the [`QueueErrorCode`] the engine reports in IQERCD.IQEI. The
//! page group response (type 9) is decoded by `unit::prq`, which owns its layout.

use super::caches::{ContextInvalidation, IotlbInvalidation};
use crate::ids::{DomainId, Iova, SourceId};
use crate::unit::interrupt::IecInvalidation;

/// Type 1: context-cache invalidation (VT-d 6.5.2.1).
pub const CONTEXT_TYPE: u64 = 1;
/// Type 2: IOTLB invalidation (VT-d 6.5.2.3).
pub const IOTLB_TYPE: u64 = 2;
/// Type 3: device-TLB invalidation (VT-d 6.5.2.5).
pub const DEVICE_TLB_TYPE: u64 = 3;
/// Type 4: interrupt-entry-cache invalidation (VT-d 6.5.2.7).
pub const IEC_TYPE: u64 = 4;
/// Type 5: invalidation wait (VT-d 6.5.2.8).
pub const WAIT_TYPE: u64 = 5;
/// Type 9: page group response (VT-d 7.6; its layout is `unit::prq`'s).
pub const PAGE_GROUP_RESPONSE_TYPE: u64 = crate::unit::prq::PAGE_GROUP_RESPONSE_TYPE as u64;

/// IOTLB descriptor (type 2) qw0: drain writes.
const IOTLB_DW: u64 = 1 << 6;
/// IOTLB descriptor (type 2) qw0: drain reads.
const IOTLB_DR: u64 = 1 << 7;

/// IQERCD.IQEI: why the queue stopped (VT-d 10.4.29).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueErrorCode {
    /// 1: the tail pointer is outside the queue.
    InvalidTail = 1,
    /// 2: the descriptor (or a wait descriptor's status address) could not be accessed.
    FetchError = 2,
    /// 3: an unknown or unsupported descriptor type.
    InvalidType = 3,
    /// 4: reserved fields set.
    ReservedFields = 4,
    /// 5: 256-bit descriptors requested (IQA.DW) without scalable mode.
    InvalidWidth = 5,
}

/// A device-TLB invalidation (VT-d 6.5.2.5): forwarded to the device as an ATS
/// invalidation request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceTlbInvalidationDesc {
    /// The function whose device TLB is invalidated.
    pub sid: SourceId,
    /// MIP / invalidate queue depth the software believes the device has (0 means 32).
    pub queue_depth: u8,
    /// ADDR with the S bit in bit 0, as in the ATS invalidation request.
    pub addr_s: u64,
}

/// An invalidation-wait descriptor (VT-d 6.5.2.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitDesc {
    /// IF: set ICS.IWC and raise the completion event.
    pub interrupt: bool,
    /// SW: write `status_data` to `status_addr`.
    pub status_write: bool,
    /// FN: later descriptors wait for this one (always true in this in-order engine).
    pub fence: bool,
    /// Status data.
    pub status_data: u32,
    /// Status address (4-byte aligned).
    pub status_addr: u64,
}

/// A decoded descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Descriptor {
    /// Type 1.
    Context(ContextInvalidation),
    /// Type 2 (drain flags are accepted and need no action: the unit has no write buffer).
    Iotlb(IotlbInvalidation),
    /// Type 3.
    DeviceTlb(DeviceTlbInvalidationDesc),
    /// Type 4.
    Iec(IecInvalidation),
    /// Type 5.
    Wait(WaitDesc),
    /// Type 9, kept raw: the page-request layer decodes it.
    PageGroupResponse(u64, u64),
}

/// Reserved masks per type, after QEMU's `VTD_INV_DESC_*_RSVD` with the spec's PFSID
/// fields allowed in type 3 and PD reserved in type 5 (ECAP.PDS = 0).
const CC_RSVD: (u64, u64) = (0xfffc_0000_0000_f1c0, u64::MAX);
const IOTLB_RSVD: (u64, u64) = (0xffff_ffff_0000_f100, 0xf80);
const DEVTLB_RSVD: (u64, u64) = (0x000f_0000_ffe0_01f0, 0xffe);
const IEC_RSVD: (u64, u64) = (0xffff_0000_07ff_f1e0, u64::MAX);
const WAIT_RSVD: (u64, u64) = (0xffff_f180, 0x3);

/// The descriptor type: `qw0[3:0] | qw0[11:9] << 4`.
pub const fn descriptor_type(qw0: u64) -> u64 {
    (qw0 & 0xf) | (((qw0 >> 9) & 0x7) << 4)
}

/// Decodes one descriptor.
pub fn decode(qw0: u64, qw1: u64) -> Result<Descriptor, QueueErrorCode> {
    let rsvd = |(m0, m1): (u64, u64)| {
        if qw0 & m0 != 0 || qw1 & m1 != 0 { Err(QueueErrorCode::ReservedFields) } else { Ok(()) }
    };
    let granularity = (qw0 >> 4) & 3;
    let did = DomainId(((qw0 >> 16) & 0xffff) as u16);
    match descriptor_type(qw0) {
        CONTEXT_TYPE => {
            rsvd(CC_RSVD)?;
            let sid = SourceId(((qw0 >> 32) & 0xffff) as u16);
            let function_mask = ((qw0 >> 48) & 3) as u8;
            Ok(Descriptor::Context(match granularity {
                1 => ContextInvalidation::Global,
                2 => ContextInvalidation::Domain(did),
                3 => ContextInvalidation::Device { did, sid, function_mask },
                _ => return Err(QueueErrorCode::ReservedFields),
            }))
        }
        IOTLB_TYPE => {
            rsvd(IOTLB_RSVD)?;
            Ok(Descriptor::Iotlb(match granularity {
                1 => IotlbInvalidation::Global,
                2 => IotlbInvalidation::Domain(did),
                3 => IotlbInvalidation::Page {
                    did,
                    addr: Iova(qw1 & !0xfff),
                    am: (qw1 & 0x3f) as u8,
                    ih: qw1 & (1 << 6) != 0,
                },
                _ => return Err(QueueErrorCode::ReservedFields),
            }))
        }
        DEVICE_TLB_TYPE => {
            rsvd(DEVTLB_RSVD)?;
            Ok(Descriptor::DeviceTlb(DeviceTlbInvalidationDesc {
                sid: SourceId(((qw0 >> 32) & 0xffff) as u16),
                queue_depth: ((qw0 >> 16) & 0x1f) as u8,
                addr_s: qw1 & !0xffe,
            }))
        }
        IEC_TYPE => {
            rsvd(IEC_RSVD)?;
            Ok(Descriptor::Iec(if qw0 & (1 << 4) == 0 {
                IecInvalidation::Global
            } else {
                IecInvalidation::Index { index: ((qw0 >> 32) & 0xffff) as u16, index_mask: ((qw0 >> 27) & 0x1f) as u8 }
            }))
        }
        WAIT_TYPE => {
            rsvd(WAIT_RSVD)?;
            Ok(Descriptor::Wait(WaitDesc {
                interrupt: qw0 & (1 << 4) != 0,
                status_write: qw0 & (1 << 5) != 0,
                fence: qw0 & (1 << 6) != 0,
                status_data: (qw0 >> 32) as u32,
                status_addr: qw1 & !3,
            }))
        }
        PAGE_GROUP_RESPONSE_TYPE => Ok(Descriptor::PageGroupResponse(qw0, qw1)),
        _ => Err(QueueErrorCode::InvalidType),
    }
}

/// Encoders, for drivers and tests: the inverse of [`decode`].
pub mod encode {
    use super::*;

    /// Type 1.
    pub fn context(inv: ContextInvalidation) -> (u64, u64) {
        let qw0 = match inv {
            ContextInvalidation::Global => 1 << 4,
            ContextInvalidation::Domain(did) => (2 << 4) | (u64::from(did.0) << 16),
            ContextInvalidation::Device { did, sid, function_mask } => {
                (3 << 4) | (u64::from(did.0) << 16) | (u64::from(sid.0) << 32) | (u64::from(function_mask & 3) << 48)
            }
        };
        (qw0 | 1, 0)
    }

    /// Type 2 (with DR and DW set, as Linux does when the unit reports DRD/DWD).
    pub fn iotlb(inv: IotlbInvalidation) -> (u64, u64) {
        iotlb_draining(inv, true, true)
    }

    /// Type 2 with DR (`read_drain`) and DW (`write_drain`) as given: Linux sets each when
    /// the unit reports it can drain (CAP.DRD, CAP.DWD).
    pub fn iotlb_draining(inv: IotlbInvalidation, read_drain: bool, write_drain: bool) -> (u64, u64) {
        let drain = (if read_drain { IOTLB_DR } else { 0 }) | (if write_drain { IOTLB_DW } else { 0 });
        match inv {
            IotlbInvalidation::Global => (2 | (1 << 4) | drain, 0),
            IotlbInvalidation::Domain(did) => (2 | (2 << 4) | drain | (u64::from(did.0) << 16), 0),
            IotlbInvalidation::Page { did, addr, am, ih } => (
                2 | (3 << 4) | drain | (u64::from(did.0) << 16),
                (addr.0 & !0xfff) | (u64::from(ih) << 6) | u64::from(am & 0x3f),
            ),
        }
    }

    /// Type 3 for `2^pages_log2` pages at `addr` (aligned down), with the ATS S-bit
    /// encoding (VT-d 6.5.2.5; PCIe ATS 2.3.2; Linux `qi_desc_dev_iotlb`).
    pub fn device_tlb(sid: SourceId, queue_depth: u8, addr: Iova, pages_log2: u32) -> (u64, u64) {
        let qw0 = 3 | (u64::from(queue_depth & 0x1f) << 16) | (u64::from(sid.0) << 32);
        (qw0, crate::ats::range::encode(addr, pages_log2))
    }

    /// Type 4.
    pub fn iec(inv: IecInvalidation) -> (u64, u64) {
        match inv {
            IecInvalidation::Global => (4, 0),
            IecInvalidation::Index { index, index_mask } => {
                (4 | (1 << 4) | (u64::from(index_mask & 0x1f) << 27) | (u64::from(index) << 32), 0)
            }
        }
    }

    /// Type 5.
    pub fn wait(w: WaitDesc) -> (u64, u64) {
        let qw0 = 5
            | (u64::from(w.interrupt) << 4)
            | (u64::from(w.status_write) << 5)
            | (u64::from(w.fence) << 6)
            | (u64::from(w.status_data) << 32);
        (qw0, w.status_addr & !3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoders_round_trip() {
        let cases = [
            encode::context(ContextInvalidation::Global),
            encode::context(ContextInvalidation::Device { did: DomainId(7), sid: SourceId(0x1234), function_mask: 2 }),
            encode::iotlb(IotlbInvalidation::Page { did: DomainId(3), addr: Iova(0x4000_0000), am: 9, ih: true }),
            encode::device_tlb(SourceId(0x0100), 8, Iova(0x20_0000), 9),
            encode::iec(IecInvalidation::Index { index: 0x40, index_mask: 2 }),
            encode::wait(WaitDesc {
                interrupt: true,
                status_write: true,
                fence: true,
                status_data: 9,
                status_addr: 0x1000,
            }),
        ];
        for (qw0, qw1) in cases {
            let d = decode(qw0, qw1).expect("valid");
            let again = match d {
                Descriptor::Context(c) => encode::context(c),
                Descriptor::Iotlb(i) => encode::iotlb(i),
                Descriptor::DeviceTlb(t) => {
                    (3 | (u64::from(t.queue_depth) << 16) | (u64::from(t.sid.0) << 32), t.addr_s)
                }
                Descriptor::Iec(i) => encode::iec(i),
                Descriptor::Wait(w) => encode::wait(w),
                Descriptor::PageGroupResponse(a, b) => (a, b),
            };
            assert_eq!(again, (qw0, qw1), "{d:?}");
        }
    }

    #[test]
    fn reserved_bits_and_unknown_types_are_rejected() {
        let (qw0, qw1) = encode::iotlb(IotlbInvalidation::Global);
        assert_eq!(decode(qw0 | (1 << 8), qw1), Err(QueueErrorCode::ReservedFields));
        assert_eq!(decode(qw0, qw1 | 0x80), Err(QueueErrorCode::ReservedFields));
        assert_eq!(decode(qw0 & !(3 << 4), qw1), Err(QueueErrorCode::ReservedFields), "granularity 0");
        let (w0, w1) = encode::wait(WaitDesc {
            interrupt: false,
            status_write: true,
            fence: false,
            status_data: 1,
            status_addr: 0x100,
        });
        assert_eq!(decode(w0 | (1 << 7), w1), Err(QueueErrorCode::ReservedFields), "PD without ECAP.PDS");
        assert_eq!(decode(w0, w1 | 1), Err(QueueErrorCode::ReservedFields));
        assert_eq!(decode(0, 0), Err(QueueErrorCode::InvalidType));
        assert_eq!(decode(6, 0), Err(QueueErrorCode::InvalidType), "PASID-IOTLB needs scalable mode");
        assert_eq!(decode(1 << 9, 0), Err(QueueErrorCode::InvalidType), "type 16");
        let (c0, _) = encode::context(ContextInvalidation::Global);
        assert_eq!(decode(c0, 1), Err(QueueErrorCode::ReservedFields), "context qw1 is reserved");
        // Type 3 allows the PFSID fields.
        let (d0, d1) = encode::device_tlb(SourceId(1), 0, Iova(0), 0);
        assert!(decode(d0 | (0xf << 12) | (0xfff << 52), d1).is_ok());
        assert_eq!(decode(d0 | (1 << 21), d1), Err(QueueErrorCode::ReservedFields));
    }
}
