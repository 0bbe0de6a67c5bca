//! dmar-server: an emulated Intel VT-d remapping unit and the software that programs it.
//!
//! Layers, bottom up (see `docs/ARCHITECTURE.md`):
//! - [`unit`]: the hardware model. Registers, tables in emulated host memory, the page
//!   walk, caches, invalidation and fault recording. Plain synchronous Rust, no I/O.
//! - [`driver`]: the software model, after the Linux intel-iommu driver. Domains,
//!   attach/detach, map/unmap writing real page tables, and the invalidations each change
//!   needs.
//!
//! The network faces (gRPC control service and ATS link) build on these two.

pub mod driver;
pub mod ids;
pub mod service;
pub mod unit;

pub use ids::{DomainId, Hpa, ITag, Iova, PAGE_SHIFT, PAGE_SIZE, Pasid, SourceId};
