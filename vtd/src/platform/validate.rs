//! The rules a [`PlatformSpec`] must follow before units are built from it or a DMAR table
//! is encoded from it ([`PlatformSpec::validate`]), and the error naming the rule broken
//! ([`PlatformError`]).
//!
//! The rules come from the DMAR table (VT-d chapter 8: one segment's DRHDs, scopes that do
//! not overlap, INCLUDE_PCI_ALL last, page-aligned register bases and RMRRs) and from dmar
//! itself (one segment, the memory sizes `HostMemory` accepts, driver regions that do not
//! overlap). This module only checks; routing is `Routing`, encoding is `crate::acpi`.

use std::fmt;

use crate::ids::{PAGE_SIZE, SourceId};
use crate::unit::memory::{MAX_MEMORY_SIZE, MIN_MEMORY_SIZE};

use super::{PlatformSpec, Region, ScopeEntry, UnitDriver, UnitScope};

/// The most units a platform may have: Linux sizes its unit bitmaps by
/// `DMAR_UNITS_SUPPORTED` (64 unless interrupt remapping raises it), and the wire names a
/// unit by a small index.
pub const MAX_UNITS: usize = 64;

/// The longest unit name, in bytes.
pub const MAX_NAME_LEN: usize = 32;

/// The least host memory the built-in driver needs for its units' root and context tables,
/// invalidation queues, interrupt remapping tables, page request queues and some page
/// tables: a full set of context tables alone is 256 pages (1 MiB).
pub const MIN_BUILTIN_REGION: u64 = 1 << 20;

/// The most device scope entries one DRHD, RMRR, ATSR or SATC structure may list: keeps
/// each structure's 16-bit length field (VT-d 8.3) far from overflowing (8 bytes each).
pub const MAX_SCOPE_ENTRIES: usize = 1024;

/// A unit named in an error: its index (its `UnitId`, and its DRHD's position) and name.
///
/// Displays as `unit 1 "dmar1"`, or `unit 1` once [`PlatformError::redact_names`] emptied
/// the name (for callers whose messages must not repeat what a file said).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitRef {
    /// Index in [`PlatformSpec::units`].
    pub index: usize,
    /// The unit's name (empty when redacted).
    pub name: String,
}

impl fmt::Display for UnitRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.is_empty() {
            write!(f, "unit {}", self.index)
        } else {
            write!(f, "unit {} {:?}", self.index, self.name)
        }
    }
}

/// Whose host memory region an error is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionOwner {
    /// [`PlatformSpec::builtin_region`].
    BuiltIn,
    /// A client-driven unit's region.
    Client(UnitRef),
    /// The RMRR at this index of [`PlatformSpec::reserved`].
    Reserved(usize),
}

impl RegionOwner {
    fn redact(&mut self) {
        if let Self::Client(unit) = self {
            unit.name.clear();
        }
    }
}

impl fmt::Display for RegionOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BuiltIn => f.write_str("the built-in driver's region"),
            Self::Client(unit) => write!(f, "{unit}'s client region"),
            Self::Reserved(i) => write!(f, "reserved region {i}"),
        }
    }
}

