//! Register-based invalidation (VT-d 6.5.1): the context command register (CCMD, VT-d
//! 10.4.7) and the IOTLB registers (IVA_REG / IOTLB_REG, VT-d 10.4.8).
//!
//! Owns decoding a command into a cache invalidation and the register value hardware leaves
//! behind: the command bit clear and the actual granularity performed (0 when refused).
//! Commands run synchronously, so the command bit reads back clear at once. The register
//! storage and the write that triggers a command stay in `unit::mmio`.

use super::caches::{ContextInvalidation, IotlbInvalidation, Performed};
use crate::ids::{DomainId, Iova, SourceId};
use crate::unit::Unit;
use crate::unit::regs::{ccmd, iotlb};

impl Unit {
    /// Runs a context command (VT-d 10.4.7); returns the register value after completion:
    /// ICC clear, CAIG the granularity performed (0 when the request was invalid).
    pub(crate) fn exec_ccmd(&self, v: u64) -> u64 {
        let did = DomainId((v & ccmd::DID_MASK) as u16);
        let sid = SourceId((v >> ccmd::SID_SHIFT) as u16);
        let function_mask = ((v >> ccmd::FM_SHIFT) & ccmd::FM_MASK) as u8;
        let performed = match (v >> ccmd::CIRG_SHIFT) & ccmd::GRANULARITY_MASK {
            ccmd::GLOBAL => Some(self.invalidate_context(ContextInvalidation::Global)),
            ccmd::DOMAIN => Some(self.invalidate_context(ContextInvalidation::Domain(did))),
            ccmd::DEVICE => Some(self.invalidate_context(ContextInvalidation::Device { did, sid, function_mask })),
            _ => None,
        };
        let caig = performed.map_or(0, |p| p as u64);
        (v & !(ccmd::ICC | (ccmd::GRANULARITY_MASK << ccmd::CAIG_SHIFT))) | (caig << ccmd::CAIG_SHIFT)
    }

    /// Runs an IOTLB invalidation (VT-d 10.4.8.1); returns the register value after
    /// completion: IVT clear, IAIG the granularity performed (0 when refused, e.g. AM
    /// above MAMV). Drains (DR/DW) complete immediately: the unit has no write buffers.
    pub(crate) fn exec_iotlb(&self, v: u64, iva: u64) -> u64 {
        let did = DomainId(((v >> iotlb::DID_SHIFT) & iotlb::DID_MASK) as u16);
        let inv = match (v >> iotlb::IIRG_SHIFT) & iotlb::GRANULARITY_MASK {
            iotlb::GLOBAL => Some(IotlbInvalidation::Global),
            iotlb::DOMAIN => Some(IotlbInvalidation::Domain(did)),
            iotlb::PAGE => Some(IotlbInvalidation::Page {
                did,
                addr: Iova(iva & iotlb::IVA_ADDR_MASK),
                am: (iva & iotlb::IVA_AM_MASK) as u8,
                ih: iva & iotlb::IVA_IH != 0,
            }),
            _ => None,
        };
        let performed: Option<Performed> = inv.and_then(|i| self.invalidate_iotlb(i).ok());
        let iaig = performed.map_or(0, |p| p as u64);
        (v & !(iotlb::IVT | (iotlb::GRANULARITY_MASK << iotlb::IAIG_SHIFT))) | (iaig << iotlb::IAIG_SHIFT)
    }
}
