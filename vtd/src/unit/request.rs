//! The requests a unit answers, one method per PCIe request kind.
//!
//! - Untranslated requests (AT=00): [`Unit::translate`] finds the output address;
//!   [`Unit::dma_read`] / [`Unit::dma_write`] also perform the access on host memory.
//! - ATS translation requests (AT=01): [`Unit::ats_translate`] returns the completion a
//!   device caches in its device TLB (VT-d 4.2.3, 6.2.2).
//! - Translated requests (AT=10): [`Unit::translated_read`] / [`Unit::translated_write`],
//!   allowed only for contexts with TT=01, with no walk (VT-d 4.2.4).
//!
//! For a function with translated-request checking on (a dmar extension, `grants`), the
//! unit records the range of every translation completion it produces for it, and accepts
//! its translated requests only inside such ranges. With checking off, both paths pay one
//! load and one predicted branch.
//!
//! The interrupt address range 0xFEEx_xxxx is protected on every path (VT-d 3.14):
//! untranslated requests to it are interrupt requests, never DMA; translation requests for
//! it complete with R=0, W=1, U=1; translated requests and translations whose output falls
//! in it fault with reason 0x0E.
//!
//! The DMA protected memory regions (`pmr`) guard the memory accesses, [`Unit::dma_read`],
//! [`Unit::dma_write`], [`Unit::translated_read`] and [`Unit::translated_write`], after the
//! request has been through the remapping checks. While PMEN.EPM is set (VT-d 10.4.16):
//! - with translation disabled (GSTS.TES = 0), "all DMA requests accessing protected
//!   memory regions are blocked", untranslated and translated alike;
//! - with translation enabled, "DMA requests processed as pass-through (Translation Type
//!   value of 10b in Context-Entry)" and "DMA requests with translated address (AT=10b)"
//!   that access a region are blocked;
//! - requests "subject to address remapping" through the page tables "may or may not be
//!   blocked by hardware" and "software must not depend on hardware protection" for them:
//!   the unit does not check them. (The revisions that list hardware by generation say
//!   units with VER major version 2 or later block these too; dmar reports version 1.0, the
//!   earlier behaviour.) Their output address is whatever software mapped, which is why
//!   Linux can enable translation before it clears EPM.
//!
//! A blocked access is "not recorded or reported as remapping faults" (VT-d 10.4.16): no
//! fault record, no fault event, no FPD involved; the access does not happen (a read
//! returns no data, a write changes nothing from the first blocked page on) and the caller
//! gets [`DmaError::ProtectedMemory`]. The specification names no completion status for
//! it, so dmar reports none. ATS translation requests are not checked: they return a
//! translation and access no memory; the translated requests that use it are. Interrupt
//! requests (a DWORD write to 0xFEEx_xxxx) are not memory accesses and are not checked.
//! [`Unit::translate`] and [`Unit::check_translated`] answer the remapping question only
//! and do not look at the regions.

use std::sync::atomic::Ordering;

use super::fault::{Direction, FaultRecord, RequestKind};
use super::fault_reason::FaultReason;
use super::grants::Recorded;
use super::interrupt::{IrFault, Remapped};
use super::memory::MemoryError;
use super::tables::{HOST_ADDRESS_WIDTH, TranslationType};
use super::walk::{Fault, Leaf};
use super::{Unit, fault::Logged};
use crate::ids::{DomainId, Hpa, Iova, PAGE_SIZE, SourceId};

/// Times a checked function's translation is computed again when invalidations for it
/// keep racing with it; past this it completes with R=W=0 (granting nothing).
const GRANT_ATTEMPTS: usize = 8;

/// First address of the interrupt address range.
pub(crate) const INTERRUPT_RANGE_BASE: u64 = 0xfee0_0000;
/// Size of the interrupt address range (1 MiB).
pub(crate) const INTERRUPT_RANGE_SIZE: u64 = 0x10_0000;

/// Whether `[addr, addr + len)` overlaps the interrupt address range.
#[inline]
pub(crate) const fn overlaps_interrupt_range(addr: u64, len: u64) -> bool {
    addr < INTERRUPT_RANGE_BASE + INTERRUPT_RANGE_SIZE && addr.saturating_add(len) > INTERRUPT_RANGE_BASE
}