/// Why a platform description cannot be used. Each names the rule and the unit (by index
/// and name) or the structure that breaks it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlatformError {
    /// No unit: a DMAR table needs at least one DRHD (VT-d 8.1).
    #[error("the platform has no remapping unit")]
    NoUnits,
    /// More than [`MAX_UNITS`].
    #[error("the platform has {count} remapping units, more than {MAX_UNITS}")]
    TooManyUnits {
        /// How many were given.
        count: usize,
    },
    /// A segment other than 0.
    #[error("segment {segment} is not 0: dmar's requester ids carry no segment")]
    Segment {
        /// The segment given.
        segment: u16,
    },
    /// A memory size `HostMemory::new` refuses.
    #[error("memory size {size:#x} must be a multiple of 2 MiB between 2 MiB and 1 TiB")]
    MemorySize {
        /// The size given.
        size: u64,
    },
    /// A name that is empty, too long or has characters outside `[a-z0-9_-]` (not repeated
    /// here: it is what is wrong).
    #[error("unit {index}: a name must be 1 to {MAX_NAME_LEN} bytes of a-z, 0-9, '_' and '-'")]
    BadName {
        /// The unit's index.
        index: usize,
    },
    /// Two units with one name.
    #[error("{unit}: the name is already used by unit {first}")]
    DuplicateName {
        /// The later unit.
        unit: UnitRef,
        /// The index of the unit that has the name first.
        first: usize,
    },
    /// A register base that is not 4 KiB aligned (VT-d 8.3: the register set is in 4 KiB
    /// pages).
    #[error("{unit}: register base {base:#x} is not 4 KiB aligned")]
    RegisterBaseMisaligned {
        /// The unit.
        unit: UnitRef,
        /// Its base.
        base: u64,
    },
    /// Two units at one register base (each window is one 4 KiB page, so aligned distinct
    /// bases do not overlap).
    #[error("{unit}: register base {base:#x} is also {other}'s")]
    RegisterBaseShared {
        /// The later unit.
        unit: UnitRef,
        /// The unit with the base first.
        other: UnitRef,
        /// The base.
        base: u64,
    },
    /// A second INCLUDE_PCI_ALL unit in the segment (VT-d 8.3: at most one per segment).
    #[error("{unit}: a second INCLUDE_PCI_ALL unit (the first is {first})")]
    SecondIncludeAll {
        /// The later unit.
        unit: UnitRef,
        /// The first INCLUDE_PCI_ALL unit.
        first: UnitRef,
    },
    /// The INCLUDE_PCI_ALL unit is followed by another DRHD of its segment (VT-d 8.3: it
    /// must be enumerated after all other DRHDs of the segment).
    #[error("{unit}: the INCLUDE_PCI_ALL unit must be the last unit of the segment (VT-d 8.3)")]
    IncludeAllNotLast {
        /// The INCLUDE_PCI_ALL unit.
        unit: UnitRef,
    },
    /// A unit that lists no device and is not INCLUDE_PCI_ALL: it would remap nothing
    /// (Linux ignores such a DRHD).
    #[error("{unit}: the scope lists no device and the unit is not INCLUDE_PCI_ALL")]
    EmptyScope {
        /// The unit.
        unit: UnitRef,
    },
    /// A structure with more than [`MAX_SCOPE_ENTRIES`] device scope entries.
    #[error("{structure} lists {entries} devices, more than {MAX_SCOPE_ENTRIES}")]
    TooManyScopeEntries {
        /// The unit, reserved region, ATSR or SATC (by index).
        structure: String,
        /// How many it lists.
        entries: usize,
    },
    /// A bridge entry whose bus range is backwards.
    #[error("{unit}: bridge {bridge} has secondary bus {secondary:#04x} above subordinate bus {subordinate:#04x}")]
    BridgeBusesBackwards {
        /// The unit.
        unit: UnitRef,
        /// The bridge.
        bridge: SourceId,
        /// Its secondary bus.
        secondary: u8,
        /// Its subordinate bus.
        subordinate: u8,
    },
    /// A bridge whose own bus is not above its secondary bus (PCI: buses below a bridge are
    /// numbered after it).
    #[error("{unit}: bridge {bridge} must sit on a bus below its secondary bus {secondary:#04x}")]
    BridgeBelowItsBuses {
        /// The unit.
        unit: UnitRef,
        /// The bridge.
        bridge: SourceId,
        /// Its secondary bus.
        secondary: u8,
    },
    /// A requester id two units' scopes both list (VT-d 8.3.1: a device is under exactly
    /// one unit).
    #[error("{unit}: requester id {sid} is also in {other}'s scope")]
    ScopeOverlap {
        /// The later unit.
        unit: UnitRef,
        /// The earlier unit.
        other: UnitRef,
        /// A requester id in both.
        sid: SourceId,
    },
    /// A region that is not 4 KiB aligned in base or size.
    #[error("{owner} is not 4 KiB aligned")]
    RegionMisaligned {
        /// Whose.
        owner: RegionOwner,
    },
    /// A region of no bytes.
    #[error("{owner} is empty")]
    RegionEmpty {
        /// Whose.
        owner: RegionOwner,
    },
    /// A region that ends past the host memory.
    #[error("{owner} ends past the end of host memory ({memory_size:#x})")]
    RegionOutsideMemory {
        /// Whose.
        owner: RegionOwner,
        /// The memory size.
        memory_size: u64,
    },
    /// Two driver regions, or a reserved region and a driver region, that overlap.
    #[error("{owner} overlaps {other}")]
    RegionsOverlap {
        /// The later region's owner.
        owner: RegionOwner,
        /// The earlier region's owner.
        other: RegionOwner,
    },
    /// A built-in unit, but a built-in region under [`MIN_BUILTIN_REGION`].
    #[error("{unit} uses the built-in driver, whose region of {size:#x} bytes is under {MIN_BUILTIN_REGION:#x}")]
    BuiltinRegionTooSmall {
        /// The first built-in unit.
        unit: UnitRef,
        /// The region's size.
        size: u64,
    },
    /// An RMRR that names no device (VT-d 8.4: its scope lists the endpoints using it).
    #[error("reserved region {index} lists no device")]
    ReservedWithoutDevices {
        /// Index in [`PlatformSpec::reserved`].
        index: usize,
    },
    /// An RMRR device that no unit covers.
    #[error("reserved region {index}: device {sid} is in no unit's scope")]
    ReservedDeviceUncovered {
        /// Index in [`PlatformSpec::reserved`].
        index: usize,
        /// The device.
        sid: SourceId,
    },
    /// A SATC device that no unit covers (VT-d 8.8: SATC devices are under a DRHD too).
    #[error("satc {index}: device {sid} is in no unit's scope")]
    SatcDeviceUncovered {
        /// Index in [`PlatformSpec::satc`].
        index: usize,
        /// The device.
        sid: SourceId,
    },
}

