//! The two descriptor formats of PRI: the page request descriptor hardware writes into the
//! page request queue (VT-d 7.5.1), and the page group response descriptor software writes
//! into the invalidation queue (type 9, VT-d 7.6.1).
//!
//! Bit positions live here and nowhere else. Only requests without a PASID are modelled:
//! a descriptor that carries one (PP set) is refused with a typed error.

use crate::ats::MAX_PRG_INDEX;
use crate::ids::{Iova, SourceId};
use crate::unit::field::field_enum;
use crate::unit::invalidation::descriptor::descriptor_type;

/// TYPE of a page request descriptor (qw0 bits 7:0).
pub const PAGE_REQUEST_TYPE: u8 = 1;
/// Invalidation-queue descriptor type of a page group response (qw0 bits 3:0 | qw0 bits 11:9 << 4).
pub const PAGE_GROUP_RESPONSE_TYPE: u8 = 9;

/// PRG index: 9 bits (PCIe 10.4.1).
const PRGI_MASK: u16 = MAX_PRG_INDEX;
const PAGE_MASK: u64 = !0xfff;

// Page request descriptor, qw0 (VT-d 7.5.1).
const PR_TYPE_MASK: u64 = 0xff;
const PR_PP: u64 = 1 << 8;
const PR_PDP: u64 = 1 << 9;
const PR_RID_SHIFT: u32 = 16;
/// Without a PASID, PASID bits 51:32, EXE_REQ 52 and PM_REQ 53 have no meaning; with bits
/// 15:10 and 63:54 they must be zero.
const PR_QW0_RESERVED: u64 = 0xffff_ffff_0000_fc00;
// Page request descriptor, qw1 (VT-d 7.5.1).
const PR_RD: u64 = 1 << 0;
const PR_WR: u64 = 1 << 1;
const PR_LPIG: u64 = 1 << 2;
const PR_PRGI_SHIFT: u32 = 3;

// Page group response descriptor (VT-d 7.6.1).
const RESP_PP: u64 = 1 << 4;
const RESP_RC_SHIFT: u32 = 12;
const RESP_RID_SHIFT: u32 = 16;
const RESP_PRGI_SHIFT: u32 = 3;
/// QEMU's reserved masks (`VTD_INV_DESC_PGRESP_RSVD_*`): qw0 bits 8:5 (PDP among them: no private data) and
/// 63:52; qw1 bits 1:0 and 63:12. Qw1 bit 2 (descriptor bit 66) is not in the mask: it was
/// LPIG before VT-d 4.0 and is reserved since, and hardware ignores it (Linux commit
/// 4402e8f39d0b "iommu/vt-d: Remove LPIG from page group response descriptor": "existing
/// hardware all treats bit 66 ... as ignored"), so a response from an older driver that
/// still sets it is accepted.
const RESP_QW0_RESERVED: u64 = 0xfff0_0000_0000_01e0;
const RESP_QW1_RESERVED: u64 = 0xffff_ffff_ffff_f003;

/// A PCIe page request (PRI) as the unit receives it from a device, without a PASID
/// prefix (PCIe 10.4.1).
///
/// A device asks for one page to be made present after its translation request came back
/// with R=W=0. Requests form groups by `prgi`; only the last one (`last`, the L bit,
/// reported as LPIG) is answered, with one [`PageGroupResponse`] for the whole group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRequest {
    /// The requester.
    pub sid: SourceId,
    /// The page the device wants (bits 11:0 are dropped: the message carries bits 63:12).
    pub addr: Iova,
    /// Read access requested.
    pub read: bool,
    /// Write access requested.
    pub write: bool,
    /// PRG index (only the low 9 bits are carried).
    pub prgi: u16,
    /// L: the last request of its group (LPIG in the descriptor).
    pub last: bool,
    /// Private data, when present (PDP; descriptor qw2/qw3).
    pub private_data: Option<[u64; 2]>,
}