/// A successful untranslated-request translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Output address of the requested byte.
    pub hpa: Hpa,
    /// log2 of the size of the page that maps it (12, 21 or 30).
    pub page_shift: u32,
    /// The page may be read.
    pub read: bool,
    /// The page may be written.
    pub write: bool,
}

/// An untranslated or translated request the unit refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("request blocked{}", match .reason { Some(r) => format!(": {r}"), None => " (interrupt address range)".to_owned() })]
pub struct Blocked {
    /// Why; `None` when the rule that refused it records no fault (an untranslated request
    /// into the interrupt address range, which is an interrupt, not DMA). A reason is given
    /// even when the fault was not recorded (FPD, or a full fault ring).
    pub reason: Option<FaultReason>,
}

/// One translation-completion entry (PCIe ATS 2.2 / VT-d 4.2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtsEntry {
    /// Translated address: the first byte of the naturally aligned range.
    pub translated: Hpa,
    /// log2 of the range size in bytes (the S bit encoding is derived from it).
    pub size_shift: u32,
    /// R.
    pub read: bool,
    /// W.
    pub write: bool,
    /// U: the device must use untranslated requests for this range.
    pub untranslated_only: bool,
    /// Exe (no execute permission in legacy mode: always false).
    pub exec: bool,
    /// Priv (always false without PASID).
    pub privileged: bool,
    /// Global (never set by VT-d).
    pub global: bool,
}

impl AtsEntry {
    /// A completion that grants nothing: not present or no permission. The device may
    /// issue a page request.
    pub const fn no_access(iova: Iova) -> Self {
        Self {
            translated: Hpa(iova.0 & !(PAGE_SIZE - 1)),
            size_shift: 12,
            read: false,
            write: false,
            untranslated_only: false,
            exec: false,
            privileged: false,
            global: false,
        }
    }
}

/// A translation completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtsCompletion {
    /// Success, with one entry (R=W=0 when nothing is mapped or permitted).
    Success(AtsEntry),
    /// Unsupported Request: the context does not allow translation requests, or does not
    /// exist. A fault is recorded.
    UnsupportedRequest,
    /// Completer Abort: the tables are malformed. A fault is recorded.
    CompleterAbort,
}

/// How an untranslated request reached its output address: the protected memory regions
/// check some routes and not others (VT-d 10.4.16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// Translation disabled (GSTS.TES = 0): the address is used as is. Checked.
    Untranslated,
    /// A context entry with TT = 10b: the address is used as is. Checked.
    PassThrough,
    /// Through the second-stage page tables software controls. Not checked.
    Remapped,
}

/// A DMA that did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// The unit blocked the request (the fault is recorded unless suppressed).
    #[error("DMA at {addr:#x} blocked: {reason}")]
    Fault {
        /// The address (untranslated or translated) that was refused.
        addr: u64,
        /// Why.
        reason: FaultReason,
    },
    /// An untranslated request to the interrupt address range is an interrupt request.
    #[error("DMA at {addr:#x} targets the interrupt address range")]
    InterruptRange {
        /// The refused address.
        addr: u64,
    },
    /// The access touched a DMA-protected memory region while PMEN.EPM was set, on a
    /// route the regions guard (see the module docs). Not a remapping fault: nothing is
    /// recorded (VT-d 10.4.16).
    #[error("DMA at {addr:#x} blocked by a protected memory region")]
    ProtectedMemory {
        /// The address (untranslated or translated) of the refused part of the access.
        addr: u64,
    },
    /// The translated address lies beyond host memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The range wraps around the 64-bit address space.
    #[error("DMA range {addr:#x}+{len:#x} wraps the address space")]
    Overflow {
        /// First address.
        addr: u64,
        /// Length.
        len: u64,
    },
}

impl Unit {
    /// Records `fault` for a request and returns its reason.
    fn fault(&self, fault: Fault, sid: SourceId, addr: u64, access: Direction, kind: RequestKind) -> FaultReason {
        let record = FaultRecord { reason: fault.reason, sid, addr: addr & !(PAGE_SIZE - 1), access, kind };
        match self.faults.log(record, fault.fpd, self.queue_error_pending(), &*self.events) {
            Logged::Recorded(_) => self.counters.faults_recorded.inc(),
            Logged::Suppressed => self.counters.faults_suppressed.inc(),
            Logged::Overflow => self.counters.faults_overflowed.inc(),
        }
        tracing::debug!(%sid, addr = format_args!("{addr:#x}"), reason = %fault.reason, ?kind, "DMA remapping fault");
        fault.reason
    }

