//! The ACPI DMAR table ("DMA Remapping Reporting", VT-d chapter 8): what firmware hands
//! the OS so that it finds the remapping units, the devices under each, the memory devices
//! keep using (RMRR), the root ports that support ATS (ATSR) and the devices with an
//! SoC-integrated address translation cache (SATC).
//!
//! This module owns the byte layout: [`dmar_table`] encodes a [`PlatformSpec`] as firmware
//! would, and [`parse_dmar`] decodes any byte string into a [`DmarTable`] with bounds
//! checks, never panicking, for a client driver that discovers its units the way Linux's
//! `dmar_table_init` does. It does not decide what a valid platform is
//! ([`PlatformSpec::validate`]) nor route requests (`platform::Routing`).
//!
//! Layout (all little endian; ACPI 6.5 5.2.6 for the header, VT-d 8.1-8.8 for the rest):
//! the 36-byte ACPI header, the host address width (N-1 form), flags and 10 reserved bytes
//! (48 bytes in all), then remapping structures in type order, each `type: u16,
//! length: u16` then its fields and device scope entries (`type: u8, length: u8,
//! flags: u8, reserved: u8, enumeration id: u8, start bus: u8`, then `(device, function)`
//! pairs).
//!
//! Bus ranges of sub-hierarchy entries are not in the table: an OS reads them from the
//! bridge's configuration space (secondary and subordinate bus number registers), so a
//! parsed bridge entry names only the bridge.

use crate::ids::SourceId;
#[cfg(doc)]
use crate::platform::PlatformSpec;

mod encode;
mod parse;
#[cfg(test)]
mod tests;

pub use encode::dmar_table;
pub use parse::parse_dmar;

/// The table's signature (ACPI 6.5 table 5.5; VT-d 8.1).
pub const SIGNATURE: [u8; 4] = *b"DMAR";
/// The table revision dmar writes: VT-d 8.1 gives the DMAR table revision 1 (SATC and the
/// later structure types did not change it).
pub const REVISION: u8 = 1;
/// OEM id: dmar, space padded to six bytes.
pub const OEM_ID: [u8; 6] = *b"DMAR  ";
/// OEM table id: the dmar platform table.
pub const OEM_TABLE_ID: [u8; 8] = *b"DMARPLAT";
/// OEM revision.
pub const OEM_REVISION: u32 = 1;
/// Creator id (the "ASL compiler" id of tables built by firmware code).
pub const CREATOR_ID: [u8; 4] = *b"DMAR";
/// Creator revision.
pub const CREATOR_REVISION: u32 = 1;
/// Length of the standard ACPI table header.
pub const ACPI_HEADER_LEN: usize = 36;
/// Offset of the first remapping structure: the ACPI header, host address width, flags
/// and 10 reserved bytes.
pub const DMAR_HEADER_LEN: usize = 48;

/// DMAR flags (VT-d 8.1).
pub mod flags {
    /// INTR_REMAP: the platform supports interrupt remapping.
    pub const INTR_REMAP: u8 = 1 << 0;
    /// X2APIC_OPT_OUT: firmware asks the OS not to use x2APIC mode.
    pub const X2APIC_OPT_OUT: u8 = 1 << 1;
    /// DMA_CTRL_PLATFORM_OPT_IN: firmware kept DMA protection on through boot and asks
    /// the OS to keep remapping on for external-facing ports.
    pub const DMA_CTRL_PLATFORM_OPT_IN: u8 = 1 << 2;
}

/// Remapping structure types (VT-d 8.2, table "Remapping Structure Types").
pub mod structure {
    /// DMA Remapping Hardware Unit Definition.
    pub const DRHD: u16 = 0;
    /// Reserved Memory Region Reporting.
    pub const RMRR: u16 = 1;
    /// Root Port ATS Capability Reporting.
    pub const ATSR: u16 = 2;
    /// Remapping Hardware Static Affinity (not written by dmar).
    pub const RHSA: u16 = 3;
    /// ACPI Name-space Device Declaration (not written by dmar).
    pub const ANDD: u16 = 4;
    /// SoC Integrated Address Translation Cache Reporting.
    pub const SATC: u16 = 5;
}

/// DRHD flag INCLUDE_PCI_ALL (VT-d 8.3).
pub const DRHD_INCLUDE_PCI_ALL: u8 = 1 << 0;
/// ATSR flag ALL_PORTS (VT-d 8.5).
pub const ATSR_ALL_PORTS: u8 = 1 << 0;
/// SATC flag ATC_REQUIRED (VT-d 8.8).
pub const SATC_ATC_REQUIRED: u8 = 1 << 0;

/// The standard ACPI table header, as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiHeader {
    /// Table length in bytes, header included.
    pub length: u32,
    /// Table revision.
    pub revision: u8,
    /// The checksum byte.
    pub checksum: u8,
    /// OEM id.
    pub oem_id: [u8; 6],
    /// OEM table id.
    pub oem_table_id: [u8; 8],
    /// OEM revision.
    pub oem_revision: u32,
    /// Creator id.
    pub creator_id: [u8; 4],
    /// Creator revision.
    pub creator_revision: u32,
}

/// Device scope entry types (VT-d 8.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScopeKind {
    /// 1: a PCI endpoint device.
    Endpoint,
    /// 2: a PCI sub-hierarchy (the bridge and every device below it).
    Bridge,
    /// 3: an I/O APIC.
    IoApic,
    /// 4: an MSI-capable HPET.
    Hpet,
    /// 5: an ACPI name-space device.
    Namespace,
    /// Any other value (reserved).
    Other(u8),
}

