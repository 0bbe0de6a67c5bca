//! The typed errors of the driver model.
//!
//! Every public driver call returns [`DriverError`]; nothing a caller passes in can make
//! the driver panic. The service layer maps these to wire status codes in one place; this
//! module only names the failures and formats them (lowercase, no trailing period).

use std::fmt;

use crate::ids::{DomainId, Hpa, Iova, SourceId, UnitId};
use crate::unit::memory::MemoryError;
use crate::unit::tables::AddressWidth;

/// Which argument of a map or unmap request broke the 4 KiB alignment rule.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum AddressField {
    /// The I/O virtual address.
    Iova,
    /// The host physical address.
    Hpa,
    /// The length in bytes.
    Len,
}

impl fmt::Display for AddressField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Iova => "iova",
            Self::Hpa => "host address",
            Self::Len => "length",
        })
    }
}

/// Why a driver operation was refused or failed.
///
/// Refusals (everything but [`DriverError::Hardware`] and [`DriverError::Memory`]) leave
/// the tables exactly as they were.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum DriverError {
    /// No domain with this id exists (never created, or destroyed).
    #[error("domain {0} does not exist")]
    UnknownDomain(DomainId),
    /// An address or length is not a multiple of 4 KiB (VT-d 3.6: the smallest page).
    #[error("{field} {value:#x} is not 4 KiB aligned")]
    Unaligned {
        /// The offending argument.
        field: AddressField,
        /// Its value.
        value: u64,
    },
    /// A map or unmap of zero bytes.
    #[error("length is zero")]
    ZeroLength,
    /// The address plus the length does not fit in 64 bits.
    #[error("address range overflows 64 bits")]
    Overflow,
    /// The range reaches past the domain's adjusted guest address width (VT-d 3.6).
    #[error("iova {iova} is beyond the domain's {width_bits}-bit address width")]
    BeyondWidth {
        /// The first address of the range that is out of reach.
        iova: Iova,
        /// The domain's width.
        width_bits: u32,
    },
    /// A page of the requested map range is already mapped; nothing was written.
    #[error("iova {iova} is already mapped")]
    Overlap {
        /// The first mapped address found inside the range.
        iova: Iova,
    },
    /// The domain has no page tables (blocked or identity) so it cannot be mapped into.
    #[error("domain {0} is not a paging domain")]
    NotPaging(DomainId),
    /// A domain cannot be destroyed while devices are attached to it.
    #[error("domain {did} still has {devices} attached device(s)")]
    DomainInUse {
        /// The domain.
        did: DomainId,
        /// How many devices are attached.
        devices: usize,
    },
    /// All 65535 usable domain ids are taken (VT-d CAP.ND=6: 16-bit ids, 0 reserved).
    #[error("all domain ids are in use")]
    DomainIdsExhausted,
    /// The page-table region has no free 4 KiB frame left.
    #[error("the page-table region is exhausted")]
    OutOfTableMemory,
    /// A map would allocate more page-table frames than its caller allowed
    /// ([`super::Driver::map_within`], e.g. a tenant's quota); nothing was written.
    #[error("the map needs {needed} new page-table frames; {limit} allowed")]
    FrameLimit {
        /// New table frames the map would allocate.
        needed: usize,
        /// The frames the caller allowed.
        limit: usize,
    },
    /// An unmap range covers only part of a superpage; nothing was changed.
    #[error("range covers only part of the superpage at {iova}")]
    PartialSuperpage {
        /// The first address of the superpage.
        iova: Iova,
    },
    /// The host range reaches past the end of the emulated memory.
    #[error("host range {hpa} (+{len:#x} bytes) is beyond the {size:#x}-byte memory")]
    HpaOutOfRange {
        /// First byte.
        hpa: Hpa,
        /// Length in bytes.
        len: u64,
        /// Memory size.
        size: u64,
    },
    /// The host range overlaps the driver's own page-table region: a device given write
    /// access there could rewrite its own translations.
    #[error("host range {hpa} (+{len:#x} bytes) overlaps the page-table region")]
    HpaInTableRegion {
        /// First byte.
        hpa: Hpa,
        /// Length in bytes.
        len: u64,
    },
    /// A mapping that grants neither read nor write would be a not-present entry
    /// (VT-d 9.8: second-stage entries are present when R or W is set).
    #[error("mapping grants neither read nor write")]
    NoAccess,
    /// The unit does not advertise this address width in CAP.SAGAW.
    #[error("the unit does not support {0:?} page tables")]
    UnsupportedWidth(AddressWidth),
    /// Identity domains need pass-through support (ECAP.PT).
    #[error("the unit does not support pass-through")]
    PassThroughUnsupported,
    /// The configured page-table region is empty, unaligned or outside memory.
    #[error("page-table region {base} (+{len:#x} bytes) is not a page-aligned part of memory")]
    InvalidTableRegion {
        /// First byte.
        base: Hpa,
        /// Length in bytes.
        len: u64,
    },
    /// The device asked for ATS (a TT=01b context entry), but its device TLB could not be
    /// kept coherent: the unit lacks device-TLB support (ECAP.DT) or queued invalidation is
    /// off (device-TLB invalidations exist only as queue descriptors, VT-d 6.5.2.5).
    #[error("device {0} cannot use ATS: needs device-TLB support and queued invalidation")]
    AtsUnsupported(SourceId),
    /// A device did not answer a device-TLB invalidation within the unit's time-out
    /// (FSTS.ITE with IQERCD.ITESID, VT-d 6.5.2.10).
    ///
    /// The operation itself was carried out and the IOTLB, paging-structure caches and the
    /// other devices' TLBs were invalidated (the driver resubmits those after the
    /// time-out), but this device may still hold translations for the range. Detaching it
    /// makes them harmless: without a TT=01b context entry its translated requests are
    /// blocked (VT-d 4.2.4). An attach that fails this way leaves the device detached.
    #[error("device {sid} did not complete a device-TLB invalidation in time")]
    DeviceTlbTimeout {
        /// The device that timed out (the first one, if several did).
        sid: SourceId,
    },
    /// A descriptor handed in by software is malformed (VT-d 6.5.2; it would stop the
    /// queue with IQE), or names a type the unit does not implement.
    #[error("invalid invalidation descriptor {qw0:#018x} {qw1:#018x}: {why}")]
    InvalidDescriptor {
        /// Low quadword.
        qw0: u64,
        /// High quadword.
        qw1: u64,
        /// What is wrong.
        why: String,
    },
    /// The operation needs queued invalidation, which is off.
    #[error("queued invalidation is not enabled")]
    QueueDisabled,
    /// Interrupt remapping has not been set up by the driver.
    #[error("interrupt remapping is not enabled")]
    InterruptRemappingDisabled,
    /// An interrupt remapping table index beyond the table.
    #[error("interrupt index {index} is beyond the {entries}-entry remapping table")]
    InterruptIndex {
        /// The index.
        index: u16,
        /// Table size.
        entries: u32,
    },
    /// A block of interrupt remapping table entries larger than one interrupt entry cache
    /// invalidation can cover (2^`mask` entries with `mask` above ECAP.MHMV, VT-d 6.5.2.7).
    #[error("a block of 2^{mask} interrupt entries exceeds the unit's handle mask limit of {max}")]
    InterruptMask {
        /// The block's index mask.
        mask: u8,
        /// ECAP.MHMV.
        max: u8,
    },
    /// Page requests have not been set up by the driver.
    #[error("the page request queue is not enabled")]
    PageRequestsDisabled,
    /// The page request queue could not be read.
    #[error("page request queue: {0}")]
    PageRequestQueue(String),
    /// [`super::Driver::for_units`] was given no unit to drive.
    #[error("no remapping unit to drive")]
    NoUnits,
    /// [`super::Driver::for_units`] was given the same unit id twice.
    #[error("unit {0} is listed twice")]
    DuplicateUnit(UnitId),
    /// A unit does not work on the first unit's host memory: one driver keeps one table
    /// region, and a domain's page tables are shared by every unit it spans.
    #[error("unit {0} does not share the first unit's host memory")]
    ForeignMemory(UnitId),
    /// No unit's device scope covers the requester id (VT-d 8.3.1: its requests would be
    /// remapped by no unit), so it cannot be attached.
    #[error("no remapping unit covers requester {0}")]
    NoUnit(SourceId),
    /// The requester id is behind a unit this driver does not drive (a unit left to a
    /// client's own driver).
    #[error("requester {sid} is behind unit {unit}, which this driver does not drive")]
    NotDriven {
        /// The requester.
        sid: SourceId,
        /// The unit its requests go to.
        unit: UnitId,
    },
    /// A per-unit call named a unit this driver does not drive.
    #[error("unit {0} is not driven by this driver")]
    UnknownUnit(UnitId),
    /// A table access failed (the table region was validated, so this means a bug).
    #[error("table memory access failed")]
    Memory(#[from] MemoryError),
    /// A register access failed or a register handshake did not complete.
    #[error("hardware: {0}")]
    Hardware(String),
}
