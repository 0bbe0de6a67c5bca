//! Every conversion between the wire (`dmar_proto::v1`) and the model (`dmar_vtd`), and
//! the size limits of the wire contract.
//!
//! Decoding checks: a wire value that cannot be the model's type (a requester id over 16
//! bits, a 10-bit page request group index, an unknown enum value, a queue depth outside
//! PCIe's range) becomes `INVALID_ARGUMENT` here, before any model call, and never
//! `INTERNAL`. Encoding is total. The Control service, the ATS link and the event hub all
//! use these functions, so a value means the same on every face of the server.
//!
//! Not here: what a driver or unit error means for the client (that is
//! [`super::status`]), and the VT-d or PCIe rules themselves (those are `dmar_vtd`'s; the
//! PCIe limits used below come from [`dmar_vtd::ats`]).

use std::collections::HashMap;

use dmar_proto::v1 as pb;
use dmar_vtd::ats::{MAX_PRG_INDEX, MAX_QUEUE_DEPTH, PRG_INDEX_BITS};
use dmar_vtd::driver::{AttachOptions, DomainKind, FaultReport, FlushPolicy, Perm};
use dmar_vtd::ids::{DomainId, ITag, Iova, SourceId, UnitId};
use dmar_vtd::platform::{Region, ScopeEntry, UnitScope};
use dmar_vtd::unit::interrupt::{DestinationMode, Remapped, Trigger};
use dmar_vtd::unit::prq::{PageGroupResponse, PageRequest, ResponseCode};
use dmar_vtd::unit::tables::AddressWidth;
use dmar_vtd::unit::{
    AtsCompletion, Blocked, DeviceInvalidation, Direction, DmaError, EventSource, FaultRecord, Translation, UnitStats,
};
use tonic::Status;

use super::platform::{UnitSlot, Units};

/// Most ranges per map or unmap request: bounds the work (and the undo) of one call.
pub(crate) const MAX_RANGES: usize = 4096;
/// Most bytes per memory read or write request.
pub(crate) const MAX_MEMORY_BYTES: usize = 1 << 20;
/// Most descriptors per submission: the driver appends a wait descriptor, and the batch
/// must fit the invalidation queue with room to spare.
pub(crate) const MAX_DESCRIPTORS: usize = 128;
/// Largest DMA payload per link request.
pub(crate) const MAX_DMA_BYTES: usize = 64 << 10;
/// Largest outbound link message (encoded): tonic's default decode limit, which the server
/// itself uses for inbound messages, so that any client reads every message the server
/// sends (the agent accepts up to 64 MiB). The link cuts its replies to fit.
pub(crate) const MAX_LINK_MESSAGE_BYTES: usize = 4 << 20;
/// Largest Control message, either way: the largest request or reply (a 1 MiB memory read
/// or write, 4096 map ranges, 128 descriptors) with room to spare, and what a default
/// client accepts.
pub(crate) const MAX_CONTROL_MESSAGE_BYTES: usize = 4 << 20;
/// Room left in a link message for the envelope (gRPC frame header, field keys).
const LINK_MESSAGE_SLACK: usize = 64;
/// Upper bound of one encoded reply item without data (a translation completion, a page
/// group response, a DMA completion's fields), its field key and length included: the
/// largest is a translation completion with its entry, at 66 bytes.
const SMALL_REPLY_BYTES: usize = 80;

/// Encoded size bound of one reply item carrying `data_len` bytes of DMA data (0 for
/// items without data). [`MAX_LINK_MESSAGE_BYTES`] and the reply budget are counted in
/// these.
pub(crate) const fn reply_bytes(data_len: usize) -> usize {
    SMALL_REPLY_BYTES + data_len
}

/// Encoded bytes one link message may carry in reply items.
pub(crate) const MAX_REPLY_ITEM_BYTES: usize = MAX_LINK_MESSAGE_BYTES - LINK_MESSAGE_SLACK;