impl ScopeKind {
    /// The kind of type byte `code`.
    pub const fn from_code(code: u8) -> Self {
        match code {
            1 => Self::Endpoint,
            2 => Self::Bridge,
            3 => Self::IoApic,
            4 => Self::Hpet,
            5 => Self::Namespace,
            other => Self::Other(other),
        }
    }

    /// The type byte.
    pub const fn code(self) -> u8 {
        match self {
            Self::Endpoint => 1,
            Self::Bridge => 2,
            Self::IoApic => 3,
            Self::Hpet => 4,
            Self::Namespace => 5,
            Self::Other(c) => c,
        }
    }
}

/// One hop of a device scope path: a device and function on the current bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PciPath {
    /// Device number (0..=31).
    pub device: u8,
    /// Function number (0..=7).
    pub function: u8,
}

/// One device scope entry (VT-d 8.3.1).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DeviceScope {
    /// What the entry names.
    pub kind: ScopeKind,
    /// I/O APIC id, HPET number or ACPI device number; 0 for PCI entries.
    pub enumeration_id: u8,
    /// The bus the path starts on.
    pub start_bus: u8,
    /// The path from `start_bus` to the device (at least one hop).
    pub path: Vec<PciPath>,
}

impl DeviceScope {
    /// The requester id the entry names when its path is one hop (a device on the start
    /// bus, as every entry dmar writes is). A longer path crosses bridges whose secondary
    /// bus numbers only configuration space knows, so it gives `None`.
    pub fn source_id(&self) -> Option<SourceId> {
        match self.path.as_slice() {
            [hop] => Some(SourceId::new(self.start_bus, hop.device, hop.function)),
            _ => None,
        }
    }
}

/// A DMA Remapping Hardware Unit Definition (VT-d 8.3): one remapping unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drhd {
    /// INCLUDE_PCI_ALL: the unit covers every device of the segment no other unit lists.
    pub include_pci_all: bool,
    /// Size of the register set: 2^`size` 4 KiB pages (bits 3:0 of the size byte).
    pub size: u8,
    /// PCI segment.
    pub segment: u16,
    /// Register base address.
    pub register_base: u64,
    /// The devices it covers.
    pub scope: Vec<DeviceScope>,
}

/// A Reserved Memory Region Reporting structure (VT-d 8.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rmrr {
    /// PCI segment.
    pub segment: u16,
    /// First byte.
    pub base: u64,
    /// Last byte (inclusive).
    pub limit: u64,
    /// The endpoints using it.
    pub scope: Vec<DeviceScope>,
}

/// A Root Port ATS Capability Reporting structure (VT-d 8.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Atsr {
    /// ALL_PORTS: every root port of the segment supports ATS.
    pub all_ports: bool,
    /// PCI segment.
    pub segment: u16,
    /// The root ports (sub-hierarchy entries) when not `all_ports`.
    pub scope: Vec<DeviceScope>,
}

/// An SoC Integrated Address Translation Cache Reporting structure (VT-d 8.8).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SatcEntry {
    /// ATC_REQUIRED: the devices work correctly only with their ATC enabled.
    pub atc_required: bool,
    /// PCI segment.
    pub segment: u16,
    /// The endpoints.
    pub scope: Vec<DeviceScope>,
}

/// A decoded DMAR table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmarTable {
    /// The ACPI header.
    pub header: AcpiHeader,
    /// Host address width in bits (the table holds it minus one).
    pub host_address_width: u8,
    /// DMAR flags ([`flags`]).
    pub flags: u8,
    /// The DRHDs, in table order.
    pub drhds: Vec<Drhd>,
    /// The RMRRs.
    pub rmrrs: Vec<Rmrr>,
    /// The ATSRs.
    pub atsrs: Vec<Atsr>,
    /// The SATCs.
    pub satcs: Vec<SatcEntry>,
    /// Types of the structures skipped because this decoder does not read them (RHSA,
    /// ANDD, reserved types): VT-d 8.2 tells software to ignore types it does not know.
    pub skipped: Vec<u16>,
}

/// Why bytes are not a DMAR table dmar can read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AcpiError {
    /// Fewer bytes than the DMAR header.
    #[error("{len} bytes are too few for a DMAR table ({DMAR_HEADER_LEN} at least)")]
    TooShort {
        /// Bytes given.
        len: usize,
    },
    /// The signature is not `DMAR`.
    #[error("the table signature is not DMAR")]
    Signature,
    /// The length field is below the DMAR header or beyond the bytes given.
    #[error("the table length {declared} is not between {DMAR_HEADER_LEN} and the {available} bytes given")]
    Length {
        /// The length field.
        declared: u32,
        /// Bytes given.
        available: usize,
    },
    /// The bytes of the table do not sum to 0 (mod 256).
    #[error("the table checksum is wrong (the bytes sum to {sum:#04x})")]
    Checksum {
        /// What they sum to.
        sum: u8,
    },
    /// A structure or scope entry runs past the end of what holds it.
    #[error("the structure or scope entry at offset {offset} runs past its end")]
    Truncated {
        /// Its offset in the table.
        offset: usize,
    },
    /// A structure shorter than its type's fixed fields, or a scope entry whose length is
    /// not 6 plus 2 per path hop.
    #[error("the structure or scope entry at offset {offset} has a bad length {length}")]
    BadLength {
        /// Its offset in the table.
        offset: usize,
        /// Its length field.
        length: u16,
    },
    /// A path hop with a device above 31 or a function above 7.
    #[error("the scope entry at offset {offset} has a path hop outside device 0-31, function 0-7")]
    BadPath {
        /// The scope entry's offset in the table.
        offset: usize,
    },
}
