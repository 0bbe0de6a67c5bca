//! Invalidation requests and how they reach the unit (VT-d 6.5):
//! the typed requests the driver issues ([`Invalidation`]), how a range becomes a
//! page-selective request (address mask, invalidation hint, domain-selective fallback) and
//! the matching device-TLB range, and the two ways to carry them out: register-based
//! (CCMD and the IVA/IOTLB pair, after Linux `__iommu_flush_context` /
//! `__iommu_flush_iotlb`) or queued (`queue`, after Linux `qi_flush_*`), chosen once at
//! init ([`Invalidator`]).
//!
//! It does not decide *when* to invalidate: the driver calls it after each change, according
//! to its flush policy. Device-TLB invalidations exist only as queue descriptors (VT-d
//! 6.5.2.5), so the driver refuses ATS when the queue is off.

use std::collections::BTreeSet;

use tracing::warn;

use super::error::DriverError;
use super::queue::{InvalidationQueue, Started};
use super::registers::{Capabilities, Registers};
use crate::ids::{DomainId, Iova, PAGE_SHIFT, SourceId};
use crate::unit::invalidation::descriptor::encode;
use crate::unit::invalidation::{ContextInvalidation, IotlbInvalidation};
use crate::unit::regs::{self, ccmd, iotlb};

/// What a context-cache invalidation covers (CCMD.CIRG, VT-d 10.4.7).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ContextScope {
    /// Every cached context entry.
    Global,
    /// The entries of one device; `did` is the domain its old entry named (VT-d 6.5.1.1).
    Device {
        /// The device.
        sid: SourceId,
        /// DID of the entry being replaced.
        did: DomainId,
    },
}

/// What an IOTLB invalidation covers (IOTLB_REG.IIRG, VT-d 10.4.8.1).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum IotlbScope {
    /// Every domain.
    Global,
    /// Every entry tagged with one domain id, paging-structure caches included.
    Domain(DomainId),
    /// 2^`am` pages at `addr` (aligned to that size) within one domain (VT-d 10.4.8.2).
    Pages {
        /// The domain.
        did: DomainId,
        /// First address, aligned to 2^(12+am).
        addr: Iova,
        /// Address mask: log2 of the number of 4 KiB pages.
        am: u32,
        /// Invalidation hint: only leaf entries changed, paging-structure caches may stay.
        ih: bool,
    },
}

/// The page-selective flush that covers `[start, end)` of domain `did`, or the
/// domain-selective one when that would need a mask above `mamv` (Linux
/// `iommu_flush_iotlb_psi`).
///
/// VT-d 6.5.1.2 / 10.4.8.2: ADDR must be aligned to 2^AM pages, so AM is the smallest value
/// for which one aligned block holds both the first and the last page; that is at least
/// ceil(log2(pages)) and more when the range straddles a larger boundary. `ih` is the
/// invalidation hint: set only when no page-table page was freed, so that
/// paging-structure caches are dropped whenever a table was unlinked.
pub(crate) fn page_scope(did: DomainId, start: u64, end: u64, ih: bool, mamv: u32) -> IotlbScope {
    let first = start >> PAGE_SHIFT;
    let last = (end.saturating_sub(1)) >> PAGE_SHIFT;
    let am = 64 - (first ^ last).leading_zeros();
    if am > mamv {
        return IotlbScope::Domain(did);
    }
    IotlbScope::Pages { did, addr: Iova((first >> am) << am << PAGE_SHIFT), am, ih }
}

/// A device-TLB invalidation range: `2^pages_log2` pages at `addr` (aligned to that size),
/// sent with the ATS S-bit encoding (VT-d 6.5.2.5; PCIe ATS 2.3.2).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct DeviceTlbRange {
    /// First address, aligned to 2^(12 + pages_log2).
    pub(crate) addr: Iova,
    /// log2 of the number of 4 KiB pages.
    pub(crate) pages_log2: u32,
}