// ---- decoding: wire -> model, checked ----

/// A requester id: it must fit 16 bits (bus, device, function; PCIe 2.2.6.2).
pub(crate) fn source_id(raw: u32) -> Result<SourceId, Status> {
    u16::try_from(raw)
        .map(SourceId)
        .map_err(|_| Status::invalid_argument(format!("requester id {raw:#x} does not fit 16 bits")))
}

/// A domain id: 16 bits, 0 reserved (VT-d 9.3, CAP.ND=6).
pub(crate) fn domain_id(raw: u32) -> Result<DomainId, Status> {
    u16::try_from(raw)
        .ok()
        .filter(|d| *d != 0)
        .map(DomainId)
        .ok_or_else(|| Status::invalid_argument(format!("domain id {raw} is outside 1..=65535")))
}

/// A page request group index: 9 bits (PCIe 10.4.1).
pub(crate) fn group_index(raw: u32) -> Result<u16, Status> {
    u16::try_from(raw).ok().filter(|g| *g <= MAX_PRG_INDEX).ok_or_else(|| {
        Status::invalid_argument(format!("page request group index {raw} exceeds {PRG_INDEX_BITS} bits"))
    })
}

/// An invalidation completion's ITag. Only its width is checked here: a tag that is not
/// outstanding is the device's error, which the unit reports (ICE), not the link's.
pub(crate) fn itag(raw: u32) -> Result<ITag, Status> {
    u8::try_from(raw).map(ITag).map_err(|_| Status::invalid_argument(format!("ITag {raw} is out of range")))
}

/// The invalidate queue depth of bound function `sid`: 1..=32 (PCIe 10.5.1.2; the wire
/// has no "0 means 32").
pub(crate) fn queue_depth(sid: SourceId, raw: u32) -> Result<u8, Status> {
    u8::try_from(raw).ok().filter(|d| (1..=MAX_QUEUE_DEPTH).contains(d)).ok_or_else(|| {
        Status::invalid_argument(format!("invalidate queue depth {raw} of {sid} is outside 1..={MAX_QUEUE_DEPTH}"))
    })
}

/// The most page groups a function can have waiting for a response: its page request
/// capacity, but never more than there are group indexes (PCIe 10.4.1: 9 bits).
pub(crate) fn outstanding_page_groups(f: &pb::Function) -> usize {
    f.page_request_capacity.min(u32::from(MAX_PRG_INDEX) + 1) as usize
}

/// A domain kind; unspecified is refused.
pub(crate) fn domain_kind(raw: i32) -> Result<DomainKind, Status> {
    match pb::DomainKind::try_from(raw) {
        Ok(pb::DomainKind::Blocked) => Ok(DomainKind::Blocked),
        Ok(pb::DomainKind::Identity) => Ok(DomainKind::Identity),
        Ok(pb::DomainKind::Paging) => Ok(DomainKind::Paging),
        _ => Err(Status::invalid_argument("domain kind must be blocked, identity or paging")),
    }
}

/// An address width in bits: 39, 48 or 57 (3-, 4- or 5-level tables, VT-d 3.6); 0 means
/// 48.
pub(crate) fn address_width(raw: u32) -> Result<AddressWidth, Status> {
    match raw {
        0 | 48 => Ok(AddressWidth::Aw48),
        39 => Ok(AddressWidth::Aw39),
        57 => Ok(AddressWidth::Aw57),
        other => Err(Status::invalid_argument(format!("address width {other} is not 39, 48 or 57"))),
    }
}

/// How an attach request attaches its function: ATS, and translated-request checking.
pub(crate) fn attach_options(r: &pb::AttachRequest) -> AttachOptions {
    AttachOptions::new(r.ats).with_check_translated(r.check_translated)
}

/// A mapping's permissions; absent means the driver's default.
pub(crate) fn permissions(p: Option<pb::Permissions>) -> Perm {
    p.map_or(Perm::default(), |p| Perm { read: p.read, write: p.write })
}