impl PlatformError {
    /// The same error with every unit name emptied, so it displays units by index only:
    /// for messages that must not repeat anything a file said.
    pub fn redact_names(mut self) -> Self {
        let blank = |u: &mut UnitRef| u.name.clear();
        match &mut self {
            Self::DuplicateName { unit, .. }
            | Self::RegisterBaseMisaligned { unit, .. }
            | Self::IncludeAllNotLast { unit }
            | Self::EmptyScope { unit }
            | Self::BridgeBusesBackwards { unit, .. }
            | Self::BridgeBelowItsBuses { unit, .. }
            | Self::BuiltinRegionTooSmall { unit, .. } => blank(unit),
            Self::RegisterBaseShared { unit, other, .. } | Self::ScopeOverlap { unit, other, .. } => {
                blank(unit);
                blank(other);
            }
            Self::SecondIncludeAll { unit, first } => {
                blank(unit);
                blank(first);
            }
            Self::RegionMisaligned { owner }
            | Self::RegionEmpty { owner }
            | Self::RegionOutsideMemory { owner, .. } => {
                owner.redact();
            }
            Self::RegionsOverlap { owner, other } => {
                owner.redact();
                other.redact();
            }
            _ => {}
        }
        self
    }

    /// The index of the unit the error is about, if it is about one unit (a file loader
    /// points at that unit's table).
    pub fn unit_index(&self) -> Option<usize> {
        match self {
            Self::BadName { index } => Some(*index),
            Self::DuplicateName { unit, .. }
            | Self::RegisterBaseMisaligned { unit, .. }
            | Self::RegisterBaseShared { unit, .. }
            | Self::SecondIncludeAll { unit, .. }
            | Self::IncludeAllNotLast { unit }
            | Self::EmptyScope { unit }
            | Self::BridgeBusesBackwards { unit, .. }
            | Self::BridgeBelowItsBuses { unit, .. }
            | Self::ScopeOverlap { unit, .. } => Some(unit.index),
            Self::RegionMisaligned { owner: RegionOwner::Client(unit) }
            | Self::RegionEmpty { owner: RegionOwner::Client(unit) }
            | Self::RegionOutsideMemory { owner: RegionOwner::Client(unit), .. }
            | Self::RegionsOverlap { owner: RegionOwner::Client(unit), .. } => Some(unit.index),
            _ => None,
        }
    }
}

/// Whether `name` is 1 to [`MAX_NAME_LEN`] bytes of `[a-z0-9_-]`.
pub fn is_valid_unit_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Refuses more than [`MAX_SCOPE_ENTRIES`] entries in the structure `name` describes.
fn check_entries(name: impl FnOnce() -> String, entries: usize) -> Result<(), PlatformError> {
    if entries > MAX_SCOPE_ENTRIES {
        return Err(PlatformError::TooManyScopeEntries { structure: name(), entries });
    }
    Ok(())
}

