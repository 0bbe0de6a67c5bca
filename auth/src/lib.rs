//! Who may talk to dmar, and over what: the foundation of dmar's secure links.
//!
//! An IOMMU exists to isolate; a dmar server that anyone on the network can drive gives
//! every tenant's memory to whoever reaches its port. This crate holds what the server, the
//! agents and their tests share to prevent that:
//!
//! - [`identity`]: a peer's [`Identity`], the common name of the certificate it presented.
//! - [`role`]: the closed set of [`Role`]s (operator, observer, device) and what each means.
//! - [`requester`]: the requester-id ranges a device identity may bind.
//! - [`policy`]: the operator's TOML [`Policy`] mapping identities to roles, ranges and quotas.
//! - [`tls`]: PEM files into tonic and rustls configurations (mutual TLS, ALPN `h2`, ring).
//! - [`accept`]: a TLS accept loop for tonic that identifies each connection once, limits
//!   connections per identity and counts the connections it refuses.
//! - [`health`]: a plaintext port serving only `grpc.health.v1`, for probes that cannot do TLS.
//! - [`pki`]: a development CA and certificates (`dmar-certs`), for local runs and tests.
//!
//! It does not know the gRPC services: mapping each RPC to the role it requires, and
//! enforcing domain, frame and link quotas, belong to the services that define them. It
//! depends on `dmar-vtd` for [`dmar_vtd::SourceId`] only, on `dmar-process` for its rate-limited
//! logging, and never on the server or the agent.

#![warn(missing_docs)]

mod de;

pub mod accept;
pub mod health;
pub mod identity;
pub mod pki;
pub mod policy;
pub mod requester;
pub mod role;
pub mod tls;

pub use accept::{
    AcceptConfig, CONNECTION_REFUSALS, ConnectionLimiter, ConnectionRefusal, ConnectionRefusals, Incoming, PeerInfo,
    PeerStream, PlainIncoming, incoming, incoming_with, plaintext, plaintext_with,
};
pub use health::serve_health_only;
pub use identity::{Identity, IdentityError};
pub use pki::{AgentSpec, CertKind, DevPki, DevPkiSpec, IssuedCert, PkiError};
pub use policy::{Grant, Policy, PolicyError, Quotas};
pub use requester::{RequesterIdRange, RequesterIdSet};
pub use role::{Role, Roles};
pub use tls::{ClientAuth, TlsError, TlsFiles, TlsMaterial};

/// The rustls and tokio-rustls this crate builds on, so users name the same versions
/// (a `TlsStream` of another tokio-rustls would not be tonic's `Connected`).
pub use {rustls, tokio_rustls};