/// An unmap's flush policy: unspecified is the server's default, deferred is the server's
/// configured deferred policy (its bounds are not on the wire).
pub(crate) fn flush_policy(raw: i32, default: FlushPolicy, deferred: FlushPolicy) -> Result<FlushPolicy, Status> {
    match pb::FlushPolicy::try_from(raw) {
        Ok(pb::FlushPolicy::Unspecified) => Ok(default),
        Ok(pb::FlushPolicy::Strict) => Ok(FlushPolicy::Strict),
        Ok(pb::FlushPolicy::Deferred) => Ok(deferred),
        Err(_) => Err(Status::invalid_argument(format!("unknown flush policy {raw}"))),
    }
}

/// A unary translation's access; unspecified is refused.
pub(crate) fn access(raw: i32) -> Result<Direction, Status> {
    match pb::AccessKind::try_from(raw) {
        Ok(pb::AccessKind::Read) => Ok(Direction::Read),
        Ok(pb::AccessKind::Write) => Ok(Direction::Write),
        _ => Err(Status::invalid_argument("access must be read or write")),
    }
}

/// A page group response code (PCIe 10.4.2).
pub(crate) fn response_code(raw: i32) -> Result<ResponseCode, Status> {
    match pb::PageResponseCode::try_from(raw) {
        Ok(pb::PageResponseCode::Success) => Ok(ResponseCode::Success),
        Ok(pb::PageResponseCode::Invalid) => Ok(ResponseCode::Invalid),
        Ok(pb::PageResponseCode::Failure) => Ok(ResponseCode::Failure),
        Err(_) => Err(Status::invalid_argument(format!("unknown page response code {raw}"))),
    }
}

/// Software's raw invalidation descriptors as (low, high) quadwords: 1 to
/// [`MAX_DESCRIPTORS`] of them. Their contents are checked by the driver (reserved bits,
/// known types: VT-d 6.5.2), which refuses a malformed one without touching the queue.
pub(crate) fn descriptors(d: &[pb::Descriptor]) -> Result<Vec<(u64, u64)>, Status> {
    if d.is_empty() || d.len() > MAX_DESCRIPTORS {
        return Err(Status::invalid_argument(format!("1 to {MAX_DESCRIPTORS} descriptors, got {}", d.len())));
    }
    Ok(d.iter().map(|d| (d.qw0, d.qw1)).collect())
}

/// An interrupt remapping table index: 16 bits (VT-d 5.1.2.1).
pub(crate) fn interrupt_index(raw: u32) -> Result<u16, Status> {
    u16::try_from(raw).map_err(|_| Status::invalid_argument(format!("interrupt index {raw} does not fit 16 bits")))
}

/// A 4-byte register value: it must fit 32 bits.
pub(crate) fn register_value32(raw: u64) -> Result<u32, Status> {
    u32::try_from(raw).map_err(|_| Status::invalid_argument(format!("value {raw:#x} does not fit 4 bytes")))
}

/// A link page request from `sid` (already checked to be bound on the link). The message
/// carries address bits 63:12 (PCIe 10.4.1), so the page offset is dropped.
pub(crate) fn page_request(sid: SourceId, p: &pb::PageRequest) -> Result<PageRequest, Status> {
    Ok(PageRequest {
        sid,
        addr: Iova(p.address & !0xfff),
        read: p.read,
        write: p.write,
        prgi: group_index(p.group_index)?,
        last: p.last,
        private_data: None,
    })
}

// ---- encoding: model -> wire ----

/// A unary translation's answer: the translation, or the fault reason that refused it
/// (0 when the refusal records none).
pub(crate) fn translate_response(unit: UnitId, r: Result<Translation, Blocked>) -> pb::TranslateResponse {
    let unit = u32::from(unit.0);
    match r {
        Ok(t) => pb::TranslateResponse { ok: true, hpa: t.hpa.0, page_shift: t.page_shift, fault_reason: 0, unit },
        Err(b) => pb::TranslateResponse {
            ok: false,
            hpa: 0,
            page_shift: 0,
            fault_reason: b.reason.map_or(0, |r| u32::from(r.code())),
            unit,
        },
    }
}