impl PageRequest {
    /// A stop marker (PCIe 10.4.1.2: L set, R and W clear) tells software that the device
    /// has stopped using a PRG index space; it needs no response, and Linux drops it
    /// (`prq_event_thread`). It is queued like any request.
    pub const fn is_stop_marker(&self) -> bool {
        self.last && !self.read && !self.write
    }

    /// Whether dropping this request must still produce a response: the device waits for
    /// one for every group whose last request it sent (VT-d 7.5.1), but never for a stop
    /// marker.
    pub(crate) const fn expects_response(&self) -> bool {
        self.last && !self.is_stop_marker()
    }

    /// The response the hardware itself sends for this request's group.
    pub(crate) const fn response(&self, code: ResponseCode) -> PageGroupResponse {
        PageGroupResponse { sid: self.sid, prgi: self.prgi & PRGI_MASK, code }
    }

    /// The 32-byte page request descriptor (VT-d 7.5.1), as four little-endian
    /// quadwords. qw2/qw3 are zero without private data.
    pub fn to_descriptor(&self) -> [u64; 4] {
        let mut qw0 = u64::from(PAGE_REQUEST_TYPE) | (u64::from(self.sid.0) << PR_RID_SHIFT);
        let qw1 = (self.addr.0 & PAGE_MASK)
            | (u64::from(self.prgi & PRGI_MASK) << PR_PRGI_SHIFT)
            | if self.read { PR_RD } else { 0 }
            | if self.write { PR_WR } else { 0 }
            | if self.last { PR_LPIG } else { 0 };
        let [qw2, qw3] = match self.private_data {
            Some(data) => {
                qw0 |= PR_PDP;
                data
            }
            None => [0, 0],
        };
        [qw0, qw1, qw2, qw3]
    }

    /// Decodes a page request descriptor read from the queue.
    pub fn from_descriptor(desc: [u64; 4]) -> Result<Self, DescriptorError> {
        let [qw0, qw1, qw2, qw3] = desc;
        let ty = (qw0 & PR_TYPE_MASK) as u8;
        if ty != PAGE_REQUEST_TYPE {
            return Err(DescriptorError::WrongType(ty));
        }
        if qw0 & PR_PP != 0 {
            return Err(DescriptorError::PasidPresent);
        }
        if qw0 & PR_QW0_RESERVED != 0 {
            return Err(DescriptorError::Reserved(qw0 & PR_QW0_RESERVED));
        }
        Ok(Self {
            sid: SourceId((qw0 >> PR_RID_SHIFT) as u16),
            addr: Iova(qw1 & PAGE_MASK),
            read: qw1 & PR_RD != 0,
            write: qw1 & PR_WR != 0,
            prgi: ((qw1 >> PR_PRGI_SHIFT) as u16) & PRGI_MASK,
            last: qw1 & PR_LPIG != 0,
            private_data: (qw0 & PR_PDP != 0).then_some([qw2, qw3]),
        })
    }
}

/// Why a page request descriptor in the queue does not decode. Hardware writes only good
/// ones, so this means software overwrote the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// TYPE is not 1.
    #[error("descriptor type {0} is not a page request")]
    WrongType(u8),
    /// PP is set: this unit reports no PASIDs.
    #[error("page request carries a pasid, which this unit does not report")]
    PasidPresent,
    /// Bits that must be zero are set (the value shows which).
    #[error("reserved bits {0:#x} set in page request qword 0")]
    Reserved(u64),
}

field_enum! {
    /// The 4-bit response code of a page group response (PCIe 10.4.2.1; Linux `QI_RESP_*`);
    /// the other values are reserved.
    pub enum ResponseCode(u8; code, from_code) {
        /// Every page of the group is now present: the device retries its translations.
        Success = 0,
        /// A page cannot be made present with the requested access: the device reports an
        /// error for the access instead of retrying.
        Invalid = 1,
        /// A catastrophic error: the device disables its page request interface.
        Failure = 0xf,
    }
}

/// A PRG response for a device: the answer to one page request group, sent by software
/// through the invalidation queue (type 9) or by the hardware itself when it had to drop
/// the group's last request (VT-d 7.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageGroupResponse {
    /// The device the response goes to (RID).
    pub sid: SourceId,
    /// The group answered (9 bits).
    pub prgi: u16,
    /// The outcome for the whole group.
    pub code: ResponseCode,
}

