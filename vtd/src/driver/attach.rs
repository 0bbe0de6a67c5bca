//! Attaching and detaching devices (Linux `domain_context_mapping_one`,
//! `domain_context_clear_one`): writing and clearing a device's context entry in the unit
//! its requester id routes to (VT-d 8.3.1), the invalidations each change needs on that
//! unit (VT-d 6.5.3.3), and the domain's span of units that follows.
//!
//! Rules:
//! - A device is counted into its domain's span on its unit before its entry is written,
//!   and out of it only after the invalidations that follow clearing the entry: while it
//!   is counted, every domain-wide invalidation reaches its unit. A unit that comes back
//!   into a domain's span gets a domain-selective IOTLB invalidation before the entry is
//!   written, since the unmaps in between did not reach it.
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
use super::driven::Driven;
use super::error::DriverError;
use super::invalidate::{ContextScope, DeviceTlbRange, Invalidation, IotlbScope};
use crate::ids::{DomainId, Hpa, SourceId, UnitId};
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
    /// Attaches a device to a domain by writing its context entry in the unit its requester
    /// id routes to (Linux `domain_context_mapping_one`). A device attached elsewhere is
    /// detached first. The domain then spans that unit too.
    ///
    /// Paging: TT=01b when the device uses ATS, else 00b, SLPTPTR = the domain's top
    /// table, AW = its width. Identity: TT=10b (pass-through). Blocked: the entry stays
    /// not present, so every request faults.
    ///
    /// A requester id no unit covers is refused ([`DriverError::NoUnit`]), as is one behind
    /// a unit this driver does not drive ([`DriverError::NotDriven`]). ATS needs device-TLB
    /// support and queued invalidation on that unit ([`DriverError::AtsUnsupported`]). The
    /// device's TLB is invalidated before its TT=01b entry is written; if the device does
    /// not answer ([`DriverError::DeviceTlbTimeout`]) it is left detached.
    ///
    /// Translated-request checking stays off; [`Driver::attach_with`] turns it on.
    pub fn attach(&self, sid: SourceId, did: DomainId, ats: bool) -> Result<(), DriverError> {
        self.attach_with(sid, did, AttachOptions::new(ats))
    }

    /// As [`Driver::attach`], with `options`: translated-request checking is switched on in
    /// the unit before an ATS device's TT=01b entry is written.
    pub fn attach_with(&self, sid: SourceId, did: DomainId, options: AttachOptions) -> Result<(), DriverError> {
        let unit = self.driven_for(sid)?;
        let mut ctx = unit.context.lock();
        let domain = self.domain(did)?;
        let uses_ats = options.ats && domain.kind == DomainKind::Paging;
        let check_translated = uses_ats && options.check_translated;
        let wanted = Attachment { did, ats: options.ats, check_translated };
        if ctx.devices.get(&sid) == Some(&wanted) {
            return Ok(());
        }
        if uses_ats && !unit.ats_supported() {
            return Err(DriverError::AtsUnsupported(sid));
        }
        let detached = self.detach_locked(unit, &mut ctx, sid)?;
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
        // The device TLB must hold nothing from an earlier life before the device may
        // translate again (detach just did this if it was an ATS device).
        if uses_ats && !detached.is_some_and(|d| d.device_tlb_flushed) {
            unit.invalidate(&[Invalidation::DeviceTlb { sid, range: DeviceTlbRange::ALL }])?;
        }
        // Before the entry is written: from then on every invalidation of the domain
        // reaches this unit, and every unmap this device's TLB. Refused if the domain was
        // destroyed since the look-up (destroy checks the span under the same lock).
        let returning = domain.state.lock().join(did, unit.id, sid, uses_ats)?;
        if returning {
            // A walk that raced with the detach that took the domain's last device off this
            // unit may have cached a translation after that detach's invalidation, and no
            // unmap since reached this unit: it starts clean (as destroy's last flush).
            if let Err(e) = unit.invalidate(&[Invalidation::Iotlb(IotlbScope::Domain(did))]) {
                domain.state.lock().leave(unit.id, sid);
                return Err(e);
            }
        }
        // Before the entry is written too: every completion the unit gives the device is
        // recorded (detach switched it off).
        if check_translated {
            unit.unit.set_translated_check(sid, true);
        }
        if let Some(entry) = entry
            && let Err(e) = ctx.install(&self.memory, &self.frames, sid, entry)
        {
            domain.state.lock().leave(unit.id, sid);
            unit.unit.set_translated_check(sid, false);
            return Err(e);
        }
        ctx.devices.insert(sid, wanted);
        debug!(sid = %sid, unit = %unit.id, domain = did.0, ats = uses_ats, check_translated, "device attached");
        Ok(())
    }

    /// Detaches a device: clears its context entry in its unit and flushes that unit.
    /// Returns the domain it was attached to, or `None` if it was not attached (a requester
    /// id behind no driven unit is never attached).
    ///
    /// On [`DriverError::DeviceTlbTimeout`] the device is detached all the same (its
    /// translated requests are blocked from now on); only its device TLB is unconfirmed.
    pub fn detach(&self, sid: SourceId) -> Result<Option<DomainId>, DriverError> {
        let Ok(unit) = self.driven_for(sid) else {
            return Ok(None);
        };
        let mut ctx = unit.context.lock();
        Ok(self.detach_locked(unit, &mut ctx, sid)?.map(|d| d.did))
    }

    fn detach_locked(
        &self,
        unit: &Driven,
        ctx: &mut ContextTables,
        sid: SourceId,
    ) -> Result<Option<Detached>, DriverError> {
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
            // TLB (`__iommu_flush_dev_iotlb(info, 0, MAX_AGAW_PFN_WIDTH)`); one batch, on
            // the device's unit only (no other unit ever used this entry).
            let old_did = old.domain();
            let mut batch = vec![
                Invalidation::Context(ContextScope::Device { sid, did: old_did }),
                Invalidation::Iotlb(IotlbScope::Domain(old_did)),
            ];
            if old.tt_bits() == TranslationType::DeviceTlb as u64 {
                batch.push(Invalidation::DeviceTlb { sid, range: DeviceTlbRange::ALL });
                device_tlb_flushed = true;
            }
            result = unit.invalidate(&batch);
        }
        // Only now: unmaps that ran meanwhile still invalidated this unit and this device's
        // TLB, and its translated requests were checked until its device TLB was flushed.
        // The domain is alive: it cannot be destroyed while the device is in its span.
        if let Ok(domain) = self.domain(att.did) {
            domain.state.lock().leave(unit.id, sid);
        }
        if att.check_translated {
            unit.unit.set_translated_check(sid, false);
        }
        debug!(sid = %sid, unit = %unit.id, domain = att.did.0, "device detached");
        result.map(|()| Some(Detached { did: att.did, device_tlb_flushed }))
    }

    /// The devices attached to a domain on every unit, ascending (empty for an unknown
    /// domain).
    pub fn attached(&self, did: DomainId) -> Vec<SourceId> {
        let mut devices: Vec<SourceId> =
            self.units.iter().flat_map(|u| u.context.lock().attached(did).collect::<Vec<_>>()).collect();
        devices.sort_unstable();
        devices
    }

    /// The domain a device is attached to.
    pub fn domain_of(&self, sid: SourceId) -> Option<DomainId> {
        let unit = self.driven_for(sid).ok()?;
        unit.context.lock().devices.get(&sid).map(|a| a.did)
    }

    /// The units domain `did` spans: those with at least one of its devices attached,
    /// ascending (empty for an unknown domain).
    pub fn domain_units(&self, did: DomainId) -> Vec<UnitId> {
        self.domain(did).map(|d| d.state.lock().span.keys().copied().collect()).unwrap_or_default()
    }
}