/// A translation completion answering `request` (PCIe 10.2.3).
pub(crate) fn translation_completion(request: &pb::TranslationRequest, c: AtsCompletion) -> pb::TranslationCompletion {
    let (status, entry) = match c {
        AtsCompletion::Success(e) => (
            pb::CompletionStatus::Success,
            Some(pb::TranslationEntry {
                translated_address: e.translated.0,
                size_shift: e.size_shift,
                read: e.read,
                write: e.write,
                untranslated_only: e.untranslated_only,
                exec: e.exec,
                privileged: e.privileged,
                global: e.global,
            }),
        ),
        AtsCompletion::UnsupportedRequest => (pb::CompletionStatus::UnsupportedRequest, None),
        AtsCompletion::CompleterAbort => (pb::CompletionStatus::CompleterAbort, None),
    };
    pb::TranslationCompletion { tag: request.tag, source_id: request.source_id, status: status as i32, entry }
}

/// DMA failures are answered in the completion, not as a status: the fault code carried
/// there (0 when the refusal records no fault).
pub(crate) fn dma_fault_code(e: &DmaError) -> u32 {
    match e {
        DmaError::Fault { reason, .. } => u32::from(reason.code()),
        _ => 0,
    }
}

/// An invalidation request for a function's device TLB (PCIe 10.3.1).
pub(crate) fn invalidation_request(r: &DeviceInvalidation) -> pb::InvalidationRequest {
    pb::InvalidationRequest { source_id: u32::from(r.sid.0), itag: u32::from(r.itag.0), address: r.addr_s }
}

/// A page group response on its way to a function (PCIe 10.4.2).
pub(crate) fn page_group_response(r: &PageGroupResponse) -> pb::PageGroupResponse {
    pb::PageGroupResponse {
        source_id: u32::from(r.sid.0),
        group_index: u32::from(r.prgi),
        code: i32::from(r.code.code()),
    }
}

/// The answer to a page request the unit refused (the function may not use PRI): a
/// Response Failure, so that the function stops instead of waiting (PCIe 10.4.2.1).
pub(crate) fn refused_page_group(p: &pb::PageRequest) -> pb::PageGroupResponse {
    pb::PageGroupResponse {
        source_id: p.source_id,
        group_index: p.group_index,
        code: pb::PageResponseCode::Failure as i32,
    }
}

/// The functions a link bound, in bind order.
pub(crate) fn bound(sids: &[SourceId]) -> pb::Bound {
    pb::Bound { source_ids: sids.iter().map(|s| u32::from(s.0)).collect() }
}

/// A fault the driver read from a fault recording register (VT-d 7.2.1: reason,
/// requester, address, access, address type, PASID).
pub(crate) fn fault_event(report: &FaultReport) -> pb::FaultEvent {
    pb::FaultEvent { pasid: report.pasid.map(|p| p.0), ..fault_record_event(report.unit, &report.record) }
}

/// A fault as unit `unit` recorded it (a client-driven unit's, which its owner services).
pub(crate) fn fault_record_event(unit: UnitId, record: &FaultRecord) -> pb::FaultEvent {
    pb::FaultEvent {
        reason: u32::from(record.reason.code()),
        reason_name: record.reason.name().to_owned(),
        source_id: u32::from(record.sid.0),
        address: record.addr,
        write: record.access == Direction::Write,
        address_type: record.kind as u32,
        pasid: None,
        unit: u32::from(unit.0),
    }
}

