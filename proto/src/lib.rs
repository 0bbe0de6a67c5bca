//! The `dmar.v1` wire contract shared by the server, the agents and the load generator.
//!
//! The gRPC services (control, ATS link, agent control) are not defined yet; this crate
//! holds the place in the workspace so the layout matches `docs/ARCHITECTURE.md`.
