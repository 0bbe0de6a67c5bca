//! Encoding a platform as the DMAR table its firmware would publish.
//!
//! Choices (docs/PLATFORM.md has the whole table):
//! - Host address width: the unit's HAW ([`HOST_ADDRESS_WIDTH`], 46 bits): the width above
//!   which address bits of every table entry are reserved. CAP.MGAW (57) is the width of
//!   the addresses devices put on the bus, not of host memory; the 1 TiB host memory limit
//!   fits below 2^46.
//! - Flags: INTR_REMAP set (every unit remaps interrupts, ECAP.IR); X2APIC_OPT_OUT clear
//!   (the units support x2APIC mode, ECAP.EIM); DMA_CTRL_PLATFORM_OPT_IN clear (dmar has no
//!   boot phase with DMA protection and no external-facing ports for it to be about).
//! - Structures in type order (VT-d 8.1: DRHDs, then RMRRs, ATSR, SATCs), DRHDs in unit
//!   order, so the INCLUDE_PCI_ALL unit a valid spec puts last stays last (VT-d 8.3).
//! - Every DRHD's register set is one 4 KiB page (size 0; `regs::WINDOW_SIZE`).

use crate::platform::{AtsRootPorts, PlatformSpec, ScopeEntry, UnitScope, UnitSpec};
use crate::unit::regs::WINDOW_SIZE;
use crate::unit::tables::HOST_ADDRESS_WIDTH;
use crate::{PAGE_SIZE, SourceId};

use super::{
    ATSR_ALL_PORTS, CREATOR_ID, CREATOR_REVISION, DRHD_INCLUDE_PCI_ALL, OEM_ID, OEM_REVISION, OEM_TABLE_ID, REVISION,
    SATC_ATC_REQUIRED, SIGNATURE, ScopeKind, flags, structure,
};

// One register page per unit: the DRHD size field is log2 of the pages.
const _: () = assert!(WINDOW_SIZE == PAGE_SIZE);

/// The DMAR table of `spec`, byte for byte, checksum included.
///
/// `spec` should have passed [`PlatformSpec::validate`]: the encoder writes what it is
/// given (a segment, an INCLUDE_PCI_ALL unit out of place), and a structure's 16-bit
/// length saturates past `platform::MAX_SCOPE_ENTRIES`-sized scopes rather than wrap.
pub fn dmar_table(spec: &PlatformSpec) -> Vec<u8> {
    let mut t = Vec::with_capacity(256);
    t.extend_from_slice(&SIGNATURE);
    t.extend_from_slice(&[0; 4]); // length, patched below
    t.push(REVISION);
    t.push(0); // checksum, patched below
    t.extend_from_slice(&OEM_ID);
    t.extend_from_slice(&OEM_TABLE_ID);
    t.extend_from_slice(&OEM_REVISION.to_le_bytes());
    t.extend_from_slice(&CREATOR_ID);
    t.extend_from_slice(&CREATOR_REVISION.to_le_bytes());
    // VT-d 8.1: "the maximum DMA physical addressability ... computed as (N+1)".
    t.push(HOST_ADDRESS_WIDTH as u8 - 1);
    t.push(flags::INTR_REMAP);
    t.extend_from_slice(&[0; 10]);

    for unit in &spec.units {
        drhd(&mut t, spec.segment, unit);
    }
    for rmrr in &spec.reserved {
        // VT-d 8.4: base, then limit = the last byte; scope entries are endpoints.
        let at = begin(&mut t, structure::RMRR);
        t.extend_from_slice(&[0; 2]);
        t.extend_from_slice(&spec.segment.to_le_bytes());
        t.extend_from_slice(&rmrr.region.base.0.to_le_bytes());
        t.extend_from_slice(&rmrr.region.end().saturating_sub(1).to_le_bytes());
        for &sid in &rmrr.devices {
            scope(&mut t, ScopeKind::Endpoint, sid);
        }
        finish(&mut t, at);
    }
    if let Some(ports) = &spec.ats_root_ports {
        // VT-d 8.5: ALL_PORTS, or one sub-hierarchy entry per root port.
        let at = begin(&mut t, structure::ATSR);
        let (flag, listed): (u8, &[SourceId]) = match ports {
            AtsRootPorts::All => (ATSR_ALL_PORTS, &[]),
            AtsRootPorts::Ports(p) => (0, p),
        };
        t.extend_from_slice(&[flag, 0]);
        t.extend_from_slice(&spec.segment.to_le_bytes());
        for &sid in listed {
            scope(&mut t, ScopeKind::Bridge, sid);
        }
        finish(&mut t, at);
    }
    for satc in &spec.satc {
        // VT-d 8.8: flags (ATC_REQUIRED), reserved, segment; endpoint entries.
        let at = begin(&mut t, structure::SATC);
        t.extend_from_slice(&[if satc.atc_required { SATC_ATC_REQUIRED } else { 0 }, 0]);
        t.extend_from_slice(&spec.segment.to_le_bytes());
        for &sid in &satc.devices {
            scope(&mut t, ScopeKind::Endpoint, sid);
        }
        finish(&mut t, at);
    }

    let len = u32::try_from(t.len()).unwrap_or(u32::MAX);
    t[4..8].copy_from_slice(&len.to_le_bytes());
    let sum = t.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    t[9] = 0u8.wrapping_sub(sum);
    t
}

/// VT-d 8.3: flags, size (2^0 pages), segment, register base, then the scope.
fn drhd(t: &mut Vec<u8>, segment: u16, unit: &UnitSpec) {
    let at = begin(t, structure::DRHD);
    let flags = if unit.scope == UnitScope::All { DRHD_INCLUDE_PCI_ALL } else { 0 };
    t.extend_from_slice(&[flags, 0]);
    t.extend_from_slice(&segment.to_le_bytes());
    t.extend_from_slice(&unit.register_base.to_le_bytes());
    if let UnitScope::Devices(entries) = &unit.scope {
        for entry in entries {
            match entry {
                ScopeEntry::Endpoint(sid) => scope(t, ScopeKind::Endpoint, *sid),
                ScopeEntry::Bridge { bridge, .. } => scope(t, ScopeKind::Bridge, *bridge),
            }
        }
    }
    finish(t, at);
}

/// Starts a structure of `kind` with a length to patch; returns its offset.
fn begin(t: &mut Vec<u8>, kind: u16) -> usize {
    let at = t.len();
    t.extend_from_slice(&kind.to_le_bytes());
    t.extend_from_slice(&[0; 2]);
    at
}

/// Patches the length of the structure begun at `at`.
fn finish(t: &mut [u8], at: usize) {
    let len = u16::try_from(t.len() - at).unwrap_or(u16::MAX);
    t[at + 2..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// VT-d 8.3.1: a one-hop entry naming `sid`: start bus = its bus, path = (device, function),
/// enumeration id 0 (used only by I/O APIC, HPET and name-space entries).
fn scope(t: &mut Vec<u8>, kind: ScopeKind, sid: SourceId) {
    t.extend_from_slice(&[kind.code(), 8, 0, 0, 0, sid.bus(), sid.dev(), sid.func()]);
}
