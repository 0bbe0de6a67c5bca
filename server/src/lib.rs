//! dmar-server: the network faces of an emulated Intel VT-d remapping unit.
//!
//! The unit and the driver that programs it live in `dmar-vtd`; this crate decodes gRPC
//! requests, authorises them, calls the unit or the driver and encodes the answers
//! ([`service`]). No VT-d rule lives here.

pub mod platform_file;
pub mod service;