    /// Translates an untranslated request (AT=00) for `access` at `iova` from `sid`.
    ///
    /// On success the output address is returned; on failure the fault is recorded (unless
    /// FPD suppresses it) and the reason returned.
    #[inline]
    pub fn translate(&self, sid: SourceId, iova: Iova, access: Direction) -> Result<Translation, Blocked> {
        let r = self.translate_untranslated(sid, iova, access).map(|(t, _)| t);
        if r.is_ok() {
            self.counters.untranslated_ok.inc()
        } else {
            self.counters.untranslated_blocked.inc()
        }
        r
    }

    /// The translation of an untranslated request and the route it took.
    #[inline]
    fn translate_untranslated(
        &self,
        sid: SourceId,
        iova: Iova,
        access: Direction,
    ) -> Result<(Translation, Route), Blocked> {
        // VT-d 3.14: requests to the interrupt range are interrupt requests, not remapped.
        if overlaps_interrupt_range(iova.0, 1) {
            return Err(Blocked { reason: None });
        }
        // VT-d 10.4.4 (GSTS.TES = 0): DMA requests are not translated.
        if !self.translation_enabled.load(Ordering::Acquire) {
            let t = Translation { hpa: Hpa(iova.0), page_shift: 12, read: true, write: true };
            return Ok((t, Route::Untranslated));
        }
        let fail = |f: Fault| Blocked { reason: Some(self.fault(f, sid, iova.0, access, RequestKind::Untranslated)) };
        let epoch = self.current_epoch();
        let ctx = self.context(sid, epoch).map_err(fail)?;
        if ctx.tt == TranslationType::PassThrough {
            if iova.0 >> HOST_ADDRESS_WIDTH != 0 {
                return Err(fail(Fault { reason: FaultReason::AddressBeyondWidth, fpd: ctx.fpd }));
            }
            let t = Translation { hpa: Hpa(iova.0), page_shift: 12, read: true, write: true };
            return Ok((t, Route::PassThrough));
        }
        let leaf = self.second_stage(&ctx, iova, epoch).map_err(fail)?;
        let (allowed, reason) = match access {
            Direction::Read => (leaf.read, FaultReason::NoRead),
            Direction::Write => (leaf.write, FaultReason::NoWrite),
        };
        if !allowed {
            return Err(fail(Fault { reason, fpd: ctx.fpd }));
        }
        let hpa = leaf.frame.0 | (iova.0 & ((1u64 << leaf.shift) - 1));
        if overlaps_interrupt_range(hpa, 1) {
            return Err(fail(Fault { reason: FaultReason::InterruptAddress, fpd: ctx.fpd }));
        }
        let t = Translation { hpa: Hpa(hpa), page_shift: leaf.shift, read: leaf.read, write: leaf.write };
        Ok((t, Route::Remapped))
    }

    /// One page's worth of an untranslated DMA at `at`, at most `left` bytes: its host
    /// address and length, once the remapping checks and, on the routes they guard, the
    /// protected memory regions allow it.
    #[inline]
    fn untranslated_access(
        &self,
        sid: SourceId,
        at: u64,
        access: Direction,
        left: usize,
    ) -> Result<(Hpa, usize), DmaError> {
        let (t, route) = match self.translate_untranslated(sid, Iova(at), access) {
            Ok(ok) => ok,
            Err(b) => {
                self.counters.untranslated_blocked.inc();
                return Err(blocked(at, b));
            }
        };
        let n = chunk(at, t.page_shift, left);
        // VT-d 10.4.16: with EPM set, untranslated and pass-through DMA into a protected
        // region is blocked, unrecorded; remapped DMA is not checked (module docs).
        if route != Route::Remapped && self.pmr.blocks(t.hpa.0, n as u64) {
            self.counters.untranslated_blocked.inc();
            self.counters.protected_memory_blocked.inc();
            return Err(DmaError::ProtectedMemory { addr: at });
        }
        self.counters.untranslated_ok.inc();
        Ok((t.hpa, n))
    }

