//! The platform: several remapping units over one host memory, as a real machine has one
//! VT-d unit per DRHD structure of its ACPI DMAR table (VT-d 8.3).
//!
//! This module owns the description of a platform ([`PlatformSpec`]): its units, the
//! device scope each unit covers, the regions of host memory set aside for the software
//! that drives each unit, and what the DMAR table reports besides (reserved memory for
//! RMRR, ATS-capable root ports for ATSR, SoC-integrated address translation caches for
//! SATC). It also owns the routing rule a request follows to its unit ([`Routing`]): a
//! requester id goes to the unit whose device scope holds it, else to the segment's
//! INCLUDE_PCI_ALL unit, else to none (VT-d 8.3.1; Linux `dmar_find_matched_drhd_unit`).
//! The rules a description must follow are in `validate` ([`PlatformSpec::validate`],
//! [`PlatformError`]).
//!
//! It does not build units or drivers (the server does, from the spec) and does not
//! encode the DMAR table (`crate::acpi` does).

use std::ops::RangeInclusive;

use crate::ids::{Hpa, SourceId, UnitId};
use crate::unit::UnitConfig;

mod validate;

pub use validate::{
    MAX_NAME_LEN, MAX_SCOPE_ENTRIES, MAX_UNITS, MIN_BUILTIN_REGION, PlatformError, RegionOwner, UnitRef,
    is_valid_unit_name,
};

#[cfg(test)]
pub(crate) mod tests;

/// Who programs a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnitDriver {
    /// dmar's built-in driver takes the unit over at start and serves the Control API's
    /// domain, map and interrupt calls on it; its tables live in the platform's
    /// [`PlatformSpec::builtin_region`], shared by every built-in unit (a domain may span
    /// several units, so its page tables are shared).
    BuiltIn,
    /// A client's own driver: the unit stays at its VT-d reset values until a client claims
    /// it and programs it through registers and memory, placing its tables, queues and
    /// buffers in `region`, which only the unit's owner may write.
    Client {
        /// The host memory the owner may use.
        region: Region,
    },
}

/// One entry of a DRHD device scope (VT-d 8.3.1).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ScopeEntry {
    /// A PCI endpoint device (scope type 1): exactly this requester id.
    Endpoint(SourceId),
    /// A PCI sub-hierarchy (scope type 2): the bridge at `bridge` and every device on the
    /// buses below it, `buses` (secondary through subordinate bus number).
    Bridge {
        /// The bridge's own requester id (its path in the table).
        bridge: SourceId,
        /// The buses behind the bridge.
        buses: RangeInclusive<u8>,
    },
}

impl ScopeEntry {
    /// Whether a request from `sid` falls in this entry.
    pub fn covers(&self, sid: SourceId) -> bool {
        match self {
            Self::Endpoint(e) => *e == sid,
            Self::Bridge { bridge, buses } => *bridge == sid || buses.contains(&sid.bus()),
        }
    }
}

/// The devices a unit remaps.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum UnitScope {
    /// Every device of the segment no other unit lists (DRHD flag INCLUDE_PCI_ALL).
    All,
    /// The listed devices and sub-hierarchies.
    Devices(Vec<ScopeEntry>),
}

/// A range of host memory: `base` and `size` in bytes, both 4 KiB aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    /// First byte.
    pub base: Hpa,
    /// Length in bytes.
    pub size: u64,
}

impl Region {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.base.0.saturating_add(self.size)
    }

    /// Whether `[addr, addr + len)` lies inside the region.
    pub fn contains(&self, addr: Hpa, len: u64) -> bool {
        addr.0 >= self.base.0 && addr.0.checked_add(len).is_some_and(|end| end <= self.end())
    }

    /// Whether the two regions share a byte.
    pub fn overlaps(&self, other: &Region) -> bool {
        self.base.0 < other.end() && other.base.0 < self.end()
    }
}

/// One remapping unit of the platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitSpec {
    /// A short name for logs and the wire (`[a-z0-9_-]`, at most 32 bytes).
    pub name: String,
    /// Where the unit's register window sits in the host's physical address space (the
    /// DRHD register base address; 4 KiB aligned). Informative: registers are reached
    /// through the wire, not through memory.
    pub register_base: u64,
    /// The devices it remaps.
    pub scope: UnitScope,
    /// Cache geometries, stale detection, device-TLB time-out.
    pub config: UnitConfig,
    /// Who programs it.
    pub driver: UnitDriver,
}

