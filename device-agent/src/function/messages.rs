//! What a function and the server say to each other on the ATS link, in the agent's own
//! types: the requests a function sends (up) and what the server sends it (down).
//!
//! Owns the meaning of each message as the state machine sees it (PCIe ATS 10.2: translation
//! requests and completions; 10.3: invalidation requests and completions; PRI 10.4: page
//! requests and page group responses), with nothing of the wire: the requester id, which
//! every wire message repeats, is added or checked by the link. The protobuf forms and the
//! conversions are `wire`'s (done in the function's task); the batching is `link`'s.

/// A translation request: the function asks for the translation of one 4 KiB page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TranslationRequest {
    /// Echoed in the completion; unique on the link while outstanding.
    pub(crate) tag: u64,
    /// The untranslated page address.
    pub(crate) address: u64,
    /// The function asks for read access only (PCIe ATS 10.2.2: No Write).
    pub(crate) no_write: bool,
}

/// A DMA request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DmaRequest {
    /// Echoed in the completion.
    pub(crate) tag: u64,
    /// AT=translated: `address` is a host address from a completion; else an IOVA.
    pub(crate) translated: bool,
    /// Where it goes.
    pub(crate) address: u64,
    /// A write (else a read).
    pub(crate) write: bool,
    /// Bytes moved.
    pub(crate) len: u32,
}

/// A page request (PRI, PCIe 10.4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PageRequest {
    /// The page address.
    pub(crate) address: u64,
    /// Read access requested.
    pub(crate) read: bool,
    /// Write access requested.
    pub(crate) write: bool,
    /// The page request group index (9 bits).
    pub(crate) group_index: u16,
    /// Last request of its group.
    pub(crate) last: bool,
}

/// A request a function queues for the server; the link batches a turn's worth into one
/// message. Invalidation completions do not go this way: they take the priority path
/// (see `Effect::Complete`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Up {
    /// A translation request.
    Translation(TranslationRequest),
    /// A DMA request.
    Dma(DmaRequest),
    /// A page request.
    Page(PageRequest),
}

/// An invalidation request (PCIe ATS 10.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct InvalidationRequest {
    /// The ITag as received (0..=31 when the server follows the rules).
    pub(crate) itag: u32,
    /// The untranslated address with the S-bit range encoding in bit 0.
    pub(crate) address: u64,
}

/// What a successful translation completion grants (PCIe ATS 10.2.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Grant {
    /// Translated address of the range's first byte.
    pub(crate) translated: u64,
    /// log2 of the naturally aligned range size.
    pub(crate) size_shift: u32,
    /// R.
    pub(crate) read: bool,
    /// W.
    pub(crate) write: bool,
    /// U: the range must be accessed untranslated.
    pub(crate) untranslated_only: bool,
}

/// How a translation request was completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Completion {
    /// Success: R=W=0 when nothing is mapped (not a fault; PRI may help).
    Success(Grant),
    /// Unsupported Request: the context does not allow translation requests.
    UnsupportedRequest,
    /// Completer Abort (and any status the agent does not know).
    CompleterAbort,
}

/// A translation completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TranslationCompletion {
    /// The request's tag.
    pub(crate) tag: u64,
    /// Its result.
    pub(crate) completion: Completion,
}

/// A DMA completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DmaCompletion {
    /// The request's tag.
    pub(crate) tag: u64,
    /// The access happened.
    pub(crate) ok: bool,
    /// VT-d fault reason when it did not (0 otherwise).
    pub(crate) fault_reason: u32,
}

/// A page group response code (PCIe 10.4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PageResponseCode {
    /// The pages are available now.
    Success,
    /// Invalid Request.
    Invalid,
    /// Response Failure: no more page requests until the link is reset.
    Failure,
    /// A code the agent does not know.
    Other(i32),
}

/// A page group response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PageGroupResponse {
    /// The group it answers, as received.
    pub(crate) group_index: u32,
    /// The response.
    pub(crate) code: PageResponseCode,
}

/// The answer to a baseline access's unary translation (the vhost-IOTLB style path, which
/// does not use the link).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BaselineAnswer {
    /// Translated to `hpa` by a page of `2^page_shift` bytes.
    Translated { hpa: u64, page_shift: u32 },
    /// Refused with this VT-d fault reason (0 without a fault).
    Refused { fault_reason: u32 },
    /// The call failed (the control channel is down).
    Failed,
}
