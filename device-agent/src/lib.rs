//! dmar-agent: hosts emulated PCIe functions, each with its own address translation cache,
//! on one ATS link to a dmar server.
//!
//! Not built yet: the agent arrives with the ATS link protocol. The crate exists so the
//! workspace layout is the final one.