/// Reserved memory a device keeps using across the OS hand-off (RMRR, VT-d 8.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservedMemory {
    /// The range (4 KiB aligned).
    pub region: Region,
    /// The endpoints that use it.
    pub devices: Vec<SourceId>,
}

/// Root ports that support ATS (ATSR, VT-d 8.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AtsRootPorts {
    /// Every root port of the segment (flag ALL_PORTS).
    All,
    /// The listed root ports (scope type 2 entries).
    Ports(Vec<SourceId>),
}

/// SoC-integrated devices with an address translation cache (SATC, VT-d 8.8).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Satc {
    /// ATC_REQUIRED: software must enable the devices' ATC for them to work correctly.
    pub atc_required: bool,
    /// The endpoints.
    pub devices: Vec<SourceId>,
}

/// A whole platform: the host memory and the units over it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformSpec {
    /// PCI segment of every unit (dmar's requester ids carry no segment: 0).
    pub segment: u16,
    /// Host memory size in bytes.
    pub memory_size: u64,
    /// The units, in DRHD order; a unit's [`UnitId`] is its index here.
    pub units: Vec<UnitSpec>,
    /// The host memory of the built-in driver's root, context and page tables, invalidation
    /// queues, interrupt remapping tables and page request queues, for all its units.
    /// Mappings may not target it.
    pub builtin_region: Region,
    /// RMRR structures.
    pub reserved: Vec<ReservedMemory>,
    /// The ATSR structure, if any root port supports ATS.
    pub ats_root_ports: Option<AtsRootPorts>,
    /// SATC structures.
    pub satc: Vec<Satc>,
}

/// Which unit a requester id's requests go to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routing {
    listed: Vec<(ScopeEntry, UnitId)>,
    include_all: Option<UnitId>,
}

impl Routing {
    /// The routing of `spec`'s units.
    pub fn new(spec: &PlatformSpec) -> Self {
        let mut listed = Vec::new();
        let mut include_all = None;
        for (i, unit) in spec.units.iter().enumerate() {
            let id = UnitId(i as u16);
            match &unit.scope {
                UnitScope::All => include_all = include_all.or(Some(id)),
                UnitScope::Devices(entries) => listed.extend(entries.iter().map(|e| (e.clone(), id))),
            }
        }
        Self { listed, include_all }
    }

    /// The unit whose scope holds `sid`: an endpoint entry naming it first, then the
    /// narrowest sub-hierarchy holding its bus, then the INCLUDE_PCI_ALL unit; `None` when
    /// no unit covers it.
    pub fn unit_for(&self, sid: SourceId) -> Option<UnitId> {
        let endpoint = self.listed.iter().find(|(e, _)| matches!(e, ScopeEntry::Endpoint(s) if *s == sid));
        let bridge = || {
            self.listed.iter().filter(|(e, _)| matches!(e, ScopeEntry::Bridge { .. }) && e.covers(sid)).min_by_key(
                |(e, _)| match e {
                    ScopeEntry::Bridge { buses, .. } => buses.end() - buses.start(),
                    ScopeEntry::Endpoint(_) => 0,
                },
            )
        };
        endpoint.or_else(bridge).map(|(_, id)| *id).or(self.include_all)
    }
}

/// Where the first unit's register window sits by default (the base Linux sees on many
/// client platforms); later units follow 4 KiB apart.
pub const DEFAULT_REGISTER_BASE: u64 = 0xfed9_0000;

impl PlatformSpec {
    /// Today's default platform: one INCLUDE_PCI_ALL unit over a memory of `memory_size`
    /// bytes, driven by the built-in driver, whose tables live in the top eighth of memory
    /// (at most 256 MiB; `DriverConfig::for_memory`).
    pub fn single(memory_size: u64, config: UnitConfig) -> Self {
        let (base, size) = crate::driver::DriverConfig::for_memory(memory_size).table_region;
        Self {
            segment: 0,
            memory_size,
            units: vec![UnitSpec {
                name: "dmar0".to_owned(),
                register_base: DEFAULT_REGISTER_BASE,
                scope: UnitScope::All,
                config,
                driver: UnitDriver::BuiltIn,
            }],
            builtin_region: Region { base, size },
            reserved: Vec::new(),
            ats_root_ports: Some(AtsRootPorts::All),
            satc: Vec::new(),
        }
    }

    /// The unit `id`, if the platform has it.
    pub fn unit(&self, id: UnitId) -> Option<&UnitSpec> {
        self.units.get(id.index())
    }
}
