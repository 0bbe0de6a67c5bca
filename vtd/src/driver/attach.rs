//! Attaching and detaching devices (Linux `domain_context_mapping_one`,
//! `domain_context_clear_one`): writing and clearing a device's context entry, and the
//! invalidations each change needs (VT-d 6.5.3.3).
//!
//! Rules:
//! - A device attached elsewhere is detached first. Detach invalidates the context cache
//!   (device-selective, tagged with the old domain id), the IOTLB (domain-selective) and,
//!   for a TT=01b entry, the device's whole device TLB, in one batch.
//! - Attaching an ATS device (TT=01b) invalidates its device TLB before the entry is
//!   written, so it starts empty, and records it among the domain's ATS devices first, so
//!   every later unmap invalidates its TLB too.
//! - Translated-request checking ([`AttachOptions::with_check_translated`], a dmar
//!   extension) is switched on in the unit before the TT=01b entry is written, so no
//!   completion escapes it, and off after detach's invalidations, so it covers the device
//!   until its device TLB is empty. This is the driver's one call into the unit outside
//!   registers and memory besides the doorbell: emulator configuration, which no VT-d
//!   register holds.
//!
//! Not here: the table layout and write order of context entries (`context`).

use tracing::debug;

use super::Driver;
use super::config::DomainKind;
use super::context::{Attachment, ContextTables};
use super::error::DriverError;
use super::invalidate::{ContextScope, DeviceTlbRange, Invalidation, IotlbScope};
use crate::ids::{DomainId, Hpa, SourceId};
use crate::unit::tables::{ContextEntry, TranslationType};

/// How a device is attached, beyond its domain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttachOptions {
    ats: bool,
    check_translated: bool,
}

impl AttachOptions {
    /// A device that uses ATS (`ats`) or not, with translated-request checking off.
    pub const fn new(ats: bool) -> Self {
        Self { ats, check_translated: false }
    }

    /// Turns translated-request checking on or off for the device: with it on, the unit
    /// accepts the device's translated requests only inside ranges it completed for it
    /// and has not invalidated since ([`crate::unit::Unit::set_translated_check`]).
    /// Meaningful only for an ATS device in a paging domain (any other device may send no
    /// translated request at all, TT≠01b); ignored otherwise.
    pub const fn with_check_translated(mut self, on: bool) -> Self {
        self.check_translated = on;
        self
    }

    /// Whether the device uses ATS.
    pub const fn ats(&self) -> bool {
        self.ats
    }

    /// Whether translated-request checking is asked for.
    pub const fn check_translated(&self) -> bool {
        self.check_translated
    }
}

/// What detaching a device did.
#[derive(Clone, Copy, Debug)]
struct Detached {
    did: DomainId,
    /// The device's TLB was invalidated (it had a TT=01b entry).
    device_tlb_flushed: bool,
}

impl Driver {
    /// Attaches a device to a domain by writing its context entry (Linux
    /// `domain_context_mapping_one`). A device attached elsewhere is detached first.
    ///
    /// Paging: TT=01b when the device uses ATS, else 00b, SLPTPTR = the domain's top
    /// table, AW = its width. Identity: TT=10b (pass-through). Blocked: the entry stays
    /// not present, so every request faults.
    ///
    /// ATS needs device-TLB support and queued invalidation
    /// ([`DriverError::AtsUnsupported`]). The device's TLB is invalidated before its TT=01b
    /// entry is written; if the device does not answer
    /// ([`DriverError::DeviceTlbTimeout`]) it is left detached.
    ///
    /// Translated-request checking stays off; [`Driver::attach_with`] turns it on.
    pub fn attach(&self, sid: SourceId, did: DomainId, ats: bool) -> Result<(), DriverError> {
        self.attach_with(sid, did, AttachOptions::new(ats))
    }