    /// Answers an ATS translation request (AT=01) for `iova` from `sid`; `no_write` is the
    /// request's NW flag (the device asks for read access only).
    ///
    /// Not-present entries and permission problems complete successfully with R=W=0 and
    /// record nothing (VT-d 4.2.3: they are for the device to resolve, e.g. with a page
    /// request); so does an address beyond the domain's width. A context that is missing,
    /// malformed, or whose TT is not 01b gets UR and a fault; malformed page tables get CA
    /// and a fault.
    ///
    /// With translated-request checking on for `sid`, a completion with R or W (and U
    /// clear) is also recorded as a grant ([`Unit::set_translated_check`]).
    pub fn ats_translate(&self, sid: SourceId, iova: Iova, no_write: bool) -> AtsCompletion {
        let c = if self.grants.checks(sid) {
            self.ats_translate_granting(sid, iova, no_write)
        } else {
            self.ats_translate_inner(sid, iova, no_write).0
        };
        match c {
            AtsCompletion::Success(e) if e.read || e.write => self.counters.ats_success.inc(),
            AtsCompletion::Success(_) => self.counters.ats_no_access.inc(),
            _ => self.counters.ats_error.inc(),
        }
        c
    }

    /// Translates for a function with checking on and records the completion as a grant.
    /// A revocation for the function between the translation and the record means the
    /// translation may predate the invalidation: it is computed again (`grants`).
    #[inline(never)]
    fn ats_translate_granting(&self, sid: SourceId, iova: Iova, no_write: bool) -> AtsCompletion {
        for _ in 0..GRANT_ATTEMPTS {
            let ticket = self.grants.ticket(sid);
            let (c, did) = self.ats_translate_inner(sid, iova, no_write);
            let (AtsCompletion::Success(entry), Some(did)) = (c, did) else { return c };
            match self.grants.record(sid, ticket, did, iova, &entry) {
                Recorded::Granted { evicted } => {
                    self.counters.translated_check_grants.inc();
                    self.counters.translated_check_evictions.add(evicted as u64);
                    return c;
                }
                Recorded::Nothing => return c,
                Recorded::Raced => self.counters.translated_check_retries.inc(),
            }
        }
        AtsCompletion::Success(AtsEntry::no_access(iova))
    }

    /// The completion for a translation request, and the domain of the context it was
    /// answered under (`None` when there was none).
    fn ats_translate_inner(&self, sid: SourceId, iova: Iova, no_write: bool) -> (AtsCompletion, Option<DomainId>) {
        if !self.translation_enabled.load(Ordering::Acquire) {
            return (AtsCompletion::UnsupportedRequest, None);
        }
        let access = if no_write { Direction::Read } else { Direction::Write };
        let record = |f: Fault| self.fault(f, sid, iova.0, access, RequestKind::TranslationRequest);
        let epoch = self.current_epoch();
        let ctx = match self.context(sid, epoch) {
            Ok(ctx) => ctx,
            Err(f) => {
                record(f);
                return (AtsCompletion::UnsupportedRequest, None);
            }
        };
        let did = Some(ctx.did);
        // VT-d 9.3 TT: only 01b admits translation requests.
        if ctx.tt != TranslationType::DeviceTlb {
            record(Fault { reason: FaultReason::TranslationTypeBlocked, fpd: ctx.fpd });
            return (AtsCompletion::UnsupportedRequest, did);
        }
        // VT-d 4.2.3: the interrupt range is reported as write-only, untranslated-only.
        if overlaps_interrupt_range(iova.0, 1) {
            let mut e = AtsEntry::no_access(iova);
            e.write = true;
            e.untranslated_only = true;
            return (AtsCompletion::Success(e), did);
        }
        let leaf = match self.second_stage(&ctx, iova, epoch) {
            Ok(leaf) => leaf,
            Err(f) if f.reason == FaultReason::AddressBeyondWidth => {
                return (AtsCompletion::Success(AtsEntry::no_access(iova)), did);
            }
            Err(f) => {
                record(f);
                return (AtsCompletion::CompleterAbort, did);
            }
        };
        let Leaf { frame, shift, read, write } = leaf;
        if !(read || write) {
            return (AtsCompletion::Success(AtsEntry::no_access(iova)), did);
        }
        if overlaps_interrupt_range(frame.0, 1u64 << shift) {
            record(Fault { reason: FaultReason::InterruptAddress, fpd: ctx.fpd });
            return (AtsCompletion::CompleterAbort, did);
        }
        let entry = AtsEntry {
            translated: frame,
            size_shift: shift,
            read,
            write: write && !no_write,
            untranslated_only: false,
            exec: false,
            privileged: false,
            global: false,
        };
        (AtsCompletion::Success(entry), did)
    }

