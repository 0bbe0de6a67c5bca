//! The one place where errors become gRPC statuses. Messages are the errors' own
//! (lowercase, no trailing period); the code tells the client what kind of problem it is.
//!
//! Client input never maps to `INTERNAL`: a wire value that cannot be decoded is refused
//! in [`super::wire`] with `INVALID_ARGUMENT`, and a driver refusal maps to the code of its
//! kind below (a raw invalidation descriptor the unit refuses, e.g. a wait whose status
//! address it cannot write, is the driver's `InvalidDescriptor`: `INVALID_ARGUMENT`).
//! `INTERNAL` is kept for faults of the server itself: a driver that lost track of the
//! hardware, or a blocking task that panicked.

use tokio::task::JoinError;
use tonic::Status;

use dmar_vtd::driver::DriverError;
use dmar_vtd::unit::PortError;
use dmar_vtd::unit::{MemoryError, MmioError};

/// Maps a driver error to a status. Exhaustive on purpose: a new driver error must be
/// classified here as the client's (a code that says what to fix) or the server's
/// (`INTERNAL`).
pub(crate) fn driver(e: DriverError) -> Status {
    use DriverError as E;
    let msg = e.to_string();
    match e {
        E::UnknownDomain(_) | E::UnknownUnit(_) => Status::not_found(msg),
        E::Overlap { .. } => Status::already_exists(msg),
        // The request is well formed but the unit or the domain is not in a state to take it.
        E::DomainInUse { .. }
        | E::NotPaging(_)
        | E::PartialSuperpage { .. }
        | E::AtsUnsupported(_)
        | E::PassThroughUnsupported
        | E::QueueDisabled
        | E::InterruptRemappingDisabled
        | E::PageRequestsDisabled
        // The device is behind no unit, or behind one the built-in driver does not drive.
        | E::NoUnit(_)
        | E::NotDriven { .. } => Status::failed_precondition(msg),
        E::DomainIdsExhausted | E::OutOfTableMemory | E::FrameLimit { .. } => Status::resource_exhausted(msg),
        E::DeviceTlbTimeout { .. } => Status::deadline_exceeded(msg),
        // The client's values: fix the request.
        E::Unaligned { .. }
        | E::ZeroLength
        | E::Overflow
        | E::BeyondWidth { .. }
        | E::HpaOutOfRange { .. }
        | E::HpaInTableRegion { .. }
        | E::NoAccess
        | E::UnsupportedWidth(_)
        | E::InvalidDescriptor { .. }
        | E::InterruptIndex { .. }
        | E::InterruptMask { .. } => Status::invalid_argument(msg),
        // The server's own state: its configuration, its queues, its tables.
        E::InvalidTableRegion { .. }
        | E::PageRequestQueue(_)
        | E::Hardware(_)
        | E::Memory(_)
        | E::NoUnits
        | E::DuplicateUnit(_)
        | E::ForeignMemory(_) => Status::internal(msg),
    }
}

/// Maps a driver error on range `index` of a map or unmap request: the same code, the
/// message prefixed with the range.
pub(crate) fn driver_in_range(index: usize, e: DriverError) -> Status {
    in_range(index, driver(e))
}

/// A refusal `s` of range `index` of a map or unmap request: its message prefixed with the
/// range.
pub(crate) fn in_range(index: usize, s: Status) -> Status {
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