impl DeviceTlbRange {
    /// The whole address space (Linux passes `MAX_AGAW_PFN_WIDTH` to
    /// `qi_flush_dev_iotlb`: 52 bits of page number, every S bit set).
    pub(crate) const ALL: Self = Self { addr: Iova(0), pages_log2: 52 };

    /// The device-TLB range that goes with an IOTLB invalidation: the same aligned block
    /// for a page-selective one (Linux `iommu_flush_dev_iotlb(domain, addr, mask)`), the
    /// whole space for domain-selective and global ones.
    pub(crate) fn for_scope(scope: IotlbScope) -> Self {
        match scope {
            IotlbScope::Pages { addr, am, .. } => Self { addr, pages_log2: am },
            IotlbScope::Domain(_) | IotlbScope::Global => Self::ALL,
        }
    }
}

/// One invalidation request, whichever interface carries it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Invalidation {
    /// Context cache (descriptor type 1 / CCMD).
    Context(ContextScope),
    /// IOTLB and paging-structure caches (type 2 / IOTLB_REG).
    Iotlb(IotlbScope),
    /// One function's device TLB (type 3; queue only).
    DeviceTlb {
        /// The function.
        sid: SourceId,
        /// What to drop.
        range: DeviceTlbRange,
    },
    /// A descriptor built elsewhere (interrupt-entry-cache invalidations, page group
    /// responses, or software's own descriptors; queue only), already validated.
    Raw(u64, u64),
}

impl Invalidation {
    /// The 128-bit descriptor (VT-d 6.5.2). The drain bits of IOTLB descriptors
    /// follow CAP.DRD/DWD as Linux sets them; device-TLB descriptors carry queue depth 0
    /// (32: the unit then bounds the function by the depth its port advertised) and no
    /// PFSID (no virtual functions here).
    pub(crate) fn descriptor(self, read_drain: bool, write_drain: bool) -> (u64, u64) {
        match self {
            Self::Context(ContextScope::Global) => encode::context(ContextInvalidation::Global),
            Self::Context(ContextScope::Device { sid, did }) => {
                encode::context(ContextInvalidation::Device { did, sid, function_mask: 0 })
            }
            Self::Iotlb(scope) => {
                let inv = match scope {
                    IotlbScope::Global => IotlbInvalidation::Global,
                    IotlbScope::Domain(did) => IotlbInvalidation::Domain(did),
                    // am <= MAMV (18) by construction in `page_scope`.
                    IotlbScope::Pages { did, addr, am, ih } => {
                        IotlbInvalidation::Page { did, addr, am: am.min(63) as u8, ih }
                    }
                };
                encode::iotlb_draining(inv, read_drain, write_drain)
            }
            Self::DeviceTlb { sid, range } => encode::device_tlb(sid, 0, range.addr, range.pages_log2),
            Self::Raw(qw0, qw1) => (qw0, qw1),
        }
    }
}

/// The IOTLB invalidation followed by the matching device-TLB invalidation of every ATS
/// device of the domain: one batch, one wait (VT-d 6.5.2.5: a device TLB is invalidated
/// after the IOTLB, so the device cannot refetch the stale translation from it).
///
/// `ats_devices` are the domain's ATS devices behind the unit the batch goes to: a device's
/// TLB is invalidated through the unit its requester id routes to, and only there.
pub(crate) fn with_device_tlbs(
    iotlb: IotlbScope,
    range: DeviceTlbRange,
    ats_devices: &BTreeSet<SourceId>,
) -> Vec<Invalidation> {
    let mut batch = Vec::with_capacity(1 + ats_devices.len());
    batch.push(Invalidation::Iotlb(iotlb));
    batch.extend(ats_devices.iter().map(|&sid| Invalidation::DeviceTlb { sid, range }));
    batch
}

/// A batch [`Invalidator::start`] handed to the unit and nobody has waited for yet.
#[derive(Debug)]
#[must_use = "a started batch must be finished"]
pub(crate) struct Pending(Option<Started>);

/// How invalidations reach the unit, fixed at init (Linux `iommu->flush.flush_context` /
/// `flush_iotlb` point at the register or the queue functions).
#[derive(Debug)]
pub(crate) struct Invalidator {
    queue: Option<InvalidationQueue>,
    read_drain: bool,
    write_drain: bool,
}