    /// Checks a translated request (AT=10) for `[addr, addr + len)` from `sid`: the
    /// context must have TT=01b (VT-d 4.2.4) and the range must avoid the interrupt range.
    /// No page walk happens: the device vouches for the translation.
    ///
    /// With translated-request checking on for `sid` (a dmar extension), the range must
    /// also lie within grants allowing `access` ([`Unit::set_translated_check`]).
    ///
    /// The protected memory regions are not consulted: they guard the access itself
    /// ([`Unit::translated_read`], [`Unit::translated_write`]).
    pub fn check_translated(&self, sid: SourceId, addr: Hpa, len: u64, access: Direction) -> Result<(), Blocked> {
        let r = self.check_translated_inner(sid, addr, len.max(1), access);
        if r.is_ok() {
            self.counters.translated_ok.inc()
        } else {
            self.counters.translated_blocked.inc()
        }
        r
    }

    fn check_translated_inner(&self, sid: SourceId, addr: Hpa, len: u64, access: Direction) -> Result<(), Blocked> {
        let fail = |f: Fault| Blocked { reason: Some(self.fault(f, sid, addr.0, access, RequestKind::Translated)) };
        if !self.translation_enabled.load(Ordering::Acquire) {
            // With translation off every request is passed through unchanged.
            return if overlaps_interrupt_range(addr.0, len) { Err(Blocked { reason: None }) } else { Ok(()) };
        }
        let ctx = self.context(sid, self.current_epoch()).map_err(fail)?;
        if ctx.tt != TranslationType::DeviceTlb {
            return Err(fail(Fault { reason: FaultReason::TranslationTypeBlocked, fpd: ctx.fpd }));
        }
        if overlaps_interrupt_range(addr.0, len) {
            return Err(fail(Fault { reason: FaultReason::InterruptAddress, fpd: ctx.fpd }));
        }
        if self.grants.checks(sid) && !self.grants.permits(sid, addr.0, len, access) {
            // VT-d has no fault reason for a translated request outside what was
            // translated (hardware does not check them): the permission reasons say what
            // was missing, no read (0x06) or no write (0x05) (VT-d 7.1.3), recorded with
            // address type translated. Qualified, so FPD suppresses the record.
            self.counters.translated_check_refusals.inc();
            let reason = match access {
                Direction::Read => FaultReason::NoRead,
                Direction::Write => FaultReason::NoWrite,
            };
            return Err(fail(Fault { reason, fpd: ctx.fpd }));
        }
        Ok(())
    }

