//! The one place where errors become gRPC statuses. Messages are the errors' own
//! (lowercase, no trailing period); the code tells the client what kind of problem it is.
//!
//! Client input never maps to `INTERNAL`: a wire value that cannot be decoded is refused
//! in [`super::wire`] with `INVALID_ARGUMENT`, and a driver refusal maps to the code of its
//! kind below. `INTERNAL` is kept for faults of the server itself: a driver that lost
//! track of the hardware, or a blocking task that panicked.

use tokio::task::JoinError;
use tonic::Status;

use dmar_vtd::driver::DriverError;
use dmar_vtd::unit::PortError;
use dmar_vtd::unit::{MemoryError, MmioError};

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

/// Maps a driver error on range `index` of a map or unmap request: the same code, the
/// message prefixed with the range.
pub(crate) fn driver_in_range(index: usize, e: DriverError) -> Status {
    let s = driver(e);
    Status::new(s.code(), format!("range {index}: {}", s.message()))
}

/// A refused register access: the offset or width is the client's.
pub(crate) fn mmio(e: MmioError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// A memory access outside the emulated memory.
pub(crate) fn memory(e: MemoryError) -> Status {
    Status::out_of_range(e.to_string())
}

/// A link bind the unit refused.
pub(crate) fn port(e: PortError) -> Status {
    match e {
        PortError::AlreadyBound(_) => Status::already_exists(e.to_string()),
        PortError::InvalidDepth(_) => Status::invalid_argument(e.to_string()),
    }
}

/// A driver call on the blocking pool that did not return (it panicked, or the runtime is
/// shutting down): a fault of the server, not of the request.
pub(crate) fn join(e: JoinError) -> Status {
    Status::internal(format!("driver task failed: {e}"))
}