impl Invalidator {
    /// Register-based invalidation.
    pub(crate) fn registers(caps: &Capabilities) -> Self {
        Self { queue: None, read_drain: caps.read_drain, write_drain: caps.write_drain }
    }

    /// Queued invalidation through an enabled queue.
    pub(crate) fn queued(queue: InvalidationQueue, caps: &Capabilities) -> Self {
        Self { queue: Some(queue), read_drain: caps.read_drain, write_drain: caps.write_drain }
    }

    /// True when invalidations go through the queue (so device TLBs can be invalidated).
    pub(crate) fn is_queued(&self) -> bool {
        self.queue.is_some()
    }

    /// Carries out `batch` in order and returns once all of it has completed.
    ///
    /// Queued: one submission with a single wait (split only past the queue's batch
    /// limit). Registers: one command per request; device-TLB requests are refused.
    pub(crate) fn run(&self, regs: &Registers, batch: &[Invalidation]) -> Result<(), DriverError> {
        let started = self.start(regs, batch);
        self.finish(regs, batch, started)
    }

    /// Hands `batch` to the unit without waiting for it, when invalidation is queued;
    /// register-based invalidation is synchronous, so it does nothing yet. Pair it with
    /// [`Self::finish`] on the same batch: between the two, other units can be started.
    pub(crate) fn start(&self, regs: &Registers, batch: &[Invalidation]) -> Pending {
        match &self.queue {
            Some(q) if !batch.is_empty() => Pending(Some(q.start(regs, batch, self.read_drain, self.write_drain))),
            _ => Pending(None),
        }
    }