    /// Untranslated DMA read: translates page by page and reads host memory.
    pub fn dma_read(&self, sid: SourceId, iova: Iova, buf: &mut [u8]) -> Result<(), DmaError> {
        let len = buf.len() as u64;
        iova.0.checked_add(len).ok_or(DmaError::Overflow { addr: iova.0, len })?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = iova.0 + done as u64;
            let (hpa, n) = self.untranslated_access(sid, at, Direction::Read, buf.len() - done)?;
            self.memory.read(hpa, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Untranslated DMA write: translates page by page and writes host memory. Pages
    /// before a faulting page have been written, as with a real bus. An aligned DWORD
    /// write to the interrupt address range is an interrupt request (VT-d 3.14, 5.1) and
    /// goes to [`Unit::msi_write`].
    pub fn dma_write(&self, sid: SourceId, iova: Iova, data: &[u8]) -> Result<(), DmaError> {
        let len = data.len() as u64;
        iova.0.checked_add(len).ok_or(DmaError::Overflow { addr: iova.0, len })?;
        if let Ok(dword) = <[u8; 4]>::try_from(data)
            && iova.0.is_multiple_of(4)
            && overlaps_interrupt_range(iova.0, 4)
        {
            return self
                .msi_write(sid, iova.0, u32::from_le_bytes(dword))
                .map(|_| ())
                .map_err(|f| DmaError::Fault { addr: iova.0, reason: f.reason });
        }
        let mut done = 0usize;
        while done < data.len() {
            let at = iova.0 + done as u64;
            let (hpa, n) = self.untranslated_access(sid, at, Direction::Write, data.len() - done)?;
            self.memory.write(hpa, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Translated DMA read at a host address the device got from a translation completion.
    /// All or nothing: a read that touches a protected region returns no data.
    pub fn translated_read(&self, sid: SourceId, addr: Hpa, buf: &mut [u8]) -> Result<(), DmaError> {
        let len = buf.len() as u64;
        addr.0.checked_add(len).ok_or(DmaError::Overflow { addr: addr.0, len })?;
        self.translated_access(sid, addr, len, Direction::Read)?;
        Ok(self.memory.read(addr, buf)?)
    }

    /// Translated DMA write. All or nothing: a write that touches a protected region
    /// writes no byte.
    pub fn translated_write(&self, sid: SourceId, addr: Hpa, data: &[u8]) -> Result<(), DmaError> {
        let len = data.len() as u64;
        addr.0.checked_add(len).ok_or(DmaError::Overflow { addr: addr.0, len })?;
        self.translated_access(sid, addr, len, Direction::Write)?;
        Ok(self.memory.write(addr, data)?)
    }

    /// A translated access: [`Unit::check_translated`], then the protected memory regions,
    /// which block every translated request into them while EPM is set, translation
    /// enabled or not (VT-d 10.4.16).
    fn translated_access(&self, sid: SourceId, addr: Hpa, len: u64, access: Direction) -> Result<(), DmaError> {
        let len = len.max(1);
        if let Err(b) = self.check_translated_inner(sid, addr, len, access) {
            self.counters.translated_blocked.inc();
            return Err(blocked(addr.0, b));
        }
        if self.pmr.blocks(addr.0, len) {
            self.counters.translated_blocked.inc();
            self.counters.protected_memory_blocked.inc();
            return Err(DmaError::ProtectedMemory { addr: addr.0 });
        }
        self.counters.translated_ok.inc();
        Ok(())
    }
}

fn blocked(addr: u64, b: Blocked) -> DmaError {
    match b.reason {
        Some(reason) => DmaError::Fault { addr, reason },
        None => DmaError::InterruptRange { addr },
    }
}

/// Bytes from `at` to the end of its page (of size `1 << shift`), at most `left`.
fn chunk(at: u64, shift: u32, left: usize) -> usize {
    let to_end = (1u64 << shift) - (at & ((1u64 << shift) - 1));
    to_end.min(left as u64) as usize
}

impl Unit {
    /// An MSI write from `sid` (a DWORD write to the interrupt address range): remapped
    /// through the interrupt remapping table, or passed through when remapping is off
    /// (VT-d 5.1). The interrupt goes to [`super::UnitEvents::interrupt_remapped`]; a
    /// blocked one is recorded as a fault with the interrupt index in `FI[63:48]`.
    pub fn msi_write(&self, sid: SourceId, addr: u64, data: u32) -> Result<Remapped, IrFault> {
        match self.interrupts.remap(&self.memory, sid, addr, data) {
            Ok(remapped) => {
                self.events.interrupt_remapped(sid, &remapped);
                Ok(remapped)
            }
            Err(f) => {
                if f.should_record() {
                    let record = FaultRecord {
                        reason: f.reason,
                        sid,
                        addr: f.fault_info(),
                        access: Direction::Write,
                        kind: RequestKind::Untranslated,
                    };
                    match self.faults.log(record, false, self.queue_error_pending(), &*self.events) {
                        Logged::Recorded(_) => self.counters.faults_recorded.inc(),
                        Logged::Suppressed => self.counters.faults_suppressed.inc(),
                        Logged::Overflow => self.counters.faults_overflowed.inc(),
                    }
                } else {
                    self.counters.faults_suppressed.inc();
                }
                Err(f)
            }
        }
    }
}