impl PageGroupResponse {
    /// The type-9 invalidation descriptor that sends this response (VT-d 7.6.1), as current
    /// Linux builds it (`intel_iommu_page_response`, `QI_PGRP_*`): RID, RC and PRGI, no
    /// PASID, no private data, and qw1 bit 2 clear (VT-d 4.0 made the former LPIG bit
    /// reserved). In 256-bit mode qw2 and qw3 are zero.
    pub fn to_descriptor(&self) -> [u64; 2] {
        let qw0 = u64::from(PAGE_GROUP_RESPONSE_TYPE)
            | (u64::from(self.code.code()) << RESP_RC_SHIFT)
            | (u64::from(self.sid.0) << RESP_RID_SHIFT);
        let qw1 = u64::from(self.prgi & PRGI_MASK) << RESP_PRGI_SHIFT;
        [qw0, qw1]
    }

    /// Decodes and validates a type-9 page group response descriptor (qw0, qw1; the
    /// queue engine checks that qw2/qw3 are zero in 256-bit mode, VT-d 6.5.2). An error is an
    /// invalid descriptor: the invalidation queue reports it as IQE.
    ///
    /// A well-formed response answers the whole group `prgi` of the requester `sid`
    /// whatever qw1 bit 2 holds: VT-d 7.6.1 (since 4.0) has no LPIG in the response, and a
    /// PCIe PRG response always completes its group (PCIe 10.4.2).
    pub fn from_descriptor(desc: [u64; 2]) -> Result<Self, ResponseError> {
        let [qw0, qw1] = desc;
        let ty = descriptor_type(qw0) as u8;
        if ty != PAGE_GROUP_RESPONSE_TYPE {
            return Err(ResponseError::WrongType(ty));
        }
        if qw0 & RESP_QW0_RESERVED != 0 {
            return Err(ResponseError::Reserved { qword: 0, bits: qw0 & RESP_QW0_RESERVED });
        }
        if qw1 & RESP_QW1_RESERVED != 0 {
            return Err(ResponseError::Reserved { qword: 1, bits: qw1 & RESP_QW1_RESERVED });
        }
        if qw0 & RESP_PP != 0 {
            return Err(ResponseError::PasidPresent);
        }
        let rc = ((qw0 >> RESP_RC_SHIFT) & 0xf) as u8;
        let code = ResponseCode::from_code(rc).ok_or(ResponseError::UnknownCode(rc))?;
        Ok(Self {
            sid: SourceId((qw0 >> RESP_RID_SHIFT) as u16),
            prgi: ((qw1 >> RESP_PRGI_SHIFT) as u16) & PRGI_MASK,
            code,
        })
    }
}