/// An interrupt message unit `unit` sent for its own event `source` (VT-d 7.3, 6.5.2.8,
/// 7.5.1).
pub(crate) fn unit_interrupt(unit: UnitId, source: EventSource, address: u64, data: u32) -> pb::UnitInterrupt {
    let source = match source {
        EventSource::Fault => pb::UnitEventSource::Fault,
        EventSource::InvalidationCompletion => pb::UnitEventSource::InvalidationCompletion,
        EventSource::PageRequest => pb::UnitEventSource::PageRequest,
    };
    pb::UnitInterrupt { unit: u32::from(unit.0), source: source as i32, address, data }
}

/// A remapped interrupt from `sid` (VT-d 5.1.4).
pub(crate) fn interrupt_event(unit: UnitId, sid: SourceId, i: &Remapped) -> pb::InterruptEvent {
    pb::InterruptEvent {
        unit: u32::from(unit.0),
        source_id: u32::from(sid.0),
        vector: u32::from(i.vector),
        destination: i.destination,
        delivery_mode: i.delivery_mode as u32,
        level: i.trigger == Trigger::Level,
        logical: i.destination_mode == DestinationMode::Logical,
        index: i.index.map(u32::from),
    }
}

/// A page request drained from the page request queue (VT-d 7.5.1).
pub(crate) fn page_request_event(unit: UnitId, r: &PageRequest) -> pb::PageRequestEvent {
    pb::PageRequestEvent {
        unit: u32::from(unit.0),
        source_id: u32::from(r.sid.0),
        address: r.addr.0,
        read: r.read,
        write: r.write,
        group_index: u32::from(r.prgi),
        last: r.last,
    }
}

/// The platform as GetPlatform describes it.
pub(crate) fn platform(units: &Units) -> pb::Platform {
    let region = |r: Region| pb::MemoryRegion { base: r.base.0, size: r.size };
    let scope = |e: &ScopeEntry| match e {
        ScopeEntry::Endpoint(sid) => pb::ScopeEntry { source_id: u32::from(sid.0), ..Default::default() },
        ScopeEntry::Bridge { bridge, buses } => pb::ScopeEntry {
            source_id: u32::from(bridge.0),
            bridge: true,
            secondary_bus: u32::from(*buses.start()),
            subordinate_bus: u32::from(*buses.end()),
        },
    };
    let builtin = units.iter().any(|u| u.is_builtin());
    pb::Platform {
        memory_size: units.spec.memory_size,
        builtin_region: builtin.then(|| region(units.spec.builtin_region)),
        units: units
            .iter()
            .map(|u| pb::PlatformUnit {
                unit: u32::from(u.id.0),
                name: u.spec.name.clone(),
                register_base: u.spec.register_base,
                include_all: u.spec.scope == UnitScope::All,
                scope: match &u.spec.scope {
                    UnitScope::All => Vec::new(),
                    UnitScope::Devices(entries) => entries.iter().map(scope).collect(),
                },
                driver: if u.is_builtin() { pb::UnitDriver::BuiltIn } else { pb::UnitDriver::Client } as i32,
                region: u.client_region().map(region),
                claimed: u.claimed(),
            })
            .collect(),
    }
}

/// A unit's counters on the wire.
pub(crate) fn unit_counters(slot: &UnitSlot) -> pb::UnitStats {
    pb::UnitStats { unit: u32::from(slot.id.0), name: slot.spec.name.clone(), counters: unit_stats(&slot.unit.stats()) }
}

