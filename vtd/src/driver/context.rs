//! The root table and the per-bus context tables (VT-d 3.4.2, 3.4.3, 9.1, 9.3; Linux
//! `iommu_context_addr`, `domain_context_mapping_one`, `context_clear_entry`), and the
//! record of which device is attached to which domain.
//!
//! This module owns the table memory layout and the order in which the two halves of a
//! 128-bit entry are written, so that the unit never sees a present entry with a stale
//! upper half. It does not invalidate: the driver does that after a change, under the same
//! lock, using the old entry this module returns.

use std::collections::BTreeMap;

use super::error::DriverError;
use super::frames::FrameAllocator;
use crate::ids::{DomainId, Hpa, SourceId};
use crate::unit::memory::HostMemory;
use crate::unit::tables::{ContextEntry, RootEntry};

/// A device's current attachment.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Attachment {
    pub(crate) did: DomainId,
    /// The device asked for ATS (TT=01b in a paging domain): its device TLB is invalidated
    /// with the domain's IOTLB (the domain keeps the set of such devices).
    pub(crate) ats: bool,
    /// Translated-request checking is on for it in the unit (only with ATS in a paging
    /// domain).
    pub(crate) check_translated: bool,
}

/// Root table, context tables and attachments; the driver keeps it behind one lock.
#[derive(Debug)]
pub(crate) struct ContextTables {
    root: Hpa,
    /// Context table of each bus, allocated on the bus's first attach and kept.
    buses: Vec<Option<Hpa>>,
    pub(crate) devices: BTreeMap<SourceId, Attachment>,
}

impl ContextTables {
    /// Allocates an empty root table (every root entry not present).
    pub(crate) fn new(frames: &FrameAllocator) -> Result<Self, DriverError> {
        Ok(Self { root: frames.alloc()?, buses: vec![None; 256], devices: BTreeMap::new() })
    }

    /// The root table (RTADDR).
    pub(crate) fn root(&self) -> Hpa {
        self.root
    }

    /// Address of the context entry of `sid` (16 bytes), allocating the bus's context
    /// table and publishing it in the root entry on first use.
    fn entry_addr(&mut self, mem: &HostMemory, frames: &FrameAllocator, sid: SourceId) -> Result<Hpa, DriverError> {
        let bus = usize::from(sid.bus());
        let table = match self.buses[bus] {
            Some(t) => t,
            None => {
                let t = frames.alloc()?;
                let re = RootEntry::new(t);
                let slot = Hpa(self.root.0 + bus as u64 * 16);
                // hi first, then lo with P: the unit never sees P with a stale hi.
                mem.write_u64(Hpa(slot.0 + 8), re.hi)?;
                mem.write_u64(slot, re.lo)?;
                self.buses[bus] = Some(t);
                t
            }
        };
        Ok(Hpa(table.0 + u64::from(sid.devfn()) * 16))
    }

    /// Writes a present context entry into a slot that is not present (the caller cleared
    /// it first). No flush is needed: not-present entries are never cached when CM=0
    /// (VT-d 6.1).
    pub(crate) fn install(
        &mut self,
        mem: &HostMemory,
        frames: &FrameAllocator,
        sid: SourceId,
        entry: ContextEntry,
    ) -> Result<(), DriverError> {
        let slot = self.entry_addr(mem, frames, sid)?;
        mem.write_u64(Hpa(slot.0 + 8), entry.hi)?;
        mem.write_u64(slot, entry.lo)?;
        Ok(())
    }

    /// Clears the context entry of `sid` and returns what it held (Linux
    /// `context_clear_entry`: lo, which holds P, first).
    pub(crate) fn clear(&mut self, mem: &HostMemory, sid: SourceId) -> Result<ContextEntry, DriverError> {
        let Some(table) = self.buses[usize::from(sid.bus())] else {
            return Ok(ContextEntry::default());
        };
        let slot = Hpa(table.0 + u64::from(sid.devfn()) * 16);
        let old = ContextEntry::from_bits(mem.read_u64(slot)?, mem.read_u64(Hpa(slot.0 + 8))?);
        mem.write_u64(slot, 0)?;
        mem.write_u64(Hpa(slot.0 + 8), 0)?;
        Ok(old)
    }

    /// The devices attached to `did`.
    pub(crate) fn attached(&self, did: DomainId) -> impl Iterator<Item = SourceId> + '_ {
        self.devices.iter().filter(move |(_, a)| a.did == did).map(|(sid, _)| *sid)
    }
}
