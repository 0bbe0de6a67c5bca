//! What a function is asked to do and how it ended: the DMA request a user (or a workload)
//! hands a function, and its outcome.
//!
//! Owns the public vocabulary of one access: [`Dma`] and its length rules, [`DmaOutcome`]
//! with its [`DmaResult`], and why a DMA found no usable translation ([`DmaError`]). How
//! an access is carried out is the state machine's (`machine`, `access`).

use std::time::Duration;

/// How an access gets its translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// The device TLB; misses become ATS translation requests on the link.
    #[default]
    Ats,
    /// No device TLB: one unary `Control.Translate` call per access (the vhost-IOTLB
    /// style baseline). Needs the server's operator role.
    Baseline,
    /// No device TLB, over the link: one ATS translation request per access, neither
    /// looked up in nor inserted into the device TLB and not coalesced with others (a
    /// function with its ATC disabled). The baseline a device identity can run.
    LinkBaseline,
}

/// Largest DMA of one access: one page, so that one translation always covers it.
pub(crate) const MAX_DMA_BYTES: u32 = 4096;

/// One DMA a function makes (an access, in the counters' and reports' words).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dma {
    /// The untranslated address.
    pub iova: u64,
    /// A write (else a read).
    pub write: bool,
    /// Bytes moved by the DMA, 1..=4096, within one 4 KiB page.
    pub len: u32,
    /// Stop once translated: no DMA.
    pub translate_only: bool,
    /// How it is translated.
    pub mode: Mode,
}

impl Dma {
    /// A 64-byte read at `iova`.
    pub const fn read(iova: u64) -> Self {
        Self { iova, write: false, len: 64, translate_only: false, mode: Mode::Ats }
    }

    /// A 64-byte write at `iova`.
    pub const fn write(iova: u64) -> Self {
        Self { iova, write: true, len: 64, translate_only: false, mode: Mode::Ats }
    }

    /// The same access, stopping at the translation.
    pub const fn translate_only(self) -> Self {
        Self { translate_only: true, ..self }
    }

    /// The same access in the baseline mode.
    pub const fn baseline(self) -> Self {
        Self { mode: Mode::Baseline, ..self }
    }

    /// The same access in the link baseline mode.
    pub const fn link_baseline(self) -> Self {
        Self { mode: Mode::LinkBaseline, ..self }
    }

    /// Checks the length rules.
    pub fn validate(&self) -> Result<(), InvalidDma> {
        if self.len == 0 || self.len > MAX_DMA_BYTES || (self.iova & 0xfff) + u64::from(self.len) > 4096 {
            return Err(InvalidDma { iova: self.iova, len: self.len });
        }
        Ok(())
    }
}

/// A DMA that would not fit one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an access of {len} bytes at {iova:#x} does not fit one 4 KiB page (1..=4096 bytes)")]
pub struct InvalidDma {
    /// The address.
    pub iova: u64,
    /// The length.
    pub len: u32,
}

/// Why a page request did not make the page available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageRequestFailure {
    /// The response said Invalid Request.
    Invalid,
    /// The response said Response Failure: the function stops issuing page requests until
    /// its link is reset.
    Failure,
    /// Another response code.
    Other(i32),
    /// No response in time (the server's page request queue may have overflowed).
    Timeout,
}

/// Why a DMA found no usable translation. (The remapping unit's fault records are the
/// server's; this is what the device sees.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaError {
    /// The translation grants no such access (not present, or lacking the permission),
    /// and PRI could not help (disabled, stopped, or already tried).
    NoAccess,
    /// The completion said Unsupported Request (the context does not allow ATS).
    UnsupportedRequest,
    /// The completion said Completer Abort.
    CompleterAbort,
    /// The completion could not be read (a misaligned range).
    Malformed,
    /// A page request failed.
    PageRequest(PageRequestFailure),
    /// The baseline's unary translation was refused with this fault reason.
    Refused {
        /// VT-d fault reason code (0 when refused without a fault).
        fault_reason: u32,
    },
}

/// How a DMA ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaResult {
    /// Translated, and the DMA (if any) completed.
    Ok,
    /// No usable translation.
    Fault(DmaError),
    /// The server refused the DMA.
    DmaFailed {
        /// The fault reason it gave.
        fault_reason: u32,
    },
    /// The link (or, in baseline mode, the control channel) went down under it, or was
    /// down.
    LinkDown,
}

/// What happened to a DMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaOutcome {
    /// How it ended.
    pub result: DmaResult,
    /// The device TLB answered it.
    pub atc_hit: bool,
    /// It joined another access's translation request.
    pub coalesced: bool,
    /// It needed a page request.
    pub page_requested: bool,
    /// Its DMA was (or would be) untranslated.
    pub untranslated: bool,
    /// Its translated address, when translated.
    pub translated: Option<u64>,
    /// log2 of the range that translated it (0 when not translated).
    pub size_shift: u8,
    /// From its start to its end.
    pub latency: Duration,
}

impl DmaOutcome {
    /// Whether it succeeded.
    pub fn is_ok(&self) -> bool {
        self.result == DmaResult::Ok
    }
}