/// A requester id both entries cover, if any.
fn shared_sid(a: &ScopeEntry, b: &ScopeEntry) -> Option<SourceId> {
    match (a, b) {
        (ScopeEntry::Endpoint(s), other) | (other, ScopeEntry::Endpoint(s)) => other.covers(*s).then_some(*s),
        (ScopeEntry::Bridge { bridge: ba, buses: ra }, ScopeEntry::Bridge { bridge: bb, buses: rb }) => {
            if b.covers(*ba) {
                Some(*ba)
            } else if a.covers(*bb) {
                Some(*bb)
            } else {
                let lo = (*ra.start()).max(*rb.start());
                (lo <= *ra.end().min(rb.end())).then(|| SourceId::new(lo, 0, 0))
            }
        }
    }
}

impl PlatformSpec {
    /// Checks every rule of the description (see the module docs); the first broken one
    /// is returned.
    pub fn validate(&self) -> Result<(), PlatformError> {
        self.validate_top()?;
        self.validate_units()?;
        self.validate_scopes()?;
        self.validate_regions()?;
        self.validate_extras()
    }

    fn unit_ref(&self, index: usize) -> UnitRef {
        UnitRef { index, name: self.units.get(index).map(|u| u.name.clone()).unwrap_or_default() }
    }

    fn validate_top(&self) -> Result<(), PlatformError> {
        if self.units.is_empty() {
            return Err(PlatformError::NoUnits);
        }
        if self.units.len() > MAX_UNITS {
            return Err(PlatformError::TooManyUnits { count: self.units.len() });
        }
        if self.segment != 0 {
            return Err(PlatformError::Segment { segment: self.segment });
        }
        let size = self.memory_size;
        if !(MIN_MEMORY_SIZE..=MAX_MEMORY_SIZE).contains(&size) || !size.is_multiple_of(MIN_MEMORY_SIZE) {
            return Err(PlatformError::MemorySize { size });
        }
        Ok(())
    }

    fn validate_units(&self) -> Result<(), PlatformError> {
        let mut include_all: Option<usize> = None;
        for (i, unit) in self.units.iter().enumerate() {
            if !is_valid_unit_name(&unit.name) {
                return Err(PlatformError::BadName { index: i });
            }
            if let UnitScope::Devices(entries) = &unit.scope {
                check_entries(|| format!("unit {i}"), entries.len())?;
            }
            if let Some(first) = self.units[..i].iter().position(|u| u.name == unit.name) {
                return Err(PlatformError::DuplicateName { unit: self.unit_ref(i), first });
            }
            let base = unit.register_base;
            if !base.is_multiple_of(PAGE_SIZE) {
                return Err(PlatformError::RegisterBaseMisaligned { unit: self.unit_ref(i), base });
            }
            if let Some(j) = self.units[..i].iter().position(|u| u.register_base == base) {
                return Err(PlatformError::RegisterBaseShared {
                    unit: self.unit_ref(i),
                    other: self.unit_ref(j),
                    base,
                });
            }
            match &unit.scope {
                UnitScope::All => {
                    if let Some(first) = include_all {
                        return Err(PlatformError::SecondIncludeAll {
                            unit: self.unit_ref(i),
                            first: self.unit_ref(first),
                        });
                    }
                    include_all = Some(i);
                }
                UnitScope::Devices(entries) if entries.is_empty() => {
                    return Err(PlatformError::EmptyScope { unit: self.unit_ref(i) });
                }
                UnitScope::Devices(_) => {}
            }
        }
        // VT-d 8.3: "If a DRHD structure with INCLUDE_PCI_ALL flag Set is reported for a
        // Segment, it must be enumerated by BIOS after all other DRHD structures for the
        // same Segment." (Linux `dmar_register_drhd_unit` relies on it being found last.)
        match include_all {
            Some(i) if i + 1 != self.units.len() => Err(PlatformError::IncludeAllNotLast { unit: self.unit_ref(i) }),
            _ => Ok(()),
        }
    }

