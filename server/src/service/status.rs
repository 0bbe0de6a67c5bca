//! The one place where domain errors become gRPC statuses, and where wire values are
//! checked into the unit's types. Messages are the errors' own
//! (lowercase, no trailing period); the code tells the client what kind of problem it is.

use tonic::Status;

use dmar_vtd::driver::DriverError;
use dmar_vtd::ids::SourceId;
use dmar_vtd::unit::PortError;
use dmar_vtd::unit::{DmaError, MemoryError, MmioError};

/// Maps a driver error to a status.
pub(crate) fn driver(e: DriverError) -> Status {
    use DriverError as E;
    let msg = e.to_string();
    match e {
        E::UnknownDomain(_) => Status::not_found(msg),
        E::Overlap { .. } => Status::already_exists(msg),
        E::DomainInUse { .. }
        | E::NotPaging(_)
        | E::PartialSuperpage { .. }
        | E::AtsUnsupported(_)
        | E::QueueDisabled
        | E::InterruptRemappingDisabled
        | E::PageRequestsDisabled => Status::failed_precondition(msg),
        E::DomainIdsExhausted | E::OutOfTableMemory => Status::resource_exhausted(msg),
        E::Hardware(_) | E::Memory(_) => Status::internal(msg),
        E::DeviceTlbTimeout { .. } => Status::deadline_exceeded(msg),
        _ => Status::invalid_argument(msg),
    }
}

pub(crate) fn mmio(e: MmioError) -> Status {
    Status::invalid_argument(e.to_string())
}

pub(crate) fn memory(e: MemoryError) -> Status {
    Status::out_of_range(e.to_string())
}

pub(crate) fn port(e: PortError) -> Status {
    match e {
        PortError::AlreadyBound(_) => Status::already_exists(e.to_string()),
        PortError::InvalidDepth(_) => Status::invalid_argument(e.to_string()),
    }
}

/// DMA failures are answered in the completion, not as a status; this gives the fault
/// code carried there (0 when the refusal records no fault).
pub(crate) fn dma_fault_code(e: &DmaError) -> u32 {
    match e {
        DmaError::Fault { reason, .. } => u32::from(reason.code()),
        _ => 0,
    }
}

/// A requester id from the wire: it must fit 16 bits.
pub(crate) fn source_id(raw: u32) -> Result<SourceId, Status> {
    u16::try_from(raw)
        .map(SourceId)
        .map_err(|_| Status::invalid_argument(format!("requester id {raw:#x} does not fit 16 bits")))
}

/// A page request group index from the wire: 9 bits (PCIe PRI).
pub(crate) fn group_index(raw: u32) -> Result<u16, Status> {
    u16::try_from(raw)
        .ok()
        .filter(|g| *g < 512)
        .ok_or_else(|| Status::invalid_argument(format!("page request group index {raw} exceeds 9 bits")))
}