    /// As [`Driver::attach`], with `options`: translated-request checking is switched on in
    /// the unit before an ATS device's TT=01b entry is written.
    pub fn attach_with(&self, sid: SourceId, did: DomainId, options: AttachOptions) -> Result<(), DriverError> {
        let mut ctx = self.context.lock();
        // Looked up under the context lock: destroy holds it too, so the domain cannot go
        // away between here and the entry write.
        let domain = self.domain(did)?;
        let uses_ats = options.ats && domain.kind == DomainKind::Paging;
        let check_translated = uses_ats && options.check_translated;
        let wanted = Attachment { did, ats: options.ats, check_translated };
        if ctx.devices.get(&sid) == Some(&wanted) {
            return Ok(());
        }
        if uses_ats && !self.ats_supported() {
            return Err(DriverError::AtsUnsupported(sid));
        }
        let detached = self.detach_locked(&mut ctx, sid)?;
        let entry = match domain.kind {
            DomainKind::Blocked => None,
            DomainKind::Identity => {
                Some(ContextEntry::new(did, TranslationType::PassThrough, domain.aw, Hpa(0), false))
            }
            DomainKind::Paging => {
                let tt = if uses_ats { TranslationType::DeviceTlb } else { TranslationType::Untranslated };
                let top = domain.top.ok_or(DriverError::NotPaging(did))?;
                Some(ContextEntry::new(did, tt, domain.aw, top, false))
            }
        };
        if uses_ats {
            // The device TLB must hold nothing from an earlier life before the device may
            // translate again (detach just did this if it was an ATS device).
            if !detached.is_some_and(|d| d.device_tlb_flushed) {
                let range = DeviceTlbRange::ALL;
                self.invalidate(&[Invalidation::DeviceTlb { sid, range }])?;
            }
            // Before the entry is written: from then on every unmap of the domain also
            // invalidates this device's TLB.
            domain.state.lock().ats_devices.insert(sid);
            // Before the entry is written too: every completion the unit gives the device
            // is recorded (detach switched it off).
            if check_translated {
                self.unit.set_translated_check(sid, true);
            }
        }
        if let Some(entry) = entry
            && let Err(e) = ctx.install(&self.memory, &self.frames, sid, entry)
        {
            domain.state.lock().ats_devices.remove(&sid);
            self.unit.set_translated_check(sid, false);
            return Err(e);
        }
        ctx.devices.insert(sid, wanted);
        debug!(sid = %sid, domain = did.0, ats = uses_ats, check_translated, "device attached");
        Ok(())
    }

    /// Detaches a device: clears its context entry and flushes. Returns the domain it was
    /// attached to, or `None` if it was not attached.
    ///
    /// On [`DriverError::DeviceTlbTimeout`] the device is detached all the same (its
    /// translated requests are blocked from now on); only its device TLB is unconfirmed.
    pub fn detach(&self, sid: SourceId) -> Result<Option<DomainId>, DriverError> {
        let mut ctx = self.context.lock();
        Ok(self.detach_locked(&mut ctx, sid)?.map(|d| d.did))
    }

    fn detach_locked(&self, ctx: &mut ContextTables, sid: SourceId) -> Result<Option<Detached>, DriverError> {
        let Some(att) = ctx.devices.remove(&sid) else {
            return Ok(None);
        };
        let old = ctx.clear(&self.memory, sid)?;
        let mut device_tlb_flushed = false;
        let mut result = Ok(());
        if old.present() {
            // VT-d 6.5.3.3 (Linux `domain_context_clear_one`): device-selective
            // context-cache invalidation tagged with the old DID, a domain-selective IOTLB
            // invalidation of the old domain, and for a TT=01b entry the device's whole
            // TLB (`__iommu_flush_dev_iotlb(info, 0, MAX_AGAW_PFN_WIDTH)`); one batch.
            let old_did = old.domain();
            let mut batch = vec![
                Invalidation::Context(ContextScope::Device { sid, did: old_did }),
                Invalidation::Iotlb(IotlbScope::Domain(old_did)),
            ];
            if old.tt_bits() == TranslationType::DeviceTlb as u64 {
                batch.push(Invalidation::DeviceTlb { sid, range: DeviceTlbRange::ALL });
                device_tlb_flushed = true;
            }
            result = self.invalidate(&batch);
        }
        // Only now: unmaps that ran meanwhile still invalidated this device's TLB, and its
        // translated requests were checked until its device TLB was flushed.
        if let Ok(domain) = self.domain(att.did) {
            domain.state.lock().ats_devices.remove(&sid);
        }
        if att.check_translated {
            self.unit.set_translated_check(sid, false);
        }
        debug!(sid = %sid, domain = att.did.0, "device detached");
        result.map(|()| Some(Detached { did: att.did, device_tlb_flushed }))
    }

    /// The devices attached to a domain, ascending (empty for an unknown domain).
    pub fn attached(&self, did: DomainId) -> Vec<SourceId> {
        self.context.lock().attached(did).collect()
    }

    /// The domain a device is attached to.
    pub fn domain_of(&self, sid: SourceId) -> Option<DomainId> {
        self.context.lock().devices.get(&sid).map(|a| a.did)
    }
}