    fn validate_scopes(&self) -> Result<(), PlatformError> {
        let mut seen: Vec<(&ScopeEntry, usize)> = Vec::new();
        for (i, unit) in self.units.iter().enumerate() {
            let UnitScope::Devices(entries) = &unit.scope else { continue };
            for entry in entries {
                if let ScopeEntry::Bridge { bridge, buses } = entry {
                    let (secondary, subordinate) = (*buses.start(), *buses.end());
                    if secondary > subordinate {
                        return Err(PlatformError::BridgeBusesBackwards {
                            unit: self.unit_ref(i),
                            bridge: *bridge,
                            secondary,
                            subordinate,
                        });
                    }
                    if bridge.bus() >= secondary {
                        return Err(PlatformError::BridgeBelowItsBuses {
                            unit: self.unit_ref(i),
                            bridge: *bridge,
                            secondary,
                        });
                    }
                }
                // Overlap inside one unit's scope is harmless: both route to it.
                for (other, j) in seen.iter().filter(|(_, j)| *j != i) {
                    if let Some(sid) = shared_sid(entry, other) {
                        return Err(PlatformError::ScopeOverlap {
                            unit: self.unit_ref(i),
                            other: self.unit_ref(*j),
                            sid,
                        });
                    }
                }
            }
            seen.extend(entries.iter().map(|e| (e, i)));
        }
        Ok(())
    }

    fn validate_regions(&self) -> Result<(), PlatformError> {
        let first_builtin = self.units.iter().position(|u| u.driver == UnitDriver::BuiltIn);
        let mut regions: Vec<(RegionOwner, Region)> = Vec::new();
        if let Some(i) = first_builtin
            && self.builtin_region.size < MIN_BUILTIN_REGION
        {
            return Err(PlatformError::BuiltinRegionTooSmall {
                unit: self.unit_ref(i),
                size: self.builtin_region.size,
            });
        }
        // Without a built-in unit an empty built-in region means "none".
        if first_builtin.is_some() || self.builtin_region.size != 0 {
            regions.push((RegionOwner::BuiltIn, self.builtin_region));
        }
        for (i, unit) in self.units.iter().enumerate() {
            if let UnitDriver::Client { region } = unit.driver {
                regions.push((RegionOwner::Client(self.unit_ref(i)), region));
            }
        }
        let drivers = regions.len();
        regions.extend(self.reserved.iter().enumerate().map(|(i, r)| (RegionOwner::Reserved(i), r.region)));
        for (k, (owner, region)) in regions.iter().enumerate() {
            if !region.base.is_page_aligned() || !region.size.is_multiple_of(PAGE_SIZE) {
                return Err(PlatformError::RegionMisaligned { owner: owner.clone() });
            }
            if region.size == 0 {
                return Err(PlatformError::RegionEmpty { owner: owner.clone() });
            }
            if region.base.checked_add(region.size).is_none_or(|end| end.0 > self.memory_size) {
                return Err(PlatformError::RegionOutsideMemory { owner: owner.clone(), memory_size: self.memory_size });
            }
            // Driver regions are pairwise disjoint; a reserved region must miss every
            // driver region (RMRRs may overlap one another: firmware reports what it uses).
            let earlier = if k < drivers { &regions[..k] } else { &regions[..drivers] };
            if let Some((other, _)) = earlier.iter().find(|(_, r)| r.overlaps(region)) {
                return Err(PlatformError::RegionsOverlap { owner: owner.clone(), other: other.clone() });
            }
        }
        Ok(())
    }

    fn validate_extras(&self) -> Result<(), PlatformError> {
        let routing = super::Routing::new(self);
        if let Some(super::AtsRootPorts::Ports(ports)) = &self.ats_root_ports {
            check_entries(|| "the ATSR".to_owned(), ports.len())?;
        }
        for (index, rmrr) in self.reserved.iter().enumerate() {
            check_entries(|| format!("reserved region {index}"), rmrr.devices.len())?;
            if rmrr.devices.is_empty() {
                return Err(PlatformError::ReservedWithoutDevices { index });
            }
            if let Some(&sid) = rmrr.devices.iter().find(|&&s| routing.unit_for(s).is_none()) {
                return Err(PlatformError::ReservedDeviceUncovered { index, sid });
            }
        }
        for (index, satc) in self.satc.iter().enumerate() {
            check_entries(|| format!("satc {index}"), satc.devices.len())?;
            if let Some(&sid) = satc.devices.iter().find(|&&s| routing.unit_for(s).is_none()) {
                return Err(PlatformError::SatcDeviceUncovered { index, sid });
            }
        }
        Ok(())
    }
}