    /// Returns once `batch`, begun by [`Self::start`], has completed.
    pub(crate) fn finish(&self, regs: &Registers, batch: &[Invalidation], pending: Pending) -> Result<(), DriverError> {
        if batch.is_empty() {
            return Ok(());
        }
        if let Some(q) = &self.queue {
            return match pending.0 {
                Some(started) => q.finish(regs, batch, started, self.read_drain, self.write_drain),
                None => q.run(regs, batch, self.read_drain, self.write_drain),
            };
        }
        for inv in batch {
            match *inv {
                Invalidation::Context(scope) => regs.flush_context(scope)?,
                Invalidation::Iotlb(scope) => regs.flush_iotlb(scope, self.read_drain, self.write_drain)?,
                Invalidation::DeviceTlb { .. } | Invalidation::Raw(..) => {
                    return Err(DriverError::Hardware(
                        "this invalidation needs queued invalidation (VT-d 6.5.2)".to_owned(),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Registers {
    /// Invalidates the context cache and waits for CCMD.ICC to clear (VT-d 10.4.7).
    pub(crate) fn flush_context(&self, scope: ContextScope) -> Result<(), DriverError> {
        let cmd = match scope {
            ContextScope::Global => ccmd::ICC | (ccmd::GLOBAL << ccmd::CIRG_SHIFT),
            // FM=0: only this exact function (no function masking).
            ContextScope::Device { sid, did } => {
                ccmd::ICC
                    | (ccmd::DEVICE << ccmd::CIRG_SHIFT)
                    | (u64::from(sid.0) << ccmd::SID_SHIFT)
                    | u64::from(did.0)
            }
        };
        let _g = self.lock();
        self.command(&CONTEXT_COMMAND, cmd, &scope)
    }

    /// Invalidates the IOTLB (and, unless the hint says otherwise, the paging-structure
    /// caches) and waits for IOTLB_REG.IVT to clear (VT-d 10.4.8).
    pub(crate) fn flush_iotlb(
        &self,
        scope: IotlbScope,
        read_drain: bool,
        write_drain: bool,
    ) -> Result<(), DriverError> {
        let (iirg, did, iva) = match scope {
            IotlbScope::Global => (iotlb::GLOBAL, 0, None),
            IotlbScope::Domain(did) => (iotlb::DOMAIN, did.0, None),
            IotlbScope::Pages { did, addr, am, ih } => {
                let iva = addr.0 | if ih { iotlb::IVA_IH } else { 0 } | (u64::from(am) & iotlb::IVA_AM_MASK);
                (iotlb::PAGE, did.0, Some(iva))
            }
        };
        let mut cmd = iotlb::IVT | (iirg << iotlb::IIRG_SHIFT) | (u64::from(did) << iotlb::DID_SHIFT);
        // Linux sets the drain bits whenever the unit reports it can drain (CAP.DRD/DWD).
        if read_drain {
            cmd |= iotlb::DR;
        }
        if write_drain {
            cmd |= iotlb::DW;
        }
        let _g = self.lock();
        if let Some(iva) = iva {
            self.write64(regs::IVA, iva)?;
        }
        self.command(&IOTLB_COMMAND, cmd, &scope)
    }

    /// Writes `cmd` (its busy bit set) to `register`, waits for the unit to clear the busy
    /// bit, and fails if the actual granularity reads 0: the unit refused the request, e.g.
    /// a mask above MAMV (VT-d 10.4.7, 10.4.8.1). Linux only logs a refusal; here it is an
    /// error, since a refused flush leaves stale entries behind. The caller holds the
    /// register lock.
    fn command(&self, register: &CommandRegister, cmd: u64, scope: &dyn std::fmt::Debug) -> Result<(), DriverError> {
        let CommandRegister { offset, busy, actual_shift, actual_mask, what } = *register;
        self.write64(offset, cmd)?;
        let done = self.poll64(offset, what, |v| v & busy == 0)?;
        if (done >> actual_shift) & actual_mask == 0 {
            warn!(?scope, "{what} refused");
            return Err(DriverError::Hardware(format!("{what} {scope:?} refused")));
        }
        Ok(())
    }
}

/// A register-based invalidation command register: where it is, its busy bit, and where
/// the unit reports the granularity it actually performed.
#[derive(Clone, Copy)]
struct CommandRegister {
    offset: u64,
    busy: u64,
    actual_shift: u32,
    actual_mask: u64,
    what: &'static str,
}

/// CCMD: ICC, CAIG (VT-d 10.4.7).
const CONTEXT_COMMAND: CommandRegister = CommandRegister {
    offset: regs::CCMD,
    busy: ccmd::ICC,
    actual_shift: ccmd::CAIG_SHIFT,
    actual_mask: ccmd::GRANULARITY_MASK,
    what: "context-cache invalidation",
};
/// IOTLB_REG: IVT, IAIG (VT-d 10.4.8.1).
const IOTLB_COMMAND: CommandRegister = CommandRegister {
    offset: regs::IOTLB,
    busy: iotlb::IVT,
    actual_shift: iotlb::IAIG_SHIFT,
    actual_mask: iotlb::GRANULARITY_MASK,
    what: "IOTLB invalidation",
};

#[cfg(test)]
mod tests {
    use super::*;

    const D: DomainId = DomainId(7);
    const PAGE: u64 = 4096;

    fn pages(start: u64, end: u64, ih: bool) -> IotlbScope {
        page_scope(D, start, end, ih, 18)
    }

    #[test]
    fn single_and_aligned_ranges_use_the_exact_mask() {
        assert_eq!(pages(0x5000, 0x6000, true), IotlbScope::Pages { did: D, addr: Iova(0x5000), am: 0, ih: true });
        assert_eq!(
            pages(0x20_0000, 0x40_0000, false),
            IotlbScope::Pages { did: D, addr: Iova(0x20_0000), am: 9, ih: false }
        );
        // 3 pages round up to 4
        assert_eq!(pages(0x4000, 0x7000, true), IotlbScope::Pages { did: D, addr: Iova(0x4000), am: 2, ih: true });
    }

    #[test]
    fn unaligned_ranges_grow_until_one_block_covers_them() {
        // two pages straddling a 2 MiB boundary need a 4 MiB block
        assert_eq!(pages(0x1f_f000, 0x20_1000, true), IotlbScope::Pages { did: D, addr: Iova(0), am: 10, ih: true });
        // pages 3..=4 -> block of 8 at 0
        assert_eq!(pages(3 * PAGE, 5 * PAGE, true), IotlbScope::Pages { did: D, addr: Iova(0), am: 3, ih: true });
        for (s, e) in [(3u64, 5u64), (1, 2), (511, 513), (1000, 1100), (7, 1 << 18)] {
            let IotlbScope::Pages { addr, am, .. } = pages(s * PAGE, e * PAGE, true) else {
                panic!("fell back for {s}..{e}");
            };
            let block = PAGE << am;
            assert_eq!(addr.0 % block, 0);
            assert!(addr.0 <= s * PAGE && addr.0 + block >= e * PAGE);
            assert!(block >= (e - s) * PAGE);
        }
    }

    #[test]
    fn device_tlb_ranges_follow_the_iotlb_scope() {
        use crate::ats::range as srange;
        use crate::unit::invalidation::descriptor::{Descriptor, decode};

        let scope = pages(3 * PAGE, 5 * PAGE, true);
        let range = DeviceTlbRange::for_scope(scope);
        assert_eq!(range, DeviceTlbRange { addr: Iova(0), pages_log2: 3 });
        let sid = SourceId::new(4, 2, 1);
        let (qw0, qw1) = Invalidation::DeviceTlb { sid, range }.descriptor(true, true);
        let Ok(Descriptor::DeviceTlb(d)) = decode(qw0, qw1) else { panic!("not a device-TLB descriptor") };
        assert_eq!((d.sid, d.queue_depth), (sid, 0));
        assert_eq!(srange::decode(d.addr_s), (Iova(0), 8 * PAGE));
        assert_eq!(DeviceTlbRange::for_scope(IotlbScope::Domain(D)), DeviceTlbRange::ALL);
        let (qw0, qw1) = Invalidation::DeviceTlb { sid, range: DeviceTlbRange::ALL }.descriptor(true, true);
        let Ok(Descriptor::DeviceTlb(d)) = decode(qw0, qw1) else { panic!("not a device-TLB descriptor") };
        assert_eq!(srange::decode(d.addr_s), (Iova(0), u64::MAX), "the whole space");
    }

    #[test]
    fn descriptors_decode_to_the_requested_scope() {
        use crate::unit::invalidation::descriptor::{Descriptor, decode};

        let scope = pages(0x20_0000, 0x40_0000, false);
        let (qw0, qw1) = Invalidation::Iotlb(scope).descriptor(true, false);
        assert_eq!(qw0 & (1 << 6), 0, "no write drain without CAP.DWD");
        assert_ne!(qw0 & (1 << 7), 0, "read drain with CAP.DRD");
        assert_eq!(
            decode(qw0, qw1),
            Ok(Descriptor::Iotlb(IotlbInvalidation::Page { did: D, addr: Iova(0x20_0000), am: 9, ih: false }))
        );
        let sid = SourceId::new(1, 2, 3);
        let (qw0, qw1) = Invalidation::Context(ContextScope::Device { sid, did: D }).descriptor(true, true);
        assert_eq!(
            decode(qw0, qw1),
            Ok(Descriptor::Context(ContextInvalidation::Device { did: D, sid, function_mask: 0 }))
        );
    }

    #[test]
    fn large_ranges_fall_back_to_the_domain() {
        assert_eq!(pages(0, 1 << 30, true), IotlbScope::Pages { did: D, addr: Iova(0), am: 18, ih: true });
        assert_eq!(pages(0, (1 << 30) + PAGE, true), IotlbScope::Domain(D));
        assert_eq!(pages(0x3fff_f000, 0x4000_1000, true), IotlbScope::Domain(D));
        assert_eq!(page_scope(D, 0, 2 * PAGE, true, 0), IotlbScope::Domain(D));
        // near the top of a 57-bit space
        let top = 1u64 << 57;
        assert_eq!(
            pages(top - PAGE, top, false),
            IotlbScope::Pages { did: D, addr: Iova(top - PAGE), am: 0, ih: false }
        );
    }
}