/// The unit's counters by name.
pub(crate) fn unit_stats(s: &UnitStats) -> HashMap<String, u64> {
    s.fields().into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn code<T>(r: Result<T, Status>) -> Code {
        r.err().map_or(Code::Ok, |s| s.code())
    }

    #[test]
    fn identifiers_are_checked_against_their_widths() {
        assert_eq!(source_id(0xffff).ok(), Some(SourceId(0xffff)));
        assert_eq!(code(source_id(0x1_0000)), Code::InvalidArgument);
        assert_eq!(domain_id(1).ok(), Some(DomainId(1)));
        assert_eq!(code(domain_id(0)), Code::InvalidArgument);
        assert_eq!(code(domain_id(0x1_0000)), Code::InvalidArgument);
        assert_eq!(group_index(u32::from(MAX_PRG_INDEX)).ok(), Some(511));
        assert_eq!(code(group_index(512)), Code::InvalidArgument);
        assert_eq!(itag(31).ok(), Some(ITag(31)));
        assert_eq!(code(itag(256)), Code::InvalidArgument);
        assert_eq!(code(interrupt_index(0x1_0000)), Code::InvalidArgument);
        assert_eq!(code(register_value32(1 << 32)), Code::InvalidArgument);
    }

    #[test]
    fn bound_functions_need_a_pcie_queue_depth() {
        let f = |depth, capacity| pb::Function {
            source_id: 0x100,
            invalidate_queue_depth: depth,
            page_request_capacity: capacity,
        };
        let sid = SourceId(0x100);
        assert_eq!(queue_depth(sid, 1).ok(), Some(1));
        assert_eq!(queue_depth(sid, 32).ok(), Some(32));
        for bad in [0, 33, 256 + 8] {
            let e = queue_depth(sid, bad).expect_err("refused");
            assert_eq!(e.code(), Code::InvalidArgument);
            assert!(e.message().ends_with("is outside 1..=32"), "{}", e.message());
        }
        assert_eq!(outstanding_page_groups(&f(1, 4)), 4);
        assert_eq!(outstanding_page_groups(&f(1, u32::MAX)), 512);
    }

    #[test]
    fn unknown_enum_values_are_refused() {
        assert_eq!(code(domain_kind(pb::DomainKind::Unspecified as i32)), Code::InvalidArgument);
        assert_eq!(code(domain_kind(99)), Code::InvalidArgument);
        assert_eq!(domain_kind(pb::DomainKind::Paging as i32).ok(), Some(DomainKind::Paging));
        assert_eq!(address_width(0).ok(), Some(AddressWidth::Aw48));
        assert_eq!(code(address_width(40)), Code::InvalidArgument);
        assert_eq!(code(access(0)), Code::InvalidArgument);
        assert_eq!(code(response_code(2)), Code::InvalidArgument);
        assert_eq!(response_code(15).ok(), Some(ResponseCode::Failure));
        let deferred = FlushPolicy::Deferred { max_entries: 1, max_delay: std::time::Duration::from_millis(1) };
        assert_eq!(flush_policy(0, FlushPolicy::Strict, deferred).ok(), Some(FlushPolicy::Strict));
        assert_eq!(flush_policy(pb::FlushPolicy::Deferred as i32, FlushPolicy::Strict, deferred).ok(), Some(deferred));
        assert_eq!(code(flush_policy(7, FlushPolicy::Strict, deferred)), Code::InvalidArgument);
    }

    #[test]
    fn descriptor_batches_are_bounded() {
        let d = pb::Descriptor { qw0: 1, qw1: 2 };
        assert_eq!(descriptors(&[d]).ok(), Some(vec![(1, 2)]));
        assert_eq!(code(descriptors(&[])), Code::InvalidArgument);
        assert_eq!(code(descriptors(&vec![d; MAX_DESCRIPTORS + 1])), Code::InvalidArgument);
    }

    #[test]
    fn page_requests_drop_the_page_offset_and_refusals_answer_failure() {
        let p = pb::PageRequest {
            source_id: 7,
            address: 0x1234_5fff,
            read: true,
            write: false,
            group_index: 3,
            last: true,
        };
        let r = page_request(SourceId(7), &p).expect("decodes");
        assert_eq!((r.addr, r.prgi, r.last), (Iova(0x1234_5000), 3, true));
        assert_eq!(refused_page_group(&p).code, i32::from(ResponseCode::Failure.code()));
        let event = page_request_event(UnitId(2), &r);
        assert_eq!((event.address, event.group_index, event.unit), (0x1234_5000, 3, 2));
    }
}
