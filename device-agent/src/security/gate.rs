//! The control port's gate: which callers may use AgentControl (and reflection).
//!
//! Under TLS the control port accepts clients without a certificate (so that health
//! probes need none) and this gate, wrapped around every service but health, demands one
//! per call: no certificate is UNAUTHENTICATED, a verified identity outside the trusted
//! set is PERMISSION_DENIED. A certificate from another CA never gets this far: the
//! handshake fails. In plaintext there is no identity to check and the gate lets every
//! call through; `check_plaintext` decides where that is allowed.

use std::collections::HashSet;
use std::sync::Arc;

use dmar_auth::{Identity, PeerInfo};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use super::AgentSecurity;
use super::refusals::{Refusal, Refusals, Refused};

/// The interceptor around AgentControl and reflection. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct ControlGate {
    /// The trusted identities under TLS; `None` in plaintext.
    trusted: Option<Arc<HashSet<Identity>>>,
    refusals: Arc<Refusals>,
}

impl ControlGate {
    pub(crate) fn new(security: &AgentSecurity, refusals: Arc<Refusals>) -> Self {
        let trusted = security.is_tls().then(|| Arc::new(security.trusted_clients.iter().cloned().collect()));
        Self { trusted, refusals }
    }

    fn check(&self, peer: Option<&PeerInfo>) -> Result<(), Status> {
        let Some(trusted) = &self.trusted else {
            return Ok(());
        };
        let remote = peer.and_then(PeerInfo::remote_addr);
        match peer.and_then(PeerInfo::identity) {
            Some(id) if trusted.contains(id) => Ok(()),
            Some(id) => {
                self.refusals
                    .refuse(Refusal::UntrustedIdentity, Refused { peer: remote, identity: Some(id), path: None });
                // The name is an identity (a restricted alphabet), safe to echo.
                Err(Status::permission_denied(format!("{id} is not trusted by this agent's control port")))
            }
            None => {
                self.refusals.refuse(Refusal::NoCertificate, Refused { peer: remote, ..Refused::default() });
                Err(Status::unauthenticated("this agent's control port requires a client certificate"))
            }
        }
    }
}

impl Interceptor for ControlGate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(PeerInfo::of(&request))?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::security::AgentTls;

    fn request(identity: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        let id = identity.map(|n| Identity::new(n).expect("a name"));
        r.extensions_mut().insert(PeerInfo::new(id, Some("127.0.0.1:4000".parse().expect("addr"))));
        r
    }

    fn gate(tls: bool) -> ControlGate {
        let refusals = Arc::new(Refusals::new(&crate::metrics::handles()));
        let mut security = AgentSecurity::default();
        if tls {
            let pki = dmar_auth::DevPki::generate(&dmar_auth::DevPkiSpec::default()).expect("pki");
            let tls = AgentTls::new(pki.tls_material("agent-0").expect("material"), "dmar-server").expect("tls");
            security = AgentSecurity::mutual_tls(tls);
            security.trusted_clients.push(Identity::new("loadgen-1").expect("a name"));
        }
        ControlGate::new(&security, refusals)
    }

    fn code(g: &mut ControlGate, r: Request<()>) -> Code {
        g.call(r).map_or_else(|s| s.code(), |_| Code::Ok)
    }

    #[test]
    fn under_tls_only_trusted_identities_pass() {
        let mut g = gate(true);
        assert_eq!(code(&mut g, request(Some("operator"))), Code::Ok);
        assert_eq!(code(&mut g, request(Some("loadgen-1"))), Code::Ok);
        assert_eq!(code(&mut g, request(Some("observer"))), Code::PermissionDenied);
        assert_eq!(code(&mut g, request(Some("agent-0"))), Code::PermissionDenied);
        assert_eq!(code(&mut g, request(None)), Code::Unauthenticated);
        assert_eq!(code(&mut g, Request::new(())), Code::Unauthenticated);
    }

    #[test]
    fn in_plaintext_there_is_nothing_to_check() {
        let mut g = gate(false);
        assert_eq!(code(&mut g, Request::new(())), Code::Ok);
        assert_eq!(code(&mut g, request(Some("observer"))), Code::Ok);
    }
}