/// Why a page group response descriptor is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Not a type-9 descriptor.
    #[error("descriptor type {0} is not a page group response")]
    WrongType(u8),
    /// Reserved bits are set (VT-d 7.6.1).
    #[error("reserved bits {bits:#x} set in page group response qword {qword}")]
    Reserved {
        /// Which quadword.
        qword: usize,
        /// The offending bits.
        bits: u64,
    },
    /// PP is set, but this unit reports no PASIDs, so no response can carry one.
    #[error("page group response carries a pasid, which this unit does not report")]
    PasidPresent,
    /// RC is a value PCIe reserves.
    #[error("response code {0:#x} is reserved")]
    UnknownCode(u8),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request() -> PageRequest {
        PageRequest {
            sid: SourceId::new(0x3a, 0x1f, 5),
            addr: Iova(0x0000_7fff_dead_b000),
            read: true,
            write: true,
            prgi: 0x1a5,
            last: true,
            private_data: None,
        }
    }

    #[test]
    fn page_request_descriptor_bit_positions_match_the_spec() {
        let [qw0, qw1, qw2, qw3] = request().to_descriptor();
        assert_eq!(qw0 & 0xff, 1, "TYPE[7:0]");
        assert_eq!((qw0 >> 8) & 1, 0, "PP");
        assert_eq!((qw0 >> 9) & 1, 0, "PDP");
        assert_eq!((qw0 >> 16) & 0xffff, u64::from(SourceId::new(0x3a, 0x1f, 5).0), "RID[31:16]");
        assert_eq!(qw0 >> 32, 0, "no PASID, EXE, PM");
        assert_eq!(qw1 & 1, 1, "RD 0");
        assert_eq!((qw1 >> 1) & 1, 1, "WR 1");
        assert_eq!((qw1 >> 2) & 1, 1, "LPIG 2");
        assert_eq!((qw1 >> 3) & 0x1ff, 0x1a5, "PRGI[11:3]");
        assert_eq!(qw1 & !0xfff, 0x0000_7fff_dead_b000, "ADDR[63:12]");
        assert_eq!((qw2, qw3), (0, 0));
        // The exact words, as Linux's `struct page_req_dsc` lays them out.
        assert_eq!(qw0, 0x0000_0000_3afd_0001);
        assert_eq!(qw1, 0x0000_7fff_dead_bd2f);
    }

    #[test]
    fn private_data_sets_pdp_and_fills_qw2_qw3() {
        let mut r = request();
        r.private_data = Some([0x1111, 0x2222]);
        let d = r.to_descriptor();
        assert_eq!((d[0] >> 9) & 1, 1, "PDP 9");
        assert_eq!((d[2], d[3]), (0x1111, 0x2222));
        assert_eq!(PageRequest::from_descriptor(d), Ok(r));
        // Without PDP, stale words in qw2/qw3 are not private data.
        let mut d = request().to_descriptor();
        d[2] = 0xdead;
        assert_eq!(PageRequest::from_descriptor(d).map(|r| r.private_data), Ok(None));
    }

    #[test]
    fn encoding_drops_what_the_message_cannot_carry() {
        let mut r = request();
        r.addr = Iova(0x1234_5678);
        r.prgi = 0xfe01;
        let back = PageRequest::from_descriptor(r.to_descriptor()).unwrap();
        assert_eq!(back.addr, Iova(0x1234_5000));
        assert_eq!(back.prgi, 0x001);
    }

    #[test]
    fn stop_marker_is_last_without_access() {
        let mut r = request();
        assert!(!r.is_stop_marker());
        r.read = false;
        r.write = false;
        assert!(r.is_stop_marker());
        assert!(!r.expects_response());
        r.last = false;
        assert!(!r.is_stop_marker());
    }

    #[test]
    fn bad_page_request_descriptors_are_typed_errors() {
        let good = request().to_descriptor();
        let mut d = good;
        d[0] = (d[0] & !0xff) | 2;
        assert_eq!(PageRequest::from_descriptor(d), Err(DescriptorError::WrongType(2)));
        let mut d = good;
        d[0] |= 1 << 8;
        assert_eq!(PageRequest::from_descriptor(d), Err(DescriptorError::PasidPresent));
        for bit in [10, 15, 32, 52, 53, 54, 63] {
            let mut d = good;
            d[0] |= 1 << bit;
            assert_eq!(PageRequest::from_descriptor(d), Err(DescriptorError::Reserved(1 << bit)), "bit {bit}");
        }
    }

    #[test]
    fn response_codes_round_trip_and_reserved_codes_are_refused() {
        for code in [ResponseCode::Success, ResponseCode::Invalid, ResponseCode::Failure] {
            assert_eq!(ResponseCode::from_code(code.code()), Some(code));
        }
        assert_eq!(ResponseCode::Failure.code(), 0xf);
        for c in 2..0xf {
            assert_eq!(ResponseCode::from_code(c), None);
        }
    }

    #[test]
    fn response_descriptor_bit_positions_match_the_spec() {
        let r = PageGroupResponse { sid: SourceId::new(1, 2, 3), prgi: 0x155, code: ResponseCode::Invalid };
        let [qw0, qw1] = r.to_descriptor();
        assert_eq!(qw0 & 0xf, 9, "type");
        assert_eq!((qw0 >> 9) & 7, 0, "type high bits");
        assert_eq!((qw0 >> 12) & 0xf, 1, "RC[15:12]");
        assert_eq!((qw0 >> 16) & 0xffff, u64::from(SourceId::new(1, 2, 3).0), "RID[31:16]");
        assert_eq!(qw0 & (1 << 4), 0, "PP");
        // Current Linux (since the VT-d 4.0 change) leaves bit 2, the former LPIG, clear.
        assert_eq!(qw1, 0x155 << 3, "PRGI[11:3], bit 2 clear");
        assert_eq!(PageGroupResponse::from_descriptor([qw0, qw1]), Ok(r));
    }

    #[test]
    fn response_descriptor_reserved_bits_are_refused() {
        let good = PageGroupResponse { sid: SourceId(0x10), prgi: 7, code: ResponseCode::Success }.to_descriptor();
        for bit in [5, 6, 7, 8, 52, 63] {
            let d = [good[0] | (1 << bit), good[1]];
            assert_eq!(
                PageGroupResponse::from_descriptor(d),
                Err(ResponseError::Reserved { qword: 0, bits: 1 << bit }),
                "qw0 bit {bit}"
            );
        }
        for bit in [0, 1, 12, 40, 63] {
            let d = [good[0], good[1] | (1 << bit)];
            assert_eq!(
                PageGroupResponse::from_descriptor(d),
                Err(ResponseError::Reserved { qword: 1, bits: 1 << bit }),
                "qw1 bit {bit}"
            );
        }
    }

    #[test]
    fn response_descriptor_semantic_errors() {
        let good = PageGroupResponse { sid: SourceId(0x10), prgi: 7, code: ResponseCode::Success }.to_descriptor();
        let d = [(good[0] & !0xf) | 2, good[1]];
        assert_eq!(PageGroupResponse::from_descriptor(d), Err(ResponseError::WrongType(2)));
        let d = [good[0] | (1 << 9), good[1]];
        assert_eq!(PageGroupResponse::from_descriptor(d), Err(ResponseError::WrongType(0x19)));
        let d = [good[0] | (0x3 << 12), good[1]];
        assert_eq!(PageGroupResponse::from_descriptor(d), Err(ResponseError::UnknownCode(3)));
        let d = [good[0] | (1 << 4), good[1]];
        assert_eq!(PageGroupResponse::from_descriptor(d), Err(ResponseError::PasidPresent));
        // Without PP the PASID field is ignored, as QEMU's mask allows it (Linux fills it).
        let d = [good[0] | (0x12345 << 32), good[1]];
        assert!(PageGroupResponse::from_descriptor(d).is_ok());
        // The former LPIG bit answers nothing: set (an older driver) or clear (current
        // Linux), the response is the same.
        let want = PageGroupResponse { sid: SourceId(0x10), prgi: 7, code: ResponseCode::Success };
        assert_eq!(PageGroupResponse::from_descriptor([good[0], good[1] | (1 << 2)]), Ok(want), "bit 2 set");
        assert_eq!(PageGroupResponse::from_descriptor(good), Ok(want), "bit 2 clear");
    }

    proptest! {
        #[test]
        fn page_requests_round_trip(
            sid in any::<u16>(), page in 0u64..(1 << 52), read in any::<bool>(), write in any::<bool>(),
            prgi in 0u16..0x200, last in any::<bool>(), data in proptest::option::of(any::<[u64; 2]>()),
        ) {
            let r = PageRequest { sid: SourceId(sid), addr: Iova(page << 12), read, write, prgi, last, private_data: data };
            prop_assert_eq!(PageRequest::from_descriptor(r.to_descriptor()), Ok(r));
        }

        #[test]
        fn responses_round_trip(sid in any::<u16>(), prgi in 0u16..0x200, code in 0usize..3) {
            let code = [ResponseCode::Success, ResponseCode::Invalid, ResponseCode::Failure][code];
            let r = PageGroupResponse { sid: SourceId(sid), prgi, code };
            prop_assert_eq!(PageGroupResponse::from_descriptor(r.to_descriptor()), Ok(r));
        }
    }
}
