//! dmar-vtd: an emulated Intel VT-d remapping unit, the software that programs it, and the
//! PCIe ATS codecs both ends of an ATS link share.
//!
//! Layers, bottom up (`docs/ARCHITECTURE.md` has the picture):
//! - [`ids`]: newtypes for the addresses and identifiers the specification keeps apart.
//! - [`clock`]: the time the unit and the driver read (the system clock, or a manual one
//!   for tests).
//! - [`unit`](mod@unit): the hardware model. Registers, tables in emulated host memory, the
//!   page walk, caches, invalidation, fault recording, interrupt remapping and the page
//!   request queue. Plain synchronous Rust: it takes the time as an argument (or reads the
//!   clock it was built with) and returns effects instead of calling out.
//! - [`driver`]: the software model, after the Linux intel-iommu driver. Domains,
//!   attach/detach, map/unmap writing real page tables, and the invalidations each change
//!   needs, through registers and host memory only.
//! - [`platform`]: several units over one memory, the device scope of each, and the
//!   routing of a requester id to its unit.
//! - [`acpi`](mod@acpi): the ACPI DMAR table of a platform, encoded and decoded.
//! - [`ats`]: the PCIe ATS and PRI encodings and limits shared with the device side.
//!
//! This crate has no async, no I/O and no network dependency; the network faces live in
//! `dmar-server` and the device side in `dmar-agent`.

pub mod acpi;
pub mod ats;
pub mod clock;
pub mod driver;
pub mod ids;
pub mod platform;
pub mod unit;

#[cfg(test)]
mod testing;

pub use ids::{DomainId, Hpa, ITag, Iova, PAGE_SHIFT, PAGE_SIZE, Pasid, SourceId, UnitId};
